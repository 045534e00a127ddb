//! Links to the workers: each worker's persistent connections (reconnecting with backoff,
//! pinged when idle), its state with its pair as the health monitor and the writes it missed
//! set it, and the marks a write leaves on a worker it skips. Routing decides where a request
//! goes (`cluster`); this module only carries it there.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use twincache_client::{Connection, Reply};
use twincache_protocol::auth::ClusterSecret;
use twincache_protocol::frame::{Op, Request};
use twincache_tls::Connector;

use super::{Origin, RouterConfig};

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
    /// The worker said, in its last status, that it takes batches of writes (`Op::Batch`);
    /// until then, and after it reconnects until it says so again, its writes go one frame
    /// each (a worker from before batches would refuse one).
    pub(crate) takes_batches: AtomicBool,
    /// The worker said, in its last status, that it gives and checks the bases of a
    /// program's changes (`flags::BASES`); as for batches, forgotten when it reconnects.
    takes_bases: AtomicBool,
    /// The router's count of backed-up worker connections, which this link's take part in.
    backlog: Arc<AtomicUsize>,
    /// Cancelled when the worker leaves the cluster (replaced, or its pair removed): its
    /// connections close once the requests in flight are answered.
    stop: CancellationToken,
    /// Tests: answers for the worker instead of a connection (`None`: not connected), so
    /// routing and failover are tested without processes (see `cluster::tests`).
    #[cfg(test)]
    pub(super) fake: Option<Fake>,
}

/// A stand-in worker's answer to each request (`None`: it is not reachable).
#[cfg(test)]
pub(super) type Fake = Arc<dyn Fn(&Request) -> Option<twincache_protocol::Response> + Send + Sync>;

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
    pub(super) fn takes_writes(self) -> bool {
        matches!(
            self,
            WorkerState::InSync
                | WorkerState::Resyncing
                | WorkerState::Joining
                | WorkerState::Unknown
        )
    }
}

impl WorkerLink {
    pub(super) fn spawn(
        addr: String,
        config: &RouterConfig,
        shutdown: &CancellationToken,
    ) -> Arc<WorkerLink> {
        // The data slots, and one more for health checks (see `send_control`).
        let connections = config.connections_per_worker + 1;
        let link = Arc::new(WorkerLink::new(
            addr,
            connections,
            config.secret.clone(),
            config.tls.clone(),
            config.backlog.clone(),
            shutdown.child_token(),
        ));
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

    /// A link whose worker is `fake` (tests): no connection is made.
    #[cfg(test)]
    pub(super) fn fake(addr: &str, fake: Fake) -> Arc<WorkerLink> {
        let link = WorkerLink::new(
            addr.to_string(),
            2,
            None,
            None,
            Arc::default(),
            CancellationToken::new(),
        );
        link.set_state(WorkerState::InSync);
        Arc::new(WorkerLink {
            fake: Some(fake),
            ..link
        })
    }

    /// A link with `connections` slots, none connected yet, its worker not assessed.
    fn new(
        addr: String,
        connections: usize,
        secret: Option<ClusterSecret>,
        tls: Option<Connector>,
        backlog: Arc<AtomicUsize>,
        stop: CancellationToken,
    ) -> WorkerLink {
        WorkerLink {
            addr,
            slots: (0..connections).map(|_| Mutex::new(None)).collect(),
            state: AtomicU8::new(WorkerState::Unknown as u8),
            dirty: AtomicBool::new(false),
            boot: Mutex::new(None),
            resync_base: AtomicU64::new(0),
            retry_at: Mutex::new(None),
            secret,
            tls,
            refused: AtomicBool::new(false),
            skipped: AtomicU64::new(0),
            synced_at: AtomicU64::new(0),
            partial: AtomicBool::new(false),
            swept: Mutex::new(None),
            takes_batches: AtomicBool::new(false),
            takes_bases: AtomicBool::new(false),
            backlog,
            stop,
            #[cfg(test)]
            fake: None,
        }
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
                    conn.report_backlog(self.backlog.clone());
                    *self.lock_slot(slot) = Some(conn.clone());
                    self.takes_batches.store(false, Ordering::Relaxed);
                    self.takes_bases.store(false, Ordering::Relaxed);
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
        #[cfg(test)]
        if let Some(fake) = &self.fake {
            return fake(req).map(|r| Reply::ready(Ok(r)));
        }
        let n = self.slots.len() - 1;
        self.on_live((0..n).map(|i| (origin.affinity + i) % n), |c| {
            c.send_charged(req, origin.account.as_ref())
        })
    }

    /// [`WorkerLink::send`] for a request that fails after one `--worker-timeout` even
    /// while the worker answers others (`Connection::send_strict`): a read-modify-write's
    /// copy, whose deadline its partner counts on (see `rmw`).
    pub(crate) fn send_strict(&self, req: &Request) -> Option<Reply> {
        #[cfg(test)]
        if let Some(fake) = &self.fake {
            return fake(req).map(|r| Reply::ready(Ok(r)));
        }
        self.on_live(0..self.slots.len() - 1, |c| c.send_strict(req))
    }

    /// Queues a health check on the link's own connection for them (the last slot), where
    /// it does not wait behind the clients' requests: a worker working through a long queue
    /// still answers it (it yields between batches), and so is not taken for dead. Falls
    /// back to the data connections while that one is not connected.
    pub(crate) fn send_control(&self, req: &Request) -> Option<Reply> {
        #[cfg(test)]
        if let Some(fake) = &self.fake {
            return fake(req).map(|r| Reply::ready(Ok(r)));
        }
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

    /// Whether the worker gives and checks the bases of a program's changes, as its last
    /// status said since this link (re)connected.
    pub(crate) fn takes_bases(&self) -> bool {
        self.takes_bases.load(Ordering::Relaxed)
    }

    /// Records what the worker's status says of bases.
    pub(crate) fn set_takes_bases(&self, takes: bool) {
        self.takes_bases.store(takes, Ordering::Relaxed);
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

/// A write a worker is left out of (its partner's copy carries `SOLO`). The worker has
/// missed it, on record here at once: the partner's count of writes taken alone reaches the
/// monitor only with its next status, and a round that read that count before the write
/// must not find this worker in sync. The write also counts as in flight (see
/// [`WorkerLink::skipped`]) until it is answered or abandoned.
pub(super) struct Skipping(Arc<WorkerLink>);

impl Skipping {
    pub(super) fn new(link: Arc<WorkerLink>) -> Skipping {
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
