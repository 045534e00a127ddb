//! The cluster's shape as the router sees it: the pairs, which pair holds each slot, and the
//! slot range being moved, if any.
//!
//! A [`Topology`] never changes; a membership change builds a new one and swaps it in whole
//! (`Router::topology`, an `ArcSwap`), so a request routes with one atomic load and no lock,
//! and every request in flight keeps the `Arc` of the topology it was routed with. That `Arc`
//! is also how a slot move knows when the requests routed by an older map are done (its
//! count falls to one): see `membership`.

use std::ops::Deref;
use std::sync::Arc;

use twincache_protocol::slots::{slot_of, Move, SlotMap};

use super::Pair;

pub struct Topology {
    pub pairs: Vec<Arc<Pair>>,
    pub slots: SlotMap,
    /// Slots being copied from `moving.from` to `moving.to`: `slots` already names the new
    /// pair, which takes their writes; reads that miss there look on the old one, and
    /// deletes go to both, so the copy cannot bring a deleted key back.
    pub moving: Option<Move>,
}

/// Where a key lives now: its pair, and the pair it is being moved from, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub pair: usize,
    pub from: Option<usize>,
}

impl Topology {
    pub fn route(&self, key: &[u8]) -> Route {
        let slot = slot_of(key);
        Route {
            pair: self.slots.pair_of_slot(slot),
            from: self
                .moving
                .filter(|m| m.slots.contains(slot))
                .map(|m| m.from),
        }
    }

    /// The pair that holds `key` now.
    pub fn pair_of(&self, key: &[u8]) -> usize {
        self.slots.pair_of(key)
    }

    /// Whether `key`'s slot is being moved.
    pub fn is_moving(&self, key: &[u8]) -> bool {
        self.moving.is_some_and(|m| m.slots.holds_key(key))
    }
}

impl Deref for Topology {
    type Target = [Arc<Pair>];

    fn deref(&self) -> &[Arc<Pair>] {
        &self.pairs
    }
}
