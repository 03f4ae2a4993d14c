//! `im-cli`: a terminal chat client on the `im-shared` client SDK.
//!
//! ```text
//! im-cli --uid 1                 # log in as user 1 (development token minted locally)
//! > @2 hello bob                 # send to user 2
//! > /to 2                        # make user 2 the default peer, then type plain lines
//! > /group new team 2,3          # create a group with users 2 and 3 (prints its id)
//! > #<group id> hello team       # post to a group
//! > /groups  /group info <id>  /group add <id> 4  /group rm <id> 4  /group leave <id>
//! > /recall <msg id>             # recall your own message (within the recall window)
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
use im_client::{Client, Timeline};
use im_shared::proto::{
    GroupEvent, GroupEventKind, MarkerBody, Message, CONV_C2C, CONV_C2G, CONV_GROUP_EVENT,
    CONV_READ, CONV_RECALL, CONV_S2C,
};
use im_shared::token::{now_secs, HmacTokens};
use im_shared::{Command, DeviceType, GroupId, MsgId, Seq, UserId};

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
    let who = if m.from == me {
        "you".to_owned()
    } else {
        m.from.to_string()
    };
    match m.conv {
        CONV_C2C if m.from == me => println!("[{}] you → {}: {}", m.seq, m.to, body),
        CONV_C2C => println!("[{}] {} → you: {}", m.seq, m.from, body),
        CONV_C2G => println!("[{}] #{} {}: {}", m.seq, m.to, who, body),
        CONV_S2C => println!("[{}] (service {}): {}", m.seq, m.from, body),
        CONV_RECALL => match MarkerBody::decode(m.body.clone()) {
            Ok(r) => println!("[{}] {} recalled msg {}", m.seq, who, r.msg_id),
            Err(_) => println!("[{}] {} recalled a message", m.seq, who),
        },
        CONV_READ => match MarkerBody::decode(m.body.clone()) {
            Ok(r) => println!("[{}] {} read up to msg {}", m.seq, who, r.msg_id),
            Err(_) => println!("[{}] {} read", m.seq, who),
        },
        CONV_GROUP_EVENT => match GroupEvent::decode(m.body.clone()) {
            Ok(e) => println!(
                "[{}] {}",
                m.seq,
                group_event_line(m.to.0, m.from.0, m.from == me, &e)
            ),
            Err(_) => println!("[{}] #{} group changed", m.seq, m.to),
        },
        k => println!("[{}] kind {k} from {}: {}", m.seq, who, body),
    }
}

/// A group event in words: `#7: 12 added 3, 4`. Events made through the HTTP API have no
/// acting user (`from` 0): "an administrator".
fn group_event_line(group: u64, from: u64, is_me: bool, e: &GroupEvent) -> String {
    let who = match (is_me, from) {
        (true, _) => "you".to_owned(),
        (false, 0) => "an administrator".to_owned(),
        (false, u) => u.to_string(),
    };
    let users = e
        .users
        .iter()
        .map(|u| u.0.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let what = match e.kind {
        GroupEventKind::Created => format!("{who} created the group with {users}"),
        GroupEventKind::MembersAdded => format!("{who} added {users}"),
        GroupEventKind::MembersRemoved => format!("{who} removed {users}"),
        GroupEventKind::MemberLeft => format!("{users} left"),
        GroupEventKind::Updated => format!("{who} updated the name or announcement"),
    };
    format!("#{group}: {what}")
}

fn uids(s: &str) -> Option<Vec<UserId>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse().ok().map(UserId))
        .collect()
}

/// `/group …` and `/groups`; prints what happened.
fn group_command(c: &mut Client, line: &str) -> Result<(), im_client::ClientError> {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let gid = |i: usize| parts.get(i).and_then(|p| p.parse().ok()).map(GroupId);
    match parts.as_slice() {
        ["/groups"] => {
            for (g, name) in c.my_groups()? {
                println!("  #{g} {name}");
            }
        }
        ["/group", "new", name, rest @ ..] => {
            let Some(members) = uids(&rest.join(",")) else {
                println!("! bad member list");
                return Ok(());
            };
            let g = c.create_group(name, &members)?;
            println!("created group #{g}; post with `#{g} text`");
        }
        ["/group", "info", _] => {
            let Some(g) = gid(2) else {
                println!("! bad group id");
                return Ok(());
            };
            let (d, members) = c.group_info(g)?;
            println!("#{} {:?} owner {} announcement {:?}", d.group, d.name, d.owner, d.announcement);
            for (u, role) in members {
                println!("  {u}{}", if role == im_shared::proto::ROLE_OWNER { " (owner)" } else { "" });
            }
        }
        ["/group", op @ ("add" | "rm"), _, list] => {
            let (Some(g), Some(members)) = (gid(2), uids(list)) else {
                println!("! usage: /group add|rm <group> <uid,uid>");
                return Ok(());
            };
            if *op == "add" {
                c.group_add(g, &members)?;
            } else {
                c.group_remove(g, &members)?;
            }
            println!("  ✓ done");
        }
        ["/group", "leave", _] => {
            let Some(g) = gid(2) else {
                println!("! bad group id");
                return Ok(());
            };
            c.group_leave(g)?;
            println!("  ✓ left #{g}");
        }
        _ => println!("! usage: /groups | /group new <name> <uid,uid> | /group info|leave <id> | /group add|rm <id> <uid,uid>"),
    }
    Ok(())
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
                    println!("@<uid> <text>  send to a user\n/to <uid>      set the default peer\n#<group> <text> post to a group\n/groups, /group new|info|add|rm|leave  groups\n/recall <msg>  recall your message\n/sync          fetch missed messages\n/quit          log out");
                    continue;
                } else if line.starts_with("/group") {
                    if let Err(e) = group_command(&mut c, line) {
                        println!("! {e}");
                    }
                    continue;
                } else if let Some(rest) = line.strip_prefix('#') {
                    let (g, t) = rest.split_once(' ').unwrap_or((rest, ""));
                    let Ok(g) = g.parse() else {
                        println!("! bad group id {g:?}");
                        continue;
                    };
                    next_cmid += 1;
                    match c.send_c2g(GroupId(g), next_cmid, t.to_owned()) {
                        Ok(ack) => println!("  ✓ posted (msg {})", ack.msg_id),
                        Err(e) => println!("! not posted: {e}"),
                    }
                    continue;
                } else if let Some(id) = line.strip_prefix("/recall ") {
                    let Some(m) = id
                        .trim()
                        .parse()
                        .ok()
                        .and_then(|id| {
                            tl.messages
                                .iter()
                                .find(|m| m.msg_id == MsgId(id) && m.from == me)
                        })
                        .cloned()
                    else {
                        println!("! not one of your messages here");
                        continue;
                    };
                    let conv = if m.conv == CONV_C2G {
                        CONV_C2G
                    } else {
                        CONV_C2C
                    };
                    next_cmid += 1;
                    match c.recall(conv, m.to.0, m.msg_id, next_cmid) {
                        Ok(_) => println!("  ✓ recalled msg {}", m.msg_id),
                        Err(e) => println!("! not recalled: {e}"),
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_events_read_as_sentences() {
        let ev = |kind, users: &[u64]| GroupEvent {
            kind,
            users: users.iter().copied().map(UserId).collect(),
        };
        assert_eq!(
            group_event_line(7, 12, false, &ev(GroupEventKind::MembersAdded, &[3, 4])),
            "#7: 12 added 3, 4"
        );
        assert_eq!(
            group_event_line(7, 0, false, &ev(GroupEventKind::MembersAdded, &[1, 2])),
            "#7: an administrator added 1, 2"
        );
        assert_eq!(
            group_event_line(7, 5, true, &ev(GroupEventKind::Created, &[5, 6])),
            "#7: you created the group with 5, 6"
        );
        assert_eq!(
            group_event_line(7, 9, false, &ev(GroupEventKind::MemberLeft, &[9])),
            "#7: 9 left"
        );
    }
}
