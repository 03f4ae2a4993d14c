//! A coarse timing wheel (one-second slots) for per-connection deadlines.
//!
//! A connection is filed once under its current deadline. Activity only updates the
//! connection's `last_active`; when the slot comes due the owner re-checks the real deadline
//! and files the connection again if it moved (lazy re-insertion), so the hot path does no
//! timer work and an idle connection costs 8 bytes in one slot. Keys carry a generation so that an entry
//! superseded by a later filing is recognised and dropped.

/// Slots of one second each; deadlines further out are re-filed when their slot comes up.
const SLOTS: usize = 128;

#[derive(Debug)]
pub struct Wheel {
    slots: Vec<Vec<u64>>,
    /// The second whose slot fires next.
    now: u32,
}

impl Wheel {
    pub fn new(now: u32) -> Wheel {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            now,
        }
    }

    /// Files `key` to come due at second `at` (or at the wheel's horizon if further out).
    pub fn insert(&mut self, key: u64, at: u32) {
        let at = at.clamp(self.now, self.now + SLOTS as u32 - 1);
        self.slots[at as usize % SLOTS].push(key);
    }

    /// Advances to second `now`, handing every key whose slot passed to `due`.
    pub fn advance(&mut self, now: u32, mut due: impl FnMut(u64)) {
        while self.now <= now {
            let slot = std::mem::take(&mut self.slots[self.now as usize % SLOTS]);
            self.now += 1;
            for k in slot {
                due(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_deadline_and_refiles_far_ones() {
        let mut w = Wheel::new(0);
        w.insert(1, 5);
        w.insert(2, 1000);
        let mut got = vec![];
        w.advance(4, |k| got.push(k));
        assert!(got.is_empty());
        w.advance(5, |k| got.push(k));
        assert_eq!(got, vec![1]);
        got.clear();
        // Key 2 was clamped to the horizon: it comes up early and the owner re-files it.
        w.advance(200, |k| got.push(k));
        assert_eq!(got, vec![2]);
    }

    #[test]
    fn past_deadlines_fire_on_next_advance() {
        let mut w = Wheel::new(10);
        w.insert(7, 3);
        let mut got = vec![];
        w.advance(10, |k| got.push(k));
        assert_eq!(got, vec![7]);
    }
}
