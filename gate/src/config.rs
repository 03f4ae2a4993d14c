//! Gate configuration.

use std::net::SocketAddr;
use std::time::Duration;

/// Default of [`GateConfig::max_login_body`]: 8 KiB.
pub const DEFAULT_MAX_LOGIN_BODY: usize = 8 * 1024;

/// Default of [`GateConfig::max_inflight`].
pub const DEFAULT_MAX_INFLIGHT: usize = 64;

/// Limits and layout of one gate process.
#[derive(Clone, Debug)]
pub struct GateConfig {
    /// Client listener address (one `SO_REUSEPORT` socket per core).
    pub listen: SocketAddr,
    /// Worker threads (cores). Each owns the users with `hash(uid) % cores == core`.
    pub cores: usize,
    /// This gate's id in [`im_shared::ConnId`]s.
    pub gate_id: u16,
    /// Largest accepted frame body.
    pub max_body: usize,
    /// Largest body of the first frame (the `Login`), read before the connection is logged in
    /// (capped at `max_body`). Big enough for an SSO token of a few KiB, small enough that an
    /// unauthenticated connection cannot make the gate reserve `max_body` bytes.
    pub max_login_body: usize,
    /// A connection must be logged in this long after accept, or it is closed.
    pub login_timeout: Duration,
    /// A logged-in connection that sends no complete frame for this long is closed.
    pub idle_timeout: Duration,
    /// Bytes queued for a client that does not read before it is disconnected
    /// (`Error SlowConsumer`). The reader stops taking a connection's requests while more than a
    /// quarter of this is queued, and goes on below an eighth.
    pub max_write_queue: usize,
    /// Requests of one connection forwarded to logic and not answered yet, beyond which the
    /// gate stops reading that connection until an answer comes (TCP then slows the client).
    /// Of the requests with large answers (`SyncRequest`, `GroupInfo`, `MyGroups`) one at a time.
    pub max_inflight: usize,
    /// Downstream messages (from logic) handed to one core and not applied yet, beyond which the
    /// producer waits (up to 5 s): logic slows down instead of queueing without bound.
    pub max_down_backlog: usize,
    /// io_uring submission queue entries per core.
    pub uring_entries: u32,
    /// Listen backlog.
    pub backlog: i32,
    /// Attack protection: connection caps and rates, login back-off, message rate.
    pub limits: crate::Limits,
    /// WebSocket listener (one `SO_REUSEPORT` socket per core): protocol-v1 frames in binary
    /// messages, and the static files of `web_root`. `None`: no WebSocket listener.
    pub ws_listen: Option<SocketAddr>,
    /// Directory of the web chat page, served on the WebSocket port: `GET /` is
    /// `index.html`, `GET /static/…` the same path under this directory. `None`: 404 for all.
    pub web_root: Option<std::path::PathBuf>,
    /// Allowed `Origin`s of WebSocket upgrades (e.g. `https://chat.example.com`); empty: any.
    pub ws_origins: Vec<String>,
    /// TLS on the TCP listener (certificate chain and key, PEM files); `None`: plaintext.
    pub tcp_tls: Option<crate::TlsFiles>,
    /// TLS on the WebSocket listener (`wss`); `None`: plaintext `ws`.
    pub ws_tls: Option<crate::TlsFiles>,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            listen: "127.0.0.1:7000".parse().expect("valid literal"),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gate_id: 0,
            max_body: im_shared::frame::DEFAULT_MAX_BODY,
            max_login_body: DEFAULT_MAX_LOGIN_BODY,
            login_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_write_queue: 256 * 1024,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_down_backlog: 100_000,
            uring_entries: 1024,
            backlog: 4096,
            limits: crate::Limits::default(),
            ws_listen: None,
            web_root: None,
            ws_origins: Vec::new(),
            tcp_tls: None,
            ws_tls: None,
        }
    }
}
