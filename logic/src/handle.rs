//! Starting the workers, and the in-process [`UpstreamLink`] a co-located gate uses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use im_shared::link::{DownstreamSink, Up, UpstreamLink};
use im_shared::token::TokenVerifier;
use im_shared::{ErrorCode, UserId};
use tokio::sync::mpsc;

use crate::config::LogicConfig;
use crate::peer::PeerLinks;
use crate::router::Router;
use crate::store::Store;
use crate::worker::{Worker, WorkerMsg};

/// A running logic tier; also the gate's upstream link (one lane per worker).
pub struct LogicHandle {
    router: Arc<Router>,
    inboxes: Vec<mpsc::UnboundedSender<WorkerMsg>>,
    depth: Vec<Arc<AtomicUsize>>,
    max_queued: usize,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// Starts `cfg.workers` worker threads over `store`. Each worker first replays the outbox of
/// its shards (fan-out that a crash interrupted), then serves requests.
pub fn start<S: Store + Send + Sync>(
    cfg: LogicConfig,
    store: S,
    verifier: Arc<dyn TokenVerifier>,
    gate: Arc<dyn DownstreamSink>,
) -> std::io::Result<LogicHandle> {
    start_node(cfg, store, verifier, gate, None)
}

/// The nodes of a multi-node cluster: this node's index and every node's link address (the same
/// list, in the same order, on every gate and node).
#[derive(Clone, Debug)]
pub struct Cluster {
    pub node: usize,
    pub nodes: Vec<std::net::SocketAddr>,
}

/// Starts the workers of one node of a cluster (`None`: a single node).
pub fn start_node<S: Store + Send + Sync>(
    cfg: LogicConfig,
    store: S,
    verifier: Arc<dyn TokenVerifier>,
    gate: Arc<dyn DownstreamSink>,
    cluster: Option<Cluster>,
) -> std::io::Result<LogicHandle> {
    let n = cfg.workers.max(1);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let (node, nodes, peers) = match cluster {
        Some(c) if c.nodes.len() > 1 => (
            c.node,
            c.nodes.len(),
            Some(Arc::new(PeerLinks::start(c.node, c.nodes))),
        ),
        _ => (0, 1, None),
    };
    let router = Arc::new(Router::new(node, nodes, txs.clone(), peers));
    if router.total() > 1 << im_shared::MsgId::NODE_BITS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "nodes × workers exceeds the 1024 msg-id generators",
        ));
    }
    let depth: Vec<_> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut threads = Vec::new();
    for (idx, rx) in rxs.into_iter().enumerate() {
        let w = Worker::new(
            idx,
            cfg.clone(),
            store.clone(),
            verifier.clone(),
            gate.clone(),
            router.clone(),
            depth[idx].clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("logic-{idx}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("build tokio runtime");
                    rt.block_on(w.run(rx));
                })?,
        );
    }
    Ok(LogicHandle {
        router,
        inboxes: txs,
        depth,
        max_queued: cfg.max_queued,
        threads: std::sync::Mutex::new(threads),
    })
}

impl LogicHandle {
    /// Local worker that owns `uid` (meaningful when this node owns it).
    pub fn worker_of(&self, uid: UserId) -> usize {
        self.router.local_of(uid)
    }

    /// Whether this node owns `uid` (a gate with a stale shard map may ask the wrong node).
    pub fn owns(&self, uid: UserId) -> bool {
        self.router.owns(uid)
    }

    /// Hands a message from a peer node to local worker `worker`.
    pub fn deliver_peer(&self, worker: usize, msg: WorkerMsg) {
        if let Some(tx) = self.inboxes.get(worker) {
            let _ = tx.send(msg);
        }
    }

    /// A gate's link dropped: every worker forgets that gate's connections.
    pub fn gate_down(&self, gate: u16) {
        for tx in &self.inboxes {
            let _ = tx.send(WorkerMsg::GateDown(gate));
        }
    }

    /// Stops the workers after they finish what is queued (and commit it). Idempotent.
    pub fn shutdown(&self) {
        for tx in &self.inboxes {
            let _ = tx.send(WorkerMsg::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl UpstreamLink for LogicHandle {
    fn lane_of(&self, uid: UserId) -> usize {
        self.worker_of(uid)
    }

    fn admit(&self, lane: usize) -> Result<(), ErrorCode> {
        match self.depth.get(lane) {
            Some(d) if d.load(Ordering::Relaxed) < self.max_queued => Ok(()),
            _ => Err(ErrorCode::Overloaded),
        }
    }

    fn send(&self, lane: usize, batch: Vec<Up>) {
        let frames = batch
            .iter()
            .filter(|u| matches!(u, Up::Frame { .. }))
            .count();
        self.depth[lane].fetch_add(frames, Ordering::Relaxed);
        let _ = self.inboxes[lane].send(WorkerMsg::Gate(batch));
    }
}
