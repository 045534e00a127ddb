//! The engine every bulk verb runs on: SCAN the source (cursor, MATCH, TYPE), cut the keys
//! into batches, run up to `--concurrency` batches at once through a [`Processor`] (which
//! pipelines each batch: no per-key round trip), pace them with `--rate-limit`, and keep the
//! checkpoint up to date.
//!
//! Checkpointing is write-ahead and group-committed. A batch is registered as *in flight*
//! before it runs, and it waits until a checkpoint write that includes it is on disk; one
//! writer task writes whatever changed since its last write, so a hundred batches registered
//! meanwhile cost one fsync. When batches finish out of order, the cursor in the file only
//! moves past a batch once every batch scanned before it is done; the finished batches
//! beyond it are listed by key (see [`crate::checkpoint`]). How far batches may run ahead of
//! the oldest unfinished one is bounded, so the file stays small.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::checkpoint::{decode_key, encode_key, Checkpoint};
use crate::redis_io::Server;
use crate::report::{Progress, Tally};
use crate::Error;

/// What to scan and how hard to push.
#[derive(Debug, Clone)]
pub struct ScanSpec {
    pub pattern: Option<String>,
    pub key_type: Option<String>,
    pub batch: usize,
    pub concurrency: usize,
    /// Keys per second, all batches together.
    pub rate_limit: Option<u64>,
    /// Stop after this many keys (`verify --sample`).
    pub limit: Option<u64>,
    /// Keys starting with this are never handed out (the tool's own registry keys).
    pub exclude_prefix: Option<Vec<u8>>,
}

/// A batch of keys for a [`Processor`]. `resumed`: these keys were in flight when an earlier
/// run stopped, so some of them may already have been handled by it.
pub struct Batch {
    pub keys: Vec<Vec<u8>>,
    pub resumed: bool,
}

/// What a verb does with a batch of keys.
pub trait Processor: Send + Sync + 'static {
    fn process(&self, batch: Batch) -> impl Future<Output = Result<Tally, Error>> + Send;
}

/// `--checkpoint FILE [--resume]`, and what run the file belongs to.
pub struct CheckpointSpec {
    pub path: PathBuf,
    pub run: String,
    pub resume: bool,
}

struct Pending {
    cursor_after: u64,
    keys: Vec<Vec<u8>>,
    done: bool,
}

#[derive(Default)]
struct State {
    /// Every key scanned before this cursor is done.
    cursor: u64,
    pending: BTreeMap<u64, Pending>,
    /// Finished keys beyond the cursor, carried over from the checkpoint a run resumed.
    carried_done: Vec<Vec<u8>>,
    tally: Tally,
    /// Bumped on every change; a checkpoint write records the version it covers.
    version: u64,
    finished: bool,
    closing: bool,
    error: Option<Error>,
}

impl State {
    fn checkpoint(&self, run: &str) -> Checkpoint {
        let mut cp = Checkpoint::new(run);
        cp.cursor = self.cursor.to_string();
        cp.finished = self.finished;
        cp.tally = self.tally.clone();
        cp.done = self.carried_done.iter().map(|k| encode_key(k)).collect();
        for p in self.pending.values() {
            let list = if p.done {
                &mut cp.done
            } else {
                &mut cp.inflight
            };
            list.extend(p.keys.iter().map(|k| encode_key(k)));
        }
        cp
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the checkpoint writer.
    changed: Notify,
    /// The state version the last checkpoint write covers.
    durable: watch::Sender<u64>,
    /// Wakes the scanner when the window of pending batches moves.
    room: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters half-updated in a way
        // that matters more than stopping; take the data as it is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self, s: &mut State) -> u64 {
        s.version += 1;
        self.changed.notify_one();
        s.version
    }

    fn complete(&self, seq: u64, tally: Tally) {
        let mut s = self.lock();
        s.tally.add(&tally);
        if let Some(p) = s.pending.get_mut(&seq) {
            p.done = true;
        }
        while let Some(entry) = s.pending.first_entry() {
            if !entry.get().done {
                break;
            }
            let p = entry.remove();
            s.cursor = p.cursor_after;
        }
        self.bump(&mut s);
        self.room.notify_one();
    }

    fn fail(&self, e: Error) {
        let mut s = self.lock();
        if s.error.is_none() {
            s.error = Some(e);
        }
        self.room.notify_one();
    }

    fn failed(&self) -> bool {
        self.lock().error.is_some()
    }
}

/// Paces batches to a number of keys per second.
struct Pace {
    per_sec: f64,
    next: Mutex<Instant>,
}

impl Pace {
    async fn take(&self, keys: usize) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(keys as f64 / self.per_sec);
            start
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Scans `source` and runs every batch through `processor`; the run's tally (earlier runs'
/// included, when resumed).
pub async fn run<P: Processor>(
    source: Arc<Server>,
    spec: ScanSpec,
    processor: Arc<P>,
    checkpoint: Option<CheckpointSpec>,
    progress: Arc<Progress>,
) -> Result<Tally, Error> {
    let mut state = State::default();
    let mut skip: HashSet<Vec<u8>> = HashSet::new();
    let mut resumed_keys = Vec::new();
    if let Some(cp) = checkpoint.as_ref().filter(|c| c.resume) {
        if cp.path.exists() {
            let old = Checkpoint::load(&cp.path, &cp.run)?;
            if old.finished {
                eprintln!("note: the checkpoint says this run already finished; nothing to do");
                return Ok(old.tally);
            }
            state.cursor = old.cursor.parse().unwrap_or(0);
            state.tally = old.tally;
            for k in &old.done {
                let k = decode_key(k).map_err(|e| Error::malformed(&cp.path, e))?;
                skip.insert(k.clone());
                state.carried_done.push(k);
            }
            for k in &old.inflight {
                let k = decode_key(k).map_err(|e| Error::malformed(&cp.path, e))?;
                skip.insert(k.clone());
                resumed_keys.push(k);
            }
            eprintln!(
                "resuming: {} keys done before, {} in flight when the run stopped",
                state.tally.scanned,
                resumed_keys.len()
            );
        } else {
            eprintln!(
                "note: no checkpoint at {} yet; starting from the beginning",
                cp.path.display()
            );
        }
    }
    let start_cursor = state.cursor;
    let (durable, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        changed: Notify::new(),
        durable,
        room: Notify::new(),
    });
    let writer = checkpoint.as_ref().map(|cp| {
        tokio::spawn(write_checkpoints(
            shared.clone(),
            cp.path.clone(),
            cp.run.clone(),
        ))
    });
    let durable_needed = writer.is_some();
    let pace = spec.rate_limit.filter(|&r| r > 0).map(|r| {
        Arc::new(Pace {
            per_sec: r as f64,
            next: Mutex::new(Instant::now()),
        })
    });
    let concurrency = spec.concurrency.max(1);
    let window = 4 * concurrency;
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut seq = 0u64;

    let mut dispatch =
        |keys: Vec<Vec<u8>>, cursor_after: u64, resumed: bool, tasks: &mut JoinSet<()>, permit| {
            let version = {
                let mut s = shared.lock();
                let recorded = if durable_needed {
                    keys.clone()
                } else {
                    Vec::new()
                };
                s.pending.insert(
                    seq,
                    Pending {
                        cursor_after,
                        keys: recorded,
                        done: false,
                    },
                );
                shared.bump(&mut s)
            };
            let (shared, processor, progress, pace) = (
                shared.clone(),
                processor.clone(),
                progress.clone(),
                pace.clone(),
            );
            let this = seq;
            seq += 1;
            tasks.spawn(async move {
                let _permit: tokio::sync::OwnedSemaphorePermit = permit;
                if durable_needed {
                    let mut rx = shared.durable.subscribe();
                    if rx.wait_for(|v| *v >= version).await.is_err() || shared.failed() {
                        return;
                    }
                }
                if let Some(pace) = &pace {
                    pace.take(keys.len()).await;
                }
                let n = keys.len() as u64;
                let result = if keys.is_empty() {
                    Ok(Tally::default())
                } else {
                    processor.process(Batch { keys, resumed }).await
                };
                match result {
                    Ok(mut t) => {
                        t.scanned = n;
                        progress.advance(n, t.bytes);
                        shared.complete(this, t);
                    }
                    Err(e) => shared.fail(e),
                }
            });
        };

    let interrupted = Arc::new(Notify::new());
    let signal = {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "interrupted: finishing the batches in flight (Ctrl-C again to exit at once)"
                );
                interrupted.notify_one();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        })
    };

    if !resumed_keys.is_empty() {
        let permit = acquire(&permits).await;
        dispatch(resumed_keys, start_cursor, true, &mut tasks, permit);
    }

    let mut cursor = start_cursor;
    let mut scanned = 0u64;
    let mut acc: Vec<Vec<u8>> = Vec::new();
    let mut stopped_early = false;
    let mut was_interrupted = false;
    'scan: loop {
        while tasks.try_join_next().is_some() {}
        if shared.failed() {
            stopped_early = true;
            break;
        }
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor);
        if let Some(p) = &spec.pattern {
            cmd.arg("MATCH").arg(p);
        }
        cmd.arg("COUNT").arg(spec.batch.max(1));
        if let Some(t) = &spec.key_type {
            cmd.arg("TYPE").arg(t);
        }
        let scan = tokio::select! {
            r = source.query::<(u64, Vec<Vec<u8>>)>(&cmd) => r,
            _ = interrupted.notified() => { was_interrupted = true; stopped_early = true; break 'scan; }
        };
        let (next, keys) = match scan {
            Ok(r) => r,
            Err(e) => {
                shared.fail(e);
                stopped_early = true;
                break;
            }
        };
        let mut limit_reached = false;
        for k in keys {
            if skip.contains(&k)
                || spec
                    .exclude_prefix
                    .as_ref()
                    .is_some_and(|p| k.starts_with(p))
            {
                continue;
            }
            acc.push(k);
            scanned += 1;
            if spec.limit.is_some_and(|l| scanned >= l) {
                limit_reached = true;
                break;
            }
        }
        let end = next == 0 || limit_reached;
        if acc.len() >= spec.batch || end {
            // Wait for room: a bounded number of batches beyond the oldest unfinished one.
            loop {
                let room = shared.room.notified();
                if shared.lock().pending.len() < window || shared.failed() {
                    break;
                }
                tokio::select! {
                    _ = room => {}
                    _ = interrupted.notified() => { was_interrupted = true; stopped_early = true; break 'scan; }
                }
            }
            let permit = tokio::select! {
                p = acquire(&permits) => p,
                _ = interrupted.notified() => { was_interrupted = true; stopped_early = true; break 'scan; }
            };
            dispatch(std::mem::take(&mut acc), next, false, &mut tasks, permit);
        }
        if end {
            break;
        }
        cursor = next;
    }
    while tasks.join_next().await.is_some() {}
    signal.abort();

    let error = {
        let mut s = shared.lock();
        if !stopped_early {
            s.finished = true;
            s.cursor = 0;
            s.carried_done.clear();
        }
        s.closing = true;
        shared.bump(&mut s);
        s.error.take()
    };
    if let Some(writer) = writer {
        match writer.await {
            Ok(Err(e)) if error.is_none() => return Err(e),
            _ => {}
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    if was_interrupted {
        return Err(Error::Interrupted);
    }
    let tally = shared.lock().tally.clone();
    Ok(tally)
}

async fn acquire(permits: &Arc<Semaphore>) -> tokio::sync::OwnedSemaphorePermit {
    // The semaphore is never closed, so acquiring cannot fail; should that change, waiting
    // for a fresh one keeps the bound rather than panicking.
    loop {
        if let Ok(p) = permits.clone().acquire_owned().await {
            return p;
        }
        tokio::task::yield_now().await;
    }
}

/// Writes the checkpoint whenever the state changed, until the run closes it. A failed write
/// fails the run: going on without a checkpoint would break the promise of `--resume`.
async fn write_checkpoints(shared: Arc<Shared>, path: PathBuf, run: String) -> Result<(), Error> {
    loop {
        shared.changed.notified().await;
        let (cp, version, closing) = {
            let s = shared.lock();
            (s.checkpoint(&run), s.version, s.closing)
        };
        let target = path.clone();
        let stored = tokio::task::spawn_blocking(move || cp.store(&target))
            .await
            .unwrap_or_else(|e| Err(Error::Usage(format!("checkpoint writer failed: {e}"))));
        if let Err(e) = stored {
            let text = e.to_string();
            shared.fail(e);
            shared.durable.send_replace(u64::MAX);
            return Err(Error::Usage(format!("cannot write the checkpoint: {text}")));
        }
        shared.durable.send_replace(version);
        if closing {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            durable: watch::channel(0).0,
            room: Notify::new(),
        }
    }

    fn pending(cursor_after: u64, key: &str) -> Pending {
        Pending {
            cursor_after,
            keys: vec![key.as_bytes().to_vec()],
            done: false,
        }
    }

    #[test]
    fn the_cursor_moves_only_past_finished_batches() {
        let sh = shared();
        {
            let mut s = sh.lock();
            s.pending.insert(0, pending(10, "a"));
            s.pending.insert(1, pending(20, "b"));
            s.pending.insert(2, pending(30, "c"));
        }
        let one = Tally {
            done: 1,
            ..Tally::default()
        };
        // The last batch finishes first: the cursor stays, its key is listed as done.
        sh.complete(2, one.clone());
        let cp = sh.lock().checkpoint("run");
        assert_eq!(cp.cursor, "0");
        assert_eq!(cp.done, vec![encode_key(b"c")]);
        assert_eq!(cp.inflight, vec![encode_key(b"a"), encode_key(b"b")]);
        assert_eq!(cp.tally.done, 1);
        // The first finishes: the cursor moves past it, not past the unfinished second.
        sh.complete(0, one.clone());
        let cp = sh.lock().checkpoint("run");
        assert_eq!(cp.cursor, "10");
        assert_eq!(cp.inflight, vec![encode_key(b"b")]);
        // The second: everything up to the third batch's cursor is done.
        sh.complete(1, one);
        let cp = sh.lock().checkpoint("run");
        assert_eq!(
            (
                cp.cursor.as_str(),
                cp.done.len(),
                cp.inflight.len(),
                cp.tally.done
            ),
            ("30", 0, 0, 3)
        );
    }
}
