//! Unit tests that need no server: the statements against the schema file and the row types,
//! the batch planning, the value encoding and the schema loader.

use std::collections::HashMap;

use bytes::Bytes;
use im_shared::org::{OrgDept, OrgEntity, OrgPerson, OrgRecord};
use im_shared::proto::{GroupDesc, Message};
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::statement::Consistency;
use scylla::value::CqlValue;

use super::batch::{merge, plan, Phase, DEFAULT_MAX_BATCH_BYTES, MAX_BATCH_STATEMENTS};
use super::rows::{b, cas_outcome, timeline_bucket, Cas, Row, MAX_ORDERED, TIMELINE_BUCKET_SEQS};
use super::schema::{check_keyspace, schema_statements, SCHEMA_CQL};
use super::statements::{
    CursorRow, Fence, FenceInsertValues, FenceRaiseValues, GroupRow, MemberRow, OrgRow,
    PushTokenRow, PushWatchRow, Read, TimelineOf,
};
use crate::{DedupEntry, MemberRecord, Op, OutboxEntry, PushToken, StoreError};
use im_shared::proto::CONV_C2C;
use scylla::frame::response::result::{
    CollectionType, ColumnSpec, ColumnType, NativeType, TableSpec,
};

fn msg(seq: u64, msg_id: u64, body: &[u8]) -> Message {
    Message {
        seq: Seq(seq),
        prev_seq: Seq(seq.saturating_sub(1)),
        msg_id: MsgId(msg_id),
        conv: CONV_C2C,
        from: UserId(1),
        to: UserId(2),
        client_msg_id: 7,
        server_time_ms: 1_700_000_000_000,
        body: Bytes::copy_from_slice(body),
    }
}

fn phases(rows: &[Row]) -> Vec<Phase> {
    rows.iter().map(Row::phase).collect()
}

#[test]
fn bucket_arithmetic() {
    assert_eq!(TIMELINE_BUCKET_SEQS, 100_000);
    assert_eq!(timeline_bucket(0), 0);
    assert_eq!(timeline_bucket(1), 0);
    assert_eq!(timeline_bucket(99_999), 0);
    assert_eq!(timeline_bucket(100_000), 1);
    assert_eq!(timeline_bucket(199_999), 1);
    assert_eq!(timeline_bucket(200_000), 2);
    assert_eq!(timeline_bucket(1 << 48), (1u64 << 48) / 100_000);
    // Buckets are monotonic in seq and every bucket holds exactly TIMELINE_BUCKET_SEQS seqs.
    for s in [
        0u64,
        12_345,
        99_999,
        100_000,
        4_294_967_296,
        MAX_ORDERED - 1,
    ] {
        assert!(timeline_bucket(s) <= timeline_bucket(s + 1));
        let b = timeline_bucket(s);
        assert!(b * TIMELINE_BUCKET_SEQS <= s && s < (b + 1) * TIMELINE_BUCKET_SEQS);
    }
    // Every storable seq has a storable bucket, and the bigint order is the numeric order.
    assert!(i64::try_from(timeline_bucket(MAX_ORDERED)).is_ok());
    assert!(b(timeline_bucket(99_999)) < b(timeline_bucket(100_000)));
    // Non-ordered columns round-trip all 64 bits.
    for v in [0u64, 1, MAX_ORDERED, MAX_ORDERED + 1, u64::MAX] {
        assert_eq!(b(v) as u64, v);
    }
}

#[test]
fn merge_later_op_wins_per_key() {
    let ops = vec![
        Op::SeqBound {
            uid: UserId(1),
            bound: Seq(10),
        },
        Op::Cursor {
            uid: UserId(1),
            device_id: "d".into(),
            seq: Seq(1),
        },
        Op::SeqBound {
            uid: UserId(2),
            bound: Seq(5),
        },
        Op::SeqBound {
            uid: UserId(1),
            bound: Seq(20),
        },
        Op::Cursor {
            uid: UserId(1),
            device_id: "d".into(),
            seq: Seq(3),
        },
        Op::Cursor {
            uid: UserId(1),
            device_id: "d2".into(),
            seq: Seq(4),
        },
    ];
    let rows = merge(ops).expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::SeqBound { uid: 1, bound: 20 },
            Row::Cursor {
                uid: 1,
                device_id: "d".into(),
                seq: 3
            },
            Row::SeqBound { uid: 2, bound: 5 },
            Row::Cursor {
                uid: 1,
                device_id: "d2".into(),
                seq: 4
            },
        ]
    );
}

#[test]
fn merge_outbox_put_and_delete_share_a_key() {
    let e = OutboxEntry {
        shard: ShardId(3),
        msg_id: MsgId(9),
        recipients: vec![UserId(4), UserId(u64::MAX)],
        msg: msg(1, 9, b"x"),
    };
    let del = Op::OutboxDelete {
        shard: ShardId(3),
        msg_id: MsgId(9),
    };
    let rows = merge(vec![Op::OutboxPut(e.clone()), del.clone()]).expect("merge");
    assert_eq!(
        rows,
        vec![Row::OutboxDelete {
            shard: 3,
            msg_id: 9
        }]
    );
    let rows = merge(vec![del, Op::OutboxPut(e.clone())]).expect("merge");
    assert_eq!(rows.len(), 1);
    match &rows[0] {
        Row::OutboxPut {
            shard,
            msg_id,
            recipients,
            msg: m,
        } => {
            assert_eq!((*shard, *msg_id), (3, 9));
            assert_eq!(recipients, &vec![4, -1]);
            assert_eq!(
                Message::decode(Bytes::from(m.clone())).expect("decode"),
                e.msg
            );
        }
        other => panic!("want a put, got {other:?}"),
    }
    // Same msg_id in another shard is another key.
    let rows = merge(vec![
        Op::OutboxPut(e),
        Op::OutboxDelete {
            shard: ShardId(4),
            msg_id: MsgId(9),
        },
    ])
    .expect("merge");
    assert_eq!(rows.len(), 2);
}

fn watch(shard: u16, uid: u64, seq: u64, on: bool) -> Op {
    Op::PushWatch {
        shard: ShardId(shard),
        uid: UserId(uid),
        seq: Seq(seq),
        on,
    }
}

#[test]
fn push_watch_set_and_clear_share_a_key() {
    // Set then cleared: the delete; cleared then set: the put; the last op wins.
    let rows = merge(vec![
        watch(3, 1, 4, true),
        watch(3, 1, 4, false),
        watch(3, 2, 7, false),
        watch(3, 2, 7, true),
        watch(3, 1, 4, true),
        watch(3, 1, 4, false),
    ])
    .expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::PushWatchDelete {
                shard: 3,
                uid: 1,
                seq: 4
            },
            Row::PushWatchPut {
                shard: 3,
                uid: 2,
                seq: 7
            },
        ]
    );
    // Another shard, uid or seq is another key; uids take every u64.
    let rows = merge(vec![
        watch(3, 1, 4, true),
        watch(4, 1, 4, false),
        watch(3, 2, 4, true),
        watch(3, 1, 5, false),
        watch(3, u64::MAX, MAX_ORDERED, true),
    ])
    .expect("merge");
    assert_eq!(rows.len(), 5);
    assert_eq!(
        rows[4],
        Row::PushWatchPut {
            shard: 3,
            uid: -1,
            seq: i64::MAX
        }
    );
    assert_eq!(
        phases(&rows),
        vec![
            Phase::PushWatchPut,
            Phase::PushWatchDelete,
            Phase::PushWatchPut,
            Phase::PushWatchDelete,
            Phase::PushWatchPut,
        ]
    );
}

#[test]
fn append_writes_bucket_index_and_timeline() {
    let uid = UserId(42);
    let m1 = msg(100_001, 500, b"a");
    let m2 = msg(100_002, 501, b"b");
    let replaced = msg(100_001, 502, b"c");
    let rows = merge(vec![
        Op::Append {
            uid,
            msg: m1.clone(),
        },
        Op::Append {
            uid,
            msg: m2.clone(),
        },
        Op::Append {
            uid,
            msg: replaced.clone(),
        },
    ])
    .expect("merge");
    // One bucket row for both seqs; the timeline row at 100_001 holds the later message; the
    // index keeps every msg_id (as the embedded store does).
    let buckets: Vec<_> = rows.iter().filter(|r| r.phase() == Phase::Bucket).collect();
    assert_eq!(buckets, vec![&Row::Bucket { uid: 42, bucket: 1 }]);
    let timeline: Vec<(i64, Message)> = rows
        .iter()
        .filter_map(|r| match r {
            Row::Timeline {
                uid: 42,
                bucket: 1,
                seq,
                msg,
            } => Some((
                *seq,
                Message::decode(Bytes::from(msg.clone())).expect("decode"),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(timeline, vec![(100_001, replaced), (100_002, m2)]);
    let idx: Vec<_> = rows
        .iter()
        .filter_map(|r| match r {
            Row::MsgIdx { msg_id, seq, .. } => Some((*msg_id, *seq)),
            _ => None,
        })
        .collect();
    assert_eq!(idx, vec![(500, 100_001), (501, 100_002), (502, 100_001)]);
}

#[test]
fn ordered_columns_refuse_values_above_i64_max() {
    let too_big = MAX_ORDERED + 1;
    for op in [
        Op::Append {
            uid: UserId(1),
            msg: msg(too_big, 1, b""),
        },
        Op::OutboxDelete {
            shard: ShardId(0),
            msg_id: MsgId(too_big),
        },
        Op::OutboxPut(OutboxEntry {
            shard: ShardId(0),
            msg_id: MsgId(u64::MAX),
            recipients: vec![],
            msg: msg(1, 1, b""),
        }),
        watch(0, 1, too_big, true),
        watch(0, 1, u64::MAX, false),
        // Not ordered, but stored non-negative so that the read can tell corruption.
        Op::IdFloor {
            generator: 1,
            ms: too_big,
        },
        org_put(too_big, "d", None),
        org_put(u64::MAX, "d", Some(1)),
        // The replaced version too.
        org_put(5, "d", Some(too_big)),
        // A large group's timeline is ordered by seq like a user's.
        Op::GroupAppend {
            group: GroupId(1),
            msg: msg(too_big, 1, b""),
        },
    ] {
        assert!(matches!(merge(vec![op]), Err(StoreError::Io(_))));
    }
    // Unordered columns take every u64.
    let rows = merge(vec![
        Op::Dedup {
            uid: UserId(u64::MAX),
            client_msg_id: u64::MAX,
            entry: DedupEntry {
                msg_id: MsgId(u64::MAX),
                seq: Seq(u64::MAX - 1),
                server_time_ms: u64::MAX - 2,
                prev_seq: Seq(3),
            },
        },
        Op::SeqBound {
            uid: UserId(1),
            bound: Seq(u64::MAX),
        },
        Op::Append {
            uid: UserId(1),
            msg: msg(MAX_ORDERED, u64::MAX, b""),
        },
    ])
    .expect("merge");
    assert_eq!(rows.len(), 5, "dedup, bound, and bucket + index + timeline");
}

#[test]
fn id_floor_rows_merge_per_generator() {
    let f = |generator, ms| Op::IdFloor { generator, ms };
    let rows = merge(vec![
        f(3, 5_000),
        f(4, 1 << 41),
        f(3, 9_000),
        f(u16::MAX, MAX_ORDERED),
    ])
    .expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::IdFloor {
                generator: 3,
                ms: 9_000
            },
            Row::IdFloor {
                generator: 4,
                ms: 1 << 41
            },
            Row::IdFloor {
                generator: 65_535,
                ms: i64::MAX
            },
        ]
    );
    assert!(rows.iter().all(|r| r.phase() == Phase::IdFloor));
    // A generator and a uid with the same number are different keys.
    let rows = merge(vec![
        f(1, 7),
        Op::SeqBound {
            uid: UserId(1),
            bound: Seq(7),
        },
    ])
    .expect("merge");
    assert_eq!(rows.len(), 2);
}

/// The floor is pushed last by the worker but written first: when a commit is split, it is
/// in the first chunk, durable no later than any message whose id it covers.
#[test]
fn id_floor_goes_in_the_first_chunk() {
    let ops = round_ops();
    assert!(matches!(ops.last(), Some(Op::IdFloor { .. })));
    for max in [1, 60, 100, 200, DEFAULT_MAX_BATCH_BYTES] {
        let chunks = plan(ops.clone(), max).expect("plan");
        assert_eq!(
            chunks[0][0],
            Row::IdFloor {
                generator: 3,
                ms: 1 << 41
            },
            "max {max}"
        );
        let floors = chunks
            .iter()
            .flatten()
            .filter(|r| r.phase() == Phase::IdFloor)
            .count();
        assert_eq!(floors, 1, "max {max}");
    }
}

/// The ops logic writes for one c2c send, plus a recipient append and its push watch, a cursor,
/// an outbox delete and a push-watch clear from earlier rounds, and the msg-id floor the worker
/// raises at the end of a round, in the worker's order.
fn round_ops() -> Vec<Op> {
    let m = msg(7, 77, b"hello");
    vec![
        Op::SeqBound {
            uid: UserId(1),
            bound: Seq(10_000),
        },
        Op::Append {
            uid: UserId(1),
            msg: m.clone(),
        },
        Op::Dedup {
            uid: UserId(1),
            client_msg_id: 5,
            entry: DedupEntry {
                msg_id: MsgId(77),
                seq: Seq(7),
                server_time_ms: 1,
                prev_seq: Seq(3),
            },
        },
        Op::OutboxPut(OutboxEntry {
            shard: ShardId(2),
            msg_id: MsgId(77),
            recipients: vec![UserId(2)],
            msg: m.clone(),
        }),
        Op::OutboxDelete {
            shard: ShardId(2),
            msg_id: MsgId(60),
        },
        Op::Cursor {
            uid: UserId(1),
            device_id: "phone".into(),
            seq: Seq(6),
        },
        Op::Append {
            uid: UserId(3),
            msg: msg(3, 66, b"in"),
        },
        watch(5, 3, 3, true),
        watch(5, 3, 1, false),
        Op::IdFloor {
            generator: 3,
            ms: 1 << 41,
        },
    ]
}

#[test]
fn plan_orders_rows_so_that_every_prefix_is_safe() {
    let chunks = plan(round_ops(), DEFAULT_MAX_BATCH_BYTES).expect("plan");
    assert_eq!(chunks.len(), 1, "a small round is one logged batch");
    let p = phases(&chunks[0]);
    let mut sorted = p.clone();
    sorted.sort();
    assert_eq!(p, sorted, "rows in phase order");
    assert_eq!(
        p,
        vec![
            Phase::IdFloor,
            Phase::SeqBound,
            Phase::Bucket,
            Phase::Bucket,
            Phase::OutboxPut,
            Phase::Timeline,
            Phase::Timeline,
            Phase::PushWatchPut,
            Phase::MsgIdx,
            Phase::MsgIdx,
            Phase::Cursor,
            Phase::OutboxDelete,
            Phase::PushWatchDelete,
            Phase::Dedup,
        ]
    );
    // Within a phase, op order: uid 1's timeline row before uid 3's.
    let uids: Vec<i64> = chunks[0]
        .iter()
        .filter_map(|r| match r {
            Row::Timeline { uid, .. } => Some(*uid),
            _ => None,
        })
        .collect();
    assert_eq!(uids, vec![1, 3]);
}

#[test]
fn plan_splits_by_size_in_phase_order() {
    let all = plan(round_ops(), DEFAULT_MAX_BATCH_BYTES)
        .expect("plan")
        .remove(0);
    // One row per chunk when the bound is below every row's size.
    let singles = plan(round_ops(), 1).expect("plan");
    assert_eq!(singles.len(), all.len());
    assert!(singles.iter().all(|c| c.len() == 1));
    let flat: Vec<Row> = singles.into_iter().flatten().collect();
    assert_eq!(flat, all, "splitting keeps the order");

    // A bound in between: chunks respect it (except a lone oversized row), and
    // concatenated they are the single-batch plan.
    for max in [60, 100, 150, 200, 400] {
        let chunks = plan(round_ops(), max).expect("plan");
        assert!(chunks.len() > 1, "max {max}");
        for c in &chunks {
            let size: usize = c.iter().map(Row::size).sum();
            assert!(c.len() == 1 || size <= max, "chunk of {size} > {max}");
        }
        let flat: Vec<Row> = chunks.into_iter().flatten().collect();
        assert_eq!(flat, all, "max {max}");
    }
}

#[test]
fn plan_splits_by_statement_count() {
    let ops: Vec<Op> = (0..(MAX_BATCH_STATEMENTS as u64 * 2 + 10))
        .map(|i| Op::SeqBound {
            uid: UserId(i + 1),
            bound: Seq(i),
        })
        .collect();
    let chunks = plan(ops, usize::MAX).expect("plan");
    let lens: Vec<usize> = chunks.iter().map(Vec::len).collect();
    assert_eq!(lens, vec![MAX_BATCH_STATEMENTS, MAX_BATCH_STATEMENTS, 10]);
}

#[test]
fn plan_of_large_bodies() {
    // 20 sends of 60 KiB: timeline + outbox rows of ~60 KiB each, ~2.4 MB in all.
    let mut ops = Vec::new();
    for i in 0..20u64 {
        let m = msg(i + 1, 1000 + i, &vec![i as u8; 60 * 1024]);
        ops.push(Op::Append {
            uid: UserId(1),
            msg: m.clone(),
        });
        ops.push(Op::OutboxPut(OutboxEntry {
            shard: ShardId(1),
            msg_id: MsgId(1000 + i),
            recipients: vec![UserId(2)],
            msg: m,
        }));
    }
    let chunks = plan(ops, DEFAULT_MAX_BATCH_BYTES).expect("plan");
    assert!(chunks.len() >= 5, "{} chunks", chunks.len());
    for c in &chunks {
        let size: usize = c.iter().map(Row::size).sum();
        assert!(size <= DEFAULT_MAX_BATCH_BYTES);
    }
    let p: Vec<Phase> = chunks.iter().flatten().map(Row::phase).collect();
    let mut sorted = p.clone();
    sorted.sort();
    assert_eq!(p, sorted, "phase order across chunks");
    assert_eq!(
        p.len(),
        1 + 20 + 20 + 20,
        "one bucket, 20 outbox, timeline, index"
    );
}

fn group(gid: u64, name: &str) -> GroupDesc {
    GroupDesc {
        group: GroupId(gid),
        name: name.into(),
        creator: UserId(1),
        owner: UserId(u64::MAX),
        announcement: String::new(),
        created_ms: 5,
    }
}

fn member_put(gid: u64, uid: u64, role: u8) -> Op {
    Op::MemberPut {
        group: GroupId(gid),
        member: MemberRecord {
            uid: UserId(uid),
            role,
            joined_ms: u64::MAX,
        },
    }
}

fn member_delete(gid: u64, uid: u64) -> Op {
    Op::MemberDelete {
        group: GroupId(gid),
        uid: UserId(uid),
    }
}

fn token_op(uid: u64, device: &str, provider: u8, token: &str) -> Op {
    Op::PushToken {
        uid: UserId(uid),
        token: PushToken {
            device_id: device.into(),
            provider,
            token: token.into(),
        },
    }
}

#[test]
fn member_ops_write_the_row_and_the_index() {
    let rows = merge(vec![member_put(7, 3, 2)]).expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::UserGroupPut { uid: 3, gid: 7 },
            Row::MemberPut {
                gid: 7,
                uid: 3,
                role: 2,
                joined_ms: -1
            },
        ]
    );
    // A delete also removes the user's large-group index entry (as the embedded store does).
    let rows = merge(vec![member_delete(7, 3)]).expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::UserGroupDelete { uid: 3, gid: 7 },
            Row::MemberDelete { gid: 7, uid: 3 },
            Row::UserLargeGroupDelete { uid: 3, gid: 7 },
        ]
    );
    // Every u64 fits: ids are stored as their 64 bits, and sorted after reading.
    let rows = merge(vec![member_put(u64::MAX, u64::MAX - 1, u8::MAX)]).expect("merge");
    assert_eq!(
        rows[1],
        Row::MemberPut {
            gid: -1,
            uid: -2,
            role: 255,
            joined_ms: -1
        }
    );
}

#[test]
fn member_put_and_delete_share_keys() {
    // Delete then put: the member is back, in both tables; a put does not touch the large-group
    // index, so the delete's removal of it stays.
    let rows = merge(vec![member_delete(7, 3), member_put(7, 3, 0)]).expect("merge");
    assert_eq!(
        phases(&rows),
        vec![
            Phase::UserGroupPut,
            Phase::MemberPut,
            Phase::UserLargeGroupDelete
        ],
        "{rows:?}"
    );
    // Put then delete: gone from both (and from the large-group index).
    let rows = merge(vec![member_put(7, 3, 0), member_delete(7, 3)]).expect("merge");
    assert_eq!(
        phases(&rows),
        vec![
            Phase::UserGroupDelete,
            Phase::MemberDelete,
            Phase::UserLargeGroupDelete
        ]
    );
    // Put, put: the later record.
    let rows = merge(vec![member_put(7, 3, 0), member_put(7, 3, 2)]).expect("merge");
    assert!(matches!(rows[1], Row::MemberPut { role: 2, .. }));
    // The same uid in two groups, two uids in one group: two keys per put, three per delete.
    let rows = merge(vec![
        member_put(7, 3, 0),
        member_put(8, 3, 0),
        member_put(7, 4, 0),
        member_delete(8, 4),
    ])
    .expect("merge");
    assert_eq!(rows.len(), 9);
    // A user-group index key is (uid, gid), a member key (gid, uid): uid 7 in group 3 is not
    // uid 3 in group 7.
    let rows = merge(vec![member_put(7, 3, 0), member_delete(3, 7)]).expect("merge");
    assert_eq!(rows.len(), 5);
}

#[test]
fn group_put_replaces_within_a_batch() {
    let rows = merge(vec![
        Op::GroupPut(group(9, "first")),
        Op::GroupPut(group(10, "other")),
        Op::GroupPut(group(9, "second")),
    ])
    .expect("merge");
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0],
        Row::GroupPut {
            gid: 9,
            name: "second".into(),
            creator: 1,
            owner: -1,
            announcement: String::new(),
            created_ms: 5,
        }
    );
}

#[test]
fn mute_false_and_empty_token_are_deletes_of_the_same_key() {
    let m = |peer, muted| Op::Mute {
        uid: UserId(1),
        peer,
        muted,
    };
    let rows = merge(vec![
        m(0, true),
        m(0, false),
        m(u64::MAX, false),
        m(u64::MAX, true),
    ])
    .expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::MuteDelete { uid: 1, peer: 0 },
            Row::MutePut { uid: 1, peer: -1 },
        ]
    );
    let rows = merge(vec![
        token_op(1, "phone", 1, "a"),
        token_op(1, "phone", 3, ""),
        token_op(1, "pad", 2, ""),
        token_op(1, "pad", 2, "b"),
        token_op(2, "pad", 2, "c"),
    ])
    .expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::PushTokenDelete {
                uid: 1,
                device_id: "phone".into()
            },
            Row::PushTokenPut {
                uid: 1,
                device_id: "pad".into(),
                provider: 2,
                token: "b".into()
            },
            Row::PushTokenPut {
                uid: 2,
                device_id: "pad".into(),
                provider: 2,
                token: "c".into()
            },
        ]
    );
}

#[test]
fn plan_orders_group_rows_before_messages_and_dedup_last() {
    let mut ops = round_ops();
    ops.extend([
        token_op(1, "phone", 1, "t"),
        member_delete(5, 9),
        Op::Mute {
            uid: UserId(1),
            peer: 5,
            muted: true,
        },
        member_put(5, 1, 2),
        Op::GroupPut(group(5, "g")),
        token_op(1, "pad", 1, ""),
        Op::Mute {
            uid: UserId(1),
            peer: 6,
            muted: false,
        },
    ]);
    let chunks = plan(ops.clone(), DEFAULT_MAX_BATCH_BYTES).expect("plan");
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        phases(&chunks[0]),
        vec![
            Phase::IdFloor,
            Phase::SeqBound,
            Phase::GroupPut,
            Phase::UserGroupPut,
            Phase::MemberPut,
            Phase::MemberDelete,
            Phase::UserGroupDelete,
            Phase::UserLargeGroupDelete,
            Phase::Bucket,
            Phase::Bucket,
            Phase::OutboxPut,
            Phase::Timeline,
            Phase::Timeline,
            Phase::PushWatchPut,
            Phase::MsgIdx,
            Phase::MsgIdx,
            Phase::Cursor,
            Phase::MutePut,
            Phase::MuteDelete,
            Phase::PushTokenPut,
            Phase::PushTokenDelete,
            Phase::OutboxDelete,
            Phase::PushWatchDelete,
            Phase::Dedup,
        ]
    );
    // Split into single statements: same order.
    let flat: Vec<Row> = plan(ops, 1).expect("plan").into_iter().flatten().collect();
    assert_eq!(flat, chunks[0]);
}

fn org_dept(version: u64, name: &str) -> OrgRecord {
    OrgRecord {
        version,
        deleted: false,
        entity: OrgEntity::Dept(OrgDept {
            id: 3,
            parent: 0,
            order: 1,
            hidden: false,
            name: name.into(),
        }),
    }
}

fn org_put(version: u64, name: &str, replaces: Option<u64>) -> Op {
    Op::OrgPut {
        record: org_dept(version, name),
        replaces,
    }
}

fn org_put_row(version: u64, name: &str) -> Row {
    Row::OrgPut {
        version: b(version),
        record: org_dept(version, name).to_bytes().to_vec(),
    }
}

/// An org put writes its version and deletes the one it replaces (another key); ops on one
/// version merge (the later wins), as in the embedded store.
#[test]
fn org_put_merges_per_version() {
    // v5, then v6 replacing v5, in one batch: v5's put becomes its delete.
    let rows = merge(vec![org_put(5, "a", None), org_put(6, "b", Some(5))]).expect("merge");
    assert_eq!(
        rows,
        vec![Row::OrgDelete { version: 5 }, org_put_row(6, "b")]
    );
    // A replacement chain: only the last version is put, the others deleted.
    let rows = merge(vec![
        org_put(5, "a", Some(4)),
        org_put(6, "b", Some(5)),
        org_put(7, "c", Some(6)),
    ])
    .expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::OrgDelete { version: 4 },
            Row::OrgDelete { version: 5 },
            Row::OrgDelete { version: 6 },
            org_put_row(7, "c"),
        ]
    );
    // A delete then a put of the same version: the put (later) wins.
    let rows = merge(vec![org_put(6, "b", Some(5)), org_put(5, "a", None)]).expect("merge");
    assert_eq!(rows, vec![org_put_row(5, "a"), org_put_row(6, "b")]);
    // A record never deletes itself; no replaced version, no delete.
    assert_eq!(
        merge(vec![org_put(8, "x", Some(8))]).expect("merge"),
        vec![org_put_row(8, "x")]
    );
    // Other entities at other versions are other keys; the bytes are the record's encoding.
    let person = OrgRecord {
        version: 9,
        deleted: true,
        entity: OrgEntity::Person(OrgPerson {
            uid: u64::MAX,
            name: "p".into(),
        }),
    };
    let rows = merge(vec![
        org_put(8, "x", None),
        Op::OrgPut {
            record: person.clone(),
            replaces: None,
        },
    ])
    .expect("merge");
    assert_eq!(rows.len(), 2);
    match &rows[1] {
        Row::OrgPut { version, record } => {
            assert_eq!(*version, 9);
            assert_eq!(
                OrgRecord::decode(Bytes::from(record.clone())).expect("decode"),
                person
            );
        }
        other => panic!("{other:?}"),
    }
    // The largest storable version is stored as it is.
    assert_eq!(
        merge(vec![org_put(MAX_ORDERED, "m", None)]).expect("merge"),
        vec![org_put_row(MAX_ORDERED, "m")]
    );
}

/// Org puts go with the records, early; the deletes of the versions they replace go with the
/// other deletes, before the dedup entries: split anywhere, a replaced record is deleted only
/// once its replacement is durable.
#[test]
fn plan_orders_org_puts_before_the_deletes_they_replace() {
    let mut ops = round_ops();
    ops.extend([
        org_put(11, "n", Some(10)),
        Op::GroupPut(group(5, "g")),
        org_put(12, "m", Some(2)),
    ]);
    let chunks = plan(ops.clone(), DEFAULT_MAX_BATCH_BYTES).expect("plan");
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        phases(&chunks[0]),
        vec![
            Phase::IdFloor,
            Phase::SeqBound,
            Phase::GroupPut,
            Phase::OrgPut,
            Phase::OrgPut,
            Phase::Bucket,
            Phase::Bucket,
            Phase::OutboxPut,
            Phase::Timeline,
            Phase::Timeline,
            Phase::PushWatchPut,
            Phase::MsgIdx,
            Phase::MsgIdx,
            Phase::Cursor,
            Phase::OutboxDelete,
            Phase::PushWatchDelete,
            Phase::OrgDelete,
            Phase::OrgDelete,
            Phase::Dedup,
        ]
    );
    // Within a phase, op order.
    let org: Vec<&Row> = chunks[0]
        .iter()
        .filter(|r| matches!(r, Row::OrgPut { .. } | Row::OrgDelete { .. }))
        .collect();
    assert_eq!(
        org,
        vec![
            &org_put_row(11, "n"),
            &org_put_row(12, "m"),
            &Row::OrgDelete { version: 10 },
            &Row::OrgDelete { version: 2 },
        ]
    );
    // Split into single statements: same order, every put before every delete.
    let flat: Vec<Row> = plan(ops, 1).expect("plan").into_iter().flatten().collect();
    assert_eq!(flat, chunks[0]);
}

fn large_member(gid: u64, uid: u64, on: bool) -> Op {
    Op::LargeMember {
        group: GroupId(gid),
        uid: UserId(uid),
        on,
    }
}

/// A post of large group `gid` at the group's `seq`.
fn group_post(gid: u64, seq: u64, body: &[u8]) -> Message {
    Message {
        to: UserId(gid),
        ..msg(seq, 9_000 + seq, body)
    }
}

fn group_append(gid: u64, seq: u64) -> Op {
    Op::GroupAppend {
        group: GroupId(gid),
        msg: group_post(gid, seq, b"post"),
    }
}

fn group_read(uid: u64, gid: u64, seq: u64) -> Op {
    Op::GroupRead {
        uid: UserId(uid),
        group: GroupId(gid),
        seq: Seq(seq),
    }
}

/// `LargeMember` on/off are the put and the delete of one `user_large_groups` key, which a
/// `MemberDelete` deletes too: the later op wins, as in the embedded store.
#[test]
fn large_member_set_clear_and_member_delete_share_a_key() {
    let rows = merge(vec![
        large_member(7, 3, true),
        large_member(7, 3, false),
        large_member(8, 3, false),
        large_member(8, 3, true),
    ])
    .expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::UserLargeGroupDelete { uid: 3, gid: 7 },
            Row::UserLargeGroupPut { uid: 3, gid: 8 },
        ]
    );
    // Set, then the member is deleted: gone from the index too.
    let rows = merge(vec![large_member(7, 3, true), member_delete(7, 3)]).expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::UserLargeGroupDelete { uid: 3, gid: 7 },
            Row::UserGroupDelete { uid: 3, gid: 7 },
            Row::MemberDelete { gid: 7, uid: 3 },
        ]
    );
    // Deleted, then set again (a re-added member whose event came in the same batch): set.
    let rows = merge(vec![member_delete(7, 3), large_member(7, 3, true)]).expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::UserGroupDelete { uid: 3, gid: 7 },
            Row::MemberDelete { gid: 7, uid: 3 },
            Row::UserLargeGroupPut { uid: 3, gid: 7 },
        ]
    );
    // The key is (uid, gid), its own: not the reverse pair, not the user-group index's (a member
    // put leaves the large-group entry alone); ids take every u64.
    let rows = merge(vec![
        large_member(7, 3, true),
        large_member(3, 7, true),
        member_put(7, 3, 0),
        large_member(u64::MAX, u64::MAX - 1, true),
    ])
    .expect("merge");
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0], Row::UserLargeGroupPut { uid: 3, gid: 7 });
    assert_eq!(rows[4], Row::UserLargeGroupPut { uid: -2, gid: -1 });
}

/// A large group's post writes its bucket row and its timeline row, nothing of a user's
/// timeline; posts at one seq merge (the later wins), as user timeline rows do.
#[test]
fn group_append_writes_bucket_and_timeline() {
    let g = u64::MAX;
    let replaced = group_post(g, 100_001, b"again");
    let rows = merge(vec![
        group_append(g, 100_001),
        group_append(g, 100_002),
        Op::GroupAppend {
            group: GroupId(g),
            msg: replaced.clone(),
        },
        group_append(5, 100_001),
    ])
    .expect("merge");
    // Group ids take every u64 (a partition key, never ordered).
    let buckets: Vec<_> = rows
        .iter()
        .filter(|r| r.phase() == Phase::GroupBucket)
        .collect();
    assert_eq!(
        buckets,
        vec![
            &Row::GroupBucket { gid: -1, bucket: 1 },
            &Row::GroupBucket { gid: 5, bucket: 1 }
        ]
    );
    let posts: Vec<(i64, i64, i64, Message)> = rows
        .iter()
        .filter_map(|r| match r {
            Row::GroupTimeline {
                gid,
                bucket,
                seq,
                msg,
            } => Some((
                *gid,
                *bucket,
                *seq,
                Message::decode(Bytes::from(msg.clone())).expect("decode"),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        posts,
        vec![
            (-1, 1, 100_001, replaced),
            (-1, 1, 100_002, group_post(g, 100_002, b"post")),
            (5, 1, 100_001, group_post(5, 100_001, b"post")),
        ]
    );
    assert_eq!(rows.len(), 2 + 3, "two buckets, three posts, nothing else");
    // A group and a user with the same id are different keys.
    let rows = merge(vec![
        Op::Append {
            uid: UserId(5),
            msg: msg(1, 1, b"u"),
        },
        group_append(5, 1),
    ])
    .expect("merge");
    assert_eq!(
        phases(&rows),
        vec![
            Phase::Bucket,
            Phase::MsgIdx,
            Phase::Timeline,
            Phase::GroupBucket,
            Phase::GroupTimeline
        ]
    );
    // The largest storable seq is stored as it is, in its bucket.
    let rows = merge(vec![group_append(1, MAX_ORDERED)]).expect("merge");
    assert_eq!(
        rows[0],
        Row::GroupBucket {
            gid: 1,
            bucket: b(timeline_bucket(MAX_ORDERED))
        }
    );
    assert!(matches!(rows[1], Row::GroupTimeline { seq: i64::MAX, .. }));
}

/// The read cursor of a large group is a plain value per (uid, gid): the later write wins
/// within a batch (also a lower seq), as for device cursors.
#[test]
fn group_read_later_write_wins_like_cursor() {
    let rows = merge(vec![
        group_read(1, 5, 9),
        group_read(2, 5, 1),
        group_read(1, 5, 3),
        group_read(1, 6, 4),
        group_read(5, 1, 8),
        Op::Cursor {
            uid: UserId(1),
            device_id: "5".into(),
            seq: Seq(7),
        },
    ])
    .expect("merge");
    assert_eq!(
        rows,
        vec![
            Row::GroupRead {
                uid: 1,
                gid: 5,
                seq: 3
            },
            Row::GroupRead {
                uid: 2,
                gid: 5,
                seq: 1
            },
            Row::GroupRead {
                uid: 1,
                gid: 6,
                seq: 4
            },
            Row::GroupRead {
                uid: 5,
                gid: 1,
                seq: 8
            },
            Row::Cursor {
                uid: 1,
                device_id: "5".into(),
                seq: 7
            },
        ]
    );
    // Every u64, like a device cursor (read back as the same bits).
    assert_eq!(
        merge(vec![group_read(u64::MAX, u64::MAX, u64::MAX)]).expect("merge"),
        vec![Row::GroupRead {
            uid: -1,
            gid: -1,
            seq: -1
        }]
    );
}

/// Large-group rows in a round: the index entries with the user-group index (before the
/// memberships and every timeline row), the group's posts after the users' timeline rows and
/// fan-outs and before the dedup entries, the read cursors with the device cursors.
#[test]
fn plan_orders_large_group_rows() {
    let mut ops = round_ops();
    ops.extend([
        group_read(1, 5, 2),
        group_append(5, 1),
        large_member(5, 3, true),
        member_put(5, 3, 0),
        large_member(6, 3, false),
        member_delete(7, 4),
    ]);
    let chunks = plan(ops.clone(), DEFAULT_MAX_BATCH_BYTES).expect("plan");
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        phases(&chunks[0]),
        vec![
            Phase::IdFloor,
            Phase::SeqBound,
            Phase::UserGroupPut,
            Phase::UserLargeGroupPut,
            Phase::MemberPut,
            Phase::MemberDelete,
            Phase::UserGroupDelete,
            Phase::UserLargeGroupDelete,
            Phase::UserLargeGroupDelete,
            Phase::Bucket,
            Phase::Bucket,
            Phase::OutboxPut,
            Phase::Timeline,
            Phase::Timeline,
            Phase::PushWatchPut,
            Phase::MsgIdx,
            Phase::MsgIdx,
            Phase::GroupBucket,
            Phase::GroupTimeline,
            Phase::Cursor,
            Phase::GroupRead,
            Phase::OutboxDelete,
            Phase::PushWatchDelete,
            Phase::Dedup,
        ]
    );
    // Within a phase, op order: the cleared entry (uid 3, group 6) before the member delete's.
    let deletes: Vec<&Row> = chunks[0]
        .iter()
        .filter(|r| r.phase() == Phase::UserLargeGroupDelete)
        .collect();
    assert_eq!(
        deletes,
        vec![
            &Row::UserLargeGroupDelete { uid: 3, gid: 6 },
            &Row::UserLargeGroupDelete { uid: 4, gid: 7 },
        ]
    );
    // Split into single statements, or at any bound: same order.
    let flat: Vec<Row> = plan(ops.clone(), 1)
        .expect("plan")
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(flat, chunks[0]);
    for max in [60, 100, 200] {
        let flat: Vec<Row> = plan(ops.clone(), max)
            .expect("plan")
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(flat, chunks[0], "max {max}");
    }
}

/// Large groups' posts are split by size like user timeline rows: a round of big posts becomes
/// several logged batches, each under the bound, buckets before posts.
#[test]
fn plan_of_large_group_posts() {
    let ops: Vec<Op> = (1..=20u64)
        .map(|seq| Op::GroupAppend {
            group: GroupId(9),
            msg: group_post(9, seq, &vec![seq as u8; 60 * 1024]),
        })
        .collect();
    let chunks = plan(ops, DEFAULT_MAX_BATCH_BYTES).expect("plan");
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    for c in &chunks {
        let size: usize = c.iter().map(Row::size).sum();
        assert!(size <= DEFAULT_MAX_BATCH_BYTES);
    }
    let p: Vec<Phase> = chunks.iter().flatten().map(Row::phase).collect();
    assert_eq!(p[0], Phase::GroupBucket, "one bucket row, first");
    assert!(p[1..].iter().all(|x| *x == Phase::GroupTimeline));
    assert_eq!(p.len(), 1 + 20);
}

/// A user's timeline and a large group's are read with the same statements on their own
/// tables (see `ScyllaStore::head` and `ScyllaStore::range`).
#[test]
fn user_and_group_timelines_are_read_alike() {
    let ks = "im";
    for tl in [TimelineOf::User, TimelineOf::Group] {
        let (t, bt) = (tl.table(), tl.bucket_table());
        let from = tl.buckets_from().cql(ks);
        assert!(
            from.starts_with(&format!("SELECT bucket FROM {ks}.{bt} WHERE ")),
            "{from}"
        );
        assert!(from.ends_with(" AND bucket >= ?"), "{from}");
        let desc = tl.buckets_desc().cql(ks);
        assert!(
            desc.starts_with(&format!("SELECT bucket FROM {ks}.{bt} WHERE ")),
            "{desc}"
        );
        assert!(desc.ends_with(" ORDER BY bucket DESC"), "{desc}");
        let after = tl.after().cql(ks);
        assert!(
            after.starts_with(&format!("SELECT seq, msg FROM {ks}.{t} WHERE ")),
            "{after}"
        );
        assert!(
            after.ends_with(" AND bucket = ? AND seq > ? LIMIT ?"),
            "{after}"
        );
        let last = tl.last().cql(ks);
        assert!(
            last.starts_with(&format!("SELECT seq FROM {ks}.{t} WHERE ")),
            "{last}"
        );
        assert!(
            last.ends_with(" AND bucket = ? ORDER BY seq DESC LIMIT 1"),
            "{last}"
        );
        // Scans page, the last-entry read is a point read.
        assert!(tl.buckets_from().page_size().is_some());
        assert!(tl.buckets_desc().page_size().is_some());
        assert!(tl.after().page_size().is_some());
        assert_eq!(tl.last().page_size(), None);
    }
    // The group's statements are the user's on the group's tables, keyed by gid.
    let group = |r: Read| r.cql(ks).replace("im.timeline", "im.group_timeline");
    for (user, grp) in [
        (Read::BucketsFrom, Read::GroupBucketsFrom),
        (Read::BucketsDesc, Read::GroupBucketsDesc),
        (Read::TimelineAfter, Read::GroupTimelineAfter),
        (Read::TimelineLast, Read::GroupTimelineLast),
    ] {
        assert_eq!(group(user).replace("uid = ?", "gid = ?"), grp.cql(ks));
    }
    assert_eq!(
        Read::LargeGroups.cql(ks),
        "SELECT gid FROM im.user_large_groups WHERE uid = ?"
    );
    assert_eq!(
        Read::GroupCursor.cql(ks),
        "SELECT seq FROM im.group_reads WHERE uid = ? AND gid = ?"
    );
    assert!(Read::LargeGroups.page_size().is_some(), "a scan");
    assert_eq!(Read::GroupCursor.page_size(), None, "a point read");
}

/// Columns (name, CQL type), primary key and partition key columns of every table of the
/// schema file.
struct Table {
    columns: Vec<(String, String)>,
    key: Vec<String>,
    partition: Vec<String>,
}

fn schema_tables(ks: &str) -> HashMap<String, Table> {
    let mut tables = HashMap::new();
    for stmt in &schema_statements(ks, 1).expect("schema")[1..] {
        let rest = stmt
            .strip_prefix(&format!("CREATE TABLE IF NOT EXISTS {ks}."))
            .expect("table");
        let (name, body) = rest.split_once(" (").expect("body");
        let (cols, key) = body.split_once("PRIMARY KEY (").expect("primary key");
        let columns = cols
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                let (n, t) = c.split_once(' ').expect("name type");
                (n.to_owned(), t.trim().to_owned())
            })
            .collect();
        let partition = key
            .trim_start_matches('(')
            .split(')')
            .next()
            .expect("partition key")
            .split(',')
            .map(|k| k.trim().to_owned())
            .collect();
        let key = key
            .split(')')
            .take_while(|part| !part.trim().is_empty())
            .flat_map(|part| part.split(','))
            .map(|k| k.trim_matches(|c: char| c == '(' || c.is_whitespace()))
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        tables.insert(
            name.to_owned(),
            Table {
                columns,
                key,
                partition,
            },
        );
    }
    tables
}

fn column_type(cql: &str) -> ColumnType<'static> {
    match cql {
        "bigint" => ColumnType::Native(NativeType::BigInt),
        "int" => ColumnType::Native(NativeType::Int),
        "smallint" => ColumnType::Native(NativeType::SmallInt),
        "text" => ColumnType::Native(NativeType::Text),
        "blob" => ColumnType::Native(NativeType::Blob),
        "frozen<list<bigint>>" => ColumnType::Collection {
            frozen: true,
            typ: CollectionType::List(Box::new(ColumnType::Native(NativeType::BigInt))),
        },
        other => panic!("column type {other} unknown to this test"),
    }
}

fn specs(ks: &str, table: &str, t: &Table, names: &[&str]) -> Vec<ColumnSpec<'static>> {
    names
        .iter()
        .map(|n| {
            let (_, typ) = t
                .columns
                .iter()
                .find(|(c, _)| c == n)
                .unwrap_or_else(|| panic!("{table} has no column {n}"));
            ColumnSpec::owned(
                (*n).to_owned(),
                column_type(typ),
                TableSpec::owned(ks.to_owned(), table.to_owned()),
            )
        })
        .collect()
}

/// Every op kind, so that merging yields a row of every phase.
fn every_kind_of_op() -> Vec<Op> {
    let mut ops = round_ops();
    ops.extend([
        org_put(9, "d", Some(4)),
        Op::GroupPut(group(5, "g")),
        member_put(5, 1, 2),
        member_delete(6, 1),
        Op::Mute {
            uid: UserId(1),
            peer: 5,
            muted: true,
        },
        Op::Mute {
            uid: UserId(1),
            peer: 6,
            muted: false,
        },
        Op::UserFlag {
            uid: UserId(1),
            flag: 1,
            on: true,
        },
        Op::UserFlag {
            uid: UserId(1),
            flag: 2,
            on: false,
        },
        token_op(1, "phone", 1, "t"),
        token_op(1, "pad", 1, ""),
        large_member(5, 1, true),
        large_member(7, 1, false),
        group_append(5, 1),
        group_read(1, 5, 1),
    ]);
    ops
}

#[test]
fn phase_and_read_lists_are_complete() {
    for (i, p) in Phase::ALL.iter().enumerate() {
        assert_eq!(*p as usize, i, "{p:?}");
    }
    assert_eq!(Phase::ALL.len(), Phase::Dedup as usize + 1);
    for (i, r) in Read::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i, "{r:?}");
    }
    assert_eq!(Read::ALL.len(), Read::Fence as usize + 1);
    for (i, f) in Fence::ALL.iter().enumerate() {
        assert_eq!(*f as usize, i, "{f:?}");
    }
    assert_eq!(Fence::ALL.len(), Fence::Raise as usize + 1);
    let rows = merge(every_kind_of_op()).expect("merge");
    let seen: std::collections::HashSet<Phase> = rows.iter().map(Row::phase).collect();
    assert_eq!(
        seen.len(),
        Phase::ALL.len(),
        "a row of every phase: {seen:?}"
    );
}

/// Each write statement against the schema file: its table and columns exist, it has one
/// bind marker per column, an insert sets the whole primary key and a delete names exactly
/// it, and a [`Row`] of its phase serializes against those columns (count and CQL types,
/// as the driver checks them against the prepared metadata).
#[test]
fn write_statements_match_the_schema_and_the_rows() {
    let ks = "im_t";
    let tables = schema_tables(ks);
    let t = &tables["timeline"];
    assert_eq!(
        (t.key.len(), t.partition.len()),
        (3, 2),
        "parsed the schema"
    );
    assert_eq!(tables["group_info"].partition, vec!["gid".to_owned()]);
    let rows = merge(every_kind_of_op()).expect("merge");
    for phase in Phase::ALL {
        let cql = phase.cql(ks);
        let markers = cql.matches('?').count();
        let (table, names): (&str, Vec<&str>) =
            if let Some(rest) = cql.strip_prefix(&format!("INSERT INTO {ks}.")) {
                let (table, rest) = rest.split_once(" (").expect("columns");
                let (cols, values) = rest.split_once(") VALUES (").expect("values");
                let names: Vec<&str> = cols.split(',').map(str::trim).collect();
                assert_eq!(values.matches('?').count(), names.len(), "{cql}");
                (table, names)
            } else if let Some(rest) = cql.strip_prefix(&format!("DELETE FROM {ks}.")) {
                let (table, cond) = rest.split_once(" WHERE ").expect("where");
                let names: Vec<&str> = cond
                    .split(" AND ")
                    .map(|c| c.strip_suffix(" = ?").expect("equality"))
                    .collect();
                (table, names)
            } else {
                panic!("unexpected write {cql}");
            };
        assert_eq!(markers, names.len(), "{cql}");
        let t = tables
            .get(table)
            .unwrap_or_else(|| panic!("no table {table}"));
        for k in &t.key {
            assert!(names.contains(&k.as_str()), "{cql} misses key column {k}");
        }
        if cql.starts_with("DELETE") {
            assert_eq!(names.len(), t.key.len(), "a delete of whole rows: {cql}");
        }
        let specs = specs(ks, table, t, &names);
        let row = rows
            .iter()
            .find(|r| r.phase() == phase)
            .expect("a row of the phase");
        let mut buf = Vec::new();
        let mut w = RowWriter::new(&mut buf);
        row.serialize(&RowSerializationContext::from_specs(&specs), &mut w)
            .unwrap_or_else(|e| panic!("{row:?} against {cql}: {e}"));
        assert_eq!(w.value_count(), names.len(), "{cql}");
    }
}

/// Each read statement against the schema file: the columns exist, the whole partition key
/// is bound (single-partition reads), and the Rust row type the code deserializes into
/// accepts the selected columns.
#[test]
fn read_statements_match_the_schema_and_the_row_types() {
    let ks = "im_t";
    let tables = schema_tables(ks);
    for read in Read::ALL {
        let cql = read.cql(ks);
        let rest = cql.strip_prefix("SELECT ").expect("select");
        let (cols, rest) = rest.split_once(&format!(" FROM {ks}.")).expect("from");
        let (table, cond) = rest.split_once(" WHERE ").expect("where");
        let t = tables
            .get(table)
            .unwrap_or_else(|| panic!("no table {table}"));
        let names: Vec<&str> = cols.split(',').map(str::trim).collect();
        let specs = specs(ks, table, t, &names);
        let cond = cond.split(" ORDER BY ").next().expect("cond");
        let cond = cond.split(" LIMIT ").next().expect("cond");
        let bound: Vec<&str> = cond
            .split(" AND ")
            .map(|c| c.split(' ').next().expect("column"))
            .collect();
        for k in &t.partition {
            assert!(
                bound.contains(&k.as_str()),
                "{cql} does not bind partition key {k}"
            );
        }
        let checked = match read {
            Read::SeqBound
            | Read::BucketsFrom
            | Read::BucketsDesc
            | Read::TimelineLast
            | Read::MsgIdx
            | Read::Cursor
            | Read::UserGroups
            | Read::Mutes
            | Read::IdFloor
            | Read::LargeGroups
            | Read::GroupBucketsFrom
            | Read::GroupBucketsDesc
            | Read::GroupTimelineLast
            | Read::GroupCursor
            | Read::Fence => <(i64,)>::type_check(&specs),
            Read::Flags => <(i16,)>::type_check(&specs),
            Read::TimelineAfter | Read::GroupTimelineAfter => <(i64, Vec<u8>)>::type_check(&specs),
            Read::Dedup => <(i64, i64, i64, i64)>::type_check(&specs),
            Read::Outbox => <(i64, Option<Vec<i64>>, Vec<u8>)>::type_check(&specs),
            Read::Group => GroupRow::type_check(&specs),
            Read::Members => MemberRow::type_check(&specs),
            Read::PushTokens => PushTokenRow::type_check(&specs),
            Read::Cursors => CursorRow::type_check(&specs),
            Read::PushWatches => PushWatchRow::type_check(&specs),
            Read::OrgAfter => OrgRow::type_check(&specs),
        };
        checked.unwrap_or_else(|e| panic!("{cql}: {e}"));
    }
}

/// The fence LWTs against the schema file: conditional statements on existing columns, the
/// insert sets the whole primary key, the update names exactly it in its WHERE clause and
/// conditions a non-key column, and the values the code binds ([`FenceInsertValues`],
/// [`FenceRaiseValues`]) serialize against the bound columns in marker order.
#[test]
fn fence_statements_match_the_schema_and_the_values() {
    let ks = "im_t";
    let tables = schema_tables(ks);
    assert_eq!(tables["writer_fence"].key, vec!["node".to_owned()]);
    for fence in Fence::ALL {
        let cql = fence.cql(ks);
        let markers = cql.matches('?').count();
        // Bound columns in marker order.
        let (table, names): (&str, Vec<&str>) =
            if let Some(rest) = cql.strip_prefix(&format!("INSERT INTO {ks}.")) {
                let rest = rest
                    .strip_suffix(" IF NOT EXISTS")
                    .unwrap_or_else(|| panic!("not conditional: {cql}"));
                let (table, rest) = rest.split_once(" (").expect("columns");
                let (cols, values) = rest.split_once(") VALUES (").expect("values");
                let names: Vec<&str> = cols.split(',').map(str::trim).collect();
                let values = values.strip_suffix(')').expect("values end");
                assert!(values.split(", ").all(|v| v == "?"), "{cql}");
                assert_eq!(values.matches('?').count(), names.len(), "{cql}");
                let t = &tables[table];
                for k in &t.key {
                    assert!(names.contains(&k.as_str()), "{cql} misses key column {k}");
                }
                (table, names)
            } else if let Some(rest) = cql.strip_prefix(&format!("UPDATE {ks}.")) {
                let (table, rest) = rest.split_once(" SET ").expect("set");
                let (set, rest) = rest.split_once(" WHERE ").expect("where");
                let (cond, when) = rest
                    .split_once(" IF ")
                    .unwrap_or_else(|| panic!("not conditional: {cql}"));
                let eq = |c: &'static str| {
                    move |part: &str| -> String {
                        part.strip_suffix(" = ?")
                            .unwrap_or_else(|| panic!("{c}: {part}"))
                            .to_owned()
                    }
                };
                let set: Vec<String> = set.split(", ").map(eq("set")).collect();
                let key: Vec<String> = cond.split(" AND ").map(eq("where")).collect();
                let when: Vec<String> = when.split(" AND ").map(eq("if")).collect();
                let t = &tables[table];
                assert_eq!(key, t.key, "{cql} names the whole key");
                for c in set.iter().chain(&when) {
                    assert!(!t.key.contains(c), "{cql}: {c} is a key column");
                }
                let names = set
                    .iter()
                    .chain(&key)
                    .chain(&when)
                    .map(|n| {
                        t.columns
                            .iter()
                            .find(|(c, _)| c == n)
                            .map(|(c, _)| c.as_str())
                            .unwrap_or_else(|| panic!("{table} has no column {n}"))
                    })
                    .collect();
                (table, names)
            } else {
                panic!("unexpected fence statement {cql}");
            };
        assert_eq!(markers, names.len(), "{cql}");
        assert_eq!(table, "writer_fence");
        let t = &tables[table];
        let specs = specs(ks, table, t, &names);
        let ctx = RowSerializationContext::from_specs(&specs);
        let mut buf = Vec::new();
        let mut w = RowWriter::new(&mut buf);
        let res = match fence {
            Fence::Insert => {
                let v: FenceInsertValues = (7, b(u64::MAX));
                v.serialize(&ctx, &mut w)
            }
            Fence::Raise => {
                let v: FenceRaiseValues = (b(9), 7, b(8));
                v.serialize(&ctx, &mut w)
            }
        };
        res.unwrap_or_else(|e| panic!("values of {cql}: {e}"));
        assert_eq!(w.value_count(), names.len(), "{cql}");
    }
}

#[test]
fn fence_read_is_serial_and_the_rest_are_not() {
    for read in Read::ALL {
        let want = (read == Read::Fence).then_some(Consistency::LocalSerial);
        assert_eq!(read.consistency(), want, "{read:?}");
    }
    assert_eq!(Read::Fence.page_size(), None, "a point read");
    assert_eq!(Read::IdFloor.page_size(), None, "a point read");
    assert!(Read::Cursors.page_size().is_some(), "a scan");
    assert!(Read::PushWatches.page_size().is_some(), "a scan");
    assert!(Read::OrgAfter.page_size().is_some(), "a scan");
    assert_eq!(
        Read::OrgAfter.cql("im"),
        "SELECT version, record FROM im.org_records WHERE org = ? AND version > ? LIMIT ?"
    );
    assert_eq!(
        Read::Cursors.cql("im"),
        "SELECT device_id, seq FROM im.cursor WHERE uid = ?"
    );
    assert_eq!(
        Read::PushWatches.cql("im"),
        "SELECT uid, seq FROM im.push_watch WHERE shard = ?"
    );
    assert_eq!(
        Read::IdFloor.cql("im"),
        "SELECT ms FROM im.id_floor WHERE generator = ?"
    );
    assert!(Read::Fence
        .cql("im")
        .ends_with("FROM im.writer_fence WHERE node = ?"));
}

#[test]
fn cas_results_of_scylla_and_cassandra() {
    let t = || Some(CqlValue::Boolean(true));
    let f = || Some(CqlValue::Boolean(false));
    let node = || Some(CqlValue::Int(3));
    let inc = |v: i64| Some(CqlValue::BigInt(v));
    let ins = "fence insert";
    // Scylla: the old row always, null when there was none.
    let scylla = ["[applied]", "node", "incarnation"];
    assert_eq!(
        cas_outcome(&scylla, &[t(), None, None], ins).unwrap(),
        Cas::Applied
    );
    assert_eq!(
        cas_outcome(&scylla, &[f(), node(), inc(5)], ins).unwrap(),
        Cas::NotApplied(Some(5))
    );
    assert_eq!(
        cas_outcome(&scylla, &[t(), node(), inc(5)], ins).unwrap(),
        Cas::Applied
    );
    // Every u64 round-trips through the bigint.
    assert_eq!(
        cas_outcome(&scylla, &[f(), node(), inc(-1)], ins).unwrap(),
        Cas::NotApplied(Some(u64::MAX))
    );
    // Cassandra: [applied] alone when applied, the condition's columns when not.
    assert_eq!(
        cas_outcome(&["[applied]"], &[t()], ins).unwrap(),
        Cas::Applied
    );
    assert_eq!(
        cas_outcome(&["[applied]", "incarnation"], &[f(), inc(2)], ins).unwrap(),
        Cas::NotApplied(Some(2))
    );
    // Not applied without the column: the caller reads the fence.
    assert_eq!(
        cas_outcome(&["[applied]"], &[f()], ins).unwrap(),
        Cas::NotApplied(None)
    );
    // Not an LWT result, or a wrong type.
    assert!(cas_outcome(&["incarnation"], &[inc(1)], ins).is_err());
    assert!(cas_outcome(&["[applied]"], &[None], ins).is_err());
    assert!(cas_outcome(&["[applied]", "incarnation"], &[f(), node()], ins).is_err());
}

#[test]
fn empty_plan() {
    assert!(plan(Vec::new(), 1).expect("plan").is_empty());
}

#[test]
fn keyspace_names() {
    for ok in ["im", "im_test_0123abcd", "a", &"k".repeat(48)] {
        assert!(check_keyspace(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "Im",
        "1im",
        "_im",
        "im-test",
        "im;drop",
        "im.x",
        &"k".repeat(49),
    ] {
        assert!(check_keyspace(bad).is_err(), "{bad}");
    }
}

#[test]
fn schema_file_is_loaded_for_any_keyspace() {
    let stmts = schema_statements("im_test_1", 1).expect("schema");
    assert_eq!(
        stmts[0],
        "CREATE KEYSPACE IF NOT EXISTS im_test_1 WITH replication = \
         {'class': 'NetworkTopologyStrategy', 'replication_factor': 1} \
         AND durable_writes = true"
    );
    let tables: Vec<&str> = stmts[1..]
        .iter()
        .map(|s| {
            let rest = s
                .strip_prefix("CREATE TABLE IF NOT EXISTS im_test_1.")
                .expect("table in the keyspace");
            rest.split([' ', '(']).next().expect("name")
        })
        .collect();
    assert_eq!(
        tables,
        vec![
            "timeline",
            "timeline_bucket",
            "msgidx",
            "seq_bound",
            "id_floor",
            "dedup",
            "cursor",
            "outbox",
            "push_watch",
            "group_info",
            "group_members",
            "user_groups",
            "user_large_groups",
            "group_timeline",
            "group_timeline_bucket",
            "group_reads",
            "mutes",
            "user_flags",
            "push_tokens",
            "org_records",
            "writer_fence"
        ]
    );
    for s in &stmts {
        assert!(
            !s.contains("--") && !s.contains(';') && !s.contains('\n'),
            "{s}"
        );
        assert!(!s.contains(" im."), "keyspace replaced: {s}");
    }
    // The key layout the statements rely on.
    let table = |name: &str| {
        stmts
            .iter()
            .find(|s| s.contains(&format!("im_test_1.{name} (")))
            .expect("table")
            .clone()
    };
    assert!(table("timeline").contains("PRIMARY KEY ((uid, bucket), seq)"));
    assert!(table("timeline_bucket").contains("PRIMARY KEY ((uid), bucket)"));
    assert!(table("msgidx").contains("PRIMARY KEY ((uid, msg_id))"));
    assert!(table("seq_bound").contains("PRIMARY KEY ((uid))"));
    assert!(table("id_floor").contains("PRIMARY KEY ((generator))"));
    assert!(table("id_floor").contains("generator int"));
    assert!(table("id_floor").contains("ms bigint"));
    assert!(table("dedup").contains("PRIMARY KEY ((uid, client_msg_id))"));
    assert!(table("dedup").contains("default_time_to_live = 604800"));
    assert!(table("cursor").contains("PRIMARY KEY ((uid), device_id)"));
    assert!(table("outbox").contains("PRIMARY KEY ((shard), msg_id)"));
    assert!(table("outbox").contains("recipients frozen<list<bigint>>"));
    assert!(table("push_watch").contains("PRIMARY KEY ((shard), uid, seq)"));
    assert!(table("push_watch").contains("shard int"));
    assert!(table("push_watch").contains("CLUSTERING ORDER BY (uid ASC, seq ASC)"));
    assert!(table("push_watch").contains("default_time_to_live = 86400"));
    assert!(table("group_info").contains("PRIMARY KEY ((gid))"));
    assert!(table("group_members").contains("PRIMARY KEY ((gid), uid)"));
    assert!(table("group_members").contains("role smallint"));
    assert!(table("user_groups").contains("PRIMARY KEY ((uid), gid)"));
    assert!(table("user_large_groups").contains("PRIMARY KEY ((uid), gid)"));
    assert!(table("group_timeline").contains("PRIMARY KEY ((gid, bucket), seq)"));
    assert!(table("group_timeline").contains("msg blob"));
    assert!(table("group_timeline").contains("CLUSTERING ORDER BY (seq ASC)"));
    assert!(table("group_timeline_bucket").contains("PRIMARY KEY ((gid), bucket)"));
    assert!(table("group_timeline_bucket").contains("CLUSTERING ORDER BY (bucket ASC)"));
    assert!(table("group_reads").contains("PRIMARY KEY ((uid), gid)"));
    assert!(table("group_reads").contains("seq bigint"));
    assert!(table("mutes").contains("PRIMARY KEY ((uid), peer)"));
    assert!(table("push_tokens").contains("PRIMARY KEY ((uid), device_id)"));
    assert!(table("push_tokens").contains("provider smallint"));
    assert!(table("push_tokens").contains("push_token text"));
    assert!(table("org_records").contains("PRIMARY KEY ((org), version)"));
    assert!(table("org_records").contains("org int"));
    assert!(table("org_records").contains("version bigint"));
    assert!(table("org_records").contains("record blob"));
    assert!(table("org_records").contains("CLUSTERING ORDER BY (version ASC)"));
    assert!(table("writer_fence").contains("PRIMARY KEY ((node))"));
    assert!(table("writer_fence").contains("node int"));
    assert!(table("writer_fence").contains("incarnation bigint"));

    // cqlsh splits the file too: keep semicolons out of comments.
    for line in SCHEMA_CQL.lines() {
        if let Some((_, comment)) = line.split_once("--") {
            assert!(!comment.contains(';'), "semicolon in a comment: {line}");
        }
    }

    let prod = schema_statements("im", 3).expect("schema");
    assert!(prod[0].contains("'replication_factor': 3"));
    assert!(prod[1].starts_with("CREATE TABLE IF NOT EXISTS im.timeline ("));
    assert!(schema_statements("im", 0).is_err());
    assert!(schema_statements("bad-name", 1).is_err());
}
