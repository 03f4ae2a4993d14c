//! `im-cli` as a user types it, against a real single-node server: alice sends a picture with
//! `/send`, bob (offline meanwhile) starts, syncs, sees the file message and saves it with
//! `/fetch`; the bytes are the same.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `im-cli --uid <uid>` with `input` on its stdin (then end of input: it logs out and
/// exits); returns its output. Killed past a deadline.
fn cli(server: std::net::SocketAddr, state: &std::path::Path, uid: u64, input: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_im-cli"))
        .args(["--server", &server.to_string(), "--uid", &uid.to_string()])
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn im-cli");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("im-cli --uid {uid} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

#[test]
fn a_picture_sent_with_send_is_saved_by_the_recipient_with_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = im_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        gate_cores: 1,
        logic_workers: 1,
        ..Default::default()
    };
    cfg.api.as_mut().unwrap().listen = "127.0.0.1:0".parse().unwrap();
    let server = im_server::start(&cfg).unwrap();
    let addr = server.local_addr();
    let picture: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let src = dir.path().join("cat.png");
    std::fs::write(&src, &picture).unwrap();
    let state = dir.path().join("state");

    let out = cli(addr, &state, 1, &format!("/send 2 {}\n", src.display()));
    assert!(
        out.contains("✓ sent [image cat.png, image/png, 40000 bytes]"),
        "{out}"
    );

    let saved = dir.path().join("saved.png");
    let out = cli(addr, &state, 2, &format!("/fetch 1 {}\n", saved.display()));
    assert!(
        out.contains("[1] 1 → you: [image cat.png, image/png, 40000 bytes] — `/fetch 1 <path>`"),
        "{out}"
    );
    assert!(out.contains("✓ 40000 bytes written"), "{out}");
    assert_eq!(std::fs::read(&saved).unwrap(), picture);

    // A refusal is printed, not fatal: a seq that is not a file message.
    let out = cli(addr, &state, 2, "/fetch 99 /nonexistent/x\n");
    assert!(out.contains("! not fetched"), "{out}");
    server.shutdown();
}

/// The group id in `created group #<id>`.
fn created_group(out: &str) -> u64 {
    let at = out.find("created group #").expect("a created group") + "created group #".len();
    out[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no group id in {out}"))
}

#[test]
fn a_file_posted_in_a_large_group_is_saved_with_fetch_and_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = im_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        gate_cores: 1,
        logic_workers: 1,
        large_group_threshold: 2,
        ..Default::default()
    };
    cfg.api.as_mut().unwrap().listen = "127.0.0.1:0".parse().unwrap();
    let server = im_server::start(&cfg).unwrap();
    let addr = server.local_addr();
    let doc: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let src = dir.path().join("plan.pdf");
    std::fs::write(&src, &doc).unwrap();
    let state = dir.path().join("state");

    // Two members, then a third: past the threshold, the group is large and keeps its own
    // timeline (seq 1 the switch's marker, seq 2 the post).
    let out = cli(addr, &state, 1, "/group new big 2\n");
    let g = created_group(&out);
    let out = cli(
        addr,
        &state,
        1,
        &format!("/group add {g} 3\n/send #{g} {}\n", src.display()),
    );
    assert!(out.contains("(posting [file plan.pdf"), "{out}");

    let saved = dir.path().join("saved.pdf");
    let out = cli(
        addr,
        &state,
        2,
        &format!("/group sync {g}\n/fetch #{g} 2 {}\n", saved.display()),
    );
    assert!(
        out.contains(&format!(
            "#{g} [2] 1: [file plan.pdf, application/pdf, 30000 bytes] — `/fetch #{g} 2 <path>`"
        )),
        "{out}"
    );
    assert!(out.contains("✓ 30000 bytes written"), "{out}");
    assert_eq!(std::fs::read(&saved).unwrap(), doc);

    // Not a member: refused; the seq of the group's marker: not a file message.
    let out = cli(
        addr,
        &state,
        4,
        &format!("/fetch #{g} 2 {}\n", saved.display()),
    );
    assert!(
        out.contains("! not fetched") && out.contains("NotMember"),
        "{out}"
    );
    let out = cli(
        addr,
        &state,
        3,
        &format!("/fetch #{g} 1 {}\n", saved.display()),
    );
    assert!(
        out.contains("! not fetched") && out.contains("not a file message"),
        "{out}"
    );
    server.shutdown();
}
