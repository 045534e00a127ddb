//! Worker links, pairs, and the routing of each request to its pair.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use tokio_util::sync::CancellationToken;
use twincache_client::{Connection, Reply};
use twincache_protocol::auth::ClusterSecret;
use twincache_protocol::budget::Account;
use twincache_protocol::frame::{flags, Op, Request, Response};
use twincache_protocol::info;
use twincache_protocol::slots::SlotMap;
use twincache_protocol::Status;
use twincache_tls::Connector;

use crate::hlc::Hlc;
use crate::metrics::RouterStats;

mod membership;
mod rmw;
mod shared;
mod topology;

pub(crate) use membership::read_state;
pub use membership::{Membership, MembershipConfig};
pub use rmw::{gets, BoxAnswer, Pending, ScanStep};
pub use topology::{Route, Topology};

const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How often each idle connection to a worker is pinged.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The orchestrator's persistent connections to one worker.
///
/// Each slot has a task that keeps it connected, reconnecting with backoff after a failure.
/// A client session always uses the same slot (its affinity) while that slot is live, so its
/// requests reach the worker in the order it sent them; sessions spread over the slots. A
/// worker with no live slot is skipped at once, so a dead worker costs its pair nothing
/// beyond the requests in flight when it died.
pub struct WorkerLink {
    /// As given: `<address>` or `<address>@<peer address>` (see `config::dialed`, `peer`).
    pub addr: String,
    slots: Vec<Mutex<Option<Connection>>>,
    /// The worker's [`WorkerState`], kept by the health monitor (and by writes it missed).
    state: AtomicU8,
    /// Set when the worker missed a write; a resync under way when that happened does not
    /// count, since the write may have escaped its snapshot.
    pub(crate) dirty: AtomicBool,
    /// The worker's boot id when last seen: a new one means it restarted, empty.
    pub(crate) boot: Mutex<Option<u64>>,
    /// The worker's count of completed resyncs when this orchestrator asked for one.
    pub(crate) resync_base: AtomicU64,
    /// When a refill that failed may be tried again.
    pub(crate) retry_at: Mutex<Option<tokio::time::Instant>>,
    /// The cluster secret this orchestrator proves on each connection.
    secret: Option<ClusterSecret>,
    /// TLS for each connection (`--tls-cluster`); it follows certificate reloads.
    tls: Option<Connector>,
    /// Whether the worker's refusal of this orchestrator is logged already.
    refused: AtomicBool,
    /// Writes in flight to its partner alone (`SOLO`): this worker will not get them, and
    /// a snapshot taken before they land would miss them too.
    pub(crate) skipped: AtomicU64,
    /// Since when it holds the pair's data, as it last said (Unix ms; 0: unknown): the
    /// worker synced the longest is the pair's primary (see `rmw`).
    pub(crate) synced_at: AtomicU64,
    /// The worker last reported a partial copy: it was promoted to serve alone before a
    /// refill completed, and has not yet merged its partner's data, so a key it lacks reads
    /// as absent. Kept by the health monitor; see [`read_rank`].
    pub(crate) partial: AtomicBool,
    /// The worker's boot id and count of refills started when its last sweep was asked for
    /// (see `Router::sweep_later`): a refill that ended since may have brought back slots its
    /// pair does not hold.
    pub(crate) swept: Mutex<Option<(u64, u64)>>,
    /// Cancelled when the worker leaves the cluster (replaced, or its pair removed): its
    /// connections close once the requests in flight are answered.
    stop: CancellationToken,
}

/// Where a worker stands with its pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    /// Not assessed yet: just started, or answering again after being down. Gets no
    /// requests until the health monitor has compared it with its partner.
    Unknown = 0,
    /// Holds the pair's data: serves reads and writes.
    InSync = 1,
    /// Not answering.
    Down = 2,
    /// Reachable but missing writes (restarted, or missed some): serves no reads (unless
    /// nothing better is left), gets no writes, and waits to resync.
    Stale = 3,
    /// Refilling from its partner: takes writes, serves no reads.
    Resyncing = 4,
    /// Runs in another mode than the cluster (adapter mode on one side only): gets nothing
    /// until it is restarted in the right mode.
    Misconfigured = 5,
    /// About to resync: takes writes again, serves no reads, and asks for its partner's
    /// snapshot once the writes sent while it was left out have landed on the partner (so
    /// the snapshot holds them).
    Joining = 6,
}

impl WorkerState {
    fn from_u8(v: u8) -> WorkerState {
        match v {
            1 => WorkerState::InSync,
            2 => WorkerState::Down,
            3 => WorkerState::Stale,
            4 => WorkerState::Resyncing,
            5 => WorkerState::Misconfigured,
            6 => WorkerState::Joining,
            _ => WorkerState::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Unknown => "unknown",
            WorkerState::InSync => "in_sync",
            WorkerState::Down => "down",
            WorkerState::Stale => "stale",
            WorkerState::Resyncing => "resyncing",
            WorkerState::Misconfigured => "misconfigured",
            WorkerState::Joining => "joining",
        }
    }

    /// Takes the pair's writes, and the writes wait for its answer. A worker not assessed yet
    /// (unknown) takes them too: a copy too many is harmless, since it serves no reads until
    /// assessed, while leaving it out would let it be found in sync without a write its
    /// partner took alone after the assessment's status (the partner's two transitions, or
    /// the adoption of a new pair, are not one instant).
    fn takes_writes(self) -> bool {
        matches!(
            self,
            WorkerState::InSync
                | WorkerState::Resyncing
                | WorkerState::Joining
                | WorkerState::Unknown
        )
    }
}

/// What the workers are: a replicated cache, or a migration tier in front of two Redis
/// servers (adapter mode). Decided once, before the first request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Replicated,
    Adapter,
}

impl WorkerLink {
    fn spawn(addr: String, config: &RouterConfig, shutdown: &CancellationToken) -> Arc<WorkerLink> {
        // The data slots, and one more for health checks (see `send_control`).
        let connections = config.connections_per_worker + 1;
        let link = Arc::new(WorkerLink {
            addr,
            slots: (0..connections).map(|_| Mutex::new(None)).collect(),
            state: AtomicU8::new(WorkerState::Unknown as u8),
            dirty: AtomicBool::new(false),
            boot: Mutex::new(None),
            resync_base: AtomicU64::new(0),
            retry_at: Mutex::new(None),
            secret: config.secret.clone(),
            tls: config.tls.clone(),
            refused: AtomicBool::new(false),
            skipped: AtomicU64::new(0),
            synced_at: AtomicU64::new(0),
            partial: AtomicBool::new(false),
            swept: Mutex::new(None),
            stop: shutdown.child_token(),
        });
        for slot in 0..connections {
            // These tasks end at shutdown, or when the worker leaves the cluster.
            tokio::spawn(link.clone().maintain(
                slot,
                config.max_frame,
                config.worker_timeout,
                link.stop.clone(),
            ));
        }
        link
    }

    /// The worker has left the cluster: its connections close (those with requests in flight
    /// once they are answered, within `--worker-timeout`).
    pub(crate) fn retire(self: &Arc<Self>, grace: Duration) {
        let link = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            link.stop.cancel();
        });
    }

    /// Keeps slot `slot` connected until shutdown.
    async fn maintain(
        self: Arc<Self>,
        slot: usize,
        max_frame: usize,
        timeout: Duration,
        shutdown: CancellationToken,
    ) {
        let mut backoff = RECONNECT_MIN;
        while !shutdown.is_cancelled() {
            let attempt = tokio::time::timeout(
                timeout,
                Connection::open(
                    crate::config::dialed(&self.addr),
                    max_frame,
                    timeout,
                    self.secret.as_ref(),
                    self.tls.as_ref(),
                ),
            );
            let conn = tokio::select! {
                res = attempt => res,
                _ = shutdown.cancelled() => break,
            };
            match conn {
                Ok(Ok(conn)) => {
                    backoff = RECONNECT_MIN;
                    // A worker that answers slowly but steadily has a queue, not a fault.
                    conn.patient_while_answering();
                    *self.lock_slot(slot) = Some(conn.clone());
                    // Whether the worker is up is the health monitor's to say and log.
                    tracing::debug!(worker = %self.addr, slot, "connected");
                    // A ping now and then keeps an idle slot within the worker's
                    // --idle-timeout, and finds a half-open link.
                    let mut keepalive = tokio::time::interval(KEEPALIVE);
                    keepalive.tick().await;
                    loop {
                        tokio::select! {
                            _ = conn.closed() => break,
                            _ = shutdown.cancelled() => {
                                conn.close();
                                break;
                            }
                            _ = keepalive.tick() => {
                                drop(conn.send(&Request::new(Op::Ping, Bytes::new())));
                            }
                        }
                    }
                    *self.lock_slot(slot) = None;
                    tracing::debug!(worker = %self.addr, slot, "connection closed");
                }
                Ok(Err(e @ twincache_client::Error::Auth(_))) => self.refusing(&format!(
                    "{e}: give the orchestrator and every worker the same --cluster-secret-file"
                )),
                Ok(Err(e @ twincache_client::Error::Tls(_))) => self.refusing(&format!(
                    "{e}: the worker needs --tls-cluster with a certificate for this address, \
                     signed by a CA in --tls-ca-cert-file (and accepting this orchestrator's \
                     certificate, if it requires one)"
                )),
                Ok(Err(e)) => tracing::debug!(worker = %self.addr, error = %e, "connect failed"),
                Err(_) => tracing::debug!(worker = %self.addr, "connect timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    fn lock_slot(&self, slot: usize) -> std::sync::MutexGuard<'_, Option<Connection>> {
        self.slots[slot].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `req` on the slot of `origin`'s affinity if it is live, else on the next live
    /// one; `None` if the worker has no live connection.
    pub(crate) fn send(&self, req: &Request, origin: &Origin) -> Option<Reply> {
        let n = self.slots.len() - 1;
        self.on_live((0..n).map(|i| (origin.affinity + i) % n), |c| {
            c.send_charged(req, origin.account.as_ref())
        })
    }

    /// [`WorkerLink::send`] for a request that fails after one `--worker-timeout` even
    /// while the worker answers others (`Connection::send_strict`): a read-modify-write's
    /// copy, whose deadline its partner counts on (see `rmw`).
    pub(crate) fn send_strict(&self, req: &Request) -> Option<Reply> {
        self.on_live(0..self.slots.len() - 1, |c| c.send_strict(req))
    }

    /// Queues a health check on the link's own connection for them (the last slot), where
    /// it does not wait behind the clients' requests: a worker working through a long queue
    /// still answers it (it yields between batches), and so is not taken for dead. Falls
    /// back to the data connections while that one is not connected.
    pub(crate) fn send_control(&self, req: &Request) -> Option<Reply> {
        let control = self.slots.len() - 1;
        self.on_live(std::iter::once(control).chain(0..control), |c| c.send(req))
    }

    /// `send` on the first live connection of `slots`, in that order.
    fn on_live(
        &self,
        slots: impl IntoIterator<Item = usize>,
        mut send: impl FnMut(&Connection) -> Reply,
    ) -> Option<Reply> {
        slots.into_iter().find_map(|i| {
            let slot = self.lock_slot(i);
            slot.as_ref().filter(|c| !c.is_closed()).map(&mut send)
        })
    }

    /// How long since the worker last answered anything on any live connection (a long
    /// time if it has none).
    pub(crate) fn silent_for(&self) -> Duration {
        (0..self.slots.len())
            .filter_map(|i| {
                let slot = self.lock_slot(i);
                slot.as_ref()
                    .filter(|c| !c.is_closed())
                    .map(Connection::silent_for)
            })
            .min()
            .unwrap_or(Duration::MAX)
    }

    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, state: WorkerState) -> WorkerState {
        let before = WorkerState::from_u8(self.state.swap(state as u8, Ordering::SeqCst));
        // A write it missed while this state was decided (its `missed_write` found the old
        // state, which it does not demote) is not forgotten: `dirty` is set before the
        // demotion is tried, so either that attempt sees this state or this check sees the
        // flag.
        if state == WorkerState::InSync && self.dirty.load(Ordering::SeqCst) {
            self.missed_write();
        }
        before
    }

    /// Logs, once until it is accepted again, that the worker refuses this orchestrator's
    /// credentials or certificate (or it the worker's): a configuration error worth saying
    /// plainly. `why` says what to fix.
    pub(crate) fn refusing(&self, why: &str) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::error!(worker = %self.addr, "{why}");
        }
    }

    pub(crate) fn accepted(&self) {
        self.refused.store(false, Ordering::Relaxed);
    }

    /// The cluster secret proved on connections to this worker.
    pub(crate) fn secret(&self) -> Option<&ClusterSecret> {
        self.secret.as_ref()
    }

    /// TLS on connections to this worker (`--tls-cluster`).
    pub(crate) fn tls(&self) -> Option<&Connector> {
        self.tls.as_ref()
    }

    /// Whether a refill may be asked of this worker now: they are paced, so a partner that
    /// answers health checks but cannot serve a snapshot is not asked every round.
    pub(crate) fn may_refill(&self) -> bool {
        let at = *self.retry_at.lock().unwrap_or_else(|e| e.into_inner());
        at.is_none_or(|at| tokio::time::Instant::now() >= at)
    }

    pub(crate) fn refill_started(&self) {
        *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(tokio::time::Instant::now() + crate::health::REFILL_RETRY);
    }

    /// Records that the worker missed a write: an in-sync or resyncing worker becomes
    /// stale (a resyncing one's snapshot may have passed the key already).
    pub(crate) fn missed_write(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        for from in [
            WorkerState::InSync,
            WorkerState::Resyncing,
            WorkerState::Joining,
        ] {
            if self
                .state
                .compare_exchange(
                    from as u8,
                    WorkerState::Stale as u8,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                tracing::warn!(worker = %self.addr, from = from.name(), to = "stale", "missed a write");
            }
        }
    }
}

/// Where requests come from: which connection slot to each worker keeps their order (a
/// client session's affinity), which account their large answers are charged to until
/// they are written (see `twincache_protocol::budget`), and the session's
/// read-modify-writes not yet answered (its later reads of those keys go to where they run).
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

/// Two workers holding the same data.
pub struct Pair {
    pub workers: [Arc<WorkerLink>; 2],
    /// Alternates reads between the partners to spread the load.
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

/// A write a worker is left out of (its partner's copy carries `SOLO`). The worker has
/// missed it, on record here at once: the partner's count of writes taken alone reaches the
/// monitor only with its next status, and a round that read that count before the write
/// must not find this worker in sync. The write also counts as in flight (see
/// [`WorkerLink::skipped`]) until it is answered or abandoned.
struct Skipping(Arc<WorkerLink>);

impl Skipping {
    fn new(link: Arc<WorkerLink>) -> Skipping {
        link.dirty.store(true, Ordering::SeqCst);
        link.skipped.fetch_add(1, Ordering::AcqRel);
        Skipping(link)
    }
}

impl Drop for Skipping {
    fn drop(&mut self) {
        self.0.skipped.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Worker counters the orchestrator reads but does not pass on to clients: a worker's key
/// fingerprint is for comparing partners ([`Router::check_keys`]), and would help a forged
/// partner pass a worker's key check.
const INTERNAL_STATS: &[&str] = &["key_fingerprint"];

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
        match reply?.await {
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
    /// first (alternating when both are; in adapter mode the one that takes the writes), a
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
                    pair.next_read.fetch_add(1, Ordering::Relaxed) & 1
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
    async fn finish_read(
        &self,
        link: &WorkerLink,
        req: &Request,
        reply: Option<Reply>,
    ) -> Option<Response> {
        let resp = self.finish(link, reply).await?;
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
        let again = req.clone();
        let first = self.read_once(req, origin);
        let (this, origin) = (self.clone(), origin.clone());
        async move {
            let resp = first.await;
            if resp.status != Status::Moved {
                return resp;
            }
            this.rerouted(resp, || Box::pin(this.read_once(again.clone(), &origin)))
                .await
        }
    }

    /// [`Router::read`] by the map now, once.
    fn read_once(
        self: &Arc<Self>,
        mut req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        let topo = self.topology.load_full();
        let route = topo.route(&req.key);
        if route.from.is_some() {
            req.flags |= flags::MOVING_SOURCE;
        }
        let Some(from) = route.from else {
            return Either::Left(self.read_in(topo, route.pair, req, origin));
        };
        let again = req.clone();
        let first = self.read_in(topo.clone(), route.pair, req, origin);
        let this = self.clone();
        let origin = origin.clone();
        Either::Right(Box::pin(async move {
            let resp = first.await;
            if resp.status != Status::NotFound {
                return resp;
            }
            this.read_in(topo, from, again, &origin).await
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
        self.read_in(self.topology.load_full(), pair, req, origin)
    }

    /// A read on pair `pair` of `topo`. A key the session has a read-modify-write in flight
    /// on is read where that runs (its primary), behind it, so the session reads its own
    /// write.
    fn read_in(
        self: &Arc<Self>,
        topo: Arc<Topology>,
        pair: usize,
        mut req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        let Some(p) = topo.get(pair) else {
            // An index from a topology that has since shrunk (a SCAN cursor, RANDOMKEY).
            return Either::Right(std::future::ready(Response::status(Status::Unavailable)));
        };
        let order = if self.mode().is_none() {
            [None, None]
        } else if origin.rmw.as_ref().is_some_and(|p| p.holds(&req.key)) {
            self.primaries(p)
        } else {
            self.read_order(p)
        };
        let reply = order[0].and_then(|i| self.send_read(p, i, &mut req, origin));
        let this = self.clone();
        let origin = order[1].map(|_| origin.clone());
        Either::Left(async move {
            let p = &topo[pair];
            if let Some(first) = order[0] {
                if let Some(resp) = this.finish_read(&p.workers[first], &req, reply).await {
                    return resp;
                }
            }
            if let (Some(second), Some(origin)) = (order[1], &origin) {
                RouterStats::count(&this.stats.failovers);
                let reply = this.send_read(p, second, &mut req, origin);
                if let Some(resp) = this.finish_read(&p.workers[second], &req, reply).await {
                    return resp;
                }
            }
            unavailable(&this)
        })
    }

    pub fn get(
        self: &Arc<Self>,
        key: Bytes,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        self.read(Request::new(Op::Get, key), origin)
    }

    /// Adapter mode: a plain SET goes to one worker of the pair, marked primary, which
    /// writes it through to the destination (one Redis write per client write); once the
    /// destination has it, the partner's cached copy is invalidated. If the primary cannot
    /// be reached, its partner takes the role.
    fn adapter_set(self: &Arc<Self>, mut req: Request, origin: &Origin) -> BoxedResponse {
        req.version = self.clock.next();
        req.flags |= flags::PRIMARY;
        let topo = self.topology.load_full();
        let pair = topo.pair_of(&req.key);
        let order = self.read_order(&topo[pair]);
        let workers = &topo[pair].workers;
        // Sent now, in the session's order (see WorkerLink); the partner only on failure.
        let reply = order[0].and_then(|i| workers[i].send(&req, origin));
        let this = self.clone();
        let origin = origin.clone();
        Box::pin(async move {
            let workers = &topo[pair].workers;
            let mut reply = Some(reply);
            for i in order.into_iter().flatten() {
                let sent = reply.take().unwrap_or_else(|| {
                    RouterStats::count(&this.stats.failovers);
                    workers[i].send(&req, &origin)
                });
                if let Some(resp) = this.finish(&workers[i], sent).await {
                    if resp.status == Status::Ok
                        && !this.invalidate_on(&workers[1 - i], &req.key).await
                        && !this.record_miss(&workers[i], &workers[1 - i]).await
                    {
                        return Response::error(Status::Unavailable, MISS_UNRECORDED);
                    }
                    return resp;
                }
            }
            unavailable(&this)
        })
    }

    /// Drops `key` from one worker's cache (a short-lived tombstone with a fresh version, so
    /// no cache fill in flight can put an older value back); false if the worker did not.
    async fn invalidate_on(&self, w: &WorkerLink, key: &Bytes) -> bool {
        if matches!(w.state(), WorkerState::Down | WorkerState::Misconfigured) {
            // It gets nothing; it resyncs before it serves again.
            return false;
        }
        let mut req = Request::new(Op::Invalidate, key.clone());
        req.version = self.clock.next();
        let reply = w.send(&req, &Origin::INTERNAL);
        self.finish(w, reply).await.is_some()
    }

    /// Records that `missed` lacks a write `holder` took: on the orchestrator (the worker
    /// becomes stale) and on `holder` (its count of writes taken alone), so that any
    /// orchestrator, even one started later, knows. Returns whether `holder` recorded it;
    /// a write whose miss is not recorded anywhere durable must not be acknowledged.
    async fn record_miss(&self, holder: &WorkerLink, missed: &WorkerLink) -> bool {
        missed.missed_write();
        self.ask(holder, Op::PartnerMissed, "").await.is_some()
    }

    /// Adapter mode: runs a Redis command on the destination through a worker of the pair
    /// of its first key, then invalidates every key it may touch (`touched`, from the
    /// command table: see `commands::adapter`) on both partners. The response's payload is
    /// the destination's RESP reply, as is.
    pub fn passthrough(
        self: &Arc<Self>,
        args: Vec<Bytes>,
        touched: Vec<Bytes>,
        origin: &Origin,
    ) -> BoxedResponse {
        let mut encoded = BytesMut::new();
        twincache_protocol::resp::encode_command(&args, &mut encoded);
        // Routed by its first key, which the worker drops from its cache under the key's order.
        let route = touched.first().or(args.get(1)).cloned().unwrap_or_default();
        let mut req = Request::new(Op::Passthrough, route);
        req.value = encoded.freeze();
        // The version the worker invalidates its cached copy of the first key with.
        req.version = self.clock.next();
        let read = self.read(req, origin);
        let this = self.clone();
        Box::pin(async move {
            let resp = read.await;
            let topo = this.topology.load_full();
            for key in touched {
                let pair = &topo[topo.pair_of(&key)];
                let [a, b] = &pair.workers;
                let (ia, ib) =
                    tokio::join!(this.invalidate_on(a, &key), this.invalidate_on(b, &key));
                // A copy left behind on one side is stale: that worker resyncs first.
                match (ia, ib) {
                    (true, false) => b.missed_write(),
                    (false, true) => a.missed_write(),
                    _ => {}
                }
            }
            resp
        })
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
            return Either::Right(match req.op {
                Op::Set if req.flags == 0 => self.adapter_set(req, origin),
                Op::Del => {
                    let key = req.key.clone();
                    let del = self.passthrough(
                        vec![Bytes::from_static(b"DEL"), req.key],
                        vec![key],
                        origin,
                    );
                    // The text and binary protocols answer a DEL with found / not found.
                    Box::pin(async move {
                        let resp = del.await;
                        match (resp.status, &resp.payload[..]) {
                            (Status::Ok, b":0\r\n") => Response::status(Status::NotFound),
                            (Status::Ok, _) => Response::ok(Bytes::new()),
                            _ => resp,
                        }
                    })
                }
                _ => Box::pin(async {
                    Response::error(Status::InvalidCommand, "not supported in adapter mode")
                }),
            });
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
        let again = req.clone();
        let first = self.write_once(req, origin);
        let (this, origin) = (self.clone(), origin.clone());
        async move {
            let resp = first.await;
            if resp.status != Status::Moved {
                return resp;
            }
            // Routed again with the same version: a later write of the session that was
            // routed by the new map already is newer, and wins.
            this.rerouted(resp, || Box::pin(this.write_once(again.clone(), &origin)))
                .await
        }
    }

    /// A stamped write routed by the map now, once.
    fn write_once(
        self: &Arc<Self>,
        req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        let topo = self.topology.load_full();
        let route = topo.route(&req.key);
        match route.from {
            // A delete of a key being moved goes to the pair it comes from too: a read that
            // misses on the new pair looks there, and the copy must not bring it back (the
            // new pair's tombstone is newer than the copy).
            Some(from) if req.op == Op::Del => {
                let mut to_old = req.clone();
                to_old.flags |= flags::MOVING_SOURCE;
                let old = self.write_in(topo.clone(), from, to_old, origin);
                let new = self.write_in(topo, route.pair, req, origin);
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
            _ => Either::Left(self.write_in(topo, route.pair, req, origin)),
        }
    }

    /// A write, stamped, to pair `pair` of `topo`.
    fn write_in(
        self: &Arc<Self>,
        topo: Arc<Topology>,
        pair: usize,
        mut req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Response> + Send + 'static {
        let targets = self.write_targets(&topo[pair]);
        if targets[0] != targets[1] {
            // Its partner will not get it: counted on the worker, which outlives us.
            req.flags |= flags::SOLO;
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
        let this = self.clone();
        async move {
            let _skipping = skipping;
            let [a, b] = &topo[pair].workers;
            let [ra, rb] = replies;
            let (ra, rb) = tokio::join!(
                async {
                    match ra {
                        Some(r) => Some(this.finish(a, r).await),
                        None => None,
                    }
                },
                async {
                    match rb {
                        Some(r) => Some(this.finish(b, r).await),
                        None => None,
                    }
                },
            );
            match (ra, rb) {
                // Routed by an older map: not acknowledged, whoever else took it (routed
                // again, it lands where the slot is now, with the same version).
                (Some(Some(r)), _) | (_, Some(Some(r))) if r.status == Status::Moved => r,
                (Some(Some(ra)), Some(Some(rb))) => {
                    // Prefer success; of two other answers either is as informative.
                    if rb.status == Status::Ok {
                        rb
                    } else {
                        ra
                    }
                }
                // One of two took it: the other missed it, which must be on record before
                // the write is acknowledged.
                (Some(Some(r)), Some(None)) => this.acknowledge_one(a, b, r).await,
                (Some(None), Some(Some(r))) => this.acknowledge_one(b, a, r).await,
                // The only target: it counted the write as taken alone (`SOLO`).
                (Some(Some(r)), None) | (None, Some(Some(r))) => r,
                (Some(None), None) => {
                    a.missed_write();
                    unwritable(&this)
                }
                (None, Some(None)) => {
                    b.missed_write();
                    unwritable(&this)
                }
                (Some(None), Some(None)) => {
                    a.missed_write();
                    b.missed_write();
                    unwritable(&this)
                }
                (None, None) => unwritable(&this),
            }
        }
    }

    /// `holder` answered a write `missed` did not take: acknowledges it once the miss is on
    /// record (see [`Router::record_miss`]).
    async fn acknowledge_one(
        &self,
        holder: &WorkerLink,
        missed: &WorkerLink,
        resp: Response,
    ) -> Response {
        if self.record_miss(holder, missed).await {
            RouterStats::count(&self.stats.partial_writes);
            resp
        } else {
            Response::error(Status::Unavailable, MISS_UNRECORDED)
        }
    }

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
    async fn worker_stats(&self, w: &WorkerLink) -> Option<String> {
        let resp = self.ask(w, Op::Stats, "").await?;
        Some(String::from_utf8_lossy(&resp.payload).into_owned())
    }

    /// Sends one worker a control request (`op`, with `value`) and returns its answer if it
    /// was `Ok`.
    pub(crate) async fn ask(&self, w: &WorkerLink, op: Op, value: &str) -> Option<Response> {
        let mut req = Request::new(op, Bytes::new());
        req.value = Bytes::copy_from_slice(value.as_bytes());
        let reply = w.send(&req, &Origin::INTERNAL);
        self.finish(w, reply)
            .await
            .filter(|r| r.status == Status::Ok)
    }
}
