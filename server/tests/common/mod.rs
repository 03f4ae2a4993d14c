//! Helpers shared by the integration tests: real servers on ephemeral ports, real clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use im_client::{Client, LoginInfo};
use im_server::{ServerConfig, DEV_TOKEN_SECRET};
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
        api: Some(im_api::ApiConfig::new("127.0.0.1:0".parse().unwrap())),
        // Functional tests send as fast as they can: no per-user message rate (protection.rs
        // tests it). Every other limit keeps its production default.
        limits: im_gate::Limits {
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

/// A server whose HTTP API accepts requests signed with `key` / `secret` (plus whatever `f`
/// sets); returns it with the API's address.
pub fn start_with_api_key(
    (key, secret): (&str, &str),
    f: impl FnOnce(&mut ServerConfig),
) -> (TestServer, SocketAddr) {
    let s = start_with(|cfg| {
        cfg.api
            .as_mut()
            .expect("the test config runs the API")
            .keys
            .insert(key.into(), secret.into());
        f(cfg);
    });
    let api = s.server.as_ref().unwrap().api_addr().expect("the API runs");
    (s, api)
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

/// A child process of a test that is killed (SIGKILL) and reaped when dropped, so a test that
/// panics or times out leaves nothing running; the child also gets SIGKILL if the test process
/// dies first (`PR_SET_PDEATHSIG`), so a leaked server can never hold CI's output pipe open.
/// Derefs to the [`std::process::Child`].
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// Spawns `cmd` as a [`Proc`]: killed when the spawning thread's process exits.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, so spawn from the test's own
/// thread (or one that outlives the child).
pub fn spawn_reaped(cmd: &mut std::process::Command) -> std::io::Result<Proc> {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map(Proc)
}

/// How long a spawned server may take to print its startup lines.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// Starts the `im-server` binary with `args` and returns it with the address printed on its first
/// stdout line after `prefix` (e.g. "listening on "). `run` and `logic` get a free API port.
pub fn spawn_process(args: &[&str], prefix: &str) -> (Proc, SocketAddr) {
    let (child, mut lines) = spawn_lines(args);
    (child, parse_after(&lines.remove(0), prefix))
}

/// Like [`spawn_process`] for `run` / `logic`: also returns the HTTP API address.
pub fn spawn_with_api(args: &[&str], prefix: &str) -> (Proc, SocketAddr, SocketAddr) {
    let (child, lines) = spawn_lines(args);
    let api = startup_addr(&lines, "api on ");
    (child, parse_after(&lines[0], prefix), api)
}

/// Like [`spawn_process`] for a `gate` with `--status-listen`: also returns the status address.
pub fn spawn_with_status(args: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let (child, lines) = spawn_lines(args);
    let status = startup_addr(&lines, "status on ");
    (child, parse_after(&lines[0], "listening on "), status)
}

/// The address on the startup line that starts with `prefix`.
fn startup_addr(lines: &[String], prefix: &str) -> SocketAddr {
    lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in {lines:?}"))
        .parse()
        .unwrap()
}

fn parse_after(line: &str, prefix: &str) -> SocketAddr {
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap()
}

/// Spawns the binary and returns its startup lines (2 for `run`/`logic`, 1 otherwise), waiting
/// at most [`STARTUP_DEADLINE`] for them; the rest of its stdout is drained by a thread so the
/// process never writes into a closed pipe.
fn spawn_lines(args: &[&str]) -> (Proc, Vec<String>) {
    use std::io::BufRead;
    let mut args: Vec<&str> = args.to_vec();
    let with_api = matches!(args.first(), Some(&"run") | Some(&"logic"));
    if with_api && !args.contains(&"--api-listen") {
        args.extend(["--api-listen", "127.0.0.1:0"]);
    }
    let mut child = spawn_reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_im-server"))
            .args(&args)
            // IM_TEST_LOG=info (or a filter) shows the servers' logs when debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("IM_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit()),
    )
    .expect("spawn im-server");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    // `gate` prints "ws on" and "status on" lines after its first when it has those listeners.
    let gate = args.first() == Some(&"gate");
    let has = |f: &str| args.contains(&f);
    let want = 1
        + usize::from(with_api)
        + usize::from(gate && has("--ws-listen"))
        + usize::from(gate && has("--status-listen"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        while out.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            // The receiver is gone after the startup lines: the rest is drained and dropped.
            let _ = tx.send(std::mem::take(&mut line));
        }
    });
    let deadline = std::time::Instant::now() + STARTUP_DEADLINE;
    let mut lines = Vec::new();
    while lines.len() < want {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(e) => {
                panic!("im-server {args:?}: no startup line within {STARTUP_DEADLINE:?} ({e})")
            }
        }
    }
    (child, lines)
}

/// Key id and secret of the business key in [`api_keys_config`].
pub const API_KEY: (&str, &str) = ("biz", "s3cret");

/// Writes a config file into `dir` that gives the HTTP API the [`API_KEY`]; returns its path.
pub fn api_keys_config(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("api-keys.toml");
    std::fs::write(
        &p,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\n[api.keys]\n{} = \"{}\"\n",
            API_KEY.0, API_KEY.1
        ),
    )
    .unwrap();
    p
}

/// A request to the HTTP API signed with [`API_KEY`] (docs/API.md): (status, JSON body, or
/// `Null` when the body is not JSON), every step with a deadline (`im_testkit::http`).
pub fn http_signed(
    api: SocketAddr,
    method: &str,
    target: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let ts = now_secs();
    let sig = im_api::sign(API_KEY.1, method, target, ts, body.as_bytes());
    im_testkit::http::http_json(
        api,
        method,
        target,
        &[
            ("X-IM-Key", API_KEY.0.to_owned()),
            ("X-IM-Timestamp", ts.to_string()),
            ("X-IM-Signature", sig),
        ],
        body,
    )
}

/// A request to the HTTP API at `api` signed with API key `key` / `secret` at Unix time `ts`
/// (docs/API.md, "Authentication of business servers").
pub fn signed_request(
    api: SocketAddr,
    (key, secret): (&str, &str),
    ts: u64,
    method: &str,
    target: &str,
    body: &str,
) -> im_testkit::http::HttpResp {
    let sig = im_api::sign(secret, method, target, ts, body.as_bytes());
    im_testkit::http::http(
        api,
        method,
        target,
        &[
            ("X-IM-Key", key.to_owned()),
            ("X-IM-Timestamp", ts.to_string()),
            ("X-IM-Signature", sig),
        ],
        body.as_bytes(),
    )
}
