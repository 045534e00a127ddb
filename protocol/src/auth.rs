//! Cluster authentication: every connection to a worker proves, before any request is served,
//! that it knows the cluster secret, and the worker proves it back.
//!
//! A mutual challenge-response over the binary protocol, right after the preamble:
//!
//! ```text
//! initiator -> worker : cluster_hello   value = client nonce (32 random bytes)
//! worker -> initiator : ok              payload = server nonce (32) | server proof (32)
//! initiator -> worker : cluster_proof   value = client proof (32)
//! worker -> initiator : ok                                   (then requests as usual)
//!
//! server proof = HMAC-SHA256(secret, "twincache cluster server v1" | client nonce | server nonce)
//! client proof = HMAC-SHA256(secret, "twincache cluster client v1" | server nonce | client nonce)
//! ```
//!
//! The secret never crosses the wire, and both sides bring a fresh nonce, so a recorded
//! handshake replayed later proves nothing: the worker's new nonce asks for a new proof. The
//! labels keep a proof from one direction from serving in the other. Proofs are compared in
//! constant time.
//!
//! With TLS on the cluster links (`--tls-cluster`), the handshake runs inside the TLS session:
//! TLS keeps the traffic confidential and checks certificates against the CA, and this
//! handshake still proves membership of the cluster (a certificate from the same CA issued for
//! something else proves nothing here).

use std::path::Path;

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::frame::{encode_frame, Message, Op, Request, Response, PREAMBLE};
use crate::Status;

pub const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
/// Handshake frames are small; a larger one is not a handshake.
const MAX_HANDSHAKE_FRAME: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// The secret the nodes of a cluster share (`--cluster-secret-file`). Wiped from memory when
/// dropped; never printed.
#[derive(Clone)]
pub struct ClusterSecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A secret of at least 32 bytes: 64 or more hex characters (as `worker keygen`
    /// prints), or the raw bytes of the file.
    pub fn from_file(path: &Path) -> Result<ClusterSecret, String> {
        let bytes = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| format!("cannot read cluster secret file {}: {e}", path.display()))?,
        );
        ClusterSecret::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ClusterSecret, String> {
        let text = std::str::from_utf8(bytes).ok().map(str::trim);
        let secret = match text {
            Some(t)
                if t.len() >= 64
                    && t.len() % 2 == 0
                    && t.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Zeroizing::new(
                    (0..t.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).unwrap_or(0))
                        .collect(),
                )
            }
            _ => Zeroizing::new(bytes.to_vec()),
        };
        if secret.len() < 32 {
            return Err(
                "a cluster secret needs at least 32 bytes (64 hex characters); make one with \
                 `worker keygen`"
                    .into(),
            );
        }
        Ok(ClusterSecret(secret))
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any size");
        mac.update(label);
        mac.update(first);
        mac.update(second);
        mac
    }

    fn server_proof(&self, client_nonce: &[u8], server_nonce: &[u8]) -> HmacSha256 {
        self.mac(b"twincache cluster server v1", client_nonce, server_nonce)
    }

    fn client_proof(&self, client_nonce: &[u8], server_nonce: &[u8]) -> HmacSha256 {
        self.mac(b"twincache cluster client v1", server_nonce, client_nonce)
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer does not know the cluster secret")]
    WrongSecret,
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("malformed handshake")]
    Malformed,
}

fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

async fn write_frame<S: AsyncWrite + Unpin, M: Message>(
    stream: &mut S,
    msg: &M,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    encode_frame(msg, &mut out);
    stream.write_all(&out).await?;
    // Over TLS, the last bytes may wait in the session's buffer until flushed.
    stream.flush().await
}

/// Reads one small frame (at most [`MAX_HANDSHAKE_FRAME`] bytes).
async fn read_frame<S: AsyncRead + Unpin, M: Message>(stream: &mut S) -> Result<M, HandshakeError> {
    let len = stream.read_u32().await? as usize;
    if len > MAX_HANDSHAKE_FRAME {
        return Err(HandshakeError::Malformed);
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    M::decode_body(Bytes::from(body)).map_err(|_| HandshakeError::Malformed)
}

/// The initiator's side: sends the preamble, proves the secret, and checks the worker's
/// proof. The stream is then ready for requests.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: &ClusterSecret,
) -> Result<(), HandshakeError> {
    let client_nonce = nonce();
    let mut hello = Request::new(Op::ClusterHello, Bytes::new());
    hello.value = Bytes::copy_from_slice(&client_nonce);
    let mut out = BytesMut::from(&PREAMBLE[..]);
    encode_frame(&hello, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;
    let answer: Response = read_frame(stream).await?;
    if answer.status != Status::Ok {
        return Err(HandshakeError::Refused(
            String::from_utf8_lossy(&answer.payload).into_owned(),
        ));
    }
    if answer.payload.len() != NONCE_LEN + PROOF_LEN {
        return Err(HandshakeError::Malformed);
    }
    let (server_nonce, proof) = answer.payload.split_at(NONCE_LEN);
    secret
        .server_proof(&client_nonce, server_nonce)
        .verify_slice(proof)
        .map_err(|_| HandshakeError::WrongSecret)?;
    let mut reply = Request::new(Op::ClusterProof, Bytes::new());
    reply.value = Bytes::copy_from_slice(
        &secret
            .client_proof(&client_nonce, server_nonce)
            .finalize()
            .into_bytes(),
    );
    write_frame(stream, &reply).await?;
    let done: Response = read_frame(stream).await?;
    match done.status {
        Status::Ok => Ok(()),
        _ => Err(HandshakeError::Refused(
            String::from_utf8_lossy(&done.payload).into_owned(),
        )),
    }
}

/// The worker's side, after the preamble: the first frame must open a handshake that proves
/// the secret. Anything else is answered `NoAuth` and fails; the caller closes the
/// connection.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: &ClusterSecret,
) -> Result<(), HandshakeError> {
    let refuse = |id| {
        Response::error(
            Status::NoAuth,
            "cluster authentication required: this worker serves only nodes that know the \
             cluster secret (--cluster-secret-file)",
        )
        .with_id(id)
    };
    let hello: Request = read_frame(stream).await?;
    if hello.op != Op::ClusterHello || hello.value.len() != NONCE_LEN {
        write_frame(stream, &refuse(hello.id)).await?;
        return Err(HandshakeError::Refused("not a cluster handshake".into()));
    }
    let server_nonce = nonce();
    let mut payload = BytesMut::with_capacity(NONCE_LEN + PROOF_LEN);
    payload.extend_from_slice(&server_nonce);
    payload.extend_from_slice(
        &secret
            .server_proof(&hello.value, &server_nonce)
            .finalize()
            .into_bytes(),
    );
    write_frame(stream, &Response::ok(payload.freeze()).with_id(hello.id)).await?;
    let proof: Request = read_frame(stream).await?;
    let valid = proof.op == Op::ClusterProof
        && secret
            .client_proof(&hello.value, &server_nonce)
            .verify_slice(&proof.value)
            .is_ok();
    if !valid {
        write_frame(
            stream,
            &Response::error(Status::NoAuth, "wrong cluster secret").with_id(proof.id),
        )
        .await?;
        return Err(HandshakeError::WrongSecret);
    }
    write_frame(stream, &Response::ok(Bytes::new()).with_id(proof.id)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> ClusterSecret {
        ClusterSecret::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn secret_files_take_hex_or_raw_bytes_of_at_least_32() {
        let hex = "ab".repeat(32);
        assert_eq!(
            ClusterSecret::from_bytes(hex.as_bytes()).unwrap().0.len(),
            32
        );
        assert_eq!(
            ClusterSecret::from_bytes(format!("{hex}\n").as_bytes())
                .unwrap()
                .0
                .len(),
            32
        );
        assert!(ClusterSecret::from_bytes(b"short").is_err());
        assert!(ClusterSecret::from_bytes(&[7; 40]).is_ok());
        assert_eq!(format!("{:?}", secret(1)), "ClusterSecret(..)");
    }

    async fn run(
        client: ClusterSecret,
        server: ClusterSecret,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut preamble = [0u8; 4];
            b.read_exact(&mut preamble).await.unwrap();
            assert_eq!(preamble, PREAMBLE);
            accept(&mut b, &server).await
        });
        let c = connect(&mut a, &client).await;
        drop(a); // a failed initiator hangs up
        (c, server.await.unwrap())
    }

    #[tokio::test]
    async fn the_same_secret_authenticates_both_ways() {
        let (c, s) = run(secret(1), secret(1)).await;
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    }

    #[tokio::test]
    async fn a_different_secret_fails_on_both_sides() {
        let (c, s) = run(secret(1), secret(2)).await;
        assert!(matches!(c, Err(HandshakeError::WrongSecret)), "{c:?}");
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn a_request_without_a_handshake_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(&mut b, &secret(1)).await });
        write_frame(&mut a, &Request::new(Op::Snapshot, Bytes::new()))
            .await
            .unwrap();
        let answer: Response = read_frame(&mut a).await.unwrap();
        assert_eq!(answer.status, Status::NoAuth);
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_replayed_client_proof_gets_nowhere() {
        // Record an honest handshake's client proof, then replay it against a new nonce.
        let s = secret(3);
        let cn = [9u8; NONCE_LEN];
        let old_server_nonce = [1u8; NONCE_LEN];
        let recorded = s
            .client_proof(&cn, &old_server_nonce)
            .finalize()
            .into_bytes();
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { accept(&mut b, &secret(3)).await });
        let mut hello = Request::new(Op::ClusterHello, Bytes::new());
        hello.value = Bytes::copy_from_slice(&cn);
        write_frame(&mut a, &hello).await.unwrap();
        let _: Response = read_frame(&mut a).await.unwrap();
        let mut proof = Request::new(Op::ClusterProof, Bytes::new());
        proof.value = Bytes::copy_from_slice(&recorded);
        write_frame(&mut a, &proof).await.unwrap();
        let answer: Response = read_frame(&mut a).await.unwrap();
        assert_eq!(answer.status, Status::NoAuth);
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::WrongSecret)
        ));
    }
}
