//! The worker's key-value store: a sharded concurrent map of stored (sealed) values.
//!
//! Each entry carries the version of the write that produced it. Partners receive the same
//! writes in whatever order the network delivers them, so the store keeps the newest version
//! (last writer wins by the orchestrator's clock) instead of the last arrival; that is what
//! keeps the two copies of a pair identical.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;

use crate::seal::{self, SealError};

#[derive(Debug, Clone)]
struct Entry {
    version: u64,
    stored: Bytes,
}

/// Counters for `stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub sets: AtomicU64,
    /// Writes ignored because the entry already held a newer version.
    pub stale_writes: AtomicU64,
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

    /// The value under `key`, if any.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>, SealError> {
        // Clone the stored bytes (a refcount bump) so decompression runs outside the shard lock.
        let stored = self.map.get(key).map(|e| e.stored.clone());
        match stored {
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

    /// Stores `value` under `key` at `version`, unless the entry already holds a newer one.
    /// Returns whether the write took effect.
    pub fn set(&self, key: &[u8], value: &[u8], version: u64) -> bool {
        // Seal (compress) before taking the shard lock. The key is copied into its own
        // allocation: a slice would pin the whole network buffer it arrived in.
        let stored = seal::seal(value);
        self.counters.sets.fetch_add(1, Ordering::Relaxed);
        match self.map.entry(Bytes::copy_from_slice(key)) {
            MapEntry::Occupied(mut e) => {
                if e.get().version > version {
                    self.counters.stale_writes.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                e.insert(Entry { version, stored });
            }
            MapEntry::Vacant(e) => {
                e.insert(Entry { version, stored });
            }
        }
        true
    }

    /// Deletes `key` unless it holds a version newer than `version`. Returns whether a value
    /// was removed.
    pub fn del(&self, key: &[u8], version: u64) -> bool {
        self.map
            .remove_if(key, |_, e| e.version <= version)
            .is_some()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_del() {
        let s = Store::new();
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(s.set(b"k", b"v", 1));
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(s.del(b"k", 2));
        assert!(!s.del(b"k", 3));
        assert_eq!(s.get(b"k").unwrap(), None);
    }

    #[test]
    fn newest_version_wins_whatever_the_arrival_order() {
        let s = Store::new();
        assert!(s.set(b"k", b"new", 20));
        assert!(!s.set(b"k", b"old", 10));
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(
            !s.del(b"k", 15),
            "an older delete must not remove a newer write"
        );
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        // The same version again (a retried write) is accepted.
        assert!(s.set(b"k", b"new", 20));
    }
}
