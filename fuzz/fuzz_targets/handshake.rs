//! The cluster handshake (`protocol::auth`), both sides, against arbitrary peers: never a
//! panic, never a success without the secret. Input: a control byte (bit 0: fuzz the worker's
//! side, else the initiator's), then the bytes the other side sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use twincache_protocol::auth::{accept, connect, ClusterSecret};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, peer)) = data.split_first() else {
        return;
    };
    let secret = ClusterSecret::from_bytes(&[7; 32]).expect("32 bytes");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let peer = peer.to_vec();
        let sender = tokio::spawn(async move {
            let _ = theirs.write_all(&peer).await;
            // Then nothing more: the handshake must end at end of input, not wait.
            let _ = theirs.shutdown().await;
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut sink).await;
        });
        let result = if ctl & 1 == 1 {
            accept(&mut ours, &secret).await
        } else {
            connect(&mut ours, &secret).await
        };
        // Bytes that never saw the secret cannot produce a valid proof.
        assert!(result.is_err(), "a handshake succeeded against fuzzed bytes");
        drop(ours);
        let _ = sender.await;
    });
});
