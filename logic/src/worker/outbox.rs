//! The sender side of a fan-out: the outbox record written with the message, the live appends
//! sent after the commit, the recipients' confirmations, replays and retries.
//!
//! One outbox entry `(shard, msg_id)` lists every recipient of one message (one for c2c, every
//! member for a group post, every user of an s2c). It stays in the store until **every**
//! recipient's worker confirmed its append: an `AppendDone` names the recipient, and the worker
//! keeps the recipients still unconfirmed in memory ([`Outbox`]), rebuilt from the store at start.
//! (Deleting the entry on the first confirmation lost the post for the others whenever their
//! append was held back or lost: a peer link not yet resynced, a crash before they committed.)
//!
//! Unconfirmed appends are re-sent as *replays*, which recipients deduplicate by their
//! `(uid, msg_id)` index:
//! - at start: every entry of the worker's shards (a crash interrupted their fan-out);
//! - after a peer link changed: the entries with recipients on that node (see [`crate::peer`]);
//! - when recipients on another node have not confirmed within [`RETRY_FIRST_MS`] (then with
//!   backoff up to [`RETRY_MAX_MS`]): a safety net for a loss that no link change reveals.
//!   Appends to this node's own workers travel in-process and are never lost, so they are not
//!   retried.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use im_shared::proto::Message;
use im_shared::shard::VSHARDS;
use im_shared::{MsgId, ShardId, UserId};

use super::{now_ms, AppendReq, Round, Worker, WorkerMsg};
use crate::store::{Op, OutboxEntry, Store};

/// First re-send of appends that a worker of another node has not confirmed ...
pub(super) const RETRY_FIRST_MS: u64 = 5_000;
/// ... doubling up to this.
pub(super) const RETRY_MAX_MS: u64 = 60_000;

/// A fan-out not yet confirmed by every recipient.
struct Fanout {
    msg: Message,
    left: HashSet<UserId>,
    /// When the recipients on other nodes that are still in `left` get the next re-send.
    due_ms: u64,
    backoff_ms: u64,
}

/// The unconfirmed fan-outs of one worker, by outbox key.
#[derive(Default)]
pub(super) struct Outbox {
    pending: HashMap<(ShardId, MsgId), Fanout>,
}

impl Outbox {
    /// Fan-outs with at least one unconfirmed recipient.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    fn track(&mut self, shard: ShardId, msg: &Message, recipients: &[UserId], now: u64) {
        self.pending
            .entry((shard, msg.msg_id))
            .or_insert_with(|| Fanout {
                msg: msg.clone(),
                left: recipients.iter().copied().collect(),
                due_ms: now + RETRY_FIRST_MS,
                backoff_ms: RETRY_FIRST_MS,
            });
    }

    /// Records that `recipient` appended `msg_id`; true when that was the last one (the entry
    /// can go).
    fn confirm(&mut self, shard: ShardId, msg_id: MsgId, recipient: UserId) -> bool {
        let key = (shard, msg_id);
        let Some(f) = self.pending.get_mut(&key) else {
            // Already complete (a replay's second confirmation), or not ours: nothing to do.
            return false;
        };
        if !f.left.remove(&recipient) || !f.left.is_empty() {
            return false;
        }
        self.pending.remove(&key);
        true
    }
}

impl<S: Store> Worker<S> {
    /// Writes `msg` to the outbox (in this round's batch) and queues the live appends to
    /// `recipients`, sent after the commit.
    pub(super) fn fan_out(
        &mut self,
        shard: ShardId,
        msg: &Message,
        recipients: Vec<UserId>,
        round: &mut Round,
    ) {
        for r in &recipients {
            round.appends_out[self.owner(*r)].push(AppendReq {
                recipient: *r,
                shard,
                msg: msg.clone(),
                replay: false,
            });
        }
        self.outbox.track(shard, msg, &recipients, now_ms());
        round.batch.push(Op::OutboxPut(OutboxEntry {
            shard,
            msg_id: msg.msg_id,
            recipients,
            msg: msg.clone(),
        }));
    }

    /// Recipients' workers confirmed these appends: an entry is deleted once all did.
    pub(super) fn on_append_done(
        &mut self,
        done: Vec<(ShardId, MsgId, UserId)>,
        round: &mut Round,
    ) {
        for (shard, msg_id, recipient) in done {
            if self.outbox.confirm(shard, msg_id, recipient) {
                round.batch.push(Op::OutboxDelete { shard, msg_id });
            }
        }
    }

    /// Re-sends the fan-out of this worker's outbox entries (all of them at start: everything a
    /// crash interrupted; with `only_node`, those bound for that node), to the recipients that
    /// have not confirmed.
    pub(super) async fn replay_outbox(&mut self, only_node: Option<usize>) {
        let total = self.router.total();
        let me = self.router.global(self.idx);
        let now = now_ms();
        let mut out: Vec<Vec<AppendReq>> = (0..total).map(|_| Vec::new()).collect();
        let mut n = 0usize;
        for s in 0..VSHARDS {
            let shard = ShardId(s);
            if self.router.owner_of_shard(shard) != me {
                continue;
            }
            let entries = loop {
                match self.store.outbox(shard).await {
                    Ok(e) => break e,
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(worker = self.idx, "outbox read failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        // A corrupt record must not keep the worker from serving: report it
                        // loudly and go on; the entries of this shard need an operator.
                        tracing::error!(
                            worker = self.idx,
                            shard = shard.0,
                            "outbox of shard unreadable, skipped: {e}"
                        );
                        break Vec::new();
                    }
                }
            };
            for OutboxEntry {
                shard,
                recipients,
                msg,
                ..
            } in entries
            {
                self.outbox.track(shard, &msg, &recipients, now);
                let left = &self.outbox.pending[&(shard, msg.msg_id)].left;
                for r in recipients {
                    if !left.contains(&r)
                        || only_node.is_some_and(|n| self.router.node_of(self.owner(r)) != n)
                    {
                        continue;
                    }
                    n += 1;
                    out[self.owner(r)].push(AppendReq {
                        recipient: r,
                        shard,
                        msg: msg.clone(),
                        replay: true,
                    });
                }
            }
        }
        if n > 0 {
            tracing::info!(worker = self.idx, appends = n, "replaying outbox");
        }
        self.send_appends(out);
    }

    /// Re-sends the appends that recipients on other nodes have not confirmed in time.
    pub(super) fn retry_overdue(&mut self, now: u64) {
        let total = self.router.total();
        let mut out: Vec<Vec<AppendReq>> = (0..total).map(|_| Vec::new()).collect();
        let mut n = 0usize;
        for (&(shard, _), f) in self.outbox.pending.iter_mut() {
            if f.due_ms > now {
                continue;
            }
            f.backoff_ms = (f.backoff_ms * 2).min(RETRY_MAX_MS);
            f.due_ms = now + f.backoff_ms;
            for &r in &f.left {
                let w = self.router.owner(r);
                if self.router.node_of(w) == self.router.node {
                    continue;
                }
                n += 1;
                out[w].push(AppendReq {
                    recipient: r,
                    shard,
                    msg: f.msg.clone(),
                    replay: true,
                });
            }
        }
        if n > 0 {
            tracing::info!(
                worker = self.idx,
                appends = n,
                "re-sending unconfirmed appends"
            );
            self.metrics.add_retried_appends(n as u64);
        }
        self.send_appends(out);
    }

    fn send_appends(&self, out: Vec<Vec<AppendReq>>) {
        for (w, reqs) in out.into_iter().enumerate() {
            if !reqs.is_empty() {
                self.router.send(self.idx, w, WorkerMsg::Append(reqs));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use im_shared::Seq;

    fn msg(id: u64) -> Message {
        Message {
            seq: Seq(0),
            prev_seq: Seq(0),
            msg_id: MsgId(id),
            conv: 2,
            from: UserId(1),
            to: UserId(100),
            client_msg_id: 1,
            server_time_ms: 0,
            body: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn an_entry_completes_only_when_every_recipient_confirmed() {
        let mut o = Outbox::default();
        let (s, m) = (ShardId(3), msg(7));
        o.track(s, &m, &[UserId(1), UserId(2), UserId(3)], 0);
        assert!(!o.confirm(s, m.msg_id, UserId(2)));
        assert!(
            !o.confirm(s, m.msg_id, UserId(2)),
            "a repeated confirmation counts once"
        );
        assert!(
            !o.confirm(s, m.msg_id, UserId(9)),
            "a stranger does not count"
        );
        assert!(!o.confirm(s, m.msg_id, UserId(1)));
        assert_eq!(o.len(), 1);
        assert!(o.confirm(s, m.msg_id, UserId(3)));
        assert_eq!(o.len(), 0);
        assert!(
            !o.confirm(s, m.msg_id, UserId(3)),
            "late duplicate after completion"
        );
    }

    #[test]
    fn tracking_again_keeps_the_confirmations_already_received() {
        let mut o = Outbox::default();
        let (s, m) = (ShardId(1), msg(9));
        o.track(s, &m, &[UserId(1), UserId(2)], 0);
        assert!(!o.confirm(s, m.msg_id, UserId(1)));
        // A replay reads the entry from the store again: user 1 stays confirmed.
        o.track(s, &m, &[UserId(1), UserId(2)], 10);
        assert!(o.confirm(s, m.msg_id, UserId(2)));
    }
}
