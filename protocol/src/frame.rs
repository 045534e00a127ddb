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
//!
//! ## Frames over the limit
//! A reader never buffers a body longer than its limit, but what it does with such a frame
//! depends on which side it is:
//! - **Responses** (the client side: the orchestrator's worker links, the client library, a
//!   resync) survive it. A worker may hold a value larger than the orchestrator's
//!   `--max-frame`; were its response an error, the link and every request on it would die on
//!   each read of that key. Instead the decoder reads the id and status (the first
//!   [`RESPONSE_HEADER_LEN`] bytes of the body), yields a [`Status::TooLarge`] response for that
//!   id at once, and then discards the rest of the body as it arrives.
//! - **Requests** (the server side) are refused with [`FrameError::TooLong`] as soon as the
//!   length is read, and the servers answer and close. The id is not yet known then, and
//!   waiting for it, then reading and discarding a body that may announce 4 GiB, would hand a
//!   peer that has already broken the limit a way to hold the connection open for as long as
//!   it likes. (The decoder could do it: [`Message::OVERSIZED_HEAD`] is all it would take.)

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

/// The most a read buffer grows by at once ahead of the bytes it holds, for a frame or an
/// argument whose declared length has not all arrived (see [`room_ahead`]).
pub const RESERVE_AHEAD: usize = 64 * 1024;

/// How much room to make now in a read buffer holding `held` bytes, for `wanted` more that a
/// peer declared: all of it, up to [`RESERVE_AHEAD`] or four times what is held, whichever
/// is more. A declared length is only a claim: reserving it whole let a connection that sent
/// a 32-byte header declaring 16 MB hold a megabyte or two of resident memory (the allocator
/// touches what it hands out), none of it charged, since buffers are charged for the bytes
/// they hold. Growing with the bytes that arrive still takes a 1 MiB value in two steps
/// (growing by what was held, four steps cost a quarter of SET's throughput at 1 MiB).
pub fn room_ahead(held: usize, wanted: usize) -> usize {
    wanted.min(RESERVE_AHEAD.max(held.saturating_mul(4)))
}

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
    /// On a `get`, `exists`, `query` or `apply`: the orchestrator takes this worker to hold
    /// the pair's data, so a worker that does not (it restarted and has not resynced yet)
    /// refuses with `Unavailable` instead of answering from an empty store. On an `apply` it
    /// also refuses while it is newly refilled (see the worker's `exec` module). Clients
    /// never set it.
    pub const IN_SYNC: u8 = 64;
    /// On a `set`: `ttl_ms` is an absolute expiry (Unix milliseconds), not a time to live,
    /// so both partners of a pair store the same one.
    pub const EXPIRES_AT: u8 = 128;
    /// On a `command`: answer in RESP3 instead of RESP2.
    pub const RESP3: u8 = 1;
    /// On a `flush`: free the memory in the background and answer at once (Redis' `ASYNC`);
    /// the flushed entries are gone for readers either way.
    pub const ASYNC: u8 = 2;
    /// On an `apply`: a program behind a newer write of its key may take the next counter
    /// after it (`version::bump`) rather than be refused. Left off when the program fails
    /// over from a primary that did not answer: the partner must then write above anything
    /// the silent worker may have bumped to, which only a fresh stamp is.
    pub const BUMP: u8 = 2;
    /// On a `get`, `exists` or `del`: the orchestrator knows the key's slot is being moved
    /// away from this worker's pair, so the worker serves it although its map gives the slot
    /// to the new pair (the read that missed there, the delete sent to both). Without it such
    /// a request was routed by an older map and is refused with `Moved`.
    pub const MOVING_SOURCE: u8 = 8;
    /// On an `apply`: the answer gives, for each change, the version its key held before
    /// the program (its *base*). On a `replicate`: the key holds those bases (a copy has no
    /// key of its own: the changes name theirs), and
    /// the partner refuses the copy (`Status::Diverged`) if it holds a write of one of its
    /// keys taken alone that the base is not (the primary computed without it).
    pub const BASES: u8 = 4;
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
    /// Opens a connection's cluster handshake (see [`crate::auth`]).
    ClusterHello,
    /// Completes a connection's cluster handshake.
    ClusterProof,
    /// A client's credentials for the orchestrator: the key is the user name (empty for the
    /// default user), the value the password.
    Auth,
    /// Client to orchestrator: run any Redis command. The value is the command RESP-encoded
    /// (an array of bulk strings); the answer is `Ok` with its RESP reply (RESP2, or RESP3
    /// with [`flags::RESP3`]), errors included. The key is ignored.
    Command,
    /// Orchestrator to worker: run a [`crate::program`] that may write, on the pair's
    /// primary; the answer carries the changes for the partner and the replies.
    Apply,
    /// Orchestrator to worker: run a read-only [`crate::program`].
    Query,
    /// Orchestrator to worker: store the changes an `apply` made on the partner (the value
    /// is the changes block of the `apply`'s answer), each at the request's version.
    Replicate,
    /// Orchestrator to worker: one step of a key-space walk (SCAN, KEYS); see
    /// [`crate::program::ScanRequest`].
    Scan,
    /// Orchestrator to worker: remove every entry older than the request's version, and
    /// refuse older writes from now on (FLUSHALL).
    Flush,
    /// Orchestrator to worker: slot moves (see `worker::sync`'s module docs). The value is
    /// a line: `import <addr> <lo> <hi> <rate>` (copy slots `lo..hi` from the worker at
    /// `addr`, in the background), `progress` (the last import's state), or
    /// `drop <lo> <hi>` (remove the entries of those slots).
    Slots,
    /// Orchestrator to worker: the cluster map the worker keeps (see
    /// [`crate::cluster_map`]). The value is a line, then for `set` the map's text:
    /// `get` (answer: the epoch, a newline, the text; epoch 0 and nothing if none),
    /// `set <pair> <instance>` + map (keep it if its epoch is newer; refused with
    /// `NotApplied` and the current epoch if older, or another instance holds the lease;
    /// `-` for the pair: the worker is in none, and refuses every keyed request),
    /// `lease <instance> <ttl_ms>` (the right to change the map; answer `granted` or
    /// `held <instance> <ms left>`), `release <instance>`.
    Map,
    /// Orchestrator to worker: plain `set`s, run in order as if each had come in a frame of
    /// its own (a client's pipelined SETs to one pair, one frame per worker instead of one
    /// per SET). The value is their frames ([`encode_batch`]); the answer is `Ok` with their
    /// responses' frames in the same order ([`frames`]), each with its index as its id.
    Batch,
    /// Orchestrator to worker, after its partner refused a program's copy
    /// (`Status::Diverged`): each key of the changes block in the value is removed, with no
    /// tombstone, if it still holds the program's write (the request's version), so that
    /// the partner's value comes back at the refill and the refused change is not kept. The
    /// worker no longer holds the pair's data (it refuses `IN_SYNC` requests) until a refill
    /// started after the revoke completes.
    Revoke,
    Unknown(u8),
}

impl Op {
    /// Whether the op only reads: its answer may be dropped for a caller over its memory
    /// limit. A write's answer never is (a read-modify-write's carries the change its
    /// partner must get).
    pub fn reads_only(self) -> bool {
        matches!(self, Op::Get | Op::Exists | Op::Query | Op::Scan)
    }

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
            Op::ClusterHello => 14,
            Op::ClusterProof => 15,
            Op::Auth => 16,
            Op::Command => 17,
            Op::Apply => 18,
            Op::Query => 19,
            Op::Replicate => 20,
            Op::Scan => 21,
            Op::Flush => 22,
            Op::Slots => 23,
            Op::Map => 24,
            Op::Batch => 25,
            Op::Revoke => 26,
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
            14 => Op::ClusterHello,
            15 => Op::ClusterProof,
            16 => Op::Auth,
            17 => Op::Command,
            18 => Op::Apply,
            19 => Op::Query,
            20 => Op::Replicate,
            21 => Op::Scan,
            22 => Op::Flush,
            23 => Op::Slots,
            24 => Op::Map,
            25 => Op::Batch,
            26 => Op::Revoke,
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

    /// `status` with `message` (a `&'static str` is not copied).
    pub fn error(status: Status, message: impl Into<Bytes>) -> Response {
        Response {
            id: 0,
            status,
            payload: message.into(),
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
    fn encode_body(&self, dst: &mut BytesMut) {
        self.encode_head(dst);
        dst.put_slice(self.tail());
    }
    /// Appends the body up to its [`Message::tail`].
    fn encode_head(&self, dst: &mut BytesMut);
    /// The bytes the body ends with (a request's value, a response's payload): a writer may
    /// send them from where they lie instead of copying them (see [`encode_frame_head`]).
    fn tail(&self) -> &Bytes;
    /// Parses a complete body.
    fn decode_body(body: Bytes) -> Result<Self, FrameError>;

    /// Body bytes [`Message::oversized`] needs to stand in for a frame over the limit.
    const OVERSIZED_HEAD: usize = 0;

    /// Whether a reader makes room for a whole frame as soon as its length is read. Answers
    /// come from a peer the reader asked (a worker, a partner, the server a client chose),
    /// and a large one then arrives in one buffer; requests come from whoever connects, so
    /// their room is made as their bytes arrive ([`room_ahead`]).
    const ROOM_AT_ONCE: bool = false;

    /// The message standing for a frame whose `len`-byte body exceeds the limit `max`, made
    /// from the first [`Message::OVERSIZED_HEAD`] bytes of its body (the rest is skipped);
    /// `None` if such a frame is an error that ends the connection.
    fn oversized(_head: &[u8], _len: usize, _max: usize) -> Option<Self> {
        None
    }
}

impl Message for Request {
    fn body_len(&self) -> usize {
        REQUEST_HEADER_LEN + self.key.len() + self.value.len()
    }

    fn encode_head(&self, dst: &mut BytesMut) {
        // Assembled here and appended at once: each `put_*` is a capacity check and a copy
        // call of its own (seven per frame, two frames per SET).
        let mut head = [0u8; REQUEST_HEADER_LEN];
        head[..8].copy_from_slice(&self.id.to_be_bytes());
        head[8] = self.op.code();
        head[9] = self.flags;
        head[10..18].copy_from_slice(&self.version.to_be_bytes());
        head[18..26].copy_from_slice(&self.ttl_ms.to_be_bytes());
        head[26..].copy_from_slice(&(self.key.len() as u32).to_be_bytes());
        dst.put_slice(&head);
        dst.put_slice(&self.key);
    }

    fn tail(&self) -> &Bytes {
        &self.value
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
    const ROOM_AT_ONCE: bool = true;

    fn body_len(&self) -> usize {
        RESPONSE_HEADER_LEN + self.payload.len()
    }

    fn encode_head(&self, dst: &mut BytesMut) {
        dst.put_slice(&response_head(self.id, self.status));
    }

    fn tail(&self) -> &Bytes {
        &self.payload
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

    const OVERSIZED_HEAD: usize = RESPONSE_HEADER_LEN;

    /// Whatever the status was, the answer is that it could not be carried.
    fn oversized(mut head: &[u8], len: usize, max: usize) -> Option<Response> {
        let id = head.get_u64();
        let payload = format!(
            "value of {} bytes exceeds this connection's frame limit of {max} bytes",
            len - RESPONSE_HEADER_LEN
        );
        Some(Response {
            id,
            status: Status::TooLarge,
            payload: payload.into(),
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

/// Appends `msg`'s frame to `dst` without its [`Message::tail`], which the caller writes
/// right after what `dst` holds; the tail is returned.
pub fn encode_frame_head<'m, M: Message>(msg: &'m M, dst: &mut BytesMut) -> &'m Bytes {
    let len = msg.body_len();
    let tail = msg.tail();
    dst.reserve(4 + len - tail.len());
    dst.put_u32(len as u32);
    msg.encode_head(dst);
    tail
}

/// Appends the frame of a response `id` with `status` and `payload`, the same bytes
/// [`encode_frame`] makes of that [`Response`], from a borrowed payload: a worker answers a
/// GET straight from the value in its store.
pub fn encode_response(id: u64, status: Status, payload: &[u8], dst: &mut BytesMut) {
    let len = RESPONSE_HEADER_LEN + payload.len();
    dst.reserve(4 + len);
    dst.put_u32(len as u32);
    dst.put_slice(&response_head(id, status));
    dst.put_slice(payload);
}

/// Most bytes of a [`Op::Batch`] request's value: what the orchestrator gathers into one
/// batch, and what a worker runs in one go.
pub const BATCH_BYTES: usize = 16 * 1024;

/// The value of a [`Op::Batch`] request: each of `reqs` as a frame, its index as its id.
pub fn encode_batch(reqs: &[Request]) -> Bytes {
    let len = reqs.iter().map(|r| 4 + r.body_len()).sum();
    let mut dst = BytesMut::with_capacity(len);
    for (i, req) in reqs.iter().enumerate() {
        dst.put_u32(req.body_len() as u32);
        let start = dst.len();
        req.encode_body(&mut dst);
        dst[start..start + 8].copy_from_slice(&(i as u64).to_be_bytes());
    }
    dst.freeze()
}

/// The messages framed one after another in `body` (a batch's requests, or their responses);
/// a frame that runs past the end, or a body that does not parse, is an error.
pub fn frames<M: Message>(mut body: Bytes) -> impl Iterator<Item = Result<M, FrameError>> {
    std::iter::from_fn(move || {
        if body.is_empty() {
            return None;
        }
        if body.len() < 4 {
            body.clear();
            return Some(Err(FrameError::Malformed("frame shorter than its length")));
        }
        let len = body.get_u32() as usize;
        if len > body.len() {
            body.clear();
            return Some(Err(FrameError::Malformed("frame runs past the batch")));
        }
        Some(M::decode_body(body.split_to(len)))
    })
}

/// A response's header: its id, then its status.
fn response_head(id: u64, status: Status) -> [u8; RESPONSE_HEADER_LEN] {
    let mut head = [0u8; RESPONSE_HEADER_LEN];
    head[..8].copy_from_slice(&id.to_be_bytes());
    head[8] = status.code();
    head
}

/// Decodes frames carrying `In` messages and encodes any [`Message`]; one codec type serves
/// both ends of a link.
#[derive(Debug)]
pub struct FrameCodec<In> {
    max_frame: usize,
    /// Bytes of an oversized frame's body still to discard as they arrive.
    skipping: usize,
    _in: PhantomData<fn() -> In>,
}

impl<In> FrameCodec<In> {
    /// A codec refusing frame bodies longer than `max_frame` bytes (see the module docs for
    /// what refusing means on each side).
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame,
            skipping: 0,
            _in: PhantomData,
        }
    }

    /// Discards what has arrived of an oversized body; whether all of it is gone.
    fn skip(&mut self, src: &mut BytesMut) -> bool {
        let n = self.skipping.min(src.len());
        src.advance(n);
        self.skipping -= n;
        self.skipping == 0
    }
}

impl<In: Message> Decoder for FrameCodec<In> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if !self.skip(src) || src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            let head = In::OVERSIZED_HEAD;
            if head == 0 {
                return Err(FrameError::TooLong {
                    len,
                    max: self.max_frame,
                });
            }
            if len < head {
                return Err(FrameError::Malformed("frame shorter than its header"));
            }
            if src.len() < 4 + head {
                return Ok(None);
            }
            let Some(msg) = In::oversized(&src[4..4 + head], len, self.max_frame) else {
                return Err(FrameError::TooLong {
                    len,
                    max: self.max_frame,
                });
            };
            src.advance(4 + head);
            self.skipping = len - head;
            self.skip(src);
            return Ok(Some(msg));
        }
        if src.len() < 4 + len {
            let wanted = 4 + len - src.len();
            src.reserve(if In::ROOM_AT_ONCE {
                wanted
            } else {
                room_ahead(src.len(), wanted)
            });
            return Ok(None);
        }
        // The length prefix goes with the frame and is skipped in the frozen view: moving a
        // shared view's start is a pointer bump, where advancing the read buffer itself has
        // its bookkeeping to keep.
        let mut body = src.split_to(4 + len).freeze();
        body.advance(4);
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
    use crate::test_support::reads;
    use proptest::prelude::*;

    /// A batch carries its requests whole and numbered; a cut one is an error, not a
    /// shorter batch.
    #[test]
    fn a_batch_carries_its_requests_in_order() {
        let reqs: Vec<Request> = (0..3u8)
            .map(|i| {
                let mut r = sample_request();
                r.id = 77;
                r.key = Bytes::from(vec![b'k', i]);
                r.value = Bytes::from(vec![i; usize::from(i) * 10]);
                r
            })
            .collect();
        let body = encode_batch(&reqs);
        let back: Vec<Request> = frames(body.clone()).collect::<Result<_, _>>().unwrap();
        for (i, (got, sent)) in back.iter().zip(&reqs).enumerate() {
            assert_eq!(got.id, i as u64);
            assert_eq!(
                (&got.key, &got.value, got.version),
                (&sent.key, &sent.value, sent.version)
            );
        }
        assert_eq!(back.len(), 3);
        for cut in [1, 5, body.len() - 1] {
            let got: Vec<Result<Request, _>> = frames(body.slice(..cut)).collect();
            assert!(got.last().unwrap().is_err(), "cut at {cut}");
        }
        let mut answers = BytesMut::new();
        encode_response(0, Status::Ok, b"", &mut answers);
        encode_response(1, Status::TooLarge, b"too big", &mut answers);
        let back: Vec<Response> = frames(answers.freeze()).collect::<Result<_, _>>().unwrap();
        assert_eq!(back[1].status, Status::TooLarge);
        assert_eq!(&back[1].payload[..], b"too big");
    }

    /// A frame declared large but not sent costs the reader no more than `RESERVE_AHEAD`;
    /// as its bytes arrive the buffer grows with them, and the frame still decodes whole.
    #[test]
    fn a_declared_length_is_reserved_only_as_its_bytes_arrive() {
        let mut req = sample_request();
        req.value = Bytes::from(vec![9u8; 1 << 20]);
        let mut whole = BytesMut::new();
        encode_frame(&req, &mut whole);
        let mut codec = FrameCodec::<Request>::new(DEFAULT_MAX_FRAME);
        let mut src = BytesMut::from(&whole[..40]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(
            src.capacity() <= 40 + 2 * RESERVE_AHEAD,
            "{}",
            src.capacity()
        );
        let mut fed = 40;
        let mut reservations = 0;
        loop {
            let room = src.capacity() - src.len();
            let n = room.max(1).min(whole.len() - fed);
            src.extend_from_slice(&whole[fed..fed + n]);
            fed += n;
            reservations += 1;
            if let Some(got) = codec.decode(&mut src).unwrap() {
                assert_eq!(got.value, req.value);
                break;
            }
            assert!(src.capacity() <= 5 * src.len().max(RESERVE_AHEAD) + 64);
        }
        assert!(
            reservations < 12,
            "a few steps, not byte by byte: {reservations}"
        );
        assert_eq!(room_ahead(10, 5), 5);
        assert_eq!(room_ahead(0, 1 << 24), RESERVE_AHEAD);
        assert_eq!(room_ahead(1 << 20, 1 << 24), 4 << 20);
    }

    #[test]
    fn a_response_from_a_slice_is_the_response_encoded() {
        for payload in [&b""[..], b"v", &[7u8; 300]] {
            let resp = Response {
                id: 0x0102_0304_0506_0708,
                status: Status::Ok,
                payload: Bytes::copy_from_slice(payload),
            };
            let (mut whole, mut parts) = (BytesMut::new(), BytesMut::new());
            encode_frame(&resp, &mut whole);
            encode_response(resp.id, resp.status, payload, &mut parts);
            assert_eq!(whole, parts);
        }
    }

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
    fn a_frame_head_and_its_tail_are_the_whole_frame() {
        let req = sample_request();
        let mut whole = BytesMut::new();
        encode_frame(&req, &mut whole);
        let mut head = BytesMut::new();
        let tail = encode_frame_head(&req, &mut head);
        head.extend_from_slice(tail);
        assert_eq!(head, whole);
        let resp = Response::ok(Bytes::from_static(b"payload"));
        let (mut whole, mut head) = (BytesMut::new(), BytesMut::new());
        encode_frame(&resp, &mut whole);
        let tail = encode_frame_head(&resp, &mut head);
        head.extend_from_slice(tail);
        assert_eq!(head, whole);
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

    /// Decodes `wire` fed in `piece`-byte reads, checking that the buffer never holds more
    /// than a frame within the limit and a read's worth.
    fn responses_in_pieces(wire: &[u8], max: usize, piece: usize) -> Vec<Response> {
        let mut codec = FrameCodec::<Response>::new(max);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(piece) {
            buf.extend_from_slice(chunk);
            while let Some(r) = codec.decode(&mut buf).unwrap() {
                got.push(r);
            }
            assert!(buf.len() <= 4 + max + piece, "{} bytes held", buf.len());
        }
        assert!(buf.is_empty());
        got
    }

    #[test]
    fn an_oversized_response_is_answered_too_large_and_its_body_skipped() {
        let wire: &[u8] = &[
            0, 0, 0, 14, // body length: over the limit of 10
            0, 0, 0, 0, 0, 0, 0, 7, // id
            0, // status ok
            b'h', b'e', b'l', b'l', b'o', // payload, skipped
            0, 0, 0, 10, // the next frame, within the limit
            0, 0, 0, 0, 0, 0, 0, 8, // id
            0, b'v', // status ok, payload
        ];
        let expected = vec![
            Response {
                id: 7,
                status: Status::TooLarge,
                payload: Bytes::from_static(
                    b"value of 5 bytes exceeds this connection's frame limit of 10 bytes",
                ),
            },
            Response::ok(Bytes::from_static(b"v")).with_id(8),
        ];
        for piece in 1..=wire.len() {
            assert_eq!(responses_in_pieces(wire, 10, piece), expected, "{piece}");
        }
        // A body announcing 4 GiB is skipped in bounded memory for as long as it comes.
        let mut codec = FrameCodec::<Response>::new(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 9, 0][..]);
        let first = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!((first.id, first.status), (9, Status::TooLarge));
        for _ in 0..100 {
            buf.extend_from_slice(&[0xab; 64 * 1024]);
            assert_eq!(codec.decode(&mut buf).unwrap(), None);
            assert!(buf.is_empty());
        }
        assert!(buf.capacity() < 128 * 1024);
        // A body too short to hold an id is still malformed.
        let mut codec = FrameCodec::<Response>::new(4);
        let mut buf = BytesMut::from(&[0, 0, 0, 5, 1, 2, 3, 4, 5][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::Malformed(_))
        ));
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

    /// Feeds `input` to a `FrameCodec<M>` in pieces until it errs or has all of it, checking
    /// that it never holds more than a frame within the limit and a read's worth.
    fn feed_anything<M: Message>(input: &[u8], max: usize, cuts: &[usize]) {
        let mut codec = FrameCodec::<M>::new(max);
        let mut buf = BytesMut::new();
        for read in reads(input, cuts) {
            buf.extend_from_slice(read);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            // An oversized frame's head is held until it is whole, however small the limit.
            assert!(buf.len() <= 4 + max.max(M::OVERSIZED_HEAD) + read.len());
        }
    }

    /// Frames of `reqs` and responses of the same ids, with `edits` (position, byte) applied.
    fn mutated_frames(reqs: &[Request], edits: &[(usize, u8)]) -> (Vec<u8>, Vec<u8>) {
        let (mut requests, mut responses) = (BytesMut::new(), BytesMut::new());
        for r in reqs {
            encode_frame(r, &mut requests);
            encode_frame(&Response::ok(r.value.clone()).with_id(r.id), &mut responses);
        }
        let (mut requests, mut responses) = (requests.to_vec(), responses.to_vec());
        for &(at, byte) in edits {
            let i = at % requests.len();
            requests[i] = byte;
            let i = at % responses.len();
            responses[i] = byte;
        }
        (requests, responses)
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..512),
            max in 0usize..128,
            cuts in proptest::collection::vec(0usize..64, 0..16),
        ) {
            feed_anything::<Request>(&input, max, &cuts);
            feed_anything::<Response>(&input, max, &cuts);
        }

        #[test]
        fn mutated_frames_never_panic(
            reqs in proptest::collection::vec(arb_request(), 1..4),
            edits in proptest::collection::vec((any::<usize>(), prop_oneof![Just(0u8), Just(0xff), any::<u8>()]), 1..4),
            max in 0usize..512,
            cuts in proptest::collection::vec(0usize..64, 0..16),
        ) {
            let (requests, responses) = mutated_frames(&reqs, &edits);
            feed_anything::<Request>(&requests, max, &cuts);
            feed_anything::<Response>(&responses, max, &cuts);
        }

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

        /// Responses over the limit become `TooLarge` for their id, the others come through
        /// as sent, however the stream is split.
        #[test]
        fn oversized_responses_never_break_the_stream(
            resps in proptest::collection::vec((any::<u64>(), 0u8..8, 0usize..64), 1..12),
            max in 9usize..40,
            piece in 1usize..40,
        ) {
            let mut wire = BytesMut::new();
            let mut expected = Vec::new();
            for &(id, code, len) in &resps {
                let resp = Response { id, status: Status::from_code(code), payload: vec![b'p'; len].into() };
                encode_frame(&resp, &mut wire);
                expected.push(if RESPONSE_HEADER_LEN + len > max {
                    Response::oversized(&id.to_be_bytes(), RESPONSE_HEADER_LEN + len, max).unwrap()
                } else {
                    resp
                });
            }
            prop_assert_eq!(responses_in_pieces(&wire, max, piece), expected);
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
