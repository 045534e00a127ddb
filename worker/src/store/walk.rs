//! Walking the whole store: SCAN's cursor, RANDOMKEY, and FLUSHALL.
//!
//! ## The SCAN cursor
//! A cursor names a shard, a bucket of that shard's table, and the shard's *generation*
//! when the cursor was made:
//!
//! ```text
//! cursor = 0 (start) | 1 + (shard:6 << 44 | generation:16 << 28 | bucket:28)   (below 2^50)
//! ```
//!
//! A hashbrown table never moves an entry while it keeps its size: an insert fills an empty
//! bucket, a removal empties one. It moves them all when it grows (or rehashes in place to
//! clear deleted markers), and only inside `reserve`, which the store calls through
//! `Shard::before_growth`; that bumps the generation. So while the generation is unchanged, a
//! key present since the walk began sits in the same bucket, before or after the cursor,
//! and is returned exactly once. When it changed, the walk starts that shard again from its
//! first bucket: keys may then come twice, but none present for the whole walk is missed,
//! which is Redis' promise. Shards already walked are not affected (a key's shard never
//! changes). The generation starts at a random value per shard and worker, so a cursor
//! given to another worker (the partner, after a failover) or to this one after a restart
//! restarts its shard rather than resume at a meaningless bucket (a 1-in-65,536 chance of a
//! false match remains; the orchestrator also restarts a pair's walk when it changes
//! workers, see its `commands::keyspace`).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use twincache_protocol::glob;
use twincache_protocol::program::Kind;

use super::{now_ms, Entry, Store, SHARDS};

const BUCKET_BITS: u32 = 28;
const GENERATION_BITS: u32 = 16;
/// Keys looked at per call at most, whatever COUNT asks: one call holds one shard's lock for
/// at most this many buckets (ten per key asked for, as Redis visits at most ten empty
/// buckets per key asked for).
pub const MAX_COUNT: u32 = 10_000;
/// Bytes of keys one call returns at most.
const MAX_KEY_BYTES: usize = 4 << 20;

/// One step of a walk: the keys found and where to go on from (0: done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanStep {
    pub next: u64,
    pub keys: Vec<Bytes>,
}

fn encode_cursor(shard: usize, generation: u32, bucket: usize) -> u64 {
    let generation = u64::from(generation) & ((1 << GENERATION_BITS) - 1);
    1 + (((shard as u64) << (GENERATION_BITS + BUCKET_BITS))
        | (generation << BUCKET_BITS)
        | bucket as u64)
}

/// (shard, generation, bucket) of a cursor; the start for 0 or a cursor out of range.
fn decode_cursor(cursor: u64) -> Option<(usize, u32, usize)> {
    let c = cursor.checked_sub(1)?;
    let shard = (c >> (GENERATION_BITS + BUCKET_BITS)) as usize;
    if shard >= SHARDS {
        return None;
    }
    let generation = ((c >> BUCKET_BITS) & ((1 << GENERATION_BITS) - 1)) as u32;
    let bucket = (c & ((1 << BUCKET_BITS) - 1)) as usize;
    Some((shard, generation, bucket))
}

/// How long one call looks at keys at most when it matches them against a pattern: a
/// hostile pattern makes each match cost, and the walk holds a shard's lock and keeps the
/// worker's other requests waiting meanwhile (past `--worker-timeout`, both workers of the
/// pair were taken for down). The call returns what it found so far and where to go on.
pub(crate) const STEP_TIME: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a walk returns `e`.
fn wanted(e: &Entry, now: u64, kind: Option<Kind>, pattern: Option<&glob::Pattern>) -> bool {
    e.live(now) && kind.is_none_or(|k| e.kind() == k) && pattern.is_none_or(|p| p.matches(e.key()))
}

/// A flushed store's old entries, freed when dropped (in the background for FLUSHALL ASYNC).
pub struct Flushed(Vec<Vec<Entry>>);

impl Flushed {
    pub fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store {
    /// One step of a walk from `cursor`, looking at about `count` keys (see the module docs).
    pub fn scan(
        &self,
        cursor: u64,
        count: u32,
        kind: Option<Kind>,
        pattern: Option<&[u8]>,
    ) -> ScanStep {
        let count = count.clamp(1, MAX_COUNT) as usize;
        let now = now_ms();
        let pattern = pattern.map(glob::Pattern::new);
        let started = std::time::Instant::now();
        let (mut shard, mut generation, mut bucket) = match decode_cursor(cursor) {
            Some((s, g, b)) => (s, Some(g), b),
            None => (0, None, 0),
        };
        let mut keys = Vec::new();
        let (mut steps, mut bytes) = (0, 0);
        while shard < SHARDS {
            let guard = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
            let current = guard.generation & ((1 << GENERATION_BITS) - 1);
            if generation.take().is_some_and(|g| g != current) {
                bucket = 0; // the table moved its entries: walk this shard again
            }
            let buckets = guard.table.num_buckets().min(1 << BUCKET_BITS);
            while bucket < buckets {
                let entry = guard.table.get_bucket(bucket);
                if let Some(e) = entry {
                    if wanted(e, now, kind, pattern.as_ref()) {
                        bytes += e.key_len();
                        keys.push(Bytes::copy_from_slice(e.key()));
                    }
                }
                bucket += 1;
                steps += 1;
                // The clock after every key matched, not every bucket: only matching makes a
                // key cost (one against a hostile pattern may take milliseconds).
                let out_of_time =
                    pattern.is_some() && entry.is_some() && started.elapsed() >= STEP_TIME;
                if keys.len() >= count
                    || steps >= 10 * count
                    || bytes >= MAX_KEY_BYTES
                    || out_of_time
                {
                    let next = if bucket < buckets {
                        encode_cursor(shard, current, bucket)
                    } else if shard + 1 < SHARDS {
                        start_of(shard + 1)
                    } else {
                        0
                    };
                    return ScanStep { next, keys };
                }
            }
            shard += 1;
            bucket = 0;
        }
        ScanStep { next: 0, keys }
    }

    /// A random live key, if there is one: from a random shard holding keys and a random
    /// bucket on. Not uniform (a key after a run of empty buckets is likelier), as Redis'
    /// own is not.
    pub fn random_key(&self) -> Option<Bytes> {
        let now = now_ms();
        let first = rand::random::<u32>() as usize % SHARDS;
        for i in 0..SHARDS {
            let shard = self.shards[(first + i) % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if shard.usage.keys == 0 {
                continue;
            }
            let buckets = shard.table.num_buckets();
            let start = rand::random::<u32>() as usize % buckets.max(1);
            for b in (start..buckets).chain(0..start) {
                if let Some(e) = shard.table.get_bucket(b).filter(|e| e.live(now)) {
                    return Some(Bytes::copy_from_slice(e.key()));
                }
            }
        }
        None
    }

    /// The version of the last flush (0: none).
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// FLUSHALL at `version`: from now on nothing older is held or taken, and every entry
    /// older (values and tombstones: the flush stands for all of them) is removed now. A
    /// write newer than the flush that got here first stays. Returns the removed entries,
    /// for the caller to free (freeing, not finding, is what takes time on a big store).
    pub fn flush(&self, version: u64) -> Flushed {
        let floor = self.floor.fetch_max(version, Ordering::AcqRel).max(version);
        self.take_older(floor)
    }

    /// Removes every entry (values and tombstones) older than `version`, shard by shard,
    /// without leaving tombstones; returns them, to be freed outside the locks.
    pub(super) fn take_older(&self, version: u64) -> Flushed {
        Flushed(
            (0..SHARDS)
                .map(|n| self.take_where(n, |e| e.version() < version))
                .collect(),
        )
    }
}

/// The cursor that starts shard `shard`: bucket 0, so whatever the generation it names,
/// the walk of that shard starts at its beginning.
fn start_of(shard: usize) -> u64 {
    encode_cursor(shard, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SetOptions;
    use std::collections::HashSet;

    fn walk(s: &Store, count: u32, pattern: Option<&[u8]>) -> Vec<Bytes> {
        let mut cursor = 0;
        let mut keys = Vec::new();
        loop {
            let step = s.scan(cursor, count, None, pattern);
            keys.extend(step.keys);
            if step.next == 0 {
                return keys;
            }
            cursor = step.next;
        }
    }

    #[test]
    fn cursors_round_trip_and_never_read_as_the_start() {
        for (shard, generation, bucket) in [(0, 0, 0), (63, 65535, (1 << 28) - 1), (5, 7, 9)] {
            let c = encode_cursor(shard, generation, bucket);
            assert_ne!(c, 0);
            assert_eq!(decode_cursor(c), Some((shard, generation, bucket)));
        }
        assert_eq!(decode_cursor(0), None);
        assert_eq!(
            decode_cursor(u64::MAX),
            None,
            "a shard out of range starts over"
        );
    }

    /// A pattern that makes every key cost (a run of 1,000 literals after a `*`, against
    /// keys of 1,000 bytes: about half a million steps a key) ends the call at its time
    /// budget, with what it found and a cursor to go on from; the walk still ends whole.
    #[test]
    fn a_costly_pattern_ends_a_call_at_its_time_budget() {
        let s = Store::default();
        let long = "a".repeat(1000);
        for i in 0..200 {
            s.set(
                format!("{long}{i}").as_bytes(),
                b"v",
                1,
                SetOptions::default(),
            )
            .unwrap();
        }
        let pattern = format!("*{long}1*");
        let started = std::time::Instant::now();
        let step = s.scan(0, 10_000, None, Some(pattern.as_bytes()));
        let took = started.elapsed();
        assert_ne!(step.next, 0, "stopped early ({took:?})");
        assert!(took < 5 * STEP_TIME, "{took:?}");
        let keys = walk(&s, 10_000, Some(pattern.as_bytes()));
        assert_eq!(keys.len(), 1 + 10 + 100, "1, 10-19, 100-199");
    }

    #[test]
    fn a_walk_returns_every_key_once_and_filters() {
        let s = Store::default();
        for i in 0..2000 {
            s.set(format!("k:{i}").as_bytes(), b"v", 1, SetOptions::default())
                .unwrap();
        }
        s.del(b"k:7", 2);
        for count in [1, 10, 1000] {
            let keys = walk(&s, count, None);
            let unique: HashSet<_> = keys.iter().collect();
            assert_eq!(keys.len(), 1999, "count {count}");
            assert_eq!(unique.len(), 1999);
        }
        let some = walk(&s, 100, Some(b"k:1??"));
        assert_eq!(some.len(), 100);
        assert_eq!(
            s.scan(0, 10, Some(Kind::Hash), None).keys,
            Vec::<Bytes>::new()
        );
    }

    /// Keys present for the whole walk are returned even while other keys are added (the
    /// tables grow: their shards are walked again) and removed.
    #[test]
    fn a_walk_under_writes_misses_no_key_present_throughout() {
        let s = Store::default();
        for i in 0..500 {
            s.set(
                format!("old:{i}").as_bytes(),
                b"v",
                1,
                SetOptions::default(),
            )
            .unwrap();
        }
        let mut cursor = 0;
        let mut seen = HashSet::new();
        let mut n = 0;
        loop {
            let step = s.scan(cursor, 5, None, None);
            seen.extend(step.keys);
            for _ in 0..50 {
                s.set(
                    format!("new:{n}").as_bytes(),
                    b"v",
                    1,
                    SetOptions::default(),
                )
                .unwrap();
                if n % 3 == 0 {
                    s.del(format!("new:{}", n / 2).as_bytes(), 2);
                }
                n += 1;
            }
            if step.next == 0 {
                break;
            }
            cursor = step.next;
        }
        for i in 0..500 {
            assert!(
                seen.contains(&Bytes::from(format!("old:{i}"))),
                "old:{i} missed"
            );
        }
    }

    #[test]
    fn a_flush_removes_older_entries_and_refuses_older_writes() {
        let s = Store::default();
        s.set(b"a", b"v", 10, SetOptions::default()).unwrap();
        s.set(b"b", b"v", 30, SetOptions::default()).unwrap();
        s.del(b"c", 5);
        let gone = s.flush(20);
        assert_eq!(gone.len(), 2, "a and c's tombstone");
        assert_eq!(s.get(b"a").unwrap(), None);
        assert!(s.get(b"b").unwrap().is_some(), "newer than the flush");
        // A late write from before the flush, or a partner's old copy, stays out.
        assert!(
            s.set(b"a", b"late", 15, SetOptions::default())
                .unwrap()
                .applied
        );
        assert_eq!(s.get(b"a").unwrap(), None);
        let old = Store::default();
        old.set(b"a", b"old copy", 12, SetOptions::default())
            .unwrap();
        for n in 0..SHARDS {
            old.snapshot_shard(n, |raw| {
                s.merge(raw);
            });
        }
        assert_eq!(s.get(b"a").unwrap(), None);
        assert_eq!(s.usage().keys, 1);
        assert!(s.random_key().is_some());
    }
}
