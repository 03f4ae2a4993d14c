//! The conformance test-suite of [`Store`]: every backend (the embedded [`super::FjallStore`],
//! later ScyllaDB) must pass [`run_all`]. Each check is a `pub async fn` that panics (`assert!`)
//! on a violation, so a backend's test calls [`run_all`] or picks single checks.
//!
//! Every check writes only uids and outbox shards derived from its `base` argument and its own
//! block inside it, so all checks can share one store, and the whole suite can run again on the
//! same store with another `base` (a different multiple of [`BASE_STRIDE`], see
//! [`run_all_at`]). Durability across a restart is backend specific and not checked here.

use bytes::Bytes;
use im_shared::proto::{Message, CONV_C2C};
use im_shared::shard::VSHARDS;
use im_shared::{MsgId, Seq, ShardId, UserId};

use super::{DedupEntry, Op, OutboxEntry, Store, WriteBatch};

/// Distance between two `base`s whose runs must not see each other's records. Uids of one run are
/// `base + 1 .. base + BASE_STRIDE`.
pub const BASE_STRIDE: u64 = 1 << 20;

/// Uids available to one check inside a run.
const BLOCK: u64 = 64;

/// Outbox shards available to one run.
const SHARDS_PER_RUN: u64 = 4;

/// Uid `i` (< [`BLOCK`]) of check number `check` in the run at `base`. Never 0.
fn uid(base: u64, check: u64, i: u64) -> UserId {
    debug_assert!(i < BLOCK);
    UserId(base + 1 + check * BLOCK + i)
}

/// Outbox shard `j` (< [`SHARDS_PER_RUN`]) of the run at `base`, always below [`VSHARDS`].
fn shard(base: u64, j: u64) -> ShardId {
    let n = (base / BASE_STRIDE) * SHARDS_PER_RUN + j;
    ShardId((n % u64::from(VSHARDS)) as u16)
}

/// A c2c message to `owner`'s timeline at `seq` (prev_seq = `seq - 1` for simplicity).
fn message(owner: UserId, seq: u64, msg_id: u64, body: &[u8]) -> Message {
    Message {
        seq: Seq(seq),
        prev_seq: Seq(seq.saturating_sub(1)),
        msg_id: MsgId(msg_id),
        conv: CONV_C2C,
        from: UserId(owner.0 ^ 0x5555),
        to: owner,
        client_msg_id: msg_id.wrapping_mul(31),
        server_time_ms: 1_700_000_000_000 + seq,
        body: Bytes::copy_from_slice(body),
    }
}

async fn commit<S: Store>(store: &S, ops: Vec<Op>) {
    store
        .commit(WriteBatch { ops })
        .await
        .expect("commit failed");
}

async fn timeline<S: Store>(store: &S, uid: UserId, after: u64, limit: usize) -> Vec<Message> {
    store
        .timeline(uid, Seq(after), limit)
        .await
        .expect("timeline failed")
}

fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq.0).collect()
}

/// Runs every check with the default base ([`BASE_STRIDE`]). Run it once per fresh store; use
/// [`run_all_at`] with other bases to run it again on the same store.
pub async fn run_all<S: Store>(store: &S) {
    run_all_at(store, BASE_STRIDE).await;
}

/// Runs every check on the uids and shards of `base` (a multiple of [`BASE_STRIDE`]; distinct
/// bases do not interfere, up to 256 runs per store).
pub async fn run_all_at<S: Store>(store: &S, base: u64) {
    empty_batch(store).await;
    seq_bound(store, base).await;
    timeline_range(store, base).await;
    last_seq(store, base).await;
    seq_of(store, base).await;
    dedup(store, base).await;
    cursor(store, base).await;
    outbox(store, base).await;
    batch_atomicity(store, base).await;
    reappend_idempotent(store, base).await;
    last_op_wins(store, base).await;
    large_body(store, base).await;
}

/// An empty batch commits without error and changes nothing.
pub async fn empty_batch<S: Store>(store: &S) {
    store
        .commit(WriteBatch::default())
        .await
        .expect("empty batch must commit");
}

/// Seq bound: 0 when never reserved, round trip, overwrite with a higher bound, per user.
pub async fn seq_bound<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 0, 0), uid(base, 0, 1));
    assert_eq!(store.seq_bound(a).await.expect("seq_bound"), Seq(0));
    commit(
        store,
        vec![Op::SeqBound {
            uid: a,
            bound: Seq(100),
        }],
    )
    .await;
    assert_eq!(store.seq_bound(a).await.expect("seq_bound"), Seq(100));
    assert_eq!(
        store.seq_bound(b).await.expect("seq_bound"),
        Seq(0),
        "another user's bound must stay untouched"
    );
    commit(
        store,
        vec![Op::SeqBound {
            uid: a,
            bound: Seq(1 << 40),
        }],
    )
    .await;
    assert_eq!(store.seq_bound(a).await.expect("seq_bound"), Seq(1 << 40));
    commit(
        store,
        vec![Op::SeqBound {
            uid: b,
            bound: Seq(7),
        }],
    )
    .await;
    assert_eq!(store.seq_bound(a).await.expect("seq_bound"), Seq(1 << 40));
    assert_eq!(store.seq_bound(b).await.expect("seq_bound"), Seq(7));
}

/// Timeline range reads: seq > after, ascending, at most limit, paging to the end, and the
/// neighbouring users' timelines stay separate. Seqs cross byte boundaries so that a key encoding
/// that does not sort numerically fails.
pub async fn timeline_range<S: Store>(store: &S, base: u64) {
    let (before, a, after_u, never) = (
        uid(base, 1, 0),
        uid(base, 1, 1),
        uid(base, 1, 2),
        uid(base, 1, 3),
    );
    let a_seqs: [u64; 9] = [1, 2, 255, 256, 257, 65_536, 1 << 32, (1 << 32) + 1, 1 << 48];
    // Appended out of order and over two commits.
    let mut first = Vec::new();
    for (i, &s) in a_seqs.iter().enumerate().rev().filter(|(i, _)| i % 2 == 0) {
        first.push(Op::Append {
            uid: a,
            msg: message(a, s, 1000 + i as u64, format!("a{s}").as_bytes()),
        });
    }
    commit(store, first).await;
    let mut second = Vec::new();
    for (i, &s) in a_seqs.iter().enumerate().filter(|(i, _)| i % 2 == 1) {
        second.push(Op::Append {
            uid: a,
            msg: message(a, s, 1000 + i as u64, format!("a{s}").as_bytes()),
        });
    }
    // Neighbours on both sides with seqs below, between and above a's.
    for s in [1u64, 3, 300, 1 << 50] {
        second.push(Op::Append {
            uid: before,
            msg: message(before, s, 2000 + s, b"before"),
        });
        second.push(Op::Append {
            uid: after_u,
            msg: message(after_u, s, 3000 + s, b"after"),
        });
    }
    commit(store, second).await;

    let all = timeline(store, a, 0, 1000).await;
    assert_eq!(seqs(&all), a_seqs.to_vec(), "whole timeline, ascending");
    for (i, m) in all.iter().enumerate() {
        assert_eq!(
            *m,
            message(
                a,
                a_seqs[i],
                1000 + i as u64,
                format!("a{}", a_seqs[i]).as_bytes()
            )
        );
    }
    assert_eq!(seqs(&timeline(store, a, 2, 3).await), vec![255, 256, 257]);
    assert_eq!(
        seqs(&timeline(store, a, 3, 2).await),
        vec![255, 256],
        "after between seqs"
    );
    assert_eq!(seqs(&timeline(store, a, 0, 1).await), vec![1]);
    assert!(
        timeline(store, a, 1 << 48, 10).await.is_empty(),
        "after the last seq"
    );
    assert!(
        timeline(store, a, u64::MAX, 10).await.is_empty(),
        "after u64::MAX"
    );
    assert!(timeline(store, a, 0, 0).await.is_empty(), "limit 0");
    assert_eq!(
        seqs(&timeline(store, a, 65_535, 100).await),
        vec![65_536, 1 << 32, (1 << 32) + 1, 1 << 48]
    );

    // Paging to the end with every page size.
    for limit in 1..=a_seqs.len() + 1 {
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let page = timeline(store, a, after, limit).await;
            assert!(page.len() <= limit, "page longer than limit {limit}");
            let Some(last) = page.last() else { break };
            after = last.seq.0;
            got.extend(seqs(&page));
        }
        assert_eq!(got, a_seqs.to_vec(), "paging with limit {limit}");
    }

    assert_eq!(
        seqs(&timeline(store, before, 0, 100).await),
        vec![1, 3, 300, 1 << 50]
    );
    assert!(timeline(store, before, 0, 100)
        .await
        .iter()
        .all(|m| m.to == before));
    assert_eq!(
        seqs(&timeline(store, after_u, 0, 100).await),
        vec![1, 3, 300, 1 << 50]
    );
    assert!(timeline(store, after_u, 0, 100)
        .await
        .iter()
        .all(|m| m.to == after_u));
    assert!(
        timeline(store, never, 0, 100).await.is_empty(),
        "never written user"
    );
}

/// `last_seq`: 0 for an empty timeline, the highest appended seq otherwise (whatever the append
/// order), unaffected by the neighbouring users.
pub async fn last_seq<S: Store>(store: &S, base: u64) {
    let (lo, a, hi) = (uid(base, 2, 0), uid(base, 2, 1), uid(base, 2, 2));
    assert_eq!(store.last_seq(a).await.expect("last_seq"), Seq(0));
    commit(
        store,
        vec![
            Op::Append {
                uid: lo,
                msg: message(lo, 1 << 40, 1, b"x"),
            },
            Op::Append {
                uid: hi,
                msg: message(hi, 1 << 41, 2, b"x"),
            },
        ],
    )
    .await;
    assert_eq!(
        store.last_seq(a).await.expect("last_seq"),
        Seq(0),
        "neighbours must not leak into an empty timeline"
    );
    commit(
        store,
        vec![
            Op::Append {
                uid: a,
                msg: message(a, 256, 10, b"x"),
            },
            Op::Append {
                uid: a,
                msg: message(a, 5, 11, b"x"),
            },
        ],
    )
    .await;
    assert_eq!(store.last_seq(a).await.expect("last_seq"), Seq(256));
    commit(
        store,
        vec![Op::Append {
            uid: a,
            msg: message(a, 300, 12, b"x"),
        }],
    )
    .await;
    assert_eq!(store.last_seq(a).await.expect("last_seq"), Seq(300));
    commit(
        store,
        vec![Op::Append {
            uid: a,
            msg: message(a, 7, 13, b"x"),
        }],
    )
    .await;
    assert_eq!(
        store.last_seq(a).await.expect("last_seq"),
        Seq(300),
        "a lower late append does not lower last_seq"
    );
    assert_eq!(store.last_seq(lo).await.expect("last_seq"), Seq(1 << 40));
    assert_eq!(store.last_seq(hi).await.expect("last_seq"), Seq(1 << 41));
}

/// `seq_of`: the msg_id index, per user (one msg_id sits at different seqs in the sender's and
/// the recipient's timelines).
pub async fn seq_of<S: Store>(store: &S, base: u64) {
    let (sender, recipient) = (uid(base, 3, 0), uid(base, 3, 1));
    let id = 0x0123_4567_89ab_cdef;
    assert_eq!(store.seq_of(sender, MsgId(id)).await.expect("seq_of"), None);
    commit(
        store,
        vec![
            Op::Append {
                uid: sender,
                msg: message(sender, 41, id, b"hi"),
            },
            Op::Append {
                uid: recipient,
                msg: message(recipient, 9, id, b"hi"),
            },
            Op::Append {
                uid: sender,
                msg: message(sender, 42, id + 1, b"again"),
            },
        ],
    )
    .await;
    assert_eq!(
        store.seq_of(sender, MsgId(id)).await.expect("seq_of"),
        Some(Seq(41))
    );
    assert_eq!(
        store.seq_of(sender, MsgId(id + 1)).await.expect("seq_of"),
        Some(Seq(42))
    );
    assert_eq!(
        store.seq_of(recipient, MsgId(id)).await.expect("seq_of"),
        Some(Seq(9))
    );
    assert_eq!(
        store
            .seq_of(recipient, MsgId(id + 1))
            .await
            .expect("seq_of"),
        None
    );
    assert_eq!(
        store.seq_of(sender, MsgId(id - 1)).await.expect("seq_of"),
        None
    );
}

/// Dedup entries: absent, round trip, overwrite, per user.
pub async fn dedup<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 4, 0), uid(base, 4, 1));
    let cid = 0xfeed_0000_0000_0001;
    assert_eq!(store.dedup(a, cid).await.expect("dedup"), None);
    let e1 = DedupEntry {
        msg_id: MsgId(77),
        seq: Seq(3),
        server_time_ms: 1_700_000_000_123,
        prev_seq: Seq(3),
    };
    commit(
        store,
        vec![Op::Dedup {
            uid: a,
            client_msg_id: cid,
            entry: e1,
        }],
    )
    .await;
    assert_eq!(store.dedup(a, cid).await.expect("dedup"), Some(e1));
    assert_eq!(store.dedup(a, cid + 1).await.expect("dedup"), None);
    assert_eq!(
        store.dedup(b, cid).await.expect("dedup"),
        None,
        "other user"
    );
    let e2 = DedupEntry {
        msg_id: MsgId(u64::MAX),
        seq: Seq(u64::MAX - 1),
        server_time_ms: u64::MAX - 2,
        prev_seq: Seq(3),
    };
    commit(
        store,
        vec![
            Op::Dedup {
                uid: b,
                client_msg_id: cid,
                entry: e2,
            },
            Op::Dedup {
                uid: a,
                client_msg_id: 0,
                entry: e2,
            },
        ],
    )
    .await;
    assert_eq!(store.dedup(a, cid).await.expect("dedup"), Some(e1));
    assert_eq!(store.dedup(b, cid).await.expect("dedup"), Some(e2));
    assert_eq!(store.dedup(a, 0).await.expect("dedup"), Some(e2));
    commit(
        store,
        vec![Op::Dedup {
            uid: a,
            client_msg_id: cid,
            entry: e2,
        }],
    )
    .await;
    assert_eq!(
        store.dedup(a, cid).await.expect("dedup"),
        Some(e2),
        "overwrite"
    );
}

/// Device cursors: 0 when unset, per device (also when one device id is a prefix of another),
/// per user, overwrite.
pub async fn cursor<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 5, 0), uid(base, 5, 1));
    let (phone, pad, pad2, web) = ("phone-1", "pad", "pad2", "网页-web");
    assert_eq!(store.cursor(a, phone).await.expect("cursor"), Seq(0));
    let set = |uid, device: &str, seq| Op::Cursor {
        uid,
        device_id: device.to_owned(),
        seq: Seq(seq),
    };
    commit(
        store,
        vec![set(a, phone, 10), set(a, pad2, 20), set(a, web, 30)],
    )
    .await;
    assert_eq!(store.cursor(a, phone).await.expect("cursor"), Seq(10));
    assert_eq!(store.cursor(a, pad2).await.expect("cursor"), Seq(20));
    assert_eq!(store.cursor(a, web).await.expect("cursor"), Seq(30));
    assert_eq!(
        store.cursor(a, pad).await.expect("cursor"),
        Seq(0),
        "prefix device id"
    );
    assert_eq!(
        store.cursor(b, phone).await.expect("cursor"),
        Seq(0),
        "other user"
    );
    commit(store, vec![set(a, phone, 11), set(b, phone, 5)]).await;
    assert_eq!(
        store.cursor(a, phone).await.expect("cursor"),
        Seq(11),
        "overwrite"
    );
    assert_eq!(
        store.cursor(a, pad2).await.expect("cursor"),
        Seq(20),
        "other device"
    );
    assert_eq!(store.cursor(b, phone).await.expect("cursor"), Seq(5));
}

/// Outbox: put, scan in msg_id order, scan returns only its own shard, delete (also of an absent
/// entry), entries with no and with many recipients.
pub async fn outbox<S: Store>(store: &S, base: u64) {
    let (s, other) = (shard(base, 0), shard(base, 1));
    let sender = uid(base, 6, 0);
    assert!(store.outbox(s).await.expect("outbox").is_empty());
    let entry = |msg_id: u64, recipients: Vec<UserId>| OutboxEntry {
        shard: s,
        msg_id: MsgId(msg_id),
        recipients,
        msg: message(sender, msg_id % 1000 + 1, msg_id, b"fan out"),
    };
    let many: Vec<UserId> = (1..BLOCK).map(|i| uid(base, 6, i)).collect();
    let e256 = entry(256, vec![uid(base, 6, 1)]);
    let e1 = entry(1, vec![uid(base, 6, 2), uid(base, 6, 3)]);
    let e255 = entry(255, many);
    let e_none = entry(1 << 40, Vec::new());
    let foreign = OutboxEntry {
        shard: other,
        ..entry(2, vec![uid(base, 6, 4)])
    };
    commit(
        store,
        vec![
            Op::OutboxPut(e256.clone()),
            Op::OutboxPut(foreign.clone()),
            Op::OutboxPut(e1.clone()),
        ],
    )
    .await;
    commit(
        store,
        vec![Op::OutboxPut(e_none.clone()), Op::OutboxPut(e255.clone())],
    )
    .await;
    assert_eq!(
        store.outbox(s).await.expect("outbox"),
        vec![e1.clone(), e255.clone(), e256.clone(), e_none.clone()],
        "msg_id order, own shard only"
    );
    assert_eq!(
        store.outbox(other).await.expect("outbox"),
        vec![foreign.clone()]
    );

    commit(
        store,
        vec![
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(255),
            },
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(999_999),
            },
            // Same msg_id as `foreign` but in `s`: must not delete `foreign`.
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(2),
            },
        ],
    )
    .await;
    assert_eq!(
        store.outbox(s).await.expect("outbox"),
        vec![e1.clone(), e256.clone(), e_none.clone()]
    );
    assert_eq!(
        store.outbox(other).await.expect("outbox"),
        vec![foreign.clone()]
    );

    commit(
        store,
        vec![
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(1),
            },
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(256),
            },
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(1 << 40),
            },
            Op::OutboxDelete {
                shard: other,
                msg_id: MsgId(2),
            },
        ],
    )
    .await;
    assert!(store.outbox(s).await.expect("outbox").is_empty());
    assert!(store.outbox(other).await.expect("outbox").is_empty());
}

/// One commit of every kind of op: nothing is visible before the commit, everything after.
pub async fn batch_atomicity<S: Store>(store: &S, base: u64) {
    let (sender, recipient) = (uid(base, 7, 0), uid(base, 7, 1));
    let s = shard(base, 2);
    let msg = message(sender, 5, 0xabcd, b"atomic");
    let dedup = DedupEntry {
        msg_id: MsgId(0xabcd),
        seq: Seq(5),
        server_time_ms: msg.server_time_ms,
        prev_seq: Seq(3),
    };
    let out = OutboxEntry {
        shard: s,
        msg_id: MsgId(0xabcd),
        recipients: vec![recipient],
        msg: msg.clone(),
    };
    let mut batch = WriteBatch::default();
    batch.push(Op::SeqBound {
        uid: sender,
        bound: Seq(100),
    });
    batch.push(Op::Append {
        uid: sender,
        msg: msg.clone(),
    });
    batch.push(Op::Dedup {
        uid: sender,
        client_msg_id: 42,
        entry: dedup,
    });
    batch.push(Op::Cursor {
        uid: sender,
        device_id: "desk".into(),
        seq: Seq(5),
    });
    batch.push(Op::OutboxPut(out.clone()));
    assert_eq!(batch.len(), 5);

    // Built but not committed: nothing visible.
    assert_eq!(store.seq_bound(sender).await.expect("seq_bound"), Seq(0));
    assert_eq!(store.last_seq(sender).await.expect("last_seq"), Seq(0));
    assert_eq!(store.dedup(sender, 42).await.expect("dedup"), None);
    assert!(store.outbox(s).await.expect("outbox").is_empty());

    store.commit(batch).await.expect("commit");
    assert_eq!(store.seq_bound(sender).await.expect("seq_bound"), Seq(100));
    assert_eq!(store.last_seq(sender).await.expect("last_seq"), Seq(5));
    assert_eq!(timeline(store, sender, 0, 10).await, vec![msg]);
    assert_eq!(
        store.seq_of(sender, MsgId(0xabcd)).await.expect("seq_of"),
        Some(Seq(5))
    );
    assert_eq!(store.dedup(sender, 42).await.expect("dedup"), Some(dedup));
    assert_eq!(store.cursor(sender, "desk").await.expect("cursor"), Seq(5));
    assert_eq!(store.outbox(s).await.expect("outbox"), vec![out]);
    assert!(timeline(store, recipient, 0, 10).await.is_empty());
}

/// Re-appending the same `(uid, seq)` (a replayed outbox entry, a retried batch) leaves one entry;
/// a different message at the same seq replaces it.
pub async fn reappend_idempotent<S: Store>(store: &S, base: u64) {
    let a = uid(base, 8, 0);
    let m = message(a, 10, 500, b"once");
    commit(
        store,
        vec![Op::Append {
            uid: a,
            msg: m.clone(),
        }],
    )
    .await;
    commit(
        store,
        vec![Op::Append {
            uid: a,
            msg: m.clone(),
        }],
    )
    .await;
    commit(
        store,
        vec![
            Op::Append {
                uid: a,
                msg: m.clone(),
            },
            Op::Append {
                uid: a,
                msg: m.clone(),
            },
        ],
    )
    .await;
    assert_eq!(timeline(store, a, 0, 10).await, vec![m.clone()]);
    assert_eq!(store.last_seq(a).await.expect("last_seq"), Seq(10));
    assert_eq!(
        store.seq_of(a, MsgId(500)).await.expect("seq_of"),
        Some(Seq(10))
    );

    let replaced = message(a, 10, 500, b"replaced body");
    commit(
        store,
        vec![Op::Append {
            uid: a,
            msg: replaced.clone(),
        }],
    )
    .await;
    assert_eq!(timeline(store, a, 0, 10).await, vec![replaced]);
}

/// Several ops on one key in one batch (group commit merges many requests) act as if applied in
/// order: the last one wins.
pub async fn last_op_wins<S: Store>(store: &S, base: u64) {
    let a = uid(base, 9, 0);
    let s = shard(base, 3);
    let out = OutboxEntry {
        shard: s,
        msg_id: MsgId(9),
        recipients: vec![uid(base, 9, 1)],
        msg: message(a, 1, 9, b"short lived"),
    };
    let cur = |seq| Op::Cursor {
        uid: a,
        device_id: "d".into(),
        seq: Seq(seq),
    };
    commit(
        store,
        vec![
            Op::SeqBound {
                uid: a,
                bound: Seq(10),
            },
            cur(1),
            Op::OutboxPut(out.clone()),
            Op::SeqBound {
                uid: a,
                bound: Seq(20),
            },
            cur(3),
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(9),
            },
        ],
    )
    .await;
    assert_eq!(store.seq_bound(a).await.expect("seq_bound"), Seq(20));
    assert_eq!(store.cursor(a, "d").await.expect("cursor"), Seq(3));
    assert!(
        store.outbox(s).await.expect("outbox").is_empty(),
        "put then delete"
    );

    commit(
        store,
        vec![
            Op::OutboxDelete {
                shard: s,
                msg_id: MsgId(9),
            },
            Op::OutboxPut(out.clone()),
        ],
    )
    .await;
    assert_eq!(
        store.outbox(s).await.expect("outbox"),
        vec![out],
        "delete then put"
    );
    commit(
        store,
        vec![Op::OutboxDelete {
            shard: s,
            msg_id: MsgId(9),
        }],
    )
    .await;
}

/// A 60 KiB body round-trips through the timeline and the outbox.
pub async fn large_body<S: Store>(store: &S, base: u64) {
    let a = uid(base, 10, 0);
    let body: Vec<u8> = (0..60 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let m = message(a, 3, 31, &body);
    let out = OutboxEntry {
        shard: shard(base, 3),
        msg_id: MsgId(31),
        recipients: vec![uid(base, 10, 1)],
        msg: m.clone(),
    };
    commit(
        store,
        vec![
            Op::Append {
                uid: a,
                msg: m.clone(),
            },
            Op::OutboxPut(out.clone()),
        ],
    )
    .await;
    let got = timeline(store, a, 0, 10).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.len(), 60 * 1024);
    assert_eq!(got[0], m);
    assert_eq!(
        store.outbox(out.shard).await.expect("outbox"),
        vec![out.clone()]
    );
    commit(
        store,
        vec![Op::OutboxDelete {
            shard: out.shard,
            msg_id: out.msg_id,
        }],
    )
    .await;
}
