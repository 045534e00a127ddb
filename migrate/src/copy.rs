//! `copy`: each batch of scanned keys is read from the source in one round trip and written
//! to the destination in one pipeline. Strings (most keys of most caches) go by value: one
//! MULTI/EXEC of PTTL and GETRANGE per key, then `SET key value PX ttl NX`. Every other type
//! goes by DUMP/RESTORE (one script call reads size, TTL and payload per key), which keeps
//! the type, encoding and stream metadata exactly. Measured on loopback, a DUMP of a 1 KiB
//! string costs its server about 12 µs (RDB encoding, an LZF attempt, a CRC64) and RESTORE
//! 9 µs, against about 1.5 µs each for GETRANGE and SET: by value, the servers do a fifth of
//! the work, which is what makes `copy` faster than MIGRATE (README has the figures).
//!
//! - **Existing keys.** RESTORE without REPLACE answers BUSYKEY, and SET NX nil, for a key the
//!   destination already has: it is left alone (a write through adapter mode, or a newer
//!   value, wins) and counted as skipped. `--replace` overwrites.
//! - **TTLs.** The remaining TTL read with the payload goes with the RESTORE.
//! - **Big keys.** A key whose MEMORY USAGE is over `--big-key-size` is not dumped (a DUMP
//!   reply is one allocation, here and on the server). It is rebuilt in the destination under
//!   a temporary name from chunks (GETRANGE, HSCAN, SSCAN, ZSCAN, LRANGE, XRANGE), given its
//!   TTL, and renamed into place, so the destination never shows half a value. Memory stays
//!   at one chunk. Limits: consumer groups of a big stream are not copied (small streams keep
//!   them, through DUMP), and a big key written to while it is copied may mix old and new
//!   chunks; `verify` finds that.
//! - **`--delete-from-source`** deletes a key only once the destination holds it, and only if
//!   the source still holds what was copied: a script compares the SHA-1 of its DUMP (small
//!   keys), or a WATCH held during the copy fails the delete (big keys).
//! - **`--registry/--to`.** Keys of the target schema's key pattern are read as documents,
//!   transformed, validated, and written as the new version; a value that cannot be is
//!   reported and not copied. Other keys are copied as they are.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use redis::Value;

use crate::document::Document;
use crate::redis_io::{self, read_batch, ReadMode, Row, Server};
use crate::registry::{Plan, Planner};
use crate::report::Tally;
use crate::scan::{Batch, Processor};
use crate::Error;

/// Elements (or bytes, for strings, times 1024) per chunk of a big key.
const CHUNK: usize = 512;
const STRING_CHUNK: usize = 1 << 20;

pub const SKIP_EXISTS: &str = "already in the destination (kept; --replace overwrites)";
const SKIP_GONE: &str = "expired or deleted in the source before it was read";

/// Writes a document into the destination unless it exists (ARGV[1] `1`: replace anyway),
/// with a TTL in ms (ARGV[2], 0 for none), as a string (ARGV[3] `string`, value ARGV[4]) or
/// a hash (field/value pairs from ARGV[4]). 1 written, 0 kept.
const WRITE_DOC: &str = r#"
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[3] == 'string' then
  redis.call('SET', KEYS[1], ARGV[4])
else
  for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#;

/// Deletes each key whose DUMP still has the SHA-1 given for it; 1 deleted, 0 kept.
const DELETE_IF_UNCHANGED: &str = r#"
local out = {}
for i, k in ipairs(KEYS) do
  local d = redis.call('DUMP', k)
  if d and redis.sha1hex(d) == ARGV[i] then
    redis.call('DEL', k)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

pub struct CopyOptions {
    pub replace: bool,
    pub delete_from_source: bool,
    pub dry_run: bool,
    pub big_key_bytes: u64,
    pub planner: Option<Arc<Planner>>,
    /// False when the scan can return no strings (`--type hash`, ...): then the string path
    /// would only cost a round trip.
    pub strings_possible: bool,
    /// Test hook: wait this long after writing a batch, so a test can kill the run between
    /// the writes and the checkpoint that records them.
    pub pause_after_write: Option<std::time::Duration>,
}

pub struct Copier {
    pub source: Arc<Server>,
    pub destination: Arc<Server>,
    pub opts: CopyOptions,
    temp_names: AtomicU64,
    /// The planner's key pattern, compiled once for every key scanned.
    key_pattern: Option<crate::glob::Pattern>,
}

/// How one key is written.
enum Write {
    /// RESTORE of a DUMP payload.
    Restore,
    /// SET of a string read by value (a tenth of the servers' work of DUMP/RESTORE).
    Set,
    /// A transformed document, by script.
    Document,
}

impl Copier {
    pub fn new(source: Arc<Server>, destination: Arc<Server>, opts: CopyOptions) -> Copier {
        let key_pattern = opts
            .planner
            .as_deref()
            .map(|p| crate::glob::Pattern::new(p.key_pattern().as_bytes()));
        Copier {
            source,
            destination,
            opts,
            temp_names: AtomicU64::new(0),
            key_pattern,
        }
    }

    fn in_pattern(&self, key: &[u8]) -> Option<&Planner> {
        let p = self.opts.planner.as_deref()?;
        self.key_pattern.as_ref()?.matches(key).then_some(p)
    }

    async fn dry_run(&self, keys: &[Vec<u8>]) -> Result<Tally, Error> {
        let (rows, _) = read_batch(
            &self.source,
            keys,
            self.opts.big_key_bytes,
            ReadMode::Size,
            false,
        )
        .await?;
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("EXISTS").arg(&k[..]);
        }
        let exists = self.destination.pipeline(&mut pipe).await?;
        let mut t = Tally::default();
        for ((row, there), key) in rows.iter().zip(&exists).zip(keys) {
            let Some(row) = row else {
                t.skip(SKIP_GONE);
                continue;
            };
            if !self.opts.replace && redis_io::int(there) == Some(1) {
                t.skip(SKIP_EXISTS);
                continue;
            }
            if row.size > self.opts.big_key_bytes {
                t.note("big keys (would be copied in chunks)", 1);
            }
            if self.in_pattern(key).is_some() {
                t.note("keys of the schema's pattern (would be transformed)", 1);
            }
            t.done += 1;
            t.bytes += row.size;
        }
        Ok(t)
    }

    /// Adds the write of a document (transformed on the way) to `pipe`; false if refused.
    fn plan_document(
        &self,
        planner: &Planner,
        key: &[u8],
        row: &Row,
        now_ms: u64,
        pipe: &mut redis::Pipeline,
        t: &mut Tally,
    ) -> Option<Write> {
        let doc = match (row.kind.as_deref(), &row.value) {
            (Some("string"), Some(v)) => redis_io::bytes(v)
                .ok_or_else(|| "unreadable value".to_string())
                .and_then(Document::from_json),
            (Some("hash"), Some(v)) => {
                Document::from_hash(redis_io::items(v).chunks(2).filter_map(|p| {
                    Some((redis_io::bytes(p.first()?)?, redis_io::bytes(p.get(1)?)?))
                }))
            }
            (kind, _) => Err(format!(
                "a {} is not a schema document",
                kind.unwrap_or("value")
            )),
        };
        let doc = match doc {
            Ok(d) => d,
            Err(e) => {
                t.fail("not a schema document (not copied)", key, e);
                return None;
            }
        };
        match planner.plan(key, &doc, now_ms) {
            Ok(Plan::AtTarget) => Some(Write::Restore),
            Ok(Plan::Migrate { doc, .. }) => {
                let ttl = row.pttl.max(0).to_string();
                let replace = if self.opts.replace { "1" } else { "0" };
                let (kind, items) = doc.redis_items();
                let mut args: Vec<Vec<u8>> = vec![replace.into(), ttl.into_bytes(), kind.into()];
                args.extend(items);
                let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                pipe.add_command(redis_io::eval_cmd(WRITE_DOC, &[key.to_vec()], &refs));
                Some(Write::Document)
            }
            Err(r) => {
                t.fail(&format!("{} (not copied)", r.reason), key, r.detail);
                None
            }
        }
    }

    /// Adds the write of a key as it is: SET for a string read by value (NX unless
    /// --replace, so an existing key is kept as RESTORE would keep it), RESTORE otherwise.
    fn write_as_is(&self, pipe: &mut redis::Pipeline, key: &[u8], row: &Row) -> Write {
        if let (None, Some(value)) = (&row.dump, &row.value) {
            pipe.cmd("SET")
                .arg(key)
                .arg(redis_io::bytes(value).unwrap_or_default());
            if row.pttl > 0 {
                pipe.arg("PX").arg(row.pttl);
            }
            if !self.opts.replace {
                pipe.arg("NX");
            }
            return Write::Set;
        }
        let dump = row.dump.as_deref().unwrap_or_default();
        pipe.cmd("RESTORE").arg(key).arg(row.pttl.max(0)).arg(dump);
        if self.opts.replace {
            pipe.arg("REPLACE");
        }
        Write::Restore
    }

    /// Copies one big key in chunks under a temporary name, then renames it into place.
    async fn copy_big(&self, key: &[u8], resumed: bool, t: &mut Tally) -> Result<(), Error> {
        let (src, dst) = (&self.source, &self.destination);
        if !self.opts.replace && dst.query::<i64>(redis::cmd("EXISTS").arg(key)).await? == 1 {
            if resumed {
                t.done += 1;
            } else {
                t.skip(SKIP_EXISTS);
            }
            return Ok(());
        }
        // Watch the source key for the whole copy: the delete at the end fails if it changed.
        let mut watch = if self.opts.delete_from_source {
            let mut c = src.dedicated().await?;
            redis::cmd("WATCH")
                .arg(key)
                .query_async::<()>(&mut c)
                .await
                .map_err(|e| src.failed(e))?;
            Some(c)
        } else {
            None
        };
        let kind: String = src.query(redis::cmd("TYPE").arg(key)).await?;
        let temp = format!(
            "{}tmp:{}:{}",
            crate::registry::stored::PREFIX,
            std::process::id(),
            self.temp_names.fetch_add(1, Relaxed)
        );
        let _: () = dst.query(redis::cmd("DEL").arg(&temp)).await?;
        let bytes = match copy_chunks(src, dst, key, temp.as_bytes(), &kind).await {
            Ok(b) => b,
            Err(ChunkError::Redis(e)) => return Err(e),
            Err(ChunkError::Unsupported) => {
                t.fail(
                    "big key of a type that cannot be copied in chunks",
                    key,
                    format!("type {kind}"),
                );
                return Ok(());
            }
        };
        let pttl: i64 = src.query(redis::cmd("PTTL").arg(key)).await?;
        let built: i64 = dst.query(redis::cmd("EXISTS").arg(&temp)).await?;
        if pttl == -2 || pttl == 0 || built == 0 {
            let _: () = dst.query(redis::cmd("DEL").arg(&temp)).await?;
            t.skip(SKIP_GONE);
            return Ok(());
        }
        if pttl > 0 {
            let _: () = dst
                .query(redis::cmd("PEXPIRE").arg(&temp).arg(pttl))
                .await?;
        }
        let placed = if self.opts.replace {
            let _: () = dst.query(redis::cmd("RENAME").arg(&temp).arg(key)).await?;
            true
        } else {
            dst.query::<i64>(redis::cmd("RENAMENX").arg(&temp).arg(key))
                .await?
                == 1
        };
        if !placed {
            let _: () = dst.query(redis::cmd("DEL").arg(&temp)).await?;
            t.skip(SKIP_EXISTS);
        } else {
            t.done += 1;
            t.bytes += bytes;
            t.note("big keys copied in chunks", 1);
        }
        if let Some(c) = watch.as_mut() {
            // EXEC answers nil when a watched key changed: then the source keeps it.
            let exec: Value = redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(key)
                .query_async(c)
                .await
                .map_err(|e| src.failed(e))?;
            match exec {
                Value::Nil => t.note(
                    "changed in the source during the copy (not deleted there)",
                    1,
                ),
                _ => t.note("deleted from the source", 1),
            }
        }
        Ok(())
    }
}

enum ChunkError {
    Redis(Error),
    Unsupported,
}

impl From<Error> for ChunkError {
    fn from(e: Error) -> Self {
        ChunkError::Redis(e)
    }
}

/// Copies `key` of type `kind` from `src` into `temp` on `dst`, a chunk at a time; the bytes moved.
async fn copy_chunks(
    src: &Server,
    dst: &Server,
    key: &[u8],
    temp: &[u8],
    kind: &str,
) -> Result<u64, ChunkError> {
    let mut bytes = 0u64;
    let size = |items: &[Vec<u8>]| items.iter().map(|i| i.len() as u64).sum::<u64>();
    match kind {
        "string" => {
            let len: usize = src.query(redis::cmd("STRLEN").arg(key)).await?;
            let mut at = 0;
            while at < len {
                let part: Vec<u8> = src
                    .query(
                        redis::cmd("GETRANGE")
                            .arg(key)
                            .arg(at)
                            .arg(at + STRING_CHUNK - 1),
                    )
                    .await?;
                if part.is_empty() {
                    break;
                }
                at += part.len();
                bytes += part.len() as u64;
                let _: () = dst.query(redis::cmd("APPEND").arg(temp).arg(part)).await?;
            }
        }
        "list" => {
            let mut at = 0usize;
            loop {
                let part: Vec<Vec<u8>> = src
                    .query(redis::cmd("LRANGE").arg(key).arg(at).arg(at + CHUNK - 1))
                    .await?;
                if part.is_empty() {
                    break;
                }
                at += part.len();
                bytes += size(&part);
                let _: () = dst.query(redis::cmd("RPUSH").arg(temp).arg(&part)).await?;
            }
        }
        "hash" | "set" | "zset" => {
            let write = match kind {
                "hash" => "HSET",
                "set" => "SADD",
                _ => "ZADD",
            };
            let mut cursor = 0u64;
            loop {
                let (next, part) = redis_io::scan_members(src, kind, key, cursor, CHUNK).await?;
                if !part.is_empty() {
                    bytes += size(&part);
                    let mut cmd = redis::cmd(write);
                    cmd.arg(temp);
                    if kind == "zset" {
                        // ZSCAN gives member, score; ZADD takes score, member.
                        for pair in part.chunks(2) {
                            if let [member, score] = pair {
                                cmd.arg(score).arg(member);
                            }
                        }
                    } else {
                        cmd.arg(&part);
                    }
                    let _: () = dst.query(&cmd).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        "stream" => {
            let mut start = "-".to_string();
            loop {
                let entries: Value = src
                    .query(
                        redis::cmd("XRANGE")
                            .arg(key)
                            .arg(&start)
                            .arg("+")
                            .arg("COUNT")
                            .arg(CHUNK),
                    )
                    .await?;
                let entries = redis_io::items(&entries);
                if entries.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                let mut last = None;
                for e in entries {
                    let parts = redis_io::items(e);
                    let (Some(id), Some(fields)) =
                        (parts.first().and_then(redis_io::bytes), parts.get(1))
                    else {
                        continue;
                    };
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(temp).arg(id);
                    for f in redis_io::items(fields) {
                        let b = redis_io::bytes(f).unwrap_or_default();
                        bytes += b.len() as u64;
                        cmd.arg(b);
                    }
                    pipe.add_command(cmd);
                    last = Some(String::from_utf8_lossy(id).into_owned());
                }
                for reply in dst.pipeline(&mut pipe).await? {
                    if let Some(e) = redis_io::server_error(&reply) {
                        return Err(ChunkError::Redis(Error::Usage(format!(
                            "destination refused a stream entry: {e}"
                        ))));
                    }
                }
                match last {
                    Some(id) => start = format!("({id}"),
                    None => break,
                }
            }
            // Keep the stream's last id, so new entries get ids after the source's.
            let info: Value = src
                .query(redis::cmd("XINFO").arg("STREAM").arg(key))
                .await?;
            let fields = redis_io::items(&info);
            let last_id = fields
                .chunks(2)
                .find(|p| p.first().and_then(redis_io::bytes) == Some(b"last-generated-id"))
                .and_then(|p| p.get(1).and_then(redis_io::bytes));
            if let Some(id) = last_id {
                let _: Value = dst.query(redis::cmd("XSETID").arg(temp).arg(id)).await?;
            }
        }
        _ => return Err(ChunkError::Unsupported),
    }
    Ok(bytes)
}

impl Processor for Copier {
    async fn process(&self, batch: Batch) -> Result<Tally, Error> {
        let keys = &batch.keys;
        if self.opts.dry_run {
            return self.dry_run(keys).await;
        }
        let mode = if self.opts.planner.is_some() {
            ReadMode::Value { dump: true }
        } else {
            ReadMode::Dump
        };
        let fast = mode == ReadMode::Dump && self.opts.strings_possible;
        let (rows, now_ms) = if fast && !self.opts.delete_from_source {
            // The fast path; deleting from the source needs every key's DUMP digest.
            let rows = redis_io::read_for_copy(&self.source, keys, self.opts.big_key_bytes).await?;
            (rows, 0)
        } else {
            read_batch(
                &self.source,
                keys,
                self.opts.big_key_bytes,
                mode,
                self.opts.delete_from_source,
            )
            .await?
        };
        let mut t = Tally::default();
        let mut pipe = redis::pipe();
        let mut sent: Vec<(usize, Write)> = Vec::new();
        let mut big = Vec::new();
        for (i, (key, row)) in keys.iter().zip(&rows).enumerate() {
            // PTTL 0: it expires within the millisecond; copied without a TTL it would live on.
            let Some(row) = row.as_ref().filter(|r| r.pttl != 0) else {
                t.skip(SKIP_GONE);
                continue;
            };
            if row.dump.is_none() && row.value.is_none() {
                big.push(i);
                continue;
            }
            let write = match self.in_pattern(key) {
                Some(planner) => {
                    match self.plan_document(planner, key, row, now_ms, &mut pipe, &mut t) {
                        Some(w) => w,
                        None => continue,
                    }
                }
                None => Write::Restore,
            };
            let write = match write {
                Write::Restore => self.write_as_is(&mut pipe, key, row),
                other => other,
            };
            sent.push((i, write));
        }
        let replies = self.destination.pipeline(&mut pipe).await?;
        if let Some(pause) = self.opts.pause_after_write {
            tokio::time::sleep(pause).await;
        }
        let mut delete_keys = Vec::new();
        let mut delete_shas: Vec<Vec<u8>> = Vec::new();
        for ((i, write), reply) in sent.iter().zip(&replies) {
            let (key, row) = (&keys[*i], rows[*i].as_ref());
            let size = row.map_or(0, |r| match (&r.dump, &r.value) {
                (Some(d), _) => d.len(),
                (None, Some(v)) => redis_io::bytes(v).map_or(0, <[u8]>::len),
                _ => 0,
            }) as u64;
            let outcome =
                match (write, reply) {
                    (Write::Document, v) if redis_io::int(v) == Some(1) => Ok(true),
                    (Write::Document, v) if redis_io::int(v) == Some(0) => Ok(false),
                    (Write::Set, Value::Okay) => Ok(true),
                    (Write::Set, Value::Nil) => Ok(false),
                    (Write::Restore, v) => match redis_io::reply_status(v) {
                        Ok(()) => Ok(true),
                        Err(e) if e.starts_with("BUSYKEY") => Ok(false),
                        Err(e) => Err(e),
                    },
                    (_, v) => Err(redis_io::server_error(v)
                        .unwrap_or_else(|| format!("unexpected reply {v:?}"))),
                };
            match outcome {
                Ok(copied) => {
                    if copied || batch.resumed {
                        // A key in flight when an earlier run stopped and now found in the
                        // destination was, as far as anyone can tell, put there by that run.
                        t.done += 1;
                        t.bytes += size;
                        if matches!(write, Write::Document) {
                            t.note("transformed on the way", 1);
                        }
                    } else {
                        t.skip(SKIP_EXISTS);
                    }
                    if let Some(sha) = row.and_then(|r| r.sha.clone()) {
                        delete_keys.push(key.clone());
                        delete_shas.push(sha);
                    }
                }
                Err(e) => t.fail("the destination refused it", key, e),
            }
        }
        if self.opts.delete_from_source && !delete_keys.is_empty() {
            let refs: Vec<&[u8]> = delete_shas.iter().map(Vec::as_slice).collect();
            let reply = self
                .source
                .eval(DELETE_IF_UNCHANGED, &delete_keys, &refs)
                .await?;
            let deleted = redis_io::items(&reply)
                .iter()
                .filter(|v| redis_io::int(v) == Some(1))
                .count() as u64;
            t.note("deleted from the source", deleted);
            t.note(
                "changed in the source during the copy (not deleted there)",
                delete_keys.len() as u64 - deleted,
            );
        }
        for i in big {
            self.copy_big(&keys[i], batch.resumed, &mut t).await?;
        }
        Ok(t)
    }
}
