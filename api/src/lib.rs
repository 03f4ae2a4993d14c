//! The HTTP/1.1 server API of the logic tier (hyper 1), over [`ApiBackend`].
//!
//! [`ApiServer::start`] binds [`ApiConfig::listen`] and serves on its own thread with its own
//! (current-thread) tokio runtime; every logic operation is a call into the backend, which runs
//! on the logic workers. Endpoints, the request signature scheme and the iplist semantics are
//! described in `docs/API.md` and `docs/openapi.yaml`:
//!
//! * `GET /healthz`, `GET /metrics` (Prometheus text) and `GET /v1/iplist?uid=N` need no auth.
//! * `POST /v1/messages` (s2c), `POST /v1/groups`, `GET /v1/groups/{id}`,
//!   `POST|DELETE /v1/groups/{id}/members`, `GET /v1/users/{uid}/groups`, `POST /v1/tokens`
//!   and the organisation tree's (`GET /v1/org`, `GET|PUT|DELETE /v1/org/departments/{id}`,
//!   `GET|PUT|DELETE /v1/org/users/{uid}`, `POST /v1/org/import`) are signed by the calling business server: headers `X-IM-Key`, `X-IM-Timestamp` and
//!   `X-IM-Signature` (see [`sign`]).
//! * The file service's `POST /v1/files/uploads`, `HEAD|PATCH /v1/files/uploads/{id}` and
//!   `GET|HEAD /v1/files/{sha256}` are authorized by an upload ticket or a signed download URL
//!   that a logged-in client got over the binary protocol (`FileUpload`, `FileDownload`).

mod auth;
mod backend;
mod files;
mod iplist;
mod json;
mod org;
mod server;

pub use auth::{sign, HEADER_KEY, HEADER_SIGNATURE, HEADER_TIMESTAMP};

/// The git commit this build was made from (`unknown` outside a checkout); `im_build_info`.
pub const GIT_COMMIT: &str = env!("IM_GIT_COMMIT");
pub use backend::{Accepted, ApiBackend, ApiError, BoxFut, GroupWithMembers, PushTarget};
pub use files::{FileBackend, FilesHttp, DEFAULT_MAX_CHUNK, STALE_UPLOAD};
pub use iplist::{order_gates, rendezvous_weight};
pub use json::{MAX_LIST_LEN, MAX_MESSAGE_BODY, MAX_RECIPIENTS, MAX_TOKEN_TTL_SECS};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use im_shared::token::HmacTokens;

use im_directory::GateInfo;

/// Settings of the HTTP API.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ApiConfig {
    /// Address to listen on (port 0 picks a free port, see [`ApiServer::local_addr`]).
    pub listen: SocketAddr,
    /// Business servers' API keys: key id → shared secret of the request signatures.
    #[serde(default)]
    pub keys: BTreeMap<String, String>,
    /// How far a signed request's `X-IM-Timestamp` may be from the server clock (default 300).
    #[serde(default = "default_max_skew_secs")]
    pub max_skew_secs: u64,
    /// Largest request body in bytes (default 1 MiB); larger requests get `413`.
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// Reconnect backoff handed to clients by the iplist.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Signed requests per second each API key may make, on average (default 1 000; 0: no
    /// limit). Past it: `429 rate_limited` with `Retry-After`.
    #[serde(default = "default_rate_per_key")]
    pub rate_per_key: u32,
    /// Signed requests an API key may make at once above the rate (default 2 000).
    #[serde(default = "default_burst_per_key")]
    pub burst_per_key: u32,
}

fn default_rate_per_key() -> u32 {
    1_000
}

fn default_burst_per_key() -> u32 {
    2_000
}

fn default_max_skew_secs() -> u64 {
    300
}

fn default_max_body() -> usize {
    1 << 20
}

impl Default for ApiConfig {
    /// [`ApiConfig::new`] on `127.0.0.1:8080`.
    fn default() -> Self {
        ApiConfig::new(SocketAddr::from(([127, 0, 0, 1], 8080)))
    }
}

impl ApiConfig {
    /// Defaults for everything but the listen address: no keys (every signed request is
    /// refused), 300 s skew, 1 MiB bodies, [`BackoffConfig::default`], 1 000 requests/s per key
    /// with bursts of 2 000.
    pub fn new(listen: SocketAddr) -> Self {
        ApiConfig {
            listen,
            keys: BTreeMap::new(),
            max_skew_secs: default_max_skew_secs(),
            max_body: default_max_body(),
            backoff: BackoffConfig::default(),
            rate_per_key: default_rate_per_key(),
            burst_per_key: default_burst_per_key(),
        }
    }
}

/// Reconnect parameters handed to clients with the iplist: after a failed connect or a lost
/// connection a client waits `min(max_ms, initial_ms * multiplier^attempt)` milliseconds, each
/// wait multiplied by a random factor in `[1 - jitter, 1 + jitter]`, before trying the next gate.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct BackoffConfig {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
    /// Fraction of each wait that is randomized, in `[0, 1]`.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    /// 500 ms, doubling up to 30 s, ±50 % jitter.
    fn default() -> Self {
        BackoffConfig {
            initial_ms: 500,
            max_ms: 30_000,
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

/// Where the iplist reads the live gates from.
#[derive(Clone, Debug)]
pub enum GateSource {
    /// A fixed list (single node, tests); every gate is considered healthy.
    Static(Vec<GateInfo>),
    /// The gate registry of the Redis Cluster directory, given by its seed nodes
    /// (`redis://host:port`); read through [`im_directory::RedisDirectory::gates`] and cached
    /// for about a second. Needs the `redis` feature.
    Redis(Vec<String>),
}

/// Something that appends Prometheus text to the `/metrics` output (e.g. gate counters).
pub type MetricsFn = Arc<dyn Fn(&mut String) + Send + Sync>;

/// A running HTTP API server. Dropping it shuts it down like [`ApiServer::shutdown`].
pub struct ApiServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Binds `cfg.listen` and serves on its own thread with its own tokio runtime (the backend's
    /// work runs on the logic workers). Fails if the address cannot be bound, or for
    /// [`GateSource::Redis`] without the `redis` feature. A Redis gate source is connected
    /// lazily, on the first iplist request, and reconnected after failures.
    pub fn start(
        cfg: ApiConfig,
        backend: Arc<dyn ApiBackend>,
        gates: GateSource,
        tokens: Option<Arc<HmacTokens>>,
        extra_metrics: Vec<MetricsFn>,
        files: Option<FilesHttp>,
    ) -> std::io::Result<ApiServer> {
        let gates = iplist::Gates::new(gates)?;
        let mut state = server::State::new(cfg, backend, gates, tokens, extra_metrics);
        state.files = files;
        Self::serve(state)
    }

    /// A status server for a process without a logic tier (a gate of the distributed shape):
    /// `/healthz` and `/metrics` (the `metrics` functions' output and the HTTP counters); every
    /// other path is `404 not_found`, saying the business API is on the logic nodes.
    pub fn start_status(listen: SocketAddr, metrics: Vec<MetricsFn>) -> std::io::Result<ApiServer> {
        let gates = iplist::Gates::new(GateSource::Static(Vec::new()))?;
        let mut state = server::State::new(
            ApiConfig::new(listen),
            Arc::new(backend::NoBackend),
            gates,
            None,
            metrics,
        );
        state.status_only = true;
        Self::serve(state)
    }

    fn serve(state: server::State) -> std::io::Result<ApiServer> {
        let listener = std::net::TcpListener::bind(state.cfg.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(state);
        let thread = std::thread::Builder::new()
            .name("im-api".into())
            .spawn(move || {
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => server::serve(listener, state, stop_rx).await,
                        Err(e) => tracing::error!("api: cannot register the listener: {e}"),
                    }
                });
            })?;
        tracing::info!("api: listening on http://{addr}");
        Ok(ApiServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (up to a few seconds), closes the
    /// connections and joins the server thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
