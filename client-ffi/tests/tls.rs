//! The session over TLS (the gate's `[tcp_tls]`) through the bindings' object: a session that
//! trusts the test CA logs in and chats; one that trusts nothing else fails its connects and
//! keeps retrying (it never logs in in the clear).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use im_client_ffi::{DeviceKind, GateAddr, ImEvent, ImSession, SessionConfig};
use im_shared::token::{now_secs, HmacTokens};
use im_shared::UserId;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../server/tests/fixtures/tls")
        .join(name)
}

fn session(gate: &str, uid: u64, token: String, ca: String) -> std::sync::Arc<ImSession> {
    let s = ImSession::new(SessionConfig {
        uid,
        token,
        device: DeviceKind::Phone,
        device_id: format!("tls-{uid}"),
        last_seq: 0,
        gates: vec![GateAddr {
            id: 1,
            addr: gate.to_owned(),
        }],
        iplist_json: None,
        tls_ca_pem: Some(ca),
        tls_server_name: Some("localhost".into()),
        ack_timeout_ms: None,
    })
    .unwrap();
    s.start();
    s
}

/// The first event matching `f` within 15 s (panics with what came instead).
fn wait(s: &ImSession, what: &str, f: impl Fn(&ImEvent) -> bool) -> ImEvent {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Some(e) = s.next_event(100) {
            if f(&e) {
                return e;
            }
            seen.push(e);
        }
    }
    panic!("no {what} within 15 s; got {seen:?}");
}

#[test]
fn a_session_over_tls_logs_in_and_chats_and_refuses_an_unknown_authority() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = im_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        gate_cores: 1,
        logic_workers: 1,
        tcp_tls: Some(im_server::TlsPaths {
            cert: fixture("server1.pem"),
            key: fixture("server1.key"),
        }),
        ..Default::default()
    };
    cfg.api.as_mut().unwrap().listen = "127.0.0.1:0".parse().unwrap();
    let tokens = HmacTokens::new(cfg.token_secret.as_bytes());
    let server = im_server::start(&cfg).unwrap();
    let gate = server.local_addr().to_string();
    let ca = std::fs::read_to_string(fixture("ca.pem")).unwrap();
    let tok = |u| tokens.mint(UserId(u), now_secs() + 3600);

    let alice = session(&gate, 1, tok(1), ca.clone());
    let bob = session(&gate, 2, tok(2), ca);
    wait(&alice, "login", |e| matches!(e, ImEvent::LoggedIn { .. }));
    wait(&bob, "login", |e| matches!(e, ImEvent::LoggedIn { .. }));
    let id = alice.send_c2c(2, None, b"over tls".to_vec()).unwrap();
    wait(
        &alice,
        "ack",
        |e| matches!(e, ImEvent::SendAcked { client_msg_id, .. } if *client_msg_id == id),
    );
    wait(
        &bob,
        "message",
        |e| matches!(e, ImEvent::Message { message } if message.body == b"over tls" && message.client_msg_id == id),
    );

    // A certificate from an authority the session does not trust: the connect fails, the
    // session waits and tries again, and never logs in.
    let other = std::fs::read_to_string(fixture("server2.pem")).unwrap();
    let eve = session(&gate, 3, tok(3), other);
    let e = wait(&eve, "a refused connect", |e| {
        matches!(e, ImEvent::Disconnected { .. })
    });
    assert!(format!("{e:?}").contains("connect to"), "{e:?}");
    wait(&eve, "a retry", |e| {
        matches!(e, ImEvent::Reconnecting { .. })
    });
    assert!(!eve.is_logged_in());
    alice.close(2000);
    bob.close(2000);
    drop(server);
}
