//! Adapter mode: what happens to each command, from the table.
//!
//! The orchestrator answers the connection and server commands itself ([`Adapter::Here`]),
//! serves GET, SET (plain or with EX/PX), MGET and MSET through the workers' cache
//! ([`Adapter::Cache`]), refuses the commands that need a Redis connection of their own
//! ([`Adapter::Refused`]: transactions, blocking pops, subscriptions, replication, WAIT ...,
//! because every client shares the workers' connections to the destination), and passes
//! every other command to the destination Redis as is, then invalidates the keys it touches
//! on both partners. Those keys come from the table's key positions; a command the table
//! does not know is taken to touch its first argument (over-invalidating is harmless: the
//! next read refills from the destination). The entries below are the commands known only
//! for that: their access level for AUTH roles and their keys.

use bytes::Bytes;
use twincache_protocol::Status;

use super::{keys, Adapter, Group, KeySpec, Spec, NO_KEYS, ONE_KEY};
use crate::auth::Access::{self, Admin, Read, Write};
use crate::session::{Ctx, Step};
use twincache_protocol::resp::Reply;

const fn other(name: &'static str, access: Access, keys: KeySpec, adapter: Adapter) -> Spec {
    Spec {
        name,
        arity: -1,
        access,
        keys,
        group: Group::Other,
        fast: false,
        adapter,
        since: "",
        summary: "Passed to the destination Redis in adapter mode.",
        parse: None,
    }
}

const fn read(name: &'static str) -> Spec {
    other(name, Read, ONE_KEY, Adapter::Destination)
}

const fn write(name: &'static str) -> Spec {
    other(name, Write, ONE_KEY, Adapter::Destination)
}

const fn write_keys(name: &'static str, keys: KeySpec) -> Spec {
    other(name, Write, keys, Adapter::Destination)
}

const fn admin(name: &'static str) -> Spec {
    other(name, Admin, NO_KEYS, Adapter::Destination)
}

const fn refused(name: &'static str) -> Spec {
    other(name, Write, NO_KEYS, Adapter::Refused)
}

pub static SPECS: &[Spec] = &[
    // Lists.
    write("lpush"),
    write("rpush"),
    write("lpushx"),
    write("rpushx"),
    write("lpop"),
    write("rpop"),
    write("lset"),
    write("linsert"),
    write("lrem"),
    write("ltrim"),
    write_keys("rpoplpush", keys(1, 2, 1)),
    write_keys("lmove", keys(1, 2, 1)),
    write("lmpop"),
    read("lrange"),
    read("llen"),
    read("lindex"),
    read("lpos"),
    // Sets.
    write("sadd"),
    write("srem"),
    write("spop"),
    write_keys("smove", keys(1, 2, 1)),
    write_keys("sinterstore", keys(1, -1, 1)),
    write_keys("sunionstore", keys(1, -1, 1)),
    write_keys("sdiffstore", keys(1, -1, 1)),
    read("smembers"),
    read("sismember"),
    read("smismember"),
    read("scard"),
    read("srandmember"),
    read("sscan"),
    read("sinter"),
    read("sunion"),
    read("sdiff"),
    read("sintercard"),
    // Sorted sets (a STORE destination is the first key).
    write("zadd"),
    write("zrem"),
    write("zincrby"),
    write("zpopmin"),
    write("zpopmax"),
    write("zremrangebyscore"),
    write("zremrangebyrank"),
    write("zremrangebylex"),
    write("zunionstore"),
    write("zinterstore"),
    write("zdiffstore"),
    write_keys("zrangestore", keys(1, 2, 1)),
    write("zmpop"),
    read("zrange"),
    read("zrangebyscore"),
    read("zrevrange"),
    read("zrevrangebyscore"),
    read("zrangebylex"),
    read("zrevrangebylex"),
    read("zscore"),
    read("zmscore"),
    read("zcard"),
    read("zcount"),
    read("zlexcount"),
    read("zrank"),
    read("zrevrank"),
    read("zscan"),
    read("zrandmember"),
    // Streams.
    write("xadd"),
    write("xdel"),
    write("xtrim"),
    write("xgroup"),
    write("xack"),
    write("xclaim"),
    write("xautoclaim"),
    write("xsetid"),
    write("xreadgroup"),
    read("xrange"),
    read("xrevrange"),
    read("xlen"),
    read("xinfo"),
    read("xread"),
    read("xpending"),
    // HyperLogLog, bitmaps, geo.
    write("pfadd"),
    write_keys("pfmerge", keys(1, -1, 1)),
    read("pfcount"),
    write("setbit"),
    write_keys("bitop", keys(2, -1, 1)),
    write("bitfield"),
    read("getbit"),
    read("bitcount"),
    read("bitpos"),
    read("bitfield_ro"),
    write("geoadd"),
    write("georadius"),
    write("georadiusbymember"),
    read("geopos"),
    read("geodist"),
    read("geohash"),
    read("geosearch"),
    write("geosearchstore"),
    read("georadius_ro"),
    read("georadiusbymember_ro"),
    // Keys, scripts, the rest.
    write("restore"),
    read("dump"),
    read("memory"),
    read("lcs"),
    write("sort"),
    read("sort_ro"),
    write("move"),
    write("eval"),
    write("evalsha"),
    read("eval_ro"),
    read("evalsha_ro"),
    write("fcall"),
    read("fcall_ro"),
    other("publish", Write, NO_KEYS, Adapter::Destination),
    admin("script"),
    admin("function"),
    admin("acl"),
    admin("save"),
    admin("bgsave"),
    admin("bgrewriteaof"),
    admin("lastsave"),
    admin("slowlog"),
    admin("latency"),
    admin("module"),
    admin("migrate"),
    // Commands that hold the connection they run on (blocking, subscriptions,
    // replication) or act on the whole server.
    refused("blpop"),
    refused("brpop"),
    refused("brpoplpush"),
    refused("blmove"),
    refused("blmpop"),
    refused("bzpopmin"),
    refused("bzpopmax"),
    refused("bzmpop"),
    refused("waitaof"),
    refused("subscribe"),
    refused("psubscribe"),
    refused("ssubscribe"),
    refused("unsubscribe"),
    refused("punsubscribe"),
    refused("sunsubscribe"),
    refused("monitor"),
    refused("sync"),
    refused("psync"),
    refused("replconf"),
    refused("replicaof"),
    refused("slaveof"),
    refused("failover"),
    refused("shutdown"),
    refused("debug"),
    refused("reset"),
    refused("swapdb"),
];

/// Whether, in adapter mode, the command goes to the destination: everything not answered
/// here or served from the cache, and a SET with options other than EX/PX (NX, XX, GET,
/// KEEPTTL, EXAT, PXAT: the destination decides them).
pub fn passes_through(spec: Option<&Spec>, args: &[Bytes]) -> bool {
    match spec.map(|s| s.adapter) {
        Some(Adapter::Here) => false,
        Some(Adapter::Cache) => {
            args[0].eq_ignore_ascii_case(b"set")
                && args.len() > 3
                && !(args.len() == 5
                    && (args[3].eq_ignore_ascii_case(b"ex") || args[3].eq_ignore_ascii_case(b"px")))
        }
        _ => true,
    }
}

/// What a command passed to the destination needs: its table entry's access, or a write's
/// for a command the table does not know.
pub fn access(spec: Option<&Spec>) -> Access {
    spec.map_or(Write, |s| s.access)
}

/// Why a command may not pass through to the destination, if it may not.
pub fn refusal(spec: Option<&Spec>, args: &[Bytes]) -> Option<Reply> {
    let name = &args[0];
    let blocking_stream_read = (name.eq_ignore_ascii_case(b"xread")
        || name.eq_ignore_ascii_case(b"xreadgroup"))
        && args[1..].iter().any(|a| a.eq_ignore_ascii_case(b"block"));
    let refused = blocking_stream_read || spec.is_some_and(|s| s.adapter == Adapter::Refused);
    refused.then(|| {
        Reply::err(format!(
            "ERR '{}' is not supported through twincache's adapter mode: it needs a Redis \
             connection of its own; send it to the destination Redis directly",
            String::from_utf8_lossy(&name[..name.len().min(64)]).to_ascii_uppercase()
        ))
    })
}

/// The keys a command passed through may change, to invalidate in the cache: its table key
/// positions, a script's declared keys, a GEORADIUS's STORE destination, or else its first
/// argument.
pub fn touched(spec: Option<&Spec>, args: &[Bytes]) -> Vec<Bytes> {
    let name = args[0].to_ascii_lowercase();
    if matches!(
        name.as_slice(),
        b"eval" | b"evalsha" | b"eval_ro" | b"evalsha_ro" | b"fcall" | b"fcall_ro"
    ) {
        let n = args
            .get(2)
            .and_then(|n| twincache_protocol::resp::string2ll(n))
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        return args.iter().skip(3).take(n).cloned().collect();
    }
    let mut keys: Vec<Bytes> = match spec.filter(|s| s.keys.first > 0) {
        Some(s) => s.keys.of(args).cloned().collect(),
        None => args.get(1).cloned().into_iter().collect(),
    };
    if name.starts_with(b"georadius") {
        for w in args.windows(2) {
            if w[0].eq_ignore_ascii_case(b"store") || w[0].eq_ignore_ascii_case(b"storedist") {
                keys.push(w[1].clone());
            }
        }
    }
    keys
}

/// Runs a command on the destination Redis (its reply as is), then invalidates its keys.
pub fn passthrough(spec: Option<&Spec>, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    if let Some(refusal) = refusal(spec, &args) {
        return Step::Reply(refusal);
    }
    let touched = touched(spec, &args);
    let fut = ctx.router.passthrough(args, touched, &ctx.origin);
    super::dispatch(async move {
        let resp = fut.await;
        match resp.status {
            Status::Ok => Reply::Raw(resp.payload),
            _ => super::error_reply(&resp),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::lookup;

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn keys_of(list: &[&str]) -> Vec<Bytes> {
        let a = args(list);
        touched(lookup(&a[0]), &a)
    }

    #[test]
    fn touched_keys_come_from_the_table() {
        assert_eq!(keys_of(&["DEL", "a", "b"]), args(&["a", "b"]));
        assert_eq!(keys_of(&["mset", "a", "1", "b", "2"]), args(&["a", "b"]));
        assert_eq!(keys_of(&["rename", "a", "b"]), args(&["a", "b"]));
        assert_eq!(keys_of(&["lpush", "l", "x", "y"]), args(&["l"]));
        assert_eq!(
            keys_of(&["bitop", "and", "d", "s1", "s2"]),
            args(&["d", "s1", "s2"])
        );
        assert_eq!(
            keys_of(&["eval", "return 1", "2", "k1", "k2", "arg"]),
            args(&["k1", "k2"])
        );
        assert_eq!(
            keys_of(&["georadius", "g", "0", "0", "1", "km", "STORE", "dst"]),
            args(&["g", "dst"])
        );
        assert_eq!(keys_of(&["nosuchcommand", "x", "y"]), args(&["x"]));
        assert_eq!(keys_of(&["hset", "h", "f", "v"]), args(&["h"]));
    }

    #[test]
    fn what_passes_and_what_is_refused() {
        let p = |list: &[&str]| {
            let a = args(list);
            passes_through(lookup(&a[0]), &a)
        };
        assert!(!p(&["get", "k"]));
        assert!(!p(&["set", "k", "v", "EX", "5"]));
        assert!(p(&["set", "k", "v", "NX"]));
        assert!(p(&["incr", "k"]));
        assert!(p(&["lpush", "k", "v"]));
        assert!(!p(&["ping"]));
        let r = |list: &[&str]| {
            let a = args(list);
            refusal(lookup(&a[0]), &a).is_some()
        };
        assert!(r(&["multi"]) && r(&["blpop", "k", "0"]) && r(&["wait", "1", "0"]));
        assert!(r(&["xread", "BLOCK", "0", "STREAMS", "s", "$"]));
        assert!(!r(&["xread", "STREAMS", "s", "0"]) && !r(&["lpush", "k", "v"]));
        assert_eq!(access(lookup(b"lrange")), Read);
        assert_eq!(access(lookup(b"flushall")), Admin);
        assert_eq!(access(None), Write);
    }
}
