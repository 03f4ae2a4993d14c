//! `im-cli`: a terminal chat client on the `im-shared` client SDK.
//!
//! ```text
//! im-cli --uid 1                 # log in as user 1 (development token minted locally)
//! > @2 hello bob                 # send to user 2
//! > /to 2                        # make user 2 the default peer, then type plain lines
//! > /sync   /quit   /help
//! ```
//! Incoming messages print as they arrive; `✓` marks a server ack (durable), `✓✓` a delivery
//! ack from one of the recipient's devices. The last seq held is kept in a state file so a
//! restart syncs only what was missed.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use im_shared::client::{Client, Timeline};
use im_shared::proto::Message;
use im_shared::token::{now_secs, HmacTokens};
use im_shared::{Command, DeviceType, Seq, UserId};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Terminal IM client")]
struct Args {
    /// Server (gate) address.
    #[arg(long, default_value = "127.0.0.1:7000", env = "IM_SERVER")]
    server: SocketAddr,
    /// Your user id.
    #[arg(long)]
    uid: u64,
    /// SSO token; when absent one is minted with --secret (development issuer).
    #[arg(long, env = "IM_TOKEN")]
    token: Option<String>,
    /// Development token secret (the server's `token_secret`).
    #[arg(
        long,
        env = "IM_TOKEN_SECRET",
        default_value = "dev-secret-change-me",
        hide_env_values = true
    )]
    secret: String,
    /// Device type: phone, tablet, desktop or web.
    #[arg(long, default_value = "desktop")]
    device: String,
    /// Device id (defaults to cli-<device>).
    #[arg(long)]
    device_id: Option<String>,
    /// Directory for the last-seq state file.
    #[arg(long, default_value = ".im-cli")]
    state_dir: PathBuf,
}

fn show(m: &Message, me: UserId, sent_here: &std::collections::HashSet<u64>) {
    if sent_here.contains(&m.msg_id.0) {
        return; // already shown when it was sent from this terminal
    }
    let body = String::from_utf8_lossy(&m.body);
    if m.from == me {
        println!("[{}] you → {}: {}", m.seq, m.to, body);
    } else {
        println!("[{}] {} → you: {}", m.seq, m.from, body);
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let me = UserId(a.uid);
    let device = DeviceType::parse(&a.device).context("device must be phone|tablet|desktop|web")?;
    let device_id = a.device_id.unwrap_or_else(|| format!("cli-{}", a.device));
    let token = a
        .token
        .unwrap_or_else(|| HmacTokens::new(a.secret.as_bytes()).mint(me, now_secs() + 7 * 86_400));
    std::fs::create_dir_all(&a.state_dir)?;
    let state = a.state_dir.join(format!("{}-{}.seq", a.uid, device_id));
    let last = std::fs::read_to_string(&state)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);

    let mut c = Client::connect(a.server).with_context(|| format!("connecting to {}", a.server))?;
    let info = c.login(me, &token, device, &device_id, Seq(last))?;
    println!(
        "logged in as {me} ({device:?}, {device_id}); server max seq {}, you hold {last}",
        info.max_seq
    );
    let mut tl = Timeline::new(Seq(last));
    let mut sent_here = std::collections::HashSet::new();
    if info.max_seq.0 > last {
        let n = tl.sync(&mut c)?;
        println!("synced {n} message(s) you missed:");
        for m in &tl.messages {
            show(m, me, &sent_here);
        }
        c.deliver_ack(tl.last_seq)?;
    }
    std::fs::write(&state, tl.last_seq.0.to_string())?;
    println!("type `@<uid> text` to send, `/to <uid>` to pick a peer, `/help` for more");

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let heartbeat = Duration::from_secs(u64::from(info.heartbeat_secs.max(5)));
    let mut last_beat = Instant::now();
    let mut peer: Option<UserId> = None;
    let mut next_cmid = now_secs() * 1_000_000;
    loop {
        match rx.try_recv() {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let (to, text) = if let Some(rest) = line.strip_prefix('@') {
                    let (u, t) = rest.split_once(' ').unwrap_or((rest, ""));
                    match u.parse() {
                        Ok(u) => (Some(UserId(u)), t.to_owned()),
                        Err(_) => {
                            println!("! bad user id {u:?}");
                            continue;
                        }
                    }
                } else if let Some(u) = line.strip_prefix("/to ") {
                    match u.trim().parse() {
                        Ok(u) => {
                            peer = Some(UserId(u));
                            println!("now talking to {u}");
                        }
                        Err(_) => println!("! bad user id"),
                    }
                    continue;
                } else if line == "/sync" {
                    let n = tl.sync(&mut c)?;
                    println!("synced {n} new message(s); last seq {}", tl.last_seq);
                    continue;
                } else if line == "/quit" {
                    c.logout()?;
                    println!("logged out");
                    return Ok(());
                } else if line == "/help" {
                    println!("@<uid> <text>  send to a user\n/to <uid>      set the default peer\n/sync          fetch missed messages\n/quit          log out");
                    continue;
                } else {
                    (peer, line.to_owned())
                };
                let Some(to) = to else {
                    println!("! no peer: use `@<uid> text` or `/to <uid>`");
                    continue;
                };
                next_cmid += 1;
                match c.send_c2c(to, next_cmid, text.clone()) {
                    Ok(ack) => {
                        sent_here.insert(ack.msg_id.0);
                        tl.on_sent(&ack, me, to, text.into());
                        println!("  ✓ sent (msg {}, seq {})", ack.msg_id, ack.seq)
                    }
                    Err(e) => println!("! not sent: {e} (retry is safe)"),
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                c.logout().ok();
                return Ok(());
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        match c.recv(Duration::from_millis(100))? {
            Some(Command::Deliver(m)) => {
                let before = tl.messages.len();
                tl.on_deliver(&mut c, &m)?;
                for m in &tl.messages[before..] {
                    show(m, me, &sent_here);
                }
                std::fs::write(&state, tl.last_seq.0.to_string())?;
            }
            Some(Command::Delivered { msg_id, recipient }) => {
                println!("  ✓✓ msg {msg_id} delivered to {recipient}");
            }
            Some(Command::Kickout { message, .. }) => {
                println!("! kicked out: {message}");
                return Ok(());
            }
            Some(Command::Error { code, message }) => {
                println!("! server error {code:?}: {message}")
            }
            Some(_) | None => {}
        }
        if last_beat.elapsed() >= heartbeat {
            c.send_cmd(&Command::Heartbeat)?;
            last_beat = Instant::now();
        }
    }
}
