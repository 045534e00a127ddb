//! Commands on keys of any type: DEL, UNLINK, EXISTS, TOUCH, TYPE, the expiry commands
//! (Redis 7.0's `expire.c`: NX/XX/GT/LT, overflow checks), PERSIST, RENAME, RENAMENX, COPY
//! and OBJECT.
//!
//! RENAME and COPY of two keys on one pair run as one program on its primary: atomic. Keys
//! on two pairs cannot be: the source is read (value, type, expiry, version), the
//! destination written, then the source deleted only if it still holds the version read.
//! So a key is never lost: if the source changed meanwhile it keeps its new value and the
//! destination has the one read; a crash in between leaves both; a reader may see both for
//! a moment.

use std::future::Future;

use bytes::Bytes;
use futures_util::future::{join, Either};
use futures_util::FutureExt;
use twincache_protocol::frame::{Op, Request};
use twincache_protocol::program::{encode_program, Action, ExpireIf, Kind, Ttl, TtlForm};
use twincache_protocol::resp::Reply;
use twincache_protocol::version::wall_ms;

use super::strings::{refused, PROGRAM_KEYS};
use super::{
    dispatch, found, int, join_every, keys, per_key, raw, replies, run_action, syntax_error,
    windows, Adapter, Cmd, Family, Group, KeySpec, Spec, ONE_KEY,
};
use crate::auth::Access::{Read, Write};
use crate::session::{Ctx, Step};

const GENERIC: Family = Family::new(Group::Generic, Adapter::Destination).keys(ONE_KEY);
const ALL_KEYS: KeySpec = keys(1, -1, 1);
const TWO_KEYS: KeySpec = keys(1, 2, 1);

pub static SPECS: &[Spec] = &[
    GENERIC.keys(ALL_KEYS).cmd("del", -2, Write, "Deletes one or more keys.", |a| Ok(Cmd::Del(a[1..].to_vec()))),
    GENERIC.keys(ALL_KEYS).fast().since("4.0.0").cmd("unlink", -2, Write, "Asynchronously deletes one or more keys.", |a| Ok(Cmd::Del(a[1..].to_vec()))),
    GENERIC.keys(ALL_KEYS).fast().cmd("exists", -2, Read, "Determines whether one or more keys exist.", |a| Ok(Cmd::Exists(a[1..].to_vec()))),
    GENERIC.keys(ALL_KEYS).fast().since("3.2.1").cmd("touch", -2, Read, "Returns the number of existing keys out of those specified after updating the time they were last accessed.", |a| Ok(Cmd::Touch(a[1..].to_vec()))),
    GENERIC.fast().cmd("type", 2, Read, "Determines the type of value stored at a key.", |a| Ok(run(a, Action::Type))),
    GENERIC.fast().cmd("expire", -3, Write, "Sets the expiration time of a key in seconds.", |a| expire(a, "expire", true, true)),
    GENERIC.fast().since("2.6.0").cmd("pexpire", -3, Write, "Sets the expiration time of a key in milliseconds.", |a| expire(a, "pexpire", true, false)),
    GENERIC.fast().since("1.2.0").cmd("expireat", -3, Write, "Sets the expiration time of a key to a Unix timestamp.", |a| expire(a, "expireat", false, true)),
    GENERIC.fast().since("2.6.0").cmd("pexpireat", -3, Write, "Sets the expiration time of a key to a Unix milliseconds timestamp.", |a| expire(a, "pexpireat", false, false)),
    GENERIC.fast().cmd("ttl", 2, Read, "Returns the expiration time in seconds of a key.", |a| Ok(run(a, Action::ReadTtl(TtlForm::Seconds)))),
    GENERIC.fast().since("2.6.0").cmd("pttl", 2, Read, "Returns the expiration time in milliseconds of a key.", |a| Ok(run(a, Action::ReadTtl(TtlForm::Millis)))),
    GENERIC.fast().since("7.0.0").cmd("expiretime", 2, Read, "Returns the expiration time of a key as a Unix timestamp.", |a| Ok(run(a, Action::ReadTtl(TtlForm::AtSeconds)))),
    GENERIC.fast().since("7.0.0").cmd("pexpiretime", 2, Read, "Returns the expiration time of a key as a Unix milliseconds timestamp.", |a| Ok(run(a, Action::ReadTtl(TtlForm::AtMillis)))),
    GENERIC.fast().since("2.2.0").cmd("persist", 2, Write, "Removes the expiration time of a key.", |a| Ok(run(a, Action::Persist))),
    GENERIC.keys(TWO_KEYS).cmd("rename", 3, Write, "Renames a key and overwrites the destination.", |a| Ok(Cmd::Rename { src: a[1].clone(), dst: a[2].clone(), nx: false })),
    GENERIC.keys(TWO_KEYS).fast().cmd("renamenx", 3, Write, "Renames a key only when the target key name doesn't exist.", |a| Ok(Cmd::Rename { src: a[1].clone(), dst: a[2].clone(), nx: true })),
    GENERIC.keys(TWO_KEYS).since("6.2.0").cmd("copy", -3, Write, "Copies the value of a key to a new key.", copy_args),
    GENERIC.keys(keys(2, 2, 1)).since("2.2.3").cmd("object", -2, Read, "A container for object introspection commands.", object),
];

fn run(args: &[Bytes], action: Action) -> Cmd {
    Cmd::Run(args[1].clone(), action)
}

/// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT: options first, then the time, as Redis checks.
fn expire(args: &[Bytes], name: &str, relative: bool, seconds: bool) -> Result<Cmd, Reply> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in &args[3..] {
        match opt.to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"GT" => gt = true,
            b"LT" => lt = true,
            _ => {
                return Err(Reply::err(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(&opt[..opt.len().min(64)])
                )))
            }
        }
    }
    if nx && (xx || gt || lt) {
        return Err(Reply::err(
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Err(Reply::err(
            "ERR GT and LT options at the same time are not compatible",
        ));
    }
    let cond = match (nx, xx, gt, lt) {
        (true, ..) => ExpireIf::Nx,
        (_, _, true, _) => ExpireIf::Gt,
        (_, true, _, true) => ExpireIf::XxLt,
        (_, false, _, true) => ExpireIf::Lt,
        (_, true, ..) => ExpireIf::Xx,
        _ => ExpireIf::Always,
    };
    let invalid = || Reply::err(format!("ERR invalid expire time in '{name}' command"));
    let mut when = int(&args[2])?;
    if seconds {
        when = when.checked_mul(1000).ok_or_else(invalid)?;
    }
    let base = if relative { wall_ms() as i64 } else { 0 };
    if when > i64::MAX - base {
        return Err(invalid());
    }
    let ttl = if relative {
        Ttl::In(when)
    } else {
        Ttl::At(when)
    };
    Ok(run(args, Action::Expire(ttl, cond)))
}

/// `COPY source destination [DB 0] [REPLACE]` (one database: DB 0 only).
fn copy_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    let mut replace = false;
    let mut j = 3;
    while j < args.len() {
        if args[j].eq_ignore_ascii_case(b"replace") {
            replace = true;
        } else if args[j].eq_ignore_ascii_case(b"db") && j + 1 < args.len() {
            if int(&args[j + 1])? != 0 {
                return Err(Reply::err("ERR DB index is out of range"));
            }
            j += 1;
        } else {
            return Err(syntax_error());
        }
        j += 1;
    }
    if args[1] == args[2] {
        return Err(Reply::err(
            "ERR source and destination objects are the same",
        ));
    }
    Ok(Cmd::Copy {
        src: args[1].clone(),
        dst: args[2].clone(),
        replace,
    })
}

const OBJECT_HELP: &[&str] = &[
    "OBJECT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "ENCODING <key>",
    "    Return how the value stored at <key> is stored: raw, compressed or encrypted for",
    "    strings, packed for hashes.",
    "FREQ <key>",
    "    Not tracked: twincache evicts by recency (CLOCK), not by frequency.",
    "HELP",
    "    Print this help.",
];

fn object(args: &[Bytes]) -> Result<Cmd, Reply> {
    let sub = args[1].to_ascii_lowercase();
    let wrong = |sub: &[u8]| {
        Reply::err(format!(
            "ERR wrong number of arguments for 'object|{}' command",
            String::from_utf8_lossy(sub)
        ))
    };
    match (sub.as_slice(), args.len()) {
        (b"encoding", 3) => Ok(Cmd::Run(args[2].clone(), Action::Encoding)),
        (b"freq", 3) => Err(Reply::err(
            "ERR An LFU maxmemory policy is not selected, access frequency not tracked. Please \
             note that when switching between policies at runtime LRU and LFU data will take \
             some time to adjust.",
        )),
        (b"help", 2) => Ok(Cmd::Answer(Reply::Array(
            OBJECT_HELP.iter().map(|l| Reply::Simple(l)).collect(),
        ))),
        (b"idletime" | b"refcount", _) => Err(Reply::err(format!(
            "ERR OBJECT {} is not supported by twincache",
            String::from_utf8_lossy(&sub).to_ascii_uppercase()
        ))),
        (b"encoding" | b"freq" | b"help", _) => Err(wrong(&sub)),
        _ => Err(Reply::err(format!(
            "ERR unknown subcommand '{}'. Try OBJECT HELP.",
            String::from_utf8_lossy(&args[1][..args[1].len().min(64)])
        ))),
    }
}

/// What a cross-pair move reads of the source: its dump and its version.
struct Dumped {
    kind: Kind,
    expires_at: u64,
    value: Bytes,
    version: u64,
}

/// Reads `src`'s value, type, expiry and version (on its pair's primary, where writes to it
/// run, so nothing acknowledged is missed); `None` if it does not exist.
async fn dump(ctx: &Ctx, src: Bytes) -> Result<Option<Dumped>, Reply> {
    let program = encode_program(&[Action::Dump, Action::Version]);
    let got = replies(ctx.router.apply(src, program, false, &ctx.origin).await)?;
    match got.as_slice() {
        [Reply::Nil, _] => Ok(None),
        [Reply::Array(parts), Reply::Array(watch)] => match (parts.as_slice(), watch.first()) {
            (
                [Reply::Int(kind), Reply::Int(expires_at), Reply::Bulk(value)],
                Some(Reply::Bulk(version)),
            ) => Ok(Some(Dumped {
                kind: Kind::from_u8(*kind as u8).unwrap_or(Kind::String),
                expires_at: *expires_at as u64,
                value: value.clone(),
                version: std::str::from_utf8(version)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            })),
            _ => Err(Reply::err("ERR malformed dump")),
        },
        [Reply::Error(e), ..] => Err(Reply::Error(e.clone())),
        _ => Err(Reply::err("ERR malformed dump")),
    }
}

/// Writes what was dumped to `dst`: 1, or 0 if `dst` exists and `replace` is false.
async fn restore(ctx: &Ctx, dst: Bytes, d: &Dumped, replace: bool) -> Result<i64, Reply> {
    let action = Action::Restore {
        kind: d.kind,
        expires_at: d.expires_at,
        value: d.value.clone(),
        replace,
    };
    let program = encode_program(&[action]);
    match replies(ctx.router.apply(dst, program, false, &ctx.origin).await)?.first() {
        Some(Reply::Int(n)) => Ok(*n),
        Some(Reply::Error(e)) => Err(Reply::Error(e.clone())),
        _ => Err(Reply::err("ERR malformed answer")),
    }
}

/// EXISTS and TOUCH: the keys found. A pair's keys go as read programs of up to
/// [`PROGRAM_KEYS`] keys (`each` for every one), as an MGET's do, instead of a request per
/// key: a 100-key EXISTS over four pairs takes four frames each way, not 100. A key alone
/// on its pair, a key whose slot is being moved, every key in adapter mode (where a read
/// falls back to Redis, which a program does not), and the keys of a program refused as
/// routed by an older map go one at a time. [`KEYS_AT_ONCE`](super::KEYS_AT_ONCE) keys at
/// a time, each window routed by the map in force when it is sent.
pub(super) fn count_each(keys: Vec<Bytes>, each: Action, ctx: &Ctx) -> Step<Reply> {
    per_key(
        windows(keys),
        Vec::len,
        ctx,
        0,
        |a, b| a + b,
        Reply::Int,
        move |keys, ctx| count_window(keys, &each, ctx),
    )
}

/// One window of [`count_each`].
fn count_window(
    keys: Vec<Bytes>,
    each: &Action,
    ctx: &Ctx,
) -> impl Future<Output = Result<i64, Reply>> + Send + 'static {
    let router = &ctx.router;
    let topo = router.pairs();
    let mut by_pair: Vec<Vec<Bytes>> = vec![Vec::new(); topo.len()];
    let mut singles = Vec::new();
    for key in keys {
        let route = topo.route(&key);
        match router.is_adapter() || route.from.is_some() {
            true => singles.push(key),
            false => by_pair[route.pair].push(key),
        }
    }
    let mut programs = Vec::new();
    for (pair, keys) in by_pair.into_iter().enumerate() {
        if keys.len() == 1 {
            singles.extend(keys);
            continue;
        }
        let mut keys = keys;
        while !keys.is_empty() {
            // Moved out, not cloned: a key is a slice of the client's buffer, and its
            // reference count is shared by every key of the command.
            let rest = keys.split_off(keys.len().min(PROGRAM_KEYS));
            let part = std::mem::replace(&mut keys, rest);
            let req = crate::cluster::each_of(each, part.iter(), router.max_replies);
            let read = router.query_req(topo.clone(), pair, req, &ctx.origin);
            programs.push(read.map(move |answer| (part, answer)));
        }
    }
    let singles: Vec<_> = singles
        .into_iter()
        .map(|k| count_one(k, each, ctx))
        .collect();
    let (each, ctx) = (each.clone(), ctx.clone());
    async move {
        let (singles, answers) = join(join_every(singles), join_every(programs)).await;
        let (mut total, mut failed) = (0, None);
        let mut again = Vec::new();
        for (part, answer) in answers {
            if refused(&answer).is_some() {
                again.extend(part);
                continue;
            }
            match replies(answer) {
                Ok(replies) => {
                    for reply in replies {
                        match reply {
                            Reply::Int(n) => total += n,
                            e @ Reply::Error(_) => {
                                failed.get_or_insert(e);
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        let again = join_every(again.into_iter().map(|k| count_one(k, &each, &ctx))).await;
        for answer in singles.into_iter().chain(again) {
            match answer {
                Ok(n) => total += n,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(total), Err)
    }
}

/// EXISTS or TOUCH of one key: 1 if found.
fn count_one(
    key: Bytes,
    each: &Action,
    ctx: &Ctx,
) -> impl Future<Output = Result<i64, Reply>> + Send + 'static {
    match each {
        Action::Exists => {
            let read = ctx.router.read(Request::new(Op::Exists, key), &ctx.origin);
            Either::Left(read.map(found))
        }
        _ => Either::Right(run_action(ctx, key, each, false).map(|answer| {
            match replies(answer)?.first() {
                Some(Reply::Int(n)) => Ok(*n),
                _ => Ok(0),
            }
        })),
    }
}

pub(super) fn rename(src: Bytes, dst: Bytes, nx: bool, ctx: &Ctx) -> Step<Reply> {
    if ctx.router.pair_of(&src) == ctx.router.pair_of(&dst) {
        let fut = super::run_action(ctx, src, &Action::RenameTo { dst, nx }, false);
        return dispatch(async move { raw(fut.await) });
    }
    // Its steps run one after another as it is polled: nothing after it is read until it is
    // done, so a later command of the session sees the move (Redis: the next command does).
    let ctx = ctx.clone();
    super::in_turn(async move {
        let moved = async {
            let Some(d) = dump(&ctx, src.clone()).await? else {
                return Err(Reply::err("ERR no such key"));
            };
            if restore(&ctx, dst, &d, !nx).await? == 0 {
                return Ok(Reply::Int(0));
            }
            let program = encode_program(&[Action::DelIfVersion(d.version)]);
            replies(ctx.router.apply(src, program, false, &ctx.origin).await)?;
            Ok(if nx { Reply::Int(1) } else { Reply::OK })
        };
        moved.await.unwrap_or_else(|e| e)
    })
}

pub(super) fn copy(src: Bytes, dst: Bytes, replace: bool, ctx: &Ctx) -> Step<Reply> {
    if ctx.router.pair_of(&src) == ctx.router.pair_of(&dst) {
        let fut = super::run_action(ctx, src, &Action::CopyTo { dst, replace }, false);
        return dispatch(async move { raw(fut.await) });
    }
    // As a cross-pair RENAME: nothing after it is read until it is done.
    let ctx = ctx.clone();
    super::in_turn(async move {
        let copied = async {
            let Some(d) = dump(&ctx, src).await? else {
                return Ok(Reply::Int(0));
            };
            Ok(Reply::Int(restore(&ctx, dst, &d, replace).await?))
        };
        copied.await.unwrap_or_else(|e: Reply| e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::parse_words as parse;

    fn err(text: &str) -> Result<Cmd, Reply> {
        Err(Reply::err(text))
    }

    #[test]
    fn expire_options_and_overflow_like_redis() {
        let k = Bytes::from_static(b"k");
        assert_eq!(
            parse(&["expire", "k", "10", "xx", "lt"]),
            Ok(Cmd::Run(
                k.clone(),
                Action::Expire(Ttl::In(10_000), ExpireIf::XxLt)
            ))
        );
        assert_eq!(
            parse(&["pexpireat", "k", "-5"]),
            Ok(Cmd::Run(
                k.clone(),
                Action::Expire(Ttl::At(-5), ExpireIf::Always)
            ))
        );
        assert_eq!(
            parse(&["expire", "k", "10", "nx", "gt"]),
            err("ERR NX and XX, GT or LT options at the same time are not compatible")
        );
        assert_eq!(
            parse(&["expire", "k", "10", "gt", "lt"]),
            err("ERR GT and LT options at the same time are not compatible")
        );
        assert_eq!(
            parse(&["expire", "k", "10", "foo"]),
            err("ERR Unsupported option foo")
        );
        // Options are checked before the time.
        assert_eq!(
            parse(&["expire", "k", "x", "foo"]),
            err("ERR Unsupported option foo")
        );
        assert_eq!(
            parse(&["expire", "k", "x"]),
            err("ERR value is not an integer or out of range")
        );
        assert_eq!(
            parse(&["expire", "k", "9223372036854775807"]),
            err("ERR invalid expire time in 'expire' command")
        );
        assert_eq!(
            parse(&["pexpire", "k", "9223372036854775807"]),
            err("ERR invalid expire time in 'pexpire' command")
        );
        assert!(parse(&["pexpireat", "k", "9223372036854775807"]).is_ok());
    }

    #[test]
    fn copy_object_and_the_rest() {
        assert_eq!(
            parse(&["copy", "a", "a"]),
            err("ERR source and destination objects are the same")
        );
        assert_eq!(
            parse(&["copy", "a", "b", "db", "1"]),
            err("ERR DB index is out of range")
        );
        assert_eq!(parse(&["copy", "a", "b", "foo"]), err("ERR syntax error"));
        assert!(matches!(
            parse(&["copy", "a", "b", "REPLACE", "db", "0"]),
            Ok(Cmd::Copy { replace: true, .. })
        ));
        assert_eq!(
            parse(&["object", "encoding", "k"]),
            Ok(Cmd::Run(Bytes::from_static(b"k"), Action::Encoding))
        );
        assert_eq!(
            parse(&["object", "foo"]),
            err("ERR unknown subcommand 'foo'. Try OBJECT HELP.")
        );
        assert_eq!(
            parse(&["object", "encoding"]),
            err("ERR wrong number of arguments for 'object|encoding' command")
        );
        assert_eq!(
            parse(&["ttl"]),
            err("ERR wrong number of arguments for 'ttl' command")
        );
    }
}
