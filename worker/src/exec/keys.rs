//! Commands on a key whatever its type: EXISTS, TOUCH, TYPE, the TTL reads, OBJECT
//! ENCODING, DEL, the expiry writes (EXPIRE and friends with NX/XX/GT/LT, PERSIST), and
//! the two halves of RENAME and COPY (on one worker, or across pairs by DUMP, RESTORE and a
//! delete that only removes what was copied). Expiry follows Redis 7.0's `expire.c`.

use bytes::Bytes;
use twincache_protocol::program::{Action, ExpireIf, Kind, Ttl, TtlForm};
use twincache_protocol::resp::Reply;

use super::{expiry_abs, Cx, Outcome};

pub(super) fn run(cx: &mut Cx, action: &Action) -> Outcome {
    let meta = cx.txn.meta(cx.key);
    match action {
        Action::Exists => Ok(Reply::Int(i64::from(meta.is_some()))),
        Action::Touch => Ok(Reply::Int(i64::from(cx.txn.touch(cx.key)))),
        Action::Type => Ok(Reply::Line(
            meta.map_or("none", |m| m.kind.name()).to_string(),
        )),
        Action::ReadTtl(form) => Ok(Reply::Int(match meta {
            None => -2,
            Some(m) if m.expires_at == 0 => -1,
            Some(m) => {
                let at = m.expires_at as i64;
                let left = at.saturating_sub(cx.now() as i64).max(0);
                match form {
                    TtlForm::Seconds => (left + 500) / 1000,
                    TtlForm::Millis => left,
                    TtlForm::AtSeconds => (at + 500) / 1000,
                    TtlForm::AtMillis => at,
                }
            }
        })),
        Action::Encoding => Ok(match meta {
            None => Reply::Nil,
            Some(m) if m.kind == Kind::Hash => {
                Reply::Bulk(Bytes::from_static(match cx.txn.layout(cx.key) {
                    Some("records") => b"records",
                    _ => b"packed",
                }))
            }
            Some(_) => Reply::Bulk(Bytes::from_static(
                cx.txn.layout(cx.key).unwrap_or("raw").as_bytes(),
            )),
        }),
        Action::Version => {
            let (version, live) = cx.txn.watch_point(cx.key);
            Ok(Reply::Array(vec![
                Reply::Bulk(Bytes::from(version.to_string())),
                Reply::Int(i64::from(live)),
            ]))
        }
        Action::Dump => Ok(match cx.read()? {
            None => Reply::Nil,
            Some((m, value)) => Reply::Array(vec![
                Reply::Int(m.kind as i64),
                Reply::Int(m.expires_at as i64),
                Reply::Bulk(value),
            ]),
        }),
        Action::Del => {
            if meta.is_some() {
                cx.delete();
            }
            Ok(Reply::Int(i64::from(meta.is_some())))
        }
        Action::Expire(ttl, cond) => expire(cx, *ttl, *cond),
        Action::Persist => match cx.read_form()? {
            Some((m, form)) if m.expires_at != 0 => {
                cx.put_form(m.kind, 0, form);
                Ok(Reply::Int(1))
            }
            _ => Ok(Reply::Int(0)),
        },
        Action::RenameTo { dst, nx } => {
            let Some((m, value)) = cx.read()? else {
                return Err(Reply::err("ERR no such key"));
            };
            if dst == cx.key {
                return Ok(if *nx { Reply::Int(0) } else { Reply::OK });
            }
            if *nx && cx.txn.meta(dst).is_some() {
                return Ok(Reply::Int(0));
            }
            cx.txn.put(dst, m.kind, m.expires_at, value);
            cx.delete();
            Ok(if *nx { Reply::Int(1) } else { Reply::OK })
        }
        Action::CopyTo { dst, replace } => {
            if dst == cx.key {
                return Err(Reply::err(
                    "ERR source and destination objects are the same",
                ));
            }
            let Some((m, value)) = cx.read()? else {
                return Ok(Reply::Int(0));
            };
            if !replace && cx.txn.meta(dst).is_some() {
                return Ok(Reply::Int(0));
            }
            cx.txn.put(dst, m.kind, m.expires_at, value);
            Ok(Reply::Int(1))
        }
        Action::Restore {
            kind,
            expires_at,
            value,
            replace,
        } => {
            if !replace && meta.is_some() {
                return Ok(Reply::Int(0));
            }
            // A large hash is stored, and sent to the partner, as records: those must fit.
            if *kind == Kind::Hash && super::hashes::room_for_packed(cx, value) > cx.max_value {
                return Err(Reply::err(super::TOO_BIG));
            }
            cx.put(*kind, *expires_at, value.clone())?;
            Ok(Reply::Int(1))
        }
        Action::DelIfVersion(v) => {
            let same = meta.is_some() && cx.txn.version(cx.key) == *v;
            if same {
                cx.delete();
            }
            Ok(Reply::Int(i64::from(same)))
        }
        _ => Err(Reply::err("ERR not a key command")),
    }
}

/// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT: 1 when the expiry was set (or the key deleted,
/// for a time already past), 0 when the key is missing or the condition failed.
fn expire(cx: &mut Cx, ttl: Ttl, cond: ExpireIf) -> Outcome {
    let now = cx.now() as i64;
    let when = match ttl {
        Ttl::In(ms) => now.saturating_add(ms),
        Ttl::At(ms) => ms,
        Ttl::Keep | Ttl::Clear => return Err(Reply::err("ERR syntax error")),
    };
    let Some((meta, form)) = cx.read_form()? else {
        return Ok(Reply::Int(0));
    };
    let current = match meta.expires_at {
        0 => None,
        at => Some(at as i64),
    };
    let passes = match cond {
        ExpireIf::Always => true,
        ExpireIf::Nx => current.is_none(),
        ExpireIf::Xx => current.is_some(),
        // No expiry counts as infinite: GT never passes it, LT always does.
        ExpireIf::Gt => current.is_some_and(|c| when > c),
        ExpireIf::Lt => current.is_none_or(|c| when < c),
        ExpireIf::XxLt => current.is_some_and(|c| when < c),
    };
    if !passes {
        return Ok(Reply::Int(0));
    }
    if when <= now {
        cx.delete();
    } else {
        cx.put_form(meta.kind, expiry_abs(when), form);
    }
    Ok(Reply::Int(1))
}
