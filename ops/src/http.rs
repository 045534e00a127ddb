//! A bounded HTTP/1.1 server for an axum router: the worker's and the orchestrator's
//! `--http` port.
//!
//! hyper parses; this module only bounds what a connection may cost, since the port may face
//! anything a load balancer or a browser sends:
//!
//! - **connections**: at most [`HttpLimits::max_connections`] at once (the shared accept
//!   loop closes the rest on arrival);
//! - **headers**: a request's head must arrive within [`HttpLimits::header_timeout`], which
//!   also closes a keep-alive connection idle that long (hyper starts the clock when it
//!   waits for a head), and at most 64 KiB of it is buffered;
//! - **progress**: a connection that neither reads nor writes a byte for
//!   [`HttpLimits::stall_timeout`] while a request is under way (a body sent a byte a
//!   minute, a response the client does not read) is closed;
//! - **handlers**: every request is answered within [`HttpLimits::request_timeout`] (503
//!   otherwise); body sizes are the handlers' to limit (`DefaultBodyLimit`).
//!
//! Shutdown stops accepting, lets requests in flight finish (up to the grace period), and
//! closes idle keep-alive connections at once.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What one HTTP port may cost.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub stall_timeout: Duration,
    pub request_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(5),
        }
    }
}

/// Binds `--http` if it was given; the error names the flag.
pub async fn bind(addr: Option<std::net::SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|e| std::io::Error::new(e.kind(), format!("--http {addr}: {e}"))),
        None => Ok(None),
    }
}

/// Most bytes of a request head hyper buffers.
const MAX_HEAD: usize = 64 * 1024;

/// Serves `app` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    serve_with_state(listener, app, limits, shutdown, || ()).await
}

/// [`serve`], with a value made by `per_connection` for each connection, which its requests
/// find as an `axum::Extension` (the orchestrator counts a connection's failed logins in it,
/// as a session does).
pub async fn serve_with_state<E: Clone + Send + Sync + 'static>(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    per_connection: impl Fn() -> E + Send + 'static,
) {
    let timeout = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| answer_within(timeout, req, next),
    ));
    twincache_protocol::server::accept_loop(
        listener,
        twincache_protocol::server::Slots::new(limits.max_connections),
        shutdown,
        limits.grace,
        move |stream, slot, shutdown| {
            let app = app.clone().layer(axum::Extension(per_connection()));
            let conn = serve_connection(stream, app, limits, shutdown);
            async move {
                let _slot = slot;
                conn.await
            }
        },
    )
    .await;
}

/// Runs the handler with a deadline: a request that cannot be answered in time (a worker
/// call that hangs past every other bound, a body that trickles in) gets 503.
async fn answer_within(timeout: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the request took too long; retry\n",
        )
            .into_response(),
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let progress = Arc::new(Progress::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        progress: progress.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD);
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut check = tokio::time::interval(limits.stall_timeout / 4);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                // Finishes the request in flight, if any, then closes; the accept loop
                // bounds how long that may take.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = check.tick() => {
                if progress.idle_for() > limits.stall_timeout {
                    tracing::debug!("closing a stalled http connection");
                    return;
                }
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since it opened.
struct Progress {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.opened.elapsed().as_millis() as u64, Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.opened
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed)))
    }
}

/// A stream that notes every read and write that moved bytes.
struct Watched {
    inner: TcpStream,
    progress: Arc<Progress>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.touch();
        }
        res
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.touch();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `GET /health`: the process is up and serving HTTP.
pub async fn health() -> &'static str {
    "ok\n"
}

/// A `/metrics` answer: OpenMetrics for a client that asks for it (Prometheus does), else
/// the classic text format, which every other tool reads.
pub fn metrics_response(headers: &axum::http::HeaderMap, open_metrics: String) -> Response {
    use crate::metrics::{to_classic_text, wants_open_metrics, CONTENT_TYPE, CONTENT_TYPE_TEXT};
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (kind, body) = if wants_open_metrics(accept) {
        (CONTENT_TYPE, open_metrics)
    } else {
        (CONTENT_TYPE_TEXT, to_classic_text(&open_metrics))
    };
    ([(axum::http::header::CONTENT_TYPE, kind)], body).into_response()
}
