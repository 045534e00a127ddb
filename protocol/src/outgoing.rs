//! Bytes waiting to be written, where large values are not copied.
//!
//! A writer encodes small things (headers, short replies, whole small frames) into one
//! buffer, as usual. A large value ([`LARGE`] bytes or more: a value being stored, a value
//! read back) is not copied in: the bytes encoded so far are split off and kept as they are,
//! then the value's own `Bytes` (a slice of the buffer it was read into, or what the store
//! handed out), and they all leave in order, in one vectored write where the stream takes
//! it (it is a [`Buf`] for tokio's `write_buf` and `write_all_buf`). Between a client's
//! socket and a worker's socket a large value is then only ever copied by the kernel.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Values at least this long are written from where they lie: below it, copying costs less
/// than another slice in the write (and a slice pins its whole allocation until written).
pub const LARGE: usize = 16 * 1024;

/// What waits to be written, in order: `parts`, then `buf`.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// What was encoded before each large value, and the values.
    parts: Vec<Bytes>,
    /// Bytes in `parts`.
    parts_len: usize,
    /// What was encoded since the last large value.
    buf: BytesMut,
    /// Bytes at the front of `buf` already written (kept, so that clearing gives the buffer
    /// its whole capacity back).
    sent: usize,
}

impl Outgoing {
    /// Empty, with `capacity` bytes for encoding.
    pub fn with_capacity(capacity: usize) -> Outgoing {
        Outgoing {
            buf: BytesMut::with_capacity(capacity),
            ..Outgoing::default()
        }
    }

    /// The buffer to encode into; what is encoded there follows everything before it.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends `value`: copied if it is short, else held and written from where it lies.
    pub fn put(&mut self, value: &Bytes) {
        if value.len() < LARGE {
            self.buf.extend_from_slice(value);
            return;
        }
        if self.buf.len() > self.sent {
            let mut head = self.buf.split();
            head.advance(self.sent);
            let head = head.freeze();
            self.parts_len += head.len();
            self.parts.push(head);
        }
        self.buf.clear();
        self.sent = 0;
        self.parts_len += value.len();
        self.parts.push(value.clone());
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.parts_len + self.buf.len() - self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoding buffer's capacity (what this holds besides the values it was given).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Drops everything waiting; the encoding buffer keeps its memory.
    pub fn clear(&mut self) {
        self.parts.clear();
        self.parts_len = 0;
        self.buf.clear();
        self.sent = 0;
    }
}

/// What waits, as a [`Buf`], so that tokio's `write_buf` and `write_all_buf` write it: in
/// one vectored write where the stream takes one (a slice per part, then the buffer), and
/// advancing past what was written. The encoded bytes stay in the buffer until [`clear`]
/// (an owner that wipes what it sent must see them).
///
/// [`clear`]: Outgoing::clear
impl Buf for Outgoing {
    fn remaining(&self) -> usize {
        self.len()
    }

    fn chunk(&self) -> &[u8] {
        match self.parts.first() {
            Some(part) => part,
            None => &self.buf[self.sent..],
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for part in &self.parts {
            if n == dst.len() {
                return n;
            }
            dst[n] = IoSlice::new(part);
            n += 1;
        }
        if n < dst.len() && self.buf.len() > self.sent {
            dst[n] = IoSlice::new(&self.buf[self.sent..]);
            n += 1;
        }
        n
    }

    /// Forgets the first `n` bytes, written.
    fn advance(&mut self, mut n: usize) {
        let taken = n.min(self.parts_len);
        self.parts_len -= taken;
        n -= taken;
        let mut left = taken;
        let mut done = 0;
        for part in &mut self.parts {
            let step = left.min(part.len());
            part.advance(step);
            left -= step;
            if !part.is_empty() {
                break;
            }
            done += 1;
        }
        self.parts.drain(..done);
        self.sent = (self.sent + n).min(self.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn written(out: &mut Outgoing, step: usize) -> Vec<u8> {
        let mut seen = Vec::new();
        while !out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let count = out.chunks_vectored(&mut slices);
            let mut n = 0;
            for s in &slices[..count] {
                let take = (step - n).min(s.len());
                seen.extend_from_slice(&s[..take]);
                n += take;
                if n == step {
                    break;
                }
            }
            out.advance(n);
        }
        seen
    }

    #[test]
    fn large_values_are_held_small_ones_copied_and_the_order_kept() {
        let big = Bytes::from(vec![7u8; LARGE]);
        for step in [1, 100, LARGE - 1, LARGE + 9, 1 << 20] {
            let mut out = Outgoing::with_capacity(64);
            out.buf().extend_from_slice(b"head");
            out.put(&big);
            out.buf().extend_from_slice(b"mid");
            out.put(&Bytes::from_static(b"small"));
            out.put(&big);
            out.put(&big);
            out.buf().extend_from_slice(b"tail");
            assert_eq!(out.parts.len(), 5, "head, big, mid+small, big, big");
            assert_eq!(out.len(), 3 * LARGE + 4 + 3 + 5 + 4);
            let mut want = b"head".to_vec();
            want.extend_from_slice(&big);
            want.extend_from_slice(b"midsmall");
            want.extend_from_slice(&big);
            want.extend_from_slice(&big);
            want.extend_from_slice(b"tail");
            assert_eq!(
                written(&mut out, step),
                want,
                "written {step} bytes at a time"
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn bytes_written_from_the_buffer_are_not_written_again() {
        let mut out = Outgoing::with_capacity(64);
        out.buf().extend_from_slice(b"abcdef");
        out.advance(2);
        assert_eq!(out.len(), 4);
        let big = Bytes::from(vec![1u8; LARGE]);
        out.put(&big);
        out.buf().extend_from_slice(b"z");
        let mut want = b"cdef".to_vec();
        want.extend_from_slice(&big);
        want.push(b'z');
        assert_eq!(written(&mut out, 7), want);
        out.buf().extend_from_slice(b"abc");
        out.advance(3);
        assert!(out.is_empty());
        out.clear();
        assert!(out.capacity() > 0, "the buffer keeps its memory");
    }

    #[tokio::test]
    async fn write_all_buf_writes_everything_in_order() {
        let big = Bytes::from((0..LARGE * 3).map(|i| i as u8).collect::<Vec<u8>>());
        let mut out = Outgoing::default();
        out.buf().extend_from_slice(b"<");
        out.put(&big);
        out.buf().extend_from_slice(b">");
        let mut sink = Vec::new();
        sink.write_all_buf(&mut out).await.unwrap();
        assert_eq!(sink.len(), big.len() + 2);
        assert_eq!(&sink[1..sink.len() - 1], &big[..]);
        out.clear();
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn writing_leaves_the_encoded_bytes_for_their_owner_to_wipe() {
        let mut out = Outgoing::default();
        out.buf().extend_from_slice(b"secret reply");
        let mut sink = Vec::new();
        sink.write_all_buf(&mut out).await.unwrap();
        assert_eq!(&sink[..], b"secret reply");
        assert_eq!(
            &out.buf()[..],
            b"secret reply",
            "still there to be zeroized"
        );
    }
}
