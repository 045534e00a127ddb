//! The routing of each request to its pair: reads to one worker with failover to its
//! partner, writes to both, a request refused as routed by an older map routed again.
//!
//! The rest of the router is in its submodules, one concern each: `link` (the connections
//! to a worker and its state), `topology` (the pairs and slot map a request routes by),
//! `rmw` (programs on a pair's primary and the copy to its partner), `adapter` (adapter
//! mode's write rules), `membership` (changes of the pairs and slot moves), `shared` (the
//! map shared through the workers), and `reports` (status, INFO and stats lines).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::Either;
use tokio_util::sync::CancellationToken;
use twincache_client::Reply;
use twincache_protocol::auth::ClusterSecret;
use twincache_protocol::budget::Account;
use twincache_protocol::frame::{flags, Op, Request, Response};
use twincache_protocol::slots::SlotMap;
use twincache_protocol::Status;
use twincache_tls::Connector;

use crate::hlc::Hlc;
use crate::metrics::RouterStats;

mod adapter;
mod batch;
mod link;
mod membership;
mod reports;
mod rmw;
mod shared;
#[cfg(test)]
mod tests;
mod topology;

pub use batch::Written;
use link::Skipping;
pub use link::{WorkerLink, WorkerState};

pub(crate) use membership::read_state;
pub use membership::{Membership, MembershipConfig};
pub use rmw::{each_of, BoxAnswer, Pending, ScanStep};
pub use topology::{Route, Topology};

/// What the workers are: a replicated cache, or a migration tier in front of two Redis
/// servers (adapter mode). Decided once, before the first request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Replicated,
    Adapter,
}

/// Where requests come from: which connection slot to each worker keeps their order (a
/// client session's affinity), which account their large answers are charged to until
/// they are written (see `twincache_protocol::budget`), and the session's
/// read-modify-writes not yet answered (its later reads on those pairs go to where they run).
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub affinity: usize,
    pub account: Option<Arc<Account>>,
    pub rmw: Option<Arc<rmw::Pending>>,
}

impl Origin {
    /// The orchestrator's own requests (health checks, control calls).
    pub const INTERNAL: Origin = Origin {
        affinity: 0,
        account: None,
        rmw: None,
    };
}

/// Reads of an in-sync pair go to one partner this many in a row, then to the other. The
/// reads of one scheduler tick then mostly leave in one write and wake one worker, where
/// alternating read by read woke both every tick (at pipeline depth 1, 50 clients: 74K
/// against 86K GETs a second, medians of six alternating runs, with less CPU in every
/// process); over many ticks, and at depth 16, both partners still take half.
const READ_RUN: usize = 16;

/// Two workers holding the same data.
pub struct Pair {
    pub workers: [Arc<WorkerLink>; 2],
    /// Alternates reads between the partners, in runs of [`READ_RUN`], to spread the load.
    next_read: AtomicUsize,
    /// What the monitor last learned of each worker's encryption: `off` or the key's
    /// fingerprint; `None` until it has asked.
    encryption: [Mutex<Option<String>>; 2],
    /// Set while the partners' keys differ (logged once per change).
    key_mismatch: AtomicBool,
    /// Set while a worker of the pair runs in another mode than the cluster.
    pub(crate) mode_mismatch: AtomicBool,
}

impl Pair {
    pub(crate) fn new(workers: [Arc<WorkerLink>; 2]) -> Pair {
        Pair {
            workers,
            next_read: AtomicUsize::new(0),
            encryption: Default::default(),
            key_mismatch: AtomicBool::new(false),
            mode_mismatch: AtomicBool::new(false),
        }
    }

    /// Whether the partners use different encryption keys (or one encrypts and one not).
    pub fn key_mismatch(&self) -> bool {
        self.key_mismatch.load(Ordering::Relaxed)
    }

    fn encryption(&self, i: usize) -> Option<String> {
        self.encryption[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A write one worker of a pair took and its partner missed, as [`Router::record_miss`]
/// names it to the one that took it.
pub(crate) struct Missed {
    pub key: Bytes,
    pub version: u64,
    /// A program's changes block (all its keys), or empty.
    pub changes: Bytes,
}

/// Why a write that reached one worker of two is not acknowledged.
const MISS_UNRECORDED: &str =
    "the write reached one worker, and its partner's miss could not be recorded; retry";

/// The answer when no worker of the key's pair can serve: retryable.
/// Where a worker stands in a read's order (lower first; `None`: never read). An in-sync
/// worker with a partial copy comes after an in-sync partner with a complete one: it answers
/// "not found" for the partner's keys it has not merged yet (the partition tests found a
/// brief blip of a refill's source leaving such a copy serving half the reads while both
/// workers were in sync).
pub(crate) fn read_rank(state: WorkerState, partial: bool) -> Option<u8> {
    match state {
        WorkerState::InSync if !partial => Some(0),
        WorkerState::InSync => Some(1),
        WorkerState::Stale | WorkerState::Resyncing | WorkerState::Joining => Some(2),
        _ => None,
    }
}

fn unavailable(router: &Router) -> Response {
    if router.mode().is_none() {
        Response::error(Status::Unavailable, "the cluster is starting; retry")
    } else {
        Response::status(Status::Unavailable)
    }
}

/// A response still `Moved` after every reroute, as the client sees it: `Unavailable`
/// (TRYAGAIN), since the map is about to settle.
fn still_moved(resp: Response) -> Response {
    if resp.status == Status::Moved {
        Response::error(
            Status::Unavailable,
            "the cluster map is changing and this key's pair is not settled yet; retry",
        )
    } else {
        resp
    }
}

/// What a worker's refusal as routed by an older map (`Moved`) looks like in a result.
pub(crate) trait Refusal {
    fn moved(&self) -> Option<&Response>;
    /// The result as the client sees it if it is still a refusal ([`still_moved`]).
    fn settled(self) -> Self;
}

impl Refusal for Response {
    fn moved(&self) -> Option<&Response> {
        (self.status == Status::Moved).then_some(self)
    }

    fn settled(self) -> Self {
        still_moved(self)
    }
}

impl<T> Refusal for Result<T, Response> {
    fn moved(&self) -> Option<&Response> {
        self.as_ref().err().and_then(Refusal::moved)
    }

    fn settled(self) -> Self {
        self.map_err(still_moved)
    }
}

/// [`unavailable`] for a write, which also waits for this orchestrator's node id.
fn unwritable(router: &Router) -> Response {
    if router.mode().is_some() && !router.claimed.load(Ordering::Acquire) {
        Response::error(
            Status::Unavailable,
            "waiting for a node id no other orchestrator holds; retry",
        )
    } else {
        unavailable(router)
    }
}

/// What a write's answers make of it ([`Router::decide`]).
enum Decided {
    Done(Response),
    /// Only the worker at this index of the pair took it: acknowledged once its partner's
    /// miss is on record ([`Router::acknowledge_one`]).
    TakenBy(usize, Response),
}

/// A response on its way.
pub type BoxedResponse = std::pin::Pin<Box<dyn Future<Output = Response> + Send>>;

/// Settings the router needs.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// TTL applied to writes that carry none (0: keys live until deleted or evicted).
    pub default_ttl_ms: u64,
    pub connections_per_worker: usize,
    pub max_frame: usize,
    pub worker_timeout: Duration,
    /// This orchestrator's id in write versions; random (and redrawn on a clash) if `None`.
    pub node_id: Option<u8>,
    /// The workers' mode if stated; learned from them at start if `None`.
    pub mode: Option<Mode>,
    /// The cluster secret, proved on every connection to a worker.
    pub secret: Option<ClusterSecret>,
    /// TLS for the connections to the workers (`--tls-cluster`).
    pub tls: Option<Connector>,
    /// Where the pairs and the slot map are kept across restarts (`--state-file`): rewritten
    /// on every change (read at start by `Orchestrator::bind`).
    pub state_file: Option<std::path::PathBuf>,
    pub membership: MembershipConfig,
    /// How many worker connections are backed up now, their outbox past
    /// `twincache_client::connection::BACKED_UP`: shared by every link, read by sessions
    /// ([`Router::backed_up`]).
    pub backlog: Arc<AtomicUsize>,
}

/// Routes requests to pairs: the pair is chosen by the stable key hash; writes go to both
/// workers at once, reads to one with failover to the other.
///
/// Nothing is served until the health monitor has seen the workers once: before that their
/// mode (replicated or adapter) and which of them hold the pair's data are unknown, and
/// requests are answered `Unavailable` (`-TRYAGAIN`), which clients retry.
pub struct Router {
    /// The pairs and the slot map, swapped whole on a membership change (see
    /// [`Topology`]): a request takes the current `Arc` (no lock) and holds it until
    /// answered, which is how a change knows when the old map is drained.
    topology: ArcSwap<Topology>,
    pub(crate) clock: Hlc,
    default_ttl_ms: u64,
    /// Decided once (see [`Mode`]); unset until the monitor has seen the workers.
    mode: OnceLock<Mode>,
    /// Whether the workers accepted this orchestrator's node id in the last health round:
    /// writes wait for it, so that no two orchestrators stamp the same versions.
    claimed: AtomicBool,
    /// Whether the last round found another orchestrator holding this node id.
    pub(crate) clashed: AtomicBool,
    /// Tells this orchestrator's claims from another's holding the same id.
    pub(crate) instance: u64,
    /// Whether the id was given (`--node-id`): then a clash is an error, not a redraw.
    pub(crate) fixed_node: bool,
    /// Failovers, partial writes, state changes, resyncs (for `/metrics`).
    pub stats: RouterStats,
    /// The largest value a read-modify-write may leave: its answer carries it (twice at
    /// most, as a reply and as the partner's copy) within the links' frame limit.
    pub max_value: usize,
    /// The most a read program's replies may take: what a frame carries, less the answer's
    /// own header.
    pub max_replies: usize,
    /// Read-modify-writes past their first send (`Router::apply`): shutdown waits for them
    /// before it closes the worker links, so no copy owed to a partner is cut off.
    pub rmw_tasks: tokio_util::task::TaskTracker,
    /// `--worker-timeout`: how long copies of a primary's changes may take to land.
    pub(crate) worker_timeout: Duration,
    /// Woken whenever a new topology is swapped in (a slot move began or ended).
    moved: tokio::sync::Notify,
    /// Held while a new map is published and swapped in, or one read from a worker is
    /// adopted, so the two never interleave.
    swapping: tokio::sync::Mutex<()>,
    /// What new worker links are made with, and the shutdown they stop at.
    config: RouterConfig,
    shutdown: CancellationToken,
    /// Membership changes: what is asked for and how the slot moves go.
    pub membership: membership::Membership,
}

impl Router {
    /// Connects to `workers` (in pairing order; an even number) in the background, or to
    /// the pairs of `kept`, the state an earlier run left (see [`read_state`]): after a
    /// change its pairs and map are not what the worker list alone would give.
    pub(crate) fn start(
        workers: &[String],
        kept: Option<twincache_protocol::cluster_map::ClusterMap>,
        config: &RouterConfig,
        shutdown: &CancellationToken,
    ) -> Router {
        assert!(
            !workers.is_empty() && workers.len().is_multiple_of(2),
            "workers come in pairs"
        );
        let link = |addr: &String| WorkerLink::spawn(addr.clone(), config, shutdown);
        let listed = workers;
        let (workers, slots, moving) = match kept {
            Some(state) => (state.workers, state.slots, state.moving),
            None => (workers.to_vec(), SlotMap::even(workers.len() / 2), None),
        };
        let pairs: Vec<Arc<Pair>> = workers
            .chunks(2)
            .map(|w| Arc::new(Pair::new([link(&w[0]), link(&w[1])])))
            .collect();
        let topology = Topology {
            slots,
            pairs,
            moving,
        };
        let mode = OnceLock::new();
        if let Some(m) = config.mode {
            let _ = mode.set(m);
        }
        Router {
            topology: ArcSwap::from_pointee(topology),
            clock: Hlc::new(config.node_id.unwrap_or_else(rand::random)),
            default_ttl_ms: config.default_ttl_ms,
            mode,
            claimed: AtomicBool::new(false),
            clashed: AtomicBool::new(false),
            instance: rand::random(),
            fixed_node: config.node_id.is_some(),
            stats: RouterStats::default(),
            max_value: (config.max_frame / 2).saturating_sub(1024).max(1024),
            max_replies: config.max_frame.saturating_sub(1024).max(1024),
            rmw_tasks: tokio_util::task::TaskTracker::new(),
            worker_timeout: config.worker_timeout,
            moved: tokio::sync::Notify::new(),
            swapping: tokio::sync::Mutex::new(()),
            config: config.clone(),
            shutdown: shutdown.clone(),
            membership: membership::Membership::new(
                membership::wanted_at_start(&workers, listed, config.membership.from_file),
                config.membership.clone(),
            ),
        }
    }

    /// The pairs and slot map now (a snapshot: a membership change swaps in another).
    pub fn pairs(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// The index of the pair that holds `key` now.
    pub fn pair_of(&self, key: &[u8]) -> usize {
        self.topology.load().pair_of(key)
    }

    /// The workers' mode, once known.
    pub fn mode(&self) -> Option<Mode> {
        self.mode.get().copied()
    }

    /// Whether the workers are in adapter mode (false while the mode is not known yet).
    pub fn is_adapter(&self) -> bool {
        self.mode() == Some(Mode::Adapter)
    }

    /// Settles the mode; only the first call counts. Returns the mode in force.
    pub(crate) fn settle_mode(&self, mode: Mode) -> Mode {
        let settled = *self.mode.get_or_init(|| {
            tracing::info!(mode = ?mode, "the workers' mode is known: serving");
            mode
        });
        settled
    }

    pub(crate) fn set_claimed(&self, ok: bool) {
        self.claimed.store(ok, Ordering::Release);
    }

    /// Waits for a reply (the connection enforces `--worker-timeout`); `None` if the worker
    /// could not answer.
    pub(crate) async fn finish(&self, link: &WorkerLink, reply: Option<Reply>) -> Option<Response> {
        self.settle(link, reply?.await)
    }

    /// What a worker's answer (or the failure to get one) makes of a request: [`Router::finish`]
    /// once the answer is in, for paths that poll the reply themselves.
    fn settle(
        &self,
        link: &WorkerLink,
        answer: Result<Response, twincache_client::Error>,
    ) -> Option<Response> {
        match answer {
            // Which worker refused travels with its epoch, for `Router::reroute`.
            Ok(resp) if resp.status == Status::Moved => Some(Response {
                payload: Bytes::from(format!(
                    "{} {}",
                    String::from_utf8_lossy(&resp.payload),
                    link.addr
                )),
                ..resp
            }),
            Ok(resp) if resp.status != Status::ServerError => Some(resp),
            Ok(resp) => {
                tracing::warn!(worker = %link.addr, message = %String::from_utf8_lossy(&resp.payload), "worker error");
                None
            }
            Err(e) => {
                tracing::debug!(worker = %link.addr, error = %e, "request failed");
                None
            }
        }
    }

    /// The order in which to try a pair's workers for a read, by [`read_rank`]: in-sync ones
    /// first (alternating in runs of [`READ_RUN`] when both are; in adapter mode the one that
    /// takes the writes), a
    /// complete copy before a partial one, then, only if those fail, a stale or resyncing
    /// copy, since a stale answer beats none (availability first). Workers not assessed, down
    /// or misconfigured are never read.
    fn read_order(&self, pair: &Pair) -> [Option<usize>; 2] {
        let rank = |w: &WorkerLink| read_rank(w.state(), w.partial.load(Ordering::Acquire));
        let [a, b] = &pair.workers;
        match (rank(a), rank(b)) {
            (Some(x), Some(y)) if x < y => [Some(0), Some(1)],
            (Some(x), Some(y)) if y < x => [Some(1), Some(0)],
            (Some(_), Some(_)) => {
                let first = if self.is_adapter() {
                    // Where the pair's writes go, so a read queued after a write waits for
                    // it there (the partner's cache is only invalidated later).
                    0
                } else {
                    pair.next_read.fetch_add(1, Ordering::Relaxed) / READ_RUN % 2
                };
                [Some(first), Some(1 - first)]
            }
            (Some(_), None) => [Some(0), None],
            (None, Some(_)) => [Some(1), None],
            (None, None) => [None, None],
        }
    }

    /// Sends `req` to worker `i` of `pair`, telling it whether it is read as the pair's
    /// copy (a worker that restarted since then refuses, see [`flags::IN_SYNC`]).
    fn send_read(
        &self,
        pair: &Pair,
        i: usize,
        req: &mut Request,
        origin: &Origin,
    ) -> Option<Reply> {
        let w = &pair.workers[i];
        if w.state() == WorkerState::InSync && !self.is_adapter() {
            req.flags |= flags::IN_SYNC;
        } else {
            req.flags &= !flags::IN_SYNC;
        }
        w.send(req, origin)
    }

    /// A read's answer, unless the worker refused it for not holding the pair's data (it
    /// restarted since the monitor last looked), in which case the partner is asked.
    /// (Awaited in place, not through [`Router::finish`]: one state machine less in every
    /// read's future.)
    async fn finish_read(
        &self,
        link: &WorkerLink,
        req: &Request,
        reply: Option<Reply>,
    ) -> Option<Response> {
        let resp = self.settle(link, reply?.await)?;
        let refused = resp.status == Status::Unavailable && req.flags & flags::IN_SYNC != 0;
        (!refused).then_some(resp)
    }

    /// Sends a read (`get`, `exists`) to one worker of the key's pair, falling over to the
    /// partner if the first cannot answer.
    ///
    /// The request is queued before this returns (see [`WorkerLink`]); `origin` is the
    /// calling session's, whose affinity keeps its requests in order.
    ///
    /// A key whose slot is being moved is read on its new pair, and, if it is not found
    /// there, on the pair it comes from (the copy may not have reached it yet). A read a
    /// worker refused as routed by an older map is routed again ([`Router::rerouted`]).
    pub fn read(
        self: &Arc<Self>,
        req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        self.read_once(req, origin, true)
    }

    /// [`Router::read`] by the map now, once.
    /// (`reroute`: see [`Router::read_in`]; a read routed again is not routed again from
    /// inside, [`Router::rerouted`] counts its attempts.)
    fn read_once(
        self: &Arc<Self>,
        mut req: Request,
        origin: &Origin,
        reroute: bool,
    ) -> impl Future<Output = Response> + Send + 'static {
        let topo = self.topology.load_full();
        let route = topo.route(&req.key);
        if route.from.is_some() {
            req.flags |= flags::MOVING_SOURCE;
        } else if matches!(req.op, Op::Get | Op::Exists) {
            req.flags &= !flags::MOVING_SOURCE;
        }
        let Some(from) = route.from else {
            return Either::Left(self.read_in(topo, route.pair, req, origin, reroute));
        };
        let again = req.clone();
        let first = self.read_in(topo.clone(), route.pair, req, origin, reroute);
        let this = self.clone();
        let origin = origin.clone();
        Either::Right(Box::pin(async move {
            let resp = first.await;
            if resp.status != Status::NotFound {
                return resp;
            }
            this.read_in(topo, from, again, &origin, reroute).await
        }) as BoxedResponse)
    }

    /// Routes a request again while a worker refuses it as routed by an older map (`Moved`),
    /// after bringing this orchestrator and that worker to the same map
    /// ([`Router::reroute`]), at most `REROUTES` times; then `Unavailable` (TRYAGAIN).
    pub(crate) async fn rerouted<T: Refusal>(
        &self,
        mut result: T,
        attempt: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
    ) -> T {
        for _ in 0..shared::REROUTES {
            let Some(refused) = result.moved() else {
                return result;
            };
            RouterStats::count(&self.stats.reroutes);
            self.reroute(refused).await;
            result = attempt().await;
        }
        result.settled()
    }

    /// [`Router::read`] on pair `pair` (an index into the topology now), whatever the key
    /// (RANDOMKEY names none).
    pub fn read_pair(
        self: &Arc<Self>,
        pair: usize,
        req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        self.read_in(self.topology.load_full(), pair, req, origin, false)
    }

    /// A read on pair `pair` of `topo`. On a pair where the session has a read-modify-write
    /// in flight, it is read where that runs (the primary), behind it, so the session reads
    /// its own write.
    ///
    /// With `reroute`, a read a worker refuses as routed by an older map is read again by the
    /// newer one ([`Router::reread`]); without, the refusal is the answer (a program's
    /// caller decides what to do with it).
    pub(crate) fn read_in(
        self: &Arc<Self>,
        topo: Arc<Topology>,
        pair: usize,
        mut req: Request,
        origin: &Origin,
        reroute: bool,
    ) -> impl Future<Output = Response> + Send + 'static {
        let Some(p) = topo.get(pair) else {
            // An index from a topology that has since shrunk (a SCAN cursor, RANDOMKEY).
            return Either::Right(std::future::ready(Response::status(Status::Unavailable)));
        };
        let order = if self.mode().is_none() {
            [None, None]
        } else if origin.rmw.as_ref().is_some_and(|p| p.holds(pair)) {
            // Where the session's program on the pair runs, so the read sees it. With no
            // primary (only a partial copy serves, which runs no program) the program is
            // refused, and the read goes where reads go.
            match self.primaries(p) {
                [None, None] => self.read_order(p),
                order => order,
            }
        } else {
            self.read_order(p)
        };
        let reply = order[0].and_then(|i| self.send_read(p, i, &mut req, origin));
        let this = self.clone();
        let origin = (order[1].is_some() || reroute).then(|| origin.clone());
        Either::Left(async move {
            let p = &topo[pair];
            let mut resp = None;
            if let Some(first) = order[0] {
                resp = this.finish_read(&p.workers[first], &req, reply).await;
            }
            if let (None, Some(second), Some(origin)) = (&resp, order[1], &origin) {
                RouterStats::count(&this.stats.failovers);
                let reply = this.send_read(p, second, &mut req, origin);
                resp = this.finish_read(&p.workers[second], &req, reply).await;
            }
            let resp = resp.unwrap_or_else(|| unavailable(&this));
            match origin {
                Some(origin) if reroute && resp.status == Status::Moved => {
                    this.reread(resp, req, origin).await
                }
                _ => resp,
            }
        })
    }

    /// A read refused as routed by an older map, read again by the newer one (boxed, and
    /// returning a named type: the read's own future stays small, and does not contain
    /// itself).
    fn reread(self: &Arc<Self>, refused: Response, req: Request, origin: Origin) -> BoxedResponse {
        let this = self.clone();
        Box::pin(async move {
            this.rerouted(refused, || {
                Box::pin(this.read_once(req.clone(), &origin, false))
            })
            .await
        })
    }

    /// Whether a worker connection is backed up: sessions then send nothing more until
    /// what they have in flight is answered, rather than overflow it (a request that does
    /// not fit fails over, and a write that fails over marks a healthy worker stale).
    #[inline]
    pub fn backed_up(&self) -> bool {
        self.backlog() > 0
    }

    /// How many worker connections are backed up now.
    pub fn backlog(&self) -> usize {
        self.config.backlog.load(Ordering::Relaxed)
    }

    pub fn get(
        self: &Arc<Self>,
        key: Bytes,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        self.read(Request::new(Op::Get, key), origin)
    }

    /// Records that `missed` lacks a write `holder` took: on the orchestrator (the worker
    /// becomes stale) and on `holder` (its count of writes taken alone), so that any
    /// orchestrator, even one started later, knows. Returns whether `holder` recorded it;
    /// a write whose miss is not recorded anywhere durable must not be acknowledged.
    ///
    /// `written` names the write (its key and version, and for a program its changes) so
    /// that `holder` marks its entries as taken alone: a copy another orchestrator's
    /// program computes without them is then refused (see `cluster::rmw`).
    async fn record_miss(
        &self,
        holder: &WorkerLink,
        missed: &WorkerLink,
        written: Option<Missed>,
    ) -> bool {
        missed.missed_write();
        let mut req = Request::new(Op::PartnerMissed, Bytes::new());
        if let Some(w) = written {
            (req.key, req.version, req.value) = (w.key, w.version, w.changes);
        }
        let reply = holder.send(&req, &Origin::INTERNAL);
        self.finish(holder, reply)
            .await
            .is_some_and(|r| r.status == Status::Ok)
    }

    /// Sends a write (`set`, `del`) to both workers of the key's pair at once, stamped with a
    /// fresh version so the partners converge whatever order writes reach them in. Succeeds
    /// if at least one worker stored it (availability first).
    pub fn write(
        self: &Arc<Self>,
        req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        // Not boxed on the common path: the session boxes what it is given, once.
        if self.is_adapter() {
            return Either::Right(self.adapter_write(req, origin));
        }
        Either::Left(self.replicated_write(req, origin))
    }

    /// The workers of `pair` a write goes to: those that take writes (in sync or
    /// resyncing), or, if neither does, the stale ones (the monitor is about to promote one:
    /// availability first). A worker left out is down, stale or not assessed: it resyncs
    /// before it serves reads again.
    fn write_targets(&self, pair: &Pair) -> [bool; 2] {
        if !self.claimed.load(Ordering::Acquire) || self.mode().is_none() {
            return [false, false];
        }
        let states = pair.workers.each_ref().map(|w| w.state());
        let takes = states.map(WorkerState::takes_writes);
        if takes[0] || takes[1] {
            takes
        } else {
            states.map(|s| s == WorkerState::Stale)
        }
    }

    fn replicated_write(
        self: &Arc<Self>,
        mut req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        self.stamp_write(&mut req);
        self.write_once(req, origin, true)
    }

    /// Gives a write for both partners its version and its expiry as an instant.
    fn stamp_write(&self, req: &mut Request) {
        req.version = self.clock.next();
        // The orchestrator applies the default TTL, so both partners get the same expiry.
        if req.op == Op::Set && req.ttl_ms == 0 && req.flags & flags::KEEP_TTL == 0 {
            req.ttl_ms = self.default_ttl_ms;
        }
        // And makes it absolute, so both partners store the same instant.
        if req.op == Op::Set && req.ttl_ms > 0 && req.flags & flags::EXPIRES_AT == 0 {
            req.ttl_ms = twincache_protocol::version::wall_ms().saturating_add(req.ttl_ms);
            req.flags |= flags::EXPIRES_AT;
        }
    }

    /// A stamped write routed by the map now, once.
    fn write_once(
        self: &Arc<Self>,
        mut req: Request,
        origin: &Origin,
        reroute: bool,
    ) -> impl Future<Output = Response> + Send + 'static {
        // The bit is KEEPTTL on a SET: only a delete's is this router's to clear.
        if req.op == Op::Del {
            req.flags &= !flags::MOVING_SOURCE;
        }
        let topo = self.topology.load_full();
        let route = topo.route(&req.key);
        match route.from {
            // A delete of a key being moved goes to the pair it comes from too: a read that
            // misses on the new pair looks there, and the copy must not bring it back (the
            // new pair's tombstone is newer than the copy).
            Some(from) if req.op == Op::Del => {
                let mut to_old = req.clone();
                to_old.flags |= flags::MOVING_SOURCE;
                let old = self.write_in(topo.clone(), from, to_old, origin, reroute);
                let new = self.write_in(topo, route.pair, req, origin, reroute);
                Either::Right(Box::pin(async move {
                    let (old, new) = tokio::join!(old, new);
                    if old.status == Status::Moved {
                        return old;
                    }
                    // Found on either is found; the new pair's failure is the answer's.
                    if new.status == Status::NotFound && old.status == Status::Ok {
                        old
                    } else {
                        new
                    }
                }) as BoxedResponse)
            }
            _ => Either::Left(self.write_in(topo, route.pair, req, origin, reroute)),
        }
    }

    /// A write, stamped, to pair `pair` of `topo`; with `reroute`, routed again by a newer map
    /// if a worker refuses it as routed by an older one ([`Router::rewrite`]).
    fn write_in(
        self: &Arc<Self>,
        topo: Arc<Topology>,
        pair: usize,
        mut req: Request,
        origin: &Origin,
        reroute: bool,
    ) -> impl Future<Output = Response> + Send + 'static {
        let targets = self.write_targets(&topo[pair]);
        if targets[0] != targets[1] {
            // Its partner will not get it: counted on the worker, which outlives us.
            req.flags |= flags::SOLO;
        } else {
            req.flags &= !flags::SOLO;
        }
        let [a, b] = &topo[pair].workers;
        // Queued now, in the session's order (see WorkerLink); awaited below.
        let replies = [
            targets[0].then(|| a.send(&req, origin)),
            targets[1].then(|| b.send(&req, origin)),
        ];
        // The worker left out has missed it, and must not take a snapshot before it lands.
        let skipping = match targets {
            [true, false] => Some(Skipping::new(b.clone())),
            [false, true] => Some(Skipping::new(a.clone())),
            _ => None,
        };
        // Behind a program of this session's on the pair, only the primary's answer has seen
        // it (its partner gets the program's changes once the primary has answered): a DEL
        // of a key the session's RENAME just moved away is not found.
        let behind = match &origin.rmw {
            Some(p) if p.holds(pair) => self.primaries(&topo[pair])[0],
            _ => None,
        };
        let this = self.clone();
        // What a write routed again needs of its origin: the order of the session's requests
        // (no account: a write's answer is small), without two reference counts per write.
        let affinity = origin.affinity;
        async move {
            let skipping = skipping;
            let workers = &topo[pair].workers;
            // Both answers awaited together, polled in place: for each worker, `None` if the
            // write was not sent to it, `Some(None)` if it did not take it.
            let mut waiting = replies;
            let mut got: [Option<Option<Response>>; 2] = [None, None];
            std::future::poll_fn(|cx| {
                for (i, slot) in waiting.iter_mut().enumerate() {
                    let Some(sent) = slot else { continue };
                    let answer = match sent {
                        Some(reply) => match std::pin::Pin::new(reply).poll(cx) {
                            std::task::Poll::Ready(answer) => this.settle(&workers[i], answer),
                            std::task::Poll::Pending => continue,
                        },
                        None => None,
                    };
                    got[i] = Some(answer);
                    *slot = None;
                }
                if waiting.iter().all(Option::is_none) {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await;
            let resp = match this.decide(workers, got, behind) {
                Decided::Done(resp) => resp,
                // (Boxed: the write's own future, boxed for every write, stays small.)
                Decided::TakenBy(i, resp) => {
                    let ack = this.acknowledge_one(&workers[i], &workers[1 - i], resp, &req);
                    Box::pin(ack).await
                }
            };
            if !reroute || resp.status != Status::Moved {
                return resp;
            }
            drop(skipping);
            this.rewrite(resp, req, affinity).await
        }
    }

    /// What a write's answers make of it: per worker, `None` if it was not sent there and
    /// `Some(None)` if that worker did not take it (marked here as having missed it). Of two
    /// answers, `behind`'s if given (see [`Router::write_in`]), else a success.
    #[inline]
    fn decide(
        &self,
        workers: &[Arc<WorkerLink>; 2],
        got: [Option<Option<Response>>; 2],
        behind: Option<usize>,
    ) -> Decided {
        let [a, b] = workers;
        let [ra, rb] = got;
        Decided::Done(match (ra, rb) {
            // Routed by an older map: not acknowledged, whoever else took it (routed
            // again, it lands where the slot is now, with the same version).
            (Some(Some(r)), _) | (_, Some(Some(r))) if r.status == Status::Moved => r,
            (Some(Some(ra)), Some(Some(rb))) => match behind {
                Some(0) => ra,
                Some(_) => rb,
                // Prefer success; of two other answers either is as informative.
                None if rb.status == Status::Ok => rb,
                None => ra,
            },
            // One of two took it: the other missed it, which must be on record before
            // the write is acknowledged.
            (Some(Some(r)), Some(None)) => return Decided::TakenBy(0, r),
            (Some(None), Some(Some(r))) => return Decided::TakenBy(1, r),
            // The only target: it counted the write as taken alone (`SOLO`).
            (Some(Some(r)), None) | (None, Some(Some(r))) => r,
            (Some(None), None) => {
                a.missed_write();
                unwritable(self)
            }
            (None, Some(None)) => {
                b.missed_write();
                unwritable(self)
            }
            (Some(None), Some(None)) => {
                a.missed_write();
                b.missed_write();
                unwritable(self)
            }
            (None, None) => unwritable(self),
        })
    }

    /// A write refused as routed by an older map, routed again by the newer one with its
    /// version: a later write of the session that was routed by the new map at once stays
    /// newer. (Boxed, with a named type, as [`Router::reread`].)
    fn rewrite(
        self: &Arc<Self>,
        refused: Response,
        req: Request,
        affinity: usize,
    ) -> BoxedResponse {
        let this = self.clone();
        let origin = Origin {
            affinity,
            ..Origin::default()
        };
        Box::pin(async move {
            this.rerouted(refused, || {
                Box::pin(this.write_once(req.clone(), &origin, false))
            })
            .await
        })
    }

    /// `holder` answered a write `missed` did not take: acknowledges it once the miss is on
    /// record (see [`Router::record_miss`]).
    async fn acknowledge_one(
        &self,
        holder: &WorkerLink,
        missed: &WorkerLink,
        resp: Response,
        req: &Request,
    ) -> Response {
        let written = Missed {
            key: req.key.clone(),
            version: req.version,
            changes: Bytes::new(),
        };
        if self.record_miss(holder, missed, Some(written)).await {
            RouterStats::count(&self.stats.partial_writes);
            resp
        } else {
            Response::error(Status::Unavailable, MISS_UNRECORDED)
        }
    }

    /// Sends one worker a control request (`op`, with `value`) and returns its answer if it
    /// was `Ok`.
    pub(crate) async fn ask(&self, w: &WorkerLink, op: Op, value: &str) -> Option<Response> {
        self.control(w, op, value.to_owned())
            .await
            .filter(|r| r.status == Status::Ok)
    }

    /// [`Router::ask`], answered whatever its status (`None`: no answer).
    pub(crate) async fn control(
        &self,
        w: &WorkerLink,
        op: Op,
        value: impl Into<Bytes>,
    ) -> Option<Response> {
        let mut req = Request::new(op, Bytes::new());
        req.value = value.into();
        let reply = w.send(&req, &Origin::INTERNAL);
        self.finish(w, reply).await
    }
}
