//! Hash commands, following Redis 7.0's `t_hash.c` for replies and errors. A small hash is
//! one packed value (see [`super::codec`]); a large one is stored as records, one sealed
//! per field, and its single-field commands open and seal only that field
//! (`crate::seal::records`).

use bytes::Bytes;
use twincache_protocol::glob;
use twincache_protocol::program::{Action, Kind};
use twincache_protocol::resp::Reply;

use super::codec::{self, Fields};
use super::{
    add_checked, corrupt, float, parse_i64, Cx, Outcome, MAX_VALUE, NAN_OR_INF, TOO_BIG, WRONGTYPE,
};
use crate::seal::records;
use crate::seal::SealError;
use crate::store::{Edit, Form};

/// Most elements one HRANDFIELD answers: a negative count may repeat fields without end,
/// and the answer must fit a frame.
pub const MAX_RANDOM: u64 = 1 << 20;

pub(super) fn run(cx: &mut Cx, action: &Action) -> Outcome {
    match action {
        Action::HGet(field) => {
            let value = read_or_empty(cx)?.get(cx, field)?;
            Ok(value.map_or(Reply::Nil, Reply::Bulk))
        }
        Action::HMGet(wanted) => {
            let values = read_or_empty(cx)?.get_all(cx, wanted)?;
            Ok(Reply::Array(
                values
                    .into_iter()
                    .map(|v| v.map_or(Reply::Nil, Reply::Bulk))
                    .collect(),
            ))
        }
        Action::HGetAll => {
            let fields = read_or_empty(cx)?.fields(cx)?;
            Ok(Reply::Map(
                fields
                    .into_iter()
                    .map(|(f, v)| (Reply::Bulk(f), Reply::Bulk(v)))
                    .collect(),
            ))
        }
        Action::HKeys | Action::HVals => {
            let keys = matches!(action, Action::HKeys);
            let fields = read_or_empty(cx)?.fields(cx)?;
            Ok(Reply::Array(
                fields
                    .into_iter()
                    .map(|(f, v)| Reply::Bulk(if keys { f } else { v }))
                    .collect(),
            ))
        }
        Action::HLen => Ok(Reply::Int(read_or_empty(cx)?.len(cx)? as i64)),
        Action::HExists(field) => {
            let value = read_or_empty(cx)?.get(cx, field)?;
            Ok(Reply::Int(i64::from(value.is_some())))
        }
        Action::HStrLen(field) => {
            let value = read_or_empty(cx)?.get(cx, field)?;
            Ok(Reply::Int(value.map_or(0, |v| v.len() as i64)))
        }
        Action::HRandField { count, with_values } => random_fields(cx, *count, *with_values),
        Action::HScan {
            pattern,
            error,
            cursor,
            count,
        } => {
            let Some(hash) = read(cx)? else {
                return Ok(scanned(0, Vec::new()));
            };
            match error {
                0 => {}
                1 => return Err(Reply::err(super::NOT_INTEGER)),
                _ => return Err(Reply::err("ERR syntax error")),
            }
            let pattern = pattern.as_deref().map(glob::Pattern::new);
            let mut items = Vec::new();
            let mut found = |f: Bytes, v: Bytes| {
                if pattern.as_ref().is_none_or(|p| p.matches(&f)) {
                    items.push(Reply::Bulk(f));
                    items.push(Reply::Bulk(v));
                }
            };
            let next = match hash.held {
                // All at once, whatever the cursor, as Redis answers a small hash.
                Held::Packed(fields) => {
                    fields.into_iter().for_each(|(f, v)| found(f, v));
                    0
                }
                // About COUNT at a time, from the tag the cursor names (its tag plus one),
                // and never longer than a step's time (a hostile pattern makes each match
                // cost, a huge COUNT opens the whole hash, and the program holds the
                // shard's lock).
                Held::Records => match cursor.checked_sub(1).map(u32::try_from) {
                    Some(Err(_)) => 0, // past every tag
                    from => {
                        let from = from.map_or(0, |t| t.unwrap_or(u32::MAX));
                        let (key, sealer) = (cx.key, cx.txn.sealer());
                        let started = std::time::Instant::now();
                        // (An older orchestrator's HSCAN, with no count, is one whole walk
                        // as it was: it could not go on from a cursor.)
                        let timed = *count != u32::MAX;
                        let visit = |f, v| {
                            found(f, v);
                            timed && started.elapsed() >= crate::store::STEP_TIME
                        };
                        let count = (*count).max(1) as usize;
                        records::scan(key, cx.records()?, sealer, from, count, visit)
                            .map_err(corrupt)?
                            .map_or(0, |tag| u64::from(tag) + 1)
                    }
                },
            };
            Ok(scanned(next, items))
        }
        Action::HSet { pairs, ok } => {
            let added = read_or_empty(cx)?.set(cx, pairs)? as i64;
            Ok(if *ok { Reply::OK } else { Reply::Int(added) })
        }
        Action::HSetNx(field, value) => {
            let hash = read_or_empty(cx)?;
            if hash.get(cx, field)?.is_some() {
                return Ok(Reply::Int(0));
            }
            hash.set(cx, &[(field.clone(), value.clone())])?;
            Ok(Reply::Int(1))
        }
        Action::HDel(gone) => match read(cx)? {
            Some(hash) => Ok(Reply::Int(hash.remove(cx, gone)? as i64)),
            None => Ok(Reply::Int(0)),
        },
        Action::HIncrBy(field, incr) => {
            let hash = read_or_empty(cx)?;
            let value = match hash.get(cx, field)? {
                Some(v) => {
                    parse_i64(&v).ok_or_else(|| Reply::err("ERR hash value is not an integer"))?
                }
                None => 0,
            };
            let new = add_checked(value, *incr)?;
            hash.set(cx, &[(field.clone(), Bytes::from(new.to_string()))])?;
            Ok(Reply::Int(new))
        }
        Action::HIncrByFloat(field, incr) => {
            let incr =
                float::parse(incr).ok_or_else(|| Reply::err("ERR value is not a valid float"))?;
            if float::is_infinite(incr) {
                return Err(Reply::err("ERR value is NaN or Infinity"));
            }
            let hash = read_or_empty(cx)?;
            let value = match hash.get(cx, field)? {
                Some(v) => {
                    float::parse(&v).ok_or_else(|| Reply::err("ERR hash value is not a float"))?
                }
                None => float::parse(b"0").expect("0 is a number"),
            };
            let sum = Bytes::from(float::add(value, incr).ok_or_else(|| Reply::err(NAN_OR_INF))?);
            hash.set(cx, &[(field.clone(), sum.clone())])?;
            Ok(Reply::Bulk(sum))
        }
        _ => Err(Reply::err("ERR not a hash command")),
    }
}

/// A hash as a program holds it: small ones decoded whole, large ones left in their records
/// form in the store, read and written a field at a time (`seal::records`).
struct Hash {
    expires_at: u64,
    held: Held,
}

enum Held {
    Packed(Fields),
    /// The key's records (borrowed from the program's hold on them when needed).
    Records,
}

impl Hash {
    fn len(&self, cx: &mut Cx) -> Result<usize, Reply> {
        Ok(match &self.held {
            Held::Packed(fields) => fields.len(),
            Held::Records => records::count(cx.records()?).unwrap_or(0),
        })
    }

    fn get(&self, cx: &mut Cx, field: &[u8]) -> Result<Option<Bytes>, Reply> {
        match &self.held {
            Held::Packed(fields) => Ok(codec::get(fields, field).cloned()),
            Held::Records => {
                let (key, sealer) = (cx.key, cx.txn.sealer());
                records::get(key, cx.records()?, field, sealer).map_err(corrupt)
            }
        }
    }

    fn get_all(&self, cx: &mut Cx, wanted: &[Bytes]) -> Result<Vec<Option<Bytes>>, Reply> {
        match &self.held {
            Held::Packed(fields) => Ok(codec::get_all(fields, wanted)
                .into_iter()
                .map(|v| v.cloned())
                .collect()),
            Held::Records => wanted.iter().map(|f| self.get(cx, f)).collect(),
        }
    }

    /// Every field and value: in the order first set for a packed hash, in tag order for
    /// records (Redis too answers a large hash in its table's order).
    fn fields(self, cx: &mut Cx) -> Result<Fields, Reply> {
        match self.held {
            Held::Packed(fields) => Ok(fields),
            Held::Records => {
                let (key, cipher) = (cx.key, cx.txn.sealer().cipher);
                let packed =
                    records::open_all(key, cx.records()?, cipher, MAX_VALUE).map_err(corrupt)?;
                codec::decode(&packed).ok_or_else(|| corrupt(SealError::Corrupt))
            }
        }
    }

    /// Sets each of `pairs` and stages the hash; how many fields are new.
    fn set(self, cx: &mut Cx, pairs: &[(Bytes, Bytes)]) -> Result<usize, Reply> {
        match self.held {
            Held::Packed(mut fields) => {
                let added = codec::set_all(&mut fields, pairs);
                store(cx, self.expires_at, &fields)?;
                Ok(added)
            }
            Held::Records => {
                let plan = plan(cx, pairs, &[])?;
                let added = plan.added;
                cx.put_planned(Kind::Hash, self.expires_at, Edit::Fields(plan))?;
                Ok(added)
            }
        }
    }

    /// Removes the fields named in `gone` and stages the hash (or its deletion, once
    /// empty); how many there were.
    fn remove(self, cx: &mut Cx, gone: &[Bytes]) -> Result<usize, Reply> {
        let (removed, left) = match self.held {
            Held::Packed(mut fields) => {
                let removed = codec::remove_all(&mut fields, gone);
                if removed > 0 && !fields.is_empty() {
                    store(cx, self.expires_at, &fields)?;
                }
                (removed, fields.len())
            }
            Held::Records => {
                let plan = plan(cx, &[], gone)?;
                let (removed, count) = (plan.removed, plan.count);
                if removed > 0 && count > 0 {
                    cx.put_planned(Kind::Hash, self.expires_at, Edit::Fields(plan))?;
                }
                (removed, count)
            }
        };
        if removed > 0 && left == 0 {
            cx.delete();
        }
        Ok(removed)
    }
}

/// How the current key's records change with `sets` set and `removes` removed.
fn plan(cx: &mut Cx, sets: &[(Bytes, Bytes)], removes: &[Bytes]) -> Result<records::Plan, Reply> {
    let (key, sealer) = (cx.key, cx.txn.sealer());
    records::plan(key, cx.records()?, sets, removes, sealer).map_err(corrupt)
}

/// The current key's hash, if it holds one; WRONGTYPE if it holds a string.
fn read(cx: &mut Cx) -> Result<Option<Hash>, Reply> {
    let Some((meta, form)) = cx.read_form()? else {
        return Ok(None);
    };
    if meta.kind != Kind::Hash {
        return Err(Reply::err(WRONGTYPE));
    }
    let held = match form {
        Form::Value(value) => {
            Held::Packed(codec::decode(&value).ok_or_else(|| corrupt(SealError::Corrupt))?)
        }
        _ => Held::Records,
    };
    Ok(Some(Hash {
        expires_at: meta.expires_at,
        held,
    }))
}

/// The hash, or an empty one for a missing key (reads answer as for an empty hash, and
/// writes create it).
fn read_or_empty(cx: &mut Cx) -> Result<Hash, Reply> {
    Ok(read(cx)?.unwrap_or(Hash {
        expires_at: 0,
        held: Held::Packed(Fields::new()),
    }))
}

/// Stages a packed hash (which the commit stores as records past the packed form's
/// limits: the frame that copies it to the partner must carry that form).
fn store(cx: &mut Cx, expires_at: u64, fields: &Fields) -> Result<(), Reply> {
    if room(cx, fields.len(), codec::encoded_len(fields)) > cx.max_value {
        return Err(Reply::err(TOO_BIG));
    }
    cx.put(Kind::Hash, expires_at, codec::encode(fields))
}

/// The most a packed hash of `fields` fields and `len` bytes may take as the commit stores
/// it (and its partner is sent it).
fn room(cx: &Cx, fields: usize, len: usize) -> usize {
    if records::wanted(fields, len) {
        records::max_stored_len(fields, len, cx.txn.sealer().cipher.is_some())
    } else {
        len
    }
}

/// [`room`] for a packed hash given whole (RESTORE).
pub(super) fn room_for_packed(cx: &Cx, value: &Bytes) -> usize {
    codec::decode(value).map_or(value.len(), |fields| room(cx, fields.len(), value.len()))
}

/// HRANDFIELD, as Redis 7.0 answers it: one field (or nil) without a count; with a count,
/// distinct fields (all of them, in order, when the count covers the hash) or, for a
/// negative count, that many draws that may repeat. WITHVALUES pairs each field with its
/// value: flat in RESP2, two-element arrays in RESP3.
fn random_fields(cx: &mut Cx, count: Option<i64>, with_values: bool) -> Outcome {
    let fields = read_or_empty(cx)?.fields(cx)?;
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

/// HSCAN's answer: the cursor to go on from (0: done) and the fields and values found.
fn scanned(next: u64, items: Vec<Reply>) -> Reply {
    Reply::Array(vec![
        Reply::Bulk(Bytes::from(next.to_string())),
        Reply::Array(items),
    ])
}
