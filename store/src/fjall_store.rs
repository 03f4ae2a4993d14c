//! [`FjallStore`]: the embedded, single-node [`Store`] on the fjall LSM engine.
//!
//! One fjall [`Database`] in one directory holds one keyspace per record kind. Every integer in a
//! key is big-endian so that the byte order of keys is their numeric order and range scans come
//! out sorted:
//!
//! | keyspace   | key                                         | value                                          |
//! |------------|---------------------------------------------|------------------------------------------------|
//! | `timeline` | uid `u64` ++ seq `u64`                      | [`Message::encode`] bytes                      |
//! | `msgidx`   | uid `u64` ++ msg_id `u64`                   | seq `u64`                                      |
//! | `seqbound` | uid `u64`                                   | bound `u64`                                    |
//! | `dedup`    | uid `u64` ++ client_msg_id `u64`            | msg_id `u64` ++ seq `u64` ++ server_time_ms `u64` ++ prev_seq `u64` |
//! | `cursor`   | uid `u64` ++ device_id (UTF-8, rest of key) | seq `u64`                                      |
//! | `outbox`   | shard `u16` ++ msg_id `u64`                 | count `u32` ++ count × uid `u64` ++ [`Message::encode`] bytes (held in memory until a checkpoint, see below) |
//! | `group`    | group `u64`                                 | [`GroupDesc::to_bytes`]                        |
//! | `member`   | group `u64` ++ uid `u64`                    | role `u8` ++ joined_ms `u64`                   |
//! | `ugroup`   | uid `u64` ++ group `u64`                    | empty (index for `groups_of`)                  |
//! | `mute`     | uid `u64` ++ peer `u64`                     | empty                                          |
//! | `pushtok`  | uid `u64` ++ device_id (UTF-8, rest of key) | provider `u8` ++ token (UTF-8)                 |
//! | `idfloor`  | generator `u16`                             | ms `u64` (msg-id time floor, [`Op::IdFloor`])  |
//! | `pushwatch`| shard `u16` ++ uid `u64` ++ seq `u64`       | empty ([`Op::PushWatch`])                      |
//! | `org`      | version `u64`                               | [`OrgRecord::encode`] bytes ([`Op::OrgPut`])   |
//! | `flag`     | uid `u64` ++ flag `u64`                     | empty ([`Op::UserFlag`])                       |
//! | `gtimeline`| group `u64` ++ seq `u64`                    | [`Message::encode`] bytes ([`Op::GroupAppend`]) |
//! | `ularge`   | uid `u64` ++ group `u64`                    | empty (index for `large_groups_of`)            |
//! | `gread`    | uid `u64` ++ group `u64`                    | seq `u64` ([`Op::GroupRead`])                  |
//! | `fence`    | node `u16`                                  | incarnation `u64` (writer fence, [`Store::fence`]) |
//! | `meta`     | `applied` (bytes)                           | seq `u64` of the last commit-log record in fjall |
//!
//! Dedup records expire after [`crate::DEDUP_WINDOW`] (7 days, ScyllaDB's TTL): a compaction
//! filter on `dedup` drops those older than the window before the newest record committed
//! (`DedupExpiry`).
//!
//! Writer fences are also kept in memory behind a read-write lock: a commit holds the read lock
//! from its fence check until its batch is durable, and [`Store::fence`] takes the write lock, so
//! a fence raised while a commit is in flight waits for it and every later commit sees it (the
//! check and the write are one atomic step here).
//!
//! [`Store::commit`] turns a whole [`WriteBatch`] into one record of the store's commit log
//! (`commit_log`, in `<dir>/commitlog/`) and syncs it: that is the group-commit point, one
//! `fdatasync` of a write into preallocated space. It then applies the same writes to fjall as one
//! batch without a sync, together with the record's seq under key `applied` of keyspace `meta`.
//! fjall's journal is made durable only at a checkpoint (`Database::persist`, before the log
//! reuses a segment) and when the store is opened; so after a crash fjall holds some prefix of
//! the batches, `meta/applied` says which, and [`FjallStore::open`] replays the log's records
//! after it and those since the checkpoint before the last one (a torn journal may keep a later
//! batch and lose an earlier one; one fjall refuses to recover is cut by `journal_repair`
//! first). A thread of the store (`trickle`) starts the writeback of fjall's journal every
//! 20 ms, so that a checkpoint's `fsync` finds little left to write.
//!
//! A commit takes three steps, so that concurrent commits (one per logic worker) share syncs:
//! 1. under the *writer lock*, its record is written to the log and gets the next seq; its
//!    writes join the queue of records waiting to be applied;
//! 2. [`Syncer::sync`] returns once the record is durable (group commit: one `fdatasync` covers
//!    every record written before it started, see `commit_log`), and the commit returns;
//! 3. later, off the committer's path, durable records are applied to fjall, one batch at a time
//!    and strictly in seq order, so `meta/applied` only grows and fjall never holds a batch whose
//!    predecessors it lacks. Whoever comes first applies them ([`Turns::settle`]): the store's
//!    apply thread (`Applier`, at a lower CPU priority), woken by a commit or a
//!    [`Store::settle`] (which an idle logic worker calls once its round's replies went out)
//!    that finds [`WAKE_APPLIER`] records waiting, and looking every [`APPLY_POLL`] otherwise;
//!    every read but a dedup or msg-index lookup, before it reads; a checkpoint; a commit that
//!    finds [`MAX_WAITING`] records waiting and nobody applying; one that finds waiting records
//!    that hold [`MAX_WAITING_BYTES`] (it waits for its turn, and applies a few: the bound on
//!    their memory; [`FjallStore::help_apply`]). A logic worker's
//!    acknowledgements and deliveries so wait for one `fdatasync`, not for fjall's memtable
//!    inserts nor for another worker's, and its thread (a gate core's) mostly does not make
//!    them at all.
//!
//! A batch is visible to reads once its commit returned (never before it is durable). A
//! checkpoint (under the writer lock) first makes every record written so far durable and
//! applies it.
//!
//! **Dedup and msg-index writes never go through fjall's memtable** (the *tabled* keyspaces,
//! [`TABLED`]). Every send writes one dedup record and looks one up first, which is nearly always
//! a miss, and every message's copy writes one msg-index entry; in a memtable of hundreds of
//! thousands of entries, each insert and each miss was a skiplist walk (docs/BENCHMARKS.md, "Dedup
//! records handed to fjall as tables", "Msg-index entries handed to fjall as tables too"). Both
//! are written once per key in practice and read only by key. So their writes are kept in a map by
//! key per keyspace ([`Turns::pending`]) from the moment their record is written. A checkpoint
//! seals the maps (and starts new ones), and a thread of the store (`store-ingest`) hands the
//! sealed writes to fjall as one sorted table per keyspace (fjall's ingestion: no memtable; table
//! and version synced before it returns: ~50 ms for a segment's ~85 000 dedup writes, which the
//! checkpoint, under the writer lock, must not wait for), then drops them. The next checkpoint
//! does it itself if they are still sealed: after it, the log no longer hands their records back.
//! A lookup ([`Store::dedup`], [`Store::seq_of`]) applies nothing: it finds a key in the map (the
//! newest write whose record is durable), then in the sealed one, or else in fjall's tables. After
//! a crash, the log hands back the records of its newest two segments (since the checkpoint before
//! the last one: `commit_log`), and the open hands their tabled writes to fjall before it serves.
//! The maps hold the tabled writes of at most two segments' records (~170 000 c2c messages,
//! ~40 MB).
//!
//! **Timeline entries do not go through fjall's memtable either** (the *ranged* keyspaces,
//! [`RANGED`]: `timeline`, `gtimeline`). Every c2c message puts two (the sender's copy and the
//! recipient's), and they were the last of a message's memtable inserts that cost a skiplist walk
//! each (docs/BENCHMARKS.md, "Timeline entries handed to fjall as tables"). They are read by range
//! (a sync page, the newest seq), so the apply keeps them in a map in key order
//! ([`RangedMaps`]) instead; a checkpoint seals it with the tabled maps, and `store-ingest`
//! hands it to fjall as one table per keyspace. A read applies what waits first (as every read
//! but the two lookups above), then merges the current map, the sealed one and fjall's entries,
//! newest first ([`FjallStore::ranged_scan`]). After a crash the replay of the newest two
//! segments rebuilds the map, and the open hands it to fjall before it serves.
//!
//! **Outbox writes wait in memory until a checkpoint** (`Deferred`): an outbox entry is put when
//! a fan-out starts and deleted once its recipients confirmed it, most often well within the
//! time the log takes to fill a segment, so the apply keeps them in a map instead of fjall's
//! memtable, where a put and its delete cancel out. The checkpoint writes what is left to fjall
//! before it persists, so nothing the log is about to reuse is needed for them. After a crash the
//! log hands back every record of its newest two segments (all since the last checkpoint) even if
//! fjall already has them, which rebuilds the map, and the open writes it to fjall before the log
//! leaves the segment it recovered. `outbox` reads fjall's entries with the map on top, under the
//! map's lock. A failed sync poisons the log: every later commit fails with [`StoreError::Io`],
//! which stops the worker. A failed apply stops the process (acknowledged writes could no
//! longer be read); a restart replays the log.
//!
//! The log record of a batch lists its writes after merging (last op on a key wins):
//! `count:u32 (kind:u8 key_len:u16 key present:u8 [value_len:u32 value])*`, `kind` being the
//! keyspace's index in the table above (timeline 0 … idfloor 11, pushwatch 12, org 13, flag 14,
//! gtimeline 15, ularge 16, gread 17).
//!
//! Reads are plain point lookups and range scans on the latest committed state. Every method is
//! blocking and completes inline: each logic worker is a dedicated thread.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Buf, Bytes};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use im_shared::org::OrgRecord;
use im_shared::proto::{GroupDesc, Message};
use im_shared::{GroupId, MsgId, Seq, ShardId, UserId};

use crate::commit_log::{CommitLog, LogError, LogShape, Syncer};

use super::{
    DedupEntry, MemberRecord, Op, OutboxEntry, PushToken, Store, StoreError, WriteBatch, Writer,
};

const TIMELINE: &str = "timeline";
const MSGIDX: &str = "msgidx";
const SEQBOUND: &str = "seqbound";
const DEDUP: &str = "dedup";
const CURSOR: &str = "cursor";
const OUTBOX: &str = "outbox";
const GROUP: &str = "group";
const MEMBER: &str = "member";
const UGROUP: &str = "ugroup";
const MUTE: &str = "mute";
const PUSHTOK: &str = "pushtok";
const FENCE: &str = "fence";
const IDFLOOR: &str = "idfloor";
const PUSHWATCH: &str = "pushwatch";
const ORG: &str = "org";
const FLAG: &str = "flag";
const GTIMELINE: &str = "gtimeline";
const ULARGE: &str = "ularge";
const GREAD: &str = "gread";
const META: &str = "meta";
/// Key in `meta`: seq of the last commit-log record applied to fjall (`u64`).
const APPLIED: &[u8] = b"applied";

/// Index of a keyspace in [`FjallStore::spaces`] (used to merge writes of one batch per key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Timeline = 0,
    MsgIdx = 1,
    SeqBound = 2,
    Dedup = 3,
    Cursor = 4,
    Outbox = 5,
    Group = 6,
    Member = 7,
    UGroup = 8,
    Mute = 9,
    PushTok = 10,
    IdFloor = 11,
    PushWatch = 12,
    Org = 13,
    Flag = 14,
    GTimeline = 15,
    ULarge = 16,
    GRead = 17,
}

impl Kind {
    const ALL: [Kind; 18] = [
        Kind::Timeline,
        Kind::MsgIdx,
        Kind::SeqBound,
        Kind::Dedup,
        Kind::Cursor,
        Kind::Outbox,
        Kind::Group,
        Kind::Member,
        Kind::UGroup,
        Kind::Mute,
        Kind::PushTok,
        Kind::IdFloor,
        Kind::PushWatch,
        Kind::Org,
        Kind::Flag,
        Kind::GTimeline,
        Kind::ULarge,
        Kind::GRead,
    ];
}

/// The embedded store: one fjall database, one keyspace per record kind (layout in the module
/// docs). Cloning is cheap (reference-counted handles); every clone uses the same database.
#[derive(Clone)]
pub struct FjallStore {
    db: Database,
    /// In [`Kind`] order.
    spaces: [Keyspace; 18],
    fence_space: Keyspace,
    meta: Keyspace,
    /// node → fence, mirror of `fence_space` (see the module docs).
    fences: Arc<RwLock<HashMap<u16, u64>>>,
    /// The writer lock: held while a batch's record is written to the log (step 1 of a commit).
    log: Arc<Mutex<CommitLog>>,
    /// Makes written records durable (step 2).
    syncer: Arc<Syncer>,
    /// Whose turn it is to apply (step 3).
    turns: Arc<Turns>,
    /// Outbox writes applied and not yet in fjall: they go there at the next checkpoint.
    deferred: Arc<Mutex<Deferred>>,
    /// Timeline entries applied and not yet in fjall: they go there as tables after the
    /// checkpoints ([`RangedMaps`]).
    ranged: Arc<Mutex<RangedMaps>>,
    /// Newest `server_time_ms` of a dedup record committed since open: the clock of the dedup
    /// expiry ([`DedupExpiry`]).
    dedup_clock: Arc<AtomicU64>,
    dir: PathBuf,
    /// How long a [`Store::commit_then`] whose `written` handed work to another committer waits
    /// for that one's sync before it syncs itself, in µs (see [`Syncer::sync_after_handoff`]).
    handoff_linger_us: Arc<AtomicU64>,
    /// Writes fjall's journal back a little at a time (see `trickle`); stops with the last clone.
    _trickle: Option<Arc<crate::trickle::Trickle>>,
    /// Applies durable records off the committers' threads; stops with the last clone.
    applier: Option<Arc<Applier>>,
    /// Test hook: commits stop after the log sync, as if the process died before fjall got them.
    #[cfg(test)]
    skip_apply: Arc<std::sync::atomic::AtomicBool>,
}

/// The writes of the `outbox` keyspace that were applied and are not in fjall yet. An outbox
/// entry is put when a fan-out starts and deleted once every recipient confirmed it, most often
/// within a second or two: kept here, a put and its delete cancel out and never reach fjall's
/// memtable. What is still here at a checkpoint is written to fjall then ([`Deferred::flush`]),
/// and so before the log starts a segment: after a crash, the records of the newest segments,
/// which the log always hands back, rebuild it (and the store's open writes it to fjall before
/// the log leaves the segment it recovered). Reads of the outbox see fjall's entries with these
/// on top, under this lock (so a checkpoint cannot move an entry between the two while one
/// reads).
#[derive(Debug, Default)]
struct Deferred {
    /// Outbox key → value to write, or `None`: delete it from fjall.
    writes: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Outbox keys fjall holds (as of the last checkpoint): a delete of a key not among them
    /// only cancels the put held here.
    in_fjall: std::collections::HashSet<Vec<u8>>,
}

impl Deferred {
    /// Applies one write of the outbox keyspace (in seq order, as fjall would).
    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        match value {
            Some(v) => {
                self.writes.insert(key, Some(v));
            }
            None if self.in_fjall.contains(&key) => {
                self.writes.insert(key, None);
            }
            None => {
                self.writes.remove(&key);
            }
        }
    }

    /// Writes everything held to fjall as one unsynced batch: the checkpoint's `persist` makes
    /// it durable. Kept here until fjall took the batch (a failed checkpoint is tried again).
    fn flush(&mut self, db: &Database, outbox: &Keyspace) -> Result<(), StoreError> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let mut b = db.batch().durability(None);
        for (key, value) in &self.writes {
            match value {
                Some(v) => b.insert(outbox, key.as_slice(), v.as_slice()),
                None => b.remove(outbox, key.as_slice()),
            }
        }
        b.commit().map_err(io)?;
        for (key, value) in std::mem::take(&mut self.writes) {
            if value.is_some() {
                self.in_fjall.insert(key);
            } else {
                self.in_fjall.remove(&key);
            }
        }
        Ok(())
    }
}

/// Step 3 of a commit, off the committer's path: every record's writes wait here from the
/// moment the record is in the log, in seq order, and are applied to fjall one batch at a time,
/// strictly in that order, once the record is durable ([`Turns::settle`]). A committer returns
/// once its record is durable, without applying it: whoever settles next applies it (a read, a
/// checkpoint, or the committer itself once its reply went out, [`Store::settle`]).
#[derive(Debug)]
struct Turns {
    /// Records written to the log and not applied yet, oldest first. `None`: a test's record
    /// that is never applied, as if the process died before fjall got it.
    waiting: Mutex<VecDeque<(u64, Option<Writes>)>>,
    /// Held while applying: one applier at a time, in seq order.
    turn: Mutex<Turn>,
    /// Seq of the next record to apply ([`Turn::next`], readable without a lock).
    next: AtomicU64,
    /// Bytes of keys and values the waiting records hold (what bounds the queue's memory).
    waiting_bytes: AtomicUsize,
    /// The writes of the tabled keyspaces ([`TABLED`]: dedup, msgidx) that fjall does not have
    /// yet, by key. They never go through fjall's memtable: each checkpoint seals those of the
    /// records since the checkpoint before, and `store-ingest` hands them to fjall as one sorted
    /// table per keyspace ([`FjallStore::ingest_sealed`]); until then a read finds them here,
    /// without applying anything first ([`FjallStore::tabled_read`]). Bounded by what two
    /// segments of the commit log hold.
    pending: Mutex<TabledMaps>,
    /// Held while the sealed writes go to fjall: by `store-ingest`, or by a checkpoint that
    /// finds them still sealed.
    ingesting: Mutex<()>,
}

/// The keyspaces whose writes never go through fjall's memtable (module docs, "Dedup and
/// msg-index writes"): written once per key in practice, read only by key, 16-byte keys.
const TABLED: [Kind; 2] = [Kind::Dedup, Kind::MsgIdx];

/// Index of `kind` in [`TABLED`].
fn tabled(kind: Kind) -> Option<usize> {
    TABLED.iter().position(|k| *k == kind)
}

/// Writes on their way to fjall as tables, one map per keyspace of a group (the [`TABLED`] or
/// the [`RANGED`] keyspaces).
#[derive(Debug)]
struct Staged<M, const N: usize> {
    /// Those of the records since the last checkpoint.
    current: [M; N],
    /// Those of the records between the checkpoint before and the last one (all durable and
    /// applied), on their way to fjall; `None` once fjall has them. The next checkpoint waits
    /// for them if they are still here: after it, the log no longer hands their records back.
    sealed: Option<Arc<[M; N]>>,
}

impl<M: StagedMap, const N: usize> Default for Staged<M, N> {
    fn default() -> Self {
        Staged {
            current: std::array::from_fn(|_| M::default()),
            sealed: None,
        }
    }
}

impl<M: StagedMap, const N: usize> Staged<M, N> {
    /// At a checkpoint: what was written since the last one is sealed (if anything was).
    fn seal(&mut self) {
        let next = std::array::from_fn(|t| self.current[t].next());
        let current = std::mem::replace(&mut self.current, next);
        if current.iter().any(|m| m.len() > 0) {
            self.sealed = Some(Arc::new(current));
        }
    }

    /// Entries of keyspace `t` (since the last checkpoint, sealed).
    #[cfg(test)]
    fn counts(&self, t: usize) -> (usize, usize) {
        (
            self.current[t].len(),
            self.sealed.as_ref().map_or(0, |s| s[t].len()),
        )
    }
}

/// A map of [`Staged`] writes.
trait StagedMap: Default {
    fn len(&self) -> usize;
    /// The empty map that follows this one at a checkpoint.
    fn next(&self) -> Self {
        Self::default()
    }
}

impl<K, V, S: std::hash::BuildHasher + Default> StagedMap for HashMap<K, V, S> {
    fn len(&self) -> usize {
        HashMap::len(self)
    }

    /// Room for as many keys as this one took: the next segment's records write about as many,
    /// and a map that grows from empty hashes every key again at each doubling.
    fn next(&self) -> Self {
        HashMap::with_capacity_and_hasher(self.len(), S::default())
    }
}

impl<K, V> StagedMap for std::collections::BTreeMap<K, V> {
    fn len(&self) -> usize {
        std::collections::BTreeMap::len(self)
    }
}

/// The writes of the tabled keyspaces that fjall does not have yet (since the record was
/// written, durable or not).
type TabledMaps = Staged<PendingWrites, { TABLED.len() }>;

impl Staged<PendingWrites, { TABLED.len() }> {
    /// The newest write of key `key` of tabled keyspace `t` whose record is durable (up to
    /// `durable`): `Some(None)` if it deletes, `None` if the maps have none.
    fn durable(&self, t: usize, key: &[u8; 16], durable: u64) -> Option<Option<Vec<u8>>> {
        let found = |maps: &[PendingWrites; TABLED.len()]| {
            maps[t].get(key).and_then(|w| w.durable(durable).cloned())
        };
        found(&self.current).or_else(|| found(self.sealed.as_deref()?))
    }
}

/// Key → its writes since the last checkpoint (of one tabled keyspace). foldhash, seeded per
/// process (`im_shared::fast`): dedup keys hold a client's `client_msg_id`.
type PendingWrites = im_shared::fast::FastMap<[u8; 16], KeyWrites>;

/// The writes of one key since the last checkpoint, by record seq. A key is written once in
/// practice (a retried send finds its dedup record and writes nothing; a replayed append finds
/// its msg index), so `older` stays empty and allocates nothing; it keeps an earlier write for
/// a read while the newest is not durable.
#[derive(Debug)]
struct KeyWrites {
    /// The newest: (record seq, value; `None` deletes).
    newest: (u64, Option<Vec<u8>>),
    /// Earlier writes, oldest first.
    older: Vec<(u64, Option<Vec<u8>>)>,
}

impl KeyWrites {
    /// The newest write whose record is durable (up to `durable`), if any.
    fn durable(&self, durable: u64) -> Option<&Option<Vec<u8>>> {
        std::iter::once(&self.newest)
            .chain(self.older.iter().rev())
            .find(|(seq, _)| *seq <= durable)
            .map(|(_, v)| v)
    }
}

/// The keyspaces whose entries the apply keeps in memory, in key order, instead of putting them
/// in fjall's memtable (module docs, "Timeline entries"): the users' and the groups' timelines,
/// range-read, 16-byte keys.
const RANGED: [Kind; 2] = [Kind::Timeline, Kind::GTimeline];

/// Index of `kind` in [`RANGED`].
fn ranged(kind: Kind) -> Option<usize> {
    RANGED.iter().position(|k| *k == kind)
}

/// Key → the last write applied (`None` deletes), of one [`RANGED`] keyspace.
type RangedMap = std::collections::BTreeMap<[u8; 16], Option<Vec<u8>>>;

/// The entries of the [`RANGED`] keyspaces that were applied and are not in fjall yet. Only
/// durable records are applied, so everything here is durable. A checkpoint (every record
/// applied) seals `current`, and `store-ingest` hands the sealed maps to fjall as one table per
/// keyspace, as it does for the tabled ones ([`FjallStore::ingest_sealed`]). Reads merge these
/// over fjall's entries ([`FjallStore::ranged_scan`]). Bounded by the entries of two segments
/// of the commit log.
type RangedMaps = Staged<RangedMap, { RANGED.len() }>;

/// A key and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// One entry of a run for [`merge_newer`]: key, write (`None` deletes).
type RunEntry = (Vec<u8>, Option<Vec<u8>>);

/// A run of a map's entries for [`merge_newer`] (reading a map never fails).
type HeldRun<'a> = Box<dyn Iterator<Item = Result<RunEntry, std::convert::Infallible>> + 'a>;

/// The entries of `map` (if any) with keys in `lo..=hi`, in key order (descending if `rev`), as
/// a run for [`merge_newer`].
fn held_run(map: Option<&RangedMap>, lo: [u8; 16], hi: [u8; 16], rev: bool) -> HeldRun<'_> {
    let range = map.into_iter().flat_map(move |m| m.range(lo..=hi));
    let owned = |(k, v): (&[u8; 16], &Option<Vec<u8>>)| Ok((k.to_vec(), v.clone()));
    if rev {
        Box::new(range.rev().map(owned))
    } else {
        Box::new(range.map(owned))
    }
}

/// Merges two runs of (key, write; `None` deletes), both in key order (descending if `rev`),
/// `newer` winning a key both hold, and returns the merged run up to and including its
/// `limit`-th live entry (with the deletes met before it: they still hide what an older run
/// holds). Stops reading either run there.
fn merge_newer<E>(
    newer: impl Iterator<Item = Result<RunEntry, E>>,
    older: impl Iterator<Item = Result<RunEntry, E>>,
    rev: bool,
    limit: usize,
) -> Result<Vec<RunEntry>, E> {
    let mut newer = newer.peekable();
    let mut older = older.peekable();
    let mut out = Vec::new();
    let mut live = 0;
    while live < limit {
        // Which run holds the next key (both: the newer one, and the older's is dropped).
        let ord = match (newer.peek(), older.peek()) {
            (None, None) => break,
            (Some(_), None) | (Some(Err(_)), _) => std::cmp::Ordering::Less,
            (None, Some(_)) | (_, Some(Err(_))) => std::cmp::Ordering::Greater,
            (Some(Ok((a, _))), Some(Ok((b, _)))) => {
                if rev {
                    b.cmp(a)
                } else {
                    a.cmp(b)
                }
            }
        };
        if ord == std::cmp::Ordering::Equal {
            older.next();
        }
        let next = if ord == std::cmp::Ordering::Greater {
            older.next()
        } else {
            newer.next()
        };
        let Some(next) = next else { break };
        let (k, v) = next?;
        live += usize::from(v.is_some());
        out.push((k, v));
    }
    Ok(out)
}

#[derive(Debug)]
struct Turn {
    /// Seq of the next record to apply.
    next: u64,
    /// An apply or a sync failed: nothing after it may be applied.
    broken: bool,
}

/// `m` locked; unless `wait`, only if nobody holds it (`None` then).
fn lock_unless_held<T>(m: &Mutex<T>, wait: bool) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) if wait => {
            Some(m.lock().unwrap_or_else(|p| p.into_inner()))
        }
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

impl Turns {
    fn new(next: u64) -> Turns {
        Turns {
            waiting: Mutex::new(VecDeque::new()),
            turn: Mutex::new(Turn {
                next,
                broken: false,
            }),
            next: AtomicU64::new(next),
            waiting_bytes: AtomicUsize::new(0),
            pending: Mutex::new(TabledMaps::default()),
            ingesting: Mutex::new(()),
        }
    }

    fn broken() -> StoreError {
        StoreError::Io("an earlier commit failed after its log record was written".into())
    }

    /// Record `seq` was just written to the log (under the writer lock, so in seq order). Its
    /// writes of the tabled keyspaces move to [`Turns::pending`]; the rest wait for the apply.
    fn push(&self, seq: u64, mut writes: Option<Writes>) {
        if let Some(w) = &mut writes {
            let mut pending = None;
            let mut bytes = 0;
            w.retain_mut(|(kind, key, value)| {
                let (Some(t), Ok(k)) = (tabled(*kind), <[u8; 16]>::try_from(key.as_slice())) else {
                    bytes += key.len() + value.as_ref().map_or(0, Vec::len);
                    return true;
                };
                let write = (seq, value.take());
                match pending
                    .get_or_insert_with(|| self.pending.lock().unwrap_or_else(|p| p.into_inner()))
                    .current[t]
                    .entry(k)
                {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        let w = e.get_mut();
                        let earlier = std::mem::replace(&mut w.newest, write);
                        w.older.push(earlier);
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(KeyWrites {
                            newest: write,
                            older: Vec::new(),
                        });
                    }
                }
                false
            });
            self.waiting_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((seq, writes));
    }

    /// Records written and not applied yet.
    fn waiting(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Bytes of keys and values of the records written and not applied yet.
    fn waiting_bytes(&self) -> usize {
        self.waiting_bytes.load(Ordering::Relaxed)
    }

    /// Whether records up to `durable` wait to be applied (lock-free).
    fn behind(&self, durable: u64) -> bool {
        self.next.load(Ordering::Acquire) <= durable
    }

    /// Applies, with `f`, every waiting record up to `upto` (all durable), in seq order. Never
    /// waits for another committer: a record is waiting from the moment it is written, and one
    /// that is durable but not waiting yet belongs to a commit that has not returned (so nobody
    /// can have seen its effects), and nothing after it can be waiting either.
    fn settle(
        &self,
        upto: u64,
        f: impl FnMut(u64, Writes) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.settle_some(upto, usize::MAX, true, f)
    }

    /// As [`Turns::settle`], but at most `limit` records, and, unless `wait`, only if nobody
    /// else holds the turn (else it returns at once: the holder applies in order, or waits in
    /// fjall, where another applier would wait too).
    fn settle_some(
        &self,
        upto: u64,
        limit: usize,
        wait: bool,
        mut f: impl FnMut(u64, Writes) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let Some(mut t) = lock_unless_held(&self.turn, wait) else {
            return Ok(());
        };
        for _ in 0..limit {
            if t.broken {
                return Err(Turns::broken());
            }
            if t.next > upto {
                return Ok(());
            }
            let head = {
                let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                match w.front() {
                    Some(&(seq, _)) if seq <= upto => w.pop_front(),
                    _ => None,
                }
            };
            let Some((seq, writes)) = head else {
                return Ok(());
            };
            if seq != t.next {
                // (A record skipped: only if an apply panicked after taking it.)
                t.broken = true;
                return Err(StoreError::Io(format!(
                    "commit log record {seq} waits to be applied after {}",
                    t.next
                )));
            }
            if let Some(writes) = writes {
                let bytes = writes_bytes(&writes);
                // Broken until the apply returns: an apply that panics leaves it so.
                t.broken = true;
                f(seq, writes)?;
                t.broken = false;
                self.waiting_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
            t.next = seq + 1;
            self.next.store(t.next, Ordering::Release);
        }
        Ok(())
    }
}

impl fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io(e: fjall::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn corrupt(kind: Kind, key: &[u8], why: impl Into<String>) -> StoreError {
    let mut k = String::with_capacity(16 + key.len() * 2);
    k.push_str(kind.name());
    k.push('/');
    for b in key {
        k.push_str(&format!("{b:02x}"));
    }
    StoreError::Corrupt {
        key: k,
        why: why.into(),
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Timeline => TIMELINE,
            Kind::MsgIdx => MSGIDX,
            Kind::SeqBound => SEQBOUND,
            Kind::Dedup => DEDUP,
            Kind::Cursor => CURSOR,
            Kind::Outbox => OUTBOX,
            Kind::Group => GROUP,
            Kind::Member => MEMBER,
            Kind::UGroup => UGROUP,
            Kind::Mute => MUTE,
            Kind::PushTok => PUSHTOK,
            Kind::IdFloor => IDFLOOR,
            Kind::PushWatch => PUSHWATCH,
            Kind::Org => ORG,
            Kind::Flag => FLAG,
            Kind::GTimeline => GTIMELINE,
            Kind::ULarge => ULARGE,
            Kind::GRead => GREAD,
        }
    }
}

fn fence_corrupt(key: &[u8], why: &str) -> StoreError {
    StoreError::Corrupt {
        key: format!("{FENCE}/{key:02x?}"),
        why: why.to_string(),
    }
}

fn key_u64(a: u64) -> [u8; 8] {
    a.to_be_bytes()
}

fn key_u64_u64(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

fn key_cursor(uid: UserId, device_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + device_id.len());
    k.extend_from_slice(&uid.0.to_be_bytes());
    k.extend_from_slice(device_id.as_bytes());
    k
}

fn key_outbox(shard: ShardId, msg_id: MsgId) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(&shard.0.to_be_bytes());
    k[2..].copy_from_slice(&msg_id.0.to_be_bytes());
    k
}

/// Reads a value that must be exactly one big-endian `u64`.
fn val_u64(kind: Kind, key: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(kind, key, format!("value of {} bytes, want 8", v.len())))
}

/// Decodes a record of a user's or a group's timeline (`kind`) and checks that it sits under
/// its own seq.
fn decode_in(kind: Kind, key: &[u8], v: &[u8]) -> Result<Message, StoreError> {
    let msg = Message::decode(Bytes::copy_from_slice(v))
        .map_err(|e| corrupt(kind, key, e.to_string()))?;
    let key_seq = key
        .get(8..16)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes);
    if key.len() != 16 || key_seq != Some(msg.seq.0) {
        return Err(corrupt(
            kind,
            key,
            format!("message seq {} does not match its key", msg.seq),
        ));
    }
    Ok(msg)
}

fn encode_outbox(e: &OutboxEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * e.recipients.len() + e.msg.encoded_len());
    // More than u32::MAX recipients cannot be built in memory by a real caller; saturate rather
    // than panic (decode then reports the record as corrupt).
    let n = u32::try_from(e.recipients.len()).unwrap_or(u32::MAX);
    v.extend_from_slice(&n.to_be_bytes());
    for r in &e.recipients {
        v.extend_from_slice(&r.0.to_be_bytes());
    }
    e.msg.encode(&mut v);
    v
}

fn decode_outbox(key: &[u8], v: &[u8]) -> Result<OutboxEntry, StoreError> {
    let bad = |why: String| corrupt(Kind::Outbox, key, why);
    let k = <[u8; 10]>::try_from(key).map_err(|_| bad(format!("key of {} bytes", key.len())))?;
    let shard = ShardId(u16::from_be_bytes([k[0], k[1]]));
    let msg_id = MsgId(u64::from_be_bytes([
        k[2], k[3], k[4], k[5], k[6], k[7], k[8], k[9],
    ]));
    let mut buf = Bytes::copy_from_slice(v);
    if buf.remaining() < 4 {
        return Err(bad("truncated recipient count".into()));
    }
    let n = buf.get_u32() as usize;
    if buf.remaining() / 8 < n {
        return Err(bad(format!("{n} recipients do not fit the value")));
    }
    let recipients = (0..n).map(|_| UserId(buf.get_u64())).collect();
    let msg = Message::decode(buf).map_err(|e| bad(e.to_string()))?;
    Ok(OutboxEntry {
        shard,
        msg_id,
        recipients,
        msg,
    })
}

impl FjallStore {
    /// Opens (creating if needed) the store in `dir`. The directory is locked by fjall: a second
    /// open of the same directory while a store is alive fails with [`StoreError::Io`].
    pub fn open(dir: &Path) -> Result<FjallStore, StoreError> {
        FjallStore::open_with(dir, LogShape::default())
    }

    pub(crate) fn open_with(dir: &Path, shape: LogShape) -> Result<FjallStore, StoreError> {
        let dedup_clock = Arc::new(AtomicU64::new(0));
        let expiry = Arc::new(DedupExpiry {
            clock: dedup_clock.clone(),
            window_ms: crate::DEDUP_WINDOW.as_millis() as u64,
        });
        let open = || {
            let expiry = expiry.clone();
            Database::builder(dir)
                .manual_journal_persist(true)
                .with_compaction_filter_factories(Arc::new(move |name: &str| {
                    (name == DEDUP)
                        .then(|| expiry.clone() as Arc<dyn fjall::compaction::filter::Factory>)
                }))
                .open()
        };
        let db = match open() {
            Ok(db) => db,
            // A torn journal tail fjall does not cut by itself (see `journal_repair`): cut it at
            // its last intact batch and open again; what it held is replayed from the log.
            Err(e @ fjall::Error::JournalRecovery(_)) => {
                match crate::journal_repair::repair(dir).map_err(StoreError::Io)? {
                    Some(cut) => tracing::warn!(
                        dir = %dir.display(),
                        fjall_error = %e,
                        journal = %cut.journal.display(),
                        at = cut.at,
                        dropped_bytes = cut.dropped,
                        why = cut.why,
                        "store: cut a torn tail of fjall's journal; the commit log replays it"
                    ),
                    None => return Err(io(e)),
                }
                open().map_err(io)?
            }
            Err(e) => return Err(io(e)),
        };
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(io)
        };
        let spaces = [
            ks(TIMELINE)?,
            ks(MSGIDX)?,
            ks(SEQBOUND)?,
            ks(DEDUP)?,
            ks(CURSOR)?,
            ks(OUTBOX)?,
            ks(GROUP)?,
            ks(MEMBER)?,
            ks(UGROUP)?,
            ks(MUTE)?,
            ks(PUSHTOK)?,
            ks(IDFLOOR)?,
            ks(PUSHWATCH)?,
            ks(ORG)?,
            ks(FLAG)?,
            ks(GTIMELINE)?,
            ks(ULARGE)?,
            ks(GREAD)?,
        ];
        let fence_space = ks(FENCE)?;
        let meta = ks(META)?;
        let applied = match meta.get(APPLIED).map_err(io)? {
            Some(v) => <[u8; 8]>::try_from(&*v)
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: format!("{META}/applied"),
                    why: format!("value of {} bytes, want 8", v.len()),
                })?,
            None => 0,
        };
        let deferred = Mutex::new(Deferred::default());
        let ranged_maps = Mutex::new(RangedMaps::default());
        {
            let mut d = deferred.lock().unwrap_or_else(|p| p.into_inner());
            for guard in spaces[Kind::Outbox as usize].iter() {
                d.in_fjall.insert(guard.key().map_err(io)?.to_vec());
            }
        }
        let mut replayed = 0u64;
        // The tabled keyspaces' writes of the replayed records (the newest two segments', since
        // the checkpoint before the last one, and any after `applied`): they go to fjall below.
        let mut tables: [HashMap<[u8; 16], Option<Vec<u8>>>; TABLED.len()] = Default::default();
        let log = CommitLog::open(&dir.join("commitlog"), shape, applied, |seq, payload| {
            let writes = decode_writes(payload).ok_or_else(|| {
                LogError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("commit log record {seq} does not decode"),
                ))
            })?;
            for (kind, key, value) in &writes {
                if let (Some(t), Ok(k)) = (tabled(*kind), <[u8; 16]>::try_from(key.as_slice())) {
                    tables[t].insert(k, value.clone());
                }
            }
            apply(&db, &spaces, &meta, &deferred, &ranged_maps, writes, seq)
                .map_err(|e| LogError::Io(std::io::Error::other(e.to_string())))?;
            replayed += 1;
            Ok(())
        })
        .map_err(|e| StoreError::Io(im_shared::errors::error_chain(&e)))?;
        if replayed > 0 {
            tracing::info!(dir = %dir.display(), replayed, "store: replayed the commit log");
        }
        // What the replay kept in memory goes to fjall now: the log is about to leave the segment
        // it recovered, and is not asked for it again.
        deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(&db, &spaces[Kind::Outbox as usize])?;
        for (kind, writes) in TABLED.iter().zip(&tables) {
            ingest_table(&spaces[*kind as usize], writes.iter())?;
        }
        {
            let mut r = ranged_maps.lock().unwrap_or_else(|p| p.into_inner());
            for (kind, writes) in RANGED.iter().zip(&r.current) {
                ingest_table(&spaces[*kind as usize], writes.iter())?;
            }
            r.current = Default::default();
        }
        db.persist(PersistMode::SyncAll).map_err(io)?;
        let mut log = log;
        log.leave_recovered_segment()
            .map_err(|e| StoreError::Io(format!("commit log: {e}")))?;
        let mut fences = HashMap::new();
        for guard in fence_space.iter() {
            let (k, v) = guard.into_inner().map_err(io)?;
            let node = <[u8; 2]>::try_from(&*k)
                .map(u16::from_be_bytes)
                .map_err(|_| fence_corrupt(&k, "key is not 2 bytes"))?;
            let inc = <[u8; 8]>::try_from(&*v)
                .map(u64::from_be_bytes)
                .map_err(|_| fence_corrupt(&k, "value is not 8 bytes"))?;
            fences.insert(node, inc);
        }
        let mut store = FjallStore {
            db,
            spaces,
            fence_space,
            meta,
            fences: Arc::new(RwLock::new(fences)),
            syncer: log.syncer(),
            turns: Arc::new(Turns::new(log.next_seq())),
            deferred: Arc::new(deferred),
            ranged: Arc::new(ranged_maps),
            log: Arc::new(Mutex::new(log)),
            dedup_clock,
            dir: dir.to_path_buf(),
            handoff_linger_us: Arc::new(AtomicU64::new(DEFAULT_HANDOFF_LINGER_US)),
            // Without it the checkpoints are slower, never wrong: a store that cannot start the
            // thread still serves.
            _trickle: crate::trickle::Trickle::start(dir)
                .inspect_err(|e| tracing::warn!("store: no journal writeback thread: {e}"))
                .ok()
                .map(Arc::new),
            applier: None,
            #[cfg(test)]
            skip_apply: Arc::default(),
        };
        store.applier = Applier::start(&store)
            .inspect_err(|e| tracing::warn!("store: no apply thread: {e}"))
            .ok()
            .map(Arc::new);
        Ok(store)
    }

    /// Sets how long a commit that handed work to another committer (a logic worker's appends
    /// to another worker, passed on once its record is written) waits for that committer's
    /// sync to cover its record before it syncs itself; zero: it syncs at once. Shared by every
    /// clone. Default [`DEFAULT_HANDOFF_LINGER_US`].
    pub fn set_handoff_linger(&self, linger: std::time::Duration) {
        self.handoff_linger_us
            .store(linger.as_micros() as u64, Ordering::Relaxed);
    }

    /// Directory the store was opened in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Up to `limit` messages of timeline `id` (a user's or a group's: `kind`) with seq above
    /// `after`, ascending.
    fn range_of(
        &self,
        kind: Kind,
        id: u64,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let Some(first) = after.0.checked_add(1) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lo = key_u64_u64(id, first);
        let hi = key_u64_u64(id, u64::MAX);
        self.ranged_scan(kind, lo, hi, limit, false)?
            .iter()
            .map(|(k, v)| decode_in(kind, k, v))
            .collect()
    }

    /// Seq of the newest entry of timeline `id` (a user's or a group's: `kind`), 0 if none.
    fn last_of(&self, kind: Kind, id: u64) -> Result<Seq, StoreError> {
        let lo = key_u64_u64(id, 0);
        let hi = key_u64_u64(id, u64::MAX);
        match self.ranged_scan(kind, lo, hi, 1, true)?.first() {
            Some((k, _)) => Ok(Seq(second_u64(kind, k)?)),
            None => Ok(Seq(0)),
        }
    }

    /// Keyspace `kind`, for a read: every commit that returned is applied first.
    fn space(&self, kind: Kind) -> &Keyspace {
        self.settle_durable();
        &self.spaces[kind as usize]
    }

    fn get(&self, kind: Kind, key: &[u8]) -> Result<Option<fjall::Slice>, StoreError> {
        self.space(kind).get(key).map_err(io)
    }

    fn get_u64(&self, kind: Kind, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.get(kind, key)? {
            Some(v) => val_u64(kind, key, &v).map(Some),
            None => Ok(None),
        }
    }
}

/// One write of a batch: keyspace, key, value (`None` = remove).
type Write = (Kind, Vec<u8>, Option<Vec<u8>>);

/// The writes of a batch after merging: one per key, in (keyspace, key) order.
type Writes = Vec<Write>;

/// Bytes of the keys and values of `writes`.
fn writes_bytes(writes: &Writes) -> usize {
    writes
        .iter()
        .map(|(_, k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
        .sum()
}

/// The writes of a batch's ops, in op order, before [`Collected::merged`].
struct Collected(Vec<Write>);

impl Collected {
    fn insert(&mut self, (kind, key): (Kind, Vec<u8>), value: Option<Vec<u8>>) {
        self.0.push((kind, key, value));
    }

    /// In (keyspace, key) order, the last write of each key only (as if the ops were applied
    /// one after another). The order is what the apply wants too: each memtable insert searches
    /// a skiplist from its top, and consecutive inserts of nearby keys find most of that path
    /// already in the CPU cache.
    fn merged(self) -> Writes {
        let mut w = self.0;
        // Stable: the writes of one key stay in op order.
        w.sort_by(|a, b| (a.0 as u8, &a.1).cmp(&(b.0 as u8, &b.1)));
        // `dedup_by` keeps the first of a run; carrying each later value into it keeps the last.
        w.dedup_by(|later, kept| {
            let same = later.0 == kept.0 && later.1 == kept.1;
            if same {
                std::mem::swap(&mut later.2, &mut kept.2);
            }
            same
        });
        w
    }
}

/// The commit-log record of a batch (layout in the module docs).
fn encode_writes(w: &[Write]) -> Vec<u8> {
    let size: usize = w
        .iter()
        .map(|(_, k, v)| 8 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
        .sum();
    let mut out = Vec::with_capacity(4 + size);
    out.extend_from_slice(&(w.len() as u32).to_be_bytes());
    for (kind, key, value) in w {
        out.push(*kind as u8);
        // Keys are ids and device ids, far below 64 KiB (the protocol bounds device ids).
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.extend_from_slice(key);
        match value {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    out
}

/// The writes of a commit-log record; `None` if it does not decode.
fn decode_writes(mut b: &[u8]) -> Option<Vec<Write>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    let n = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let kind = *Kind::ALL.get(take(&mut b, 1)?[0] as usize)?;
        let klen = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?) as usize;
        let key = take(&mut b, klen)?.to_vec();
        let value = match take(&mut b, 1)?[0] {
            0 => None,
            1 => {
                let vlen = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
                Some(take(&mut b, vlen)?.to_vec())
            }
            _ => return None,
        };
        out.push((kind, key, value));
    }
    b.is_empty().then_some(out)
}

/// Hands writes (key, value; `None` deletes) of a tabled or a ranged keyspace to fjall as one
/// sorted table (fjall's ingestion: it bypasses the memtable, and the table and fjall's version
/// are synced before it returns). The last write of a key in `writes` wins.
fn ingest_table<'a>(
    space: &Keyspace,
    writes: impl Iterator<Item = (&'a [u8; 16], &'a Option<Vec<u8>>)>,
) -> Result<(), StoreError> {
    let mut w: Vec<_> = writes.collect();
    if w.is_empty() {
        return Ok(());
    }
    // Stable: of two writes of one key, the later stays last, and is the one kept.
    w.sort_by_key(|(k, _)| **k);
    w.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    let mut ingestion = space.start_ingestion().map_err(io)?;
    for (key, value) in w {
        match value {
            Some(v) => ingestion.write(&key[..], v.as_slice()),
            None => ingestion.write_tombstone(&key[..]),
        }
        .map_err(io)?;
    }
    ingestion.finish().map_err(io)
}

/// Whether a checkpoint sealed writes of `staged` that fjall does not have yet.
fn is_sealed<M, const N: usize>(staged: &Mutex<Staged<M, N>>) -> bool {
    staged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sealed
        .is_some()
}

/// Hands the sealed writes of `staged` (keyspaces `kinds`) to fjall with `ingest`, one map at a
/// time, then drops them (kept if it fails).
fn hand_over<M, const N: usize>(
    staged: &Mutex<Staged<M, N>>,
    kinds: [Kind; N],
    ingest: impl Fn(Kind, &M) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let lock = || staged.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sealed) = lock().sealed.clone() else {
        return Ok(());
    };
    for (kind, writes) in kinds.into_iter().zip(sealed.iter()) {
        ingest(kind, writes)?;
    }
    lock().sealed = None;
    Ok(())
}

/// Applies the writes of log record `seq` to fjall as one unsynced batch, with the record's seq;
/// its outbox writes to `deferred` instead (until the next checkpoint), its timeline entries to
/// `ranged` (until `store-ingest` hands them to fjall as tables after a checkpoint), and those of
/// the tabled keyspaces not at all: they wait in [`Turns::pending`] to be handed to fjall as
/// tables (or, replayed at open, in the open's own maps).
fn apply(
    db: &Database,
    spaces: &[Keyspace; 18],
    meta: &Keyspace,
    deferred: &Mutex<Deferred>,
    ranged_maps: &Mutex<RangedMaps>,
    writes: Writes,
    seq: u64,
) -> Result<(), StoreError> {
    // In the order they come: a commit's are in key order, keyspace by keyspace
    // ([`Collected::merged`]), and so are the records it wrote to the log (records of an older
    // release replay in their own order: one write per key there too, so only slower).
    let mut b = db.batch().durability(None);
    let mut held = None;
    let mut held_ranged = None;
    for (kind, key, value) in writes {
        if tabled(kind).is_some() {
            continue;
        }
        if let (Some(t), Ok(k)) = (ranged(kind), <[u8; 16]>::try_from(key.as_slice())) {
            held_ranged
                .get_or_insert_with(|| ranged_maps.lock().unwrap_or_else(|p| p.into_inner()))
                .current[t]
                .insert(k, value);
            continue;
        }
        if kind == Kind::Outbox {
            held.get_or_insert_with(|| deferred.lock().unwrap_or_else(|p| p.into_inner()))
                .write(key, value);
            continue;
        }
        let space = &spaces[kind as usize];
        match value {
            Some(v) => b.insert(space, key, v),
            None => b.remove(space, key),
        }
    }
    drop(held);
    drop(held_ranged);
    b.insert(meta, APPLIED, seq.to_be_bytes());
    b.commit().map_err(io)
}

fn collect(batch: WriteBatch) -> Writes {
    let mut w = Collected(Vec::with_capacity(batch.ops.len() * 2));
    for op in batch.ops {
        let indexed = !matches!(op, Op::AppendUnindexed { .. });
        match op {
            Op::IdFloor { generator, ms } => {
                w.insert(
                    (Kind::IdFloor, generator.to_be_bytes().to_vec()),
                    Some(ms.to_be_bytes().to_vec()),
                );
            }
            Op::SeqBound { uid, bound } => {
                w.insert(
                    (Kind::SeqBound, key_u64(uid.0).to_vec()),
                    Some(bound.0.to_be_bytes().to_vec()),
                );
            }
            Op::Append { uid, msg } | Op::AppendUnindexed { uid, msg } => {
                if indexed {
                    w.insert(
                        (Kind::MsgIdx, key_u64_u64(uid.0, msg.msg_id.0).to_vec()),
                        Some(msg.seq.0.to_be_bytes().to_vec()),
                    );
                }
                let mut v = Vec::with_capacity(msg.encoded_len());
                msg.encode(&mut v);
                w.insert(
                    (Kind::Timeline, key_u64_u64(uid.0, msg.seq.0).to_vec()),
                    Some(v),
                );
            }
            Op::Dedup {
                uid,
                client_msg_id,
                entry,
            } => {
                let mut v = Vec::with_capacity(32);
                v.extend_from_slice(&entry.msg_id.0.to_be_bytes());
                v.extend_from_slice(&entry.seq.0.to_be_bytes());
                v.extend_from_slice(&entry.server_time_ms.to_be_bytes());
                v.extend_from_slice(&entry.prev_seq.0.to_be_bytes());
                w.insert(
                    (Kind::Dedup, key_u64_u64(uid.0, client_msg_id).to_vec()),
                    Some(v),
                );
            }
            Op::Cursor {
                uid,
                device_id,
                seq,
            } => {
                w.insert(
                    (Kind::Cursor, key_cursor(uid, &device_id)),
                    Some(seq.0.to_be_bytes().to_vec()),
                );
            }
            Op::OutboxPut(e) => {
                w.insert(
                    (Kind::Outbox, key_outbox(e.shard, e.msg_id).to_vec()),
                    Some(encode_outbox(&e)),
                );
            }
            Op::OutboxDelete { shard, msg_id } => {
                w.insert((Kind::Outbox, key_outbox(shard, msg_id).to_vec()), None);
            }
            Op::PushWatch {
                shard,
                uid,
                seq,
                on,
            } => {
                let mut k = Vec::with_capacity(18);
                k.extend_from_slice(&shard.0.to_be_bytes());
                k.extend_from_slice(&uid.0.to_be_bytes());
                k.extend_from_slice(&seq.0.to_be_bytes());
                w.insert((Kind::PushWatch, k), on.then(Vec::new));
            }
            Op::GroupPut(g) => {
                w.insert(
                    (Kind::Group, key_u64(g.group.0).to_vec()),
                    Some(g.to_bytes().to_vec()),
                );
            }
            Op::MemberPut { group, member } => {
                let mut v = Vec::with_capacity(9);
                v.push(member.role);
                v.extend_from_slice(&member.joined_ms.to_be_bytes());
                w.insert(
                    (Kind::Member, key_u64_u64(group.0, member.uid.0).to_vec()),
                    Some(v),
                );
                w.insert(
                    (Kind::UGroup, key_u64_u64(member.uid.0, group.0).to_vec()),
                    Some(Vec::new()),
                );
            }
            Op::MemberDelete { group, uid } => {
                w.insert((Kind::Member, key_u64_u64(group.0, uid.0).to_vec()), None);
                w.insert((Kind::UGroup, key_u64_u64(uid.0, group.0).to_vec()), None);
                w.insert((Kind::ULarge, key_u64_u64(uid.0, group.0).to_vec()), None);
            }
            Op::LargeMember { group, uid, on } => {
                w.insert(
                    (Kind::ULarge, key_u64_u64(uid.0, group.0).to_vec()),
                    on.then(Vec::new),
                );
            }
            Op::GroupAppend { group, msg } => {
                let mut v = Vec::with_capacity(msg.encoded_len());
                msg.encode(&mut v);
                w.insert(
                    (Kind::GTimeline, key_u64_u64(group.0, msg.seq.0).to_vec()),
                    Some(v),
                );
            }
            Op::GroupRead { uid, group, seq } => {
                w.insert(
                    (Kind::GRead, key_u64_u64(uid.0, group.0).to_vec()),
                    Some(seq.0.to_be_bytes().to_vec()),
                );
            }
            Op::UserFlag { uid, flag, on } => {
                w.insert(
                    (Kind::Flag, key_u64_u64(uid.0, u64::from(flag)).to_vec()),
                    on.then(Vec::new),
                );
            }
            Op::Mute { uid, peer, muted } => {
                w.insert(
                    (Kind::Mute, key_u64_u64(uid.0, peer).to_vec()),
                    muted.then(Vec::new),
                );
            }
            Op::PushToken { uid, token } => {
                let v = (!token.token.is_empty()).then(|| {
                    let mut v = Vec::with_capacity(1 + token.token.len());
                    v.push(token.provider);
                    v.extend_from_slice(token.token.as_bytes());
                    v
                });
                w.insert((Kind::PushTok, key_cursor(uid, &token.device_id)), v);
            }
            Op::OrgPut { record, replaces } => {
                if let Some(old) = replaces.filter(|&v| v != record.version) {
                    w.insert((Kind::Org, key_u64(old).to_vec()), None);
                }
                w.insert(
                    (Kind::Org, key_u64(record.version).to_vec()),
                    Some(record.to_bytes().to_vec()),
                );
            }
        }
    }
    w.merged()
}

impl FjallStore {
    /// [`Store::commit`] and [`Store::commit_then`]: `written` runs once the record is in the
    /// log, before its sync.
    fn commit_inner(
        &self,
        batch: WriteBatch,
        written: Option<impl FnOnce()>,
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }

        // Held until the batch is durable: a concurrent `fence` waits for this commit.
        let fences = self.fences.read().unwrap_or_else(|p| p.into_inner());
        if let Some(Writer { node, incarnation }) = batch.writer {
            if let Some(&fence) = fences.get(&node) {
                if fence > incarnation {
                    return Err(StoreError::Fenced {
                        node,
                        incarnation,
                        fence,
                    });
                }
            }
        }
        // Every item of a fjall batch gets the same LSM sequence number, so two writes of one key
        // in one batch would be ordered only by the memtable's replace-on-insert. Merge them here
        // instead: the last op on a key wins, as if the ops were applied one after another.
        for op in &batch.ops {
            if let Op::Dedup { entry, .. } = op {
                self.dedup_clock
                    .fetch_max(entry.server_time_ms, Ordering::Relaxed);
            }
        }
        // A committer that never reads nor settles (a worker busy with appends alone) must not
        // pile up unapplied records (memory, and a long apply at the next checkpoint).
        if self.turns.waiting() >= MAX_WAITING {
            self.help_apply();
        }
        let writes = collect(batch);
        let record = encode_writes(&writes);
        #[cfg(test)]
        let writes = (!self.skip_apply.load(Ordering::Relaxed)).then_some(writes);
        #[cfg(not(test))]
        let writes = Some(writes);
        // 1. The record, under the writer lock; its writes wait from now on to be applied. A
        // checkpoint (before a segment is reused) first makes every record written so far
        // durable and applied, then persists fjall.
        let seq = {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            let seq = log
                .write(&record, |last| self.checkpoint(last))
                .map_err(|e| StoreError::Io(format!("commit log: {e}")))?;
            self.turns.push(seq, writes);
            seq
        };
        // 2. Durable, with whatever other commits were written meanwhile. Work handed on now
        // can only be committed after this record, so it never becomes durable without it.
        let synced = match written {
            Some(written) => {
                written();
                let linger = self.handoff_linger_us.load(Ordering::Relaxed);
                self.syncer
                    .sync_after_handoff(seq, std::time::Duration::from_micros(linger))
            }
            None => self.syncer.sync(seq),
        };
        // (A failed sync poisons the log: no later record becomes durable, so none is applied,
        // and every later commit fails.)
        if let Err(e) = synced {
            return Err(StoreError::Io(format!("commit log sync: {e}")));
        }
        // 3. Into fjall later, in seq order: by the next read (of anyone), checkpoint or
        // `settle` (the worker's, once its round's replies went out).
        drop(fences);
        if let Some(a) = &self.applier {
            if self.turns.waiting() >= WAKE_APPLIER {
                a.wake();
            }
        }
        Ok(())
    }

    /// A checkpoint, before the log starts a segment (under the writer lock; `last` is the seq
    /// of the last record written): every record becomes durable and applied, the outbox
    /// writes waiting in memory go to fjall, the tabled and the ranged keyspaces' writes since
    /// the last checkpoint are sealed (and those sealed by it are in fjall), and fjall's journal
    /// is synced. After it, nothing in the log's older segments is needed but the segment that is
    /// ending (for its sealed writes, until `store-ingest` has handed them over).
    fn checkpoint(&self, last: u64) -> std::io::Result<()> {
        let failed = |e: StoreError| std::io::Error::other(e.to_string());
        self.syncer.sync(last)?;
        self.settle_to(last);
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(&self.db, &self.spaces[Kind::Outbox as usize])
            .map_err(failed)?;
        self.checkpoint_seal().map_err(failed)?;
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Applies every durable record that waits, up to `upto`. A failed apply stops the process:
    /// acknowledged writes could no longer be read, and a restart replays them from the log.
    fn settle_to(&self, upto: u64) {
        applied_or_abort(
            self.turns
                .settle(upto, |seq, writes| self.apply_record(seq, writes)),
        );
    }

    /// Applies one record's writes to fjall (in its turn).
    fn apply_record(&self, seq: u64, writes: Writes) -> Result<(), StoreError> {
        apply(
            &self.db,
            &self.spaces,
            &self.meta,
            &self.deferred,
            &self.ranged,
            writes,
            seq,
        )
    }

    /// What a commit that finds [`MAX_WAITING`] records waiting does. Without an apply thread it
    /// applies every durable one. With one, it applies every durable one too if nobody is
    /// applying (the thread waits for a CPU the cores keep busy), and nothing if somebody is
    /// (the thread applies, or waits in fjall, which stalls its writers now and then for tens
    /// of milliseconds: a flush's journal sync, a rotation; a core that queued up behind it
    /// would stall every connection it serves), unless the waiting records hold
    /// [`MAX_WAITING_BYTES`]: then it waits for its turn and applies the oldest
    /// [`HELP_RECORDS`], the bound on their memory (fjall's own stalls so slow the committers
    /// down, as fjall means them to).
    fn help_apply(&self) {
        if self.applier.is_none() {
            self.settle_durable();
            return;
        }
        let durable = self.syncer.durable();
        if !self.turns.behind(durable) {
            return;
        }
        let wait = self.turns.waiting_bytes() >= MAX_WAITING_BYTES;
        let limit = if wait { HELP_RECORDS } else { usize::MAX };
        applied_or_abort(
            self.turns
                .settle_some(durable, limit, wait, |seq, w| self.apply_record(seq, w)),
        );
    }

    /// A clone for a thread of the store's own: without the threads, so that the last clone
    /// of the store's users stops them.
    fn headless(&self) -> FjallStore {
        let mut headless = self.clone();
        headless.applier = None;
        headless._trickle = None;
        headless
    }

    /// Test: a checkpoint now, as the log makes before it starts a segment, and the tabled
    /// writes it sealed in fjall before it returns (not left to `store-ingest`).
    #[cfg(test)]
    fn checkpoint_now(&self) {
        let log = self.log.lock().unwrap();
        self.checkpoint(log.next_seq() - 1).unwrap();
        self.ingest_sealed(true).unwrap();
    }

    /// Applies every record that is durable and not applied yet: what a read sees first.
    fn settle_durable(&self) {
        let durable = self.syncer.durable();
        if self.turns.behind(durable) {
            self.settle_to(durable);
        }
    }
}

/// An apply that failed stops the process: a restart replays the log.
fn applied_or_abort(applied: Result<(), StoreError>) {
    if let Err(e) = applied {
        tracing::error!("store: applying the commit log to fjall failed, aborting: {e}");
        std::process::abort();
    }
}

/// A commit that finds this many records waiting to be applied helps apply them
/// ([`FjallStore::help_apply`]).
const MAX_WAITING: usize = 64;

/// How many records a commit that finds the waiting records at [`MAX_WAITING_BYTES`] applies
/// (after waiting for its turn): each of its commits adds one.
const HELP_RECORDS: usize = 8;

/// Bytes of keys and values the waiting records may hold before a commit waits for its turn to
/// apply some (about two seconds of c2c at 20 000 messages/s: the log's records take ~400 B
/// per message).
const MAX_WAITING_BYTES: usize = 16 << 20;

/// A commit (or a [`Store::settle`]) that finds this many records waiting wakes the apply
/// thread.
const WAKE_APPLIER: usize = 8;

impl FjallStore {
    /// The value under `key` of tabled keyspace `kind` as of every commit that returned,
    /// without applying waiting records first: the writes fjall does not have yet are in
    /// [`Turns::pending`] (the newest whose record is durable wins), fjall has the older ones
    /// (tables handed over after the checkpoints).
    fn tabled_read(&self, kind: Kind, key: &[u8; 16]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = tabled(kind).expect("a tabled keyspace");
        let durable = self.syncer.durable();
        let pending = self
            .turns
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .durable(t, key, durable);
        match pending {
            Some(value) => Ok(value),
            // The sealed writes leave the maps only once fjall has them.
            None => Ok(self.spaces[kind as usize]
                .get(key)
                .map_err(io)?
                .map(|v| v.to_vec())),
        }
    }

    /// The checkpoint's part for the tabled and the ranged keyspaces (under the writer lock,
    /// every record durable and applied): the writes sealed by the checkpoint before, if
    /// `store-ingest` has not handed them to fjall yet, go now (the log is about to stop handing
    /// their records back); then those since are sealed, and `store-ingest` hands them over in
    /// the background (a store without the store's threads does it now).
    fn checkpoint_seal(&self) -> Result<(), StoreError> {
        self.ingest_sealed(true)?;
        self.turns
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seal();
        self.ranged.lock().unwrap_or_else(|p| p.into_inner()).seal();
        match &self.applier {
            Some(a) => a.wake_ingest(),
            None => self.ingest_sealed(true)?,
        }
        Ok(())
    }

    /// Hands the sealed writes to fjall as one sorted table per tabled and per ranged keyspace
    /// (fjall's ingestion: no memtable; the table and fjall's version are synced before it
    /// returns), then drops them from [`Turns::pending`] and [`FjallStore::ranged`] (kept if it
    /// fails: tried again later; handing a keyspace's over again is harmless). Unless `wait`,
    /// only if nobody else is at it.
    fn ingest_sealed(&self, wait: bool) -> Result<(), StoreError> {
        if !is_sealed(&self.turns.pending) && !is_sealed(&self.ranged) {
            return Ok(());
        }
        let Some(_ingesting) = lock_unless_held(&self.turns.ingesting, wait) else {
            return Ok(());
        };
        // (Another one may have handed them over meanwhile: `hand_over` finds nothing then.)
        hand_over(&self.turns.pending, TABLED, |kind, writes| {
            ingest_table(
                &self.spaces[kind as usize],
                writes.iter().map(|(k, w)| (k, &w.newest.1)),
            )
        })?;
        hand_over(&self.ranged, RANGED, |kind, writes| {
            ingest_table(&self.spaces[kind as usize], writes.iter())
        })
    }

    /// Up to `limit` entries of ranged keyspace `kind` with keys in `lo..=hi`, in key order
    /// (descending if `rev`), as of every commit that returned: fjall's entries with those not
    /// in fjall yet ([`RangedMaps`]) on top. Those are read first: the sealed ones leave the maps
    /// only once fjall has them, so one that moves meanwhile is read in fjall.
    fn ranged_scan(
        &self,
        kind: Kind,
        lo: [u8; 16],
        hi: [u8; 16],
        limit: usize,
        rev: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let t = ranged(kind).expect("a ranged keyspace");
        let space = self.space(kind);
        let held = {
            let maps = self.ranged.lock().unwrap_or_else(|p| p.into_inner());
            let run = |m| held_run(m, lo, hi, rev);
            let sealed = maps.sealed.as_deref().map(|s| &s[t]);
            match merge_newer(run(Some(&maps.current[t])), run(sealed), rev, limit) {
                Ok(held) => held,
                Err(never) => match never {},
            }
        };
        let range = space.range(lo..=hi);
        let in_fjall = |g: fjall::Guard| {
            let (k, v) = g.into_inner().map_err(io)?;
            Ok((k.to_vec(), Some(v.to_vec())))
        };
        let held = held.into_iter().map(Ok);
        let merged = if rev {
            merge_newer(held, range.rev().map(in_fjall), rev, limit)?
        } else {
            merge_newer(held, range.map(in_fjall), rev, limit)?
        };
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect())
    }
}

/// The store's apply thread (`store-apply`): applies durable records to fjall off the logic
/// workers' threads, at a lower CPU priority ([`APPLY_NICE`]), when woken (a commit or a
/// [`Store::settle`] that finds [`WAKE_APPLIER`] records waiting) or, failing that, within
/// [`APPLY_POLL`]. Woken for fewer records, it cost more CPU in wake-ups and context switches on
/// the project's 2-CPU VM than it saved the cores (docs/BENCHMARKS.md, "The apply on a thread of
/// its own").
/// It applies what is durable once more when it stops (the last clone of the store is
/// dropped), so a store closed in order leaves little to replay.
#[derive(Debug)]
struct Applier {
    /// (woken, stop), and the thread's wake-up.
    signal: Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The same for the thread that hands the tabled keyspaces' writes a checkpoint sealed to
    /// fjall (`store-ingest`, [`FjallStore::ingest_sealed`]): its own, so that the applies go on
    /// meanwhile.
    ingest_signal: Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>,
    ingest_thread: Option<std::thread::JoinHandle<()>>,
}

/// Lowers the calling thread's CPU priority to [`APPLY_NICE`] (Linux keeps a nice value per
/// thread). A failure leaves it at the default priority, which is slower for the cores, never
/// wrong.
fn nice_this_thread() {
    // SAFETY: plain syscalls about the calling thread.
    let niced = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, APPLY_NICE)
    };
    if niced != 0 {
        tracing::debug!("store: a thread of the store keeps its priority");
    }
}

/// Nice value of the apply thread: under a full CPU the scheduler prefers the cores' threads
/// (connections and logic rounds) to it; a commit that finds [`MAX_WAITING`] records waiting
/// helps ([`FjallStore::help_apply`]), so it never falls behind without bound.
const APPLY_NICE: libc::c_int = 10;

/// The apply thread looks for durable records this often when nobody woke it.
const APPLY_POLL: std::time::Duration = std::time::Duration::from_millis(10);

impl Applier {
    fn start(store: &FjallStore) -> std::io::Result<Applier> {
        let signal = Arc::new((Mutex::new((false, false)), std::sync::Condvar::new()));
        let headless = store.headless();
        let s = signal.clone();
        let thread = std::thread::Builder::new()
            .name("store-apply".into())
            .spawn(move || {
                nice_this_thread();
                let mut st = s.0.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    while !st.0 && !st.1 {
                        st =
                            s.1.wait_timeout(st, APPLY_POLL)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        if !st.0 && !st.1 {
                            st.0 = headless.turns.behind(headless.syncer.durable());
                        }
                    }
                    let stop = st.1;
                    st.0 = false;
                    drop(st);
                    // One record per turn: a read that needs the turn meanwhile (this thread
                    // may wait for a CPU while holding it) waits for one apply, not for all.
                    loop {
                        let next = headless.turns.next.load(Ordering::Acquire);
                        if next > headless.syncer.durable() {
                            break;
                        }
                        headless.settle_to(next);
                        if headless.turns.next.load(Ordering::Acquire) == next {
                            // Durable, not queued yet (its committer is between the two): it
                            // comes back with the next wake-up or look.
                            break;
                        }
                    }
                    if stop {
                        return;
                    }
                    st = s.0.lock().unwrap_or_else(|p| p.into_inner());
                }
            })?;
        let ingest_signal = Arc::new((Mutex::new((false, false)), std::sync::Condvar::new()));
        let s = ingest_signal.clone();
        let headless = store.headless();
        let ingest_thread = std::thread::Builder::new()
            .name("store-ingest".into())
            .spawn(move || {
                nice_this_thread();
                let mut st = s.0.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    while !st.0 && !st.1 {
                        st = s.1.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    let stop = st.1;
                    st.0 = false;
                    drop(st);
                    if stop {
                        // What is still sealed goes with the next open's replay.
                        return;
                    }
                    // (A failure keeps them sealed: the next checkpoint tries again, and fails
                    // if it cannot.)
                    if let Err(e) = headless.ingest_sealed(false) {
                        tracing::warn!("store: sealed writes not handed to fjall yet: {e}");
                    }
                    st = s.0.lock().unwrap_or_else(|p| p.into_inner());
                }
            });
        let ingest_thread = match ingest_thread {
            Ok(t) => t,
            Err(e) => {
                // Stop the apply thread started above.
                drop(Applier {
                    signal,
                    thread: Some(thread),
                    ingest_signal,
                    ingest_thread: None,
                });
                return Err(e);
            }
        };
        Ok(Applier {
            signal,
            thread: Some(thread),
            ingest_signal,
            ingest_thread: Some(ingest_thread),
        })
    }

    /// Has the `store-ingest` thread hand the sealed writes to fjall (returns at once).
    fn wake_ingest(&self) {
        let mut st = self
            .ingest_signal
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        st.0 = true;
        self.ingest_signal.1.notify_one();
    }

    /// Has the thread apply what is durable (returns at once).
    fn wake(&self) {
        let mut st = self.signal.0.lock().unwrap_or_else(|p| p.into_inner());
        if !st.0 {
            st.0 = true;
            self.signal.1.notify_one();
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        for (signal, thread) in [
            (&self.ingest_signal, self.ingest_thread.take()),
            (&self.signal, self.thread.take()),
        ] {
            signal.0.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
            signal.1.notify_all();
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
    }
}

/// Default of [`FjallStore::set_handoff_linger`], in µs: about what it takes here to wake
/// another worker's thread and have it write its record (the sync saved costs ~0.1 ms).
pub const DEFAULT_HANDOFF_LINGER_US: u64 = 250;

impl Store for FjallStore {
    async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.commit_inner(batch, None::<fn()>)
    }

    async fn commit_then(
        &self,
        batch: WriteBatch,
        written: impl FnOnce(),
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            written();
            return Ok(());
        }
        self.commit_inner(batch, Some(written))
    }

    /// Its errors are I/O and corruption, never [`StoreError::Unavailable`].
    fn commit_retryable(&self) -> bool {
        false
    }

    fn unsettled(&self) -> bool {
        self.turns.behind(self.syncer.durable())
    }

    fn settle(&self) -> Result<(), StoreError> {
        match &self.applier {
            Some(a) if self.turns.waiting() >= WAKE_APPLIER => a.wake(),
            Some(_) => {}
            None => self.settle_durable(),
        }
        Ok(())
    }

    async fn fence(&self, node: u16, incarnation: u64) -> Result<u64, StoreError> {
        let mut fences = self.fences.write().unwrap_or_else(|p| p.into_inner());
        let cur = fences.get(&node).copied().unwrap_or(0);
        if incarnation <= cur {
            return Ok(cur);
        }
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(
            &self.fence_space,
            node.to_be_bytes(),
            incarnation.to_be_bytes(),
        );
        b.commit().map_err(io)?;
        fences.insert(node, incarnation);
        Ok(incarnation)
    }

    async fn id_floor(&self, generator: u16) -> Result<u64, StoreError> {
        Ok(self
            .get_u64(Kind::IdFloor, &generator.to_be_bytes())?
            .unwrap_or(0))
    }

    async fn seq_bound(&self, uid: UserId) -> Result<Seq, StoreError> {
        Ok(Seq(self
            .get_u64(Kind::SeqBound, &key_u64(uid.0))?
            .unwrap_or(0)))
    }

    async fn last_seq(&self, uid: UserId) -> Result<Seq, StoreError> {
        self.last_of(Kind::Timeline, uid.0)
    }

    async fn timeline(
        &self,
        uid: UserId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.range_of(Kind::Timeline, uid.0, after, limit)
    }

    async fn seq_of(&self, uid: UserId, msg_id: MsgId) -> Result<Option<Seq>, StoreError> {
        let key = key_u64_u64(uid.0, msg_id.0);
        match self.tabled_read(Kind::MsgIdx, &key)? {
            Some(v) => val_u64(Kind::MsgIdx, &key, &v).map(|s| Some(Seq(s))),
            None => Ok(None),
        }
    }

    async fn dedup(
        &self,
        uid: UserId,
        client_msg_id: u64,
    ) -> Result<Option<DedupEntry>, StoreError> {
        let key = key_u64_u64(uid.0, client_msg_id);
        let Some(v) = self.tabled_read(Kind::Dedup, &key)? else {
            return Ok(None);
        };
        let v = <[u8; 32]>::try_from(&*v).map_err(|_| {
            corrupt(
                Kind::Dedup,
                &key,
                format!("value of {} bytes, want 32", v.len()),
            )
        })?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&v[i * 8..i * 8 + 8]);
            u64::from_be_bytes(w)
        };
        Ok(Some(DedupEntry {
            msg_id: MsgId(word(0)),
            seq: Seq(word(1)),
            server_time_ms: word(2),
            prev_seq: Seq(word(3)),
        }))
    }

    async fn cursor(&self, uid: UserId, device_id: &str) -> Result<Seq, StoreError> {
        Ok(Seq(self
            .get_u64(Kind::Cursor, &key_cursor(uid, device_id))?
            .unwrap_or(0)))
    }

    async fn cursors(&self, uid: UserId) -> Result<Vec<(String, Seq)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::Cursor).prefix(key_u64(uid.0)) {
            let (k, v) = guard.into_inner().map_err(io)?;
            let device_id = std::str::from_utf8(&k[8..])
                .map_err(|_| corrupt(Kind::Cursor, &k, "device id is not UTF-8"))?;
            out.push((device_id.to_owned(), Seq(val_u64(Kind::Cursor, &k, &v)?)));
        }
        Ok(out)
    }

    async fn push_watches(&self, shard: ShardId) -> Result<Vec<(UserId, Seq)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::PushWatch).prefix(shard.0.to_be_bytes()) {
            let (k, _) = guard.into_inner().map_err(io)?;
            let Some(rest) = k.get(2..18).filter(|_| k.len() == 18) else {
                return Err(corrupt(Kind::PushWatch, &k, "key is not 18 bytes"));
            };
            let word = |i: usize| u64::from_be_bytes(rest[i..i + 8].try_into().expect("8"));
            out.push((UserId(word(0)), Seq(word(8))));
        }
        Ok(out)
    }

    async fn outbox(&self, shard: ShardId) -> Result<Vec<OutboxEntry>, StoreError> {
        let space = self.space(Kind::Outbox);
        // fjall's entries with the ones kept in memory on top, under their lock.
        let deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        let prefix = shard.0.to_be_bytes();
        let mut entries = std::collections::BTreeMap::new();
        for guard in space.prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(io)?;
            entries.insert(k.to_vec(), v.to_vec());
        }
        for (k, v) in deferred.writes.range(prefix.to_vec()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            match v {
                Some(v) => entries.insert(k.clone(), v.clone()),
                None => entries.remove(k),
            };
        }
        drop(deferred);
        entries.iter().map(|(k, v)| decode_outbox(k, v)).collect()
    }

    async fn group(&self, group: GroupId) -> Result<Option<GroupDesc>, StoreError> {
        let key = key_u64(group.0);
        let Some(v) = self.get(Kind::Group, &key)? else {
            return Ok(None);
        };
        let g = GroupDesc::decode(Bytes::copy_from_slice(&v))
            .map_err(|e| corrupt(Kind::Group, &key, e.to_string()))?;
        if g.group != group {
            return Err(corrupt(
                Kind::Group,
                &key,
                "group id does not match its key",
            ));
        }
        Ok(Some(g))
    }

    async fn members(&self, group: GroupId) -> Result<Vec<MemberRecord>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::Member).prefix(key_u64(group.0)) {
            let (k, v) = guard.into_inner().map_err(io)?;
            let uid = second_u64(Kind::Member, &k)?;
            if v.len() != 9 {
                return Err(corrupt(
                    Kind::Member,
                    &k,
                    format!("value of {} bytes", v.len()),
                ));
            }
            let mut t = [0u8; 8];
            t.copy_from_slice(&v[1..9]);
            out.push(MemberRecord {
                uid: UserId(uid),
                role: v[0],
                joined_ms: u64::from_be_bytes(t),
            });
        }
        Ok(out)
    }

    async fn groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::UGroup).prefix(key_u64(uid.0)) {
            let k = guard.key().map_err(io)?;
            out.push(GroupId(second_u64(Kind::UGroup, &k)?));
        }
        Ok(out)
    }

    async fn large_groups_of(&self, uid: UserId) -> Result<Vec<GroupId>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::ULarge).prefix(key_u64(uid.0)) {
            let k = guard.key().map_err(io)?;
            out.push(GroupId(second_u64(Kind::ULarge, &k)?));
        }
        Ok(out)
    }

    async fn group_head(&self, group: GroupId) -> Result<Seq, StoreError> {
        self.last_of(Kind::GTimeline, group.0)
    }

    async fn group_timeline(
        &self,
        group: GroupId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.range_of(Kind::GTimeline, group.0, after, limit)
    }

    async fn group_read(&self, uid: UserId, group: GroupId) -> Result<Seq, StoreError> {
        Ok(Seq(self
            .get_u64(Kind::GRead, &key_u64_u64(uid.0, group.0))?
            .unwrap_or(0)))
    }

    async fn user_flags(&self, uid: UserId) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::Flag).prefix(key_u64(uid.0)) {
            let k = guard.key().map_err(io)?;
            let f = second_u64(Kind::Flag, &k)?;
            out.push(u8::try_from(f).map_err(|_| StoreError::Corrupt {
                key: format!("{FLAG}/{uid}"),
                why: format!("flag {f} above 255"),
            })?);
        }
        Ok(out)
    }

    async fn mutes(&self, uid: UserId) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::Mute).prefix(key_u64(uid.0)) {
            let k = guard.key().map_err(io)?;
            out.push(second_u64(Kind::Mute, &k)?);
        }
        Ok(out)
    }

    async fn org_records(&self, after: u64, limit: usize) -> Result<Vec<OrgRecord>, StoreError> {
        let mut out = Vec::new();
        let Some(from) = after.checked_add(1) else {
            return Ok(out);
        };
        for guard in self.space(Kind::Org).range(key_u64(from)..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = guard.into_inner().map_err(io)?;
            let rec = OrgRecord::decode(Bytes::copy_from_slice(&v))
                .map_err(|e| corrupt(Kind::Org, &k, e.to_string()))?;
            if key_u64(rec.version) != *k {
                return Err(corrupt(Kind::Org, &k, "version does not match its key"));
            }
            out.push(rec);
        }
        Ok(out)
    }

    async fn push_tokens(&self, uid: UserId) -> Result<Vec<PushToken>, StoreError> {
        let mut out = Vec::new();
        for guard in self.space(Kind::PushTok).prefix(key_u64(uid.0)) {
            let (k, v) = guard.into_inner().map_err(io)?;
            let device_id = std::str::from_utf8(&k[8..])
                .map_err(|_| corrupt(Kind::PushTok, &k, "device id is not UTF-8"))?;
            let (provider, token) = v
                .split_first()
                .ok_or_else(|| corrupt(Kind::PushTok, &k, "empty value"))?;
            let token = std::str::from_utf8(token)
                .map_err(|_| corrupt(Kind::PushTok, &k, "token is not UTF-8"))?;
            out.push(PushToken {
                device_id: device_id.to_owned(),
                provider: *provider,
                token: token.to_owned(),
            });
        }
        Ok(out)
    }
}

/// The second half of a 16-byte `u64 ++ u64` key.
fn second_u64(kind: Kind, key: &[u8]) -> Result<u64, StoreError> {
    key.get(8..16)
        .filter(|_| key.len() == 16)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(kind, key, format!("key of {} bytes, want 16", key.len())))
}

/// Whether a dedup record written at `server_time_ms` is out of the window at `now_ms`.
fn dedup_expired(server_time_ms: u64, now_ms: u64, window_ms: u64) -> bool {
    server_time_ms.saturating_add(window_ms) < now_ms
}

/// Compaction filter of the `dedup` keyspace: drops records more than [`crate::DEDUP_WINDOW`]
/// older than the newest one committed, so the keyspace holds about a window's worth of sends,
/// not every send ever made (ScyllaDB does the same with a TTL). The clock is the newest record's
/// `server_time_ms` rather than the wall clock, so a store whose writers stopped (or tests with a
/// fixed clock) never loses a record to time alone; in a running system the two agree. Keys are
/// spread over the whole uid range, so new writes keep compactions passing over every table, old
/// ones included. A record past the window that compaction has not reached yet is still read:
/// logic ignores it (`worker/c2c.rs`), as ScyllaDB's TTL hides its rows.
struct DedupExpiry {
    clock: Arc<AtomicU64>,
    window_ms: u64,
}

impl fjall::compaction::filter::Factory for DedupExpiry {
    fn name(&self) -> &str {
        "dedup-expiry"
    }

    fn make_filter(
        &self,
        _: &fjall::compaction::filter::Context,
    ) -> Box<dyn fjall::compaction::filter::CompactionFilter> {
        Box::new(DedupExpiryFilter {
            now_ms: self.clock.load(Ordering::Relaxed),
            window_ms: self.window_ms,
        })
    }
}

struct DedupExpiryFilter {
    now_ms: u64,
    window_ms: u64,
}

impl fjall::compaction::filter::CompactionFilter for DedupExpiryFilter {
    fn filter_item(
        &mut self,
        item: fjall::compaction::filter::ItemAccessor<'_>,
        _: &fjall::compaction::filter::Context,
    ) -> fjall::compaction::filter::CompactionFilterResult {
        use fjall::compaction::filter::Verdict;
        let v = item.value()?;
        // A value that is not a dedup record is kept (reads report it as corrupt).
        let Some(time) = v.get(16..24) else {
            return Ok(Verdict::Keep);
        };
        let time = u64::from_be_bytes(time.try_into().expect("8 bytes"));
        Ok(if dedup_expired(time, self.now_ms, self.window_ms) {
            Verdict::Remove
        } else {
            Verdict::Keep
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use im_shared::proto::CONV_C2C;

    use super::*;

    fn msg(uid: u64, seq: u64) -> Message {
        Message {
            seq: Seq(seq),
            prev_seq: Seq(seq - 1),
            msg_id: MsgId(1000 + seq),
            conv: CONV_C2C,
            from: UserId(1),
            to: UserId(uid),
            client_msg_id: seq,
            server_time_ms: 1_700_000_000_000,
            body: Bytes::from(format!("message {seq}")),
        }
    }

    fn append(uid: u64, seq: u64) -> WriteBatch {
        let mut b = WriteBatch::default();
        b.push(Op::Append {
            uid: UserId(uid),
            msg: msg(uid, seq),
        });
        b.push(Op::Cursor {
            uid: UserId(uid),
            device_id: "phone".into(),
            seq: Seq(seq),
        });
        b
    }

    #[tokio::test]
    async fn an_unindexed_append_writes_the_timeline_entry_and_no_msg_index_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        b.push(Op::AppendUnindexed {
            uid: UserId(5),
            msg: msg(5, 1),
        });
        store.commit(b).await.unwrap();
        assert_eq!(seqs(&store, 5).await, [1]);
        assert_eq!(store.seq_of(UserId(5), MsgId(1001)).await.unwrap(), None);
        let idx = &store.spaces[Kind::MsgIdx as usize];
        assert_eq!(idx.iter().count(), 0, "no msg index entry at all");
        // After a restart too (replayed from the commit log or read from fjall).
        drop(store);
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(seqs(&store, 5).await, [1]);
        assert_eq!(store.seq_of(UserId(5), MsgId(1001)).await.unwrap(), None);
    }

    async fn seqs(store: &FjallStore, uid: u64) -> Vec<u64> {
        let t = store.timeline(UserId(uid), Seq(0), 10_000).await.unwrap();
        t.iter().map(|m| m.seq.0).collect()
    }

    fn dedup_put(uid: u64, cid: u64, server_time_ms: u64) -> WriteBatch {
        let mut b = WriteBatch::default();
        b.push(Op::Dedup {
            uid: UserId(uid),
            client_msg_id: cid,
            entry: DedupEntry {
                msg_id: MsgId(cid),
                seq: Seq(cid),
                prev_seq: Seq(0),
                server_time_ms,
            },
        });
        b
    }

    /// Dedup records in the keyspace itself (what compaction kept), not filtered by any read.
    fn raw_dedup(store: &FjallStore) -> Vec<u64> {
        store
            .space(Kind::Dedup)
            .iter()
            .map(|g| {
                let (k, _) = g.into_inner().unwrap();
                u64::from_be_bytes(k[8..16].try_into().unwrap())
            })
            .collect()
    }

    fn compact_dedup(store: &FjallStore) {
        // Dedup writes reach fjall at a checkpoint.
        store.checkpoint_now();
        let ks = store.space(Kind::Dedup);
        ks.rotate_memtable_and_wait().unwrap();
        ks.major_compact().unwrap();
    }

    #[tokio::test]
    async fn compaction_drops_dedup_records_older_than_the_window_before_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        let window = crate::DEDUP_WINDOW.as_millis() as u64;
        let t = 1_800_000_000_000;
        // Alone, an old record stays: the clock is the newest record, not the wall clock.
        store.commit(dedup_put(1, 1, t - window - 1)).await.unwrap();
        compact_dedup(&store);
        assert_eq!(raw_dedup(&store), [1]);
        // Newer records move the clock: the first is now out of the window, the one exactly at
        // its edge is not.
        store.commit(dedup_put(1, 2, t - window)).await.unwrap();
        store.commit(dedup_put(1, 3, t)).await.unwrap();
        compact_dedup(&store);
        assert_eq!(raw_dedup(&store), [2, 3]);
        assert_eq!(store.dedup(UserId(1), 1).await.unwrap(), None);
        assert!(store.dedup(UserId(1), 2).await.unwrap().is_some());
    }

    /// Issue 14: after a long run the dedup keyspace holds about a window's worth of sends, not
    /// every send: 30 simulated days of 2 000 sends a day, compacted daily, keep 7 to 8 days.
    #[tokio::test]
    async fn the_dedup_keyspace_stays_proportional_to_the_window_not_to_the_sends() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        const DAY: u64 = 24 * 3600 * 1000;
        const PER_DAY: u64 = 2000;
        let t0 = 1_800_000_000_000;
        for day in 0..30u64 {
            let mut b = WriteBatch::default();
            for i in 0..PER_DAY {
                let n = day * PER_DAY + i;
                b.ops
                    .extend(dedup_put(1 + n % 500, n, t0 + day * DAY + i).ops);
            }
            store.commit(b).await.unwrap();
            compact_dedup(&store);
        }
        let kept = raw_dedup(&store).len() as u64;
        println!("dedup records kept: {kept} of {}", 30 * PER_DAY);
        assert!(
            (7 * PER_DAY..=8 * PER_DAY).contains(&kept),
            "{kept} of {} dedup records kept",
            30 * PER_DAY
        );
    }

    #[tokio::test]
    async fn a_commit_synced_in_the_log_but_never_applied_to_fjall_is_there_after_a_restart_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FjallStore::open(dir.path()).unwrap();
            store.commit(append(7, 1)).await.unwrap();
            // The process dies after the log sync of the next two commits, before fjall has them.
            store.skip_apply.store(true, Ordering::Relaxed);
            store.commit(append(7, 2)).await.unwrap();
            store.commit(append(7, 3)).await.unwrap();
            assert_eq!(seqs(&store, 7).await, vec![1]);
        }
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(seqs(&store, 7).await, vec![1, 2, 3]);
        assert_eq!(
            store.seq_of(UserId(7), MsgId(1003)).await.unwrap(),
            Some(Seq(3))
        );
        assert_eq!(store.cursor(UserId(7), "phone").await.unwrap(), Seq(3));
        // Nothing is replayed twice: the replay itself is recorded as applied.
        store.commit(append(7, 4)).await.unwrap();
        drop(store);
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(seqs(&store, 7).await, vec![1, 2, 3, 4]);
    }

    /// `meta/applied` as fjall holds it (read without applying anything first).
    fn applied_in_fjall(store: &FjallStore) -> u64 {
        store
            .meta
            .get(APPLIED)
            .unwrap()
            .map_or(0, |v| u64::from_be_bytes((*v).try_into().unwrap()))
    }

    /// The store in `dir` without its apply thread, so that nothing applies a commit behind the
    /// test's back (`settle` then applies inline).
    fn open_without_apply_thread(dir: &Path) -> FjallStore {
        let mut store = FjallStore::open(dir).unwrap();
        store.applier = None;
        store
    }

    #[test]
    fn a_returned_commit_is_applied_by_the_next_read_or_settle_and_replayed_if_neither_came() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        {
            // (The apply thread is tested on its own below.)
            let store = open_without_apply_thread(dir.path());
            let base = applied_in_fjall(&store);
            // A commit returns once durable, its writes not yet in fjall.
            rt.block_on(store.commit(append(7, 1))).unwrap();
            assert!(store.unsettled());
            assert_eq!(applied_in_fjall(&store), base);
            // A read, on any thread, applies it first: it sees what the commit wrote.
            let other = store.clone();
            let seen = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(seqs(&other, 7))
            })
            .join()
            .unwrap();
            assert_eq!(seen, vec![1]);
            assert!(!store.unsettled());
            assert_eq!(applied_in_fjall(&store), base + 1);
            // `settle` applies it without a read.
            rt.block_on(store.commit(append(7, 2))).unwrap();
            assert!(store.unsettled());
            store.settle().unwrap();
            assert!(!store.unsettled());
            assert_eq!(applied_in_fjall(&store), base + 2);
            // Commits with no read between them do not pile up unapplied records.
            for seq in 1..=3 * MAX_WAITING as u64 {
                rt.block_on(store.commit(append(8, seq))).unwrap();
                assert!(store.turns.waiting() <= MAX_WAITING);
            }
            store.settle().unwrap();
            // Neither came: the process dies with the commit durable in the log only.
            let applied = applied_in_fjall(&store);
            rt.block_on(store.commit(append(7, 3))).unwrap();
            assert_eq!(applied_in_fjall(&store), applied);
        }
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(rt.block_on(seqs(&store, 7)), vec![1, 2, 3]);
        assert_eq!(
            rt.block_on(seqs(&store, 8)),
            (1..=3 * MAX_WAITING as u64).collect::<Vec<_>>()
        );
        assert_eq!(
            rt.block_on(store.seq_of(UserId(7), MsgId(1003))).unwrap(),
            Some(Seq(3))
        );
        // Replayed once: a later commit and a restart leave each message once.
        rt.block_on(store.commit(append(7, 4))).unwrap();
        drop(store);
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(rt.block_on(seqs(&store, 7)), vec![1, 2, 3, 4]);
    }

    /// The dedup lookup of a send applies nothing: a returned commit's record is found where it
    /// waits, before and after its apply, and never one whose record is not durable yet.
    #[test]
    fn a_dedup_lookup_finds_a_returned_commit_without_applying_it_and_nothing_not_durable() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = open_without_apply_thread(dir.path());
        let lookup = |cid| rt.block_on(store.dedup(UserId(5), cid)).unwrap();
        let seq_of = |seq: u64| {
            rt.block_on(store.seq_of(UserId(5), MsgId(1000 + seq)))
                .unwrap()
        };
        rt.block_on(store.commit(dedup_put(5, 1, 100))).unwrap();
        rt.block_on(store.commit(append(5, 1))).unwrap();
        assert!(store.unsettled());
        assert_eq!(lookup(1).map(|e| e.server_time_ms), Some(100));
        assert_eq!(lookup(2), None);
        // The msg index entry the same way.
        assert_eq!(seq_of(1), Some(Seq(1)));
        assert_eq!(seq_of(2), None);
        // Nothing was applied for them.
        assert!(store.unsettled());
        // A later commit of the same key: the newest wins, applied or not.
        rt.block_on(store.commit(dedup_put(5, 1, 200))).unwrap();
        assert_eq!(lookup(1).map(|e| e.server_time_ms), Some(200));
        store.settle().unwrap();
        assert!(!store.unsettled());
        assert_eq!(lookup(1).map(|e| e.server_time_ms), Some(200));
        // Applied, the dedup and msg index writes are still only in the maps: fjall's memtables
        // never get them.
        assert!(raw_dedup(&store).is_empty());
        assert_eq!(store.spaces[Kind::MsgIdx as usize].iter().count(), 0);
        assert_eq!(seq_of(1), Some(Seq(1)));
        // A record written and not durable yet (as a commit between its write and its sync):
        // its dedup write is not seen, and the key's durable write is.
        let next = store.log.lock().unwrap().next_seq();
        store.turns.push(next, Some(collect(dedup_put(5, 3, 300))));
        store
            .turns
            .push(next + 1, Some(collect(dedup_put(5, 1, 400))));
        store.turns.push(next + 2, Some(collect(append(5, 2))));
        assert_eq!(lookup(3), None);
        assert_eq!(lookup(1).map(|e| e.server_time_ms), Some(200));
        assert_eq!(seq_of(2), None);
        assert_eq!(seq_of(1), Some(Seq(1)));
    }

    /// The merge of a newer run over an older one (the timelines' reads): the newer wins a key
    /// both hold, a delete hides the older's entry and counts for nothing against the limit,
    /// both directions, and an error of either run is the result.
    #[test]
    fn merge_newer_prefers_the_newer_run_honours_deletes_and_stops_at_the_limit() {
        type Run = Vec<Result<(Vec<u8>, Option<Vec<u8>>), String>>;
        let run = |entries: &[(u8, Option<u8>)]| -> Run {
            entries
                .iter()
                .map(|(k, v)| Ok((vec![*k], v.map(|v| vec![v]))))
                .collect()
        };
        let rev = |entries: &[(u8, Option<u8>)]| -> Run {
            let mut r = run(entries);
            r.reverse();
            r
        };
        let live = |out: Vec<(Vec<u8>, Option<Vec<u8>>)>| -> Vec<(u8, u8)> {
            out.into_iter()
                .filter_map(|(k, v)| Some((k[0], v?[0])))
                .collect()
        };
        let newer = [(2, Some(20)), (3, None), (5, Some(50))];
        let older = [
            (1, Some(1)),
            (2, Some(2)),
            (3, Some(3)),
            (4, Some(4)),
            (5, Some(5)),
            (6, Some(6)),
        ];
        let merged = |n: Run, o: Run, back: bool, limit: usize| {
            merge_newer(n.into_iter(), o.into_iter(), back, limit)
        };
        let fwd = |limit| live(merged(run(&newer), run(&older), false, limit).unwrap());
        assert_eq!(fwd(100), [(1, 1), (2, 20), (4, 4), (5, 50), (6, 6)]);
        assert_eq!(fwd(2), [(1, 1), (2, 20)]);
        assert_eq!(fwd(3), [(1, 1), (2, 20), (4, 4)]);
        assert_eq!(fwd(0), []);
        // The deletes met before the limit come out too: what they hide in a run older still
        // must stay hidden when this result is merged over it.
        let out = merged(run(&newer), run(&older), false, 3).unwrap();
        assert!(out.contains(&(vec![3], None)));
        let back = |limit| live(merged(rev(&newer), rev(&older), true, limit).unwrap());
        assert_eq!(back(100), [(6, 6), (5, 50), (4, 4), (2, 20), (1, 1)]);
        assert_eq!(back(2), [(6, 6), (5, 50)]);
        // Either run alone.
        assert_eq!(
            live(merged(run(&newer), run(&[]), false, 10).unwrap()),
            [(2, 20), (5, 50)]
        );
        assert_eq!(
            live(merged(run(&[]), run(&older[..2]), false, 10).unwrap()),
            [(1, 1), (2, 2)]
        );
        // An error of either run is the result.
        let mut bad = run(&older);
        bad[2] = Err("torn".into());
        assert_eq!(merged(run(&newer), bad, false, 100).unwrap_err(), "torn");
        let mut bad = run(&newer);
        bad[1] = Err("torn".into());
        assert_eq!(merged(bad, run(&older), false, 100).unwrap_err(), "torn");
    }

    /// Opens a store on a log of small segments (a few commits cross a checkpoint), with or
    /// without the store's threads (without them, a checkpoint hands the tabled keyspaces'
    /// writes to fjall itself).
    fn open_small_log(dir: &Path, threads: bool) -> FjallStore {
        let shape = LogShape {
            segments: 3,
            segment_bytes: 1024,
        };
        let mut store = FjallStore::open_with(dir, shape).unwrap();
        if !threads {
            store.applier = None;
        }
        store
    }

    /// A send as the tabled and the ranged keyspaces see it: its dedup record (client_msg_id
    /// `cid`, server time 1 000 + `cid`), its recipient's copy (user 5, seq `cid`, msg index
    /// entry msg_id 1 000 + `cid` → seq `cid`), a copy without msg index for user 6 (whose
    /// timeline follows user 5's in key order) and a post to group 9's timeline (seq `cid`).
    fn send(cid: u64) -> WriteBatch {
        let mut b = dedup_put(5, cid, 1_000 + cid);
        b.ops.extend(append(5, cid).ops);
        b.push(Op::AppendUnindexed {
            uid: UserId(6),
            msg: msg(6, cid),
        });
        b.push(Op::GroupAppend {
            group: GroupId(9),
            msg: msg(9, cid),
        });
        b
    }

    /// The seqs of timeline `id` of ranged keyspace `kind` that fjall itself holds.
    fn raw_seqs(store: &FjallStore, kind: Kind, id: u64) -> Vec<u64> {
        store
            .space(kind)
            .prefix(key_u64(id))
            .map(|g| second_u64(kind, &g.key().unwrap()).unwrap())
            .collect()
    }

    /// The client_msg_ids of the sends whose tabled and ranged writes fjall has (the dedup,
    /// msg index and timeline entries of the same sends: they travel together; `store-ingest`
    /// hands the tables over one after another, so a read may find one still on its way for a
    /// moment).
    fn sends_in_fjall(store: &FjallStore) -> Vec<u64> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let dedup = raw_dedup(store);
            let msgidx: Vec<u64> = store
                .space(Kind::MsgIdx)
                .iter()
                .map(|g| {
                    let (k, _) = g.into_inner().unwrap();
                    u64::from_be_bytes(k[8..16].try_into().unwrap()) - 1000
                })
                .collect();
            let others = [
                msgidx,
                raw_seqs(store, Kind::Timeline, 5),
                raw_seqs(store, Kind::Timeline, 6),
                raw_seqs(store, Kind::GTimeline, 9),
            ];
            if others.iter().all(|o| *o == dedup) || std::time::Instant::now() > deadline {
                for o in others {
                    assert_eq!(dedup, o, "dedup, msg index and timeline entries in fjall");
                }
                return dedup;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The timeline entries applied and not in fjall yet, in sends: (since the last
    /// checkpoint, sealed).
    fn ranged_held(store: &FjallStore) -> (usize, usize) {
        let maps = store.ranged.lock().unwrap();
        let (users, groups) = (maps.counts(0), maps.counts(1));
        assert_eq!((users.0, users.1), (2 * groups.0, 2 * groups.1));
        groups
    }

    /// The writes of the tabled keyspaces fjall does not have yet, in sends: (since the last
    /// checkpoint, sealed).
    fn pending_tabled(store: &FjallStore) -> (usize, usize) {
        let maps = store.turns.pending.lock().unwrap();
        let counts = |t: usize| maps.counts(t);
        assert_eq!(
            counts(0),
            counts(1),
            "dedup and msg index writes in the maps"
        );
        counts(0)
    }

    /// Every send committed is found (its dedup record and its msg index entry), and none that
    /// was not.
    fn assert_sends_found(rt: &tokio::runtime::Runtime, store: &FjallStore, committed: &[u64]) {
        let found = |c: u64| {
            let dedup = rt.block_on(store.dedup(UserId(5), c)).unwrap();
            let seq = rt
                .block_on(store.seq_of(UserId(5), MsgId(1000 + c)))
                .unwrap();
            (dedup.map(|e| e.server_time_ms), seq)
        };
        for &c in committed {
            assert_eq!(found(c), (Some(1_000 + c), Some(Seq(c))), "cid {c}");
        }
        let next = committed.last().map_or(1, |c| c + 1);
        assert_eq!(found(next), (None, None));
        // The timelines (the sends' seqs are 1, 2, …): whole, in pages from anywhere, and
        // their newest seq.
        let n = committed.len() as u64;
        assert_eq!(committed, (1..=n).collect::<Vec<_>>());
        let page = |kind: Kind, id: u64, after: u64, limit: usize| -> Vec<u64> {
            let msgs = match kind {
                Kind::Timeline => rt.block_on(store.timeline(UserId(id), Seq(after), limit)),
                _ => rt.block_on(store.group_timeline(GroupId(id), Seq(after), limit)),
            };
            msgs.unwrap().iter().map(|m| m.seq.0).collect()
        };
        for (kind, id) in [
            (Kind::Timeline, 5),
            (Kind::Timeline, 6),
            (Kind::GTimeline, 9),
        ] {
            assert_eq!(page(kind, id, 0, 10_000), committed, "{} {id}", kind.name());
            for after in [0, n / 3, n / 2, n.saturating_sub(2), n] {
                let want: Vec<u64> = (after + 1..=n).take(3).collect();
                assert_eq!(
                    page(kind, id, after, 3),
                    want,
                    "{} {id} after {after}",
                    kind.name()
                );
            }
        }
        assert_eq!(rt.block_on(store.last_seq(UserId(5))).unwrap(), Seq(n));
        assert_eq!(rt.block_on(store.last_seq(UserId(6))).unwrap(), Seq(n));
        assert_eq!(rt.block_on(store.last_seq(UserId(7))).unwrap(), Seq(0));
        assert_eq!(rt.block_on(store.group_head(GroupId(9))).unwrap(), Seq(n));
    }

    /// Nothing went through fjall's dedup, msg index and timeline memtables (a rotation of an
    /// empty one does nothing).
    fn assert_memtables_empty(store: &FjallStore) {
        for kind in TABLED.into_iter().chain(RANGED) {
            let ks = store.space(kind);
            assert_eq!(ks.sealed_memtable_count(), 0);
            assert!(
                !ks.rotate_memtable().unwrap(),
                "the {} memtable holds entries",
                kind.name()
            );
        }
    }

    /// Dedup, msg index and timeline writes wait in memory until a checkpoint seals them and
    /// they are handed to fjall as tables (here by the checkpoint itself: no store threads);
    /// reads find every returned commit's entries before, during and after that (the timelines'
    /// pages merged from memory and fjall), and across a crash at any point of it.
    #[test]
    fn dedup_index_and_timeline_writes_reach_fjall_at_a_checkpoint_and_survive_a_crash_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut store = open_small_log(dir.path(), false);
        let mut committed = vec![];
        let mut crossed = 0;
        let mut in_fjall = 0;
        for cid in 1..=200u64 {
            rt.block_on(store.commit(send(cid))).unwrap();
            committed.push(cid);
            // fjall holds the writes up to the last checkpoint, the maps the rest.
            let raw = sends_in_fjall(&store);
            assert_eq!(raw, committed[..raw.len()], "after commit {cid}");
            let (pending, sealed) = pending_tabled(&store);
            assert_eq!(
                sealed, 0,
                "without the store's threads a checkpoint ingests itself"
            );
            assert_eq!(raw.len() + pending, committed.len(), "after commit {cid}");
            // (`sends_in_fjall` applied every durable record: the timeline maps hold the same sends.)
            assert_eq!(ranged_held(&store), (pending, 0), "after commit {cid}");
            if raw.len() > in_fjall {
                // A checkpoint before this commit's record: only that record's writes are left.
                crossed += 1;
                assert_eq!(pending, 1, "after the checkpoint of commit {cid}");
                in_fjall = raw.len();
            }
            if cid % 50 == 25 {
                // A crash in a checkpoint, after fjall took the maps' writes and before the
                // maps were emptied and the log started a segment: the open hands them to fjall
                // again (same keys, same values).
                store.settle().unwrap();
                let maps = store.turns.pending.lock().unwrap();
                for (kind, writes) in TABLED.iter().zip(&maps.current) {
                    ingest_table(
                        store.space(*kind),
                        writes.iter().map(|(k, w)| (k, &w.newest.1)),
                    )
                    .unwrap();
                }
                drop(maps);
                let maps = store.ranged.lock().unwrap();
                for (kind, writes) in RANGED.iter().zip(&maps.current) {
                    ingest_table(&store.spaces[*kind as usize], writes.iter()).unwrap();
                }
                drop(maps);
                // (The reads below then find these entries in fjall and in memory at once.)
                assert_eq!(sends_in_fjall(&store), committed);
            }
            if cid % 25 == 0 {
                // A crash: the maps are lost with the process (a store dropped without a
                // checkpoint).
                drop(store);
                store = open_small_log(dir.path(), false);
                // The open replayed the newest two segments and handed their tabled writes to
                // fjall.
                assert_eq!(pending_tabled(&store), (0, 0));
                assert_eq!(ranged_held(&store), (0, 0));
                assert_eq!(sends_in_fjall(&store), committed);
                in_fjall = committed.len();
            }
            assert_sends_found(&rt, &store, &committed);
        }
        assert!(crossed >= 5, "only {crossed} checkpoints");
        assert_memtables_empty(&store);
    }

    /// With the store's threads, a checkpoint only seals the dedup, msg index and timeline
    /// writes, and `store-ingest` hands them to fjall (meanwhile the timelines' pages are
    /// merged from the current map, the sealed one and fjall); a crash before it did loses none
    /// of them (the log hands back the records of the newest two segments), and a checkpoint
    /// that finds them still sealed hands them over itself before the log stops handing their
    /// records back.
    #[test]
    fn sealed_writes_reach_fjall_off_the_committers_and_a_crash_before_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let wait_sealed_gone = |store: &FjallStore| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while pending_tabled(store).1 > 0 || ranged_held(store).1 > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "store-ingest did not hand the sealed writes to fjall"
                );
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        };
        let mut store = open_small_log(dir.path(), true);
        let mut committed: Vec<u64> = vec![];
        let mut cid = 0;
        // Commits up to the next checkpoint (fjall's tables or the sealed maps grow).
        let commit_to_checkpoint = |store: &FjallStore, cid: &mut u64, committed: &mut Vec<u64>| {
            let seen = |store: &FjallStore| sends_in_fjall(store).len() + pending_tabled(store).1;
            let before = seen(store);
            for _ in 0..100 {
                *cid += 1;
                rt.block_on(store.commit(send(*cid))).unwrap();
                committed.push(*cid);
                if seen(store) > before {
                    return;
                }
            }
            panic!("no checkpoint in 100 commits");
        };
        // In the background: the sealed writes reach fjall, the maps forget them.
        commit_to_checkpoint(&store, &mut cid, &mut committed);
        wait_sealed_gone(&store);
        assert_eq!(sends_in_fjall(&store), committed[..committed.len() - 1]);
        assert_sends_found(&rt, &store, &committed);
        // The thread kept from them (as if it had no CPU): sealed they stay, and are read.
        let held = store.turns.ingesting.lock().unwrap();
        commit_to_checkpoint(&store, &mut cid, &mut committed);
        let in_fjall = sends_in_fjall(&store).len();
        assert!(pending_tabled(&store).1 > 0);
        assert!(ranged_held(&store).1 > 0);
        assert_sends_found(&rt, &store, &committed);
        // A crash now: the sealed writes and the later ones are lost with the process, and the
        // log hands their records back.
        drop(held);
        let turns = store.turns.clone();
        let keep_held = turns.ingesting.lock().unwrap();
        drop(store);
        drop(keep_held);
        drop(turns);
        store = open_small_log(dir.path(), true);
        assert_eq!(pending_tabled(&store), (0, 0));
        assert_eq!(ranged_held(&store), (0, 0));
        assert_eq!(sends_in_fjall(&store), committed);
        assert!(in_fjall < committed.len());
        assert_sends_found(&rt, &store, &committed);
        // A checkpoint that finds the last one's writes still sealed hands them over first.
        let held = store.turns.ingesting.lock().unwrap();
        commit_to_checkpoint(&store, &mut cid, &mut committed);
        let sealed_first = pending_tabled(&store).1;
        assert!(sealed_first > 0);
        drop(held);
        // (The thread may take them now; either way the next checkpoint finds them in fjall.)
        let held_from = committed.len();
        commit_to_checkpoint(&store, &mut cid, &mut committed);
        assert!(sends_in_fjall(&store).len() >= held_from - 1);
        wait_sealed_gone(&store);
        assert_eq!(sends_in_fjall(&store), committed[..committed.len() - 1]);
        assert_sends_found(&rt, &store, &committed);
        assert_memtables_empty(&store);
    }

    /// The store's thread applies durable records: by itself within its poll (a `settle` with
    /// few records waiting leaves them to it), and woken by commits that pile records up;
    /// nothing is lost across a close.
    #[test]
    fn the_apply_thread_applies_durable_commits_when_woken_and_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let wait_applied = |store: &FjallStore, want: u64| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while applied_in_fjall(store) < want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the apply thread did not apply record {want}"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let store = FjallStore::open(dir.path()).unwrap();
        assert!(store.applier.is_some());
        let base = applied_in_fjall(&store);
        // One record waiting: `settle` does not apply it (nor wake the thread for it).
        rt.block_on(store.commit(append(7, 1))).unwrap();
        store.settle().unwrap();
        wait_applied(&store, base + 1);
        // Nobody calls anything: it finds the record within its poll.
        rt.block_on(store.commit(append(7, 2))).unwrap();
        wait_applied(&store, base + 2);
        assert!(!store.unsettled());
        // Many commits with no read nor settle: it is woken and keeps up.
        for seq in 3..=200 {
            rt.block_on(store.commit(append(7, seq))).unwrap();
        }
        wait_applied(&store, base + 200);
        assert_eq!(rt.block_on(seqs(&store, 7)), (1..=200).collect::<Vec<_>>());
        drop(store);
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(rt.block_on(seqs(&store, 7)), (1..=200).collect::<Vec<_>>());
    }

    /// The apply thread may wait in fjall for tens of milliseconds (a flush's journal sync): a
    /// commit that finds many records waiting then goes on without applying them, so that the
    /// core it runs on does not stall with it, until the waiting records hold
    /// `MAX_WAITING_BYTES`; that commit waits for its turn, and applies some.
    #[test]
    fn a_commit_does_not_queue_behind_a_stalled_apply_until_the_waiting_records_reach_their_bound()
    {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        assert!(store.applier.is_some());
        // (The first record starts the log's first segment, a checkpoint, which applies all.)
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.commit(append(8, 1))).unwrap();
        store.settle_durable();
        let base = applied_in_fjall(&store);
        // Held as the apply thread holds it while fjall stalls it.
        let turn = store.turns.turn.lock().unwrap();
        const BOUND: u64 = u64::MAX;
        let (tx, rx) = std::sync::mpsc::channel();
        let committer = {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let mut seq = 0;
                while seq < 2 * MAX_WAITING as u64
                    || store.turns.waiting_bytes() < MAX_WAITING_BYTES
                {
                    seq += 1;
                    let mut b = append(7, seq);
                    if seq > 2 * MAX_WAITING as u64 {
                        // (Large bodies reach the bound in a few records.)
                        if let Some(Op::Append { msg, .. }) = b.ops.first_mut() {
                            msg.body = Bytes::from(vec![b'x'; 1 << 20]);
                        }
                    }
                    rt.block_on(store.commit(b)).unwrap();
                    tx.send(seq).unwrap();
                }
                tx.send(BOUND).unwrap();
                rt.block_on(store.commit(append(7, seq + 1))).unwrap();
                tx.send(seq + 1).unwrap();
            })
        };
        let mut last = 0;
        loop {
            let seq = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|_| {
                    panic!("a commit below the bound waited for the apply's turn (after {last})")
                });
            if seq == BOUND {
                break;
            }
            last = seq;
        }
        assert!(last > 2 * MAX_WAITING as u64);
        assert_eq!(store.turns.waiting(), last as usize, "nothing applied");
        assert_eq!(applied_in_fjall(&store), base);
        // At the bound, the next commit waits for the turn...
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "a commit with the waiting records at their bound did not wait for its turn"
        );
        drop(turn);
        // ...and then returns, with the records applied.
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(20))
                .expect("the commit at the bound did not return once the turn was free"),
            last + 1
        );
        committer.join().unwrap();
        assert!(applied_in_fjall(&store) >= base + HELP_RECORDS as u64);
        assert_eq!(
            rt.block_on(seqs(&store, 7)),
            (1..=last + 1).collect::<Vec<_>>()
        );
    }

    /// `settle_some` applies nothing while another holds the turn (unless told to wait), and at
    /// most its limit.
    #[test]
    fn settle_some_waits_for_the_turn_only_if_told_and_applies_at_most_its_limit() {
        let turns = Arc::new(Turns::new(1));
        for seq in 1..=7 {
            turns.push(
                seq,
                Some(vec![(Kind::Flag, vec![seq as u8], Some(vec![0; 10]))]),
            );
        }
        assert_eq!(turns.waiting_bytes(), 7 * 11);
        let applied = Arc::new(Mutex::new(Vec::new()));
        let record = |applied: &Arc<Mutex<Vec<u64>>>| {
            let applied = applied.clone();
            move |seq: u64, _: Writes| {
                applied.lock().unwrap().push(seq);
                Ok(())
            }
        };
        let held = turns.turn.lock().unwrap();
        turns.settle_some(7, 2, false, record(&applied)).unwrap();
        assert!(
            applied.lock().unwrap().is_empty(),
            "applied in another's turn"
        );
        // Told to wait: it waits for the turn, then applies its limit.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let (turns, f) = (turns.clone(), record(&applied));
            std::thread::spawn(move || {
                turns.settle_some(7, 2, true, f).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "did not wait for the turn"
        );
        assert!(applied.lock().unwrap().is_empty());
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("did not apply once the turn was free");
        waiter.join().unwrap();
        assert_eq!(*applied.lock().unwrap(), [1, 2]);
        turns.settle_some(7, 2, false, record(&applied)).unwrap();
        assert_eq!(*applied.lock().unwrap(), [1, 2, 3, 4]);
        assert_eq!(turns.waiting(), 3);
        assert_eq!(turns.waiting_bytes(), 3 * 11);
        turns.settle(6, record(&applied)).unwrap();
        assert_eq!(*applied.lock().unwrap(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(turns.waiting_bytes(), 11);
    }

    /// Copies every file of `from` into `to` (a store's directory, two levels deep at most).
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dst = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dst);
            } else if !e.file_name().to_string_lossy().ends_with(".jnl") {
                // (Journals are written by the caller.)
                std::fs::copy(e.path(), dst).unwrap();
            }
        }
    }

    /// Length of a preallocated journal's written part: up to its last non-zero byte.
    fn written_len(bytes: &[u8]) -> usize {
        bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
    }

    /// fjall's journal after a crash in the middle of writing it (a full disk, a lost page) is
    /// torn in many ways; every batch in it is also in the commit log, after `meta/applied`, so
    /// whatever fjall keeps or drops of its torn tail, the store must open with every commit.
    #[tokio::test]
    async fn a_torn_fjall_journal_loses_nothing_the_commit_log_holds() {
        let base = tempfile::tempdir().unwrap();
        const N: u64 = 12;
        // Where each batch ends in the journal: the store flushes fjall's buffer after each.
        let mut ends = vec![];
        let journal_name;
        // A small log, cheap to copy for every case.
        let shape = LogShape {
            segments: 3,
            segment_bytes: 8192,
        };
        {
            let store = FjallStore::open_with(base.path(), shape).unwrap();
            let (_, path) = crate::trickle::active_journal(base.path()).unwrap();
            journal_name = path.file_name().unwrap().to_owned();
            ends.push(written_len(&std::fs::read(&path).unwrap()));
            for seq in 1..=N {
                store.commit(append(7, seq)).await.unwrap();
                // A commit returns before its apply: apply it, so that its batch is in fjall's
                // journal now.
                store.settle_durable();
                store.db.persist(PersistMode::Buffer).unwrap();
                ends.push(written_len(&std::fs::read(&path).unwrap()));
            }
        }
        assert!(
            ends.windows(2).all(|w| w[0] < w[1]),
            "every batch went to the journal: {ends:?}"
        );
        let mut journal = std::fs::read(base.path().join(&journal_name)).unwrap();
        let file_len = journal.len() as u64;
        let full = ends[N as usize];
        journal.truncate(full);
        let region = ends[N as usize - 2]..full;
        let last = ends[N as usize - 1]..full;
        let mut cases: Vec<(String, Vec<u8>)> = vec![];
        // Every fifth byte of the last two batches is a cut point (every byte of every kind
        // takes minutes in a debug build; `journal_repair`'s own tests cut at every byte).
        for c in region.clone().step_by(5) {
            // A write that stopped at `c`: the rest of the preallocated file is zeros.
            let mut t = journal.clone();
            t.truncate(c);
            cases.push((format!("cut at {c}"), t));
            // A lost run of bytes (a page that never reached the disk), later batches intact.
            let mut t = journal.clone();
            t[c..(c + 24).min(full)].fill(0);
            cases.push((format!("zeros at {c}..+24"), t));
            // A batch cut at `c`, then the last batch again in full right after it.
            if c < last.start {
                let mut t = journal[..c].to_vec();
                t.extend_from_slice(&journal[last.clone()]);
                cases.push((format!("cut at {c}, then the last batch"), t));
            }
        }
        let mut failures = vec![];
        for (what, torn) in &cases {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(base.path(), dir.path());
            // The rest of the preallocated file reads as zeros, as fjall left it.
            let path = dir.path().join(&journal_name);
            std::fs::write(&path, torn).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(file_len)
                .unwrap();
            match FjallStore::open_with(dir.path(), shape) {
                Ok(store) => {
                    let got = seqs(&store, 7).await;
                    if got != (1..=N).collect::<Vec<_>>() {
                        failures.push(format!("{what}: seqs {got:?}"));
                    }
                }
                Err(e) => failures.push(format!("{what}: open failed: {e}")),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases: {failures:#?}",
            failures.len(),
            cases.len()
        );
    }

    #[tokio::test]
    async fn removes_are_replayed_too() {
        let dir = tempfile::tempdir().unwrap();
        let entry = OutboxEntry {
            shard: ShardId(1),
            msg_id: MsgId(5),
            recipients: vec![UserId(2)],
            msg: msg(2, 1),
        };
        {
            let store = FjallStore::open(dir.path()).unwrap();
            let mut b = WriteBatch::default();
            b.push(Op::OutboxPut(entry.clone()));
            store.commit(b).await.unwrap();
            store.skip_apply.store(true, Ordering::Relaxed);
            let mut b = WriteBatch::default();
            b.push(Op::OutboxDelete {
                shard: ShardId(1),
                msg_id: MsgId(5),
            });
            store.commit(b).await.unwrap();
            assert_eq!(store.outbox(ShardId(1)).await.unwrap(), vec![entry]);
        }
        let store = FjallStore::open(dir.path()).unwrap();
        assert!(store.outbox(ShardId(1)).await.unwrap().is_empty());
    }

    /// Message ids of the outbox entries fjall itself holds (not those kept in memory).
    fn outbox_in_fjall(store: &FjallStore) -> Vec<u64> {
        store.settle_durable();
        store.spaces[Kind::Outbox as usize]
            .iter()
            .map(|g| {
                let k = g.key().unwrap();
                u64::from_be_bytes(k[2..10].try_into().unwrap())
            })
            .collect()
    }

    /// Commits filler appends (uid 9, seqs from `seq` on) until fjall holds an outbox entry:
    /// the log started its next segment, and its checkpoint wrote what was kept in memory.
    /// Returns the next filler seq.
    async fn until_checkpoint(store: &FjallStore, mut seq: u64) -> u64 {
        while outbox_in_fjall(store).is_empty() {
            store.commit(append(9, seq)).await.unwrap();
            seq += 1;
            assert!(seq < 2_000, "no checkpoint wrote the outbox to fjall");
        }
        seq
    }

    #[tokio::test]
    async fn outbox_entries_wait_in_memory_until_a_checkpoint_and_a_crash_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let shape = LogShape {
            segments: 3,
            segment_bytes: 8192,
        };
        let entry = |id: u64| OutboxEntry {
            shard: ShardId(1),
            msg_id: MsgId(id),
            recipients: vec![UserId(2)],
            msg: msg(2, id),
        };
        let put = |id: u64| {
            let mut b = WriteBatch::default();
            b.push(Op::OutboxPut(entry(id)));
            b
        };
        let del = |id: u64| {
            let mut b = WriteBatch::default();
            b.push(Op::OutboxDelete {
                shard: ShardId(1),
                msg_id: MsgId(id),
            });
            b
        };
        let ids = |v: Vec<OutboxEntry>| v.iter().map(|e| e.msg_id.0).collect::<Vec<_>>();
        let filler;
        {
            let store = FjallStore::open_with(dir.path(), shape).unwrap();
            for id in [1, 2, 5] {
                store.commit(put(id)).await.unwrap();
            }
            assert_eq!(ids(store.outbox(ShardId(1)).await.unwrap()), [1, 2, 5]);
            assert!(outbox_in_fjall(&store).is_empty(), "kept in memory");
            // A put and its delete before a checkpoint never reach fjall.
            store.commit(del(1)).await.unwrap();
            assert_eq!(ids(store.outbox(ShardId(1)).await.unwrap()), [2, 5]);
            filler = until_checkpoint(&store, 1).await;
            assert_eq!(outbox_in_fjall(&store), [2, 5], "written by the checkpoint");
            assert_eq!(ids(store.outbox(ShardId(1)).await.unwrap()), [2, 5]);
            // A delete of what fjall holds waits in memory too, and hides it from reads.
            store.commit(del(2)).await.unwrap();
            store.commit(put(3)).await.unwrap();
            assert_eq!(ids(store.outbox(ShardId(1)).await.unwrap()), [3, 5]);
            assert_eq!(outbox_in_fjall(&store), [2, 5]);
            // Everything applied and fjall's journal durable, nothing checkpointed: then the
            // process dies (the memory is gone, `meta/applied` is past every record).
            store.settle_durable();
            assert!(!store.unsettled());
            store.db.persist(PersistMode::SyncAll).unwrap();
        }
        {
            let store = FjallStore::open_with(dir.path(), shape).unwrap();
            assert_eq!(ids(store.outbox(ShardId(1)).await.unwrap()), [3, 5]);
            assert_eq!(
                outbox_in_fjall(&store),
                [3, 5],
                "the open wrote it to fjall"
            );
            // And a commit synced but never applied.
            store.skip_apply.store(true, Ordering::Relaxed);
            store.commit(put(4)).await.unwrap();
        }
        let store = FjallStore::open_with(dir.path(), shape).unwrap();
        assert_eq!(ids(store.outbox(ShardId(1)).await.unwrap()), [3, 4, 5]);
        assert_eq!(seqs(&store, 9).await, (1..filler).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_log_turns_its_ring_many_times_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let shape = LogShape {
            segments: 3,
            segment_bytes: 8192,
        };
        {
            let store = FjallStore::open_with(dir.path(), shape).unwrap();
            for seq in 1..=300 {
                store.commit(append(9, seq)).await.unwrap();
            }
            // The last ones only in the log.
            store.skip_apply.store(true, Ordering::Relaxed);
            for seq in 301..=310 {
                store.commit(append(9, seq)).await.unwrap();
            }
        }
        let store = FjallStore::open_with(dir.path(), shape).unwrap();
        assert_eq!(seqs(&store, 9).await, (1..=310).collect::<Vec<_>>());
        for i in 0..3 {
            let f = dir.path().join("commitlog").join(format!("seg-{i}"));
            assert_eq!(
                std::fs::metadata(f).unwrap().len(),
                crate::commit_log::CHUNK
            );
        }
    }

    #[test]
    fn concurrent_commits_share_syncs_apply_in_order_are_read_everywhere_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let shape = LogShape {
            segments: 3,
            segment_bytes: 8192,
        };
        const THREADS: u64 = 4;
        const EACH: u64 = 150;
        {
            let store = FjallStore::open_with(dir.path(), shape).unwrap();
            // What each committer's last returned commit was: a reader on another thread that
            // saw it must find at least that in the store.
            let returned: Vec<AtomicU64> = (0..=THREADS).map(|_| AtomicU64::new(0)).collect();
            let done = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                let mut committers = Vec::new();
                for t in 1..=THREADS {
                    let (store, returned) = (store.clone(), &returned);
                    committers.push(s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        rt.block_on(async {
                            for seq in 1..=EACH {
                                store.commit(append(t, seq)).await.unwrap();
                                returned[t as usize].store(seq, Ordering::SeqCst);
                                // A committed batch is readable at once.
                                if seq % 2 == 0 {
                                    let c = store.cursor(UserId(t), "phone").await.unwrap();
                                    assert_eq!(c, Seq(seq));
                                }
                            }
                        });
                    }));
                }
                let (reader, returned, done) = (store.clone(), &returned, &done);
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let mut reads = 0u64;
                        while !done.load(Ordering::SeqCst) || reads == 0 {
                            for t in 1..=THREADS {
                                let seen = returned[t as usize].load(Ordering::SeqCst);
                                let c = reader.cursor(UserId(t), "phone").await.unwrap();
                                assert!(c.0 >= seen, "user {t}: read {c:?} after commit {seen}");
                                reads += 1;
                            }
                        }
                    });
                });
                for c in committers {
                    c.join().unwrap();
                }
                done.store(true, Ordering::SeqCst);
            });
            let syncs = store.syncer.syncs();
            assert!(
                syncs <= THREADS * EACH,
                "{syncs} syncs for {} commits",
                THREADS * EACH
            );
            // fjall holds every record, in order: `applied` is the last seq.
            let applied = store.meta.get(APPLIED).unwrap().unwrap();
            assert_eq!(
                u64::from_be_bytes(<[u8; 8]>::try_from(&*applied).unwrap()),
                THREADS * EACH
            );
        }
        let store = FjallStore::open_with(dir.path(), shape).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for t in 1..=THREADS {
                assert_eq!(seqs(&store, t).await, (1..=EACH).collect::<Vec<_>>());
            }
        });
    }

    #[test]
    fn a_commit_handed_on_from_written_comes_after_in_the_log_and_one_sync_covers_both() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FjallStore::open(dir.path()).unwrap();
            // Long enough that only the other commit's sync can end the wait in time.
            store.set_handoff_linger(std::time::Duration::from_secs(20));
            let before = store.syncer.syncs();
            let began = std::time::Instant::now();
            let mut other = None;
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(store.commit_then(append(1, 1), || {
                // What a recipient's worker does with the appends it was handed: on its own
                // thread, a commit of its own, after this record.
                let store = store.clone();
                other = Some(std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(store.commit(append(2, 1))).unwrap();
                }));
            }))
            .unwrap();
            other.expect("written ran").join().unwrap();
            assert!(
                began.elapsed() < std::time::Duration::from_secs(10),
                "{:?}",
                began.elapsed()
            );
            assert_eq!(store.syncer.syncs() - before, 1, "one fdatasync for both");
            assert_eq!(rt.block_on(seqs(&store, 1)), vec![1]);
            assert_eq!(rt.block_on(seqs(&store, 2)), vec![1]);
            let applied = store.meta.get(b"applied").unwrap().unwrap();
            let last = store.log.lock().unwrap().next_seq() - 1;
            assert_eq!(u64::from_be_bytes((*applied).try_into().unwrap()), last);
            // An empty batch has nothing to wait for.
            let mut ran = false;
            rt.block_on(store.commit_then(WriteBatch::default(), || ran = true))
                .unwrap();
            assert!(ran);
        }
        let store = FjallStore::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(seqs(&store, 1)), vec![1]);
        assert_eq!(rt.block_on(seqs(&store, 2)), vec![1]);
    }

    #[test]
    fn records_are_applied_in_seq_order_once_durable_and_nothing_after_a_failed_or_panicked_apply()
    {
        let turns = Turns::new(1);
        let mut applied = Vec::new();
        for seq in 1..=4 {
            turns.push(seq, Some(Vec::new()));
        }
        // Only what is durable, in order.
        assert!(turns.behind(2));
        turns
            .settle(2, |seq, _| {
                applied.push(seq);
                Ok(())
            })
            .unwrap();
        assert_eq!(applied, vec![1, 2]);
        assert!(!turns.behind(2) && turns.behind(3));
        // A record durable before its committer queued it is not waited for (its commit has
        // not returned), and nothing after it can be queued yet.
        turns
            .settle(9, |seq, _| {
                applied.push(seq);
                Ok(())
            })
            .unwrap();
        assert_eq!(applied, vec![1, 2, 3, 4]);
        // A test's record that "died" before fjall got it is skipped, not applied.
        turns.push(5, None);
        turns.push(6, Some(Vec::new()));
        turns
            .settle(6, |seq, _| {
                applied.push(seq);
                Ok(())
            })
            .unwrap();
        assert_eq!(applied, vec![1, 2, 3, 4, 6]);
        // A failed apply breaks the turns: nothing later is applied, every settle says so.
        turns.push(7, Some(Vec::new()));
        turns.push(8, Some(Vec::new()));
        let r = turns.settle(8, |_, _| Err(StoreError::Io("disk gone".into())));
        assert!(matches!(r, Err(StoreError::Io(_))));
        let mut ran = false;
        let r = turns.settle(8, |_, _| {
            ran = true;
            Ok(())
        });
        assert!(matches!(r, Err(StoreError::Io(_))) && !ran);
        // So does an apply that panics (it took its record from the queue).
        let turns = std::sync::Arc::new(Turns::new(1));
        turns.push(1, Some(Vec::new()));
        turns.push(2, Some(Vec::new()));
        let t = turns.clone();
        let panicked = std::thread::spawn(move || {
            let _ = t.settle(1, |_, _| panic!("apply panicked"));
        })
        .join();
        assert!(panicked.is_err());
        let mut ran = false;
        let r = turns.settle(2, |_, _| {
            ran = true;
            Ok(())
        });
        assert!(
            r.is_err() && !ran,
            "record 2 is not applied without record 1"
        );
    }

    #[test]
    fn a_batchs_writes_merge_to_the_last_of_each_key_in_key_order() {
        let mut w = Collected(Vec::new());
        w.insert((Kind::Timeline, vec![2]), Some(b"a".to_vec()));
        w.insert((Kind::Cursor, vec![1]), Some(b"b".to_vec()));
        w.insert((Kind::Timeline, vec![1]), Some(b"c".to_vec()));
        w.insert((Kind::Timeline, vec![2]), None);
        w.insert((Kind::Timeline, vec![2]), Some(b"d".to_vec()));
        w.insert((Kind::Timeline, vec![1]), None);
        w.insert((Kind::Timeline, vec![3]), Some(b"e".to_vec()));
        assert_eq!(
            w.merged(),
            vec![
                (Kind::Timeline, vec![1], None),
                (Kind::Timeline, vec![2], Some(b"d".to_vec())),
                (Kind::Timeline, vec![3], Some(b"e".to_vec())),
                (Kind::Cursor, vec![1], Some(b"b".to_vec())),
            ]
        );
    }

    #[test]
    fn a_log_record_decodes_to_the_writes_it_was_made_of_and_garbage_does_not() {
        let mut w = Collected(Vec::new());
        w.insert((Kind::Timeline, vec![1, 2]), Some(b"v".to_vec()));
        w.insert((Kind::Outbox, vec![3]), None);
        w.insert((Kind::IdFloor, vec![]), Some(Vec::new()));
        let w = w.merged();
        let rec = encode_writes(&w);
        assert_eq!(decode_writes(&rec).unwrap(), w);
        for cut in 0..rec.len() {
            assert!(decode_writes(&rec[..cut]).is_none(), "cut at {cut}");
        }
        let mut bad = rec.clone();
        bad[4] = Kind::ALL.len() as u8; // no such keyspace
        assert!(decode_writes(&bad).is_none());
    }
}
