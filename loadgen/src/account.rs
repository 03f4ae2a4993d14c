//! The exact message accounting done by the coordinator.
//!
//! A recipient may live in another worker than its sender, so no worker can tell alone whether a
//! message was lost. Every worker therefore reports the identity `(from, to, counter)` of each send
//! that was acknowledged (`acked_ids`), each send that was not (`unacked_ids`: error code or ack
//! timeout), and each distinct delivery its users accepted after seq dedup (`received_ids`);
//! `counter` is the sender's per-run message counter (the low 32 bits of `client_msg_id`, also in
//! the body). The coordinator joins the sets:
//!
//! - **lost**: acknowledged, never received;
//! - **delivered, unacknowledged**: received although the sender saw no ack (a timeout or a
//!   retryable error after the server had accepted it) — allowed, reported for information;
//! - **phantom**: received but never sent in this run — must be 0.
//!
//! Duplicates and order are checked at the recipient, which sees all of its own deliveries:
//! raw duplicates (same seq twice, dropped by seq dedup) and duplicates after dedup (a new seq for
//! a `(from, client_msg_id)` already held) are counted separately, and out-of-order means the
//! sender's counter went backwards within one `(from → to)` conversation.

use std::collections::HashSet;

use serde::Serialize;

use crate::msg::Report;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Join {
    pub acked: u64,
    pub received: u64,
    pub lost: u64,
    pub delivered_unacked: u64,
    pub phantom: u64,
    /// Example lost messages (from index, to index, counter), at most 10.
    pub lost_examples: Vec<[u32; 3]>,
}

pub fn join(r: &Report) -> Join {
    let received: HashSet<[u32; 3]> = r.received_ids.0.iter().copied().collect();
    let acked: HashSet<[u32; 3]> = r.acked_ids.0.iter().copied().collect();
    let unacked: HashSet<[u32; 3]> = r.unacked_ids.0.iter().copied().collect();
    let mut j = Join {
        acked: acked.len() as u64,
        received: received.len() as u64,
        ..Default::default()
    };
    for id in &acked {
        if !received.contains(id) {
            j.lost += 1;
            if j.lost_examples.len() < 10 {
                j.lost_examples.push(*id);
            }
        }
    }
    for id in &received {
        if acked.contains(id) {
            continue;
        }
        if unacked.contains(id) {
            j.delivered_unacked += 1;
        } else {
            j.phantom += 1;
        }
    }
    j.lost_examples.sort_unstable();
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_counts_lost_unacked_and_phantom_across_workers() {
        // Worker A sent; worker B received.
        let mut a = Report::default();
        a.acked_ids.push(1, 5, 1);
        a.acked_ids.push(1, 6, 2);
        a.acked_ids.push(2, 5, 1);
        a.unacked_ids.push(2, 7, 2);
        let mut b = Report::default();
        b.received_ids.push(1, 5, 1);
        b.received_ids.push(2, 5, 1);
        b.received_ids.push(2, 7, 2); // delivered although the ack never came
        b.received_ids.push(3, 5, 9); // nobody sent this
        let mut all = Report::default();
        all.merge(&a);
        all.merge(&b);
        let j = join(&all);
        assert_eq!(j.acked, 3);
        assert_eq!(j.received, 4);
        assert_eq!(j.lost, 1);
        assert_eq!(j.lost_examples, vec![[1, 6, 2]]);
        assert_eq!(j.delivered_unacked, 1);
        assert_eq!(j.phantom, 1);
    }

    #[test]
    fn nothing_lost_when_everything_arrives() {
        let mut r = Report::default();
        for i in 0..1000 {
            r.acked_ids.push(i % 7, i % 11, i);
            r.received_ids.push(i % 7, i % 11, i);
        }
        let j = join(&r);
        assert_eq!((j.lost, j.phantom, j.delivered_unacked), (0, 0, 0));
    }
}
