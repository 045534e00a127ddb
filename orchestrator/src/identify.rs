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
    /// Something that answered `PING` with bytes that are neither Redis' nor an
    /// orchestrator's: certainly not a worker, which answers a line with nothing.
    Unknown,
    /// Something that accepted the connection but answered neither probe in time (or closed
    /// it without a byte): a worker busy with a queue, or stopped, looks just so, so this
    /// proves nothing.
    Silent,
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
            Identity::Silent => {
                "silent: it took the connection but answered nothing in time (as a busy or \
                 stopped worker does)"
            }
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
        Ok(None) => Identity::Unreachable,
        // Silence is no proof of a stranger: a worker busy with a queue of heavy requests
        // answers neither probe in time either, and any worker closes a connection that
        // opens with a line, without a byte.
        Err(_) => Identity::Silent,
        Ok(Some(answer)) if answer.is_empty() => Identity::Silent,
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
    let found = join_all(
        workers
            .iter()
            .map(|w| identify(crate::config::dialed(w), secret, tls, timeout)),
    )
    .await;
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
                    "this worker address is {}: check the workers given",
                    other.describe()
                )
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server on a loopback port that reads what comes and answers each connection with
    /// `answer` (then closes), or, with `None`, keeps it open and says nothing.
    async fn server(answer: Option<&'static [u8]>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let _ = stream.read(&mut buf).await;
                    match answer {
                        Some(answer) => {
                            let _ = stream.write_all(answer).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(5)).await,
                    }
                });
            }
        });
        addr
    }

    /// Only an answer that no worker gives names an address as not a worker: silence (a
    /// busy or stopped worker) or a connection closed without a byte (how a worker treats
    /// a line) is said as such, and is not an error.
    #[tokio::test]
    async fn only_a_foreign_answer_says_not_a_worker() {
        let t = Duration::from_millis(200);
        let cases: [(Option<&'static [u8]>, Identity); 5] = [
            (None, Identity::Silent),
            (Some(b""), Identity::Silent),
            (Some(b"+PONG\r\n"), Identity::Redis),
            (Some(b"0||PONG\n"), Identity::Orchestrator),
            (Some(b"HTTP/1.1 400 Bad Request\r\n"), Identity::Unknown),
        ];
        for (answer, want) in cases {
            let addr = server(answer).await;
            let got = identify(&addr, None, None, t).await;
            assert_eq!(got, want, "answering {answer:?}");
            assert_eq!(
                got.is_misplaced(),
                want == Identity::Unknown
                    || want == Identity::Redis
                    || want == Identity::Orchestrator
            );
        }
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        assert_eq!(identify(&addr, None, None, t).await, Identity::Unreachable);
    }
}
