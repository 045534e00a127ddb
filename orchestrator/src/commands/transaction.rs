//! MULTI, EXEC, DISCARD, WATCH, UNWATCH.
//!
//! A transaction's keys must all be on one pair (hash tags, `{user1}:a` and `{user1}:b`,
//! put keys together); a command naming another pair's key is refused with `-CROSSSLOT`, as
//! Redis Cluster does, and the transaction then fails at EXEC with nothing applied. EXEC
//! sends every queued command as one program to the pair's primary, which runs it with all
//! its keys locked and commits its writes together (see the worker's `exec`): atomic on the
//! pair, the partner getting all the changes in one `replicate`. WATCH records each key's
//! version when it is called; EXEC first checks the versions are unchanged (any write,
//! delete or expiry change makes a new one) and otherwise answers nil, writing nothing.
//!
//! As in Redis, only an unknown command or a wrong number of arguments is refused while
//! queueing; any other error (a bad option, a wrong type) is that command's reply within
//! EXEC's. Commands that act on the whole cluster (KEYS, SCAN, FLUSHALL, INFO ...) are
//! refused inside MULTI: they cannot be part of one pair's program.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use twincache_protocol::budget::Charge;
use twincache_protocol::frame::{flags, Op};
use twincache_protocol::program::{encode_program, Action, SetIf, Ttl};
use twincache_protocol::resp::{decode_replies, Reply, ARG_HANDLE};

use super::{
    crossslot, dispatch, error_reply, join_every, replies, Adapter, Cmd, Conn, Family, Group, Spec,
};
use crate::auth::Access::{Connection, Read};
use crate::session::{Ctx, Step};

const TX: Family = Family::new(Group::Transactions, Adapter::Refused)
    .fast()
    .since("1.2.0");

pub static SPECS: &[Spec] = &[
    TX.cmd("multi", 1, Connection, "Starts a transaction.", |_| {
        Ok(Cmd::Multi)
    }),
    TX.cmd(
        "exec",
        1,
        Connection,
        "Executes all commands in a transaction.",
        |_| Ok(Cmd::Exec),
    ),
    TX.cmd("discard", 1, Connection, "Discards a transaction.", |_| {
        Ok(Cmd::Discard)
    }),
    TX.since("2.2.0").keys(super::keys(1, -1, 1)).cmd(
        "watch",
        -2,
        Read,
        "Monitors changes to keys to determine the execution of a transaction.",
        |a| Ok(Cmd::Watch(a[1..].to_vec())),
    ),
    TX.since("2.2.0").cmd(
        "unwatch",
        1,
        Connection,
        "Forgets about watched keys of a transaction.",
        |_| Ok(Cmd::Unwatch),
    ),
];

/// How a queued command's replies become its one reply in EXEC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Combine {
    /// Its one action's reply.
    One,
    /// The sum of its actions' integers (DEL, EXISTS, TOUCH of several keys).
    Sum,
    /// An array of its actions' replies, another type's WRONGTYPE reading as nil (MGET).
    Values,
    /// OK when all are (MSET).
    AllOk,
}

/// A command waiting for EXEC.
#[derive(Debug, Clone)]
enum Queued {
    /// Actions for the pair's program, and how their replies combine.
    Program(Vec<Action>, Combine),
    /// Answered by the orchestrator when EXEC runs (PING, ECHO, TIME, or an error found
    /// while parsing, which Redis too reports in EXEC's reply).
    Local(Cmd),
}

/// A connection's transaction.
#[derive(Debug, Default)]
pub struct Multi {
    pub open: bool,
    /// A command was refused while queueing: EXEC will answer EXECABORT.
    dirty: bool,
    /// The pair every key of the transaction is on.
    pair: Option<usize>,
    queued: Vec<Queued>,
    /// What the queued commands hold, charged to the connection until EXEC or DISCARD.
    charge: Option<Charge>,
    /// Keys WATCHed, with their versions then and whether they were live (filled once
    /// WATCH's answer arrives).
    watched: Arc<Mutex<Vec<(Bytes, u64, bool)>>>,
}

/// Whether a command inside MULTI runs at once rather than being queued (as in Redis).
pub fn runs_at_once(spec: &Spec) -> bool {
    matches!(spec.name, "exec" | "discard" | "multi" | "watch" | "quit")
}

impl Multi {
    /// Marks an open transaction as failed: a command was refused while queueing.
    pub fn refuse_queued(&mut self) {
        if self.open {
            self.dirty = true;
        }
    }

    fn reset(&mut self) {
        let watched = std::mem::take(&mut self.watched);
        *self = Multi::default();
        watched.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn watched(&self) -> Vec<(Bytes, u64, bool)> {
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes `pair` as the transaction's, unless it has another.
    fn on_pair(&mut self, pair: Option<usize>) -> Result<(), Reply> {
        match (self.pair, pair) {
            (Some(a), Some(b)) if a != b => Err(crossslot()),
            (None, Some(b)) => {
                self.pair = Some(b);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Queues a command read inside MULTI (the name and arity are known to be right): its reply
/// is QUEUED, or the error that makes EXEC fail.
pub fn queue(
    spec: &Spec,
    args: &[Bytes],
    parsed: Result<Cmd, Reply>,
    conn: &mut Conn,
    ctx: &Ctx,
) -> Reply {
    let topo = ctx.router.pairs();
    let refused = |multi: &mut Multi, e: Reply| {
        multi.dirty = true;
        e
    };
    let pair = match super::pair_of(spec, args, &topo.slots) {
        Ok(p) => p,
        Err(e) => return refused(&mut conn.multi, e),
    };
    if let Err(e) = conn.multi.on_pair(pair) {
        return refused(&mut conn.multi, e);
    }
    let queued = match parsed {
        Err(e) => Queued::Local(Cmd::Answer(e)),
        Ok(cmd) => match program(cmd) {
            Ok(q) => q,
            Err(e) => return refused(&mut conn.multi, e),
        },
    };
    if let Some(account) = &ctx.origin.account {
        // Its arguments, their handles, and the queued form's own (roughly).
        let size = args.iter().map(|a| a.len() + ARG_HANDLE).sum::<usize>() + 64;
        // A queue the connection could not read EXEC past is refused instead.
        if account.held() + size > account.limit() / 2 {
            return refused(
                &mut conn.multi,
                Reply::err(
                    "ERR the transaction holds more than half the connection's buffer limit (--max-client-buffer)",
                ),
            );
        }
        match &mut conn.multi.charge {
            Some(charge) => charge.add(size),
            None => conn.multi.charge = Some(account.charged(size)),
        }
    }
    conn.multi.queued.push(queued);
    Reply::Simple("QUEUED")
}

/// A command as part of a pair's program.
fn program(cmd: Cmd) -> Result<Queued, Reply> {
    let per_key = |keys: Vec<Bytes>, action: Action, combine| {
        let actions = keys
            .into_iter()
            .flat_map(|k| [Action::Key(k), action.clone()])
            .collect();
        Queued::Program(actions, combine)
    };
    Ok(match cmd {
        Cmd::Answer(_) | Cmd::Time | Cmd::Select => Queued::Local(cmd),
        // Queued in Redis too; EXEC forgets the watched keys anyway.
        Cmd::Unwatch => Queued::Local(Cmd::Answer(Reply::OK)),
        Cmd::Get(k) => per_key(vec![k], Action::Get, Combine::One),
        Cmd::Write(req) if req.op == Op::Set => {
            let ttl = if req.ttl_ms == 0 {
                Ttl::Clear
            } else if req.flags & flags::EXPIRES_AT != 0 {
                Ttl::At(req.ttl_ms as i64)
            } else {
                Ttl::In(req.ttl_ms as i64)
            };
            let set = Action::Set {
                value: req.value,
                ttl,
                cond: SetIf::Always,
                get: false,
            };
            per_key(vec![req.key], set, Combine::One)
        }
        Cmd::Del(keys) => per_key(keys, Action::Del, Combine::Sum),
        Cmd::Exists(keys) => per_key(keys, Action::Exists, Combine::Sum),
        Cmd::Touch(keys) => per_key(keys, Action::Touch, Combine::Sum),
        Cmd::MGet(keys) => per_key(keys, Action::Get, Combine::Values),
        Cmd::MSet(kvs) => Queued::Program(
            kvs.into_iter()
                .flat_map(|(k, v)| {
                    [
                        Action::Key(k),
                        Action::Set {
                            value: v,
                            ttl: Ttl::Clear,
                            cond: SetIf::Always,
                            get: false,
                        },
                    ]
                })
                .collect(),
            Combine::AllOk,
        ),
        Cmd::MSetNx(kvs) => Queued::Program(
            vec![Action::Key(kvs[0].0.clone()), Action::MSetNx(kvs)],
            Combine::One,
        ),
        Cmd::Run(k, action) => per_key(vec![k], action, Combine::One),
        Cmd::Rename { src, dst, nx } => {
            per_key(vec![src], Action::RenameTo { dst, nx }, Combine::One)
        }
        Cmd::Copy { src, dst, replace } => {
            per_key(vec![src], Action::CopyTo { dst, replace }, Combine::One)
        }
        other => {
            return Err(Reply::err(format!(
                "ERR {} inside MULTI is not supported by twincache: a transaction runs on one \
                 pair",
                name_of(&other)
            )))
        }
    })
}

fn name_of(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Keys(_) => "KEYS",
        Cmd::Scan(_) => "SCAN",
        Cmd::RandomKey => "RANDOMKEY",
        Cmd::DbSize => "DBSIZE",
        Cmd::Flush { .. } => "FLUSHALL",
        Cmd::Info(_) => "INFO",
        Cmd::ConfigGet(_) => "CONFIG",
        Cmd::Command(_) => "COMMAND",
        Cmd::Wait => "WAIT",
        Cmd::Cluster(_) => "CLUSTER",
        _ => "this command",
    }
}

/// MULTI, EXEC, DISCARD, WATCH, UNWATCH.
pub(super) fn control(cmd: Cmd, conn: &mut Conn, ctx: &Ctx) -> Step<Reply> {
    match cmd {
        Cmd::Multi if conn.multi.open => {
            Step::Reply(Reply::err("ERR MULTI calls can not be nested"))
        }
        Cmd::Multi => {
            conn.multi.open = true;
            Step::Reply(Reply::OK)
        }
        Cmd::Discard if !conn.multi.open => Step::Reply(Reply::err("ERR DISCARD without MULTI")),
        Cmd::Discard => {
            conn.multi.reset();
            Step::Reply(Reply::OK)
        }
        Cmd::Unwatch => {
            conn.multi
                .watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            if !conn.multi.open {
                conn.multi.pair = None;
            }
            Step::Reply(Reply::OK)
        }
        Cmd::Watch(_) if conn.multi.open => {
            Step::Reply(Reply::err("ERR WATCH inside MULTI is not allowed"))
        }
        Cmd::Watch(keys) => watch(keys, conn, ctx),
        Cmd::Exec if !conn.multi.open => Step::Reply(Reply::err("ERR EXEC without MULTI")),
        Cmd::Exec if conn.multi.dirty => {
            conn.multi.reset();
            Step::Reply(Reply::err(
                "EXECABORT Transaction discarded because of previous errors.",
            ))
        }
        Cmd::Exec => exec(conn, ctx),
        _ => Step::Reply(Reply::err("ERR not a transaction command")),
    }
}

/// Records each key's version now; nothing after WATCH is read until it is answered, so an
/// EXEC behind it sees them.
fn watch(keys: Vec<Bytes>, conn: &mut Conn, ctx: &Ctx) -> Step<Reply> {
    for k in &keys {
        if let Err(e) = conn.multi.on_pair(Some(ctx.router.pair_of(k))) {
            return Step::Reply(e);
        }
    }
    let watched = conn.multi.watched.clone();
    let versions: Vec<_> = keys
        .iter()
        .map(|k| {
            // Read where EXEC will run, the pair's primary: an expired entry is swept at
            // different times on the two partners, so only the same worker's view compares.
            let program = encode_program(&[Action::Version]);
            ctx.router.apply(k.clone(), program, false, &ctx.origin)
        })
        .collect();
    Step::Settle(Box::pin(async move {
        let mut got = Vec::with_capacity(keys.len());
        for (k, answered) in keys.into_iter().zip(join_every(versions).await) {
            let (version, live) = match replies(answered) {
                Ok(r) => match r.first() {
                    Some(Reply::Array(parts)) => match parts.as_slice() {
                        [Reply::Bulk(v), Reply::Int(live)] => (
                            std::str::from_utf8(v)
                                .ok()
                                .and_then(|v| v.parse::<u64>().ok())
                                .unwrap_or(0),
                            *live != 0,
                        ),
                        _ => (0, false),
                    },
                    _ => (0, false),
                },
                Err(e) => return e,
            };
            got.push((k, version, live));
        }
        watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(got);
        Reply::OK
    }))
}

/// Runs the transaction as one program on its pair's primary.
fn exec(conn: &mut Conn, ctx: &Ctx) -> Step<Reply> {
    let resp3 = conn.resp3();
    let watched = conn.multi.watched();
    let queued = std::mem::take(&mut conn.multi.queued);
    conn.multi.reset();
    let mut actions = Vec::new();
    for (k, v, live) in &watched {
        actions.push(Action::Key(k.clone()));
        actions.push(Action::Watch(*v, *live));
    }
    let mut shapes = Vec::with_capacity(queued.len());
    for q in queued {
        match q {
            Queued::Program(a, combine) => {
                let n = a.iter().filter(|a| a.answers()).count();
                actions.extend(a);
                shapes.push(Err((n, combine)));
            }
            Queued::Local(cmd) => shapes.push(Ok(cmd)),
        }
    }
    let key = actions.iter().find_map(|a| match a {
        Action::Key(k) => Some(k.clone()),
        _ => None,
    });
    let run = key.map(|key| {
        ctx.router
            .apply(key, encode_program(&actions), resp3, &ctx.origin)
    });
    dispatch(async move {
        let mut results = match run {
            None => Vec::new().into_iter(),
            Some(run) => match run.await {
                Ok(answer) if answer.aborted => return Reply::NilArray,
                Ok(answer) => match decode_replies(&answer.replies) {
                    Ok(r) => r.into_iter(),
                    Err(e) => return Reply::err(format!("ERR {e}")),
                },
                Err(resp) => return error_reply(&resp),
            },
        };
        let mut out = Vec::with_capacity(shapes.len());
        for shape in shapes {
            out.push(match shape {
                Ok(Cmd::Time) => super::server::time(),
                Ok(Cmd::Answer(r)) => r,
                Ok(_) => Reply::OK,
                Err((n, combine)) => combined(results.by_ref().take(n).collect(), combine),
            });
        }
        Reply::Array(out)
    })
}

fn combined(replies: Vec<Reply>, combine: Combine) -> Reply {
    if let Some(e) = replies
        .iter()
        .find(|r| r.is_error() && combine != Combine::Values)
    {
        return e.clone();
    }
    match combine {
        Combine::One => replies.into_iter().next().unwrap_or(Reply::Nil),
        Combine::Sum => Reply::Int(
            replies
                .iter()
                .map(|r| if let Reply::Int(n) = r { *n } else { 0 })
                .sum(),
        ),
        Combine::Values => Reply::Array(
            replies
                .into_iter()
                .map(|r| if r.is_error() { Reply::Nil } else { r })
                .collect(),
        ),
        Combine::AllOk => Reply::OK,
    }
}
