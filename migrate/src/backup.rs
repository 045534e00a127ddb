//! The backup file of a `transform` run, and `rollback`.
//!
//! Format: JSON Lines. The first line is a header; then one line per value, written and
//! fsynced *before* the value is changed:
//!
//! ```text
//! {"format":"twincache-migrate-backup","version":1,"createdAtMs":1767225600000,"redis":"redis://host:6379/0","target":"3.0.0"}
//! {"key":"dXNlcjox","dump":"AAVoZWxsbwsA...","expireAtMs":null,"after":{"type":"string","items":["eyJmaXJzdE5hbWUiOi..."]}}
//! ```
//!
//! `key` and `dump` (the DUMP payload of the value before the change: type and value, byte
//! for byte) are base64; `expireAtMs` is the key's absolute expiry in Unix ms by the server's
//! clock, or null. `after` is what the run wrote (its type, and the string value or the
//! hash's field/value pairs, base64): `rollback` restores a key only if it still holds
//! exactly that, so a value the application changed after the run is not thrown away. A key that appears twice (the run re-read it
//! after an application write) is restored from its last line.
//!
//! Rollback is RESTORE ... REPLACE ABSTTL in a script that first checks the value: type,
//! value and expiry come back as they were, and keys the run did not change are not touched.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{decode_key, encode_key};
use crate::redis_io::{self, Server};
use crate::report::Tally;
use crate::Error;

const FORMAT: &str = "twincache-migrate-backup";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub created_at_ms: u64,
    pub redis: String,
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub key: String,
    pub dump: String,
    pub expire_at_ms: Option<u64>,
    pub after: After,
}

/// What the run wrote in place of the old value: its Redis type (`string` or `hash`) and
/// the items written (the value, or field/value pairs), base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct After {
    #[serde(rename = "type")]
    pub kind: String,
    pub items: Vec<String>,
}

impl Record {
    pub fn new(
        key: &[u8],
        dump: &[u8],
        expire_at_ms: Option<u64>,
        after: &crate::document::Document,
    ) -> Record {
        let (kind, items) = after.redis_items();
        Record {
            key: encode_key(key),
            dump: encode_key(dump),
            expire_at_ms,
            after: After {
                kind: kind.into(),
                items: items.iter().map(|i| encode_key(i)).collect(),
            },
        }
    }
}

/// Appends records, fsynced, to a backup file.
pub struct BackupWriter {
    path: PathBuf,
    file: Arc<std::sync::Mutex<std::fs::File>>,
}

impl BackupWriter {
    /// Creates `path` with its header. An existing file is an error unless the run resumes
    /// (then it is appended to): overwriting a backup would lose the only way back.
    pub fn open(path: &Path, header: &Header, resume: bool) -> Result<BackupWriter, Error> {
        let exists = path.exists();
        if exists && !resume {
            return Err(Error::Usage(format!(
                "backup file {} already exists: it may be the only way back from an earlier run; choose another name (or --resume that run)",
                path.display()
            )));
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        if !exists {
            let mut line = serde_json::to_vec(header).map_err(|e| Error::malformed(path, e))?;
            line.push(b'\n');
            file.write_all(&line)
                .and_then(|_| file.sync_data())
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(BackupWriter {
            path: path.to_path_buf(),
            file: Arc::new(std::sync::Mutex::new(file)),
        })
    }

    /// Writes the records and waits until they are on disk.
    pub async fn append(&self, records: &[Record]) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        let mut text = Vec::new();
        for r in records {
            serde_json::to_writer(&mut text, r).map_err(|e| Error::malformed(&self.path, e))?;
            text.push(b'\n');
        }
        let file = self.file.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(&text).and_then(|_| f.sync_data())
        })
        .await
        .map_err(|e| Error::io(&path, std::io::Error::other(e)))?
        .map_err(|e| Error::io(&path, e))
    }
}

/// Reads a backup file: its header and records, checked line by line.
pub fn read(path: &Path) -> Result<(Header, Vec<Record>), Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::malformed(path, e))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let first = lines
        .next()
        .transpose()
        .map_err(|e| Error::malformed(path, e))?
        .unwrap_or_default();
    let header: Header = serde_json::from_str(&first)
        .map_err(|e| Error::malformed(path, format!("line 1 is not a backup header: {e}")))?;
    if header.format != FORMAT || header.version != 1 {
        return Err(Error::malformed(
            path,
            "not a version 1 twincache-migrate backup",
        ));
    }
    let mut records = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|e| Error::malformed(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line)
            .map_err(|e| Error::malformed(path, format!("line {}: {e}", i + 2)))?;
        decode_key(&r.key)
            .and(decode_key(&r.dump))
            .map_err(|e| Error::malformed(path, format!("line {}: {e}", i + 2)))?;
        records.push(r);
    }
    Ok((header, records))
}

/// Restores a key from its payload if it still holds what the run wrote. KEYS[1] the key;
/// ARGV: payload, absolute expiry in ms (0: none), `string` or `hash`, then the value or the
/// field/value pairs written. 1 restored, 0 changed since the run, -1 gone.
const ROLLBACK: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return -1 end
if t ~= ARGV[3] then return 0 end
if t == 'string' then
  if redis.call('GET', KEYS[1]) ~= ARGV[4] then return 0 end
else
  if redis.call('HLEN', KEYS[1]) * 2 ~= #ARGV - 3 then return 0 end
  for i = 4, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then return 0 end
  end
end
if ARGV[2] ~= '0' then
  redis.call('RESTORE', KEYS[1], ARGV[2], ARGV[1], 'REPLACE', 'ABSTTL')
else
  redis.call('RESTORE', KEYS[1], 0, ARGV[1], 'REPLACE')
end
return 1
"#;

/// Puts back every value of the backup that still holds what the run wrote.
pub async fn rollback(path: &Path, redis: &Server) -> Result<Tally, Error> {
    let (_, records) = read(path)?;
    // The last record of a key is the one whose write stands.
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        last.insert(&r.key, i);
    }
    let mut order: Vec<usize> = last.into_values().collect();
    order.sort_unstable();
    let mut t = Tally::default();
    for chunk in order.chunks(500) {
        let mut pipe = redis::pipe();
        let mut keys = Vec::new();
        for &i in chunk {
            let r = &records[i];
            let bad = |e: String| Error::malformed(path, e);
            let key = decode_key(&r.key).map_err(bad)?;
            let mut args: Vec<Vec<u8>> = vec![
                decode_key(&r.dump).map_err(bad)?,
                r.expire_at_ms.unwrap_or(0).to_string().into_bytes(),
            ];
            if r.after.kind != "string" && r.after.kind != "hash" {
                return Err(bad(format!("unknown type `{}` in a record", r.after.kind)));
            }
            args.push(r.after.kind.clone().into_bytes());
            for item in &r.after.items {
                args.push(decode_key(item).map_err(bad)?);
            }
            t.bytes += args[0].len() as u64;
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            pipe.add_command(redis_io::eval_cmd(
                ROLLBACK,
                std::slice::from_ref(&key),
                &refs,
            ));
            keys.push(key);
        }
        let replies = redis.pipeline(&mut pipe).await?;
        for (key, reply) in keys.iter().zip(&replies) {
            t.scanned += 1;
            match redis_io::int(reply) {
                Some(1) => t.done += 1,
                Some(0) => t.skip("changed since the run (left as it is)"),
                Some(-1) => t.skip("deleted or expired since the run (left as it is)"),
                _ => t.fail(
                    "could not be restored",
                    key,
                    redis_io::server_error(reply).unwrap_or_else(|| format!("{reply:?}")),
                ),
            }
        }
    }
    Ok(t)
}
