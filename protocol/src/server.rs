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
use std::net::IpAddr;
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
    /// Each connection's id, the address it came from, and the token that closes it.
    queue: VecDeque<(u64, IpAddr, CancellationToken)>,
    /// Logs closing to make room.
    closing: Throttle,
}

impl Allowance {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `from`, closing one waiting if the allowance is full: the
    /// oldest of those from the address that holds the most. An outsider who keeps the
    /// allowance full from one address then makes room out of its own connections, not out of
    /// a peer's that is still authenticating from another (on one address, as on loopback,
    /// the oldest goes, as before). Its id and the token that closes it.
    fn admit(&self, from: IpAddr) -> (u64, CancellationToken) {
        let mut w = self.waiting();
        if w.queue.len() >= self.capacity {
            if let Some((_, _, oldest)) = most_held_oldest(&mut w.queue) {
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
        w.queue.push_back((id, from, token.clone()));
        (id, token)
    }

    /// Takes connection `id` out of the allowance; false if it was closed to make room.
    fn leave(&self, id: u64) -> bool {
        let mut w = self.waiting();
        match w.queue.iter().position(|(i, _, _)| *i == id) {
            Some(at) => {
                w.queue.remove(at);
                true
            }
            None => false,
        }
    }
}

/// Takes out the oldest entry of the address with the most entries in `queue` (oldest
/// first).
fn most_held_oldest(
    queue: &mut VecDeque<(u64, IpAddr, CancellationToken)>,
) -> Option<(u64, IpAddr, CancellationToken)> {
    let mut held: std::collections::HashMap<IpAddr, usize> =
        std::collections::HashMap::with_capacity(queue.len());
    for (_, ip, _) in queue.iter() {
        *held.entry(*ip).or_default() += 1;
    }
    let most = held.values().copied().max()?;
    let at = queue
        .iter()
        .position(|(_, ip, _)| held.get(ip) == Some(&most))?;
    queue.remove(at)
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

    fn admit(&self, from: IpAddr) -> Option<Slot> {
        match &self.pending {
            Some(allowance) => {
                let (id, closes) = allowance.admit(from);
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
        let Some(slot) = slots.admit(peer.ip()) else {
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

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn pending_connections_have_their_own_allowance() {
        let slots = Slots::with_pending(1, 2);
        let mut a = slots.admit(HERE).unwrap();
        let mut b = slots.admit(HERE).unwrap();
        assert!(a.promote());
        assert!(!b.promote(), "the main pool is full");
        drop(a);
        assert!(b.promote(), "a place in the main pool came free");
        let plain = Slots::new(1);
        let mut c = plain.admit(HERE).unwrap();
        assert!(c.promote());
        assert!(plain.admit(HERE).is_none());
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
        let mut a = slots.admit(HERE).unwrap();
        let mut b = slots.admit(HERE).unwrap();
        let (a_closing, b_closing) = (a.closing().unwrap(), b.closing().unwrap());
        let mut c = slots
            .admit(HERE)
            .expect("a new connection is never refused");
        assert!(a_closing.is_cancelled(), "the oldest makes room");
        assert!(!b_closing.is_cancelled());
        assert!(
            !a.promote(),
            "a connection closed to make room stays closed"
        );
        assert!(b.promote());
        // b left the allowance: the next newcomer finds room without closing c.
        let mut d = slots.admit(HERE).unwrap();
        assert!(!c.closing().unwrap().is_cancelled());
        assert!(c.promote() && d.promote());
        assert!(
            b.closing().is_none(),
            "a promoted connection is never closed to make room"
        );
        // A connection that goes away leaves the allowance with it.
        let e = slots.admit(HERE).unwrap();
        drop(e);
        assert_eq!(slots.pending.as_ref().unwrap().waiting().queue.len(), 0);
    }

    /// A full allowance makes room out of the address that holds the most of it: a peer
    /// authenticating from elsewhere keeps its place while one address floods.
    #[test]
    fn a_flood_from_one_address_makes_room_out_of_its_own_connections() {
        let slots = Slots::with_pending(8, 4);
        let (peer, flood): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let flooding: Vec<Slot> = (0..3).map(|_| slots.admit(flood).unwrap()).collect();
        let mut link = slots.admit(peer).unwrap();
        let mut newer = Vec::new();
        for _ in 0..20 {
            newer.push(slots.admit(flood).unwrap());
        }
        assert!(!link.closing().unwrap().is_cancelled());
        assert!(link.promote(), "the peer authenticates in its place");
        assert!(flooding.iter().all(|s| s.closing().unwrap().is_cancelled()));
        // With one address each, the oldest goes.
        let slots = Slots::with_pending(8, 2);
        let (a, b) = (slots.admit(peer).unwrap(), slots.admit(flood).unwrap());
        let _c = slots.admit([10, 0, 0, 3].into()).unwrap();
        assert!(a.closing().unwrap().is_cancelled());
        assert!(!b.closing().unwrap().is_cancelled());
    }
}
