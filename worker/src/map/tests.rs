//! The `map` op and the refusal of requests for slots the worker's pair does not hold,
//! through `server::handle` as a connection would reach them.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use twincache_protocol::cluster_map::ClusterMap;
use twincache_protocol::frame::{flags, Op, Request, Response};
use twincache_protocol::program::{encode_program, Action, Change, SetIf, Ttl};
use twincache_protocol::slots::{Move, SlotMap, SlotRange};
use twincache_protocol::Status;

use super::MapState;
use crate::server::{handle, Node};
use crate::store::SetOptions;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Two pairs at `epoch`; with `moving`, slots 0-99 on their way from pair 0 to pair 1.
fn cluster(epoch: u64, moving: bool) -> ClusterMap {
    let m = Move {
        slots: SlotRange::new(0, 100).unwrap(),
        from: 0,
        to: 1,
    };
    let even = SlotMap::even(2);
    let map = ClusterMap {
        workers: ["a:1", "b:1", "c:1", "d:1"].map(String::from).to_vec(),
        slots: if moving { even.with_move(&m) } else { even },
        moving: moving.then_some(m),
        wanted: Vec::new(),
    };
    // The epoch as the text gives it: the map is only ever read from text.
    let text = map.text().replace(
        &format!("epoch {}\n", map.epoch()),
        &format!("epoch {epoch}\n"),
    );
    ClusterMap::parse(&text).unwrap()
}

fn map_op(node: &Node, value: &str) -> Response {
    let mut req = Request::new(Op::Map, Bytes::new());
    req.value = b(value);
    handle(node, req)
}

fn set_map(node: &Node, pair: usize, instance: &str, text: &str) -> Response {
    map_op(node, &format!("set {pair} {instance}\n{text}"))
}

fn is(resp: &Response, status: Status, payload: &str) {
    assert_eq!(
        (resp.status, String::from_utf8_lossy(&resp.payload).as_ref()),
        (status, payload)
    );
}

/// A key of `pair`'s slots under `map`, in the move under way or not.
fn key_in(map: &ClusterMap, pair: usize, moving: bool) -> Bytes {
    (0u32..)
        .map(|i| Bytes::from(format!("k{i}")))
        .find(|k| {
            map.slots.pair_of(k) == pair
                && map.moving.is_some_and(|m| m.slots.holds_key(k)) == moving
        })
        .unwrap()
}

fn req(op: Op, key: &Bytes, flags: u8) -> Request {
    let mut req = Request::new(op, key.clone());
    req.flags = flags;
    req.version = 10;
    req
}

fn status_text(node: &Node) -> String {
    String::from_utf8(
        handle(node, Request::new(Op::Status, Bytes::new()))
            .payload
            .to_vec(),
    )
    .unwrap()
}

#[test]
fn a_map_set_is_read_back_and_shown_in_status() {
    let node = Node::for_tests(None);
    is(&map_op(&node, "get"), Status::Ok, "0\n");
    assert!(status_text(&node).contains("map_epoch:0\r\n"));
    let text = cluster(5, false).text();
    is(&set_map(&node, 1, "orch-a", &text), Status::Ok, "5");
    is(&map_op(&node, "get"), Status::Ok, &format!("5\n{text}"));
    assert!(status_text(&node).contains("map_epoch:5\r\n"));
    assert_eq!(node.map.holding().as_ref().unwrap().pair(), 1);
}

#[test]
fn an_older_map_or_another_under_the_same_epoch_is_refused_with_the_current_epoch() {
    let node = Node::for_tests(None);
    let text = cluster(5, false).text();
    is(&set_map(&node, 0, "orch-a", &text), Status::Ok, "5");
    let older = cluster(4, false).text();
    is(
        &set_map(&node, 0, "orch-a", &older),
        Status::NotApplied,
        "5",
    );
    let other = format!("{text}# edited\n");
    is(
        &set_map(&node, 0, "orch-a", &other),
        Status::NotApplied,
        "5",
    );
    // The same map again is no change, from anyone (no lease is held).
    is(&set_map(&node, 0, "orch-b", &text), Status::Ok, "5");
    // ... but it may correct the pair.
    is(&set_map(&node, 1, "orch-b", &text), Status::Ok, "5");
    assert_eq!(node.map.holding().as_ref().unwrap().pair(), 1);
    is(&map_op(&node, "get"), Status::Ok, &format!("5\n{text}"));
}

#[test]
fn a_worker_behind_is_caught_up() {
    let node = Node::for_tests(None);
    is(
        &set_map(&node, 0, "orch-a", &cluster(3, false).text()),
        Status::Ok,
        "3",
    );
    let newer = cluster(7, true).text();
    is(&set_map(&node, 0, "orch-b", &newer), Status::Ok, "7");
    is(&map_op(&node, "get"), Status::Ok, &format!("7\n{newer}"));
    assert_eq!(node.map.holding().as_ref().unwrap().epoch(), 7);
}

#[test]
fn bad_map_requests_are_parse_errors() {
    let node = Node::for_tests(None);
    let text = cluster(5, false).text();
    for bad in [
        "",
        "put",
        "set 0\n",
        "set x orch-a\n",
        "lease orch-a",
        "lease orch-a soon",
        "release",
    ] {
        assert_eq!(map_op(&node, bad).status, Status::ParseError, "{bad:?}");
    }
    let resp = set_map(&node, 0, "orch-a", "epoch 5\npair a:1\n");
    assert_eq!(resp.status, Status::ParseError);
    assert!(resp.payload.starts_with(b"bad map: line 2"), "{resp:?}");
    let resp = set_map(&node, 2, "orch-a", &text);
    assert_eq!(resp.status, Status::ParseError);
    assert!(resp.payload.starts_with(b"pair 2 is not"), "{resp:?}");
    // Nothing was kept.
    is(&map_op(&node, "get"), Status::Ok, "0\n");
}

#[test]
fn a_lease_is_granted_renewed_refused_to_others_until_it_expires_and_released() {
    let map = MapState::default();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let op = |line: &str, ms: u64| map.op_at(line.as_bytes(), at(ms));
    is(&op("lease orch-a 1000", 0), Status::Ok, "granted");
    is(&op("lease orch-b 1000", 400), Status::Ok, "held orch-a 600");
    // The holder renews from now.
    is(&op("lease orch-a 1000", 500), Status::Ok, "granted");
    is(
        &op("lease orch-b 1000", 1400),
        Status::Ok,
        "held orch-a 100",
    );
    // Expired: anyone's.
    is(&op("lease orch-b 1000", 1500), Status::Ok, "granted");
    // Released only by its holder.
    is(&op("release orch-a", 1600), Status::Ok, "");
    is(
        &op("lease orch-a 1000", 1600),
        Status::Ok,
        "held orch-b 900",
    );
    is(&op("release orch-b", 1700), Status::Ok, "");
    is(&op("lease orch-a 1000", 1700), Status::Ok, "granted");
    // A long lease is cut to the most a dead holder may hold things up.
    is(&op("lease orch-a 3600000", 2000), Status::Ok, "granted");
    is(
        &op("lease orch-b 1000", 2000),
        Status::Ok,
        &format!("held orch-a {}", super::MAX_LEASE_MS),
    );
    is(
        &op("lease orch-b 1000", 2000 + super::MAX_LEASE_MS),
        Status::Ok,
        "granted",
    );
}

#[test]
fn a_map_set_is_refused_while_another_instance_holds_the_lease() {
    let map = MapState::default();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let set = |instance: &str, epoch: u64, ms: u64| {
        let value = format!("set 0 {instance}\n{}", cluster(epoch, false).text());
        map.op_at(value.as_bytes(), at(ms))
    };
    is(
        &map.op_at(b"lease orch-a 1000", at(0)),
        Status::Ok,
        "granted",
    );
    is(
        &set("orch-b", 2, 100),
        Status::NotApplied,
        "held orch-a 900",
    );
    is(&set("orch-a", 2, 200), Status::Ok, "2");
    // Refused whatever the epoch: the holder is the one changing the map.
    is(
        &set("orch-b", 2, 300),
        Status::NotApplied,
        "held orch-a 700",
    );
    is(
        &set("orch-b", 1, 300),
        Status::NotApplied,
        "held orch-a 700",
    );
    // Once it has expired, others may push again.
    is(&set("orch-b", 3, 1000), Status::Ok, "3");
    assert_eq!(map.epoch(), 3);
}

#[test]
fn a_worker_without_a_map_admits_everything() {
    let node = Node::for_tests(None);
    let map = cluster(5, false);
    for pair in 0..2 {
        let key = key_in(&map, pair, false);
        let mut set = req(Op::Set, &key, 0);
        set.value = b("v");
        is(&handle(&node, set), Status::Ok, "");
        is(&handle(&node, req(Op::Get, &key, 0)), Status::Ok, "v");
    }
    assert_eq!(
        handle(&node, req(Op::Get, &Bytes::new(), 0)).status,
        Status::NotFound
    );
}

#[test]
fn a_request_for_another_pairs_slot_is_moved_with_the_epoch() {
    let node = Node::for_tests(None);
    let map = cluster(5, false);
    is(&set_map(&node, 0, "orch-a", &map.text()), Status::Ok, "5");
    let (mine, theirs) = (key_in(&map, 0, false), key_in(&map, 1, false));
    for op in [Op::Get, Op::Set, Op::Del, Op::Exists] {
        let mut r = req(op, &theirs, 0);
        r.value = b("v");
        is(&handle(&node, r), Status::Moved, "5");
    }
    assert!(!node.store.exists(&theirs));
    let mut set = req(Op::Set, &mine, 0);
    set.value = b("v");
    is(&handle(&node, set), Status::Ok, "");
    is(&handle(&node, req(Op::Get, &mine, 0)), Status::Ok, "v");
    is(&handle(&node, req(Op::Exists, &mine, 0)), Status::Ok, "");
    is(&handle(&node, req(Op::Del, &mine, 0)), Status::Ok, "");
    // The empty key has a slot like any other.
    let empty = Bytes::new();
    let expected = if map.slots.pair_of(&empty) == 0 {
        Status::NotFound
    } else {
        Status::Moved
    };
    assert_eq!(handle(&node, req(Op::Get, &empty, 0)).status, expected);
    // Ops without a key are not checked.
    is(
        &handle(&node, req(Op::Ping, &theirs, 0)),
        Status::Ok,
        "PONG",
    );
}

#[test]
fn a_leaving_slot_is_served_only_to_those_who_know_of_the_move() {
    let node = Node::for_tests(None);
    let map = cluster(6, true);
    is(&set_map(&node, 0, "orch-a", &map.text()), Status::Ok, "6");
    let leaving = key_in(&map, 1, true);
    node.store
        .set(&leaving, b"old", 1, SetOptions::default())
        .unwrap();
    let source = flags::MOVING_SOURCE;
    is(
        &handle(&node, req(Op::Get, &leaving, source)),
        Status::Ok,
        "old",
    );
    is(
        &handle(&node, req(Op::Get, &leaving, 0)),
        Status::Moved,
        "6",
    );
    is(
        &handle(&node, req(Op::Exists, &leaving, source)),
        Status::Ok,
        "",
    );
    is(
        &handle(&node, req(Op::Exists, &leaving, 0)),
        Status::Moved,
        "6",
    );
    // On a SET the bit is KEEP_TTL: a write of a moving slot belongs on the new pair.
    let mut set = req(Op::Set, &leaving, flags::KEEP_TTL);
    set.value = b("new");
    is(&handle(&node, set), Status::Moved, "6");
    is(
        &handle(&node, req(Op::Del, &leaving, 0)),
        Status::Moved,
        "6",
    );
    is(
        &handle(&node, req(Op::Del, &leaving, source)),
        Status::Ok,
        "",
    );
    assert!(!node.store.exists(&leaving));
    // The slots staying with the pair are served as usual.
    let staying = key_in(&map, 0, false);
    is(
        &handle(&node, req(Op::Get, &staying, 0)),
        Status::NotFound,
        "key not found",
    );
}

fn set_action(value: &str) -> Action {
    Action::Set {
        value: b(value),
        ttl: Ttl::Clear,
        cond: SetIf::Always,
        get: false,
    }
}

#[test]
fn a_program_naming_a_key_of_another_pair_is_refused_whole() {
    let node = Node::for_tests(None);
    let map = cluster(5, false);
    is(&set_map(&node, 0, "orch-a", &map.text()), Status::Ok, "5");
    let (mine, theirs) = (key_in(&map, 0, false), key_in(&map, 1, false));
    let mut apply = req(Op::Apply, &mine, 0);
    apply.value = encode_program(&[
        set_action("1"),
        Action::Key(theirs.clone()),
        set_action("2"),
    ]);
    is(&handle(&node, apply), Status::Moved, "5");
    assert!(!node.store.exists(&mine) && !node.store.exists(&theirs));
    // The same by its first key, and in a read-only program.
    let mut apply = req(Op::Apply, &theirs, 0);
    apply.value = encode_program(&[set_action("1")]);
    is(&handle(&node, apply), Status::Moved, "5");
    let mut query = req(Op::Query, &mine, 0);
    query.value = encode_program(&[Action::Get, Action::Key(theirs.clone()), Action::Get]);
    is(&handle(&node, query), Status::Moved, "5");
    // A program of this pair's keys runs.
    let mine2 = (0u32..)
        .map(|i| Bytes::from(format!("m{i}")))
        .find(|k| map.slots.pair_of(k) == 0)
        .unwrap();
    let mut apply = req(Op::Apply, &mine, 0);
    apply.value = encode_program(&[set_action("1"), Action::Key(mine2.clone()), set_action("2")]);
    assert_eq!(handle(&node, apply).status, Status::Ok);
    assert!(node.store.exists(&mine) && node.store.exists(&mine2));
    // RANDOMKEY goes to every pair with an empty key, and names none.
    let other = 1 - map.slots.pair_of(b"");
    is(
        &set_map(&node, other, "orch-a", &map.text()),
        Status::Ok,
        "5",
    );
    let mut query = req(Op::Query, &Bytes::new(), 0);
    query.value = encode_program(&[Action::RandomKey]);
    assert_eq!(handle(&node, query).status, Status::Ok);
}

#[test]
fn replicated_changes_of_another_pairs_slot_are_refused_whole() {
    let node = Node::for_tests(None);
    let map = cluster(5, false);
    is(&set_map(&node, 0, "orch-a", &map.text()), Status::Ok, "5");
    let (mine, theirs) = (key_in(&map, 0, false), key_in(&map, 1, false));
    let changes = |keys: &[&Bytes]| {
        let mut out = BytesMut::new();
        for key in keys {
            Change {
                key: (*key).clone(),
                kind: 0,
                expires_at: 0,
                value: b("v"),
            }
            .encode(&mut out);
        }
        out.freeze()
    };
    // The frame's key is empty, as the orchestrator sends it: the keys are in the block.
    let mut rep = req(Op::Replicate, &Bytes::new(), 0);
    rep.value = changes(&[&mine, &theirs]);
    is(&handle(&node, rep), Status::Moved, "5");
    assert!(!node.store.exists(&mine) && !node.store.exists(&theirs));
    let mut rep = req(Op::Replicate, &Bytes::new(), 0);
    rep.value = changes(&[&mine]);
    is(&handle(&node, rep), Status::Ok, "1");
    assert!(node.store.exists(&mine));
}

/// A worker taken out of the map (replaced, or its pair removed) is given the new map as a
/// worker of no pair (`set - INSTANCE`): it refuses every keyed request, so an orchestrator
/// still routing by the map that had it learns the new one instead of writing to it.
#[test]
fn a_worker_of_no_pair_refuses_every_key() {
    let node = Node::for_tests(None);
    let map = cluster(5, true);
    is(&set_map(&node, 0, "orch-a", &map.text()), Status::Ok, "5");
    let newer = cluster(6, false);
    is(
        &map_op(&node, &format!("set - orch-a\n{}", newer.text())),
        Status::Ok,
        "6",
    );
    for pair in 0..2 {
        let key = key_in(&newer, pair, false);
        for (op, flags) in [(Op::Get, 0), (Op::Set, 0), (Op::Del, flags::MOVING_SOURCE)] {
            is(&handle(&node, req(op, &key, flags)), Status::Moved, "6");
        }
    }
    // It keeps the map for whoever reads it.
    is(
        &map_op(&node, "get"),
        Status::Ok,
        &format!("6\n{}", newer.text()),
    );
}
