//! A RESP session's pipelined plain SETs, gathered per pair while the session reads its
//! input and sent when it stops reading or reads anything else ([`Batches::flush`]), one
//! frame per worker for each pair's SETs (see `cluster::batch`). Each SET still has its own
//! place in the session's queue of replies; the first of a batch to be polled drives the
//! batch for all of them.
//!
//! Order: every request a session sends that is not a gathered SET (a GET, an INCR, a MULTI's
//! EXEC) flushes the batches first, so it reaches each worker after the SETs before it, as
//! when each SET was sent as it was read.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::BytesMut;
use twincache_protocol::frame::{Op, Request, Response, BATCH_BYTES, REQUEST_HEADER_LEN};
use twincache_protocol::resp::Reply;
use twincache_protocol::Status;

use super::written;
use crate::cluster::{Topology, Written};
use crate::session::{Ctx, Step};

/// Most SETs in one batch.
const MOST_WRITES: usize = 64;

/// Most bytes of SETs in one batch, what a worker takes: the batch is copied into each
/// worker link's outbox (a value this large on its own travels alone, held rather than
/// copied, see `outgoing::LARGE`).
const MOST_BYTES: usize = BATCH_BYTES;

/// The SETs gathered so far, one group per pair.
#[derive(Default)]
pub struct Batches {
    groups: Vec<Group>,
}

struct Group {
    /// The map its SETs were routed by, to `pair`.
    topo: Arc<Topology>,
    pair: usize,
    reqs: Vec<Request>,
    bytes: usize,
    shared: Arc<Shared>,
}

/// A batch as its SETs' replies see it.
struct Shared(Mutex<State>);

enum State {
    /// Still gathering: not sent yet.
    Gathering,
    /// Sent: the first reply polled drives it.
    Sent(Pin<Box<dyn Future<Output = Written> + Send>>),
    Done(Written),
}

impl Batches {
    /// Whether a write read from `buf` may be gathered at all: not at pipeline depth 1 (no
    /// batch, and nothing after it in `buf`), which gains nothing from a batch.
    #[inline]
    pub fn may_gather(&self, buf: &BytesMut) -> bool {
        !self.groups.is_empty() || !buf.is_empty()
    }

    /// Gathers `req` if it is a plain SET the session may send later, returning its reply;
    /// gives it back otherwise. A SET with nothing after it in `buf` and no batch for its
    /// pair goes on its own way at once.
    pub fn gather(
        &mut self,
        req: Request,
        buf: &BytesMut,
        ctx: &Ctx,
    ) -> Result<Step<Reply>, Request> {
        let size = size(&req);
        if req.op != Op::Set || size >= MOST_BYTES || ctx.router.is_adapter() {
            return Err(req);
        }
        let topo = ctx.router.pairs();
        let pair = topo.pair_of(&req.key);
        let at = match self.groups.iter().position(|g| g.pair == pair) {
            None if buf.is_empty() => return Err(req),
            // Routed by the same map as the rest (a change in between sends them first).
            Some(at)
                if self.groups[at].reqs.len() < MOST_WRITES
                    && self.groups[at].bytes + size <= MOST_BYTES
                    && Arc::ptr_eq(&self.groups[at].topo, &topo) =>
            {
                at
            }
            found => {
                if let Some(full) = found {
                    send(self.groups.swap_remove(full), ctx);
                }
                self.groups.push(Group {
                    topo,
                    pair,
                    reqs: Vec::new(),
                    bytes: 0,
                    shared: Arc::new(Shared(Mutex::new(State::Gathering))),
                });
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[at];
        let reply = Answer {
            shared: group.shared.clone(),
            index: group.reqs.len(),
        };
        group.reqs.push(req);
        group.bytes += size;
        Ok(Step::Dispatch(Box::pin(reply), 1))
    }

    /// Sends every batch gathered.
    #[inline]
    pub fn flush(&mut self, ctx: &Ctx) {
        if !self.groups.is_empty() {
            self.send_all(ctx);
        }
    }

    fn send_all(&mut self, ctx: &Ctx) {
        for group in self.groups.drain(..) {
            send(group, ctx);
        }
    }
}

/// What a SET takes of a batch.
fn size(req: &Request) -> usize {
    4 + REQUEST_HEADER_LEN + req.key.len() + req.value.len()
}

/// Plain SETs to one pair (an MSET's), in order, cut into runs that fit a batch each: at
/// most [`MOST_WRITES`] SETs and [`MOST_BYTES`]; a SET too large for one goes alone.
pub fn runs(reqs: Vec<Request>) -> Vec<Vec<Request>> {
    let mut runs: Vec<Vec<Request>> = Vec::new();
    let mut bytes = 0;
    let mut reqs = reqs.into_iter();
    while let Some(req) = reqs.next() {
        let n = size(&req);
        match runs.last_mut() {
            Some(run) if run.len() < MOST_WRITES && bytes + n <= MOST_BYTES => {
                bytes += n;
                run.push(req);
            }
            _ => {
                bytes = n;
                let mut run = Vec::with_capacity((reqs.len() + 1).min(MOST_WRITES));
                run.push(req);
                runs.push(run);
            }
        }
    }
    runs
}

fn send(group: Group, ctx: &Ctx) {
    let written = ctx
        .router
        .write_batch(&group.topo, group.pair, group.reqs, &ctx.origin);
    *group.shared.lock() = State::Sent(Box::pin(written));
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One SET's reply: its batch's answer for it.
struct Answer {
    shared: Arc<Shared>,
    index: usize,
}

impl Future for Answer {
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let mut state = self.shared.lock();
        if let State::Sent(batch) = &mut *state {
            let done = std::task::ready!(batch.as_mut().poll(cx));
            *state = State::Done(done);
        }
        Poll::Ready(match &mut *state {
            State::Done(Written::AllOk) => Reply::OK,
            State::Done(Written::Each(answers)) => match answers.get_mut(self.index) {
                // Each answer is taken once, by its own SET's reply.
                Some(resp) => written(std::mem::replace(
                    resp,
                    Response::status(Status::ServerError),
                )),
                None => Reply::err("ERR internal error: a batched write has no answer"),
            },
            // The session flushes its batches before it waits for any reply.
            State::Gathering | State::Sent(_) => {
                Reply::err("ERR internal error: a batched write was not sent")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn set(key: usize, len: usize) -> Request {
        let mut req = Request::new(Op::Set, Bytes::from(format!("k{key}")));
        req.value = Bytes::from(vec![b'v'; len]);
        req
    }

    fn lens(cut: &[Vec<Request>]) -> Vec<usize> {
        cut.iter().map(Vec::len).collect()
    }

    #[test]
    fn runs_fit_a_batch_each_and_keep_the_order() {
        let cut = runs((0..100).map(|i| set(i, 10)).collect());
        assert_eq!(lens(&cut), [MOST_WRITES, 100 - MOST_WRITES]);
        let keys: Vec<Bytes> = cut.iter().flatten().map(|r| r.key.clone()).collect();
        let want: Vec<Bytes> = (0..100).map(|i| Bytes::from(format!("k{i}"))).collect();
        assert_eq!(keys, want);
        // 5 KiB each: three to a batch.
        assert_eq!(
            lens(&runs((0..4).map(|i| set(i, 5 << 10)).collect())),
            [3, 1]
        );
        // One too large for a batch goes alone, and the next starts a run.
        let cut = runs(vec![set(0, 10), set(1, MOST_BYTES), set(2, 10)]);
        assert_eq!(lens(&cut), [1, 1, 1]);
        assert!(runs(Vec::new()).is_empty());
    }
}
