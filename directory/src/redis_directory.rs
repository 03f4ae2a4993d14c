//! [`RedisDirectory`]: the directory on a Redis Cluster (`redis` crate, cluster-async).
//!
//! Key layout and failover behaviour are described in the [module docs](super).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use im_shared::{ShardId, UserId};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, ServerErrorKind};

use super::{Acquired, Directory, DirectoryError, GateInfo, RouteEntry, DEFAULT_ROUTE_TTL_SECS};

const GATES_LIVE: &str = "{gates}:live";
const GATES_INFO: &str = "{gates}:info";
const SHARDS: &str = "{shards}:map";

fn routes_key(uid: UserId) -> String {
    format!("r:{{{}}}", uid.0)
}

fn presence_key(uid: UserId) -> String {
    format!("p:{{{}}}", uid.0)
}

/// Connection settings of a [`RedisDirectory`].
#[derive(Clone, Debug)]
pub struct RedisDirectoryConfig {
    /// Seed nodes, `redis://host:port`; the rest of the cluster is discovered from them.
    pub nodes: Vec<String>,
    /// Limit of one TCP connect.
    pub connection_timeout: Duration,
    /// Limit of one attempt of one command.
    pub response_timeout: Duration,
    /// Limit of one operation including the client's retries (MOVED/ASK, reconnects, `TRYAGAIN`,
    /// `CLUSTERDOWN` during a failover); after it the operation returns
    /// [`DirectoryError::Unavailable`].
    pub overall_timeout: Duration,
    /// Retries of one operation within `overall_timeout`.
    pub retries: u32,
    /// Replicas a shard claim waits for (`WAIT n`); 0 disables the wait.
    pub claim_wait_replicas: u32,
    /// How long a shard claim waits for them.
    pub claim_wait_timeout: Duration,
}

impl RedisDirectoryConfig {
    /// Defaults: 1 s connect and per-attempt timeouts, 5 s per operation, claims wait up to
    /// 200 ms for one replica.
    pub fn new<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        RedisDirectoryConfig {
            nodes: nodes.into_iter().map(Into::into).collect(),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            overall_timeout: Duration::from_secs(5),
            retries: 20,
            claim_wait_replicas: 1,
            claim_wait_timeout: Duration::from_millis(200),
        }
    }
}

/// The directory on a Redis Cluster. Clones share the connections.
///
/// Two cluster connections are kept: one for every operation, and one for shard claims only,
/// because the claim's `WAIT` blocks its connection on the server for up to
/// [`RedisDirectoryConfig::claim_wait_timeout`], and must not hold up routes and presence queued
/// behind it on a multiplexed connection.
///
/// The connections are driven by tasks spawned on the tokio runtime that called
/// [`RedisDirectory::connect`]: with one current-thread runtime per logic worker, connect once
/// per worker runtime rather than sharing one directory across runtimes.
#[derive(Clone)]
pub struct RedisDirectory {
    con: ClusterConnection,
    claim_con: ClusterConnection,
    claim_wait_replicas: u32,
    claim_wait_ms: u64,
}

impl std::fmt::Debug for RedisDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDirectory").finish_non_exhaustive()
    }
}

impl RedisDirectory {
    /// Runs a shard-map script (`script(by_sha)`) on the claim connection, followed in the same
    /// pipeline (so routed with it to the `{shards}` master) by `WAIT` for the configured
    /// replicas. Returns the script's reply and whether enough replicas acknowledged it within
    /// the wait (always `true` without one).
    async fn eval_replicated<T: FromRedisValue>(
        &self,
        what: &str,
        script: impl Fn(bool) -> Cmd,
    ) -> Result<(T, bool), DirectoryError> {
        let make = |sha: bool| {
            let mut p = redis::pipe();
            p.add_command(script(sha));
            if self.claim_wait_replicas > 0 {
                p.cmd("WAIT")
                    .arg(self.claim_wait_replicas)
                    .arg(self.claim_wait_ms);
            }
            p
        };
        let mut con = self.claim_con.clone();
        let reply: Vec<redis::Value> = match make(true).query_async(&mut con).await {
            Err(e) if is_noscript(&e) => make(false).query_async(&mut con).await,
            r => r,
        }
        .map_err(map_err)?;
        let mut reply = reply.into_iter();
        let out: T = reply
            .next()
            .map(redis::from_redis_value)
            .transpose()
            .map_err(|e| DirectoryError::Corrupt(e.to_string()))?
            .ok_or_else(|| DirectoryError::Corrupt(format!("empty {what} reply")))?;
        let replicated = reply.next().is_none_or(|acked| {
            redis::from_redis_value::<i64>(acked).unwrap_or(0)
                >= i64::from(self.claim_wait_replicas)
        });
        Ok((out, replicated))
    }

    /// Connects to the cluster with [`RedisDirectoryConfig::new`] defaults.
    pub async fn connect<S: Into<String>>(
        nodes: impl IntoIterator<Item = S>,
    ) -> Result<Self, DirectoryError> {
        Self::connect_with(RedisDirectoryConfig::new(nodes)).await
    }

    /// Connects to the cluster (reads its slot map from a seed node).
    pub async fn connect_with(config: RedisDirectoryConfig) -> Result<Self, DirectoryError> {
        if config.nodes.is_empty() {
            return Err(DirectoryError::Unavailable(
                "no Redis Cluster seed nodes configured".into(),
            ));
        }
        let client = ClusterClientBuilder::new(config.nodes.clone())
            .connection_timeout(config.connection_timeout)
            .response_timeout(config.response_timeout)
            .overall_response_timeout(Some(config.overall_timeout))
            .retries(config.retries)
            .min_retry_wait(20)
            .max_retry_wait(500)
            .build()
            .map_err(unavailable)?;
        let con = client.get_async_connection().await.map_err(unavailable)?;
        let claim_con = client.get_async_connection().await.map_err(unavailable)?;
        Ok(RedisDirectory {
            con,
            claim_con,
            claim_wait_replicas: config.claim_wait_replicas,
            claim_wait_ms: config.claim_wait_timeout.as_millis().max(1) as u64,
        })
    }
}

/// Maps a client error: data of an unexpected shape is [`DirectoryError::Corrupt`], everything
/// else (I/O, timeouts, cluster down, redirections that ran out of retries) is retryable.
fn map_err(e: RedisError) -> DirectoryError {
    match e.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            DirectoryError::Corrupt(e.to_string())
        }
        ErrorKind::Extension if e.code() == Some("WRONGTYPE") => {
            DirectoryError::Corrupt(e.to_string())
        }
        _ => unavailable(e),
    }
}

fn unavailable(e: RedisError) -> DirectoryError {
    DirectoryError::Unavailable(e.to_string())
}

fn corrupt(what: &str, raw: &str) -> DirectoryError {
    DirectoryError::Corrupt(format!("{what}: {raw:?}"))
}

/// A Lua script sent by `EVALSHA`, and by `EVAL` when the node does not have it cached (a fresh
/// or promoted node). Unlike `redis::Script::invoke_async` this never sends `SCRIPT LOAD`, which
/// the cluster client broadcasts to every node and which fails while any node is down.
struct Lua {
    src: &'static str,
    sha: String,
}

impl Lua {
    fn new(src: &'static str) -> Self {
        Lua {
            src,
            sha: redis::Script::new(src).get_hash().to_owned(),
        }
    }

    /// `EVALSHA sha numkeys keys..` (or `EVAL src ..`); the caller appends `ARGV`.
    fn cmd(&self, by_sha: bool, keys: &[&str]) -> Cmd {
        let mut c = if by_sha {
            redis::cmd("EVALSHA")
        } else {
            redis::cmd("EVAL")
        };
        c.arg(if by_sha { self.sha.as_str() } else { self.src })
            .arg(keys.len())
            .arg(keys);
        c
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Runs `make(by_sha)` by hash first, by source if the node answers NOSCRIPT.
async fn eval<T: FromRedisValue>(
    con: &mut ClusterConnection,
    make: impl Fn(bool) -> Cmd,
) -> Result<T, RedisError> {
    match make(true).query_async(con).await {
        Err(e) if is_noscript(&e) => make(false).query_async(con).await,
        r => r,
    }
}

/// `KEYS[1]` = routes hash, `ARGV[1]` = device type, `ARGV[2]` = `1|<conn>|` (the prefix of the
/// encoded route that names the connection). Deletes the field only if it still names `conn`.
static REMOVE_ROUTE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"#,
    )
});

/// `KEYS[1]` = shard map, `ARGV` = vshard, node, expected epoch (decimal), claim token.
/// Values are `node:epoch:token`. Returns `{1, epoch}` on success, `{0, current}` when fenced.
/// A retry of a claim that was already applied (same token) returns its epoch again, so the
/// client's automatic retry after a lost reply does not turn a won claim into `Fenced`.
static CLAIM_SHARD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
local cur = '0'
if v then
  local a = string.find(v, ':', 1, true)
  if not a then return redis.error_reply('ERR corrupt shard entry ' .. v) end
  local b = string.find(v, ':', a + 1, true)
  if b then
    cur = string.sub(v, a + 1, b - 1)
    if string.sub(v, b + 1) == ARGV[4] then return {1, cur} end
  else
    cur = string.sub(v, a + 1)
  end
end
if cur ~= ARGV[3] then return {0, cur} end
local new = string.format('%d', tonumber(cur) + 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. new .. ':' .. ARGV[4])
return {1, new}
"#,
    )
});

/// `KEYS[1]` = shard map, `KEYS[2]` = `{shards}:acq:<node>`; `ARGV` = node, lease ms, token,
/// vshards… (see [`Directory::acquire_shards`]). Every other key is built from the node ids and
/// carries the `{shards}` hash tag, so it lives in the slot of `KEYS[1]`. Returns
/// `{1, incarnation, n, owner1, fence1, …, ownern, fencen, vshard1, epoch1, …}` on success,
/// `{0, holder, vshard}` when held. The result is kept under `KEYS[2]` with the token, so a
/// resend of an applied acquire returns it again instead of "held by itself".
static ACQUIRE_SHARDS: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local node = ARGV[1]
local prev = redis.call('GET', KEYS[2])
if prev then
  local sp = string.find(prev, ' ', 1, true)
  if sp and string.sub(prev, 1, sp - 1) == ARGV[3] then
    return cjson.decode(string.sub(prev, sp + 1))
  end
end
local function live(n) return redis.call('EXISTS', '{shards}:lease:' .. n) == 1 end
local function owner_of(v)
  local o, e = string.match(v, '^(%d+):(%d+)')
  if not o then return redis.error_reply('ERR corrupt shard entry ' .. v) end
  return o, tonumber(e)
end
if live(node) then return {0, tonumber(node), tonumber(ARGV[4] or '0')} end
for i = 4, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local o = owner_of(v)
    if type(o) == 'table' then return o end
    if o ~= node and live(o) and redis.call('SISMEMBER', '{shards}:set:' .. o, ARGV[i]) == 1 then
      return {0, tonumber(o), tonumber(ARGV[i])}
    end
  end
end
local inc = redis.call('INCR', '{shards}:inc:' .. node)
redis.call('SET', '{shards}:lease:' .. node, inc, 'PX', ARGV[2])
redis.call('DEL', '{shards}:set:' .. node)
local head = {1, inc}
local displaced = {}
local tail = {}
for i = 4, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  local epoch = 0
  if v then
    local o, e = owner_of(v)
    epoch = e
    if o ~= node and not live(o) and not displaced[o] then
      displaced[o] = redis.call('INCR', '{shards}:inc:' .. o)
      table.insert(head, tonumber(o))
      table.insert(head, displaced[o])
    end
  end
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], ARGV[i], node .. ':' .. epoch .. ':' .. ARGV[3])
  redis.call('SADD', '{shards}:set:' .. node, ARGV[i])
  table.insert(tail, tonumber(ARGV[i]))
  table.insert(tail, epoch)
end
local out = {1, inc, (#head - 2) / 2}
for i = 3, #head do table.insert(out, head[i]) end
for i = 1, #tail do table.insert(out, tail[i]) end
redis.call('SET', KEYS[2], ARGV[3] .. ' ' .. cjson.encode(out), 'PX', ARGV[2])
return out
"#,
    )
});

/// `KEYS[1]` = `{shards}:inc:<node>`, `KEYS[2]` = `{shards}:lease:<node>`; `ARGV` =
/// incarnation, lease ms. Returns `{1, inc}` when renewed, `{0, current}` when lost.
static RENEW_LEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local cur = redis.call('GET', KEYS[1]) or '0'
if cur ~= ARGV[1] then return {0, tonumber(cur)} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, tonumber(cur)}
"#,
    )
});

/// `KEYS[1]` = `{shards}:lease:<node>`; `ARGV[1]` = incarnation. Deletes the lease if it is
/// held by that incarnation.
static RELEASE_LEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"#,
    )
});

/// Current server time in Unix ms (shared prelude of the gate scripts).
const NOW_MS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// `KEYS` = live zset, info hash; `ARGV` = gate id, encoded info, ttl ms. Drops expired gates,
/// then registers this one until now + ttl (server clock).
static REGISTER_GATE: LazyLock<Lua> = LazyLock::new(|| {
    let src = format!(
        "{NOW_MS}{}",
        r#"
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"#
    );
    Lua::new(Box::leak(src.into_boxed_str()))
});

/// `KEYS` = live zset, info hash. Returns the encoded info of every gate not yet expired.
static LIVE_GATES: LazyLock<Lua> = LazyLock::new(|| {
    let src = format!(
        "{NOW_MS}{}",
        r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
"#
    );
    Lua::new(Box::leak(src.into_boxed_str()))
});

/// `1|<conn>|` — what [`REMOVE_ROUTE`] compares.
fn route_prefix(conn: u64) -> String {
    format!("1|{conn}|")
}

fn encode_route(r: &RouteEntry) -> String {
    format!(
        "{}{}|{}|{}|{}",
        route_prefix(r.conn),
        r.epoch,
        r.gate,
        r.core,
        r.device_id
    )
}

fn decode_route(field: &str, v: &str) -> Result<RouteEntry, DirectoryError> {
    let bad = || corrupt("route", v);
    let device_type: u8 = field.parse().map_err(|_| corrupt("route field", field))?;
    let mut it = v.splitn(6, '|');
    if it.next() != Some("1") {
        return Err(bad());
    }
    let mut num = || {
        it.next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(bad)
    };
    let conn = num()?;
    let epoch = num()?;
    let gate = u16::try_from(num()?).map_err(|_| bad())?;
    let core = u16::try_from(num()?).map_err(|_| bad())?;
    let device_id = it.next().ok_or_else(bad)?.to_owned();
    Ok(RouteEntry {
        device_type,
        device_id,
        gate,
        core,
        conn,
        epoch,
    })
}

/// `1|id|conns|<len of tcp_addr>|<tcp_addr><ws marker><ws_addr>`, ws marker `-` for none, `+`
/// for some: addresses may hold any character.
fn encode_gate(g: &GateInfo) -> String {
    let ws = match &g.ws_addr {
        Some(w) => format!("+{w}"),
        None => "-".to_owned(),
    };
    format!(
        "1|{}|{}|{}|{}{}",
        g.id,
        g.conns,
        g.tcp_addr.len(),
        g.tcp_addr,
        ws
    )
}

fn decode_gate(v: &str) -> Result<GateInfo, DirectoryError> {
    let bad = || corrupt("gate", v);
    let mut it = v.splitn(5, '|');
    if it.next() != Some("1") {
        return Err(bad());
    }
    let id = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let conns = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let len: usize = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let rest = it.next().ok_or_else(bad)?;
    let tcp_addr = rest.get(..len).ok_or_else(bad)?.to_owned();
    let ws_addr = match rest.get(len..) {
        Some("-") => None,
        Some(w) if w.starts_with('+') => Some(w[1..].to_owned()),
        _ => return Err(bad()),
    };
    Ok(GateInfo {
        id,
        tcp_addr,
        ws_addr,
        conns,
    })
}

/// `node:epoch[:token]`.
fn decode_shard(v: &str) -> Result<(u16, u64), DirectoryError> {
    let mut it = v.split(':');
    let node = it.next().and_then(|s| s.parse().ok());
    let epoch = it.next().and_then(|s| s.parse().ok());
    node.zip(epoch).ok_or_else(|| corrupt("shard", v))
}

/// A token that identifies one claim (not one node): distinct across processes and calls.
fn claim_token() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

fn ttl(secs: u64) -> u64 {
    secs.max(1)
}

impl Directory for RedisDirectory {
    async fn set_route(&self, uid: UserId, route: RouteEntry) -> Result<(), DirectoryError> {
        let key = routes_key(uid);
        // A plain pipeline, not MULTI: the cluster client follows MOVED/ASK for the commands of a
        // pipeline but not inside a transaction. Both commands are idempotent, so the client's
        // retry of the whole pipeline is safe.
        redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg(route.device_type)
            .arg(encode_route(&route))
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(DEFAULT_ROUTE_TTL_SECS)
            .arg("NX")
            .ignore()
            .exec_async(&mut self.con.clone())
            .await
            .map_err(map_err)
    }

    async fn routes(&self, uid: UserId) -> Result<Vec<RouteEntry>, DirectoryError> {
        let raw: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(routes_key(uid))
            .query_async(&mut self.con.clone())
            .await
            .map_err(map_err)?;
        let mut out = raw
            .iter()
            .map(|(f, v)| decode_route(f, v))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|r| r.device_type);
        Ok(out)
    }

    async fn remove_route(
        &self,
        uid: UserId,
        device_type: u8,
        conn: u64,
    ) -> Result<bool, DirectoryError> {
        let key = routes_key(uid);
        let prefix = route_prefix(conn);
        let deleted: i64 = eval(&mut self.con.clone(), |sha| {
            let mut c = REMOVE_ROUTE.cmd(sha, &[&key]);
            c.arg(device_type).arg(&prefix);
            c
        })
        .await
        .map_err(map_err)?;
        Ok(deleted == 1)
    }

    async fn touch_presence(&self, uid: UserId, ttl_secs: u64) -> Result<(), DirectoryError> {
        let ttl = ttl(ttl_secs);
        // Plain pipeline of idempotent commands (see `set_route`).
        redis::pipe()
            .cmd("SET")
            .arg(presence_key(uid))
            .arg(1)
            .arg("EX")
            .arg(ttl)
            .ignore()
            .cmd("EXPIRE")
            .arg(routes_key(uid))
            .arg(ttl)
            .ignore()
            .exec_async(&mut self.con.clone())
            .await
            .map_err(map_err)
    }

    async fn is_online(&self, uid: UserId) -> Result<bool, DirectoryError> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(presence_key(uid))
            .query_async(&mut self.con.clone())
            .await
            .map_err(map_err)?;
        Ok(n == 1)
    }

    async fn register_gate(&self, gate: GateInfo, ttl_secs: u64) -> Result<(), DirectoryError> {
        let enc = encode_gate(&gate);
        let ttl_ms = ttl(ttl_secs).saturating_mul(1000);
        let _: i64 = eval(&mut self.con.clone(), |sha| {
            let mut c = REGISTER_GATE.cmd(sha, &[GATES_LIVE, GATES_INFO]);
            c.arg(gate.id).arg(&enc).arg(ttl_ms);
            c
        })
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn gates(&self) -> Result<Vec<GateInfo>, DirectoryError> {
        let raw: Vec<Option<String>> = eval(&mut self.con.clone(), |sha| {
            LIVE_GATES.cmd(sha, &[GATES_LIVE, GATES_INFO])
        })
        .await
        .map_err(map_err)?;
        // A live id without info cannot happen (both are written by one script); skip it.
        let mut out = raw
            .iter()
            .flatten()
            .map(|v| decode_gate(v))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|g| g.id);
        Ok(out)
    }

    async fn shard_owner(&self, vshard: ShardId) -> Result<Option<(u16, u64)>, DirectoryError> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(SHARDS)
            .arg(vshard.0)
            .query_async(&mut self.con.clone())
            .await
            .map_err(map_err)?;
        raw.as_deref().map(decode_shard).transpose()
    }

    async fn claim_shard(
        &self,
        vshard: ShardId,
        node: u16,
        expected_epoch: u64,
    ) -> Result<u64, DirectoryError> {
        let token = claim_token();
        let expected = expected_epoch.to_string();
        let ((won, epoch), replicated): ((i64, String), bool) = self
            .eval_replicated("claim", |sha| {
                let mut c = CLAIM_SHARD.cmd(sha, &[SHARDS]);
                c.arg(vshard.0).arg(node).arg(&expected).arg(&token);
                c
            })
            .await?;
        let epoch: u64 = epoch.parse().map_err(|_| corrupt("shard epoch", &epoch))?;
        if won != 1 {
            return Err(DirectoryError::Fenced { current: epoch });
        }
        if !replicated {
            tracing::warn!(
                vshard = vshard.0,
                node,
                epoch,
                "shard claim not yet on a replica; a failover now could lose it"
            );
        }
        Ok(epoch)
    }

    async fn shard_map(&self) -> Result<Vec<(ShardId, u16, u64)>, DirectoryError> {
        let raw: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(SHARDS)
            .query_async(&mut self.con.clone())
            .await
            .map_err(map_err)?;
        let mut out = raw
            .iter()
            .map(|(f, v)| {
                let s: u16 = f.parse().map_err(|_| corrupt("shard field", f))?;
                let (node, epoch) = decode_shard(v)?;
                Ok((ShardId(s), node, epoch))
            })
            .collect::<Result<Vec<_>, DirectoryError>>()?;
        out.sort_by_key(|e| e.0);
        Ok(out)
    }

    async fn acquire_shards(
        &self,
        node: u16,
        shards: &[ShardId],
        lease_ms: u64,
    ) -> Result<Acquired, DirectoryError> {
        let token = claim_token();
        let acq_key = format!("{{shards}}:acq:{node}");
        let (out, replicated): (Vec<i64>, bool) = self
            .eval_replicated("acquire", |sha| {
                let mut c = ACQUIRE_SHARDS.cmd(sha, &[SHARDS, &acq_key]);
                c.arg(node).arg(lease_ms.max(1)).arg(&token);
                for s in shards {
                    c.arg(s.0);
                }
                c
            })
            .await?;
        let bad = || DirectoryError::Corrupt(format!("acquire reply {out:?}"));
        let num = |i: usize| out.get(i).copied().ok_or_else(bad);
        if num(0)? != 1 {
            return Err(DirectoryError::Held {
                node: u16::try_from(num(1)?).map_err(|_| bad())?,
                vshard: u16::try_from(num(2)?).map_err(|_| bad())?,
            });
        }
        let incarnation = u64::try_from(num(1)?).map_err(|_| bad())?;
        let n = usize::try_from(num(2)?).map_err(|_| bad())?;
        let mut displaced = Vec::with_capacity(n);
        for i in 0..n {
            let o = u16::try_from(num(3 + 2 * i)?).map_err(|_| bad())?;
            let f = u64::try_from(num(4 + 2 * i)?).map_err(|_| bad())?;
            displaced.push((o, f));
        }
        let rest = &out[3 + 2 * n..];
        if rest.len() != 2 * shards.len() {
            return Err(bad());
        }
        let epochs = rest
            .chunks(2)
            .map(|c| {
                Ok((
                    ShardId(u16::try_from(c[0]).map_err(|_| bad())?),
                    u64::try_from(c[1]).map_err(|_| bad())?,
                ))
            })
            .collect::<Result<Vec<_>, DirectoryError>>()?;
        if !replicated {
            tracing::warn!(
                node,
                incarnation,
                "shard acquisition not yet on a replica; a failover now could lose it"
            );
        }
        Ok(Acquired {
            incarnation,
            epochs,
            displaced,
        })
    }

    async fn renew_lease(
        &self,
        node: u16,
        incarnation: u64,
        lease_ms: u64,
    ) -> Result<(), DirectoryError> {
        let inc_key = format!("{{shards}}:inc:{node}");
        let lease_key = format!("{{shards}}:lease:{node}");
        let (ok, current): (i64, i64) = eval(&mut self.claim_con.clone(), |sha| {
            let mut c = RENEW_LEASE.cmd(sha, &[&inc_key, &lease_key]);
            c.arg(incarnation).arg(lease_ms.max(1));
            c
        })
        .await
        .map_err(map_err)?;
        if ok == 1 {
            Ok(())
        } else {
            Err(DirectoryError::LeaseLost {
                current: current.max(0) as u64,
            })
        }
    }

    async fn release_lease(&self, node: u16, incarnation: u64) -> Result<(), DirectoryError> {
        let lease_key = format!("{{shards}}:lease:{node}");
        let _: i64 = eval(&mut self.claim_con.clone(), |sha| {
            let mut c = RELEASE_LEASE.cmd(sha, &[&lease_key]);
            c.arg(incarnation);
            c
        })
        .await
        .map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_round_trip_with_separators_in_device_id() {
        let r = RouteEntry {
            device_type: 3,
            device_id: "pc|with:odd|chars".into(),
            gate: 65535,
            core: 7,
            conn: u64::MAX,
            epoch: 42,
        };
        let enc = encode_route(&r);
        assert!(enc.starts_with(&route_prefix(u64::MAX)));
        assert_eq!(decode_route("3", &enc).unwrap(), r);
        assert!(matches!(
            decode_route("3", "2|1|2|3|4|x"),
            Err(DirectoryError::Corrupt(_))
        ));
        assert!(decode_route("x", &enc).is_err());
        assert!(decode_route("3", "1|1|2|70000|4|x").is_err());
    }

    #[test]
    fn gate_round_trip() {
        for g in [
            GateInfo {
                id: 1,
                tcp_addr: "10.0.0.1:9000".into(),
                ws_addr: Some("ws://10.0.0.1:9001/|x".into()),
                conns: 12,
            },
            GateInfo {
                id: 2,
                tcp_addr: "[::1]:9000|+-".into(),
                ws_addr: None,
                conns: 0,
            },
            GateInfo {
                id: 3,
                tcp_addr: String::new(),
                ws_addr: Some(String::new()),
                conns: u64::MAX,
            },
        ] {
            assert_eq!(decode_gate(&encode_gate(&g)).unwrap(), g);
        }
        assert!(decode_gate("1|1|0|99|short-").is_err());
    }

    #[test]
    fn shard_values() {
        assert_eq!(decode_shard("7:3:abcd").unwrap(), (7, 3));
        assert_eq!(decode_shard("7:3").unwrap(), (7, 3));
        assert!(decode_shard("7").is_err());
        assert_ne!(claim_token(), claim_token());
    }
}
