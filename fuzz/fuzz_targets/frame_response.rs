//! `FrameCodec<Response>`: random input in random reads never panics, never holds more than a
//! frame within the limit, and decodes the same however it is split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use twincache_protocol::frame::{FrameCodec, Response, RESPONSE_HEADER_LEN};

fn decode(data: &[u8], piece: usize, max: usize) -> (Vec<Response>, Option<String>) {
    let mut codec = FrameCodec::<Response>::new(max);
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Some(e.to_string())),
            }
        }
        // An oversized response's id and status are held until whole.
        let most = 4 + max.max(RESPONSE_HEADER_LEN) + chunk.len();
        assert!(buf.len() <= most, "{} bytes held", buf.len());
    }
    (items, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let piece = usize::from(ctl & 0x1f) + 1;
    let max = 8usize << (ctl >> 5);
    let whole = decode(data, data.len().max(1), max);
    let split = decode(data, piece, max);
    assert_eq!(
        whole, split,
        "splitting the input changed what it decodes to"
    );
});
