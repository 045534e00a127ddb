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
