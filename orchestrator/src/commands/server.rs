//! Server commands, answered by the orchestrator: INFO (sections Redis tools read, with
//! memory and key-space figures summed over the workers), CONFIG GET (the parameters tools
//! ask for), COMMAND (from the command table), TIME and WAIT.

use bytes::Bytes;
use twincache_protocol::glob;
use twincache_protocol::info;
use twincache_protocol::resp::Reply;

use super::{dispatch, int, lookup, wrong_args, Adapter, Cmd, Family, Group, Spec};
use crate::auth::Access::{Admin, Connection, Read};
use crate::cluster::WorkerState;
use crate::session::{Ctx, Step};

/// The Redis version whose commands and replies twincache follows.
pub const REDIS_VERSION: &str = "7.0.0";

const SERVER: Family = Family::new(Group::Server, Adapter::Here);

pub static SPECS: &[Spec] = &[
    SERVER.cmd("info", -1, Read, "Returns information and statistics about the server.", |a| {
        Ok(Cmd::Info(a[1..].iter().map(|s| String::from_utf8_lossy(s).to_ascii_lowercase()).collect()))
    }),
    SERVER.since("2.0.0").cmd("config", -2, Admin, "A container for server configuration commands (GET only).", config_args),
    SERVER.since("2.8.13").cmd("command", -1, Connection, "Returns detailed information about all commands.", command_args),
    SERVER.adapter(Adapter::Destination).since("2.6.0").cmd("time", 1, Connection, "Returns the server time.", |_| Ok(Cmd::Time)),
    SERVER.since("3.0.0").cmd("cluster", -2, Admin, "Changes the cluster's pairs: ADDPAIR <addr> <addr>, REMOVEPAIR <n | addr>, REPLACE <old addr> <new addr> (slots move online; see INFO cluster).", cluster_args),
    SERVER.adapter(Adapter::Refused).since("3.0.0").cmd("wait", 3, Read, "Blocks until the asynchronous replication of all preceding write commands sent by the connection is completed.", wait_args),
];

fn config_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    let sub = args[1].to_ascii_lowercase();
    match sub.as_slice() {
        b"get" if args.len() >= 3 => Ok(Cmd::ConfigGet(args[2..].to_vec())),
        b"get" => Err(Reply::err(
            "ERR wrong number of arguments for 'config|get' command",
        )),
        b"set" | b"rewrite" | b"resetstat" => Err(Reply::err(format!(
            "ERR CONFIG {} is not supported by twincache: its settings are command-line flags",
            String::from_utf8_lossy(&sub).to_ascii_uppercase()
        ))),
        _ => Err(Reply::err(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            String::from_utf8_lossy(&args[1][..args[1].len().min(64)])
        ))),
    }
}

/// A CLUSTER subcommand: a change to the pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterChange {
    AddPair(String, String),
    /// By index (`pair<n>` in INFO cluster) or by the address of one of its workers.
    RemovePair(String),
    Replace(String, String),
}

fn cluster_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    let sub = args[1].to_ascii_lowercase();
    let word = |i: usize| String::from_utf8_lossy(&args[i]).into_owned();
    let change = match (sub.as_slice(), args.len()) {
        (b"addpair", 4) => ClusterChange::AddPair(word(2), word(3)),
        (b"removepair", 3) => ClusterChange::RemovePair(word(2)),
        (b"replace", 4) => ClusterChange::Replace(word(2), word(3)),
        (b"addpair" | b"removepair" | b"replace", _) => {
            return Err(wrong_args(&format!(
                "cluster|{}",
                String::from_utf8_lossy(&sub)
            )))
        }
        _ => {
            return Err(Reply::err(format!(
                "ERR unknown subcommand '{}'. twincache's CLUSTER takes ADDPAIR, REMOVEPAIR or \
                 REPLACE",
                String::from_utf8_lossy(&args[1][..args[1].len().min(64)])
            )))
        }
    };
    Ok(Cmd::Cluster(change))
}

/// CLUSTER ADDPAIR / REMOVEPAIR / REPLACE: asks for the pairs with this change; the change
/// runs in the background (progress in INFO cluster). Refused with --cluster-file, whose
/// next reload would undo it, and with the reason when `Router::want` refuses it.
pub(super) fn cluster(change: ClusterChange, ctx: &Ctx) -> Step<Reply> {
    if ctx.router.membership.from_file() {
        return Step::Reply(Reply::err(
            "ERR the pairs come from --cluster-file: edit it and send the orchestrator SIGHUP",
        ));
    }
    let router = ctx.router.clone();
    let edit = move |mut pairs: Vec<[String; 2]>| {
        let addr = |a: &str| crate::config::parse_worker(a);
        match change {
            ClusterChange::AddPair(a, b) => pairs.push([addr(&a)?, addr(&b)?]),
            ClusterChange::RemovePair(which) => {
                // A number is a pair as INFO cluster numbers it now (`pairN`), which is not
                // the position in the wanted list while an earlier change is under way.
                let a = match which.parse::<usize>() {
                    Ok(n) => router
                        .pairs()
                        .get(n)
                        .map(|p| p.workers[0].addr.clone())
                        .ok_or("no such pair")?,
                    Err(_) => addr(&which)?,
                };
                let at = pairs
                    .iter()
                    .position(|p| p.contains(&a))
                    .ok_or("no pair has that worker")?;
                pairs.remove(at);
            }
            ClusterChange::Replace(old, new) => {
                let (old, new) = (addr(&old)?, addr(&new)?);
                let slot = pairs
                    .iter_mut()
                    .flatten()
                    .find(|w| **w == old)
                    .ok_or("no pair has that worker")?;
                *slot = new;
            }
        }
        Ok(pairs.into_iter().flatten().collect())
    };
    let router = ctx.router.clone();
    dispatch(async move {
        // It resolves host names: off the event loop.
        let wanted = tokio::task::spawn_blocking(move || router.want(edit)).await;
        match wanted.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(()) => Reply::OK,
            Err(e) => Reply::err(format!("ERR {e}")),
        }
    })
}

fn wait_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    int(&args[1])?;
    if int(&args[2])? < 0 {
        return Err(Reply::err("ERR timeout is negative"));
    }
    Ok(Cmd::Wait)
}

/// What COMMAND was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandQuery {
    All,
    Count,
    List,
    Info(Vec<Bytes>),
    Docs(Vec<Bytes>),
    GetKeys(Vec<Bytes>),
    Help,
}

fn command_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    let Some(sub) = args.get(1) else {
        return Ok(Cmd::Command(CommandQuery::All));
    };
    let rest = args[2..].to_vec();
    let sub = sub.to_ascii_lowercase();
    Ok(Cmd::Command(match (sub.as_slice(), rest.len()) {
        (b"count", 0) => CommandQuery::Count,
        (b"list", 0) => CommandQuery::List,
        (b"info", _) => CommandQuery::Info(rest),
        (b"docs", _) => CommandQuery::Docs(rest),
        (b"getkeys", n) if n > 0 => CommandQuery::GetKeys(rest),
        (b"help", 0) => CommandQuery::Help,
        (b"count" | b"list" | b"getkeys" | b"help", _) => {
            return Err(wrong_args(&format!(
                "command|{}",
                String::from_utf8_lossy(&sub)
            )))
        }
        _ => {
            return Err(Reply::err(format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                String::from_utf8_lossy(&args[1][..args[1].len().min(64)])
            )))
        }
    }))
}

/// The commands this cluster runs: the native ones, and in adapter mode those it passes
/// on too.
fn listed(ctx: &Ctx) -> impl Iterator<Item = &'static Spec> {
    let adapter = ctx.router.is_adapter();
    super::all().filter(move |s| s.native() || adapter)
}

fn status(s: &str) -> Reply {
    Reply::Line(s.to_string())
}

fn bulk(s: &str) -> Reply {
    Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
}

/// COMMAND INFO's entry for `spec`, in Redis 7's shape.
fn info_of(spec: &Spec) -> Reply {
    Reply::Array(vec![
        bulk(spec.name),
        Reply::Int(spec.arity.into()),
        Reply::Set(spec.flags().into_iter().map(status).collect()),
        Reply::Int(spec.keys.first.into()),
        Reply::Int(spec.keys.last.into()),
        Reply::Int(spec.keys.step.into()),
        Reply::Set(spec.categories().iter().map(|c| status(c)).collect()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ])
}

fn docs_of(spec: &Spec) -> Reply {
    Reply::Map(vec![
        (bulk("summary"), bulk(spec.summary)),
        (bulk("since"), bulk(spec.since)),
        (bulk("group"), bulk(spec.group.name())),
    ])
}

pub(super) fn command(query: CommandQuery, ctx: &Ctx) -> Reply {
    let known = |name: &[u8]| lookup(name).filter(|s| s.native() || ctx.router.is_adapter());
    match query {
        CommandQuery::All => Reply::Array(listed(ctx).map(info_of).collect()),
        CommandQuery::Count => Reply::Int(listed(ctx).count() as i64),
        CommandQuery::List => Reply::Array(listed(ctx).map(|s| bulk(s.name)).collect()),
        CommandQuery::Info(names) if names.is_empty() => {
            Reply::Array(listed(ctx).map(info_of).collect())
        }
        CommandQuery::Info(names) => Reply::Array(
            names
                .iter()
                .map(|n| known(n).map_or(Reply::Nil, info_of))
                .collect(),
        ),
        CommandQuery::Docs(names) => {
            let specs: Vec<&Spec> = if names.is_empty() {
                listed(ctx).collect()
            } else {
                names.iter().filter_map(|n| known(n)).collect()
            };
            Reply::Map(
                specs
                    .into_iter()
                    .map(|s| (bulk(s.name), docs_of(s)))
                    .collect(),
            )
        }
        CommandQuery::GetKeys(args) => match known(&args[0]) {
            None => Reply::err("ERR Invalid command specified"),
            Some(spec) if !spec.arity_ok(args.len()) => {
                Reply::err("ERR Invalid number of arguments specified for command")
            }
            Some(spec) => {
                let keys: Vec<Reply> = spec.keys.of(&args).cloned().map(Reply::Bulk).collect();
                if keys.is_empty() {
                    Reply::err("ERR The command has no key arguments")
                } else {
                    Reply::Array(keys)
                }
            }
        },
        CommandQuery::Help => Reply::Array(
            [
                "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "(no subcommand): return details about all commands",
                "COUNT: return the number of commands",
                "LIST: return the names of all commands",
                "INFO [<command-name> ...]: details about the given commands",
                "DOCS [<command-name> ...]: summary, version and group of the given commands",
                "GETKEYS <full-command>: the keys of a full command",
                "HELP: print this help",
            ]
            .iter()
            .map(|l| status(l))
            .collect(),
        ),
    }
}

/// Each worker's `name:value` counters (`None` where it does not answer).
async fn worker_stats(ctx: &Ctx) -> Vec<Option<String>> {
    ctx.router.all_worker_stats().await
}

fn number(stats: &str, name: &str) -> u64 {
    info::get(stats, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What CONFIG GET reports (name, value), in this order.
async fn config_values(ctx: &Ctx) -> Vec<(&'static str, String)> {
    let stats = worker_stats(ctx).await;
    let max_memory: u64 = stats
        .iter()
        .flatten()
        .map(|s| number(s, "max_memory"))
        .sum();
    let c = &ctx.config;
    vec![
        ("maxmemory", max_memory.to_string()),
        ("maxmemory-policy", "allkeys-lru".into()),
        ("save", String::new()),
        ("appendonly", "no".into()),
        ("databases", "1".into()),
        ("port", c.port.to_string()),
        ("timeout", c.idle_timeout.as_secs().to_string()),
        ("proto-max-bulk-len", c.max_frame.to_string()),
        ("client-query-buffer-limit", c.max_command.to_string()),
        ("cluster-enabled", "no".into()),
        ("io-threads", "1".into()),
        ("lazyfree-lazy-user-flush", "no".into()),
    ]
}

pub(super) fn config_get(patterns: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let ctx = ctx.clone();
    dispatch(async move {
        let values = config_values(&ctx).await;
        // Lowercased and compiled once, not for every parameter.
        let patterns: Vec<glob::Pattern> = patterns
            .iter()
            .map(|p| glob::Pattern::new(&p.to_ascii_lowercase()))
            .collect();
        let pairs = values
            .into_iter()
            .filter(|(name, _)| patterns.iter().any(|p| p.matches(name.as_bytes())))
            .map(|(name, value)| (bulk(name), Reply::Bulk(Bytes::from(value))))
            .collect();
        Reply::Map(pairs)
    })
}

fn human(bytes: u64) -> String {
    let units = ["B", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.2}{}", units[u])
    }
}

pub(super) fn info(sections: Vec<String>, ctx: &Ctx) -> Step<Reply> {
    let show = move |section: &str| {
        sections.is_empty()
            || sections
                .iter()
                .any(|w| w == section || w == "all" || w == "default" || w == "everything")
    };
    let ctx = ctx.clone();
    dispatch(async move {
        let m = &ctx.metrics;
        let mut text = String::new();
        if show("server") {
            let uptime = m.started.elapsed().as_secs();
            text += &format!(
                "# Server\r\nredis_version:{REDIS_VERSION}\r\ntwincache_version:{}\r\n\
                 redis_mode:standalone\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\n\
                 uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                ctx.config.port,
                uptime / 86_400,
            );
        }
        if show("clients") {
            text += &format!(
                "# Clients\r\nconnected_clients:{}\r\n\r\n",
                m.connected_clients()
            );
        }
        let stats = if show("memory") || show("stats") {
            worker_stats(&ctx).await
        } else {
            Vec::new()
        };
        let sum = |name: &str| stats.iter().flatten().map(|s| number(s, name)).sum::<u64>();
        if show("memory") {
            let (used, max) = (sum("bytes"), sum("max_memory"));
            text += &format!(
                "# Memory\r\nused_memory:{used}\r\nused_memory_human:{}\r\nmaxmemory:{max}\r\n\
                 maxmemory_human:{}\r\nmaxmemory_policy:allkeys-lru\r\n\
                 twincache_workers_answering:{}\r\n\r\n",
                human(used),
                human(max),
                stats.iter().flatten().count(),
            );
        }
        if show("stats") {
            text += &format!(
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
                 keyspace_hits:{}\r\nkeyspace_misses:{}\r\n\r\n",
                m.total_connections(),
                m.total_commands(),
                sum("hits"),
                sum("misses"),
            );
        }
        if show("cluster") {
            text += &format!("# Cluster\r\n{}\r\n", ctx.router.describe());
        }
        if show("keyspace") {
            text += "# Keyspace\r\n";
            // One worker per pair: both hold the same keys.
            let (mut keys, mut expires, mut ttl_sum) = (0u64, 0u64, 0u128);
            for s in ctx.router.pair_stats().await.into_iter().flatten() {
                let e = number(&s, "expires");
                keys += number(&s, "keys");
                expires += e;
                ttl_sum += u128::from(number(&s, "avg_ttl")) * u128::from(e);
            }
            if keys > 0 {
                let avg_ttl = ttl_sum.checked_div(u128::from(expires)).unwrap_or(0);
                text += &format!("db0:keys={keys},expires={expires},avg_ttl={avg_ttl}\r\n");
            }
        }
        Reply::Verbatim("txt", Bytes::from(text))
    })
}

/// TIME: the orchestrator's clock, which stamps the versions.
pub(super) fn time() -> Reply {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Reply::Array(vec![
        Reply::Bulk(Bytes::from(now.as_secs().to_string())),
        Reply::Bulk(Bytes::from(now.subsec_micros().to_string())),
    ])
}

/// WAIT: writes are acknowledged only once both workers of their pair took them, or the
/// one that missed is on record and out of service until it has refilled. So there is
/// nothing to wait for: the answer is the replicas (partners) holding every acknowledged
/// write now, 1 if every pair has both workers in sync, else 0.
pub(super) fn wait(ctx: &Ctx) -> Reply {
    let all = ctx
        .router
        .pairs()
        .iter()
        .all(|p| p.workers.iter().all(|w| w.state() == WorkerState::InSync));
    Reply::Int(i64::from(all))
}
