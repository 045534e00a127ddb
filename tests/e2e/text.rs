//! The text protocol exactly as netcat sends it.

use std::time::Duration;

use crate::harness::{exchange, Cluster, TextConn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_session_with_every_response_code() {
    let cluster = Cluster::start(2).await;
    let out = exchange(
        cluster.orch.addr,
        b"set||a||hello\nget||a\nget||zz\nfoo||x\nget\nexit\nget||a\n",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "exit closes the connection: {out:?}");
    assert_eq!(lines[0], "0||");
    assert_eq!(lines[1], "0||hello");
    assert!(lines[2].starts_with("2||"), "{out}");
    assert!(lines[3].starts_with("3||"), "{out}");
    assert!(lines[4].starts_with("1||"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_values_with_separators_del_and_ping() {
    let cluster = Cluster::start(2).await;
    let out = exchange(
        cluster.orch.addr,
        b"set||v||a||b||\r\nget||v\r\nPING\r\ndel||v\ndel||v\nget||v\nset||e||\nget||e\n",
    )
    .await;
    assert_eq!(
        out,
        "0||\n0||a||b||\n0||PONG\n0||\n2||key not found\n2||key not found\n0||\n0||\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_errors_name_the_problem() {
    let cluster = Cluster::start(1).await;
    let out = exchange(
        cluster.orch.addr,
        b"get||\nset||k\nset||||v\nget||a||b\n\nping||x\n",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    for line in &lines {
        assert!(line.starts_with("1||"), "{out}");
    }
    assert!(lines[0].contains("empty key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_pair_gets_its_own_code_and_other_pairs_keep_working() {
    let mut cluster = Cluster::start(2).await;
    let on0 = cluster.key_on_pair(0, 1);
    let on1 = cluster.key_on_pair(1, 1);
    cluster.workers[2].kill();
    cluster.workers[3].kill();
    // The orchestrator notices the closed connections at once; allow it a moment.
    let mut conn = TextConn::connect(cluster.orch.addr).await;
    let mut answer = String::new();
    for _ in 0..100 {
        answer = conn.request(&format!("set||{on1}||x")).await;
        if answer.starts_with("4||") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answer.starts_with("4||"), "{answer}");
    assert!(conn
        .request(&format!("get||{on1}"))
        .await
        .starts_with("4||"));
    assert_eq!(conn.request(&format!("set||{on0}||y")).await, "0||");
    assert_eq!(conn.request(&format!("get||{on0}")).await, "0||y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_survives_the_loss_of_one_worker_per_pair() {
    let mut cluster = Cluster::start(2).await;
    let keys: Vec<String> = (0..20).map(|i| format!("survivor:{i}")).collect();
    let mut conn = TextConn::connect(cluster.orch.addr).await;
    for k in &keys {
        assert_eq!(conn.request(&format!("set||{k}||v-{k}")).await, "0||");
    }
    cluster.workers[0].kill();
    cluster.workers[3].kill();
    for k in &keys {
        assert_eq!(
            conn.request(&format!("get||{k}")).await,
            format!("0||v-{k}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_lines_in_one_write_answer_in_order() {
    let cluster = Cluster::start(2).await;
    let mut input = String::new();
    for i in 0..500 {
        input += &format!("set||pipe:{i}||value-{i}\n");
        input += &format!("get||pipe:{i}\n");
    }
    let out = exchange(cluster.orch.addr, input.as_bytes()).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1000);
    for i in 0..500 {
        assert_eq!(lines[2 * i], "0||");
        assert_eq!(lines[2 * i + 1], format!("0||value-{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_clients_each_see_their_own_writes() {
    let cluster = Cluster::start(2).await;
    let addr = cluster.orch.addr;
    let tasks: Vec<_> = (0..100)
        .map(|c| {
            tokio::spawn(async move {
                let mut conn = TextConn::connect(addr).await;
                for i in 0..30 {
                    let key = format!("c{c}:k{}", i % 7);
                    let value = format!("client {c} write {i}");
                    assert_eq!(conn.request(&format!("set||{key}||{value}")).await, "0||");
                    assert_eq!(
                        conn.request(&format!("get||{key}")).await,
                        format!("0||{value}")
                    );
                    // A key shared by all clients: any client's value, never garbage.
                    let shared = conn.request("get||shared").await;
                    assert!(
                        shared == "2||key not found" || shared.starts_with("0||client "),
                        "{shared}"
                    );
                    assert_eq!(conn.request(&format!("set||shared||{value}")).await, "0||");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let cluster = Cluster::start_with(1, &["--idle-timeout", "300ms"]).await;
    let mut busy = TextConn::connect(cluster.orch.addr).await;
    let idle = tokio::net::TcpStream::connect(cluster.orch.addr)
        .await
        .unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(busy.request("ping").await, "0||PONG");
    }
    let mut buf = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let mut idle = idle;
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("idle connection closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "an idle connection is closed without a message");
}
