//! The command lines: clear messages and exit codes, no backtraces; graceful shutdown.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Proc, ORCHESTRATOR, WORKER};

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin).args(args).output().expect("run binary");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("panicked"), "{text}");
    assert!(!text.contains("RUST_BACKTRACE"), "{text}");
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn odd_worker_count_is_a_usage_error() {
    let (code, text) = run(
        ORCHESTRATOR,
        &[
            "127.0.0.1",
            "7001",
            "127.0.0.1",
            "7002",
            "127.0.0.1",
            "7003",
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("even"), "{text}");
    let (code, text) = run(ORCHESTRATOR, &["127.0.0.1"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("pairs"), "{text}");
    let (code, _) = run(ORCHESTRATOR, &[]);
    assert_eq!(code, 2);
}

#[test]
fn bad_addresses_are_usage_errors() {
    let (code, text) = run(ORCHESTRATOR, &["127.0.0.1", "70000", "127.0.0.1", "7002"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("70000"), "{text}");
    let (code, text) = run(ORCHESTRATOR, &["no_such*host", "7001", "127.0.0.1", "7002"]);
    assert_eq!(code, 2, "{text}");
    let (code, text) = run(
        ORCHESTRATOR,
        &[
            "--listen",
            "nonsense",
            "127.0.0.1",
            "7001",
            "127.0.0.1",
            "7002",
        ],
    );
    assert_eq!(code, 2, "{text}");
    let (code, text) = run(WORKER, &["--bind", "300.1.2.3"]);
    assert_eq!(code, 2, "{text}");
    // Zero intervals and timeouts are refused up front (a zero interval would panic later).
    for flag in [
        "--health-interval",
        "--health-timeout",
        "--worker-timeout",
        "--idle-timeout",
    ] {
        let (code, text) = run(
            ORCHESTRATOR,
            &[flag, "0", "127.0.0.1", "7001", "127.0.0.1", "7002"],
        );
        assert_eq!(code, 2, "{flag}: {text}");
        assert!(text.contains("more than zero"), "{flag}: {text}");
    }
    let (code, text) = run(WORKER, &["--tombstone-ttl", "0"]);
    assert_eq!(code, 2, "{text}");
    // Adapter mode: both URLs, and URLs that parse.
    let (code, text) = run(WORKER, &["--source", "redis://127.0.0.1:1"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--destination"), "{text}");
    let (code, text) = run(
        WORKER,
        &[
            "--source",
            "nope://",
            "--destination",
            "redis://127.0.0.1:1",
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("bad source redis URL"), "{text}");
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, text) = run(WORKER, &["--port", &port]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("cannot listen") && text.contains(&port),
        "{text}"
    );
    let listen = format!("127.0.0.1:{port}");
    let (code, text) = run(
        ORCHESTRATOR,
        &[
            "--listen",
            &listen,
            "127.0.0.1",
            "7001",
            "127.0.0.1",
            "7002",
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cannot listen"), "{text}");
}

#[test]
fn help_on_both_binaries() {
    let (code, text) = run(WORKER, &["--help"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("--port") && text.contains("TWINCACHE_WORKER_PORT"),
        "{text}"
    );
    let (code, text) = run(ORCHESTRATOR, &["--help"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("--listen") && text.contains("--idle-timeout"),
        "{text}"
    );
}

/// `--help` names the variables a Redis URL may come from, never their values: a URL
/// carries its password, and the variables are there to keep it off command lines.
#[test]
fn help_names_url_variables_without_their_values() {
    let url = "redis://:hunter2@10.0.0.1:6379/0";
    let migrate = env!("CARGO_BIN_EXE_twincache-migrate");
    for (bin, args, vars) in [
        (
            WORKER,
            &["--help"][..],
            &["TWINCACHE_WORKER_SOURCE", "TWINCACHE_WORKER_DESTINATION"][..],
        ),
        (
            migrate,
            &["copy", "--help"],
            &["TWINCACHE_MIGRATE_SOURCE", "TWINCACHE_MIGRATE_DESTINATION"],
        ),
        (
            migrate,
            &["schema", "push", "--help"],
            &["TWINCACHE_MIGRATE_REDIS"],
        ),
    ] {
        let out = Command::new(bin)
            .args(args)
            .envs(vars.iter().map(|v| (v, url)))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {text}");
        for v in vars {
            assert!(text.contains(v), "{args:?} names {v}: {text}");
        }
        assert!(
            !text.contains("hunter2"),
            "{args:?} shows a password: {text}"
        );
    }
}

#[test]
fn flags_from_the_environment() {
    let out = Command::new(WORKER)
        .env("TWINCACHE_WORKER_PORT", "not-a-port")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-a-port"));
}

#[test]
fn sigterm_and_sigint_shut_down_gracefully() {
    let mut worker = Proc::worker();
    worker.signal("TERM");
    assert_eq!(
        worker.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        worker.log_text()
    );
    let mut w2 = Proc::worker();
    let w3 = Proc::worker();
    let mut orch = Proc::orchestrator(&[w2.addr, w3.addr], &[]);
    orch.signal("INT");
    assert_eq!(
        orch.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        orch.log_text()
    );
    w2.signal("INT");
    assert_eq!(w2.wait_exit(Duration::from_secs(10)), Some(0));
}

/// A client that never stops sending (pipelined PINGs, answered at once, read as fast as
/// they come) still sees the shutdown, which the session's select polls last (and looks at
/// every 64 turns besides). With a 30 s grace, a session that missed the signal would hold
/// the exit for 30 s.
#[test]
fn a_flooding_client_does_not_hold_up_shutdown() {
    let w1 = Proc::worker();
    let w2 = Proc::worker();
    let orch = Proc::orchestrator(&[w1.addr, w2.addr], &["--shutdown-grace", "30s"]);
    let pings = b"*1\r\n$4\r\nPING\r\n".repeat(4096);
    stops_while_flooded(orch, b"", pings);
}

/// The same for a worker: a peer flooding it with pipelined pings over the binary protocol
/// (as a busy orchestrator's link can) does not hold up its shutdown.
#[test]
fn a_flooding_peer_does_not_hold_up_a_workers_shutdown() {
    use twincache_protocol::frame::{encode_frame, Op, Request, PREAMBLE};
    let args = ["--port", "0", "--shutdown-grace", "30s"].map(String::from);
    let worker = Proc::start(WORKER, &args);
    let mut pings = bytes::BytesMut::new();
    for _ in 0..4096 {
        encode_frame(&Request::new(Op::Ping, bytes::Bytes::new()), &mut pings);
    }
    stops_while_flooded(worker, &PREAMBLE, pings.to_vec());
}

/// Sends `opening`, then `requests` over and over while reading every answer; once a MiB
/// of answers came back, signals `server` to stop, which it must do within 10 s.
fn stops_while_flooded(mut server: Proc, opening: &[u8], requests: Vec<u8>) {
    use std::io::{Read, Write};
    let stream = std::net::TcpStream::connect(server.addr).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = stream;
    writer.write_all(opening).unwrap();
    std::thread::spawn(move || while writer.write_all(&requests).is_ok() {});
    let (read_tx, read_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            total += n;
            let _ = read_tx.send(total);
        }
    });
    // Flooding in both directions before the signal.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read_rx.recv_timeout(Duration::from_secs(10)).unwrap() < 1 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never got going"
        );
    }
    let signalled = std::time::Instant::now();
    server.signal("TERM");
    assert_eq!(
        server.wait_exit(Duration::from_secs(25)),
        Some(0),
        "{}",
        server.log_text()
    );
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}

/// Issue 13's first-hour mistakes, each answered with what to write instead.
#[test]
fn easy_mistakes_get_answers_that_say_what_to_write() {
    let workers = ["127.0.0.1", "7001", "127.0.0.1", "7002"];
    fn with<'a>(flags: &[&'a str], workers: &[&'a str]) -> Vec<&'a str> {
        [flags, workers].concat()
    }
    let (code, text) = run(ORCHESTRATOR, &with(&["--port", "7420"], &workers));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--listen 127.0.0.1:7420"), "{text}");
    assert!(!text.contains("-- --port"), "{text}");
    // A bare number of seconds was a trap: 500 meant 500 s.
    let (code, text) = run(ORCHESTRATOR, &with(&["--worker-timeout", "500"], &workers));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no unit") && text.contains("500ms"), "{text}");
    let (code, text) = run(WORKER, &["--idle-timeout", "30"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("30s"), "{text}");
    // One worker given twice, by the same or another name.
    for twice in [
        &["127.0.0.1", "7422", "localhost", "7422"][..],
        &["127.0.0.1:7422", "127.0.0.1:7422"],
    ] {
        let (code, text) = run(ORCHESTRATOR, twice);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("given twice"), "{text}");
    }
    // Its own address as a worker.
    let (code, text) = run(
        ORCHESTRATOR,
        &[
            "--listen",
            "127.0.0.1:7420",
            "localhost:7420",
            "127.0.0.1:7421",
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("own --listen"), "{text}");
    let (_, help) = run(ORCHESTRATOR, &["--help"]);
    assert!(!help.contains("care-taker"), "{help}");
    assert!(help.contains("has sent nothing"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_and_host_colon_port_are_accepted() {
    let a = Proc::start(
        WORKER,
        &[
            "--bind".into(),
            "localhost".into(),
            "--port".into(),
            "0".into(),
        ],
    );
    assert_eq!(a.addr.ip(), std::net::Ipv4Addr::LOCALHOST);
    let b = Proc::worker();
    // `ip:port` for one worker, `host port` for the other; a host name to listen on.
    let orch = Proc::start(
        ORCHESTRATOR,
        &[
            "--listen".into(),
            "localhost:0".into(),
            a.addr.to_string(),
            "localhost".into(),
            b.addr.port().to_string(),
        ],
    );
    assert_eq!(orch.addr.ip(), std::net::Ipv4Addr::LOCALHOST);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = crate::harness::exchange(orch.addr, b"set||k||v\nget||k\n").await;
        if out == "0||\n0||v\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{out}\n{}",
            orch.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same worker behind two addresses looked like a pair in sync; an orchestrator given as
/// a worker was shown down while its partner served alone. Both stop the start.
#[test]
fn the_same_worker_twice_or_an_orchestrator_as_a_worker_stops_the_start() {
    // A worker on every loopback address, reached as 127.0.0.1 and as 127.0.0.2.
    let w = Proc::start(
        WORKER,
        &[
            "--bind".into(),
            "0.0.0.0".into(),
            "--insecure".into(),
            "--port".into(),
            "0".into(),
        ],
    );
    let port = w.addr.port();
    let (code, text) = run(
        ORCHESTRATOR,
        &[
            "--listen",
            "127.0.0.1:0",
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.2:{port}"),
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("are the same worker"), "{text}");

    let (b, c) = (Proc::worker(), Proc::worker());
    let orch = Proc::orchestrator(&[b.addr, c.addr], &[]);
    let (code, text) = run(
        ORCHESTRATOR,
        &[
            "--listen",
            "127.0.0.1:0",
            &b.addr.to_string(),
            &orch.addr.to_string(),
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("twincache orchestrator"), "{text}");
}

#[test]
fn a_redis_server_at_a_worker_address_is_named_in_the_log() {
    let redis = crate::harness::RedisServer::start();
    let w = Proc::worker();
    let redis_addr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let orch = Proc::orchestrator(&[w.addr, redis_addr], &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !orch.log_text().contains("is a Redis server") {
        assert!(std::time::Instant::now() < deadline, "{}", orch.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
