//! `twincache-migrate` against real redis-server processes: every verb end to end, checked on
//! the servers themselves with the `redis` crate.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::RedisServer;

const MIGRATE: &str = env!("CARGO_BIN_EXE_twincache-migrate");
/// The seed's three versions of a user (1.0.0 userName, 2.0.0 fullName + createdAt, 3.0.0
/// firstName/lastName), also the README's example.
const USERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/migrate/examples/users");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the tool to completion (no progress display).
fn migrate(args: &[&str]) -> Run {
    let out = Command::new(MIGRATE)
        .args(args)
        .env("TWINCACHE_MIGRATE_QUIET", "1")
        .output()
        .expect("run twincache-migrate");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts the summary counts `n` before `what`.
fn counted(text: &str, what: &str, n: u64) {
    assert_eq!(count(text, what), n, "`{what}` in:\n{text}");
}

/// Runs the tool and asserts it succeeded.
fn ok(args: &[&str]) -> Run {
    let r = migrate(args);
    assert_eq!(r.code, 0, "{args:?}: {}{}", r.stdout, r.stderr);
    r
}

/// `transform --redis URL --registry <the seed users> --to VERSION`.
fn transform_to<'a>(url: &'a str, version: &'a str) -> [&'a str; 7] {
    transform_with(url, USERS, version)
}

fn transform_with<'a>(url: &'a str, registry: &'a str, version: &'a str) -> [&'a str; 7] {
    [
        "transform",
        "--redis",
        url,
        "--registry",
        registry,
        "--to",
        version,
    ]
}

/// `VERB --source SRC --destination DST` (`copy` or `verify`).
fn between<'a>(verb: &'a str, src: &'a str, dst: &'a str) -> [&'a str; 5] {
    [verb, "--source", src, "--destination", dst]
}

/// Plain `SET key value`.
fn set(c: &mut redis::Connection, key: &str, value: &str) {
    q::<()>(c, redis::cmd("SET").arg(key).arg(value));
}

/// The number before `what` in a summary line (`... 12 copied, ...`).
fn count(text: &str, what: &str) -> u64 {
    let at = text
        .find(what)
        .unwrap_or_else(|| panic!("no `{what}` in:\n{text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("no count before `{what}` in:\n{text}"))
}

/// Asserts `text` contains `needle`, showing `text` if not.
fn has(text: &str, needle: &str) {
    assert!(text.contains(needle), "expected `{needle}` in:\n{text}");
}

/// The count of a `skipped N: reason` line (0 if there is none).
fn note_skipped(text: &str, reason: &str) -> u64 {
    text.lines()
        .find(|l| l.trim_start().starts_with("skipped") && l.ends_with(reason))
        .and_then(|l| {
            l.trim_start()
                .strip_prefix("skipped ")?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The number after `what: ` in a summary's notes.
fn note(text: &str, what: &str) -> u64 {
    text.split(&format!("{what}: "))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn con(r: &RedisServer) -> redis::Connection {
    redis::Client::open(r.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn q<T: redis::FromRedisValue>(c: &mut redis::Connection, cmd: &mut redis::Cmd) -> T {
    cmd.query(c).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn dump(c: &mut redis::Connection, key: &[u8]) -> Option<Vec<u8>> {
    q(c, redis::cmd("DUMP").arg(key))
}

fn pttl(c: &mut redis::Connection, key: &[u8]) -> i64 {
    q(c, redis::cmd("PTTL").arg(key))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("twm-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One key of every type (some with TTLs), binary key names, and big ones of every
/// collection type (over the 4 KiB `--big-key-size` the test uses), so both the DUMP path
/// and the chunked path run.
fn fill_every_type(c: &mut redis::Connection) -> Vec<Vec<u8>> {
    let mut p = redis::pipe();
    p.cmd("SET").arg("s:plain").arg("hello").ignore();
    p.cmd("SET")
        .arg("s:ttl")
        .arg("soon")
        .arg("EX")
        .arg(500)
        .ignore();
    p.cmd("SET")
        .arg(b"bin:\x00\xff\n")
        .arg(b"\x01\x02\x00")
        .ignore();
    p.cmd("HSET")
        .arg("h:small")
        .arg("a")
        .arg("1")
        .arg("b")
        .arg("2")
        .ignore();
    p.cmd("PEXPIRE").arg("h:small").arg(400_000).ignore();
    p.cmd("RPUSH")
        .arg("l:small")
        .arg("x")
        .arg("y")
        .arg("x")
        .ignore();
    p.cmd("SADD").arg("set:small").arg("a").arg("b").ignore();
    p.cmd("ZADD")
        .arg("z:small")
        .arg(1.5)
        .arg("a")
        .arg("-inf")
        .arg("b")
        .arg(0.1)
        .arg("c")
        .ignore();
    p.cmd("EXPIRE").arg("z:small").arg(300).ignore();
    p.cmd("XADD")
        .arg("x:small")
        .arg("1-1")
        .arg("f")
        .arg("v")
        .ignore();
    p.cmd("SET")
        .arg("s:big")
        .arg("q".repeat(20_000))
        .arg("PX")
        .arg(600_000)
        .ignore();
    for i in 0..600 {
        let (m, v) = (format!("m{i}"), format!("value {i}"));
        p.cmd("HSET").arg("h:big").arg(&m).arg(&v).ignore();
        p.cmd("RPUSH").arg("l:big").arg(&v).ignore();
        p.cmd("SADD").arg("set:big").arg(&m).ignore();
        p.cmd("ZADD")
            .arg("z:big")
            .arg(i as f64 / 7.0)
            .arg(&m)
            .ignore();
        p.cmd("XADD")
            .arg("x:big")
            .arg(format!("{}-0", i + 1))
            .arg("f")
            .arg(&v)
            .ignore();
    }
    p.cmd("EXPIRE").arg("l:big").arg(700).ignore();
    p.query::<()>(c).unwrap();
    let mut keys: Vec<Vec<u8>> = q(c, redis::cmd("KEYS").arg("*"));
    keys.sort();
    keys
}

#[test]
fn copies_every_type_with_ttls_and_verifies() {
    let (src, dst) = (RedisServer::start(), RedisServer::start());
    let (mut s, mut d) = (con(&src), con(&dst));
    let keys = fill_every_type(&mut s);
    // A key the destination already has is left alone by default.
    set(&mut d, "s:plain", "newer");
    let (su, du) = (src.url(), dst.url());
    let base = [
        "--source",
        su.as_str(),
        "--destination",
        du.as_str(),
        "--big-key-size",
        "4KiB",
    ];
    let args = |extra: &[&'static str]| [&["copy", "--batch", "3"][..], &base, extra].concat();
    let run = |a: Vec<&str>| migrate(&a);

    let r = run(args(&["--dry-run"]));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    counted(&r.stdout, "would be copied", keys.len() as u64 - 1);
    assert_eq!(
        q::<u64>(&mut d, &mut redis::cmd("DBSIZE")),
        1,
        "a dry run writes nothing"
    );

    let r = run(args(&[]));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    counted(&r.stdout, "copied", keys.len() as u64 - 1);
    counted(&r.stdout, "skipped", 1);
    // The six big keys at least (a small stream's overhead may put it over 4 KiB as well).
    assert!(
        note(&r.stdout, "big keys copied in chunks") >= 6,
        "{}",
        r.stdout
    );
    assert_eq!(
        q::<String>(&mut d, redis::cmd("GET").arg("s:plain")),
        "newer"
    );
    for k in &keys {
        let ts = pttl(&mut s, k);
        let td = pttl(&mut d, k);
        assert_eq!(
            ts < 0,
            td < 0,
            "TTL kept for {}",
            String::from_utf8_lossy(k)
        );
        assert!(
            (ts - td).abs() < 2_000,
            "TTL of {}: {ts} vs {td}",
            String::from_utf8_lossy(k)
        );
        // A set is a hash table in Redis 7.0, whose DUMP lists members in an order of the
        // server's random hash seed: `verify` compares those; the rest must be identical.
        if !k.ends_with(b":big") && k != b"s:plain" && !k.starts_with(b"set:") {
            assert_eq!(
                dump(&mut s, k),
                dump(&mut d, k),
                "{} byte for byte",
                String::from_utf8_lossy(k)
            );
        }
    }
    let last_id = |c: &mut redis::Connection| -> redis::Value {
        q(c, redis::cmd("XINFO").arg("STREAM").arg("x:big"))
    };
    let field = |v: redis::Value| {
        format!("{:?}", v)
            .split("last-generated-id")
            .nth(1)
            .map(|s| s[..40].to_string())
    };
    assert_eq!(
        field(last_id(&mut s)),
        field(last_id(&mut d)),
        "the big stream keeps its last id"
    );

    // verify: only s:plain differs; --replace then makes them agree.
    let verify = |extra: &[&str]| migrate(&[&["verify"][..], &base, extra].concat());
    let r = verify(&[]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("failed 1: value differs") && r.stdout.contains("s:plain"),
        "{}",
        r.stdout
    );
    let r = run(args(&["--replace"]));
    counted(&r.stdout, "copied", keys.len() as u64);
    let r = verify(&[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    counted(&r.stdout, "equal", keys.len() as u64);

    // --match and --type filter the scan.
    let r = run(args(&["--replace", "--match", "z:*"]));
    counted(&r.stdout, "keys scanned", 2);
    let r = run(args(&["--replace", "--type", "hash"]));
    counted(&r.stdout, "keys scanned", 2);
}

#[test]
fn delete_from_source_only_after_the_destination_holds_the_key() {
    let (src, dst) = (RedisServer::start(), RedisServer::start());
    let (mut s, mut d) = (con(&src), con(&dst));
    for i in 0..50 {
        q::<()>(&mut s, redis::cmd("SET").arg(format!("k{i}")).arg(i));
    }
    q::<()>(
        &mut s,
        redis::cmd("RPUSH")
            .arg("big")
            .arg(vec!["x".repeat(100); 100]),
    );
    let r = ok(&[
        &between("copy", &src.url(), &dst.url())[..],
        &["--delete-from-source", "--big-key-size", "2KiB"],
    ]
    .concat());
    assert_eq!(
        note(&r.stdout, "deleted from the source"),
        51,
        "{}",
        r.stdout
    );
    assert_eq!(q::<u64>(&mut s, &mut redis::cmd("DBSIZE")), 0);
    assert_eq!(q::<u64>(&mut d, &mut redis::cmd("DBSIZE")), 51);
    assert_eq!(q::<u64>(&mut d, redis::cmd("LLEN").arg("big")), 100);
}

#[test]
fn killed_copy_resumes_and_copies_every_key_once() {
    const N: usize = 20_000;
    let (src, dst) = (RedisServer::start(), RedisServer::start());
    let (mut s, mut d) = (con(&src), con(&dst));
    let mut p = redis::pipe();
    for i in 0..N {
        p.cmd("SET")
            .arg(format!("key:{i}"))
            .arg(format!("value {i}"))
            .ignore();
        if i % 3 == 0 {
            p.cmd("PEXPIRE")
                .arg(format!("key:{i}"))
                .arg(900_000)
                .ignore();
        }
    }
    p.query::<()>(&mut s).unwrap();
    let dir = temp_dir("resume");
    let cp = dir.join("copy.checkpoint");
    let (su, du, cps) = (src.url(), dst.url(), cp.display().to_string());
    let args = [
        "copy",
        "--source",
        &su,
        "--destination",
        &du,
        "--batch",
        "200",
        "--concurrency",
        "4",
        "--rate-limit",
        "8000",
        "--checkpoint",
        &cps,
    ];
    // A pause after each batch's writes (a test hook): the kill below follows a write by
    // less than a polling interval, so it lands between that batch's writes and the
    // checkpoint that would record them.
    let mut child = Command::new(MIGRATE)
        .args(args)
        .args(["--pause-after-write", "300ms"])
        .env("TWINCACHE_MIGRATE_QUIET", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while q::<u64>(&mut d, &mut redis::cmd("DBSIZE")) < 4_000 {
        assert!(Instant::now() < deadline, "the copy made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = q::<u64>(&mut d, &mut redis::cmd("DBSIZE"));
    assert!(before < N as u64, "killed mid-way ({before} of {N} copied)");
    // The checkpoint names the batches that were in flight: the resumed run handles those first.
    let cp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    assert!(!cp["inflight"].as_array().unwrap().is_empty(), "{cp}");
    let recorded = cp["tally"]["done"].as_u64().unwrap();
    assert!(
        recorded < before,
        "keys written but not recorded: {recorded} recorded, {before} there"
    );

    // The same command again without --resume refuses to throw the record away.
    let r = migrate(&args);
    assert_eq!(r.code, 2, "{}", r.stderr);
    has(&r.stderr, "--resume");

    let mut resumed: Vec<&str> = args.to_vec();
    resumed.retain(|a| *a != "--rate-limit" && *a != "8000");
    resumed.push("--resume");
    let r = ok(&resumed);
    // Counted over both runs: every key copied once, none found already there.
    counted(&r.stdout, "keys scanned", N as u64);
    counted(&r.stdout, "copied", N as u64);
    counted(&r.stdout, "skipped", 0);
    assert_eq!(q::<u64>(&mut d, &mut redis::cmd("DBSIZE")), N as u64);
    assert!(pttl(&mut d, b"key:3") > 800_000 && pttl(&mut d, b"key:4") == -1);
    ok(&["verify", "--source", &su, "--destination", &du]);
    // A finished run resumed again has nothing to do.
    let r = ok(&resumed);
    has(&r.stderr, "already finished");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn verify_finds_planted_differences_and_nothing_else() {
    let (src, dst) = (RedisServer::start(), RedisServer::start());
    let (mut s, mut d) = (con(&src), con(&dst));
    let mut p = redis::pipe();
    for i in 0..500 {
        p.cmd("SET")
            .arg(format!("k:{i}"))
            .arg(format!("v{i}"))
            .arg("EX")
            .arg(1000)
            .ignore();
    }
    p.cmd("HSET")
        .arg("h")
        .arg("a")
        .arg("1")
        .arg("b")
        .arg("2")
        .ignore();
    p.cmd("SADD").arg("set").arg("a").arg("b").arg("c").ignore();
    p.query::<()>(&mut s).unwrap();
    let r = migrate(&["copy", "--source", &src.url(), "--destination", &dst.url()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The same hash and set built in another order: not a difference.
    q::<()>(&mut d, redis::cmd("DEL").arg("h").arg("set"));
    q::<()>(
        &mut d,
        redis::cmd("HSET")
            .arg("h")
            .arg("b")
            .arg("2")
            .arg("a")
            .arg("1"),
    );
    q::<()>(
        &mut d,
        redis::cmd("SADD").arg("set").arg("c").arg("a").arg("b"),
    );
    // Planted: two missing, two changed values, one changed type, one lost TTL.
    q::<()>(&mut d, redis::cmd("DEL").arg("k:1").arg("k:2"));
    q::<()>(
        &mut d,
        redis::cmd("SET").arg("k:3").arg("other").arg("KEEPTTL"),
    );
    q::<()>(&mut d, redis::cmd("HSET").arg("h").arg("a").arg("9"));
    q::<()>(&mut d, redis::cmd("DEL").arg("k:4"));
    q::<()>(&mut d, redis::cmd("RPUSH").arg("k:4").arg("v4"));
    q::<()>(&mut d, redis::cmd("EXPIRE").arg("k:4").arg(1000));
    q::<()>(&mut d, redis::cmd("PERSIST").arg("k:5"));
    // Not differences: a key only in the destination, and one about to expire that the
    // destination no longer has.
    set(&mut d, "extra", "x");
    q::<()>(&mut s, redis::cmd("PEXPIRE").arg("k:6").arg(1_500));
    q::<()>(&mut d, redis::cmd("DEL").arg("k:6"));

    let r = migrate(
        &[
            &between("verify", &src.url(), &dst.url())[..],
            &["--ttl-tolerance", "2s"],
        ]
        .concat(),
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let out = &r.stdout;
    assert_eq!(count(out, "keys scanned"), 502, "{out}");
    assert_eq!(count(out, "failed in"), 6, "{out}");
    has(out, "failed 2: missing in the destination");
    has(out, "failed 2: value differs");
    has(out, "failed 1: type differs");
    has(out, "failed 1: TTL differs");
    has(out, "skipped 1: expired in between");
    for k in ["k:1:", "k:2:", "k:3:", "h:", "k:4:", "k:5:"] {
        assert!(out.contains(&format!("    {k} ")), "{k} listed in:\n{out}");
    }
    has(out, "source and destination differ");
    let r = migrate(
        &[
            &between("verify", &src.url(), &dst.url())[..],
            &["--sample", "10", "--batch", "5"],
        ]
        .concat(),
    );
    counted(&r.stdout, "keys scanned", 10);
}

/// Users of the three seed versions, as JSON strings (some with TTLs) and hashes.
fn fill_users(c: &mut redis::Connection, n: usize) {
    let mut p = redis::pipe();
    for i in 0..n {
        let key = format!("user:{i}");
        match i % 4 {
            0 => p
                .cmd("SET")
                .arg(&key)
                .arg(format!(
                    r#"{{"userName":"Ada Lovelace{i}","age":{i},"preferences":{{"theme":"dark"}}}}"#
                ))
                .arg("EX")
                .arg(3600),
            1 => p.cmd("SET").arg(&key).arg(format!(
                r#"{{"userName": "Grace Hopper{i}", "email": "g{i}@example.com"}}"#
            )),
            2 => p
                .cmd("HSET")
                .arg(&key)
                .arg("userName")
                .arg(format!("Alan Turing{i}"))
                .arg("age")
                .arg(i),
            _ => p.cmd("SET").arg(&key).arg(format!(
                r#"{{"fullName":"Edsger Dijkstra{i}","createdAt":"2020-01-01T00:00:00Z"}}"#
            )),
        }
        .ignore();
    }
    p.query::<()>(c).unwrap();
}

fn snapshot(c: &mut redis::Connection, pattern: &str) -> Vec<(Vec<u8>, Option<Vec<u8>>, i64)> {
    let mut keys: Vec<Vec<u8>> = q(c, redis::cmd("KEYS").arg(pattern));
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let d = dump(c, &k);
            let expire_at: i64 = q(c, redis::cmd("PEXPIRETIME").arg(&k));
            (k, d, expire_at)
        })
        .collect()
}

#[test]
fn seed_users_migrate_in_place_and_roll_back() {
    let r0 = RedisServer::start();
    let mut c = con(&r0);
    fill_users(&mut c, 400);
    let before = snapshot(&mut c, "user:*");
    let dir = temp_dir("seed");
    let backup = dir.join("backup.jsonl");
    let (url, b) = (r0.url(), backup.display().to_string());
    let transform = [&transform_to(&url, "3.0.0")[..], &["--batch", "64"]].concat();

    let r = ok(&[&transform[..], &["--dry-run"]].concat());
    has(
        &r.stdout,
        "would migrate 1.0.0 -> 3.0.0 (v1_to_v2, v2_to_v3): 300",
    );
    has(&r.stdout, "would migrate 2.0.0 -> 3.0.0 (v2_to_v3): 100");
    assert!(
        r.stdout.contains("sample user:") && r.stdout.contains("after:"),
        "{}",
        r.stdout
    );
    assert_eq!(
        snapshot(&mut c, "user:*"),
        before,
        "a dry run writes nothing"
    );

    let r = ok(&[&transform[..], &["--backup", &b]].concat());
    counted(&r.stdout, "transformed", 400);
    // Valid against 3.0.0: names split, createdAt set, other fields and TTLs kept.
    let v: String = q(&mut c, redis::cmd("GET").arg("user:4"));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["firstName"], "Ada");
    assert_eq!(v["lastName"], "Lovelace4");
    assert_eq!(v["preferences"]["theme"], "dark");
    assert_eq!(v["_schemaVersion"], "3.0.0");
    assert!(v["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(v.get("userName").is_none());
    assert!(pttl(&mut c, b"user:4") > 3_500_000);
    let h: std::collections::HashMap<String, String> =
        q(&mut c, redis::cmd("HGETALL").arg("user:6"));
    assert_eq!(
        (
            h["firstName"].as_str(),
            h["lastName"].as_str(),
            h["age"].as_str()
        ),
        ("Alan", "Turing6", "6")
    );
    let v: String = q(&mut c, redis::cmd("GET").arg("user:7"));
    assert!(
        v.contains(r#""createdAt":"2020-01-01T00:00:00Z""#)
            && v.contains(r#""lastName":"Dijkstra7""#),
        "{v}"
    );

    // A second run changes nothing, byte for byte.
    let after = snapshot(&mut c, "user:*");
    let r = ok(&transform);
    counted(&r.stdout, "transformed", 0);
    has(&r.stdout, "skipped 400: already at 3.0.0");
    assert_eq!(snapshot(&mut c, "user:*"), after);
    let list = migrate(&["schema", "list", "--redis", &url]);
    has(&list.stdout, "current user:*  3.0.0");

    // Rollback puts every original back: payload and expiry, byte for byte.
    let r = ok(&["rollback", "--backup", &b, "--redis", &url]);
    counted(&r.stdout, "restored", 400);
    assert_eq!(snapshot(&mut c, "user:*"), before);
    // The backup file is not overwritten by a later run.
    let r = migrate(&[&transform[..], &["--backup", &b]].concat());
    assert_eq!(r.code, 2, "{}", r.stderr);
    has(&r.stderr, "already exists");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn killed_transform_resumes_without_applying_a_step_twice() {
    const N: usize = 4000;
    let r0 = RedisServer::start();
    let mut c = con(&r0);
    fill_users(&mut c, N);
    let before = snapshot(&mut c, "user:*");
    let dir = temp_dir("transform-resume");
    let (cp, backup) = (dir.join("t.checkpoint"), dir.join("t.backup"));
    let (url, cps, b) = (
        r0.url(),
        cp.display().to_string(),
        backup.display().to_string(),
    );
    let flags = [
        "--batch",
        "50",
        "--concurrency",
        "2",
        "--checkpoint",
        &cps,
        "--backup",
        &b,
    ];
    let args = [&transform_to(&url, "3.0.0")[..], &flags].concat();
    // A pause after each batch's writes (a test hook). A batch appends to the backup, writes
    // at once, then pauses: killing a moment after the backup grew lands between that
    // batch's writes and the checkpoint that would record them.
    let mut child = Command::new(MIGRATE)
        .args(&args)
        .args(["--pause-after-write", "300ms", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = |p: &PathBuf| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
    while lines(&backup) < 500 {
        assert!(Instant::now() < deadline, "the transform made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    child.kill().unwrap();
    child.wait().unwrap();

    let r = ok(&[&args[..], &["--resume"]].concat());
    // Over both runs: each value transformed once; those written by the killed run's last
    // batches are found at 3.0.0 and left alone.
    let transformed = count(&r.stdout, "transformed");
    let already = note_skipped(&r.stdout, "already at 3.0.0");
    assert_eq!(transformed + already, N as u64, "{}", r.stdout);
    assert!(
        already > 0,
        "the killed run had written values it had not recorded: {}",
        r.stdout
    );
    counted(&r.stdout, "failed", 0);
    for i in (0..N).step_by(97) {
        let key = format!("user:{i}");
        let (first, last) = [
            ("Ada", "Lovelace"),
            ("Grace", "Hopper"),
            ("Alan", "Turing"),
            ("Edsger", "Dijkstra"),
        ][i % 4];
        let fields: std::collections::HashMap<String, String> = if i % 4 == 2 {
            q(&mut c, redis::cmd("HGETALL").arg(&key))
        } else {
            let v: String = q(&mut c, redis::cmd("GET").arg(&key));
            let v: serde_json::Value = serde_json::from_str(&v).unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), String::from)))
                .collect()
        };
        assert_eq!(fields["firstName"], first, "{key}: {fields:?}");
        assert_eq!(
            fields["lastName"],
            format!("{last}{i}"),
            "{key}: {fields:?}"
        );
        assert_eq!(fields["_schemaVersion"], "3.0.0");
        assert!(!fields.contains_key("userName") && !fields.contains_key("fullName"));
    }
    // The backup, appended to by both runs, takes every value back.
    let r = ok(&["rollback", "--backup", &b, "--redis", &url]);
    counted(&r.stdout, "restored", N as u64);
    assert_eq!(snapshot(&mut c, "user:*"), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_values_are_left_alone_and_reported() {
    let r0 = RedisServer::start();
    let mut c = con(&r0);
    set(&mut c, "user:cher", r#"{"userName":"Cher"}"#);
    set(&mut c, "user:junk", "not json");
    set(&mut c, "user:ok", r#"{"userName":"Ada Lovelace"}"#);
    let before = snapshot(&mut c, "user:[cj]*");
    let r = migrate(&transform_to(&r0.url(), "3.0.0"));
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    counted(&r.stdout, "transformed", 1);
    has(&r.stdout, "failed 1: fails validation against 3.0.0");
    has(
        &r.stdout,
        "user:cher: fails validation against 3.0.0: missing required field `lastName`",
    );
    has(&r.stdout, "user:junk: the value is not JSON");
    assert_eq!(snapshot(&mut c, "user:[cj]*"), before);
}

#[test]
fn an_application_write_racing_the_transform_is_not_lost() {
    let r0 = RedisServer::start();
    let mut c = con(&r0);
    q::<()>(
        &mut c,
        redis::cmd("SET")
            .arg("user:1")
            .arg(r#"{"userName":"Ada Lovelace"}"#)
            .arg("EX")
            .arg(1000),
    );
    let mut child = Command::new(MIGRATE)
        .args(transform_to(&r0.url(), "3.0.0"))
        .args(["--pause-before-write", "2s", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    has(&line, "pausing");
    // The application writes while the tool holds a result computed from the old value.
    q::<()>(
        &mut c,
        redis::cmd("SET")
            .arg("user:1")
            .arg(r#"{"userName":"Grace Hopper","age":85}"#)
            .arg("KEEPTTL"),
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    has(
        &stdout,
        "changed by the application meanwhile (read again): 1",
    );
    let v: String = q(&mut c, redis::cmd("GET").arg("user:1"));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(
        (
            v["firstName"].as_str(),
            v["lastName"].as_str(),
            v["age"].as_i64()
        ),
        (Some("Grace"), Some("Hopper"), Some(85)),
        "{v}"
    );
    assert!(pttl(&mut c, b"user:1") > 900_000);
}

#[test]
fn copy_transforms_on_the_way_and_walks_back() {
    let (src, dst) = (RedisServer::start(), RedisServer::start());
    let (mut s, mut d) = (con(&src), con(&dst));
    fill_users(&mut s, 8);
    set(&mut s, "other", "as is");
    let before = snapshot(&mut s, "*");
    let r = ok(&[
        &between("copy", &src.url(), &dst.url())[..],
        &["--registry", USERS, "--to", "3.0.0"],
    ]
    .concat());
    counted(&r.stdout, "copied", 9);
    has(&r.stdout, "transformed on the way: 8");
    assert_eq!(snapshot(&mut s, "*"), before, "the source is not changed");
    let v: String = q(&mut d, redis::cmd("GET").arg("user:0"));
    has(&v, r#""firstName":"Ada""#);
    assert!(pttl(&mut d, b"user:0") > 3_500_000);
    assert_eq!(q::<String>(&mut d, redis::cmd("GET").arg("other")), "as is");
    // Walking the graph backwards (reverse edges of rename, add and split).
    ok(&transform_to(&dst.url(), "1.0.0"));
    let v: String = q(&mut d, redis::cmd("GET").arg("user:0"));
    assert!(
        v.contains(r#""userName":"Ada Lovelace0""#) && !v.contains("createdAt"),
        "{v}"
    );
}

/// Writes a registry into a fresh directory: the seed users with `migrations.json` replaced.
fn registry_with(name: &str, file: &str, text: &str) -> PathBuf {
    let dir = temp_dir(name);
    for entry in std::fs::read_dir(USERS).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join(file), text).unwrap();
    dir
}

fn fails_with(args: &[&str], message: &str) {
    let r = migrate(args);
    assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(message),
        "{args:?}: expected `{message}` in:\n{}",
        r.stderr
    );
}

#[test]
fn bad_input_gives_clear_errors_and_exit_code_2() {
    let r0 = RedisServer::start();
    let url = r0.url();
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("redis://127.0.0.1:{}/", l.local_addr().unwrap().port())
    };
    fails_with(
        &["copy", "--source", &down, "--destination", &url],
        "source redis at 127.0.0.1",
    );
    fails_with(
        &["verify", "--source", &url, "--destination", &down],
        "destination redis at 127.0.0.1",
    );
    fails_with(
        &["copy", "--source", "http://example", "--destination", &url],
        "bad source URL `http://example`",
    );
    fails_with(
        &["schema", "list", "--redis", "redis://:wrong@127.0.0.1:1"],
        "unreachable",
    );
    fails_with(&["copy", "--source", &url], "--destination");
    let copy_to_itself = ["copy", "--source", &url, "--destination", &url];
    fails_with(
        &[&copy_to_itself[..], &["--batch", "0"]].concat(),
        "--batch",
    );
    fails_with(
        &[&copy_to_itself[..], &["--type", "blob"]].concat(),
        "--type",
    );
    fails_with(
        &[&copy_to_itself[..], &["--registry", USERS]].concat(),
        "--to",
    );
    fails_with(&transform_to(&url, "9.9.9"), "no version 9.9.9");
    fails_with(
        &["schema", "diff", USERS, "1.0.0", "two"],
        "not a semantic version",
    );

    // Registries with one file replaced: (file, its text, `--to` for a transform or None for
    // `schema check`, the message).
    let cases = [
        (
            "user-2.0.0.json",
            r#"{"version": "2.0.0", "keyPattern": "user:*", "fields": {"#,
            None,
            "user-2.0.0.json: not a schema file: EOF while parsing",
        ),
        (
            "user-2.0.0.json",
            r#"{"version": "2.0.0", "keyPattern": "user:*", "fields": {"a": {"type": "date"}}}"#,
            Some("3.0.0"),
            "unknown variant `date`",
        ),
        (
            "migrations.json",
            r#"{"migrations": {"m": {"source": "1.0.0", "target": "2.0.0", "transforms": [{"type": "explode"}]}}}"#,
            None,
            "migrations.json: not a migrations file: unknown variant `explode`",
        ),
        (
            "migrations.json",
            r#"{"migrations": {"m": {"source": "1.0.0", "target": "2.0.0"}}}"#,
            Some("3.0.0"),
            "no migration path from 1.0.0 to 3.0.0",
        ),
        (
            "migrations.json",
            r#"{"migrations": {"m": {"source": "1.0.0", "target": "2.0.0", "transforms": [{"type": "removeField", "field": "email"}]},
                "n": {"source": "2.0.0", "target": "3.0.0"}}}"#,
            Some("1.0.0"),
            "removeField of `email` has no defaultValue to put back",
        ),
    ];
    for (i, (file, text, to, message)) in cases.into_iter().enumerate() {
        let dir = registry_with(&format!("bad{i}"), file, text);
        let d = dir.to_str().unwrap();
        match to {
            None => fails_with(&["schema", "check", d], message),
            Some(v) => fails_with(&transform_with(&url, d, v), message),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let dir = temp_dir("badbackup");
    let bad_backup = dir.join("backup.jsonl");
    std::fs::write(&bad_backup, "{}\n").unwrap();
    let b = bad_backup.to_str().unwrap();
    fails_with(
        &["rollback", "--backup", b, "--redis", &url],
        "not a backup header",
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // --help on every verb.
    for verb in [
        &["copy"][..],
        &["verify"],
        &["schema", "check"],
        &["schema", "diff"],
        &["schema", "push"],
        &["schema", "list"],
        &["transform"],
        &["rollback"],
    ] {
        let r = migrate(&[verb, &["--help"]].concat());
        assert_eq!(r.code, 0, "{verb:?}");
        assert!(
            r.stdout.contains("Usage: twincache-migrate"),
            "{verb:?}: {}",
            r.stdout
        );
    }
}

#[test]
fn schema_verbs() {
    let r = migrate(&["schema", "check", USERS]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    has(&r.stdout, "migration v2_to_v3.reverse  3.0.0 -> 2.0.0");
    let r = migrate(&["schema", "diff", USERS, "1.0.0", "2.0.0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    has(&r.stdout, "BREAKING     removed field `userName` (string)");
    has(
        &r.stdout,
        "new required field without a default: `fullName`",
    );
    has(&r.stdout, "3 changes from 1.0.0 to 2.0.0, 3 breaking");
    let r0 = RedisServer::start();
    let r = migrate(&["schema", "list", "--redis", &r0.url()]);
    has(&r.stdout, "no registry");
    let r = migrate(&["schema", "push", USERS, "--redis", &r0.url()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = migrate(&["schema", "list", "--redis", &r0.url()]);
    assert!(
        r.stdout.contains("schema 3.0.0  user:*  6 fields")
            && r.stdout.contains("migration v1_to_v2  1.0.0 -> 2.0.0"),
        "{}",
        r.stdout
    );
}
