//! RESP with real Redis clients: redis-cli, redis-benchmark and the `redis` crate.

use std::process::Command;

use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twincache_protocol::slots::SlotMap;

use crate::harness::{exchange, Cluster};

/// Runs redis-cli against `port` with `args`; its stdout.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (apt-get install -y redis-tools; .ci/run does it)");
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_every_command() {
    let cluster = Cluster::start(2).await;
    let p = cluster.orch.addr.port();
    let cases: &[(&[&str], &str)] = &[
        (&["PING"], "PONG"),
        (&["PING", "hi"], "hi"),
        (&["ECHO", "hello world"], "hello world"),
        (&["SET", "a", "1"], "OK"),
        (&["GET", "a"], "1"),
        (&["GET", "missing"], ""),
        (&["SET", "a", "2", "NX"], ""),
        (&["SET", "b", "2", "XX"], ""),
        (&["SET", "a", "3", "XX", "GET"], "1"),
        (&["SET", "b", "x", "NX", "GET"], ""),
        (&["GET", "b"], "x"),
        (&["SET", "t", "v", "EX", "100"], "OK"),
        (
            &["SET", "t", "v", "PX", "100000", "KEEPTTL"],
            "ERR syntax error",
        ),
        (
            &["SET", "t", "v", "EX", "0"],
            "ERR invalid expire time in 'set' command",
        ),
        (
            &["SET", "t", "v", "EX", "soon"],
            "ERR value is not an integer or out of range",
        ),
        (&["SET", "t", "v", "NX", "XX"], "ERR syntax error"),
        (&["MSET", "m1", "a", "m2", "b", "m3", "c"], "OK"),
        (&["MGET", "m1", "nope", "m2", "m3"], "a\n\nb\nc"),
        (
            &["MSET", "m1"],
            "ERR wrong number of arguments for 'mset' command",
        ),
        (&["EXISTS", "m1", "m1", "nope"], "2"),
        (&["DEL", "m1", "m2", "nope"], "2"),
        (&["EXISTS", "m1"], "0"),
        (&["SELECT", "0"], "OK"),
        (&["SELECT", "1"], "ERR DB index is out of range"),
        (&["GET"], "ERR wrong number of arguments for 'get' command"),
        (
            &["FOO", "a", "b"],
            "ERR unknown command 'FOO', with args beginning with: 'a' 'b'",
        ),
        (&["HELLO", "4"], "NOPROTO unsupported protocol version"),
        (&["CLIENT", "SETNAME", "me"], "OK"),
        (&["CONFIG", "GET", "save"], "save"),
    ];
    for (args, want) in cases {
        assert_eq!(&cli(p, args), want, "redis-cli {args:?}");
    }
    let hello = cli(p, &["HELLO", "2"]);
    assert!(hello.contains("proto\n2"), "{hello}");
    let count: usize = cli(p, &["COMMAND", "COUNT"]).parse().unwrap();
    assert!(count > 70, "{count} commands");
    let info = cli(p, &["INFO"]);
    for section in [
        "# Server",
        "redis_version:",
        "# Clients",
        "connected_clients:",
        "# Stats",
        "# Keyspace",
        "db0:keys=",
    ] {
        assert!(info.contains(section), "INFO lacks {section}: {info}");
    }
    assert!(cli(p, &["DBSIZE"]).parse::<u64>().unwrap() >= 4);
    assert_eq!(cli(p, &["QUIT"]), "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crate_commands_pipelines_and_binary_values() {
    let cluster = Cluster::start(2).await;
    let client = redis::Client::open(format!("redis://{}/", cluster.orch.addr)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();

    let _: () = con.set("k", "v").await.unwrap();
    let v: String = con.get("k").await.unwrap();
    assert_eq!(v, "v");
    let none: Option<String> = con.get("absent").await.unwrap();
    assert_eq!(none, None);
    let binary: Vec<u8> = (0..=255u8).chain(b"\r\n*1\r\n".iter().copied()).collect();
    let _: () = con.set(&b"bin\r\nkey\0"[..], &binary[..]).await.unwrap();
    let back: Vec<u8> = con.get(&b"bin\r\nkey\0"[..]).await.unwrap();
    assert_eq!(back, binary);
    let _: () = con.set("", "empty key").await.unwrap();
    let empty: String = con.get("").await.unwrap();
    assert_eq!(empty, "empty key");

    // A pipeline of 1,000 commands: all answered, in order.
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.set(format!("p{i}"), i).ignore();
        pipe.get(format!("p{i}"));
    }
    let got: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
    assert_eq!(got, (0..500).collect::<Vec<i64>>());

    // MGET and MSET across both pairs come back in order.
    let keys: Vec<String> = (0..40).map(|i| format!("across:{i}")).collect();
    let pairs: std::collections::HashSet<usize> = keys
        .iter()
        .map(|k| SlotMap::even(2).pair_of(k.as_bytes()))
        .collect();
    assert_eq!(pairs.len(), 2, "the keys span both pairs");
    let items: Vec<(String, String)> = keys
        .iter()
        .map(|k| (k.clone(), format!("value of {k}")))
        .collect();
    let _: () = con.mset(&items).await.unwrap();
    let mut wanted: Vec<String> = keys.clone();
    wanted.insert(5, "not-there".into());
    let values: Vec<Option<String>> = con.mget(&wanted).await.unwrap();
    for (k, v) in wanted.iter().zip(&values) {
        let expect = (k != "not-there").then(|| format!("value of {k}"));
        assert_eq!(v, &expect);
    }
    let deleted: i64 = con.del(&keys[..10]).await.unwrap();
    assert_eq!(deleted, 10);
    let exist: i64 = con.exists(&keys[..20]).await.unwrap();
    assert_eq!(exist, 10);

    // Errors are Redis errors.
    let err = redis::cmd("GET")
        .query_async::<()>(&mut con)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("wrong number of arguments"),
        "{err}"
    );
    let err = redis::cmd("NOSUCH")
        .arg("x")
        .query_async::<()>(&mut con)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown command"), "{err}");
    // Connection state lives on the connection.
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("tester")
        .query_async(&mut con)
        .await
        .unwrap();
    let name: String = redis::cmd("CLIENT")
        .arg("GETNAME")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(name, "tester");
    // The connection is still fine.
    let v: String = con.get("k").await.unwrap();
    assert_eq!(v, "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_as_typed_into_netcat() {
    let cluster = Cluster::start(1).await;
    let out = exchange(
        cluster.orch.addr,
        b"SET greeting \"hello world\"\r\nGET greeting\r\n\r\nEXISTS greeting nope\r\nQUIT\r\nGET greeting\r\n",
    )
    .await;
    assert_eq!(out, "+OK\r\n$11\r\nhello world\r\n:1\r\n+OK\r\n");
}

/// Sends `input` on its own connection and returns what came back before the server closed.
async fn raw(addr: std::net::SocketAddr, input: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(input).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resp_gets_an_error_and_a_closed_connection() {
    let cluster = Cluster::start_with(1, &["--max-frame", "1MiB"]).await;
    let addr = cluster.orch.addr;
    let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = con.set("survivor", "yes").await.unwrap();
    let cases: &[(&[u8], &str)] = &[
        (
            b"*abc\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$99999999\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*2\r\n$-3\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n+ab\r\n",
            "-ERR Protocol error: expected '$', got '+'\r\n",
        ),
        (
            b"*1\r\n$2\r\nabcdef\r\n",
            "-ERR Protocol error: invalid bulk format\r\n",
        ),
        // A valid command first is still answered; an empty or negative multibulk is
        // skipped without a word, as Redis 7 does.
        (
            b"*1\r\n$4\r\nPING\r\n*-1\r\n*0\r\n*-5\r\n*1\r\n$4\r\nPING\r\n*x\r\n",
            "+PONG\r\n+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n",
        ),
    ];
    for (input, want) in cases {
        assert_eq!(
            &raw(addr, input).await,
            want,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
    let v: String = con.get("survivor").await.unwrap();
    assert_eq!(v, "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_runs_without_errors() {
    let cluster = Cluster::start(1).await;
    let out = Command::new("redis-benchmark")
        .args(["-p", &cluster.orch.addr.port().to_string()])
        .args([
            "-t",
            "set,get,mset",
            "-P",
            "16",
            "-n",
            "20000",
            "-c",
            "20",
            "-r",
            "1000",
            "-q",
        ])
        .output()
        .expect("redis-benchmark is installed (apt-get install -y redis-tools)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for t in ["SET:", "GET:", "MSET (10 keys):"] {
        assert!(text.contains(t), "no {t} result in: {text}");
    }
    assert!(!text.contains("ERR"), "{text}");
}
