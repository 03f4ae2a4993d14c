//! One gate core: its listener, its connections, its timer wheel and its batches to logic.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use im_shared::fast::FastMap;
use std::net::TcpListener as StdListener;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use im_shared::frame::{Cmd, Frame, FrameCodec};
use im_shared::link::{Down, Up, UpstreamLink};
use im_shared::proto::peek_login_uid;
use im_shared::{shard, Command, ConnId, ErrorCode, UserId};
use monoio::net::{TcpListener, TcpStream};

use crate::config::GateConfig;
use crate::conn::{self, Conn};
use crate::limits::{Admission, CoreLimits, Slot};
use crate::mailbox::{Mailbox, MailboxRx};
use crate::transport::{self, Layers, Transport};
use crate::wheel::Wheel;
use crate::CoreStats;

/// What other threads send to a core.
pub enum CoreMsg {
    /// A connection accepted on another core whose user this core owns.
    Handoff {
        stream: std::net::TcpStream,
        login: Frame,
        rest: BytesMut,
        accepted_at: Instant,
        /// The socket's admission (released when the connection is gone).
        slot: Slot,
        /// TLS / WebSocket state (transport/); `None` for plain TCP.
        io: Option<Box<Layers>>,
    },
    /// Downstream messages from logic.
    Down(Vec<Down>),
    /// The upstream lane lost its link: close its connections.
    LaneDown(usize),
    Shutdown,
}

/// What a core is given at start.
pub struct CoreCtx {
    pub core: u16,
    pub cfg: Arc<GateConfig>,
    pub link: Arc<dyn UpstreamLink>,
    pub peers: Vec<Mailbox<CoreMsg>>,
    /// This core's count of `Down` messages handed over and not applied yet (`GateSink`).
    pub backlog: Arc<std::sync::atomic::AtomicUsize>,
    pub stats: Arc<CoreStats>,
    /// The gate's latency histograms (shared by its cores).
    pub latency: Arc<crate::GateLatency>,
    /// Gate-wide connection counts and per-IP state (limits.rs).
    pub admission: Arc<Admission>,
    /// TLS configurations and WebSocket settings (transport/).
    pub transport: Arc<Transport>,
    /// A task this core runs on its thread (a single node's logic worker, `Gate::start_hosting`).
    pub hosted: Option<im_shared::link::HostedTask>,
    /// Users are placed on cores by their logic worker (`owner_of_vshard`) instead of the
    /// gate's own hash, so that each core holds the users of the worker it hosts.
    pub colocated: bool,
}

/// State of one core, shared by its tasks through `Rc` (single thread, no locks).
pub struct Core {
    pub ctx: CoreCtx,
    pub codec: FrameCodec,
    pub conns: RefCell<FastMap<u32, Rc<Conn>>>,
    next_serial: Cell<u32>,
    started: Instant,
    /// Seconds since the core started, advanced by the ticker.
    pub now: Cell<u32>,
    wheel: RefCell<Wheel>,
    /// Upstream messages waiting for the flusher, per lane.
    pending: RefCell<FastMap<usize, Vec<Up>>>,
    flush_waker: RefCell<Option<Waker>>,
    flush_scheduled: Cell<bool>,
    pub(crate) stopping: Cell<bool>,
    /// Per-user message rates and failed logins of the users this core owns (limits.rs).
    pub limits: RefCell<CoreLimits>,
    /// Transport layers of the logged-in TLS / WebSocket connections, by serial (plain TCP
    /// connections have none and pay nothing).
    pub layered: RefCell<HashMap<u32, transport::Shared>>,
    /// Where plain connections with no partial frame receive (conn.rs `recv_now`).
    pub scratch: RefCell<Vec<u8>>,
    /// The plain connections' sockets (poller.rs).
    pub epoll: crate::poller::Epoll,
    /// Plain connections that stopped reading with bytes left (paused, or their turn used up).
    pub paused: RefCell<Vec<Rc<Conn>>>,
    /// Plain connections with output (or a close) for the sender.
    pub dirty: RefCell<Vec<Rc<Conn>>>,
    pub poller_waker: RefCell<Option<Waker>>,
    pub sender_waker: RefCell<Option<Waker>>,
    /// Requests being timed for the latency histograms: `(conn serial, req_id)` → when the gate
    /// read them and whether it is a login (bounded by [`MAX_TIMED`]).
    timed: RefCell<FastMap<(u32, u32), (Instant, bool)>>,
    /// Sends seen, to time one in [`SEND_SAMPLE`].
    sends: Cell<u32>,
}

/// Requests timed at once per core; past it the table is emptied (answers lost with a closed
/// connection or a restarted logic node would otherwise stay in it).
const MAX_TIMED: usize = 4096;
/// One send in this many is timed (a power of two).
const SEND_SAMPLE: u32 = 16;

/// Binds one `SO_REUSEPORT` listener per core on the configured address (port 0 picks one port
/// for all of them).
pub fn bind_listeners(cfg: &GateConfig) -> std::io::Result<Vec<StdListener>> {
    bind_reuseport(cfg, cfg.listen)
}

/// One `SO_REUSEPORT` listener per core on `addr` (also used for the WebSocket listener).
pub fn bind_reuseport(
    cfg: &GateConfig,
    mut addr: std::net::SocketAddr,
) -> std::io::Result<Vec<StdListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() != 0 {
        // `SO_REUSEPORT` would let this group join the listeners of another process on the same
        // address (another server of the same user), splitting clients between the two. So
        // first bind a socket without it: that fails while anyone listens there.
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        if let Err(e) = probe.bind(&addr.into()) {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{addr} is already in use (another server listening there?): {e}"),
            ));
        }
    }
    let mut out = Vec::new();
    for _ in 0..cfg.cores.max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(cfg.backlog)?;
        let l: StdListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Thread body of one core.
pub fn run_core(
    ctx: CoreCtx,
    listener: StdListener,
    ws_listener: Option<StdListener>,
    rx: MailboxRx<CoreMsg>,
) {
    let entries = ctx.cfg.uring_entries;
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(entries)
        .build()
        .expect("build monoio runtime");
    let core_id = ctx.core;
    let mut ctx = ctx;
    let hosted = ctx.hosted.take();
    rt.block_on(async move {
        if let Some(task) = hosted {
            monoio::spawn(task());
        }
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(core = core_id, "listener: {e}");
                return;
            }
        };
        let core = Core::new(ctx);
        tracing::info!(
            core = core_id,
            uring = monoio::utils::detect_uring(),
            "gate core up"
        );
        monoio::spawn(ticker(core.clone()));
        monoio::spawn(flusher(core.clone()));
        monoio::spawn(crate::poller::poller(core.clone()));
        monoio::spawn(crate::poller::sender(core.clone()));
        let acceptor = monoio::spawn(accept_loop(core.clone(), listener, false));
        // The WebSocket listener (transport/): same admission, same pre-login path.
        let ws_acceptor = ws_listener.and_then(|l| match TcpListener::from_std(l) {
            Ok(l) => Some(monoio::spawn(accept_loop(core.clone(), l, true))),
            Err(e) => {
                tracing::error!(core = core_id, "websocket listener: {e}");
                None
            }
        });
        mailbox_loop(core.clone(), rx).await;
        core.stopping.set(true);
        drop(acceptor);
        drop(ws_acceptor);
        let conns: Vec<_> = core.conns.borrow().values().cloned().collect();
        for c in conns {
            c.hard_close();
        }
    });
}

/// Accepts on the TCP listener, or on the WebSocket listener (`ws`).
async fn accept_loop(core: Rc<Core>, listener: TcpListener, ws: bool) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if core.stopping.get() {
                    return;
                }
                core.ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
                // Gate cap, per-IP cap and rate: a refused socket is closed right here (with an
                // Error frame only where the client speaks bare protocol v1).
                let plain = !ws && core.ctx.cfg.tcp_tls.is_none();
                let Some(slot) = core.admit_socket(&stream, peer, plain) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                monoio::spawn(pre_login(core.clone(), stream, slot, ws));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(core = core.ctx.core, "accept: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the first frame (which must be a login) under the login deadline, then hands the
/// connection to the core that owns the user.
async fn pre_login(core: Rc<Core>, mut stream: TcpStream, slot: Slot, ws: bool) {
    let accepted_at = Instant::now();
    // TLS and/or WebSocket layers; the handshakes happen in the reads below, under the deadline.
    let mut io = match core.ctx.transport.layers(ws) {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!("tls session: {e}");
            return;
        }
    };
    let deadline = core.ctx.cfg.login_timeout;
    let first =
        monoio::time::timeout(deadline, read_first_frame(&core, &mut stream, &mut io)).await;
    let (frame, rest) = match first {
        Err(_) => {
            core.ctx
                .stats
                .closed_timeout
                .fetch_add(1, Ordering::Relaxed);
            reject(
                stream,
                io,
                0,
                ErrorCode::LoginTimeout,
                "no login within deadline",
            )
            .await;
            return;
        }
        Ok(Err(FirstFrameError::Closed)) => return,
        Ok(Err(FirstFrameError::Refused {
            req_id,
            code,
            message,
        })) => {
            core.ctx
                .stats
                .closed_protocol_error
                .fetch_add(1, Ordering::Relaxed);
            reject(stream, io, req_id, code, &message).await;
            return;
        }
        Ok(Ok(v)) => v,
    };
    let uid = peek_login_uid(&frame.body).unwrap_or(UserId(0));
    if uid.0 == 0 {
        core.ctx
            .stats
            .closed_protocol_error
            .fetch_add(1, Ordering::Relaxed);
        reject(
            stream,
            io,
            frame.req_id,
            ErrorCode::Malformed,
            "login without user id",
        )
        .await;
        return;
    }
    let owner = core.core_of(uid);
    if owner == core.ctx.core as usize {
        core.adopt(stream, frame, rest, accepted_at, slot, io);
        return;
    }
    // Hand the socket to its owner core. `into_raw_fd` needs no operation in flight, which
    // holds here: the read above completed.
    let fd = stream.into_raw_fd();
    // SAFETY: `fd` was just released by monoio and is owned by nobody else.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    core.ctx.stats.handoffs.fetch_add(1, Ordering::Relaxed);
    let msg = CoreMsg::Handoff {
        stream: std_stream,
        login: frame,
        rest,
        accepted_at,
        slot,
        io,
    };
    if core.ctx.peers[owner].send(msg).is_err() {
        tracing::warn!(owner, "hand-off target core is gone");
    }
}

/// Why a connection that is not logged in gave no login frame.
enum FirstFrameError {
    /// The client closed the connection, or a read or write failed: nothing to answer.
    Closed,
    /// The client sent what it may not before logging in: answer `Error { code, message }` to
    /// `req_id`, then close.
    Refused {
        req_id: u32,
        code: ErrorCode,
        message: String,
    },
}

async fn read_first_frame(
    core: &Core,
    stream: &mut TcpStream,
    io: &mut Option<Box<Layers>>,
) -> Result<(Frame, BytesMut), FirstFrameError> {
    let mut buf = BytesMut::with_capacity(256);
    // Before login, the body limit is `max_login_body` (never above `max_body`).
    let cfg = &core.ctx.cfg;
    let codec = FrameCodec::new(cfg.max_login_body.min(cfg.max_body));
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(f)) if f.cmd == Cmd::Login => return Ok((f, buf)),
            Ok(Some(f)) if f.cmd == Cmd::Heartbeat => {
                let ack = Command::HeartbeatAck {
                    server_time_ms: crate::conn::unix_ms(),
                }
                .to_bytes(f.req_id);
                if !transport::write_frame(stream, io, ack).await {
                    return Err(FirstFrameError::Closed);
                }
                continue;
            }
            Ok(Some(f)) if f.cmd.is_client_cmd() => {
                return Err(FirstFrameError::Refused {
                    req_id: f.req_id,
                    code: ErrorCode::NotLoggedIn,
                    message: "log in first".into(),
                })
            }
            Ok(Some(f)) => {
                return Err(FirstFrameError::Refused {
                    req_id: f.req_id,
                    code: ErrorCode::UnknownCommand,
                    message: "not a client command".into(),
                })
            }
            Ok(None) => {}
            Err(e) => {
                return Err(FirstFrameError::Refused {
                    req_id: 0,
                    code: e.code(),
                    message: e.to_string(),
                })
            }
        }
        if buf.capacity() - buf.len() < 64 {
            buf.reserve(256);
        }
        if buf.is_empty() && buf.capacity() > 512 {
            buf = BytesMut::with_capacity(256);
        }
        // One read (through the TLS / WebSocket layers, if any) into the spare capacity.
        if !transport::read_more(core, stream, io, &mut buf).await {
            return Err(FirstFrameError::Closed);
        }
    }
}

/// Writes one error frame and closes.
async fn reject(
    mut stream: TcpStream,
    mut io: Option<Box<Layers>>,
    req_id: u32,
    code: ErrorCode,
    message: &str,
) {
    let bytes = Command::Error {
        code,
        message: message.to_owned(),
    }
    .to_bytes(req_id);
    transport::write_last(&mut stream, &mut io, bytes).await;
}

async fn mailbox_loop(core: Rc<Core>, rx: MailboxRx<CoreMsg>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            CoreMsg::Handoff {
                stream,
                login,
                rest,
                accepted_at,
                slot,
                io,
            } => match TcpStream::from_std(stream) {
                Ok(s) => core.adopt(s, login, rest, accepted_at, slot, io),
                Err(e) => tracing::warn!("adopting handed-off socket: {e}"),
            },
            CoreMsg::Down(batch) => {
                let n = batch.len();
                for d in batch {
                    core.apply_down(d);
                }
                core.ctx.backlog.fetch_sub(n, Ordering::AcqRel);
            }
            CoreMsg::LaneDown(lane) => {
                let conns: Vec<_> = core
                    .conns
                    .borrow()
                    .values()
                    .filter(|c| usize::from(c.lane) == lane)
                    .cloned()
                    .collect();
                for c in conns {
                    c.close_with(
                        &core,
                        0,
                        ErrorCode::Unavailable,
                        "logic link lost, reconnect",
                    );
                }
            }
            CoreMsg::Shutdown => return,
        }
    }
}

/// Advances the timer wheel once a second and closes connections past their deadline.
async fn ticker(core: Rc<Core>) {
    loop {
        monoio::time::sleep(Duration::from_millis(250)).await;
        let now = core.started.elapsed().as_secs() as u32;
        if now == core.now.get() {
            continue;
        }
        core.now.set(now);
        core.sweep_limits(now);
        let mut due = Vec::new();
        core.wheel.borrow_mut().advance(now, |k| due.push(k));
        for key in due {
            let (serial, gen) = ((key >> 32) as u32, key as u32);
            let Some(c) = core.conns.borrow().get(&serial).cloned() else {
                continue;
            };
            if c.wheel_gen.get() != gen {
                continue; // superseded by a later filing
            }
            if let Some(next) = c.check_deadline(&core, now) {
                core.file(&c, next);
            }
        }
    }
}

/// Sends the upstream messages queued during one scheduling round, one batch per lane.
async fn flusher(core: Rc<Core>) {
    loop {
        std::future::poll_fn(|cx| {
            if core.flush_scheduled.get() {
                std::task::Poll::Ready(())
            } else {
                *core.flush_waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await;
        core.flush_scheduled.set(false);
        let pending = std::mem::take(&mut *core.pending.borrow_mut());
        for (lane, batch) in pending {
            core.ctx.link.send(lane, batch);
        }
    }
}

/// A core that is not running, for unit tests.
#[cfg(test)]
pub fn test_core() -> Rc<Core> {
    test_core_of(1, false)
}

/// A core that is not running, of a gate with `cores` cores.
#[cfg(test)]
pub fn test_core_of(cores: usize, colocated: bool) -> Rc<Core> {
    struct NoLink;
    impl UpstreamLink for NoLink {
        fn lane_of(&self, _: UserId) -> usize {
            0
        }
        fn admit(&self, _: usize, _: usize) -> Result<(), ErrorCode> {
            Ok(())
        }
        fn send(&self, _: usize, _: Vec<Up>) {}
    }
    Core::new(CoreCtx {
        core: 0,
        cfg: Arc::new(GateConfig::default()),
        link: Arc::new(NoLink),
        peers: (0..cores).map(|_| crate::mailbox::mailbox().0).collect(),
        backlog: Arc::default(),
        stats: Arc::new(CoreStats::default()),
        latency: Arc::default(),
        admission: Admission::new(Default::default()),
        transport: Arc::new(Transport::new(&GateConfig::default()).expect("plain transport")),
        hosted: None,
        colocated,
    })
}

impl Core {
    fn new(ctx: CoreCtx) -> Rc<Core> {
        Rc::new(Core {
            codec: FrameCodec::new(ctx.cfg.max_body),
            ctx,
            conns: RefCell::new(FastMap::default()),
            next_serial: Cell::new(1),
            started: Instant::now(),
            now: Cell::new(0),
            wheel: RefCell::new(Wheel::new(0)),
            pending: RefCell::new(FastMap::default()),
            flush_waker: RefCell::new(None),
            flush_scheduled: Cell::new(false),
            stopping: Cell::new(false),
            limits: RefCell::new(CoreLimits::default()),
            layered: RefCell::new(HashMap::new()),
            scratch: RefCell::new(Vec::new()),
            epoll: crate::poller::Epoll::new().expect("epoll_create1"),
            paused: RefCell::new(Vec::new()),
            dirty: RefCell::new(Vec::new()),
            poller_waker: RefCell::new(None),
            sender_waker: RefCell::new(None),
            timed: RefCell::default(),
            sends: Cell::new(0),
        })
    }

    /// The core that holds `uid`'s connections.
    pub fn core_of(&self, uid: UserId) -> usize {
        let cores = self.ctx.peers.len();
        if self.ctx.colocated {
            shard::owner_of_vshard(shard::vshard_of(uid), cores)
        } else {
            shard::core_of(uid, cores)
        }
    }

    fn now_secs(&self) -> u32 {
        self.now.get()
    }

    /// Files `c` in the timer wheel to be checked at second `at`, superseding earlier filings.
    pub fn file(&self, c: &Conn, at: u32) {
        let gen = c.wheel_gen.get().wrapping_add(1);
        c.wheel_gen.set(gen);
        let key = (u64::from(c.id.serial()) << 32) | u64::from(gen);
        self.wheel.borrow_mut().insert(key, at);
    }

    /// Whether `lane` takes new client work, counting what this core holds for it unsent.
    pub fn admit_up(&self, lane: usize) -> Result<(), ErrorCode> {
        let unsent = self.pending.borrow().get(&lane).map_or(0, Vec::len);
        self.ctx.link.admit(lane, unsent)
    }

    /// Queues an upstream message; the flusher sends it after the current round of tasks.
    pub fn push_up(&self, lane: usize, up: Up) {
        self.pending.borrow_mut().entry(lane).or_default().push(up);
        if !self.flush_scheduled.replace(true) {
            if let Some(w) = self.flush_waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Registers a connection whose login frame was read, forwards the login to logic and
    /// starts its tasks.
    fn adopt(
        self: &Rc<Self>,
        stream: TcpStream,
        login: Frame,
        rest: BytesMut,
        accepted: Instant,
        slot: Slot,
        io: Option<Box<Layers>>,
    ) {
        // Serials wrap after 2^32 connections: skip any still in use.
        let mut serial = self.next_serial.get();
        while self.conns.borrow().contains_key(&serial) {
            serial = serial.wrapping_add(1).max(1);
        }
        self.next_serial.set(serial.wrapping_add(1).max(1));
        let id = ConnId::new(self.ctx.cfg.gate_id, self.ctx.core, serial);
        let uid = peek_login_uid(&login.body).unwrap_or(UserId(0));
        let lane = self.ctx.link.lane_of(uid);
        let elapsed = accepted.elapsed().as_secs() as u32;
        let accepted_at = self.now_secs().saturating_sub(elapsed);
        let fd = stream.as_raw_fd();
        let c = Rc::new(Conn::new(id, fd, uid, lane, accepted_at));
        // A plain TCP socket leaves monoio (no operation is in flight: the login read completed)
        // for the core's epoll set; a layered one keeps its reader and writer tasks.
        let stream = match io {
            None => {
                // SAFETY: the descriptor was just released by monoio and is owned by nobody else.
                c.set_sock(unsafe { std::os::fd::OwnedFd::from_raw_fd(stream.into_raw_fd()) });
                None
            }
            Some(io) => {
                c.set_layered();
                Some((stream, io))
            }
        };
        let _ = c.slot.set(slot);
        self.conns.borrow_mut().insert(serial, c.clone());
        self.ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.ctx.stats.sockets.fetch_add(1, Ordering::Relaxed);
        self.file(
            &c,
            accepted_at + self.ctx.cfg.login_timeout.as_secs() as u32,
        );
        if self.refuse_login(&c, login.req_id) {
            // failed-login back-off (limits.rs): answered and closing
        } else if let Err(code) = self.admit_up(lane) {
            self.ctx.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            c.close_with(
                self,
                login.req_id,
                code,
                "logic busy or unreachable, retry later",
            );
        } else {
            c.login_sent.set(true);
            self.time_request(id.serial(), login.req_id, true);
            self.push_up(
                lane,
                Up::Frame {
                    conn: id,
                    uid,
                    cmd: Cmd::Login,
                    req_id: login.req_id,
                    body: login.body,
                },
            );
        }
        match stream {
            None => {
                if !rest.is_empty() {
                    c.rbuf.set(Some(Box::new(rest)));
                }
                if let Err(e) = self.epoll.add(fd, serial) {
                    tracing::warn!(conn = id.0, "epoll: {e}");
                    c.hard_close();
                    crate::poller::mark_dirty(self, &c);
                } else {
                    // Frames that came with the login, and whatever arrived since.
                    crate::poller::read_ready(self, &c);
                }
            }
            Some((stream, io)) => {
                monoio::spawn(conn::run_layered(self.clone(), c, stream, rest, io));
            }
        }
    }

    fn apply_down(&self, d: Down) {
        if let Down::SendMany { conns, data } = &d {
            // A large group's post: the same frames to each connection still open here.
            for conn in conns {
                let c = self.conns.borrow().get(&conn.serial()).cloned();
                if let Some(c) = c.filter(|c| c.id == *conn) {
                    c.enqueue(self, data.clone());
                }
            }
            return;
        }
        let conn = d.conn();
        let Some(c) = self.conns.borrow().get(&conn.serial()).cloned() else {
            return; // already closed
        };
        if c.id != conn {
            return;
        }
        match d {
            Down::Send { data, .. } => {
                c.answered(&data);
                self.answers_timed(conn.serial(), &data);
                c.enqueue(self, data);
            }
            Down::Bind { uid, data, .. } => {
                self.answers_timed(conn.serial(), &data);
                if uid == c.uid.get() && !c.logged_in.get() {
                    c.logged_in.set(true);
                    c.last_active.set(self.now_secs());
                    self.ctx.stats.logged_in.fetch_add(1, Ordering::Relaxed);
                    self.on_bound(uid);
                    let idle = self.ctx.cfg.idle_timeout.as_secs() as u32;
                    self.file(&c, self.now_secs() + idle);
                }
                c.enqueue(self, data);
            }
            Down::Close { data, .. } => {
                self.answers_timed(conn.serial(), &data);
                self.on_login_closed(&c, &data);
                c.enqueue(self, data);
                c.close_after_flush(self);
            }
            Down::SendMany { .. } => {} // applied above
        }
    }

    /// Starts timing a request the gate forwards to logic: every login, one send in
    /// [`SEND_SAMPLE`].
    pub(crate) fn time_request(&self, serial: u32, req_id: u32, login: bool) {
        if !login {
            let n = self.sends.get().wrapping_add(1);
            self.sends.set(n);
            if n & (SEND_SAMPLE - 1) != 0 {
                return;
            }
        }
        let mut t = self.timed.borrow_mut();
        if t.len() >= MAX_TIMED {
            t.clear();
        }
        t.insert((serial, req_id), (Instant::now(), login));
    }

    /// Observes the timed requests that the frames in `data` answer (`SendAck`, `LoginResult`,
    /// or an `Error` with their req_id).
    fn answers_timed(&self, serial: u32, data: &[u8]) {
        if self.timed.borrow().is_empty() {
            return;
        }
        let mut at = 0;
        while let Some(h) = data.get(at..at + im_shared::HEADER_LEN) {
            let req_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            at += im_shared::HEADER_LEN + u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
            let answer = matches!(
                Cmd::from_u8(h[3]),
                Some(Cmd::SendAck | Cmd::LoginResult | Cmd::Error)
            );
            if !answer || req_id == 0 {
                continue;
            }
            if let Some((t, login)) = self.timed.borrow_mut().remove(&(serial, req_id)) {
                let h = if login {
                    &self.ctx.latency.login
                } else {
                    &self.ctx.latency.send_ack
                };
                h.observe(t.elapsed());
            }
        }
    }

    /// Called by a connection's reader when it ends.
    pub fn forget(&self, c: &Rc<Conn>) {
        if self.conns.borrow_mut().remove(&c.id.serial()).is_some() {
            self.ctx.stats.connections.fetch_sub(1, Ordering::Relaxed);
            if c.logged_in.get() {
                self.ctx.stats.logged_in.fetch_sub(1, Ordering::Relaxed);
                self.on_unbound(c.uid.get());
            }
            if c.login_sent.get() {
                self.push_up(
                    usize::from(c.lane),
                    Up::Closed {
                        conn: c.id,
                        uid: c.uid.get(),
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second server on an address in use must fail, not share the port through
    /// `SO_REUSEPORT` (issue 19); the same process's own group still binds every core.
    #[test]
    fn an_address_in_use_is_refused_not_shared() {
        let cfg = GateConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cores: 3,
            ..GateConfig::default()
        };
        let first = bind_listeners(&cfg).unwrap();
        assert_eq!(first.len(), 3);
        let addr = first[0].local_addr().unwrap();
        assert!(first.iter().all(|l| l.local_addr().unwrap() == addr));
        let again = GateConfig {
            listen: addr,
            ..cfg.clone()
        };
        let e = bind_listeners(&again).expect_err("a second group on a port in use");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("already in use"), "{e}");
        // A plain listener of someone else counts too.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = GateConfig {
            listen: other.local_addr().unwrap(),
            ..cfg.clone()
        };
        assert!(bind_listeners(&taken).is_err());
        // Once the first group is gone the port is free again.
        drop(first);
        assert_eq!(bind_listeners(&again).unwrap().len(), 3);
    }

    /// Thread per core: a core hosting logic worker `i` must hold the connections of worker
    /// `i`'s users, i.e. place users as a single node's router places them on workers
    /// (`owner_of_vshard` over the virtual shards); otherwise the gate's own hash.
    #[test]
    fn a_colocated_core_places_users_by_their_logic_worker() {
        for cores in [1, 2, 3, 8] {
            let (own, colo) = (test_core_of(cores, false), test_core_of(cores, true));
            let mut differ = 0;
            for u in 1..5_000u64 {
                let uid = UserId(u);
                assert_eq!(
                    colo.core_of(uid),
                    shard::owner_of_vshard(shard::vshard_of(uid), cores)
                );
                assert_eq!(own.core_of(uid), shard::core_of(uid, cores));
                differ += usize::from(colo.core_of(uid) != own.core_of(uid));
            }
            assert_eq!(differ > 0, cores > 1, "{cores} cores");
        }
    }
}
