//! `worker --http ADDR`: metrics and health, for Prometheus and probes.
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | this worker's counters (the families of `twincache_ops::workers`) |
//! | `GET /health` | 200 while the process serves |
//! | `GET /ready` | 200 once the worker holds its pair's data (refilled from its partner or adopted by an orchestrator), 503 before |
//!
//! The metrics are read from the same `stats` and `status` texts an orchestrator asks for,
//! so the worker's and the orchestrator's `/metrics` always agree on names and meanings.
//! Data is served only on the worker's own port, never here.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use twincache_ops::metrics::{render, Scrape};
use twincache_ops::workers::{write_families, WorkerSample};
use twincache_protocol::frame::{Op, Request};

use crate::server::{handle, Node};

/// The routes above.
pub fn app(node: Arc<Node>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(twincache_ops::http::health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(node)
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    if node.sync.synced() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: this worker does not hold its pair's data yet (it waits for an \
             orchestrator to resync it from its partner, or to adopt it with its partner)\n",
        )
            .into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    twincache_ops::http::metrics_response(&headers, render(Exposition(node)))
}

/// What this worker's `stats` or `status` answer says (a status request without a claim
/// changes nothing).
fn text(node: &Node, op: Op) -> String {
    let resp = handle(node, Request::new(op, Bytes::new()));
    String::from_utf8_lossy(&resp.payload).into_owned()
}

struct Exposition(Arc<Node>);

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exposition")
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let node = &self.0;
        let mut s = Scrape::new(&mut enc);
        s.gauges(
            "twincache_worker_info",
            "Always 1; the labels say which build and mode this worker runs, and its boot id \
             (new at every start).",
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    (
                        "mode",
                        if node.adapter.is_some() {
                            "adapter"
                        } else {
                            "replicated"
                        }
                        .to_string(),
                    ),
                    ("boot_id", format!("{:016x}", node.sync.boot_id)),
                ],
                1.0,
            )],
        )?;
        s.gauge(
            "redis_uptime_in_seconds",
            "Seconds since the worker started.",
            node.started.elapsed().as_secs_f64().floor(),
        )?;
        let (stats, status) = (text(node, Op::Stats), text(node, Op::Status));
        write_families(
            &mut s,
            &[WorkerSample {
                labels: Vec::new(),
                stats: Some(&stats),
                status: Some(&status),
            }],
        )
    }
}
