//! Process-wide counters (INFO's clients and stats sections).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

#[derive(Debug)]
pub struct Metrics {
    pub started: Instant,
    connected: AtomicI64,
    connections: AtomicU64,
    commands: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            connected: AtomicI64::new(0),
            connections: AtomicU64::new(0),
            commands: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts a client connection for as long as the returned guard lives.
    pub fn client_connected(&self) -> ClientGuard<'_> {
        self.connected.fetch_add(1, Relaxed);
        self.connections.fetch_add(1, Relaxed);
        ClientGuard(self)
    }

    /// Adds `n` processed commands (sessions add per batch, not per command).
    pub fn commands_processed(&self, n: u64) {
        if n > 0 {
            self.commands.fetch_add(n, Relaxed);
        }
    }

    pub fn connected_clients(&self) -> i64 {
        self.connected.load(Relaxed)
    }

    pub fn total_connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    pub fn total_commands(&self) -> u64 {
        self.commands.load(Relaxed)
    }
}

pub struct ClientGuard<'a>(&'a Metrics);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Relaxed);
    }
}
