//! Acknowledged writes survive the failure sequences in which a pair's history could be
//! forgotten: a worker unreachable when the orchestrator starts, an orchestrator restarted
//! while a worker is stale, a worker that returns during its partner's resync, deletes older
//! than the tombstones' memory, two orchestrators with one node id, and writes while a new
//! pair is being assessed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use twincache_client::Bytes;

use twincache_client::{Client, Status};

use crate::faults::{fill, pair, state_of, wait_status, worker_on, FAST};
use crate::harness::{Gate, Proc};

/// A client that retries while the cluster answers "unavailable" (it is starting).
async fn client(addr: SocketAddr) -> Client {
    Client::connect(&addr.to_string()).await.unwrap()
}

async fn set_retrying(c: &Client, key: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.set(key, value.to_string()).await {
            Ok(()) => return,
            Err(e) if e.status() == Some(Status::Unavailable) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("set {key}: {e}"),
        }
    }
}

/// Reads `key` through the orchestrator `n` times (so both workers are asked) and from
/// each worker directly; every answer must be `want`.
async fn read_everywhere(orch: SocketAddr, workers: &[SocketAddr], key: &str, want: Option<&str>) {
    let c = client(orch).await;
    for i in 0..40 {
        let got = c.get::<Bytes>(key).await.unwrap();
        assert_eq!(
            got.as_deref(),
            want.map(str::as_bytes),
            "read {i} of {key} through the orchestrator"
        );
    }
    for w in workers {
        let got = client(*w).await.get::<Bytes>(key).await.unwrap();
        assert_eq!(
            got.as_deref(),
            want.map(str::as_bytes),
            "{key} on worker {w}"
        );
    }
}

/// A pair whose worker A the orchestrator reaches through a [`Gate`].
struct GatedPair {
    a: Proc,
    b: Proc,
    gate: Gate,
    orch: Proc,
}

impl GatedPair {
    async fn start(worker_flags: &[&str]) -> GatedPair {
        let a = worker_on(0, worker_flags);
        let b = worker_on(0, worker_flags);
        let gate = Gate::start(a.addr).await;
        let orch = Proc::orchestrator(&[gate.addr, b.addr], FAST);
        both_in_sync(orch.addr, gate.addr, b.addr).await;
        GatedPair { a, b, gate, orch }
    }

    /// A as the orchestrator sees it, and B.
    fn seen(&self) -> (SocketAddr, SocketAddr) {
        (self.gate.addr, self.b.addr)
    }
}

async fn both_in_sync(addr: SocketAddr, wa: SocketAddr, wb: SocketAddr) {
    wait_status(addr, "both in sync", |s| {
        state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync"
    })
    .await;
}

/// Issue 9's lost write: the orchestrator starts while worker A cannot be reached, B alone
/// takes a write, then A comes back with its data established, and must not serve the old
/// value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_unreachable_when_the_orchestrator_starts_resyncs_before_serving() {
    let mut p = GatedPair::start(&[]).await;
    let (ga, wb) = p.seen();
    client(p.orch.addr)
        .await
        .set("user:2", "OLD")
        .await
        .unwrap();
    p.orch.kill();
    p.gate.cut();
    p.orch = Proc::orchestrator(&[ga, wb], FAST);
    let addr = p.orch.addr;
    wait_status(addr, "a down, b in sync", |s| {
        state_of(s, &ga) == "down" && state_of(s, &wb) == "in_sync"
    })
    .await;
    set_retrying(&client(addr).await, "user:2", "NEW").await;
    p.gate.restore();
    both_in_sync(addr, ga, wb).await;
    read_everywhere(addr, &[p.a.addr, wb], "user:2", Some("NEW")).await;
}

/// The orchestrator that saw worker A miss writes is gone; a new one must learn it from B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_restarted_while_a_worker_is_stale_learns_it_from_the_partner() {
    let mut p = GatedPair::start(&[]).await;
    let (ga, wb) = p.seen();
    let c = client(p.orch.addr).await;
    c.set("k", "OLD").await.unwrap();
    p.gate.cut();
    wait_status(p.orch.addr, "a down", |s| state_of(s, &ga) == "down").await;
    c.set("k", "NEW").await.unwrap();
    p.orch.kill();
    p.gate.restore();
    p.orch = Proc::orchestrator(&[ga, wb], FAST);
    both_in_sync(p.orch.addr, ga, wb).await;
    read_everywhere(p.orch.addr, &[p.a.addr, wb], "k", Some("NEW")).await;
}

/// The same, where A missed the write while still taken to be in sync (cut off between two
/// health checks): its miss is recorded on B before the write is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_missed_by_a_worker_believed_in_sync_is_recorded_before_the_ack() {
    let a = worker_on(0, &[]);
    let b = worker_on(0, &[]);
    let gate = Gate::start(a.addr).await;
    let (ga, wb) = (gate.addr, b.addr);
    // Health checks far apart: A stays "in sync" for this orchestrator while cut off.
    let slow_checks = ["--worker-timeout", "300ms", "--health-interval", "30s"];
    let mut orch = Proc::orchestrator(&[ga, wb], &slow_checks);
    let c = client(orch.addr).await;
    set_retrying(&c, "k", "OLD").await;
    gate.cut();
    c.set("k", "NEW").await.unwrap();
    orch.kill();
    gate.restore();
    let orch = Proc::orchestrator(&[ga, wb], FAST);
    both_in_sync(orch.addr, ga, wb).await;
    read_everywhere(orch.addr, &[a.addr, wb], "k", Some("NEW")).await;
}

/// B restarts and resyncs from A; A freezes mid-resync, so B is promoted with part of the
/// data and takes writes alone; A comes back. Both must end with everything: A takes B's
/// writes (it resyncs), B takes A's data (it merges while serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_returns_during_its_partners_resync_loses_nothing() {
    let slow: &[&str] = &["--resync-rate-limit", "1MB", "--dictionary-size", "0"];
    let mut p = pair(slow).await;
    let (addr, wa, wb) = (p.orch.addr, p.a.addr, p.b.addr);
    fill(addr, 3000).await;
    p.b.kill();
    p.b = worker_on(wb.port(), slow);
    wait_status(addr, "b resyncing", |s| state_of(s, &wb) == "resyncing").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.a.signal("STOP");
    wait_status(addr, "b serving alone", |s| {
        state_of(s, &wa) == "down" && state_of(s, &wb) == "in_sync"
    })
    .await;
    let c = client(addr).await;
    c.set("alone", "b").await.unwrap();
    c.set("bulk:7", "rewritten while alone").await.unwrap();
    p.a.signal("CONT");
    both_in_sync(addr, wa, wb).await;
    // B's merge of A's data runs at 1 MB/s: wait (bounded) until B holds every key.
    let direct_b = client(wb).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0..3000 {
        let key = format!("bulk:{n}");
        loop {
            let got = direct_b.get::<Bytes>(&key).await.unwrap();
            if got.is_some() {
                if n != 7 {
                    assert_eq!(
                        got.as_deref(),
                        Some(&crate::harness::noise(n as u64, 1000)[..])
                    );
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{key} never reached b: {}",
                p.orch.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    read_everywhere(addr, &[wa, wb], "alone", Some("b")).await;
    read_everywhere(addr, &[wa, wb], "bulk:7", Some("rewritten while alone")).await;
}

/// A worker away longer than the tombstones last must not bring back what was deleted
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_older_than_the_tombstones_is_not_undone_by_a_returning_worker() {
    let p = GatedPair::start(&["--tombstone-ttl", "1s"]).await;
    let (ga, wb) = p.seen();
    let addr = p.orch.addr;
    let c = client(addr).await;
    c.set("gone", "v").await.unwrap();
    c.set("kept", "v").await.unwrap();
    p.gate.cut();
    wait_status(addr, "a down", |s| state_of(s, &ga) == "down").await;
    assert!(c.del("gone").await.unwrap());
    // The tombstone expires on B (and the sweep may reclaim it).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    p.gate.restore();
    both_in_sync(addr, ga, wb).await;
    read_everywhere(addr, &[p.a.addr, wb], "gone", None).await;
    read_everywhere(addr, &[p.a.addr, wb], "kept", Some("v")).await;
}

/// Two orchestrators never stamp versions with the same id: the second one given the same
/// `--node-id` does not write until the first is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_with_the_same_node_id_waits() {
    let p = pair(&[]).await;
    let (wa, wb) = (p.a.addr, p.b.addr);
    let mut first = Proc::orchestrator(&[wa, wb], &[FAST, &["--node-id", "7"]].concat());
    set_retrying(&client(first.addr).await, "k", "first").await;
    let second = Proc::orchestrator(&[wa, wb], &[FAST, &["--node-id", "7"]].concat());
    let c2 = client(second.addr).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = c2.set("k", "second").await.unwrap_err();
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    assert!(err.to_string().contains("node id"), "{err}");
    assert!(second
        .log_text()
        .contains("another orchestrator uses this --node-id"));
    first.kill();
    set_retrying(&c2, "k", "second").await;
    read_everywhere(second.addr, &[wa, wb], "k", Some("second")).await;
}

/// A new pair is assessed while clients already write: the first worker found in sync must
/// not take writes alone that its partner, adopted a moment later, never gets (a read of
/// the partner then missed an acknowledged write until its next resync, which never came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_while_a_new_pair_is_assessed_reach_both_workers() {
    for round in 0..4 {
        let (wa, wb) = (worker_on(0, &[]), worker_on(0, &[]));
        let orch = Proc::orchestrator(&[wa.addr, wb.addr], FAST);
        let addr = orch.addr;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let c = client(addr).await;
                    let mut acked = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = format!("r{round}:t{t}:{i}");
                        if c.set(&key, "v").await.is_ok() {
                            acked.push(key);
                        }
                        i += 1;
                    }
                    acked
                })
            })
            .collect();
        both_in_sync(addr, wa.addr, wb.addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut acked = Vec::new();
        for w in writers {
            acked.extend(w.await.unwrap());
        }
        assert!(!acked.is_empty());
        for w in [wa.addr, wb.addr] {
            let direct = client(w).await;
            for key in &acked {
                assert_eq!(
                    direct.get::<Bytes>(key).await.unwrap().as_deref(),
                    Some(&b"v"[..]),
                    "round {round}: {key}, acknowledged, is not on worker {w} ({} acknowledged)",
                    acked.len()
                );
            }
        }
    }
}
