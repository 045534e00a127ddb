//! `orchestrator --http ADDR`: metrics, health, readiness, a key interface and a status page.
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus exposition: this orchestrator's counters, and every worker's from the [`Observer`]'s last poll |
//! | `GET /health` | 200 while the process serves |
//! | `GET /ready` | 200 when every pair has a worker in sync, else 503 naming the pairs that do not |
//! | `GET /v1/status` | JSON: every pair and worker, for the status page |
//! | `GET /` | the status page (self-contained HTML, refreshing itself from `/v1/status`) |
//! | `GET`, `PUT`, `DELETE /v1/keys/{key}` | the key interface, routed like every other request |
//!
//! Keys in the path are percent-decoded bytes, so any key can be named (`%2F` for `/`,
//! `%00` for a zero byte); values are the raw body. Bodies are limited to `--max-frame`.
//! What a connection may cost is bounded by `twincache_ops::http`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use serde_json::{json, Value};
use twincache_ops::metrics::{render, Scrape};
use twincache_ops::workers::{write_families, WorkerSample};
use twincache_protocol::budget::{Account, Budget};
use twincache_protocol::frame::{Op, Request};
use twincache_protocol::Status;

use crate::auth::{Access, Authenticator, Denied, Who};
use crate::cluster::{Mode, Origin, Router, WorkerState};
use crate::metrics::{Cmd, ErrorCode, Metrics, Proto};
use crate::observe::Observer;

/// The status page: one file, inline CSS and script, no external resources.
const STATUS_PAGE: &str = include_str!("status.html");

/// Every state a worker can be in, for the one-gauge-per-state family.
const STATES: [WorkerState; 6] = [
    WorkerState::Unknown,
    WorkerState::InSync,
    WorkerState::Down,
    WorkerState::Stale,
    WorkerState::Resyncing,
    WorkerState::Misconfigured,
];

/// What the HTTP handlers share.
pub struct HttpState {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub observer: Arc<Observer>,
    /// Memory for connection buffers: large values read through the key interface are
    /// charged to it, as a client session's are.
    pub budget: Arc<Budget>,
    /// Largest value a `PUT` may carry (`--max-frame`).
    pub max_body: usize,
    /// Most memory one request's answer may hold (`--max-client-buffer`).
    pub max_request_memory: usize,
    /// Spreads requests over the worker connections, as sessions are.
    requests: AtomicUsize,
    /// The users the key interface authenticates (HTTP basic auth), as AUTH does.
    pub auth: Arc<Authenticator>,
    /// Clients authenticate by certificate alone (see `Config::certificates_only`): the key
    /// interface, which no certificate reaches, refuses every request.
    pub certificates_only: bool,
}

impl HttpState {
    pub fn new(
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        observer: Arc<Observer>,
        budget: Arc<Budget>,
        max_body: usize,
        max_request_memory: usize,
        auth: Arc<Authenticator>,
    ) -> HttpState {
        HttpState {
            router,
            metrics,
            observer,
            budget,
            max_body,
            max_request_memory,
            requests: AtomicUsize::new(0),
            auth,
            certificates_only: false,
        }
    }
}

/// The routes above.
pub fn app(state: Arc<HttpState>) -> axum::Router {
    let max_body = state.max_body;
    axum::Router::new()
        .route("/", get(status_page))
        .route("/health", get(twincache_ops::http::health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route(
            "/v1/keys/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route("/v1/keys/", axum::routing::any(no_key))
        .route("/v1/keys", axum::routing::any(no_key))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn status_page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(STATUS_PAGE))
}

/// The pairs with no worker in sync, as `pair<n> (<worker>=<state> <worker>=<state>)`.
fn unready_pairs(router: &Router) -> Vec<String> {
    router
        .pairs()
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.workers.iter().any(|w| w.state() == WorkerState::InSync))
        .map(|(n, p)| {
            let [a, b] = &p.workers;
            format!(
                "pair{n} ({}={} {}={})",
                a.addr,
                a.state().name(),
                b.addr,
                b.state().name()
            )
        })
        .collect()
}

async fn ready(State(s): State<Arc<HttpState>>) -> Response {
    if s.router.mode().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the workers' mode is not known yet (no worker has answered)\n",
        )
            .into_response();
    }
    let unready = unready_pairs(&s.router);
    if unready.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no worker in sync in {}\n", unready.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let text = render(Exposition(s));
    twincache_ops::http::metrics_response(&headers, text)
}

/// Everything `/metrics` shows, read at scrape time.
struct Exposition(Arc<HttpState>);

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exposition")
    }
}

fn mode_name(mode: Option<Mode>) -> &'static str {
    match mode {
        Some(Mode::Replicated) => "replicated",
        Some(Mode::Adapter) => "adapter",
        None => "unknown",
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let st = &self.0;
        let router = &st.router;
        let mut s = Scrape::new(&mut enc);
        s.gauges(
            "twincache_orchestrator_info",
            "Always 1; the labels say which build, mode and node id this orchestrator runs.",
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("mode", mode_name(router.mode()).to_string()),
                    ("node_id", router.clock.node().to_string()),
                ],
                1.0,
            )],
        )?;
        s.gauge(
            "redis_uptime_in_seconds",
            "Seconds since the orchestrator started.",
            st.metrics.started.elapsed().as_secs_f64().floor(),
        )?;
        s.gauge(
            "twincache_pairs",
            "Worker pairs this orchestrator routes to.",
            router.pairs().len() as f64,
        )?;
        s.gauge(
            "twincache_ready",
            "1 when every pair has a worker in sync (what /ready answers 200 for), else 0.",
            f64::from(u8::from(
                router.mode().is_some() && unready_pairs(router).is_empty(),
            )),
        )?;
        s.gauge(
            "twincache_worker_connections_backed_up",
            "Worker connections whose outbox holds more than half its limit now: while not 0, clients with requests in flight wait for them before sending more.",
            router.backlog() as f64,
        )?;
        st.metrics.write(&mut s)?;
        router.stats.write(&mut s)?;
        let mut states = Vec::new();
        let mut mismatch = Vec::new();
        let mut samples = Vec::new();
        let mut views = Vec::new();
        for (n, pair) in router.pairs().iter().enumerate() {
            for w in &pair.workers {
                let labels = vec![("pair", n.to_string()), ("worker", w.addr.clone())];
                let now = w.state();
                for state in STATES {
                    let mut l = labels.clone();
                    l.push(("state", state.name().to_string()));
                    states.push((l, f64::from(u8::from(now == state))));
                }
                views.push((labels, st.observer.worker(&w.addr)));
            }
            mismatch.push((
                vec![("pair", n.to_string())],
                f64::from(u8::from(pair.key_mismatch())),
            ));
        }
        s.gauges(
            "twincache_worker_state",
            "1 for the state each worker is in (unknown, in_sync, down, stale, resyncing, \
             misconfigured), 0 for the others.",
            states,
        )?;
        s.gauges(
            "twincache_pair_key_mismatch",
            "1 while the two workers of a pair use different encryption keys.",
            mismatch,
        )?;
        for (labels, view) in &views {
            samples.push(WorkerSample {
                labels: labels.clone(),
                stats: view.stats.as_deref(),
                status: view.status.as_deref(),
            });
        }
        write_families(&mut s, &samples)
    }
}

/// `GET /v1/status`: the cluster at a glance, for the status page.
async fn status(State(s): State<Arc<HttpState>>) -> Response {
    let router = &s.router;
    let num = |v: Option<&str>| -> Value {
        v.and_then(|v| v.parse::<f64>().ok())
            .map_or(Value::Null, Value::from)
    };
    let pairs: Vec<Value> = router
        .pairs()
        .iter()
        .enumerate()
        .map(|(n, pair)| {
            let workers: Vec<Value> = pair
                .workers
                .iter()
                .map(|w| {
                    let v = s.observer.worker(&w.addr);
                    let adapter = v.stat("adapter_writes").map(|_| {
                        json!({
                            "cache": num(v.stat("adapter_cache_hits")),
                            "destination": num(v.stat("adapter_destination_hits")),
                            "source": num(v.stat("adapter_copied_from_source")),
                            "not_found": num(v.stat("adapter_not_found")),
                            "writes": num(v.stat("adapter_writes")),
                            "passthrough": num(v.stat("adapter_passthrough")),
                            "deleted_from_source": num(v.stat("adapter_deleted_from_source")),
                            "errors": num(v.stat("adapter_errors")),
                        })
                    });
                    json!({
                        "addr": w.addr,
                        "state": w.state().name(),
                        "answering": v.stats.is_some(),
                        "keys": num(v.stat("keys")),
                        "memory_bytes": num(v.stat("bytes")),
                        "max_memory_bytes": num(v.stat("max_memory")),
                        "compression_ratio": num(v.stat("compression_ratio")),
                        "hit_rate": v.hit_rate,
                        "ops_per_sec": v.ops_per_sec,
                        "evicted": num(v.stat("evicted")),
                        "expired": num(v.stat("expired")),
                        "resync": {
                            "phase": v.state_field("resync"),
                            "entries_done": num(v.state_field("resync_entries_done")),
                            "entries_expected": num(v.state_field("resync_entries_expected")),
                            "received_bytes": num(v.state_field("resync_received_bytes")),
                            "completed": num(v.state_field("resyncs_completed")),
                            "error": v.state_field("resync_error").filter(|e| !e.is_empty()),
                        },
                        "adapter": adapter,
                    })
                })
                .collect();
            json!({
                "pair": n,
                "ready": pair.workers.iter().any(|w| w.state() == WorkerState::InSync),
                "key_mismatch": pair.key_mismatch(),
                "workers": workers,
            })
        })
        .collect();
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mode": mode_name(router.mode()),
        "node_id": router.clock.node(),
        "uptime_seconds": s.metrics.started.elapsed().as_secs(),
        "ready": router.mode().is_some() && unready_pairs(router).is_empty(),
        "connected_clients": s.metrics.connected_clients(),
        "ops_per_sec": s.observer.ops_per_sec(),
        "pairs": pairs,
    });
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// Why the key interface is closed when clients authenticate by certificate alone.
const CERTIFICATES_ONLY: &str = "the key interface is closed: clients of this orchestrator \
    authenticate with a TLS certificate, which HTTP does not carry; give users passwords \
    (--requirepass-file or --users-file) to use it";

/// Checks a request's credentials (`Authorization: Basic`, the same users and passwords as
/// AUTH) when clients must authenticate: 401 without or with wrong ones, 403 for a user that
/// may not `access` keys, and 403 for everyone when clients authenticate by certificate alone.
async fn authorize(
    s: &HttpState,
    login: &Login,
    headers: &HeaderMap,
    access: Access,
) -> Result<(), Rejection> {
    if s.certificates_only {
        return Err(reject(StatusCode::FORBIDDEN, CERTIFICATES_ONLY));
    }
    if !s.auth.required() {
        return Ok(());
    }
    let unauthorized = || {
        Rejection::with_challenge(
            "authentication required: HTTP basic auth with a user and password",
        )
    };
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .ok_or_else(unauthorized)?;
    let credentials = zeroize::Zeroizing::new(credentials);
    let (user, password) = credentials.split_once(':').ok_or_else(unauthorized)?;
    let who = &login.0;
    let user = Some(user).filter(|u| !u.is_empty());
    match s.auth.authenticate(who, user, password.as_bytes()).await {
        Ok(()) => {}
        Err(Denied::TooManyFailures) => return Err(Rejection::closing(unauthorized())),
        Err(_) => return Err(unauthorized()),
    }
    if !who.may(access) {
        return Err(reject(
            StatusCode::FORBIDDEN,
            format!("user {} may not do this", who.user()),
        ));
    }
    Ok(())
}

/// The key interface's logins on one HTTP connection: failed ones are answered later and
/// later, and the tenth closes the connection (successful ones in between do not reset the
/// count), as on a client session (`auth::Who`).
#[derive(Clone, Default)]
pub struct Login(Arc<Who>);

/// A 4xx or 5xx answer with a one-line message (and, for a 401, the challenge); `close`
/// ends the connection after it.
#[derive(Debug)]
struct Rejection(StatusCode, String, bool);

impl Rejection {
    fn with_challenge(msg: &str) -> Rejection {
        Rejection(StatusCode::UNAUTHORIZED, msg.to_string(), false)
    }

    fn closing(self) -> Rejection {
        Rejection(self.0, self.1, true)
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let Rejection(status, mut msg, close) = self;
        msg.push('\n');
        let mut resp = if status == StatusCode::UNAUTHORIZED {
            let challenge = [(header::WWW_AUTHENTICATE, r#"Basic realm="twincache""#)];
            (status, challenge, msg).into_response()
        } else {
            (status, msg).into_response()
        };
        if close {
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

fn reject(status: StatusCode, msg: impl Into<String>) -> Rejection {
    Rejection(status, msg.into(), false)
}

async fn no_key() -> Rejection {
    reject(StatusCode::BAD_REQUEST, "empty key: use /v1/keys/<key>")
}

/// The key named by the path after `/v1/keys/`, percent-decoded to bytes.
fn key_of(uri: &Uri) -> Result<Bytes, Rejection> {
    let raw = uri.path().strip_prefix("/v1/keys/").unwrap_or("");
    let key = percent_decode(raw.as_bytes()).ok_or_else(|| {
        reject(
            StatusCode::BAD_REQUEST,
            "malformed percent-encoding in the key (use %XX with two hex digits)",
        )
    })?;
    if key.is_empty() {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "empty key: use /v1/keys/<key>",
        ));
    }
    Ok(Bytes::from(key))
}

/// `%XX` to the byte it names; everything else as it is. `None` for a `%` not followed by
/// two hex digits.
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The time to live `?ttl=SECONDS` asks for, in milliseconds (0 without one).
fn ttl_of(uri: &Uri) -> Result<u64, Rejection> {
    let Some(query) = uri.query().filter(|q| !q.is_empty()) else {
        return Ok(0);
    };
    let mut ttl = 0;
    for param in query.split('&') {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if name != "ttl" {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown parameter `{}`: only ?ttl=SECONDS is accepted",
                    name.chars().take(64).collect::<String>()
                ),
            ));
        }
        ttl = value
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .and_then(|s| s.checked_mul(1000))
            .ok_or_else(|| {
                reject(
                    StatusCode::BAD_REQUEST,
                    "ttl must be a whole number of seconds above 0",
                )
            })?;
    }
    Ok(ttl)
}

impl HttpState {
    /// Where this request's worker traffic goes, and the account its answer is charged to.
    fn origin(&self) -> (Origin, usize) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let origin = Origin {
            affinity: n,
            account: Some(Account::new(&self.budget, self.max_request_memory)),
            rmw: None,
        };
        (origin, n)
    }

    /// Counts a key request like a session's, with its latency and error.
    fn count(&self, n: usize, cmd: Cmd, started: Instant, status: Status) {
        let nanos = started.elapsed().as_nanos() as u64;
        self.metrics.answered(n, Proto::Http, cmd, nanos);
        if let Some(code) = ErrorCode::of(status) {
            self.metrics.error(Proto::Http, code);
        }
    }
}

/// The HTTP answer for a worker's answer that is not a success.
fn failure(resp: &twincache_protocol::Response) -> Response {
    failure_of(resp).into_response()
}

fn failure_of(resp: &twincache_protocol::Response) -> Rejection {
    let msg = if resp.payload.is_empty() {
        resp.status.default_message().to_string()
    } else {
        String::from_utf8_lossy(&resp.payload).into_owned()
    };
    let code = match resp.status {
        Status::NotFound => StatusCode::NOT_FOUND,
        Status::ParseError | Status::InvalidCommand => StatusCode::BAD_REQUEST,
        Status::Unavailable | Status::Diverged => StatusCode::SERVICE_UNAVAILABLE,
        Status::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Status::NotApplied | Status::WrongType => StatusCode::CONFLICT,
        Status::NoAuth => StatusCode::UNAUTHORIZED,
        Status::NoPerm => StatusCode::FORBIDDEN,
        Status::Ok | Status::ServerError | Status::Moved => StatusCode::INTERNAL_SERVER_ERROR,
    };
    reject(code, msg)
}

/// The key a request's path names, once its credentials allow `access`.
async fn key_for(
    s: &HttpState,
    login: &Login,
    headers: &HeaderMap,
    uri: &Uri,
    access: Access,
) -> Result<Bytes, Rejection> {
    authorize(s, login, headers, access).await?;
    key_of(uri)
}

async fn get_key(
    State(s): State<Arc<HttpState>>,
    Extension(login): Extension<Login>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let key = match key_for(&s, &login, &headers, &uri, Access::Read).await {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let (origin, n) = s.origin();
    let resp = s.router.get(key, &origin).await;
    s.count(n, Cmd::Get, started, resp.status);
    match resp.status {
        Status::Ok => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            resp.payload,
        )
            .into_response(),
        _ => failure(&resp),
    }
}

async fn put_key(
    State(s): State<Arc<HttpState>>,
    Extension(login): Extension<Login>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let key = key_for(&s, &login, &headers, &uri, Access::Write).await;
    let (key, ttl_ms) = match (key, ttl_of(&uri)) {
        (Ok(k), Ok(t)) => (k, t),
        (Err(r), _) | (_, Err(r)) => return r.into_response(),
    };
    let (origin, n) = s.origin();
    let mut req = Request::new(Op::Set, key);
    req.value = body;
    req.ttl_ms = ttl_ms;
    let resp = s.router.write(req, &origin).await;
    s.count(n, Cmd::Set, started, resp.status);
    match resp.status {
        Status::Ok => StatusCode::NO_CONTENT.into_response(),
        _ => failure(&resp),
    }
}

async fn delete_key(
    State(s): State<Arc<HttpState>>,
    Extension(login): Extension<Login>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let key = match key_for(&s, &login, &headers, &uri, Access::Write).await {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let (origin, n) = s.origin();
    let resp = s.router.write(Request::new(Op::Del, key), &origin).await;
    s.count(n, Cmd::Del, started, resp.status);
    match resp.status {
        Status::Ok => StatusCode::NO_CONTENT.into_response(),
        _ => failure(&resp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_decoded_bytes() {
        assert_eq!(percent_decode(b"a%2Fb%00%ff").unwrap(), b"a/b\0\xff");
        assert_eq!(percent_decode(b"plain+key").unwrap(), b"plain+key");
        assert_eq!(percent_decode(b"bad%2"), None);
        assert_eq!(percent_decode(b"bad%zz"), None);
    }

    #[test]
    fn ttl_parameter() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(ttl_of(&uri("/v1/keys/a")).unwrap(), 0);
        assert_eq!(ttl_of(&uri("/v1/keys/a?ttl=5")).unwrap(), 5000);
        for bad in [
            "?ttl=0",
            "?ttl=-1",
            "?ttl=x",
            "?ttl=",
            "?other=1",
            "?ttl=99999999999999999999",
        ] {
            assert!(ttl_of(&uri(&format!("/v1/keys/a{bad}"))).is_err(), "{bad}");
        }
    }
}
