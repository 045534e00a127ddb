//! Command-line flags of `worker`; each is also read from a `TWINCACHE_WORKER_*` variable.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use twincache_protocol::units::{parse_duration, parse_size};

/// twincache worker: holds one copy of a pair's data and serves it to orchestrators.
#[derive(Debug, Clone, Parser)]
#[command(name = "worker", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TWINCACHE_WORKER_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Port to listen on; 0 picks a free one (the startup line says which).
    #[arg(long, env = "TWINCACHE_WORKER_PORT", default_value_t = 7001)]
    pub port: u16,

    /// Largest request frame accepted, e.g. 64MiB. Must exceed the orchestrator's limits.
    #[arg(long, env = "TWINCACHE_WORKER_MAX_FRAME", default_value = "64MiB", value_parser = parse_size)]
    pub max_frame: u64,

    /// Most connections served at once.
    #[arg(long, env = "TWINCACHE_WORKER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Threads serving requests; 0 means one per CPU, 1 a single event loop.
    #[arg(long, env = "TWINCACHE_WORKER_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// How long shutdown waits for open connections to finish.
    #[arg(long, env = "TWINCACHE_WORKER_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    /// The defaults, on a free loopback port (for tests and embedding).
    fn default() -> Self {
        let mut config = Config::parse_from(["worker"]);
        config.port = 0;
        config
    }
}
