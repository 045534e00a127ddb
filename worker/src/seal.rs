//! Turning a value into the bytes a worker stores, and back.
//!
//! The first stored byte says how the rest is laid out, so the format can grow (dictionaries,
//! encryption) without a flag day: readers refuse layouts they do not know instead of
//! returning garbage.
//!
//! ```text
//! 0x00 raw   : value
//! 0x01 lz4   : u32 little-endian original length, lz4 block
//! ```

use bytes::Bytes;

const RAW: u8 = 0x00;
const LZ4: u8 = 0x01;

/// Values shorter than this are stored raw. Each lz4_flex call zeroes an 8 KiB hash table
/// first, which on a 100-byte value costs more than the whole insert (a sixth of a worker's
/// time under a SET load), while the bytes it could save are small next to the ~50 bytes of
/// per-entry overhead. Dictionary compression is the way to shrink small values.
pub const MIN_COMPRESS_LEN: usize = 128;

/// Why stored bytes could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("stored value is empty")]
    Empty,
    #[error("unknown stored layout {0:#04x}")]
    UnknownLayout(u8),
    #[error("corrupt compressed value")]
    Corrupt,
}

/// Appends the stored form of `value` to `out`: lz4-compressed when that makes it smaller,
/// raw otherwise. Compresses straight into `out`, so the stored bytes are written once.
pub fn seal_into(value: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    if value.len() >= MIN_COMPRESS_LEN && u32::try_from(value.len()).is_ok() {
        out.push(LZ4);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        let body = out.len();
        out.resize(
            body + lz4_flex::block::get_maximum_output_size(value.len()),
            0,
        );
        if let Ok(n) = lz4_flex::block::compress_into(value, &mut out[body..]) {
            if 5 + n < 1 + value.len() {
                out.truncate(body + n);
                return;
            }
        }
        out.truncate(start);
    }
    out.push(RAW);
    out.extend_from_slice(value);
}

/// The stored form of `value` on its own.
pub fn seal(value: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(1 + value.len());
    seal_into(value, &mut out);
    Bytes::from(out)
}

/// The value behind stored bytes. Raw values come back as a slice, without a copy.
pub fn open(stored: &Bytes) -> Result<Bytes, SealError> {
    match stored.first() {
        None => Err(SealError::Empty),
        Some(&RAW) => Ok(stored.slice(1..)),
        Some(&LZ4) => lz4_flex::block::decompress_size_prepended(&stored[1..])
            .map(Bytes::from)
            .map_err(|_| SealError::Corrupt),
        Some(&other) => Err(SealError::UnknownLayout(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_values_stay_raw() {
        let stored = seal(b"hello");
        assert_eq!(&stored[..], b"\x00hello");
        assert_eq!(open(&stored).unwrap(), Bytes::from_static(b"hello"));
    }

    #[test]
    fn compressible_values_shrink() {
        let value =
            br#"{"name":"alice","tags":["a","b"],"name2":"alice","tags2":["a","b"]}"#.repeat(8);
        let stored = seal(&value);
        assert_eq!(stored[0], LZ4);
        assert!(
            stored.len() < value.len() / 2,
            "{} vs {}",
            stored.len(),
            value.len()
        );
        assert_eq!(open(&stored).unwrap(), Bytes::from(value));
    }

    #[test]
    fn incompressible_values_stay_raw() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let value: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(seal(&value)[0], RAW);
    }

    #[test]
    fn bad_stored_bytes_are_errors_not_panics() {
        assert_eq!(open(&Bytes::new()), Err(SealError::Empty));
        assert_eq!(
            open(&Bytes::from_static(b"\x09x")),
            Err(SealError::UnknownLayout(9))
        );
        assert_eq!(
            open(&Bytes::from_static(b"\x01\xff\xff\xff\x7fjunk")),
            Err(SealError::Corrupt)
        );
    }

    proptest! {
        #[test]
        fn round_trips(value in proptest::collection::vec(any::<u8>(), 0..2048), repeat in 1usize..4) {
            let value = value.repeat(repeat);
            prop_assert_eq!(open(&seal(&value)).unwrap(), Bytes::from(value));
        }
    }
}
