//! The accept loop shared by the worker and the orchestrator.
//!
//! Each connection is its own task. A semaphore caps how many run at once (a client past the
//! cap is closed at once rather than left queued in the kernel), and a `TaskTracker` lets
//! shutdown wait for in-flight connections to finish what they were doing.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts connections on `listener` until `shutdown` is cancelled, running `handle` for each
/// in its own task, at most `max_conns` at once. Then waits up to `grace` for the running
/// connections, which see the same `shutdown` token, to finish.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    max_conns: usize,
    shutdown: CancellationToken,
    grace: Duration,
    handle: H,
) where
    H: FnMut(TcpStream, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let refused = AtomicU64::new(0);
    accept_loop_counting(listener, max_conns, &refused, shutdown, grace, handle).await
}

/// [`accept_loop`], adding to `refused` each connection closed on arrival because
/// `max_conns` were open (for metrics).
pub async fn accept_loop_counting<H, F>(
    listener: TcpListener,
    max_conns: usize,
    refused: &AtomicU64,
    shutdown: CancellationToken,
    grace: Duration,
    mut handle: H,
) where
    H: FnMut(TcpStream, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_conns));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max_conns, "connection limit reached; closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = handle(stream, shutdown.clone());
        tracker.spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            "shutdown grace period over; dropping connections"
        );
    }
}
