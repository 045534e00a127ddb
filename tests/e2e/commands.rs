//! The command families through real clients: redis-cli (RESP2 and `-3`), the `redis` crate
//! (RESP2 and its RESP3 mode), redis-py 8 with its defaults (RESP3, transactions in
//! pipelines), redis-benchmark (which must find the CONFIG it asks for), the binary
//! protocol's `command` op with a raw frame, and the text protocol's counters and expiry.

use std::collections::HashMap;
use std::process::Command;

use bytes::{BufMut, Bytes, BytesMut};
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twincache_protocol::frame::{encode_frame, flags, FrameCodec, Op, Request, PREAMBLE};
use twincache_protocol::slots::SlotMap;

use crate::harness::{Cluster, TextConn};
use crate::resp::cli;

/// Two keys of the same hash tag are on one pair; `a` and `b` here are on different pairs.
fn keys_on_two_pairs() -> (String, String) {
    let a = (0..)
        .map(|i| format!("a{i}"))
        .find(|k| SlotMap::even(2).pair_of(k.as_bytes()) == 0)
        .unwrap();
    let b = (0..)
        .map(|i| format!("b{i}"))
        .find(|k| SlotMap::even(2).pair_of(k.as_bytes()) == 1)
        .unwrap();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_by_family() {
    let cluster = Cluster::start(2).await;
    let p = cluster.orch.addr.port();
    let (a, b) = keys_on_two_pairs();
    let cases: Vec<(Vec<&str>, String)> = vec![
        // Strings and counters.
        (vec!["SET", "n", "10"], "OK".into()),
        (vec!["INCR", "n"], "11".into()),
        (vec!["DECRBY", "n", "20"], "-9".into()),
        (vec!["INCRBYFLOAT", "n", "0.5"], "-8.5".into()),
        (
            vec!["INCR", "n"],
            "ERR value is not an integer or out of range".into(),
        ),
        (vec!["SETNX", "lock", "me"], "1".into()),
        (vec!["SETNX", "lock", "you"], "0".into()),
        (vec!["GETSET", "lock", "you"], "me".into()),
        (vec!["APPEND", "lock", "!"], "4".into()),
        (vec!["SETRANGE", "lock", "0", "Y"], "4".into()),
        (vec!["GETRANGE", "lock", "-2", "-1"], "u!".into()),
        (vec!["STRLEN", "lock"], "4".into()),
        (vec!["GETDEL", "lock"], "You!".into()),
        (vec!["MSETNX", &a, "1", &b, "2"], "1".into()),
        (vec!["MSETNX", &a, "1", "fresh", "2"], "0".into()),
        (vec!["EXISTS", "fresh"], "0".into()),
        // Expiry.
        (vec!["SETEX", "t", "100", "v"], "OK".into()),
        (vec!["TTL", "t"], "100".into()),
        (vec!["EXPIRE", "t", "50", "GT"], "0".into()),
        (vec!["EXPIRE", "t", "50", "LT"], "1".into()),
        (vec!["PERSIST", "t"], "1".into()),
        (vec!["TTL", "t"], "-1".into()),
        (vec!["EXPIREAT", "t", "4102444800"], "1".into()),
        (vec!["EXPIRETIME", "t"], "4102444800".into()),
        (vec!["GETEX", "t", "PERSIST"], "v".into()),
        (vec!["PTTL", "t"], "-1".into()),
        (vec!["TTL", "missing"], "-2".into()),
        // Hashes.
        (vec!["HSET", "h", "name", "ann", "age", "41"], "2".into()),
        (vec!["HINCRBY", "h", "age", "1"], "42".into()),
        (vec!["HGETALL", "h"], "name\nann\nage\n42".into()),
        (vec!["HMGET", "h", "nope", "name"], "\nann".into()),
        (vec!["HDEL", "h", "name"], "1".into()),
        (vec!["HLEN", "h"], "1".into()),
        (
            vec!["GET", "h"],
            "WRONGTYPE Operation against a key holding the wrong kind of value".into(),
        ),
        (vec!["TYPE", "h"], "hash".into()),
        (vec!["OBJECT", "ENCODING", "h"], "packed".into()),
        // Key space, across pairs.
        (vec!["RENAME", &a, "{x}moved"], "OK".into()),
        (vec!["COPY", "{x}moved", &a], "1".into()),
        (vec!["GET", &a], "1".into()),
        (vec!["RENAMENX", &b, &a], "0".into()),
        (vec!["DEL", &a, &b, "{x}moved"], "3".into()),
        (vec!["TIME"], String::new()),
        (vec!["WAIT", "1", "0"], "1".into()),
    ];
    for (args, want) in &cases {
        let got = cli(p, args);
        if args[0] == "TIME" {
            assert_eq!(got.lines().count(), 2, "{got}");
            continue;
        }
        assert_eq!(&got, want, "redis-cli {args:?}");
    }
    // RESP3: a map, printed as one.
    assert_eq!(
        cli(p, &["-3", "--no-raw", "HGETALL", "h"]),
        "1# \"age\" => \"42\""
    );
    assert_eq!(cli(p, &["-3", "--no-raw", "GET", "nope"]), "(nil)");
    let info = cli(p, &["-3", "INFO", "keyspace"]);
    assert!(info.contains("db0:keys="), "{info}");
    // Scan and keys over both pairs.
    for i in 0..50 {
        cli(p, &["SET", &format!("scan:{i}"), "v"]);
    }
    let mut scanned: Vec<String> = cli(p, &["--scan", "--pattern", "scan:*"])
        .lines()
        .map(str::to_string)
        .collect();
    scanned.sort();
    scanned.dedup();
    assert_eq!(scanned.len(), 50);
    assert_eq!(cli(p, &["KEYS", "scan:4?"]).lines().count(), 10);
    assert_eq!(cli(p, &["FLUSHALL", "ASYNC"]), "OK");
    assert_eq!(cli(p, &["DBSIZE"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_atomic_on_a_pair_and_refused_across_pairs() {
    let cluster = Cluster::start(2).await;
    let p = cluster.orch.addr.port();
    let (a, b) = keys_on_two_pairs();
    let run = |input: String| {
        let mut child = Command::new("redis-cli")
            .args(["-p", &p.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let out = run("MULTI\nINCR {u}a\nINCR {u}a\nSET {u}b x\nGET {u}b\nEXEC\n".into());
    assert_eq!(out, "OK\nQUEUED\nQUEUED\nQUEUED\nQUEUED\n1\n2\nOK\nx\n");
    let out = run(format!("MULTI\nSET {a} 1\nSET {b} 1\nEXEC\nEXISTS {a}\n"));
    assert_eq!(
        out,
        "OK\nQUEUED\nCROSSSLOT Keys in request don't hash to the same slot\n\n\
         EXECABORT Transaction discarded because of previous errors.\n\n0\n"
    );
    // WATCH: a write by another client in between aborts EXEC.
    let out = run("WATCH {u}a\nMULTI\nINCR {u}a\nEXEC\n".into());
    assert_eq!(out, "OK\nOK\nQUEUED\n3\n");
    let mut watcher = redis::Client::open(format!("redis://{}/", cluster.orch.addr))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("WATCH")
        .arg("{u}a")
        .query_async(&mut watcher)
        .await
        .unwrap();
    assert_eq!(cli(p, &["INCR", "{u}a"]), "4");
    let aborted: Option<Vec<i64>> = redis::pipe()
        .atomic()
        .incr("{u}a", 1)
        .query_async(&mut watcher)
        .await
        .unwrap();
    assert_eq!(
        aborted, None,
        "EXEC after a watched key changed answers nil"
    );
    assert_eq!(cli(p, &["GET", "{u}a"]), "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crate_by_family_in_resp2_and_resp3() {
    let cluster = Cluster::start(2).await;
    for protocol in ["", "?protocol=resp3"] {
        let url = format!("redis://{}/{protocol}", cluster.orch.addr);
        let mut con = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = con.del(&["c", "h", "e"]).await.unwrap();
        let n: i64 = con.incr("c", 5).await.unwrap();
        assert_eq!(n, 5);
        let f: f64 = con.incr("c", 0.5).await.unwrap();
        assert_eq!(f, 5.5);
        let _: () = con
            .hset_multiple("h", &[("a", "1"), ("b", "2")])
            .await
            .unwrap();
        let all: HashMap<String, String> = con.hgetall("h").await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["b"], "2");
        let n: i64 = con.hincr("h", "a", 10).await.unwrap();
        assert_eq!(n, 11);
        let missing: Option<String> = con.hget("h", "zz").await.unwrap();
        assert_eq!(missing, None);
        let _: () = con.set_ex("e", "v", 100).await.unwrap();
        let ttl: i64 = con.ttl("e").await.unwrap();
        assert!((99..=100).contains(&ttl), "{ttl}");
        let set: bool = con.expire("e", 10).await.unwrap();
        assert!(set);
        let typed: String = redis::cmd("TYPE")
            .arg("h")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(typed, "hash");
        let (a, b): (i64, i64) = redis::pipe()
            .atomic()
            .incr("{p}x", 1)
            .incr("{p}x", 1)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!((a, b), (1, 2), "MULTI/EXEC on one pair");
        let mut keys: Vec<String> = con.keys("*").await.unwrap();
        keys.sort();
        assert_eq!(keys, ["c", "e", "h", "{p}x"]);
        let mut iter = con.scan_match::<_, String>("*").await.unwrap();
        let mut scanned = Vec::new();
        while let Some(k) = iter.next_item().await {
            scanned.push(k.unwrap());
        }
        drop(iter);
        scanned.sort();
        scanned.dedup();
        assert_eq!(scanned, keys);
        let _: () = redis::cmd("FLUSHDB").query_async(&mut con).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_connects_with_its_defaults() {
    let cluster = Cluster::start(2).await;
    let script = r#"
import sys, redis
r = redis.Redis(port=int(sys.argv[1]), decode_responses=True)
assert r.ping()
hello = r.execute_command("HELLO")
assert hello["proto"] == 3, hello
r.set("k", "v", ex=100)
assert r.get("k") == "v"
assert r.get("nope") is None
assert r.incr("n") == 1 and r.incrby("n", 9) == 10
assert r.incrbyfloat("f", 1.5) == 1.5
r.hset("h", mapping={"a": "1", "b": "2"})
assert r.hgetall("h") == {"a": "1", "b": "2"}, r.hgetall("h")
assert r.hincrby("h", "a", 5) == 6
assert 99 <= r.ttl("k") <= 100
assert r.expire("k", 50) and r.persist("k")
assert r.type("h") == "hash"
p = r.pipeline()  # MULTI/EXEC by default
p.incr("{t}x").incr("{t}x").get("{t}x")
assert p.execute() == [1, 2, "2"]
assert sorted(r.scan_iter("*")) == sorted(["k", "n", "f", "h", "{t}x"])
r.flushall()
assert r.dbsize() == 0
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script, &cluster.orch.addr.port().to_string()])
        .output()
        .expect("python3 is installed");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "redis-py (pip install 'redis>=8'; .ci/run does it): {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_finds_the_config_it_asks_for() {
    let cluster = Cluster::start(1).await;
    let out = Command::new("redis-benchmark")
        .args(["-p", &cluster.orch.addr.port().to_string()])
        .args(["-t", "incr,hset", "-n", "2000", "-c", "10", "-q"])
        .output()
        .expect("redis-benchmark is installed");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stdout.contains("Could not fetch") && !stderr.contains("Could not fetch"),
        "{stdout}{stderr}"
    );
    assert!(
        stdout.contains("INCR") && stdout.contains("HSET"),
        "{stdout}{stderr}"
    );
}

/// Sends one `command` frame with `args` RESP-encoded; the payload of the answer.
pub(crate) async fn command_op(
    stream: &mut TcpStream,
    id: u64,
    args: &[&str],
    resp3: bool,
) -> Bytes {
    let args: Vec<Bytes> = args
        .iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect();
    let mut value = BytesMut::new();
    twincache_protocol::resp::encode_command(&args, &mut value);
    let mut req = Request::new(Op::Command, Bytes::new());
    req.id = id;
    req.value = value.freeze();
    if resp3 {
        req.flags = flags::RESP3;
    }
    let mut out = BytesMut::new();
    encode_frame(&req, &mut out);
    stream.write_all(&out).await.unwrap();
    let mut codec = FrameCodec::<twincache_protocol::Response>::new(1 << 20);
    let mut buf = BytesMut::new();
    loop {
        use tokio_util::codec::Decoder;
        if let Some(resp) = codec.decode(&mut buf).unwrap() {
            assert_eq!(resp.id, id);
            assert_eq!(resp.status, twincache_protocol::Status::Ok);
            return resp.payload;
        }
        assert!(stream.read_buf(&mut buf).await.unwrap() > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_op_runs_any_command_from_a_raw_frame() {
    let cluster = Cluster::start(2).await;
    let mut stream = TcpStream::connect(cluster.orch.addr).await.unwrap();
    let mut preamble = BytesMut::new();
    preamble.put_slice(&PREAMBLE);
    stream.write_all(&preamble).await.unwrap();
    let s = &mut stream;
    assert_eq!(
        &command_op(s, 1, &["INCR", "n"], false).await[..],
        b":1\r\n"
    );
    assert_eq!(
        &command_op(s, 2, &["incrby", "n", "4"], false).await[..],
        b":5\r\n"
    );
    assert_eq!(
        &command_op(s, 3, &["HSET", "h", "f", "v"], false).await[..],
        b":1\r\n"
    );
    assert_eq!(
        &command_op(s, 4, &["HGETALL", "h"], false).await[..],
        b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(
        &command_op(s, 5, &["HGETALL", "h"], true).await[..],
        b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(
        &command_op(s, 6, &["GET", "nope"], true).await[..],
        b"_\r\n"
    );
    assert_eq!(
        &command_op(s, 7, &["GET", "h"], false).await[..],
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    );
    assert_eq!(
        &command_op(s, 8, &["MULTI"], false).await[..],
        b"-ERR 'MULTI' needs a RESP connection\r\n"
    );
    assert_eq!(
        &command_op(s, 9, &["NOPE"], false).await[..],
        b"-ERR unknown command 'NOPE', with args beginning with: \r\n"
    );
    let mget: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    let mut args = vec!["MGET"];
    args.extend(mget.iter().map(String::as_str));
    let streamed = command_op(s, 10, &args, false).await;
    assert!(
        streamed.starts_with(b"*40\r\n$-1\r\n"),
        "a streamed reply, gathered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_protocol_counters_and_expiry() {
    let cluster = Cluster::start(1).await;
    let mut c = TextConn::connect(cluster.orch.addr).await;
    assert_eq!(c.request("incr||n").await, "0||1");
    assert_eq!(c.request("incrby||n||41").await, "0||42");
    assert_eq!(c.request("incrby||n||-50").await, "0||-8");
    assert_eq!(c.request("get||n").await, "0||-8");
    assert_eq!(c.request("ttl||n").await, "0||-1");
    assert_eq!(c.request("expire||n||100").await, "0||1");
    assert_eq!(c.request("ttl||n").await, "0||100");
    assert_eq!(c.request("ttl||missing").await, "2||key not found");
    assert_eq!(c.request("expire||missing||5").await, "2||key not found");
    assert_eq!(c.request("set||s||abc").await, "0||");
    assert_eq!(
        c.request("incr||s").await,
        "10||value is not an integer or out of range"
    );
    assert_eq!(
        c.request("incrby||n||x").await,
        "1||expected incrby||<key>||<integer>"
    );
    assert_eq!(c.request("expire||n||0").await, "0||1");
    assert_eq!(c.request("get||n").await, "2||key not found");
}

/// HSCAN walks a large hash in steps of about COUNT fields, as real clients iterate it (the
/// redis crate's `hscan`, redis-py's `hscan_iter`): every field once, none of the steps
/// anywhere near the whole hash. (It answered the whole hash at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hscan_iterates_a_large_hash_in_steps() {
    let cluster = Cluster::start(1).await;
    let client = redis::Client::open(format!("redis://{}/", cluster.orch.addr)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    for chunk in 0..10 {
        let mut hset = redis::cmd("HSET");
        hset.arg("big");
        for i in chunk * 1000..(chunk + 1) * 1000 {
            hset.arg(format!("field:{i}")).arg(format!("value {i}"));
        }
        let _: i64 = hset.query_async(&mut con).await.unwrap();
    }
    let (cursor, items): (String, Vec<String>) = redis::cmd("HSCAN")
        .arg("big")
        .arg(0)
        .arg("COUNT")
        .arg(100)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_ne!(cursor, "0");
    assert!((200..400).contains(&items.len()), "{} items", items.len());
    let mut iter = con.hscan::<_, (String, String)>("big").await.unwrap();
    let mut fields = HashMap::new();
    while let Some(pair) = iter.next_item().await {
        let (f, v) = pair.unwrap();
        assert!(fields.insert(f, v).is_none(), "a field twice");
    }
    drop(iter);
    assert_eq!(fields.len(), 10_000);
    assert_eq!(fields["field:1234"], "value 1234");
    let script = r#"
import sys, redis
r = redis.Redis(port=int(sys.argv[1]), decode_responses=True)
fields = dict(r.hscan_iter("big", match="field:1*", count=500))
assert len(fields) == 1111, len(fields)
"#;
    let out = Command::new("python3")
        .args(["-c", script, &cluster.orch.addr.port().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
