//! The RESP decoder: random input in random reads never panics, and decodes to the same
//! commands (and the same error) however it is split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use twincache_fuzz::{control, same_however_split};
use twincache_protocol::resp::RespDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((piece, scale, data)) = control(data) else {
        return;
    };
    let max_bulk = 8usize << scale;
    let max_command = max_bulk * 8;
    same_however_split(data, piece, |data, piece| {
        let mut d = RespDecoder::new(max_bulk, max_command);
        let mut buf = BytesMut::new();
        let mut commands = Vec::new();
        for read in data.chunks(piece) {
            buf.extend_from_slice(read);
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
    });
});
