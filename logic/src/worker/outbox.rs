//! The sender side of a fan-out: the outbox record written with the message, the live appends
//! sent after the commit, the recipients' confirmations, replays and retries.
//!
//! One outbox entry `(shard, msg_id)` lists every recipient of one message (one for c2c, every
//! member for a group post, every user of an s2c), except for an `@all` in a large group: there
//! it lists one chunk of the members at a time, behind the mark [`ALL_MARK`] (`worker/large.rs`). It stays in the store until **every**
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

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use crate::peer::PartSent;

use im_shared::proto::Message;
use im_shared::shard::VSHARDS;
use im_shared::{MsgId, ShardId, UserId};

use super::{AppendReq, Round, Worker, WorkerMsg};
use crate::store::{Op, OutboxEntry, Store};

/// The mark in front of a stored outbox entry's recipients (uid 0, never a user) that makes it
/// one chunk of an `@all` fan-out (`worker/large.rs`).
pub(super) const ALL_MARK: UserId = UserId(0);

/// How long a replay at start waits for room on a link before it resets the link as one whose
/// peer does not read (the worker serves nothing else meanwhile; the next epoch's resync replays
/// again).
const REPLAY_WAIT: Duration = Duration::from_secs(10);
/// How long a resync's parts may find no room on their link before it is reset as one whose
/// peer does not read ([`Worker::pump_resyncs`]; rounds go on meanwhile).
const REPLAY_WAIT_MS: u64 = 10_000;

/// A resync of the link to another node in progress ([`Worker::pump_resyncs`]).
pub(super) struct Resync {
    /// The link's epoch it is for.
    epoch: u64,
    /// Parts not written yet: (the node's local worker, its appends).
    parts: VecDeque<(usize, Vec<AppendReq>)>,
    /// The fan-outs tracked from this generation on are not in `parts` yet.
    since: u64,
    /// When a part was last written, or the resync started (ms).
    progress_ms: u64,
}

/// First re-send of appends that a worker of another node has not confirmed ...
pub(super) const RETRY_FIRST_MS: u64 = 5_000;
/// ... doubling up to this.
pub(super) const RETRY_MAX_MS: u64 = 60_000;

/// A fan-out not yet confirmed by every recipient.
struct Fanout {
    msg: Message,
    left: Left,
    /// When it was first tracked, in [`Outbox::gen`] order.
    gen: u64,
    /// When the recipients on other nodes that are still in `left` get the next re-send.
    due_ms: u64,
    backoff_ms: u64,
}

/// The recipients of a fan-out that have not confirmed yet; one (c2c) without an allocation.
enum Left {
    One(Option<UserId>),
    Many(HashSet<UserId>),
}

impl Left {
    fn new(recipients: &[UserId]) -> Left {
        match recipients {
            [r] => Left::One(Some(*r)),
            rs => Left::Many(rs.iter().copied().collect()),
        }
    }

    fn contains(&self, r: UserId) -> bool {
        match self {
            Left::One(o) => *o == Some(r),
            Left::Many(m) => m.contains(&r),
        }
    }

    /// Strikes `r`; true if it was there.
    fn remove(&mut self, r: UserId) -> bool {
        match self {
            Left::One(o) if *o == Some(r) => o.take().is_some(),
            Left::One(_) => false,
            Left::Many(m) => m.remove(&r),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Left::One(o) => o.is_none(),
            Left::Many(m) => m.is_empty(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = UserId> + '_ {
        let (one, many) = match self {
            Left::One(o) => (*o, None),
            Left::Many(m) => (None, Some(m.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Appends to re-send: `(outbox shard, message, recipients)`.
pub(super) type Resend = Vec<(ShardId, Message, Vec<UserId>)>;

/// The unconfirmed fan-outs of one worker, by outbox key.
#[derive(Default)]
pub(super) struct Outbox {
    pending: im_shared::fast::FastMap<(ShardId, MsgId), Fanout>,
    /// The generation the next fan-out tracked gets.
    next_gen: u64,
}

impl Outbox {
    /// Fan-outs with at least one unconfirmed recipient.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Starts tracking a fan-out (at `now`); one already tracked keeps its confirmations.
    fn track(&mut self, shard: ShardId, msg: &Message, recipients: &[UserId], now: u64) {
        let gen = self.next_gen;
        self.next_gen += 1;
        self.pending
            .entry((shard, msg.msg_id))
            .or_insert_with(|| Fanout {
                msg: msg.clone(),
                left: Left::new(recipients),
                gen,
                due_ms: now + RETRY_FIRST_MS,
                backoff_ms: RETRY_FIRST_MS,
            });
    }

    /// Whether `recipient` has yet to confirm the entry `(shard, msg_id)`.
    pub(super) fn is_unconfirmed(&self, shard: ShardId, msg_id: MsgId, recipient: UserId) -> bool {
        self.pending
            .get(&(shard, msg_id))
            .is_some_and(|f| f.left.contains(recipient))
    }

    /// Records that `recipient` appended `msg_id`; true when that was the last one (the entry
    /// can go).
    fn confirm(&mut self, shard: ShardId, msg_id: MsgId, recipient: UserId) -> bool {
        let key = (shard, msg_id);
        let Some(f) = self.pending.get_mut(&key) else {
            // Already complete (a replay's second confirmation), or not ours: nothing to do.
            return false;
        };
        if !f.left.remove(recipient) || !f.left.is_empty() {
            return false;
        }
        self.pending.remove(&key);
        true
    }

    /// The generation of the next fan-out to be tracked: those tracked from now on have it or a
    /// later one.
    pub(super) fn gen(&self) -> u64 {
        self.next_gen
    }

    /// The unconfirmed recipients for which `pick` holds, of every fan-out tracked since
    /// generation `since`, in each shard's order (as [`Outbox::take_overdue`]); no fan-out's
    /// re-send time moves.
    fn unconfirmed(&self, since: u64, pick: impl Fn(UserId) -> bool) -> Resend {
        let mut out: Resend = self
            .pending
            .iter()
            .filter(|(_, f)| f.gen >= since)
            .filter_map(|(&(shard, _), f)| {
                let to: Vec<UserId> = f.left.iter().filter(|r| pick(*r)).collect();
                (!to.is_empty()).then(|| (shard, f.msg.clone(), to))
            })
            .collect();
        out.sort_unstable_by_key(|(shard, m, _)| (shard.0, m.msg_id.0));
        out
    }

    /// The unconfirmed recipients for which `remote` holds, of every fan-out due at `now`; each
    /// such fan-out's next re-send moves out by its doubled backoff.
    fn take_overdue(&mut self, now: u64, remote: impl Fn(UserId) -> bool) -> Resend {
        let mut out = Vec::new();
        for (&(shard, _), f) in self.pending.iter_mut() {
            if f.due_ms > now {
                continue;
            }
            f.backoff_ms = (f.backoff_ms * 2).min(RETRY_MAX_MS);
            f.due_ms = now + f.backoff_ms;
            let to: Vec<UserId> = f.left.iter().filter(|r| remote(*r)).collect();
            if !to.is_empty() {
                out.push((shard, f.msg.clone(), to));
            }
        }
        // In each shard's order (a group's posts, a sender's messages): a recipient stores them
        // in the order they arrive.
        out.sort_unstable_by_key(|(shard, m, _)| (shard.0, m.msg_id.0));
        out
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
        self.fan_out_marked(shard, msg, recipients, false, round);
    }

    /// [`Worker::fan_out`]; with `all_mark`, the stored entry's recipient list starts with
    /// [`ALL_MARK`]: one chunk of an `@all` fan-out, continued after its last recipient once
    /// every one of them confirmed (`worker/large.rs`), also after a restart.
    pub(super) fn fan_out_marked(
        &mut self,
        shard: ShardId,
        msg: &Message,
        recipients: Vec<UserId>,
        all_mark: bool,
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
        self.outbox.track(shard, msg, &recipients, self.now);
        let recipients = if all_mark {
            std::iter::once(ALL_MARK).chain(recipients).collect()
        } else {
            recipients
        };
        round.batch.push(Op::OutboxPut(OutboxEntry {
            shard,
            msg_id: msg.msg_id,
            recipients,
            msg: msg.clone(),
        }));
    }

    /// Recipients' workers confirmed these appends: an entry is deleted once all did (a lazy
    /// write: see `Lazy`), unless it is a chunk of an `@all` with members left: then the next
    /// chunk replaces it, in this round's batch.
    pub(super) fn on_append_done(
        &mut self,
        done: Vec<(ShardId, MsgId, UserId)>,
        round: &mut Round,
    ) {
        for (shard, msg_id, recipient) in done {
            if self.outbox.confirm(shard, msg_id, recipient) {
                if let Some(job) = self.mention_all.remove(&(shard, msg_id)) {
                    if self.mention_all_chunk(job, round) {
                        continue;
                    }
                }
                self.lazy.outbox_delete(shard, msg_id, self.now);
            }
        }
    }

    /// Re-sends the fan-out of every outbox entry of this worker's shards (at start: everything
    /// a crash interrupted), read from the store, to the recipients that have not confirmed; the
    /// entries are tracked in memory from then on.
    pub(super) async fn replay_outbox(&mut self) {
        let me = self.router.global(self.idx);
        let now = self.now;
        let mut resend: Resend = Vec::new();
        // Confirmed entries whose deletion waits (a lazy write, fresh or draining) are still in
        // the store: skip them instead of fanning them out again (harmless, a replayed append is
        // idempotent, but a second's worth of entries or more for nothing).
        let deleting: HashSet<(ShardId, MsgId)> = self.lazy.outbox_deleting().collect();
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
                mut recipients,
                msg,
                ..
            } in entries
            {
                if deleting.contains(&(shard, msg.msg_id)) {
                    continue;
                }
                if recipients.contains(&ALL_MARK) {
                    recipients.retain(|r| *r != ALL_MARK);
                    self.resume_mention_all(shard, &msg, &recipients).await;
                }
                self.outbox.track(shard, &msg, &recipients, now);
                let to: Vec<UserId> = recipients
                    .into_iter()
                    .filter(|&r| self.outbox.is_unconfirmed(shard, msg.msg_id, r))
                    .collect();
                if !to.is_empty() {
                    resend.push((shard, msg, to));
                }
            }
        }
        let (out, n) = self.appends_of(resend);
        if n > 0 {
            tracing::info!(worker = self.idx, appends = n, "replaying outbox");
        }
        self.send_replay(out).await;
    }

    /// Starts the resync of the link to `node` in `epoch` (one of an older epoch is dropped):
    /// [`Worker::pump_resyncs`] re-sends the appends that node's users have not confirmed.
    pub(super) fn start_resync(&mut self, node: usize, epoch: u64) {
        if self.resyncs.get(&node).is_some_and(|r| r.epoch == epoch) {
            return;
        }
        self.resyncs.insert(
            node,
            Resync {
                epoch,
                parts: VecDeque::new(),
                since: 0,
                progress_ms: self.now,
            },
        );
    }

    /// Moves every resync in progress on as far as its link has room, without waiting. A
    /// resync re-sends, from memory, the appends to its node's users that are not confirmed:
    /// every fan-out's at first (the worker's shards do not change while it runs, so every
    /// unconfirmed recipient of their entries is tracked there since [`Worker::replay_outbox`],
    /// and an entry whose last confirmation came is not), in parts of at most
    /// [`crate::peer::PeerLinks::replay_part_bytes`], each written once the link holds at most
    /// half its queue bound. Rounds go on meanwhile; their live appends to that node are
    /// dropped (the link is not resynced), so once the parts are out, those of the fan-outs
    /// tracked since are sent the same way, until there are none: then the link is marked
    /// resynced for this worker, and live appends go out again after everything it replayed.
    /// A link that takes no part for [`REPLAY_WAIT_MS`] is reset as one whose peer does not
    /// read (its next epoch's resync starts over); one that changed epoch meanwhile gets no more
    /// of this resync, whose parts are dropped.
    pub(super) fn pump_resyncs(&mut self) {
        if self.resyncs.is_empty() {
            return;
        }
        let router = self.router.clone();
        let Some(peers) = router.peers() else {
            self.resyncs.clear();
            return;
        };
        let nodes: Vec<usize> = self.resyncs.keys().copied().collect();
        for node in nodes {
            loop {
                let now = self.now;
                let Some(r) = self.resyncs.get_mut(&node) else {
                    break;
                };
                let Some((local, part)) = r.parts.front() else {
                    let since = std::mem::replace(&mut r.since, self.outbox.gen());
                    let resend = self
                        .outbox
                        .unconfirmed(since, |u| router.node_of(router.owner(u)) == node);
                    if resend.is_empty() {
                        let epoch = r.epoch;
                        self.resyncs.remove(&node);
                        // The node may have restarted and forgotten who follows its users.
                        self.rewatch(node);
                        peers.resynced(node, self.idx, epoch);
                        break;
                    }
                    let (out, n) = self.appends_of(resend);
                    tracing::info!(worker = self.idx, node, appends = n, "replaying outbox");
                    let budget = peers.replay_part_bytes();
                    let r = self.resyncs.get_mut(&node).expect("just seen");
                    for (w, reqs) in out.iter().enumerate() {
                        for part in crate::peer::append_parts(reqs, budget) {
                            r.parts.push_back((w % router.workers, part.to_vec()));
                        }
                    }
                    continue;
                };
                match peers.send_replay_part(node, *local, part, r.epoch) {
                    PartSent::Written => {
                        r.parts.pop_front();
                        r.progress_ms = now;
                    }
                    PartSent::Gone => {
                        tracing::warn!(
                            worker = self.idx,
                            node,
                            "replay to node stopped: its link went down"
                        );
                        self.resyncs.remove(&node);
                        break;
                    }
                    // (A wall clock that stepped back restarts the wait from the step.)
                    PartSent::Full
                        if now >= r.progress_ms.min(now).saturating_add(REPLAY_WAIT_MS) =>
                    {
                        tracing::warn!(
                            worker = self.idx,
                            node,
                            "replay to node stopped: its link did not drain and was reset"
                        );
                        peers.reset_link(node);
                        self.resyncs.remove(&node);
                        break;
                    }
                    PartSent::Full => {
                        r.progress_ms = r.progress_ms.min(now);
                        break;
                    }
                }
            }
        }
    }

    /// Re-sends as appends by recipient worker, and how many.
    fn appends_of(&self, resend: Resend) -> (Vec<Vec<AppendReq>>, usize) {
        let mut out: Vec<Vec<AppendReq>> = (0..self.router.total()).map(|_| Vec::new()).collect();
        let mut n = 0usize;
        for (shard, msg, to) in resend {
            for r in to {
                n += 1;
                out[self.owner(r)].push(AppendReq {
                    recipient: r,
                    shard,
                    msg: msg.clone(),
                    replay: true,
                });
            }
        }
        (out, n)
    }

    /// A replay's appends: to this node's workers at once; to another node's in parts, each
    /// written once that link has room for it ([`crate::peer::PeerLinks::send_replay`]). Sent at once,
    /// a replay larger than the link's queue bound (a node away for long under heavy traffic, or
    /// large messages) overflowed it, reset the link, and the new link's resync replayed it
    /// again: a loop. A link that changed epoch meanwhile gets no more of this one (its own
    /// resync replays everything), and nothing of it can reach the new connection first.
    async fn send_replay(&self, out: Vec<Vec<AppendReq>>) {
        for (w, reqs) in out.into_iter().enumerate() {
            if reqs.is_empty() {
                continue;
            }
            let node = self.router.node_of(w);
            let peers = match self.router.peers() {
                Some(p) if node != self.router.node => p,
                _ => {
                    self.router.send(self.idx, w, WorkerMsg::Append(reqs));
                    continue;
                }
            };
            let (epoch, local) = (peers.epoch(node), w % self.router.workers);
            let (mut sent, total) = (0, reqs.len());
            for part in crate::peer::append_parts(&reqs, peers.replay_part_bytes()) {
                if !peers
                    .send_replay(node, local, part, epoch, REPLAY_WAIT)
                    .await
                {
                    tracing::warn!(
                        worker = self.idx,
                        node,
                        left = total - sent,
                        "replay to node stopped: its link went down, or did not drain and was reset"
                    );
                    break;
                }
                sent += part.len();
            }
        }
    }

    /// Re-sends the appends that recipients on other nodes have not confirmed in time.
    pub(super) fn retry_overdue(&mut self, now: u64) {
        let router = &self.router;
        let resend = self
            .outbox
            .take_overdue(now, |r| router.node_of(router.owner(r)) != router.node);
        let (out, n) = self.appends_of(resend);
        if n > 0 {
            tracing::info!(
                worker = self.idx,
                appends = n,
                "re-sending unconfirmed appends"
            );
            self.metrics.add_retried_appends(n as u64);
        }
        // Only over links this worker has resynced: a re-send written before the resync of a new
        // link would overtake the older appends the resync brings (seen as a group's posts out
        // of order in one member's timeline in a chaos run with partitions and restarts).
        for (w, reqs) in out.into_iter().enumerate() {
            if !reqs.is_empty() {
                self.router
                    .send_if_resynced(self.idx, w, WorkerMsg::Append(reqs));
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
    fn a_single_recipient_completes_on_its_own_confirmation_only() {
        let mut o = Outbox::default();
        let (s, m) = (ShardId(2), msg(5));
        o.track(s, &m, &[UserId(8)], 0);
        assert!(o.is_unconfirmed(s, m.msg_id, UserId(8)));
        assert!(!o.confirm(s, m.msg_id, UserId(9)));
        assert!(o.confirm(s, m.msg_id, UserId(8)));
        assert!(!o.is_unconfirmed(s, m.msg_id, UserId(8)));
        assert_eq!(o.len(), 0);
    }

    /// Re-sends come in each shard's msg_id order (a group's posts, a sender's messages), not in
    /// the map's order: a recipient stores appends in the order they arrive.
    #[test]
    fn overdue_fan_outs_come_in_shard_and_msg_id_order() {
        let mut o = Outbox::default();
        let remote = |_: UserId| true;
        let ids: Vec<u64> = (0..200).map(|i| 1_000 + (i * 7919) % 200).collect();
        for &id in &ids {
            o.track(ShardId((id % 3) as u16), &msg(id), &[UserId(100)], 0);
        }
        let due: Vec<(u16, u64)> = o
            .take_overdue(RETRY_FIRST_MS, remote)
            .iter()
            .map(|(s, m, _)| (s.0, m.msg_id.0))
            .collect();
        let mut want = due.clone();
        want.sort_unstable();
        assert_eq!(due.len(), 200);
        assert_eq!(due, want);
    }

    #[test]
    fn overdue_fan_outs_resend_to_unconfirmed_remote_recipients_with_backoff() {
        let mut o = Outbox::default();
        let (s, a, b) = (ShardId(1), msg(10), msg(11));
        // Users >= 100 live on another node.
        let remote = |u: UserId| u.0 >= 100;
        o.track(s, &a, &[UserId(1), UserId(100), UserId(101)], 0);
        o.track(s, &b, &[UserId(102)], 3_000);
        assert!(
            o.take_overdue(RETRY_FIRST_MS - 1, remote).is_empty(),
            "not due yet"
        );
        assert!(!o.confirm(s, a.msg_id, UserId(101)));
        let mut due = o.take_overdue(RETRY_FIRST_MS, remote);
        assert_eq!(due.len(), 1, "only `a` is due");
        let (shard, m, mut to) = due.remove(0);
        to.sort();
        assert_eq!((shard, m.msg_id, to), (s, a.msg_id, vec![UserId(100)]));
        // Next re-send of `a` after twice the first delay; `b` is due at 3 s + the first.
        let t = RETRY_FIRST_MS + 2 * RETRY_FIRST_MS;
        let due: Vec<MsgId> = o
            .take_overdue(t - 1, remote)
            .iter()
            .map(|d| d.1.msg_id)
            .collect();
        assert_eq!(due, vec![b.msg_id]);
        let due: Vec<MsgId> = o
            .take_overdue(t, remote)
            .iter()
            .map(|d| d.1.msg_id)
            .collect();
        assert_eq!(due, vec![a.msg_id]);
        // The backoff stops doubling at the cap.
        let mut now = t;
        for _ in 0..10 {
            now += RETRY_MAX_MS;
            o.take_overdue(now, remote);
        }
        assert!(o.take_overdue(now + RETRY_MAX_MS - 1, remote).is_empty());
        assert_eq!(o.take_overdue(now + RETRY_MAX_MS, remote).len(), 2);
        // A confirmed fan-out is never re-sent again.
        assert!(o.confirm(s, b.msg_id, UserId(102)));
        assert!(!o.confirm(s, a.msg_id, UserId(1)));
        assert!(o.confirm(s, a.msg_id, UserId(100)));
        assert!(o.take_overdue(u64::MAX / 2, remote).is_empty());
    }

    /// A resync's replay (`Worker::pump_resyncs`) comes from memory: the unconfirmed
    /// recipients on that node of every fan-out, in each shard's msg_id order; confirmed ones
    /// and completed fan-outs are not in it, and it moves no re-send time.
    #[test]
    fn a_resync_replays_the_unconfirmed_recipients_on_its_node_in_shard_order() {
        let mut o = Outbox::default();
        // Users 100..200 live on the node that resyncs; 1..100 elsewhere.
        let on_node = |u: UserId| (100..200).contains(&u.0);
        o.track(ShardId(2), &msg(5), &[UserId(100), UserId(1)], 0);
        o.track(
            ShardId(1),
            &msg(9),
            &[UserId(101), UserId(102), UserId(2)],
            0,
        );
        o.track(ShardId(1), &msg(7), &[UserId(103)], 0);
        o.track(ShardId(1), &msg(8), &[UserId(3)], 0);
        o.track(ShardId(0), &msg(6), &[UserId(104)], 0);
        assert!(!o.confirm(ShardId(1), MsgId(9), UserId(102)));
        assert!(o.confirm(ShardId(0), MsgId(6), UserId(104)));
        let list = |o: &Outbox, since: u64| -> Vec<(u16, u64, Vec<u64>)> {
            o.unconfirmed(since, on_node)
                .into_iter()
                .map(|(s, m, mut to)| {
                    to.sort();
                    (s.0, m.msg_id.0, to.iter().map(|u| u.0).collect())
                })
                .collect()
        };
        assert_eq!(
            list(&o, 0),
            vec![(1, 7, vec![103]), (1, 9, vec![101]), (2, 5, vec![100])]
        );
        // What a resync sends once its first parts are out: the fan-outs tracked since.
        let since = o.gen();
        assert!(list(&o, since).is_empty());
        o.track(ShardId(0), &msg(12), &[UserId(105)], 0);
        o.track(ShardId(1), &msg(10), &[UserId(106), UserId(4)], 0);
        o.track(ShardId(1), &msg(7), &[UserId(103)], 0); // tracked again: not new
        assert_eq!(
            list(&o, since),
            vec![(0, 12, vec![105]), (1, 10, vec![106])]
        );
        // The retries are still due when they were.
        assert!(o.take_overdue(RETRY_FIRST_MS - 1, on_node).is_empty());
        assert_eq!(o.take_overdue(RETRY_FIRST_MS, on_node).len(), 5);
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
