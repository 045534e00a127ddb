//! Process-wide counters: INFO's clients and stats sections, and the orchestrator's
//! `/metrics` (see [`crate::http`]).
//!
//! What a request costs here: sessions count each reply as it leaves, with relaxed atomic
//! adds into fixed arrays indexed by small enums ([`Cmd`], [`Proto`], [`ErrorCode`]): the
//! request count, one latency bucket and the latency sum, in one of [`SHARDS`] cache-aligned
//! copies chosen by session, so sessions on different threads rarely share a cache line.
//! The latency is taken from clock readings the session makes anyway (when the request's
//! bytes were read, and once per batch of replies). No lock, no allocation, no label
//! lookup: labels exist only when `/metrics` is scraped.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use twincache_ops::metrics::{Latency, Scrape};
use twincache_protocol::Status;

/// The commands counted apart; everything else is `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cmd {
    Get,
    Set,
    Del,
    Exists,
    Mget,
    Mset,
    Ping,
    Info,
    Stats,
    Status,
    Other,
}

impl Cmd {
    pub const ALL: [Cmd; 11] = [
        Cmd::Get,
        Cmd::Set,
        Cmd::Del,
        Cmd::Exists,
        Cmd::Mget,
        Cmd::Mset,
        Cmd::Ping,
        Cmd::Info,
        Cmd::Stats,
        Cmd::Status,
        Cmd::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cmd::Get => "get",
            Cmd::Set => "set",
            Cmd::Del => "del",
            Cmd::Exists => "exists",
            Cmd::Mget => "mget",
            Cmd::Mset => "mset",
            Cmd::Ping => "ping",
            Cmd::Info => "info",
            Cmd::Stats => "stats",
            Cmd::Status => "status",
            Cmd::Other => "other",
        }
    }

    /// A Redis command name, in any case, as counted. Compares the length first, so most
    /// names are told apart without looking at their bytes.
    pub fn from_name(name: &[u8]) -> Cmd {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        match name.len() {
            3 if is("get") => Cmd::Get,
            3 if is("set") => Cmd::Set,
            3 if is("del") => Cmd::Del,
            4 if is("mget") => Cmd::Mget,
            4 if is("mset") => Cmd::Mset,
            4 if is("ping") => Cmd::Ping,
            4 if is("info") => Cmd::Info,
            5 if is("setex") => Cmd::Set,
            6 if is("exists") => Cmd::Exists,
            6 if is("unlink") => Cmd::Del,
            _ => Cmd::Other,
        }
    }
}

/// The client protocols, and the HTTP key interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Proto {
    Text,
    Resp,
    Binary,
    Http,
}

impl Proto {
    pub const ALL: [Proto; 4] = [Proto::Text, Proto::Resp, Proto::Binary, Proto::Http];

    pub fn name(self) -> &'static str {
        match self {
            Proto::Text => "text",
            Proto::Resp => "resp",
            Proto::Binary => "binary",
            Proto::Http => "http",
        }
    }
}

/// Error replies, by the status codes of the text protocol (a RESP error is sorted into
/// the code that means the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    ParseError,
    InvalidCommand,
    Unavailable,
    TooLarge,
    ServerError,
    NoAuth,
    NoPerm,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::ParseError,
        ErrorCode::InvalidCommand,
        ErrorCode::Unavailable,
        ErrorCode::TooLarge,
        ErrorCode::ServerError,
        ErrorCode::NoAuth,
        ErrorCode::NoPerm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidCommand => "invalid_command",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::ServerError => "server_error",
            ErrorCode::NoAuth => "noauth",
            ErrorCode::NoPerm => "noperm",
        }
    }

    /// The error a status stands for; `None` for answers that are not errors (found, not
    /// found, condition not met).
    pub fn of(status: Status) -> Option<ErrorCode> {
        match status {
            Status::Ok | Status::NotFound | Status::NotApplied => None,
            // A key of another type, or not a number: the request's fault.
            Status::ParseError | Status::WrongType => Some(ErrorCode::ParseError),
            Status::InvalidCommand => Some(ErrorCode::InvalidCommand),
            // Moved never reaches a client (the orchestrator routes again); counted as a
            // retryable failure if it did.
            Status::Unavailable | Status::Moved | Status::Diverged => Some(ErrorCode::Unavailable),
            Status::TooLarge => Some(ErrorCode::TooLarge),
            Status::ServerError => Some(ErrorCode::ServerError),
            Status::NoAuth => Some(ErrorCode::NoAuth),
            Status::NoPerm => Some(ErrorCode::NoPerm),
        }
    }

    /// The code a RESP error message stands for.
    pub fn of_resp(msg: &str) -> ErrorCode {
        if msg.starts_with("TRYAGAIN") {
            ErrorCode::Unavailable
        } else if msg.starts_with("NOAUTH") || msg.starts_with("WRONGPASS") {
            ErrorCode::NoAuth
        } else if msg.starts_with("NOPERM") {
            ErrorCode::NoPerm
        } else if msg.starts_with("ERR unknown") || msg.contains("not supported") {
            ErrorCode::InvalidCommand
        } else if msg.contains("too large") || msg.contains("invalid bulk length") {
            ErrorCode::TooLarge
        } else if msg.starts_with("ERR")
            || msg.starts_with("NOPROTO")
            || msg.starts_with("WRONGTYPE")
            || msg.starts_with("CROSSSLOT")
            || msg.starts_with("EXECABORT")
        {
            ErrorCode::ParseError
        } else {
            ErrorCode::ServerError
        }
    }
}

/// Why a client connection was closed by the server (a client closing it is not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Closed {
    /// Idle past `--idle-timeout` (or silent before its first request).
    Idle,
    /// Over `--max-client-buffer`, or the process over `--max-buffer-memory`.
    Memory,
    /// Stopped reading its replies for `--idle-timeout`.
    StoppedReading,
    /// A malformed frame or an unsupported binary protocol version.
    ProtocolError,
    /// On a TLS port: a failed or stalled TLS handshake, or a client speaking plaintext.
    Tls,
}

impl Closed {
    pub const ALL: [Closed; 5] = [
        Closed::Idle,
        Closed::Memory,
        Closed::StoppedReading,
        Closed::ProtocolError,
        Closed::Tls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Closed::Idle => "idle",
            Closed::Memory => "memory",
            Closed::StoppedReading => "stopped_reading",
            Closed::ProtocolError => "protocol_error",
            Closed::Tls => "tls_handshake",
        }
    }
}

const CMDS: usize = Cmd::ALL.len();
const PROTOS: usize = Proto::ALL.len();
const ERRORS: usize = ErrorCode::ALL.len();

/// Copies of the per-request counters; a session always uses the same one.
pub const SHARDS: usize = 4;

/// One copy of the per-request counters, on cache lines of its own.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    requests: [[AtomicU64; CMDS]; PROTOS],
    latency: [Latency; CMDS],
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| Latency::default()),
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub started: Instant,
    /// Whether requests are counted by command, protocol, latency and error: only when
    /// something can read them (`--http`), so that without it the request path does not
    /// even read the clock for them.
    detailed: bool,
    connected: AtomicI64,
    connections: AtomicU64,
    commands: AtomicU64,
    shards: [Shard; SHARDS],
    errors: [[AtomicU64; ERRORS]; PROTOS],
    closed: [AtomicU64; Closed::ALL.len()],
    /// Connections closed on arrival because `--max-clients` were open (counted by the
    /// accept loop).
    pub refused: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            detailed: false,
            connected: AtomicI64::new(0),
            connections: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            shards: std::array::from_fn(|_| Shard::default()),
            errors: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            closed: std::array::from_fn(|_| AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Metrics {
    /// Counters for INFO, and, if `detailed`, per request for `/metrics`.
    pub fn new(detailed: bool) -> Metrics {
        Metrics {
            detailed,
            ..Metrics::default()
        }
    }

    /// Whether requests are counted one by one (see the field).
    pub fn detailed(&self) -> bool {
        self.detailed
    }

    /// Counts a client connection for as long as the returned guard lives.
    pub fn client_connected(&self) -> ClientGuard<'_> {
        self.connected.fetch_add(1, Relaxed);
        self.connections.fetch_add(1, Relaxed);
        ClientGuard(self)
    }

    /// Adds `n` processed commands (sessions add per batch, not per command).
    pub fn commands_processed(&self, n: u64) {
        if n > 0 {
            self.commands.fetch_add(n, Relaxed);
        }
    }

    /// Counts one answered request of session `session`: its command, protocol, and how
    /// long it took.
    #[inline]
    pub fn answered(&self, session: usize, proto: Proto, cmd: Cmd, nanos: u64) {
        let shard = &self.shards[session % SHARDS];
        shard.requests[proto as usize][cmd as usize].fetch_add(1, Relaxed);
        shard.latency[cmd as usize].record(nanos);
    }

    /// Counts an error reply.
    pub fn error(&self, proto: Proto, code: ErrorCode) {
        self.errors[proto as usize][code as usize].fetch_add(1, Relaxed);
    }

    /// Counts a connection the server closed, and why.
    pub fn closed(&self, why: Closed) {
        self.closed[why as usize].fetch_add(1, Relaxed);
    }

    pub fn connected_clients(&self) -> i64 {
        self.connected.load(Relaxed)
    }

    pub fn total_connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    pub fn total_commands(&self) -> u64 {
        self.commands.load(Relaxed)
    }

    /// Writes the orchestrator's own families (its clients and requests).
    pub fn write(&self, s: &mut Scrape) -> std::fmt::Result {
        s.gauge(
            "redis_connected_clients",
            "Client connections open now.",
            self.connected_clients() as f64,
        )?;
        s.counter(
            "redis_connections_received",
            "Client connections accepted.",
            self.total_connections(),
        )?;
        s.counter(
            "redis_rejected_connections",
            "Client connections closed on arrival because --max-clients were open.",
            self.refused.load(Relaxed),
        )?;
        s.counters(
            "twincache_connections_closed",
            "Client connections the server closed, by reason.",
            Closed::ALL.map(|c| {
                (
                    vec![("reason", c.name())],
                    self.closed[c as usize].load(Relaxed),
                )
            }),
        )?;
        s.counter(
            "redis_commands_processed",
            "Requests read from clients (a pipelined or multi-key command counts once).",
            self.total_commands(),
        )?;
        let mut requests = Vec::new();
        for p in Proto::ALL {
            for c in Cmd::ALL {
                let n: u64 = self
                    .shards
                    .iter()
                    .map(|s| s.requests[p as usize][c as usize].load(Relaxed))
                    .sum();
                if n > 0 {
                    requests.push((vec![("cmd", c.name()), ("protocol", p.name())], n));
                }
            }
        }
        s.counters(
            "redis_commands",
            "Requests answered, by command and client protocol.",
            requests,
        )?;
        let mut errors = Vec::new();
        for p in Proto::ALL {
            for e in ErrorCode::ALL {
                let n = self.errors[p as usize][e as usize].load(Relaxed);
                errors.push((vec![("code", e.name()), ("protocol", p.name())], n));
            }
        }
        s.counters(
            "twincache_errors",
            "Error replies, by code (the text protocol's codes; RESP errors sorted into them) \
             and client protocol.",
            errors,
        )?;
        let latencies: Vec<_> = Cmd::ALL
            .iter()
            .map(|&c| {
                let mut h = (0.0, 0, Vec::new());
                for shard in &self.shards {
                    shard.latency[c as usize].merge_into(&mut h);
                }
                (vec![("cmd", c.name())], h)
            })
            .filter(|(_, h)| h.1 > 0)
            .collect();
        s.histograms(
            "twincache_command_duration_seconds",
            "Time from reading a request to its reply being ready, by command.",
            latencies,
        )
    }
}

/// What the router and the health monitor count: the events of fault tolerance.
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Requests retried on the partner because the first worker could not answer.
    pub failovers: AtomicU64,
    /// Writes acknowledged with one worker of two (the other missed it and is stale).
    pub partial_writes: AtomicU64,
    /// Worker state changes (see `WorkerState`).
    pub state_changes: AtomicU64,
    /// Refills this orchestrator asked a worker for (`resync`, and `resync ... merge`).
    pub resyncs_started: AtomicU64,
    /// Resyncing workers this orchestrator saw come back in sync.
    pub resyncs_completed: AtomicU64,
    /// Read-modify-writes a primary sent back for a newer stamp (hot-key contention).
    pub restamps: AtomicU64,
    /// Edits of a large hash its partner could not take (it lacked the edited version),
    /// sent again whole.
    pub whole_copies: AtomicU64,
    /// Read-modify-writes whose partner refused the copy: the primary had missed a write
    /// the partner took alone (see `cluster::rmw`).
    pub diverged: AtomicU64,
    /// Requests a worker refused as routed by an older cluster map, routed again.
    pub reroutes: AtomicU64,
    /// Plain SETs stored on both workers through batches (a client's pipelined SETs to one
    /// pair, one frame per worker; see `cluster::batch`).
    pub batched_writes: AtomicU64,
}

impl RouterStats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn write(&self, s: &mut Scrape) -> std::fmt::Result {
        s.counter(
            "twincache_failovers",
            "Requests retried on the partner because the first worker could not answer.",
            self.failovers.load(Relaxed),
        )?;
        s.counter(
            "twincache_partial_writes",
            "Writes acknowledged with one worker of two; the other is then stale and resyncs.",
            self.partial_writes.load(Relaxed),
        )?;
        s.counter(
            "twincache_worker_state_changes",
            "Worker state changes seen by this orchestrator.",
            self.state_changes.load(Relaxed),
        )?;
        s.counter(
            "twincache_resyncs_started",
            "Refills from the partner this orchestrator asked a worker for.",
            self.resyncs_started.load(Relaxed),
        )?;
        s.counter(
            "twincache_resyncs_completed",
            "Resyncing workers this orchestrator saw come back in sync.",
            self.resyncs_completed.load(Relaxed),
        )?;
        s.counter(
            "twincache_rmw_restamps",
            "Read-modify-writes a primary sent back for a newer version (hot-key contention).",
            self.restamps.load(Relaxed),
        )?;
        s.counter(
            "twincache_rmw_whole_copies",
            "Edits of a large hash its partner lacked the base of, sent again whole.",
            self.whole_copies.load(Relaxed),
        )?;
        s.counter(
            "twincache_rmw_diverged",
            "Read-modify-writes not kept: the primary lacked a write its partner took alone.",
            self.diverged.load(Relaxed),
        )?;
        s.counter(
            "twincache_reroutes",
            "Requests a worker refused as routed by an older cluster map, routed again.",
            self.reroutes.load(Relaxed),
        )?;
        s.counter(
            "twincache_batched_writes",
            "Plain SETs stored on both workers of a pair through batches: a client's pipelined run in one frame per worker.",
            self.batched_writes.load(Relaxed),
        )
    }
}

pub struct ClientGuard<'a>(&'a Metrics);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What counting one request costs (`cargo test --release -p twincache-orchestrator
    /// --lib counting_cost -- --ignored --nocapture`): the session's part of the metrics,
    /// timed in a loop.
    #[test]
    #[ignore]
    fn counting_cost() {
        let m = Metrics::new(true);
        let n = 20_000_000u64;
        let started = Instant::now();
        for i in 0..n {
            let cmd = if i & 1 == 0 { Cmd::Get } else { Cmd::Set };
            m.answered(
                (i & 7) as usize,
                Proto::Resp,
                cmd,
                std::hint::black_box(i & 0xfffff),
            );
        }
        let clock = Instant::now();
        for _ in 0..n / 16 {
            std::hint::black_box(Instant::now());
        }
        let per = clock.duration_since(started).as_nanos() as f64 / n as f64;
        let clock_per = clock.elapsed().as_nanos() as f64 / (n / 16) as f64;
        println!("answered(): {per:.1} ns per request; a clock reading: {clock_per:.1} ns");
        let counted: u64 = m
            .shards
            .iter()
            .flat_map(|s| &s.requests[Proto::Resp as usize])
            .map(|c| c.load(Relaxed))
            .sum();
        assert_eq!(counted, n);
    }

    #[test]
    fn command_names() {
        assert_eq!(Cmd::from_name(b"GET"), Cmd::Get);
        assert_eq!(Cmd::from_name(b"sEt"), Cmd::Set);
        assert_eq!(Cmd::from_name(b"unlink"), Cmd::Del);
        assert_eq!(Cmd::from_name(b"incr"), Cmd::Other);
        assert_eq!(Cmd::from_name(b""), Cmd::Other);
    }

    #[test]
    fn resp_errors_sort_into_codes() {
        assert_eq!(ErrorCode::of_resp("TRYAGAIN x"), ErrorCode::Unavailable);
        assert_eq!(
            ErrorCode::of_resp("ERR unknown command 'foo'"),
            ErrorCode::InvalidCommand
        );
        assert_eq!(
            ErrorCode::of_resp("ERR wrong number of arguments"),
            ErrorCode::ParseError
        );
        assert_eq!(ErrorCode::of(Status::NotFound), None);
    }
}
