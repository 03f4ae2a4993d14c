//! Codec hot paths: protocol v1 frame encode/decode (what every client message costs the gate and
//! logic), decoding a read buffer full of frames, and the gate <-> logic link batch codec.
//!
//! Run: `cargo bench -p im-benches --bench codec` (add `-- --quick` for a fast pass).

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use im_shared::link::{decode_up, encode_up, Up};
use im_shared::proto::{Message, CONV_C2C};
use im_shared::{Cmd, Command, ConnId, FrameCodec, MsgId, Seq, UserId};

/// Message body sizes: a typical short chat line and a larger rich-text / JSON payload.
const SIZES: [(&str, usize); 2] = [("64B", 64), ("1KiB", 1024)];
/// Frames per buffer / link batch.
const BATCH: usize = 1000;

fn send_c2c(body_len: usize) -> Command {
    Command::SendC2c {
        client_msg_id: 0x0123_4567_89ab_cdef,
        to: UserId(1_000_042),
        body: Bytes::from(vec![b'x'; body_len]),
    }
}

fn deliver(body_len: usize) -> Command {
    Command::Deliver(Message {
        seq: Seq(10_001),
        prev_seq: Seq(10_000),
        msg_id: MsgId(0x0001_2345_6789_abcd),
        conv: CONV_C2C,
        from: UserId(1_000_041),
        to: UserId(1_000_042),
        client_msg_id: 0x0123_4567_89ab_cdef,
        server_time_ms: 1_767_225_600_000,
        body: Bytes::from(vec![b'x'; body_len]),
    })
}

/// Encoding a whole frame (header + body) into a reused buffer.
fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (name, size) in SIZES {
        for (kind, cmd) in [("send_c2c", send_c2c(size)), ("deliver", deliver(size))] {
            let len = cmd.to_bytes(1).len();
            g.throughput(Throughput::Bytes(len as u64));
            let mut out = BytesMut::with_capacity(len);
            g.bench_function(format!("{kind}/{name}"), |b| {
                b.iter(|| {
                    out.clear();
                    black_box(&cmd).encode(black_box(7), &mut out);
                    black_box(out.len())
                })
            });
        }
    }
    g.finish();
}

/// Decoding one SendC2c: the frame layer (what the gate does) and the frame layer plus the typed
/// body (what logic does).
fn decode(c: &mut Criterion) {
    let codec = FrameCodec::default();
    let mut g = c.benchmark_group("decode/send_c2c");
    for (name, size) in SIZES {
        let wire = send_c2c(size).to_bytes(7);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("frame/{name}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| codec.decode(buf).unwrap().unwrap(),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("frame+body/{name}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| {
                    let f = codec.decode(buf).unwrap().unwrap();
                    Command::decode(&f).unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// One read buffer holding 1000 back-to-back 64 B SendC2c frames, split and decoded.
fn decode_stream(c: &mut Criterion) {
    let codec = FrameCodec::default();
    let mut wire = BytesMut::new();
    for i in 0..BATCH {
        send_c2c(64).encode(i as u32 + 1, &mut wire);
    }
    let wire = wire.freeze();
    let mut g = c.benchmark_group(format!("decode_stream/{BATCH}x_send_c2c_64B"));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("frame", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&wire[..]),
            |buf| {
                let mut n = 0usize;
                while let Some(f) = codec.decode(buf).unwrap() {
                    n += f.body.len();
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("frame+body", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&wire[..]),
            |buf| {
                let mut n = 0usize;
                while let Some(f) = codec.decode(buf).unwrap() {
                    if let Command::SendC2c { body, .. } = Command::decode(&f).unwrap() {
                        n += body.len();
                    }
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Gate -> logic link: a batch of 1000 forwarded client frames (64 B SendC2c bodies).
fn link(c: &mut Criterion) {
    let body = send_c2c(64).to_frame(1).body;
    let batch: Vec<Up> = (0..BATCH)
        .map(|i| Up::Frame {
            conn: ConnId::new(1, (i % 4) as u16, i as u32),
            uid: UserId(1_000_000 + i as u64),
            cmd: Cmd::SendC2c,
            req_id: i as u32 + 1,
            body: body.clone(),
        })
        .collect();
    let mut wire = BytesMut::new();
    batch.iter().for_each(|m| encode_up(m, &mut wire));
    let wire = wire.freeze();

    let mut g = c.benchmark_group(format!("link/{BATCH}x_up_frame_64B"));
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut out = BytesMut::with_capacity(wire.len());
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            for m in black_box(&batch) {
                encode_up(m, &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("decode", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&wire[..]),
            |buf| {
                let mut n = 0usize;
                while let Some(m) = decode_up(buf).unwrap() {
                    if let Up::Frame { body, .. } = m {
                        n += body.len();
                    }
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, encode, decode, decode_stream, link);
criterion_main!(benches);
