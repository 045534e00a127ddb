//! Commands on the whole key space, across every pair: SCAN, KEYS, RANDOMKEY, DBSIZE,
//! FLUSHDB and FLUSHALL.
//!
//! ## The SCAN cursor
//! ```text
//! cursor = pair:12 << 52 | worker:1 << 51 | that worker's cursor:51      (0: start)
//! ```
//! A walk goes through the pairs in order, each on one worker (the one that answered its
//! first step, while it can), with that worker's own cursor (see the worker's
//! `store::walk`): every key present on its pair for the whole walk is returned, some
//! perhaps twice. If the walk must move to the partner midway (the worker went down), it
//! starts that pair again there: the partner's cursors mean nothing to it. Up to 4,096
//! pairs.

use bytes::Bytes;
use twincache_protocol::glob;
use twincache_protocol::program::{encode_program, Action, Kind, ScanRequest};
use twincache_protocol::resp::Reply;

use super::{error_reply, in_turn, int, replies, syntax_error, Adapter, Cmd, Family, Group, Spec};
use crate::auth::Access::{Admin, Read};
use crate::session::{Ctx, Step};

const PAIR_SHIFT: u32 = 52;
const WORKER_SHIFT: u32 = 51;
const WORKER_CURSOR: u64 = (1 << WORKER_SHIFT) - 1;
/// Keys KEYS asks a worker for per step.
const KEYS_STEP: u32 = 10_000;

const SPACE: Family = Family::new(Group::Generic, Adapter::Destination);
const SERVER: Family = Family::new(Group::Server, Adapter::Destination);

pub static SPECS: &[Spec] = &[
    SPACE.since("2.8.0").cmd(
        "scan",
        -2,
        Read,
        "Iterates over the key names in the database.",
        scan_args,
    ),
    SPACE.cmd(
        "keys",
        2,
        Read,
        "Returns all key names that match a pattern.",
        |a| Ok(Cmd::Keys(a[1].clone())),
    ),
    SPACE.cmd(
        "randomkey",
        1,
        Read,
        "Returns a random key name from the database.",
        |_| Ok(Cmd::RandomKey),
    ),
    SERVER.fast().cmd(
        "dbsize",
        1,
        Read,
        "Returns the number of keys in the database.",
        |_| Ok(Cmd::DbSize),
    ),
    SERVER.cmd(
        "flushdb",
        -1,
        Admin,
        "Removes all keys from the current database.",
        flush_args,
    ),
    SERVER.cmd(
        "flushall",
        -1,
        Admin,
        "Removes all keys from all databases.",
        flush_args,
    ),
];

/// SCAN's TYPE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeFilter {
    Any,
    Is(Kind),
    /// A type name that is no type here: nothing matches.
    Nothing,
}

/// A parsed SCAN (or HSCAN's options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub cursor: u64,
    pub pattern: Option<Bytes>,
    pub count: u32,
    pub kind: TypeFilter,
}

/// A cursor as Redis reads it (`strtoul`: digits, a sign, no spaces; a minus wraps).
pub fn cursor(arg: &[u8]) -> Result<u64, Reply> {
    let invalid = || Reply::err("ERR invalid cursor");
    let (neg, digits) = match arg.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, arg),
    };
    if digits.iter().any(|b| !b.is_ascii_digit()) || (digits.is_empty() && !arg.is_empty()) {
        return Err(invalid());
    }
    let mut v: u64 = 0;
    for &d in digits {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or_else(invalid)?;
    }
    Ok(if neg { v.wrapping_neg() } else { v })
}

/// `[MATCH pattern] [COUNT count] [TYPE type]` (TYPE only for SCAN).
pub fn scan_options(args: &[Bytes], with_type: bool) -> Result<Scan, Reply> {
    let mut scan = Scan {
        cursor: 0,
        pattern: None,
        count: 10,
        kind: TypeFilter::Any,
    };
    let mut i = 0;
    while i < args.len() {
        let more = i + 1 < args.len();
        let opt = &args[i];
        if opt.eq_ignore_ascii_case(b"count") && more {
            let n = int(&args[i + 1])?;
            if n < 1 {
                return Err(syntax_error());
            }
            scan.count = u32::try_from(n).unwrap_or(u32::MAX);
        } else if opt.eq_ignore_ascii_case(b"match") && more {
            let p = &args[i + 1];
            scan.pattern = (p.as_ref() != b"*").then(|| p.clone());
        } else if opt.eq_ignore_ascii_case(b"type") && with_type && more {
            let t = args[i + 1].to_ascii_lowercase();
            scan.kind = match t.as_slice() {
                b"string" => TypeFilter::Is(Kind::String),
                b"hash" => TypeFilter::Is(Kind::Hash),
                _ => TypeFilter::Nothing,
            };
        } else {
            return Err(syntax_error());
        }
        i += 2;
    }
    Ok(scan)
}

fn scan_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    let cursor = cursor(&args[1])?;
    let mut scan = scan_options(&args[2..], true)?;
    scan.cursor = cursor;
    Ok(Cmd::Scan(scan))
}

fn flush_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    match &args[1..] {
        [] => Ok(Cmd::Flush {
            asynchronous: false,
        }),
        [mode] if mode.eq_ignore_ascii_case(b"async") => Ok(Cmd::Flush { asynchronous: true }),
        [mode] if mode.eq_ignore_ascii_case(b"sync") => Ok(Cmd::Flush {
            asynchronous: false,
        }),
        _ => Err(syntax_error()),
    }
}

/// The position a cluster cursor names: (pair, worker, that worker's cursor).
fn decode_cursor(cursor: u64) -> (usize, usize, u64) {
    (
        (cursor >> PAIR_SHIFT) as usize,
        ((cursor >> WORKER_SHIFT) & 1) as usize,
        cursor & WORKER_CURSOR,
    )
}

fn encode_cursor(pair: usize, worker: usize, at: u64) -> u64 {
    ((pair as u64) << PAIR_SHIFT) | ((worker as u64 & 1) << WORKER_SHIFT) | (at & WORKER_CURSOR)
}

/// The cursor after a step on `pair` that ended at `next` on `worker`.
fn following(pair: usize, pairs: usize, worker: usize, next: u64) -> u64 {
    match next {
        0 if pair + 1 < pairs => encode_cursor(pair + 1, 0, 0),
        0 => 0,
        next => encode_cursor(pair, worker, next),
    }
}

pub(super) fn scan(scan: Scan, ctx: &Ctx) -> Step<Reply> {
    let ctx = ctx.clone();
    in_turn(async move {
        let pairs = ctx.router.pairs().len();
        let (pair, worker, at) = decode_cursor(scan.cursor);
        let answer = |cursor: u64, keys: Vec<Bytes>| {
            Reply::Array(vec![
                Reply::Bulk(Bytes::from(cursor.to_string())),
                Reply::Array(keys.into_iter().map(Reply::Bulk).collect()),
            ])
        };
        let kind = match scan.kind {
            TypeFilter::Nothing => return answer(0, Vec::new()),
            TypeFilter::Any => None,
            TypeFilter::Is(k) => Some(k),
        };
        if pair >= pairs {
            return answer(0, Vec::new());
        }
        let request = ScanRequest {
            cursor: at,
            count: scan.count,
            kind,
            pattern: scan.pattern,
        };
        match ctx
            .router
            .scan_step(pair, worker, request, &ctx.origin)
            .await
        {
            Ok(step) => answer(following(pair, pairs, step.worker, step.next), step.keys),
            Err(resp) => error_reply(&resp),
        }
    })
}

/// KEYS: a whole walk of every pair, gathered into one reply (RESP needs its length first),
/// refused past half the connection's memory limit: SCAN is the way for more.
pub(super) fn keys(pattern: Bytes, ctx: &Ctx) -> Step<Reply> {
    let ctx = ctx.clone();
    let limit = ctx.config.max_connection_buffer / 2;
    in_turn(async move {
        let pattern = (pattern.as_ref() != b"*").then_some(pattern);
        let pairs = ctx.router.pairs().len();
        let (mut keys, mut bytes) = (Vec::new(), 0usize);
        let mut cursor = 0;
        loop {
            let (pair, worker, at) = decode_cursor(cursor);
            let request = ScanRequest {
                cursor: at,
                count: KEYS_STEP,
                kind: None,
                pattern: pattern.clone(),
            };
            let step = match ctx
                .router
                .scan_step(pair, worker, request, &ctx.origin)
                .await
            {
                Ok(step) => step,
                Err(resp) => return error_reply(&resp),
            };
            for k in step.keys {
                bytes += k.len() + 16;
                keys.push(Reply::Bulk(k));
            }
            if bytes > limit {
                return Reply::err(format!(
                    "ERR KEYS would answer more than {limit} bytes (half of \
                     --max-client-buffer); use SCAN"
                ));
            }
            cursor = following(pair, pairs, step.worker, step.next);
            if cursor == 0 {
                break;
            }
        }
        // A key seen twice (its shard walked again after its table grew) is listed once.
        keys.sort_unstable_by(|a, b| match (a, b) {
            (Reply::Bulk(a), Reply::Bulk(b)) => a.cmp(b),
            _ => std::cmp::Ordering::Equal,
        });
        keys.dedup();
        debug_assert!(pattern.as_ref().is_none_or(|p| keys
            .iter()
            .all(|k| matches!(k, Reply::Bulk(k) if glob::matches(p, k)))));
        Reply::Array(keys)
    })
}

/// RANDOMKEY: a random key of a random pair holding keys.
pub(super) fn random_key(ctx: &Ctx) -> Step<Reply> {
    let ctx = ctx.clone();
    in_turn(async move {
        let pairs = ctx.router.pairs().len();
        let first = rand::random::<u32>() as usize % pairs;
        for i in 0..pairs {
            let pair = (first + i) % pairs;
            let program = encode_program(&[Action::RandomKey]);
            let answered = ctx
                .router
                .query_pair(pair, Bytes::new(), program, false, &ctx.origin)
                .await;
            match replies(answered) {
                Ok(r) => match r.into_iter().next() {
                    Some(Reply::Bulk(k)) => return Reply::Bulk(k),
                    _ => continue,
                },
                Err(e) => return e,
            }
        }
        Reply::Nil
    })
}

/// Total keys over all pairs, from each pair's `keys:` counter; `None` if a pair is down.
pub(crate) async fn total_keys(ctx: &Ctx) -> Option<u64> {
    let mut total = 0;
    for stats in ctx.router.pair_stats().await {
        let stats = stats?;
        total += twincache_protocol::info::get(&stats, "keys")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

pub(super) fn dbsize(ctx: &Ctx) -> Step<Reply> {
    let ctx = ctx.clone();
    in_turn(async move {
        match total_keys(&ctx).await {
            Some(n) => Reply::Int(n as i64),
            None => Reply::err("TRYAGAIN a pair has no reachable worker"),
        }
    })
}

pub(super) fn flush(asynchronous: bool, ctx: &Ctx) -> Step<Reply> {
    let ctx = ctx.clone();
    in_turn(async move {
        match ctx.router.flush_all(asynchronous).await {
            Ok(()) => Reply::OK,
            Err(resp) => error_reply(&resp),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_name_pair_worker_and_position() {
        assert_eq!(decode_cursor(0), (0, 0, 0));
        let c = encode_cursor(7, 1, (1 << 50) + 5);
        assert_eq!(decode_cursor(c), (7, 1, (1 << 50) + 5));
        assert_eq!(following(0, 3, 1, 0), encode_cursor(1, 0, 0));
        assert_ne!(
            following(0, 3, 1, 0),
            0,
            "a walk in progress never reads as done"
        );
        assert_eq!(following(2, 3, 1, 0), 0);
        assert_eq!(following(0, 3, 1, 9), encode_cursor(0, 1, 9));
    }

    #[test]
    fn scan_arguments_like_redis() {
        assert_eq!(cursor(b"42"), Ok(42));
        assert_eq!(cursor(b"+7"), Ok(7));
        assert_eq!(cursor(b"-1"), Ok(u64::MAX));
        assert_eq!(cursor(b""), Ok(0));
        for bad in [&b"x"[..], b" 1", b"1 ", b"99999999999999999999", b"-"] {
            assert_eq!(
                cursor(bad),
                Err(Reply::err("ERR invalid cursor")),
                "{bad:?}"
            );
        }
        let a = |l: &[&str]| -> Vec<Bytes> {
            l.iter()
                .map(|s| Bytes::copy_from_slice(s.as_bytes()))
                .collect()
        };
        let s = scan_options(&a(&["MATCH", "u*", "count", "5", "type", "HASH"]), true).unwrap();
        assert_eq!(s.pattern.as_deref(), Some(&b"u*"[..]));
        assert_eq!((s.count, s.kind), (5, TypeFilter::Is(Kind::Hash)));
        assert_eq!(
            scan_options(&a(&["type", "zset"]), true).unwrap().kind,
            TypeFilter::Nothing
        );
        assert_eq!(scan_options(&a(&["count", "0"]), true), Err(syntax_error()));
        assert_eq!(scan_options(&a(&["count"]), true), Err(syntax_error()));
        assert_eq!(
            scan_options(&a(&["type", "hash"]), false),
            Err(syntax_error())
        );
        assert_eq!(
            scan_options(&a(&["count", "x"]), true),
            Err(Reply::err("ERR value is not an integer or out of range"))
        );
        assert_eq!(
            flush_args(&a(&["flushall", "async"])),
            Ok(Cmd::Flush { asynchronous: true })
        );
        assert_eq!(
            flush_args(&a(&["flushall", "async", "x"])),
            Err(syntax_error())
        );
    }
}
