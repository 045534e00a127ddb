//! Adapter mode's write rules (see architecture.md, "Adapter mode"): a SET goes through one
//! worker to the destination Redis, then the partner's cached copy is invalidated; other
//! commands run on the destination and invalidate the keys they may touch.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use twincache_protocol::frame::{flags, Op, Request, Response};
use twincache_protocol::Status;

use super::{unavailable, BoxedResponse, Origin, Router, WorkerLink, WorkerState, MISS_UNRECORDED};
use crate::metrics::RouterStats;

impl Router {
    /// A write in adapter mode: a plain SET through [`Router::adapter_set`], a DEL through the
    /// destination (answered found / not found, as the text and binary protocols do); other
    /// writes are not supported.
    pub(super) fn adapter_write(self: &Arc<Self>, req: Request, origin: &Origin) -> BoxedResponse {
        match req.op {
            Op::Set if req.flags == 0 => self.adapter_set(req, origin),
            Op::Del => {
                let key = req.key.clone();
                let del =
                    self.passthrough(vec![Bytes::from_static(b"DEL"), req.key], vec![key], origin);
                // The text and binary protocols answer a DEL with found / not found.
                Box::pin(async move {
                    let resp = del.await;
                    match (resp.status, &resp.payload[..]) {
                        (Status::Ok, b":0\r\n") => Response::status(Status::NotFound),
                        (Status::Ok, _) => Response::ok(Bytes::new()),
                        _ => resp,
                    }
                })
            }
            _ => Box::pin(async {
                Response::error(Status::InvalidCommand, "not supported in adapter mode")
            }),
        }
    }

    /// Adapter mode: a plain SET goes to one worker of the pair, marked primary, which
    /// writes it through to the destination (one Redis write per client write); once the
    /// destination has it, the partner's cached copy is invalidated. If the primary cannot
    /// be reached, its partner takes the role.
    fn adapter_set(self: &Arc<Self>, mut req: Request, origin: &Origin) -> BoxedResponse {
        req.version = self.clock.next();
        req.flags |= flags::PRIMARY;
        let topo = self.topology.load_full();
        let pair = topo.pair_of(&req.key);
        let order = self.read_order(&topo[pair]);
        let workers = &topo[pair].workers;
        // Sent now, in the session's order (see WorkerLink); the partner only on failure.
        let reply = order[0].and_then(|i| workers[i].send(&req, origin));
        let this = self.clone();
        let origin = origin.clone();
        Box::pin(async move {
            let workers = &topo[pair].workers;
            let mut reply = Some(reply);
            for i in order.into_iter().flatten() {
                let sent = reply.take().unwrap_or_else(|| {
                    RouterStats::count(&this.stats.failovers);
                    workers[i].send(&req, &origin)
                });
                if let Some(resp) = this.finish(&workers[i], sent).await {
                    if resp.status == Status::Ok
                        && !this.invalidate_on(&workers[1 - i], &req.key).await
                        && !this.record_miss(&workers[i], &workers[1 - i], None).await
                    {
                        return Response::error(Status::Unavailable, MISS_UNRECORDED);
                    }
                    return resp;
                }
            }
            unavailable(&this)
        })
    }

    /// Drops `key` from one worker's cache (a short-lived tombstone with a fresh version, so
    /// no cache fill in flight can put an older value back); false if the worker did not.
    async fn invalidate_on(&self, w: &WorkerLink, key: &Bytes) -> bool {
        if matches!(w.state(), WorkerState::Down | WorkerState::Misconfigured) {
            // It gets nothing; it resyncs before it serves again.
            return false;
        }
        let mut req = Request::new(Op::Invalidate, key.clone());
        req.version = self.clock.next();
        let reply = w.send(&req, &Origin::INTERNAL);
        self.finish(w, reply).await.is_some()
    }

    /// Adapter mode: runs a Redis command on the destination through a worker of the pair
    /// of its first key, then invalidates every key it may touch (`touched`, from the
    /// command table: see `commands::adapter`) on both partners. The response's payload is
    /// the destination's RESP reply, as is.
    pub fn passthrough(
        self: &Arc<Self>,
        args: Vec<Bytes>,
        touched: Vec<Bytes>,
        origin: &Origin,
    ) -> BoxedResponse {
        let mut encoded = BytesMut::new();
        twincache_protocol::resp::encode_command(&args, &mut encoded);
        // Routed by its first key, which the worker drops from its cache under the key's order.
        let route = touched.first().or(args.get(1)).cloned().unwrap_or_default();
        let mut req = Request::new(Op::Passthrough, route);
        req.value = encoded.freeze();
        // The version the worker invalidates its cached copy of the first key with.
        req.version = self.clock.next();
        let read = self.read(req, origin);
        let this = self.clone();
        Box::pin(async move {
            let resp = read.await;
            let topo = this.topology.load_full();
            for key in touched {
                let pair = &topo[topo.pair_of(&key)];
                let [a, b] = &pair.workers;
                let (ia, ib) =
                    tokio::join!(this.invalidate_on(a, &key), this.invalidate_on(b, &key));
                // A copy left behind on one side is stale: that worker resyncs first.
                match (ia, ib) {
                    (true, false) => b.missed_write(),
                    (false, true) => a.missed_write(),
                    _ => {}
                }
            }
            resp
        })
    }
}
