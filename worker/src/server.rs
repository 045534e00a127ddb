//! Serving frames over TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use twincache_protocol::frame::{
    encode_frame, FrameCodec, FrameError, Op, Request, Response, PREAMBLE,
};
use twincache_protocol::server::accept_loop;
use twincache_protocol::Status;

use crate::config::Config;
use crate::store::Store;

/// Stop reading more requests once this many response bytes wait to be written.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// A bound, not yet running, worker.
pub struct Worker {
    listener: TcpListener,
    config: Config,
    store: Arc<Store>,
}

impl Worker {
    /// Binds the listening socket (so the caller learns the port before serving starts).
    pub async fn bind(config: Config) -> std::io::Result<Worker> {
        let listener = TcpListener::bind((config.bind, config.port)).await?;
        Ok(Worker {
            listener,
            config,
            store: Arc::new(Store::new()),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The worker's store (for embedding and tests).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let store = self.store;
        let max_frame = self.config.max_frame as usize;
        accept_loop(
            self.listener,
            self.config.max_connections,
            shutdown,
            self.config.shutdown_grace,
            move |stream, shutdown| {
                let store = store.clone();
                async move {
                    if let Err(e) = serve_connection(stream, store, max_frame, shutdown).await {
                        tracing::debug!(error = %e, "worker connection ended");
                    }
                }
            },
        )
        .await;
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    store: Arc<Store>,
    max_frame: usize,
    shutdown: CancellationToken,
) -> Result<(), FrameError> {
    let mut preamble = [0u8; 4];
    tokio::select! {
        res = stream.read_exact(&mut preamble) => { res?; }
        _ = shutdown.cancelled() => return Ok(()),
    }
    if preamble != PREAMBLE {
        let mut out = BytesMut::new();
        encode_frame(
            &Response::error(
                Status::ParseError,
                "bad preamble: expected twincache binary protocol v1",
            ),
            &mut out,
        );
        let _ = stream.write_all(&out).await;
        return Err(FrameError::Malformed("bad preamble"));
    }
    let mut codec = FrameCodec::<Request>::new(max_frame);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let n = tokio::select! {
            n = stream.read_buf(&mut buf) => n?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(req)) => {
                    let id = req.id;
                    encode_frame(&handle(&store, req).with_id(id), &mut out);
                    if out.len() >= OUT_HIGH_WATER {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let status = match e {
                        FrameError::TooLong { .. } => Status::TooLarge,
                        _ => Status::ParseError,
                    };
                    encode_frame(&Response::status(status), &mut out);
                    let _ = stream.write_all(&out).await;
                    return Err(e);
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
}

/// Answers one request from the store.
pub fn handle(store: &Store, req: Request) -> Response {
    if req.key.is_empty() && matches!(req.op, Op::Get | Op::Set | Op::Del) {
        return Response::error(Status::ParseError, "empty key");
    }
    match req.op {
        Op::Get => match store.get(&req.key) {
            Ok(Some(value)) => Response::ok(value),
            Ok(None) => Response::status(Status::NotFound),
            Err(e) => {
                tracing::error!(error = %e, "stored value cannot be opened");
                Response::error(Status::ServerError, "stored value is corrupt")
            }
        },
        Op::Set => {
            store.set(&req.key, &req.value, req.version);
            Response::ok(Bytes::new())
        }
        Op::Del => {
            if store.del(&req.key, req.version) {
                Response::ok(Bytes::new())
            } else {
                Response::status(Status::NotFound)
            }
        }
        Op::Ping => Response::ok(Bytes::from_static(b"PONG")),
        Op::Unknown(_) => Response::status(Status::InvalidCommand),
    }
}
