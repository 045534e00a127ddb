//! Differential tests: the same generated command sequences go to a real redis-server and to
//! the orchestrator, and the raw reply bytes must be the same, RESP2 and RESP3.
//!
//! Generated from fixed seeds (so a failure can be replayed) over a few keys that collide
//! often, with edge cases in every argument: empty strings, negative ranges, offsets past
//! any limit, integers at and past i64's bounds, non-numbers, floats Redis formats with long
//! double precision, wrong types, missing keys, keys that expire during the sequence, wrong
//! argument counts, and transactions (with queueing errors and runtime errors).
//!
//! Compared loosely, because they must differ: the TTL readings of relative expiries (the two
//! servers set them a fraction of a millisecond apart: equal within a second), KEYS (order
//! is unspecified: sorted), and HELLO's reply (server id and version). Left out, because
//! twincache answers them differently on purpose (README, "Differences from Redis"): TIME,
//! RANDOMKEY and random HRANDFIELD draws, SCAN cursors, OBJECT ENCODING, DBSIZE, INFO,
//! CONFIG, and SETRANGE/APPEND growing a value to between 8 MiB and 512 MiB.

use std::time::Duration;

use bytes::Bytes;

use crate::harness::{Cluster, RedisServer, RespConn};

/// A small deterministic generator (xorshift64*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const KEYS: &[&str] = &["k1", "k2", "{t}a", "{t}b", "h1", "{t}h", "n", "missing"];
const HASHES: &[&str] = &["h1", "{t}h", "k1", "missing"];
const VALUES: &[&str] = &[
    "",
    "0",
    "1",
    "-1",
    "10",
    "abc",
    "10.5",
    "1e3",
    "5.0e3",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    " 1",
    "01",
    "+1",
    "-0",
    "inf",
    "nan",
    "0x10",
    "1.5e308",
    "hello world",
    "a string of some length, long enough to be compressed if it were a little longer.....",
];
const INTS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "5",
    "-5",
    "100",
    "9223372036854775807",
    "-9223372036854775808",
    "x",
    "1.5",
    "",
    "007",
    "+3",
];
const FLOATS: &[&str] = &[
    "0.1", "1.5", "-2.5", "10.5", "1e3", "2.0e2", "-0.1", "1e-5", "inf", "nan", "x", "", "3",
    "1e4932", "-1e4932", "0.3", "7",
];
/// A value for a hash field: one of the short [`VALUES`]. Redis keeps a hash of values up to
/// 64 bytes in insertion order, as twincache always does; past that its order is its
/// table's, so no value here (nor a float incremented, see [`HASH_FLOATS`]) grows past it.
fn hash_value(rng: &mut Rng) -> String {
    loop {
        let v = rng.pick(VALUES);
        if v.len() <= 20 && !v.ends_with("e308") {
            return v.to_string();
        }
    }
}

/// Increments that keep a hash's values within 64 bytes (see [`hash_value`]).
const HASH_FLOATS: &[&str] = &[
    "0.1", "1.5", "-2.5", "10.5", "1e3", "-0.1", "1e-5", "inf", "x", "", "3", "0.3",
];
/// Expiry arguments that never fire during a run (none between 1 and 1000 seconds, or
/// milliseconds: a reply sent a moment before and after would differ).
const EXPIRES: &[&str] = &[
    "0",
    "-1",
    "5000",
    "100000",
    "9223372036854775807",
    "-9223372036854775808",
    "x",
    "",
];
const OFFSETS: &[&str] = &[
    "0",
    "1",
    "5",
    "100",
    "-1",
    "536870912",
    "4611686018427387904",
    "x",
];
const FIELDS: &[&str] = &["f1", "f2", "f3", ""];
/// Patterns for KEYS, SCAN and HSCAN MATCH; the last four are Redis' own reading of edge
/// cases (a class the pattern ends inside is closed there; a range may end in `]`).
const PATTERNS: &[&str] = &[
    "*", "f*", "f?", "[a-f]*", "\\*", "nomatch", "[kn", "[j-]*", "k[2", "*[",
];

/// One generated command, and whether the sequence should pause after it (a key was given
/// a millisecond to live).
fn command(rng: &mut Rng) -> (Vec<String>, bool) {
    let k = |rng: &mut Rng| rng.pick(KEYS).to_string();
    let v = |rng: &mut Rng| rng.pick(VALUES).to_string();
    let i = |rng: &mut Rng| rng.pick(INTS).to_string();
    let h = |rng: &mut Rng| rng.pick(HASHES).to_string();
    let f = |rng: &mut Rng| rng.pick(FIELDS).to_string();
    let s = |x: &str| x.to_string();
    let mut pause = false;
    let mut cmd = match rng.below(58) {
        0 => vec![s("get"), k(rng)],
        1..=3 => {
            let mut c = vec![s("set"), k(rng), v(rng)];
            for _ in 0..rng.below(3) {
                match rng.below(9) {
                    0 => c.push(s("NX")),
                    1 => c.push(s("xx")),
                    2 => c.push(s("GET")),
                    3 => c.push(s("KEEPTTL")),
                    4 => c.extend([s("EX"), rng.pick(EXPIRES).to_string()]),
                    5 => {
                        c.extend([s("px"), s("1")]);
                        pause = true;
                    }
                    6 => c.extend([s("EXAT"), s("4102444800")]),
                    7 => c.extend([s("PXAT"), s("1000")]),
                    _ => c.push(s("PERSIST")),
                }
            }
            c
        }
        4 => vec![s("setnx"), k(rng), v(rng)],
        5 => vec![s("setex"), k(rng), rng.pick(EXPIRES).to_string(), v(rng)],
        6 => vec![s("psetex"), k(rng), rng.pick(EXPIRES).to_string(), v(rng)],
        7 => vec![s("getset"), k(rng), v(rng)],
        8 => vec![s("getdel"), k(rng)],
        9 => {
            let mut c = vec![s("getex"), k(rng)];
            match rng.below(6) {
                0 => c.extend([s("EX"), rng.pick(EXPIRES).to_string()]),
                1 => c.push(s("PERSIST")),
                2 => c.extend([s("PXAT"), s("4102444800000")]),
                3 => c.extend([s("EXAT"), s("1")]),
                4 => c.push(s("NX")),
                _ => {}
            }
            c
        }
        10 => vec![s("mget"), k(rng), k(rng), k(rng)],
        11 => vec![s("mset"), k(rng), v(rng), k(rng), v(rng)],
        12 => vec![s("msetnx"), k(rng), v(rng), k(rng), v(rng)],
        13 => vec![s("append"), k(rng), v(rng)],
        14 => vec![s("strlen"), k(rng)],
        15 => vec![s(rng.pick(&["getrange", "substr"])), k(rng), i(rng), i(rng)],
        16 => vec![s("setrange"), k(rng), rng.pick(OFFSETS).to_string(), v(rng)],
        17 => vec![s("incr"), k(rng)],
        18 => vec![s("decr"), k(rng)],
        19 => vec![s("incrby"), k(rng), i(rng)],
        20 => vec![s("decrby"), k(rng), i(rng)],
        21 | 22 => vec![s("incrbyfloat"), k(rng), rng.pick(FLOATS).to_string()],
        23 | 24 => {
            let name = rng.pick(&["expire", "pexpire"]);
            let mut c = vec![s(name), k(rng), rng.pick(EXPIRES).to_string()];
            for _ in 0..rng.below(3) {
                c.push(s(rng.pick(&["NX", "xx", "GT", "lt", "foo"])));
            }
            c
        }
        25 => {
            let name = rng.pick(&["expireat", "pexpireat"]);
            let when = rng.pick(&["1", "4102444800", "4102444800000", "0", "x", "-5"]);
            let mut c = vec![s(name), k(rng), s(when)];
            if rng.chance(40) {
                c.push(s(rng.pick(&["NX", "XX", "GT", "LT"])));
            }
            c
        }
        26 => vec![
            s(rng.pick(&["ttl", "pttl", "expiretime", "pexpiretime"])),
            k(rng),
        ],
        27 => vec![s("persist"), k(rng)],
        28 => {
            // Up to six keys, so that a pair often holds several (EXISTS and TOUCH read
            // those with one program), sometimes one given twice (counted twice).
            let mut c = vec![s(rng.pick(&["del", "unlink", "exists", "touch"])), k(rng)];
            for _ in 0..rng.below(6) {
                c.push(k(rng));
            }
            c
        }
        29 => vec![s("type"), k(rng)],
        30 => vec![s(rng.pick(&["rename", "renamenx"])), k(rng), k(rng)],
        31 => {
            let mut c = vec![s("copy"), k(rng), k(rng)];
            if rng.chance(50) {
                c.push(s("REPLACE"));
            }
            c
        }
        32..=34 => {
            let mut c = vec![s(rng.pick(&["hset", "hmset"])), h(rng)];
            for _ in 0..1 + rng.below(2) {
                c.extend([f(rng), hash_value(rng)]);
            }
            c
        }
        35 => vec![s("hsetnx"), h(rng), f(rng), hash_value(rng)],
        36 => vec![s("hget"), h(rng), f(rng)],
        37 => vec![s("hmget"), h(rng), f(rng), f(rng)],
        38 => vec![s("hgetall"), h(rng)],
        39 => vec![s("hdel"), h(rng), f(rng), f(rng)],
        40 => vec![s(rng.pick(&["hexists", "hstrlen"])), h(rng), f(rng)],
        41 => vec![s(rng.pick(&["hlen", "hkeys", "hvals"])), h(rng)],
        42 => vec![s("hincrby"), h(rng), f(rng), i(rng)],
        43 => vec![
            s("hincrbyfloat"),
            h(rng),
            f(rng),
            rng.pick(HASH_FLOATS).to_string(),
        ],
        44 => {
            let mut c = vec![s("hscan"), h(rng), s(rng.pick(&["0", "x", "5"]))];
            if rng.chance(50) {
                c.extend([s("MATCH"), s(rng.pick(PATTERNS))]);
            }
            if rng.chance(30) {
                c.extend([s("COUNT"), s(rng.pick(&["1", "0", "x", "100"]))]);
            }
            c
        }
        45 => match rng.below(5) {
            0 => vec![s("hrandfield"), s("never-written")],
            1 => vec![s("hrandfield"), h(rng), s("0")],
            2 => vec![s("hrandfield"), h(rng), s("1000"), s("WITHVALUES")],
            3 => vec![s("hrandfield"), h(rng), s("x")],
            _ => vec![s("hrandfield"), h(rng), s("1"), s("nope")],
        },
        46 => vec![
            s("keys"),
            s(rng.pick(&["*", "k*", "{t}*", "h?", "nomatch"])),
        ],
        47 => vec![s("type"), h(rng)],
        48 => vec![s("exists"), k(rng)],
        49 => {
            // A wrong number of arguments.
            let name = rng.pick(&["get", "set", "incr", "hset", "expire", "getrange", "hget"]);
            vec![s(name)]
        }
        50 => vec![s("echo"), v(rng)],
        51 => vec![s("ping")],
        52 => vec![s("nosuchcommand"), k(rng)],
        53 => vec![s("pexpire"), k(rng), s("1")],
        54 => vec![s("select"), s(rng.pick(&["0", "16", "x"]))],
        // WATCHed keys are `{t}w*`, which nothing deletes while they may be missing: a DEL
        // of a missing key aborts a watching EXEC here and not in Redis (README).
        55 => vec![s("watch"), s(rng.pick(&["{t}w", "{t}w2"]))],
        56 => match rng.below(7) {
            0 => vec![s("unwatch")],
            1 => vec![s("set"), s("{t}w"), v(rng)],
            2 => vec![s("incr"), s("{t}w2")],
            3 => vec![s("expire"), s("{t}w"), s("5000")],
            4 => vec![s("set"), s("{t}w2"), s("x"), s("px"), s("1")],
            5 => vec![s("persist"), s("{t}w")],
            _ => vec![s("get"), s("{t}w")],
        },
        _ => vec![s("strlen"), h(rng)],
    };
    if cmd.last().map(String::as_str) == Some("1") && cmd.iter().any(|a| a == "px") {
        pause = true;
    }
    if cmd[0] == "pexpire" && cmd.get(2).map(String::as_str) == Some("1") {
        pause = true;
    }
    if cmd.is_empty() {
        cmd.push(s("ping"));
    }
    (cmd, pause)
}

/// A transaction on the `{t}` keys (one pair), sometimes with a queueing error or a key of
/// another pair, ending in EXEC or DISCARD.
fn transaction(rng: &mut Rng) -> Vec<Vec<String>> {
    let s = |x: &str| x.to_string();
    let mut cmds = vec![vec![s("multi")]];
    for _ in 0..1 + rng.below(4) {
        let key = s(rng.pick(&["{t}a", "{t}b", "{t}h", "{t}w"]));
        cmds.push(match rng.below(9) {
            0 => vec![s("incr"), key],
            1 => vec![s("set"), key, s(rng.pick(VALUES))],
            2 => vec![s("get"), key],
            3 => vec![s("hset"), key, s("f1"), hash_value(rng)],
            4 => vec![s("hgetall"), key],
            5 => vec![s("del"), key, s("{t}b")],
            6 => vec![s("mget"), key, s("{t}b")],
            7 => vec![s("incrbyfloat"), key, s(rng.pick(FLOATS))],
            _ => vec![s("append"), key, s("x")],
        });
    }
    if rng.chance(15) {
        cmds.push(vec![s("get")]); // wrong arity: EXECABORT
    }
    cmds.push(vec![s(if rng.chance(85) { "exec" } else { "discard" })]);
    cmds
}

/// Whether two replies to `cmd` are the same (see the module docs): byte for byte, but TTL
/// readings within a second and KEYS in any order.
fn same(cmd: &[String], want: &Bytes, got: &Bytes) -> bool {
    if want == got {
        return true;
    }
    let name = cmd[0].to_ascii_lowercase();
    let int = |b: &Bytes| {
        String::from_utf8_lossy(b)
            .strip_prefix(':')
            .and_then(|t| t.trim().parse::<i64>().ok())
    };
    if matches!(name.as_str(), "ttl" | "pttl" | "expiretime" | "pexpiretime") {
        let tolerance = if name.starts_with('p') { 1000 } else { 1 };
        if let (Some(a), Some(b)) = (int(want), int(got)) {
            return a >= 0 && b >= 0 && (a - b).abs() <= tolerance;
        }
    }
    if name == "keys" {
        let sorted = |b: &Bytes| {
            let text = String::from_utf8_lossy(b).into_owned();
            let mut lines: Vec<String> = text.split("\r\n").map(str::to_string).collect();
            lines.sort();
            lines
        };
        return sorted(want) == sorted(got);
    }
    false
}

/// A run of plain SETs (and SETEX) on the keys, which a pipelining client's session sends
/// to each pair in one batch (see `commands::batch`).
fn plain_sets(rng: &mut Rng) -> Vec<Vec<String>> {
    (0..2 + rng.below(12))
        .map(|_| {
            let (key, value) = (rng.pick(KEYS).to_string(), rng.pick(VALUES).to_string());
            if rng.chance(10) {
                vec!["setex".into(), key, "100".into(), value]
            } else {
                vec!["set".into(), key, value]
            }
        })
        .collect()
}

/// The two connections of a run and what was sent on them, for the failure's message.
struct Run {
    seed: u64,
    resp3: bool,
    theirs: RespConn,
    ours: RespConn,
    history: Vec<String>,
    /// Commands sent but not yet compared, and whether to pause after the last.
    pending: Vec<Vec<String>>,
    pause: bool,
}

impl Run {
    /// A run of seed 0 in RESP2 on fresh connections to `redis` and `cluster`.
    async fn start(redis: &RedisServer, cluster: &Cluster) -> Run {
        let redis_addr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
        Run {
            seed: 0,
            resp3: false,
            theirs: RespConn::connect(redis_addr).await,
            ours: RespConn::connect(cluster.orch.addr).await,
            history: Vec::new(),
            pending: Vec::new(),
            pause: false,
        }
    }

    /// Sends the pending commands to both servers in one write each, then compares the
    /// replies one by one.
    async fn exchange(&mut self) {
        let mut out = bytes::BytesMut::new();
        for cmd in &self.pending {
            let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
            crate::harness::encode(&args, &mut out);
        }
        if std::env::var("DIFF_SHOW").is_ok() {
            eprintln!("-- {} commands in one write", self.pending.len());
            eprintln!("CHUNK {:?}", self.pending);
        }
        self.theirs.send_raw(&out).await;
        self.ours.send_raw(&out).await;
        for cmd in std::mem::take(&mut self.pending) {
            let want = self.theirs.reply().await;
            let got = self.ours.reply().await;
            self.history.push(cmd.join(" "));
            if std::env::var("DIFF_SHOW").is_ok() {
                eprintln!("{} => {:?}", cmd.join(" "), String::from_utf8_lossy(&want));
            }
            if !same(&cmd, &want, &got) {
                let tail: Vec<&String> = self.history.iter().rev().take(25).rev().collect();
                panic!(
                    "seed {} (resp3 {}), command {}: {:?}\n redis: {:?}\n ours:  {:?}\n last commands:\n  {}",
                    self.seed,
                    self.resp3,
                    self.history.len(),
                    cmd.join(" "),
                    String::from_utf8_lossy(&want),
                    String::from_utf8_lossy(&got),
                    tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
                );
            }
        }
        if std::mem::take(&mut self.pause) {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
}

/// Runs `seed`'s sequence of `n` commands on both servers and compares every reply: one
/// command at a time, or `pipelined` in writes of up to 32 (with runs of plain SETs).
async fn run(
    seed: u64,
    n: usize,
    resp3: bool,
    pipelined: bool,
    redis: &RedisServer,
    cluster: &Cluster,
) {
    let redis_addr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let mut theirs = RespConn::connect(redis_addr).await;
    let mut ours = RespConn::connect(cluster.orch.addr).await;
    for c in [&mut theirs, &mut ours] {
        c.call(&[b"flushall"]).await;
        if resp3 {
            c.call(&[b"hello", b"3"]).await;
        }
    }
    let mut run = Run {
        seed,
        resp3,
        theirs,
        ours,
        history: Vec::new(),
        pending: Vec::new(),
        pause: false,
    };
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut sent = 0;
    while sent < n {
        let batch = if rng.chance(8) {
            transaction(&mut rng)
                .into_iter()
                .map(|c| (c, false))
                .collect()
        } else if pipelined && rng.chance(25) {
            plain_sets(&mut rng)
                .into_iter()
                .map(|c| (c, false))
                .collect()
        } else {
            vec![command(&mut rng)]
        };
        for (cmd, pause) in batch {
            sent += 1;
            run.pending.push(cmd);
            run.pause = pause;
            if !pipelined || pause || run.pending.len() >= 32 {
                run.exchange().await;
            }
        }
    }
    run.exchange().await;
}

/// Runs `n` seeds from `first` (`DIFF_SEEDS` overrides `n`) against a redis-server and a
/// cluster of two pairs; `resp3(seed)` says which speak RESP3.
async fn seeds(first: u64, n: u64, commands: usize, resp3: fn(u64) -> bool, pipelined: bool) {
    let redis = RedisServer::start();
    let cluster = Cluster::start(2).await;
    let n: u64 = std::env::var("DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(n);
    for seed in first..first + n {
        run(seed, commands, resp3(seed), pipelined, &redis, &cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_sequences_answer_byte_for_byte_like_redis() {
    seeds(1, 4, 600, |_| false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_sequences_answer_byte_for_byte_like_redis_in_resp3() {
    seeds(101, 3, 600, |_| true, false).await;
}

/// Pipelined, as a client that writes many commands at once: runs of plain SETs reach each
/// pair in one batch, and everything after them must still see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sequences_answer_byte_for_byte_like_redis() {
    seeds(201, 4, 800, |seed| seed % 2 == 0, true).await;
}

/// Pipelines whose later commands depend on earlier ones that take more than one step on
/// the workers (FLUSHALL, KEYS, a RENAME, COPY or MSETNX across pairs, a program's copy
/// to the partner), each sent in one write to both servers, many times over: every reply
/// must be Redis'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_see_the_ones_before_them() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(2).await;
    let mut run = Run::start(&redis, &cluster).await;
    let words = |line: &str| -> Vec<String> { line.split(' ').map(str::to_string).collect() };
    let pipelines: &[&[&str]] = &[
        &["set a 1", "flushall", "set b 2", "get b", "dbsize"],
        &["set k2 v", "keys k*", "set k1 w", "keys k*"],
        &[
            "set k2 v",
            "set missing x",
            "rename k2 missing",
            "get missing",
            "unlink k2 k1",
        ],
        &[
            "set {t}b v",
            "set missing x",
            "rename {t}b missing",
            "get missing",
            "del {t}b",
        ],
        &["set k1 v", "copy k1 n", "get n", "exists n"],
        &["set k2 1", "msetnx {t}h 1 k2 2", "type {t}h", "get k2"],
        &["incr n", "incr n", "get n", "mget n k1 k2"],
        &["set h1 x", "expire h1 0", "keys h*", "exists h1"],
        &["set k1 a", "mset k1 b k2 c k1 d", "set k2 e", "mget k1 k2"],
        &[
            "set k1 a",
            "hset h1 f v",
            "exists k1 h1 k1 k2 n h1",
            "del k1",
            "touch k1 h1 h1 n",
        ],
    ];
    for round in 0..20 {
        for pipeline in pipelines {
            run.pending = pipeline.iter().map(|l| words(l)).collect();
            run.exchange().await;
        }
        run.seed = round;
    }
    // An MSET of 2,500 keys goes in windows of 1,024, in batches per pair; each key given
    // again in a later window keeps its last value, and what follows it sees all of it.
    let mut mset = vec!["mset".to_string()];
    for i in 0..2_500 {
        mset.extend([format!("m{}", i % 2_000), format!("v{i}")]);
    }
    // EXISTS and TOUCH of many keys: by program per pair, in windows, each key given twice
    // counted twice, after the writes before them in the pipeline.
    let many = |name: &str| -> Vec<String> {
        let mut c = vec![name.to_string()];
        c.extend((0..2_600).map(|i| format!("m{}", (i * 7) % 2_100)));
        c
    };
    run.pending = vec![
        words("set m5 before"),
        mset,
        words("set m7 after"),
        words("mget m0 m5 m7 m499 m500 m1999 m2000"),
        words("del m3 m4"),
        many("exists"),
        words("set m3 back"),
        many("touch"),
    ];
    run.exchange().await;
}

/// Strings APPEND and SETRANGE grow past the size a worker keeps in segments (32 KiB, in
/// segments of 8 KiB): every read and write at and around the segments' boundaries, a gap
/// of zeros past the end, in one pipeline and one by one, answers as Redis does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_strings_built_by_append_and_setrange_answer_like_redis() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(1).await;
    let mut run = Run::start(&redis, &cluster).await;
    let s = |x: &str| x.to_string();
    let mut rng = Rng(7);
    let chunk = |rng: &mut Rng, n: usize| -> String {
        (0..n)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect()
    };
    let mut commands = Vec::new();
    for i in 0..60 {
        let n = [1, 100, 1000, 3000, 8192, 9000][i % 6];
        commands.push(vec![s("append"), s("log"), chunk(&mut rng, n)]);
        commands.push(vec![s("strlen"), s("log")]);
    }
    let at = |n: usize| n.to_string();
    for (offset, n) in [
        (0, 5),
        (8190, 4),
        (8192, 1),
        (16383, 2),
        (40_000, 9000),
        (200_000, 3),
    ] {
        commands.push(vec![
            s("setrange"),
            s("log"),
            at(offset),
            chunk(&mut rng, n),
        ]);
    }
    for (start, end) in [
        ("0", "-1"),
        ("8191", "8192"),
        ("8192", "16384"),
        ("-9000", "-1"),
        ("100000", "100"),
        ("199990", "300000"),
        ("-1", "-1"),
        ("5", "4"),
    ] {
        commands.push(vec![s("getrange"), s("log"), s(start), s(end)]);
    }
    commands.push(vec![s("setrange"), s("gap"), s("70000"), s("end")]);
    commands.push(vec![s("append"), s("gap"), chunk(&mut rng, 10)]);
    commands.push(vec![s("getrange"), s("gap"), s("69990"), s("70100")]);
    commands.push(vec![s("get"), s("gap")]);
    commands.push(vec![s("get"), s("log")]);
    commands.push(vec![s("getdel"), s("log")]);
    commands.push(vec![s("exists"), s("log")]);
    for c in [&mut run.theirs, &mut run.ours] {
        c.call(&[b"flushall"]).await;
    }
    // One by one, then again in one pipeline.
    for cmd in &commands {
        run.pending.push(cmd.clone());
        run.exchange().await;
    }
    let encoding = run.ours.call(&[b"object", b"encoding", b"gap"]).await;
    assert_eq!(&encoding[..], b"$8\r\nsegments\r\n");
    for c in [&mut run.theirs, &mut run.ours] {
        c.call(&[b"flushall"]).await;
    }
    run.seed = 1;
    run.pending = commands;
    run.exchange().await;
}
