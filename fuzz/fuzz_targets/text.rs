//! The text protocol: the line decoder (random input in random reads, in bounded memory, the
//! same lines however it is split) and the parse of every line it yields.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use twincache_fuzz::{control, same_however_split};
use twincache_protocol::text::{parse_line, Line, LineDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((piece, scale, data)) = control(data) else {
        return;
    };
    let max_len = 4usize << scale;
    same_however_split(data, piece, |data, piece| {
        let mut d = LineDecoder::new(max_len);
        let mut buf = BytesMut::new();
        let mut lines = Vec::new();
        for read in data.chunks(piece) {
            buf.extend_from_slice(read);
            while let Some(line) = d.decode(&mut buf) {
                if let Line::Complete(l) = &line {
                    assert!(l.len() <= max_len, "a line over the limit came through");
                    let _ = parse_line(l.clone());
                }
                lines.push(line);
            }
            assert!(buf.len() <= max_len + 1, "{} bytes held", buf.len());
        }
        (lines, d.has_partial(&buf))
    });
});
