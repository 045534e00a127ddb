//! Turning a value into the bytes a worker stores, and back.
//!
//! The first stored byte says how the rest is laid out, so the format can grow (dictionaries)
//! without a flag day: readers refuse layouts they do not know instead of returning garbage.
//!
//! ```text
//! 0x00 raw       : value
//! 0x01 lz4       : u32 little-endian original length, lz4 block
//! 0x02 encrypted : nonce (24 bytes), XChaCha20-Poly1305(inner), tag (16 bytes)
//!                  where inner is the raw, lz4 or lz4-with-dictionary form
//! 0x03 lz4 dict  : u32 LE dictionary id, u32 LE original length, lz4 block compressed
//!                  against that dictionary
//! ```
//!
//! Cache values are small and alike (JSON records, serialized objects), so compressed one by
//! one they shrink little: on ~900-byte JSON records lz4 alone kept 75% of the bytes, lz4
//! against a 4 KiB dictionary of earlier records 40% (64 KiB: 37%, at 5x the time, since
//! lz4_flex hashes the whole dictionary on every call). A [`Dictionary`] is a few KiB of
//! values the worker has stored.
//!
//! Values are compressed first, then encrypted (ciphertext does not compress). Every value
//! gets a fresh random 192-bit nonce, so nonces never repeat in practice, and the key name
//! is the associated data: a stored value moved onto another key fails to open.

use bytes::Bytes;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;

const RAW: u8 = 0x00;
const LZ4: u8 = 0x01;
const ENCRYPTED: u8 = 0x02;
const LZ4_DICT: u8 = 0x03;
/// The stored form of a delete (a tombstone): never opened as a value.
pub const TOMBSTONE: u8 = 0xff;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

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
    #[error("value is encrypted and this worker has no key")]
    NoKey,
    #[error("value does not open with this key under this name")]
    Unauthentic,
    #[error("value was compressed with dictionary {0:#010x}, which this worker does not have")]
    UnknownDictionary(u32),
}

/// A compression dictionary: bytes of typical values, and an id derived from its content
/// (FNV-1a), so two workers that built the same dictionary agree on its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dictionary {
    id: u32,
    bytes: Box<[u8]>,
}

impl Dictionary {
    pub fn new(bytes: Vec<u8>) -> Dictionary {
        let mut h: u32 = 0x811c_9dc5;
        for &b in &bytes {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        Dictionary {
            id: h,
            bytes: bytes.into_boxed_slice(),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The encryption key of a worker.
#[derive(Clone)]
pub struct Cipher {
    aead: XChaCha20Poly1305,
    fingerprint: String,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cipher")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Cipher {
    pub fn new(key: &[u8; 32]) -> Cipher {
        let aead = XChaCha20Poly1305::new(Key::from_slice(key));
        // The tag of an empty message under a fixed nonce: the same for the same key, and
        // reveals nothing about it. Partners compare fingerprints to find mismatched keys.
        let tag = aead
            .encrypt_in_place_detached(
                XNonce::from_slice(&[0; NONCE_LEN]),
                b"twincache key fingerprint",
                &mut [],
            )
            .expect("encrypting nothing cannot fail");
        let fingerprint = tag[..8].iter().map(|b| format!("{b:02x}")).collect();
        Cipher { aead, fingerprint }
    }

    /// Reads a key file: 32 raw bytes, or 64 hex characters (what `worker keygen` writes).
    pub fn from_file(path: &std::path::Path) -> Result<Cipher, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read encryption key file {}: {e}", path.display()))?;
        let key: Vec<u8> = if bytes.len() == 32 {
            bytes
        } else {
            let text = String::from_utf8_lossy(&bytes);
            let hex = text.trim();
            (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()
                .filter(|k| k.len() == 32 && hex.len() == 64)
                .ok_or_else(|| {
                    format!(
                        "encryption key file {} must hold 32 bytes or 64 hex characters \
                         (make one with `worker keygen > {}`)",
                        path.display(),
                        path.display()
                    )
                })?
        };
        Ok(Cipher::new(&key.try_into().expect("32 bytes")))
    }

    /// A fresh random key as 64 hex characters.
    pub fn generate_hex() -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        key.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Identifies the key without revealing it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Appends the stored form of `value` (kept under `key`) to `out`: lz4-compressed when that
/// makes it smaller, then encrypted if there is a cipher.
pub fn seal_into(
    key: &[u8],
    value: &[u8],
    cipher: Option<&Cipher>,
    dict: Option<&Dictionary>,
    out: &mut Vec<u8>,
) {
    let Some(cipher) = cipher else {
        return seal_plain(value, dict, out);
    };
    out.push(ENCRYPTED);
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    let inner = out.len();
    seal_plain(value, dict, out);
    let tag = cipher
        .aead
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), key, &mut out[inner..])
        .expect("values are far below XChaCha20's length limit");
    out.extend_from_slice(&tag);
}

/// The raw or lz4 form of `value` (against `dict` if given), compressed straight into `out`.
fn seal_plain(value: &[u8], dict: Option<&Dictionary>, out: &mut Vec<u8>) {
    let start = out.len();
    if value.len() >= MIN_COMPRESS_LEN && u32::try_from(value.len()).is_ok() {
        match dict {
            Some(d) => {
                out.push(LZ4_DICT);
                out.extend_from_slice(&d.id.to_le_bytes());
            }
            None => out.push(LZ4),
        }
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        let body = out.len();
        out.resize(
            body + lz4_flex::block::get_maximum_output_size(value.len()),
            0,
        );
        let compressed = match dict {
            Some(d) => lz4_flex::block::compress_into_with_dict(value, &mut out[body..], &d.bytes),
            None => lz4_flex::block::compress_into(value, &mut out[body..]),
        };
        if let Ok(n) = compressed {
            if body - start + n < 1 + value.len() {
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
pub fn seal(key: &[u8], value: &[u8], cipher: Option<&Cipher>) -> Bytes {
    let mut out = Vec::with_capacity(1 + value.len());
    seal_into(key, value, cipher, None, &mut out);
    Bytes::from(out)
}

/// The value behind stored bytes kept under `key`. Raw values come back as a slice, without
/// a copy.
pub fn open(key: &[u8], stored: &Bytes, cipher: Option<&Cipher>) -> Result<Bytes, SealError> {
    open_with(key, stored, cipher, None)
}

/// [`open`], for values that may have been compressed against `dict`.
pub fn open_with(
    key: &[u8],
    stored: &Bytes,
    cipher: Option<&Cipher>,
    dict: Option<&Dictionary>,
) -> Result<Bytes, SealError> {
    match stored.first() {
        Some(&ENCRYPTED) => {
            let cipher = cipher.ok_or(SealError::NoKey)?;
            if stored.len() < 1 + NONCE_LEN + TAG_LEN {
                return Err(SealError::Unauthentic);
            }
            let nonce = XNonce::from_slice(&stored[1..1 + NONCE_LEN]);
            let tag_at = stored.len() - TAG_LEN;
            let mut inner = stored[1 + NONCE_LEN..tag_at].to_vec();
            cipher
                .aead
                .decrypt_in_place_detached(
                    nonce,
                    key,
                    &mut inner,
                    Tag::from_slice(&stored[tag_at..]),
                )
                .map_err(|_| SealError::Unauthentic)?;
            match inner.first() {
                Some(&ENCRYPTED) => Err(SealError::UnknownLayout(ENCRYPTED)),
                _ => open_plain(&Bytes::from(inner), dict),
            }
        }
        _ => open_plain(stored, dict),
    }
}

fn open_plain(stored: &Bytes, dict: Option<&Dictionary>) -> Result<Bytes, SealError> {
    match stored.first() {
        Some(&LZ4_DICT) => {
            let header = stored.get(1..9).ok_or(SealError::Corrupt)?;
            let id = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(header[4..].try_into().expect("4 bytes")) as usize;
            let dict = dict
                .filter(|d| d.id == id)
                .ok_or(SealError::UnknownDictionary(id))?;
            lz4_flex::block::decompress_with_dict(&stored[9..], len, &dict.bytes)
                .map(Bytes::from)
                .map_err(|_| SealError::Corrupt)
        }
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

    fn key_a() -> Cipher {
        Cipher::new(&[7; 32])
    }

    #[test]
    fn small_values_stay_raw() {
        let stored = seal(b"k", b"hello", None);
        assert_eq!(&stored[..], b"\x00hello");
        assert_eq!(
            open(b"k", &stored, None).unwrap(),
            Bytes::from_static(b"hello")
        );
    }

    #[test]
    fn compressible_values_shrink() {
        let value =
            br#"{"name":"alice","tags":["a","b"],"name2":"alice","tags2":["a","b"]}"#.repeat(8);
        let stored = seal(b"k", &value, None);
        assert_eq!(stored[0], LZ4);
        assert!(
            stored.len() < value.len() / 2,
            "{} vs {}",
            stored.len(),
            value.len()
        );
        assert_eq!(open(b"k", &stored, None).unwrap(), Bytes::from(value));
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
        assert_eq!(seal(b"k", &value, None)[0], RAW);
    }

    #[test]
    fn bad_stored_bytes_are_errors_not_panics() {
        let open = |b: &'static [u8]| open(b"k", &Bytes::from_static(b), Some(&key_a()));
        assert_eq!(open(b""), Err(SealError::Empty));
        assert_eq!(open(b"\x09x"), Err(SealError::UnknownLayout(9)));
        assert_eq!(open(b"\x01\xff\xff\xff\x7fjunk"), Err(SealError::Corrupt));
        assert_eq!(open(b"\x02short"), Err(SealError::Unauthentic));
    }

    #[test]
    fn encrypted_values_hide_the_plaintext_and_open_only_with_key_and_name() {
        let value = b"the secret value: account 12345, balance 678".repeat(4);
        let stored = seal(b"user:1", &value, Some(&key_a()));
        assert_eq!(stored[0], ENCRYPTED);
        assert!(
            !stored
                .windows(10)
                .any(|w| value.windows(10).any(|v| v == w)),
            "plaintext leaked"
        );
        assert_eq!(
            open(b"user:1", &stored, Some(&key_a())).unwrap(),
            Bytes::from(value.clone())
        );
        assert_eq!(
            open(b"user:2", &stored, Some(&key_a())),
            Err(SealError::Unauthentic)
        );
        assert_eq!(
            open(b"user:1", &stored, Some(&Cipher::new(&[8; 32]))),
            Err(SealError::Unauthentic)
        );
        assert_eq!(open(b"user:1", &stored, None), Err(SealError::NoKey));
        let mut tampered = stored.to_vec();
        tampered[30] ^= 1;
        assert_eq!(
            open(b"user:1", &Bytes::from(tampered), Some(&key_a())),
            Err(SealError::Unauthentic)
        );
    }

    #[test]
    fn nonces_never_repeat() {
        let cipher = key_a();
        let mut nonces = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let stored = seal(b"k", b"same value every time", Some(&cipher));
            assert!(
                nonces.insert(stored[1..1 + NONCE_LEN].to_vec()),
                "nonce repeated"
            );
        }
    }

    #[test]
    fn fingerprints_tell_keys_apart() {
        assert_eq!(key_a().fingerprint(), Cipher::new(&[7; 32]).fingerprint());
        assert_ne!(key_a().fingerprint(), Cipher::new(&[8; 32]).fingerprint());
        assert_eq!(key_a().fingerprint().len(), 16);
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("twincache-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hex = dir.join("hex");
        std::fs::write(&hex, Cipher::generate_hex() + "\n").unwrap();
        assert!(Cipher::from_file(&hex).is_ok());
        let raw = dir.join("raw");
        std::fs::write(&raw, [1u8; 32]).unwrap();
        assert_eq!(
            Cipher::from_file(&raw).unwrap().fingerprint(),
            Cipher::new(&[1; 32]).fingerprint()
        );
        let short = dir.join("short");
        std::fs::write(&short, "abcd").unwrap();
        assert!(Cipher::from_file(&short).unwrap_err().contains("64 hex"));
        assert!(Cipher::from_file(&dir.join("missing"))
            .unwrap_err()
            .contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dictionary_shrinks_alike_values_and_is_needed_to_open_them() {
        let record = |i: u32| {
            format!(
                r#"{{"id":{i},"username":"user_{i}","email":"user{i}@example.com","preferences":{{"theme":"dark","language":"en"}},"tags":["alpha","beta"],"bio":"a short bio about user {i}"}}"#
            )
        };
        let mut sample = Vec::new();
        for i in 0..30 {
            sample.extend_from_slice(record(i).as_bytes());
        }
        let dict = Dictionary::new(sample);
        let value = record(1000);
        let mut plain = Vec::new();
        seal_into(b"k", value.as_bytes(), None, None, &mut plain);
        let mut with = Vec::new();
        seal_into(b"k", value.as_bytes(), None, Some(&dict), &mut with);
        assert_eq!(with[0], LZ4_DICT);
        assert!(
            with.len() * 2 < plain.len(),
            "{} vs {}",
            with.len(),
            plain.len()
        );
        let with = Bytes::from(with);
        assert_eq!(
            open_with(b"k", &with, None, Some(&dict)).unwrap(),
            value.as_bytes()
        );
        assert_eq!(
            open_with(b"k", &with, None, None),
            Err(SealError::UnknownDictionary(dict.id()))
        );
        let other = Dictionary::new(b"something else entirely".to_vec());
        assert!(matches!(
            open_with(b"k", &with, None, Some(&other)),
            Err(SealError::UnknownDictionary(_))
        ));
        let mut both = Vec::new();
        seal_into(
            b"k",
            value.as_bytes(),
            Some(&key_a()),
            Some(&dict),
            &mut both,
        );
        assert_eq!(
            open_with(b"k", &Bytes::from(both), Some(&key_a()), Some(&dict)).unwrap(),
            value.as_bytes()
        );
        assert_eq!(
            Dictionary::new(b"abc".to_vec()).id(),
            Dictionary::new(b"abc".to_vec()).id()
        );
    }

    proptest! {
        #[test]
        fn round_trips(value in proptest::collection::vec(any::<u8>(), 0..2048), repeat in 1usize..4, encrypt: bool) {
            let value = value.repeat(repeat);
            let cipher = encrypt.then(key_a);
            let stored = seal(b"key", &value, cipher.as_ref());
            prop_assert_eq!(open(b"key", &stored, cipher.as_ref()).unwrap(), Bytes::from(value));
        }
    }
}
