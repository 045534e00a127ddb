//! A program's hold on its keys: the shards of every key it names, locked for its whole run,
//! its writes staged, then committed together at one version.
//!
//! This is the "read-modify-write under the key's lock" of a pair's primary (see the
//! `exec` module): two programs on one key never interleave, so neither loses the other's
//! change, and a program on several keys (MULTI/EXEC, RENAME on one pair) is atomic on this
//! worker. Shards are locked in index order, so two programs never wait on each other in a
//! cycle. Values are opened and sealed under the locks; that holds 1/64 of the store for as
//! long as a value takes to decompress or decrypt and seal again (about a microsecond per
//! KiB encrypted), the price of never computing on a value another write has replaced.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use bytes::{Bytes, BytesMut};
use hashbrown::hash_table::Entry as Slot;
use twincache_protocol::program::{Change, Kind, DELETED, PATCH, STORED};

use super::{now_ms, seal, shard_index, Entry, SealError, Shard, Store};
use crate::seal::records::{self, is_records, RECORDS};
use crate::seal::segments::{self, SEGMENTS};

/// What a key holds, without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// The version of the write that made it (0 for a value staged by this program).
    pub version: u64,
    /// Unix ms; 0 for none.
    pub expires_at: u64,
}

/// A value as a program holds it: opened, or (a large hash, a long string) in its records
/// form, whose fields or segments are read and written one by one (`seal::records`).
#[derive(Debug, Clone)]
pub enum Form {
    Value(Bytes),
    /// Records made by this program, or taken from a partner, held whole.
    Records {
        stored: Bytes,
    },
    /// The stored entry's records as `plan` changes them (an empty plan: as they are):
    /// built straight into the new entry (or the entry edited where it lies) at commit, and
    /// sent to the partner as the plan's edit.
    Planned {
        plan: Arc<Edit>,
        /// The entry's version.
        version: u64,
    },
}

/// How a records form changes: a large hash's fields (`seal::records`), or a long string's
/// segments (`seal::segments`).
#[derive(Debug)]
pub enum Edit {
    Fields(records::Plan),
    Segments(segments::Plan),
}

impl Edit {
    /// The edit that changes nothing in `stored`.
    fn unchanged(stored: &[u8]) -> Option<Edit> {
        match stored.first() {
            Some(&RECORDS) => records::Plan::unchanged(stored).map(Edit::Fields),
            Some(&SEGMENTS) => segments::Plan::unchanged(stored).map(Edit::Segments),
            _ => None,
        }
    }

    /// Appends the new form to `out`, from `base`: the form planned on.
    fn apply(&self, base: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        match self {
            Edit::Fields(p) => p.apply(base, out),
            Edit::Segments(p) => p.apply(base, out),
        }
    }

    /// What the partner is sent: a `PATCH` change's value (see [`decode_patch`]), the edit
    /// written straight after its head.
    fn patch(&self, version: u64) -> Bytes {
        let mut out = Vec::new();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(self.base_len() as u32).to_le_bytes());
        match self {
            Edit::Fields(p) => p.edit_into(&mut out),
            Edit::Segments(p) => p.edit_into(&mut out),
        }
        Bytes::from(out)
    }

    /// The plan `edit` is for `base`, in `base`'s form (see `records::replay`).
    fn replay(base: &[u8], edit: &[u8], encrypted: bool) -> Option<Edit> {
        match base.first() {
            Some(&RECORDS) => records::replay(base, edit, encrypted).map(Edit::Fields),
            Some(&SEGMENTS) => segments::replay(base, edit, encrypted).map(Edit::Segments),
            _ => None,
        }
    }

    /// The stored length of the form planned on.
    fn base_len(&self) -> usize {
        match self {
            Edit::Fields(p) => p.base_len,
            Edit::Segments(p) => p.base_len,
        }
    }

    /// The length of what the new form holds: the packed hash, the string.
    pub fn value_len(&self) -> usize {
        match self {
            Edit::Fields(p) => p.value_len,
            Edit::Segments(p) => p.len,
        }
    }

    /// The stored length of the new form.
    pub fn stored_len(&self) -> usize {
        match self {
            Edit::Fields(p) => p.stored_len,
            Edit::Segments(p) => p.stored_len,
        }
    }

    /// The segments' edit, if it changes only the end of its form: applied to the entry
    /// where it lies (see `segments::Plan::apply_in_place`).
    fn at_end(&self) -> Option<&segments::Plan> {
        match self {
            Edit::Segments(p) if p.at_end() => Some(p),
            _ => None,
        }
    }
}

/// The length of the value a records form holds (see [`Edit::value_len`]).
pub(super) fn records_value_len(stored: &[u8]) -> Option<usize> {
    match stored.first() {
        Some(&SEGMENTS) => segments::len(stored),
        _ => records::value_len(stored),
    }
}

/// A value a program has written and not yet committed.
#[derive(Debug, Clone)]
struct Staged {
    kind: Kind,
    expires_at: u64,
    form: Form,
}

impl Staged {
    fn meta(&self) -> Meta {
        Meta {
            kind: self.kind,
            version: 0,
            expires_at: self.expires_at,
        }
    }
}

impl Entry {
    fn meta(&self) -> Meta {
        Meta {
            kind: self.kind(),
            version: self.version(),
            expires_at: self.expires_at(),
        }
    }
}

/// Staged keys past which they are found through an index rather than by search (a search
/// of a few is cheaper than hashing).
const INDEX_FROM: usize = 16;

/// The locked shards of a program's keys and its staged writes.
pub struct Txn<'a> {
    store: &'a Store,
    /// The program's clock: one reading for all of it, as Redis uses one per command.
    pub now: u64,
    locked: Vec<(usize, MutexGuard<'a, Shard>)>,
    /// Keys written, in order, with their new state (`None`: deleted); each key once.
    staged: Vec<(Bytes, Option<Staged>)>,
    /// Where each key is in `staged`, once it holds more than [`INDEX_FROM`]: searching the
    /// list cost every key of a 20,000-key MSETNX the whole list (seconds on a worker,
    /// which then missed its health checks).
    index: Option<std::collections::HashMap<Bytes, usize>>,
    /// The keys the program named, with their hashes, and where the next lookup is expected
    /// ([`Txn::hash`]): a keyed SipHash is a tenth of a read, and a program used to hash
    /// each key up to four times (to lock, to read, and twice to commit).
    named: Vec<(&'a [u8], u64)>,
    next: std::cell::Cell<usize>,
}

impl Store {
    /// Locks the shards of `keys` (in index order) for a program.
    pub fn txn<'a>(&'a self, keys: impl IntoIterator<Item = &'a [u8]>) -> Txn<'a> {
        let named: Vec<(&[u8], u64)> = keys.into_iter().map(|k| (k, self.hash(k))).collect();
        let mut shards: Vec<usize> = named.iter().map(|&(_, h)| shard_index(h)).collect();
        shards.sort_unstable();
        shards.dedup();
        let locked = shards
            .into_iter()
            .map(|n| (n, self.shards[n].lock().unwrap_or_else(|e| e.into_inner())))
            .collect();
        Txn {
            store: self,
            now: now_ms(),
            locked,
            staged: Vec::new(),
            index: None,
            named,
            next: std::cell::Cell::new(0),
        }
    }
}

impl<'a> Txn<'a> {
    /// `key`'s hash: the one [`Store::txn`] computed, when the program looks its keys up in
    /// the order it named them (the next one, or the one it just looked up again: the usual
    /// case), else computed again. Keys are compared, never trusted by position.
    fn hash(&self, key: &[u8]) -> u64 {
        let next = self.next.get();
        for i in [next, next.wrapping_sub(1)] {
            if let Some(&(named, hash)) = self.named.get(i) {
                if named == key {
                    self.next.set(i + 1);
                    return hash;
                }
            }
        }
        self.store.hash(key)
    }

    /// Looks keys up from the first named again (a commit goes through its writes in order).
    fn rewind(&self) {
        self.next.set(0);
    }

    /// The locked shard of `hash`, if the program holds it.
    fn shard(&self, hash: u64) -> Option<&Shard> {
        Some(&self.locked[self.locked_index(hash)?].1)
    }

    fn shard_mut(&mut self, hash: u64) -> Option<&mut Shard> {
        let i = self.locked_index(hash)?;
        Some(&mut self.locked[i].1)
    }

    fn locked_index(&self, hash: u64) -> Option<usize> {
        let n = shard_index(hash);
        self.locked.binary_search_by_key(&n, |(i, _)| *i).ok()
    }

    fn staged(&self, key: &[u8]) -> Option<&Option<Staged>> {
        self.position(key).map(|i| &self.staged[i].1)
    }

    /// Where `key` is in `staged`.
    fn position(&self, key: &[u8]) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.staged.iter().position(|(k, _)| k.as_ref() == key),
        }
    }

    /// What sealing a large hash's records takes.
    pub fn sealer(&self) -> crate::seal::records::Sealer<'a> {
        self.store.sealer()
    }

    /// Whether the program holds the lock `key` needs (it names every key it touches
    /// before it starts, so this is false only for a key it did not name).
    pub fn holds(&self, key: &[u8]) -> bool {
        self.shard(self.hash(key)).is_some()
    }

    /// The entry under `key` as stored: live, expired or a tombstone.
    fn entry(&self, key: &[u8]) -> Option<&Entry> {
        let hash = self.hash(key);
        self.shard(hash)?.find(hash, key)
    }

    /// What `key` holds for this program: its staged write, else its live entry.
    pub fn meta(&self, key: &[u8]) -> Option<Meta> {
        if let Some(staged) = self.staged(key) {
            return staged.as_ref().map(Staged::meta);
        }
        self.entry(key)
            .filter(|e| e.live(self.now))
            .map(Entry::meta)
    }

    /// The version of whatever the store holds under `key` (a value, expired or not, or a
    /// tombstone); 0 for nothing: what decides which of two writes is newer.
    pub fn version(&self, key: &[u8]) -> u64 {
        self.entry(key).map_or(0, Entry::version)
    }

    /// Whether `key` changed since WATCH saw it at `version`, live or not (see
    /// `Action::Watch`). An expired entry is removed at different times on two partners
    /// (swept, or dropped by a read), so a version that went away is a change only if the
    /// value was live when watched, as in Redis, where a key expiring after WATCH aborts
    /// EXEC and one already gone does not.
    ///
    /// A key that was not live counts as changed if anything newer is there: a value, live
    /// or expired since, or a delete. That includes a DEL of the missing key (it leaves a
    /// tombstone, which partners need to agree on later writes), which Redis does not count:
    /// an EXEC aborted for nothing, which its client retries, rather than a write missed.
    pub fn changed_since(&self, key: &[u8], version: u64, was_live: bool) -> bool {
        let Some(e) = self.entry(key) else {
            return was_live;
        };
        if was_live {
            e.version() != version || !e.live(self.now)
        } else {
            e.live(self.now) || e.version() > version
        }
    }

    /// What WATCH records of `key`: its version (0: no entry) and whether it is live.
    pub fn watch_point(&self, key: &[u8]) -> (u64, bool) {
        self.entry(key)
            .map_or((0, false), |e| (e.version(), e.live(self.now)))
    }

    /// Marks `key`'s entry read (TOUCH); whether it holds a live value.
    pub fn touch(&mut self, key: &[u8]) -> bool {
        if let Some(staged) = self.staged(key) {
            return staged.is_some();
        }
        self.live_entry(key).is_some()
    }

    /// How `key`'s value is stored (see `seal::layout_name`), if it holds one.
    pub fn layout(&self, key: &[u8]) -> Option<&'static str> {
        if let Some(staged) = self.staged(key) {
            return staged.as_ref().map(|s| match &s.form {
                Form::Value(_) => "raw",
                Form::Records { stored, .. } => seal::layout_name(stored),
                Form::Planned { .. } if s.kind == Kind::String => "segments",
                Form::Planned { .. } => "records",
            });
        }
        self.entry(key)
            .filter(|e| e.live(self.now))
            .map(|e| seal::layout_name(e.stored()))
    }

    /// Counts a GET's lookup in the keyspace hits or misses, as `Store::get` does (MGET's
    /// read programs are GETs too).
    pub fn count_lookup(&self, hit: bool) {
        let c = &self.store.counters;
        if hit { &c.hits } else { &c.misses }.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// What `key` holds and its value, opened; marks the entry read (for eviction).
    pub fn read(&mut self, key: &[u8]) -> Result<Option<(Meta, Bytes)>, SealError> {
        let Some((meta, form)) = self.read_form(key)? else {
            return Ok(None);
        };
        let value = match form {
            Form::Value(value) => value,
            _ => {
                let cipher = self.store.cipher();
                let stored = self.records(key)?.ok_or(SealError::Corrupt)?;
                // Opened where they lie, not copied first.
                seal::open_records(key, stored, cipher, usize::MAX)?
            }
        };
        Ok(Some((meta, value)))
    }

    /// What `key` holds for this program (its staged write, else its live entry, marked
    /// read), in the form it is held: records (a large hash's, a long string's) are not
    /// copied (an entry's come as an empty plan on it; read them through [`Txn::records`]).
    pub fn read_form(&mut self, key: &[u8]) -> Result<Option<(Meta, Form)>, SealError> {
        if let Some(staged) = self.staged(key) {
            return Ok(staged.as_ref().map(|s| (s.meta(), s.form.clone())));
        }
        let store = self.store;
        let Some(e) = self.live_entry(key) else {
            return Ok(None);
        };
        let meta = e.meta();
        if is_records(e.stored()) {
            let plan = Edit::unchanged(e.stored()).ok_or(SealError::Corrupt)?;
            let form = Form::Planned {
                plan: Arc::new(plan),
                version: meta.version,
            };
            return Ok(Some((meta, form)));
        }
        let stored = Bytes::copy_from_slice(e.stored());
        let value = seal::open_with(key, &stored, store.cipher(), store.dictionary())?;
        Ok(Some((meta, Form::Value(value))))
    }

    /// `f` of what `key` holds for this program and its value (`None` for a large hash's
    /// records; a long string's segments are opened), marking the entry read as
    /// [`Txn::read_form`] does; a value stored raw is lent from the entry rather than copied
    /// out of it (an MGET's values go straight into its replies).
    pub fn read_with<R>(
        &mut self,
        key: &[u8],
        f: impl FnOnce(Meta, Option<&[u8]>) -> R,
    ) -> Result<Option<R>, SealError> {
        let staged_segments = match self.staged(key) {
            Some(None) => return Ok(None),
            Some(Some(s)) => match &s.form {
                Form::Value(value) => return Ok(Some(f(s.meta(), Some(value)))),
                _ if s.kind == Kind::String => true,
                _ => return Ok(Some(f(s.meta(), None))),
            },
            None => false,
        };
        if staged_segments {
            // A long string this program wrote, in segments: opened whole.
            let (meta, value) = self.read(key)?.ok_or(SealError::Corrupt)?;
            return Ok(Some(f(meta, Some(&value))));
        }
        let store = self.store;
        let Some(e) = self.live_entry(key) else {
            return Ok(None);
        };
        let (meta, stored) = (e.meta(), e.stored());
        if stored.first() == Some(&RECORDS) {
            return Ok(Some(f(meta, None)));
        }
        if let Some(raw) = seal::raw_value(stored) {
            return Ok(Some(f(meta, Some(raw))));
        }
        let stored = Bytes::copy_from_slice(segments::without_room(stored));
        let value = seal::open_with(key, &stored, store.cipher(), store.dictionary())?;
        Ok(Some(f(meta, Some(&value))))
    }

    /// `key`'s live entry, marked read.
    fn live_entry(&mut self, key: &[u8]) -> Option<&mut Entry> {
        let now = self.now;
        let hash = self.hash(key);
        let e = self
            .shard_mut(hash)?
            .table
            .find_mut(hash, |e| e.key() == key)?;
        if !e.live(now) {
            return None;
        }
        if !e.accessed() {
            e.touch(true);
        }
        Some(e)
    }

    /// The records form `key` holds (staged by this program, or the entry's), if it holds
    /// one: borrowed, not copied.
    pub fn records(&mut self, key: &[u8]) -> Result<Option<&[u8]>, SealError> {
        self.settle(key)?;
        if let Some(staged) = self.staged(key) {
            return Ok(match staged {
                Some(Staged {
                    form: Form::Records { stored, .. },
                    ..
                }) => Some(&stored[..]),
                _ => None,
            });
        }
        let now = self.now;
        Ok(self
            .entry(key)
            .filter(|e| e.live(now))
            .map(Entry::stored)
            .filter(|s| is_records(s)))
    }

    /// Stages `key`'s records (what [`Txn::records`] gave) as `plan` changes them.
    pub fn put_planned(
        &mut self,
        key: &Bytes,
        kind: Kind,
        expires_at: u64,
        plan: Edit,
    ) -> Result<(), SealError> {
        let form = match self.staged(key) {
            Some(Some(Staged {
                form: Form::Records { stored, .. },
                ..
            })) => {
                let mut out = Vec::new();
                plan.apply(stored, &mut out)?;
                Form::Records {
                    stored: Bytes::from(out),
                }
            }
            Some(_) => return Err(SealError::Corrupt),
            None => Form::Planned {
                version: self.version(key),
                plan: Arc::new(plan),
            },
        };
        self.put_form(key, kind, expires_at, form);
        Ok(())
    }

    /// Turns a plan staged for `key` into the records it makes (for a program that reads
    /// what it wrote).
    fn settle(&mut self, key: &[u8]) -> Result<(), SealError> {
        let Some(i) = self.position(key) else {
            return Ok(());
        };
        let Some(Staged {
            form: Form::Planned { plan, .. },
            ..
        }) = &self.staged[i].1
        else {
            return Ok(());
        };
        let base = self.entry(key).ok_or(SealError::Corrupt)?;
        let mut out = Vec::new();
        plan.apply(base.stored(), &mut out)?;
        if let Some(staged) = &mut self.staged[i].1 {
            staged.form = Form::Records {
                stored: Bytes::from(out),
            };
        }
        Ok(())
    }

    /// Stages a new value for `key`.
    pub fn put(&mut self, key: &Bytes, kind: Kind, expires_at: u64, value: Bytes) {
        self.put_form(key, kind, expires_at, Form::Value(value));
    }

    /// Stages a new value for `key` in the form given (records go in as they are).
    pub fn put_form(&mut self, key: &Bytes, kind: Kind, expires_at: u64, form: Form) {
        self.stage(
            key,
            Some(Staged {
                kind,
                expires_at,
                form,
            }),
        );
    }

    /// Stages the deletion of `key`.
    pub fn delete(&mut self, key: &Bytes) {
        self.stage(key, None);
    }

    fn stage(&mut self, key: &Bytes, state: Option<Staged>) {
        if let Some(i) = self.position(key) {
            self.staged[i].1 = state;
            return;
        }
        self.staged.push((key.clone(), state));
        let at = self.staged.len() - 1;
        match &mut self.index {
            Some(index) => {
                index.insert(key.clone(), at);
            }
            None if self.staged.len() > INDEX_FROM => {
                let index = self.staged.iter().enumerate();
                self.index = Some(index.map(|(i, (k, _))| (k.clone(), i)).collect());
            }
            None => {}
        }
    }

    /// Appends `key`'s whole state to `changes` as the partner takes it (see
    /// `Action::Export`); its version, 0 (and nothing appended) if there is no entry.
    pub fn export(&self, key: &Bytes, changes: &mut BytesMut) -> Result<u64, SealError> {
        let Some(e) = self.entry(key) else {
            return Ok(0);
        };
        let stored = Bytes::copy_from_slice(segments::without_room(e.stored()));
        let (kind, value) = if e.is_tombstone() {
            (DELETED, Bytes::new())
        } else if is_records(&stored) {
            (e.kind() as u8 | STORED, stored)
        } else {
            let value =
                seal::open_with(key, &stored, self.store.cipher(), self.store.dictionary())?;
            (e.kind() as u8, value)
        };
        Change {
            key: key.clone(),
            kind,
            expires_at: if kind == DELETED { 0 } else { e.expires_at() },
            value,
        }
        .encode(changes);
        Ok(e.version())
    }

    /// Marks `key`'s entry as taken alone, as it is; false if the key has no entry.
    fn mark_alone(&mut self, key: &[u8]) -> bool {
        let hash = self.hash(key);
        match self
            .shard_mut(hash)
            .and_then(|shard| shard.table.find_mut(hash, |e| e.key() == key))
        {
            Some(e) => {
                e.set_alone(true);
                true
            }
            None => false,
        }
    }

    /// Whether the program has written anything.
    pub fn changed(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Writes what the program staged at `version`, appending the partner's copy of each
    /// change to `changes`; returns how many, and the version written. If a key holds a
    /// version not older than `version` (or a flush came after it), the program arrived
    /// behind a newer write: with `bump` it takes the next version after that one
    /// (`version::bump`, which keeps the requester's id), else (or with no counter left
    /// before the next stamp) nothing is written and that newer version is returned, for the
    /// caller to move its clock past and retry. Either way every write to a key carries a
    /// newer version than the last, and partners converge.
    ///
    /// `copy.bases`, when given, gets each change's base: the version its key held before
    /// (0: none), for the partner's check (`Store::replicate`). `alone` marks the entries
    /// written as writes the partner will not get (`flags::SOLO`).
    pub fn commit(
        self,
        version: u64,
        bump: bool,
        copy: PartnerCopy<'_>,
        alone: bool,
    ) -> Result<(usize, u64), u64> {
        if self.staged.is_empty() {
            return Ok((0, version));
        }
        // A flush's version bounds every key, like a write each one holds.
        self.rewind();
        let held = self
            .staged
            .iter()
            .filter_map(|(key, _)| self.entry(key).map(Entry::version))
            .fold(self.store.floor().saturating_sub(1), u64::max);
        let version = if version > held {
            version
        } else if let Some(v) = bump
            .then(|| twincache_protocol::version::bump(held, version as u8))
            .flatten()
        {
            v
        } else {
            return Err(held.max(version));
        };
        Ok((self.write(version, Some(copy), alone), version))
    }

    /// Applies `plan` to `key`'s entry where it lies, as the write of `version`; the version
    /// the entry had, if it did (the entry is there: it was planned on under this lock).
    fn edit_in_place(
        &mut self,
        key: &[u8],
        version: u64,
        expires_at: u64,
        plan: &segments::Plan,
        alone: bool,
    ) -> Option<u64> {
        let store = self.store;
        let hash = self.hash(key);
        let shard = self.shard_mut(hash)?;
        let before = shard.held();
        let Shard { table, usage, .. } = &mut *shard;
        let e = table.find_mut(hash, |e| e.key() == key)?;
        let base = e.version();
        usage.remove(e);
        let done = e.edit_in_place(version, expires_at, plan.len, |buf, at| {
            plan.apply_in_place(buf, at)
        });
        if done.is_ok() {
            e.set_alone(alone);
        }
        usage.add(e);
        shard.recount_structure();
        store.track(before, shard.held());
        done.ok().map(|()| base)
    }

    /// Installs what is staged at `version`, with the accounting, the CLOCK ring and
    /// eviction of every write (see `Store::install`).
    fn write(mut self, version: u64, mut copy: Option<PartnerCopy<'_>>, alone: bool) -> usize {
        let store = self.store;
        let mut replaced = Vec::with_capacity(self.staged.len());
        let staged = std::mem::take(&mut self.staged);
        self.index = None;
        let count = staged.len();
        // A single large hash or long string written by one edit of its entry goes to the
        // partner as that edit; in a block of several changes, whole (a failed edit is sent
        // again whole, which must not leave half of a block applied).
        let single = count == 1;
        self.rewind();
        for (key, state) in staged {
            // A long string's edit of its end changes its entry where it lies.
            if let Some(Staged {
                expires_at,
                form: Form::Planned { plan, .. },
                ..
            }) = &state
            {
                if let Some(plan) = plan.at_end() {
                    if let Some(base) = self.edit_in_place(&key, version, *expires_at, plan, alone)
                    {
                        if let (Some(out), Some(e)) = (copy.as_mut(), self.entry(&key)) {
                            out.add(change_of(&key, state, single, e.stored()), base);
                        }
                        continue;
                    }
                }
            }
            let mut fresh = match &state {
                Some(s) => match &s.form {
                    Form::Value(value) => {
                        let dict = store.dictionary_for(value);
                        Entry::typed(version, s.expires_at, &key, s.kind, value, store, dict)
                    }
                    Form::Records { stored, .. } => {
                        let value_len = records_value_len(stored).unwrap_or(0);
                        Entry::from_stored(version, s.expires_at, &key, s.kind, value_len, stored)
                    }
                    Form::Planned { plan, .. } => {
                        let built = self.entry(&key).map(|base| {
                            Entry::build(
                                version,
                                s.expires_at,
                                &key,
                                s.kind,
                                plan.value_len(),
                                |out| plan.apply(base.stored(), out),
                            )
                        });
                        match built {
                            Some(Ok(entry)) => entry,
                            _ => {
                                // Cannot happen: the entry was planned on under this lock.
                                tracing::error!("a records form's edit does not fit its entry");
                                continue;
                            }
                        }
                    }
                },
                None => Entry::tombstone(
                    version,
                    self.now.saturating_add(store.tombstone_ttl_ms),
                    &key,
                ),
            };
            fresh.set_alone(alone);
            let change = copy
                .is_some()
                .then(|| change_of(&key, state, single, fresh.stored()));
            let hash = self.hash(&key);
            let Some(shard) = self.shard_mut(hash) else {
                continue; // not named by the program: never staged (see `holds`)
            };
            let before = shard.held();
            shard.before_growth(1);
            let Shard {
                table,
                usage,
                clock,
                ..
            } = shard;
            // The base (what the key held before) comes from the lookup that replaces it.
            let base = match table.entry(hash, |e| e.key() == &key[..], |e| store.hash(e.key())) {
                Slot::Occupied(mut slot) => {
                    let base = slot.get().version();
                    usage.remove(slot.get());
                    usage.add(&fresh);
                    replaced.push(slot.get_mut().overwrite(fresh));
                    base
                }
                Slot::Vacant(slot) => {
                    usage.add(&fresh);
                    slot.insert(fresh);
                    clock.push_back(hash);
                    0
                }
            };
            if let (Some(out), Some(change)) = (copy.as_mut(), change) {
                out.add(change, base);
            }
            shard.recount_structure();
            store.track(before, shard.held());
        }
        store
            .counters
            .sets
            .fetch_add(count as u64, Ordering::Relaxed);
        for (_, shard) in &mut self.locked {
            store.compact_clock(shard);
        }
        drop(self.locked);
        drop(replaced);
        if store.over_limit() {
            store.evict_anywhere(None);
        }
        count
    }
}

/// What a commit gives for the partner: its changes, encoded, and their bases if asked.
pub struct PartnerCopy<'c> {
    pub changes: &'c mut BytesMut,
    pub bases: Option<&'c mut Vec<u64>>,
}

impl PartnerCopy<'_> {
    fn add(&mut self, change: Change, base: u64) {
        change.encode(self.changes);
        if let Some(bases) = self.bases.as_deref_mut() {
            bases.push(base);
        }
    }
}

/// The partner's copy of a staged write (`state`) whose entry now stores `stored`: records
/// travel as their edit (a `single` change) or as they are, so the partner seals nothing;
/// anything else as its value.
fn change_of(key: &Bytes, state: Option<Staged>, single: bool, stored: &[u8]) -> Change {
    let key = key.clone();
    match state {
        Some(Staged {
            kind,
            expires_at,
            form: Form::Planned { plan, version },
        }) if single => Change {
            key,
            kind: kind as u8 | STORED | PATCH,
            expires_at,
            value: plan.patch(version),
        },
        Some(s) if is_records(stored) => Change {
            key,
            kind: s.kind as u8 | STORED,
            expires_at: s.expires_at,
            value: match s.form {
                Form::Records { stored, .. } => stored,
                _ => Bytes::copy_from_slice(segments::without_room(stored)),
            },
        },
        Some(s) => Change {
            key,
            kind: s.kind as u8,
            expires_at: s.expires_at,
            value: match s.form {
                Form::Value(value) => value,
                Form::Records { .. } | Form::Planned { .. } => {
                    unreachable!("records are stored as records")
                }
            },
        },
        None => Change {
            key,
            kind: DELETED,
            expires_at: 0,
            value: Bytes::new(),
        },
    }
}

/// Why a partner took none of a primary's changes.
#[derive(Debug, thiserror::Error)]
pub enum NotTaken {
    #[error(transparent)]
    TooLarge(super::StoreError),
    #[error("a change is malformed: {0}")]
    Malformed(#[from] SealError),
    /// An edit of a version of its key this worker does not hold (see `program::PATCH`):
    /// the sender sends the key whole.
    #[error("this worker does not hold the version the change edits")]
    Behind,
    /// The primary computed a change from a state without a write of its key this worker
    /// took alone (the entry is marked, and the change's base is not its version).
    #[error("the primary lacks a write this worker took alone")]
    Diverged,
}

/// A patch change's value (see [`Edit::patch`]): the base entry's version (u64) and stored
/// length (u32; a long string's without its room, which is each worker's own), then the
/// edit (little-endian).
fn decode_patch(value: &[u8]) -> Option<(u64, usize, &[u8])> {
    let version = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(value.get(8..12)?.try_into().ok()?) as usize;
    Some((version, len, &value[12..]))
}

impl Store {
    /// Stores a primary's changes (the partner's side of a read-modify-write), all at
    /// `version`, atomically: a key holding a newer version keeps it (a later write got here
    /// first), the rest are replaced. Returns how many were taken.
    ///
    /// With `bases` (one a change: the version the primary's key held when it ran the
    /// program), a change was computed without a write this worker took alone when its
    /// key's entry here is marked so at a version other than its base (the primary missed
    /// that write), or when its base is older than a flush here (one the primary missed:
    /// a primary that took it holds nothing older). Taking it would lose the write (an
    /// INCR through another orchestrator, while this one's INCR failed over here), so
    /// nothing is taken ([`NotTaken::Diverged`]); the orchestrator removes the change from
    /// the primary (`Op::Revoke`), which then refills. Every key of the copy is marked here,
    /// its value and version unchanged (a key not here gets a marked tombstone at version
    /// 1, below any write): the primary's later programs on the keys the refused one wrote
    /// (a RENAME's source, removed there by the revoke) are refused too, while a write
    /// still on its way here lands as it would have.
    pub fn replicate(
        &self,
        changes: &[Change],
        version: u64,
        bases: Option<&[u64]>,
    ) -> Result<usize, NotTaken> {
        if let Some(big) = changes
            .iter()
            .find(|c| self.max_bytes > 0 && c.key.len() + c.value.len() > self.max_bytes)
        {
            return Err(NotTaken::TooLarge(super::StoreError::TooLarge {
                needs: big.key.len() + big.value.len(),
                max: self.max_bytes,
            }));
        }
        if version < self.floor() {
            return Ok(0); // older than the last flush
        }
        // Records come as they are: checked as a partner's entry would be.
        for c in changes.iter().filter(|c| c.is_stored() && !c.is_patch()) {
            let shaped = records_value_len(&c.value).is_some_and(|len| {
                seal::plausible(&c.value, len)
                    && c.value_kind()
                        .is_some_and(|k| super::form_fits(&c.value, k))
            });
            if !shaped {
                return Err(SealError::Corrupt.into());
            }
        }
        let mut txn = self.txn(changes.iter().map(|c| &c.key[..]));
        if let Some(bases) = bases {
            let floor = self.floor();
            let diverged = changes.iter().zip(bases).any(|(c, &base)| {
                (base != 0 && base < floor)
                    || txn
                        .entry(&c.key)
                        .is_some_and(|e| e.alone() && e.version() != base)
            });
            if diverged {
                txn.rewind();
                for c in changes {
                    if !txn.mark_alone(&c.key) {
                        txn.delete(&c.key);
                    }
                }
                txn.write(1, None, true);
                return Err(NotTaken::Diverged);
            }
            txn.rewind();
        }
        for c in changes {
            let held = txn.version(&c.key);
            if held > version || (c.is_patch() && held == version) {
                continue;
            }
            let form = if c.is_patch() {
                // Only on the very entry the primary edited (see `Txn::write`).
                let (base, len, edit) = decode_patch(&c.value).ok_or(SealError::Corrupt)?;
                let entry = txn
                    .entry(&c.key)
                    .filter(|e| {
                        e.version() == base && segments::without_room(e.stored()).len() == len
                    })
                    .ok_or(NotTaken::Behind)?;
                let kind = c.value_kind().ok_or(SealError::Corrupt)?;
                if !super::form_fits(entry.stored(), kind) {
                    return Err(SealError::Corrupt.into());
                }
                let plan = Edit::replay(entry.stored(), edit, self.cipher.is_some())
                    .ok_or(SealError::Corrupt)?;
                Form::Planned {
                    plan: Arc::new(plan),
                    version: base,
                }
            } else if c.is_stored() {
                if self.cipher.is_some() && !seal::is_encrypted(&c.value) {
                    self.counters
                        .refused_unsealed
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Form::Records {
                    stored: c.value.clone(),
                }
            } else {
                Form::Value(c.value.clone())
            };
            match c.value_kind() {
                Some(kind) => txn.put_form(&c.key, kind, c.expires_at, form),
                None => txn.delete(&c.key),
            }
        }
        Ok(txn.write(version, None, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SetOptions;

    fn copy(changes: &mut BytesMut) -> PartnerCopy<'_> {
        PartnerCopy {
            changes,
            bases: None,
        }
    }

    #[test]
    fn a_program_sees_its_own_writes_and_commits_them_at_one_version() {
        let s = Store::default();
        s.set(b"a", b"1", 10, SetOptions::default()).unwrap();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        let mut t = s.txn([&a[..], &b[..]]);
        assert_eq!(t.read(&a).unwrap().unwrap().1, Bytes::from_static(b"1"));
        assert_eq!(t.version(&a), 10);
        t.put(&a, Kind::String, 0, Bytes::from_static(b"2"));
        t.put(&b, Kind::Hash, 0, Bytes::from_static(b"h"));
        assert_eq!(t.read(&a).unwrap().unwrap().1, Bytes::from_static(b"2"));
        assert_eq!(t.meta(&b).unwrap().kind, Kind::Hash);
        let mut changes = BytesMut::new();
        assert_eq!(t.commit(20, false, copy(&mut changes), false), Ok((2, 20)));
        assert_eq!(s.get(b"a").unwrap().unwrap(), Bytes::from_static(b"2"));
        assert_eq!(s.version(b"b"), Some(20));
        assert_eq!(s.get_typed(b"b").unwrap().unwrap().1, Kind::Hash);
        let changes = twincache_protocol::program::decode_changes(changes.freeze()).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].kind, Kind::Hash as u8);
    }

    /// A program writing more keys than a search suits finds them through its index: each
    /// key once, its last write, read back, committed whole.
    #[test]
    fn many_staged_keys_are_found_through_the_index() {
        let s = Store::default();
        let keys: Vec<Bytes> = (0..100).map(|i| Bytes::from(format!("k{i}"))).collect();
        let mut t = s.txn(keys.iter().map(|k| &k[..]));
        for (i, k) in keys.iter().enumerate() {
            t.put(k, Kind::String, 0, Bytes::from(format!("a{i}")));
        }
        assert!(t.index.is_some());
        t.put(&keys[5], Kind::String, 0, Bytes::from_static(b"again"));
        t.delete(&keys[7]);
        t.put(&keys[99], Kind::String, 0, Bytes::from_static(b"last"));
        assert_eq!(t.staged.len(), 100, "each key once");
        assert_eq!(
            t.read(&keys[5]).unwrap().unwrap().1,
            Bytes::from_static(b"again")
        );
        assert!(t.read(&keys[7]).unwrap().is_none());
        assert_eq!(
            t.read(&keys[3]).unwrap().unwrap().1,
            Bytes::from_static(b"a3")
        );
        let mut changes = BytesMut::new();
        assert_eq!(
            t.commit(20, false, copy(&mut changes), false),
            Ok((100, 20))
        );
        assert_eq!(s.get(b"k5").unwrap().unwrap(), Bytes::from_static(b"again"));
        assert_eq!(s.get(b"k99").unwrap().unwrap(), Bytes::from_static(b"last"));
        assert!(s.get(b"k7").unwrap().is_none());
    }

    /// Lookups reuse the hashes of the keys named, in order or not, and a key read out of
    /// order, twice, or not named at all is found (or refused) as by its own hash.
    #[test]
    fn keys_are_found_in_any_order_whatever_was_named() {
        let s = Store::default();
        let keys: Vec<Bytes> = (0..40).map(|i| Bytes::from(format!("k{i}"))).collect();
        s.set(b"unnamed", b"u", 10, SetOptions::default()).unwrap();
        for (i, k) in keys.iter().enumerate() {
            s.set(k, format!("v{i}").as_bytes(), 10, SetOptions::default())
                .unwrap();
        }
        let mut t = s.txn(keys.iter().map(|k| &k[..]));
        let value = |t: &mut Txn, i: usize| t.read(&keys[i]).unwrap().map(|(_, v)| v);
        for i in [0, 1, 1, 2, 39, 3, 0, 38, 4, 4, 5] {
            assert_eq!(
                value(&mut t, i),
                Some(Bytes::from(format!("v{i}"))),
                "key {i}"
            );
        }
        // Every key in turn once more, and one the program did not name.
        for i in 0..40 {
            assert_eq!(
                value(&mut t, i),
                Some(Bytes::from(format!("v{i}"))),
                "key {i}"
            );
        }
        // Found by its own hash where the program holds its shard, else not read at all.
        let unnamed = t.read(b"unnamed").unwrap().map(|(_, v)| v);
        if t.holds(b"unnamed") {
            assert_eq!(unnamed, Some(Bytes::from_static(b"u")));
        } else {
            assert_eq!(unnamed, None);
        }
        // Writes in the order named and out of it all land.
        t.put(&keys[5], Kind::String, 0, Bytes::from_static(b"five"));
        t.put(&keys[2], Kind::String, 0, Bytes::from_static(b"two"));
        t.delete(&keys[30]);
        assert_eq!(
            t.commit(20, false, copy(&mut BytesMut::new()), false),
            Ok((3, 20))
        );
        assert_eq!(
            s.get(&keys[5]).unwrap().unwrap(),
            Bytes::from_static(b"five")
        );
        assert_eq!(
            s.get(&keys[2]).unwrap().unwrap(),
            Bytes::from_static(b"two")
        );
        assert_eq!(s.get(&keys[30]).unwrap(), None);
        assert_eq!(s.get(&keys[6]).unwrap().unwrap(), Bytes::from_static(b"v6"));
    }

    #[test]
    fn a_commit_behind_the_stored_version_writes_nothing() {
        let s = Store::default();
        s.set(b"a", b"1", 50, SetOptions::default()).unwrap();
        let a = Bytes::from_static(b"a");
        let mut t = s.txn([&a[..]]);
        t.put(&a, Kind::String, 0, Bytes::from_static(b"2"));
        assert_eq!(
            t.commit(50, false, copy(&mut BytesMut::new()), false),
            Err(50)
        );
        assert_eq!(s.get(b"a").unwrap().unwrap(), Bytes::from_static(b"1"));
        let mut t = s.txn([&a[..]]);
        t.delete(&a);
        assert_eq!(
            t.commit(51, false, copy(&mut BytesMut::new()), false),
            Ok((1, 51))
        );
        assert_eq!(s.get(b"a").unwrap(), None);
        assert_eq!(s.usage().tombstones, 1);
    }

    #[test]
    fn a_commit_behind_the_stored_version_may_take_the_next_one() {
        use twincache_protocol::version::{at_ms, COUNTER_SHIFT, EPOCH_MS, STAMP_STEP};
        let s = Store::default();
        let stamp = at_ms(EPOCH_MS + 100) | 4;
        s.set(b"a", b"1", stamp, SetOptions::default()).unwrap();
        let a = Bytes::from_static(b"a");
        let behind = at_ms(EPOCH_MS + 99) | 7;
        let mut held = stamp;
        for _ in 1..STAMP_STEP {
            let mut t = s.txn([&a[..]]);
            t.put(&a, Kind::String, 0, Bytes::from_static(b"2"));
            let (n, v) = t
                .commit(behind, true, copy(&mut BytesMut::new()), false)
                .unwrap();
            assert_eq!(n, 1);
            assert_eq!(v, ((held >> COUNTER_SHIFT) + 1) << COUNTER_SHIFT | 7);
            assert_eq!(s.version(b"a"), Some(v));
            held = v;
        }
        // No counter left before the next stamp: refused, for the orchestrator to restamp.
        let mut t = s.txn([&a[..]]);
        t.put(&a, Kind::String, 0, Bytes::from_static(b"3"));
        assert_eq!(
            t.commit(behind, true, copy(&mut BytesMut::new()), false),
            Err(held)
        );
        // A flush bounds keys it never saw.
        s.flush(at_ms(EPOCH_MS + 200) | 1);
        let b = Bytes::from_static(b"b");
        let mut t = s.txn([&b[..]]);
        t.put(&b, Kind::String, 0, Bytes::from_static(b"x"));
        let (_, v) = t
            .commit(behind, true, copy(&mut BytesMut::new()), false)
            .unwrap();
        assert!(v >= s.floor(), "{v:x} at or above the flush");
    }
}
