//! Where a worker message goes: to a worker of this node (its inbox) or of another logic node
//! (over a peer link). Users are placed by one rule on every gate and node: virtual shard →
//! global worker `owner_of_vshard(shard, nodes × workers)`, which lives on node
//! `global / workers` — the same node `owner_of_vshard(shard, nodes)` a gate routes to.

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
}

impl Router {
    pub fn new(
        node: usize,
        nodes: usize,
        local: Vec<mpsc::UnboundedSender<WorkerMsg>>,
        remote: Option<Arc<PeerLinks>>,
    ) -> Router {
        Router {
            node,
            nodes: nodes.max(1),
            workers: local.len().max(1),
            local,
            remote,
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
            let _ = self.local[w].send(msg);
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
