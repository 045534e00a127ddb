//! RESP sessions: Redis commands mapped onto the cluster.
//!
//! One handler per command, found by name in [`COMMANDS`] with Redis' arity rules, so an
//! unknown command or a wrong argument count gets exactly the error text Redis gives. Data
//! commands go through the [`Router`](crate::cluster::Router) like the other protocols; the
//! connection-level ones (PING, SELECT, CLIENT, HELLO, COMMAND, CONFIG, INFO) are answered
//! here, with just enough for redis-cli, redis-benchmark and client libraries to start.

use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::future::{join_all, ready};
use twincache_protocol::frame::{flags, Op, Request, Response};
use twincache_protocol::resp::{Reply, RespDecoder};
use twincache_protocol::Status;

use crate::auth::{Access, Denied, Who};
use crate::cluster::Mode;
use crate::metrics::{Closed, Cmd, ErrorCode, Proto};
use crate::session::{Ctx, Protocol, Step};

type Handler = fn(&mut RespProtocol, Vec<Bytes>, &Ctx) -> Step<Reply>;

/// One Redis command the orchestrator knows.
struct Spec {
    name: &'static str,
    /// Redis' rule: `n` exactly n arguments counting the name, `-n` at least n.
    arity: i32,
    /// What a user needs to run it (see `auth`).
    access: Access,
    handler: Handler,
}

const fn spec(name: &'static str, arity: i32, access: Access, handler: Handler) -> Spec {
    Spec {
        name,
        arity,
        access,
        handler,
    }
}

const COMMANDS: &[Spec] = &[
    spec("get", 2, Access::Read, get),
    spec("set", -3, Access::Write, set),
    spec("del", -2, Access::Write, del),
    spec("unlink", -2, Access::Write, del),
    spec("exists", -2, Access::Read, exists),
    spec("mget", -2, Access::Read, mget),
    spec("mset", -3, Access::Write, mset),
    spec("ping", -1, Access::Connection, ping),
    spec("echo", 2, Access::Connection, echo),
    spec("quit", -1, Access::Anyone, quit),
    spec("select", 2, Access::Connection, select),
    spec("dbsize", 1, Access::Read, dbsize),
    spec("info", -1, Access::Read, info),
    spec("command", -1, Access::Connection, command),
    spec("client", -2, Access::Connection, client),
    spec("hello", -1, Access::Anyone, hello),
    spec("config", -2, Access::Admin, config),
    spec("auth", -2, Access::Anyone, auth),
];

fn find(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|c| name.eq_ignore_ascii_case(c.name.as_bytes()))
}

/// Whether a connection's first line (not starting with `*`) is an inline Redis command
/// rather than a text-protocol request: it has no `||`, it is not the text protocol's own
/// `ping` or `exit`, and it starts with a Redis command name followed by an argument (or is
/// one of the argument-less commands INFO, QUIT, DBSIZE, COMMAND, HELLO).
pub fn is_inline_command(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.windows(2).any(|w| w == b"||") {
        return false;
    }
    let mut words = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let Some(first) = words.next() else {
        return false;
    };
    if find(first).is_none() || first.eq_ignore_ascii_case(b"ping") {
        return false;
    }
    let bare_ok = ["info", "quit", "dbsize", "command", "hello"]
        .iter()
        .any(|c| first.eq_ignore_ascii_case(c.as_bytes()));
    words.next().is_some() || bare_ok
}

pub struct RespProtocol {
    decoder: RespDecoder,
    client_name: Option<Bytes>,
    /// The last command read, for the metrics.
    cmd: Cmd,
}

impl RespProtocol {
    /// A session refusing bulk strings over `max_bulk` bytes and commands over
    /// `max_command` bytes in all.
    pub fn new(max_bulk: usize, max_command: usize) -> RespProtocol {
        RespProtocol {
            decoder: RespDecoder::new(max_bulk, max_command),
            client_name: None,
            cmd: Cmd::Other,
        }
    }
}

impl Protocol for RespProtocol {
    type Out = Reply;
    const PROTO: Proto = Proto::Resp;

    fn command(&self) -> Cmd {
        self.cmd
    }

    fn error_of(out: &Reply) -> Option<ErrorCode> {
        match out {
            Reply::Error(msg) => Some(ErrorCode::of_resp(msg)),
            _ => None,
        }
    }

    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Reply> {
        let args = match self.decoder.decode(buf) {
            Ok(None) => return Step::NeedMore,
            Ok(Some(args)) => args,
            Err(e) => {
                self.cmd = Cmd::Other;
                ctx.metrics.closed(Closed::ProtocolError);
                return Step::Close(Some(e.reply()));
            }
        };
        self.cmd = Cmd::from_name(&args[0]);
        let spec = find(&args[0]);
        let access = match spec {
            Some(spec) if !(ctx.router.is_adapter() && passes_through(&args)) => spec.access,
            _ => passthrough_access(&args[0]),
        };
        if !ctx.who.may(access) {
            return Step::Reply(refusal(&ctx.who, &args[0]));
        }
        match ctx.router.mode() {
            Some(Mode::Adapter) if passes_through(&args) => return passthrough(args, ctx),
            // Whether a command runs here or on the destination Redis depends on the mode.
            None if !answered_here(&args[0]) => {
                return Step::Reply(Reply::err("TRYAGAIN the cluster is starting; retry"))
            }
            _ => {}
        }
        let Some(spec) = spec else {
            return Step::Reply(unknown_command(&args));
        };
        let n = args.len() as i32;
        if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
            return Step::Reply(Reply::err(format!(
                "ERR wrong number of arguments for '{}' command",
                spec.name
            )));
        }
        (spec.handler)(self, args, ctx)
    }

    fn encode(&mut self, reply: Reply, out: &mut BytesMut) {
        reply.encode(out);
    }

    fn at_eof(&mut self, _buf: &BytesMut) -> Option<Reply> {
        None
    }
}

/// Commands the orchestrator answers itself in adapter mode; everything else goes to the
/// destination Redis as is (the seed's "any other request").
const ADAPTER_NATIVE: &[&str] = &[
    "get", "set", "mget", "mset", "ping", "echo", "quit", "select", "info", "command", "client",
    "hello",
];

/// What a command passed through to the destination Redis (adapter mode) needs: reads for
/// the read-only commands below, admin for those acting on the whole server, else writes.
fn passthrough_access(name: &[u8]) -> Access {
    const READS: &[&str] = &[
        "strlen",
        "getrange",
        "substr",
        "ttl",
        "pttl",
        "expiretime",
        "pexpiretime",
        "type",
        "exists",
        "hget",
        "hmget",
        "hgetall",
        "hkeys",
        "hvals",
        "hlen",
        "hexists",
        "hstrlen",
        "hrandfield",
        "hscan",
        "lrange",
        "llen",
        "lindex",
        "lpos",
        "smembers",
        "sismember",
        "smismember",
        "scard",
        "srandmember",
        "sscan",
        "sinter",
        "sunion",
        "sdiff",
        "sintercard",
        "zrange",
        "zrangebyscore",
        "zrevrange",
        "zrevrangebyscore",
        "zrangebylex",
        "zrevrangebylex",
        "zscore",
        "zmscore",
        "zcard",
        "zcount",
        "zlexcount",
        "zrank",
        "zrevrank",
        "zscan",
        "zrandmember",
        "xrange",
        "xrevrange",
        "xlen",
        "xinfo",
        "xread",
        "xpending",
        "pfcount",
        "getbit",
        "bitcount",
        "bitpos",
        "bitfield_ro",
        "geopos",
        "geodist",
        "geohash",
        "geosearch",
        "georadius_ro",
        "georadiusbymember_ro",
        "dump",
        "object",
        "memory",
        "scan",
        "keys",
        "randomkey",
        "dbsize",
        "lcs",
        "touch",
    ];
    const ADMIN: &[&str] = &[
        "flushall",
        "flushdb",
        "config",
        "script",
        "function",
        "acl",
        "save",
        "bgsave",
        "bgrewriteaof",
        "lastsave",
        "slowlog",
        "latency",
        "module",
        "cluster",
        "migrate",
    ];
    let is = |list: &[&str]| list.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()));
    if is(READS) {
        Access::Read
    } else if is(ADMIN) {
        Access::Admin
    } else {
        Access::Write
    }
}

/// Redis' answer to a command this session may not run.
fn refusal(who: &Who, name: &[u8]) -> Reply {
    if who.authenticated() {
        Reply::err(format!(
            "NOPERM User {} has no permissions to run the '{}' command",
            who.user(),
            String::from_utf8_lossy(&name[..name.len().min(64)]).to_ascii_lowercase()
        ))
    } else {
        Reply::err("NOAUTH Authentication required.")
    }
}

/// Connection commands, answered by the orchestrator in either mode (so clients can connect
/// and handshake while the cluster is starting).
fn answered_here(name: &[u8]) -> bool {
    [
        "ping", "echo", "quit", "select", "info", "command", "client", "hello", "auth", "config",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// Whether, in adapter mode, this command goes to the destination. A SET with options other
/// than EX/PX (NX, XX, GET, KEEPTTL, EXAT, PXAT) does too: the destination decides them.
fn passes_through(args: &[Bytes]) -> bool {
    if !ADAPTER_NATIVE
        .iter()
        .any(|n| args[0].eq_ignore_ascii_case(n.as_bytes()))
    {
        return true;
    }
    args[0].eq_ignore_ascii_case(b"set")
        && args.len() > 3
        && !(args.len() == 5
            && (args[3].eq_ignore_ascii_case(b"ex") || args[3].eq_ignore_ascii_case(b"px")))
}

/// Commands that hold the Redis connection they run on (transactions, blocking pops,
/// subscriptions, replication) or act on the whole server. Adapter mode multiplexes every
/// client onto one destination connection per worker, where these would interleave clients,
/// stall everyone behind one, or break the connection, so they are refused with a clear
/// error instead.
const NOT_PASSED_THROUGH: &[&str] = &[
    "multi",
    "exec",
    "discard",
    "watch",
    "unwatch",
    "blpop",
    "brpop",
    "brpoplpush",
    "blmove",
    "blmpop",
    "bzpopmin",
    "bzpopmax",
    "bzmpop",
    "wait",
    "waitaof",
    "subscribe",
    "psubscribe",
    "ssubscribe",
    "unsubscribe",
    "punsubscribe",
    "sunsubscribe",
    "monitor",
    "sync",
    "psync",
    "replconf",
    "replicaof",
    "slaveof",
    "failover",
    "shutdown",
    "debug",
    "reset",
    "swapdb",
];

/// Why a command may not pass through to the destination, if it may not.
fn refused_passthrough(args: &[Bytes]) -> Option<Reply> {
    let name = &args[0];
    let blocking_stream_read = (name.eq_ignore_ascii_case(b"xread")
        || name.eq_ignore_ascii_case(b"xreadgroup"))
        && args[1..].iter().any(|a| a.eq_ignore_ascii_case(b"block"));
    let refused = blocking_stream_read
        || NOT_PASSED_THROUGH
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()));
    refused.then(|| {
        Reply::err(format!(
            "ERR '{}' is not supported through twincache's adapter mode: it needs a Redis \
             connection of its own; send it to the destination Redis directly",
            String::from_utf8_lossy(&name[..name.len().min(64)]).to_ascii_uppercase()
        ))
    })
}

fn passthrough(args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    if let Some(refusal) = refused_passthrough(&args) {
        return Step::Reply(refusal);
    }
    let fut = ctx.router.passthrough(args, &ctx.origin);
    dispatch(async move {
        let resp = fut.await;
        match resp.status {
            Status::Ok => Reply::Raw(resp.payload),
            _ => error_reply(&resp),
        }
    })
}

/// Redis' text: the name and the first arguments, each cut so the list stays near 128 bytes.
fn unknown_command(args: &[Bytes]) -> Reply {
    let name = String::from_utf8_lossy(&args[0][..args[0].len().min(128)]).into_owned();
    let mut list = String::new();
    for a in &args[1..] {
        if list.len() >= 128 {
            break;
        }
        let room = 128 - list.len();
        list += &format!("'{}' ", String::from_utf8_lossy(&a[..a.len().min(room)]));
    }
    Reply::err(format!(
        "ERR unknown command '{name}', with args beginning with: {list}"
    ))
}

fn dispatch(fut: impl Future<Output = Reply> + Send + 'static) -> Step<Reply> {
    Step::Dispatch(Box::pin(fut), 1)
}

/// [`dispatch`] for a command that made `n` worker requests.
fn dispatch_n(fut: impl Future<Output = Reply> + Send + 'static, n: usize) -> Step<Reply> {
    Step::Dispatch(Box::pin(fut), n)
}

/// The error reply for a worker answer that is not a result.
fn error_reply(resp: &Response) -> Reply {
    let msg = String::from_utf8_lossy(&resp.payload);
    match resp.status {
        // Redis clients know TRYAGAIN as retryable.
        Status::Unavailable => Reply::err(format!("TRYAGAIN {msg}")),
        _ => Reply::err(format!("ERR {msg}")),
    }
}

fn value_reply(resp: Response) -> Reply {
    match resp.status {
        Status::Ok => Reply::Bulk(resp.payload),
        Status::NotFound => Reply::Nil,
        _ => error_reply(&resp),
    }
}

fn not_integer() -> Reply {
    Reply::err("ERR value is not an integer or out of range")
}

fn syntax_error() -> Reply {
    Reply::err("ERR syntax error")
}

fn parse_int(arg: &[u8]) -> Option<i64> {
    std::str::from_utf8(arg).ok()?.parse().ok()
}

fn get(_: &mut RespProtocol, mut args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let fut = ctx.router.get(args.swap_remove(1), &ctx.origin);
    dispatch(async move { value_reply(fut.await) })
}

/// `SET key value [NX | XX] [GET] [EX s | PX ms | EXAT unix-s | PXAT unix-ms | KEEPTTL]`
fn set(_: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let mut parts = args.into_iter();
    let (key, value) = (parts.nth(1), parts.next());
    let args: Vec<Bytes> = parts.collect(); // the options
    let mut req = Request::new(Op::Set, key.expect("arity checked"));
    req.value = value.expect("arity checked");
    let mut expiry_given = false;
    let mut i = 0;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"NX" if req.flags & flags::XX == 0 => req.flags |= flags::NX,
            b"XX" if req.flags & flags::NX == 0 => req.flags |= flags::XX,
            b"GET" => req.flags |= flags::GET,
            b"KEEPTTL" if !expiry_given => {
                req.flags |= flags::KEEP_TTL;
                expiry_given = true;
            }
            b"EX" | b"PX" | b"EXAT" | b"PXAT" if !expiry_given && i + 1 < args.len() => {
                i += 1;
                let Some(n) = parse_int(&args[i]) else {
                    return Step::Reply(not_integer());
                };
                match expiry_ms(&opt, n) {
                    Some(ttl_ms) => req.ttl_ms = ttl_ms,
                    None => {
                        return Step::Reply(Reply::err("ERR invalid expire time in 'set' command"))
                    }
                }
                expiry_given = true;
            }
            _ => return Step::Reply(syntax_error()),
        }
        i += 1;
    }
    let want_old = req.flags & flags::GET != 0;
    let fut = ctx.router.write(req, &ctx.origin);
    dispatch(async move {
        let resp = fut.await;
        match resp.status {
            Status::Ok | Status::NotApplied if want_old => match resp.payload.first() {
                Some(1) => Reply::Bulk(resp.payload.slice(1..)),
                _ => Reply::Nil,
            },
            Status::Ok => Reply::OK,
            Status::NotApplied => Reply::Nil,
            _ => error_reply(&resp),
        }
    })
}

/// The time to live in milliseconds that `EX`/`PX`/`EXAT`/`PXAT` `n` asks for, checked as
/// Redis checks it (positive, and no overflow once made absolute); `None` if invalid. An
/// absolute time already past gives 1 ms: the key expires at once.
fn expiry_ms(option: &[u8], n: i64) -> Option<u64> {
    if n <= 0 {
        return None;
    }
    let ms = if option.starts_with(b"EX") {
        n.checked_mul(1000)?
    } else {
        n
    };
    let now = unix_ms();
    let ttl = if option.ends_with(b"AT") {
        ms.saturating_sub(now).max(1)
    } else {
        ms.checked_add(now)?;
        ms
    };
    u64::try_from(ttl).ok()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs one request per key (each routed to its own pair, all in flight at once) and counts
/// the keys answered `Ok`, as DEL and EXISTS reply.
fn count_ok(futs: Vec<impl Future<Output = Response> + Send + 'static>) -> Step<Reply> {
    let n = futs.len();
    dispatch_n(
        async move {
            let mut n = 0;
            for resp in join_all(futs).await {
                match resp.status {
                    Status::Ok => n += 1,
                    Status::NotFound => {}
                    _ => return error_reply(&resp),
                }
            }
            Reply::Int(n)
        },
        n,
    )
}

fn del(_: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let futs = args
        .into_iter()
        .skip(1)
        .map(|k| ctx.router.write(Request::new(Op::Del, k), &ctx.origin))
        .collect();
    count_ok(futs)
}

fn exists(_: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let futs = args
        .into_iter()
        .skip(1)
        .map(|k| ctx.router.read(Request::new(Op::Exists, k), &ctx.origin))
        .collect();
    count_ok(futs)
}

/// Values of an MGET in flight at once when it streams its reply.
const MGET_WINDOW: usize = 16;

/// An MGET of up to [`MGET_WINDOW`] keys gathers its values and answers at once. A larger
/// one streams: the array header first, then each value in order as it arrives, with at most
/// [`MGET_WINDOW`] values in flight, so its memory does not grow with the number of keys. A
/// key whose pair cannot be reached is then an error element in the array (the header is
/// already sent), which Redis clients report as an error for that key.
fn mget(_: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let keys = args.into_iter().skip(1);
    if keys.len() > MGET_WINDOW {
        use futures_util::stream::{self, StreamExt};
        let header = Reply::Raw(Bytes::from(format!("*{}\r\n", keys.len())));
        let (router, origin) = (ctx.router.clone(), ctx.origin.clone());
        let values = stream::iter(keys)
            .map(move |k| router.get(k, &origin))
            .buffered(MGET_WINDOW)
            .map(|resp| match resp.status {
                Status::Ok | Status::NotFound => value_reply(resp),
                _ => error_reply(&resp),
            });
        return Step::Stream(Box::pin(stream::once(ready(header)).chain(values)));
    }
    let futs: Vec<_> = keys.map(|k| ctx.router.get(k, &ctx.origin)).collect();
    let n = futs.len();
    dispatch_n(
        async move {
            let mut values = Vec::with_capacity(futs.len());
            for resp in join_all(futs).await {
                match resp.status {
                    Status::Ok | Status::NotFound => values.push(value_reply(resp)),
                    _ => return error_reply(&resp),
                }
            }
            Reply::Array(values)
        },
        n,
    )
}

fn mset(_: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    if args.len().is_multiple_of(2) {
        return Step::Reply(Reply::err(
            "ERR wrong number of arguments for 'mset' command",
        ));
    }
    let futs: Vec<_> = args[1..]
        .chunks(2)
        .map(|kv| {
            let mut req = Request::new(Op::Set, kv[0].clone());
            req.value = kv[1].clone();
            ctx.router.write(req, &ctx.origin)
        })
        .collect();
    let n = futs.len();
    dispatch_n(
        async move {
            for resp in join_all(futs).await {
                if resp.status != Status::Ok {
                    return error_reply(&resp);
                }
            }
            Reply::OK
        },
        n,
    )
}

fn ping(_: &mut RespProtocol, mut args: Vec<Bytes>, _: &Ctx) -> Step<Reply> {
    Step::Reply(match args.len() {
        1 => Reply::Simple("PONG"),
        2 => Reply::Bulk(args.swap_remove(1)),
        _ => Reply::err("ERR wrong number of arguments for 'ping' command"),
    })
}

fn echo(_: &mut RespProtocol, mut args: Vec<Bytes>, _: &Ctx) -> Step<Reply> {
    Step::Reply(Reply::Bulk(args.swap_remove(1)))
}

fn quit(_: &mut RespProtocol, _: Vec<Bytes>, _: &Ctx) -> Step<Reply> {
    Step::Close(Some(Reply::OK))
}

fn select(_: &mut RespProtocol, args: Vec<Bytes>, _: &Ctx) -> Step<Reply> {
    Step::Reply(match parse_int(&args[1]) {
        Some(0) => Reply::OK,
        Some(_) => Reply::err("ERR DB index is out of range"),
        None => not_integer(),
    })
}

/// `AUTH [user] password`, answered once checked; nothing after it is read until then.
fn auth(_: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let (user, password) = match &args[1..] {
        [password] => (None, password.clone()),
        [user, password] => (Some(user.clone()), password.clone()),
        _ => return Step::Reply(syntax_error()),
    };
    let (auth, who) = (ctx.auth.clone(), ctx.who.clone());
    Step::Settle(Box::pin(async move {
        let user = user.as_deref().map(String::from_utf8_lossy);
        match auth.authenticate(&who, user.as_deref(), &password).await {
            Ok(()) => Reply::OK,
            Err(denied) => denied_reply(denied),
        }
    }))
}

/// Redis' replies to a failed AUTH.
fn denied_reply(denied: Denied) -> Reply {
    match denied {
        Denied::NoPasswordSet => Reply::err(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        ),
        Denied::WrongPass | Denied::TooManyFailures => {
            Reply::err("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }
}

/// Total keys over all pairs, from each pair's `keys:` counter; `None` if a pair is down.
async fn total_keys(ctx: &Ctx) -> Option<u64> {
    let mut total = 0;
    for stats in ctx.router.pair_stats().await {
        let stats = stats?;
        total += twincache_protocol::info::get(&stats, "keys")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

fn dbsize(_: &mut RespProtocol, _: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let ctx = ctx.clone();
    dispatch(async move {
        match total_keys(&ctx).await {
            Some(n) => Reply::Int(n as i64),
            None => Reply::err("TRYAGAIN a pair has no reachable worker"),
        }
    })
}

fn info(_: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let wanted: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let show = move |section: &str| {
        wanted.is_empty()
            || wanted
                .iter()
                .any(|w| w == section || w == "all" || w == "default" || w == "everything")
    };
    let ctx = ctx.clone();
    dispatch(async move {
        let m = &ctx.metrics;
        let mut text = String::new();
        if show("server") {
            text += &format!(
                "# Server\r\nredis_version:7.0.0\r\ntwincache_version:{}\r\nredis_mode:standalone\r\n\
                 arch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                ctx.config.port,
                m.started.elapsed().as_secs(),
            );
        }
        if show("clients") {
            text += &format!(
                "# Clients\r\nconnected_clients:{}\r\n\r\n",
                m.connected_clients()
            );
        }
        if show("stats") {
            text += &format!(
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\r\n",
                m.total_connections(),
                m.total_commands()
            );
        }
        if show("cluster") {
            text += &format!("# Cluster\r\n{}\r\n", ctx.router.describe());
        }
        if show("keyspace") {
            text += "# Keyspace\r\n";
            if let Some(keys) = total_keys(&ctx).await.filter(|&k| k > 0) {
                text += &format!("db0:keys={keys},expires=0,avg_ttl=0\r\n");
            }
        }
        Reply::Bulk(Bytes::from(text))
    })
}

fn command(_: &mut RespProtocol, args: Vec<Bytes>, _: &Ctx) -> Step<Reply> {
    let sub = args.get(1).map(|a| a.to_ascii_lowercase());
    Step::Reply(match sub.as_deref() {
        Some(b"count") => Reply::Int(COMMANDS.len() as i64),
        // No command table or docs: clients fall back to their defaults.
        _ => Reply::Array(Vec::new()),
    })
}

fn client(state: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    let sub = args[1].to_ascii_lowercase();
    Step::Reply(match sub.as_slice() {
        b"setname" if args.len() == 3 => {
            state.client_name = Some(args[2].clone());
            Reply::OK
        }
        b"getname" => state.client_name.clone().map_or(Reply::Nil, Reply::Bulk),
        b"id" => Reply::Int(ctx.id as i64),
        b"setinfo" => Reply::OK,
        b"info" => Reply::Bulk(Bytes::from(format!("id={} db=0\n", ctx.id))),
        _ => Reply::err(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(&args[1])
        )),
    })
}

/// Answers HELLO (and HELLO 2) like Redis in RESP2; HELLO 3 is refused so clients stay on
/// RESP2, which is all this server speaks.
/// `HELLO [protover [AUTH user password] [SETNAME name]]`, as Redis answers it in RESP2;
/// HELLO 3 is refused so clients stay on RESP2, which is all this server speaks.
fn hello(state: &mut RespProtocol, args: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    if let Some(v) = args.get(1) {
        match parse_int(v) {
            Some(2) => {}
            Some(_) => return Step::Reply(Reply::err("NOPROTO unsupported protocol version")),
            None => {
                return Step::Reply(Reply::err(
                    "ERR Protocol version is not an integer or out of range",
                ))
            }
        }
    }
    let (mut credentials, mut name) = (None, None);
    let mut rest = args.get(2..).unwrap_or_default();
    while let Some(opt) = rest.first() {
        match rest {
            [o, user, password, more @ ..] if o.eq_ignore_ascii_case(b"auth") => {
                credentials = Some((user.clone(), password.clone()));
                rest = more;
            }
            [o, n, more @ ..] if o.eq_ignore_ascii_case(b"setname") => {
                name = Some(n.clone());
                rest = more;
            }
            _ => {
                return Step::Reply(Reply::err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&opt[..opt.len().min(64)])
                )))
            }
        }
    }
    let id = ctx.id;
    let Some((user, password)) = credentials else {
        if !ctx.who.authenticated() {
            return Step::Reply(Reply::err(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise \
                 the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the \
                 client and select the RESP protocol version at the same time",
            ));
        }
        if name.is_some() {
            state.client_name = name;
        }
        return Step::Reply(hello_reply(id));
    };
    if name.is_some() {
        state.client_name = name;
    }
    let (auth, who) = (ctx.auth.clone(), ctx.who.clone());
    Step::Settle(Box::pin(async move {
        let user = String::from_utf8_lossy(&user);
        match auth.authenticate(&who, Some(&user), &password).await {
            Ok(()) => hello_reply(id),
            Err(denied) => denied_reply(denied),
        }
    }))
}

fn hello_reply(id: usize) -> Reply {
    let s = |t: &'static str| Reply::Bulk(Bytes::from_static(t.as_bytes()));
    Reply::Array(vec![
        s("server"),
        s("redis"),
        s("version"),
        s("7.0.0"),
        s("proto"),
        Reply::Int(2),
        s("id"),
        Reply::Int(id as i64),
        s("mode"),
        s("standalone"),
        s("role"),
        s("master"),
        s("modules"),
        Reply::Array(Vec::new()),
    ])
}

fn config(_: &mut RespProtocol, args: Vec<Bytes>, _: &Ctx) -> Step<Reply> {
    Step::Reply(if args[1].eq_ignore_ascii_case(b"get") {
        // No Redis settings to report; redis-benchmark and friends accept an empty answer.
        Reply::Array(Vec::new())
    } else {
        Reply::err("ERR CONFIG subcommands other than GET are not supported by twincache")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_sniffing() {
        assert!(is_inline_command(b"GET a"));
        assert!(is_inline_command(b"set k v\r"));
        assert!(is_inline_command(b"INFO"));
        assert!(!is_inline_command(b"get||a"));
        assert!(!is_inline_command(b"ping"));
        assert!(!is_inline_command(b"PING"));
        assert!(!is_inline_command(b"exit"));
        assert!(!is_inline_command(b"get"));
        assert!(!is_inline_command(b"foo bar"));
        assert!(!is_inline_command(b""));
    }

    #[test]
    fn expiry_arithmetic_never_overflows() {
        for opt in [&b"EX"[..], b"PX", b"EXAT", b"PXAT"] {
            for n in [i64::MIN, -1, 0] {
                assert_eq!(expiry_ms(opt, n), None);
            }
            // Huge values are refused or clamped, never a panic.
            let _ = expiry_ms(opt, i64::MAX);
        }
        assert_eq!(expiry_ms(b"EX", 2), Some(2000));
        assert_eq!(expiry_ms(b"PX", 5), Some(5));
        assert_eq!(expiry_ms(b"EX", i64::MAX / 10), None);
        assert_eq!(
            expiry_ms(b"PXAT", 1),
            Some(1),
            "in the past: expires at once"
        );
        let soon = unix_ms() + 10_000;
        assert!(expiry_ms(b"PXAT", soon).is_some_and(|t| (9_000..=10_000).contains(&t)));
    }

    #[test]
    fn unknown_command_text_matches_redis() {
        let args =
            |l: &[&'static [u8]]| l.iter().map(|a| Bytes::from_static(a)).collect::<Vec<_>>();
        assert_eq!(
            unknown_command(&args(&[b"foo", b"a", b"b"])),
            Reply::err("ERR unknown command 'foo', with args beginning with: 'a' 'b' ")
        );
        assert_eq!(
            unknown_command(&args(&[b"foo"])),
            Reply::err("ERR unknown command 'foo', with args beginning with: ")
        );
    }
}
