//! What a store entry costs on its way into fjall, against the alternatives for the hot
//! keyspaces (issue 13): the embedded store applies every commit-log record to fjall as a batch
//! of memtable inserts (a concurrent skiplist), and that insert is the largest user-space cost
//! of a c2c message (BENCHMARKS.md, "What loopback TCP alone allows for c2c").
//!
//! Run: `cargo bench -p im-benches --bench memtable`.
//!
//! - `memtable/fjall_batch/256`: one unsynced fjall batch of 256 timeline entries (16-byte key
//!   `uid ++ seq`, 300-byte value, keys spread over 2 000 users with growing seqs, sorted as the
//!   store's apply sorts them) into a keyspace whose memtable already holds 100 000 entries:
//!   exactly what `apply` does per record, minus the commit log.
//! - `memtable/per_user_append/256`: the same 256 entries appended to an in-memory index of our
//!   own, timelines by user (a hash map of users, each a vector in seq order: a timeline only
//!   ever grows at its end), emptied whenever it holds as many entries as a 64 MiB memtable.
//! - `memtable/cpu_batches_and_flush/65536` and `memtable/cpu_append_and_ingest/65536`: the whole
//!   way of 65 536 such entries into fjall's tables, in **CPU time of every thread of the
//!   process** (fjall flushes on threads of its own), not wall time: 256 batches as above and
//!   then the memtable's flush, against appends to the index of our own and then fjall's bulk
//!   ingestion of the same entries in key order (new tables written directly, no memtable: what
//!   moving the index into fjall at a checkpoint would cost). Both write table files to
//!   `$TMPDIR`; compactions that follow them are counted only while the bench runs (so an
//!   iteration also pays for compactions earlier ones started: compare rows of one full run).
//! - `memtable/cpu_append_and_ingest_chunks/65536`: the same, but each user's entries of the
//!   checkpoint reach fjall as one key (a chunk of the timeline: `seq ++ len ++ value` each).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use im_shared::fast::FastMap;

const USERS: u64 = 2_000;
const PRELOAD: u64 = 100_000;
const BATCH: usize = 256;
const RUN: usize = 65_536;
const VALUE_LEN: usize = 300;
/// Entries of [`VALUE_LEN`] bytes that fill a 64 MiB memtable (fjall's default size).
const MEMTABLE_ENTRIES: usize = (64 << 20) / (16 + VALUE_LEN);

/// Key `uid ++ seq`, big-endian, as the store's `timeline` keyspace.
fn key(uid: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&uid.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Spreads user numbers over the u64 space (stand-in for real user ids).
fn uid(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16
}

/// The next `n` entries of a stream that gives each of [`USERS`] users the next seq in turn,
/// starting at message `from`; sorted by key, as the store's apply is.
fn entries(from: u64, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v: Vec<(Vec<u8>, Vec<u8>)> = (from..from + n as u64)
        .map(|m| (key(uid(m % USERS), m / USERS + 1), vec![0x5a; VALUE_LEN]))
        .collect();
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    v
}

/// CPU time of every thread of this process so far (user + system).
fn cpu_time() -> Duration {
    // SAFETY: `ru` is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// A checkpoint's worth of entries from message `from` on ([`RUN`]), as [`BATCH`]-entry batches.
fn batches(from: u64) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    (0..RUN / BATCH)
        .map(|i| entries(from + (i * BATCH) as u64, BATCH))
        .collect()
}

/// One unsynced fjall batch of `e`, as the store's apply writes a record.
fn insert_batch(db: &Database, ks: &Keyspace, e: Vec<(Vec<u8>, Vec<u8>)>) {
    let mut wb = db.batch().durability(None);
    for (k, v) in e {
        wb.insert(ks, k, v);
    }
    wb.commit().expect("commit");
}

/// Appends `e` to the index of our own: timelines by user, each in seq order.
fn append_by_user(recent: &mut FastMap<u64, Vec<(u64, Vec<u8>)>>, e: Vec<(Vec<u8>, Vec<u8>)>) {
    for (k, v) in e {
        let uid = u64::from_be_bytes(k[..8].try_into().expect("uid"));
        let seq = u64::from_be_bytes(k[8..].try_into().expect("seq"));
        recent.entry(uid).or_default().push((seq, v));
    }
}

fn open(dir: &std::path::Path) -> (Database, Keyspace) {
    let db = Database::builder(dir)
        .manual_journal_persist(true)
        .open()
        .expect("open fjall");
    let ks = db
        .keyspace("timeline", KeyspaceCreateOptions::default)
        .expect("keyspace");
    (db, ks)
}

fn bench_memtable(c: &mut Criterion) {
    let mut g = c.benchmark_group("memtable");
    g.throughput(Throughput::Elements(BATCH as u64));

    let dir = tempfile::tempdir().expect("tempdir");
    let (db, ks) = open(dir.path());
    let mut next = 0u64;
    while next < PRELOAD {
        let mut b = db.batch().durability(None);
        for (k, v) in entries(next, 1024) {
            b.insert(&ks, k, v);
        }
        b.commit().expect("preload");
        next += 1024;
    }
    g.bench_function(format!("fjall_batch/{BATCH}"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let e = entries(next, BATCH);
                next += BATCH as u64;
                let t = Instant::now();
                insert_batch(&db, &ks, e);
                spent += t.elapsed();
            }
            spent
        })
    });
    drop((ks, db));

    // Timelines by user, each in seq order: an entry is appended to its user's vector. It is
    // emptied (untimed) once it holds as many entries as a 64 MiB memtable does, as a checkpoint
    // would empty it.
    let mut recent: FastMap<u64, Vec<(u64, Vec<u8>)>> = FastMap::default();
    let mut held = 0usize;
    let mut next = 0u64;
    g.bench_function(format!("per_user_append/{BATCH}"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                if held >= MEMTABLE_ENTRIES {
                    recent.clear();
                    held = 0;
                }
                let e = entries(next, BATCH);
                next += BATCH as u64;
                let t = Instant::now();
                append_by_user(&mut recent, e);
                spent += t.elapsed();
                held += BATCH;
            }
            black_box(recent.len());
            spent
        })
    });
    drop(recent);

    // The whole way into fjall's tables, in CPU time of every thread of the process (fjall
    // flushes and compacts on threads of its own): a checkpoint's worth of entries as memtable
    // inserts and then the memtable's flush, against the same entries appended to the index of
    // our own and then ingested.
    g.throughput(Throughput::Elements(RUN as u64));
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, ks) = open(dir.path());
    let mut next = 0u64;
    g.bench_function(format!("cpu_batches_and_flush/{RUN}"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let runs = batches(next);
                next += RUN as u64;
                let t = cpu_time();
                for e in runs {
                    insert_batch(&db, &ks, e);
                }
                ks.rotate_memtable_and_wait().expect("flush");
                spent += cpu_time() - t;
            }
            spent
        })
    });
    drop((ks, db));

    let dir = tempfile::tempdir().expect("tempdir");
    let (db, ks) = open(dir.path());
    let mut next = 0u64;
    g.bench_function(format!("cpu_append_and_ingest/{RUN}"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let runs = batches(next);
                next += RUN as u64;
                let t = cpu_time();
                let mut recent: FastMap<u64, Vec<(u64, Vec<u8>)>> = FastMap::default();
                for e in runs {
                    append_by_user(&mut recent, e);
                }
                let mut users: Vec<_> = recent.into_iter().collect();
                users.sort_unstable_by_key(|(uid, _)| *uid);
                let mut ing = ks.start_ingestion().expect("ingestion");
                for (uid, timeline) in users {
                    for (seq, v) in timeline {
                        ing.write(key(uid, seq), v).expect("ingest");
                    }
                }
                ing.finish().expect("finish");
                spent += cpu_time() - t;
            }
            spent
        })
    });
    drop((ks, db));

    let dir = tempfile::tempdir().expect("tempdir");
    let (db, ks) = open(dir.path());
    let mut next = 0u64;
    g.bench_function(format!("cpu_append_and_ingest_chunks/{RUN}"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for i in 0..iters {
                let runs = batches(next);
                next += RUN as u64;
                let t = cpu_time();
                let mut recent: FastMap<u64, Vec<u8>> = FastMap::default();
                for e in runs {
                    for (k, v) in e {
                        let uid = u64::from_be_bytes(k[..8].try_into().expect("uid"));
                        let chunk = recent.entry(uid).or_default();
                        chunk.extend_from_slice(&k[8..]);
                        chunk.extend_from_slice(&(v.len() as u32).to_be_bytes());
                        chunk.extend_from_slice(&v);
                    }
                }
                let mut users: Vec<_> = recent.into_iter().collect();
                users.sort_unstable_by_key(|(uid, _)| *uid);
                let mut ing = ks.start_ingestion().expect("ingestion");
                for (uid, chunk) in users {
                    // One key per user and checkpoint: `uid ++ checkpoint number`.
                    ing.write(key(uid, i), chunk).expect("ingest");
                }
                ing.finish().expect("finish");
                spent += cpu_time() - t;
            }
            spent
        })
    });
    drop((ks, db));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_memtable
}
criterion_main!(benches);
