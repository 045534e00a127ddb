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
//! 0x04 records   : a large hash, each field sealed on its own (see [`records`])
//! 0x05 segments  : a long string APPEND or SETRANGE wrote, in segments sealed on their own
//!                  (see [`segments`])
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
//!
//! Stored bytes may come from a partner's snapshot, so opening trusts none of them: a stored
//! original length sizes the buffer lz4 decompresses into, and is checked first against what
//! the compressed bytes can expand to (an lz4 sequence grows its match by at most 255 bytes
//! per byte) and against the caller's cap ([`open_capped`]); the decompressed length must then
//! be exactly the stored one. [`plausible`] checks the shape of stored bytes without opening
//! them.
//!
//! With a key, no plaintext is left behind in freed memory: the key and dictionaries live in
//! [`SecretBuf`]s (kept out of core dumps and swap), sealing reserves its whole output before
//! it starts (a vector that grows leaves its old copy behind) and wipes what the output
//! buffer held past the sealed bytes (an lz4 attempt that did not pay), and an opened value
//! is [`crate::wipe::secret_bytes`], wiped when its last reference goes.

use std::sync::Arc;

use bytes::Bytes;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::SecretBuf;
use crate::wipe::secret_bytes;

pub mod records;
pub mod segments;

const RAW: u8 = 0x00;
const LZ4: u8 = 0x01;
const ENCRYPTED: u8 = 0x02;
const LZ4_DICT: u8 = 0x03;
/// The stored form of a delete (a tombstone): never opened as a value.
pub const TOMBSTONE: u8 = 0xff;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The most an lz4 block can expand: each sequence's match length grows by at most 255 per
/// byte of input (a length byte of 255), and every other byte yields at most one.
const LZ4_MAX_EXPANSION: usize = 255;

/// Values shorter than this are stored raw. Each lz4_flex call zeroes an 8 KiB hash table
/// first, which on a 100-byte value costs more than the whole insert (a sixth of a worker's
/// time under a SET load), while the bytes it could save are small next to the ~50 bytes of
/// per-entry overhead. Dictionary compression is the way to shrink small values.
pub const MIN_COMPRESS_LEN: usize = 128;

/// Values this long are tried on two samples of [`PROBE_LEN`] bytes, at the start and in
/// the middle, before the whole is compressed: an attempt on a value lz4 cannot shrink
/// (media, already compressed data, random bytes) costs a zeroed buffer of the value's size,
/// a pass over it and a copy of it as literals, most of a worker's work on a 64 KiB SET,
/// before it is stored raw anyway. The samples are tried without the dictionary, which can
/// save at most its own size (8 KiB by default) of a value this long.
const PROBE_FROM: usize = 16 * 1024;
const PROBE_LEN: usize = 4096;
/// The most a sample's compressed form may take for the whole value to be tried: 15/16 of
/// it. A value neither of whose samples lz4 shrinks more is stored raw, a saving that small
/// not being worth a decompression on every read.
const PROBE_MAX_OUT: usize = PROBE_LEN - PROBE_LEN / 16;

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
/// (FNV-1a), so two workers that built the same dictionary agree on its id. The bytes are
/// plaintext of stored values, so they live in a [`SecretBuf`], shared by clones.
#[derive(Clone)]
pub struct Dictionary {
    id: u32,
    bytes: Arc<SecretBuf>,
}

impl Dictionary {
    /// A dictionary of `bytes`, which are moved into secret memory and wiped here.
    pub fn new(bytes: Vec<u8>) -> Dictionary {
        let bytes = Zeroizing::new(bytes);
        Dictionary::from_secret(SecretBuf::copy_of(&bytes))
    }

    /// A dictionary of bytes already in secret memory.
    pub fn from_secret(bytes: SecretBuf) -> Dictionary {
        let mut h: u32 = 0x811c_9dc5;
        for &b in bytes.as_slice() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        Dictionary {
            id: h,
            bytes: Arc::new(bytes),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl PartialEq for Dictionary {
    fn eq(&self, other: &Dictionary) -> bool {
        self.id == other.id && self.bytes() == other.bytes()
    }
}

impl Eq for Dictionary {}

/// The id and size only: the bytes are values, which logs must never show.
impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary")
            .field("id", &format_args!("{:#010x}", self.id))
            .field("len", &self.len())
            .finish()
    }
}

/// The encryption key of a worker, in a [`SecretBuf`] (shared by clones). The AEAD is made
/// from it for each value: XChaCha20-Poly1305 keeps nothing but the key (its per-nonce state
/// is derived on every call anyway), and it wipes its copy when dropped.
#[derive(Clone)]
pub struct Cipher {
    key: Arc<SecretBuf>,
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
    /// A cipher with `key`, copied into secret memory (the caller wipes its own copy).
    pub fn new(key: &[u8; 32]) -> Cipher {
        let key = Arc::new(SecretBuf::copy_of(key));
        let aead = XChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
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
        Cipher { key, fingerprint }
    }

    /// The AEAD for one operation (dropped, and so wiped, right after).
    fn aead(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(self.key.as_slice()))
    }

    /// Reads a key file: 32 raw bytes, or 64 hex characters (what `worker keygen` writes).
    /// Every copy of the key made on the way is wiped; only the secret one stays.
    pub fn from_file(path: &std::path::Path) -> Result<Cipher, String> {
        let bytes = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| format!("cannot read encryption key file {}: {e}", path.display()))?,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        if bytes.len() == 32 {
            key.copy_from_slice(&bytes);
        } else if !parse_hex_key(&bytes, &mut key) {
            return Err(format!(
                "encryption key file {} must hold 32 bytes or 64 hex characters \
                 (make one with `worker keygen > {}`)",
                path.display(),
                path.display()
            ));
        }
        Ok(Cipher::new(&key))
    }

    /// A fresh random key as 64 hex characters.
    pub fn generate_hex() -> String {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut *key);
        key.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A cipher whose key is derived from this one by `nonce`: XChaCha20's keystream under a
    /// key and a nonce is a pseudorandom function of both, and `nonce` is one no value uses.
    fn derive(&self, nonce: &[u8; NONCE_LEN]) -> Cipher {
        let mut sub = Zeroizing::new([0u8; 32]);
        self.aead()
            .encrypt_in_place_detached(XNonce::from_slice(nonce), b"", &mut *sub)
            .expect("32 bytes are far below XChaCha20's length limit");
        Cipher::new(&sub)
    }

    /// The key of the tags of a large hash's fields (see [`records`]): the same for the
    /// same encryption key, so partners find each other's records, and reveals nothing of it.
    pub fn tag_key(&self) -> records::TagKey {
        let sub = self.derive(FIELD_TAG_KEY_NONCE);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&sub.key.as_slice()[..16]);
        records::TagKey::new(bytes)
    }

    /// Identifies the key without revealing it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// How stored bytes are laid out, in a word (OBJECT ENCODING): `raw`, `compressed` (lz4,
/// with or without a dictionary), `encrypted`, or a form of records sealed one by one
/// (`records` for a large hash, `segments` for a long string).
pub fn layout_name(stored: &[u8]) -> &'static str {
    match stored.first() {
        Some(&records::RECORDS) => "records",
        Some(&segments::SEGMENTS) => "segments",
        Some(&LZ4) | Some(&LZ4_DICT) => "compressed",
        Some(&ENCRYPTED) => "encrypted",
        _ => "raw",
    }
}

/// Parses 64 hex characters (surrounding whitespace allowed) into `key`, in place: no
/// intermediate string or vector holds the key.
fn parse_hex_key(text: &[u8], key: &mut [u8; 32]) -> bool {
    let hex = text.trim_ascii();
    if hex.len() != 64 {
        return false;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    for (out, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => *out = hi << 4 | lo,
            _ => {
                key.zeroize();
                return false;
            }
        }
    }
    true
}

/// Appends the stored form of `value` (kept under `key`) to `out`: lz4-compressed when that
/// makes it smaller, then encrypted if there is a cipher.
///
/// With a cipher, `out` is grown once, before anything is written, to the most the sealed
/// form can take, and whatever it then holds past the sealed bytes (an lz4 attempt that did
/// not pay) is wiped: no plaintext is left in `out`'s memory or in a reallocation's.
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
    out.reserve(max_sealed_len(value.len()));
    out.push(ENCRYPTED);
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    let inner = out.len();
    seal_plain(value, dict, out);
    let tag = cipher
        .aead()
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), key, &mut out[inner..])
        .expect("values are far below XChaCha20's length limit");
    out.extend_from_slice(&tag);
    out.spare_capacity_mut().zeroize();
}

/// The most bytes the encrypted form of a `len`-byte value takes: the layout byte, nonce and
/// tag around the larger of its raw form and its lz4 attempt (with a dictionary's header).
fn max_sealed_len(len: usize) -> usize {
    1 + NONCE_LEN + max_plain_len(len) + TAG_LEN
}

/// The most bytes the plain stored form of a `len`-byte value takes while it is made: the
/// larger of its raw form and its lz4 attempt (with a dictionary's header).
fn max_plain_len(len: usize) -> usize {
    if len < MIN_COMPRESS_LEN {
        return 1 + len;
    }
    (1 + len).max(9 + lz4_flex::block::get_maximum_output_size(len))
}

/// Room [`seal_into`] needs for a `len`-byte value: given it up front, the buffer never grows
/// (growing copies it, and a large value's compression attempt would make it grow).
pub fn room_for(len: usize, encrypted: bool) -> usize {
    if encrypted {
        max_sealed_len(len)
    } else {
        max_plain_len(len)
    }
}

/// Whether `stored` is in the encrypted layout: what a worker with a key stores and accepts
/// from its partner for every value (tombstones hold no value and are not sealed).
pub fn is_encrypted(stored: &[u8]) -> bool {
    match stored.first() {
        Some(&records::RECORDS) => records::all_encrypted(stored),
        Some(&segments::SEGMENTS) => segments::all_encrypted(stored),
        first => first == Some(&ENCRYPTED),
    }
}

/// The nonce that derives the dictionary key from a worker's key (see [`Cipher::derive`]).
/// Values never use it: theirs are random, and 192 bits do not repeat.
const DICTIONARY_KEY_NONCE: &[u8; NONCE_LEN] = b"twincache dictionary key";

/// The nonce that derives the key of field tags from a worker's key (see [`Cipher::derive`]).
const FIELD_TAG_KEY_NONCE: &[u8; NONCE_LEN] = b"twincache field tags key";

/// A dictionary as it travels to a partner from a worker with a key: sealed like a value,
/// but under a key of its own, so that no value stored under any key name could be passed
/// off as a dictionary (a value's associated data is its key name, and key names can be
/// anything).
pub fn seal_dictionary(dict: &Dictionary, cipher: &Cipher) -> Vec<u8> {
    let mut out = Vec::new();
    let sub = cipher.derive(DICTIONARY_KEY_NONCE);
    seal_into(b"dictionary", dict.bytes(), Some(&sub), None, &mut out);
    out
}

/// Opens a dictionary sealed by [`seal_dictionary`], straight into secret memory.
pub fn open_dictionary(sealed: &[u8], cipher: &Cipher) -> Result<Dictionary, SealError> {
    if !is_encrypted(sealed) {
        return Err(SealError::UnknownLayout(
            sealed.first().copied().unwrap_or(0),
        ));
    }
    let sub = cipher.derive(DICTIONARY_KEY_NONCE);
    let bytes = open(b"dictionary", &Bytes::copy_from_slice(sealed), Some(&sub))?;
    Ok(Dictionary::from_secret(SecretBuf::copy_of(&bytes)))
}

/// The raw or lz4 form of `value` (against `dict` if given), compressed straight into `out`.
fn seal_plain(value: &[u8], dict: Option<&Dictionary>, out: &mut Vec<u8>) {
    let start = out.len();
    if value.len() >= MIN_COMPRESS_LEN
        && u32::try_from(value.len()).is_ok()
        && (value.len() < PROBE_FROM || worth_compressing(value))
    {
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
            Some(d) => lz4_flex::block::compress_into_with_dict(value, &mut out[body..], d.bytes()),
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

/// Whether lz4 shrinks the start or the middle of `value` (at least [`PROBE_FROM`] bytes
/// long) to at most [`PROBE_MAX_OUT`] bytes a sample.
fn worth_compressing(value: &[u8]) -> bool {
    let middle = value.len() / 2;
    [&value[..PROBE_LEN], &value[middle..middle + PROBE_LEN]]
        .into_iter()
        .any(shrinks)
}

/// Whether lz4 shrinks `sample` to at most [`PROBE_MAX_OUT`] bytes. Its compressed bytes are
/// wiped after: with a cipher they are the value's plaintext, in effect.
fn shrinks(sample: &[u8]) -> bool {
    let mut scratch = [0u8; 16 + 4 + PROBE_LEN * 110 / 100];
    debug_assert!(scratch.len() >= lz4_flex::block::get_maximum_output_size(sample.len()));
    let compressed = lz4_flex::block::compress_into(sample, &mut scratch);
    scratch.zeroize();
    compressed.is_ok_and(|n| n <= PROBE_MAX_OUT)
}

/// The stored form of `value` on its own.
pub fn seal(key: &[u8], value: &[u8], cipher: Option<&Cipher>) -> Bytes {
    let mut out = Vec::with_capacity(1 + value.len());
    seal_into(key, value, cipher, None, &mut out);
    Bytes::from(out)
}

/// The value of stored bytes in the raw layout, in place: what opening them returns, with
/// no copy.
pub fn raw_value(stored: &[u8]) -> Option<&[u8]> {
    match stored.split_first() {
        Some((&RAW, value)) => Some(value),
        _ => None,
    }
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
    open_capped(key, stored, cipher, dict, usize::MAX)
}

/// [`open_with`], refusing as [`SealError::Corrupt`] stored bytes that claim a value longer
/// than `max_len` before anything is allocated for it. With a cipher, what comes back (and
/// every intermediate copy) is wiped when dropped.
pub fn open_capped(
    key: &[u8],
    stored: &Bytes,
    cipher: Option<&Cipher>,
    dict: Option<&Dictionary>,
    max_len: usize,
) -> Result<Bytes, SealError> {
    match stored.first() {
        Some(&(records::RECORDS | segments::SEGMENTS)) => {
            open_records(key, stored, cipher, max_len)
        }
        Some(&ENCRYPTED) => {
            let cipher = cipher.ok_or(SealError::NoKey)?;
            if stored.len() < 1 + NONCE_LEN + TAG_LEN {
                return Err(SealError::Unauthentic);
            }
            let nonce = XNonce::from_slice(&stored[1..1 + NONCE_LEN]);
            let tag_at = stored.len() - TAG_LEN;
            let mut inner = Zeroizing::new(stored[1 + NONCE_LEN..tag_at].to_vec());
            cipher
                .aead()
                .decrypt_in_place_detached(
                    nonce,
                    key,
                    &mut inner,
                    Tag::from_slice(&stored[tag_at..]),
                )
                .map_err(|_| SealError::Unauthentic)?;
            match inner.first() {
                Some(&ENCRYPTED) => Err(SealError::UnknownLayout(ENCRYPTED)),
                _ => open_plain(
                    &secret_bytes(std::mem::take(&mut inner)),
                    dict,
                    max_len,
                    true,
                ),
            }
        }
        _ => open_plain(stored, dict, max_len, cipher.is_some()),
    }
}

/// Opens a form of records sealed one by one, where it lies: a large hash's (to its packed
/// form) or a long string's (to the string).
pub(crate) fn open_records(
    key: &[u8],
    stored: &[u8],
    cipher: Option<&Cipher>,
    max_len: usize,
) -> Result<Bytes, SealError> {
    match stored.first() {
        Some(&segments::SEGMENTS) => segments::open(key, stored, cipher, max_len),
        _ => records::open_all(key, stored, cipher, max_len),
    }
}

/// Opens a raw or lz4 form; with `secret`, a decompressed value is wiped when dropped.
fn open_plain(
    stored: &Bytes,
    dict: Option<&Dictionary>,
    max_len: usize,
    secret: bool,
) -> Result<Bytes, SealError> {
    match stored.first() {
        Some(&LZ4_DICT) => {
            let id = le_u32(stored, 1).ok_or(SealError::Corrupt)?;
            let len = le_u32(stored, 5).ok_or(SealError::Corrupt)?;
            let dict = dict
                .filter(|d| d.id == id)
                .ok_or(SealError::UnknownDictionary(id))?;
            decompress(&stored[9..], len, max_len, dict.bytes(), secret)
        }
        None => Err(SealError::Empty),
        Some(&RAW) if stored.len() - 1 > max_len => Err(SealError::Corrupt),
        Some(&RAW) => Ok(stored.slice(1..)),
        Some(&LZ4) => {
            let len = le_u32(stored, 1).ok_or(SealError::Corrupt)?;
            decompress(&stored[5..], len, max_len, &[], secret)
        }
        Some(&other) => Err(SealError::UnknownLayout(other)),
    }
}

/// `v` as shared bytes; with `secret`, wiped when the last reference goes.
pub(crate) fn owned_secret(v: Vec<u8>, secret: bool) -> Bytes {
    if secret {
        secret_bytes(v)
    } else {
        Bytes::from(v)
    }
}

/// The little-endian `u32` at `at`, as a length.
fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decompresses `block` (against `dict` if not empty) into exactly `len` bytes. The stored
/// `len` is checked before it sizes the buffer: a block cannot expand past
/// [`LZ4_MAX_EXPANSION`] times its size, nor may the value pass the caller's cap. With
/// `secret`, the buffer is wiped when dropped, whether the value comes out whole or not.
fn decompress(
    block: &[u8],
    len: u32,
    max_len: usize,
    dict: &[u8],
    secret: bool,
) -> Result<Bytes, SealError> {
    let len = len as usize;
    if len > max_len || len > block.len().saturating_mul(LZ4_MAX_EXPANSION) {
        return Err(SealError::Corrupt);
    }
    let mut out = Zeroizing::new(vec![0; len]);
    let written = if dict.is_empty() {
        lz4_flex::block::decompress_into(block, &mut out)
    } else {
        lz4_flex::block::decompress_into_with_dict(block, &mut out, dict)
    };
    match written {
        Ok(n) if n == len => Ok(owned_secret(std::mem::take(&mut *out), secret)),
        _ => Err(SealError::Corrupt),
    }
}

/// Whether `stored` has the shape of the stored form of a `value_len`-byte value (or of a
/// tombstone, whose value length is 0), judged without opening it: for entries from a
/// partner, checked before they are trusted. The raw and lz4 forms give their length
/// exactly; an encrypted form can only be bounded by its size.
pub fn plausible(stored: &[u8], value_len: usize) -> bool {
    let declared = |at: usize| le_u32(stored, at).map(|n| n as usize);
    match stored.first() {
        None => false,
        Some(&TOMBSTONE) => stored.len() == 1 && value_len == 0,
        Some(&records::RECORDS) => records::plausible(stored, value_len),
        Some(&segments::SEGMENTS) => segments::plausible(stored, value_len),
        Some(&RAW) => stored.len() - 1 == value_len,
        Some(&LZ4) => {
            declared(1) == Some(value_len)
                && value_len <= (stored.len() - 5).saturating_mul(LZ4_MAX_EXPANSION)
        }
        Some(&LZ4_DICT) => {
            stored.len() >= 9
                && declared(5) == Some(value_len)
                && value_len <= (stored.len() - 9).saturating_mul(LZ4_MAX_EXPANSION)
        }
        Some(&ENCRYPTED) => {
            let inner = stored.len().saturating_sub(1 + NONCE_LEN + TAG_LEN);
            inner > 0 && value_len <= inner.saturating_mul(LZ4_MAX_EXPANSION)
        }
        Some(_) => false,
    }
}

/// `len` bytes lz4 cannot shrink (xorshift), for the crate's tests.
#[cfg(test)]
pub(crate) fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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
        assert_eq!(seal(b"k", &noise(4096), None)[0], RAW);
    }

    #[test]
    fn large_values_are_judged_by_their_start_and_middle() {
        let text = br#"{"name":"alice","tags":["a","b"],"score":12}"#.repeat(4000);
        let noisy = noise(PROBE_FROM * 4);
        let cases: [(&str, Vec<u8>, u8); 5] = [
            ("noise", noisy.clone(), RAW),
            ("text", text.clone(), LZ4),
            (
                "text, then noise",
                [&text[..PROBE_FROM], &noisy].concat(),
                LZ4,
            ),
            (
                "noise, then text",
                [&noisy, &text[..PROBE_FROM * 5]].concat(),
                LZ4,
            ),
            // The samples' blind spot, paid in memory: stored raw, and read back whole.
            (
                "text between the samples",
                [&noisy[..PROBE_LEN], &text[..PROBE_FROM * 2], &noisy].concat(),
                RAW,
            ),
        ];
        let dict = test_dictionary();
        for (what, value, layout) in cases {
            let stored = seal(b"k", &value, None);
            assert_eq!(stored[0], layout, "{what}");
            assert_eq!(
                open(b"k", &stored, None).unwrap(),
                Bytes::from(value.clone()),
                "{what}"
            );
            let mut out = Vec::new();
            seal_into(b"k", &value, None, Some(&dict), &mut out);
            assert_eq!(out[0], if layout == LZ4 { LZ4_DICT } else { RAW }, "{what}");
            let opened = open_with(b"k", &Bytes::from(out), None, Some(&dict)).unwrap();
            assert_eq!(opened, Bytes::from(value.clone()), "{what}");
            let sealed = seal(b"k", &value, Some(&key_a()));
            assert_eq!(
                open(b"k", &sealed, Some(&key_a())).unwrap(),
                Bytes::from(value),
                "{what}"
            );
        }
    }

    #[test]
    fn a_large_value_the_dictionary_alone_would_shrink_is_stored_raw() {
        let noisy = noise(PROBE_FROM * 4);
        let dict = Dictionary::new(noisy[..8192].to_vec());
        let mut out = Vec::new();
        seal_into(b"k", &noisy, None, Some(&dict), &mut out);
        assert_eq!(out[0], RAW);
    }

    #[test]
    fn bad_stored_bytes_are_errors_not_panics() {
        let open = |b: &'static [u8]| open(b"k", &Bytes::from_static(b), Some(&key_a()));
        assert_eq!(open(b""), Err(SealError::Empty));
        assert_eq!(open(b"\x09x"), Err(SealError::UnknownLayout(9)));
        assert_eq!(open(b"\x01\xff\xff\xff\x7fjunk"), Err(SealError::Corrupt));
        assert_eq!(open(b"\x02short"), Err(SealError::Unauthentic));
    }

    /// Stored bytes with its original length replaced by `len`.
    fn with_length(stored: &[u8], at: usize, len: u32) -> Bytes {
        let mut lying = stored.to_vec();
        lying[at..at + 4].copy_from_slice(&len.to_le_bytes());
        Bytes::from(lying)
    }

    #[test]
    fn a_lying_original_length_is_corrupt_and_sizes_nothing() {
        let value = b"abcdefgh".repeat(64);
        let stored = seal(b"k", &value, None);
        assert_eq!(stored[0], LZ4);
        let block = stored.len() - 5;
        for len in [
            u32::MAX,
            (block * LZ4_MAX_EXPANSION + 1) as u32, // more than the block can expand to
            value.len() as u32 + 1,                 // plausible, but not what it holds
            value.len() as u32 - 1,
            0,
        ] {
            assert_eq!(
                open(b"k", &with_length(&stored, 1, len), None),
                Err(SealError::Corrupt),
                "{len}"
            );
        }
        // The caller's cap holds before anything is decompressed.
        assert_eq!(
            open_capped(b"k", &stored, None, None, value.len() - 1),
            Err(SealError::Corrupt)
        );
        assert_eq!(
            open_capped(b"k", &stored, None, None, value.len()).unwrap(),
            Bytes::from(value.clone())
        );
        let raw = seal(b"k", b"hello", None);
        assert_eq!(
            open_capped(b"k", &raw, None, None, 4),
            Err(SealError::Corrupt)
        );
        // The same for the dictionary layout.
        let dict = Dictionary::new(b"abcdefgh".repeat(100));
        let mut with = Vec::new();
        seal_into(b"k", &value, None, Some(&dict), &mut with);
        assert_eq!(with[0], LZ4_DICT);
        for len in [u32::MAX, value.len() as u32 + 1] {
            assert_eq!(
                open_with(b"k", &with_length(&with, 5, len), None, Some(&dict)),
                Err(SealError::Corrupt)
            );
        }
        assert_eq!(
            open_with(
                b"k",
                &Bytes::from_static(b"\x03\x01\x02"),
                None,
                Some(&dict)
            ),
            Err(SealError::Corrupt)
        );
    }

    #[test]
    fn the_expansion_bound_admits_what_lz4_really_produces() {
        // A run of zeros is as compressible as anything gets.
        let value = vec![0u8; 4 << 20];
        let stored = seal(b"k", &value, None);
        let ratio = value.len() / (stored.len() - 5);
        assert!((200..=LZ4_MAX_EXPANSION).contains(&ratio), "ratio {ratio}");
        assert_eq!(open(b"k", &stored, None).unwrap().len(), value.len());
        assert!(plausible(&stored, value.len()));
    }

    #[test]
    fn plausible_checks_every_layout_without_opening() {
        let lz4 = seal(b"k", &b"abcdefgh".repeat(64), None);
        assert!(plausible(&lz4, 512));
        assert!(!plausible(&lz4, 511));
        assert!(!plausible(
            &with_length(&lz4, 1, u32::MAX),
            u32::MAX as usize
        ));
        assert!(plausible(b"\x00hello", 5));
        assert!(!plausible(b"\x00hello", 6));
        assert!(plausible(&[TOMBSTONE], 0));
        assert!(!plausible(&[TOMBSTONE], 1));
        assert!(!plausible(&[TOMBSTONE, 0], 0));
        assert!(!plausible(b"", 0));
        assert!(!plausible(b"\x01abc", 0));
        assert!(!plausible(b"\x03abcdefg", 0));
        assert!(!plausible(b"\x09x", 1));
        let sealed = seal(b"k", b"secret", Some(&key_a()));
        assert!(plausible(&sealed, 6));
        assert!(!plausible(&sealed[..1 + NONCE_LEN + TAG_LEN], 0));
        assert!(!plausible(&sealed, 1 << 20));
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
    fn hex_keys_parse_in_place() {
        let mut key = [0u8; 32];
        let hex = b"  00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff\n";
        assert!(parse_hex_key(hex, &mut key));
        assert_eq!(key[..4], [0x00, 0x11, 0x22, 0x33]);
        assert_eq!(key[31], 0xff);
        let mut bad = *hex;
        bad[10] = b'g';
        assert!(!parse_hex_key(&bad, &mut key));
        assert_eq!(key, [0; 32], "a half-parsed key is wiped");
        assert!(!parse_hex_key(b"abcd", &mut key));
    }

    #[test]
    fn sealing_never_grows_its_buffer_midway() {
        // `seal_into` reserves `max_sealed_len` up front; were it short, the buffer would be
        // reallocated mid-seal and the old copy (with plaintext in it) freed unwiped.
        let dict = test_dictionary();
        let mut x = 1u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (x >> 56) as u8
                })
                .collect()
        };
        for len in [0, 1, 127, 128, 129, 1000, 65_536] {
            for value in [vec![b'a'; len], noise(len)] {
                for d in [None, Some(&dict)] {
                    let mut out = Vec::new();
                    seal_into(b"k", &value, Some(&key_a()), d, &mut out);
                    assert!(out.len() <= max_sealed_len(len), "{len}");
                }
            }
        }
    }

    #[test]
    fn dictionaries_travel_sealed_under_a_key_of_their_own() {
        let dict = test_dictionary();
        let sealed = seal_dictionary(&dict, &key_a());
        assert!(is_encrypted(&sealed));
        assert!(
            !sealed
                .windows(12)
                .any(|w| dict.bytes().windows(12).any(|d| d == w)),
            "the dictionary shows through"
        );
        let opened = open_dictionary(&sealed, &key_a()).unwrap();
        assert_eq!(opened, dict);
        assert_eq!(
            open_dictionary(&sealed, &Cipher::new(&[8; 32])),
            Err(SealError::Unauthentic)
        );
        assert_eq!(
            open_dictionary(dict.bytes(), &key_a()),
            Err(SealError::UnknownLayout(dict.bytes()[0]))
        );
        // A value sealed under any key name, even the dictionary's associated data, is not a
        // sealed dictionary: the dictionary key is another key.
        let value = seal(b"dictionary", dict.bytes(), Some(&key_a()));
        assert_eq!(
            open_dictionary(&value, &key_a()),
            Err(SealError::Unauthentic)
        );
        assert_ne!(
            key_a().derive(DICTIONARY_KEY_NONCE).fingerprint(),
            key_a().fingerprint()
        );
        assert!(format!("{dict:?}").contains("len"), "no bytes in Debug");
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

    fn test_dictionary() -> Dictionary {
        Dictionary::new(br#"{"name":"alice","tags":["a","b"]}"#.repeat(20))
    }

    /// Opens `stored` every way a worker might; it must return, not panic.
    fn open_every_way(stored: &[u8]) {
        let stored = Bytes::copy_from_slice(stored);
        let dict = test_dictionary();
        for cipher in [None, Some(key_a())] {
            for d in [None, Some(&dict)] {
                let _ = open_with(b"k", &stored, cipher.as_ref(), d);
                let _ = open_capped(b"k", &stored, cipher.as_ref(), d, 100);
            }
        }
        let _ = plausible(&stored, stored.len());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            layout in prop_oneof![Just(RAW), Just(LZ4), Just(ENCRYPTED), Just(LZ4_DICT), Just(TOMBSTONE), any::<u8>()],
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut stored = vec![layout];
            stored.extend_from_slice(&rest);
            open_every_way(&stored);
        }

        #[test]
        fn mutated_values_never_panic(
            value in proptest::collection::vec(prop_oneof![Just(b'a'), any::<u8>()], 0..600),
            encrypt: bool,
            use_dict: bool,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            truncate in 0usize..8,
        ) {
            let dict = test_dictionary();
            let cipher = encrypt.then(key_a);
            let mut stored = Vec::new();
            seal_into(b"k", &value, cipher.as_ref(), use_dict.then_some(&dict), &mut stored);
            for (at, byte) in edits {
                let at = at % stored.len();
                stored[at] = byte;
            }
            stored.truncate(stored.len().saturating_sub(truncate));
            open_every_way(&stored);
        }

        #[test]
        fn round_trips(value in proptest::collection::vec(any::<u8>(), 0..2048), repeat in 1usize..4, encrypt: bool) {
            let value = value.repeat(repeat);
            let cipher = encrypt.then(key_a);
            let stored = seal(b"key", &value, cipher.as_ref());
            prop_assert_eq!(open(b"key", &stored, cipher.as_ref()).unwrap(), Bytes::from(value));
        }
    }
}
