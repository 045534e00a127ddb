//! Load generator: drives N connections, each with P requests in flight, through the client
//! library against an orchestrator, and prints throughput and latency percentiles.
//!
//! twincache-bench --addr 127.0.0.1:7000 --connections 50 --pipeline 16 --op get --value-size 100

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::stream::{FuturesUnordered, StreamExt};
use twincache_client::Client;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    Get,
    Set,
    /// 90% get, 10% set.
    Mixed,
}

/// twincache load generator (binary protocol, via the client library).
#[derive(Debug, Parser)]
#[command(name = "twincache-bench", version, about)]
struct Args {
    /// Orchestrator (or worker) address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    addr: String,
    /// Client connections, each its own TCP connection.
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, short = 'P', default_value_t = 1)]
    pipeline: usize,
    #[arg(long, value_enum, default_value = "get")]
    op: Workload,
    /// Bytes per value.
    #[arg(long, short = 'd', default_value_t = 100)]
    value_size: usize,
    /// Total requests (after the keys are loaded).
    #[arg(long, short = 'n', default_value_t = 200_000)]
    requests: usize,
    /// Distinct keys; loaded before a get or mixed run.
    #[arg(long, short = 'r', default_value_t = 100_000)]
    keys: usize,
    /// Values of pseudo-random bytes, a different one per key and write, which neither lz4
    /// nor the workers' dictionary can shrink (the default, one byte repeated, stores in a
    /// few bytes).
    #[arg(long)]
    incompressible: bool,
    /// Skip loading the keys (they are there from an earlier run).
    #[arg(long)]
    no_load: bool,
    /// Write every request as `<unix ms when answered> <latency us> <1 ok | 0 failed>`, one
    /// a line, to compare latency in a window (e.g. during a slot move) with before.
    #[arg(long, value_name = "PATH")]
    latency_log: Option<std::path::PathBuf>,
    /// Stop sending after this many seconds, even if fewer than --requests were sent (as
    /// on SIGINT: the requests in flight are answered and the results printed).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn key(i: u64) -> String {
    format!("key:{i:012}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.connections > 0 && args.pipeline > 0 && args.keys > 0,
        "counts must be positive"
    );
    // With --incompressible, values are windows of a random pool at a random offset.
    let value = if args.incompressible {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        Bytes::from(
            (0..args.value_size + (4 << 20))
                .map(|_| rng.next() as u8)
                .collect::<Vec<u8>>(),
        )
    } else {
        Bytes::from(vec![b'x'; args.value_size])
    };
    let size = args.value_size;
    let pick = move |value: &Bytes, r: u64| -> Bytes {
        let at = (r % (value.len() - size + 1) as u64) as usize;
        value.slice(at..at + size)
    };
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(Client::connect(&args.addr).await?);
    }
    if args.op != Workload::Set && !args.no_load {
        let started = Instant::now();
        let mut loads = FuturesUnordered::new();
        for i in 0..args.keys as u64 {
            let c = &clients[i as usize % clients.len()];
            loads.push(c.set(key(i), pick(&value, i.wrapping_mul(0x9e37_79b9_7f4a_7c15))));
            if loads.len() >= 256 {
                loads.next().await.transpose()?;
            }
        }
        while let Some(r) = loads.next().await {
            r?;
        }
        eprintln!("loaded {} keys in {:.1?}", args.keys, started.elapsed());
    }

    let per_conn = args.requests.div_ceil(args.connections);
    let started = Instant::now();
    let until = args.duration.map(|s| started + Duration::from_secs_f64(s));
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, client)| {
            let value = value.clone();
            let (op, pipeline, keys) = (args.op, args.pipeline, args.keys as u64);
            let logging = args.latency_log.is_some();
            let interrupted = interrupted.clone();
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
                let mut latencies = Vec::with_capacity(per_conn);
                let mut log = Vec::new();
                let mut errors = std::collections::HashMap::<String, usize>::new();
                let mut misses = 0usize;
                let mut inflight = FuturesUnordered::new();
                let mut sent = 0;
                while sent < per_conn || !inflight.is_empty() {
                    if until.is_some_and(|u| Instant::now() >= u)
                        || interrupted.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        sent = per_conn;
                    }
                    while sent < per_conn && inflight.len() < pipeline {
                        let r = rng.next();
                        let k = key(r % keys);
                        let write =
                            op == Workload::Set || (op == Workload::Mixed && r.is_multiple_of(10));
                        let (client, value) = (client.clone(), pick(&value, r >> 7));
                        inflight.push(async move {
                            let t = Instant::now();
                            // Ok(false): a get found nothing.
                            let result = if write {
                                client
                                    .set(k, value)
                                    .await
                                    .map(|()| true)
                                    .map_err(|e| format!("set: {e}"))
                            } else {
                                client
                                    .get::<Bytes>(k)
                                    .await
                                    .map(|v| v.is_some())
                                    .map_err(|e| format!("get: {e}"))
                            };
                            (t.elapsed(), result)
                        });
                        sent += 1;
                    }
                    if let Some((lat, result)) = inflight.next().await {
                        let us = lat.as_micros().min(u128::from(u32::MAX)) as u32;
                        latencies.push(us);
                        let ok = result.is_ok();
                        match result {
                            Ok(found) => misses += usize::from(!found),
                            Err(e) => *errors.entry(e).or_default() += 1,
                        }
                        if logging {
                            log.push((unix_ms(), us, ok));
                        }
                    }
                }
                (latencies, errors, misses, log)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(args.requests);
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    let (mut log, mut misses) = (Vec::new(), 0);
    for t in tasks {
        let (lat, err, missed, l) = t.await?;
        all.extend(lat);
        misses += missed;
        for (e, n) in err {
            *by_kind.entry(e).or_default() += n;
        }
        log.extend(l);
    }
    let errors: usize = by_kind.values().sum();
    if let Some(path) = &args.latency_log {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (at, us, ok) in log {
            writeln!(out, "{at} {us} {}", u8::from(ok))?;
        }
        out.flush()?;
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let pct = |p: f64| Duration::from_micros(u64::from(all[((all.len() - 1) as f64 * p) as usize]));
    println!(
        "op={:?} connections={} pipeline={} value={}B requests={} errors={}",
        args.op,
        args.connections,
        args.pipeline,
        args.value_size,
        all.len(),
        errors
    );
    println!(
        "throughput: {:.0} ops/s",
        all.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency: p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(0.999).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    for (e, n) in &by_kind {
        println!("errors: {n} x {e}");
    }
    // Not an error in itself (the keys may never have been written, e.g. with --no-load);
    // after a load, with no deletes, each is a key the cluster did not find.
    println!("gets that found nothing: {misses}");
    anyhow::ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}
