//! Hash commands: each runs on the pair's worker as one action on the hash (see the
//! worker's `exec::hashes`). A hash is one entry, read and written whole.

use bytes::Bytes;
use twincache_protocol::program::Action;
use twincache_protocol::resp::Reply;

use super::{int, syntax_error, wrong_args, Adapter, Cmd, Family, Group, Spec, ONE_KEY};
use crate::auth::Access::{Read, Write};

const HASH: Family = Family::new(Group::Hash, Adapter::Destination)
    .keys(ONE_KEY)
    .since("2.0.0");

pub static SPECS: &[Spec] = &[
    HASH.fast().cmd("hset", -4, Write, "Creates or modifies the value of a field in a hash.", |a| hset(a, "hset", false)),
    HASH.fast().cmd("hmset", -4, Write, "Sets the values of multiple fields.", |a| hset(a, "hmset", true)),
    HASH.fast().cmd("hsetnx", 4, Write, "Sets the value of a field in a hash only when the field doesn't exist.", |a| Ok(run(a, Action::HSetNx(a[2].clone(), a[3].clone())))),
    HASH.fast().cmd("hget", 3, Read, "Returns the value of a field in a hash.", |a| Ok(run(a, Action::HGet(a[2].clone())))),
    HASH.fast().cmd("hmget", -3, Read, "Returns the values of all fields in a hash.", |a| Ok(run(a, Action::HMGet(a[2..].to_vec())))),
    HASH.cmd("hgetall", 2, Read, "Returns all fields and values in a hash.", |a| Ok(run(a, Action::HGetAll))),
    HASH.fast().cmd("hdel", -3, Write, "Deletes one or more fields and their values from a hash. Deletes the hash if no fields remain.", |a| Ok(run(a, Action::HDel(a[2..].to_vec())))),
    HASH.fast().cmd("hexists", 3, Read, "Determines whether a field exists in a hash.", |a| Ok(run(a, Action::HExists(a[2].clone())))),
    HASH.fast().cmd("hlen", 2, Read, "Returns the number of fields in a hash.", |a| Ok(run(a, Action::HLen))),
    HASH.cmd("hkeys", 2, Read, "Returns all fields in a hash.", |a| Ok(run(a, Action::HKeys))),
    HASH.cmd("hvals", 2, Read, "Returns all values in a hash.", |a| Ok(run(a, Action::HVals))),
    HASH.fast().since("3.2.0").cmd("hstrlen", 3, Read, "Returns the length of the value of a field.", |a| Ok(run(a, Action::HStrLen(a[2].clone())))),
    HASH.fast().cmd("hincrby", 4, Write, "Increments the integer value of a field in a hash by a number. Uses 0 as initial value if the field doesn't exist.", |a| Ok(run(a, Action::HIncrBy(a[2].clone(), int(&a[3])?)))),
    HASH.fast().since("2.6.0").cmd("hincrbyfloat", 4, Write, "Increments the floating point value of a field by a number. Uses 0 as initial value if the field doesn't exist.", |a| Ok(run(a, Action::HIncrByFloat(a[2].clone(), a[3].clone())))),
    HASH.since("6.2.0").cmd("hrandfield", -2, Read, "Returns one or more random fields from a hash.", hrandfield),
    HASH.since("2.8.0").cmd("hscan", -3, Read, "Iterates over fields and values of a hash.", hscan),
];

fn run(args: &[Bytes], action: Action) -> Cmd {
    Cmd::Run(args[1].clone(), action)
}

fn hset(args: &[Bytes], name: &str, ok: bool) -> Result<Cmd, Reply> {
    if args.len() % 2 == 1 {
        return Err(wrong_args(name));
    }
    let pairs = args[2..]
        .chunks(2)
        .map(|fv| (fv[0].clone(), fv[1].clone()))
        .collect();
    Ok(run(args, Action::HSet { pairs, ok }))
}

/// `HRANDFIELD key [count [WITHVALUES]]`, with Redis 7.0's range checks.
fn hrandfield(args: &[Bytes]) -> Result<Cmd, Reply> {
    if args.len() == 2 {
        return Ok(run(
            args,
            Action::HRandField {
                count: None,
                with_values: false,
            },
        ));
    }
    let count = int(&args[2])?;
    if count == i64::MIN {
        return Err(Reply::err(format!(
            "ERR value is out of range, value must between {} and {}",
            -i64::MAX,
            i64::MAX
        )));
    }
    let with_values = match &args[3..] {
        [] => false,
        [w] if w.eq_ignore_ascii_case(b"withvalues") => {
            if !(-i64::MAX / 2..=i64::MAX / 2).contains(&count) {
                return Err(Reply::err("ERR value is out of range"));
            }
            true
        }
        _ => return Err(syntax_error()),
    };
    Ok(run(
        args,
        Action::HRandField {
            count: Some(count),
            with_values,
        },
    ))
}

/// `HSCAN key cursor [MATCH pattern] [COUNT count]`: a small hash's every field in one
/// answer, a large one's about COUNT at a time (the cursor is the worker's). A bad cursor is
/// refused at once; bad options only for a key holding a hash, as Redis does.
fn hscan(args: &[Bytes]) -> Result<Cmd, Reply> {
    let cursor = super::keyspace::cursor(&args[2])?;
    let (pattern, count, error) = match super::keyspace::scan_options(&args[3..], false) {
        // (u32::MAX stands for "no count": an older orchestrator's whole walk.)
        Ok(scan) => (scan.pattern, scan.count.min(u32::MAX - 1), 0),
        Err(e) if e == super::not_integer() => (None, 0, 1),
        Err(_) => (None, 0, 2),
    };
    Ok(run(
        args,
        Action::HScan {
            pattern,
            error,
            cursor,
            count,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::parse_words as parse;

    #[test]
    fn hash_commands_parse_like_redis() {
        assert_eq!(
            parse(&["hset", "h", "f"]),
            Err(Reply::err(
                "ERR wrong number of arguments for 'hset' command"
            ))
        );
        assert_eq!(
            parse(&["hmset", "h", "f", "v", "g"]),
            Err(Reply::err(
                "ERR wrong number of arguments for 'hmset' command"
            ))
        );
        assert!(matches!(
            parse(&["HSET", "h", "f", "v", "g", "w"]),
            Ok(Cmd::Run(_, Action::HSet { pairs, ok: false })) if pairs.len() == 2
        ));
        assert_eq!(
            parse(&["hincrby", "h", "f", "x"]),
            Err(Reply::err("ERR value is not an integer or out of range"))
        );
        assert_eq!(parse(&["hrandfield", "h", "1", "x"]), Err(syntax_error()));
        assert_eq!(
            parse(&["hrandfield", "h", "-9223372036854775808"]),
            Err(Reply::err(
                "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807"
            ))
        );
        assert_eq!(
            parse(&["hrandfield", "h", "-9223372036854775807", "withvalues"]),
            Err(Reply::err("ERR value is out of range"))
        );
        assert_eq!(
            parse(&["hscan", "h", "x"]),
            Err(Reply::err("ERR invalid cursor"))
        );
        assert_eq!(
            parse(&["hscan", "h", "0", "count", "0"]),
            Ok(Cmd::Run(
                Bytes::from_static(b"h"),
                Action::HScan {
                    pattern: None,
                    error: 2,
                    cursor: 0,
                    count: 0,
                }
            ))
        );
        assert_eq!(
            parse(&["hscan", "h", "77", "match", "a*", "count", "5"]),
            Ok(Cmd::Run(
                Bytes::from_static(b"h"),
                Action::HScan {
                    pattern: Some(Bytes::from_static(b"a*")),
                    error: 0,
                    cursor: 77,
                    count: 5,
                }
            ))
        );
    }
}
