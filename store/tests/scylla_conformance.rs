//! [`ScyllaStore`] against a real ScyllaDB cluster: the shared [`conformance`] suite of the
//! `Store` trait, then the checks specific to this backend (timeline buckets of users and of
//! large groups, split commits, a reconnect, the dedup TTL, large-group index merges).
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
use im_shared::proto::{Message, CONV_C2C, CONV_C2G, ROLE_MEMBER};
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};
use im_store::{
    DedupEntry, MemberRecord, Op, OutboxEntry, ScyllaStore, Store, StoreError, WriteBatch,
};
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

/// A post of large group `g` at the group's `seq`.
fn post(g: GroupId, seq: u64, body: &[u8]) -> Message {
    Message {
        seq: Seq(seq),
        prev_seq: Seq(seq.saturating_sub(1)),
        msg_id: MsgId(70_000 + seq),
        conv: CONV_C2G,
        from: UserId(OWN + 10),
        to: UserId(g.0),
        client_msg_id: seq,
        server_time_ms: 1_700_000_000_000 + seq,
        body: Bytes::copy_from_slice(body),
    }
}

/// A large group's timeline across bucket boundaries (bucket = seq / 100 000, as for users):
/// ranges and paging across partitions, the head across buckets, an empty bucket row skipped,
/// a gid above 2^63 (a partition key: every u64), a seq above 2^63 refused.
async fn group_buckets(store: &ScyllaStore, raw: &scylla::client::session::Session) {
    let g = GroupId(u64::MAX - 7);
    let s: Vec<u64> = vec![1, 2, 99_999, 100_000, 100_001, 500_000, 10_000_000_000];
    assert_eq!(store.group_head(g).await.expect("head"), Seq(0));
    let ops = s
        .iter()
        .rev()
        .map(|&seq| Op::GroupAppend {
            group: g,
            msg: post(g, seq, b"p"),
        })
        .collect();
    commit(store, ops).await;
    let all = store.group_timeline(g, Seq(0), 100).await.expect("range");
    assert_eq!(seqs(&all), s);
    assert_eq!(all[3], post(g, 100_000, b"p"), "stored whole");
    for limit in 1..=s.len() + 1 {
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .group_timeline(g, Seq(after), limit)
                .await
                .expect("range");
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            after = last.seq.0;
            got.extend(seqs(&page));
        }
        assert_eq!(got, s, "paging with limit {limit}");
    }
    for (after, want) in [
        (1u64, &s[1..]),
        (99_998, &s[2..]),
        (99_999, &s[3..]),
        (100_001, &s[5..]),
        (499_999, &s[5..]),
        (500_000, &s[6..]),
        (10_000_000_000, &s[7..]),
        (u64::MAX - 1, &s[7..]),
    ] {
        let got = store
            .group_timeline(g, Seq(after), 100)
            .await
            .expect("range");
        assert_eq!(seqs(&got), want.to_vec(), "after {after}");
    }
    assert_eq!(
        store.group_head(g).await.expect("head"),
        Seq(10_000_000_000)
    );
    // Not a user's timeline: the same id as a uid has nothing.
    assert!(store
        .timeline(UserId(g.0), Seq(0), 10)
        .await
        .expect("timeline")
        .is_empty());
    assert_eq!(store.last_seq(UserId(g.0)).await.expect("last_seq"), Seq(0));

    // A bucket row above every entry, without entries (what a commit stopped between chunks can
    // leave): skipped by the head and the ranges.
    raw.query_unpaged(
        format!(
            "INSERT INTO {}.group_timeline_bucket (gid, bucket) VALUES (?, ?)",
            store.keyspace()
        ),
        (g.0 as i64, 999_999_999i64),
    )
    .await
    .expect("raw insert");
    assert_eq!(
        store.group_head(g).await.expect("head"),
        Seq(10_000_000_000)
    );
    assert_eq!(
        seqs(
            &store
                .group_timeline(g, Seq(500_000), 10)
                .await
                .expect("range")
        ),
        vec![10_000_000_000]
    );

    // A seq above i64::MAX cannot be stored in order: refused, nothing written.
    let err = store
        .commit(WriteBatch {
            ops: vec![
                Op::GroupAppend {
                    group: GroupId(OWN + 11),
                    msg: post(GroupId(OWN + 11), 1, b"ok"),
                },
                Op::GroupAppend {
                    group: GroupId(OWN + 11),
                    msg: post(GroupId(OWN + 11), u64::MAX, b"too far"),
                },
            ],
            writer: None,
        })
        .await
        .expect_err("seq above i64::MAX");
    assert!(matches!(err, StoreError::Io(_)), "{err}");
    assert_eq!(
        store.group_head(GroupId(OWN + 11)).await.expect("head"),
        Seq(0)
    );
}

/// Merges of one batch on the `user_large_groups` key (a `CQL` batch gives all its statements one
/// timestamp, at which a delete would beat an insert): the later op wins, as in the embedded
/// store; the group read cursor is last-write-wins like a device cursor, a later lower seq
/// included; and a second connection reads it all.
async fn large_group_merges(store: &ScyllaStore, nodes: &[String]) {
    let u = UserId(OWN + 12);
    let (g1, g2, g3) = (GroupId(OWN + 13), GroupId(OWN + 14), GroupId(u64::MAX - 3));
    let member = |g: GroupId| Op::MemberPut {
        group: g,
        member: MemberRecord {
            uid: u,
            role: ROLE_MEMBER,
            joined_ms: 1,
        },
    };
    let large = |g: GroupId, on: bool| Op::LargeMember {
        group: g,
        uid: u,
        on,
    };
    let delete = |g: GroupId| Op::MemberDelete { group: g, uid: u };
    commit(
        store,
        vec![
            member(g1),
            large(g1, true),
            member(g2),
            large(g2, true),
            member(g3),
            large(g3, true),
        ],
    )
    .await;
    assert_eq!(
        store.large_groups_of(u).await.expect("index"),
        vec![g1, g2, g3],
        "unsigned order"
    );
    // Set, then the member is deleted, in one batch: gone. Deleted, then re-added and set: set.
    // Set, then cleared: cleared.
    commit(
        store,
        vec![
            large(g1, true),
            delete(g1),
            delete(g2),
            member(g2),
            large(g2, true),
            large(g3, true),
            large(g3, false),
        ],
    )
    .await;
    assert_eq!(store.large_groups_of(u).await.expect("index"), vec![g2]);
    let groups: Vec<GroupId> = store.groups_of(u).await.expect("groups_of");
    assert_eq!(groups, vec![g2, g3], "the memberships as written");

    // Read cursors: the later write wins, within a batch and across commits.
    let read = |g: GroupId, seq: u64| Op::GroupRead {
        uid: u,
        group: g,
        seq: Seq(seq),
    };
    commit(store, vec![read(g2, 9), read(g2, 4), read(g3, 7)]).await;
    assert_eq!(store.group_read(u, g2).await.expect("read"), Seq(4));
    assert_eq!(store.group_read(u, g3).await.expect("read"), Seq(7));
    commit(store, vec![read(g3, 2)]).await;
    assert_eq!(store.group_read(u, g3).await.expect("read"), Seq(2));
    assert_eq!(store.group_read(u, g1).await.expect("read"), Seq(0));
    assert_eq!(
        store.group_read(UserId(OWN + 13), g2).await.expect("read"),
        Seq(0),
        "per user"
    );

    commit(
        store,
        vec![
            Op::GroupAppend {
                group: g2,
                msg: post(g2, 1, b"first"),
            },
            Op::GroupAppend {
                group: g2,
                msg: post(g2, 2, b"second"),
            },
        ],
    )
    .await;
    let other = ScyllaStore::connect(nodes, store.keyspace())
        .await
        .expect("second connect");
    assert_eq!(other.large_groups_of(u).await.expect("index"), vec![g2]);
    assert_eq!(other.group_read(u, g2).await.expect("read"), Seq(4));
    assert_eq!(other.group_head(g2).await.expect("head"), Seq(2));
    assert_eq!(
        other.group_timeline(g2, Seq(0), 10).await.expect("range"),
        vec![post(g2, 1, b"first"), post(g2, 2, b"second")]
    );
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
    group_buckets(&store, &raw).await;
    large_group_merges(&store, &nodes).await;
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
