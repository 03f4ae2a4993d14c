//! The CQL text of every statement [`ScyllaStore`](super::ScyllaStore) runs, and their
//! preparation: one write per [`Phase`], one read per [`Read`], one conditional statement per
//! [`Fence`].

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};

use super::batch::Phase;
use super::errors::prepare_err;
use crate::StoreError;

/// Rows per page of the scans.
const TIMELINE_PAGE: i32 = 256;
const BUCKET_PAGE: i32 = 64;
const OUTBOX_PAGE: i32 = 256;
/// Half of [`im_shared::proto::MAX_GROUP_MEMBERS`]: a full group is read in two pages.
const MEMBERS_PAGE: i32 = 1000;
/// The per-user lists (groups and large groups of a user, mutes, push tokens, device cursors).
const USER_LIST_PAGE: i32 = 512;
/// Push watches of a shard: tiny rows, live for seconds each.
const PUSH_WATCH_PAGE: i32 = 1000;
/// Org records (tens to hundreds of bytes each): a page is at most a few hundred KB.
const ORG_PAGE: i32 = 1000;

/// Every statement, prepared once at connect: one write per [`Phase`], one per [`Read`], one
/// per [`Fence`].
pub(super) struct Statements {
    /// Indexed by `Phase as usize`.
    writes: Vec<PreparedStatement>,
    /// Indexed by `Read as usize`.
    reads: Vec<PreparedStatement>,
    /// Indexed by `Fence as usize`.
    fences: Vec<PreparedStatement>,
}

impl Phase {
    /// Every phase, in order (`Phase::ALL[p as usize] == p`).
    pub(super) const ALL: [Phase; 29] = [
        Phase::IdFloor,
        Phase::SeqBound,
        Phase::GroupPut,
        Phase::OrgPut,
        Phase::UserGroupPut,
        Phase::UserLargeGroupPut,
        Phase::MemberPut,
        Phase::MemberDelete,
        Phase::UserGroupDelete,
        Phase::UserLargeGroupDelete,
        Phase::Bucket,
        Phase::OutboxPut,
        Phase::Timeline,
        Phase::PushWatchPut,
        Phase::MsgIdx,
        Phase::GroupBucket,
        Phase::GroupTimeline,
        Phase::Cursor,
        Phase::GroupRead,
        Phase::MutePut,
        Phase::MuteDelete,
        Phase::FlagPut,
        Phase::FlagDelete,
        Phase::PushTokenPut,
        Phase::PushTokenDelete,
        Phase::OutboxDelete,
        Phase::PushWatchDelete,
        Phase::OrgDelete,
        Phase::Dedup,
    ];

    /// The statement writing the rows of this phase; its bind markers take a [`Row`]'s values
    /// in the order [`Row`]'s `SerializeRow` writes them.
    ///
    /// [`Row`]: super::rows::Row
    pub(super) fn cql(self, ks: &str) -> String {
        match self {
            Phase::IdFloor => {
                format!("INSERT INTO {ks}.id_floor (generator, ms) VALUES (?, ?)")
            }
            Phase::SeqBound => format!("INSERT INTO {ks}.seq_bound (uid, bound) VALUES (?, ?)"),
            Phase::GroupPut => format!(
                "INSERT INTO {ks}.group_info \
                 (gid, name, creator, owner, announcement, created_ms) \
                 VALUES (?, ?, ?, ?, ?, ?)"
            ),
            Phase::OrgPut => {
                format!("INSERT INTO {ks}.org_records (org, version, record) VALUES (?, ?, ?)")
            }
            Phase::UserGroupPut => {
                format!("INSERT INTO {ks}.user_groups (uid, gid) VALUES (?, ?)")
            }
            Phase::UserLargeGroupPut => {
                format!("INSERT INTO {ks}.user_large_groups (uid, gid) VALUES (?, ?)")
            }
            Phase::MemberPut => format!(
                "INSERT INTO {ks}.group_members (gid, uid, role, joined_ms) VALUES (?, ?, ?, ?)"
            ),
            Phase::MemberDelete => {
                format!("DELETE FROM {ks}.group_members WHERE gid = ? AND uid = ?")
            }
            Phase::UserGroupDelete => {
                format!("DELETE FROM {ks}.user_groups WHERE uid = ? AND gid = ?")
            }
            Phase::UserLargeGroupDelete => {
                format!("DELETE FROM {ks}.user_large_groups WHERE uid = ? AND gid = ?")
            }
            Phase::Bucket => {
                format!("INSERT INTO {ks}.timeline_bucket (uid, bucket) VALUES (?, ?)")
            }
            Phase::OutboxPut => format!(
                "INSERT INTO {ks}.outbox (shard, msg_id, recipients, msg) VALUES (?, ?, ?, ?)"
            ),
            Phase::Timeline => {
                format!("INSERT INTO {ks}.timeline (uid, bucket, seq, msg) VALUES (?, ?, ?, ?)")
            }
            Phase::PushWatchPut => {
                format!("INSERT INTO {ks}.push_watch (shard, uid, seq) VALUES (?, ?, ?)")
            }
            Phase::MsgIdx => {
                format!("INSERT INTO {ks}.msgidx (uid, msg_id, seq) VALUES (?, ?, ?)")
            }
            Phase::GroupBucket => {
                format!("INSERT INTO {ks}.group_timeline_bucket (gid, bucket) VALUES (?, ?)")
            }
            Phase::GroupTimeline => format!(
                "INSERT INTO {ks}.group_timeline (gid, bucket, seq, msg) VALUES (?, ?, ?, ?)"
            ),
            Phase::Cursor => {
                format!("INSERT INTO {ks}.cursor (uid, device_id, seq) VALUES (?, ?, ?)")
            }
            Phase::GroupRead => {
                format!("INSERT INTO {ks}.group_reads (uid, gid, seq) VALUES (?, ?, ?)")
            }
            Phase::MutePut => format!("INSERT INTO {ks}.mutes (uid, peer) VALUES (?, ?)"),
            Phase::MuteDelete => format!("DELETE FROM {ks}.mutes WHERE uid = ? AND peer = ?"),
            Phase::FlagPut => format!("INSERT INTO {ks}.user_flags (uid, flag) VALUES (?, ?)"),
            Phase::FlagDelete => {
                format!("DELETE FROM {ks}.user_flags WHERE uid = ? AND flag = ?")
            }
            Phase::PushTokenPut => format!(
                "INSERT INTO {ks}.push_tokens (uid, device_id, provider, push_token) \
                 VALUES (?, ?, ?, ?)"
            ),
            Phase::PushTokenDelete => {
                format!("DELETE FROM {ks}.push_tokens WHERE uid = ? AND device_id = ?")
            }
            Phase::OutboxDelete => {
                format!("DELETE FROM {ks}.outbox WHERE shard = ? AND msg_id = ?")
            }
            Phase::PushWatchDelete => {
                format!("DELETE FROM {ks}.push_watch WHERE shard = ? AND uid = ? AND seq = ?")
            }
            Phase::OrgDelete => {
                format!("DELETE FROM {ks}.org_records WHERE org = ? AND version = ?")
            }
            Phase::Dedup => format!(
                "INSERT INTO {ks}.dedup \
                 (uid, client_msg_id, msg_id, seq, server_time_ms, prev_seq) \
                 VALUES (?, ?, ?, ?, ?, ?)"
            ),
        }
    }
}

/// The conditional (LWT) statements of [`ScyllaStore::fence`], both on `writer_fence`. Their
/// bind markers take [`FenceInsertValues`] and [`FenceRaiseValues`].
///
/// [`ScyllaStore::fence`]: super::ScyllaStore#method.fence
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fence {
    /// The first fence of a node.
    Insert,
    /// Compare-and-set: raise the fence from the value last seen.
    Raise,
}

/// Values of [`Fence::Insert`]: node, incarnation.
pub(super) type FenceInsertValues = (i32, i64);
/// Values of [`Fence::Raise`]: new incarnation, node, incarnation expected now.
pub(super) type FenceRaiseValues = (i64, i32, i64);

/// Rounds of [`ScyllaStore::fence`] before it gives up with a retryable error. Each round that
/// does not return saw the fence changed by a concurrent fence of the same node, which only
/// happens when several nodes take over one node's shards at once.
///
/// [`ScyllaStore::fence`]: super::ScyllaStore#method.fence
pub(super) const FENCE_ROUNDS: usize = 16;

impl Fence {
    /// Every fence statement, in order (`Fence::ALL[f as usize] == f`).
    pub(super) const ALL: [Fence; 2] = [Fence::Insert, Fence::Raise];

    pub(super) fn cql(self, ks: &str) -> String {
        match self {
            Fence::Insert => format!(
                "INSERT INTO {ks}.writer_fence (node, incarnation) VALUES (?, ?) IF NOT EXISTS"
            ),
            Fence::Raise => format!(
                "UPDATE {ks}.writer_fence SET incarnation = ? WHERE node = ? IF incarnation = ?"
            ),
        }
    }
}

/// Every read statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Read {
    SeqBound,
    BucketsFrom,
    BucketsDesc,
    TimelineAfter,
    TimelineLast,
    MsgIdx,
    Dedup,
    Cursor,
    /// Every device cursor of a user.
    Cursors,
    Outbox,
    /// Every push watch of a shard.
    PushWatches,
    Group,
    Members,
    UserGroups,
    Mutes,
    Flags,
    PushTokens,
    /// The msg-id time floor of a generator (`LOCAL_QUORUM` like the others).
    IdFloor,
    /// Org records above a version, in version order, up to a limit.
    OrgAfter,
    /// Every large group of a user (`user_large_groups`).
    LargeGroups,
    /// The buckets of a large group's timeline from one up, as [`Read::BucketsFrom`].
    GroupBucketsFrom,
    /// The buckets of a large group's timeline from the highest down, as [`Read::BucketsDesc`].
    GroupBucketsDesc,
    /// Posts of one bucket of a large group's timeline above a seq, as [`Read::TimelineAfter`].
    GroupTimelineAfter,
    /// The last post of one bucket of a large group's timeline, as [`Read::TimelineLast`].
    GroupTimelineLast,
    /// The read cursor of a user in a large group (`group_reads`).
    GroupCursor,
    /// The fence of a node: a `LOCAL_SERIAL` (Paxos) read, see [`Read::consistency`].
    Fence,
}

/// The two bucketed timelines, stored and read the same way (see **Timelines** in the module docs
/// of [`ScyllaStore`](super::ScyllaStore)): a user's (`timeline`, `timeline_bucket`) and a large
/// group's (`group_timeline`, `group_timeline_bucket`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TimelineOf {
    User,
    Group,
}

impl TimelineOf {
    /// The table of the entries (also the name of its reads in errors).
    pub(super) fn table(self) -> &'static str {
        match self {
            TimelineOf::User => "timeline",
            TimelineOf::Group => "group_timeline",
        }
    }

    /// The table of the buckets that exist.
    pub(super) fn bucket_table(self) -> &'static str {
        match self {
            TimelineOf::User => "timeline_bucket",
            TimelineOf::Group => "group_timeline_bucket",
        }
    }

    /// The buckets from one up.
    pub(super) fn buckets_from(self) -> Read {
        match self {
            TimelineOf::User => Read::BucketsFrom,
            TimelineOf::Group => Read::GroupBucketsFrom,
        }
    }

    /// The buckets from the highest down.
    pub(super) fn buckets_desc(self) -> Read {
        match self {
            TimelineOf::User => Read::BucketsDesc,
            TimelineOf::Group => Read::GroupBucketsDesc,
        }
    }

    /// The entries of one bucket above a seq, up to a limit.
    pub(super) fn after(self) -> Read {
        match self {
            TimelineOf::User => Read::TimelineAfter,
            TimelineOf::Group => Read::GroupTimelineAfter,
        }
    }

    /// The seq of the last entry of one bucket.
    pub(super) fn last(self) -> Read {
        match self {
            TimelineOf::User => Read::TimelineLast,
            TimelineOf::Group => Read::GroupTimelineLast,
        }
    }
}

/// Row types of the reads that name them in more than one place.
pub(super) type GroupRow = (Option<String>, i64, i64, Option<String>, i64);
pub(super) type MemberRow = (i64, i16, i64);
pub(super) type PushTokenRow = (String, i16, Option<String>);
/// device_id, seq
pub(super) type CursorRow = (String, i64);
/// uid, seq
pub(super) type PushWatchRow = (i64, i64);
/// version, record
pub(super) type OrgRow = (i64, Vec<u8>);

impl Read {
    /// Every read, in order (`Read::ALL[r as usize] == r`).
    pub(super) const ALL: [Read; 26] = [
        Read::SeqBound,
        Read::BucketsFrom,
        Read::BucketsDesc,
        Read::TimelineAfter,
        Read::TimelineLast,
        Read::MsgIdx,
        Read::Dedup,
        Read::Cursor,
        Read::Cursors,
        Read::Outbox,
        Read::PushWatches,
        Read::Group,
        Read::Members,
        Read::UserGroups,
        Read::Mutes,
        Read::Flags,
        Read::PushTokens,
        Read::IdFloor,
        Read::OrgAfter,
        Read::LargeGroups,
        Read::GroupBucketsFrom,
        Read::GroupBucketsDesc,
        Read::GroupTimelineAfter,
        Read::GroupTimelineLast,
        Read::GroupCursor,
        Read::Fence,
    ];

    pub(super) fn cql(self, ks: &str) -> String {
        match self {
            Read::SeqBound => format!("SELECT bound FROM {ks}.seq_bound WHERE uid = ?"),
            Read::BucketsFrom => {
                format!("SELECT bucket FROM {ks}.timeline_bucket WHERE uid = ? AND bucket >= ?")
            }
            Read::BucketsDesc => format!(
                "SELECT bucket FROM {ks}.timeline_bucket WHERE uid = ? ORDER BY bucket DESC"
            ),
            Read::TimelineAfter => format!(
                "SELECT seq, msg FROM {ks}.timeline \
                 WHERE uid = ? AND bucket = ? AND seq > ? LIMIT ?"
            ),
            Read::TimelineLast => format!(
                "SELECT seq FROM {ks}.timeline WHERE uid = ? AND bucket = ? \
                 ORDER BY seq DESC LIMIT 1"
            ),
            Read::MsgIdx => format!("SELECT seq FROM {ks}.msgidx WHERE uid = ? AND msg_id = ?"),
            Read::Dedup => format!(
                "SELECT msg_id, seq, server_time_ms, prev_seq FROM {ks}.dedup \
                 WHERE uid = ? AND client_msg_id = ?"
            ),
            Read::Cursor => {
                format!("SELECT seq FROM {ks}.cursor WHERE uid = ? AND device_id = ?")
            }
            Read::Cursors => format!("SELECT device_id, seq FROM {ks}.cursor WHERE uid = ?"),
            Read::Outbox => {
                format!("SELECT msg_id, recipients, msg FROM {ks}.outbox WHERE shard = ?")
            }
            Read::PushWatches => format!("SELECT uid, seq FROM {ks}.push_watch WHERE shard = ?"),
            Read::Group => format!(
                "SELECT name, creator, owner, announcement, created_ms FROM {ks}.group_info \
                 WHERE gid = ?"
            ),
            Read::Members => {
                format!("SELECT uid, role, joined_ms FROM {ks}.group_members WHERE gid = ?")
            }
            Read::UserGroups => format!("SELECT gid FROM {ks}.user_groups WHERE uid = ?"),
            Read::Mutes => format!("SELECT peer FROM {ks}.mutes WHERE uid = ?"),
            Read::Flags => format!("SELECT flag FROM {ks}.user_flags WHERE uid = ?"),
            Read::PushTokens => format!(
                "SELECT device_id, provider, push_token FROM {ks}.push_tokens WHERE uid = ?"
            ),
            Read::IdFloor => format!("SELECT ms FROM {ks}.id_floor WHERE generator = ?"),
            Read::OrgAfter => format!(
                "SELECT version, record FROM {ks}.org_records \
                 WHERE org = ? AND version > ? LIMIT ?"
            ),
            Read::LargeGroups => {
                format!("SELECT gid FROM {ks}.user_large_groups WHERE uid = ?")
            }
            Read::GroupBucketsFrom => format!(
                "SELECT bucket FROM {ks}.group_timeline_bucket WHERE gid = ? AND bucket >= ?"
            ),
            Read::GroupBucketsDesc => format!(
                "SELECT bucket FROM {ks}.group_timeline_bucket WHERE gid = ? \
                 ORDER BY bucket DESC"
            ),
            Read::GroupTimelineAfter => format!(
                "SELECT seq, msg FROM {ks}.group_timeline \
                 WHERE gid = ? AND bucket = ? AND seq > ? LIMIT ?"
            ),
            Read::GroupTimelineLast => format!(
                "SELECT seq FROM {ks}.group_timeline WHERE gid = ? AND bucket = ? \
                 ORDER BY seq DESC LIMIT 1"
            ),
            Read::GroupCursor => {
                format!("SELECT seq FROM {ks}.group_reads WHERE uid = ? AND gid = ?")
            }
            Read::Fence => format!("SELECT incarnation FROM {ks}.writer_fence WHERE node = ?"),
        }
    }

    /// Consistency of the reads that do not use the session's default (`LOCAL_QUORUM`).
    /// [`Read::Fence`] is a `LOCAL_SERIAL` read: a Paxos read that first completes any fence LWT
    /// in progress on the row, so it returns every fence that completed before it started (a
    /// `LOCAL_QUORUM` read could miss the value of an LWT whose commit a replica has not
    /// applied yet).
    pub(super) fn consistency(self) -> Option<Consistency> {
        match self {
            Read::Fence => Some(Consistency::LocalSerial),
            _ => None,
        }
    }

    /// Page size of the reads that page (scans); point reads return at most one row.
    pub(super) fn page_size(self) -> Option<i32> {
        match self {
            Read::BucketsFrom
            | Read::BucketsDesc
            | Read::GroupBucketsFrom
            | Read::GroupBucketsDesc => Some(BUCKET_PAGE),
            Read::TimelineAfter | Read::GroupTimelineAfter => Some(TIMELINE_PAGE),
            Read::Outbox => Some(OUTBOX_PAGE),
            Read::Members => Some(MEMBERS_PAGE),
            Read::PushWatches => Some(PUSH_WATCH_PAGE),
            Read::OrgAfter => Some(ORG_PAGE),
            Read::UserGroups
            | Read::LargeGroups
            | Read::Mutes
            | Read::Flags
            | Read::PushTokens
            | Read::Cursors => Some(USER_LIST_PAGE),
            Read::SeqBound
            | Read::TimelineLast
            | Read::MsgIdx
            | Read::Dedup
            | Read::Cursor
            | Read::Group
            | Read::IdFloor
            | Read::GroupTimelineLast
            | Read::GroupCursor
            | Read::Fence => None,
        }
    }
}

impl Statements {
    pub(super) async fn prepare(session: &Session, ks: &str) -> Result<Statements, StoreError> {
        let p = |cql: String, page: Option<i32>, consistency: Option<Consistency>| async move {
            let mut st = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| prepare_err(&cql, e))?;
            if let Some(n) = page {
                st.set_page_size(n);
            }
            if let Some(c) = consistency {
                st.set_consistency(c);
            }
            // Every statement (and so every batch of them) is idempotent: plain upserts and
            // deletes of fixed values, no counters, no collection appends. The driver may
            // then retry them after a timeout. The fence LWTs are too, as `fence` uses them: a
            // retried one that was applied the first time is "not applied" with the value it
            // wrote, which `fence` takes as done.
            st.set_is_idempotent(true);
            Ok::<_, StoreError>(st)
        };
        let mut writes = Vec::with_capacity(Phase::ALL.len());
        for phase in Phase::ALL {
            writes.push(p(phase.cql(ks), None, None).await?);
        }
        let mut reads = Vec::with_capacity(Read::ALL.len());
        for read in Read::ALL {
            reads.push(p(read.cql(ks), read.page_size(), read.consistency()).await?);
        }
        let mut fences = Vec::with_capacity(Fence::ALL.len());
        for fence in Fence::ALL {
            let mut st = p(fence.cql(ks), None, None).await?;
            // Also the session profile's: Paxos among the local DC's replicas, the learn
            // phase at LOCAL_QUORUM.
            st.set_serial_consistency(Some(SerialConsistency::LocalSerial));
            st.set_consistency(Consistency::LocalQuorum);
            fences.push(st);
        }
        Ok(Statements {
            writes,
            reads,
            fences,
        })
    }

    pub(super) fn write(&self, phase: Phase) -> &PreparedStatement {
        &self.writes[phase as usize]
    }

    pub(super) fn read(&self, read: Read) -> &PreparedStatement {
        &self.reads[read as usize]
    }

    pub(super) fn fence(&self, fence: Fence) -> &PreparedStatement {
        &self.fences[fence as usize]
    }
}
