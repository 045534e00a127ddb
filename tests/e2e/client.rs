//! The client library and the binary protocol, against real processes.

use bytes::Bytes;
use twincache_client::{Client, Error, Status};
use twincache_protocol::slots::SlotMap;

use crate::harness::{exchange, Cluster};

fn all_bytes() -> Bytes {
    (0..=255u8).cycle().take(3000).collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_keys_and_values_round_trip_exactly() {
    let cluster = Cluster::start(2).await;
    let client = Client::connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    let cases: Vec<(Bytes, Bytes)> = vec![
        (
            Bytes::from_static(b"line\nbreak"),
            Bytes::from_static(b"a\nb\r\nc"),
        ),
        (Bytes::from_static(b"sep||key"), Bytes::from_static(b"||||")),
        (
            Bytes::from_static(b"nul\0key"),
            Bytes::from_static(b"\0\0\0"),
        ),
        (Bytes::from_static(b"\xff\xfe"), all_bytes()),
        (Bytes::from_static(b"empty"), Bytes::new()),
        (Bytes::from_static(b"big"), vec![b'x'; 1 << 20].into()),
    ];
    for (k, v) in &cases {
        client.set(k, v.clone()).await.unwrap();
    }
    for (k, v) in &cases {
        assert_eq!(client.get(k).await.unwrap().as_ref(), Some(v), "key {k:?}");
    }
    assert!(client.del(b"nul\0key").await.unwrap());
    assert!(!client.del(b"nul\0key").await.unwrap());
    assert_eq!(client.get::<Bytes>(b"nul\0key").await.unwrap(), None);
    client.ping().await.unwrap();
    // The text protocol refuses to put a value with a newline on a line.
    let out = exchange(cluster.orch.addr, b"get||big\nget||line\nbreak\n").await;
    assert!(out.starts_with("0||xxx"), "{}", &out[..20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_both_workers_of_their_pair_and_nowhere_else() {
    let cluster = Cluster::start(2).await;
    let client = Client::connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("placed:{i}")).collect();
    for k in &keys {
        client.set(k, format!("v:{k}")).await.unwrap();
    }
    let mut workers = Vec::new();
    for w in &cluster.workers {
        workers.push(Client::connect(&w.addr.to_string()).await.unwrap());
    }
    let mut per_pair = [0usize; 2];
    for k in &keys {
        let pair = SlotMap::even(2).pair_of(k.as_bytes());
        per_pair[pair] += 1;
        for (i, w) in workers.iter().enumerate() {
            let held = crate::harness::on_worker(w, k, i / 2 == pair).await;
            if i / 2 == pair {
                assert_eq!(
                    held,
                    Some(Bytes::from(format!("v:{k}"))),
                    "worker {i}, key {k}"
                );
            } else {
                assert_eq!(held, None, "worker {i} holds {k} of the other pair");
            }
        }
    }
    assert!(
        per_pair.iter().all(|&n| n > 50),
        "both pairs get keys: {per_pair:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_shared_by_many_tasks() {
    let cluster = Cluster::start(2).await;
    let client = Client::connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let key = format!("task{t}:{}", i % 5);
                    let value = Bytes::from(format!("{t}/{i}\n\0"));
                    client.set(&key, value.clone()).await.unwrap();
                    assert_eq!(client.get(&key).await.unwrap(), Some(value));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_pair_is_a_retryable_error() {
    let mut cluster = Cluster::start(1).await;
    let client = Client::connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    cluster.workers[0].kill();
    cluster.workers[1].kill();
    let mut last = None;
    for _ in 0..100 {
        match client.set("k", "v").await {
            Err(e) if e.status() == Some(Status::Unavailable) => {
                last = Some(e);
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let err = last.expect("set fails with Unavailable once both workers are gone");
    assert!(err.is_retryable());
    assert!(matches!(
        client.get::<Bytes>("k").await,
        Err(Error::Server {
            status: Status::Unavailable,
            ..
        })
    ));
    // A command's -TRYAGAIN reads the same way: retryable, with Redis' error code.
    let err = client.incr("k").await.unwrap_err();
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.code(), Some("TRYAGAIN"));
}

/// The client's Redis commands against real processes: counters and hashes keep counting on
/// the surviving worker when one of the pair dies, and a retry loop on `is_retryable` is all
/// the application needs meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_survive_the_loss_of_a_worker() {
    use std::collections::HashMap;
    use std::time::Duration;

    let mut cluster = Cluster::start(1).await;
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    for i in 1..=5 {
        assert_eq!(client.incr("hits").await.unwrap(), i);
    }
    client.hset("h", "a", 1).await.unwrap();
    assert!(client.expire("h", Duration::from_secs(600)).await.unwrap());
    cluster.workers[0].kill();

    let mut retries = 0;
    let n = loop {
        match client.incr("hits").await {
            Ok(n) => break n,
            Err(e) if e.is_retryable() && retries < 200 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("incr after a worker died: {e}"),
        }
    };
    // Retries of an INCR that did not answer may or may not have applied it.
    assert!(
        (6..=6 + retries).contains(&n),
        "{n} after {retries} retries"
    );
    assert_eq!(client.hincr_by("h", "a", 2).await.unwrap(), 3);
    let h: HashMap<String, i64> = client.hgetall("h").await.unwrap();
    assert_eq!(h, HashMap::from([("a".to_string(), 3)]));
    let left = client.ttl("h").await.unwrap().remaining().unwrap();
    assert!(left > Duration::from_secs(500), "{left:?}");
    let err = client.hlen("hits").await.unwrap_err();
    assert_eq!(err.code(), Some("WRONGTYPE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_orchestrator_restarts() {
    let mut cluster = Cluster::start(1).await;
    let addr = cluster.orch.addr;
    let client = Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .connect(&addr.to_string())
        .await
        .unwrap();
    client.set("persist", "across restarts").await.unwrap();
    cluster.orch.kill();
    let workers: Vec<_> = cluster.workers.iter().map(|w| w.addr).collect();
    // Restart on the same port; the data lives in the workers.
    let restarted = crate::harness::Proc::start(
        crate::harness::ORCHESTRATOR,
        &[
            "--listen".into(),
            addr.to_string(),
            workers[0].ip().to_string(),
            workers[0].port().to_string(),
            workers[1].ip().to_string(),
            workers[1].port().to_string(),
        ],
    );
    let mut got = None;
    for _ in 0..100 {
        match client.get::<Bytes>("persist").await {
            Ok(v) => {
                got = v;
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(got.as_deref(), Some(&b"across restarts"[..]));
    drop(restarted);
}
