//! One client connection: sniff the protocol, then serve pipelined requests in order.
//!
//! The first byte decides the protocol: 0xB7 (the binary preamble) is the binary client
//! protocol, `*` is RESP. Otherwise the first line decides: an inline Redis command
//! (`GET a`, see [`crate::resp::is_inline_command`]) is RESP, anything else the text protocol.
//!
//! All three run the same loop. Requests are parsed as soon as they arrive and queued to the
//! workers at once, up to `pipeline_depth` worker requests in flight (a command fanning out
//! to many keys counts once per key), so a pipelined burst costs one round trip to the
//! workers, not one per request. Replies are written in request order, batched into one
//! write when several are ready.
//!
//! Bounds: every state has a deadline (the binary preamble within [`PREAMBLE_DEADLINE`] or
//! `--idle-timeout` if shorter, the
//! first line and every later request within `--idle-timeout` of the last activity, and a
//! write to a client that does not read within `--idle-timeout` of its last progress). The
//! session's [`Account`] holds its buffers and the large replies it waits to write: past
//! half its limit it stops taking requests until replies drain, and past the limit (or with
//! the process over its budget) it is closed. A large MGET streams its reply with a bounded
//! window of values in flight.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::stream::Stream;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use twincache_protocol::budget::{Account, Budget, Charge, HOLD_MIN};
use twincache_protocol::frame::{
    encode_frame, encode_frame_head, room_ahead, FrameCodec, FrameError, Op, Request, Response,
    PREAMBLE,
};
pub use twincache_protocol::outgoing::Outgoing;
use twincache_protocol::text::{self, Command, Line, LineDecoder};
use twincache_protocol::Status;
use twincache_tls::{Accepted, NodeTls};

use crate::auth::{Access, Authenticator, Denied, Who};
use crate::cluster::{Origin, Router};
use crate::commands;
use crate::metrics::{Closed, Cmd, ErrorCode, Metrics, Proto};
use crate::resp::{is_inline_command, RespProtocol};
use twincache_protocol::program::{Action, ExpireIf, Ttl, TtlForm};

/// A binary client sends its 4-byte preamble at once; one that stops midway is not one.
pub const PREAMBLE_DEADLINE: Duration = Duration::from_secs(10);

/// How long a session keeps its buffers after its last activity: a busy connection reuses
/// them (no allocation per request), an idle one holds none.
const TRIM_AFTER: Duration = Duration::from_secs(1);

/// Buffers grown past this by a burst are given back once empty.
const KEEP_CAPACITY: usize = 64 * 1024;
/// What a buffer is given when it first needs memory. Neither buffer has any once the
/// connection has been quiet for [`TRIM_AFTER`].
const START_CAPACITY: usize = 16 * 1024;

/// A client connection's stream, as a session reads it.
///
/// An idle connection should cost little more than its socket, so its input buffer gets
/// memory only once input is there (the session gives it back after a quiet second). Plain
/// TCP can tell (readiness, then a read that may find nothing); a TLS session holds buffers
/// of its own anyway, and reads as usual.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Reads what has arrived into `buf`, giving it `room` bytes more first if it is full;
    /// 0 at end of input.
    fn read_lazily<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        room: usize,
    ) -> impl Future<Output = std::io::Result<usize>> + Send + 'a;
}

impl ClientStream for TcpStream {
    async fn read_lazily(&mut self, buf: &mut BytesMut, room: usize) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| {
            // The stream's one reader slot, not `readable()`: that joins a locked list of
            // waiters, and the select in `run` drops and remakes this future on every turn.
            std::task::ready!(self.poll_read_ready(cx))?;
            let fresh = buf.capacity() == 0;
            if buf.len() == buf.capacity() {
                buf.reserve(room);
            }
            // `poll_read`, not `try_read_buf`: a read that leaves room in the buffer clears
            // the readiness, so the next one waits for epoll instead of spending a `recv`
            // on EAGAIN (one per request at pipeline depth 1).
            match tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, buf) {
                Poll::Pending if fresh => {
                    // Readiness without input (a new socket's first report): a connection
                    // that has sent nothing holds no buffer.
                    *buf = BytesMut::new();
                    Poll::Pending
                }
                read => read,
            }
        })
        .await
    }
}

impl ClientStream for twincache_tls::ServerStream<TcpStream> {
    async fn read_lazily(&mut self, buf: &mut BytesMut, room: usize) -> std::io::Result<usize> {
        if buf.len() == buf.capacity() {
            buf.reserve(room);
        }
        self.read_buf(buf).await
    }
}

/// Settings for client sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub idle_timeout: Duration,
    pub max_line: usize,
    pub max_frame: usize,
    /// Most bytes of one RESP command (all its arguments).
    pub max_command: usize,
    pub pipeline_depth: usize,
    /// Most bytes one connection may hold (buffered requests, replies waiting to be written).
    pub max_connection_buffer: usize,
    /// The client port (reported by INFO).
    pub port: u16,
}

/// What a session's requests need: shared by every request of the session.
#[derive(Clone)]
pub struct Ctx {
    pub router: Arc<Router>,
    /// Which connection to each worker carries this session's requests, and which account
    /// their large answers are charged to.
    pub origin: Origin,
    /// The session's id (CLIENT ID).
    pub id: usize,
    pub metrics: Arc<Metrics>,
    pub config: Arc<SessionConfig>,
    /// The process's budget for connection buffers.
    pub budget: Arc<Budget>,
    /// The users clients authenticate as.
    pub auth: Arc<Authenticator>,
    /// Who this session is (set by AUTH).
    pub who: Arc<Who>,
}

pub type BoxReply<O> = Pin<Box<dyn Future<Output = O> + Send>>;
pub type BoxStream<O> = Pin<Box<dyn Stream<Item = O> + Send>>;

/// What a protocol made of the bytes buffered so far.
pub enum Step<O> {
    /// Not a whole request yet.
    NeedMore,
    /// A request answered without the workers (ping, a parse error).
    Reply(O),
    /// A request for the workers, already queued to them (or gathered, to be queued by
    /// [`Protocol::flush`] before the session waits), and how many worker requests it made
    /// (its weight in the in-flight window).
    Dispatch(BoxReply<O>, usize),
    /// A reply in parts, each written as it comes (a large MGET). It queues its worker
    /// requests as it goes, so nothing after it is read until it is done (that keeps the
    /// order of requests).
    Stream(BoxStream<O>),
    /// A request whose outcome the requests after it depend on (AUTH: they run as the user
    /// it makes): nothing after it is read until it is answered.
    Settle(BoxReply<O>),
    /// Stop reading; send the reply if any, then everything in flight, then close.
    Close(Option<O>),
}

/// The part of a session that differs between protocols.
pub trait Protocol {
    type Out: Send + 'static;
    /// Which protocol this is, for the metrics.
    const PROTO: Proto;
    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Self::Out>;
    /// The command of the request the last [`Protocol::next`] returned, for the metrics.
    fn command(&self) -> Cmd;
    /// The error an answer carries, if it is one, for the metrics.
    fn error_of(out: &Self::Out) -> Option<ErrorCode>;
    /// Encodes `out` into `dst`: into its buffer, large values held (see [`Outgoing`]).
    fn encode(&mut self, out: Self::Out, dst: &mut Outgoing);
    /// Bytes `buf` lacks to hold the request being read, as far as its headers tell (0 when
    /// they do not): the session makes room for them at once rather than read by read.
    fn wanted(&self, _buf: &BytesMut) -> usize {
        0
    }
    /// Memory the request being read holds besides the buffer, charged with it.
    fn held(&self) -> usize {
        0
    }
    /// Memory the request [`Protocol::next`] last returned keeps while it runs besides its
    /// bytes (RESP: its arguments' handles).
    fn kept(&self) -> usize {
        0
    }
    /// What to answer when the client stops sending with bytes left in `buf`.
    fn at_eof(&mut self, buf: &BytesMut) -> Option<Self::Out>;
    /// Sends what [`Protocol::next`] gathered rather than sent (RESP's plain SETs): the
    /// session calls it when it stops reading, before it waits for any reply.
    fn flush(&mut self, _ctx: &Ctx) {}
}

/// Serves one client connection on a TLS port: the handshake (within the preamble deadline,
/// so a client that stalls in it is cut off), then [`serve`] inside the session. A client
/// speaking plaintext gets one line saying the port needs TLS, in the protocol its first
/// byte suggests, and is closed.
pub async fn serve_tls(
    stream: TcpStream,
    tls: Arc<NodeTls>,
    ctx: Ctx,
    shutdown: CancellationToken,
) {
    let deadline = Instant::now() + PREAMBLE_DEADLINE.min(ctx.config.idle_timeout);
    let accepted = tokio::select! {
        accepted = tls.accept_by(stream, deadline) => accepted,
        _ = shutdown.cancelled() => return,
    };
    match accepted {
        Accepted::Tls(session) => return serve(*session, ctx, shutdown).await,
        Accepted::Plaintext(mut plain) => refuse_plaintext(&mut plain).await,
        Accepted::Failed(e) => tracing::debug!(client = ctx.id, error = %e, "TLS handshake failed"),
        Accepted::TimedOut => tracing::debug!(client = ctx.id, "TLS handshake not done in time"),
    }
    ctx.metrics.closed(Closed::Tls);
}

/// Tells a plaintext client that this port speaks TLS only, in its own protocol as far as
/// its first byte tells (RESP's `*`, the binary preamble, else the text protocol), then
/// closes. Nothing it sent is executed.
async fn refuse_plaintext(stream: &mut TcpStream) {
    const WHY: &str = "this port requires TLS (connect with TLS, e.g. redis-cli --tls)";
    let mut first = [0u8; 1];
    let mut out = BytesMut::new();
    match stream.peek(&mut first).await {
        Ok(1) if first[0] == PREAMBLE[0] => {
            encode_frame(&Response::error(Status::NoAuth, WHY), &mut out)
        }
        Ok(1) if first[0] == b'*' => out.extend_from_slice(format!("-ERR {WHY}\r\n").as_bytes()),
        Ok(1) => text::encode_response(Status::NoAuth, WHY.as_bytes(), &mut out),
        _ => return,
    }
    if stream.write_all(&out).await.is_ok() {
        let _ = stream.shutdown().await;
        linger(stream).await;
    }
}

/// Serves one client connection until it closes, idles out, or shutdown: over plain TCP,
/// or inside a TLS session (each stream type compiles to its own copy of the loop, so plain
/// TCP pays nothing for TLS).
pub async fn serve<S>(mut stream: S, mut ctx: Ctx, shutdown: CancellationToken)
where
    S: ClientStream,
{
    let _counted = ctx.metrics.client_connected();
    let config = ctx.config.clone();
    let account = Account::new(&ctx.budget, config.max_connection_buffer);
    ctx.origin.account = Some(account.clone());
    // No memory until the client sends something (see `ClientStream`).
    let mut buf = BytesMut::new();
    let sniffed = tokio::select! {
        res = tokio::time::timeout(config.idle_timeout, sniff(&mut stream, &mut buf, config.max_line)) => res,
        _ = shutdown.cancelled() => return,
    };
    // Each protocol's loop is boxed: in place, its state would make every session's task that
    // large from the start, idle or not.
    let result = match sniffed {
        Ok(Ok(Kind::Binary)) => {
            let deadline = PREAMBLE_DEADLINE.min(config.idle_timeout);
            match tokio::time::timeout(deadline, read_preamble(&mut stream, &mut buf)).await {
                Ok(Ok(())) => {
                    let proto = BinaryProtocol {
                        codec: FrameCodec::new(config.max_frame),
                        cmd: Cmd::Other,
                        kept: 0,
                    };
                    Box::pin(run(proto, stream, buf, &ctx, &account, shutdown)).await
                }
                Ok(Err(e)) => {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        ctx.metrics.closed(Closed::ProtocolError);
                    }
                    Err(e)
                }
                Err(_) => {
                    // A partial preamble, then silence.
                    ctx.metrics.closed(Closed::Idle);
                    Ok(())
                }
            }
        }
        Ok(Ok(Kind::Resp)) => {
            let proto = RespProtocol::new(config.max_frame, config.max_command);
            Box::pin(run(proto, stream, buf, &ctx, &account, shutdown)).await
        }
        Ok(Ok(Kind::Text)) => {
            let proto = TextProtocol {
                lines: LineDecoder::new(config.max_line),
                cmd: Cmd::Other,
            };
            Box::pin(run(proto, stream, buf, &ctx, &account, shutdown)).await
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            // Idle before saying anything.
            ctx.metrics.closed(Closed::Idle);
            Ok(())
        }
    };
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::OutOfMemory => {
            ctx.metrics.closed(Closed::Memory);
            tracing::info!(client = ctx.id, "closing client connection: {e}")
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            ctx.metrics.closed(Closed::StoppedReading);
            tracing::debug!(client = ctx.id, "closing client connection: {e}")
        }
        Err(e) => tracing::debug!(error = %e, "client connection ended with an error"),
        Ok(()) => {}
    }
}

enum Kind {
    Binary,
    Resp,
    Text,
}

/// Reads until the protocol is known: one byte for binary and multibulk RESP, the first
/// line (bounded by `max_line`) otherwise.
async fn sniff<S: ClientStream>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_line: usize,
) -> std::io::Result<Kind> {
    loop {
        if let Some(&first) = buf.first() {
            if first == PREAMBLE[0] {
                return Ok(Kind::Binary);
            }
            if first == b'*' {
                return Ok(Kind::Resp);
            }
            if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                return Ok(if is_inline_command(&buf[..nl]) {
                    Kind::Resp
                } else {
                    Kind::Text
                });
            }
            if buf.len() > max_line {
                return Ok(Kind::Text);
            }
        }
        if stream.read_lazily(buf, START_CAPACITY).await? == 0 {
            // The text protocol answers a cut-off line (or nothing) at end of input.
            return Ok(Kind::Text);
        }
    }
}

async fn read_preamble<S>(stream: &mut S, buf: &mut BytesMut) -> std::io::Result<()>
where
    S: ClientStream,
{
    while buf.len() < PREAMBLE.len() {
        if stream.read_lazily(buf, START_CAPACITY).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    if buf[..PREAMBLE.len()] != PREAMBLE {
        let mut out = BytesMut::new();
        encode_frame(
            &Response::error(Status::ParseError, "unsupported binary protocol version"),
            &mut out,
        );
        stream.write_all(&out).await?;
        stream.flush().await?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad binary preamble",
        ));
    }
    let _ = buf.split_to(PREAMBLE.len());
    Ok(())
}

/// A request on its way: answered, waiting for the workers, or a reply in parts.
enum InFlight<O> {
    Ready(Option<O>),
    Waiting(BoxReply<O>),
    Streaming(BoxStream<O>),
}

/// What the metrics need of a request in flight: its command and when its bytes were read.
#[derive(Clone, Copy)]
struct Tag {
    cmd: Cmd,
    since: Instant,
}

/// Counts each request once its reply is written, with the clock reading the session takes
/// after every write anyway: the tags of a batch of replies wait in `written` (its capacity
/// is reused, so no allocation per request) until then. Off, and empty, without `--http`.
struct Recorder<'a> {
    enabled: bool,
    metrics: &'a Metrics,
    session: usize,
    proto: Proto,
    written: Vec<Tag>,
}

impl Recorder<'_> {
    fn done(&mut self, tag: Tag) {
        if self.enabled {
            self.written.push(tag);
        }
    }

    /// Counts the replies just written, at `now`.
    fn flush(&mut self, now: Instant) {
        for tag in self.written.drain(..) {
            let nanos = now.saturating_duration_since(tag.since).as_nanos() as u64;
            self.metrics
                .answered(self.session, self.proto, tag.cmd, nanos);
        }
    }
}

/// A request in the session's queue.
struct Item<O> {
    reply: InFlight<O>,
    /// Its weight in the window of requests in flight.
    weight: usize,
    /// Whether nothing after it may be read until it is done.
    barrier: bool,
    /// What the metrics count it as.
    tag: Tag,
    /// A large request's bytes, charged to the connection until its reply is taken.
    _charge: Option<Charge>,
}

/// The session's queue of replies in request order, with the weight of what is in flight.
struct Queue<O> {
    items: VecDeque<Item<O>>,
    weight: usize,
    /// Queued replies that nothing may be read past (streams, AUTH).
    barriers: usize,
}

impl<O> Queue<O> {
    fn new() -> Queue<O> {
        Queue {
            items: VecDeque::new(),
            weight: 0,
            barriers: 0,
        }
    }

    fn push(&mut self, item: InFlight<O>, weight: usize, tag: Tag) {
        self.push_item(item, weight, false, tag, None);
    }

    fn push_item(
        &mut self,
        reply: InFlight<O>,
        weight: usize,
        barrier: bool,
        tag: Tag,
        charge: Option<Charge>,
    ) {
        self.barriers += usize::from(barrier);
        self.weight += weight;
        self.items.push_back(Item {
            reply,
            weight,
            barrier,
            tag,
            _charge: charge,
        });
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn pop(&mut self, done: &mut Recorder) {
        if let Some(item) = self.items.pop_front() {
            self.weight -= item.weight;
            self.barriers -= usize::from(item.barrier);
            done.done(item.tag);
        }
    }

    /// The next reply (or part of one) at the head of the queue. Only the head is ever
    /// polled: its request and all later ones are already queued to the workers, so the
    /// others merely hold a reply that is waiting for its turn, and need no waker of their
    /// own.
    fn poll_head(&mut self, cx: &mut Context<'_>, done: &mut Recorder) -> Poll<O> {
        loop {
            let Some(head) = self.items.front_mut() else {
                return Poll::Pending;
            };
            match &mut head.reply {
                InFlight::Ready(out) => {
                    let out = out.take().expect("a ready reply is taken once");
                    self.pop(done);
                    return Poll::Ready(out);
                }
                InFlight::Waiting(fut) => {
                    let out = std::task::ready!(fut.as_mut().poll(cx));
                    self.pop(done);
                    return Poll::Ready(out);
                }
                InFlight::Streaming(parts) => match std::task::ready!(parts.as_mut().poll_next(cx))
                {
                    Some(out) => return Poll::Ready(out),
                    None => self.pop(done),
                },
            }
        }
    }

    /// The head's next reply if it is there now.
    fn now(&mut self, done: &mut Recorder) -> Option<O> {
        let waker = futures_util::task::noop_waker();
        match self.poll_head(&mut Context::from_waker(&waker), done) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        }
    }
}

async fn run<P: Protocol, S: ClientStream>(
    mut proto: P,
    mut stream: S,
    mut buf: BytesMut,
    ctx: &Ctx,
    account: &Arc<Account>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = &ctx.config;
    let mut inflight: Queue<P::Out> = Queue::new();
    // Replies are encoded here; like `buf`, it has memory only while the session is busy.
    let mut out = Outgoing::default();
    let (mut buf_held, mut out_held) = (0, 0);
    let mut reading = true;
    // Whether this side ends the connection (QUIT, a protocol error) while the client may
    // still be sending.
    let mut hung_up = false;
    // The idle deadline moves with activity, but the timer is only re-armed when it fires.
    let mut last_active = Instant::now();
    // When the bytes being parsed were read: the start of their requests' latency.
    let mut read_at = last_active;
    let mut recorder = Recorder {
        enabled: ctx.metrics.detailed(),
        metrics: &ctx.metrics,
        session: ctx.id,
        proto: P::PROTO,
        written: Vec::new(),
    };
    let idle = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle);
    // Made once and kept across turns: remade, its waiter would join the token's locked
    // list and leave it again on every turn. And polled again only once it woke the task
    // (`OnWake`): each poll of it takes that lock, twice a request at pipeline depth 1.
    let cancelled = OnWake::new(shutdown.cancelled());
    tokio::pin!(cancelled);
    let mut turns = 0u32;
    loop {
        turns = turns.wrapping_add(1);
        if reading && turns.is_multiple_of(SHUTDOWN_CHECK_EVERY) && shutdown.is_cancelled() {
            // (See the select's note: a flood may never let it poll shutdown.)
            reading = false;
        }
        let before = inflight.items.len();
        while reading && room(&inflight, config.pipeline_depth, ctx) && !account.busy(buf_held) {
            let buffered = buf.len();
            let step = proto.next(&mut buf, ctx);
            let tag = Tag {
                cmd: proto.command(),
                since: read_at,
            };
            // A large request keeps its bytes (and RESP its arguments' handles) until it is
            // answered: charged, so one client's pipeline of them has its limit too.
            let mut charge = || {
                let kept = buffered.saturating_sub(buf.len()) + proto.kept();
                (kept >= HOLD_MIN).then(|| {
                    // Out of the buffer's charge first, so the bytes are not counted twice.
                    account.track(&mut buf_held, buf.len() + proto.held());
                    account.charged(kept)
                })
            };
            // What waits for the workers, its weight, and whether it is a barrier.
            let (reply, weight, barrier) = match step {
                Step::NeedMore => break,
                Step::Reply(resp) => {
                    inflight.push(InFlight::Ready(Some(resp)), 0, tag);
                    continue;
                }
                Step::Dispatch(fut, weight) => (InFlight::Waiting(fut), weight, false),
                Step::Stream(parts) => (InFlight::Streaming(parts), 1, true),
                Step::Settle(fut) => (InFlight::Waiting(fut), 1, true),
                Step::Close(last) => {
                    if let Some(resp) = last {
                        inflight.push(InFlight::Ready(Some(resp)), 0, tag);
                    }
                    reading = false;
                    hung_up = true;
                    continue;
                }
            };
            let charge = charge();
            inflight.push_item(reply, weight, barrier, tag, charge);
        }
        if inflight.items.len() != before {
            // (Whatever it gathered has a reply queued.)
            proto.flush(ctx);
        }
        ctx.metrics
            .commands_processed(inflight.items.len().saturating_sub(before) as u64);
        if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
            buf = BytesMut::new();
        }
        // Bytes buffered (its growth stays near them, see `room_ahead`), and what the request
        // being read holds besides.
        account.track(&mut buf_held, buf.len() + proto.held());
        // A session already closing (say, on a command over the limit) first sends its
        // answer; its writes still watch the limit.
        if let Some(over) = account.over().filter(|_| reading) {
            return Err(over_limit(over));
        }
        if !reading && inflight.is_empty() {
            // Over TLS this sends close_notify, which a client that stopped reading could
            // hold up: bounded like every other write.
            tokio::time::timeout(config.idle_timeout, stream.shutdown())
                .await
                .ok();
            if hung_up {
                linger(&mut stream).await;
            }
            return Ok(());
        }
        let may_read = reading
            && room(&inflight, config.pipeline_depth, ctx)
            && !account.busy(buf_held)
            // With anything in flight (which will be answered and release its share), the
            // rest of a command is read only within the limit; once decoded, its argument
            // handles take twice the ranges counted now (`proto.held()`).
            && (buf.is_empty()
                || inflight.is_empty()
                || account.held() + proto.wanted(&buf) + proto.held() <= account.limit());
        if may_read {
            // Room for the rest of the argument being read, in few steps rather than read by
            // read, yet no faster than the bytes arrive (`room_ahead`): what a client
            // declares but does not send is no memory of ours.
            let wanted = proto.wanted(&buf);
            if wanted > buf.capacity() - buf.len() {
                buf.reserve(room_ahead(buf.len(), wanted));
            }
        }
        tokio::select! {
            // In this order, with no random draw per turn: answers first, then input (its
            // depth is bounded by the window), the limit, the idle timer, shutdown. A client
            // whose input never runs dry keeps the later branches from being polled (a
            // spent cooperative budget makes `select!` pend before it polls any branch), so
            // the limit is also checked above on every turn, and shutdown every
            // SHUTDOWN_CHECK_EVERY turns; a flooding client is not idle.
            biased;
            resp = std::future::poll_fn(|cx| inflight.poll_head(cx, &mut recorder)), if !inflight.is_empty() => {
                count_error::<P>(ctx, &resp);
                if out.capacity() == 0 {
                    out.buf().reserve(START_CAPACITY);
                }
                proto.encode(resp, &mut out);
                // Everything else already answered goes out in the same write.
                while let Some(resp) = inflight.now(&mut recorder) {
                    count_error::<P>(ctx, &resp);
                    proto.encode(resp, &mut out);
                    if out.len() >= KEEP_CAPACITY {
                        break; // a streaming reply: write as it comes
                    }
                }
                account.track(&mut out_held, out.capacity());
                write_out(&mut stream, &mut out, config.idle_timeout, account).await?;
                if out.capacity() > KEEP_CAPACITY {
                    out = Outgoing::default(); // grown by a burst: given back
                }
                // Emptied: the capacity kept for the next reply is not charged, as the input
                // buffer's is not (what a busy client holds is its bytes in use).
                account.track(&mut out_held, 0);
                last_active = Instant::now();
                recorder.flush(last_active);
                if idle.deadline() > last_active + 2 * TRIM_AFTER {
                    // The buffers are given back after a quiet second; the timer is moved
                    // once here, then by its own firing while the session stays busy.
                    idle.as_mut().reset(last_active + TRIM_AFTER);
                }
                if ctx.who.exhausted() {
                    tracing::info!(client = ctx.id, "closing a connection that failed to authenticate ten times");
                    return Ok(());
                }
            }
            n = stream.read_lazily(&mut buf, START_CAPACITY), if may_read => {
                if n? == 0 {
                    reading = false;
                    if let Some(resp) = proto.at_eof(&buf) {
                        let tag = Tag { cmd: Cmd::Other, since: read_at };
                        inflight.push(InFlight::Ready(Some(resp)), 0, tag);
                    }
                } else {
                    last_active = Instant::now();
                    read_at = last_active;
                }
            }
            _ = account.exceeded() => {}
            _ = &mut idle, if inflight.is_empty() || !may_read => {
                let now = Instant::now();
                let deadline = last_active + config.idle_timeout;
                if deadline <= now {
                    tracing::debug!("closing idle client connection");
                    ctx.metrics.closed(Closed::Idle);
                    return Ok(());
                }
                let quiet = last_active + TRIM_AFTER;
                // Only a session with nothing in flight or half read gives its buffers back;
                // any other is re-armed by its next reply.
                let trimmable = (buf.capacity() > 0 || out.capacity() > 0)
                    && inflight.is_empty()
                    && buf.is_empty();
                if trimmable && quiet <= now {
                    // Quiet for a while: an idle connection holds no buffer.
                    buf = BytesMut::new();
                    out = Outgoing::default();
                } else if trimmable {
                    idle.as_mut().reset(quiet.min(deadline));
                    continue;
                }
                idle.as_mut().reset(deadline);
            }
            // (Polled no more once it fired: nothing sets `reading` again.)
            _ = &mut cancelled, if reading => reading = false,
        }
    }
}

/// How many turns a session takes between looks at the shutdown token (a lock) besides
/// polling it in its select.
const SHUTDOWN_CHECK_EVERY: u32 = 64;

pin_project_lite::pin_project! {
    /// A future polled again only after it woke its task: for a future that is costly to poll
    /// and, once polled, wakes the task by itself when it is ready (the shutdown token's, whose
    /// every poll takes a lock), in a loop whose task other things wake far more often. The
    /// inner future gets a waker of its own, which records that it fired before it wakes the
    /// task; the task's waker is registered on every poll (an atomic exchange), so a task that
    /// moved to another waker is still woken.
    struct OnWake<F> {
        // In place, not boxed: a session holds it for its life.
        #[pin]
        inner: F,
        fired: Arc<Fired>,
        polled: bool,
    }
}

/// What [`OnWake`]'s waker does: notes that the inner future fired, and wakes the task.
struct Fired {
    set: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl futures_util::task::ArcWake for Fired {
    fn wake_by_ref(this: &Arc<Self>) {
        this.set.store(true, std::sync::atomic::Ordering::Release);
        this.task.wake();
    }
}

impl<F: Future> OnWake<F> {
    fn new(inner: F) -> OnWake<F> {
        let fired = Arc::new(Fired {
            set: std::sync::atomic::AtomicBool::new(false),
            task: futures_util::task::AtomicWaker::new(),
        });
        OnWake {
            inner,
            fired,
            polled: false,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.fired.task.register(cx.waker());
        // Taken before the poll: a wake that comes during or after it is seen next time.
        let fired = this
            .fired
            .set
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        if *this.polled && !fired {
            return Poll::Pending;
        }
        *this.polled = true;
        // A waker borrowing the `Fired`: a clone is taken only by a future that keeps it.
        let waker = futures_util::task::waker_ref(this.fired);
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

/// After answering and shutting down the sending side, reads and drops what the client still
/// sends (at most 64 MiB, for at most a second). Closing with unread input makes the kernel
/// reset the connection, and a reset can destroy the last answer (a protocol error's text)
/// before the client reads it.
async fn linger<S: AsyncRead + Unpin>(stream: &mut S) {
    // On the heap: an array here would be part of every session's future, idle or not.
    let mut sink = vec![0u8; 16 * 1024];
    let mut left = 64usize << 20;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Counts an answer that is an error. Only errors cost more than a compare.
#[inline]
fn count_error<P: Protocol>(ctx: &Ctx, out: &P::Out) {
    if !ctx.metrics.detailed() {
        return;
    }
    if let Some(code) = P::error_of(out) {
        ctx.metrics.error(P::PROTO, code);
    }
}

/// Whether the in-flight window has room for another request. One request is always let
/// in when nothing is in flight, however many keys it names, and nothing is read past a
/// streaming reply until it is done.
fn room<O>(inflight: &Queue<O>, depth: usize, ctx: &Ctx) -> bool {
    inflight.is_empty()
        || inflight.barriers == 0
            && inflight.weight < depth
            // While a worker connection is backed up, a session waits for what it has in
            // flight before it sends more (see `Router::backed_up`).
            && !ctx.router.backed_up()
}

/// The error that closes a connection over its memory limit.
fn over_limit(over: twincache_protocol::budget::Over) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::OutOfMemory, over.to_string())
}

/// Writes `out` to a client that must keep reading (a vectored write where it holds large
/// values), and clears it: no progress for `deadline` closes the connection, and so does
/// the account going over its limit meanwhile (replies pile up for a client that does not
/// read them). Then flushes: a no-op on TCP, while a TLS session may still hold the last
/// bytes of `out`.
async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Outgoing,
    deadline: Duration,
    account: &Account,
) -> std::io::Result<()> {
    let stalled = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client stopped reading its replies",
        )
    };
    while !out.is_empty() {
        // Mostly the socket takes it all at once: then no deadline is made (a clock reading)
        // and nothing else is polled.
        let written = match stream.write_buf(out).now_or_never() {
            Some(written) => written,
            None => tokio::select! {
                biased;
                written = tokio::time::timeout(deadline, stream.write_buf(out)) => {
                    written.map_err(|_| stalled())?
                }
                _ = account.exceeded() => {
                    match account.over() {
                        Some(over) => return Err(over_limit(over)),
                        None => continue,
                    }
                }
            },
        };
        if written? == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
    out.clear();
    match stream.flush().now_or_never() {
        Some(flushed) => flushed,
        None => tokio::time::timeout(deadline, stream.flush())
            .await
            .map_err(|_| stalled())?,
    }
}

/// `resp` as code 2 (key not found) when its value says the key does not exist.
fn not_found_if(resp: Response, missing: &[u8]) -> Response {
    if resp.status == Status::Ok && resp.payload == missing {
        Response::status(Status::NotFound)
    } else {
        resp
    }
}

fn dispatch(fut: impl Future<Output = Response> + Send + 'static) -> Step<Response> {
    Step::Dispatch(Box::pin(fut), 1)
}

/// The answer to a request this session may not make (text and binary protocols).
fn refuse(who: &Who, access: Access, name: &str) -> Option<Response> {
    if who.may(access) {
        return None;
    }
    Some(if who.authenticated() {
        Response {
            id: 0,
            status: Status::NoPerm,
            payload: Bytes::from(format!(
                "user {} has no permissions to run '{name}'",
                who.user()
            )),
        }
    } else {
        Response::error(
            Status::NoAuth,
            "authentication required: auth||<password> or auth||<user>||<password>",
        )
    })
}

fn denied_response(denied: Denied) -> Response {
    match denied {
        Denied::NoPasswordSet => Response::error(
            Status::NoAuth,
            "no password is set: authentication is not required",
        ),
        Denied::WrongPass | Denied::TooManyFailures => {
            Response::error(Status::NoAuth, "invalid username-password pair")
        }
    }
}

struct TextProtocol {
    lines: LineDecoder,
    cmd: Cmd,
}

impl Protocol for TextProtocol {
    type Out = Response;
    const PROTO: Proto = Proto::Text;

    fn command(&self) -> Cmd {
        self.cmd
    }

    fn error_of(out: &Response) -> Option<ErrorCode> {
        ErrorCode::of(out.status)
    }

    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Response> {
        self.cmd = Cmd::Other;
        let line = match self.lines.decode(buf) {
            None => return Step::NeedMore,
            Some(Line::TooLong) => {
                return Step::Reply(Response::error(Status::TooLarge, "line too long"))
            }
            Some(Line::Complete(line)) => line,
        };
        let (router, origin) = (&ctx.router, &ctx.origin);
        let parsed = text::parse_line(line);
        self.cmd = match &parsed {
            Ok(Command::Get(_)) => Cmd::Get,
            Ok(Command::Set(..) | Command::SetEx(..)) => Cmd::Set,
            Ok(Command::Del(_)) => Cmd::Del,
            Ok(Command::Ping) => Cmd::Ping,
            Ok(Command::Stats) => Cmd::Stats,
            Ok(Command::Status) => Cmd::Status,
            _ => Cmd::Other,
        };
        let command = match parsed {
            Err(e) => return Step::Reply(Response::error(e.status, e.message)),
            Ok(command) => command,
        };
        let (name, access) = match &command {
            Command::Get(_) => ("get", Access::Read),
            Command::Set(..) => ("set", Access::Write),
            Command::SetEx(..) => ("setex", Access::Write),
            Command::Del(_) => ("del", Access::Write),
            Command::IncrBy(..) => ("incrby", Access::Write),
            Command::Expire(..) => ("expire", Access::Write),
            Command::Ttl(_) => ("ttl", Access::Read),
            Command::Stats => ("stats", Access::Read),
            Command::Status => ("status", Access::Read),
            Command::Ping => ("ping", Access::Connection),
            Command::Auth(..) | Command::Exit => ("", Access::Anyone),
        };
        if let Some(refusal) = refuse(&ctx.who, access, name) {
            return Step::Reply(refusal);
        }
        match command {
            Command::Auth(user, password) => {
                let (auth, who) = (ctx.auth.clone(), ctx.who.clone());
                Step::Settle(Box::pin(async move {
                    let user = user.as_deref().and_then(|u| std::str::from_utf8(u).ok());
                    match auth.authenticate(&who, user, &password).await {
                        Ok(()) => Response::ok(Bytes::new()),
                        Err(denied) => denied_response(denied),
                    }
                }))
            }
            Command::Exit => Step::Close(None),
            Command::Ping => Step::Reply(Response::ok(Bytes::from_static(b"PONG"))),
            Command::Get(key) => dispatch(router.get(key, origin)),
            Command::Set(key, value) => {
                let mut req = Request::new(Op::Set, key);
                req.value = value;
                dispatch(router.write(req, origin))
            }
            Command::SetEx(key, secs, value) => {
                let mut req = Request::new(Op::Set, key);
                req.value = value;
                req.ttl_ms = secs * 1000;
                dispatch(router.write(req, origin))
            }
            Command::Del(key) => dispatch(router.write(Request::new(Op::Del, key), origin)),
            Command::IncrBy(key, n) => dispatch(commands::run_text(ctx, key, Action::IncrBy(n))),
            Command::Expire(key, secs) => match secs.checked_mul(1000) {
                Some(ms) => {
                    let set =
                        commands::run_text(ctx, key, Action::Expire(Ttl::In(ms), ExpireIf::Always));
                    // 0 means the key does not exist: no condition can fail here.
                    dispatch(async move { not_found_if(set.await, b"0") })
                }
                None => Step::Reply(Response::error(Status::ParseError, "seconds out of range")),
            },
            Command::Ttl(key) => {
                let ttl = commands::run_text(ctx, key, Action::ReadTtl(TtlForm::Seconds));
                dispatch(async move { not_found_if(ttl.await, b"-2") })
            }
            Command::Status => Step::Reply(Response::ok(router.status_line())),
            Command::Stats => {
                let router = router.clone();
                dispatch(async move { Response::ok(router.stats_line().await) })
            }
        }
    }

    fn encode(&mut self, resp: Response, out: &mut Outgoing) {
        let out = out.buf();
        if resp.status == Status::Ok && resp.payload.contains(&b'\n') {
            // A line cannot carry it; answering anyway would desynchronise the client.
            let msg = b"value contains a newline; read it with the binary protocol";
            text::encode_response(Status::ServerError, msg, out);
        } else {
            text::encode_response(resp.status, &resp.payload, out);
        }
    }

    fn at_eof(&mut self, buf: &BytesMut) -> Option<Response> {
        self.lines.has_partial(buf).then(|| {
            Response::error(
                Status::ParseError,
                "incomplete line at end of input (no newline); not executed",
            )
        })
    }
}

struct BinaryProtocol {
    codec: FrameCodec<Request>,
    cmd: Cmd,
    /// What the last request keeps besides its frame while it runs: a `command` op's copy
    /// of its value and its arguments' handles.
    kept: usize,
}

impl Protocol for BinaryProtocol {
    type Out = Response;
    const PROTO: Proto = Proto::Binary;

    fn command(&self) -> Cmd {
        self.cmd
    }

    fn error_of(out: &Response) -> Option<ErrorCode> {
        ErrorCode::of(out.status)
    }

    fn kept(&self) -> usize {
        self.kept
    }

    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Response> {
        self.cmd = Cmd::Other;
        self.kept = 0;
        let mut req = match self.codec.decode(buf) {
            Ok(None) => return Step::NeedMore,
            Ok(Some(req)) => req,
            Err(FrameError::TooLong { .. }) => {
                ctx.metrics.closed(Closed::ProtocolError);
                return Step::Close(Some(Response::status(Status::TooLarge)));
            }
            Err(_) => {
                ctx.metrics.closed(Closed::ProtocolError);
                return Step::Close(Some(Response::error(Status::ParseError, "malformed frame")));
            }
        };
        self.cmd = match req.op {
            Op::Get => Cmd::Get,
            Op::Set => Cmd::Set,
            Op::Del => Cmd::Del,
            Op::Exists => Cmd::Exists,
            Op::Ping => Cmd::Ping,
            Op::Stats => Cmd::Stats,
            _ => Cmd::Other,
        };
        let id = req.id;
        if req.key.is_empty() && req.op.has_key() {
            // The text protocol refuses empty keys too; RESP allows them, as Redis does.
            return Step::Reply(Response::error(Status::ParseError, "empty key").with_id(id));
        }
        let (name, access) = match req.op {
            Op::Get => ("get", Access::Read),
            Op::Exists => ("exists", Access::Read),
            Op::Stats => ("stats", Access::Read),
            Op::Set => ("set", Access::Write),
            Op::Del => ("del", Access::Write),
            Op::Ping => ("ping", Access::Connection),
            _ => ("", Access::Anyone),
        };
        if let Some(refusal) = refuse(&ctx.who, access, name) {
            return Step::Reply(refusal.with_id(id));
        }
        let routed = match req.op {
            Op::Auth => {
                let (auth, who) = (ctx.auth.clone(), ctx.who.clone());
                return Step::Settle(Box::pin(async move {
                    let user = std::str::from_utf8(&req.key).ok().filter(|u| !u.is_empty());
                    match auth.authenticate(&who, user, &req.value).await {
                        Ok(()) => Response::ok(Bytes::new()),
                        Err(denied) => denied_response(denied),
                    }
                    .with_id(id)
                }));
            }
            Op::Get | Op::Exists => Either::Left(ctx.router.read(req, &ctx.origin)),
            Op::Set | Op::Del => {
                req.version = 0; // the orchestrator stamps versions, not clients
                Either::Right(ctx.router.write(req, &ctx.origin))
            }
            Op::Ping => return Step::Reply(Response::ok(Bytes::from_static(b"PONG")).with_id(id)),
            Op::Command => return binary_command(&req, ctx, &mut self.kept),
            Op::Stats => {
                let router = ctx.router.clone();
                return dispatch(
                    async move { Response::ok(router.stats_line().await).with_id(id) },
                );
            }
            // Worker-to-worker and orchestrator-to-worker operations are not for clients.
            Op::Status
            | Op::Snapshot
            | Op::Resync
            | Op::Adopt
            | Op::Passthrough
            | Op::Invalidate
            | Op::PartnerMissed
            | Op::ClusterHello
            | Op::ClusterProof
            | Op::Apply
            | Op::Query
            | Op::Replicate
            | Op::Slots
            | Op::Map
            | Op::Batch
            | Op::Revoke
            | Op::Scan
            | Op::Flush
            | Op::Unknown(_) => {
                return Step::Reply(Response::status(Status::InvalidCommand).with_id(id))
            }
        };
        dispatch(async move { routed.await.with_id(id) })
    }

    fn encode(&mut self, resp: Response, out: &mut Outgoing) {
        let payload = encode_frame_head(&resp, out.buf());
        out.put(payload);
    }

    fn at_eof(&mut self, _buf: &BytesMut) -> Option<Response> {
        None
    }
}

/// The `command` op: any Redis command, RESP-encoded in the value, run from the command
/// table as the session's user; the answer is `Ok` with the RESP reply, errors included.
/// `kept`: what the decoded command holds while it runs (a copy of the value and a handle
/// per argument), charged to the connection as a RESP command's is; with the frame itself,
/// within its limit (half of it each).
fn binary_command(req: &Request, ctx: &Ctx, kept: &mut usize) -> Step<Response> {
    let id = req.id;
    let resp3 = req.flags & twincache_protocol::frame::flags::RESP3 != 0;
    let budget = ctx.config.max_connection_buffer / 2;
    let args = match crate::resp::decode_one(&req.value, ctx.config.max_frame, budget) {
        Ok(args) => {
            *kept = req.value.len() + args.len() * twincache_protocol::resp::ARG_HANDLE;
            args
        }
        Err(reply) => {
            let mut out = BytesMut::new();
            reply.encode(&mut out);
            return Step::Reply(Response::ok(out.freeze()).with_id(id));
        }
    };
    match commands::run_binary(args, resp3, ctx) {
        Step::Reply(r) => Step::Reply(r.with_id(id)),
        Step::Dispatch(fut, n) => Step::Dispatch(Box::pin(async move { fut.await.with_id(id) }), n),
        Step::Settle(fut) => Step::Settle(Box::pin(async move { fut.await.with_id(id) })),
        Step::Close(r) => Step::Close(r.map(|r| r.with_id(id))),
        Step::NeedMore => Step::NeedMore,
        Step::Stream(_) => Step::Reply(Response::status(Status::ServerError).with_id(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, F: Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A plain TCP session's input buffer gets memory only once input is there; then it is
    /// kept for the next request (the session gives it back after a quiet second).
    #[tokio::test]
    async fn an_idle_tcp_session_holds_no_input_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let wait = Duration::from_millis(50);
        let mut buf = BytesMut::new();
        let nothing = tokio::time::timeout(wait, server.read_lazily(&mut buf, 1024)).await;
        assert!(nothing.is_err(), "nothing was sent");
        assert_eq!(buf.capacity(), 0);
        client.write_all(b"ping\r\n").await.unwrap();
        let n = server.read_lazily(&mut buf, 1024).await.unwrap();
        assert_eq!(&buf[..n], b"ping\r\n");
        assert!(buf.capacity() >= 1024);
        buf.clear();
        let nothing = tokio::time::timeout(wait, server.read_lazily(&mut buf, 1024)).await;
        assert!(nothing.is_err(), "nothing more was sent");
        assert!(buf.capacity() >= 1024, "kept while the session is busy");
        drop(client);
        assert_eq!(server.read_lazily(&mut buf, 1024).await.unwrap(), 0);
    }

    /// The shutdown future in a session's select is polled again only after it woke the
    /// task, and is then ready: other wakes of the task do not poll it.
    #[test]
    fn a_future_on_wake_is_polled_after_it_woke_the_task() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl futures_util::task::ArcWake for Count {
            fn wake_by_ref(this: &Arc<Self>) {
                this.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(Default::default()));
        let waker = futures_util::task::waker(count.clone());
        let mut cx = Context::from_waker(&waker);
        let token = CancellationToken::new();
        let polls = std::sync::atomic::AtomicUsize::new(0);
        let mut cancelled = std::pin::pin!(token.cancelled());
        let inner = std::future::poll_fn(|cx| {
            polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            cancelled.as_mut().poll(cx)
        });
        let mut on_wake = std::pin::pin!(OnWake::new(inner));
        assert!(on_wake.as_mut().poll(&mut cx).is_pending());
        assert!(on_wake.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 1);
        token.cancel();
        assert_eq!(
            count.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the task was woken"
        );
        assert!(on_wake.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// What an idle connection costs before its first byte is mostly its task: the session
    /// future, whose size is that of its largest state (every local held across an await,
    /// including those of the futures it awaits in place).
    #[test]
    fn a_session_future_is_small() {
        // 808 bytes with Rust 1.95; the protocols' loops (about 1 KiB more) are boxed, and
        // the TLS session (6 KiB, most of it the handshake) is boxed by the accept loop.
        let plain = future_size(serve::<TcpStream>);
        assert!(
            plain <= 1024,
            "a plain TCP session's future takes {plain} bytes"
        );
    }
}
