//! [`ScyllaStore`] against a real ScyllaDB cluster: the shared [`conformance`] suite of the
//! `Store` trait, then the checks specific to this backend (timeline buckets, split commits,
//! a reconnect, the dedup TTL).
//!
//! Runs only when `SCYLLA_NODES` names the cluster (comma-separated `host:port`, e.g.
//! `SCYLLA_NODES=127.0.0.1:9042 cargo test -p im-store --test scylla_conformance -- --nocapture`);
//! otherwise it prints "skipped: SCYLLA_NODES not set" and passes. Each run creates a fresh
//! keyspace `im_test_<random>` with replication factor 1 and drops it at the end, also when a
//! check fails.
#![cfg(feature = "scylla")]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use bytes::Bytes;
use im_shared::proto::{Message, CONV_C2C};
use im_shared::{MsgId, Seq, ShardId, UserId};
use im_store::{DedupEntry, Op, OutboxEntry, ScyllaStore, Store, WriteBatch};
use im_testkit::store_conformance as conformance;
use scylla::client::session_builder::SessionBuilder;

fn nodes_from_env() -> Option<Vec<String>> {
    let raw = std::env::var("SCYLLA_NODES").ok()?;
    let nodes: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn msg(to: u64, seq: u64, msg_id: u64, body: &[u8]) -> Message {
    Message {
        seq: Seq(seq),
        prev_seq: Seq(0),
        msg_id: MsgId(msg_id),
        conv: CONV_C2C,
        from: UserId(1),
        to: UserId(to),
        client_msg_id: msg_id,
        server_time_ms: 1_700_000_000_000,
        body: Bytes::copy_from_slice(body),
    }
}

async fn commit(store: &ScyllaStore, ops: Vec<Op>) {
    store
        .commit(WriteBatch { ops, writer: None })
        .await
        .expect("commit failed");
}

fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq.0).collect()
}

/// Uids above every conformance run's (runs use base + 1 .. base + 2^20, bases < 2^28).
const OWN: u64 = 1 << 40;

/// Timeline entries on both sides of bucket boundaries (bucket = seq / 100 000), empty buckets in
/// between, paging across partitions, and last_seq across buckets.
async fn buckets(store: &ScyllaStore) {
    let uid = UserId(OWN + 1);
    let s: Vec<u64> = vec![
        1,
        99_999,
        100_000,
        100_001,
        199_999,
        700_000,
        700_001,
        10_000_000_000,
    ];
    let ops = s
        .iter()
        .rev()
        .map(|&seq| Op::Append {
            uid,
            msg: msg(uid.0, seq, 5_000 + seq, b"b"),
        })
        .collect();
    commit(store, ops).await;
    let all = store.timeline(uid, Seq(0), 100).await.expect("timeline");
    assert_eq!(seqs(&all), s);
    for limit in 1..=s.len() + 1 {
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .timeline(uid, Seq(after), limit)
                .await
                .expect("timeline");
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            after = last.seq.0;
            got.extend(seqs(&page));
        }
        assert_eq!(got, s, "paging with limit {limit}");
    }
    for (after, want) in [
        (99_998u64, &s[1..]),
        (99_999, &s[2..]),
        (100_000, &s[3..]),
        (200_000, &s[5..]),
        (699_999, &s[5..]),
        (700_001, &s[7..]),
        (10_000_000_000, &s[8..]),
    ] {
        let got = store
            .timeline(uid, Seq(after), 100)
            .await
            .expect("timeline");
        assert_eq!(seqs(&got), want.to_vec(), "after {after}");
    }
    assert_eq!(
        store.last_seq(uid).await.expect("last_seq"),
        Seq(10_000_000_000)
    );
    assert_eq!(
        store
            .seq_of(uid, MsgId(5_000 + 100_000))
            .await
            .expect("seq_of"),
        Some(Seq(100_000))
    );
}

/// A bucket row whose partition has no entry (what a commit that stopped between chunks can
/// leave) is skipped by `last_seq` and `timeline`.
async fn empty_bucket(store: &ScyllaStore, raw: &scylla::client::session::Session) {
    let uid = UserId(OWN + 2);
    commit(
        store,
        vec![Op::Append {
            uid,
            msg: msg(uid.0, 123_456, 1, b"x"),
        }],
    )
    .await;
    raw.query_unpaged(
        format!(
            "INSERT INTO {}.timeline_bucket (uid, bucket) VALUES (?, ?)",
            store.keyspace()
        ),
        (uid.0 as i64, 99i64),
    )
    .await
    .expect("raw insert");
    assert_eq!(store.last_seq(uid).await.expect("last_seq"), Seq(123_456));
    assert_eq!(
        seqs(&store.timeline(uid, Seq(0), 10).await.expect("timeline")),
        vec![123_456]
    );
}

/// A commit far above the batch bound is split; with a bound of 1 byte every statement is its
/// own logged batch. The result is the same as one batch.
async fn split_commits(store: &ScyllaStore) {
    let uid = UserId(OWN + 3);
    let big: Vec<Op> = (1..=40u64)
        .flat_map(|i| {
            let m = msg(uid.0, i, 9_000 + i, &vec![i as u8; 60 * 1024]);
            [
                Op::Append {
                    uid,
                    msg: m.clone(),
                },
                Op::OutboxPut(OutboxEntry {
                    shard: ShardId(1000),
                    msg_id: MsgId(9_000 + i),
                    recipients: vec![UserId(OWN + 4)],
                    msg: m,
                }),
            ]
        })
        .collect();
    // ~4.8 MB: several logged batches under the default bound.
    commit(store, big).await;
    let got = store.timeline(uid, Seq(0), 100).await.expect("timeline");
    assert_eq!(seqs(&got), (1..=40).collect::<Vec<_>>());
    assert!(got.iter().all(|m| m.body.len() == 60 * 1024));
    let out = store.outbox(ShardId(1000)).await.expect("outbox");
    assert_eq!(out.len(), 40);
    assert!(out.windows(2).all(|w| w[0].msg_id < w[1].msg_id));
    commit(
        store,
        (1..=40u64)
            .map(|i| Op::OutboxDelete {
                shard: ShardId(1000),
                msg_id: MsgId(9_000 + i),
            })
            .collect(),
    )
    .await;
    assert!(store
        .outbox(ShardId(1000))
        .await
        .expect("outbox")
        .is_empty());

    // The whole conformance suite again, every statement its own batch.
    let tiny = store.clone().with_max_batch_bytes(1);
    conformance::run_all_at(&tiny, 7 * conformance::BASE_STRIDE).await;
}

/// What one store wrote, a second connection reads.
async fn reconnect(store: &ScyllaStore, nodes: &[String]) {
    let uid = UserId(OWN + 5);
    let m = msg(uid.0, 77, 7_700, b"durable");
    let entry = DedupEntry {
        msg_id: MsgId(7_700),
        seq: Seq(77),
        server_time_ms: 5,
        prev_seq: Seq(3),
    };
    commit(
        store,
        vec![
            Op::SeqBound {
                uid,
                bound: Seq(10_000),
            },
            Op::Append {
                uid,
                msg: m.clone(),
            },
            Op::Dedup {
                uid,
                client_msg_id: 3,
                entry,
            },
            Op::Cursor {
                uid,
                device_id: "pc".into(),
                seq: Seq(77),
            },
        ],
    )
    .await;
    let other = ScyllaStore::connect(nodes, store.keyspace())
        .await
        .expect("second connect");
    assert_eq!(other.seq_bound(uid).await.expect("seq_bound"), Seq(10_000));
    assert_eq!(
        other.timeline(uid, Seq(0), 10).await.expect("timeline"),
        vec![m]
    );
    assert_eq!(other.dedup(uid, 3).await.expect("dedup"), Some(entry));
    assert_eq!(other.cursor(uid, "pc").await.expect("cursor"), Seq(77));
}

/// Dedup rows carry the table's 7-day TTL.
async fn dedup_ttl(store: &ScyllaStore, raw: &scylla::client::session::Session) {
    let uid = UserId(OWN + 6);
    commit(
        store,
        vec![Op::Dedup {
            uid,
            client_msg_id: 11,
            entry: DedupEntry {
                msg_id: MsgId(1),
                seq: Seq(1),
                server_time_ms: 1,
                prev_seq: Seq(3),
            },
        }],
    )
    .await;
    let rows = raw
        .query_unpaged(
            format!(
                "SELECT TTL(msg_id) FROM {}.dedup WHERE uid = ? AND client_msg_id = ?",
                store.keyspace()
            ),
            (uid.0 as i64, 11i64),
        )
        .await
        .expect("ttl query")
        .into_rows_result()
        .expect("rows");
    let (ttl,) = rows.first_row::<(Option<i32>,)>().expect("one row");
    let ttl = ttl.expect("dedup row has a TTL");
    assert!((604_800 - 600..=604_800).contains(&ttl), "dedup TTL {ttl}");
}

async fn run(nodes: Vec<String>, keyspace: String) {
    ScyllaStore::create_schema(&nodes, &keyspace, 1)
        .await
        .expect("create schema");
    // Idempotent.
    ScyllaStore::create_schema(&nodes, &keyspace, 1)
        .await
        .expect("create schema again");
    let store = ScyllaStore::connect(&nodes, &keyspace)
        .await
        .expect("connect");
    conformance::run_all(&store).await;
    // Again through a clone on other uids, as the embedded store's test does.
    conformance::run_all_at(&store.clone(), 5 * conformance::BASE_STRIDE).await;

    let raw = SessionBuilder::new()
        .known_nodes(&nodes)
        .build()
        .await
        .expect("raw session");
    buckets(&store).await;
    empty_bucket(&store, &raw).await;
    split_commits(&store).await;
    reconnect(&store, &nodes).await;
    dedup_ttl(&store, &raw).await;
}

#[tokio::test]
async fn scylla_conformance_or_skip() {
    let Some(nodes) = nodes_from_env() else {
        println!("skipped: SCYLLA_NODES not set");
        return;
    };
    let keyspace = format!("im_test_{:016x}", random_u64());
    println!("scylla conformance on {nodes:?}, keyspace {keyspace}");

    // Run in a task so that a failed check still lets us drop the keyspace.
    let result = tokio::spawn(run(nodes.clone(), keyspace.clone())).await;

    let session = SessionBuilder::new()
        .known_nodes(&nodes)
        .build()
        .await
        .expect("session for cleanup");
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), &[])
        .await
        .expect("drop test keyspace");

    if let Err(e) = result {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("conformance task failed: {e}"),
        }
    }
}

/// Needs no server: a node that refuses connections gives an error (not a hang), through the
/// driver thread, and nonsense arguments are refused before any I/O.
#[tokio::test]
async fn connect_errors_without_a_cluster() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let nodes = vec!["127.0.0.1:1".to_owned()];
    let t0 = std::time::Instant::now();
    let err = ScyllaStore::connect(&nodes, "im")
        .await
        .expect_err("no cluster there");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
    println!("connect to a closed port: {err}");
    assert!(ScyllaStore::connect(&[], "im").await.is_err());
    assert!(ScyllaStore::connect(&nodes, "Bad-Name").await.is_err());
    assert!(ScyllaStore::create_schema(&nodes, "im", 0).await.is_err());
}
