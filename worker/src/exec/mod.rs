//! Running programs (`apply`, `query`): the Redis commands that read a key to answer or to
//! write it, executed where the data is.
//!
//! ## Read-modify-write on a pair
//! An `apply` goes to one worker of the pair, its *primary* (worker 0 when it holds the
//! pair's data, else worker 1: the orchestrator's `Router::apply`). The primary runs the
//! program with its keys' shards locked ([`crate::store::Txn`]), so programs on a key run
//! one after the other whatever orchestrator sent them, and commits the new values at the
//! request's version. Its answer carries them (the *changes*), which the orchestrator sends
//! the partner as a `replicate`: the partner stores each at that version unless it holds a
//! newer one, so both converge on "newest version wins" in whatever order writes arrive. A
//! partner that misses the copy is recorded as having missed a write, as for a SET.
//!
//! Two rules keep that sound:
//! - **Versions only grow.** A program whose version is not newer than what a touched key
//!   holds arrived behind a newer write: with [`flags::BUMP`] it is written at the next
//!   counter after that version (`version::bump`; the answer says which), else, or when no
//!   counter is left before the next stamp, it is refused (`NotApplied` with that version)
//!   and the orchestrator moves its clock past it and retries. So the primary's later write
//!   always wins on the partner too.
//! - **Only a worker holding the pair's data applies.** An `apply` carries
//!   [`flags::IN_SYNC`]; a worker that has not resynced since it started refuses it. Which
//!   of two in-sync workers applies is the orchestrators' choice: the one synced the
//!   longest (it reports since when in `status`), so that a worker back from a refill never
//!   takes the role over while programs are in flight on its partner, where both would
//!   compute from the same old value.
//! - **A new primary waits for the old one's last copies.** When the primary fails, its
//!   partner takes over; copies of programs the old primary answered may still be on their
//!   way to it from other orchestrators, and a program applied before one lands would
//!   compute from a value without it, and win by version. So a worker refuses programs
//!   (`Unavailable`, which clients retry) until the worker timeout of the orchestrators
//!   that sent it copies has passed since the last one: after that an orchestrator has given
//!   up on any copy still unsent, and not acknowledged its program. Read-modify-writes on a
//!   pair pause for about one `--worker-timeout` after its primary fails.
//!
//! Replies are encoded here, in the RESP version the client speaks ([`flags::RESP3`]), and
//! pass through the orchestrator as they are.
//!
//! Layout: [`strings`], [`hashes`], [`keys`] (type, expiry, rename, copy), [`float`]
//! (INCRBYFLOAT's long double), [`codec`] (a hash's stored form).

pub(crate) mod codec;
mod float;
mod hashes;
mod keys;
mod strings;

use bytes::{Bytes, BytesMut};
use twincache_protocol::cluster_map::Holding;
use twincache_protocol::frame::{flags, Request, Response};
use twincache_protocol::program::{decode_program, Action, Answer, Kind};
use twincache_protocol::resp::{Reply, Version};
use twincache_protocol::Status;

use crate::seal::{segments, SealError};
use crate::store::{Edit, Form, Meta, NotTaken, PartnerCopy, Store, Txn};
use crate::sync::SyncState;

/// Redis' `proto-max-bulk-len`: no string or hash grows past it.
pub const MAX_VALUE: usize = 512 << 20;

pub(crate) const WRONGTYPE: &str =
    "WRONGTYPE Operation against a key holding the wrong kind of value";
pub(crate) const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub(crate) const OVERFLOW: &str = "ERR increment or decrement would overflow";
pub(crate) const NOT_FLOAT: &str = "ERR value is not a valid float";
pub(crate) const NAN_OR_INF: &str = "ERR increment would produce NaN or Infinity";
pub(crate) const TOO_BIG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

/// Runs the program of an `apply` (`writes`) or a `query`; with `holding` (the worker keeps
/// a cluster map), refused whole with `Moved` before anything runs if any key it names is in
/// a slot this worker's pair does not hold.
pub fn run(
    store: &Store,
    sync: &SyncState,
    req: &Request,
    writes: bool,
    holding: Option<&Holding>,
) -> Response {
    if req.flags & flags::IN_SYNC != 0 && !sync.synced() {
        return Response::error(Status::Unavailable, "this worker has not resynced yet");
    }
    if writes && sync.partner_may_be_applying() {
        return Response::error(
            Status::Unavailable,
            "this worker's partner applied programs until a moment ago; retry",
        );
    }
    let program = match decode_program(req.value.clone()) {
        Ok(p) => p,
        Err(e) => return Response::error(Status::ParseError, e.0),
    };
    if !writes && program.iter().any(Action::writes) {
        return Response::error(Status::ParseError, "a query cannot write");
    }
    if let Some(h) = holding {
        if !crate::map::program_admitted(h, &req.key, &program) {
            return crate::map::moved(h.epoch());
        }
    }
    let version = if req.flags & flags::RESP3 != 0 {
        Version::Resp3
    } else {
        Version::Resp2
    };
    if let [Action::Export] = program.as_slice() {
        let mut changes = BytesMut::new();
        return match store.txn([&req.key[..]]).export(&req.key, &mut changes) {
            Ok(version) => Response::ok(Answer::encode(
                false,
                (version != 0).then_some(version),
                None,
                &changes,
                &[],
            )),
            Err(e) => crate::server::corrupt(e),
        };
    }
    let mut replies = BytesMut::new();
    if let [Action::RandomKey] = program.as_slice() {
        match store.random_key() {
            Some(k) => Reply::Bulk(k),
            None => Reply::Nil,
        }
        .encode_as(version, &mut replies);
        return Response::ok(Answer::encode(false, None, None, &[], &replies));
    }
    // The largest value a write may leave, or the most a query's replies may take: what
    // the orchestrator can carry (from its frame limit, in `ttl_ms`), and never past Redis'
    // own.
    let max_value = match req.ttl_ms {
        0 => MAX_VALUE,
        n => usize::try_from(n).unwrap_or(MAX_VALUE).min(MAX_VALUE),
    };
    let keys = std::iter::once(&req.key[..])
        .chain(program.iter().flat_map(Action::other_keys).map(|k| &k[..]));
    let mut txn = store.txn(keys);
    // Room for a short reply per action at once (a 100-byte value's takes 107 bytes, for
    // two actions), rather than a doubling every few keys; at most 1 MiB ahead of the
    // replies themselves, whatever the program's length.
    replies.reserve(program.len().saturating_mul(64).min(max_value).min(1 << 20));
    let mut key = &req.key;
    for action in &program {
        match action {
            Action::Key(k) => key = k,
            Action::Watch(v, live) => {
                if txn.changed_since(key, *v, *live) {
                    return Response::ok(Answer::encode(true, None, None, &[], &[]));
                }
            }
            // MGET's one action per key, written from the value where it lies.
            Action::Get => strings::get_into(&mut txn, key, version, &mut replies),
            action => {
                let mut cx = Cx {
                    txn: &mut txn,
                    key,
                    max_value,
                    version,
                };
                let reply = cx.run(action).unwrap_or_else(|err| err);
                reply.encode_as(version, &mut replies);
            }
        }
        if !writes && replies.len() > max_value {
            // A frame could not carry them.
            return Response::error(Status::TooLarge, "replies too large for one answer");
        }
    }
    let mut changes = BytesMut::new();
    let mut bases = Vec::new();
    let based = req.flags & flags::BASES != 0;
    let alone = req.flags & flags::SOLO != 0;
    let copy = PartnerCopy {
        changes: &mut changes,
        bases: based.then_some(&mut bases),
    };
    match txn.commit(req.version, req.flags & flags::BUMP != 0, copy, alone) {
        Ok((n, written)) => {
            if n > 0 && alone {
                sync.took_alone();
            }
            let bumped = (written != req.version).then_some(written);
            let bases = based.then_some(&bases[..]);
            Response::ok(Answer::encode(false, bumped, bases, &changes, &replies))
        }
        Err(newer) => Response {
            id: 0,
            status: Status::NotApplied,
            payload: Bytes::copy_from_slice(&newer.to_be_bytes()),
        },
    }
}

/// Stores a primary's changes on its partner (`replicate`), each at `req.version` unless the
/// key holds a newer version (the request's `ttl_ms` is the sender's worker timeout: see
/// the module docs). Answers how many were taken. With `holding`, refused whole with `Moved`
/// if any key is in a slot this worker's pair does not hold.
pub fn replicate(
    store: &Store,
    sync: &SyncState,
    req: &Request,
    holding: Option<&Holding>,
) -> Response {
    sync.partner_applied(req.ttl_ms);
    // With `flags::BASES` the key holds the bases (the changes are the value, as always).
    let bases = match (req.flags & flags::BASES != 0)
        .then(|| twincache_protocol::program::decode_bases(&req.key))
        .transpose()
    {
        Ok(bases) => bases,
        Err(e) => return Response::error(Status::ParseError, e.0),
    };
    let changes = match twincache_protocol::program::decode_changes(req.value.clone()) {
        Ok(c) => c,
        Err(e) => return Response::error(Status::ParseError, e.0),
    };
    if bases.as_ref().is_some_and(|b| b.len() != changes.len()) {
        return Response::error(
            Status::ParseError,
            "the bases of a replicate do not match its changes in number",
        );
    }
    if let Some(h) = holding {
        if !crate::map::changes_admitted(h, &changes) {
            return crate::map::moved(h.epoch());
        }
    }
    match store.replicate(&changes, req.version, bases.as_deref()) {
        Ok(taken) => Response::ok(Bytes::from(taken.to_string())),
        Err(e) => Response {
            id: 0,
            status: match e {
                NotTaken::TooLarge(_) => Status::TooLarge,
                NotTaken::Malformed(_) => Status::ParseError,
                NotTaken::Behind => Status::NotApplied,
                NotTaken::Diverged => {
                    // Its keys are marked here now: the primary lacks them until it refills,
                    // which every orchestrator reads from this count (and a refill whose
                    // snapshot came before is done again).
                    sync.took_alone();
                    Status::Diverged
                }
            },
            payload: Bytes::from(e.to_string()),
        },
    }
}

/// A string as a program holds it.
pub(crate) enum Str {
    Whole(Bytes),
    /// A long string in segments (`seal::segments`), of this length, left unopened.
    Segments(usize),
}

impl Str {
    pub fn len(&self) -> usize {
        match self {
            Str::Whole(value) => value.len(),
            Str::Segments(len) => *len,
        }
    }
}

/// One action's context: the program's hold on its keys, the current key, the limits.
pub(crate) struct Cx<'t, 'a> {
    pub txn: &'t mut Txn<'a>,
    pub key: &'t Bytes,
    pub max_value: usize,
    pub version: Version,
}

/// An action's outcome: its reply, or an error reply (which stops that action only).
pub(crate) type Outcome = Result<Reply, Reply>;

impl Cx<'_, '_> {
    fn run(&mut self, action: &Action) -> Outcome {
        use Action::*;
        match action {
            Get
            | StrLen
            | GetRange(..)
            | Set { .. }
            | SetNx(_)
            | MSetNx(_)
            | GetDel
            | GetEx(..)
            | GetSet(_)
            | Append(_)
            | SetRange(..)
            | IncrBy(_)
            | IncrByFloat(_) => strings::run(self, action),
            HGet(_)
            | HMGet(_)
            | HGetAll
            | HKeys
            | HVals
            | HLen
            | HExists(_)
            | HStrLen(_)
            | HRandField { .. }
            | HScan { .. }
            | HSet { .. }
            | HSetNx(..)
            | HDel(_)
            | HIncrBy(..)
            | HIncrByFloat(..) => hashes::run(self, action),
            Exists
            | Touch
            | Type
            | ReadTtl(_)
            | Encoding
            | Version
            | Dump
            | Del
            | Expire(..)
            | Persist
            | RenameTo { .. }
            | CopyTo { .. }
            | Restore { .. }
            | DelIfVersion(_) => keys::run(self, action),
            RandomKey => Err(Reply::err("ERR RANDOMKEY runs alone")),
            Export => Err(Reply::err("ERR EXPORT runs alone")),
            Key(_) | Watch(..) => Ok(Reply::Nil),
        }
    }

    /// What the current key holds, with its value.
    pub fn read(&mut self) -> Result<Option<(Meta, Bytes)>, Reply> {
        self.read_key(&self.key.clone())
    }

    pub fn read_key(&mut self, key: &Bytes) -> Result<Option<(Meta, Bytes)>, Reply> {
        self.txn.read(key).map_err(corrupt)
    }

    /// What the current key holds, in the form it is held (see [`Form`]): for a write that
    /// keeps the value as it is, such as a new expiry.
    pub fn read_form(&mut self) -> Result<Option<(Meta, Form)>, Reply> {
        self.txn.read_form(self.key).map_err(corrupt)
    }

    /// Stages the current key's value in the form it was read (its size is unchanged).
    pub fn put_form(&mut self, kind: Kind, expires_at: u64, form: Form) {
        let key = self.key.clone();
        self.txn.put_form(&key, kind, expires_at, form);
    }

    /// The current key's string, if it holds one, opened whole; WRONGTYPE if it holds
    /// another type.
    pub fn string(&mut self) -> Result<Option<(Meta, Bytes)>, Reply> {
        Ok(match self.string_form()? {
            None => None,
            Some((meta, Str::Whole(value))) => Some((meta, value)),
            Some((_, Str::Segments(_))) => self.read()?,
        })
    }

    /// The current key's string as it is held (a long one's segments left unopened), if
    /// it holds one; WRONGTYPE if it holds another type.
    pub fn string_form(&mut self) -> Result<Option<(Meta, Str)>, Reply> {
        // One lookup, which leaves a large hash's records unopened.
        match self.read_form()? {
            None => Ok(None),
            Some((meta, _)) if meta.kind != Kind::String => Err(Reply::err(WRONGTYPE)),
            Some((meta, Form::Value(value))) => Ok(Some((meta, Str::Whole(value)))),
            Some((meta, _)) => {
                let len = segments::len(self.records()?);
                let len = len.ok_or_else(|| corrupt(SealError::Corrupt))?;
                Ok(Some((meta, Str::Segments(len))))
            }
        }
    }

    /// Stages `value` as the current key's string: in segments from their threshold (it was
    /// written by APPEND or SETRANGE, which may write it again), else whole (also when the
    /// segments would not fit the frame that copies them to the partner, and the whole
    /// string would: just under the size limit).
    pub fn put_string(&mut self, expires_at: u64, value: Bytes) -> Result<(), Reply> {
        if segments::wanted(value.len()) {
            let mut stored = Vec::new();
            segments::build(self.key, &value, self.txn.sealer().cipher, &mut stored);
            if stored.len() <= self.max_value {
                let stored = Bytes::from(stored);
                self.put_form(Kind::String, expires_at, Form::Records { stored });
                return Ok(());
            }
        }
        self.put(Kind::String, expires_at, value)
    }

    /// `value` as a program's plaintext: with a key, wiped when its last reference goes
    /// (see `seal`).
    pub fn plaintext(&self, value: Vec<u8>) -> Bytes {
        crate::seal::owned_secret(value, self.txn.sealer().cipher.is_some())
    }

    /// The current key's records form (a large hash's, a long string's), borrowed.
    pub fn records(&mut self) -> Result<&[u8], Reply> {
        self.txn
            .records(self.key)
            .map_err(corrupt)?
            .ok_or_else(|| corrupt(SealError::Corrupt))
    }

    /// Stages the current key's records as `plan` changes them.
    pub fn put_planned(&mut self, kind: Kind, expires_at: u64, plan: Edit) -> Result<(), Reply> {
        // The partner may be sent the new form whole: a frame must carry it.
        if plan.stored_len().max(plan.value_len()) > self.max_value {
            return Err(Reply::err(TOO_BIG));
        }
        self.txn
            .put_planned(self.key, kind, expires_at, plan)
            .map_err(corrupt)
    }

    /// Stages a new value for the current key, checked against the size limit.
    pub fn put(&mut self, kind: Kind, expires_at: u64, value: Bytes) -> Result<(), Reply> {
        if value.len() > self.max_value {
            return Err(Reply::err(TOO_BIG));
        }
        let key = self.key.clone();
        self.txn.put(&key, kind, expires_at, value);
        Ok(())
    }

    pub fn delete(&mut self) {
        let key = self.key.clone();
        self.txn.delete(&key);
    }

    /// The program's clock, in Unix ms.
    pub fn now(&self) -> u64 {
        self.txn.now
    }

    pub fn resp3(&self) -> bool {
        self.version == Version::Resp3
    }
}

/// The reply to a stored value that does not open (logged: it means corruption or a key
/// mismatch between partners).
pub(crate) fn corrupt(e: crate::seal::SealError) -> Reply {
    tracing::error!(error = %e, "stored value cannot be opened");
    Reply::err("ERR stored value is corrupt")
}

/// Redis' integer syntax (see [`string2ll`]).
pub(crate) use twincache_protocol::resp::string2ll as parse_i64;

/// `value + incr` unless it overflows, as INCRBY and HINCRBY check it.
pub(crate) fn add_checked(value: i64, incr: i64) -> Result<i64, Reply> {
    value.checked_add(incr).ok_or_else(|| Reply::err(OVERFLOW))
}

/// An absolute expiry (Unix ms; 1 for "already past", since 0 means none) for a TTL asked
/// for at `now`.
pub(crate) fn expiry_at(now: u64, in_ms: i64) -> u64 {
    if in_ms <= 0 {
        1
    } else {
        now.saturating_add(in_ms as u64)
    }
}

/// An absolute expiry for a Unix time in ms (at least 1: see [`expiry_at`]).
pub(crate) fn expiry_abs(at_ms: i64) -> u64 {
    u64::try_from(at_ms).unwrap_or(0).max(1)
}

#[cfg(test)]
mod tests;
