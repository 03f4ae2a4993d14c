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
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// TOML config file (see deploy/im-server.toml); flags override it.
        #[arg(long, env = "IM_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "IM_LISTEN")]
        listen: Option<SocketAddr>,
        #[arg(long, env = "IM_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Gate threads (0 = one per CPU).
        #[arg(long, env = "IM_GATE_CORES")]
        gate_cores: Option<usize>,
        /// Logic worker threads (0 = one per CPU).
        #[arg(long, env = "IM_LOGIC_WORKERS")]
        logic_workers: Option<usize>,
        #[arg(long, env = "IM_TOKEN_SECRET", hide_env_values = true)]
        token_secret: Option<String>,
        #[arg(long)]
        login_timeout_secs: Option<u64>,
        #[arg(long)]
        idle_timeout_secs: Option<u64>,
        #[arg(long)]
        max_body: Option<usize>,
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

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is a valid, initialised signal set blocked in this thread.
    unsafe {
        libc::sigwait(set, &mut sig);
    }
    sig
}

fn main() -> anyhow::Result<()> {
    // A panic in any gate or logic thread must not leave a half-alive process behind: log it and
    // abort so the supervisor (systemd) restarts the server, which recovers from the store.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        CliCmd::Token {
            uid,
            ttl_secs,
            secret,
        } => {
            let t = HmacTokens::new(secret.as_bytes()).mint(UserId(uid), now_secs() + ttl_secs);
            println!("{t}");
            Ok(())
        }
        CliCmd::Run {
            config,
            listen,
            data_dir,
            gate_cores,
            logic_workers,
            token_secret,
            login_timeout_secs,
            idle_timeout_secs,
            max_body,
        } => {
            let mut cfg: ServerConfig = match config {
                Some(p) => toml::from_str(
                    &std::fs::read_to_string(&p).with_context(|| format!("reading {p:?}"))?,
                )
                .with_context(|| format!("parsing {p:?}"))?,
                None => ServerConfig::default(),
            };
            macro_rules! set {
                ($($f:ident),*) => { $( if let Some(v) = $f { cfg.$f = v; } )* };
            }
            set!(
                listen,
                data_dir,
                gate_cores,
                logic_workers,
                token_secret,
                login_timeout_secs,
                idle_timeout_secs,
                max_body
            );
            if cfg.token_secret == DEV_TOKEN_SECRET {
                tracing::warn!(
                    "using the development token secret; set IM_TOKEN_SECRET in production"
                );
            }
            // Block SIGTERM/SIGINT before any thread starts, so every thread inherits the mask
            // and the main thread alone receives them below.
            let signals = block_shutdown_signals();
            let server = im_server::start(&cfg)?;
            // Tests and scripts read this line to find an ephemeral port.
            println!("listening on {}", server.local_addr());
            let sig = wait_for_signal(&signals);
            tracing::info!(
                signal = sig,
                "shutting down: closing connections, draining logic"
            );
            server.shutdown();
            Ok(())
        }
    }
}
