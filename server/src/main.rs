//! `im-server`: runs the single-node IM server, or mints development tokens.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use im_server::{ServerConfig, DEV_TOKEN_SECRET};
use im_shared::token::{now_secs, HmacTokens};
use im_shared::UserId;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: im_shared::alloc::Mimalloc = im_shared::alloc::Mimalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Single-node IM server (gate + logic, embedded store)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: CliCmd,
}

#[derive(Subcommand)]
enum CliCmd {
    /// Run the server.
    Run {
        #[command(flatten)]
        common: Common,
    },
    /// Run a gate process (distributed shape): client listener + TCP links to logic nodes.
    Gate {
        #[command(flatten)]
        common: Common,
        /// This gate's id (unique among gates; part of every connection id).
        #[arg(long, env = "IM_GATE_ID")]
        gate_id: u16,
        /// Logic node link addresses, comma separated, in shard-map order.
        #[arg(long, env = "IM_LOGIC", value_delimiter = ',', required = true)]
        logic: Vec<SocketAddr>,
    },
    /// Run a logic node (distributed shape): workers + store, accepting gate links.
    Logic {
        #[command(flatten)]
        common: Common,
        /// This node's id (part of every msg id).
        #[arg(long, env = "IM_NODE_ID", default_value_t = 0)]
        node_id: u16,
        /// Address for gate and peer links (default: this node's entry of --nodes, else
        /// 127.0.0.1:7100).
        #[arg(long, env = "IM_LINK_LISTEN")]
        link_listen: Option<SocketAddr>,
        /// Every logic node's link address, comma separated, in shard-map order (the same list
        /// the gates get); omit for a lone logic node.
        #[arg(long, env = "IM_NODES", value_delimiter = ',')]
        nodes: Vec<SocketAddr>,
    },
    /// Check a configuration without starting: listeners already in use, TLS files, the data
    /// directory, the development secret, an API without keys. Exits 1 if a start would fail.
    CheckConfig {
        #[command(flatten)]
        common: Common,
        /// The process kind the configuration is for: run, gate or logic.
        #[arg(long, default_value = "run")]
        role: String,
        /// A logic node's link address, checked too.
        #[arg(long)]
        link_listen: Option<SocketAddr>,
    },
    /// Mint a development SSO token for a user.
    Token {
        #[arg(long)]
        uid: u64,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
        #[arg(long, env = "IM_TOKEN_SECRET", default_value = DEV_TOKEN_SECRET, hide_env_values = true)]
        secret: String,
    },
}

/// Warns when a process that verifies tokens (run, logic) uses the public development secret.
fn warn_dev_secret(cfg: &ServerConfig) {
    if cfg.token_secret == DEV_TOKEN_SECRET {
        tracing::warn!("using the development token secret; set IM_TOKEN_SECRET in production");
    }
}

/// Options of every process kind; flags override the TOML file, which overrides defaults.
#[derive(clap::Args)]
struct Common {
    /// TOML config file (see deploy/im-server.toml).
    #[arg(long, env = "IM_CONFIG")]
    config: Option<PathBuf>,
    /// Client listener, binary protocol over TCP (default 127.0.0.1:7000; port 0 picks a free
    /// one, printed as "listening on ADDR").
    #[arg(long, env = "IM_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the embedded store (default ./data; `run` and `logic`).
    #[arg(long, env = "IM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Gate threads (0 = one per CPU).
    #[arg(long, env = "IM_GATE_CORES")]
    gate_cores: Option<usize>,
    /// Logic worker threads (0 = one per CPU).
    #[arg(long, env = "IM_LOGIC_WORKERS")]
    logic_workers: Option<usize>,
    /// Run logic worker i on the thread of gate core i (single node, equal counts; default true).
    #[arg(long, env = "IM_THREAD_PER_CORE")]
    thread_per_core: Option<bool>,
    /// HMAC secret of the SSO token verifier (default: the public development secret; set it
    /// in the environment, not on the command line, in production).
    #[arg(long, env = "IM_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Seconds a new connection has to log in (default 10).
    #[arg(long)]
    login_timeout_secs: Option<u64>,
    /// Seconds without a complete frame before a logged-in connection is closed (default 90).
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Largest client frame body in bytes (default 65536).
    #[arg(long)]
    max_body: Option<usize>,
    /// Redis Cluster seed nodes for the shared directory, comma separated.
    #[arg(long, env = "IM_REDIS_NODES", value_delimiter = ',')]
    redis_nodes: Vec<String>,
    /// ScyllaDB contact points (`host:port`, comma separated) for a logic node's store.
    #[arg(long, env = "IM_SCYLLA_NODES", value_delimiter = ',')]
    scylla_nodes: Vec<String>,
    /// Keyspace of the ScyllaDB store (default `im`).
    #[arg(long, env = "IM_SCYLLA_KEYSPACE")]
    scylla_keyspace: Option<String>,
    /// Address of the HTTP API (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long, env = "IM_API_LISTEN")]
    api_listen: Option<std::net::SocketAddr>,
    /// WebSocket listener for web clients (default: none); TLS for it is set in the config file.
    #[arg(long, env = "IM_WS_LISTEN")]
    ws_listen: Option<SocketAddr>,
    /// Logic nodes with a Redis directory: shard lease duration in ms (default 10000).
    #[arg(long, env = "IM_SHARD_LEASE_MS")]
    shard_lease_ms: Option<u64>,
    /// Gate: serve `/healthz` and `/metrics` on this address (default: none).
    #[arg(long, env = "IM_STATUS_LISTEN")]
    status_listen: Option<SocketAddr>,
    /// Directory of the web chat page served on the WebSocket port.
    #[arg(long, env = "IM_WEB_ROOT")]
    web_root: Option<PathBuf>,
    /// Organisation tree policy: a user may start a c2c chat only with users visible to it in
    /// the tree (default false).
    #[arg(long, env = "IM_ORG_VISIBILITY")]
    org_visibility: Option<bool>,
}

impl Common {
    fn config(self) -> anyhow::Result<ServerConfig> {
        let mut cfg: ServerConfig = match &self.config {
            Some(p) => toml::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {p:?}"))?,
            )
            .with_context(|| format!("parsing {p:?}"))?,
            None => ServerConfig::default(),
        };
        let Common {
            listen,
            data_dir,
            gate_cores,
            logic_workers,
            thread_per_core,
            token_secret,
            login_timeout_secs,
            idle_timeout_secs,
            scylla_keyspace,
            max_body,
            redis_nodes,
            api_listen,
            scylla_nodes,
            ws_listen,
            web_root,
            shard_lease_ms,
            status_listen,
            org_visibility,
            ..
        } = self;
        if status_listen.is_some() {
            cfg.status_listen = status_listen;
        }
        if ws_listen.is_some() {
            cfg.ws_listen = ws_listen;
        }
        if web_root.is_some() {
            cfg.web_root = web_root;
        }
        if !scylla_nodes.is_empty() {
            cfg.scylla_nodes = scylla_nodes;
        }
        if !redis_nodes.is_empty() {
            cfg.redis_nodes = redis_nodes;
        }
        if let Some(a) = api_listen {
            cfg.api.get_or_insert_with(Default::default).listen = a;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = $f { cfg.$f = v; } )* };
        }
        set!(
            listen,
            data_dir,
            gate_cores,
            logic_workers,
            thread_per_core,
            token_secret,
            login_timeout_secs,
            idle_timeout_secs,
            scylla_keyspace,
            max_body,
            shard_lease_ms,
            org_visibility
        );
        Ok(cfg)
    }
}

fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a locally owned signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The lifecycle's first line: what starts, which build.
fn log_start(role: &str) {
    tracing::info!(
        role,
        version = env!("CARGO_PKG_VERSION"),
        commit = im_api::GIT_COMMIT,
        pid = std::process::id(),
        "im-server starting"
    );
}

/// Waits for SIGTERM/SIGINT and says that the process stops (the lifecycle's next line).
fn wait_for_stop(set: &libc::sigset_t, role: &str) {
    let sig = wait_for_signal(set);
    tracing::info!(
        role,
        signal = sig,
        "shutting down: closing connections, draining logic"
    );
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is a valid, initialised signal set blocked in this thread.
    unsafe {
        libc::sigwait(set, &mut sig);
    }
    sig
}

/// Log filter when `RUST_LOG` is not set.
const DEFAULT_LOG: &str = "info,lsm_tree=warn,fjall=warn";

/// Turns transparent huge pages off for this process (and its children), unless
/// `IM_HUGE_PAGES=1`. The allocator asks for huge pages; a huge-page fault zeroes 2 MiB at once
/// inside whatever thread touched the memory first, and on a VM whose host backs memory lazily
/// that took 17 ms per page here (0.1 ms once backed): a gate core stalled 40–50 ms at a time
/// while its memtable grew, and that was the whole c2c p99 (docs/BENCHMARKS.md, "Huge pages").
/// Databases advise the same (Redis, MongoDB). Returns whether they are off.
fn no_huge_pages() -> bool {
    if std::env::var("IM_HUGE_PAGES").is_ok_and(|v| v == "1") {
        return false;
    }
    // SAFETY: prctl(2) with PR_SET_THP_DISABLE takes plain integers and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

fn main() -> anyhow::Result<()> {
    let thp_off = no_huge_pages();
    // A panic in any gate or logic thread must not leave a half-alive process behind: log it and
    // abort so the supervisor (systemd) restarts the server, which recovers from the store.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    // The storage engine's own INFO lines (a dozen per start, one per keyspace) drown the
    // server's; RUST_LOG overrides all of this. Colour only on a terminal: a file or journald
    // gets plain text.
    // IM_LOG_FORMAT=json: one JSON object per line (for log shippers).
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("IM_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().init(),
        Ok("text") | Err(_) => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        Ok(other) => {
            logs.with_ansi(false).init();
            tracing::warn!("IM_LOG_FORMAT={other:?} is neither `text` nor `json`: text it is");
        }
    }
    tracing::debug!(thp_off, "transparent huge pages");
    match Cli::parse().cmd {
        CliCmd::CheckConfig {
            common,
            role,
            link_listen,
        } => {
            use im_server::check::{check, Role};
            let role = match role.as_str() {
                "run" => Role::Run,
                "gate" => Role::Gate,
                "logic" => Role::Logic,
                r => anyhow::bail!("--role is run, gate or logic, not {r:?}"),
            };
            let f = check(&common.config()?, role, link_listen);
            for l in &f.ok {
                println!("ok       {l}");
            }
            for l in &f.warnings {
                println!("warning  {l}");
            }
            for l in &f.errors {
                println!("error    {l}");
            }
            if f.errors.is_empty() {
                println!(
                    "the configuration is usable ({} warnings)",
                    f.warnings.len()
                );
                Ok(())
            } else {
                anyhow::bail!("{} problems would stop or break a start", f.errors.len())
            }
        }
        CliCmd::Token {
            uid,
            ttl_secs,
            secret,
        } => {
            let t = HmacTokens::new(secret.as_bytes()).mint(UserId(uid), now_secs() + ttl_secs);
            println!("{t}");
            Ok(())
        }
        CliCmd::Gate {
            common,
            gate_id,
            logic,
        } => {
            let cfg = common.config()?;
            let signals = block_shutdown_signals();
            log_start("gate");
            let (gate, links) = im_server::start_gate(&cfg, gate_id, logic)?;
            println!("listening on {}", gate.local_addr());
            if let Some(a) = gate.ws_addr() {
                println!("ws on {a}");
            }
            let status = match cfg.status_listen {
                Some(a) => {
                    let stats = gate.stats_handle();
                    let s = im_api::ApiServer::start_status(
                        a,
                        vec![
                            std::sync::Arc::new(move |out: &mut String| stats.render(out)),
                            std::sync::Arc::new(move |out: &mut String| links.render(out)),
                        ],
                    )?;
                    println!("status on {}", s.local_addr());
                    Some(s)
                }
                None => None,
            };
            wait_for_stop(&signals, "gate");
            if let Some(s) = status {
                s.shutdown();
            }
            gate.shutdown();
            tracing::info!(role = "gate", "stopped");
            Ok(())
        }
        CliCmd::Logic {
            common,
            node_id,
            link_listen,
            nodes,
        } => {
            let cfg = common.config()?;
            log_start("logic");
            warn_dev_secret(&cfg);
            let signals = block_shutdown_signals();
            let link_listen = link_listen
                .or_else(|| nodes.get(node_id as usize).copied())
                .unwrap_or_else(|| "127.0.0.1:7100".parse().expect("literal"));
            let node = im_server::start_logic(&cfg, node_id, link_listen, nodes)?;
            println!("links on {}", node.link_addr);
            if let Some(a) = node.api_addr() {
                println!("api on {a}");
            }
            wait_for_stop(&signals, "logic");
            node.shutdown();
            tracing::info!(role = "logic", "stopped");
            Ok(())
        }
        CliCmd::Run { common } => {
            let cfg = common.config()?;
            log_start("run");
            warn_dev_secret(&cfg);
            // Block SIGTERM/SIGINT before any thread starts, so every thread inherits the mask
            // and the main thread alone receives them below.
            let signals = block_shutdown_signals();
            let server = im_server::start(&cfg)?;
            // Tests and scripts read this line to find an ephemeral port.
            println!("listening on {}", server.local_addr());
            if let Some(a) = server.api_addr() {
                println!("api on {a}");
            }
            if let Some(a) = server.ws_addr() {
                println!("ws on {a}");
            }
            wait_for_stop(&signals, "run");
            server.shutdown();
            tracing::info!(role = "run", "stopped");
            Ok(())
        }
    }
}
