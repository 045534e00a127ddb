//! Async Rust client for [twincache](https://example.invalid/twincache).
//!
//! A [`Client`] holds one TCP connection to an orchestrator (or, for debugging, to a single
//! worker) speaking the binary frame protocol, so keys and values are arbitrary bytes: `\n`,
//! `||` and NUL round-trip exactly, which the text protocol cannot carry. The connection is
//! multiplexed: clone the client freely (a clone is an `Arc` bump) and call it from as many
//! tasks as you like; their requests are in flight together on the one connection.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let addr = cluster.addr().to_string();
//! use twincache_client::Client;
//!
//! let client = Client::connect(&addr).await?;
//! client.set("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//!
//! // Binary-safe: any bytes in keys and values.
//! client.set(b"k\n||\0", &b"\xff\x00 line\nbreak"[..]).await?;
//! assert_eq!(client.get(b"k\n||\0").await?.as_deref(), Some(&b"\xff\x00 line\nbreak"[..]));
//!
//! assert!(client.del("greeting").await?);
//! assert_eq!(client.get("greeting").await?, None);
//! # Ok(())
//! # }
//! ```
//!
//! Many requests at once from many tasks, on one connection:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(2).await?;
//! # let addr = cluster.addr().to_string();
//! use std::time::Duration;
//! use twincache_client::Client;
//!
//! let client = Client::builder().timeout(Duration::from_secs(2)).connect(&addr).await?;
//! let tasks: Vec<_> = (0..100)
//!     .map(|i| {
//!         let client = client.clone();
//!         tokio::spawn(async move { client.set(format!("key:{i}"), format!("value {i}")).await })
//!     })
//!     .collect();
//! for t in tasks {
//!     t.await??;
//! }
//! assert_eq!(client.get("key:42").await?.as_deref(), Some(&b"value 42"[..]));
//! # Ok(())
//! # }
//! ```
//!
//! ## TLS
//! [`ClientBuilder::tls`] with a [`TlsConnector`] (the CA to trust, and a client certificate
//! for a server that requires one) connects over TLS; everything else is unchanged.
//!
//! ## Errors
//! Every call returns [`Error`], which says whether the failure was a timeout, a dropped
//! connection (the next call reconnects), a TLS failure, or an answer from the server such
//! as [`Status::Unavailable`] (no worker of the key's pair is reachable).

mod connection;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
pub use connection::{Connection, Reply};
pub use twincache_protocol::auth::ClusterSecret;
use twincache_protocol::frame::{Op, Request, Response, DEFAULT_MAX_FRAME};
pub use twincache_protocol::Status;
pub use twincache_tls::{rustls, Connector as TlsConnector, TlsError};
use zeroize::Zeroizing;

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting or talking to the server failed at the socket level.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// No answer within the configured timeout; the request may or may not have been applied.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The connection dropped while the request was in flight or queued; the next call
    /// reconnects. A write may or may not have been applied.
    #[error("connection closed")]
    ConnectionClosed,
    /// The server refused the credentials (or the cluster secret), or requires them.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The TLS handshake failed, or the server ended the session with a TLS alert: a
    /// certificate it does not trust (or one it required and did not get), or ours it does
    /// not. Retrying does not help until the certificates change.
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection's send buffer is full: the server is not keeping up (or not reading
    /// at all). Nothing was sent; retry later.
    #[error("the connection's send buffer is full; the server is not keeping up")]
    Overloaded,
    /// The server answered with an error status.
    #[error("server answered {status:?}: {message}")]
    Server { status: Status, message: String },
}

impl Error {
    /// The server's status, when the server answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            Error::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the same call may succeed if retried later (timeouts, dropped connections, an
    /// unreachable pair). Parse errors and oversized requests will fail again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io(_) | Error::Timeout(_) | Error::ConnectionClosed | Error::Overloaded => true,
            Error::Server { status, .. } => {
                matches!(status, Status::Unavailable | Status::ServerError)
            }
            Error::Auth(_) | Error::Tls(_) => false,
        }
    }

    /// An I/O error, or [`Error::Tls`] if it is rustls' (tokio-rustls wraps those in
    /// `InvalidData`).
    pub(crate) fn from_io(e: std::io::Error) -> Error {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<twincache_tls::rustls::Error>())
            .map(ToString::to_string);
        match tls {
            Some(reason) => Error::Tls(reason),
            None => Error::Io(e),
        }
    }

    fn from_response(resp: Response) -> Error {
        Error::Server {
            status: resp.status,
            message: String::from_utf8_lossy(&resp.payload).into_owned(),
        }
    }
}

/// Settings for a [`Client`]; start from [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    timeout: Duration,
    connect_timeout: Duration,
    max_frame: usize,
    /// A user name (`None`: the default user) and password, sent on every (re)connect.
    credentials: Option<(Option<String>, Zeroizing<String>)>,
    /// For connecting to a worker directly, in a cluster with a secret.
    secret: Option<ClusterSecret>,
    /// TLS, for a server whose port speaks it.
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame", &self.max_frame)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME + 1024,
            credentials: None,
            secret: None,
            tls: None,
        }
    }
}

impl ClientBuilder {
    /// How long a call waits for its answer (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long connecting (and reconnecting) may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The largest response frame accepted (default a little over 16 MiB).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Authenticates as the default user with `password` (the orchestrator's
    /// `--requirepass-file`), on every connection this client opens.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.credentials = Some((None, Zeroizing::new(password.into())));
        self
    }

    /// Authenticates as `user` with `password` (the orchestrator's `--users-file`), on every
    /// connection this client opens.
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((Some(user.into()), Zeroizing::new(password.into())));
        self
    }

    /// Proves the cluster secret when connecting: for talking to a worker directly (for
    /// debugging) in a cluster started with `--cluster-secret-file`.
    pub fn cluster_secret(mut self, secret: ClusterSecret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Connects over TLS, to an orchestrator started with `--tls-cert-file` (or a worker
    /// with `--tls-cluster`). The server's certificate is checked against the host of the
    /// address connected to (so a server reached by IP address needs that address in its
    /// certificate), unless [`TlsConnector::server_name`] names another.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use twincache_client::{Client, TlsConnector};
    ///
    /// let tls = TlsConnector::from_ca_file("ca.pem")?;
    /// let client = Client::builder().tls(tls).connect("127.0.0.1:7000").await?;
    ///
    /// // A server that requires client certificates (--tls-ca-cert-file):
    /// let tls = TlsConnector::from_files("ca.pem", "client.pem", "client.key")?;
    /// let client = Client::builder().tls(tls).connect("cache.internal:7000").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls(mut self, tls: TlsConnector) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Connects to `addr` (`host:port`).
    pub async fn connect(self, addr: &str) -> Result<Client, Error> {
        let conn = open(addr, &self).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                config: self,
                conn: Mutex::new(conn),
                reconnect: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

async fn open(addr: &str, config: &ClientBuilder) -> Result<Connection, Error> {
    let connect = async {
        let conn = Connection::open(
            addr,
            config.max_frame,
            config.timeout,
            config.secret.as_ref(),
            config.tls.as_ref(),
        )
        .await?;
        if let Some((user, password)) = &config.credentials {
            let mut req = Request::new(
                Op::Auth,
                Bytes::copy_from_slice(user.as_deref().unwrap_or("").as_bytes()),
            );
            req.value = Bytes::copy_from_slice(password.as_bytes());
            let resp = conn.call(&req).await?;
            if resp.status != Status::Ok {
                return Err(Error::Auth(
                    String::from_utf8_lossy(&resp.payload).into_owned(),
                ));
            }
        }
        Ok(conn)
    };
    tokio::time::timeout(config.connect_timeout, connect)
        .await
        .map_err(|_| Error::Timeout(config.connect_timeout))?
}

struct Inner {
    addr: String,
    config: ClientBuilder,
    conn: Mutex<Connection>,
    /// Serialises reconnects so a dead connection is replaced once, not once per caller.
    reconnect: tokio::sync::Mutex<()>,
}

/// A cloneable, multiplexed twincache client. See the [crate docs](crate).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.addr)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (`host:port`) with default settings.
    pub async fn connect(addr: &str) -> Result<Client, Error> {
        ClientBuilder::default().connect(addr).await
    }

    /// Settings: timeouts and frame limit.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The value stored under `key`, or `None` if there is none.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, Error> {
        let resp = self.call(Request::new(Op::Get, copy(key))).await?;
        match resp.status {
            Status::Ok => Ok(Some(resp.payload)),
            Status::NotFound => Ok(None),
            _ => Err(Error::from_response(resp)),
        }
    }

    /// Stores `value` under `key`, replacing any previous value.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<(), Error> {
        let mut req = Request::new(Op::Set, copy(key));
        req.value = value.into();
        self.expect_ok(req).await
    }

    /// Stores `value` under `key` for `ttl` (rounded down to milliseconds, at least 1 ms),
    /// after which it is gone.
    pub async fn set_with_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<(), Error> {
        let mut req = Request::new(Op::Set, copy(key));
        req.value = value.into();
        req.ttl_ms = (ttl.as_millis() as u64).max(1);
        self.expect_ok(req).await
    }

    /// Every worker's counters (keys, bytes, logical and stored bytes, compression ratio,
    /// hits, misses, expirations, evictions) on one line, as the text protocol's `stats`.
    pub async fn stats(&self) -> Result<String, Error> {
        let resp = self.call(Request::new(Op::Stats, Bytes::new())).await?;
        match resp.status {
            Status::Ok => Ok(String::from_utf8_lossy(&resp.payload).into_owned()),
            _ => Err(Error::from_response(resp)),
        }
    }

    /// Deletes `key`; true if it existed.
    pub async fn del(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        let resp = self.call(Request::new(Op::Del, copy(key))).await?;
        match resp.status {
            Status::Ok => Ok(true),
            Status::NotFound => Ok(false),
            _ => Err(Error::from_response(resp)),
        }
    }

    /// Checks that the server answers.
    pub async fn ping(&self) -> Result<(), Error> {
        self.expect_ok(Request::new(Op::Ping, Bytes::new())).await
    }

    async fn expect_ok(&self, req: Request) -> Result<(), Error> {
        let resp = self.call(req).await?;
        match resp.status {
            Status::Ok => Ok(()),
            _ => Err(Error::from_response(resp)),
        }
    }

    /// Sends a raw request and returns the raw response (any status), within the timeout.
    pub async fn call(&self, req: Request) -> Result<Response, Error> {
        self.connection().await?.call(&req).await
    }

    /// The live connection, reconnecting first if the last one died.
    async fn connection(&self) -> Result<Connection, Error> {
        let current = self.current();
        if !current.is_closed() {
            return Ok(current);
        }
        let _guard = self.inner.reconnect.lock().await;
        let current = self.current();
        if !current.is_closed() {
            return Ok(current);
        }
        let fresh = open(&self.inner.addr, &self.inner.config).await?;
        *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    fn current(&self) -> Connection {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn copy(key: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(key.as_ref())
}
