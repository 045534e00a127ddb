//! A session's pipelined plain SETs to one pair, sent as one frame per worker
//! (`Op::Batch`) rather than one per SET: one pending request, one reply channel, one frame
//! header and one delivery per worker for the lot, where each SET cost two of each. The
//! session gathers them while it reads its input (`commands::batch`).
//!
//! A batch goes only where every SET of it would have gone both ways anyway: a pair whose
//! two workers both take writes and both said, in their last status, that they take
//! batches. Each worker runs the SETs in order, as if each had come in a frame of its own,
//! and answers each; each SET is then decided from its two answers as a lone write is
//! ([`Router::decide`]), missed writes recorded and refused ones routed again alike. A
//! worker whose answer is not a batch's missed every SET in it, as one that did not answer.
//! Anything else (a pair one of whose workers is left out, or has not said it takes
//! batches) sends the SETs one by one.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::Either;
use twincache_protocol::frame::{
    encode_batch, flags, frames, Op, Request, Response, RESPONSE_HEADER_LEN,
};
use twincache_protocol::Status;

use super::{Decided, Origin, Router, Topology, WorkerLink};
use crate::commands::join_every;
use crate::metrics::RouterStats;

/// The answers to a batch of writes.
pub enum Written {
    /// Every one stored on both workers (the common case: no answer per write).
    AllOk,
    /// Each write's answer, in order.
    Each(Vec<Response>),
}

impl Router {
    /// Sends `reqs` (plain SETs, routed to pair `pair` by map `routed`) now, in order, in one
    /// frame per worker where it can, else one by one ([`Router::write`]).
    pub fn write_batch(
        self: &Arc<Self>,
        routed: &Arc<Topology>,
        pair: usize,
        mut reqs: Vec<Request>,
        origin: &Origin,
    ) -> impl Future<Output = Written> + Send + 'static {
        let topo = self.topology.load_full();
        // Routed by the map in force, so each key is still the pair's (not hashed again).
        let batched = reqs.len() > 1
            && !self.is_adapter()
            && Arc::ptr_eq(routed, &topo)
            && pair < topo.len()
            && self.write_targets(&topo[pair]) == [true, true]
            && topo[pair]
                .workers
                .iter()
                .all(|w| w.takes_batches.load(Ordering::Relaxed));
        if !batched {
            return Either::Left(self.one_by_one(reqs, origin));
        }
        for req in &mut reqs {
            self.stamp_write(req);
            req.flags &= !flags::SOLO;
        }
        let mut batch = Request::new(Op::Batch, Bytes::new());
        batch.value = encode_batch(&reqs);
        let [a, b] = &topo[pair].workers;
        let replies = [a.send(&batch, origin), b.send(&batch, origin)];
        let this = self.clone();
        let affinity = origin.affinity;
        Either::Right(async move {
            let workers = &topo[pair].workers;
            let [ra, rb] = replies;
            let (ra, rb) = tokio::join!(this.finish(&workers[0], ra), this.finish(&workers[1], rb));
            let n = reqs.len();
            if [&ra, &rb]
                .iter()
                .all(|r| r.as_ref().is_some_and(|r| all_ok(r, n)))
            {
                RouterStats::add(&this.stats.batched_writes, n as u64);
                return Written::AllOk;
            }
            // Per worker, each write's answer; `None` for a worker that did not take the
            // batch at all, or whose answer is not a batch's: it missed every write in it
            // (sending them again now would put them behind the session's later requests).
            let mut each = [ra, rb]
                .into_iter()
                .zip(workers.iter())
                .map(|(answer, link)| this.answers(link, answer?, n).map(Vec::into_iter));
            let (mut a, mut b) = (each.next().flatten(), each.next().flatten());
            let decided = reqs.into_iter().map(|req| {
                // `Some(None)` for a worker that did not take it, as for a lone write.
                let got = [
                    Some(a.as_mut().and_then(Iterator::next).flatten()),
                    Some(b.as_mut().and_then(Iterator::next).flatten()),
                ];
                let this = this.clone();
                let topo = topo.clone();
                async move {
                    let workers = &topo[pair].workers;
                    let resp = match this.decide(workers, got, None) {
                        Decided::Done(resp) => resp,
                        Decided::TakenBy(i, resp) => {
                            this.acknowledge_one(&workers[i], &workers[1 - i], resp, &req)
                                .await
                        }
                    };
                    if resp.status != Status::Moved {
                        return resp;
                    }
                    this.rewrite(resp, req, affinity).await
                }
            });
            Written::Each(join_every(decided.collect::<Vec<_>>()).await)
        })
    }

    /// Each write on its own way, as if it had come alone.
    fn one_by_one(
        self: &Arc<Self>,
        reqs: Vec<Request>,
        origin: &Origin,
    ) -> impl Future<Output = Written> + Send + 'static {
        let writes: Vec<_> = reqs.into_iter().map(|r| self.write(r, origin)).collect();
        async move { Written::Each(join_every(writes).await) }
    }

    /// A worker's answers to the `n` writes of a batch, settled as a lone write's answer
    /// is (`None` for one it did not take); `None` if the answer is not a batch's. A worker
    /// says in its status that it takes batches, so that is a fault (or a worker replaced
    /// by an older one at its address): it gets none until its next status says so again.
    fn answers(
        &self,
        link: &WorkerLink,
        resp: Response,
        n: usize,
    ) -> Option<Vec<Option<Response>>> {
        let answers: Option<Vec<Option<Response>>> = (resp.status == Status::Ok)
            .then(|| {
                frames::<Response>(resp.payload.clone())
                    .map(|r| r.ok().map(|r| self.settle(link, Ok(r))))
                    .collect::<Option<Vec<_>>>()
            })
            .flatten()
            .filter(|answers| answers.len() == n);
        if answers.is_none() {
            link.takes_batches.store(false, Ordering::Relaxed);
            tracing::warn!(worker = %link.addr, status = ?resp.status, "a worker did not take a batch of writes: each counts as missed there");
        }
        answers
    }
}

/// Whether a worker's answer to a batch of `n` writes stored every one: read in place, as
/// every batch's answer on the common path is.
fn all_ok(resp: &Response, n: usize) -> bool {
    if resp.status != Status::Ok {
        return false;
    }
    let (mut rest, mut count) = (&resp.payload[..], 0);
    while !rest.is_empty() {
        // Each answer: its length, its id, its status.
        let Some(len) = rest.get(..4) else {
            return false;
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(end) = len.checked_add(4).filter(|&end| end <= rest.len()) else {
            return false;
        };
        if len < RESPONSE_HEADER_LEN || rest[12] != Status::Ok.code() {
            return false;
        }
        rest = &rest[end..];
        count += 1;
    }
    count == n
}
