//! A hash's stored form: its fields and values in one value, sealed as a whole like a
//! string (compressed, encrypted), so a hash costs one entry and one seal.
//!
//! ```text
//! hash = count:u32 (field_len:u32 field value_len:u32 value)*      (big-endian)
//! ```
//!
//! Fields keep the order they were first set in, as Redis keeps a small hash (listpack):
//! HGETALL, HKEYS and HSCAN answer in that order. Every access opens the whole value, so a
//! hash's operations cost time in proportion to its size; that suits the small objects
//! (sessions, profiles) a cache holds, not hashes of millions of fields.

use std::collections::{HashMap, HashSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A hash's fields and values, in order.
pub type Fields = Vec<(Bytes, Bytes)>;

/// Decodes a stored hash (zero-copy slices of `value`); `None` if it is not one. The bytes
/// were sealed by a worker, but may come from a partner: every length is checked.
pub fn decode(value: &Bytes) -> Option<Fields> {
    let mut buf = value.clone();
    let count = buf.try_get_u32().ok()? as usize;
    if count.saturating_mul(8) > buf.remaining() {
        return None;
    }
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        let f = take(&mut buf)?;
        let v = take(&mut buf)?;
        fields.push((f, v));
    }
    buf.is_empty().then_some(fields)
}

fn take(buf: &mut Bytes) -> Option<Bytes> {
    let n = buf.try_get_u32().ok()? as usize;
    (n <= buf.remaining()).then(|| buf.split_to(n))
}

/// The stored form of `fields`.
pub fn encode(fields: &[(Bytes, Bytes)]) -> Bytes {
    let len = 4 + fields
        .iter()
        .map(|(f, v)| 8 + f.len() + v.len())
        .sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    out.put_u32(fields.len() as u32);
    for (f, v) in fields {
        out.put_u32(f.len() as u32);
        out.put_slice(f);
        out.put_u32(v.len() as u32);
        out.put_slice(v);
    }
    out.freeze()
}

/// The bytes `fields` take stored, without building them.
pub fn encoded_len(fields: &[(Bytes, Bytes)]) -> usize {
    4 + fields
        .iter()
        .map(|(f, v)| 8 + f.len() + v.len())
        .sum::<usize>()
}

/// Sets `field` to `value`, in place if present, else at the end; whether it is new.
pub fn set(fields: &mut Fields, field: &Bytes, value: Bytes) -> bool {
    match fields.iter_mut().find(|(f, _)| f == field) {
        Some((_, v)) => {
            *v = value;
            false
        }
        None => {
            fields.push((field.clone(), value));
            true
        }
    }
}

/// Fields a command names past which it looks them up through an index, not by scanning:
/// one HSET or HDEL of many fields must not cost their number times the hash's size.
const SCAN_UP_TO: usize = 8;

/// Sets each of `pairs` in order (a field named twice takes its last value); how many
/// fields are new.
pub fn set_all(fields: &mut Fields, pairs: &[(Bytes, Bytes)]) -> usize {
    if pairs.len() <= SCAN_UP_TO {
        return pairs
            .iter()
            .filter(|(f, v)| set(fields, f, v.clone()))
            .count();
    }
    let mut index: HashMap<Bytes, usize> = fields
        .iter()
        .enumerate()
        .map(|(i, (f, _))| (f.clone(), i))
        .collect();
    let mut added = 0;
    for (f, v) in pairs {
        match index.get(f) {
            Some(&i) => fields[i].1 = v.clone(),
            None => {
                index.insert(f.clone(), fields.len());
                fields.push((f.clone(), v.clone()));
                added += 1;
            }
        }
    }
    added
}

/// The values of the fields named in `wanted`, in that order.
pub fn get_all<'f>(fields: &'f Fields, wanted: &[Bytes]) -> Vec<Option<&'f Bytes>> {
    if wanted.len() <= SCAN_UP_TO {
        return wanted.iter().map(|f| get(fields, f)).collect();
    }
    let index: HashMap<&Bytes, &Bytes> = fields.iter().map(|(f, v)| (f, v)).collect();
    wanted.iter().map(|f| index.get(f).copied()).collect()
}

/// Removes the fields named in `gone`; how many there were.
pub fn remove_all(fields: &mut Fields, gone: &[Bytes]) -> usize {
    let before = fields.len();
    if gone.len() <= SCAN_UP_TO {
        fields.retain(|(f, _)| !gone.contains(f));
    } else {
        let gone: HashSet<&Bytes> = gone.iter().collect();
        fields.retain(|(f, _)| !gone.contains(f));
    }
    before - fields.len()
}

pub fn get<'f>(fields: &'f Fields, field: &[u8]) -> Option<&'f Bytes> {
    fields.iter().find(|(f, _)| f == field).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Setting or removing many fields through the index gives what one at a time does.
        #[test]
        fn many_fields_at_once_match_one_at_a_time(
            start in proptest::collection::vec((0u8..40, any::<u8>()), 0..30),
            pairs in proptest::collection::vec((0u8..40, any::<u8>()), 0..30),
            gone in proptest::collection::vec(0u8..40, 0..30),
        ) {
            let b = |x: u8| Bytes::from(vec![x]);
            let mut one = Fields::new();
            for (f, v) in &start {
                set(&mut one, &b(*f), b(*v));
            }
            let mut many = one.clone();
            let pairs: Vec<(Bytes, Bytes)> = pairs.iter().map(|(f, v)| (b(*f), b(*v))).collect();
            let added = pairs.iter().filter(|(f, v)| set(&mut one, f, v.clone())).count();
            prop_assert_eq!(set_all(&mut many, &pairs), added);
            prop_assert_eq!(&many, &one);
            let wanted: Vec<Bytes> = pairs.iter().map(|(f, _)| f.clone()).chain((0..20).map(b)).collect();
            let got: Vec<Option<&Bytes>> = wanted.iter().map(|f| get(&one, f)).collect();
            prop_assert_eq!(get_all(&many, &wanted), got);
            let gone: Vec<Bytes> = gone.into_iter().map(b).collect();
            let before = one.len();
            one.retain(|(f, _)| !gone.contains(f));
            prop_assert_eq!(remove_all(&mut many, &gone), before - one.len());
            prop_assert_eq!(many, one);
        }
    }

    #[test]
    fn round_trip_keeps_order() {
        let mut fields = Fields::new();
        assert!(set(
            &mut fields,
            &Bytes::from_static(b"b"),
            Bytes::from_static(b"1")
        ));
        assert!(set(
            &mut fields,
            &Bytes::from_static(b"a"),
            Bytes::from_static(b"")
        ));
        assert!(!set(
            &mut fields,
            &Bytes::from_static(b"b"),
            Bytes::from_static(b"2")
        ));
        let stored = encode(&fields);
        assert_eq!(stored.len(), encoded_len(&fields));
        assert_eq!(decode(&stored).unwrap(), fields);
        assert_eq!(get(&fields, b"b").unwrap(), &Bytes::from_static(b"2"));
        assert_eq!(decode(&encode(&[])).unwrap(), Fields::new());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&Bytes::from(input));
        }
    }
}
