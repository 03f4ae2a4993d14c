//! Invariant 5: overload sheds new work with a retryable error and never loses accepted work.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use im_client::Timeline;
use im_shared::{Command, DeviceType, ErrorCode, Seq, UserId};

/// Logs in as a phone does while the server sheds load: a retryable refusal (`Overloaded`, the
/// queue counts logins too) is retried on a fresh connection after a short pause, within a
/// deadline.
fn login_retrying(addr: std::net::SocketAddr, uid: u64) -> im_client::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = connect(addr);
        let device = format!("phone-{uid}");
        match c.login(UserId(uid), &token(uid), DeviceType::Phone, &device, Seq(0)) {
            Ok(_) => return c,
            Err(e)
                if e.code().is_some_and(|code| code.is_retryable())
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("login of {uid}: {e}"),
        }
    }
}

#[test]
fn overload_is_refused_retryably_and_accepted_work_is_kept() {
    // A logic queue of 4 frames per worker: pipelined sends overflow it at once.
    let s = start_with(|c| c.max_queued = 4);
    let recipient = 7001u64;
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut refused_total = 0;
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..4u64)
            .map(|k| {
                let addr = s.addr;
                sc.spawn(move || {
                    let uid = 7100 + k;
                    let mut c = login_retrying(addr, uid);
                    let mut todo: Vec<u64> = (1..=300).collect();
                    let mut acked = Vec::new();
                    let mut refused = 0;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !todo.is_empty() {
                        assert!(
                            Instant::now() < deadline,
                            "could not get everything accepted"
                        );
                        // Pipeline the whole remainder, then read one answer per request.
                        let mut wire = Vec::new();
                        let mut by_req = HashMap::new();
                        for (i, &n) in todo.iter().enumerate() {
                            let req = i as u32 + 1;
                            by_req.insert(req, n);
                            wire.extend_from_slice(
                                &Command::SendC2c {
                                    client_msg_id: n,
                                    to: UserId(recipient),
                                    body: format!("{uid}:{n}").into(),
                                }
                                .to_bytes(req),
                            );
                        }
                        c.stream().write_all(&wire).unwrap();
                        let mut retry = Vec::new();
                        let mut answered = 0;
                        while answered < by_req.len() {
                            match c.recv(Duration::from_secs(10)).unwrap() {
                                Some(Command::SendAck {
                                    code,
                                    client_msg_id,
                                    ..
                                }) => {
                                    assert_eq!(code, ErrorCode::Ok);
                                    acked.push(format!("{uid}:{client_msg_id}"));
                                    answered += 1;
                                }
                                Some(Command::Error { code, .. }) => {
                                    assert_eq!(code, ErrorCode::Overloaded);
                                    assert!(code.is_retryable());
                                    refused += 1;
                                    answered += 1;
                                }
                                Some(other) => panic!("unexpected {other:?}"),
                                None => panic!("request unanswered"),
                            }
                        }
                        // Retry whatever was not acked, with the same client_msg_id.
                        let got: BTreeSet<_> = acked.iter().cloned().collect();
                        for &n in &todo {
                            if !got.contains(&format!("{uid}:{n}")) {
                                retry.push(n);
                            }
                        }
                        todo = retry;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (acked, refused)
                })
            })
            .collect();
        for h in handles {
            let (a, r) = h.join().unwrap();
            acked.extend(a);
            refused_total += r;
        }
    });
    assert!(refused_total > 0, "the queue limit never triggered");
    assert!(s.server.as_ref().unwrap().gate_stats().overloaded > 0);
    // Every accepted message is in the recipient's timeline exactly once, nothing refused is.
    let mut b = login_retrying(s.addr, recipient);
    let mut tl = Timeline::new(Seq(0));
    tl.sync(&mut b).unwrap();
    let got: Vec<String> = tl
        .messages
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), got_set.len(), "duplicates in the timeline");
    assert_eq!(got_set, acked);
    assert_eq!(acked.len(), 4 * 300);
}

/// Issue 14: a client that pipelines far more requests than the gate lets it have in flight, and
/// reads all the while, is slowed by TCP (the gate stops reading its socket), not cut: every
/// request is answered, nothing closes as a slow consumer, and everything acked is stored once.
#[test]
fn a_pipelining_client_that_reads_is_slowed_not_cut() {
    const N: u64 = 20_000;
    let s = start(); // default max_write_queue (256 KiB) and max_inflight (64)
    let mut c = login(s.addr, 7301);
    let mut wire = Vec::new();
    for n in 1..=N {
        let cmd = Command::SendC2c {
            to: UserId(7302),
            client_msg_id: n,
            body: format!("pipelined {n}").into(),
        };
        wire.extend_from_slice(&cmd.to_bytes(n as u32));
    }
    let mut out = c.stream().try_clone().unwrap();
    let writer = std::thread::spawn(move || out.write_all(&wire));
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (acked.len() as u64) < N {
        assert!(Instant::now() < deadline, "{} of {N} acked", acked.len());
        match c.recv(Duration::from_secs(1)).unwrap() {
            Some(Command::SendAck {
                code: ErrorCode::Ok,
                client_msg_id,
                ..
            }) => assert!(acked.insert(client_msg_id), "{client_msg_id} acked twice"),
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    writer.join().unwrap().unwrap();
    let stats = s.server.as_ref().unwrap().gate_stats();
    assert_eq!(stats.closed_slow, 0);
    assert!(stats.reads_paused > 0, "the reader never paused: {stats:?}");
    // The recipient finds every message once, in order.
    let mut r = login(s.addr, 7302);
    let mut t = Timeline::new(Seq(0));
    t.sync(&mut r).unwrap();
    let bodies: Vec<_> = t.messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies.len() as u64, N);
    for (i, b) in bodies.iter().enumerate() {
        assert_eq!(b, format!("pipelined {}", i + 1).as_bytes());
    }
}

/// A login while logic's queue is full is refused with a retryable `Overloaded` (carrying the
/// login's req_id) and the connection is closed (PROTOCOL.md §7).
#[test]
fn a_login_while_the_queue_is_full_is_refused_retryably_and_closed() {
    // A queue of zero admits nothing.
    let s = start_with(|c| c.max_queued = 0);
    let mut c = connect(s.addr);
    let err = c
        .login(UserId(7300), &token(7300), DeviceType::Phone, "p", Seq(0))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Overloaded));
    assert!(ErrorCode::Overloaded.is_retryable());
    assert!(c.read_until_closed(Duration::from_secs(5)).is_ok());
}
