//! Merging a partner's snapshot entries: never a panic, and the store's counts stay true to
//! what it holds. Input: a control byte, then records of a u16 LE length and the entry bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twincache_worker::seal::{Cipher, Dictionary};
use twincache_worker::store::Store;

fn snapshot(store: &Store) -> Vec<Vec<u8>> {
    let mut raws = Vec::new();
    for n in 0..Store::SHARDS {
        store.snapshot_shard(n, |raw| raws.push(raw.to_vec()));
    }
    raws
}

/// The key of an entry (version, expiry, key length, value length, key, stored bytes).
fn key_of(raw: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(raw.get(16..20)?.try_into().ok()?) as usize;
    raw.get(24..24usize.checked_add(len)?)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return;
    };
    let cipher = (ctl & 1 == 1).then(|| Cipher::new(&[7; 32]));
    let store = Store::new(cipher.clone(), 0);
    let theirs = Dictionary::new(br#"{"user":"alice","tags":["a","b"],"n":1}"#.repeat(8));
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let end = (2 + len).min(rest.len());
        let raw = &rest[2..end];
        rest = &rest[end..];
        let taken = if ctl & 2 == 2 {
            store.merge_resealed(raw, &theirs, 0)
        } else {
            store.merge(raw)
        };
        if let (Some(_), Some(key)) = (taken, key_of(raw)) {
            let _ = store.get(key);
            let _ = (store.exists(key), store.version(key));
            if ctl & 4 == 4 {
                store.del(key, 1);
            }
        }
    }
    let usage = store.usage();
    let held = snapshot(&store);
    assert_eq!(usage.keys + usage.tombstones, held.len());
    // Whatever was taken is a valid entry: a snapshot of it merges whole elsewhere.
    let again = Store::new(cipher, 0);
    let mut taken = 0;
    for raw in &held {
        taken += usize::from(again.merge(raw).expect("a held entry is refused").taken());
    }
    let usage = again.usage();
    assert_eq!(usage.keys + usage.tombstones, taken);
});
