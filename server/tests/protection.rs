//! Attack protection at the gate (docs/SECURITY.md): each attack fails, and other users (other
//! source addresses, other users on the same core) are unaffected. Clients bind distinct
//! loopback source addresses (127.0.0.x) to play different hosts.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use im_client::Client;
use im_gate::GateStats;
use im_shared::frame::{encode_header, Cmd};
use im_shared::{shard, Command, DeviceType, ErrorCode, Seq, UserId};

/// A client whose socket is bound to the source address `src` (any 127.0.0.0/8 address).
fn connect_from(src: &str, addr: SocketAddr) -> Client {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    let from: SocketAddr = format!("{src}:0").parse().unwrap();
    sock.bind(&from.into()).unwrap();
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let mut c = Client::from_stream(sock.into()).unwrap();
    c.timeout = Duration::from_secs(10);
    c
}

fn try_login_from(
    src: &str,
    addr: SocketAddr,
    uid: u64,
    token: &str,
    dt: DeviceType,
) -> Result<Client, ErrorCode> {
    let mut c = connect_from(src, addr);
    match c.login(UserId(uid), token, dt, &format!("{dt:?}-{uid}"), Seq(0)) {
        Ok(_) => Ok(c),
        Err(e) => {
            let code = e.code().unwrap_or_else(|| panic!("not a refusal: {e}"));
            // Every login refusal closes the connection.
            c.read_until_closed(Duration::from_secs(5)).unwrap();
            Err(code)
        }
    }
}

fn login_from(src: &str, addr: SocketAddr, uid: u64) -> Client {
    try_login_from(src, addr, uid, &token(uid), DeviceType::Phone).unwrap()
}

fn stats(s: &TestServer) -> GateStats {
    s.server.as_ref().unwrap().gate_stats()
}

/// The connection was refused at accept: one `Error Overloaded`, then closed, at once.
fn assert_refused_at_accept(c: &mut Client) {
    let t0 = Instant::now();
    let got = c.read_until_closed(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(
            got.as_slice(),
            [Command::Error {
                code: ErrorCode::Overloaded,
                ..
            }]
        ),
        "{got:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "not closed at once");
}

/// Heartbeats are answered before login: the connection was admitted.
fn admitted(mut c: Client) -> Client {
    c.heartbeat()
        .expect("admitted connection answers heartbeats");
    c
}

/// Retries `f` every 50 ms until it returns `Some`, for at most `secs` seconds.
fn eventually<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "condition not met in {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connects from any address admitted now?
fn admitted_now(src: &str, addr: SocketAddr) -> Option<Client> {
    let mut c = connect_from(src, addr);
    c.heartbeat().ok().map(|_| c)
}

/// `from` sends to `to` (user `to_uid`), and it arrives (other pushes are skipped).
fn chat(from: &mut Client, to: &mut Client, to_uid: u64, id: u64) {
    let text = format!("hello {id}");
    from.send_c2c(UserId(to_uid), id, text.clone()).unwrap();
    while next_deliver(to).body != text.as_bytes() {}
}

/// `n` user ids (from `from` up) whose connections live on gate core `core` of 2.
fn uids_on_core(core: usize, from: u64, n: usize) -> Vec<u64> {
    (from..)
        .filter(|u| shard::core_of(UserId(*u), 2) == core)
        .take(n)
        .collect()
}

#[test]
fn per_ip_connection_cap_refuses_the_excess_at_accept_for_that_address_only() {
    let s = start_with(|c| c.limits.max_conns_per_ip = 3);
    let attacker = "127.0.0.2";
    // Three sockets from the address: one logged in, two sitting before login.
    let mut inside = login_from(attacker, s.addr, 100);
    let mut held = vec![
        admitted(connect_from(attacker, s.addr)),
        admitted(connect_from(attacker, s.addr)),
    ];
    let mut excess = connect_from(attacker, s.addr);
    assert_refused_at_accept(&mut excess);
    assert_eq!(stats(&s).refused_ip_connections, 1);
    // Another address is unaffected, and so is the logged-in connection of the capped one.
    let mut other = login_from("127.0.0.3", s.addr, 101);
    chat(&mut other, &mut inside, 100, 1);
    chat(&mut inside, &mut other, 101, 2);
    // A socket that leaves frees its place.
    held.pop();
    let back = eventually(3, || admitted_now(attacker, s.addr));
    assert!(held[0].heartbeat().is_ok());
    // Logged-in and pre-login sockets alike: once all leave, the address has its 3 places again.
    drop((inside, held, back));
    let again: Vec<Client> = eventually(3, || {
        let v: Vec<Client> = (0..3)
            .map_while(|_| admitted_now(attacker, s.addr))
            .collect();
        (v.len() == 3).then_some(v)
    });
    assert_eq!(again.len(), 3);
}

#[test]
fn per_ip_connection_rate_refuses_bursts_for_that_address_only() {
    let s = start_with(|c| {
        c.limits.conn_rate_per_ip = 1;
        c.limits.conn_burst_per_ip = 4;
    });
    let attacker = "127.0.0.4";
    // The burst is admitted (well within the second it takes to earn one more token)…
    let mut burst: Vec<Client> = (0..4)
        .map(|_| admitted(connect_from(attacker, s.addr)))
        .collect();
    // … the next connection is refused at accept.
    let mut fast = connect_from(attacker, s.addr);
    assert_refused_at_accept(&mut fast);
    assert_eq!(stats(&s).refused_ip_rate, 1);
    // Another address connects and logs in; the admitted ones still work.
    let mut other = login_from("127.0.0.5", s.addr, 111);
    assert!(other.heartbeat().is_ok());
    for c in &mut burst {
        assert!(c.heartbeat().is_ok());
    }
    // At 1 connection/s the address gets in again a second later.
    let _later = eventually(4, || admitted_now(attacker, s.addr));
}

#[test]
fn max_connections_refuses_new_sockets_while_existing_ones_keep_chatting() {
    let s = start_with(|c| c.limits.max_connections = 4);
    let mut a = login(s.addr, 120);
    let mut b = login(s.addr, 121);
    let pre1 = admitted(connect(s.addr));
    let _pre2 = admitted(connect(s.addr));
    // The gate holds 4 sockets: every new one is refused, from any address.
    let mut x = connect(s.addr);
    assert_refused_at_accept(&mut x);
    let mut y = connect_from("127.0.0.6", s.addr);
    assert_refused_at_accept(&mut y);
    assert_eq!(stats(&s).refused_max_connections, 2);
    for i in 0..20 {
        chat(&mut a, &mut b, 121, i + 1);
    }
    // One leaves, one may come in.
    drop(pre1);
    let _c = eventually(3, || admitted_now("127.0.0.6", s.addr));
    chat(&mut b, &mut a, 120, 100);
}

/// Reads until `n` responses (`SendAck` or `Error`) arrived; returns (acks, `Overloaded`
/// refusals). Any other error fails.
fn count_responses(c: &mut Client, n: usize) -> (usize, usize) {
    let (mut acks, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while acks + refused < n {
        assert!(
            Instant::now() < deadline,
            "{acks} acks + {refused} refusals"
        );
        match c.recv(Duration::from_millis(200)).unwrap() {
            Some(Command::SendAck {
                code: ErrorCode::Ok,
                ..
            }) => acks += 1,
            Some(Command::Error {
                code: ErrorCode::Overloaded,
                ..
            }) => refused += 1,
            Some(Command::Error { code, message }) => panic!("{code:?}: {message}"),
            _ => {} // roaming copies of the other device's messages
        }
    }
    (acks, refused)
}

#[test]
fn message_rate_is_per_user_and_spares_a_user_on_the_same_core() {
    let s = start_with(|c| {
        c.limits.msg_rate_per_user = 1;
        c.limits.msg_burst_per_user = 20;
        c.limits.msg_refusals_before_close = 0;
    });
    let on_core = uids_on_core(0, 130, 2);
    let (abuser, normal, rcpt) = (on_core[0], on_core[1], 1139);
    let (mut phone, _) = login_as(s.addr, abuser, DeviceType::Phone, "a-phone");
    let (mut desk, _) = login_as(s.addr, abuser, DeviceType::Desktop, "a-desk");
    let mut n = login(s.addr, normal);
    let mut r = login(s.addr, rcpt);
    // Both devices of the abuser pipeline 40 sends each: they share one bucket of 20.
    let t0 = Instant::now();
    for i in 0..40u64 {
        for (c, base) in [(&mut phone, 0), (&mut desk, 1000)] {
            c.send_cmd(&Command::SendC2c {
                client_msg_id: base + i + 1,
                to: UserId(rcpt),
                body: Bytes::from_static(b"flood"),
            })
            .unwrap();
        }
    }
    let (a1, r1) = count_responses(&mut phone, 40);
    let (a2, r2) = count_responses(&mut desk, 40);
    let earned = t0.elapsed().as_secs() as usize + 1; // 1 token/s since the burst
    assert!(
        (20..=20 + earned).contains(&(a1 + a2)),
        "acks {a1}+{a2} over {:?}",
        t0.elapsed()
    );
    assert_eq!(stats(&s).rate_limited, (r1 + r2) as u64);
    // The user on the same core, sending at the same time, is not limited by the abuser.
    for i in 0..10 {
        chat(&mut n, &mut r, rcpt, i + 1);
    }
    // Refusals are retryable: after a back-off the same client_msg_id goes through (had that
    // send been accepted, the retry returns its original ack).
    std::thread::sleep(Duration::from_millis(1100));
    let ack = phone
        .send_c2c(UserId(rcpt), 40, "retry after back-off")
        .unwrap();
    assert!(ack.seq > Seq(0));
    assert_eq!(stats(&s).closed_rate_limit, 0);
}

#[test]
fn sustained_message_flood_closes_the_connection_only() {
    let s = start_with(|c| {
        c.limits.msg_rate_per_user = 1;
        c.limits.msg_burst_per_user = 5;
        c.limits.msg_refusals_before_close = 10;
    });
    let on_core = uids_on_core(1, 140, 2);
    let (abuser, normal, rcpt) = (on_core[0], on_core[1], 1149);
    let mut a = login(s.addr, abuser);
    let mut n = login(s.addr, normal);
    let mut r = login(s.addr, rcpt);
    let mut flood = BytesMut::new();
    for i in 0..50u64 {
        flood.extend_from_slice(
            &Command::SendC2c {
                client_msg_id: i + 1,
                to: UserId(rcpt),
                body: Bytes::from_static(b"flood"),
            }
            .to_bytes(i as u32 + 1),
        );
    }
    a.send_raw(&flood).unwrap();
    let got = a.read_until_closed(Duration::from_secs(5)).unwrap();
    let refused = got
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::Error {
                    code: ErrorCode::Overloaded,
                    ..
                }
            )
        })
        .count();
    assert_eq!(refused, 11, "10 refusals, then the 11th closes: {got:?}");
    assert_eq!(stats(&s).closed_rate_limit, 1);
    // The user on the same core chats on.
    for i in 0..5 {
        chat(&mut n, &mut r, rcpt, 100 + i);
    }
}

#[test]
fn failed_logins_back_off_per_user_for_dirty_addresses_only() {
    let s = start_with(|c| {
        c.limits.login_fails_per_uid = 3;
        c.limits.login_fails_per_ip = 100;
        c.limits.login_backoff = Duration::from_millis(2000);
    });
    let (victim, attacker, home) = (150, "127.0.0.7", "127.0.0.8");
    let guess = |t: &str| try_login_from(attacker, s.addr, victim, t, DeviceType::Desktop);
    for i in 0..3 {
        assert_eq!(
            guess(&format!("v1.150.9.guess{i}")).err(),
            Some(ErrorCode::BadToken)
        );
    }
    // The user is in a back-off: the attacker's next guess is refused before logic checks it,
    // and so is the right token from the attacker's address.
    assert_eq!(guess("v1.150.9.guess3").err(), Some(ErrorCode::Overloaded));
    assert_eq!(guess(&token(victim)).err(), Some(ErrorCode::Overloaded));
    // The real user, from an address without failures, logs in and chats.
    let mut real = login_from(home, s.addr, victim);
    let mut friend = login(s.addr, 151);
    chat(&mut friend, &mut real, victim, 1);
    let st = stats(&s);
    assert_eq!((st.login_failures, st.login_backoff_refused), (3, 2));
    // The back-off is a window, not a lock-out: 2 s later the right token works from there too.
    let t0 = Instant::now();
    let _late = eventually(5, || match guess(&token(victim)) {
        Ok(c) => Some(c),
        Err(code) => {
            assert_eq!(code, ErrorCode::Overloaded);
            None
        }
    });
    assert!(t0.elapsed() > Duration::from_millis(1000));
    assert!(real.heartbeat().is_ok());
}

#[test]
fn failed_logins_back_off_per_address() {
    let s = start_with(|c| {
        c.limits.login_fails_per_ip = 3;
        c.limits.login_backoff = Duration::from_millis(5000);
    });
    let attacker = "127.0.0.9";
    // Three different users, one wrong guess each: the address is what backs off.
    for uid in 160..163 {
        let got = try_login_from(attacker, s.addr, uid, "nope", DeviceType::Phone);
        assert_eq!(got.err(), Some(ErrorCode::BadToken));
    }
    let got = try_login_from(attacker, s.addr, 163, &token(163), DeviceType::Phone);
    assert_eq!(got.err(), Some(ErrorCode::Overloaded));
    // The same user from another address is fine.
    let mut ok = login_from("127.0.0.10", s.addr, 163);
    assert!(ok.heartbeat().is_ok());
    assert_eq!(stats(&s).login_backoff_refused, 1);
}

#[test]
fn slowloris_before_login_is_cut_at_the_login_deadline() {
    let s = start_with(|c| c.login_timeout_secs = 1);
    let mut a = login(s.addr, 170);
    let mut b = login(s.addr, 171);
    // A valid login frame, one byte every 100 ms: it would take ~10 s to complete.
    let frame = Command::Login {
        uid: UserId(172),
        device_type: DeviceType::Phone,
        device_id: "slow".into(),
        last_seq: Seq(0),
        token: token(172),
    }
    .to_bytes(1);
    let mut slow = connect_from("127.0.0.11", s.addr);
    let t0 = Instant::now();
    let mut sent = 0;
    let got = loop {
        if sent < frame.len() && slow.send_raw(&frame[sent..sent + 1]).is_ok() {
            sent += 1;
        }
        match slow.recv(Duration::from_millis(100)) {
            Ok(Some(cmd)) => break Some(cmd),
            Ok(None) => {}
            Err(_) => break None,
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never cut");
    };
    assert!(
        matches!(
            got,
            Some(Command::Error {
                code: ErrorCode::LoginTimeout,
                ..
            })
        ),
        "{got:?}"
    );
    assert!(sent < frame.len() && t0.elapsed() < Duration::from_secs(3));
    chat(&mut a, &mut b, 171, 1);
}

#[test]
fn partial_frame_after_login_is_bounded_by_the_idle_timeout() {
    let s = start_with(|c| c.idle_timeout_secs = 2);
    let mut slow = login(s.addr, 180);
    let mut steady = login(s.addr, 181);
    let t0 = Instant::now();
    // A SendC2c header announcing 200 bytes, then its body one byte every 100 ms (20 s in all).
    let mut hdr = BytesMut::new();
    encode_header(&mut hdr, Cmd::SendC2c, 7, 200);
    slow.send_raw(&hdr).unwrap();
    let got = loop {
        let _ = slow.send_raw(&[0]);
        // The neighbour only heartbeats: complete frames keep it alive.
        assert!(steady.heartbeat().is_ok());
        match slow.recv(Duration::from_millis(100)) {
            Ok(Some(cmd)) => break Some(cmd),
            Ok(None) => {}
            Err(_) => break None,
        }
        assert!(t0.elapsed() < Duration::from_secs(6), "trickle never cut");
    };
    assert!(
        matches!(
            got,
            Some(Command::Error {
                code: ErrorCode::IdleTimeout,
                ..
            })
        ),
        "{got:?}"
    );
    // The heartbeating connection outlives the idle timeout.
    while t0.elapsed() < Duration::from_millis(3500) {
        assert!(steady.heartbeat().is_ok());
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut other = login(s.addr, 182);
    chat(&mut other, &mut steady, 181, 1);
}
