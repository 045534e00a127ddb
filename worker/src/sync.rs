//! Partner resync: a worker refills itself straight from its partner.
//!
//! The orchestrator sends `resync` (with the partner's address) to a worker that restarted or
//! missed writes. The worker keeps taking live writes, opens its own connection to the partner,
//! asks for a `snapshot`, and merges what arrives by version: an entry replaces what is here
//! only if it is newer, so live writes taken meanwhile are never overwritten by older copies,
//! and tombstones carry deletes across. Entries travel as stored (compressed, encrypted): no
//! decompression or re-encryption, unless the partners' dictionaries differ.
//!
//! A snapshot is a stream of response frames, all with the request's id. Each `Ok` frame
//! holds records; a `NotFound` frame ends the stream.
//!
//! ```text
//! record = kind:u8 len:u32le bytes
//! kind   = 1 meta ("fingerprint:<hex|off>\nentries:<n>"), 2 dictionary, 3 entry (as stored)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use twincache_protocol::frame::{encode_frame, FrameCodec, Op, Request, Response, PREAMBLE};
use twincache_protocol::info::Info;
use twincache_protocol::Status;

use crate::seal::Dictionary;
use crate::store::Store;

const META: u8 = 1;
const DICTIONARY: u8 = 2;
const ENTRY: u8 = 3;
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
    run: Mutex<Run>,
}

#[derive(Debug, Default, Clone)]
struct Run {
    phase: Phase,
    /// Resyncs completed since start.
    completed: u64,
    keys: u64,
    bytes: u64,
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

impl Default for SyncState {
    fn default() -> Self {
        SyncState {
            boot_id: rand::random(),
            synced: AtomicBool::new(false),
            run: Mutex::default(),
        }
    }
}

impl SyncState {
    fn run(&self) -> std::sync::MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn adopt(&self) {
        self.synced.store(true, Ordering::Release);
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
            .add("synced", u8::from(self.synced.load(Ordering::Acquire)))
            .add("resync", phase)
            .add("resyncs_completed", r.completed)
            .add("resync_keys", r.keys)
            .add("resync_bytes", r.bytes)
            .add("resync_seconds", format_args!("{:.3}", r.seconds))
            .add("resync_error", r.error);
    }

    /// Starts a resync from `partner` unless one is running; returns whether it started.
    pub fn start(self: &Arc<Self>, store: Arc<Store>, partner: String, max_frame: usize) -> bool {
        {
            let mut run = self.run();
            if run.phase == Phase::Running {
                return false;
            }
            run.phase = Phase::Running;
            run.error.clear();
        }
        let state = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            tracing::info!(%partner, "resync from partner started");
            let result = pull(&store, &partner, max_frame).await;
            let mut run = state.run();
            run.seconds = started.elapsed().as_secs_f64();
            match result {
                Ok((keys, bytes)) => {
                    run.phase = Phase::Done;
                    run.completed += 1;
                    (run.keys, run.bytes) = (keys, bytes);
                    state.synced.store(true, Ordering::Release);
                    tracing::info!(%partner, keys, bytes, seconds = run.seconds, "resync done");
                }
                Err(e) => {
                    run.phase = Phase::Failed;
                    tracing::warn!(%partner, error = %e, "resync failed");
                    run.error = e;
                }
            }
        });
        true
    }
}

fn put_record(out: &mut BytesMut, kind: u8, bytes: &[u8]) {
    out.put_u8(kind);
    out.put_u32_le(bytes.len() as u32);
    out.put_slice(bytes);
}

/// Serves a snapshot on `stream`: the meta record, the dictionary, every entry, then the end.
/// With `rate_limit` (bytes per second, 0 for none) it paces itself, so a resync cannot take
/// the bandwidth live traffic needs.
pub async fn serve_snapshot(
    stream: &mut TcpStream,
    store: &Store,
    id: u64,
    rate_limit: u64,
) -> std::io::Result<()> {
    let started = Instant::now();
    let mut sent = 0u64;
    let fingerprint = store.cipher().map_or("off", |c| c.fingerprint());
    let mut records = BytesMut::with_capacity(BATCH_BYTES + 64 * 1024);
    let usage = store.usage();
    let entries = usage.keys + usage.tombstones;
    put_record(
        &mut records,
        META,
        format!("fingerprint:{fingerprint}\nentries:{entries}").as_bytes(),
    );
    if let Some(dict) = store.dictionary() {
        put_record(&mut records, DICTIONARY, dict.bytes());
    }
    let mut frame = BytesMut::new();
    for n in 0..Store::SHARDS {
        // One shard's records at a time (a 64th of the store), copied under its lock and
        // sent after it is released, in frames of whole records.
        store.snapshot_shard(n, |entry| put_record(&mut records, ENTRY, entry));
        while !records.is_empty() {
            let cut = record_boundary(&records, BATCH_BYTES);
            sent += cut as u64;
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

async fn send(
    stream: &mut TcpStream,
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
    stream.write_all(frame).await
}

/// Pulls a snapshot from `partner` into `store`; the keys and stored bytes taken.
async fn pull(store: &Store, partner: &str, max_frame: usize) -> Result<(u64, u64), String> {
    let mut stream = tokio::time::timeout(STALL, TcpStream::connect(partner))
        .await
        .map_err(|_| format!("connecting to {partner} timed out"))?
        .map_err(|e| format!("cannot connect to {partner}: {e}"))?;
    stream.set_nodelay(true).ok();
    let mut hello = BytesMut::new();
    hello.put_slice(&PREAMBLE);
    encode_frame(&Request::new(Op::Snapshot, Bytes::new()), &mut hello);
    stream.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut frames = FramedRead::new(stream, FrameCodec::<Response>::new(max_frame));
    let mut theirs: Option<Dictionary> = None;
    let (mut keys, mut bytes) = (0u64, 0u64);
    loop {
        let frame = tokio::time::timeout(STALL, frames.next())
            .await
            .map_err(|_| format!("{partner} stopped sending the snapshot"))?
            .ok_or_else(|| format!("{partner} closed the connection mid-snapshot"))?
            .map_err(|e| format!("reading the snapshot: {e}"))?;
        match frame.status {
            Status::NotFound => return Ok((keys, bytes)),
            Status::Ok => {}
            other => {
                return Err(format!(
                    "{partner} refused the snapshot ({other:?}): {}",
                    String::from_utf8_lossy(&frame.payload)
                ))
            }
        }
        let mut rest = &frame.payload[..];
        while !rest.is_empty() {
            if rest.len() < 5 {
                return Err("truncated snapshot record".into());
            }
            let kind = rest[0];
            let len = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
            let body = rest.get(5..5 + len).ok_or("truncated snapshot record")?;
            rest = &rest[5 + len..];
            match kind {
                META => {
                    let meta = String::from_utf8_lossy(body);
                    check_key(store, &meta)?;
                    let entries = meta
                        .lines()
                        .find_map(|l| l.strip_prefix("entries:"))
                        .and_then(|n| n.trim().parse::<usize>().ok());
                    if let Some(n) = entries {
                        store.reserve(n);
                    }
                }
                DICTIONARY => theirs = adopt_or_keep(store, body),
                ENTRY => {
                    let taken = match &theirs {
                        Some(dict) => store.merge_resealed(body, dict),
                        None => store.merge(body),
                    };
                    if taken.ok_or("malformed entry in snapshot")? {
                        keys += 1;
                    }
                    bytes += body.len() as u64;
                }
                _ => {} // a newer partner's record kind: skip it
            }
        }
    }
}

/// Refuses a partner whose encryption key differs: its stored bytes would not open here.
fn check_key(store: &Store, meta: &str) -> Result<(), String> {
    let theirs = meta
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint:"))
        .unwrap_or("off");
    let ours = store.cipher().map_or("off", |c| c.fingerprint());
    if theirs != ours {
        return Err(format!(
            "partner's encryption key (fingerprint {theirs}) differs from this worker's ({ours}); \
             refusing to sync: give both the same --encryption-key-file"
        ));
    }
    Ok(())
}

/// Takes the partner's dictionary if this worker has none (then entries copy as they are);
/// returns it if ours differs, in which case entries must be re-sealed with ours.
fn adopt_or_keep(store: &Store, bytes: &[u8]) -> Option<Dictionary> {
    let theirs = Dictionary::new(bytes.to_vec());
    if store.adopt_dictionary(theirs.clone()) {
        return None;
    }
    (store.dictionary().map(Dictionary::id) != Some(theirs.id())).then_some(theirs)
}
