//! Membership changes with clients writing: a pair added and then a middle pair removed
//! through `--cluster-file` and SIGHUP (with an orchestrator restart in between), a worker
//! replaced and a pair added through `CLUSTER`, and a receiving worker killed or stopped
//! mid-move. Afterwards every acknowledged key reads back, deleted keys stay deleted, both
//! workers of each pair hold the same copy, and a pair holds only the keys of its own slots
//! (the old pair dropped the moved ones). Changes that would lose data or never finish are
//! refused with the reason; a state file that cannot be used stops the start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use twincache_client::{Bytes, Client};
use twincache_protocol::slots::SlotMap;

use crate::faults::{Load, Model, FAST};
use crate::harness::{on_worker, poll_until, wait_log, Proc, RespConn, TempFile, ORCHESTRATOR};

/// `INFO cluster` through RESP.
pub async fn cluster_info(addr: SocketAddr) -> String {
    let mut c = RespConn::connect(addr).await;
    String::from_utf8_lossy(&c.call(&[b"INFO", b"cluster"]).await).into_owned()
}

/// Waits (bounded) until INFO cluster satisfies `done`.
pub async fn wait_info(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let check = || async {
        let info = cluster_info(addr).await;
        (done(&info), info)
    };
    poll_until(
        what,
        Duration::from_secs(90),
        Duration::from_millis(100),
        check,
    )
    .await
}

/// Whether INFO cluster shows no change under way and the pairs holding `slots` slots.
fn moved(info: &str, slots: &[usize]) -> bool {
    let counts: Vec<usize> = info
        .lines()
        .filter(|l| l.starts_with("pair"))
        .filter_map(|l| l.rsplit("slots=").next()?.trim().parse().ok())
        .collect();
    info.contains("membership:idle") && !info.contains("move_current") && counts == slots
}

/// Waits until the change is done: no slot moving, every pair in sync, slot counts as given.
pub async fn wait_settled(addr: SocketAddr, slots: &[usize]) -> String {
    wait_info(addr, "the membership change", |info| {
        moved(info, slots)
            && info
                .lines()
                .filter(|l| l.starts_with("pair"))
                .all(|l| l.contains("state=in_sync,in_sync"))
    })
    .await
}

/// Writes `bulk:0` .. `bulk:<n-1>`, 1000 incompressible bytes each, retrying a write the
/// cluster turns away for a moment (a health round that times out on this busy machine
/// withholds writes for a moment: the node-id claim).
pub async fn write_bulk(orch: SocketAddr, n: u64) {
    let c = Client::connect(&orch.to_string()).await.unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let sets = chunk.iter().map(|&i| {
            let c = &c;
            async move {
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
}

/// Every `step`-th of the `n` bulk keys, on both workers of the pair `map` gives it.
async fn check_bulk(n: u64, step: usize, pairs: &[[SocketAddr; 2]], map: &SlotMap) {
    let mut workers = HashMap::new();
    for a in pairs.iter().flatten() {
        workers.insert(*a, Client::connect(&a.to_string()).await.unwrap());
    }
    for i in (0..n).step_by(step) {
        let key = format!("bulk:{i}");
        for a in pairs[map.pair_of(key.as_bytes())] {
            let got = workers[&a].get::<Bytes>(&key).await.unwrap();
            assert_eq!(
                got.as_deref(),
                Some(&crate::harness::noise(i, 1000)[..]),
                "{key} on {a}"
            );
        }
    }
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
    // And all at once: EXISTS reads each pair's keys by program, routed by the map now.
    let mut exists = twincache_client::cmd("EXISTS");
    for key in model.keys() {
        exists.arg(key.as_str());
    }
    let found: i64 = exists.query(&c).await.unwrap();
    let written = model.values().filter(|v| v.is_some()).count();
    assert_eq!(found as usize, written, "EXISTS of every key written");
    for (n, pair) in pairs.iter().enumerate() {
        let a = Client::connect(&pair[0].to_string()).await.unwrap();
        let b = Client::connect(&pair[1].to_string()).await.unwrap();
        for (key, want) in &model {
            let here = map.pair_of(key.as_bytes()) == n;
            let (ga, gb) = (
                on_worker(&a, key, here).await,
                on_worker(&b, key, here).await,
            );
            assert_eq!(ga, gb, "{key}: the workers of pair {n} differ");
            let got = ga.map(|v| String::from_utf8_lossy(&v).into_owned());
            if here {
                assert_eq!(&got, want, "{key} on its pair {n}");
            } else {
                assert_eq!(got, None, "{key} on pair {n}, which does not hold its slot");
            }
        }
    }
}

/// Two pairs of six workers in a cluster file, moving at `rate` per receiving worker, holding
/// `bulk` bulk keys; the last two workers wait to be added.
async fn slow_moving_cluster(rate: &str, bulk: u64) -> (Vec<Proc>, TempFile, Proc) {
    let w: Vec<Proc> = (0..6).map(|_| Proc::worker()).collect();
    let file = TempFile::with(&cluster_file(&[(&w[0], &w[1]), (&w[2], &w[3])]));
    let orch = fast_orchestrator(&file, &["--move-rate-limit", rate]);
    wait_settled(orch.addr, &[8192, 8192]).await;
    write_bulk(orch.addr, bulk).await;
    (w, file, orch)
}

/// Adds the third pair of [`slow_moving_cluster`] through the cluster file; returns once a
/// move is under way.
async fn add_third_pair(w: &[Proc], file: &TempFile, orch: &Proc) {
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
    // The removed pair was drained: it holds no key at all (it refuses to read any, as its
    // pair holds no slot, so its own count says so).
    for wk in [&w[2], &w[3]] {
        assert_eq!(keys_on(wk.addr).await, 0, "keys left on {}", wk.addr);
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
    // So is a file the planner refuses (partners swapped between pairs: each worker would
    // join another pair's data), and it is not retried: the pairs wanted stay as they were.
    let retries = || orch.log_text().matches("trying again in a second").count();
    let retried = retries();
    std::fs::write(&file.0, cluster_file(&[(&w[0], &w[4]), (&w[1], &w[5])])).unwrap();
    orch.signal("HUP");
    wait_log(&orch, "is in another pair now").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = wait_settled(orch.addr, &[8192, 8192]).await;
    assert!(!info.contains("membership:retrying"), "{info}");
    assert_eq!(retries(), retried, "{}", orch.log_text());
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
/// goes on (its copy asked again, or skipped while it refills from its partner), and it
/// refills; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_survives_the_loss_of_a_receiving_worker() {
    // Slow moves (small batches at 2 MiB/s), so the kill lands in one; 20 MB of
    // incompressible values, of which a third moves.
    let (mut w, file, orch) = slow_moving_cluster("2MiB", 20_000).await;
    let load = Load::start(orch.addr, 2).await;
    add_third_pair(&w, &file, &orch).await;
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
    check_bulk(20_000, 97, &[addrs(0, 1), addrs(2, 3), addrs(4, 5)], &map).await;
    // The move did meet the loss: an import or a step failed and was taken up again, or
    // the worker was skipped.
    let log = orch.log_text();
    assert!(
        [
            "importing the slots again",
            "trying again in a second",
            "skipped by the copy"
        ]
        .iter()
        .any(|said| log.contains(said)),
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

/// CLUSTER refuses, with the reason, what would leave a pair without a copy of its data or
/// what could never be done (it would be retried every second, forever): a worker replaced
/// while its partner refills (right after another replacement in the pair) or is down, the
/// last pair removed, the orchestrator's own address, one worker under two names. Replacing
/// the dead worker itself goes through, and every key is then on both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_changes_that_would_lose_data_or_never_finish() {
    // The kept worker sends refills at 1 MiB/s: a refill of the 3 MB below takes seconds.
    let mut w = [
        crate::faults::worker_on(0, &["--resync-rate-limit", "1MiB"]),
        Proc::worker(),
        Proc::worker(),
        Proc::worker(),
    ];
    let orch = Proc::orchestrator(&[w[0].addr, w[1].addr], FAST);
    wait_settled(orch.addr, &[16384]).await;
    write_bulk(orch.addr, 3_000).await;
    let mut c = RespConn::connect(orch.addr).await;
    let mut cluster = async |args: &[&str]| {
        let mut command: Vec<&[u8]> = vec![b"CLUSTER"];
        command.extend(args.iter().map(|a| a.as_bytes()));
        String::from_utf8_lossy(&c.call(&command).await).into_owned()
    };
    let addr = |p: &Proc| p.addr.to_string();
    assert_eq!(
        cluster(&["REPLACE", &addr(&w[1]), &addr(&w[2])]).await,
        "+OK\r\n"
    );
    let replaced = format!("workers={},{}", w[0].addr, w[2].addr);
    wait_info(orch.addr, "the replacement", |i| i.contains(&replaced)).await;
    // w2 refills from w0: w0 is the pair's only copy and cannot go.
    let reply = cluster(&["REPLACE", &addr(&w[0]), &addr(&w[3])]).await;
    let only_copy = format!("{} would be the pair's only copy", w[2].addr);
    assert!(
        reply.starts_with(&format!("-ERR {} cannot be replaced", w[0].addr))
            && reply.contains(&only_copy),
        "{reply}"
    );
    wait_settled(orch.addr, &[16384]).await;
    // Nor once its partner is down.
    w[2].kill();
    wait_info(orch.addr, "w2 down", |i| i.contains("state=in_sync,down")).await;
    let reply = cluster(&["REPLACE", &addr(&w[0]), &addr(&w[3])]).await;
    assert!(
        reply.contains(&format!("{only_copy} and is down")),
        "{reply}"
    );
    // What could never be done.
    let reply = cluster(&["REMOVEPAIR", "0"]).await;
    assert_eq!(reply, "-ERR that would remove every pair\r\n");
    let reply = cluster(&["ADDPAIR", &addr(&orch), &addr(&w[3])]).await;
    assert!(reply.contains("own --listen address"), "{reply}");
    let alias = format!("localhost:{}", w[0].addr.port());
    let reply = cluster(&["ADDPAIR", &alias, &addr(&w[3])]).await;
    assert!(reply.contains("given twice"), "{reply}");
    let info = cluster_info(orch.addr).await;
    assert!(
        info.contains("membership:idle") && !info.contains("move_error"),
        "{info}"
    );
    // The dead worker itself is replaced: its partner is in sync.
    assert_eq!(
        cluster(&["REPLACE", &addr(&w[2]), &addr(&w[3])]).await,
        "+OK\r\n"
    );
    let info = wait_settled(orch.addr, &[16384]).await;
    assert!(
        info.contains(&format!("workers={},{}", w[0].addr, w[3].addr)),
        "{info}"
    );
    check_bulk(3_000, 1, &[[w[0].addr, w[3].addr]], &SlotMap::even(1)).await;
}

/// A third pair added to a slow-moving cluster of 10,000 keys, whose second worker (w5)
/// stops answering (SIGSTOP) early in the change: the change finishes without it and the
/// orchestrator logs it as skipped by the copy. The slots each pair then holds are returned.
async fn a_change_that_skips_w5() -> (Vec<Proc>, TempFile, Proc, [usize; 3]) {
    // Slow moves (small batches at 1 MiB/s), so the stop lands early in the change.
    let (w, file, orch) = slow_moving_cluster("1MiB", 10_000).await;
    add_third_pair(&w, &file, &orch).await;
    w[5].signal("STOP");
    let slots = [5462, 5461, 5461];
    let info = wait_info(orch.addr, "the change without w5", |i| moved(i, &slots)).await;
    assert!(info.contains("state=in_sync,down"), "{info}");
    wait_log(&orch, "skipped by the copy: refills from its partner").await;
    (w, file, orch, slots)
}

/// A worker of the new pair that stops answering in the middle of a move (SIGSTOP) does not
/// hold up the change: the copy goes to its partner alone and the change finishes. Once the
/// worker answers again it has missed the copy, though no write (nothing else is written),
/// and refills from its partner before it is in sync: then it holds every moved key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiving_worker_that_stops_does_not_hold_up_the_move() {
    let (w, file, orch, slots) = a_change_that_skips_w5().await;
    w[5].signal("CONT");
    wait_settled(orch.addr, &slots).await;
    let map = SlotMap::even(2).rebalanced(&[true; 3]);
    let addrs = |i: usize, j: usize| [w[i].addr, w[j].addr];
    check_bulk(10_000, 7, &[addrs(0, 1), addrs(2, 3), addrs(4, 5)], &map).await;
    let _ = std::fs::remove_file(format!("{}.state", file.arg()));
}

/// The miss of a worker skipped by a move is on record on its partner, not only in the
/// orchestrator that skipped it: a worker of the new pair stops answering (SIGSTOP) while
/// the slots are copied, the copy goes to its partner alone, and the orchestrator is killed
/// once the change is done. The worker then answers again with its boot id and its
/// `synced` flag as they were (stopped, not restarted, so nothing of its own says it lacks
/// anything), and a new orchestrator, which never saw it miss a thing, starts from the same
/// state file: only the partner's count of writes taken alone (`record_miss`) tells it the
/// worker lacks the moved keys. It must refill from its partner before it serves, so every
/// moved key reads back through the orchestrator, and both workers of the new pair hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_orchestrator_refills_the_worker_a_move_skipped() {
    let (w, file, orch, slots) = a_change_that_skips_w5().await;
    // Killed, not stopped gracefully: what it knew of w5 goes with it.
    drop(orch);
    w[5].signal("CONT");
    let orch = fast_orchestrator(&file, &[]);
    let map = SlotMap::even(2).rebalanced(&[true; 3]);
    let moved_keys: Vec<u64> = (0..10_000u64)
        .filter(|i| map.pair_of(format!("bulk:{i}").as_bytes()) == 2)
        .collect();
    assert!(moved_keys.len() > 2_000, "{} keys moved", moved_keys.len());
    // From its first answer on, the new orchestrator finds every moved key: w5 serves no
    // read before it has refilled.
    let c = Client::connect(&orch.addr.to_string()).await.unwrap();
    let read_all = || async {
        let reads = moved_keys.iter().map(|&i| {
            let c = &c;
            async move {
                for _ in 0..100 {
                    match c.get::<Bytes>(format!("bulk:{i}")).await {
                        Ok(got) => return (i, got),
                        // Until its first health round has settled the workers' mode.
                        Err(e) if e.status() == Some(twincache_client::Status::Unavailable) => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => panic!("bulk:{i}: {e}"),
                    }
                }
                panic!("bulk:{i}: never answered");
            }
        });
        for (i, got) in futures_util::future::join_all(reads).await {
            let want = crate::harness::noise(i, 1000);
            let what = match got {
                None => "missing",
                Some(v) if v[..] == want[..] => continue,
                Some(_) => "another value",
            };
            panic!("bulk:{i} through the restarted orchestrator: {what}");
        }
    };
    let settled = |i: &str| {
        moved(i, &slots)
            && i.lines()
                .filter(|l| l.starts_with("pair"))
                .all(|l| l.contains("state=in_sync,in_sync"))
    };
    loop {
        read_all().await;
        if settled(&cluster_info(orch.addr).await) {
            break;
        }
    }
    wait_settled(orch.addr, &slots).await;
    read_all().await;
    // It was the partner's count that told: w5, established and not restarted, was first
    // assessed as lacking writes (joining: it refills once they have landed), where the
    // other workers' data was established.
    let log = orch.log_text();
    let first = log
        .lines()
        .find(|l| l.contains(&w[5].addr.to_string()) && l.contains("from=\"unknown\""))
        .unwrap_or_else(|| panic!("w5 was never assessed:\n{log}"));
    assert!(
        first.contains("takes writes again") && first.contains("to=\"joining\""),
        "w5 was not found lacking:\n{log}"
    );
    let addrs = |i: usize, j: usize| [w[i].addr, w[j].addr];
    check_bulk(10_000, 1, &[addrs(0, 1), addrs(2, 3), addrs(4, 5)], &map).await;
    let _ = std::fs::remove_file(format!("{}.state", file.arg()));
}

/// Waits (bounded) until both workers of each pair `n` count exactly `per_pair[n]` keys of
/// their own (`count(i)`: worker `i`'s, in pairing order), so none kept keys its pair no longer
/// holds; returns what it saw last.
pub async fn wait_exact_counts<F, Fut>(per_pair: &[usize], count: F) -> String
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let want: Vec<u64> = per_pair.iter().flat_map(|&n| [n as u64; 2]).collect();
    poll_until(
        "every worker holding exactly its pair's keys",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let mut counts = Vec::new();
            for i in 0..want.len() {
                counts.push(count(i).await);
            }
            (counts == want, format!("{counts:?}, want {want:?}"))
        },
    )
    .await
}

/// A worker's count of keys, from its own `stats`.
async fn keys_on(worker: SocketAddr) -> u64 {
    key_count(&Client::connect(&worker.to_string()).await.unwrap()).await
}

/// The keys (not deletes) a worker holds by its own `stats`, asked through `c`, a client
/// connected to the worker directly.
pub async fn key_count(c: &Client) -> u64 {
    let stats = c.stats().await.unwrap();
    stats
        .split(['\r', '\n', ' '])
        .find_map(|l| l.strip_prefix("keys:")?.parse().ok())
        .unwrap_or_else(|| panic!("no key count in {stats:?}"))
}

/// A worker refilled from a partner that still holds slots moved away ends with only its
/// pair's slots. A worker of a sending pair is stopped (SIGSTOP) for the whole change: the
/// copy comes from its partner, which drops each batch, while its own drops wait. The
/// orchestrator is then killed, forgetting those retries; the stopped worker resumes
/// holding every moved slot, and its partner is restarted, empty, so that it refills from
/// it. A new orchestrator must leave each worker with exactly its pair's keys, partners with
/// the same count (before, both kept the moved slots too, for good: nothing dropped them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_keeps_slots_its_pair_does_not_hold_after_refills() {
    let (mut w, file, orch) = slow_moving_cluster("4MiB", 6_000).await;
    w[1].signal("STOP");
    wait_info(orch.addr, "w1 down", |i| i.contains("state=in_sync,down")).await;
    add_third_pair(&w, &file, &orch).await;
    let slots = [5462, 5461, 5461];
    wait_info(orch.addr, "the change without w1", |i| moved(i, &slots)).await;
    drop(orch);
    w[1].signal("CONT");
    let port = w[0].addr.port();
    w[0].kill();
    w[0] = crate::faults::worker_on(port, &[]);
    let orch = fast_orchestrator(&file, &[]);
    wait_settled(orch.addr, &slots).await;
    let map = SlotMap::even(2).rebalanced(&[true; 3]);
    let addrs = |i: usize, j: usize| [w[i].addr, w[j].addr];
    let pairs = [addrs(0, 1), addrs(2, 3), addrs(4, 5)];
    check_bulk(6_000, 1, &pairs, &map).await;
    let per_pair: Vec<usize> = (0..3)
        .map(|p| {
            (0..6_000u64)
                .filter(|i| map.pair_of(format!("bulk:{i}").as_bytes()) == p)
                .count()
        })
        .collect();
    // The sweeps run within a round or two of the refills' end.
    let workers: Vec<SocketAddr> = pairs.iter().flatten().copied().collect();
    let counts = wait_exact_counts(&per_pair, |i| keys_on(workers[i])).await;
    eprintln!("key counts per worker: {counts}");
    let _ = std::fs::remove_file(format!("{}.state", file.arg()));
}

/// Two orchestrators serve one cluster; a pair is added through one while clients write,
/// delete and read through the other only. The other routes by the map the workers hold: a
/// request it routed by its old map is refused by the worker (`Moved`) and routed again,
/// and it reads the new map from the workers. Every acknowledged write and delete reads
/// back through both, partners agree, and each pair holds only its own slots. Without the
/// shared map the second orchestrator went on writing moved keys to the old pair, whose
/// copies were then dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_through_one_orchestrator_is_followed_by_the_other() {
    let w: Vec<Proc> = (0..4).map(|_| Proc::worker()).collect();
    let mut flags = FAST.to_vec();
    flags.extend(["--move-batch-slots", "1024"]);
    let changer = Proc::orchestrator(&[w[0].addr, w[1].addr], &flags);
    let serving = Proc::orchestrator(&[w[0].addr, w[1].addr], FAST);
    wait_settled(changer.addr, &[16384]).await;
    wait_settled(serving.addr, &[16384]).await;
    let load = Load::start(serving.addr, 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Through the client library's call this time (the other tests use RESP).
    let c = Client::connect(&changer.addr.to_string()).await.unwrap();
    let (a, b) = (w[2].addr.to_string(), w[3].addr.to_string());
    c.add_pair(&a, &b).await.unwrap();
    assert!(c.cluster_info().await.unwrap().contains("slot_map_epoch:"));
    let refused = c.remove_pair("7").await.unwrap_err();
    assert!(refused.to_string().contains("no such pair"), "{refused}");
    let info = wait_settled(changer.addr, &[8192, 8192]).await;
    let epoch = |info: &str| {
        info.lines()
            .find_map(|l| {
                l.strip_prefix("slot_map_epoch:")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap()
    };
    let followed = wait_settled(serving.addr, &[8192, 8192]).await;
    assert_eq!(epoch(&followed), epoch(&info), "{followed}\n{info}");
    // Clients go on through the follower after the change.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ops, errors, models) = load.stop().await;
    assert!(ops > 100, "only {ops} operations");
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert!(
        serving
            .log_text()
            .contains("routing by the cluster map another orchestrator made"),
        "{}",
        serving.log_text()
    );
    let map = SlotMap::even(1).rebalanced(&[true; 2]);
    let pairs = [[w[0].addr, w[1].addr], [w[2].addr, w[3].addr]];
    check(changer.addr, &models, &pairs, &map).await;
    check(serving.addr, &models, &pairs, &map).await;
}

/// A worker replaced through one orchestrator while the other, between two health rounds,
/// still routes by the map that has the replaced worker. Its writes to the pair are taken by
/// the partner (whose slots did not change, so it admits them) and by the replaced worker,
/// and acknowledged; the new worker, which refilled from the partner already, must not miss
/// them: the replaced worker is given the new map, in which it is in no pair, so it refuses
/// them, and the other orchestrator reads the new map and writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_replaced_through_one_orchestrator_misses_no_write_of_the_other() {
    let w: Vec<Proc> = (0..3).map(|_| Proc::worker()).collect();
    let changer = Proc::orchestrator(&[w[0].addr, w[1].addr], FAST);
    // Slow health rounds: the change is not seen through a health check for a while.
    let slow = [
        "--worker-timeout",
        "300ms",
        "--health-interval",
        "6s",
        "--health-timeout",
        "200ms",
    ];
    let serving = Proc::orchestrator(&[w[0].addr, w[1].addr], &slow);
    wait_settled(changer.addr, &[16384]).await;
    wait_settled(serving.addr, &[16384]).await;
    let mut c = RespConn::connect(changer.addr).await;
    let (old, new) = (w[1].addr.to_string(), w[2].addr.to_string());
    let reply = c
        .call(&[b"CLUSTER", b"REPLACE", old.as_bytes(), new.as_bytes()])
        .await;
    assert_eq!(&reply[..], b"+OK\r\n");
    let replaced = format!("workers={},{new}", w[0].addr);
    wait_info(changer.addr, "the replacement", |i| {
        i.contains(&replaced) && i.contains("state=in_sync,in_sync")
    })
    .await;
    // Written through the other orchestrator at once, before its next health round.
    let through = Client::connect(&serving.addr.to_string()).await.unwrap();
    for i in 0..100 {
        through
            .set(format!("window:{i}"), format!("v{i}"))
            .await
            .unwrap();
    }
    let new_worker = Client::connect(&new).await.unwrap();
    for i in 0..100 {
        let got = new_worker
            .get::<Bytes>(format!("window:{i}"))
            .await
            .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(format!("v{i}").as_bytes()),
            "window:{i} on the new worker (acknowledged by the other orchestrator)"
        );
    }
}
