//! Membership changes with clients writing: a pair added and then a middle pair removed
//! through `--cluster-file` and SIGHUP (with an orchestrator restart in between), a worker
//! replaced and a pair added through `CLUSTER`, and a receiving worker killed mid-move.
//! Afterwards every acknowledged key reads back, deleted keys stay deleted, both workers of
//! each pair hold the same copy, and a pair holds only the keys of its own slots (the old
//! pair dropped the moved ones).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use twincache_client::{Bytes, Client};
use twincache_protocol::slots::SlotMap;

use crate::faults::{Load, Model, FAST};
use crate::harness::{Proc, RespConn, TempFile, ORCHESTRATOR};

/// `INFO cluster` through RESP.
pub async fn cluster_info(addr: SocketAddr) -> String {
    let mut c = RespConn::connect(addr).await;
    String::from_utf8_lossy(&c.call(&[b"INFO", b"cluster"]).await).into_owned()
}

/// Waits (bounded) until INFO cluster satisfies `done`.
pub async fn wait_info(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let info = cluster_info(addr).await;
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "waited too long for {what}:\n{info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the change is done: no slot moving, every pair in sync, slot counts as given.
pub async fn wait_settled(addr: SocketAddr, slots: &[usize]) -> String {
    wait_info(addr, "the membership change", |info| {
        let counts: Vec<usize> = info
            .lines()
            .filter(|l| l.starts_with("pair"))
            .filter_map(|l| l.rsplit("slots=").next()?.trim().parse().ok())
            .collect();
        info.contains("membership:idle")
            && !info.contains("move_current")
            && counts == slots
            && info
                .lines()
                .filter(|l| l.starts_with("pair"))
                .all(|l| l.contains("state=in_sync,in_sync"))
    })
    .await
}

fn cluster_file(pairs: &[(&Proc, &Proc)]) -> String {
    pairs
        .iter()
        .map(|(a, b)| format!("{} {}  # a pair\n", a.addr, b.addr))
        .collect::<String>()
}

/// Every acknowledged key through the orchestrator; then, on the workers directly, both of a
/// pair equal and no key outside its pair's slots.
async fn check(orch: SocketAddr, models: &[Model], pairs: &[[SocketAddr; 2]], map: &SlotMap) {
    let mut model = HashMap::new();
    for m in models {
        model.extend(m.lock().unwrap().clone());
    }
    assert!(model.len() > 100, "only {} keys written", model.len());
    let c = Client::connect(&orch.to_string()).await.unwrap();
    for (key, want) in &model {
        let got = c
            .get::<Bytes>(key)
            .await
            .unwrap()
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        assert_eq!(&got, want, "{key} through the orchestrator");
    }
    for (n, pair) in pairs.iter().enumerate() {
        let a = Client::connect(&pair[0].to_string()).await.unwrap();
        let b = Client::connect(&pair[1].to_string()).await.unwrap();
        for (key, want) in &model {
            let (ga, gb) = (
                a.get::<Bytes>(key).await.unwrap(),
                b.get::<Bytes>(key).await.unwrap(),
            );
            assert_eq!(ga, gb, "{key}: the workers of pair {n} differ");
            let here = map.pair_of(key.as_bytes()) == n;
            let got = ga.map(|v| String::from_utf8_lossy(&v).into_owned());
            if here {
                assert_eq!(&got, want, "{key} on its pair {n}");
            } else {
                assert_eq!(got, None, "{key} on pair {n}, which does not hold its slot");
            }
        }
    }
}

fn fast_orchestrator(file: &TempFile, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cluster-file".into(),
        file.arg(),
        "--move-batch-slots".into(),
        "1024".into(),
    ];
    args.extend(FAST.iter().chain(extra).map(|s| s.to_string()));
    Proc::start(ORCHESTRATOR, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_is_added_and_a_middle_pair_removed_while_clients_write() {
    let w: Vec<Proc> = (0..6).map(|_| Proc::worker()).collect();
    let file = TempFile::with(&cluster_file(&[(&w[0], &w[1]), (&w[2], &w[3])]));
    let orch = fast_orchestrator(&file, &[]);
    wait_settled(orch.addr, &[8192, 8192]).await;
    let load = Load::start(orch.addr, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Two pairs to three: a third of the slots move onto the new pair.
    std::fs::write(
        &file.0,
        cluster_file(&[(&w[0], &w[1]), (&w[2], &w[3]), (&w[4], &w[5])]),
    )
    .unwrap();
    orch.signal("HUP");
    let info = wait_settled(orch.addr, &[5462, 5461, 5461]).await;
    // (A step that fails on this busy machine, e.g. a worker briefly stale, is retried and
    // the summary then names only what the retry did.)
    assert!(info.contains("last_change:"), "{info}");
    assert!(orch.log_text().contains("adding a pair"));
    let three = SlotMap::even(2).rebalanced(&[true; 3]);
    let (ops, errors, first) = load.stop().await;
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert!(ops > 100, "only {ops} operations");
    let addrs = |i: usize, j: usize| [w[i].addr, w[j].addr];
    let pairs = [addrs(0, 1), addrs(2, 3), addrs(4, 5)];
    check(orch.addr, &first, &pairs, &three).await;

    // A restart keeps the map: the state file, not the pairs alone, says where keys are.
    drop(orch);
    let orch = fast_orchestrator(&file, &[]);
    let info = wait_settled(orch.addr, &[5462, 5461, 5461]).await;
    assert!(
        info.contains(&format!("slots:{}", three.describe())),
        "{info}"
    );
    check(orch.addr, &first, &pairs, &three).await;

    // The middle pair goes: its slots spread over the other two, then it is dropped.
    let load = Load::start(orch.addr, 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&file.0, cluster_file(&[(&w[0], &w[1]), (&w[4], &w[5])])).unwrap();
    orch.signal("HUP");
    let info = wait_settled(orch.addr, &[8192, 8192]).await;
    assert!(info.contains("removed"), "{info}");
    let (_, errors, second) = load.stop().await;
    assert!(errors.is_empty(), "client errors: {errors:?}");
    let two = three.rebalanced(&[true, false, true]).without_pair(1);
    // What both loads acknowledged, the later one last.
    let both: Vec<Model> = first.into_iter().chain(second).collect();
    check(orch.addr, &both, &[addrs(0, 1), addrs(4, 5)], &two).await;
    // The removed pair was drained: it holds none of the keys.
    for wk in [&w[2], &w[3]] {
        let c = Client::connect(&wk.addr.to_string()).await.unwrap();
        let keys: Vec<String> = both
            .iter()
            .flat_map(|m| m.lock().unwrap().keys().cloned().collect::<Vec<_>>())
            .collect();
        for key in &keys {
            assert_eq!(
                c.get::<Bytes>(key).await.unwrap(),
                None,
                "{key} left on {}",
                wk.addr
            );
        }
    }
    // A broken file is refused, with its line, and changes nothing.
    std::fs::write(&file.0, "# pairs\nnot-an-address\n").unwrap();
    orch.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !orch.log_text().contains("line 2") {
        assert!(
            Instant::now() < deadline,
            "no error logged:\n{}",
            orch.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_settled(orch.addr, &[8192, 8192]).await;
    let _ = std::fs::remove_file(format!("{}.state", file.arg()));
    let log = orch.log_text();
    for said in [
        "slot move done",
        "pair removed",
        "pairs and slot map as the last run left them",
        "cluster file not applied",
    ] {
        assert!(log.contains(said), "the log does not say {said:?}:\n{log}");
    }
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("membership change done"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_commands_replace_a_worker_and_add_a_pair() {
    let w: Vec<Proc> = (0..5).map(|_| Proc::worker()).collect();
    let orch = Proc::orchestrator(&[w[0].addr, w[1].addr], FAST);
    wait_settled(orch.addr, &[16384]).await;
    let load = Load::start(orch.addr, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = RespConn::connect(orch.addr).await;
    let (old, new) = (w[1].addr.to_string(), w[2].addr.to_string());
    let reply = c
        .call(&[b"CLUSTER", b"REPLACE", old.as_bytes(), new.as_bytes()])
        .await;
    assert_eq!(&reply[..], b"+OK\r\n");
    let info = wait_settled(orch.addr, &[16384]).await;
    assert!(
        info.contains(&format!("workers={},{new}", w[0].addr)),
        "{info}"
    );
    let (a, b) = (w[3].addr.to_string(), w[4].addr.to_string());
    let reply = c
        .call(&[b"CLUSTER", b"ADDPAIR", a.as_bytes(), b.as_bytes()])
        .await;
    assert_eq!(&reply[..], b"+OK\r\n");
    wait_settled(orch.addr, &[8192, 8192]).await;
    let reply = c.call(&[b"CLUSTER", b"REMOVEPAIR", b"7"]).await;
    assert!(reply.starts_with(b"-ERR no such pair"), "{reply:?}");
    let (_, errors, models) = load.stop().await;
    assert!(errors.is_empty(), "client errors: {errors:?}");
    let map = SlotMap::even(1).rebalanced(&[true; 2]);
    check(
        orch.addr,
        &models,
        &[[w[0].addr, w[2].addr], [w[3].addr, w[4].addr]],
        &map,
    )
    .await;
}

/// A worker of the new pair killed in the middle of a move and started again, empty: the move
/// waits for it to refill from its partner and goes on; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_survives_the_loss_of_a_receiving_worker() {
    let mut w: Vec<Proc> = (0..6).map(|_| Proc::worker()).collect();
    let file = TempFile::with(&cluster_file(&[(&w[0], &w[1]), (&w[2], &w[3])]));
    // Slow moves (small batches at 2 MiB/s), so the kill lands in one.
    let orch = fast_orchestrator(&file, &["--move-rate-limit", "2MiB"]);
    wait_settled(orch.addr, &[8192, 8192]).await;
    // 20 MB of incompressible values, of which a third moves.
    let c = Client::connect(&orch.addr.to_string()).await.unwrap();
    for chunk in (0..20_000u64).collect::<Vec<_>>().chunks(500) {
        let sets = chunk.iter().map(|&i| {
            let c = &c;
            async move {
                // Retried: a health round that times out on this busy machine withholds writes
                // for a moment (the node-id claim).
                for _ in 0..50 {
                    let value = Bytes::from(crate::harness::noise(i, 1000));
                    match c.set(format!("bulk:{i}"), value).await {
                        Ok(()) => return,
                        Err(e) if e.status() == Some(twincache_client::Status::Unavailable) => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(e) => panic!("bulk:{i}: {e}"),
                    }
                }
                panic!("bulk:{i} never written");
            }
        });
        futures_util::future::join_all(sets).await;
    }
    let load = Load::start(orch.addr, 2).await;
    std::fs::write(
        &file.0,
        cluster_file(&[(&w[0], &w[1]), (&w[2], &w[3]), (&w[4], &w[5])]),
    )
    .unwrap();
    orch.signal("HUP");
    wait_info(orch.addr, "a move under way", |i| {
        i.contains("move_current")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = w[5].addr.port();
    w[5].kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    w[5] = crate::faults::worker_on(port, &[]);
    wait_settled(orch.addr, &[5462, 5461, 5461]).await;
    let (_, errors, models) = load.stop().await;
    // Requests in flight to the killed worker may fail over or time out; none may be wrong.
    assert!(
        errors.iter().all(|e| !e.starts_with("read ")),
        "wrong reads: {errors:?}"
    );
    let map = SlotMap::even(2).rebalanced(&[true; 3]);
    let addrs = |i: usize, j: usize| [w[i].addr, w[j].addr];
    check(
        orch.addr,
        &models,
        &[addrs(0, 1), addrs(2, 3), addrs(4, 5)],
        &map,
    )
    .await;
    for i in (0..20_000u64).step_by(97) {
        let key = format!("bulk:{i}");
        let pair = map.pair_of(key.as_bytes());
        for a in addrs(2 * pair, 2 * pair + 1) {
            let got = Client::connect(&a.to_string())
                .await
                .unwrap()
                .get::<Bytes>(&key)
                .await
                .unwrap();
            assert_eq!(
                got.as_deref(),
                Some(&crate::harness::noise(i, 1000)[..]),
                "{key} on {a}"
            );
        }
    }
    // The move did meet the loss: an import or a step failed and was taken up again.
    let log = orch.log_text();
    assert!(
        log.contains("importing the slots again") || log.contains("trying again in a second"),
        "{log}"
    );
    let _ = std::fs::remove_file(format!("{}.state", file.arg()));
}

/// A state file that exists but cannot be used stops the start, with the file and the line:
/// an even map instead would look for moved keys on their old pairs.
#[test]
fn a_state_file_that_cannot_be_used_stops_the_start() {
    let state = TempFile::with("epoch 2\npair 127.0.0.1:1 127.0.0.1:2\n  slots 0-100:0\n");
    let start = |state: &str| {
        std::process::Command::new(ORCHESTRATOR)
            .args(["--listen", "127.0.0.1:0", "--state-file", state])
            .args(["127.0.0.1:1", "127.0.0.1:2"])
            .output()
            .unwrap()
    };
    let out = start(&state.arg());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&state.arg()) && err.contains("line 3: the ranges cover 101 slots"),
        "{err}"
    );
    // One that cannot be read (a directory here) is refused too.
    let out = start(std::env::temp_dir().to_str().unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read the state file"), "{err}");
}
