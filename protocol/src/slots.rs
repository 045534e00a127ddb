//! Placement: keys to slots, slots to pairs.
//!
//! A key's *slot* is `key_hash(hash_tag(key)) % 16384` ([`slot_of`]); which pair holds a
//! slot is an explicit table ([`SlotMap`]), as in Redis Cluster. Jump hash, used before,
//! needs no table but can only add or remove the *last* pair; a
//! table turns any membership change (a pair added, any pair removed) into a list of slot
//! moves ([`SlotMap::moves_to`]), and a move is a unit that can be copied, tracked and
//! finished one at a time while clients go on. 16,384 slots: enough that 100 pairs differ
//! by at most 1% in their share, and a table of 32 KiB.
//!
//! The slot uses our own stable hash (not Redis' CRC16): every orchestrator and worker of
//! every build must agree, and the workers already compute it (see `hash`).

use crate::hash::{hash_tag, key_hash};

/// How many slots the key space has.
pub const SLOTS: usize = 16_384;

/// The slot of `key`, placed by its hash tag if it has one.
pub fn slot_of(key: &[u8]) -> u16 {
    (key_hash(hash_tag(key)) % SLOTS as u64) as u16
}

/// Which pair holds each slot, and the map's epoch (bumped on every change, so two maps can
/// be told apart in logs and by a later orchestrator sharing it).
#[derive(Clone)]
pub struct SlotMap {
    epoch: u64,
    owner: Box<[u16]>,
}

impl std::fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotMap(epoch {}, {})", self.epoch, self.describe())
    }
}

/// A run of slots, `start..end` (never empty, within [`SLOTS`]): what a move copies, and what
/// the map's description, the state file, the workers' `slots` op and the log name. Written `a-b` with
/// both ends included (as `SlotMap::describe` gives ranges); on the wire and in the state file
/// as two words, the start and the end past the last slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRange {
    start: u16,
    end: u16,
}

impl SlotRange {
    /// Slots `start..end`; `None` unless `start < end <= SLOTS`.
    pub fn new(start: u16, end: u16) -> Option<SlotRange> {
        (start < end && usize::from(end) <= SLOTS).then_some(SlotRange { start, end })
    }

    /// One slot.
    pub fn single(slot: u16) -> SlotRange {
        SlotRange::new(slot, slot + 1).expect("a slot is below SLOTS")
    }

    /// The two-word form, `<start> <end>` with `end` past the last slot.
    pub fn from_bounds(start: &str, end: &str) -> Result<SlotRange, String> {
        let bad = || format!("bad slot range {start:?} {end:?} (start, then end past the last)");
        let (s, e) = (
            start.parse().map_err(|_| bad())?,
            end.parse().map_err(|_| bad())?,
        );
        SlotRange::new(s, e).ok_or_else(bad)
    }

    /// The two-word form [`SlotRange::from_bounds`] reads.
    pub fn bounds(self) -> String {
        format!("{} {}", self.start, self.end)
    }

    /// The first slot.
    pub fn start(self) -> u16 {
        self.start
    }

    /// One past the last slot.
    pub fn end(self) -> u16 {
        self.end
    }

    pub fn len(self) -> usize {
        usize::from(self.end - self.start)
    }

    /// Always false: a range holds one slot at least.
    pub fn is_empty(self) -> bool {
        false
    }

    pub fn contains(self, slot: u16) -> bool {
        (self.start..self.end).contains(&slot)
    }

    /// Whether `key`'s slot is in the range.
    pub fn holds_key(self, key: &[u8]) -> bool {
        self.contains(slot_of(key))
    }

    pub fn overlaps(self, other: SlotRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The same range one slot longer (the caller checks it stays within [`SLOTS`]).
    fn grown(self) -> SlotRange {
        SlotRange::new(self.start, self.end + 1).expect("a range within SLOTS")
    }

    /// The slots as indices into a table of [`SLOTS`] entries.
    fn indices(self) -> std::ops::Range<usize> {
        usize::from(self.start)..usize::from(self.end)
    }
}

impl IntoIterator for SlotRange {
    type Item = u16;
    type IntoIter = std::ops::Range<u16>;

    fn into_iter(self) -> std::ops::Range<u16> {
        self.start..self.end
    }
}

/// `a-b`, both slots included.
impl std::fmt::Display for SlotRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end - 1)
    }
}

/// Reads the `a-b` form back (both slots included).
impl std::str::FromStr for SlotRange {
    type Err = String;

    fn from_str(text: &str) -> Result<SlotRange, String> {
        let bad = || {
            format!(
                "bad slot range {text:?} (first-last, from 0 to {})",
                SLOTS - 1
            )
        };
        let (first, last) = text.trim().split_once('-').ok_or_else(bad)?;
        let first: u16 = first.parse().map_err(|_| bad())?;
        let last: u16 = last.parse().map_err(|_| bad())?;
        last.checked_add(1)
            .and_then(|end| SlotRange::new(first, end))
            .ok_or_else(bad)
    }
}

/// Slots `slots` going from pair `from` to pair `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub slots: SlotRange,
    pub from: usize,
    pub to: usize,
}

/// How many slots each of `live` pairs should hold: an equal share, the remainder one each
/// to the first ones.
fn quotas(live: &[bool]) -> Vec<usize> {
    let n = live.iter().filter(|l| **l).count().max(1);
    let mut extra = SLOTS % n;
    live.iter()
        .map(|&l| {
            if !l {
                return 0;
            }
            let q = SLOTS / n + usize::from(extra > 0);
            extra = extra.saturating_sub(1);
            q
        })
        .collect()
}

impl SlotMap {
    /// The initial map for `pairs` pairs: contiguous ranges in pair order, sizes as
    /// [`SlotMap::rebalanced`] would give them, so rebalancing a fresh map moves nothing.
    ///
    /// # Panics
    /// If `pairs` is 0 or more than `u16::MAX`.
    pub fn even(pairs: usize) -> SlotMap {
        assert!(
            pairs > 0 && pairs <= usize::from(u16::MAX),
            "1 to 65535 pairs"
        );
        let mut owner = Vec::with_capacity(SLOTS);
        for (pair, q) in quotas(&vec![true; pairs]).into_iter().enumerate() {
            owner.extend(std::iter::repeat_n(pair as u16, q));
        }
        SlotMap {
            epoch: 1,
            owner: owner.into_boxed_slice(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The same map under epoch `epoch` (every change of the cluster map takes the next
    /// epoch, whether or not it moves a slot).
    pub fn with_epoch(mut self, epoch: u64) -> SlotMap {
        self.epoch = epoch;
        self
    }

    /// Whether both maps give every slot to the same pair (whatever their epochs).
    pub fn same_owners(&self, other: &SlotMap) -> bool {
        self.owner == other.owner
    }

    /// The pair that holds `slot`.
    pub fn pair_of_slot(&self, slot: u16) -> usize {
        usize::from(self.owner[usize::from(slot)])
    }

    /// The pair that holds `key`.
    pub fn pair_of(&self, key: &[u8]) -> usize {
        self.pair_of_slot(slot_of(key))
    }

    /// How many slots each of `pairs` pairs holds.
    pub fn counts(&self, pairs: usize) -> Vec<usize> {
        let mut counts = vec![0; pairs];
        for &o in self.owner.iter() {
            if let Some(c) = counts.get_mut(usize::from(o)) {
                *c += 1;
            }
        }
        counts
    }

    /// The map with each of `live` pairs holding its equal share and the others none, moving
    /// as few slots as possible: a pair over its share gives up its highest slots, and the
    /// pairs under theirs take them in pair order, lowest slot first (so moves come as
    /// contiguous runs). The epoch is one more.
    pub fn rebalanced(&self, live: &[bool]) -> SlotMap {
        let quota = quotas(live);
        let mut held = self.counts(live.len());
        let mut owner = self.owner.to_vec();
        let mut freed = Vec::new();
        for slot in (0..SLOTS).rev() {
            let o = usize::from(owner[slot]);
            // A slot naming no pair of `live` (cannot happen from our own maps) is freed too.
            if o >= live.len() || held[o] > quota[o] {
                if let Some(h) = held.get_mut(o) {
                    *h -= 1;
                }
                freed.push(slot);
            }
        }
        freed.sort_unstable();
        let mut freed = freed.into_iter();
        for (pair, q) in quota.iter().enumerate() {
            while held[pair] < *q {
                let Some(slot) = freed.next() else { break };
                owner[slot] = pair as u16;
                held[pair] += 1;
            }
        }
        SlotMap {
            epoch: self.epoch + 1,
            owner: owner.into_boxed_slice(),
        }
    }

    /// Gives `m`'s slots to `m.to`, with a new epoch.
    pub fn with_move(&self, m: &Move) -> SlotMap {
        let mut owner = self.owner.to_vec();
        for o in &mut owner[m.slots.indices()] {
            *o = m.to as u16;
        }
        SlotMap {
            epoch: self.epoch + 1,
            owner: owner.into_boxed_slice(),
        }
    }

    /// The same map with pair `gone` (which must hold no slot) taken out of the numbering:
    /// every later pair's index is one less.
    pub fn without_pair(&self, gone: usize) -> SlotMap {
        let owner = self
            .owner
            .iter()
            .map(|&o| if usize::from(o) > gone { o - 1 } else { o })
            .collect();
        SlotMap {
            epoch: self.epoch + 1,
            owner,
        }
    }

    /// The slot moves that turn this map into `target`: contiguous runs with one source and
    /// one destination, none longer than `batch` slots, in slot order.
    pub fn moves_to(&self, target: &SlotMap, batch: usize) -> Vec<Move> {
        let batch = batch.max(1);
        let mut moves: Vec<Move> = Vec::new();
        for slot in 0..SLOTS {
            let (from, to) = (self.owner[slot], target.owner[slot]);
            if from == to {
                continue;
            }
            let (from, to) = (usize::from(from), usize::from(to));
            match moves.last_mut() {
                Some(m)
                    if usize::from(m.slots.end()) == slot
                        && m.from == from
                        && m.to == to
                        && m.slots.len() < batch =>
                {
                    m.slots = m.slots.grown()
                }
                _ => moves.push(Move {
                    slots: SlotRange::single(slot as u16),
                    from,
                    to,
                }),
            }
        }
        moves
    }

    /// The map as ranges, `0-5460:0 5461-10922:1 ...` (inclusive bounds, pair after the
    /// colon), for INFO and the log.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        let mut start = 0;
        for slot in 1..=SLOTS {
            if slot == SLOTS || self.owner[slot] != self.owner[start] {
                let range = SlotRange::new(start as u16, slot as u16).expect("start < slot");
                out.push(format!("{range}:{}", self.owner[start]));
                start = slot;
            }
        }
        out.join(" ")
    }
}

impl SlotMap {
    /// Reads [`SlotMap::describe`]'s form back (with its epoch), for a map kept in a file:
    /// every slot covered once, in order, by one of `pairs` pairs.
    pub fn parse(epoch: u64, text: &str, pairs: usize) -> Result<SlotMap, String> {
        let mut owner = Vec::with_capacity(SLOTS);
        for word in text.split_ascii_whitespace() {
            let (range, pair) = word
                .split_once(':')
                .ok_or_else(|| format!("bad slot range {word:?} (first-last:pair)"))?;
            let range: SlotRange = range.parse()?;
            let pair: u16 = pair
                .parse()
                .ok()
                .filter(|p| usize::from(*p) < pairs)
                .ok_or_else(|| format!("{word:?}: pair {pair} is not one of {pairs}"))?;
            if usize::from(range.start()) != owner.len() {
                return Err(format!(
                    "{word:?}: ranges must follow each other from slot 0 (expected {} next)",
                    owner.len()
                ));
            }
            owner.extend(std::iter::repeat_n(pair, range.len()));
        }
        if owner.len() != SLOTS {
            return Err(format!("the ranges cover {} slots of {SLOTS}", owner.len()));
        }
        Ok(SlotMap {
            epoch,
            owner: owner.into_boxed_slice(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values: a key's slot must never change between builds, or keys would be
    /// looked for on the wrong pair after an upgrade.
    #[test]
    fn slots_are_stable_across_builds() {
        let golden: [(&[u8], u16); 4] = [
            (b"a", GOLDEN[0]),
            (b"user:42", GOLDEN[1]),
            (b"", GOLDEN[2]),
            (b"\x00\xff", GOLDEN[3]),
        ];
        for (key, slot) in golden {
            assert_eq!(slot_of(key), slot, "key {key:?}");
        }
        assert_eq!(slot_of(b"{user:42}:cart"), slot_of(b"user:42"));
    }

    /// `key_hash` % 16384 of the keys `hash::tests` has golden hashes for.
    const GOLDEN: [u16; 4] = [8440, 3124, 10395, 1147];

    #[test]
    fn the_initial_map_is_contiguous_ranges() {
        assert_eq!(SlotMap::even(1).describe(), "0-16383:0");
        assert_eq!(SlotMap::even(2).describe(), "0-8191:0 8192-16383:1");
        assert_eq!(
            SlotMap::even(3).describe(),
            "0-5461:0 5462-10922:1 10923-16383:2"
        );
        assert_eq!(SlotMap::even(3).epoch(), 1);
        for n in 1..40 {
            let map = SlotMap::even(n);
            assert_eq!(map.rebalanced(&vec![true; n]).owner, map.owner, "n={n}");
        }
    }

    #[test]
    fn adding_a_pair_moves_only_its_share_onto_it() {
        let two = SlotMap::even(2);
        let three = two.rebalanced(&[true, true, true]);
        assert_eq!(three.counts(3), vec![5462, 5461, 5461]);
        let moves = two.moves_to(&three, SLOTS);
        assert!(moves.iter().all(|m| m.to == 2));
        assert_eq!(moves.iter().map(|m| m.slots.len()).sum::<usize>(), 5461);
        // Each old pair gives up the top of its range: two contiguous runs.
        assert_eq!(
            moves,
            vec![
                Move {
                    slots: "5462-8191".parse().unwrap(),
                    from: 0,
                    to: 2
                },
                Move {
                    slots: "13653-16383".parse().unwrap(),
                    from: 1,
                    to: 2
                },
            ]
        );
        // Batches split the runs, never merge them.
        let batched = two.moves_to(&three, 1000);
        assert!(batched.iter().all(|m| m.slots.len() <= 1000));
        assert_eq!(batched.iter().map(|m| m.slots.len()).sum::<usize>(), 5461);
        assert_eq!(two.with_moves(&batched).owner, three.owner);
    }

    #[test]
    fn removing_any_pair_spreads_its_slots_over_the_others() {
        let three = SlotMap::even(3);
        for gone in 0..3 {
            let mut live = [true; 3];
            live[gone] = false;
            let target = three.rebalanced(&live);
            let counts = target.counts(3);
            assert_eq!(counts[gone], 0);
            assert_eq!(counts.iter().sum::<usize>(), SLOTS);
            assert!(
                counts.iter().filter(|c| **c > 0).all(|c| *c == 8192),
                "{counts:?}"
            );
            let moves = three.moves_to(&target, SLOTS);
            assert!(moves.iter().all(|m| m.from == gone && m.to != gone));
            let renumbered = target.without_pair(gone);
            assert_eq!(renumbered.counts(2), vec![8192, 8192]);
        }
    }

    #[test]
    fn a_described_map_parses_back() {
        let map = SlotMap::even(2).rebalanced(&[true; 3]);
        let back = SlotMap::parse(map.epoch(), &map.describe(), 3).unwrap();
        assert!(back.same_owners(&map));
        assert_eq!(back.epoch(), 2);
        assert!(
            SlotMap::parse(1, &map.describe(), 2).is_err(),
            "pair 2 of 2"
        );
        assert!(SlotMap::parse(1, "0-100:0", 1).is_err(), "not every slot");
        assert!(SlotMap::parse(1, "0-16383:0 5-6:0", 1).is_err(), "overlap");
        assert!(SlotMap::parse(1, "1-16383:0", 1).is_err(), "a gap");
        assert!(SlotMap::parse(1, "0-x:0", 1).is_err());
        assert_eq!(
            SlotMap::parse(1, "0-16383:0 ", 1).unwrap().describe(),
            "0-16383:0"
        );
    }

    #[test]
    fn slot_ranges_parse_print_and_contain_their_slots() {
        let r: SlotRange = "5-7".parse().unwrap();
        assert_eq!((r.start(), r.end(), r.len()), (5, 8, 3));
        assert_eq!(r.to_string(), "5-7");
        assert_eq!(r.into_iter().collect::<Vec<_>>(), [5, 6, 7]);
        assert!(!r.contains(4) && r.contains(5) && r.contains(7) && !r.contains(8));
        assert_eq!(SlotRange::from_bounds("5", "8"), Ok(r));
        assert_eq!(r.bounds(), "5 8");
        assert_eq!(" 0-16383 ".parse::<SlotRange>().unwrap().len(), SLOTS);
        assert_eq!(SlotRange::single(9).to_string(), "9-9");
        for bad in ["7-5", "0-16384", "5", "-5", "a-b", "5-", "65535-65535"] {
            assert!(bad.parse::<SlotRange>().is_err(), "{bad}");
        }
        for (start, end) in [("5", "5"), ("0", "16385"), ("x", "2"), ("-1", "2")] {
            assert!(SlotRange::from_bounds(start, end).is_err(), "{start} {end}");
        }
        let other = SlotRange::new(7, 10).unwrap();
        assert!(r.overlaps(other) && other.overlaps(r));
        assert!(!r.overlaps(SlotRange::new(8, 10).unwrap()));
        let key = b"user:42";
        assert!(SlotRange::single(slot_of(key)).holds_key(key));
        assert!(!SlotRange::single(slot_of(key) ^ 1).holds_key(key));
    }

    #[test]
    fn keys_spread_evenly_over_slots() {
        let map = SlotMap::even(4);
        let mut counts = [0usize; 4];
        for i in 0..80_000 {
            counts[map.pair_of(format!("k{i}").as_bytes())] += 1;
        }
        for c in counts {
            assert!((c as f64 / 80_000.0 - 0.25).abs() < 0.01, "{counts:?}");
        }
    }

    impl SlotMap {
        fn with_moves(&self, moves: &[Move]) -> SlotMap {
            moves.iter().fold(self.clone(), |m, mv| m.with_move(mv))
        }
    }
}
