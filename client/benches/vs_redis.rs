//! twincache-client against redis-rs (the `redis` crate's multiplexed connection), both
//! talking to the same orchestrator: the binary protocol against RESP, one client library
//! against the other. A benchmark, not a test: `bench/client.sh` starts the cluster and runs
//! it; by hand:
//!
//! ```text
//! cargo bench -p twincache-client --bench vs_redis -- --addr 127.0.0.1:7000 [--tasks 50]
//!     [--requests 200000] [--keys 100000] [--value-size 100] [--rounds 3] [--only get1,mget]
//! ```
//!
//! Each client is one connection shared by `--tasks` tasks (how both libraries are meant to
//! be used). Workloads: GET and SET with 1 and with 16 requests in flight per task, and MGET
//! of 100 keys with one in flight per task. Rounds alternate which client goes first, and the
//! table shows the median of the rounds and twincache's ratio to redis-rs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::AsyncCommands;
use twincache_client::{Bytes, Client};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Work {
    Get,
    Set,
    Mget,
}

#[derive(Clone, Copy, Debug)]
struct Load {
    name: &'static str,
    work: Work,
    in_flight: usize,
}

const LOADS: [Load; 5] = [
    Load {
        name: "get1",
        work: Work::Get,
        in_flight: 1,
    },
    Load {
        name: "get16",
        work: Work::Get,
        in_flight: 16,
    },
    Load {
        name: "set1",
        work: Work::Set,
        in_flight: 1,
    },
    Load {
        name: "set16",
        work: Work::Set,
        in_flight: 16,
    },
    Load {
        name: "mget",
        work: Work::Mget,
        in_flight: 1,
    },
];

const MGET_KEYS: usize = 100;

struct Args {
    addr: String,
    tasks: usize,
    requests: usize,
    keys: u64,
    value_size: usize,
    rounds: usize,
    only: Option<Vec<String>>,
}

fn args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:7000".into(),
        tasks: 50,
        requests: 200_000,
        keys: 100_000,
        value_size: 100,
        rounds: 3,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = value(),
            "--tasks" => a.tasks = value().parse().expect("--tasks"),
            "--requests" => a.requests = value().parse().expect("--requests"),
            "--keys" => a.keys = value().parse().expect("--keys"),
            "--value-size" => a.value_size = value().parse().expect("--value-size"),
            "--rounds" => a.rounds = value().parse().expect("--rounds"),
            "--only" => a.only = Some(value().split(',').map(String::from).collect()),
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// xorshift: the same key sequence for both clients.
struct Rng(u64);

impl Rng {
    fn key(&mut self, keys: u64) -> String {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        format!("bench:{:09}", self.0 % keys)
    }
}

/// One side of the comparison: how to send one unit of a workload.
trait Side: Clone + Send + Sync + 'static {
    fn call(
        &self,
        work: Work,
        rng: &mut Rng,
        keys: u64,
        value: &Bytes,
    ) -> impl std::future::Future<Output = ()> + Send + 'static;
}

impl Side for Client {
    fn call(
        &self,
        work: Work,
        rng: &mut Rng,
        keys: u64,
        value: &Bytes,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let client = self.clone();
        let key = rng.key(keys);
        let mkeys: Vec<String> = match work {
            Work::Mget => (0..MGET_KEYS).map(|_| rng.key(keys)).collect(),
            _ => Vec::new(),
        };
        let value = value.clone();
        async move {
            match work {
                Work::Get => {
                    client.get::<Bytes>(&key).await.expect("twincache get");
                }
                Work::Set => client.set(&key, value).await.expect("twincache set"),
                Work::Mget => {
                    client.mget::<Bytes>(&mkeys).await.expect("twincache mget");
                }
            }
        }
    }
}

impl Side for redis::aio::MultiplexedConnection {
    fn call(
        &self,
        work: Work,
        rng: &mut Rng,
        keys: u64,
        value: &Bytes,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut con = self.clone();
        let key = rng.key(keys);
        let mkeys: Vec<String> = match work {
            Work::Mget => (0..MGET_KEYS).map(|_| rng.key(keys)).collect(),
            _ => Vec::new(),
        };
        let value = value.clone();
        async move {
            match work {
                Work::Get => {
                    let _: Option<Vec<u8>> = con.get(&key).await.expect("redis get");
                }
                Work::Set => {
                    let _: () = con.set(&key, &value[..]).await.expect("redis set");
                }
                Work::Mget => {
                    let _: Vec<Option<Vec<u8>>> = con.mget(&mkeys).await.expect("redis mget");
                }
            }
        }
    }
}

/// Runs `load` on `side` from `tasks` tasks, `requests` units in all; units per second.
async fn run<S: Side>(side: &S, load: Load, a: &Args, value: &Bytes) -> f64 {
    let per_task = a.requests.div_ceil(a.tasks);
    let started = Instant::now();
    let tasks: Vec<_> = (0..a.tasks)
        .map(|t| {
            let (side, value, keys) = (side.clone(), value.clone(), a.keys);
            tokio::spawn(async move {
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (t as u64 + 1) << 17);
                let mut inflight = FuturesUnordered::new();
                let mut sent = 0;
                while sent < per_task || !inflight.is_empty() {
                    while sent < per_task && inflight.len() < load.in_flight {
                        inflight.push(side.call(load.work, &mut rng, keys, &value));
                        sent += 1;
                    }
                    inflight.next().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (per_task * a.tasks) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let a = Arc::new(args());
    let value = Bytes::from(vec![b'v'; a.value_size]);
    let twin = Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(&a.addr)
        .await
        .expect("connect twincache-client");
    let redis = redis::Client::open(format!("redis://{}/", a.addr))
        .expect("redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect redis-rs");
    // Every key the reads may ask for exists.
    let started = Instant::now();
    for chunk in (0..a.keys).collect::<Vec<_>>().chunks(1000) {
        twin.mset(
            chunk
                .iter()
                .map(|i| (format!("bench:{i:09}"), value.clone())),
        )
        .await
        .expect("load");
    }
    eprintln!("loaded {} keys in {:.1?}", a.keys, started.elapsed());

    println!("| workload | in flight per task | twincache-client ops/s | redis-rs ops/s | ratio |");
    println!("|---|---|---|---|---|");
    for load in LOADS {
        if a.only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == load.name))
        {
            continue;
        }
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..a.rounds {
            // Alternate who goes first, so a drifting machine favours neither.
            if round % 2 == 0 {
                ours.push(run(&twin, load, &a, &value).await);
                theirs.push(run(&redis, load, &a, &value).await);
            } else {
                theirs.push(run(&redis, load, &a, &value).await);
                ours.push(run(&twin, load, &a, &value).await);
            }
            eprintln!(
                "{} round {}: twincache {:.0}, redis-rs {:.0}",
                load.name,
                round + 1,
                ours.last().unwrap(),
                theirs.last().unwrap()
            );
        }
        let what = match load.work {
            Work::Get => "GET",
            Work::Set => "SET",
            Work::Mget => "MGET of 100 keys",
        };
        let (o, t) = (median(ours), median(theirs));
        println!(
            "| {what} | {} | {o:.0} | {t:.0} | {:.2} |",
            load.in_flight,
            o / t
        );
    }
}
