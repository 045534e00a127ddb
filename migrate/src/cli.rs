//! The command line (fixed by issue 10: these verbs and flags are what users script against)
//! and what each verb runs. The URLs, the registry and the tuning flags can also come from
//! environment variables (`--help` names them), which keeps passwords off command lines.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backup::{self, BackupWriter, Header};
use crate::copy::{Copier, CopyOptions};
use crate::redis_io::{redact_url, Server};
use crate::registry::{schema, stored, Planner, Registry};
use crate::report::{Progress, Tally};
use crate::scan::{self, CheckpointSpec, Processor, ScanSpec};
use crate::transform::{TransformOptions, Transformer};
use crate::verify::Verifier;
use crate::{Error, Outcome};

#[derive(Debug, Parser)]
#[command(
    name = "twincache-migrate",
    version,
    about = "Bulk Redis migration: copy, verify, schema registry, in-place transforms, rollback",
    long_about = "Bulk Redis migration: copy every key from one Redis to another, verify them, \
keep a registry of value schemas, migrate values in place to a schema version, and roll back.\n\n\
URLs are as the redis crate takes them: redis://[:password@]host[:port][/db].\n\
Exit codes: 0 done, 1 differences (verify) or keys that failed, 2 bad flags, unreachable \
servers or malformed files."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// No progress display (the summary is still printed).
    #[arg(long, global = true, env = "TWINCACHE_MIGRATE_QUIET", value_parser = clap::builder::BoolishValueParser::new())]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy keys (every type, with their remaining TTLs) from a source Redis to a destination.
    Copy(CopyArgs),
    /// Compare source and destination: missing keys, different values, types or TTLs.
    Verify(VerifyArgs),
    /// The schema registry: check, diff, push to Redis, list what Redis holds.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Migrate values in place to a schema version.
    Transform(TransformArgs),
    /// Put back what a transform run changed, from its backup file.
    Rollback(RollbackArgs),
}

/// Redis key types, as SCAN's TYPE filter takes them.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeyType {
    String,
    Hash,
    List,
    Set,
    Zset,
    Stream,
}

impl KeyType {
    fn name(self) -> &'static str {
        match self {
            KeyType::String => "string",
            KeyType::Hash => "hash",
            KeyType::List => "list",
            KeyType::Set => "set",
            KeyType::Zset => "zset",
            KeyType::Stream => "stream",
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    twincache_protocol::units::parse_size(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    twincache_protocol::units::parse_duration(s)
}

/// Flags every bulk verb shares.
#[derive(Debug, Args)]
pub struct Tuning {
    /// Keys per batch (one SCAN call, one read and one write round trip per batch).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000), env = "TWINCACHE_MIGRATE_BATCH")]
    pub batch: u64,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256), env = "TWINCACHE_MIGRATE_CONCURRENCY")]
    pub concurrency: u64,
    /// Keys larger than this (Redis MEMORY USAGE) are handled a chunk at a time instead of
    /// in one DUMP: KiB, MiB, GiB.
    #[arg(long, default_value = "8MiB", value_parser = parse_size, env = "TWINCACHE_MIGRATE_BIG_KEY_SIZE")]
    pub big_key_size: u64,
}

/// The two servers, and the key filter, of `copy` and `verify`.
#[derive(Debug, Args)]
pub struct Servers {
    /// Redis to copy from (or compare with).
    #[arg(long, env = "TWINCACHE_MIGRATE_SOURCE", hide_env_values = true)]
    pub source: String,
    /// Redis to copy to (or compare).
    #[arg(long, env = "TWINCACHE_MIGRATE_DESTINATION", hide_env_values = true)]
    pub destination: String,
    /// Only keys matching this glob (SCAN MATCH).
    #[arg(long = "match", value_name = "GLOB")]
    pub pattern: Option<String>,
}

impl Servers {
    async fn connect(&self, tuning: &Tuning) -> Result<(Arc<Server>, Arc<Server>), Error> {
        let n = connections(tuning);
        let source = Server::connect("source", &self.source, n).await?;
        let destination = Server::connect("destination", &self.destination, n).await?;
        Ok((Arc::new(source), Arc::new(destination)))
    }
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// Only keys of this type (SCAN TYPE).
    #[arg(long = "type", value_enum)]
    pub key_type: Option<KeyType>,
    #[command(flatten)]
    pub tuning: Tuning,
    /// At most this many keys per second.
    #[arg(long, value_name = "KEYS_PER_S", env = "TWINCACHE_MIGRATE_RATE_LIMIT")]
    pub rate_limit: Option<u64>,
    /// Overwrite keys the destination already has (by default they are left alone).
    #[arg(long)]
    pub replace: bool,
    /// Delete each key from the source once the destination holds it.
    #[arg(long)]
    pub delete_from_source: bool,
    /// Record progress in FILE, so that --resume can continue after a crash or Ctrl-C.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Continue the run recorded in --checkpoint.
    #[arg(long, requires = "checkpoint")]
    pub resume: bool,
    /// Write nothing; report what would be copied and skipped.
    #[arg(long, conflicts_with = "checkpoint")]
    pub dry_run: bool,
    /// Schema registry directory: transform JSON values of the target's key pattern on the way.
    #[arg(
        long,
        value_name = "DIR",
        requires = "to",
        env = "TWINCACHE_MIGRATE_REGISTRY"
    )]
    pub registry: Option<PathBuf>,
    /// Schema version to transform values to (with --registry).
    #[arg(long, value_name = "VERSION", requires = "registry")]
    pub to: Option<String>,
    /// Test hook: pause after writing a batch, before it counts as done.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub pause_after_write: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub servers: Servers,
    /// Check only the first N keys the scan returns (SCAN order is the hash table's, so
    /// effectively a random sample).
    #[arg(long, value_name = "N")]
    pub sample: Option<u64>,
    /// TTLs that differ by more than this are a difference (ms, s, m, h).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub ttl_tolerance: Duration,
    #[command(flatten)]
    pub tuning: Tuning,
}

#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Load and check a registry directory (schema files and migrations.json).
    Check { dir: PathBuf },
    /// List the changes between two schema versions, each breaking or not.
    Diff {
        dir: PathBuf,
        from: String,
        to: String,
    },
    /// Store the registry in Redis (replacing the one there).
    Push {
        dir: PathBuf,
        #[arg(long, env = "TWINCACHE_MIGRATE_REDIS", hide_env_values = true)]
        redis: String,
    },
    /// Show the registry stored in Redis.
    List {
        #[arg(long, env = "TWINCACHE_MIGRATE_REDIS", hide_env_values = true)]
        redis: String,
    },
}

#[derive(Debug, Args)]
pub struct TransformArgs {
    /// Redis whose values are migrated in place.
    #[arg(long, env = "TWINCACHE_MIGRATE_REDIS", hide_env_values = true)]
    pub redis: String,
    /// Schema registry directory.
    #[arg(long, value_name = "DIR", env = "TWINCACHE_MIGRATE_REGISTRY")]
    pub registry: PathBuf,
    /// Schema version to migrate values to.
    #[arg(long, value_name = "VERSION")]
    pub to: String,
    /// Only keys matching this glob (default: the target schema's key pattern).
    #[arg(long = "match", value_name = "GLOB")]
    pub pattern: Option<String>,
    /// Write nothing; report counts per migration path, samples and validation failures.
    #[arg(long, conflicts_with_all = ["checkpoint", "backup"])]
    pub dry_run: bool,
    /// Write every value's old form (DUMP payload and expiry) here before changing it.
    #[arg(long, value_name = "FILE")]
    pub backup: Option<PathBuf>,
    /// Record progress in FILE, so that --resume can continue after a crash or Ctrl-C.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Continue the run recorded in --checkpoint.
    #[arg(long, requires = "checkpoint")]
    pub resume: bool,
    #[command(flatten)]
    pub tuning: Tuning,
    /// Test hook: pause between reading a batch and writing it.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub pause_before_write: Option<Duration>,
    /// Test hook: pause after writing a batch, before it counts as done.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub pause_after_write: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Backup file written by `transform --backup`.
    #[arg(long, value_name = "FILE")]
    pub backup: PathBuf,
    /// Redis to restore the values into.
    #[arg(long, env = "TWINCACHE_MIGRATE_REDIS", hide_env_values = true)]
    pub redis: String,
}

/// Runs the command; what it printed is on stdout, the outcome decides the exit code.
pub async fn run(cli: Cli) -> Result<Outcome, Error> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Copy(a) => copy(a, quiet).await,
        Command::Verify(a) => verify(a, quiet).await,
        Command::Schema(c) => schema_command(c).await,
        Command::Transform(a) => transform(a, quiet).await,
        Command::Rollback(a) => {
            let redis = Server::connect("target", &a.redis, 1).await?;
            let started = Instant::now();
            let t = backup::rollback(&a.backup, &redis).await?;
            let ran = Ran {
                started,
                keys: t.scanned,
            };
            Ok(finish(&t, "rollback", "restored", &ran))
        }
    }
}

/// Runs the scan engine with a progress display for `verb`; the tally, and when it started.
async fn scan_with_progress<P: Processor>(
    verb: &'static str,
    total: Option<u64>,
    quiet: bool,
    source: Arc<Server>,
    spec: ScanSpec,
    processor: Arc<P>,
    checkpoint: Option<CheckpointSpec>,
) -> Result<(Tally, Ran), Error> {
    let progress = Progress::new(verb, total, quiet);
    let lines = progress.spawn_plain_lines(verb);
    let started = Instant::now();
    let resumable = checkpoint.is_some();
    let result = scan::run(source, spec, processor, checkpoint, progress.clone()).await;
    progress.finish();
    if let Some(l) = lines {
        l.abort();
    }
    if resumable && matches!(result, Err(Error::Interrupted) | Err(Error::Redis { .. })) {
        eprintln!("progress is in the checkpoint: run the same command with --resume to go on");
    }
    let keys = progress.keys();
    Ok((result?, Ran { started, keys }))
}

/// When a run started, and how many keys it scanned itself.
struct Ran {
    started: Instant,
    keys: u64,
}

/// Prints the summary; keys that failed make the exit code 1.
fn finish(t: &Tally, verb: &str, done_as: &str, ran: &Ran) -> Outcome {
    print!(
        "{}",
        t.summary(verb, done_as, ran.started.elapsed(), ran.keys)
    );
    if t.failed_total() > 0 {
        Outcome::Differences
    } else {
        Outcome::Ok
    }
}

fn spec(pattern: Option<String>, key_type: Option<KeyType>, tuning: &Tuning) -> ScanSpec {
    ScanSpec {
        pattern,
        key_type: key_type.map(|t| t.name().to_string()),
        batch: tuning.batch as usize,
        concurrency: tuning.concurrency as usize,
        rate_limit: None,
        limit: None,
        exclude_prefix: None,
    }
}

/// Connections per server: enough that concurrent batches do not share one socket's reader.
fn connections(tuning: &Tuning) -> usize {
    (tuning.concurrency as usize).clamp(1, 4)
}

/// DBSIZE, for the progress bar's ETA when every key is scanned.
async fn key_count(server: &Server, pattern: &Option<String>) -> Option<u64> {
    if pattern.is_some() {
        return None;
    }
    server.query(&redis::cmd("DBSIZE")).await.ok()
}

async fn copy(a: CopyArgs, quiet: bool) -> Result<Outcome, Error> {
    let registry = a.registry.as_deref().map(Registry::load).transpose()?;
    let (source, destination) = a.servers.connect(&a.tuning).await?;
    let planner = match (registry, &a.to) {
        (Some(r), Some(to)) => {
            let r = Arc::new(r);
            let target = r.version(to)?;
            let hint = stored::current(&source, &r.schemas[&target].file.key_pattern).await?;
            Some(Arc::new(Planner::new(r, to, hint.as_deref())?))
        }
        _ => None,
    };
    let run = format!(
        "copy {} -> {} match={} type={} registry={}",
        redact_url(&a.servers.source),
        redact_url(&a.servers.destination),
        a.servers.pattern.as_deref().unwrap_or("*"),
        a.key_type.map_or("any", KeyType::name),
        a.to.as_deref().unwrap_or("none"),
    );
    let checkpoint = a.checkpoint.clone().map(|path| CheckpointSpec {
        path,
        run,
        resume: a.resume,
    });
    check_fresh_checkpoint(&checkpoint)?;
    let mut spec = spec(a.servers.pattern.clone(), a.key_type, &a.tuning);
    spec.rate_limit = a.rate_limit;
    let total = key_count(&source, &a.servers.pattern).await;
    let copier = Copier::new(
        source.clone(),
        destination,
        CopyOptions {
            replace: a.replace,
            delete_from_source: a.delete_from_source,
            dry_run: a.dry_run,
            big_key_bytes: a.tuning.big_key_size,
            planner,
            strings_possible: a.key_type.is_none_or(|t| matches!(t, KeyType::String)),
            pause_after_write: a.pause_after_write,
        },
    );
    let (t, ran) = scan_with_progress(
        "copy",
        total,
        quiet,
        source,
        spec,
        Arc::new(copier),
        checkpoint,
    )
    .await?;
    Ok(finish(
        &t,
        "copy",
        if a.dry_run {
            "would be copied"
        } else {
            "copied"
        },
        &ran,
    ))
}

/// Without --resume, an existing checkpoint is an error: starting over would throw away the
/// record of a run that did not finish.
fn check_fresh_checkpoint(cp: &Option<CheckpointSpec>) -> Result<(), Error> {
    match cp {
        Some(c) if !c.resume && c.path.exists() => Err(Error::Usage(format!(
            "checkpoint {} exists: add --resume to continue that run, or remove the file to start over",
            c.path.display()
        ))),
        _ => Ok(()),
    }
}

async fn verify(a: VerifyArgs, quiet: bool) -> Result<Outcome, Error> {
    let (source, destination) = a.servers.connect(&a.tuning).await?;
    let mut spec = spec(a.servers.pattern.clone(), None, &a.tuning);
    spec.limit = a.sample;
    let total = match a.sample {
        Some(n) => Some(n),
        None => key_count(&source, &a.servers.pattern).await,
    };
    let verifier = Verifier {
        source: source.clone(),
        destination,
        ttl_tolerance: a.ttl_tolerance,
        big_key_bytes: a.tuning.big_key_size,
    };
    let (t, ran) = scan_with_progress(
        "verify",
        total,
        quiet,
        source,
        spec,
        Arc::new(verifier),
        None,
    )
    .await?;
    let outcome = finish(&t, "verify", "equal", &ran);
    println!(
        "{}",
        if outcome == Outcome::Ok {
            "source and destination agree"
        } else {
            "source and destination differ"
        }
    );
    Ok(outcome)
}

async fn schema_command(c: SchemaCommand) -> Result<Outcome, Error> {
    match c {
        SchemaCommand::Check { dir } => {
            let r = Registry::load(&dir)?;
            print!("{}", r.describe());
            println!("registry {} is valid", dir.display());
        }
        SchemaCommand::Diff { dir, from, to } => {
            let r = Registry::load(&dir)?;
            let (a, b) = (r.version(&from)?, r.version(&to)?);
            let changes = schema::diff(&r.schemas[&a].file, &r.schemas[&b].file);
            for c in &changes {
                println!(
                    "{:<12} {}",
                    if c.breaking { "BREAKING" } else { "compatible" },
                    c.what
                );
            }
            let breaking = changes.iter().filter(|c| c.breaking).count();
            println!(
                "{} changes from {a} to {b}, {breaking} breaking",
                changes.len()
            );
        }
        SchemaCommand::Push { dir, redis } => {
            let r = Registry::load(&dir)?;
            let server = Server::connect("registry", &redis, 1).await?;
            print!("{}", stored::push(&r, &server).await?);
        }
        SchemaCommand::List { redis } => {
            let server = Server::connect("registry", &redis, 1).await?;
            print!("{}", stored::list(&server).await?);
        }
    }
    Ok(Outcome::Ok)
}

async fn transform(a: TransformArgs, quiet: bool) -> Result<Outcome, Error> {
    let registry = Arc::new(Registry::load(&a.registry)?);
    let target = registry.version(&a.to)?;
    let redis = Arc::new(Server::connect("target", &a.redis, connections(&a.tuning)).await?);
    let key_pattern = registry.schemas[&target].file.key_pattern.clone();
    let hint = stored::current(&redis, &key_pattern).await?;
    let planner = Arc::new(Planner::new(registry, &a.to, hint.as_deref())?);
    let pattern = a.pattern.clone().unwrap_or_else(|| key_pattern.clone());
    let run = format!(
        "transform {} match={pattern} to={target}",
        redact_url(&a.redis)
    );
    let checkpoint = a.checkpoint.clone().map(|path| CheckpointSpec {
        path,
        run,
        resume: a.resume,
    });
    check_fresh_checkpoint(&checkpoint)?;
    let backup = match &a.backup {
        Some(path) => {
            let header = Header {
                format: "twincache-migrate-backup".into(),
                version: 1,
                created_at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                redis: redact_url(&a.redis),
                target: target.to_string(),
            };
            Some(BackupWriter::open(path, &header, a.resume)?)
        }
        None => None,
    };
    let mut spec = spec(Some(pattern), None, &a.tuning);
    spec.exclude_prefix = Some(stored::PREFIX.as_bytes().to_vec());
    let transformer = Arc::new(Transformer::new(
        redis.clone(),
        planner.clone(),
        TransformOptions {
            dry_run: a.dry_run,
            backup,
            big_key_bytes: a.tuning.big_key_size,
            pause_before_write: a.pause_before_write,
            pause_after_write: a.pause_after_write,
        },
    ));
    let (t, ran) = scan_with_progress(
        "transform",
        None,
        quiet,
        redis.clone(),
        spec,
        transformer.clone(),
        checkpoint,
    )
    .await?;
    let outcome = finish(
        &t,
        "transform",
        if a.dry_run {
            "would be transformed"
        } else {
            "transformed"
        },
        &ran,
    );
    if a.dry_run {
        for (key, before, after) in transformer
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            println!("sample {key}\n  before: {before}\n  after:  {after}");
        }
    } else if t.failed_total() == 0 && a.pattern.is_none() {
        // Every value of the pattern is now at the target: record it, so later runs settle
        // ambiguous values in its favour.
        stored::set_current(&redis, &key_pattern, &planner.target).await?;
    }
    Ok(outcome)
}
