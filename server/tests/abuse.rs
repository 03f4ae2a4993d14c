//! Bad input from one connection closes that connection only (invariant 4).

mod common;

use std::io::Write;
use std::thread;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use im_shared::frame::{encode_header, Cmd};
use im_shared::{Command, ErrorCode, UserId};

/// Chat between two healthy users keeps working while `attack` runs on other connections.
fn others_keep_chatting(s: &TestServer, attack: impl FnOnce() + Send) {
    let mut a = login(s.addr, 900);
    let mut b = login(s.addr, 901);
    thread::scope(|sc| {
        sc.spawn(attack);
        for i in 0..50u64 {
            a.send_c2c(UserId(901), i + 1, format!("still here {i}"))
                .unwrap();
            let m = next_deliver(&mut b);
            assert_eq!(m.body, format!("still here {i}").as_bytes());
        }
    });
    // The survivors still work after the attack finished.
    assert!(a.heartbeat().is_ok() && b.heartbeat().is_ok());
}

fn expect_closed_with(c: &mut im_client::Client, code: ErrorCode) {
    let got = c.read_until_closed(Duration::from_secs(5)).unwrap();
    assert!(
        got.iter()
            .any(|f| matches!(f, Command::Error { code: c, .. } if *c == code)),
        "expected {code:?} then close, got {got:?}"
    );
}

#[test]
fn garbage_bytes_close_only_that_connection() {
    let s = start();
    others_keep_chatting(&s, || {
        for _ in 0..20 {
            let mut g = connect(s.addr);
            g.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            expect_closed_with(&mut g, ErrorCode::Malformed);
        }
        // Garbage after a successful login.
        let mut l = login(s.addr, 902);
        l.send_raw(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
        expect_closed_with(&mut l, ErrorCode::Malformed);
    });
}

#[test]
fn oversized_frame_is_refused_before_its_body() {
    let s = start_with(|c| c.max_body = 1024);
    others_keep_chatting(&s, || {
        let mut l = login(s.addr, 903);
        let mut hdr = BytesMut::new();
        encode_header(&mut hdr, Cmd::SendC2c, 1, 10 * 1024 * 1024);
        // Only the header: the server must not wait for 10 MiB.
        l.send_raw(&hdr).unwrap();
        expect_closed_with(&mut l, ErrorCode::FrameTooLarge);
        // Before login too.
        let mut g = connect(s.addr);
        g.send_raw(&hdr).unwrap();
        expect_closed_with(&mut g, ErrorCode::FrameTooLarge);
    });
}

#[test]
fn malformed_body_is_refused() {
    let s = start();
    others_keep_chatting(&s, || {
        let mut l = login(s.addr, 904);
        // A SendC2c whose body is 3 bytes: truncated fields.
        let mut f = BytesMut::new();
        encode_header(&mut f, Cmd::SendC2c, 9, 3);
        f.extend_from_slice(&[1, 2, 3]);
        l.send_raw(&f).unwrap();
        expect_closed_with(&mut l, ErrorCode::Malformed);
        // A login whose body is truncated.
        let mut g = connect(s.addr);
        let mut f = BytesMut::new();
        encode_header(&mut f, Cmd::Login, 1, 10);
        f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 1, 0]);
        g.send_raw(&f).unwrap();
        let got = g.read_until_closed(Duration::from_secs(5)).unwrap();
        assert!(
            matches!(
                got.as_slice(),
                [Command::LoginResult {
                    code: ErrorCode::Malformed,
                    ..
                }]
            ),
            "{got:?}"
        );
    });
}

#[test]
fn unknown_command_wrong_version_and_server_commands_are_refused() {
    let s = start();
    others_keep_chatting(&s, || {
        let mut l = login(s.addr, 905);
        l.send_raw(b"IM\x01\x55\0\0\0\x01\0\0\0\0").unwrap();
        expect_closed_with(&mut l, ErrorCode::UnknownCommand);
        let mut l = login(s.addr, 906);
        l.send_raw(b"IM\x02\x03\0\0\0\x01\0\0\0\0").unwrap();
        expect_closed_with(&mut l, ErrorCode::UnsupportedVersion);
        // A client may not send server commands (e.g. a forged Deliver).
        let mut l = login(s.addr, 907);
        let mut f = BytesMut::new();
        encode_header(&mut f, Cmd::Deliver, 1, 0);
        l.send_raw(&f).unwrap();
        expect_closed_with(&mut l, ErrorCode::UnknownCommand);
    });
}

#[test]
fn never_reading_client_is_disconnected() {
    // A small write queue and big messages: the queue overflows once the socket buffers fill.
    let s = start_with(|c| {
        c.max_write_queue = 64 * 1024;
        c.max_body = 60 * 1024;
    });
    let mut sink = login(s.addr, 908);
    let _ = sink.stream().set_nodelay(true);
    others_keep_chatting(&s, || {
        let mut flooder = login(s.addr, 909);
        let body = vec![7u8; 50 * 1024];
        // Up to 2 000 × 50 KiB = 100 MB: far beyond any socket buffer.
        for i in 0..2000u64 {
            if flooder.send_c2c(UserId(908), i + 1, body.clone()).is_err() {
                panic!("flooder itself must not be hurt");
            }
            if s.server.as_ref().unwrap().gate_stats().closed_slow > 0 {
                return;
            }
        }
        panic!("the non-reading client was never disconnected");
    });
    // When it reads again it finds what was queued before the cut, then `SlowConsumer`
    // (queued past the limit, within the 5 s the gate gives a closing connection to flush).
    let got = sink.read_until_closed(Duration::from_secs(10)).unwrap();
    assert!(
        matches!(
            got.last(),
            Some(Command::Error {
                code: ErrorCode::SlowConsumer,
                ..
            })
        ),
        "{} frames, the last {:?}",
        got.len(),
        got.last()
    );
    // Everything acked is still there for the slow user when it comes back.
    drop(sink);
    let mut back = login(s.addr, 908);
    let (msgs, _, max) = back.sync_page(im_shared::Seq(0), 5).unwrap();
    assert!(!msgs.is_empty() && max.0 > 0);
}

#[test]
fn half_sent_frames_do_not_disturb_others() {
    let s = start();
    others_keep_chatting(&s, || {
        let mut conns = Vec::new();
        for _ in 0..50 {
            let mut c = connect(s.addr);
            c.stream().write_all(b"IM\x01").unwrap();
            conns.push(c);
        }
        thread::sleep(Duration::from_millis(300));
    });
}

#[test]
fn connection_with_stuck_writer_is_forced_closed_after_protocol_error() {
    // A huge write queue so the slow-consumer limit does not fire: the writer blocks on a full
    // socket instead, then the client sends garbage. The server must still close the socket.
    let s = start_with(|c| {
        c.max_write_queue = 256 * 1024 * 1024;
        c.max_body = 60 * 1024;
    });
    let mut victim = login(s.addr, 910);
    let mut flooder = login(s.addr, 911);
    let body = vec![1u8; 50 * 1024];
    for i in 0..300u64 {
        flooder.send_c2c(UserId(910), i + 1, body.clone()).unwrap();
    }
    let stats = || s.server.as_ref().unwrap().gate_stats();
    assert_eq!(stats().connections, 2);
    victim.send_raw(&[0xba, 0xad]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while stats().sockets > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck connection never closed: {:?}",
            stats()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(flooder.heartbeat().is_ok());
}
