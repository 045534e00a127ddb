//! TLS with real processes: the client port (redis-cli, the `redis` crate and the client
//! library), client certificates, a `--tls-cluster` pair resyncing over TLS, and certificates
//! reloaded on SIGHUP under load. Certificates are made on the spot (rcgen) into temporary
//! files, for 127.0.0.1 and localhost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use twincache_client::{Bytes, Client, Error, TlsConnector};
use twincache_tls::testing::{PemDir, TestCa};

use crate::faults::{state_of, worker_on, FAST};
use crate::harness::{exchange, key_on_pair, wait_log, Proc, TempFile, ORCHESTRATOR, WORKER};

/// A CA, and a loopback certificate it signed, in files.
struct Certs {
    ca: TestCa,
    dir: PemDir,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        let ca = TestCa::new("twincache test CA");
        let dir = PemDir::new("e2e");
        let ca_file = dir.write("ca.pem", ca.cert_pem());
        let (cert, key) = dir.write_leaf("node", &ca.loopback(1));
        Certs {
            ca,
            dir,
            ca_file,
            cert,
            key,
        }
    }

    /// `--tls-cert-file ... --tls-key-file ...` and, if `with_ca`, `--tls-ca-cert-file ...`.
    fn flags(&self, with_ca: bool) -> Vec<String> {
        let mut flags = vec![
            "--tls-cert-file".to_string(),
            path(&self.cert),
            "--tls-key-file".into(),
            path(&self.key),
        ];
        if with_ca {
            flags.extend(["--tls-ca-cert-file".into(), path(&self.ca_file)]);
        }
        flags
    }

    fn trusting(&self) -> TlsConnector {
        TlsConnector::from_ca_file(&self.ca_file).unwrap()
    }

    /// A connector presenting a fresh certificate of this CA.
    fn with_client_cert(&self, name: &str) -> TlsConnector {
        let (cert, key) = self.dir.write_leaf(name, &self.ca.issue(&[name], 99));
        TlsConnector::from_files(&self.ca_file, cert, key).unwrap()
    }
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// An orchestrator with `flags` in front of `workers`, started without the harness's
/// plaintext readiness check.
fn orchestrator(workers: &[SocketAddr], flags: &[String]) -> Proc {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Proc::orchestrator(workers, &flags)
}

/// Bounded wait until a key of every pair gets an answer from a worker, over TLS.
async fn wait_ready(orch: &Proc, tls: &TlsConnector, pairs: usize) -> Client {
    let client = Client::builder()
        .tls(tls.clone())
        .connect(&orch.addr.to_string())
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e}; log:\n{}", orch.log_text()));
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in 0..pairs {
        let key = key_on_pair(p, pairs, 0);
        while client.get::<Bytes>(&key).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "cluster not ready; log:\n{}",
                orch.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    client
}

/// One text-protocol request on a fresh TLS connection; the answer line.
async fn text_over_tls(addr: SocketAddr, tls: &TlsConnector, line: &str) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = tls.connect(&addr.to_string(), tcp).await.unwrap();
    stream
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stream).read_line(&mut answer),
    )
    .await
    .expect("answer in time")
    .unwrap();
    answer.trim_end().to_string()
}

fn redis_cli(port: u16, tls: &[&str], args: &[&str]) -> String {
    let port = port.to_string();
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port])
        .args(tls)
        .args(args)
        .output()
        .expect("redis-cli is installed (apt-get install -y redis-tools; .ci/run does it)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_port_speaks_tls_to_redis_cli_the_redis_crate_and_the_client_library() {
    let certs = Certs::new();
    let (w1, w2) = (Proc::worker(), Proc::worker());
    let orch = orchestrator(&[w1.addr, w2.addr], &certs.flags(false));
    let client = wait_ready(&orch, &certs.trusting(), 1).await;
    let port = orch.addr.port();
    let ca = path(&certs.ca_file);
    let tls = ["--tls", "--cacert", ca.as_str()];

    assert_eq!(
        redis_cli(port, &tls, &["set", "greeting", "hello"]).trim(),
        "OK"
    );
    assert_eq!(redis_cli(port, &tls, &["get", "greeting"]).trim(), "hello");
    // Plaintext is refused, in the client's own protocol, and nothing runs.
    let plain = redis_cli(port, &[], &["set", "greeting", "plain"]);
    assert!(plain.contains("requires TLS"), "{plain}");
    let text = exchange(orch.addr, b"set||greeting||plain\n").await;
    assert!(text.starts_with("8||this port requires TLS"), "{text}");
    assert!(Client::connect(&orch.addr.to_string())
        .await
        .unwrap()
        .ping()
        .await
        .is_err());

    // The client library, binary-safe inside TLS.
    assert_eq!(
        client.get::<Bytes>("greeting").await.unwrap().as_deref(),
        Some(&b"hello"[..])
    );
    client.set(b"k\n||\0", &b"\xff\x00"[..]).await.unwrap();
    assert_eq!(
        client.get::<Bytes>(b"k\n||\0").await.unwrap().as_deref(),
        Some(&b"\xff\x00"[..])
    );
    // The text protocol inside TLS.
    assert_eq!(
        text_over_tls(orch.addr, &certs.trusting(), "get||greeting").await,
        "0||hello"
    );

    // The redis crate over rustls, trusting our CA.
    let redis_client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/"),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(certs.ca.cert_pem().as_bytes().to_vec()),
        },
    )
    .unwrap();
    let mut con = redis_client
        .get_multiplexed_async_connection_with_config(&crate::harness::patient_redis())
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("from-redis-rs")
        .arg("yes")
        .query_async(&mut con)
        .await
        .unwrap();
    let got: String = redis::cmd("GET")
        .arg("greeting")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, "hello");

    // A certificate from a CA the client does not trust is refused by the client.
    let stranger = TestCa::new("stranger");
    let file = certs.dir.write("stranger.pem", stranger.cert_pem());
    let err = Client::builder()
        .tls(TlsConnector::from_ca_file(file).unwrap())
        .connect(&orch.addr.to_string())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_requires_client_certificates() {
    let certs = Certs::new();
    let (w1, w2) = (Proc::worker(), Proc::worker());
    let mut flags = certs.flags(true);
    flags.extend(["--http".to_string(), "127.0.0.1:0".to_string()]);
    let orch = orchestrator(&[w1.addr, w2.addr], &flags);
    let addr = orch.addr.to_string();
    let signed = certs.with_client_cert("app");
    wait_ready(&orch, &signed, 1)
        .await
        .set("k", "v")
        .await
        .unwrap();

    // No certificate: the server ends the session after the handshake, and says why.
    let anonymous = Client::builder()
        .tls(certs.trusting())
        .connect(&addr)
        .await
        .unwrap();
    let err = anonymous.get::<Bytes>("k").await.unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");
    // A certificate from another CA: refused too.
    let other = Certs::new();
    let (cert, key) = other.dir.write_leaf("app", &other.ca.issue(&["app"], 5));
    let stranger = TlsConnector::from_files(&certs.ca_file, cert, key).unwrap();
    let err = match Client::builder().tls(stranger).connect(&addr).await {
        Ok(client) => client.get::<Bytes>("k").await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Tls(_)), "{err}");

    let ca = path(&certs.ca_file);
    let port = orch.addr.port();
    let refused = redis_cli(port, &["--tls", "--cacert", &ca], &["get", "k"]);
    assert_ne!(refused.trim(), "v");
    assert!(refused.contains("Error"), "{refused}");
    let (cert, key) = certs.dir.write_leaf("cli", &certs.ca.issue(&["cli"], 6));
    let (cert, key) = (path(&cert), path(&key));
    let tls = ["--tls", "--cacert", &ca, "--cert", &cert, "--key", &key];
    assert_eq!(redis_cli(port, &tls, &["get", "k"]).trim(), "v");
    assert!(
        orch.log_text().contains("the client port speaks TLS only"),
        "{}",
        orch.log_text()
    );
    // HTTP carries no certificate: its key interface stays closed to everyone, while the
    // metrics and health routes serve.
    let (status, body) = crate::ops::get(&crate::ops::url(&orch, "/v1/keys/k")).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("authenticate with a TLS certificate"),
        "{body}"
    );
    let put = reqwest::Client::new()
        .put(crate::ops::url(&orch, "/v1/keys/k"))
        .body("overwritten")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 403);
    assert_eq!(redis_cli(port, &tls, &["get", "k"]).trim(), "v");
    assert_eq!(
        crate::ops::get(&crate::ops::url(&orch, "/health")).await.0,
        200
    );
}

/// `worker --tls-cluster` flags: the node certificate, the CA, the cluster secret.
fn cluster_worker(port: u16, certs: &Certs, secret: &TempFile) -> Proc {
    let mut flags = certs.flags(true);
    flags.extend([
        "--tls-cluster".into(),
        "--cluster-secret-file".into(),
        secret.arg(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    worker_on(port, &flags)
}

async fn wait_states(orch: SocketAddr, tls: &TlsConnector, workers: [SocketAddr; 2], want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = text_over_tls(orch, tls, "status").await;
        if workers.iter().all(|w| state_of(&status, w) == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited too long for {want}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_resyncs_a_restarted_worker_over_tls() {
    let certs = Certs::new();
    let out = Command::new(WORKER).arg("keygen").output().unwrap();
    let secret = TempFile::with(&String::from_utf8(out.stdout).unwrap());
    let a = cluster_worker(0, &certs, &secret);
    let mut b = cluster_worker(0, &certs, &secret);
    let (wa, wb) = (a.addr, b.addr);
    let mut flags = certs.flags(true);
    flags.extend([
        "--tls-cluster".into(),
        "--cluster-secret-file".into(),
        secret.arg(),
    ]);
    flags.extend(FAST.iter().map(|f| f.to_string()));
    let orch = orchestrator(&[wa, wb], &flags);
    // The orchestrator presents its certificate to the workers, and clients present theirs.
    let tls = certs.with_client_cert("app");
    let client = wait_ready(&orch, &tls, 1).await;
    wait_states(orch.addr, &tls, [wa, wb], "in_sync").await;

    // A plaintext peer gets nothing from a TLS worker, not even with the right secret.
    let plain = Client::builder()
        .cluster_secret(twincache_client::ClusterSecret::from_file(&secret.0).unwrap())
        .connect(&wa.to_string())
        .await;
    let err = plain.expect_err("a plaintext connection is refused");
    assert!(err.to_string().contains("TLS only"), "{err}");

    for i in 0..200 {
        client
            .set(format!("key:{i}"), format!("value {i}"))
            .await
            .unwrap();
    }
    b.kill();
    // Written while b is down: b must get them from a, over TLS.
    for i in 200..300 {
        client
            .set(format!("key:{i}"), format!("value {i}"))
            .await
            .unwrap();
    }
    // A new certificate for a, picked up on SIGHUP; the links keep working.
    certs.dir.write_leaf("node", &certs.ca.loopback(2));
    a.signal("HUP");
    b = cluster_worker(wb.port(), &certs, &secret);
    wait_states(orch.addr, &tls, [wa, wb], "in_sync").await;
    assert!(b.log_text().contains("refill done"), "{}", b.log_text());
    drop(a);
    for i in 0..300 {
        let got = client.get::<Bytes>(format!("key:{i}")).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(format!("value {i}").as_bytes()),
            "key:{i}"
        );
    }
    let log = orch.log_text();
    assert!(!log.contains("TLS:"), "{log}");
    // The start-up check of what answers at each worker address dialled over TLS too.
    assert!(!log.contains("not a twincache worker"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_sighup_without_dropping_connections() {
    let old = Certs::new();
    let new_ca = TestCa::new("next CA");
    let new_ca_file = old.dir.write("next-ca.pem", new_ca.cert_pem());
    let (w1, w2) = (Proc::worker(), Proc::worker());
    let orch = orchestrator(&[w1.addr, w2.addr], &old.flags(false));
    wait_ready(&orch, &old.trusting(), 1).await;
    let addr = orch.addr.to_string();

    // Established connections (trusting only the old CA) keep writing and reading.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let client = Client::builder()
            .tls(old.trusting())
            .connect(&addr)
            .await
            .unwrap();
        let (stop, ops) = (stop.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("t{t}:{}", i % 50);
                client.set(&key, i.to_string()).await?;
                let got = client.get::<Bytes>(&key).await?;
                assert_eq!(got.as_deref(), Some(i.to_string().as_bytes()));
                ops.fetch_add(2, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A broken key first: the reload fails, says why, and keeps the certificate in use.
    old.dir.write("node.key", &new_ca.loopback(3).key);
    orch.signal("HUP");
    wait_log(&orch, "TLS reload failed").await;
    let still_old = Client::builder().tls(old.trusting()).connect(&addr).await;
    still_old.unwrap().ping().await.unwrap();

    // Then a certificate from a new CA, with its key.
    old.dir.write_leaf("node", &new_ca.loopback(4));
    orch.signal("HUP");
    wait_log(&orch, "TLS certificates reloaded").await;
    let trusts_new = TlsConnector::from_ca_file(&new_ca_file).unwrap();
    let fresh = Client::builder()
        .tls(trusts_new)
        .connect(&addr)
        .await
        .unwrap();
    fresh.set("after", "reload").await.unwrap();
    let err = Client::builder()
        .tls(old.trusting())
        .connect(&addr)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");

    let before = ops.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await
            .unwrap()
            .expect("an established connection kept working");
    }
    let after = ops.load(Ordering::Relaxed);
    assert!(after > before && before > 100, "ops {before} then {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_off() {
    use tokio::io::AsyncReadExt;
    let certs = Certs::new();
    let mut flags = certs.flags(true);
    flags.extend(["--tls-cluster".into(), "--idle-timeout".into(), "1s".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (worker, partner) = (worker_on(0, &flags), worker_on(0, &flags));
    let orch = Proc::orchestrator(&[worker.addr, partner.addr], &flags);
    for addr in [orch.addr, worker.addr] {
        // The start of a ClientHello record, then nothing.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("the server closes a stalled handshake")
            .ok();
        assert!(started.elapsed() >= Duration::from_millis(500), "{addr}");
    }
}

#[test]
fn unusable_tls_files_are_usage_errors() {
    let certs = Certs::new();
    let other = certs.dir.write_leaf("other", &certs.ca.loopback(2)).1;
    let missing = certs.dir.path().join("missing.pem");
    let run = |bin: &str, args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!text.contains("panicked"), "{text}");
        (out.status.code(), text)
    };
    let (cert, key) = (path(&certs.cert), path(&certs.key));
    let workers = ["127.0.0.1", "1", "127.0.0.1", "2"];
    let orch = |flags: &[&str]| run(ORCHESTRATOR, &[flags, &workers[..]].concat());

    let (code, text) = orch(&["--tls-cert-file", &path(&missing), "--tls-key-file", &key]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("cannot read --tls-cert-file") && text.contains("missing.pem"),
        "{text}"
    );
    let (code, text) = orch(&["--tls-cert-file", &cert, "--tls-key-file", &path(&other)]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("does not belong to the certificate"),
        "{text}"
    );
    let (code, text) = orch(&["--tls-cert-file", &cert]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--tls-key-file"), "{text}");
    let (code, text) = orch(&["--tls-cluster"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--tls-ca-cert-file"), "{text}");

    let (code, text) = run(
        WORKER,
        &[
            "--tls-cluster",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
        ],
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--tls-ca-cert-file"), "{text}");
    let (code, text) = run(WORKER, &["--tls-cert-file", &cert, "--tls-key-file", &key]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--tls-cluster"), "{text}");
}
