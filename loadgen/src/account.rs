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
//! - **phantom**: received but never sent in this run — must be 0;
//! - **undelivered, recipient offline**: acknowledged, not received, and the recipient was not
//!   logged in and synced at the end of the run (`Report::not_back_ids`): stored for its next
//!   login, not lost. The run fails on such users anyway (they should have come back).
//!
//! Duplicates and order are checked at the recipient, which sees all of its own deliveries:
//! raw duplicates (same seq twice, dropped by seq dedup) and duplicates after dedup (a new seq for
//! a `(from, client_msg_id)` already held) are counted separately, and out-of-order means the
//! sender's counter went backwards within one `(from → to)` conversation.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::msg::{group_members, Packed, Report};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Join {
    pub acked: u64,
    pub received: u64,
    pub lost: u64,
    pub delivered_unacked: u64,
    pub phantom: u64,
    /// Acknowledged, not received, and the recipient was not back at the end (not in `lost`).
    pub undelivered_offline: u64,
    /// Example lost messages (from index, to index, counter), at most 10.
    pub lost_examples: Vec<[u32; 3]>,
}

pub fn join(r: &Report) -> Join {
    let received: HashSet<[u32; 3]> = r.received_ids.0.iter().copied().collect();
    let acked: HashSet<[u32; 3]> = r.acked_ids.0.iter().copied().collect();
    let unacked: HashSet<[u32; 3]> = r.unacked_ids.0.iter().copied().collect();
    let offline: HashSet<u32> = r.not_back_ids.iter().copied().collect();
    let mut j = Join {
        acked: acked.len() as u64,
        received: received.len() as u64,
        ..Default::default()
    };
    for id in &acked {
        if !received.contains(id) {
            if offline.contains(&id[1]) {
                j.undelivered_offline += 1;
                continue;
            }
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

/// The exact accounting of the `group` scenario, per (post, member).
///
/// Sends are posts `(from, group number, counter)`; deliveries are `(from, member, counter)` in
/// the order each member accepted them. Every acknowledged post must reach every member of its
/// group once, the poster included (its own copy arrives as a `Deliver` too), and all members
/// must see the posts of a group in one order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GroupJoin {
    pub posts_acked: u64,
    pub posts_unacked: u64,
    /// Member copies owed: the sum over acknowledged posts of their group's size.
    pub expected: u64,
    /// Distinct member copies received (of any post of this run).
    pub received: u64,
    /// Of `received`, the posters' own copies.
    pub own_copies: u64,
    /// (acknowledged post, member) pairs never delivered.
    pub lost: u64,
    /// Of the pairs never delivered, those whose member was not back at the end (not in `lost`).
    pub undelivered_offline: u64,
    /// Acknowledged posts with at least one member copy missing.
    pub posts_with_loss: u64,
    /// Copies of posts the sender saw no ack for (allowed).
    pub delivered_unacked: u64,
    /// Copies of posts never sent in this run (must be 0).
    pub phantom: u64,
    /// Copies received by a user who is not a member of the post's group (must be 0).
    pub non_member: u64,
    /// (group, member) timelines compared with their group's reference order.
    pub order_checked: u64,
    /// Members whose order of a group's posts differs from the group's reference order (the
    /// order of the member that received the most of them): must be 0.
    pub order_mismatch_members: u64,
    /// Copies a member received after a post that the reference order puts later.
    pub order_mismatch_entries: u64,
    /// Examples: lost `(from, member, counter)`, order mismatches `(group, member)`; at most 10.
    pub lost_examples: Vec<[u32; 3]>,
    pub order_examples: Vec<[u32; 2]>,
    /// Copies out of place `(group, member, from, counter)` and each such group's reference
    /// member `(group, member)`, to trace a mismatch in the server's logs; at most 10.
    pub order_copies: Vec<[u32; 4]>,
    pub order_refs: Vec<[u32; 2]>,
}

/// Joins the posts and member copies of a `group` run: `groups` groups of `size` members among
/// `users` users (the layout of [`group_members`]).
pub fn join_group(r: &Report, size: u32, users: u32) -> GroupJoin {
    let key = |from: u32, counter: u32| (from as u64) << 32 | counter as u64;
    // post → (group, acknowledged)
    let mut posts: HashMap<u64, (u32, bool)> = HashMap::new();
    for [from, g, counter] in &r.unacked_ids.0 {
        posts.insert(key(*from, *counter), (*g, false));
    }
    for [from, g, counter] in &r.acked_ids.0 {
        posts.insert(key(*from, *counter), (*g, true));
    }
    let mut j = GroupJoin::default();
    for (_, acked) in posts.values() {
        if *acked {
            j.posts_acked += 1;
            j.expected += size as u64;
        } else {
            j.posts_unacked += 1;
        }
    }
    let mut received: HashSet<[u32; 3]> = HashSet::new();
    // (group, member) → the posts in the order the member accepted them.
    let mut seqs: HashMap<(u32, u32), Vec<u64>> = HashMap::new();
    let mut member_cache: HashMap<u32, HashSet<u32>> = HashMap::new();
    for id @ [from, member, counter] in &r.received_ids.0 {
        if !received.insert(*id) {
            continue;
        }
        let Some(&(g, acked)) = posts.get(&key(*from, *counter)) else {
            j.phantom += 1;
            continue;
        };
        let members = member_cache
            .entry(g)
            .or_insert_with(|| group_members(g, size, users).collect());
        if !members.contains(member) {
            j.non_member += 1;
            continue;
        }
        if from == member {
            j.own_copies += 1;
        }
        if !acked {
            j.delivered_unacked += 1;
        }
        seqs.entry((g, *member))
            .or_default()
            .push(key(*from, *counter));
    }
    j.received = received.len() as u64;
    let mut lost: Vec<[u32; 3]> = Vec::new();
    let offline: HashSet<u32> = r.not_back_ids.iter().copied().collect();
    for (k, (g, acked)) in &posts {
        if !acked {
            continue;
        }
        let (from, counter) = ((k >> 32) as u32, *k as u32);
        let mut any = false;
        for m in group_members(*g, size, users) {
            if !received.contains(&[from, m, counter]) {
                if offline.contains(&m) {
                    j.undelivered_offline += 1;
                    continue;
                }
                j.lost += 1;
                any = true;
                if lost.len() < 10 {
                    lost.push([from, m, counter]);
                }
            }
        }
        j.posts_with_loss += any as u64;
    }
    lost.sort_unstable();
    j.lost_examples = lost;
    // Order: per group, the longest member sequence is the reference; every other member's
    // sequence (restricted to the reference's posts) must follow it.
    let mut by_group: HashMap<u32, Vec<(u32, &Vec<u64>)>> = HashMap::new();
    for ((g, m), s) in &seqs {
        by_group.entry(*g).or_default().push((*m, s));
    }
    let mut examples = Vec::new();
    let (mut copies, mut refs) = (Vec::new(), Vec::new());
    for (g, mut members) in by_group {
        members.sort_by_key(|(m, s)| (std::cmp::Reverse(s.len()), *m));
        let rank: HashMap<u64, usize> = members[0]
            .1
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i))
            .collect();
        for (m, s) in &members {
            j.order_checked += 1;
            let mut high = None;
            let mut bad = 0;
            for p in s.iter() {
                let Some(&r) = rank.get(p) else { continue };
                if high.is_some_and(|h| r < h) {
                    bad += 1;
                    if copies.len() < 10 {
                        copies.push([g, *m, (p >> 32) as u32, *p as u32]);
                    }
                } else {
                    high = Some(r);
                }
            }
            if bad > 0 {
                j.order_mismatch_members += 1;
                j.order_mismatch_entries += bad;
                examples.push([g, *m]);
                if refs.len() < 10 && !refs.iter().any(|r: &[u32; 2]| r[0] == g) {
                    refs.push([g, members[0].0]);
                }
            }
        }
    }
    examples.sort_unstable();
    examples.truncate(10);
    j.order_examples = examples;
    copies.sort_unstable();
    refs.sort_unstable();
    (j.order_copies, j.order_refs) = (copies, refs);
    j
}

/// The group seqs of a `large-group` run's posts (`Report::post_seqs`: what the members and the
/// posters' acks said): every post has one place in the group's timeline, and no two posts
/// share one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SeqCheck {
    /// Distinct posts with a known seq.
    pub posts: u64,
    /// Posts seen with more than one seq (at different members, or in the ack): must be 0.
    pub posts_with_two_seqs: u64,
    /// Seqs carried by more than one post: must be 0.
    pub seqs_with_two_posts: u64,
    /// Examples `(poster, counter, seq)` of either, at most 10.
    pub examples: Vec<[u32; 3]>,
}

pub fn check_post_seqs(p: &Packed) -> SeqCheck {
    let pairs: HashSet<[u32; 3]> = p.0.iter().copied().collect();
    let mut by_post: HashMap<(u32, u32), Vec<u32>> = HashMap::new();
    let mut by_seq: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
    for [from, counter, seq] in &pairs {
        by_post.entry((*from, *counter)).or_default().push(*seq);
        by_seq.entry(*seq).or_default().push((*from, *counter));
    }
    let mut c = SeqCheck {
        posts: by_post.len() as u64,
        ..Default::default()
    };
    let mut ex = Vec::new();
    for ((from, counter), seqs) in &by_post {
        if seqs.len() > 1 {
            c.posts_with_two_seqs += 1;
            ex.extend(seqs.iter().map(|s| [*from, *counter, *s]));
        }
    }
    for (seq, posts) in &by_seq {
        if posts.len() > 1 {
            c.seqs_with_two_posts += 1;
            ex.extend(posts.iter().map(|(f, n)| [*f, *n, *seq]));
        }
    }
    ex.sort_unstable();
    ex.dedup();
    ex.truncate(10);
    c.examples = ex;
    c
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

    #[test]
    fn join_group_counts_every_member_copy_loss_and_order_disagreement() {
        // 6 users, 2 groups of 4: group 0 = {0,1,2,3}, group 1 = {4,5,0,1}.
        let (size, users) = (4, 6);
        let mut r = Report::default();
        r.acked_ids.push(0, 0, 1); // user 0 posts to group 0
        r.acked_ids.push(2, 0, 1); // user 2 posts to group 0
        r.acked_ids.push(5, 1, 1); // user 5 posts to group 1
        r.unacked_ids.push(1, 1, 7); // no ack, yet delivered to one member
                                     // Group 0: members 0, 1, 2 see (0:1, 2:1); member 3 sees them the other way round.
        for m in [0, 1, 2] {
            r.received_ids.push(0, m, 1);
            r.received_ids.push(2, m, 1);
        }
        r.received_ids.push(2, 3, 1);
        r.received_ids.push(0, 3, 1);
        // Group 1: member 1 never gets 5:1.
        for m in [4, 5, 0] {
            r.received_ids.push(5, m, 1);
        }
        r.received_ids.push(1, 4, 7);
        r.received_ids.push(5, 3, 1); // 3 is not in group 1
        r.received_ids.push(3, 3, 99); // never sent
        r.received_ids.push(0, 0, 1); // reported twice: counted once
        let j = join_group(&r, size, users);
        assert_eq!((j.posts_acked, j.posts_unacked), (3, 1));
        assert_eq!(j.expected, 12);
        assert_eq!(j.lost, 1);
        assert_eq!(j.lost_examples, vec![[5, 1, 1]]);
        assert_eq!(j.posts_with_loss, 1);
        assert_eq!(j.own_copies, 3); // 0:1 at 0, 2:1 at 2, 5:1 at 5
        assert_eq!((j.delivered_unacked, j.phantom, j.non_member), (1, 1, 1));
        assert_eq!(j.order_mismatch_members, 1);
        assert_eq!(j.order_mismatch_entries, 1);
        assert_eq!(j.order_examples, vec![[0, 3]]);
        // Member 3 got 0:1 after 2:1; the reference is member 0 (all have both; lowest id).
        assert_eq!(j.order_copies, vec![[0, 3, 0, 1]]);
        assert_eq!(j.order_refs, vec![[0, 0]]);
        // group 0: 4 members; group 1: members 4, 5, 0 (5:1) and 4 (1:7)
        assert_eq!(j.order_checked, 7);
    }

    #[test]
    fn post_seqs_catch_a_post_with_two_seqs_and_a_seq_with_two_posts() {
        let mut p = Packed::default();
        // (poster, counter, seq), reported by several executors and by the poster's ack.
        for _ in 0..3 {
            p.push(1, 1, 10);
            p.push(2, 1, 11);
        }
        assert_eq!(
            check_post_seqs(&p),
            SeqCheck {
                posts: 2,
                ..Default::default()
            }
        );
        p.push(3, 1, 12);
        p.push(3, 1, 13); // one member saw post 3:1 at another place
        p.push(4, 1, 11); // two posts at seq 11
        let c = check_post_seqs(&p);
        assert_eq!(
            (c.posts, c.posts_with_two_seqs, c.seqs_with_two_posts),
            (4, 1, 1)
        );
        assert_eq!(
            c.examples,
            vec![[2, 1, 11], [3, 1, 12], [3, 1, 13], [4, 1, 11]]
        );
    }

    #[test]
    fn join_group_is_clean_when_every_member_sees_every_post_in_one_order() {
        let (size, users, groups) = (10, 25, 7);
        let mut r = Report::default();
        let mut counter = 0;
        let mut posts = Vec::new();
        for round in 0..20u32 {
            for g in 0..groups {
                let from = crate::msg::group_member(g, (round * 3 + g) % size, size, users);
                counter += 1;
                r.acked_ids.push(from, g, counter);
                posts.push((g, from, counter));
            }
        }
        // Members are reported member by member (as workers merge), each in the group order.
        for u in 0..users {
            for (g, from, c) in &posts {
                if group_members(*g, size, users).any(|m| m == u) {
                    r.received_ids.push(*from, u, *c);
                }
            }
        }
        let j = join_group(&r, size, users);
        assert_eq!(j.expected, 140 * 10);
        assert_eq!(j.received, j.expected);
        assert_eq!((j.lost, j.phantom, j.non_member), (0, 0, 0));
        assert_eq!((j.order_mismatch_members, j.order_checked), (0, 70));
        assert_eq!(j.own_copies, 140);
    }
}
