//! Hot paths of logic below the codec: durable commits, timeline range reads and the per-message
//! point reads of the embedded store ([`FjallStore`]), message id allocation and user placement,
//! and route lookups in the shared in-process directory ([`MemoryDirectory`]).
//!
//! Run: `cargo bench -p im-benches --bench store` (add `-- --quick` for a fast pass).
//!
//! The async `Store`/`Directory` methods of these backends complete inline; each bench drives a
//! whole timed loop inside one `block_on` of a current-thread tokio runtime (`iter_custom`), so
//! the runtime's per-call overhead is not part of the figures. Store directories are temporary
//! directories under `$TMPDIR` (default `/tmp`): put it on the disk you want to measure, since
//! `store/commit` is dominated by the fsync of the journal.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use im_logic::directory::{Directory, MemoryDirectory, RouteEntry};
use im_logic::store::{DedupEntry, FjallStore, Op, OutboxEntry, Store, WriteBatch};
use im_shared::msgid::MsgIdGen;
use im_shared::proto::{Message, CONV_C2C};
use im_shared::shard::{core_of, vshard_of};
use im_shared::{MsgId, Seq, UserId};
use tokio::runtime::Runtime;

/// Body of every stored message: a typical short chat line.
const BODY_LEN: usize = 64;
/// Messages per durable commit (one logic round's group commit).
const COMMIT_SIZES: [usize; 3] = [1, 16, 256];
/// The user whose timeline the range reads scan, and how many entries it holds.
const TIMELINE_UID: UserId = UserId(7);
const TIMELINE_LEN: u64 = 10_000;
/// Messages of the read store in all (the timeline user's plus other users').
const READ_STORE_MSGS: u64 = 100_000;
/// Messages per user for the users other than [`TIMELINE_UID`] in the read store.
const OTHER_USER_MSGS: u64 = 100;
/// Users of the directory bench and uids of the placement benches.
const DIRECTORY_USERS: u64 = 100_000;
const UIDS: usize = 1024;
/// A fixed wall clock (2026-01-01) for message ids and server times.
const NOW_MS: u64 = 1_767_225_600_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
}

/// Spreads sequential counters over the u64 space (stand-in for real user ids).
fn spread(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16
}

/// The batch ops logic writes for one accepted c2c message (see `worker.rs`, `on_send_c2c`): the
/// sender's timeline entry, its dedup entry and the fan-out outbox record.
fn push_c2c(batch: &mut WriteBatch, from: UserId, to: UserId, seq: u64, msg_id: MsgId, cmid: u64) {
    let msg = Message {
        seq: Seq(seq),
        prev_seq: Seq(seq - 1),
        msg_id,
        conv: CONV_C2C,
        from,
        to,
        client_msg_id: cmid,
        server_time_ms: NOW_MS,
        body: Bytes::from_static(&[b'x'; BODY_LEN]),
    };
    batch.push(Op::Append {
        uid: from,
        msg: msg.clone(),
    });
    batch.push(Op::Dedup {
        uid: from,
        client_msg_id: cmid,
        entry: DedupEntry {
            msg_id,
            seq: Seq(seq),
            prev_seq: Seq(seq - 1),
            server_time_ms: NOW_MS,
        },
    });
    batch.push(Op::OutboxPut(OutboxEntry {
        shard: vshard_of(from),
        msg_id,
        recipients: vec![to],
        msg,
    }));
}

/// One durable commit (journal fsync) of N c2c messages: the group-commit point of a logic round.
/// Every iteration writes new messages (1024 senders, each with increasing seqs); only `commit`
/// is timed, not building the batch.
fn commit(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("store/commit");
    for n in COMMIT_SIZES {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallStore::open(dir.path()).expect("open store");
        let mut ids = MsgIdGen::new(1);
        let mut k = 0u64;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n}_msgs"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let mut batch = WriteBatch::default();
                        for _ in 0..n {
                            let from = UserId(1 + k % 1024);
                            let to = UserId(100_000 + k % 4096);
                            let seq = 1 + k / 1024;
                            push_c2c(&mut batch, from, to, seq, ids.next(NOW_MS), k);
                            k += 1;
                        }
                        let t = Instant::now();
                        store.commit(batch).await.expect("commit");
                        timed += t.elapsed();
                    }
                    timed
                })
            })
        });
    }
    g.finish();
}

/// A store holding [`READ_STORE_MSGS`] messages written the way logic writes them: a timeline of
/// [`TIMELINE_LEN`] messages for [`TIMELINE_UID`], the rest spread over other users. Stored
/// `client_msg_id`s are even, so odd ones are misses that fall inside the stored key ranges.
/// Returns the store, its directory guard, and the msg_id of every stored message of user 8.
fn read_store(rt: &Runtime) -> (FjallStore, tempfile::TempDir, Vec<MsgId>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path()).expect("open store");
    let mut ids = MsgIdGen::new(1);
    let mut user8 = Vec::new();
    let mut msgs: Vec<(UserId, u64)> = (1..=TIMELINE_LEN).map(|s| (TIMELINE_UID, s)).collect();
    let others = (READ_STORE_MSGS - TIMELINE_LEN) / OTHER_USER_MSGS;
    for u in 0..others {
        let uid = UserId(8 + u);
        msgs.extend((1..=OTHER_USER_MSGS).map(|s| (uid, s)));
    }
    rt.block_on(async {
        for chunk in msgs.chunks(1000) {
            let mut batch = WriteBatch::default();
            for &(uid, seq) in chunk {
                let id = ids.next(NOW_MS);
                if uid == UserId(8) {
                    user8.push(id);
                }
                push_c2c(&mut batch, uid, UserId(1_000_000), seq, id, seq * 2);
            }
            store.commit(batch).await.expect("commit");
        }
    });
    (store, dir, user8)
}

/// Pages of the sync path: up to `limit` entries after a seq of a 10 000-entry timeline. The start
/// seq moves by a prime stride so consecutive reads hit different parts of the timeline.
fn timeline_range(c: &mut Criterion) {
    let rt = runtime();
    let (store, _dir, _) = read_store(&rt);
    let mut g = c.benchmark_group("store/timeline_range");
    for limit in [50usize, 200] {
        let span = TIMELINE_LEN - limit as u64;
        g.throughput(Throughput::Elements(limit as u64));
        g.bench_function(format!("page_{limit}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for i in 0..iters {
                        let after = Seq((i * 7919) % span);
                        let page = store.timeline(TIMELINE_UID, after, limit).await.unwrap();
                        assert_eq!(page.len(), limit);
                        black_box(page);
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// The per-message reads of the send path on a store of 100 000 messages (100 000 entries each
/// in the timeline, msg-id index and dedup keyspaces): the dedup lookup of every new
/// `client_msg_id` (a miss unless it is a retry) and the msg-id index lookup, misses and hits.
fn point_reads(c: &mut Criterion) {
    let rt = runtime();
    let (store, _dir, user8) = read_store(&rt);
    let users = (READ_STORE_MSGS - TIMELINE_LEN) / OTHER_USER_MSGS;
    let uid = |i: u64| UserId(8 + (i * 31) % users);
    let mut g = c.benchmark_group("store/point_reads");
    g.bench_function("dedup_miss", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let cmid = 2 * (i % OTHER_USER_MSGS) + 1;
                    let e = store.dedup(uid(i), cmid).await.unwrap();
                    assert!(black_box(e).is_none());
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("dedup_hit", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let cmid = 2 * (1 + i % OTHER_USER_MSGS);
                    let e = store.dedup(uid(i), cmid).await.unwrap();
                    assert!(black_box(e).is_some());
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("seq_of_miss", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    // Ids of user 8's messages looked up under other users (never stored there).
                    let id = user8[i as usize % user8.len()];
                    let s = store.seq_of(UserId(9 + i % (users - 1)), id).await;
                    assert!(black_box(s.unwrap()).is_none());
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("seq_of_hit", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let id = user8[(i * 31) as usize % user8.len()];
                    let s = store.seq_of(UserId(8), id).await.unwrap();
                    assert!(black_box(s).is_some());
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

/// Message id allocation (per accepted message) and the user placement hashes (per routed frame).
fn ids(c: &mut Criterion) {
    let mut g = c.benchmark_group("ids");
    let mut idgen = MsgIdGen::new(1);
    // A fixed clock: the cost of the generator, not of reading the clock.
    g.bench_function("msgid_next", |b| b.iter(|| idgen.next(black_box(NOW_MS))));

    let uids: Vec<UserId> = (0..UIDS as u64).map(|i| UserId(spread(i))).collect();
    g.throughput(Throughput::Elements(UIDS as u64));
    g.bench_function(format!("vshard_of/{UIDS}_uids"), |b| {
        b.iter(|| {
            black_box(&uids)
                .iter()
                .map(|&u| u64::from(vshard_of(u).0))
                .sum::<u64>()
        })
    });
    g.bench_function(format!("core_of/{UIDS}_uids"), |b| {
        b.iter(|| {
            let cores = black_box(4);
            black_box(&uids)
                .iter()
                .map(|&u| core_of(u, cores))
                .sum::<usize>()
        })
    });
    g.finish();
}

fn route(uid: UserId, epoch: u64) -> RouteEntry {
    RouteEntry {
        device_type: 1,
        device_id: format!("dev-{}", uid.0 % 1000),
        gate: 1,
        core: (uid.0 % 2) as u16,
        conn: uid.0,
        epoch,
    }
}

/// The shared in-process directory with 100 000 users online (one route each): a lookup and a
/// replacing write of a route. The logic hot path keeps routes in the worker's own map; this is
/// what login, logout and cross-worker lookups pay.
fn routes(c: &mut Criterion) {
    let rt = runtime();
    let dir = MemoryDirectory::new();
    let uids: Vec<UserId> = (1..=DIRECTORY_USERS).map(|i| UserId(spread(i))).collect();
    rt.block_on(async {
        for &u in &uids {
            dir.set_route(u, route(u, 1)).await.unwrap();
        }
    });
    let mut g = c.benchmark_group("routes/memory_directory");
    g.bench_function("routes", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let u = uids[(i * 7919) as usize % uids.len()];
                    let r = dir.routes(u).await.unwrap();
                    assert_eq!(black_box(r).len(), 1);
                }
                t.elapsed()
            })
        })
    });
    let routes: Vec<RouteEntry> = uids.iter().map(|&u| route(u, 2)).collect();
    g.bench_function("set_route", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let j = (i * 7919) as usize % uids.len();
                    // The caller hands over an owned entry; the clone is part of the cost.
                    dir.set_route(uids[j], routes[j].clone()).await.unwrap();
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the fsync benches take milliseconds per iteration on a shared disk.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = commit, timeline_range, point_reads, ids, routes
}
criterion_main!(benches);
