//! The orchestrator's view of every worker's counters, for `/metrics` and the status page.
//!
//! A task asks each worker for its `stats` and `status` once per [`POLL_INTERVAL`] (all
//! workers at once, each answer bounded by [`POLL_TIMEOUT`]) and keeps the last answers with
//! the rates derived from them. Scrapes and status requests only read this cache, so a
//! frozen worker never makes a scrape hang, and scraping often costs the workers nothing.
//! A worker that does not answer keeps no numbers: its samples disappear from `/metrics`
//! and the page shows it without them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use twincache_protocol::frame::Op;
use twincache_protocol::info;

use crate::cluster::{Router, WorkerLink};
use crate::metrics::Metrics;

/// How often workers are polled: the status page refreshes about as often.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long one worker's answer may take before it counts as missing this round.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(800);

/// The last answers of one worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerView {
    pub stats: Option<String>,
    pub status: Option<String>,
    /// Reads and writes per second over the last interval.
    pub ops_per_sec: f64,
    /// Hits over reads in the last interval (over all time if it had no reads).
    pub hit_rate: Option<f64>,
    prev: Option<(Instant, Totals)>,
}

/// Counters rates are derived from.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    hits: u64,
    misses: u64,
    writes: u64,
}

impl Totals {
    fn read(stats: &str) -> Totals {
        let n = |k: &str| {
            info::get(stats, k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Totals {
            hits: n("hits"),
            misses: n("misses"),
            writes: n("sets"),
        }
    }
}

impl WorkerView {
    /// A counter from the last `stats` answer.
    pub fn stat(&self, name: &str) -> Option<&str> {
        info::get(self.stats.as_deref()?, name)
    }

    /// A field of the last `status` answer.
    pub fn state_field(&self, name: &str) -> Option<&str> {
        info::get(self.status.as_deref()?, name)
    }

    fn update(&mut self, stats: Option<String>, status: Option<String>, now: Instant) {
        match &stats {
            Some(text) => {
                let t = Totals::read(text);
                let (ops, rate) = match self.prev {
                    Some((at, p)) if t.hits >= p.hits && t.misses >= p.misses => {
                        let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                        let (h, m) = (t.hits - p.hits, t.misses - p.misses);
                        let w = t.writes.saturating_sub(p.writes);
                        let rate = if h + m > 0 {
                            Some(h as f64 / (h + m) as f64)
                        } else {
                            cumulative(t)
                        };
                        ((h + m + w) as f64 / secs, rate)
                    }
                    // First sight, or the worker restarted (counters went back).
                    _ => (0.0, cumulative(t)),
                };
                self.ops_per_sec = ops;
                self.hit_rate = rate;
                self.prev = Some((now, t));
            }
            None => {
                self.ops_per_sec = 0.0;
                self.hit_rate = None;
                self.prev = None;
            }
        }
        self.stats = stats;
        self.status = status;
    }
}

fn cumulative(t: Totals) -> Option<f64> {
    (t.hits + t.misses > 0).then(|| t.hits as f64 / (t.hits + t.misses) as f64)
}

/// The cache, one view per worker, by address (the pairs may change).
#[derive(Debug, Default)]
pub struct Observer {
    workers: Mutex<HashMap<String, WorkerView>>,
    /// Requests per second through this orchestrator over the last interval.
    ops: Mutex<(f64, Option<(Instant, u64)>)>,
}

impl Observer {
    /// The worker at `addr`: a copy of its last view.
    pub fn worker(&self, addr: &str) -> WorkerView {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(addr)
            .cloned()
            .unwrap_or_default()
    }

    /// Requests per second through this orchestrator over the last interval.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Polls every worker each [`POLL_INTERVAL`] until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let topo = router.pairs();
            let links: Vec<&Arc<WorkerLink>> = topo.iter().flat_map(|p| &p.workers).collect();
            let answers = join_all(links.iter().map(|w| poll(&router, w))).await;
            let now = Instant::now();
            let mut views = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            // Workers no longer in the cluster are forgotten.
            views.retain(|addr, _| links.iter().any(|w| &w.addr == addr));
            for (w, (stats, status)) in links.iter().zip(answers) {
                views
                    .entry(w.addr.clone())
                    .or_default()
                    .update(stats, status, now);
            }
            drop(views);
            let total = metrics.total_commands();
            let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, before)) = ops.1 {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                ops.0 = total.saturating_sub(before) as f64 / secs;
            }
            ops.1 = Some((now, total));
        }
    }
}

/// One worker's `stats` and `status`, each `None` if it did not answer in time. The status
/// request carries no node-id claim (that is the health monitor's).
async fn poll(router: &Router, w: &WorkerLink) -> (Option<String>, Option<String>) {
    let ask = |op| async move {
        let resp = tokio::time::timeout(POLL_TIMEOUT, router.ask(w, op, ""))
            .await
            .ok()??;
        Some(String::from_utf8_lossy(&resp.payload).into_owned())
    };
    if w.state() == crate::cluster::WorkerState::Down {
        // It answers nothing; skip the wait.
        return (None, None);
    }
    tokio::join!(ask(Op::Stats), ask(Op::Status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(hits: u64, misses: u64, sets: u64) -> Option<String> {
        Some(format!(
            "keys:1\r\nhits:{hits}\r\nmisses:{misses}\r\nsets:{sets}\r\n"
        ))
    }

    #[test]
    fn rates_come_from_consecutive_answers() {
        let mut v = WorkerView::default();
        let t0 = Instant::now();
        v.update(stats(10, 10, 0), None, t0);
        assert_eq!(v.ops_per_sec, 0.0, "no rate from one answer");
        assert_eq!(v.hit_rate, Some(0.5), "the cumulative rate meanwhile");
        v.update(stats(40, 20, 50), None, t0 + Duration::from_secs(2));
        assert_eq!(v.ops_per_sec, 45.0); // (30 + 10 + 50) / 2 s
        assert_eq!(v.hit_rate, Some(0.75)); // 30 hits of 40 reads in the interval
        assert_eq!(v.stat("keys"), Some("1"));
        // A restarted worker's counters go back: no negative rate.
        v.update(stats(1, 0, 0), None, t0 + Duration::from_secs(3));
        assert_eq!(v.ops_per_sec, 0.0);
        // No answer: no numbers.
        v.update(None, None, t0 + Duration::from_secs(4));
        assert_eq!(
            (v.ops_per_sec, v.hit_rate, v.stat("keys")),
            (0.0, None, None)
        );
    }
}
