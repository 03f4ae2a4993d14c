//! [`ScyllaStore`]: the cluster [`Store`] on ScyllaDB (`scylla` driver, CQL native protocol).
//!
//! The schema is `deploy/scylla/schema.cql` (compiled in, see [`ScyllaStore::create_schema`]);
//! `deploy/scylla/README.md` explains the partitioning. In short:
//!
//! | table             | primary key                | value                              |
//! |-------------------|----------------------------|------------------------------------|
//! | `timeline`        | ((uid, seq / 100000), seq) | msg blob ([`Message::encode`])     |
//! | `timeline_bucket` | ((uid), bucket)            | — (which buckets exist)            |
//! | `msgidx`          | ((uid, msg_id))            | seq                                |
//! | `seq_bound`       | ((uid))                    | bound                              |
//! | `id_floor`        | ((generator))              | ms (reserved msg-id time)          |
//! | `dedup`           | ((uid, client_msg_id))     | msg_id, seq, server_time_ms, prev_seq; TTL 7 d |
//! | `cursor`          | ((uid), device_id)         | seq                                |
//! | `outbox`          | ((shard), msg_id)          | recipients frozen list, msg blob   |
//! | `group_info`      | ((gid))                    | name, creator, owner, announcement, created_ms |
//! | `group_members`   | ((gid), uid)               | role, joined_ms                    |
//! | `user_groups`     | ((uid), gid)               | — (index for `groups_of`)          |
//! | `mutes`           | ((uid), peer)              | —                                  |
//! | `push_tokens`     | ((uid), device_id)         | provider, push_token               |
//! | `writer_fence`    | ((node))                   | incarnation (see **Fencing**)      |
//!
//! Every statement is prepared once in [`ScyllaStore::connect`] and routed token-aware by the
//! driver's default load-balancing policy (to a replica of the partition, on the right shard).
//! Reads and writes use `LOCAL_QUORUM`: a commit returns only when a majority of the local
//! datacenter's replicas of every written partition have it in their commitlog, so an
//! acknowledged write survives the loss of a minority of replicas; a `LOCAL_QUORUM` read overlaps
//! every acknowledged write's quorum, so it sees it. The data itself is written without
//! lightweight transactions (LWT/Paxos): ownership of a user is exclusive to one logic shard, so
//! plain writes suffice. The one LWT is writer fencing (next paragraph), on its own table; its
//! serial consistency is `LOCAL_SERIAL` (set on the statements and in the session's default
//! profile), so Paxos runs among the local datacenter's replicas only, and its commit phase
//! writes at `LOCAL_QUORUM`.
//!
//! **Fencing.** [`Store::fence`] raises the fence of a logic node in `writer_fence` with an LWT:
//! `INSERT .. IF NOT EXISTS`, and if a row is there and below the wanted incarnation, a
//! compare-and-set `UPDATE .. IF incarnation = <the value seen>`, repeated when another fence
//! changed the row in between (see [`ScyllaStore::fence`]). [`Store::commit`] of a batch that
//! names a [`WriteBatch::writer`] first reads that node's row with a `LOCAL_SERIAL` read, a Paxos
//! read that sees every fence LWT completed before it, and refuses the batch with
//! [`StoreError::Fenced`] before sending anything when the fence is above the writer's
//! incarnation. That is one Paxos read per group commit (a few in-DC round trips; every commit of
//! one node reads the same partition, so a node committing at a very high rate contends on it).
//! The check and the logged batch are **not one atomic operation**: a fence that lands after the
//! check is not seen by that batch, and a batch already sent (one the driver retries, or one
//! replayed from the batchlog after a timeout) is applied whatever the fence says by then. So the
//! fence alone does not stop every late write. The shard lease closes that window: an owner stops
//! committing when its Redis lease expires, and a taker claims the shards (and fences the old
//! owner) only after the lease expired. The fence catches a writer that kept going past its lease
//! (e.g. a process paused and resumed): its next commit is refused. `LOCAL_SERIAL`
//! makes all this linearizable within one datacenter only: the nodes that can take each other's
//! shards must use the same datacenter.
//!
//! **Commit.** A [`WriteBatch`] becomes one `LOGGED` CQL batch: the coordinator first stores the
//! batch in the batchlog of two other nodes, then applies it, and replays it from the batchlog if
//! it dies midway, so a batch spanning many partitions is all-or-nothing (eventually; readers may
//! see part of it while it is being applied). That costs one extra replicated write and a
//! batchlog removal per batch, which is why logic commits in groups: one batch per round of many
//! requests. Two rules of CQL batches shape the translation:
//! - every statement of a batch gets the same write timestamp, and at equal timestamps a delete
//!   wins over an insert and the larger value wins between two inserts, so ops on one key are
//!   merged first (the later op wins, as the [`Store`] contract says);
//! - the server refuses batches above `batch_size_fail_threshold_in_kb` (Scylla default 1024 KiB;
//!   it warns above `batch_size_warn_threshold_in_kb`, default 128 KiB), so a batch above
//!   [`DEFAULT_MAX_BATCH_BYTES`] (estimated) is split into several logged batches, sent one after
//!   another. Each chunk is atomic, the whole is not: see [`ScyllaStore::commit`] for why that is
//!   still safe for the ops logic writes, and the order chosen to make it so.
//!
//! Timestamps are client-side and monotonic per store ([`MonotonicTimestampGenerator`]): a later
//! commit always wins over an earlier one on the same key, even when a timed-out batch is
//! replayed from the batchlog later or two commits go through different coordinators. Across
//! processes (a shard moving to another node) ordering relies on clocks in sync (NTP) and on the
//! handover taking longer than the clock skew (the old owner is fenced well before the new one
//! writes).
//!
//! **Runtime.** The driver spawns its connection and metadata tasks on the tokio runtime that
//! builds the session. Logic runs one current-thread runtime per worker, which only makes
//! progress while that worker awaits, so the session is built on a dedicated `scylla-driver`
//! thread with its own runtime that lives as long as any clone of the store. Requests can then be
//! issued from any runtime (every worker's), and they only need that runtime's timer.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use im_shared::proto::{GroupDesc, Message};
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError,
    SchemaAgreementError,
};
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::response::query_result::QueryRowsResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row as CqlRow};
use tokio::sync::oneshot;

use super::{DedupEntry, MemberRecord, Op, OutboxEntry, PushToken, Store, StoreError, WriteBatch};

/// Seqs per timeline partition: the timeline of `uid` is partitioned by `(uid, seq / this)`.
/// Fixed for the life of the data (changing it makes existing rows unreachable).
const TIMELINE_BUCKET_SEQS: u64 = 100_000;

/// Default bound of the estimated size of one logged batch; larger [`WriteBatch`]es are split.
/// Half of Scylla's default `batch_size_fail_threshold_in_kb` (1024), as margin for the estimate.
const DEFAULT_MAX_BATCH_BYTES: usize = 512 * 1024;

/// Most statements in one logged batch (the protocol allows 65 535).
const MAX_BATCH_STATEMENTS: usize = 4096;

/// Largest value a column whose order matters may hold (seq, bucket, outbox msg_id).
const MAX_ORDERED: u64 = i64::MAX as u64;

/// Client-side timeout of one request (the server's own timeouts are shorter: 2 s for writes,
/// 5 s for reads by default, so their errors arrive first).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Rows per page of the scans.
const TIMELINE_PAGE: i32 = 256;
const BUCKET_PAGE: i32 = 64;
const OUTBOX_PAGE: i32 = 256;
/// Half of [`im_shared::proto::MAX_GROUP_MEMBERS`]: a full group is read in two pages.
const MEMBERS_PAGE: i32 = 1000;
/// The per-user lists (groups of a user, mutes, push tokens).
const USER_LIST_PAGE: i32 = 512;

/// The schema, applied by [`ScyllaStore::create_schema`] with the keyspace and replication
/// replaced.
const SCHEMA_CQL: &str = include_str!("../../deploy/scylla/schema.cql");

/// Keyspace of `deploy/scylla/schema.cql`.
const SCHEMA_KEYSPACE: &str = "im";

/// The ScyllaDB store. Cloning is cheap; every clone shares one session (one connection pool
/// per node and shard) and its driver thread, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
    max_batch_bytes: usize,
}

struct Inner {
    // Dropped before `_driver`, whose drop stops the driver thread.
    session: Session,
    st: Statements,
    keyspace: String,
    _driver: oneshot::Sender<()>,
}

impl fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("keyspace", &self.inner.keyspace)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .finish_non_exhaustive()
    }
}

/// Every statement, prepared once at connect: one write per [`Phase`], one per [`Read`], one
/// per [`Fence`].
struct Statements {
    /// Indexed by `Phase as usize`.
    writes: Vec<PreparedStatement>,
    /// Indexed by `Read as usize`.
    reads: Vec<PreparedStatement>,
    /// Indexed by `Fence as usize`.
    fences: Vec<PreparedStatement>,
}

impl Phase {
    /// Every phase, in order (`Phase::ALL[p as usize] == p`).
    const ALL: [Phase; 18] = [
        Phase::IdFloor,
        Phase::SeqBound,
        Phase::GroupPut,
        Phase::UserGroupPut,
        Phase::MemberPut,
        Phase::MemberDelete,
        Phase::UserGroupDelete,
        Phase::Bucket,
        Phase::OutboxPut,
        Phase::Timeline,
        Phase::MsgIdx,
        Phase::Cursor,
        Phase::MutePut,
        Phase::MuteDelete,
        Phase::PushTokenPut,
        Phase::PushTokenDelete,
        Phase::OutboxDelete,
        Phase::Dedup,
    ];

    /// The statement writing the rows of this phase; its bind markers take a [`Row`]'s values
    /// in the order [`Row`]'s `SerializeRow` writes them.
    fn cql(self, ks: &str) -> String {
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
            Phase::UserGroupPut => {
                format!("INSERT INTO {ks}.user_groups (uid, gid) VALUES (?, ?)")
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
            Phase::Bucket => {
                format!("INSERT INTO {ks}.timeline_bucket (uid, bucket) VALUES (?, ?)")
            }
            Phase::OutboxPut => format!(
                "INSERT INTO {ks}.outbox (shard, msg_id, recipients, msg) VALUES (?, ?, ?, ?)"
            ),
            Phase::Timeline => {
                format!("INSERT INTO {ks}.timeline (uid, bucket, seq, msg) VALUES (?, ?, ?, ?)")
            }
            Phase::MsgIdx => {
                format!("INSERT INTO {ks}.msgidx (uid, msg_id, seq) VALUES (?, ?, ?)")
            }
            Phase::Cursor => {
                format!("INSERT INTO {ks}.cursor (uid, device_id, seq) VALUES (?, ?, ?)")
            }
            Phase::MutePut => format!("INSERT INTO {ks}.mutes (uid, peer) VALUES (?, ?)"),
            Phase::MuteDelete => format!("DELETE FROM {ks}.mutes WHERE uid = ? AND peer = ?"),
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fence {
    /// The first fence of a node.
    Insert,
    /// Compare-and-set: raise the fence from the value last seen.
    Raise,
}

/// Values of [`Fence::Insert`]: node, incarnation.
type FenceInsertValues = (i32, i64);
/// Values of [`Fence::Raise`]: new incarnation, node, incarnation expected now.
type FenceRaiseValues = (i64, i32, i64);

/// Rounds of [`ScyllaStore::fence`] before it gives up with a retryable error. Each round that
/// does not return saw the fence changed by a concurrent fence of the same node, which only
/// happens when several nodes take over one node's shards at once.
const FENCE_ROUNDS: usize = 16;

impl Fence {
    /// Every fence statement, in order (`Fence::ALL[f as usize] == f`).
    const ALL: [Fence; 2] = [Fence::Insert, Fence::Raise];

    fn cql(self, ks: &str) -> String {
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
enum Read {
    SeqBound,
    BucketsFrom,
    BucketsDesc,
    TimelineAfter,
    TimelineLast,
    MsgIdx,
    Dedup,
    Cursor,
    Outbox,
    Group,
    Members,
    UserGroups,
    Mutes,
    PushTokens,
    /// The msg-id time floor of a generator (`LOCAL_QUORUM` like the others).
    IdFloor,
    /// The fence of a node: a `LOCAL_SERIAL` (Paxos) read, see [`Read::consistency`].
    Fence,
}

/// Row types of the reads that name them in more than one place.
type GroupRow = (Option<String>, i64, i64, Option<String>, i64);
type MemberRow = (i64, i16, i64);
type PushTokenRow = (String, i16, Option<String>);

impl Read {
    /// Every read, in order (`Read::ALL[r as usize] == r`).
    const ALL: [Read; 16] = [
        Read::SeqBound,
        Read::BucketsFrom,
        Read::BucketsDesc,
        Read::TimelineAfter,
        Read::TimelineLast,
        Read::MsgIdx,
        Read::Dedup,
        Read::Cursor,
        Read::Outbox,
        Read::Group,
        Read::Members,
        Read::UserGroups,
        Read::Mutes,
        Read::PushTokens,
        Read::IdFloor,
        Read::Fence,
    ];

    fn cql(self, ks: &str) -> String {
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
            Read::Outbox => {
                format!("SELECT msg_id, recipients, msg FROM {ks}.outbox WHERE shard = ?")
            }
            Read::Group => format!(
                "SELECT name, creator, owner, announcement, created_ms FROM {ks}.group_info \
                 WHERE gid = ?"
            ),
            Read::Members => {
                format!("SELECT uid, role, joined_ms FROM {ks}.group_members WHERE gid = ?")
            }
            Read::UserGroups => format!("SELECT gid FROM {ks}.user_groups WHERE uid = ?"),
            Read::Mutes => format!("SELECT peer FROM {ks}.mutes WHERE uid = ?"),
            Read::PushTokens => format!(
                "SELECT device_id, provider, push_token FROM {ks}.push_tokens WHERE uid = ?"
            ),
            Read::IdFloor => format!("SELECT ms FROM {ks}.id_floor WHERE generator = ?"),
            Read::Fence => format!("SELECT incarnation FROM {ks}.writer_fence WHERE node = ?"),
        }
    }

    /// Consistency of the reads that do not use the session's default (`LOCAL_QUORUM`).
    /// [`Read::Fence`] is a `LOCAL_SERIAL` read: a Paxos read that first completes any fence LWT
    /// in progress on the row, so it returns every fence that completed before it started (a
    /// `LOCAL_QUORUM` read could miss the value of an LWT whose commit a replica has not
    /// applied yet).
    fn consistency(self) -> Option<Consistency> {
        match self {
            Read::Fence => Some(Consistency::LocalSerial),
            _ => None,
        }
    }

    /// Page size of the reads that page (scans); point reads return at most one row.
    fn page_size(self) -> Option<i32> {
        match self {
            Read::BucketsFrom | Read::BucketsDesc => Some(BUCKET_PAGE),
            Read::TimelineAfter => Some(TIMELINE_PAGE),
            Read::Outbox => Some(OUTBOX_PAGE),
            Read::Members => Some(MEMBERS_PAGE),
            Read::UserGroups | Read::Mutes | Read::PushTokens => Some(USER_LIST_PAGE),
            Read::SeqBound
            | Read::TimelineLast
            | Read::MsgIdx
            | Read::Dedup
            | Read::Cursor
            | Read::Group
            | Read::IdFloor
            | Read::Fence => None,
        }
    }
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Statements, StoreError> {
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

    fn write(&self, phase: Phase) -> &PreparedStatement {
        &self.writes[phase as usize]
    }

    fn read(&self, read: Read) -> &PreparedStatement {
        &self.reads[read as usize]
    }

    fn fence(&self, fence: Fence) -> &PreparedStatement {
        &self.fences[fence as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Whether a failed attempt may succeed when retried (node down, overloaded, timed out, broken
/// connection) rather than being a bug or a schema problem.
fn attempt_retryable(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::RateLimitReached { .. }
                | DbError::ServerError
                | DbError::TruncateError
        ),
        RequestAttemptError::UnableToAllocStreamId
        | RequestAttemptError::BrokenConnectionError(_) => true,
        _ => false,
    }
}

fn prepare_retryable(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_retryable(first_attempt),
        _ => false,
    }
}

fn classify(retryable: bool, msg: String) -> StoreError {
    if retryable {
        StoreError::Unavailable(msg)
    } else {
        StoreError::Io(msg)
    }
}

/// Maps a driver error: [`StoreError::Unavailable`] when a retry may succeed (the client gets a
/// retryable error code), [`StoreError::Io`] otherwise.
///
/// A failed *write* has an unknown outcome: a timed-out logged batch is in the batchlog and will
/// be applied. Callers must not assume that nothing of a failed commit is durable.
fn exec_err(what: &str, e: ExecutionError) -> StoreError {
    let retryable = match &e {
        ExecutionError::LastAttemptError(a) => attempt_retryable(a),
        ExecutionError::PrepareError(p) => prepare_retryable(p),
        ExecutionError::EmptyPlan
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => true,
        _ => false,
    };
    classify(retryable, format!("scylla {what}: {e}"))
}

fn prepare_err(cql: &str, e: PrepareError) -> StoreError {
    classify(
        prepare_retryable(&e),
        format!("scylla prepare `{cql}`: {e}"),
    )
}

fn session_err(e: NewSessionError) -> StoreError {
    let retryable = matches!(
        e,
        NewSessionError::FailedToResolveAnyHostname(_) | NewSessionError::MetadataError(_)
    );
    classify(retryable, format!("scylla connect: {e}"))
}

fn agreement_err(e: SchemaAgreementError) -> StoreError {
    StoreError::Unavailable(format!("scylla schema agreement: {e}"))
}

fn corrupt(key: String, why: impl fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key,
        why: why.to_string(),
    }
}

/// Rows of a result as `R`; a type mismatch means the table is not the one this code expects.
fn typed_rows<'f, R: DeserializeRow<'f, 'f>>(
    res: &'f QueryRowsResult,
    what: &str,
) -> Result<scylla::deserialize::result::TypedRowIterator<'f, 'f, R>, StoreError> {
    res.rows::<R>()
        .map_err(|e| StoreError::Io(format!("scylla {what}: unexpected columns: {e}")))
}

fn into_rows(
    res: scylla::response::query_result::QueryResult,
    what: &str,
) -> Result<QueryRowsResult, StoreError> {
    res.into_rows_result()
        .map_err(|e| StoreError::Io(format!("scylla {what}: {e}")))
}

/// Outcome of a conditional statement on `writer_fence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cas {
    Applied,
    /// Not applied; the row's incarnation as the statement saw it, when the result carries it
    /// (`None`: no row, or a server that does not return the row).
    NotApplied(Option<u64>),
}

/// Reads the result row of a conditional statement, by column name: `[applied]` always comes
/// first, but the columns after it differ between servers (Scylla always returns the row as it
/// was before the statement, Cassandra only the condition's columns and only when not applied).
fn cas_outcome(names: &[&str], row: &[Option<CqlValue>], what: &str) -> Result<Cas, StoreError> {
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

// ---------------------------------------------------------------------------------------------
// Keys and values

/// Bucket (second partition-key column) of `seq` in the timeline.
fn timeline_bucket(seq: u64) -> u64 {
    seq / TIMELINE_BUCKET_SEQS
}

/// A u64 stored in a bigint column whose order does not matter (same 64 bits).
fn b(v: u64) -> i64 {
    v as i64
}

/// A u64 stored in a bigint column whose order matters: must not exceed `i64::MAX`.
fn ordered(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::Io(format!(
            "{what} {v} above {MAX_ORDERED} cannot be stored in order"
        ))
    })
}

/// A msg-id time floor as stored: a non-negative bigint, so that a negative one read back is
/// corrupt rather than a huge floor. Real floors are far below (a msg_id holds 42 bits of ms).
fn id_floor_ms(ms: u64) -> Result<i64, StoreError> {
    i64::try_from(ms).map_err(|_| {
        StoreError::Io(format!(
            "msg-id time floor {ms} above {MAX_ORDERED} cannot be stored"
        ))
    })
}

/// The order of statements across the logged batches of one commit: a commit that stops between
/// two chunks leaves a prefix of this order durable, and every prefix is safe (see
/// [`ScyllaStore::commit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Phase {
    /// First: a msg-id time floor is durable no later than any row of the same commit (the
    /// messages whose ids it covers). Reserving early only skips id time.
    IdFloor,
    /// Reserving seqs early only skips seqs.
    SeqBound,
    /// A group's record before its members (members of a group without a record would be
    /// orphans) and before the events that announce it.
    GroupPut,
    /// The `uid → group` index is written before the membership row and removed after it, so
    /// that it always holds at least the memberships (an extra entry is visible as "not in
    /// `members`", a missing one would be invisible).
    UserGroupPut,
    /// Memberships before the timeline entries and fan-outs that announce them (a group event
    /// never announces a change that is not durable).
    MemberPut,
    MemberDelete,
    UserGroupDelete,
    /// A bucket row without its timeline rows is an empty partition to readers.
    Bucket,
    /// Fan-out records before the sender's own timeline entries and dedup entries.
    OutboxPut,
    /// Timeline rows after their bucket rows (or readers would not find them).
    Timeline,
    /// "Appended at seq" only once the timeline row is there (replays skip indexed messages).
    MsgIdx,
    Cursor,
    /// Mutes and push tokens depend on nothing else in a batch.
    MutePut,
    MuteDelete,
    PushTokenPut,
    PushTokenDelete,
    /// Only ever deletes fan-outs confirmed by earlier commits.
    OutboxDelete,
    /// Last: "accepted, here is the ack" only once everything the ack vouches for is durable.
    Dedup,
}

/// One statement's values.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Row {
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
}

/// The primary key a [`Row`] writes (the put and the delete of one outbox entry, membership,
/// index entry, mute or push token share a key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
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
    PushToken(i64, String),
}

/// Estimated bytes of a statement in a batch beyond its values (statement id, lengths,
/// mutation overhead).
const ROW_OVERHEAD: usize = 48;

impl Row {
    fn phase(&self) -> Phase {
        match self {
            Row::IdFloor { .. } => Phase::IdFloor,
            Row::SeqBound { .. } => Phase::SeqBound,
            Row::Bucket { .. } => Phase::Bucket,
            Row::OutboxPut { .. } => Phase::OutboxPut,
            Row::Timeline { .. } => Phase::Timeline,
            Row::MsgIdx { .. } => Phase::MsgIdx,
            Row::Cursor { .. } => Phase::Cursor,
            Row::OutboxDelete { .. } => Phase::OutboxDelete,
            Row::Dedup { .. } => Phase::Dedup,
            Row::GroupPut { .. } => Phase::GroupPut,
            Row::UserGroupPut { .. } => Phase::UserGroupPut,
            Row::MemberPut { .. } => Phase::MemberPut,
            Row::MemberDelete { .. } => Phase::MemberDelete,
            Row::UserGroupDelete { .. } => Phase::UserGroupDelete,
            Row::MutePut { .. } => Phase::MutePut,
            Row::MuteDelete { .. } => Phase::MuteDelete,
            Row::PushTokenPut { .. } => Phase::PushTokenPut,
            Row::PushTokenDelete { .. } => Phase::PushTokenDelete,
        }
    }

    fn key(&self) -> Key {
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
            Row::PushTokenPut { uid, device_id, .. } | Row::PushTokenDelete { uid, device_id } => {
                Key::PushToken(*uid, device_id.clone())
            }
        }
    }

    /// Estimated size in a batch (values plus [`ROW_OVERHEAD`]).
    fn size(&self) -> usize {
        ROW_OVERHEAD
            + match self {
                Row::IdFloor { .. } => 12,
                Row::SeqBound { .. } | Row::Bucket { .. } => 16,
                Row::OutboxPut {
                    recipients, msg, ..
                } => 12 + 8 * recipients.len() + msg.len(),
                Row::Timeline { msg, .. } => 24 + msg.len(),
                Row::MsgIdx { .. } => 24,
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
                | Row::MuteDelete { .. } => 16,
                Row::MemberPut { .. } => 26,
                Row::PushTokenPut {
                    device_id, token, ..
                } => 10 + device_id.len() + token.len(),
                Row::PushTokenDelete { device_id, .. } => 8 + device_id.len(),
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
            Row::PushTokenPut {
                uid,
                device_id,
                provider,
                token,
            } => (uid, device_id.as_str(), provider, token.as_str()).serialize(ctx, w),
            Row::PushTokenDelete { uid, device_id } => (uid, device_id.as_str()).serialize(ctx, w),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(msg.encoded_len());
    msg.encode(&mut v);
    v
}

/// Rows of a batch with one row per key: the later op on a key replaces the earlier one (in the
/// earlier one's place).
#[derive(Default)]
struct Merged {
    rows: Vec<Row>,
    at: HashMap<Key, usize>,
}

impl Merged {
    fn put(&mut self, row: Row) {
        match self.at.entry(row.key()) {
            Entry::Occupied(e) => self.rows[*e.get()] = row,
            Entry::Vacant(e) => {
                e.insert(self.rows.len());
                self.rows.push(row);
            }
        }
    }
}

/// Translates ops into rows, merged per key (the later op wins).
fn merge(ops: Vec<Op>) -> Result<Vec<Row>, StoreError> {
    let mut m = Merged::default();
    for op in ops {
        match op {
            Op::IdFloor { generator, ms } => m.put(Row::IdFloor {
                generator: i32::from(generator),
                ms: id_floor_ms(ms)?,
            }),
            Op::SeqBound { uid, bound } => m.put(Row::SeqBound {
                uid: b(uid.0),
                bound: b(bound.0),
            }),
            Op::Append { uid, msg } => {
                let seq = ordered("seq", msg.seq.0)?;
                let bucket = ordered("bucket", timeline_bucket(msg.seq.0))?;
                m.put(Row::Bucket {
                    uid: b(uid.0),
                    bucket,
                });
                m.put(Row::MsgIdx {
                    uid: b(uid.0),
                    msg_id: b(msg.msg_id.0),
                    seq,
                });
                m.put(Row::Timeline {
                    uid: b(uid.0),
                    bucket,
                    seq,
                    msg: encode(&msg),
                });
            }
            Op::Dedup {
                uid,
                client_msg_id,
                entry,
            } => m.put(Row::Dedup {
                uid: b(uid.0),
                client_msg_id: b(client_msg_id),
                msg_id: b(entry.msg_id.0),
                seq: b(entry.seq.0),
                server_time_ms: b(entry.server_time_ms),
                prev_seq: b(entry.prev_seq.0),
            }),
            Op::Cursor {
                uid,
                device_id,
                seq,
            } => m.put(Row::Cursor {
                uid: b(uid.0),
                device_id,
                seq: b(seq.0),
            }),
            Op::OutboxPut(e) => m.put(Row::OutboxPut {
                shard: i32::from(e.shard.0),
                msg_id: ordered("outbox msg_id", e.msg_id.0)?,
                recipients: e.recipients.iter().map(|r| b(r.0)).collect(),
                msg: encode(&e.msg),
            }),
            Op::OutboxDelete { shard, msg_id } => m.put(Row::OutboxDelete {
                shard: i32::from(shard.0),
                msg_id: ordered("outbox msg_id", msg_id.0)?,
            }),
            Op::GroupPut(g) => m.put(Row::GroupPut {
                gid: b(g.group.0),
                name: g.name,
                creator: b(g.creator.0),
                owner: b(g.owner.0),
                announcement: g.announcement,
                created_ms: b(g.created_ms),
            }),
            Op::MemberPut { group, member } => {
                m.put(Row::UserGroupPut {
                    uid: b(member.uid.0),
                    gid: b(group.0),
                });
                m.put(Row::MemberPut {
                    gid: b(group.0),
                    uid: b(member.uid.0),
                    role: i16::from(member.role),
                    joined_ms: b(member.joined_ms),
                });
            }
            Op::MemberDelete { group, uid } => {
                m.put(Row::UserGroupDelete {
                    uid: b(uid.0),
                    gid: b(group.0),
                });
                m.put(Row::MemberDelete {
                    gid: b(group.0),
                    uid: b(uid.0),
                });
            }
            Op::Mute { uid, peer, muted } => {
                let (uid, peer) = (b(uid.0), b(peer));
                m.put(if muted {
                    Row::MutePut { uid, peer }
                } else {
                    Row::MuteDelete { uid, peer }
                });
            }
            Op::PushToken { uid, token } => {
                let uid = b(uid.0);
                m.put(if token.token.is_empty() {
                    Row::PushTokenDelete {
                        uid,
                        device_id: token.device_id,
                    }
                } else {
                    Row::PushTokenPut {
                        uid,
                        device_id: token.device_id,
                        provider: i16::from(token.provider),
                        token: token.token,
                    }
                });
            }
        }
    }
    Ok(m.rows)
}

/// Merges `ops` (the later op on a key wins), orders the rows by [`Phase`] (stable: op order
/// within a phase) and cuts them into chunks of at most `max_bytes` estimated bytes and
/// [`MAX_BATCH_STATEMENTS`] statements. A row larger than `max_bytes` gets a chunk of its own.
fn plan(ops: Vec<Op>, max_bytes: usize) -> Result<Vec<Vec<Row>>, StoreError> {
    let mut rows = merge(ops)?;
    rows.sort_by_key(Row::phase);
    let mut chunks = Vec::new();
    let mut cur: Vec<Row> = Vec::new();
    let mut bytes = 0usize;
    for row in rows {
        let size = row.size();
        if !cur.is_empty()
            && (bytes.saturating_add(size) > max_bytes || cur.len() >= MAX_BATCH_STATEMENTS)
        {
            chunks.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        cur.push(row);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    Ok(chunks)
}

// ---------------------------------------------------------------------------------------------
// Schema

/// Checks that `ks` is a plain lowercase CQL identifier (it is spliced into statements).
fn check_keyspace(ks: &str) -> Result<(), StoreError> {
    let ok = !ks.is_empty()
        && ks.len() <= 48
        && ks.starts_with(|c: char| c.is_ascii_lowercase())
        && ks
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Io(format!(
            "bad keyspace name {ks:?}: want [a-z][a-z0-9_]{{0,47}}"
        )))
    }
}

/// The statements of `deploy/scylla/schema.cql` for keyspace `ks` with `rf` replicas per
/// datacenter, whitespace normalised.
fn schema_statements(ks: &str, rf: u32) -> Result<Vec<String>, StoreError> {
    check_keyspace(ks)?;
    if rf == 0 {
        return Err(StoreError::Io("replication factor 0".into()));
    }
    let bad = |why: String| StoreError::Io(format!("deploy/scylla/schema.cql: {why}"));
    let text: String = SCHEMA_CQL
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    for stmt in text.split(';') {
        let stmt = stmt.split_whitespace().collect::<Vec<_>>().join(" ");
        if stmt.is_empty() {
            continue;
        }
        let upper = stmt.to_ascii_uppercase();
        if upper.starts_with("CREATE KEYSPACE ") {
            if !out.is_empty() {
                return Err(bad("the keyspace statement must come first".into()));
            }
            let want = format!("CREATE KEYSPACE IF NOT EXISTS {SCHEMA_KEYSPACE} WITH");
            if !stmt.starts_with(&want) {
                return Err(bad(format!("keyspace statement does not start {want:?}")));
            }
            out.push(format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                 {{'class': 'NetworkTopologyStrategy', 'replication_factor': {rf}}} \
                 AND durable_writes = true"
            ));
        } else {
            let prefix = format!("CREATE TABLE IF NOT EXISTS {SCHEMA_KEYSPACE}.");
            let Some(rest) = stmt.strip_prefix(&prefix) else {
                return Err(bad(format!("unexpected statement {stmt:?}")));
            };
            if out.is_empty() {
                return Err(bad("the keyspace statement must come first".into()));
            }
            out.push(format!("CREATE TABLE IF NOT EXISTS {ks}.{rest}"));
        }
    }
    if out.is_empty() {
        return Err(bad("no statements".into()));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Session

/// Builds a session on a new `scylla-driver` thread that keeps driving it until the returned
/// sender is dropped.
async fn open_session(
    nodes: &[String],
    keyspace: &str,
) -> Result<(Session, oneshot::Sender<()>), StoreError> {
    if nodes.is_empty() {
        return Err(StoreError::Io("scylla connect: no nodes given".into()));
    }
    let nodes = nodes.to_vec();
    let keyspace = keyspace.to_owned();
    let (ready_tx, ready_rx) = oneshot::channel::<Result<Session, StoreError>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("scylla-driver".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(StoreError::Io(format!("driver runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                let profile = ExecutionProfile::builder()
                    .consistency(Consistency::LocalQuorum)
                    .serial_consistency(Some(SerialConsistency::LocalSerial))
                    .request_timeout(Some(REQUEST_TIMEOUT))
                    .build();
                let built = SessionBuilder::new()
                    .known_nodes(&nodes)
                    .default_execution_profile_handle(profile.into_handle())
                    .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
                    .keyspaces_to_fetch([keyspace])
                    .build()
                    .await
                    .map_err(session_err);
                let ok = built.is_ok();
                // If the caller went away the session comes back in the error and is dropped.
                if ready_tx.send(built).is_ok() && ok {
                    // Resolves (with an error) when the store's sender is dropped.
                    let _ = stop_rx.await;
                }
            });
        })
        .map_err(|e| StoreError::Io(format!("spawn scylla driver thread: {e}")))?;
    let session = ready_rx
        .await
        .map_err(|_| StoreError::Io("scylla driver thread died".into()))??;
    Ok((session, stop_tx))
}

impl ScyllaStore {
    /// Connects to the cluster through `nodes` (`host:port`, at least one reachable; the others
    /// are discovered) and prepares every statement against `keyspace`, whose tables must exist
    /// ([`ScyllaStore::create_schema`] or `cqlsh -f deploy/scylla/schema.cql`).
    pub async fn connect(nodes: &[String], keyspace: &str) -> Result<ScyllaStore, StoreError> {
        check_keyspace(keyspace)?;
        let (session, driver) = open_session(nodes, keyspace).await?;
        let st = Statements::prepare(&session, keyspace).await?;
        Ok(ScyllaStore {
            inner: Arc::new(Inner {
                session,
                st,
                keyspace: keyspace.to_owned(),
                _driver: driver,
            }),
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
        })
    }

    /// Creates `keyspace` (NetworkTopologyStrategy, `replication_factor` replicas in every
    /// datacenter) and its tables from `deploy/scylla/schema.cql`, if they do not exist, and
    /// waits for schema agreement. Production uses 3; tests on one node use 1.
    pub async fn create_schema(
        nodes: &[String],
        keyspace: &str,
        replication_factor: u32,
    ) -> Result<(), StoreError> {
        let stmts = schema_statements(keyspace, replication_factor)?;
        let (session, _driver) = open_session(nodes, keyspace).await?;
        for stmt in &stmts {
            session
                .query_unpaged(stmt.as_str(), &[])
                .await
                .map_err(|e| exec_err("schema", e))?;
        }
        session
            .await_schema_agreement()
            .await
            .map_err(agreement_err)?;
        Ok(())
    }

    /// The same store with another bound on the estimated size of one logged batch (see
    /// [`ScyllaStore::commit`]); e.g. to match a cluster's `batch_size_fail_threshold_in_kb`.
    pub fn with_max_batch_bytes(mut self, max_batch_bytes: usize) -> ScyllaStore {
        self.max_batch_bytes = max_batch_bytes.max(1);
        self
    }

    /// Keyspace the store reads and writes.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    /// One page of a prepared read.
    async fn page(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
        paging: PagingState,
        what: &str,
    ) -> Result<(QueryRowsResult, PagingStateResponse), StoreError> {
        let (res, next) = self
            .inner
            .session
            .execute_single_page(st, values, paging)
            .await
            .map_err(|e| exec_err(what, e))?;
        Ok((into_rows(res, what)?, next))
    }

    /// A read that returns at most one row.
    async fn point(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
        what: &str,
    ) -> Result<QueryRowsResult, StoreError> {
        let res = self
            .inner
            .session
            .execute_unpaged(st, values)
            .await
            .map_err(|e| exec_err(what, e))?;
        into_rows(res, what)
    }

    /// Appends to `out` the entries of one timeline bucket with seq > `after`, until `out` holds
    /// `limit` entries.
    async fn read_bucket(
        &self,
        uid: UserId,
        bucket: i64,
        after: i64,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> Result<(), StoreError> {
        let want = i32::try_from(limit - out.len()).unwrap_or(i32::MAX);
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(Read::TimelineAfter),
                    (b(uid.0), bucket, after, want),
                    paging,
                    "timeline",
                )
                .await?;
            for row in typed_rows::<(i64, Vec<u8>)>(&rows, "timeline")? {
                let key = || format!("timeline/{uid}/{bucket}");
                let (seq, blob) = row.map_err(|e| corrupt(key(), e))?;
                let msg = Message::decode(Bytes::from(blob))
                    .map_err(|e| corrupt(format!("{}/{seq}", key()), e))?;
                if i64::try_from(msg.seq.0) != Ok(seq)
                    || i64::try_from(timeline_bucket(msg.seq.0)) != Ok(bucket)
                {
                    return Err(corrupt(
                        format!("{}/{seq}", key()),
                        format!("message seq {} does not match its key", msg.seq),
                    ));
                }
                out.push(msg);
                if out.len() >= limit {
                    return Ok(());
                }
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => return Ok(()),
                std::ops::ControlFlow::Continue(p) => paging = p,
            }
        }
    }

    /// Every row of the partition `key` (a bigint partition key) of a prepared scan, all pages.
    /// Only for partitions with a bound on their size (a group's members, a user's lists).
    async fn scan<R>(
        &self,
        st: &PreparedStatement,
        key: u64,
        what: &str,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f> DeserializeRow<'f, 'f>,
    {
        let mut out = Vec::new();
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self.page(st, (b(key),), paging, what).await?;
            for row in typed_rows::<R>(&rows, what)? {
                out.push(row.map_err(|e| corrupt(format!("{what}/{key}"), e))?);
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => return Ok(out),
                std::ops::ControlFlow::Continue(p) => paging = p,
            }
        }
    }

    /// Executes a fence LWT and reads its outcome.
    async fn cas(
        &self,
        fence: Fence,
        values: impl SerializeRow,
        what: &str,
    ) -> Result<Cas, StoreError> {
        let rows = self.point(self.inner.st.fence(fence), values, what).await?;
        let names: Vec<&str> = rows.column_specs().iter().map(|c| c.name()).collect();
        let row = rows
            .maybe_first_row::<CqlRow>()
            .map_err(|e| StoreError::Io(format!("scylla {what}: {e}")))?
            .ok_or_else(|| StoreError::Io(format!("scylla {what}: empty LWT result")))?;
        cas_outcome(&names, &row.columns, what)
    }

    /// The fence of `node` (`None`: never fenced), read with `LOCAL_SERIAL`: a Paxos read that
    /// sees every fence LWT completed before it.
    async fn read_fence(&self, node: u16) -> Result<Option<u64>, StoreError> {
        let rows = self
            .point(
                self.inner.st.read(Read::Fence),
                (i32::from(node),),
                "writer_fence",
            )
            .await?;
        match typed_rows::<(i64,)>(&rows, "writer_fence")?.next() {
            Some(row) => {
                let (fence,) = row.map_err(|e| corrupt(format!("writer_fence/{node}"), e))?;
                Ok(Some(fence as u64))
            }
            None => Ok(None),
        }
    }

    async fn send_chunk(&self, rows: &[Row]) -> Result<(), StoreError> {
        let mut batch = Batch::new(BatchType::Logged);
        for row in rows {
            batch.append_statement(self.inner.st.write(row.phase()).clone());
        }
        batch.set_is_idempotent(true);
        self.inner
            .session
            .batch(&batch, rows)
            .await
            .map_err(|e| exec_err("commit", e))?;
        Ok(())
    }
}

impl Store for ScyllaStore {
    /// Writes the batch as one LOGGED batch, or, when its estimated size exceeds the store's
    /// bound (512 KiB unless changed with [`ScyllaStore::with_max_batch_bytes`]), as several
    /// logged batches sent one after another.
    ///
    /// Ops on one key are merged first (the later wins). After the merge every key is written
    /// once, so the order of the statements does not change the final state and is chosen so
    /// that any prefix of the chunks is safe to leave behind if the commit stops midway (logic
    /// node crash, or an error returned after some chunks were applied): msg-id time floors, seq
    /// bounds, group records, `user_groups` puts, member puts, member deletes, `user_groups` deletes, timeline
    /// bucket rows, outbox puts, timeline rows, msg_id index, cursors, mutes, push tokens, outbox
    /// deletes, and dedup entries last (see [`Phase`]). Hence:
    /// - a dedup entry (what answers the client's retry with an ack) is durable only after the
    ///   message's timeline entry and its outbox record are: an ack is never given for a message
    ///   that could be lost;
    /// - an outbox record is durable before the sender's timeline entry, so a message present in
    ///   a timeline is always fanned out (the outbox is replayed by the shard's next owner);
    /// - a msg_id index row never points at a missing timeline row, so a replayed append skips
    ///   only appends that really happened;
    /// - msg-id time floors come first, so a message row is never durable without the floor
    ///   that covers its id: a restarted worker starts its ids above the floor and never hands
    ///   that id out again, even after the wall clock stepped back;
    /// - seq bounds come next, so a seq present in a timeline is never handed out again;
    /// - a membership change is durable before the group events announcing it, and the
    ///   `uid → group` index holds at least every membership (written before the member row,
    ///   removed after it).
    ///
    /// What a stopped multi-chunk commit can leave is a message in the sender's timeline and
    /// outbox whose send was never acknowledged; the client retries it with the same
    /// `client_msg_id` and gets a second message with the same `(from, client_msg_id)`, which
    /// clients can recognise. A duplicate, never a loss. Every chunk is idempotent, so committing
    /// the same batch again is also safe. A single-chunk commit has none of this.
    ///
    /// An error means the outcome is unknown (a timed-out logged batch is still replayed from the
    /// batchlog), not that nothing was written.
    ///
    /// **Fencing.** A batch with a [`WriteBatch::writer`] (also an empty one) first reads the
    /// writer's node fence with a `LOCAL_SERIAL` (Paxos) read and is refused with
    /// [`StoreError::Fenced`], nothing sent, when the fence is above the writer's incarnation.
    /// The check and the batch are two operations, not one: a fence that lands after the check
    /// is not seen by this batch (see the module docs for what closes that window).
    async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let WriteBatch { ops, writer } = batch;
        if ops.is_empty() && writer.is_none() {
            return Ok(());
        }
        let chunks = plan(ops, self.max_batch_bytes)?;
        if let Some(w) = writer {
            let fence = self.read_fence(w.node).await?.unwrap_or(0);
            if fence > w.incarnation {
                return Err(StoreError::Fenced {
                    node: w.node,
                    incarnation: w.incarnation,
                    fence,
                });
            }
        }
        if chunks.len() > 1 {
            tracing::warn!(
                chunks = chunks.len(),
                max_bytes = self.max_batch_bytes,
                "commit split into several logged batches; shrink the group commit"
            );
        }
        for chunk in &chunks {
            self.send_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Raises the fence of `node` to `incarnation` with lightweight
    /// transactions on `writer_fence` (serial consistency `LOCAL_SERIAL`, commit at
    /// `LOCAL_QUORUM`; Scylla syncs the commitlog of LWT writes, so the fence is durable on a
    /// local quorum when this returns):
    /// 1. `INSERT .. IF NOT EXISTS`: applied, the node had no fence, done. Otherwise the result
    ///    carries the fence in place (or, if it does not, a `LOCAL_SERIAL` read gets it);
    /// 2. a fence already at or above `incarnation` is returned as it is (never lowered);
    /// 3. else `UPDATE .. SET incarnation = <incarnation> IF incarnation = <fence seen>`:
    ///    applied, done; not applied, another fence of the same node changed the row in between,
    ///    and its result carries the new value: back to 2.
    ///
    /// Each round that goes on saw a concurrent fence raise the value, so the loop ends quickly;
    /// after 16 rounds (`FENCE_ROUNDS`) it gives up with [`StoreError::Unavailable`]. Errors
    /// (timeouts, Paxos contention reported by the server) are retryable and leave the fence
    /// raised or not; calling `fence` again is safe. The whole u64 is stored (bigint bits) and
    /// compared as unsigned here.
    async fn fence(&self, node: u16, incarnation: u64) -> Result<u64, StoreError> {
        let key = i32::from(node);
        let want = b(incarnation);
        // The fence as last seen; None: start with the insert.
        let mut seen: Option<u64> = None;
        for _ in 0..FENCE_ROUNDS {
            let current = match seen.take() {
                Some(c) => c,
                None => {
                    let values: FenceInsertValues = (key, want);
                    match self.cas(Fence::Insert, values, "fence insert").await? {
                        Cas::Applied => return Ok(incarnation),
                        Cas::NotApplied(Some(c)) => c,
                        Cas::NotApplied(None) => match self.read_fence(node).await? {
                            Some(c) => c,
                            // No row after all (deleted by hand?): insert again.
                            None => continue,
                        },
                    }
                }
            };
            if current >= incarnation {
                return Ok(current);
            }
            let values: FenceRaiseValues = (want, key, b(current));
            match self.cas(Fence::Raise, values, "fence raise").await? {
                Cas::Applied => return Ok(incarnation),
                Cas::NotApplied(now) => seen = now,
            }
        }
        Err(StoreError::Unavailable(format!(
            "fence of node {node}: still contended after {FENCE_ROUNDS} rounds"
        )))
    }

    async fn seq_bound(&self, uid: UserId) -> Result<Seq, StoreError> {
        let rows = self
            .point(self.inner.st.read(Read::SeqBound), (b(uid.0),), "seq_bound")
            .await?;
        match typed_rows::<(i64,)>(&rows, "seq_bound")?.next() {
            Some(row) => {
                let (bound,) = row.map_err(|e| corrupt(format!("seq_bound/{uid}"), e))?;
                Ok(Seq(bound as u64))
            }
            None => Ok(Seq(0)),
        }
    }

    async fn id_floor(&self, generator: u16) -> Result<u64, StoreError> {
        let rows = self
            .point(
                self.inner.st.read(Read::IdFloor),
                (i32::from(generator),),
                "id_floor",
            )
            .await?;
        match typed_rows::<(i64,)>(&rows, "id_floor")?.next() {
            Some(row) => {
                let key = || format!("id_floor/{generator}");
                let (ms,) = row.map_err(|e| corrupt(key(), e))?;
                // Written as a non-negative bigint only (see `id_floor_ms`).
                u64::try_from(ms).map_err(|_| corrupt(key(), format!("negative floor {ms}")))
            }
            None => Ok(0),
        }
    }

    async fn last_seq(&self, uid: UserId) -> Result<Seq, StoreError> {
        // Buckets from the highest down; a bucket row can exist without timeline rows (a commit
        // that stopped between chunks), so go on until a bucket has an entry.
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(Read::BucketsDesc),
                    (b(uid.0),),
                    paging,
                    "timeline_bucket",
                )
                .await?;
            for row in typed_rows::<(i64,)>(&rows, "timeline_bucket")? {
                let (bucket,) = row.map_err(|e| corrupt(format!("timeline_bucket/{uid}"), e))?;
                let last = self
                    .point(
                        self.inner.st.read(Read::TimelineLast),
                        (b(uid.0), bucket),
                        "timeline",
                    )
                    .await?;
                if let Some(row) = typed_rows::<(i64,)>(&last, "timeline")?.next() {
                    let (seq,) = row.map_err(|e| corrupt(format!("timeline/{uid}/{bucket}"), e))?;
                    return u64::try_from(seq).map(Seq).map_err(|_| {
                        corrupt(format!("timeline/{uid}/{bucket}/{seq}"), "negative seq")
                    });
                }
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => return Ok(Seq(0)),
                std::ops::ControlFlow::Continue(p) => paging = p,
            }
        }
    }

    async fn timeline(
        &self,
        uid: UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let Some(first) = after.0.checked_add(1) else {
            return Ok(Vec::new());
        };
        if limit == 0 || first > MAX_ORDERED {
            // No stored seq exceeds MAX_ORDERED.
            return Ok(Vec::new());
        }
        let after = b(after.0);
        let from = b(timeline_bucket(first));
        let mut out = Vec::with_capacity(limit.min(256));
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(Read::BucketsFrom),
                    (b(uid.0), from),
                    paging,
                    "timeline_bucket",
                )
                .await?;
            for row in typed_rows::<(i64,)>(&rows, "timeline_bucket")? {
                let (bucket,) = row.map_err(|e| corrupt(format!("timeline_bucket/{uid}"), e))?;
                self.read_bucket(uid, bucket, after, limit, &mut out)
                    .await?;
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => return Ok(out),
                std::ops::ControlFlow::Continue(p) => paging = p,
            }
        }
    }

    async fn seq_of(&self, uid: UserId, msg_id: MsgId) -> Result<Option<Seq>, StoreError> {
        let rows = self
            .point(
                self.inner.st.read(Read::MsgIdx),
                (b(uid.0), b(msg_id.0)),
                "msgidx",
            )
            .await?;
        match typed_rows::<(i64,)>(&rows, "msgidx")?.next() {
            Some(row) => {
                let (seq,) = row.map_err(|e| corrupt(format!("msgidx/{uid}/{msg_id}"), e))?;
                Ok(Some(Seq(seq as u64)))
            }
            None => Ok(None),
        }
    }

    async fn dedup(
        &self,
        uid: UserId,
        client_msg_id: u64,
    ) -> Result<Option<DedupEntry>, StoreError> {
        let rows = self
            .point(
                self.inner.st.read(Read::Dedup),
                (b(uid.0), b(client_msg_id)),
                "dedup",
            )
            .await?;
        match typed_rows::<(i64, i64, i64, i64)>(&rows, "dedup")?.next() {
            Some(row) => {
                let (msg_id, seq, time, prev) =
                    row.map_err(|e| corrupt(format!("dedup/{uid}/{client_msg_id}"), e))?;
                Ok(Some(DedupEntry {
                    msg_id: MsgId(msg_id as u64),
                    seq: Seq(seq as u64),
                    server_time_ms: time as u64,
                    prev_seq: Seq(prev as u64),
                }))
            }
            None => Ok(None),
        }
    }

    async fn cursor(&self, uid: UserId, device_id: &str) -> Result<Seq, StoreError> {
        let rows = self
            .point(
                self.inner.st.read(Read::Cursor),
                (b(uid.0), device_id),
                "cursor",
            )
            .await?;
        match typed_rows::<(i64,)>(&rows, "cursor")?.next() {
            Some(row) => {
                let (seq,) = row.map_err(|e| corrupt(format!("cursor/{uid}/{device_id}"), e))?;
                Ok(Seq(seq as u64))
            }
            None => Ok(Seq(0)),
        }
    }

    async fn outbox(&self, shard: ShardId) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut out = Vec::new();
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(Read::Outbox),
                    (i32::from(shard.0),),
                    paging,
                    "outbox",
                )
                .await?;
            for row in typed_rows::<(i64, Option<Vec<i64>>, Vec<u8>)>(&rows, "outbox")? {
                let (msg_id, recipients, blob) =
                    row.map_err(|e| corrupt(format!("outbox/{shard}"), e))?;
                let key = || format!("outbox/{shard}/{msg_id}");
                let msg_id =
                    u64::try_from(msg_id).map_err(|_| corrupt(key(), "negative msg_id"))?;
                let msg = Message::decode(Bytes::from(blob)).map_err(|e| corrupt(key(), e))?;
                out.push(OutboxEntry {
                    shard,
                    msg_id: MsgId(msg_id),
                    recipients: recipients
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| UserId(r as u64))
                        .collect(),
                    msg,
                });
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => return Ok(out),
                std::ops::ControlFlow::Continue(p) => paging = p,
            }
        }
    }

    async fn group(&self, group: GroupId) -> Result<Option<GroupDesc>, StoreError> {
        let rows = self
            .point(self.inner.st.read(Read::Group), (b(group.0),), "group_info")
            .await?;
        match typed_rows::<GroupRow>(&rows, "group_info")?.next() {
            Some(row) => {
                let (name, creator, owner, announcement, created_ms) =
                    row.map_err(|e| corrupt(format!("group_info/{group}"), e))?;
                // The store writes empty strings as such; a null (written by another tool) reads
                // as empty too.
                Ok(Some(GroupDesc {
                    group,
                    name: name.unwrap_or_default(),
                    creator: UserId(creator as u64),
                    owner: UserId(owner as u64),
                    announcement: announcement.unwrap_or_default(),
                    created_ms: created_ms as u64,
                }))
            }
            None => Ok(None),
        }
    }

    async fn members(&self, group: GroupId) -> Result<Vec<MemberRecord>, StoreError> {
        let rows: Vec<MemberRow> = self
            .scan(self.inner.st.read(Read::Members), group.0, "group_members")
            .await?;
        let mut out = rows
            .into_iter()
            .map(|(uid, role, joined_ms)| {
                let uid = UserId(uid as u64);
                let role = u8::try_from(role).map_err(|_| {
                    corrupt(
                        format!("group_members/{group}/{uid}"),
                        format!("role {role} out of range"),
                    )
                })?;
                Ok(MemberRecord {
                    uid,
                    role,
                    joined_ms: joined_ms as u64,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Clustered by the signed bigint: uids above i64::MAX come first. Unsigned order here.
        out.sort_unstable_by_key(|m| m.uid);
        Ok(out)
    }

    async fn groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError> {
        let rows: Vec<(i64,)> = self
            .scan(self.inner.st.read(Read::UserGroups), uid.0, "user_groups")
            .await?;
        let mut out: Vec<GroupId> = rows.into_iter().map(|(g,)| GroupId(g as u64)).collect();
        out.sort_unstable();
        Ok(out)
    }

    async fn mutes(&self, uid: UserId) -> Result<Vec<u64>, StoreError> {
        let rows: Vec<(i64,)> = self
            .scan(self.inner.st.read(Read::Mutes), uid.0, "mutes")
            .await?;
        let mut out: Vec<u64> = rows.into_iter().map(|(p,)| p as u64).collect();
        out.sort_unstable();
        Ok(out)
    }

    async fn push_tokens(&self, uid: UserId) -> Result<Vec<PushToken>, StoreError> {
        let rows: Vec<PushTokenRow> = self
            .scan(self.inner.st.read(Read::PushTokens), uid.0, "push_tokens")
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (device_id, provider, token) in rows {
            let key = || format!("push_tokens/{uid}/{device_id}");
            let provider = u8::try_from(provider)
                .map_err(|_| corrupt(key(), format!("provider {provider} out of range")))?;
            // An empty token is never stored (it deletes the registration).
            let token = token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| corrupt(key(), "empty push token"))?;
            out.push(PushToken {
                device_id,
                provider,
                token,
            });
        }
        // Text clusters in UTF-8 byte order, which is `str`'s order; sorting costs nothing and
        // does not depend on it.
        out.sort_unstable_by(|x, y| x.device_id.cmp(&y.device_id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            // Not ordered, but stored non-negative so that the read can tell corruption.
            Op::IdFloor {
                generator: 1,
                ms: too_big,
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

    /// The ops logic writes for one c2c send, plus a recipient append, a cursor and an outbox
    /// delete from earlier rounds, and the msg-id floor the worker raises at the end of a round,
    /// in the worker's order.
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
                Phase::MsgIdx,
                Phase::MsgIdx,
                Phase::Cursor,
                Phase::OutboxDelete,
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
        let rows = merge(vec![member_delete(7, 3)]).expect("merge");
        assert_eq!(
            rows,
            vec![
                Row::UserGroupDelete { uid: 3, gid: 7 },
                Row::MemberDelete { gid: 7, uid: 3 },
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
        // Delete then put: the member is back, in both tables.
        let rows = merge(vec![member_delete(7, 3), member_put(7, 3, 0)]).expect("merge");
        assert_eq!(
            phases(&rows),
            vec![Phase::UserGroupPut, Phase::MemberPut],
            "{rows:?}"
        );
        // Put then delete: gone from both.
        let rows = merge(vec![member_put(7, 3, 0), member_delete(7, 3)]).expect("merge");
        assert_eq!(
            phases(&rows),
            vec![Phase::UserGroupDelete, Phase::MemberDelete]
        );
        // Put, put: the later record.
        let rows = merge(vec![member_put(7, 3, 0), member_put(7, 3, 2)]).expect("merge");
        assert!(matches!(rows[1], Row::MemberPut { role: 2, .. }));
        // The same uid in two groups, two uids in one group: four keys each.
        let rows = merge(vec![
            member_put(7, 3, 0),
            member_put(8, 3, 0),
            member_put(7, 4, 0),
            member_delete(8, 4),
        ])
        .expect("merge");
        assert_eq!(rows.len(), 8);
        // A user-group index key is (uid, gid), a member key (gid, uid): uid 7 in group 3 is not
        // uid 3 in group 7.
        let rows = merge(vec![member_put(7, 3, 0), member_delete(3, 7)]).expect("merge");
        assert_eq!(rows.len(), 4);
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
                Phase::Bucket,
                Phase::Bucket,
                Phase::OutboxPut,
                Phase::Timeline,
                Phase::Timeline,
                Phase::MsgIdx,
                Phase::MsgIdx,
                Phase::Cursor,
                Phase::MutePut,
                Phase::MuteDelete,
                Phase::PushTokenPut,
                Phase::PushTokenDelete,
                Phase::OutboxDelete,
                Phase::Dedup,
            ]
        );
        // Split into single statements: same order.
        let flat: Vec<Row> = plan(ops, 1).expect("plan").into_iter().flatten().collect();
        assert_eq!(flat, chunks[0]);
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
            token_op(1, "phone", 1, "t"),
            token_op(1, "pad", 1, ""),
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
                | Read::Fence => <(i64,)>::type_check(&specs),
                Read::TimelineAfter => <(i64, Vec<u8>)>::type_check(&specs),
                Read::Dedup => <(i64, i64, i64, i64)>::type_check(&specs),
                Read::Outbox => <(i64, Option<Vec<i64>>, Vec<u8>)>::type_check(&specs),
                Read::Group => GroupRow::type_check(&specs),
                Read::Members => MemberRow::type_check(&specs),
                Read::PushTokens => PushTokenRow::type_check(&specs),
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
                "group_info",
                "group_members",
                "user_groups",
                "mutes",
                "push_tokens",
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
        assert!(table("group_info").contains("PRIMARY KEY ((gid))"));
        assert!(table("group_members").contains("PRIMARY KEY ((gid), uid)"));
        assert!(table("group_members").contains("role smallint"));
        assert!(table("user_groups").contains("PRIMARY KEY ((uid), gid)"));
        assert!(table("mutes").contains("PRIMARY KEY ((uid), peer)"));
        assert!(table("push_tokens").contains("PRIMARY KEY ((uid), device_id)"));
        assert!(table("push_tokens").contains("provider smallint"));
        assert!(table("push_tokens").contains("push_token text"));
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
}
