//! A multiplexed frame connection: many requests in flight on one TCP connection.
//!
//! A caller encodes its request straight into the connection's outbox buffer and records
//! its reply channel in the pending map, both under one short lock, and wakes the writer
//! task only if the outbox was empty. The writer swaps the outbox for an empty buffer and
//! writes it, so every request queued meanwhile (from any number of callers) leaves in one
//! syscall. A large value is not copied into the outbox: the outbox keeps the `Bytes` it came
//! in (for a client's request, a slice of the buffer it was read into) and the writer sends it
//! from there, in the same vectored write (see `twincache_protocol::outgoing`). A reader task matches responses to pending requests by id, so responses may
//! arrive in any order. Reading and writing are separate tasks so that a peer blocked on
//! writing responses can never deadlock against us blocked on writing requests.
//!
//! [`Connection::send`] encodes synchronously, before the caller awaits anything, so the
//! requests of one caller reach the peer in the order it sent them: a pipelined `set` then
//! `get` of one key on one connection is executed in that order. The outbox is therefore
//! bounded in bytes, not in requests; the callers bound how many they have in flight (the
//! orchestrator caps in-flight requests per client and clients).
//!
//! Each request carries a deadline, checked by the reader on a short tick (a quarter of the
//! timeout or less): a request not answered in time fails with [`Error::Timeout`], a tick
//! late at most (under two ticks for a timeout below 20 ms, where the tick is its 5 ms
//! floor), plus however late a busy reader makes its sweeps. The deadline is counted in those
//! ticks, which the reader counts as it sweeps, so sending a request reads no clock (a clock
//! reading per request was 2-4% of the orchestrator's cycles), where a timer per request would
//! cost a timer-wheel insert and removal. Each tick is timed from the sweep before it, so a
//! sweep the busy reader makes late makes deadlines later, never earlier. When the connection
//! dies every pending request fails at once with [`Error::ConnectionClosed`].
//!
//! A connection may be told to be patient with a peer that is busy rather than gone
//! ([`Connection::patient_while_answering`], the orchestrator's worker links): a request past
//! its deadline then keeps waiting while answers still come back (one within the last
//! timeout), up to [`PATIENCE`] timeouts in all ([`Connection::send_strict`] opts one out). Under a queue of heavy requests a worker
//! answers slowly but steadily; failing those requests would fail them over and mark the
//! worker as having missed writes, so that it resyncs, which adds load where there is too
//! much already.
//!
//! Bounds: the outbox holds at most [`OUTBOX_LIMIT`] bytes (a request that does not fit
//! fails at once with [`Error::Overloaded`], so a peer that stopped reading cannot make it
//! grow; an owner that would rather wait counts the connections holding more than
//! [`BACKED_UP`] through [`Connection::report_backlog`] and holds its requests meanwhile),
//! and a connection on which requests time out while nothing at all comes back for a whole
//! timeout is closed (the peer froze, or the link is half-open), which fails what is pending
//! and lets the owner reconnect.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use twincache_protocol::auth::{self, ClusterSecret};
use twincache_protocol::budget::Account;
use twincache_protocol::frame::{
    encode_frame_head, FrameCodec, FrameError, Message, Request, Response, PREAMBLE,
};
use twincache_protocol::outgoing::Outgoing;
use twincache_protocol::Status;
use twincache_tls::Connector;

use crate::Error;

mod pending;

type ReplyTx = oneshot::Sender<Result<Response, Error>>;

/// The answer in place of a payload its caller has no room for.
const OVER_LIMIT: &[u8] = b"the client's buffer limit is reached";

/// Most bytes waiting in a connection's outbox; one request always fits in an empty one.
pub const OUTBOX_LIMIT: usize = 32 << 20;

/// Bytes waiting in an outbox past which the connection counts as backed up (see
/// [`Connection::report_backlog`]): half the limit, the other half room for what is on its
/// way meanwhile.
pub const BACKED_UP: usize = OUTBOX_LIMIT / 2;

/// A request waiting for its answer: where the answer goes, when it is due, and the account
/// a large answer is charged to until its caller drops it.
struct Pending {
    tx: ReplyTx,
    /// The sweep (see [`Shared::sweeps`]) from which it is late.
    deadline: u64,
    /// Whether it may wait past its deadline while the peer answers others.
    patient: bool,
    account: Option<Arc<Account>>,
    /// Whether its answer may be dropped when the account is over its limit: a read's.
    droppable: bool,
}

type PendingMap = pending::Pending<Pending>;

/// Requests encoded but not yet written, and requests written but not yet answered.
struct Outbox {
    /// Encoded requests, their large values held rather than copied.
    out: Outgoing,
    pending: PendingMap,
    /// Set when the connection dies, so a later request fails at once.
    closed: bool,
    /// Why it died, if TLS said (see [`Shared::close_because`]): later requests fail with it
    /// too, since a refused client certificate is often told before the first request.
    tls_failure: Option<String>,
    /// Whether it holds more than [`BACKED_UP`] bytes, counted in `backlog` if there is one.
    backed_up: bool,
    backlog: Option<Arc<AtomicUsize>>,
}

impl Outbox {
    /// What a request on this closed connection fails with.
    fn failure(&self) -> Error {
        failure(&self.tls_failure)
    }
}

fn failure(tls_failure: &Option<String>) -> Error {
    match tls_failure {
        Some(reason) => Error::Tls(reason.clone()),
        None => Error::ConnectionClosed,
    }
}

impl Outbox {
    /// Encodes `req` under a fresh id and records where its answer goes; the reply, and
    /// whether the outbox was empty (the writer needs waking).
    fn enqueue(
        &mut self,
        req: &Request,
        deadline: u64,
        patient: bool,
        account: Option<&Arc<Account>>,
    ) -> (Reply, bool) {
        let (reply_tx, reply_rx) = oneshot::channel();
        if self.closed {
            let _ = reply_tx.send(Err(self.failure()));
            return (Reply(reply_rx), false);
        }
        let queued = self.out.len();
        let was_empty = queued == 0;
        if !was_empty && queued + 4 + req.body_len() > OUTBOX_LIMIT {
            let _ = reply_tx.send(Err(Error::Overloaded));
            return (Reply(reply_rx), false);
        }
        let waiting = Pending {
            tx: reply_tx,
            deadline,
            patient,
            account: account.cloned(),
            droppable: req.op.reads_only(),
        };
        let id = match self.pending.insert(waiting) {
            Ok(id) => id,
            Err(waiting) => {
                let _ = waiting.tx.send(Err(Error::Overloaded));
                return (Reply(reply_rx), false);
            }
        };
        let buf = self.out.buf();
        let start = buf.len();
        let value = encode_frame_head(req, buf);
        // The id sits right after the 4-byte length prefix.
        buf[start + 4..start + 12].copy_from_slice(&id.to_be_bytes());
        self.out.put(value);
        // (One request alone, however large, is not a backlog: it always fits.)
        if !was_empty && self.out.len() > BACKED_UP {
            self.set_backed_up(true);
        }
        (Reply(reply_rx), was_empty)
    }

    /// Records whether the outbox is backed up, counting the change in the backlog.
    fn set_backed_up(&mut self, now: bool) {
        if self.backed_up != now {
            self.backed_up = now;
            if let Some(backlog) = &self.backlog {
                if now {
                    backlog.fetch_add(1, Ordering::Relaxed);
                } else {
                    backlog.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// How many timeouts in all a patient connection waits for an answer while the peer keeps
/// answering others.
pub const PATIENCE: u32 = 4;

/// What the handles and the connection's tasks share.
struct Shared {
    outbox: Mutex<Outbox>,
    /// Wakes the writer when the outbox stops being empty.
    wake_writer: Notify,
    /// Mirrors `signal` as a plain atomic: checked on every request, where the token's own
    /// check takes a lock.
    closed: AtomicBool,
    signal: CancellationToken,
    timeout: Duration,
    /// Sweeps made so far: the clock deadlines are counted in.
    sweeps: AtomicU64,
    /// Sweeps in a timeout, rounded up.
    sweeps_per_timeout: u64,
    /// When the connection started; `last_frame_ms` counts from it.
    started: Instant,
    /// Milliseconds from `started` to the last sweep tick that found a frame read since the
    /// one before.
    last_frame_ms: AtomicU64,
    /// See [`Connection::patient_while_answering`].
    patient: AtomicBool,
}

impl Shared {
    /// How long since the peer last answered anything (or since the connection started).
    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_frame_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// The deadline of a request sent now: a timeout's worth of whole ticks after the next
    /// sweep. The sweeps after that one each come a tick after the one before (the reader
    /// restarts the tick as it sweeps), so they take a timeout at least, however late any is.
    fn deadline(&self) -> u64 {
        self.sweeps.load(Ordering::Acquire) + 1 + self.sweeps_per_timeout
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed and fails every pending request. The writer is woken to
    /// notice (and its exit closes the socket, so the reader sees end of input too).
    fn close(&self) {
        self.close_because(None);
    }

    /// [`Shared::close`]; with a TLS failure's reason (a server refusing this client's
    /// certificate says so only after the handshake), pending requests fail with
    /// [`Error::Tls`] rather than a bare [`Error::ConnectionClosed`].
    fn close_because(&self, tls: Option<String>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.signal.cancel();
        self.wake_writer.notify_one();
        let drained: Vec<ReplyTx> = {
            let mut o = self.lock();
            o.closed = true;
            o.tls_failure = tls.clone();
            o.out.clear();
            o.set_backed_up(false);
            o.pending.drain().into_iter().map(|p| p.tx).collect()
        };
        for tx in drained {
            let _ = tx.send(Err(failure(&tls)));
        }
    }
}

/// Closes the connection when the last [`Connection`] handle goes away.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A cloneable handle to one multiplexed connection. Cheap to clone (one `Arc`); all clones
/// share the connection. It closes when every handle is dropped or the peer goes away.
#[derive(Clone)]
pub struct Connection {
    handle: Arc<Handle>,
}

impl Connection {
    /// Connects to `addr`, sends the protocol preamble and starts the connection's tasks.
    /// Requests not answered within `timeout` fail with [`Error::Timeout`].
    pub async fn connect(
        addr: &str,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Connection, Error> {
        Connection::open(addr, max_frame, timeout, None, None).await
    }

    /// [`Connection::connect`] to a worker that requires the cluster secret: the connection
    /// proves it knows `secret`, and checks that the worker does too, before any request.
    pub async fn connect_with_secret(
        addr: &str,
        max_frame: usize,
        timeout: Duration,
        secret: Option<&ClusterSecret>,
    ) -> Result<Connection, Error> {
        Connection::open(addr, max_frame, timeout, secret, None).await
    }

    /// [`Connection::connect_with_secret`], over TLS when `tls` is given: the TLS handshake
    /// first (the server's certificate checked against the host of `addr`, or the
    /// connector's server name), then the preamble and the cluster handshake inside it.
    pub async fn open(
        addr: &str,
        max_frame: usize,
        timeout: Duration,
        secret: Option<&ClusterSecret>,
        tls: Option<&Connector>,
    ) -> Result<Connection, Error> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        match tls {
            None => {
                opening(&mut stream, secret).await?;
                Ok(Connection::start(stream, max_frame, timeout))
            }
            Some(tls) => {
                let mut stream = tls.connect(addr, stream).await.map_err(Error::from_io)?;
                opening(&mut stream, secret).await?;
                Ok(Connection::start_stream(stream, max_frame, timeout))
            }
        }
    }

    /// Runs the connection over an already-open TCP stream (preamble already sent). Its
    /// reader and writer own the socket's two halves: no lock between them.
    pub fn start(stream: TcpStream, max_frame: usize, timeout: Duration) -> Connection {
        let (rd, wr) = stream.into_split();
        Connection::run(rd, wr, max_frame, timeout)
    }

    /// Runs the connection over any open stream (preamble already sent), such as a TLS
    /// session. A TLS session is one state for both directions, so its halves share it
    /// behind `tokio::io::split`'s lock; plain TCP takes [`Connection::start`].
    pub fn start_stream<S>(stream: S, max_frame: usize, timeout: Duration) -> Connection
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        Connection::run(rd, wr, max_frame, timeout)
    }

    fn run<R, W>(rd: R, wr: W, max_frame: usize, timeout: Duration) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox {
                out: Outgoing::with_capacity(16 * 1024),
                pending: PendingMap::default(),
                closed: false,
                tls_failure: None,
                backed_up: false,
                backlog: None,
            }),
            wake_writer: Notify::new(),
            closed: AtomicBool::new(false),
            signal: CancellationToken::new(),
            timeout,
            sweeps: AtomicU64::new(0),
            sweeps_per_timeout: timeout.as_nanos().div_ceil(sweep_tick(timeout).as_nanos()) as u64,
            started: Instant::now(),
            last_frame_ms: AtomicU64::new(0),
            patient: AtomicBool::new(false),
        });
        tokio::spawn(write_loop(wr, shared.clone()));
        tokio::spawn(read_loop(
            FramedRead::new(rd, FrameCodec::<Response>::new(max_frame)),
            shared.clone(),
        ));
        Connection {
            handle: Arc::new(Handle(shared)),
        }
    }

    /// Lets requests past their deadline keep waiting while the peer still answers others,
    /// up to [`PATIENCE`] timeouts in all (see the module docs): for a peer whose slowness
    /// means a queue, not a failure.
    pub fn patient_while_answering(&self) {
        self.handle.0.patient.store(true, Ordering::Relaxed);
    }

    /// Counts this connection in `backlog` while its outbox holds more than [`BACKED_UP`]
    /// bytes: an owner that holds its requests while the count is not zero gets pushed back
    /// by a slow peer instead of [`Error::Overloaded`].
    pub fn report_backlog(&self, backlog: Arc<AtomicUsize>) {
        let mut outbox = self.handle.0.lock();
        // Counted out of the count it was in, if any, and into this one.
        let was = outbox.backed_up;
        outbox.set_backed_up(false);
        outbox.backlog = Some(backlog);
        outbox.set_backed_up(was);
    }

    /// How long since the peer last answered anything on this connection (or since it
    /// opened): a busy peer answers steadily, a frozen one not at all.
    pub fn silent_for(&self) -> Duration {
        self.handle.0.silent_for()
    }

    /// Encodes `req` into the outbox now, under a fresh id (its own `id` is ignored), and
    /// returns the future of its response, which fails with [`Error::Timeout`] after the
    /// connection's timeout. Dropping the future abandons the request.
    pub fn send(&self, req: &Request) -> Reply {
        self.send_charged(req, None)
    }

    /// [`Connection::send`], charging a large answer to `account` from its arrival until
    /// the caller drops it (see `twincache_protocol::budget`).
    pub fn send_charged(&self, req: &Request, account: Option<&Arc<Account>>) -> Reply {
        let patient = self.handle.0.patient.load(Ordering::Relaxed);
        self.enqueue_one(req, patient, account)
    }

    /// [`Connection::send`], failing after one timeout even on a patient connection: for a
    /// request whose sender promised the peer to give up by then.
    pub fn send_strict(&self, req: &Request) -> Reply {
        self.enqueue_one(req, false, None)
    }

    fn enqueue_one(&self, req: &Request, patient: bool, account: Option<&Arc<Account>>) -> Reply {
        let shared = &self.handle.0;
        let deadline = shared.deadline();
        let (reply, was_empty) = shared.lock().enqueue(req, deadline, patient, account);
        if was_empty {
            shared.wake_writer.notify_one();
        }
        reply
    }

    /// [`Connection::send`] for several requests, queued under one lock: they enter the
    /// outbox together, in order, so they leave in one write (a client's pipeline or
    /// multi-key call), however the runtime schedules the writer meanwhile.
    pub fn send_many<'a>(&self, reqs: impl IntoIterator<Item = &'a Request>) -> Vec<Reply> {
        let shared = &self.handle.0;
        let deadline = shared.deadline();
        let patient = shared.patient.load(Ordering::Relaxed);
        let mut woke = false;
        let replies = {
            let mut o = shared.lock();
            reqs.into_iter()
                .map(|req| {
                    let (reply, was_empty) = o.enqueue(req, deadline, patient, None);
                    woke |= was_empty;
                    reply
                })
                .collect()
        };
        if woke {
            shared.wake_writer.notify_one();
        }
        replies
    }

    /// Sends `req` and waits for its response (see [`Connection::send`]).
    pub async fn call(&self, req: &Request) -> Result<Response, Error> {
        self.send(req).await
    }

    /// Whether the connection has died (it never comes back; make a new one).
    pub fn is_closed(&self) -> bool {
        self.handle.0.closed.load(Ordering::Acquire)
    }

    /// Completes when the connection dies.
    pub async fn closed(&self) {
        self.handle.0.signal.cancelled().await
    }

    /// Closes the connection; pending requests fail with [`Error::ConnectionClosed`].
    pub fn close(&self) {
        self.handle.0.close();
    }
}

/// Opens the binary protocol: the cluster handshake when there is a secret, else the bare
/// preamble.
async fn opening<S>(stream: &mut S, secret: Option<&ClusterSecret>) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match secret {
        Some(secret) => auth::connect(stream, secret).await.map_err(|e| match e {
            auth::HandshakeError::Io(e) => Error::from_io(e),
            e => Error::Auth(e.to_string()),
        }),
        None => {
            stream.write_all(&PREAMBLE).await?;
            // A TLS session may hold the bytes until flushed (a no-op on TCP).
            stream.flush().await?;
            Ok(())
        }
    }
}

/// The response to one request sent with [`Connection::send`].
#[must_use = "a reply does nothing unless awaited"]
pub struct Reply(oneshot::Receiver<Result<Response, Error>>);

impl Reply {
    /// A reply that is already there: for stand-ins of a connection in tests (the
    /// orchestrator's routing tests answer for a worker without one).
    #[doc(hidden)]
    pub fn ready(answer: Result<Response, Error>) -> Reply {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(answer);
        Reply(rx)
    }
}

impl Future for Reply {
    type Output = Result<Response, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::ConnectionClosed)))
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, shared: Arc<Shared>) {
    let mut out = Outgoing::with_capacity(16 * 1024);
    // Only the Notify is awaited between writes: `close` wakes it too, and the flag is a plain
    // atomic, where polling a cancellation future on every wake would take its lock.
    loop {
        shared.wake_writer.notified().await;
        if shared.closed.load(Ordering::Acquire) {
            break;
        }
        // Let the tasks that are ready to run go first: a multi-thread runtime runs a task it
        // just woke at once (its LIFO slot), so without this every caller's request would
        // leave in a write of its own. Yielding puts the writer behind them, and what they
        // queue meanwhile leaves with it in one write.
        tokio::task::yield_now().await;
        // Take everything queued so far; callers keep filling the (now empty) outbox.
        {
            let mut outbox = shared.lock();
            std::mem::swap(&mut outbox.out, &mut out);
            outbox.set_backed_up(false);
        }
        if out.is_empty() {
            continue;
        }
        // A write blocked on a peer that stopped reading (a half-open link) ends when the
        // connection is closed, rather than holding the socket and the outbox until TCP
        // gives up many minutes later. The flush is a no-op on TCP; a TLS session sends what
        // it still holds.
        let written = tokio::select! {
            // The write first: it mostly completes at once, and the close signal (whose
            // every poll takes a lock) is polled only while it waits.
            biased;
            written = async {
                wr.write_all_buf(&mut out).await?;
                wr.flush().await
            } => written,
            _ = shared.signal.cancelled() => break,
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "connection write failed");
            break;
        }
        out.clear();
    }
    shared.close();
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameCodec<Response>>,
    shared: Arc<Shared>,
) {
    // Restarted at every sweep (below), so it never has ticks to catch up on.
    let mut sweep = tokio::time::interval(sweep_tick(shared.timeout));
    // A close from this side ends the writer, whose exit closes the socket: the reader then
    // sees end of input. The tick checks the flag as well, in case the peer never answers.
    // Whether a frame came since the last tick: the tick records when the peer last
    // answered, so no frame reads the clock (within a tick is close enough for "silent for
    // a whole timeout", the tick being at most a quarter of one).
    let mut answered = false;
    // Frames read since the tick was last looked at (see the select's note).
    let mut unswept = 0u32;
    loop {
        let due = tokio::select! {
            // Frames first, so a busy link spends neither a random draw nor a timer poll on
            // each frame. The tick is polled whenever no frame is ready, and looked at every
            // SWEEP_EVERY frames besides: `select!` pends as soon as the task's cooperative
            // budget is spent, before it polls any branch, so a peer whose frames never run
            // dry would otherwise keep the tick from ever being polled (no request would time
            // out, and the peer would look silent while it talks).
            biased;
            frame = frames.next() => match frame {
                Some(Ok(resp)) => {
                    answered = true;
                    deliver(&shared, resp);
                    unswept += 1;
                    // Looked at once per SWEEP_EVERY frames, due or not: a tick that is not
                    // due yet is not polled again (and the clock not read) frame by frame.
                    unswept >= SWEEP_EVERY && {
                        unswept = 0;
                        tokio::task::unconstrained(sweep.tick()).now_or_never().is_some()
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection read failed");
                    if let FrameError::Io(e) = e {
                        if let Error::Tls(reason) = Error::from_io(e) {
                            shared.close_because(Some(reason));
                        }
                    }
                    break;
                }
                None => break,
            },
            _ = sweep.tick() => true,
        };
        if !due {
            continue;
        }
        unswept = 0;
        shared.sweeps.fetch_add(1, Ordering::AcqRel);
        // The next tick a whole tick from now, however late this one was taken: deadlines
        // count ticks (see `Shared::deadline`). Without this, the interval keeps its own
        // schedule when a tick is taken less than 5 ms late, and a request sent in between
        // could fail up to that much early (too rare for a test to catch reliably).
        sweep.reset();
        if shared.closed.load(Ordering::Acquire) {
            break;
        }
        if std::mem::take(&mut answered) {
            let since = shared.started.elapsed().as_millis() as u64;
            shared.last_frame_ms.store(since, Ordering::Relaxed);
        }
        if expire(&shared) > 0 && shared.silent_for() > shared.timeout {
            // Requests time out and nothing at all has come back for a whole timeout: the
            // peer froze or the link is half-open.
            tracing::debug!("peer unresponsive; closing the connection");
            break;
        }
    }
    shared.close();
}

/// How often the reader sweeps for requests past their deadline: a quarter of the timeout or
/// less (at most 250 ms), a whole fraction of it so that a timeout is a whole number of ticks
/// (a request then fails a tick late at most), and at least 5 ms.
fn sweep_tick(timeout: Duration) -> Duration {
    let fraction = timeout
        .as_nanos()
        .div_ceil(Duration::from_millis(250).as_nanos())
        .clamp(4, u128::from(u32::MAX)) as u32;
    (timeout / fraction).max(Duration::from_millis(5))
}

/// How many frames the reader takes in a row before it looks whether its sweep is due.
const SWEEP_EVERY: u32 = 64;

/// Hands a response to the request waiting for it, if one still is.
fn deliver(shared: &Shared, mut resp: Response) {
    let Some(p) = shared.lock().pending.remove(resp.id) else {
        return;
    };
    if let Some(account) = &p.account {
        if account.held() > account.limit() && p.droppable {
            // Its caller holds more than it may: it is being cut off, so the payload is
            // dropped now rather than held (a write's is still held: see `Op::reads_only`).
            resp.status = Status::TooLarge;
            resp.payload = Bytes::from_static(OVER_LIMIT);
        } else {
            resp.payload = account.hold(resp.payload);
        }
    }
    let _ = p.tx.send(Ok(resp));
}

/// Fails the requests past their deadline and forgets those whose caller went away;
/// returns how many were past their deadline.
fn expire(shared: &Shared) -> usize {
    let now = shared.sweeps.load(Ordering::Acquire);
    // A patient request whose peer still answers fails only once it waited PATIENCE
    // timeouts (the deadline is one timeout after sending).
    let answering = shared.silent_for() < shared.timeout;
    let grace = shared.sweeps_per_timeout * u64::from(PATIENCE - 1);
    let late =
        |p: &Pending| p.deadline <= now && !(p.patient && answering && now < p.deadline + grace);
    let expired: Vec<(ReplyTx, bool)> = shared
        .lock()
        .pending
        .extract_if(|p| p.tx.is_closed() || late(p))
        .into_iter()
        .map(|p| {
            let late = late(&p);
            (p.tx, late)
        })
        .collect();
    let mut overdue = 0;
    for (tx, late) in expired {
        overdue += usize::from(late);
        let _ = tx.send(Err(Error::Timeout(shared.timeout)));
    }
    overdue
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use futures_util::SinkExt;
    use tokio::net::TcpListener;
    use tokio_util::codec::{Encoder, Framed};
    use twincache_protocol::frame::{Op, PREAMBLE};

    /// A peer with frames always waiting (answers to nothing asked), each read spending
    /// cooperative budget as a socket's does: the reader never finds its input dry.
    struct Flood {
        frames: Bytes,
        pos: usize,
    }

    impl AsyncRead for Flood {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
            let n = buf.remaining().min(self.frames.len() - self.pos);
            buf.put_slice(&self.frames[self.pos..self.pos + n]);
            self.pos = (self.pos + n) % self.frames.len();
            coop.made_progress();
            Poll::Ready(Ok(()))
        }
    }

    impl tokio::io::AsyncWrite for Flood {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The reader polls frames before its sweep tick; a peer that never lets the input run
    /// dry must not keep requests from timing out, nor look silent while it talks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flooding_peer_does_not_keep_requests_from_timing_out() {
        let mut codec = FrameCodec::<Request>::new(1 << 20);
        let mut frames = BytesMut::new();
        for _ in 0..4096 {
            codec
                .encode(Response::ok(Bytes::new()).with_id(0), &mut frames)
                .unwrap();
        }
        let timeout = Duration::from_millis(200);
        let flood = Flood {
            frames: frames.freeze(),
            pos: 0,
        };
        let conn = Connection::start_stream(flood, 1 << 20, timeout);
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            conn.send(&Request::new(Op::Ping, Bytes::new())),
        )
        .await;
        assert!(
            matches!(answer, Ok(Err(Error::Timeout(_)))),
            "{:?} after {:?}",
            answer.map(|a| a.map(|_| ())),
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(conn.silent_for() < timeout, "{:?}", conn.silent_for());
    }

    /// A peer that answers every `ping` at once and a `get` only after `hold`: busy with
    /// one request while it keeps answering others.
    async fn slow_peer(hold: Duration) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut preamble = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut preamble)
                .await
                .unwrap();
            assert_eq!(preamble, PREAMBLE);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Response>();
            let mut framed = Framed::new(stream, FrameCodec::<Request>::new(1 << 20));
            loop {
                tokio::select! {
                    Some(req) = framed.next() => {
                        let Ok(req) = req else { return };
                        let resp = Response::ok(Bytes::new()).with_id(req.id);
                        if req.op == Op::Get {
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(hold).await;
                                let _ = tx.send(resp);
                            });
                        } else {
                            let _ = tx.send(resp);
                        }
                    }
                    Some(resp) = rx.recv() => {
                        if framed.send(resp).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        addr
    }

    /// Sends a `get` the peer holds for 2.5 timeouts and pings every 20 ms meanwhile.
    async fn held_get(patient: bool) -> Result<Response, Error> {
        let timeout = Duration::from_millis(200);
        let addr = slow_peer(timeout * 5 / 2).await;
        let conn = Connection::connect(&addr.to_string(), 1 << 20, timeout)
            .await
            .unwrap();
        if patient {
            conn.patient_while_answering();
        }
        let get = conn.send(&Request::new(Op::Get, Bytes::from_static(b"k")));
        let pings = {
            let conn = conn.clone();
            async move {
                for _ in 0..40 {
                    conn.send(&Request::new(Op::Ping, Bytes::new()))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let (answer, ()) = tokio::join!(get, pings);
        answer
    }

    #[tokio::test]
    async fn an_account_over_its_limit_loses_read_answers_but_never_a_writes() {
        let addr = slow_peer(Duration::ZERO).await;
        let conn = Connection::connect(&addr.to_string(), 1 << 20, Duration::from_secs(5))
            .await
            .unwrap();
        let budget = twincache_protocol::budget::Budget::new(1 << 30);
        let account = Account::new(&budget, 1024);
        account.charge(2048);
        let read = Request::new(Op::Get, Bytes::from_static(b"k"));
        let answer = conn.send_charged(&read, Some(&account)).await.unwrap();
        assert_eq!(answer.status, Status::TooLarge);
        let write = Request::new(Op::Set, Bytes::from_static(b"k"));
        let answer = conn.send_charged(&write, Some(&account)).await.unwrap();
        assert_eq!(
            answer.status,
            Status::Ok,
            "a write's answer says what the peer did"
        );
    }

    #[tokio::test]
    async fn a_connection_whose_peer_stops_reading_is_backed_up_until_it_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, and reads nothing.
        let _peer = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        });
        let conn = Connection::connect(&addr.to_string(), 1 << 20, Duration::from_secs(10))
            .await
            .unwrap();
        let backlog = Arc::new(AtomicUsize::new(0));
        conn.report_backlog(backlog.clone());
        let mut req = Request::new(Op::Set, Bytes::from_static(b"k"));
        req.value = Bytes::from(vec![0u8; 1 << 20]);
        let mut sent = Vec::new();
        while backlog.load(Ordering::Relaxed) == 0 {
            assert!(sent.len() < 200, "never backed up");
            sent.push(conn.send(&req));
            // The writer takes what is queued, until the socket's buffers are full.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(backlog.load(Ordering::Relaxed), 1);
        conn.report_backlog(backlog.clone());
        assert_eq!(backlog.load(Ordering::Relaxed), 1, "counted once");
        let other = Arc::new(AtomicUsize::new(0));
        conn.report_backlog(other.clone());
        assert_eq!(
            backlog.load(Ordering::Relaxed),
            0,
            "counted out of the old count"
        );
        assert_eq!(other.load(Ordering::Relaxed), 1);
        conn.report_backlog(backlog.clone());
        drop(sent);
        drop(conn);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            backlog.load(Ordering::Relaxed),
            0,
            "counted out when closed"
        );
    }

    #[tokio::test]
    async fn a_patient_connection_waits_while_the_peer_answers_others() {
        assert!(held_get(true).await.is_ok());
        assert!(matches!(held_get(false).await, Err(Error::Timeout(_))));
    }

    #[tokio::test]
    async fn a_patient_connection_gives_up_on_a_silent_peer_after_one_timeout() {
        let timeout = Duration::from_millis(200);
        let addr = slow_peer(Duration::from_secs(30)).await;
        let conn = Connection::connect(&addr.to_string(), 1 << 20, timeout)
            .await
            .unwrap();
        conn.patient_while_answering();
        let started = Instant::now();
        let answer = conn
            .send(&Request::new(Op::Get, Bytes::from_static(b"k")))
            .await;
        assert!(matches!(answer, Err(Error::Timeout(_))));
        assert!(started.elapsed() < timeout * 2, "{:?}", started.elapsed());
        assert!(started.elapsed() >= timeout, "never early");
    }

    #[test]
    fn a_timeout_is_a_whole_number_of_sweep_ticks() {
        let ms = Duration::from_millis;
        for (timeout, tick) in [
            (ms(500), ms(125)),
            (ms(1_100), ms(220)),
            (ms(10_000), ms(250)),
            (ms(80), ms(20)),
            (ms(20), ms(5)),
        ] {
            assert_eq!(sweep_tick(timeout), tick, "{timeout:?}");
            assert_eq!(timeout.as_nanos() % tick.as_nanos(), 0, "{timeout:?}");
        }
        // Below 20 ms the tick stays at 5 ms.
        assert_eq!(sweep_tick(ms(6)), ms(5));
        assert_eq!(sweep_tick(Duration::ZERO), ms(5));
    }

    /// Deadlines are counted in the reader's sweeps: a request fails once its timeout has
    /// passed, not before, however far between two sweeps it was sent.
    #[tokio::test]
    async fn a_request_fails_no_earlier_than_its_timeout() {
        let timeout = Duration::from_millis(80);
        for pause in [0, 3, 7, 11] {
            // A connection each: one whose requests time out with nothing coming back closes.
            let addr = slow_peer(Duration::from_secs(30)).await;
            let conn = Connection::connect(&addr.to_string(), 1 << 20, timeout)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let started = Instant::now();
            let answer = conn
                .send(&Request::new(Op::Get, Bytes::from_static(b"k")))
                .await;
            assert!(matches!(answer, Err(Error::Timeout(_))));
            assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
            assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
        }
    }
}
