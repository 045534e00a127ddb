//! Programs run against a store, without a network: each command family's replies, the
//! version rule, guards, and what the partner is sent.

use bytes::Bytes;
use twincache_protocol::frame::{flags, Op, Request};
use twincache_protocol::program::{
    decode_changes, encode_program, Action, Answer, ExpireIf, Kind, SetIf, Ttl, TtlForm,
};
use twincache_protocol::resp::{decode_replies, Reply};
use twincache_protocol::Status;

use crate::store::{SetOptions, Store};
use crate::sync::SyncState;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Runs `actions` on `key` at `version` as an apply; the worker's answer.
fn answer(store: &Store, key: &str, version: u64, actions: &[Action]) -> Answer {
    let mut req = Request::new(Op::Apply, b(key));
    req.version = version;
    req.value = encode_program(actions);
    let resp = super::run(store, &SyncState::default(), &req, true, None);
    assert_eq!(resp.status, Status::Ok, "{:?}", resp.payload);
    Answer::parse(resp.payload).unwrap()
}

/// Runs `actions` on `key` at `version` as an apply; the replies, and the changes.
fn apply(store: &Store, key: &str, version: u64, actions: Vec<Action>) -> (Vec<Reply>, usize) {
    let answer = answer(store, key, version, &actions);
    let changes = decode_changes(answer.changes).unwrap().len();
    (decode_replies(&answer.replies).unwrap(), changes)
}

fn one(store: &Store, key: &str, version: u64, action: Action) -> Reply {
    apply(store, key, version, vec![action]).0.remove(0)
}

fn err(text: &str) -> Reply {
    Reply::Error(text.into())
}

fn bulk(s: &str) -> Reply {
    Reply::Bulk(b(s))
}

#[test]
fn counters() {
    let s = Store::default();
    assert_eq!(one(&s, "n", 10, Action::IncrBy(1)), Reply::Int(1));
    assert_eq!(one(&s, "n", 11, Action::IncrBy(-5)), Reply::Int(-4));
    assert_eq!(
        one(&s, "n", 12, Action::IncrBy(i64::MIN)),
        err(super::OVERFLOW)
    );
    s.set(b"s", b"12a", 1, SetOptions::default()).unwrap();
    assert_eq!(one(&s, "s", 13, Action::IncrBy(1)), err(super::NOT_INTEGER));
    s.set(b"f", b"10.50", 1, SetOptions::default()).unwrap();
    assert_eq!(
        one(&s, "f", 14, Action::IncrByFloat(b("0.1"))),
        bulk("10.6")
    );
    assert_eq!(
        one(&s, "f", 15, Action::IncrByFloat(b("x"))),
        err(super::NOT_FLOAT)
    );
    assert_eq!(s.get(b"f").unwrap().unwrap(), b("10.6"));
    for bad in ["01", "+1", " 1", "-0", "1 ", "99999999999999999999"] {
        assert_eq!(super::parse_i64(bad.as_bytes()), None, "{bad}");
    }
    assert_eq!(super::parse_i64(b"-9223372036854775808"), Some(i64::MIN));
}

#[test]
fn a_program_behind_the_key_is_refused_with_the_newer_version() {
    let s = Store::default();
    one(&s, "n", 100, Action::IncrBy(1));
    let mut req = Request::new(Op::Apply, b("n"));
    req.version = 100;
    req.value = encode_program(&[Action::IncrBy(1)]);
    let resp = super::run(&s, &SyncState::default(), &req, true, None);
    assert_eq!(resp.status, Status::NotApplied);
    assert_eq!(&resp.payload[..], &100u64.to_be_bytes());
    assert_eq!(s.get(b"n").unwrap().unwrap(), b("1"), "nothing written");
    // Reads never are.
    req.op = Op::Query;
    req.value = encode_program(&[Action::Get]);
    assert_eq!(
        super::run(&s, &SyncState::default(), &req, false, None).status,
        Status::Ok
    );
    req.value = encode_program(&[Action::IncrBy(1)]);
    assert_eq!(
        super::run(&s, &SyncState::default(), &req, false, None).status,
        Status::ParseError,
        "a query cannot write"
    );
}

#[test]
fn an_unsynced_worker_refuses_to_apply() {
    let s = Store::default();
    let mut req = Request::new(Op::Apply, b("n"));
    req.version = 5;
    req.flags = flags::IN_SYNC;
    req.value = encode_program(&[Action::IncrBy(1)]);
    let sync = SyncState::default();
    assert_eq!(
        super::run(&s, &sync, &req, true, None).status,
        Status::Unavailable
    );
    sync.adopt("partial").unwrap();
    assert_eq!(super::run(&s, &sync, &req, true, None).status, Status::Ok);
}

#[test]
fn strings() {
    let s = Store::default();
    let set = |value: &str, ttl, cond, get| Action::Set {
        value: b(value),
        ttl,
        cond,
        get,
    };
    assert_eq!(
        one(&s, "k", 1, set("a", Ttl::Clear, SetIf::Xx, false)),
        Reply::Nil
    );
    assert_eq!(
        one(&s, "k", 2, set("a", Ttl::Clear, SetIf::Nx, true)),
        Reply::Nil
    );
    assert_eq!(
        one(&s, "k", 3, set("b", Ttl::In(10_000), SetIf::Nx, true)),
        bulk("a")
    );
    assert_eq!(
        one(&s, "k", 4, set("c", Ttl::Keep, SetIf::Xx, true)),
        bulk("a")
    );
    assert_eq!(one(&s, "k", 5, Action::Append(b("de"))), Reply::Int(3));
    assert_eq!(one(&s, "k", 6, Action::SetRange(5, b("!"))), Reply::Int(6));
    assert_eq!(one(&s, "k", 7, Action::Get), bulk("cde\0\0!"));
    assert_eq!(one(&s, "k", 8, Action::GetRange(-3, -2)), bulk("\0\0"));
    assert_eq!(one(&s, "k", 9, Action::StrLen), Reply::Int(6));
    assert_eq!(
        one(&s, "k", 10, Action::SetRange(u64::MAX, b("x"))),
        err(super::TOO_BIG)
    );
    assert_eq!(one(&s, "k", 11, Action::GetSet(b("z"))), bulk("cde\0\0!"));
    assert_eq!(one(&s, "k", 12, Action::SetNx(b("y"))), Reply::Int(0));
    assert_eq!(one(&s, "k", 13, Action::GetDel), bulk("z"));
    assert_eq!(one(&s, "k", 14, Action::GetDel), Reply::Nil);
    assert_eq!(one(&s, "k", 15, Action::SetRange(0, b(""))), Reply::Int(0));
    assert!(!s.exists(b"k"), "setting nothing creates nothing");
}

#[test]
fn expiry() {
    let s = Store::default();
    s.set(b"k", b"v", 1, SetOptions::default()).unwrap();
    let ttl = |s: &Store, v| one(s, "k", v, Action::ReadTtl(TtlForm::Millis));
    assert_eq!(ttl(&s, 2), Reply::Int(-1));
    assert_eq!(
        one(&s, "k", 3, Action::Expire(Ttl::In(5000), ExpireIf::Gt)),
        Reply::Int(0)
    );
    assert_eq!(
        one(&s, "k", 4, Action::Expire(Ttl::In(5000), ExpireIf::Lt)),
        Reply::Int(1)
    );
    assert!(matches!(ttl(&s, 5), Reply::Int(ms) if (4000..=5000).contains(&ms)));
    assert_eq!(
        one(&s, "k", 6, Action::Expire(Ttl::In(9000), ExpireIf::Nx)),
        Reply::Int(0)
    );
    assert_eq!(
        one(&s, "k", 7, Action::Expire(Ttl::In(9000), ExpireIf::Gt)),
        Reply::Int(1)
    );
    assert_eq!(one(&s, "k", 8, Action::Persist), Reply::Int(1));
    assert_eq!(one(&s, "k", 9, Action::Persist), Reply::Int(0));
    assert_eq!(
        one(&s, "k", 10, Action::Expire(Ttl::In(-1), ExpireIf::Always)),
        Reply::Int(1)
    );
    assert_eq!(ttl(&s, 11), Reply::Int(-2), "a time past deletes the key");
    assert_eq!(
        one(&s, "k", 12, Action::Expire(Ttl::In(1), ExpireIf::Always)),
        Reply::Int(0)
    );
}

#[test]
fn hashes_and_wrong_types() {
    let s = Store::default();
    let hset = Action::HSet {
        pairs: vec![(b("b"), b("1")), (b("a"), b("x")), (b("b"), b("2"))],
        ok: false,
    };
    assert_eq!(one(&s, "h", 1, hset), Reply::Int(2));
    assert_eq!(
        one(&s, "h", 2, Action::HGetAll),
        Reply::Array(vec![bulk("b"), bulk("2"), bulk("a"), bulk("x")]),
        "RESP2: a flat array, in insertion order"
    );
    assert_eq!(one(&s, "h", 3, Action::HIncrBy(b("b"), 5)), Reply::Int(7));
    assert_eq!(
        one(&s, "h", 4, Action::HIncrBy(b("a"), 5)),
        err("ERR hash value is not an integer")
    );
    assert_eq!(
        one(&s, "h", 5, Action::HIncrByFloat(b("c"), b("1.5"))),
        bulk("1.5")
    );
    assert_eq!(one(&s, "h", 6, Action::HLen), Reply::Int(3));
    assert_eq!(one(&s, "h", 7, Action::Get), err(super::WRONGTYPE));
    assert_eq!(one(&s, "h", 8, Action::Type), Reply::Line("hash".into()));
    let (value, kind) = s.get_typed(b"h").unwrap().unwrap();
    assert_eq!(kind, Kind::Hash);
    assert!(value.is_empty(), "a hash's value is left unopened");
    assert_eq!(s.get(b"h").unwrap().map(|v| v.is_empty()), Some(false));
    assert_eq!(
        one(&s, "h", 9, Action::HDel(vec![b("a"), b("b"), b("c")])),
        Reply::Int(3)
    );
    assert!(!s.exists(b"h"), "an emptied hash is gone");
    s.set(b"str", b"v", 1, SetOptions::default()).unwrap();
    assert_eq!(
        one(&s, "str", 10, Action::HGet(b("f"))),
        err(super::WRONGTYPE)
    );
    assert_eq!(
        one(&s, "str", 11, Action::Type),
        Reply::Line("string".into())
    );
}

#[test]
fn guards_abort_the_whole_program_and_programs_see_their_own_writes() {
    let s = Store::default();
    s.set(b"a", b"1", 5, SetOptions::default()).unwrap();
    let program = vec![
        Action::Key(b("a")),
        Action::Watch(4, true),
        Action::IncrBy(1),
    ];
    let mut req = Request::new(Op::Apply, b("a"));
    req.version = 10;
    req.value = encode_program(&program);
    let answer =
        Answer::parse(super::run(&s, &SyncState::default(), &req, true, None).payload).unwrap();
    assert!(answer.aborted);
    assert_eq!(s.get(b"a").unwrap().unwrap(), b("1"));
    let (replies, changes) = apply(
        &s,
        "a",
        11,
        vec![
            Action::Watch(5, true),
            Action::IncrBy(1),
            Action::Key(b("b")),
            Action::Set {
                value: b("x"),
                ttl: Ttl::Clear,
                cond: SetIf::Always,
                get: false,
            },
            Action::Key(b("a")),
            Action::Get,
            Action::RenameTo {
                dst: b("c"),
                nx: false,
            },
        ],
    );
    let ok = Reply::Line("OK".into());
    assert_eq!(replies, vec![Reply::Int(2), ok.clone(), bulk("2"), ok]);
    assert_eq!(changes, 3, "a (deleted), b, c");
    assert_eq!(s.get(b"c").unwrap().unwrap(), b("2"));
    assert_eq!(s.version(b"c"), Some(11));
}

#[test]
fn replicas_take_changes_newest_version_first() {
    let primary = Store::default();
    let partner = Store::default();
    let mut req = Request::new(Op::Apply, b("n"));
    req.value = encode_program(&[Action::IncrBy(3)]);
    req.version = 20;
    let answer =
        Answer::parse(super::run(&primary, &SyncState::default(), &req, true, None).payload)
            .unwrap();
    let mut rep = Request::new(Op::Replicate, Bytes::new());
    rep.value = answer.changes;
    rep.version = 20;
    // A newer write got to the partner first: it stays.
    partner
        .set(b"n", b"100", 30, SetOptions::default())
        .unwrap();
    let sync = SyncState::default();
    assert_eq!(
        &super::replicate(&partner, &sync, &rep, None).payload[..],
        b"0"
    );
    assert_eq!(partner.get(b"n").unwrap().unwrap(), b("100"));
    let fresh = Store::default();
    assert_eq!(
        &super::replicate(&fresh, &sync, &rep, None).payload[..],
        b"1"
    );
    assert_eq!(fresh.get(b"n").unwrap().unwrap(), b("3"));
    assert_eq!(fresh.version(b"n"), Some(20));
}

/// A read program's replies are bounded by what the request says the orchestrator can
/// carry: past it the worker refuses rather than send an answer too large for a frame.
#[test]
fn query_replies_past_the_cap_are_refused() {
    let s = Store::default();
    s.set(b"a", &[b'x'; 600], 1, SetOptions::default()).unwrap();
    s.set(b"b", &[b'y'; 600], 1, SetOptions::default()).unwrap();
    let program = vec![Action::Get, Action::Key(b("b")), Action::Get];
    let mut req = Request::new(Op::Query, b("a"));
    req.value = encode_program(&program);
    req.ttl_ms = 2000;
    let resp = super::run(&s, &SyncState::default(), &req, false, None);
    assert_eq!(resp.status, Status::Ok);
    let replies = decode_replies(&Answer::parse(resp.payload).unwrap().replies).unwrap();
    assert_eq!(replies.len(), 2);
    req.ttl_ms = 1000;
    let resp = super::run(&s, &SyncState::default(), &req, false, None);
    assert_eq!(resp.status, Status::TooLarge);
}

/// A GET in a program (MGET's reads, a GET inside MULTI) counts in the keyspace hits and
/// misses, as a plain GET does.
#[test]
fn program_gets_count_keyspace_hits_and_misses() {
    use std::sync::atomic::Ordering::Relaxed;
    let s = Store::default();
    s.set(b"a", b"1", 1, SetOptions::default()).unwrap();
    let mut req = Request::new(Op::Query, b("a"));
    req.value = encode_program(&[Action::Get, Action::Key(b("nope")), Action::Get]);
    let resp = super::run(&s, &SyncState::default(), &req, false, None);
    assert_eq!(resp.status, Status::Ok);
    assert_eq!(
        (
            s.counters.hits.load(Relaxed),
            s.counters.misses.load(Relaxed)
        ),
        (1, 1)
    );
}

/// Runs `action` on `key` as an apply on `primary` and copies its changes to `partner` as
/// a `replicate` would; the reply, and whether the copy was in the stored (records) form.
fn apply_and_copy(
    primary: &Store,
    partner: &Store,
    key: &str,
    version: u64,
    action: Action,
) -> (Reply, bool) {
    let answer = answer(primary, key, version, &[action]);
    let changes = decode_changes(answer.changes).unwrap();
    let stored = changes
        .iter()
        .any(twincache_protocol::program::Change::is_stored);
    partner.replicate(&changes, version, None).unwrap();
    (decode_replies(&answer.replies).unwrap().remove(0), stored)
}

/// HGETALL's pairs, sorted (a large hash answers in its records' order).
fn all_fields(store: &Store, key: &str) -> Vec<(Bytes, Bytes)> {
    let Reply::Array(items) = one(store, key, 1, Action::HGetAll) else {
        panic!("HGETALL answers an array");
    };
    let mut pairs: Vec<(Bytes, Bytes)> = items
        .chunks(2)
        .map(|p| match p {
            [Reply::Bulk(f), Reply::Bulk(v)] => (f.clone(), v.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    pairs.sort();
    pairs
}

#[test]
fn a_large_hash_is_kept_as_records_and_copied_as_they_are() {
    for cipher in [None, Some(crate::seal::Cipher::new(&[3; 32]))] {
        let primary = Store::new(cipher.clone(), 0);
        let partner = Store::new(cipher.clone(), 0);
        let mut model = std::collections::BTreeMap::new();
        let pairs: Vec<(Bytes, Bytes)> = (0..200)
            .map(|i| (b(&format!("field:{i}")), b(&format!("value {i}"))))
            .collect();
        model.extend(pairs.iter().cloned());
        let hset = |pairs: Vec<(Bytes, Bytes)>| Action::HSet { pairs, ok: false };
        let (reply, stored) = apply_and_copy(&primary, &partner, "h", 10, hset(pairs));
        assert_eq!((reply, stored), (Reply::Int(200), true));
        assert_eq!(one(&primary, "h", 1, Action::Encoding), bulk("records"));
        assert_eq!(one(&partner, "h", 1, Action::Encoding), bulk("records"));

        // One field at a time, each copied in the stored form.
        let steps = [
            (hset(vec![(b("field:7"), b("new"))]), Reply::Int(0)),
            (hset(vec![(b("extra"), b("1"))]), Reply::Int(1)),
            (Action::HIncrBy(b("extra"), 41), Reply::Int(42)),
            (Action::HSetNx(b("field:8"), b("no")), Reply::Int(0)),
            (Action::HSetNx(b("fresh"), b("yes")), Reply::Int(1)),
            (Action::HDel(vec![b("field:9"), b("absent")]), Reply::Int(1)),
            (
                Action::Expire(Ttl::In(3_600_000), ExpireIf::Always),
                Reply::Int(1),
            ),
        ];
        for (i, (action, want)) in steps.into_iter().enumerate() {
            let (reply, stored) = apply_and_copy(&primary, &partner, "h", 20 + i as u64, action);
            let writes = i != 3; // HSETNX of a field present writes nothing
            assert_eq!((reply, stored), (want, writes), "step {i}");
        }
        model.insert(b("field:7"), b("new"));
        model.insert(b("extra"), b("42"));
        model.insert(b("fresh"), b("yes"));
        model.remove(&b("field:9"));
        let model: Vec<(Bytes, Bytes)> = model.into_iter().collect();
        assert_eq!(all_fields(&primary, "h"), model);
        assert_eq!(all_fields(&partner, "h"), model);
        assert_eq!(primary.version(b"h"), partner.version(b"h"));
        assert_eq!(one(&partner, "h", 1, Action::HLen), Reply::Int(201));
        assert_eq!(
            one(&partner, "h", 1, Action::HGet(b("field:7"))),
            bulk("new")
        );
        assert_eq!(
            one(&partner, "h", 1, Action::HStrLen(b("fresh"))),
            Reply::Int(3)
        );
        assert_eq!(
            one(
                &partner,
                "h",
                1,
                Action::HMGet(vec![b("extra"), b("field:9")])
            ),
            Reply::Array(vec![bulk("42"), Reply::Nil])
        );
        assert!(matches!(
            one(&partner, "h", 1, Action::ReadTtl(TtlForm::Seconds)),
            Reply::Int(3599..=3600)
        ));
        assert_eq!(one(&partner, "h", 1, Action::Encoding), bulk("records"));

        // A program reads its own edits, and edits them again.
        let (replies, changes) = apply(
            &primary,
            "h",
            30,
            vec![
                hset(vec![(b("own"), b("1"))]),
                Action::HGet(b("own")),
                Action::HIncrBy(b("own"), 1),
                Action::HDel(vec![b("own")]),
                Action::HLen,
            ],
        );
        assert_eq!(
            replies,
            vec![
                Reply::Int(1),
                bulk("1"),
                Reply::Int(2),
                Reply::Int(1),
                Reply::Int(201)
            ]
        );
        assert_eq!(changes, 1);

        // A snapshot's entry merges as it is, and reads the same.
        let fresh = Store::new(cipher.clone(), 0);
        for n in 0..Store::SHARDS {
            primary.snapshot_shard(n, |raw| {
                fresh.merge(raw).unwrap();
            });
        }
        assert_eq!(all_fields(&fresh, "h"), model);

        // Emptied field by field, the hash is gone on both.
        let names: Vec<Bytes> = model.iter().map(|(f, _)| f.clone()).collect();
        let (reply, _) = apply_and_copy(&primary, &partner, "h", 40, Action::HDel(names));
        assert_eq!(reply, Reply::Int(201));
        assert!(!primary.exists(b"h") && !partner.exists(b"h"));
    }
}

/// A 200-field hash `h` written on `primary` at version 10 and copied to `partner`;
/// whether the copy was in the stored form.
fn large_hash(primary: &Store, partner: &Store) -> bool {
    let pairs = (0..200).map(|i| (b(&format!("f{i}")), b("v"))).collect();
    let hset = Action::HSet { pairs, ok: true };
    apply_and_copy(primary, partner, "h", 10, hset).1
}

#[test]
fn a_partner_with_a_key_refuses_plain_records() {
    let primary = Store::default();
    let partner = Store::new(Some(crate::seal::Cipher::new(&[3; 32])), 0);
    assert!(large_hash(&primary, &partner));
    assert!(!partner.exists(b"h"));
    assert_eq!(
        partner
            .counters
            .refused_unsealed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn an_edit_the_partner_cannot_take_is_refused_and_the_key_sent_whole() {
    let primary = Store::default();
    let partner = Store::default();
    assert!(large_hash(&primary, &partner));
    let set = |f: &str| Action::HSet {
        pairs: vec![(b(f), b("new"))],
        ok: false,
    };
    let changes = |version, action| {
        decode_changes(answer(&primary, "h", version, &[action]).changes).unwrap()
    };
    let first = changes(20, set("f1"));
    let second = changes(30, set("extra"));
    assert!(first[0].is_patch() && second[0].is_patch());
    assert!(second[0].value.len() < 100, "an edit, not the hash");

    // The second edit arrives first: the partner lacks the version it edits.
    assert!(matches!(
        partner.replicate(&second, 30, None),
        Err(crate::store::NotTaken::Behind)
    ));
    assert_eq!(partner.version(b"h"), Some(10));
    // The key goes whole, at the version the primary holds it.
    let mut export = Request::new(Op::Query, b("h"));
    export.value = encode_program(&[Action::Export]);
    let resp = super::run(&primary, &SyncState::default(), &export, false, None);
    assert_eq!(resp.status, Status::Ok);
    let answer = Answer::parse(resp.payload).unwrap();
    assert_eq!(answer.version, 30);
    let whole = decode_changes(answer.changes).unwrap();
    assert!(whole[0].is_stored() && !whole[0].is_patch());
    assert_eq!(partner.replicate(&whole, answer.version, None).unwrap(), 1);
    // The first edit, late, is older than what the partner holds now.
    assert_eq!(partner.replicate(&first, 20, None).unwrap(), 0);
    assert_eq!(all_fields(&partner, "h"), all_fields(&primary, "h"));
    assert_eq!(partner.version(b"h"), primary.version(b"h"));

    // A key with no entry exports nothing; a deleted one, its delete.
    let mut export = Request::new(Op::Query, b("absent"));
    export.value = encode_program(&[Action::Export]);
    let resp = super::run(&primary, &SyncState::default(), &export, false, None);
    assert!(Answer::parse(resp.payload).unwrap().changes.is_empty());
    primary.del(b"h", 40);
    let mut export = Request::new(Op::Query, b("h"));
    export.value = encode_program(&[Action::Export]);
    let resp = super::run(&primary, &SyncState::default(), &export, false, None);
    let answer = Answer::parse(resp.payload).unwrap();
    let gone = decode_changes(answer.changes).unwrap();
    assert_eq!((answer.version, gone[0].value_kind()), (40, None));
    partner.replicate(&gone, answer.version, None).unwrap();
    assert!(!partner.exists(b"h"));
}

/// The replies of `actions` on `key` at `version` with writes capped at `max_value` bytes
/// (what an orchestrator's frame can carry).
fn capped(
    store: &Store,
    key: &str,
    version: u64,
    max_value: u64,
    actions: &[Action],
) -> Vec<Reply> {
    let mut req = Request::new(Op::Apply, b(key));
    req.version = version;
    req.ttl_ms = max_value;
    req.value = encode_program(actions);
    let resp = super::run(store, &SyncState::default(), &req, true, None);
    assert_eq!(resp.status, Status::Ok, "{:?}", resp.payload);
    decode_replies(&Answer::parse(resp.payload).unwrap().replies).unwrap()
}

#[test]
fn a_restored_hash_is_refused_when_its_records_would_not_fit_a_frame() {
    let pairs: Vec<(Bytes, Bytes)> = (0..200).map(|i| (b(&format!("f{i:03}")), b("v"))).collect();
    let packed = super::codec::encode(&pairs);
    // The packed hash fits the cap; its records form (the partner's copy) does not.
    let cap = packed.len() as u64 + 100;
    let too_big = Reply::err(super::TOO_BIG);
    let store = Store::default();
    let hset = Action::HSet {
        pairs: pairs.clone(),
        ok: true,
    };
    assert_eq!(capped(&store, "h", 10, cap, &[hset]), vec![too_big.clone()]);
    let restore = Action::Restore {
        kind: Kind::Hash,
        expires_at: 0,
        value: packed,
        replace: true,
    };
    assert_eq!(capped(&store, "h", 20, cap, &[restore]), vec![too_big]);
    assert!(!store.exists(b"h"));
}

#[test]
fn get_reads_every_stored_form_as_a_bulk_string() {
    let text = "{\"name\":\"alice\",\"tags\":[\"a\",\"b\"]}".repeat(40);
    let noise = crate::seal::noise(40_000);
    for cipher in [None, Some(crate::seal::Cipher::new(&[3; 32]))] {
        let encrypted = cipher.is_some();
        let s = Store::new(cipher, 0);
        // Raw (short), lz4 (long and alike), raw again (long noise, left uncompressed).
        for (key, value, layout) in [
            ("short", &b"v"[..], "raw"),
            ("text", text.as_bytes(), "compressed"),
            ("noise", &noise[..], "raw"),
        ] {
            s.set(key.as_bytes(), value, 1, SetOptions::default())
                .unwrap();
            let stored = s.txn([key.as_bytes()]).layout(key.as_bytes());
            assert_eq!(
                stored,
                Some(if encrypted { "encrypted" } else { layout }),
                "{key}"
            );
            let read = one(&s, key, 2, Action::Get);
            assert_eq!(read, Reply::Bulk(Bytes::copy_from_slice(value)), "{key}");
        }
        one(
            &s,
            "h",
            3,
            Action::HSet {
                pairs: vec![(b("f"), b("1"))],
                ok: false,
            },
        );
        let (replies, _) = apply(
            &s,
            "short",
            4,
            vec![
                Action::Get,
                Action::Set {
                    value: b("staged"),
                    ttl: Ttl::Clear,
                    cond: SetIf::Always,
                    get: false,
                },
                Action::Get,
                Action::Key(b("h")),
                Action::Get,
                Action::Key(b("absent")),
                Action::Get,
            ],
        );
        let ok = Reply::Line("OK".into());
        let expected = [
            bulk("v"),
            ok,
            bulk("staged"),
            err(super::WRONGTYPE),
            Reply::Nil,
        ];
        assert_eq!(replies, expected);
    }
    // A miss reads as RESP3's null to a RESP3 client.
    let s = Store::default();
    let mut req = Request::new(Op::Query, b("absent"));
    req.flags = flags::RESP3;
    req.value = encode_program(&[Action::Get]);
    let resp = super::run(&s, &SyncState::default(), &req, false, None);
    assert_eq!(&Answer::parse(resp.payload).unwrap().replies[..], b"_\r\n");
}

/// APPEND and SETRANGE leave a long string in segments: each write after the first that
/// makes them goes to the partner as an edit of a few segments, not the string, and every
/// reader (GET, MGET, GETRANGE, STRLEN, GETDEL, RENAME, a snapshot) sees the string whole.
#[test]
fn a_long_string_is_appended_to_in_segments_and_copied_as_edits() {
    use crate::seal::segments::{SEGMENT, SEGMENTED_FROM};
    for cipher in [None, Some(crate::seal::Cipher::new(&[5; 32]))] {
        let primary = Store::new(cipher.clone(), 0);
        let partner = Store::new(cipher.clone(), 0);
        let mut model: Vec<u8> = Vec::new();
        let mut version = 10;
        let mut edits = 0;
        let chunk = |i: usize| Bytes::from(vec![b'a' + (i % 26) as u8; 1000]);
        // Past the threshold, then a few segments more.
        for i in 0..(SEGMENTED_FROM + 3 * SEGMENT) / 1000 {
            let tail = chunk(i);
            model.extend_from_slice(&tail);
            let answer = answer(&primary, "log", version, &[Action::Append(tail)]);
            let changes = decode_changes(answer.changes).unwrap();
            let reply = decode_replies(&answer.replies).unwrap().remove(0);
            assert_eq!(reply, Reply::Int(model.len() as i64));
            if changes[0].is_patch() {
                edits += 1;
                assert!(
                    changes[0].value.len() < 3 * SEGMENT,
                    "an edit, not the string"
                );
            }
            assert_eq!(partner.replicate(&changes, version, None).unwrap(), 1);
            version += 1;
        }
        assert!(edits > 3, "{edits} edits");
        for store in [&primary, &partner] {
            assert_eq!(store.get(b"log").unwrap().unwrap(), &model[..]);
            assert_eq!(one(store, "log", 1, Action::Encoding), bulk("segments"));
            assert_eq!(
                one(store, "log", 1, Action::StrLen),
                Reply::Int(model.len() as i64)
            );
            let want = Bytes::copy_from_slice(&model[SEGMENT - 5..2 * SEGMENT + 7]);
            let (from, to) = (SEGMENT as i64 - 5, 2 * SEGMENT as i64 + 6);
            assert_eq!(
                one(store, "log", 1, Action::GetRange(from, to)),
                Reply::Bulk(want)
            );
            assert_eq!(
                one(store, "log", 1, Action::GetRange(-3, -1)),
                Reply::Bulk(Bytes::copy_from_slice(&model[model.len() - 3..]))
            );
            assert_eq!(
                one(store, "log", 1, Action::Get),
                Reply::Bulk(Bytes::from(model.clone()))
            );
        }
        assert_eq!(primary.version(b"log"), partner.version(b"log"));

        // SETRANGE inside, and past the end (zeros fill the gap), edited in place.
        let (reply, stored) = apply_and_copy(
            &primary,
            &partner,
            "log",
            version,
            Action::SetRange(3, b("XYZ")),
        );
        assert_eq!((reply, stored), (Reply::Int(model.len() as i64), true));
        model[3..6].copy_from_slice(b"XYZ");
        let far = model.len() + SEGMENT + 10;
        let (reply, _) = apply_and_copy(
            &primary,
            &partner,
            "log",
            version + 1,
            Action::SetRange(far as u64, b("end")),
        );
        model.resize(far, 0);
        model.extend_from_slice(b"end");
        assert_eq!(reply, Reply::Int(model.len() as i64));
        // A new expiry keeps the segments where they are, and sends an empty edit.
        let expire = Action::Expire(Ttl::In(3_600_000), ExpireIf::Always);
        let (reply, stored) = apply_and_copy(&primary, &partner, "log", version + 2, expire);
        assert_eq!((reply, stored), (Reply::Int(1), true));
        assert!(matches!(
            one(&partner, "log", 1, Action::ReadTtl(TtlForm::Seconds)),
            Reply::Int(3599..=3600)
        ));
        assert_eq!(partner.get(b"log").unwrap().unwrap(), &model[..]);
        version += 1;
        // GET (MULTI's, MGET's) of what a program staged in segments; GETEX keeps them.
        let tail = b("+");
        let (replies, _) = apply(
            &primary,
            "log",
            version + 2,
            vec![Action::Append(tail), Action::Get],
        );
        model.push(b'+');
        assert_eq!(
            replies,
            vec![
                Reply::Int(model.len() as i64),
                Reply::Bulk(Bytes::from(model.clone()))
            ]
        );
        let getex = Action::GetEx(Ttl::In(7_200_000), 0);
        let (replies, _) = apply(&primary, "log", version + 3, vec![getex, Action::Get]);
        assert_eq!(replies, vec![Reply::Bulk(Bytes::from(model.clone())); 2]);
        assert_eq!(one(&primary, "log", 1, Action::Encoding), bulk("segments"));
        let fresh_key = Action::Append(Bytes::from(vec![b'n'; SEGMENTED_FROM]));
        let (replies, _) = apply(
            &primary,
            "new",
            version + 4,
            vec![fresh_key, Action::Get, Action::StrLen],
        );
        assert_eq!(
            replies[1],
            Reply::Bulk(Bytes::from(vec![b'n'; SEGMENTED_FROM]))
        );
        assert_eq!(replies[2], Reply::Int(SEGMENTED_FROM as i64));
        version += 3;
        partner
            .set(b"log", &model, version, SetOptions::default())
            .unwrap();
        // A program reads its own segmented writes.
        let (replies, _) = apply(
            &primary,
            "log",
            version + 2,
            vec![
                Action::Append(b("!")),
                Action::StrLen,
                Action::GetRange(-4, -1),
            ],
        );
        assert_eq!(
            replies,
            vec![
                Reply::Int(model.len() as i64 + 1),
                Reply::Int(model.len() as i64 + 1),
                bulk("nd+!")
            ]
        );
        model.push(b'!');
        assert_eq!(
            partner.get(b"log").unwrap().unwrap(),
            &model[..model.len() - 1]
        );

        // A snapshot's entry merges as it is; RENAME and GETDEL see the whole string.
        let fresh = Store::new(cipher.clone(), 0);
        for n in 0..Store::SHARDS {
            primary.snapshot_shard(n, |raw| {
                fresh.merge(raw).unwrap();
            });
        }
        assert_eq!(fresh.get(b"log").unwrap().unwrap(), &model[..]);
        let rename = Action::RenameTo {
            dst: b("moved"),
            nx: false,
        };
        apply(&fresh, "log", version + 3, vec![rename]);
        assert_eq!(
            one(&fresh, "moved", version + 4, Action::GetDel),
            Reply::Bulk(Bytes::from(model.clone()))
        );

        // A string written whole by SET stays whole.
        primary
            .set(b"plain", &model, version + 5, SetOptions::default())
            .unwrap();
        assert_ne!(
            one(&primary, "plain", 1, Action::Encoding),
            bulk("segments")
        );
    }
}

/// HSCAN pages through a large hash COUNT records at a time from a cursor: every field
/// present throughout the walk comes back once, whatever is set and removed meanwhile; a
/// small hash answers whole, whatever the cursor.
#[test]
fn hscan_walks_a_large_hash_in_steps() {
    let s = Store::default();
    let pairs: Vec<(Bytes, Bytes)> = (0..1000)
        .map(|i| (b(&format!("f{i}")), b(&format!("v{i}"))))
        .collect();
    one(&s, "h", 10, Action::HSet { pairs, ok: false });
    let scan = |cursor: u64, count: u32, pattern: Option<&str>| {
        let action = Action::HScan {
            pattern: pattern.map(b),
            error: 0,
            cursor,
            count,
        };
        match one(&s, "h", 1, action) {
            Reply::Array(mut parts) => {
                let Reply::Array(items) = parts.pop().unwrap() else {
                    panic!("items")
                };
                let Reply::Bulk(next) = parts.pop().unwrap() else {
                    panic!("cursor")
                };
                let next: u64 = std::str::from_utf8(&next).unwrap().parse().unwrap();
                let fields: Vec<Bytes> = items
                    .chunks(2)
                    .map(|p| match &p[0] {
                        Reply::Bulk(f) => f.clone(),
                        other => panic!("{other:?}"),
                    })
                    .collect();
                (next, fields)
            }
            other => panic!("{other:?}"),
        }
    };
    let mut seen = std::collections::HashMap::new();
    let (mut cursor, mut steps, mut version) = (0, 0, 20);
    loop {
        let (next, fields) = scan(cursor, 37, None);
        assert!(fields.len() < 60, "{} fields in one step", fields.len());
        for f in fields {
            *seen.entry(f).or_insert(0) += 1;
        }
        // Meanwhile: fields added, and fields f900.. removed.
        let pairs = vec![(b(&format!("new{steps}")), b("x"))];
        one(&s, "h", version, Action::HSet { pairs, ok: false });
        one(
            &s,
            "h",
            version + 1,
            Action::HDel(vec![b(&format!("f{}", 900 + steps))]),
        );
        version += 2;
        steps += 1;
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    assert!(steps > 20, "{steps} steps");
    for i in 0..900 {
        assert_eq!(seen.get(&b(&format!("f{i}"))), Some(&1), "f{i}");
    }
    assert!(seen.values().all(|&n| n == 1));
    // A pattern that makes every field cost (a run of 1,000 literals after a `*`, against
    // fields of 1,000 bytes) ends a step at its time budget, with a cursor to go on from.
    let long = "a".repeat(1000);
    let pairs = (0..300)
        .map(|i| (b(&format!("{long}{i}")), b("v")))
        .collect();
    one(&s, "costly", 10, Action::HSet { pairs, ok: false });
    let costly = Action::HScan {
        pattern: Some(b(&format!("*{long}1*"))),
        error: 0,
        cursor: 0,
        count: 100_000,
    };
    let started = std::time::Instant::now();
    let Reply::Array(parts) = one(&s, "costly", 1, costly) else {
        panic!("HSCAN answers an array")
    };
    let took = started.elapsed();
    assert_ne!(parts[0], bulk("0"), "stopped early ({took:?})");
    assert!(took < 10 * crate::store::STEP_TIME, "{took:?}");
    // No MATCH and a huge COUNT: a step still ends at its budget. Fields that cost to open
    // (64 KiB of noise each, encrypted), so the whole hash takes longer than a step in a
    // debug build, and about as long in an optimized one.
    let keyed = Store::new(Some(crate::seal::Cipher::new(&[9; 32])), 0);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let pairs = (0..200)
        .map(|i| {
            let noise: Vec<u8> = (0..64 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (b(&format!("g{i}")), Bytes::from(noise))
        })
        .collect();
    one(&keyed, "wide", 10, Action::HSet { pairs, ok: false });
    let whole = Action::HScan {
        pattern: None,
        error: 0,
        cursor: 0,
        count: u32::MAX - 1,
    };
    let started = std::time::Instant::now();
    let Reply::Array(parts) = one(&keyed, "wide", 1, whole) else {
        panic!("HSCAN answers an array")
    };
    let took = started.elapsed();
    assert!(took < 10 * crate::store::STEP_TIME, "{took:?}");
    assert!(
        parts[0] != bulk("0") || took < 2 * crate::store::STEP_TIME,
        "a whole walk in one step took {took:?}"
    );
    // MATCH, and a cursor past every tag.
    let (_, some) = scan(0, u32::MAX, Some("f1?"));
    assert_eq!(some.len(), 10);
    assert_eq!(scan((1 << 32) + 5, 10, None), (0, Vec::new()));
    // A small hash: all of it, cursor 0, whatever cursor it was given.
    let pairs = vec![(b("a"), b("1")), (b("b"), b("2"))];
    one(&s, "small", 10, Action::HSet { pairs, ok: false });
    let action = Action::HScan {
        pattern: None,
        error: 0,
        cursor: 12345,
        count: 1,
    };
    assert_eq!(
        one(&s, "small", 1, action),
        Reply::Array(vec![
            bulk("0"),
            Reply::Array(vec![bulk("a"), bulk("1"), bulk("b"), bulk("2")])
        ])
    );
}

/// Runs `actions` on `key` at `version` as an apply with `flags` (and `BASES`); the answer.
fn flagged(store: &Store, key: &str, version: u64, flags: u8, actions: &[Action]) -> Answer {
    let mut req = Request::new(Op::Apply, b(key));
    req.version = version;
    req.flags = flags | flags::BASES;
    req.value = encode_program(actions);
    let resp = super::run(store, &SyncState::default(), &req, true, None);
    assert_eq!(resp.status, Status::Ok, "{:?}", resp.payload);
    Answer::parse(resp.payload).unwrap()
}

/// The copy of `answer` to `partner`, with its bases, as the orchestrator sends it.
fn copy_based(partner: &Store, sync: &SyncState, answer: &Answer, version: u64) -> Status {
    let mut req = Request::new(Op::Replicate, answer.bases.clone());
    req.version = version;
    req.flags = flags::BASES;
    req.value = answer.changes.clone();
    super::replicate(partner, sync, &req, None).status
}

/// A primary and its partner both holding n = 1 at version 10, as a program's copy leaves
/// them, with the partner's sync state.
fn both_hold_one() -> (Store, Store, SyncState) {
    let (primary, partner) = (Store::default(), Store::default());
    let sync = SyncState::default();
    let first = flagged(&primary, "n", 10, 0, &[Action::IncrBy(1)]);
    assert_eq!(copy_based(&partner, &sync, &first, 10), Status::Ok);
    (primary, partner, sync)
}

#[test]
fn a_copy_computed_without_a_write_the_partner_took_alone_is_refused_and_loses() {
    let (primary, partner, sync) = both_hold_one();
    let incr = [Action::IncrBy(1)];
    // An INCR failed over to the partner, the primary missing it (another orchestrator's
    // view), and one the primary computed without it.
    let alone = flagged(&partner, "n", 20, flags::SOLO, &incr);
    assert_eq!(decode_replies(&alone.replies).unwrap(), vec![Reply::Int(2)]);
    let behind = flagged(&primary, "n", 30, 0, &incr);
    assert_eq!(
        decode_replies(&behind.replies).unwrap(),
        vec![Reply::Int(2)]
    );
    assert_eq!(copy_based(&partner, &sync, &behind, 30), Status::Diverged);
    // Nothing taken, nothing changed on the partner.
    assert_eq!(partner.get(b"n").unwrap().unwrap(), b("2"));
    assert_eq!(partner.version(b"n"), Some(20));
    // The orchestrator revokes the change on the primary, which then refills: the
    // partner's value comes back (newer than nothing), not the refused one (newer than it).
    assert_eq!(revoke(&primary, &behind, 30), 1);
    assert_eq!(
        revoke(&primary, &behind, 30),
        0,
        "only the write of that version"
    );
    refill(&primary, &partner);
    assert_eq!(primary.get(b"n").unwrap().unwrap(), b("2"));
    // Computed from what it took, the next copy is taken, and clears the mark.
    let next = flagged(&primary, "n", 40, 0, &incr);
    assert_eq!(decode_replies(&next.replies).unwrap(), vec![Reply::Int(3)]);
    assert_eq!(copy_based(&partner, &sync, &next, 40), Status::Ok);
    assert_eq!(partner.get(b"n").unwrap().unwrap(), b("3"));
    // Copies without bases (an older orchestrator) are taken as before.
    flagged(&partner, "n", 50, flags::SOLO, &incr);
    let behind = answer(&primary, "n", 60, &incr);
    let changes = decode_changes(behind.changes).unwrap();
    assert_eq!(partner.replicate(&changes, 60, None).unwrap(), 1);
}

/// The primary refills from its partner (a full refill's merge).
fn refill(primary: &Store, partner: &Store) {
    for n in 0..Store::SHARDS {
        partner.snapshot_shard(n, |raw| {
            primary.merge(raw);
        });
    }
}

/// `Op::Revoke` of `answer`'s changes at `version` on `store`; how many it removed.
fn revoke(store: &Store, answer: &Answer, version: u64) -> usize {
    let changes = decode_changes(answer.changes.clone()).unwrap();
    changes
        .iter()
        .filter(|c| store.revoke(&c.key, version))
        .count()
}

/// A plain SET both workers take, at a version between the partner's write taken alone and
/// the refused program's: the refused copy leaves the partner as it was, so the SET still
/// lands there when it arrives late, and the refill brings it back to the primary
/// (a partner raising its own value above the copy would have buried it).
#[test]
fn a_refused_copy_leaves_later_writes_on_their_way_to_the_partner_their_place() {
    let (primary, partner, sync) = both_hold_one();
    let incr = [Action::IncrBy(1)];
    flagged(&partner, "n", 20, flags::SOLO, &incr);
    primary.set(b"n", b"10", 25, SetOptions::default()).unwrap();
    let behind = flagged(&primary, "n", 30, 0, &incr);
    assert_eq!(copy_based(&partner, &sync, &behind, 30), Status::Diverged);
    assert_eq!(revoke(&primary, &behind, 30), 1);
    assert!(
        partner
            .set(b"n", b"10", 25, SetOptions::default())
            .unwrap()
            .applied
    );
    refill(&primary, &partner);
    assert_eq!(primary.get(b"n").unwrap().unwrap(), b("10"));
}

/// A FLUSHALL the primary missed leaves nothing to mark; a base older than the flush tells.
#[test]
fn a_copy_computed_from_before_a_flush_the_primary_missed_is_refused() {
    let (primary, partner, sync) = both_hold_one();
    let incr = [Action::IncrBy(1)];
    partner.flush(20);
    let behind = flagged(&primary, "n", 30, 0, &incr);
    assert_eq!(copy_based(&partner, &sync, &behind, 30), Status::Diverged);
    // A key the primary created after the flush (nothing before it) is taken.
    let fresh = flagged(&primary, "new", 40, 0, &incr);
    assert_eq!(copy_based(&partner, &sync, &fresh, 40), Status::Ok);
}

#[test]
fn a_write_both_took_clears_the_mark_and_bases_must_match_in_number() {
    let (primary, partner) = (Store::default(), Store::default());
    let sync = SyncState::default();
    let incr = [Action::IncrBy(1)];
    flagged(&partner, "n", 20, flags::SOLO, &incr);
    // A plain SET both partners took replaces the marked entry.
    for s in [&primary, &partner] {
        s.set(b"n", b"7", 25, SetOptions::default()).unwrap();
    }
    let next = flagged(&primary, "n", 30, 0, &incr);
    assert_eq!(copy_based(&partner, &sync, &next, 30), Status::Ok);
    assert_eq!(partner.get(b"n").unwrap().unwrap(), b("8"));
    let mut bases = bytes::BytesMut::new();
    twincache_protocol::program::put_bases(&mut bases, &[1, 2]);
    let mut req = Request::new(Op::Replicate, bases.freeze());
    req.flags = flags::BASES;
    req.version = 40;
    req.value = next.changes.clone();
    let resp = super::replicate(&partner, &sync, &req, None);
    assert_eq!(resp.status, Status::ParseError);
    assert_eq!(
        &resp.payload[..],
        b"the bases of a replicate do not match its changes in number"
    );
    req.key = Bytes::from_static(&[0, 0, 0, 1, 0]);
    let resp = super::replicate(&partner, &sync, &req, None);
    assert_eq!(
        (resp.status, &resp.payload[..]),
        (Status::ParseError, &b"bases cut short"[..])
    );
}

/// A primary and its partner both holding `pairs` at version 10 (plain SETs both took).
fn both_hold(pairs: &[(&str, &str)]) -> (Store, Store, SyncState) {
    let (primary, partner) = (Store::default(), Store::default());
    for s in [&primary, &partner] {
        for (k, v) in pairs {
            s.set(k.as_bytes(), v.as_bytes(), 10, SetOptions::default())
                .unwrap();
        }
    }
    (primary, partner, SyncState::default())
}

#[test]
fn a_write_marked_after_the_fact_is_protected_as_one_taken_alone() {
    let (primary, partner, sync) = both_hold(&[("n", "1")]);
    // The partner took a SET the primary timed out on; the miss is recorded afterwards.
    partner.set(b"n", b"5", 20, SetOptions::default()).unwrap();
    assert!(
        !partner.mark_alone(b"n", 19),
        "only the write that was missed"
    );
    assert!(partner.mark_alone(b"n", 20));
    let behind = flagged(&primary, "n", 30, 0, &[Action::IncrBy(1)]);
    assert_eq!(copy_based(&partner, &sync, &behind, 30), Status::Diverged);
    assert_eq!(partner.get(b"n").unwrap().unwrap(), b("5"));
}

/// A refused RENAME: the revoke removes its source from the primary too, and the partner
/// marks every key of the copy, so a later INCR of the source there (from an orchestrator
/// that still takes the primary to be in sync), computed from nothing, is refused as well.
#[test]
fn every_key_of_a_refused_copy_is_marked_on_the_partner() {
    let (primary, partner, sync) = both_hold(&[("m", "5"), ("n", "1")]);
    flagged(&partner, "n", 20, flags::SOLO, &[Action::IncrBy(1)]);
    let rename = [Action::RenameTo {
        dst: b("n"),
        nx: false,
    }];
    let renamed = flagged(&primary, "m", 30, 0, &rename);
    assert_eq!(copy_based(&partner, &sync, &renamed, 30), Status::Diverged);
    assert_eq!(sync.taken_alone(), 1, "the primary lacks them: it refills");
    assert_eq!(revoke(&primary, &renamed, 30), 2);
    let incr = flagged(&primary, "m", 40, 0, &[Action::IncrBy(1)]);
    assert_eq!(copy_based(&partner, &sync, &incr, 40), Status::Diverged);
    assert_eq!(partner.get(b"m").unwrap().unwrap(), b("5"));
    // A key the partner lacks gets a marked tombstone below any write.
    let both = flagged(&primary, "y", 60, 0, &[Action::IncrBy(1)]);
    let mut with_n = both.clone();
    with_n.changes = [&both.changes[..], &renamed.changes[..]].concat().into();
    let mut bases = bytes::BytesMut::new();
    twincache_protocol::program::put_bases(&mut bases, &[0, 0, 0]);
    with_n.bases = bases.freeze();
    assert_eq!(copy_based(&partner, &sync, &with_n, 60), Status::Diverged);
    assert_eq!(partner.version(b"y"), Some(1), "a marked tombstone");
    assert!(partner.get(b"y").unwrap().is_none());
}

/// A write taken alone that expires (a SET EX through the orchestrator that failed over)
/// leaves a marked tombstone, whether a read or the sweep removes it: a copy the primary
/// computed from the value it replaced is still refused.
#[test]
fn a_write_taken_alone_that_expires_keeps_its_mark() {
    let (primary, partner, sync) = both_hold(&[("n", "1"), ("m", "1")]);
    let expired = SetOptions {
        expires_at: 1,
        alone: true,
        ..SetOptions::default()
    };
    for key in [&b"n"[..], b"m"] {
        partner.set(key, b"7", 20, expired).unwrap();
    }
    assert_eq!(partner.get(b"n").unwrap(), None, "read: removed");
    for shard in 0..Store::SHARDS {
        partner.sweep_shard(shard);
    }
    for key in ["n", "m"] {
        assert_eq!(
            partner.version(key.as_bytes()),
            Some(20),
            "{key}: a tombstone"
        );
        let behind = flagged(&primary, key, 30, 0, &[Action::IncrBy(1)]);
        assert_eq!(copy_based(&partner, &sync, &behind, 30), Status::Diverged);
    }
}
