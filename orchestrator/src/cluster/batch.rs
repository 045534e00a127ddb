//! A session's pipelined plain SETs to one pair, sent as one frame per worker
//! (`Op::Batch`) rather than one per SET: one pending request, one reply channel, one frame
//! header and one delivery per worker for the lot, where each SET cost two of each. The
//! session gathers them while it reads its input (`commands::batch`).
//!
//! A batch goes only where every SET of it would have gone both ways anyway: a pair whose
//! two workers both take writes. Each worker runs the SETs in order, as if each had come in a
//! frame of its own, and answers each; each SET is then decided from its two answers as a
//! lone write is ([`Router::decide`]), missed writes recorded and refused ones routed again
//! alike. Anything else (a worker that does not know batches, an answer that does not parse,
//! a pair one of whose workers is left out) sends the SETs one by one, at the versions they
//! already have: a worker given a SET again at its version stores the same thing.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::Either;
use twincache_protocol::frame::{
    encode_batch, flags, frames, Op, Request, Response, RESPONSE_HEADER_LEN,
};
use twincache_protocol::Status;

use super::{Decided, Origin, Router, WorkerLink};
use crate::commands::join_every;

/// The answers to a batch of writes.
pub enum Written {
    /// Every one stored on both workers (the common case: no answer per write).
    AllOk,
    /// Each write's answer, in order.
    Each(Vec<Response>),
}

impl Router {
    /// Sends `reqs` (plain SETs, gathered for pair `pair`) now, in order, in one frame per
    /// worker where it can, else one by one ([`Router::write`]).
    pub fn write_batch(
        self: &Arc<Self>,
        pair: usize,
        mut reqs: Vec<Request>,
        origin: &Origin,
    ) -> impl Future<Output = Written> + Send + 'static {
        let topo = self.topology.load_full();
        let batched = reqs.len() > 1
            && !self.is_adapter()
            && pair < topo.len()
            && self.write_targets(&topo[pair]) == [true, true]
            && topo[pair]
                .workers
                .iter()
                .all(|w| !w.refuses_batches.load(Ordering::Relaxed))
            && reqs.iter().all(|r| topo.route(&r.key).pair == pair);
        if !batched {
            return Either::Left(self.one_by_one(reqs, origin));
        }
        for req in &mut reqs {
            self.stamp_write(req);
            req.flags &= !flags::SOLO;
        }
        self.stats
            .batched_writes
            .fetch_add(reqs.len() as u64, Ordering::Relaxed);
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
                return Written::AllOk;
            }
            // Per worker, each write's answer; `None` for a worker that did not take the
            // batch at all.
            let mut answers = [None, None];
            for (i, answer) in [ra, rb].into_iter().enumerate() {
                let Some(answer) = answer else { continue };
                match this.answers(&workers[i], answer, n) {
                    Some(each) => answers[i] = Some(each.into_iter()),
                    // Not a batch's answer: every write sent again, one by one.
                    None => {
                        let origin = Origin {
                            affinity,
                            ..Origin::default()
                        };
                        return this.one_by_one_stamped(reqs, &origin).await;
                    }
                }
            }
            let [mut a, mut b] = answers;
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
                            this.acknowledge_one(&workers[i], &workers[1 - i], resp)
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

    /// [`Router::one_by_one`] for writes stamped already: sent at their versions.
    async fn one_by_one_stamped(self: &Arc<Self>, reqs: Vec<Request>, origin: &Origin) -> Written {
        let writes: Vec<_> = reqs
            .into_iter()
            .map(|r| self.write_once(r, origin, true))
            .collect();
        Written::Each(join_every(writes).await)
    }

    /// A worker's answers to the `n` writes of a batch, settled as a lone write's answer
    /// is (`None` for one it did not take); `None` if the answer is not a batch's (a
    /// worker from before batches refuses the op: from now on it gets none).
    fn answers(
        &self,
        link: &WorkerLink,
        resp: Response,
        n: usize,
    ) -> Option<Vec<Option<Response>>> {
        if resp.status != Status::Ok {
            if resp.status == Status::InvalidCommand {
                link.refuses_batches.store(true, Ordering::Relaxed);
            }
            tracing::debug!(worker = %link.addr, status = ?resp.status, "a batch of writes was refused; sent one by one");
            return None;
        }
        let answers: Vec<Option<Response>> = frames::<Response>(resp.payload)
            .map(|r| r.ok().map(|r| self.settle(link, Ok(r))))
            .collect::<Option<_>>()?;
        (answers.len() == n).then_some(answers)
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
        if len < RESPONSE_HEADER_LEN || rest.len() < 4 + len || rest[12] != Status::Ok.code() {
            return false;
        }
        rest = &rest[4 + len..];
        count += 1;
    }
    count == n
}
