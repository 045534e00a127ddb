//! What answers at a worker address: a worker (and which one, by its boot id), or something
//! else that was given by mistake.
//!
//! A worker listed twice (`127.0.0.1 7422 localhost 7422`) looked like a pair in sync, false
//! redundancy; an orchestrator listed as a worker (its own address, or another's) was shown
//! down while its partner served alone; a Redis server at a worker address was just "not
//! answering". [`check_workers`] runs when the binary starts: a worker given twice and an
//! orchestrator given as a worker are errors, anything else that is not a worker is named in
//! the log. The health monitor names what sits at an address whose worker goes down, and
//! keeps a worker seen twice out of its pairs (see `health`).
//!
//! Telling them apart costs two probes: a worker's `status` over the binary protocol (a
//! worker answers its boot id, or code 8 if it wants the cluster secret; an orchestrator
//! refuses the op from clients with code 3), and, when that gets no answer, `PING` as a text
//! line (a Redis server answers `+PONG`, an orchestrator `0||PONG`, a worker, which speaks
//! only frames, nothing).

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twincache_client::Connection;
use twincache_protocol::auth::ClusterSecret;
use twincache_protocol::frame::{Op, Request, DEFAULT_MAX_FRAME};
use twincache_protocol::Status;
use twincache_tls::Connector;

/// What answered at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A worker, with its boot id (unique to one run of one worker).
    Worker(u64),
    /// A worker that wants the cluster secret (or another one than given).
    Locked,
    /// A twincache orchestrator.
    Orchestrator,
    /// A Redis server (or another server speaking RESP).
    Redis,
    /// Something that accepted the connection and answered neither probe as expected.
    Unknown,
    /// Nothing could be reached there.
    Unreachable,
}

impl Identity {
    /// How the log names it.
    pub fn describe(&self) -> &'static str {
        match self {
            Identity::Worker(_) => "a twincache worker",
            Identity::Locked => "a twincache worker that wants the cluster secret",
            Identity::Orchestrator => "a twincache orchestrator (it answers PING with 0||PONG)",
            Identity::Redis => "a Redis server (it answers PING with +PONG)",
            Identity::Unknown => "not a twincache worker (it does not speak the worker protocol)",
            Identity::Unreachable => "unreachable",
        }
    }

    /// Whether it is certainly not a worker.
    pub fn is_misplaced(&self) -> bool {
        matches!(
            self,
            Identity::Orchestrator | Identity::Redis | Identity::Unknown
        )
    }
}

/// Asks what runs at `addr`, each probe within `timeout`, dialling as the worker links do
/// (the cluster secret, TLS with `--tls-cluster`).
pub async fn identify(
    addr: &str,
    secret: Option<&ClusterSecret>,
    tls: Option<&Connector>,
    timeout: Duration,
) -> Identity {
    let probe = async {
        let conn = Connection::open(addr, DEFAULT_MAX_FRAME, timeout, secret, tls).await;
        let conn = match conn {
            Ok(conn) => conn,
            Err(twincache_client::Error::Auth(_)) => return Some(Identity::Locked),
            Err(twincache_client::Error::Io(_)) => return Some(Identity::Unreachable),
            Err(_) => return None,
        };
        let answer = conn.call(&Request::new(Op::Status, Bytes::new())).await;
        conn.close();
        match answer.ok()? {
            r if r.status == Status::Ok => {
                let seen = crate::health::parse(&String::from_utf8_lossy(&r.payload));
                Some(Identity::Worker(seen.boot_id))
            }
            r if r.status == Status::NoAuth => Some(Identity::Locked),
            r if r.status == Status::InvalidCommand => Some(Identity::Orchestrator),
            _ => None,
        }
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Some(identity)) => identity,
        _ => ping_as_text(addr, timeout).await,
    }
}

/// Sends `PING` as a line and names what answers.
async fn ping_as_text(addr: &str, timeout: Duration) -> Identity {
    let probe = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut answer = [0u8; 16];
        let mut got = 0;
        while got < 7 {
            match stream.read(&mut answer[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        Some(answer[..got].to_vec())
    };
    match tokio::time::timeout(timeout, probe).await {
        // Silence is no proof of a stranger: a worker busy with a queue of heavy requests
        // answers neither probe in time either.
        Ok(None) | Err(_) => Identity::Unreachable,
        Ok(Some(answer)) if answer.starts_with(b"+PONG") => Identity::Redis,
        Ok(Some(answer)) if answer.starts_with(b"0||PONG") => Identity::Orchestrator,
        Ok(Some(_)) => Identity::Unknown,
    }
}

/// Identifies every worker address at start, at once: the same worker at two addresses, or
/// an orchestrator at a worker address, is an error (the message says which); any other
/// non-worker is logged as an error and left to the health monitor, which shows it down.
/// Addresses that do not answer are workers not started yet, and fine.
pub async fn check_workers(
    workers: &[String],
    secret: Option<&ClusterSecret>,
    tls: Option<&Connector>,
    timeout: Duration,
) -> Result<(), String> {
    let found = join_all(workers.iter().map(|w| identify(w, secret, tls, timeout))).await;
    for (i, (addr, identity)) in workers.iter().zip(&found).enumerate() {
        match identity {
            Identity::Worker(boot) => {
                let twin = workers[..i]
                    .iter()
                    .zip(&found)
                    .find(|(_, other)| **other == Identity::Worker(*boot));
                if let Some((first, _)) = twin {
                    return Err(format!(
                        "{first} and {addr} are the same worker (boot id {boot:016x}): a pair \
                         needs two workers, or it only looks redundant"
                    ));
                }
            }
            Identity::Orchestrator => {
                return Err(format!(
                    "{addr}, given as a worker, is {} (this one or another): give the \
                     workers' addresses",
                    identity.describe()
                ))
            }
            other if other.is_misplaced() => {
                tracing::error!(
                    worker = %addr,
                    "this worker address is {}, not a twincache worker: check the workers given",
                    other.describe()
                )
            }
            _ => {}
        }
    }
    Ok(())
}
