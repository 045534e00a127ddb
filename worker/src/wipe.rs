//! Wiping what held a value's plaintext, on workers with an encryption key.
//!
//! Freed memory keeps its bytes until the allocator hands it out again, so without care a
//! worker's heap holds the plaintext of values long after they were sealed: in the read
//! buffer that carried the request, in the buffer a reply was encoded into, in a decrypted
//! copy, in a vector that grew (a reallocation leaves the old copy behind). With encryption
//! on, every one of those is wiped once the value is sealed or sent:
//!
//! - a request's frame is moved out of the connection's read buffer into memory that is
//!   wiped when the request is done with ([`next_request`]), and its bytes in the read buffer
//!   are wiped at once;
//! - buffers grow without leaving a copy behind ([`make_room`]);
//! - a decrypted or decompressed value lives in [`secret_bytes`], wiped when the last
//!   reference to it goes;
//! - the reply buffer is wiped once written ([`Buffer::clear`]) and when the connection ends.
//!
//! Without encryption none of this runs: the stored bytes are plaintext anyway, and the hot
//! path stays as it was (a branch on a flag per buffer operation).

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;
use twincache_protocol::frame::{
    encode_frame, encode_frame_head, encode_response, room_ahead, FrameCodec, FrameError, Message,
    Request, RESPONSE_HEADER_LEN,
};
use twincache_protocol::outgoing::Outgoing;
use twincache_protocol::Status;
use zeroize::{Zeroize, Zeroizing};

/// Room kept free in a read buffer before each read, so the read itself never has to grow
/// it (growing is where a copy would be left behind).
const READ_ROOM: usize = 4096;

/// `v` as `Bytes` whose memory is wiped when the last reference to it is dropped.
pub fn secret_bytes(v: Vec<u8>) -> Bytes {
    Bytes::from_owner(Zeroizing::new(v))
}

/// Makes room for `additional` more bytes in `buf` without leaving a copy of its contents in
/// freed memory: what it holds is copied aside and wiped first, so whatever the allocator
/// moves or frees holds zeros. Assumes, as holds for the buffers wiped here, that the bytes
/// already consumed from the front of `buf` were wiped when they were taken.
pub fn make_room(buf: &mut BytesMut, additional: usize) {
    if buf.capacity() - buf.len() >= additional {
        return;
    }
    let pending = Zeroizing::new(buf.to_vec());
    buf[..].zeroize();
    buf.clear();
    // Empty now: reserving reuses the allocation from its start, or moves only wiped bytes.
    buf.reserve(pending.len() + additional);
    buf.extend_from_slice(&pending);
}

/// The next request in `buf` (as `codec.decode` would return it). With `wipe`, a complete
/// frame is copied into memory that is wiped when the request is dropped, and wiped in `buf`;
/// a partial one gets room to arrive whole without `buf` leaving a copy behind.
pub fn next_request(
    codec: &mut FrameCodec<Request>,
    buf: &mut BytesMut,
    max_frame: usize,
    wipe: bool,
) -> Result<Option<Request>, FrameError> {
    if !wipe {
        return codec.decode(buf);
    }
    let Some(head) = buf.get(..4) else {
        make_room(buf, READ_ROOM);
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > max_frame {
        // Refused before anything is read into it: the codec says how.
        return codec.decode(buf);
    }
    let whole = 4 + len;
    if buf.len() < whole {
        make_room(buf, room_ahead(buf.len(), whole - buf.len()).max(READ_ROOM));
        return Ok(None);
    }
    let body = Zeroizing::new(buf[4..whole].to_vec());
    buf[..whole].zeroize();
    buf.advance(whole);
    Request::decode_body(Bytes::from_owner(body)).map(Some)
}

/// A connection's read or reply buffer that, with `wipe`, is wiped when cleared and when the
/// connection ends.
pub struct Buffer {
    bytes: BytesMut,
    wipe: bool,
}

impl Buffer {
    pub fn new(capacity: usize, wipe: bool) -> Buffer {
        Buffer {
            bytes: BytesMut::with_capacity(capacity),
            wipe,
        }
    }

    /// Empties the buffer, wiping what it held first if it wipes.
    pub fn clear(&mut self) {
        if self.wipe {
            self.bytes[..].zeroize();
        }
        self.bytes.clear();
    }

    /// Replaces the allocation with a fresh one of `capacity` (for a buffer a large frame
    /// grew), wiping what it held.
    pub fn renew(&mut self, capacity: usize) {
        self.clear();
        self.bytes = BytesMut::with_capacity(capacity);
    }
}

/// A connection's replies waiting to be written. Without wiping, a large payload (a value
/// read back) is written from where it lies rather than copied in (see
/// `twincache_protocol::outgoing`); with it, everything is encoded into one buffer, which is
/// wiped once written and when the connection ends.
pub struct Replies {
    out: Outgoing,
    wipe: bool,
}

impl Replies {
    pub fn new(capacity: usize, wipe: bool) -> Replies {
        Replies {
            out: Outgoing::with_capacity(capacity),
            wipe,
        }
    }

    /// Appends `msg` as a frame; a wiping buffer grows first, without leaving a copy.
    pub fn encode<M: Message>(&mut self, msg: &M) {
        if self.wipe {
            make_room(self.out.buf(), 4 + msg.body_len());
            encode_frame(msg, self.out.buf());
        } else {
            let payload = encode_frame_head(msg, self.out.buf());
            self.out.put(payload);
        }
    }

    /// A response frame whose payload is borrowed ([`encode_response`]), copied in.
    pub fn encode_response(&mut self, id: u64, status: Status, payload: &[u8]) {
        if self.wipe {
            make_room(self.out.buf(), 4 + RESPONSE_HEADER_LEN + payload.len());
        }
        encode_response(id, status, payload, self.out.buf());
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Writes everything, then clears (wiping what was written first, if it wipes).
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        let written = wr.write_all_buf(&mut self.out).await;
        self.clear();
        written
    }

    fn clear(&mut self) {
        if self.wipe {
            self.out.buf()[..].zeroize();
        }
        self.out.clear();
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.clear();
    }
}

impl std::ops::Deref for Buffer {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.bytes
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.bytes
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use twincache_protocol::frame::{Op, Response};

    fn frame(value: &[u8]) -> BytesMut {
        let mut req = Request::new(Op::Set, Bytes::from_static(b"key"));
        req.value = Bytes::copy_from_slice(value);
        let mut out = BytesMut::new();
        encode_frame(&req, &mut out);
        out
    }

    #[test]
    fn taken_requests_own_their_bytes() {
        let mut codec = FrameCodec::<Request>::new(1 << 20);
        let mut buf = BytesMut::with_capacity(8192);
        buf.put_slice(&frame(b"first secret"));
        buf.put_slice(&frame(b"second secret"));
        let read_buffer = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
        let a = next_request(&mut codec, &mut buf, 1 << 20, true)
            .unwrap()
            .unwrap();
        let b = next_request(&mut codec, &mut buf, 1 << 20, true)
            .unwrap()
            .unwrap();
        assert_eq!(&a.value[..], b"first secret");
        assert_eq!(&b.value[..], b"second secret");
        // Copies, not slices of the read buffer (whose bytes were wiped).
        for v in [&a.value, &b.value] {
            assert!(!read_buffer.contains(&(v.as_ptr() as usize)));
        }
        assert!(next_request(&mut codec, &mut buf, 1 << 20, true)
            .unwrap()
            .is_none());
        assert!(buf.is_empty());
        assert!(buf.capacity() >= READ_ROOM, "room for the next read");
    }

    #[test]
    fn partial_frames_and_oversized_ones_behave_as_the_codec_does() {
        let wire = frame(&[b'v'; 300]);
        for wipe in [false, true] {
            let mut codec = FrameCodec::<Request>::new(1 << 20);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(7) {
                buf.extend_from_slice(piece);
                while let Some(req) = next_request(&mut codec, &mut buf, 1 << 20, wipe).unwrap() {
                    got.push(req);
                }
            }
            assert_eq!(got.len(), 1, "wipe {wipe}");
            assert_eq!(&got[0].value[..], &[b'v'; 300][..]);
            let mut small = FrameCodec::<Request>::new(16);
            let mut buf = BytesMut::from(&wire[..]);
            assert!(matches!(
                next_request(&mut small, &mut buf, 16, wipe),
                Err(FrameError::TooLong { .. })
            ));
        }
    }

    #[test]
    fn making_room_keeps_the_contents() {
        let mut buf = BytesMut::with_capacity(8);
        buf.put_slice(b"abcdefgh");
        buf.advance(3);
        make_room(&mut buf, 1000);
        assert_eq!(&buf[..], b"defgh");
        assert!(buf.capacity() - buf.len() >= 1000);
    }

    #[tokio::test]
    async fn replies_are_written_whole_with_or_without_wiping() {
        let small = Response::ok(Bytes::from_static(b"v"));
        let large = Response::ok(Bytes::from(vec![9u8; 64 * 1024]));
        let mut plain = BytesMut::new();
        for resp in [&small, &large, &small] {
            encode_frame(resp, &mut plain);
        }
        for wipe in [false, true] {
            let mut out = Replies::new(4, wipe);
            for resp in [&small, &large, &small] {
                out.encode(resp);
            }
            assert_eq!(out.len(), plain.len());
            let mut sink = Vec::new();
            out.write_to(&mut sink).await.unwrap();
            assert_eq!(&sink[..], &plain[..], "wipe: {wipe}");
            assert!(out.is_empty());
        }
        let secret = secret_bytes(b"value".to_vec());
        assert_eq!(&secret[..], b"value");
    }
}
