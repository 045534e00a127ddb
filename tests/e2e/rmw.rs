//! Read-modify-writes and whole-cluster commands under faults and concurrent writes:
//! - INCR from many clients through two orchestrators while each worker of the pair is
//!   killed and restarted in turn ends with every key equal to the INCRs acknowledged, on
//!   both workers (read directly, with the client library);
//! - SCAN across pairs returns every key present for the whole walk while others are
//!   written and deleted;
//! - FLUSHALL taken by one worker while its partner is cut off: the partner's refill does
//!   not bring a flushed key back;
//! - APPENDs to long strings, encrypted, while each worker is killed and restarted: every
//!   acknowledged piece in its string once, in order, and both workers equal;
//! - one hot key, pipelined INCRs and HSETs from many connections through two orchestrators
//!   (one with two links per worker, so programs arrive out of version order): every one
//!   applied, none refused, and a pipelined SET after an INCR of its key still wins.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twincache_client::Client;

use crate::faults::{state_of, wait_status, worker_on, FAST};
use crate::harness::{encode, Cluster, Gate, Proc, RespConn};

/// Timeouts long enough that a busy machine never makes a live worker look dead (a
/// kill -9 is seen at once, by the closed connections), and health checks fast enough that
/// a restarted worker is back within a second.
const ORCHESTRATOR: &[&str] = &[
    "--worker-timeout",
    "1s",
    "--health-interval",
    "100ms",
    "--health-timeout",
    "1s",
];

const KEYS: [&str; 4] = ["c0", "c1", "{c}2", "{c}3"];

/// Sends INCR `key` and reads the reply, without panicking on a closed connection.
async fn incr(stream: &mut TcpStream, buf: &mut BytesMut, key: &str) -> Option<Bytes> {
    let mut out = BytesMut::new();
    encode(&[b"INCR", key.as_bytes()], &mut out);
    stream.write_all(&out).await.ok()?;
    loop {
        let frozen = Bytes::copy_from_slice(buf);
        if let Ok((_, used)) = twincache_protocol::resp::decode_reply(&frozen) {
            return Some(buf.split_to(used).freeze());
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// A client doing INCRs on [`KEYS`] in turn through `orch` until `stop`, counting those
/// acknowledged in `acked` and keeping every other answer in `odd`.
async fn incr_client(
    orch: SocketAddr,
    n: usize,
    acked: Arc<[AtomicU64; 4]>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut odd = Vec::new();
    let mut stream = TcpStream::connect(orch).await.unwrap();
    let mut buf = BytesMut::new();
    let mut i = n;
    while !stop.load(Ordering::Relaxed) {
        let k = i % KEYS.len();
        i += 1;
        match incr(&mut stream, &mut buf, KEYS[k]).await {
            Some(r) if r.starts_with(b":") => {
                acked[k].fetch_add(1, Ordering::Relaxed);
            }
            Some(r) if r.starts_with(b"-TRYAGAIN") => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Some(r) => odd.push(String::from_utf8_lossy(&r).into_owned()),
            None => {
                odd.push("connection closed".into());
                stream = TcpStream::connect(orch).await.unwrap();
                buf.clear();
            }
        }
    }
    odd
}

/// Stops the clients and checks that each was answered nothing but what it expects or
/// TRYAGAIN (each returns the other answers it got).
async fn stop_clients(stop: &AtomicBool, clients: Vec<tokio::task::JoinHandle<Vec<String>>>) {
    stop.store(true, Ordering::Relaxed);
    let mut odd = Vec::new();
    for c in clients {
        odd.extend(c.await.unwrap());
    }
    assert!(
        odd.is_empty(),
        "answers other than expected or TRYAGAIN: {odd:?}"
    );
}

/// Two workers started with `flags` and an orchestrator with `orchestrator`'s in front of
/// them, once it sees both in sync.
async fn pair_of(flags: &[&str], orchestrator: &[&str]) -> (Proc, Proc, Proc) {
    let (a, b) = (worker_on(0, flags), worker_on(0, flags));
    let o = Proc::orchestrator(&[a.addr, b.addr], orchestrator);
    in_sync(&[o.addr], &[a.addr, b.addr]).await;
    (a, b, o)
}

async fn in_sync(orchs: &[SocketAddr], workers: &[SocketAddr]) {
    for o in orchs {
        wait_status(*o, "both workers in sync", |s| {
            workers.iter().all(|w| state_of(s, w) == "in_sync")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_through_two_orchestrators_survives_kill_and_restart_of_each_worker() {
    let mut a = worker_on(0, &[]);
    let mut b = worker_on(0, &[]);
    let (wa, wb) = (a.addr, b.addr);
    let o1 = Proc::orchestrator(&[wa, wb], ORCHESTRATOR);
    let o2 = Proc::orchestrator(&[wa, wb], ORCHESTRATOR);
    let orchs = [o1.addr, o2.addr];
    in_sync(&orchs, &[wa, wb]).await;

    let acked: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|n| tokio::spawn(incr_client(orchs[n % 2], n, acked.clone(), stop.clone())))
        .collect();
    let total =
        |acked: &[AtomicU64; 4]| acked.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>();

    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut counts = vec![total(&acked)];
    // The pair's primary (both synced at the same moment: worker 0) dies; its partner takes
    // over once copies of its last programs can no longer be on their way (one worker
    // timeout).
    a.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    counts.push(total(&acked));
    a = worker_on(wa.port(), &[]);
    in_sync(&orchs, &[wa, wb]).await;
    // Back from its refill, it is the partner: the primary stays where programs run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    counts.push(total(&acked));
    b.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    counts.push(total(&acked));
    b = worker_on(wb.port(), &[]);
    in_sync(&orchs, &[wa, wb]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_clients(&stop, clients).await;
    counts.push(total(&acked));
    assert!(
        counts[0] > 100 && counts.windows(2).all(|w| w[1] > w[0] + 50),
        "INCRs acknowledged in every phase: {counts:?}"
    );

    in_sync(&orchs, &[wa, wb]).await;
    for (k, key) in KEYS.iter().enumerate() {
        let want = acked[k].load(Ordering::Relaxed).to_string();
        for w in [wa, wb] {
            let got = Client::connect(&w.to_string())
                .await
                .unwrap()
                .get::<Bytes>(*key)
                .await
                .unwrap();
            assert_eq!(
                got.as_deref(),
                Some(want.as_bytes()),
                "{key} on worker {w}: acknowledged INCRs {want}"
            );
        }
        for o in orchs {
            let mut c = RespConn::connect(o).await;
            let got = c.call(&[b"GET", key.as_bytes()]).await;
            assert_eq!(got, Bytes::from(format!("${}\r\n{want}\r\n", want.len())));
        }
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_takes_every_pipelined_rmw_from_many_connections() {
    let cluster = Cluster::start_with(1, ORCHESTRATOR).await;
    let workers: Vec<SocketAddr> = cluster.workers.iter().map(|w| w.addr).collect();
    let two_links = Proc::orchestrator(
        &workers,
        &[ORCHESTRATOR, &["--connections-per-worker", "2"]].concat(),
    );
    in_sync(&[cluster.orch.addr, two_links.addr], &workers).await;
    const CONNS: usize = 16;
    const DEPTH: usize = 50;
    let tasks: Vec<_> = (0..CONNS)
        .map(|n| {
            let addr = [cluster.orch.addr, two_links.addr][n % 2];
            tokio::spawn(async move {
                let mut c = RespConn::connect(addr).await;
                let mut out = BytesMut::new();
                for i in 0..DEPTH {
                    let field = format!("f{}", (n * DEPTH + i) % 37);
                    encode(&[b"INCR", b"hot"], &mut out);
                    encode(&[b"HINCRBY", b"{hot}h", field.as_bytes(), b"1"], &mut out);
                }
                c.send_raw(&out).await;
                let mut odd = Vec::new();
                for _ in 0..2 * DEPTH {
                    let r = c.reply().await;
                    if !r.starts_with(b":") {
                        odd.push(String::from_utf8_lossy(&r).into_owned());
                    }
                }
                odd
            })
        })
        .collect();
    let mut odd = Vec::new();
    for t in tasks {
        odd.extend(t.await.unwrap());
    }
    assert!(
        odd.is_empty(),
        "every INCR and HINCRBY applied; {} not, first {:?}",
        odd.len(),
        &odd[..odd.len().min(3)]
    );
    let total = (CONNS * DEPTH).to_string();
    for w in &workers {
        let client = Client::connect(&w.to_string()).await.unwrap();
        let got = client.get::<Bytes>("hot").await.unwrap();
        assert_eq!(got.as_deref(), Some(total.as_bytes()), "hot on worker {w}");
    }
    let mut c = RespConn::connect(two_links.addr).await;
    let hlen = c.call(&[b"HLEN", b"{hot}h"]).await;
    assert_eq!(&hlen[..], b":37\r\n");
    // Pipelined on one connection, a SET issued after an INCR of its key is the later write
    // even when the INCR had to take a version after another orchestrator's.
    let mut out = BytesMut::new();
    encode(&[b"INCR", b"hot"], &mut out);
    encode(&[b"SET", b"hot", b"final"], &mut out);
    c.send_raw(&out).await;
    c.reply().await;
    assert_eq!(&c.reply().await[..], b"+OK\r\n");
    assert_eq!(&c.call(&[b"GET", b"hot"]).await[..], b"$5\r\nfinal\r\n");
}

/// Clients that hang up right after sending pipelined INCRs: every change a primary made
/// still reaches its partner, so both workers end with the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_mid_pipeline_leaves_both_partners_equal() {
    let cluster = Cluster::start_with(1, ORCHESTRATOR).await;
    let workers: Vec<SocketAddr> = cluster.workers.iter().map(|w| w.addr).collect();
    in_sync(&[cluster.orch.addr], &workers).await;
    let keys: Vec<String> = (0..4).map(|k| format!("gone{k}")).collect();
    for round in 0..10 {
        let mut out = BytesMut::new();
        for i in 0..400 {
            encode(
                &[b"INCR", keys[(round + i) % keys.len()].as_bytes()],
                &mut out,
            );
        }
        let mut c = RespConn::connect(cluster.orch.addr).await;
        c.send_raw(&out).await;
        // Read a little, so some answers are under way when the connection goes.
        c.reply().await;
    }
    let direct = [
        Client::connect(&workers[0].to_string()).await.unwrap(),
        Client::connect(&workers[1].to_string()).await.unwrap(),
    ];
    let mut differ = Vec::new();
    for _ in 0..50 {
        differ.clear();
        for k in &keys {
            let a = direct[0].get::<Bytes>(k.as_str()).await.unwrap();
            let b = direct[1].get::<Bytes>(k.as_str()).await.unwrap();
            if a != b {
                differ.push(format!("{k}: {a:?} vs {b:?}"));
            }
        }
        if differ.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(differ.is_empty(), "partners differ: {differ:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_across_pairs_returns_every_key_present_throughout() {
    let cluster = Cluster::start(2).await;
    let addr = cluster.orch.addr;
    let client = Client::connect(&addr.to_string()).await.unwrap();
    let old: Vec<String> = (0..2000).map(|i| format!("old:{i}")).collect();
    for chunk in old.chunks(200) {
        let sets: Vec<_> = chunk.iter().map(|k| client.set(k, "v")).collect();
        for s in futures_util::future::join_all(sets).await {
            s.unwrap();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, stop, written) = (client.clone(), stop.clone(), written.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Enough new keys that tables grow (and shards are walked again) meanwhile.
                client.set(format!("new:{n}"), "v").await.unwrap();
                if n.is_multiple_of(3) {
                    client.del(format!("new:{}", n / 2)).await.unwrap();
                }
                n += 1;
                written.store(n, Ordering::Relaxed);
            }
            n
        })
    };
    let mut c = RespConn::connect(addr).await;
    // The walks again until the writer has written enough meanwhile (on a loaded machine
    // one round of them can be over before it has).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    while rounds == 0 || written.load(Ordering::Relaxed) <= 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        rounds += 1;
        for pattern in [&b"*"[..], b"old:*"] {
            let mut seen = HashSet::new();
            let mut cursor = b"0".to_vec();
            let mut steps = 0;
            loop {
                let reply = c
                    .call(&[b"SCAN", &cursor, b"MATCH", pattern, b"COUNT", b"20"])
                    .await;
                let (parsed, _) = twincache_protocol::resp::decode_reply(&reply).unwrap();
                let twincache_protocol::resp::Reply::Array(parts) = parsed else {
                    panic!("{reply:?}")
                };
                let [twincache_protocol::resp::Reply::Bulk(next), twincache_protocol::resp::Reply::Array(keys)] =
                    parts.as_slice()
                else {
                    panic!("{reply:?}")
                };
                for k in keys {
                    if let twincache_protocol::resp::Reply::Bulk(k) = k {
                        seen.insert(k.clone());
                    }
                }
                steps += 1;
                if next.as_ref() == b"0" {
                    break;
                }
                cursor = next.to_vec();
            }
            assert!(steps > 10, "a walk of many steps ({steps})");
            for k in &old {
                assert!(
                    seen.contains(k.as_bytes()),
                    "{k} missed by SCAN MATCH {pattern:?}"
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(
        writer.await.unwrap() > 100,
        "keys were written during the walks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_taken_alone_is_not_undone_by_the_partners_refill() {
    let a = worker_on(0, &[]);
    let b = worker_on(0, &[]);
    let gate = Gate::start(a.addr).await;
    let orch = Proc::orchestrator(&[gate.addr, b.addr], FAST);
    let (seen_a, wb) = (gate.addr, b.addr);
    wait_status(orch.addr, "both in sync", |s| {
        state_of(s, &seen_a) == "in_sync" && state_of(s, &wb) == "in_sync"
    })
    .await;
    let client = Client::connect(&orch.addr.to_string()).await.unwrap();
    for i in 0..200 {
        client.set(format!("old:{i}"), "v").await.unwrap();
    }
    // A is cut off: the flush reaches B alone, and a write after it too.
    gate.cut();
    wait_status(orch.addr, "A down", |s| state_of(s, &seen_a) == "down").await;
    let mut c = RespConn::connect(orch.addr).await;
    assert_eq!(&c.call(&[b"FLUSHALL"]).await[..], b"+OK\r\n");
    assert_eq!(&c.call(&[b"SET", b"after", b"1"]).await[..], b"+OK\r\n");
    // A comes back holding every old key, stale; it refills from B and drops them.
    gate.restore();
    wait_status(orch.addr, "A back in sync", |s| {
        state_of(s, &seen_a) == "in_sync"
    })
    .await;
    for w in [a.addr, b.addr] {
        let direct = Client::connect(&w.to_string()).await.unwrap();
        for i in (0..200).step_by(7) {
            assert_eq!(
                direct.get::<Bytes>(format!("old:{i}")).await.unwrap(),
                None,
                "old:{i} on {w}"
            );
        }
        assert_eq!(
            direct.get::<Bytes>("after").await.unwrap().as_deref(),
            Some(&b"1"[..]),
            "on {w}"
        );
    }
    assert_eq!(&c.call(&[b"DBSIZE"]).await[..], b":1\r\n");
}

/// A `redis` crate connection to `addr` patient enough for debug builds on a busy machine.
async fn patient_con(addr: SocketAddr) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection_with_config(&crate::harness::patient_redis())
        .await
        .unwrap()
}

/// Runs `cmd` through the orchestrator at `addr` until it answers other than TRYAGAIN (a
/// pair whose worker just died answers that until the health check has seen it).
async fn redis_until_served<T: redis::FromRedisValue>(addr: SocketAddr, cmd: &redis::Cmd) -> T {
    let mut con = patient_con(addr).await;
    for _ in 0..200 {
        match cmd.query_async::<T>(&mut con).await {
            Ok(v) => return v,
            // (The `redis` crate names the error `TryAgain` in its text.)
            Err(e) if e.to_string().to_ascii_uppercase().contains("TRYAGAIN") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("never served");
}

/// A hash past the packed form's limits is kept as records, one sealed per field (here
/// encrypted): its single-field writes reach the partner in that form, a refill carries it
/// as it is, and either worker alone answers it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_encrypted_hash_survives_the_loss_of_either_worker() {
    use std::collections::BTreeMap;
    let key = crate::harness::keygen();
    let file = key.arg();
    let flags = ["--encryption-key-file", file.as_str()];
    let (mut a, mut b, o) = pair_of(&flags, FAST).await;
    let (wa, wb) = (a.addr, b.addr);
    let mut con = patient_con(o.addr).await;

    let mut model: BTreeMap<String, String> = (0..300)
        .map(|i| (format!("field:{i}"), format!("value {i}")))
        .collect();
    let mut hset = redis::cmd("HSET");
    hset.arg("h");
    for (f, v) in &model {
        hset.arg(f).arg(v);
    }
    let added: i64 = redis_until_served(o.addr, &hset).await;
    assert_eq!(added, 300);
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg("h")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(encoding, "records");

    // Single-field writes, pipelined.
    let mut pipe = redis::pipe();
    for i in 0..100 {
        pipe.cmd("HSET")
            .arg("h")
            .arg(format!("field:{i}"))
            .arg(format!("new {i}"));
        pipe.cmd("HINCRBY").arg("h").arg("count").arg(1);
        model.insert(format!("field:{i}"), format!("new {i}"));
    }
    pipe.cmd("HDEL").arg("h").arg("field:250");
    model.remove("field:250");
    model.insert("count".into(), "100".into());
    let _: Vec<redis::Value> = pipe.query_async(&mut con).await.unwrap();

    // Worker b down: a takes writes alone; b comes back empty and refills from a.
    b.kill();
    let more: i64 =
        redis_until_served(o.addr, redis::cmd("HSET").arg("h").arg("later").arg("x")).await;
    assert_eq!(more, 1);
    model.insert("later".into(), "x".into());
    b = worker_on(wb.port(), &flags);
    in_sync(&[o.addr], &[wa, wb]).await;

    // Worker a down: b alone answers the whole hash, and takes a field write.
    a.kill();
    let incr: i64 =
        redis_until_served(o.addr, redis::cmd("HINCRBY").arg("h").arg("count").arg(1)).await;
    assert_eq!(incr, 101);
    model.insert("count".into(), "101".into());
    let all: BTreeMap<String, String> =
        redis_until_served(o.addr, redis::cmd("HGETALL").arg("h")).await;
    assert_eq!(all, model);
    let len: usize = redis_until_served(o.addr, redis::cmd("HLEN").arg("h")).await;
    assert_eq!(len, model.len());
    let one: String = redis_until_served(o.addr, redis::cmd("HGET").arg("h").arg("field:7")).await;
    assert_eq!(one, "new 7");
    drop((a, b, o));
}

/// `name`'s value in the `/metrics` of the orchestrator `o` (started with `--http`).
async fn counter(o: &Proc, name: &str) -> u64 {
    let url = format!("http://{}/metrics", o.http.expect("--http given"));
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// HINCRBYs on one large hash from many connections through two orchestrators: two links
/// to each worker, so the partner gets edits out of order, refuses those whose base it
/// lacks, and is sent the hash whole. It ends with every acknowledged HINCRBY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_a_large_hash_from_two_orchestrators_all_reach_the_partner() {
    let mut a = worker_on(0, &[]);
    let b = worker_on(0, &[]);
    let (wa, wb) = (a.addr, b.addr);
    let flags: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["--http", "127.0.0.1:0"])
        .collect();
    let orchs = [
        Proc::orchestrator(&[wa, wb], &flags),
        Proc::orchestrator(&[wa, wb], &flags),
    ];
    let addrs = [orchs[0].addr, orchs[1].addr];
    in_sync(&addrs, &[wa, wb]).await;
    let mut hset = redis::cmd("HSET");
    hset.arg("big");
    for i in 0..300 {
        hset.arg(format!("field:{i}")).arg("x");
    }
    let _: i64 = redis_until_served(addrs[0], &hset).await;

    const CLIENTS: usize = 8;
    let acked: Arc<[AtomicU64; CLIENTS]> = Arc::new(Default::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (acked, stop, addr) = (acked.clone(), stop.clone(), addrs[n % 2]);
            tokio::spawn(async move {
                let mut con = patient_con(addr).await;
                while !stop.load(Ordering::Relaxed) {
                    let mut pipe = redis::pipe();
                    for _ in 0..16 {
                        pipe.cmd("HINCRBY").arg("big").arg(format!("n{n}")).arg(1);
                    }
                    let done: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
                    acked[n].fetch_add(done.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let whole = counter(&orchs[0], "twincache_rmw_whole_copies_total").await
        + counter(&orchs[1], "twincache_rmw_whole_copies_total").await;

    // The primary (worker a: both were in sync from the start) goes; b answers alone.
    a.kill();
    let all: std::collections::HashMap<String, String> =
        redis_until_served(addrs[0], redis::cmd("HGETALL").arg("big")).await;
    assert_eq!(all.len(), 300 + CLIENTS);
    for n in 0..CLIENTS {
        let want = acked[n].load(Ordering::Relaxed);
        assert!(want > 0);
        assert_eq!(all[&format!("n{n}")], want.to_string(), "client {n}");
    }
    assert!(
        whole > 0,
        "no edit was sent again whole: the test did not reorder copies"
    );
    drop((b, orchs));
}

/// An INCR, retried while the pair answers that it cannot take one now (a failover).
async fn incr_retrying(client: &Client, key: &str) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.incr(key).await {
            Ok(n) => return n,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(
                    matches!(
                        e.status(),
                        Some(twincache_client::Status::Unavailable) | None
                    ),
                    "{e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("INCR {key} not taken within 20 s: {e}"),
        }
    }
}

/// A worker promoted to serve alone with a copy that may lack its partner's latest writes
/// (it was stopped while its partner took INCRs alone, then the partner stopped) serves
/// reads and plain writes, but runs no read-modify-write: an INCR computed there from the
/// older value, and stamped newer, would win over the partner's acknowledged ones once the
/// two merge (the counter went back from 8 to 6). It answers TRYAGAIN until the partner is
/// back, and the counter then goes on from the last acknowledged value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_copy_serving_alone_runs_no_read_modify_write() {
    let (a, b) = (worker_on(0, &[]), worker_on(0, &[]));
    let (wa, wb) = (a.addr, b.addr);
    let orch = Proc::orchestrator(&[wa, wb], ORCHESTRATOR);
    let addr = orch.addr;
    in_sync(&[addr], &[wa, wb]).await;
    let client = Client::connect(&addr.to_string()).await.unwrap();
    for _ in 0..5 {
        incr_retrying(&client, "ctr").await;
    }
    a.signal("STOP");
    wait_status(addr, "a down", |s| state_of(s, &wa) == "down").await;
    for n in 6..=8 {
        assert_eq!(incr_retrying(&client, "ctr").await, n, "taken by b alone");
    }
    b.signal("STOP");
    wait_status(addr, "b down", |s| state_of(s, &wb) == "down").await;
    a.signal("CONT");
    wait_status(addr, "a serving alone", |s| state_of(s, &wa) == "in_sync").await;
    // Its copy serves what does not depend on what it may lack.
    client.set("plain", "write").await.unwrap();
    assert_eq!(
        client.get::<Bytes>("plain").await.unwrap().as_deref(),
        Some(&b"write"[..])
    );
    let refused = client.incr("ctr").await.unwrap_err();
    assert_eq!(
        refused.status(),
        Some(twincache_client::Status::Unavailable),
        "{refused}"
    );
    assert!(refused.to_string().contains("may lack writes"), "{refused}");
    b.signal("CONT");
    in_sync(&[addr], &[wa, wb]).await;
    assert_eq!(incr_retrying(&client, "ctr").await, 9);
    for w in [wa, wb] {
        let direct = Client::connect(&w.to_string()).await.unwrap();
        assert_eq!(
            direct.get::<Bytes>("ctr").await.unwrap().as_deref(),
            Some(&b"9"[..]),
            "on {w}"
        );
        assert_eq!(
            direct.get::<Bytes>("plain").await.unwrap().as_deref(),
            Some(&b"write"[..]),
            "on {w}"
        );
    }
}

/// A burst of pipelined APPENDs from many clients onto a few strings growing to most of a
/// megabyte: every one acknowledged, no worker marked as having missed a write, and both
/// workers end with the same strings, of the length the APPENDs add up to. (Each APPEND
/// sealed its whole string again on both workers and sent all of it to the partner: a
/// burst of this shape answered thousands of errors and took the pair down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_appends_to_long_strings_fails_none() {
    let cluster = Cluster::start(1).await;
    const CLIENTS: usize = 16;
    const APPENDS: usize = 150;
    const KEYS: usize = 4;
    let tail = [b'a'; 1000];
    let clients = (0..CLIENTS).map(|c| {
        let addr = cluster.orch.addr;
        tokio::spawn(async move {
            let mut pipeline = BytesMut::new();
            for i in 0..APPENDS {
                let key = format!("log{}", (c + i) % KEYS);
                let mut piece = tail;
                piece[0] = b'A' + c as u8;
                encode(&[b"APPEND", key.as_bytes(), &piece], &mut pipeline);
            }
            RespConn::pipelined(addr, &pipeline, APPENDS).await
        })
    });
    for replies in futures_util::future::join_all(clients).await {
        for reply in replies.unwrap() {
            assert!(
                reply.starts_with(b":"),
                "{}",
                String::from_utf8_lossy(&reply)
            );
        }
    }
    let log = cluster.orch.log_text();
    assert!(!log.contains("missed a write"), "{log}");
    let want = CLIENTS * APPENDS * tail.len() / KEYS;
    for k in 0..KEYS {
        let key = format!("log{k}");
        let mut copies = Vec::new();
        for w in &cluster.workers {
            let client = Client::connect(&w.addr.to_string()).await.unwrap();
            let value = client.get::<Bytes>(key.as_str()).await.unwrap().unwrap();
            assert_eq!(value.len(), want, "{key} on {}", w.addr);
            copies.push(value);
        }
        assert!(copies[0] == copies[1], "{key} differs between the workers");
    }
}

/// Sends `cmds` in one write and reads as many replies, without panicking on a closed
/// connection (`None`: any of them may or may not have been applied).
async fn pipeline(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    cmds: &[Vec<Vec<u8>>],
) -> Option<Vec<Bytes>> {
    let mut out = BytesMut::new();
    for cmd in cmds {
        let args: Vec<&[u8]> = cmd.iter().map(Vec::as_slice).collect();
        encode(&args, &mut out);
    }
    stream.write_all(&out).await.ok()?;
    let mut replies = Vec::with_capacity(cmds.len());
    while replies.len() < cmds.len() {
        let frozen = Bytes::copy_from_slice(buf);
        if let Ok((_, used)) = twincache_protocol::resp::decode_reply(&frozen) {
            replies.push(buf.split_to(used).freeze());
        } else if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
    Some(replies)
}

/// The `i`th piece client `c` appends: `<c:i>` and 100 to 600 letters that compress
/// poorly and hold no `<`.
fn piece(c: usize, i: usize) -> Vec<u8> {
    let mut x = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut piece = format!("<{c}:{i}>").into_bytes();
    let len = 100 + (next() % 500) as usize;
    piece.extend((0..len).map(|_| b'a' + (next() % 26) as u8));
    piece
}

/// The pieces in `value`, in order, as (client, index).
fn pieces_in(value: &[u8]) -> Vec<(usize, usize)> {
    let text = std::str::from_utf8(value).expect("letters, digits and marks only");
    text.split('<')
        .skip(1)
        .map(|p| {
            let mark = &p[..p.find('>').expect("a closed mark")];
            let (c, i) = mark.split_once(':').expect("c:i");
            (c.parse().unwrap(), i.parse().unwrap())
        })
        .collect()
}

/// APPENDs growing long strings (kept in segments, each APPEND copied to the partner as an
/// edit), encrypted, while each worker of the pair is killed and restarted in turn: every
/// acknowledged APPEND is in its string exactly once and in its client's order, and both
/// workers end with the same strings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_to_long_strings_survive_kill_and_restart_of_each_worker() {
    const CLIENTS: usize = 6;
    const KEYS: usize = 3;
    const PIPELINE: usize = 8;
    let key = crate::harness::keygen();
    let file = key.arg();
    let flags = ["--encryption-key-file", file.as_str()];
    let (mut a, mut b, o) = pair_of(&flags, ORCHESTRATOR).await;
    let (wa, wb) = (a.addr, b.addr);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, acked, addr) = (stop.clone(), acked.clone(), o.addr);
            tokio::spawn(async move {
                let mut odd = Vec::new();
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let mut buf = BytesMut::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<(usize, Vec<Vec<u8>>)> = (i..i + PIPELINE)
                        .map(|i| {
                            let key = format!("log{}", (c + i) % KEYS).into_bytes();
                            (i, vec![b"APPEND".to_vec(), key, piece(c, i)])
                        })
                        .collect();
                    i += PIPELINE;
                    let cmds: Vec<_> = batch.iter().map(|(_, cmd)| cmd.clone()).collect();
                    let Some(replies) = pipeline(&mut stream, &mut buf, &cmds).await else {
                        stream = TcpStream::connect(addr).await.unwrap();
                        buf.clear();
                        continue;
                    };
                    for ((i, _), reply) in batch.iter().zip(replies) {
                        if reply.starts_with(b":") {
                            acked.lock().unwrap().insert((c, *i));
                        } else if !reply.starts_with(b"-TRYAGAIN") {
                            odd.push(String::from_utf8_lossy(&reply).into_owned());
                        }
                    }
                }
                odd
            })
        })
        .collect();
    let count = || acked.lock().unwrap().len();

    // The strings long (about 70 KB each, in segments) before the first kill, however slow
    // the machine.
    let started = std::time::Instant::now();
    while count() < 600 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut counts = vec![count()];
    for victim in [0, 1] {
        if victim == 0 {
            a.kill();
        } else {
            b.kill();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        counts.push(count());
        if victim == 0 {
            a = worker_on(wa.port(), &flags);
        } else {
            b = worker_on(wb.port(), &flags);
        }
        in_sync(&[o.addr], &[wa, wb]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        counts.push(count());
    }
    stop_clients(&stop, clients).await;
    assert!(
        counts.windows(2).all(|w| w[1] > w[0]),
        "APPENDs acknowledged in every phase: {counts:?}"
    );

    in_sync(&[o.addr], &[wa, wb]).await;
    let acked = acked.lock().unwrap().clone();
    for k in 0..KEYS {
        let key = format!("log{k}");
        let mut copies = Vec::new();
        for w in [wa, wb] {
            let client = Client::connect(&w.to_string()).await.unwrap();
            copies.push(client.get::<Bytes>(key.as_str()).await.unwrap().unwrap());
        }
        assert!(copies[0] == copies[1], "{key} differs between the workers");
        assert!(
            copies[0].len() > 64 * 1024,
            "{key}: {} bytes",
            copies[0].len()
        );
        let found = pieces_in(&copies[0]);
        let mut seen = HashSet::new();
        let mut last = [None; CLIENTS];
        for &(c, i) in &found {
            assert!(seen.insert((c, i)), "{key}: piece {c}:{i} twice");
            assert!(
                last[c] < Some(i),
                "{key}: piece {c}:{i} after {:?}",
                last[c]
            );
            last[c] = Some(i);
        }
        for &(c, i) in acked.iter().filter(|(c, i)| (c + i) % KEYS == k) {
            assert!(
                seen.contains(&(c, i)),
                "{key}: acknowledged piece {c}:{i} lost"
            );
        }
    }
    let mut con = RespConn::connect(o.addr).await;
    assert_eq!(
        &con.call(&[b"OBJECT", b"ENCODING", b"log0"]).await[..],
        b"$8\r\nsegments\r\n"
    );
    drop((a, b, o));
}

/// Two orchestrators, and a partition between one of them and the pair's primary only: the
/// first fails its INCR over to the partner (which marks it as taken alone) and answers
/// it; the second, whose health check has not come round, still takes the primary to be in
/// sync and sends its INCR there, computed from a value without the first. Before the
/// partner checked the copy's base, that copy replaced the acknowledged value on the
/// partner and both INCRs answered 2. Now the partner refuses it, the second orchestrator
/// answers `TRYAGAIN` and leaves the primary, and the retried INCR answers 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_missed_an_increment_does_not_overwrite_it_through_another_orchestrator() {
    the_second_orchestrator_counts_a_write_the_primary_missed(
        redis::cmd("INCR").arg("n").clone(),
        3,
    )
    .await;
}

/// As above, with a plain SET the primary timed out on: the partner took it, and marked it
/// as taken alone when the first orchestrator recorded the miss (before answering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_missed_a_set_does_not_overwrite_it_through_another_orchestrator() {
    the_second_orchestrator_counts_a_write_the_primary_missed(
        redis::cmd("SET").arg("n").arg("10").clone(),
        11,
    )
    .await;
}

/// `n` is 1 on both workers; the first orchestrator loses its way to the primary `a` and
/// sends `missed`; then the second sends an INCR, which must answer `expect` (it counts the
/// missed write), and both workers end with it.
async fn the_second_orchestrator_counts_a_write_the_primary_missed(
    missed: redis::Cmd,
    expect: i64,
) {
    let a = worker_on(0, &[]);
    let b = worker_on(0, &[]);
    let gate = Gate::start(a.addr).await;
    // The first orchestrator reaches `a` through the gate (the workers' map names `a`).
    let file = crate::harness::TempFile::with(&format!("{}@{} {}\n", gate.addr, a.addr, b.addr));
    let mut args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
    args.extend(["--cluster-file".to_string(), file.arg()]);
    args.extend(FAST.iter().map(|s| s.to_string()));
    let first = Proc::start(crate::harness::ORCHESTRATOR, &args);
    // The second checks health once a minute: within the test it never sees `b`'s count.
    let second = Proc::orchestrator(
        &[a.addr, b.addr],
        &[
            "--worker-timeout",
            "300ms",
            "--health-interval",
            "60s",
            "--http",
            "127.0.0.1:0",
        ],
    );
    let (wa, wb) = (a.addr, b.addr);
    wait_status(first.addr, "both in sync", |s| {
        s.contains(&format!("@{wa}=in_sync")) && state_of(s, &wb) == "in_sync"
    })
    .await;
    wait_status(second.addr, "both in sync", |s| {
        state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync"
    })
    .await;
    let incr = redis::cmd("INCR").arg("n").clone();
    let one: i64 = redis_until_served(first.addr, &incr).await;
    assert_eq!(one, 1);
    gate.cut();
    let _: redis::Value = redis_until_served(first.addr, &missed).await;
    let counted: i64 = redis_until_served(second.addr, &incr).await;
    assert_eq!(
        counted, expect,
        "the second orchestrator's INCR counts the first's write"
    );
    assert!(counter(&second, "twincache_rmw_diverged_total").await >= 1);
    // Once `a` is reachable again it refills from `b`, and both hold every write.
    gate.restore();
    wait_status(first.addr, "a back in sync", |s| {
        s.contains(&format!("@{wa}=in_sync"))
    })
    .await;
    let expect = expect.to_string();
    for w in [a.addr, b.addr] {
        let direct = Client::connect(&w.to_string()).await.unwrap();
        assert_eq!(
            direct.get::<Bytes>("n").await.unwrap().as_deref(),
            Some(expect.as_bytes()),
            "on {w}"
        );
    }
}
