//! Programs: what the orchestrator asks a worker to run on the keys it holds.
//!
//! Every Redis command beyond GET, SET, DEL and EXISTS reads a key's value before it answers
//! or writes (INCR, APPEND, HSET, EXPIRE ... NX). Such a command travels to a worker as a
//! program of [`Action`]s in the value of an `apply` (may write) or `query` (reads only)
//! frame. The worker runs the whole program with the shards of every key it names locked,
//! stages its writes, and commits them at once, so a program is atomic on the worker: that is
//! what MULTI/EXEC on one pair runs on, and a single INCR is the one-action case.
//!
//! ```text
//! program  = action*                  (the frame's key is the current key at the start)
//! action   = code:u8 fields           (fields per action below; integers big-endian,
//!                                      bytes as len:u32 bytes, lists as count:u32 items)
//! answer   = flags:u8 changes_len:u32 changes reply*
//! flags    = 1 aborted (a WATCH guard failed: nothing was written, no replies follow)
//! changes  = change*                  (what the partner must store: the value of the
//!                                      `replicate` frame, forwarded as is)
//! change   = key_len:u32 key kind:u8 expires_at:u64 value_len:u32 value
//! kind     = 0 string | 1 hash | 255 deleted
//! reply    = one RESP3 reply per action that answers (all but `key` and the guards)
//! ```
//!
//! An `apply` stamps every change with the request's version. When a touched key already
//! holds a version not older, the worker takes the next one after it if the request allows
//! (`flags::BUMP`, `version::bump`: the answer then carries the version it used), and
//! otherwise refuses the program (`NotApplied`, the payload its version as `u64`) so that the
//! orchestrator can move its clock past it and retry: versions stay unique and increasing
//! per key, which is what lets the partner converge by "newest version wins".

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The answer flag for a program stopped by a guard.
pub const ABORTED: u8 = 1;
/// The answer flag for changes written at a version of the worker's choosing (a `u64`
/// follows the flags).
pub const BUMPED: u8 = 2;
/// The answer flag for changes given with their bases (`frame::flags::BASES`): a block of
/// `count:u32 (base:u64)*` follows the version, one base a change, in the changes' order.
pub const BASED: u8 = 4;
/// What [`Change::kind`] is for a delete.
pub const DELETED: u8 = 255;
/// Flag on a change's kind: the value is the worker's stored form (a large hash's records,
/// see the worker's `seal::records`), which the partner keeps as it is instead of sealing.
pub const STORED: u8 = 0x40;
/// Flag on a [`STORED`] change's kind: the value is an edit of the partner's entry at a
/// given version (the worker's `records::replay`), not the whole form. A partner without
/// that version answers [`crate::Status::NotApplied`], and the sender sends the key whole
/// (`Action::Export`).
pub const PATCH: u8 = 0x20;

/// A stored value's type, in the entry header (see the worker's `store` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    String = 0,
    Hash = 1,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        match v {
            0 => Some(Kind::String),
            1 => Some(Kind::Hash),
            _ => None,
        }
    }

    /// The name TYPE answers with.
    pub fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Hash => "hash",
        }
    }
}

/// A key's expiry as a write asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Leave it as it is (KEEPTTL; GETEX without options).
    Keep,
    /// No expiry (a plain SET; PERSIST).
    Clear,
    /// This many milliseconds from the worker's now (zero or less: already expired).
    In(i64),
    /// At this Unix time in milliseconds.
    At(i64),
}

/// The condition of EXPIRE and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpireIf {
    Always,
    /// Only if the key has no expiry.
    Nx,
    /// Only if it has one.
    Xx,
    /// Only if the new expiry is later (no expiry counts as infinite).
    Gt,
    /// Only if the new expiry is earlier.
    Lt,
    /// XX and LT together: only if the key has an expiry and the new one is earlier (XX
    /// with GT is GT, which never passes a key without one).
    XxLt,
}

/// The condition of SET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetIf {
    Always,
    Nx,
    Xx,
}

/// What TTL-like reads answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlForm {
    Seconds,
    Millis,
    /// EXPIRETIME: the Unix time in seconds.
    AtSeconds,
    /// PEXPIRETIME.
    AtMillis,
}

/// One step of a program, on the current key unless it says otherwise.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Makes `key` the current key.
    Key(Bytes),
    /// Guard (WATCH): the program writes nothing and answers aborted if the current key
    /// changed since [`Action::Version`] read this version (0: no entry) and whether it was
    /// live then: it was live and was written or expired since, or it was not and was
    /// written since (its version is newer, or it is live now).
    Watch(u64, bool),

    // Reads.
    Get,
    StrLen,
    GetRange(i64, i64),
    Exists,
    Touch,
    Type,
    ReadTtl(TtlForm),
    Encoding,
    /// What WATCH records of the current key: `[version as a bulk decimal ("0" when no
    /// entry), 1 if it holds a live value else 0]`.
    Version,
    /// `[kind, expires_at, value]`, or nil: what a rename or copy across pairs carries.
    Dump,
    /// A random live key of this worker (the key is ignored).
    RandomKey,
    /// The current key's whole state as a change (a delete for a tombstone, nothing when
    /// there is no entry), at its version (the answer's): what a partner that could not
    /// take an edit ([`PATCH`]) is sent instead. Runs alone.
    Export,
    HGet(Bytes),
    HMGet(Vec<Bytes>),
    HGetAll,
    HKeys,
    HVals,
    HLen,
    HExists(Bytes),
    HStrLen(Bytes),
    /// HRANDFIELD: no count (one field, or nil), or a count (negative: may repeat).
    HRandField {
        count: Option<i64>,
        with_values: bool,
    },
    /// HSCAN: a small hash's every matching field in one answer (cursor 0), as Redis does
    /// for small hashes; a large hash's from `cursor` on (a worker's cursor: 0 is the
    /// start), about `count` of them, and the cursor to go on from. Its options were bad if
    /// `error` is not 0 (1: COUNT not an integer, 2: a syntax error): Redis reports that
    /// only for a key holding a hash, so the worker does too. (Action 30, from before
    /// cursors, still decodes: cursor 0, and `u32::MAX` for no count, a whole walk.)
    HScan {
        pattern: Option<Bytes>,
        error: u8,
        cursor: u64,
        count: u32,
    },
    // Writes.
    Set {
        value: Bytes,
        ttl: Ttl,
        cond: SetIf,
        get: bool,
    },
    SetNx(Bytes),
    /// MSETNX of keys on this worker: all set (1) if none exists, else none (0).
    MSetNx(Vec<(Bytes, Bytes)>),
    Del,
    GetDel,
    /// GETEX with its expiry, or (error not 0) with an expiry that was not valid: 1 not an
    /// integer, 2 out of range. Redis says so only for a key holding a string.
    GetEx(Ttl, u8),
    GetSet(Bytes),
    Append(Bytes),
    SetRange(u64, Bytes),
    IncrBy(i64),
    /// The increment as the client wrote it (already checked to be a number).
    IncrByFloat(Bytes),
    Expire(Ttl, ExpireIf),
    Persist,
    /// HSET (answers the count of new fields) or HMSET (answers OK).
    HSet {
        pairs: Vec<(Bytes, Bytes)>,
        ok: bool,
    },
    HSetNx(Bytes, Bytes),
    HDel(Vec<Bytes>),
    HIncrBy(Bytes, i64),
    HIncrByFloat(Bytes, Bytes),
    /// RENAME (nx false) or RENAMENX onto `dst`, on the same worker.
    RenameTo {
        dst: Bytes,
        nx: bool,
    },
    /// COPY onto `dst`, on the same worker.
    CopyTo {
        dst: Bytes,
        replace: bool,
    },
    /// Writes a value read elsewhere (the destination of a rename or copy across pairs):
    /// answers 1, or 0 when the key exists and `replace` is false.
    Restore {
        kind: Kind,
        expires_at: u64,
        value: Bytes,
        replace: bool,
    },
    /// Deletes the key if it still holds this version (the source of a rename across
    /// pairs): answers 1 or 0.
    DelIfVersion(u64),
}

impl Action {
    /// Whether the action may write (an `apply` may run any action, a `query` only those
    /// that do not).
    pub fn writes(&self) -> bool {
        use Action::*;
        matches!(
            self,
            Set { .. }
                | SetNx(_)
                | MSetNx(_)
                | Del
                | GetDel
                | GetEx(..)
                | GetSet(_)
                | Append(_)
                | SetRange(..)
                | IncrBy(_)
                | IncrByFloat(_)
                | Expire(..)
                | Persist
                | HSet { .. }
                | HSetNx(..)
                | HDel(_)
                | HIncrBy(..)
                | HIncrByFloat(..)
                | RenameTo { .. }
                | CopyTo { .. }
                | Restore { .. }
                | DelIfVersion(_)
        )
    }

    /// Whether the action answers (everything but the key switch and the guard).
    pub fn answers(&self) -> bool {
        !matches!(self, Action::Key(_) | Action::Watch(..))
    }

    /// Other keys the action touches than the current one.
    pub fn other_keys(&self) -> impl Iterator<Item = &Bytes> {
        // No allocation: a program names its keys once per action, an MGET once per key.
        let (one, pairs): (Option<&Bytes>, &[(Bytes, Bytes)]) = match self {
            Action::Key(k) | Action::RenameTo { dst: k, .. } | Action::CopyTo { dst: k, .. } => {
                (Some(k), &[])
            }
            Action::MSetNx(pairs) => (None, pairs),
            _ => (None, &[]),
        };
        one.into_iter().chain(pairs.iter().map(|(k, _)| k))
    }

    fn code(&self) -> u8 {
        use Action::*;
        match self {
            Key(_) => 1,
            Watch(..) => 2,
            Get => 10,
            StrLen => 11,
            GetRange(..) => 12,
            Exists => 13,
            Touch => 14,
            Type => 15,
            ReadTtl(_) => 16,
            Encoding => 17,
            Version => 18,
            Dump => 19,
            RandomKey => 20,
            Export => 31,
            HGet(_) => 21,
            HMGet(_) => 22,
            HGetAll => 23,
            HKeys => 24,
            HVals => 25,
            HLen => 26,
            HExists(_) => 27,
            HStrLen(_) => 28,
            HRandField { .. } => 29,
            HScan { .. } => 32,
            Set { .. } => 40,
            SetNx(_) => 41,
            MSetNx(_) => 61,
            Del => 42,
            GetDel => 43,
            GetEx(..) => 44,
            GetSet(_) => 45,
            Append(_) => 46,
            SetRange(..) => 47,
            IncrBy(_) => 48,
            IncrByFloat(_) => 49,
            Expire(..) => 50,
            Persist => 51,
            HSet { .. } => 52,
            HSetNx(..) => 53,
            HDel(_) => 54,
            HIncrBy(..) => 55,
            HIncrByFloat(..) => 56,
            RenameTo { .. } => 57,
            CopyTo { .. } => 58,
            Restore { .. } => 59,
            DelIfVersion(_) => 60,
        }
    }

    /// Appends the action's encoding.
    pub fn encode(&self, out: &mut BytesMut) {
        use Action::*;
        out.put_u8(self.code());
        match self {
            Key(b) | HGet(b) | HExists(b) | HStrLen(b) | SetNx(b) | GetSet(b) | Append(b)
            | IncrByFloat(b) => put_bytes(out, b),
            DelIfVersion(v) => out.put_u64(*v),
            Watch(v, live) => {
                out.put_u64(*v);
                out.put_u8(u8::from(*live));
            }
            GetRange(a, b) => {
                out.put_i64(*a);
                out.put_i64(*b);
            }
            ReadTtl(form) => out.put_u8(*form as u8),
            HMGet(list) | HDel(list) => put_list(out, list),
            HRandField { count, with_values } => {
                out.put_u8(u8::from(count.is_some()) | (u8::from(*with_values) << 1));
                out.put_i64(count.unwrap_or(0));
            }
            HScan {
                pattern,
                error,
                cursor,
                count,
            } => {
                out.put_u8(u8::from(pattern.is_some()));
                out.put_u8(*error);
                out.put_u64(*cursor);
                out.put_u64(u64::from(*count));
                put_bytes(out, pattern.as_deref().unwrap_or_default());
            }
            Set {
                value,
                ttl,
                cond,
                get,
            } => {
                put_ttl(out, *ttl);
                out.put_u8(*cond as u8);
                out.put_u8(u8::from(*get));
                put_bytes(out, value);
            }
            GetEx(ttl, error) => {
                put_ttl(out, *ttl);
                out.put_u8(*error);
            }
            SetRange(offset, value) => {
                out.put_u64(*offset);
                put_bytes(out, value);
            }
            IncrBy(n) => out.put_i64(*n),
            Expire(ttl, cond) => {
                put_ttl(out, *ttl);
                out.put_u8(*cond as u8);
            }
            HSet { pairs, ok } => {
                out.put_u8(u8::from(*ok));
                put_pairs(out, pairs);
            }
            MSetNx(pairs) => put_pairs(out, pairs),
            HSetNx(f, v) | HIncrByFloat(f, v) => {
                put_bytes(out, f);
                put_bytes(out, v);
            }
            HIncrBy(f, n) => {
                put_bytes(out, f);
                out.put_i64(*n);
            }
            RenameTo { dst, nx: flag } | CopyTo { dst, replace: flag } => {
                out.put_u8(u8::from(*flag));
                put_bytes(out, dst);
            }
            Restore {
                kind,
                expires_at,
                value,
                replace,
            } => {
                out.put_u8(*kind as u8);
                out.put_u64(*expires_at);
                out.put_u8(u8::from(*replace));
                put_bytes(out, value);
            }
            Get | StrLen | Exists | Touch | Type | Encoding | Version | Dump | RandomKey
            | Export | HGetAll | HKeys | HVals | HLen | Del | GetDel | Persist => {}
        }
    }
}

/// Encodes a whole program.
pub fn encode_program(actions: &[Action]) -> Bytes {
    let mut out = BytesMut::new();
    for a in actions {
        a.encode(&mut out);
    }
    out.freeze()
}

/// The program `each`, then `Key(k)` and `each` for each `k` of `rest`, where `each` is an
/// action of one key with no arguments (`Get`, `Exists`, `Touch`): what [`encode_program`]
/// makes of those actions, written straight into one buffer sized for them (a key action
/// is its code, a length and the key), where building the list of actions first and
/// growing the buffer cost more than the writing; an MGET sends one per pair per 32 keys.
pub fn encode_each<'k>(each: &Action, rest: impl Iterator<Item = &'k Bytes> + Clone) -> Bytes {
    debug_assert!(matches!(each, Action::Get | Action::Exists | Action::Touch));
    let len = 1 + rest.clone().map(|k| 1 + 4 + k.len() + 1).sum::<usize>();
    // `Action::Key(k.clone()).encode` then `each.encode` (a code alone) for each key, with
    // the codes looked up once and no reference count taken and dropped per key; into a
    // `Vec` with its room made, whose puts are plain extends (a `BytesMut`'s check for room
    // and call a copy each: 170 instructions a key through them).
    let (key, each) = (Action::Key(Bytes::new()).code(), each.code());
    let mut out = Vec::with_capacity(len);
    out.push(each);
    for k in rest {
        out.push(key);
        put_bytes(&mut out, k);
        out.push(each);
    }
    Bytes::from(out)
}

/// Why bytes are not a program (or an answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed program: {0}")]
pub struct Malformed(pub &'static str);

/// Decodes a whole program. The bytes come from the network: every length is checked
/// against what is left before anything is reserved.
pub fn decode_program(mut buf: Bytes) -> Result<Vec<Action>, Malformed> {
    // Sized at once for a program of keys and GETs (MGET's, a key and a GET in eight bytes
    // or more), where growing it would copy it eight times; bounded, since the bytes come
    // from the network.
    let mut actions = Vec::with_capacity((buf.len() / 8).clamp(1, 256));
    while buf.has_remaining() {
        actions.push(decode_action(&mut buf)?);
    }
    Ok(actions)
}

fn decode_action(buf: &mut Bytes) -> Result<Action, Malformed> {
    use Action::*;
    let code = get_u8(buf)?;
    Ok(match code {
        1 => Key(get_bytes(buf)?),
        2 => Watch(get_u64(buf)?, get_u8(buf)? != 0),
        10 => Get,
        11 => StrLen,
        12 => GetRange(get_u64(buf)? as i64, get_u64(buf)? as i64),
        13 => Exists,
        14 => Touch,
        15 => Type,
        16 => ReadTtl(match get_u8(buf)? {
            0 => TtlForm::Seconds,
            1 => TtlForm::Millis,
            2 => TtlForm::AtSeconds,
            3 => TtlForm::AtMillis,
            _ => return Err(Malformed("ttl form")),
        }),
        17 => Encoding,
        18 => Version,
        19 => Dump,
        20 => RandomKey,
        31 => Export,
        21 => HGet(get_bytes(buf)?),
        22 => HMGet(get_list(buf)?),
        23 => HGetAll,
        24 => HKeys,
        25 => HVals,
        26 => HLen,
        27 => HExists(get_bytes(buf)?),
        28 => HStrLen(get_bytes(buf)?),
        29 => {
            let bits = get_u8(buf)?;
            let n = get_u64(buf)? as i64;
            HRandField {
                count: (bits & 1 != 0).then_some(n),
                with_values: bits & 2 != 0,
            }
        }
        30 | 32 => {
            let some = get_u8(buf)? != 0;
            let error = get_u8(buf)?;
            let (cursor, count) = match code {
                30 => (0, u32::MAX),
                _ => (get_u64(buf)?, get_u64(buf)?.min(u64::from(u32::MAX)) as u32),
            };
            let pattern = get_bytes(buf)?;
            HScan {
                pattern: some.then_some(pattern),
                error,
                cursor,
                count,
            }
        }
        40 => {
            let ttl = get_ttl(buf)?;
            let cond = match get_u8(buf)? {
                0 => SetIf::Always,
                1 => SetIf::Nx,
                2 => SetIf::Xx,
                _ => return Err(Malformed("set condition")),
            };
            let get = get_u8(buf)? != 0;
            Set {
                value: get_bytes(buf)?,
                ttl,
                cond,
                get,
            }
        }
        41 => SetNx(get_bytes(buf)?),
        42 => Del,
        43 => GetDel,
        44 => GetEx(get_ttl(buf)?, get_u8(buf)?),
        45 => GetSet(get_bytes(buf)?),
        46 => Append(get_bytes(buf)?),
        47 => SetRange(get_u64(buf)?, get_bytes(buf)?),
        48 => IncrBy(get_u64(buf)? as i64),
        49 => IncrByFloat(get_bytes(buf)?),
        50 => {
            let ttl = get_ttl(buf)?;
            let cond = match get_u8(buf)? {
                0 => ExpireIf::Always,
                1 => ExpireIf::Nx,
                2 => ExpireIf::Xx,
                3 => ExpireIf::Gt,
                4 => ExpireIf::Lt,
                5 => ExpireIf::XxLt,
                _ => return Err(Malformed("expire condition")),
            };
            Expire(ttl, cond)
        }
        51 => Persist,
        52 => {
            let ok = get_u8(buf)? != 0;
            HSet {
                pairs: get_pairs(buf)?,
                ok,
            }
        }
        61 => MSetNx(get_pairs(buf)?),
        53 => HSetNx(get_bytes(buf)?, get_bytes(buf)?),
        54 => HDel(get_list(buf)?),
        55 => HIncrBy(get_bytes(buf)?, get_u64(buf)? as i64),
        56 => HIncrByFloat(get_bytes(buf)?, get_bytes(buf)?),
        57 | 58 => {
            let flag = get_u8(buf)? != 0;
            let dst = get_bytes(buf)?;
            if code == 57 {
                RenameTo { dst, nx: flag }
            } else {
                CopyTo { dst, replace: flag }
            }
        }
        59 => {
            let kind = Kind::from_u8(get_u8(buf)?).ok_or(Malformed("kind"))?;
            let expires_at = get_u64(buf)?;
            let replace = get_u8(buf)? != 0;
            Restore {
                kind,
                expires_at,
                value: get_bytes(buf)?,
                replace,
            }
        }
        60 => DelIfVersion(get_u64(buf)?),
        _ => return Err(Malformed("unknown action")),
    })
}

fn put_bytes(out: &mut impl BufMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

fn put_list(out: &mut BytesMut, list: &[Bytes]) {
    out.put_u32(list.len() as u32);
    for b in list {
        put_bytes(out, b);
    }
}

fn put_pairs(out: &mut BytesMut, pairs: &[(Bytes, Bytes)]) {
    out.put_u32(pairs.len() as u32);
    for (a, b) in pairs {
        put_bytes(out, a);
        put_bytes(out, b);
    }
}

fn get_pairs(buf: &mut Bytes) -> Result<Vec<(Bytes, Bytes)>, Malformed> {
    let n = get_count(buf, 8)?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        pairs.push((get_bytes(buf)?, get_bytes(buf)?));
    }
    Ok(pairs)
}

fn put_ttl(out: &mut BytesMut, ttl: Ttl) {
    let (tag, n) = match ttl {
        Ttl::Keep => (0, 0),
        Ttl::Clear => (1, 0),
        Ttl::In(ms) => (2, ms),
        Ttl::At(ms) => (3, ms),
    };
    out.put_u8(tag);
    out.put_i64(n);
}

fn get_u8(buf: &mut Bytes) -> Result<u8, Malformed> {
    buf.try_get_u8().map_err(|_| Malformed("cut short"))
}

fn get_u64(buf: &mut Bytes) -> Result<u64, Malformed> {
    buf.try_get_u64().map_err(|_| Malformed("cut short"))
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, Malformed> {
    let n = buf.try_get_u32().map_err(|_| Malformed("cut short"))? as usize;
    if n > buf.remaining() {
        return Err(Malformed("length past the end"));
    }
    Ok(buf.split_to(n))
}

/// A count of items of at least `min` bytes each, checked against what is left.
fn get_count(buf: &mut Bytes, min: usize) -> Result<usize, Malformed> {
    let n = buf.try_get_u32().map_err(|_| Malformed("cut short"))? as usize;
    if n.saturating_mul(min) > buf.remaining() {
        return Err(Malformed("count past the end"));
    }
    Ok(n)
}

fn get_list(buf: &mut Bytes) -> Result<Vec<Bytes>, Malformed> {
    let n = get_count(buf, 4)?;
    (0..n).map(|_| get_bytes(buf)).collect()
}

fn get_ttl(buf: &mut Bytes) -> Result<Ttl, Malformed> {
    let tag = get_u8(buf)?;
    let n = get_u64(buf)? as i64;
    Ok(match tag {
        0 => Ttl::Keep,
        1 => Ttl::Clear,
        2 => Ttl::In(n),
        3 => Ttl::At(n),
        _ => return Err(Malformed("ttl")),
    })
}

/// One key's new state, for the partner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Bytes,
    /// A [`Kind`] as `u8`, or [`DELETED`].
    pub kind: u8,
    /// Unix milliseconds; 0 for none.
    pub expires_at: u64,
    pub value: Bytes,
}

impl Change {
    /// Whether the value is in the worker's stored form ([`STORED`]).
    pub fn is_stored(&self) -> bool {
        self.kind != DELETED && self.kind & STORED != 0
    }

    /// Whether the value is an edit of the partner's entry ([`PATCH`]).
    pub fn is_patch(&self) -> bool {
        self.is_stored() && self.kind & PATCH != 0
    }

    /// The type of the new value; `None` for a delete.
    pub fn value_kind(&self) -> Option<Kind> {
        Kind::from_u8(self.kind & !(STORED | PATCH)).filter(|_| self.kind != DELETED)
    }

    pub fn encode(&self, out: &mut BytesMut) {
        put_bytes(out, &self.key);
        out.put_u8(self.kind);
        out.put_u64(self.expires_at);
        put_bytes(out, &self.value);
    }
}

/// Decodes a changes block (the value of a `replicate`).
pub fn decode_changes(mut buf: Bytes) -> Result<Vec<Change>, Malformed> {
    let mut out = Vec::new();
    while buf.has_remaining() {
        let key = get_bytes(&mut buf)?;
        let kind = get_u8(&mut buf)?;
        if kind != DELETED && Kind::from_u8(kind & !(STORED | PATCH)).is_none() {
            return Err(Malformed("kind"));
        }
        let expires_at = get_u64(&mut buf)?;
        let value = get_bytes(&mut buf)?;
        out.push(Change {
            key,
            kind,
            expires_at,
            value,
        });
    }
    Ok(out)
}

/// A worker's answer to a program, split into its parts (zero-copy slices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub aborted: bool,
    /// The changes block, to forward to the partner as is (empty: nothing changed).
    pub changes: Bytes,
    /// The replies, in the RESP version the request asked for, one after the other.
    pub replies: Bytes,
    /// The version the changes were written at, when the worker chose it (0: the
    /// request's, which whoever sent the program fills in).
    pub version: u64,
    /// The changes' bases as a block ([`BASED`]), when asked for; empty otherwise.
    pub bases: Bytes,
}

impl Answer {
    /// Splits a worker's answer payload.
    pub fn parse(mut payload: Bytes) -> Result<Answer, Malformed> {
        let flags = get_u8(&mut payload)?;
        let version = if flags & BUMPED != 0 {
            get_u64(&mut payload)?
        } else {
            0
        };
        let bases = if flags & BASED != 0 {
            payload.split_to(bases_block_len(&payload)?)
        } else {
            Bytes::new()
        };
        let changes = get_bytes(&mut payload)?;
        Ok(Answer {
            aborted: flags & ABORTED != 0,
            changes,
            replies: payload,
            version,
            bases,
        })
    }

    /// Builds an answer payload; `bumped` is the version the worker chose, if it did;
    /// `bases`, the changes' bases when they were asked for.
    pub fn encode(
        aborted: bool,
        bumped: Option<u64>,
        bases: Option<&[u64]>,
        changes: &[u8],
        replies: &[u8],
    ) -> Bytes {
        let based = bases.map_or(0, |b| 4 + 8 * b.len());
        let mut out = BytesMut::with_capacity(13 + based + changes.len() + replies.len());
        let flags = if aborted { ABORTED } else { 0 }
            | if bumped.is_some() { BUMPED } else { 0 }
            | if bases.is_some() { BASED } else { 0 };
        out.put_u8(flags);
        if let Some(v) = bumped {
            out.put_u64(v);
        }
        if let Some(bases) = bases {
            put_bases(&mut out, bases);
        }
        put_bytes(&mut out, changes);
        out.put_slice(replies);
        out.freeze()
    }
}

/// Appends a block of bases: `count:u32 (base:u64)*`.
pub fn put_bases(out: &mut BytesMut, bases: &[u64]) {
    out.put_u32(bases.len() as u32);
    for &b in bases {
        out.put_u64(b);
    }
}

/// The length of the block of bases `buf` starts with (`count:u32 (base:u64)*`).
fn bases_block_len(buf: &[u8]) -> Result<usize, Malformed> {
    buf.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .and_then(|count| count.checked_mul(8)?.checked_add(4))
        .filter(|&len| len <= buf.len())
        .ok_or(Malformed("bases cut short"))
}

/// The bases of a block (the key of a `replicate` sent with `flags::BASES`), which must be
/// the whole of it.
pub fn decode_bases(block: &[u8]) -> Result<Vec<u64>, Malformed> {
    if bases_block_len(block)? != block.len() {
        return Err(Malformed("bytes after the bases"));
    }
    let mut rest = &block[4..];
    Ok(std::iter::from_fn(|| rest.has_remaining().then(|| rest.get_u64())).collect())
}

/// One step of a key-space walk on a worker (the value of a `scan` frame).
///
/// ```text
/// scan   = cursor:u64 count:u32 kind:u8 (255: any) has_pattern:u8 pattern_len:u32 pattern
/// answer = next_cursor:u64 (key_len:u32 key)*       (next_cursor 0: the walk is done)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRequest {
    pub cursor: u64,
    /// About how many keys to look at.
    pub count: u32,
    /// Only keys of this type.
    pub kind: Option<Kind>,
    pub pattern: Option<Bytes>,
}

impl ScanRequest {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(18 + self.pattern.as_ref().map_or(0, |p| p.len()));
        out.put_u64(self.cursor);
        out.put_u32(self.count);
        out.put_u8(self.kind.map_or(255, |k| k as u8));
        out.put_u8(u8::from(self.pattern.is_some()));
        put_bytes(&mut out, self.pattern.as_deref().unwrap_or_default());
        out.freeze()
    }

    pub fn decode(mut buf: Bytes) -> Result<ScanRequest, Malformed> {
        let cursor = get_u64(&mut buf)?;
        let count = buf.try_get_u32().map_err(|_| Malformed("cut short"))?;
        let kind = match get_u8(&mut buf)? {
            255 => None,
            k => Some(Kind::from_u8(k).ok_or(Malformed("kind"))?),
        };
        let has = get_u8(&mut buf)? != 0;
        let pattern = get_bytes(&mut buf)?;
        Ok(ScanRequest {
            cursor,
            count,
            kind,
            pattern: has.then_some(pattern),
        })
    }
}

/// Decodes a scan answer: the next cursor and the keys.
pub fn decode_scan_answer(mut buf: Bytes) -> Result<(u64, Vec<Bytes>), Malformed> {
    let cursor = get_u64(&mut buf)?;
    let mut keys = Vec::new();
    while buf.has_remaining() {
        keys.push(get_bytes(&mut buf)?);
    }
    Ok((cursor, keys))
}

/// Appends one key to a scan answer.
pub fn put_scan_key(out: &mut BytesMut, key: &[u8]) {
    put_bytes(out, key);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encode_each_writes_what_encode_program_writes() {
        for each in [Action::Get, Action::Exists, Action::Touch] {
            for keys in [
                vec![],
                vec![&b"a"[..]],
                vec![&b"k1"[..], b"", b"key:000000012345"],
            ] {
                let mut program = vec![each.clone()];
                for k in &keys {
                    program.push(Action::Key(Bytes::copy_from_slice(k)));
                    program.push(each.clone());
                }
                let keys: Vec<Bytes> = keys.into_iter().map(Bytes::copy_from_slice).collect();
                let direct = encode_each(&each, keys.iter());
                assert_eq!(direct, encode_program(&program));
                assert_eq!(
                    direct.len(),
                    1 + keys.iter().map(|k| k.len() + 6).sum::<usize>()
                );
            }
        }
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn every_action() -> Vec<Action> {
        use Action::*;
        vec![
            Key(b("k")),
            Watch(u64::MAX, true),
            MSetNx(vec![(b("a"), b("1"))]),
            Get,
            StrLen,
            GetRange(-5, i64::MAX),
            Exists,
            Touch,
            Type,
            ReadTtl(TtlForm::AtMillis),
            Encoding,
            Version,
            Dump,
            RandomKey,
            Export,
            HGet(b("f")),
            HMGet(vec![b("a"), b("")]),
            HGetAll,
            HKeys,
            HVals,
            HLen,
            HExists(b("f")),
            HStrLen(b("f")),
            HRandField {
                count: Some(-3),
                with_values: true,
            },
            HRandField {
                count: None,
                with_values: false,
            },
            HScan {
                pattern: Some(b("a*")),
                error: 0,
                cursor: 1 << 32,
                count: 10,
            },
            HScan {
                pattern: None,
                error: 2,
                cursor: 0,
                count: u32::MAX,
            },
            Set {
                value: b("v"),
                ttl: super::Ttl::In(-1),
                cond: SetIf::Xx,
                get: true,
            },
            SetNx(b("v")),
            Del,
            GetDel,
            GetEx(super::Ttl::At(i64::MIN), 2),
            GetSet(b("v")),
            Append(b("")),
            SetRange(u64::MAX, b("x")),
            IncrBy(i64::MIN),
            IncrByFloat(b("1.5")),
            Expire(super::Ttl::In(1000), ExpireIf::Lt),
            Persist,
            HSet {
                pairs: vec![(b("f"), b("v")), (b(""), b(""))],
                ok: true,
            },
            HSetNx(b("f"), b("v")),
            HDel(vec![b("f")]),
            HIncrBy(b("f"), -1),
            HIncrByFloat(b("f"), b("-1e3")),
            RenameTo {
                dst: b("d"),
                nx: true,
            },
            CopyTo {
                dst: b("d"),
                replace: false,
            },
            Restore {
                kind: Kind::Hash,
                expires_at: 77,
                value: b("x"),
                replace: true,
            },
            DelIfVersion(9),
        ]
    }

    #[test]
    fn every_action_round_trips() {
        let actions = every_action();
        let bytes = encode_program(&actions);
        assert_eq!(decode_program(bytes.clone()).unwrap(), actions);
        // Cut anywhere, it is malformed, never a panic or a different program.
        for cut in 0..bytes.len() {
            if let Ok(p) = decode_program(bytes.slice(..cut)) {
                assert!(p.len() < actions.len());
            }
        }
    }

    #[test]
    fn answers_and_changes_round_trip() {
        let change = Change {
            key: b("k"),
            kind: DELETED,
            expires_at: 5,
            value: Bytes::new(),
        };
        let mut changes = BytesMut::new();
        change.encode(&mut changes);
        let payload = Answer::encode(false, None, None, &changes, b":1\r\n");
        let answer = Answer::parse(payload).unwrap();
        assert!(!answer.aborted);
        assert_eq!(answer.version, 0);
        assert_eq!(
            decode_changes(answer.changes).unwrap(),
            vec![change.clone()]
        );
        assert_eq!(&answer.replies[..], b":1\r\n");
        let payload = Answer::encode(false, Some(77), None, &changes, b":2\r\n");
        let answer = Answer::parse(payload).unwrap();
        assert_eq!(answer.version, 77);
        assert_eq!(
            decode_changes(answer.changes.clone()).unwrap(),
            vec![change]
        );
        assert_eq!(&answer.replies[..], b":2\r\n");
        assert!(answer.bases.is_empty());
        // With bases: the block goes to the partner as it came.
        let payload = Answer::encode(false, Some(77), Some(&[3, 9]), &changes, b":2\r\n");
        let based = Answer::parse(payload).unwrap();
        assert_eq!((based.version, &based.replies[..]), (77, &b":2\r\n"[..]));
        assert_eq!(based.changes, answer.changes);
        assert_eq!(decode_bases(&based.bases).unwrap(), vec![3, 9]);
        assert!(decode_bases(&[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(decode_bases(&[&based.bases[..], &[0]].concat()).is_err());
        assert_eq!(decode_bases(&[0, 0, 0, 0]).unwrap(), Vec::<u64>::new());
        let scan = ScanRequest {
            cursor: 42,
            count: 10,
            kind: Some(Kind::Hash),
            pattern: Some(b("user:*")),
        };
        assert_eq!(ScanRequest::decode(scan.encode()).unwrap(), scan);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..256)) {
            let input = Bytes::from(input);
            let _ = decode_program(input.clone());
            let _ = decode_changes(input.clone());
            let _ = Answer::parse(input.clone());
            let _ = decode_bases(&input);
            let _ = ScanRequest::decode(input.clone());
            let _ = decode_scan_answer(input);
        }
    }
}
