//! [`FjallStore`] against the shared [`conformance`] suite of the `Store` trait, plus the checks
//! specific to the embedded backend: durability across a reopen and corrupt records.

use bytes::Bytes;
use im_shared::proto::{Message, CONV_C2C};
use im_shared::{MsgId, Seq, ShardId, UserId};
use im_store::{DedupEntry, FjallStore, Op, OutboxEntry, Store, StoreError, WriteBatch};
use im_testkit::store_conformance as conformance;

fn msg(to: u64, seq: u64, msg_id: u64) -> Message {
    Message {
        seq: Seq(seq),
        prev_seq: Seq(0),
        msg_id: MsgId(msg_id),
        conv: CONV_C2C,
        from: UserId(1),
        to: UserId(to),
        client_msg_id: 99,
        server_time_ms: 1_700_000_000_000,
        body: Bytes::from_static(b"hello"),
    }
}

#[tokio::test]
async fn fjall_passes_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path()).expect("open");
    conformance::run_all(&store).await;
    // The suite runs again on the same store with another base, and through a clone.
    conformance::run_all_at(&store.clone(), 5 * conformance::BASE_STRIDE).await;
}

#[tokio::test]
async fn fjall_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uid = UserId(10);
    let m1 = msg(10, 1, 100);
    let m2 = msg(10, 2, 101);
    let dedup = DedupEntry {
        msg_id: MsgId(101),
        seq: Seq(2),
        server_time_ms: 1_700_000_000_000,
        prev_seq: Seq(1),
    };
    let out = OutboxEntry {
        shard: ShardId(3),
        msg_id: MsgId(101),
        recipients: vec![UserId(11), UserId(12)],
        msg: m2.clone(),
    };
    {
        let store = FjallStore::open(dir.path()).expect("open");
        let mut b = WriteBatch::default();
        b.push(Op::SeqBound {
            uid,
            bound: Seq(1000),
        });
        b.push(Op::Append {
            uid,
            msg: m1.clone(),
        });
        store.commit(b).await.expect("commit 1");
        let ops = vec![
            Op::Append {
                uid,
                msg: m2.clone(),
            },
            Op::Dedup {
                uid,
                client_msg_id: 99,
                entry: dedup,
            },
            Op::Cursor {
                uid,
                device_id: "phone".into(),
                seq: Seq(2),
            },
            Op::OutboxPut(out.clone()),
            Op::OutboxPut(OutboxEntry {
                msg_id: MsgId(102),
                ..out.clone()
            }),
        ];
        store
            .commit(WriteBatch { ops, writer: None })
            .await
            .expect("commit 2");
        store
            .commit(WriteBatch {
                ops: vec![Op::OutboxDelete {
                    shard: ShardId(3),
                    msg_id: MsgId(102),
                }],
                writer: None,
            })
            .await
            .expect("commit 3");
        // A second open while the first is alive is refused (fjall's directory lock).
        assert!(FjallStore::open(dir.path()).is_err());
    }
    let store = FjallStore::open(dir.path()).expect("reopen");
    assert_eq!(store.seq_bound(uid).await.expect("seq_bound"), Seq(1000));
    assert_eq!(store.last_seq(uid).await.expect("last_seq"), Seq(2));
    assert_eq!(
        store.timeline(uid, Seq(0), 10).await.expect("timeline"),
        vec![m1, m2]
    );
    assert_eq!(
        store.seq_of(uid, MsgId(101)).await.expect("seq_of"),
        Some(Seq(2))
    );
    assert_eq!(store.dedup(uid, 99).await.expect("dedup"), Some(dedup));
    assert_eq!(store.cursor(uid, "phone").await.expect("cursor"), Seq(2));
    assert_eq!(store.outbox(ShardId(3)).await.expect("outbox"), vec![out]);
}

/// Writes raw bytes under the documented key layout with fjall itself (the store's own API only
/// writes well-formed records), then reads them through the store.
#[tokio::test]
async fn corrupt_records_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(FjallStore::open(dir.path()).expect("create"));
    {
        let db = fjall::Database::builder(dir.path())
            .open()
            .expect("raw open");
        let ks = |n: &str| {
            db.keyspace(n, fjall::KeyspaceCreateOptions::default)
                .expect("keyspace")
        };
        let uid = 7u64.to_be_bytes();
        let key2 = |b: u64| {
            let mut k = uid.to_vec();
            k.extend_from_slice(&b.to_be_bytes());
            k
        };
        ks("seqbound").insert(uid, [1u8, 2, 3]).expect("insert");
        ks("timeline").insert(key2(1), [0u8; 5]).expect("insert");
        // A well-formed message stored under the wrong seq.
        ks("timeline")
            .insert(key2(2), msg(7, 3, 1).to_bytes().to_vec())
            .expect("insert");
        ks("msgidx").insert(key2(1), [0u8; 9]).expect("insert");
        ks("dedup").insert(key2(1), [0u8; 23]).expect("insert");
        let mut ck = uid.to_vec();
        ck.extend_from_slice(b"phone");
        ks("cursor").insert(ck, []).expect("insert");
        let mut ok = 3u16.to_be_bytes().to_vec();
        ok.extend_from_slice(&1u64.to_be_bytes());
        // Claims 1000 recipients.
        ks("outbox")
            .insert(ok, 1000u32.to_be_bytes())
            .expect("insert");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }
    let store = FjallStore::open(dir.path()).expect("reopen");
    let uid = UserId(7);
    let is_corrupt = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Corrupt { .. }));
    assert!(is_corrupt(store.seq_bound(uid).await.map(drop)));
    assert!(is_corrupt(store.timeline(uid, Seq(0), 10).await.map(drop)));
    assert!(is_corrupt(store.timeline(uid, Seq(1), 10).await.map(drop)));
    assert!(is_corrupt(store.seq_of(uid, MsgId(1)).await.map(drop)));
    assert!(is_corrupt(store.dedup(uid, 1).await.map(drop)));
    assert!(is_corrupt(store.cursor(uid, "phone").await.map(drop)));
    assert!(is_corrupt(store.outbox(ShardId(3)).await.map(drop)));
    // Keys that are well-formed still read fine next to the corrupt ones.
    assert_eq!(store.last_seq(uid).await.expect("last_seq"), Seq(2));
    assert_eq!(store.cursor(uid, "pad").await.expect("cursor"), Seq(0));
    let err = store.dedup(uid, 1).await.expect_err("corrupt");
    assert!(err.to_string().contains("dedup/"), "{err}");
}
