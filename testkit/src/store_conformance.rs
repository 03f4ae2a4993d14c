//! The conformance test-suite of [`Store`]: every backend (the embedded [`FjallStore`], the
//! ScyllaDB store) must pass [`run_all`]. Each check is a `pub async fn` that panics (`assert!`)
//! on a violation, so a backend's test calls [`run_all`] or picks single checks.
//!
//! Every check writes only uids, group ids and outbox shards derived from its `base` argument and
//! its own block inside it, so all checks can share one store, and the whole suite can run again
//! on the same store with another `base` (a different multiple of [`BASE_STRIDE`], see
//! [`run_all_at`]). Durability across a restart is backend specific and not checked here.

use bytes::Bytes;
use im_shared::org::{OrgDept, OrgEntity, OrgMember, OrgPerson, OrgRecord};
use im_shared::proto::{
    GroupDesc, Message, CONV_C2C, CONV_GROUP_EVENT, MAX_ANNOUNCEMENT_LEN, MAX_NAME_LEN,
    MAX_PUSH_TOKEN_LEN, ROLE_MEMBER, ROLE_OWNER,
};
use im_shared::shard::VSHARDS;
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};

use im_store::{
    DedupEntry, MemberRecord, Op, OutboxEntry, PushToken, Store, StoreError, WriteBatch, Writer,
};

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

/// Group id `i` (< [`BLOCK`]) of check number `check` in the run at `base` (same numbering as
/// [`uid`]: groups and users are different records). Never 0.
fn gid(base: u64, check: u64, i: u64) -> GroupId {
    GroupId(uid(base, check, i).0)
}

/// Id `i` (< [`BLOCK`]) of check number `check` in the run at `base` from the top of the u64
/// range, above `i64::MAX` (bases stay below 2^28): for the checks that ids are ordered as
/// unsigned numbers (a backend storing them in a signed column must not sort them first).
fn high(base: u64, check: u64, i: u64) -> u64 {
    debug_assert!(i < BLOCK);
    u64::MAX - base - check * BLOCK - i
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
        .commit(WriteBatch { ops, writer: None })
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
    append_unindexed(store, base).await;
    dedup(store, base).await;
    cursor(store, base).await;
    cursors(store, base).await;
    push_watches(store, base).await;
    outbox(store, base).await;
    batch_atomicity(store, base).await;
    reappend_idempotent(store, base).await;
    last_op_wins(store, base).await;
    large_body(store, base).await;
    group_info(store, base).await;
    members(store, base).await;
    groups_of_index(store, base).await;
    mutes(store, base).await;
    user_flags(store, base).await;
    push_tokens(store, base).await;
    batch_atomicity_groups(store, base).await;
    writer_fence(store, base).await;
    id_floor(store, base).await;
    org_records(store, base).await;
    large_groups(store, base).await;
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

/// `AppendUnindexed`: the entry is in the timeline like any append, in seq order with indexed
/// ones; whether `seq_of` finds it is the backend's choice (the embedded store does not index
/// it, see its own test), so only that it answers without error is checked here.
pub async fn append_unindexed<S: Store>(store: &S, base: u64) {
    let u = uid(base, 3, 2);
    let id = 0x0fed_cba9_8765_4321;
    commit(
        store,
        vec![
            Op::Append {
                uid: u,
                msg: message(u, 1, id, b"indexed"),
            },
            Op::AppendUnindexed {
                uid: u,
                msg: message(u, 2, id + 1, b"own copy"),
            },
        ],
    )
    .await;
    let t = timeline(store, u, 0, 10).await;
    assert_eq!(t.len(), 2);
    assert_eq!((t[1].seq, t[1].msg_id), (Seq(2), MsgId(id + 1)));
    assert_eq!(&t[1].body[..], b"own copy");
    assert_eq!(
        store.seq_of(u, MsgId(id)).await.expect("seq_of"),
        Some(Seq(1))
    );
    let unindexed = store.seq_of(u, MsgId(id + 1)).await.expect("seq_of");
    assert!(matches!(unindexed, None | Some(Seq(2))), "{unindexed:?}");
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

/// All cursors of a user: in device id order, only that user's, overwrites seen.
pub async fn cursors<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 17, 0), uid(base, 17, 1));
    assert!(store.cursors(a).await.expect("cursors").is_empty());
    let set = |uid, device: &str, seq| Op::Cursor {
        uid,
        device_id: device.to_owned(),
        seq: Seq(seq),
    };
    commit(
        store,
        vec![
            set(a, "web", 3),
            set(a, "phone", 9),
            set(a, "pad", 7),
            set(b, "phone", 1),
        ],
    )
    .await;
    commit(store, vec![set(a, "pad", 8)]).await;
    let got = store.cursors(a).await.expect("cursors");
    let want = [("pad", 8), ("phone", 9), ("web", 3)].map(|(d, s)| (d.to_owned(), Seq(s)));
    assert_eq!(got, want);
    assert_eq!(
        store.cursors(b).await.expect("cursors"),
        [("phone".to_owned(), Seq(1))]
    );
}

/// Push watches: set, list in (uid, seq) order per shard, clear, last op on a key wins.
pub async fn push_watches<S: Store>(store: &S, base: u64) {
    let (s, other) = (shard(base, 0), shard(base, 1));
    let (a, b) = (uid(base, 18, 0), uid(base, 18, 1));
    let w = |shard, uid, seq, on| Op::PushWatch {
        shard,
        uid,
        seq: Seq(seq),
        on,
    };
    assert!(store.push_watches(s).await.expect("watches").is_empty());
    commit(
        store,
        vec![
            w(s, b, 2, true),
            w(s, a, 5, true),
            w(s, a, 3, true),
            w(other, a, 9, true),
            // Set then cleared in one batch: absent; cleared then set: present.
            w(s, a, 4, true),
            w(s, a, 4, false),
            w(s, b, 7, false),
            w(s, b, 7, true),
        ],
    )
    .await;
    assert_eq!(
        store.push_watches(s).await.expect("watches"),
        [(a, Seq(3)), (a, Seq(5)), (b, Seq(2)), (b, Seq(7))]
    );
    assert_eq!(
        store.push_watches(other).await.expect("watches"),
        [(a, Seq(9))]
    );
    // Clearing one (and one that is not there) leaves the others.
    commit(store, vec![w(s, a, 3, false), w(s, a, 6, false)]).await;
    assert_eq!(
        store.push_watches(s).await.expect("watches"),
        [(a, Seq(5)), (b, Seq(2)), (b, Seq(7))]
    );
    commit(
        store,
        vec![
            w(s, a, 5, false),
            w(s, b, 2, false),
            w(s, b, 7, false),
            w(other, a, 9, false),
        ],
    )
    .await;
    assert!(store.push_watches(s).await.expect("watches").is_empty());
    assert!(store.push_watches(other).await.expect("watches").is_empty());
}

/// Outbox: put, scan in msg_id order, scan returns only its own shard, delete (also of an absent
/// entry), entries with no and with many recipients; a recipient list comes back in the order it
/// was written, a leading uid 0 included (the mark of an `@all` chunk, logic's `ALL_MARK`).
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
    let e1 = entry(1, vec![UserId(0), uid(base, 6, 3), uid(base, 6, 2)]);
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

fn group_desc(group: GroupId, owner: UserId, name: &str, announcement: &str) -> GroupDesc {
    GroupDesc {
        group,
        name: name.to_owned(),
        creator: owner,
        owner,
        announcement: announcement.to_owned(),
        created_ms: 1_700_000_000_000 + group.0 % 1000,
    }
}

fn member(uid: UserId, role: u8, joined_ms: u64) -> MemberRecord {
    MemberRecord {
        uid,
        role,
        joined_ms,
    }
}

fn member_put(group: GroupId, m: MemberRecord) -> Op {
    Op::MemberPut { group, member: m }
}

fn member_delete(group: GroupId, uid: UserId) -> Op {
    Op::MemberDelete { group, uid }
}

fn mute(uid: UserId, peer: u64, muted: bool) -> Op {
    Op::Mute { uid, peer, muted }
}

fn push_token(device_id: &str, provider: u8, token: &str) -> PushToken {
    PushToken {
        device_id: device_id.to_owned(),
        provider,
        token: token.to_owned(),
    }
}

async fn group<S: Store>(store: &S, g: GroupId) -> Option<GroupDesc> {
    store.group(g).await.expect("group failed")
}

async fn members_of<S: Store>(store: &S, g: GroupId) -> Vec<MemberRecord> {
    store.members(g).await.expect("members failed")
}

async fn member_uids<S: Store>(store: &S, g: GroupId) -> Vec<UserId> {
    members_of(store, g).await.iter().map(|m| m.uid).collect()
}

async fn groups_of<S: Store>(store: &S, uid: UserId) -> Vec<GroupId> {
    store.groups_of(uid).await.expect("groups_of failed")
}

async fn mutes_of<S: Store>(store: &S, uid: UserId) -> Vec<u64> {
    store.mutes(uid).await.expect("mutes failed")
}

async fn tokens_of<S: Store>(store: &S, uid: UserId) -> Vec<PushToken> {
    store.push_tokens(uid).await.expect("push_tokens failed")
}

/// Group info records: absent, round trip (also of the longest name and announcement and of
/// non-ASCII text), replace (also back to an empty announcement), per group, and the last of two
/// puts in one batch wins.
pub async fn group_info<S: Store>(store: &S, base: u64) {
    let (g1, g2, never) = (gid(base, 11, 0), gid(base, 11, 1), gid(base, 11, 2));
    let (alice, bob) = (uid(base, 11, 0), uid(base, 11, 1));
    assert_eq!(group(store, g1).await, None, "never written group");

    let d1 = group_desc(g1, alice, "家族 group", "");
    let d2 = GroupDesc {
        created_ms: u64::MAX,
        ..group_desc(
            g2,
            bob,
            &"n".repeat(MAX_NAME_LEN),
            &"公告".repeat(MAX_ANNOUNCEMENT_LEN / 6),
        )
    };
    commit(store, vec![Op::GroupPut(d1.clone())]).await;
    commit(store, vec![Op::GroupPut(d2.clone())]).await;
    assert_eq!(group(store, g1).await, Some(d1.clone()));
    assert_eq!(group(store, g2).await, Some(d2.clone()));
    assert_eq!(group(store, never).await, None, "neighbouring group id");

    // Replace: new owner, name and announcement; the creator and creation time are kept by the
    // caller, the store just keeps the latest record.
    let d1b = GroupDesc {
        owner: bob,
        name: "renamed".into(),
        announcement: "read the rules".into(),
        ..d1.clone()
    };
    commit(store, vec![Op::GroupPut(d1b.clone())]).await;
    assert_eq!(group(store, g1).await, Some(d1b.clone()), "replaced");
    assert_eq!(group(store, g2).await, Some(d2.clone()), "other group");
    let d1c = GroupDesc {
        announcement: String::new(),
        name: String::new(),
        ..d1b.clone()
    };
    commit(store, vec![Op::GroupPut(d1c.clone())]).await;
    assert_eq!(
        group(store, g1).await,
        Some(d1c),
        "replaced by empty strings"
    );

    // Two puts of one group in one batch: the later wins.
    let last = group_desc(g2, alice, "last", "wins");
    commit(
        store,
        vec![Op::GroupPut(d2.clone()), Op::GroupPut(last.clone())],
    )
    .await;
    assert_eq!(group(store, g2).await, Some(last), "later put in a batch");
    assert_eq!(group(store, never).await, None);
}

/// Group members: none for an unknown group, listed in uid order (also a uid above `i64::MAX`)
/// whatever the insertion order, role and joined_ms round trip (their whole range), update in
/// place, delete (also of a non-member), per group, and ops on one member in one batch act in
/// order.
pub async fn members<S: Store>(store: &S, base: u64) {
    let (g, other, never) = (gid(base, 12, 0), gid(base, 12, 1), gid(base, 12, 2));
    let u = |i| uid(base, 12, i);
    let top = UserId(high(base, 12, 0));
    assert!(members_of(store, g).await.is_empty());

    let m1 = member(u(1), ROLE_OWNER, 1_700_000_000_001);
    let m2 = member(u(2), ROLE_MEMBER, 0);
    let mmax = member(u(40), u8::MAX, u64::MAX);
    let mtop = member(top, ROLE_MEMBER, 1_700_000_000_004);
    commit(
        store,
        vec![member_put(g, mtop), member_put(g, mmax), member_put(g, m1)],
    )
    .await;
    commit(
        store,
        vec![
            member_put(g, m2),
            // The same uid in another group is another member record.
            member_put(other, member(u(1), ROLE_MEMBER, 5)),
        ],
    )
    .await;
    assert_eq!(
        members_of(store, g).await,
        vec![m1, m2, mmax, mtop],
        "uid order, unsigned"
    );
    assert_eq!(
        members_of(store, other).await,
        vec![member(u(1), ROLE_MEMBER, 5)]
    );
    assert!(members_of(store, never).await.is_empty(), "other group");

    // Update in place: one record per member.
    let m2b = member(u(2), ROLE_OWNER, 77);
    commit(store, vec![member_put(g, m2b)]).await;
    assert_eq!(members_of(store, g).await, vec![m1, m2b, mmax, mtop]);

    // Delete a member, a non-member, and the same uid in another group.
    commit(
        store,
        vec![
            member_delete(g, u(40)),
            member_delete(g, u(63)),
            member_delete(other, u(2)),
        ],
    )
    .await;
    assert_eq!(members_of(store, g).await, vec![m1, m2b, mtop]);
    commit(store, vec![member_delete(other, u(1))]).await;
    assert!(members_of(store, other).await.is_empty());
    assert_eq!(
        members_of(store, g).await,
        vec![m1, m2b, mtop],
        "delete in another group"
    );

    // Several ops on one member in one batch: the last one wins.
    let m3 = member(u(3), ROLE_MEMBER, 3);
    let m3b = member(u(3), ROLE_OWNER, 33);
    commit(
        store,
        vec![
            member_put(g, m3),
            member_put(g, m3b),
            member_put(g, mmax),
            member_delete(g, u(40)),
            member_delete(g, top),
            member_put(g, mtop),
        ],
    )
    .await;
    assert_eq!(
        members_of(store, g).await,
        vec![m1, m2b, m3b, mtop],
        "put, put; put, delete; delete, put"
    );
}

/// The `uid → groups` index follows MemberPut and MemberDelete: group id order (also above
/// `i64::MAX`), one user in several groups, several users in one group, an update does not
/// duplicate, a delete removes only its own entry, and a delete and a put of the same member in
/// one batch leave what the last op says (in `members` too).
pub async fn groups_of_index<S: Store>(store: &S, base: u64) {
    let (a, b, c) = (uid(base, 13, 0), uid(base, 13, 1), uid(base, 13, 2));
    let (g1, g2, g3) = (gid(base, 13, 1), gid(base, 13, 2), gid(base, 13, 3));
    let gtop = GroupId(high(base, 13, 0));
    assert!(groups_of(store, a).await.is_empty());

    commit(
        store,
        vec![
            member_put(gtop, member(a, ROLE_MEMBER, 1)),
            member_put(g3, member(a, ROLE_MEMBER, 1)),
            member_put(g1, member(a, ROLE_OWNER, 1)),
        ],
    )
    .await;
    commit(
        store,
        vec![
            member_put(g2, member(b, ROLE_OWNER, 2)),
            member_put(g2, member(a, ROLE_MEMBER, 2)),
        ],
    )
    .await;
    assert_eq!(
        groups_of(store, a).await,
        vec![g1, g2, g3, gtop],
        "group id order, unsigned"
    );
    assert_eq!(groups_of(store, b).await, vec![g2]);
    assert!(groups_of(store, c).await.is_empty(), "neighbouring uid");
    assert_eq!(member_uids(store, g2).await, vec![a, b]);

    // An update of the membership does not duplicate the index entry.
    commit(store, vec![member_put(g1, member(a, ROLE_MEMBER, 9))]).await;
    assert_eq!(groups_of(store, a).await, vec![g1, g2, g3, gtop]);

    // A delete removes exactly its own entry (also the index of a non-member is untouched).
    commit(
        store,
        vec![
            member_delete(g2, a),
            member_delete(g1, c),
            member_delete(g3, b),
        ],
    )
    .await;
    assert_eq!(groups_of(store, a).await, vec![g1, g3, gtop]);
    assert_eq!(groups_of(store, b).await, vec![g2], "other member kept");
    assert!(groups_of(store, c).await.is_empty());
    assert_eq!(member_uids(store, g2).await, vec![b]);

    // Delete then put of one member in one batch: a member again, in both directions.
    commit(
        store,
        vec![
            member_delete(g1, a),
            member_put(g1, member(a, ROLE_OWNER, 11)),
        ],
    )
    .await;
    assert_eq!(groups_of(store, a).await, vec![g1, g3, gtop], "delete, put");
    assert_eq!(members_of(store, g1).await, vec![member(a, ROLE_OWNER, 11)]);
    // Put then delete in one batch: not a member, in either direction.
    commit(
        store,
        vec![
            member_put(g3, member(a, ROLE_OWNER, 12)),
            member_put(g2, member(c, ROLE_MEMBER, 12)),
            member_delete(g3, a),
            member_delete(g2, c),
        ],
    )
    .await;
    assert_eq!(groups_of(store, a).await, vec![g1, gtop], "put, delete");
    assert!(groups_of(store, c).await.is_empty(), "put, delete");
    assert!(members_of(store, g3).await.is_empty());
    assert_eq!(member_uids(store, g2).await, vec![b]);

    // Leaving every group empties the index.
    commit(
        store,
        vec![
            member_delete(g1, a),
            member_delete(gtop, a),
            member_delete(g2, b),
        ],
    )
    .await;
    assert!(groups_of(store, a).await.is_empty());
    assert!(groups_of(store, b).await.is_empty());
    assert!(members_of(store, gtop).await.is_empty());
}

/// Mutes: none, ascending (0 = everything first, peers above `i64::MAX` last), muting twice keeps
/// one entry, unmute (also of a peer never muted, and of peer 0), per user, and mute/unmute of
/// one peer in one batch act in order.
/// Per-user settings: set, cleared, per user, ascending; setting one twice keeps one; clearing
/// one that is not set is harmless.
pub async fn user_flags<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 19, 0), uid(base, 19, 1));
    let flag = |uid, flag, on| Op::UserFlag { uid, flag, on };
    let flags = |u| async move { store.user_flags(u).await.expect("user_flags failed") };
    assert!(flags(a).await.is_empty());
    commit(
        store,
        vec![flag(a, 200, true), flag(a, 1, true), flag(b, 7, true)],
    )
    .await;
    commit(store, vec![flag(a, 1, true), flag(b, 9, false)]).await;
    assert_eq!(flags(a).await, vec![1, 200], "ascending, set once");
    assert_eq!(flags(b).await, vec![7]);
    commit(store, vec![flag(a, 1, false), flag(a, 200, true)]).await;
    assert_eq!(flags(a).await, vec![200], "cleared 1");
    assert_eq!(flags(b).await, vec![7], "other user");
}

pub async fn mutes<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 14, 0), uid(base, 14, 1));
    let top = high(base, 14, 0);
    let peer = uid(base, 14, 5).0;
    assert!(mutes_of(store, a).await.is_empty());

    commit(
        store,
        vec![mute(a, top, true), mute(a, 300, true), mute(a, peer, true)],
    )
    .await;
    commit(
        store,
        vec![mute(a, 0, true), mute(b, peer, true), mute(a, 300, true)],
    )
    .await;
    let mut want = vec![0, 300, peer, top];
    want.sort_unstable();
    assert_eq!(want[0], 0);
    assert_eq!(mutes_of(store, a).await, want, "ascending, unsigned");
    assert_eq!(mutes_of(store, b).await, vec![peer]);

    commit(
        store,
        vec![
            mute(a, 300, false),
            mute(a, 301, false),
            mute(b, top, false),
        ],
    )
    .await;
    want.retain(|&p| p != 300);
    assert_eq!(mutes_of(store, a).await, want, "unmuted 300");
    assert_eq!(mutes_of(store, b).await, vec![peer], "other user");

    commit(store, vec![mute(a, 0, false)]).await;
    want.retain(|&p| p != 0);
    assert_eq!(
        mutes_of(store, a).await,
        want,
        "unmuted everything (peer 0)"
    );

    // One batch: mute then unmute, unmute then mute.
    commit(
        store,
        vec![
            mute(a, 7, true),
            mute(a, 7, false),
            mute(a, top, false),
            mute(a, top, true),
            mute(a, 0, true),
            mute(a, 0, false),
            mute(a, 0, true),
        ],
    )
    .await;
    let mut want = vec![0, peer, top];
    want.sort_unstable();
    assert_eq!(mutes_of(store, a).await, want, "last op on a peer wins");
    assert_eq!(mutes_of(store, b).await, vec![peer]);
}

/// Push tokens: none, several devices in device id order (byte order: a device id that is a
/// prefix of another comes first), round trip of provider and the longest token, replace, delete
/// by an empty token (also of an unknown device), per user, and the last op on one device in a
/// batch wins.
pub async fn push_tokens<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 15, 0), uid(base, 15, 1));
    let put = |uid, t: &PushToken| Op::PushToken {
        uid,
        token: t.clone(),
    };
    let del = |uid, device: &str| Op::PushToken {
        uid,
        token: push_token(device, 1, ""),
    };
    assert!(tokens_of(store, a).await.is_empty());

    let phone = push_token("phone", 1, "apns-0123456789abcdef");
    let pad = push_token("pad", 2, "fcm:APA91b-pad");
    let pad2 = push_token("pad2", 3, &"t".repeat(MAX_PUSH_TOKEN_LEN));
    let web = push_token("网页-web", 3, "https://push.example.com/u/42");
    commit(store, vec![put(a, &web), put(a, &phone), put(a, &pad2)]).await;
    commit(store, vec![put(a, &pad), put(b, &phone)]).await;
    assert_eq!(
        tokens_of(store, a).await,
        vec![pad.clone(), pad2.clone(), phone.clone(), web.clone()],
        "device id order"
    );
    assert_eq!(tokens_of(store, b).await, vec![phone.clone()]);

    // Replace one device's registration (token and provider).
    let phone2 = push_token("phone", 2, "fcm:new-token");
    commit(store, vec![put(a, &phone2)]).await;
    assert_eq!(
        tokens_of(store, a).await,
        vec![pad.clone(), pad2.clone(), phone2.clone(), web.clone()],
        "replaced"
    );
    assert_eq!(tokens_of(store, b).await, vec![phone.clone()], "other user");

    // An empty token deletes (whatever its provider); unknown devices are a no-op.
    commit(store, vec![del(a, "pad"), del(a, "tablet"), del(b, "pad2")]).await;
    assert_eq!(
        tokens_of(store, a).await,
        vec![pad2.clone(), phone2.clone(), web.clone()],
        "deleted pad, not pad2"
    );
    assert_eq!(tokens_of(store, b).await, vec![phone.clone()]);

    // One batch: put then delete, delete then put, put then put.
    let pad3 = push_token("pad", 1, "apns-pad-again");
    commit(
        store,
        vec![
            put(a, &phone),
            del(a, "phone"),
            del(a, "pad"),
            put(a, &pad3),
            put(a, &web),
            put(a, &push_token("网页-web", 1, "latest")),
        ],
    )
    .await;
    assert_eq!(
        tokens_of(store, a).await,
        vec![pad3, pad2, push_token("网页-web", 1, "latest")],
        "last op on a device wins"
    );
    commit(store, vec![del(b, "phone")]).await;
    assert!(tokens_of(store, b).await.is_empty());
}

/// One commit mixing the group, member, mute and push-token ops with appends (a group created
/// with its members and the event announcing it), a dedup entry and removals of earlier state:
/// nothing of it is visible before the commit, all of it after.
pub async fn batch_atomicity_groups<S: Store>(store: &S, base: u64) {
    let owner = uid(base, 16, 0);
    let g = gid(base, 16, 0);
    let old = gid(base, 16, 1);
    let invited: Vec<UserId> = (1..BLOCK).map(|i| uid(base, 16, i)).collect();

    // Earlier state the batch removes or replaces.
    let old_desc = group_desc(old, owner, "old", "");
    let old_tok = push_token("old-phone", 1, "old");
    commit(
        store,
        vec![
            Op::GroupPut(old_desc.clone()),
            member_put(old, member(owner, ROLE_OWNER, 1)),
            member_put(old, member(invited[0], ROLE_MEMBER, 1)),
            mute(owner, old.0, true),
            Op::PushToken {
                uid: owner,
                token: old_tok.clone(),
            },
        ],
    )
    .await;

    let desc = group_desc(g, owner, "new group", "welcome");
    let event = |to: UserId, seq: u64| Message {
        conv: CONV_GROUP_EVENT,
        from: owner,
        to,
        ..message(to, seq, 0x6000 + seq, b"created")
    };
    let new_tok = push_token("phone", 2, "fcm:owner");
    let mut batch = WriteBatch::default();
    batch.push(Op::SeqBound {
        uid: owner,
        bound: Seq(1000),
    });
    batch.push(Op::GroupPut(desc.clone()));
    batch.push(member_put(g, member(owner, ROLE_OWNER, 2)));
    for &u in &invited {
        batch.push(member_put(g, member(u, ROLE_MEMBER, 2)));
    }
    batch.push(Op::Append {
        uid: owner,
        msg: event(owner, 1),
    });
    batch.push(Op::Append {
        uid: invited[0],
        msg: event(invited[0], 1),
    });
    batch.push(member_delete(old, invited[0]));
    batch.push(mute(owner, old.0, false));
    batch.push(mute(owner, g.0, true));
    batch.push(Op::PushToken {
        uid: owner,
        token: push_token("old-phone", 1, ""),
    });
    batch.push(Op::PushToken {
        uid: owner,
        token: new_tok.clone(),
    });
    batch.push(Op::Dedup {
        uid: owner,
        client_msg_id: 16,
        entry: DedupEntry {
            msg_id: MsgId(0x6001),
            seq: Seq(1),
            prev_seq: Seq(0),
            server_time_ms: 1,
        },
    });

    // Built but not committed: the earlier state only.
    assert_eq!(group(store, g).await, None);
    assert!(members_of(store, g).await.is_empty());
    assert_eq!(groups_of(store, owner).await, vec![old]);
    assert_eq!(groups_of(store, invited[0]).await, vec![old]);
    assert_eq!(mutes_of(store, owner).await, vec![old.0]);
    assert_eq!(tokens_of(store, owner).await, vec![old_tok]);
    assert_eq!(store.last_seq(owner).await.expect("last_seq"), Seq(0));

    store.commit(batch).await.expect("commit");
    assert_eq!(group(store, g).await, Some(desc));
    assert_eq!(group(store, old).await, Some(old_desc), "untouched");
    let mut want = vec![member(owner, ROLE_OWNER, 2)];
    want.extend(invited.iter().map(|&u| member(u, ROLE_MEMBER, 2)));
    assert_eq!(members_of(store, g).await, want);
    assert_eq!(member_uids(store, old).await, vec![owner]);
    assert_eq!(groups_of(store, owner).await, vec![g, old]);
    assert_eq!(groups_of(store, invited[0]).await, vec![g]);
    for &u in &invited[1..] {
        assert_eq!(groups_of(store, u).await, vec![g]);
    }
    assert_eq!(mutes_of(store, owner).await, vec![g.0]);
    assert_eq!(tokens_of(store, owner).await, vec![new_tok]);
    assert_eq!(timeline(store, owner, 0, 10).await, vec![event(owner, 1)]);
    assert_eq!(
        timeline(store, invited[0], 0, 10).await,
        vec![event(invited[0], 1)]
    );
    assert_eq!(store.seq_bound(owner).await.expect("seq_bound"), Seq(1000));
    assert!(store.dedup(owner, 16).await.expect("dedup").is_some());
}

/// Writer fences: a batch of a node below its fence is refused whole; the fence never goes down;
/// batches without a writer and batches of other nodes are not affected.
pub async fn writer_fence<S: Store>(store: &S, base: u64) {
    // One node id per base, so that runs on the same store do not see each other's fences.
    let node = 10_000u16.wrapping_add((base / BASE_STRIDE) as u16);
    let other = node.wrapping_add(1_000);
    let uid = UserId(base + 901);
    let w = |incarnation| Some(Writer { node, incarnation });
    let batch = |writer, bound| WriteBatch {
        ops: vec![Op::SeqBound {
            uid,
            bound: Seq(bound),
        }],
        writer,
    };
    // No fence yet: any incarnation writes.
    store
        .commit(batch(w(3), 10))
        .await
        .expect("unfenced commit");
    assert_eq!(store.fence(node, 5).await.expect("fence"), 5);
    // Below the fence: refused, nothing applied.
    match store.commit(batch(w(4), 20)).await {
        Err(StoreError::Fenced {
            node: n,
            incarnation: 4,
            fence: 5,
        }) if n == node => {}
        other => panic!("a commit of incarnation 4 under fence 5 gave {other:?}"),
    }
    assert_eq!(store.seq_bound(uid).await.expect("seq_bound"), Seq(10));
    // At and above the fence: accepted.
    store
        .commit(batch(w(5), 30))
        .await
        .expect("commit at the fence");
    store
        .commit(batch(w(6), 40))
        .await
        .expect("commit above the fence");
    assert_eq!(store.seq_bound(uid).await.expect("seq_bound"), Seq(40));
    // A lower fence changes nothing and reports the one in effect.
    assert_eq!(store.fence(node, 2).await.expect("lower fence"), 5);
    match store.commit(batch(w(4), 50)).await {
        Err(StoreError::Fenced { fence: 5, .. }) => {}
        other => panic!("the fence went down: {other:?}"),
    }
    // Other writers are unaffected.
    store.commit(batch(None, 60)).await.expect("no writer");
    store
        .commit(WriteBatch {
            writer: Some(Writer {
                node: other,
                incarnation: 1,
            }),
            ..batch(None, 70)
        })
        .await
        .expect("another node");
    assert_eq!(store.seq_bound(uid).await.expect("seq_bound"), Seq(70));
    // Raising it again fences the previous incarnation.
    assert_eq!(store.fence(node, 7).await.expect("fence 7"), 7);
    assert!(matches!(
        store.commit(batch(w(6), 80)).await,
        Err(StoreError::Fenced { fence: 7, .. })
    ));
    assert_eq!(store.seq_bound(uid).await.expect("seq_bound"), Seq(70));
}

/// Msg-id floors: 0 until set, replaced by a later op (also within one batch), independent per
/// generator, and part of the batch's atomicity.
pub async fn id_floor<S: Store>(store: &S, base: u64) {
    // Two generator ids per base, so that runs on the same store do not see each other's.
    let g = (2 * (base / BASE_STRIDE) % 1024) as u16;
    let h = g + 1;
    let floor = |gen| async move { store.id_floor(gen).await.expect("id_floor") };
    assert_eq!(floor(g).await, 0, "no floor yet");
    commit(
        store,
        vec![Op::IdFloor {
            generator: g,
            ms: 5_000,
        }],
    )
    .await;
    assert_eq!(floor(g).await, 5_000);
    assert_eq!(floor(h).await, 0, "another generator is unaffected");
    commit(
        store,
        vec![
            Op::IdFloor {
                generator: g,
                ms: 7_000,
            },
            Op::IdFloor {
                generator: h,
                ms: 1 << 41,
            },
            Op::IdFloor {
                generator: g,
                ms: 9_000,
            },
        ],
    )
    .await;
    assert_eq!(floor(g).await, 9_000, "the later op of a batch wins");
    assert_eq!(floor(h).await, 1 << 41, "large values round-trip");
    // A refused batch (fenced writer) changes no floor.
    let node = 20_000u16.wrapping_add((base / BASE_STRIDE) as u16);
    store.fence(node, 2).await.expect("fence");
    let r = store
        .commit(WriteBatch {
            ops: vec![Op::IdFloor {
                generator: g,
                ms: 11_000,
            }],
            writer: Some(Writer {
                node,
                incarnation: 1,
            }),
        })
        .await;
    assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
    assert_eq!(floor(g).await, 9_000);
}

/// The organisation tree's records ([`Op::OrgPut`], [`Store::org_records`]): read back in version
/// order, paged by `after` and `limit`; a record that replaces another removes it (also within one
/// batch, where the last op wins); tombstones round-trip; a fenced batch writes none. Versions of
/// this check are `base + 1 ..`, and only those below `base + BASE_STRIDE` are looked at, so runs at
/// other bases (and a shared cluster's other data) do not interfere.
pub async fn org_records<S: Store>(store: &S, base: u64) {
    let read = |after: u64, limit: usize| async move {
        store
            .org_records(after, limit)
            .await
            .expect("org_records")
            .into_iter()
            .filter(|r| r.version < base + BASE_STRIDE)
            .collect::<Vec<_>>()
    };
    let versions = |rs: &[OrgRecord]| rs.iter().map(|r| r.version - base).collect::<Vec<_>>();
    let dept = |v: u64, name: &str, deleted: bool| OrgRecord {
        version: base + v,
        deleted,
        entity: OrgEntity::Dept(OrgDept {
            id: base + 1,
            parent: base + 7,
            order: 3,
            hidden: true,
            name: name.into(),
        }),
    };
    let person = OrgRecord {
        version: base + 2,
        deleted: false,
        entity: OrgEntity::Person(OrgPerson {
            uid: u64::MAX - base,
            name: "名前 ✓".into(),
        }),
    };
    let member = OrgRecord {
        version: base + 3,
        deleted: false,
        entity: OrgEntity::Member(OrgMember {
            uid: u64::MAX - base,
            dept: base + 1,
            order: u32::MAX,
            title: "x".repeat(im_shared::org::MAX_TITLE_LEN),
        }),
    };
    assert!(read(base, 100).await.is_empty(), "no records yet");
    let put = |record: &OrgRecord, replaces: Option<u64>| Op::OrgPut {
        record: record.clone(),
        replaces: replaces.map(|v| base + v),
    };
    commit(
        store,
        vec![
            put(&member, None),
            put(&dept(1, "Storage", false), None),
            put(&person, None),
        ],
    )
    .await;
    let all = read(base, 100).await;
    assert_eq!(versions(&all), vec![1, 2, 3], "in version order");
    assert_eq!(
        all,
        vec![dept(1, "Storage", false), person.clone(), member.clone()]
    );
    assert_eq!(versions(&read(base, 2).await), vec![1, 2], "limit");
    assert_eq!(versions(&read(base + 2, 100).await), vec![3], "after");
    // A rename replaces the department's record.
    commit(store, vec![put(&dept(4, "Storage & Db", false), Some(1))]).await;
    let all = read(base, 100).await;
    assert_eq!(versions(&all), vec![2, 3, 4]);
    assert_eq!(all[2], dept(4, "Storage & Db", false));
    // Within one batch: 5 replaces 4, then a tombstone at 6 replaces 5.
    commit(
        store,
        vec![
            put(&dept(5, "again", false), Some(4)),
            put(&dept(6, "Storage & Db", true), Some(5)),
        ],
    )
    .await;
    let all = read(base, 100).await;
    assert_eq!(versions(&all), vec![2, 3, 6]);
    assert!(all[2].deleted, "the tombstone round-trips");
    // A fenced batch writes nothing.
    let node = 21_000u16.wrapping_add((base / BASE_STRIDE) as u16);
    store.fence(node, 2).await.expect("fence");
    let r = store
        .commit(WriteBatch {
            ops: vec![put(&dept(7, "fenced", false), Some(6))],
            writer: Some(Writer {
                node,
                incarnation: 1,
            }),
        })
        .await;
    assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
    assert_eq!(versions(&read(base, 100).await), vec![2, 3, 6]);
}

/// Large groups (read diffusion): the group timeline (ordered, ranged, its head), the per-user
/// index of large groups (ordered as unsigned ids, removed with the membership) and the read
/// cursor (last write wins).
pub async fn large_groups<S: Store>(store: &S, base: u64) {
    let (a, b) = (uid(base, 20, 0), uid(base, 20, 1));
    let (g1, g2) = (gid(base, 20, 1), gid(base, 20, 2));
    let gtop = GroupId(high(base, 20, 0));
    let post = |g: GroupId, seq: u64| Message {
        seq: Seq(seq),
        prev_seq: Seq(seq.saturating_sub(1)),
        msg_id: MsgId(base + 20 * BLOCK + seq),
        conv: im_shared::proto::CONV_C2G,
        from: a,
        to: UserId(g.0),
        client_msg_id: seq,
        server_time_ms: 1_700_000_000_000 + seq,
        body: Bytes::from(format!("post {seq}")),
    };
    assert_eq!(
        store.group_head(g1).await.expect("head"),
        Seq(0),
        "no posts"
    );
    assert!(store.large_groups_of(a).await.expect("index").is_empty());

    // Posts of two neighbouring groups, in two batches, out of order within one.
    commit(
        store,
        vec![
            Op::GroupAppend {
                group: g1,
                msg: post(g1, 2),
            },
            Op::GroupAppend {
                group: g1,
                msg: post(g1, 1),
            },
            Op::GroupAppend {
                group: g2,
                msg: post(g2, 1),
            },
        ],
    )
    .await;
    commit(
        store,
        vec![Op::GroupAppend {
            group: g1,
            msg: post(g1, 3),
        }],
    )
    .await;
    assert_eq!(store.group_head(g1).await.expect("head"), Seq(3));
    assert_eq!(
        store.group_head(g2).await.expect("head"),
        Seq(1),
        "neighbour"
    );
    let all = store.group_timeline(g1, Seq(0), 100).await.expect("range");
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    assert_eq!(all[1], post(g1, 2), "stored whole");
    let page = store.group_timeline(g1, Seq(1), 1).await.expect("range");
    assert_eq!(seqs(&page), vec![2], "after and limit");
    assert!(store
        .group_timeline(g1, Seq(3), 10)
        .await
        .expect("range")
        .is_empty());
    assert!(store
        .group_timeline(g1, Seq(u64::MAX), 10)
        .await
        .expect("range")
        .is_empty());
    assert!(store
        .group_timeline(g1, Seq(0), 0)
        .await
        .expect("range")
        .is_empty());

    // The index of large groups: unsigned order, per user, removed with the membership.
    commit(
        store,
        vec![
            member_put(gtop, member(a, ROLE_MEMBER, 1)),
            Op::LargeMember {
                group: gtop,
                uid: a,
                on: true,
            },
            member_put(g2, member(a, ROLE_MEMBER, 1)),
            Op::LargeMember {
                group: g2,
                uid: a,
                on: true,
            },
            member_put(g1, member(a, ROLE_MEMBER, 1)),
            Op::LargeMember {
                group: g1,
                uid: a,
                on: true,
            },
            member_put(g1, member(b, ROLE_MEMBER, 1)),
        ],
    )
    .await;
    assert_eq!(
        store.large_groups_of(a).await.expect("index"),
        vec![g1, g2, gtop]
    );
    assert!(
        store.large_groups_of(b).await.expect("index").is_empty(),
        "not marked"
    );
    assert_eq!(
        groups_of(store, a).await,
        vec![g1, g2, gtop],
        "also a member"
    );
    commit(store, vec![member_delete(g2, a)]).await;
    assert_eq!(
        store.large_groups_of(a).await.expect("index"),
        vec![g1, gtop]
    );
    assert_eq!(groups_of(store, a).await, vec![g1, gtop]);
    // Cleared alone (the user's shard), the membership stays.
    commit(
        store,
        vec![Op::LargeMember {
            group: gtop,
            uid: a,
            on: false,
        }],
    )
    .await;
    assert_eq!(store.large_groups_of(a).await.expect("index"), vec![g1]);
    assert_eq!(groups_of(store, a).await, vec![g1, gtop]);

    // The read cursor: 0 until written, then the last write, per (user, group).
    assert_eq!(store.group_read(a, g1).await.expect("read"), Seq(0));
    commit(
        store,
        vec![Op::GroupRead {
            uid: a,
            group: g1,
            seq: Seq(2),
        }],
    )
    .await;
    commit(
        store,
        vec![Op::GroupRead {
            uid: b,
            group: g1,
            seq: Seq(1),
        }],
    )
    .await;
    assert_eq!(store.group_read(a, g1).await.expect("read"), Seq(2));
    assert_eq!(store.group_read(b, g1).await.expect("read"), Seq(1));
    assert_eq!(
        store.group_read(a, g2).await.expect("read"),
        Seq(0),
        "other group"
    );
    commit(
        store,
        vec![Op::GroupRead {
            uid: a,
            group: g1,
            seq: Seq(3),
        }],
    )
    .await;
    assert_eq!(store.group_read(a, g1).await.expect("read"), Seq(3));
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_store::FjallStore;

    /// The whole suite on the embedded store, twice on one store (as
    /// `store/tests/store_conformance.rs` does), so that the suite's own crate tests it too.
    #[tokio::test]
    async fn fjall_passes_the_suite_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallStore::open(dir.path()).expect("open");
        run_all(&store).await;
        run_all_at(&store.clone(), 3 * BASE_STRIDE).await;
    }

    #[test]
    fn high_ids_stay_apart_and_above_i64_max() {
        for base in [BASE_STRIDE, 255 * BASE_STRIDE] {
            let h = high(base, 16, BLOCK - 1);
            assert!(h > i64::MAX as u64);
            assert!(h > uid(base, 16, BLOCK - 1).0);
            assert_ne!(high(base, 0, 0), high(base + BASE_STRIDE, 0, 0));
        }
    }
}
