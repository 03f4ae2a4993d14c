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
//! | `push_watch`      | ((shard), uid, seq)        | — (push decision pending); TTL 1 d |
//! | `group_info`      | ((gid))                    | name, creator, owner, announcement, created_ms |
//! | `group_members`   | ((gid), uid)               | role, joined_ms                    |
//! | `user_groups`     | ((uid), gid)               | — (index for `groups_of`)          |
//! | `user_large_groups` | ((uid), gid)             | — (index for `large_groups_of`)    |
//! | `group_timeline`  | ((gid, seq / 100000), seq) | msg blob of a large group's post   |
//! | `group_timeline_bucket` | ((gid), bucket)      | — (which buckets exist)            |
//! | `group_reads`     | ((uid), gid)               | seq (read cursor in a large group) |
//! | `mutes`           | ((uid), peer)              | —                                  |
//! | `user_flags`      | ((uid), flag)              | —                                  |
//! | `push_tokens`     | ((uid), device_id)         | provider, push_token               |
//! | `org_records`     | ((org), version), org = 0  | record blob ([`OrgRecord::to_bytes`]) |
//! | `writer_fence`    | ((node))                   | incarnation (see **Fencing**)      |
//!
//! **Timelines.** A user's timeline and a large group's (read diffusion: each post stored once)
//! are stored and read the same way: partition `(id, seq / 100000)` (at most 100 000 entries),
//! plus a bucket table that lists the partitions in use, written in the same batch. A range
//! read walks the buckets up from the one of `after + 1`; the head (`last_seq`, `group_head`)
//! walks them down to the first bucket with an entry. Seqs above `i64::MAX` are refused.
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
//!
//! **Files.** One job each; everything but [`ScyllaStore`] is private to this module.
//! - `mod.rs`: [`ScyllaStore`], its public API, the read and batch helpers on the session and
//!   the [`Store`] impl (what each trait method reads or writes);
//! - `statements.rs`: the CQL text of every write, read and fence statement, and their
//!   preparation (page sizes, consistency, idempotence);
//! - `rows.rs`: the row model: how values are stored in columns (bigint bits, ordered columns,
//!   timeline buckets), the rows a commit writes and their serialization, and the decoding of
//!   result rows;
//! - `batch.rs`: planning a commit: merging ops per key, the [`Phase`](batch::Phase) order and
//!   the split into logged batches;
//! - `schema.rs`: loading `deploy/scylla/schema.cql` for [`ScyllaStore::create_schema`] and
//!   checking keyspace names;
//! - `session.rs`: building the session (execution profile, timestamps, the driver thread);
//! - `errors.rs`: mapping driver errors to [`StoreError`] (retryable or not);
//! - `tests.rs`: unit tests that need no server (the statements against the schema file, the
//!   batch planning, the schema loader).
//!
//! [`MonotonicTimestampGenerator`]: scylla::policies::timestamp_generator::MonotonicTimestampGenerator

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use im_shared::org::OrgRecord;
use im_shared::proto::{GroupDesc, Message};
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};
use scylla::client::session::Session;
use scylla::deserialize::row::DeserializeRow;
use scylla::response::query_result::QueryRowsResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::Row as CqlRow;
use tokio::sync::oneshot;

use super::{DedupEntry, MemberRecord, OutboxEntry, PushToken, Store, StoreError, WriteBatch};

mod batch;
mod errors;
mod rows;
mod schema;
mod session;
mod statements;
#[cfg(test)]
mod tests;

use batch::{plan, DEFAULT_MAX_BATCH_BYTES};
use errors::{agreement_err, corrupt, exec_err};
use rows::{
    b, cas_outcome, into_rows, timeline_bucket, typed_rows, Cas, Row, MAX_ORDERED, ORG_PARTITION,
};
use schema::{check_keyspace, schema_statements};
use session::open_session;
use statements::{
    CursorRow, Fence, FenceInsertValues, FenceRaiseValues, GroupRow, MemberRow, OrgRow,
    PushTokenRow, PushWatchRow, Read, Statements, TimelineOf, FENCE_ROUNDS,
};

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

    /// Appends to `out` the entries of one bucket of the timeline `id` of kind `tl` (a user's
    /// or a large group's) with seq > `after`, until `out` holds `limit` entries.
    async fn read_bucket(
        &self,
        tl: TimelineOf,
        id: u64,
        bucket: i64,
        after: i64,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> Result<(), StoreError> {
        let what = tl.table();
        let want = i32::try_from(limit - out.len()).unwrap_or(i32::MAX);
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(tl.after()),
                    (b(id), bucket, after, want),
                    paging,
                    what,
                )
                .await?;
            for row in typed_rows::<(i64, Vec<u8>)>(&rows, what)? {
                let key = || format!("{what}/{id}/{bucket}");
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

    /// Seq of the last entry of the timeline `id` of kind `tl` (0 if empty): its buckets from the
    /// highest down; a bucket row can exist without entries (a commit that stopped between
    /// chunks), so go on until a bucket has an entry.
    async fn head(&self, tl: TimelineOf, id: u64) -> Result<Seq, StoreError> {
        let (what, buckets) = (tl.table(), tl.bucket_table());
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(tl.buckets_desc()),
                    (b(id),),
                    paging,
                    buckets,
                )
                .await?;
            for row in typed_rows::<(i64,)>(&rows, buckets)? {
                let (bucket,) = row.map_err(|e| corrupt(format!("{buckets}/{id}"), e))?;
                let last = self
                    .point(self.inner.st.read(tl.last()), (b(id), bucket), what)
                    .await?;
                if let Some(row) = typed_rows::<(i64,)>(&last, what)?.next() {
                    let (seq,) = row.map_err(|e| corrupt(format!("{what}/{id}/{bucket}"), e))?;
                    return u64::try_from(seq).map(Seq).map_err(|_| {
                        corrupt(format!("{what}/{id}/{bucket}/{seq}"), "negative seq")
                    });
                }
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => return Ok(Seq(0)),
                std::ops::ControlFlow::Continue(p) => paging = p,
            }
        }
    }

    /// Up to `limit` entries of the timeline `id` of kind `tl` with seq > `after`, ascending:
    /// its buckets from the one of `after + 1` up, each read from `after` on.
    async fn range(
        &self,
        tl: TimelineOf,
        id: u64,
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
        let buckets = tl.bucket_table();
        let after = b(after.0);
        let from = b(timeline_bucket(first));
        let mut out = Vec::with_capacity(limit.min(256));
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(tl.buckets_from()),
                    (b(id), from),
                    paging,
                    buckets,
                )
                .await?;
            for row in typed_rows::<(i64,)>(&rows, buckets)? {
                let (bucket,) = row.map_err(|e| corrupt(format!("{buckets}/{id}"), e))?;
                self.read_bucket(tl, id, bucket, after, limit, &mut out)
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
    /// bounds, group records, org record puts, `user_groups` and `user_large_groups` puts, member
    /// puts, member deletes, `user_groups` and `user_large_groups` deletes, timeline bucket rows,
    /// outbox puts, timeline rows, push-watch puts, msg_id index, large groups' bucket and
    /// timeline rows, cursors, large-group read cursors, mutes, push tokens, outbox deletes,
    /// push-watch deletes, deletes of replaced org records, and dedup entries last (see
    /// [`Phase`]). Hence:
    /// - a dedup entry (what answers the client's retry with an ack) is durable only after the
    ///   message's timeline entry and its outbox record are: an ack is never given for a message
    ///   that could be lost;
    /// - an outbox record is durable before the sender's timeline entry, so a message present in
    ///   a timeline is always fanned out (the outbox is replayed by the shard's next owner);
    /// - a msg_id index row never points at a missing timeline row, so a replayed append skips
    ///   only appends that really happened;
    /// - push watches are set with the timeline rows of the round that appends their messages
    ///   (after the timeline row, before its msg_id index row): a watch never names a missing
    ///   entry, and a replayed append never skips one whose watch is missing. They are cleared
    ///   with the other deletes, near the end: a watch left behind by a stopped commit is only
    ///   decided once more after a restart;
    /// - msg-id time floors come first, so a message row is never durable without the floor
    ///   that covers its id: a restarted worker starts its ids above the floor and never hands
    ///   that id out again, even after the wall clock stepped back;
    /// - seq bounds come next, so a seq present in a timeline is never handed out again;
    /// - a membership change is durable before the group events announcing it, and the
    ///   `uid → group` index holds at least every membership (written before the member row,
    ///   removed after it);
    /// - a user's `uid → large group` entry is durable before the timeline entries of the same
    ///   batch (the `BecameLarge` event that sets it): the user is never told a group is large
    ///   without its shard knowing it;
    /// - a large group's posts come after the timeline entries and fan-outs of the same batch
    ///   (the group's first post, which makes it load as large, is never durable before the
    ///   events telling its members) and before the dedup entries (a post is acknowledged only
    ///   once durable, so the group's head covers it and its seq is never handed out again);
    /// - an org record is durable before the delete of the version it replaces (another row of
    ///   `org_records`): a stopped commit can leave the superseded record next to its
    ///   replacement (readers apply records by version, so it changes nothing), never a key with
    ///   no record.
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
    ///
    /// [`Phase`]: batch::Phase
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
        self.head(TimelineOf::User, uid.0).await
    }

    async fn timeline(
        &self,
        uid: UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.range(TimelineOf::User, uid.0, after, limit).await
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

    async fn cursors(&self, uid: UserId) -> Result<Vec<(String, Seq)>, StoreError> {
        let rows: Vec<CursorRow> = self
            .scan(self.inner.st.read(Read::Cursors), uid.0, "cursor")
            .await?;
        let mut out: Vec<(String, Seq)> = rows
            .into_iter()
            .map(|(device_id, seq)| (device_id, Seq(seq as u64)))
            .collect();
        // Text clusters in UTF-8 byte order, which is `str`'s order; sorting costs nothing and
        // does not depend on it.
        out.sort_unstable_by(|x, y| x.0.cmp(&y.0));
        Ok(out)
    }

    async fn push_watches(&self, shard: ShardId) -> Result<Vec<(UserId, Seq)>, StoreError> {
        let mut out = Vec::new();
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(Read::PushWatches),
                    (i32::from(shard.0),),
                    paging,
                    "push_watch",
                )
                .await?;
            for row in typed_rows::<PushWatchRow>(&rows, "push_watch")? {
                let (uid, seq) = row.map_err(|e| corrupt(format!("push_watch/{shard}"), e))?;
                let uid = UserId(uid as u64);
                // Written as an ordered (non-negative) bigint only.
                let seq = u64::try_from(seq).map_err(|_| {
                    corrupt(format!("push_watch/{shard}/{uid}/{seq}"), "negative seq")
                })?;
                out.push((uid, Seq(seq)));
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => break,
                std::ops::ControlFlow::Continue(p) => paging = p,
            }
        }
        // Clustered by the signed uid bigint: uids above i64::MAX come first. Unsigned order here.
        out.sort_unstable();
        Ok(out)
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

    async fn large_groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError> {
        let rows: Vec<(i64,)> = self
            .scan(
                self.inner.st.read(Read::LargeGroups),
                uid.0,
                "user_large_groups",
            )
            .await?;
        let mut out: Vec<GroupId> = rows.into_iter().map(|(g,)| GroupId(g as u64)).collect();
        // Clustered by the signed bigint: gids above i64::MAX come first. Unsigned order here.
        out.sort_unstable();
        Ok(out)
    }

    async fn group_head(&self, group: GroupId) -> Result<Seq, StoreError> {
        self.head(TimelineOf::Group, group.0).await
    }

    async fn group_timeline(
        &self,
        group: GroupId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.range(TimelineOf::Group, group.0, after, limit).await
    }

    async fn group_read(&self, uid: UserId, group: GroupId) -> Result<Seq, StoreError> {
        let rows = self
            .point(
                self.inner.st.read(Read::GroupCursor),
                (b(uid.0), b(group.0)),
                "group_reads",
            )
            .await?;
        match typed_rows::<(i64,)>(&rows, "group_reads")?.next() {
            Some(row) => {
                let (seq,) = row.map_err(|e| corrupt(format!("group_reads/{uid}/{group}"), e))?;
                Ok(Seq(seq as u64))
            }
            None => Ok(Seq(0)),
        }
    }

    async fn user_flags(&self, uid: UserId) -> Result<Vec<u8>, StoreError> {
        let rows: Vec<(i16,)> = self
            .scan(self.inner.st.read(Read::Flags), uid.0, "user_flags")
            .await?;
        let mut out: Vec<u8> = rows.into_iter().map(|(f,)| f as u8).collect();
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

    /// A range read of the one `org_records` partition (`version > after LIMIT n`, clustered
    /// by version), paged. Versions are stored as ordered bigints (≤ `i64::MAX`), so there is
    /// nothing above `after` ≥ `i64::MAX`.
    async fn org_records(&self, after: u64, limit: usize) -> Result<Vec<OrgRecord>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 || after >= MAX_ORDERED {
            // CQL refuses LIMIT 0; no stored version exceeds MAX_ORDERED.
            return Ok(out);
        }
        let want = i32::try_from(limit).unwrap_or(i32::MAX);
        let mut paging = PagingState::start();
        loop {
            let (rows, next) = self
                .page(
                    self.inner.st.read(Read::OrgAfter),
                    (ORG_PARTITION, b(after), want),
                    paging,
                    "org_records",
                )
                .await?;
            for row in typed_rows::<OrgRow>(&rows, "org_records")? {
                let (version, blob) = row.map_err(|e| corrupt("org_records".into(), e))?;
                let key = || format!("org_records/{version}");
                let rec = OrgRecord::decode(Bytes::from(blob)).map_err(|e| corrupt(key(), e))?;
                if i64::try_from(rec.version) != Ok(version) {
                    return Err(corrupt(
                        key(),
                        format!("record version {} does not match its key", rec.version),
                    ));
                }
                out.push(rec);
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
