//! Hash maps for the hot paths: std's `HashMap` with foldhash instead of SipHash.
//!
//! SipHash was ~10 % of the single node's user-space instructions per c2c message (callgrind,
//! docs/BENCHMARKS.md): the store's per-commit write map, the worker's maps by user and by
//! connection, the gate's tables. foldhash's `RandomState` draws a seed per map from a
//! per-process random source, so keys a client chooses (`client_msg_id`, user ids) do not give it
//! a fixed set of colliding keys.

/// A `HashMap` with foldhash; make one with `FastMap::default()` or
/// `FastMap::with_capacity_and_hasher(n, Default::default())`.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` with foldhash.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
