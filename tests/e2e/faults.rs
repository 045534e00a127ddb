//! Fault tolerance with real processes: kill -9, SIGSTOP/SIGCONT, interrupted resyncs.
//!
//! Several clients keep a model of every write acknowledged to them; after the failures and
//! the resync, the partner that never failed is killed too, and every acknowledged value
//! (and every delete) must be read back from the worker that came back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use twincache_client::Bytes;

use twincache_client::Client;

use crate::harness::{encode, poll_until, Proc, RespConn, TextConn, WORKER};

/// Orchestrator flags that make failures show quickly in a test.
pub const FAST: &[&str] = &[
    "--worker-timeout",
    "300ms",
    "--health-interval",
    "100ms",
    "--health-timeout",
    "200ms",
];

pub type Model = Arc<Mutex<HashMap<String, Option<String>>>>;

/// Clients writing, deleting and reading their own keys until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    models: Vec<Model>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl Load {
    pub async fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut models = Vec::new();
        let mut tasks = Vec::new();
        for t in 0..clients {
            let client = Client::connect(&addr.to_string()).await.unwrap();
            let model: Model = Arc::default();
            models.push(model.clone());
            let (stop, errors) = (stop.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("t{t}:k{}", i % 200);
                    let err = match i % 10 {
                        0..=5 => {
                            let value = format!("t{t}:v{i}");
                            client.set(&key, value.clone()).await.map(|()| {
                                model.lock().unwrap().insert(key.clone(), Some(value));
                            })
                        }
                        6 => client.del(&key).await.map(|_| {
                            model.lock().unwrap().insert(key.clone(), None);
                        }),
                        _ => client.get::<Bytes>(&key).await.map(|got| {
                            let want = model.lock().unwrap().get(&key).cloned();
                            if let Some(want) = want {
                                let got = got.map(|v| String::from_utf8_lossy(&v).into_owned());
                                if got != want {
                                    errors.lock().unwrap().push(format!(
                                        "read {key}: {got:?}, acknowledged {want:?}"
                                    ));
                                }
                            }
                        }),
                    };
                    if let Err(e) = err {
                        errors.lock().unwrap().push(format!("op {i} on {key}: {e}"));
                    }
                    // A shared key every client writes too.
                    if let Err(e) = client
                        .set(format!("shared:{}", i % 20), format!("t{t}:{i}"))
                        .await
                    {
                        errors.lock().unwrap().push(format!("shared write: {e}"));
                    }
                    i += 1;
                }
                i
            }));
        }
        Load {
            stop,
            models,
            errors,
            tasks,
        }
    }

    /// Stops the clients; the operations done, and the errors they saw.
    pub async fn stop(self) -> (u64, Vec<String>, Vec<Model>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut ops = 0;
        for t in self.tasks {
            ops += t.await.unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (ops, errors, self.models)
    }
}

/// Every acknowledged write and delete, read back through the orchestrator.
async fn verify(addr: SocketAddr, models: &[Model]) {
    let client = Client::connect(&addr.to_string()).await.unwrap();
    let mut checked = 0;
    for model in models {
        let model = model.lock().unwrap().clone();
        for (key, want) in model {
            let got = client
                .get::<Bytes>(&key)
                .await
                .unwrap()
                .map(|v| String::from_utf8_lossy(&v).into_owned());
            assert_eq!(got, want, "key {key}: acknowledged {want:?}, read {got:?}");
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} keys checked");
}

pub async fn status(addr: SocketAddr) -> String {
    TextConn::connect(addr).await.request("status").await
}

/// Waits (bounded) until the status line satisfies `want`.
pub async fn wait_status(addr: SocketAddr, what: &str, want: impl Fn(&str) -> bool) -> String {
    let check = || async {
        let s = status(addr).await;
        (want(&s), s)
    };
    poll_until(
        what,
        Duration::from_secs(20),
        Duration::from_millis(50),
        check,
    )
    .await
}

pub fn state_of<'a>(status: &'a str, worker: &SocketAddr) -> &'a str {
    let needle = format!("{worker}=");
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(needle.as_str()))
        .unwrap_or("?")
}

pub fn worker_on(port: u16, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec!["--port".into(), port.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(WORKER, &args)
}

pub struct Pair {
    pub a: Proc,
    pub b: Proc,
    pub orch: Proc,
}

pub async fn pair(worker_flags: &[&str]) -> Pair {
    let a = worker_on(0, worker_flags);
    let b = worker_on(0, worker_flags);
    let orch = Proc::orchestrator(&[a.addr, b.addr], FAST);
    let (wa, wb) = (a.addr, b.addr);
    wait_status(orch.addr, "both in sync", |s| {
        state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync"
    })
    .await;
    Pair { a, b, orch }
}

/// Under load: `a` killed (-9), restarted at its address after a while, and back in sync.
async fn kill_and_restart_a(p: &mut Pair) {
    let (addr, wa) = (p.orch.addr, p.a.addr);
    tokio::time::sleep(Duration::from_millis(700)).await;
    p.a.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    p.a = worker_on(wa.port(), &[]);
    wait_status(addr, "the restarted worker in sync", |s| {
        state_of(s, &wa) == "in_sync"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restart_resync_then_lose_the_partner() {
    let mut p = pair(&[]).await;
    let addr = p.orch.addr;
    let load = Load::start(addr, 4).await;
    kill_and_restart_a(&mut p).await;
    let (ops, errors, models) = load.stop().await;
    assert!(ops > 200, "the load ran ({ops} ops)");
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    p.b.kill();
    verify(addr, &models).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_catches_up_before_serving_reads() {
    let mut p = pair(&[]).await;
    let (addr, wa) = (p.orch.addr, p.a.addr);
    let load = Load::start(addr, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.a.signal("STOP");
    wait_status(addr, "the frozen worker down", |s| {
        state_of(s, &wa) == "down"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    p.a.signal("CONT");
    wait_status(addr, "the resumed worker in sync", |s| {
        state_of(s, &wa) == "in_sync"
    })
    .await;
    // It went back into the read rotation only through a resync (the load's reads check
    // the values; the log shows the path).
    let log = p.orch.log_text();
    let mine: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("worker={wa}")))
        .collect();
    let back = mine
        .iter()
        .position(|l| l.contains(r#"from="down""#) && !l.contains(r#"to="in_sync""#));
    let synced = mine
        .iter()
        .rposition(|l| l.contains(r#"from="resyncing" to="in_sync""#));
    assert!(
        matches!((back, synced), (Some(b), Some(s)) if b < s),
        "{mine:#?}"
    );
    assert!(
        !mine
            .iter()
            .any(|l| l.contains(r#"from="down" to="in_sync""#)),
        "{mine:#?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, errors, models) = load.stop().await;
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    p.b.kill();
    verify(addr, &models).await;
}

/// Loads enough data (1 KB values lz4 cannot shrink) that a rate-limited resync takes seconds.
pub async fn fill(addr: SocketAddr, keys: usize) {
    let client = Client::connect(&addr.to_string()).await.unwrap();
    for chunk in 0..keys / 500 {
        let writes: Vec<_> = (0..500)
            .map(|i| {
                let n = chunk * 500 + i;
                client.set(format!("bulk:{n}"), crate::harness::noise(n as u64, 1000))
            })
            .collect();
        for w in futures_util::future::join_all(writes).await {
            w.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_resyncs_recover_once_the_pair_is_whole() {
    // 1 MB/s: a resync of the data below takes seconds, long enough to interrupt.
    let slow: &[&str] = &["--resync-rate-limit", "1MB", "--dictionary-size", "0"];
    let mut p = pair(slow).await;
    let (addr, wa, wb) = (p.orch.addr, p.a.addr, p.b.addr);
    fill(addr, 4000).await;
    let client = Client::connect(&addr.to_string()).await.unwrap();

    // The resyncing worker dies mid-resync, comes back, and finishes.
    p.a.kill();
    p.a = worker_on(wa.port(), slow);
    wait_status(addr, "a resyncing", |s| state_of(s, &wa) == "resyncing").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.a.kill();
    p.a = worker_on(wa.port(), slow);
    client.set("during", "the second resync").await.unwrap();
    wait_status(addr, "a in sync again", |s| state_of(s, &wa) == "in_sync").await;

    // The source dies mid-resync: the resyncing worker's copy is then the best there is.
    p.b.kill();
    p.b = worker_on(wb.port(), slow);
    wait_status(addr, "b resyncing", |s| state_of(s, &wb) == "resyncing").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.a.kill();
    wait_status(addr, "b serving alone", |s| {
        state_of(s, &wa) == "down" && state_of(s, &wb) == "in_sync"
    })
    .await;
    client.set("while alone", "b").await.unwrap();
    // The pair is whole again: a refills from b.
    p.a = worker_on(wa.port(), slow);
    wait_status(addr, "both in sync", |s| {
        state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync"
    })
    .await;
    client.set("after", "recovery").await.unwrap();
    p.b.kill();
    assert_eq!(
        client.get::<Bytes>("while alone").await.unwrap().as_deref(),
        Some(&b"b"[..])
    );
    assert_eq!(
        client.get::<Bytes>("after").await.unwrap().as_deref(),
        Some(&b"recovery"[..])
    );
}

/// A pair with neither worker in sync, one joining and one stale, both answering: what a
/// slot move without a rate limit left for minutes (each worker of a pair missing health
/// checks and writes in turn). Made here step by step with SIGSTOP, each stop shorter than
/// the health timeout (the worker is never found down) and longer than the worker timeout
/// (a write to it fails, and it is marked as having missed it):
/// 1. A stops; a delete and a write reach B alone; A resumes, stale, and joins B (it takes
///    writes again and resyncs in the next round).
/// 2. Before that round, B stops; a write reaches A alone; B resumes, stale.
///
/// Each now lacks a write the other took alone. The better copy must lead, merge the other's,
/// and the other resync from it: both in sync soon, each holding both writes, and the
/// deleted key deleted on both (A's older copy of it does not come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_worker_and_a_stale_one_recover() {
    let (a, b) = (worker_on(0, &[]), worker_on(0, &[]));
    let (wa, wb) = (a.addr, b.addr);
    // Rounds a second apart: room to stop B between A's joining and its resync.
    let orch = Proc::orchestrator(
        &[wa, wb],
        &[
            "--worker-timeout",
            "100ms",
            "--health-interval",
            "1s",
            "--health-timeout",
            "3s",
        ],
    );
    let addr = orch.addr;
    wait_status(addr, "both in sync", |s| {
        state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync"
    })
    .await;
    let client = Client::connect(&addr.to_string()).await.unwrap();
    client.set("gone", "before").await.unwrap();

    a.signal("STOP");
    client.del("gone").await.unwrap();
    client.set("on b", "alone").await.unwrap();
    a.signal("CONT");
    let seen = wait_status(addr, "a joining", |s| state_of(s, &wa) == "joining").await;
    assert_eq!(state_of(&seen, &wb), "in_sync", "{seen}");

    b.signal("STOP");
    client.set("on a", "alone").await.unwrap();
    b.signal("CONT");
    let seen = status(addr).await;
    assert!(
        state_of(&seen, &wa) == "joining" && state_of(&seen, &wb) == "stale",
        "the pair is not joining and stale (a round came between?): {seen}"
    );

    wait_status(addr, "both in sync again", |s| {
        state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync"
    })
    .await;
    assert!(
        orch.log_text().contains("neither in sync: this copy leads"),
        "{}",
        orch.log_text()
    );
    for w in [wa, wb] {
        let c = Client::connect(&w.to_string()).await.unwrap();
        let get = |key: &'static str| {
            let c = &c;
            async move {
                c.get::<Bytes>(key)
                    .await
                    .unwrap()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            }
        };
        assert_eq!(get("on a").await.as_deref(), Some("alone"), "on {w}");
        assert_eq!(get("on b").await.as_deref(), Some("alone"), "on {w}");
        assert_eq!(get("gone").await, None, "on {w}");
    }
}

/// Workers given as `<address>@<peer address>`: the orchestrator reaches each through a
/// relay (another address, as through NAT), while the workers reach each other directly.
/// A restarted worker must refill from its partner at the partner's own address (its log
/// names it), and serve every acknowledged write once back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_refill_from_each_other_at_their_peer_addresses() {
    let a = worker_on(0, &[]);
    let mut b = worker_on(0, &[]);
    let (ga, gb) = (
        crate::harness::Gate::start(a.addr).await,
        crate::harness::Gate::start(b.addr).await,
    );
    let (ta, tb) = (
        format!("{}@{}", ga.addr, a.addr),
        format!("{}@{}", gb.addr, b.addr),
    );
    let file = crate::harness::TempFile::with(&format!("{ta} {tb}\n"));
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--cluster-file".into(),
        file.arg(),
    ];
    args.extend(FAST.iter().map(|s| s.to_string()));
    let orch = Proc::start(crate::harness::ORCHESTRATOR, &args);
    let both =
        |s: &str| s.contains(&format!("{ta}=in_sync")) && s.contains(&format!("{tb}=in_sync"));
    wait_status(orch.addr, "both in sync", both).await;
    let load = Load::start(orch.addr, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = b.addr.port();
    b.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    b = worker_on(port, &[]);
    wait_status(orch.addr, "the restarted worker in sync", both).await;
    let (ops, errors, models) = load.stop().await;
    assert!(ops > 100, "the load ran ({ops} ops)");
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    let log = b.log_text();
    assert!(
        log.contains("refill from partner started") && log.contains(&format!("partner={}", a.addr)),
        "the refill did not name the partner's own address {}:\n{log}",
        a.addr
    );
    assert!(!log.contains(&ga.addr.to_string()), "{log}");
    verify(orch.addr, &models).await;
}

/// Pipelined RESP SETs and MSETs (a client's run of SETs, and an MSET's keys, reach each
/// worker in batches, see `commands::batch`) keep every acknowledged value through a
/// worker's kill -9, its restart and refill, then the loss of its partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sets_and_msets_survive_kill_9_restart_then_the_partner() {
    let mut p = pair(&[]).await;
    let addr = p.orch.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..3 {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = RespConn::connect(addr).await;
            let mut model: HashMap<String, String> = HashMap::new();
            let (mut sent, mut errors) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let writes: Vec<(String, String)> = (sent..sent + 32)
                    .map(|n| (format!("p{t}:k{}", n % 500), format!("v{n}")))
                    .collect();
                let mut out = bytes::BytesMut::new();
                if t == 2 {
                    // One MSET of them, its first key given again last (the last value wins).
                    let mut writes = writes;
                    writes.push((writes[0].0.clone(), format!("{}+", writes[0].1)));
                    let mut args: Vec<&[u8]> = vec![b"MSET"];
                    for (k, v) in &writes {
                        args.extend([k.as_bytes(), v.as_bytes()]);
                    }
                    encode(&args, &mut out);
                    conn.send_raw(&out).await;
                    let reply = conn.reply().await;
                    for (k, v) in writes {
                        if &reply[..] == b"+OK\r\n" {
                            model.insert(k, v);
                        } else {
                            model.remove(&k);
                        }
                    }
                    if &reply[..] != b"+OK\r\n" {
                        errors.push(format!("MSET: {}", String::from_utf8_lossy(&reply)));
                    }
                    sent += 32;
                    continue;
                }
                for (k, v) in &writes {
                    encode(&[b"SET", k.as_bytes(), v.as_bytes()], &mut out);
                }
                conn.send_raw(&out).await;
                for (k, v) in writes {
                    let reply = conn.reply().await;
                    if &reply[..] == b"+OK\r\n" {
                        model.insert(k, v);
                    } else {
                        // Not acknowledged, so maybe stored, maybe not: not checked.
                        errors.push(format!("{k}: {}", String::from_utf8_lossy(&reply)));
                        model.remove(&k);
                    }
                }
                sent += 32;
            }
            (model, errors, sent)
        }));
    }
    kill_and_restart_a(&mut p).await;
    stop.store(true, Ordering::Relaxed);
    let mut models = Vec::new();
    for task in tasks {
        let (model, errors, sent) = task.await.unwrap();
        assert!(sent > 1000, "the load ran ({sent} SETs)");
        assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
        models.push(model);
    }
    p.b.kill();
    let mut conn = RespConn::connect(addr).await;
    let mut checked = 0;
    for (key, want) in models.iter().flatten() {
        let got = conn.call(&[b"GET", key.as_bytes()]).await;
        let expected = format!("${}\r\n{want}\r\n", want.len());
        assert_eq!(
            String::from_utf8_lossy(&got),
            expected,
            "key {key}: acknowledged {want:?}"
        );
        checked += 1;
    }
    assert!(checked > 1000, "only {checked} keys checked");
}
