//! The accept loop shared by the worker and the orchestrator.
//!
//! Each connection is its own task. Semaphores cap how many run at once (a client past the
//! cap is closed at once rather than left queued in the kernel), and a `TaskTracker` lets
//! shutdown wait for in-flight connections to finish what they were doing.
//!
//! A server that authenticates its peers first ([`Slots::with_pending`]) admits new
//! connections into a small allowance of their own, and moves each into the main pool only
//! once it has authenticated ([`Slot::promote`]). Whoever can reach the port but not
//! authenticate can then fill only that allowance, never the slots the cluster's own links
//! need.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The connection slots of a server.
#[derive(Debug, Clone)]
pub struct Slots {
    main: Arc<Semaphore>,
    /// Connections not yet authenticated, if the server authenticates its peers.
    pending: Option<Arc<Semaphore>>,
    max: usize,
    /// Connections closed on arrival because every slot was taken (for metrics).
    refused: Arc<AtomicU64>,
}

impl Slots {
    /// `max` connections, admitted straight into the main pool.
    pub fn new(max: usize) -> Slots {
        Slots {
            main: Arc::new(Semaphore::new(max)),
            pending: None,
            max,
            refused: Arc::default(),
        }
    }

    /// Counts refused connections into `refused` (a metric the caller reads).
    pub fn counting_refusals(mut self, refused: Arc<AtomicU64>) -> Slots {
        self.refused = refused;
        self
    }

    /// `max` authenticated connections, and `pending` more that have not authenticated yet.
    pub fn with_pending(max: usize, pending: usize) -> Slots {
        Slots {
            pending: Some(Arc::new(Semaphore::new(pending))),
            ..Slots::new(max)
        }
    }

    fn admit(&self) -> Option<Slot> {
        let (pool, promoted) = match &self.pending {
            Some(pending) => (pending, false),
            None => (&self.main, true),
        };
        let permit = pool.clone().try_acquire_owned().ok()?;
        Some(Slot {
            permit,
            main: self.main.clone(),
            promoted,
        })
    }
}

/// One connection's place in a server's [`Slots`]; released when dropped.
#[derive(Debug)]
pub struct Slot {
    permit: OwnedSemaphorePermit,
    main: Arc<Semaphore>,
    promoted: bool,
}

impl Slot {
    /// Moves an authenticated connection into the main pool; false if that pool is full.
    pub fn promote(&mut self) -> bool {
        if self.promoted {
            return true;
        }
        match self.main.clone().try_acquire_owned() {
            Ok(permit) => {
                self.permit = permit;
                self.promoted = true;
                true
            }
            Err(_) => false,
        }
    }
}

/// Accepts connections on `listener` until `shutdown` is cancelled, running `handle` for each
/// in its own task, as many as `slots` admit. Then waits up to `grace` for the running
/// connections, which see the same `shutdown` token, to finish.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    slots: Slots,
    shutdown: CancellationToken,
    grace: Duration,
    mut handle: H,
) where
    H: FnMut(TcpStream, Slot, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
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
        let Some(slot) = slots.admit() else {
            slots.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max_conns = slots.max, "connection limit reached; closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(handle(stream, slot, shutdown.clone()));
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            "shutdown grace period over; dropping connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_connections_have_their_own_allowance() {
        let slots = Slots::with_pending(1, 2);
        let mut a = slots.admit().unwrap();
        let mut b = slots.admit().unwrap();
        assert!(slots.admit().is_none(), "the allowance is full");
        assert!(a.promote());
        assert!(!b.promote(), "the main pool is full");
        drop(b);
        assert!(slots.admit().is_some());
        let plain = Slots::new(1);
        let mut c = plain.admit().unwrap();
        assert!(c.promote());
        assert!(plain.admit().is_none());
    }
}
