//! The worker's key-value store: sharded hash tables of single-allocation entries.
//!
//! Each entry carries the version of the write that produced it. Partners receive the same
//! writes in whatever order the network delivers them, so the store keeps the newest version
//! (last writer wins by the orchestrator's clock) instead of the last arrival; that is what
//! keeps the two copies of a pair identical.
//!
//! Entries may carry an absolute expiry. An expired entry is never returned: reads treat it
//! as absent and remove it on the spot.
//!
//! ## Layout
//! An entry is one heap allocation: header, key and stored (sealed) bytes together.
//!
//! ```text
//! version:u64 | expires_at:u64 (unix ms, 0 = never) | key_len:u32 | value_len:u32 | key | stored
//! ```
//!
//! One allocation per key instead of three (key, value, and the refcount header a shared
//! `Bytes` adds) saves memory, and saves cache misses: a lookup compares the key in the same
//! lines that hold the header, and an overwrite frees one block. The key is hashed once
//! (SipHash with a per-process key, so clients cannot aim collisions at one bucket); the hash
//! picks the shard and the bucket.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;

use crate::seal::{self, Cipher, SealError};

const HEADER: usize = 8 + 8 + 4 + 4;
/// Shards: enough that threads rarely meet on one lock.
const SHARDS: usize = 64;

/// One stored key: header, key and stored bytes in one allocation (see the module docs).
struct Entry(Box<[u8]>);

impl Entry {
    fn new(
        version: u64,
        expires_at: u64,
        key: &[u8],
        value: &[u8],
        cipher: Option<&Cipher>,
    ) -> Entry {
        let mut buf = Vec::with_capacity(HEADER + key.len() + 1 + value.len());
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&expires_at.to_le_bytes());
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(key);
        seal::seal_into(key, value, cipher, &mut buf);
        Entry(buf.into_boxed_slice())
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }

    fn version(&self) -> u64 {
        self.u64_at(0)
    }

    fn expires_at(&self) -> u64 {
        self.u64_at(8)
    }

    fn set_expires_at(&mut self, at: u64) {
        self.0[8..16].copy_from_slice(&at.to_le_bytes());
    }

    fn u32_at(&self, at: usize) -> usize {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    fn key_len(&self) -> usize {
        self.u32_at(16)
    }

    /// Length of the value as the client gave it (before sealing).
    fn value_len(&self) -> usize {
        self.u32_at(20)
    }

    fn key(&self) -> &[u8] {
        &self.0[HEADER..HEADER + self.key_len()]
    }

    fn stored(&self) -> &[u8] {
        &self.0[HEADER + self.key_len()..]
    }

    fn live(&self, now: u64) -> bool {
        let at = self.expires_at();
        at == 0 || at > now
    }

    /// Bytes this entry costs: its allocation plus its slot in the table.
    fn footprint(&self) -> usize {
        self.0.len() + std::mem::size_of::<Entry>() + 1
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters for `stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub sets: AtomicU64,
    /// Writes ignored because the entry already held a newer version.
    pub stale_writes: AtomicU64,
    pub expired: AtomicU64,
}

/// How a `set` behaves (the Redis `SET` options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Time to live in milliseconds; 0 for none.
    pub ttl_ms: u64,
    /// Only if absent.
    pub nx: bool,
    /// Only if present.
    pub xx: bool,
    /// Keep the current expiry.
    pub keep_ttl: bool,
    /// Return the previous value.
    pub get: bool,
}

/// What a `set` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOutcome {
    /// False when an NX/XX condition did not hold.
    pub applied: bool,
    /// The previous value, when asked for with [`SetOptions::get`].
    pub old: Option<Bytes>,
}

/// A snapshot of the store's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub keys: usize,
    /// Bytes held by entries: allocations (header, key, stored bytes) and table slots.
    pub bytes: usize,
    /// Keys and values as clients gave them.
    pub logical_bytes: usize,
    /// Keys and values as stored (values compressed, encrypted), without overhead.
    pub stored_bytes: usize,
}

impl Usage {
    fn add(&mut self, e: &Entry) {
        self.keys += 1;
        self.bytes += e.footprint();
        self.logical_bytes += e.key_len() + e.value_len();
        self.stored_bytes += e.key_len() + e.stored().len();
    }

    fn remove(&mut self, e: &Entry) {
        self.keys -= 1;
        self.bytes -= e.footprint();
        self.logical_bytes -= e.key_len() + e.value_len();
        self.stored_bytes -= e.key_len() + e.stored().len();
    }

    fn merge(&mut self, other: Usage) {
        self.keys += other.keys;
        self.bytes += other.bytes;
        self.logical_bytes += other.logical_bytes;
        self.stored_bytes += other.stored_bytes;
    }
}

#[derive(Default)]
struct Shard {
    table: HashTable<Entry>,
    usage: Usage,
}

impl Shard {
    fn find(&self, hash: u64, key: &[u8]) -> Option<&Entry> {
        self.table.find(hash, |e| e.key() == key)
    }

    /// Removes the entry for `key` if `pred` holds for it; returns it.
    fn remove_if(
        &mut self,
        hash: u64,
        key: &[u8],
        pred: impl FnOnce(&Entry) -> bool,
    ) -> Option<Entry> {
        match self.table.find_entry(hash, |e| e.key() == key) {
            Ok(slot) if pred(slot.get()) => {
                let (entry, _) = slot.remove();
                self.usage.remove(&entry);
                Some(entry)
            }
            _ => None,
        }
    }
}

pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::hash::RandomState,
    cipher: Option<Cipher>,
    pub counters: Counters,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(None)
    }
}

impl Store {
    /// A store that encrypts every value with `cipher`, if given.
    pub fn new(cipher: Option<Cipher>) -> Store {
        Store {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
            cipher,
            counters: Counters::default(),
        }
    }

    pub fn cipher(&self) -> Option<&Cipher> {
        self.cipher.as_ref()
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of `hash`. The table uses the hash's low bits (bucket) and top 7 (tag), so
    /// the shard takes bits from the middle.
    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        self.shards[(hash >> 32) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the stored bytes under `key` if it holds a live entry; an expired entry is
    /// removed on the spot. Copying (a memcpy) lets decompression run outside the lock.
    fn live_stored(&self, key: &[u8], now: u64) -> Option<Bytes> {
        let hash = self.hash(key);
        let mut shard = self.shard(hash);
        match shard.find(hash, key) {
            Some(e) if e.live(now) => Some(Bytes::copy_from_slice(e.stored())),
            Some(_) => {
                let gone = shard.remove_if(hash, key, |e| !e.live(now));
                drop(shard);
                if gone.is_some() {
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            None => None,
        }
    }

    /// The value under `key`, if any.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>, SealError> {
        match self.live_stored(key, now_ms()) {
            Some(stored) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                seal::open(key, &stored, self.cipher()).map(Some)
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Whether `key` holds a live entry.
    pub fn exists(&self, key: &[u8]) -> bool {
        let hash = self.hash(key);
        let now = now_ms();
        self.shard(hash)
            .find(hash, key)
            .is_some_and(|e| e.live(now))
    }

    /// Stores `value` under `key` at `version` with `opts`.
    ///
    /// A write older than the entry's version is dropped but reported as applied: to the
    /// writer it is as if it happened and was then overwritten by the newer one.
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        version: u64,
        opts: SetOptions,
    ) -> Result<SetOutcome, SealError> {
        let now = now_ms();
        let expires_at = if opts.ttl_ms > 0 {
            now.saturating_add(opts.ttl_ms)
        } else {
            0
        };
        // Build (and compress) the entry before taking the shard lock.
        let mut fresh = Entry::new(version, expires_at, key, value, self.cipher());
        let hash = self.hash(key);
        self.counters.sets.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(hash);
        let Shard { table, usage } = &mut *shard;
        let (applied, old, replaced) =
            match table.entry(hash, |e| e.key() == key, |e| self.hash(e.key())) {
                Slot::Occupied(mut slot) => {
                    let current = slot.get_mut();
                    let live = current.live(now);
                    let old = (live && opts.get).then(|| Bytes::copy_from_slice(current.stored()));
                    if (opts.nx && live) || (opts.xx && !live) {
                        (false, old, None)
                    } else if current.version() > version {
                        self.counters.stale_writes.fetch_add(1, Ordering::Relaxed);
                        (true, old, None)
                    } else {
                        if opts.keep_ttl && live {
                            fresh.set_expires_at(current.expires_at());
                        }
                        usage.remove(current);
                        usage.add(&fresh);
                        (true, old, Some(std::mem::replace(current, fresh)))
                    }
                }
                Slot::Vacant(slot) => {
                    if opts.xx {
                        (false, None, None)
                    } else {
                        usage.add(&fresh);
                        slot.insert(fresh);
                        (true, None, None)
                    }
                }
            };
        drop(shard);
        // The replaced entry is freed here, outside the lock.
        drop(replaced);
        let old = old
            .map(|stored| seal::open(key, &stored, self.cipher()))
            .transpose()?;
        Ok(SetOutcome { applied, old })
    }

    /// Deletes `key` unless it holds a version newer than `version`. Returns whether a live
    /// value was removed.
    pub fn del(&self, key: &[u8], version: u64) -> bool {
        let hash = self.hash(key);
        let now = now_ms();
        let removed = self
            .shard(hash)
            .remove_if(hash, key, |e| e.version() <= version);
        removed.is_some_and(|e| e.live(now))
    }

    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        for shard in self.shards.iter() {
            usage.merge(shard.lock().unwrap_or_else(|e| e.into_inner()).usage);
        }
        usage
    }

    /// Removes the expired entries of shard `n` (mod the shard count); returns how many.
    /// Reads already hide and drop expired entries; this reclaims the ones nobody reads. One
    /// shard per call keeps each call's cost a fixed fraction of the store.
    pub fn sweep_shard(&self, n: usize) -> usize {
        let now = now_ms();
        let expired: Vec<Entry> = {
            let mut shard = self.shards[n % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Shard { table, usage } = &mut *shard;
            let gone: Vec<Entry> = table.extract_if(|e| !e.live(now)).collect();
            for e in &gone {
                usage.remove(e);
            }
            gone
        };
        let n = expired.len();
        if n > 0 {
            self.counters.expired.fetch_add(n as u64, Ordering::Relaxed);
        }
        n // the entries are freed here, outside the lock
    }

    /// Sweeps one shard every `interval` until `shutdown`; a full pass takes 64 intervals.
    pub async fn sweep_forever(
        self: std::sync::Arc<Self>,
        interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        for n in 0.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            self.sweep_shard(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &Store, k: &[u8], v: &[u8], version: u64) -> bool {
        s.set(k, v, version, SetOptions::default()).unwrap().applied
    }

    #[test]
    fn set_get_del() {
        let s = Store::default();
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(set(&s, b"k", b"v", 1));
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(s.exists(b"k"));
        assert!(s.del(b"k", 2));
        assert!(!s.del(b"k", 3));
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(!s.exists(b"k"));
    }

    #[test]
    fn newest_version_wins_whatever_the_arrival_order() {
        let s = Store::default();
        assert!(set(&s, b"k", b"new", 20));
        assert!(
            set(&s, b"k", b"old", 10),
            "a stale write reads as applied, then overwritten"
        );
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(s.counters.stale_writes.load(Ordering::Relaxed), 1);
        assert!(
            !s.del(b"k", 15),
            "an older delete must not remove a newer write"
        );
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(
            set(&s, b"k", b"new", 20),
            "the same version again (a retry) is accepted"
        );
    }

    #[test]
    fn nx_xx_and_get() {
        let s = Store::default();
        let nx = SetOptions {
            nx: true,
            get: true,
            ..Default::default()
        };
        let xx = SetOptions {
            xx: true,
            get: true,
            ..Default::default()
        };
        assert_eq!(
            s.set(b"k", b"a", 1, xx).unwrap(),
            SetOutcome {
                applied: false,
                old: None
            }
        );
        assert_eq!(
            s.set(b"k", b"a", 2, nx).unwrap(),
            SetOutcome {
                applied: true,
                old: None
            }
        );
        let old = Some(Bytes::from_static(b"a"));
        assert_eq!(
            s.set(b"k", b"b", 3, nx).unwrap(),
            SetOutcome {
                applied: false,
                old: old.clone()
            }
        );
        assert_eq!(
            s.set(b"k", b"c", 4, xx).unwrap(),
            SetOutcome { applied: true, old }
        );
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn expired_entries_are_never_returned() {
        let s = Store::default();
        let short = SetOptions {
            ttl_ms: 30,
            ..Default::default()
        };
        s.set(b"k", b"v", 1, short).unwrap();
        assert!(s.exists(b"k"));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(!s.exists(b"k"));
        assert_eq!(s.usage(), Usage::default(), "removed on access");
        // NX treats an expired key as absent.
        s.set(b"n", b"v", 1, short).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        let nx = SetOptions {
            nx: true,
            ..Default::default()
        };
        assert!(s.set(b"n", b"w", 2, nx).unwrap().applied);
    }

    #[test]
    fn encrypted_store_round_trips_and_hides_values() {
        let s = Store::new(Some(Cipher::new(&[3; 32])));
        let value = b"plaintext that must not be stored as is".repeat(5);
        s.set(b"k", &value, 1, SetOptions::default()).unwrap();
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&value[..]));
        let hash = s.hash(b"k");
        let shard = s.shard(hash);
        let stored = shard.find(hash, b"k").unwrap().stored();
        assert!(!stored
            .windows(16)
            .any(|w| value.windows(16).any(|v| v == w)));
    }

    #[test]
    fn the_sweep_reclaims_expired_keys_nobody_reads() {
        let s = Store::default();
        let short = SetOptions {
            ttl_ms: 20,
            ..Default::default()
        };
        for i in 0..1000 {
            s.set(format!("k{i}").as_bytes(), b"v", 1, short).unwrap();
        }
        s.set(b"forever", b"v", 1, SetOptions::default()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(40));
        let swept: usize = (0..SHARDS).map(|n| s.sweep_shard(n)).sum();
        assert_eq!(swept, 1000);
        assert_eq!(s.usage().keys, 1);
        assert_eq!(s.counters.expired.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn usage_accounts_logical_and_stored_bytes() {
        let s = Store::default();
        let value = br#"{"name":"a","n":1}"#.repeat(20);
        s.set(b"k", &value, 1, SetOptions::default()).unwrap();
        let u = s.usage();
        assert_eq!(u.keys, 1);
        assert_eq!(u.logical_bytes, 1 + value.len());
        assert!(u.stored_bytes < value.len() / 2, "{u:?}");
        assert!(u.bytes > u.stored_bytes);
        s.set(b"k", b"small", 2, SetOptions::default()).unwrap();
        assert_eq!(s.usage().logical_bytes, 1 + 5);
        assert!(s.del(b"k", 3));
        assert_eq!(s.usage(), Usage::default());
    }

    #[test]
    fn keep_ttl_keeps_the_expiry() {
        let s = Store::default();
        s.set(
            b"k",
            b"v",
            1,
            SetOptions {
                ttl_ms: 30,
                ..Default::default()
            },
        )
        .unwrap();
        s.set(
            b"k",
            b"w",
            2,
            SetOptions {
                keep_ttl: true,
                ..Default::default()
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(s.get(b"k").unwrap(), None);
    }
}
