//! `im-server` wires one gate and the logic tier into a single process with embedded defaults:
//! the fjall store in a data directory and in-process routing between gate cores and logic
//! workers. No external service is needed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use im_api::{ApiBackend, ApiConfig, ApiServer, GateSource, MetricsFn};
use im_c2s::{C2sConfig, C2sHub};
use im_gate::{Gate, GateConfig, GateHandle, GateStats};
use im_logic::directory::GateInfo;
use im_logic::store::FjallStore;
use im_logic::{LogicConfig, LogicHandle, PushService, Services};
use im_push::{PushConfig, PushDispatcher};
use im_shared::token::HmacTokens;
use serde::Deserialize;

/// The development token secret; the server warns when it runs with it.
pub const DEV_TOKEN_SECRET: &str = "dev-secret-change-me";

/// Configuration of a single-node server (TOML; every field optional).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Client listener (TCP, protocol v1).
    pub listen: SocketAddr,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// Gate threads (0 = one per CPU).
    pub gate_cores: usize,
    /// Logic worker threads (0 = one per CPU).
    pub logic_workers: usize,
    /// HMAC secret of the development SSO token issuer/verifier.
    pub token_secret: String,
    /// Largest client frame body in bytes.
    pub max_body: usize,
    /// Seconds a new connection has to log in.
    pub login_timeout_secs: u64,
    /// Seconds without a complete client frame before a logged-in connection is closed.
    pub idle_timeout_secs: u64,
    /// Heartbeat interval announced to clients.
    pub heartbeat_secs: u16,
    /// Bytes queued for a non-reading client before it is disconnected.
    pub max_write_queue: usize,
    /// Seqs reserved per store write.
    pub seq_segment: u64,
    /// Client frames queued per logic worker before new work is refused (retryable).
    pub max_queued: usize,
    /// Redis Cluster seed nodes (`redis://127.0.0.1:7001`, …) for the shared directory of routes
    /// and presence; empty (the default): no directory, routes live only in logic memory.
    pub redis_nodes: Vec<String>,
    /// Seconds after sending during which a user may recall a message.
    pub recall_window_secs: u64,
    /// Logic nodes with `redis_nodes`: how long a node's shard lease lasts (ms). Renewed every
    /// quarter of it; a node stops committing when it has not renewed within three quarters of
    /// it, and exits with code 75 when another node (or a newer incarnation of itself) took its
    /// shards. A node that was killed without releasing its lease is replaced after at most this
    /// long. See docs/ARCHITECTURE.md, "Shard ownership".
    pub shard_lease_ms: u64,
    /// HTTP server API (`[api]`): s2c pushes, groups, tokens, iplist, health, metrics.
    /// Default: `127.0.0.1:8080` with no API keys (signed endpoints refuse every call until keys
    /// are configured; health, metrics and iplist work).
    pub api: Option<ApiConfig>,
    /// c2s queue to business servers (`[c2s]`, docs/C2S.md). Default: the embedded durable
    /// queue with no webhook, so reports are refused until a webhook is configured.
    pub c2s: Option<C2sConfig>,
    /// Offline push (`[push]`, docs/PUSH.md). Default: none (no provider configured).
    pub push: Option<PushConfig>,
    /// Attack protection at the gate (`[limits]`, docs/SECURITY.md; keys and defaults in
    /// [`im_gate::Limits`]; 0 turns a limit off).
    pub limits: im_gate::Limits,
    /// ScyllaDB contact points (`host:port`) of a logic node's store; empty (the default): the
    /// embedded fjall store in `data_dir`. Only `im-server logic` uses it.
    pub scylla_nodes: Vec<String>,
    /// Keyspace of the ScyllaDB store (tables from `deploy/scylla/schema.cql`).
    pub scylla_keyspace: String,
    /// WebSocket listener for web clients (protocol-v1 frames in binary messages; `wss` with
    /// `[ws_tls]`); it also serves `web_root`. Default: none.
    pub ws_listen: Option<SocketAddr>,
    /// Directory of the web chat page, served on the WebSocket port (`GET /`, `/static/…`).
    pub web_root: Option<PathBuf>,
    /// Allowed `Origin`s of WebSocket upgrades (`https://chat.example.com`); empty: any.
    pub ws_origins: Vec<String>,
    /// TLS on the TCP listener (`[tcp_tls]` with `cert` and `key` PEM paths); default: plaintext.
    pub tcp_tls: Option<TlsPaths>,
    /// TLS on the WebSocket listener (`[ws_tls]`, the same or other files); default: plain `ws`.
    pub ws_tls: Option<TlsPaths>,
}

/// PEM files of a listener's certificate chain (leaf first) and private key; re-read when they
/// change (docs/SECURITY.md, "Transport security").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl From<&TlsPaths> for im_gate::TlsFiles {
    fn from(p: &TlsPaths) -> Self {
        im_gate::TlsFiles {
            cert: p.cert.clone(),
            key: p.key.clone(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let g = GateConfig::default();
        let l = LogicConfig::default();
        ServerConfig {
            listen: g.listen,
            data_dir: PathBuf::from("data"),
            gate_cores: 0,
            logic_workers: 0,
            token_secret: DEV_TOKEN_SECRET.to_owned(),
            max_body: g.max_body,
            login_timeout_secs: g.login_timeout.as_secs(),
            idle_timeout_secs: g.idle_timeout.as_secs(),
            heartbeat_secs: l.heartbeat_secs,
            max_write_queue: g.max_write_queue,
            seq_segment: l.seq_segment,
            max_queued: l.max_queued,
            redis_nodes: Vec::new(),
            recall_window_secs: l.recall_window_secs,
            shard_lease_ms: 10_000,
            api: Some(ApiConfig::default()),
            c2s: Some(C2sConfig::Embedded {
                webhooks: Default::default(),
                default_url: None,
                secret: None,
                retry_initial_ms: 500,
                retry_max_ms: 60_000,
                timeout_ms: 10_000,
            }),
            push: None,
            limits: im_gate::Limits::default(),
            scylla_nodes: Vec::new(),
            scylla_keyspace: "im".to_owned(),
            ws_listen: None,
            web_root: None,
            ws_origins: Vec::new(),
            tcp_tls: None,
            ws_tls: None,
        }
    }
}

/// The optional services of a logic node, started from the config.
fn services(cfg: &ServerConfig) -> anyhow::Result<Services> {
    let c2s = match &cfg.c2s {
        Some(c) => Some(C2sHub::start(c, &cfg.data_dir)?),
        None => None,
    };
    let push = match &cfg.push {
        Some(p) => Some(PushService {
            dispatcher: PushDispatcher::start(p)?,
            delay_ms: p.delay_ms,
        }),
        None => None,
    };
    Ok(Services { push, c2s })
}

/// Metrics of the services, for the API's `/metrics`.
fn service_metrics(s: &Services) -> Vec<MetricsFn> {
    let mut v: Vec<MetricsFn> = Vec::new();
    if let Some(c) = s.c2s.clone() {
        v.push(Arc::new(move |out: &mut String| c.metrics(out)));
    }
    if let Some(p) = s.push.clone() {
        v.push(Arc::new(move |out: &mut String| p.dispatcher.metrics(out)));
    }
    v
}

/// Removes a push token the provider reported invalid (through the user's worker).
fn drop_invalid_tokens(s: &Services, logic: &Arc<LogicHandle>) {
    if let Some(p) = &s.push {
        let weak = Arc::downgrade(logic);
        p.dispatcher.on_invalid_token(move |n| {
            if let Some(l) = weak.upgrade() {
                l.drop_push_token(n.uid, n.device_id.clone());
            }
        });
    }
}

/// A running single-node server.
pub struct Server {
    gate: GateHandle,
    logic: Arc<LogicHandle>,
    api: Option<ApiServer>,
    services: Services,
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Opens the store, starts logic workers and gate cores.
pub fn start(cfg: &ServerConfig) -> anyhow::Result<Server> {
    im_gate::check_transport(&gate_config(cfg, 0))?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let store = FjallStore::open(&cfg.data_dir)?;
    let gate = Gate::new(gate_config(cfg, 0));
    let tokens = Arc::new(HmacTokens::new(cfg.token_secret.as_bytes()));
    let services = services(cfg)?;
    let logic = Arc::new(im_logic::start_with(
        logic_config(cfg),
        store,
        tokens.clone(),
        gate.sink(),
        None,
        services.clone(),
    )?);
    drop_invalid_tokens(&services, &logic);
    let gate = gate.start(logic.clone())?;
    tracing::info!(addr = %gate.local_addr(), "im-server listening");
    let api = match &cfg.api {
        Some(a) => {
            let me = GateInfo {
                id: 0,
                tcp_addr: gate.local_addr().to_string(),
                ws_addr: gate.ws_addr().map(|a| {
                    let scheme = if cfg.ws_tls.is_some() { "wss" } else { "ws" };
                    format!("{scheme}://{a}/ws")
                }),
                conns: 0,
            };
            let mut extra = service_metrics(&services);
            let stats = gate.stats_handle();
            extra.push(Arc::new(move |out: &mut String| stats.render(out)));
            let server = ApiServer::start(
                a.clone(),
                logic.clone() as Arc<dyn ApiBackend>,
                GateSource::Static(vec![me]),
                Some(tokens),
                extra,
            )?;
            tracing::info!(addr = %server.local_addr(), "http api listening");
            Some(server)
        }
        None => None,
    };
    Ok(Server {
        gate,
        logic,
        api,
        services,
    })
}

fn gate_config(cfg: &ServerConfig, gate_id: u16) -> GateConfig {
    GateConfig {
        listen: cfg.listen,
        cores: if cfg.gate_cores == 0 {
            cpus()
        } else {
            cfg.gate_cores
        },
        gate_id,
        max_body: cfg.max_body,
        login_timeout: Duration::from_secs(cfg.login_timeout_secs),
        idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
        max_write_queue: cfg.max_write_queue,
        limits: cfg.limits.clone(),
        ws_listen: cfg.ws_listen,
        web_root: cfg.web_root.clone(),
        ws_origins: cfg.ws_origins.clone(),
        tcp_tls: cfg.tcp_tls.as_ref().map(Into::into),
        ws_tls: cfg.ws_tls.as_ref().map(Into::into),
        ..GateConfig::default()
    }
}

fn logic_config(cfg: &ServerConfig) -> LogicConfig {
    LogicConfig {
        workers: if cfg.logic_workers == 0 {
            cpus()
        } else {
            cfg.logic_workers
        },
        heartbeat_secs: cfg.heartbeat_secs,
        seq_segment: cfg.seq_segment,
        max_queued: cfg.max_queued,
        redis_nodes: cfg.redis_nodes.clone(),
        recall_window_secs: cfg.recall_window_secs,
        ..LogicConfig::default()
    }
}

/// A gate process of the distributed shape: client listener + TCP links to logic nodes.
pub fn start_gate(
    cfg: &ServerConfig,
    gate_id: u16,
    logic: Vec<SocketAddr>,
) -> anyhow::Result<GateHandle> {
    im_gate::check_transport(&gate_config(cfg, gate_id))?;
    let gate = Gate::new(gate_config(cfg, gate_id));
    let client_addr = Arc::new(std::sync::OnceLock::new());
    let upstream =
        im_gate::links::TcpUpstream::start(gate_id, client_addr.clone(), logic, gate.sink());
    let gate = gate.start(upstream)?;
    let _ = client_addr.set(gate.local_addr());
    tracing::info!(addr = %gate.local_addr(), gate_id, "gate listening");
    Ok(gate)
}

/// A running logic node of the distributed shape.
pub struct LogicNode {
    pub logic: Arc<LogicHandle>,
    /// Where gates and peer nodes connect.
    pub link_addr: SocketAddr,
    api: Option<ApiServer>,
    services: Services,
    /// The shard lease (with a Redis directory).
    lease: Option<im_logic::ownership::Holder>,
}

impl LogicNode {
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|a| a.local_addr())
    }

    pub fn shutdown(self) {
        if let Some(a) = self.api {
            a.shutdown();
        }
        self.logic.shutdown();
        if let Some(c) = &self.services.c2s {
            c.shutdown();
        }
        if let Some(l) = self.lease {
            l.release();
        }
    }
}

/// A logic node of the distributed shape: workers + store, accepting gate links on `link_listen`.
/// `nodes` is the cluster's list of logic link addresses (empty for a lone node); this node is
/// `nodes[node_id]`. Its HTTP API takes the iplist's gates from the Redis gate registry.
pub fn start_logic(
    cfg: &ServerConfig,
    node_id: u16,
    link_listen: SocketAddr,
    nodes: Vec<SocketAddr>,
) -> anyhow::Result<LogicNode> {
    anyhow::ensure!(
        nodes.is_empty() || (node_id as usize) < nodes.len(),
        "--node-id {node_id} is not an index of the {} nodes",
        nodes.len()
    );
    std::fs::create_dir_all(&cfg.data_dir)?;
    if cfg.scylla_nodes.is_empty() {
        let store = FjallStore::open(&cfg.data_dir)?;
        return start_logic_on(cfg, node_id, link_listen, nodes, store);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = rt
        .block_on(im_logic::store::ScyllaStore::connect(
            &cfg.scylla_nodes,
            &cfg.scylla_keyspace,
        ))
        .map_err(|e| anyhow::anyhow!("connecting to ScyllaDB {:?}: {e}", cfg.scylla_nodes))?;
    tracing::info!(nodes = ?cfg.scylla_nodes, keyspace = %cfg.scylla_keyspace, "store: ScyllaDB");
    start_logic_on(cfg, node_id, link_listen, nodes, store)
}

fn start_logic_on<S: im_logic::store::Store + Send + Sync>(
    cfg: &ServerConfig,
    node_id: u16,
    link_listen: SocketAddr,
    nodes: Vec<SocketAddr>,
    store: S,
) -> anyhow::Result<LogicNode> {
    let links = im_logic::net::GateLinks::new();
    let tokens = Arc::new(HmacTokens::new(cfg.token_secret.as_bytes()));
    let mut lc = logic_config(cfg);
    lc.node_id = node_id;
    // Bind first, so that peers and gates can connect as soon as the workers run.
    let listener = std::net::TcpListener::bind(link_listen)?;
    let cluster = if nodes.is_empty() {
        None
    } else {
        Some(im_logic::Cluster {
            node: node_id as usize,
            nodes,
        })
    };
    let services = services(cfg)?;
    // Hold this node's shards before serving anything (docs/ARCHITECTURE.md, "Shard ownership").
    let lease = if cfg.redis_nodes.is_empty() {
        None
    } else {
        let redis = cfg.redis_nodes.clone();
        let shards = im_logic::ownership::shards_of(
            node_id as usize,
            cluster.as_ref().map_or(1, |c| c.nodes.len()),
        );
        let holder = im_logic::ownership::hold(
            move || im_logic::directory::RedisDirectory::connect(redis.clone()),
            store.clone(),
            node_id,
            shards,
            cfg.shard_lease_ms,
        )
        .map_err(|e| anyhow::anyhow!("acquiring the shard lease: {e}"))?;
        lc.lease = Some(holder.lease.clone());
        Some(holder)
    };
    let logic = Arc::new(im_logic::start_with(
        lc,
        store,
        tokens.clone(),
        links.clone(),
        cluster,
        services.clone(),
    )?);
    drop_invalid_tokens(&services, &logic);
    let addr = listener.local_addr()?;
    if !cfg.redis_nodes.is_empty() {
        im_logic::net::publish_gates(links.clone(), cfg.redis_nodes.clone())?;
    }
    im_logic::net::serve(listener, node_id, links, logic.clone())?;
    tracing::info!(%addr, node_id, "logic node accepting gate links");
    let api = match &cfg.api {
        Some(a) => {
            let gates = if cfg.redis_nodes.is_empty() {
                GateSource::Static(Vec::new())
            } else {
                GateSource::Redis(cfg.redis_nodes.clone())
            };
            let server = ApiServer::start(
                a.clone(),
                logic.clone() as Arc<dyn ApiBackend>,
                gates,
                Some(tokens),
                service_metrics(&services),
            )?;
            tracing::info!(addr = %server.local_addr(), "http api listening");
            Some(server)
        }
        None => None,
    };
    Ok(LogicNode {
        logic,
        link_addr: addr,
        api,
        services,
        lease,
    })
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.gate.local_addr()
    }
    /// Address of the WebSocket listener, if configured.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.gate.ws_addr()
    }
    pub fn gate_stats(&self) -> GateStats {
        self.gate.stats()
    }
    pub fn logic(&self) -> &LogicHandle {
        &self.logic
    }
    /// Address of the HTTP API, if it runs.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|a| a.local_addr())
    }

    /// Stops the API, the gate (dropping every connection), then the logic workers after they
    /// finish what is queued, and closes the store and the c2s queue.
    pub fn shutdown(self) {
        if let Some(a) = self.api {
            a.shutdown();
        }
        self.gate.shutdown();
        self.logic.shutdown();
        if let Some(c) = &self.services.c2s {
            c.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_config_parses_and_matches_the_defaults() {
        let cfg: ServerConfig = toml::from_str(include_str!("../../deploy/im-server.toml"))
            .expect("deploy/im-server.toml parses");
        let d = ServerConfig::default();
        assert_eq!(cfg.listen, d.listen);
        assert_eq!(cfg.max_body, d.max_body);
        assert_eq!(cfg.recall_window_secs, d.recall_window_secs);
        assert_eq!(
            cfg.api.as_ref().map(|a| a.listen),
            d.api.as_ref().map(|a| a.listen)
        );
        assert!(matches!(cfg.c2s, Some(C2sConfig::Embedded { .. })));
        assert!(cfg.push.is_none());
        assert_eq!(cfg.limits, d.limits);
    }

    #[test]
    fn the_limits_table_is_the_gates_limits_with_durations_in_their_units() {
        let cfg: ServerConfig = toml::from_str(
            "[limits]\nmsg_rate_per_user = 0\nlogin_backoff_ms = 250\n\
             login_backoff_max_secs = 7\nlogin_fail_window_secs = 9\n",
        )
        .unwrap();
        let d = im_gate::Limits::default();
        assert_eq!(
            cfg.limits,
            im_gate::Limits {
                msg_rate_per_user: 0,
                login_backoff: Duration::from_millis(250),
                login_backoff_max: Duration::from_secs(7),
                login_fail_window: Duration::from_secs(9),
                ..d
            }
        );
        // The field's own name is not a key: durations are spelled with their unit.
        let e = toml::from_str::<ServerConfig>("[limits]\nlogin_backoff = 1\n").unwrap_err();
        assert!(
            e.to_string().contains("unknown field `login_backoff`"),
            "{e}"
        );
    }
}
