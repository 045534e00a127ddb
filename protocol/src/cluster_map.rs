//! The cluster map: the pairs (their workers' addresses, in pairing order), which pair holds
//! each slot, the move under way, and the pairs a change is making. One text form serves the
//! orchestrator's state file and the copy every worker keeps (`map` op), so a starting or
//! lagging orchestrator can read the map from any worker, and a worker can refuse a request
//! for a slot its pair does not hold ([`Holding`]).
//!
//! Every change of the map (a move begun or finished, a pair added, removed or a worker
//! replaced) bumps its epoch, so of two maps the one with the higher epoch is the newer.

use crate::slots::{slot_of, Move, SlotMap, SlotRange, SLOTS};

/// The whole map (see the module docs).
#[derive(Debug, Clone)]
pub struct ClusterMap {
    /// The workers in pairing order: (0, 1) are pair 0, (2, 3) pair 1, ...
    pub workers: Vec<String>,
    pub slots: SlotMap,
    pub moving: Option<Move>,
    /// The workers a change under way is making of the pairs (`want` lines), in pairing
    /// order; empty when the map is what is wanted.
    pub wanted: Vec<String>,
}

impl ClusterMap {
    pub fn epoch(&self) -> u64 {
        self.slots.epoch()
    }

    pub fn pairs(&self) -> usize {
        self.workers.len() / 2
    }

    /// The pair `addr` is a worker of.
    pub fn pair_of_worker(&self, addr: &str) -> Option<usize> {
        self.workers.iter().position(|w| w == addr).map(|i| i / 2)
    }

    /// The text form ([`ClusterMap::parse`] reads it back).
    pub fn text(&self) -> String {
        let mut text = String::from(
            "# twincache cluster map: the pairs and the slot map, rewritten on every change\n",
        );
        text += &format!("epoch {}\n", self.epoch());
        for p in self.workers.chunks(2) {
            text += &format!("pair {} {}\n", p[0], p[1]);
        }
        text += &format!("slots {}\n", self.slots.describe());
        if let Some(m) = self.moving {
            text += &format!("moving {} {} {}\n", m.slots.bounds(), m.from, m.to);
        }
        for p in self.wanted.chunks(2) {
            text += &format!("want {} {}\n", p[0], p[1]);
        }
        text
    }

    /// Reads [`ClusterMap::text`]'s form, hand edits included (blank lines, `#` comments,
    /// indentation); an error names the line.
    pub fn parse(text: &str) -> Result<ClusterMap, String> {
        let (mut epoch, mut workers, mut slots, mut moving, mut wanted) =
            (1, Vec::new(), None, None, Vec::new());
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at_line = |e: String| format!("line {n}: {e}");
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            let number = |w: &str| {
                w.parse::<u64>()
                    .map_err(|_| at_line(format!("`{w}` is not a number")))
            };
            match words.as_slice() {
                ["epoch", e] => epoch = number(e)?,
                ["pair", a, b] => workers.extend([a.to_string(), b.to_string()]),
                ["want", a, b] => wanted.extend([a.to_string(), b.to_string()]),
                ["slots", ranges @ ..] => slots = Some((n, ranges.join(" "))),
                ["moving", start, end, from, to] => {
                    let m = Move {
                        slots: SlotRange::from_bounds(start, end).map_err(at_line)?,
                        from: number(from)? as usize,
                        to: number(to)? as usize,
                    };
                    moving = Some((n, m));
                }
                _ => {
                    return Err(at_line(format!(
                        "expected `epoch N`, `pair ADDR ADDR`, `slots RANGES`, `moving START \
                         END FROM TO` or `want ADDR ADDR`; got {line:?}"
                    )))
                }
            }
        }
        let pairs = workers.len() / 2;
        if pairs == 0 {
            return Err("no `pair` line".into());
        }
        let (n, ranges) = slots.ok_or("no `slots` line")?;
        let slots = SlotMap::parse(epoch, &ranges, pairs).map_err(|e| format!("line {n}: {e}"))?;
        if let Some((n, m)) = moving {
            if m.from >= pairs || m.to >= pairs || slots.pair_of_slot(m.slots.start()) != m.to {
                return Err(format!(
                    "line {n}: the move under way does not fit the map ({pairs} pairs)"
                ));
            }
        }
        Ok(ClusterMap {
            workers,
            slots,
            moving: moving.map(|(_, m)| m),
            wanted,
        })
    }
}

/// What one worker may serve under a map: the slots its pair holds, and those it is giving
/// up (the move under way from its pair), which only an orchestrator that knows of the move
/// may still read and delete ([`crate::frame::flags::MOVING_SOURCE`]). A request for any
/// other slot was routed by an older map; the worker refuses it with
/// [`crate::Status::Moved`] and its epoch, and the orchestrator reads the newer map.
#[derive(Debug, Clone)]
pub struct Holding {
    epoch: u64,
    pair: usize,
    held: Box<[u64]>,
    leaving: Option<SlotRange>,
}

impl Holding {
    /// What pair `pair` of `map` holds (nothing, for a pair past the map's: a worker
    /// that is in no pair).
    pub fn of(map: &ClusterMap, pair: usize) -> Holding {
        let mut held = vec![0u64; SLOTS / 64].into_boxed_slice();
        for slot in 0..SLOTS {
            if map.slots.pair_of_slot(slot as u16) == pair {
                held[slot / 64] |= 1 << (slot % 64);
            }
        }
        Holding {
            epoch: map.epoch(),
            pair,
            held,
            leaving: map.moving.filter(|m| m.from == pair).map(|m| m.slots),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn pair(&self) -> usize {
        self.pair
    }

    /// Whether every slot is this pair's and none is leaving it (one pair): then every key
    /// is admitted, and the check need not hash it.
    pub fn holds_every_slot(&self) -> bool {
        self.leaving.is_none() && self.held.iter().all(|w| *w == u64::MAX)
    }

    /// Whether a request for `key` may be served: its slot is this pair's, or it is being
    /// moved away and the request comes from an orchestrator that knows (`moving_source`).
    pub fn admits(&self, key: &[u8], moving_source: bool) -> bool {
        let slot = slot_of(key);
        let s = usize::from(slot);
        self.held[s / 64] & (1 << (s % 64)) != 0
            || (moving_source && self.leaving.is_some_and(|r| r.contains(slot)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ClusterMap {
        let slots = SlotMap::even(2).rebalanced(&[true; 3]);
        let m = slots.moves_to(&slots.rebalanced(&[true, false, true]), 100)[0];
        ClusterMap {
            workers: ["a:1", "b:1", "c:1", "d:1", "e:1", "f:1"]
                .map(String::from)
                .to_vec(),
            slots: slots.with_move(&m),
            moving: Some(m),
            wanted: ["a:1", "b:1", "e:1", "f:1"].map(String::from).to_vec(),
        }
    }

    #[test]
    fn a_map_reads_back_what_was_written() {
        let kept = map();
        let back = ClusterMap::parse(&kept.text()).unwrap();
        assert_eq!(back.workers, kept.workers);
        assert!(back.slots.same_owners(&kept.slots));
        assert_eq!(back.epoch(), kept.epoch());
        assert_eq!(back.moving, kept.moving);
        assert_eq!(back.wanted, kept.wanted);
        assert_eq!(back.text(), kept.text());
        // Lines as a hand edit may leave them: indented, with blank lines and comments.
        let indented: String = kept
            .text()
            .lines()
            .map(|l| format!("  {l}\t\n\n   # a note\n"))
            .collect();
        let back = ClusterMap::parse(&indented).unwrap();
        assert!(back.slots.same_owners(&kept.slots));
        assert_eq!(back.moving, kept.moving);
    }

    #[test]
    fn errors_name_the_line() {
        let text = map().text();
        let err = |from: &str, to: &str| ClusterMap::parse(&text.replace(from, to)).unwrap_err();
        // Line 1 is the comment, 2 the epoch, 3-5 the pairs, 6 the map, 7 the move.
        assert!(err("epoch 3", "epoch x").starts_with("line 2: `x` is not a number"));
        assert!(err("pair a:1 b:1", "pair a:1").starts_with("line 3: expected"));
        let e = err("slots 0-", "slots 0-x ");
        assert!(e.starts_with("line 6: bad slot range \"0-x\""), "{e}");
        let e = err("slots 0-", "slots 1-");
        assert!(
            e.starts_with("line 6: ") && e.contains("from slot 0"),
            "{e}"
        );
        let e = err(":2 ", ":7 ");
        assert!(
            e.starts_with("line 6: ") && e.contains("pair 7 is not one of 3"),
            "{e}"
        );
        let m = map().moving.unwrap();
        let moving = format!("moving {} {} {}", m.slots.bounds(), m.from, m.to);
        let e = err(&moving, "moving 5 5 0 2");
        assert!(e.starts_with("line 7: bad slot range"), "{e}");
        let e = err(
            &moving,
            &format!("moving {} {} {}", m.slots.bounds(), m.to, m.from),
        );
        assert!(
            e.starts_with("line 7: the move under way does not fit"),
            "{e}"
        );
        assert_eq!(
            ClusterMap::parse("epoch 1\n").unwrap_err(),
            "no `pair` line"
        );
        assert_eq!(
            ClusterMap::parse("pair a:1 b:1\n").unwrap_err(),
            "no `slots` line"
        );
    }

    #[test]
    fn a_worker_admits_its_slots_and_the_leaving_ones_only_from_those_who_know() {
        let map = map();
        let m = map.moving.unwrap();
        let key_in = |pair: usize| {
            (0u32..)
                .map(|i| format!("k{i}").into_bytes())
                .find(|k| map.slots.pair_of(k) == pair && !m.slots.holds_key(k))
                .unwrap()
        };
        let leaving = (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| m.slots.holds_key(k))
            .unwrap();
        let (from, to) = (Holding::of(&map, m.from), Holding::of(&map, m.to));
        assert_eq!(from.epoch(), map.epoch());
        for pair in 0..3 {
            let h = Holding::of(&map, pair);
            for other in 0..3 {
                assert_eq!(h.admits(&key_in(other), false), pair == other);
            }
        }
        assert!(to.admits(&leaving, false), "the new pair takes its writes");
        assert!(
            !from.admits(&leaving, false),
            "an old map's request is refused"
        );
        assert!(
            from.admits(&leaving, true),
            "reads and deletes of the move are not"
        );
        assert!(!Holding::of(&map, 3 - m.from - m.to).admits(&leaving, true));
    }
}
