//! Security with real processes: cluster authentication between nodes, protected mode, and
//! client authentication (AUTH) through every protocol and real Redis clients.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twincache_client::{Client, Status};
use twincache_protocol::frame::{encode_frame, Op, Request, PREAMBLE};

use crate::faults::{state_of, wait_status, FAST};
use crate::harness::{exchange, keygen, secret_of, Proc, TempFile, TextConn, ORCHESTRATOR, WORKER};

fn worker(secret: &TempFile) -> Proc {
    Proc::start(
        WORKER,
        &[
            "--port".into(),
            "0".into(),
            "--cluster-secret-file".into(),
            secret.arg(),
        ],
    )
}

/// One request on a fresh unauthenticated connection to a worker: its answer's status, or
/// `None` if the worker closed without answering.
async fn unauthenticated(addr: SocketAddr, op: Op) -> Option<Status> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = bytes::BytesMut::from(&PREAMBLE[..]);
    let mut req = Request::new(op, Bytes::from_static(b"k"));
    req.value = Bytes::from_static(b"127.0.0.1:1");
    req.version = u64::MAX;
    encode_frame(&req, &mut out);
    s.write_all(&out).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the worker answers and closes")
        .unwrap();
    // length (4), id (8), status (1)
    answer.get(12).map(|&code| Status::from_code(code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_secret_serves_nothing_to_the_unauthenticated() {
    let secret = keygen();
    let w = worker(&secret);
    for op in [
        Op::Get,
        Op::Set,
        Op::Status,
        Op::Stats,
        Op::Snapshot,
        Op::Resync,
        Op::Adopt,
        Op::Invalidate,
        Op::PartnerMissed,
        Op::Revoke,
    ] {
        assert_eq!(
            unauthenticated(w.addr, op).await,
            Some(Status::NoAuth),
            "{op:?}"
        );
    }
    // A wrong secret fails, the right one works.
    let wrong = keygen();
    let err = Client::builder()
        .cluster_secret(secret_of(&wrong))
        .connect(&w.addr.to_string())
        .await
        .unwrap_err();
    assert!(matches!(err, twincache_client::Error::Auth(_)), "{err}");
    let right = Client::builder()
        .cluster_secret(secret_of(&secret))
        .connect(&w.addr.to_string())
        .await
        .unwrap();
    right.ping().await.unwrap();
    assert!(w
        .log_text()
        .contains("refused a connection that did not authenticate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_with_the_secret_serves_and_resyncs() {
    let secret = keygen();
    let mut a = worker(&secret);
    let b = worker(&secret);
    let secret_arg = secret.arg();
    let flags = [FAST, &["--cluster-secret-file", &secret_arg]].concat();
    let orch = Proc::orchestrator(&[a.addr, b.addr], &flags);
    let (wa, wb) = (a.addr, b.addr);
    let both = |s: &str| state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync";
    wait_status(orch.addr, "both in sync", both).await;
    let c = Client::connect(&orch.addr.to_string()).await.unwrap();
    for i in 0..200 {
        c.set(format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    a.kill();
    a = Proc::start(
        WORKER,
        &[
            "--port".into(),
            wa.port().to_string(),
            "--cluster-secret-file".into(),
            secret.arg(),
        ],
    );
    // The restarted worker refills from its partner over an authenticated connection.
    let direct = Client::builder()
        .cluster_secret(secret_of(&secret))
        .connect(&a.addr.to_string())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while direct.get::<Bytes>("k7").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "never resynced: {}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_status(orch.addr, "both in sync again", both).await;

    // An orchestrator without the secret gets nothing, and says why.
    let outsider = Proc::orchestrator(&[wa, wb], FAST);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = exchange(outsider.addr, b"get||k7\n").await;
    assert!(out.starts_with("4||"), "{out}");
    assert!(outsider.log_text().contains("--cluster-secret-file"));
}

#[test]
fn protected_mode_refuses_open_addresses_without_credentials() {
    let run = |bin: &str, args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(WORKER, &["--bind", "0.0.0.0", "--port", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--cluster-secret-file") && err.contains("--insecure"),
        "{err}"
    );
    let (code, err) = run(
        ORCHESTRATOR,
        &["--listen", "0.0.0.0:0", "127.0.0.1", "1", "127.0.0.1", "2"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--requirepass-file"), "{err}");
    // The HTTP port too: its key interface reads and writes every key.
    let (code, err) = run(
        ORCHESTRATOR,
        &["--http", "0.0.0.0:0", "127.0.0.1", "1", "127.0.0.1", "2"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("refusing to serve HTTP on 0.0.0.0:0") && err.contains("--insecure"),
        "{err}"
    );
    let bad = TempFile::with("short");
    let (code, err) = run(
        WORKER,
        &["--port", "0", "--cluster-secret-file", &bad.arg()],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("32 bytes"), "{err}");
    // With --insecure it starts (and is stopped by the test).
    let mut w = Proc::start(
        WORKER,
        &[
            "--bind".into(),
            "0.0.0.0".into(),
            "--port".into(),
            "0".into(),
            "--insecure".into(),
        ],
    );
    w.kill();
}

/// A cluster whose orchestrator requires `extra` authentication flags.
async fn guarded(extra: &[&str]) -> (Vec<Proc>, Proc) {
    let workers: Vec<Proc> = (0..2).map(|_| Proc::worker()).collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
    let orch = Proc::orchestrator(&addrs, extra);
    // Ready: an authenticated client can write.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = TextConn::connect(orch.addr).await;
        let auth = c.request("auth||hunter2").await;
        if auth == "0||" && c.request("set||ready||1").await == "0||" {
            break;
        }
        assert!(Instant::now() < deadline, "{auth}: {}", orch.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (workers, orch)
}

fn redis_cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (apt-get install -y redis-tools)");
    // redis-cli reports a failed AUTH on stderr, then runs the command.
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirepass_through_every_protocol_and_client() {
    let pass = TempFile::with("hunter2\n");
    let (_workers, orch) = guarded(&["--requirepass-file", &pass.arg()]).await;
    let addr = orch.addr;
    // redis-cli: refused without, served with, wrong password named.
    assert!(redis_cli(addr, &["get", "ready"]).contains("NOAUTH Authentication required."));
    assert_eq!(
        redis_cli(
            addr,
            &["--no-auth-warning", "-a", "hunter2", "get", "ready"]
        ),
        "1"
    );
    assert!(
        redis_cli(addr, &["--no-auth-warning", "-a", "nope", "get", "ready"]).contains("WRONGPASS")
    );
    // The redis crate: password in the URL (AUTH), and HELLO 2 AUTH by hand.
    let mut con = redis::Client::open(format!("redis://:hunter2@{addr}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg("ready")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(v, "1");
    let mut raw = redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let err = redis::cmd("GET")
        .arg("ready")
        .query_async::<String>(&mut raw)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NOAUTH"), "{err}");
    let hello: redis::Value = redis::cmd("HELLO")
        .arg(&["2", "AUTH", "default", "hunter2"])
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(format!("{hello:?}").contains("redis"));
    let v: String = redis::cmd("GET")
        .arg("ready")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(v, "1");
    // Pipelined AUTH then GET in one write: the GET runs as the authenticated user.
    let out = exchange(
        addr,
        b"*2\r\n$4\r\nAUTH\r\n$7\r\nhunter2\r\n*2\r\n$3\r\nGET\r\n$5\r\nready\r\n",
    )
    .await;
    assert_eq!(out, "+OK\r\n$1\r\n1\r\n");
    // The text protocol.
    let out = exchange(addr, b"get||ready\nauth||hunter2\nget||ready\n").await;
    assert_eq!(
        out,
        "8||authentication required: auth||<password> or auth||<user>||<password>\n0||\n0||1\n"
    );
    // The client library.
    let err = Client::connect(&addr.to_string())
        .await
        .unwrap()
        .get::<Bytes>("ready")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(Status::NoAuth), "{err}");
    let c = Client::builder()
        .password("hunter2")
        .connect(&addr.to_string())
        .await
        .unwrap();
    assert_eq!(
        c.get::<Bytes>("ready").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    let err = Client::builder()
        .password("wrong")
        .connect(&addr.to_string())
        .await
        .unwrap_err();
    assert!(matches!(err, twincache_client::Error::Auth(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_have_roles_and_failures_are_slowed_down() {
    let hash = |pw: &str| {
        let mut child = Command::new(ORCHESTRATOR)
            .arg("--hash-password")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all_sync(pw);
        String::from_utf8(child.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string()
    };
    let users = TempFile::with(&format!(
        "# user role hash\nreader read-only {}\nwriter read-write {}\n",
        hash("r-pass"),
        hash("w-pass")
    ));
    let pass = TempFile::with("hunter2\n");
    let (_workers, orch) = guarded(&[
        "--users-file",
        &users.arg(),
        "--requirepass-file",
        &pass.arg(),
    ])
    .await;
    let addr = orch.addr;
    let as_reader = ["--no-auth-warning", "--user", "reader", "--pass", "r-pass"];
    assert_eq!(
        redis_cli(addr, &[&as_reader[..], &["get", "ready"]].concat()),
        "1"
    );
    let refused = redis_cli(addr, &[&as_reader[..], &["set", "k", "v"]].concat());
    assert_eq!(
        refused,
        "NOPERM User reader has no permissions to run the 'set' command"
    );
    let as_writer = ["--no-auth-warning", "--user", "writer", "--pass", "w-pass"];
    assert_eq!(
        redis_cli(addr, &[&as_writer[..], &["set", "k", "v"]].concat()),
        "OK"
    );
    let c = Client::builder()
        .user("reader", "r-pass")
        .connect(&addr.to_string())
        .await
        .unwrap();
    assert_eq!(
        c.get::<Bytes>("k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(
        c.set("k", "x").await.unwrap_err().status(),
        Some(Status::NoPerm)
    );
    // A command refused inside MULTI fails the transaction, as in Redis: EXEC runs nothing.
    let mut r = crate::harness::RespConn::connect(addr).await;
    assert_eq!(
        &r.call(&[b"auth", b"reader", b"r-pass"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&r.call(&[b"multi"]).await[..], b"+OK\r\n");
    let refused = r.call(&[b"set", b"k", b"y"]).await;
    assert!(refused.starts_with(b"-NOPERM"), "{refused:?}");
    assert_eq!(&r.call(&[b"get", b"k"]).await[..], b"+QUEUED\r\n");
    assert_eq!(
        &r.call(&[b"exec"]).await[..],
        &b"-EXECABORT Transaction discarded because of previous errors.\r\n"[..]
    );
    // Three wrong passwords take at least 100 + 200 + 400 ms to be answered.
    let mut t = TextConn::connect(addr).await;
    let started = Instant::now();
    for _ in 0..3 {
        assert!(t.request("auth||writer||guess").await.starts_with("8||"));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
}

/// Writes all of `text` to a child's stdin and closes it.
trait WriteAllSync {
    fn write_all_sync(self, text: &str);
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, text: &str) {
        use std::io::Write;
        self.write_all(text.as_bytes()).unwrap();
    }
}

/// An outsider that cannot authenticate fills only the allowance for unauthenticated
/// connections, never the slots the cluster's own links need; and one that keeps the
/// allowance full, reopening what closes, does not keep the cluster's links out either: a
/// newcomer closes the oldest connection waiting there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_cannot_take_the_cluster_links_slots() {
    let secret = keygen();
    let args = |s: &TempFile| -> Vec<String> {
        [
            "--port",
            "0",
            "--max-connections",
            "8",
            "--max-pending-connections",
            "4",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain(["--cluster-secret-file".to_string(), s.arg()])
        .collect()
    };
    let a = Proc::start(WORKER, &args(&secret));
    let b = Proc::start(WORKER, &args(&secret));
    let (wa, wb) = (a.addr, b.addr);
    // The outsider holds as many connections as it can to both workers, and opens a new one
    // whenever one of them is closed, for the whole test.
    let stop = tokio_util::sync::CancellationToken::new();
    let squat = |addr: SocketAddr| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.is_cancelled() {
                held.retain(|s| {
                    let mut byte = [0u8; 1];
                    !matches!(s.try_read(&mut byte), Ok(0))
                });
                while held.len() < 8 {
                    match TcpStream::connect(addr).await {
                        Ok(s) => held.push(s),
                        Err(_) => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let squatters = [squat(wa), squat(wb)];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let secret_arg = secret.arg();
    let flags = [FAST, &["--cluster-secret-file", &secret_arg]].concat();
    let orch = Proc::orchestrator(&[wa, wb], &flags);
    let both = |s: &str| state_of(s, &wa) == "in_sync" && state_of(s, &wb) == "in_sync";
    wait_status(orch.addr, "both in sync despite the outsider", both).await;
    let c = Client::connect(&orch.addr.to_string()).await.unwrap();
    for i in 0..50 {
        c.set(format!("k{i}"), "v").await.unwrap();
        assert_eq!(
            c.get::<Bytes>(format!("k{i}")).await.unwrap().as_deref(),
            Some(&b"v"[..])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = crate::faults::status(orch.addr).await;
    assert!(both(&status), "{status}");
    stop.cancel();
    for s in squatters {
        s.await.unwrap();
    }
}
