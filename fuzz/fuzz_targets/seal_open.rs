//! Opening stored bytes (as a partner's snapshot may carry them): never a panic, never more
//! than the cap, and whatever opens is judged plausible by the check partner entries pass.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use twincache_worker::seal::{open_capped, plausible, Cipher, Dictionary};

/// The dictionary and key the seeds were sealed with (see fuzz/README.md).
fn dictionary() -> Dictionary {
    Dictionary::new(br#"{"user":"alice","tags":["a","b"],"n":1}"#.repeat(8))
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stored)) = data.split_first() else {
        return;
    };
    let stored = Bytes::copy_from_slice(stored);
    let cipher = (ctl & 1 == 1).then(|| Cipher::new(&[7; 32]));
    let dict = dictionary();
    let dict = (ctl & 2 == 2).then_some(&dict);
    let cap = if ctl & 4 == 4 { 64 } else { usize::MAX };
    if let Ok(value) = open_capped(b"k", &stored, cipher.as_ref(), dict, cap) {
        assert!(value.len() <= cap);
        if stored[0] != 0x02 {
            assert!(
                plausible(&stored, value.len()),
                "opens as {} bytes, yet judged implausible",
                value.len()
            );
        }
    }
});
