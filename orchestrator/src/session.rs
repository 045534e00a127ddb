//! One client connection: sniff the protocol, then serve pipelined requests in order.
//!
//! The first byte decides the protocol: 0xB7 (the binary preamble) is the binary client
//! protocol, `*` is RESP. Otherwise the first line decides: an inline Redis command
//! (`GET a`, see [`crate::resp::is_inline_command`]) is RESP, anything else the text protocol.
//!
//! All three run the same loop. Requests are parsed as soon as they arrive and queued to the
//! workers at once, up to `pipeline_depth` in flight, so a pipelined burst costs one round
//! trip to the workers, not one per request. Replies are written in request order, batched
//! into one write when several are ready.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::{ready, Either, Ready};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use twincache_protocol::frame::{
    encode_frame, FrameCodec, FrameError, Op, Request, Response, PREAMBLE,
};
use twincache_protocol::text::{self, Command, Line, LineDecoder};
use twincache_protocol::Status;

use crate::cluster::Router;
use crate::metrics::Metrics;
use crate::resp::{is_inline_command, RespProtocol};

/// Settings for client sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub idle_timeout: Duration,
    pub max_line: usize,
    pub max_frame: usize,
    pub pipeline_depth: usize,
    /// The client port (reported by INFO).
    pub port: u16,
}

/// What a session's requests need: shared by every request of the session.
#[derive(Clone)]
pub struct Ctx {
    pub router: Arc<Router>,
    /// Which connection to each worker carries this session's requests (see `WorkerLink`);
    /// also the session's id.
    pub affinity: usize,
    pub metrics: Arc<Metrics>,
    pub config: Arc<SessionConfig>,
}

pub type BoxReply<O> = Pin<Box<dyn Future<Output = O> + Send>>;

/// What a protocol made of the bytes buffered so far.
pub enum Step<O> {
    /// Not a whole request yet.
    NeedMore,
    /// A request answered without the workers (ping, a parse error).
    Reply(O),
    /// A request for the workers, already queued to them.
    Dispatch(BoxReply<O>),
    /// Stop reading; send the reply if any, then everything in flight, then close.
    Close(Option<O>),
}

/// The part of a session that differs between protocols.
pub trait Protocol {
    type Out: Send + 'static;
    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Self::Out>;
    fn encode(&mut self, out: Self::Out, dst: &mut BytesMut);
    /// What to answer when the client stops sending with bytes left in `buf`.
    fn at_eof(&mut self, buf: &BytesMut) -> Option<Self::Out>;
}

/// Serves one client connection until it closes, idles out, or shutdown.
pub async fn serve(mut stream: TcpStream, ctx: Ctx, shutdown: CancellationToken) {
    let _counted = ctx.metrics.client_connected();
    let config = ctx.config.clone();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let sniffed = tokio::select! {
        res = tokio::time::timeout(config.idle_timeout, sniff(&mut stream, &mut buf, config.max_line)) => res,
        _ = shutdown.cancelled() => return,
    };
    let result = match sniffed {
        Ok(Ok(Kind::Binary)) => match read_preamble(&mut stream, &mut buf).await {
            Ok(()) => {
                let proto = BinaryProtocol {
                    codec: FrameCodec::new(config.max_frame),
                };
                run(proto, stream, buf, &ctx, shutdown).await
            }
            Err(e) => Err(e),
        },
        Ok(Ok(Kind::Resp)) => {
            run(
                // TODO(lead): query buffer limit flag
                RespProtocol::new(config.max_frame, config.max_frame.saturating_mul(4)),
                stream,
                buf,
                &ctx,
                shutdown,
            )
            .await
        }
        Ok(Ok(Kind::Text)) => {
            let proto = TextProtocol {
                lines: LineDecoder::new(config.max_line),
            };
            run(proto, stream, buf, &ctx, shutdown).await
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(()), // idle before saying anything
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

enum Kind {
    Binary,
    Resp,
    Text,
}

/// Reads until the protocol is known: one byte for binary and multibulk RESP, the first
/// line (bounded by `max_line`) otherwise.
async fn sniff(
    stream: &mut TcpStream,
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
        if stream.read_buf(buf).await? == 0 {
            // The text protocol answers a cut-off line (or nothing) at end of input.
            return Ok(Kind::Text);
        }
    }
}

async fn read_preamble(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<()> {
    while buf.len() < PREAMBLE.len() {
        if stream.read_buf(buf).await? == 0 {
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
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad binary preamble",
        ));
    }
    let _ = buf.split_to(PREAMBLE.len());
    Ok(())
}

async fn run<P: Protocol>(
    mut proto: P,
    mut stream: TcpStream,
    mut buf: BytesMut,
    ctx: &Ctx,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = &ctx.config;
    // Replies in request order. Only the head is ever polled: its request and all later ones
    // are already queued to the workers, so the others merely hold a reply that is waiting
    // for its turn, and need no waker of their own.
    let mut inflight: VecDeque<InFlight<P::Out>> = VecDeque::new();
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut reading = true;
    // The idle deadline moves with activity, but the timer is only re-armed when it fires.
    let mut last_active = Instant::now();
    let idle = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle);
    loop {
        let before = inflight.len();
        while reading && inflight.len() < config.pipeline_depth {
            match proto.next(&mut buf, ctx) {
                Step::NeedMore => break,
                Step::Reply(resp) => inflight.push_back(Either::Left(ready(resp))),
                Step::Dispatch(fut) => inflight.push_back(Either::Right(fut)),
                Step::Close(last) => {
                    if let Some(resp) = last {
                        inflight.push_back(Either::Left(ready(resp)));
                    }
                    reading = false;
                }
            }
        }
        ctx.metrics
            .commands_processed(inflight.len().saturating_sub(before) as u64);
        if !reading && inflight.is_empty() {
            stream.shutdown().await.ok();
            return Ok(());
        }
        tokio::select! {
            resp = next_reply(&mut inflight), if !inflight.is_empty() => {
                proto.encode(resp, &mut out);
                // Everything else already answered goes out in the same write.
                while let Some(resp) = inflight.front_mut().and_then(|f| f.now_or_never()) {
                    inflight.pop_front();
                    proto.encode(resp, &mut out);
                }
                stream.write_all(&out).await?;
                out.clear();
                last_active = Instant::now();
            }
            n = stream.read_buf(&mut buf), if reading && inflight.len() < config.pipeline_depth => {
                if n? == 0 {
                    reading = false;
                    if let Some(resp) = proto.at_eof(&buf) {
                        inflight.push_back(Either::Left(ready(resp)));
                    }
                } else {
                    last_active = Instant::now();
                }
            }
            _ = &mut idle, if inflight.is_empty() => {
                let deadline = last_active + config.idle_timeout;
                if deadline <= Instant::now() {
                    tracing::debug!("closing idle client connection");
                    return Ok(());
                }
                idle.as_mut().reset(deadline);
            }
            _ = shutdown.cancelled(), if reading => reading = false,
        }
    }
}

type InFlight<O> = Either<Ready<O>, BoxReply<O>>;

/// The reply at the head of the queue, once it is ready.
async fn next_reply<O>(inflight: &mut VecDeque<InFlight<O>>) -> O {
    std::future::poll_fn(|cx| {
        let head = inflight.front_mut().expect("polled with replies in flight");
        let out = std::task::ready!(Pin::new(head).poll(cx));
        inflight.pop_front();
        std::task::Poll::Ready(out)
    })
    .await
}

fn dispatch(fut: impl Future<Output = Response> + Send + 'static) -> Step<Response> {
    Step::Dispatch(Box::pin(fut))
}

struct TextProtocol {
    lines: LineDecoder,
}

impl Protocol for TextProtocol {
    type Out = Response;

    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Response> {
        let line = match self.lines.decode(buf) {
            None => return Step::NeedMore,
            Some(Line::TooLong) => {
                return Step::Reply(Response::error(Status::TooLarge, "line too long"))
            }
            Some(Line::Complete(line)) => line,
        };
        let (router, affinity) = (&ctx.router, ctx.affinity);
        match text::parse_line(line) {
            Err(e) => Step::Reply(Response::error(e.status, e.message)),
            Ok(Command::Exit) => Step::Close(None),
            Ok(Command::Ping) => Step::Reply(Response::ok(Bytes::from_static(b"PONG"))),
            Ok(Command::Get(key)) => dispatch(router.get(key, affinity)),
            Ok(Command::Set(key, value)) => {
                let mut req = Request::new(Op::Set, key);
                req.value = value;
                dispatch(router.write(req, affinity))
            }
            Ok(Command::SetEx(key, secs, value)) => {
                let mut req = Request::new(Op::Set, key);
                req.value = value;
                req.ttl_ms = secs * 1000;
                dispatch(router.write(req, affinity))
            }
            Ok(Command::Del(key)) => dispatch(router.write(Request::new(Op::Del, key), affinity)),
            Ok(Command::Status) => Step::Reply(Response::ok(router.status_line())),
            Ok(Command::Stats) => {
                let router = router.clone();
                dispatch(async move { Response::ok(router.stats_line().await) })
            }
        }
    }

    fn encode(&mut self, resp: Response, out: &mut BytesMut) {
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
}

impl Protocol for BinaryProtocol {
    type Out = Response;

    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Response> {
        let mut req = match self.codec.decode(buf) {
            Ok(None) => return Step::NeedMore,
            Ok(Some(req)) => req,
            Err(FrameError::TooLong { .. }) => {
                return Step::Close(Some(Response::status(Status::TooLarge)))
            }
            Err(_) => {
                return Step::Close(Some(Response::error(Status::ParseError, "malformed frame")))
            }
        };
        let id = req.id;
        if req.key.is_empty() && req.op.has_key() {
            // The text protocol refuses empty keys too; RESP allows them, as Redis does.
            return Step::Reply(Response::error(Status::ParseError, "empty key").with_id(id));
        }
        let routed = match req.op {
            Op::Get | Op::Exists => Either::Left(ctx.router.read(req, ctx.affinity)),
            Op::Set | Op::Del => {
                req.version = 0; // the orchestrator stamps versions, not clients
                Either::Right(ctx.router.write(req, ctx.affinity))
            }
            Op::Ping => return Step::Reply(Response::ok(Bytes::from_static(b"PONG")).with_id(id)),
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
            | Op::Unknown(_) => {
                return Step::Reply(Response::status(Status::InvalidCommand).with_id(id))
            }
        };
        dispatch(async move { routed.await.with_id(id) })
    }

    fn encode(&mut self, resp: Response, out: &mut BytesMut) {
        encode_frame(&resp, out);
    }

    fn at_eof(&mut self, _buf: &BytesMut) -> Option<Response> {
        None
    }
}
