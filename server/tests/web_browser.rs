//! The web page (`web/`) in a real browser against a real server: `web/tests/e2e.mjs` drives two
//! headless Chromium pages (users A and B) over the gate's WebSocket port, while this test plays
//! a TCP client C (the Rust SDK) that chats with both and posts in their group; A sends B a picture
//! through the file service (both pages show it, loaded); then it imports an organisation tree
//! over the signed HTTP API and checks the pages' Contacts panel.
//!
//! Needs `node`, `web/node_modules/playwright-core` (`npm ci --prefix web`) and Chromium
//! (`/usr/bin/chromium`, or `IM_CHROMIUM`). Without them the test prints "skipped: …" and passes,
//! unless `IM_BROWSER_TESTS=1`, which makes their absence a failure (CI sets it).
//!
//! The script and this test talk through lines: the script prints `READY`, `STEP <name> …` and
//! `PASS` (or `FAIL …`) on stdout; this test answers each step with `OK <name>` on its stdin.
//! The screenshot lands in `target/web-e2e/chat.png`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use im_client::Client;
use im_server::{ServerConfig, DEV_TOKEN_SECRET};
use im_shared::proto::{Message, CONV_C2C, CONV_C2G};
use im_shared::token::{now_secs, HmacTokens};
use im_shared::{Command, DeviceType, GroupId, Seq, UserId};

const A: u64 = 8101;
const B: u64 = 8102;
const C: u64 = 8103;
/// Whole browser scenario (Chromium start included) on a slow, shared CI machine.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chromium() -> PathBuf {
    std::env::var_os("IM_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// What this machine lacks to run the browser test.
fn missing() -> Vec<String> {
    let mut m = Vec::new();
    match Process::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            let major: u32 = v
                .trim()
                .trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if major < 18 {
                m.push(format!("node 18 or later (found {})", v.trim()));
            }
        }
        _ => m.push("node (Node.js 18 or later)".to_owned()),
    }
    let pw = repo().join("web/node_modules/playwright-core/package.json");
    if !pw.is_file() {
        m.push("web/node_modules/playwright-core (run `npm ci --prefix web`)".to_owned());
    }
    let chrome = chromium();
    if !chrome.is_file() {
        m.push(format!(
            "{} (apt-get install chromium, or set IM_CHROMIUM)",
            chrome.display()
        ));
    }
    m
}

fn token(uid: u64) -> String {
    HmacTokens::new(DEV_TOKEN_SECRET).mint(UserId(uid), now_secs() + 3600)
}

/// Kills the node process (and so its Chromium) if the test panics.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The TCP user C: acknowledges what it receives and heartbeats while the browsers work.
struct TcpUser {
    c: Client,
    inbox: Vec<Message>,
    last_beat: Instant,
    beat: Duration,
}

impl TcpUser {
    /// Reads pushes for up to `wait`, acking every delivered entry.
    fn pump(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            if self.last_beat.elapsed() >= self.beat {
                self.c.heartbeat().expect("C heartbeat");
                self.last_beat = Instant::now();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .c
                .recv(left.min(Duration::from_millis(50)))
                .expect("C recv")
            {
                Some(Command::Deliver(m)) => {
                    self.c.deliver_ack(m.seq).expect("C ack");
                    self.inbox.push(m);
                }
                Some(Command::Error { code, message }) => panic!("C got {code:?}: {message}"),
                Some(Command::Kickout { message, .. }) => panic!("C kicked out: {message}"),
                _ => {}
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Waits (pumping) for a delivered message matching `f`.
    fn expect(&mut self, what: &str, f: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(i) = self.inbox.iter().position(&f) {
                return self.inbox.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "C never received {what}; got {:?}",
                self.inbox
                    .iter()
                    .map(|m| (
                        m.conv,
                        m.from,
                        String::from_utf8_lossy(&m.body).into_owned()
                    ))
                    .collect::<Vec<_>>()
            );
            self.pump(Duration::from_millis(100));
        }
    }
}

/// `key=value` arguments of a STEP line; `_` in values stands for a space.
fn arg(words: &[&str], key: &str) -> String {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("STEP without {key}=: {words:?}"))
        .replace('_', " ")
}

fn answer(stdin: &mut ChildStdin, line: &str) {
    writeln!(stdin, "{line}").expect("write to the browser test");
    stdin.flush().unwrap();
}

#[test]
fn web_page_chats_in_a_browser_with_browsers_and_a_tcp_client() {
    let lacks = missing();
    if !lacks.is_empty() {
        let required = std::env::var("IM_BROWSER_TESTS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "IM_BROWSER_TESTS=1 but this machine lacks: {}",
            lacks.join("; ")
        );
        println!(
            "skipped: the browser test needs {} (IM_BROWSER_TESTS=1 makes this a failure)",
            lacks.join("; ")
        );
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let web = repo().join("web");
    let heartbeat_secs = 2;
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ws_listen: Some("127.0.0.1:0".parse().unwrap()),
        web_root: Some(web.clone()),
        data_dir: dir.path().to_path_buf(),
        gate_cores: 2,
        logic_workers: 2,
        // Short heartbeats so that the pages must send them during the test: a page that does
        // not is closed after 3 × heartbeat_secs, which the script sees as a reconnect.
        heartbeat_secs,
        idle_timeout_secs: 3 * heartbeat_secs as u64,
        // The HTTP API with a business key: the script imports an organisation tree through it
        // and checks the page's Contacts panel.
        api: Some({
            let mut a = im_api::ApiConfig::new("127.0.0.1:0".parse().unwrap());
            a.keys.insert("e2e".into(), "e2e-secret".into());
            a
        }),
        ..ServerConfig::default()
    };
    let server = im_server::start(&cfg).unwrap();
    let ws = server
        .ws_addr()
        .expect("the server has a WebSocket listener");
    let api = server.api_addr().expect("the server runs the HTTP API");

    let mut c = Client::connect(server.local_addr()).unwrap();
    c.timeout = Duration::from_secs(10);
    c.login(UserId(C), &token(C), DeviceType::Desktop, "tcp-c", Seq(0))
        .unwrap();
    let mut user = TcpUser {
        c,
        inbox: Vec::new(),
        last_beat: Instant::now(),
        beat: Duration::from_secs(1),
    };

    let out = repo().join("target/web-e2e");
    for f in ["chat.png", "group.png", "failure-a.png", "failure-b.png"] {
        let _ = std::fs::remove_file(out.join(f));
    }
    let mut child = Process::new("node")
        .arg(web.join("tests/e2e.mjs"))
        .args(["--page-url", &format!("http://{ws}/")])
        .args(["--ws-url", &format!("ws://{ws}/ws")])
        .args(["--uid-a", &A.to_string(), "--uid-b", &B.to_string()])
        .args(["--uid-c", &C.to_string()])
        .args(["--im-server", env!("CARGO_BIN_EXE_im-server")])
        .args(["--api-url", &format!("http://{api}")])
        .args(["--api-key", "e2e", "--api-secret", "e2e-secret"])
        .arg("--chromium")
        .arg(chromium())
        .arg("--out")
        .arg(&out)
        .env("IM_TOKEN_SECRET", DEV_TOKEN_SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn node");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = Reaper(child);
    let (tx, lines): (_, Receiver<String>) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            match l {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });

    let deadline = Instant::now() + SCENARIO_TIMEOUT;
    let mut steps = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "the browser test did not finish within {SCENARIO_TIMEOUT:?} (steps done: {steps:?})"
        );
        let line = match lines.recv_timeout(Duration::from_millis(20)) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                user.pump(Duration::from_millis(30));
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("the browser test ended without PASS (steps done: {steps:?})")
            }
        };
        eprintln!("[web_browser] {line}");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["READY"] => {}
            ["PASS"] => break,
            ["FAIL", ..] => panic!("browser test failed: {line}"),
            ["STEP", "b_offline", ..] => {
                // B's page is closed: this waits in B's timeline for the sync after its reload.
                user.c
                    .send_c2c(UserId(B), 1, "hello B, from C")
                    .expect("C → B");
                user.c
                    .send_c2c(UserId(A), 2, "hello A, from C")
                    .expect("C → A");
                steps.push("b_offline");
                answer(&mut stdin, "OK b_offline");
            }
            ["STEP", "to_c", rest @ ..] => {
                for (from, text) in [(A, arg(rest, "a")), (B, arg(rest, "b"))] {
                    let m = user.expect(&format!("{text:?} from {from}"), |m| {
                        m.conv == CONV_C2C && m.from == UserId(from) && m.body == text.as_bytes()
                    });
                    assert_eq!(m.to, UserId(C));
                }
                steps.push("to_c");
                answer(&mut stdin, "OK to_c");
            }
            ["STEP", "group", rest @ ..] => {
                let gid: u64 = arg(rest, "gid").parse().expect("group id");
                let text = arg(rest, "text");
                let m = user.expect(&format!("group post {text:?}"), |m| {
                    m.conv == CONV_C2G && m.to.0 == gid && m.body == text.as_bytes()
                });
                assert_eq!(m.from, UserId(A));
                user.c
                    .send_c2g(GroupId(gid), 3, "C in the team")
                    .expect("C → group");
                steps.push("group");
                answer(&mut stdin, "OK group");
            }
            _ => {}
        }
    }
    drop(stdin);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "node did not exit after PASS");
        user.pump(Duration::from_millis(50));
    };
    assert!(status.success(), "node exited with {status}");
    assert_eq!(steps, ["b_offline", "to_c", "group"]);
    let shot = out.join("chat.png");
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 0),
        "no screenshot at {}",
        shot.display()
    );
    println!("screenshot: {}", shot.display());
    server.shutdown();
}
