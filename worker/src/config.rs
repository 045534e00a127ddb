//! Command-line flags of `worker`; each is also read from a `TWINCACHE_WORKER_*` variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use twincache_protocol::auth::ClusterSecret;
use twincache_protocol::units::{parse_duration, parse_positive_duration, parse_size};
use twincache_tls::{NodeTls, Roles, TlsFiles};

/// twincache worker: holds one copy of a pair's data and serves it to orchestrators.
#[derive(Debug, Clone, Parser)]
#[command(name = "worker", version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to listen on: an IP address, or a host name resolved at start (an IPv4
    /// address preferred).
    #[arg(long, env = "TWINCACHE_WORKER_BIND", default_value = "127.0.0.1", value_parser = parse_bind)]
    pub bind: IpAddr,

    /// Port to listen on; 0 picks a free one (the startup line says which).
    #[arg(long, env = "TWINCACHE_WORKER_PORT", default_value_t = 7001)]
    pub port: u16,

    /// Largest request frame accepted, e.g. 64MiB. Must exceed the orchestrator's limits.
    #[arg(long, env = "TWINCACHE_WORKER_MAX_FRAME", default_value = "64MiB", value_parser = parse_size)]
    pub max_frame: u64,

    /// Memory for entries (keys, values, per-entry overhead), e.g. 512MiB; past it, writes
    /// evict the least recently used entries. 0 means no limit. Default: a quarter of the
    /// memory this process may use (its cgroup limit, else physical memory), logged at start.
    #[arg(long, env = "TWINCACHE_WORKER_MAX_MEMORY", value_parser = parse_size)]
    pub max_memory: Option<u64>,

    /// Connections that send nothing for this long are closed (the orchestrator's links
    /// ping well within it).
    #[arg(long, env = "TWINCACHE_WORKER_IDLE_TIMEOUT", default_value = "300s", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// Most memory all connections together may hold in buffers; past it, the connections
    /// holding the most are closed. Default: a sixteenth of the memory this process may use,
    /// between 64 MiB and 2 GiB.
    #[arg(long, env = "TWINCACHE_WORKER_MAX_BUFFER_MEMORY", value_parser = parse_size)]
    pub max_buffer_memory: Option<u64>,

    /// Size of the compression dictionary the worker builds from the first values it
    /// stores; similar values then compress far better. 0 disables dictionaries. With
    /// --encryption-key-file, dictionaries are off unless --dictionary-with-encryption.
    #[arg(long, env = "TWINCACHE_WORKER_DICTIONARY_SIZE", default_value = "8KiB", value_parser = parse_size)]
    pub dictionary_size: u64,

    /// Keep the shared compression dictionary with --encryption-key-file. It lets a client
    /// who can write values and see stored sizes guess other clients' values byte by byte
    /// (README: "What encryption hides"); only for a cluster whose writers all trust each
    /// other.
    #[arg(long, env = "TWINCACHE_WORKER_DICTIONARY_WITH_ENCRYPTION")]
    pub dictionary_with_encryption: bool,

    /// How long deletes are remembered (tombstones), so that neither a late write nor a
    /// resync brings a deleted key back. Longer than any resync should take.
    #[arg(long, env = "TWINCACHE_WORKER_TOMBSTONE_TTL", default_value = "1h", value_parser = parse_positive_duration)]
    pub tombstone_ttl: Duration,

    /// Bytes per second this worker sends when a partner resyncs from it (e.g. 200MB);
    /// 0 for no limit. Keeps a resync from taking the bandwidth live traffic needs.
    #[arg(long, env = "TWINCACHE_WORKER_RESYNC_RATE_LIMIT", default_value = "0", value_parser = parse_size)]
    pub resync_rate_limit: u64,

    /// Adapter mode: the Redis to migrate from, e.g. redis://127.0.0.1:6379/0 (needs
    /// --destination too).
    #[arg(
        long,
        env = "TWINCACHE_WORKER_SOURCE",
        hide_env_values = true,
        value_name = "URL",
        requires = "destination"
    )]
    pub source: Option<String>,

    /// Adapter mode: the Redis to migrate to, e.g. redis://:password@10.0.0.5:6379/1 (needs
    /// --source too).
    #[arg(
        long,
        env = "TWINCACHE_WORKER_DESTINATION",
        hide_env_values = true,
        value_name = "URL",
        requires = "source"
    )]
    pub destination: Option<String>,

    /// Adapter mode: delete a key from the source once it is in the destination.
    #[arg(long, env = "TWINCACHE_WORKER_DELETE_FROM_SOURCE", requires = "source")]
    pub delete_from_source: bool,

    /// Most connections served at once.
    #[arg(long, env = "TWINCACHE_WORKER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// The secret every node of the cluster shares (32 bytes or more, or 64 hex characters
    /// as `worker keygen` prints): every connection to this worker must prove it knows it
    /// before any request is served, and this worker proves it to the partner it resyncs
    /// from. Without it, the worker listens only on loopback addresses unless --insecure.
    #[arg(
        long,
        env = "TWINCACHE_WORKER_CLUSTER_SECRET_FILE",
        value_name = "PATH"
    )]
    pub cluster_secret_file: Option<PathBuf>,

    /// Speak TLS on the links between nodes: this worker's port accepts TLS only (with
    /// --tls-cert-file and --tls-key-file), and its resync connections to its partner use
    /// TLS, checking the partner's certificate against --tls-ca-cert-file. The orchestrators
    /// need --tls-cluster too. The cluster handshake (--cluster-secret-file) runs inside TLS.
    #[arg(long, env = "TWINCACHE_WORKER_TLS_CLUSTER")]
    pub tls_cluster: bool,

    /// This worker's certificate chain (PEM, leaf first), for --tls-cluster. It must name
    /// the address the orchestrator and the partner use for this worker: usually an IP
    /// address, as an IP subject alternative name. Also presented as a client certificate
    /// when resyncing from the partner. Reloaded on SIGHUP.
    #[arg(
        long,
        env = "TWINCACHE_WORKER_TLS_CERT_FILE",
        value_name = "PATH",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key of --tls-cert-file (PEM).
    #[arg(
        long,
        env = "TWINCACHE_WORKER_TLS_KEY_FILE",
        value_name = "PATH",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,

    /// CA certificates (PEM) the partner's and the orchestrators' certificates must chain
    /// to; those connecting must present one unless --tls-auth-clients says otherwise.
    /// Reloaded on SIGHUP.
    #[arg(long, env = "TWINCACHE_WORKER_TLS_CA_CERT_FILE", value_name = "PATH")]
    pub tls_ca_cert_file: Option<PathBuf>,

    /// Whether nodes connecting to this worker must present a certificate signed by
    /// --tls-ca-cert-file (`yes`), may (`optional`), or are not asked (`no`).
    #[arg(long, env = "TWINCACHE_WORKER_TLS_AUTH_CLIENTS", default_value = "yes",
          value_parser = ["yes", "optional", "no"])]
    pub tls_auth_clients: String,

    /// Listen on a non-loopback address without --cluster-secret-file: anyone who reaches
    /// the port can then read and change all of this worker's data.
    #[arg(long, env = "TWINCACHE_WORKER_INSECURE")]
    pub insecure: bool,

    /// Connections not authenticated yet (with --cluster-secret-file) held at once, beside
    /// --max-connections; each has 10 s (or --idle-timeout) to authenticate, and when they
    /// are all taken a new connection closes the oldest.
    #[arg(
        long,
        env = "TWINCACHE_WORKER_MAX_PENDING_CONNECTIONS",
        default_value_t = 64
    )]
    pub max_pending_connections: usize,

    /// Encrypt every stored value with the key in this file (32 bytes, or 64 hex characters
    /// as `worker keygen` writes). Both workers of a pair need the same key.
    #[arg(
        long,
        env = "TWINCACHE_WORKER_ENCRYPTION_KEY_FILE",
        value_name = "PATH"
    )]
    pub encryption_key_file: Option<PathBuf>,

    /// Threads serving requests; 0 chooses from the machine (one event loop on up to 2
    /// CPUs, one thread per CPU on more), 1 always runs a single event loop.
    #[arg(long, env = "TWINCACHE_WORKER_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// How long shutdown waits for open connections to finish.
    #[arg(long, env = "TWINCACHE_WORKER_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Serve HTTP on this address: /metrics (Prometheus), /health, and /ready (200 once
    /// this worker holds its pair's data). Off unless given.
    #[arg(long, env = "TWINCACHE_WORKER_HTTP", value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,

    /// Log lines as `text` (for people) or `json` (one object per line, for collectors).
    #[arg(long, env = "TWINCACHE_WORKER_LOG_FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    pub log_format: String,
}

/// `--bind`: an IP address, or a host name (`localhost`) resolved to one.
fn parse_bind(s: &str) -> Result<IpAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = s.parse() {
        return Ok(ip);
    }
    let mut ips: Vec<IpAddr> = (s, 0)
        .to_socket_addrs()
        .map_err(|e| format!("`{s}` is not an IP address, and cannot be resolved: {e}"))?
        .map(|a| a.ip())
        .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips.first()
        .copied()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

/// Commands other than serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print a fresh random key (64 hex characters), for --encryption-key-file or
    /// --cluster-secret-file: `worker keygen > key`.
    Keygen,
}

impl Config {
    /// The adapter, when --source and --destination are given; a clear message for a bad URL.
    pub fn adapter(&self) -> Result<Option<crate::adapter::Adapter>, String> {
        match (&self.source, &self.destination) {
            (Some(src), Some(dst)) => {
                crate::adapter::Adapter::new(src, dst, self.delete_from_source).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The memory limit for entries: `--max-memory`, or a quarter of the memory the process
    /// may use (none if that cannot be read).
    pub fn max_memory_bytes(&self) -> u64 {
        self.max_memory
            .unwrap_or_else(|| twincache_protocol::budget::memory_available().map_or(0, |m| m / 4))
    }

    /// The budget for connection buffers (see `--max-buffer-memory`).
    pub fn buffer_budget(&self) -> u64 {
        self.max_buffer_memory
            .unwrap_or_else(twincache_protocol::budget::default_buffer_budget)
    }

    /// The cluster secret from `--cluster-secret-file`, if given; a clear message if it is
    /// unusable.
    pub fn cluster_secret(&self) -> Result<Option<ClusterSecret>, String> {
        self.cluster_secret_file
            .as_deref()
            .map(ClusterSecret::from_file)
            .transpose()
    }

    /// Refuses to serve every data on a reachable address without authentication (Redis'
    /// protected mode), unless told `--insecure`.
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.bind.is_loopback() || self.cluster_secret_file.is_some() || self.insecure {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {} without --cluster-secret-file: anyone who can reach it \
             could read and change all of this worker's data. Give every node the same secret \
             (`worker keygen > cluster.secret`), or pass --insecure on a network you trust",
            self.bind
        ))
    }

    /// TLS for the cluster links (`--tls-cluster`), loaded from its files; a clear message
    /// for a missing flag or file, or a key that is not the certificate's.
    pub fn tls(&self) -> Result<Option<Arc<NodeTls>>, String> {
        if !self.tls_cluster {
            if self.tls_cert_file.is_some() || self.tls_ca_cert_file.is_some() {
                return Err(
                    "a worker speaks TLS only on the links between nodes: add --tls-cluster \
                     (and give the orchestrators --tls-cluster too)"
                        .into(),
                );
            }
            return Ok(None);
        }
        if self.tls_cert_file.is_none() || self.tls_ca_cert_file.is_none() {
            return Err(
                "--tls-cluster needs --tls-cert-file and --tls-key-file (this worker's \
                 certificate) and --tls-ca-cert-file (to check the other nodes')"
                    .into(),
            );
        }
        let files = TlsFiles::from_flags(
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
            self.tls_ca_cert_file.as_deref(),
            &self.tls_auth_clients,
        );
        let roles = Roles {
            serve: true,
            connect: true,
        };
        NodeTls::load(files, roles)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The dictionary size the store uses: `--dictionary-size`, but 0 with encryption unless
    /// `--dictionary-with-encryption`. A dictionary built from the first values compresses
    /// every later value against them, so the stored size of a value one client writes says
    /// how much it has in common with values others wrote: a client that can write guesses
    /// and watch the sizes (`stats`, memory, evictions) recovers those values byte by byte.
    /// Each value compressed on its own tells nothing about the others.
    pub fn dictionary_bytes(&self) -> usize {
        if self.encryption_key_file.is_some() && !self.dictionary_with_encryption {
            0
        } else {
            self.dictionary_size as usize
        }
    }

    /// The cipher from `--encryption-key-file`, if given; a clear message if it is unusable.
    pub fn cipher(&self) -> Result<Option<crate::seal::Cipher>, String> {
        self.encryption_key_file
            .as_deref()
            .map(crate::seal::Cipher::from_file)
            .transpose()
    }
}

impl Default for Config {
    /// The defaults, on a free loopback port (for tests and embedding).
    fn default() -> Self {
        let mut config = Config::parse_from(["worker"]);
        config.port = 0;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_takes_host_names() {
        let c = Config::try_parse_from(["worker", "--bind", "localhost"]).unwrap();
        assert_eq!(c.bind, IpAddr::from([127, 0, 0, 1]));
        assert!(Config::try_parse_from(["worker", "--bind", "no such host.invalid"]).is_err());
    }
}
