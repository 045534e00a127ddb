//! `verify`: for each scanned source key, the same script runs on both servers and returns
//! the type, the remaining TTL and a digest of the value, so a batch is compared in two round
//! trips whatever the values' sizes.
//!
//! The digest is of the logical value, not of the DUMP payload (see
//! [`crate::redis_io::read_batch`]'s digest mode), so two Redis versions, or two encodings of
//! one value, are not reported as different.
//!
//! Big keys (over `--big-key-size`) are compared a chunk at a time from the client: lengths
//! first, then ranges or members (HMGET, SMISMEMBER, ZMSCORE on the destination for each
//! chunk the source gives), so memory stays at one chunk.
//!
//! Not a difference: a key gone from the source by the time it is read, and a key missing in
//! the destination whose source TTL is within the tolerance (it expired in between). Keys only
//! in the destination are not looked for: the destination may hold other data.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::redis_io::{self, read_batch, ReadMode, Server};
use crate::report::Tally;
use crate::scan::{Batch, Processor};
use crate::Error;

const CHUNK: usize = 512;

pub struct Verifier {
    pub source: Arc<Server>,
    pub destination: Arc<Server>,
    pub ttl_tolerance: Duration,
    pub big_key_bytes: u64,
}

pub const MISSING: &str = "missing in the destination";
pub const TYPE_DIFFERS: &str = "type differs";
pub const VALUE_DIFFERS: &str = "value differs";
pub const TTL_DIFFERS: &str = "TTL differs";

impl Verifier {
    fn ttl_differs(&self, a: i64, b: i64) -> Option<String> {
        let tol = self.ttl_tolerance.as_millis() as i64;
        let show = |t: i64| {
            if t < 0 {
                "none".to_string()
            } else {
                format!("{t} ms")
            }
        };
        let differs = match (a < 0, b < 0) {
            (true, true) => false,
            (false, false) => (a - b).abs() > tol,
            _ => true,
        };
        differs.then(|| {
            format!(
                "TTL {} in the source, {} in the destination",
                show(a),
                show(b)
            )
        })
    }
}

impl Processor for Verifier {
    async fn process(&self, batch: Batch) -> Result<Tally, Error> {
        let read = |server| {
            read_batch(
                server,
                &batch.keys,
                self.big_key_bytes,
                ReadMode::Digest,
                false,
            )
        };
        let (src, dst) = tokio::join!(read(&self.source), read(&self.destination));
        let (src, dst) = (src?.0, dst?.0);
        let mut t = Tally::default();
        for (key, (a, b)) in batch.keys.iter().zip(src.iter().zip(&dst)) {
            let Some(a) = a else {
                t.skip("gone from the source before it was read");
                continue;
            };
            let Some(b) = b else {
                if a.pttl >= 0 && a.pttl <= self.ttl_tolerance.as_millis() as i64 {
                    t.skip("expired in between (TTL within the tolerance)");
                } else {
                    t.fail(MISSING, key, MISSING);
                }
                continue;
            };
            t.bytes += a.size;
            let (kind_a, kind_b) = match (&a.kind, &b.kind) {
                (Some(x), Some(y)) => (x.clone(), y.clone()),
                // A big key: its type was not read with the batch.
                _ => {
                    let cmd = redis::cmd("TYPE").arg(&key[..]).clone();
                    let (x, y) = tokio::join!(
                        self.source.query::<String>(&cmd),
                        self.destination.query::<String>(&cmd)
                    );
                    (x?, y?)
                }
            };
            if kind_a != kind_b {
                t.fail(
                    TYPE_DIFFERS,
                    key,
                    format!("{kind_a} in the source, {kind_b} in the destination"),
                );
                continue;
            }
            let digest = |r: &redis_io::Row| {
                r.value
                    .as_ref()
                    .and_then(redis_io::bytes)
                    .map(<[u8]>::to_vec)
            };
            let equal = match (digest(a), digest(b)) {
                (Some(x), Some(y)) => x == y,
                _ => {
                    t.note("big keys compared in chunks", 1);
                    compare_big(&self.source, &self.destination, key, &kind_a).await?
                }
            };
            if !equal {
                t.fail(VALUE_DIFFERS, key, format!("the {kind_a} values differ"));
            } else if let Some(why) = self.ttl_differs(a.pttl, b.pttl) {
                t.fail(TTL_DIFFERS, key, why);
            } else {
                t.done += 1;
            }
        }
        Ok(t)
    }
}

/// Compares one big key chunk by chunk.
async fn compare_big(src: &Server, dst: &Server, key: &[u8], kind: &str) -> Result<bool, Error> {
    let len_cmd = match kind {
        "string" => "STRLEN",
        "list" => "LLEN",
        "hash" => "HLEN",
        "set" => "SCARD",
        "zset" => "ZCARD",
        "stream" => "XLEN",
        _ => {
            // Module types: their DUMP payloads are all there is to compare.
            let a: Option<Vec<u8>> = src.query(redis::cmd("DUMP").arg(key)).await?;
            let b: Option<Vec<u8>> = dst.query(redis::cmd("DUMP").arg(key)).await?;
            return Ok(a == b);
        }
    };
    let len = redis::cmd(len_cmd).arg(key).clone();
    let (a, b): (Result<i64, _>, Result<i64, _>) = tokio::join!(src.query(&len), dst.query(&len));
    if a? != b? {
        return Ok(false);
    }
    match kind {
        "string" | "list" | "stream" => {
            let mut at = 0usize;
            let mut start = "-".to_string();
            loop {
                let cmd = match kind {
                    "string" => redis::cmd("GETRANGE")
                        .arg(key)
                        .arg(at)
                        .arg(at + (CHUNK << 10) - 1)
                        .clone(),
                    "list" => redis::cmd("LRANGE")
                        .arg(key)
                        .arg(at)
                        .arg(at + CHUNK - 1)
                        .clone(),
                    _ => redis::cmd("XRANGE")
                        .arg(key)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(CHUNK)
                        .clone(),
                };
                let (x, y): (Result<Value, _>, Result<Value, _>) =
                    tokio::join!(src.query(&cmd), dst.query(&cmd));
                let (x, y) = (x?, y?);
                if x != y {
                    return Ok(false);
                }
                let n = match &x {
                    Value::BulkString(b) => b.len(),
                    other => redis_io::items(other).len(),
                };
                if n == 0 {
                    return Ok(true);
                }
                at += n;
                if kind == "stream" {
                    let last = redis_io::items(&x)
                        .last()
                        .map(redis_io::items)
                        .and_then(|e| e.first())
                        .and_then(redis_io::bytes);
                    match last {
                        Some(id) => start = format!("({}", String::from_utf8_lossy(id)),
                        None => return Ok(true),
                    }
                }
            }
        }
        _ => {
            let probe = match kind {
                "hash" => "HMGET",
                "set" => "SMISMEMBER",
                _ => "ZMSCORE",
            };
            let mut cursor = 0u64;
            loop {
                let (next, part) = redis_io::scan_members(src, kind, key, cursor, CHUNK).await?;
                let (members, expected): (Vec<&Vec<u8>>, Vec<Option<&Vec<u8>>>) = if kind == "set" {
                    (part.iter().collect(), part.iter().map(|_| None).collect())
                } else {
                    part.chunks(2)
                        .filter(|p| p.len() == 2)
                        .map(|p| (&p[0], Some(&p[1])))
                        .unzip()
                };
                if !members.is_empty() {
                    let got: Vec<Value> =
                        dst.query(redis::cmd(probe).arg(key).arg(&members)).await?;
                    for (g, want) in got.iter().zip(&expected) {
                        let same = match (kind, want) {
                            ("set", _) => redis_io::int(g) == Some(1),
                            ("zset", Some(w)) => {
                                let parse = |b: &[u8]| {
                                    std::str::from_utf8(b)
                                        .ok()
                                        .and_then(|s| s.parse::<f64>().ok())
                                };
                                redis_io::bytes(g)
                                    .and_then(parse)
                                    .zip(parse(w))
                                    .is_some_and(|(x, y)| x == y)
                            }
                            (_, Some(w)) => redis_io::bytes(g) == Some(w.as_slice()),
                            _ => false,
                        };
                        if !same {
                            return Ok(false);
                        }
                    }
                }
                if next == 0 {
                    return Ok(true);
                }
                cursor = next;
            }
        }
    }
}
