//! String commands. GET, SET without conditions, SETEX, PSETEX, MGET and MSET take the direct
//! paths (a read on one worker, a write on both at once); the rest run on the pair's worker
//! as actions (see the worker's `exec::strings`). Options and errors follow Redis 7.0's
//! `t_string.c`, in its order: every option is read before any is checked.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{ready, Either, Ready};
use futures_util::stream::{self, Stream, StreamExt};
use futures_util::FutureExt;
use twincache_protocol::frame::{flags, Op, Request};
use twincache_protocol::program::{encode_program, Action, Answer, SetIf, Ttl};
use twincache_protocol::resp::Reply;
use twincache_protocol::slots::SlotMap;
use twincache_protocol::version::wall_ms;
use twincache_protocol::Status;

use super::{
    batch, dispatch_n, error_reply, int, join_every, raw_replies, replies, syntax_error,
    value_reply, wrong_args, Adapter, Cmd, Family, Group, KeySpec, Spec, ONE_KEY,
};
use crate::auth::Access;
use crate::cluster::Written;
use crate::session::{Ctx, Step};

use Access::{Read, Write};
use Adapter::Cache;

const STRING: Family = Family::new(Group::String, Adapter::Destination).keys(ONE_KEY);
const MANY: KeySpec = super::keys(1, -1, 1);
const PAIRS: KeySpec = super::keys(1, -1, 2);

pub static SPECS: &[Spec] = &[
    STRING.fast().adapter(Cache).cmd("get", 2, Read, "Returns the string value of a key.", |a| Ok(Cmd::Get(a[1].clone()))),
    STRING.adapter(Cache).cmd("set", -3, Write, "Sets the string value of a key, ignoring its type. The key is created if it doesn't exist.", set),
    STRING.fast().cmd("setnx", 3, Write, "Set the string value of a key only when the key doesn't exist.", |a| Ok(run(a, Action::SetNx(a[2].clone())))),
    STRING.since("2.0.0").cmd("setex", 4, Write, "Sets the string value and expiration time of a key. Creates the key if it doesn't exist.", |a| setex(a, "setex", true)),
    STRING.since("2.6.0").cmd("psetex", 4, Write, "Sets both string value and expiration time in milliseconds of a key. The key is created if it doesn't exist.", |a| setex(a, "psetex", false)),
    STRING.fast().cmd("getset", 3, Write, "Returns the previous string value of a key after setting it to a new value.", |a| Ok(run(a, Action::GetSet(a[2].clone())))),
    STRING.fast().since("6.2.0").cmd("getdel", 2, Write, "Returns the string value of a key after deleting the key.", |a| Ok(run(a, Action::GetDel))),
    STRING.fast().since("6.2.0").cmd("getex", -2, Write, "Returns the string value of a key after setting its expiration time.", getex),
    STRING.fast().adapter(Cache).keys(MANY).cmd("mget", -2, Read, "Atomically returns the string values of one or more keys.", |a| Ok(Cmd::MGet(a[1..].to_vec()))),
    STRING.adapter(Cache).keys(PAIRS).since("1.0.1").cmd("mset", -3, Write, "Atomically creates or modifies the string values of one or more keys.", |a| pairs(a, "mset").map(Cmd::MSet)),
    STRING.keys(PAIRS).since("1.0.1").cmd("msetnx", -3, Write, "Atomically modifies the string values of one or more keys only when all keys don't exist.", |a| pairs(a, "msetnx").map(Cmd::MSetNx)),
    STRING.fast().since("2.0.0").cmd("append", 3, Write, "Appends a string to the value of a key. Creates the key if it doesn't exist.", |a| Ok(run(a, Action::Append(a[2].clone())))),
    STRING.fast().since("2.2.0").cmd("strlen", 2, Read, "Returns the length of a string value.", |a| Ok(run(a, Action::StrLen))),
    STRING.since("2.4.0").cmd("getrange", 4, Read, "Returns a substring of the string stored at a key.", getrange),
    STRING.cmd("substr", 4, Read, "Returns a substring from a string value.", getrange),
    STRING.since("2.2.0").cmd("setrange", 4, Write, "Overwrites a part of a string value with another by an offset. Creates the key if it doesn't exist.", setrange),
    STRING.fast().cmd("incr", 2, Write, "Increments the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", |a| Ok(run(a, Action::IncrBy(1)))),
    STRING.fast().cmd("decr", 2, Write, "Decrements the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", |a| Ok(run(a, Action::IncrBy(-1)))),
    STRING.fast().cmd("incrby", 3, Write, "Increments the integer value of a key by a number. Uses 0 as initial value if the key doesn't exist.", |a| Ok(run(a, Action::IncrBy(int(&a[2])?)))),
    STRING.fast().cmd("decrby", 3, Write, "Decrements a number from the integer value of a key. Uses 0 as initial value if the key doesn't exist.", decrby),
    STRING.fast().since("2.6.0").cmd("incrbyfloat", 3, Write, "Increment the floating point value of a key by a number. Uses 0 as initial value if the key doesn't exist.", |a| Ok(run(a, Action::IncrByFloat(a[2].clone())))),
];

/// The one-key command of `args` as an action on its key.
fn run(args: &[Bytes], action: Action) -> Cmd {
    Cmd::Run(args[1].clone(), action)
}

fn pairs(args: &[Bytes], name: &str) -> Result<Vec<(Bytes, Bytes)>, Reply> {
    if args.len().is_multiple_of(2) {
        return Err(wrong_args(name));
    }
    Ok(args[1..]
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect())
}

fn decrby(args: &[Bytes]) -> Result<Cmd, Reply> {
    let n = int(&args[2])?;
    if n == i64::MIN {
        return Err(Reply::err("ERR decrement would overflow"));
    }
    Ok(run(args, Action::IncrBy(-n)))
}

fn getrange(args: &[Bytes]) -> Result<Cmd, Reply> {
    let (start, end) = (int(&args[2])?, int(&args[3])?);
    Ok(run(args, Action::GetRange(start, end)))
}

fn setrange(args: &[Bytes]) -> Result<Cmd, Reply> {
    let offset = int(&args[2])?;
    if offset < 0 {
        return Err(Reply::err("ERR offset is out of range"));
    }
    Ok(run(args, Action::SetRange(offset as u64, args[3].clone())))
}

/// The expiry units of SET and GETEX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Ex,
    Px,
    ExAt,
    PxAt,
}

/// The options of SET (or GETEX, `set` false), as Redis' `parseExtendedStringArgumentsOrReply`
/// accepts them: each at most with the ones it combines with, a later EX replacing an
/// earlier one.
#[derive(Debug, Default)]
struct Options {
    nx: bool,
    xx: bool,
    get: bool,
    keep_ttl: bool,
    persist: bool,
    expire: Option<(Unit, Bytes)>,
}

fn options(args: &[Bytes], set: bool) -> Result<Options, Reply> {
    let mut o = Options::default();
    let mut j = if set { 3 } else { 2 };
    while j < args.len() {
        let opt = args[j].to_ascii_uppercase();
        let next = args.get(j + 1);
        let timed = |o: &Options, unit: Unit| {
            !o.keep_ttl && !o.persist && o.expire.as_ref().is_none_or(|(u, _)| *u == unit)
        };
        match opt.as_slice() {
            b"NX" if set && !o.xx => o.nx = true,
            b"XX" if set && !o.nx => o.xx = true,
            b"GET" if set => o.get = true,
            b"KEEPTTL" if set && !o.persist && o.expire.is_none() => o.keep_ttl = true,
            b"PERSIST" if !set && o.expire.is_none() && !o.keep_ttl => o.persist = true,
            b"EX" | b"PX" | b"EXAT" | b"PXAT" if next.is_some() => {
                let unit = match opt.as_slice() {
                    b"EX" => Unit::Ex,
                    b"PX" => Unit::Px,
                    b"EXAT" => Unit::ExAt,
                    _ => Unit::PxAt,
                };
                if !timed(&o, unit) {
                    return Err(syntax_error());
                }
                o.expire = next.map(|n| (unit, n.clone()));
                j += 1;
            }
            _ => return Err(syntax_error()),
        }
        j += 1;
    }
    Ok(o)
}

/// The expiry an option asks for, checked as `getExpireMillisecondsOrReply` checks it: a
/// whole number above 0, and no overflow once in milliseconds and made absolute.
fn expiry(unit: Unit, arg: &[u8], command: &str) -> Result<Ttl, Reply> {
    let n = int(arg)?;
    let invalid = || Reply::err(format!("ERR invalid expire time in '{command}' command"));
    let seconds = matches!(unit, Unit::Ex | Unit::ExAt);
    if n <= 0 || (seconds && n > i64::MAX / 1000) {
        return Err(invalid());
    }
    let ms = if seconds { n * 1000 } else { n };
    match unit {
        Unit::Ex | Unit::Px => {
            ms.checked_add(wall_ms() as i64).ok_or_else(invalid)?;
            Ok(Ttl::In(ms))
        }
        Unit::ExAt | Unit::PxAt => Ok(Ttl::At(ms)),
    }
}

/// `SET key value [NX | XX] [GET] [EX s | PX ms | EXAT unix-s | PXAT unix-ms | KEEPTTL]`.
/// Without NX, XX, GET or KEEPTTL it is a plain write, sent to both workers at once; with
/// them it reads the key first, on the pair's primary.
fn set(args: &[Bytes]) -> Result<Cmd, Reply> {
    let o = options(args, true)?;
    let ttl = match &o.expire {
        Some((unit, arg)) => expiry(*unit, arg, "set")?,
        None if o.keep_ttl => Ttl::Keep,
        None => Ttl::Clear,
    };
    if !(o.nx || o.xx || o.get || o.keep_ttl) {
        return Ok(Cmd::Write(plain_set(&args[1], &args[2], ttl)));
    }
    let cond = match (o.nx, o.xx) {
        (true, _) => SetIf::Nx,
        (_, true) => SetIf::Xx,
        _ => SetIf::Always,
    };
    Ok(run(
        args,
        Action::Set {
            value: args[2].clone(),
            ttl,
            cond,
            get: o.get,
        },
    ))
}

/// A SET for both workers: a time to live as the frame's `ttl_ms` (the router makes it
/// absolute), or an absolute expiry flagged as one.
fn plain_set(key: &Bytes, value: &Bytes, ttl: Ttl) -> Request {
    let mut req = Request::new(Op::Set, key.clone());
    req.value = value.clone();
    match ttl {
        Ttl::In(ms) => req.ttl_ms = ms as u64,
        // Already past: 1 ms after the epoch, which every reader sees as gone.
        Ttl::At(ms) => {
            req.ttl_ms = (ms as u64).max(1);
            req.flags |= flags::EXPIRES_AT;
        }
        Ttl::Keep | Ttl::Clear => {}
    }
    req
}

/// SETEX and PSETEX: a SET with a time to live, checked as Redis checks it.
fn setex(args: &[Bytes], name: &str, seconds: bool) -> Result<Cmd, Reply> {
    let unit = if seconds { Unit::Ex } else { Unit::Px };
    let ttl = expiry(unit, &args[2], name)?;
    Ok(Cmd::Write(plain_set(&args[1], &args[3], ttl)))
}

/// `GETEX key [EX s | PX ms | EXAT unix-s | PXAT unix-ms | PERSIST]`; without an option, a
/// GET. Redis checks the expiry's value only once it has found a string there, so a bad one
/// travels to the worker as an error code.
fn getex(args: &[Bytes]) -> Result<Cmd, Reply> {
    let o = options(args, false)?;
    let (ttl, error) = match &o.expire {
        Some((unit, arg)) => match expiry(*unit, arg, "getex") {
            Ok(ttl) => (ttl, 0),
            Err(e) if e == super::not_integer() => (Ttl::Keep, 1),
            Err(_) => (Ttl::Keep, 2),
        },
        None if o.persist => (Ttl::Clear, 0),
        None => return Ok(Cmd::Get(args[1].clone())),
    };
    Ok(run(args, Action::GetEx(ttl, error)))
}

/// The largest MGET answered at once rather than streamed, and the GETs in flight when
/// keys are read one at a time.
const MGET_CHUNK: usize = 16;
/// Keys of one pair an MGET reads with one program: one frame each way instead of one per
/// key. A 100-key MGET over 4 pairs takes one program a pair (with 16 it took two, and
/// `bench/mget.sh` ran at 1.02 of twemproxy against 1.14 with 64). Not more: a worker locks
/// the shards of every key a program names while it runs (about 25 of its 64 for 32 keys).
pub(super) const PROGRAM_KEYS: usize = 32;
/// Keys a streamed MGET (one of more than [`MGET_CHUNK`] keys) reads at a time.
const MGET_WINDOW: usize = 256;
/// The most the values of one window of a streamed MGET may take, shared evenly by its
/// chunks. The keys of a chunk past its share are read again a key at a time, [`MGET_CHUNK`]
/// in flight (the whole window, if more than that many keys are to be read again or must be
/// read by GET), so a few huge values cost what they always did and memory stays bounded
/// either way.
const MGET_WINDOW_BYTES: usize = 8 << 20;

/// An MGET's value for one key: a bulk string or nil, or (`Err`) an error for that key.
type Element = Result<Reply, Reply>;
/// The values of a group of keys, or the keys back to be read one at a time.
type Values = Result<Vec<Element>, Vec<Bytes>>;

/// An MGET of up to [`MGET_CHUNK`] keys gathers its values and answers at once. A larger
/// one reads [`MGET_WINDOW`] keys at a time: one window is answered as one array, more
/// stream (the array header first, then each window's values in order), so its memory does
/// not grow with the number of keys. A key whose pair cannot be reached is then an error
/// element in the array (the header may be sent already), which Redis clients report as an
/// error for that key. A key holding another type than a string
/// reads as nil, as in Redis.
pub(super) fn mget(keys: Vec<Bytes>, ctx: &Ctx) -> Step<Reply> {
    if keys.len() > MGET_CHUNK {
        let header = Reply::Raw(Bytes::from(format!("*{}\r\n", keys.len())));
        if keys.len() <= MGET_WINDOW {
            // One window: its values, read together, are answered as one array rather than
            // element by element through the stream; only values read a key at a time
            // stream, behind the header.
            let answer = FutureExt::map(read_window(keys, ctx), |window| match window {
                Ok(values) => stream::iter([Reply::Array(values)]).left_stream(),
                Err(values) => stream::once(super::ready_reply(header))
                    .chain(values)
                    .right_stream(),
            });
            return Step::Stream(Box::pin(stream::once(answer).flatten()));
        }
        // Each window taken from the keys as it comes, not all copied into windows at once.
        let mut rest = keys.into_iter();
        let windows = std::iter::from_fn(move || {
            let window: Vec<Bytes> = rest.by_ref().take(MGET_WINDOW).collect();
            (!window.is_empty()).then_some(window)
        });
        let ctx = ctx.clone();
        let values = stream::iter(windows)
            .then(move |window| read_window(window, &ctx))
            .flat_map(|window| match window {
                Ok(values) => stream::iter(values).left_stream(),
                Err(values) => values.right_stream(),
            });
        return Step::Stream(Box::pin(
            stream::once(super::ready_reply(header)).chain(values),
        ));
    }
    let n = keys.len();
    // Each chunk may answer what a frame carries: at most MGET_CHUNK values, as before.
    let max_replies = ctx.router.max_replies;
    let read = read_values(keys, |_| max_replies, ctx);
    let ctx = ctx.clone();
    dispatch_n(
        async move {
            // Values too large to come together in one frame are read again a key at a
            // time: sent only now, so after the commands pipelined behind this MGET (the
            // one case where an MGET may see a later write of the same session).
            let values = match read.await {
                Ok(values) => values,
                Err(keys) => one_at_a_time(keys, &ctx).collect().await,
            };
            let values: Result<Vec<Reply>, Reply> = values.into_iter().collect();
            values.map_or_else(|e| e, Reply::Array)
        },
        n,
    )
}

/// The elements of a streamed MGET's window of `keys` (each error in its element's place:
/// the array's header is sent already or about to be): all at once when they could be read
/// together, or as they come when they must be read a key at a time.
fn read_window(
    keys: Vec<Bytes>,
    ctx: &Ctx,
) -> impl Future<Output = Result<Vec<Reply>, impl Stream<Item = Reply> + Send + 'static>> + Send + 'static
{
    let read = read_values(keys, |chunks| MGET_WINDOW_BYTES / chunks, ctx);
    let ctx = ctx.clone();
    async move {
        match read.await {
            Ok(values) => Ok(values
                .into_iter()
                .map(|v| v.unwrap_or_else(|e| e))
                .collect()),
            Err(keys) => Err(one_at_a_time(keys, &ctx).map(|v| v.unwrap_or_else(|e| e))),
        }
    }
}

/// The values of `keys` by one GET each, [`MGET_CHUNK`] in flight.
fn one_at_a_time(keys: Vec<Bytes>, ctx: &Ctx) -> impl Stream<Item = Element> + Send + 'static {
    gets_of(keys, ctx.router.clone(), ctx.origin.clone())
}

/// [`one_at_a_time`], from a router and an origin (for use inside a future).
fn gets_of(
    keys: Vec<Bytes>,
    router: Arc<crate::cluster::Router>,
    origin: crate::cluster::Origin,
) -> impl Stream<Item = Element> + Send + 'static {
    stream::iter(keys)
        .map(move |k| router.get(k, &origin))
        .buffered(MGET_CHUNK)
        .map(element)
}

/// Reads the values of `keys`, sent before this returns (in the session's order): one read
/// program per pair for each [`PROGRAM_KEYS`] of its keys, whose replies may take
/// `cap(number of programs)` bytes (and no more than a frame). A key being moved between
/// pairs, and every key in adapter mode, takes the way of a GET, which handles those (a pair
/// with a read-modify-write of the session in flight is read on its primary either way). The
/// keys come back, and nothing is sent, if more than [`MGET_CHUNK`] keys need a GET. A
/// program whose values pass its cap is read again as programs of [`MGET_CHUNK`] keys, and
/// the keys of one of those that passes its share are read one at a time, all once the
/// first programs have answered (all the keys come back instead if more than [`MGET_CHUNK`]
/// are to be read one at a time: no more than that many values are held at once either
/// way).
fn read_values(
    keys: Vec<Bytes>,
    cap: impl FnOnce(usize) -> usize,
    ctx: &Ctx,
) -> Either<impl Future<Output = Values> + Send + 'static, Ready<Values>> {
    let router = &ctx.router;
    let topo = router.pairs();
    let mut single = Vec::new();
    let mut by_pair: Vec<Vec<usize>> = vec![Vec::new(); topo.len()];
    // Adapter mode's GET falls back to the source and destination; a program does not.
    let one_by_one = keys.len() == 1 || router.is_adapter();
    for (i, key) in keys.iter().enumerate() {
        let route = topo.route(key);
        // (A pair with a program of this session's in flight is read on its primary, by a
        // program as by a GET: see `cluster::Pending`.)
        if one_by_one || route.from.is_some() {
            single.push(i);
        } else {
            by_pair[route.pair].push(i);
        }
    }
    if single.len() > MGET_CHUNK {
        return Either::Right(ready(Err(keys)));
    }
    let singles: Vec<_> = single
        .into_iter()
        .map(|i| (i, router.get(keys[i].clone(), &ctx.origin)))
        .collect();
    let programs = by_pair
        .iter()
        .map(|p| p.len().div_ceil(PROGRAM_KEYS))
        .sum::<usize>();
    // Never 0: that would mean no bound at all to the worker.
    let cap = cap(programs.max(1)).clamp(1, router.max_replies.max(1));
    let (router, origin) = (router.clone(), ctx.origin.clone());
    // The keys at `part`, read on `pair` with one program whose replies may take `cap`.
    let read = move |keys: &[Bytes], pair: usize, part: &[usize], cap: usize| {
        let req = crate::cluster::each_of(&Action::Get, part.iter().map(|&i| &keys[i]), cap);
        let read = router.query_req(topo.clone(), pair, req, &origin);
        let part = part.to_vec();
        async move { (pair, part, read.await) }
    };
    let reads: Vec<_> = by_pair
        .iter()
        .enumerate()
        .flat_map(|(pair, indexes)| indexes.chunks(PROGRAM_KEYS).map(move |part| (pair, part)))
        .map(|(pair, part)| read(&keys, pair, part, cap))
        .collect();
    let (router, origin) = (ctx.router.clone(), ctx.origin.clone());
    Either::Left(async move {
        let mut out: Vec<Element> = vec![Ok(Reply::Nil); keys.len()];
        let mut too_large: Vec<usize> = Vec::new();
        let (singles, answers) = futures_util::future::join(
            join_every(
                singles
                    .into_iter()
                    .map(|(i, f)| async move { (i, f.await) }),
            ),
            join_every(reads),
        )
        .await;
        for (i, resp) in singles {
            out[i] = element(resp);
        }
        let mut split: Vec<(usize, Vec<usize>)> = Vec::new();
        for (pair, part, answer) in answers {
            match refused(&answer) {
                // Too large for its share: again in smaller programs, each with its part
                // of the share, so one large value costs only its own few keys' GETs.
                Some(Status::TooLarge) if part.len() > MGET_CHUNK => split.push((pair, part)),
                // Or refused as routed by an older map: read one key at a time (a GET
                // routes itself again).
                Some(_) => too_large.extend(part),
                None => fill(&mut out, &part, answer),
            }
        }
        if !split.is_empty() {
            let again: Vec<_> = split
                .iter()
                .flat_map(|(pair, part)| {
                    let share = (cap / part.len().div_ceil(MGET_CHUNK)).max(1);
                    part.chunks(MGET_CHUNK).map(move |sub| (*pair, sub, share))
                })
                .map(|(pair, sub, share)| read(&keys, pair, sub, share))
                .collect();
            for (_, sub, answer) in join_every(again).await {
                match refused(&answer) {
                    Some(_) => too_large.extend(sub),
                    None => fill(&mut out, &sub, answer),
                }
            }
        }
        if too_large.len() > MGET_CHUNK {
            // More large values than may be in flight at once: all of them streamed.
            return Err(keys);
        }
        if !too_large.is_empty() {
            let again = too_large.iter().map(|&i| keys[i].clone()).collect();
            let values: Vec<Element> = gets_of(again, router, origin).collect().await;
            for (i, v) in too_large.into_iter().zip(values) {
                out[i] = v;
            }
        }
        Ok(out)
    })
}

/// Why a read program's answer is to be read again some other way: too large for its share,
/// or refused as routed by an older map.
pub(super) fn refused(answer: &Result<Answer, twincache_protocol::Response>) -> Option<Status> {
    match answer {
        Err(r) if matches!(r.status, Status::TooLarge | Status::Moved) => Some(r.status),
        _ => None,
    }
}

/// Puts a read program's answer for the keys at `part` into their places in `out`.
fn fill(out: &mut [Element], part: &[usize], answer: Result<Answer, twincache_protocol::Response>) {
    match raw_replies(answer, part.len()) {
        Ok(values) if values.len() == part.len() => {
            for (&i, v) in part.iter().zip(values) {
                out[i] = match v {
                    Reply::Error(e) if e.starts_with("WRONGTYPE") => Ok(Reply::Nil),
                    Reply::Error(e) => Err(Reply::Error(e)),
                    v => Ok(v),
                };
            }
        }
        Ok(_) => part
            .iter()
            .for_each(|&i| out[i] = Err(Reply::err("ERR malformed answer"))),
        Err(e) => part.iter().for_each(|&i| out[i] = Err(e.clone())),
    }
}

/// A GET's answer as an MGET element: another type reads as nil.
fn element(resp: twincache_protocol::Response) -> Element {
    match resp.status {
        Status::Ok | Status::NotFound => Ok(value_reply(resp)),
        Status::WrongType => Ok(Reply::Nil),
        _ => Err(error_reply(&resp)),
    }
}

/// MSET: each pair's keys go to both its workers in batches (`batch::runs`), as a pipeline
/// of SETs does, rather than as a request per key and worker.
/// [`KEYS_AT_ONCE`](super::KEYS_AT_ONCE) keys at a time, in the order given, each window
/// routed by the map in force when it is sent (a key given twice keeps its last value: its
/// SETs are stamped in order).
pub(super) fn mset(pairs: Vec<(Bytes, Bytes)>, ctx: &Ctx) -> Step<Reply> {
    super::per_key(
        super::windows(pairs),
        Vec::len,
        ctx,
        (),
        |(), ()| (),
        |()| Reply::OK,
        mset_window,
    )
}

/// One window of an MSET: grouped by pair in order, each pair's run of SETs sent now.
fn mset_window(
    kvs: Vec<(Bytes, Bytes)>,
    ctx: &Ctx,
) -> impl Future<Output = Result<(), Reply>> + Send + 'static {
    let topo = ctx.router.pairs();
    let mut by_pair: Vec<Vec<Request>> = vec![Vec::new(); topo.len()];
    for (k, v) in kvs {
        let mut req = Request::new(Op::Set, k);
        req.value = v;
        by_pair[topo.pair_of(&req.key)].push(req);
    }
    let writes: Vec<_> = by_pair
        .into_iter()
        .enumerate()
        .flat_map(|(pair, reqs)| batch::runs(reqs).into_iter().map(move |run| (pair, run)))
        .map(|(pair, run)| ctx.router.write_batch(&topo, pair, run, &ctx.origin))
        .collect();
    join_every(writes).map(|written| {
        for answers in written {
            if let Written::Each(answers) = answers {
                if let Some(failed) = answers.iter().find(|r| r.status != Status::Ok) {
                    return Err(error_reply(failed));
                }
            }
        }
        Ok(())
    })
}

/// MSETNX: all or nothing. On each pair, one action sets that pair's keys only if none of
/// them exists, atomically on its primary. If a pair refuses, the pairs that accepted have
/// their keys deleted again, where they still hold what this MSETNX wrote: the answer is 1
/// with every key set or 0 with none, but across pairs a reader may see some of them set
/// for the moment in between.
pub(super) fn msetnx(pairs: Vec<(Bytes, Bytes)>, ctx: &Ctx) -> Step<Reply> {
    let groups = by_pair(pairs, &ctx.router.pairs().slots);
    let futs: Vec<_> = groups
        .iter()
        .map(|group| {
            let program = encode_program(&[Action::MSetNx(group.clone())]);
            ctx.router
                .apply(group[0].0.clone(), program, false, &ctx.origin)
        })
        .collect();
    let (router, origin) = (ctx.router.clone(), ctx.origin.clone());
    let n = futs.len();
    let answer = async move {
        let answers = join_every(futs).await;
        let set: Vec<Option<u64>> = answers
            .iter()
            .map(|a| match a {
                Ok(a) if a.replies.starts_with(b":1") => Some(a.version),
                _ => None,
            })
            .collect();
        if set.iter().all(Option::is_some) {
            return Reply::Int(1);
        }
        let mut failed = answers
            .iter()
            .find_map(|a| a.as_ref().err().map(error_reply));
        // Undo what the pairs that accepted wrote, where it is still theirs.
        let undo: Vec<_> = groups
            .iter()
            .zip(&set)
            .filter_map(|(group, version)| {
                let version = (*version)?;
                let program: Vec<Action> = group
                    .iter()
                    .flat_map(|(k, _)| [Action::Key(k.clone()), Action::DelIfVersion(version)])
                    .collect();
                Some(router.apply(group[0].0.clone(), encode_program(&program), false, &origin))
            })
            .collect();
        for r in join_every(undo).await {
            if let Err(e) = replies(r) {
                failed.get_or_insert(e);
            }
        }
        failed.unwrap_or(Reply::Int(0))
    };
    if n > 1 {
        // An undo goes out as the answer is polled: nothing after it is read until it is
        // done, so the session's next command sees all of the keys set or none.
        return super::in_turn(answer);
    }
    dispatch_n(answer, n)
}

/// Key-value pairs grouped by the pair of workers holding each key (a key named twice keeps
/// its last value, as in Redis), in the order the pairs first appear.
fn by_pair(kvs: Vec<(Bytes, Bytes)>, slots: &SlotMap) -> Vec<Vec<(Bytes, Bytes)>> {
    let mut groups: Vec<(usize, Vec<(Bytes, Bytes)>)> = Vec::new();
    // A key given twice keeps its last value (as Redis' MSETNX, which sets them in turn),
    // found through an index: searching the group for each key cost a 50,000-key MSETNX
    // seconds.
    let mut seen: std::collections::HashMap<Bytes, (usize, usize)> = Default::default();
    for (k, v) in kvs {
        if let Some(&(g, i)) = seen.get(&k) {
            groups[g].1[i].1 = v;
            continue;
        }
        let p = slots.pair_of(&k);
        let g = match groups.iter().position(|(q, _)| *q == p) {
            Some(g) => g,
            None => {
                groups.push((p, Vec::new()));
                groups.len() - 1
            }
        };
        seen.insert(k.clone(), (g, groups[g].1.len()));
        groups[g].1.push((k, v));
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::parse_words as parse;

    fn err(text: &str) -> Result<Cmd, Reply> {
        Err(Reply::err(text))
    }

    #[test]
    fn set_options_like_redis() {
        assert!(
            matches!(parse(&["set", "k", "v"]), Ok(Cmd::Write(r)) if r.ttl_ms == 0 && r.flags == 0)
        );
        assert!(
            matches!(parse(&["SET", "k", "v", "ex", "10"]), Ok(Cmd::Write(r)) if r.ttl_ms == 10_000)
        );
        assert!(
            matches!(parse(&["set", "k", "v", "EX", "10", "EX", "20"]), Ok(Cmd::Write(r)) if r.ttl_ms == 20_000)
        );
        assert!(
            matches!(parse(&["set", "k", "v", "pxat", "5"]), Ok(Cmd::Write(r)) if r.ttl_ms == 5 && r.flags == flags::EXPIRES_AT)
        );
        assert_eq!(
            parse(&["set", "k", "v", "nx", "get", "px", "5"]),
            Ok(Cmd::Run(
                Bytes::from_static(b"k"),
                Action::Set {
                    value: Bytes::from_static(b"v"),
                    ttl: Ttl::In(5),
                    cond: SetIf::Nx,
                    get: true
                }
            ))
        );
        let syntax = err("ERR syntax error");
        assert_eq!(parse(&["set", "k", "v", "nx", "xx"]), syntax);
        assert_eq!(parse(&["set", "k", "v", "ex", "1", "px", "1"]), syntax);
        assert_eq!(parse(&["set", "k", "v", "keepttl", "ex", "1"]), syntax);
        assert_eq!(parse(&["set", "k", "v", "ex"]), syntax);
        assert_eq!(parse(&["set", "k", "v", "persist"]), syntax);
        // Every option is read before the expiry is checked.
        assert_eq!(parse(&["set", "k", "v", "ex", "x", "bogus"]), syntax);
        assert_eq!(
            parse(&["set", "k", "v", "ex", "x"]),
            err("ERR value is not an integer or out of range")
        );
        for bad in ["0", "-1", "9223372036854775807"] {
            assert_eq!(
                parse(&["set", "k", "v", "ex", bad]),
                err("ERR invalid expire time in 'set' command"),
                "{bad}"
            );
        }
        assert_eq!(
            parse(&["set", "k", "v", "px", "9223372036854775807"]),
            err("ERR invalid expire time in 'set' command")
        );
        assert_eq!(
            parse(&["set", "k"]),
            err("ERR wrong number of arguments for 'set' command")
        );
    }

    #[test]
    fn the_other_string_commands_parse_like_redis() {
        assert_eq!(
            parse(&["getex", "k", "persist"]),
            Ok(Cmd::Run(
                Bytes::from_static(b"k"),
                Action::GetEx(Ttl::Clear, 0)
            ))
        );
        assert_eq!(
            parse(&["getex", "k"]),
            Ok(Cmd::Get(Bytes::from_static(b"k")))
        );
        assert_eq!(parse(&["getex", "k", "nx"]), err("ERR syntax error"));
        assert_eq!(
            parse(&["getex", "k", "persist", "ex", "1"]),
            err("ERR syntax error")
        );
        assert_eq!(
            parse(&["getex", "k", "ex", "0"]),
            Ok(Cmd::Run(
                Bytes::from_static(b"k"),
                Action::GetEx(Ttl::Keep, 2)
            ))
        );
        assert_eq!(
            parse(&["setex", "k", "-5", "v"]),
            err("ERR invalid expire time in 'setex' command")
        );
        assert_eq!(
            parse(&["psetex", "k", "0", "v"]),
            err("ERR invalid expire time in 'psetex' command")
        );
        assert_eq!(
            parse(&["decrby", "k", "-9223372036854775808"]),
            err("ERR decrement would overflow")
        );
        assert_eq!(
            parse(&["incrby", "k", "01"]),
            err("ERR value is not an integer or out of range")
        );
        assert_eq!(
            parse(&["setrange", "k", "-1", "x"]),
            err("ERR offset is out of range")
        );
        assert_eq!(
            parse(&["getrange", "k", "0", "1.5"]),
            err("ERR value is not an integer or out of range")
        );
        assert_eq!(
            parse(&["mset", "a", "1", "b"]),
            err("ERR wrong number of arguments for 'mset' command")
        );
        assert_eq!(
            parse(&["msetnx", "a"]),
            err("ERR wrong number of arguments for 'msetnx' command")
        );
        assert_eq!(
            parse(&["incrbyfloat", "k", "1.5"]),
            Ok(Cmd::Run(
                Bytes::from_static(b"k"),
                Action::IncrByFloat(Bytes::from_static(b"1.5"))
            ))
        );
    }
}
