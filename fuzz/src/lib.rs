//! What the fuzz targets share: reading the control byte, and the check that a decoder's
//! outcome does not depend on how the network split its input.

use std::fmt::Debug;

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use twincache_protocol::frame::{FrameCodec, Message, RESPONSE_HEADER_LEN};

/// Splits the control byte off `data`: the read size it picks (1 to 32 bytes) and a scale
/// (0 to 7, its top three bits) for the decoder's limits. `None` for empty input.
pub fn control(data: &[u8]) -> Option<(usize, usize, &[u8])> {
    let (&ctl, rest) = data.split_first()?;
    Some((usize::from(ctl & 0x1f) + 1, usize::from(ctl >> 5), rest))
}

/// Runs `decode` over `data` delivered whole and in `piece`-byte reads, and insists that
/// both give the same outcome.
pub fn same_however_split<T: PartialEq + Debug>(
    data: &[u8],
    piece: usize,
    decode: impl Fn(&[u8], usize) -> T,
) {
    let whole = decode(data, data.len().max(1));
    let split = decode(data, piece);
    assert_eq!(
        whole, split,
        "splitting the input changed what it decodes to"
    );
}

/// The frame codec for `M`: no panic, never more held than a frame within the limit (an
/// oversized response's id and status wait until whole), the same frames however split.
pub fn frames<M: Message + PartialEq + Debug>(data: &[u8]) {
    let Some((piece, scale, data)) = control(data) else {
        return;
    };
    let max = 8usize << scale;
    same_however_split(data, piece, |data, piece| {
        let mut codec = FrameCodec::<M>::new(max);
        let mut buf = BytesMut::new();
        let mut items = Vec::new();
        for read in data.chunks(piece) {
            buf.extend_from_slice(read);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(e) => return (items, Some(e.to_string())),
                }
            }
            let most = 4 + max.max(RESPONSE_HEADER_LEN) + read.len();
            assert!(buf.len() <= most, "{} bytes held", buf.len());
        }
        (items, None)
    });
}
