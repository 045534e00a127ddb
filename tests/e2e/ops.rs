//! Operating the cluster over HTTP: `/metrics` scraped by a real Prometheus server and
//! checked by `promtool`, health and readiness, the key interface, the status page in
//! headless Chromium, and JSON logs.
//!
//! The tools come from Debian's `prometheus`, `chromium` and `chromium-driver` packages
//! (`.ci/run` installs them when missing).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::RedisServer;
use crate::harness::{Proc, TextConn, ORCHESTRATOR, WORKER};

/// Bounded waits below: generous for a loaded 2-core machine, and each prints what it saw.
const WAIT: Duration = Duration::from_secs(30);

/// A worker with `--http` on a free port.
pub fn http_worker() -> Proc {
    Proc::start(
        WORKER,
        &["--port", "0", "--http", "127.0.0.1:0"].map(String::from),
    )
}

/// Workers and an orchestrator, all with `--http`, ready (its `/ready` answers 200).
pub struct HttpCluster {
    pub workers: Vec<Proc>,
    pub orch: Proc,
}

impl HttpCluster {
    pub async fn start(pairs: usize, extra: &[&str]) -> HttpCluster {
        let workers: Vec<Proc> = (0..pairs * 2).map(|_| http_worker()).collect();
        let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
        let mut flags = vec!["--http", "127.0.0.1:0"];
        flags.extend_from_slice(extra);
        let orch = Proc::orchestrator(&addrs, &flags);
        let cluster = HttpCluster { workers, orch };
        let ready = url(&cluster.orch, "/ready");
        wait_for("the orchestrator's /ready to answer 200", || async {
            let (status, body) = get(&ready).await;
            (status == 200, format!("{status} {body}"))
        })
        .await;
        cluster
    }

    pub fn http(&self) -> SocketAddr {
        self.orch.http.expect("orchestrator started with --http")
    }
}

pub fn url(p: &Proc, path: &str) -> String {
    format!("http://{}{path}", p.http.expect("started with --http"))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// GET `url`: status and body (status 0 and the error if it could not be asked).
pub async fn get(url: &str) -> (u16, String) {
    match client().get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Polls `check` (which says whether it holds, and what it saw) until it holds, for at
/// most [`WAIT`]; panics with the last thing it saw.
pub async fn wait_for<F, Fut>(what: &str, check: F) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, String)>,
{
    crate::harness::poll_until(what, WAIT, Duration::from_millis(200), check).await
}

/// A port free a moment ago, for tools that cannot announce one they picked.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A helper process (Prometheus, chromedriver), killed on drop.
struct Tool {
    child: Child,
    name: &'static str,
    log: std::path::PathBuf,
}

impl Tool {
    fn start(name: &'static str, bin: &str, args: &[String], dir: &std::path::Path) -> Tool {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e} (apt-get install -y prometheus chromium chromium-driver; .ci/run does)")
            });
        Tool { child, name, log }
    }

    fn log_text(&self) -> String {
        format!(
            "{} log:\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "twincache-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `promtool check metrics` on `text`; its complaints if any.
fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install -y prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool finished");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `s` percent-encoded for a URL query.
fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of a PromQL query that yields one sample (None if it yields none).
async fn prom_query(prom: SocketAddr, query: &str) -> Option<f64> {
    let url = format!("http://{prom}/api/v1/query?query={}", encode_query(query));
    let (status, body) = get(&url).await;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_counts_of_a_known_load_and_promtool_accepts_both_outputs() {
    let cluster = HttpCluster::start(1, &[]).await;
    // The known load: 40 writes, then 25 reads that hit and 15 that miss.
    let mut conn = TextConn::connect(cluster.orch.addr).await;
    for i in 0..40 {
        assert_eq!(conn.request(&format!("set||m:{i}||v{i}")).await, "0||");
    }
    for i in 0..25 {
        assert_eq!(
            conn.request(&format!("get||m:{i}")).await,
            format!("0||v{i}")
        );
    }
    for i in 0..15 {
        assert_eq!(
            conn.request(&format!("get||absent:{i}")).await,
            "2||key not found"
        );
    }
    assert!(conn.request("bogus||x").await.starts_with("3||"));

    // Both outputs pass promtool's lint.
    for p in [&cluster.orch, &cluster.workers[0]] {
        let (status, text) = get(&url(p, "/metrics")).await;
        assert_eq!(status, 200);
        promtool_check(&text).unwrap_or_else(|e| panic!("promtool: {e}\non:\n{text}"));
    }

    // A real Prometheus scraping the orchestrator and both workers every second.
    let dir = TempDir::new("prometheus");
    let port = free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
         - job_name: orchestrator\n    static_configs:\n      - targets: ['{}']\n  \
         - job_name: workers\n    static_configs:\n      - targets: ['{}', '{}']\n",
        cluster.http(),
        cluster.workers[0].http.unwrap(),
        cluster.workers[1].http.unwrap()
    );
    std::fs::write(dir.0.join("prometheus.yml"), config).unwrap();
    let prom = Tool::start(
        "prometheus",
        "prometheus",
        &[
            format!("--config.file={}", dir.0.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.0.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        &dir.0,
    );
    let prom_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let expected: &[(&str, f64)] = &[
        (
            r#"redis_commands_total{job="orchestrator",cmd="set",protocol="text"}"#,
            40.0,
        ),
        (
            r#"redis_commands_total{job="orchestrator",cmd="get",protocol="text"}"#,
            40.0,
        ),
        (
            r#"twincache_errors_total{job="orchestrator",code="invalid_command",protocol="text"}"#,
            1.0,
        ),
        (
            r#"twincache_command_duration_seconds_count{job="orchestrator",cmd="set"}"#,
            40.0,
        ),
        (r#"sum(redis_keyspace_hits_total{job="workers"})"#, 25.0),
        (r#"sum(redis_keyspace_misses_total{job="workers"})"#, 15.0),
        (r#"sum(redis_db_keys{job="workers"})"#, 80.0),
        (
            r#"sum(redis_keyspace_hits_total{job="orchestrator"})"#,
            25.0,
        ),
        (
            r#"sum(twincache_worker_state{job="orchestrator",state="in_sync"})"#,
            2.0,
        ),
        (r#"twincache_ready{job="orchestrator"}"#, 1.0),
        (
            r#"twincache_worker_connections_backed_up{job="orchestrator"}"#,
            0.0,
        ),
        (r#"count(up{job="workers"} == 1)"#, 2.0),
    ];
    wait_for("Prometheus to have scraped the load", || async {
        let mut seen = String::new();
        let mut all = true;
        for (q, want) in expected {
            let got = prom_query(prom_addr, q).await;
            all &= got == Some(*want);
            seen += &format!("{q} = {got:?} (want {want})\n");
        }
        (all, format!("{seen}{}", prom.log_text()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_the_key_interface() {
    let mut cluster = HttpCluster::start(1, &["--max-frame", "4KiB"]).await;
    let http = client();
    let base = format!("http://{}", cluster.http());
    let key_url = |k: &str| format!("{base}/v1/keys/{k}");

    // Health and readiness, on the orchestrator and on the workers.
    for p in [&cluster.orch, &cluster.workers[0], &cluster.workers[1]] {
        assert_eq!(get(&url(p, "/health")).await.0, 200);
        assert_eq!(get(&url(p, "/ready")).await.0, 200);
    }

    // Binary-safe keys and values: a zero byte, a slash, a newline, bytes not UTF-8.
    let value = b"line one\nline two\0\xff||".to_vec();
    let r = http
        .put(key_url("bin%00key%2Fx%FF"))
        .body(value.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http.get(key_url("bin%00key%2Fx%FF")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &value[..]);

    // Routed like every other request: the text protocol sees what HTTP wrote, and back.
    let r = http
        .put(key_url("shared"))
        .body("from-http")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let mut conn = TextConn::connect(cluster.orch.addr).await;
    assert_eq!(conn.request("get||shared").await, "0||from-http");
    assert_eq!(conn.request("set||shared||from-text").await, "0||");
    let (status, body) = get(&key_url("shared")).await;
    assert_eq!((status, body.as_str()), (200, "from-text"));

    // Delete, then absent.
    let r = http.delete(key_url("shared")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get(&key_url("shared")).await.0, 404);
    let r = http.delete(key_url("shared")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // A time to live.
    let r = http
        .put(key_url("brief?ttl=1"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get(&key_url("brief")).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(get(&key_url("brief")).await.0, 404, "expired after its ttl");

    // Bad requests get a clear 4xx.
    let bad = [
        (key_url(""), 400, "empty key"),
        (key_url("a%zz"), 400, "percent-encoding"),
        (key_url("a?ttl=0"), 400, "ttl"),
        (key_url("a?ttl=soon"), 400, "ttl"),
        (key_url("a?color=red"), 400, "unknown parameter"),
    ];
    for (u, code, says) in &bad {
        let r = http.put(u).body("v").send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, *code, "{u}: {text}");
        assert!(text.contains(says), "{u}: {text}");
    }
    let r = http
        .put(key_url("big"))
        .body(vec![b'x'; 8192])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "a body over --max-frame");
    let r = http.post(key_url("a")).body("v").send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(get(&format!("{base}/nothing/here")).await.0, 404);

    // Both workers of the pair gone: 503 with a message, and /ready names the pair.
    for w in &mut cluster.workers {
        w.kill();
    }
    let (status, body) = get(&key_url("bin%00key%2Fx%FF")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("reachable"), "{body}");
    wait_for("/ready to answer 503 naming pair0", || async {
        let (status, body) = get(&format!("{base}/ready")).await;
        (
            status == 503 && body.contains("pair0"),
            format!("{status} {body}"),
        )
    })
    .await;
}

/// A WebDriver session with headless Chromium, through chromedriver's HTTP API.
struct Browser {
    driver: SocketAddr,
    session: String,
    _tool: Tool,
    _dir: TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let dir = TempDir::new("chromium");
        let port = free_port();
        let tool = Tool::start(
            "chromedriver",
            "chromedriver",
            &[format!("--port={port}")],
            &dir.0,
        );
        let driver: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for("chromedriver to start", || async {
            let (status, body) = get(&format!("http://{driver}/status")).await;
            (
                status == 200 && body.contains("\"ready\":true"),
                format!("{status} {body}"),
            )
        })
        .await;
        let profile = dir.0.join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1200,800",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let resp: Value = client()
            .post(format!("http://{driver}/session"))
            .timeout(Duration::from_secs(60))
            .json(&caps)
            .send()
            .await
            .expect("new webdriver session")
            .json()
            .await
            .expect("session answer");
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {resp}\n{}", tool.log_text()))
            .to_string();
        Browser {
            driver,
            session,
            _tool: tool,
            _dir: dir,
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("http://{}/session/{}/{path}", self.driver, self.session);
        let resp = client().post(url).json(&body).send().await;
        match resp {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(e) => json!({ "error": e.to_string() }),
        }
    }

    async fn open(&self, url: &str) {
        let r = self.command("url", json!({ "url": url })).await;
        assert!(r["value"].is_null(), "navigation failed: {r}");
    }

    /// Runs `script` in the page; what it returned.
    async fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
            .await["value"]
            .clone()
    }
}

impl Drop for Browser {
    /// Ends the session, which closes Chromium (killing chromedriver alone would leave it
    /// running). Blocking and bounded: a drop cannot await.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.driver, Duration::from_secs(2))
        else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.session, self.driver
        );
        if s.write_all(request.as_bytes()).is_ok() {
            let _ = s.read_to_end(&mut Vec::new());
        }
    }
}

/// What the page shows for each worker: `addr=state` lines, as rendered.
const PAGE_STATES: &str = "return Array.from(document.querySelectorAll('[data-worker]'))\
    .map(e => e.dataset.worker + '=' + e.dataset.state + ' ' + e.innerText.replace(/\\s+/g, ' '))\
    .join('\\n') + '\\nheader: ' + document.querySelector('header').innerText.replace(/\\s+/g, ' ');";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_killed_worker_down_then_back_in_sync() {
    let mut cluster = HttpCluster::start(2, &[]).await;
    // Some data, so the returning worker has something to resync.
    let mut conn = TextConn::connect(cluster.orch.addr).await;
    for i in 0..200 {
        assert_eq!(conn.request(&format!("set||p:{i}||value {i}")).await, "0||");
    }
    let browser = Browser::start().await;
    browser.open(&format!("http://{}/", cluster.http())).await;
    let addrs: Vec<String> = cluster.workers.iter().map(|w| w.addr.to_string()).collect();
    let shows = |want: Vec<String>| {
        let browser = &browser;
        async move {
            let seen = browser.eval(PAGE_STATES).await;
            let seen = seen.as_str().unwrap_or_default().to_string();
            (want.iter().all(|w| seen.contains(w.as_str())), seen)
        }
    };
    let all_in_sync: Vec<String> = addrs.iter().map(|a| format!("{a}=in_sync")).collect();
    let seen = wait_for("the page to show every worker in sync", || {
        shows(all_in_sync.clone())
    })
    .await;
    assert!(seen.contains("header: twincache ready"), "{seen}");

    // Kill a worker: the page, without being reloaded, shows it down.
    let victim = cluster.workers[2].addr;
    cluster.workers[2].kill();
    wait_for("the page to show the killed worker down", || {
        shows(vec![format!("{victim}=down")])
    })
    .await;

    // Restart it on the same port: it resyncs from its partner and shows in sync again.
    cluster.workers[2] = Proc::start(
        WORKER,
        &[
            "--port".into(),
            victim.port().to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
        ],
    );
    let seen = wait_for("the page to show it back in sync", || {
        shows(all_in_sync.clone())
    })
    .await;
    assert!(seen.contains("header: twincache ready"), "{seen}");
    assert_eq!(
        browser
            .eval("return document.getElementById('error').style.display")
            .await,
        json!("none"),
        "the page reached the orchestrator throughout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_state_changes_and_never_keys_or_values() {
    let json = |bin: &str, extra: &[String]| {
        let mut args: Vec<String> = ["--log-format", "json"].map(String::from).to_vec();
        args.extend_from_slice(extra);
        Proc::start(bin, &args)
    };
    let mut workers = vec![
        json(WORKER, &["--port".into(), "0".into()]),
        json(WORKER, &["--port".into(), "0".into()]),
    ];
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".into()];
    for w in &workers {
        args.push(w.addr.ip().to_string());
        args.push(w.addr.port().to_string());
    }
    let orch = json(ORCHESTRATOR, &args);
    let mut conn = TextConn::connect(orch.addr).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = conn
            .request("set||secret-key-4242||secret-value-4242")
            .await;
        if r == "0||" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never took a write: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workers[1].kill();
    let victim = workers[1].addr.to_string();
    let orch_log = wait_for("the orchestrator to log the worker down", || async {
        let log = orch.log_text();
        let found = log.lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["fields"]["worker"] == json!(victim) && v["fields"]["to"] == json!("down")
            })
        });
        (found, log)
    })
    .await;
    for (name, log) in [
        ("orchestrator", orch_log),
        ("worker", workers[0].log_text()),
    ] {
        assert!(!log.is_empty(), "{name} logged nothing");
        for line in log.lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: not one JSON object per line ({e}): {line}"));
            assert!(v["timestamp"].is_string(), "{line}");
            assert!(v["level"].is_string(), "{line}");
            assert!(v["fields"]["message"].is_string(), "{line}");
        }
        assert!(
            !log.contains("secret-key") && !log.contains("secret-value"),
            "{name} logged a key or a value:\n{log}"
        );
    }
}

/// The sum of a family's samples in a classic-format `/metrics` answer whose labels contain
/// `label` (e.g. `tier="source"`).
fn sum_samples(text: &str, family: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_mode_reads_by_tier_in_metrics_and_status() {
    let (source, destination) = (RedisServer::start(), RedisServer::start());
    let (source, destination, _servers) = (source.url(), destination.url(), (source, destination));
    let mut con = loop {
        let client = redis::Client::open(source.as_str()).unwrap();
        if let Ok(con) = client.get_multiplexed_async_connection().await {
            break con;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _: () = redis::AsyncCommands::set(&mut con, "old", "from-source")
        .await
        .unwrap();
    let args = [
        "--port",
        "0",
        "--http",
        "127.0.0.1:0",
        "--source",
        &source,
        "--destination",
        &destination,
    ]
    .map(String::from);
    let workers = [Proc::start(WORKER, &args), Proc::start(WORKER, &args)];
    let orch = Proc::orchestrator(
        &[workers[0].addr, workers[1].addr],
        &["--http", "127.0.0.1:0"],
    );
    let ready = url(&orch, "/ready");
    wait_for("the adapter tier to be ready", || async {
        let (status, body) = get(&ready).await;
        (status == 200, format!("{status} {body}"))
    })
    .await;
    let mut conn = TextConn::connect(orch.addr).await;
    assert_eq!(conn.request("get||old").await, "0||from-source"); // copied from the source
    assert_eq!(conn.request("get||old").await, "0||from-source"); // now cached
    assert_eq!(conn.request("get||nowhere").await, "2||key not found");

    let metrics = url(&orch, "/metrics");
    wait_for(
        "the orchestrator's metrics to count reads by tier",
        || async {
            let text = get(&metrics).await.1;
            let tier = |t: &str| {
                sum_samples(
                    &text,
                    "twincache_adapter_reads_total",
                    &format!("tier=\"{t}\""),
                )
            };
            let seen = format!(
                "source {} cache {} not_found {}",
                tier("source"),
                tier("cache"),
                tier("not_found")
            );
            (
                tier("source") == 1.0 && tier("cache") >= 1.0 && tier("not_found") == 1.0,
                seen,
            )
        },
    )
    .await;
    let status: Value = serde_json::from_str(&get(&url(&orch, "/v1/status")).await.1).unwrap();
    assert_eq!(status["mode"], json!("adapter"), "{status}");
    let tiers: f64 = status["pairs"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["adapter"]["source"].as_f64())
        .sum();
    assert_eq!(tiers, 1.0, "{status}");
    // The worker's own /metrics has the same family.
    let own: f64 = [&workers[0], &workers[1]]
        .iter()
        .map(|w| async move { get(&url(w, "/metrics")).await.1 })
        .collect::<futures_util::future::JoinAll<_>>()
        .await
        .iter()
        .map(|t| sum_samples(t, "twincache_adapter_reads_total", "tier=\"source\""))
        .sum();
    assert_eq!(own, 1.0);
}

/// With a password, the key interface takes HTTP basic auth: 401 (with the challenge)
/// without or with wrong credentials, the value with the right ones. Failed logins on one
/// connection are answered later and later, as AUTH's on a session, and the tenth closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_interface_takes_basic_auth_and_slows_down_guessing() {
    let pass = crate::harness::TempFile::with("hunter2\n");
    let cluster = HttpCluster::start(1, &["--requirepass-file", &pass.arg()]).await;
    let key = url(&cluster.orch, "/v1/keys/k");
    let http = client();
    let put = http
        .put(&key)
        .basic_auth("default", Some("hunter2"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 204);
    let anonymous = http.get(&key).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    anonymous.bytes().await.unwrap();
    let read = http
        .get(&key)
        .basic_auth("default", Some("hunter2"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status().as_u16(), 200);
    assert_eq!(read.text().await.unwrap(), "v");

    // Ten guesses on one keep-alive connection: 100 ms, doubling to 2 s, then closed.
    let started = Instant::now();
    let mut closing = Vec::new();
    for n in 1..=10 {
        let guess = http
            .get(&key)
            .basic_auth("default", Some("guess"))
            .send()
            .await
            .unwrap();
        assert_eq!(guess.status().as_u16(), 401, "guess {n}");
        closing.push(
            guess
                .headers()
                .get("connection")
                .is_some_and(|v| v == "close"),
        );
        // Read whole, so that the next guess goes on the same connection.
        guess.bytes().await.unwrap();
        if n == 3 {
            assert!(
                started.elapsed() >= Duration::from_millis(700),
                "{:?}",
                started.elapsed()
            );
        }
    }
    assert_eq!(closing.iter().filter(|&&c| c).count(), 1, "{closing:?}");
    assert!(
        closing[9],
        "the tenth failure closes the connection: {closing:?}"
    );
}

/// A client's pipelined SETs reach the workers in batches once the workers said they take
/// them, and every value reads back (`twincache_batched_writes_total` counts them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sets_travel_in_batches() {
    let cluster = HttpCluster::start(1, &[]).await;
    let metrics = url(&cluster.orch, "/metrics");
    let mut conn = crate::harness::RespConn::connect(cluster.orch.addr).await;
    let started = Instant::now();
    for round in 0u32.. {
        let mut out = bytes::BytesMut::new();
        for i in 0..32 {
            let (k, v) = (format!("b{i}"), format!("v{round}:{i}"));
            crate::harness::encode(&[b"SET", k.as_bytes(), v.as_bytes()], &mut out);
        }
        conn.send_raw(&out).await;
        for _ in 0..32 {
            assert_eq!(&conn.reply().await[..], b"+OK\r\n");
        }
        for i in 0..32 {
            let want = format!("v{round}:{i}");
            let got = conn.call(&[b"GET", format!("b{i}").as_bytes()]).await;
            assert_eq!(got, format!("${}\r\n{want}\r\n", want.len()).as_bytes());
        }
        let (_, body) = get(&metrics).await;
        let batched = body
            .lines()
            .find_map(|l| l.strip_prefix("twincache_batched_writes_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if batched >= 32 {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "no batched SETs after {round} rounds"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
