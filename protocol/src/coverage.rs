//! What the two workers of a pair know of each other's writes, as they report it in
//! `status` (the worker's `sync` module has the whole story).
//!
//! A worker counts the writes it took alone (`solo`: its partner was down or stale, or failed
//! to take them), and remembers its partner's boot id and count as of its last refill from it
//! (its *coverage*). The orchestrator compares the two to tell whether a worker lacks
//! acknowledged writes, even after the orchestrator itself restarted.

/// How much of its partner's writes a worker holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coverage {
    /// The partner's boot id at this worker's last refill from it (0: never).
    pub partner_boot: u64,
    /// The partner's count of writes taken alone at that refill.
    pub partner_solo: u64,
    /// False when this worker may lack older data of the partner's (it was promoted to
    /// serve alone without a complete copy).
    pub complete: bool,
}

impl Coverage {
    /// As written in `status`: `<boot hex>:<solo>:<complete 0|1>`.
    pub fn parse(text: &str) -> Option<Coverage> {
        let mut parts = text.split(':');
        let partner_boot = u64::from_str_radix(parts.next()?, 16).ok()?;
        let partner_solo = parts.next()?.parse().ok()?;
        let complete = parts.next()? == "1";
        Some(Coverage {
            partner_boot,
            partner_solo,
            complete,
        })
    }

    /// Whether a worker with this coverage lacks writes its partner (with `boot` and `solo`)
    /// took alone.
    pub fn lacks_solo(&self, boot: u64, solo: u64) -> bool {
        if self.partner_boot == boot {
            self.partner_solo < solo
        } else {
            // The partner restarted since (or was never refilled from): what it took before
            // is gone with its memory; what it took alone since, this worker lacks.
            solo > 0
        }
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:016x}:{}:{}",
            self.partner_boot,
            self.partner_solo,
            u8::from(self.complete)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_compares() {
        let c = Coverage {
            partner_boot: 0xab,
            partner_solo: 3,
            complete: true,
        };
        assert_eq!(c.to_string(), "00000000000000ab:3:1");
        assert_eq!(Coverage::parse(&c.to_string()), Some(c));
        assert_eq!(Coverage::parse("zz:1:1"), None);
        assert!(!c.lacks_solo(0xab, 3));
        assert!(c.lacks_solo(0xab, 4));
        assert!(
            !c.lacks_solo(0xcd, 0),
            "a restarted partner that took nothing alone"
        );
        assert!(c.lacks_solo(0xcd, 1));
    }
}
