//! [`MemoryDirectory`]: the in-process directory of a single-node deployment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use im_shared::{ShardId, UserId};

use super::{Acquired, Directory, DirectoryError, GateInfo, RouteEntry, DEFAULT_ROUTE_TTL_SECS};

/// Independently locked partitions of the per-user maps.
const PARTS: usize = 64;

/// The directory of one process: the same semantics as the Redis one (TTLs, compare-and-delete,
/// fenced shard claims), kept in memory and lost on restart. Clones share the state.
#[derive(Clone, Default)]
pub struct MemoryDirectory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDirectory").finish_non_exhaustive()
    }
}

struct Inner {
    users: [Mutex<Users>; PARTS],
    gates: Mutex<HashMap<u16, (GateInfo, Instant)>>,
    shards: Mutex<BTreeMap<u16, (u16, u64)>>,
    leases: Mutex<Leases>,
}

#[derive(Default)]
struct Leases {
    /// node → newest incarnation.
    incs: HashMap<u16, u64>,
    /// node → (incarnation, expiry).
    lease: HashMap<u16, (u64, Instant)>,
    /// node → shards its newest incarnation acquired.
    sets: HashMap<u16, BTreeSet<u16>>,
}

impl Leases {
    fn live(&self, node: u16, now: Instant) -> bool {
        self.lease.get(&node).is_some_and(|&(_, exp)| exp > now)
    }
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            users: std::array::from_fn(|_| Mutex::default()),
            gates: Mutex::default(),
            shards: Mutex::default(),
            leases: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct Users {
    routes: HashMap<UserId, Routes>,
    presence: HashMap<UserId, Instant>,
    /// Writes since the last sweep of expired entries.
    writes: usize,
}

struct Routes {
    by_type: BTreeMap<u8, RouteEntry>,
    expires: Instant,
}

impl Users {
    /// Drops expired entries once the writes since the last sweep reach the map sizes, so the
    /// sweep costs O(1) amortised per write and memory stays bounded by the live users.
    fn maybe_sweep(&mut self, now: Instant) {
        self.writes += 1;
        if self.writes < 64 || self.writes < self.routes.len() + self.presence.len() {
            return;
        }
        self.writes = 0;
        self.routes.retain(|_, r| r.expires > now);
        self.presence.retain(|_, e| *e > now);
    }

    fn live_routes(&mut self, uid: UserId, now: Instant) -> Option<&mut Routes> {
        if self.routes.get(&uid).is_some_and(|r| r.expires <= now) {
            self.routes.remove(&uid);
        }
        self.routes.get_mut(&uid)
    }
}

fn ttl(secs: u64) -> Duration {
    Duration::from_secs(secs.max(1))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way that matters
    // more than losing the process, so a poisoned lock is used as is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    fn users(&self, uid: UserId) -> MutexGuard<'_, Users> {
        // Fibonacci hashing spreads sequential uids over the partitions.
        let h = uid.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        lock(&self.inner.users[h as usize % PARTS])
    }
}

impl Directory for MemoryDirectory {
    async fn set_route(&self, uid: UserId, route: RouteEntry) -> Result<(), DirectoryError> {
        let now = Instant::now();
        let mut users = self.users(uid);
        users.maybe_sweep(now);
        match users.live_routes(uid, now) {
            Some(r) => {
                r.by_type.insert(route.device_type, route);
            }
            None => {
                let by_type = BTreeMap::from([(route.device_type, route)]);
                let expires = now + ttl(DEFAULT_ROUTE_TTL_SECS);
                users.routes.insert(uid, Routes { by_type, expires });
            }
        }
        Ok(())
    }

    async fn routes(&self, uid: UserId) -> Result<Vec<RouteEntry>, DirectoryError> {
        let mut users = self.users(uid);
        Ok(users
            .live_routes(uid, Instant::now())
            .map(|r| r.by_type.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn remove_route(
        &self,
        uid: UserId,
        device_type: u8,
        conn: u64,
    ) -> Result<bool, DirectoryError> {
        let mut users = self.users(uid);
        let Some(r) = users.live_routes(uid, Instant::now()) else {
            return Ok(false);
        };
        if r.by_type.get(&device_type).is_none_or(|e| e.conn != conn) {
            return Ok(false);
        }
        r.by_type.remove(&device_type);
        if r.by_type.is_empty() {
            users.routes.remove(&uid);
        }
        Ok(true)
    }

    async fn touch_presence(&self, uid: UserId, ttl_secs: u64) -> Result<(), DirectoryError> {
        let now = Instant::now();
        let expires = now + ttl(ttl_secs);
        let mut users = self.users(uid);
        users.maybe_sweep(now);
        users.presence.insert(uid, expires);
        if let Some(r) = users.live_routes(uid, now) {
            r.expires = expires;
        }
        Ok(())
    }

    async fn is_online(&self, uid: UserId) -> Result<bool, DirectoryError> {
        let users = self.users(uid);
        Ok(users
            .presence
            .get(&uid)
            .is_some_and(|&e| e > Instant::now()))
    }

    async fn register_gate(&self, gate: GateInfo, ttl_secs: u64) -> Result<(), DirectoryError> {
        let now = Instant::now();
        let mut gates = lock(&self.inner.gates);
        gates.retain(|_, (_, e)| *e > now);
        gates.insert(gate.id, (gate, now + ttl(ttl_secs)));
        Ok(())
    }

    async fn gates(&self) -> Result<Vec<GateInfo>, DirectoryError> {
        let now = Instant::now();
        let gates = lock(&self.inner.gates);
        let mut live: Vec<GateInfo> = gates
            .values()
            .filter(|(_, e)| *e > now)
            .map(|(g, _)| g.clone())
            .collect();
        live.sort_by_key(|g| g.id);
        Ok(live)
    }

    async fn shard_owner(&self, vshard: ShardId) -> Result<Option<(u16, u64)>, DirectoryError> {
        Ok(lock(&self.inner.shards).get(&vshard.0).copied())
    }

    async fn claim_shard(
        &self,
        vshard: ShardId,
        node: u16,
        expected_epoch: u64,
    ) -> Result<u64, DirectoryError> {
        let mut shards = lock(&self.inner.shards);
        let current = shards.get(&vshard.0).map_or(0, |&(_, e)| e);
        if current != expected_epoch {
            return Err(DirectoryError::Fenced { current });
        }
        let epoch = current + 1;
        shards.insert(vshard.0, (node, epoch));
        Ok(epoch)
    }

    async fn shard_map(&self) -> Result<Vec<(ShardId, u16, u64)>, DirectoryError> {
        Ok(lock(&self.inner.shards)
            .iter()
            .map(|(&s, &(node, epoch))| (ShardId(s), node, epoch))
            .collect())
    }

    async fn acquire_shards(
        &self,
        node: u16,
        shards: &[ShardId],
        lease_ms: u64,
    ) -> Result<Acquired, DirectoryError> {
        // Lock order: shards, then leases (the only place that takes both).
        let mut map = lock(&self.inner.shards);
        let mut l = lock(&self.inner.leases);
        let now = Instant::now();
        if l.live(node, now) {
            return Err(DirectoryError::Held {
                vshard: shards.first().map_or(0, |s| s.0),
                node,
            });
        }
        for s in shards {
            if let Some(&(owner, _)) = map.get(&s.0) {
                if owner != node
                    && l.live(owner, now)
                    && l.sets.get(&owner).is_some_and(|set| set.contains(&s.0))
                {
                    return Err(DirectoryError::Held {
                        vshard: s.0,
                        node: owner,
                    });
                }
            }
        }
        let inc = {
            let c = l.incs.entry(node).or_insert(0);
            *c += 1;
            *c
        };
        l.lease
            .insert(node, (inc, now + Duration::from_millis(lease_ms.max(1))));
        l.sets.insert(node, shards.iter().map(|s| s.0).collect());
        let mut displaced: Vec<(u16, u64)> = Vec::new();
        let mut epochs = Vec::with_capacity(shards.len());
        for s in shards {
            let (owner, epoch) = map.get(&s.0).copied().unwrap_or((node, 0));
            if owner != node && !l.live(owner, now) && !displaced.iter().any(|d| d.0 == owner) {
                let c = l.incs.entry(owner).or_insert(0);
                *c += 1;
                displaced.push((owner, *c));
            }
            map.insert(s.0, (node, epoch + 1));
            epochs.push((*s, epoch + 1));
        }
        Ok(Acquired {
            incarnation: inc,
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
        let mut l = lock(&self.inner.leases);
        let current = l.incs.get(&node).copied().unwrap_or(0);
        if current != incarnation {
            return Err(DirectoryError::LeaseLost { current });
        }
        let exp = Instant::now() + Duration::from_millis(lease_ms.max(1));
        l.lease.insert(node, (incarnation, exp));
        Ok(())
    }

    async fn release_lease(&self, node: u16, incarnation: u64) -> Result<(), DirectoryError> {
        let mut l = lock(&self.inner.leases);
        if l.lease
            .get(&node)
            .is_some_and(|&(inc, _)| inc == incarnation)
        {
            l.lease.remove(&node);
        }
        Ok(())
    }
}
