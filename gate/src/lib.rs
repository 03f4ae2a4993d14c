//! `im-gate` owns the access layer: client TCP connections on a thread-per-core monoio runtime
//! (io_uring, with the legacy epoll driver where io_uring is missing).
//!
//! Every core has its own `SO_REUSEPORT` listener. A connection is accepted by any core, must
//! send its login frame within the login deadline, and is then handed (its fd, over a crossbeam
//! mailbox) to the core that owns `hash(uid) % cores`, so all devices of one user on this gate live
//! on one core and no lock is needed. The gate reads frame headers only: it answers heartbeats,
//! enforces limits (login deadline, max frame size, idle timeout, bounded write queue, and the
//! attack protection of [`Limits`]: connection caps and rates, failed-login back-off, per-user
//! message rate; docs/SECURITY.md) and forwards bodies undecoded ([`bytes::Bytes`], no copy) to logic over an [`UpstreamLink`]; logic's
//! downstream messages arrive through [`GateSink`] and are written as they are.
//!
//! Either listener may speak TLS, and a second listener carries the same frames in WebSocket
//! binary messages (and serves the web page's static files): sans-io layers over the same
//! sockets, tasks and hand-off (`transport/`).
//!
//! See `docs/ARCHITECTURE.md` for the picture.

mod config;
mod conn;
mod core;
mod limits;
pub mod links;
mod mailbox;
mod poller;
#[doc(hidden)]
pub mod transport; // public for the fuzz targets (sans-io WebSocket and HTTP parsers)
mod wheel;

pub use config::GateConfig;
pub use limits::Limits;
pub use mailbox::{mailbox, Mailbox, MailboxRx};
pub use transport::TlsFiles;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use im_shared::link::HostedTask;
use im_shared::link::{Down, DownstreamSink, UpstreamLink};

use crate::core::CoreMsg;

/// Declares every counter of the gate once: its field, its metric kind, name and help. From this
/// list come [`CoreStats`] (one per core, atomics written by that core only), [`GateStats`] (a
/// snapshot summed over the cores) and the Prometheus text of [`StatsHandle::render`].
macro_rules! gate_counters {
    ($($field:ident: $kind:literal $metric:literal $help:literal,)*) => {
        /// Counters of one core, summed by [`GateHandle::stats`]. Written by one thread only.
        #[derive(Debug, Default)]
        pub struct CoreStats {
            $(#[doc = $help] pub $field: AtomicU64,)*
        }

        /// A snapshot of all cores' counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct GateStats {
            $(#[doc = $help] pub $field: u64,)*
        }

        impl GateStats {
            fn add(&mut self, c: &CoreStats) {
                $(self.$field += c.$field.load(Ordering::Relaxed);)*
            }

            /// `(metric name, kind, help, value)` of every counter, in declaration order.
            fn metrics(&self) -> [(&'static str, &'static str, &'static str, u64); COUNTERS] {
                [$(($metric, $kind, $help, self.$field),)*]
            }
        }

        const COUNTERS: usize = [$($metric),*].len();
    };
}

gate_counters! {
    connections: "gauge" "im_gate_connections"
        "Open client connections (registered on a core: logged in or waiting for the login result).",
    logged_in: "gauge" "im_gate_logged_in" "Logged-in client connections.",
    sockets: "gauge" "im_gate_sockets"
        "Sockets held by the gate (their tasks still run; includes connections still closing).",
    accepted: "counter" "im_gate_accepted_total" "Connections accepted.",
    frames_in: "counter" "im_gate_frames_in_total" "Client frames read.",
    frames_out: "counter" "im_gate_frames_out_total" "Frames written to clients.",
    closed_protocol_error: "counter" "im_gate_closed_protocol_error_total"
        "Connections closed for a protocol error.",
    closed_timeout: "counter" "im_gate_closed_timeout_total"
        "Connections closed by a login or idle timeout.",
    closed_slow: "counter" "im_gate_closed_slow_total" "Connections closed as slow consumers.",
    reads_paused: "counter" "im_gate_reads_paused_total"
        "Times a connection's reader paused: max_inflight requests unanswered, or output above the high-water mark.",
    handoffs: "counter" "im_gate_handoffs_total"
        "Logged-in connections handed to the core of their user.",
    overloaded: "counter" "im_gate_overloaded_total" "Requests refused with Overloaded.",
    // Attack protection (limits.rs).
    refused_max_connections: "counter" "im_gate_refused_max_connections_total"
        "Connections refused at accept: gate at max_connections.",
    refused_ip_connections: "counter" "im_gate_refused_ip_connections_total"
        "Connections refused at accept: source address at max_conns_per_ip.",
    refused_ip_rate: "counter" "im_gate_refused_ip_rate_total"
        "Connections refused at accept: source address over conn_rate_per_ip.",
    login_failures: "counter" "im_gate_login_failures_total"
        "Logins refused by logic with BadToken.",
    login_backoff_refused: "counter" "im_gate_login_backoff_refused_total"
        "Logins refused during a failed-login back-off.",
    rate_limited: "counter" "im_gate_rate_limited_total"
        "Frames refused by the per-user message rate.",
    closed_rate_limit: "counter" "im_gate_closed_rate_limit_total"
        "Connections closed for ignoring the per-user message rate.",
}

/// Logic's way into the gate: routes each downstream batch to the mailbox of the core that holds
/// the connection.
pub struct GateSink {
    cores: Vec<Mailbox<CoreMsg>>,
    /// Per core: `Down` messages handed over and not applied yet.
    backlog: Vec<Arc<AtomicUsize>>,
    /// Bound of each core's backlog (`GateConfig::max_down_backlog`).
    max_backlog: usize,
    /// Set when logic workers run on the cores' threads ([`Gate::start_hosting`]): then no
    /// producer may block in `send` (it would stop a core it may share a thread with, or two
    /// cores waiting for each other); they ask [`DownstreamSink::has_room`] and wait
    /// asynchronously instead.
    hosted: AtomicBool,
    /// The gate's latency histograms (its cores and its links observe them).
    pub latency: Arc<GateLatency>,
}

pub use im_shared::link::DOWN_WAIT_MAX;

impl GateSink {
    /// The link of `lane` dropped: every core closes the connections of that lane with the
    /// retryable `Unavailable`, so their clients log in again (and sync) when it is back.
    pub fn lane_down(&self, lane: usize) {
        for m in &self.cores {
            let _ = m.send(CoreMsg::LaneDown(lane));
        }
    }
}

impl DownstreamSink for GateSink {
    /// Hands a batch to its core. While the core has `max_down_backlog` messages not applied
    /// yet, the producer (a logic worker, or a gate link's reader) waits, up to
    /// [`DOWN_WAIT_MAX`]: logic slows down, its queue fills and the gate sheds new requests with
    /// `Overloaded`. A core never waits on a producer, so this cannot close a cycle (hand-offs
    /// between cores are not counted and never wait).
    fn send(&self, _gate: u16, core: u16, batch: Vec<Down>) {
        let (Some(m), Some(b)) = (
            self.cores.get(core as usize),
            self.backlog.get(core as usize),
        ) else {
            return;
        };
        if b.load(Ordering::Acquire) >= self.max_backlog && !self.hosted.load(Ordering::Relaxed) {
            let start = std::time::Instant::now();
            while b.load(Ordering::Acquire) >= self.max_backlog {
                if start.elapsed() >= DOWN_WAIT_MAX {
                    tracing::warn!(
                        core,
                        "gate core applies nothing: handing over past its bound"
                    );
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        let n = batch.len();
        b.fetch_add(n, Ordering::AcqRel);
        // A closed mailbox means the core stopped; its connections are gone.
        if m.send(CoreMsg::Down(batch)).is_err() {
            b.fetch_sub(n, Ordering::AcqRel);
        }
    }

    fn has_room(&self, core: u16) -> bool {
        self.backlog
            .get(core as usize)
            .is_none_or(|b| b.load(Ordering::Acquire) < self.max_backlog)
    }
}

/// A gate before it starts: its sink can be handed to logic first.
pub struct Gate {
    cfg: GateConfig,
    sink: Arc<GateSink>,
    rxs: Vec<MailboxRx<CoreMsg>>,
}

/// The gate's latency histograms, shared by its cores (an observation is two relaxed atomic adds).
#[derive(Debug, Default)]
pub struct GateLatency {
    /// A sample of sends: the frame read → its `SendAck` (or refusal) from logic.
    pub send_ack: im_shared::prom::Histogram,
    /// Every login: `Login` forwarded → its `LoginResult` from logic.
    pub login: im_shared::prom::Histogram,
    /// A gate process's links to logic nodes: `Ping` written → `Pong` read, one every few
    /// seconds per link, busy or idle.
    pub link_rtt: im_shared::prom::Histogram,
}

/// A running gate.
pub struct GateHandle {
    local_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    stats: Vec<Arc<CoreStats>>,
    latency: Arc<GateLatency>,
    sink: Arc<GateSink>,
    threads: Vec<JoinHandle<()>>,
}

impl Gate {
    pub fn new(cfg: GateConfig) -> Gate {
        let cores = cfg.cores.max(1);
        let (txs, rxs) = (0..cores).map(|_| mailbox()).unzip();
        let max_backlog = cfg.max_down_backlog.max(1);
        Gate {
            cfg,
            sink: Arc::new(GateSink {
                backlog: (0..cores).map(|_| Arc::default()).collect(),
                max_backlog,
                cores: txs,
                hosted: AtomicBool::new(false),
                latency: Arc::default(),
            }),
            rxs,
        }
    }

    /// The sink logic writes to.
    pub fn sink(&self) -> Arc<GateSink> {
        self.sink.clone()
    }

    /// Binds the listeners and starts one thread per core.
    pub fn start(self, link: Arc<dyn UpstreamLink>) -> std::io::Result<GateHandle> {
        self.start_inner(link, Vec::new())
    }

    /// Like [`Gate::start`], and core `i` also runs `tasks[i]` on its thread (thread per core:
    /// a single node's logic worker `i` beside the connections of core `i`). A user's
    /// connections then go to the core whose index is the user's logic worker
    /// (`owner_of_vshard(vshard_of(uid), cores)`), so a request and its answers never cross a
    /// thread when sender and worker share a core, and a hand-over between a core and its
    /// worker is a local wake-up instead of a thread wake-up. `tasks` must be empty or hold one
    /// task per core.
    pub fn start_hosting(
        self,
        link: Arc<dyn UpstreamLink>,
        tasks: Vec<HostedTask>,
    ) -> std::io::Result<GateHandle> {
        if !tasks.is_empty() && tasks.len() != self.cfg.cores.max(1) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} hosted tasks for {} gate cores",
                    tasks.len(),
                    self.cfg.cores.max(1)
                ),
            ));
        }
        self.sink.hosted.store(!tasks.is_empty(), Ordering::Relaxed);
        self.start_inner(link, tasks)
    }

    fn start_inner(
        self,
        link: Arc<dyn UpstreamLink>,
        tasks: Vec<HostedTask>,
    ) -> std::io::Result<GateHandle> {
        let colocated = !tasks.is_empty();
        let mut tasks = tasks.into_iter();
        let listeners = core::bind_listeners(&self.cfg)?;
        let local_addr = listeners[0].local_addr()?;
        // TLS certificates and the web root are checked here, before any thread starts.
        let transport = Arc::new(transport::Transport::new(&self.cfg)?);
        let mut ws_listeners = match self.cfg.ws_listen {
            Some(a) => core::bind_reuseport(&self.cfg, a)?,
            None => Vec::new(),
        };
        let ws_addr = ws_listeners.first().map(|l| l.local_addr()).transpose()?;
        let cfg = Arc::new(self.cfg);
        let admission = limits::Admission::new(cfg.limits.clone());
        let mut stats = Vec::new();
        let latency = self.sink.latency.clone();
        let mut threads = Vec::new();
        for (i, (listener, rx)) in listeners.into_iter().zip(self.rxs).enumerate() {
            let st = Arc::new(CoreStats::default());
            stats.push(st.clone());
            let ctx = core::CoreCtx {
                core: i as u16,
                cfg: cfg.clone(),
                link: link.clone(),
                peers: self.sink.cores.clone(),
                backlog: self.sink.backlog[i].clone(),
                stats: st,
                latency: latency.clone(),
                admission: admission.clone(),
                transport: transport.clone(),
                hosted: tasks.next(),
                colocated,
            };
            let ws = ws_listeners.pop();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("gate-{i}"))
                    .spawn(move || core::run_core(ctx, listener, ws, rx))?,
            );
        }
        Ok(GateHandle {
            local_addr,
            ws_addr,
            stats,
            latency,
            sink: self.sink,
            threads,
        })
    }
}

/// Loads what [`Gate::start`] would for the transports (TLS certificates and keys, the web root),
/// so that a bad path fails before anything else is started.
pub fn check_transport(cfg: &GateConfig) -> std::io::Result<()> {
    transport::Transport::new(cfg).map(drop)
}

/// Reads the per-core counters of a gate.
#[derive(Clone)]
pub struct StatsHandle {
    cores: Vec<Arc<CoreStats>>,
    latency: Arc<GateLatency>,
    /// The cores' mailboxes (downstream batches from logic, hand-offs), for their depth.
    mailboxes: Vec<Mailbox<CoreMsg>>,
    /// The cores' `Down` backlogs.
    backlog: Vec<Arc<AtomicUsize>>,
}

impl StatsHandle {
    /// Sum over the cores.
    pub fn snapshot(&self) -> GateStats {
        let mut s = GateStats::default();
        for c in &self.cores {
            s.add(c);
        }
        s
    }

    /// Appends the counters in the Prometheus text format (`im_gate_*`).
    pub fn render(&self, out: &mut String) {
        for (name, kind, help, v) in self.snapshot().metrics() {
            im_shared::prom::metric(out, name, kind, help, v);
        }
        self.latency.send_ack.render(
            out,
            "im_gate_send_ack_seconds",
            "A sample (one in 16) of SendC2c/SendC2g from the gate reading the frame to the gate getting its SendAck or refusal from logic: the server's share of a send's latency.",
        );
        self.latency.login.render(
            out,
            "im_gate_login_seconds",
            "Logins from the gate forwarding the Login to the gate getting its LoginResult from logic (token check, session, kickout).",
        );
        self.latency.link_rtt.render(
            out,
            "im_gate_link_rtt_seconds",
            "Round trips of a gate process's links to logic nodes (Ping written to Pong read; one every 5 s per link, busy or idle; none in a single node).",
        );
        im_shared::prom::labeled(
            out,
            "im_gate_core_mailbox",
            "gauge",
            "Messages waiting for a gate core: downstream batches from logic and hand-offs.",
            "core",
            self.mailboxes.iter().map(|m| m.len() as u64).enumerate(),
        );
        im_shared::prom::labeled(
            out,
            "im_gate_down_backlog",
            "gauge",
            "Downstream messages handed to a gate core and not applied yet (bound: max_down_backlog).",
            "core",
            self.backlog
                .iter()
                .map(|b| b.load(Ordering::Relaxed) as u64)
                .enumerate(),
        );
    }
}

impl GateHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Address of the WebSocket listener, if one is configured.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    pub fn stats(&self) -> GateStats {
        self.stats_handle().snapshot()
    }

    /// A cheap handle that reads the counters later (e.g. from the metrics endpoint).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            cores: self.stats.clone(),
            latency: self.latency.clone(),
            mailboxes: self.sink.cores.clone(),
            backlog: self.sink.backlog.clone(),
        }
    }

    /// Stops every core: listeners close, connections are dropped.
    pub fn shutdown(self) {
        for m in &self.sink.cores {
            let _ = m.send(CoreMsg::Shutdown);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn every_counter_is_rendered_once_as_the_sum_over_the_cores() {
        let cores = vec![
            Arc::new(CoreStats::default()),
            Arc::new(CoreStats::default()),
        ];
        cores[0].closed_slow.store(2, Ordering::Relaxed);
        cores[1].closed_slow.store(3, Ordering::Relaxed);
        cores[1].handoffs.store(7, Ordering::Relaxed);
        let (m0, _rx0) = mailbox::<CoreMsg>();
        let (m1, _rx1) = mailbox::<CoreMsg>();
        m1.send(CoreMsg::Shutdown).ok();
        m1.send(CoreMsg::Shutdown).ok();
        let h = StatsHandle {
            cores,
            latency: Arc::default(),
            mailboxes: vec![m0, m1],
            backlog: vec![Arc::default(), Arc::new(AtomicUsize::new(3))],
        };
        assert_eq!(h.snapshot().closed_slow, 5);
        let mut out = String::new();
        h.render(&mut out);
        assert!(
            out.contains("\nim_gate_core_mailbox{core=\"0\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("\nim_gate_core_mailbox{core=\"1\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("\nim_gate_down_backlog{core=\"1\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("\nim_gate_closed_slow_total 5\n"), "{out}");
        assert!(out.contains("\nim_gate_handoffs_total 7\n"), "{out}");
        for (name, kind, ..) in GateStats::default().metrics() {
            let samples = out.lines().filter(|l| l.starts_with(&format!("{name} ")));
            assert_eq!(samples.count(), 1, "{name}");
            assert!(out.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
        }
    }

    /// The sink of a one-core gate: the core's mailbox and its backlog counter.
    fn one_core_sink(
        max_backlog: usize,
        hosted: bool,
    ) -> (
        GateSink,
        crate::mailbox::MailboxRx<CoreMsg>,
        Arc<AtomicUsize>,
    ) {
        let (m, rx) = mailbox::<CoreMsg>();
        let backlog = Arc::new(AtomicUsize::new(0));
        let sink = GateSink {
            cores: vec![m],
            backlog: vec![backlog.clone()],
            max_backlog,
            hosted: AtomicBool::new(hosted),
            latency: Arc::default(),
        };
        (sink, rx, backlog)
    }

    fn down() -> Down {
        Down::Send {
            conn: im_shared::ConnId::new(0, 0, 1),
            data: bytes::Bytes::from_static(b"x"),
        }
    }

    /// Issue 14: logic cannot queue without bound into a gate core that does not keep up: at
    /// `max_down_backlog` the producer waits until the core applies what it has.
    #[test]
    fn a_producer_waits_at_the_down_backlog_bound_until_the_core_applies() {
        use im_shared::link::DownstreamSink;
        use std::time::{Duration, Instant};
        let (sink, rx, backlog) = one_core_sink(4, false);
        let sink = Arc::new(sink);
        let sent = Arc::new(AtomicUsize::new(0));
        let producer = {
            let (sink, sent) = (sink.clone(), sent.clone());
            std::thread::spawn(move || {
                for _ in 0..6 {
                    sink.send(0, 0, vec![down()]);
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            sent.load(Ordering::SeqCst),
            4,
            "the producer did not wait at the bound"
        );
        assert_eq!(backlog.load(Ordering::SeqCst), 4);
        // The core applies two batches (what core.rs does after applying one).
        for _ in 0..2 {
            assert!(rx.try_recv().is_some());
            backlog.fetch_sub(1, Ordering::SeqCst);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.load(Ordering::SeqCst) < 6 {
            assert!(Instant::now() < deadline, "the producer never went on");
            std::thread::sleep(Duration::from_millis(5));
        }
        producer.join().unwrap();
        assert_eq!(backlog.load(Ordering::SeqCst), 4);
    }

    /// With logic workers on the cores' threads, a producer must never block in `send` (it
    /// could be the thread of the core it waits for): it is told there is no room instead.
    #[test]
    fn a_hosted_producer_is_told_at_the_bound_and_never_blocks() {
        use im_shared::link::DownstreamSink;
        let (sink, rx, backlog) = one_core_sink(2, true);
        assert!(sink.has_room(0));
        sink.send(0, 0, vec![down()]);
        sink.send(0, 0, vec![down()]);
        assert!(!sink.has_room(0), "a full core reports no room");
        // Past the bound `send` hands over at once (this thread would hang otherwise).
        sink.send(0, 0, vec![down()]);
        assert_eq!(backlog.load(Ordering::SeqCst), 3);
        for _ in 0..2 {
            assert!(rx.try_recv().is_some());
            backlog.fetch_sub(1, Ordering::SeqCst);
        }
        assert!(sink.has_room(0));
        assert!(
            sink.has_room(7),
            "an unknown core never makes a producer wait"
        );
    }
}
