//! The table as a whole: names, arities and key positions agree, lookups ignore case, and
//! no command's parser panics, whatever its arguments.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

#[test]
fn every_name_is_unique_lowercase_and_found_in_any_case() {
    let mut names: Vec<&str> = all().map(|s| s.name).collect();
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "a command is in the table twice");
    for spec in all() {
        assert_eq!(spec.name, spec.name.to_ascii_lowercase());
        assert!(spec.name.len() <= 32, "lookup reads at most 32 bytes");
        let upper = spec.name.to_ascii_uppercase();
        assert!(std::ptr::eq(lookup(upper.as_bytes()).unwrap(), spec));
    }
    assert!(lookup(b"nosuchcommand").is_none());
    assert!(lookup(&[b'a'; 100]).is_none());
    // GET and SET are found without the table: any case, and nothing else like them.
    assert_eq!(lookup(b"gEt").unwrap().name, "get");
    assert_eq!(lookup(b"SeT").unwrap().name, "set");
    for near in [&b"ge\x14"[..], b"g\x05t", b"\x07et", b"gets", b"ge"] {
        assert!(lookup(near).is_none(), "{near:?}");
    }
}

#[test]
fn key_positions_fit_the_arity() {
    for spec in all().filter(|s| s.native()) {
        let k = spec.keys;
        if k.first == 0 {
            assert_eq!((k.last, k.step), (0, 0), "{}", spec.name);
            continue;
        }
        assert!(k.step >= 1, "{}", spec.name);
        let min_args = spec.arity.unsigned_abs() as i32;
        // A container (OBJECT) has its key after the subcommand: at the minimum arity.
        assert!(
            k.first <= min_args,
            "{}: first key past the minimum arity",
            spec.name
        );
        assert!(k.last < 0 || k.last <= min_args, "{}", spec.name);
    }
    let args: Vec<Bytes> = ["MSET", "a", "1", "b", "2"]
        .iter()
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .collect();
    let keys: Vec<_> = lookup(b"mset").unwrap().keys.of(&args).collect();
    assert_eq!(keys, [&args[1], &args[3]]);
    assert_eq!(lookup(b"ping").unwrap().keys.of(&args).count(), 0);
}

#[test]
fn the_native_commands_cover_the_issue() {
    for name in [
        "setnx",
        "setex",
        "psetex",
        "getset",
        "getdel",
        "getex",
        "msetnx",
        "append",
        "strlen",
        "getrange",
        "substr",
        "setrange",
        "incr",
        "decr",
        "incrby",
        "decrby",
        "incrbyfloat",
        "expire",
        "pexpire",
        "expireat",
        "pexpireat",
        "ttl",
        "pttl",
        "expiretime",
        "pexpiretime",
        "persist",
        "type",
        "touch",
        "keys",
        "scan",
        "randomkey",
        "dbsize",
        "rename",
        "renamenx",
        "copy",
        "flushdb",
        "flushall",
        "time",
        "object",
        "wait",
        "hset",
        "hsetnx",
        "hget",
        "hmget",
        "hgetall",
        "hdel",
        "hexists",
        "hlen",
        "hkeys",
        "hvals",
        "hstrlen",
        "hincrby",
        "hincrbyfloat",
        "hrandfield",
        "hscan",
        "multi",
        "exec",
        "discard",
        "watch",
        "unwatch",
        "hello",
        "config",
        "info",
        "command",
    ] {
        assert!(lookup(name.as_bytes()).is_some_and(Spec::native), "{name}");
    }
}

#[test]
fn wrong_arity_is_redis_text() {
    let args = vec![Bytes::from_static(b"GET")];
    assert_eq!(
        parse(lookup(b"get").unwrap(), &args),
        Err(Reply::err(
            "ERR wrong number of arguments for 'get' command"
        ))
    );
    assert_eq!(
        unknown_command(&[Bytes::from_static(b"foo"), Bytes::from_static(b"a")]),
        Reply::err("ERR unknown command 'foo', with args beginning with: 'a' ")
    );
}

fn arg() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..12),
        Just(b"-1".to_vec()),
        Just(b"0".to_vec()),
        Just(b"9223372036854775807".to_vec()),
        Just(b"-9223372036854775808".to_vec()),
        Just(b"EX".to_vec()),
        Just(b"PX".to_vec()),
        Just(b"NX".to_vec()),
        Just(b"XX".to_vec()),
        Just(b"GT".to_vec()),
        Just(b"LT".to_vec()),
        Just(b"GET".to_vec()),
        Just(b"KEEPTTL".to_vec()),
        Just(b"PERSIST".to_vec()),
        Just(b"MATCH".to_vec()),
        Just(b"COUNT".to_vec()),
        Just(b"TYPE".to_vec()),
        Just(b"WITHVALUES".to_vec()),
        Just(b"AUTH".to_vec()),
        Just(b"SETNAME".to_vec()),
        Just(b"encoding".to_vec()),
        Just(b"get".to_vec()),
    ]
}

proptest! {
    /// Every command's parser, given any arguments, answers a command or an error.
    #[test]
    fn no_parser_panics(which in any::<prop::sample::Index>(), args in proptest::collection::vec(arg(), 0..8)) {
        let specs: Vec<&Spec> = all().filter(|s| s.native()).collect();
        let spec = which.get(&specs);
        let mut full = vec![Bytes::from_static(spec.name.as_bytes())];
        full.extend(args.into_iter().map(Bytes::from));
        let _ = parse(spec, &full);
    }
}
