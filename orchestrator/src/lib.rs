//! The twincache orchestrator: the one address clients talk to.
//!
//! It accepts client connections (text lines, binary frames or RESP on one port, see
//! [`session`]),
//! maps every key to a pair of workers with a stable consistent hash, and forwards the request
//! over persistent multiplexed connections ([`cluster`]): writes to both workers of the pair,
//! reads to one with failover to its partner. It holds no data; restarting it loses nothing.
//!
//! Layout: [`config`] (flags), [`hlc`] (write versions), [`cluster`] (worker links, routing),
//! [`health`] (worker states, health checks, resync), [`identify`] (what answers at a worker
//! address),
//! [`session`] (client connections: sniffing, pipelining, text and binary protocols),
//! [`resp`] (Redis commands), [`metrics`] (INFO and `/metrics` counters), [`observe`]
//! (workers' counters polled for `/metrics` and the status page), [`http`] (`--http`:
//! metrics, health, the key interface, the status page), `local` (an in-process cluster,
//! feature `local`).

pub mod auth;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod health;
pub mod hlc;
pub mod http;
pub mod identify;
#[cfg(feature = "local")]
pub mod local;
pub mod metrics;
pub mod observe;
pub mod resp;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::Either;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use twincache_protocol::server::{accept_loop, Slots};

use cluster::{MembershipConfig, Origin, Router, RouterConfig};
pub use config::Config;
use session::SessionConfig;
use twincache_protocol::budget::Budget;
use twincache_tls::NodeTls;

/// A bound, not yet running, orchestrator.
pub struct Orchestrator {
    listener: TcpListener,
    /// `--http`, bound.
    http: Option<TcpListener>,
    config: Config,
    workers: Vec<String>,
    /// TLS for the client port and/or the worker links, if configured.
    tls: Option<Arc<NodeTls>>,
    /// Ticks on SIGHUP: the cluster file is read again (see [`Orchestrator::reload_on`]).
    reload: Option<tokio::sync::watch::Receiver<u64>>,
    /// The pairs and slot map the state file holds, if it exists.
    kept: Option<twincache_protocol::cluster_map::ClusterMap>,
}

impl Orchestrator {
    /// Checks the worker list, reads the state file, and binds the client port. An error of
    /// kind `InvalidInput` is the configuration's (a state file that cannot be used is one),
    /// any other the port's.
    pub async fn bind(config: Config) -> std::io::Result<Orchestrator> {
        let invalid = |msg| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        let workers = config.worker_addrs().map_err(invalid)?;
        let tls = config.tls().map_err(invalid)?;
        let kept = match config.state_path() {
            Some(path) => cluster::read_state(&path).map_err(invalid)?,
            None => None,
        };
        let listener = TcpListener::bind(config.listen).await?;
        let http = twincache_ops::http::bind(config.http).await?;
        Ok(Orchestrator {
            listener,
            http,
            config,
            workers,
            tls,
            reload: None,
            kept,
        })
    }

    /// Re-reads `--cluster-file` on every tick of `reload` (SIGHUP) and makes the cluster
    /// what it says; without a cluster file the receiver is dropped.
    pub fn reload_on(&mut self, reload: tokio::sync::watch::Receiver<u64>) {
        if self.config.cluster_file.is_some() {
            self.reload = Some(reload);
        }
    }

    /// Its TLS, for reloading the certificates (`NodeTls::reload_on` the SIGHUP channel).
    pub fn tls(&self) -> Option<Arc<NodeTls>> {
        self.tls.clone()
    }

    /// Where `--http` listens, if given.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The workers, as `host:port`, in pairing order.
    pub fn workers(&self) -> &[String] {
        &self.workers
    }

    /// Identifies what answers at every worker address (see [`identify::check_workers`]):
    /// an error for a worker given twice or an orchestrator given as a worker; other
    /// misplaced servers are logged. The future owns what it needs, so it can run while the
    /// orchestrator does (an orchestrator given its own address only answers once it runs);
    /// each probe takes at most `timeout`.
    pub fn check_workers(
        &self,
        timeout: std::time::Duration,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let workers = self.workers.clone();
        let secret = self.config.cluster_secret();
        let tls = self.tls.as_ref().and_then(NodeTls::connector);
        async move { identify::check_workers(&workers, secret?.as_ref(), tls.as_ref(), timeout).await }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Connects to the workers and serves clients until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let c = &self.config;
        let router_config = RouterConfig {
            default_ttl_ms: c.default_ttl.as_millis() as u64,
            connections_per_worker: match c.connections_per_worker {
                0 => match tokio::runtime::Handle::current().runtime_flavor() {
                    tokio::runtime::RuntimeFlavor::CurrentThread => 1,
                    _ => 2,
                },
                n => usize::from(n),
            },
            // Room for the frame header around the largest value a client may send.
            max_frame: c.max_frame.max(c.max_line) as usize + 1024,
            worker_timeout: c.worker_timeout,
            node_id: c.node_id,
            mode: c.mode,
            secret: c.cluster_secret().unwrap_or_else(|e| {
                tracing::error!("{e}");
                None
            }),
            tls: self.tls.as_ref().and_then(NodeTls::connector),
            state_file: c.state_path(),
            backlog: Default::default(),
            membership: MembershipConfig {
                rate: c.move_rate_limit,
                batch: usize::from(c.move_batch_slots),
                from_file: c.cluster_file.is_some(),
                // The port bound, which `--listen` leaves to the system when it says 0.
                listen: self.local_addr(),
            },
        };
        // Worker links outlive the client sessions: they stop once those have drained.
        let links_shutdown = CancellationToken::new();
        // What is wanted at first (`membership::wanted_at_start`): the cluster file, else the
        // pairs as the last run left them. A difference, or a move a stop interrupted, is
        // taken up at once.
        let router = Arc::new(Router::start(
            &self.workers,
            self.kept,
            &router_config,
            &links_shutdown,
        ));
        tracing::info!(
            pairs = router.pairs().len(),
            node_id = router.clock.node(),
            "routing to worker pairs"
        );
        let health = health::HealthConfig {
            interval: c.health_interval,
            timeout: c.health_timeout,
        };
        tokio::spawn(router.clone().monitor(health, links_shutdown.clone()));
        tokio::spawn(router.clone().run_membership(links_shutdown.clone()));
        if let (Some(mut reload), Some(path)) = (self.reload, c.cluster_file.clone()) {
            let router = router.clone();
            tokio::spawn(async move {
                while reload.changed().await.is_ok() {
                    // Reading the file and resolving its names block: off the event loop.
                    let (router, file) = (router.clone(), path.clone());
                    let applied = tokio::task::spawn_blocking(move || {
                        let addrs = config::read_cluster_file(&file)?;
                        let pairs = addrs.len() / 2;
                        router.want(|_| Ok(addrs)).map(|()| pairs)
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                    match applied {
                        Ok(pairs) => {
                            tracing::info!(file = %path.display(), pairs, "cluster file read again")
                        }
                        Err(e) => tracing::error!(
                            "cluster file not applied (the pairs wanted stay as they were): {e}"
                        ),
                    }
                }
            });
        }
        let session_config = Arc::new(SessionConfig {
            idle_timeout: c.idle_timeout,
            max_line: c.max_line as usize,
            max_frame: c.max_frame as usize,
            max_command: c.max_client_buffer as usize,
            pipeline_depth: c.pipeline_depth as usize,
            max_connection_buffer: c.max_client_buffer as usize,
            port: self.listener.local_addr().map(|a| a.port()).unwrap_or(0),
        });
        let budget = Budget::new(c.buffer_budget() as usize);
        tracing::info!(
            max_buffer_memory = budget.limit(),
            max_client_buffer = c.max_client_buffer,
            "memory for client connections"
        );
        let metrics = Arc::new(metrics::Metrics::new(self.http.is_some()));
        let auth = Arc::new(c.authenticator().unwrap_or_else(|e| {
            // Checked at start by `Config::from_args`; embedders get no users.
            tracing::error!("{e}");
            auth::Authenticator::open()
        }));
        if auth.required() {
            tracing::info!("clients must authenticate");
        }
        if let Some(listener) = self.http {
            let observer = Arc::new(observe::Observer::default());
            tokio::spawn(observer.clone().run(
                router.clone(),
                metrics.clone(),
                links_shutdown.clone(),
            ));
            let mut state = http::HttpState::new(
                router.clone(),
                metrics.clone(),
                observer,
                budget.clone(),
                c.max_frame as usize,
                c.max_client_buffer as usize,
                auth.clone(),
            );
            state.certificates_only = c.certificates_only();
            let limits = twincache_ops::http::HttpLimits {
                grace: c.shutdown_grace,
                ..Default::default()
            };
            let app = http::app(Arc::new(state));
            tokio::spawn(twincache_ops::http::serve_with_state(
                listener,
                app,
                limits,
                shutdown.clone(),
                http::Login::default,
            ));
        }
        let refused = metrics.refused.clone();
        let client_tls = self.tls.clone().filter(|tls| tls.serves());
        if client_tls.is_some() {
            tracing::info!("the client port speaks TLS only");
        }
        let mut sessions = 0usize;
        let rmw_tasks = router.rmw_tasks.clone();
        accept_loop(
            self.listener,
            Slots::new(c.max_clients).counting_refusals(refused),
            shutdown,
            c.shutdown_grace,
            move |stream, slot, shutdown| {
                sessions = sessions.wrapping_add(1);
                let ctx = session::Ctx {
                    router: router.clone(),
                    origin: Origin {
                        affinity: sessions,
                        account: None,
                        rmw: Some(Default::default()),
                    },
                    id: sessions,
                    metrics: metrics.clone(),
                    config: session_config.clone(),
                    budget: budget.clone(),
                    who: Arc::new(auth.new_session()),
                    auth: auth.clone(),
                };
                // Each kind of stream runs its own monomorphic copy of the session. The TLS
                // one is boxed: its handshake's state would make every task that much larger.
                let session = match client_tls.clone() {
                    Some(tls) => {
                        Either::Left(Box::pin(session::serve_tls(stream, tls, ctx, shutdown)))
                    }
                    None => Either::Right(session::serve(stream, ctx, shutdown)),
                };
                async move {
                    let _slot = slot;
                    session.await
                }
            },
        )
        .await;
        // Read-modify-writes whose clients are gone still owe their partners a copy.
        rmw_tasks.close();
        let _ = tokio::time::timeout(c.shutdown_grace, rmw_tasks.wait()).await;
        links_shutdown.cancel();
    }
}
