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
            if !live_append {
                return r.send(node, w, &msg);
            }
            // Tagged with the epoch found ready: if the link is replaced before the payload is
            // written, it is dropped rather than overtaking that new epoch's resync.
            if let Some(epoch) = r.ready(node, from) {
                r.send_in(node, w, &msg, epoch);
            }
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
