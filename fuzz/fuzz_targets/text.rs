//! The text protocol: the line decoder (random input in random reads, in bounded memory, the
//! same lines however it is split) and the parse of every line it yields.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use twincache_protocol::text::{parse_line, Line, LineDecoder};

fn lines(data: &[u8], piece: usize, max_len: usize) -> (Vec<Line>, bool) {
    let mut d = LineDecoder::new(max_len);
    let mut buf = BytesMut::new();
    let mut lines = Vec::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        while let Some(line) = d.decode(&mut buf) {
            if let Line::Complete(l) = &line {
                assert!(l.len() <= max_len, "a line over the limit came through");
            }
            lines.push(line);
        }
        assert!(buf.len() <= max_len + 1, "{} bytes held", buf.len());
    }
    (lines, d.has_partial(&buf))
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let piece = usize::from(ctl & 0x1f) + 1;
    let max_len = 4usize << (ctl >> 5);
    let whole = lines(data, data.len().max(1), max_len);
    let split = lines(data, piece, max_len);
    assert_eq!(whole, split, "splitting the input changed its lines");
    for line in whole.0 {
        if let Line::Complete(l) = line {
            let _ = parse_line(l);
        }
    }
});
