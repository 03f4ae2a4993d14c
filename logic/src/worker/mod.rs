//! One logic worker: owns the users of its virtual shards and serves their requests in rounds.
//!
//! A round drains the inbox, handles every request against in-memory state, collects all writes
//! in one [`WriteBatch`], commits it durably, and only then sends what depends on it (acks,
//! deliveries) — so an ack always means "durable". Fan-out to users of other workers goes over
//! their inboxes after the commit, backed by the outbox record written in the same batch.
//!
//! This file holds the worker's state, the round (`Round`) and the loop that runs it (`run`,
//! `finish`); each kind of request has a file of its own:
//!
//! | file | owns |
//! |---|---|
//! | `session.rs` | login (token, kickout of the same device type), closed connections, a gate going down |
//! | `c2c.rs` | one-to-one sends: dedup, the sender's timeline, the ack, the fan-out |
//! | `outbox.rs` | fan-out records until every recipient confirmed: replay, resync, retries |
//! | `append.rs` | appends to a recipient's timeline, live delivery, the confirmation |
//! | `delivery.rs` | delivery acks: device cursors and `Delivered` notices to senders |
//! | `sync.rs` | sync pages |
//! | `groups.rs` | groups: management, posts in the group's order, their wire codec on peer links |
//! | `recall.rs`, `receipts.rs` | recall and read markers |
//! | `c2s.rs`, `push.rs`, `api.rs` | c2s reports, offline push, requests of the HTTP API (s2c) |
//! | `org.rs` | the organisation tree: clients' reads, the owner's changes, `OrgChanged` notices |
//! | `presence.rs` | presence subscriptions and changes, typing indicators (ephemeral, never stored) |

use std::collections::{HashMap, HashSet, VecDeque};

use im_shared::fast::{FastIndexMap, FastMap, FastSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use im_shared::frame::Cmd;
use im_shared::link::{Down, DownstreamSink, Up};
use im_shared::proto::{
    GroupDesc, Message, CONV_C2C, CONV_C2G, CONV_S2C, MAX_DEVICE_ID_LEN, MAX_MENTIONS,
};
use im_shared::shard::vshard_of;
use im_shared::token::{TokenError, TokenVerifier};
use im_shared::{
    Command, ConnId, DeviceType, ErrorCode, GroupId, KickReason, MsgId, Seq, ShardId, UserId,
};
use tokio::sync::{mpsc, oneshot};

use crate::api::{Accepted, ApiError};
use crate::c2s::{C2sQueue, C2sRecord};
use crate::config::LogicConfig;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::services::Services;
use crate::store::{DedupEntry, Op, Store, StoreError, WriteBatch};
use im_shared::msgid::MsgIdGen;

mod api;
mod append;
mod c2c;
mod c2s;
mod delivery;
mod files;
mod groups;
mod large;
mod org;
mod outbox;
mod presence;
mod push;
mod recall;
mod receipts;
mod session;
mod sync;
#[cfg(test)]
mod tests;
pub use api::MAX_S2C_USERS;
pub use groups::GroupReq;
pub use im_shared::peer::{AppendReq, DeliveredNote, GroupOp, TypingNote, WatchReq};

/// How often a worker of a multi-node cluster checks whether a peer link needs a resync.
const RESYNC_CHECK_EVERY: Duration = Duration::from_millis(200);

/// How often a worker of a multi-node cluster looks for fan-out appends that another node has
/// not confirmed in time (see `outbox`).
const RETRY_CHECK_EVERY: Duration = Duration::from_millis(1_000);

/// How often a worker looks for messages that no device acknowledged within the push delay.
const PUSH_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Writes whose loss in a crash is harmless (a device's delivery cursor, the deletion of a
/// confirmed outbox entry) wait this long, then go with the commit their worker makes anyway, or
/// on their own (see `Worker::lazy`). Waiting coalesces a device's cursor moves into one write:
/// with one write per ack, the cursors were one memtable insert per message of the
/// skiplist-bound commit apply.
const LAZY_FLUSH_MS: u64 = 1_000;

/// How long a drain of the lazy writes that fell due together is paced over ([`Lazy::share`]):
/// the worker's timer period, so an idle worker finishes one in its next tick. Long enough to
/// spread a second's worth thin (at 20 000 msg/s, tens of writes a ms per worker), short enough
/// that a confirmed outbox entry is deleted soon after it fell due (a whole second of pacing cost
/// ~4 % more server CPU at 20 000/s in one sitting, this ~2 %, both near the noise).
const LAZY_DRAIN_MS: u64 = LAZY_FLUSH_MS / 4;

/// Lazy writes waiting at most (outbox deletions and push watches; cursors are one per device):
/// at this many fresh ones they are due whatever their age, and a round never leaves more than
/// this many draining.
const LAZY_MAX: usize = 65_536;

/// A round with no writes of its own takes due lazy writes only once this many are due (or the
/// last of a drain): it commits for them alone, and a commit costs a sync.
///
/// How the drain is paced: the lazy writes that fall due together (a second's worth) go out
/// evenly over the next [`LAZY_DRAIN_MS`], each round taking those the pace has made due by its
/// time ([`Lazy::share`]). Writing a second's worth at once (thousands of memtable inserts at
/// ~2 µs each) held its core, and the other worker waiting for its turn to apply, for 10–25 ms
/// once a second at 20 000 msg/s. Then a share of at least this many per round (1 024 in a
/// round with nothing else to write) still came in bursts: a second's worth in the first tens
/// of rounds after it fell due, a few ms of apply each, which the other worker waited for too.
const LAZY_PER_ROUND: usize = 256;

/// A round with writes of its own takes due lazy writes once this many are due (or the last of a
/// drain), not a handful in every round: each batch that carries some writes to the cursor and
/// outbox keyspaces too, and with every round taking what was due callgrind counted ~1 % more
/// user-space instructions per c2c message (at the edge of its run-to-run spread).
const LAZY_MIN_RIDE: usize = 64;

/// Whether a message of this kind counts as unread content: it may trigger an offline push and
/// waits for a device's ack. Recalls, read receipts and group events do not.
fn notifies(conv: u8) -> bool {
    matches!(
        conv,
        CONV_C2C | CONV_C2G | CONV_S2C | im_shared::proto::CONV_MENTION
    )
}

/// Most undelivered-notice entries kept per user.
const MAX_PENDING_NOTICES: usize = 10_000;

/// Estimated bytes of one cached user state (its dense entry and index slot), of the [`Active`]
/// part of a user that sends or has pending notices (the box and the first allocations of its
/// map and queues), of one remembered `client_msg_id` (map slot, order entry) and of one pending
/// notice (entry and preview copy): what [`Worker::trim_caches`] counts against
/// `max_cache_bytes`. Pinned against the types' sizes by `cache_byte_estimates_cover_the_types`.
const USER_BYTES: usize = 96;
const ACTIVE_BYTES: usize = 256;
const DEDUP_BYTES: usize = 64;
const PENDING_BYTES: usize = 160;
/// Msg-id time reserved ahead in the store ([`Op::IdFloor`]) ...
const ID_RESERVE_MS: u64 = 3_000;
/// ... and renewed, in the round's batch, once ids come this close to the reserved floor.
const ID_RESERVE_MARGIN_MS: u64 = 1_000;

/// What a worker receives.
pub enum WorkerMsg {
    /// Client frames and closes from a gate.
    Gate(Vec<Up>),
    /// Appends to timelines of users this worker owns.
    Append(Vec<AppendReq>),
    /// Appends confirmed by recipients' workers: `(outbox shard, msg_id, recipient)`. An outbox
    /// entry is deleted once every one of its recipients confirmed.
    AppendDone(Vec<(ShardId, MsgId, UserId)>),
    /// A recipient device acknowledged these messages: tell their senders.
    Delivered(Vec<DeliveredNote>),
    /// The link to this gate dropped: its connections are gone.
    GateDown(u16),
    /// A request for the group this worker owns.
    Group(GroupReq),
    /// A request of the HTTP API for this worker.
    Api(ApiReq),
    /// A message that came over a link from another logic node (counted while it waits, so
    /// that the link's reader can hold back: [`crate::LogicHandle::deliver_peer`]).
    Peer(Box<WorkerMsg>),
    /// The node's organisation tree cache is now at this version: tell the connections.
    OrgChanged(u64),
    /// For the worker that owns the organisation tree: send global worker `reply_to` the records
    /// above `since` (a node that does not own the tree keeps its cache this way).
    OrgPull {
        reply_to: usize,
        since: u64,
    },
    /// The owner's answer to an `OrgPull`.
    OrgRecords(Vec<im_shared::org::OrgRecord>),
    /// Typing indicators for users of this worker.
    Typing(Vec<TypingNote>),
    /// Another worker starts or stops following the presence of users of this worker.
    Watch(WatchReq),
    /// Presence of users this worker's connections follow (an owner's answer or a change).
    Presence(Vec<im_shared::proto::PresenceEntry>),
    /// Posts of large groups, from their owners, for this worker's online members.
    GroupLive(Vec<(GroupId, Message)>),
    /// A message from local worker `from`, counting `items` in that pair's backlog until this
    /// worker takes it ([`Router::send`], [`Router::taken`]).
    Local {
        from: u16,
        items: u32,
        msg: Box<WorkerMsg>,
    },
    /// The backlog of this worker's messages at another local worker fell below the bound:
    /// admit client work again ([`Router::held`]).
    Resume,
    Shutdown,
}

impl WorkerMsg {
    /// How many items this message adds to a worker → worker backlog: one per append,
    /// confirmation or notice it carries, one for anything else.
    pub(crate) fn items(&self) -> usize {
        match self {
            WorkerMsg::Append(v) => v.len(),
            WorkerMsg::AppendDone(v) => v.len(),
            WorkerMsg::Delivered(v) => v.len(),
            WorkerMsg::Typing(v) => v.len(),
            WorkerMsg::Presence(v) => v.len(),
            WorkerMsg::GroupLive(v) => v.len(),
            WorkerMsg::OrgRecords(v) => v.len(),
            _ => 1,
        }
        .max(1)
    }

    /// Client work that a worker may hold back while its messages to other workers wait
    /// ([`Router::held`]): frames, closes and logins from gates, a gate's loss (kept in order
    /// with its frames), and HTTP API requests.
    fn is_admission(&self) -> bool {
        matches!(
            self,
            WorkerMsg::Gate(_) | WorkerMsg::Api(_) | WorkerMsg::GateDown(_)
        )
    }
}

/// What [`Worker::step`] tells its caller to do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Continue,
    /// `Shutdown` was handled: the round is committed and released, the worker ends.
    Stop,
}

/// Why a round could not commit. Nothing of the round was released; the worker must stop.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Halt {
    /// The store refused the batch: another incarnation owns these shards now. The process
    /// exits (see [`crate::ownership::exit_fenced`]) and must not write again.
    #[error("fenced")]
    Fenced(#[source] StoreError),
    /// A commit error that retrying cannot cure (e.g. a failed fsync of the embedded store,
    /// after which the kernel may have dropped the dirty pages): the only safe state is the one
    /// on disk, recovered at restart, so the process aborts.
    #[error("commit failed")]
    Fatal(#[source] StoreError),
}

/// The timers of a worker (see [`Worker::tick`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Tick {
    /// Replay the outbox over peer links that changed.
    Resync,
    /// Re-send fan-out appends other nodes have not confirmed in time.
    Retry,
    /// Offline pushes for messages no device acknowledged within the delay.
    Push,
    /// Records of the organisation tree that other nodes wrote.
    Org,
    /// Offline presence changes whose debounce ran out.
    Presence,
}

/// Where an API request's answer goes.
pub type ApiReplyTx = oneshot::Sender<Result<ApiOk, ApiError>>;

/// Where the answer to a request goes.
pub enum Reply {
    /// A client connection (any node can write to any gate).
    Conn { conn: ConnId, req_id: u32 },
    /// The HTTP API of this node.
    Api(oneshot::Sender<Result<ApiOk, ApiError>>),
}

/// Successful results of API requests.
#[derive(Debug)]
pub enum ApiOk {
    Accepted(Accepted),
    Group(GroupId),
    Done,
    Info(GroupDesc, Vec<(UserId, u8)>),
    Groups(Vec<(GroupId, String)>),
    /// The organisation tree's version after a change.
    Org(u64),
}

/// User-scoped HTTP API requests, handled by a worker of the node that received them.
pub enum ApiReq {
    /// s2c to users: `from` is the business account.
    ServerSend {
        from: UserId,
        to: Vec<UserId>,
        body: Bytes,
        request_id: u64,
        reply: oneshot::Sender<Result<ApiOk, ApiError>>,
    },
    /// Create a group: the group id is allocated here, the group's owner worker creates it.
    GroupCreate {
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        /// Idempotency key of the create (0: none), as `Command::GroupCreate::client_id`.
        client_id: u64,
        reply: oneshot::Sender<Result<ApiOk, ApiError>>,
    },
    GroupsOf {
        uid: UserId,
        reply: oneshot::Sender<Result<ApiOk, ApiError>>,
    },
    /// The push provider said this device's token is invalid: forget it.
    DropPushToken { uid: UserId, device_id: String },
    /// A change of the organisation tree, for the worker that owns it.
    Org {
        change: crate::org::OrgChange,
        reply: oneshot::Sender<Result<ApiOk, ApiError>>,
    },
}

struct Device {
    conn: ConnId,
    device_type: DeviceType,
    /// 1..=[`MAX_DEVICE_ID_LEN`] bytes; a `Box<str>`, not a `String`: 8 bytes less per device.
    device_id: Box<str>,
    cursor: Seq,
    /// Highest seq this connection was given (`Deliver`, `SyncPage`) or declared at login
    /// (`last_seq`): a `DeliverAck` cannot move the cursor past it.
    sent: Seq,
    /// Rate limit of `Typing` (see `presence.rs`): the theoretical arrival time of the next one.
    typing_tat: u64,
}

/// The devices a user has logged in on this worker (usually one, none when offline): a boxed
/// slice, 16 bytes and no allocation when empty, reallocated at a login or a close (rare next
/// to messages). A connection is logged in here exactly while it has a [`Device`] in its
/// user's list (the gate's frames carry the user id, so no map by connection is needed).
#[derive(Default)]
struct Devices(Box<[Device]>);

impl std::ops::Deref for Devices {
    type Target = [Device];
    fn deref(&self) -> &[Device] {
        &self.0
    }
}

impl std::ops::DerefMut for Devices {
    fn deref_mut(&mut self) -> &mut [Device] {
        &mut self.0
    }
}

impl Devices {
    fn push(&mut self, d: Device) {
        let mut v = Vec::with_capacity(self.0.len() + 1);
        v.extend(std::mem::take(&mut self.0).into_vec());
        v.push(d);
        self.0 = v.into_boxed_slice();
    }

    fn remove(&mut self, i: usize) -> Device {
        let mut v = std::mem::take(&mut self.0).into_vec();
        let d = v.remove(i);
        self.0 = v.into_boxed_slice();
        d
    }

    /// Removes the devices `take` says true of, and returns them.
    fn take_if(&mut self, mut take: impl FnMut(&Device) -> bool) -> Vec<Device> {
        if !self.0.iter().any(&mut take) {
            return Vec::new();
        }
        let (taken, kept) = std::mem::take(&mut self.0)
            .into_vec()
            .into_iter()
            .partition(take);
        self.0 = Vec::into_boxed_slice(kept);
        taken
    }
}

/// The users of a worker: a dense map (see [`FastIndexMap`]). At a million users per node the
/// table is half empty right after it doubles; with the states inline that cost ~120 bytes
/// per user, with dense entries ~100 (entry and index slot), devices included.
type Users = FastIndexMap<UserId, UserState>;

/// The devices `uid` has logged in here (empty if it has none or is not loaded).
fn devices_of(users: &Users, uid: UserId) -> &[Device] {
    users.get(&uid).map_or(&[], |u| &u.devices)
}

/// [`devices_of`], to update them.
fn devices_of_mut(users: &mut Users, uid: UserId) -> &mut [Device] {
    users.get_mut(&uid).map_or(&mut [], |u| &mut u.devices)
}

/// Live state of one user, reloadable from the store at any time (but its devices, which are
/// why an online user is never evicted). Kept small (64 bytes) for users who only sit online;
/// the parts that only active users need live in [`Active`].
struct UserState {
    next_seq: u64,
    bound: u64,
    last_seq: u64,
    /// The user's last seq when this process loaded it while pending notices for seqs up to it
    /// are not known (in memory only, lost with the previous process): rebuilt from the store
    /// by [`Worker::recover_pending`] before the first ack or push check needs them. 0: known.
    loaded_last: u64,
    /// Second (of the worker's clock) of the last use: offline users least recently used are
    /// evicted first ([`Worker::trim_caches`]).
    touched: u32,
    active: Option<Box<Active>>,
    devices: Devices,
}

#[derive(Default)]
struct Active {
    dedup: FastMap<u64, DedupEntry>,
    dedup_order: VecDeque<u64>,
    /// Messages from others not yet acknowledged by any device, by seq.
    pending: PendingList,
}

/// The pending entries of a user in seq order: a deque, not a `BTreeMap`, because entries are
/// added in seq order (appends) or before all others (a recovery) and taken from the front (an
/// ack); a `BTreeMap` leaf node costs ~700 bytes even for one entry, and most users who get a
/// message have one or two pending.
#[derive(Default)]
struct PendingList(VecDeque<(u64, Pending)>);

impl PendingList {
    fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds the entry of `seq` (kept sorted; an entry already there stays); true if added.
    fn insert(&mut self, seq: u64, p: Pending) -> bool {
        match self.0.back() {
            None => self.0.push_back((seq, p)),
            Some(&(last, _)) if seq > last => self.0.push_back((seq, p)),
            _ => {
                let i = self.0.partition_point(|(s, _)| *s < seq);
                if self.0.get(i).is_some_and(|(s, _)| *s == seq) {
                    return false;
                }
                self.0.insert(i, (seq, p));
            }
        }
        true
    }

    /// Drops the oldest entry.
    fn pop_oldest(&mut self) {
        self.0.pop_front();
    }

    /// Takes every entry with seq ≤ `seq`, oldest first.
    fn take_through(&mut self, seq: u64) -> Vec<Pending> {
        let n = self.0.partition_point(|(s, _)| *s <= seq);
        let taken = self.0.drain(..n).map(|(_, p)| p).collect();
        if self.0.is_empty() {
            self.0 = VecDeque::new(); // give the memory back
        }
        taken
    }

    /// The newest entry.
    fn newest(&self) -> Option<&Pending> {
        self.0.back().map(|(_, p)| p)
    }
}

/// A message in a user's timeline that no device acknowledged yet: source of "delivered" notices
/// (c2c) and of offline push notifications.
struct Pending {
    sender: UserId,
    msg_id: MsgId,
    conv: u8,
    /// The conversation: the sender for c2c and s2c, the group for c2g.
    peer: u64,
    /// The first bytes of the body (push preview).
    preview: Bytes,
}

/// Bytes of a message body kept for a push preview.
const PREVIEW_BYTES: usize = 64;

impl Pending {
    /// The pending notice of `m` (a message from someone else in a user's timeline).
    fn of(m: &Message) -> Pending {
        Pending {
            sender: m.from,
            msg_id: m.msg_id,
            conv: m.conv,
            peer: if m.conv == CONV_C2G || m.conv == im_shared::proto::CONV_MENTION {
                m.to.0
            } else {
                m.from.0
            },
            preview: Bytes::copy_from_slice(&m.body[..m.body.len().min(PREVIEW_BYTES)]),
        }
    }
}

impl UserState {
    fn active(&mut self) -> &mut Active {
        self.active.get_or_insert_with(Box::default)
    }

    /// Remembered `client_msg_id`s and pending notices of this user.
    fn entries(&self) -> (usize, usize) {
        self.active
            .as_ref()
            .map_or((0, 0), |a| (a.dedup.len(), a.pending.len()))
    }
}

/// Effects of one round. Nothing leaves the worker before the round's batch is committed, so
/// every reply a client sees (acks, deliveries, login results, sync pages) describes durable
/// state, and replies to one connection keep the order in which requests were handled. The one
/// exception are appends for another worker of the same store: they leave once the batch is
/// written ([`Store::commit_then`]), and whatever that worker makes of them is committed after
/// this batch, so it is durable only if this batch is (see `finish`).
struct Round {
    batch: WriteBatch,
    /// Downstream messages per gate core, in order.
    /// Keyed by gate and core (`ConnId` bits 32..64).
    downs: FastMap<u64, Vec<Down>>,
    appends_out: Vec<Vec<AppendReq>>,
    done_out: Vec<Vec<(ShardId, MsgId, UserId)>>,
    delivered_out: Vec<Vec<DeliveredNote>>,
    typing_out: Vec<Vec<TypingNote>>,
    /// Head requests for the owners of large groups (a login's `GroupHeads`), sent once this
    /// round's answers are on their way to the gates.
    heads_out: Vec<GroupReq>,
    /// Posts of large groups this worker owns, for every worker's online members.
    live: Vec<(GroupId, Message)>,
    appended: FastSet<(UserId, MsgId)>,
    /// API answers, released after the commit.
    api: Vec<(ApiReplyTx, Result<ApiOk, ApiError>)>,
    /// c2s records of this round with the acks that wait for their enqueue.
    c2s: Vec<(C2sRecord, ConnId, u32)>,
}

impl Round {
    fn new(workers: usize) -> Round {
        Round {
            batch: WriteBatch::default(),
            downs: FastMap::default(),
            appends_out: (0..workers).map(|_| Vec::new()).collect(),
            done_out: (0..workers).map(|_| Vec::new()).collect(),
            delivered_out: (0..workers).map(|_| Vec::new()).collect(),
            typing_out: (0..workers).map(|_| Vec::new()).collect(),
            heads_out: Vec::new(),
            live: Vec::new(),
            appended: FastSet::default(),
            api: Vec::new(),
            c2s: Vec::new(),
        }
    }

    /// Answers a request successfully (after the commit): `frame(req_id)` to a connection, or
    /// `ok` to the API.
    fn reply(&mut self, to: Reply, ok: ApiOk, frame: impl FnOnce(u32) -> Bytes) {
        match to {
            Reply::Conn { conn, req_id } => self.send(conn, frame(req_id)),
            Reply::Api(tx) => self.api.push((tx, Ok(ok))),
        }
    }

    fn send(&mut self, conn: ConnId, data: Bytes) {
        self.downs
            .entry(conn.0 >> 32)
            .or_default()
            .push(Down::Send { conn, data });
    }

    /// The same `data` to many connections: one [`Down::SendMany`] per gate core (a
    /// [`Down::Send`] where a core has one of them), so it crosses a link once per core.
    fn send_many(&mut self, mut conns: Vec<ConnId>, data: Bytes) {
        conns.sort_unstable();
        for same_core in conns.chunk_by(|a, b| a.0 >> 32 == b.0 >> 32) {
            let downs = self.downs.entry(same_core[0].0 >> 32).or_default();
            match same_core {
                [conn] => downs.push(Down::Send {
                    conn: *conn,
                    data: data.clone(),
                }),
                many => downs.push(Down::SendMany {
                    conns: many.to_vec(),
                    data: data.clone(),
                }),
            }
        }
    }

    fn close(&mut self, conn: ConnId, data: Bytes) {
        self.downs
            .entry(conn.0 >> 32)
            .or_default()
            .push(Down::Close { conn, data });
    }
}

pub struct Worker<S> {
    idx: usize,
    cfg: LogicConfig,
    store: S,
    verifier: Arc<dyn TokenVerifier>,
    gate: Arc<dyn DownstreamSink>,
    router: Arc<Router>,
    depth: Arc<AtomicUsize>,
    users: Users,
    /// This worker's share of the `im_users_cached` / `im_groups_cached` gauges, as last added.
    cached_users: u64,
    cached_groups: u64,
    /// `mention_all.len()` as last added to the node's gauge.
    counted_mention_all: u64,
    /// Remembered `client_msg_id`s and pending notices held by this worker's users' [`Active`]
    /// parts (kept up to date where they change, for the byte budget).
    dedup_entries: usize,
    pending_entries: usize,
    /// Users of this worker with an [`Active`] part.
    active_users: usize,
    /// The estimate last added to the node's `cache_bytes` gauge.
    cached_bytes: u64,
    ids: MsgIdGen,
    /// This worker's msg-id generator number (global worker index).
    gen_id: u16,
    /// Msg-id time reserved in the store: every id issued so far is at or below it, and a
    /// restart resumes above it.
    id_reserved: u64,
    /// Route changes for the shared directory (when one is configured).
    dir: Option<mpsc::Sender<crate::publish::DirOp>>,
    /// A route change did not fit the publisher's queue: a full [`crate::publish::DirOp::Resync`]
    /// goes out once there is room.
    dir_lost: bool,
    /// Routes whose `Offline` did not fit the publisher's queue: the next resync removes them
    /// (at most [`crate::publish::MAX_GONE`], the first ones).
    dir_gone: Vec<crate::publish::Gone>,
    /// When the users with a device here were last sent to the publisher to refresh their
    /// presence ([`crate::publish::DirOp::Touch`]), ms.
    dir_touched: u64,
    /// A resync is queued at the publisher or being applied ([`crate::publish::InFlight`]).
    dir_resyncing: Arc<std::sync::atomic::AtomicBool>,
    /// Set by the publisher when a write to the directory failed: the routes are sent again
    /// whole, as after dropped changes ([`crate::publish::run`]).
    dir_heal: Arc<std::sync::atomic::AtomicBool>,
    /// Groups this worker owns (loaded on first use).
    groups: FastMap<GroupId, groups::GroupState>,
    services: Services,
    metrics: Arc<Metrics>,
    c2s: Option<Box<dyn C2sQueue>>,
    /// Offline-push candidates: (due time in ms, user, seq), in due order.
    push_due: VecDeque<(u64, UserId, u64)>,
    /// Fan-outs not yet confirmed by every recipient.
    outbox: outbox::Outbox,
    /// Resyncs of peer links in progress, by node ([`Worker::pump_resyncs`]).
    resyncs: FastMap<usize, outbox::Resync>,
    /// `@all` posts of large groups whose mention entries are still being fanned out, one
    /// chunk of members at a time, by outbox key (`worker/large.rs`, "@all").
    mention_all: FastMap<(ShardId, MsgId), large::MentionAll>,
    /// When each large group of this worker last started an `@all` (ms; in memory only).
    mention_all_at: FastMap<GroupId, u64>,
    /// Writes that need no commit of their own, with the time the oldest of them waits since:
    /// once that one has waited [`LAZY_FLUSH_MS`] they ride with the commits of the rounds of
    /// the next [`LAZY_DRAIN_MS`], evenly, or are written alone (see `Lazy::due`, `Lazy::share`).
    lazy: Lazy,
    /// The time of the current round or tick (ms since the epoch), given by the caller of
    /// [`Worker::step`] / [`Worker::tick`]: the only clock handlers read.
    now: u64,
    /// `OrgChanged` notices to this worker's connections: when the last went out (ms) and the
    /// version waiting to go out (at most one notice a second, see `worker/org.rs`).
    org_notice: (u64, Option<u64>),
    /// When this worker's `OrgPull` to the tree's owner went out, while no answer came back.
    org_pulled_at: Option<u64>,
    /// Presence subscriptions of this worker's connections and of its users' followers.
    presence: presence::Presence,
    /// This worker's online users in large groups.
    large: large::LargeIndex,
    /// Client work held back while this worker's messages wait at other workers
    /// ([`Router::held`]), in arrival order; its frames still count in the gate's `depth`, so the
    /// gate refuses new ones with `Overloaded` once `max_queued` wait.
    held_back: VecDeque<WorkerMsg>,
}

/// Writes that may wait for a commit (see [`Worker::lazy`]). Losing them in a crash is harmless:
/// - a device's delivery cursor is only read back at its next login, to ignore acks below it, so
///   a crash forgets the cursor movement not yet written (at most about [`LAZY_FLUSH_MS`] and
///   [`LAZY_DRAIN_MS`]: the second a write waits fresh, and the drain it is paced over) and no
///   message;
/// - a confirmed outbox entry that is not yet deleted is replayed after a crash, and the
///   recipient's append of a replay is idempotent (its msg index): nothing is stored twice.
///
/// Waiting writes are *fresh* until due, then *draining*: written oldest first, evenly over the
/// next [`LAZY_DRAIN_MS`] ([`Lazy::share`]), so that no round takes a second's worth at once.
#[derive(Default)]
struct Lazy {
    /// Newest cursor per (user, device id).
    cursors: FastMap<(UserId, String), Seq>,
    outbox_deletes: Vec<(ShardId, MsgId)>,
    /// Push watches whose push was decided.
    unwatch: Vec<(ShardId, UserId, Seq)>,
    /// When the oldest fresh write was made.
    since: u64,
    /// Due, not written yet: the ops, in the order they are written.
    draining: VecDeque<Op>,
    /// The newest draining cursor of each device, and how many of its cursors drain (a
    /// device's cursor may be due twice before the first is written).
    draining_cursors: FastMap<(UserId, String), (Seq, u32)>,
    /// The drain's pace ([`Lazy::share`]): the `drain_len` writes draining at `drain_from` (the
    /// last `start_draining`) go out evenly over the [`LAZY_DRAIN_MS`] after it; `drained` of
    /// them are written.
    drain_from: u64,
    drain_len: usize,
    drained: usize,
}

impl Lazy {
    fn is_empty(&self) -> bool {
        self.fresh_is_empty() && self.draining.is_empty()
    }

    fn fresh_is_empty(&self) -> bool {
        self.cursors.is_empty() && self.outbox_deletes.is_empty() && self.unwatch.is_empty()
    }

    /// The newest cursor of a device that waits (fresh or draining).
    fn cursor_of(&self, uid: UserId, device_id: &str) -> Option<Seq> {
        let key = (uid, device_id.to_string());
        self.cursors
            .get(&key)
            .or_else(|| self.draining_cursors.get(&key).map(|(s, _)| s))
            .copied()
    }

    /// Every waiting cursor of `uid`'s devices (a device may come twice: fresh and draining).
    fn cursors_of(&self, uid: UserId) -> impl Iterator<Item = Seq> + '_ {
        let fresh = self
            .cursors
            .iter()
            .filter(move |((u, _), _)| *u == uid)
            .map(|(_, s)| *s);
        let draining = self
            .draining_cursors
            .iter()
            .filter(move |((u, _), _)| *u == uid)
            .map(|(_, (s, _))| *s);
        fresh.chain(draining)
    }

    /// Every outbox entry whose deletion waits (fresh or draining).
    fn outbox_deleting(&self) -> impl Iterator<Item = (ShardId, MsgId)> + '_ {
        let draining = self.draining.iter().filter_map(|op| match op {
            Op::OutboxDelete { shard, msg_id } => Some((*shard, *msg_id)),
            _ => None,
        });
        self.outbox_deletes.iter().copied().chain(draining)
    }

    /// The oldest has waited [`LAZY_FLUSH_MS`], too many wait, or the wall clock stepped back
    /// (they would wait until it caught up).
    fn due(&self, now: u64) -> bool {
        !self.fresh_is_empty()
            && (now >= self.since + LAZY_FLUSH_MS
                || now < self.since
                || self.outbox_deletes.len() + self.unwatch.len() + self.cursors.len() >= LAZY_MAX)
    }

    fn note(&mut self, now: u64) {
        if self.fresh_is_empty() {
            self.since = now;
        }
    }

    fn cursor(&mut self, uid: UserId, device_id: String, seq: Seq, now: u64) {
        self.note(now);
        self.cursors.insert((uid, device_id), seq);
    }

    fn outbox_delete(&mut self, shard: ShardId, msg_id: MsgId, now: u64) {
        self.note(now);
        self.outbox_deletes.push((shard, msg_id));
    }

    fn unwatch(&mut self, shard: ShardId, uid: UserId, seq: Seq, now: u64) {
        self.note(now);
        self.unwatch.push((shard, uid, seq));
    }

    /// How many draining writes a round at `now` takes: those the pace has made due by `now`
    /// (all of them once the drain's [`LAZY_DRAIN_MS`] is over, or if the clock stepped back).
    /// A round takes them only once [`LAZY_MIN_RIDE`] are due ([`LAZY_PER_ROUND`] if it has no
    /// writes of its own, `own_ops` false), or the last of them.
    fn share(&self, now: u64, own_ops: bool) -> usize {
        let left = self.draining.len();
        let due = match now.checked_sub(self.drain_from) {
            Some(t) if t < LAZY_DRAIN_MS => {
                let paced = (self.drain_len as u64 * t).div_ceil(LAZY_DRAIN_MS) as usize;
                paced.saturating_sub(self.drained).min(left)
            }
            _ => left,
        };
        let least = if own_ops {
            LAZY_MIN_RIDE
        } else {
            LAZY_PER_ROUND
        };
        if due >= least || due == left {
            due
        } else {
            0
        }
    }

    /// Moves every fresh write to the draining ones (behind those already draining), and
    /// paces them all (these and any left of the last drain) over the next [`LAZY_DRAIN_MS`].
    fn start_draining(&mut self, now: u64) {
        let d = &mut self.draining;
        for ((uid, device_id), seq) in self.cursors.drain() {
            // A fresh cursor is never older than a draining one of the same device.
            let c = self
                .draining_cursors
                .entry((uid, device_id.clone()))
                .or_insert((seq, 0));
            *c = (c.0.max(seq), c.1 + 1);
            d.push_back(Op::Cursor {
                uid,
                device_id,
                seq,
            });
        }
        for (shard, msg_id) in self.outbox_deletes.drain(..) {
            d.push_back(Op::OutboxDelete { shard, msg_id });
        }
        for (shard, uid, seq) in self.unwatch.drain(..) {
            d.push_back(Op::PushWatch {
                shard,
                uid,
                seq,
                on: false,
            });
        }
        self.drain_from = now;
        self.drain_len = d.len();
        self.drained = 0;
    }

    /// Takes up to `max` draining writes, oldest first, and puts them in front of `batch`'s
    /// own ops: they are older, so on a key both write the batch's own op wins.
    fn take_into(&mut self, batch: &mut WriteBatch, max: usize) {
        let n = max.min(self.draining.len());
        if n == 0 {
            return;
        }
        self.drained += n;
        let taken: Vec<Op> = self.draining.drain(..n).collect();
        for op in &taken {
            if let Op::Cursor { uid, device_id, .. } = op {
                let key = (*uid, device_id.clone());
                if let Some(c) = self.draining_cursors.get_mut(&key) {
                    c.1 -= 1;
                    if c.1 == 0 {
                        self.draining_cursors.remove(&key);
                    }
                }
            }
        }
        batch.ops.splice(0..0, taken);
    }
}

/// The wall clock in ms since the Unix epoch: read by [`Worker::run`] only, once per round or
/// tick; everything else gets the time as an input.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `SendAck` of an accepted message (also the answer to a deduplicated retry).
fn ack_frame(client_msg_id: u64, e: DedupEntry, req_id: u32) -> Bytes {
    Command::SendAck {
        code: ErrorCode::Ok,
        client_msg_id,
        msg_id: e.msg_id,
        seq: e.seq,
        server_time_ms: e.server_time_ms,
        prev_seq: e.prev_seq,
    }
    .to_bytes(req_id)
}

/// `OpResult` with code Ok.
fn op_ok(req_id: u32, id: u64) -> Bytes {
    Command::OpResult {
        code: ErrorCode::Ok,
        id,
        message: String::new(),
    }
    .to_bytes(req_id)
}

/// `OpResult` carrying an error.
fn op_err(req_id: u32, e: &ApiError) -> Bytes {
    Command::OpResult {
        code: e.code,
        id: 0,
        message: e.message.clone(),
    }
    .to_bytes(req_id)
}

fn error_frame(code: ErrorCode, req_id: u32, message: &str) -> Bytes {
    Command::Error {
        code,
        message: message.to_owned(),
    }
    .to_bytes(req_id)
}

impl<S: Store> Worker<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        idx: usize,
        cfg: LogicConfig,
        store: S,
        verifier: Arc<dyn TokenVerifier>,
        gate: Arc<dyn DownstreamSink>,
        router: Arc<Router>,
        depth: Arc<AtomicUsize>,
        services: Services,
        metrics: Arc<Metrics>,
    ) -> Self {
        let gen_id = router.global(idx);
        Worker {
            idx,
            ids: MsgIdGen::new(gen_id as u16),
            gen_id: gen_id as u16,
            id_reserved: 0,
            cfg,
            store,
            verifier,
            gate,
            router,
            depth,
            users: Users::default(),
            cached_users: 0,
            cached_groups: 0,
            counted_mention_all: 0,
            dedup_entries: 0,
            pending_entries: 0,
            active_users: 0,
            cached_bytes: 0,
            dir: None,
            dir_lost: false,
            dir_gone: Vec::new(),
            dir_touched: 0,
            dir_resyncing: Arc::default(),
            dir_heal: Arc::default(),
            groups: FastMap::default(),
            services,
            metrics,
            c2s: None,
            push_due: VecDeque::new(),
            outbox: outbox::Outbox::default(),
            resyncs: FastMap::default(),
            mention_all: FastMap::default(),
            mention_all_at: FastMap::default(),
            lazy: Lazy::default(),
            now: 0,
            org_notice: (0, None),
            org_pulled_at: None,
            presence: presence::Presence::default(),
            large: large::LargeIndex::default(),
            held_back: VecDeque::new(),
        }
    }

    /// Connects this worker's directory publisher (Redis Cluster) if one is configured.
    async fn connect_directory(&mut self) {
        #[cfg(feature = "redis")]
        if !self.cfg.redis_nodes.is_empty() {
            match crate::directory::RedisDirectory::connect(self.cfg.redis_nodes.clone()).await {
                Ok(d) => {
                    let (tx, rx) = mpsc::channel(crate::publish::QUEUE);
                    tokio::spawn(crate::publish::run(d, rx, self.dir_heal.clone()));
                    self.dir = Some(tx);
                }
                Err(e) => tracing::error!(
                    worker = self.idx,
                    "directory unavailable, routes not published: {e}"
                ),
            }
        }
    }

    /// Queues a route change for the directory; one that does not fit is dropped and makes the
    /// next [`Worker::resync_directory`] send every route.
    fn publish(&mut self, op: crate::publish::DirOp) {
        if let Some(tx) = &self.dir {
            if let Err(mpsc::error::TrySendError::Full(op)) = tx.try_send(op) {
                if let crate::publish::DirOp::Offline {
                    uid,
                    device_type,
                    conn,
                } = op
                {
                    // Beyond the bound the newer ones are forgotten (O(1): a shift per drop
                    // stalled the worker for minutes after a million logouts, run 9).
                    if self.dir_gone.len() < crate::publish::MAX_GONE {
                        self.dir_gone.push((uid, device_type, conn));
                    }
                }
                if !self.dir_lost {
                    tracing::warn!(
                        worker = self.idx,
                        "directory publisher behind: route changes dropped until a full resync"
                    );
                }
                self.dir_lost = true;
                Metrics::inc(&self.metrics.dir_dropped);
            }
        }
    }

    /// After route changes were dropped: every route this worker holds, as one resync, once the
    /// publisher's queue has room.
    fn resync_directory(&mut self) {
        if self
            .dir_heal
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.dir_lost = true;
        }
        if !self.dir_lost {
            return;
        }
        let Some(Ok(permit)) = self.dir.as_ref().map(|tx| tx.try_reserve()) else {
            return;
        };
        // One at a time: each holds every route; a later one covers what is dropped meanwhile.
        let Some(in_flight) = crate::publish::InFlight::start(&self.dir_resyncing) else {
            return;
        };
        let routes = self
            .users
            .iter()
            .flat_map(|(&uid, u)| u.devices.iter().map(move |d| (uid, d)))
            .map(|(uid, d)| {
                let route = crate::directory::RouteEntry {
                    device_type: d.device_type as u8,
                    device_id: d.device_id.to_string(),
                    gate: d.conn.gate(),
                    core: d.conn.core(),
                    conn: d.conn.0,
                    epoch: self.now,
                };
                (uid, route)
            })
            .collect();
        let gone = std::mem::take(&mut self.dir_gone);
        permit.send(crate::publish::DirOp::Resync(routes, gone, in_flight));
        self.dir_lost = false;
        Metrics::inc(&self.metrics.dir_resyncs);
    }

    /// Every [`crate::publish::REFRESH_EVERY`]: the users with a device here, for the publisher
    /// to refresh their presence (it keeps no list of its own). A full queue tries again at the
    /// next round or timer; presence lives three periods.
    fn touch_directory(&mut self) {
        let every = crate::publish::REFRESH_EVERY.as_millis() as u64;
        if self.dir.is_none() || self.now < self.dir_touched + every {
            return;
        }
        if self.dir_touched == 0 {
            // The first one period after the start (a login writes its presence itself).
            self.dir_touched = self.now;
            return;
        }
        let Some(Ok(permit)) = self.dir.as_ref().map(|tx| tx.try_reserve()) else {
            return;
        };
        let uids: Vec<UserId> = self
            .users
            .iter()
            .filter(|(_, u)| !u.devices.is_empty())
            .map(|(&uid, _)| uid)
            .collect();
        self.dir_touched = self.now;
        if !uids.is_empty() {
            permit.send(crate::publish::DirOp::Touch(uids));
        }
    }

    /// The device of `uid` logged in on `conn`, if that connection is logged in as `uid` here.
    fn device(&mut self, uid: UserId, conn: ConnId) -> Option<&mut Device> {
        self.users
            .get_mut(&uid)?
            .devices
            .iter_mut()
            .find(|d| d.conn == conn)
    }

    /// Whether `uid` has a device logged in here.
    fn online(&self, uid: UserId) -> bool {
        !devices_of(&self.users, uid).is_empty()
    }

    /// Global worker owning `uid` (see [`Router`]).
    fn owner(&self, uid: UserId) -> usize {
        self.router.owner(uid)
    }

    /// Runs the worker until `Shutdown` or until its inbox closes: the wall clock is read here,
    /// once per round or timer tick, and handed to [`Worker::step`] and [`Worker::tick`], which
    /// read no clock of their own.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<WorkerMsg>) {
        self.start(wall_clock_ms()).await;
        self.connect_directory().await;
        self.connect_c2s().await;
        let mut msgs = Vec::new();
        // With several nodes a fan-out can be lost with a peer link: after every link change the
        // worker re-sends its unconfirmed outbox to that node before any new live append.
        let mut resync = tokio::time::interval(RESYNC_CHECK_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RETRY_CHECK_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut push_tick = tokio::time::interval(PUSH_CHECK_EVERY);
        push_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lazy_tick = tokio::time::interval(Duration::from_millis(LAZY_DRAIN_MS));
        lazy_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let multi = self.router.nodes > 1;
        let push = self.services.push.is_some();
        let mut presence_tick = tokio::time::interval(presence::PRESENCE_CHECK_EVERY);
        presence_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut org_tick = tokio::time::interval(org::ORG_REFRESH_EVERY);
        org_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One node writes the tree; the others' caches poll the store for what it wrote.
        let org_poll = self.keeps_org();
        loop {
            // `None`: the lazy-write timer, an empty round that writes what waited too long.
            let first = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => Some(m),
                    None => return,
                },
                _ = resync.tick(), if multi => {
                    self.tick(Tick::Resync, wall_clock_ms()).await;
                    continue;
                }
                _ = retry.tick(), if multi && self.outbox.len() > 0 => {
                    self.tick(Tick::Retry, wall_clock_ms()).await;
                    continue;
                }
                _ = push_tick.tick(), if push => {
                    self.tick(Tick::Push, wall_clock_ms()).await;
                    continue;
                }
                _ = presence_tick.tick(), if self.presence.offline_pending() => {
                    self.tick(Tick::Presence, wall_clock_ms()).await;
                    continue;
                }
                _ = org_tick.tick(), if org_poll && (multi || !self.services.org.loaded()) => {
                    self.tick(Tick::Org, wall_clock_ms()).await;
                    continue;
                }
                _ = lazy_tick.tick(), if !self.lazy.is_empty()
                    || self.org_notice.1.is_some()
                    || self.large.has_moved() => None,
            };
            msgs.extend(first);
            while msgs.len() < self.cfg.max_group {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            self.metrics.set_inbox(self.idx, msgs.len() + rx.len());
            let began = std::time::Instant::now();
            let stepped = self.step(msgs.drain(..), wall_clock_ms()).await;
            self.metrics.round_seconds.observe(began.elapsed());
            if matches!(stepped, Ok(Step::Continue)) && rx.is_empty() && self.store.unsettled() {
                // The round's commit returned once durable. With nothing else to do, its
                // writes are handed to be applied to the store's indexes now, after the core
                // this worker may share a thread with has written the round's replies (the
                // embedded store's own thread applies them, woken if several wait); with more
                // to do, the next round's first read applies them (a read applies every durable
                // commit) unless the store's thread came first.
                tokio::task::yield_now().await;
                if let Err(e) = self.store.settle() {
                    tracing::error!(worker = self.idx, "applying a commit failed, aborting: {e}");
                    std::process::abort();
                }
            }
            self.metrics.set_inbox(self.idx, rx.len());
            self.metrics
                .set_worker_backlog(self.idx, self.router.waiting_at(self.idx));
            match stepped {
                Ok(Step::Continue) => {}
                Ok(Step::Stop) => {
                    // Applied now (or by the store's own thread, which applies what is durable once
                    // more when the store closes), so that the next start has nothing of it to
                    // replay.
                    if let Err(e) = self.store.settle() {
                        tracing::warn!(worker = self.idx, "applying the last commits failed: {e}");
                    }
                    return;
                }
                Err(Halt::Fenced(e)) => crate::ownership::exit_fenced(&e.to_string()),
                Err(Halt::Fatal(e)) => {
                    tracing::error!(worker = self.idx, "commit failed, aborting: {e}");
                    std::process::abort();
                }
            }
        }
    }

    /// What a worker does before its first round, at time `now`: resumes the msg-id generator
    /// above the reserved floor and replays its whole outbox (fan-outs a crash interrupted).
    pub(crate) async fn start(&mut self, now: u64) {
        self.now = now;
        self.resume_ids().await;
        self.replay_outbox().await;
        self.replay_push_watches().await;
        if self.keeps_org() {
            self.org_refresh().await;
        }
    }

    /// One round at time `now`: handles `msgs` in order against in-memory state, commits the
    /// writes they made in one batch, and only then releases their effects (replies, deliveries,
    /// messages to other workers). An error means nothing of the round was released and the
    /// worker must not go on (see [`Halt`]).
    pub(crate) async fn step(
        &mut self,
        msgs: impl IntoIterator<Item = WorkerMsg>,
        now: u64,
    ) -> Result<Step, Halt> {
        self.now = now;
        let mut round = Round::new(self.router.total());
        let mut stop = false;
        let mut org_changed = None;
        // The worker → worker bound: while this worker's messages wait at another worker of
        // this node past `max_worker_backlog`, client work is held back (in order) and only
        // what other workers send is handled, which never waits, so no cycle forms.
        let held = self.router.held(self.idx, self.cfg.max_worker_backlog);
        let earlier = if held {
            Vec::new()
        } else {
            Vec::from(std::mem::take(&mut self.held_back))
        };
        if held {
            Metrics::inc(&self.metrics.admission_held);
        }
        for m in earlier.into_iter().chain(msgs) {
            let m = match m {
                WorkerMsg::Peer(inner) => {
                    self.metrics.peer_taken(self.idx);
                    *inner
                }
                WorkerMsg::Local { from, items, msg } => {
                    self.router.taken(
                        from as usize,
                        self.idx,
                        items as usize,
                        self.cfg.max_worker_backlog,
                    );
                    *msg
                }
                m if held && m.is_admission() => {
                    self.held_back.push_back(m);
                    continue;
                }
                m => m,
            };
            match m {
                WorkerMsg::Peer(_) | WorkerMsg::Local { .. } => {
                    unreachable!("peer and local messages are not nested")
                }
                WorkerMsg::Resume => {}
                WorkerMsg::Gate(ups) => {
                    for up in ups {
                        if matches!(up, Up::Frame { .. }) {
                            self.depth.fetch_sub(1, Ordering::Relaxed);
                        }
                        self.on_up(up, &mut round).await;
                    }
                }
                WorkerMsg::Append(reqs) => {
                    for a in reqs {
                        self.on_append(a, &mut round).await;
                    }
                }
                WorkerMsg::AppendDone(done) => self.on_append_done(done, &mut round),
                WorkerMsg::Delivered(notes) => self.on_delivered(notes, &mut round),
                WorkerMsg::GateDown(gate) => self.on_gate_down(gate),
                WorkerMsg::Group(req) => self.on_group(req, &mut round).await,
                WorkerMsg::Api(req) => self.on_api(req, &mut round).await,
                WorkerMsg::OrgChanged(v) => org_changed = org_changed.max(Some(v)),
                WorkerMsg::OrgPull { reply_to, since } => self.on_org_pull(reply_to, since).await,
                WorkerMsg::OrgRecords(records) => self.on_org_records(records),
                WorkerMsg::Typing(notes) => self.on_typing_notes(notes, &mut round),
                WorkerMsg::Watch(req) => self.on_watch(req).await,
                WorkerMsg::Presence(entries) => self.on_presence(entries, &mut round),
                WorkerMsg::GroupLive(posts) => self.on_group_live(posts, &mut round),
                WorkerMsg::Shutdown => stop = true,
            }
        }
        if let Some(v) = org_changed {
            self.org_notice.1 = self.org_notice.1.max(Some(v));
        }
        self.org_notice_due(&mut round);
        self.muted_heads_due(&mut round).await;
        self.finish(round, stop).await?;
        self.trim_caches();
        self.resync_directory();
        self.touch_directory();
        Ok(if stop { Step::Stop } else { Step::Continue })
    }

    /// A timer's work at time `now`, outside of any round.
    pub(crate) async fn tick(&mut self, tick: Tick, now: u64) {
        self.now = now;
        match tick {
            Tick::Resync => self.resync_peers().await,
            Tick::Retry => self.retry_overdue(now),
            Tick::Push => self.push_overdue().await,
            Tick::Org => self.org_refresh().await,
            Tick::Presence => self.presence_due(now),
        }
        // A resync owed (dropped changes, or the publisher's failed writes) goes out even while
        // no round runs.
        self.resync_directory();
        self.touch_directory();
    }

    /// Resyncs every peer link that changed since this worker last looked.
    async fn resync_peers(&mut self) {
        let todo = match self.router.peers() {
            Some(p) => p.needs_resync(self.idx),
            None => return,
        };
        for (node, epoch) in todo {
            self.start_resync(node, epoch);
        }
        self.pump_resyncs();
    }

    /// Resumes the msg-id generator above the floor reserved before the restart, so no id is
    /// issued twice even if the wall clock is now behind the ids issued before.
    async fn resume_ids(&mut self) {
        let floor = loop {
            match self.store.id_floor(self.gen_id).await {
                Ok(f) => break f,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(worker = self.idx, "id floor read failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    // Issuing ids without the floor could reuse ids of before the restart.
                    tracing::error!(worker = self.idx, "id floor unreadable, aborting: {e}");
                    std::process::abort();
                }
            }
        };
        self.ids.raise_to(floor);
        self.id_reserved = floor;
    }

    async fn load_user(&mut self, uid: UserId) -> Result<(), StoreError> {
        let touched = self.now_secs();
        if let Some(u) = self.users.get_mut(&uid) {
            u.touched = touched;
            return Ok(());
        }
        let bound = self.store.seq_bound(uid).await?.0;
        let last = self.store.last_seq(uid).await?.0;
        let top = bound.max(last);
        self.users.insert(
            uid,
            UserState {
                next_seq: top + 1,
                bound: top,
                last_seq: last,
                loaded_last: last,
                touched,
                active: None,
                devices: Devices::default(),
            },
        );
        Ok(())
    }

    /// The worker's clock in whole seconds (LRU stamps).
    fn now_secs(&self) -> u32 {
        (self.now / 1000) as u32
    }

    /// Keeps the user and group caches within their budgets. Runs after a round is committed and
    /// released, so everything they hold is in the store: an evicted user reloads its seq bound
    /// and last seq ([`Worker::load_user`]; unused reserved seqs are skipped, as after a
    /// restart), finds older dedup records in the store and gets its pending notices rebuilt
    /// ([`Worker::recover_pending`]); an evicted group reloads its record and members. Online
    /// users are never evicted. One pass drops the least recently used down to 90 % of the
    /// budget (`select_nth_unstable`, linear in the cache size), so passes are rare.
    fn trim_caches(&mut self) {
        self.large.trim_recalls();
        let workers = self.cfg.workers.max(1);
        let max_users = (self.cfg.max_cached_users / workers).max(1);
        if self.users.len() > max_users {
            let keep = max_users - max_users / 10;
            let mut idle: Vec<(u32, UserId)> = self
                .users
                .iter()
                .filter(|(_, u)| u.devices.is_empty())
                .map(|(uid, u)| (u.touched, *uid))
                .collect();
            let drop = (self.users.len() - keep).min(idle.len());
            if drop > 0 {
                if drop < idle.len() {
                    idle.select_nth_unstable(drop - 1);
                }
                for (_, uid) in &idle[..drop] {
                    if let Some(u) = self.users.swap_remove(uid) {
                        let (d, p) = u.entries();
                        self.dedup_entries -= d;
                        self.pending_entries -= p;
                        self.active_users -= usize::from(u.active.is_some());
                    }
                }
                let users = &self.users;
                self.presence.retain_last_seen(|u| users.contains_key(u));
                self.metrics
                    .users_evicted
                    .fetch_add(drop as u64, Ordering::Relaxed);
            }
            self.users.shrink_to(self.users.len() * 5 / 4);
        }
        self.trim_bytes();
        let max_groups = (self.cfg.max_cached_groups / workers).max(1);
        if self.groups.len() > max_groups {
            let keep = max_groups - max_groups / 10;
            // A group whose `@all` is being fanned out stays: its next chunk reads the members.
            let busy: FastSet<GroupId> = self.mention_all.values().map(|j| j.group).collect();
            let mut all: Vec<(u32, GroupId)> = self
                .groups
                .iter()
                .filter(|(g, _)| !busy.contains(*g))
                .map(|(g, s)| (s.touched, *g))
                .collect();
            let drop = (self.groups.len() - keep).min(all.len());
            if drop > 0 && drop < all.len() {
                all.select_nth_unstable(drop - 1);
            }
            for (_, g) in &all[..drop] {
                self.groups.remove(g);
            }
            self.metrics
                .groups_evicted
                .fetch_add(drop as u64, Ordering::Relaxed);
            self.groups.shrink_to(self.groups.len() * 5 / 4);
        }
        let (users, groups) = (self.users.len() as u64, self.groups.len() as u64);
        let (du, dg) = (
            users.wrapping_sub(self.cached_users),
            groups.wrapping_sub(self.cached_groups),
        );
        self.metrics.users_cached.fetch_add(du, Ordering::Relaxed);
        self.metrics.groups_cached.fetch_add(dg, Ordering::Relaxed);
        (self.cached_users, self.cached_groups) = (users, groups);
        let running = self.mention_all.len() as u64;
        self.metrics.mention_all_running.fetch_add(
            running.wrapping_sub(self.counted_mention_all),
            Ordering::Relaxed,
        );
        self.counted_mention_all = running;
        let bytes = self.cache_bytes() as u64;
        self.metrics
            .cache_bytes
            .fetch_add(bytes.wrapping_sub(self.cached_bytes), Ordering::Relaxed);
        self.cached_bytes = bytes;
    }

    /// Estimated bytes of this worker's user states (see [`USER_BYTES`]).
    fn cache_bytes(&self) -> usize {
        self.users.len() * USER_BYTES
            + self.active_users * ACTIVE_BYTES
            + self.dedup_entries * DEDUP_BYTES
            + self.pending_entries * PENDING_BYTES
    }

    /// Keeps this worker's user states within its share of `max_cache_bytes`. Past it, one pass
    /// goes through the states least recently used first, offline users before online ones,
    /// down to 75 % of the share: an offline user's whole state is dropped (as by the count
    /// budget), an online user's [`Active`] part only (its remembered `client_msg_id`s, found
    /// in the store's dedup records instead, and its pending notices, rebuilt from the store by
    /// [`Worker::recover_pending`] before the next ack or push check needs them). Nothing is
    /// lost; a pass sorts the states, so passes are kept rare by the 25 % margin.
    fn trim_bytes(&mut self) {
        let budget = self.cfg.max_cache_bytes / self.cfg.workers.max(1);
        if self.cache_bytes() <= budget {
            return;
        }
        let target = budget - budget / 4;
        let mut order: Vec<(bool, u32, UserId)> = self
            .users
            .iter()
            .filter(|(_, u)| u.active.is_some() || u.devices.is_empty())
            .map(|(uid, u)| (!u.devices.is_empty(), u.touched, *uid))
            .collect();
        order.sort_unstable();
        let (mut evicted, mut trimmed) = (0u64, 0u64);
        for (online, _, uid) in order {
            if self.cache_bytes() <= target {
                break;
            }
            let Some(u) = self.users.get_mut(&uid) else {
                continue;
            };
            let (d, p) = u.entries();
            self.dedup_entries -= d;
            self.pending_entries -= p;
            self.active_users -= usize::from(u.active.is_some());
            if online {
                if p > 0 {
                    // Rebuilt from the timeline after the devices' cursors, up to here.
                    u.loaded_last = u.loaded_last.max(u.last_seq);
                }
                u.active = None;
                trimmed += 1;
            } else {
                self.users.swap_remove(&uid);
                evicted += 1;
            }
        }
        if evicted > 0 {
            let users = &self.users;
            self.presence.retain_last_seen(|u| users.contains_key(u));
            self.users.shrink_to(self.users.len() * 5 / 4);
        }
        self.metrics
            .users_evicted
            .fetch_add(evicted, Ordering::Relaxed);
        self.metrics
            .active_trimmed
            .fetch_add(trimmed, Ordering::Relaxed);
    }

    /// Rebuilds the pending notices (delivered notices, offline pushes) of the messages a user
    /// got before this process loaded it: the notifying messages from others in its timeline
    /// after the highest cursor of its devices, up to its last seq at load (at most the newest
    /// [`MAX_PENDING_NOTICES`]). Once per load; a store error leaves it to the next caller.
    /// Cursors are written lazily, so a message acknowledged just before a crash can count as
    /// pending again: its `Delivered` notice (or push) may come twice, never not at all.
    pub(super) async fn recover_pending(&mut self, uid: UserId) -> Result<(), StoreError> {
        let Some(upto) = self.users.get(&uid).map(|u| u.loaded_last) else {
            return Ok(());
        };
        if upto == 0 {
            return Ok(());
        }
        let stored = self.store.cursors(uid).await?;
        let live = devices_of(&self.users, uid).iter().map(|d| d.cursor.0);
        // Cursors acknowledged but not written yet (`lazy`) count too.
        let waiting = self.lazy.cursors_of(uid).map(|s| s.0);
        let acked = stored
            .iter()
            .map(|(_, s)| s.0)
            .chain(live)
            .chain(waiting)
            .max()
            .unwrap_or(0);
        let mut found = Vec::new();
        if acked < upto {
            let from = acked.max(upto.saturating_sub(MAX_PENDING_NOTICES as u64));
            let msgs = self
                .store
                .timeline(uid, Seq(from), (upto - from) as usize)
                .await?;
            found = msgs
                .into_iter()
                .filter(|m| m.seq.0 <= upto && notifies(m.conv) && m.from != uid)
                .collect();
        }
        let u = self.users.get_mut(&uid).expect("loaded above");
        u.loaded_last = 0;
        if found.is_empty() {
            return Ok(());
        }
        self.active_users += usize::from(u.active.is_none());
        let act = u.active();
        for m in found {
            if act.pending.insert(m.seq.0, Pending::of(&m)) {
                self.pending_entries += 1;
            }
        }
        while act.pending.len() > MAX_PENDING_NOTICES {
            act.pending.pop_oldest();
            self.pending_entries -= 1;
        }
        Ok(())
    }

    /// Allocates the next seq of a loaded user, reserving a new segment when needed.
    fn alloc_seq(&mut self, uid: UserId, round: &mut Round) -> (Seq, Seq) {
        let seg = self.cfg.seq_segment.max(1);
        let u = self.users.get_mut(&uid).expect("user loaded");
        if u.next_seq > u.bound {
            u.bound = u.next_seq - 1 + seg;
            round.batch.push(Op::SeqBound {
                uid,
                bound: Seq(u.bound),
            });
        }
        let seq = u.next_seq;
        u.next_seq += 1;
        let prev = u.last_seq;
        u.last_seq = seq;
        (Seq(seq), Seq(prev))
    }

    async fn on_up(&mut self, up: Up, round: &mut Round) {
        match up {
            Up::Closed { conn, uid } => self.on_closed(conn, uid),
            Up::Frame {
                conn,
                uid,
                cmd,
                req_id,
                body,
            } => {
                if cmd == Cmd::Login {
                    return self.on_login(conn, uid, req_id, body, round).await;
                }
                if self.device(uid, conn).is_none() {
                    round.close(
                        conn,
                        error_frame(ErrorCode::NotLoggedIn, req_id, "not logged in"),
                    );
                    return;
                }
                let cmd_body = match Command::decode_body(cmd, body) {
                    Ok(c) => c,
                    Err(e) => {
                        round.close(
                            conn,
                            error_frame(ErrorCode::Malformed, req_id, &e.to_string()),
                        );
                        return;
                    }
                };
                match cmd_body {
                    Command::SendC2c { body, .. } | Command::SendC2g { body, .. }
                        if self.check_body(&body).is_err() =>
                    {
                        let (code, why) = self.check_body(&body).unwrap_err();
                        round.send(conn, error_frame(code, req_id, &why));
                    }
                    Command::SendC2c {
                        client_msg_id,
                        to,
                        body,
                    } => {
                        self.on_send_c2c(conn, uid, req_id, client_msg_id, to, body, round)
                            .await
                    }
                    Command::DeliverAck { seq } => self.on_deliver_ack(conn, uid, seq, round).await,
                    Command::SyncRequest { after_seq, limit } => {
                        self.on_sync(conn, uid, req_id, after_seq, limit, round)
                            .await
                    }
                    Command::Logout => {
                        self.on_closed(conn, uid);
                        round.close(conn, Command::LogoutAck.to_bytes(req_id));
                    }
                    Command::SendC2g { mentions, .. } if mentions.len() > MAX_MENTIONS => {
                        let why = format!("a post mentions at most {MAX_MENTIONS} members");
                        round.send(conn, error_frame(ErrorCode::InvalidArgument, req_id, &why));
                    }
                    Command::SendC2g {
                        client_msg_id,
                        group,
                        body,
                        mentions,
                    } => {
                        let to = Reply::Conn { conn, req_id };
                        self.forward_group(
                            uid,
                            group,
                            GroupOp::Post {
                                client_msg_id,
                                conv: CONV_C2G,
                                body,
                                mentions,
                            },
                            to,
                            round,
                        );
                    }
                    Command::Recall {
                        client_msg_id,
                        conv,
                        peer,
                        msg_id,
                    } => {
                        self.on_recall(conn, uid, req_id, client_msg_id, conv, peer, msg_id, round)
                            .await
                    }
                    Command::ReadReport {
                        client_msg_id,
                        conv,
                        peer,
                        msg_id,
                    } => {
                        self.on_read(conn, uid, req_id, client_msg_id, conv, peer, msg_id, round)
                            .await
                    }
                    Command::Report {
                        client_msg_id,
                        topic,
                        body,
                    } => self.on_report(conn, uid, req_id, client_msg_id, topic, body, round),
                    Command::GroupCreate {
                        name,
                        members,
                        client_id,
                    } => self.on_group_create(
                        uid,
                        name,
                        members,
                        client_id,
                        Reply::Conn { conn, req_id },
                        round,
                    ),
                    cmd @ (Command::GroupAdd { .. }
                    | Command::GroupRemove { .. }
                    | Command::GroupLeave { .. }
                    | Command::GroupUpdate { .. }
                    | Command::GroupInfo { .. }
                    | Command::GroupPosting { .. }
                    | Command::GroupRole { .. }) => {
                        if let Some((group, op)) = groups::group_op(cmd) {
                            self.forward_group(uid, group, op, Reply::Conn { conn, req_id }, round);
                        }
                    }
                    Command::MyGroups => {
                        self.on_my_groups(uid, Reply::Conn { conn, req_id }, round)
                            .await
                    }
                    Command::SetMute { peer, muted } => {
                        round.batch.push(Op::Mute { uid, peer, muted });
                        self.large.set_muted(uid, GroupId(peer), muted);
                        round.send(conn, op_ok(req_id, 0));
                    }
                    Command::RegisterPush { provider, token } => {
                        self.on_register_push(conn, uid, req_id, provider, token, round)
                    }
                    cmd @ (Command::OrgSync { .. }
                    | Command::OrgDept { .. }
                    | Command::OrgUser { .. }
                    | Command::OrgSearch { .. }) => self.on_org_read(conn, uid, req_id, cmd, round),
                    Command::FileUpload {
                        kind,
                        size,
                        sha256,
                        mime,
                    } => self.on_file_upload(conn, uid, req_id, kind, size, sha256, mime, round),
                    Command::FileDownload { seq } => {
                        self.on_file_download(conn, uid, req_id, seq, round).await
                    }
                    Command::Typing { conv, peer, state } => {
                        self.on_typing(conn, uid, req_id, conv, peer, state, round)
                    }
                    Command::PresenceSubscribe { users } => {
                        self.on_presence_subscribe(conn, req_id, users, round)
                    }
                    Command::PresencePrivacy { hidden } => {
                        self.on_presence_privacy(conn, uid, req_id, hidden, round)
                    }
                    Command::GroupSync {
                        group,
                        after_seq,
                        limit,
                    } => {
                        let op = GroupOp::Sync {
                            after: after_seq,
                            limit,
                        };
                        self.forward_group(uid, group, op, Reply::Conn { conn, req_id }, round);
                    }
                    Command::GroupMembers {
                        group,
                        after,
                        limit,
                    } => {
                        let op = GroupOp::Members { after, limit };
                        self.forward_group(uid, group, op, Reply::Conn { conn, req_id }, round);
                    }
                    Command::GroupRead { group, seq } => {
                        self.on_group_read(conn, uid, req_id, group, seq, round)
                            .await
                    }
                    Command::GroupFileDownload { group, seq } => {
                        let op = GroupOp::PostFile { seq };
                        self.forward_group(uid, group, op, Reply::Conn { conn, req_id }, round);
                    }
                    _ => round.close(
                        conn,
                        error_frame(ErrorCode::UnknownCommand, req_id, "not a client command"),
                    ),
                }
            }
        }
    }

    /// Commits the round and releases its effects.
    ///
    /// A retryable store error (a network backend that is unavailable) is retried with backoff:
    /// the worker stalls rather than acknowledging anything that is not durable (and its queue
    /// fills, so the gate sheds new requests with `Overloaded`). A fence or any other commit
    /// error ends the round with a [`Halt`] and releases nothing; the outbox replays the
    /// unfinished fan-out at the restart.
    async fn finish(&mut self, mut round: Round, last: bool) -> Result<(), Halt> {
        // Every id issued in this round must be covered by a reserved floor committed no later
        // than what acknowledges it: extend the reservation in this round's batch.
        let mut reserve = None;
        if self.ids.last_ms() + ID_RESERVE_MARGIN_MS > self.id_reserved {
            let ms = self.ids.last_ms() + ID_RESERVE_MS;
            round.batch.push(Op::IdFloor {
                generator: self.gen_id,
                ms,
            });
            reserve = Some(ms);
        }
        self.enqueue_c2s(&mut round).await;
        // Lazy writes wait until due, then go with the commits of the rounds that follow, or
        // alone, paced over LAZY_DRAIN_MS (all of them in the last round).
        if self.lazy.due(self.now) || (last && !self.lazy.is_empty()) {
            self.lazy.start_draining(self.now);
        }
        if !self.lazy.draining.is_empty() {
            let share = if last {
                usize::MAX
            } else {
                self.lazy.share(self.now, !round.batch.is_empty())
            };
            // Never more than LAZY_MAX left draining.
            let max = share.max(self.lazy.draining.len().saturating_sub(LAZY_MAX));
            self.lazy.take_into(&mut round.batch, max);
        }
        let mut batch = std::mem::take(&mut round.batch);
        // Appends for the other workers of this node go as soon as this round's record is
        // written, before its sync: they share this store, so their commits come after this
        // one's and cannot become durable without it, and their sync covers this record too
        // (one `fdatasync` for both rounds instead of one each, one after the other). Appends
        // for other nodes wait for the commit, like every other effect.
        let mut early: Vec<(usize, Vec<AppendReq>)> = Vec::new();
        if !batch.is_empty() {
            let me = self.router.global(self.idx);
            for (w, reqs) in round.appends_out.iter_mut().enumerate() {
                if !reqs.is_empty() && w != me && self.router.node_of(w) == self.router.node {
                    early.push((w, std::mem::take(reqs)));
                }
            }
            let mut backoff = Duration::from_millis(20);
            // A copy of the batch for a retry, only if the store's commit may ask for one.
            let keep = self.store.commit_retryable();
            loop {
                if let Some(lease) = &self.cfg.lease {
                    // Checked before every attempt: a stale owner must not write.
                    crate::ownership::wait_valid(lease, self.idx).await;
                    batch.writer = Some(lease.writer());
                }
                let began = std::time::Instant::now();
                let attempt = if keep {
                    batch.clone()
                } else {
                    std::mem::take(&mut batch)
                };
                let committed = if early.is_empty() {
                    self.store.commit(attempt).await
                } else {
                    let (router, from, early) = (&self.router, self.idx, &mut early);
                    self.store
                        .commit_then(attempt, move || {
                            for (w, reqs) in early.drain(..) {
                                router.send(from, w, WorkerMsg::Append(reqs));
                            }
                        })
                        .await
                };
                match committed {
                    Ok(()) => {
                        self.metrics.commit_seconds.observe(began.elapsed());
                        Metrics::inc(&self.metrics.commits);
                        if let Some(ms) = reserve {
                            self.id_reserved = ms;
                        }
                        break;
                    }
                    Err(e @ StoreError::Fenced { .. }) => return Err(Halt::Fenced(e)),
                    Err(e) if e.is_retryable() && keep => {
                        tracing::warn!(worker = self.idx, "commit failed, retrying: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => return Err(Halt::Fatal(e)),
                }
            }
        }
        for (core, downs) in round.downs.drain() {
            let (gate, core) = ((core >> 16) as u16, core as u16);
            // A core at its backlog bound: wait here, asynchronously, instead of in `send`. A
            // worker hosted on a gate core's thread must not block it (that core may be the
            // one to drain, or be waiting for this one); the wait ends after `DOWN_WAIT_MAX`
            // as the sink's own does.
            if !self.gate.has_room(core) {
                let start = std::time::Instant::now();
                while !self.gate.has_room(core) && start.elapsed() < im_shared::link::DOWN_WAIT_MAX
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            self.gate.send(gate, core, downs);
        }
        for (tx, res) in round.api.drain(..) {
            let _ = tx.send(res);
        }
        // (`commit_then` ran `written` unless the commit failed, and then nothing gets here.)
        for (w, reqs) in early {
            self.router.send(self.idx, w, WorkerMsg::Append(reqs));
        }
        for (w, reqs) in round.appends_out.into_iter().enumerate() {
            if !reqs.is_empty() {
                self.router.send(self.idx, w, WorkerMsg::Append(reqs));
            }
        }
        for (w, done) in round.done_out.into_iter().enumerate() {
            if !done.is_empty() {
                self.router.send(self.idx, w, WorkerMsg::AppendDone(done));
            }
        }
        for (w, notes) in round.delivered_out.into_iter().enumerate() {
            if !notes.is_empty() {
                self.router.send(self.idx, w, WorkerMsg::Delivered(notes));
            }
        }
        for (w, notes) in round.typing_out.into_iter().enumerate() {
            if !notes.is_empty() {
                self.router.send(self.idx, w, WorkerMsg::Typing(notes));
            }
        }
        // After the `LoginResult` went to its gate: the owners' `GroupHeads` come after it, one
        // request (and one push) per owner worker and device, whatever the number of groups.
        let mut per_owner: HashMap<(usize, ConnId), Vec<GroupReq>> = HashMap::new();
        for req in round.heads_out {
            let owner = self.router.owner(UserId(req.group.0));
            let conn = match &req.reply {
                Reply::Conn { conn, .. } => *conn,
                _ => ConnId(0),
            };
            per_owner.entry((owner, conn)).or_default().push(req);
        }
        let here = self.router.node_of(self.router.global(self.idx));
        for ((owner, _), mut reqs) in per_owner {
            // An owner on another node gets a request per group: a node of an older release
            // does not know the batch (it would end the peer link), and nodes are upgraded one
            // at a time.
            if reqs.len() == 1 || self.router.node_of(owner) != here {
                for req in reqs {
                    self.router.send(self.idx, owner, WorkerMsg::Group(req));
                }
                continue;
            }
            let req = {
                let heads = reqs
                    .iter()
                    .filter_map(|r| match r.op {
                        GroupOp::Head { read } => Some((r.group, read)),
                        _ => None,
                    })
                    .collect();
                let first = reqs.swap_remove(0);
                GroupReq {
                    op: GroupOp::Heads { heads },
                    ..first
                }
            };
            self.router.send(self.idx, owner, WorkerMsg::Group(req));
        }
        if !round.live.is_empty() {
            // Once per worker of the cluster, whatever the number of members.
            for w in 0..self.router.total() {
                self.router
                    .send(self.idx, w, WorkerMsg::GroupLive(round.live.clone()));
            }
        }
        Ok(())
    }
}
