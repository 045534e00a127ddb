//! The registry kept in Redis itself (seed 003: "store schema definitions in Redis itself"),
//! so that every tool and application instance reading that Redis sees the same schemas, and
//! the pattern-to-version map that records where each key pattern's values stand.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `twincache-migrate:schemas` | hash | version -> schema file text |
//! | `twincache-migrate:migrations` | string | `migrations.json` text |
//! | `twincache-migrate:patterns` | hash | key pattern -> newest version pushed |
//! | `twincache-migrate:current` | hash | key pattern -> version every value was left at by the last clean `transform` |
//!
//! The bulk verbs never hand these keys to a transform (they skip the prefix).

use std::collections::BTreeMap;

use semver::Version;

use super::Registry;
use crate::redis_io::Server;
use crate::Error;

pub const PREFIX: &str = "twincache-migrate:";
const SCHEMAS: &str = "twincache-migrate:schemas";
const MIGRATIONS: &str = "twincache-migrate:migrations";
const PATTERNS: &str = "twincache-migrate:patterns";
const CURRENT: &str = "twincache-migrate:current";

/// Replaces the registry stored in `redis` with `registry`, in one MULTI/EXEC.
pub async fn push(registry: &Registry, redis: &Server) -> Result<String, Error> {
    let mut newest: BTreeMap<&str, &Version> = BTreeMap::new();
    for (v, s) in &registry.schemas {
        newest.insert(&s.file.key_pattern, v);
    }
    let mut pipe = redis::pipe();
    pipe.atomic().del(SCHEMAS).del(PATTERNS);
    for (v, s) in &registry.schemas {
        pipe.hset(SCHEMAS, v.to_string(), s.text.as_str());
    }
    for (p, v) in &newest {
        pipe.hset(PATTERNS, *p, v.to_string());
    }
    pipe.set(MIGRATIONS, registry.migrations_text.as_str());
    let replies = redis.pipeline(&mut pipe).await?;
    if let Some(e) = replies.iter().find_map(crate::redis_io::server_error) {
        return Err(Error::Usage(format!(
            "{} redis refused the registry: {e}",
            redis.what
        )));
    }
    Ok(format!(
        "pushed {} schema versions and {} migrations to {} ({} key patterns)\n",
        registry.schemas.len(),
        registry.edges.iter().filter(|e| !e.reverse).count(),
        redis.addr,
        newest.len()
    ))
}

/// What the registry in `redis` holds, for `schema list`.
pub async fn list(redis: &Server) -> Result<String, Error> {
    let schemas: BTreeMap<String, String> = redis.query(redis::cmd("HGETALL").arg(SCHEMAS)).await?;
    let current: BTreeMap<String, String> = redis.query(redis::cmd("HGETALL").arg(CURRENT)).await?;
    let migrations: Option<String> = redis.query(redis::cmd("GET").arg(MIGRATIONS)).await?;
    let mut out = String::new();
    if schemas.is_empty() {
        out += &format!(
            "no registry in {} (push one with `schema push DIR --redis URL`)\n",
            redis.addr
        );
    }
    let mut rows: Vec<(Version, String)> = Vec::new();
    for (v, text) in &schemas {
        let parsed: Result<super::schema::SchemaFile, _> = serde_json::from_str(text);
        let line = match parsed {
            Ok(s) => format!("{}  {} fields", s.key_pattern, s.fields.len()),
            Err(e) => format!("(unreadable: {e})"),
        };
        rows.push((
            Version::parse(v).unwrap_or(Version::new(0, 0, 0)),
            format!("{v}  {line}"),
        ));
    }
    rows.sort();
    for (_, line) in rows {
        out += &format!("schema {line}\n");
    }
    if let Some(m) = migrations.and_then(|t| serde_json::from_str::<super::MigrationsFile>(&t).ok())
    {
        for (name, spec) in &m.migrations {
            out += &format!(
                "migration {name}  {} -> {}  {} steps\n",
                spec.source,
                spec.target,
                spec.transforms.len()
            );
        }
    }
    for (pattern, v) in &current {
        out += &format!("current {pattern}  {v}\n");
    }
    Ok(out)
}

/// The version recorded as current for `pattern`, if any.
pub async fn current(redis: &Server, pattern: &str) -> Result<Option<String>, Error> {
    redis
        .query(redis::cmd("HGET").arg(CURRENT).arg(pattern))
        .await
}

/// Records that every value of `pattern` is now at `version`.
pub async fn set_current(redis: &Server, pattern: &str, version: &Version) -> Result<(), Error> {
    redis
        .query(
            redis::cmd("HSET")
                .arg(CURRENT)
                .arg(pattern)
                .arg(version.to_string()),
        )
        .await
}
