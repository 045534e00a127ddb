//! A long string's stored form: segments of [`SEGMENT`] bytes, each sealed on its own and
//! laid end to end in order, so that APPEND and SETRANGE seal only the segments they change
//! and APPEND's new bytes go at the end of the entry, where it grows in place.
//!
//! ```text
//! 0x05 segments : len:u32 | last:u32 | records | room                       (little-endian)
//! records       : for each segment i in order, sealed_len:u32 then its stored form (raw,
//!                 lz4 or encrypted; never against a dictionary) of the string's bytes
//!                 [i * SEGMENT, min((i + 1) * SEGMENT, len))
//! last          : where the last record starts, counted from the first
//! room          : zeros, at most as many as the records take (none but in an entry that
//!                 APPEND or SETRANGE edited where it lies)
//! ```
//!
//! Sealed whole, a string costs every APPEND a decompression, a compression and an
//! encryption of all of it, on the primary and again on its partner, and the partner is
//! sent all of it: a burst of 1 KB APPENDs from many clients onto strings growing to a
//! megabyte took a pair down (both workers missed copies and were marked stale). In
//! segments, an APPEND opens and seals the last segment (and any it adds), the entry keeps
//! its first bytes where they are and writes the new ones into the room at its end
//! ([`Plan::apply_in_place`]; out of room, it grows by a quarter more than it needs, so an
//! entry moves once per quarter of growth and APPEND copies a constant amount per byte
//! appended, however long the string), and the partner is sent that edit ([`Plan::edit_into`])
//! and does the same.
//!
//! Only APPEND and SETRANGE make this form, for strings of [`SEGMENTED_FROM`] bytes or
//! more; SET stores a value whole, which compresses best and is read without assembling.
//! Every reader of a whole value opens both (`seal::open_capped`). A segment costs 5 bytes
//! over its value (its length, its layout byte), 46 encrypted (also the nonce, the tag and
//! the layout byte inside).
//! Finding segment i walks the records before it (a GETRANGE far into a string, a SETRANGE
//! before its end); an APPEND starts from `last` and walks nothing.
//!
//! Every length is checked before it is used: the bytes may come from a partner.

use std::ops::Range;

use bytes::Bytes;
use zeroize::Zeroizing;

use super::{open_capped, seal_into, Cipher, SealError, ENCRYPTED, LZ4, RAW};

/// The layout byte of this form.
pub const SEGMENTS: u8 = 0x05;
/// Bytes a segment holds (the last may hold fewer).
pub const SEGMENT: usize = 8 * 1024;
/// Length from which APPEND and SETRANGE leave a string in segments.
pub const SEGMENTED_FROM: usize = 4 * SEGMENT;
/// The longest string a form may hold (Redis' `proto-max-bulk-len`): lengths from a
/// partner size buffers, and an entry's length field has room for 2 GiB only.
const MAX_LEN: usize = 512 << 20;

const HEADER: usize = 1 + 4 + 4;
/// A record's length prefix.
const PREFIX: usize = 4;

/// Whether a string of `len` bytes written by APPEND or SETRANGE is kept in segments.
pub fn wanted(len: usize) -> bool {
    len >= SEGMENTED_FROM
}

fn le_u32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// A segments form's header and records (not yet walked), without its room.
struct Segments<'a> {
    len: usize,
    last: usize,
    body: &'a [u8],
    room: &'a [u8],
}

impl<'a> Segments<'a> {
    /// The form, its records' end found from the last one's length.
    fn parse(stored: &'a [u8]) -> Option<Segments<'a>> {
        if stored.first() != Some(&SEGMENTS) {
            return None;
        }
        let after = stored.get(HEADER..)?;
        let last = le_u32(stored, 5)?;
        let end = (last + PREFIX).checked_add(le_u32(after, last)?)?;
        Some(Segments {
            len: le_u32(stored, 1)?,
            last,
            body: after.get(..end)?,
            room: &after[end..],
        })
    }

    /// The form's length without its room: what a plan is made on, and checks.
    fn form_len(&self) -> usize {
        HEADER + self.body.len()
    }

    fn count(&self) -> usize {
        self.len.div_ceil(SEGMENT)
    }

    /// The string's bytes segment `i` holds, for a string of `len` bytes.
    fn span(i: usize, len: usize) -> Range<usize> {
        let start = i.saturating_mul(SEGMENT).min(len);
        start..len.min(start.saturating_add(SEGMENT))
    }

    /// The record at `at` and where the next one starts.
    fn record(&self, at: usize) -> Option<(&'a [u8], usize)> {
        let n = le_u32(self.body, at)?;
        let start = at + PREFIX;
        let end = start.checked_add(n)?;
        Some((self.body.get(start..end)?, end))
    }

    /// Where record `i` starts (the end of the records for `i == count`): from `last`
    /// for the last one and past it, else by walking the records before it.
    fn offset(&self, i: usize) -> Option<usize> {
        let count = self.count();
        if i >= count {
            return Some(self.body.len());
        }
        if i + 1 == count {
            return Some(self.last);
        }
        let mut at = 0;
        for _ in 0..i {
            at = self.record(at)?.1;
        }
        Some(at)
    }

    /// Whether the records run in order over the whole body, one a segment, `last` at the
    /// last, each with the shape of a segment's stored form of its length: what every
    /// later use of an entry from a partner relies on.
    fn well_formed(&self) -> bool {
        let mut at = 0;
        for i in 0..self.count() {
            let Some((record, next)) = self.record(at) else {
                return false;
            };
            if !shaped(record, Segments::span(i, self.len).len())
                || (i + 1 == self.count()) != (at == self.last)
            {
                return false;
            }
            at = next;
        }
        at == self.body.len()
            && self.len > 0
            && self.len <= MAX_LEN
            && self.room.len() <= self.body.len()
            && self.room.iter().all(|&b| b == 0)
    }
}

/// Whether `record` has the shape of a segment's stored form holding `len` bytes.
fn shaped(record: &[u8], len: usize) -> bool {
    matches!(record.first(), Some(&(RAW | LZ4 | ENCRYPTED))) && super::plausible(record, len)
}

/// Whether `stored` has the shape of a segments form of a `len`-byte string.
pub fn plausible(stored: &[u8], len: usize) -> bool {
    Segments::parse(stored).is_some_and(|s| s.len == len && s.well_formed())
}

/// Whether every segment is encrypted (what a worker with a key takes from a partner).
pub fn all_encrypted(stored: &[u8]) -> bool {
    let Some(s) = Segments::parse(stored) else {
        return false;
    };
    let mut at = 0;
    while at < s.body.len() {
        match s.record(at) {
            Some((record, next)) if record.first() == Some(&ENCRYPTED) => at = next,
            _ => return false,
        }
    }
    true
}

/// The length of the string a segments form holds.
pub fn len(stored: &[u8]) -> Option<usize> {
    Segments::parse(stored).map(|s| s.len)
}

/// `stored` without the room at its end: what travels.
pub fn without_room(stored: &[u8]) -> &[u8] {
    Segments::parse(stored).map_or(stored, |s| &stored[..s.form_len()])
}

/// Seals `chunk` as a record, its length prefix first, onto `out`.
fn push_record(key: &[u8], chunk: &[u8], cipher: Option<&Cipher>, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; PREFIX]);
    seal_into(key, chunk, cipher, None, out);
    let n = (out.len() - at - PREFIX) as u32;
    out[at..at + PREFIX].copy_from_slice(&n.to_le_bytes());
}

fn header(len: usize, last: usize) -> [u8; HEADER] {
    let mut h = [SEGMENTS, 0, 0, 0, 0, 0, 0, 0, 0];
    h[1..5].copy_from_slice(&(len as u32).to_le_bytes());
    h[5..9].copy_from_slice(&(last as u32).to_le_bytes());
    h
}

/// Appends the segments form of `value` (not empty) to `out`.
pub fn build(key: &[u8], value: &[u8], cipher: Option<&Cipher>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&header(value.len(), 0));
    let mut last = 0;
    for chunk in value.chunks(SEGMENT) {
        last = out.len() - start - HEADER;
        push_record(key, chunk, cipher, out);
    }
    out[start..start + HEADER].copy_from_slice(&header(value.len(), last));
}

/// Segment `i`'s bytes from its `record`, checked to be as many as it holds.
fn open_record(
    key: &[u8],
    record: &[u8],
    cipher: Option<&Cipher>,
    span: &Range<usize>,
) -> Result<Bytes, SealError> {
    let opened = open_capped(
        key,
        &Bytes::copy_from_slice(record),
        cipher,
        None,
        span.len(),
    )?;
    if opened.len() != span.len() {
        return Err(SealError::Corrupt);
    }
    Ok(opened)
}

/// The string a segments form holds, assembled, refused past `max_len` before anything is
/// allocated for it.
pub fn open(
    key: &[u8],
    stored: &[u8],
    cipher: Option<&Cipher>,
    max_len: usize,
) -> Result<Bytes, SealError> {
    let s = Segments::parse(stored).ok_or(SealError::Corrupt)?;
    if s.len > max_len || !s.well_formed() {
        return Err(SealError::Corrupt);
    }
    read_from(key, &s, 0..s.len, cipher)
}

/// Bytes `range` of the string (within it), opening only the segments it covers.
pub fn read(
    key: &[u8],
    stored: &[u8],
    range: Range<usize>,
    cipher: Option<&Cipher>,
) -> Result<Bytes, SealError> {
    let s = Segments::parse(stored).ok_or(SealError::Corrupt)?;
    if range.end > s.len {
        return Err(SealError::Corrupt);
    }
    read_from(key, &s, range, cipher)
}

fn read_from(
    key: &[u8],
    s: &Segments,
    range: Range<usize>,
    cipher: Option<&Cipher>,
) -> Result<Bytes, SealError> {
    let mut out = Zeroizing::new(Vec::with_capacity(range.len()));
    let first = range.start / SEGMENT;
    let mut at = s.offset(first).ok_or(SealError::Corrupt)?;
    for i in first..range.end.div_ceil(SEGMENT) {
        let (record, next) = s.record(at).ok_or(SealError::Corrupt)?;
        let span = Segments::span(i, s.len);
        let v = open_record(key, record, cipher, &span)?;
        let from = range.start.max(span.start) - span.start;
        let to = range.end.min(span.end) - span.start;
        out.extend_from_slice(&v[from..to]);
        at = next;
    }
    Ok(super::owned_secret(
        std::mem::take(&mut *out),
        cipher.is_some(),
    ))
}

/// How a segments form changes: its first `keep` record bytes kept, then `fresh` records,
/// then its records from `rest` on; made without copying the form. [`Plan::apply`] writes
/// the new form, [`Plan::apply_in_place`] edits an entry where it lies, [`Plan::edit_into`] is
/// what the partner is sent instead of it.
pub struct Plan {
    /// The stored length of the form planned on, without its room (a check on what it is
    /// applied to).
    pub base_len: usize,
    keep: usize,
    /// Records, each with its length prefix.
    fresh: Vec<u8>,
    rest: usize,
    /// The new string's length.
    pub len: usize,
    /// Where the new form's last record starts.
    last: usize,
    /// The stored length of the new form (made anew: it has no room).
    pub stored_len: usize,
}

/// Counts only.
impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("keep", &self.keep)
            .field("fresh", &self.fresh.len())
            .field("len", &self.len)
            .finish()
    }
}

impl Plan {
    /// The plan that writes `fresh` (the records of segments `first..`) over `s` (stored
    /// in `base_len` bytes) from `keep` to `rest`, for a string of `len` bytes. `fresh_last`
    /// is where its last record starts within it.
    fn new(
        s: &Segments,
        base_len: usize,
        (keep, rest): (usize, usize),
        fresh: Vec<u8>,
        fresh_last: usize,
        len: usize,
    ) -> Plan {
        let last = if rest < s.body.len() {
            // The last record is among those kept after the fresh ones.
            (s.last + keep + fresh.len()).saturating_sub(rest)
        } else if fresh.is_empty() {
            s.last
        } else {
            keep + fresh_last
        };
        Plan {
            stored_len: base_len - (rest - keep) + fresh.len(),
            base_len,
            keep,
            fresh,
            rest,
            len,
            last,
        }
    }

    /// The plan that changes nothing in `stored` (a new expiry on the same segments).
    pub fn unchanged(stored: &[u8]) -> Option<Plan> {
        let s = Segments::parse(stored)?;
        let end = s.body.len();
        Some(Plan {
            base_len: s.form_len(),
            keep: end,
            fresh: Vec::new(),
            rest: end,
            len: s.len,
            last: s.last,
            stored_len: s.form_len(),
        })
    }

    fn base<'b>(&self, base: &'b [u8]) -> Result<Segments<'b>, SealError> {
        Segments::parse(base)
            .filter(|s| s.form_len() == self.base_len && self.rest <= s.body.len())
            .ok_or(SealError::Corrupt)
    }

    /// Appends the new form to `out`, from `base`: the form planned on.
    pub fn apply(&self, base: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let s = self.base(base)?;
        out.reserve(self.stored_len);
        out.extend_from_slice(&header(self.len, self.last));
        out.extend_from_slice(&s.body[..self.keep]);
        out.extend_from_slice(&self.fresh);
        out.extend_from_slice(&s.body[self.rest..]);
        Ok(())
    }

    /// Whether [`Plan::apply_in_place`] edits only the end of the form (an APPEND, a
    /// SETRANGE past the last segment's start): nothing after the fresh records moves.
    pub fn at_end(&self) -> bool {
        self.rest == self.base_len - HEADER
    }

    /// Makes the form that `buf[at..]` holds (the form planned on) the new one, where it
    /// lies: its records up to `keep` stay, the fresh ones go after them, into its room.
    /// Only for a plan [`Plan::at_end`]. Out of room, `buf` grows by what the fresh records
    /// need and a quarter of the form more, all of it zeros until written: growing by a
    /// quarter each time, the form is moved (copied) a bounded number of times per byte
    /// appended (five bytes copied per byte, all told), where growing by what it needs moved
    /// it on almost every APPEND once the allocator's size class had no room.
    pub fn apply_in_place(&self, buf: &mut Vec<u8>, at: usize) -> Result<(), SealError> {
        let old_end = self
            .base(buf.get(at..).ok_or(SealError::Corrupt)?)?
            .form_len();
        if !self.at_end() {
            return Err(SealError::Corrupt);
        }
        let from = at + HEADER + self.keep;
        let new_end = from + self.fresh.len();
        if new_end > buf.len() {
            let grown = new_end + (new_end - at) / 4;
            buf.reserve_exact(grown - buf.len());
            buf.resize(grown, 0);
        }
        buf[from..new_end].copy_from_slice(&self.fresh);
        // What the old records held past the new ones is room now, up to as much as the
        // records take (a SETRANGE can shrink them: zeros compress), which is all a form may
        // keep (`Segments::well_formed`).
        if let Some(left) = buf.get_mut(new_end..at + old_end) {
            left.fill(0);
        }
        let records = new_end - at - HEADER;
        if buf.len() - new_end > records {
            buf.truncate(new_end + records);
        }
        buf[at..at + HEADER].copy_from_slice(&header(self.len, self.last));
        Ok(())
    }

    /// Appends what turns the form planned on into the new one (see [`replay`]) to `out`:
    /// `keep:u32 rest:u32 len:u32`, then the fresh records.
    pub fn edit_into(&self, out: &mut Vec<u8>) {
        out.reserve(12 + self.fresh.len());
        for n in [self.keep, self.rest, self.len] {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.fresh);
    }
}

/// How the string changes with `piece` written at `at`, zeros filling any gap after its end
/// (SETRANGE; APPEND writes at its length): the segments it touches sealed again, the
/// others left as they are. A segment `piece` covers whole is not opened. (An empty `piece`
/// seals again the segment `at` is in, if any: APPEND of nothing is still a write.)
pub fn plan_write(
    key: &[u8],
    stored: &[u8],
    at: usize,
    piece: &[u8],
    cipher: Option<&Cipher>,
) -> Result<Plan, SealError> {
    let s = Segments::parse(stored).ok_or(SealError::Corrupt)?;
    let end = at.checked_add(piece.len()).ok_or(SealError::Corrupt)?;
    let len = s.len.max(end);
    let changed = at.min(s.len)..end;
    let first = changed.start / SEGMENT;
    let keep = s.offset(first).ok_or(SealError::Corrupt)?;
    let (mut cursor, mut fresh, mut fresh_last) = (keep, Vec::new(), 0);
    for i in first..changed.end.div_ceil(SEGMENT) {
        let span = Segments::span(i, len);
        let mut bytes = Zeroizing::new(vec![0u8; span.len()]);
        if i < s.count() {
            let (record, next) = s.record(cursor).ok_or(SealError::Corrupt)?;
            if at > span.start || end < span.end {
                let old_span = Segments::span(i, s.len);
                let old = open_record(key, record, cipher, &old_span)?;
                bytes[..old.len()].copy_from_slice(&old);
            }
            cursor = next;
        }
        let (from, to) = (at.max(span.start), end.min(span.end));
        if from < to {
            bytes[from - span.start..to - span.start].copy_from_slice(&piece[from - at..to - at]);
        }
        fresh_last = fresh.len();
        push_record(key, &bytes, cipher, &mut fresh);
    }
    Ok(Plan::new(
        &s,
        s.form_len(),
        (keep, cursor),
        fresh,
        fresh_last,
        len,
    ))
}

/// The plan `edit` (made by [`Plan::edit_into`] on the same bytes) is for `base`, or `None` if it
/// does not fit `base` or has not the shape of one. It comes from the network, so every
/// offset and length is checked: the kept records must end and start at record boundaries
/// of `base`, and each fresh record must have the shape of its segment's stored form
/// (encrypted when `encrypted`); `base` is an entry of this worker's, checked when it was
/// taken, so the new form is as well formed as it.
pub fn replay(base: &[u8], edit: &[u8], encrypted: bool) -> Option<Plan> {
    let s = Segments::parse(base)?;
    let (keep, rest, len) = (le_u32(edit, 0)?, le_u32(edit, 4)?, le_u32(edit, 8)?);
    let fresh = &edit[12..];
    let end = s.body.len();
    if keep > rest || rest > end || len < s.len || len > MAX_LEN {
        return None;
    }
    // An APPEND edits from the last record on: nothing to walk.
    let (first, after) = if rest == end && keep == end {
        (s.count(), s.count())
    } else if rest == end && keep == s.last {
        (s.count().checked_sub(1)?, s.count())
    } else {
        let (mut first, mut after, mut at) = (None, None, 0);
        for i in 0..=s.count() {
            if at == keep {
                first = Some(i);
            }
            if at == rest {
                after = Some(i);
                break;
            }
            at = s.record(at)?.1;
        }
        (first?, after?)
    };
    // The segments the fresh records hold, and the ones kept after them, must make the new
    // string: a kept record keeps its length only where the string's last segment did not
    // move.
    let mut at = 0;
    let mut i = first;
    let mut fresh_last = 0;
    while at < fresh.len() {
        let n = le_u32(fresh, at)?;
        let record = fresh.get(at + PREFIX..(at + PREFIX).checked_add(n)?)?;
        if !shaped(record, Segments::span(i, len).len()) || (encrypted && record[0] != ENCRYPTED) {
            return None;
        }
        fresh_last = at;
        at += PREFIX + n;
        i += 1;
    }
    // Kept records keep their segments' spans: the one before the fresh ones is whole (or
    // the string's length is as it was), and those after them exist only if the length is
    // as it was. Records are dropped only to be replaced.
    let count = i + (s.count() - after);
    let before_kept =
        first == 0 || Segments::span(first - 1, s.len) == Segments::span(first - 1, len);
    if count != len.div_ceil(SEGMENT)
        || !before_kept
        || (after < s.count() && len != s.len)
        || (i == first && keep != rest)
    {
        return None;
    }
    Some(Plan::new(
        &s,
        s.form_len(),
        (keep, rest),
        fresh.to_vec(),
        fresh_last,
        len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn edit(p: &Plan) -> Vec<u8> {
        let mut out = Vec::new();
        p.edit_into(&mut out);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Writes planned on segments give what writing the whole string gives, applied
        /// anew, in place, and replayed on a partner's copy, with or without a key.
        #[test]
        fn writes_match_the_whole_string(
            start in 1usize..70_000,
            writes in proptest::collection::vec((0usize..90_000, 1usize..20_000, any::<u8>(), any::<bool>()), 1..5),
            encrypted in any::<bool>(),
        ) {
            let cipher = Cipher::new(&[3; 32]);
            let cipher = encrypted.then_some(&cipher);
            let mut model: Vec<u8> = (0..start).map(|i| (i % 251) as u8).collect();
            let mut stored = Vec::new();
            build(b"k", &model, cipher, &mut stored);
            prop_assert!(plausible(&stored, model.len()));
            prop_assert_eq!(all_encrypted(&stored), encrypted);
            for (at, n, byte, append) in writes {
                let at = if append { model.len() } else { at };
                let piece = vec![byte; n];
                if model.len() < at + n {
                    model.resize(at + n, 0);
                }
                model[at..at + n].copy_from_slice(&piece);
                let p = plan_write(b"k", &stored, at, &piece, cipher).unwrap();
                let mut next = Vec::new();
                p.apply(&stored, &mut next).unwrap();
                prop_assert_eq!(next.len(), p.stored_len);
                prop_assert!(plausible(&next, p.len));
                // A partner's copy has the same records, and room of its own (or none).
                let bare = without_room(&stored);
                let mut replayed = Vec::new();
                replay(bare, &edit(&p), encrypted).unwrap().apply(bare, &mut replayed).unwrap();
                prop_assert_eq!(&replayed, &next);
                if p.at_end() {
                    // Edited where it lies, room and all, and carried on so (the next
                    // plans are made on a form with room).
                    let mut in_place = b"entry header".to_vec();
                    in_place.extend_from_slice(&stored);
                    p.apply_in_place(&mut in_place, 12).unwrap();
                    prop_assert_eq!(without_room(&in_place[12..]), &next[..]);
                    prop_assert!(plausible(&in_place[12..], p.len));
                    next = in_place[12..].to_vec();
                }
                stored = next;
                prop_assert_eq!(len(&stored), Some(model.len()));
            }
            let unchanged = Plan::unchanged(&stored).unwrap();
            let mut same = Vec::new();
            replay(&stored, &edit(&unchanged), encrypted).unwrap().apply(&stored, &mut same).unwrap();
            prop_assert_eq!(&same[..], without_room(&stored));
            let whole = open(b"k", &stored, cipher, usize::MAX).unwrap();
            prop_assert_eq!(&whole[..], &model[..]);
            let mid = model.len() / 3;
            let part = read(b"k", &stored, mid..model.len() - 1, cipher).unwrap();
            prop_assert_eq!(&part[..], &model[mid..model.len() - 1]);
        }

        #[test]
        fn random_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..256),
            len in 0usize..100_000,
        ) {
            let mut stored = vec![SEGMENTS];
            stored.extend_from_slice(&input);
            let _ = plausible(&stored, len);
            let _ = all_encrypted(&stored);
            let _ = open(b"k", &stored, None, 1 << 20);
            let _ = read(b"k", &stored, 0..10, None);
            if let Ok(p) = plan_write(b"k", &stored, 5, b"x", None) {
                let _ = p.apply(&stored, &mut Vec::new());
            }
            let mut good = Vec::new();
            build(b"k", &[7u8; 3 * SEGMENT + 5], None, &mut good);
            if let Some(p) = replay(&good, &input, false) {
                let mut out = Vec::new();
                p.apply(&good, &mut out).unwrap();
                prop_assert!(plausible(&out, p.len));
            }
            let _ = replay(&stored, &input, false);
        }
    }

    /// A form whose records are not where its segments are (a partner's forgery) does not
    /// pass, and does not open.
    #[test]
    fn a_misshapen_form_is_refused() {
        let value = vec![7u8; 3 * SEGMENT];
        let mut good = Vec::new();
        build(b"k", &value, None, &mut good);
        assert!(plausible(&good, value.len()));
        assert_eq!(open(b"k", &good, None, usize::MAX).unwrap(), value);
        assert_eq!(
            open(b"k", &good, None, value.len() - 1),
            Err(SealError::Corrupt)
        );
        let mut longer = good.clone();
        longer[1..5].copy_from_slice(&(value.len() as u32 + 1).to_le_bytes());
        assert!(!plausible(&longer, value.len() + 1));
        assert_eq!(
            open(b"k", &longer, None, usize::MAX),
            Err(SealError::Corrupt)
        );
        let mut moved = good.clone();
        moved[5..9].copy_from_slice(&0u32.to_le_bytes());
        assert!(!plausible(&moved, value.len()));
        // Room is zeros, no more than the records take.
        let mut roomy = good.clone();
        roomy.extend_from_slice(&[0; 100]);
        assert!(plausible(&roomy, value.len()));
        assert_eq!(open(b"k", &roomy, None, usize::MAX).unwrap(), value);
        assert_eq!(without_room(&roomy), &good[..]);
        roomy[good.len() + 50] = 1;
        assert!(!plausible(&roomy, value.len()));
        let mut huge = good.clone();
        huge.resize(3 * good.len(), 0);
        assert!(!plausible(&huge, value.len()));
    }

    /// A SETRANGE that shrinks the records (zeros over a string that compressed less) and
    /// is edited in place leaves no more room than the records take: the form stays
    /// plausible. (Found by the proptest above on a CI run.)
    #[test]
    fn an_edit_in_place_that_shrinks_the_records_keeps_the_room_bounded() {
        let start: Vec<u8> = (0..16_558).map(|i| (i % 251) as u8).collect();
        let mut entry = b"head".to_vec();
        build(b"k", &start, None, &mut entry);
        let p = plan_write(b"k", &entry[4..], 885, &[0; 15_657], None).unwrap();
        assert!(p.at_end());
        p.apply_in_place(&mut entry, 4).unwrap();
        assert!(plausible(&entry[4..], start.len()));
        let mut want = start.clone();
        want[885..885 + 15_657].fill(0);
        assert_eq!(open(b"k", &entry[4..], None, usize::MAX).unwrap(), want);
    }

    /// APPENDs into an entry's room move it a few times, not once per APPEND.
    #[test]
    fn appends_in_place_move_the_entry_rarely() {
        let mut entry = b"head".to_vec();
        build(b"k", &vec![1u8; SEGMENTED_FROM], None, &mut entry);
        let mut moves = 0;
        for _ in 0..2000 {
            let stored = entry[4..].to_vec();
            let at = len(&stored).unwrap();
            let p = plan_write(b"k", &stored, at, &[2u8; 1000], None).unwrap();
            let before = entry.as_ptr();
            p.apply_in_place(&mut entry, 4).unwrap();
            moves += usize::from(entry.as_ptr() != before);
        }
        assert_eq!(len(&entry[4..]), Some(SEGMENTED_FROM + 2_000_000));
        assert!(moves < 40, "{moves} moves");
    }
}
