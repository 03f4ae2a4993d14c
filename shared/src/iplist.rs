//! The client side of the iplist (docs/API.md, "iplist: how clients find a gate"): the order of
//! the gates for a user and the wait before each reconnect attempt. The API serves the list with
//! this order; clients (the SDK, the loadgen) that compute it themselves use the same functions.

use crate::UserId;

fn mix64(mut z: u64) -> u64 {
    // The splitmix64 finalizer: a bijection with full avalanche.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rendezvous weight of gate `gate` for user `uid`:
/// `mix64(mix64(uid) ^ mix64(gate + 0x9e3779b97f4a7c15))` with `mix64` the splitmix64 finalizer.
/// A user's gates are ordered by decreasing weight, ties by gate id.
pub fn rendezvous_weight(uid: UserId, gate: u16) -> u64 {
    mix64(mix64(uid.0) ^ mix64((gate as u64).wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The wait before reconnect attempt `attempt` (0-based) in milliseconds:
/// `min(max_ms, initial_ms * multiplier^attempt)`, multiplied by `1 - jitter + 2 * jitter * unit`
/// where `unit` is a uniformly random number in `[0, 1)` (so the factor is uniform in
/// `[1 - jitter, 1 + jitter]`). `jitter` is clamped to `[0, 1]`.
pub fn reconnect_wait_ms(
    initial_ms: u64,
    max_ms: u64,
    multiplier: f64,
    jitter: f64,
    attempt: u32,
    unit: f64,
) -> u64 {
    let base = (initial_ms as f64 * multiplier.max(1.0).powi(attempt.min(64) as i32))
        .min(max_ms as f64)
        .max(0.0);
    let j = jitter.clamp(0.0, 1.0);
    (base * (1.0 - j + 2.0 * j * unit.clamp(0.0, 1.0))).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_by_the_multiplier_up_to_the_cap_within_the_jitter() {
        // No jitter: 500, 1000, 2000, ... capped at 30 000.
        let w: Vec<u64> = (0..8)
            .map(|n| reconnect_wait_ms(500, 30_000, 2.0, 0.0, n, 0.7))
            .collect();
        assert_eq!(w, [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
        // ±50 %: the extremes of the random unit give the bounds of the range.
        assert_eq!(reconnect_wait_ms(500, 30_000, 2.0, 0.5, 1, 0.0), 500);
        assert_eq!(reconnect_wait_ms(500, 30_000, 2.0, 0.5, 1, 1.0), 1500);
        assert_eq!(reconnect_wait_ms(500, 30_000, 2.0, 0.5, 1, 0.5), 1000);
        // Huge attempt numbers neither overflow nor pass the cap.
        assert_eq!(
            reconnect_wait_ms(500, 30_000, 2.0, 0.0, u32::MAX, 0.0),
            30_000
        );
    }

    #[test]
    fn the_weight_is_the_documented_formula() {
        // The value the API and every client must agree on (docs/API.md).
        let w = rendezvous_weight(UserId(42), 1);
        assert_eq!(
            w,
            mix64(mix64(42) ^ mix64(1u64.wrapping_add(0x9e37_79b9_7f4a_7c15)))
        );
        assert_ne!(
            rendezvous_weight(UserId(42), 1),
            rendezvous_weight(UserId(42), 2)
        );
    }
}
