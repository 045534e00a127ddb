//! The worker's key-value store: sharded hash tables of single-allocation entries.
//!
//! Each entry carries the version of the write that produced it. Partners receive the same
//! writes in whatever order the network delivers them, so the store keeps the newest version
//! (last writer wins by the orchestrator's clock) instead of the last arrival; that is what
//! keeps the two copies of a pair identical.
//!
//! Entries may carry an absolute expiry. An expired entry is never returned: reads treat it
//! as absent and remove it on the spot.
//!
//! ## Layout
//! An entry is one heap allocation: header, key and stored (sealed) bytes together.
//!
//! ```text
//! version:u64 | expires_at:u64 (unix ms, 0 = never) | key_len:u32 | value_len:u32 | key | stored
//! ```
//!
//! The top bit of `value_len` is the entry's *accessed* bit for eviction (see [`Store`]).
//! The top two bits of `key_len` are the value's type ([`Kind`]: 0 string, 1 hash): a string
//! takes no byte more than before types existed, and an entry written before then (keys are
//! far below 1 GiB, so those bits were 0) reads as the string it is, in a snapshot too. A
//! hash is one entry, its fields and values encoded together (`exec::hash`) and sealed as a
//! whole.
//!
//! One allocation per key instead of three (key, value, and the refcount header a shared
//! `Bytes` adds) saves memory, and saves cache misses: a lookup compares the key in the same
//! lines that hold the header, and an overwrite frees one block. The key is hashed once
//! (SipHash with a per-process key, so clients cannot aim collisions at one bucket); the hash
//! picks the shard and the bucket.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;
use twincache_protocol::slots::SlotRange;

use crate::seal::{self, Cipher, Dictionary, SealError};
use crate::secret::SecretBuf;
pub use twincache_protocol::program::Kind;

mod txn;
mod walk;

pub use txn::{Edit, Form, Meta, NotTaken, PartnerCopy, Txn};
pub use walk::ScanStep;
pub(crate) use walk::STEP_TIME;

const HEADER: usize = 8 + 8 + 4 + 4;
/// The accessed bit, kept in the top bit of the value length (values are far below 2 GiB).
const ACCESSED: usize = 1 << 31;
/// The written-alone bit, next to it: this entry is a write its partner missed (see
/// [`Store::replicate`]). Only this worker's business: it never leaves in a snapshot.
const ALONE: usize = 1 << 30;
/// Both flag bits of the value length field (values stay below 1 GiB: frames and Redis'
/// 512 MB strings bound them).
const LEN_FLAGS: usize = ACCESSED | ALONE;
/// Where the type sits in the key length field, and the longest key it leaves room for.
const KIND_SHIFT: u32 = 30;
pub const MAX_KEY_LEN: usize = (1 << KIND_SHIFT) - 1;
/// Shards: enough that threads rarely meet on one lock.
const SHARDS: usize = 64;
/// Most entries [`Store::reserve`] makes room for at once (about 40 MB of table).
const MAX_RESERVE: usize = 1 << 22;

/// Whether `stored` is a form a value of type `kind` takes: records hold a hash, segments
/// a string (a partner's bytes claiming otherwise would open as garbage of the other type).
pub(crate) fn form_fits(stored: &[u8], kind: Kind) -> bool {
    match stored.first() {
        Some(&seal::records::RECORDS) => kind == Kind::Hash,
        Some(&seal::segments::SEGMENTS) => kind == Kind::String,
        _ => true,
    }
}

/// One stored key: header, key and stored bytes in one allocation (see the module docs).
struct Entry(Box<[u8]>);

impl Entry {
    fn new(
        version: u64,
        expires_at: u64,
        key: &[u8],
        value: &[u8],
        cipher: Option<&Cipher>,
        dict: Option<&Dictionary>,
    ) -> Entry {
        let room = seal::room_for(value.len(), cipher.is_some());
        let mut buf = Vec::with_capacity(HEADER + key.len() + room);
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&expires_at.to_le_bytes());
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(key);
        seal::seal_into(key, value, cipher, dict, &mut buf);
        Entry(buf.into_boxed_slice())
    }

    /// The entry of a value of type `kind`: a hash past the packed form's limits takes the
    /// records form (`seal::records`), anything else [`Entry::new`]'s.
    fn typed(
        version: u64,
        expires_at: u64,
        key: &[u8],
        kind: Kind,
        value: &Bytes,
        store: &Store,
        dict: Option<&Dictionary>,
    ) -> Entry {
        if kind == Kind::Hash {
            if let Some(fields) = crate::exec::codec::decode(value)
                .filter(|f| seal::records::wanted(f.len(), value.len()))
            {
                let mut stored = Vec::new();
                seal::records::build(key, &fields, store.sealer(), &mut stored);
                return Entry::from_stored(version, expires_at, key, kind, value.len(), &stored);
            }
        }
        Entry::new(version, expires_at, key, value, store.cipher(), dict).with_kind(kind)
    }

    /// The entry of bytes already in their stored form, of a `value_len`-byte value.
    fn from_stored(
        version: u64,
        expires_at: u64,
        key: &[u8],
        kind: Kind,
        value_len: usize,
        stored: &[u8],
    ) -> Entry {
        let built = Entry::build(version, expires_at, key, kind, value_len, |out| {
            out.extend_from_slice(stored);
            Ok::<(), ()>(())
        });
        built.unwrap_or_else(|()| unreachable!("copying cannot fail"))
    }

    /// This entry made the write of `version` by `edit`, which changes its stored bytes
    /// (from the offset it is given) where they lie: the allocation grows in place while its
    /// size class has room, and only then moves. The header follows (accessed bit clear, as
    /// for any write); the type stays. Unchanged if `edit` fails.
    fn edit_in_place<E>(
        &mut self,
        version: u64,
        expires_at: u64,
        value_len: usize,
        edit: impl FnOnce(&mut Vec<u8>, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        let at = HEADER + self.key_len();
        let mut buf = std::mem::take(&mut self.0).into_vec();
        let done = edit(&mut buf, at);
        if done.is_ok() {
            buf[0..8].copy_from_slice(&version.to_le_bytes());
            buf[8..16].copy_from_slice(&expires_at.to_le_bytes());
            buf[20..24].copy_from_slice(&(value_len as u32).to_le_bytes());
        }
        self.0 = buf.into_boxed_slice();
        done
    }

    /// The entry whose stored bytes `fill` appends after its header and key (straight into
    /// the entry's one allocation).
    fn build<E>(
        version: u64,
        expires_at: u64,
        key: &[u8],
        kind: Kind,
        value_len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<Entry, E> {
        let mut buf = Vec::new();
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&expires_at.to_le_bytes());
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(value_len as u32).to_le_bytes());
        buf.extend_from_slice(key);
        fill(&mut buf)?;
        Ok(Entry(buf.into_boxed_slice()).with_kind(kind))
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }

    fn version(&self) -> u64 {
        self.u64_at(0)
    }

    fn expires_at(&self) -> u64 {
        self.u64_at(8)
    }

    fn set_expires_at(&mut self, at: u64) {
        self.0[8..16].copy_from_slice(&at.to_le_bytes());
    }

    fn u32_at(&self, at: usize) -> usize {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    fn key_len(&self) -> usize {
        self.u32_at(16) & MAX_KEY_LEN
    }

    /// The value's type (see the module docs).
    pub(crate) fn kind(&self) -> Kind {
        match self.u32_at(16) >> KIND_SHIFT {
            1 => Kind::Hash,
            _ => Kind::String,
        }
    }

    /// The entry with its type set to `kind` (a string by default).
    pub(crate) fn with_kind(mut self, kind: Kind) -> Entry {
        let field = (self.key_len() | ((kind as usize) << KIND_SHIFT)) as u32;
        self.0[16..20].copy_from_slice(&field.to_le_bytes());
        self
    }

    /// Length of the value as the client gave it (before sealing).
    fn value_len(&self) -> usize {
        self.u32_at(20) & !LEN_FLAGS
    }

    fn accessed(&self) -> bool {
        self.u32_at(20) & ACCESSED != 0
    }

    /// Marks the entry as read since the eviction hand last passed it.
    fn touch(&mut self, on: bool) {
        set_len_flag(&mut self.0, ACCESSED, on);
    }

    /// Whether this entry is a write its partner missed (taken with `flags::SOLO`), and not
    /// replaced since by one both took.
    fn alone(&self) -> bool {
        self.u32_at(20) & ALONE != 0
    }

    /// Marks (or unmarks) this entry as a write its partner missed.
    fn set_alone(&mut self, on: bool) {
        set_len_flag(&mut self.0, ALONE, on);
    }

    fn key(&self) -> &[u8] {
        &self.0[HEADER..HEADER + self.key_len()]
    }

    fn stored(&self) -> &[u8] {
        &self.0[HEADER + self.key_len()..]
    }

    /// Gone by time: reclaimable (by a read, the sweep, or eviction).
    fn expired(&self, now: impl Clock) -> bool {
        let at = self.expires_at();
        at != 0 && at <= now.ms()
    }

    fn is_tombstone(&self) -> bool {
        self.stored() == [seal::TOMBSTONE]
    }

    /// Visible to reads: not expired and not a tombstone.
    fn live(&self, now: impl Clock) -> bool {
        !self.expired(now) && !self.is_tombstone()
    }

    /// The record of a delete at `version`, kept until `expires_at` so that neither a late
    /// older write nor a resync can bring the key back.
    fn tombstone(version: u64, expires_at: u64, key: &[u8]) -> Entry {
        let mut buf = Vec::with_capacity(HEADER + key.len() + 1);
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&expires_at.to_le_bytes());
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(key);
        buf.push(seal::TOMBSTONE);
        Entry(buf.into_boxed_slice())
    }

    /// An entry received from a partner, checked before it is trusted: the key lies within
    /// the entry with stored bytes behind it, and those bytes have the shape of a known layout
    /// holding a value of the length the header gives (a tombstone: one marker byte, length
    /// 0). Every later use of the entry (slicing the key, opening the value, the byte counts
    /// in [`Usage`]) relies on these, so a partner's bytes cannot make it panic or misaccount.
    /// The accessed and written-alone bits are the sender's business and are cleared.
    fn from_raw(raw: &[u8]) -> Option<Entry> {
        let field = |at: usize| {
            let b = raw.get(at..at + 4)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let key_field = field(16)?;
        let kind = Kind::from_u8((key_field >> KIND_SHIFT) as u8)?;
        let key_len = key_field & MAX_KEY_LEN;
        let value_len = field(20)? & !LEN_FLAGS;
        let stored = raw.get(HEADER.checked_add(key_len)?..)?;
        if !seal::plausible(stored, value_len) || !form_fits(stored, kind) {
            return None;
        }
        let mut e = Entry(raw.into());
        e.touch(false);
        e.set_alone(false);
        Some(e)
    }

    /// Bytes this entry's allocation really takes (its slot in the table is counted with
    /// the table).
    fn footprint(&self) -> usize {
        size_class(self.0.len())
    }

    /// Puts `fresh` in this entry's place and returns what is to be freed (once the shard's
    /// lock is let go). A small `fresh` of this entry's length is copied into its allocation,
    /// and `fresh`'s own is given back instead. The allocator hands that block out again on
    /// the next write, from its fast path. Freeing the old entry instead would free a block on
    /// a random page (the key's): blocks scattered that way leave the allocator searching its
    /// pages for a free one, about a fifth of a worker's instructions for a SET that
    /// overwrites a key. The old entry is in the cache too, as its key was just compared. A
    /// large entry is swapped, not copied: the copy would be made under the shard's lock.
    fn overwrite(&mut self, fresh: Entry) -> Entry {
        if self.0.len() == fresh.0.len() && fresh.0.len() <= OVERWRITE_IN_PLACE {
            self.0.copy_from_slice(&fresh.0);
            fresh
        } else {
            std::mem::replace(self, fresh)
        }
    }
}

/// Clears the written-alone bit of an entry's bytes as a snapshot sends them (copied from
/// [`Store::snapshot_shard`]): the receiver takes them from this worker, and a receiver from
/// before the bit would take it for length.
pub fn unmark_sent(raw: &mut [u8]) {
    set_len_flag(raw, ALONE, false);
}

/// Sets or clears `flag` (one of [`LEN_FLAGS`]) in the value length field of an entry's
/// bytes (untouched if they are too short to hold one).
fn set_len_flag(raw: &mut [u8], flag: usize, on: bool) {
    if let Some(field) = raw.get_mut(20..24) {
        let bits = u32::from_le_bytes([field[0], field[1], field[2], field[3]]) as usize;
        let bits = (bits & !flag | if on { flag } else { 0 }) as u32;
        field.copy_from_slice(&bits.to_le_bytes());
    }
}

/// The largest entry [`Entry::overwrite`] copies into its predecessor's allocation.
const OVERWRITE_IN_PLACE: usize = 1024;

/// The shard of a key's hash. The table uses the hash's low bits (bucket) and top 7 (tag),
/// so the shard takes bits from the middle.
fn shard_index(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

/// What the allocator really hands out for a request of `n` bytes: the binaries use
/// mimalloc, whose size classes are exact up to 64 bytes and then four per doubling, so a
/// 1,060-byte entry takes 1,280. Counting requested bytes instead would let resident memory
/// run a fifth over the limit.
fn size_class(n: usize) -> usize {
    let words = n.div_ceil(8).max(1);
    if words <= 8 {
        return words * 8;
    }
    let top = usize::BITS - 1 - words.leading_zeros();
    let step = 1usize << (top - 2);
    words.div_ceil(step) * step * 8
}

/// The key of an entry as a snapshot carries it, if the bytes hold one (the rest of the
/// entry is checked when it is merged).
pub fn raw_entry_key(raw: &[u8]) -> Option<&[u8]> {
    let field = raw.get(16..20)?;
    let key_len =
        u32::from_le_bytes([field[0], field[1], field[2], field[3]]) as usize & MAX_KEY_LEN;
    raw.get(HEADER..HEADER.checked_add(key_len)?)
}

/// A time to judge expiry by, in Unix milliseconds.
trait Clock: Copy {
    fn ms(self) -> u64;
}

impl Clock for u64 {
    fn ms(self) -> u64 {
        self
    }
}

/// The time for one operation, read from the clock only if something asks (an entry that
/// expires, a relative TTL), and then once. Most entries never expire, and a clock reading
/// was about a seventh of a worker's instructions for a GET.
#[derive(Default)]
struct Now(std::cell::Cell<Option<u64>>);

impl Clock for &Now {
    fn ms(self) -> u64 {
        match self.0.get() {
            Some(now) => now,
            None => {
                let now = now_ms();
                self.0.set(Some(now));
                now
            }
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters for `stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub sets: AtomicU64,
    /// Writes ignored because the entry already held a newer version.
    pub stale_writes: AtomicU64,
    pub expired: AtomicU64,
    /// Entries removed to stay within the memory limit.
    pub evicted: AtomicU64,
    /// Entries a partner offered unsealed to this store, which encrypts: refused (see
    /// [`Merged::Unsealed`]).
    pub refused_unsealed: AtomicU64,
}

/// What became of an entry from a partner's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Merged {
    /// It replaced what this store held (or filled an empty place).
    Taken,
    /// This store kept what it had: as new or newer, or the entry had expired, or it was
    /// older than the floor for a key not held here.
    Kept,
    /// Refused: a value in a plain layout (raw, lz4) offered to a store that encrypts. A
    /// partner with the same key sends only sealed values; plain ones would be stored as
    /// given, readable by anyone who reads the memory, and accepted without the key's
    /// authentication, so a forged partner could plant any value at any version.
    Unsealed,
}

impl Merged {
    pub fn taken(self) -> bool {
        self == Merged::Taken
    }
}

/// How a `set` behaves (the Redis `SET` options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Time to live in milliseconds; 0 for none.
    pub ttl_ms: u64,
    /// An absolute expiry (Unix ms) instead of `ttl_ms`, so partners store the same one;
    /// 0 for none.
    pub expires_at: u64,
    /// Only if absent.
    pub nx: bool,
    /// Only if present.
    pub xx: bool,
    /// Keep the current expiry.
    pub keep_ttl: bool,
    /// Return the previous value.
    pub get: bool,
    /// The partner will not get this write (`flags::SOLO`): the entry is marked so.
    pub alone: bool,
}

/// What a `set` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOutcome {
    /// False when an NX/XX condition did not hold.
    pub applied: bool,
    /// The previous value, when asked for with [`SetOptions::get`].
    pub old: Option<Bytes>,
}

/// A snapshot of the store's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub keys: usize,
    /// Deletes remembered (see `--tombstone-ttl`); not keys.
    pub tombstones: usize,
    /// Bytes held by entries: allocations (header, key, stored bytes) and table slots.
    pub bytes: usize,
    /// Keys and values as clients gave them.
    pub logical_bytes: usize,
    /// Keys and values as stored (values compressed, encrypted), without overhead.
    pub stored_bytes: usize,
    /// Keys with an expiry (INFO keyspace `expires=`), and the sum of their expiry times
    /// (for `avg_ttl=`), kept as entries come and go so neither needs a scan.
    pub expiring: usize,
    pub expiring_at_sum: u128,
}

impl Usage {
    fn add(&mut self, e: &Entry) {
        if e.is_tombstone() {
            self.tombstones += 1;
        } else {
            self.keys += 1;
            if e.expires_at() != 0 {
                self.expiring += 1;
                self.expiring_at_sum += u128::from(e.expires_at());
            }
        }
        self.bytes += e.footprint();
        self.logical_bytes += e.key_len() + e.value_len();
        self.stored_bytes += e.key_len() + e.stored().len();
    }

    fn remove(&mut self, e: &Entry) {
        if e.is_tombstone() {
            self.tombstones -= 1;
        } else {
            self.keys -= 1;
            if e.expires_at() != 0 {
                self.expiring -= 1;
                self.expiring_at_sum -= u128::from(e.expires_at());
            }
        }
        self.bytes -= e.footprint();
        self.logical_bytes -= e.key_len() + e.value_len();
        self.stored_bytes -= e.key_len() + e.stored().len();
    }

    fn merge(&mut self, other: Usage) {
        self.keys += other.keys;
        self.tombstones += other.tombstones;
        self.bytes += other.bytes;
        self.logical_bytes += other.logical_bytes;
        self.stored_bytes += other.stored_bytes;
        self.expiring += other.expiring;
        self.expiring_at_sum += other.expiring_at_sum;
    }
}

/// A value as [`Store::read`] hands it over.
pub enum Value<'a> {
    /// Stored raw: the entry's own bytes, lent under its shard's lock.
    Lent(&'a [u8]),
    /// Opened (decompressed, decrypted) into a buffer of its own.
    Opened(Bytes),
}

impl Value<'_> {
    /// The value as `Bytes`: a lent one copied, an opened one as it is.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Value::Lent(value) => Bytes::copy_from_slice(value),
            Value::Opened(value) => value,
        }
    }
}

/// Values collected towards the dictionary: `len` bytes of `buf` (`dict_size` long).
#[derive(Default)]
struct Samples {
    buf: Option<SecretBuf>,
    len: usize,
}

struct Shard {
    table: HashTable<Entry>,
    usage: Usage,
    /// Key hashes in insertion order: the CLOCK ring eviction walks. It may hold hashes of
    /// keys since deleted (skipped, and dropped when the ring is rebuilt).
    clock: VecDeque<u64>,
    /// Bytes of the table's and the ring's own allocations, as last counted.
    structure: usize,
    /// Changes whenever the table may move its entries (it grows or rehashes), so that a
    /// SCAN cursor naming a bucket of this shard can tell whether the bucket still means
    /// what it did (see `walk`). Starts at a random value, so a cursor from another worker
    /// or an earlier start of this one rarely matches by chance.
    generation: u32,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            table: HashTable::new(),
            usage: Usage::default(),
            clock: VecDeque::new(),
            structure: 0,
            generation: rand::random(),
        }
    }
}

impl Shard {
    /// Bytes held: entries plus the table and ring themselves.
    fn held(&self) -> usize {
        self.usage.bytes + self.structure
    }

    /// Recounts the table's and ring's allocations (capacity, not length: that is what
    /// they hold).
    fn recount_structure(&mut self) {
        self.structure = self.table.capacity() * (std::mem::size_of::<Entry>() + 1)
            + self.clock.capacity() * std::mem::size_of::<u64>();
    }
}

impl Shard {
    /// Called before anything that may grow the table (`entry`, `reserve`): a full table
    /// moves its entries then, which ends the meaning of SCAN cursors into it.
    fn before_growth(&mut self, additional: usize) {
        if self.table.capacity() - self.table.len() < additional {
            self.generation = self.generation.wrapping_add(1);
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<&Entry> {
        self.table.find(hash, |e| e.key() == key)
    }

    /// Removes the entry for `key` if `pred` holds for it; returns it.
    fn remove_if(
        &mut self,
        hash: u64,
        key: &[u8],
        pred: impl FnOnce(&Entry) -> bool,
    ) -> Option<Entry> {
        match self.table.find_entry(hash, |e| e.key() == key) {
            Ok(slot) if pred(slot.get()) => {
                let (entry, _) = slot.remove();
                self.usage.remove(&entry);
                Some(entry)
            }
            _ => None,
        }
    }
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("value needs {needs} bytes, more than the worker's whole --max-memory of {max}")]
    TooLarge { needs: usize, max: usize },
}

/// The key-value store.
///
/// With a memory limit, a write that takes the store over it evicts entries by CLOCK
/// (second chance), an approximation of least-recently-used: each shard keeps a ring of key
/// hashes in insertion order; reads set an entry's accessed bit; eviction walks the ring from
/// the front, giving accessed entries a second chance (bit cleared, hash moved to the back)
/// and evicting the first entry not read since the hand last passed it. Each step is O(1), and
/// the ring is rebuilt when stale hashes make it twice the table's size, so eviction costs the
/// same whatever the number of keys.
pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::hash::RandomState,
    cipher: Option<Cipher>,
    /// The key of a large hash's field tags (`seal::records`), from the cipher's.
    tags: seal::records::TagKey,
    /// Bytes held by all entries (the sum of the shards' `usage.bytes`), for the limit.
    bytes: AtomicUsize,
    /// The memory limit in bytes; 0 for none.
    max_bytes: usize,
    /// The compression dictionary, built once from the first values stored.
    dict: OnceLock<Dictionary>,
    /// Values collected for the dictionary until it is built: plaintext, so in secret memory
    /// from the first byte (a growing vector would leave copies behind).
    samples: Mutex<Samples>,
    /// Dictionary size in bytes; 0 disables dictionaries.
    dict_size: usize,
    /// How long deletes are remembered (tombstones).
    tombstone_ttl_ms: u64,
    /// The version of the last FLUSHALL: no entry older than it is held or taken any more
    /// (a write, a partner's copy), so neither a late write nor a resync brings back a
    /// flushed key.
    floor: AtomicU64,
    pub counters: Counters,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(None, 0)
    }
}

/// Default time deletes are remembered: longer than any resync should take, short enough
/// that the memory of many deletes stays small.
pub const DEFAULT_TOMBSTONE_TTL_MS: u64 = 60 * 60 * 1000;

/// Default dictionary size: on ~900-byte JSON records, 4 KiB kept 40% of the bytes and 64 KiB
/// 37% at five times the cost per write; 8 KiB sits near the knee.
pub const DEFAULT_DICTIONARY_SIZE: usize = 8 * 1024;

impl Store {
    /// A store that encrypts every value with `cipher`, if given, and holds at most
    /// `max_bytes` (0: no limit).
    pub fn new(cipher: Option<Cipher>, max_bytes: usize) -> Store {
        Store {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
            tags: cipher
                .as_ref()
                .map_or(seal::records::TagKey::PLAIN, Cipher::tag_key),
            cipher,
            bytes: AtomicUsize::new(0),
            max_bytes,
            dict: OnceLock::new(),
            samples: Mutex::default(),
            dict_size: DEFAULT_DICTIONARY_SIZE,
            tombstone_ttl_ms: DEFAULT_TOMBSTONE_TTL_MS,
            floor: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// Sets how long deletes are remembered.
    pub fn with_tombstone_ttl(mut self, ttl: std::time::Duration) -> Store {
        self.tombstone_ttl_ms = ttl.as_millis() as u64;
        self
    }

    /// Sets the dictionary size (0: no dictionary compression).
    pub fn with_dictionary_size(mut self, bytes: usize) -> Store {
        self.dict_size = bytes;
        self
    }

    /// The dictionary, once built.
    pub fn dictionary(&self) -> Option<&Dictionary> {
        self.dict.get()
    }

    /// The dictionary to seal `value` with; until there is one, collects `value` towards it.
    /// The first `dict_size` bytes of values worth compressing become the dictionary, after
    /// which collecting stops for good (one atomic check per write).
    fn dictionary_for(&self, value: &[u8]) -> Option<&Dictionary> {
        if let Some(d) = self.dict.get() {
            return Some(d);
        }
        if self.dict_size == 0 || value.len() < seal::MIN_COMPRESS_LEN {
            return None;
        }
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if self.dict.get().is_none() {
            let len = samples.len;
            let buf = samples
                .buf
                .get_or_insert_with(|| SecretBuf::zeroed(self.dict_size));
            let take = value.len().min(self.dict_size - len);
            buf.as_mut_slice()[len..len + take].copy_from_slice(&value[..take]);
            samples.len += take;
            if samples.len >= self.dict_size {
                let dict = Dictionary::from_secret(samples.buf.take().expect("just filled"));
                samples.len = 0;
                tracing::info!(
                    id = format_args!("{:#010x}", dict.id()),
                    bytes = dict.len(),
                    "built a compression dictionary"
                );
                let _ = self.dict.set(dict);
            }
        }
        None
    }

    /// Applies a shard's change in bytes held to the store's total.
    fn track(&self, before: usize, after: usize) {
        if after >= before {
            self.bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    fn over_limit(&self) -> bool {
        self.max_bytes > 0 && self.bytes.load(Ordering::Relaxed) > self.max_bytes
    }

    /// Evicts from `shard` by CLOCK until the store is within its limit or the shard has
    /// nothing left to give, sparing the entry of hash `spare` (the write that triggered
    /// it); returns the evicted entries (to be freed outside the lock).
    fn evict(&self, shard: &mut Shard, spare: Option<u64>) -> Vec<Entry> {
        let mut evicted = Vec::new();
        let before = shard.held();
        // Every entry gets at most one second chance per call, so this ends.
        let mut steps = 2 * shard.clock.len() + 1;
        while self.bytes.load(Ordering::Relaxed) - (before - shard.held()) > self.max_bytes
            && steps > 0
        {
            steps -= 1;
            let Some(hash) = shard.clock.pop_front() else {
                break;
            };
            if Some(hash) == spare {
                shard.clock.push_back(hash);
                continue;
            }
            match shard.table.find_entry(hash, |e| self.hash(e.key()) == hash) {
                Ok(mut slot) if slot.get().accessed() => {
                    slot.get_mut().touch(false);
                    shard.clock.push_back(hash);
                }
                Ok(slot) => {
                    let (entry, _) = slot.remove();
                    shard.usage.remove(&entry);
                    evicted.push(entry);
                }
                Err(_) => {} // a deleted key's hash: drop it from the ring
            }
        }
        shard.recount_structure();
        self.track(before, shard.held());
        self.counters
            .evicted
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        evicted
    }

    /// Rebuilds the ring from the table when stale hashes have made it twice as long.
    fn compact_clock(&self, shard: &mut Shard) {
        if shard.clock.len() > 2 * shard.table.len() + 64 {
            shard.clock = shard.table.iter().map(|e| self.hash(e.key())).collect();
        }
    }

    /// The memory limit in bytes (0: none).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// What sealing a large hash's records takes.
    pub fn sealer(&self) -> seal::records::Sealer<'_> {
        seal::records::Sealer {
            cipher: self.cipher(),
            tags: &self.tags,
        }
    }

    pub fn cipher(&self) -> Option<&Cipher> {
        self.cipher.as_ref()
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of `hash`, locked.
    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        self.shards[shard_index(hash)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// `f` of the stored bytes under `key` and the value's type, under the shard's lock, if
    /// it holds a live entry; an expired entry is removed on the spot.
    fn live_stored<R>(&self, key: &[u8], f: impl FnOnce(&[u8], Kind) -> R) -> Option<R> {
        let now = &Now::default();
        let hash = self.hash(key);
        let mut shard = self.shard(hash);
        match shard.table.find_mut(hash, |e| e.key() == key) {
            Some(e) if e.live(now) => {
                if !e.accessed() {
                    e.touch(true);
                }
                Some(f(e.stored(), e.kind()))
            }
            Some(e) if e.expired(now) => {
                let gone = self.remove_locked(&mut shard, hash, key, |e| e.expired(now));
                drop(shard);
                if let Some(gone) = gone {
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    self.keep_marks(std::slice::from_ref(&gone), now.ms());
                }
                None
            }
            // A tombstone: absent to reads, kept until it expires.
            Some(_) | None => None,
        }
    }

    /// The value under `key`, if any, whatever its type.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>, SealError> {
        self.read(key, true, |found| {
            found.map(|(value, _)| value.into_bytes())
        })
    }

    /// The value under `key` and its type, if any; a hash's value is left unopened (empty):
    /// a GET of a hash answers WRONGTYPE, from the same lookup, without copying or opening
    /// what may be a large hash.
    pub fn get_typed(&self, key: &[u8]) -> Result<Option<(Bytes, Kind)>, SealError> {
        self.read(key, false, |found| {
            found.map(|(value, kind)| (value.into_bytes(), kind))
        })
    }

    /// `f` of the value under `key` and its type (a hash's unopened and empty unless
    /// `hashes`), or of `None`; called once. A value stored raw is lent from its entry under
    /// the shard's lock, with no copy (a GET's answer is written straight from it), so `f`
    /// must not use the store; any other is copied out and opened after the lock is
    /// released.
    pub fn read<R>(
        &self,
        key: &[u8],
        hashes: bool,
        mut f: impl FnMut(Option<(Value<'_>, Kind)>) -> R,
    ) -> Result<R, SealError> {
        let found = self.live_stored(key, |stored, kind| {
            if kind == Kind::Hash && !hashes {
                // Left unopened, and uncopied, however it is stored.
                return Ok(f(Some((Value::Lent(&[]), kind))));
            }
            match seal::raw_value(stored) {
                Some(value) => Ok(f(Some((Value::Lent(value), kind)))),
                // (A long string is copied without the room at its end.)
                None => Err((
                    Bytes::copy_from_slice(seal::segments::without_room(stored)),
                    kind,
                )),
            }
        });
        let counter = match found {
            Some(_) => &self.counters.hits,
            None => &self.counters.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match found {
            None => Ok(f(None)),
            Some(Ok(done)) => Ok(done),
            Some(Err((stored, kind))) => {
                let value = seal::open_with(key, &stored, self.cipher(), self.dictionary())?;
                Ok(f(Some((Value::Opened(value), kind))))
            }
        }
    }

    /// The version of what `key` holds (a value or a tombstone), unless expired.
    pub fn version(&self, key: &[u8]) -> Option<u64> {
        let hash = self.hash(key);
        let now = &Now::default();
        self.shard(hash)
            .find(hash, key)
            .filter(|e| !e.expired(now))
            .map(Entry::version)
    }

    /// Whether `key` holds a live entry.
    pub fn exists(&self, key: &[u8]) -> bool {
        let hash = self.hash(key);
        let now = &Now::default();
        self.shard(hash)
            .find(hash, key)
            .is_some_and(|e| e.live(now))
    }

    /// Stores `value` under `key` at `version` with `opts`.
    ///
    /// A write older than the entry's version is dropped but reported as applied: to the
    /// writer it is as if it happened and was then overwritten by the newer one.
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        version: u64,
        opts: SetOptions,
    ) -> Result<SetOutcome, StoreError> {
        let now = &Now::default();
        let expires_at = if opts.expires_at > 0 {
            opts.expires_at
        } else if opts.ttl_ms > 0 {
            now.ms().saturating_add(opts.ttl_ms)
        } else {
            0
        };
        if key.len() > MAX_KEY_LEN {
            return Err(StoreError::TooLarge {
                needs: key.len(),
                max: MAX_KEY_LEN,
            });
        }
        // Build (and compress) the entry before taking the shard lock.
        let dict = self.dictionary_for(value);
        let mut fresh = Entry::new(version, expires_at, key, value, self.cipher(), dict);
        fresh.set_alone(opts.alone);
        if self.max_bytes > 0 && fresh.footprint() > self.max_bytes {
            return Err(StoreError::TooLarge {
                needs: fresh.footprint(),
                max: self.max_bytes,
            });
        }
        self.counters.sets.fetch_add(1, Ordering::Relaxed);
        let (applied, old) = self.install(fresh, |current, fresh| {
            let Some(current) = current else {
                return (!opts.xx, (!opts.xx, None));
            };
            let live = current.live(now);
            let old = (live && opts.get).then(|| Bytes::copy_from_slice(current.stored()));
            if (opts.nx && live) || (opts.xx && !live) {
                (false, (false, old))
            } else if current.version() > version {
                self.counters.stale_writes.fetch_add(1, Ordering::Relaxed);
                (false, (true, old))
            } else {
                if opts.keep_ttl && live {
                    fresh.set_expires_at(current.expires_at());
                }
                (true, (true, old))
            }
        });
        let old = old
            .map(|stored| seal::open_with(key, &stored, self.cipher(), self.dictionary()))
            .transpose()?;
        Ok(SetOutcome { applied, old })
    }

    /// Deletes `key` unless it holds a version newer than `version`, leaving a tombstone for
    /// `--tombstone-ttl`. Returns whether a live value was removed.
    pub fn del(&self, key: &[u8], version: u64) -> bool {
        self.del_with(key, version, self.tombstone_ttl_ms, false)
    }

    /// Removes `key`'s entry, leaving no tombstone, if it is the write of `version`: a
    /// program's change its partner refused (`Op::Revoke`). The partner's value for the key
    /// comes back at this worker's refill. Whether it was removed.
    pub fn revoke(&self, key: &[u8], version: u64) -> bool {
        let hash = self.hash(key);
        let mut shard = self.shard(hash);
        let gone = self.remove_locked(&mut shard, hash, key, |e| e.version() == version);
        drop(shard);
        gone.is_some()
    }

    /// Removes `key`'s entry from its locked `shard` if `pred` holds for it, with the
    /// accounting; returns it, for the caller to free once the lock is let go.
    fn remove_locked(
        &self,
        shard: &mut Shard,
        hash: u64,
        key: &[u8],
        pred: impl FnOnce(&Entry) -> bool,
    ) -> Option<Entry> {
        let before = shard.held();
        let gone = shard.remove_if(hash, key, pred);
        shard.recount_structure();
        self.track(before, shard.held());
        gone
    }

    /// Marks `key`'s entry as a write its partner missed, if it is still the write of
    /// `version` (the orchestrator learned of the miss after the write: see
    /// `Op::PartnerMissed`); whether it was.
    pub fn mark_alone(&self, key: &[u8], version: u64) -> bool {
        let hash = self.hash(key);
        let mut shard = self.shard(hash);
        match shard.table.find_mut(hash, |e| e.key() == key) {
            Some(e) if e.version() == version => {
                e.set_alone(true);
                true
            }
            _ => false,
        }
    }

    /// [`Store::del`] of a delete the partner will not get (`flags::SOLO`) when `alone`: its
    /// tombstone is marked so.
    pub fn del_alone(&self, key: &[u8], version: u64, alone: bool) -> bool {
        self.del_with(key, version, self.tombstone_ttl_ms, alone)
    }

    /// [`Store::del`] with a tombstone kept `ttl_ms` (adapter-mode invalidations need only
    /// outlast the cache fills in flight).
    pub fn del_for(&self, key: &[u8], version: u64, ttl_ms: u64) -> bool {
        self.del_with(key, version, ttl_ms, false)
    }

    fn del_with(&self, key: &[u8], version: u64, ttl_ms: u64, alone: bool) -> bool {
        let now = now_ms();
        let mut tomb = Entry::tombstone(version, now.saturating_add(ttl_ms), key);
        tomb.set_alone(alone);
        self.install(tomb, |current, _| match current {
            Some(c) if c.version() > version => (false, false),
            Some(c) => (true, c.live(now)),
            None => (true, false),
        })
    }

    /// Merges an entry from a partner's snapshot: it replaces what is here only if it is
    /// newer, so live writes taken during a resync are never overwritten by older copies,
    /// and tombstones carry deletes across. `None` if the bytes are not an entry.
    pub fn merge(&self, raw: &[u8]) -> Option<Merged> {
        self.merge_above(raw, 0)
    }

    /// [`Store::merge`], except that an entry older than `floor` (a version) is taken only
    /// where this store holds its key. A worker that serves reads while it merges its
    /// partner's copy passes the start of its own delete memory (see
    /// [`Store::delete_horizon`]): a key it deleted before then left no tombstone, so an old
    /// copy of it may be a delete it forgot, and must not come back.
    pub fn merge_above(&self, raw: &[u8], floor: u64) -> Option<Merged> {
        let incoming = Entry::from_raw(raw)?;
        if self.refuses(&incoming) {
            return Some(Merged::Unsealed);
        }
        if incoming.expired(now_ms()) {
            return Some(Merged::Kept);
        }
        let version = incoming.version();
        let taken = self.install(incoming, |current, _| match current {
            Some(c) if c.version() >= version => (false, false),
            None if version < floor => (false, false),
            _ => (true, true),
        });
        Some(if taken { Merged::Taken } else { Merged::Kept })
    }

    /// Whether `incoming` is a value this store must not take from a partner: a plain one
    /// when this store encrypts (see [`Merged::Unsealed`]). Counted.
    fn refuses(&self, incoming: &Entry) -> bool {
        let refused = self.cipher.is_some()
            && !incoming.is_tombstone()
            && !seal::is_encrypted(incoming.stored());
        if refused {
            self.counters
                .refused_unsealed
                .fetch_add(1, Ordering::Relaxed);
        }
        refused
    }

    /// The oldest version whose deletes this store still remembers: a write older than
    /// this may have been deleted without a trace (its tombstone expired).
    pub fn delete_horizon(&self) -> u64 {
        twincache_protocol::version::at_ms(now_ms().saturating_sub(self.tombstone_ttl_ms))
    }

    /// Removes every entry (values and tombstones) older than `version`, without leaving
    /// tombstones; returns how many. A worker about to refill from its partner calls it with
    /// the partner's [`Store::delete_horizon`]: what the partner deleted before then it no
    /// longer remembers, so this worker's older copies could bring those keys back, and
    /// whatever of them the partner still holds arrives with its snapshot.
    pub fn drop_older_than(&self, version: u64) -> usize {
        (0..SHARDS)
            .map(|n| self.remove_where(n, |e| e.version() < version))
            .sum()
    }

    /// Removes the entries of shard `n` for which `doomed` holds, with their accounting;
    /// returns how many. They are freed after the shard's lock is released.
    fn remove_where(&self, n: usize, doomed: impl FnMut(&Entry) -> bool) -> usize {
        self.take_where(n, doomed).len()
    }

    /// [`Store::remove_where`], returning the removed entries for the caller to free (outside
    /// the shard's lock).
    fn take_where(&self, n: usize, mut doomed: impl FnMut(&Entry) -> bool) -> Vec<Entry> {
        let mut shard = self.shards[n % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = shard.held();
        let Shard { table, usage, .. } = &mut *shard;
        let gone: Vec<Entry> = table.extract_if(|e| doomed(e)).collect();
        for e in &gone {
            usage.remove(e);
        }
        shard.recount_structure();
        self.track(before, shard.held());
        self.compact_clock(&mut shard);
        gone
    }

    /// [`Store::merge`] for an entry compressed against `theirs`, a dictionary this worker
    /// does not use: the value is opened and sealed again with this worker's.
    pub fn merge_resealed(&self, raw: &[u8], theirs: &Dictionary, floor: u64) -> Option<Merged> {
        let incoming = Entry::from_raw(raw)?;
        if self.refuses(&incoming) {
            return Some(Merged::Unsealed);
        }
        // Tombstones and records (a large hash's, a long string's) hold nothing compressed
        // against a dictionary.
        if incoming.is_tombstone() || seal::records::is_records(incoming.stored()) {
            return self.merge_above(raw, floor);
        }
        let stored = Bytes::copy_from_slice(incoming.stored());
        let value = seal::open_with(incoming.key(), &stored, self.cipher(), Some(theirs)).ok()?;
        let resealed = Entry::new(
            incoming.version(),
            incoming.expires_at(),
            incoming.key(),
            &value,
            self.cipher(),
            self.dictionary(),
        )
        .with_kind(incoming.kind());
        self.merge_above(&resealed.0, floor)
    }

    /// Takes `dict` as this worker's dictionary if it has none yet and uses dictionaries (a
    /// resyncing worker then shares its partner's, and entries copy as they are). Returns
    /// whether the worker's dictionary is now `dict`. A worker with dictionaries off (size
    /// 0, as with encryption unless asked for: see `Config::dictionary_bytes`) never takes
    /// one: it would compress every later value against it.
    pub fn adopt_dictionary(&self, dict: Dictionary) -> bool {
        if self.dict_size == 0 {
            return false;
        }
        let id = dict.id();
        let _ = self.dict.set(dict);
        *self.samples.lock().unwrap_or_else(|e| e.into_inner()) = Samples::default();
        self.dict.get().map(Dictionary::id) == Some(id)
    }

    /// Makes room for `entries` more entries spread over the shards, so a resync does not
    /// spend its time growing tables (each growth re-hashes every key it holds).
    pub fn reserve(&self, entries: usize) {
        // The count comes from a peer: reserve no more than could ever fit (an entry takes
        // at least 64 bytes), and at most a few million, past which tables grow as usual.
        let fits = match self.max_bytes {
            0 => usize::MAX,
            max => max / 64,
        };
        let entries = entries.min(fits).min(MAX_RESERVE);
        let per_shard = entries / SHARDS + entries / SHARDS / 8 + 1;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = shard.held();
            shard.before_growth(per_shard);
            shard.table.reserve(per_shard, |e| self.hash(e.key()));
            shard.recount_structure();
            self.track(before, shard.held());
        }
    }

    /// Calls `each` with every entry of shard `n` as stored (tombstones included, expired
    /// ones not), under the shard's lock: `each` should only copy. A snapshot appends them
    /// straight to its outgoing buffer, with no allocation per entry.
    pub fn snapshot_shard(&self, n: usize, mut each: impl FnMut(&[u8])) {
        let now = now_ms();
        let shard = self.shards[n % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for e in shard.table.iter().filter(|e| !e.expired(now)) {
            each(&e.0);
        }
    }

    /// [`Store::snapshot_shard`] for the entries whose key is in `slots` (a slot move's
    /// share of the shard).
    pub fn snapshot_slots(&self, n: usize, slots: SlotRange, mut each: impl FnMut(&[u8])) {
        let now = now_ms();
        let shard = self.shards[n % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for e in shard.table.iter().filter(|e| !e.expired(now)) {
            if slots.holds_key(e.key()) {
                each(&e.0);
            }
        }
    }

    /// Removes every entry (values and tombstones) in `slots`, without leaving tombstones:
    /// the slots moved to another pair, which holds them now. Returns how many.
    pub fn drop_slots(&self, slots: SlotRange) -> usize {
        (0..SHARDS)
            .map(|n| self.remove_where(n, |e| slots.holds_key(e.key())))
            .sum()
    }

    pub const SHARDS: usize = SHARDS;

    /// Puts `fresh` in its key's place if `decide` says so. `decide` sees the entry there (if
    /// any) and `fresh` (which it may adjust) and returns whether to replace, and what to
    /// report. Accounting, the CLOCK ring, and eviction past the memory limit happen here;
    /// replaced and evicted entries are freed after the lock is released.
    fn install<T>(
        &self,
        mut fresh: Entry,
        decide: impl FnOnce(Option<&mut Entry>, &mut Entry) -> (bool, T),
    ) -> T {
        let floor = self.floor();
        if fresh.version() < floor {
            // Older than the last flush: as if a delete at the flush's version held the key.
            let mut flushed = Entry::tombstone(floor, 0, fresh.key());
            return decide(Some(&mut flushed), &mut fresh).1;
        }
        let hash = self.hash(fresh.key());
        let mut shard = self.shard(hash);
        shard.before_growth(1);
        let bytes_before = shard.held();
        let Shard {
            table,
            usage,
            clock,
            ..
        } = &mut *shard;
        let (report, replaced) =
            match table.entry(hash, |e| e.key() == fresh.key(), |e| self.hash(e.key())) {
                Slot::Occupied(mut slot) => {
                    let current = slot.get_mut();
                    let (replace, report) = decide(Some(&mut *current), &mut fresh);
                    if replace {
                        usage.remove(current);
                        usage.add(&fresh);
                        (report, Some(current.overwrite(fresh)))
                    } else {
                        (report, None)
                    }
                }
                Slot::Vacant(slot) => {
                    let (replace, report) = decide(None, &mut fresh);
                    if replace {
                        // Inserted with the accessed bit clear (classic CLOCK): were writes
                        // to set it, a ring of fresh entries would make the hand clear every
                        // bit before evicting, which is FIFO. This write is spared below.
                        usage.add(&fresh);
                        slot.insert(fresh);
                        clock.push_back(hash);
                    }
                    (report, None)
                }
            };
        shard.recount_structure();
        self.track(bytes_before, shard.held());
        let mut evicted = Vec::new();
        if self.over_limit() {
            evicted = self.evict(&mut shard, Some(hash));
        }
        self.compact_clock(&mut shard);
        drop(shard);
        drop(replaced);
        drop(evicted);
        // This shard alone could not make room (the write is larger than all it held):
        // evict from the others.
        self.evict_anywhere(Some(hash));
        report
    }

    /// Evicts from shard after shard until the store is within its limit, sparing the entry
    /// of hash `spare`. Takes one shard's lock at a time; call it holding none.
    fn evict_anywhere(&self, spare: Option<u64>) {
        for n in 0..SHARDS {
            if !self.over_limit() {
                break;
            }
            let mut other = self.shards[n].lock().unwrap_or_else(|e| e.into_inner());
            let gone = self.evict(&mut other, spare);
            drop(other);
            drop(gone);
        }
    }

    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let mut u = shard.usage;
            u.bytes += shard.structure;
            usage.merge(u);
        }
        usage
    }

    /// Removes the expired entries of shard `n` (mod the shard count); returns how many.
    /// Reads already hide and drop expired entries; this reclaims the ones nobody reads. One
    /// shard per call keeps each call's cost a fixed fraction of the store.
    pub fn sweep_shard(&self, n: usize) -> usize {
        let now = now_ms();
        let gone = self.take_where(n, |e| e.expired(now));
        if !gone.is_empty() {
            self.counters
                .expired
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            self.keep_marks(&gone, now);
        }
        gone.len()
    }

    /// Expired entries just removed that were written alone leave a marked tombstone at
    /// their version (kept `--tombstone-ttl`), unless the key was written again meanwhile:
    /// their mark still refuses a partner's copy computed from the value they replaced
    /// (`Store::replicate`), and the expiry reaches the partner at its refill.
    fn keep_marks(&self, gone: &[Entry], now: u64) {
        for e in gone.iter().filter(|e| e.alone() && !e.is_tombstone()) {
            let mut tomb = Entry::tombstone(
                e.version(),
                now.saturating_add(self.tombstone_ttl_ms),
                e.key(),
            );
            tomb.set_alone(true);
            self.install(tomb, |current, _| (current.is_none(), ()));
        }
    }

    /// Sweeps one shard every `interval` until `shutdown`; a full pass takes 64 intervals.
    pub async fn sweep_forever(
        self: std::sync::Arc<Self>,
        interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        for n in 0.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            self.sweep_shard(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(s: &Store, k: &[u8], v: &[u8], version: u64) -> bool {
        s.set(k, v, version, SetOptions::default()).unwrap().applied
    }

    #[test]
    fn set_get_del() {
        let s = Store::default();
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(set(&s, b"k", b"v", 1));
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(s.exists(b"k"));
        assert!(s.del(b"k", 2));
        assert!(!s.del(b"k", 3));
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(!s.exists(b"k"));
    }

    #[test]
    fn newest_version_wins_whatever_the_arrival_order() {
        let s = Store::default();
        assert!(set(&s, b"k", b"new", 20));
        assert!(
            set(&s, b"k", b"old", 10),
            "a stale write reads as applied, then overwritten"
        );
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(s.counters.stale_writes.load(Ordering::Relaxed), 1);
        assert!(
            !s.del(b"k", 15),
            "an older delete must not remove a newer write"
        );
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        assert!(
            set(&s, b"k", b"new", 20),
            "the same version again (a retry) is accepted"
        );
    }

    #[test]
    fn nx_xx_and_get() {
        let s = Store::default();
        let nx = SetOptions {
            nx: true,
            get: true,
            ..Default::default()
        };
        let xx = SetOptions {
            xx: true,
            get: true,
            ..Default::default()
        };
        assert_eq!(
            s.set(b"k", b"a", 1, xx).unwrap(),
            SetOutcome {
                applied: false,
                old: None
            }
        );
        assert_eq!(
            s.set(b"k", b"a", 2, nx).unwrap(),
            SetOutcome {
                applied: true,
                old: None
            }
        );
        let old = Some(Bytes::from_static(b"a"));
        assert_eq!(
            s.set(b"k", b"b", 3, nx).unwrap(),
            SetOutcome {
                applied: false,
                old: old.clone()
            }
        );
        assert_eq!(
            s.set(b"k", b"c", 4, xx).unwrap(),
            SetOutcome { applied: true, old }
        );
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"c"[..]));
    }

    /// An operation asks the clock only for an entry that expires, and then once.
    #[test]
    fn the_clock_is_read_only_when_an_expiry_asks_and_once() {
        let now = Now::default();
        let never = Entry::new(1, 0, b"k", b"v", None, None);
        assert!(never.live(&now));
        assert_eq!(
            now.0.get(),
            None,
            "an entry that never expires asks no time"
        );
        let later = Entry::new(1, now_ms() + 60_000, b"k", b"v", None, None);
        assert!(later.live(&now));
        assert!(now.0.get().is_some(), "read when asked");
        // Once read, the same time for the rest of the operation: a second reading (years
        // past this one) would find the entry expired.
        let taken = Now(std::cell::Cell::new(Some(1_000)));
        let soon = Entry::new(1, 1_001, b"k", b"v", None, None);
        assert!(soon.live(&taken) && soon.live(&taken));
        assert!(Entry::new(1, 1_000, b"k", b"v", None, None).expired(&taken));
    }

    #[test]
    fn expired_entries_are_never_returned() {
        let s = Store::default();
        let short = SetOptions {
            ttl_ms: 30,
            ..Default::default()
        };
        s.set(b"k", b"v", 1, short).unwrap();
        assert!(s.exists(b"k"));
        assert_eq!(s.version(b"k"), Some(1));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(s.version(b"k"), None);
        assert_eq!(s.get(b"k").unwrap(), None);
        assert!(!s.exists(b"k"));
        assert_eq!(s.usage().keys, 0, "removed on access");
        // NX treats an expired key as absent.
        s.set(b"n", b"v", 1, short).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        let nx = SetOptions {
            nx: true,
            ..Default::default()
        };
        assert!(s.set(b"n", b"w", 2, nx).unwrap().applied);
    }

    #[test]
    fn encrypted_store_round_trips_and_hides_values() {
        let s = Store::new(Some(Cipher::new(&[3; 32])), 0);
        let value = b"plaintext that must not be stored as is".repeat(5);
        s.set(b"k", &value, 1, SetOptions::default()).unwrap();
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&value[..]));
        let hash = s.hash(b"k");
        let shard = s.shard(hash);
        let stored = shard.find(hash, b"k").unwrap().stored();
        assert!(!stored
            .windows(16)
            .any(|w| value.windows(16).any(|v| v == w)));
    }

    #[test]
    fn the_sweep_reclaims_expired_keys_nobody_reads() {
        let s = Store::default();
        let short = SetOptions {
            ttl_ms: 20,
            ..Default::default()
        };
        for i in 0..1000 {
            s.set(format!("k{i}").as_bytes(), b"v", 1, short).unwrap();
        }
        s.set(b"forever", b"v", 1, SetOptions::default()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(40));
        let swept: usize = (0..SHARDS).map(|n| s.sweep_shard(n)).sum();
        assert_eq!(swept, 1000);
        assert_eq!(s.usage().keys, 1);
        assert_eq!(s.counters.expired.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn usage_accounts_logical_and_stored_bytes() {
        let s = Store::default();
        let value = br#"{"name":"a","n":1}"#.repeat(20);
        s.set(b"k", &value, 1, SetOptions::default()).unwrap();
        let u = s.usage();
        assert_eq!(u.keys, 1);
        assert_eq!(u.logical_bytes, 1 + value.len());
        assert!(u.stored_bytes < value.len() / 2, "{u:?}");
        assert!(u.bytes > u.stored_bytes);
        s.set(b"k", b"small", 2, SetOptions::default()).unwrap();
        assert_eq!(s.usage().logical_bytes, 1 + 5);
        assert!(s.del(b"k", 3));
        let u = s.usage();
        assert_eq!(
            (u.keys, u.tombstones, u.logical_bytes),
            (0, 1, 1),
            "the delete is remembered"
        );
    }

    /// Bytes lz4 cannot shrink.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 1u64;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect()
    }

    fn fill(s: &Store, range: std::ops::Range<usize>) {
        for i in range {
            s.set(
                format!("key:{i}").as_bytes(),
                &[b'x'; 100],
                1,
                SetOptions::default(),
            )
            .unwrap();
        }
    }

    #[test]
    fn memory_limit_evicts_cold_keys_and_keeps_hot_ones() {
        let s = Store::new(None, 256 * 1024);
        fill(&s, 0..100);
        // Keep reading the first 100 keys while writing ten times what fits.
        for chunk in 1..150 {
            for i in 0..100 {
                let hot = s.get(format!("key:{i}").as_bytes()).unwrap();
                assert!(hot.is_some(), "hot key {i} evicted after chunk {chunk}");
            }
            fill(&s, chunk * 100..chunk * 100 + 100);
        }
        let u = s.usage();
        assert!(u.bytes <= 256 * 1024, "{u:?}");
        assert!(s.counters.evicted.load(Ordering::Relaxed) > 1000);
        assert_eq!(
            s.bytes.load(Ordering::Relaxed),
            u.bytes,
            "the global total matches the shards"
        );
        assert_eq!(size_class(1060), 1280);
        assert_eq!(size_class(24), 24);
        assert!(
            s.get(b"key:150").unwrap().is_none(),
            "a cold early key is gone"
        );
    }

    #[test]
    fn a_value_larger_than_the_limit_is_refused() {
        let s = Store::new(None, 100_000);
        let err = s
            .set(b"k", &noise(200_000), 1, SetOptions::default())
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        // Smaller than the limit but larger than everything held: the rest goes.
        fill(&s, 0..50);
        s.set(b"big", &noise(80_000), 1, SetOptions::default())
            .unwrap();
        assert!(s.usage().bytes <= 100_000, "{:?}", s.usage());
        assert!(s.get(b"big").unwrap().is_some());
    }

    #[test]
    fn eviction_cost_does_not_grow_with_deleted_keys() {
        let s = Store::new(None, 64 * 1024);
        for round in 0..20 {
            fill(&s, round * 100..round * 100 + 100);
            for i in round * 100..round * 100 + 90 {
                s.del(format!("key:{i}").as_bytes(), 2);
            }
        }
        let rings: usize = s
            .shards
            .iter()
            .map(|sh| sh.lock().unwrap().clock.len())
            .sum();
        let keys = s.usage().keys;
        assert!(
            rings <= 2 * keys + 64 * SHARDS,
            "ring {rings} for {keys} keys"
        );
    }

    #[test]
    fn the_store_builds_a_dictionary_and_compresses_better_with_it() {
        let s = Store::new(None, 0).with_dictionary_size(4096);
        let record = |i: usize| {
            format!(
                r#"{{"id":{i},"username":"user_{i}","email":"user{i}@example.com","preferences":{{"theme":"dark","language":"en","notifications":{{"email":true}}}},"bio":"bio of user {i}"}}"#
            )
        };
        for i in 0..40 {
            s.set(
                format!("early:{i}").as_bytes(),
                record(i).as_bytes(),
                1,
                SetOptions::default(),
            )
            .unwrap();
        }
        assert!(s.dictionary().is_some(), "built from the first values");
        let before = s.usage().stored_bytes;
        for i in 1000..1100 {
            s.set(
                format!("late:{i}").as_bytes(),
                record(i).as_bytes(),
                1,
                SetOptions::default(),
            )
            .unwrap();
        }
        let per_late = (s.usage().stored_bytes - before) / 100;
        assert!(
            per_late * 2 < record(1050).len(),
            "{per_late} bytes stored per {}-byte record",
            record(1050).len()
        );
        for i in [0, 39, 1000, 1099] {
            let key = if i < 1000 {
                format!("early:{i}")
            } else {
                format!("late:{i}")
            };
            assert_eq!(
                s.get(key.as_bytes()).unwrap().as_deref(),
                Some(record(i).as_bytes())
            );
        }
    }

    #[test]
    fn deletes_leave_tombstones_that_stop_older_writes() {
        let s = Store::default();
        set(&s, b"k", b"v", 10);
        assert!(s.del(b"k", 20));
        assert_eq!(s.usage().keys, 0);
        assert_eq!(s.usage().tombstones, 1);
        assert!(
            set(&s, b"k", b"late", 15),
            "a late older write reads as applied..."
        );
        assert_eq!(
            s.get(b"k").unwrap(),
            None,
            "...but does not bring the key back"
        );
        assert!(!s.exists(b"k"));
        // A delete of an absent key is remembered too.
        assert!(!s.del(b"never", 30));
        assert!(set(&s, b"never", b"old", 25));
        assert_eq!(s.get(b"never").unwrap(), None);
        // A newer write replaces the tombstone.
        assert!(set(&s, b"k", b"new", 40));
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"new"[..]));
        // Tombstones expire.
        let short = Store::default().with_tombstone_ttl(std::time::Duration::from_millis(20));
        short.del(b"x", 1);
        std::thread::sleep(std::time::Duration::from_millis(40));
        assert_eq!((0..SHARDS).map(|n| short.sweep_shard(n)).sum::<usize>(), 1);
        assert_eq!(short.usage().tombstones, 0);
    }

    /// `raw` with the little-endian `u32` at `at` replaced by `n`.
    fn with_u32(raw: &[u8], at: usize, n: u32) -> Vec<u8> {
        let mut raw = raw.to_vec();
        raw[at..at + 4].copy_from_slice(&n.to_le_bytes());
        raw
    }

    #[test]
    fn from_raw_checks_every_header_field() {
        let far = now_ms() + 3_600_000;
        let value = b"abcdefgh".repeat(32);
        let raw = Entry::new(5, far, b"key", b"small", None, None).0;
        let lz4 = Entry::new(5, far, b"key", &value, None, None).0;
        assert_eq!(lz4[HEADER + 3], 0x01, "an lz4 entry");
        let sealed = Entry::new(5, far, b"key", &value, Some(&Cipher::new(&[1; 32])), None).0;
        let tomb = Entry::tombstone(5, far, b"key").0;
        for good in [&raw, &lz4, &sealed, &tomb] {
            let e = Entry::from_raw(good).expect("a well-formed entry");
            assert_eq!(e.key(), b"key");
        }
        // The sender's accessed bit is cleared, and does not count as length.
        let touched = with_u32(&raw, 20, 5 | ACCESSED as u32);
        let e = Entry::from_raw(&touched).unwrap();
        assert!(!e.accessed());
        assert_eq!(e.value_len(), 5);
        // So is its written-alone bit, which a snapshot does not send either.
        let alone = with_u32(&raw, 20, 5 | ALONE as u32);
        let mut e = Entry::from_raw(&alone).unwrap();
        assert!(!e.alone());
        assert_eq!(e.value_len(), 5);
        e.set_alone(true);
        e.touch(true);
        assert!(e.alone() && e.accessed());
        assert_eq!(e.value_len(), 5);
        assert_eq!(
            {
                let mut sent = e.0.to_vec();
                unmark_sent(&mut sent);
                sent
            },
            with_u32(&raw, 20, 5 | ACCESSED as u32)
        );
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("no header", raw[..HEADER - 1].to_vec()),
            ("nothing stored", raw[..HEADER + 3].to_vec()),
            ("key past the end", with_u32(&raw, 16, 100)),
            ("key length u32::MAX", with_u32(&raw, 16, u32::MAX)),
            ("key eats the stored bytes", with_u32(&raw, 16, 3 + 6)),
            ("raw value length wrong", with_u32(&raw, 20, 6)),
            (
                "raw value length huge",
                with_u32(&raw, 20, (ACCESSED - 1) as u32),
            ),
            ("lz4 value length wrong", with_u32(&lz4, 20, 255)),
            (
                "lz4 lying about its length",
                with_u32(&with_u32(&lz4, 20, 1 << 30), HEADER + 4, 1 << 30),
            ),
            (
                "sealed value length past any expansion",
                with_u32(&sealed, 20, 1 << 29),
            ),
            ("tombstone with a length", with_u32(&tomb, 20, 1)),
            ("tombstone with more bytes", [&tomb[..], b"x"].concat()),
            ("unknown layout", {
                let mut r = raw.to_vec();
                r[HEADER + 3] = 0x09;
                r
            }),
        ];
        for (what, raw) in bad {
            assert!(Entry::from_raw(&raw).is_none(), "{what}");
        }
    }

    #[test]
    fn an_encrypting_store_refuses_unsealed_values_from_a_partner() {
        let key = Cipher::new(&[4; 32]);
        let plain = Store::default();
        set(&plain, b"raw", b"small", 10);
        set(&plain, b"lz4", &b"abcdefgh".repeat(40), 10);
        plain.del(b"gone", 10);
        let sealed = Store::new(Some(key.clone()), 0);
        set(&sealed, b"sealed", b"value", 10);
        let target = Store::new(Some(key), 0);
        let mut outcomes = Vec::new();
        for source in [&plain, &sealed] {
            for raw in snapshot(source) {
                let key = Entry::from_raw(&raw).unwrap().key().to_vec();
                outcomes.push((key, target.merge(&raw).unwrap()));
            }
        }
        outcomes.sort();
        assert_eq!(
            outcomes,
            [
                (b"gone".to_vec(), Merged::Taken), // a tombstone holds no value
                (b"lz4".to_vec(), Merged::Unsealed),
                (b"raw".to_vec(), Merged::Unsealed),
                (b"sealed".to_vec(), Merged::Taken),
            ]
        );
        assert_eq!(target.counters.refused_unsealed.load(Ordering::Relaxed), 2);
        assert_eq!(target.get(b"raw").unwrap(), None);
        // Re-sealing against a partner's dictionary refuses them too, before opening them.
        let dict = Dictionary::new(b"abcdefgh".repeat(40));
        let raw = snapshot(&plain)
            .into_iter()
            .find(|r| Entry::from_raw(r).unwrap().key() == b"lz4")
            .unwrap();
        assert_eq!(
            target.merge_resealed(&raw, &dict, 0),
            Some(Merged::Unsealed)
        );
        // A store without a key takes plain values as before.
        assert_eq!(Store::default().merge(&raw), Some(Merged::Taken));
    }

    /// How much `stored_bytes` grows when `guess` is written under a fresh key.
    fn growth(s: &Store, n: usize, guess: &str) -> usize {
        let before = s.usage().stored_bytes;
        s.set(
            format!("attacker:{n}").as_bytes(),
            guess.as_bytes(),
            1,
            SetOptions::default(),
        )
        .unwrap();
        s.usage().stored_bytes - before
    }

    /// The size oracle of issue 11: a client's guess compresses against a dictionary made of
    /// other clients' values, so the right guess grows `stored_bytes` less than a wrong one
    /// of the same length. Without a shared dictionary (what an encrypting worker has unless
    /// told otherwise: `Config::dictionary_bytes`), both grow it alike.
    #[test]
    fn without_a_shared_dictionary_stored_sizes_tell_nothing_of_other_values() {
        let victim = |secret: &str| {
            format!(
                r#"{{"user":"victim","note":"nothing to see here, move along","api_token":"{secret}","plan":"gold","since":2021,"region":"eu-west"}}"#
            )
        };
        let guess = |token: &str| {
            format!(
                r#"{{"user":"mallory","comment":"a perfectly ordinary comment, honest, nothing more to it","api_token":"{token}","x":1,"y":[1,2,3,4]}}"#
            )
        };
        let right = guess("tok_9f3a2c71e5b8");
        let wrong = guess("tok_0d84be6a1c27");
        assert_eq!(right.len(), wrong.len());
        assert!(right.len().min(victim("tok_9f3a2c71e5b8").len()) >= seal::MIN_COMPRESS_LEN);
        let leaks = |s: Store| {
            for i in 0..40 {
                s.set(
                    format!("victim:{i}").as_bytes(),
                    victim("tok_9f3a2c71e5b8").as_bytes(),
                    1,
                    SetOptions::default(),
                )
                .unwrap();
            }
            let (r, w) = (growth(&s, 1, &right), growth(&s, 2, &wrong));
            (r, w)
        };
        let key = || Some(Cipher::new(&[5; 32]));
        let (r, w) = leaks(Store::new(key(), 0).with_dictionary_size(1024));
        assert!(
            r < w,
            "with a shared dictionary the right guess shows: {r} vs {w}"
        );
        let (r, w) = leaks(Store::new(key(), 0).with_dictionary_size(0));
        assert_eq!(
            r, w,
            "one by one, the right guess grows the store as a wrong one"
        );
    }

    #[test]
    fn an_absurd_entry_count_from_a_peer_reserves_a_bounded_table() {
        let store = Store::new(None, 0);
        store.reserve(1 << 40);
        assert!(store.usage().bytes < 128 << 20, "{}", store.usage().bytes);
        let limited = Store::new(None, 1 << 20);
        limited.reserve(1 << 40);
        assert!(limited.usage().bytes < 2 << 20, "{}", limited.usage().bytes);
    }

    #[test]
    fn refills_forget_nothing_they_should_and_bring_back_no_delete() {
        use twincache_protocol::version::{at_ms, wall_ms};
        let old = at_ms(wall_ms() - 10_000);
        let new = at_ms(wall_ms());
        let store = Store::new(None, 0);
        store.set(b"old", b"v", old, SetOptions::default()).unwrap();
        store.set(b"new", b"v", new, SetOptions::default()).unwrap();
        // A stale worker refilling drops what is older than its partner's delete horizon.
        assert_eq!(store.drop_older_than(at_ms(wall_ms() - 5_000)), 1);
        assert!(store.get(b"old").unwrap().is_none());
        assert!(store.get(b"new").unwrap().is_some());
        // A serving worker merging takes an old entry only for a key it holds.
        let source = Store::new(None, 0);
        source
            .set(b"forgotten", b"v", old, SetOptions::default())
            .unwrap();
        source
            .set(b"new", b"w", new + 1, SetOptions::default())
            .unwrap();
        let floor = at_ms(wall_ms() - 5_000);
        for n in 0..Store::SHARDS {
            source.snapshot_shard(n, |raw| {
                store.merge_above(raw, floor).unwrap();
            });
        }
        assert!(store.get(b"forgotten").unwrap().is_none());
        assert_eq!(store.get(b"new").unwrap().as_deref(), Some(&b"w"[..]));
    }

    #[test]
    fn merge_keeps_the_newest_version_and_carries_deletes() {
        let source = Store::default();
        set(&source, b"a", b"from source", 10);
        set(&source, b"b", b"old on source", 10);
        set(&source, b"c", b"to be deleted", 10);
        source.del(b"c", 30);
        let target = Store::default();
        set(&target, b"b", b"newer live write", 20);
        set(&target, b"c", b"stale copy", 10);
        let mut taken = 0;
        for n in 0..SHARDS {
            source.snapshot_shard(n, |raw| {
                taken += usize::from(target.merge(raw).unwrap().taken())
            });
        }
        assert_eq!(
            taken, 2,
            "a and c's tombstone; b is older than the live write"
        );
        assert_eq!(
            target.get(b"a").unwrap().as_deref(),
            Some(&b"from source"[..])
        );
        assert_eq!(
            target.get(b"b").unwrap().as_deref(),
            Some(&b"newer live write"[..])
        );
        assert_eq!(target.get(b"c").unwrap(), None, "the delete came across");
        assert_eq!(target.merge(b"short"), None);
        let mut bad = vec![0u8; 30];
        bad[16..20].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(target.merge(&bad), None, "a key running past the entry");
    }

    #[test]
    fn keep_ttl_keeps_the_expiry() {
        let s = Store::default();
        s.set(
            b"k",
            b"v",
            1,
            SetOptions {
                ttl_ms: 30,
                ..Default::default()
            },
        )
        .unwrap();
        s.set(
            b"k",
            b"w",
            2,
            SetOptions {
                keep_ttl: true,
                ..Default::default()
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(s.get(b"k").unwrap(), None);
    }

    /// A small entry of the same length is written over in its own allocation, the fresh
    /// one given back; any other is swapped. Either way the entry then reads as the fresh one.
    #[test]
    fn an_overwrite_reuses_a_small_entry_of_the_same_length() {
        let entry = |version, value: &[u8]| Entry::new(version, 7, b"k", value, None, None);
        let mut current = entry(1, b"aaaa");
        let at = current.0.as_ptr();
        let freed = current.overwrite(entry(2, b"bbbb"));
        assert_eq!(current.0.as_ptr(), at, "written in place");
        assert_eq!((current.version(), current.expires_at()), (2, 7));
        assert_eq!(current.stored(), entry(2, b"bbbb").stored());
        assert_ne!(freed.0.as_ptr(), at);

        let freed = current.overwrite(entry(3, b"longer"));
        assert_ne!(current.0.as_ptr(), at, "another length: swapped");
        assert_eq!(freed.0.as_ptr(), at, "the old entry is the one freed");
        assert_eq!(freed.version(), 2);
        assert_eq!(current.version(), 3);

        // Noise: stored raw, so the entry is larger than the limit.
        let big = crate::seal::noise(OVERWRITE_IN_PLACE);
        let mut current = entry(1, &big);
        assert!(current.0.len() > OVERWRITE_IN_PLACE);
        let at = current.0.as_ptr();
        let freed = current.overwrite(entry(2, &big));
        assert_eq!(freed.0.as_ptr(), at, "a large entry is swapped, not copied");
        assert_eq!(current.version(), 2);

        // Through the store: written in place, and what is read, and what is counted, is
        // the last write's.
        let s = Store::default();
        let at = |s: &Store| {
            let hash = s.hash(b"k");
            s.shard(hash)
                .find(hash, b"k")
                .map(|e| e.0.as_ptr() as usize)
        };
        s.set(b"k", b"first", 1, SetOptions::default()).unwrap();
        let held = s.usage();
        let first = at(&s);
        s.set(b"k", b"again", 2, SetOptions::default()).unwrap();
        assert_eq!(at(&s), first, "in place");
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"again"[..]));
        assert_eq!(s.usage(), held);
        s.set(b"k", b"older", 1, SetOptions::default()).unwrap();
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"again"[..]));
    }

    /// The entries of `s` as a partner's snapshot carries them.
    fn snapshot(s: &Store) -> Vec<Vec<u8>> {
        let mut raws = Vec::new();
        for n in 0..SHARDS {
            s.snapshot_shard(n, |raw| raws.push(raw.to_vec()));
        }
        raws
    }

    /// Merges `raws` into a store with `cipher` and uses whatever was taken; nothing may
    /// panic, and the byte counts must stay consistent.
    fn merge_anything(raws: &[Vec<u8>], cipher: Option<Cipher>) {
        let s = Store::new(cipher, 0);
        let dict = Dictionary::new(b"abcdefgh".repeat(40));
        for (i, raw) in raws.iter().enumerate() {
            let taken = if i % 2 == 0 {
                s.merge(raw)
            } else {
                s.merge_resealed(raw, &dict, 0)
            };
            if let Some(e) = Entry::from_raw(raw) {
                let key = e.key().to_vec();
                let _ = s.get(&key);
                let _ = (s.exists(&key), s.version(&key));
                let _ = s.set(
                    &key,
                    b"v",
                    0,
                    SetOptions {
                        get: true,
                        ..Default::default()
                    },
                );
                let _ = s.del(&key, 1);
            } else {
                assert_eq!(taken, None);
            }
        }
        let u = s.usage();
        assert_eq!(u.keys + u.tombstones, snapshot(&s).len());
        assert_eq!(s.bytes.load(Ordering::Relaxed), u.bytes);
        // What was taken travels on: a snapshot of it is accepted whole.
        let again = Store::new(s.cipher().cloned(), 0);
        for raw in snapshot(&s) {
            assert!(again.merge(&raw).is_some());
        }
    }

    proptest! {
        #[test]
        fn random_entries_never_panic(
            raws in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 1..8),
            encrypt: bool,
        ) {
            merge_anything(&raws, encrypt.then(|| Cipher::new(&[1; 32])));
        }

        #[test]
        fn mutated_entries_never_panic(
            values in proptest::collection::vec(proptest::collection::vec(prop_oneof![Just(b'a'), any::<u8>()], 0..400), 1..6),
            encrypt: bool,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<usize>(), any::<u8>()), 1..6),
            // Lengths and layout bytes live in the first few dozen bytes: aim some edits there.
            header_edits in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..34, any::<u8>()), 0..4),
        ) {
            let cipher = encrypt.then(|| Cipher::new(&[1; 32]));
            let s = Store::new(cipher.clone(), 0).with_dictionary_size(256);
            for (i, v) in values.iter().enumerate() {
                s.set(format!("key{i}").as_bytes(), v, 1, SetOptions::default()).unwrap();
            }
            s.del(b"gone", 2);
            let mut raws = snapshot(&s);
            for (which, at, byte) in edits.into_iter().chain(header_edits) {
                let raw = which.get_mut(&mut raws);
                let at = at % raw.len();
                raw[at] = byte;
            }
            merge_anything(&raws, cipher);
        }
    }
}
