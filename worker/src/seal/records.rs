//! A large hash's stored form: each field sealed on its own, behind an index of keyed tags,
//! so that a write of one field seals one field.
//!
//! ```text
//! 0x04 records : count:u32 | value_len:u32 | index | body                (little-endian)
//! index        : count x (tag:u32 | end:u32), ordered by tag
//! body         : the records back to back; record i is body[end(i-1)..end(i)]
//! record       : the stored form (raw, lz4 or encrypted; never against a dictionary) of
//!                field_len:u32 field value_len:u32 value (big-endian, the packed pair)
//! ```
//!
//! A hash is small most of the time (sessions, profiles): it stays one packed value sealed
//! as a whole (`exec::codec`), which compresses best. Past [`MAX_PACKED_FIELDS`] fields or
//! [`MAX_PACKED_BYTES`] bytes, where opening, re-encoding and sealing the whole hash again
//! on every HSET costs more than anything else a write does, it takes this form (as Redis
//! turns a listpack into a hash table past `hash-max-listpack-entries`, 128). A write then
//! opens only the records whose tag matches the fields it names and seals only what it
//! writes ([`plan`]); the rest of the stored bytes is copied as it is, once, into the new
//! entry ([`Plan::apply`]). The partner is sent the plan's edit ([`Plan::edit`], a
//! `replicate` change flagged `STORED | PATCH`) and replays it on its identical copy
//! ([`replay`]), or the whole form (`STORED`) when it cannot; it seals nothing either way.
//!
//! Opened whole, the records give the packed form (count, then the pairs in tag order), so
//! every reader of a whole hash (HGETALL, RENAME, snapshots opened elsewhere) works on both.
//!
//! **Tags.** A tag is SipHash-2-4 of the field under a key both partners derive from the
//! encryption key (or a fixed one without encryption), so that records copy between
//! partners as they are. With encryption, tags reveal which fields are equal to which (the
//! key is the same for every hash, so across hashes too), not what they are; a record's size
//! reveals its field and value's length together. A tag picks the records to open; the field inside decides,
//! so colliding tags cost an extra open, never a wrong answer. Without a key an attacker
//! can make many fields of one hash share a tag, which makes operations on that hash scan
//! them: what every hash operation cost before this form existed.
//!
//! **Cost.** The index takes 8 bytes a field, the record's layout byte 1 (encryption adds
//! 41: its own layout byte, nonce and tag). A write still copies the hash's stored bytes once (memory speed),
//! but no longer decompresses, decrypts, compresses or encrypts anything it does not write.
//!
//! Every length is checked before it is used: the bytes may come from a partner.

use std::collections::HashMap;
use std::hash::Hasher;

use bytes::{BufMut, Bytes};
use siphasher::sip::SipHasher24;
use zeroize::Zeroizing;

use super::{open_capped, seal_into, Cipher, SealError, ENCRYPTED, LZ4, RAW};

/// The layout byte of this form.
pub const RECORDS: u8 = 0x04;
/// Fields past which a hash is stored as records (Redis' `hash-max-listpack-entries`).
pub const MAX_PACKED_FIELDS: usize = 128;
/// Packed bytes past which a hash is stored as records.
pub const MAX_PACKED_BYTES: usize = 16 * 1024;

const HEADER: usize = 1 + 4 + 4;
const SLOT: usize = 8;

/// The key tags are computed under.
pub struct TagKey([u8; 16]);

impl TagKey {
    /// The fixed key, for workers without encryption.
    pub const PLAIN: TagKey = TagKey(*b"twincache fields");

    pub(super) fn new(bytes: [u8; 16]) -> TagKey {
        TagKey(bytes)
    }

    /// The tag of `field`.
    pub fn tag(&self, field: &[u8]) -> u32 {
        let mut h = SipHasher24::new_with_key(&self.0);
        h.write(field);
        h.finish() as u32
    }
}

impl Drop for TagKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// What sealing records takes: the store's cipher and tag key.
#[derive(Clone, Copy)]
pub struct Sealer<'a> {
    pub cipher: Option<&'a Cipher>,
    pub tags: &'a TagKey,
}

/// Whether a packed hash of `fields` fields and `len` bytes is stored as records.
pub fn wanted(fields: usize, len: usize) -> bool {
    fields > MAX_PACKED_FIELDS || len > MAX_PACKED_BYTES
}

/// The most bytes the records form of a packed hash of `fields` fields and `len` bytes
/// takes: what a frame must be able to carry to copy it to the partner. A record is never
/// longer than its pair's raw form (lz4 is kept only when shorter, see `seal_plain`): the
/// pairs take `len - 4` bytes, and each record adds its layout byte (and, encrypted, nonce
/// and tag, and the sealed layout byte inside) and its index slot.
pub fn max_stored_len(fields: usize, len: usize, encrypted: bool) -> usize {
    let per_record = SLOT + if encrypted { 42 } else { 1 };
    HEADER + len.saturating_sub(4) + fields.saturating_mul(per_record)
}

/// Whether `stored` holds records sealed one by one, a large hash's ([`RECORDS`]) or a long
/// string's (`segments::SEGMENTS`): stored bytes that travel and are edited as they are,
/// never against a dictionary.
pub fn is_records(stored: &[u8]) -> bool {
    matches!(stored.first(), Some(&(RECORDS | super::segments::SEGMENTS)))
}

/// The parsed header of a records form (index and body not yet checked).
struct Records<'a> {
    count: usize,
    value_len: usize,
    index: &'a [u8],
    body: &'a [u8],
}

fn le_u32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

impl<'a> Records<'a> {
    fn parse(stored: &'a [u8]) -> Option<Records<'a>> {
        if stored.first() != Some(&RECORDS) {
            return None;
        }
        let count = le_u32(stored, 1)?;
        let value_len = le_u32(stored, 5)?;
        let index_end = HEADER.checked_add(count.checked_mul(SLOT)?)?;
        let index = stored.get(HEADER..index_end)?;
        Some(Records {
            count,
            value_len,
            index,
            body: &stored[index_end..],
        })
    }

    fn tag(&self, i: usize) -> u32 {
        le_u32(self.index, i * SLOT).unwrap_or(u32::MAX as usize) as u32
    }

    fn end(&self, i: usize) -> usize {
        le_u32(self.index, i * SLOT + 4).unwrap_or(0)
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.end(i - 1)
        }
    }

    fn record(&self, i: usize) -> Result<&'a [u8], SealError> {
        self.body
            .get(self.start(i)..self.end(i))
            .ok_or(SealError::Corrupt)
    }

    /// Whether the index runs in tag order over the whole body, every record non-empty:
    /// what copying runs of records relies on.
    fn well_formed(&self) -> bool {
        let (mut tag, mut end) = (0, 0);
        for i in 0..self.count {
            let (t, e) = (self.tag(i), self.end(i));
            if t < tag || e <= end || e > self.body.len() {
                return false;
            }
            (tag, end) = (t, e);
        }
        end == self.body.len()
    }

    /// The first record whose tag is not below `tag`.
    fn first_from(&self, tag: u32) -> usize {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.tag(mid) < tag {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The records whose tag is `tag`.
    fn tagged(&self, tag: u32) -> std::ops::Range<usize> {
        let lo = self.first_from(tag);
        let mut end = lo;
        while end < self.count && self.tag(end) == tag {
            end += 1;
        }
        lo..end
    }

    /// Record `i` opened: its field, its value, and the length of its packed pair.
    fn open(&self, i: usize, key: &[u8], s: Sealer) -> Result<(Bytes, Bytes, usize), SealError> {
        let record = Bytes::copy_from_slice(self.record(i)?);
        let pair = open_capped(key, &record, s.cipher, None, self.value_len)?;
        let (field, value) = split_pair(&pair).ok_or(SealError::Corrupt)?;
        Ok((field, value, pair.len()))
    }

    /// The record holding `field`: its index, value and packed length.
    fn find(
        &self,
        key: &[u8],
        field: &[u8],
        s: Sealer,
    ) -> Result<Option<(usize, Bytes, usize)>, SealError> {
        for i in self.tagged(s.tags.tag(field)) {
            let (f, v, len) = self.open(i, key, s)?;
            if f == field {
                return Ok(Some((i, v, len)));
            }
        }
        Ok(None)
    }
}

/// A packed pair split into field and value, if it is exactly one.
fn split_pair(pair: &Bytes) -> Option<(Bytes, Bytes)> {
    let f = be_u32(pair, 0)?;
    let field = pair.get(4..4usize.checked_add(f)?)?;
    let v = be_u32(pair, 4 + f)?;
    let value_at = 8 + f;
    (pair.len() == value_at.checked_add(v)?)
        .then(|| (pair.slice_ref(field), pair.slice(value_at..)))
}

fn be_u32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

fn packed_pair(field: &[u8], value: &[u8]) -> Vec<u8> {
    let mut pair = Vec::with_capacity(8 + field.len() + value.len());
    pair.put_u32(field.len() as u32);
    pair.put_slice(field);
    pair.put_u32(value.len() as u32);
    pair.put_slice(value);
    pair
}

/// One record to write: its tag and stored bytes.
struct Fresh {
    tag: u32,
    stored: Vec<u8>,
}

fn seal_record(key: &[u8], field: &[u8], value: &[u8], s: Sealer) -> Fresh {
    // Plaintext: wiped once sealed (see `seal`).
    let pair = Zeroizing::new(packed_pair(field, value));
    let mut stored = Vec::new();
    seal_into(key, &pair, s.cipher, None, &mut stored);
    Fresh {
        tag: s.tags.tag(field),
        stored,
    }
}

/// Where a record of the new form comes from.
enum Source<'b> {
    /// Records `range` of the old form, copied as they are.
    Old(std::ops::Range<usize>),
    New(&'b Fresh),
}

/// Appends the records form made of `parts` (in tag order) to `out`. A run of old records
/// costs two copies (its index slots, then its bytes) and, when it moved, one pass over its
/// slots to shift their ends.
fn write(
    old: Option<&Records>,
    parts: &[Source],
    count: usize,
    value_len: usize,
    out: &mut Vec<u8>,
) {
    let span = |r: &std::ops::Range<usize>| old.map_or(0..0, |o| o.start(r.start)..o.start(r.end));
    let body_len: usize = parts
        .iter()
        .map(|p| match p {
            Source::Old(r) => span(r).len(),
            Source::New(f) => f.stored.len(),
        })
        .sum();
    out.reserve(HEADER + count * SLOT + body_len);
    out.push(RECORDS);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&(value_len as u32).to_le_bytes());
    let mut end = 0u32;
    for part in parts {
        match (part, old) {
            (Source::Old(r), Some(o)) => {
                let at = out.len();
                out.extend_from_slice(&o.index[r.start * SLOT..r.end * SLOT]);
                let bytes = span(r);
                let shift = end.wrapping_sub(bytes.start as u32);
                if shift != 0 {
                    for slot in out[at..].chunks_exact_mut(SLOT) {
                        let e = u32::from_le_bytes([slot[4], slot[5], slot[6], slot[7]]);
                        slot[4..].copy_from_slice(&e.wrapping_add(shift).to_le_bytes());
                    }
                }
                end = end.wrapping_add(bytes.len() as u32);
            }
            (Source::New(f), _) => {
                end = end.wrapping_add(f.stored.len() as u32);
                out.extend_from_slice(&f.tag.to_le_bytes());
                out.extend_from_slice(&end.to_le_bytes());
            }
            (Source::Old(_), None) => {}
        }
    }
    for part in parts {
        match (part, old) {
            (Source::Old(r), Some(o)) => out.extend_from_slice(&o.body[span(r)]),
            (Source::New(f), _) => out.extend_from_slice(&f.stored),
            (Source::Old(_), None) => {}
        }
    }
}

/// Appends the records form of `fields` (distinct) to `out`.
pub fn build(key: &[u8], fields: &[(Bytes, Bytes)], s: Sealer, out: &mut Vec<u8>) {
    let mut fresh: Vec<Fresh> = fields
        .iter()
        .map(|(f, v)| seal_record(key, f, v, s))
        .collect();
    fresh.sort_by_key(|f| f.tag);
    let value_len = 4 + fields
        .iter()
        .map(|(f, v)| 8 + f.len() + v.len())
        .sum::<usize>();
    let parts: Vec<Source> = fresh.iter().map(Source::New).collect();
    write(None, &parts, fresh.len(), value_len, out);
}

/// How many fields a records form holds.
pub fn count(stored: &[u8]) -> Option<usize> {
    Records::parse(stored).map(|r| r.count)
}

/// The length of the packed hash a records form holds (what opening it gives).
pub fn value_len(stored: &[u8]) -> Option<usize> {
    Records::parse(stored).map(|r| r.value_len)
}

/// The value of `field`, opening only the records tagged like it.
pub fn get(key: &[u8], stored: &[u8], field: &[u8], s: Sealer) -> Result<Option<Bytes>, SealError> {
    let r = Records::parse(stored).ok_or(SealError::Corrupt)?;
    Ok(r.find(key, field, s)?.map(|(_, v, _)| v))
}

/// The packed hash a records form holds: the count, then each record's pair, in tag order.
pub fn open_all(
    key: &[u8],
    stored: &[u8],
    cipher: Option<&Cipher>,
    max_len: usize,
) -> Result<Bytes, SealError> {
    let r = Records::parse(stored).ok_or(SealError::Corrupt)?;
    // The length the header claims sizes the buffer: checked first against what the records
    // can hold (bytes from a partner may claim anything).
    if r.value_len > max_len || !plausible(stored, r.value_len) {
        return Err(SealError::Corrupt);
    }
    // With a key, the opened hash is wiped when its last reference goes (see `seal`).
    let mut out = Zeroizing::new(Vec::with_capacity(r.value_len));
    out.extend_from_slice(&(r.count as u32).to_be_bytes());
    for i in 0..r.count {
        let record = Bytes::copy_from_slice(r.record(i)?);
        let left = r.value_len - out.len();
        let pair = open_capped(key, &record, cipher, None, left)?;
        split_pair(&pair).ok_or(SealError::Corrupt)?;
        out.extend_from_slice(&pair);
    }
    if out.len() != r.value_len {
        return Err(SealError::Corrupt);
    }
    Ok(super::owned_secret(
        std::mem::take(&mut *out),
        cipher.is_some(),
    ))
}

/// One step of HSCAN over a records form: the records from the first tagged `from` or
/// later, each opened and given to `visit` (which says whether the step has spent its time),
/// until `count` were visited or the time is spent, but never stopping between two records
/// of one tag; the tag to go on from, or `None` at the end. Tags order the records and no
/// field's tag changes, so steps that go on from the tag where the last stopped see every
/// field present throughout the walk once, whatever is set or removed meanwhile.
pub fn scan(
    key: &[u8],
    stored: &[u8],
    s: Sealer,
    from: u32,
    count: usize,
    mut visit: impl FnMut(Bytes, Bytes) -> bool,
) -> Result<Option<u32>, SealError> {
    let r = Records::parse(stored).ok_or(SealError::Corrupt)?;
    let mut i = r.first_from(from);
    let mut seen = 0;
    while i < r.count {
        let (field, value, _) = r.open(i, key, s)?;
        let spent = visit(field, value);
        seen += 1;
        i += 1;
        if (seen >= count || spent) && (i == r.count || r.tag(i) != r.tag(i - 1)) {
            break;
        }
    }
    Ok((i < r.count).then(|| r.tag(i)))
}

/// How a records form changes when some fields are set and others removed: the records
/// dropped and the fresh ones, sealed. Made without copying the form; [`Plan::apply`]
/// writes the new form (straight into the new entry), [`Plan::edit`] what the partner is
/// sent instead of it.
pub struct Plan {
    /// Indices of old records replaced or removed, ascending.
    dropped: Vec<usize>,
    /// The records to put in, by tag.
    fresh: Vec<Fresh>,
    /// The stored length of the form planned on (a check on what it is applied to).
    pub base_len: usize,
    /// The stored length of the new form.
    pub stored_len: usize,
    /// Fields that were not there before and are now.
    pub added: usize,
    /// Fields that were there before and are not now.
    pub removed: usize,
    pub count: usize,
    pub value_len: usize,
}

/// How `stored` changes with each of `sets` set (a field named twice takes its last value)
/// and each of `removes` removed, removes first. Opens only the records tagged like the
/// fields named.
pub fn plan(
    key: &[u8],
    stored: &[u8],
    sets: &[(Bytes, Bytes)],
    removes: &[Bytes],
    s: Sealer,
) -> Result<Plan, SealError> {
    // Every access to the index and body is checked; `Plan::apply` checks the whole shape.
    let r = Records::parse(stored).ok_or(SealError::Corrupt)?;
    // The last word on each field named: Some(value) to set, None to remove.
    let mut last: HashMap<&[u8], Option<&Bytes>> = HashMap::new();
    let mut order: Vec<&[u8]> = Vec::new();
    let named = removes
        .iter()
        .map(|f| (f, None))
        .chain(sets.iter().map(|(f, v)| (f, Some(v))));
    for (f, v) in named {
        if last.insert(f, v).is_none() {
            order.push(f);
        }
    }
    let mut value_len = r.value_len;
    let mut added = 0;
    let mut removed = 0;
    let mut dropped: Vec<usize> = Vec::new();
    let mut fresh: Vec<Fresh> = Vec::new();
    for field in order {
        let found = r.find(key, field, s)?;
        if let Some((i, _, len)) = &found {
            dropped.push(*i);
            value_len = value_len.saturating_sub(*len);
        }
        match (last[field], found.is_some()) {
            (Some(value), was) => {
                added += usize::from(!was);
                value_len += 8 + field.len() + value.len();
                fresh.push(seal_record(key, field, value, s));
            }
            (None, true) => removed += 1,
            (None, false) => {}
        }
    }
    dropped.sort_unstable();
    fresh.sort_by_key(|f| f.tag);
    // Saturating: these bytes were checked when stored, but no shape of them may panic.
    let gone: usize = dropped
        .iter()
        .map(|&i| SLOT + r.end(i).saturating_sub(r.start(i)))
        .sum();
    let new: usize = fresh.iter().map(|f| SLOT + f.stored.len()).sum();
    Ok(Plan {
        stored_len: (stored.len() + new).saturating_sub(gone),
        count: r.count - dropped.len() + fresh.len(),
        dropped,
        fresh,
        base_len: stored.len(),
        added,
        removed,
        value_len,
    })
}

/// Counts only.
impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("dropped", &self.dropped.len())
            .field("fresh", &self.fresh.len())
            .field("count", &self.count)
            .finish()
    }
}

impl Plan {
    /// The plan that changes nothing in `stored` (a new expiry on the same records).
    pub fn unchanged(stored: &[u8]) -> Option<Plan> {
        let r = Records::parse(stored)?;
        Some(Plan {
            dropped: Vec::new(),
            fresh: Vec::new(),
            base_len: stored.len(),
            stored_len: stored.len(),
            added: 0,
            removed: 0,
            count: r.count,
            value_len: r.value_len,
        })
    }

    /// Appends the new form to `out`, from `base`: the form planned on.
    pub fn apply(&self, base: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let r = Records::parse(base)
            .filter(|r| base.len() == self.base_len && r.well_formed())
            .ok_or(SealError::Corrupt)?;
        let start = out.len();
        splice(&r, &self.dropped, &self.fresh, self.value_len, out);
        debug_assert_eq!(out.len() - start, self.stored_len);
        Ok(())
    }

    /// What turns the form planned on into the new one (see [`replay`]).
    pub fn edit(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.edit_into(&mut out);
        out
    }

    /// [`Plan::edit`], appended to `out`.
    pub fn edit_into(&self, out: &mut Vec<u8>) {
        encode_edit(self.value_len, &self.dropped, &self.fresh, out);
    }
}

/// Appends to `out` the form `r` becomes with records `dropped` (indices, ascending) taken
/// out and `fresh` (by tag) put in: each before the first old record whose tag is not lower.
/// The runs of old records between those cuts are copied as they are.
fn splice(r: &Records, dropped: &[usize], fresh: &[Fresh], value_len: usize, out: &mut Vec<u8>) {
    enum Cut<'b> {
        Insert(&'b Fresh),
        Drop,
    }
    let mut cuts: Vec<(usize, Cut)> = fresh
        .iter()
        .map(|f| (r.first_from(f.tag), Cut::Insert(f)))
        .chain(dropped.iter().map(|&d| (d, Cut::Drop)))
        .collect();
    cuts.sort_by_key(|(at, cut)| (*at, matches!(cut, Cut::Drop)));
    let mut parts: Vec<Source> = Vec::with_capacity(2 * cuts.len() + 1);
    let mut cursor = 0;
    for (at, cut) in cuts {
        if at > cursor {
            parts.push(Source::Old(cursor..at));
            cursor = at;
        }
        match cut {
            Cut::Insert(f) => parts.push(Source::New(f)),
            Cut::Drop => cursor = at + 1,
        }
    }
    if cursor < r.count {
        parts.push(Source::Old(cursor..r.count));
    }
    let count = r.count - dropped.len() + fresh.len();
    write(Some(r), &parts, count, value_len, out);
}

/// An edit as it travels (little-endian):
/// `value_len:u32 drops:u32 (index:u32)* inserts:u32 (tag:u32 len:u32 record)*`.
fn encode_edit(value_len: usize, dropped: &[usize], fresh: &[Fresh], out: &mut Vec<u8>) {
    let records: usize = fresh.iter().map(|f| 8 + f.stored.len()).sum();
    out.reserve(12 + 4 * dropped.len() + records);
    out.extend_from_slice(&(value_len as u32).to_le_bytes());
    out.extend_from_slice(&(dropped.len() as u32).to_le_bytes());
    for d in dropped {
        out.extend_from_slice(&(*d as u32).to_le_bytes());
    }
    out.extend_from_slice(&(fresh.len() as u32).to_le_bytes());
    for f in fresh {
        out.extend_from_slice(&f.tag.to_le_bytes());
        out.extend_from_slice(&(f.stored.len() as u32).to_le_bytes());
        out.extend_from_slice(&f.stored);
    }
}

/// Takes a little-endian `u32` off the front of `rest`.
fn take_u32(rest: &mut &[u8]) -> Option<usize> {
    let n = le_u32(rest, 0)?;
    *rest = &rest[4..];
    Some(n)
}

/// The plan `edit` (made by [`Plan::edit`] on the same bytes) is for `base`, or `None` if it
/// does not fit `base` or has not the shape of one. It comes from the network, so every
/// index and length is checked, and each fresh record must be plausible (encrypted when
/// `encrypted`); `base` is an entry of this worker's, checked when it was taken, so a plan
/// that keeps its records' shape and takes only plausible ones makes a plausible form.
pub fn replay(base: &[u8], edit: &[u8], encrypted: bool) -> Option<Plan> {
    let r = Records::parse(base).filter(Records::well_formed)?;
    let mut rest = edit;
    let value_len = take_u32(&mut rest)?;
    // A length sizes the buffer a whole read allocates, and an entry's length field has
    // room for 2 GiB only: no hash comes near 1 GiB (values stop at 512 MiB).
    if value_len >= 1 << 30 {
        return None;
    }
    let drops = take_u32(&mut rest)?;
    if drops > r.count {
        return None;
    }
    let dropped: Vec<usize> = (0..drops)
        .map(|_| take_u32(&mut rest))
        .collect::<Option<_>>()?;
    if dropped.windows(2).any(|w| w[0] >= w[1]) || dropped.last().is_some_and(|&d| d >= r.count) {
        return None;
    }
    // What the packed pairs of the records kept and put in may take: the new length must
    // lie within (it sizes the buffer a whole read allocates).
    let mut bounds = (0usize, 0usize);
    for i in 0..r.count {
        if dropped.binary_search(&i).is_err() {
            let (lo, hi) = r.record(i).ok().and_then(pair_bounds)?;
            bounds = (bounds.0.saturating_add(lo), bounds.1.saturating_add(hi));
        }
    }
    let inserts = take_u32(&mut rest)?;
    let mut fresh: Vec<Fresh> = Vec::new();
    for _ in 0..inserts {
        let tag = take_u32(&mut rest)? as u32;
        let len = take_u32(&mut rest)?;
        let record = rest.get(..len)?;
        rest = &rest[len..];
        let (lo, hi) = pair_bounds(record)?;
        if encrypted && !super::is_encrypted(record) {
            return None;
        }
        bounds = (bounds.0.saturating_add(lo), bounds.1.saturating_add(hi));
        if fresh.last().is_some_and(|f| f.tag > tag) {
            return None;
        }
        fresh.push(Fresh {
            tag,
            stored: record.to_vec(),
        });
    }
    let count = r.count - dropped.len() + fresh.len();
    if !rest.is_empty() || value_len < 4 || !(bounds.0..=bounds.1).contains(&(value_len - 4)) {
        return None;
    }
    let gone: usize = dropped.iter().map(|&i| SLOT + r.end(i) - r.start(i)).sum();
    let new: usize = fresh.iter().map(|f| SLOT + f.stored.len()).sum();
    Some(Plan {
        stored_len: base.len() + new - gone,
        base_len: base.len(),
        count,
        dropped,
        fresh,
        added: 0,
        removed: 0,
        value_len,
    })
}

/// Whether `stored` has the shape of a records form of a `value_len`-byte packed hash
/// (see `seal::plausible`): the index fits and runs in order over the whole body, and each
/// record has the shape of a stored pair.
pub fn plausible(stored: &[u8], value_len: usize) -> bool {
    let Some(r) = Records::parse(stored) else {
        return false;
    };
    if r.value_len != value_len || value_len < 4 || r.count > (value_len - 4) / 8 {
        return false;
    }
    if !r.well_formed() {
        return false;
    }
    let mut bounds = (0usize, 0usize);
    for i in 0..r.count {
        let Some((lo, hi)) = r.record(i).ok().and_then(pair_bounds) else {
            return false;
        };
        if lo > value_len {
            return false;
        }
        bounds = (bounds.0.saturating_add(lo), bounds.1.saturating_add(hi));
    }
    (bounds.0..=bounds.1).contains(&(value_len - 4))
}

/// The least and the most bytes the packed pair a stored record holds may take, judged
/// from its shape (raw and lz4 give it exactly, an encrypted record only bounds it), or
/// `None` if it has not the shape of a record.
fn pair_bounds(record: &[u8]) -> Option<(usize, usize)> {
    let (lo, hi) = match *record.first()? {
        RAW => (record.len() - 1, record.len() - 1),
        LZ4 => {
            let n = le_u32(record, 1)?;
            (n, n)
        }
        ENCRYPTED => (
            8,
            record
                .len()
                .saturating_sub(1 + super::NONCE_LEN + super::TAG_LEN)
                .saturating_mul(super::LZ4_MAX_EXPANSION),
        ),
        _ => return None,
    };
    (lo >= 8 && lo <= hi && super::plausible(record, lo)).then_some((lo, hi))
}

/// Whether every record is encrypted (what a worker with a key takes from a partner).
pub fn all_encrypted(stored: &[u8]) -> bool {
    let Some(r) = Records::parse(stored) else {
        return false;
    };
    (0..r.count).all(|i| r.record(i).is_ok_and(super::is_encrypted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packed(fields: &[(Bytes, Bytes)]) -> Vec<u8> {
        let mut out = (fields.len() as u32).to_be_bytes().to_vec();
        for (f, v) in fields {
            out.extend_from_slice(&packed_pair(f, v));
        }
        out
    }

    fn sorted(mut fields: Vec<(Bytes, Bytes)>) -> Vec<(Bytes, Bytes)> {
        fields.sort();
        fields
    }

    /// The fields of a records form, opened.
    fn fields_of(key: &[u8], stored: &[u8], cipher: Option<&Cipher>) -> Vec<(Bytes, Bytes)> {
        let all = open_all(key, stored, cipher, usize::MAX).unwrap();
        let mut rest = &all[4..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let f = be_u32(rest, 0).unwrap();
            let v = be_u32(rest, 4 + f).unwrap();
            let pair = Bytes::copy_from_slice(&rest[..8 + f + v]);
            out.push(split_pair(&pair).unwrap());
            rest = &rest[8 + f + v..];
        }
        assert_eq!(out.len(), count(stored).unwrap());
        out
    }

    proptest! {
        /// Patching gives what rebuilding from the changed fields gives, and opening the
        /// result gives the packed form of those fields, with or without a key.
        #[test]
        fn patches_match_a_rebuild(
            start in proptest::collection::btree_map(0u16..300, proptest::collection::vec(any::<u8>(), 0..20), 0..200),
            sets in proptest::collection::vec((0u16..300, proptest::collection::vec(any::<u8>(), 0..200)), 0..20),
            removes in proptest::collection::vec(0u16..300, 0..20),
            encrypted in any::<bool>(),
        ) {
            let cipher = Cipher::new(&[9; 32]);
            let cipher = encrypted.then_some(&cipher);
            let tags = TagKey::PLAIN;
            let s = Sealer { cipher, tags: &tags };
            let name = |n: u16| Bytes::from(format!("field:{n}"));
            let mut model: std::collections::BTreeMap<Bytes, Bytes> =
                start.into_iter().map(|(f, v)| (name(f), Bytes::from(v))).collect();
            let fields: Vec<(Bytes, Bytes)> = model.clone().into_iter().collect();
            let mut stored = Vec::new();
            build(b"k", &fields, s, &mut stored);
            prop_assert!(plausible(&stored, packed(&fields).len()));
            prop_assert!(stored.len() <= max_stored_len(fields.len(), packed(&fields).len(), encrypted));
            prop_assert_eq!(all_encrypted(&stored), encrypted || fields.is_empty());

            let sets: Vec<(Bytes, Bytes)> = sets.into_iter().map(|(f, v)| (name(f), Bytes::from(v))).collect();
            // HSET and HDEL never name a field both ways; a field named twice counts once.
            let removes: std::collections::BTreeSet<Bytes> = removes
                .into_iter()
                .map(name)
                .filter(|f| !sets.iter().any(|(g, _)| g == f))
                .collect();
            let removed = removes.iter().filter(|f| model.remove(*f).is_some()).count();
            let added = sets
                .iter()
                .filter(|(f, v)| model.insert(f.clone(), v.clone()).is_none())
                .count();
            let mut removes: Vec<Bytes> = removes.into_iter().collect();
            removes.extend(removes.clone());
            let p = plan(b"k", &stored, &sets, &removes, s).unwrap();
            let mut patched = Vec::new();
            p.apply(&stored, &mut patched).unwrap();
            let want: Vec<(Bytes, Bytes)> = model.into_iter().collect();
            prop_assert_eq!(p.count, want.len());
            prop_assert_eq!(p.value_len, packed(&want).len());
            prop_assert_eq!((p.added, p.removed), (added, removed));
            prop_assert!(plausible(&patched, p.value_len));
            let replayed = |edit: &[u8]| {
                let mut out = Vec::new();
                replay(&stored, edit, encrypted)?.apply(&stored, &mut out).ok()?;
                Some(out)
            };
            prop_assert_eq!(replayed(&p.edit()), Some(patched.clone()));
            prop_assert_eq!(replayed(&Plan::unchanged(&stored).unwrap().edit()), Some(stored.clone()));
            prop_assert_eq!(sorted(fields_of(b"k", &patched, cipher)), want.clone());
            for (f, v) in &want {
                prop_assert_eq!(get(b"k", &patched, f, s).unwrap(), Some(v.clone()));
            }
            prop_assert_eq!(get(b"k", &patched, b"absent", s).unwrap(), None);
        }

        #[test]
        fn random_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..256),
            value_len in 0usize..512,
        ) {
            let mut stored = vec![RECORDS];
            stored.extend_from_slice(&input);
            let tags = TagKey::PLAIN;
            let s = Sealer { cipher: None, tags: &tags };
            let _ = plausible(&stored, value_len);
            let _ = all_encrypted(&stored);
            let _ = open_all(b"k", &stored, None, 1 << 20);
            let _ = get(b"k", &stored, b"f", s);
            if let Ok(p) = plan(b"k", &stored, &[(Bytes::from_static(b"f"), Bytes::new())], &[Bytes::from_static(b"g")], s) {
                let _ = p.apply(&stored, &mut Vec::new());
            }
            let mut good = Vec::new();
            build(b"k", &[(Bytes::from_static(b"f"), Bytes::new()), (Bytes::from_static(b"g"), Bytes::new())], s, &mut good);
            if let Some(p) = replay(&good, &input, false) {
                let mut out = Vec::new();
                p.apply(&good, &mut out).unwrap();
                prop_assert!(plausible(&out, p.value_len));
            }
            let _ = replay(&stored, &input, false);
        }
    }

    /// A form, or an edit, claiming a packed length its records cannot hold is refused: the
    /// length sizes the buffer a whole read allocates (and wipes), so a partner's few bytes
    /// must not make a worker allocate gigabytes.
    #[test]
    fn a_value_len_the_records_cannot_hold_is_refused() {
        for encrypted in [false, true] {
            let cipher = Cipher::new(&[2; 32]);
            let tags = TagKey::PLAIN;
            let s = Sealer {
                cipher: encrypted.then_some(&cipher),
                tags: &tags,
            };
            let fields: Vec<(Bytes, Bytes)> = (0..3)
                .map(|i| (Bytes::from(format!("f{i}")), Bytes::from_static(b"v")))
                .collect();
            let mut stored = Vec::new();
            build(b"k", &fields, s, &mut stored);
            let len = value_len(&stored).unwrap();
            assert!(plausible(&stored, len));
            let huge = 0x7fff_fff0usize;
            let mut inflated = stored.clone();
            inflated[5..9].copy_from_slice(&(huge as u32).to_le_bytes());
            assert!(!plausible(&inflated, huge), "encrypted: {encrypted}");
            assert!(!plausible(&stored, len + 1) || encrypted);

            let p = plan(
                b"k",
                &stored,
                &[(Bytes::from_static(b"f0"), Bytes::from_static(b"w"))],
                &[],
                s,
            )
            .unwrap();
            let mut edit = p.edit();
            assert!(replay(&stored, &edit, encrypted).is_some());
            edit[..4].copy_from_slice(&(huge as u32).to_le_bytes());
            assert!(
                replay(&stored, &edit, encrypted).is_none(),
                "encrypted: {encrypted}"
            );
        }
    }

    /// A header claiming a length its records cannot hold is refused before anything is
    /// allocated for it (found by the `seal_open` fuzz target: 2 GiB claimed by 9 bytes).
    #[test]
    fn a_claimed_length_is_checked_before_it_sizes_anything() {
        let stored = [RECORDS, 0, 0, 0, 0, 0, 0, 0, 126];
        assert_eq!(
            open_all(b"k", &stored, None, usize::MAX),
            Err(SealError::Corrupt)
        );
    }

    #[test]
    fn records_open_only_under_their_key() {
        let cipher = Cipher::new(&[1; 32]);
        let tags = TagKey::PLAIN;
        let s = Sealer {
            cipher: Some(&cipher),
            tags: &tags,
        };
        let mut stored = Vec::new();
        build(
            b"k",
            &[(Bytes::from_static(b"f"), Bytes::from_static(b"v"))],
            s,
            &mut stored,
        );
        assert_eq!(get(b"other", &stored, b"f", s), Err(SealError::Unauthentic));
        assert_eq!(
            get(b"k", &stored, b"f", s).unwrap(),
            Some(Bytes::from_static(b"v"))
        );
    }
}
