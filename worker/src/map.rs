//! The cluster map a worker keeps (`map` op), and the check that keeps an orchestrator
//! routing by an older map from writing in the wrong place.
//!
//! The orchestrators push the map to every worker (`map set`) after each change, naming the
//! pair the worker belongs to; a worker keeps the newest by epoch, so any orchestrator (a
//! starting one, or one that missed a change) can read the current map back (`map get`).
//! From it the worker knows which slots its pair holds ([`Holding`]) and refuses a keyed
//! request for any other slot with [`Status::Moved`] and its epoch: the sender routed it by
//! an older map, and reads the newer one before routing again (Redis Cluster's `-MOVED`).
//! A worker that was never given a map (epoch 0) admits everything, as before maps were
//! shared.
//!
//! One orchestrator at a time changes the map: it takes a lease on the workers first (`map
//! lease`), and a push from another instance is refused while the lease runs. The lease is
//! in memory only: a restarted worker has none, so whoever holds the newest map can catch it
//! up.
//!
//! The check is on every request, so it is one flag load when the pair holds every slot (one
//! pair), else one slot computation and one bitmap test on a snapshot loaded without a lock
//! ([`ArcSwapOption`]); the map's text, epoch and lease sit
//! behind a mutex that only the `map` op takes. A program (`apply`, `query`) or a
//! replicated changes block may name several keys: each is checked once decoded, and one
//! not admitted refuses the whole request before anything runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use twincache_protocol::cluster_map::{ClusterMap, Holding};
use twincache_protocol::frame::{flags, Op, Request, Response};
use twincache_protocol::program::{Action, Change};
use twincache_protocol::Status;

/// The longest lease granted: an orchestrator that stops renewing (it died) holds up the
/// others' changes for at most this long.
pub const MAX_LEASE_MS: u64 = 60_000;

/// A worker's map state (see the module docs).
#[derive(Default)]
pub struct MapState {
    /// What this worker's pair holds under the kept map; `None` until a map is set. Read on
    /// every request without a lock; written under `kept`'s lock so it always matches it.
    holding: ArcSwapOption<Holding>,
    /// The holding holds every slot (one pair): the check is this one load. Measured: the
    /// snapshot load and the key's slot hash took 5% of a worker's CPU at pipeline 16.
    every_slot: AtomicBool,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// The map's text as pushed (byte for byte: an identical re-push is recognised by it).
    text: Bytes,
    /// 0: no map.
    epoch: u64,
    /// `None`: in no pair of the map.
    pair: Option<usize>,
    lease: Option<Lease>,
}

/// The right to change the map, held by one orchestrator instance until `until`.
struct Lease {
    holder: String,
    until: Instant,
}

impl Lease {
    /// Held by someone other than `instance`, and not expired at `now`: its holder and the
    /// ms left (at least 1, so "held" never reads as "0 ms left").
    fn held_against(&self, instance: &str, now: Instant) -> Option<(&str, u128)> {
        (self.holder != instance && now < self.until).then(|| {
            let left = self.until.saturating_duration_since(now).as_millis();
            (self.holder.as_str(), left.max(1))
        })
    }
}

/// The refusal of a request routed by a map older than `epoch`.
pub fn moved(epoch: u64) -> Response {
    Response::error(Status::Moved, epoch.to_string())
}

impl MapState {
    /// The epoch of the kept map; 0 if none. (From the holding, which is stored with it: no
    /// lock on a health check.)
    pub fn epoch(&self) -> u64 {
        self.holding.load().as_ref().map_or(0, |h| h.epoch())
    }

    /// What a program's keys are checked against: `None` if a map is not kept, or if this
    /// worker's pair holds every slot (every key is admitted; not loaded then).
    pub fn holding(&self) -> Option<Arc<Holding>> {
        if self.every_slot.load(Ordering::Acquire) {
            return None;
        }
        self.holding.load_full()
    }

    /// The refusal of a single-key request (the frame's key is the key it works on) whose
    /// slot this worker's pair does not hold; `None` to serve it. Programs and replicated
    /// changes name their keys in the value and are checked where it is decoded
    /// ([`program_admitted`], [`changes_admitted`]); other ops have no key to check.
    #[inline]
    pub fn refuse(&self, req: &Request) -> Option<Response> {
        let moving_source = match req.op {
            // Only these may read or delete a slot on its way out; on a `set` the same bit is
            // KEEP_TTL, and a write of a moving slot belongs on the new pair.
            Op::Get | Op::Exists | Op::Del => req.flags & flags::MOVING_SOURCE != 0,
            Op::Set | Op::Passthrough | Op::Invalidate => false,
            _ => return None,
        };
        if self.every_slot.load(Ordering::Acquire) {
            return None;
        }
        let holding = self.holding.load();
        let holding = holding.as_ref()?;
        (!holding.admits(&req.key, moving_source)).then(|| moved(holding.epoch()))
    }

    /// Answers a `map` request (see `twincache_protocol::frame::Op::Map`).
    pub fn op(&self, value: &[u8]) -> Response {
        self.op_at(value, Instant::now())
    }

    /// [`MapState::op`] at `now` (tests move the clock instead of sleeping).
    fn op_at(&self, value: &[u8], now: Instant) -> Response {
        let (line, rest) = match value.iter().position(|&b| b == b'\n') {
            Some(i) => (&value[..i], &value[i + 1..]),
            None => (value, &[][..]),
        };
        let line = String::from_utf8_lossy(line);
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        match words.as_slice() {
            ["get"] => {
                let kept = self.lock();
                let mut out = Vec::with_capacity(21 + kept.text.len());
                out.extend_from_slice(format!("{}\n", kept.epoch).as_bytes());
                out.extend_from_slice(&kept.text);
                Response::ok(Bytes::from(out))
            }
            ["set", pair, instance] => {
                // `-`: this worker is in no pair of the map (replaced, or its pair removed).
                let pair = match *pair {
                    "-" => None,
                    n => match n.parse::<usize>() {
                        Ok(n) => Some(n),
                        Err(_) => {
                            return Response::error(
                                Status::ParseError,
                                "set takes a pair number, or `-` for none",
                            )
                        }
                    },
                };
                self.set(pair, instance, rest, now)
            }
            ["lease", instance, ttl] => match ttl.parse::<u64>() {
                Ok(ttl) => self.lease(instance, ttl, now),
                Err(_) => Response::error(Status::ParseError, "lease takes a ttl in ms"),
            },
            ["release", instance] => {
                let mut kept = self.lock();
                if kept.lease.as_ref().is_some_and(|l| l.holder == *instance) {
                    kept.lease = None;
                }
                Response::ok(Bytes::new())
            }
            _ => Response::error(
                Status::ParseError,
                "map takes `get`, `set PAIR|- INSTANCE` then a newline and the map, \
                 `lease INSTANCE TTL_MS` or `release INSTANCE`",
            ),
        }
    }

    /// `map set`: keeps `text` if it is newer than the kept map (see the module docs for
    /// the lease), or if it is the kept map again (possibly for another pair). A worker of
    /// no pair (`None`) holds no slot: it refuses every keyed request.
    fn set(&self, pair: Option<usize>, instance: &str, text: &[u8], now: Instant) -> Response {
        let Ok(text_str) = std::str::from_utf8(text) else {
            return Response::error(Status::ParseError, "the map is not UTF-8");
        };
        let map = match ClusterMap::parse(text_str) {
            Ok(map) => map,
            Err(e) => return Response::error(Status::ParseError, format!("bad map: {e}")),
        };
        if let Some(pair) = pair.filter(|&p| p >= map.pairs()) {
            return Response::error(
                Status::ParseError,
                format!("pair {pair} is not one of the map's {}", map.pairs()),
            );
        }
        // Worked out before the lock: a walk of every slot. (A pair past the map's holds
        // none.)
        let holding = Holding::of(&map, pair.unwrap_or(map.pairs()));
        let mut kept = self.lock();
        if let Some((holder, left)) = kept
            .lease
            .as_ref()
            .and_then(|l| l.held_against(instance, now))
        {
            return Response::error(Status::NotApplied, format!("held {holder} {left}"));
        }
        let epoch = map.epoch();
        let same = epoch == kept.epoch && kept.text == text;
        if epoch > kept.epoch || (same && pair != kept.pair) {
            if epoch > kept.epoch {
                tracing::info!(epoch, ?pair, from = kept.epoch, "cluster map kept");
            }
            // A copy: a slice would pin the whole received frame for as long as it is kept.
            kept.text = Bytes::copy_from_slice(text);
            kept.epoch = epoch;
            kept.pair = pair;
            // Cleared before the narrower holding is visible, set after the wider one is.
            let every = holding.holds_every_slot();
            if !every {
                self.every_slot.store(false, Ordering::SeqCst);
            }
            self.holding.store(Some(Arc::new(holding)));
            if every {
                self.every_slot.store(true, Ordering::SeqCst);
            }
        } else if !same {
            // Older, or another map under the same epoch: the sender is behind.
            return Response::error(Status::NotApplied, kept.epoch.to_string());
        }
        Response::ok(Bytes::from(epoch.to_string()))
    }

    /// `map lease`: (re)granted to `instance` unless another holds it.
    fn lease(&self, instance: &str, ttl_ms: u64, now: Instant) -> Response {
        let mut kept = self.lock();
        if let Some((holder, left)) = kept
            .lease
            .as_ref()
            .and_then(|l| l.held_against(instance, now))
        {
            return Response::ok(Bytes::from(format!("held {holder} {left}")));
        }
        kept.lease = Some(Lease {
            holder: instance.to_string(),
            until: now + Duration::from_millis(ttl_ms.min(MAX_LEASE_MS)),
        });
        Response::ok(Bytes::from_static(b"granted"))
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        // Nothing under the lock can leave `Kept` half-written: a panic there leaves it usable.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `holding` admits every key of a program whose frame key is `key`. A program
/// that names no key (RANDOMKEY, sent to each pair with an empty key) is admitted.
pub fn program_admitted(holding: &Holding, key: &[u8], program: &[Action]) -> bool {
    if let [Action::RandomKey] = program {
        return true;
    }
    holding.admits(key, false)
        && program
            .iter()
            .all(|a| a.other_keys().all(|k| holding.admits(k, false)))
}

/// Whether `holding` admits every key of a replicated changes block (the frame's key is
/// empty: the keys are in the block).
pub fn changes_admitted(holding: &Holding, changes: &[Change]) -> bool {
    changes.iter().all(|c| holding.admits(&c.key, false))
}

#[cfg(test)]
mod tests;
