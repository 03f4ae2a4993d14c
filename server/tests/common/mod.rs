//! Helpers shared by the integration tests: real servers on ephemeral ports, real clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use im_server::{ServerConfig, DEV_TOKEN_SECRET};
use im_shared::client::{Client, LoginInfo};
use im_shared::token::{now_secs, HmacTokens};
use im_shared::{Command, DeviceType, Seq, UserId};

pub struct TestServer {
    pub server: Option<im_server::Server>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

pub fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        gate_cores: 2,
        logic_workers: 2,
        api: Some(im_logic::api::ApiConfig::new(
            "127.0.0.1:0".parse().unwrap(),
        )),
        // Functional tests send as fast as they can: no per-user message rate (protection.rs
        // tests it). Every other limit keeps its production default.
        limits: im_server::LimitsConfig {
            msg_rate_per_user: 0,
            ..Default::default()
        },
        ..ServerConfig::default()
    }
}

pub fn start_with(f: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    f(&mut cfg);
    let server = im_server::start(&cfg).unwrap();
    let addr = server.local_addr();
    TestServer {
        server: Some(server),
        addr,
        dir,
    }
}

pub fn start() -> TestServer {
    start_with(|_| {})
}

pub fn token(uid: u64) -> String {
    HmacTokens::new(DEV_TOKEN_SECRET).mint(UserId(uid), now_secs() + 3600)
}

pub fn connect(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr).unwrap();
    c.timeout = Duration::from_secs(10);
    c
}

pub fn login_as(addr: SocketAddr, uid: u64, dt: DeviceType, device: &str) -> (Client, LoginInfo) {
    let mut c = connect(addr);
    let info = c
        .login(UserId(uid), &token(uid), dt, device, Seq(0))
        .unwrap();
    (c, info)
}

pub fn login(addr: SocketAddr, uid: u64) -> Client {
    login_as(addr, uid, DeviceType::Phone, &format!("phone-{uid}")).0
}

/// Waits for the next `Deliver` push, skipping other pushes.
pub fn next_deliver(c: &mut Client) -> im_shared::proto::Message {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match c.recv(Duration::from_millis(200)).unwrap() {
            Some(Command::Deliver(m)) => return m,
            Some(Command::Error { code, message }) => panic!("server error {code:?}: {message}"),
            _ => {}
        }
    }
    panic!("no deliver within 10 s");
}

/// Asserts that no push of the given kind arrives within `wait`.
pub fn assert_no_deliver(c: &mut Client, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Some(Command::Deliver(m)) = c.recv(Duration::from_millis(50)).unwrap() {
            panic!("unexpected deliver {m:?}");
        }
    }
}

/// Starts the `im-server` binary with `args` and returns it with the address printed on its first
/// stdout line after `prefix` (e.g. "listening on "). `run` and `logic` get a free API port.
pub fn spawn_process(args: &[&str], prefix: &str) -> (std::process::Child, SocketAddr) {
    let (child, mut lines) = spawn_lines(args);
    (child, parse_after(&lines.remove(0), prefix))
}

/// Like [`spawn_process`] for `run` / `logic`: also returns the HTTP API address.
pub fn spawn_with_api(
    args: &[&str],
    prefix: &str,
) -> (std::process::Child, SocketAddr, SocketAddr) {
    let (child, lines) = spawn_lines(args);
    let api = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("api on "))
        .expect("no `api on` line")
        .parse()
        .unwrap();
    (child, parse_after(&lines[0], prefix), api)
}

fn parse_after(line: &str, prefix: &str) -> SocketAddr {
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap()
}

/// Spawns the binary and returns its startup lines (2 for `run`/`logic`, 1 otherwise); the rest
/// of its stdout is drained by a thread so the process never writes into a closed pipe.
fn spawn_lines(args: &[&str]) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let mut args: Vec<&str> = args.to_vec();
    let with_api = matches!(args.first(), Some(&"run") | Some(&"logic"));
    if with_api && !args.contains(&"--api-listen") {
        args.extend(["--api-listen", "127.0.0.1:0"]);
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_im-server"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn im-server");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let want = if with_api { 2 } else { 1 };
    let mut lines = Vec::new();
    for _ in 0..want {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        lines.push(line);
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    (child, lines)
}
