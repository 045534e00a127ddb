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

pub fn get<'f>(fields: &'f Fields, field: &[u8]) -> Option<&'f Bytes> {
    fields.iter().find(|(f, _)| f == field).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
