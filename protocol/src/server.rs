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
//! need. A new connection that finds the allowance full closes the oldest one still in it
//! rather than being refused: an outsider who keeps the allowance full (reopening what
//! closes) would otherwise lock the cluster's own links out for as long as it kept at it.
//! Now it must open a whole allowance of connections within the few milliseconds a peer
//! takes to authenticate.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Lets a repeated log line through at most once a second, with how many were held back:
/// an outsider's flood of connections must not become a flood of log lines.
#[derive(Debug)]
pub struct Throttle {
    started: Instant,
    /// Milliseconds from `started` past which the next line may go out.
    next: AtomicU64,
    held: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            started: Instant::now(),
            next: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }
}

impl Throttle {
    /// `Some(lines held back since the last one)` if this line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = self.started.elapsed().as_millis() as u64;
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The connection slots of a server.
#[derive(Debug, Clone)]
pub struct Slots {
    main: Arc<Semaphore>,
    /// Connections not yet authenticated, if the server authenticates its peers.
    pending: Option<Arc<Allowance>>,
    max: usize,
    /// Connections closed on arrival because every slot was taken (for metrics).
    refused: Arc<AtomicU64>,
}

/// The connections admitted and not yet authenticated, oldest first, each with the token
/// that closes it.
#[derive(Debug)]
struct Allowance {
    capacity: usize,
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    queue: VecDeque<(u64, CancellationToken)>,
    /// Logs closing to make room.
    closing: Throttle,
}

impl Allowance {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection, closing the oldest one waiting if the allowance is full; its id
    /// and the token that closes it.
    fn admit(&self) -> (u64, CancellationToken) {
        let mut w = self.waiting();
        if w.queue.len() >= self.capacity {
            if let Some((_, oldest)) = w.queue.pop_front() {
                oldest.cancel();
                if let Some(held) = w.closing.allow() {
                    tracing::warn!(
                        closed = held + 1,
                        allowance = self.capacity,
                        "connections that have not authenticated fill their allowance; \
                         closed the oldest to admit new ones"
                    );
                }
            }
        }
        let id = w.next;
        w.next += 1;
        let token = CancellationToken::new();
        w.queue.push_back((id, token.clone()));
        (id, token)
    }

    /// Takes connection `id` out of the allowance; false if it was closed to make room.
    fn leave(&self, id: u64) -> bool {
        let mut w = self.waiting();
        match w.queue.iter().position(|(i, _)| *i == id) {
            Some(at) => {
                w.queue.remove(at);
                true
            }
            None => false,
        }
    }
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

    /// `max` authenticated connections, and `pending` more that have not authenticated yet
    /// (at least one).
    pub fn with_pending(max: usize, pending: usize) -> Slots {
        Slots {
            pending: Some(Arc::new(Allowance {
                capacity: pending.max(1),
                waiting: Mutex::default(),
            })),
            ..Slots::new(max)
        }
    }

    fn admit(&self) -> Option<Slot> {
        match &self.pending {
            Some(allowance) => {
                let (id, closes) = allowance.admit();
                Some(Slot {
                    permit: None,
                    main: self.main.clone(),
                    pending: Some((allowance.clone(), id, closes)),
                })
            }
            None => Some(Slot {
                permit: Some(self.main.clone().try_acquire_owned().ok()?),
                main: self.main.clone(),
                pending: None,
            }),
        }
    }
}

/// One connection's place in a server's [`Slots`]; released when dropped.
#[derive(Debug)]
pub struct Slot {
    /// Its place in the main pool, once it has one.
    permit: Option<OwnedSemaphorePermit>,
    main: Arc<Semaphore>,
    /// Its place in the allowance while it has not authenticated: the allowance, its id
    /// there, and the token that closes it to make room for a newer one.
    pending: Option<(Arc<Allowance>, u64, CancellationToken)>,
}

impl Slot {
    /// Moves an authenticated connection into the main pool; false if that pool is full, or
    /// if the connection was closed meanwhile to make room in the allowance.
    pub fn promote(&mut self) -> bool {
        let Some((allowance, id, _)) = &self.pending else {
            return true;
        };
        let Ok(permit) = self.main.clone().try_acquire_owned() else {
            return false;
        };
        if !allowance.leave(*id) {
            return false;
        }
        self.permit = Some(permit);
        self.pending = None;
        true
    }

    /// Cancelled if the connection is closed to make room in the allowance (never once it
    /// has been promoted).
    fn closing(&self) -> Option<CancellationToken> {
        self.pending.as_ref().map(|(_, _, closes)| closes.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((allowance, id, _)) = &self.pending {
            allowance.leave(*id);
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
    let (refusing, failing) = (Throttle::default(), Throttle::default());
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                if let Some(held) = failing.allow() {
                    tracing::warn!(error = %e, failed = held + 1, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = slots.admit() else {
            slots.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(held) = refusing.allow() {
                tracing::warn!(%peer, refused = held + 1, max_conns = slots.max, "connection limit reached; closing new connections");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        match slot.closing() {
            // Ends the connection's task (dropping its socket) if a newer one takes its place.
            Some(closing) => {
                let serve = handle(stream, slot, shutdown.clone());
                tracker.spawn(async move {
                    tokio::select! {
                        _ = serve => {}
                        _ = closing.cancelled() => {}
                    }
                });
            }
            None => {
                tracker.spawn(handle(stream, slot, shutdown.clone()));
            }
        }
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
        assert!(a.promote());
        assert!(!b.promote(), "the main pool is full");
        drop(a);
        assert!(b.promote(), "a place in the main pool came free");
        let plain = Slots::new(1);
        let mut c = plain.admit().unwrap();
        assert!(c.promote());
        assert!(plain.admit().is_none());
    }

    #[test]
    fn a_throttle_lets_a_line_through_once_a_second_with_the_count_held() {
        let t = Throttle::default();
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.next.store(0, Ordering::Relaxed); // a second later
        assert_eq!(t.allow(), Some(2));
    }

    #[test]
    fn a_full_allowance_closes_its_oldest_connection_for_a_new_one() {
        let slots = Slots::with_pending(4, 2);
        let mut a = slots.admit().unwrap();
        let mut b = slots.admit().unwrap();
        let (a_closing, b_closing) = (a.closing().unwrap(), b.closing().unwrap());
        let mut c = slots.admit().expect("a new connection is never refused");
        assert!(a_closing.is_cancelled(), "the oldest makes room");
        assert!(!b_closing.is_cancelled());
        assert!(
            !a.promote(),
            "a connection closed to make room stays closed"
        );
        assert!(b.promote());
        // b left the allowance: the next newcomer finds room without closing c.
        let mut d = slots.admit().unwrap();
        assert!(!c.closing().unwrap().is_cancelled());
        assert!(c.promote() && d.promote());
        assert!(
            b.closing().is_none(),
            "a promoted connection is never closed to make room"
        );
        // A connection that goes away leaves the allowance with it.
        let e = slots.admit().unwrap();
        drop(e);
        assert_eq!(slots.pending.as_ref().unwrap().waiting().queue.len(), 0);
    }
}
