//! The server's configuration file and the configs of the gate and logic derived from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use im_api::ApiConfig;
use im_c2s::C2sConfig;
use im_gate::GateConfig;
use im_logic::LogicConfig;
use im_push::PushConfig;
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
    /// A gate process's status listener (`/healthz`, `/metrics`); none by default. A single node
    /// and a logic node serve both on the HTTP API (`[api]`) instead.
    pub status_listen: Option<SocketAddr>,
    /// Thread per core: logic worker `i` runs on the thread of gate core `i`, which holds the
    /// connections of that worker's users (when `gate_cores` and `logic_workers` come out
    /// equal; otherwise each worker has a thread of its own).
    pub thread_per_core: bool,
    /// HMAC secret of the development SSO token issuer/verifier.
    pub token_secret: String,
    /// Largest client frame body in bytes.
    pub max_body: usize,
    /// Largest body of the `Login` frame, read before a connection is logged in (capped at
    /// `max_body`).
    pub max_login_body: usize,
    /// Seconds a new connection has to log in.
    pub login_timeout_secs: u64,
    /// Seconds without a complete client frame before a logged-in connection is closed.
    pub idle_timeout_secs: u64,
    /// Heartbeat interval announced to clients.
    pub heartbeat_secs: u16,
    /// Bytes queued for a non-reading client before it is disconnected (`SlowConsumer`); the
    /// gate stops reading a connection's requests above a quarter of it.
    pub max_write_queue: usize,
    /// Requests of one connection awaiting their answers before the gate stops reading it.
    pub max_inflight: usize,
    /// Downstream messages handed to one gate core and not applied yet before logic waits.
    pub max_down_backlog: usize,
    /// Client frames a gate process queues for one logic node's link before new ones are
    /// refused with `Overloaded` (distributed shape).
    pub max_link_queued: usize,
    /// Seqs reserved per store write.
    pub seq_segment: u64,
    /// Client frames queued per logic worker before new work is refused (retryable).
    pub max_queued: usize,
    /// Items one logic worker may have waiting at another worker of its node before it holds
    /// new client work back.
    pub max_worker_backlog: usize,
    /// User states a logic node keeps in memory; past it the offline users used longest ago
    /// are dropped and reloaded from the store when needed.
    pub max_cached_users: usize,
    /// Estimated bytes of user states a logic node keeps in memory; past it offline users are
    /// dropped, then online users' recent ids and pending notices (reloaded when needed).
    pub max_cache_bytes: usize,
    /// Embedded store: how long (µs) a worker's commit that handed appends to another worker of
    /// the node waits for that worker's `fdatasync` to cover it before it syncs itself.
    pub handoff_linger_us: u64,
    /// Group states a logic node keeps in memory, the same way.
    pub max_cached_groups: usize,
    /// Bytes a logic node queues for one link to another logic node before resetting it.
    pub peer_queue_bytes: usize,
    /// Bytes a logic node queues for one gate link before resetting it (the gate's clients
    /// reconnect and sync).
    pub gate_link_queue_bytes: usize,
    /// Redis Cluster seed nodes (`redis://127.0.0.1:7001`, …) for the shared directory of routes
    /// and presence; empty (the default): no directory, routes live only in logic memory.
    pub redis_nodes: Vec<String>,
    /// Seconds after sending during which a user may recall a message.
    pub recall_window_secs: u64,
    /// How long (ms) a user's last device must stay away before its presence followers are told
    /// it went offline (PROTOCOL.md "Presence").
    pub presence_offline_delay_ms: u64,
    /// Groups with more members than this are large: posts stored once in the group's timeline
    /// (read diffusion; PROTOCOL.md "Large groups").
    pub large_group_threshold: usize,
    /// Most members of any group.
    pub max_group_members: usize,
    /// Posts per second a large group accepts.
    pub large_group_posts_per_sec: u32,
    /// Seconds between two `@all` posts of one large group.
    pub large_group_mention_all_secs: u64,
    /// The organisation tree's c2c policy: a user may start a chat only with users visible to
    /// it in the tree (docs/API.md "Organisation tree"). Default off.
    pub org_visibility: bool,
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
    /// The file service (`[files]`): file messages, uploads and downloads over the HTTP API.
    pub files: crate::files::FilesConfig,
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
            thread_per_core: true,
            status_listen: None,
            token_secret: DEV_TOKEN_SECRET.to_owned(),
            max_body: g.max_body,
            max_login_body: g.max_login_body,
            login_timeout_secs: g.login_timeout.as_secs(),
            idle_timeout_secs: g.idle_timeout.as_secs(),
            heartbeat_secs: l.heartbeat_secs,
            max_write_queue: g.max_write_queue,
            max_inflight: g.max_inflight,
            max_down_backlog: g.max_down_backlog,
            max_link_queued: im_gate::links::MAX_QUEUED,
            seq_segment: l.seq_segment,
            max_queued: l.max_queued,
            max_worker_backlog: l.max_worker_backlog,
            max_cached_users: l.max_cached_users,
            max_cache_bytes: l.max_cache_bytes,
            handoff_linger_us: im_logic::store::DEFAULT_HANDOFF_LINGER_US,
            max_cached_groups: l.max_cached_groups,
            peer_queue_bytes: l.peer_queue_bytes,
            gate_link_queue_bytes: im_logic::links::MAX_GATE_QUEUE_BYTES,
            redis_nodes: Vec::new(),
            recall_window_secs: l.recall_window_secs,
            presence_offline_delay_ms: l.presence_offline_delay_ms,
            large_group_threshold: l.large_group_threshold,
            max_group_members: l.max_group_members,
            large_group_posts_per_sec: l.large_group_posts_per_sec,
            large_group_mention_all_secs: l.large_group_mention_all_secs,
            org_visibility: l.org_visibility,
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
            files: Default::default(),
        }
    }
}

/// The URL web clients reach a gate's WebSocket listener at `addr` by (`ws://…/ws`, or `wss`
/// with TLS), as the iplist hands it out.
pub(crate) fn ws_url(cfg: &ServerConfig, addr: SocketAddr) -> String {
    let scheme = if cfg.ws_tls.is_some() { "wss" } else { "ws" };
    format!("{scheme}://{addr}/ws")
}

pub(crate) fn gate_config(cfg: &ServerConfig, gate_id: u16) -> GateConfig {
    GateConfig {
        listen: cfg.listen,
        cores: if cfg.gate_cores == 0 {
            cpus()
        } else {
            cfg.gate_cores
        },
        gate_id,
        max_body: cfg.max_body,
        max_login_body: cfg.max_login_body,
        login_timeout: Duration::from_secs(cfg.login_timeout_secs),
        idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
        max_write_queue: cfg.max_write_queue,
        max_inflight: cfg.max_inflight,
        max_down_backlog: cfg.max_down_backlog,
        limits: cfg.limits.clone(),
        ws_listen: cfg.ws_listen,
        web_root: cfg.web_root.clone(),
        ws_origins: cfg.ws_origins.clone(),
        tcp_tls: cfg.tcp_tls.as_ref().map(Into::into),
        ws_tls: cfg.ws_tls.as_ref().map(Into::into),
        ..GateConfig::default()
    }
}

pub(crate) fn logic_config(cfg: &ServerConfig) -> LogicConfig {
    LogicConfig {
        workers: if cfg.logic_workers == 0 {
            cpus()
        } else {
            cfg.logic_workers
        },
        heartbeat_secs: cfg.heartbeat_secs,
        seq_segment: cfg.seq_segment,
        max_queued: cfg.max_queued,
        max_worker_backlog: cfg.max_worker_backlog,
        max_cached_users: cfg.max_cached_users,
        max_cache_bytes: cfg.max_cache_bytes,
        max_cached_groups: cfg.max_cached_groups,
        peer_queue_bytes: cfg.peer_queue_bytes,
        redis_nodes: cfg.redis_nodes.clone(),
        recall_window_secs: cfg.recall_window_secs,
        presence_offline_delay_ms: cfg.presence_offline_delay_ms,
        large_group_threshold: cfg.large_group_threshold,
        max_group_members: cfg.max_group_members,
        large_group_posts_per_sec: cfg.large_group_posts_per_sec,
        large_group_mention_all_secs: cfg.large_group_mention_all_secs,
        org_visibility: cfg.org_visibility,
        files: crate::files::policy(cfg),
        ..LogicConfig::default()
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
        assert_eq!(cfg.max_login_body, d.max_login_body);
        assert_eq!(cfg.recall_window_secs, d.recall_window_secs);
        assert_eq!(cfg.presence_offline_delay_ms, d.presence_offline_delay_ms);
        assert_eq!(
            cfg.api.as_ref().map(|a| a.listen),
            d.api.as_ref().map(|a| a.listen)
        );
        assert!(matches!(cfg.c2s, Some(C2sConfig::Embedded { .. })));
        assert!(cfg.push.is_none());
        assert_eq!(cfg.limits, d.limits);
        assert_eq!(cfg.thread_per_core, d.thread_per_core);
        assert_eq!(cfg.org_visibility, d.org_visibility);
        let (f, df) = (&cfg.files, &d.files);
        assert_eq!(
            (
                f.enabled,
                f.max_size,
                f.max_chunk,
                f.ticket_secs,
                f.url_secs
            ),
            (
                df.enabled,
                df.max_size,
                df.max_chunk,
                df.ticket_secs,
                df.url_secs
            )
        );
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
