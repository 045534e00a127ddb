//! Adapter mode: the worker as a live migration tier between two Redis servers.
//!
//! The rules are Remiro's (seed 000), with the worker's own cache in front:
//!
//! - GET: the cache; else the destination; else the source. A value found in the source is
//!   written to the destination with its remaining TTL (`SET NX`, so a newer write that got
//!   there first wins), deleted from the source with `--delete-from-source`, cached, and
//!   returned. Found nowhere: not found.
//! - SET: written to the destination (write-through) and cached, and deleted from the source
//!   with `--delete-from-source`; acknowledged once the destination has it. Only the worker
//!   the orchestrator marks primary writes to Redis: one Redis write per client write.
//! - Anything else (INCR, HSET, EXPIRE, DEL, ...): passed to the destination and its reply
//!   returned as is; the orchestrator then invalidates the keys it touches on both partners.
//!
//! The cache stays consistent with the destination by versions. Cache fills use version 0
//! and only insert where the key holds nothing, so a fill can never override a write or an
//! invalidation (a short-lived tombstone). Writes on one key are serialised by a stripe lock
//! held across the version check, the Redis write and the cache update, so concurrent SETs
//! reach the destination in version order and the cache and destination end on the same,
//! newest, value.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;

use twincache_protocol::info::Info;

use crate::store::{SetOptions, Store};

/// How long an invalidation is remembered: longer than any cache fill in flight can take
/// (a fill is a Redis round trip, bounded by the response timeout).
pub const INVALIDATION_TTL_MS: u64 = 5_000;
const STRIPES: usize = 1024;
const TIMEOUT: Duration = Duration::from_secs(1);

/// Counters for `stats`, and progress of the migration.
#[derive(Debug, Default)]
pub struct AdapterCounters {
    pub cache_hits: AtomicU64,
    pub destination_hits: AtomicU64,
    /// Keys found in the source and copied to the destination.
    pub copied: AtomicU64,
    pub deleted_from_source: AtomicU64,
    pub not_found: AtomicU64,
    pub writes: AtomicU64,
    pub passthrough: AtomicU64,
    pub errors: AtomicU64,
}

/// A Redis server, connected on first use and reconnected by the connection manager.
struct Backend {
    name: &'static str,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
}

impl Backend {
    async fn conn(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            2 * TIMEOUT,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| format!("{} redis: connecting timed out", self.name))?
        .map_err(|e| format!("{} redis unreachable: {e}", self.name))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let mut c = self.conn().await?;
        tokio::time::timeout(2 * TIMEOUT, cmd.query_async(&mut c))
            .await
            .map_err(|_| format!("{} redis: no answer in time", self.name))?
            .map_err(|e| format!("{} redis: {e}", self.name))
    }

    /// The value and remaining TTL (ms; negative for none) of `key`.
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, i64)>, String> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        let mut c = self.conn().await?;
        let (value, ttl): (Option<Vec<u8>>, i64) =
            tokio::time::timeout(2 * TIMEOUT, pipe.query_async(&mut c))
                .await
                .map_err(|_| format!("{} redis: no answer in time", self.name))?
                .map_err(|e| format!("{} redis: {e}", self.name))?;
        Ok(value.map(|v| (v, ttl)))
    }
}

/// The adapter of one worker.
pub struct Adapter {
    source: Backend,
    destination: Backend,
    delete_from_source: bool,
    stripes: Vec<Arc<tokio::sync::Mutex<()>>>,
    pub counters: AdapterCounters,
}

impl Adapter {
    /// An adapter for the given Redis URLs (as the `redis` crate takes them). Connections
    /// are made on first use, so a Redis that is down at start only fails requests until it
    /// is back.
    pub fn new(
        source: &str,
        destination: &str,
        delete_from_source: bool,
    ) -> Result<Adapter, String> {
        let open = |url: &str, name: &'static str| {
            redis::Client::open(url)
                .map(|client| Backend {
                    name,
                    client,
                    conn: tokio::sync::Mutex::new(None),
                })
                .map_err(|e| format!("bad {name} redis URL {url}: {e}"))
        };
        Ok(Adapter {
            source: open(source, "source")?,
            destination: open(destination, "destination")?,
            delete_from_source,
            stripes: (0..STRIPES)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            counters: AdapterCounters::default(),
        })
    }

    /// The lock that orders writes (and reads behind them) on `key`.
    pub fn stripe(&self, key: &[u8]) -> Arc<tokio::sync::Mutex<()>> {
        let h = twincache_protocol::hash::key_hash(key);
        self.stripes[(h % STRIPES as u64) as usize].clone()
    }

    fn failed(&self, e: String) -> String {
        self.counters.errors.fetch_add(1, Relaxed);
        tracing::warn!(error = %e, "adapter request failed");
        e
    }

    /// GET after a cache miss: destination, else source (copied over). The cache is filled
    /// with what was found.
    pub async fn get_miss(&self, store: &Store, key: &[u8]) -> Result<Option<Bytes>, String> {
        if let Some((value, ttl)) = self
            .destination
            .get_with_ttl(key)
            .await
            .map_err(|e| self.failed(e))?
        {
            self.counters.destination_hits.fetch_add(1, Relaxed);
            fill(store, key, &value, ttl);
            return Ok(Some(value.into()));
        }
        let Some((value, ttl)) = self
            .source
            .get_with_ttl(key)
            .await
            .map_err(|e| self.failed(e))?
        else {
            self.counters.not_found.fetch_add(1, Relaxed);
            return Ok(None);
        };
        // Copy to the destination unless a write got there first (then that value wins).
        let mut set = redis::cmd("SET");
        set.arg(key).arg(&value).arg("NX");
        if ttl > 0 {
            set.arg("PX").arg(ttl);
        }
        let copied: Option<String> = self
            .destination
            .query(&set)
            .await
            .map_err(|e| self.failed(e))?;
        let value = if copied.is_some() {
            self.counters.copied.fetch_add(1, Relaxed);
            tracing::debug!("copied a key from source to destination");
            value
        } else {
            match self
                .destination
                .get_with_ttl(key)
                .await
                .map_err(|e| self.failed(e))?
            {
                Some((newer, _)) => newer,
                None => value,
            }
        };
        if self.delete_from_source {
            self.del_source(key).await;
        }
        fill(store, key, &value, ttl);
        Ok(Some(value.into()))
    }

    async fn del_source(&self, key: &[u8]) {
        match self.source.query::<i64>(redis::cmd("DEL").arg(key)).await {
            Ok(n) => {
                self.counters
                    .deleted_from_source
                    .fetch_add(n.max(0) as u64, Relaxed);
            }
            Err(e) => {
                self.failed(e);
            }
        }
    }

    /// SET by the primary: through to the destination, then into the cache, in version
    /// order per key; a write older than what the cache holds was overtaken and is done.
    /// `in_order` is the key's stripe lock, taken when the request arrived.
    pub async fn set(
        &self,
        store: &Store,
        key: &[u8],
        value: &[u8],
        version: u64,
        ttl_ms: u64,
        in_order: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<(), String> {
        let _in_order = in_order;
        if store.version(key).is_some_and(|v| v > version) {
            return Ok(());
        }
        let mut set = redis::cmd("SET");
        set.arg(key).arg(value);
        if ttl_ms > 0 {
            set.arg("PX").arg(ttl_ms);
        }
        let _: () = self
            .destination
            .query(&set)
            .await
            .map_err(|e| self.failed(e))?;
        self.counters.writes.fetch_add(1, Relaxed);
        let opts = SetOptions {
            ttl_ms,
            ..Default::default()
        };
        store
            .set(key, value, version, opts)
            .map_err(|e| e.to_string())?;
        drop(_in_order);
        if self.delete_from_source {
            self.del_source(key).await;
        }
        Ok(())
    }

    /// Runs a RESP-encoded command on the destination; the reply RESP-encoded, errors included.
    pub async fn passthrough(&self, command: &[u8]) -> Result<Bytes, String> {
        let args = twincache_protocol::resp::RespDecoder::for_bytes(command.len(), command.len())
            .decode(&mut BytesMut::from(command))
            .ok()
            .flatten()
            .ok_or("passthrough needs one RESP command")?;
        let mut cmd = redis::cmd(&String::from_utf8_lossy(&args[0]));
        for a in &args[1..] {
            cmd.arg(&a[..]);
        }
        self.counters.passthrough.fetch_add(1, Relaxed);
        let mut c = self.destination.conn().await.map_err(|e| self.failed(e))?;
        let mut out = BytesMut::new();
        match tokio::time::timeout(2 * TIMEOUT, cmd.query_async::<Value>(&mut c)).await {
            Err(_) => return Err(self.failed("destination redis: no answer in time".into())),
            Ok(Ok(value)) => encode_value(&value, &mut out),
            Ok(Err(e)) if e.code().is_some() => {
                // Redis answered with an error: that is the reply, not a failure of ours.
                let text = format!("{} {}", e.code().unwrap_or("ERR"), e.detail().unwrap_or(""));
                put_line(&mut out, b'-', text.trim_end().as_bytes());
            }
            Ok(Err(e)) => return Err(self.failed(format!("destination redis: {e}"))),
        }
        Ok(out.freeze())
    }

    /// Adds the counters to a `stats` text.
    pub fn stats_text(&self, info: &mut Info) {
        let c = &self.counters;
        info.add("adapter_cache_hits", c.cache_hits.load(Relaxed))
            .add("adapter_destination_hits", c.destination_hits.load(Relaxed))
            .add("adapter_copied_from_source", c.copied.load(Relaxed))
            .add(
                "adapter_deleted_from_source",
                c.deleted_from_source.load(Relaxed),
            )
            .add("adapter_not_found", c.not_found.load(Relaxed))
            .add("adapter_writes", c.writes.load(Relaxed))
            .add("adapter_passthrough", c.passthrough.load(Relaxed))
            .add("adapter_errors", c.errors.load(Relaxed));
    }
}

/// Caches what was read from Redis, only where the key holds nothing (version 0 loses to
/// every write and invalidation), with the TTL Redis reported.
fn fill(store: &Store, key: &[u8], value: &[u8], ttl_ms: i64) {
    let opts = SetOptions {
        nx: true,
        ttl_ms: ttl_ms.max(0) as u64,
        ..Default::default()
    };
    let _ = store.set(key, value, 0, opts);
}

fn put_line(out: &mut BytesMut, tag: u8, text: &[u8]) {
    out.put_u8(tag);
    out.extend(
        text.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

/// RESP2 encoding of a reply from Redis (RESP3-only types mapped to their RESP2 forms).
fn encode_value(v: &Value, out: &mut BytesMut) {
    let bulk = |out: &mut BytesMut, b: &[u8]| {
        out.put_slice(format!("${}\r\n", b.len()).as_bytes());
        out.put_slice(b);
        out.put_slice(b"\r\n");
    };
    let array = |out: &mut BytesMut, items: &[Value]| {
        out.put_slice(format!("*{}\r\n", items.len()).as_bytes());
        for item in items {
            encode_value(item, out);
        }
    };
    match v {
        Value::Nil => out.put_slice(b"$-1\r\n"),
        Value::Int(n) => out.put_slice(format!(":{n}\r\n").as_bytes()),
        Value::BulkString(b) => bulk(out, b),
        Value::Array(items) | Value::Set(items) => array(out, items),
        Value::SimpleString(s) => put_line(out, b'+', s.as_bytes()),
        Value::Okay => out.put_slice(b"+OK\r\n"),
        Value::Map(pairs) => {
            out.put_slice(format!("*{}\r\n", pairs.len() * 2).as_bytes());
            for (k, v) in pairs {
                encode_value(k, out);
                encode_value(v, out);
            }
        }
        Value::Double(d) => bulk(out, d.to_string().as_bytes()),
        Value::Boolean(b) => out.put_slice(if *b { b":1\r\n" } else { b":0\r\n" }),
        Value::VerbatimString { text, .. } => bulk(out, text.as_bytes()),
        Value::Push { data, .. } => array(out, data),
        Value::Attribute { data, .. } => encode_value(data, out),
        Value::ServerError(e) => {
            let text = format!("{} {}", e.code(), e.details().unwrap_or(""));
            put_line(out, b'-', text.trim_end().as_bytes());
        }
        other => bulk(out, format!("{other:?}").as_bytes()),
    }
}
