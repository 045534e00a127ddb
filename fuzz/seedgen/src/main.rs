//! Writes a seed corpus for each fuzz target into the directory given: valid input made
//! with the crates' own encoders, each behind the control byte its target reads first.

use bytes::{Bytes, BytesMut};
use std::path::Path;
use twincache_protocol::frame::{encode_frame, Op, Request, Response};
use twincache_protocol::resp::{encode_command, Reply};
use twincache_protocol::Status;
use twincache_worker::seal::{seal_into, Cipher, Dictionary};
use twincache_worker::store::{SetOptions, Store};
use twincache_worker::sync::{entry_record, snapshot_head, SyncState};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn main() {
    let dir = Path::new(&std::env::args().nth(1).unwrap()).to_path_buf();
    // resp: control byte 0x23 = reads of 4 bytes, max_bulk 64.
    let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
    let mut w = BytesMut::new();
    encode_command(&[b("SET"), b("key"), b("value")], &mut w);
    encode_command(&[b("GET"), b("key")], &mut w);
    encode_command(&[b("MGET"), b("a"), b("b"), b("c")], &mut w);
    write(&dir, "resp", "multibulk", &[&[0x23u8][..], &w].concat());
    write(
        &dir,
        "resp",
        "inline",
        b"\x05PING\r\nset k 'a b'\r\n\r\nGET \"x\"\n",
    );
    write(
        &dir,
        "resp",
        "mixed",
        &[
            &[0x41u8][..],
            b"*1\r\n$4\r\nPING\r\nECHO hi\r\n*2\r\n$3\r\nGET\r\n$0\r\n\r\n",
        ]
        .concat(),
    );
    let mut r = BytesMut::new();
    Reply::Array(vec![
        Reply::Bulk(b("DEL")),
        Reply::Bulk(b("k1")),
        Reply::Bulk(b("k2")),
    ])
    .encode(&mut r);
    write(&dir, "resp", "del", &[&[0x02u8][..], &r].concat());
    // text
    write(
        &dir,
        "text",
        "commands",
        b"\x07get||a\r\nset||k||v||w\nsetex||k||10||v\ndel||k\nping\nstats\nstatus\nexit\n",
    );
    write(
        &dir,
        "text",
        "long",
        &[&b"\x20set||k||"[..], &[b'x'; 300], b"\nget||k\n"].concat(),
    );
    // frames
    let mut reqs = BytesMut::new();
    let mut set = Request::new(Op::Set, b("key"));
    set.id = 1;
    set.value = b("value");
    set.ttl_ms = 1000;
    encode_frame(&set, &mut reqs);
    let mut get = Request::new(Op::Get, b("key"));
    get.id = 2;
    encode_frame(&get, &mut reqs);
    encode_frame(&Request::new(Op::Ping, Bytes::new()), &mut reqs);
    write(
        &dir,
        "frame_request",
        "requests",
        &[&[0x63u8][..], &reqs].concat(),
    );
    let mut resps = BytesMut::new();
    encode_frame(&Response::ok(b("value")).with_id(2), &mut resps);
    encode_frame(&Response::status(Status::NotFound).with_id(3), &mut resps);
    encode_frame(
        &Response::ok(Bytes::from(vec![b'v'; 100])).with_id(4),
        &mut resps,
    );
    encode_frame(&Response::ok(Bytes::new()).with_id(5), &mut resps);
    // 0x03: reads of 4 bytes, limit 8: every frame but the last is oversized.
    write(
        &dir,
        "frame_response",
        "oversized",
        &[&[0x03u8][..], &resps].concat(),
    );
    write(
        &dir,
        "frame_response",
        "fits",
        &[&[0xe3u8][..], &resps].concat(),
    );
    // seal: the fuzz target's dictionary and key.
    let dict = Dictionary::new(br#"{"user":"alice","tags":["a","b"],"n":1}"#.repeat(8));
    let cipher = Cipher::new(&[7; 32]);
    let value = br#"{"user":"bob","tags":["a","c"],"n":2}"#.repeat(6);
    for (name, ctl, c, d) in [
        ("raw", 0u8, None, None),
        ("lz4", 0, None, None),
        ("lz4_dict", 2, None, Some(&dict)),
        ("sealed", 1, Some(&cipher), None),
        ("sealed_dict", 3, Some(&cipher), Some(&dict)),
    ] {
        let v: &[u8] = if name == "raw" {
            b"short value"
        } else {
            &value
        };
        let mut out = vec![ctl];
        seal_into(b"k", v, c, d, &mut out);
        write(&dir, "seal_open", name, &out);
    }
    // A long string in segments (two of them, lz4), plain and sealed.
    let long = value.repeat(50);
    for (name, ctl, c) in [("segments", 0u8, None), ("segments_sealed", 1, Some(&cipher))] {
        let mut out = vec![ctl];
        twincache_worker::seal::segments::build(b"k", &long[..9000], c, &mut out);
        write(&dir, "seal_open", name, &out);
    }
    // store entries: a snapshot of a small store, as u16-length records.
    for (name, ctl, c) in [
        ("plain", 0u8, None),
        ("resealed", 2, None),
        ("sealed", 1, Some(cipher.clone())),
    ] {
        let s = Store::new(c, 0);
        s.adopt_dictionary(dict.clone());
        for i in 0..6 {
            let v = if i % 2 == 0 {
                value.clone()
            } else {
                format!("v{i}").into_bytes()
            };
            let ttl = if i == 3 { 3_600_000 } else { 0 };
            s.set(
                format!("key{i}").as_bytes(),
                &v,
                10 + i,
                SetOptions {
                    ttl_ms: ttl,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        s.del(b"gone", 30);
        let mut out = vec![ctl];
        for n in 0..Store::SHARDS {
            s.snapshot_shard(n, |raw| {
                out.extend_from_slice(&(raw.len() as u16).to_le_bytes());
                out.extend_from_slice(raw);
            });
        }
        write(&dir, "store_merge", name, &out);
    }
    // snapshot records: a small store's whole snapshot (meta, dictionary, entries) in two
    // frames, each behind a u16 length. "forged" is a plain store's entries under an
    // encrypting worker's meta record: what an encrypting receiver must refuse.
    for (name, ctl, c, with_dict) in [
        ("plain", 4u8, None, true),
        ("sealed", 1, Some(cipher.clone()), false),
        ("sealed_dict", 5, Some(cipher.clone()), true),
        ("merge", 2, None, false),
        ("forged", 1, None, false),
    ] {
        let s = Store::new(c.clone(), 0);
        if with_dict {
            s.adopt_dictionary(dict.clone());
        }
        for i in 0..6u64 {
            let v = if i % 2 == 0 {
                value.clone()
            } else {
                format!("v{i}").into_bytes()
            };
            s.set(format!("key{i}").as_bytes(), &v, 10 + i, SetOptions::default())
                .unwrap();
        }
        s.del(b"gone", 30);
        let mut head = BytesMut::new();
        let forger = Store::new(Some(cipher.clone()), 0);
        let head_of = if name == "forged" { &forger } else { &s };
        snapshot_head(head_of, &SyncState::default(), &mut head);
        let mut entries = BytesMut::new();
        for n in 0..Store::SHARDS {
            s.snapshot_shard(n, |raw| entry_record(&mut entries, raw));
        }
        let mut out = vec![ctl];
        for frame in [&head[..], &entries[..]] {
            out.extend_from_slice(&(frame.len() as u16).to_le_bytes());
            out.extend_from_slice(frame);
        }
        write(&dir, "snapshot_records", name, &out);
    }
}
