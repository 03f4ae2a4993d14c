//! Time-ordered unique message ids: `ms since 2024-01-01 : 42 | generator : 10 | counter : 12`.

use crate::MsgId;

/// One generator per worker; ids from distinct generators never collide.
#[derive(Debug)]
pub struct MsgIdGen {
    node: u64,
    last_ms: u64,
    counter: u64,
}

impl MsgIdGen {
    pub fn new(node: u16) -> Self {
        MsgIdGen {
            node: u64::from(node) & ((1 << MsgId::NODE_BITS) - 1),
            last_ms: 0,
            counter: 0,
        }
    }

    /// The generator's time (ms since [`MsgId::EPOCH_MS`]) of the last id it issued (or of the
    /// floor it was raised to).
    pub fn last_ms(&self) -> u64 {
        self.last_ms
    }

    /// Every later id will be above every id of generator time `floor_ms` (ms since
    /// [`MsgId::EPOCH_MS`]): a restart resumes above the floor its predecessor reserved in the
    /// store, whatever the wall clock says now.
    pub fn raise_to(&mut self, floor_ms: u64) {
        if floor_ms >= self.last_ms {
            self.last_ms = floor_ms;
            // The next id at or below `floor_ms` moves on to `floor_ms + 1`.
            self.counter = (1 << MsgId::COUNTER_BITS) - 1;
        }
    }

    /// Next id at wall-clock `now_ms` (Unix ms). Strictly increasing even if the clock stalls or
    /// steps back: the generator then borrows from the future millisecond.
    pub fn next(&mut self, now_ms: u64) -> MsgId {
        let ms = now_ms.saturating_sub(MsgId::EPOCH_MS);
        if ms > self.last_ms {
            self.last_ms = ms;
            self.counter = 0;
        } else {
            self.counter += 1;
            if self.counter >= 1 << MsgId::COUNTER_BITS {
                self.last_ms += 1;
                self.counter = 0;
            }
        }
        MsgId(
            (self.last_ms << (MsgId::COUNTER_BITS + MsgId::NODE_BITS))
                | (self.node << MsgId::COUNTER_BITS)
                | self.counter,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increasing_across_stalls_and_steps_back() {
        let mut g = MsgIdGen::new(3);
        let t = MsgId::EPOCH_MS + 1_000;
        let mut last = MsgId(0);
        for i in 0..10_000u64 {
            // Clock stalls, then steps back.
            let now = if i < 5000 { t } else { t - 10 };
            let id = g.next(now);
            assert!(id > last);
            last = id;
        }
        assert!(last.timestamp_ms() >= t);
        let mut other = MsgIdGen::new(4);
        assert_ne!(other.next(t), MsgIdGen::new(3).next(t));
    }

    #[test]
    fn a_raised_generator_issues_ids_above_the_floor_even_with_an_older_clock() {
        let t = MsgId::EPOCH_MS + 1_000_000;
        let mut before = MsgIdGen::new(3);
        let mut last = MsgId(0);
        for _ in 0..5_000 {
            last = before.next(t);
        }
        // A restart with the clock a minute behind, resumed from the reserved floor.
        let mut after = MsgIdGen::new(3);
        after.raise_to(before.last_ms());
        let first = after.next(t - 60_000);
        assert!(first > last, "{first:?} <= {last:?}");
        assert_eq!(first.timestamp_ms(), before.last_ms() + MsgId::EPOCH_MS + 1);
        // Raising to an older floor changes nothing.
        let mut g = MsgIdGen::new(1);
        let a = g.next(t);
        g.raise_to(10);
        assert!(g.next(t) > a);
    }
}
