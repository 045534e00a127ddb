//! A hybrid logical clock: the version stamped on every write.
//!
//! Workers keep the write with the highest version, so versions must grow with real time
//! across orchestrators (wall-clock milliseconds in the high bits), never repeat or go back
//! within one orchestrator (a logical counter when the wall clock stalls or steps back), and
//! never tie between orchestrators (the orchestrator id in the low bits, unique among the
//! orchestrators of a cluster: see `health`'s node-id claims). The layout is in
//! [`twincache_protocol::version`]; stamps skip the counters workers take for
//! read-modify-writes that arrive behind a newer write (`version::bump`).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use twincache_protocol::version::{at_ms, wall_ms, COUNTER_SHIFT, STAMP_STEP};

#[cfg(test)]
use twincache_protocol::version::EPOCH_MS;

/// The low bits of a stamp: the orchestrator id and the counters left to workers' bumps.
const BELOW_STAMP: u64 = (STAMP_STEP << COUNTER_SHIFT) - 1;
const STEP: u64 = STAMP_STEP << COUNTER_SHIFT;
#[cfg(test)]
const NODE_MASK: u64 = 0xff;

#[derive(Debug)]
pub struct Hlc {
    last: AtomicU64,
    /// Changes only when another orchestrator turns out to hold the same id.
    node: AtomicU8,
}

impl Hlc {
    pub fn new(node: u8) -> Hlc {
        Hlc {
            last: AtomicU64::new(0),
            node: AtomicU8::new(node),
        }
    }

    pub fn node(&self) -> u8 {
        self.node.load(Ordering::Relaxed)
    }

    /// Takes another orchestrator id for the versions from now on.
    pub fn set_node(&self, node: u8) {
        self.node.store(node, Ordering::Relaxed);
    }

    /// Moves the clock past `version`, a version seen on a worker (the receive rule of a
    /// hybrid logical clock): the next version this clock returns is greater, so a
    /// read-modify-write refused for being behind a key succeeds on its retry.
    pub fn observe(&self, version: u64) {
        self.last.fetch_max(version, Ordering::Relaxed);
    }

    /// A version greater than every one this clock returned before.
    pub fn next(&self) -> u64 {
        self.next_at(wall_ms())
    }

    fn next_at(&self, now_ms: u64) -> u64 {
        let node = u64::from(self.node());
        let physical = at_ms(now_ms) | node;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = if physical > last {
                physical
            } else {
                ((last & !BELOW_STAMP) + STEP) | node
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
            assert_eq!(v & BELOW_STAMP, 3, "a stamp: no bump's counter, this id");
        }
    }

    #[test]
    fn observing_a_version_moves_the_clock_past_it() {
        let clock = Hlc::new(3);
        let ahead = Hlc::new(9).next_at(EPOCH_MS + 50_000);
        clock.observe(ahead);
        let next = clock.next_at(EPOCH_MS + 10_000);
        assert!(next > ahead);
        assert_eq!(next & NODE_MASK, 3);
        // A worker's bump is observed like any version, and the next stamp passes it.
        let bumped = twincache_protocol::version::bump(next, 9).unwrap();
        clock.observe(bumped);
        let after = clock.next_at(EPOCH_MS + 10_000);
        assert!(after > bumped);
        assert_eq!(after & BELOW_STAMP, 3);
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
