//! Partner resync: a worker refills itself straight from its partner.
//!
//! The orchestrator sends `resync` (with the partner's address) to a worker that restarted or
//! missed writes. The worker keeps taking live writes, opens its own connection to the partner,
//! asks for a `snapshot`, and merges what arrives by version: an entry replaces what is here
//! only if it is newer, so live writes taken meanwhile are never overwritten by older copies,
//! and tombstones carry deletes across. Entries travel as stored (compressed, encrypted): no
//! decompression or re-encryption, unless the partners' dictionaries differ.
//!
//! ## What a worker knows of its partner's writes
//!
//! The orchestrator forgets everything when it restarts, so what it must never forget lives
//! here, on the workers:
//!
//! - **Writes taken alone** (`solo`): a write this worker applied knowing that its partner
//!   would not get it (the orchestrator sent it with `flags::SOLO` because the partner was
//!   down or stale, or told it afterwards with `partner_missed` because the partner failed
//!   to take it). Counted per boot, and each such entry is marked in the store, so that a
//!   copy of a program its partner computed without it is refused (`Store::replicate`).
//! - **Coverage** (`covers`): the partner's boot id and `solo` count as of this worker's last
//!   refill from it. The worker lacks none of the partner's writes if the partner's count is
//!   not past it (for a partner that restarted since, if it has taken no write alone).
//!   `complete` is false when the worker was promoted to serve alone without a full copy (its
//!   partner was down): it may then lack older data too, and refills from the partner, while
//!   serving, as soon as it can.
//!
//! Any orchestrator reads both from `status` and sees at once that a worker missed writes,
//! whatever its `synced` flag says (`orchestrator::health`).
//!
//! ## Two kinds of refill
//!
//! - `resync <addr>`: the worker is stale and serves no reads. It first drops its entries
//!   older than the partner's delete horizon (what the partner deleted before then left no
//!   tombstone, so an old copy here could be a delete it missed; what the partner still holds
//!   comes back with the snapshot), then merges everything.
//! - `resync <addr> merge`: the worker serves reads and takes what it lacks from the partner
//!   (a returning partner's writes taken alone). It keeps all it has, and takes an entry
//!   older than its own delete horizon only where it holds the key (a missing key may be a
//!   delete it no longer remembers).
//!
//! ## Slot imports
//!
//! When slots move to another pair (`orchestrator::cluster::membership`), each worker of the
//! new pair is told `slots import <addr> <lo> <hi> <rate>` and pulls those slots' entries
//! from a worker of the old pair ([`SyncState::import`]): a snapshot asked with
//! `slots <lo> <hi> rate <r>` holds only them, and they are merged by version with no floor
//! ([`Refill::Import`]; entries outside the range are ignored). It touches neither the
//! `synced` flag nor the coverage: the two pairs' histories are their own. `slots drop`
//! removes the slots from the old pair once the orchestrator has moved their traffic.
//!
//! A snapshot is a stream of response frames, all with the request's id. Each `Ok` frame
//! holds records; a `NotFound` frame ends the stream.
//!
//! ```text
//! record = kind:u8 len:u32le bytes
//! kind   = 1 meta (name:value lines: fingerprint <hex|off>, entries <n>, boot <hex>,
//!                  solo <n>, horizon <version>, flushed <version of the last FLUSHALL>)
//!        | 2 dictionary (from a worker without a key)
//!        | 3 entry (as stored)
//!        | 4 sealed dictionary (from a worker with a key: `seal::seal_dictionary`)
//! ```
//!
//! The meta record comes first; anything before it is refused. A dictionary is plaintext of
//! stored values, so a worker with a key sends it sealed, as kind 4: a receiver from before
//! kind 4 existed skips it as a kind it does not know (and then cannot open entries
//! compressed against it, as before; with encryption, dictionaries are off by default, see
//! `Config::dictionary_bytes`). A plain dictionary from such an older partner is still read,
//! to re-seal its entries. A worker with a key takes only sealed values: plain ones are
//! refused and counted (`store::Merged::Unsealed`, `resync_refused` in `status`,
//! `refused_unsealed` in `stats`), and the refill goes on without them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use twincache_protocol::auth::{self, ClusterSecret};
use twincache_protocol::coverage::Coverage;
use twincache_protocol::frame::{encode_frame, FrameCodec, Op, Request, Response, PREAMBLE};
use twincache_protocol::info::{self, Info};
use twincache_protocol::slots::SlotRange;
use twincache_protocol::Status;
use twincache_tls::Connector;

use crate::seal::{self, Dictionary};
use crate::store::{Merged, Store};

const META: u8 = 1;
const DICTIONARY: u8 = 2;
const ENTRY: u8 = 3;
const SEALED_DICTIONARY: u8 = 4;
/// Records per frame, in bytes: large enough to amortise the frame, small enough to keep
/// memory flat on both sides.
const BATCH_BYTES: usize = 256 * 1024;
/// A resync with no frame for this long has stalled.
const STALL: Duration = Duration::from_secs(10);

/// What the worker tells the orchestrator about its data.
#[derive(Debug)]
pub struct SyncState {
    /// Fresh for every start, so a restart is noticed however quick it was.
    pub boot_id: u64,
    /// Whether this worker's data is the pair's: it completed a resync, or was told to adopt
    /// what it holds. False after every start.
    synced: AtomicBool,
    /// Writes taken alone since start (see the module docs).
    solo: AtomicU64,
    coverage: Mutex<Coverage>,
    run: Mutex<Run>,
    claims: Mutex<HashMap<u8, Claim>>,
    /// Refill counters and progress, for `status` and the metrics.
    traffic: Traffic,
    /// Since when this worker's data is the pair's (Unix ms; 0: not synced): when it was
    /// adopted or completed a refill as a stale worker. The orchestrators make the worker of
    /// the pair synced the longest its primary for read-modify-writes (see
    /// `orchestrator::cluster::rmw`), so a worker coming back never takes the role over
    /// while programs run on its partner.
    synced_at: AtomicU64,
    /// Until when (Unix ms) copies of its partner's read-modify-writes may still arrive:
    /// each `replicate` moves it to now plus the sender's worker timeout. This worker applies
    /// no program before then (see `exec`).
    partner_applies_until: AtomicU64,
    /// Changes revoked here since start (`Op::Revoke`): a refill running across one may have
    /// merged a key before the revoke removed it, so it does not count as complete.
    revokes: AtomicU64,
    /// The last slot import; one runs at a time.
    import: Mutex<ImportRun>,
}

/// Refills as counters: read by `status` (and so by `/metrics` and the status page) while a
/// refill runs, which the `Run` summary, written at its end, cannot show.
#[derive(Debug, Default)]
struct Traffic {
    started: AtomicU64,
    failed: AtomicU64,
    /// Entries the running (or last) refill has received, and how many its partner
    /// announced.
    entries_done: AtomicU64,
    entries_expected: AtomicU64,
    /// Stored bytes received in refills, and sent to refilling partners, since start.
    received_bytes: AtomicU64,
    sent_bytes: AtomicU64,
}

/// An orchestrator's hold on a node id (the tie-break in write versions).
#[derive(Debug, Clone, Copy)]
struct Claim {
    instance: u64,
    until: Instant,
}

#[derive(Debug, Default, Clone)]
struct Run {
    phase: Phase,
    /// Resyncs completed since start.
    completed: u64,
    keys: u64,
    bytes: u64,
    /// Unsealed entries refused by the last refill.
    refused: u64,
    seconds: f64,
    error: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    Running,
    Done,
    Failed,
}

/// How a refill treats what the worker already holds (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refill {
    /// A stale worker: drop what the partner may have deleted unseen, take everything.
    Resync,
    /// A serving worker: keep everything, take what is newer.
    Merge,
    /// Slots moving here from another pair: take every entry of those slots
    /// unless newer here (writes and deletes made here during the move win), whatever its
    /// age, since this pair never held them before; nothing else is touched.
    Import(SlotRange),
}

/// The state of the last slot import (see [`SyncState::import`]).
#[derive(Debug, Default, Clone)]
struct ImportRun {
    /// Imports started since start: the orchestrator asks for the progress of its own.
    seq: u64,
    phase: Phase,
    keys: u64,
    bytes: u64,
    error: String,
}

impl Default for SyncState {
    fn default() -> Self {
        SyncState {
            boot_id: rand::random(),
            synced: AtomicBool::new(false),
            solo: AtomicU64::new(0),
            coverage: Mutex::default(),
            run: Mutex::default(),
            claims: Mutex::default(),
            traffic: Traffic::default(),
            synced_at: AtomicU64::new(0),
            partner_applies_until: AtomicU64::new(0),
            revokes: AtomicU64::new(0),
            import: Mutex::default(),
        }
    }
}

impl SyncState {
    fn run(&self) -> std::sync::MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn coverage(&self) -> std::sync::MutexGuard<'_, Coverage> {
        self.coverage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this worker holds the pair's data (or was told it does).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Since when this worker's data is the pair's (see the field), 0 if it is not.
    pub fn synced_at(&self) -> u64 {
        self.synced_at.load(Ordering::Acquire)
    }

    /// Notes a copy of the partner's changes, which an orchestrator gives up on after
    /// `timeout_ms`: others may still be on their way until then.
    pub fn partner_applied(&self, timeout_ms: u64) {
        let until = crate::store::now_ms().saturating_add(timeout_ms);
        self.partner_applies_until
            .fetch_max(until, Ordering::AcqRel);
    }

    /// Whether copies of the partner's changes may still be on their way.
    pub fn partner_may_be_applying(&self) -> bool {
        crate::store::now_ms() < self.partner_applies_until.load(Ordering::Acquire)
    }

    fn mark_synced(&self) {
        let _ = self.synced_at.compare_exchange(
            0,
            crate::store::now_ms().max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.synced.store(true, Ordering::Release);
    }

    /// Counts a write this worker took that its partner did not get. Called after the write
    /// is applied, so that a snapshot reporting the count holds the write.
    pub fn took_alone(&self) {
        self.solo.fetch_add(1, Ordering::AcqRel);
    }

    /// A change its partner refused was revoked here (`Op::Revoke`): this worker lacks the
    /// partner's value of those keys until it refills, so it no longer holds the pair's data
    /// (requests flagged `IN_SYNC` are refused and go to the partner), and a refill running
    /// now does not count.
    pub fn revoked(&self) {
        self.revokes.fetch_add(1, Ordering::AcqRel);
        self.synced.store(false, Ordering::Release);
    }

    /// Writes taken alone since start.
    pub fn taken_alone(&self) -> u64 {
        self.solo.load(Ordering::Acquire)
    }

    /// The orchestrator's `adopt`: the data this worker holds is the pair's. `how` is
    /// `partial` (promoted to serve alone: it may lack older data of its partner's), or the
    /// partner's `<boot hex>:<solo>` (a new pair: it lacks nothing the partner took before).
    pub fn adopt(&self, how: &str) -> Result<(), &'static str> {
        let mut coverage = self.coverage();
        if how == "partial" {
            coverage.complete = false;
        } else {
            let (boot, solo) = how
                .split_once(':')
                .and_then(|(b, s)| Some((u64::from_str_radix(b, 16).ok()?, s.parse().ok()?)))
                .ok_or("adopt takes `partial` or the partner's <boot hex>:<solo>")?;
            *coverage = Coverage {
                partner_boot: boot,
                partner_solo: solo,
                complete: true,
            };
        }
        // Adopting again (a promotion) keeps the time it has held the pair's data since.
        self.mark_synced();
        Ok(())
    }

    /// Handles an orchestrator's claim on a node id (`claim <id> <instance hex> <ttl ms>`) or
    /// its release (`release <id> <instance hex>`). A claim holds while renewed within its
    /// time to live; another instance claiming the same id meanwhile is refused, so no two
    /// orchestrators stamp versions with the same id. Returns `ok` or `conflict`.
    pub fn claim(&self, request: &str) -> &'static str {
        let mut words = request.split_ascii_whitespace();
        let verb = words.next();
        let id = words.next().and_then(|w| w.parse::<u8>().ok());
        let instance = words.next().and_then(|w| u64::from_str_radix(w, 16).ok());
        let (Some(id), Some(instance)) = (id, instance) else {
            return "malformed";
        };
        let now = Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.retain(|_, c| c.until > now);
        match verb {
            Some("claim") => {
                let ttl = words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .unwrap_or(5_000)
                    .clamp(100, 600_000);
                match claims.get(&id) {
                    Some(held) if held.instance != instance => "conflict",
                    _ => {
                        let until = now + Duration::from_millis(ttl);
                        claims.insert(id, Claim { instance, until });
                        "ok"
                    }
                }
            }
            Some("release") => {
                if claims.get(&id).is_some_and(|c| c.instance == instance) {
                    claims.remove(&id);
                }
                "ok"
            }
            _ => "malformed",
        }
    }

    /// The `status` text.
    pub fn status_text(&self, info: &mut Info) {
        let r = self.run().clone();
        let phase = match r.phase {
            Phase::Idle => "idle",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::Failed => "failed",
        };
        info.add("boot_id", format_args!("{:016x}", self.boot_id))
            .add("synced", u8::from(self.synced()))
            .add("synced_at", self.synced_at())
            .add("solo", self.solo.load(Ordering::Acquire))
            .add("covers", *self.coverage())
            .add("resync", phase)
            .add("resyncs_completed", r.completed)
            .add("resync_keys", r.keys)
            .add("resync_bytes", r.bytes)
            .add("resync_refused", r.refused)
            .add("resync_seconds", format_args!("{:.3}", r.seconds))
            .add("resync_error", r.error);
        let t = &self.traffic;
        info.add("resyncs_started", t.started.load(Ordering::Relaxed))
            .add("resyncs_failed", t.failed.load(Ordering::Relaxed))
            .add(
                "resync_entries_done",
                t.entries_done.load(Ordering::Relaxed),
            )
            .add(
                "resync_entries_expected",
                t.entries_expected.load(Ordering::Relaxed),
            )
            .add(
                "resync_received_bytes",
                t.received_bytes.load(Ordering::Relaxed),
            )
            .add("resync_sent_bytes", t.sent_bytes.load(Ordering::Relaxed));
    }

    /// Starts a refill from `partner` unless one is running; returns whether it started.
    pub fn start(
        self: &Arc<Self>,
        store: Arc<Store>,
        partner: String,
        refill: Refill,
        max_frame: usize,
        secret: Option<ClusterSecret>,
        tls: Option<Connector>,
    ) -> bool {
        {
            let mut run = self.run();
            if run.phase == Phase::Running {
                return false;
            }
            run.phase = Phase::Running;
            run.error.clear();
        }
        let t = &self.traffic;
        t.started.fetch_add(1, Ordering::Relaxed);
        t.entries_done.store(0, Ordering::Relaxed);
        t.entries_expected.store(0, Ordering::Relaxed);
        let revokes = self.revokes.load(Ordering::Acquire);
        let state = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            tracing::info!(%partner, ?refill, "refill from partner started");
            let result = pull(
                &store,
                &partner,
                refill,
                max_frame,
                secret.as_ref(),
                tls.as_ref(),
                &state.traffic,
                0,
            )
            .await;
            let result = result.and_then(|pulled| {
                if state.revokes.load(Ordering::Acquire) == revokes {
                    Ok(pulled)
                } else {
                    Err("a change was revoked during the refill".to_string())
                }
            });
            let mut run = state.run();
            run.seconds = started.elapsed().as_secs_f64();
            match result {
                Ok(pulled) => {
                    run.phase = Phase::Done;
                    run.completed += 1;
                    (run.keys, run.bytes, run.refused) =
                        (pulled.keys, pulled.bytes, pulled.refused);
                    if pulled.refused > 0 {
                        tracing::warn!(
                            %partner,
                            refused = pulled.refused,
                            "refused unsealed entries from the partner: this worker encrypts, \
                             and a partner with the same key sends only sealed values"
                        );
                    }
                    *state.coverage() = pulled.coverage;
                    if refill == Refill::Resync {
                        // A fresh copy: it holds the pair's data from now on.
                        state.synced_at.store(0, Ordering::Release);
                    }
                    state.mark_synced();
                    tracing::info!(
                        %partner,
                        keys = pulled.keys,
                        bytes = pulled.bytes,
                        dropped = pulled.dropped,
                        seconds = run.seconds,
                        "refill done"
                    );
                }
                Err(e) => {
                    state.traffic.failed.fetch_add(1, Ordering::Relaxed);
                    run.phase = Phase::Failed;
                    tracing::warn!(%partner, error = %e, "refill failed");
                    run.error = e;
                }
            }
        });
        true
    }
}

impl SyncState {
    fn import_run(&self) -> std::sync::MutexGuard<'_, ImportRun> {
        self.import.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts copying `slots` from the worker at `from` into `store` (a slot move:
    /// see the module docs), unless an import is running. Returns its sequence number, or
    /// `None` if one is running.
    #[allow(clippy::too_many_arguments)]
    pub fn import(
        self: &Arc<Self>,
        store: Arc<Store>,
        from: String,
        slots: SlotRange,
        rate: u64,
        max_frame: usize,
        secret: Option<ClusterSecret>,
        tls: Option<Connector>,
    ) -> Option<u64> {
        let seq = {
            let mut run = self.import_run();
            if run.phase == Phase::Running {
                return None;
            }
            run.seq += 1;
            run.phase = Phase::Running;
            run.error.clear();
            (run.keys, run.bytes) = (0, 0);
            run.seq
        };
        let state = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = pull(
                &store,
                &from,
                Refill::Import(slots),
                max_frame,
                secret.as_ref(),
                tls.as_ref(),
                &state.traffic,
                rate,
            )
            .await;
            let mut run = state.import_run();
            match result {
                Ok(pulled) => {
                    run.phase = Phase::Done;
                    (run.keys, run.bytes) = (pulled.keys, pulled.bytes);
                    tracing::info!(
                        %from,
                        slots = %slots,
                        keys = pulled.keys,
                        bytes = pulled.bytes,
                        seconds = started.elapsed().as_secs_f64(),
                        "slots imported"
                    );
                }
                Err(e) => {
                    run.phase = Phase::Failed;
                    tracing::warn!(%from, error = %e, "slot import failed");
                    run.error = e;
                }
            }
        });
        Some(seq)
    }

    /// The last import's state: `<seq> <running|done|failed|idle> <keys> <bytes> <error>`.
    pub fn import_progress(&self) -> String {
        let run = self.import_run();
        let phase = match run.phase {
            Phase::Idle => "idle",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::Failed => "failed",
        };
        format!(
            "{} {phase} {} {} {}",
            run.seq, run.keys, run.bytes, run.error
        )
    }
}

/// A snapshot request's value: `slots <lo> <hi> [rate <bytes/s>]` asks for those slots'
/// entries only (a slot move), paced at most at that rate; empty asks for everything.
pub fn parse_snapshot_request(value: &[u8]) -> Result<(Option<SlotRange>, u64), String> {
    let text = String::from_utf8_lossy(value);
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    match words.as_slice() {
        [] => Ok((None, 0)),
        ["slots", lo, hi, rest @ ..] => {
            let slots = SlotRange::from_bounds(lo, hi)?;
            let rate = match rest {
                [] => 0,
                ["rate", r] => r.parse().map_err(|_| format!("bad rate {r:?}"))?,
                _ => return Err("snapshot takes `slots LO HI [rate N]`".into()),
            };
            Ok((Some(slots), rate))
        }
        _ => Err("snapshot takes `slots LO HI [rate N]`".into()),
    }
}

fn put_record(out: &mut BytesMut, kind: u8, bytes: &[u8]) {
    out.put_u8(kind);
    out.put_u32_le(bytes.len() as u32);
    out.put_slice(bytes);
}

/// Appends the records a snapshot starts with: the meta record, then the dictionary (sealed
/// if this worker has a key). Must be called before any entry is copied: every write the
/// `solo` count includes is then in the snapshot.
pub fn snapshot_head(store: &Store, sync: &SyncState, records: &mut BytesMut) {
    let usage = store.usage();
    let mut meta = Info::new();
    meta.add(
        "fingerprint",
        store.cipher().map_or("off", |c| c.fingerprint()),
    )
    .add("entries", usage.keys + usage.tombstones)
    .add("boot", format_args!("{:016x}", sync.boot_id))
    .add("solo", sync.solo.load(Ordering::Acquire))
    .add("horizon", store.delete_horizon())
    // The last FLUSHALL: a partner that missed it drops what it held from before.
    .add("flushed", store.floor());
    put_record(records, META, &meta.into_bytes());
    match (store.dictionary(), store.cipher()) {
        (Some(dict), Some(cipher)) => put_record(
            records,
            SEALED_DICTIONARY,
            &seal::seal_dictionary(dict, cipher),
        ),
        (Some(dict), None) => put_record(records, DICTIONARY, dict.bytes()),
        (None, _) => {}
    }
}

/// Appends an entry record (an entry as `Store::snapshot_shard` gives it).
pub fn entry_record(records: &mut BytesMut, entry: &[u8]) {
    put_record(records, ENTRY, entry);
    let at = records.len() - entry.len();
    crate::store::unmark_sent(&mut records[at..]);
}

/// Serves a snapshot on `stream`: the meta record, the dictionary, every entry, then the end.
/// With `rate_limit` (bytes per second, 0 for none) it paces itself, so a resync cannot take
/// the bandwidth live traffic needs.
///
/// With `slots`, only the entries of those slots are sent (a slot move).
pub async fn serve_snapshot<S: AsyncWrite + Unpin>(
    stream: &mut S,
    store: &Store,
    sync: &SyncState,
    id: u64,
    rate_limit: u64,
    slots: Option<SlotRange>,
) -> std::io::Result<()> {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut records = BytesMut::with_capacity(BATCH_BYTES + 64 * 1024);
    snapshot_head(store, sync, &mut records);
    let mut frame = BytesMut::new();
    for n in 0..Store::SHARDS {
        // One shard's records at a time (a 64th of the store), copied under its lock and
        // sent after it is released, in frames of whole records.
        match slots {
            None => store.snapshot_shard(n, |entry| entry_record(&mut records, entry)),
            Some(slots) => {
                store.snapshot_slots(n, slots, |entry| entry_record(&mut records, entry))
            }
        }
        while !records.is_empty() {
            let cut = record_boundary(&records, BATCH_BYTES);
            sent += cut as u64;
            sync.traffic
                .sent_bytes
                .fetch_add(cut as u64, Ordering::Relaxed);
            send(
                stream,
                &mut frame,
                id,
                Status::Ok,
                records.split_to(cut).freeze(),
            )
            .await?;
            if rate_limit > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate_limit as f64);
                tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
            }
        }
        // Unpaced, to a receiver that keeps up, a send seldom waits (tokio's budget of
        // operations per turn covers most of a walk): the walk would go on shard after shard
        // without letting the worker's other connections run (one event loop on a small
        // machine), its health checks among them. Both workers of a pair send at once in a
        // slot move, and without a rate limit both were found down together. Measured on
        // 60,000 entries of 1 KB (debug build): the longest wait of a `status` during an
        // unpaced import of every slot, 26-36 ms before, 3-10 ms with this.
        tokio::task::yield_now().await;
    }
    send(stream, &mut frame, id, Status::NotFound, Bytes::new()).await
}

/// Where to cut `records` for a frame of about `target` bytes: after the first record that
/// reaches it (so a frame always holds whole records), or at the end.
fn record_boundary(records: &[u8], target: usize) -> usize {
    let mut at = 0;
    while at < records.len() && at < target {
        let len = u32::from_le_bytes(records[at + 1..at + 5].try_into().expect("4 bytes"));
        at += 5 + len as usize;
    }
    at
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frame: &mut BytesMut,
    id: u64,
    status: Status,
    payload: Bytes,
) -> std::io::Result<()> {
    frame.clear();
    encode_frame(
        &Response {
            id,
            status,
            payload,
        },
        frame,
    );
    stream.write_all(frame).await?;
    // Sent now, not held in a TLS session's buffer while the rate limit waits (a no-op
    // on TCP).
    stream.flush().await
}

/// What a completed refill brought.
#[derive(Debug, Default)]
pub struct Pulled {
    /// Entries taken.
    pub keys: u64,
    /// Bytes of entries received.
    pub bytes: u64,
    /// Own entries dropped as older than the partner's delete horizon.
    pub dropped: usize,
    /// Unsealed entries refused (this worker encrypts).
    pub refused: u64,
    pub coverage: Coverage,
}

/// Pulls a snapshot from `partner` into `store` (see [`Refill`]), over TLS with `tls`
/// (the partner's certificate checked against its address).
#[allow(clippy::too_many_arguments)]
async fn pull(
    store: &Store,
    partner: &str,
    refill: Refill,
    max_frame: usize,
    secret: Option<&ClusterSecret>,
    tls: Option<&Connector>,
    traffic: &Traffic,
    rate: u64,
) -> Result<Pulled, String> {
    let stream = tokio::time::timeout(STALL, TcpStream::connect(partner))
        .await
        .map_err(|_| format!("connecting to {partner} timed out"))?
        .map_err(|e| format!("cannot connect to {partner}: {e}"))?;
    stream.set_nodelay(true).ok();
    match tls {
        None => {
            pull_from(
                stream, store, partner, refill, max_frame, secret, traffic, rate,
            )
            .await
        }
        Some(tls) => {
            let stream = tokio::time::timeout(STALL, tls.connect(partner, stream))
                .await
                .map_err(|_| format!("{partner} did not complete the TLS handshake"))?
                .map_err(|e| format!("TLS handshake with {partner}: {e}"))?;
            pull_from(
                stream, store, partner, refill, max_frame, secret, traffic, rate,
            )
            .await
        }
    }
}

/// [`pull`] over an open stream, plain or TLS.
#[allow(clippy::too_many_arguments)]
async fn pull_from<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    store: &Store,
    partner: &str,
    refill: Refill,
    max_frame: usize,
    secret: Option<&ClusterSecret>,
    traffic: &Traffic,
    rate: u64,
) -> Result<Pulled, String> {
    let mut hello = BytesMut::new();
    match secret {
        // Only a partner that proves the cluster secret may fill this worker.
        Some(secret) => tokio::time::timeout(STALL, auth::connect(&mut stream, secret))
            .await
            .map_err(|_| format!("{partner} did not complete the cluster handshake"))?
            .map_err(|e| format!("cluster handshake with {partner}: {e}"))?,
        None => hello.put_slice(&PREAMBLE),
    }
    let mut ask = Request::new(Op::Snapshot, Bytes::new());
    if let Refill::Import(slots) = refill {
        ask.value = Bytes::from(format!("slots {} rate {rate}", slots.bounds()));
    }
    encode_frame(&ask, &mut hello);
    let sent = async {
        stream.write_all(&hello).await?;
        stream.flush().await
    };
    sent.await.map_err(|e| e.to_string())?;
    let mut frames = FramedRead::new(stream, FrameCodec::<Response>::new(max_frame));
    let mut intake = Intake::new(store, refill).counting(traffic);
    loop {
        let frame = tokio::time::timeout(STALL, frames.next())
            .await
            .map_err(|_| format!("{partner} stopped sending the snapshot"))?
            .ok_or_else(|| format!("{partner} closed the connection mid-snapshot"))?
            .map_err(|e| format!("reading the snapshot: {e}"))?;
        match frame.status {
            Status::NotFound => {
                return intake
                    .finish()
                    .ok_or_else(|| format!("{partner} sent an empty snapshot"))
            }
            Status::Ok => intake.apply(&frame.payload)?,
            other => {
                return Err(format!(
                    "{partner} refused the snapshot ({other:?}): {}",
                    String::from_utf8_lossy(&frame.payload)
                ))
            }
        }
    }
}

/// Applies a partner's snapshot to a store, one frame's records at a time: no I/O, so that
/// the parsing of what a partner sends can be tested and fuzzed on its own.
pub struct Intake<'a> {
    store: &'a Store,
    refill: Refill,
    /// Entries older than this are taken only for keys held here (see [`Refill::Merge`]).
    floor: u64,
    /// The partner's dictionary, when it differs from this worker's: entries are re-sealed.
    theirs: Option<Dictionary>,
    seen_meta: bool,
    pulled: Pulled,
    /// Progress counters for `status` and the metrics, if any.
    traffic: Option<&'a Traffic>,
}

impl<'a> Intake<'a> {
    pub fn new(store: &'a Store, refill: Refill) -> Intake<'a> {
        Intake {
            store,
            refill,
            // A serving worker keeps what it has and must not take back keys it deleted.
            floor: match refill {
                Refill::Merge => store.delete_horizon(),
                Refill::Resync | Refill::Import(_) => 0,
            },
            theirs: None,
            seen_meta: false,
            pulled: Pulled {
                coverage: Coverage {
                    complete: true,
                    ..Coverage::default()
                },
                ..Pulled::default()
            },
            traffic: None,
        }
    }

    /// Counts the refill's progress in `traffic` as it goes.
    fn counting(mut self, traffic: &'a Traffic) -> Intake<'a> {
        self.traffic = Some(traffic);
        self
    }

    /// Applies the records of one `Ok` frame of the snapshot.
    pub fn apply(&mut self, mut records: &[u8]) -> Result<(), String> {
        while !records.is_empty() {
            if records.len() < 5 {
                return Err("truncated snapshot record".into());
            }
            let kind = records[0];
            let len = u32::from_le_bytes(records[1..5].try_into().expect("4 bytes")) as usize;
            let body = records
                .get(5..5usize.saturating_add(len))
                .ok_or("truncated snapshot record")?;
            records = &records[5 + len..];
            if kind != META && !self.seen_meta {
                return Err("snapshot record before the meta record".into());
            }
            match kind {
                META => self.meta(&String::from_utf8_lossy(body))?,
                DICTIONARY => self.dictionary(Dictionary::new(body.to_vec())),
                SEALED_DICTIONARY => {
                    let cipher = self
                        .store
                        .cipher()
                        .ok_or("a sealed dictionary, and this worker has no key")?;
                    let dict = seal::open_dictionary(body, cipher)
                        .map_err(|e| format!("the snapshot's dictionary: {e}"))?;
                    self.dictionary(dict);
                }
                ENTRY => self.entry(body)?,
                _ => {} // a newer partner's record kind: skip it
            }
        }
        Ok(())
    }

    fn meta(&mut self, meta: &str) -> Result<(), String> {
        check_key(self.store, meta)?;
        let number = |name: &str, radix: u32| {
            info::get(meta, name).and_then(|v| u64::from_str_radix(v, radix).ok())
        };
        if let Refill::Import(_) = self.refill {
            // A share of the sender's slots: its counts, horizon and flush are the pair's
            // business, not this one's (every pair gets each FLUSHALL itself).
            self.seen_meta = true;
            return Ok(());
        }
        if let Some(n) = number("entries", 10) {
            if let Some(t) = self.traffic {
                t.entries_expected.store(n, Ordering::Relaxed);
            }
            self.store.reserve(usize::try_from(n).unwrap_or(usize::MAX));
        }
        self.pulled.coverage.partner_boot = number("boot", 16).unwrap_or(0);
        self.pulled.coverage.partner_solo = number("solo", 10).unwrap_or(0);
        if self.refill == Refill::Resync {
            if let Some(horizon) = number("horizon", 10) {
                self.pulled.dropped = self.store.drop_older_than(horizon);
            }
        }
        if let Some(flushed) = number("flushed", 10).filter(|&v| v > self.store.floor()) {
            self.pulled.dropped += self.store.flush(flushed).len();
        }
        self.seen_meta = true;
        Ok(())
    }

    /// Takes the partner's dictionary if this worker has none (then entries copy as they
    /// are); keeps it for re-sealing if ours differs.
    fn dictionary(&mut self, theirs: Dictionary) {
        let ours = self.store.dictionary().map(Dictionary::id);
        self.theirs = if self.store.adopt_dictionary(theirs.clone()) {
            None
        } else {
            (ours != Some(theirs.id())).then_some(theirs)
        };
    }

    fn entry(&mut self, body: &[u8]) -> Result<(), String> {
        if let Refill::Import(slots) = self.refill {
            // A sender that ignored the filter (or another's slots) must not fill this pair
            // with keys it does not hold.
            let key = crate::store::raw_entry_key(body).ok_or("malformed entry in snapshot")?;
            if !slots.holds_key(key) {
                return Ok(());
            }
        }
        let merged = match &self.theirs {
            Some(dict) => self.store.merge_resealed(body, dict, self.floor),
            None => self.store.merge_above(body, self.floor),
        };
        match merged.ok_or("malformed entry in snapshot")? {
            Merged::Taken => self.pulled.keys += 1,
            Merged::Kept => {}
            Merged::Unsealed => self.pulled.refused += 1,
        }
        self.pulled.bytes += body.len() as u64;
        if let Some(t) = self.traffic {
            t.entries_done.fetch_add(1, Ordering::Relaxed);
            t.received_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// What the refill brought, once the snapshot has ended; `None` if it never began (no
    /// meta record).
    pub fn finish(self) -> Option<Pulled> {
        self.seen_meta.then_some(self.pulled)
    }
}

/// Refuses a partner whose encryption key differs: its stored bytes would not open here.
fn check_key(store: &Store, meta: &str) -> Result<(), String> {
    let theirs = info::get(meta, "fingerprint").unwrap_or("off");
    let ours = store.cipher().map_or("off", |c| c.fingerprint());
    if theirs != ours {
        return Err(format!(
            "partner's encryption key (fingerprint {theirs}) differs from this worker's ({ours}); \
             refusing to sync: give both the same --encryption-key-file"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Cipher;
    use crate::store::SetOptions;

    fn key() -> Cipher {
        Cipher::new(&[9; 32])
    }

    /// A store holding a few values (long ones compress against a dictionary of `dict`
    /// bytes, 0 for none).
    fn source(cipher: Option<Cipher>, dict: usize) -> Store {
        let s = Store::new(cipher, 0).with_dictionary_size(dict);
        for i in 0..20u64 {
            let value =
                format!(r#"{{"id":{i},"name":"user {i}","tags":["alpha","beta","gamma"]}}"#)
                    .repeat(3);
            s.set(
                format!("k{i}").as_bytes(),
                value.as_bytes(),
                10 + i,
                SetOptions::default(),
            )
            .unwrap();
        }
        s.del(b"gone", 50);
        s
    }

    /// `store`'s whole snapshot as one frame of records.
    fn snapshot(store: &Store) -> BytesMut {
        let mut records = BytesMut::new();
        snapshot_head(store, &SyncState::default(), &mut records);
        for n in 0..Store::SHARDS {
            store.snapshot_shard(n, |e| entry_record(&mut records, e));
        }
        records
    }

    fn value_of(store: &Store, i: u64) -> Option<bytes::Bytes> {
        store.get(format!("k{i}").as_bytes()).unwrap()
    }

    /// A slot move's import: only the range's entries, however old (the new pair never held
    /// them), and a write made on the new pair during the move wins; the sender's filtered
    /// walk and its drop cover the same entries.
    /// An entry written alone travels without its mark: a receiver from before the mark
    /// would read it as length and refuse the entry.
    #[test]
    fn a_snapshot_sends_entries_without_the_written_alone_mark() {
        let s = Store::default();
        let alone = SetOptions {
            alone: true,
            ..SetOptions::default()
        };
        s.set(b"k", b"12345", 10, alone).unwrap();
        let records = snapshot(&s);
        let entry = &records[records.len() - (24 + 1 + 5 + 1)..];
        let len = u32::from_le_bytes([entry[20], entry[21], entry[22], entry[23]]);
        assert_eq!(len, 5);
    }

    #[test]
    fn an_import_takes_only_its_slots_however_old_and_keeps_newer_writes() {
        use twincache_protocol::slots::slot_of;
        let from = source(None, 0);
        let slot = |i: u64| u32::from(slot_of(format!("k{i}").as_bytes()));
        let mut slots: Vec<u32> = (0..20).map(slot).collect();
        slots.sort_unstable();
        let hi = slots[10];
        let range = SlotRange::new(0, hi as u16).unwrap();
        let inside: Vec<u64> = (0..20).filter(|&i| slot(i) < hi).collect();
        assert!(!inside.is_empty() && inside.len() < 20);
        let to = Store::new(None, 0);
        let newer = inside[0];
        to.set(
            format!("k{newer}").as_bytes(),
            b"written during the move",
            1_000,
            SetOptions::default(),
        )
        .unwrap();
        // The whole snapshot, as a sender that ignored the filter would send it.
        let mut intake = Intake::new(&to, Refill::Import(range));
        intake.apply(&snapshot(&from)).unwrap();
        intake.finish().unwrap();
        for i in 0..20 {
            let want = if i == newer {
                Some(bytes::Bytes::from_static(b"written during the move"))
            } else if slot(i) < hi {
                value_of(&from, i)
            } else {
                None
            };
            assert_eq!(value_of(&to, i), want, "k{i}");
        }
        let mut walked = 0;
        for n in 0..Store::SHARDS {
            from.snapshot_slots(n, range, |_| walked += 1);
        }
        let tombstone = usize::from(u32::from(slot_of(b"gone")) < hi);
        assert_eq!(walked, inside.len() + tombstone);
        assert_eq!(from.drop_slots(range), walked);
        assert!((0..20).all(|i| (value_of(&from, i).is_some()) == (slot(i) >= hi)));
    }

    #[test]
    fn snapshot_requests_name_their_slots() {
        assert_eq!(parse_snapshot_request(b""), Ok((None, 0)));
        assert_eq!(
            parse_snapshot_request(b"slots 5 100 rate 1000"),
            Ok((SlotRange::new(5, 100), 1000))
        );
        assert_eq!(
            parse_snapshot_request(b"slots 0 16384"),
            Ok((SlotRange::new(0, 16384), 0))
        );
        for bad in [
            "slots 5 5",
            "slots 0 16385",
            "slots x 3",
            "slots 1 2 rate",
            "all",
        ] {
            assert!(parse_snapshot_request(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_encrypted_snapshot_carries_its_dictionary_sealed() {
        let from = source(Some(key()), 512);
        let dict = from.dictionary().expect("built").clone();
        let records = snapshot(&from);
        assert!(
            !records
                .windows(16)
                .any(|w| dict.bytes().windows(16).any(|d| d == w)),
            "the dictionary travels in clear"
        );
        // A receiver that uses dictionaries adopts it; one that does not (encryption's
        // default) re-seals the entries without one. Either reads every value.
        for dict_size in [512, 0] {
            let to = Store::new(Some(key()), 0).with_dictionary_size(dict_size);
            let mut intake = Intake::new(&to, Refill::Resync);
            intake.apply(&records).unwrap();
            let pulled = intake.finish().unwrap();
            assert_eq!((pulled.keys, pulled.refused), (21, 0));
            assert_eq!(to.dictionary().is_some(), dict_size > 0);
            for i in 0..20 {
                assert_eq!(value_of(&to, i), value_of(&from, i), "{i}");
            }
        }
    }

    #[test]
    fn an_encrypting_worker_refuses_unsealed_entries_and_goes_on() {
        let from = source(Some(key()), 0);
        let mut records = snapshot(&from);
        // A forged partner slips in plain entries at a far-future version.
        let fake = Store::default();
        fake.set(b"k1", b"planted", u64::MAX / 2, SetOptions::default())
            .unwrap();
        fake.set(
            b"planted",
            &b"x".repeat(300),
            u64::MAX / 2,
            SetOptions::default(),
        )
        .unwrap();
        for n in 0..Store::SHARDS {
            fake.snapshot_shard(n, |e| entry_record(&mut records, e));
        }
        let to = Store::new(Some(key()), 0);
        let mut intake = Intake::new(&to, Refill::Resync);
        intake.apply(&records).unwrap();
        let pulled = intake.finish().unwrap();
        assert_eq!((pulled.keys, pulled.refused), (21, 2));
        assert_eq!(value_of(&to, 1), value_of(&from, 1));
        assert_eq!(to.get(b"planted").unwrap(), None);
        assert_eq!(
            to.counters
                .refused_unsealed
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn records_are_checked_before_anything_is_taken() {
        let from = source(None, 512);
        let records = snapshot(&from);
        let meta_len = 5 + u32::from_le_bytes(records[1..5].try_into().unwrap()) as usize;
        let cases: [(&str, &[u8], &str); 4] = [
            ("no meta first", &records[meta_len..], "before the meta"),
            ("truncated header", &records[..3], "truncated"),
            ("truncated body", &records[..meta_len - 1], "truncated"),
            (
                "a key mismatch",
                &snapshot(&source(Some(key()), 0)),
                "differs",
            ),
        ];
        for (what, bytes, error) in cases {
            let to = Store::default();
            let mut intake = Intake::new(&to, Refill::Resync);
            let err = intake.apply(bytes).unwrap_err();
            assert!(err.contains(error), "{what}: {err}");
            assert_eq!(to.usage().keys, 0, "{what}");
        }
        // No meta at all: not a snapshot.
        let to = Store::default();
        assert!(Intake::new(&to, Refill::Resync).finish().is_none());
        // A sealed dictionary for a worker without a key is refused.
        let mut sealed = BytesMut::new();
        snapshot_head(&Store::default(), &SyncState::default(), &mut sealed);
        put_record(&mut sealed, SEALED_DICTIONARY, b"\x02whatever");
        let mut intake = Intake::new(&to, Refill::Resync);
        assert!(intake.apply(&sealed).unwrap_err().contains("no key"));
    }
}
