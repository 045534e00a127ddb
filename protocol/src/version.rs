//! The layout of write versions, shared by the orchestrator (which stamps them) and the
//! workers (which compare them with wall-clock horizons, e.g. how far back their deletes are
//! remembered).
//!
//! ```text
//! bit 63..20: milliseconds since 2025-01-01 (44 bits: good for 557 years)
//! bit 19..8 : logical counter (12 bits; overflow carries into the milliseconds)
//! bit  7..0 : orchestrator id
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

/// 2025-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_735_689_600_000;
/// Where the milliseconds start.
pub const MS_SHIFT: u32 = 20;

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
    }
}
