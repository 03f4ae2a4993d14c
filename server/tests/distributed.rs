//! Separate processes: two gates and one logic node over TCP links. A logic crash closes the
//! clients with a retryable error; after the restart they log in again and sync, losing nothing.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;

use std::time::{Duration, Instant};

use common::*;
use im_client::{Client, ClientError, Timeline};
use im_shared::proto::{CONV_C2C, CONV_RECALL};
use im_shared::{Command as Cmd, DeviceType, ErrorCode, Seq, UserId};
use im_testkit::http::http_json;

fn spawn(args: &[&str], prefix: &str) -> (Proc, SocketAddr) {
    spawn_process(args, prefix)
}

fn free_port() -> u16 {
    im_testkit::ports::reserve()
}

fn spawn_node(dir: &Path, id: usize, nodes: &str) -> Proc {
    spawn_node_with(dir, id, nodes, &[])
}

fn spawn_node_with(dir: &Path, id: usize, nodes: &str, extra: &[String]) -> Proc {
    let d = dir.to_str().unwrap();
    let id = id.to_string();
    let mut args = vec![
        "logic",
        "--node-id",
        &id,
        "--nodes",
        nodes,
        "--data-dir",
        d,
        "--logic-workers",
        "2",
    ];
    args.extend(extra.iter().map(String::as_str));
    spawn(&args, "links on ").0
}

fn spawn_logic(dir: &Path, link: &str) -> (Proc, SocketAddr) {
    let d = dir.to_str().unwrap();
    spawn(
        &[
            "logic",
            "--link-listen",
            link,
            "--data-dir",
            d,
            "--logic-workers",
            "2",
        ],
        "links on ",
    )
}

fn spawn_gate(id: u16, logic: impl ToString) -> (Proc, SocketAddr) {
    let (id, logic) = (id.to_string(), logic.to_string());
    spawn(
        &[
            "gate",
            "--gate-id",
            &id,
            "--logic",
            &logic,
            "--listen",
            "127.0.0.1:0",
            "--gate-cores",
            "2",
        ],
        "listening on ",
    )
}

/// Logs in, retrying while the gate answers `Unavailable` (its link is not up yet).
fn login_retry(addr: SocketAddr, uid: u64, last: Seq) -> (Client, Seq) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = connect(addr);
        match c.login(UserId(uid), &token(uid), DeviceType::Phone, "p", last) {
            Ok(info) => return (c, info.max_seq),
            Err(ClientError::Server { code, .. }) if code.is_retryable() => {}
            Err(ClientError::Closed) => {}
            Err(e) => panic!("login of {uid}: {e}"),
        }
        assert!(Instant::now() < deadline, "login of {uid} kept failing");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A gate process serves `/healthz` and its counters on `/metrics` at `--status-listen`, and
/// nothing else there (issue 19: a cluster's gates could not be monitored).
#[test]
fn a_gate_serves_health_and_metrics_on_its_status_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (_logic, link) = spawn_logic(dir.path(), "127.0.0.1:0");
    let link = link.to_string();
    let (_gate, addr, status) = spawn_with_status(&[
        "gate",
        "--gate-id",
        "1",
        "--logic",
        &link,
        "--listen",
        "127.0.0.1:0",
        "--gate-cores",
        "2",
        "--status-listen",
        "127.0.0.1:0",
    ]);
    let (code, body) = http_json(status, "GET", "/healthz", &[], "");
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
    let (mut c, _) = login_retry(addr, 8101, Seq(0));
    c.send_c2c(UserId(8101), 1, "to myself").unwrap();
    let r = im_testkit::http::http(status, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = r.text();
    let accepted = im_testkit::http::metric(&text, "im_gate_accepted_total").expect("gate counter");
    assert!(accepted >= 1, "{text}");
    assert!(im_testkit::http::metric(&text, "im_gate_frames_in_total").unwrap() >= 1);
    assert!(text.contains("im_gate_core_mailbox{core=\"1\"}"), "{text}");
    // The link's round trip is timed from its first batch on (a Ping rides with it), and the
    // login through this gate.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = im_testkit::http::http(status, "GET", "/metrics", &[], b"").text();
        let n = im_testkit::http::metric(&t, "im_gate_link_rtt_seconds_count");
        if n.is_some_and(|n| n >= 1) || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for h in ["im_gate_link_rtt_seconds", "im_gate_login_seconds"] {
        let n = im_testkit::http::metric(&text, &format!("{h}_count"));
        assert!(n.is_some_and(|n| n >= 1), "{h}: {n:?}\n{text}");
    }
    // Each link to a logic node: up, nothing queued at rest (issue 14: every hop's depth).
    assert!(text.contains("\nim_gate_link_up{node=\"0\"} 1\n"), "{text}");
    assert!(
        text.contains("\nim_gate_link_queued{node=\"0\"} 0\n"),
        "{text}"
    );
    // No business API on a gate: a clear 404, not an empty iplist.
    let (code, body) = http_json(status, "GET", "/v1/iplist?uid=1", &[], "");
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"].as_str(), Some("not_found"), "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("logic nodes"), "{body}");
}

/// A gate that cannot reach a logic node says so at `warn` (the default log level of a
/// deployment), not only at `debug` (issue 19).
#[test]
fn a_gate_warns_when_it_cannot_reach_a_logic_node() {
    use std::io::BufRead;
    // A port nobody listens on, handed out once in this process (a port from `bind(0)`, once
    // dropped, could go to another test's server by its next `bind(0)`).
    let dead = format!("127.0.0.1:{}", im_testkit::ports::reserve());
    let mut gate = spawn_reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_im-server"))
            .args(["gate", "--gate-id", "1", "--logic", &dead])
            .args(["--listen", "127.0.0.1:0", "--gate-cores", "1"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    )
    .unwrap();
    let err = gate.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("no warning about the unreachable logic node");
        if line.contains("WARN") && line.contains("cannot reach logic node") {
            assert!(line.contains(&dead), "{line}");
            break;
        }
    }
}

#[test]
fn two_gates_one_logic_over_tcp_links_survive_a_logic_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (mut logic, link) = spawn_logic(dir.path(), "127.0.0.1:0");
    let (mut g1, a1) = spawn_gate(1, link);
    let (mut g2, a2) = spawn_gate(2, link);

    let (mut alice, _) = login_retry(a1, 8001, Seq(0));
    let (mut bob, _) = login_retry(a2, 8002, Seq(0));
    let ack = alice.send_c2c(UserId(8002), 1, "across gates").unwrap();
    let m = next_deliver(&mut bob);
    assert_eq!((m.msg_id, &m.body[..]), (ack.msg_id, &b"across gates"[..]));
    bob.deliver_ack(m.seq).unwrap();
    let mut acked = vec![ack.msg_id];
    for i in 2..=50u64 {
        acked.push(
            alice
                .send_c2c(UserId(8002), i, format!("m{i}"))
                .unwrap()
                .msg_id,
        );
    }

    // Logic dies: both gates close their clients with the retryable Unavailable.
    logic.kill().unwrap();
    logic.wait().unwrap();
    for c in [&mut alice, &mut bob] {
        let got = c.read_until_closed(Duration::from_secs(10)).unwrap();
        assert!(
            got.iter().any(|f| matches!(
                f,
                Cmd::Error {
                    code: ErrorCode::Unavailable,
                    ..
                }
            )),
            "{got:?}"
        );
    }
    // While it is down, a login is refused with a retryable error.
    let mut c = connect(a1);
    let err = c
        .login(UserId(8001), &token(8001), DeviceType::Phone, "p", Seq(0))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable));

    // Restart on the same link address: gates reconnect by themselves, clients log in and sync.
    let (mut logic, _) = spawn_logic(dir.path(), &link.to_string());
    let (mut bob, _) = login_retry(a2, 8002, Seq(0));
    let mut tl = Timeline::new(Seq(0));
    tl.sync(&mut bob).unwrap();
    let got: Vec<_> = tl.messages.iter().map(|m| m.msg_id).collect();
    assert_eq!(got, acked, "every acked message, once, in order");
    let (mut alice, _) = login_retry(a1, 8001, Seq(0));
    let ack2 = alice.send_c2c(UserId(8002), 1000, "after restart").unwrap();
    assert!(ack2.seq > ack.seq);
    let m = next_deliver(&mut bob);
    assert_eq!(m.msg_id, ack2.msg_id);
    for p in [&mut logic, &mut g1, &mut g2] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

fn node_of(uid: u64, nodes: usize) -> usize {
    im_shared::shard::owner_of_vshard(im_shared::shard::vshard_of(UserId(uid)), nodes)
}

#[test]
fn two_logic_nodes_fan_out_across_nodes_and_recover_a_crashed_one_from_the_outbox() {
    cross_node_fan_out_and_crash_recovery(&[]);
}

/// The same with both nodes on one shared ScyllaDB keyspace (the cluster's store). Runs only
/// when `SCYLLA_NODES` names a cluster (e.g. `127.0.0.1:9042`); reports "skipped" otherwise.
#[test]
fn two_logic_nodes_on_a_shared_scylla_store_recover_a_crashed_one() {
    let Ok(raw) = std::env::var("SCYLLA_NODES") else {
        println!("skipped: SCYLLA_NODES not set");
        return;
    };
    let nodes: Vec<String> = raw.split(',').map(|s| s.trim().to_owned()).collect();
    let ks = format!("im_test_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(im_logic::store::ScyllaStore::create_schema(&nodes, &ks, 1))
        .expect("create keyspace");
    cross_node_fan_out_and_crash_recovery(&[
        "--scylla-nodes".into(),
        raw.clone(),
        "--scylla-keyspace".into(),
        ks,
    ]);
}

fn cross_node_fan_out_and_crash_recovery(store_args: &[String]) {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let mut n0 = spawn_node_with(d0.path(), 0, &nodes, store_args);
    let mut n1 = spawn_node_with(d1.path(), 1, &nodes, store_args);
    let (mut g1, a1) = spawn_gate(1, &nodes);
    let (mut g2, a2) = spawn_gate(2, &nodes);
    // alice lives on node 0, bob on node 1.
    let alice_uid = (9000..).find(|&u| node_of(u, 2) == 0).unwrap();
    let bob_uid = (9000..).find(|&u| node_of(u, 2) == 1).unwrap();
    let (mut alice, _) = login_retry(a1, alice_uid, Seq(0));
    let (mut bob, _) = login_retry(a2, bob_uid, Seq(0));

    // Cross-node c2c both ways, and a delivered notice back across nodes.
    let ack = alice.send_c2c(UserId(bob_uid), 1, "hello node 1").unwrap();
    let m = next_deliver(&mut bob);
    assert_eq!(m.msg_id, ack.msg_id);
    bob.deliver_ack(m.seq).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "no delivered notice across nodes"
        );
        if let Some(Cmd::Delivered { msg_id, .. }) = alice.recv(Duration::from_millis(200)).unwrap()
        {
            assert_eq!(msg_id, ack.msg_id);
            break;
        }
    }
    let back = bob.send_c2c(UserId(alice_uid), 1, "hello node 0").unwrap();
    assert_eq!(next_deliver(&mut alice).msg_id, back.msg_id);
    // Recall across nodes: bob's timeline is in node 1's store, which node 0 may not read, so
    // alice's own copy keeps its msg index; bob cannot recall alice's message.
    assert_eq!(
        bob.recall(CONV_C2C, alice_uid, ack.msg_id, 1000)
            .unwrap_err()
            .code(),
        Some(ErrorCode::RecallRefused)
    );
    alice.recall(CONV_C2C, bob_uid, ack.msg_id, 1000).unwrap();
    let marker = next_deliver(&mut bob);
    assert_eq!((marker.conv, marker.from), (CONV_RECALL, UserId(alice_uid)));

    // Node 1 dies: bob is disconnected; alice (node 0) keeps sending and gets acks, because her
    // messages are durable in her timeline and outbox.
    n1.kill().unwrap();
    n1.wait().unwrap();
    let got = bob.read_until_closed(Duration::from_secs(10)).unwrap();
    assert!(got.iter().any(|f| matches!(
        f,
        Cmd::Error {
            code: ErrorCode::Unavailable,
            ..
        }
    )));
    let mut acked = vec![ack.msg_id];
    for i in 2..=20u64 {
        acked.push(
            alice
                .send_c2c(UserId(bob_uid), i, format!("while down {i}"))
                .unwrap()
                .msg_id,
        );
    }

    // Node 1 comes back: node 0 re-sends the unconfirmed fan-out; bob gets everything once.
    let mut n1 = spawn_node_with(d1.path(), 1, &nodes, store_args);
    let (mut bob, _) = login_retry(a2, bob_uid, Seq(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tl = Timeline::new(Seq(0));
    loop {
        tl.sync(&mut bob).unwrap();
        let got: Vec<_> = tl
            .messages
            .iter()
            .filter(|m| m.from == UserId(alice_uid) && m.conv == CONV_C2C)
            .map(|m| m.msg_id)
            .collect();
        if got.len() >= acked.len() {
            assert_eq!(got, acked, "every acked message once, in order");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} arrived",
            got.len(),
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for p in [&mut n0, &mut n1, &mut g1, &mut g2] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

#[test]
fn kill_9_of_a_logic_node_under_c2c_load_loses_no_acked_message() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let mut n0 = spawn_node(d0.path(), 0, &nodes);
    let mut n1 = spawn_node(d1.path(), 1, &nodes);
    let (mut g, addr) = spawn_gate(1, &nodes);
    // Two senders and two recipients on each node: every direction of fan-out is exercised.
    let on = |node: usize, skip: usize| {
        (20_000..)
            .filter(|&u| node_of(u, 2) == node)
            .nth(skip)
            .unwrap()
    };
    let senders = [on(0, 0), on(0, 1), on(1, 0), on(1, 1)];
    let recipients = [on(0, 2), on(0, 3), on(1, 2), on(1, 3)];
    for &r in &recipients {
        login_retry(addr, r, Seq(0)); // registered once, then offline: everything goes to sync
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let acked: Vec<Vec<(u64, u64)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = senders
            .iter()
            .map(|&s| {
                let stop = &stop;
                sc.spawn(move || {
                    let (mut c, _) = login_retry(addr, s, Seq(0));
                    let mut acked = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 5_000 {
                        i += 1;
                        let to = recipients[(i as usize) % recipients.len()];
                        match c.send_c2c(UserId(to), i, format!("{s}:{i}")) {
                            Ok(_) => acked.push((to, i)),
                            Err(ClientError::Server { code, .. }) if code.is_retryable() => {}
                            Err(_) => {
                                // Disconnected (its node died): log in again when possible and
                                // go on; the unacked message is simply not counted.
                                c = login_retry(addr, s, Seq(0)).0;
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        n1.kill().unwrap(); // SIGKILL under load
        n1.wait().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        n1 = spawn_node(d1.path(), 1, &nodes);
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(total > 100, "too little load: {total}");
    // Every acked message reaches its recipient exactly once, in each sender's order.
    for &r in &recipients {
        let want: Vec<String> = senders
            .iter()
            .zip(&acked)
            .flat_map(|(&s, a)| {
                a.iter()
                    .filter(move |(to, _)| *to == r)
                    .map(move |(_, i)| format!("{s}:{i}"))
            })
            .collect();
        let (mut c, _) = login_retry(addr, r, Seq(0));
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut tl = Timeline::new(Seq(0));
        loop {
            tl.sync(&mut c).unwrap();
            if tl.messages.len() >= want.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{r}: {} of {}",
                tl.messages.len(),
                want.len()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let got: Vec<String> = tl
            .messages
            .iter()
            .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
            .collect();
        let got_set: std::collections::HashSet<&String> = got.iter().collect();
        assert_eq!(got.len(), got_set.len(), "duplicates for {r}");
        for w in &want {
            assert!(got_set.contains(w), "{r} misses acked {w}");
        }
        let mut last: std::collections::HashMap<&str, u64> = Default::default();
        for b in &got {
            let (s, i) = b.split_once(':').unwrap();
            let i: u64 = i.parse().unwrap();
            assert!(i > *last.get(s).unwrap_or(&0), "out of order for {r}: {b}");
            last.insert(s, i);
        }
    }
    for p in [&mut n0, &mut n1, &mut g] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

#[test]
fn gates_linked_to_logic_appear_in_the_redis_gate_registry_and_leave_when_they_die() {
    use im_logic::directory::{Directory, RedisDirectory};
    let cluster = im_testkit::RedisCluster::start(3, 1).expect("redis cluster");
    let redis = cluster.nodes().join(",");
    let dir_path = tempfile::tempdir().unwrap();
    let d = dir_path.path().to_str().unwrap();
    let (mut logic, link) = spawn(
        &[
            "logic",
            "--link-listen",
            "127.0.0.1:0",
            "--data-dir",
            d,
            "--redis-nodes",
            &redis,
        ],
        "links on ",
    );
    let (mut g1, a1) = spawn_gate(1, link);
    // Gate 2 also takes web clients: it announces its WebSocket URL too.
    let (mut g2, a2) = spawn(
        &[
            "gate",
            "--gate-id",
            "2",
            "--logic",
            &link.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--ws-listen",
            "127.0.0.1:0",
            "--gate-cores",
            "1",
        ],
        "listening on ",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = rt
        .block_on(RedisDirectory::connect(cluster.nodes()))
        .unwrap();
    let registry = || {
        rt.block_on(dir.gates())
            .unwrap_or_default()
            .into_iter()
            .map(|g| (g.id, g.tcp_addr, g.ws_addr))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let ws_of_2 = loop {
        let r = registry();
        if let [(1, t1, None), (2, t2, Some(ws))] = r.as_slice() {
            if *t1 == a1.to_string() && *t2 == a2.to_string() {
                break ws.clone();
            }
        }
        assert!(Instant::now() < deadline, "registry {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let port: u16 = ws_of_2
        .strip_prefix("ws://127.0.0.1:")
        .and_then(|r| r.strip_suffix("/ws"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("ws URL {ws_of_2}"));
    assert_ne!(port, 0);
    // The URL is the gate's real WebSocket listener.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the announced ws port listens");
    let want = [
        (1, a1.to_string(), None),
        (2, a2.to_string(), Some(ws_of_2)),
    ];
    g2.kill().unwrap();
    g2.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while registry() != want[..1] {
        assert!(Instant::now() < deadline, "registry {:?}", registry());
        std::thread::sleep(Duration::from_millis(500));
    }
    for p in [&mut logic, &mut g1] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

/// `GET path` on the HTTP API; (status, JSON body).
fn http_get(api: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    http_json(api, "GET", path, &[], "")
}

/// The gates the iplist offers `uid`, in the order the client should try them.
fn iplist(api: SocketAddr, uid: u64) -> Vec<SocketAddr> {
    let (status, v) = http_get(api, &format!("/v1/iplist?uid={uid}"));
    if status != 200 {
        return Vec::new();
    }
    v["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["tcp"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// What a mobile client does after losing its gate: walk the iplist in order until a gate takes
/// the login, with backoff between rounds.
fn reconnect_from_iplist(api: SocketAddr, uid: u64, last: Seq) -> (Client, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut backoff = Duration::from_millis(100);
    loop {
        for gate in iplist(api, uid) {
            let Ok(mut c) = Client::connect(gate) else {
                continue; // dead gate still listed: try the next one
            };
            c.timeout = Duration::from_secs(5);
            if c.login(UserId(uid), &token(uid), DeviceType::Phone, "p", last)
                .is_ok()
            {
                return (c, gate);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no gate from the iplist took the login"
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[test]
fn gate_kill_clients_reconnect_to_another_gate_from_the_iplist_and_lose_nothing() {
    let cluster = im_testkit::RedisCluster::start(3, 1).expect("redis cluster");
    let redis = cluster.nodes().join(",");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (mut logic, link, api) = spawn_with_api(
        &[
            "logic",
            "--link-listen",
            "127.0.0.1:0",
            "--data-dir",
            d,
            "--logic-workers",
            "2",
            "--redis-nodes",
            &redis,
        ],
        "links on ",
    );
    let (g1, a1) = spawn_gate(1, link);
    let (g2, a2) = spawn_gate(2, link);
    let mut gates = vec![(g1, a1), (g2, a2)];
    let (receiver, sender) = (9101u64, 9102u64);
    // Both gates registered: the iplist offers both, in a per-user order.
    let deadline = Instant::now() + Duration::from_secs(20);
    while iplist(api, receiver).len() != 2 {
        assert!(Instant::now() < deadline, "gates never listed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let order = iplist(api, receiver);
    assert_eq!(order, iplist(api, receiver), "the order is stable");
    let (mut rx, rx_gate) = reconnect_from_iplist(api, receiver, Seq(0));
    assert_eq!(rx_gate, order[0], "a client uses its first gate");
    // The sender sits on the other gate and keeps sending, retrying refused sends.
    let other = if order[0] == a1 { a2 } else { a1 };
    let total = 150u64;
    let send = std::thread::spawn(move || {
        let (mut tx, _) = login_retry(other, sender, Seq(0));
        let mut acked = Vec::new();
        for i in 0..total {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match tx.send_c2c(UserId(receiver), i + 1, format!("m{i}")) {
                    Ok(a) => {
                        acked.push(a.msg_id);
                        break;
                    }
                    Err(ClientError::Server { code, .. }) if code.is_retryable() => {}
                    Err(ClientError::Timeout) => {}
                    Err(e) => panic!("send {i}: {e}"),
                }
                assert!(Instant::now() < deadline, "send {i} never acked");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        acked
    });
    // Receive a while, then the receiver's gate dies (kill -9).
    let mut tl = Timeline::new(Seq(0));
    while tl.messages.len() < 30 {
        if let Some(Cmd::Deliver(m)) = rx.recv(Duration::from_millis(500)).unwrap() {
            tl.on_deliver(&mut rx, &m).unwrap();
        }
    }
    let victim = gates.iter().position(|(_, a)| *a == rx_gate).unwrap();
    gates[victim].0.kill().unwrap();
    gates[victim].0.wait().unwrap();
    // The client notices, walks the iplist (the dead gate may still be listed first), lands on
    // the surviving gate and syncs from its last seq.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.recv(Duration::from_millis(200)).is_ok() {
        assert!(Instant::now() < deadline, "connection outlived its gate");
    }
    let (mut rx, gate) = reconnect_from_iplist(api, receiver, tl.last_seq);
    assert_eq!(gate, other);
    let acked = send.join().unwrap();
    assert_eq!(acked.len() as u64, total);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tl.sync(&mut rx).unwrap();
        let got: Vec<_> = tl
            .messages
            .iter()
            .filter(|m| m.from == UserId(sender))
            .map(|m| m.msg_id)
            .collect();
        if got.len() >= acked.len() {
            assert_eq!(got, acked, "every acked message exactly once, in order");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} synced",
            got.len(),
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The registry forgets the dead gate: the iplist offers only the live one.
    let deadline = Instant::now() + Duration::from_secs(40);
    while iplist(api, receiver) != vec![other] {
        assert!(
            Instant::now() < deadline,
            "iplist {:?}",
            iplist(api, receiver)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    logic.kill().unwrap();
    logic.wait().unwrap();
    for (p, _) in &mut gates {
        let _ = p.kill();
        let _ = p.wait();
    }
}

/// A group whose owner worker is on one node and whose members live on both: management and
/// posts cross the peer links, every member gets every post once and in one order.
#[test]
fn groups_span_logic_nodes() {
    use im_shared::proto::{CONV_C2G, CONV_GROUP_EVENT};
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let mut n0 = spawn_node(d0.path(), 0, &nodes);
    let mut n1 = spawn_node(d1.path(), 1, &nodes);
    let (mut g1, a1) = spawn_gate(1, &nodes);
    let on0: Vec<u64> = (9500..).filter(|&u| node_of(u, 2) == 0).take(2).collect();
    let on1: Vec<u64> = (9500..).filter(|&u| node_of(u, 2) == 1).take(2).collect();
    let members: Vec<u64> = on0.iter().chain(&on1).copied().collect();
    let mut clients: Vec<Client> = members
        .iter()
        .map(|&u| login_retry(a1, u, Seq(0)).0)
        .collect();
    let others: Vec<UserId> = members[1..].iter().map(|&u| UserId(u)).collect();
    // Create from a node-0 user; retry while peer links come up (the request is not queued:
    // refused `Unavailable` while a link is down, or unanswered while it is coming up).
    let deadline = Instant::now() + Duration::from_secs(20);
    let group = loop {
        match clients[0].create_group("span", &others) {
            Ok(g) => break g,
            Err(ClientError::Timeout) => {}
            Err(e) if e.code() == Some(ErrorCode::Unavailable) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("create: {e}"),
        }
        assert!(Instant::now() < deadline, "group never created");
    };
    // Every member on both nodes posts once.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_c2g(group, 1, format!("from {i}")).unwrap();
    }
    let mut orders = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut tl = Timeline::new(Seq(0));
        let deadline = Instant::now() + Duration::from_secs(20);
        while tl.messages.iter().filter(|m| m.conv == CONV_C2G).count() < members.len() {
            assert!(
                Instant::now() < deadline,
                "posts missing for member {} of {members:?} (group {group}): {:?}",
                members[i],
                tl.messages
                    .iter()
                    .map(|m| (m.seq.0, m.conv, m.from.0, m.msg_id.0))
                    .collect::<Vec<_>>()
            );
            tl.sync(c).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(tl.messages[0].conv, CONV_GROUP_EVENT);
        orders.push(
            tl.messages
                .iter()
                .filter(|m| m.conv == CONV_C2G)
                .map(|m| m.msg_id)
                .collect::<Vec<_>>(),
        );
    }
    assert!(orders.iter().all(|o| o == &orders[0]), "{orders:?}");
    // Info from a member on the other node than the group's owner worker, and a refusal.
    let (_, m) = clients[3].group_info(group).unwrap();
    assert_eq!(m.len(), members.len());
    assert_eq!(
        clients[2]
            .group_remove(group, &[UserId(members[0])])
            .unwrap_err()
            .code(),
        Some(ErrorCode::Forbidden)
    );
    for p in [&mut n0, &mut n1, &mut g1] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

/// A post to a group whose owner's logic node is down is refused `Unavailable` at once (found by
/// the chaos run, issue 16): before, the request was queued on the dead peer link, dropped with
/// it, and the client got no answer at all until its own timeout. After the node is back the
/// same post (same `client_msg_id`) is accepted.
#[test]
fn a_post_to_a_group_whose_node_is_down_is_refused_unavailable_not_left_unanswered() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let _n0 = spawn_node(d0.path(), 0, &nodes);
    let mut n1 = spawn_node(d1.path(), 1, &nodes);
    let (_g, addr) = spawn_gate(1, &nodes);
    let u0 = (9800..).find(|&u| node_of(u, 2) == 0).unwrap();
    let u1 = (9800..).find(|&u| node_of(u, 2) == 1).unwrap();
    let (mut c0, _) = login_retry(addr, u0, Seq(0));
    let (mut c1, _) = login_retry(addr, u1, Seq(0));
    // A group owned by node 1 (its id decides its owner): create until one is.
    let group = (0..64)
        .map(|_| c1.create_group("down", &[UserId(u0)]).unwrap())
        .find(|g| node_of(g.0, 2) == 1)
        .expect("a group owned by node 1 among 64");
    // While node 0's link to node 1 is still coming up (its connect backoff reaches 2 s while
    // node 1 starts), the post is refused `Unavailable`: retry until the link is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c0.send_c2g(group, 1, "while up") {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::Unavailable) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("post while node 1 is up: {e}"),
        }
    }
    n1.kill().unwrap();
    n1.wait().unwrap();
    // Node 0's link notices the dead peer at its next write (a request written into the socket
    // just before that is lost with it: the client's timeout and resend cover that window, as
    // PROTOCOL.md section 10 says). From then on the answer is an immediate Unavailable; before
    // the fix every post timed out for as long as the node was down.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c0.send_c2g(group, 2, "while down") {
            Err(e) if e.code() == Some(ErrorCode::Unavailable) => break,
            other => assert!(
                Instant::now() < deadline,
                "still not refused Unavailable: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // And it stays an answer, not silence, while the node is down.
    for _ in 0..3 {
        let e = c0.send_c2g(group, 2, "while down").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    }
    let _n1 = spawn_node(d1.path(), 1, &nodes);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c0.send_c2g(group, 2, "while down") {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never accepted again: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A group post is acknowledged while the logic node of one member is down: the owner holds
/// that member's append back (no peer link), while the members on its own node confirm theirs at
/// once. The outbox entry must outlive those first confirmations: when the node comes up, the
/// owner replays the post to it, and the late member gets the group's event and every post once,
/// in the group's order. (Deleting the entry on the first confirmation lost the post for every
/// member whose append was still on its way: issue 11.) No timing is involved: the node is simply
/// not running while the posts are acknowledged.
#[test]
fn a_group_post_acked_while_a_members_node_is_down_reaches_that_member() {
    use im_shared::proto::{CONV_C2G, CONV_GROUP_EVENT};
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let conf = api_keys_config(d0.path());
    let (n0, _, api0) = spawn_with_api(
        &[
            "logic",
            "--config",
            conf.to_str().unwrap(),
            "--node-id",
            "0",
            "--nodes",
            &nodes,
            "--data-dir",
            d0.path().to_str().unwrap(),
            "--logic-workers",
            "2",
        ],
        "links on ",
    );
    let (g, addr) = spawn_gate(1, &nodes);
    let on0: Vec<u64> = (9700..).filter(|&u| node_of(u, 2) == 0).take(2).collect();
    let late = (9700..).find(|&u| node_of(u, 2) == 1).unwrap();
    let mut early: Vec<Client> = on0
        .iter()
        .map(|&u| login_retry(addr, u, Seq(0)).0)
        .collect();
    // The API creates groups owned by its own node: node 0, the only one running.
    let (status, v) = http_signed(
        api0,
        "POST",
        "/v1/groups",
        &format!(
            r#"{{"owner":{},"name":"late","members":[{},{late}]}}"#,
            on0[0], on0[1]
        ),
    );
    assert_eq!(status, 200, "{v}");
    let group = im_shared::GroupId(v["group"].as_u64().expect("group id"));
    for (i, c) in early.iter_mut().enumerate() {
        c.send_c2g(group, 1, format!("post {i}")).unwrap();
    }
    // The members on node 0 hold everything: their confirmations reached the owner (or are on
    // their way in-process) before node 1 exists.
    let mut want = Vec::new();
    for c in &mut early {
        let mut tl = Timeline::new(Seq(0));
        let deadline = Instant::now() + Duration::from_secs(20);
        while tl.messages.len() < 3 {
            assert!(Instant::now() < deadline, "{:?}", tl.messages);
            tl.sync(c).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        want = tl.messages.iter().map(|m| (m.conv, m.msg_id)).collect();
    }
    assert_eq!(want[0].0, CONV_GROUP_EVENT);
    assert!(want[1..].iter().all(|(c, _)| *c == CONV_C2G));
    early[0].group_info(group).unwrap(); // one more round of the owner worker

    let n1 = spawn_node(d1.path(), 1, &nodes);
    let (mut c, _) = login_retry(addr, late, Seq(0));
    let mut tl = Timeline::new(Seq(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while tl.messages.len() < want.len() {
        assert!(
            Instant::now() < deadline,
            "the member of the node that was down has {:?}, wants {want:?}",
            tl.messages
                .iter()
                .map(|m| (m.conv, m.msg_id))
                .collect::<Vec<_>>()
        );
        tl.sync(&mut c).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let got: Vec<_> = tl.messages.iter().map(|m| (m.conv, m.msg_id)).collect();
    assert_eq!(got, want, "once each, in the group's order");
    drop((n0, n1, g));
}

/// Waits up to `limit` for `child` to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    signal_pid(child.id(), sig);
}

/// Waits (at most 10 s) until every thread of `pid` is in the stopped state (`T` in
/// `/proc/<pid>/task/*/stat`).
fn wait_all_threads_stopped(pid: u32) {
    let t0 = Instant::now();
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let running: Vec<String> = tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .filter(|stat| {
                let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
                !matches!(state, Some(Some('T' | 't')))
            })
            .collect();
        if running.is_empty() {
            eprintln!("all threads of {pid} stopped after {:?}", t0.elapsed());
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "threads of {pid} not stopped: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal_pid(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// A logic node is paused (SIGSTOP: a stuck VM, a long GC-like stall) while a client's message
/// is on its way to it. A replacement process for the same node slot acquires the shards only
/// after the paused one's lease ran out. The paused process then resumes while the Redis master
/// holding the leases is paused too, so it cannot learn that it lost its shards: it must still
/// not commit or acknowledge anything (its lease ran out by its own clock). Once Redis answers
/// again it finds the lease lost and exits with code 75, and its store holds nothing written
/// after the pause. The client's retry through the new owner is accepted once.
#[test]
fn a_paused_logic_node_is_fenced_when_a_replacement_takes_its_shards() {
    use im_logic::store::{FjallStore, Store};
    const LEASE_MS: u64 = 1_500;
    let mut cluster = im_testkit::RedisCluster::start(3, 0).expect("redis cluster");
    let redis = cluster.nodes().join(",");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let lease = LEASE_MS.to_string();
    let logic = |d: &Path| {
        spawn(
            &[
                "logic",
                "--link-listen",
                "127.0.0.1:0",
                "--data-dir",
                d.to_str().unwrap(),
                "--logic-workers",
                "2",
                "--redis-nodes",
                &redis,
                "--shard-lease-ms",
                &lease,
            ],
            "links on ",
        )
    };
    let (mut p1, link1) = logic(d1.path());
    let (g1, a1) = spawn_gate(1, link1);
    let (alice, bob) = (9201u64, 9202u64);
    let (mut a, _) = login_retry(a1, alice, Seq(0));
    let before = a.send_c2c(UserId(bob), 1, "before the pause").unwrap();

    signal(&p1, "-STOP");
    // kill(2) only queues the stop: a thread in an uninterruptible wait (an fsync) stops when it
    // comes out, and the others keep running until one of them starts the group stop. Send only
    // once every thread is stopped, or the message may be handled before the pause.
    wait_all_threads_stopped(p1.id());
    // Sent while the owner is paused: the gate writes it into the link, where the paused
    // process will read it when it resumes.
    let during = std::thread::spawn(move || {
        a.timeout = Duration::from_secs(20);
        a.send_c2c(UserId(bob), 2, "during the pause")
    });
    let paused = Instant::now();
    // The replacement (same node id 0, its own address) waits out the paused node's lease:
    // renewed every LEASE_MS/4, so it has at least 3/4 of LEASE_MS left at the pause.
    let (p2, link2) = logic(d2.path());
    let waited = paused.elapsed();
    assert!(
        waited >= Duration::from_millis(LEASE_MS * 3 / 4 - 100),
        "the replacement acquired the shards after {waited:?}, while the paused node's lease \
         was still live"
    );

    // Resume the old owner while the leases' Redis master is unreachable.
    let m = cluster.master_of_key("{shards}:map").unwrap();
    let master = cluster.pid(m).unwrap();
    signal_pid(master, "-STOP");
    signal(&p1, "-CONT");
    std::thread::sleep(Duration::from_secs(3));
    let early = p1.try_wait().unwrap();
    signal_pid(master, "-CONT");
    assert_eq!(
        early, None,
        "the old owner exited before it could know it was fenced"
    );
    let status = wait_exit(&mut p1, Duration::from_secs(15)).expect("the fenced node exits");
    assert_eq!(status.code(), Some(75), "exit status of the fenced node");
    let r = during.join().unwrap();
    assert!(
        r.is_err(),
        "the paused node acknowledged a message after losing its shards: {r:?}"
    );
    // Nothing of the message sent during the pause reached the old owner's store.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let old = FjallStore::open(d1.path()).unwrap();
    let tl = rt
        .block_on(old.timeline(UserId(alice), Seq(0), 100))
        .unwrap();
    let bodies: Vec<_> = tl.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, vec![bytes::Bytes::from("before the pause")]);
    assert_eq!(tl[0].seq, before.seq);
    drop(old);

    // The client retries the same client_msg_id through a gate of the new owner.
    let (g2, a2) = spawn_gate(2, link2);
    let (mut a, _) = login_retry(a2, alice, Seq(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    let ack = loop {
        match a.send_c2c(UserId(bob), 2, "during the pause") {
            Ok(ack) => break ack,
            Err(ClientError::Server { code, .. }) if code.is_retryable() => {}
            Err(e) => panic!("retry through the new owner: {e}"),
        }
        assert!(Instant::now() < deadline, "the retry was never accepted");
        std::thread::sleep(Duration::from_millis(100));
    };
    let again = a.send_c2c(UserId(bob), 2, "during the pause").unwrap();
    assert_eq!(again.msg_id, ack.msg_id, "a second retry is deduplicated");
    let (mut b, _) = login_retry(a2, bob, Seq(0));
    let mut tl = Timeline::new(Seq(0));
    tl.sync(&mut b).unwrap();
    let got: Vec<_> = tl.messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(got, vec![bytes::Bytes::from("during the pause")]);
    // p2, g1 and g2 are killed and reaped when they go out of scope.
    drop((p2, g1, g2));
}

/// The organisation tree is owned by one logic node; a client whose user lives on the other
/// node reads the same tree and is told of changes (its node pulls the owner's records over the
/// peer link: each node's embedded store holds only its own shards' data).
#[test]
fn the_organisation_tree_reaches_the_clients_of_every_logic_node() {
    use im_shared::org::OrgTree;
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = d0.path().join("api.toml");
    std::fs::write(
        &cfg,
        "[api]\nlisten = \"127.0.0.1:0\"\n[api.keys]\nbiz = \"s3cret\"\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let node = |d: &Path, id: &str| {
        let d = d.to_str().unwrap().to_owned();
        spawn_with_api(
            &[
                "logic",
                "--config",
                cfg,
                "--node-id",
                id,
                "--nodes",
                &nodes,
                "--data-dir",
                &d,
                "--logic-workers",
                "2",
            ],
            "links on ",
        )
    };
    let (mut n0, _, api0) = node(d0.path(), "0");
    let (mut n1, _, api1) = node(d1.path(), "1");
    let (mut g1, a1) = spawn_gate(1, &nodes);
    let signed = |api: SocketAddr, method: &str, target: &str, body: &str| {
        let ts = im_shared::token::now_secs();
        signed_request(api, ("biz", "s3cret"), ts, method, target, body)
    };
    let import = r#"{"departments": [{"id": 1, "name": "Company"}, {"id": 2, "parent": 1, "name": "Eng"}],
        "users": [{"uid": 7, "name": "Ann", "departments": [{"dept": 2}]}]}"#;
    // One node owns the tree; the other refuses changes, naming the owner.
    let r0 = signed(api0, "POST", "/v1/org/import", import);
    let (owner_api, other_api, r) = if r0.status == 200 {
        (api0, api1, r0)
    } else {
        (api1, api0, signed(api1, "POST", "/v1/org/import", import))
    };
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()["version"].as_u64().unwrap();
    let refused = signed(other_api, "POST", "/v1/org/import", import);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.text().contains("owned by logic node"),
        "{}",
        refused.text()
    );
    // A user on each node sees the whole tree.
    let users: Vec<u64> = [0, 1]
        .iter()
        .map(|&n| (9600..).find(|&u| node_of(u, 2) == n).unwrap())
        .collect();
    let mut clients: Vec<Client> = users
        .iter()
        .map(|&u| login_retry(a1, u, Seq(0)).0)
        .collect();
    for c in clients.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut t = OrgTree::new();
            match c.org_sync_all(&mut t, 0) {
                Ok(got) if got == v => {
                    assert_eq!(t.depts_of(7), vec![2]);
                    break;
                }
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::Unavailable) => {}
                Err(e) => panic!("{e}"),
            }
            assert!(
                Instant::now() < deadline,
                "the tree never reached this node"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A change reaches both as a notice, then by an incremental sync.
    let r = signed(
        owner_api,
        "PUT",
        "/v1/org/departments/2",
        r#"{"parent": 1, "name": "Engineering"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v2 = r.json()["version"].as_u64().unwrap();
    for c in clients.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Cmd::OrgChanged { version }) = c.recv(Duration::from_millis(200)).unwrap() {
                if version == v2 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "no OrgChanged {v2}");
        }
        let (_, next, more, page) = c.org_sync(v, 100).unwrap();
        assert_eq!((next, more, page.len()), (v2, false, 1));
    }
    for p in [&mut n0, &mut n1, &mut g1] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

/// `IM_LOG_FORMAT=json` (issue 19): every log line is one JSON object with a level, a target and
/// the message, for log shippers.
#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_reaped(
        Command::new(env!("CARGO_BIN_EXE_im-server"))
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("IM_LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + STARTUP_DEADLINE;
    while !seen
        .iter()
        .any(|l: &String| l.contains("im-server listening"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no startup line within the deadline: {seen:?}"),
        }
    }
    for l in &seen {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{l}");
        assert!(v["fields"]["message"].is_string(), "{l}");
    }
    // The lifecycle: the first line names the role and the build, and a SIGTERM ends with
    // "shutting down" then "stopped".
    let first: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(first["fields"]["message"], "im-server starting", "{seen:?}");
    assert_eq!(first["fields"]["role"], "run");
    assert!(first["fields"]["version"].is_string() && first["fields"]["commit"].is_string());
    signal(&child, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rest = Vec::new();
    while !rest.iter().any(|l: &String| l.contains("\"stopped\"")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => rest.push(l),
            Err(_) => panic!("no \"stopped\" line after SIGTERM: {rest:?}"),
        }
    }
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{rest:?}");
    assert!(wait_exit(&mut child, Duration::from_secs(20)).is_some_and(|s| s.success()));
}

/// File messages across two logic nodes: the file service of node 0 stores the files (both
/// nodes name it in `files.public_url` and share the secret), a member on node 1 fetches a
/// group's file through the group's owner on the other node, a c2c file sent from node 0 is
/// accepted by its key and fetched on node 1, and a member removed on one node is refused.
#[test]
fn file_messages_span_logic_nodes() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (p0, p1) = (free_port(), free_port());
    let config = |d: &Path| {
        let f = d.join("node.toml");
        std::fs::write(
            &f,
            format!(
                "large_group_threshold = 2\n[files]\npublic_url = \"http://127.0.0.1:{p0}\"\n\
                 secret = \"a-shared-file-secret-of-the-cluster\"\n"
            ),
        )
        .unwrap();
        f
    };
    let (c0, c1) = (config(d0.path()), config(d1.path()));
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let node = |d: &Path, cfg: &Path, id: &str, api: u16| {
        spawn_with_api(
            &[
                "logic",
                "--api-listen",
                &format!("127.0.0.1:{api}"),
                "--config",
                cfg.to_str().unwrap(),
                "--node-id",
                id,
                "--nodes",
                &nodes,
                "--data-dir",
                d.to_str().unwrap(),
                "--logic-workers",
                "2",
            ],
            "links on ",
        )
    };
    let (mut n0, _, api0) = node(d0.path(), &c0, "0", p0);
    let (mut n1, _, api1) = node(d1.path(), &c1, "1", p1);
    assert_eq!((api0.port(), api1.port()), (p0, p1));
    let (mut g1, a1) = spawn_gate(1, &nodes);
    let u0 = (9700..).find(|&u| node_of(u, 2) == 0).unwrap();
    let u1 = (9700..).find(|&u| node_of(u, 2) == 1).unwrap();
    let (mut c0, _) = login_retry(a1, u0, Seq(0));
    let (mut c1, _) = login_retry(a1, u1, Seq(0));
    // A group owned by node 0, so that u1's requests about it cross the peer link.
    let deadline = Instant::now() + Duration::from_secs(20);
    let group = loop {
        match c0.create_group("files", &[UserId(u1)]) {
            Ok(g) if node_of(g.0, 2) == 0 => break g,
            Ok(_) => {}
            Err(ClientError::Timeout) => {}
            Err(e) if e.code() == Some(ErrorCode::Unavailable) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("create: {e}"),
        }
        assert!(Instant::now() < deadline, "no group on node 0");
    };
    let bytes: Vec<u8> = (0..70_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let f = c0
        .upload_file(
            im_shared::files::FileKind::File,
            "application/zip",
            "a.zip",
            &bytes,
            16 << 10,
        )
        .unwrap();
    c0.send_c2g(group, 1, f.to_body()).unwrap();
    c0.send_c2c(UserId(u1), 2, f.to_body()).unwrap();
    let mut tl = Timeline::new(Seq(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    let files = loop {
        tl.sync(&mut c1).unwrap();
        let v: Vec<_> = tl
            .messages
            .iter()
            .filter(|m| matches!(im_shared::files::FileRef::from_body(&m.body), Ok(Some(_))))
            .map(|m| (m.conv, m.seq))
            .collect();
        if v.len() == 2 {
            break v;
        }
        assert!(Instant::now() < deadline, "file messages missing: {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for (conv, seq) in &files {
        let (url, _) = c1.file_url(*seq).unwrap();
        assert!(url.starts_with(&format!("http://127.0.0.1:{p0}/")), "{url}");
        assert_eq!(c1.fetch_file(*seq).unwrap(), bytes, "conv {conv}");
    }
    // Past the threshold (a third member) the group keeps its own timeline: u1, on node 1, gets
    // the file of a post by the group's seq, from the group's owner on node 0.
    let u2 = (u1 + 1..).find(|&u| node_of(u, 2) == 1).unwrap();
    c0.group_add(group, &[UserId(u2)]).unwrap();
    let post = c0.send_c2g(group, 3, f.to_body()).unwrap();
    assert_eq!(post.seq, Seq(2), "the post follows the switch's marker");
    let (url, _) = c1.group_file_url(group, post.seq).unwrap();
    assert!(url.starts_with(&format!("http://127.0.0.1:{p0}/")), "{url}");
    assert_eq!(c1.fetch_group_file(group, post.seq).unwrap(), bytes);
    // Removed on node 0, refused for the group's file on node 1; the c2c copy stays readable.
    c0.group_remove(group, &[UserId(u1)]).unwrap();
    for (conv, seq) in files {
        let r = c1.file_url(seq);
        if conv == im_shared::proto::CONV_C2G {
            assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotMember));
        } else {
            r.unwrap();
        }
    }
    let r = c1.group_file_url(group, post.seq);
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotMember));
    for p in [&mut n0, &mut n1, &mut g1] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

/// Presence and typing across logic nodes: a user of node 0 follows a user of node 1 (the watch
/// goes to node 1's worker, which pushes every change back), and typing crosses the peer link
/// both ways, in c2c and in a group owned by the other node.
#[test]
fn presence_and_typing_cross_logic_nodes() {
    use im_shared::proto::{CONV_C2C, CONV_C2G};
    use im_shared::Command;
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let _n0 = spawn_node(d0.path(), 0, &nodes);
    let _n1 = spawn_node(d1.path(), 1, &nodes);
    let (_g1, a1) = spawn_gate(1, &nodes);
    let w = (9700..).find(|&u| node_of(u, 2) == 0).unwrap();
    let f = (9700..).find(|&u| node_of(u, 2) == 1).unwrap();
    let (mut wc, _) = login_retry(a1, w, Seq(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    let next = |c: &mut Client, what: &str| -> Command {
        loop {
            assert!(Instant::now() < deadline, "no {what} within 20 s");
            if let Some(cmd @ (Command::PresenceNotice { .. } | Command::TypingNotice { .. })) =
                c.recv(Duration::from_millis(100)).unwrap()
            {
                return cmd;
            }
        }
    };
    let state = |cmd: Command| match cmd {
        Command::PresenceNotice { entries } => {
            assert_eq!(entries.len(), 1, "{entries:?}");
            (entries[0].uid.0, entries[0].online)
        }
        other => panic!("{other:?}"),
    };
    // The watch may go out before the peer link is up: retry until the state comes back.
    let first = loop {
        wc.presence_subscribe(&[UserId(f)]).unwrap();
        let until = Instant::now() + Duration::from_secs(2);
        let mut got = None;
        while got.is_none() && Instant::now() < until {
            if let Some(Command::PresenceNotice { entries }) =
                wc.recv(Duration::from_millis(100)).unwrap()
            {
                got = Some(entries);
            }
        }
        if let Some(g) = got {
            break g;
        }
        wc.presence_subscribe(&[]).unwrap();
        assert!(Instant::now() < deadline, "no presence across nodes");
    };
    assert_eq!((first[0].uid.0, first[0].online), (f, false));
    let (mut fc, _) = login_retry(a1, f, Seq(0));
    assert_eq!(state(next(&mut wc, "online")), (f, true));
    // Typing both ways in c2c.
    fc.typing(CONV_C2C, w, true).unwrap();
    match next(&mut wc, "typing") {
        Command::TypingNotice { conv, from, .. } => assert_eq!((conv, from.0), (CONV_C2C, f)),
        other => panic!("{other:?}"),
    }
    wc.typing(CONV_C2C, f, true).unwrap();
    match next(&mut fc, "typing") {
        Command::TypingNotice { conv, from, .. } => assert_eq!((conv, from.0), (CONV_C2C, w)),
        other => panic!("{other:?}"),
    }
    // In a group created by the node-1 user.
    let g = fc.create_group("cross", &[UserId(w)]).unwrap();
    fc.typing(CONV_C2G, g.0, true).unwrap();
    match next(&mut wc, "group typing") {
        Command::TypingNotice {
            conv, peer, from, ..
        } => {
            assert_eq!((conv, peer, from.0), (CONV_C2G, g.0, f))
        }
        other => panic!("{other:?}"),
    }
    // Offline after the default delay (5 s).
    fc.logout().unwrap();
    assert_eq!(state(next(&mut wc, "offline")), (f, false));
}

/// A large group (read diffusion) whose members are spread over two logic nodes, each with its
/// own store: live posts reach online members on both nodes (one `GroupLive` per worker), a
/// member who logs in later gets the group's head from the owner's node and syncs it there, and
/// an `@all` reaches every member's own timeline on both nodes.
#[test]
fn a_large_group_spans_logic_nodes() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let conf = d0.path().join("large.toml");
    std::fs::write(&conf, "large_group_threshold = 2\n").unwrap();
    let extra = vec!["--config".to_string(), conf.to_str().unwrap().to_string()];
    let nodes = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let mut n0 = spawn_node_with(d0.path(), 0, &nodes, &extra);
    let mut n1 = spawn_node_with(d1.path(), 1, &nodes, &extra);
    let (mut g1, a1) = spawn_gate(1, &nodes);
    let on0: Vec<u64> = (9700..).filter(|&u| node_of(u, 2) == 0).take(3).collect();
    let on1: Vec<u64> = (9700..).filter(|&u| node_of(u, 2) == 1).take(3).collect();
    // Online: two members on each node; the third of each logs in later.
    let online = [on0[0], on1[0], on0[1], on1[1]];
    let mut clients: Vec<Client> = online
        .iter()
        .map(|&u| login_retry(a1, u, Seq(0)).0)
        .collect();
    let retry = |f: &mut dyn FnMut() -> Result<(), ClientError>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match f() {
                Ok(()) => return,
                Err(ClientError::Timeout) => {}
                Err(e) if e.code() == Some(ErrorCode::Unavailable) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "peer links never came up");
        }
    };
    let mut group = None;
    retry(&mut || {
        group = Some(clients[0].create_group_with_id("span", &[UserId(online[1])], 7)?);
        Ok(())
    });
    let group = group.unwrap();
    // Past the threshold (2): large from here on.
    let more: Vec<UserId> = [online[2], online[3], on0[2], on1[2]]
        .iter()
        .map(|&u| UserId(u))
        .collect();
    retry(&mut || clients[0].group_add(group, &more));
    let mut ack = None;
    retry(&mut || {
        ack = Some(clients[3].send_c2g(group, 1, "across nodes")?);
        Ok(())
    });
    let ack = ack.unwrap();
    assert_eq!(
        (ack.seq, ack.prev_seq),
        (Seq(2), Seq(1)),
        "the marker, the post"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                Instant::now() < deadline,
                "member {} got no live post",
                online[i]
            );
            if let Some(Cmd::GroupDeliver(m)) = c.recv(Duration::from_millis(200)).unwrap() {
                if m.msg_id == ack.msg_id {
                    assert_eq!((m.seq, m.to.0), (Seq(2), group.0));
                    break;
                }
            }
        }
    }
    // The late members, one per node: the head comes from the group's owner, wherever it is.
    for late in [on0[2], on1[2]] {
        let (mut c, _) = login_retry(a1, late, Seq(0));
        let deadline = Instant::now() + Duration::from_secs(20);
        let heads = loop {
            assert!(Instant::now() < deadline, "no GroupHeads for {late}");
            if let Some(Cmd::GroupHeads { heads }) = c.recv(Duration::from_millis(200)).unwrap() {
                break heads;
            }
        };
        assert_eq!(heads.len(), 1);
        assert_eq!((heads[0].group, heads[0].head), (group, Seq(2)));
        let (posts, more, head) = c.group_sync(group, Seq(0), 0).unwrap();
        assert_eq!((posts.len(), more, head), (2, false, Seq(2)));
        assert_eq!(posts[1].msg_id, ack.msg_id);
        c.group_read(group, Seq(2)).unwrap();
    }
    // @all by the owner, with 2 500 more members (three chunks, spread over both nodes): every
    // member gets one mention entry through the peer links, the online ones live.
    let offline: Vec<UserId> = (0..2_500).map(|i| UserId(200_000 + i)).collect();
    for part in offline.chunks(1_250) {
        retry(&mut || clients[0].group_add(group, part));
    }
    let all = clients[0]
        .send_c2g_mentioning(group, 2, "@all", &[UserId(0)])
        .unwrap();
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no mention for {}", online[i]);
            if let Some(Cmd::Deliver(m)) = c.recv(Duration::from_millis(200)).unwrap() {
                c.deliver_ack(m.seq).unwrap();
                if m.conv == im_shared::proto::CONV_MENTION {
                    assert_eq!(m.msg_id, all.msg_id);
                    break;
                }
            }
        }
    }
    // Offline members on each node, the last one in uid order among them: exactly one.
    let last_on = |n| {
        offline
            .iter()
            .rev()
            .find(|u| node_of(u.0, 2) == n)
            .unwrap()
            .0
    };
    for u in [last_on(0), last_on(1), offline[1_000].0] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (mut c, _) = login_retry(a1, u, Seq(0));
            let (page, _, _) = c.sync_page(Seq(0), 100).unwrap();
            let got: Vec<_> = page
                .iter()
                .filter(|m| m.conv == im_shared::proto::CONV_MENTION)
                .map(|m| m.msg_id)
                .collect();
            if !got.is_empty() {
                assert_eq!(got, vec![all.msg_id], "member {u}");
                break;
            }
            assert!(Instant::now() < deadline, "no mention for {u} within 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for p in [&mut n0, &mut n1, &mut g1] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

/// A gate of a newer release may forward a client command that this logic node does not know
/// yet (a rolling upgrade that reached the gates first): the request is answered `Error
/// UnknownCommand` and the gate link stays up; ending it would close every connection of the
/// gate's lane.
#[test]
fn a_command_unknown_to_logic_is_refused_and_the_gate_link_stays_up() {
    use im_shared::link::{decode_msg, encode_msg, Down, LinkMsg, Role};
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (_logic, link) = spawn_logic(dir.path(), "127.0.0.1:0");
    let mut s = std::net::TcpStream::connect(link).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = im_shared::ConnId::new(7, 0, 1);
    let mut out = bytes::BytesMut::new();
    encode_msg(
        &LinkMsg::Hello {
            role: Role::Gate,
            id: 7,
            map_epoch: 0,
            addr: String::new(),
            ws: String::new(),
            caps: 0,
        },
        &mut out,
    );
    encode_msg(
        &LinkMsg::UnknownUp {
            conn,
            uid: UserId(5),
            cmd: 0x7E,
            req_id: 42,
        },
        &mut out,
    );
    encode_msg(&LinkMsg::Ping, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while got.len() < 3 {
        let n = s.read(&mut chunk).expect("the link ended or timed out");
        assert!(n > 0, "logic closed the link; got {got:?}");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(m) = decode_msg(&mut buf).unwrap() {
            got.push(m);
        }
    }
    assert!(
        matches!(
            got[0],
            LinkMsg::Hello {
                role: Role::Logic,
                ..
            }
        ),
        "{got:?}"
    );
    // The refusal and the answer to the ping, in either order.
    let Some((to, data)) = got[1..].iter().find_map(|m| match m {
        LinkMsg::Down(Down::Send { conn, data }) => Some((conn, data)),
        _ => None,
    }) else {
        panic!("expected the refusal, got {got:?}");
    };
    assert_eq!(*to, conn);
    let mut frame = bytes::BytesMut::from(&data[..]);
    let f = im_shared::FrameCodec::new(1 << 16)
        .decode(&mut frame)
        .unwrap()
        .unwrap();
    assert_eq!(f.req_id, 42);
    match Cmd::decode(&f).unwrap() {
        Cmd::Error { code, message } => {
            assert_eq!(code, ErrorCode::UnknownCommand);
            assert!(message.contains("0x7E"), "{message}");
        }
        other => panic!("expected an Error, got {other:?}"),
    }
    assert!(
        got[1..].iter().any(|m| matches!(m, LinkMsg::Pong)),
        "the link is still up: {got:?}"
    );
}
