//! The iplist: which gates a client should try, in which order.
//!
//! Gates are ordered per user by rendezvous (highest-random-weight) hashing: every `(uid, gate)`
//! pair gets a pseudo-random weight and the user's list is sorted by decreasing weight. So users
//! spread evenly over the gates, a user's order is the same on every logic node and every call,
//! and when a gate disappears only its users move, spread evenly over the others (each to their
//! next gate), while everybody else keeps their first choice.

use std::sync::Arc;
use std::time::Duration;

use im_shared::UserId;

use im_directory::GateInfo;

/// How long a gate list read from Redis is served before it is read again.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(1);
/// When Redis fails, a list read at most this long ago is still served.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const STALE_MAX: Duration = Duration::from_secs(10);
/// After a failed Redis read, requests within this pause do not try again (they get the stale
/// list or an error at once).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const RETRY_PAUSE: Duration = Duration::from_millis(500);

pub use im_shared::iplist::rendezvous_weight;

/// Sorts `gates` into `uid`'s order: decreasing [`rendezvous_weight`], ties by gate id.
pub fn order_gates(uid: UserId, gates: &mut [GateInfo]) {
    gates.sort_by_cached_key(|g| (std::cmp::Reverse(rendezvous_weight(uid, g.id)), g.id));
}

/// Why no gate list could be produced.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum GatesError {
    /// The gate registry could not be read (and no recent list is cached).
    Unavailable(RegistryError),
}

/// Why the gate registry could not be read.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error("connecting to Redis timed out")]
    ConnectTimeout,
    #[error("reading the gate registry timed out")]
    ReadTimeout,
    /// A read failed less than `RETRY_PAUSE` ago: not tried again yet.
    #[error("the gate registry was unavailable moments ago")]
    RecentlyFailed,
    #[cfg(feature = "redis")]
    #[error(transparent)]
    Directory(#[from] im_directory::DirectoryError),
}

/// The configured gate source.
pub(crate) enum Gates {
    Static(Arc<Vec<GateInfo>>),
    #[cfg(feature = "redis")]
    Redis(redis_source::RedisGates),
}

impl Gates {
    pub(crate) fn new(source: super::GateSource) -> std::io::Result<Gates> {
        match source {
            super::GateSource::Static(g) => Ok(Gates::Static(Arc::new(g))),
            #[cfg(feature = "redis")]
            super::GateSource::Redis(nodes) => {
                if nodes.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "GateSource::Redis needs at least one seed node",
                    ));
                }
                Ok(Gates::Redis(redis_source::RedisGates::new(nodes)))
            }
            #[cfg(not(feature = "redis"))]
            super::GateSource::Redis(_) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "GateSource::Redis needs im-logic's `redis` feature",
            )),
        }
    }

    /// The live gates (unordered). `on_error` is called when the source failed (even if a stale
    /// list is served).
    pub(crate) async fn live(&self, on_error: impl Fn()) -> Result<Arc<Vec<GateInfo>>, GatesError> {
        match self {
            Gates::Static(g) => {
                let _ = &on_error;
                Ok(g.clone())
            }
            #[cfg(feature = "redis")]
            Gates::Redis(r) => r.live(on_error).await,
        }
    }
}

#[cfg(feature = "redis")]
mod redis_source {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{GatesError, RegistryError, CACHE_TTL, RETRY_PAUSE, STALE_MAX};
    use im_directory::{Directory, GateInfo, RedisDirectory, RedisDirectoryConfig};

    /// The Redis gate registry, connected lazily on the API runtime, with a short cache.
    pub(crate) struct RedisGates {
        nodes: Vec<String>,
        state: tokio::sync::Mutex<State>,
    }

    #[derive(Default)]
    struct State {
        dir: Option<RedisDirectory>,
        cached: Option<(Instant, Arc<Vec<GateInfo>>)>,
        failed_at: Option<Instant>,
    }

    impl RedisGates {
        pub(crate) fn new(nodes: Vec<String>) -> RedisGates {
            RedisGates {
                nodes,
                state: tokio::sync::Mutex::new(State::default()),
            }
        }

        pub(crate) async fn live(
            &self,
            on_error: impl Fn(),
        ) -> Result<Arc<Vec<GateInfo>>, GatesError> {
            // One reader at a time: requests arriving during a read wait for its result.
            let mut st = self.state.lock().await;
            if let Some((at, gates)) = &st.cached {
                if at.elapsed() < CACHE_TTL {
                    return Ok(gates.clone());
                }
            }
            if st.failed_at.is_some_and(|t| t.elapsed() < RETRY_PAUSE) {
                on_error();
                return stale(&st, RegistryError::RecentlyFailed);
            }
            match self.read(&mut st).await {
                Ok(gates) => {
                    let gates = Arc::new(gates);
                    st.cached = Some((Instant::now(), gates.clone()));
                    st.failed_at = None;
                    Ok(gates)
                }
                Err(e) => {
                    on_error();
                    tracing::warn!("api: iplist: cannot read the gate registry: {e}");
                    st.failed_at = Some(Instant::now());
                    stale(&st, e)
                }
            }
        }

        async fn read(&self, st: &mut State) -> Result<Vec<GateInfo>, RegistryError> {
            // Bounds one read, so that an iplist request never hangs on a failing Redis.
            const LIMIT: Duration = Duration::from_secs(2);
            const CONNECT_LIMIT: Duration = Duration::from_secs(3);
            if st.dir.is_none() {
                let mut cfg = RedisDirectoryConfig::new(self.nodes.iter().cloned());
                cfg.overall_timeout = LIMIT;
                cfg.retries = 5;
                let dir = tokio::time::timeout(CONNECT_LIMIT, RedisDirectory::connect_with(cfg))
                    .await
                    .map_err(|_| RegistryError::ConnectTimeout)??;
                st.dir = Some(dir);
            }
            let dir = st.dir.as_ref().expect("connected above");
            tokio::time::timeout(LIMIT, dir.gates())
                .await
                .map_err(|_| RegistryError::ReadTimeout)?
                .map_err(RegistryError::from)
        }
    }

    fn stale(st: &State, error: RegistryError) -> Result<Arc<Vec<GateInfo>>, GatesError> {
        match &st.cached {
            Some((at, gates)) if at.elapsed() < STALE_MAX => Ok(gates.clone()),
            _ => Err(GatesError::Unavailable(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(id: u16) -> GateInfo {
        GateInfo {
            id,
            tcp_addr: format!("10.0.0.{id}:7000"),
            ws_addr: None,
            conns: 0,
        }
    }

    #[test]
    fn order_is_a_permutation_and_deterministic() {
        let gates: Vec<GateInfo> = (1..=5).map(gate).collect();
        for uid in 1..200 {
            let mut a = gates.clone();
            let mut b: Vec<GateInfo> = gates.iter().rev().cloned().collect();
            order_gates(UserId(uid), &mut a);
            order_gates(UserId(uid), &mut b);
            assert_eq!(a, b);
            let mut ids: Vec<u16> = a.iter().map(|g| g.id).collect();
            ids.sort();
            assert_eq!(ids, [1, 2, 3, 4, 5]);
        }
    }
}
