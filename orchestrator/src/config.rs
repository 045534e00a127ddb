//! Command-line flags of `orchestrator`; each is also read from a `TWINCACHE_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use twincache_protocol::units::{parse_duration, parse_positive_duration, parse_size};
use twincache_tls::{NodeTls, Roles, TlsFiles};

/// twincache orchestrator: accepts clients (text, binary or RESP on one port) and routes each
/// request to the pair of workers that owns its key.
///
/// Workers are given as `<host> <port>` or `<host>:<port>` and pair up in order: the 1st with
/// the 2nd, the 3rd with the 4th, and so on.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orchestrator",
    version,
    about,
    override_usage = "orchestrator [OPTIONS] <HOST 1> <PORT 1> <HOST 2> <PORT 2> ... \
                      (or <HOST 1>:<PORT 1> <HOST 2>:<PORT 2> ...)"
)]
pub struct Config {
    /// Workers as `<host> <port>` or `<host>:<port>` (`[<ipv6>]:<port>`), an even number of
    /// workers in all; hosts are IP addresses or names.
    #[arg(
        value_name = "HOST PORT",
        env = "TWINCACHE_WORKERS",
        value_delimiter = ' ',
        required_unless_present_any = ["hash_password", "cluster_file"],
        num_args = 1..
    )]
    pub workers: Vec<String>,

    /// The pairs of workers, one pair per line as `<host>:<port> <host>:<port>` (`#` starts
    /// a comment), instead of the list on the command line. Re-read on SIGHUP: a pair added
    /// or removed moves slots online, a changed address replaces that worker (see README,
    /// "Changing the cluster").
    #[arg(long, env = "TWINCACHE_CLUSTER_FILE", value_name = "PATH")]
    pub cluster_file: Option<PathBuf>,

    /// Where the orchestrator keeps the pairs and the slot map across restarts: rewritten on
    /// every change, read at start (then it, not the worker list, says where keys are, and
    /// a move a stop interrupted is finished). `<cluster file>.state` by default with
    /// --cluster-file; without either, a restart after a change would look for moved keys
    /// on their old pairs.
    #[arg(long, env = "TWINCACHE_STATE_FILE", value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// How fast a slot move may copy, in stored bytes per second per receiving worker
    /// (e.g. 32MiB); 0 for no limit. The sending worker's --resync-rate-limit applies too.
    #[arg(long, env = "TWINCACHE_MOVE_RATE_LIMIT", default_value = "32MiB", value_parser = parse_size)]
    pub move_rate_limit: u64,

    /// Slots moved in one step: each step copies its slots' entries with one pass over the
    /// sending worker's store, and a read-modify-write of a key in it waits for the step.
    #[arg(long, env = "TWINCACHE_MOVE_BATCH_SLOTS", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=16384))]
    pub move_batch_slots: u16,

    /// Read a password on standard input, print its argon2 hash for a --users-file, and exit.
    #[arg(long)]
    pub hash_password: bool,

    /// A file whose first line is the password of the `default` user (Redis' requirepass):
    /// clients must AUTH before anything else.
    #[arg(long, env = "TWINCACHE_REQUIREPASS_FILE", value_name = "PATH")]
    pub requirepass_file: Option<PathBuf>,

    /// A file of users, one per line: `<name> <read-only|read-write|admin> <argon2 hash>`
    /// (`#` starts a comment; hashes from --hash-password). Clients must AUTH as one of them.
    #[arg(long, env = "TWINCACHE_USERS_FILE", value_name = "PATH")]
    pub users_file: Option<PathBuf>,

    /// The secret every node of the cluster shares (see the worker's --cluster-secret-file):
    /// the orchestrator proves it on every connection to a worker.
    #[arg(long, env = "TWINCACHE_CLUSTER_SECRET_FILE", value_name = "PATH")]
    pub cluster_secret_file: Option<PathBuf>,

    /// This orchestrator's certificate chain (PEM, leaf first). With it (and
    /// --tls-key-file) the client port speaks TLS only. With --tls-cluster it is also
    /// presented to workers that require client certificates. Reloaded on SIGHUP.
    #[arg(
        long,
        env = "TWINCACHE_TLS_CERT_FILE",
        value_name = "PATH",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key of --tls-cert-file (PEM).
    #[arg(
        long,
        env = "TWINCACHE_TLS_KEY_FILE",
        value_name = "PATH",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,

    /// CA certificates (PEM): clients on the TLS port must present a certificate signed by
    /// one of them (see --tls-auth-clients), and with --tls-cluster the workers' certificates
    /// are checked against them. Reloaded on SIGHUP.
    #[arg(long, env = "TWINCACHE_TLS_CA_CERT_FILE", value_name = "PATH")]
    pub tls_ca_cert_file: Option<PathBuf>,

    /// With --tls-ca-cert-file: whether clients must present a certificate (`yes`), may
    /// (`optional`: checked if given), or are not asked (`no`).
    #[arg(long, env = "TWINCACHE_TLS_AUTH_CLIENTS", default_value = "yes",
          value_parser = ["yes", "optional", "no"])]
    pub tls_auth_clients: String,

    /// Connect to the workers over TLS (the workers need --tls-cluster too), checking their
    /// certificates against --tls-ca-cert-file. Workers are checked by the address they are
    /// given by, so their certificates need that IP address (or host name).
    #[arg(long, env = "TWINCACHE_TLS_CLUSTER", requires = "tls_ca_cert_file")]
    pub tls_cluster: bool,

    /// Listen (or serve --http) on a non-loopback address without --requirepass-file or
    /// --users-file: anyone who reaches the port can then read and change all data.
    #[arg(long, env = "TWINCACHE_INSECURE")]
    pub insecure: bool,

    /// Address clients connect to, `<host>:<port>`; a host name is resolved at start (an IPv4
    /// address preferred).
    #[arg(long, env = "TWINCACHE_LISTEN", default_value = "127.0.0.1:7000", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Not a flag of the orchestrator: it exists to say so, and to point to --listen.
    #[arg(long, hide = true, value_name = "PORT")]
    pub port: Option<String>,

    /// Close a client connection that has sent nothing and been sent nothing for this long,
    /// e.g. 300s, 5m. It also bounds a client that stops reading its replies, a request sent
    /// halfway, and the wait for a connection's first line.
    #[arg(long, env = "TWINCACHE_IDLE_TIMEOUT", default_value = "300s", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// Longest text-protocol line accepted; a longer one is answered with code 5 and skipped.
    #[arg(long, env = "TWINCACHE_MAX_LINE", default_value = "1MiB", value_parser = parse_size)]
    pub max_line: u64,

    /// Largest binary-protocol frame accepted; a longer one gets code 5 and the connection closes.
    #[arg(long, env = "TWINCACHE_MAX_FRAME", default_value = "16MiB", value_parser = parse_size)]
    pub max_frame: u64,

    /// Most memory one client connection may hold: its buffered requests (a RESP command in
    /// all its arguments) and the replies waiting to be written. A client past it is
    /// disconnected (Redis' client-query-buffer-limit and client-output-buffer-limit).
    #[arg(long, env = "TWINCACHE_MAX_CLIENT_BUFFER", default_value = "64MiB", value_parser = parse_size)]
    pub max_client_buffer: u64,

    /// Most memory all client connections together may hold; past it, the connections
    /// holding the most are disconnected. Default: a sixteenth of the memory this process
    /// may use (its cgroup limit, else physical memory), between 64 MiB and 2 GiB.
    #[arg(long, env = "TWINCACHE_MAX_BUFFER_MEMORY", value_parser = parse_size)]
    pub max_buffer_memory: Option<u64>,

    /// Time to live for every key written without one (e.g. 1h); 0 keeps keys until deleted.
    #[arg(long, env = "TWINCACHE_DEFAULT_TTL", default_value = "0", value_parser = parse_duration)]
    pub default_ttl: Duration,

    /// How long a worker may take to answer before the request fails over to its partner.
    /// Cache operations take well under a millisecond; this bounds what a frozen worker
    /// costs the requests already sent to it.
    #[arg(long, env = "TWINCACHE_WORKER_TIMEOUT", default_value = "500ms", value_parser = parse_positive_duration)]
    pub worker_timeout: Duration,

    /// How often every worker's health is checked (its status: boot id, sync state).
    #[arg(long, env = "TWINCACHE_HEALTH_INTERVAL", default_value = "200ms", value_parser = parse_positive_duration)]
    pub health_interval: Duration,

    /// A worker that does not answer a health check in this time is down.
    #[arg(long, env = "TWINCACHE_HEALTH_TIMEOUT", default_value = "300ms", value_parser = parse_positive_duration)]
    pub health_timeout: Duration,

    /// Persistent connections to each worker (each carries many requests at once). 0
    /// chooses: one under a single event loop, where it carries the requests of one key in
    /// the order they were stamped (a hot key's read-modify-writes then never come back for a
    /// newer version), else two, so links spread over the runtime's threads.
    #[arg(long, env = "TWINCACHE_CONNECTIONS_PER_WORKER", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=64))]
    pub connections_per_worker: u16,

    /// Requests of one client connection in flight at once; further input waits.
    #[arg(long, env = "TWINCACHE_PIPELINE_DEPTH", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pipeline_depth: u32,

    /// Most client connections served at once; more are closed on arrival.
    #[arg(long, env = "TWINCACHE_MAX_CLIENTS", default_value_t = 10_000)]
    pub max_clients: usize,

    /// This orchestrator's id (0-255), the tie-break in write versions when several
    /// orchestrators write the same key in the same millisecond. Random if not given.
    #[arg(long, env = "TWINCACHE_NODE_ID")]
    pub node_id: Option<u8>,

    /// What the workers are: `replicated` (a cache of its own) or `adapter` (a migration tier
    /// in front of two Redis servers, see the worker's --source and --destination). Learned
    /// from the workers before the first request is served if not given; a worker that
    /// runs otherwise is refused as misconfigured.
    #[arg(long, env = "TWINCACHE_MODE", value_enum)]
    pub mode: Option<crate::cluster::Mode>,

    /// Threads serving requests; 0 chooses from the machine (one event loop on up to 2
    /// CPUs, one thread per CPU on more), 1 always runs a single event loop.
    #[arg(long, env = "TWINCACHE_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// How long shutdown waits for clients' in-flight requests.
    #[arg(long, env = "TWINCACHE_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Serve HTTP on this address: /metrics (Prometheus), /health, /ready, the key
    /// interface /v1/keys/{key} and a status page at /. Off unless given.
    #[arg(long, env = "TWINCACHE_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// Log lines as `text` (for people) or `json` (one object per line, for collectors).
    #[arg(long, env = "TWINCACHE_LOG_FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    pub log_format: String,
}

impl Config {
    /// Parses the command line and checks the worker list; on any error prints a clear
    /// message with the usage and exits with code 2.
    pub fn from_args() -> Config {
        let config = Config::parse();
        if config.hash_password {
            return config;
        }
        let checked = config
            .check_port_flag()
            .and_then(|_| config.worker_addrs())
            .and_then(|addrs| config.check_distinct(&addrs))
            .and_then(|_| config.check_limits())
            .and_then(|_| config.check_exposure())
            .and_then(|_| config.authenticator().map(drop))
            .and_then(|_| config.cluster_secret().map(drop))
            .and_then(|_| config.tls().map(drop));
        if let Err(msg) = checked {
            Config::command()
                .error(clap::error::ErrorKind::ValueValidation, msg)
                .exit();
        }
        config
    }

    /// `orchestrator --port 7420` would otherwise get clap's advice to write `-- --port`.
    fn check_port_flag(&self) -> Result<(), String> {
        match &self.port {
            None => Ok(()),
            Some(port) => Err(format!(
                "the orchestrator has no --port (workers have): it listens on --listen \
                 <host>:<port>, e.g. --listen 127.0.0.1:{port}"
            )),
        }
    }

    /// [`check_distinct`] with this orchestrator's `--listen` address.
    pub fn check_distinct(&self, addrs: &[String]) -> Result<(), String> {
        check_distinct(self.listen, addrs)
    }

    /// The budget for all client connections' buffers (see `--max-buffer-memory`).
    pub fn buffer_budget(&self) -> u64 {
        self.max_buffer_memory
            .unwrap_or_else(twincache_protocol::budget::default_buffer_budget)
    }

    /// Refuses to serve every data on a reachable address to anyone (Redis' protected mode),
    /// unless told `--insecure`. Passwords guard it, and so do required client certificates.
    ///
    /// The HTTP port (`--http`) is held to the same rule with passwords alone: its key
    /// interface reads and changes data too, and a client certificate does not reach it.
    pub fn check_exposure(&self) -> Result<(), String> {
        let passwords = self.requirepass_file.is_some() || self.users_file.is_some();
        let guarded = passwords || self.client_certificates();
        if !(self.listen.ip().is_loopback() || guarded || self.insecure) {
            return Err(format!(
                "refusing to listen on {} without --requirepass-file or --users-file: anyone \
                 who can reach it could read and change all data. Set a password, or pass \
                 --insecure on a network you trust",
                self.listen
            ));
        }
        match self.http {
            Some(http) if !(http.ip().is_loopback() || passwords || self.insecure) => Err(format!(
                "refusing to serve HTTP on {http} without --requirepass-file or --users-file: \
                 anyone who can reach it could read and change all data through its key \
                 interface (/v1/keys; client certificates do not guard HTTP). Set a password, \
                 or pass --insecure on a network you trust"
            )),
            _ => Ok(()),
        }
    }

    /// Whether clients must show a certificate this orchestrator's CA signed.
    fn client_certificates(&self) -> bool {
        self.tls_cert_file.is_some()
            && self.tls_ca_cert_file.is_some()
            && self.tls_auth_clients == "yes"
    }

    /// Whether clients authenticate by certificate alone (no passwords): then HTTP, which
    /// carries no certificate, keeps its key interface closed.
    pub fn certificates_only(&self) -> bool {
        self.client_certificates() && self.requirepass_file.is_none() && self.users_file.is_none()
    }

    /// The users and passwords clients authenticate with.
    pub fn authenticator(&self) -> Result<crate::auth::Authenticator, String> {
        crate::auth::Authenticator::from_files(
            self.requirepass_file.as_deref(),
            self.users_file.as_deref(),
        )
    }

    /// The TLS files and what this orchestrator does with them: serve its client port (with a
    /// certificate), connect to the workers (with --tls-cluster).
    pub fn tls_files(&self) -> (TlsFiles, Roles) {
        let files = TlsFiles::from_flags(
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
            self.tls_ca_cert_file.as_deref(),
            &self.tls_auth_clients,
        );
        let roles = Roles {
            serve: self.tls_cert_file.is_some(),
            connect: self.tls_cluster,
        };
        (files, roles)
    }

    /// TLS, loaded from its files, if configured; a clear message for a file that is
    /// missing, unreadable, or a key that is not the certificate's.
    pub fn tls(&self) -> Result<Option<Arc<NodeTls>>, String> {
        let (files, roles) = self.tls_files();
        if !roles.serve && !roles.connect {
            if self.tls_ca_cert_file.is_some() {
                return Err(
                    "--tls-ca-cert-file needs --tls-cert-file and --tls-key-file (TLS on the                      client port) or --tls-cluster (TLS to the workers)"
                        .into(),
                );
            }
            return Ok(None);
        }
        NodeTls::load(files, roles)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The cluster secret, if given.
    pub fn cluster_secret(
        &self,
    ) -> Result<Option<twincache_protocol::auth::ClusterSecret>, String> {
        self.cluster_secret_file
            .as_deref()
            .map(twincache_protocol::auth::ClusterSecret::from_file)
            .transpose()
    }

    /// Checks the limits against each other: a connection must be able to hold the largest
    /// request a client may send.
    pub fn check_limits(&self) -> Result<(), String> {
        let largest = self.max_frame.max(self.max_line);
        if self.max_client_buffer < largest {
            return Err(format!(
                "--max-client-buffer ({}) must be at least --max-frame and --max-line ({largest})",
                self.max_client_buffer
            ));
        }
        Ok(())
    }

    /// A configuration for the given workers with every other setting at its default.
    pub fn for_workers(workers: &[SocketAddr]) -> Config {
        let mut args = vec![
            "orchestrator".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        for w in workers {
            args.push(w.ip().to_string());
            args.push(w.port().to_string());
        }
        Config::parse_from(args)
    }

    /// The workers as `host:port` strings, in order, checked: each a valid IP address or host
    /// name with a port from 1 to 65535, given as one word (`host:port`) or two (`host port`),
    /// and an even count (they pair up).
    pub fn worker_addrs(&self) -> Result<Vec<String>, String> {
        let listed = self.listed_workers()?;
        let Some(path) = &self.cluster_file else {
            return Ok(listed);
        };
        let from_file = read_cluster_file(path)?;
        if !listed.is_empty() && listed != from_file {
            return Err(format!(
                "the workers on the command line differ from {}: give one or the other",
                path.display()
            ));
        }
        Ok(from_file)
    }

    /// `--state-file`, or its default next to the cluster file.
    pub fn state_path(&self) -> Option<PathBuf> {
        self.state_file.clone().or_else(|| {
            self.cluster_file.as_ref().map(|f| {
                let mut name = f.as_os_str().to_owned();
                name.push(".state");
                PathBuf::from(name)
            })
        })
    }

    /// The workers given on the command line (or in TWINCACHE_WORKERS).
    fn listed_workers(&self) -> Result<Vec<String>, String> {
        let mut addrs = Vec::new();
        let mut words = self
            .workers
            .iter()
            .map(|w| w.trim())
            .filter(|w| !w.is_empty());
        while let Some(word) = words.next() {
            let (host, port) = match split_host_port(word) {
                Some((host, port)) => (host, port),
                None => {
                    let port = words.next().ok_or_else(|| {
                        format!(
                            "`{word}` has no port: workers are given as <host> <port> pairs or \
                             as <host>:<port>"
                        )
                    })?;
                    (word, port)
                }
            };
            addrs.push(worker_addr(host, port)?);
        }
        if !addrs.len().is_multiple_of(2) {
            return Err(format!(
                "workers pair up in the order given, so their number must be even; got {} \
                 (add a partner for {})",
                addrs.len(),
                addrs.last().map(String::as_str).unwrap_or("?")
            ));
        }
        Ok(addrs)
    }
}

/// Refuses a worker list naming one address twice, or the orchestrator's own address
/// (`listen`): either would look like redundancy that is not there. Host names are resolved
/// here (blocking), so `127.0.0.1 7422 localhost 7422` is caught too; a name that does not
/// resolve yet is left to the health checks. (The same worker behind two different addresses
/// is caught by its boot id once it answers: see `identify`.) The one check for the command
/// line, the cluster file and `CLUSTER`.
pub fn check_distinct(listen: SocketAddr, addrs: &[String]) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let resolved: Vec<Vec<SocketAddr>> = addrs
        .iter()
        .map(|a| {
            dialed(a)
                .to_socket_addrs()
                .map(Vec::from_iter)
                .unwrap_or_default()
        })
        .collect();
    for (i, addr) in addrs.iter().enumerate() {
        let same = |other: &SocketAddr| {
            other.port() == listen.port()
                && (other.ip() == listen.ip()
                    || (listen.ip().is_unspecified()
                        && (other.ip().is_loopback() || other.ip().is_unspecified())))
        };
        if resolved[i].iter().any(same) {
            return Err(format!(
                "worker {addr} is this orchestrator's own --listen address ({listen}): give \
                 the workers' addresses"
            ));
        }
        for (j, earlier) in addrs[..i].iter().enumerate() {
            let overlap = earlier == addr || resolved[i].iter().any(|a| resolved[j].contains(a));
            if overlap {
                return Err(format!(
                    "worker {addr} is given twice (as {earlier} too): a pair needs two \
                     different workers, and a worker serves one pair"
                ));
            }
        }
    }
    Ok(())
}

/// A worker's address given as one word, `<host>:<port>`, checked.
pub fn parse_worker(word: &str) -> Result<String, String> {
    let one = |word: &str| {
        let (host, port) =
            split_host_port(word).ok_or_else(|| format!("`{word}` is not <host>:<port>"))?;
        worker_addr(host, port)
    };
    match word.split_once('@') {
        Some((dialed, peer)) => {
            let both = one(dialed).and_then(|d| Ok(format!("{d}@{}", one(peer)?)));
            both.map_err(|e| {
                format!("{e} (in `{word}`: a worker the others reach elsewhere is <host>:<port>@<peer host>:<peer port>)")
            })
        }
        None => one(word),
    }
}

/// Where the orchestrator reaches a worker given as `addr`: all of it, or, given as
/// `<address>@<peer address>` (workers see each other at other addresses than the
/// orchestrator sees them at: NAT, a separate network between them), the part before `@`.
pub fn dialed(addr: &str) -> &str {
    addr.split_once('@').map_or(addr, |(dialed, _)| dialed)
}

/// Where the other workers reach a worker given as `addr` (told to them for refills and slot
/// imports): the part after `@`, or all of it.
pub fn peer(addr: &str) -> &str {
    addr.split_once('@').map_or(addr, |(_, peer)| peer)
}

/// Reads and parses a cluster file (see [`parse_cluster_file`]); errors name the file.
pub fn read_cluster_file(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the cluster file {}: {e}", path.display()))?;
    parse_cluster_file(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A cluster file: one pair per line, `<host>:<port> <host>:<port>`; `#` starts a comment,
/// blank lines are skipped. Returns the workers in pairing order. Errors name the line.
pub fn parse_cluster_file(text: &str) -> Result<Vec<String>, String> {
    // Each worker with the line it is on.
    let mut addrs: Vec<(String, usize)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let [a, b] = words.as_slice() else {
            return Err(format!(
                "line {n}: a pair is two workers, `<host>:<port> <host>:<port>`; got {} word(s)",
                words.len()
            ));
        };
        for word in [a, b] {
            let addr = parse_worker(word).map_err(|e| format!("line {n}: {e}"))?;
            if let Some((_, earlier)) = addrs.iter().find(|(x, _)| *x == addr) {
                return Err(format!(
                    "line {n}: worker {addr} is given twice (line {earlier} has it too)"
                ));
            }
            addrs.push((addr, n));
        }
    }
    if addrs.is_empty() {
        return Err("no pairs: a cluster needs at least one".into());
    }
    Ok(addrs.into_iter().map(|(addr, _)| addr).collect())
}

/// `host:port` or `[ipv6]:port` as one word; `None` for a host alone (an IPv6 address without
/// brackets has colons of its own and is a host alone).
fn split_host_port(word: &str) -> Option<(&str, &str)> {
    if let Some(v6) = word.strip_prefix('[') {
        let (ip, port) = v6.split_once("]:")?;
        return Some((ip, port));
    }
    match word.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, port)),
        _ => None,
    }
}

/// A worker's `host:port`, checked.
fn worker_addr(host: &str, port: &str) -> Result<String, String> {
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{port}` (after `{host}`) is not a port from 1 to 65535"))?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port).to_string());
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid_name {
        return Err(format!("`{host}` is not an IP address or host name"));
    }
    Ok(format!("{host}:{port}"))
}

/// `--listen`: `ip:port`, or `host:port` with the host resolved now (an IPv4 address first,
/// as `localhost` users mostly connect to 127.0.0.1).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let (host, port) = split_host_port(s).ok_or_else(|| format!("`{s}` is not <host>:<port>"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` (in `{s}`) is not a port"))?;
    let mut addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs
        .first()
        .copied()
        .ok_or_else(|| format!("`{host}` resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(args: &[&str]) -> Result<Vec<String>, String> {
        let mut argv = vec!["orchestrator"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap().worker_addrs()
    }

    #[test]
    fn a_worker_may_name_where_the_other_workers_reach_it() {
        let both = "10.0.0.1:7001@192.168.0.1:7001";
        assert_eq!(parse_worker(both).unwrap(), both);
        assert_eq!(dialed(both), "10.0.0.1:7001");
        assert_eq!(peer(both), "192.168.0.1:7001");
        assert_eq!((dialed("h:1"), peer("h:1")), ("h:1", "h:1"));
        let e = parse_worker("10.0.0.1:7001@nope").unwrap_err();
        assert!(
            e.starts_with("`nope` is not <host>:<port> (in `10.0.0.1:7001@nope`:"),
            "{e}"
        );
        assert!(parse_worker("a:1@b:2@c:3").is_err());
        assert!(parse_worker("@10.0.0.1:7001").is_err());
        let pairs = parse_cluster_file(&format!("{both} [::1]:7002@[::1]:7003\n")).unwrap();
        assert_eq!(pairs, [both, "[::1]:7002@[::1]:7003"]);
    }

    #[test]
    fn cluster_files_parse_with_line_numbers_in_errors() {
        let text =
            "# the cache\n10.0.0.1:7001 10.0.0.2:7001  # pair 0\n\n  host-b:7001\t[::1]:7002\n";
        assert_eq!(
            parse_cluster_file(text).unwrap(),
            vec![
                "10.0.0.1:7001",
                "10.0.0.2:7001",
                "host-b:7001",
                "[::1]:7002"
            ]
        );
        let err = |t: &str| parse_cluster_file(t).unwrap_err();
        assert_eq!(
            err("a:1 b:2\nc:3\n"),
            "line 2: a pair is two workers, `<host>:<port> <host>:<port>`; got 1 word(s)"
        );
        assert_eq!(
            err("a:1 b:2 c:3"),
            "line 1: a pair is two workers, `<host>:<port> <host>:<port>`; got 3 word(s)"
        );
        assert_eq!(err("a:1 b"), "line 1: `b` is not <host>:<port>");
        assert_eq!(
            err("a:1 b:0"),
            "line 1: `0` (after `b`) is not a port from 1 to 65535"
        );
        assert_eq!(
            err("a:1 b_x:2"),
            "line 1: `b_x` is not an IP address or host name"
        );
        assert_eq!(
            err("# x\na:1 b:2\nc:3 a:1\n"),
            "line 3: worker a:1 is given twice (line 2 has it too)"
        );
        assert_eq!(
            err("a:1 b:2\n\n# c\nc:3 d:4\ne:5 d:4\n"),
            "line 5: worker d:4 is given twice (line 4 has it too)"
        );
        assert_eq!(
            err("# nothing\n\n"),
            "no pairs: a cluster needs at least one"
        );
    }

    #[test]
    fn pairs_in_order() {
        assert_eq!(
            workers(&["127.0.0.1", "7001", "127.0.0.1", "7002"]).unwrap(),
            vec!["127.0.0.1:7001", "127.0.0.1:7002"]
        );
        assert_eq!(
            workers(&["::1", "7001", "localhost", "7002"]).unwrap()[0],
            "[::1]:7001"
        );
    }

    #[test]
    fn host_colon_port_and_host_port_mix() {
        assert_eq!(
            workers(&[
                "127.0.0.1:7421",
                "127.0.0.1",
                "7422",
                "[::1]:7423",
                "::1",
                "7424"
            ])
            .unwrap(),
            [
                "127.0.0.1:7421",
                "127.0.0.1:7422",
                "[::1]:7423",
                "[::1]:7424"
            ]
        );
        assert_eq!(
            workers(&["localhost:7001", "w2.internal:7002"]).unwrap(),
            ["localhost:7001", "w2.internal:7002"]
        );
        assert!(workers(&["127.0.0.1:0", "127.0.0.1:1"])
            .unwrap_err()
            .contains("port"));
    }

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["orchestrator"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn a_worker_given_twice_or_the_listen_address_is_refused() {
        let check = |args: &[&str]| {
            let c = config(args);
            c.check_distinct(&c.worker_addrs().unwrap())
        };
        assert!(check(&["127.0.0.1", "7421", "127.0.0.1", "7422"]).is_ok());
        let twice = check(&["127.0.0.1", "7422", "localhost", "7422"]).unwrap_err();
        assert!(twice.contains("given twice"), "{twice}");
        assert!(check(&["127.0.0.1:7422", "127.0.0.1:7422"])
            .unwrap_err()
            .contains("given twice"));
        let own = check(&[
            "--listen",
            "127.0.0.1:7420",
            "localhost",
            "7420",
            "127.0.0.1",
            "7421",
        ])
        .unwrap_err();
        assert!(own.contains("own --listen"), "{own}");
        assert!(check(&[
            "--listen",
            "0.0.0.0:7420",
            "127.0.0.1:7420",
            "127.0.0.1:7421"
        ])
        .unwrap_err()
        .contains("own --listen"));
    }

    #[test]
    fn listen_takes_host_names_and_port_points_to_listen() {
        let c = config(&["--listen", "localhost:7420", "a", "1", "b", "2"]);
        assert_eq!(c.listen, "127.0.0.1:7420".parse().unwrap());
        let c = config(&["--port", "7420", "a", "1", "b", "2"]);
        assert!(c
            .check_port_flag()
            .unwrap_err()
            .contains("--listen 127.0.0.1:7420"));
    }

    #[test]
    fn rejects_odd_counts_and_bad_addresses() {
        assert!(workers(&["127.0.0.1", "7001"])
            .unwrap_err()
            .contains("even"));
        assert!(workers(&["127.0.0.1", "7001", "127.0.0.1"])
            .unwrap_err()
            .contains("no port"));
        assert!(workers(&["127.0.0.1", "x", "127.0.0.1", "7002"])
            .unwrap_err()
            .contains("port"));
        assert!(workers(&["127.0.0.1", "0", "127.0.0.1", "7002"])
            .unwrap_err()
            .contains("port"));
        assert!(workers(&["bad_host!", "1", "127.0.0.1", "7002"])
            .unwrap_err()
            .contains("host"));
    }

    /// Protected mode holds for `--http` as for `--listen`, with passwords alone counting:
    /// a client certificate does not reach HTTP.
    #[test]
    fn http_on_an_open_address_needs_a_password() {
        let exposure = |args: &[&str]| {
            let mut all = args.to_vec();
            all.extend(["127.0.0.1", "7001", "127.0.0.1", "7002"]);
            config(&all).check_exposure()
        };
        assert!(exposure(&["--http", "127.0.0.1:8080"]).is_ok());
        let err = exposure(&["--http", "0.0.0.0:8080"]).unwrap_err();
        assert!(
            err.contains("HTTP on 0.0.0.0:8080") && err.contains("--insecure"),
            "{err}"
        );
        assert!(exposure(&["--http", "0.0.0.0:8080", "--insecure"]).is_ok());
        assert!(exposure(&["--http", "0.0.0.0:8080", "--requirepass-file", "p"]).is_ok());
        let certificates = [
            "--tls-cert-file",
            "c",
            "--tls-key-file",
            "k",
            "--tls-ca-cert-file",
            "ca",
        ];
        assert!(exposure(&[&certificates[..], &["--listen", "0.0.0.0:7000"]].concat()).is_ok());
        assert!(
            config(&[&certificates[..], &["127.0.0.1", "1", "127.0.0.1", "2"]].concat())
                .certificates_only()
        );
        let err = exposure(&[&certificates[..], &["--http", "0.0.0.0:8080"]].concat());
        assert!(err.is_err(), "a certificate does not guard HTTP");
    }
}
