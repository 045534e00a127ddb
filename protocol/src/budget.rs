//! Memory held for connections: buffered input, replies waiting to be written, values in
//! flight. One [`Budget`] per process bounds it all; one [`Account`] per connection bounds
//! each connection and tells who holds what.
//!
//! A connection charges its account for what it holds: the capacity of its buffers (by
//! difference, see [`Account::track`]) and large reply payloads from the moment they arrive
//! from a worker until the last copy is dropped ([`Account::hold`]). Charging never fails:
//! the memory is already taken. The connection asks [`Account::over`] whether to stop: over
//! its own limit, or the process over its budget while the connection holds more than a
//! small floor (so a crowd of modest connections never gets an innocent one cut). Stopping
//! means an error to that client or its disconnection, never harm to the others.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;

/// A connection holding no more than this is never cut for the process being over budget.
pub const FLOOR: usize = 1 << 20;

/// Payloads smaller than this are not wrapped by [`Account::hold`]: a connection's window
/// of in-flight requests bounds them, and wrapping costs an allocation.
pub const HOLD_MIN: usize = 16 * 1024;

/// The process's memory for connections.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
    /// Whether the "over budget" warning was logged since the budget last had room.
    warned: AtomicBool,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
            warned: AtomicBool::new(false),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn over(&self) -> bool {
        self.used() > self.limit
    }
}

/// Why a connection must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// It holds more than its own limit.
    Connection { held: usize, limit: usize },
    /// The process holds more than its budget, and this connection a share of it.
    Process { held: usize, budget: usize },
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Over::Connection { held, limit } => write!(
                f,
                "connection holds {held} bytes of buffered requests and replies, over its limit of {limit}"
            ),
            Over::Process { held, budget } => write!(
                f,
                "the process is over its buffer budget of {budget} bytes, and this connection holds {held}"
            ),
        }
    }
}

/// One connection's share of a [`Budget`]. Everything it still holds is returned to the
/// budget when it is dropped.
#[derive(Debug)]
pub struct Account {
    budget: Arc<Budget>,
    held: AtomicUsize,
    limit: usize,
    /// Set, and `waiter` woken, when the account goes over its limit, so a connection
    /// blocked writing to a client that does not read notices at once. One waiter (the
    /// connection's task), so an atomic waker rather than a `Notify`, whose every poll takes
    /// a lock: a session polls this on each turn of its loop.
    exceeded: AtomicBool,
    waiter: AtomicWaker,
}

impl Account {
    pub fn new(budget: &Arc<Budget>, limit: usize) -> Arc<Account> {
        Arc::new(Account {
            budget: budget.clone(),
            held: AtomicUsize::new(0),
            limit,
            exceeded: AtomicBool::new(false),
            waiter: AtomicWaker::new(),
        })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn charge(&self, n: usize) {
        let held = self.held.fetch_add(n, Ordering::Relaxed) + n;
        self.budget.used.fetch_add(n, Ordering::Relaxed);
        if held > self.limit || (self.budget.over() && held > FLOOR) {
            self.exceeded.store(true, Ordering::Release);
            self.waiter.wake();
        }
    }

    pub fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
        self.budget.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Charges or releases the difference between what a buffer held (`*was`) and holds
    /// now, and remembers `now`.
    pub fn track(&self, was: &mut usize, now: usize) {
        if now > *was {
            self.charge(now - *was);
        } else {
            self.release(*was - now);
        }
        *was = now;
    }

    /// Whether this connection must stop, and why. Logs the first time the process goes
    /// over its budget (and again after it had room).
    pub fn over(&self) -> Option<Over> {
        let held = self.held();
        if held > self.limit {
            return Some(Over::Connection {
                held,
                limit: self.limit,
            });
        }
        if self.budget.over() {
            if !self.budget.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    used = self.budget.used(),
                    budget = self.budget.limit,
                    "connections hold more memory than --max-buffer-memory; cutting the largest"
                );
            }
            if held > FLOOR {
                return Some(Over::Process {
                    held,
                    budget: self.budget.limit,
                });
            }
        } else {
            self.budget.warned.store(false, Ordering::Relaxed);
        }
        None
    }

    /// Whether the connection holds more than half its limit besides `input` (what its
    /// input buffer holds, which a request still arriving needs): time to stop taking new
    /// requests until replies drain.
    pub fn busy(&self, input: usize) -> bool {
        self.held().saturating_sub(input) > self.limit / 2
    }

    /// Completes when a charge has taken the account over since it last completed (see
    /// [`Account::over`]). Only the last task to poll it is woken.
    pub fn exceeded(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.waiter.register(cx.waker());
            if self.exceeded.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// `payload`, charged to this account until its last copy is dropped. Small payloads
    /// are returned as they are (see [`HOLD_MIN`]).
    pub fn hold(self: &Arc<Self>, payload: Bytes) -> Bytes {
        if payload.len() < HOLD_MIN {
            return payload;
        }
        let charge = self.charged(payload.len());
        Bytes::from_owner(Held {
            payload,
            _charge: charge,
        })
    }

    /// `n` bytes charged to this account until the returned [`Charge`] is dropped.
    pub fn charged(self: &Arc<Self>, n: usize) -> Charge {
        self.charge(n);
        Charge {
            account: self.clone(),
            n,
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(*self.held.get_mut(), Ordering::Relaxed);
    }
}

/// Bytes charged to an account while this lives (what a request in flight holds, say).
#[derive(Debug)]
pub struct Charge {
    account: Arc<Account>,
    n: usize,
}

impl Charge {
    /// Charges `n` bytes more, released with the rest.
    pub fn add(&mut self, n: usize) {
        self.account.charge(n);
        self.n += n;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.account.release(self.n);
    }
}

/// A payload charged to an account while it lives.
struct Held {
    payload: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

/// The memory this process may use: the cgroup's limit if it has one, else the machine's
/// physical memory; `None` if neither can be read (not Linux).
pub fn memory_available() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        // "max", or v1's "unlimited" (a page-rounded i64::MAX), mean no limit.
        .filter(|&n| n < 1 << 60);
    let physical = read("/proc/meminfo").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, physical) {
        (Some(c), Some(p)) => Some(c.min(p)),
        (c, p) => c.or(p),
    }
}

/// A default for `--max-buffer-memory`: a sixteenth of the memory the process may use,
/// between 64 MiB and 2 GiB (256 MiB if the memory cannot be read).
pub fn default_buffer_budget() -> u64 {
    memory_available().map_or(256 << 20, |m| (m / 16).clamp(64 << 20, 2 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_add_up_and_return_everything_when_dropped() {
        let budget = Budget::new(10 << 20);
        let a = Account::new(&budget, 4 << 20);
        let b = Account::new(&budget, 4 << 20);
        let mut buf = 0;
        a.track(&mut buf, 3 << 20);
        b.charge(1 << 20);
        assert_eq!(budget.used(), 4 << 20);
        a.track(&mut buf, 1 << 20);
        assert_eq!(a.held(), 1 << 20);
        assert_eq!(a.over(), None);
        b.charge(4 << 20);
        assert_eq!(
            b.over(),
            Some(Over::Connection {
                held: 5 << 20,
                limit: 4 << 20
            })
        );
        drop(b);
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_charge_lasts_as_long_as_what_holds_it() {
        let budget = Budget::new(1 << 30);
        let a = Account::new(&budget, 1 << 20);
        let request = a.charged(600 << 10);
        let reply = a.hold(Bytes::from(vec![0u8; 600 << 10]));
        assert_eq!(a.held(), 1200 << 10);
        assert!(a.over().is_some(), "a request and a reply count alike");
        drop(request);
        assert_eq!(a.held(), 600 << 10);
        drop(reply);
        let mut grown = a.charged(10);
        grown.add(20);
        assert_eq!(a.held(), 30);
        drop(grown);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn over_budget_cuts_only_connections_above_the_floor() {
        let budget = Budget::new(2 << 20);
        let big = Account::new(&budget, 64 << 20);
        let small = Account::new(&budget, 64 << 20);
        big.charge(3 << 20);
        small.charge(FLOOR / 2);
        assert!(matches!(big.over(), Some(Over::Process { .. })));
        assert_eq!(small.over(), None);
    }

    #[test]
    fn held_payloads_count_until_their_last_copy_is_gone() {
        let budget = Budget::new(1 << 30);
        let a = Account::new(&budget, 1 << 30);
        let small = a.hold(Bytes::from(vec![1u8; 100]));
        assert_eq!(a.held(), 0, "small payloads are not wrapped");
        let big = a.hold(Bytes::from(vec![7u8; 100_000]));
        assert_eq!(a.held(), 100_000);
        let slice = big.slice(10..20);
        drop(big);
        assert_eq!(a.held(), 100_000, "a slice keeps it");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(a.held(), 0);
        assert_eq!(budget.used(), 0);
        drop(small);
    }

    #[test]
    fn memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(memory_available().is_some_and(|m| m > 16 << 20));
        }
        assert!((64 << 20..=2 << 30).contains(&default_buffer_budget()));
    }
}
