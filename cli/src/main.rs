//! `im-cli`: a terminal chat client on the `im-shared` client SDK.
//!
//! ```text
//! im-cli --uid 1                 # log in as user 1 (development token minted locally)
//! > @2 hello bob                 # send to user 2
//! > /to 2                        # make user 2 the default peer, then type plain lines
//! > /group new team 2,3          # create a group with users 2 and 3 (prints its id)
//! > #<group id> hello team       # post to a group
//! > #<group id> @4 @all look      # `@<uid>` and `@all` words mention (in a large group, @all:
//!                                # owner and admins, every member gets it in its own timeline)
//! > /groups  /group info <id>  /group add <id> 4  /group rm <id> 4  /group leave <id>
//! > /group sync <id> [after]  /group members <id> [after]   # a large group's posts, its members
//! > /group posting <id> owner  # only the owner and admins post (a channel); `all` opens it again
//! > /group admin <id> <uid> on  # make a member an admin (`off`: a member again); owner only
//! > /recall <msg id>             # recall your own message (within the recall window)
//! > /org  /org <dept> [offset]   # the organisation tree: top level, a department (50 a page)
//! > /who <uid>  /find <text>     # a person's departments; departments and people by name
//! > /sync   /quit   /help
//! ```
//! Incoming messages print as they arrive; `✓` marks a server ack (durable), `✓✓` a delivery
//! ack from one of the recipient's devices. The last seq held is kept in a state file so a
//! restart syncs only what was missed. A local copy of the organisation tree is synced after
//! login and again, incrementally, whenever the server announces a change (`OrgChanged`); the
//! `/org`, `/who` and `/find` views come from the server, the paths above a department from the
//! local copy.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use im_client::core::{Config, Event, Gate};
use im_client::session::Session;
use im_client::{ClientError, Requests};
use im_shared::files::{FileKind, FileRef};
use im_shared::org::{OrgEntity, OrgRecord, OrgTree};
use im_shared::proto::{
    GroupEvent, GroupEventKind, MarkerBody, Message, CONV_C2C, CONV_C2G, CONV_GROUP_EVENT,
    CONV_MENTION, CONV_READ, CONV_RECALL, CONV_S2C, MAX_MENTIONS,
};
use im_shared::token::{now_secs, HmacTokens};
use im_shared::{DeviceType, GroupId, MsgId, Seq, UserId};

#[global_allocator]
static GLOBAL: im_shared::alloc::Mimalloc = im_shared::alloc::Mimalloc;

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

/// A message of the user's own timeline.
fn show(m: &Message, me: UserId) {
    show_with(m, me, &format!("/fetch {}", m.seq));
}

/// A post of a large group's own timeline (its seq is the group's).
fn show_group_post(m: &Message, me: UserId) {
    show_with(m, me, &format!("/fetch #{} {}", m.to, m.seq));
}

/// What a message says; `fetch` is the command that saves its file, if it is a file message.
fn show_with(m: &Message, me: UserId, fetch: &str) {
    let body = match file_line(&m.body) {
        Some(f) => format!("{f} — `{fetch} <path>`"),
        None => String::from_utf8_lossy(&m.body).into_owned(),
    };
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
        CONV_MENTION => println!("[{}] #{} {} mentioned you: {}", m.seq, m.to, who, body),
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

/// The members a post's text mentions: every `@<uid>` word, and `@all` as uid 0 (at most
/// [`MAX_MENTIONS`], the first ones; repeats once).
fn mentions_in(text: &str) -> Vec<UserId> {
    let mut out: Vec<UserId> = Vec::new();
    for w in text.split_whitespace() {
        let Some(name) = w.strip_prefix('@') else {
            continue;
        };
        let name = name.trim_end_matches(|c: char| c.is_ascii_punctuation());
        let uid = match name {
            "all" => UserId(0),
            n => match n.parse() {
                Ok(u) if u != 0 => UserId(u),
                _ => continue,
            },
        };
        if !out.contains(&uid) && out.len() < MAX_MENTIONS {
            out.push(uid);
        }
    }
    out
}

/// A file message in words (`None`: not one): `[image cat.png, image/png, 640×480, 12 345 bytes]`.
fn file_line(body: &bytes::Bytes) -> Option<String> {
    let f = match FileRef::from_body(body) {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => return Some(format!("[unreadable file message: {e}]")),
    };
    let mut parts = vec![
        format!("{} {}", f.kind.name(), f.name).trim().to_owned(),
        f.mime,
    ];
    if f.width > 0 && f.height > 0 {
        parts.push(format!("{}×{}", f.width, f.height));
    }
    if f.duration_ms > 0 {
        parts.push(format!("{:.1} s", f.duration_ms as f64 / 1000.0));
    }
    parts.push(format!("{} bytes", f.size));
    Some(format!("[{}]", parts.join(", ")))
}

/// The kind and MIME type of a file to send, from its extension.
fn guess_kind(path: &std::path::Path) -> (FileKind, &'static str) {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => (FileKind::Image, "image/png"),
        "jpg" | "jpeg" => (FileKind::Image, "image/jpeg"),
        "gif" => (FileKind::Image, "image/gif"),
        "webp" => (FileKind::Image, "image/webp"),
        "mp3" => (FileKind::Voice, "audio/mpeg"),
        "ogg" | "opus" => (FileKind::Voice, "audio/ogg"),
        "m4a" | "aac" => (FileKind::Voice, "audio/mp4"),
        "wav" => (FileKind::Voice, "audio/wav"),
        "mp4" => (FileKind::Video, "video/mp4"),
        "mov" => (FileKind::Video, "video/quicktime"),
        "webm" => (FileKind::Video, "video/webm"),
        "pdf" => (FileKind::File, "application/pdf"),
        "txt" => (FileKind::File, "text/plain"),
        _ => (FileKind::File, "application/octet-stream"),
    }
}

/// `/send <uid>|#<group> <path>`: uploads the file and sends a message that references it;
/// returns the message's `client_msg_id` and what to print when it is acknowledged.
fn send_file(s: &mut Session, target: &str, path: &str) -> anyhow::Result<(u64, Option<String>)> {
    let path = std::path::Path::new(path);
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (kind, mime) = guess_kind(path);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_owned();
    let f = s.upload_file(kind, mime, &name, &data, 1 << 20)?;
    let line = file_line(&f.to_body()).unwrap_or_default();
    if let Some(g) = target.strip_prefix('#') {
        let g: u64 = g.parse().context("bad group id")?;
        let cmid = s.send_c2g(GroupId(g), None, f.to_body(), Vec::new())?;
        println!("  (posting {line} to #{g})");
        Ok((cmid, None))
    } else {
        let u: u64 = target.parse().context("bad user id")?;
        let cmid = s.send_c2c(UserId(u), None, f.to_body())?;
        Ok((cmid, Some(format!(" {line}"))))
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
        GroupEventKind::BecameLarge => {
            "is now a large group: its posts come live and are read with /group sync".to_owned()
        }
        GroupEventKind::AdminAdded => format!("{who} made {users} admin"),
        GroupEventKind::AdminRemoved => format!("{who} made {users} a member again"),
    };
    format!("#{group}: {what}")
}

/// Where a large group stands at login: `#7: 12 posts, read up to 10 (/group sync 7 10)`.
fn heads_line(h: &im_shared::proto::GroupHead) -> String {
    format!(
        "#{}: {} posts, read up to {} (/group sync {} {})",
        h.group, h.head, h.read, h.group, h.read
    )
}

/// A presence change as a line: `● 42 is online`, `○ 42 went offline at 12:04:05 UTC`.
fn presence_line(e: &im_shared::proto::PresenceEntry) -> String {
    if e.online {
        return format!("● {} is online", e.uid);
    }
    if e.last_seen_ms == 0 {
        return format!("○ {} is offline", e.uid);
    }
    let secs = e.last_seen_ms / 1000 % 86_400;
    format!(
        "○ {} went offline at {:02}:{:02}:{:02} UTC",
        e.uid,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A typing notice as a line: `… 42 is typing` (`#7: 42 is typing` in a group).
fn typing_line(conv: u8, peer: u64, from: UserId, state: u8) -> String {
    let what = if state == 1 {
        "is typing"
    } else {
        "stopped typing"
    };
    if conv == CONV_C2G {
        format!("… #{peer}: {from} {what}")
    } else {
        format!("… {from} {what}")
    }
}

fn uids(s: &str) -> Option<Vec<UserId>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse().ok().map(UserId))
        .collect()
}

/// `/group …` and `/groups`; prints what happened.
fn group_command(c: &mut impl Requests, line: &str) -> Result<(), im_client::ClientError> {
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
                let role = match role {
                    im_shared::proto::ROLE_OWNER => " (owner)",
                    im_shared::proto::ROLE_ADMIN => " (admin)",
                    _ => "",
                };
                println!("  {u}{role}");
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
        ["/group", "admin", _, uid, on @ ("on" | "off")] => {
            let (Some(g), Ok(u)) = (gid(2), uid.parse::<u64>()) else {
                println!("! usage: /group admin <id> <uid> on|off");
                return Ok(());
            };
            c.group_role(g, UserId(u), *on == "on")?;
            println!("  ✓ {u} is {} of #{g}", if *on == "on" { "an admin" } else { "a member" });
        }
        ["/group", "posting", _, who @ ("owner" | "all")] => {
            let Some(g) = gid(2) else {
                println!("! usage: /group posting <id> owner|all");
                return Ok(());
            };
            c.group_posting(g, *who == "owner")?;
            if *who == "owner" {
                println!("  ✓ #{g} is a channel: only its owner posts");
            } else {
                println!("  ✓ every member of #{g} may post");
            }
        }
        ["/group", "sync", _, rest @ ..] => {
            let after = rest.first().and_then(|p| p.parse().ok()).unwrap_or(0);
            let Some(g) = gid(2) else {
                println!("! usage: /group sync <id> [after seq]");
                return Ok(());
            };
            let (posts, more, head) = c.group_sync(g, Seq(after), 50)?;
            let last = posts.last().map_or(after, |m| m.seq.0);
            for m in &posts {
                let body = match file_line(&m.body) {
                    Some(f) => format!("{f} — `/fetch #{g} {} <path>`", m.seq),
                    None => String::from_utf8_lossy(&m.body).into_owned(),
                };
                println!("  #{g} [{}] {}: {body}", m.seq, m.from);
            }
            if more {
                println!("  … more up to {head}: /group sync {g} {last}");
            } else if last > 0 {
                c.group_read(g, Seq(last))?;
            }
        }
        ["/group", "members", _, rest @ ..] => {
            let after = rest.first().and_then(|p| p.parse().ok()).unwrap_or(0);
            let Some(g) = gid(2) else {
                println!("! usage: /group members <id> [after uid]");
                return Ok(());
            };
            let im_client::MembersPage {
                total,
                more,
                members: page,
            } = c.group_members(g, UserId(after), 50)?;
            let list: Vec<String> = page.iter().map(|(u, _)| u.to_string()).collect();
            println!("  #{g}: {total} members: {}", list.join(", "));
            if let (true, Some((u, _))) = (more, page.last()) {
                println!("  … /group members {g} {u}");
            }
        }
        _ => println!("! usage: /groups | /group new <name> <uid,uid> | /group info|leave <id> | /group add|rm <id> <uid,uid> | /group sync <id> [after] | /group members <id> [after] | /group posting <id> owner|all | /group admin <id> <uid> on|off"),
    }
    Ok(())
}

/// Members shown per `/org <dept>` page.
const ORG_PAGE: u16 = 50;
/// Matches shown by `/find`.
const FIND_LIMIT: u16 = 20;

/// An organisation-tree command typed by the user.
#[derive(Clone, Debug, PartialEq, Eq)]
enum OrgCmd {
    /// `/org [<dept> [<offset>]]`: department 0 is the top level.
    Dept { dept: u64, offset: u32 },
    /// `/who <uid>`.
    Who(u64),
    /// `/find <text>`.
    Find(String),
}

/// Parses `/org`, `/who` and `/find` lines: `None` for any other line, `Some(Err(usage))` for
/// one of them with bad arguments.
fn parse_org_command(line: &str) -> Option<Result<OrgCmd, &'static str>> {
    let line = line.trim();
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let args: Vec<&str> = rest.split_whitespace().collect();
    Some(match word {
        "/org" => {
            const USAGE: &str = "usage: /org [<dept id> [<offset>]]";
            match args.as_slice() {
                [] => Ok(OrgCmd::Dept { dept: 0, offset: 0 }),
                [d] => d
                    .parse()
                    .map(|dept| OrgCmd::Dept { dept, offset: 0 })
                    .map_err(|_| USAGE),
                [d, o] => match (d.parse(), o.parse()) {
                    (Ok(dept), Ok(offset)) => Ok(OrgCmd::Dept { dept, offset }),
                    _ => Err(USAGE),
                },
                _ => Err(USAGE),
            }
        }
        "/who" => match args.as_slice() {
            [u] => u.parse().map(OrgCmd::Who).map_err(|_| "usage: /who <uid>"),
            _ => Err("usage: /who <uid>"),
        },
        "/find" => match rest.trim() {
            "" => Err("usage: /find <text>"),
            q => Ok(OrgCmd::Find(q.to_owned())),
        },
        _ => return None,
    })
}

/// The names of the departments from the top down to `dept` in `tree` (empty if not held).
fn dept_path(tree: &OrgTree, dept: u64) -> Vec<String> {
    tree.path(dept)
        .into_iter()
        .filter_map(|id| tree.dept(id).map(|d| d.name.clone()))
        .collect()
}

fn person_names(records: &[OrgRecord]) -> std::collections::HashMap<u64, &str> {
    records
        .iter()
        .filter(|r| !r.deleted)
        .filter_map(|r| match &r.entity {
            OrgEntity::Person(p) => Some((p.uid, p.name.as_str())),
            _ => None,
        })
        .collect()
}

/// The lines of `/org [<dept> [<offset>]]` from an `OrgDept` reply (`total` members, `records`:
/// the department, its sub-departments, a page of members starting at `offset`). `path`: the
/// department names from the top (from the local tree; empty: unknown, the reply's name is used).
fn format_dept(
    dept: u64,
    offset: u32,
    total: u32,
    records: &[OrgRecord],
    path: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    let mut children = Vec::new();
    let mut members = Vec::new();
    let mut name = None;
    for r in records.iter().filter(|r| !r.deleted) {
        match &r.entity {
            OrgEntity::Dept(d) if d.id == dept => name = Some(d.name.as_str()),
            OrgEntity::Dept(d) => children.push(d),
            OrgEntity::Member(m) => members.push(m),
            OrgEntity::Person(_) => {}
        }
    }
    let names = person_names(records);
    if dept == 0 {
        if children.is_empty() {
            out.push("the organisation tree is empty".to_owned());
        } else {
            out.push("top-level departments:".to_owned());
        }
    } else {
        let title = if path.is_empty() {
            name.unwrap_or("?").to_owned()
        } else {
            path.join(" / ")
        };
        out.push(format!("{title}  (dept {dept})"));
        if !children.is_empty() {
            out.push("  sub-departments:".to_owned());
        }
    }
    let indent = if dept == 0 { "  " } else { "    " };
    for d in &children {
        let hidden = if d.hidden { "  (hidden)" } else { "" };
        out.push(format!("{indent}{}  {}{hidden}", d.id, d.name));
    }
    if dept == 0 && total == 0 {
        return out;
    }
    if total == 0 {
        out.push("  no members".to_owned());
    } else if members.is_empty() {
        out.push(format!("  no members from {offset} ({total} in all)"));
    } else {
        let first = u64::from(offset) + 1;
        let last = u64::from(offset) + members.len() as u64;
        out.push(format!("  members {first}-{last} of {total}:"));
        for m in &members {
            let name = names.get(&m.uid).copied().unwrap_or("(no name)");
            if m.title.is_empty() {
                out.push(format!("    {}  {name}", m.uid));
            } else {
                out.push(format!("    {}  {name}, {}", m.uid, m.title));
            }
        }
        if last < u64::from(total) {
            out.push(format!("  more: /org {dept} {last}"));
        }
    }
    out
}

/// The lines of `/who <uid>` from an `OrgUser` reply (the person, the memberships and every
/// department on the paths to them).
fn format_user(uid: u64, records: &[OrgRecord]) -> Vec<String> {
    let mut tree = OrgTree::new();
    for r in records {
        tree.apply(r.clone());
    }
    let name = tree.person(uid).map_or("(no name)", |p| p.name.as_str());
    let mut out = vec![format!("{uid}  {name}")];
    // In the reply's order (the server's order of the user's departments).
    let depts: Vec<u64> = records
        .iter()
        .filter(|r| !r.deleted)
        .filter_map(|r| match &r.entity {
            OrgEntity::Member(m) if m.uid == uid => Some(m.dept),
            _ => None,
        })
        .collect();
    if depts.is_empty() {
        out.push("  in no department".to_owned());
    }
    for dept in depts {
        let path = dept_path(&tree, dept);
        let path = if path.is_empty() {
            format!("dept {dept}")
        } else {
            path.join(" / ")
        };
        match tree.membership(uid, dept) {
            Some(m) if !m.title.is_empty() => {
                out.push(format!("  dept {dept}  {path}, {}", m.title))
            }
            _ => out.push(format!("  dept {dept}  {path}")),
        }
    }
    out
}

/// The lines of `/find <query>` from an `OrgSearch` reply (`total` matches, a page of them in
/// `records`); `tree` (the local copy) gives the paths of departments and people's departments.
fn format_search(query: &str, total: u32, records: &[OrgRecord], tree: &OrgTree) -> Vec<String> {
    let mut out = vec![match total {
        0 => format!("nothing matches {query:?}"),
        1 => format!("1 match for {query:?}:"),
        n => format!("{n} matches for {query:?}:"),
    }];
    let mut shown = 0;
    for r in records.iter().filter(|r| !r.deleted) {
        match &r.entity {
            OrgEntity::Dept(d) => {
                let path = dept_path(tree, d.id);
                let path = if path.is_empty() {
                    d.name.clone()
                } else {
                    path.join(" / ")
                };
                out.push(format!("  dept {}  {path}", d.id));
            }
            OrgEntity::Person(p) => {
                let depts: Vec<&str> = tree
                    .depts_of(p.uid)
                    .into_iter()
                    .filter_map(|d| tree.dept(d).map(|d| d.name.as_str()))
                    .collect();
                if depts.is_empty() {
                    out.push(format!("  user {}  {}", p.uid, p.name));
                } else {
                    out.push(format!(
                        "  user {}  {} ({})",
                        p.uid,
                        p.name,
                        depts.join(", ")
                    ));
                }
            }
            OrgEntity::Member(_) => continue,
        }
        shown += 1;
    }
    if shown < total as usize {
        out.push(format!("  showing {shown} of {total}; narrow the search"));
    }
    out
}

/// The local copy of the organisation tree and the version synced up to.
#[derive(Default)]
struct Org {
    tree: OrgTree,
    /// The version of the last complete sync (the next `since`).
    at: u64,
    /// Whether a sync completed (a failed one at start is retried at the next `/org`).
    synced: bool,
}

impl Org {
    /// Syncs what changed since the last complete sync; returns whether the version moved.
    fn sync(&mut self, c: &mut impl Requests) -> Result<bool, ClientError> {
        let v = c.org_sync_all(&mut self.tree, self.at)?;
        let moved = v != self.at;
        self.at = v;
        self.synced = true;
        Ok(moved)
    }

    /// Brings the local copy up to `version` (seen in a reply or a push) if it is behind.
    fn catch_up(&mut self, c: &mut impl Requests, version: u64) -> Result<bool, ClientError> {
        if self.synced && version <= self.at {
            return Ok(false);
        }
        self.sync(c)
    }
}

/// `/org`, `/who`, `/find`: asks the server, prints the answer.
fn org_command(c: &mut impl Requests, org: &mut Org, cmd: OrgCmd) -> Result<(), ClientError> {
    let lines = match cmd {
        OrgCmd::Dept { dept, offset } => {
            let (version, total, records) = c.org_dept(dept, offset, ORG_PAGE)?;
            // The path comes from the local copy: make it as new as the answer (best effort).
            org.catch_up(c, version).ok();
            format_dept(dept, offset, total, &records, &dept_path(&org.tree, dept))
        }
        OrgCmd::Who(uid) => {
            let (_, _, records) = c.org_user(UserId(uid))?;
            format_user(uid, &records)
        }
        OrgCmd::Find(query) => {
            let (version, total, records) = c.org_search(&query, FIND_LIMIT)?;
            org.catch_up(c, version).ok();
            format_search(&query, total, &records, &org.tree)
        }
    };
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// What the terminal shows for one event of the session; `Some(())` when the session ended.
struct Term {
    me: UserId,
    state: PathBuf,
    /// `client_msg_id`s of c2c messages sent from this terminal (already shown when typed).
    sent_here: std::collections::HashSet<u64>,
    /// What to print when a send is acknowledged: ` [file …]` or "" (c2c), `None`: a post.
    labels: std::collections::HashMap<u64, Option<String>>,
    /// Timeline entries shown (for `/recall`).
    held: Vec<Message>,
}

impl Term {
    fn on_event(&mut self, s: &mut Session, org: &mut Org, e: Event) -> anyhow::Result<bool> {
        match e {
            Event::Message(m) => {
                // A message typed here was shown when it was typed.
                if !(m.from == self.me && self.sent_here.contains(&m.client_msg_id)) {
                    show(&m, self.me);
                }
                self.held.push(m);
                std::fs::write(&self.state, s.core().last_seq().0.to_string())?;
            }
            Event::Synced { last_seq } => std::fs::write(&self.state, last_seq.0.to_string())?,
            Event::SendAcked {
                client_msg_id,
                msg_id,
                seq,
                ..
            } => match self.labels.remove(&client_msg_id) {
                Some(Some(label)) => println!("  ✓ sent{label} (msg {msg_id}, seq {seq})"),
                Some(None) => println!("  ✓ posted (msg {msg_id})"),
                None => {}
            },
            Event::SendFailed {
                client_msg_id,
                code,
            } => {
                self.labels.remove(&client_msg_id);
                println!("! not sent: {code:?}");
            }
            Event::Delivered { msg_id, recipient } => {
                println!("  ✓✓ msg {msg_id} delivered to {recipient}")
            }
            // A large group's post (its seq is the group's): shown, not kept in the timeline.
            Event::GroupPost(m) => show_group_post(&m, self.me),
            Event::GroupHeads(heads) => {
                for h in &heads {
                    println!("{}", heads_line(h));
                }
            }
            Event::Kicked {
                message,
                will_reconnect,
                ..
            } => {
                println!("! kicked out: {message}");
                return Ok(!will_reconnect);
            }
            Event::Error { code, message } => println!("! server error {code:?}: {message}"),
            Event::Presence(entries) => {
                for e in &entries {
                    println!("{}", presence_line(e));
                }
            }
            Event::Typing {
                conv,
                peer,
                from,
                typing,
            } => println!("{}", typing_line(conv, peer, from, typing as u8)),
            Event::OrgChanged { version } => match org.catch_up(s, version) {
                Ok(true) => println!("(organisation tree updated to v{})", org.at),
                Ok(false) => {}
                Err(e) => println!("! organisation tree not synced: {e}"),
            },
            Event::Disconnected { why } => println!("! connection lost: {why}"),
            Event::Reconnecting { after_ms, .. } => println!("(reconnecting in {after_ms} ms)"),
            Event::LoggedIn { max_seq, .. } => {
                println!("(logged in again; server max seq {max_seq})")
            }
            Event::LoginFailed {
                code,
                message,
                will_retry,
            } => {
                println!("! login refused: {code:?} {message}");
                return Ok(!will_retry);
            }
            Event::LoggedOut => return Ok(true),
            Event::Connecting { .. } | Event::Response { .. } | Event::RequestLost { .. } => {}
        }
        Ok(false)
    }

    /// Shows events until nothing is in flight (the sync, sends, the ack), at most `for_`.
    fn settle(&mut self, s: &mut Session, org: &mut Org, for_: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + for_;
        while !s.core().is_settled() && !s.core().is_stopped() && Instant::now() < deadline {
            if let Some(e) = s.next_event(Duration::from_millis(50)) {
                if self.on_event(s, org, e)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
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

    // The session (im_client::core): login, heartbeats, reconnects, dedup, gap syncs, acks and
    // resends are its rules; this loop prints what it reports and turns lines into calls.
    let gate = Gate {
        id: 1,
        addr: a.server.to_string(),
    };
    let mut cfg = Config::new(me, token, device, device_id.clone(), vec![gate]);
    cfg.last_seq = Seq(last);
    cfg.seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ a.uid.rotate_left(32);
    let mut s = Session::new(cfg);
    s.start();
    let mut org = Org::default();
    let mut t = Term {
        me,
        state: state.clone(),
        sent_here: Default::default(),
        labels: Default::default(),
        held: Vec::new(),
    };
    // The first login: up to 15 s (the session would go on trying; a terminal says why).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut why = String::from("no answer");
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "could not log in to {}: {why}",
            a.server
        );
        match s.next_event(Duration::from_millis(100)) {
            Some(Event::LoggedIn { max_seq, .. }) => {
                println!(
                    "logged in as {me} ({device:?}, {device_id}); server max seq {max_seq}, you hold {last}"
                );
                break;
            }
            Some(Event::LoginFailed {
                code,
                message,
                will_retry: false,
            }) => anyhow::bail!("login refused: {code:?} {message}"),
            Some(Event::Disconnected { why: w }) => why = w,
            _ => {}
        }
    }
    t.settle(&mut s, &mut org, Duration::from_secs(30))?;
    std::fs::write(&state, s.core().last_seq().0.to_string())?;
    match org.sync(&mut s) {
        Ok(_) if org.at == 0 => {}
        Ok(_) => println!(
            "organisation tree v{} ({} departments); `/org` to browse",
            org.at,
            org.tree.dept_count()
        ),
        Err(e) => println!("(organisation tree not synced: {e}; `/org` retries)"),
    }
    println!("type `@<uid> text` to send, `/to <uid>` to pick a peer, `/help` for more");

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
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
                } else if let Some(rest) = line.strip_prefix("/send ") {
                    let Some((target, path)) = rest.trim().split_once(' ') else {
                        println!("! usage: /send <uid>|#<group> <path>");
                        continue;
                    };
                    match send_file(&mut s, target, path.trim()) {
                        Ok((cmid, label)) => {
                            t.labels.insert(cmid, label);
                        }
                        Err(e) => println!("! not sent: {e:#}"),
                    }
                    continue;
                } else if let Some(rest) = line.strip_prefix("/fetch ") {
                    // `/fetch <seq> <path>`, or `/fetch #<group> <seq> <path>` for a large
                    // group's post (its seq is the group's).
                    let rest = rest.trim();
                    let (group, rest) = match rest.strip_prefix('#') {
                        Some(r) => match r.split_once(' ') {
                            Some((g, r)) => (
                                g.parse::<u64>().ok().filter(|g| *g != 0).map(GroupId),
                                r.trim(),
                            ),
                            None => (None, ""),
                        },
                        None => (Some(GroupId(0)), rest),
                    };
                    let Some((group, (seq, path))) = group.zip(
                        rest.split_once(' ')
                            .and_then(|(s, p)| Some((s.parse::<u64>().ok()?, p.trim()))),
                    ) else {
                        println!("! usage: /fetch <seq> <path>, or /fetch #<group> <seq> <path>");
                        continue;
                    };
                    let got = if group.0 == 0 {
                        s.fetch_file(Seq(seq))
                    } else {
                        s.fetch_group_file(group, Seq(seq))
                    };
                    match got {
                        Ok(b) => match std::fs::write(path, &b) {
                            Ok(()) => println!("  ✓ {} bytes written to {path}", b.len()),
                            Err(e) => println!("! cannot write {path}: {e}"),
                        },
                        Err(e) => println!("! not fetched: {e}"),
                    }
                    continue;
                } else if let Some(rest) = line
                    .strip_prefix("/follow")
                    .filter(|r| r.is_empty() || r.starts_with(' '))
                {
                    let list: Result<Vec<u64>, _> =
                        rest.split_whitespace().map(str::parse).collect();
                    match list {
                        Ok(list) => {
                            let users: Vec<UserId> = list.into_iter().map(UserId).collect();
                            match s.presence_subscribe(&users) {
                                Ok(()) => println!(
                                    "  ✓ following the presence of {} user(s)",
                                    users.len()
                                ),
                                Err(e) => println!("! {e}"),
                            }
                        }
                        Err(_) => println!("! usage: /follow <uid> [<uid>…] (none: stop)"),
                    }
                    continue;
                } else if let Some(rest) = line.strip_prefix("/hide ") {
                    let hidden = match rest.trim() {
                        "on" => true,
                        "off" => false,
                        _ => {
                            println!("! usage: /hide on|off");
                            continue;
                        }
                    };
                    match s.set_presence_hidden(hidden) {
                        Ok(()) if hidden => println!("  ✓ your presence is hidden"),
                        Ok(()) => println!("  ✓ your presence is shown"),
                        Err(e) => println!("! {e}"),
                    }
                    continue;
                } else if let Some(rest) = line.strip_prefix("/typing ") {
                    let rest = rest.trim();
                    let target = match rest.strip_prefix('#') {
                        Some(g) => g.parse().map(|g| (CONV_C2G, g)),
                        None => rest.parse().map(|u| (CONV_C2C, u)),
                    };
                    match target {
                        Ok((conv, peer)) => {
                            if let Err(e) = s.typing(conv, peer, true) {
                                println!("! {e}");
                            }
                        }
                        Err(_) => println!("! usage: /typing <uid>|#<group>"),
                    }
                    continue;
                } else if line == "/sync" {
                    match s.sync() {
                        Ok(()) => println!("(syncing from seq {})", s.core().last_seq()),
                        Err(e) => println!("! {e}"),
                    }
                    continue;
                } else if line == "/quit" {
                    t.settle(&mut s, &mut org, Duration::from_secs(10))?;
                    s.logout(Duration::from_secs(5));
                    println!("logged out");
                    return Ok(());
                } else if line == "/help" {
                    println!("@<uid> <text>  send to a user\n/to <uid>      set the default peer\n#<group> <text> post to a group\n/groups, /group new|info|add|rm|leave|sync|members  groups\n/group posting <id> owner|all  make a group a channel (owner and admins post)\n/group admin <id> <uid> on|off  make a member an admin (owner only)\n/recall <msg>  recall your message\n/send <uid>|#<group> <path>  send a file (picture, voice, video, document)\n/fetch <seq> <path>  save the file of message <seq>\n/fetch #<group> <seq> <path>  save the file of a large group's post <seq>\n/org           top-level departments\n/org <dept> [offset]  a department: path, sub-departments, members\n/who <uid>     a person's departments and titles\n/find <text>   departments and people by name\n/follow <uid>… follow users' presence (none: stop)\n/typing <uid>|#<group>  show them you are typing\n/hide on|off   hide your presence from everyone (or show it)\n/sync          fetch missed messages\n/quit          log out");
                    continue;
                } else if let Some(cmd) = parse_org_command(line) {
                    match cmd {
                        Ok(cmd) => {
                            if let Err(e) = org_command(&mut s, &mut org, cmd) {
                                println!("! {e}");
                            }
                        }
                        Err(usage) => println!("! {usage}"),
                    }
                    continue;
                } else if line.starts_with("/group") {
                    if let Err(e) = group_command(&mut s, line) {
                        println!("! {e}");
                    }
                    continue;
                } else if let Some(rest) = line.strip_prefix('#') {
                    let (g, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    let Ok(g) = g.parse() else {
                        println!("! bad group id {g:?}");
                        continue;
                    };
                    let mentions = mentions_in(text);
                    match s.send_c2g(GroupId(g), None, text.to_owned(), mentions) {
                        Ok(cmid) => {
                            t.labels.insert(cmid, None);
                        }
                        Err(e) => println!("! not posted: {e}"),
                    }
                    continue;
                } else if let Some(id) = line.strip_prefix("/recall ") {
                    let Some(m) = id
                        .trim()
                        .parse()
                        .ok()
                        .and_then(|id| {
                            t.held
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
                    match s.recall(conv, m.to.0, m.msg_id, next_cmid) {
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
                // Kept and sent again (same id) until acknowledged, across reconnects.
                match s.send_c2c(to, None, text) {
                    Ok(cmid) => {
                        t.sent_here.insert(cmid);
                        t.labels.insert(cmid, Some(String::new()));
                    }
                    Err(e) => println!("! not sent: {e}"),
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                // End of input: let what is in flight finish, then log out.
                t.settle(&mut s, &mut org, Duration::from_secs(10))?;
                s.logout(Duration::from_secs(5));
                return Ok(());
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if let Some(e) = s.next_event(Duration::from_millis(100)) {
            if t.on_event(&mut s, &mut org, e)? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use im_shared::org::{OrgDept, OrgMember, OrgPerson};

    #[test]
    fn mentions_are_read_from_the_words_of_a_post() {
        assert_eq!(
            mentions_in("@4 see this, @all: and @4 again @x @0 mail@7"),
            vec![UserId(4), UserId(0)]
        );
        assert!(mentions_in("no one").is_empty());
        let many: String = (1..=30).map(|i| format!("@{i} ")).collect();
        assert_eq!(mentions_in(&many).len(), MAX_MENTIONS);
    }

    #[test]
    fn a_large_groups_head_and_switch_are_printed_with_the_command_to_read_it() {
        let h = im_shared::proto::GroupHead {
            group: GroupId(7),
            head: Seq(12),
            read: Seq(10),
        };
        assert_eq!(
            heads_line(&h),
            "#7: 12 posts, read up to 10 (/group sync 7 10)"
        );
        let e = GroupEvent {
            kind: GroupEventKind::BecameLarge,
            users: Vec::new(),
        };
        assert_eq!(
            group_event_line(7, 1, false, &e),
            "#7: is now a large group: its posts come live and are read with /group sync"
        );
    }

    #[test]
    fn presence_and_typing_are_printed_as_sentences() {
        let e = |online, last_seen_ms| im_shared::proto::PresenceEntry {
            uid: UserId(42),
            online,
            last_seen_ms,
        };
        assert_eq!(presence_line(&e(true, 0)), "● 42 is online");
        assert_eq!(presence_line(&e(false, 0)), "○ 42 is offline");
        // 2023-11-14 22:13:20 UTC
        assert_eq!(
            presence_line(&e(false, 1_700_000_000_000)),
            "○ 42 went offline at 22:13:20 UTC"
        );
        assert_eq!(typing_line(CONV_C2C, 42, UserId(42), 1), "… 42 is typing");
        assert_eq!(
            typing_line(CONV_C2G, 7, UserId(42), 0),
            "… #7: 42 stopped typing"
        );
    }

    fn dept(version: u64, id: u64, parent: u64, name: &str) -> OrgRecord {
        OrgRecord {
            version,
            deleted: false,
            entity: OrgEntity::Dept(OrgDept {
                id,
                parent,
                order: 0,
                hidden: false,
                name: name.into(),
            }),
        }
    }

    fn person(version: u64, uid: u64, name: &str) -> OrgRecord {
        OrgRecord {
            version,
            deleted: false,
            entity: OrgEntity::Person(OrgPerson {
                uid,
                name: name.into(),
            }),
        }
    }

    fn member(version: u64, uid: u64, dept: u64, title: &str) -> OrgRecord {
        OrgRecord {
            version,
            deleted: false,
            entity: OrgEntity::Member(OrgMember {
                uid,
                dept,
                order: 0,
                title: title.into(),
            }),
        }
    }

    /// Company(1) ⊃ Engineering(2) ⊃ Storage(3); Alice (101, lead) and Bob (102) in Storage,
    /// Bob in Engineering too.
    fn company() -> Vec<OrgRecord> {
        vec![
            dept(1, 1, 0, "Company"),
            dept(2, 2, 1, "Engineering"),
            dept(3, 3, 2, "Storage"),
            person(4, 101, "Alice Smith"),
            member(5, 101, 3, "lead"),
            person(6, 102, "Bob Jones"),
            member(7, 102, 2, ""),
            member(8, 102, 3, "dev"),
        ]
    }

    fn tree(records: &[OrgRecord]) -> OrgTree {
        let mut t = OrgTree::new();
        for r in records {
            t.apply(r.clone());
        }
        t
    }

    #[test]
    fn org_commands_parse_and_bad_ones_get_a_usage() {
        let p = parse_org_command;
        assert_eq!(p("/org"), Some(Ok(OrgCmd::Dept { dept: 0, offset: 0 })));
        assert_eq!(p(" /org 3 "), Some(Ok(OrgCmd::Dept { dept: 3, offset: 0 })));
        assert_eq!(
            p("/org 3 50"),
            Some(Ok(OrgCmd::Dept {
                dept: 3,
                offset: 50
            }))
        );
        assert_eq!(p("/who 102"), Some(Ok(OrgCmd::Who(102))));
        assert_eq!(
            p("/find  bob jones "),
            Some(Ok(OrgCmd::Find("bob jones".into())))
        );
        for bad in [
            "/org x",
            "/org 3 -1",
            "/org 1 2 3",
            "/who",
            "/who bob",
            "/find",
            "/find  ",
        ] {
            assert!(matches!(p(bad), Some(Err(_))), "{bad}");
        }
        for other in [
            "/organise",
            "/groups",
            "@2 /org",
            "hello",
            "/whoami",
            "/finder x",
        ] {
            assert_eq!(p(other), None, "{other}");
        }
    }

    #[test]
    fn a_department_shows_its_path_sub_departments_and_a_page_of_members() {
        let t = tree(&company());
        assert_eq!(dept_path(&t, 3), vec!["Company", "Engineering", "Storage"]);
        assert!(dept_path(&t, 99).is_empty());
        // The server's answer for Engineering: itself, Storage, then Bob (membership, person).
        let reply = vec![
            dept(2, 2, 1, "Engineering"),
            dept(3, 3, 2, "Storage"),
            member(7, 102, 2, ""),
            person(6, 102, "Bob Jones"),
        ];
        assert_eq!(
            format_dept(2, 0, 1, &reply, &dept_path(&t, 2)),
            vec![
                "Company / Engineering  (dept 2)",
                "  sub-departments:",
                "    3  Storage",
                "  members 1-1 of 1:",
                "    102  Bob Jones",
            ]
        );
        // Storage, first page of one member of two, path unknown locally: the reply's name.
        let reply = vec![
            dept(3, 3, 2, "Storage"),
            member(5, 101, 3, "lead"),
            person(4, 101, "Alice Smith"),
        ];
        assert_eq!(
            format_dept(3, 0, 2, &reply, &[]),
            vec![
                "Storage  (dept 3)",
                "  members 1-1 of 2:",
                "    101  Alice Smith, lead",
                "  more: /org 3 1",
            ]
        );
        // Past the last member; a member with no person record.
        assert_eq!(
            format_dept(3, 5, 2, &reply[..1], &[]),
            vec!["Storage  (dept 3)", "  no members from 5 (2 in all)"]
        );
        let lone = vec![dept(3, 3, 2, "Storage"), member(5, 7, 3, "")];
        assert_eq!(format_dept(3, 0, 1, &lone, &[])[2], "    7  (no name)");
        assert_eq!(
            format_dept(3, 0, 0, &lone[..1], &[]),
            vec!["Storage  (dept 3)", "  no members"]
        );
    }

    #[test]
    fn the_top_level_lists_its_departments() {
        let mut hidden = dept(9, 4, 0, "Board");
        if let OrgEntity::Dept(d) = &mut hidden.entity {
            d.hidden = true;
        }
        assert_eq!(
            format_dept(0, 0, 0, &[dept(1, 1, 0, "Company"), hidden], &[]),
            vec![
                "top-level departments:",
                "  1  Company",
                "  4  Board  (hidden)"
            ]
        );
        assert_eq!(
            format_dept(0, 0, 0, &[], &[]),
            vec!["the organisation tree is empty"]
        );
    }

    #[test]
    fn a_person_shows_each_department_with_title_and_path() {
        // The server's answer for Bob: person, then each membership and the path to it.
        let reply = vec![
            person(6, 102, "Bob Jones"),
            member(7, 102, 2, ""),
            dept(1, 1, 0, "Company"),
            dept(2, 2, 1, "Engineering"),
            member(8, 102, 3, "dev"),
            dept(3, 3, 2, "Storage"),
        ];
        assert_eq!(
            format_user(102, &reply),
            vec![
                "102  Bob Jones",
                "  dept 2  Company / Engineering",
                "  dept 3  Company / Engineering / Storage, dev",
            ]
        );
        assert_eq!(
            format_user(5, &[person(1, 5, "Eve")]),
            vec!["5  Eve", "  in no department"]
        );
    }

    #[test]
    fn search_results_show_paths_people_s_departments_and_the_total() {
        let t = tree(&company());
        let found = vec![dept(3, 3, 2, "Storage"), person(4, 101, "Alice Smith")];
        assert_eq!(
            format_search("stor", 2, &found, &t),
            vec![
                "2 matches for \"stor\":",
                "  dept 3  Company / Engineering / Storage",
                "  user 101  Alice Smith (Storage)",
            ]
        );
        assert_eq!(
            format_search("o", 30, &found[1..], &OrgTree::new()),
            vec![
                "30 matches for \"o\":",
                "  user 101  Alice Smith",
                "  showing 1 of 30; narrow the search",
            ]
        );
        assert_eq!(
            format_search("zz", 0, &[], &t),
            vec!["nothing matches \"zz\""]
        );
    }

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
        assert_eq!(
            group_event_line(7, 5, true, &ev(GroupEventKind::AdminAdded, &[9])),
            "#7: you made 9 admin"
        );
        assert_eq!(
            group_event_line(7, 5, false, &ev(GroupEventKind::AdminRemoved, &[9])),
            "#7: 5 made 9 a member again"
        );
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn file_messages_read_as_a_line_and_kinds_follow_the_extension() {
        let f = FileRef {
            kind: FileKind::Image,
            sha256: [1; 32],
            size: 12_345,
            key: [2; 16],
            mime: "image/png".into(),
            name: "cat.png".into(),
            width: 640,
            height: 480,
            duration_ms: 0,
            thumb: bytes::Bytes::new(),
        };
        assert_eq!(
            file_line(&f.to_body()).as_deref(),
            Some("[image cat.png, image/png, 640×480, 12345 bytes]")
        );
        assert_eq!(file_line(&bytes::Bytes::from_static(b"hi")), None);
        assert!(file_line(&bytes::Bytes::from_static(&[0xFF, 7]))
            .unwrap()
            .contains("unreadable"));
        let p = |s: &str| guess_kind(std::path::Path::new(s));
        assert_eq!(p("a/B.JPG"), (FileKind::Image, "image/jpeg"));
        assert_eq!(p("v.ogg"), (FileKind::Voice, "audio/ogg"));
        assert_eq!(p("m.mp4"), (FileKind::Video, "video/mp4"));
        assert_eq!(p("doc"), (FileKind::File, "application/octet-stream"));
    }
}
