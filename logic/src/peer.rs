//! Logic ↔ logic links: worker messages for workers on another node (appends of a fan-out, their
//! confirmations, delivered notices), carried as `LinkMsg::Peer` payloads.
//!
//! The payload's layout is `im_shared::peer`; this module maps it to and from worker messages.
//! A group request is not in any outbox: if the link drops it, the client gets no answer and
//! retries (posts are deduplicated on `(sender, client_msg_id)` by the group's owner).
//! Each node opens one outbound link to every other node (reconnecting with backoff) and accepts
//! the others' on its link listener. Nothing here is acknowledged; order and completeness come
//! from the sender's outbox:
//! - every change of a link (down, then up again) bumps its *epoch*;
//! - a worker sends live appends to a node only while the link is up and the worker has
//!   *resynced* the current epoch: re-sent, in msg_id order, every outbox entry bound for that
//!   node (whatever the dead connection may have swallowed);
//! - every payload is sent with the epoch it was meant for (a live append: the epoch its worker
//!   found ready), and the link's writer (write-through, `im_shared::link_writer`) takes only
//!   payloads of its current connection's epoch: one meant for a connection that has since been
//!   replaced is dropped, never written to the new one ahead of that epoch's resync.
//!
//! So on every connection an append never overtakes an older unconfirmed one of the same sender
//! worker, and recipients drop duplicates by their `(uid, msg_id)` index. An outbox entry lives
//! until every recipient confirmed it (`worker::outbox`), which also re-sends appends that stay
//! unconfirmed for seconds: a safety net for a loss that no link change reveals.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use im_shared::link::{self, LinkMsg, Role};
use im_shared::peer::{self, AppendReq, PeerError, PeerMsg, PeerMsgRef};

use crate::worker::{GroupReq, WorkerMsg};
use im_shared::link_writer::{LinkWriter, Sent};

/// Outbound links to the other logic nodes.
pub struct PeerLinks {
    /// Per node (`None`: this one): the link's writer (write-through, `im_shared::link_writer`): a worker
    /// writes its payloads itself when nothing waits, and the link's thread writes the rest.
    writers: Vec<Option<Arc<LinkWriter>>>,
    state: Vec<Arc<LinkState>>,
    /// The queue bound of every link (`peer_queue_bytes`).
    bound: usize,
}

/// What became of one part of a replay ([`PeerLinks::send_replay_part`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartSent {
    /// Written to the connection of its epoch, or queued for the link's thread.
    Written,
    /// More than half the link's queue bound waits: try again later.
    Full,
    /// The link is down or in another epoch: that epoch's resync replays everything.
    Gone,
}

impl Drop for PeerLinks {
    fn drop(&mut self) {
        for (st, w) in self.state.iter().zip(&self.writers) {
            st.stop.store(true, Ordering::Release);
            if let Some(w) = w {
                w.detach();
            }
        }
    }
}

/// Default bytes of payloads one outbound link may hold waiting for its thread (those the socket
/// did not take at once; `peer_queue_bytes`). Past it the link is reset: the queue
/// is dropped, the connection closed and reopened in a new epoch, and every worker re-sends its
/// outbox for that node before any new append (what a link failure does). Appends are never
/// lost by it (they are in the outbox); confirmations are re-earned by the replay; `Delivered`
/// notices in the queue are lost (informational); group requests in it get no answer and the
/// client retries.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;

/// The longest wait between two connection attempts of a peer link: after a partition heals or a
/// node restarts, the outboxes replay at most this long (plus a connect) later. A node has a link
/// to each other node only, so the attempts cost nothing that matters.
const RECONNECT_MAX: Duration = Duration::from_millis(500);

/// Up/down state of one outbound link, shared with the workers.
#[derive(Default)]
pub struct LinkState {
    up: AtomicBool,
    epoch: AtomicU64,
    /// Per local worker: the epoch it has resynced.
    resynced: Mutex<HashMap<usize, u64>>,
    /// Resets because the queue passed [`MAX_QUEUE_BYTES`].
    resets: AtomicU64,
    /// The links are dropped: the link's thread ends.
    stop: AtomicBool,
}

impl PeerLinks {
    /// Starts a link thread to every node but `me`.
    pub fn start(me: usize, nodes: Vec<SocketAddr>) -> PeerLinks {
        Self::start_with(me, nodes, MAX_QUEUE_BYTES)
    }

    /// [`PeerLinks::start`] with another queue bound (`peer_queue_bytes`).
    pub fn start_with(me: usize, nodes: Vec<SocketAddr>, max_queue_bytes: usize) -> PeerLinks {
        let mut writers = Vec::new();
        let mut state = Vec::new();
        for (i, addr) in nodes.into_iter().enumerate() {
            let st = Arc::new(LinkState::default());
            state.push(st.clone());
            if i == me {
                writers.push(None);
                continue;
            }
            let w = LinkWriter::new(max_queue_bytes);
            writers.push(Some(w.clone()));
            let _ = std::thread::Builder::new()
                .name(format!("peer-{i}"))
                .spawn(move || run(me as u16, addr, &w, &st));
        }
        PeerLinks {
            writers,
            state,
            bound: max_queue_bytes,
        }
    }

    /// Writes one part of a replay (appends for worker `worker` of `node`) on the link's
    /// connection of `epoch` if the link holds at most half its queue bound for its thread now:
    /// paced, a replay never passes the bound, which would reset the link. Never waits.
    pub fn send_replay_part(
        &self,
        node: usize,
        worker: usize,
        part: &[AppendReq],
        epoch: u64,
    ) -> PartSent {
        let p = peer::encode(worker as u16, PeerMsgRef::Append(part));
        self.send_paced(node, &p, epoch)
    }

    /// [`PeerLinks::send_replay_part`] of an encoded part.
    fn send_paced(&self, node: usize, p: &Bytes, epoch: u64) -> PartSent {
        let Some(Some(w)) = self.writers.get(node) else {
            return PartSent::Gone;
        };
        match w.send_within(Some(epoch), self.bound / 2, |out| {
            link::encode_msg(&LinkMsg::Peer(p.clone()), out);
        }) {
            Sent::Written | Sent::Queued => PartSent::Written,
            Sent::Dropped => PartSent::Gone,
            Sent::Overflow => PartSent::Full,
        }
    }

    /// [`PeerLinks::send_replay_part`], waiting (polling) at most `max` for room. False if the
    /// link is down or in another epoch (that epoch's own resync replays everything), or if the
    /// wait ran out: then the peer does not read, and the link is reset as at the bound (its
    /// next epoch's resync replays again).
    pub async fn send_replay(
        &self,
        node: usize,
        worker: usize,
        part: &[AppendReq],
        epoch: u64,
        max: Duration,
    ) -> bool {
        let p = peer::encode(worker as u16, PeerMsgRef::Append(part));
        let deadline = std::time::Instant::now() + max;
        loop {
            match self.send_paced(node, &p, epoch) {
                PartSent::Written => return true,
                PartSent::Gone => return false,
                PartSent::Full if std::time::Instant::now() >= deadline => {
                    self.reset_link(node);
                    return false;
                }
                PartSent::Full => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// Resets the link to `node` as one whose peer does not read (see [`PeerLinks::send_replay`]).
    pub fn reset_link(&self, node: usize) {
        if let Some(Some(w)) = self.writers.get(node) {
            reset(&self.state[node], w);
        }
    }

    /// Most bytes of messages one part of a replay carries: an eighth of the queue bound, at
    /// most [`APPEND_MSG_BUDGET`].
    pub fn replay_part_bytes(&self) -> usize {
        (self.bound / 8).clamp(1, APPEND_MSG_BUDGET)
    }

    /// Payloads waiting for each other node's link thread (those the socket did not take at
    /// once): `(node, payloads, bytes)`.
    pub fn queue_depths(&self) -> Vec<(usize, usize, usize)> {
        self.writers
            .iter()
            .enumerate()
            .filter_map(|(n, w)| {
                let (sends, bytes) = w.as_ref()?.pending();
                Some((n, sends, bytes))
            })
            .collect()
    }

    /// Resets of all links because a queue passed its bound.
    pub fn resets(&self) -> u64 {
        self.state
            .iter()
            .map(|s| s.resets.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether the link to `node` is connected now (a request sent while it is not would be
    /// dropped with the queue when the link comes back in a new epoch).
    pub fn is_up(&self, node: usize) -> bool {
        self.state[node].up.load(Ordering::Acquire)
    }

    /// The epoch in which local worker `worker` may send live appends to `node` now: the link
    /// is up and the worker has resynced it. `None`: hold them back (they stay in the outbox).
    pub fn ready(&self, node: usize, worker: usize) -> Option<u64> {
        let st = &self.state[node];
        let epoch = st.epoch.load(Ordering::Acquire);
        let resynced = st
            .resynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&worker)
            == Some(&epoch);
        (st.up.load(Ordering::Acquire) && resynced).then_some(epoch)
    }

    /// The link's current epoch (a new one with every connection).
    pub fn epoch(&self, node: usize) -> u64 {
        self.state[node].epoch.load(Ordering::Acquire)
    }

    /// Nodes (other than this one) that `worker` has to resync: `(node, epoch)` of links that are
    /// up in an epoch the worker has not resynced yet.
    pub fn needs_resync(&self, worker: usize) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        for (node, st) in self.state.iter().enumerate() {
            if self.writers[node].is_none() || !st.up.load(Ordering::Acquire) {
                continue;
            }
            let epoch = st.epoch.load(Ordering::Acquire);
            let done = st
                .resynced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&worker)
                == Some(&epoch);
            if !done {
                v.push((node, epoch));
            }
        }
        v
    }

    /// Records that `worker` re-sent its outbox for `node` in `epoch` (queued before any live
    /// append it sends afterwards).
    pub fn resynced(&self, node: usize, worker: usize, epoch: u64) {
        self.state[node]
            .resynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(worker, epoch);
    }

    /// Queues `msg` for worker `worker` of `node` on the link's current connection.
    pub fn send(&self, node: usize, worker: usize, msg: &WorkerMsg) {
        let epoch = self.state[node].epoch.load(Ordering::Acquire);
        self.send_in(node, worker, msg, epoch);
    }

    /// Writes `msg` on the connection of `epoch` only (now, or behind what waits): dropped if
    /// the link has moved on.
    pub fn send_in(&self, node: usize, worker: usize, msg: &WorkerMsg, epoch: u64) {
        let Some(Some(w)) = self.writers.get(node) else {
            return;
        };
        // False once the link took no more (reset, or moved to another epoch).
        let write = |p: Bytes| match w.send(Some(epoch), |out| {
            link::encode_msg(&LinkMsg::Peer(p), out);
        }) {
            Sent::Overflow => {
                reset(&self.state[node], w);
                false
            }
            Sent::Dropped => false,
            Sent::Written | Sent::Queued => true,
        };
        match msg {
            // A batch of appends can be large (a replay of an outbox, a round's fan-out of many
            // large messages): it goes as several link messages, in order.
            WorkerMsg::Append(v) => {
                for part in append_parts(v, APPEND_MSG_BUDGET) {
                    if !write(peer::encode(worker as u16, PeerMsgRef::Append(part))) {
                        return;
                    }
                }
            }
            m => {
                if let Some(p) = encode(worker, m) {
                    write(p);
                }
            }
        }
    }
}

/// Most bytes of messages one link message of appends carries (a single larger one goes alone):
/// far below the receiver's [`link::MAX_LINK_MSG`], which ends the link (seen with a replay of a
/// large group's member events: 16.8 MB in one message, refused, replayed again after the
/// reconnect, refused again).
pub const APPEND_MSG_BUDGET: usize = 1 << 20;

/// `reqs` in consecutive runs whose messages add up to at most `budget` bytes each (a run holds
/// at least one request).
pub(crate) fn append_parts(
    reqs: &[AppendReq],
    budget: usize,
) -> impl Iterator<Item = &[AppendReq]> {
    let mut rest = reqs;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .position(|a| {
                bytes += a.msg.encoded_len() + 32;
                bytes > budget
            })
            .map_or(rest.len(), |i| i.max(1));
        let (part, tail) = rest.split_at(n);
        rest = tail;
        Some(part)
    })
}

/// Resets a link whose queue is full (see [`MAX_QUEUE_BYTES`]): marks it down, so that no worker
/// sends in the current epoch any more, and shuts its connection down under the writer, which
/// then drops the queue and reconnects in a new epoch.
fn reset(st: &LinkState, w: &LinkWriter) {
    if st.up.load(Ordering::Acquire) {
        st.resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("peer link queue full: resetting the link (outboxes replay)");
    }
    // Whoever sends next finds the link down (`ready` is None) until the new epoch's resync.
    st.up.store(false, Ordering::Release);
    w.shut_down();
}

fn run(me: u16, addr: SocketAddr, w: &LinkWriter, st: &LinkState) {
    let mut backoff = Duration::from_millis(50);
    let ping = |out: &mut BytesMut| link::encode_msg(&LinkMsg::Ping, out);
    while !st.stop.load(Ordering::Acquire) {
        if st.up.swap(false, Ordering::AcqRel) {
            st.epoch.fetch_add(1, Ordering::AcqRel);
        }
        // No connection: what workers send meanwhile is dropped (outboxes re-send appends).
        w.detach();
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let _ = s.set_nodelay(true);
        let mut out = BytesMut::new();
        link::encode_msg(
            &LinkMsg::Hello {
                role: Role::Logic,
                id: me,
                map_epoch: 0,
                addr: String::new(),
                ws: String::new(),
                caps: 0,
            },
            &mut out,
        );
        if s.write_all(&out).is_err() {
            continue;
        }
        // Nothing sent for an earlier connection goes on this one (the workers resync first):
        // the writer takes only sends of this epoch.
        let epoch = st.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        w.attach(s, epoch);
        if st.stop.load(Ordering::Acquire) {
            break;
        }
        st.up.store(true, Ordering::Release);
        tracing::info!(%addr, "peer link up");
        // Writes what the workers could not write at once, and pings a quiet link, until the
        // connection fails or is reset.
        if w.flush(epoch, Some((Duration::from_secs(5), &ping)))
            .is_err()
        {
            tracing::warn!(%addr, "peer link down");
        }
    }
    w.detach();
}

/// Encodes a worker message for worker `worker` of another node (`None` for local-only kinds and
/// for API group requests, whose reply cannot cross nodes).
pub fn encode(worker: usize, msg: &WorkerMsg) -> Option<Bytes> {
    let w = worker as u16;
    Some(match msg {
        WorkerMsg::Append(v) => peer::encode(w, PeerMsgRef::Append(v)),
        WorkerMsg::AppendDone(v) => peer::encode(w, PeerMsgRef::AppendDone(v)),
        WorkerMsg::Delivered(v) => peer::encode(w, PeerMsgRef::Delivered(v)),
        WorkerMsg::Group(req) => peer::encode(w, PeerMsgRef::Group(&req.to_call()?)),
        WorkerMsg::OrgPull { reply_to, since } => peer::encode(
            w,
            PeerMsgRef::OrgPull {
                reply_to: *reply_to as u32,
                since: *since,
            },
        ),
        WorkerMsg::OrgRecords(v) => peer::encode(w, PeerMsgRef::OrgRecords(v)),
        WorkerMsg::Typing(v) => peer::encode(w, PeerMsgRef::Typing(v)),
        WorkerMsg::Watch(r) => peer::encode(w, PeerMsgRef::Watch(r)),
        WorkerMsg::Presence(v) => peer::encode(w, PeerMsgRef::Presence(v)),
        WorkerMsg::GroupLive(v) => peer::encode(w, PeerMsgRef::GroupLive(v)),
        _ => return None,
    })
}

/// Decodes a payload into (local worker, message).
pub fn decode(b: Bytes) -> Result<(usize, WorkerMsg), PeerError> {
    let (w, msg) = peer::decode(b)?;
    let msg = match msg {
        PeerMsg::Append(v) => WorkerMsg::Append(v),
        PeerMsg::AppendDone(v) => WorkerMsg::AppendDone(v),
        PeerMsg::Delivered(v) => WorkerMsg::Delivered(v),
        PeerMsg::Group(c) => WorkerMsg::Group(GroupReq::from_call(c)),
        PeerMsg::OrgPull { reply_to, since } => WorkerMsg::OrgPull {
            reply_to: reply_to as usize,
            since,
        },
        PeerMsg::OrgRecords(v) => WorkerMsg::OrgRecords(v),
        PeerMsg::Typing(v) => WorkerMsg::Typing(v),
        PeerMsg::Watch(r) => WorkerMsg::Watch(r),
        PeerMsg::Presence(v) => WorkerMsg::Presence(v),
        PeerMsg::GroupLive(v) => WorkerMsg::GroupLive(v),
    };
    Ok((w as usize, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{GroupOp, Reply};
    use im_shared::{ConnId, GroupId, UserId};
    use std::sync::atomic::AtomicUsize;

    /// Issue 14: a peer that accepts the link but never reads cannot make the sender queue
    /// without bound: past the bound the link is reset (queue dropped, new connection, new
    /// epoch, so the workers replay their outboxes), and the queue stays within the bound.
    #[test]
    fn a_peer_that_does_not_read_gets_its_link_reset_at_the_queue_bound() {
        use std::time::Instant;
        let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = peer.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        {
            let (accepted, held) = (accepted.clone(), held.clone());
            std::thread::spawn(move || {
                for s in peer.incoming().flatten() {
                    let _ = s.set_nonblocking(false);
                    held.lock().unwrap().push(s); // held open, never read
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        const BOUND: usize = 1 << 20;
        let links = PeerLinks::start_with(0, vec!["127.0.0.1:9".parse().unwrap(), addr], BOUND);
        let deadline = Instant::now() + Duration::from_secs(20);
        let wait = |what: &str, cond: &dyn Fn() -> bool| {
            while !cond() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait("the link", &|| links.state[1].up.load(Ordering::Acquire));
        let first_epoch = links.state[1].epoch.load(Ordering::Acquire);
        let notes: Vec<_> = (0..1000u64)
            .map(|i| im_shared::peer::DeliveredNote {
                sender: UserId(i + 1),
                msg_id: im_shared::MsgId(i + 1),
                recipient: UserId(2),
            })
            .collect();
        let msg = WorkerMsg::Delivered(notes);
        while links.resets() == 0 {
            assert!(
                Instant::now() < deadline,
                "never reset: {:?}",
                links.queue_depths()
            );
            let epoch = links.state[1].epoch.load(Ordering::Acquire);
            links.send_in(1, 0, &msg, epoch);
            let (_, _, bytes) = links.queue_depths()[0];
            assert!(bytes <= BOUND, "{bytes} bytes queued");
        }
        wait("a new connection", &|| accepted.load(Ordering::SeqCst) >= 2);
        wait("the new epoch", &|| {
            links.state[1].up.load(Ordering::Acquire)
                && links.state[1].epoch.load(Ordering::Acquire) > first_epoch
        });
        let (_, _, bytes) = links.queue_depths()[0];
        assert!(bytes <= BOUND);
    }

    fn append(i: u64, body: usize) -> AppendReq {
        AppendReq {
            recipient: UserId(i),
            shard: im_shared::ShardId(1),
            replay: true,
            msg: im_shared::proto::Message {
                seq: im_shared::Seq(0),
                prev_seq: im_shared::Seq(0),
                msg_id: im_shared::MsgId(i),
                conv: 6,
                from: UserId(1),
                to: UserId(2),
                client_msg_id: 0,
                server_time_ms: 0,
                body: Bytes::from(vec![b'x'; body]),
            },
        }
    }

    #[test]
    fn appends_are_cut_into_runs_within_the_budget_in_order() {
        let reqs: Vec<AppendReq> = (0..100).map(|i| append(i, 1000)).collect();
        let parts: Vec<&[AppendReq]> = append_parts(&reqs, 10_000).collect();
        assert!(parts.len() >= 10, "{} parts", parts.len());
        for p in &parts {
            let bytes: usize = p.iter().map(|a| a.msg.encoded_len() + 32).sum();
            assert!(!p.is_empty() && bytes <= 10_000, "{bytes}");
        }
        assert_eq!(parts.concat(), reqs, "every request once, in order");
        // One larger than the budget goes alone; none at all gives no part.
        let big = [append(1, 50_000), append(2, 10)];
        let parts: Vec<usize> = append_parts(&big, 10_000).map(|p| p.len()).collect();
        assert_eq!(parts, vec![1, 1]);
        assert_eq!(append_parts(&[], 10_000).count(), 0);
    }

    /// A batch of appends far above the receiver's message limit (the replay that kept a link
    /// in a reset loop) reaches a real peer socket as messages it accepts, whole and in order.
    #[test]
    fn a_batch_above_the_link_message_limit_arrives_whole_as_several_messages() {
        use std::io::Read;
        let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = peer.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = peer.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let (mut buf, mut got, mut messages) = (BytesMut::new(), Vec::new(), 0);
            let mut chunk = vec![0u8; 1 << 16];
            while got.len() < 1_100 {
                match link::decode_msg(&mut buf).expect("a message within the limit") {
                    Some(LinkMsg::Peer(p)) => {
                        messages += 1;
                        let (_, m) = decode(p).unwrap();
                        let WorkerMsg::Append(v) = m else { panic!() };
                        got.extend(v.into_iter().map(|a| a.msg.msg_id.0));
                    }
                    Some(_) => {}
                    None => {
                        let n = s.read(&mut chunk).expect("read within 20 s");
                        assert!(n > 0, "closed after {} appends", got.len());
                        buf.extend_from_slice(&chunk[..n]);
                    }
                }
            }
            (got, messages)
        });
        let links = PeerLinks::start_with(0, vec!["127.0.0.1:9".parse().unwrap(), addr], 64 << 20);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !links.state[1].up.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "no link");
            std::thread::sleep(Duration::from_millis(10));
        }
        // 1 100 appends of 16 KB: 17.6 MB, above MAX_LINK_MSG (16 MiB).
        let reqs: Vec<AppendReq> = (0..1_100).map(|i| append(i, 16 << 10)).collect();
        links.send(1, 0, &WorkerMsg::Append(reqs));
        let (got, messages) = reader.join().unwrap();
        assert_eq!(got, (0..1_100).collect::<Vec<u64>>());
        assert!(messages >= 17, "{messages} link messages");
        assert_eq!(links.resets(), 0);
    }

    /// A peer that reads slowly, and a replay 24× the link's queue bound: sent at once it
    /// overflows the bound and resets the link (whose resync would replay it again); paced part
    /// by part it arrives whole and in order without a reset.
    #[tokio::test]
    async fn a_replay_above_the_queue_bound_is_paced_to_the_link_without_a_reset() {
        use std::io::Read;
        const BOUND: usize = 1 << 20;
        // 24 MiB: more than the loopback socket's buffers can take on top of the bound.
        const N: u64 = 1536;
        let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = peer.local_addr().unwrap();
        let reqs: Vec<AppendReq> = (0..N).map(|i| append(i, 16 << 10)).collect();
        let reader = std::thread::spawn(move || {
            let mut per_conn = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = peer.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let (mut buf, mut got) = (BytesMut::new(), Vec::new());
                let mut chunk = vec![0u8; 64 << 10];
                while got.len() < N as usize {
                    match link::decode_msg(&mut buf).expect("a well-formed message") {
                        Some(LinkMsg::Peer(p)) => {
                            let (_, WorkerMsg::Append(v)) = decode(p).unwrap() else {
                                panic!()
                            };
                            got.extend(v.into_iter().map(|a| a.msg.msg_id.0));
                        }
                        Some(_) => {}
                        None => match s.read(&mut chunk) {
                            Ok(0) | Err(_) => break, // reset by the sender
                            Ok(n) => {
                                buf.extend_from_slice(&chunk[..n]);
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        },
                    }
                }
                per_conn.push(got);
            }
            per_conn
        });
        let links = PeerLinks::start_with(0, vec!["127.0.0.1:9".parse().unwrap(), addr], BOUND);
        let up = |links: &PeerLinks, after: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let e = links.epoch(1);
                if links.is_up(1) && e > after {
                    return e;
                }
                assert!(std::time::Instant::now() < deadline, "no link");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        // At once: past the bound, the link is reset.
        let first = up(&links, 0);
        links.send_in(1, 0, &WorkerMsg::Append(reqs.clone()), first);
        assert_eq!(links.resets(), 1);
        // Paced, on the new connection.
        let epoch = up(&links, first);
        let budget = links.replay_part_bytes();
        assert!(budget <= BOUND / 8);
        for part in append_parts(&reqs, budget) {
            assert!(
                links
                    .send_replay(1, 0, part, epoch, Duration::from_secs(20))
                    .await,
                "a part was not sent"
            );
            assert!(links.queue_depths()[0].2 <= BOUND / 2 + budget);
        }
        let per_conn = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert!(
            per_conn[0].len() < N as usize,
            "the first connection was cut short"
        );
        assert_eq!(per_conn[1], (0..N).collect::<Vec<u64>>());
        assert_eq!(links.resets(), 1, "no reset while paced");
    }

    #[test]
    fn a_client_group_request_crosses_nodes_and_an_api_one_does_not() {
        let req = |reply| GroupReq {
            group: GroupId(7),
            actor: UserId(3),
            admin: false,
            reply,
            op: GroupOp::Leave,
        };
        let conn = || Reply::Conn {
            conn: ConnId(5),
            req_id: 9,
        };
        let (w, back) = decode(encode(2, &WorkerMsg::Group(req(conn()))).unwrap()).unwrap();
        assert_eq!(w, 2);
        let WorkerMsg::Group(g) = back else { panic!() };
        assert_eq!(g.to_call(), req(conn()).to_call());
        let (tx, _rx) = tokio::sync::oneshot::channel();
        assert!(encode(0, &WorkerMsg::Group(req(Reply::Api(tx)))).is_none());
    }
}
