//! Starting the workers, and the in-process [`UpstreamLink`] a co-located gate uses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use im_shared::link::{DownstreamSink, HostedTask, Up, UpstreamLink};
use im_shared::proto::CONV_S2C;
use im_shared::token::TokenVerifier;
use im_shared::{ErrorCode, GroupId, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::api::{Accepted, ApiBackend, ApiError, BoxFut, PushTarget};
use crate::config::LogicConfig;
use crate::metrics::Metrics;
use crate::peer::PeerLinks;
use crate::router::Router;
use crate::services::Services;
use crate::store::Store;
use crate::worker::{ApiOk, ApiReq, GroupOp, GroupReq, Reply, Worker, WorkerMsg};

/// How long an API call waits for its worker.
const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A running logic tier; also the gate's upstream link (one lane per worker).
pub struct LogicHandle {
    router: Arc<Router>,
    inboxes: Vec<mpsc::UnboundedSender<WorkerMsg>>,
    depth: Vec<Arc<AtomicUsize>>,
    max_queued: usize,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Hosted workers ([`start_hosted`]): every one holds a sender of this channel until its
    /// future ends, so `recv` fails once all of them ended.
    hosted_done: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// The runtime whose timers hosted workers use (their own threads run no tokio): a thread
    /// that drives it until this sender is dropped.
    _timers: Option<(tokio::runtime::Handle, oneshot::Sender<()>)>,
    metrics: Arc<Metrics>,
    /// The node's copy of the organisation tree (also in every worker's [`Services`]).
    org: Arc<crate::org::OrgCache>,
}

/// A current-thread runtime driven by a thread of its own ("logic-timers") until the returned
/// sender is dropped: hosted workers register their timers with its handle.
fn timer_runtime() -> std::io::Result<(tokio::runtime::Handle, oneshot::Sender<()>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("logic-timers".into())
        .spawn(move || {
            let _ = rt.block_on(stopped);
        })?;
    Ok((handle, stop))
}

/// Where the workers run.
enum Placement {
    /// A thread each, with a tokio runtime of its own.
    Threads,
    /// On threads that someone else runs (gate cores): handed back as [`HostedTask`]s.
    Hosted,
}

/// A hosted worker's future, polled inside its tokio handle so that its timers (`interval`,
/// `sleep`) work on a thread whose runtime is not tokio's.
struct Entered<F> {
    handle: tokio::runtime::Handle,
    fut: std::pin::Pin<Box<F>>,
    _done: std::sync::mpsc::Sender<()>,
}

impl<F: std::future::Future<Output = ()>> std::future::Future for Entered<F> {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = &mut *self;
        let _entered = this.handle.enter();
        this.fut.as_mut().poll(cx)
    }
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
    start_with(cfg, store, verifier, gate, cluster, Services::default())
}

/// Starts the workers of one node with optional services (offline push, c2s queue).
pub fn start_with<S: Store + Send + Sync>(
    cfg: LogicConfig,
    store: S,
    verifier: Arc<dyn TokenVerifier>,
    gate: Arc<dyn DownstreamSink>,
    cluster: Option<Cluster>,
    services: Services,
) -> std::io::Result<LogicHandle> {
    let (h, _) = start_placed(
        cfg,
        store,
        verifier,
        gate,
        cluster,
        services,
        Placement::Threads,
    )?;
    Ok(h)
}

/// Builds the workers of a single node without starting them: worker `i` is `tasks[i]`, for
/// gate core `i` to run on its thread (`Gate::start_hosting`; thread per core). The handle
/// works as [`start_with`]'s; its `shutdown` waits until every hosted worker ended, so it must
/// run while the cores still run.
pub fn start_hosted<S: Store + Send + Sync>(
    cfg: LogicConfig,
    store: S,
    verifier: Arc<dyn TokenVerifier>,
    gate: Arc<dyn DownstreamSink>,
    services: Services,
) -> std::io::Result<(LogicHandle, Vec<HostedTask>)> {
    start_placed(
        cfg,
        store,
        verifier,
        gate,
        None,
        services,
        Placement::Hosted,
    )
}

fn start_placed<S: Store + Send + Sync>(
    cfg: LogicConfig,
    store: S,
    verifier: Arc<dyn TokenVerifier>,
    gate: Arc<dyn DownstreamSink>,
    cluster: Option<Cluster>,
    services: Services,
    placement: Placement,
) -> std::io::Result<(LogicHandle, Vec<HostedTask>)> {
    let metrics = Arc::new(Metrics::default());
    let org = services.org.clone();
    let n = cfg.workers.max(1);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let (node, nodes, peers) = match cluster {
        Some(c) if c.nodes.len() > 1 => (
            c.node,
            c.nodes.len(),
            Some(Arc::new(PeerLinks::start_with(
                c.node,
                c.nodes,
                cfg.peer_queue_bytes,
            ))),
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
    let mut tasks: Vec<HostedTask> = Vec::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let timers = match placement {
        Placement::Threads => None,
        Placement::Hosted => Some(timer_runtime()?),
    };
    for (idx, rx) in rxs.into_iter().enumerate() {
        let w = Worker::new(
            idx,
            cfg.clone(),
            store.clone(),
            verifier.clone(),
            gate.clone(),
            router.clone(),
            depth[idx].clone(),
            services.clone(),
            metrics.clone(),
        );
        if let Some((handle, _)) = &timers {
            let (handle, done) = (handle.clone(), done_tx.clone());
            tasks.push(Box::new(move || {
                Box::pin(Entered {
                    handle,
                    fut: Box::pin(w.run(rx)),
                    _done: done,
                })
            }));
            continue;
        }
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
    drop(done_tx);
    let handle = LogicHandle {
        router,
        inboxes: txs,
        depth,
        max_queued: cfg.max_queued,
        threads: std::sync::Mutex::new(threads),
        hosted_done: std::sync::Mutex::new(timers.as_ref().map(|_| done_rx)),
        _timers: timers,
        metrics,
        org,
    };
    Ok((handle, tasks))
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

    /// Hands a message from a peer node to local worker `worker`. Blocks the caller (the
    /// link's reader thread) while `max_queued` messages from other nodes wait for that worker:
    /// the link stops reading, TCP slows the sending node, whose bounded link queue resets the
    /// link if it stays full (its outbox then replays). No worker waits on a link reader, so
    /// this wait cannot close a cycle.
    pub fn deliver_peer(&self, worker: usize, msg: WorkerMsg) {
        let Some(tx) = self.inboxes.get(worker) else {
            return;
        };
        while self.metrics.peer_waiting(worker) >= self.max_queued as u64 {
            if tx.is_closed() {
                return; // the worker ended
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.metrics.peer_given(worker);
        if tx.send(WorkerMsg::Peer(Box::new(msg))).is_err() {
            self.metrics.peer_taken(worker);
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
        let done = self
            .hosted_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(done) = done {
            // Fails once every hosted worker's future has ended (or was dropped with its core).
            while done.recv().is_ok() {}
        }
    }
}

impl LogicHandle {
    /// The node's counters.
    pub fn metrics_ref(&self) -> &Metrics {
        &self.metrics
    }

    /// Sends `msg` to local worker `w` and waits for the answer on `rx`.
    async fn call(
        &self,
        w: usize,
        msg: WorkerMsg,
        rx: oneshot::Receiver<Result<ApiOk, ApiError>>,
    ) -> Result<ApiOk, ApiError> {
        if self.inboxes[w].send(msg).is_err() {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "logic is shutting down",
            ));
        }
        match tokio::time::timeout(API_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ApiError::new(ErrorCode::Unavailable, "request dropped")),
            Err(_) => Err(ApiError::new(ErrorCode::Unavailable, "timed out, retry")),
        }
    }

    /// A request for the owner of `group` (which must be on this node).
    async fn group_call(
        &self,
        group: GroupId,
        actor: UserId,
        op: GroupOp,
    ) -> Result<ApiOk, ApiError> {
        if group.0 == 0 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "group must not be 0",
            ));
        }
        let uid = UserId(group.0);
        if !self.router.owns(uid) {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "group {group} is owned by logic node {}: call that node's API",
                    self.router.node_of(self.router.owner(uid))
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        let req = GroupReq {
            group,
            actor,
            admin: true,
            reply: Reply::Api(tx),
            op,
        };
        self.call(self.router.local_of(uid), WorkerMsg::Group(req), rx)
            .await
    }

    /// Forgets a push token the provider reported invalid (written by the user's worker).
    pub fn drop_push_token(&self, uid: UserId, device_id: String) {
        if self.router.owns(uid) {
            let w = self.router.local_of(uid);
            let _ = self.inboxes[w].send(WorkerMsg::Api(ApiReq::DropPushToken { uid, device_id }));
        }
    }

    fn unexpected(r: ApiOk) -> ApiError {
        ApiError::new(ErrorCode::Internal, format!("unexpected answer {r:?}"))
    }
}

impl ApiBackend for LogicHandle {
    fn server_send(
        &self,
        from: UserId,
        target: PushTarget,
        body: Bytes,
        request_id: u64,
    ) -> BoxFut<'_, Result<Accepted, ApiError>> {
        Box::pin(async move {
            let r = match target {
                PushTarget::Users(to) => {
                    let (tx, rx) = oneshot::channel();
                    let req = ApiReq::ServerSend {
                        from,
                        to,
                        body,
                        request_id,
                        reply: tx,
                    };
                    // Any worker of this node can do it; the same sender always lands on the
                    // same one, so its request ids are deduplicated in one place.
                    let w = self.router.local_of(from);
                    self.call(w, WorkerMsg::Api(req), rx).await?
                }
                PushTarget::Group(g, mentions) => {
                    let op = GroupOp::Post {
                        client_msg_id: request_id,
                        conv: CONV_S2C,
                        body,
                        mentions,
                    };
                    self.group_call(g, from, op).await?
                }
            };
            match r {
                ApiOk::Accepted(a) => Ok(a),
                r => Err(Self::unexpected(r)),
            }
        })
    }

    fn group_create(
        &self,
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        client_id: u64,
    ) -> BoxFut<'_, Result<GroupId, ApiError>> {
        Box::pin(async move {
            if owner.0 == 0 {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "owner must not be 0",
                ));
            }
            let (tx, rx) = oneshot::channel();
            let req = ApiReq::GroupCreate {
                owner,
                name,
                members,
                client_id,
                reply: tx,
            };
            match self
                .call(self.router.local_of(owner), WorkerMsg::Api(req), rx)
                .await?
            {
                ApiOk::Group(g) => Ok(g),
                r => Err(Self::unexpected(r)),
            }
        })
    }

    fn group_add(&self, group: GroupId, members: Vec<UserId>) -> BoxFut<'_, Result<(), ApiError>> {
        Box::pin(async move {
            self.group_call(group, UserId(0), GroupOp::Add(members))
                .await
                .map(|_| ())
        })
    }

    fn group_remove(
        &self,
        group: GroupId,
        members: Vec<UserId>,
    ) -> BoxFut<'_, Result<(), ApiError>> {
        Box::pin(async move {
            self.group_call(group, UserId(0), GroupOp::Remove(members))
                .await
                .map(|_| ())
        })
    }

    fn group_info(
        &self,
        group: GroupId,
    ) -> BoxFut<'_, Result<crate::api::GroupWithMembers, ApiError>> {
        Box::pin(async move {
            match self.group_call(group, UserId(0), GroupOp::Info).await? {
                ApiOk::Info(d, m) => Ok((d, m)),
                r => Err(Self::unexpected(r)),
            }
        })
    }

    fn groups_of(&self, uid: UserId) -> BoxFut<'_, Result<Vec<(GroupId, String)>, ApiError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let req = ApiReq::GroupsOf { uid, reply: tx };
            match self
                .call(self.router.local_of(uid), WorkerMsg::Api(req), rx)
                .await?
            {
                ApiOk::Groups(g) => Ok(g),
                r => Err(Self::unexpected(r)),
            }
        })
    }

    fn org_change(&self, change: crate::org::OrgChange) -> BoxFut<'_, Result<u64, ApiError>> {
        Box::pin(async move {
            let route = crate::org::ORG_ROUTE;
            if !self.router.owns(route) {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the organisation tree is owned by logic node {}: call that node's API",
                        self.router.node_of(self.router.owner(route))
                    ),
                ));
            }
            let (tx, rx) = oneshot::channel();
            let req = ApiReq::Org { change, reply: tx };
            match self
                .call(self.router.local_of(route), WorkerMsg::Api(req), rx)
                .await?
            {
                ApiOk::Org(v) => Ok(v),
                r => Err(Self::unexpected(r)),
            }
        })
    }

    fn org_read(&self, f: &mut dyn FnMut(&im_shared::org::OrgTree)) -> Result<(), ApiError> {
        if !self.org.loaded() {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "the organisation tree is loading, retry",
            ));
        }
        f(&self.org.read());
        Ok(())
    }

    fn metrics(&self, out: &mut String) {
        self.metrics.render(out);
        im_shared::prom::labeled(
            out,
            "im_logic_queued",
            "gauge",
            "Client frames queued per logic worker.",
            "worker",
            self.depth
                .iter()
                .map(|d| d.load(Ordering::Relaxed) as u64)
                .enumerate(),
        );
        self.metrics.render_inboxes(self.depth.len(), out);
        if let Some(p) = self.router.peers() {
            let depths = p.queue_depths();
            im_shared::prom::labeled(
                out,
                "im_logic_peer_queue",
                "gauge",
                "Messages queued for the link to another logic node (dropped with the link; the outbox replays).",
                "node",
                depths.iter().map(|&(node, n, _)| (node, n as u64)),
            );
            im_shared::prom::labeled(
                out,
                "im_logic_peer_queue_bytes",
                "gauge",
                "Bytes queued for the link to another logic node (bound: 64 MiB, then the link is reset).",
                "node",
                depths.iter().map(|&(node, _, b)| (node, b as u64)),
            );
            im_shared::prom::metric(
                out,
                "im_logic_peer_resets_total",
                "counter",
                "Peer links reset because their queue passed its bound (outboxes replay).",
                p.resets(),
            );
        }
    }
}

impl UpstreamLink for LogicHandle {
    fn lane_of(&self, uid: UserId) -> usize {
        self.worker_of(uid)
    }

    fn admit(&self, lane: usize, unsent: usize) -> Result<(), ErrorCode> {
        match self.depth.get(lane) {
            Some(d) if d.load(Ordering::Relaxed) + unsent < self.max_queued => Ok(()),
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
