//! The one error type of the crate, telling apart what a caller handles differently: a
//! timeout, a dropped connection, a server's answer, and a call refused before it was sent.

use std::time::Duration;

use twincache_protocol::frame::Response;
use twincache_protocol::Status;

/// What went wrong with a call.
///
/// [`Error::is_retryable`] says whether the same call may succeed later; [`Error::is_timeout`]
/// and [`Error::is_connection_dropped`] tell the two retryable transport failures apart, as
/// redis-rs does, because a write that timed out or lost its connection may or may not have
/// been applied.
///
/// New variants may be added (the enum is `#[non_exhaustive]`), so a `match` needs a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting or talking to the server failed at the socket level.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// No answer within the configured timeout; the request may or may not have been applied.
    /// A connection on which requests time out while nothing at all comes back is closed, so
    /// the next call reconnects.
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
    /// The connection's send buffer is full, or 16,777,216 requests wait for answers on it:
    /// the server is not keeping up (or not reading at all). Nothing was sent; retry later.
    #[error("the connection's send buffer is full; the server is not keeping up")]
    Overloaded,
    /// The server answered with an error status.
    #[error("server answered {status:?}: {message}")]
    Server { status: Status, message: String },
    /// The request is larger than the server accepts (see `ClientBuilder::max_request`).
    /// Nothing was sent, so no other request on the connection is affected; sending it again
    /// fails again.
    #[error(
        "request of {size} bytes exceeds the limit of {limit} bytes (the orchestrator's \
         --max-frame; ClientBuilder::max_request sets the client's side)"
    )]
    TooLarge { size: usize, limit: usize },
    /// The call's arguments (or the client's settings, or a URL) are not valid; nothing was
    /// sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The answer could not be read as the type asked for (a value that is not UTF-8 read as a
    /// `String`, a missing key read as a non-`Option` type, ...).
    #[error("cannot read the answer as {target}: {reason}")]
    Type {
        /// The type asked for.
        target: &'static str,
        /// What the answer was instead.
        reason: String,
    },
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
    /// unreachable pair). Parse errors, oversized requests and bad arguments will fail again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io(_) | Error::Timeout(_) | Error::ConnectionClosed | Error::Overloaded => true,
            Error::Server { status, .. } => {
                matches!(status, Status::Unavailable | Status::ServerError)
            }
            Error::Auth(_)
            | Error::Tls(_)
            | Error::TooLarge { .. }
            | Error::InvalidArgument(_)
            | Error::Type { .. } => false,
        }
    }

    /// The code of a Redis error reply (its first word: `WRONGTYPE`, `ERR`, `TRYAGAIN`, ...),
    /// for an [`Error::Server`] answering a command; `None` for other errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Server { message, .. } => message
                .split(' ')
                .next()
                .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase())),
            _ => None,
        }
    }

    /// Whether no answer came in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout(_))
    }

    /// Whether the connection was lost (or could not be made) before the answer came.
    pub fn is_connection_dropped(&self) -> bool {
        matches!(self, Error::ConnectionClosed | Error::Io(_))
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

    pub(crate) fn from_response(resp: Response) -> Error {
        Error::Server {
            status: resp.status,
            message: String::from_utf8_lossy(&resp.payload).into_owned(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidArgument(msg.into())
    }

    pub(crate) fn type_error(target: &'static str, reason: impl Into<String>) -> Error {
        Error::Type {
            target,
            reason: reason.into(),
        }
    }
}
