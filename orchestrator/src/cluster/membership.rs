//! Membership changes while clients go on: a worker replaced, a pair added, any pair removed.
//!
//! What is wanted (a list of pairs, from `--cluster-file` on SIGHUP or from a `CLUSTER`
//! command) is compared with the pairs now, and the difference is made, step by step, by one
//! task ([`Router::run_membership`]):
//!
//! 1. **Replacements.** A wanted pair sharing one address with a current pair replaces the
//!    other worker, once the worker kept is in sync with a complete copy: the new worker
//!    joins its pair unassessed, and the health monitor has it refill from its partner (the
//!    resync machinery) before it serves reads.
//! 2. **Additions.** New pairs join holding no slot; a move to one waits until a worker of
//!    it is in sync and none is still being assessed (a new pair adopts what it holds).
//! 3. **Slot moves** to the target map (`SlotMap::rebalanced`), one batch of contiguous
//!    slots at a time ([`Router::begin_move`], [`Router::finish_move`]):
//!    - the map gives the slots to the new pair and marks them *moving*: writes go to the
//!      new pair, reads that miss there look on the old one, deletes go to both;
//!    - once every request routed by the old map is answered (its `Arc` is ours alone),
//!      each in-sync worker of the new pair pulls the slots' entries from an in-sync worker
//!      of the old pair (`slots import`: the snapshot machinery filtered by slot, stored
//!      bytes as they are, paced by `--move-rate-limit`) and merges them by version, so a
//!      write or delete made there during the move is newer and wins; a worker of the new
//!      pair that is not in sync (down, refilling) is recorded as having missed them and
//!      refills from its partner, so it never holds up the change;
//!    - the mark is lifted, requests routed with it drain, and both workers of the old pair
//!      drop the slots (`slots drop`); a worker that does not answer is told again every
//!      second. A refill between two partners can bring back slots one of them dropped
//!      already, so a worker whose refills have ended is told to drop every slot its pair
//!      does not hold ([`Router::sweep_later`]); no slot moves to a pair before its workers
//!      have dropped what they were told to.
//! 4. **Removals.** A pair holding no slot any more is taken out and its links closed.
//!
//! A step that fails (no worker of a pair in sync, an import into an in-sync worker that
//! keeps failing, the state file not written) ends the attempt; the task tries again a
//! second later from where the map is, and a move under way is finished first, so a change
//! resumes rather than restarts.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use twincache_client::PATIENCE;

use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use twincache_protocol::cluster_map::ClusterMap;
use twincache_protocol::frame::Op;
use twincache_protocol::slots::{Move, SlotMap, SlotRange};

use super::shared::{self, NoLease};
use super::{Pair, Router, Topology, WorkerLink, WorkerState};

/// `m` locked; a panic under it (none is expected) leaves the lists it guards usable.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a change waits for a pair to be in sync before the attempt fails (and is tried
/// again).
const SYNC_WAIT: Duration = Duration::from_secs(30);
/// How often an import's progress is asked for.
const POLL: Duration = Duration::from_millis(20);
/// Attempts at one import before the step fails.
const IMPORT_TRIES: usize = 3;
/// An import whose worker stops answering for this long has failed.
const IMPORT_SILENCE: Duration = Duration::from_secs(5);

/// How membership changes go, fixed at start.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Stored bytes per second a receiving worker may copy (`--move-rate-limit`, 0: none).
    pub rate: u64,
    /// Slots per move (`--move-batch-slots`).
    pub batch: usize,
    /// The pairs come from `--cluster-file`: CLUSTER commands are refused, since the next
    /// reload would undo them.
    pub from_file: bool,
    /// The orchestrator's own address (`--listen`), which no worker may have.
    pub listen: std::net::SocketAddr,
}

/// What is asked for, and how the change goes.
pub struct Membership {
    wanted: Mutex<Vec<[String; 2]>>,
    /// Held by [`Router::want`] from reading the wanted list to replacing it, so that two
    /// changes asked for at once (CLUSTER on two connections, SIGHUP) do not undo each other.
    asking: Mutex<()>,
    wake: Notify,
    progress: Mutex<Progress>,
    config: MembershipConfig,
    /// Slots moved away that a worker of their old pair could not be told to drop (it was
    /// down), retried every second. No slot moves back to that pair
    /// before they are dropped, or an old copy there could outlive a delete.
    pending_drops: Mutex<Vec<(String, SlotRange)>>,
    /// Workers to be told to drop every slot their pair does not hold (see
    /// [`Router::sweep_later`]), until they have. No slot moves to their pair before.
    sweeps: Mutex<Vec<String>>,
}

/// Why an attempt under the lease did not end in a change made (or nothing to do).
enum Stopped {
    /// Another orchestrator holds the lease for changes: not an error, tried again.
    Waiting(String),
    Failed(String),
}

/// How the current (or last) change goes, for INFO, `status` and the log.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// `idle`, `asked` (a change waits for the lease for changes), `waiting` (another
    /// orchestrator holds that lease), `replacing`, `joining`, `moving`, `removing`, or
    /// `retrying` after an error.
    pub phase: &'static str,
    pub slots_done: usize,
    pub slots_total: usize,
    pub keys: u64,
    pub bytes: u64,
    pub started: Option<Instant>,
    /// When the change counted here completed: the next one starts its counts afresh, and
    /// the rate shown meanwhile is over the change's own time.
    pub finished: Option<Instant>,
    pub error: String,
    /// A summary of the last change that completed.
    pub last: String,
}

impl Progress {
    /// An attempt at a change begins: a new change starts its counts at zero, a retried one
    /// keeps them. (Not told apart by phase: a new change is `asked` or `waiting` here, as a
    /// retried one can be, and its counts used to be added to the last change's.)
    fn begin(&mut self, at: Instant) {
        if self.started.is_none() || self.finished.is_some() {
            (self.started, self.finished) = (Some(at), None);
            (self.slots_done, self.slots_total) = (0, 0);
            (self.keys, self.bytes) = (0, 0);
        }
        self.error.clear();
    }
}

impl Membership {
    /// Wants `wanted` (pairs), taken up at once: it may differ from the pairs now, or a move
    /// a stop interrupted may be left to finish.
    pub(crate) fn new(wanted: Vec<[String; 2]>, config: MembershipConfig) -> Membership {
        let wake = Notify::new();
        wake.notify_one();
        Membership {
            wanted: Mutex::new(wanted),
            asking: Mutex::new(()),
            wake,
            progress: Mutex::new(Progress {
                phase: "idle",
                ..Progress::default()
            }),
            config,
            pending_drops: Mutex::default(),
            sweeps: Mutex::default(),
        }
    }

    pub fn from_file(&self) -> bool {
        self.config.from_file
    }

    /// The pairs asked for last.
    pub fn wanted(&self) -> Vec<[String; 2]> {
        locked(&self.wanted).clone()
    }

    fn set_wanted(&self, wanted: Vec<[String; 2]>) {
        *locked(&self.wanted) = wanted;
        // Shown at once: the change starts once the lease for changes is taken.
        self.update(|p| {
            if p.phase == "idle" {
                p.phase = "asked";
            }
        });
        self.wake.notify_one();
    }

    /// Slots `range` moved away from `addr`'s pair: `addr` must drop them (until
    /// [`Membership::paid_drop`]).
    fn owe_drop(&self, addr: &str, range: SlotRange) {
        let mut owed = locked(&self.pending_drops);
        if !owed.iter().any(|(a, r)| a == addr && *r == range) {
            owed.push((addr.to_string(), range));
        }
    }

    fn paid_drop(&self, addr: &str, range: SlotRange) {
        locked(&self.pending_drops).retain(|(a, r)| !(a == addr && *r == range));
    }

    /// Wants what a map read from the workers wants (another orchestrator's change), so
    /// this one does not undo it.
    pub(super) fn adopt_wanted(&self, wanted: Vec<[String; 2]>) {
        let _one_at_a_time = locked(&self.asking);
        *locked(&self.wanted) = wanted;
    }

    pub fn progress(&self) -> Progress {
        locked(&self.progress).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut locked(&self.progress));
    }
}

/// What a starting orchestrator wants, given the pairs it serves (`now`: the state file's, or
/// the list's) and the list it was given: the cluster file's pairs, which may have been edited
/// while it was stopped; else the pairs it serves, since without a cluster file the state
/// file holds the CLUSTER commands' changes.
pub(crate) fn wanted_at_start(
    now: &[String],
    listed: &[String],
    from_file: bool,
) -> Vec<[String; 2]> {
    let (now, listed) = (pairs_of(now), pairs_of(listed));
    if listed == now {
        return now;
    }
    if !from_file {
        tracing::warn!(
            "the state file's pairs differ from the command line's: serving the state file's \
             (a CLUSTER change made before the restart)"
        );
        return now;
    }
    // Its workers are not assessed yet: a replacement waits in its step for the one kept.
    match plan(&now, &listed) {
        Ok(_) => listed,
        Err(e) => {
            tracing::error!("cluster file not applied: {e}; serving the state file's pairs");
            now
        }
    }
}

/// `workers` (in pairing order, an even number) as pairs.
pub(super) fn pairs_of(workers: &[String]) -> Vec<[String; 2]> {
    workers
        .chunks_exact(2)
        .map(|w| [w[0].clone(), w[1].clone()])
        .collect()
}

/// The difference between the pairs now and the pairs wanted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// (current pair, worker index replaced, new address)
    pub replace: Vec<(usize, usize, String)>,
    /// Current pairs to remove.
    pub remove: Vec<usize>,
    /// New pairs to add.
    pub add: Vec<[String; 2]>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.remove.is_empty() && self.add.is_empty()
    }
}

/// Matches wanted pairs to current ones: the same two workers (in either order) are the same
/// pair; a wanted pair sharing one worker with a current one replaces the other worker; the
/// rest are added or removed. Refuses a new pair naming a worker some current pair has (a
/// worker moved between pairs would hold another pair's data).
pub(crate) fn plan(current: &[[String; 2]], wanted: &[[String; 2]]) -> Result<Plan, String> {
    let same = |a: &[String; 2], b: &[String; 2]| {
        (a[0] == b[0] && a[1] == b[1]) || (a[0] == b[1] && a[1] == b[0])
    };
    let mut cur_used = vec![false; current.len()];
    let mut want_used = vec![false; wanted.len()];
    for (w, pair) in wanted.iter().enumerate() {
        if let Some(c) = (0..current.len()).find(|&c| !cur_used[c] && same(&current[c], pair)) {
            cur_used[c] = true;
            want_used[w] = true;
        }
    }
    let mut out = Plan::default();
    for (w, pair) in wanted.iter().enumerate() {
        if want_used[w] {
            continue;
        }
        let shared = (0..current.len()).find_map(|c| {
            if cur_used[c] {
                return None;
            }
            let keep = (0..2).find(|&i| pair.contains(&current[c][i]))?;
            let new = pair.iter().find(|a| **a != current[c][keep])?;
            // A worker of another pair cannot join this one: it holds that pair's data.
            if current.iter().flatten().any(|a| a == new) {
                return None;
            }
            Some((c, 1 - keep, new.clone()))
        });
        if let Some((c, replaced, new)) = shared {
            cur_used[c] = true;
            want_used[w] = true;
            out.replace.push((c, replaced, new));
        }
    }
    for (w, pair) in wanted.iter().enumerate() {
        if want_used[w] {
            continue;
        }
        if let Some(a) = pair
            .iter()
            .find(|a| current.iter().flatten().any(|c| c == *a))
        {
            return Err(format!(
                "worker {a} is in another pair now: a new pair needs workers new to the cluster"
            ));
        }
        out.add.push(pair.clone());
    }
    out.remove = (0..current.len()).filter(|&c| !cur_used[c]).collect();
    if out.remove.len() == current.len() && out.add.is_empty() && !current.is_empty() {
        return Err("that would remove every pair".into());
    }
    Ok(out)
}

/// [`plan`] from the pairs of `now`, with what the cluster cannot do: pairs added or removed
/// in adapter mode, a worker replaced while its partner is not in sync. What
/// [`Router::want`] refuses up front and each attempt checks again.
fn checked_plan(now: &Topology, wanted: &[[String; 2]], adapter: bool) -> Result<Plan, String> {
    let plan = plan(&pairs_now(now), wanted)?;
    if adapter && (!plan.add.is_empty() || !plan.remove.is_empty()) {
        return Err(
            "pairs cannot be added or removed in adapter mode (a worker can be replaced)".into(),
        );
    }
    kept_in_sync(now, &plan.replace)?;
    Ok(plan)
}

/// Refuses a replacement (`(pair, worker replaced, new address)` in `now`) whose kept worker
/// is not in sync with a complete copy: it is then the pair's only copy of its data, and the
/// new worker refills from it. (Two replacements in a row on one pair, or one while the
/// partner is down or refilling, would leave the pair with no copy.)
fn kept_in_sync(now: &Topology, replace: &[(usize, usize, String)]) -> Result<(), String> {
    for (c, i, new) in replace {
        let [old, kept] = [&now[*c].workers[*i], &now[*c].workers[1 - i]];
        let state = match kept.state() {
            WorkerState::InSync if kept.partial.load(std::sync::atomic::Ordering::Acquire) => {
                "in sync with a partial copy"
            }
            WorkerState::InSync => continue,
            other => other.name(),
        };
        return Err(format!(
            "{} cannot be replaced by {new} now: its partner {kept} would be the pair's only \
             copy and is {state}; try again once INFO cluster shows {kept} in_sync (pair{c})",
            old.addr,
            kept = kept.addr
        ));
    }
    Ok(())
}

/// The slots whose entries a worker of pair `pair` must not hold, as ranges: every slot
/// `slots` gives to another pair, except those of the move under way (`moving`) when the
/// pair is its source (they are dropped once their copy is in).
fn not_held(slots: &SlotMap, moving: Option<Move>, pair: usize) -> Vec<SlotRange> {
    use twincache_protocol::slots::SLOTS;
    let held = |slot: u16| holds(slots, moving, pair, slot);
    let mut out = Vec::new();
    let mut start = None;
    for slot in 0..=SLOTS {
        let stray = slot < SLOTS && !held(slot as u16);
        match (stray, start) {
            (true, None) => start = Some(slot as u16),
            (false, Some(from)) => {
                out.extend(SlotRange::new(from, slot as u16));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// Whether a worker of pair `pair` may hold entries of `slot`: its pair holds it, or it is
/// the source of the move under way (`moving`) that takes it.
fn holds(slots: &SlotMap, moving: Option<Move>, pair: usize, slot: u16) -> bool {
    slots.pair_of_slot(slot) == pair
        || moving.is_some_and(|m| m.from == pair && m.slots.contains(slot))
}

/// The workers of `new` whose pair held a slot in `old` that it does not hold in `new`.
pub(super) fn losing_slots(old: &Topology, new: &Topology) -> Vec<Arc<WorkerLink>> {
    use twincache_protocol::slots::SLOTS;
    let mut out = Vec::new();
    for (n, pair) in old.iter().enumerate() {
        for w in &pair.workers {
            let found = new.iter().enumerate().find_map(|(m, p)| {
                let link = p.workers.iter().find(|x| x.addr == w.addr)?;
                Some((m, link))
            });
            let Some((m, link)) = found else {
                continue;
            };
            let lost = (0..SLOTS as u16).any(|slot| {
                holds(&old.slots, old.moving, n, slot) && !holds(&new.slots, new.moving, m, slot)
            });
            if lost {
                out.push(link.clone());
            }
        }
    }
    out
}

/// The pairs of `now`, as addresses.
pub(super) fn pairs_now(now: &Topology) -> Vec<[String; 2]> {
    now.iter()
        .map(|p| p.workers.each_ref().map(|w| w.addr.clone()))
        .collect()
}

/// The cluster map of `topo`, wanting `wanted` (in pairing order; empty: the pairs now).
pub(super) fn map_of(topo: &Topology, wanted: &[[String; 2]]) -> ClusterMap {
    let workers: Vec<String> = pairs_now(topo).into_iter().flatten().collect();
    let wanted: Vec<String> = wanted.iter().flatten().cloned().collect();
    ClusterMap {
        wanted: if wanted == workers {
            Vec::new()
        } else {
            wanted
        },
        workers,
        slots: topo.slots.clone(),
        moving: topo.moving,
    }
}

/// Reads the state file: `None` if there is none yet; an error, naming the file (and the
/// line), if it cannot be read or used, since starting from an even map instead would look
/// for moved keys on their old pairs.
pub(crate) fn read_state(path: &std::path::Path) -> Result<Option<ClusterMap>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the state file {}: {e}",
                path.display()
            ))
        }
    };
    let state = ClusterMap::parse(&text).map_err(|e| {
        format!(
            "the state file {} cannot be used: {e} (it says which pair holds which slot; \
             restore it, or remove it to start from the worker list's even map)",
            path.display()
        )
    })?;
    tracing::info!(
        file = %path.display(),
        pairs = state.pairs(),
        epoch = state.epoch(),
        "pairs and slot map as the last run left them"
    );
    Ok(Some(state))
}

impl Router {
    /// The workers now, in pairing order.
    pub fn current_workers(&self) -> Vec<String> {
        pairs_now(&self.pairs()).into_iter().flatten().collect()
    }

    /// Asks for the workers `change` makes of the pairs wanted now (in pairing order, an
    /// even number); the change runs in the background. Refused, with the wanted list left
    /// as it was, if the list names a worker twice (aliases too) or the orchestrator itself,
    /// or if the change cannot be made from the pairs now (`plan`): asked for anyway it
    /// would be tried again every second, forever. Resolves host names: call it off the
    /// event loop.
    pub fn want(
        &self,
        change: impl FnOnce(Vec<[String; 2]>) -> Result<Vec<String>, String>,
    ) -> Result<(), String> {
        let _one_at_a_time = locked(&self.membership.asking);
        let workers = change(self.membership.wanted())?;
        crate::config::check_distinct(self.membership.config.listen, &workers)?;
        let wanted = pairs_of(&workers);
        checked_plan(&self.pairs(), &wanted, self.is_adapter())?;
        self.membership.set_wanted(wanted);
        Ok(())
    }

    /// Makes the pairs what [`Router::want`] asked for, change after change, until
    /// `shutdown`.
    pub async fn run_membership(self: Arc<Self>, shutdown: CancellationToken) {
        // Nothing is changed before the workers have been seen once (the lease for changes
        // needs their answers).
        while self.mode().is_none() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        loop {
            let phase = self.membership.progress().phase;
            let retry = matches!(phase, "retrying" | "waiting") || self.drops_pending();
            let wait = async {
                if retry {
                    // A second, give or take a quarter: two orchestrators that asked for the
                    // lease at once (each granted it by some workers, so neither holds it)
                    // do not keep asking at the same moment.
                    let jitter = rand::random::<u64>() % 500;
                    tokio::time::sleep(Duration::from_millis(750 + jitter)).await;
                } else {
                    self.membership.wake.notified().await;
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = shutdown.cancelled() => return,
            }
            let result = tokio::select! {
                r = self.under_lease() => r,
                _ = shutdown.cancelled() => {
                    self.release_lease().await;
                    return;
                }
            };
            match result {
                Ok(None) => self.membership.update(|p| {
                    p.phase = "idle";
                    p.error.clear();
                }),
                Ok(Some(summary)) => {
                    tracing::info!("membership change done: {summary}");
                    self.membership.update(|p| {
                        p.phase = "idle";
                        p.error.clear();
                        p.last = summary;
                        p.finished = Some(Instant::now());
                    });
                }
                Err(Stopped::Waiting(e)) => {
                    tracing::info!("membership: {e}; trying again in a second");
                    self.membership.update(|p| p.phase = "waiting");
                }
                Err(Stopped::Failed(e)) => {
                    tracing::warn!("membership change: {e}; trying again in a second");
                    self.membership.update(|p| {
                        p.phase = "retrying";
                        p.error = e;
                    });
                }
            }
        }
    }

    /// The drops owed and one attempt at the change asked for, holding the lease for changes
    /// (renewed meanwhile) and routing by the newest map the workers hold: a map another
    /// orchestrator made is adopted first, with what it wants.
    async fn under_lease(&self) -> Result<Option<String>, Stopped> {
        if let Err(e) = self.take_lease().await {
            // What some workers granted is given back: kept (and renewed by every later
            // attempt), it would refuse another orchestrator that asked at the same moment
            // and kept what it was granted too, and neither would ever hold the lease.
            self.release_lease().await;
            return Err(match e {
                NoLease::Held(_) => Stopped::Waiting(e.to_string()),
                NoLease::TooFew(e) => Stopped::Failed(e),
            });
        }
        let work = async {
            if self.catch_up().await? {
                return Ok(Some(
                    "routing by the cluster map another orchestrator made".into(),
                ));
            }
            self.retry_drops().await;
            self.converge().await
        };
        let renew = async {
            loop {
                tokio::time::sleep(shared::LEASE_RENEW).await;
                if let Err(e) = self.take_lease().await {
                    return e;
                }
            }
        };
        let result = tokio::select! {
            r = work => r.map_err(Stopped::Failed),
            e = renew => Err(Stopped::Failed(format!("lost the lease for changes: {e}"))),
        };
        self.release_lease().await;
        result
    }

    fn drops_pending(&self) -> bool {
        let m = &self.membership;
        !locked(&m.pending_drops).is_empty() || !locked(&m.sweeps).is_empty()
    }

    /// Has `w` drop every slot its pair does not hold, soon (the membership task does it, so
    /// no move starts or ends meanwhile). Asked by the health monitor once every refill the
    /// worker started has ended, and when it first sees it: a refill from the partner can
    /// bring back slots this worker dropped (the partner still held them: its snapshot was
    /// taken before its own drop, or its drop is still being retried), and nothing else would
    /// ever drop them again; and the drops an earlier run retried are not remembered.
    pub(crate) fn sweep_later(&self, w: &WorkerLink) {
        let mut sweeps = locked(&self.membership.sweeps);
        if !sweeps.contains(&w.addr) {
            sweeps.push(w.addr.clone());
            self.membership.wake.notify_one();
        }
    }

    /// Tells each worker awaiting a sweep to drop the slots its pair does not hold; keeps
    /// those that could not be told, and forgets the workers no longer in the cluster.
    async fn sweep(&self) {
        // Each stays owed until it is done, so a step cancelled meanwhile loses none.
        let pending = locked(&self.membership.sweeps).clone();
        let mut finished = Vec::new();
        for addr in pending {
            let topo = self.pairs();
            let Some((pair, link)) = topo.iter().enumerate().find_map(|(n, p)| {
                let w = p.workers.iter().find(|w| w.addr == addr)?;
                Some((n, w.clone()))
            }) else {
                finished.push(addr);
                continue;
            };
            let ranges = not_held(&topo.slots, topo.moving, pair);
            drop(topo);
            let mut dropped = 0u64;
            let mut done = true;
            for range in &ranges {
                let ask = format!("drop {}", range.bounds());
                match self.ask(&link, Op::Slots, &ask).await {
                    Some(r) => {
                        dropped += String::from_utf8_lossy(&r.payload)
                            .trim()
                            .parse::<u64>()
                            .unwrap_or(0)
                    }
                    None => done = false,
                }
            }
            if dropped > 0 {
                tracing::warn!(
                    worker = %addr,
                    entries = dropped,
                    "dropped copies of slots its pair does not hold (a refill from its partner \
                     brought them back, or it missed their drop)"
                );
            }
            if done {
                finished.push(addr);
            }
        }
        locked(&self.membership.sweeps).retain(|a| !finished.contains(a));
    }

    /// Tells the workers that missed a drop to drop now; forgets the workers no longer in
    /// the cluster.
    async fn retry_drops(&self) {
        // Each stays owed until it is done, so a step cancelled meanwhile loses none.
        let pending = locked(&self.membership.pending_drops).clone();
        for (addr, range) in pending {
            let link = self
                .pairs()
                .iter()
                .flat_map(|p| p.workers.iter())
                .find(|w| w.addr == addr)
                .cloned();
            let Some(link) = link else {
                self.membership.paid_drop(&addr, range);
                continue;
            };
            let ask = format!("drop {}", range.bounds());
            if self.ask(&link, Op::Slots, &ask).await.is_some() {
                self.membership.paid_drop(&addr, range);
                tracing::info!(worker = %addr, slots = %range, "dropped the slots it missed dropping")
            }
        }
        self.sweep().await;
    }

    /// One attempt at the change asked for; `None` if there was nothing to do.
    async fn converge(&self) -> Result<Option<String>, String> {
        let started = Instant::now();
        // A move an earlier attempt left under way is finished first.
        let unfinished = self.pairs().moving;
        if let Some(m) = unfinished {
            self.membership.update(|p| p.phase = "moving");
            self.finish_move(m).await?;
        }
        let wanted = self.membership.wanted();
        let plan = checked_plan(&self.pairs(), &wanted, self.is_adapter())?;
        if plan.is_empty() && self.pairs().slots.same_owners(&self.target()) {
            return Ok(unfinished.map(|_| "resumed move finished".to_string()));
        }
        self.membership.update(|p| p.begin(started));
        let mut summary = Vec::new();
        if !plan.replace.is_empty() {
            self.membership.update(|p| p.phase = "replacing");
            summary.push(self.replace_workers(&plan.replace).await?);
        }
        if !plan.add.is_empty() {
            self.membership.update(|p| p.phase = "joining");
            summary.push(self.add_pairs(&plan.add).await?);
        }
        // The pairs to remove, by identity (indices shift as pairs are added).
        let leaving: Vec<Arc<Pair>> = {
            let topo = self.pairs();
            plan.remove.iter().map(|&c| topo[c].clone()).collect()
        };
        let mut live = Vec::new();
        for p in self.pairs().iter() {
            live.push(!leaving.iter().any(|l| Arc::ptr_eq(l, p)));
        }
        let target = self.pairs().slots.rebalanced(&live);
        let moves = self
            .pairs()
            .slots
            .moves_to(&target, self.membership.config.batch);
        if !moves.is_empty() {
            let total: usize = moves.iter().map(|m| m.slots.len()).sum();
            self.membership.update(|p| {
                p.phase = "moving";
                p.slots_total = p.slots_done + total;
            });
            tracing::info!(
                moves = moves.len(),
                slots = total,
                "moving slots to the new map"
            );
            for m in &moves {
                self.begin_move(*m).await?;
                self.finish_move(*m).await?;
            }
            let p = self.membership.progress();
            summary.push(format!(
                "{} slots moved ({} keys, {:.1} MB) in {:.1}s",
                total,
                p.keys,
                p.bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            ));
        }
        if !leaving.is_empty() {
            self.membership.update(|p| p.phase = "removing");
            summary.push(self.remove_pairs(&leaving).await?);
        }
        Ok((!summary.is_empty()).then(|| summary.join("; ")))
    }

    /// The map the pairs now should end with: every pair its share, except those the change
    /// asked for removes (known from the plan; here, the pairs not wanted).
    fn target(&self) -> twincache_protocol::slots::SlotMap {
        let wanted = self.membership.wanted();
        let topo = self.pairs();
        let live: Vec<bool> = topo
            .iter()
            .map(|p| {
                let addrs = p.workers.each_ref().map(|w| w.addr.clone());
                wanted
                    .iter()
                    .any(|w| w.contains(&addrs[0]) || w.contains(&addrs[1]))
            })
            .collect();
        topo.slots.rebalanced(&live)
    }

    pub(super) fn spawn_link(&self, addr: &str) -> Arc<WorkerLink> {
        WorkerLink::spawn(addr.to_string(), &self.config, &self.shutdown)
    }

    /// Swaps in `topo` under the next epoch and returns the one it replaces. The workers get
    /// the new map first ([`Router::publish`]; `required` must take it, as must every worker
    /// serving), then it is written to the state file, so a restart finds the pairs and map
    /// (and a move under way) as they are; if either fails nothing is swapped and the step
    /// fails (to be tried again).
    async fn swap(&self, mut topo: Topology, required: &[String]) -> Result<Arc<Topology>, String> {
        let _one = self.swapping.lock().await;
        let epoch = self.pairs().slots.epoch() + 1;
        topo.slots = topo.slots.clone().with_epoch(epoch);
        let wanted = self.membership.wanted();
        let map = map_of(&topo, &wanted);
        // The workers `topo` leaves out (replaced, or of a removed pair) get it too, as
        // workers of no pair: another orchestrator still routing by the map that has them
        // is refused there, and reads the new map, instead of writing to a pair as it was.
        let leaving: Vec<Arc<WorkerLink>> = self
            .pairs()
            .iter()
            .flat_map(|p| &p.workers)
            .filter(|w| {
                !topo
                    .iter()
                    .flat_map(|p| &p.workers)
                    .any(|x| x.addr == w.addr)
            })
            .cloned()
            .collect();
        let (published, ()) = tokio::join!(
            self.publish(&topo, &map, required),
            self.publish_to_leaving(&leaving, &map)
        );
        published?;
        self.write_state(&topo, &wanted).await?;
        let old = self.topology.swap(Arc::new(topo));
        self.moved.notify_waiters();
        Ok(old)
    }

    /// Writes `topo`'s map to the state file, if there is one (off the event loop: an fsync
    /// may take a while).
    pub(super) async fn write_state(
        &self,
        topo: &Topology,
        wanted: &[[String; 2]],
    ) -> Result<(), String> {
        let Some(path) = self.config.state_file.clone() else {
            return Ok(());
        };
        let text = map_of(topo, wanted).text();
        let written = tokio::task::spawn_blocking(move || {
            twincache_protocol::durable::write_file(&path, text.as_bytes())
                .map_err(|e| format!("cannot write the state file {}: {e}", path.display()))
        })
        .await
        .unwrap_or_else(|e| Err(format!("writing the state file: {e}")));
        if let Err(e) = &written {
            tracing::error!("{e}");
        }
        written
    }

    /// Waits until no request routed by `old` is still in flight (it holds the only
    /// reference), at most as long as a worker link waits for an answer (`PATIENCE` worker
    /// timeouts, with a margin): a request is answered or failed by then, so no write
    /// acknowledged under the old map lands after the move's copy has started.
    async fn drain(&self, old: Arc<Topology>) {
        let wait = self.worker_timeout * PATIENCE + Duration::from_millis(100);
        let deadline = Instant::now() + wait.max(Duration::from_secs(1));
        while Arc::strong_count(&old) > 1 {
            if Instant::now() > deadline {
                tracing::warn!(
                    holders = Arc::strong_count(&old) - 1,
                    "requests routed by the previous slot map still unanswered; going on"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn replace_workers(&self, replace: &[(usize, usize, String)]) -> Result<String, String> {
        let topo = self.pairs();
        kept_in_sync(&topo, replace)?;
        let mut pairs = topo.pairs.clone();
        let (mut joined, mut retired, mut said) = (Vec::new(), Vec::new(), Vec::new());
        for (c, i, new) in replace {
            let mut workers = pairs[*c].workers.clone();
            let link = self.spawn_link(new);
            joined.push(link.clone());
            let old = std::mem::replace(&mut workers[*i], link);
            said.push(format!("pair{c}: {} replaced by {new}", old.addr));
            retired.push((*c, old, new, workers[1 - i].addr.clone()));
            pairs[*c] = Arc::new(Pair::new(workers));
        }
        drop(topo);
        self.swap_pairs(pairs, &joined).await?;
        for (c, old, new, partner) in retired {
            tracing::info!(
                pair = c,
                old = %old.addr,
                new = %new,
                partner = %partner,
                "worker replaced: the new one refills from its partner before it serves"
            );
            old.retire(self.worker_timeout * 2);
        }
        Ok(said.join(", "))
    }

    async fn add_pairs(&self, add: &[[String; 2]]) -> Result<String, String> {
        let topo = self.pairs();
        let mut pairs = topo.pairs.clone();
        let first = pairs.len();
        let (mut joined, mut said) = (Vec::new(), Vec::new());
        for [a, b] in add {
            said.push(format!("pair{} {a} {b} added", pairs.len()));
            let links = [self.spawn_link(a), self.spawn_link(b)];
            joined.extend(links.iter().cloned());
            pairs.push(Arc::new(Pair::new(links)));
        }
        drop(topo);
        self.swap_pairs(pairs, &joined).await?;
        for (n, [a, b]) in add.iter().enumerate() {
            tracing::info!(pair = first + n, a = %a, b = %b, "adding a pair");
        }
        Ok(said.join(", "))
    }

    /// Swaps in `pairs` with the map as it is ([`Router::swap`]); the new worker links in
    /// them, `joined`, are closed again if that fails.
    async fn swap_pairs(
        &self,
        pairs: Vec<Arc<Pair>>,
        joined: &[Arc<WorkerLink>],
    ) -> Result<(), String> {
        let (slots, moving) = {
            let topo = self.pairs();
            (topo.slots.clone(), topo.moving)
        };
        let swapped = self
            .swap(
                Topology {
                    pairs,
                    slots,
                    moving,
                },
                &[],
            )
            .await;
        if let Err(e) = swapped {
            for w in joined {
                w.retire(Duration::ZERO);
            }
            return Err(e);
        }
        Ok(())
    }

    async fn remove_pairs(&self, leaving: &[Arc<Pair>]) -> Result<String, String> {
        let mut said = Vec::new();
        for pair in leaving {
            let topo = self.pairs();
            let Some(c) = topo.iter().position(|p| Arc::ptr_eq(p, pair)) else {
                continue;
            };
            if topo.slots.counts(topo.len())[c] > 0 {
                return Err(format!("pair{c} still holds slots"));
            }
            let mut pairs = topo.pairs.clone();
            pairs.remove(c);
            let slots = topo.slots.without_pair(c);
            let moving = topo.moving;
            drop(topo);
            self.swap(
                Topology {
                    pairs,
                    slots,
                    moving,
                },
                &[],
            )
            .await?;
            for w in &pair.workers {
                w.retire(self.worker_timeout * 2);
            }
            let addrs = pair.workers.each_ref().map(|w| w.addr.clone());
            tracing::info!(pair = c, a = %addrs[0], b = %addrs[1], "pair removed: it held no slot any more");
            said.push(format!("pair {} {} removed", addrs[0], addrs[1]));
        }
        Ok(said.join(", "))
    }

    /// Waits until `pair` can take slots: a worker of it in sync, and none still being
    /// assessed (a pair just added has both in sync a round later). A worker down, stale or
    /// refilling is not waited for: the copy skips it, and it refills from its partner
    /// (see [`Router::finish_move`]).
    async fn wait_receiver(&self, pair: &Pair) -> Result<(), String> {
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let states = pair.workers.each_ref().map(|w| w.state());
            let late = Instant::now() > deadline;
            if states.contains(&WorkerState::InSync)
                && (late || !states.contains(&WorkerState::Unknown))
            {
                return Ok(());
            }
            if late {
                return Err(format!(
                    "no worker of pair {} {} is in sync",
                    pair.workers[0].addr, pair.workers[1].addr
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Gives `m`'s slots to their new pair, marked moving, once a worker of that pair is in
    /// sync; returns when the requests routed by the map before are answered.
    async fn begin_move(&self, m: Move) -> Result<(), String> {
        let to = self.pairs()[m.to].clone();
        self.wait_receiver(&to).await?;
        self.retry_drops().await;
        let stale = locked(&self.membership.pending_drops)
            .iter()
            .find(|(a, range)| to.workers.iter().any(|w| &w.addr == a) && range.overlaps(m.slots))
            .cloned();
        if let Some((a, range)) = stale {
            return Err(format!(
                "{a} still holds an old copy of slots {range}: they move back to its pair once \
                 it has dropped them"
            ));
        }
        let unswept = locked(&self.membership.sweeps)
            .iter()
            .find(|a| to.workers.iter().any(|w| &w.addr == *a))
            .cloned();
        if let Some(a) = unswept {
            return Err(format!(
                "{a} may hold old copies of slots its pair does not: slots move to its pair \
                 once it has dropped them"
            ));
        }
        let moved = {
            let topo = self.pairs();
            Topology {
                pairs: topo.pairs.clone(),
                slots: topo.slots.with_move(&m),
                moving: Some(m),
            }
        };
        // The source pair must refuse writes routed by the old map before the copy starts.
        let from = self.pairs()[m.from]
            .workers
            .each_ref()
            .map(|w| w.addr.clone());
        let old = self.swap(moved, &from).await?;
        tracing::info!(
            slots = %m.slots,
            from = m.from,
            to = m.to,
            "slot move started"
        );
        self.drain(old).await;
        Ok(())
    }

    /// Copies the moving slots into the in-sync workers of their new pair, lifts the mark,
    /// and has the old pair drop them. A worker of the new pair that is not in sync (or falls
    /// out of sync during its copy) is not waited for: it lacks the slots, which is recorded
    /// as for a write it missed (`Router::record_miss`: it becomes stale here, and its
    /// partner counts what it took alone, so any orchestrator finds it stale), and the
    /// health monitor has it refill from its partner, which holds them, before it serves.
    async fn finish_move(&self, m: Move) -> Result<(), String> {
        let started = Instant::now();
        let (from, to) = {
            let topo = self.pairs();
            (topo[m.from].clone(), topo[m.to].clone())
        };
        let sources: Vec<&Arc<WorkerLink>> = from
            .workers
            .iter()
            .filter(|w| w.state() == WorkerState::InSync)
            .collect();
        if sources.is_empty() {
            return Err(format!(
                "no worker of pair{} (the slots' source) is in sync",
                m.from
            ));
        }
        let (receivers, mut skipped): (Vec<&Arc<WorkerLink>>, Vec<&Arc<WorkerLink>>) = to
            .workers
            .iter()
            .partition(|w| w.state() == WorkerState::InSync);
        let imports = receivers
            .iter()
            .enumerate()
            .map(|(i, w)| self.import(w, sources[i % sources.len()], m));
        let results = join_all(imports).await;
        let (mut copied, mut took) = ((0, 0), Vec::new());
        for (w, r) in receivers.into_iter().zip(results) {
            match r {
                Ok(c) => {
                    copied = c;
                    took.push(w);
                }
                Err(e) if w.state() != WorkerState::InSync => {
                    tracing::warn!(worker = %w.addr, "{e}; it refills from its partner instead");
                    skipped.push(w);
                }
                Err(e) => return Err(e),
            }
        }
        if took.is_empty() {
            return Err(format!(
                "no worker of pair{} (the slots' destination) is in sync",
                m.to
            ));
        }
        // Recorded once every copy is in: a refill that started before may have missed some.
        for w in skipped {
            for holder in &took {
                if !self.record_miss(holder, w, None).await {
                    return Err(format!(
                        "{} lacks slots {}, and {} could not record it",
                        w.addr, m.slots, holder.addr
                    ));
                }
            }
            tracing::info!(worker = %w.addr, slots = %m.slots, "skipped by the copy: refills from its partner");
        }
        let settled = {
            let topo = self.pairs();
            Topology {
                pairs: topo.pairs.clone(),
                slots: topo.slots.clone(),
                moving: None,
            }
        };
        let old = self.swap(settled, &[]).await?;
        // Owed from now (no await in between): if this step is cancelled (a lost lease,
        // shutdown) before the drops below, they are still retried.
        for w in &from.workers {
            self.membership.owe_drop(&w.addr, m.slots);
        }
        self.drain(old).await;
        let ask = format!("drop {}", m.slots.bounds());
        let mut dropped = Vec::new();
        for w in &from.workers {
            match self.ask(w, Op::Slots, &ask).await {
                Some(r) => {
                    self.membership.paid_drop(&w.addr, m.slots);
                    dropped.push(String::from_utf8_lossy(&r.payload).into_owned())
                }
                None => {
                    tracing::warn!(worker = %w.addr, "could not drop the moved slots: retried until it does");
                    dropped.push("?".into());
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            slots = %m.slots,
            from = m.from,
            to = m.to,
            keys = copied.0,
            bytes = copied.1,
            seconds,
            dropped = %dropped.join(","),
            "slot move done"
        );
        self.membership.update(|p| {
            p.slots_done += m.slots.len();
            p.keys += copied.0;
            p.bytes += copied.1;
        });
        Ok(())
    }

    /// Has worker `w` import `m`'s slots from `source`; the entries and bytes it took.
    async fn import(
        &self,
        w: &WorkerLink,
        source: &WorkerLink,
        m: Move,
    ) -> Result<(u64, u64), String> {
        let rate = self.membership.config.rate;
        let peer = crate::config::peer(&source.addr);
        let ask = format!("import {peer} {} {rate}", m.slots.bounds());
        let mut last_error = String::new();
        for attempt in 0..IMPORT_TRIES {
            if attempt > 0 {
                tracing::warn!(worker = %w.addr, "{last_error}: importing the slots again");
            }
            let Some(resp) = self.ask(w, Op::Slots, &ask).await else {
                // Not answering, or an import still running from an earlier attempt.
                last_error = format!("{} did not start the import", w.addr);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let seq = String::from_utf8_lossy(&resp.payload).trim().to_string();
            let mut heard = Instant::now();
            loop {
                tokio::time::sleep(POLL).await;
                let Some(resp) = self.ask(w, Op::Slots, "progress").await else {
                    if heard.elapsed() > IMPORT_SILENCE {
                        last_error = format!("{} stopped answering", w.addr);
                        break;
                    }
                    continue;
                };
                heard = Instant::now();
                let text = String::from_utf8_lossy(&resp.payload).into_owned();
                let mut words = text.splitn(5, ' ');
                let (s, phase) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let keys = words.next().and_then(|k| k.parse().ok()).unwrap_or(0);
                let bytes = words.next().and_then(|b| b.parse().ok()).unwrap_or(0);
                if s != seq {
                    last_error = format!("{} restarted during the import", w.addr);
                    break;
                }
                match phase {
                    "running" => continue,
                    "done" => return Ok((keys, bytes)),
                    _ => {
                        last_error = format!(
                            "{} could not import from {}: {}",
                            w.addr,
                            source.addr,
                            words.next().unwrap_or("")
                        );
                        break;
                    }
                }
            }
        }
        Err(last_error)
    }

    /// The `INFO cluster` lines about the slot map and membership changes.
    pub fn membership_info(&self) -> String {
        let topo = self.pairs();
        let p = self.membership.progress();
        let mut out = format!(
            "slot_map_epoch:{}\r\nslots:{}\r\nmembership:{}\r\n",
            topo.slots.epoch(),
            topo.slots.describe(),
            p.phase
        );
        if p.slots_total > 0 || p.phase != "idle" {
            let until = p.finished.unwrap_or_else(Instant::now);
            let secs = p
                .started
                .map_or(0.0, |s| until.duration_since(s).as_secs_f64())
                .max(1e-3);
            out += &format!(
                "move_slots_done:{}\r\nmove_slots_total:{}\r\nmove_keys:{}\r\nmove_bytes:{}\r\n\
                 move_mb_per_sec:{:.2}\r\n",
                p.slots_done,
                p.slots_total,
                p.keys,
                p.bytes,
                p.bytes as f64 / 1e6 / secs
            );
        }
        if let Some(m) = topo.moving {
            out += &format!("move_current:{} pair{}->pair{}\r\n", m.slots, m.from, m.to);
        }
        if !p.error.is_empty() {
            out += &format!("move_error:{}\r\n", p.error);
        }
        if !p.last.is_empty() {
            out += &format!("last_change:{}\r\n", p.last);
        }
        out
    }

    /// The `status` line's part about membership: empty when nothing moves.
    pub fn membership_status(&self) -> String {
        let p = self.membership.progress();
        if p.phase == "idle" {
            return String::new();
        }
        let moving = self
            .pairs()
            .moving
            .map(|m| format!(" slots {} pair{}->pair{}", m.slots, m.from, m.to))
            .unwrap_or_default();
        format!(
            " | membership {} {}/{} slots{moving}",
            p.phase, p.slots_done, p.slots_total
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<[String; 2]> {
        list.iter()
            .map(|(a, b)| [a.to_string(), b.to_string()])
            .collect()
    }

    #[test]
    fn a_plan_names_replacements_additions_and_removals() {
        let now = pairs(&[("a", "b"), ("c", "d"), ("e", "f")]);
        assert!(plan(&now, &now).unwrap().is_empty());
        // Order within a pair and of pairs does not matter.
        assert!(plan(&now, &pairs(&[("f", "e"), ("a", "b"), ("c", "d")]))
            .unwrap()
            .is_empty());
        assert_eq!(
            plan(&now, &pairs(&[("a", "b"), ("c", "x"), ("e", "f")])).unwrap(),
            Plan {
                replace: vec![(1, 1, "x".into())],
                ..Plan::default()
            }
        );
        assert_eq!(
            plan(&now, &pairs(&[("a", "b"), ("e", "f")])).unwrap(),
            Plan {
                remove: vec![1],
                ..Plan::default()
            }
        );
        assert_eq!(
            plan(
                &now,
                &pairs(&[("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")])
            )
            .unwrap(),
            Plan {
                add: pairs(&[("g", "h")]),
                ..Plan::default()
            }
        );
        assert!(plan(
            &now,
            &pairs(&[("a", "b"), ("c", "d"), ("e", "f"), ("g", "a")])
        )
        .is_err());
        assert!(plan(&now, &[]).is_err());
    }

    fn state() -> ClusterMap {
        ClusterMap {
            workers: ["a:1", "b:1", "c:1", "d:1"].map(String::from).to_vec(),
            slots: SlotMap::even(2),
            moving: None,
            wanted: Vec::new(),
        }
    }

    #[test]
    fn a_state_file_that_cannot_be_used_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("twincache-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        assert!(read_state(&path).unwrap().is_none(), "none yet");
        std::fs::write(&path, state().text()).unwrap();
        assert!(read_state(&path).unwrap().is_some());
        std::fs::write(&path, "epoch 1\nslots 0-16383:0\nbogus\n").unwrap();
        let e = read_state(&path).unwrap_err();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("line 3"),
            "{e}"
        );
        // A directory where the file should be cannot be read.
        let e = read_state(&dir).unwrap_err();
        assert!(e.starts_with("cannot read the state file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::super::tests::start;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("twincache-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_change_whose_state_file_cannot_be_written_is_not_made() {
        let dir = temp_dir("unwritable");
        let new = pairs(&[("127.0.0.1:3", "127.0.0.1:4")]);
        let (router, shutdown) = start(
            &["127.0.0.1:1", "127.0.0.1:2"],
            Some(dir.join("no such directory").join("state")),
        );
        let e = router.add_pairs(&new).await.unwrap_err();
        assert!(e.starts_with("cannot write the state file"), "{e}");
        assert_eq!(router.pairs().len(), 1, "the topology is not swapped");
        shutdown.cancel();

        let path = dir.join("state");
        let (router, shutdown) = start(&["127.0.0.1:1", "127.0.0.1:2"], Some(path.clone()));
        router.add_pairs(&new).await.unwrap();
        assert_eq!(router.pairs().len(), 2);
        let kept = read_state(&path).unwrap().unwrap();
        assert_eq!(kept.workers, router.current_workers());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"], "no temporary file left");
        shutdown.cancel();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A stand-in worker answering `map` requests with `answer` (their text as asked), and
    /// every other request `Ok`; it keeps the `map` requests it was sent.
    fn map_worker(
        addr: &str,
        asked: Arc<Mutex<Vec<String>>>,
        answer: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Arc<WorkerLink> {
        use twincache_protocol::frame::Request;
        use twincache_protocol::Response;
        WorkerLink::fake(
            addr,
            Arc::new(move |req: &Request| {
                if req.op != Op::Map {
                    return Some(Response::ok(bytes::Bytes::new()));
                }
                let text = String::from_utf8_lossy(&req.value).into_owned();
                let reply = answer(&text);
                locked(&asked).push(text);
                Some(Response::ok(bytes::Bytes::from(reply)))
            }),
        )
    }

    /// Two orchestrators asking for the lease at once may each be granted it by some workers,
    /// so neither holds it. Each must give back what it got: kept (and renewed by each later
    /// attempt), the grants refused the other forever (in one run of the partition tests,
    /// an orchestrator asked to add a pair was still waiting for the lease 90 s later).
    #[tokio::test]
    async fn an_orchestrator_refused_the_lease_gives_back_what_it_was_granted() {
        let (router, shutdown) = start(&["a:1", "b:1"], None);
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let a = map_worker("a:1", asked.clone(), |_| "granted".into());
        let b = map_worker("b:1", Arc::default(), |_| {
            "held 00000000000000ff 9000".into()
        });
        router.topology.store(Arc::new(Topology {
            pairs: vec![Arc::new(Pair::new([a, b]))],
            slots: SlotMap::even(1),
            moving: None,
        }));
        assert!(matches!(
            router.under_lease().await,
            Err(Stopped::Waiting(_))
        ));
        let release = format!("release {:016x}", router.instance);
        let asked = locked(&asked).clone();
        assert_eq!(asked.last(), Some(&release), "{asked:?}");
        shutdown.cancel();
    }

    /// An orchestrator whose step failed after some workers took its map (a lost lease)
    /// leaves slots moved away from a pair undropped: the one that adopts the map has that
    /// pair's workers swept (the partition tests found a batch left on both workers of the
    /// old pair). A map that only begins a move takes nothing from the source yet.
    #[tokio::test]
    async fn a_map_adopted_that_moved_slots_away_has_their_old_pair_swept() {
        let (router, shutdown) = start(&["a:1", "b:1", "c:1", "d:1"], None);
        let m = Move {
            slots: SlotRange::new(8192, 9216).unwrap(),
            from: 0,
            to: 1,
        };
        let two = SlotMap::even(1).with_epoch(2);
        let held: Arc<Mutex<(u64, ClusterMap)>> = Arc::new(Mutex::new((
            3,
            ClusterMap {
                workers: ["a:1", "b:1", "c:1", "d:1"].map(String::from).to_vec(),
                slots: two.with_move(&m).with_epoch(3),
                moving: Some(m),
                wanted: Vec::new(),
            },
        )));
        let shown = held.clone();
        let links = ["a:1", "b:1", "c:1", "d:1"].map(|w| {
            let shown = shown.clone();
            map_worker(w, Arc::default(), move |_| {
                let (epoch, map) = &*locked(&shown);
                format!("{epoch}\n{}", map.text())
            })
        });
        let [a, b, c, d] = links;
        router.topology.store(Arc::new(Topology {
            pairs: vec![
                Arc::new(Pair::new([a, b])),
                Arc::new(Pair::new([c.clone(), d])),
            ],
            slots: two,
            moving: None,
        }));
        assert!(router.adopt_from(&c).await.unwrap());
        assert!(locked(&router.membership.sweeps).is_empty());
        {
            let mut held = locked(&held);
            held.0 = 4;
            held.1.slots = held.1.slots.clone().with_epoch(4);
            held.1.moving = None;
        }
        assert!(router.adopt_from(&c).await.unwrap());
        assert_eq!(router.pairs().slots.epoch(), 4);
        assert_eq!(*locked(&router.membership.sweeps), ["a:1", "b:1"]);
        shutdown.cancel();
    }

    /// The second change's counts are its own (a 3 -> 2 move of 333,000 keys reported
    /// 666,000: the first change's were still in), and a retry keeps its attempt's counts.
    #[test]
    fn each_change_counts_its_own_keys() {
        let mut p = Progress {
            phase: "idle",
            ..Progress::default()
        };
        p.begin(Instant::now());
        (p.keys, p.slots_total) = (333_285, 5461);
        p.phase = "retrying";
        p.begin(Instant::now());
        assert_eq!(
            (p.keys, p.slots_total),
            (333_285, 5461),
            "a retry keeps what its first attempt counted"
        );
        p.finished = Some(Instant::now());
        p.phase = "asked";
        p.begin(Instant::now());
        // A change with no move (a replacement) shows no other change's slots either.
        assert_eq!((p.keys, p.slots_total, p.finished), (0, 0, None));
    }

    /// What `want` refuses, it does not ask for: CLUSTER answers the error, SIGHUP logs it,
    /// and the wanted list stays as it was (not retried every second, forever).
    #[tokio::test]
    async fn what_cannot_be_done_is_refused_up_front() {
        let now = [
            "127.0.0.1:7001",
            "127.0.0.1:7002",
            "127.0.0.1:7003",
            "127.0.0.1:7004",
        ];
        let (router, shutdown) = start(&now, None);
        let before = router.membership.wanted();
        let want = |workers: &[&str]| {
            let workers: Vec<String> = workers.iter().map(|w| w.to_string()).collect();
            router.want(|_| Ok(workers))
        };
        // Partners swapped across pairs: each worker would join another pair's data.
        let e = want(&[now[0], now[2], now[1], now[3]]).unwrap_err();
        assert!(e.contains("is in another pair now"), "{e}");
        let e = want(&[]).unwrap_err();
        assert_eq!(e, "that would remove every pair");
        // The orchestrator's own address, and one worker under two names.
        let e = want(&[
            now[0],
            now[1],
            now[2],
            now[3],
            "localhost:7000",
            "127.0.0.1:7005",
        ])
        .unwrap_err();
        assert!(e.contains("own --listen address"), "{e}");
        let e = want(&[
            now[0],
            now[1],
            now[2],
            now[3],
            "localhost:7001",
            "127.0.0.1:7005",
        ])
        .unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        // An edit's own refusal comes back as it is.
        let e = router.want(|_| Err("no such pair".into())).unwrap_err();
        assert_eq!(e, "no such pair");
        assert_eq!(router.membership.wanted(), before);
        // What can be done is asked for.
        want(&[
            now[0],
            now[1],
            now[2],
            now[3],
            "127.0.0.1:7005",
            "127.0.0.1:7006",
        ])
        .unwrap();
        assert_eq!(router.membership.wanted().len(), 3);
        shutdown.cancel();
    }

    /// What a sweep drops on a worker: every slot of the other pairs, but not the slots of a
    /// move under way from its own pair (their copy may not be in yet).
    #[test]
    fn a_sweep_drops_every_slot_the_pair_does_not_hold() {
        let three = SlotMap::even(2).rebalanced(&[true; 3]);
        let bounds = |r: Vec<SlotRange>| r.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(
            three.describe(),
            "0-5461:0 5462-8191:2 8192-13652:1 13653-16383:2"
        );
        assert_eq!(bounds(not_held(&three, None, 0)), ["5462-16383"]);
        assert_eq!(bounds(not_held(&three, None, 1)), ["0-8191", "13653-16383"]);
        assert_eq!(bounds(not_held(&three, None, 2)), ["0-5461", "8192-13652"]);
        assert_eq!(
            bounds(not_held(&SlotMap::even(1), None, 0)),
            Vec::<String>::new()
        );
        // A move from pair 1 to pair 0 under way: the map gives its slots to pair 0, and
        // pair 1 keeps them until their copy is in.
        let m = Move {
            slots: SlotRange::new(8192, 8448).unwrap(),
            from: 1,
            to: 0,
        };
        let moving = three.with_move(&m);
        assert_eq!(
            bounds(not_held(&moving, Some(m), 1)),
            ["0-8191", "13653-16383"]
        );
        assert_eq!(
            bounds(not_held(&moving, Some(m), 0)),
            ["5462-8191", "8448-16383"]
        );
        assert_eq!(
            bounds(not_held(&moving, Some(m), 2)),
            ["0-5461", "8192-13652"]
        );
    }

    #[test]
    fn a_start_wants_the_cluster_file_if_it_can_be_done() {
        let words = |w: &[&str]| w.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let now = words(&["a:1", "b:1"]);
        let added = words(&["a:1", "b:1", "c:1", "d:1"]);
        assert_eq!(wanted_at_start(&now, &added, true), pairs_of(&added));
        // Without a cluster file the state file's pairs are the CLUSTER commands' doing.
        assert_eq!(wanted_at_start(&now, &added, false), pairs_of(&now));
        // A file the planner refuses is not wanted (it would be retried forever).
        let moved = words(&["c:1", "a:1", "b:1", "d:1"]);
        assert_eq!(wanted_at_start(&added, &moved, true), pairs_of(&added));
    }

    /// A replacement keeps one worker of the pair as its only copy: refused up front unless
    /// that worker is in sync with a complete copy, and the step does not swap it in either.
    #[tokio::test]
    async fn a_worker_is_replaced_only_while_its_partner_is_in_sync() {
        let now = ["127.0.0.1:7001", "127.0.0.1:7002"];
        let (router, shutdown) = start(&now, None);
        let replace = || router.want(|_| Ok(vec![now[0].into(), "127.0.0.1:7005".into()]));
        let kept = router.pairs()[0].workers[0].clone();
        // Not assessed yet (as a worker refilling, stale or down would be): refused.
        let e = replace().unwrap_err();
        assert!(
            e.starts_with("127.0.0.1:7002 cannot be replaced by 127.0.0.1:7005 now")
                && e.contains("127.0.0.1:7001 would be the pair's only copy and is unknown"),
            "{e}"
        );
        kept.set_state(WorkerState::InSync);
        kept.partial
            .store(true, std::sync::atomic::Ordering::Release);
        assert!(replace()
            .unwrap_err()
            .contains("in sync with a partial copy"));
        kept.partial
            .store(false, std::sync::atomic::Ordering::Release);
        replace().unwrap();
        // The step checks again: its partner went out of sync since.
        kept.set_state(WorkerState::Down);
        let step = [(0, 1, "127.0.0.1:7005".to_string())];
        let e = router.replace_workers(&step).await.unwrap_err();
        assert!(e.contains("is down"), "{e}");
        assert_eq!(router.current_workers(), now);
        kept.set_state(WorkerState::InSync);
        router.replace_workers(&step).await.unwrap();
        assert_eq!(router.current_workers(), [now[0], "127.0.0.1:7005"]);
        // The new worker is not assessed: replacing its partner next is refused.
        let e = router
            .want(|_| Ok(vec!["127.0.0.1:7006".into(), "127.0.0.1:7005".into()]))
            .unwrap_err();
        assert!(
            e.contains("127.0.0.1:7005 would be the pair's only copy"),
            "{e}"
        );
        shutdown.cancel();
    }
}
