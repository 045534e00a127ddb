//! The layout of write versions, shared by the orchestrator (which stamps them) and the
//! workers (which compare them with wall-clock horizons, e.g. how far back their deletes are
//! remembered).
//!
//! ```text
//! bit 63..20: milliseconds since 2025-01-01 (44 bits: good for 557 years)
//! bit 19..8 : logical counter (12 bits; overflow carries into the milliseconds)
//! bit  7..0 : orchestrator id
//! ```
//!
//! Orchestrators stamp only counters that are multiples of [`STAMP_STEP`]: the seven
//! counters after each stamp are left to the workers, which take one when a
//! read-modify-write arrives behind a newer write of its key ([`bump`]) instead of sending
//! it back to be stamped again. A bump is newer than the write it follows and older than
//! every stamp after it, so it never collides with a stamp and never overtakes a write the
//! same orchestrator stamped later (a pipelined `INCR k` then `SET k v` still ends with `v`).

use std::time::{SystemTime, UNIX_EPOCH};

/// 2025-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_735_689_600_000;
/// Where the milliseconds start.
pub const MS_SHIFT: u32 = 20;

/// Counters between two orchestrator stamps, in counter units (bits 19..8).
pub const STAMP_STEP: u64 = 8;
/// Where the logical counter starts.
pub const COUNTER_SHIFT: u32 = 8;

/// The version a worker gives a read-modify-write that arrived behind `held` (the newest
/// version its keys hold) from orchestrator `node`: the next counter after `held`, if that
/// is not a stamp's. `None` past seven bumps in a row: the orchestrator stamps it again.
pub fn bump(held: u64, node: u8) -> Option<u64> {
    let counter = (held >> COUNTER_SHIFT).checked_add(1)?;
    (counter % STAMP_STEP != 0).then_some((counter << COUNTER_SHIFT) | u64::from(node))
}

/// The smallest version stamped at or after Unix time `ms`: every write made before `ms` has
/// a smaller version.
pub fn at_ms(ms: u64) -> u64 {
    ms.saturating_sub(EPOCH_MS) << MS_SHIFT
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(EPOCH_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_like_time() {
        assert_eq!(at_ms(0), 0);
        assert_eq!(at_ms(EPOCH_MS), 0);
        assert_eq!(at_ms(EPOCH_MS + 1), 1 << MS_SHIFT);
        assert!(at_ms(EPOCH_MS + 10) < at_ms(EPOCH_MS + 11));
        assert_eq!((at_ms(EPOCH_MS + 7) >> COUNTER_SHIFT) % STAMP_STEP, 0);
    }

    #[test]
    fn bumps_fall_between_stamps() {
        let stamp = at_ms(EPOCH_MS + 5) | 3; // orchestrator 3's stamp
        let next_stamp = stamp + (STAMP_STEP << COUNTER_SHIFT);
        let mut held = stamp;
        for _ in 1..STAMP_STEP {
            let v = bump(held, 9).expect("room left");
            assert!(
                v > held && v < next_stamp,
                "{v:x} between {held:x} and {next_stamp:x}"
            );
            assert_eq!(
                v & 0xff,
                9,
                "the requester's id keeps bumps of two orchestrators apart"
            );
            held = v;
        }
        assert_eq!(bump(held, 9), None, "the next counter is a stamp's");
        assert_eq!(bump(u64::MAX, 1), None);
    }
}
