//! The one hash that places a user: on a gate core and on a logic virtual shard.
//! Both sides must agree, so it lives here and never changes for a deployed cluster.

use crate::ids::{ShardId, UserId};

/// Number of virtual shards the user id space is split into. Virtual shards are mapped onto logic
/// workers / nodes; moving a virtual shard moves all of its users.
pub const VSHARDS: u16 = 1024;

/// SplitMix64 finaliser: cheap, stable across platforms and versions, and spreads sequential ids.
pub fn mix(uid: UserId) -> u64 {
    let mut z = uid.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Virtual shard owning `uid`.
pub fn vshard_of(uid: UserId) -> ShardId {
    ShardId((mix(uid) % VSHARDS as u64) as u16)
}

/// Gate core owning `uid` on a gate with `cores` cores (uses the high half of the hash so it is
/// independent of the virtual shard).
pub fn core_of(uid: UserId, cores: usize) -> usize {
    ((mix(uid) >> 32) % cores.max(1) as u64) as usize
}

/// Owner of a virtual shard when `owners` nodes/workers split the shards evenly (contiguous ranges).
pub fn owner_of_vshard(shard: ShardId, owners: usize) -> usize {
    let owners = owners.max(1);
    (shard.0 as usize * owners) / VSHARDS as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_evenly() {
        let mut cores = [0u32; 4];
        let mut owners = [0u32; 3];
        for u in 1..=100_000u64 {
            cores[core_of(UserId(u), 4)] += 1;
            owners[owner_of_vshard(vshard_of(UserId(u)), 3)] += 1;
        }
        for c in cores {
            assert!((23_000..27_000).contains(&c), "{cores:?}");
        }
        for o in owners {
            assert!((31_000..35_700).contains(&o), "{owners:?}");
        }
    }

    #[test]
    fn stable_values() {
        // Pinned: changing the hash would move every user of a running cluster.
        assert_eq!(vshard_of(UserId(1)).0, (mix(UserId(1)) % 1024) as u16);
        assert_eq!(mix(UserId(0)), 0xE220_A839_7B1D_CDAF);
        assert!(owner_of_vshard(ShardId(VSHARDS - 1), 5) < 5);
    }
}
