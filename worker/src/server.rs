//! Serving frames over TCP.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use twincache_protocol::auth::{self, ClusterSecret};
use twincache_protocol::budget::{Account, Budget};
use twincache_protocol::frame::{
    encode_frame, encode_response, flags, frames, FrameCodec, FrameError, Op, Request, Response,
    BATCH_BYTES, PREAMBLE,
};
use twincache_protocol::info::Info;
use twincache_protocol::outgoing::LARGE;
use twincache_protocol::server::{accept_loop, Slot, Slots, Throttle};
use twincache_protocol::slots::SlotRange;
use twincache_protocol::Status;
use twincache_tls::{Accepted, NodeTls};

use crate::adapter::{Adapter, INVALIDATION_TTL_MS};
use crate::config::Config;
use crate::exec;
use crate::map::MapState;
use crate::store::{Kind, SetOptions, Store, StoreError, Value};
use crate::sync::{serve_snapshot, Refill, SyncState};
use crate::wipe;
use twincache_protocol::program::{self, ScanRequest};

/// Stop reading more requests once this many response bytes wait to be written.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Answers leave at least this often while a batch of requests is being worked through,
/// and the connection then lets others run: a queue of heavy requests (each rewriting a big
/// hash, say) keeps answering steadily, which the orchestrator reads as busy rather than
/// dead, and the health checks on other connections are answered meanwhile.
const STEADY: std::time::Duration = std::time::Duration::from_millis(10);

/// A bound, not yet running, worker.
pub struct Worker {
    listener: TcpListener,
    /// `--http`, bound.
    http: Option<TcpListener>,
    config: Config,
    node: Arc<Node>,
}

/// What every connection of a worker shares.
pub struct Node {
    pub store: Arc<Store>,
    pub sync: Arc<SyncState>,
    /// Largest frame accepted, and used for the resync connection too.
    pub max_frame: usize,
    /// Bytes per second a snapshot is served at; 0 for no limit.
    pub resync_rate_limit: u64,
    /// Adapter mode: the source and destination Redis.
    pub adapter: Option<Arc<Adapter>>,
    /// Memory for connection buffers, for the whole process.
    pub budget: Arc<Budget>,
    /// Connections with nothing to do for this long are closed.
    pub idle_timeout: Duration,
    /// The cluster secret: every connection proves it first (see `twincache_protocol::auth`).
    pub secret: Option<ClusterSecret>,
    /// TLS on this worker's port and its resync connections (`--tls-cluster`).
    pub tls: Option<Arc<NodeTls>>,
    /// Connections open now (for `stats` and the metrics).
    pub connections: std::sync::atomic::AtomicU64,
    /// When the worker started.
    pub started: std::time::Instant,
    /// The cluster map this worker keeps, and what its pair may serve under it (see `map`).
    pub map: MapState,
}

#[cfg(test)]
impl Node {
    /// A node with a default store and no network settings, for tests that call `handle`.
    pub(crate) fn for_tests(adapter: Option<Adapter>) -> Node {
        Node {
            store: Arc::new(Store::default()),
            sync: Arc::new(SyncState::default()),
            max_frame: 1 << 20,
            resync_rate_limit: 0,
            adapter: adapter.map(Arc::new),
            budget: Budget::new(1 << 20),
            idle_timeout: Duration::from_secs(60),
            secret: None,
            tls: None,
            connections: Default::default(),
            started: std::time::Instant::now(),
            map: MapState::default(),
        }
    }
}

/// A request answered at once, or one that waits on Redis (adapter mode).
enum Handled {
    Now(Response),
    Later(Pin<Box<dyn Future<Output = Response> + Send>>),
}

impl Worker {
    /// Loads the encryption key, if any, and binds the listening socket (so the caller
    /// learns the port before serving starts).
    pub async fn bind(config: Config) -> std::io::Result<Worker> {
        let cipher = config
            .cipher()
            .map_err(|msg| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))?;
        let listener = TcpListener::bind((config.bind, config.port)).await?;
        let max_memory = config.max_memory_bytes();
        match (config.max_memory, max_memory) {
            (Some(_), _) => tracing::info!(max_memory, "memory limit for entries (--max-memory)"),
            (None, 0) => tracing::warn!(
                "cannot tell how much memory this process may use: no memory limit for \
                 entries; give --max-memory"
            ),
            (None, _) => tracing::info!(
                max_memory,
                "memory limit for entries: a quarter of the memory this process may use \
                 (--max-memory sets it)"
            ),
        }
        if config.dictionary_bytes() == 0 && config.dictionary_size > 0 {
            tracing::info!(
                "no compression dictionary with encryption: values are compressed one by one \
                 (--dictionary-with-encryption keeps it, at the cost README describes)"
            );
        }
        let store = Arc::new(
            Store::new(cipher, max_memory as usize)
                .with_dictionary_size(config.dictionary_bytes())
                .with_tombstone_ttl(config.tombstone_ttl),
        );
        let node = Arc::new(Node {
            store,
            sync: Arc::new(SyncState::default()),
            max_frame: config.max_frame as usize,
            resync_rate_limit: config.resync_rate_limit,
            adapter: config
                .adapter()
                .map_err(|msg| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))?
                .map(Arc::new),
            budget: Budget::new(config.buffer_budget() as usize),
            idle_timeout: config.idle_timeout,
            secret: config
                .cluster_secret()
                .map_err(|msg| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))?,
            tls: config
                .tls()
                .map_err(|msg| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))?,
            connections: Default::default(),
            started: std::time::Instant::now(),
            map: MapState::default(),
        });
        let http = twincache_ops::http::bind(config.http).await?;
        Ok(Worker {
            listener,
            http,
            config,
            node,
        })
    }

    /// Where `--http` listens, if given.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Its TLS, for reloading the certificates (`NodeTls::reload_on` the SIGHUP channel).
    pub fn tls(&self) -> Option<Arc<NodeTls>> {
        self.node.tls.clone()
    }

    /// The worker's store (for embedding and tests).
    pub fn store(&self) -> Arc<Store> {
        self.node.store.clone()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let node = self.node;
        tokio::spawn(
            node.store
                .clone()
                .sweep_forever(std::time::Duration::from_millis(100), shutdown.clone()),
        );
        if let Some(listener) = self.http {
            let limits = twincache_ops::http::HttpLimits {
                grace: self.config.shutdown_grace,
                ..Default::default()
            };
            tokio::spawn(twincache_ops::http::serve(
                listener,
                crate::http::app(node.clone()),
                limits,
                shutdown.clone(),
            ));
        }
        // Peers that must authenticate wait in an allowance of their own until they have.
        let slots = match node.secret {
            Some(_) => Slots::with_pending(
                self.config.max_connections,
                self.config.max_pending_connections,
            ),
            None => Slots::new(self.config.max_connections),
        };
        accept_loop(
            self.listener,
            slots,
            shutdown,
            self.config.shutdown_grace,
            move |stream, slot, shutdown| {
                let node = node.clone();
                async move {
                    // Counted down however the connection ends, including when its task is
                    // dropped (a pending connection closed to make room, see `Slots`).
                    let _counted = Counted::new(&node.connections);
                    if let Err(e) = serve_connection(stream, slot, node.clone(), shutdown).await {
                        tracing::debug!(error = %e, "worker connection ended");
                    }
                }
            },
        )
        .await;
    }
}

/// Refusals of connections that never authenticated (a bad preamble, TLS or secret): logged
/// once a second at most, with a count, so an outsider's flood is not a flood of lines.
static REFUSED: std::sync::LazyLock<Throttle> = std::sync::LazyLock::new(Throttle::default);

/// One open connection in a count, for as long as it lives.
struct Counted<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Counted<'a> {
    fn new(count: &'a std::sync::atomic::AtomicU64) -> Counted<'a> {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A peer sends its 4-byte preamble at once; one that stops midway is not one.
const PREAMBLE_DEADLINE: Duration = Duration::from_secs(10);
/// Adapter-mode requests of one connection waiting on Redis at once; past it the
/// connection reads nothing more until some answer.
const MAX_WAITING: usize = 4096;
/// A read buffer grown past this by a large frame is given back once empty.
const KEEP_CAPACITY: usize = 256 * 1024;

async fn serve_connection(
    stream: TcpStream,
    slot: Slot,
    node: Arc<Node>,
    shutdown: CancellationToken,
) -> Result<(), FrameError> {
    // The TLS handshake, the preamble and the cluster handshake share one short deadline.
    let deadline = tokio::time::Instant::now() + PREAMBLE_DEADLINE.min(node.idle_timeout);
    let Some(tls) = node.tls.clone() else {
        return serve_stream(stream, slot, node, deadline, shutdown).await;
    };
    let accepted = tokio::select! {
        accepted = tls.accept_by(stream, deadline) => accepted,
        _ = shutdown.cancelled() => return Ok(()),
    };
    match accepted {
        Accepted::Tls(session) => serve_stream(*session, slot, node, deadline, shutdown).await,
        Accepted::Plaintext(mut plain) => {
            if let Some(held) = REFUSED.allow() {
                tracing::warn!(
                    refused = held + 1,
                    "refused a plaintext connection: this worker speaks TLS only \
                     (--tls-cluster); give the orchestrators and its partner --tls-cluster too"
                );
            }
            let mut out = BytesMut::new();
            let why = "this worker speaks TLS only: connect with --tls-cluster";
            encode_frame(&Response::error(Status::NoAuth, why), &mut out);
            let _ = plain.write_all(&out).await;
            Ok(())
        }
        Accepted::Failed(e) => {
            if let Some(held) = REFUSED.allow() {
                tracing::warn!(error = %e, refused = held + 1, "refused a connection whose TLS handshake failed");
            }
            Ok(())
        }
        Accepted::TimedOut => Ok(()),
    }
}

/// Serves one connection, plain or inside TLS (a copy of the loop for each).
async fn serve_stream<S>(
    mut stream: S,
    mut slot: Slot,
    node: Arc<Node>,
    deadline: tokio::time::Instant,
    shutdown: CancellationToken,
) -> Result<(), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut preamble = [0u8; 4];
    // The preamble, and the handshake with a secret, by the opening's deadline.
    let opening = async {
        stream.read_exact(&mut preamble).await?;
        if preamble != PREAMBLE {
            return Ok::<_, FrameError>(false);
        }
        if let Some(secret) = &node.secret {
            if let Err(e) = auth::accept(&mut stream, secret).await {
                if let Some(held) = REFUSED.allow() {
                    tracing::warn!(error = %e, refused = held + 1, "refused a connection that did not authenticate");
                }
                return Ok(false);
            }
            if !slot.promote() {
                tracing::warn!("connection limit reached; closing an authenticated connection");
                return Ok(false);
            }
        }
        Ok(true)
    };
    let opened = tokio::select! {
        res = tokio::time::timeout_at(deadline, opening) => match res {
            Ok(res) => res?,
            Err(_) => return Ok(()), // a partial opening, then silence
        },
        _ = shutdown.cancelled() => return Ok(()),
    };
    if !opened && preamble == PREAMBLE {
        return Ok(()); // refused by the handshake, already answered
    }
    if preamble != PREAMBLE {
        let mut out = BytesMut::new();
        encode_frame(
            &Response::error(
                Status::ParseError,
                "bad preamble: expected twincache binary protocol v1",
            ),
            &mut out,
        );
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
        return Err(FrameError::Malformed("bad preamble"));
    }
    let account = Account::new(&node.budget, node.max_frame.saturating_add(OUT_HIGH_WATER));
    let mut held = 0;
    let idle_timeout = node.idle_timeout;
    let mut codec = FrameCodec::<Request>::new(node.max_frame);
    // With a key, nothing that held a value's plaintext outlives its request (crate::wipe).
    let wipe = node.store.cipher().is_some();
    let mut buf = wipe::Buffer::new(64 * 1024, wipe);
    let mut out = wipe::Replies::new(64 * 1024, wipe);
    // Adapter-mode requests waiting on Redis; they answer out of order, by id.
    let mut waiting = FuturesUnordered::new();
    let mut reading = true;
    let mut last_active = tokio::time::Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let mut turns = 0u32;
    loop {
        // A peer whose requests never run dry keeps the select's later branches from being
        // polled (a spent cooperative budget makes `select!` pend before it polls any), so
        // shutdown is also looked at every 64 turns; such a peer is not idle.
        turns = turns.wrapping_add(1);
        if turns.is_multiple_of(64) && shutdown.is_cancelled() {
            return Ok(());
        }
        tokio::select! {
            // Requests waiting on Redis first: each registers for its key's order before any
            // later request is read, so requests on one key keep their arrival order.
            biased;
            Some(resp) = waiting.next(), if !waiting.is_empty() => {
                out.encode(&resp);
                while let Some(Some(resp)) = waiting.next().now_or_never() {
                    out.encode(&resp);
                }
            }
            n = stream.read_buf(&mut *buf), if reading && waiting.len() < MAX_WAITING => {
                if n? == 0 {
                    reading = false;
                }
                last_active = tokio::time::Instant::now();
                let mut flushed = last_active;
                // The clock is read every 16 requests: cheap ones need no check at all.
                let mut since_check = 0u8;
                loop {
                    match wipe::next_request(&mut codec, &mut buf, node.max_frame, wipe) {
                        Ok(Some(req)) if req.op == Op::Snapshot => {
                            // A stream of frames, not one answer: send what is pending first.
                            write_out(&mut stream, &mut out, idle_timeout).await?;
                            match crate::sync::parse_snapshot_request(&req.value) {
                                Ok((slots, rate)) => {
                                    // The stricter of this worker's limit and the asker's.
                                    let rate = match (node.resync_rate_limit, rate) {
                                        (0, r) | (r, 0) => r,
                                        (a, b) => a.min(b),
                                    };
                                    serve_snapshot(&mut stream, &node.store, &node.sync, req.id, rate, slots).await?;
                                }
                                Err(e) => {
                                    out.encode(&Response { id: req.id, status: Status::ParseError, payload: Bytes::from(e) });
                                    write_out(&mut stream, &mut out, idle_timeout).await?;
                                }
                            }
                        }
                        Ok(Some(req)) => {
                            let id = req.id;
                            if req.op == Op::Get && node.adapter.is_none() {
                                answer_get(&node, req, &mut out);
                            } else {
                                match dispatch(&node, req) {
                                    Handled::Now(resp) => out.encode(&resp.with_id(id)),
                                    Handled::Later(fut) => waiting.push(async move { fut.await.with_id(id) }),
                                }
                            }
                            since_check = since_check.wrapping_add(1);
                            if out.len() >= OUT_HIGH_WATER {
                                write_out(&mut stream, &mut out, idle_timeout).await?;
                            } else if since_check.is_multiple_of(16) && flushed.elapsed() >= STEADY {
                                write_out(&mut stream, &mut out, idle_timeout).await?;
                                tokio::task::yield_now().await;
                                flushed = tokio::time::Instant::now();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let status = match e {
                                FrameError::TooLong { .. } => Status::TooLarge,
                                _ => Status::ParseError,
                            };
                            out.encode(&Response::status(status));
                            let _ = write_out(&mut stream, &mut out, idle_timeout).await;
                            return Err(e);
                        }
                    }
                }
                if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
                    buf.renew(64 * 1024);
                }
                // Bytes buffered: a frame's reserved length is memory only as it arrives.
                account.track(&mut held, buf.len());
                if let Some(over) = account.over() {
                    tracing::info!("closing connection: {over}");
                    return Ok(());
                }
            }
            _ = &mut idle, if waiting.is_empty() => {
                let deadline = last_active + idle_timeout;
                if deadline <= tokio::time::Instant::now() {
                    tracing::debug!("closing idle connection");
                    return Ok(());
                }
                idle.as_mut().reset(deadline);
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
        if !out.is_empty() {
            write_out(&mut stream, &mut out, idle_timeout).await?;
        }
        if !reading && waiting.is_empty() {
            return Ok(());
        }
    }
}

/// Writes and clears (wipes, with a key) `out`; a peer that reads none of it for `deadline`
/// is given up on. The flush is a no-op on TCP; a TLS session sends what it still holds.
async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut wipe::Replies,
    deadline: Duration,
) -> Result<(), FrameError> {
    let write = async {
        out.write_to(stream).await?;
        stream.flush().await
    };
    match tokio::time::timeout(deadline, write).await {
        Ok(res) => res?,
        Err(_) => {
            return Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer stopped reading",
            )))
        }
    }
    Ok(())
}

/// The refusal of a request that needs this worker in sync, from a worker restarted since
/// the orchestrator last looked: an empty store is not the pair's.
fn unsynced(node: &Node, req: &Request) -> Option<Response> {
    (req.flags & flags::IN_SYNC != 0 && !node.sync.synced())
        .then(|| Response::error(Status::Unavailable, "this worker has not resynced yet"))
}

/// A GET's answer from the store: `found` of the value where it lies (lent from the entry
/// when stored raw, see `Store::read`), else the response for a miss, a hash (WRONGTYPE)
/// or a value that does not open. The one place GET's answers are decided, for `serve` and
/// for the connection loop, which writes them straight from the store ([`answer_get`]).
fn get_with<R>(
    store: &Store,
    key: &[u8],
    mut found: impl FnMut(Value<'_>) -> R,
) -> Result<R, Response> {
    let read = store.read(key, false, |value| match value {
        Some((_, Kind::Hash)) => Err(Response::status(Status::WrongType)),
        Some((value, _)) => Ok(found(value)),
        None => Err(Response::status(Status::NotFound)),
    });
    read.unwrap_or_else(|e| Err(corrupt(e)))
}

/// A GET outside adapter mode, answered into `out`: a short value stored raw is written
/// from its entry, with no copy of it made first; anything else as `dispatch` answers it.
fn answer_get(node: &Node, req: Request, out: &mut wipe::Replies) {
    let id = req.id;
    let refused = node.map.refuse(&req).or_else(|| unsynced(node, &req));
    let answer = match refused {
        Some(refused) => Err(refused),
        None => get_with(&node.store, &req.key, |value| match value {
            Value::Lent(value) if value.len() < LARGE => {
                out.encode_response(id, Status::Ok, value);
            }
            value => out.encode(&Response::ok(value.into_bytes()).with_id(id)),
        }),
    };
    if let Err(other) = answer {
        out.encode(&other.with_id(id));
    }
}

/// Adapter-mode GET holding the key's order: from the cache, or (still holding it) from
/// the destination or source.
fn adapter_get(
    adapter: Arc<Adapter>,
    store: Arc<Store>,
    key: Bytes,
    in_order: tokio::sync::OwnedMutexGuard<()>,
) -> Handled {
    match store.get(&key) {
        Ok(Some(value)) => {
            adapter
                .counters
                .cache_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Handled::Now(Response::ok(value))
        }
        Ok(None) => Handled::Later(Box::pin(async move {
            let _in_order = in_order;
            match adapter.get_miss(&store, &key).await {
                Ok(Some(value)) => Response::ok(value),
                Ok(None) => Response::status(Status::NotFound),
                Err(e) => Response {
                    id: 0,
                    status: Status::Unavailable,
                    payload: Bytes::from(e),
                },
            }
        })),
        Err(e) => Handled::Now(corrupt(e)),
    }
}

/// Answers from the cache where it can; in adapter mode, what needs Redis answers later.
fn dispatch(node: &Arc<Node>, req: Request) -> Handled {
    // Before the adapter's ops, which never reach `serve`.
    if let Some(moved) = node.map.refuse(&req) {
        return Handled::Now(moved);
    }
    let Some(adapter) = node.adapter.clone() else {
        return Handled::Now(serve(node, req));
    };
    let store = node.store.clone();
    let failed = |e: String| Response {
        id: 0,
        status: Status::Unavailable,
        payload: Bytes::from(e),
    };
    match req.op {
        // Reads take the key's order too: at once if free, else queued behind the writes
        // that arrived before them (see the connection loop's `biased` select).
        Op::Get => {
            let stripe = adapter.stripe(&req.key);
            match stripe.clone().try_lock_owned() {
                Ok(in_order) => adapter_get(adapter, store, req.key, in_order),
                Err(_) => Handled::Later(Box::pin(async move {
                    let in_order = stripe.lock_owned().await;
                    match adapter_get(adapter, store, req.key, in_order) {
                        Handled::Now(resp) => resp,
                        Handled::Later(fut) => fut.await,
                    }
                })),
            }
        }
        Op::Set if req.flags & flags::PRIMARY != 0 => {
            // Take the key's order now, on arrival, so later requests on the key wait for it.
            let stripe = adapter.stripe(&req.key);
            let taken = stripe.clone().try_lock_owned().ok();
            Handled::Later(Box::pin(async move {
                let in_order = match taken {
                    Some(guard) => guard,
                    None => stripe.lock_owned().await,
                };
                match adapter
                    .set(
                        &store,
                        &req.key,
                        &req.value,
                        req.version,
                        req.ttl_ms,
                        in_order,
                    )
                    .await
                {
                    Ok(()) => Response::ok(Bytes::new()),
                    Err(e) => failed(e),
                }
            }))
        }
        Op::Passthrough => {
            // In the key's order, like a write, and the key leaves this cache before the
            // order is released, so a read queued behind it asks the destination.
            let stripe = adapter.stripe(&req.key);
            let taken = stripe.clone().try_lock_owned().ok();
            Handled::Later(Box::pin(async move {
                let _in_order = match taken {
                    Some(guard) => guard,
                    None => stripe.lock_owned().await,
                };
                let result = adapter.passthrough(&req.value).await;
                if !req.key.is_empty() {
                    store.del_for(&req.key, req.version, INVALIDATION_TTL_MS);
                }
                match result {
                    Ok(reply) => Response::ok(reply),
                    Err(e) => failed(e),
                }
            }))
        }
        Op::Invalidate => {
            store.del_for(&req.key, req.version, INVALIDATION_TTL_MS);
            Handled::Now(Response::ok(Bytes::new()))
        }
        _ => Handled::Now(serve(node, req)),
    }
}

/// Answers one request from the store, refusing one for a slot this worker's pair does not
/// hold (see `map`).
pub fn handle(node: &Node, req: Request) -> Response {
    match node.map.refuse(&req) {
        Some(moved) => moved,
        None => serve(node, req),
    }
}

/// [`handle`] once the request's key is admitted (programs and replicated changes check
/// theirs as they decode them).
fn serve(node: &Node, req: Request) -> Response {
    let store = &node.store;
    // Empty keys are valid here (Redis allows them); the text and binary front ends refuse
    // them, RESP passes them through.
    let alone = req.flags & flags::SOLO != 0;
    if let Some(refused) = unsynced(node, &req) {
        return refused;
    }
    match req.op {
        Op::Get => get_with(store, &req.key, |value| Response::ok(value.into_bytes()))
            .unwrap_or_else(|other| other),
        Op::Apply => exec::run(store, &node.sync, &req, true, node.map.holding().as_deref()),
        Op::Query => exec::run(
            store,
            &node.sync,
            &req,
            false,
            node.map.holding().as_deref(),
        ),
        Op::Replicate => exec::replicate(store, &node.sync, &req, node.map.holding().as_deref()),
        Op::Scan => match ScanRequest::decode(req.value.clone()) {
            Ok(scan) => {
                let step = store.scan(scan.cursor, scan.count, scan.kind, scan.pattern.as_deref());
                let mut out = BytesMut::with_capacity(
                    8 + step.keys.iter().map(|k| 4 + k.len()).sum::<usize>(),
                );
                out.put_u64(step.next);
                for k in &step.keys {
                    program::put_scan_key(&mut out, k);
                }
                Response::ok(out.freeze())
            }
            Err(e) => Response::error(Status::ParseError, e.0),
        },
        Op::Flush => {
            let gone = store.flush(req.version);
            if alone {
                node.sync.took_alone();
            }
            let removed = gone.len();
            if req.flags & flags::ASYNC != 0 {
                // Freeing millions of entries takes a while; readers no longer see them.
                std::thread::spawn(move || drop(gone));
            } else {
                drop(gone);
            }
            Response::ok(Bytes::from(removed.to_string()))
        }
        Op::Set => {
            let absolute = req.flags & flags::EXPIRES_AT != 0;
            let opts = SetOptions {
                ttl_ms: if absolute { 0 } else { req.ttl_ms },
                expires_at: if absolute { req.ttl_ms } else { 0 },
                nx: req.flags & flags::NX != 0,
                xx: req.flags & flags::XX != 0,
                keep_ttl: req.flags & flags::KEEP_TTL != 0,
                get: req.flags & flags::GET != 0,
                alone,
            };
            match store.set(&req.key, &req.value, req.version, opts) {
                Ok(outcome) => {
                    if alone {
                        node.sync.took_alone();
                    }
                    let payload = if opts.get {
                        presence_prefixed(outcome.old, store.cipher().is_some())
                    } else {
                        Bytes::new()
                    };
                    let status = if outcome.applied {
                        Status::Ok
                    } else {
                        Status::NotApplied
                    };
                    Response {
                        id: 0,
                        status,
                        payload,
                    }
                }
                Err(StoreError::Seal(e)) => corrupt(e),
                Err(e @ StoreError::TooLarge { .. }) => Response {
                    id: 0,
                    status: Status::TooLarge,
                    payload: Bytes::from(e.to_string()),
                },
            }
        }
        Op::Del => {
            let found_it = store.del_alone(&req.key, req.version, alone);
            if alone {
                node.sync.took_alone();
            }
            found(found_it)
        }
        Op::Revoke => match twincache_protocol::program::decode_changes(req.value.clone()) {
            Ok(changes) => {
                node.sync.revoked();
                let gone = changes
                    .iter()
                    .filter(|c| store.revoke(&c.key, req.version))
                    .count();
                Response::ok(Bytes::from(gone.to_string()))
            }
            Err(e) => Response::error(Status::ParseError, e.0),
        },
        Op::PartnerMissed => {
            // What the partner missed, when the orchestrator names it (the write's key at
            // its version, or a program's changes): marked, so that a copy computed
            // without it is refused (`Store::replicate`).
            if req.version != 0 {
                match twincache_protocol::program::decode_changes(req.value.clone()) {
                    Ok(changes) if !changes.is_empty() => {
                        for c in &changes {
                            store.mark_alone(&c.key, req.version);
                        }
                    }
                    _ => {
                        store.mark_alone(&req.key, req.version);
                    }
                }
            }
            node.sync.took_alone();
            Response::ok(Bytes::new())
        }
        Op::Exists => found(store.exists(&req.key)),
        Op::Stats => {
            let mut info = Info::new();
            stats_text(store, &mut info);
            info.add(
                "connected_clients",
                node.connections.load(std::sync::atomic::Ordering::Relaxed),
            );
            if let Some(adapter) = &node.adapter {
                adapter.stats_text(&mut info);
            }
            Response::ok(info.into_bytes())
        }
        Op::Ping => Response::ok(Bytes::from_static(b"PONG")),
        Op::Status => {
            let mut info = Info::new();
            node.sync.status_text(&mut info);
            info.add("map_epoch", node.map.epoch());
            info.add("adapter", u8::from(node.adapter.is_some()));
            // It takes `batch` frames: an orchestrator sends none to a worker that does not
            // say so (one from before them would refuse it after the session's later
            // requests had gone out).
            info.add("batches", u8::from(node.adapter.is_none()));
            // It gives and checks the bases of a read-modify-write's changes
            // (`flags::BASES`): an orchestrator asks for them only when both partners do.
            info.add("bases", 1);
            // An orchestrator's node-id claim rides on its health checks.
            if !req.value.is_empty() {
                info.add(
                    "claim",
                    node.sync.claim(&String::from_utf8_lossy(&req.value)),
                );
            }
            Response::ok(info.into_bytes())
        }
        Op::Adopt => match node.sync.adopt(&String::from_utf8_lossy(&req.value)) {
            Ok(()) => Response::ok(Bytes::new()),
            Err(msg) => Response::error(Status::ParseError, msg),
        },
        Op::Resync => {
            let value = String::from_utf8_lossy(&req.value);
            let (partner, refill) = match value.split_once(' ') {
                Some((addr, "merge")) => (addr, Refill::Merge),
                _ => (value.as_ref(), Refill::Resync),
            };
            if partner.is_empty() || partner.contains(' ') {
                return Response::error(
                    Status::ParseError,
                    "resync takes the partner's host:port, then optionally `merge`",
                );
            }
            let started = node.sync.start(
                store.clone(),
                partner.to_string(),
                refill,
                node.max_frame + 1024,
                node.secret.clone(),
                node.tls.as_ref().and_then(NodeTls::connector),
            );
            Response::ok(Bytes::from_static(if started {
                b"started"
            } else {
                b"already running"
            }))
        }
        Op::Slots => slots(node, &String::from_utf8_lossy(&req.value)),
        Op::Map => node.map.op(&req.value),
        Op::Batch => batch(node, req.value),
        // Served by the connection loop, which streams it.
        Op::Snapshot => Response::status(Status::ServerError),
        Op::Passthrough | Op::Invalidate => {
            Response::error(Status::InvalidCommand, "this worker is not in adapter mode")
        }
        // A handshake after the start, a client's AUTH (workers have no users), or a Redis
        // command (the orchestrator runs those).
        Op::ClusterHello | Op::ClusterProof | Op::Auth | Op::Command | Op::Unknown(_) => {
            Response::status(Status::InvalidCommand)
        }
    }
}

/// A batch of plain SETs (`Op::Batch`): each admitted and run as if it had come in a frame
/// of its own, their answers in order. Adapter mode refuses it: its writes go to Redis first.
fn batch(node: &Node, body: Bytes) -> Response {
    if node.adapter.is_some() {
        return Response::error(
            Status::InvalidCommand,
            "batches are not taken in adapter mode",
        );
    }
    if body.len() > BATCH_BYTES {
        // More than an orchestrator sends: refused before any of it runs.
        return Response::error(Status::TooLarge, "a batch holds at most 16 KiB of sets");
    }
    let mut out = BytesMut::new();
    for (i, sub) in frames::<Request>(body).enumerate() {
        let resp = match sub {
            Ok(req) if req.op == Op::Set && req.flags & flags::GET == 0 => handle(node, req),
            Ok(_) => Response::error(Status::InvalidCommand, "a batch holds only plain sets"),
            // Those before it ran: the orchestrator takes it that this worker missed them all.
            Err(e) => return Response::error(Status::ParseError, e.to_string()),
        };
        encode_response(i as u64, resp.status, &resp.payload, &mut out);
    }
    Response::ok(out.freeze())
}

/// The `slots` op: a slot move's steps on this worker (see `sync`).
fn slots(node: &Node, line: &str) -> Response {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    match words.as_slice() {
        ["import", from, lo, hi, rate] => {
            let (Ok(range), Ok(rate)) = (SlotRange::from_bounds(lo, hi), rate.parse::<u64>())
            else {
                return Response::error(Status::ParseError, "import ADDR LO HI RATE");
            };
            let started = node.sync.import(
                node.store.clone(),
                from.to_string(),
                range,
                rate,
                node.max_frame + 1024,
                node.secret.clone(),
                node.tls.as_ref().and_then(NodeTls::connector),
            );
            match started {
                Some(seq) => Response::ok(Bytes::from(seq.to_string())),
                None => Response::error(Status::Unavailable, "an import is running"),
            }
        }
        ["progress"] => Response::ok(Bytes::from(node.sync.import_progress())),
        ["drop", lo, hi] => match SlotRange::from_bounds(lo, hi) {
            Ok(range) => {
                let n = node.store.drop_slots(range);
                tracing::info!(
                    slots = %range,
                    entries = n,
                    "slots dropped: moved to another pair"
                );
                Response::ok(Bytes::from(n.to_string()))
            }
            Err(e) => Response {
                id: 0,
                status: Status::ParseError,
                payload: Bytes::from(e),
            },
        },
        _ => Response::error(
            Status::ParseError,
            "slots takes `import ADDR LO HI RATE`, `progress` or `drop LO HI`",
        ),
    }
}

fn found(yes: bool) -> Response {
    if yes {
        Response::ok(Bytes::new())
    } else {
        Response::status(Status::NotFound)
    }
}

pub(crate) fn corrupt(e: crate::seal::SealError) -> Response {
    tracing::error!(error = %e, "stored value cannot be opened");
    Response::error(Status::ServerError, "stored value is corrupt")
}

/// `0` for no value, `1` followed by the value (the reply to a `set` with the GET flag);
/// with `secret`, wiped once sent.
fn presence_prefixed(value: Option<Bytes>, secret: bool) -> Bytes {
    match value {
        None => Bytes::from_static(&[0]),
        Some(v) => {
            let mut out = Vec::with_capacity(1 + v.len());
            out.push(1);
            out.extend_from_slice(&v);
            if secret {
                wipe::secret_bytes(out)
            } else {
                Bytes::from(out)
            }
        }
    }
}

/// The worker's counters as `name:value` lines, the format of Redis' INFO.
fn stats_text(store: &Store, info: &mut Info) {
    use std::sync::atomic::Ordering::Relaxed;
    let usage = store.usage();
    let c = &store.counters;
    match store.cipher() {
        Some(cipher) => info
            .add("encryption", "on")
            .add("key_fingerprint", cipher.fingerprint()),
        None => info.add("encryption", "off"),
    };
    match store.dictionary() {
        Some(d) => info.add("dictionary", format_args!("{:#010x}", d.id())),
        None => info.add("dictionary", "none"),
    };
    // Keys with an expiry, and their mean time left in ms (INFO keyspace's `expires` and
    // `avg_ttl`), from sums kept as entries come and go.
    let avg_ttl = usage
        .expiring_at_sum
        .checked_div(usage.expiring as u128)
        .map_or(0, |at| {
            at.saturating_sub(u128::from(crate::store::now_ms()))
        });
    info.add("keys", usage.keys)
        .add("expires", usage.expiring)
        .add("avg_ttl", avg_ttl)
        .add("bytes", usage.bytes)
        .add("logical_bytes", usage.logical_bytes)
        .add("stored_bytes", usage.stored_bytes)
        // Keys and values as given over as stored: how much the sealing saves.
        .add(
            "compression_ratio",
            format_args!(
                "{:.2}",
                usage.logical_bytes as f64 / usage.stored_bytes.max(1) as f64
            ),
        )
        .add("hits", c.hits.load(Relaxed))
        .add("misses", c.misses.load(Relaxed))
        .add("sets", c.sets.load(Relaxed))
        .add("stale_writes", c.stale_writes.load(Relaxed))
        .add("expired", c.expired.load(Relaxed))
        .add("evicted", c.evicted.load(Relaxed))
        .add("refused_unsealed", c.refused_unsealed.load(Relaxed))
        .add("max_memory", store.max_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use twincache_protocol::cluster_map::ClusterMap;
    use twincache_protocol::slots::SlotMap;

    /// Gives `node` a map of two pairs, this worker in the first; the map.
    fn two_pairs(node: &Node) -> ClusterMap {
        let map = ClusterMap {
            workers: ["a:1", "b:1", "c:1", "d:1"].map(String::from).to_vec(),
            slots: SlotMap::even(2),
            moving: None,
            wanted: Vec::new(),
        };
        let mut set = Request::new(Op::Map, Bytes::new());
        set.value = Bytes::from(format!("set 0 orch-a\n{}", map.text()));
        assert_eq!(handle(node, set).status, Status::Ok);
        map
    }

    /// `partner_missed` naming a write marks it; `revoke` removes a key only at the version
    /// named, leaving no tombstone; a revoke that does not parse is refused.
    #[test]
    fn partner_missed_marks_and_revoke_removes_the_write_named() {
        use twincache_protocol::program::{Change, Kind};
        let node = Node::for_tests(None);
        node.store.set(b"k", b"v", 5, Default::default()).unwrap();
        let mut missed = Request::new(Op::PartnerMissed, Bytes::from_static(b"k"));
        missed.version = 5;
        assert_eq!(handle(&node, missed).status, Status::Ok);
        assert_eq!(node.sync.taken_alone(), 1);
        assert!(!node.store.mark_alone(b"k", 4));
        let mut block = BytesMut::new();
        Change {
            key: Bytes::from_static(b"k"),
            kind: Kind::String as u8,
            expires_at: 0,
            value: Bytes::from_static(b"v"),
        }
        .encode(&mut block);
        let mut revoke = Request::new(Op::Revoke, Bytes::new());
        revoke.value = block.freeze();
        revoke.version = 4;
        assert_eq!(&handle(&node, revoke.clone()).payload[..], b"0");
        revoke.version = 5;
        assert_eq!(&handle(&node, revoke.clone()).payload[..], b"1");
        assert_eq!(node.store.version(b"k"), None, "no tombstone");
        assert!(
            !node.sync.synced(),
            "it lacks the partner's value until it refills"
        );
        revoke.value = Bytes::from_static(b"\x00\x00");
        assert_eq!(handle(&node, revoke).status, Status::ParseError);
    }

    /// A GET answered into the connection's replies from the store, as the connection loop
    /// does, writes the bytes the general path's response would: every stored form, a hash,
    /// a miss, a worker not yet resynced, and a key of another pair's slot.
    #[tokio::test]
    async fn a_get_answered_in_place_is_the_response_serve_gives() {
        let node = Node::for_tests(None);
        let noise = crate::seal::noise(LARGE + 100);
        let text = b"{\"name\":\"alice\"}".repeat(100);
        for (key, value) in [
            (&b"short"[..], &b"v"[..]),
            (b"noise", &noise[..LARGE - 1]),
            (b"large noise", &noise[..]),
            (b"text", &text[..]),
        ] {
            node.store
                .set(key, value, 1, SetOptions::default())
                .unwrap();
            let layout = if key == b"text" { "compressed" } else { "raw" };
            assert_eq!(node.store.txn([key]).layout(key), Some(layout));
        }
        let mut hset = Request::new(Op::Apply, Bytes::from_static(b"hash"));
        hset.version = 2;
        hset.value = twincache_protocol::program::encode_program(&[
            twincache_protocol::program::Action::HSet {
                pairs: vec![(Bytes::from_static(b"f"), Bytes::from_static(b"1"))],
                ok: false,
            },
        ]);
        assert_eq!(handle(&node, hset).status, Status::Ok);
        let written = |out: &mut wipe::Replies| {
            let mut bytes = Vec::new();
            futures_util::FutureExt::now_or_never(out.write_to(&mut bytes))
                .unwrap()
                .unwrap();
            bytes
        };
        let compare = |key: &[u8], flags: u8, status: Status| {
            let mut req = Request::new(Op::Get, Bytes::copy_from_slice(key));
            req.id = 7;
            req.flags = flags;
            // Both ways a connection's replies are kept: wiped (with a key) or not.
            for wipe in [false, true] {
                let (mut direct, mut general) = (
                    wipe::Replies::new(1024, wipe),
                    wipe::Replies::new(1024, wipe),
                );
                answer_get(&node, req.clone(), &mut direct);
                let resp = handle(&node, req.clone());
                assert_eq!(resp.status, status, "{key:?}");
                general.encode(&resp.with_id(7));
                assert_eq!(written(&mut direct), written(&mut general), "{key:?}");
            }
        };
        for key in ["short", "noise", "large noise", "text"] {
            compare(key.as_bytes(), 0, Status::Ok);
        }
        compare(b"hash", 0, Status::WrongType);
        compare(b"absent", 0, Status::NotFound);
        compare(b"short", flags::IN_SYNC, Status::Unavailable);
        let map = two_pairs(&node);
        let theirs = (0u32..)
            .map(|i| format!("k{i}"))
            .find(|k| map.slots.pair_of(k.as_bytes()) == 1)
            .unwrap();
        compare(theirs.as_bytes(), 0, Status::Moved);
    }

    /// A key of pair `pair` under `map`.
    fn key_on(map: &ClusterMap, pair: usize) -> Bytes {
        (0u32..)
            .map(|i| Bytes::from(format!("k{i}")))
            .find(|k| map.slots.pair_of(k) == pair)
            .unwrap()
    }

    /// A batch's SETs each run as a lone SET would (a key of another pair is refused as
    /// moved, the others stored), answered in order; anything but a plain SET in it is
    /// refused on its own, and a batch that does not parse is refused whole.
    #[test]
    fn a_batch_runs_each_set_as_if_it_came_alone() {
        let node = Node::for_tests(None);
        let map = two_pairs(&node);
        let set = |key: &Bytes, value: &'static [u8]| {
            let mut req = Request::new(Op::Set, key.clone());
            req.value = Bytes::from_static(value);
            req.version = 7;
            req
        };
        let (here, there) = (key_on(&map, 0), key_on(&map, 1));
        let mut get = set(&here, b"");
        get.op = Op::Get;
        let body = twincache_protocol::frame::encode_batch(&[
            set(&here, b"one"),
            set(&there, b"two"),
            get,
            set(&here, b"three"),
        ]);
        let mut req = Request::new(Op::Batch, Bytes::new());
        req.value = body.clone();
        let resp = handle(&node, req);
        assert_eq!(resp.status, Status::Ok);
        let answers: Vec<Response> = frames(resp.payload).collect::<Result<_, _>>().unwrap();
        let got: Vec<(u64, Status)> = answers.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(
            got,
            [
                (0, Status::Ok),
                (1, Status::Moved),
                (2, Status::InvalidCommand),
                (3, Status::Ok)
            ]
        );
        let stored = get_with(&node.store, &here, |v| v.into_bytes()).unwrap();
        assert_eq!(&stored[..], b"three");
        let mut cut = Request::new(Op::Batch, Bytes::new());
        cut.value = body.slice(..body.len() - 1);
        assert_eq!(handle(&node, cut).status, Status::ParseError);
        // More than an orchestrator gathers: refused before any of it runs.
        let many: Vec<Request> = (0..BATCH_BYTES / 30)
            .map(|i| set(&Bytes::from(format!("many{i}")), b"x"))
            .collect();
        let mut big = Request::new(Op::Batch, Bytes::new());
        big.value = twincache_protocol::frame::encode_batch(&many);
        assert!(big.value.len() > BATCH_BYTES);
        assert_eq!(handle(&node, big).status, Status::TooLarge);
        assert!(node.store.version(b"many0").is_none());
    }

    /// The adapter's ops are answered before `serve`: the map check comes first for them too.
    #[test]
    fn adapter_ops_of_another_pairs_slot_are_moved() {
        // Connections to Redis are made on first use: none is made here.
        let adapter = Adapter::new("redis://127.0.0.1:1", "redis://127.0.0.1:1", false).unwrap();
        let node = Arc::new(Node::for_tests(Some(adapter)));
        let map = two_pairs(&node);
        let key_of = |pair| key_on(&map, pair);
        let answer = |op, key: &Bytes, flags| {
            let mut req = Request::new(op, key.clone());
            req.flags = flags;
            match dispatch(&node, req) {
                Handled::Now(resp) => resp,
                Handled::Later(_) => panic!("{op:?} went to Redis"),
            }
        };
        let theirs = key_of(1);
        for (op, flags) in [
            (Op::Get, 0),
            (Op::Set, flags::PRIMARY),
            (Op::Passthrough, 0),
            (Op::Invalidate, 0),
        ] {
            let resp = answer(op, &theirs, flags);
            assert_eq!((resp.status, &resp.payload[..]), (Status::Moved, &b"1"[..]));
        }
        assert_eq!(answer(Op::Invalidate, &key_of(0), 0).status, Status::Ok);
    }
}
