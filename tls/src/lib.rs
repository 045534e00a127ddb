//! TLS for twincache: certificates from PEM files, the configs that accept and open TLS
//! connections, and their reload without dropping a connection.
//!
//! rustls with the ring provider, through tokio-rustls. Everything TLS-specific lives here, so
//! the servers and the client library only ever see a stream that is `AsyncRead +
//! AsyncWrite`: a session, a worker connection or a link is generic over it, and a plaintext
//! one keeps the plain `TcpStream` path it had.
//!
//! Layout: [`TlsFiles`] (what a node was given) and [`NodeTls`] (the configs made from them,
//! swapped whole on reload), [`Connector`] (opening connections: a node's links, or the client
//! library's [`Connector::from_ca_file`]), [`TlsError`] (what can be wrong with the files).
//!
//! ## Reload
//! A node's server and client configs sit together behind one [`ArcSwap`]. [`NodeTls::reload`]
//! reads every file again and builds new configs; only if all of them load does it swap them
//! in, so a half-written or mismatched file leaves the node with what it had. New handshakes
//! take the configs current when they start; an established connection keeps the config it
//! was made with (rustls holds its own `Arc`), so nothing is dropped. The whole config is
//! rebuilt, not only the certificate (which a rustls `ResolvesServerCert` over an `ArcSwap`
//! would do): the CA bundle rotates too, which is what a CA change needs.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use rustls;
pub use tokio_rustls::client::TlsStream as ClientStream;
pub use tokio_rustls::server::TlsStream as ServerStream;

/// The first byte of every TLS connection (a handshake record). A plaintext protocol never
/// starts with it: the text protocol's verbs, RESP's `*`, and the binary preamble's 0xB7.
pub const HANDSHAKE_BYTE: u8 = 0x16;

/// Whether the first byte the peer sent opens a TLS handshake, looked at without taking it
/// from the socket. `false` also for a peer that closed without sending anything.
pub async fn starts_with_handshake(stream: &TcpStream) -> io::Result<bool> {
    let mut first = [0u8; 1];
    Ok(stream.peek(&mut first).await? == 1 && first[0] == HANDSHAKE_BYTE)
}

/// What became of a connection on a TLS port.
pub enum Accepted {
    /// The handshake is done: serve the session.
    Tls(Box<ServerStream<TcpStream>>),
    /// The peer speaks plaintext; its bytes are still unread, for the server to answer in
    /// the peer's protocol that this port needs TLS.
    Plaintext(TcpStream),
    /// The handshake failed (a certificate refused, garbage, the peer gone).
    Failed(io::Error),
    /// The handshake was not done by the deadline.
    TimedOut,
}

/// What can be wrong with TLS files; each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not PEM: {detail}")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "{what} {path} holds no private key (PEM PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE \
         KEY` or SEC1 `EC PRIVATE KEY`)"
    )]
    NoKey { what: &'static str, path: PathBuf },
    #[error("the private key in {key} cannot be used: {detail}")]
    BadKey { key: PathBuf, detail: String },
    #[error(
        "the private key in {key_what} {key} does not belong to the certificate in \
         {cert_what} {cert}"
    )]
    Mismatch {
        cert_what: &'static str,
        cert: PathBuf,
        key_what: &'static str,
        key: PathBuf,
    },
    #[error("{what} {path}: {detail}")]
    BadCa {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("`{0}` is not a server name TLS can check (a host name or an IP address)")]
    ServerName(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Whether the server asks connecting peers for a certificate signed by the CA
/// (`--tls-auth-clients`, as Redis names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthClients {
    /// Required: a peer without a valid certificate is refused.
    #[default]
    Yes,
    /// Asked for and checked if given, but a peer may connect without one.
    Optional,
    /// Not asked for.
    No,
}

impl std::str::FromStr for AuthClients {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "yes" => Ok(AuthClients::Yes),
            "optional" => Ok(AuthClients::Optional),
            "no" => Ok(AuthClients::No),
            _ => Err(format!("`{s}` is not yes, optional or no")),
        }
    }
}

/// The TLS files a node was given, and what each is for.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM, leaf first): what its port presents, and what its
    /// cluster links present to a worker that asks for a client certificate.
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM).
    pub key: Option<PathBuf>,
    /// The CAs peers' certificates must chain to (PEM bundle).
    pub ca: Option<PathBuf>,
    /// Whether connecting peers must present a certificate signed by `ca`.
    pub auth_clients: AuthClients,
}

impl TlsFiles {
    /// The files as a node's flags give them; `auth_clients` is `--tls-auth-clients`
    /// (`yes`, `optional` or `no`; anything else reads as `yes`, the safe side).
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        auth_clients: &str,
    ) -> TlsFiles {
        TlsFiles {
            cert: cert.map(Path::to_path_buf),
            key: key.map(Path::to_path_buf),
            ca: ca.map(Path::to_path_buf),
            auth_clients: auth_clients.parse().unwrap_or_default(),
        }
    }
}

/// Which configs a node needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Accepts TLS connections on its port (needs a certificate and key).
    pub serve: bool,
    /// Opens TLS connections to other nodes (needs a CA to check them).
    pub connect: bool,
}

/// One generation of a node's configs, built from its files together.
struct Configs {
    server: Option<Arc<ServerConfig>>,
    client: Option<Arc<ClientConfig>>,
}

/// A node's TLS: the configs its files make, reloadable (see the crate docs).
pub struct NodeTls {
    files: TlsFiles,
    roles: Roles,
    current: ArcSwap<Configs>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("files", &self.files)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads the files for `roles`; every problem is an error here, at start, not at the
    /// first connection.
    pub fn load(files: TlsFiles, roles: Roles) -> Result<Arc<NodeTls>, TlsError> {
        let configs = build(&files, roles)?;
        Ok(Arc::new(NodeTls {
            files,
            roles,
            current: ArcSwap::from_pointee(configs),
        }))
    }

    /// Whether this node's port speaks TLS.
    pub fn serves(&self) -> bool {
        self.roles.serve
    }

    /// Reads the files again and, if they all load, makes them the configs of every new
    /// handshake. On an error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let configs = build(&self.files, self.roles)?;
        self.current.store(Arc::new(configs));
        Ok(())
    }

    /// Reloads on every change of `signal` (the binaries' SIGHUP channel) until its sender is
    /// gone, logging the outcome: a failed reload keeps the certificates in use.
    pub async fn reload_on(self: Arc<Self>, mut signal: tokio::sync::watch::Receiver<u64>) {
        while signal.changed().await.is_ok() {
            match self.reload() {
                Ok(()) => tracing::info!(
                    cert = ?self.files.cert,
                    ca = ?self.files.ca,
                    "TLS certificates reloaded; new connections use them"
                ),
                Err(e) => {
                    tracing::error!("TLS reload failed, keeping the certificates in use: {e}")
                }
            }
        }
    }

    /// Runs the server side of a handshake on `stream` with the current config. The caller
    /// bounds it with a deadline: a peer that stalls mid-handshake holds a slot until then.
    pub async fn accept<IO>(&self, stream: IO) -> io::Result<ServerStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        tokio_rustls::TlsAcceptor::from(self.server_config()?)
            .accept(stream)
            .await
    }

    /// Accepts a connection on a TLS port by `deadline` (the server's opening deadline, so
    /// a peer that stalls mid-handshake is cut off like one that stalls before its first
    /// request), telling a plaintext peer apart by its first byte.
    pub async fn accept_by(&self, stream: TcpStream, deadline: tokio::time::Instant) -> Accepted {
        let handshake = async {
            if !starts_with_handshake(&stream).await? {
                return Ok(Err(stream));
            }
            let config = self.server_config()?;
            match tokio_rustls::TlsAcceptor::from(config)
                .accept(stream)
                .into_fallible()
                .await
            {
                Ok(session) => Ok(Ok(session)),
                Err((e, mut stream)) => {
                    linger(&mut stream).await;
                    Err(e)
                }
            }
        };
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(Ok(session))) => Accepted::Tls(Box::new(session)),
            Ok(Ok(Err(plain))) => Accepted::Plaintext(plain),
            Ok(Err(e)) => Accepted::Failed(e),
            Err(_) => Accepted::TimedOut,
        }
    }

    fn server_config(&self) -> io::Result<Arc<ServerConfig>> {
        self.current.load().server.clone().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "this node does not serve TLS")
        })
    }

    /// A connector for this node's cluster links, which takes the current config at each
    /// connect; `None` if this node does not connect over TLS.
    pub fn connector(self: &Arc<Self>) -> Option<Connector> {
        self.roles.connect.then(|| Connector {
            source: Source::Node(self.clone()),
            server_name: None,
        })
    }
}

/// Opens TLS connections: a node's cluster links (following its reloads), or the client
/// library's connections to an orchestrator.
#[derive(Clone)]
pub struct Connector {
    source: Source,
    /// The name to check the server's certificate against, if not the host connected to.
    server_name: Option<ServerName<'static>>,
}

#[derive(Clone)]
enum Source {
    Fixed(Arc<ClientConfig>),
    Node(Arc<NodeTls>),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Trusts the CAs in `ca` (a PEM bundle) and presents no certificate of its own.
    pub fn from_ca_file(ca: impl AsRef<Path>) -> Result<Connector, TlsError> {
        let roots = load_roots("CA file", ca.as_ref())?;
        let config = client_builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector::from_config(Arc::new(config)))
    }

    /// Trusts the CAs in `ca` and presents the certificate in `cert` with its key `key` (all
    /// PEM), for a server that requires client certificates.
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Connector, TlsError> {
        let roots = load_roots("CA file", ca.as_ref())?;
        let certified = load_certified_key(
            ("certificate file", cert.as_ref()),
            ("key file", key.as_ref()),
        )?;
        let config = client_builder()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        Ok(Connector::from_config(Arc::new(config)))
    }

    /// Any rustls client config (built with the crate's re-exported [`rustls`]).
    pub fn from_config(config: Arc<ClientConfig>) -> Connector {
        Connector {
            source: Source::Fixed(config),
            server_name: None,
        }
    }

    /// Checks the server's certificate against `name` (a host name or an IP address) instead
    /// of the host connected to: for connecting by an address the certificate does not name.
    pub fn server_name(mut self, name: &str) -> Result<Connector, TlsError> {
        self.server_name = Some(parse_server_name(name)?);
        Ok(self)
    }

    /// Runs the client side of a handshake over `stream`, checking the server's certificate
    /// against the host of `addr` (`host:port`) unless a server name was set.
    pub async fn connect<IO>(&self, addr: &str, stream: IO) -> io::Result<ClientStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => parse_server_name(host_of(addr))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        };
        let config = match &self.source {
            Source::Fixed(config) => config.clone(),
            Source::Node(node) => node.current.load().client.clone().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "this node does not connect over TLS",
                )
            })?,
        };
        tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
    }
}

/// After a failed handshake (whose alert rustls has sent), stops sending and reads what the
/// peer still sends, for at most a second. Closing with unread input would reset the
/// connection, and the reset can destroy the alert before the peer reads it: in TLS 1.3 a
/// client learns that its certificate was refused only from that alert, after it has
/// started sending requests.
async fn linger(stream: &mut TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = 64usize * 1024;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        // A bare IPv6 address has more than one colon.
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => addr,
    }
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// The one crypto provider every config uses, chosen explicitly: a process default would
/// be ambiguous if another dependency ever enabled a second provider.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn client_builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError>
{
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))
}

fn build(files: &TlsFiles, roles: Roles) -> Result<Configs, TlsError> {
    let certified = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => Some(Arc::new(load_certified_key(
            ("--tls-cert-file", cert),
            ("--tls-key-file", key),
        )?)),
        (None, None) => None,
        _ => {
            return Err(TlsError::Config(
                "--tls-cert-file and --tls-key-file go together".into(),
            ))
        }
    };
    let roots = files
        .ca
        .as_deref()
        .map(|ca| load_roots("--tls-ca-cert-file", ca))
        .transpose()?
        .map(Arc::new);
    let server = if roles.serve {
        let certified = certified.clone().ok_or_else(|| {
            TlsError::Config("serving TLS needs --tls-cert-file and --tls-key-file".into())
        })?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match (&roots, files.auth_clients) {
            (Some(roots), AuthClients::Yes | AuthClients::Optional) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
                let verifier = if files.auth_clients == AuthClients::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?,
                )
            }
            _ => builder.with_no_client_auth(),
        };
        Some(Arc::new(builder.with_cert_resolver(Arc::new(
            rustls::sign::SingleCertAndKey::from(certified),
        ))))
    } else {
        None
    };
    let client = if roles.connect {
        let roots = roots.ok_or_else(|| {
            TlsError::Config(
                "TLS links check the other nodes' certificates against --tls-ca-cert-file; \
                 give it"
                    .into(),
            )
        })?;
        let builder = client_builder()?.with_root_certificates(roots);
        Some(Arc::new(match certified {
            // Presented to workers that ask for a client certificate.
            Some(certified) => builder.with_client_cert_resolver(Arc::new(
                rustls::sign::SingleCertAndKey::from(certified),
            )),
            None => builder.with_no_client_auth(),
        }))
    } else {
        None
    };
    Ok(Configs { server, client })
}

/// Reads a certificate chain and its key, and checks that they belong together (a key from
/// another certificate would otherwise fail every handshake, with a less helpful message).
fn load_certified_key(
    (cert_what, cert): (&'static str, &Path),
    (key_what, key): (&'static str, &Path),
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert_what, cert)?;
    let der = match PrivateKeyDer::from_pem_file(key) {
        Ok(der) => der,
        Err(e) => return Err(pem_error(key_what, key, e, true)),
    };
    let certified = CertifiedKey::from_der(chain, der, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert_what,
            cert: cert.to_path_buf(),
            key_what,
            key: key.to_path_buf(),
        },
        other => TlsError::BadKey {
            key: key.to_path_buf(),
            detail: other.to_string(),
        },
    })?;
    Ok(certified)
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e, false))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e, false))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn pem_error(
    what: &'static str,
    path: &Path,
    e: rustls_pki_types::pem::Error,
    key: bool,
) -> TlsError {
    use rustls_pki_types::pem::Error;
    let path = path.to_path_buf();
    match e {
        Error::Io(source) => TlsError::Read { what, path, source },
        Error::NoItemsFound if key => TlsError::NoKey { what, path },
        Error::NoItemsFound => TlsError::NoCertificate { what, path },
        other => TlsError::NotPem {
            what,
            path,
            detail: other.to_string(),
        },
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;
