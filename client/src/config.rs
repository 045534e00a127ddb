//! Settings of a [`Client`]: the builder, and the addresses and URLs it connects to.
//!
//! A target is one address (`host:port`), several separated by commas (orchestrators to
//! spread over and fail over between), or a URL carrying credentials and settings too:
//!
//! ```text
//! twincache://[user:password@]host:port[,host:port...][/][?timeout=2s&connect_timeout=500ms&max_request=16MiB&max_frame=16MiB]
//! ```
//!
//! A missing port is 7000, the orchestrator's default. `twincache://:password@host` is the
//! default user with a password (as in `redis://` URLs); user and password are
//! percent-decoded, so `%40` is an `@`. Durations need a unit (`ms`, `s`, `m`, `h`) and sizes
//! take one (`KiB`, `MiB`, ...), as on the servers' command lines. What the URL says wins over
//! what the builder was told.

use std::sync::Arc;
use std::time::Duration;

use twincache_protocol::auth::ClusterSecret;
use twincache_protocol::frame::DEFAULT_MAX_FRAME;
use twincache_protocol::units::{parse_positive_duration, parse_size};
use zeroize::Zeroizing;

use crate::{Client, Error, TlsConnector};

/// The orchestrator's default client port, for addresses given without one.
pub const DEFAULT_PORT: u16 = 7000;

/// Settings for a [`Client`]; start from [`Client::builder`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
/// # let addr = cluster.addr().to_string();
/// use std::time::Duration;
/// use twincache_client::Client;
///
/// let client = Client::builder()
///     .timeout(Duration::from_millis(500))
///     .connect_timeout(Duration::from_secs(1))
///     .connect(&addr)
///     .await?;
/// client.ping().await?;
///
/// // The same settings as a URL.
/// let client = Client::connect(&format!("twincache://{addr}?timeout=500ms&connect_timeout=1s")).await?;
/// client.ping().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClientBuilder {
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) max_request: usize,
    /// A user name (`None`: the default user) and password, sent on every (re)connect.
    pub(crate) credentials: Option<(Option<String>, Zeroizing<String>)>,
    /// For connecting to a worker directly, in a cluster with a secret.
    pub(crate) secret: Option<ClusterSecret>,
    /// TLS, for a server whose port speaks it.
    pub(crate) tls: Option<TlsConnector>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame", &self.max_frame)
            .field("max_request", &self.max_request)
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
            max_request: DEFAULT_MAX_FRAME,
            credentials: None,
            secret: None,
            tls: None,
        }
    }
}

impl ClientBuilder {
    /// How long a call waits for its answer (default 5 s). A connection on which calls time
    /// out while nothing at all comes back for this long is replaced by the next call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long connecting (and reconnecting) to one address may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The largest response frame accepted (default a little over 16 MiB). A larger answer
    /// fails its own call with a `TooLarge` status; the connection and other calls go on.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// The largest request frame sent (default 16 MiB, the orchestrator's default
    /// `--max-frame`): a larger request fails with [`Error::TooLarge`] before it is sent.
    /// The server closes a connection that sends it a frame over its limit, failing every
    /// other call in flight on it, so set this to the server's `--max-frame` if that differs.
    /// A frame is the key and value plus 34 bytes.
    pub fn max_request(mut self, bytes: usize) -> Self {
        self.max_request = bytes;
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

    /// Connects to `target` (see [`Client::connect`] for what it may be) now: fails if no
    /// address of it can be reached.
    pub async fn connect(self, target: &str) -> Result<Client, Error> {
        let client = self.build(target)?;
        client.connection().await?;
        Ok(client)
    }

    /// A client for `target` that connects on its first call, so an application can start
    /// before the cluster does. Only the target's form is checked here.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use twincache_client::Client;
    ///
    /// // Nothing listens yet: building succeeds, the first call says why it could not connect.
    /// let client = Client::builder().build("127.0.0.1:1")?;
    /// assert!(client.ping().await.unwrap_err().is_connection_dropped());
    /// # Ok(())
    /// # }
    /// ```
    pub fn build(self, target: &str) -> Result<Client, Error> {
        let (addrs, config) = self.with_target(target)?;
        if config.timeout.is_zero() || config.connect_timeout.is_zero() {
            return Err(Error::invalid("timeouts must be more than zero"));
        }
        Ok(Client::new(addrs, config))
    }

    /// The addresses of `target`, and these settings with what a URL says applied.
    fn with_target(mut self, target: &str) -> Result<(Arc<[String]>, ClientBuilder), Error> {
        let target = target.trim();
        let Some(rest) = target.strip_prefix("twincache://") else {
            if let Some((scheme, _)) = target.split_once("://") {
                return Err(Error::invalid(format!(
                    "unknown URL scheme `{scheme}://`: use twincache://"
                )));
            }
            return Ok((addresses(target)?, self));
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let hosts = match hosts.split_once('/') {
            Some((h, "" | "0")) => h,
            Some((_, path)) => {
                return Err(Error::invalid(format!(
                    "the URL path `/{path}` means nothing to twincache (it has one database)"
                )))
            }
            None => hosts,
        };
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo.split_once(':').ok_or_else(|| {
                Error::invalid("a URL user needs a password: twincache://user:password@host")
            })?;
            let password = percent_decode(password)?;
            self = if user.is_empty() {
                self.password(password)
            } else {
                self.user(percent_decode(user)?, password)
            };
        }
        for option in query.split('&').filter(|o| !o.is_empty()) {
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            let bad = |e: String| Error::invalid(format!("URL option {name}: {e}"));
            match name {
                "timeout" => self.timeout = parse_positive_duration(value).map_err(bad)?,
                "connect_timeout" => {
                    self.connect_timeout = parse_positive_duration(value).map_err(bad)?
                }
                "max_frame" => self.max_frame = size(value).map_err(bad)?,
                "max_request" => self.max_request = size(value).map_err(bad)?,
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown URL option `{name}` (known: timeout, connect_timeout, \
                         max_frame, max_request)"
                    )))
                }
            }
        }
        Ok((addresses(hosts)?, self))
    }
}

fn size(value: &str) -> Result<usize, String> {
    let n = parse_size(value)?;
    usize::try_from(n).map_err(|_| format!("`{value}` is too large"))
}

/// `host:port[,host:port...]`, each checked for form (not resolved: that happens on connect),
/// with the default port where none is given.
fn addresses(list: &str) -> Result<Arc<[String]>, Error> {
    let addrs = list
        .split(',')
        .map(str::trim)
        .map(address)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(addrs.into())
}

fn address(addr: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::invalid(format!("`{addr}` is not host:port: {why}"));
    if addr.is_empty() {
        return Err(bad("empty"));
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`; a bare IPv6 address has colons of its own.
    let (host, port) = if let Some(v6) = addr.strip_prefix('[') {
        let (ip, after) = v6.split_once(']').ok_or_else(|| bad("no closing `]`"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?),
        };
        (format!("[{ip}]"), port)
    } else if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        (format!("[{addr}]"), None)
    } else {
        match addr.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (addr.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("no host"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
    };
    Ok(format!("{host}:{port}"))
}

/// `%XX` escapes to bytes, the result UTF-8 (user names and passwords are strings).
fn percent_decode(s: &str) -> Result<String, Error> {
    let bad = || Error::invalid("malformed %-escape in the URL's user or password");
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
            let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(t: &str) -> Result<(Vec<String>, ClientBuilder), Error> {
        ClientBuilder::default()
            .with_target(t)
            .map(|(a, c)| (a.to_vec(), c))
    }

    #[test]
    fn plain_addresses() {
        assert_eq!(target("127.0.0.1:7001").unwrap().0, ["127.0.0.1:7001"]);
        assert_eq!(
            target("a:1, b ,[::1]:3,::1,[fe80::1]").unwrap().0,
            ["a:1", "b:7000", "[::1]:3", "[::1]:7000", "[fe80::1]:7000"]
        );
        for bad in ["", "a:0", "a:x", ":7000", "a:1,", "[::1", "[::1]x", "[]:1"] {
            assert!(target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls() {
        let (addrs, c) = target(
            "twincache://al%40ice:p%3Ass@h1:7001,h2/?timeout=2s&connect_timeout=150ms&max_request=1MiB&max_frame=2MiB",
        )
        .unwrap();
        assert_eq!(addrs, ["h1:7001", "h2:7000"]);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(150));
        assert_eq!(c.max_request, 1 << 20);
        assert_eq!(c.max_frame, 2 << 20);
        let (user, password) = c.credentials.unwrap();
        assert_eq!(user.as_deref(), Some("al@ice"));
        assert_eq!(password.as_str(), "p:ss");
        // The default user, a path of /0, no options.
        let (addrs, c) = target("twincache://:secret@localhost/0").unwrap();
        assert_eq!(addrs, ["localhost:7000"]);
        assert!(format!("{c:?}").contains("timeout"));
        let (user, password) = c.credentials.unwrap();
        assert_eq!((user, password.as_str()), (None, "secret"));
    }

    #[test]
    fn url_mistakes_are_named() {
        let err = |t: &str| target(t).unwrap_err().to_string();
        assert!(err("redis://h:1").contains("twincache://"));
        assert!(err("twincache://h?timeout=2").contains("unit"));
        assert!(err("twincache://h?timeout=0s").contains("more than zero"));
        assert!(err("twincache://h?tiemout=2s").contains("known: timeout"));
        assert!(err("twincache://u@h").contains("password"));
        assert!(err("twincache://h/3").contains("one database"));
        assert!(err("twincache://:%zz@h").contains("escape"));
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let c = ClientBuilder::default().user("ann", "hunter2");
        let shown = format!("{c:?}");
        assert!(
            shown.contains("ann") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
