//! Routing and failover with stand-in workers ([`WorkerLink::fake`]): what a request does
//! when a worker does not answer, misses a write, or refuses it as routed by an older map.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use twincache_protocol::cluster_map::ClusterMap;
use twincache_protocol::frame::{encode_response, frames, Op, Request, Response};
use twincache_protocol::slots::SlotMap;
use twincache_protocol::Status;

use super::link::Fake;
use super::{
    MembershipConfig, Mode, Origin, Pair, Router, RouterConfig, Topology, WorkerLink, WorkerState,
    Written, READ_RUN,
};

/// A router for `workers` (nothing need answer there): its links keep trying to connect
/// until the token is cancelled.
pub(super) fn start(
    workers: &[&str],
    state_file: Option<std::path::PathBuf>,
) -> (Router, CancellationToken) {
    let config = RouterConfig {
        default_ttl_ms: 0,
        connections_per_worker: 1,
        max_frame: 1 << 20,
        worker_timeout: Duration::from_millis(100),
        node_id: Some(1),
        mode: None,
        secret: None,
        tls: None,
        state_file,
        backlog: Default::default(),
        membership: MembershipConfig {
            rate: 0,
            batch: 256,
            from_file: false,
            listen: "127.0.0.1:7000".parse().unwrap(),
        },
    };
    let shutdown = CancellationToken::new();
    let workers: Vec<String> = workers.iter().map(|w| w.to_string()).collect();
    let router = Router::start(&workers, None, &config, &shutdown);
    (router, shutdown)
}

/// A router serving one pair of stand-in workers `a` and `b`, both in sync.
fn pair_of(a: Fake, b: Fake) -> (Arc<Router>, CancellationToken) {
    let (router, shutdown) = start(&["a:1", "b:1"], None);
    let links = [WorkerLink::fake("a:1", a), WorkerLink::fake("b:1", b)];
    router.topology.store(Arc::new(Topology {
        pairs: vec![Arc::new(Pair::new(links))],
        slots: SlotMap::even(1),
        moving: None,
    }));
    router.settle_mode(Mode::Replicated);
    router.set_claimed(true);
    (Arc::new(router), shutdown)
}

/// What a stand-in worker was sent.
type Sent = Arc<Mutex<Vec<Request>>>;

/// A worker that answers every request `Ok` (a GET with `v`), and keeps what it was sent.
fn healthy(sent: Sent) -> Fake {
    Arc::new(move |req: &Request| {
        sent.lock().unwrap().push(req.clone());
        Some(match req.op {
            Op::Get => Response::ok(Bytes::from_static(b"v")),
            _ => Response::ok(Bytes::new()),
        })
    })
}

fn unreachable() -> Fake {
    Arc::new(|_: &Request| None)
}

fn set(key: &'static str) -> Request {
    let mut req = Request::new(Op::Set, Bytes::from_static(key.as_bytes()));
    req.value = Bytes::from_static(b"x");
    req
}

fn ops(sent: &Mutex<Vec<Request>>, op: Op) -> Vec<Request> {
    sent.lock()
        .unwrap()
        .iter()
        .filter(|r| r.op == op)
        .cloned()
        .collect()
}

#[tokio::test]
async fn reads_alternate_between_in_sync_partners_in_runs() {
    let (a, b) = (Sent::default(), Sent::default());
    let (router, shutdown) = pair_of(healthy(a.clone()), healthy(b.clone()));
    let mut order = Vec::new();
    for _ in 0..4 * READ_RUN {
        let before = ops(&a, Op::Get).len();
        router
            .get(Bytes::from_static(b"k"), &Origin::INTERNAL)
            .await;
        order.push(ops(&a, Op::Get).len() > before);
    }
    assert_eq!(ops(&a, Op::Get).len(), 2 * READ_RUN);
    assert_eq!(ops(&b, Op::Get).len(), 2 * READ_RUN);
    for (i, run) in order.chunks(READ_RUN).enumerate() {
        assert!(run.iter().all(|&to_a| to_a == run[0]), "run {i}: {order:?}");
    }
    assert_ne!(order[0], order[READ_RUN]);
    shutdown.cancel();
}

#[tokio::test]
async fn a_read_goes_to_the_partner_when_a_worker_does_not_answer() {
    let sent = Arc::default();
    let (router, shutdown) = pair_of(unreachable(), healthy(sent));
    for _ in 0..4 {
        let resp = router
            .get(Bytes::from_static(b"k"), &Origin::INTERNAL)
            .await;
        assert_eq!((resp.status, &resp.payload[..]), (Status::Ok, &b"v"[..]));
    }
    assert!(router.stats.failovers.load(Ordering::Relaxed) > 0);
    shutdown.cancel();
}

#[tokio::test]
async fn a_write_one_worker_missed_is_acknowledged_once_the_miss_is_on_record() {
    let sent = Arc::default();
    let (router, shutdown) = pair_of(healthy(Arc::clone(&sent)), unreachable());
    let resp = router.write(set("k"), &Origin::INTERNAL).await;
    assert_eq!(resp.status, Status::Ok);
    assert_eq!(
        ops(&sent, Op::PartnerMissed).len(),
        1,
        "the holder counts it"
    );
    let b = router.pairs()[0].workers[1].clone();
    assert_eq!(b.state(), WorkerState::Stale);
    shutdown.cancel();
}

#[tokio::test]
async fn a_write_whose_miss_cannot_be_recorded_is_not_acknowledged() {
    let takes_sets_only: Fake =
        Arc::new(|req: &Request| (req.op == Op::Set).then(|| Response::ok(Bytes::new())));
    let (router, shutdown) = pair_of(takes_sets_only, unreachable());
    let resp = router.write(set("k"), &Origin::INTERNAL).await;
    assert_eq!(resp.status, Status::Unavailable);
    shutdown.cancel();
}

/// A worker that refuses the first `refusals` writes as routed by an older map (`Moved`
/// with `epoch`), then takes them.
fn moved_then_ok(refusals: usize, epoch: u64, sent: Arc<Mutex<Vec<Request>>>) -> Fake {
    let seen = AtomicUsize::new(0);
    Arc::new(move |req: &Request| {
        sent.lock().unwrap().push(req.clone());
        if req.op == Op::Set && seen.fetch_add(1, Ordering::SeqCst) < refusals {
            return Some(Response::error(Status::Moved, epoch.to_string()));
        }
        Some(Response::ok(Bytes::new()))
    })
}

#[tokio::test]
async fn a_write_refused_as_moved_is_routed_again_with_its_version() {
    let (sent_a, sent_b) = (Arc::default(), Arc::default());
    let (router, shutdown) = pair_of(
        healthy(Arc::clone(&sent_a)),
        moved_then_ok(1, 1, Arc::clone(&sent_b)),
    );
    let resp = router.write(set("k"), &Origin::INTERNAL).await;
    assert_eq!(resp.status, Status::Ok);
    assert_eq!(router.stats.reroutes.load(Ordering::Relaxed), 1);
    let (a, b) = (ops(&sent_a, Op::Set), ops(&sent_b, Op::Set));
    assert_eq!((a.len(), b.len()), (2, 2), "sent again to both");
    assert!(
        a.iter().chain(&b).all(|r| r.version == a[0].version),
        "one version: a later write of the session, routed by the new map, stays newer"
    );
    assert!(
        ops(&sent_a, Op::PartnerMissed).is_empty(),
        "no miss recorded"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_write_refused_as_moved_every_time_is_never_acknowledged() {
    let sent = Arc::default();
    let (router, shutdown) = pair_of(healthy(Arc::default()), moved_then_ok(usize::MAX, 1, sent));
    let resp = router.write(set("k"), &Origin::INTERNAL).await;
    assert_eq!(
        resp.status,
        Status::Unavailable,
        "taken by one worker, refused by the other"
    );
    assert!(String::from_utf8_lossy(&resp.payload).contains("cluster map is changing"));
    assert_eq!(router.stats.reroutes.load(Ordering::Relaxed), 4);
    shutdown.cancel();
}

/// A worker holding this pair's map at epoch 7: it answers `map get` with it (after `read`),
/// and refuses as `Moved` the SETs `refuse` picks.
fn ahead_at_7(
    refuse: impl Fn(&Request) -> bool + Send + Sync + 'static,
    read: impl Fn() + Send + Sync + 'static,
) -> Fake {
    let newer = ClusterMap {
        workers: vec!["a:1".into(), "b:1".into()],
        slots: SlotMap::even(1).with_epoch(7),
        moving: None,
        wanted: Vec::new(),
    };
    let text = format!("7\n{}", newer.text());
    Arc::new(move |req: &Request| {
        Some(match req.op {
            Op::Map => {
                read();
                Response::ok(Bytes::from(text.clone()))
            }
            Op::Set if refuse(req) => Response::error(Status::Moved, "7"),
            _ => Response::ok(Bytes::new()),
        })
    })
}

#[tokio::test]
async fn a_worker_with_a_newer_map_has_it_adopted_before_the_request_goes_again() {
    let refusals = AtomicUsize::new(0);
    let b = ahead_at_7(move |_| refusals.fetch_add(1, Ordering::SeqCst) == 0, || {});
    let (router, shutdown) = pair_of(healthy(Arc::default()), b);
    let links_before = router.pairs()[0].clone();
    let resp = router.write(set("k"), &Origin::INTERNAL).await;
    assert_eq!(resp.status, Status::Ok);
    let topo = router.pairs();
    assert_eq!(topo.slots.epoch(), 7, "routing by the newer map");
    assert!(
        Arc::ptr_eq(&topo[0], &links_before),
        "the same pair keeps its links"
    );
    shutdown.cancel();
}

/// Many requests refused at once by a worker with a newer map: the map is read from it
/// once, not once per request, one after the other under the lock for map changes (each
/// reading of the map is a round trip to the worker, and the requests wait in line for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_refused_at_once_read_the_newer_map_once() {
    let reads = Arc::new(AtomicUsize::new(0));
    let refused = Mutex::new(std::collections::HashSet::new());
    let counted = Arc::clone(&reads);
    let b = ahead_at_7(
        move |req| refused.lock().unwrap().insert(req.key.clone()),
        move || {
            counted.fetch_add(1, Ordering::SeqCst);
            // A round trip's worth, so the other refusals arrive meanwhile.
            std::thread::sleep(Duration::from_millis(20));
        },
    );
    let (router, shutdown) = pair_of(healthy(Arc::default()), b);
    let writes: Vec<_> = (0..16)
        .map(|i| {
            let mut req = Request::new(Op::Set, Bytes::from(format!("k{i}")));
            req.value = Bytes::from_static(b"x");
            tokio::spawn(router.write(req, &Origin::INTERNAL))
        })
        .collect();
    for w in writes {
        assert_eq!(w.await.unwrap().status, Status::Ok);
    }
    assert_eq!(router.pairs().slots.epoch(), 7);
    let reads = reads.load(Ordering::SeqCst);
    assert!(reads <= 2, "the newer map was read {reads} times");
    shutdown.cancel();
}

/// `MOVING_SOURCE` shares its bit with KEEPTTL: a SET keeps the option it was given.
#[tokio::test]
async fn a_set_with_keepttl_reaches_the_workers_with_it() {
    let sent = Arc::default();
    let (router, shutdown) = pair_of(healthy(Arc::clone(&sent)), healthy(Arc::default()));
    let mut req = set("k");
    req.flags = twincache_protocol::frame::flags::KEEP_TTL;
    assert_eq!(
        router.write(req, &Origin::INTERNAL).await.status,
        Status::Ok
    );
    let sets = ops(&sent, Op::Set);
    assert!(sets[0].flags & twincache_protocol::frame::flags::KEEP_TTL != 0);
    shutdown.cancel();
}

#[tokio::test]
async fn no_program_runs_on_a_partial_copy() {
    let (router, shutdown) = pair_of(healthy(Sent::default()), healthy(Sent::default()));
    let topo = router.topology.load_full();
    let pair = &topo.pairs[0];
    let [a, b] = &pair.workers;
    assert_eq!(router.primaries(pair), [Some(0), Some(1)]);
    // A promoted to serve alone while its partner was away: it may lack the partner's latest.
    a.partial.store(true, Ordering::Release);
    assert_eq!(
        router.primaries(pair),
        [Some(1), None],
        "the complete copy only"
    );
    b.set_state(WorkerState::Down);
    assert_eq!(
        router.primaries(pair),
        [None, None],
        "the partial copy is never one"
    );
    // Reads still take it (a stale answer beats none).
    assert_eq!(router.read_order(pair), [Some(0), None]);
    a.partial.store(false, Ordering::Release);
    assert_eq!(
        router.primaries(pair),
        [Some(0), None],
        "merged: complete again"
    );
    shutdown.cancel();
}

/// A read of a key whose read-modify-write the session has in flight goes to the primary,
/// behind the program; with only a partial copy serving there is none (the program is
/// refused), and the read goes where reads go rather than failing.
#[tokio::test]
async fn a_read_behind_a_refused_program_is_served_by_the_partial_copy() {
    let sent = Sent::default();
    let (router, shutdown) = pair_of(healthy(sent.clone()), unreachable());
    let topo = router.topology.load_full();
    let [a, b] = &topo.pairs[0].workers;
    a.partial.store(true, Ordering::Release);
    b.set_state(WorkerState::Down);
    let origin = Origin {
        rmw: Some(Arc::new(super::rmw::Pending::default())),
        ..Origin::default()
    };
    let key = Bytes::from_static(b"k");
    let _in_flight = origin.rmw.as_ref().unwrap().start(0);
    let resp = router.get(key, &origin).await;
    assert_eq!((resp.status, &resp.payload[..]), (Status::Ok, &b"v"[..]));
    assert_eq!(ops(&sent, Op::Get).len(), 1);
    shutdown.cancel();
}

/// A worker that takes batches (counted in `batches`), answering each write in one as
/// `inner` answers it alone; `None` from `inner` for any of them leaves the batch unanswered.
fn batching(batches: Arc<AtomicUsize>, inner: Fake) -> Fake {
    Arc::new(move |req: &Request| {
        if req.op != Op::Batch {
            return inner(req);
        }
        batches.fetch_add(1, Ordering::SeqCst);
        let mut out = bytes::BytesMut::new();
        for (i, sub) in frames::<Request>(req.value.clone()).enumerate() {
            let resp = inner(&sub.expect("a batch parses"))?;
            encode_response(i as u64, resp.status, &resp.payload, &mut out);
        }
        Some(Response::ok(out.freeze()))
    })
}

/// Both workers of the router's pair said they take batches.
fn takes_batches(router: &Router) {
    for w in &router.pairs()[0].workers {
        w.takes_batches.store(true, Ordering::Relaxed);
    }
}

/// `keys` SET as one batch for the router's one pair, routed by the map in force.
async fn batch_of(router: &Arc<Router>, keys: &[&'static str]) -> Written {
    router
        .write_batch(&router.pairs(), 0, sets(keys), &Origin::INTERNAL)
        .await
}

fn sets(keys: &[&'static str]) -> Vec<Request> {
    keys.iter().map(|k| set(k)).collect()
}

fn answers(written: Written) -> Vec<Status> {
    match written {
        Written::AllOk => Vec::new(),
        Written::Each(each) => each.into_iter().map(|r| r.status).collect(),
    }
}

#[tokio::test]
async fn a_batch_of_sets_reaches_each_worker_in_one_frame_in_order() {
    let (sent_a, sent_b) = (Sent::default(), Sent::default());
    let (batches_a, batches_b) = (Arc::default(), Arc::default());
    let (router, shutdown) = pair_of(
        batching(Arc::clone(&batches_a), healthy(Arc::clone(&sent_a))),
        batching(Arc::clone(&batches_b), healthy(Arc::clone(&sent_b))),
    );
    takes_batches(&router);
    let written = batch_of(&router, &["a", "b", "c"]).await;
    assert!(matches!(written, Written::AllOk));
    assert_eq!(router.stats.batched_writes.load(Ordering::Relaxed), 3);
    assert_eq!(batches_a.load(Ordering::SeqCst), 1);
    assert_eq!(batches_b.load(Ordering::SeqCst), 1);
    let (a, b) = (ops(&sent_a, Op::Set), ops(&sent_b, Op::Set));
    let keys: Vec<&[u8]> = a.iter().map(|r| &r.key[..]).collect();
    assert_eq!(keys, [b"a", b"b", b"c"]);
    assert!(
        a.windows(2).all(|w| w[0].version < w[1].version),
        "stamped in order"
    );
    let versions = |r: &[Request]| r.iter().map(|r| r.version).collect::<Vec<_>>();
    assert_eq!(versions(&a), versions(&b), "the same versions on both");
    shutdown.cancel();
}

#[tokio::test]
async fn a_worker_that_has_not_said_it_takes_batches_gets_the_writes_one_by_one() {
    let (sent_a, sent_b) = (Sent::default(), Sent::default());
    let batches_a = Arc::new(AtomicUsize::new(0));
    let (router, shutdown) = pair_of(
        batching(Arc::clone(&batches_a), healthy(Arc::clone(&sent_a))),
        healthy(Arc::clone(&sent_b)),
    );
    router.pairs()[0].workers[0]
        .takes_batches
        .store(true, Ordering::Relaxed);
    let written = batch_of(&router, &["a", "b"]).await;
    assert_eq!(answers(written), [Status::Ok, Status::Ok]);
    assert_eq!(batches_a.load(Ordering::SeqCst), 0);
    assert_eq!(ops(&sent_a, Op::Set).len(), 2);
    assert_eq!(ops(&sent_b, Op::Set).len(), 2);
    assert!(ops(&sent_b, Op::Batch).is_empty());
    shutdown.cancel();
}

#[tokio::test]
async fn a_worker_whose_answer_is_not_a_batchs_missed_every_write_in_it() {
    let (sent_a, sent_b) = (Sent::default(), Sent::default());
    let refuses: Fake = {
        let sent = Arc::clone(&sent_b);
        Arc::new(move |req: &Request| {
            sent.lock().unwrap().push(req.clone());
            Some(match req.op {
                Op::Batch => Response::status(Status::InvalidCommand),
                _ => Response::ok(Bytes::new()),
            })
        })
    };
    let (router, shutdown) = pair_of(
        batching(Arc::default(), healthy(Arc::clone(&sent_a))),
        refuses,
    );
    takes_batches(&router);
    let written = batch_of(&router, &["a", "b"]).await;
    assert_eq!(answers(written), [Status::Ok, Status::Ok]);
    assert_eq!(
        ops(&sent_a, Op::PartnerMissed).len(),
        2,
        "each miss on record before it is acknowledged"
    );
    assert!(ops(&sent_b, Op::Set).is_empty(), "nothing sent again");
    let b = router.pairs()[0].workers[1].clone();
    assert_eq!(b.state(), WorkerState::Stale);
    assert!(!b.takes_batches.load(Ordering::Relaxed));
    shutdown.cancel();
}

#[tokio::test]
async fn a_batch_one_worker_missed_is_acknowledged_once_each_miss_is_on_record() {
    let sent = Sent::default();
    let (router, shutdown) = pair_of(
        batching(Arc::default(), healthy(Arc::clone(&sent))),
        unreachable(),
    );
    takes_batches(&router);
    let written = batch_of(&router, &["a", "b", "c"]).await;
    assert_eq!(answers(written), [Status::Ok; 3]);
    assert_eq!(
        ops(&sent, Op::PartnerMissed).len(),
        3,
        "the holder counts them"
    );
    assert_eq!(router.pairs()[0].workers[1].state(), WorkerState::Stale);
    shutdown.cancel();
}

#[tokio::test]
async fn a_write_of_a_batch_refused_as_moved_is_routed_again_with_its_version() {
    let (sent_a, sent_b) = (Sent::default(), Sent::default());
    let (router, shutdown) = pair_of(
        batching(Arc::default(), healthy(Arc::clone(&sent_a))),
        batching(Arc::default(), moved_then_ok(1, 1, Arc::clone(&sent_b))),
    );
    takes_batches(&router);
    let written = batch_of(&router, &["a", "b"]).await;
    assert_eq!(answers(written), [Status::Ok, Status::Ok]);
    assert_eq!(router.stats.reroutes.load(Ordering::Relaxed), 1);
    let b = ops(&sent_b, Op::Set);
    assert_eq!(b.len(), 3, "the batch's two, then the refused one again");
    assert_eq!((&b[2].key[..], b[2].version), (&b"a"[..], b[0].version));
    shutdown.cancel();
}

#[tokio::test]
async fn a_batch_routed_by_a_map_since_replaced_goes_one_by_one() {
    let (sent_a, batches_a) = (Sent::default(), Arc::new(AtomicUsize::new(0)));
    let (router, shutdown) = pair_of(
        batching(Arc::clone(&batches_a), healthy(Arc::clone(&sent_a))),
        batching(Arc::default(), healthy(Arc::default())),
    );
    takes_batches(&router);
    let now = router.pairs();
    let older = Arc::new(Topology {
        pairs: now.pairs.clone(),
        slots: now.slots.clone(),
        moving: None,
    });
    let written = router
        .write_batch(&older, 0, sets(&["a", "b"]), &Origin::INTERNAL)
        .await;
    assert_eq!(answers(written), [Status::Ok, Status::Ok]);
    assert_eq!(
        batches_a.load(Ordering::SeqCst),
        0,
        "each routed again alone"
    );
    assert_eq!(ops(&sent_a, Op::Set).len(), 2);
    shutdown.cancel();
}
