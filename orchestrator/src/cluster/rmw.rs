//! Programs on a pair (see the worker's `exec` module): read-modify-writes applied by the
//! pair's primary and copied to its partner, reads, key-space walks, and FLUSHALL.
//!
//! ## Which worker applies
//! The *primary* is the worker of the pair that has held the pair's data the longest, of
//! those this orchestrator sees in sync (each reports since when in its `status`; a tie goes
//! to worker 0). Every orchestrator makes the same choice from the same answers, so
//! programs on a key from all of them meet on one worker, which runs them one at a time
//! under the key's lock. The role moves only when its holder fails: a worker back from a
//! refill is synced more recently than its partner, so it does not take the role back
//! while programs are in flight on the partner (both would compute from the same old
//! value). A worker not in sync gets none (its copy may be old), and one that refuses (it
//! restarted since the last health check) passes the program to the partner. With no
//! worker of the pair in sync the answer is `-TRYAGAIN`: computing from a copy that may be
//! stale could lose an acknowledged write.
//!
//! The choice holds as long as the orchestrators agree on which workers are in sync. Right
//! after a worker misses a write without failing (a timeout), an orchestrator that saw
//! the miss stops using it at once and another does so at its next health check (a worker's
//! count of writes taken alone tells it). Meanwhile the other may still send programs to a
//! primary that lacks the write: the partner, which marked that write as taken alone,
//! refuses the copy (the change's base is not the marked version), the change is revoked
//! on the primary, and the program is answered `-TRYAGAIN` and retried on the partner
//! ([`Status::Diverged`]; architecture.md, "Read-modify-write on a pair", point 8).
//!
//! ## The partner's copy
//! The primary answers with the changes; they go to the partner as a `replicate` at the
//! program's version, and the client is answered once the partner took them or its miss is
//! on record (as for any write: the partner becomes stale, and the primary counts the write
//! as taken alone), so an acknowledged INCR survives the loss of either worker.
//!
//! ## When the primary does not answer
//! It may or may not have applied the program. The partner, if in sync, applies it instead
//! at a newer version, and the silent worker is marked stale: when it comes back it refills
//! from the partner, whose newer version replaces whatever it applied. A client that got no
//! answer at all (`-TRYAGAIN`) cannot know whether its INCR was applied, as with any server
//! that times out.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::future::{join_all, Either};
use twincache_protocol::frame::{flags, Op, Request, Response};
use twincache_protocol::program::{
    decode_changes, decode_scan_answer, encode_each, encode_program, put_bases, Action, Answer,
    Change, ScanRequest, DELETED,
};
use twincache_protocol::Status;

use super::{
    unavailable, unwritable, Origin, Pair, Router, Skipping, WorkerState, MISS_UNRECORDED,
};
use crate::metrics::RouterStats;

/// Attempts a program makes when a worker says its version is behind a key's. Programs on
/// one key from many sessions travel on several connections, so a hot key sees them arrive
/// out of version order; the primary takes the next version for most (`version::bump`),
/// and refuses one only when the bumps in a row reach the next stamp, or after a failover.
/// Past this, the client is told to retry.
const VERSION_RETRIES: usize = 32;

/// How long a read-modify-write of a key being moved waits for its slot's move to finish.
const MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// An answer from the workers, or why there is none (a response to pass on).
pub type Answered = Result<Answer, Response>;
pub type BoxAnswer = Pin<Box<dyn Future<Output = Answered> + Send>>;

/// A session's read-modify-writes not yet answered, by pair: a read of any key of such a
/// pair goes to its primary, behind the program, instead of to the partner the program's
/// changes may not have reached yet. By pair, not by the program's key: a program may write
/// other keys of its pair too (RENAME's and COPY's destination, MSETNX's keys, an EXEC's),
/// and one read program (an MGET's) reads many. Costs a session that has none one atomic
/// load per read.
#[derive(Debug, Default)]
pub struct Pending {
    count: AtomicUsize,
    pairs: Mutex<Vec<usize>>,
}

impl Pending {
    pub fn holds(&self, pair: usize) -> bool {
        self.count.load(Ordering::Acquire) > 0
            && self
                .pairs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&pair)
    }

    pub(super) fn start(self: &Arc<Self>, pair: usize) -> PendingGuard {
        self.pairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pair);
        self.count.fetch_add(1, Ordering::AcqRel);
        PendingGuard(self.clone(), pair)
    }
}

/// Removes its pair from the session's pending ones when the program is answered.
pub(super) struct PendingGuard(Arc<Pending>, usize);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pairs = self.0.pairs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pairs.iter().position(|p| *p == self.1) {
            pairs.swap_remove(i);
        }
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A read program of `each` (a GET, EXISTS or TOUCH) of each of `keys` (MGET's, for keys on
/// one pair): one frame each way instead of one per key. The worker answers `TooLarge`
/// rather than replies longer than `cap` bytes.
pub fn each_of<'k>(
    each: &Action,
    mut keys: impl Iterator<Item = &'k Bytes> + Clone,
    cap: usize,
) -> Request {
    let first = keys.next().cloned().unwrap_or_default();
    let mut req = Request::new(Op::Query, first);
    req.value = encode_each(each, keys);
    req.ttl_ms = cap as u64;
    req
}

/// The key of the first change of a changes block (the key an apply ran on).
fn first_key(changes: Bytes) -> Option<Bytes> {
    decode_changes(changes)
        .ok()?
        .into_iter()
        .next()
        .map(|c| c.key)
}

/// One step of a key-space walk on one worker.
#[derive(Debug, Clone)]
pub struct ScanStep {
    /// The worker that answered (a cursor is only meaningful to it).
    pub worker: usize,
    pub next: u64,
    pub keys: Vec<Bytes>,
}

/// Why a read-modify-write is refused while the only copy of its pair that serves is partial.
pub(crate) const PARTIAL_ONLY: &str = "the copy of this key's pair that serves now may lack \
     writes its partner took; read-modify-writes wait until the partner is back; retry";

impl Router {
    /// The workers a pair's programs may be applied on, in order: those in sync with a
    /// complete copy, the one in sync longer first (see the module docs). A partial copy (a
    /// worker promoted to serve alone while its partner is away, see `health`) may lack the
    /// partner's latest writes: a program run there would compute from an older value and
    /// stamp the result newer, so the partner's acknowledged writes would lose to it when
    /// the two merge. It serves reads and plain writes, never a program.
    pub(crate) fn primaries(&self, pair: &Pair) -> [Option<usize>; 2] {
        let in_sync = |i: usize| {
            let w = &pair.workers[i];
            w.state() == WorkerState::InSync && !w.partial.load(Ordering::Acquire)
        };
        match (in_sync(0), in_sync(1)) {
            (true, true) => {
                let since = |i: usize| pair.workers[i].synced_at.load(Ordering::Acquire);
                // Unknown (0: an older worker) sorts first; then worker order decides.
                if (since(1), 1) < (since(0), 0) {
                    [Some(1), Some(0)]
                } else {
                    [Some(0), Some(1)]
                }
            }
            (true, false) => [Some(0), None],
            (false, true) => [Some(1), None],
            (false, false) => [None, None],
        }
    }

    /// Runs a program that may write (`program`, encoded) on the primary of `key`'s pair and
    /// copies its changes to the partner (see the module docs). The first attempt is queued
    /// before this returns, in the session's order. A primary that refuses it as routed by
    /// an older map ran nothing: it is routed again ([`Router::reroute`]).
    pub fn apply(
        self: &Arc<Self>,
        key: Bytes,
        program: Bytes,
        resp3: bool,
        origin: &Origin,
    ) -> BoxAnswer {
        let first = self.apply_once(key.clone(), program.clone(), resp3, origin);
        let (this, origin) = (self.clone(), origin.clone());
        Box::pin(async move {
            let result = first.await;
            this.rerouted(result, || {
                this.apply_once(key.clone(), program.clone(), resp3, &origin)
            })
            .await
        })
    }

    fn apply_once(
        self: &Arc<Self>,
        key: Bytes,
        program: Bytes,
        resp3: bool,
        origin: &Origin,
    ) -> BoxAnswer {
        let topo = self.pairs();
        if topo.is_moving(&key) {
            // Computed on the new pair, it could miss the value still on its way there.
            let this = self.clone();
            let origin = origin.clone();
            return Box::pin(async move {
                this.after_move(&key).await?;
                this.apply_once(key, program, resp3, &origin).await
            });
        }
        let pair = topo.pair_of(&key);
        let mut req = Request::new(Op::Apply, key);
        req.value = program;
        // A program behind a newer write of its key takes the next version on the primary
        // instead of coming back for a new stamp (see `version::bump`).
        req.flags = flags::IN_SYNC | flags::BUMP | if resp3 { flags::RESP3 } else { 0 };
        // The partner checks what the primary computed from (see `copy_to_partner`).
        if topo[pair].workers.iter().all(|w| w.takes_bases()) {
            req.flags |= flags::BASES;
        }
        req.ttl_ms = self.max_replies as u64;
        let pending = origin.rmw.as_ref().map(|p| p.start(pair));
        let targets = self.write_targets(&topo[pair]);
        if !targets[0] && !targets[1] {
            let answer = unwritable(self);
            return Box::pin(async move { Err(answer) });
        }
        let order = self.primaries(&topo[pair]);
        let first = order[0].map(|i| {
            self.stamp(&mut req, i, targets);
            (i, topo[pair].workers[i].send(&req, origin))
        });
        let this = self.clone();
        let origin = origin.clone();
        // The rest runs as a task of its own: a session polls only the reply at the head of
        // its queue, so the partner's copy of a pipelined program would otherwise wait for
        // every program before it; and a client that hangs up must not stop a copy the
        // primary's change is owed.
        let rest = self.rmw_tasks.spawn(async move {
            let _pending = pending;
            let workers = &topo[pair].workers;
            let mut next = order[1];
            let mut current = first;
            let mut retries = 0;
            while let Some((i, reply)) = current.take() {
                // The partner will not get the copy: no snapshot of it may be taken meanwhile.
                let _skipping =
                    (req.flags & flags::SOLO != 0).then(|| Skipping::new(workers[1 - i].clone()));
                let resp = this.finish(&workers[i], reply).await;
                let failover = |req: &mut Request, next: &mut Option<usize>| {
                    let i = next.take()?;
                    RouterStats::count(&this.stats.failovers);
                    // The worker given up on may have bumped: only a fresh stamp is above
                    // anything it wrote.
                    req.flags &= !flags::BUMP;
                    let targets = this.write_targets(&topo[pair]);
                    this.stamp(req, i, targets);
                    Some((i, workers[i].send(req, &origin)))
                };
                match resp {
                    None => {
                        // It may have applied the program: it refills before it serves
                        // again, and the partner's newer version wins there.
                        workers[i].missed_write();
                        current = failover(&mut req, &mut next);
                    }
                    Some(r) if r.status == Status::Unavailable => {
                        current = failover(&mut req, &mut next);
                    }
                    Some(r) if r.status == Status::NotApplied && retries < VERSION_RETRIES => {
                        retries += 1;
                        RouterStats::count(&this.stats.restamps);
                        if let Ok(v) = <[u8; 8]>::try_from(&r.payload[..]) {
                            this.clock.observe(u64::from_be_bytes(v));
                        }
                        let targets = this.write_targets(&topo[pair]);
                        this.stamp(&mut req, i, targets);
                        current = Some((i, workers[i].send(&req, &origin)));
                    }
                    Some(r) if r.status == Status::NotApplied => {
                        // Its payload is a version, not a message for the client.
                        return Err(Response::error(
                            Status::Unavailable,
                            "too many concurrent read-modify-writes of this key; retry",
                        ));
                    }
                    Some(r) if r.status == Status::Ok => {
                        let mut answer = Answer::parse(r.payload)
                            .map_err(|e| Response::error(Status::ServerError, e.0))?;
                        if answer.version == 0 {
                            answer.version = req.version;
                        } else {
                            // The session's next writes must be newer than what it read.
                            this.clock.observe(answer.version);
                        }
                        return this.copy_to_partner(&topo[pair], i, &req, answer).await;
                    }
                    Some(r) => return Err(r),
                }
            }
            Err(match order[0] {
                // Every worker it went to failed it: the partner may well serve reads and
                // writes meanwhile, so "no worker is reachable" would mislead.
                Some(_) if this.mode().is_some() => Response::error(
                    Status::Unavailable,
                    "the worker running this read-modify-write failed, and its partner \
                     could not take it over yet; retry",
                ),
                Some(_) => unavailable(&this),
                None if workers.iter().any(|w| w.state() == WorkerState::InSync) => {
                    Response::error(Status::Unavailable, PARTIAL_ONLY)
                }
                None => Response::error(
                    Status::Unavailable,
                    "no worker of this key's pair holds its data now; retry",
                ),
            })
        });
        Box::pin(async move {
            rest.await.unwrap_or_else(|_| {
                Err(Response::error(
                    Status::ServerError,
                    "read-modify-write task failed",
                ))
            })
        })
    }

    /// Gives `req` a fresh version for worker `i`, flagged `SOLO` when its partner takes no
    /// writes (it will not get the copy).
    fn stamp(&self, req: &mut Request, i: usize, targets: [bool; 2]) {
        req.version = self.clock.next();
        if targets[1 - i] {
            req.flags &= !flags::SOLO;
        } else {
            req.flags |= flags::SOLO;
        }
    }

    /// The copy of `changes` (an apply's answer) to store at `version` on a partner. The
    /// partner applies no program of its own before copies sent until then landed; the copy
    /// is given up after one timeout even if the partner is merely busy (it then refills),
    /// so a new primary need wait only that long. Non-empty `bases` (a block, see
    /// `program::put_bases`) go in the key, which a copy has no other use for, and the
    /// partner checks them (`flags::BASES`).
    fn replicate(&self, changes: Bytes, version: u64, bases: Bytes) -> Request {
        let mut copy = Request::new(Op::Replicate, bases);
        copy.version = version;
        copy.ttl_ms = self.worker_timeout.as_millis() as u64;
        copy.value = changes;
        if !copy.key.is_empty() {
            copy.flags = flags::BASES;
        }
        copy
    }

    /// Sends the primary's changes to the partner; the answer once it has them, or once its
    /// miss is on record.
    async fn copy_to_partner(
        &self,
        pair: &Pair,
        primary: usize,
        req: &Request,
        answer: Answer,
    ) -> Answered {
        if answer.changes.is_empty() {
            return Ok(answer);
        }
        let workers = &pair.workers;
        let (holder, partner) = (&workers[primary], &workers[1 - primary]);
        let solo = req.flags & flags::SOLO != 0;
        if !self.write_targets(pair)[1 - primary] {
            if solo {
                return Ok(answer); // counted by the primary as taken alone
            }
            // It stopped taking writes since the program was sent.
            return self.acknowledge_rmw(holder, partner, answer).await;
        }
        // Bases only to a partner that still says it takes them (it may have been replaced
        // since the program was sent).
        let bases = if partner.takes_bases() {
            answer.bases.clone()
        } else {
            Bytes::new()
        };
        let copy = self.replicate(answer.changes.clone(), answer.version, bases);
        let reply = partner.send_strict(&copy);
        match self.finish(partner, reply).await {
            Some(r) if r.status == Status::Ok => Ok(answer),
            Some(r) if r.status == Status::Diverged => Err(self.diverged(holder, &answer).await),
            // An edit of a large hash, and the partner does not hold the version it edits (a
            // copy before it still on its way, or missed): the key goes whole, as the
            // primary holds it now.
            Some(r) if r.status == Status::NotApplied => {
                RouterStats::count(&self.stats.whole_copies);
                match self
                    .copy_whole(holder, partner, &answer.changes, answer.version)
                    .await
                {
                    Some(Status::Ok) => Ok(answer),
                    Some(Status::Diverged) => Err(self.diverged(holder, &answer).await),
                    _ => self.acknowledge_rmw(holder, partner, answer).await,
                }
            }
            Some(r) if r.status == Status::Moved => {
                self.copy_where_it_lives(holder, partner, r, answer).await
            }
            _ => self.acknowledge_rmw(holder, partner, answer).await,
        }
    }

    /// The partner refused the copy as routed by an older map than its own: the key's slot
    /// moved, and the partner had the new map before the primary (which ran the program
    /// under the map it held). Once the maps agree ([`Router::reroute`]) the changes go to
    /// the workers of the pair that holds the key now (the primary excepted, if it is one),
    /// at the primary's version, so the write lands where it will stay; the copy of the
    /// primary's, if the move takes it along, is the same version.
    async fn copy_where_it_lives(
        &self,
        holder: &super::WorkerLink,
        partner: &super::WorkerLink,
        mut refused: Response,
        answer: Answer,
    ) -> Answered {
        let Some(key) = first_key(answer.changes.clone()) else {
            return self.acknowledge_rmw(holder, partner, answer).await;
        };
        // To another pair: what its workers took alone is not about this primary.
        let copy = self.replicate(answer.changes.clone(), answer.version, Bytes::new());
        for _ in 0..super::shared::REROUTES {
            RouterStats::count(&self.stats.reroutes);
            self.reroute(&refused).await;
            let topo = self.pairs();
            let pair = topo[topo.pair_of(&key)].clone();
            drop(topo);
            let targets: Vec<&Arc<super::WorkerLink>> = pair
                .workers
                .iter()
                .filter(|w| w.addr != holder.addr)
                .collect();
            let answers = join_all(
                targets
                    .iter()
                    .map(|w| async { self.finish(w, w.send_strict(&copy)).await }),
            )
            .await;
            if let Some(r) = answers.iter().flatten().find(|r| r.status == Status::Moved) {
                refused = r.clone();
                continue;
            }
            let took = |i: usize| matches!(&answers[i], Some(r) if r.status == Status::Ok);
            let holders: Vec<&super::WorkerLink> = (0..targets.len())
                .filter(|&i| took(i))
                .map(|i| &**targets[i])
                .chain(
                    pair.workers
                        .iter()
                        .filter(|w| w.addr == holder.addr)
                        .map(|w| &**w),
                )
                .collect();
            let Some(first) = holders.first() else {
                return Err(Response::error(
                    Status::Unavailable,
                    "the change could not be copied to the pair its key moved to; retry",
                ));
            };
            for (i, w) in targets.iter().enumerate() {
                if !took(i) && !self.record_miss(first, w, None).await {
                    return Err(Response::error(Status::Unavailable, MISS_UNRECORDED));
                }
            }
            return Ok(answer);
        }
        Err(super::still_moved(refused))
    }

    /// Copies the current state of the key of `changes` (one edit, written at `version`)
    /// from `holder` to `partner`, at its version there; the partner's answer (`None`: none
    /// came). A key the holder no longer has at all (evicted or flushed since) is deleted on
    /// the partner at the edit's version, so the partner does not go on serving what the
    /// edit replaced. The holder's version is the copy's base, for the partner's check.
    async fn copy_whole(
        &self,
        holder: &super::WorkerLink,
        partner: &super::WorkerLink,
        changes: &Bytes,
        version: u64,
    ) -> Option<Status> {
        let key = first_key(changes.clone())?;
        let mut export = Request::new(Op::Query, key.clone());
        export.value = encode_program(&[Action::Export]);
        // Not from a holder that lost the pair's data since (a revoke: the key may be
        // missing there for that reason, and its absence must not be copied as a delete).
        export.flags = flags::IN_SYNC;
        let exported = match self.finish(holder, holder.send_strict(&export)).await {
            Some(r) if r.status == Status::Ok => Answer::parse(r.payload).ok(),
            _ => None,
        }?;
        let mut bases = BytesMut::new();
        if partner.takes_bases() {
            put_bases(&mut bases, &[exported.version]);
        }
        let (changes, version) = if exported.changes.is_empty() {
            let mut gone = BytesMut::new();
            Change {
                key,
                kind: DELETED,
                expires_at: 0,
                value: Bytes::new(),
            }
            .encode(&mut gone);
            (gone.freeze(), version)
        } else {
            (exported.changes, exported.version)
        };
        let copy = self.replicate(changes, version, bases.freeze());
        let reply = partner.send_strict(&copy);
        self.finish(partner, reply).await.map(|r| r.status)
    }

    /// The partner refused a copy: the primary computed without a write the partner took
    /// alone. The primary removes the program's change where it still holds it
    /// (`Op::Revoke`: at its refill the partner's values come back, rather than the change
    /// winning as the newer), is stale here from now on, and the client is told to retry.
    async fn diverged(&self, holder: &super::WorkerLink, answer: &Answer) -> Response {
        RouterStats::count(&self.stats.diverged);
        // Stale here before anything else: no program of this orchestrator goes there now.
        holder.missed_write();
        let mut revoke = Request::new(Op::Revoke, Bytes::new());
        revoke.version = answer.version;
        revoke.value = answer.changes.clone();
        // Patient, as a control request is: a slow primary should still get it.
        let revoked = self
            .finish(holder, holder.send(&revoke, &Origin::INTERNAL))
            .await;
        if !matches!(&revoked, Some(r) if r.status == Status::Ok) {
            tracing::warn!(
                worker = %holder.addr,
                "could not revoke a refused read-modify-write; it refills"
            );
        }
        Response::error(Status::Unavailable, Status::Diverged.default_message())
    }

    async fn acknowledge_rmw(
        &self,
        holder: &super::WorkerLink,
        missed: &super::WorkerLink,
        answer: Answer,
    ) -> Answered {
        let written = super::Missed {
            key: Bytes::new(),
            version: answer.version,
            changes: answer.changes.clone(),
        };
        if self.record_miss(holder, missed, Some(written)).await {
            RouterStats::count(&self.stats.partial_writes);
            Ok(answer)
        } else {
            Err(Response::error(Status::Unavailable, MISS_UNRECORDED))
        }
    }

    /// Runs a read-only program on one worker of `key`'s pair (in sync first, failing over
    /// like a GET, and routed again like one if refused as routed by an older map).
    pub fn query(
        self: &Arc<Self>,
        key: Bytes,
        program: Bytes,
        resp3: bool,
        origin: &Origin,
    ) -> impl Future<Output = Answered> + Send + 'static {
        let first = self.query_once(key.clone(), program.clone(), resp3, origin);
        let (this, origin) = (self.clone(), origin.clone());
        async move {
            let result = first.await;
            this.rerouted(result, || {
                Box::pin(this.query_once(key.clone(), program.clone(), resp3, &origin))
            })
            .await
        }
    }

    fn query_once(
        self: &Arc<Self>,
        key: Bytes,
        program: Bytes,
        resp3: bool,
        origin: &Origin,
    ) -> impl Future<Output = Answered> + Send + 'static {
        let topo = self.pairs();
        if !topo.is_moving(&key) {
            // Queued before this returns, in the session's order, like a GET.
            let pair = topo.pair_of(&key);
            return Either::Left(self.query_in(topo, pair, key, program, resp3, origin));
        }
        // A read program of a key being moved waits for its move: it could not tell
        // "missing" from "not copied yet".
        let this = self.clone();
        let origin = origin.clone();
        Either::Right(Box::pin(async move {
            this.after_move(&key).await?;
            let topo = this.pairs();
            let pair = topo.pair_of(&key);
            this.query_in(topo, pair, key, program, resp3, &origin)
                .await
        }) as BoxAnswer)
    }

    /// Waits until `key`'s slot is no longer being moved (a move runs a batch of slots
    /// at a time, so this is short); `-TRYAGAIN` if it takes longer than [`MOVE_WAIT`].
    async fn after_move(&self, key: &[u8]) -> Result<(), Response> {
        let deadline = tokio::time::Instant::now() + MOVE_WAIT;
        loop {
            let moved = self.moved.notified();
            if !self.pairs().is_moving(key) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return Err(Response::error(
                    Status::Unavailable,
                    "this key's slot is being moved to another pair; retry",
                ));
            }
        }
    }

    /// [`Router::query`] on pair `pair`.
    pub fn query_pair(
        self: &Arc<Self>,
        pair: usize,
        key: Bytes,
        program: Bytes,
        resp3: bool,
        origin: &Origin,
    ) -> impl Future<Output = Answered> + Send + 'static {
        self.query_in(self.pairs(), pair, key, program, resp3, origin)
    }

    /// [`Router::query_pair`] on the topology `topo` the pair index was taken from, so a
    /// change renumbering the pairs in between cannot send it elsewhere.
    fn query_in(
        self: &Arc<Self>,
        topo: Arc<super::Topology>,
        pair: usize,
        key: Bytes,
        program: Bytes,
        resp3: bool,
        origin: &Origin,
    ) -> impl Future<Output = Answered> + Send + 'static {
        let mut req = Request::new(Op::Query, key);
        req.value = program;
        req.flags = if resp3 { flags::RESP3 } else { 0 };
        // Replies past what a frame can carry are refused by the worker, not sent.
        req.ttl_ms = self.max_replies as u64;
        self.query_req(topo, pair, req, origin)
    }

    /// Runs the read program `req` (a `query`) on pair `pair` of `topo`.
    pub fn query_req(
        self: &Arc<Self>,
        topo: Arc<super::Topology>,
        pair: usize,
        req: Request,
        origin: &Origin,
    ) -> impl Future<Output = Answered> + Send + 'static {
        let read = self.read_in(topo, pair, req, origin, false);
        async move {
            let resp = read.await;
            if resp.status != Status::Ok {
                return Err(resp);
            }
            Answer::parse(resp.payload).map_err(|e| Response::error(Status::ServerError, e.0))
        }
    }

    /// One step of a walk of pair `pair`'s keys on worker `prefer` (where the cursor came
    /// from), or, if it cannot serve now, from the start on its partner.
    pub async fn scan_step(
        self: &Arc<Self>,
        pair: usize,
        prefer: usize,
        mut scan: ScanRequest,
        origin: &Origin,
    ) -> Result<ScanStep, Response> {
        let topo = self.pairs();
        let Some(p) = topo.get(pair) else {
            return Err(unavailable(self));
        };
        let order = self.read_order(p);
        let mut tries: Vec<usize> = order.into_iter().flatten().collect();
        if let Some(at) = tries.iter().position(|&i| i == prefer) {
            tries.swap(0, at);
        }
        for i in tries {
            if i != prefer {
                scan.cursor = 0; // a cursor means nothing to another worker
            }
            let mut req = Request::new(Op::Scan, Bytes::new());
            req.value = scan.encode();
            let reply = p.workers[i].send(&req, origin);
            match self.finish(&p.workers[i], reply).await {
                Some(r) if r.status == Status::Ok => {
                    let (next, keys) = decode_scan_answer(r.payload)
                        .map_err(|e| Response::error(Status::ServerError, e.0))?;
                    return Ok(ScanStep {
                        worker: i,
                        next,
                        keys,
                    });
                }
                _ => continue,
            }
        }
        Err(unavailable(self))
    }

    /// Every worker's `stats` counters, in pair order (`None` where one does not answer).
    pub async fn all_worker_stats(self: &Arc<Self>) -> Vec<Option<String>> {
        let topo = self.pairs();
        let asks = topo
            .iter()
            .flat_map(|p| p.workers.iter())
            .map(|w| self.worker_stats(w));
        join_all(asks).await
    }

    /// FLUSHALL: every worker that takes writes, on every pair, drops what it holds older
    /// than a fresh version and refuses anything older from then on (a partner that missed
    /// it learns it when it refills, see the worker's `sync`). A pair that took it on one
    /// worker only has the other's miss recorded, as for any write. Fails if a pair could
    /// not be flushed at all (the others are).
    pub async fn flush_all(self: &Arc<Self>, asynchronous: bool) -> Result<(), Response> {
        let mut req = Request::new(Op::Flush, Bytes::new());
        req.version = self.clock.next();
        if asynchronous {
            req.flags |= flags::ASYNC;
        }
        let topo = self.pairs();
        let mut pending = Vec::new();
        let mut skipping = Vec::new();
        for (n, pair) in topo.iter().enumerate() {
            let targets = self.write_targets(pair);
            for (i, w) in pair.workers.iter().enumerate() {
                if !targets[i] {
                    // Left out of the flush, as of any write: it refills before serving.
                    if targets[1 - i] {
                        skipping.push(Skipping::new(w.clone()));
                    }
                    continue;
                }
                let mut req = req.clone();
                if !targets[1 - i] {
                    req.flags |= flags::SOLO;
                }
                let reply = w.send(&req, &Origin::INTERNAL);
                pending.push(async move { (n, i, self.finish(w, reply).await) });
            }
        }
        let mut took = vec![[false; 2]; topo.len()];
        let mut sent = vec![[false; 2]; topo.len()];
        for (n, i, resp) in join_all(pending).await {
            sent[n][i] = true;
            took[n][i] = resp.is_some_and(|r| r.status == Status::Ok);
        }
        drop(skipping);
        let mut result = Ok(());
        for (n, pair) in topo.iter().enumerate() {
            match (took[n], sent[n]) {
                ([true, true], _)
                | ([true, false], [true, false])
                | ([false, true], [false, true]) => {}
                ([true, false], _) => {
                    if !self
                        .record_miss(&pair.workers[0], &pair.workers[1], None)
                        .await
                    {
                        result = Err(Response::error(Status::Unavailable, MISS_UNRECORDED));
                    }
                }
                ([false, true], _) => {
                    if !self
                        .record_miss(&pair.workers[1], &pair.workers[0], None)
                        .await
                    {
                        result = Err(Response::error(Status::Unavailable, MISS_UNRECORDED));
                    }
                }
                ([false, false], _) => {
                    for (i, w) in pair.workers.iter().enumerate() {
                        if sent[n][i] {
                            w.missed_write();
                        }
                    }
                    result = Err(unwritable(self));
                }
            }
        }
        result
    }
}
