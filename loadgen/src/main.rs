//! `im-loadgen`: load generator for million-connection benchmarks of the IM server.
//!
//! One coordinator process spawns worker processes (this binary again, hidden `worker`
//! subcommand), each holding at most `--max-conns-per-worker` sockets and running one glommio
//! executor (io_uring, thread-per-core) per core it is given. See `loadgen/README.md`.

mod account;
mod burst;
mod coord;
mod exec;
mod msg;
mod net;
mod srcip;
mod svg;
mod worker;

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

#[global_allocator]
static GLOBAL: im_shared::alloc::Mimalloc = im_shared::alloc::Mimalloc;

#[derive(Parser, Debug)]
#[command(
    name = "im-loadgen",
    version,
    about = "Load generator for the IM server (glommio, thread-per-core)"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server (gate) addresses, comma separated: each user always connects to
    /// `server[uid % count]`, so the load spreads over the gates of a cluster.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7000",
        value_delimiter = ','
    )]
    pub server: Vec<SocketAddr>,
    /// Take the gates and the reconnect backoff from the iplist of this logic-node API instead
    /// of --server and --reconnect-* (e.g. http://127.0.0.1:8080): each user then tries the gates
    /// in its own iplist order (docs/API.md).
    #[arg(long, global = true)]
    pub iplist: Option<String>,
    /// Reconnect backoff: the first wait after a failed login or a lost connection, ms (each
    /// attempt also moves to the user's next gate).
    #[arg(long, global = true, default_value_t = 500)]
    pub reconnect_initial_ms: u64,
    /// Reconnect backoff: the longest wait, ms.
    #[arg(long, global = true, default_value_t = 30_000)]
    pub reconnect_max_ms: u64,
    /// Reconnect backoff: each failed attempt in a row multiplies the wait by this.
    #[arg(long, global = true, default_value_t = 2.0)]
    pub reconnect_multiplier: f64,
    /// Reconnect backoff: each wait is multiplied by a random factor in [1 - j, 1 + j].
    #[arg(long, global = true, default_value_t = 0.5)]
    pub reconnect_jitter: f64,
    /// A user that has never logged in stops retrying this long after its first attempt (a user
    /// that was logged in once reconnects until the run ends).
    #[arg(long, global = true, default_value_t = 60.0)]
    pub login_retry_secs: f64,
    /// A send whose `SendAck` has not come this long after it went out is sent again on the same
    /// connection with the same client_msg_id (PROTOCOL.md section 10), ms; 0 = only after a
    /// re-login.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub resend_ms: u64,
    /// Secret of the development token issuer (the server's default).
    #[arg(
        long,
        global = true,
        env = "IM_TOKEN_SECRET",
        default_value = "dev-secret-change-me"
    )]
    pub token_secret: String,
    /// First user id; user i is uid-base + i.
    #[arg(long, global = true, default_value_t = 1_000_000)]
    pub uid_base: u64,
    /// Connect/login ramp, connections per second over all workers (0 = as fast as possible).
    #[arg(long, global = true, default_value_t = 20_000.0)]
    pub rate: f64,
    /// Source addresses: list and/or ranges, e.g. 127.0.0.2-127.0.0.9,127.0.1.1 ("none" = let the
    /// kernel choose).
    #[arg(long, global = true, default_value = "127.0.0.2-127.0.0.9")]
    pub src_ips: String,
    /// Worker processes (0 = as many as needed for --max-conns-per-worker).
    #[arg(long, global = true, default_value_t = 0)]
    pub workers: u32,
    /// Sockets per worker process at most (the per-process open-file limit here is 20 000).
    #[arg(long, global = true, default_value_t = 18_000)]
    pub max_conns_per_worker: u32,
    /// glommio executors (threads) per worker.
    #[arg(long, global = true, default_value_t = 1)]
    pub cores_per_worker: u32,
    /// Pin executors to CPUs (round robin).
    #[arg(long, global = true)]
    pub pin: bool,
    /// glommio's registered I/O buffer per executor, KiB (unused by sockets; must fit `ulimit -l`).
    #[arg(long, global = true, default_value_t = 512)]
    pub io_memory_kib: usize,
    /// Heartbeat period, seconds.
    #[arg(long, global = true, default_value_t = 30)]
    pub heartbeat_secs: u32,
    /// A connection whose login has not succeeded after this long is closed and counted failed.
    #[arg(long, global = true, default_value_t = 30.0)]
    pub login_timeout_secs: f64,
    /// A send not acknowledged this long after the send phase is counted as an ack timeout.
    #[arg(long, global = true, default_value_t = 5000)]
    pub ack_timeout_ms: u64,
    /// c2c body size in bytes (at least 17: send time, sender, counter, attempt).
    #[arg(long, global = true, default_value_t = 32)]
    pub body_size: usize,
    /// After sending, wait until no message arrived for this long...
    #[arg(long, global = true, default_value_t = 1000)]
    pub drain_quiet_ms: u64,
    /// ...but at most this long.
    #[arg(long, global = true, default_value_t = 15.0)]
    pub drain_max_secs: f64,
    /// Server process id(s) whose RSS (idle) and CPU per message (c2c, group) to measure
    /// (repeatable).
    #[arg(long, global = true)]
    pub server_pid: Vec<u32>,
    /// Print the result as JSON on stdout (the table goes to stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// Also write the JSON result to this file.
    #[arg(long, global = true)]
    pub json_out: Option<std::path::PathBuf>,
    /// Write an SVG plot of throughput and latency over time to this file.
    #[arg(long, global = true)]
    pub svg: Option<std::path::PathBuf>,
    /// Do not record message identities (no exact loss/duplicate/order accounting; less memory).
    #[arg(long, global = true)]
    pub no_track: bool,
    /// Never send `DeliverAck`: every connection receives and never acknowledges (the server
    /// keeps a pending notice per message, and sends no `Delivered`).
    #[arg(long, global = true)]
    pub no_deliver_ack: bool,
    /// Random seed (default: from the clock). Its high 32 bits tag this run's client_msg_ids.
    #[arg(long, global = true)]
    pub seed: Option<u64>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// N logged-in connections with heartbeats: login rate, server RSS and kernel memory per connection.
    Idle {
        /// Connections (one user each).
        #[arg(long, short = 'n', default_value_t = 2000)]
        conns: u32,
        /// How long to hold the connections after the last login.
        #[arg(long, default_value_t = 10.0)]
        hold_secs: f64,
    },
    /// N users, R msgs/s from random senders to random recipients for D seconds.
    C2c {
        /// Users, one connection each.
        #[arg(long, short = 'n', default_value_t = 2000)]
        users: u32,
        /// Messages per second over all senders.
        #[arg(long, default_value_t = 2000.0)]
        msg_rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Raise the c2c rate step by step until p99 send→deliver exceeds the bound or loss appears.
    Max {
        /// Users, one connection each.
        #[arg(long, short = 'n', default_value_t = 2000)]
        users: u32,
        /// Rate of the first step, messages per second.
        #[arg(long, default_value_t = 2000.0)]
        start_rate: f64,
        /// Added to the rate at each step, messages per second.
        #[arg(long, default_value_t = 2000.0)]
        step: f64,
        /// Seconds of sending per step.
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        /// A step passes while p99 send→deliver stays at or below this (and nothing is lost).
        #[arg(long, default_value_t = 10.0)]
        p99_bound_ms: f64,
        /// Stop after this many steps even if every step passed.
        #[arg(long, default_value_t = 30)]
        max_steps: u32,
        /// Seconds of sending at the first step's rate before the steps, not judged: the first
        /// message of each user after login loads its state, and a step right after thousands of
        /// logins measures that. Its loss is still counted (any loss fails the run); 0 skips it.
        #[arg(long, default_value_t = 2.0)]
        warmup_secs: f64,
    },
    /// All N connections drop and log in again at once; time until all are back, and no message
    /// acknowledged before the storm is lost.
    Storm {
        /// Connections (one user each).
        #[arg(long, short = 'n', default_value_t = 2000)]
        conns: u32,
        /// Messages per user sent right before the drop (their deliveries may be cut off).
        #[arg(long, default_value_t = 2.0)]
        msgs_per_user: f64,
        /// Seconds over which those messages are sent.
        #[arg(long, default_value_t = 2.0)]
        send_secs: f64,
        /// Reconnect rate during the storm, connections/s (0 = all at once).
        #[arg(long, default_value_t = 0.0)]
        storm_rate: f64,
        /// Fraction of the connections that drop (users whose index mod 1000 is below
        /// fraction × 1000); the others stay online through the storm.
        #[arg(long, default_value_t = 1.0)]
        storm_fraction: f64,
    },
    /// Group fan-out (c2g): G groups of M members among N users; owners create them, then random
    /// members post at R posts/s in total for D seconds; every member copy is counted.
    Group {
        /// Users, one connection each.
        #[arg(long, short = 'n', default_value_t = 2000)]
        users: u32,
        /// Members per group, owner included (at most 2000, the server's limit). Group k is
        /// users [k*M .. k*M+M) mod N; its first member owns and creates it.
        #[arg(long, short = 'm', default_value_t = 10)]
        members: u32,
        /// Number of groups (default N / M: every user in exactly one group).
        #[arg(long, short = 'g')]
        groups: Option<u32>,
        /// Posts per second over all members (each post is delivered M times).
        #[arg(long, default_value_t = 200.0)]
        msg_rate: f64,
        /// Seconds of posting.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Large group (read diffusion): ONE group of M members of which the N connected users are
    /// the first (users N..M never connect); user 0 creates it with up to --create-members and
    /// adds the rest with `GroupAdd`s of --add-batch; then random connected members post at R
    /// posts/s for D seconds and every connected member must get every post (`GroupDeliver`)
    /// once, in the group's seq order; with --mention-all the owner then posts one `@all`.
    LargeGroup {
        /// Connected users (online members), one connection each.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        users: u32,
        /// Members of the group (the connected users are members 0..N; the others are user ids
        /// that never connect).
        #[arg(long, short = 'm', default_value_t = 100_000)]
        members: u32,
        /// Posts per second over all connected members (each post reaches every one of them).
        #[arg(long, default_value_t = 10.0)]
        msg_rate: f64,
        /// Seconds of posting.
        #[arg(long, default_value_t = 30.0)]
        secs: f64,
        /// Members per `GroupAdd` (at most 65 535: a u16 count).
        #[arg(long, default_value_t = 2000)]
        add_batch: u32,
        /// `GroupAdd`s in flight at once (1: each waits for the previous one's `OpResult`).
        #[arg(long, default_value_t = 1)]
        add_window: u32,
        /// Members of the `GroupCreate`, the creator included (the server's limit: 2000).
        #[arg(long, default_value_t = im_shared::proto::MAX_GROUP_MEMBERS as u32)]
        create_members: u32,
        /// After the build, wait at most this long for every connected member to have the
        /// group's `BecameLarge` event in its own timeline (its shard then sends it the posts).
        #[arg(long, default_value_t = 60.0)]
        ready_secs: f64,
        /// The target: p99 send→deliver over every member copy at or below this (reported; a
        /// miss does not fail the run).
        #[arg(long, default_value_t = 50.0)]
        p99_bound_ms: f64,
        /// After the posts drained: the owner (user 0) posts ONE `@all` (a `SendC2g` mentioning
        /// uid 0) and every other connected member must get exactly one mention entry
        /// (`Deliver` of conv 7 with the post's msg_id) in its own timeline.
        #[arg(long)]
        mention_all: bool,
        /// Wait at most this long for every connected member's `@all` mention entry.
        #[arg(long, default_value_t = 120.0)]
        mention_all_secs: f64,
    },
    /// Logins per second with the handshakes kept out of the window: one process connects N
    /// sockets first, then sends N `Login`s at once and reads every `LoginResult`; R rounds of
    /// new users. Reports logins/s, send->result latency and each side's CPU per login
    /// (`--server-pid`). Needs no worker processes; N is at most 19 000 (one process).
    Logins {
        /// Connections (one new user each) per round.
        #[arg(long, short = 'n', default_value_t = 18_000)]
        conns: u32,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Internal: a worker process started by the coordinator.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        plan: String,
    },
}

fn main() {
    // No transparent huge pages (inherited by the worker processes), unless IM_HUGE_PAGES=1: a
    // huge-page fault zeroes 2 MiB inside the executor thread, which took 17 ms per page on
    // this project's VM and showed up as latency of the server (the server does the same).
    if std::env::var("IM_HUGE_PAGES").map_or(true, |v| v != "1") {
        // SAFETY: prctl(2) with PR_SET_THP_DISABLE takes plain integers and touches no memory.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    let cli = Cli::parse();
    let res = match &cli.scenario {
        Scenario::Worker { plan } => worker::main(plan),
        Scenario::Logins { conns, rounds } => burst::main(&cli.common, *conns, *rounds),
        _ => coord::main(&cli),
    };
    if let Err(e) = res {
        eprintln!("im-loadgen: {e:#}");
        std::process::exit(1);
    }
}
