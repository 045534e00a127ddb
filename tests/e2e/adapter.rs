//! Adapter mode against real redis-server processes: every rule checked on the Redis servers
//! themselves with the `redis` crate.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use twincache_client::Bytes;

use redis::AsyncCommands;

use crate::harness::{Proc, RedisServer, TextConn, WORKER};

struct Tier {
    source: RedisServer,
    destination: RedisServer,
    _workers: Vec<Proc>,
    orch: Proc,
}

impl Tier {
    async fn start(delete_from_source: bool) -> Tier {
        let (source, destination) = (RedisServer::start(), RedisServer::start());
        let mut args = vec![
            "--port".to_string(),
            "0".into(),
            "--source".into(),
            source.url(),
            "--destination".into(),
            destination.url(),
        ];
        if delete_from_source {
            args.push("--delete-from-source".into());
        }
        let workers: Vec<Proc> = (0..4).map(|_| Proc::start(WORKER, &args)).collect();
        let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
        let orch = Proc::orchestrator(&addrs, &["--health-interval", "100ms"]);
        // Ready once the orchestrator has seen the workers report adapter mode.
        let tier = Tier {
            source,
            destination,
            _workers: workers,
            orch,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("redis-cli")
                .args(["-p", &tier.orch.addr.port().to_string(), "FOO"])
                .output()
                .unwrap();
            // In adapter mode an unknown command reaches the destination, whose error says so.
            if String::from_utf8_lossy(&out.stdout).contains("unknown command")
                && tier_ready(&tier).await
            {
                return tier;
            }
            assert!(
                Instant::now() < deadline,
                "adapter tier not ready: {}",
                tier.orch.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn con(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://{}/", self.orch.addr))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

async fn tier_ready(tier: &Tier) -> bool {
    let mut con = tier.destination.con().await;
    let _: () = con.set("__probe", "1").await.unwrap();
    let mut orch = tier.con().await;
    // DBSIZE passes through in adapter mode: the destination's count.
    let n: redis::RedisResult<i64> = redis::cmd("DBSIZE").query_async(&mut orch).await;
    let _: () = con.del("__probe").await.unwrap();
    n.is_ok_and(|n| n >= 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_the_remiro_rules() {
    let tier = Tier::start(true).await;
    let (mut src, mut dst, mut orch) = (
        tier.source.con().await,
        tier.destination.con().await,
        tier.con().await,
    );

    // Only in source: moves, TTL kept, source copy gone.
    let _: () = redis::cmd("SET")
        .arg("moving")
        .arg("from source")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut src)
        .await
        .unwrap();
    let got: Option<String> = orch.get("moving").await.unwrap();
    assert_eq!(got.as_deref(), Some("from source"));
    let in_dst: Option<String> = dst.get("moving").await.unwrap();
    assert_eq!(in_dst.as_deref(), Some("from source"));
    let ttl: i64 = dst.pttl("moving").await.unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "TTL kept: {ttl}");
    let left: bool = src.exists("moving").await.unwrap();
    assert!(!left, "deleted from source with --delete-from-source");

    // In both: served from destination, source untouched.
    let _: () = src.set("both", "old in source").await.unwrap();
    let _: () = dst.set("both", "new in destination").await.unwrap();
    let got: String = orch.get("both").await.unwrap();
    assert_eq!(got, "new in destination");
    let still: String = src.get("both").await.unwrap();
    assert_eq!(still, "old in source");

    // Nowhere: nil, and nothing created anywhere.
    let got: Option<String> = orch.get("nowhere").await.unwrap();
    assert_eq!(got, None);
    let (a, b): (bool, bool) = (
        src.exists("nowhere").await.unwrap(),
        dst.exists("nowhere").await.unwrap(),
    );
    assert!(!a && !b);

    // MGET follows the same rules for each key, whichever pair holds it.
    for i in 0..3 {
        let _: () = src.set(format!("m:src{i}"), i).await.unwrap();
        let _: () = dst.set(format!("m:dst{i}"), i).await.unwrap();
    }
    let keys = [
        "m:src0", "m:dst0", "m:none", "m:src1", "m:dst1", "m:src2", "m:dst2",
    ];
    let got: Vec<Option<String>> = orch.mget(&keys).await.unwrap();
    let want = ["0", "0", "", "1", "1", "2", "2"].map(|v| (!v.is_empty()).then(|| v.to_string()));
    assert_eq!(got, want);
    // More keys than one read program takes (16): each still by a GET of its own, the
    // reply streamed.
    let got: Vec<Option<String>> = orch.mget(keys.repeat(3)).await.unwrap();
    assert_eq!(got, [want.clone(), want.clone(), want].concat());

    // Through the text protocol too.
    let mut text = TextConn::connect(tier.orch.addr).await;
    let _: () = src.set("texted", "via text").await.unwrap();
    assert_eq!(text.request("get||texted").await, "0||via text");
    assert_eq!(text.request("get||nowhere").await, "2||key not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_the_source_keeps_its_copy() {
    let tier = Tier::start(false).await;
    let (mut src, mut orch) = (tier.source.con().await, tier.con().await);
    let _: () = src.set("kept", "v").await.unwrap();
    let got: String = orch.get("kept").await.unwrap();
    assert_eq!(got, "v");
    let still: bool = src.exists("kept").await.unwrap();
    assert!(still);
}

/// `calls` of a command on a Redis server, from INFO commandstats.
async fn calls(con: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_through_once_and_other_commands_pass_through_and_invalidate() {
    let tier = Tier::start(true).await;
    let (mut src, mut dst, mut orch) = (
        tier.source.con().await,
        tier.destination.con().await,
        tier.con().await,
    );

    // SET lands in destination, leaves source without the key; one Redis write per SET.
    let _: () = src.set("w", "stale in source").await.unwrap();
    let before = calls(&mut dst, "set").await;
    for i in 0..20 {
        let _: () = orch.set("w", format!("v{i}")).await.unwrap();
    }
    assert_eq!(
        calls(&mut dst, "set").await - before,
        20,
        "exactly one destination write per client write"
    );
    let got: String = dst.get("w").await.unwrap();
    assert_eq!(got, "v19");
    let left: bool = src.exists("w").await.unwrap();
    assert!(!left);
    let cached: String = orch.get("w").await.unwrap();
    assert_eq!(cached, "v19");

    // INCR, HSET, EXPIRE, DEL pass through, and no read returns a stale cached value.
    let _: () = orch.set("n", 10).await.unwrap();
    let _: i64 = orch.get("n").await.unwrap(); // cached
    let n: i64 = orch.incr("n", 5).await.unwrap();
    assert_eq!(n, 15);
    let n: i64 = orch.get("n").await.unwrap();
    assert_eq!(n, 15, "the cached 10 was invalidated");
    let _: i64 = orch.hset("h", "f", "x").await.unwrap();
    let h: String = dst.hget("h", "f").await.unwrap();
    assert_eq!(h, "x");
    let err = orch.get::<_, String>("h").await.unwrap_err();
    assert!(
        err.to_string().contains("WRONGTYPE"),
        "Redis' own error comes back as is: {err}"
    );
    let _: bool = orch.expire("w", 100).await.unwrap();
    let ttl: i64 = dst.ttl("w").await.unwrap();
    assert!(ttl > 90);
    let deleted: i64 = orch.del("w").await.unwrap();
    assert_eq!(deleted, 1);
    let gone: Option<String> = orch.get("w").await.unwrap();
    assert_eq!(gone, None, "the cached copy went with the DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_gives_clear_errors_then_recovers() {
    let mut tier = Tier::start(false).await;
    let mut orch = tier.con().await;
    let _: () = orch.set("before", "v").await.unwrap();
    let port = tier.destination.port;
    tier.destination.kill();
    let started = Instant::now();
    let err = orch.set::<_, _, ()>("during", "v").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an error, not a hang"
    );
    assert!(
        err.to_string().to_lowercase().contains("destination"),
        "says which Redis: {err}"
    );
    let err = orch
        .get::<_, Option<String>>("not-cached")
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("destination"),
        "{err}"
    );
    tier.destination = RedisServer::start_on(port);
    let mut ok = false;
    for _ in 0..100 {
        if orch.set::<_, _, ()>("after", "v").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "recovers once the destination is back");
    let mut dst = tier.destination.con().await;
    let got: String = dst.get("after").await.unwrap();
    assert_eq!(got, "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_on_overlapping_keys_end_consistent() {
    let tier = Tier::start(true).await;
    let mut src = tier.source.con().await;
    for k in 0..10 {
        let _: () = src.set(format!("shared:{k}"), "from source").await.unwrap();
    }
    let url = format!("redis://{}/", tier.orch.addr);
    let tasks: Vec<_> = (0..50)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut con = redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                for i in 0..40 {
                    let key = format!("shared:{}", (c + i) % 10);
                    if i % 3 == 0 {
                        let _: () = con.set(&key, format!("c{c}:{i}")).await.unwrap();
                    } else {
                        let _: Option<String> = con.get(&key).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (mut dst, mut orch) = (tier.destination.con().await, tier.con().await);
    for k in 0..10 {
        let key = format!("shared:{k}");
        let in_dst: Option<String> = dst.get(&key).await.unwrap();
        let cached: Option<String> = orch.get(&key).await.unwrap();
        assert!(
            in_dst.as_deref().is_some_and(|v| v.starts_with('c')),
            "{key}: {in_dst:?}"
        );
        assert_eq!(cached, in_dst, "{key}: the cache and the destination agree");
        let left: bool = src.exists(&key).await.unwrap();
        assert!(!left, "{key} left the source");
    }
}

/// Adapter-mode workers with these extra flags for each (`None`: a plain worker).
fn adapter_workers(source: &RedisServer, destination: &RedisServer, plain: &[bool]) -> Vec<Proc> {
    plain
        .iter()
        .map(|&plain| {
            let mut args = vec!["--port".to_string(), "0".into()];
            if !plain {
                args.extend([
                    "--source".into(),
                    source.url(),
                    "--destination".into(),
                    destination.url(),
                ]);
            }
            Proc::start(WORKER, &args)
        })
        .collect()
}

/// No SET is acknowledged before the orchestrator knows the workers are in adapter mode:
/// every acknowledged one, from the first moment the port is open, is in the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_in_the_first_moments_reach_the_destination() {
    let (source, destination) = (RedisServer::start(), RedisServer::start());
    let workers = adapter_workers(&source, &destination, &[false; 4]);
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
    let orch = Proc::orchestrator(&addrs, &[]);
    let mut con = redis::Client::open(format!("redis://{}/", orch.addr))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (mut acked, mut refused) = (Vec::new(), 0);
    for i in 0..400 {
        let key = format!("early:{i}");
        match con.set::<_, _, ()>(&key, "v").await {
            Ok(()) => acked.push(key),
            Err(e) => {
                assert!(e.to_string().contains("TryAgain"), "{e}");
                refused += 1;
            }
        }
    }
    // How many came before the mode was known depends on how fast this test connects.
    assert!(
        acked.len() > 100,
        "served once the mode is known ({refused} refused)"
    );
    let mut dst = destination.con().await;
    for key in &acked {
        let got: Option<String> = dst.get(key).await.unwrap();
        assert_eq!(got.as_deref(), Some("v"), "{key} was acknowledged");
    }
}

/// A pair whose workers disagree on the mode is a configuration error: with no mode given
/// nothing is served; with `--mode`, the worker in the other mode gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_in_different_modes_are_a_configuration_error() {
    let (source, destination) = (RedisServer::start(), RedisServer::start());
    let workers = adapter_workers(&source, &destination, &[false, true]);
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();

    let undecided = Proc::orchestrator(&addrs, &["--health-interval", "100ms"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let out = TextConn::connect(undecided.addr)
        .await
        .request("set||k||v")
        .await;
    assert!(out.starts_with("4||"), "{out}");
    assert!(undecided
        .log_text()
        .contains("as many workers run in adapter mode as not"));

    let orch = Proc::orchestrator(&addrs, &["--health-interval", "100ms", "--mode", "adapter"]);
    let plain = addrs[1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = TextConn::connect(orch.addr).await.request("status").await;
        if status.contains(&format!("{plain}=misconfigured")) && status.contains("=in_sync") {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut con = redis::Client::open(format!("redis://{}/", orch.addr))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = con.set("k", "v").await.unwrap();
    let got: Option<String> = destination.con().await.get("k").await.unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    // The plain worker never saw it.
    let direct = twincache_client::Client::connect(&plain.to_string())
        .await
        .unwrap();
    assert_eq!(direct.get::<Bytes>("k").await.unwrap(), None);
    assert!(orch
        .log_text()
        .contains("runs in another mode than the cluster"));
}

/// Commands that need a Redis connection of their own are refused with a clear error, and
/// every other client is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_bound_commands_are_refused_clearly() {
    let tier = Tier::start(false).await;
    let mut con = tier.con().await;
    for cmd in [
        vec!["MULTI"],
        vec!["WATCH", "k"],
        vec!["BLPOP", "list", "0"],
        vec!["SUBSCRIBE", "news"],
        vec!["MONITOR"],
        vec!["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
        vec!["SHUTDOWN"],
    ] {
        let err = redis::cmd(cmd[0])
            .arg(&cmd[1..])
            .query_async::<redis::Value>(&mut con)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("needs a Redis connection of its own"),
            "{cmd:?}: {err}"
        );
    }
    // The connection and the destination are fine.
    let _: () = con.set("after", "v").await.unwrap();
    let got: Option<String> = con.get("after").await.unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    let n: i64 = con.incr("counter", 1).await.unwrap();
    assert_eq!(n, 1);
    let id: String = redis::cmd("XADD")
        .arg(&["s", "*", "f", "v"])
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(id.contains('-'), "a stream id: {id}");
}
