//! Binary frames: the orchestrator-to-worker link and the binary client protocol.
//!
//! Every frame is a big-endian `u32` body length followed by the body, so a reader knows how
//! much to wait for before it parses anything, and checks that length against a limit before it
//! reserves a byte. Each request carries a `u64` id that its response echoes, so one connection
//! carries many requests at once and responses may come back in any order.
//!
//! ```text
//! request body  = id:u64 op:u8 flags:u8 version:u64 ttl_ms:u64 key_len:u32 key value
//! response body = id:u64 status:u8 payload
//! ```
//!
//! `flags` qualify a `set` (see [`flags`]). A `set` with [`flags::GET`] answers with the
//! previous value behind a presence byte: `0` (there was none) or `1` followed by the value.
//!
//! A connection opens with the 4-byte [`PREAMBLE`]. Its first byte (0xB7) is neither printable
//! ASCII nor `*`, which is how the orchestrator tells a binary client from a text or RESP one
//! on the same port; its last byte is the protocol version.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::status::Status;

/// Sent first on every binary connection: a magic byte, `TC`, and the protocol version.
pub const PREAMBLE: [u8; 4] = [0xB7, b'T', b'C', 1];

/// Bytes of a request body before the key.
pub const REQUEST_HEADER_LEN: usize = 8 + 1 + 1 + 8 + 8 + 4;
/// Bytes of a response body before the payload.
pub const RESPONSE_HEADER_LEN: usize = 8 + 1;
/// Default cap on a frame body, for readers that are not configured otherwise.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Bits of [`Request::flags`] for a `set`.
pub mod flags {
    /// Only set if the key does not exist (Redis `NX`).
    pub const NX: u8 = 1;
    /// Only set if the key exists (Redis `XX`).
    pub const XX: u8 = 2;
    /// Answer with the previous value (Redis `GET`).
    pub const GET: u8 = 4;
    /// Keep the key's current expiry instead of replacing it (Redis `KEEPTTL`).
    pub const KEEP_TTL: u8 = 8;
    /// Adapter mode: this worker writes the value through to the destination Redis (one
    /// Redis write per client write, not one per partner).
    pub const PRIMARY: u8 = 16;
    /// On a `set` or `del`: the partner will not get this write (it is down or stale), so
    /// the worker counts it among the writes it took alone (see the worker's `sync` module).
    /// The count outlives the orchestrator that sent it, so every orchestrator can tell that
    /// the partner lacks writes.
    pub const SOLO: u8 = 32;
    /// On a `get` or `exists`: the orchestrator takes this worker to hold the pair's data, so
    /// a worker that does not (it restarted and has not resynced yet) refuses with
    /// `Unavailable` instead of answering from an empty store. Clients never set it.
    pub const IN_SYNC: u8 = 64;
}

/// What a request asks for. Unknown codes are kept as values so the receiver can answer
/// "invalid command" instead of dropping the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    Del,
    Ping,
    /// `Ok` if the key exists, `NotFound` if not; no value travels.
    Exists,
    /// The worker's counters as `name:value` lines (the key is ignored).
    Stats,
    /// The worker's sync status as `name:value` lines: boot id, whether its data is
    /// established, and the state of its last resync.
    Status,
    /// Worker to worker: stream every stored entry (see the worker's `sync` module).
    Snapshot,
    /// Orchestrator to worker: refill from the partner whose address is the value.
    Resync,
    /// Orchestrator to worker: the data it holds is the pair's (a new pair, or the sole
    /// survivor); it need not resync.
    Adopt,
    /// Adapter mode: run a Redis command (the value, RESP-encoded) on the destination and
    /// answer with its RESP reply as is.
    Passthrough,
    /// Adapter mode: drop the key from the cache (a short-lived tombstone at `version`).
    Invalidate,
    /// Orchestrator to worker: your partner missed a write you took; count it among the
    /// writes you took alone (as [`flags::SOLO`] does, after the fact).
    PartnerMissed,
    Unknown(u8),
}

impl Op {
    pub fn code(self) -> u8 {
        match self {
            Op::Get => 1,
            Op::Set => 2,
            Op::Del => 3,
            Op::Ping => 4,
            Op::Exists => 5,
            Op::Stats => 6,
            Op::Status => 7,
            Op::Snapshot => 8,
            Op::Resync => 9,
            Op::Adopt => 10,
            Op::Passthrough => 11,
            Op::Invalidate => 12,
            Op::PartnerMissed => 13,
            Op::Unknown(c) => c,
        }
    }

    pub fn from_code(code: u8) -> Op {
        match code {
            1 => Op::Get,
            2 => Op::Set,
            3 => Op::Del,
            4 => Op::Ping,
            5 => Op::Exists,
            6 => Op::Stats,
            7 => Op::Status,
            8 => Op::Snapshot,
            9 => Op::Resync,
            10 => Op::Adopt,
            11 => Op::Passthrough,
            12 => Op::Invalidate,
            13 => Op::PartnerMissed,
            c => Op::Unknown(c),
        }
    }

    /// Whether the op works on a key (and so needs a non-empty one).
    pub fn has_key(self) -> bool {
        matches!(
            self,
            Op::Get | Op::Set | Op::Del | Op::Exists | Op::Invalidate
        )
    }
}

/// One request. `key` and `value` are slices of the received frame, never copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
    /// Options of the request (see [`flags`]).
    pub flags: u8,
    /// Write version assigned by the orchestrator (a hybrid logical clock); workers keep the
    /// newest. Zero from clients, which the orchestrator overwrites.
    pub version: u64,
    /// Time to live in milliseconds; zero means none.
    pub ttl_ms: u64,
    pub key: Bytes,
    pub value: Bytes,
}

impl Request {
    /// A request with no version, TTL or value, for `op` on `key`.
    pub fn new(op: Op, key: Bytes) -> Request {
        Request {
            id: 0,
            op,
            flags: 0,
            version: 0,
            ttl_ms: 0,
            key,
            value: Bytes::new(),
        }
    }
}

/// One response: the id of the request it answers, a status and a payload (the value for a
/// successful `get`, a message for an error, empty otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub status: Status,
    pub payload: Bytes,
}

impl Response {
    pub fn ok(payload: Bytes) -> Response {
        Response {
            id: 0,
            status: Status::Ok,
            payload,
        }
    }

    /// A response with `status` and its default message as payload.
    pub fn status(status: Status) -> Response {
        Response::error(status, status.default_message())
    }

    pub fn error(status: Status, message: &'static str) -> Response {
        Response {
            id: 0,
            status,
            payload: Bytes::from_static(message.as_bytes()),
        }
    }

    pub fn with_id(mut self, id: u64) -> Response {
        self.id = id;
        self
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// A message that travels as the body of a frame.
pub trait Message: Sized {
    /// Length of the body this message encodes to.
    fn body_len(&self) -> usize;
    /// Appends the body (without the length prefix).
    fn encode_body(&self, dst: &mut BytesMut);
    /// Parses a complete body.
    fn decode_body(body: Bytes) -> Result<Self, FrameError>;
}

impl Message for Request {
    fn body_len(&self) -> usize {
        REQUEST_HEADER_LEN + self.key.len() + self.value.len()
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        dst.put_u64(self.id);
        dst.put_u8(self.op.code());
        dst.put_u8(self.flags);
        dst.put_u64(self.version);
        dst.put_u64(self.ttl_ms);
        dst.put_u32(self.key.len() as u32);
        dst.put_slice(&self.key);
        dst.put_slice(&self.value);
    }

    fn decode_body(mut body: Bytes) -> Result<Request, FrameError> {
        if body.len() < REQUEST_HEADER_LEN {
            return Err(FrameError::Malformed("request shorter than its header"));
        }
        let id = body.get_u64();
        let op = Op::from_code(body.get_u8());
        let flags = body.get_u8();
        let version = body.get_u64();
        let ttl_ms = body.get_u64();
        let key_len = body.get_u32() as usize;
        if key_len > body.len() {
            return Err(FrameError::Malformed("key length runs past the frame"));
        }
        let key = body.split_to(key_len);
        Ok(Request {
            id,
            op,
            flags,
            version,
            ttl_ms,
            key,
            value: body,
        })
    }
}

impl Message for Response {
    fn body_len(&self) -> usize {
        RESPONSE_HEADER_LEN + self.payload.len()
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        dst.put_u64(self.id);
        dst.put_u8(self.status.code());
        dst.put_slice(&self.payload);
    }

    fn decode_body(mut body: Bytes) -> Result<Response, FrameError> {
        if body.len() < RESPONSE_HEADER_LEN {
            return Err(FrameError::Malformed("response shorter than its header"));
        }
        let id = body.get_u64();
        let status = Status::from_code(body.get_u8());
        Ok(Response {
            id,
            status,
            payload: body,
        })
    }
}

/// Appends `msg` as a whole frame (length prefix and body) to `dst`.
pub fn encode_frame<M: Message>(msg: &M, dst: &mut BytesMut) {
    let len = msg.body_len();
    dst.reserve(4 + len);
    dst.put_u32(len as u32);
    msg.encode_body(dst);
}

/// Decodes frames carrying `In` messages and encodes any [`Message`]; one codec type serves
/// both ends of a link.
#[derive(Debug)]
pub struct FrameCodec<In> {
    max_frame: usize,
    _in: PhantomData<fn() -> In>,
}

impl<In> FrameCodec<In> {
    /// A codec refusing frame bodies longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame,
            _in: PhantomData,
        }
    }
}

impl<In: Message> Decoder for FrameCodec<In> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLong {
                len,
                max: self.max_frame,
            });
        }
        if src.len() < 4 + len {
            // The length is within the limit, so reserving it is bounded.
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len).freeze();
        In::decode_body(body).map(Some)
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In> {
    type Error = FrameError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&msg, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_request() -> Request {
        Request {
            id: 7,
            op: Op::Set,
            flags: 0,
            version: 99,
            ttl_ms: 1500,
            key: Bytes::from_static(b"k\n||\0"),
            value: Bytes::from_static(b"\xffvalue"),
        }
    }

    #[test]
    fn request_byte_layout() {
        let mut buf = BytesMut::new();
        encode_frame(&Request::new(Op::Get, Bytes::from_static(b"ab")), &mut buf);
        let expected: &[u8] = &[
            0, 0, 0, 32, // body length
            0, 0, 0, 0, 0, 0, 0, 0, // id
            1, 0, // op get, flags
            0, 0, 0, 0, 0, 0, 0, 0, // version
            0, 0, 0, 0, 0, 0, 0, 0, // ttl
            0, 0, 0, 2, b'a', b'b', // key
        ];
        assert_eq!(&buf[..], expected);
    }

    #[test]
    fn response_byte_layout() {
        let mut buf = BytesMut::new();
        encode_frame(
            &Response::ok(Bytes::from_static(b"v")).with_id(258),
            &mut buf,
        );
        assert_eq!(&buf[..], &[0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 1, 2, 0, b'v']);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut codec = FrameCodec::<Request>::new(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLong { .. })
        ));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn short_and_inconsistent_bodies_are_malformed() {
        let mut codec = FrameCodec::<Request>::new(1024);
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 1, 2, 3][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::Malformed(_))
        ));
        let mut body = BytesMut::new();
        sample_request().encode_body(&mut body);
        body[26..30].copy_from_slice(&1000u32.to_be_bytes()); // key_len beyond the body
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_op_is_a_value_not_an_error() {
        let mut req = sample_request();
        req.op = Op::Unknown(200);
        let mut buf = BytesMut::new();
        encode_frame(&req, &mut buf);
        let got = FrameCodec::<Request>::new(1024).decode(&mut buf).unwrap();
        assert_eq!(got.unwrap().op, Op::Unknown(200));
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            any::<u64>(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(id, op, version, ttl_ms, key, value)| Request {
                id,
                op: Op::from_code(op),
                flags: 0,
                version,
                ttl_ms,
                key: key.into(),
                value: value.into(),
            })
    }

    proptest! {
        /// Any sequence of requests, delivered in arbitrarily split reads, decodes back to itself.
        #[test]
        fn requests_round_trip_through_split_reads(
            reqs in proptest::collection::vec(arb_request(), 1..8),
            cuts in proptest::collection::vec(1usize..64, 0..16),
        ) {
            let mut wire = BytesMut::new();
            for r in &reqs {
                encode_frame(r, &mut wire);
            }
            let mut codec = FrameCodec::<Request>::new(DEFAULT_MAX_FRAME);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = wire.freeze();
            for cut in cuts.into_iter().chain(std::iter::repeat(usize::MAX)) {
                let n = cut.min(rest.len());
                buf.extend_from_slice(&rest.split_to(n));
                while let Some(r) = codec.decode(&mut buf).unwrap() {
                    got.push(r);
                }
                if rest.is_empty() {
                    break;
                }
            }
            prop_assert_eq!(got, reqs);
        }

        #[test]
        fn responses_round_trip(id in any::<u64>(), code in 0u8..8, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let resp = Response { id, status: Status::from_code(code), payload: payload.into() };
            let mut buf = BytesMut::new();
            encode_frame(&resp, &mut buf);
            let got = FrameCodec::<Response>::new(1024).decode(&mut buf).unwrap();
            prop_assert_eq!(got, Some(resp));
        }
    }
}
