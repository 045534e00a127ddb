//! String commands that read before they answer or write: STRLEN, GETRANGE, SET with its
//! conditions, SETNX, GETDEL, GETEX, GETSET, APPEND, SETRANGE, the counters. Each follows
//! Redis 7.0's `t_string.c`: the same checks in the same order, so the same error wins.

use bytes::{Bytes, BytesMut};
use twincache_protocol::program::{Action, Kind, SetIf, Ttl};
use twincache_protocol::resp::{self, Reply, Version};

use super::{add_checked, corrupt, expiry_abs, expiry_at, float, parse_i64, Cx, Outcome, Str};
use super::{NAN_OR_INF, NOT_FLOAT, NOT_INTEGER, TOO_BIG, WRONGTYPE};
use crate::seal::{segments, SealError};
use crate::store::{Edit, Form, Txn};

/// GET's reply to `out`, its value written from where it lies (`Txn::read_with`): no copy
/// of a raw value, and no allocation, per key of an MGET.
pub(super) fn get_into(txn: &mut Txn, key: &[u8], version: Version, out: &mut BytesMut) {
    let read = txn.read_with(key, |meta, value| match (meta.kind, value) {
        (Kind::String, Some(value)) => {
            resp::put_bulk_string(out, value);
            Ok(())
        }
        (Kind::String, None) => Err(corrupt(SealError::Corrupt)),
        _ => Err(Reply::err(WRONGTYPE)),
    });
    txn.count_lookup(!matches!(read, Ok(None)));
    let other = match read {
        Ok(Some(Ok(()))) => return,
        Ok(Some(Err(reply))) => reply,
        Ok(None) => Reply::Nil,
        Err(e) => corrupt(e),
    };
    other.encode_as(version, out);
}

pub(super) fn run(cx: &mut Cx, action: &Action) -> Outcome {
    match action {
        // (`exec::run` takes GET itself, through `get_into`.)
        Action::Get => {
            let mut out = BytesMut::new();
            get_into(cx.txn, cx.key, cx.version, &mut out);
            Ok(Reply::Raw(out.freeze()))
        }
        Action::StrLen => Ok(Reply::Int(
            cx.string_form()?.map_or(0, |(_, s)| s.len() as i64),
        )),
        Action::GetRange(start, end) => Ok(Reply::Bulk(match cx.string_form()? {
            None => Bytes::new(),
            Some((_, Str::Whole(value))) => range(&value, *start, *end),
            Some((_, Str::Segments(len))) => {
                let (key, cipher) = (cx.key, cx.txn.sealer().cipher);
                let span = bounds(len, *start, *end);
                segments::read(key, cx.records()?, span, cipher).map_err(corrupt)?
            }
        })),
        Action::Set {
            value,
            ttl,
            cond,
            get,
        } => set(cx, value, *ttl, *cond, *get),
        Action::SetNx(value) => {
            if cx.txn.meta(cx.key).is_some() {
                return Ok(Reply::Int(0));
            }
            cx.put(Kind::String, 0, value.clone())?;
            Ok(Reply::Int(1))
        }
        Action::MSetNx(pairs) => {
            if pairs.iter().any(|(k, _)| cx.txn.meta(k).is_some()) {
                return Ok(Reply::Int(0));
            }
            for (k, v) in pairs {
                if v.len() > cx.max_value {
                    return Err(Reply::err(TOO_BIG));
                }
                cx.txn.put(k, Kind::String, 0, v.clone());
            }
            Ok(Reply::Int(1))
        }
        Action::GetDel => match cx.string()? {
            Some((_, v)) => {
                cx.delete();
                Ok(Reply::Bulk(v))
            }
            None => Ok(Reply::Nil),
        },
        Action::GetEx(ttl, error) => getex(cx, *ttl, *error),
        Action::GetSet(value) => {
            let old = cx.string()?;
            cx.put(Kind::String, 0, value.clone())?;
            Ok(old.map_or(Reply::Nil, |(_, v)| Reply::Bulk(v)))
        }
        Action::Append(tail) => {
            let current = cx.string_form()?;
            let len = current.as_ref().map_or(0, |(_, s)| s.len());
            if len.saturating_add(tail.len()) > cx.max_value {
                return Err(Reply::err(TOO_BIG));
            }
            let (expires_at, old) = match current {
                Some((meta, Str::Segments(_))) => {
                    return write_segments(cx, meta.expires_at, len, tail);
                }
                Some((meta, Str::Whole(v))) => (meta.expires_at, v),
                None => (0, Bytes::new()),
            };
            // Made at its length, so no plaintext is left behind by a growing buffer.
            let mut value = Vec::with_capacity(old.len() + tail.len());
            value.extend_from_slice(&old);
            value.extend_from_slice(tail);
            let len = value.len() as i64;
            let value = cx.plaintext(value);
            cx.put_string(expires_at, value)?;
            Ok(Reply::Int(len))
        }
        Action::SetRange(offset, piece) => setrange(cx, *offset, piece),
        Action::IncrBy(incr) => {
            let (expires_at, value) = match cx.string()? {
                Some((meta, v)) => (
                    meta.expires_at,
                    parse_i64(&v).ok_or_else(|| Reply::err(NOT_INTEGER))?,
                ),
                None => (0, 0),
            };
            let new = add_checked(value, *incr)?;
            cx.put(Kind::String, expires_at, Bytes::from(new.to_string()))?;
            Ok(Reply::Int(new))
        }
        Action::IncrByFloat(incr) => {
            let (expires_at, value) = match cx.string()? {
                Some((meta, v)) => (meta.expires_at, v),
                None => (0, Bytes::from_static(b"0")),
            };
            let value = float::parse(&value).ok_or_else(|| Reply::err(NOT_FLOAT))?;
            let incr = float::parse(incr).ok_or_else(|| Reply::err(NOT_FLOAT))?;
            let sum = float::add(value, incr).ok_or_else(|| Reply::err(NAN_OR_INF))?;
            let sum = Bytes::from(sum);
            cx.put(Kind::String, expires_at, sum.clone())?;
            Ok(Reply::Bulk(sum))
        }
        _ => Err(Reply::err("ERR not a string command")),
    }
}

/// GETRANGE's slice, with Redis' index arithmetic (negative from the end, clamped).
pub(super) fn range(value: &Bytes, start: i64, end: i64) -> Bytes {
    value.slice(bounds(value.len(), start, end))
}

/// GETRANGE's span of a `len`-byte string (see [`range`]).
fn bounds(len: usize, start: i64, end: i64) -> std::ops::Range<usize> {
    let len = len as i64;
    if start < 0 && end < 0 && start > end {
        return 0..0;
    }
    let start = if start < 0 {
        len.wrapping_add(start).max(0)
    } else {
        start
    };
    let end = if end < 0 {
        len.wrapping_add(end).max(0)
    } else {
        end
    };
    let end = end.min(len - 1);
    if start > end || len == 0 {
        return 0..0;
    }
    start as usize..end as usize + 1
}

fn set(cx: &mut Cx, value: &Bytes, ttl: Ttl, cond: SetIf, get: bool) -> Outcome {
    // SET ... GET of a key holding another type is an error, and sets nothing.
    let old = if get {
        cx.string()?.map(|(meta, v)| (meta, Some(v)))
    } else {
        cx.txn.meta(cx.key).map(|meta| (meta, None))
    };
    let answer = |old: &Option<(_, Option<Bytes>)>, done: Reply| match old {
        _ if !get => done,
        Some((_, Some(v))) => Reply::Bulk(v.clone()),
        _ => Reply::Nil,
    };
    let exists = old.is_some();
    if (cond == SetIf::Nx && exists) || (cond == SetIf::Xx && !exists) {
        return Ok(answer(&old, Reply::Nil));
    }
    let expires_at = match ttl {
        Ttl::Keep => old.as_ref().map_or(0, |(meta, _)| meta.expires_at),
        Ttl::Clear => 0,
        Ttl::In(ms) => expiry_at(cx.now(), ms),
        Ttl::At(ms) => expiry_abs(ms),
    };
    cx.put(Kind::String, expires_at, value.clone())?;
    Ok(answer(&old, Reply::OK))
}

fn getex(cx: &mut Cx, ttl: Ttl, error: u8) -> Outcome {
    // One lookup; a new expiry keeps the value in the form it is held (a long string's
    // segments are opened for the reply only).
    let Some((meta, form)) = cx.read_form()? else {
        return Ok(Reply::Nil);
    };
    if meta.kind != Kind::String {
        return Err(Reply::err(WRONGTYPE));
    }
    let value = match &form {
        Form::Value(value) => value.clone(),
        _ => cx.read()?.ok_or_else(|| corrupt(SealError::Corrupt))?.1,
    };
    match error {
        0 => {}
        1 => return Err(Reply::err(NOT_INTEGER)),
        _ => return Err(Reply::err("ERR invalid expire time in 'getex' command")),
    }
    let at = match ttl {
        Ttl::Keep => None,
        Ttl::Clear if meta.expires_at == 0 => None,
        Ttl::Clear => Some(0),
        Ttl::In(ms) => Some(expiry_at(cx.now(), ms)),
        Ttl::At(ms) if u64::try_from(ms).unwrap_or(0) <= cx.now() => {
            cx.delete();
            None
        }
        Ttl::At(ms) => Some(expiry_abs(ms)),
    };
    if let Some(at) = at {
        cx.put_form(Kind::String, at, form);
    }
    Ok(Reply::Bulk(value))
}

fn setrange(cx: &mut Cx, offset: u64, piece: &Bytes) -> Outcome {
    let current = cx.string_form()?;
    if piece.is_empty() {
        // Setting nothing creates nothing, and answers the length as it is.
        return Ok(Reply::Int(current.map_or(0, |(_, s)| s.len() as i64)));
    }
    let end = usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_add(piece.len()))
        .filter(|&end| end <= cx.max_value)
        .ok_or_else(|| Reply::err(TOO_BIG))?;
    let offset = offset as usize; // end fits, so offset does
    let (expires_at, old) = match current {
        Some((meta, Str::Segments(_))) => {
            return write_segments(cx, meta.expires_at, offset, piece);
        }
        Some((meta, Str::Whole(v))) => (meta.expires_at, v),
        None => (0, Bytes::new()),
    };
    // Made at its length, so no plaintext is left behind by a growing buffer.
    let mut value = vec![0; old.len().max(end)];
    value[..old.len()].copy_from_slice(&old);
    value[offset..end].copy_from_slice(piece);
    let len = value.len() as i64;
    let value = cx.plaintext(value);
    cx.put_string(expires_at, value)?;
    Ok(Reply::Int(len))
}

/// Writes `piece` at `at` into the current key's long string, sealing only the segments it
/// touches (`seal::segments`); answers the new length. The caller checked that length.
fn write_segments(cx: &mut Cx, expires_at: u64, at: usize, piece: &[u8]) -> Outcome {
    let (key, cipher) = (cx.key, cx.txn.sealer().cipher);
    let plan = segments::plan_write(key, cx.records()?, at, piece, cipher).map_err(corrupt)?;
    let len = plan.len;
    cx.put_planned(Kind::String, expires_at, Edit::Segments(plan))?;
    Ok(Reply::Int(len as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getrange_like_redis() {
        let v = Bytes::from_static(b"This is a string");
        let r = |s, e| range(&v, s, e);
        assert_eq!(r(0, 3), "This");
        assert_eq!(r(-3, -1), "ing");
        assert_eq!(r(0, -1), v);
        assert_eq!(r(10, 100), "string");
        assert_eq!(r(-1, -5), "");
        assert_eq!(r(i64::MIN, i64::MAX), v);
        assert_eq!(r(5, 2), "");
        assert_eq!(range(&Bytes::new(), 0, -1), "");
        assert_eq!(r(-100, 2), "Thi");
    }
}
