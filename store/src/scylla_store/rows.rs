//! The row model: how values are stored in columns, the [`Row`]s a commit writes (one per
//! statement, with its [`Key`] and estimated size) and their serialization, and the decoding of
//! result rows.

use im_shared::proto::Message;
use scylla::deserialize::row::DeserializeRow;
use scylla::response::query_result::QueryRowsResult;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use scylla::value::CqlValue;

use super::batch::Phase;
use crate::StoreError;

/// Seqs per timeline partition: the timeline of `uid` is partitioned by `(uid, seq / this)`.
/// Fixed for the life of the data (changing it makes existing rows unreachable).
pub(super) const TIMELINE_BUCKET_SEQS: u64 = 100_000;

/// Largest value a column whose order matters may hold (seq, bucket, outbox msg_id, push-watch
/// seq, org version, group timeline seq and bucket).
pub(super) const MAX_ORDERED: u64 = i64::MAX as u64;

/// Bucket (second partition-key column) of `seq` in a timeline: a user's (`timeline`) or a
/// large group's (`group_timeline`), both partitioned the same way.
pub(super) fn timeline_bucket(seq: u64) -> u64 {
    seq / TIMELINE_BUCKET_SEQS
}

/// The one partition of `org_records` (one company per deployment): the whole tree in one
/// partition, clustered by version, so that [`Store::org_records`] is a range read of it.
///
/// [`Store::org_records`]: crate::Store::org_records
pub(super) const ORG_PARTITION: i32 = 0;

/// A u64 stored in a bigint column whose order does not matter (same 64 bits).
pub(super) fn b(v: u64) -> i64 {
    v as i64
}

/// A u64 stored in a bigint column whose order matters: must not exceed `i64::MAX`.
pub(super) fn ordered(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::Io(format!(
            "{what} {v} above {MAX_ORDERED} cannot be stored in order"
        ))
    })
}

/// A msg-id time floor as stored: a non-negative bigint, so that a negative one read back is
/// corrupt rather than a huge floor. Real floors are far below (a msg_id holds 42 bits of ms).
pub(super) fn id_floor_ms(ms: u64) -> Result<i64, StoreError> {
    i64::try_from(ms).map_err(|_| {
        StoreError::Io(format!(
            "msg-id time floor {ms} above {MAX_ORDERED} cannot be stored"
        ))
    })
}

/// One statement's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Row {
    IdFloor {
        generator: i32,
        ms: i64,
    },
    SeqBound {
        uid: i64,
        bound: i64,
    },
    Bucket {
        uid: i64,
        bucket: i64,
    },
    OutboxPut {
        shard: i32,
        msg_id: i64,
        recipients: Vec<i64>,
        msg: Vec<u8>,
    },
    Timeline {
        uid: i64,
        bucket: i64,
        seq: i64,
        msg: Vec<u8>,
    },
    MsgIdx {
        uid: i64,
        msg_id: i64,
        seq: i64,
    },
    PushWatchPut {
        shard: i32,
        uid: i64,
        seq: i64,
    },
    Cursor {
        uid: i64,
        device_id: String,
        seq: i64,
    },
    OutboxDelete {
        shard: i32,
        msg_id: i64,
    },
    Dedup {
        uid: i64,
        client_msg_id: i64,
        msg_id: i64,
        seq: i64,
        server_time_ms: i64,
        prev_seq: i64,
    },
    GroupPut {
        gid: i64,
        name: String,
        creator: i64,
        owner: i64,
        announcement: String,
        created_ms: i64,
    },
    /// An org record at `version` ([`OrgRecord::to_bytes`]), in partition [`ORG_PARTITION`].
    ///
    /// [`OrgRecord::to_bytes`]: im_shared::org::OrgRecord::to_bytes
    OrgPut {
        version: i64,
        record: Vec<u8>,
    },
    UserGroupPut {
        uid: i64,
        gid: i64,
    },
    MemberPut {
        gid: i64,
        uid: i64,
        role: i16,
        joined_ms: i64,
    },
    MemberDelete {
        gid: i64,
        uid: i64,
    },
    UserGroupDelete {
        uid: i64,
        gid: i64,
    },
    MutePut {
        uid: i64,
        peer: i64,
    },
    MuteDelete {
        uid: i64,
        peer: i64,
    },
    FlagPut {
        uid: i64,
        flag: i16,
    },
    FlagDelete {
        uid: i64,
        flag: i16,
    },
    PushTokenPut {
        uid: i64,
        device_id: String,
        provider: i16,
        token: String,
    },
    PushTokenDelete {
        uid: i64,
        device_id: String,
    },
    PushWatchDelete {
        shard: i32,
        uid: i64,
        seq: i64,
    },
    /// The record an [`OrgPut`](crate::Op::OrgPut) replaces.
    OrgDelete {
        version: i64,
    },
    /// `uid → gid` among the large groups of `uid` ([`LargeMember`](crate::Op::LargeMember)).
    UserLargeGroupPut {
        uid: i64,
        gid: i64,
    },
    /// Cleared by [`LargeMember`](crate::Op::LargeMember) `on = false` or a
    /// [`MemberDelete`](crate::Op::MemberDelete).
    UserLargeGroupDelete {
        uid: i64,
        gid: i64,
    },
    /// A bucket of a large group's timeline exists (like [`Row::Bucket`] for a user's).
    GroupBucket {
        gid: i64,
        bucket: i64,
    },
    /// A post of a large group ([`GroupAppend`](crate::Op::GroupAppend)).
    GroupTimeline {
        gid: i64,
        bucket: i64,
        seq: i64,
        msg: Vec<u8>,
    },
    /// The read cursor of `uid` in large group `gid` ([`GroupRead`](crate::Op::GroupRead)).
    GroupRead {
        uid: i64,
        gid: i64,
        seq: i64,
    },
}

/// The primary key a [`Row`] writes (the put and the delete of one outbox entry, membership,
/// index entry, large-group index entry, mute, push token, push watch or org record version
/// share a key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Key {
    IdFloor(i32),
    SeqBound(i64),
    Bucket(i64, i64),
    Outbox(i32, i64),
    Timeline(i64, i64),
    MsgIdx(i64, i64),
    Cursor(i64, String),
    Dedup(i64, i64),
    Group(i64),
    /// (gid, uid)
    Member(i64, i64),
    /// (uid, gid)
    UserGroup(i64, i64),
    Mute(i64, i64),
    Flag(i64, i16),
    PushToken(i64, String),
    /// (shard, uid, seq)
    PushWatch(i32, i64, i64),
    /// version (in partition [`ORG_PARTITION`])
    Org(i64),
    /// (uid, gid)
    UserLargeGroup(i64, i64),
    /// (gid, bucket)
    GroupBucket(i64, i64),
    /// (gid, seq)
    GroupTimeline(i64, i64),
    /// (uid, gid)
    GroupRead(i64, i64),
}

/// Estimated bytes of a statement in a batch beyond its values (statement id, lengths,
/// mutation overhead).
const ROW_OVERHEAD: usize = 48;

impl Row {
    pub(super) fn phase(&self) -> Phase {
        match self {
            Row::IdFloor { .. } => Phase::IdFloor,
            Row::SeqBound { .. } => Phase::SeqBound,
            Row::Bucket { .. } => Phase::Bucket,
            Row::OutboxPut { .. } => Phase::OutboxPut,
            Row::Timeline { .. } => Phase::Timeline,
            Row::MsgIdx { .. } => Phase::MsgIdx,
            Row::PushWatchPut { .. } => Phase::PushWatchPut,
            Row::Cursor { .. } => Phase::Cursor,
            Row::OutboxDelete { .. } => Phase::OutboxDelete,
            Row::Dedup { .. } => Phase::Dedup,
            Row::GroupPut { .. } => Phase::GroupPut,
            Row::OrgPut { .. } => Phase::OrgPut,
            Row::UserGroupPut { .. } => Phase::UserGroupPut,
            Row::MemberPut { .. } => Phase::MemberPut,
            Row::MemberDelete { .. } => Phase::MemberDelete,
            Row::UserGroupDelete { .. } => Phase::UserGroupDelete,
            Row::MutePut { .. } => Phase::MutePut,
            Row::MuteDelete { .. } => Phase::MuteDelete,
            Row::FlagPut { .. } => Phase::FlagPut,
            Row::FlagDelete { .. } => Phase::FlagDelete,
            Row::PushTokenPut { .. } => Phase::PushTokenPut,
            Row::PushTokenDelete { .. } => Phase::PushTokenDelete,
            Row::PushWatchDelete { .. } => Phase::PushWatchDelete,
            Row::OrgDelete { .. } => Phase::OrgDelete,
            Row::UserLargeGroupPut { .. } => Phase::UserLargeGroupPut,
            Row::UserLargeGroupDelete { .. } => Phase::UserLargeGroupDelete,
            Row::GroupBucket { .. } => Phase::GroupBucket,
            Row::GroupTimeline { .. } => Phase::GroupTimeline,
            Row::GroupRead { .. } => Phase::GroupRead,
        }
    }

    pub(super) fn key(&self) -> Key {
        match self {
            Row::IdFloor { generator, .. } => Key::IdFloor(*generator),
            Row::SeqBound { uid, .. } => Key::SeqBound(*uid),
            Row::Bucket { uid, bucket } => Key::Bucket(*uid, *bucket),
            Row::OutboxPut { shard, msg_id, .. } | Row::OutboxDelete { shard, msg_id } => {
                Key::Outbox(*shard, *msg_id)
            }
            Row::Timeline { uid, seq, .. } => Key::Timeline(*uid, *seq),
            Row::MsgIdx { uid, msg_id, .. } => Key::MsgIdx(*uid, *msg_id),
            Row::Cursor { uid, device_id, .. } => Key::Cursor(*uid, device_id.clone()),
            Row::Dedup {
                uid, client_msg_id, ..
            } => Key::Dedup(*uid, *client_msg_id),
            Row::GroupPut { gid, .. } => Key::Group(*gid),
            Row::MemberPut { gid, uid, .. } | Row::MemberDelete { gid, uid } => {
                Key::Member(*gid, *uid)
            }
            Row::UserGroupPut { uid, gid } | Row::UserGroupDelete { uid, gid } => {
                Key::UserGroup(*uid, *gid)
            }
            Row::MutePut { uid, peer } | Row::MuteDelete { uid, peer } => Key::Mute(*uid, *peer),
            Row::FlagPut { uid, flag } | Row::FlagDelete { uid, flag } => Key::Flag(*uid, *flag),
            Row::PushTokenPut { uid, device_id, .. } | Row::PushTokenDelete { uid, device_id } => {
                Key::PushToken(*uid, device_id.clone())
            }
            Row::PushWatchPut { shard, uid, seq } | Row::PushWatchDelete { shard, uid, seq } => {
                Key::PushWatch(*shard, *uid, *seq)
            }
            Row::OrgPut { version, .. } | Row::OrgDelete { version } => Key::Org(*version),
            Row::UserLargeGroupPut { uid, gid } | Row::UserLargeGroupDelete { uid, gid } => {
                Key::UserLargeGroup(*uid, *gid)
            }
            Row::GroupBucket { gid, bucket } => Key::GroupBucket(*gid, *bucket),
            Row::GroupTimeline { gid, seq, .. } => Key::GroupTimeline(*gid, *seq),
            Row::GroupRead { uid, gid, .. } => Key::GroupRead(*uid, *gid),
        }
    }

    /// Estimated size in a batch (values plus [`ROW_OVERHEAD`]).
    pub(super) fn size(&self) -> usize {
        ROW_OVERHEAD
            + match self {
                Row::IdFloor { .. } => 12,
                Row::SeqBound { .. } | Row::Bucket { .. } | Row::GroupBucket { .. } => 16,
                Row::OutboxPut {
                    recipients, msg, ..
                } => 12 + 8 * recipients.len() + msg.len(),
                Row::Timeline { msg, .. } | Row::GroupTimeline { msg, .. } => 24 + msg.len(),
                Row::MsgIdx { .. } | Row::GroupRead { .. } => 24,
                Row::Cursor { device_id, .. } => 16 + device_id.len(),
                Row::OutboxDelete { .. } => 12,
                Row::Dedup { .. } => 48,
                Row::GroupPut {
                    name, announcement, ..
                } => 32 + name.len() + announcement.len(),
                Row::UserGroupPut { .. }
                | Row::UserGroupDelete { .. }
                | Row::MemberDelete { .. }
                | Row::MutePut { .. }
                | Row::MuteDelete { .. }
                | Row::UserLargeGroupPut { .. }
                | Row::UserLargeGroupDelete { .. } => 16,
                Row::FlagPut { .. } | Row::FlagDelete { .. } => 10,
                Row::MemberPut { .. } => 26,
                Row::PushTokenPut {
                    device_id, token, ..
                } => 10 + device_id.len() + token.len(),
                Row::PushTokenDelete { device_id, .. } => 8 + device_id.len(),
                Row::PushWatchPut { .. } | Row::PushWatchDelete { .. } => 20,
                Row::OrgPut { record, .. } => 12 + record.len(),
                Row::OrgDelete { .. } => 12,
            }
    }
}

impl SerializeRow for Row {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        w: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match self {
            Row::IdFloor { generator, ms } => (generator, ms).serialize(ctx, w),
            Row::SeqBound { uid, bound } => (uid, bound).serialize(ctx, w),
            Row::Bucket { uid, bucket } => (uid, bucket).serialize(ctx, w),
            Row::OutboxPut {
                shard,
                msg_id,
                recipients,
                msg,
            } => (shard, msg_id, recipients, msg.as_slice()).serialize(ctx, w),
            Row::Timeline {
                uid,
                bucket,
                seq,
                msg,
            } => (uid, bucket, seq, msg.as_slice()).serialize(ctx, w),
            Row::MsgIdx { uid, msg_id, seq } => (uid, msg_id, seq).serialize(ctx, w),
            Row::Cursor {
                uid,
                device_id,
                seq,
            } => (uid, device_id.as_str(), seq).serialize(ctx, w),
            Row::OutboxDelete { shard, msg_id } => (shard, msg_id).serialize(ctx, w),
            Row::Dedup {
                uid,
                client_msg_id,
                msg_id,
                seq,
                server_time_ms,
                prev_seq,
            } => (uid, client_msg_id, msg_id, seq, server_time_ms, prev_seq).serialize(ctx, w),
            Row::GroupPut {
                gid,
                name,
                creator,
                owner,
                announcement,
                created_ms,
            } => (
                gid,
                name.as_str(),
                creator,
                owner,
                announcement.as_str(),
                created_ms,
            )
                .serialize(ctx, w),
            Row::UserGroupPut { uid, gid } | Row::UserGroupDelete { uid, gid } => {
                (uid, gid).serialize(ctx, w)
            }
            Row::MemberPut {
                gid,
                uid,
                role,
                joined_ms,
            } => (gid, uid, role, joined_ms).serialize(ctx, w),
            Row::MemberDelete { gid, uid } => (gid, uid).serialize(ctx, w),
            Row::MutePut { uid, peer } | Row::MuteDelete { uid, peer } => {
                (uid, peer).serialize(ctx, w)
            }
            Row::FlagPut { uid, flag } | Row::FlagDelete { uid, flag } => {
                (uid, flag).serialize(ctx, w)
            }
            Row::PushTokenPut {
                uid,
                device_id,
                provider,
                token,
            } => (uid, device_id.as_str(), provider, token.as_str()).serialize(ctx, w),
            Row::PushTokenDelete { uid, device_id } => (uid, device_id.as_str()).serialize(ctx, w),
            Row::PushWatchPut { shard, uid, seq } | Row::PushWatchDelete { shard, uid, seq } => {
                (shard, uid, seq).serialize(ctx, w)
            }
            Row::OrgPut { version, record } => {
                (ORG_PARTITION, version, record.as_slice()).serialize(ctx, w)
            }
            Row::OrgDelete { version } => (ORG_PARTITION, version).serialize(ctx, w),
            Row::UserLargeGroupPut { uid, gid } | Row::UserLargeGroupDelete { uid, gid } => {
                (uid, gid).serialize(ctx, w)
            }
            Row::GroupBucket { gid, bucket } => (gid, bucket).serialize(ctx, w),
            Row::GroupTimeline {
                gid,
                bucket,
                seq,
                msg,
            } => (gid, bucket, seq, msg.as_slice()).serialize(ctx, w),
            Row::GroupRead { uid, gid, seq } => (uid, gid, seq).serialize(ctx, w),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

pub(super) fn encode(msg: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(msg.encoded_len());
    msg.encode(&mut v);
    v
}

/// Rows of a result as `R`; a type mismatch means the table is not the one this code expects.
pub(super) fn typed_rows<'f, R: DeserializeRow<'f, 'f>>(
    res: &'f QueryRowsResult,
    what: &str,
) -> Result<scylla::deserialize::result::TypedRowIterator<'f, 'f, R>, StoreError> {
    res.rows::<R>()
        .map_err(|e| StoreError::Io(format!("scylla {what}: unexpected columns: {e}")))
}

pub(super) fn into_rows(
    res: scylla::response::query_result::QueryResult,
    what: &str,
) -> Result<QueryRowsResult, StoreError> {
    res.into_rows_result()
        .map_err(|e| StoreError::Io(format!("scylla {what}: {e}")))
}

/// Outcome of a conditional statement on `writer_fence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cas {
    Applied,
    /// Not applied; the row's incarnation as the statement saw it, when the result carries it
    /// (`None`: no row, or a server that does not return the row).
    NotApplied(Option<u64>),
}

/// Reads the result row of a conditional statement, by column name: `[applied]` always comes
/// first, but the columns after it differ between servers (Scylla always returns the row as it
/// was before the statement, Cassandra only the condition's columns and only when not applied).
pub(super) fn cas_outcome(
    names: &[&str],
    row: &[Option<CqlValue>],
    what: &str,
) -> Result<Cas, StoreError> {
    let col = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| row.get(i))
            .and_then(Option::as_ref)
    };
    match col("[applied]") {
        Some(CqlValue::Boolean(true)) => Ok(Cas::Applied),
        Some(CqlValue::Boolean(false)) => match col("incarnation") {
            None => Ok(Cas::NotApplied(None)),
            Some(CqlValue::BigInt(v)) => Ok(Cas::NotApplied(Some(*v as u64))),
            Some(other) => Err(StoreError::Io(format!(
                "scylla {what}: incarnation {other:?} is not a bigint"
            ))),
        },
        other => Err(StoreError::Io(format!(
            "scylla {what}: LWT result without a boolean [applied] ({other:?})"
        ))),
    }
}
