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
#[doc(hidden)]
pub mod transport; // public for the fuzz targets (sans-io WebSocket and HTTP parsers)
mod wheel;

pub use config::GateConfig;
pub use limits::Limits;
pub use mailbox::{mailbox, Mailbox, MailboxRx};
pub use transport::TlsFiles;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use im_shared::link::{Down, DownstreamSink, UpstreamLink};

use crate::core::CoreMsg;

/// Counters of one core, summed by [`GateHandle::stats`]. Written by one thread only.
#[derive(Debug, Default)]
pub struct CoreStats {
    pub accepted: AtomicU64,
    /// Connections registered on the core (logged in or waiting for the login result).
    pub connections: AtomicU64,
    /// Sockets whose tasks are still running (includes connections still closing).
    pub sockets: AtomicU64,
    pub logged_in: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub closed_protocol_error: AtomicU64,
    pub closed_timeout: AtomicU64,
    pub closed_slow: AtomicU64,
    pub handoffs: AtomicU64,
    pub overloaded: AtomicU64,
    // Attack protection (limits.rs).
    pub refused_max_connections: AtomicU64,
    pub refused_ip_connections: AtomicU64,
    pub refused_ip_rate: AtomicU64,
    pub login_failures: AtomicU64,
    pub login_backoff_refused: AtomicU64,
    pub rate_limited: AtomicU64,
    pub closed_rate_limit: AtomicU64,
}

/// A snapshot of all cores' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateStats {
    pub accepted: u64,
    pub connections: u64,
    pub sockets: u64,
    pub logged_in: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub closed_protocol_error: u64,
    pub closed_timeout: u64,
    pub closed_slow: u64,
    pub handoffs: u64,
    pub overloaded: u64,
    /// Connections refused at accept: the gate held `max_connections` sockets.
    pub refused_max_connections: u64,
    /// Connections refused at accept: their address held `max_conns_per_ip` sockets.
    pub refused_ip_connections: u64,
    /// Connections refused at accept: their address connected faster than `conn_rate_per_ip`.
    pub refused_ip_rate: u64,
    /// Logins logic refused with `BadToken`.
    pub login_failures: u64,
    /// Logins refused by the gate during a failed-login back-off.
    pub login_backoff_refused: u64,
    /// Frames refused by the per-user message rate.
    pub rate_limited: u64,
    /// Connections closed for ignoring the message rate.
    pub closed_rate_limit: u64,
}

/// Logic's way into the gate: routes each downstream batch to the mailbox of the core that holds
/// the connection.
pub struct GateSink {
    cores: Vec<Mailbox<CoreMsg>>,
}

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
    fn send(&self, _gate: u16, core: u16, batch: Vec<Down>) {
        if let Some(m) = self.cores.get(core as usize) {
            // A closed mailbox means the core stopped; its connections are gone.
            let _ = m.send(CoreMsg::Down(batch));
        }
    }
}

/// A gate before it starts: its sink can be handed to logic first.
pub struct Gate {
    cfg: GateConfig,
    sink: Arc<GateSink>,
    rxs: Vec<MailboxRx<CoreMsg>>,
}

/// A running gate.
pub struct GateHandle {
    local_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    stats: Vec<Arc<CoreStats>>,
    sink: Arc<GateSink>,
    threads: Vec<JoinHandle<()>>,
}

impl Gate {
    pub fn new(cfg: GateConfig) -> Gate {
        let cores = cfg.cores.max(1);
        let (txs, rxs) = (0..cores).map(|_| mailbox()).unzip();
        Gate {
            cfg,
            sink: Arc::new(GateSink { cores: txs }),
            rxs,
        }
    }

    /// The sink logic writes to.
    pub fn sink(&self) -> Arc<GateSink> {
        self.sink.clone()
    }

    /// Binds the listeners and starts one thread per core.
    pub fn start(self, link: Arc<dyn UpstreamLink>) -> std::io::Result<GateHandle> {
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
        let mut threads = Vec::new();
        for (i, (listener, rx)) in listeners.into_iter().zip(self.rxs).enumerate() {
            let st = Arc::new(CoreStats::default());
            stats.push(st.clone());
            let ctx = core::CoreCtx {
                core: i as u16,
                cfg: cfg.clone(),
                link: link.clone(),
                peers: self.sink.cores.clone(),
                stats: st,
                admission: admission.clone(),
                transport: transport.clone(),
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
}

impl StatsHandle {
    /// Sum over the cores.
    pub fn snapshot(&self) -> GateStats {
        let mut s = GateStats::default();
        for c in &self.cores {
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.accepted += l(&c.accepted);
            s.connections += l(&c.connections);
            s.sockets += l(&c.sockets);
            s.logged_in += l(&c.logged_in);
            s.frames_in += l(&c.frames_in);
            s.frames_out += l(&c.frames_out);
            s.closed_protocol_error += l(&c.closed_protocol_error);
            s.closed_timeout += l(&c.closed_timeout);
            s.closed_slow += l(&c.closed_slow);
            s.handoffs += l(&c.handoffs);
            s.overloaded += l(&c.overloaded);
            s.refused_max_connections += l(&c.refused_max_connections);
            s.refused_ip_connections += l(&c.refused_ip_connections);
            s.refused_ip_rate += l(&c.refused_ip_rate);
            s.login_failures += l(&c.login_failures);
            s.login_backoff_refused += l(&c.login_backoff_refused);
            s.rate_limited += l(&c.rate_limited);
            s.closed_rate_limit += l(&c.closed_rate_limit);
        }
        s
    }

    /// Appends the counters in the Prometheus text format (`im_gate_*`).
    pub fn render(&self, out: &mut String) {
        let s = self.snapshot();
        for (name, kind, help, v) in [
            (
                "im_gate_connections",
                "gauge",
                "Open client connections.",
                s.connections,
            ),
            (
                "im_gate_logged_in",
                "gauge",
                "Logged-in client connections.",
                s.logged_in,
            ),
            (
                "im_gate_sockets",
                "gauge",
                "Sockets held by the gate.",
                s.sockets,
            ),
            (
                "im_gate_accepted_total",
                "counter",
                "Connections accepted.",
                s.accepted,
            ),
            (
                "im_gate_frames_in_total",
                "counter",
                "Client frames read.",
                s.frames_in,
            ),
            (
                "im_gate_frames_out_total",
                "counter",
                "Frames written to clients.",
                s.frames_out,
            ),
            (
                "im_gate_closed_protocol_error_total",
                "counter",
                "Connections closed for a protocol error.",
                s.closed_protocol_error,
            ),
            (
                "im_gate_closed_timeout_total",
                "counter",
                "Connections closed by a login or idle timeout.",
                s.closed_timeout,
            ),
            (
                "im_gate_closed_slow_total",
                "counter",
                "Connections closed as slow consumers.",
                s.closed_slow,
            ),
            (
                "im_gate_overloaded_total",
                "counter",
                "Requests refused with Overloaded.",
                s.overloaded,
            ),
            (
                "im_gate_refused_max_connections_total",
                "counter",
                "Connections refused at accept: gate at max_connections.",
                s.refused_max_connections,
            ),
            (
                "im_gate_refused_ip_connections_total",
                "counter",
                "Connections refused at accept: source address at max_conns_per_ip.",
                s.refused_ip_connections,
            ),
            (
                "im_gate_refused_ip_rate_total",
                "counter",
                "Connections refused at accept: source address over conn_rate_per_ip.",
                s.refused_ip_rate,
            ),
            (
                "im_gate_login_failures_total",
                "counter",
                "Logins refused by logic with BadToken.",
                s.login_failures,
            ),
            (
                "im_gate_login_backoff_refused_total",
                "counter",
                "Logins refused during a failed-login back-off.",
                s.login_backoff_refused,
            ),
            (
                "im_gate_rate_limited_total",
                "counter",
                "Frames refused by the per-user message rate.",
                s.rate_limited,
            ),
            (
                "im_gate_closed_rate_limit_total",
                "counter",
                "Connections closed for ignoring the per-user message rate.",
                s.closed_rate_limit,
            ),
        ] {
            im_shared::prom::metric(out, name, kind, help, v);
        }
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
