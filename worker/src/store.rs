//! The worker's key-value store: a sharded concurrent map of stored (sealed) values.
//!
//! Each entry carries the version of the write that produced it. Partners receive the same
//! writes in whatever order the network delivers them, so the store keeps the newest version
//! (last writer wins by the orchestrator's clock) instead of the last arrival; that is what
//! keeps the two copies of a pair identical.
//!
//! Entries may carry an absolute expiry. An expired entry is never returned: reads treat it
//! as absent and remove it on the spot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;

use crate::seal::{self, SealError};

#[derive(Debug, Clone)]
struct Entry {
    version: u64,
    /// Unix milliseconds after which the entry is gone; 0 for never.
    expires_at: u64,
    stored: Bytes,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.expires_at == 0 || self.expires_at > now
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub keys: usize,
    pub stored_bytes: usize,
}

#[derive(Debug, Default)]
pub struct Store {
    map: DashMap<Bytes, Entry>,
    pub counters: Counters,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// The stored bytes under `key` if it holds a live entry; removes it if it expired.
    fn live_stored(&self, key: &[u8], now: u64) -> Option<Bytes> {
        // Clone the stored bytes (a refcount bump) so decompression runs outside the shard lock.
        let found = self.map.get(key).map(|e| (e.live(now), e.stored.clone()));
        match found {
            Some((true, stored)) => Some(stored),
            Some((false, _)) => {
                if self.map.remove_if(key, |_, e| !e.live(now)).is_some() {
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
                seal::open(&stored).map(Some)
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Whether `key` holds a live entry.
    pub fn exists(&self, key: &[u8]) -> bool {
        self.live_stored(key, now_ms()).is_some()
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
        // Seal (compress) before taking the shard lock. The key is copied into its own
        // allocation: a slice would pin the whole network buffer it arrived in.
        let stored = seal::seal(value);
        let now = now_ms();
        let expires_at = if opts.ttl_ms > 0 {
            now.saturating_add(opts.ttl_ms)
        } else {
            0
        };
        self.counters.sets.fetch_add(1, Ordering::Relaxed);
        let fresh = Entry {
            version,
            expires_at,
            stored,
        };
        let old_stored = match self.map.entry(Bytes::copy_from_slice(key)) {
            MapEntry::Occupied(mut e) => {
                let live = e.get().live(now);
                // Only when asked for: a first clone of a stored value allocates.
                let old = (live && opts.get).then(|| e.get().stored.clone());
                if (opts.nx && live) || (opts.xx && !live) {
                    return finish(false, old);
                }
                if e.get().version > version {
                    self.counters.stale_writes.fetch_add(1, Ordering::Relaxed);
                    return finish(true, old);
                }
                let keep = if opts.keep_ttl && live {
                    e.get().expires_at
                } else {
                    fresh.expires_at
                };
                e.insert(Entry {
                    expires_at: keep,
                    ..fresh
                });
                old
            }
            MapEntry::Vacant(e) => {
                if opts.xx {
                    return finish(false, None);
                }
                e.insert(fresh);
                None
            }
        };
        finish(true, old_stored)
    }

    /// Deletes `key` unless it holds a version newer than `version`. Returns whether a live
    /// value was removed.
    pub fn del(&self, key: &[u8], version: u64) -> bool {
        let now = now_ms();
        self.map
            .remove_if(key, |_, e| e.version <= version)
            .is_some_and(|(_, e)| e.live(now))
    }

    pub fn usage(&self) -> Usage {
        let mut usage = Usage {
            keys: 0,
            stored_bytes: 0,
        };
        for e in self.map.iter() {
            usage.keys += 1;
            usage.stored_bytes += e.key().len() + e.stored.len();
        }
        usage
    }
}

/// Builds the outcome, opening the previous value (taken only if it was asked for) after the
/// shard lock is released.
fn finish(applied: bool, old: Option<Bytes>) -> Result<SetOutcome, SealError> {
    let old = old.map(|stored| seal::open(&stored)).transpose()?;
    Ok(SetOutcome { applied, old })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &Store, k: &[u8], v: &[u8], version: u64) -> bool {
        s.set(k, v, version, SetOptions::default()).unwrap().applied
    }

    #[test]
    fn set_get_del() {
        let s = Store::new();
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
        let s = Store::new();
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
        let s = Store::new();
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
        let s = Store::new();
        let short = SetOptions {
            ttl_ms: 30,
            ..Default::default()
        };
        s.set(b"k", b"v", 1, short).unwrap();
        assert!(s.exists(b"k"));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(!s.exists(b"k"));
        assert_eq!(s.usage().keys, 0, "removed on access");
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
    fn keep_ttl_keeps_the_expiry() {
        let s = Store::new();
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
