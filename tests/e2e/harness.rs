//! Starting and stopping real worker and orchestrator processes on loopback.
//!
//! Every process listens on port 0 and announces its address on stdout, which the harness
//! reads with a bounded wait; its log goes to a file that is printed if it fails to start.
//! Processes are killed when their handle is dropped, so a failing test leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twincache_protocol::slots::SlotMap;

pub const WORKER: &str = env!("CARGO_BIN_EXE_worker");
pub const ORCHESTRATOR: &str = env!("CARGO_BIN_EXE_orchestrator");
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running server process, killed on drop.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    /// Where `--http` listens, if it was given (announced before the listening line).
    pub http: Option<SocketAddr>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args` and waits for its `... listening on <addr>` line.
    pub fn start(bin: &str, args: &[String]) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Proc::spawn(cmd, bin, args)
    }

    /// Starts `bin` inside the network namespace `netns` (`ip netns exec`, which execs it, so
    /// the child is the server itself) and waits for its listening line.
    pub fn start_in_netns(netns: &str, bin: &str, args: &[String]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, bin]).args(args);
        Proc::spawn(cmd, bin, args)
    }

    /// Runs `cmd` (which starts `bin` with `args`) and waits for the listening line.
    pub fn spawn(mut cmd: Command, bin: &str, args: &[String]) -> Proc {
        let log = log_path(bin);
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Lines up to the listening line, which comes last (an `http on` line first).
            let mut stdout = BufReader::new(stdout);
            let mut lines = String::new();
            while stdout.read_line(&mut lines).unwrap_or(0) > 0
                && !lines.lines().last().unwrap_or("").contains("listening on")
            {}
            let _ = tx.send(lines);
        });
        let lines = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        let http = lines
            .lines()
            .find(|l| l.contains(" http on "))
            .and_then(|l| l.trim().rsplit(' ').next()?.parse().ok());
        let line = lines.lines().last().unwrap_or("").to_string();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "{bin} {args:?} did not announce its address (got {line:?}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Proc {
            child,
            addr,
            http,
            log,
        }
    }

    pub fn worker() -> Proc {
        Proc::start(WORKER, &["--port".into(), "0".into()])
    }

    pub fn orchestrator(workers: &[SocketAddr], extra: &[&str]) -> Proc {
        let mut args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        for w in workers {
            args.push(w.ip().to_string());
            args.push(w.port().to_string());
        }
        Proc::start(ORCHESTRATOR, &args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by name (TERM, INT, STOP, CONT) with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit; its exit code if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn log_path(bin: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = std::path::Path::new(bin)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::env::temp_dir().join(format!(
        "twincache-test-{}-{}-{name}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Bounded wait (30 s) until `text` shows up in the process's log.
pub async fn wait_log(proc: &Proc, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proc.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in:\n{}",
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A file removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn with(contents: &str) -> TempFile {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "twincache-sec-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh cluster secret from `worker keygen`.
pub fn keygen() -> TempFile {
    let out = Command::new(WORKER).arg("keygen").output().unwrap();
    TempFile::with(&String::from_utf8(out.stdout).unwrap())
}

/// The secret in `file`, for a client that talks to workers directly.
pub fn secret_of(file: &TempFile) -> twincache_client::ClusterSecret {
    twincache_client::ClusterSecret::from_file(&file.0).unwrap()
}

/// Workers (in pairing order) and an orchestrator in front of them.
pub struct Cluster {
    pub workers: Vec<Proc>,
    pub orch: Proc,
}

impl Cluster {
    pub async fn start(pairs: usize) -> Cluster {
        Cluster::start_with(pairs, &[]).await
    }

    /// Starts the cluster with extra orchestrator flags and waits until every pair answers.
    pub async fn start_with(pairs: usize, orchestrator_flags: &[&str]) -> Cluster {
        let workers: Vec<Proc> = (0..pairs * 2).map(|_| Proc::worker()).collect();
        let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
        let orch = Proc::orchestrator(&addrs, orchestrator_flags);
        let cluster = Cluster { workers, orch };
        cluster.wait_ready().await;
        cluster
    }

    pub fn pairs(&self) -> usize {
        self.workers.len() / 2
    }

    /// A key that lands on pair `pair`, distinct for each `n`.
    pub fn key_on_pair(&self, pair: usize, n: usize) -> String {
        key_on_pair(pair, self.pairs(), n)
    }

    /// Bounded wait until a get for a key of every pair is answered by a worker.
    async fn wait_ready(&self) {
        for _ in 0..500 {
            let mut input = String::new();
            for p in 0..self.pairs() {
                input += &format!("get||{}\n", self.key_on_pair(p, 0));
            }
            let out = exchange(self.orch.addr, input.as_bytes()).await;
            if out.lines().all(|l| l.starts_with("2||")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "cluster not ready; orchestrator log:\n{}",
            self.orch.log_text()
        );
    }
}

/// `len` bytes lz4 cannot shrink (a 64-bit LCG's top bytes), different for each `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

/// The `n`-th key (of the form `k:<i>`) that lands on `pair` of `pairs`.
pub fn key_on_pair(pair: usize, pairs: usize, n: usize) -> String {
    let map = SlotMap::even(pairs);
    (0..)
        .map(|i| format!("k:{i}"))
        .filter(|k| map.pair_of(k.as_bytes()) == pair)
        .nth(n)
        .expect("keys land on every pair")
}

/// Sends `input` on a fresh connection, closes the sending side, and returns all the server
/// wrote until it closed (bounded by a timeout).
pub async fn exchange(addr: SocketAddr, input: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(input).await.expect("write");
    stream.shutdown().await.expect("shutdown write side");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out))
        .await
        .expect("server answered in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// A line-oriented text-protocol connection.
pub struct TextConn {
    stream: BufReader2,
}

type BufReader2 = tokio::io::BufReader<TcpStream>;

impl TextConn {
    pub async fn connect(addr: SocketAddr) -> TextConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        TextConn {
            stream: tokio::io::BufReader::new(stream),
        }
    }

    /// Sends one request line and reads one response line (without its newline).
    pub async fn request(&mut self, line: &str) -> String {
        use tokio::io::AsyncBufReadExt;
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut resp))
            .await
            .expect("answer in time")
            .expect("read");
        resp.trim_end_matches('\n').to_string()
    }
}

/// A TCP relay in front of a server that a test can cut, like a network partition: cutting
/// drops every relayed connection and turns new ones away until restored. Unlike SIGSTOP,
/// nothing sent meanwhile waits in a socket buffer to be delivered later.
pub struct Gate {
    pub addr: SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl Gate {
    /// Relays connections on a fresh loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Gate {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (is_open, cut_rx) = (open.clone(), cuts.subscribe());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_open.load(Ordering::Acquire) {
                    continue; // dropped: closed at once
                }
                let mut cut = cut_rx.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Gate { addr, open, cuts }
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::Release);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// A redis-server on a free loopback port, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::start_on(port)
    }

    pub fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install -y redis-server; .ci/run does it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn con(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Appends one RESP command to `out`: called several times, a pipeline for
/// [`RespConn::send_raw`].
pub fn encode(args: &[&[u8]], out: &mut bytes::BytesMut) {
    let args: Vec<bytes::Bytes> = args
        .iter()
        .map(|a| bytes::Bytes::copy_from_slice(a))
        .collect();
    twincache_protocol::resp::encode_command(&args, out);
}

/// A raw RESP connection: commands out, each reply's bytes in, exactly as the server wrote
/// them (what the differential tests compare).
pub struct RespConn {
    stream: TcpStream,
    buf: bytes::BytesMut,
}

impl RespConn {
    pub async fn connect(addr: SocketAddr) -> RespConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        RespConn {
            stream,
            buf: bytes::BytesMut::new(),
        }
    }

    /// Sends one command and returns its reply's bytes.
    pub async fn call(&mut self, args: &[&[u8]]) -> bytes::Bytes {
        let mut out = bytes::BytesMut::new();
        encode(args, &mut out);
        self.stream.write_all(&out).await.expect("write");
        self.reply().await
    }

    /// Sends bytes as they are (a pipeline of encoded commands); read the replies with
    /// [`RespConn::reply`].
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends `pipeline` (`n` encoded commands) on a connection of its own, in one write,
    /// and returns the replies' bytes: a client that pipelines all it has at once.
    pub async fn pipelined(addr: SocketAddr, pipeline: &[u8], n: usize) -> Vec<bytes::Bytes> {
        let mut conn = RespConn::connect(addr).await;
        conn.send_raw(pipeline).await;
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(conn.reply().await);
        }
        replies
    }

    /// The next reply's bytes.
    pub async fn reply(&mut self) -> bytes::Bytes {
        loop {
            let frozen = bytes::Bytes::copy_from_slice(&self.buf);
            match twincache_protocol::resp::decode_reply(&frozen) {
                Ok((_, used)) => return self.buf.split_to(used).freeze(),
                Err(twincache_protocol::resp::ReplyError::Incomplete) => {}
                Err(e) => panic!(
                    "malformed reply {e}: {:?}",
                    String::from_utf8_lossy(&frozen)
                ),
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("a reply in time")
                    .expect("read");
            assert!(
                n > 0,
                "connection closed; had {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }
}

/// Polls `check` (which says whether it holds, and what it saw) every `every` until it
/// holds, for at most `limit`; panics with the last thing it saw.
pub async fn poll_until<F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: F,
) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, String)>,
{
    let deadline = Instant::now() + limit;
    loop {
        let (ok, seen) = check().await;
        if ok {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "waited too long for {what}; last saw:\n{seen}"
        );
        tokio::time::sleep(every).await;
    }
}

/// `key` read on a worker directly; `here`: whether the worker's pair holds its slot. A
/// worker refuses a key of a slot its pair does not hold (`Moved`), which reads as not there:
/// whether it still holds a copy shows in its key count (`stats`).
pub async fn on_worker(
    c: &twincache_client::Client,
    key: &str,
    here: bool,
) -> Option<bytes::Bytes> {
    match c.get::<bytes::Bytes>(key).await {
        Ok(v) => v,
        Err(e) if !here && e.status() == Some(twincache_client::Status::Moved) => None,
        Err(e) => panic!("{key}: {e}"),
    }
}

/// Timeouts for a `redis` crate connection patient enough for debug builds on a busy
/// machine: the crate's own defaults (1 s to connect, 500 ms for an answer) failed a TLS
/// connect in a CI run while the machine was loaded.
pub fn patient_redis() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(20)))
        .set_response_timeout(Some(Duration::from_secs(20)))
}
