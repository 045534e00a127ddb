//! Health checks and partner refills: the orchestrator's half of fault tolerance.
//!
//! Every `--health-interval` the monitor asks every worker for its `status` (boot id, whether
//! its data is established, the writes it took alone and how much of its partner's it holds,
//! how its last refill went), within `--health-timeout`, and moves each worker between the
//! states of [`WorkerState`]. The decision is [`decide`], a pure function of what the two
//! workers of a pair said and what this orchestrator knew of them, unit-tested below.
//!
//! - No answer: **down**. It gets no requests; writes go to the partner alone, which counts
//!   them as taken alone (`flags::SOLO`).
//! - A new boot id (it restarted, empty): **stale**.
//! - First sight (this orchestrator just started) or back after being down: **assessed**
//!   against its partner. Its own `synced` flag is not enough: a worker that lacks writes its
//!   partner took alone (the partner's count is past what the worker holds) is stale, even if
//!   this orchestrator never saw those writes (another one did, or an earlier run of this
//!   one). Two fresh workers are a new pair and adopt what they hold.
//! - Stale with an in-sync partner: told to `resync` from it, **resyncing**; it takes live
//!   writes but serves no reads. When it reports the refill done, **in sync**, unless it
//!   missed a write meanwhile (the write may have escaped the snapshot): then again.
//! - Stale or resyncing with its partner down: its copy is the best there is, so it is
//!   promoted (availability first) and adopts its data as *partial*.
//! - Neither in sync (each stale or joining) while both answer: the better copy leads
//!   (`leader_rank`: established, then lacking nothing of the other's, then joining, which
//!   takes writes, over stale), promoted as *partial*; it merges the other's copy as below,
//!   and the other joins it and resyncs from it. Without this, a joining worker (waiting for
//!   an in-sync partner) and a stale one (waiting for a partner in sync or down) would wait
//!   for each other forever.
//! - In sync but lacking writes its partner took alone, or partial: it keeps serving and
//!   merges what the partner holds (`resync ... merge`) as soon as the partner answers; if
//!   the partner is in sync and lacks nothing of it, it becomes stale instead. A partial copy
//!   is read after an in-sync partner with a complete one (`cluster::read_rank`).
//!
//! Once every refill a worker started has ended, and when it is first seen, the membership
//! task has it drop every slot its pair does not hold (`Router::sweep_later`): a refill
//! from a partner that had not dropped a moved batch yet brings it back.
//!
//! Before the first round has settled the workers' mode (or with `--mode`), and while this
//! orchestrator's node id is not accepted by the workers, nothing is served (see `Router`).
//! Node ids are claimed on every health check, so two orchestrators never stamp versions
//! with the same id: a clash redraws a random id (or, with `--node-id`, is logged as an
//! error and refuses writes until it clears).
//!
//! Several orchestrators may run this at once: a worker ignores a refill request while one is
//! running, and each orchestrator follows the worker's own report of it.

use crate::config::peer;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use twincache_client::PATIENCE;
use twincache_protocol::coverage::Coverage;
use twincache_protocol::frame::{Op, Request};
use twincache_protocol::info;
use twincache_protocol::Status;

use twincache_protocol::auth::ClusterSecret;
use twincache_tls::Connector;

use crate::cluster::{Mode, Pair, Router, Topology, WorkerLink, WorkerState};
use crate::identify::identify;
use crate::metrics::RouterStats;

/// How often to check, and how long an answer may take.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

/// How long after starting a refill another may be asked for.
pub(crate) const REFILL_RETRY: Duration = Duration::from_secs(1);

/// A worker's `status`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    pub boot_id: u64,
    pub synced: bool,
    /// Since when its data is the pair's (Unix ms on the worker; 0: not synced).
    pub synced_at: u64,
    /// Writes it took alone since it started.
    pub solo: u64,
    /// How much of its partner's writes it holds.
    pub covers: Coverage,
    pub phase: String,
    pub completed: u64,
    /// Refills started since it started (completed, failed or running).
    pub started: u64,
    pub error: String,
    pub adapter: bool,
    /// Its answer to this orchestrator's node-id claim.
    pub claim: String,
    /// The epoch of the cluster map it holds (0: none yet).
    pub map_epoch: u64,
    /// It takes `batch` frames (see `cluster::batch`).
    pub batches: bool,
    /// It gives and checks the bases of a program's changes (`flags::BASES`).
    pub bases: bool,
}

pub(crate) fn parse(text: &str) -> Seen {
    let mut seen = Seen::default();
    for (k, v) in info::pairs(text) {
        match k {
            "boot_id" => seen.boot_id = u64::from_str_radix(v, 16).unwrap_or(0),
            "synced" => seen.synced = v == "1",
            "synced_at" => seen.synced_at = v.parse().unwrap_or(0),
            "solo" => seen.solo = v.parse().unwrap_or(0),
            "covers" => seen.covers = Coverage::parse(v).unwrap_or_default(),
            "resync" => seen.phase = v.to_string(),
            "resyncs_completed" => seen.completed = v.parse().unwrap_or(0),
            "resyncs_started" => seen.started = v.parse().unwrap_or(0),
            "resync_error" => seen.error = v.to_string(),
            "adapter" => seen.adapter = v == "1",
            "claim" => seen.claim = v.to_string(),
            "map_epoch" => seen.map_epoch = v.parse().unwrap_or(0),
            "batches" => seen.batches = v == "1",
            "bases" => seen.bases = v == "1",
            _ => {}
        }
    }
    seen
}

/// What the monitor knows of one worker at the start of a round.
#[derive(Debug, Clone)]
pub(crate) struct View<'a> {
    pub state: WorkerState,
    /// This round's answer, if any.
    pub seen: Option<&'a Seen>,
    /// Its boot id changed since it was last seen.
    pub restarted: bool,
    /// This orchestrator saw it miss a write.
    pub dirty: bool,
    /// Its count of completed refills when this orchestrator last asked for one.
    pub resync_base: u64,
    /// It runs in the cluster's mode.
    pub mode_ok: bool,
    /// A refill may be asked for now (they are paced after a start).
    pub may_refill: bool,
    /// Writes it was left out of are still on their way to its partner.
    pub skipped: bool,
    /// It is a worker given earlier in the list under another address (the same boot id).
    pub twin: bool,
}

/// What to tell a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// `adopt` with this value (`partial`, or the partner's `<boot>:<solo>`).
    Adopt(String),
    /// Refill from the partner as a stale worker.
    Resync,
    /// Take what the partner holds and this worker lacks, while serving.
    Merge,
}

/// A worker's next state, what to tell it first (the state applies only if that works),
/// and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub state: WorkerState,
    pub action: Option<Action>,
    pub why: &'static str,
}

/// One round's decisions for a pair (see the module docs).
pub(crate) fn decide(v: [&View; 2]) -> [Decision; 2] {
    use WorkerState::*;
    let mut d = v.map(|w| Decision {
        state: w.state,
        action: None,
        why: "",
    });
    let set = |d: &mut Decision, state, why| {
        d.state = state;
        d.why = why;
    };
    // What each answer says on its own.
    for i in 0..2 {
        if v[i].seen.is_none() {
            set(&mut d[i], Down, "not answering");
        } else if !v[i].mode_ok {
            set(
                &mut d[i],
                Misconfigured,
                "runs in another mode than the cluster (adapter mode on one side only?)",
            );
        } else if v[i].twin {
            set(
                &mut d[i],
                Misconfigured,
                "the same worker as another address given (same boot id): gets nothing, \
                 since a pair needs two workers",
            );
        } else if v[i].restarted {
            set(&mut d[i], Stale, "restarted (new boot id): will resync");
        } else if matches!(v[i].state, Down | Unknown | Misconfigured) {
            d[i].state = Unknown;
        }
    }
    // The answer of a reachable worker in the cluster's mode.
    let seen = |i: usize| v[i].seen.filter(|_| v[i].mode_ok && !v[i].twin);
    // Whether worker `i` lacks writes its partner took alone.
    let lacks = |i: usize| match (seen(i), seen(1 - i)) {
        (Some(me), Some(p)) => me.covers.lacks_solo(p.boot_id, p.solo),
        _ => false,
    };
    // Assess the workers seen for the first time, or again after being down.
    let assessing = [d[0].state == Unknown, d[1].state == Unknown];
    for i in 0..2 {
        if !assessing[i] {
            continue;
        }
        let Some(me) = seen(i) else { continue };
        let partner = seen(1 - i);
        if !me.synced {
            match partner {
                Some(p) if !p.synced && assessing[1 - i] => {
                    d[i].action = Some(Action::Adopt(format!("{:016x}:{}", p.boot_id, p.solo)));
                    set(&mut d[i], InSync, "a new pair: adopts what it holds");
                }
                _ => set(&mut d[i], Stale, "fresh: will resync"),
            }
        } else if v[i].dirty {
            set(
                &mut d[i],
                Stale,
                "missed writes while unreachable: will resync",
            );
        } else if lacks(i) {
            let partner_serves = d[1 - i].state == InSync;
            let partner_better = partner.is_some_and(|p| p.synced) && !lacks(1 - i);
            if partner_serves || partner_better {
                set(
                    &mut d[i],
                    Stale,
                    "its partner took writes it lacks: will resync before serving reads",
                );
            } else {
                set(
                    &mut d[i],
                    InSync,
                    "both took writes the other lacks: this one serves and merges",
                );
            }
        } else {
            set(&mut d[i], InSync, "its data is established");
        }
    }
    // Each state's next step (a worker just told to adopt has had its step).
    let base = [d[0].state, d[1].state];
    for i in 0..2 {
        let Some(me) = seen(i).filter(|_| d[i].action.is_none()) else {
            continue;
        };
        let partner_state = d[1 - i].state;
        let partner_gone = matches!(partner_state, Down | Misconfigured);
        match d[i].state {
            Stale if partner_state == InSync => {
                if me.phase == "running" {
                    set(&mut d[i], Resyncing, "refilling from its partner");
                } else {
                    set(
                        &mut d[i],
                        Joining,
                        "takes writes again; resyncs once those it missed have landed",
                    );
                }
            }
            Joining if partner_state == InSync && !v[i].skipped && v[i].may_refill => {
                d[i].action = Some(Action::Resync);
                set(&mut d[i], Resyncing, "resyncing from its partner");
            }
            Stale | Resyncing | Joining if partner_gone => {
                d[i].action = Some(Action::Adopt("partial".into()));
                set(
                    &mut d[i],
                    InSync,
                    "partner down: serving this worker's copy",
                );
            }
            Stale | Joining if matches!(partner_state, Stale | Joining) => {
                // Neither is in sync and both answer: a joining worker waits for an in-sync
                // partner to resync from, a stale one for a partner in sync or down, so
                // without this nothing would ever happen. The better copy leads (see
                // `leader_rank`): it is promoted with a partial copy, serves, and merges
                // what the other holds (its next round as an in-sync worker); the other
                // joins it and resyncs from it.
                let rank = |j: usize| leader_rank(base[j], seen(j), lacks(j), j);
                if rank(i) > rank(1 - i) {
                    d[i].action = Some(Action::Adopt("partial".into()));
                    let why = if (d[i].state, partner_state) == (Stale, Stale) {
                        "both stale: this copy leads"
                    } else {
                        "neither in sync: this copy leads, and merges its partner's"
                    };
                    set(&mut d[i], InSync, why);
                }
            }
            Resyncing => {
                if me.phase == "done" && me.completed > v[i].resync_base {
                    if v[i].dirty {
                        set(&mut d[i], Stale, "missed a write during its resync: again");
                    } else if lacks(i) {
                        set(
                            &mut d[i],
                            Stale,
                            "its partner took writes its snapshot did not hold: again",
                        );
                    } else {
                        set(&mut d[i], InSync, "resync done: in sync");
                    }
                } else if me.phase == "failed" {
                    set(&mut d[i], Stale, "resync failed");
                }
            }
            InSync if seen(1 - i).is_some() => {
                if lacks(i) && partner_state == InSync && !lacks(1 - i) {
                    set(
                        &mut d[i],
                        Stale,
                        "its partner took writes it lacks: will resync before serving reads",
                    );
                } else if (lacks(i) || !me.covers.complete)
                    && me.phase != "running"
                    && v[i].may_refill
                {
                    d[i].action = Some(Action::Merge);
                    d[i].why = "merging what its partner holds and it lacks, while serving";
                }
            }
            _ => {}
        }
    }
    d
}

/// How good a copy worker `j` (in `state`, which said `seen`) holds when neither worker of
/// its pair is in sync; the higher leads. First an established copy (`synced`): a worker that
/// never completed a refill since it started holds only the writes it took since, where an
/// established one lacks at most the writes its partner took alone. Then one lacking none of
/// its partner's writes. Then a joining worker over a stale one: it has taken every write
/// since it joined, where a stale one takes none, so the stale one's gap only grows. Then the
/// first of the pair. Whichever leads, nothing acknowledged is lost and nothing deleted
/// comes back: the leader keeps all it has and merges the other's copy by version (a
/// partial copy always merges), and the other resyncs from the leader.
fn leader_rank(
    state: WorkerState,
    seen: Option<&Seen>,
    lacks: bool,
    j: usize,
) -> (bool, bool, bool, bool) {
    (
        seen.is_some_and(|s| s.synced),
        !lacks,
        state == WorkerState::Joining,
        j == 0,
    )
}

/// Moves `w` to `state`, logging the change and why; returns the state it left.
fn transition(w: &WorkerLink, state: WorkerState, why: &str) -> WorkerState {
    let before = w.set_state(state);
    if before != state {
        if matches!(
            state,
            WorkerState::Down | WorkerState::Stale | WorkerState::Misconfigured
        ) {
            tracing::warn!(worker = %w.addr, from = before.name(), to = state.name(), "{why}");
        } else {
            tracing::info!(worker = %w.addr, from = before.name(), to = state.name(), "{why}");
        }
    }
    before
}

/// Whether this orchestrator holds its node id, from the workers' answers to its claim in a
/// round: every one `ok`. `None` when none answered: nothing was learned, and the claims
/// made before stand for their time to live (several rounds). Taking that for a refusal
/// stopped every write for a whole health interval whenever one round's checks all timed
/// out, as they can on a loaded machine.
fn claims_hold(answers: &[&str]) -> Option<bool> {
    (!answers.is_empty()).then(|| answers.iter().all(|a| *a == "ok"))
}

impl Router {
    /// Checks every worker each `interval` until `shutdown`, driving the states above; every
    /// fifth round also checks that partners share their encryption key.
    pub async fn monitor(self: Arc<Self>, config: HealthConfig, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Long enough to survive a few missed rounds; short enough that an orchestrator
        // killed without releasing its id frees it soon.
        let claim_ttl = (config.interval * 5 + config.timeout).max(Duration::from_secs(1));
        for round in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            let claim = format!(
                "claim {} {:016x} {}",
                self.clock.node(),
                self.instance,
                claim_ttl.as_millis()
            );
            let this = &self;
            // One snapshot for the round: the pairs may change meanwhile.
            let topo = self.pairs();
            let polls = topo.iter().flat_map(|p| &p.workers).map(|w| {
                let claim = &claim;
                async move { this.poll(w, config.timeout, claim).await }
            });
            let seen: Vec<Option<Seen>> = join_all(polls).await;
            let twins = self.twins(&topo, &seen);
            self.settle_claims(&seen);
            let epochs: Vec<_> = topo
                .iter()
                .flat_map(|p| &p.workers)
                .zip(&seen)
                .filter_map(|(w, s)| Some((w.clone(), s.as_ref()?.map_epoch)))
                .collect();
            self.compare_epochs(&epochs).await;
            let Some(mode) = self.mode().or_else(|| self.learn_mode(&seen)) else {
                continue;
            };
            for ((pair, seen), twins) in topo.iter().zip(seen.chunks(2)).zip(twins.chunks(2)) {
                self.step(
                    pair,
                    [seen[0].as_ref(), seen[1].as_ref()],
                    [twins[0], twins[1]],
                    config.timeout,
                    mode,
                )
                .await;
            }
            if round % 5 == 0 {
                self.check_keys().await;
            }
        }
        let release = format!("release {} {:016x}", self.clock.node(), self.instance);
        let topo = self.pairs();
        for w in topo.iter().flat_map(|p| &p.workers) {
            self.poll(w, config.timeout, &release).await;
        }
    }

    async fn poll(&self, w: &WorkerLink, timeout: Duration, claim: &str) -> Option<Seen> {
        let mut req = Request::new(Op::Status, Bytes::new());
        req.value = Bytes::copy_from_slice(claim.as_bytes());
        let deadline = tokio::time::Instant::now() + timeout;
        let reply = loop {
            // A link still connecting (just started) is waited for, within the timeout.
            match w.send_control(&req) {
                Some(reply) => break reply,
                None if w.state() == WorkerState::Unknown
                    && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                None => return None,
            }
        };
        // A worker still answering other requests on its links is busy, not gone: its
        // status waits behind a queue. It gets up to PATIENCE timeouts, as its requests do.
        let last_chance = deadline + timeout * (PATIENCE - 1);
        let mut deadline = deadline;
        tokio::pin!(reply);
        let answer = loop {
            match tokio::time::timeout_at(deadline, &mut reply).await {
                Ok(answer) => break answer,
                Err(_) if deadline < last_chance && w.silent_for() < timeout => {
                    deadline += timeout;
                }
                Err(_) => return None,
            }
        };
        match answer {
            Ok(resp) if resp.status == Status::Ok => {
                w.accepted();
                Some(parse(&String::from_utf8_lossy(&resp.payload)))
            }
            Ok(resp) if resp.status == Status::NoAuth => {
                w.refusing(
                    "the worker requires cluster authentication: give the orchestrator and \
                     every worker the same --cluster-secret-file",
                );
                None
            }
            _ => None,
        }
    }

    /// For each worker (in list order), whether an earlier one answered with the same boot id:
    /// one worker given under two addresses. Logged as an error when first seen.
    fn twins(&self, topo: &Topology, seen: &[Option<Seen>]) -> Vec<bool> {
        let links: Vec<&Arc<WorkerLink>> = topo.iter().flat_map(|p| &p.workers).collect();
        let boot = |i: usize| seen[i].as_ref().map(|s| s.boot_id).filter(|b| *b != 0);
        (0..seen.len())
            .map(|i| {
                let Some(first) = (0..i).find(|&j| boot(j).is_some() && boot(j) == boot(i)) else {
                    return false;
                };
                if links[i].state() != WorkerState::Misconfigured {
                    tracing::error!(
                        worker = %links[i].addr,
                        same_as = %links[first].addr,
                        "{} and {} are the same worker (boot id {:016x}): the second gets \
                         nothing; give each pair two different workers",
                        links[first].addr,
                        links[i].addr,
                        boot(i).unwrap_or(0)
                    );
                }
                true
            })
            .collect()
    }

    /// The mode most answering workers report (nothing on a tie, or before any answers).
    fn learn_mode(&self, seen: &[Option<Seen>]) -> Option<Mode> {
        let answers: Vec<bool> = seen.iter().flatten().map(|s| s.adapter).collect();
        let adapters = answers.iter().filter(|a| **a).count();
        let mode = match (adapters * 2).cmp(&answers.len()) {
            _ if answers.is_empty() => return None,
            std::cmp::Ordering::Greater => Mode::Adapter,
            std::cmp::Ordering::Less => Mode::Replicated,
            std::cmp::Ordering::Equal => {
                tracing::error!(
                    "as many workers run in adapter mode as not; start them all the same way, \
                     or give the orchestrator --mode"
                );
                return None;
            }
        };
        Some(self.settle_mode(mode))
    }

    /// Writes are allowed while every answering worker accepts this orchestrator's node id.
    /// On a clash a random id is redrawn (claimed in the next round); a stated one is an
    /// error until the other orchestrator goes away.
    fn settle_claims(&self, seen: &[Option<Seen>]) {
        let answers: Vec<&str> = seen.iter().flatten().map(|s| s.claim.as_str()).collect();
        let Some(claimed) = claims_hold(&answers) else {
            return;
        };
        let clash = answers.contains(&"conflict");
        let clashed_before = self.clashed.swap(clash, Ordering::AcqRel);
        self.set_claimed(claimed);
        if clash {
            let node = self.clock.node();
            if self.fixed_node {
                if !clashed_before {
                    tracing::error!(
                        node_id = node,
                        "another orchestrator uses this --node-id: writes wait until it stops \
                         (give each orchestrator its own id)"
                    );
                }
            } else {
                let fresh = loop {
                    let n: u8 = rand::random();
                    if n != node {
                        break n;
                    }
                };
                tracing::warn!(
                    from = node,
                    to = fresh,
                    "another orchestrator holds this node id: drew another"
                );
                self.clock.set_node(fresh);
            }
        }
    }

    async fn call(&self, w: &WorkerLink, op: Op, value: &str) -> bool {
        self.ask(w, op, value).await.is_some()
    }

    /// One health round for the pairs of `topo` that `old` does not have (a map read from the
    /// workers names pairs this orchestrator has not seen), before it routes by it: requests
    /// for their slots would otherwise find no worker assessed until the next round.
    pub(crate) async fn assess_new(&self, topo: &Topology, old: &Topology) {
        let Some(mode) = self.mode() else {
            return;
        };
        let timeout = self.worker_timeout;
        for pair in topo
            .iter()
            .filter(|p| !old.iter().any(|o| Arc::ptr_eq(o, p)))
        {
            let seen = join_all(pair.workers.iter().map(|w| self.poll(w, timeout, ""))).await;
            let seen = [seen[0].as_ref(), seen[1].as_ref()];
            self.step(pair, seen, [false, false], timeout, mode).await;
        }
    }

    /// One round for one pair: decide, then tell the workers.
    async fn step(
        &self,
        pair: &Pair,
        seen: [Option<&Seen>; 2],
        twins: [bool; 2],
        timeout: Duration,
        mode: Mode,
    ) {
        let adapter = mode == Mode::Adapter;
        let views = [0, 1].map(|i| {
            let w = &pair.workers[i];
            let s = seen[i];
            let restarted = match s {
                Some(s) => w
                    .boot
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(s.boot_id)
                    .is_some_and(|before| before != s.boot_id),
                None => false,
            };
            if restarted {
                w.dirty.store(true, Ordering::Release);
            }
            if let Some(s) = s {
                w.synced_at.store(s.synced_at, Ordering::Release);
            }
            View {
                state: w.state(),
                seen: s,
                restarted,
                dirty: w.dirty.load(Ordering::Acquire),
                resync_base: w.resync_base.load(Ordering::Acquire),
                mode_ok: s.is_none_or(|s| s.adapter == adapter),
                may_refill: w.may_refill(),
                skipped: w.skipped.load(Ordering::Acquire) > 0,
                twin: twins[i],
            }
        });
        for (w, s) in pair.workers.iter().zip(seen) {
            if let Some(s) = s {
                let partial = !adapter && s.synced && !s.covers.complete;
                w.partial.store(partial, Ordering::Release);
                w.takes_batches.store(s.batches, Ordering::Relaxed);
                w.set_takes_bases(s.bases);
                // Once every refill it started has ended (and on first sight: drops an
                // earlier run of this orchestrator retried are forgotten), it drops what
                // its pair does not hold. Slots move only in replicated mode.
                let refills = (s.boot_id, s.started);
                let mut swept = w.swept.lock().unwrap_or_else(|e| e.into_inner());
                if !adapter && s.phase != "running" && *swept != Some(refills) {
                    *swept = Some(refills);
                    self.sweep_later(w);
                }
            }
        }
        let mismatch = views.iter().any(|v| !v.mode_ok);
        if pair.mode_mismatch.swap(mismatch, Ordering::Relaxed) != mismatch && !mismatch {
            tracing::info!("the workers of this pair now run in the cluster's mode");
        }
        let decisions = decide([&views[0], &views[1]]);
        for (i, d) in decisions.into_iter().enumerate() {
            let (w, partner) = (&pair.workers[i], &pair.workers[1 - i]);
            let done = match &d.action {
                None => true,
                Some(Action::Adopt(how)) => self.call(w, Op::Adopt, how).await,
                // Where the workers reach each other, which may not be where we reach them.
                Some(Action::Resync) => self.call(w, Op::Resync, peer(&partner.addr)).await,
                Some(Action::Merge) => {
                    let value = format!("{} merge", peer(&partner.addr));
                    self.call(w, Op::Resync, &value).await
                }
            };
            if !done {
                continue;
            }
            if matches!(&d.action, Some(Action::Resync | Action::Merge)) {
                RouterStats::count(&self.stats.resyncs_started);
            }
            match &d.action {
                Some(Action::Resync) => {
                    let completed = seen[i].map_or(0, |s| s.completed);
                    w.resync_base.store(completed, Ordering::Release);
                    w.dirty.store(false, Ordering::Release);
                    w.refill_started();
                }
                Some(Action::Merge) => {
                    w.refill_started();
                    tracing::info!(worker = %w.addr, partner = %partner.addr, "{}", d.why);
                }
                Some(Action::Adopt(how)) => {
                    w.dirty.store(false, Ordering::Release);
                    // Known partial from now, not from its next status: it is about to be
                    // in sync, and no program may run on it meanwhile (`Router::primaries`).
                    w.partial
                        .store(how == "partial" && !adapter, Ordering::Release);
                }
                None => {}
            }
            if d.state == WorkerState::Resyncing && d.action.is_none() {
                // Following a refill already running: it counts once it completes.
                let completed = seen[i].map_or(0, |s| s.completed);
                w.resync_base.store(completed, Ordering::Release);
                w.dirty.store(false, Ordering::Release);
            }
            let before = transition(w, d.state, d.why);
            if d.state == WorkerState::Down && before != WorkerState::Down {
                tokio::spawn(name_what_answers(
                    crate::config::dialed(&w.addr).to_string(),
                    w.secret().cloned(),
                    w.tls().cloned(),
                    timeout,
                ));
            }
            if before != d.state {
                RouterStats::count(&self.stats.state_changes);
                if before == WorkerState::Resyncing && d.state == WorkerState::InSync {
                    RouterStats::count(&self.stats.resyncs_completed);
                }
            }
        }
    }
}

/// Logs what answers at the address of a worker that stopped answering, when it is certainly
/// not a worker (a Redis server, an orchestrator): a mistake in the worker list that "not
/// answering" alone would hide.
async fn name_what_answers(
    addr: String,
    secret: Option<ClusterSecret>,
    tls: Option<Connector>,
    timeout: Duration,
) {
    let identity = identify(&addr, secret.as_ref(), tls.as_ref(), timeout).await;
    if identity.is_misplaced() {
        tracing::error!(
            worker = %addr,
            "this worker address is {}: check the workers given",
            identity.describe()
        );
    } else if identity == crate::identify::Identity::Silent {
        tracing::info!(
            worker = %addr,
            "no answer in time at this worker address, to the worker protocol nor to PING: \
             a worker busy or stopped, or not a worker"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkerState::*;

    #[test]
    fn parses_worker_status() {
        let s = parse("boot_id:00000000000000ff\r\nsynced:1\r\nsolo:4\r\ncovers:00000000000000aa:2:1\r\nresync:done\r\nresyncs_completed:3\r\nresync_error:\r\nclaim:ok\r\n");
        assert_eq!(s.boot_id, 255);
        assert!(s.synced);
        assert_eq!(s.solo, 4);
        assert_eq!(
            s.covers,
            Coverage {
                partner_boot: 0xaa,
                partner_solo: 2,
                complete: true
            }
        );
        assert_eq!(s.phase, "done");
        assert_eq!(s.completed, 3);
        assert_eq!(s.claim, "ok");
    }

    /// A worker's answer: its boot id, synced flag, writes taken alone, and coverage of its
    /// partner (boot, solo, complete).
    fn seen(boot: u64, synced: bool, solo: u64, covers: (u64, u64, bool)) -> Seen {
        Seen {
            boot_id: boot,
            synced,
            solo,
            covers: Coverage {
                partner_boot: covers.0,
                partner_solo: covers.1,
                complete: covers.2,
            },
            phase: "idle".into(),
            ..Seen::default()
        }
    }

    fn view(state: WorkerState, seen: Option<&Seen>) -> View<'_> {
        View {
            state,
            seen,
            restarted: false,
            dirty: false,
            resync_base: 0,
            mode_ok: true,
            may_refill: true,
            skipped: false,
            twin: false,
        }
    }

    fn states(d: &[Decision; 2]) -> [WorkerState; 2] {
        [d[0].state, d[1].state]
    }

    #[test]
    fn a_new_pair_adopts_what_it_holds() {
        let (a, b) = (
            seen(1, false, 0, (0, 0, false)),
            seen(2, false, 0, (0, 0, false)),
        );
        let d = decide([&view(Unknown, Some(&a)), &view(Unknown, Some(&b))]);
        assert_eq!(states(&d), [InSync, InSync]);
        assert_eq!(
            d[0].action,
            Some(Action::Adopt("0000000000000002:0".into()))
        );
        assert_eq!(
            d[1].action,
            Some(Action::Adopt("0000000000000001:0".into()))
        );
    }

    /// The lost write of issue 9: A was unreachable when this orchestrator started, B took
    /// a write alone; A comes back with its `synced` flag set, and must resync first.
    #[test]
    fn a_worker_that_missed_writes_while_unreachable_resyncs_first() {
        let a = seen(1, true, 0, (2, 0, true));
        let b = seen(2, true, 1, (1, 0, true));
        let d = decide([&view(Down, Some(&a)), &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Joining, InSync]);
        assert_eq!(d[0].action, None);
        // Not while writes it was left out of are still on their way to B (a snapshot
        // taken now could miss them), nor before its refill is due.
        let mut va = view(Joining, Some(&a));
        va.skipped = true;
        let d = decide([&va, &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Joining, InSync]);
        va.skipped = false;
        va.may_refill = false;
        let d = decide([&va, &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Joining, InSync]);
        let d = decide([&view(Joining, Some(&a)), &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Resyncing, InSync]);
        assert_eq!(d[0].action, Some(Action::Resync));
        // A refill whose snapshot missed some of B's writes is not enough.
        let mut done = a.clone();
        done.phase = "done".into();
        done.completed = 1;
        let d = decide([&view(Resyncing, Some(&done)), &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Stale, InSync]);
        done.covers.partner_solo = 1;
        let d = decide([&view(Resyncing, Some(&done)), &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [InSync, InSync]);
    }

    /// An orchestrator that restarts while a worker is stale learns it from the partner's
    /// count of writes taken alone.
    #[test]
    fn a_restarted_orchestrator_sees_which_worker_is_stale() {
        let a = seen(1, true, 0, (2, 3, true));
        let b = seen(2, true, 5, (1, 0, true));
        let d = decide([&view(Unknown, Some(&a)), &view(Unknown, Some(&b))]);
        assert_eq!(states(&d), [Joining, InSync]);
        // Either order of assessment gives the same answer.
        let d = decide([&view(Unknown, Some(&b)), &view(Unknown, Some(&a))]);
        assert_eq!(states(&d), [InSync, Joining]);
    }

    #[test]
    fn an_in_sync_worker_another_orchestrator_saw_miss_a_write_becomes_stale() {
        let a = seen(1, true, 0, (2, 0, true));
        let b = seen(2, true, 1, (1, 0, true));
        let d = decide([&view(InSync, Some(&a)), &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Stale, InSync]);
    }

    #[test]
    fn a_promoted_worker_merges_its_returning_partners_data() {
        // A was promoted (partial) while B was away; B comes back.
        let a = seen(1, true, 7, (2, 0, false));
        let b = seen(2, true, 2, (1, 0, true));
        let d = decide([&view(InSync, Some(&a)), &view(Down, Some(&b))]);
        assert_eq!(states(&d), [InSync, Joining]);
        assert_eq!(d[0].action, Some(Action::Merge));
        // While its merge runs, nothing more is asked.
        let mut a2 = a.clone();
        a2.phase = "running".into();
        let d = decide([&view(InSync, Some(&a2)), &view(Joining, Some(&b))]);
        assert_eq!(d[0].action, None);
        assert_eq!(d[1].action, Some(Action::Resync));
    }

    #[test]
    fn both_diverged_one_serves_and_merges_the_other_resyncs() {
        let a = seen(1, true, 3, (2, 0, true));
        let b = seen(2, true, 4, (1, 0, true));
        let d = decide([&view(Unknown, Some(&a)), &view(Unknown, Some(&b))]);
        assert_eq!(states(&d), [InSync, Joining]);
        assert_eq!(d[0].action, Some(Action::Merge));
    }

    #[test]
    fn a_stale_or_resyncing_worker_whose_partner_is_down_is_promoted() {
        let a = seen(1, true, 0, (2, 0, true));
        for state in [Stale, Joining, Resyncing] {
            let d = decide([&view(state, Some(&a)), &view(InSync, None)]);
            assert_eq!(states(&d), [InSync, Down]);
            assert_eq!(d[0].action, Some(Action::Adopt("partial".into())));
        }
    }

    #[test]
    fn a_restarted_worker_resyncs_and_a_missed_write_repeats_the_resync() {
        let a = seen(9, false, 0, (0, 0, false));
        let b = seen(2, true, 0, (1, 0, true));
        let mut va = view(InSync, Some(&a));
        va.restarted = true;
        let d = decide([&va, &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Joining, InSync]);
        let mut done = a.clone();
        done.phase = "done".into();
        done.completed = 1;
        let mut va = view(Resyncing, Some(&done));
        va.dirty = true;
        va.may_refill = false;
        let d = decide([&va, &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [Stale, InSync]);
        va.dirty = false;
        let d = decide([&va, &view(InSync, Some(&b))]);
        assert_eq!(states(&d), [InSync, InSync]);
    }

    #[test]
    fn a_worker_in_another_mode_is_misconfigured_and_its_partner_serves_alone() {
        let a = seen(1, true, 0, (2, 0, true));
        let b = seen(2, true, 0, (1, 0, true));
        let mut vb = view(InSync, Some(&b));
        vb.mode_ok = false;
        let d = decide([&view(InSync, Some(&a)), &vb]);
        assert_eq!(states(&d), [InSync, Misconfigured]);
        assert_eq!(d[0].action, None);
    }

    #[test]
    fn a_worker_given_twice_gets_nothing_and_its_partner_serves_alone() {
        let a = seen(1, false, 0, (0, 0, false));
        let mut twin = view(Unknown, Some(&a));
        twin.twin = true;
        let d = decide([&view(Unknown, Some(&a)), &twin]);
        assert_eq!(states(&d), [InSync, Misconfigured]);
        assert!(d[1].why.contains("same worker"), "{}", d[1].why);
        assert_eq!(d[0].action, Some(Action::Adopt("partial".into())));
        assert_eq!(d[1].action, None);
    }

    #[test]
    fn a_round_no_worker_answered_leaves_the_claim_as_it_was() {
        assert_eq!(claims_hold(&[]), None);
        assert_eq!(claims_hold(&["ok", "ok"]), Some(true));
        assert_eq!(claims_hold(&["ok", "conflict"]), Some(false));
        assert_eq!(claims_hold(&["ok", ""]), Some(false));
    }

    #[test]
    fn reads_prefer_a_complete_copy_to_a_partial_one() {
        use crate::cluster::read_rank;
        let complete = read_rank(InSync, false);
        let partial = read_rank(InSync, true);
        assert!(complete < partial);
        for behind in [Stale, Resyncing, Joining] {
            assert!(partial < read_rank(behind, false));
            assert_eq!(read_rank(behind, true), read_rank(behind, false));
        }
        for never in [Unknown, Down, Misconfigured] {
            assert_eq!(read_rank(never, false), None);
        }
        // The monitor flags a promoted worker's copy as partial from its status.
        let promoted = parse(
            "boot_id:0000000000000001\r\nsynced:1\r\nsolo:0\r\ncovers:0000000000000002:0:0\r\n",
        );
        assert!(promoted.synced && !promoted.covers.complete);
    }

    /// The stuck pair of a slot move without a rate limit: one worker joining (it came back
    /// after being down, and takes writes), the other stale (it missed a write since). Each
    /// took writes the other lacks. Before, neither rule applied and the pair stayed so,
    /// with no worker in sync, for as long as the run lasted.
    #[test]
    fn joining_and_stale_the_better_copy_leads() {
        // A joined and has taken B's missed write since (solo 1); B took writes alone while
        // A was down (solo 3), and was promoted without a full copy.
        let a = seen(1, true, 1, (2, 0, true));
        let b = seen(2, true, 3, (1, 0, false));
        for (order, [va, vb]) in [
            ("joining first", [(Joining, &a), (Stale, &b)]),
            ("stale first", [(Stale, &b), (Joining, &a)]),
        ] {
            let d = decide([&view(va.0, Some(va.1)), &view(vb.0, Some(vb.1))]);
            let (lead, other) = if va.0 == Joining { (0, 1) } else { (1, 0) };
            assert_eq!(d[lead].state, InSync, "{order}: {d:?}");
            assert_eq!(
                d[lead].action,
                Some(Action::Adopt("partial".into())),
                "{order}"
            );
            assert_eq!(d[other].action, None, "{order}");
            assert!(matches!(d[other].state, Stale | Joining), "{order}: {d:?}");
        }
        // An established copy leads over a fresh one (it restarted, joined, and has taken
        // a write its partner missed since): the fresh one holds only what it took since.
        let fresh = seen(9, false, 1, (0, 0, false));
        let old = seen(2, true, 1, (1, 0, true));
        let d = decide([&view(Joining, Some(&fresh)), &view(Stale, Some(&old))]);
        assert_eq!(states(&d), [Joining, InSync], "{d:?}");
        assert_eq!(d[1].action, Some(Action::Adopt("partial".into())));
        // The leader, partial, merges its partner's copy; the partner resyncs from it.
        let mut promoted = old.clone();
        promoted.covers.complete = false;
        let d = decide([&view(Joining, Some(&fresh)), &view(InSync, Some(&promoted))]);
        assert_eq!(d[0].action, Some(Action::Resync));
        assert_eq!(d[1].action, Some(Action::Merge));
    }

    /// A pair of workers in a model of what the orchestrator's actions do to them: which of
    /// the pair's writes each holds, and what it reports.
    #[derive(Debug, Clone)]
    struct Model {
        state: [WorkerState; 2],
        seen: [Seen; 2],
        dirty: [bool; 2],
        base: [u64; 2],
        /// Which writes each holds: bit 0 the pair's established data, bit 1 what worker 0
        /// took alone, bit 2 what worker 1 took alone.
        holds: [u8; 2],
        /// A refill running on each (it ends before the next round).
        refilling: [bool; 2],
    }

    impl Model {
        /// Both answer; each in `state`, `synced` or fresh, lacking its partner's writes
        /// or not, with its last refill in `phase`.
        fn new(
            state: [WorkerState; 2],
            synced: [bool; 2],
            lacks: [bool; 2],
            phase: [&str; 2],
            dirty: [bool; 2],
        ) -> Model {
            let boot = [1, 2];
            let mut seen = [0, 1].map(|i| {
                let mut s = seen(boot[i], synced[i], 0, (boot[1 - i], 0, true));
                s.phase = phase[i].into();
                s.completed = u64::from(phase[i] == "done");
                s
            });
            let mut holds = [0, 1].map(|i| u8::from(synced[i]));
            for i in 0..2 {
                if lacks[1 - i] {
                    // Worker i took a write alone, which its partner lacks.
                    seen[i].solo = 1;
                    holds[i] |= 2 << i;
                }
            }
            Model {
                state,
                seen,
                dirty,
                base: [0; 2],
                holds,
                refilling: phase.map(|p| p == "running"),
            }
        }

        /// One health round; returns its decisions.
        fn round(&mut self) -> [Decision; 2] {
            let views = [0, 1].map(|i| View {
                dirty: self.dirty[i],
                resync_base: self.base[i],
                ..view(self.state[i], Some(&self.seen[i]))
            });
            let d = decide([&views[0], &views[1]]);
            for (i, d) in d.iter().enumerate() {
                let partner = self.seen[1 - i].clone();
                match &d.action {
                    Some(Action::Adopt(how)) => {
                        let s = &mut self.seen[i];
                        s.synced = true;
                        if how == "partial" {
                            s.covers.complete = false;
                        } else {
                            s.covers = Coverage {
                                partner_boot: partner.boot_id,
                                partner_solo: partner.solo,
                                complete: true,
                            };
                        }
                        self.dirty[i] = false;
                    }
                    Some(Action::Resync | Action::Merge) => {
                        if matches!(d.action, Some(Action::Resync)) {
                            self.base[i] = self.seen[i].completed;
                            self.dirty[i] = false;
                        }
                        self.seen[i].phase = "running".into();
                        self.refilling[i] = true;
                    }
                    None => {}
                }
                if d.state == Resyncing && d.action.is_none() {
                    self.base[i] = self.seen[i].completed;
                    self.dirty[i] = false;
                }
                self.state[i] = d.state;
            }
            // The refills end between rounds: each takes what its partner holds.
            let before = self.clone();
            for i in 0..2 {
                if std::mem::take(&mut self.refilling[i]) {
                    let p = &before.seen[1 - i];
                    let s = &mut self.seen[i];
                    s.phase = "done".into();
                    s.completed += 1;
                    s.synced = true;
                    s.covers = Coverage {
                        partner_boot: p.boot_id,
                        partner_solo: p.solo,
                        complete: true,
                    };
                    self.holds[i] |= before.holds[1 - i];
                }
            }
            d
        }
    }

    /// Every combination of states of a pair whose workers both answer, with every mix of
    /// established or fresh copies, writes the other lacks, the last refill's phase and a
    /// miss seen here: within a few rounds a worker is in sync (no combination waits
    /// forever, as joining and stale did), and soon both are, each holding every write
    /// either held (nothing acknowledged is lost on the way).
    #[test]
    fn every_pair_of_states_gets_a_worker_in_sync() {
        let states_all = [
            Unknown,
            InSync,
            Down,
            Stale,
            Resyncing,
            Misconfigured,
            Joining,
        ];
        let phases = ["idle", "running", "done", "failed"];
        let mut cases = 0;
        for s in states_all.iter().flat_map(|&a| states_all.map(|b| [a, b])) {
            for p in phases.iter().flat_map(|&a| phases.map(|b| [a, b])) {
                for flags in 0..64u32 {
                    let flag = |k: u32| [flags & (1 << k) != 0, flags & (1 << (k + 1)) != 0];
                    let (synced, lacks, dirty) = (flag(0), flag(2), flag(4));
                    if !reachable(s, p, synced, lacks, dirty) {
                        continue;
                    }
                    let start = Model::new(s, synced, lacks, p, dirty);
                    let all_writes = start.holds[0] | start.holds[1];
                    let mut m = start.clone();
                    let mut trace = Vec::new();
                    let mut first_in_sync = None;
                    for round in 0..12 {
                        let d = m.round();
                        trace.push(format!(
                            "{:?} {:?}",
                            states(&d),
                            [&d[0].action, &d[1].action]
                        ));
                        if first_in_sync.is_none() && m.state.contains(&InSync) {
                            first_in_sync = Some(round);
                        }
                    }
                    let trace = trace.join("\n");
                    let first = first_in_sync
                        .unwrap_or_else(|| panic!("never in sync from {start:?}:\n{trace}"));
                    assert!(
                        first <= 2,
                        "in sync after {first} rounds, {start:?}:\n{trace}"
                    );
                    assert_eq!(m.state, [InSync, InSync], "from {start:?}:\n{trace}");
                    assert_eq!(m.holds, [all_writes; 2], "lost from {start:?}:\n{trace}");
                    cases += 1;
                }
            }
        }
        assert!(cases > 5_000, "{cases} cases");
    }

    /// Whether a pair can be found so: the model's combinations that the workers and the
    /// monitor can produce.
    fn reachable(
        s: [WorkerState; 2],
        phase: [&str; 2],
        synced: [bool; 2],
        lacks: [bool; 2],
        dirty: [bool; 2],
    ) -> bool {
        let assessed = |s| matches!(s, Unknown | Down | Misconfigured);
        // Each condition reads "if this, then that".
        let each = (0..2).all(|i| {
            // A miss seen here is on record as a write its partner took alone.
            (!dirty[i] || lacks[i])
                // In sync only once adopted or refilled (a restart since is noticed, and
                // makes it stale).
                && (s[i] != InSync || synced[i])
                // Resyncing once a refill runs or has run: a restart resets the phase, and
                // makes it stale.
                && (s[i] != Resyncing || phase[i] != "idle")
                // A refill that completed established the copy.
                && (phase[i] != "done" || synced[i])
        });
        // Two fresh workers assessed together are a new pair: each adopts the other's count
        // as it reads then, so a write one took alone before shows (the count moves past it)
        // and is merged, and none is held in this model's terms.
        let new_pair = assessed(s[0]) && assessed(s[1]) && synced == [false; 2];
        each && (!new_pair || lacks == [false; 2])
    }

    #[test]
    fn both_stale_the_better_copy_leads() {
        // B lacks A's writes; A lacks nothing of B's.
        let a = seen(1, true, 2, (2, 0, true));
        let b = seen(2, true, 0, (1, 0, true));
        let d = decide([&view(Stale, Some(&a)), &view(Stale, Some(&b))]);
        assert_eq!(d[0].state, InSync);
        assert_eq!(d[0].action, Some(Action::Adopt("partial".into())));
        // B joins the leader in the same round, and resyncs from it in the next.
        assert_eq!(d[1].state, Joining);
    }
}
