//! `deploy/local-cluster.sh` end to end: the script starts 3 logic nodes, 2 gates and a Redis
//! Cluster of 3 masters + 3 replicas; clients log in on both gates, c2c messages cross logic nodes
//! and gates and each arrives exactly once, the iplist of every logic node lists both gates, and
//! SIGTERM to the script stops every process it started.
//!
//! Needs `redis-server` and `redis-cli` (like the other Redis tests, it fails without them;
//! `.ci/run` installs them).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::token;
use im_client::{Client, ClientError, Timeline};
use im_shared::{Command as Cmd, DeviceType, Seq, UserId};
use im_testkit::http::{try_http, Deadlines};

const NODES: usize = 3;
const GATES: usize = 2;
const REDIS_MASTERS: usize = 3;

/// The script's port layout for `BASE_PORT = base` (deploy/local-cluster.sh).
struct Ports {
    base: u16,
}

impl Ports {
    fn gate(&self, g: usize) -> SocketAddr {
        addr(self.base + g as u16) // g = 0 is gate id 1
    }
    fn link(&self, i: usize) -> SocketAddr {
        addr(self.base + 100 + i as u16)
    }
    fn api(&self, i: usize) -> SocketAddr {
        addr(self.base + 1080 + i as u16)
    }
    fn redis(&self, i: usize) -> SocketAddr {
        addr(self.base + 300 + i as u16)
    }
    fn redis_bus(&self, i: usize) -> SocketAddr {
        addr(self.base + 10_300 + i as u16)
    }
    fn all(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = (0..GATES).map(|g| self.gate(g)).collect();
        v.extend((0..NODES).map(|i| self.link(i)));
        v.extend((0..NODES).map(|i| self.api(i)));
        v.extend((0..REDIS_MASTERS * 2).map(|i| self.redis(i)));
        v.extend((0..REDIS_MASTERS * 2).map(|i| self.redis_bus(i)));
        v
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A base whose every port is free now. Bases run from 10000 to 22000, so every port of the
/// layout (the Redis cluster bus ports included, base + 10305 at most) stays below the kernel's
/// ephemeral range (32768…), where other tests' free ports come from.
fn pick_base() -> Ports {
    let bases: Vec<u16> = (10_000..=22_000).step_by(1000).collect();
    let seed = std::process::id() as usize
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as usize;
    for k in 0..bases.len() {
        let p = Ports {
            base: bases[(seed + k) % bases.len()],
        };
        if p.all().iter().all(|a| TcpListener::bind(a).is_ok()) {
            return p;
        }
    }
    panic!("no free port block for the local cluster in 10000..23100");
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// The running script, in its own process group; dropping it kills the whole group, so a failed
/// test leaves no process behind. On a panic it prints the tail of every log first.
struct Script {
    child: Child,
    dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
}

impl Script {
    fn pgid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(self.dir.path());
        }
        // SAFETY: plain kill(2) of the process group the script leads.
        unsafe {
            libc::kill(-self.pgid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn print_logs(dir: &Path) {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    for p in logs {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} (last 30 lines)", p.display());
        for l in &lines[lines.len().saturating_sub(30)..] {
            eprintln!("{l}");
        }
    }
}

fn start_script(ports: &Ports) -> Script {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args([NODES, GATES, REDIS_MASTERS].map(|n| n.to_string()))
        .env("DIR", dir.path())
        .env("BASE_PORT", ports.base.to_string())
        .env("READY_TIMEOUT", "60")
        .env("RUST_LOG", "info")
        // The processes must use the development token secret and their own embedded stores,
        // whatever this environment sets for other tests.
        .env_remove("SCYLLA_NODES");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("IM_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("IM_BIN", env!("CARGO_BIN_EXE_im-server"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    // If this test process dies without unwinding (killed, aborted), the script gets SIGTERM and
    // its trap stops the cluster it started; a normal failure kills the group in `Script::drop`.
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn bash deploy/local-cluster.sh");
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { break };
            println!("local-cluster.sh: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Script { child, dir, lines }
}

fn node_of(uid: u64) -> usize {
    im_shared::shard::owner_of_vshard(im_shared::shard::vshard_of(UserId(uid)), NODES)
}

/// Logs in, retrying while the gate answers a retryable error (its links are not all up yet).
fn login_retry(gate: SocketAddr, uid: u64) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = Client::connect(gate).unwrap();
        c.timeout = Duration::from_secs(10);
        match c.login(UserId(uid), &token(uid), DeviceType::Phone, "p", Seq(0)) {
            Ok(_) => return c,
            Err(ClientError::Server { code, .. }) if code.is_retryable() => {}
            Err(ClientError::Closed) => {}
            Err(e) => panic!("login of {uid} on {gate}: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "login of {uid} on {gate} kept failing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /v1/iplist?uid=` on a logic node's API: the gates' TCP addresses (empty on any error).
fn iplist(api: SocketAddr, uid: u64) -> Vec<SocketAddr> {
    // Short deadlines: the caller polls until every node lists both gates.
    let deadlines = Deadlines {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(5),
    };
    let path = format!("/v1/iplist?uid={uid}");
    match try_http(api, "GET", &path, &[], b"", deadlines) {
        Ok(r) if r.status == 200 => {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            v["gates"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g["tcp"].as_str()?.parse().ok())
                .collect()
        }
        _ => Vec::new(),
    }
}

#[test]
fn local_cluster_script_serves_c2c_across_nodes_and_gates_and_stops_cleanly() {
    if !on_path("redis-server") || !on_path("redis-cli") {
        panic!("redis-server not installed: apt-get install redis-server");
    }
    let t0 = Instant::now();
    let ports = pick_base();
    let mut script = start_script(&ports);

    // 1. The script reports the whole cluster up.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match script.lines.recv_timeout(left) {
            Ok(l) if l == "cluster ready" => break,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no `cluster ready` within 120 s"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!(
                    "the script ended before `cluster ready`: {:?}",
                    script.child.wait()
                )
            }
        }
    }
    println!("cluster ready after {:?}", t0.elapsed());
    // (Link ports are not probed: a logic node logs every link that closes without a Hello.)
    let clients_ports = (0..GATES).map(|g| ports.gate(g));
    let api_ports = (0..NODES).map(|i| ports.api(i));
    let redis_ports = (0..REDIS_MASTERS * 2).map(|i| ports.redis(i));
    for a in clients_ports.chain(api_ports).chain(redis_ports) {
        assert!(
            TcpStream::connect(a).is_ok(),
            "{a} not listening after `cluster ready`"
        );
    }

    // 2. Two users per logic node, one on each gate.
    let mut users: Vec<(u64, usize)> = Vec::new(); // (uid, gate index)
    for node in 0..NODES {
        let mut on_node = (40_000u64..).filter(|&u| node_of(u) == node);
        for g in 0..GATES {
            users.push((on_node.next().unwrap(), g));
        }
    }
    let mut clients: BTreeMap<u64, Client> = users
        .iter()
        .map(|&(uid, g)| (uid, login_retry(ports.gate(g), uid)))
        .collect();
    println!("{} users logged in after {:?}", users.len(), t0.elapsed());

    // 3. Every user sends one c2c to every other user: across logic nodes, across gates, both.
    let mut expected: HashMap<u64, Vec<u64>> = HashMap::new(); // recipient -> msg ids
    let (mut cross_node, mut cross_both) = (0, 0);
    for &(from, gf) in &users {
        for &(to, gt) in &users {
            if from == to {
                continue;
            }
            let body = format!("{from}->{to}");
            let cmid = to; // unique per sender
            let deadline = Instant::now() + Duration::from_secs(20);
            let ack = loop {
                let c = clients.get_mut(&from).unwrap();
                match c.send_c2c(UserId(to), cmid, body.clone()) {
                    Ok(a) => break a,
                    // Retryable (e.g. Overloaded): resend with the same client_msg_id, which
                    // the server deduplicates.
                    Err(ClientError::Server { code, .. }) if code.is_retryable() => {}
                    Err(e) => panic!("send {body}: {e}"),
                }
                assert!(Instant::now() < deadline, "send {body} never acked");
                std::thread::sleep(Duration::from_millis(100));
            };
            expected.entry(to).or_default().push(ack.msg_id.0);
            if node_of(from) != node_of(to) {
                cross_node += 1;
                if gf != gt {
                    cross_both += 1;
                }
            }
        }
    }
    assert_eq!(cross_node, 24);
    assert_eq!(cross_both, 12);

    // 4. Each recipient gets every message pushed exactly once...
    for (&uid, c) in clients.iter_mut() {
        let want = expected.get(&uid).unwrap();
        let mut got: Vec<u64> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < want.len() {
            assert!(
                Instant::now() < deadline,
                "{uid}: {} of {} messages pushed",
                got.len(),
                want.len()
            );
            if let Some(Cmd::Deliver(m)) = c.recv(Duration::from_millis(200)).unwrap() {
                assert_eq!(m.to, UserId(uid));
                got.push(m.msg_id.0);
            }
        }
        // ...and no second copy follows.
        let quiet = Instant::now() + Duration::from_millis(300);
        while Instant::now() < quiet {
            if let Some(Cmd::Deliver(m)) = c.recv(Duration::from_millis(50)).unwrap() {
                got.push(m.msg_id.0);
            }
        }
        let (mut got_sorted, mut want_sorted) = (got.clone(), want.clone());
        got_sorted.sort_unstable();
        want_sorted.sort_unstable();
        assert_eq!(got_sorted, want_sorted, "{uid}: pushes (exactly once each)");
        // ...and holds each exactly once in its timeline (one seq per message).
        let mut tl = Timeline::new(Seq(0));
        tl.sync(c).unwrap();
        let mut synced: Vec<u64> = tl
            .messages
            .iter()
            .filter(|m| m.from != UserId(uid))
            .map(|m| m.msg_id.0)
            .collect();
        synced.sort_unstable();
        assert_eq!(synced, want_sorted, "{uid}: timeline (exactly once each)");
    }
    println!("c2c checked after {:?}", t0.elapsed());

    // 5. Every logic node's iplist offers both gates (the registry is refreshed every 5 s).
    let mut want_gates: Vec<SocketAddr> = (0..GATES).map(|g| ports.gate(g)).collect();
    want_gates.sort();
    for i in 0..NODES {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut got = iplist(ports.api(i), 1);
            got.sort();
            if got == want_gates {
                break;
            }
            assert!(Instant::now() < deadline, "iplist of node {i}: {got:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    println!("iplist checked after {:?}", t0.elapsed());

    // 6. SIGTERM to the script (not the group) stops every process it started, and it exits 0.
    drop(clients);
    // SAFETY: plain kill(2) of our child.
    assert_eq!(
        unsafe { libc::kill(script.child.id() as i32, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = script.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the script did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "script exit after SIGTERM: {status:?}");
    // No process of its group is left (its children were waited for, so not even zombies).
    // SAFETY: kill(2) with signal 0 only checks for existence.
    let r = unsafe { libc::kill(-script.pgid(), 0) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert!(
        r == -1 && errno == Some(libc::ESRCH),
        "processes left in the script's group"
    );
    for a in ports.all() {
        assert!(
            TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_err(),
            "{a} still listening after the script stopped"
        );
    }
    println!("stopped after {:?}", t0.elapsed());
}
