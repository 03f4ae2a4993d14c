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

/// An `IndexMap` with foldhash: entries in one dense array, a hash table of 8-byte indices into
/// it. Where a map holds many large values (the logic worker's users), a hash table right after
/// it doubles is half empty, and its empty slots cost the value's size each; here they cost 9
/// bytes. Remove with `swap_remove` (O(1)); iteration order is not meaningful.
pub type FastIndexMap<K, V> = indexmap::IndexMap<K, V, foldhash::fast::RandomState>;
