//! Health checks and partner resync: the orchestrator's half of fault tolerance.
//!
//! Every `--health-interval` the monitor asks each worker for its `status` (boot id, whether
//! its data is established, how its last resync went), within `--health-timeout`, and moves
//! each worker between the states of [`WorkerState`]:
//!
//! - No answer: **down**. Reads and writes go to the partner alone.
//! - A new boot id (it restarted, empty), or answering again after being down (it may have
//!   missed writes): **stale**. A write one worker missed marks it stale too (see
//!   `Router::write`).
//! - Stale with an in-sync partner: told to `resync` from the partner, **resyncing**; it takes
//!   live writes but serves no reads. When it reports the resync done, **in sync**, unless it
//!   missed a write meanwhile (the write may have escaped the snapshot), then it resyncs again.
//! - Stale with its partner down: its copy is the best there is, so it is promoted to in sync
//!   (availability first). Writes acknowledged only by the partner since the worker went
//!   stale come back when the partner does, if the partner was frozen rather than killed.
//! - First sight (this orchestrator just started): the workers' own `synced` flags decide.
//!   A worker whose data is established is in sync; a fresh one beside it is stale; two fresh
//!   ones are a new pair and are told to `adopt` what they hold.
//!
//! Several orchestrators may run this at once: a worker ignores a resync request while one is
//! running, and each orchestrator follows the worker's own report of it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use twincache_protocol::frame::{Op, Request};
use twincache_protocol::info;
use twincache_protocol::Status;

use crate::cluster::{Pair, Router, WorkerLink, WorkerState};

/// How often to check, and how long an answer may take.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

/// A worker's `status`, parsed.
#[derive(Debug, Clone, Default)]
struct Seen {
    boot_id: u64,
    synced: bool,
    phase: String,
    completed: u64,
    error: String,
    adapter: bool,
}

fn parse(text: &str) -> Seen {
    let mut seen = Seen::default();
    for (k, v) in info::pairs(text) {
        match k {
            "boot_id" => seen.boot_id = u64::from_str_radix(v, 16).unwrap_or(0),
            "synced" => seen.synced = v == "1",
            "resync" => seen.phase = v.to_string(),
            "resyncs_completed" => seen.completed = v.parse().unwrap_or(0),
            "resync_error" => seen.error = v.to_string(),
            "adapter" => seen.adapter = v == "1",
            _ => {}
        }
    }
    seen
}

/// Moves `w` to `state`, logging the change and why.
fn transition(w: &WorkerLink, state: WorkerState, why: &str) {
    let before = w.set_state(state);
    if before != state {
        if matches!(state, WorkerState::Down | WorkerState::Stale) {
            tracing::warn!(worker = %w.addr, from = before.name(), to = state.name(), "{why}");
        } else {
            tracing::info!(worker = %w.addr, from = before.name(), to = state.name(), "{why}");
        }
    }
}

impl Router {
    /// Checks every worker each `interval` until `shutdown`, driving the states above; every
    /// fifth round also checks that partners share their encryption key.
    pub async fn monitor(self: Arc<Self>, config: HealthConfig, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for round in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            for pair in self.pairs() {
                let (a, b) = tokio::join!(
                    self.poll(&pair.workers[0], config.timeout),
                    self.poll(&pair.workers[1], config.timeout)
                );
                self.step(pair, [a, b]).await;
            }
            if round % 5 == 0 {
                self.check_keys().await;
            }
        }
    }

    async fn poll(&self, w: &WorkerLink, timeout: Duration) -> Option<Seen> {
        let reply = w.send(&Request::new(Op::Status, Bytes::new()), 0)?;
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(resp)) if resp.status == Status::Ok => {
                Some(parse(&String::from_utf8_lossy(&resp.payload)))
            }
            _ => None,
        }
    }

    async fn call(&self, w: &WorkerLink, op: Op, value: &str) -> bool {
        self.ask(w, op, value).await.is_some()
    }

    /// One round for one pair.
    async fn step(&self, pair: &Pair, seen: [Option<Seen>; 2]) {
        if let Some(s) = seen.iter().flatten().next() {
            self.set_adapter(s.adapter);
        }
        for (w, s) in pair.workers.iter().zip(&seen) {
            observe(w, s.as_ref());
        }
        for i in 0..2 {
            let (w, partner) = (&pair.workers[i], &pair.workers[1 - i]);
            let Some(me) = &seen[i] else { continue };
            let other = seen[1 - i].as_ref();
            match w.state() {
                WorkerState::Unknown => {
                    if me.synced {
                        transition(w, WorkerState::InSync, "seen: its data is established");
                    } else if other.is_some_and(|o| o.synced) {
                        transition(
                            w,
                            WorkerState::Stale,
                            "seen: fresh beside an established partner",
                        );
                    } else {
                        // A new pair, or the only worker of its pair answering.
                        self.call(w, Op::Adopt, "").await;
                        transition(w, WorkerState::InSync, "seen: adopts what it holds");
                    }
                }
                WorkerState::Stale => match partner.state() {
                    WorkerState::InSync => {
                        let started =
                            me.phase == "running" || self.call(w, Op::Resync, &partner.addr).await;
                        if started {
                            w.resync_base.store(me.completed, Ordering::Release);
                            w.dirty.store(false, Ordering::Release);
                            transition(w, WorkerState::Resyncing, "resyncing from its partner");
                        }
                    }
                    WorkerState::Down => {
                        self.call(w, Op::Adopt, "").await;
                        transition(
                            w,
                            WorkerState::InSync,
                            "partner down: serving this worker's copy",
                        );
                    }
                    // Both stale: the one whose data is established (or the first) leads.
                    WorkerState::Stale
                        if me.synced || (i == 0 && !other.is_some_and(|o| o.synced)) =>
                    {
                        self.call(w, Op::Adopt, "").await;
                        transition(w, WorkerState::InSync, "both stale: this copy leads");
                    }
                    _ => {}
                },
                WorkerState::Resyncing => {
                    if me.phase == "done" && me.completed > w.resync_base.load(Ordering::Acquire) {
                        if w.dirty.swap(false, Ordering::AcqRel) {
                            transition(
                                w,
                                WorkerState::Stale,
                                "missed a write during its resync: again",
                            );
                        } else {
                            transition(w, WorkerState::InSync, "resync done: in sync");
                        }
                    } else if me.phase == "failed" {
                        transition(
                            w,
                            WorkerState::Stale,
                            &format!("resync failed: {}", me.error),
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

/// Applies what the worker's answer (or silence) says on its own.
fn observe(w: &WorkerLink, seen: Option<&Seen>) {
    let Some(me) = seen else {
        if w.state() != WorkerState::Down {
            transition(w, WorkerState::Down, "not answering");
        }
        return;
    };
    let before = w
        .boot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(me.boot_id);
    match before {
        Some(boot) if boot != me.boot_id => {
            w.dirty.store(true, Ordering::Release);
            transition(
                w,
                WorkerState::Stale,
                "restarted (new boot id): will resync",
            );
        }
        Some(_) if w.state() == WorkerState::Down => {
            transition(
                w,
                WorkerState::Stale,
                "answering again: will resync before serving reads",
            );
        }
        // Never seen before (unreachable since this orchestrator started): first sight.
        None if w.state() == WorkerState::Down => {
            transition(w, WorkerState::Unknown, "answering for the first time");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_worker_status() {
        let s = parse("boot_id:00000000000000ff\r\nsynced:1\r\nresync:done\r\nresyncs_completed:3\r\nresync_error:\r\n");
        assert_eq!(s.boot_id, 255);
        assert!(s.synced);
        assert_eq!(s.phase, "done");
        assert_eq!(s.completed, 3);
    }
}
