//! The shared directory of the cluster: device routes, presence, the gate registry and the shard
//! map with fencing epochs.
//!
//! [`Directory`] has two real implementations: [`MemoryDirectory`] (one node, in-process) and
//! [`RedisDirectory`] (Redis Cluster through the `redis` crate's cluster-async connection, feature
//! `redis`). Both pass the shared suite `im_testkit::directory_conformance`. Logic caches the routes of the users it
//! owns; the directory is what other nodes read and what survives a logic restart.
//!
//! # Redis key layout
//!
//! Every key of one user carries the uid as its hash tag, so all of them live in one slot and
//! can be written in one pipeline; the gate registry and the shard map are one slot each.
//!
//! | key | type | content |
//! |-----|------|---------|
//! | `r:{<uid>}` | HASH | field = device type (decimal), value = encoded [`RouteEntry`] `1\|conn\|epoch\|gate\|core\|device_id`; TTL refreshed by [`Directory::touch_presence`] |
//! | `p:{<uid>}` | STRING | `1` while the user is online, with the presence TTL |
//! | `{gates}:live` | ZSET | member = gate id, score = expiry (server clock, Unix ms) |
//! | `{gates}:info` | HASH | field = gate id, value = encoded [`GateInfo`] |
//! | `{shards}:map` | HASH | field = vshard, value = `node:epoch:token` |
//! | `{shards}:inc:<node>` | STRING | the node's newest incarnation (an `INCR` counter) |
//! | `{shards}:lease:<node>` | STRING | incarnation holding the node's lease, with the lease TTL (`PX`) |
//! | `{shards}:set:<node>` | SET | the vshards the node's newest incarnation acquired |
//! | `{shards}:acq:<node>` | STRING | token and result of the last acquire (lets a resent acquire return its result) |
//!
//! # Consistency and what survives a Redis master failover
//!
//! Redis replicates asynchronously: a master acknowledges a write before its replica has it, and
//! if the master dies in that window the promoted replica never sees the write. The cluster
//! connection retries MOVED/ASK redirections, `TRYAGAIN`/`CLUSTERDOWN` and reconnects by itself;
//! an operation that still fails within the configured timeouts returns
//! [`DirectoryError::Unavailable`] and the caller retries later. Multi-command writes are plain
//! pipelines of idempotent commands or Lua scripts on one key slot, never `MULTI`: the client
//! cannot follow a MOVED inside a transaction. Because the client may resend a command whose
//! reply was lost, a shard claim carries a unique token so that its resend returns the epoch it
//! won instead of `Fenced`; a resent `remove_route` may report `false` for a route its first
//! attempt deleted.
//!
//! * **Routes** written shortly before a failover can be lost (or a removed route can come back).
//!   That heals itself: a route is re-written on every login and its hash's TTL is refreshed by
//!   every heartbeat, a lost route makes a delivery fall back to offline sync/push (the message is
//!   durable in the store), and a resurrected stale route names a connection that no longer
//!   exists, which the gate answers as closed and which expires with its TTL.
//! * **Presence** is a TTL key refreshed by heartbeats: a lost refresh is redone by the next one.
//! * **Gate registry** entries are re-registered periodically by each gate; a lost registration is
//!   at most one period stale.
//! * **Shard claims** are a compare-and-set on one hash ([`Directory::claim_shard`]); after the
//!   CAS the Redis implementation sends `WAIT 1 <ms>` on the same connection and slot (a pipeline
//!   routed to the `{shards}` master), so in the normal case the claim is on a replica before it
//!   returns. `WAIT` does not make Redis strongly consistent: if no replica acknowledges within
//!   the timeout, the claim is still returned (and logged); a claim lost in a failover makes the
//!   next claim with that epoch succeed again, so owners must also fence their writes with the
//!   epoch they hold (the store side of fencing), not only rely on this map.
//!
//! # Clocks
//!
//! TTLs are measured by the directory, never by callers: Redis expires keys on the master's clock
//! and the gate registry scores use the server's `TIME`, so client clock skew does not matter.

mod memory_directory;
#[cfg(feature = "redis")]
mod redis_directory;

pub use memory_directory::MemoryDirectory;
#[cfg(feature = "redis")]
pub use redis_directory::{RedisDirectory, RedisDirectoryConfig};

use im_shared::{ShardId, UserId};

/// TTL a route hash gets when it is written and has none yet (a login that is never followed by
/// a heartbeat). Heartbeats ([`Directory::touch_presence`]) replace it with the presence TTL.
pub const DEFAULT_ROUTE_TTL_SECS: u64 = 300;

/// Directory failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The backend could not be reached or did not answer in time (e.g. during a Redis failover).
    /// Retryable.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// A shard claim carried a stale epoch: the shard is now at `current`.
    #[error("shard claim fenced: current epoch is {current}")]
    Fenced { current: u64 },
    /// A stored record could not be decoded, or the backend holds an unexpected type.
    #[error("corrupt directory record: {0}")]
    Corrupt(String),
    /// [`Directory::acquire_shards`]: `vshard` is held by `node`, whose lease is still live (for
    /// the acquiring node itself: its previous incarnation's lease). Retry after the lease.
    #[error("shard {vshard} is held by node {node} under a live lease")]
    Held { vshard: u16, node: u16 },
    /// [`Directory::renew_lease`]: the node's incarnation is no longer `incarnation` (another node
    /// took its shards, or a newer incarnation of it started); the holder must stop.
    #[error("lease lost: the node's incarnation is now {current}")]
    LeaseLost { current: u64 },
}

/// What [`Directory::acquire_shards`] gave a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquired {
    /// The node's new incarnation: the writer identity of its store batches.
    pub incarnation: u64,
    /// Each acquired shard with its new epoch, in the order asked.
    pub epochs: Vec<(ShardId, u64)>,
    /// Other nodes whose shards were taken after their lease expired, each with the incarnation
    /// their counter was raised to: the store fence that stops a stale writer of that node.
    pub displaced: Vec<(u16, u64)>,
}

impl DirectoryError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DirectoryError::Unavailable(_))
    }
}

/// Where one device of a user is connected. A user has at most one route per device type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteEntry {
    pub device_type: u8,
    pub device_id: String,
    /// Gate node id.
    pub gate: u16,
    /// Core of that gate that owns the connection.
    pub core: u16,
    /// The connection id (see [`im_shared::ConnId`]); the key of [`Directory::remove_route`].
    pub conn: u64,
    /// Login epoch of this route (set by the owning shard; larger is newer).
    pub epoch: u64,
}

/// A live gate, as the iplist service hands it to clients.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GateInfo {
    pub id: u16,
    /// `host:port` of the binary TCP protocol.
    pub tcp_addr: String,
    /// `host:port` (or URL) of the WebSocket listener, if the gate has one.
    pub ws_addr: Option<String>,
    /// Connections currently open on the gate (for load-aware iplists).
    pub conns: u64,
}

/// The shared directory. Methods are async so network backends fit; [`MemoryDirectory`]
/// completes them inline. Every TTL is in whole seconds; `0` is treated as `1`.
#[allow(async_fn_in_trait)]
pub trait Directory: Clone + Send + Sync + 'static {
    /// Stores the route of `route.device_type` for `uid`, replacing the previous route of that
    /// device type. A route hash without a TTL gets [`DEFAULT_ROUTE_TTL_SECS`]; an existing TTL
    /// is kept.
    async fn set_route(&self, uid: UserId, route: RouteEntry) -> Result<(), DirectoryError>;

    /// Every route of `uid`, sorted by device type. Empty once the routes expired.
    async fn routes(&self, uid: UserId) -> Result<Vec<RouteEntry>, DirectoryError>;

    /// Deletes the route of `device_type` only if it still names connection `conn` (atomic
    /// compare-and-delete), so a late logout cannot delete a newer login's route. Returns whether
    /// a route was deleted.
    async fn remove_route(
        &self,
        uid: UserId,
        device_type: u8,
        conn: u64,
    ) -> Result<bool, DirectoryError>;

    /// Marks `uid` online for `ttl_secs` and gives its route hash the same TTL (heartbeat).
    async fn touch_presence(&self, uid: UserId, ttl_secs: u64) -> Result<(), DirectoryError>;

    /// Whether `uid`'s presence has not expired.
    async fn is_online(&self, uid: UserId) -> Result<bool, DirectoryError>;

    /// Registers (or refreshes) a gate for `ttl_secs`; it disappears from [`Directory::gates`]
    /// when not refreshed in time.
    async fn register_gate(&self, gate: GateInfo, ttl_secs: u64) -> Result<(), DirectoryError>;

    /// The live gates, sorted by id.
    async fn gates(&self) -> Result<Vec<GateInfo>, DirectoryError>;

    /// Owner node and fencing epoch of `vshard`, if it was ever claimed.
    async fn shard_owner(&self, vshard: ShardId) -> Result<Option<(u16, u64)>, DirectoryError>;

    /// Compare-and-set: if the epoch of `vshard` is `expected_epoch` (0 for a never-claimed
    /// shard), makes `node` its owner with epoch `expected_epoch + 1` and returns the new epoch;
    /// otherwise changes nothing and returns [`DirectoryError::Fenced`] with the current epoch.
    async fn claim_shard(
        &self,
        vshard: ShardId,
        node: u16,
        expected_epoch: u64,
    ) -> Result<u64, DirectoryError>;

    /// Every claimed shard as `(vshard, node, epoch)`, sorted by vshard.
    async fn shard_map(&self) -> Result<Vec<(ShardId, u16, u64)>, DirectoryError>;

    /// Takes `shards` for `node` under a lease of `lease_ms`, atomically for the whole set:
    ///
    /// * refused with [`DirectoryError::Held`] (nothing changes) while `node`'s own previous
    ///   lease is live, or while any shard is owned by another node whose lease is live and whose
    ///   acquired set contains it;
    /// * otherwise bumps `node`'s incarnation, sets its lease and its acquired set to `shards`,
    ///   gives each shard epoch + 1 with `node` as owner, and for every other owner whose lease
    ///   had expired raises that owner's incarnation counter (so its renewals fail) and reports
    ///   it in [`Acquired::displaced`]. A shard another live node gave up (no longer in its set)
    ///   is taken without displacing anyone.
    async fn acquire_shards(
        &self,
        node: u16,
        shards: &[ShardId],
        lease_ms: u64,
    ) -> Result<Acquired, DirectoryError>;

    /// Extends `node`'s lease to `lease_ms` from now if its incarnation is still
    /// `incarnation` (also after the lease ran out, as long as nobody displaced the node);
    /// otherwise [`DirectoryError::LeaseLost`].
    async fn renew_lease(
        &self,
        node: u16,
        incarnation: u64,
        lease_ms: u64,
    ) -> Result<(), DirectoryError>;

    /// Ends `node`'s lease now if it is held by `incarnation` (a clean shutdown), so that the
    /// node's successor does not wait for it to expire.
    async fn release_lease(&self, node: u16, incarnation: u64) -> Result<(), DirectoryError>;
}
