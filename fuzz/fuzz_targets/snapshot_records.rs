//! A partner's snapshot, as `sync::Intake` applies it frame by frame: never a panic, the
//! store's counts stay true to what it holds, an encrypting store holds no unsealed value
//! whatever it is sent, and what it took merges whole elsewhere. Input: a control byte (bit
//! 0: the store encrypts; bit 1: a serving worker's merge rather than a stale one's resync;
//! bit 2: the store uses dictionaries), then frames of a u16 LE length and the frame's
//! records (`kind:u8 len:u32le bytes`, see `worker/src/sync.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use twincache_worker::seal::{is_encrypted, Cipher, TOMBSTONE};
use twincache_worker::store::{Store, MAX_KEY_LEN};
use twincache_worker::sync::{Intake, Refill};

/// The key the seeds were made with (see fuzz/README.md).
fn key() -> Cipher {
    Cipher::new(&[7; 32])
}

fn held(store: &Store) -> Vec<Vec<u8>> {
    let mut raws = Vec::new();
    for n in 0..Store::SHARDS {
        store.snapshot_shard(n, |raw| raws.push(raw.to_vec()));
    }
    raws
}

/// The stored bytes of an entry (version, expiry, key length, value length, key, stored).
/// The key length's top two bits are the value's type.
fn stored_of(raw: &[u8]) -> &[u8] {
    let len = u32::from_le_bytes(raw[16..20].try_into().unwrap()) as usize & MAX_KEY_LEN;
    &raw[24 + len..]
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return;
    };
    let cipher = (ctl & 1 == 1).then(key);
    let refill = match ctl & 0x12 {
        0x02 => Refill::Merge,
        // A slot move's import of the lower half of the slots.
        0x10 | 0x12 => Refill::Import(twincache_protocol::slots::SlotRange::new(0, 8192).unwrap()),
        _ => Refill::Resync,
    };
    let dict_size = if ctl & 4 == 4 { 256 } else { 0 };
    let store = Store::new(cipher.clone(), 0).with_dictionary_size(dict_size);
    let mut intake = Intake::new(&store, refill);
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let end = (2 + len).min(rest.len());
        let frame = &rest[2..end];
        rest = &rest[end..];
        if intake.apply(frame).is_err() {
            break; // a refill ends at its first bad frame
        }
    }
    let pulled = intake.finish();
    let usage = store.usage();
    let raws = held(&store);
    assert_eq!(usage.keys + usage.tombstones, raws.len());
    // The store started empty: all it holds was taken from the snapshot, and nothing is
    // taken before the meta record.
    match pulled {
        Some(pulled) => assert!(pulled.keys as usize >= raws.len()),
        None => assert!(raws.is_empty(), "taken before the meta record"),
    }
    if cipher.is_some() {
        for raw in &raws {
            let stored = stored_of(raw);
            assert!(
                is_encrypted(stored) || stored == [TOMBSTONE],
                "an encrypting store took an unsealed value"
            );
        }
    }
    let again = Store::new(cipher, 0);
    for raw in &raws {
        assert!(again.merge(raw).is_some(), "a held entry is refused");
    }
});
