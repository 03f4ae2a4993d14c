//! Many connections pipelining frames of random sizes: the gate must keep every stream framed
//! (a regression test for reads that overwrote buffered partial frames).

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use common::*;
use im_shared::{Command, ErrorCode, UserId};

#[test]
fn pipelined_random_sized_frames_stay_framed() {
    let s = start();
    let senders = 16u64;
    let per_sender = 400u64;
    std::thread::scope(|sc| {
        for k in 0..senders {
            let addr = s.addr;
            sc.spawn(move || {
                let uid = 5000 + k;
                let mut c = login(addr, uid);
                // Pipeline everything in a few big writes with odd split points.
                let mut wire = Vec::new();
                let mut x = 0x2545F4914F6CDD1Du64 ^ uid;
                for i in 1..=per_sender {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = (x % 3000) as usize;
                    let body = vec![b'x'; len];
                    let to = UserId(6000 + (x % 8));
                    wire.extend_from_slice(
                        &Command::SendC2c {
                            client_msg_id: i,
                            to,
                            body: body.into(),
                        }
                        .to_bytes(i as u32),
                    );
                }
                for chunk in wire.chunks(1777) {
                    c.stream().write_all(chunk).unwrap();
                }
                let mut acked = HashSet::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while (acked.len() as u64) < per_sender {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "only {} acks",
                        acked.len()
                    );
                    match c.recv(Duration::from_millis(500)).unwrap() {
                        Some(Command::SendAck {
                            code,
                            client_msg_id,
                            ..
                        }) => {
                            assert_eq!(code, ErrorCode::Ok);
                            acked.insert(client_msg_id);
                        }
                        Some(Command::Error { code, message }) => {
                            panic!("sender {uid}: {code:?} {message}")
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    assert_eq!(
        s.server
            .as_ref()
            .unwrap()
            .gate_stats()
            .closed_protocol_error,
        0
    );
}
