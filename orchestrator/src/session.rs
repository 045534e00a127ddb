//! One client connection: sniff the protocol, then serve pipelined requests in order.
//!
//! The first byte decides the protocol: 0xB7 (the binary preamble) is the binary client
//! protocol, anything else is a text line. (RESP, first byte `*`, is the next protocol to
//! join them on this port.)
//!
//! Both protocols run the same loop. Requests are parsed as soon as they arrive and their
//! worker calls start at once, up to `pipeline_depth` in flight, so a pipelined burst costs
//! one round trip to the workers, not one per request. Responses are written in request
//! order, batched into one write when several are ready.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::{ready, Either, Ready};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
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

/// Settings for client sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub idle_timeout: Duration,
    pub max_line: usize,
    pub max_frame: usize,
    pub pipeline_depth: usize,
}

type RouterFuture = Pin<Box<dyn Future<Output = Response> + Send>>;
type InFlight = Either<Ready<Response>, RouterFuture>;

/// What a protocol made of the bytes buffered so far.
enum Step {
    /// Not a whole request yet.
    NeedMore,
    /// A request answered without the workers (ping, a parse error).
    Reply(Response),
    /// A request for the workers.
    Dispatch(RouterFuture),
    /// Stop reading; send the reply if any, then everything in flight, then close.
    Close(Option<Response>),
}

/// The part of a session that differs between protocols.
trait Protocol {
    fn next(&mut self, buf: &mut BytesMut, router: &Arc<Router>, affinity: usize) -> Step;
    fn encode(&mut self, resp: Response, out: &mut BytesMut);
    /// What to answer when the client stops sending with bytes left in `buf`.
    fn at_eof(&mut self, buf: &BytesMut) -> Option<Response>;
}

/// Serves one client connection until it closes, idles out, or shutdown. `affinity` picks
/// which connection to each worker carries this session's requests (see `WorkerLink`).
pub async fn serve(
    mut stream: TcpStream,
    affinity: usize,
    router: Arc<Router>,
    config: Arc<SessionConfig>,
    shutdown: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // Sniff: wait for the first byte, within the idle timeout.
    let first = tokio::select! {
        res = tokio::time::timeout(config.idle_timeout, stream.read_buf(&mut buf)) => res,
        _ = shutdown.cancelled() => return,
    };
    if !matches!(first, Ok(Ok(n)) if n > 0) {
        return;
    }
    let result = if buf[0] == PREAMBLE[0] {
        match read_preamble(&mut stream, &mut buf).await {
            Ok(()) => {
                let proto = BinaryProtocol {
                    codec: FrameCodec::new(config.max_frame),
                };
                run(proto, stream, buf, router, affinity, &config, shutdown).await
            }
            Err(e) => Err(e),
        }
    } else {
        let proto = TextProtocol {
            lines: LineDecoder::new(config.max_line),
        };
        run(proto, stream, buf, router, affinity, &config, shutdown).await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
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
    router: Arc<Router>,
    affinity: usize,
    config: &SessionConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut inflight: FuturesOrdered<InFlight> = FuturesOrdered::new();
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut reading = true;
    let idle = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle);
    loop {
        while reading && inflight.len() < config.pipeline_depth {
            match proto.next(&mut buf, &router, affinity) {
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
        if !reading && inflight.is_empty() {
            stream.shutdown().await.ok();
            return Ok(());
        }
        tokio::select! {
            Some(resp) = inflight.next(), if !inflight.is_empty() => {
                proto.encode(resp, &mut out);
                // Everything else already answered goes out in the same write.
                while let Some(Some(resp)) = inflight.next().now_or_never() {
                    proto.encode(resp, &mut out);
                }
                stream.write_all(&out).await?;
                out.clear();
                idle.as_mut().reset(Instant::now() + config.idle_timeout);
            }
            n = stream.read_buf(&mut buf), if reading && inflight.len() < config.pipeline_depth => {
                if n? == 0 {
                    reading = false;
                    if let Some(resp) = proto.at_eof(&buf) {
                        inflight.push_back(Either::Left(ready(resp)));
                    }
                } else {
                    idle.as_mut().reset(Instant::now() + config.idle_timeout);
                }
            }
            _ = &mut idle, if inflight.is_empty() => {
                tracing::debug!("closing idle client connection");
                return Ok(());
            }
            _ = shutdown.cancelled(), if reading => reading = false,
        }
    }
}

fn dispatch(fut: impl Future<Output = Response> + Send + 'static) -> Step {
    Step::Dispatch(Box::pin(fut))
}

struct TextProtocol {
    lines: LineDecoder,
}

impl Protocol for TextProtocol {
    fn next(&mut self, buf: &mut BytesMut, router: &Arc<Router>, affinity: usize) -> Step {
        let line = match self.lines.decode(buf) {
            None => return Step::NeedMore,
            Some(Line::TooLong) => {
                return Step::Reply(Response::error(Status::TooLarge, "line too long"))
            }
            Some(Line::Complete(line)) => line,
        };
        match text::parse_line(line) {
            Err(e) => Step::Reply(Response::error(e.status, e.message)),
            Ok(Command::Exit) => Step::Close(None),
            Ok(Command::Ping) => Step::Reply(Response::ok(Bytes::from_static(b"PONG"))),
            Ok(Command::Get(key)) => dispatch(router.get(key, affinity)),
            Ok(Command::Set(key, value)) => dispatch(router.set(key, value, 0, affinity)),
            Ok(Command::Del(key)) => dispatch(router.del(key, affinity)),
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

fn with_id(fut: impl Future<Output = Response> + Send + 'static, id: u64) -> Step {
    dispatch(async move { fut.await.with_id(id) })
}

struct BinaryProtocol {
    codec: FrameCodec<Request>,
}

impl Protocol for BinaryProtocol {
    fn next(&mut self, buf: &mut BytesMut, router: &Arc<Router>, affinity: usize) -> Step {
        let req = match self.codec.decode(buf) {
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
        if req.key.is_empty() && matches!(req.op, Op::Get | Op::Set | Op::Del) {
            return Step::Reply(Response::error(Status::ParseError, "empty key").with_id(id));
        }
        match req.op {
            Op::Get => with_id(router.get(req.key, affinity), id),
            Op::Set => with_id(router.set(req.key, req.value, req.ttl_ms, affinity), id),
            Op::Del => with_id(router.del(req.key, affinity), id),
            Op::Ping => Step::Reply(Response::ok(Bytes::from_static(b"PONG")).with_id(id)),
            Op::Unknown(_) => Step::Reply(Response::status(Status::InvalidCommand).with_id(id)),
        }
    }

    fn encode(&mut self, resp: Response, out: &mut BytesMut) {
        encode_frame(&resp, out);
    }

    fn at_eof(&mut self, _buf: &BytesMut) -> Option<Response> {
        None
    }
}
