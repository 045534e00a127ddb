//! The one error type of the crate. Its variants are sorted by who can fix the problem, because
//! that decides the exit code: the operator's input (flags, URLs, files: exit 2), a server that
//! cannot be reached (exit 2), or something that went wrong in the middle of a run (exit 1).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag combination or value that cannot work.
    #[error("{0}")]
    Usage(String),
    /// A Redis URL the `redis` crate does not accept.
    #[error("bad {what} URL `{url}`: {reason}")]
    BadUrl {
        what: &'static str,
        url: String,
        reason: String,
    },
    /// A server that refused or did not answer the first connection.
    #[error("{what} redis at {addr} is unreachable: {reason}")]
    Unreachable {
        what: &'static str,
        addr: String,
        reason: String,
    },
    /// A registry, checkpoint or backup file that cannot be read or does not parse.
    #[error("{}: {msg}", path.display())]
    Malformed { path: PathBuf, msg: String },
    /// A registry that parses but does not hold together (unknown versions, no path, ...).
    #[error("{0}")]
    Registry(String),
    /// Redis failed in the middle of a run (after the first connection worked).
    #[error("{what} redis: {source}")]
    Redis {
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
    /// A local file could not be written (checkpoint, backup).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Interrupted (Ctrl-C) after the batches in flight finished (and the checkpoint, if
    /// any, was brought up to date).
    #[error("interrupted before the end of the run")]
    Interrupted,
}

impl Error {
    /// 2 for what the operator must fix before the command can run, 1 for a failed run.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_)
            | Error::BadUrl { .. }
            | Error::Unreachable { .. }
            | Error::Malformed { .. }
            | Error::Registry(_) => 2,
            Error::Redis { .. } | Error::Io { .. } => 1,
            Error::Interrupted => 130,
        }
    }

    pub(crate) fn malformed(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Error {
        Error::Malformed {
            path: path.into(),
            msg: msg.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
