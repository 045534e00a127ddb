//! `verify`: for each scanned source key, the same script runs on both servers and returns
//! the type, the remaining TTL and a digest of the value, so a batch is compared in two round
//! trips whatever the values' sizes.
//!
//! The digest is of the logical value, not of the DUMP payload, which differs between Redis
//! versions and encodings of the same value: a string's bytes; a list's, zset's (with
//! scores, in Redis' own order) and stream's entries in order; and for a hash or a set, a sum
//! of the SHA-1 of each member, so the order a server keeps them in does not matter.
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

use crate::redis_io::{self, Server};
use crate::report::Tally;
use crate::scan::{Batch, Processor};
use crate::Error;

const CHUNK: usize = 512;

/// Per key: 0 when missing, else {type, pttl, digest or false (big), size}.
const DIGEST_SCRIPT: &str = r#"
local cap = tonumber(ARGV[1])
local function lp(list)
  local parts = {}
  for i, s in ipairs(list) do parts[i] = #s .. ':' .. s end
  return table.concat(parts)
end
-- Order-independent: two 52-bit sums of the members' SHA-1s.
local function bag(list, step)
  local a, b = 0, 0
  for i = 1, #list, step do
    local item = list[i]
    if step == 2 then item = #list[i] .. ':' .. list[i] .. list[i + 1] end
    local h = redis.sha1hex(item)
    a = (a + tonumber(string.sub(h, 1, 13), 16)) % 4503599627370496
    b = (b + tonumber(string.sub(h, 14, 26), 16)) % 4503599627370496
  end
  return string.format('%d:%.0f:%.0f', #list, a, b)
end
local out = {}
for i, k in ipairs(KEYS) do
  local size = redis.call('MEMORY', 'USAGE', k)
  if not size then
    out[i] = 0
  else
    local t = redis.call('TYPE', k)['ok']
    local pttl = redis.call('PTTL', k)
    local d = false
    if size <= cap then
      if t == 'string' then d = redis.call('GET', k)
      elseif t == 'list' then d = lp(redis.call('LRANGE', k, 0, -1))
      elseif t == 'hash' then d = bag(redis.call('HGETALL', k), 2)
      elseif t == 'set' then d = bag(redis.call('SMEMBERS', k), 1)
      elseif t == 'zset' then d = lp(redis.call('ZRANGE', k, 0, -1, 'WITHSCORES'))
      elseif t == 'stream' then
        local parts = {}
        for j, e in ipairs(redis.call('XRANGE', k, '-', '+')) do parts[j] = e[1] .. lp(e[2]) end
        d = lp(parts)
      else d = redis.call('DUMP', k) end
      d = redis.sha1hex(d)
    end
    out[i] = {t, pttl, d, size}
  end
end
return out
"#;

pub struct Verifier {
    pub source: Arc<Server>,
    pub destination: Arc<Server>,
    pub ttl_tolerance: Duration,
    pub big_key_bytes: u64,
}

struct Seen {
    kind: String,
    pttl: i64,
    digest: Option<Vec<u8>>,
    size: u64,
}

fn seen(v: Option<&Value>) -> Option<Seen> {
    let f = redis_io::items(v?);
    Some(Seen {
        kind: String::from_utf8_lossy(redis_io::bytes(f.first()?)?).into_owned(),
        pttl: redis_io::int(f.get(1)?)?,
        digest: f.get(2).and_then(redis_io::bytes).map(<[u8]>::to_vec),
        size: f.get(3).and_then(redis_io::int).unwrap_or(0).max(0) as u64,
    })
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
        let cap = self.big_key_bytes.to_string();
        let args: [&[u8]; 1] = [cap.as_bytes()];
        let (src, dst) = tokio::join!(
            self.source.eval(DIGEST_SCRIPT, &batch.keys, &args),
            self.destination.eval(DIGEST_SCRIPT, &batch.keys, &args)
        );
        let (src, dst) = (src?, dst?);
        let (src, dst) = (redis_io::items(&src), redis_io::items(&dst));
        let mut t = Tally::default();
        for (i, key) in batch.keys.iter().enumerate() {
            let Some(a) = seen(src.get(i)) else {
                t.skip("gone from the source before it was read");
                continue;
            };
            let Some(b) = seen(dst.get(i)) else {
                if a.pttl >= 0 && a.pttl <= self.ttl_tolerance.as_millis() as i64 {
                    t.skip("expired in between (TTL within the tolerance)");
                } else {
                    t.fail(MISSING, key, MISSING);
                }
                continue;
            };
            t.bytes += a.size;
            if a.kind != b.kind {
                t.fail(
                    TYPE_DIFFERS,
                    key,
                    format!("{} in the source, {} in the destination", a.kind, b.kind),
                );
                continue;
            }
            let equal = match (&a.digest, &b.digest) {
                (Some(x), Some(y)) => x == y,
                _ => {
                    t.note("big keys compared in chunks", 1);
                    compare_big(&self.source, &self.destination, key, &a.kind).await?
                }
            };
            if !equal {
                t.fail(VALUE_DIFFERS, key, format!("the {} values differ", a.kind));
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
            let (scan, probe) = match kind {
                "hash" => ("HSCAN", "HMGET"),
                "set" => ("SSCAN", "SMISMEMBER"),
                _ => ("ZSCAN", "ZMSCORE"),
            };
            let mut cursor = 0u64;
            loop {
                let (next, part): (u64, Vec<Vec<u8>>) = src
                    .query(
                        redis::cmd(scan)
                            .arg(key)
                            .arg(cursor)
                            .arg("COUNT")
                            .arg(CHUNK),
                    )
                    .await?;
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
