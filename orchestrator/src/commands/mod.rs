//! The Redis commands: one table, parsing apart from execution.
//!
//! Each command is one [`Spec`] in its family's table (name, arity, what a user needs to run
//! it, key positions as COMMAND reports them, what adapter mode does with it, a one-line
//! summary) and one parse function from its arguments to a typed [`Cmd`], with Redis' exact
//! errors. Parsing needs no cluster, so every option and error is unit-tested on its own;
//! [`execute`] then runs a `Cmd` through the [`Router`](crate::cluster::Router). COMMAND,
//! COMMAND INFO and DOCS answer from the table; adapter mode takes from it which commands it
//! answers itself, which it refuses, and which keys a command passed to the destination
//! touches.
//!
//! Layout: [`connection`] (PING, HELLO, AUTH, CLIENT ...), [`strings`], [`hashes`],
//! [`keys`] (commands on any key: DEL, EXPIRE, TTL, TYPE, RENAME, COPY, OBJECT ...),
//! [`keyspace`] (the whole cluster: SCAN, KEYS, DBSIZE, RANDOMKEY, FLUSHALL), [`server`]
//! (INFO, CONFIG, COMMAND, TIME, WAIT), [`transaction`] (MULTI, EXEC, WATCH), [`adapter`]
//! (the commands only adapter mode passes on, and how).
//!
//! Most data commands become a [`Action`] the pair's worker runs (see the worker's `exec`
//! module); GET, plain SET, DEL, EXISTS, MGET and MSET keep their direct, faster paths.

pub mod adapter;
pub mod batch;
pub mod connection;
pub mod hashes;
pub mod keys;
pub mod keyspace;
pub mod server;
pub mod strings;
pub mod transaction;

use std::future::Future;
use std::sync::LazyLock;

use bytes::Bytes;
use futures_util::future::{join_all, ready};
use futures_util::FutureExt;
use twincache_protocol::frame::{Op, Request, Response};
use twincache_protocol::program::{encode_program, Action, Answer};
use twincache_protocol::resp::{
    decode_replies, decode_replies_raw_bulk, string2ll, Reply, Version,
};
use twincache_protocol::slots::SlotMap;
use twincache_protocol::Status;

use crate::auth::Access;
use crate::session::{Ctx, Step};

/// Where a command's keys are, as Redis' COMMAND gives them: the first key's argument
/// position, the last one's (negative: from the end, -1 the last argument), and the step
/// between keys. All zero for a command without keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    pub first: i32,
    pub last: i32,
    pub step: i32,
}

pub const NO_KEYS: KeySpec = KeySpec {
    first: 0,
    last: 0,
    step: 0,
};

pub const fn keys(first: i32, last: i32, step: i32) -> KeySpec {
    KeySpec { first, last, step }
}

/// The key of a one-key command.
pub const ONE_KEY: KeySpec = keys(1, 1, 1);

impl KeySpec {
    /// The key arguments of `args` (the name at 0).
    pub fn of<'a>(&self, args: &'a [Bytes]) -> impl Iterator<Item = &'a Bytes> + 'a {
        let n = args.len() as i32;
        let last = if self.last < 0 {
            n + self.last
        } else {
            self.last
        };
        let (first, step) = (self.first, self.step.max(1));
        (first..=last.min(n - 1))
            .step_by(step as usize)
            .filter(move |_| first > 0)
            .filter_map(move |i| args.get(i as usize))
    }
}

/// What adapter mode does with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    /// Answered by the orchestrator in either mode (connection and server commands).
    Here,
    /// Served through the workers' cache (GET, SET, MGET, MSET).
    Cache,
    /// Run on the destination Redis as is; the keys it touches are invalidated.
    Destination,
    /// Refused: it needs a Redis connection of its own (see [`adapter`]).
    Refused,
}

/// The command family, for COMMAND DOCS and the ACL categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Connection,
    Generic,
    Hash,
    Server,
    String,
    Transactions,
    /// Known only to pass on in adapter mode.
    Other,
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Connection => "connection",
            Group::Generic => "generic",
            Group::Hash => "hash",
            Group::Server => "server",
            Group::String => "string",
            Group::Transactions => "transactions",
            Group::Other => "other",
        }
    }
}

/// Parses a command's arguments (its name first, arity already checked).
pub type Parse = fn(&[Bytes]) -> Result<Cmd, Reply>;

/// One command the orchestrator knows.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    /// Redis' rule: `n` exactly n arguments counting the name, `-n` at least n.
    pub arity: i32,
    /// What a user needs to run it (see `auth`).
    pub access: Access,
    pub keys: KeySpec,
    pub group: Group,
    /// Constant time (Redis' `fast` flag).
    pub fast: bool,
    pub adapter: Adapter,
    pub since: &'static str,
    pub summary: &'static str,
    /// `None` for a command only passed on in adapter mode.
    pub parse: Option<Parse>,
}

/// What a family's commands share, to build their table entries: `Family::new(group,
/// adapter)`, adjusted per command (`keys`, `fast`, `since`, `adapter`), then `cmd(...)`.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    group: Group,
    adapter: Adapter,
    keys: KeySpec,
    fast: bool,
    since: &'static str,
}

impl Family {
    pub const fn new(group: Group, adapter: Adapter) -> Family {
        Family {
            group,
            adapter,
            keys: NO_KEYS,
            fast: false,
            since: "1.0.0",
        }
    }

    pub const fn keys(mut self, keys: KeySpec) -> Family {
        self.keys = keys;
        self
    }

    /// Constant time (Redis' `fast` flag).
    pub const fn fast(mut self) -> Family {
        self.fast = true;
        self
    }

    /// The Redis version that introduced the command.
    pub const fn since(mut self, since: &'static str) -> Family {
        self.since = since;
        self
    }

    pub const fn adapter(mut self, adapter: Adapter) -> Family {
        self.adapter = adapter;
        self
    }

    /// A command run here.
    pub const fn cmd(
        self,
        name: &'static str,
        arity: i32,
        access: Access,
        summary: &'static str,
        parse: Parse,
    ) -> Spec {
        Spec {
            name,
            arity,
            access,
            keys: self.keys,
            group: self.group,
            fast: self.fast,
            adapter: self.adapter,
            since: self.since,
            summary,
            parse: Some(parse),
        }
    }
}

impl Spec {
    /// Whether `n` arguments (name included) satisfy the arity.
    pub fn arity_ok(&self, n: usize) -> bool {
        let n = n as i32;
        (self.arity > 0 && n == self.arity) || (self.arity < 0 && n >= -self.arity)
    }

    /// Runs here (not only passed on in adapter mode).
    pub fn native(&self) -> bool {
        self.parse.is_some()
    }

    /// Redis' command flags, from what the table knows.
    pub fn flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        match self.access {
            Access::Read => flags.push("readonly"),
            Access::Write => {
                flags.push("write");
                if matches!(self.group, Group::String | Group::Hash) {
                    flags.push("denyoom");
                }
            }
            Access::Admin => flags.extend(["admin", "noscript"]),
            Access::Anyone => flags.extend(["noauth", "loading", "stale"]),
            Access::Connection => flags.extend(["loading", "stale"]),
        }
        if self.fast {
            flags.push("fast");
        }
        flags
    }

    /// ACL categories, from what the table knows.
    pub fn categories(&self) -> Vec<String> {
        let mut cats = Vec::new();
        match self.access {
            Access::Read => cats.push("@read".to_string()),
            Access::Write => cats.push("@write".to_string()),
            Access::Admin => cats.extend(["@admin".to_string(), "@dangerous".to_string()]),
            Access::Anyone | Access::Connection => {}
        }
        let group = match self.group {
            Group::Generic => "@keyspace",
            Group::Hash => "@hash",
            Group::String => "@string",
            Group::Connection => "@connection",
            Group::Transactions => "@transaction",
            Group::Server | Group::Other => "",
        };
        if !group.is_empty() {
            cats.push(group.to_string());
        }
        cats.push(if self.fast { "@fast" } else { "@slow" }.to_string());
        cats
    }
}

/// Every family's table. Statics, not consts: a const slice may be copied wherever it is
/// used, so an optimized build gave one command two addresses (`lookup`'s GET and SET
/// against the table's, which the table test compares).
fn families() -> [&'static [Spec]; 8] {
    [
        connection::SPECS,
        strings::SPECS,
        hashes::SPECS,
        keys::SPECS,
        keyspace::SPECS,
        server::SPECS,
        transaction::SPECS,
        adapter::SPECS,
    ]
}

/// The table, by lowercase name: a hash lookup per command, whatever the table's size.
static TABLE: LazyLock<hashbrown::HashMap<&'static [u8], &'static Spec>> = LazyLock::new(|| {
    families()
        .into_iter()
        .flatten()
        .map(|s| (s.name.as_bytes(), s))
        .collect()
});

/// GET's and SET's entries (see [`lookup`]).
static HOT: LazyLock<(&'static Spec, &'static Spec)> =
    LazyLock::new(|| (TABLE[&b"get"[..]], TABLE[&b"set"[..]]));

/// Every command, in table order.
pub fn all() -> impl Iterator<Item = &'static Spec> {
    families().into_iter().flatten()
}

/// The command named `name` (any case).
pub fn lookup(name: &[u8]) -> Option<&'static Spec> {
    // The two commands most sent, without hashing: a table probe was a tenth of a GET's
    // instructions. (`| 0x20` folds only a letter's case onto "get" or "set".)
    if let [a, b, c] = name {
        match [a | 0x20, b | 0x20, c | 0x20] {
            [b'g', b'e', b't'] => return Some(HOT.0),
            [b's', b'e', b't'] => return Some(HOT.1),
            _ => {}
        }
    }
    let mut lower = [0u8; 32];
    let name = lower.get_mut(..name.len()).map(|l| {
        l.copy_from_slice(name);
        l.make_ascii_lowercase();
        &*l
    })?;
    TABLE.get(name).copied()
}

/// A parsed command, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmd {
    /// A reply known at parse time (PING, ECHO, OBJECT HELP ...).
    Answer(Reply),
    Quit,
    Select,
    Auth(Option<Bytes>, Bytes),
    Hello(connection::Hello),
    Client(connection::Client),
    Command(server::CommandQuery),
    ConfigGet(Vec<Bytes>),
    Info(Vec<String>),
    Time,
    Wait,
    Cluster(server::ClusterChange),
    Multi,
    Exec,
    Discard,
    Watch(Vec<Bytes>),
    Unwatch,
    Get(Bytes),
    /// A write with no condition (SET, SETEX, PSETEX): both partners at once.
    Write(Request),
    Del(Vec<Bytes>),
    Exists(Vec<Bytes>),
    Touch(Vec<Bytes>),
    MGet(Vec<Bytes>),
    MSet(Vec<(Bytes, Bytes)>),
    MSetNx(Vec<(Bytes, Bytes)>),
    /// One action on one key, run by a worker of its pair.
    Run(Bytes, Action),
    Rename {
        src: Bytes,
        dst: Bytes,
        nx: bool,
    },
    Copy {
        src: Bytes,
        dst: Bytes,
        replace: bool,
    },
    Keys(Bytes),
    Scan(keyspace::Scan),
    RandomKey,
    DbSize,
    Flush {
        asynchronous: bool,
    },
}

/// A connection's state for the commands it runs: the RESP version it speaks, its name, an
/// open transaction, and whether it can hold any of that (a binary client's COMMAND cannot).
#[derive(Debug, Default)]
pub struct Conn {
    pub version: Version,
    pub name: Option<Bytes>,
    pub multi: transaction::Multi,
    /// False for a command run statelessly (the binary protocol's `command` op).
    pub stateful: bool,
}

impl Conn {
    pub fn resp3(&self) -> bool {
        self.version == Version::Resp3
    }
}

pub(crate) fn syntax_error() -> Reply {
    Reply::err("ERR syntax error")
}

pub(crate) fn not_integer() -> Reply {
    Reply::err("ERR value is not an integer or out of range")
}

pub fn wrong_args(name: &str) -> Reply {
    Reply::err(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// An integer argument, with Redis' syntax and error.
pub(crate) fn int(arg: &[u8]) -> Result<i64, Reply> {
    string2ll(arg).ok_or_else(not_integer)
}

/// Redis' text for an unknown command: the name and the first arguments, each cut so the
/// list stays near 128 bytes.
pub fn unknown_command(args: &[Bytes]) -> Reply {
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

/// Parses `args` as the command `spec` (arity included).
pub fn parse(spec: &Spec, args: &[Bytes]) -> Result<Cmd, Reply> {
    if !spec.arity_ok(args.len()) {
        return Err(wrong_args(spec.name));
    }
    match spec.parse {
        Some(parse) => parse(args),
        None => Err(unknown_command(args)),
    }
}

fn dispatch(fut: impl Future<Output = Reply> + Send + 'static) -> Step<Reply> {
    Step::Dispatch(Box::pin(fut), 1)
}

/// A command whose requests go to the workers as it is polled, step after step, rather than
/// as it is read: nothing after it is read until it is answered, so a later command of the
/// session neither overtakes it (a SET pipelined behind FLUSHALL was flushed) nor is seen by
/// it (KEYS listed a key SET after it).
pub(super) fn in_turn(fut: impl Future<Output = Reply> + Send + 'static) -> Step<Reply> {
    Step::Settle(Box::pin(fut))
}

fn dispatch_n(fut: impl Future<Output = Reply> + Send + 'static, n: usize) -> Step<Reply> {
    Step::Dispatch(Box::pin(fut), n.max(1))
}

/// The error reply for a worker answer that is not a result.
pub(crate) fn error_reply(resp: &Response) -> Reply {
    let msg = String::from_utf8_lossy(&resp.payload);
    match resp.status {
        // Redis clients know TRYAGAIN as retryable.
        Status::Unavailable => Reply::err(format!("TRYAGAIN {msg}")),
        Status::WrongType => Reply::err(msg.into_owned()),
        _ => Reply::err(format!("ERR {msg}")),
    }
}

/// A plain write's answer: OK, or why not.
fn written(resp: Response) -> Reply {
    match resp.status {
        Status::Ok => Reply::OK,
        _ => error_reply(&resp),
    }
}

/// A GET's answer: the value, nil, or WRONGTYPE for a hash.
pub(crate) fn value_reply(resp: Response) -> Reply {
    match resp.status {
        Status::Ok => Reply::Bulk(resp.payload),
        Status::NotFound => Reply::Nil,
        _ => error_reply(&resp),
    }
}

/// A program's replies as one reply, passed on as the worker encoded them.
fn raw(answered: Result<Answer, Response>) -> Reply {
    match answered {
        Ok(answer) => Reply::Raw(answer.replies),
        Err(resp) => error_reply(&resp),
    }
}

/// The replies of a program, decoded (for the callers that combine them).
pub(crate) fn replies(answered: Result<Answer, Response>) -> Result<Vec<Reply>, Reply> {
    decoded(answered, decode_replies)
}

/// [`replies`], `expected` of them, with bulk strings kept as their bytes, to be passed on
/// as they are (MGET's values: see `decode_replies_raw_bulk`).
pub(crate) fn raw_replies(
    answered: Result<Answer, Response>,
    expected: usize,
) -> Result<Vec<Reply>, Reply> {
    decoded(answered, |replies| {
        decode_replies_raw_bulk(replies, expected)
    })
}

fn decoded(
    answered: Result<Answer, Response>,
    decode: impl FnOnce(&Bytes) -> Result<Vec<Reply>, twincache_protocol::resp::ReplyError>,
) -> Result<Vec<Reply>, Reply> {
    let answer = answered.map_err(|r| error_reply(&r))?;
    decode(&answer.replies).map_err(|e| Reply::err(format!("ERR {e}")))
}

/// Runs one action on `key` on its pair: writes on the primary (copied to the partner),
/// reads on any worker in sync. The reply comes back encoded for the connection.
pub(crate) fn run_action(
    ctx: &Ctx,
    key: Bytes,
    action: &Action,
    resp3: bool,
) -> impl Future<Output = Result<Answer, Response>> + Send + 'static {
    let program = encode_program(std::slice::from_ref(action));
    let fut: crate::cluster::BoxAnswer = if action.writes() {
        ctx.router.apply(key, program, resp3, &ctx.origin)
    } else {
        Box::pin(ctx.router.query(key, program, resp3, &ctx.origin))
    };
    fut
}

/// Awaits every future of a command on many keys, together. Outside the runtime's
/// cooperative budget: within it, once a poll had taken 128 answers, every other worker
/// reply answered `Pending` and woke its future again, so `join_all` polled all n futures
/// for every 128 that finished (MSET of 100,000 keys took 6.4 s, and one of 500,000 kept
/// a core busy for minutes after its client left, an adversarial test found). Each poll
/// now takes every answer that has come, so the work is linear in the keys.
pub(crate) async fn join_every<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    tokio::task::unconstrained(join_all(futs)).await
}

/// Most keys of one command whose requests are in flight at once (DEL, EXISTS, TOUCH,
/// MSET): each costs the orchestrator a future and a worker request, about 2 KB, where a key
/// costs the client a few bytes. A DEL of a million keys, a 10 MB command, took the
/// orchestrator to 2.2 GB and its pair's workers past their timeouts.
pub(crate) const KEYS_AT_ONCE: usize = 1024;

/// Runs `each` for every key (or group of keys, `weight` of them), [`KEYS_AT_ONCE`] keys at
/// a time, and combines their answers with `fold` (starting from `start`); the first error
/// is the answer, once every key is done. Up to one window the requests go out now, as the
/// command is read; a longer command goes window after window as it is polled, so nothing
/// after it is read until it is done (the session's order holds, as for [`in_turn`]).
pub(super) fn per_key<T, A, F, Fut>(
    keys: Vec<T>,
    weight: fn(&T) -> usize,
    ctx: &Ctx,
    start: A,
    fold: fn(A, A) -> A,
    done: fn(A) -> Reply,
    each: F,
) -> Step<Reply>
where
    T: Send + 'static,
    A: Send + 'static,
    F: Fn(T, &Ctx) -> Fut + Send + 'static,
    Fut: Future<Output = Result<A, Reply>> + Send + 'static,
{
    let n: usize = keys.iter().map(weight).sum();
    let combine = move |mut total: A, mut failed: Option<Reply>, answers: Vec<Result<A, Reply>>| {
        for r in answers {
            match r {
                Ok(v) => total = fold(total, v),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        (total, failed)
    };
    if n <= KEYS_AT_ONCE {
        let futs: Vec<_> = keys.into_iter().map(|k| each(k, ctx)).collect();
        return dispatch_n(
            async move {
                match combine(start, None, join_every(futs).await) {
                    (_, Some(e)) => e,
                    (total, None) => done(total),
                }
            },
            n,
        );
    }
    let ctx = ctx.clone();
    in_turn(async move {
        let (mut total, mut failed) = (start, None);
        let mut keys = keys.into_iter().peekable();
        loop {
            let mut taken = 0;
            let mut window = Vec::new();
            while let Some(k) = keys.next_if(|k| taken == 0 || taken + weight(k) <= KEYS_AT_ONCE) {
                taken += weight(&k);
                window.push(each(k, &ctx));
            }
            if window.is_empty() {
                break;
            }
            (total, failed) = combine(total, failed, join_every(window).await);
        }
        failed.unwrap_or_else(|| done(total))
    })
}

/// Sums the integer replies of one request per key (DEL), answering the first error if any.
fn count<F, Fut>(keys: Vec<Bytes>, ctx: &Ctx, each: F) -> Step<Reply>
where
    F: Fn(Bytes, &Ctx) -> Fut + Send + 'static,
    Fut: Future<Output = Result<i64, Reply>> + Send + 'static,
{
    per_key(keys, |_| 1, ctx, 0, |a, b| a + b, Reply::Int, each)
}

/// `items` in windows of [`KEYS_AT_ONCE`], in order: a command on many keys routes each
/// window by the map in force when that window is sent (see [`per_key`]).
fn windows<T>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut rest = items.into_iter();
    std::iter::from_fn(|| {
        let window: Vec<_> = rest.by_ref().take(KEYS_AT_ONCE).collect();
        (!window.is_empty()).then_some(window)
    })
    .collect()
}

/// Runs a parsed command.
pub fn execute(cmd: Cmd, conn: &mut Conn, ctx: &Ctx) -> Step<Reply> {
    let resp3 = conn.resp3();
    match cmd {
        Cmd::Answer(reply) => Step::Reply(reply),
        Cmd::Quit => Step::Close(Some(Reply::OK)),
        Cmd::Select => Step::Reply(Reply::OK),
        Cmd::Auth(user, password) => connection::auth(user, password, ctx),
        Cmd::Hello(hello) => connection::hello(hello, conn, ctx),
        Cmd::Client(client) => connection::client(client, conn, ctx),
        Cmd::Command(query) => Step::Reply(server::command(query, ctx)),
        Cmd::ConfigGet(patterns) => server::config_get(patterns, ctx),
        Cmd::Info(sections) => server::info(sections, ctx),
        Cmd::Time => Step::Reply(server::time()),
        Cmd::Wait => Step::Reply(server::wait(ctx)),
        Cmd::Cluster(change) => server::cluster(change, ctx),
        Cmd::Multi | Cmd::Exec | Cmd::Discard | Cmd::Watch(_) | Cmd::Unwatch => {
            transaction::control(cmd, conn, ctx)
        }
        // `map`, not an async block, on the hot paths: a block holds the future it awaits
        // twice (captured, then as the awaited value), and the box is allocated and copied
        // at that size.
        Cmd::Get(key) => dispatch(ctx.router.get(key, &ctx.origin).map(value_reply)),
        Cmd::Write(req) => dispatch(ctx.router.write(req, &ctx.origin).map(written)),
        Cmd::Del(keys) => count(keys, ctx, |k, ctx| {
            let fut = ctx.router.write(Request::new(Op::Del, k), &ctx.origin);
            async move { found(fut.await) }
        }),
        Cmd::Exists(keys) => keys::count_each(keys, Action::Exists, ctx),
        Cmd::Touch(keys) => keys::count_each(keys, Action::Touch, ctx),
        Cmd::MGet(keys) => strings::mget(keys, ctx),
        Cmd::MSet(pairs) => strings::mset(pairs, ctx),
        Cmd::MSetNx(pairs) => strings::msetnx(pairs, ctx),
        Cmd::Run(key, action) => {
            let fut = run_action(ctx, key, &action, resp3);
            dispatch(async move { raw(fut.await) })
        }
        Cmd::Rename { src, dst, nx } => keys::rename(src, dst, nx, ctx),
        Cmd::Copy { src, dst, replace } => keys::copy(src, dst, replace, ctx),
        Cmd::Keys(pattern) => keyspace::keys(pattern, ctx),
        Cmd::Scan(scan) => keyspace::scan(scan, ctx),
        Cmd::RandomKey => keyspace::random_key(ctx),
        Cmd::DbSize => keyspace::dbsize(ctx),
        Cmd::Flush { asynchronous } => keyspace::flush(asynchronous, ctx),
    }
}

/// 1 for a key found (an `Ok`), 0 for one not; the error otherwise.
fn found(resp: Response) -> Result<i64, Reply> {
    match resp.status {
        Status::Ok => Ok(1),
        Status::NotFound => Ok(0),
        _ => Err(error_reply(&resp)),
    }
}

/// Runs a command the binary protocol's `command` op carries: the same table, the session's
/// user, no connection state. The answer is its RESP reply, whole.
pub fn run_binary(args: Vec<Bytes>, resp3: bool, ctx: &Ctx) -> Step<Response> {
    let Some(spec) = lookup(&args[0]).filter(|s| s.native()) else {
        return Step::Reply(encoded(unknown_command(&args), resp3));
    };
    if !ctx.who.may(spec.access) {
        return Step::Reply(encoded(crate::resp::refusal(&ctx.who, &args[0]), resp3));
    }
    if ctx.router.mode().is_none() && spec.adapter != Adapter::Here {
        let reply = Reply::err("TRYAGAIN the cluster is starting; retry");
        return Step::Reply(encoded(reply, resp3));
    }
    if ctx.router.is_adapter() && spec.adapter != Adapter::Here {
        let reply = Reply::err(
            "ERR the command op is not available in adapter mode: use RESP for the destination",
        );
        return Step::Reply(encoded(reply, resp3));
    }
    let cmd = match parse(spec, &args) {
        Ok(cmd) => cmd,
        Err(e) => return Step::Reply(encoded(e, resp3)),
    };
    let mut conn = Conn {
        version: if resp3 {
            Version::Resp3
        } else {
            Version::Resp2
        },
        ..Conn::default()
    };
    let step = match cmd {
        Cmd::Quit
        | Cmd::Hello(_)
        | Cmd::Auth(..)
        | Cmd::Multi
        | Cmd::Exec
        | Cmd::Discard
        | Cmd::Watch(_)
        | Cmd::Unwatch
        | Cmd::Client(_) => Step::Reply(Reply::err(format!(
            "ERR '{}' needs a RESP connection",
            spec.name.to_ascii_uppercase()
        ))),
        cmd => execute(cmd, &mut conn, ctx),
    };
    let max = ctx.config.max_frame;
    match step {
        Step::NeedMore => Step::NeedMore,
        Step::Reply(r) | Step::Close(Some(r)) => Step::Reply(encoded(r, resp3)),
        Step::Close(None) => Step::Reply(Response::ok(Bytes::new())),
        Step::Dispatch(fut, n) => {
            Step::Dispatch(Box::pin(async move { encoded(fut.await, resp3) }), n)
        }
        Step::Settle(fut) => Step::Settle(Box::pin(async move { encoded(fut.await, resp3) })),
        Step::Stream(parts) => {
            use futures_util::StreamExt;
            Step::Dispatch(
                Box::pin(async move {
                    let mut out = bytes::BytesMut::new();
                    let mut parts = parts;
                    while let Some(part) = parts.next().await {
                        part.encode_as(version_of(resp3), &mut out);
                        if out.len() > max {
                            return Response::status(Status::TooLarge);
                        }
                    }
                    Response::ok(out.freeze())
                }),
                1,
            )
        }
    }
}

fn version_of(resp3: bool) -> Version {
    if resp3 {
        Version::Resp3
    } else {
        Version::Resp2
    }
}

/// A reply as the payload of an `Ok` response.
fn encoded(reply: Reply, resp3: bool) -> Response {
    let mut out = bytes::BytesMut::new();
    reply.encode_as(version_of(resp3), &mut out);
    Response::ok(out.freeze())
}

/// Runs one action for the text protocol (`incr||key` ...): its reply as a text answer.
pub fn run_text(
    ctx: &Ctx,
    key: Bytes,
    action: Action,
) -> impl Future<Output = Response> + Send + 'static {
    let fut = run_action(ctx, key, &action, false);
    async move {
        let reply = match replies(fut.await) {
            Ok(mut r) if !r.is_empty() => r.swap_remove(0),
            Ok(_) => Reply::Nil,
            Err(e) => e,
        };
        text_answer(reply)
    }
}

/// A reply as the text protocol says it: `0||<value>`, `2||` for nothing there, code 4 for
/// an unreachable pair, code 10 for a value of the wrong kind.
pub fn text_answer(reply: Reply) -> Response {
    match reply {
        Reply::Int(n) => Response::ok(Bytes::from(n.to_string())),
        Reply::Bulk(b) => Response::ok(b),
        Reply::Nil | Reply::NilArray => Response::status(Status::NotFound),
        Reply::Simple(s) => Response::ok(Bytes::from_static(s.as_bytes())),
        Reply::Line(s) => Response::ok(Bytes::from(s)),
        Reply::Error(e) => {
            let (status, text) = if let Some(rest) = e.strip_prefix("TRYAGAIN ") {
                (Status::Unavailable, rest.to_string())
            } else if let Some(rest) = e.strip_prefix("ERR ") {
                (Status::WrongType, rest.to_string())
            } else {
                (Status::WrongType, e)
            };
            Response {
                id: 0,
                status,
                payload: Bytes::from(text),
            }
        }
        other => {
            let mut out = bytes::BytesMut::new();
            other.encode(&mut out);
            Response::ok(out.freeze())
        }
    }
}

/// The pair a command's keys are on, if they are all on one (CROSSSLOT otherwise); `None`
/// for a command without keys.
pub fn pair_of(spec: &Spec, args: &[Bytes], slots: &SlotMap) -> Result<Option<usize>, Reply> {
    let mut pair = None;
    for k in spec.keys.of(args) {
        let p = slots.pair_of(k);
        if pair.is_some_and(|q| q != p) {
            return Err(crossslot());
        }
        pair = Some(p);
    }
    Ok(pair)
}

pub(crate) fn crossslot() -> Reply {
    Reply::err("CROSSSLOT Keys in request don't hash to the same slot")
}

/// A ready reply for [`Step::Stream`] heads.
pub(crate) fn ready_reply(r: Reply) -> futures_util::future::Ready<Reply> {
    ready(r)
}

/// The command `list` parses to (tests of each family's parsers).
#[cfg(test)]
pub(crate) fn parse_words(list: &[&str]) -> Result<Cmd, Reply> {
    let args: Vec<Bytes> = list
        .iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect();
    parse(lookup(&args[0]).expect("a known command"), &args)
}

#[cfg(test)]
mod tests;
