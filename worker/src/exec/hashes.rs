//! Hash commands, on a hash stored as one value (see [`super::codec`]), following Redis
//! 7.0's `t_hash.c` for replies and errors.

use bytes::Bytes;
use twincache_protocol::glob;
use twincache_protocol::program::{Action, Kind};
use twincache_protocol::resp::Reply;

use super::codec::{self, Fields};
use super::{add_checked, float, parse_i64, Cx, Outcome, NAN_OR_INF, TOO_BIG, WRONGTYPE};
use crate::store::Meta;

/// Most elements one HRANDFIELD answers: a negative count may repeat fields without end,
/// and the answer must fit a frame.
pub const MAX_RANDOM: u64 = 1 << 20;

pub(super) fn run(cx: &mut Cx, action: &Action) -> Outcome {
    match action {
        Action::HGet(field) => {
            let (_, fields) = read_or_empty(cx)?;
            Ok(codec::get(&fields, field).map_or(Reply::Nil, |v| Reply::Bulk(v.clone())))
        }
        Action::HMGet(wanted) => {
            let (_, fields) = read_or_empty(cx)?;
            Ok(Reply::Array(
                codec::get_all(&fields, wanted)
                    .into_iter()
                    .map(|v| v.map_or(Reply::Nil, |v| Reply::Bulk(v.clone())))
                    .collect(),
            ))
        }
        Action::HGetAll => {
            let (_, fields) = read_or_empty(cx)?;
            Ok(Reply::Map(
                fields
                    .into_iter()
                    .map(|(f, v)| (Reply::Bulk(f), Reply::Bulk(v)))
                    .collect(),
            ))
        }
        Action::HKeys | Action::HVals => {
            let keys = matches!(action, Action::HKeys);
            let (_, fields) = read_or_empty(cx)?;
            Ok(Reply::Array(
                fields
                    .into_iter()
                    .map(|(f, v)| Reply::Bulk(if keys { f } else { v }))
                    .collect(),
            ))
        }
        Action::HLen => Ok(Reply::Int(read_or_empty(cx)?.1.len() as i64)),
        Action::HExists(field) => {
            let (_, fields) = read_or_empty(cx)?;
            Ok(Reply::Int(i64::from(codec::get(&fields, field).is_some())))
        }
        Action::HStrLen(field) => {
            let (_, fields) = read_or_empty(cx)?;
            Ok(Reply::Int(
                codec::get(&fields, field).map_or(0, |v| v.len() as i64),
            ))
        }
        Action::HRandField { count, with_values } => random_fields(cx, *count, *with_values),
        Action::HScan { pattern, error } => {
            let Some((_, fields)) = read(cx)? else {
                return Ok(Reply::Array(vec![
                    Reply::Bulk(Bytes::from_static(b"0")),
                    Reply::Array(Vec::new()),
                ]));
            };
            match error {
                0 => {}
                1 => return Err(Reply::err(super::NOT_INTEGER)),
                _ => return Err(Reply::err("ERR syntax error")),
            }
            let mut items = Vec::with_capacity(fields.len() * 2);
            for (f, v) in fields {
                if pattern.as_ref().is_none_or(|p| glob::matches(p, &f)) {
                    items.push(Reply::Bulk(f));
                    items.push(Reply::Bulk(v));
                }
            }
            Ok(Reply::Array(vec![
                Reply::Bulk(Bytes::from_static(b"0")),
                Reply::Array(items),
            ]))
        }
        Action::HSet { pairs, ok } => {
            let (expires_at, mut fields) = read_or_empty(cx)?;
            let added = codec::set_all(&mut fields, pairs) as i64;
            store(cx, expires_at, &fields)?;
            Ok(if *ok { Reply::OK } else { Reply::Int(added) })
        }
        Action::HSetNx(field, value) => {
            let (expires_at, mut fields) = read_or_empty(cx)?;
            if codec::get(&fields, field).is_some() {
                return Ok(Reply::Int(0));
            }
            codec::set(&mut fields, field, value.clone());
            store(cx, expires_at, &fields)?;
            Ok(Reply::Int(1))
        }
        Action::HDel(gone) => {
            let Some((meta, mut fields)) = read(cx)? else {
                return Ok(Reply::Int(0));
            };
            let removed = codec::remove_all(&mut fields, gone) as i64;
            if removed > 0 {
                if fields.is_empty() {
                    cx.delete();
                } else {
                    store(cx, meta.expires_at, &fields)?;
                }
            }
            Ok(Reply::Int(removed))
        }
        Action::HIncrBy(field, incr) => {
            let (expires_at, mut fields) = read_or_empty(cx)?;
            let value = match codec::get(&fields, field) {
                Some(v) => {
                    parse_i64(v).ok_or_else(|| Reply::err("ERR hash value is not an integer"))?
                }
                None => 0,
            };
            let new = add_checked(value, *incr)?;
            codec::set(&mut fields, field, Bytes::from(new.to_string()));
            store(cx, expires_at, &fields)?;
            Ok(Reply::Int(new))
        }
        Action::HIncrByFloat(field, incr) => {
            let incr =
                float::parse(incr).ok_or_else(|| Reply::err("ERR value is not a valid float"))?;
            if float::is_infinite(incr) {
                return Err(Reply::err("ERR value is NaN or Infinity"));
            }
            let (expires_at, mut fields) = read_or_empty(cx)?;
            let value = match codec::get(&fields, field) {
                Some(v) => {
                    float::parse(v).ok_or_else(|| Reply::err("ERR hash value is not a float"))?
                }
                None => float::parse(b"0").expect("0 is a number"),
            };
            let sum = Bytes::from(float::add(value, incr).ok_or_else(|| Reply::err(NAN_OR_INF))?);
            codec::set(&mut fields, field, sum.clone());
            store(cx, expires_at, &fields)?;
            Ok(Reply::Bulk(sum))
        }
        _ => Err(Reply::err("ERR not a hash command")),
    }
}

/// The current key's hash, if it holds one; WRONGTYPE if it holds a string.
fn read(cx: &mut Cx) -> Result<Option<(Meta, Fields)>, Reply> {
    match cx.read()? {
        None => Ok(None),
        Some((meta, _)) if meta.kind != Kind::Hash => Err(Reply::err(WRONGTYPE)),
        Some((meta, value)) => match codec::decode(&value) {
            Some(fields) => Ok(Some((meta, fields))),
            None => {
                tracing::error!("a stored hash does not decode");
                Err(Reply::err("ERR stored value is corrupt"))
            }
        },
    }
}

/// The hash and its expiry, or an empty one for a missing key (reads answer as for an empty
/// hash, and writes create it).
fn read_or_empty(cx: &mut Cx) -> Result<(u64, Fields), Reply> {
    Ok(read(cx)?.map_or((0, Fields::new()), |(meta, f)| (meta.expires_at, f)))
}

fn store(cx: &mut Cx, expires_at: u64, fields: &Fields) -> Result<(), Reply> {
    if codec::encoded_len(fields) > cx.max_value {
        return Err(Reply::err(TOO_BIG));
    }
    cx.put(Kind::Hash, expires_at, codec::encode(fields))
}

/// HRANDFIELD, as Redis 7.0 answers it: one field (or nil) without a count; with a count,
/// distinct fields (all of them, in order, when the count covers the hash) or, for a
/// negative count, that many draws that may repeat. WITHVALUES pairs each field with its
/// value: flat in RESP2, two-element arrays in RESP3.
fn random_fields(cx: &mut Cx, count: Option<i64>, with_values: bool) -> Outcome {
    let (_, fields) = read_or_empty(cx)?;
    let Some(count) = count else {
        if fields.is_empty() {
            return Ok(Reply::Nil);
        }
        let i = rand::random::<u64>() as usize % fields.len();
        return Ok(Reply::Bulk(fields[i].0.clone()));
    };
    if count.unsigned_abs() > MAX_RANDOM && !fields.is_empty() {
        return Err(Reply::err(format!(
            "ERR HRANDFIELD count is limited to {MAX_RANDOM} in twincache"
        )));
    }
    let picks: Vec<usize> = if fields.is_empty() || count == 0 {
        Vec::new()
    } else if count < 0 {
        (0..count.unsigned_abs())
            .map(|_| rand::random::<u64>() as usize % fields.len())
            .collect()
    } else if count as u64 >= fields.len() as u64 {
        (0..fields.len()).collect()
    } else {
        // A random distinct subset, in a random order.
        let mut all: Vec<usize> = (0..fields.len()).collect();
        for i in 0..count as usize {
            let j = i + rand::random::<u64>() as usize % (all.len() - i);
            all.swap(i, j);
        }
        all.truncate(count as usize);
        all
    };
    let pair = |i: usize| {
        (
            Reply::Bulk(fields[i].0.clone()),
            Reply::Bulk(fields[i].1.clone()),
        )
    };
    Ok(Reply::Array(if !with_values {
        picks
            .into_iter()
            .map(|i| Reply::Bulk(fields[i].0.clone()))
            .collect()
    } else if cx.resp3() {
        picks
            .into_iter()
            .map(|i| {
                let (f, v) = pair(i);
                Reply::Array(vec![f, v])
            })
            .collect()
    } else {
        picks
            .into_iter()
            .flat_map(|i| {
                let (f, v) = pair(i);
                [f, v]
            })
            .collect()
    }))
}
