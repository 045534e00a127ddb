//! `transform`: migrates values in place to a schema version.
//!
//! Per batch: one script call reads every key's type, value, TTL and the SHA-1 of the value
//! (and its DUMP payload, for `--backup`);
//! each value's version is found ([`crate::registry::Planner::detect`]), its path run and the
//! result validated against the target; the old values of the keys about to change go to the
//! backup file (fsynced); then one pipeline of compare-and-set scripts writes the new values.
//! Each script writes only if the key still holds the value read (same type, same SHA-1),
//! keeping the TTL. A key
//! the application changed in between is read again and planned again from its new value (up
//! to three times), so an application write racing the run is never overwritten by a result
//! computed from an older value.
//!
//! A step is never applied twice: a transformed value carries the target version in its
//! marker, and a value at the target is left alone, so a second run, or a resumed one, writes
//! nothing for the values the first one finished.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backup::{BackupWriter, Record};
use crate::document::Document;
use crate::redis_io::{self, read_batch, value_text_lua, ReadMode, Row, Server};
use crate::registry::{Plan, Planner};
use crate::report::Tally;
use crate::scan::{Batch, Processor};
use crate::Error;

const TRIES: usize = 3;
/// Before/after samples a dry run shows.
pub const SAMPLES: usize = 3;

/// Writes each new value if its key still holds the value that was read (same type, same
/// SHA-1 of its `value_text`), keeping its TTL; one call for a whole batch. KEYS: the keys.
/// ARGV, per key: the SHA-1, `string` or `hash`, the number n of items, then the n items
/// (the value, or field/value pairs). Per key: 1 written, 0 changed meanwhile.
const COMPARE_AND_SET: &str = concat!(
    value_text_lua!(),
    r#"
local out = {}
local a = 1
for i, k in ipairs(KEYS) do
  local sha, kind, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first = a + 3
  a = first + n
  local t = redis.call('TYPE', k)['ok']
  if t ~= kind or redis.sha1hex(value_text(k, t)) ~= sha then
    out[i] = 0
  else
    if kind == 'string' then
      redis.call('SET', k, ARGV[first], 'KEEPTTL')
    else
      local ttl = redis.call('PTTL', k)
      redis.call('DEL', k)
      for j = first, first + n - 1, 2 do redis.call('HSET', k, ARGV[j], ARGV[j + 1]) end
      if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
    end
    out[i] = 1
  end
end
return out
"#
);

pub struct TransformOptions {
    pub dry_run: bool,
    pub backup: Option<BackupWriter>,
    pub big_key_bytes: u64,
    /// Test hook: wait this long between reading a batch and writing it, after saying so on
    /// stderr, so a test can race an application write against the run.
    pub pause_before_write: Option<Duration>,
    /// Test hook: wait this long after writing a batch, so a test can kill the run between
    /// the writes and the checkpoint that records them.
    pub pause_after_write: Option<Duration>,
}

pub struct Transformer {
    pub redis: Arc<Server>,
    pub planner: Arc<Planner>,
    pub opts: TransformOptions,
    /// Dry run: a few (key, before, after) examples.
    pub samples: Mutex<Vec<(String, String, String)>>,
}

/// A planned write.
struct Change {
    key: Vec<u8>,
    sha: Vec<u8>,
    route: String,
    doc: Document,
}

impl Transformer {
    pub fn new(redis: Arc<Server>, planner: Arc<Planner>, opts: TransformOptions) -> Transformer {
        Transformer {
            redis,
            planner,
            opts,
            samples: Mutex::new(Vec::new()),
        }
    }

    /// Plans one key; `Some` when it is to be written.
    fn plan(&self, key: &[u8], row: &Row, now_ms: u64, t: &mut Tally) -> Option<Change> {
        // A big key is only sized: no type, no value.
        if row.kind.is_none() {
            t.fail(
                "bigger than --big-key-size (not transformed)",
                key,
                format!("{} bytes", row.size),
            );
            return None;
        }
        let doc = match (row.kind.as_deref(), &row.value) {
            (Some("string"), Some(v)) => {
                Document::from_json(redis_io::bytes(v).unwrap_or_default())
            }
            (Some("hash"), Some(v)) => {
                Document::from_hash(redis_io::items(v).chunks(2).filter_map(|p| {
                    Some((redis_io::bytes(p.first()?)?, redis_io::bytes(p.get(1)?)?))
                }))
            }
            (kind, _) => {
                t.skip(&format!(
                    "a {}, not a string or hash",
                    kind.unwrap_or("value")
                ));
                return None;
            }
        };
        let doc = match doc {
            Ok(d) => d,
            Err(e) => {
                t.fail("not a schema document", key, e);
                return None;
            }
        };
        match self.planner.plan(key, &doc, now_ms) {
            Ok(Plan::AtTarget) => {
                t.skip(&format!("already at {}", self.planner.target));
                None
            }
            Ok(Plan::Migrate { route, doc: new }) => {
                if self.opts.dry_run {
                    let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
                    if samples.len() < SAMPLES {
                        let show =
                            |d: &Document| serde_json::Value::Object(d.body.clone()).to_string();
                        samples.push((redis_io::show_key(key), show(&doc), show(&new)));
                    }
                }
                Some(Change {
                    key: key.to_vec(),
                    sha: row.value_sha.clone().unwrap_or_default(),
                    route,
                    doc: new,
                })
            }
            Err(r) => {
                t.fail(&r.reason, key, format!("{}: {}", r.reason, r.detail));
                None
            }
        }
    }
}

impl Processor for Transformer {
    async fn process(&self, batch: Batch) -> Result<Tally, Error> {
        let mut t = Tally::default();
        let mut keys = batch.keys;
        for attempt in 0..TRIES {
            let (rows, now_ms) = read_batch(
                &self.redis,
                &keys,
                self.opts.big_key_bytes,
                // The payload only for the backup; the compare-and-set needs the value's SHA-1.
                ReadMode::Value {
                    dump: self.opts.backup.is_some(),
                },
                false,
            )
            .await?;
            let mut changes = Vec::new();
            let mut records = Vec::new();
            for (key, row) in keys.iter().zip(&rows) {
                let Some(row) = row else {
                    t.skip("expired or deleted before it was read");
                    continue;
                };
                if let Some(c) = self.plan(key, row, now_ms, &mut t) {
                    if self.opts.backup.is_some() {
                        records.push(Record::new(
                            key,
                            row.dump.as_deref().unwrap_or_default(),
                            row.expire_at_ms,
                            &c.doc,
                        ));
                    }
                    t.bytes += row.size;
                    changes.push(c);
                }
            }
            if self.opts.dry_run {
                for c in &changes {
                    t.done += 1;
                    t.note(&format!("would migrate {}", c.route), 1);
                }
                return Ok(t);
            }
            if let Some(backup) = &self.opts.backup {
                backup.append(&records).await?;
            }
            if let Some(pause) = self
                .opts
                .pause_before_write
                .filter(|_| attempt == 0 && !changes.is_empty())
            {
                eprintln!("pausing {} ms before writing", pause.as_millis());
                tokio::time::sleep(pause).await;
            }
            let keys_out: Vec<Vec<u8>> = changes.iter().map(|c| c.key.clone()).collect();
            let mut args: Vec<Vec<u8>> = Vec::new();
            for c in &changes {
                let (kind, items) = c.doc.redis_items();
                args.push(c.sha.clone());
                args.push(kind.as_bytes().to_vec());
                args.push(items.len().to_string().into_bytes());
                args.extend(items);
            }
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let reply = if changes.is_empty() {
                redis::Value::Array(Vec::new())
            } else {
                self.redis.eval(COMPARE_AND_SET, &keys_out, &refs).await?
            };
            let replies = redis_io::items(&reply);
            if let Some(pause) = self.opts.pause_after_write {
                tokio::time::sleep(pause).await;
            }
            let mut raced = Vec::new();
            let mut routes: BTreeMap<&str, u64> = BTreeMap::new();
            for (c, reply) in changes.iter().zip(replies) {
                match redis_io::int(reply) {
                    Some(1) => {
                        t.done += 1;
                        *routes.entry(&c.route).or_default() += 1;
                    }
                    Some(0) => raced.push(c.key.clone()),
                    _ => t.fail(
                        "write failed",
                        &c.key,
                        redis_io::server_error(reply).unwrap_or_else(|| format!("{reply:?}")),
                    ),
                }
            }
            for (route, n) in routes {
                t.note(&format!("migrated {route}"), n);
            }
            if raced.is_empty() {
                break;
            }
            if attempt + 1 == TRIES {
                for k in &raced {
                    t.fail(
                        "changed by the application on every try (left as it is)",
                        k,
                        "the value changed between read and write three times",
                    );
                }
            } else {
                t.note(
                    "changed by the application meanwhile (read again)",
                    raced.len() as u64,
                );
            }
            keys = raced;
        }
        Ok(t)
    }
}
