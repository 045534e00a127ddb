//! A hybrid logical clock: the version stamped on every write.
//!
//! Workers keep the write with the highest version, so versions must grow with real time
//! across orchestrators (wall-clock milliseconds in the high bits), never repeat or go back
//! within one orchestrator (a logical counter when the wall clock stalls or steps back), and
//! never tie between orchestrators (the orchestrator id in the low bits).
//!
//! ```text
//! bit 63..20: milliseconds since 2025-01-01 (44 bits: good for 557 years)
//! bit 19..8 : logical counter (12 bits; overflow carries into the milliseconds)
//! bit  7..0 : orchestrator id
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2025-01-01T00:00:00Z in Unix milliseconds.
const EPOCH_MS: u64 = 1_735_689_600_000;
const MS_SHIFT: u32 = 20;
const COUNTER_ONE: u64 = 1 << 8;
const NODE_MASK: u64 = 0xff;

#[derive(Debug)]
pub struct Hlc {
    last: AtomicU64,
    node: u8,
}

impl Hlc {
    pub fn new(node: u8) -> Hlc {
        Hlc {
            last: AtomicU64::new(0),
            node,
        }
    }

    /// A version greater than every one this clock returned before.
    pub fn next(&self) -> u64 {
        self.next_at(wall_ms())
    }

    fn next_at(&self, now_ms: u64) -> u64 {
        let physical = (now_ms.saturating_sub(EPOCH_MS) << MS_SHIFT) | u64::from(self.node);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = if physical > last {
                physical
            } else {
                ((last & !NODE_MASK) + COUNTER_ONE) | u64::from(self.node)
            };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(current) => last = current,
            }
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(EPOCH_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_even_if_the_wall_clock_steps_back() {
        let clock = Hlc::new(3);
        let a = clock.next_at(EPOCH_MS + 10_000);
        let b = clock.next_at(EPOCH_MS + 10_000);
        let c = clock.next_at(EPOCH_MS + 5_000);
        let d = clock.next_at(EPOCH_MS + 20_000);
        assert!(a < b && b < c && c < d);
        for v in [a, b, c, d] {
            assert_eq!(v & NODE_MASK, 3);
        }
    }

    #[test]
    fn later_wall_time_wins_across_orchestrators() {
        let x = Hlc::new(200).next_at(EPOCH_MS + 1_000);
        let y = Hlc::new(1).next_at(EPOCH_MS + 1_001);
        assert!(y > x);
        let same_ms_a = Hlc::new(1).next_at(EPOCH_MS + 1_000);
        assert_ne!(x, same_ms_a, "the orchestrator id breaks ties");
    }

    #[test]
    fn concurrent_callers_never_share_a_version() {
        let clock = std::sync::Arc::new(Hlc::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| c.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
