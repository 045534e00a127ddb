//! What the router reports about the workers: the `status` line, INFO's pair lines, the
//! workers' counters (`stats`), and the check that partners share their encryption key.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use twincache_protocol::frame::Op;
use twincache_protocol::info;

use super::{Mode, Router, WorkerLink};

/// Worker counters the orchestrator reads but does not pass on to clients: a worker's key
/// fingerprint is for comparing partners ([`Router::check_keys`]), and would help a forged
/// partner pass a worker's key check.
const INTERNAL_STATS: &[&str] = &["key_fingerprint"];

impl Router {
    /// Asks each reachable worker for its stats and checks that partners encrypt with the
    /// same key: a pair whose keys differ would hold copies its members cannot exchange (a
    /// resync refuses), so it is logged as an error and shown by INFO until fixed.
    pub(crate) async fn check_keys(&self) {
        for (n, pair) in self.pairs().iter().enumerate() {
            for (i, w) in pair.workers.iter().enumerate() {
                if let Some(text) = self.worker_stats(w).await {
                    let key = info::get(&text, "key_fingerprint")
                        .or_else(|| info::get(&text, "encryption"));
                    *pair.encryption[i].lock().unwrap_or_else(|e| e.into_inner()) =
                        key.map(str::to_string);
                }
            }
            let (a, b) = (pair.encryption(0), pair.encryption(1));
            let mismatch = matches!((&a, &b), (Some(a), Some(b)) if a != b);
            if pair.key_mismatch.swap(mismatch, Ordering::Relaxed) != mismatch {
                if mismatch {
                    tracing::error!(
                        pair = n,
                        a = %pair.workers[0].addr,
                        b = %pair.workers[1].addr,
                        "the workers of this pair use different encryption keys (fingerprints {} and {}); give both the same --encryption-key-file",
                        a.unwrap_or_default(),
                        b.unwrap_or_default()
                    );
                } else {
                    tracing::info!(
                        pair = n,
                        "the workers of this pair now use the same encryption key"
                    );
                }
            }
        }
    }

    /// Every worker's state on one line, for the `status` extension:
    /// `pair0 127.0.0.1:7001=in_sync 127.0.0.1:7002=resyncing | pair1 ...`.
    pub fn status_line(&self) -> Bytes {
        let pairs: Vec<String> = self
            .pairs()
            .iter()
            .enumerate()
            .map(|(n, pair)| {
                let [a, b] = &pair.workers;
                format!(
                    "pair{n} {}={} {}={}",
                    a.addr,
                    a.state().name(),
                    b.addr,
                    b.state().name()
                )
            })
            .collect();
        Bytes::from(pairs.join(" | ") + &self.membership_status())
    }

    /// One line per pair for INFO: its workers, the state of each, and the key check.
    pub fn describe(&self) -> String {
        let mode = match self.mode() {
            Some(Mode::Replicated) => "replicated",
            Some(Mode::Adapter) => "adapter",
            None => "unknown",
        };
        let mut out = format!("mode:{mode}\r\nnode_id:{}\r\n", self.clock.node());
        let topo = self.pairs();
        let held = topo.slots.counts(topo.len());
        for (n, pair) in topo.iter().enumerate() {
            let state = |i: usize| pair.workers[i].state().name();
            // Whether each encrypts, not its key's fingerprint: clients see INFO, and a
            // fingerprint is what a forged partner would need to pass a worker's key check.
            let encryption = |i: usize| match pair.encryption(i).as_deref() {
                None => "?",
                Some("off") => "off",
                Some(_) => "on",
            };
            out += &format!(
                "pair{n}:workers={},{} state={},{} encryption={},{} keys={} slots={}\r\n",
                pair.workers[0].addr,
                pair.workers[1].addr,
                state(0),
                state(1),
                encryption(0),
                encryption(1),
                if pair.key_mismatch() {
                    "MISMATCH"
                } else {
                    "ok"
                },
                held[n]
            );
        }
        out + &self.membership_info()
    }

    /// Every worker's counters on one line, for the `stats` extension (less
    /// [`INTERNAL_STATS`]):
    /// `pair0 127.0.0.1:7001 keys=3 bytes=410 ... | pair0 127.0.0.1:7002 down | ...`.
    pub async fn stats_line(self: &Arc<Self>) -> Bytes {
        let mut parts = Vec::new();
        for (n, pair) in self.pairs().iter().enumerate() {
            for w in &pair.workers {
                let counters = match self.worker_stats(w).await {
                    Some(text) => info::pairs(&text)
                        .filter(|(k, _)| !INTERNAL_STATS.contains(k))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    None => "down".into(),
                };
                parts.push(format!("pair{n} {} {counters}", w.addr));
            }
        }
        Bytes::from(parts.join(" | "))
    }

    /// Each pair's counters (`name:value` lines, see `twincache_protocol::info`), from
    /// whichever of its workers answers; `None` for a pair with no reachable worker.
    pub async fn pair_stats(self: &Arc<Self>) -> Vec<Option<String>> {
        let topo = self.pairs();
        let mut out = Vec::with_capacity(topo.len());
        for pair in topo.iter() {
            let mut stats = None;
            for w in &pair.workers {
                stats = self.worker_stats(w).await;
                if stats.is_some() {
                    break;
                }
            }
            out.push(stats);
        }
        out
    }

    /// One worker's `stats` text, if it answers.
    pub(super) async fn worker_stats(&self, w: &WorkerLink) -> Option<String> {
        let resp = self.ask(w, Op::Stats, "").await?;
        Some(String::from_utf8_lossy(&resp.payload).into_owned())
    }
}
