//! Storage of messages, timelines, seq segments, device cursors, dedup entries and the outbox.
//!
//! [`Store`] is the one interface logic uses; it has real implementations only: the embedded
//! [`FjallStore`] (single node) and ScyllaDB ([`ScyllaStore`], feature `scylla`). Every
//! implementation must pass `im_testkit::store_conformance`, the shared test-suite of this trait.
//!
//! Writes go through a [`WriteBatch`] that is applied atomically and durably by
//! [`Store::commit`]; a logic worker collects the writes of many requests into one batch (group
//! commit) and acknowledges nothing before `commit` returns.

mod commit_log;
mod fjall_store;
mod journal_repair;
mod trickle;

pub use fjall_store::{FjallStore, DEFAULT_HANDOFF_LINGER_US};

/// Durations of the embedded store's commit-log `fdatasync`s, for the node's `/metrics`
/// (`im_store_log_sync_seconds`); one per process, like the store.
pub static LOG_SYNC_SECONDS: im_shared::prom::Histogram = im_shared::prom::Histogram::new();
/// Commits that handed work to another committer right after writing their record and then
/// found their record covered by that one's sync, without a sync of their own
/// (`im_store_log_handoffs_total{outcome="covered"}`).
pub static LOG_HANDOFFS_COVERED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
/// Such commits that waited out their linger and synced themselves (`outcome="synced"`).
pub static LOG_HANDOFFS_SYNCED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
#[cfg(feature = "scylla")]
mod scylla_store;
#[cfg(feature = "scylla")]
pub use scylla_store::ScyllaStore;

use im_shared::org::OrgRecord;
use im_shared::proto::{GroupDesc, Message};
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};

/// Storage failure. Callers answer the client with a retryable error and keep nothing in memory
/// that was not committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store i/o: {0}")]
    Io(String),
    #[error("corrupt record under key {key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The batch's writer is fenced: another process took over the shards of `node` (or a newer
    /// incarnation of it started) and raised the node's fence to `fence` > `incarnation`. Not
    /// retryable: the writer must stop.
    #[error("writer fenced: node {node} incarnation {incarnation} is below the fence {fence}")]
    Fenced {
        node: u16,
        incarnation: u64,
        fence: u64,
    },
}

impl StoreError {
    /// Whether the same operation may succeed later (a network backend that is unavailable).
    /// Other errors (I/O of the embedded store, corruption) are not retried.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// [`Op::UserFlag`]: the user's presence is hidden (followers see it offline, with no last seen).
pub const FLAG_PRESENCE_HIDDEN: u8 = 1;

/// [`Op::UserFlag`] on a *group's* id: only the group's owner posts (a broadcast channel). Group
/// settings share the flags keyspace with users' settings under the group's id, at numbers from
/// 128 up, which no user setting uses, so a user whose id equals a group id never sees them.
pub const FLAG_GROUP_OWNER_POSTS: u8 = 128;

/// How long a dedup record answers a retry: 7 days, far longer than any client keeps retrying one
/// send. ScyllaDB expires the rows with `default_time_to_live = 604800` (deploy/scylla/schema.cql);
/// fjall hides older records from reads and drops them in compaction.
pub const DEDUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What the sender's shard remembers about an accepted `client_msg_id`, to answer a retry with the
/// same ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupEntry {
    pub msg_id: MsgId,
    /// Seq of the message in the sender's timeline.
    pub seq: Seq,
    /// Seq of the entry before it in the sender's timeline (lets the sending device place its own
    /// message without a sync).
    pub prev_seq: Seq,
    pub server_time_ms: u64,
}

/// A fan-out record: `msg` still has to be appended to the timelines of `recipients`.
/// Written in the same batch as the sender's own timeline entry, deleted once every recipient's
/// shard confirmed the append. Replayed after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Virtual shard of the sender (the owner that replays it).
    pub shard: ShardId,
    pub msg_id: MsgId,
    pub recipients: Vec<UserId>,
    /// The message as stored in the sender's timeline (its `seq`/`prev_seq` are the sender's and
    /// are replaced by each recipient's on append).
    pub msg: Message,
}

/// One member of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    pub uid: UserId,
    /// [`im_shared::proto::ROLE_MEMBER`], [`im_shared::proto::ROLE_ADMIN`] or
    /// [`im_shared::proto::ROLE_OWNER`].
    pub role: u8,
    /// When the member joined, or when its role last changed (`GroupRole` writes the record
    /// again).
    pub joined_ms: u64,
}

/// A device's registered push token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushToken {
    pub device_id: String,
    /// 1 APNs, 2 FCM, 3 webhook (the company push gateway).
    pub provider: u8,
    pub token: String,
}

/// One write of a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Reserve seqs of `uid` up to and including `bound`.
    SeqBound {
        uid: UserId,
        bound: Seq,
    },
    /// Append `msg` at `msg.seq` to the timeline of `uid`, and index `(uid, msg.msg_id) → msg.seq`.
    Append {
        uid: UserId,
        msg: Message,
    },
    /// [`Op::Append`] of a copy that no lookup by msg id needs: the sender's own copy of a
    /// message whose recipient's copy is indexed (a recall finds the message there). The embedded
    /// store writes no `(uid, msg_id)` index entry for it (one memtable insert less per c2c
    /// message); a backend may index it anyway, so [`Store::seq_of`] may or may not find it.
    AppendUnindexed {
        uid: UserId,
        msg: Message,
    },
    /// Remember an accepted `(uid, client_msg_id)`.
    Dedup {
        uid: UserId,
        client_msg_id: u64,
        entry: DedupEntry,
    },
    /// Device cursor: the device holds everything up to `seq`.
    Cursor {
        uid: UserId,
        device_id: String,
        seq: Seq,
    },
    OutboxPut(OutboxEntry),
    OutboxDelete {
        shard: ShardId,
        msg_id: MsgId,
    },
    /// Create or replace a group's info record.
    GroupPut(GroupDesc),
    /// Add (or update) a member; also indexes `uid → group` for [`Store::groups_of`].
    MemberPut {
        group: GroupId,
        member: MemberRecord,
    },
    /// Remove a member and its `uid → group` index entries (also the large-group one).
    MemberDelete {
        group: GroupId,
        uid: UserId,
    },
    /// Index `uid → group` among the *large* groups of `uid` ([`Store::large_groups_of`]): the
    /// groups whose posts are not appended to its timeline but read from the group's own
    /// ([`Op::GroupAppend`]). Set (`on`) or removed; also removed by [`Op::MemberDelete`]. Written
    /// by the user's own shard (when the group event that makes it so reaches its timeline).
    LargeMember {
        group: GroupId,
        uid: UserId,
        on: bool,
    },
    /// Append `msg` at `msg.seq` to the timeline of a large group (read diffusion: stored once,
    /// not per member; `msg.seq`/`msg.prev_seq` are the group's).
    GroupAppend {
        group: GroupId,
        msg: Message,
    },
    /// The read cursor of `uid` in a large group: it has read everything up to `seq`.
    GroupRead {
        uid: UserId,
        group: GroupId,
        seq: Seq,
    },
    /// Mute (or unmute) push notifications of `uid` for conversation `peer` (0: everything).
    Mute {
        uid: UserId,
        peer: u64,
        muted: bool,
    },
    /// Set (`on`) or clear a per-user setting ([`FLAG_PRESENCE_HIDDEN`], …).
    UserFlag {
        uid: UserId,
        flag: u8,
        on: bool,
    },
    /// Register a device's push token; an empty `token` removes the registration.
    PushToken {
        uid: UserId,
        token: PushToken,
    },
    /// Offline-push watch of a message in `uid`'s timeline at `seq` (`on`: set, else clear), kept
    /// on the recipient's shard `shard` until logic decided the push (sent, or not needed because
    /// a device acknowledged it), so a decision pending at a crash is taken after the restart.
    PushWatch {
        shard: ShardId,
        uid: UserId,
        seq: Seq,
        on: bool,
    },
    /// Reserve msg-id time for generator `generator` up to and including `ms` (milliseconds
    /// since [`MsgId::EPOCH_MS`], the generator's own time base); a later op replaces it (the
    /// worker only raises it). A restarted worker issues ids above it, so ids stay unique and
    /// increasing even when the wall clock stepped back across the restart.
    IdFloor {
        generator: u16,
        ms: u64,
    },
    /// Write one record of the organisation tree at `record.version`, and remove the record
    /// of the same key it replaces (at version `replaces`), so the store holds the latest record
    /// of every key, in version order ([`Store::org_records`]).
    OrgPut {
        record: OrgRecord,
        replaces: Option<u64>,
    },
}

/// Who writes a batch: a logic node and the incarnation its shard lease gave it
/// (`im_logic::ownership`). [`Store::commit`] refuses the batch with [`StoreError::Fenced`] when the
/// node's fence ([`Store::fence`]) is above `incarnation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer {
    pub node: u16,
    pub incarnation: u64,
}

/// Writes applied atomically by [`Store::commit`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<Op>,
    /// Fencing identity; `None` (a node without shard leases, e.g. single-node mode) is never
    /// fenced.
    pub writer: Option<Writer>,
}

impl WriteBatch {
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// The storage interface of logic. Methods are async so network backends (ScyllaDB) fit; the
/// embedded backend completes them inline.
#[allow(async_fn_in_trait)]
pub trait Store: Clone + 'static {
    /// Applies every op atomically and durably (fsync for the embedded store) before returning.
    /// Ops on the same key within one batch are applied in order: the later one wins. A batch
    /// whose [`WriteBatch::writer`] is below its node's fence is refused with
    /// [`StoreError::Fenced`] and nothing of it is applied.
    async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError>;
    /// [`Store::commit`], calling `written` as early as this backend allows work that depends
    /// on the batch to go ahead: at the point from which any batch committed afterwards (by any
    /// caller of this store) can only become durable together with this one or after it. For
    /// the embedded store that is once the batch's record is in the commit log, before its sync
    /// (a log is durable as a prefix); for others, once the commit returned. `written` is not
    /// called for a batch that is refused (fenced) or fails before it is written; an error
    /// after `written` ran is never retryable: the batch's fate is unknown and the caller must
    /// stop. A logic worker hands its appends for another worker of the same store to `written`,
    /// so that worker's commit, which comes after, can share this one's sync.
    async fn commit_then(
        &self,
        batch: WriteBatch,
        written: impl FnOnce(),
    ) -> Result<(), StoreError> {
        self.commit(batch).await?;
        written();
        Ok(())
    }
    /// Whether commits that returned are still to be applied to the store's indexes (the
    /// embedded store applies a durable batch after its commit returned: see [`Store::settle`]).
    fn unsettled(&self) -> bool {
        false
    }
    /// Applies what committed batches left to apply, or has a thread of the store's own apply
    /// it (the embedded store: then it returns at once). Never needed for correctness (every
    /// read applies them first or finds them where they wait, and a restart replays them from
    /// the commit log): a logic worker calls it once its round's replies went out, so that the
    /// next round's reads find nothing to do.
    fn settle(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether [`Store::commit`] may fail with a retryable error ([`StoreError::is_retryable`]).
    /// A caller that retries a commit keeps a copy of the batch for it only then.
    fn commit_retryable(&self) -> bool {
        true
    }
    /// Raises the fence of `node` to `incarnation`: from now on every batch of that node with a
    /// lower incarnation is refused. Never lowers it. Returns the fence in effect afterwards
    /// (`max(old, incarnation)`). Durable before it returns.
    async fn fence(&self, node: u16, incarnation: u64) -> Result<u64, StoreError>;
    /// Highest reserved seq of `uid` (0 if never reserved).
    async fn seq_bound(&self, uid: UserId) -> Result<Seq, StoreError>;
    /// Seq of the last entry of `uid`'s timeline (0 if empty).
    async fn last_seq(&self, uid: UserId) -> Result<Seq, StoreError>;
    /// Up to `limit` entries of `uid`'s timeline with seq > `after`, ascending.
    async fn timeline(
        &self,
        uid: UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;
    /// The seq at which `msg_id` was appended to `uid`'s timeline, if it was.
    async fn seq_of(&self, uid: UserId, msg_id: MsgId) -> Result<Option<Seq>, StoreError>;
    async fn dedup(
        &self,
        uid: UserId,
        client_msg_id: u64,
    ) -> Result<Option<DedupEntry>, StoreError>;
    /// Cursor of one device (0 if none).
    async fn cursor(&self, uid: UserId, device_id: &str) -> Result<Seq, StoreError>;
    /// Every device cursor of `uid`, in device id order.
    async fn cursors(&self, uid: UserId) -> Result<Vec<(String, Seq)>, StoreError>;
    /// Every push watch ([`Op::PushWatch`]) of one virtual shard, in `(uid, seq)` order.
    async fn push_watches(&self, shard: ShardId) -> Result<Vec<(UserId, Seq)>, StoreError>;
    /// Every outbox entry of one virtual shard, in msg_id order.
    async fn outbox(&self, shard: ShardId) -> Result<Vec<OutboxEntry>, StoreError>;
    /// A group's info record, if the group exists.
    async fn group(&self, group: GroupId) -> Result<Option<GroupDesc>, StoreError>;
    /// Every member of a group, in uid order.
    async fn members(&self, group: GroupId) -> Result<Vec<MemberRecord>, StoreError>;
    /// The groups `uid` is a member of, in group id order.
    async fn groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError>;
    /// The large groups `uid` is a member of ([`Op::LargeMember`]), in group id order.
    async fn large_groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError>;
    /// Seq of the last post of a large group's timeline (0 if it has none: a small group).
    async fn group_head(&self, group: GroupId) -> Result<Seq, StoreError>;
    /// Up to `limit` posts of a large group's timeline with seq > `after`, ascending.
    async fn group_timeline(
        &self,
        group: GroupId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;
    /// The read cursor of `uid` in a large group ([`Op::GroupRead`]; 0 if none).
    async fn group_read(&self, uid: UserId, group: GroupId) -> Result<Seq, StoreError>;
    /// The settings ([`Op::UserFlag`]) `uid` has on, ascending.
    async fn user_flags(&self, uid: UserId) -> Result<Vec<u8>, StoreError>;
    /// Conversations `uid` muted (0 = everything), ascending.
    async fn mutes(&self, uid: UserId) -> Result<Vec<u64>, StoreError>;
    /// Push tokens of `uid`'s devices, in device id order.
    async fn push_tokens(&self, uid: UserId) -> Result<Vec<PushToken>, StoreError>;
    /// The reserved msg-id time floor of `generator` ([`Op::IdFloor`]; 0 if none).
    async fn id_floor(&self, generator: u16) -> Result<u64, StoreError>;
    /// Up to `limit` records of the organisation tree with a version above `after`, in version
    /// order ([`Op::OrgPut`]).
    async fn org_records(&self, after: u64, limit: usize) -> Result<Vec<OrgRecord>, StoreError>;
}
