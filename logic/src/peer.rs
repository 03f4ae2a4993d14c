//! Logic ↔ logic links: worker messages for workers on another node (appends of a fan-out, their
//! confirmations, delivered notices), carried as `LinkMsg::Peer` payloads.
//!
//! ```text
//! payload := worker:u16 kind:u8 count:u32 entry*
//! kind 1 Append    : recipient:u64 shard:u16 replay:u8 msg_len:u32 msg (Message encoding)
//! kind 2 AppendDone: shard:u16 msg_id:u64 recipient:u64
//! kind 3 Delivered : sender:u64 msg_id:u64 recipient:u64
//! kind 4 Group     : (count = 1) a group request of a client, see `worker::groups::encode_req`
//! ```
//! A group request is not in any outbox: if the link drops it, the client gets no answer and
//! retries (posts are deduplicated on `(sender, client_msg_id)` by the group's owner).
//! Each node opens one outbound link to every other node (reconnecting with backoff) and accepts
//! the others' on its link listener. Nothing here is acknowledged; order and completeness come
//! from the sender's outbox:
//! - every change of a link (down, then up again) bumps its *epoch*;
//! - a worker sends live appends to a node only while the link is up and the worker has
//!   *resynced* the current epoch: re-sent, in msg_id order, every outbox entry bound for that
//!   node (whatever the dead connection may have swallowed);
//! - every payload is queued with the epoch it was meant for (a live append: the epoch its worker
//!   found ready), and the link thread writes only payloads of its current connection's epoch:
//!   one queued for a connection that has since been replaced is dropped, never written to the
//!   new one ahead of that epoch's resync.
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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use im_shared::link::{self, LinkMsg, Role};
use im_shared::proto::Message;
use im_shared::{MsgId, ShardId, UserId};

use crate::worker::{AppendReq, DeliveredNote, WorkerMsg};

/// Outbound links to the other logic nodes.
pub struct PeerLinks {
    txs: Vec<Option<Sender<(u64, Bytes)>>>,
    state: Vec<Arc<LinkState>>,
}

/// Up/down state of one outbound link, shared with the workers.
#[derive(Default)]
pub struct LinkState {
    up: AtomicBool,
    epoch: AtomicU64,
    /// Per local worker: the epoch it has resynced.
    resynced: Mutex<HashMap<usize, u64>>,
}

impl PeerLinks {
    /// Starts a link thread to every node but `me`.
    pub fn start(me: usize, nodes: Vec<SocketAddr>) -> PeerLinks {
        let mut txs = Vec::new();
        let mut state = Vec::new();
        for (i, addr) in nodes.into_iter().enumerate() {
            let st = Arc::new(LinkState::default());
            state.push(st.clone());
            if i == me {
                txs.push(None);
                continue;
            }
            let (tx, rx) = crossbeam_channel::unbounded();
            txs.push(Some(tx));
            let _ = std::thread::Builder::new()
                .name(format!("peer-{i}"))
                .spawn(move || run(me as u16, addr, rx, &st));
        }
        PeerLinks { txs, state }
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

    /// Nodes (other than this one) that `worker` has to resync: `(node, epoch)` of links that are
    /// up in an epoch the worker has not resynced yet.
    pub fn needs_resync(&self, worker: usize) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        for (node, st) in self.state.iter().enumerate() {
            if self.txs[node].is_none() || !st.up.load(Ordering::Acquire) {
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

    /// Queues `msg` for the connection of `epoch` only: dropped if the link has moved on.
    pub fn send_in(&self, node: usize, worker: usize, msg: &WorkerMsg, epoch: u64) {
        if let (Some(Some(tx)), Some(p)) = (self.txs.get(node), encode(worker, msg)) {
            let _ = tx.send((epoch, p));
        }
    }
}

fn run(me: u16, addr: SocketAddr, rx: Receiver<(u64, Bytes)>, st: &LinkState) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if st.up.swap(false, Ordering::AcqRel) {
            st.epoch.fetch_add(1, Ordering::AcqRel);
        }
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(_) => {
                // The peer is down: what is queued for it is dropped (outboxes re-send appends).
                while rx.try_recv().is_ok() {}
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
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
            },
            &mut out,
        );
        if s.write_all(&out).is_err() {
            continue;
        }
        // Nothing queued for an earlier connection goes on this one (the workers resync first):
        // payloads of older epochs are skipped below.
        let epoch = st.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        st.up.store(true, Ordering::Release);
        tracing::info!(%addr, "peer link up");
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(p) => Some(p),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            out.clear();
            match first {
                Some((e, p)) => {
                    if e == epoch {
                        link::encode_msg(&LinkMsg::Peer(p), &mut out);
                    }
                    while let Ok((e, p)) = rx.try_recv() {
                        if e == epoch {
                            link::encode_msg(&LinkMsg::Peer(p), &mut out);
                        }
                        if out.len() > 1024 * 1024 {
                            break;
                        }
                    }
                    if out.is_empty() {
                        continue;
                    }
                }
                None => link::encode_msg(&LinkMsg::Ping, &mut out),
            }
            if s.write_all(&out).is_err() {
                tracing::warn!(%addr, "peer link down");
                break;
            }
        }
    }
}

/// Encodes a worker message for worker `worker` of another node (`None` for local-only kinds).
pub fn encode(worker: usize, msg: &WorkerMsg) -> Option<Bytes> {
    let mut b = BytesMut::new();
    b.put_u16(worker as u16);
    match msg {
        WorkerMsg::Append(reqs) => {
            b.put_u8(1);
            b.put_u32(reqs.len() as u32);
            for a in reqs {
                b.put_u64(a.recipient.0);
                b.put_u16(a.shard.0);
                b.put_u8(a.replay as u8);
                b.put_u32(a.msg.encoded_len() as u32);
                a.msg.encode(&mut b);
            }
        }
        WorkerMsg::AppendDone(done) => {
            b.put_u8(2);
            b.put_u32(done.len() as u32);
            for (s, m, r) in done {
                b.put_u16(s.0);
                b.put_u64(m.0);
                b.put_u64(r.0);
            }
        }
        WorkerMsg::Delivered(notes) => {
            b.put_u8(3);
            b.put_u32(notes.len() as u32);
            for n in notes {
                b.put_u64(n.sender.0);
                b.put_u64(n.msg_id.0);
                b.put_u64(n.recipient.0);
            }
        }
        WorkerMsg::Group(req) => {
            b.put_u8(4);
            b.put_u32(1);
            if !crate::worker::groups_encode(req, &mut b) {
                return None;
            }
        }
        _ => return None,
    }
    Some(b.freeze())
}

/// Why a peer payload could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("bad peer payload: {0}")]
pub struct PeerError(&'static str);

/// Decodes a payload into (local worker, message).
pub fn decode(mut b: Bytes) -> Result<(usize, WorkerMsg), PeerError> {
    let need = |b: &Bytes, n: usize| {
        if b.remaining() < n {
            Err(PeerError("truncated"))
        } else {
            Ok(())
        }
    };
    need(&b, 7)?;
    let worker = b.get_u16() as usize;
    let kind = b.get_u8();
    let n = b.get_u32() as usize;
    let msg = match kind {
        1 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 15)?;
                let recipient = UserId(b.get_u64());
                let shard = ShardId(b.get_u16());
                let replay = b.get_u8() != 0;
                let len = b.get_u32() as usize;
                need(&b, len)?;
                let msg = Message::decode(b.split_to(len)).map_err(|_| PeerError("message"))?;
                v.push(AppendReq {
                    recipient,
                    shard,
                    msg,
                    replay,
                });
            }
            WorkerMsg::Append(v)
        }
        2 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 18)?;
                v.push((
                    ShardId(b.get_u16()),
                    MsgId(b.get_u64()),
                    UserId(b.get_u64()),
                ));
            }
            WorkerMsg::AppendDone(v)
        }
        3 => {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                need(&b, 24)?;
                v.push(DeliveredNote {
                    sender: UserId(b.get_u64()),
                    msg_id: MsgId(b.get_u64()),
                    recipient: UserId(b.get_u64()),
                });
            }
            WorkerMsg::Delivered(v)
        }
        4 => WorkerMsg::Group(crate::worker::groups_decode(&mut b).map_err(PeerError)?),
        _ => return Err(PeerError("kind")),
    };
    Ok((worker, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_shared::Seq;

    #[test]
    fn payloads_round_trip_and_garbage_is_refused() {
        let msg = Message {
            seq: Seq(3),
            prev_seq: Seq(2),
            msg_id: MsgId(9),
            conv: 1,
            from: UserId(1),
            to: UserId(2),
            client_msg_id: 7,
            server_time_ms: 5,
            body: Bytes::from_static(b"hi"),
        };
        let a = WorkerMsg::Append(vec![AppendReq {
            recipient: UserId(2),
            shard: ShardId(4),
            msg: msg.clone(),
            replay: true,
        }]);
        let (w, back) = decode(encode(3, &a).unwrap()).unwrap();
        assert_eq!(w, 3);
        let WorkerMsg::Append(v) = back else { panic!() };
        assert_eq!(
            (v[0].recipient, v[0].shard, v[0].replay),
            (UserId(2), ShardId(4), true)
        );
        assert_eq!(v[0].msg, msg);
        let done = vec![(ShardId(1), MsgId(2), UserId(3))];
        let d = WorkerMsg::AppendDone(done.clone());
        let (_, back) = decode(encode(0, &d).unwrap()).unwrap();
        assert!(matches!(back, WorkerMsg::AppendDone(v) if v == done));
        let enc = encode(0, &d).unwrap();
        for cut in 0..enc.len() {
            assert!(decode(enc.slice(..cut)).is_err(), "cut {cut}");
        }
        let enc = encode(0, &a).unwrap();
        for cut in 0..enc.len() {
            assert!(decode(enc.slice(..cut)).is_err(), "cut {cut}");
        }
        assert!(decode(Bytes::from_static(&[0, 0, 9, 0, 0, 0, 0])).is_err());
    }
}
