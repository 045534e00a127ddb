//! A multiplexed frame connection: many requests in flight on one TCP connection.
//!
//! Modelled on redis-rs's multiplexed connection. Callers hand a request and a oneshot to a
//! writer task over a channel; the writer numbers the request, records the oneshot in
//! the pending map and writes, batching whatever else is queued into the same syscall. A
//! reader task matches responses to pending requests by id, so responses may arrive in any
//! order. Reading and writing are separate tasks so that a peer blocked on writing responses
//! can never deadlock against us blocked on writing requests.
//!
//! [`Connection::send`] enqueues synchronously, before the caller awaits anything, so the
//! requests of one caller reach the peer in the order it sent them: a pipelined `set` then
//! `get` of one key on one connection is executed in that order. The channel is therefore
//! unbounded; what bounds it is the callers, each of which holds the reply future of every
//! request it queued (the orchestrator caps in-flight requests per client and clients).
//!
//! When the connection dies every pending request fails at once with
//! [`Error::ConnectionClosed`]; nothing waits for a timeout that is bound to come.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use twincache_protocol::frame::{encode_frame, FrameCodec, Request, Response, PREAMBLE};

use crate::Error;

type ReplyTx = oneshot::Sender<Result<Response, Error>>;

/// The writer flushes after this many bytes even if more requests are queued.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// How often the reader forgets requests whose callers gave up (timed out).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

struct Pending {
    map: HashMap<u64, ReplyTx>,
    /// Set (under the same lock) when the connection dies, so a request registered after the
    /// failure sweep fails at once instead of waiting forever.
    closed: bool,
}

/// A cloneable handle to one multiplexed connection. Cheap to clone; all clones share the
/// connection. It closes when every handle is dropped or the peer goes away.
#[derive(Clone)]
pub struct Connection {
    tx: mpsc::UnboundedSender<(Request, ReplyTx)>,
    closed: CancellationToken,
}

impl Connection {
    /// Connects to `addr`, sends the protocol preamble and starts the connection's tasks.
    pub async fn connect(addr: &str, max_frame: usize) -> Result<Connection, Error> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&PREAMBLE).await?;
        Ok(Connection::start(stream, max_frame))
    }

    /// Runs the connection over an already-open stream (preamble already sent).
    pub fn start(stream: TcpStream, max_frame: usize) -> Connection {
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = CancellationToken::new();
        let pending = Arc::new(Mutex::new(Pending {
            map: HashMap::new(),
            closed: false,
        }));
        tokio::spawn(write_loop(wr, rx, pending.clone(), closed.clone()));
        tokio::spawn(read_loop(
            FramedRead::new(rd, FrameCodec::<Response>::new(max_frame)),
            pending,
            closed.clone(),
        ));
        Connection { tx, closed }
    }

    /// Queues `req` now (its id is assigned by the writer) and returns the future of its
    /// response. The future has no timeout: wrap it in one (as [`crate::Client`] does).
    /// Dropping it abandons the request.
    pub fn send(&self, req: Request) -> Reply {
        let (reply_tx, reply_rx) = oneshot::channel();
        // If the writer is gone, reply_tx is dropped with the message and the Reply
        // resolves to ConnectionClosed.
        let _ = self.tx.send((req, reply_tx));
        Reply(reply_rx)
    }

    /// Sends `req` and waits for its response (see [`Connection::send`]).
    pub async fn call(&self, req: Request) -> Result<Response, Error> {
        self.send(req).await
    }

    /// Whether the connection has died (it never comes back; make a new one).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Completes when the connection dies.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Closes the connection; pending requests fail with [`Error::ConnectionClosed`].
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// The response to one request sent with [`Connection::send`].
#[must_use = "a reply does nothing unless awaited"]
pub struct Reply(oneshot::Receiver<Result<Response, Error>>);

impl Future for Reply {
    type Output = Result<Response, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::ConnectionClosed)))
    }
}

/// Fails every pending request and marks the connection closed.
fn fail_all(pending: &Mutex<Pending>, closed: &CancellationToken) {
    closed.cancel();
    let drained: Vec<ReplyTx> = {
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        p.closed = true;
        p.map.drain().map(|(_, tx)| tx).collect()
    };
    for tx in drained {
        let _ = tx.send(Err(Error::ConnectionClosed));
    }
}

async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Request, ReplyTx)>,
    pending: Arc<Mutex<Pending>>,
    closed: CancellationToken,
) {
    let mut next_id: u64 = 1;
    let mut buf = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    loop {
        let first = tokio::select! {
            item = rx.recv() => item,
            _ = closed.cancelled() => None,
        };
        let Some(mut item) = first else { break };
        // Take everything already queued, so a burst of requests costs one syscall.
        loop {
            let (mut req, reply) = item;
            req.id = next_id;
            next_id = next_id.wrapping_add(1);
            {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                if p.closed {
                    drop(p);
                    let _ = reply.send(Err(Error::ConnectionClosed));
                } else {
                    p.map.insert(req.id, reply);
                    drop(p);
                    encode_frame(&req, &mut buf);
                }
            }
            if buf.len() >= WRITE_BATCH_BYTES {
                break;
            }
            match rx.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = wr.write_all(&buf).await {
            tracing::debug!(error = %e, "connection write failed");
            break;
        }
        buf.clear();
    }
    fail_all(&pending, &closed);
    // Requests still queued in the channel fail as the receiver is dropped here.
}

async fn read_loop(
    mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec<Response>>,
    pending: Arc<Mutex<Pending>>,
    closed: CancellationToken,
) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(resp)) => {
                    let tx = pending.lock().unwrap_or_else(|e| e.into_inner()).map.remove(&resp.id);
                    if let Some(tx) = tx {
                        let _ = tx.send(Ok(resp));
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection read failed");
                    break;
                }
                None => break,
            },
            _ = sweep.tick() => {
                pending.lock().unwrap_or_else(|e| e.into_inner()).map.retain(|_, tx| !tx.is_closed());
            }
            _ = closed.cancelled() => break,
        }
    }
    fail_all(&pending, &closed);
}
