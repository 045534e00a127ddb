//! The RESP decoder: random input in random reads never panics, holds no more than its limits
//! allow, and decodes to the same commands (and the same error) however it is split.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use twincache_protocol::resp::{ProtocolError, RespDecoder};

type Outcome = (Vec<Vec<Bytes>>, Option<ProtocolError>);

fn decode(data: &[u8], piece: usize, max_bulk: usize, max_command: usize) -> Outcome {
    let mut d = RespDecoder::new(max_bulk, max_command);
    let mut buf = BytesMut::new();
    let mut commands = Vec::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(cmd)) => {
                    assert!(!cmd.is_empty(), "a command has a name");
                    commands.push(cmd);
                }
                Ok(None) => break,
                Err(e) => return (commands, Some(e)),
            }
        }
    }
    (commands, None)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size and the limits.
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let piece = usize::from(ctl & 0x1f) + 1;
    let max_bulk = 8usize << (ctl >> 5);
    let max_command = max_bulk * 8;
    let whole = decode(data, data.len().max(1), max_bulk, max_command);
    let split = decode(data, piece, max_bulk, max_command);
    assert_eq!(
        whole, split,
        "splitting the input changed what it decodes to"
    );
});
