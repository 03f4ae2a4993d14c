//! Where a worker message goes: to a worker of this node (its inbox) or of another logic node
//! (over a peer link). Users are placed by one rule on every gate and node: virtual shard →
//! global worker `owner_of_vshard(shard, nodes × workers)`, which lives on node
//! `global / workers` — the same node `owner_of_vshard(shard, nodes)` a gate routes to.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use im_shared::shard::{owner_of_vshard, vshard_of};
use im_shared::{ShardId, UserId};
use tokio::sync::mpsc;

use crate::peer::PeerLinks;
use crate::worker::WorkerMsg;

pub struct Router {
    /// This node's index in the node list.
    pub node: usize,
    pub nodes: usize,
    /// Workers per node (the same on every node).
    pub workers: usize,
    local: Vec<mpsc::UnboundedSender<WorkerMsg>>,
    remote: Option<Arc<PeerLinks>>,
    /// Items (appends, confirmations, notices, requests) sent by local worker `from` to local
    /// worker `to` and not taken yet, at `from * workers + to` (see [`Router::held`]).
    backlog: Vec<AtomicUsize>,
}

impl Router {
    pub fn new(
        node: usize,
        nodes: usize,
        local: Vec<mpsc::UnboundedSender<WorkerMsg>>,
        remote: Option<Arc<PeerLinks>>,
    ) -> Router {
        let workers = local.len().max(1);
        Router {
            node,
            nodes: nodes.max(1),
            workers,
            local,
            remote,
            backlog: (0..workers * workers)
                .map(|_| AtomicUsize::new(0))
                .collect(),
        }
    }

    /// Global workers in the cluster.
    pub fn total(&self) -> usize {
        self.nodes * self.workers
    }

    /// Global worker owning a virtual shard.
    pub fn owner_of_shard(&self, s: ShardId) -> usize {
        owner_of_vshard(s, self.total())
    }

    /// Global worker owning a user.
    pub fn owner(&self, uid: UserId) -> usize {
        self.owner_of_shard(vshard_of(uid))
    }

    /// Global index of local worker `idx`.
    pub fn global(&self, idx: usize) -> usize {
        self.node * self.workers + idx
    }

    /// Whether this node owns the user.
    pub fn owns(&self, uid: UserId) -> bool {
        self.owner(uid) / self.workers == self.node
    }

    /// Local worker of a user this node owns.
    pub fn local_of(&self, uid: UserId) -> usize {
        self.owner(uid) % self.workers
    }

    /// Sends from local worker `from` to a global worker. Live appends to a node are held back
    /// (they stay in the outbox) until `from` has resynced that node's link; see [`PeerLinks`].
    pub fn send(&self, from: usize, global: usize, msg: WorkerMsg) {
        let (node, w) = (global / self.workers, global % self.workers);
        if node == self.node {
            let items = msg.items();
            let pair = &self.backlog[from * self.workers + w];
            pair.fetch_add(items, Ordering::Relaxed);
            let wrapped = WorkerMsg::Local {
                from: from as u16,
                items: items as u32,
                msg: Box::new(msg),
            };
            if self.local[w].send(wrapped).is_err() {
                pair.fetch_sub(items, Ordering::Relaxed);
            }
        } else if let Some(r) = &self.remote {
            let live_append = matches!(&msg, WorkerMsg::Append(v) if v.iter().any(|a| !a.replay));
            if live_append {
                self.send_if_resynced(from, global, msg);
            } else {
                r.send(node, w, &msg);
            }
        }
    }

    /// Sends appends to a global worker of another node only if `from` may send live appends
    /// there now (the link is up and `from` has resynced it), tagged with that epoch; else drops
    /// them (they stay in the outbox, and the next resync of that link sends them in order).
    /// For re-sends of unconfirmed appends: one that went out before the resync of a new link
    /// would reach the recipient ahead of older appends that the resync brings, out of order.
    pub fn send_if_resynced(&self, from: usize, global: usize, msg: WorkerMsg) {
        let (node, w) = (global / self.workers, global % self.workers);
        if node == self.node {
            return self.send(from, global, msg);
        }
        // Tagged with the epoch found ready: if the link is replaced before the payload is
        // written, it is dropped rather than overtaking that new epoch's resync.
        if let Some((r, epoch)) = self
            .remote
            .as_ref()
            .and_then(|r| Some((r, r.ready(node, from)?)))
        {
            r.send_in(node, w, &msg, epoch);
        }
    }

    /// Local worker `to` took `items` that local worker `from` sent it. When that brings the
    /// pair's backlog below `limit` from at or above it, `from` gets a `Resume`: it may admit
    /// client work again (see [`Router::held`]).
    pub fn taken(&self, from: usize, to: usize, items: usize, limit: usize) {
        let Some(pair) = self.backlog.get(from * self.workers + to) else {
            return;
        };
        let before = pair.fetch_sub(items, Ordering::Relaxed);
        if before >= limit && before - items < limit {
            if let Some(tx) = self.local.get(from) {
                let _ = tx.send(WorkerMsg::Resume);
            }
        }
    }

    /// Whether local worker `from` has `limit` or more items waiting at any other local
    /// worker. Such a worker holds back new client work (frames, API requests) and only
    /// handles what other workers send it, until a `Resume` (the bound of the worker → worker
    /// hop: ARCHITECTURE.md, "Every queue, its bound and its policy").
    pub fn held(&self, from: usize, limit: usize) -> bool {
        let row = from * self.workers;
        self.backlog
            .get(row..row + self.workers)
            .is_some_and(|r| r.iter().any(|p| p.load(Ordering::Relaxed) >= limit))
    }

    /// Items from this node's other workers waiting at local worker `to`.
    pub fn waiting_at(&self, to: usize) -> usize {
        (0..self.workers)
            .filter_map(|from| self.backlog.get(from * self.workers + to))
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }

    /// The peer links (multi-node clusters only).
    pub fn peers(&self) -> Option<&PeerLinks> {
        self.remote.as_deref()
    }

    /// Node of a global worker.
    pub fn node_of(&self, global: usize) -> usize {
        global / self.workers
    }

    /// Inbox of a local worker.
    pub fn local(&self, idx: usize) -> &mpsc::UnboundedSender<WorkerMsg> {
        &self.local[idx]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_shared::peer::AppendReq;
    use im_shared::proto::Message;
    use im_shared::{MsgId, Seq};
    use std::time::{Duration, Instant};

    fn append(replay: bool) -> WorkerMsg {
        WorkerMsg::Append(vec![AppendReq {
            recipient: UserId(5),
            shard: ShardId(1),
            msg: Message {
                seq: Seq(0),
                prev_seq: Seq(0),
                msg_id: MsgId(9),
                conv: 2,
                from: UserId(1),
                to: UserId(77),
                client_msg_id: 1,
                server_time_ms: 0,
                body: bytes::Bytes::from_static(b"post"),
            },
            replay,
        }])
    }

    /// A re-send of unconfirmed appends goes to another node only over a link this worker has
    /// resynced: before the resync it would overtake the older appends the resync brings. (A
    /// plain replay `send` goes out in the current epoch whatever the resync state: the resync
    /// itself is sent that way.)
    #[test]
    fn re_sends_wait_for_the_resync_of_the_link() {
        use std::io::Read;
        use std::sync::atomic::AtomicUsize;
        let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = peer.local_addr().unwrap();
        let got = Arc::new(AtomicUsize::new(0));
        {
            let got = got.clone();
            std::thread::spawn(move || {
                for mut s in peer.incoming().flatten() {
                    let got = got.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = s.read(&mut buf) {
                            got.fetch_add(n, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
        let links = Arc::new(PeerLinks::start(
            0,
            vec!["127.0.0.1:9".parse().unwrap(), addr],
        ));
        let (tx, _rx) = mpsc::unbounded_channel();
        let router = Router::new(0, 2, vec![tx], Some(links.clone()));
        let deadline = Instant::now() + Duration::from_secs(20);
        let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
            while !cond() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for("the link", &|| links.is_up(1));
        // Whatever the link says first (its hello) has arrived and nothing else is coming.
        let settled = || {
            let mut last = got.load(Ordering::SeqCst);
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let now = got.load(Ordering::SeqCst);
                if now == last {
                    return now;
                }
                last = now;
            }
        };
        let before = settled();
        // Node 1's worker 0 is global worker 1. Not resynced yet: the re-send is dropped, while
        // a plain replay send (how the resync goes) is written.
        assert!(links.ready(1, 0).is_none());
        router.send_if_resynced(0, 1, append(true));
        assert_eq!(settled(), before, "a re-send went out before the resync");
        router.send(0, 1, append(true));
        wait_for("the plain send", &|| got.load(Ordering::SeqCst) > before);
        let before = settled();
        // Once worker 0 resynced the link's epoch, re-sends go out in it.
        links.resynced(1, 0, links.epoch(1));
        assert_eq!(links.ready(1, 0), Some(links.epoch(1)));
        router.send_if_resynced(0, 1, append(true));
        wait_for("the re-send", &|| got.load(Ordering::SeqCst) > before);
    }
}
