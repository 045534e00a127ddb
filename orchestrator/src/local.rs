//! An in-process cluster on loopback: `pairs` pairs of workers and an orchestrator, each on a
//! free port, for examples, doctests and quick experiments. Everything stops when the
//! [`LocalCluster`] is dropped.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use twincache_worker::Worker;

use crate::{Config, Orchestrator};

pub struct LocalCluster {
    addr: SocketAddr,
    workers: Vec<SocketAddr>,
    shutdown: CancellationToken,
}

impl LocalCluster {
    /// Starts the cluster and waits until the orchestrator reaches every worker.
    pub async fn start(pairs: usize) -> std::io::Result<LocalCluster> {
        let shutdown = CancellationToken::new();
        let mut workers = Vec::new();
        for _ in 0..pairs * 2 {
            let worker = Worker::bind(twincache_worker::Config::default()).await?;
            workers.push(worker.local_addr());
            tokio::spawn(worker.run(shutdown.clone()));
        }
        let orchestrator = Orchestrator::bind(Config::for_workers(&workers)).await?;
        let addr = orchestrator.local_addr();
        tokio::spawn(orchestrator.run(shutdown.clone()));
        let cluster = LocalCluster {
            addr,
            workers,
            shutdown,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Pings through the orchestrator until a request reaches every pair (bounded wait).
    async fn wait_ready(&self) -> std::io::Result<()> {
        let client = twincache_client::Client::connect(&self.addr.to_string())
            .await
            .map_err(std::io::Error::other)?;
        for _ in 0..200 {
            let mut all = true;
            for i in 0..self.workers.len() / 2 {
                // A key per pair: probe until one hashes there.
                let key = (0..)
                    .map(|n| format!("probe:{n}"))
                    .find(|k| {
                        twincache_protocol::slots::SlotMap::even(self.workers.len() / 2)
                            .pair_of(k.as_bytes())
                            == i
                    })
                    .expect("some key lands on every pair");
                all &= client.exists(&key).await.is_ok();
            }
            if all {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(std::io::Error::other("local cluster did not become ready"))
    }

    /// The orchestrator's client address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The workers' addresses, in pairing order.
    pub fn workers(&self) -> &[SocketAddr] {
        &self.workers
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
