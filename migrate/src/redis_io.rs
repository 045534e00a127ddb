//! Talking to Redis: opening URLs with clear errors, a few multiplexed connections per server,
//! pipelines whose per-command errors come back as values, and helpers to read replies without
//! trusting their shape (an odd reply is an error for that key, never a panic).
//!
//! Adapter mode (`worker::adapter`) could take [`open_client`] for its URL errors and
//! [`Server::connect`] for the first-connection checks; it keeps its `ConnectionManager`
//! because a long-lived tier must reconnect by itself, where a bulk run should stop and
//! report (its checkpoint lets it resume).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::Error;

/// How long the first connection may take before the server counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one reply may take. Generous: a batch script over a thousand keys, or a big DUMP,
/// legitimately takes a while on a loaded server.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses a Redis URL as the `redis` crate does (`redis://[:password@]host[:port][/db]`,
/// `rediss://`, `unix://`), naming the flag in the error.
pub fn open_client(what: &'static str, url: &str) -> Result<redis::Client, Error> {
    redis::Client::open(url).map_err(|e| Error::BadUrl {
        what,
        url: url.to_string(),
        reason: e.to_string(),
    })
}

/// One Redis server: a few multiplexed connections, handed out in turn so that concurrent
/// batches do not queue behind one socket's reader.
pub struct Server {
    pub what: &'static str,
    pub addr: String,
    client: redis::Client,
    conns: Vec<MultiplexedConnection>,
    next: AtomicUsize,
}

impl Server {
    /// Connects `connections` times (at least once) and checks the server answers PING, so a
    /// wrong address, password or database fails here, before any work starts.
    pub async fn connect(
        what: &'static str,
        url: &str,
        connections: usize,
    ) -> Result<Server, Error> {
        let client = open_client(what, url)?;
        let addr = client.get_connection_info().addr().to_string();
        let unreachable = |reason: String| Error::Unreachable {
            what,
            addr: addr.clone(),
            reason,
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conns = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            let connect = client.get_multiplexed_async_connection_with_config(&config);
            let mut conn = tokio::time::timeout(2 * CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| unreachable("connecting timed out".into()))?
                .map_err(|e| unreachable(e.to_string()))?;
            let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
            pong.map_err(|e| unreachable(e.to_string()))?;
            conns.push(conn);
        }
        Ok(Server {
            what,
            addr,
            client,
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// A connection; successive calls spread over the pool.
    pub fn conn(&self) -> MultiplexedConnection {
        let i = self.next.fetch_add(1, Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    /// A connection of its own, for WATCH: the multiplexed ones are shared, and WATCH state
    /// belongs to a connection.
    pub async fn dedicated(&self) -> Result<MultiplexedConnection, Error> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.failed(e))
    }

    pub fn failed(&self, source: redis::RedisError) -> Error {
        Error::Redis {
            what: self.what,
            source,
        }
    }

    /// Runs one command.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        cmd.query_async(&mut self.conn())
            .await
            .map_err(|e| self.failed(e))
    }

    /// Runs a pipeline and returns one reply per command, a Redis error reply included as
    /// [`Value::ServerError`], so one bad key (BUSYKEY, WRONGTYPE) does not fail the others.
    pub async fn pipeline(&self, pipe: &mut redis::Pipeline) -> Result<Vec<Value>, Error> {
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        pipe.ignore_errors();
        let replies: Vec<Value> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(replies)
    }

    /// `EVAL script` over `keys` with `args`: a batch in one round trip, with the per-key
    /// decisions (size checks, compare-and-set) made inside the server.
    pub async fn eval(
        &self,
        script: &str,
        keys: &[Vec<u8>],
        args: &[&[u8]],
    ) -> Result<Value, Error> {
        self.query(&eval_cmd(script, keys, args)).await
    }
}

/// Lua shared by the scripts that must agree on what a value is: `lp` joins strings with
/// length prefixes, and `value_text(k, t)` is a string's bytes or a hash's field/value pairs
/// (in the server's order), the text whose SHA-1 `transform` compares before it writes (the
/// read script computes the same from the value it has already fetched).
macro_rules! value_text_lua {
    () => {
        r#"
local function lp(list)
  local parts = {}
  for i, s in ipairs(list) do parts[i] = #s .. ':' .. s end
  return table.concat(parts)
end
local function value_text(k, t)
  if t == 'string' then return redis.call('GET', k) end
  return lp(redis.call('HGETALL', k))
end
"#
    };
}
pub(crate) use value_text_lua;

/// Reads a batch of keys in one round trip. ARGV: the size (MEMORY USAGE bytes) above
/// which a key is only sized, not dumped; the mode (`size`: sizes only; `dump`; `value`:
/// also the type, the value of strings and hashes, its expiry and the SHA-1 of its
/// `value_text`; `value-nodump`: the same without the payload; `digest`: the type and a
/// digest of the value instead of the payload); `1` to add the SHA-1 of each DUMP.
/// Per key: `0` when missing, else `{pttl, size, dump, sha1, type, value}` cut short after
/// `size` for keys that are not dumped, and in value mode the absolute expiry (PEXPIRETIME;
/// -3 where the server is older than 7.0). The last item is the server's TIME.
///
/// The digest is of the logical value, not of the DUMP payload (which differs between
/// Redis versions and encodings of one value): a string's bytes; list, zset (with scores,
/// in Redis' order) and stream items in order; for hashes and sets an order-free sum of the
/// members' SHA-1s, so the order a server keeps them in does not matter.
const READ_SCRIPT: &str = concat!(
    value_text_lua!(),
    r#"
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
local function digest(k, t)
  if t == 'string' then return redis.call('GET', k)
  elseif t == 'list' then return lp(redis.call('LRANGE', k, 0, -1))
  elseif t == 'hash' then return bag(redis.call('HGETALL', k), 2)
  elseif t == 'set' then return bag(redis.call('SMEMBERS', k), 1)
  elseif t == 'zset' then return lp(redis.call('ZRANGE', k, 0, -1, 'WITHSCORES'))
  elseif t == 'stream' then
    local parts = {}
    for j, e in ipairs(redis.call('XRANGE', k, '-', '+')) do parts[j] = e[1] .. lp(e[2]) end
    return lp(parts)
  end
  return redis.call('DUMP', k)
end
local cap, mode, want_sha = tonumber(ARGV[1]), ARGV[2], ARGV[3] == '1'
local out = {}
for i, k in ipairs(KEYS) do
  local size = redis.call('MEMORY', 'USAGE', k)
  if not size then
    out[i] = 0
  else
    local pttl = redis.call('PTTL', k)
    if size > cap or mode == 'size' then
      out[i] = {pttl, size}
    elseif mode == 'digest' then
      local t = redis.call('TYPE', k)['ok']
      out[i] = {pttl, size, false, false, t, redis.sha1hex(digest(k, t))}
    else
      local row = {pttl, size, false, false}
      if mode ~= 'value-nodump' then
        local d = redis.call('DUMP', k)
        row[3] = d
        if want_sha then row[4] = redis.sha1hex(d) end
      end
      if mode == 'value' or mode == 'value-nodump' then
        local t = redis.call('TYPE', k)['ok']
        row[5] = t
        row[6] = false
        row[7] = false
        row[8] = false
        if t == 'string' then
          row[6] = redis.call('GET', k)
          row[8] = redis.sha1hex(row[6])
        elseif t == 'hash' then
          row[6] = redis.call('HGETALL', k)
          row[8] = redis.sha1hex(lp(row[6]))
        end
        -- The absolute expiry goes with the payload (into a backup).
        if mode == 'value' then
          local at = redis.pcall('PEXPIRETIME', k)
          if type(at) ~= 'number' then at = -3 end
          row[7] = at
        end
      end
      out[i] = row
    end
  end
end
out[#KEYS + 1] = redis.call('TIME')
return out
"#
);

/// What [`read_batch`] dumps: nothing, payloads, or payloads and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    Size,
    Dump,
    /// Values of strings and hashes, with their DUMP payloads (`dump: true`) or without.
    Value {
        dump: bool,
    },
    Digest,
}

/// One key as [`read_batch`] found it.
#[derive(Debug, Default)]
pub struct Row {
    /// Remaining time to live in ms; -1 for none.
    pub pttl: i64,
    /// MEMORY USAGE, bytes.
    pub size: u64,
    /// The DUMP payload; `None` for a big key (or in size mode).
    pub dump: Option<Vec<u8>>,
    /// SHA-1 (hex) of the payload, when asked for.
    pub sha: Option<Vec<u8>>,
    /// The Redis type, in value and digest modes (not for big keys).
    pub kind: Option<String>,
    /// The value of a string or hash, in value mode; the digest in digest mode.
    pub value: Option<Value>,
    /// SHA-1 (hex) of the value's `value_text`, in value mode, for compare-and-set.
    pub value_sha: Option<Vec<u8>>,
    /// Absolute expiry in Unix ms, in value mode: `None` for no expiry, or when the server
    /// cannot say (before Redis 7.0: then it is the read time plus `pttl`).
    pub expire_at_ms: Option<u64>,
}

/// Reads `keys` from `server` in one script call: one row per key (`None`: missing), and the
/// server's clock in Unix ms.
pub async fn read_batch(
    server: &Server,
    keys: &[Vec<u8>],
    big_key_bytes: u64,
    mode: ReadMode,
    want_sha: bool,
) -> Result<(Vec<Option<Row>>, u64), Error> {
    let mode_arg: &[u8] = match mode {
        ReadMode::Size => b"size",
        ReadMode::Dump => b"dump",
        ReadMode::Value { dump: true } => b"value",
        ReadMode::Value { dump: false } => b"value-nodump",
        ReadMode::Digest => b"digest",
    };
    let cap = big_key_bytes.to_string();
    let reply = server
        .eval(
            READ_SCRIPT,
            keys,
            &[cap.as_bytes(), mode_arg, if want_sha { b"1" } else { b"0" }],
        )
        .await?;
    let mut items = match reply {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    let time = items.pop().map(|t| server_time_ms(&t)).unwrap_or(0);
    let mut rows: Vec<Option<Row>> = items.into_iter().map(row).collect();
    rows.resize_with(keys.len(), || None);
    for r in rows.iter_mut().flatten() {
        if r.expire_at_ms == Some(u64::MAX) {
            r.expire_at_ms = Some(time + r.pttl as u64);
        }
    }
    Ok((rows, time))
}

/// `copy`'s read of a batch: strings, most keys of most caches, by value in one MULTI/EXEC
/// of PTTL and GETRANGE (at most `big_key_bytes` + 1 bytes) per key, which costs the server
/// a fraction of a DUMP (no RDB encoding, compression attempt or checksum) and of a script;
/// the other keys (WRONGTYPE) then through [`read_batch`]'s dump mode.
pub async fn read_for_copy(
    server: &Server,
    keys: &[Vec<u8>],
    big_key_bytes: u64,
) -> Result<Vec<Option<Row>>, Error> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for k in keys {
        // GETRANGE takes a signed end; Redis strings stop at 512 MiB anyway.
        let end = big_key_bytes.min(i64::MAX as u64);
        pipe.cmd("PTTL")
            .arg(&k[..])
            .cmd("GETRANGE")
            .arg(&k[..])
            .arg(0)
            .arg(end);
    }
    let replies = server.pipeline(&mut pipe).await?;
    let mut rows: Vec<Option<Row>> = Vec::with_capacity(keys.len());
    let mut others = Vec::new();
    let mut replies = replies.into_iter();
    for (i, _) in keys.iter().enumerate() {
        let (Some(pttl), Some(value)) = (replies.next(), replies.next()) else {
            rows.push(None);
            continue;
        };
        let pttl = int(&pttl).unwrap_or(-2);
        rows.push(match value {
            _ if pttl == -2 => None,
            Value::BulkString(b) if b.len() as u64 > big_key_bytes => Some(Row {
                pttl,
                size: b.len() as u64,
                ..Row::default()
            }),
            Value::BulkString(b) => Some(Row {
                pttl,
                size: b.len() as u64,
                kind: Some("string".into()),
                value: Some(Value::BulkString(b)),
                ..Row::default()
            }),
            _ => {
                others.push(i);
                None
            }
        });
    }
    if !others.is_empty() {
        let subset: Vec<Vec<u8>> = others.iter().map(|&i| keys[i].clone()).collect();
        let (found, _) = read_batch(server, &subset, big_key_bytes, ReadMode::Dump, false).await?;
        for (i, row) in others.into_iter().zip(found) {
            rows[i] = row;
        }
    }
    Ok(rows)
}

fn row(v: Value) -> Option<Row> {
    let Value::Array(fields) = v else { return None };
    let mut it = fields.into_iter();
    let mut row = Row {
        pttl: it.next().as_ref().and_then(int)?,
        size: it.next().as_ref().and_then(int).unwrap_or(0).max(0) as u64,
        ..Row::default()
    };
    let take = |v: Option<Value>| match v {
        Some(Value::BulkString(b)) => Some(b),
        _ => None,
    };
    row.dump = take(it.next());
    row.sha = take(it.next());
    row.kind = take(it.next()).map(|b| String::from_utf8_lossy(&b).into_owned());
    row.value = it.next();
    // -3 stands for "ask the clock" until read_batch knows the server's time.
    row.expire_at_ms = match it.next().as_ref().and_then(int) {
        Some(at) if at >= 0 => Some(at as u64),
        Some(-3) if row.pttl > 0 => Some(u64::MAX),
        _ => None,
    };
    row.value_sha = take(it.next());
    Some(row)
}

/// Unix ms from a TIME reply (`[seconds, microseconds]`).
fn server_time_ms(v: &Value) -> u64 {
    let t = items(v);
    let secs = t.first().and_then(int).unwrap_or(0).max(0) as u64;
    let micros = t.get(1).and_then(int).unwrap_or(0).max(0) as u64;
    secs * 1000 + micros / 1000
}

/// One chunk of a hash's, set's or zset's members, by HSCAN (field, value pairs), SSCAN or
/// ZSCAN (member, score pairs); the next cursor (0 when done) and the chunk.
pub async fn scan_members(
    server: &Server,
    kind: &str,
    key: &[u8],
    cursor: u64,
    count: usize,
) -> Result<(u64, Vec<Vec<u8>>), Error> {
    let scan = match kind {
        "hash" => "HSCAN",
        "set" => "SSCAN",
        _ => "ZSCAN",
    };
    let mut cmd = redis::cmd(scan);
    cmd.arg(key).arg(cursor).arg("COUNT").arg(count);
    server.query(&cmd).await
}

/// The EVAL command for a script, its keys and arguments.
pub fn eval_cmd(script: &str, keys: &[Vec<u8>], args: &[&[u8]]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(&k[..]);
    }
    for a in args {
        cmd.arg(*a);
    }
    cmd
}

/// The bytes of a bulk or simple string reply.
pub fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::Okay => Some(b"OK"),
        _ => None,
    }
}

/// An integer reply (or a string holding one, as some scripts return).
pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => std::str::from_utf8(bytes(other)?).ok()?.parse().ok(),
    }
}

/// The items of an array reply; anything else is no items.
pub fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// The text of an error reply (`BUSYKEY Target key name already exists.`).
pub fn server_error(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => Some(
            format!("{} {}", e.code(), e.details().unwrap_or(""))
                .trim_end()
                .to_string(),
        ),
        _ => None,
    }
}

/// What a reply says about how a per-key command went: `Ok`, or the error text.
pub fn reply_status(v: &Value) -> Result<(), String> {
    match server_error(v) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A short, printable form of a key for reports (keys are bytes; most are text).
pub fn show_key(key: &[u8]) -> String {
    const MAX: usize = 120;
    let text = String::from_utf8_lossy(key);
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}...")
    } else {
        text.into_owned()
    }
}

/// A URL without its password, for files and messages that may be shared.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://:pw@host:1/0"), "redis://***@host:1/0");
        assert_eq!(redact_url("redis://host:1/0"), "redis://host:1/0");
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        let e = open_client("source", "http://nope").err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("bad source URL"), "{e}");
    }

    #[test]
    fn odd_replies_are_none() {
        assert_eq!(int(&Value::Nil), None);
        assert_eq!(int(&Value::BulkString(b"12".to_vec())), Some(12));
        assert!(items(&Value::Int(3)).is_empty());
        assert_eq!(show_key(&[b'a'; 200]).len(), 123);
    }
}
