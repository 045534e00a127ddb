//! Bounded memory and time for every input: each case reproduces a way one careless or
//! hostile client took hundreds of MB or every connection slot, and asserts the bound from
//! `/proc` (generous enough for a shared 2-core machine).

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use twincache_client::Bytes;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twincache_client::Client;

use crate::faults::{state_of, wait_status, worker_on, FAST};
use crate::harness::{Cluster, Proc, RespConn};

const MB: u64 = 1 << 20;

/// A `/proc/PID/status` field in bytes (`VmRSS`, `VmHWM`: peak resident memory).
fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Stores a 1 MiB value under `big` (compressible: the worker keeps it small, the
/// orchestrator sees it whole).
async fn store_big(addr: SocketAddr) {
    let c = Client::connect(&addr.to_string()).await.unwrap();
    c.set("big", vec![b'x'; MB as usize]).await.unwrap();
}

/// Reads until the server closes the connection (bounded); whether it did.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut sink = vec![0u8; 1 << 16];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            _ => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_mget_streams_its_reply_in_bounded_memory() {
    let cluster = Cluster::start(1).await;
    store_big(cluster.orch.addr).await;
    let pid = cluster.orch.pid();
    let mut cmd = String::from("*401\r\n$4\r\nMGET\r\n");
    cmd += &"$3\r\nbig\r\n".repeat(400);
    let mut stream = TcpStream::connect(cluster.orch.addr).await.unwrap();
    stream.write_all(cmd.as_bytes()).await.unwrap();
    // 400 MiB of reply, read as fast as it comes.
    let header = format!("$1048576\r\n{}\r\n", "x".repeat(MB as usize));
    let expected = 6 + 400 * header.len() as u64;
    let (mut got, mut head) = (0u64, Vec::new());
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < expected {
        let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .expect("the whole reply in time")
            .unwrap();
        assert!(n > 0, "closed after {got} of {expected} bytes");
        if got < 16 {
            head.extend_from_slice(&buf[..n.min(16)]);
        }
        got += n as u64;
    }
    assert_eq!(got, expected);
    assert!(head.starts_with(b"*400\r\n$1048576\r\n"), "{head:?}");
    let peak = proc_kb(pid, "VmHWM");
    eprintln!("peak RSS {} MiB", peak / MB);
    assert!(peak < 150 * MB, "orchestrator peak RSS {} MiB", peak / MB);
}

/// An MGET of a few keys reads them with one program per pair; values too large to come
/// back in one answer are read again a key at a time, and the reply is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mget_of_values_too_large_for_one_answer_still_answers_them_all() {
    let cluster = Cluster::start(1).await;
    store_big(cluster.orch.addr).await;
    let mut c = RespConn::connect(cluster.orch.addr).await;
    c.call(&[b"SET", b"small", b"s"]).await;
    let mut keys: Vec<&[u8]> = vec![b"big"; 12];
    keys.insert(3, b"small");
    keys.push(b"missing");
    let mut want = format!("*{}\r\n", keys.len()).into_bytes();
    for k in &keys {
        want.extend_from_slice(
            match *k {
                b"big" => format!("$1048576\r\n{}\r\n", "x".repeat(MB as usize)).into_bytes(),
                b"small" => b"$1\r\ns\r\n".to_vec(),
                _ => b"$-1\r\n".to_vec(),
            }
            .as_slice(),
        );
    }
    let got = c
        .call(&[&[b"MGET".as_slice()], keys.as_slice()].concat())
        .await;
    assert_eq!(got.len(), want.len());
    assert!(got[..] == want[..], "the same values, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_cut_at_its_limit() {
    let cluster = Cluster::start_with(1, &["--max-client-buffer", "32MiB"]).await;
    store_big(cluster.orch.addr).await;
    let pid = cluster.orch.pid();
    let mut stream = TcpStream::connect(cluster.orch.addr).await.unwrap();
    // 2.4 KB of input asking for 300 MiB of replies, never read.
    stream
        .write_all("get||big\n".repeat(300).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        closed_within(&mut stream, Duration::from_secs(10)).await,
        "cut"
    );
    let peak = proc_kb(pid, "VmHWM");
    eprintln!("peak RSS {} MiB", peak / MB);
    assert!(peak < 150 * MB, "orchestrator peak RSS {} MiB", peak / MB);
    assert!(cluster
        .orch
        .log_text()
        .contains("closing client connection"));
    // Everyone else is served.
    let c = Client::connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    assert_eq!(
        c.get::<Bytes>("big").await.unwrap().map(|v| v.len()),
        Some(MB as usize)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_frames_on_many_connections_stay_within_the_budget() {
    let workers: Vec<Proc> = (0..2)
        .map(|_| worker_on(0, &["--max-buffer-memory", "64MiB"]))
        .collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
    let orch = Proc::orchestrator(&addrs, &["--max-buffer-memory", "64MiB"]);
    for target in [orch.addr, addrs[0]] {
        let pid = if target == orch.addr {
            orch.pid()
        } else {
            workers[0].pid()
        };
        let mut conns = Vec::new();
        let chunk = vec![0u8; MB as usize];
        // 40 connections, each 15 MiB into a frame one byte longer, which never completes.
        for _ in 0..40 {
            let Ok(mut s) = TcpStream::connect(target).await else {
                continue;
            };
            let mut head = vec![0xB7, b'T', b'C', 1];
            head.extend_from_slice(&(15 * MB as u32 + 1).to_be_bytes());
            let _ = s.write_all(&head).await;
            for _ in 0..15 {
                if tokio::time::timeout(Duration::from_millis(500), s.write_all(&chunk))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            conns.push(s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peak = proc_kb(pid, "VmHWM");
        eprintln!("peak RSS {} MiB", peak / MB);
        assert!(
            peak < 200 * MB,
            "{target}: peak RSS {} MiB with a 64 MiB budget",
            peak / MB
        );
        let mut cut = 0;
        for s in &mut conns {
            cut += usize::from(closed_within(s, Duration::from_millis(300)).await);
        }
        assert!(cut > 20, "{target}: only {cut} of 40 connections cut");
    }
    // The cluster still serves.
    let c = Client::connect(&orch.addr.to_string()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.set("after", "v").await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_state_has_a_deadline() {
    let a = worker_on(0, &["--idle-timeout", "1s", "--max-connections", "6"]);
    let b = worker_on(0, &["--idle-timeout", "1s"]);
    // An outsider takes every slot of worker A before the orchestrator starts.
    let mut squatters = Vec::new();
    for _ in 0..6 {
        squatters.push(TcpStream::connect(a.addr).await.unwrap());
    }
    let orch = Proc::orchestrator(
        &[a.addr, b.addr],
        &[FAST, &["--idle-timeout", "1s"]].concat(),
    );
    wait_status(orch.addr, "both in sync", |s| {
        state_of(s, &a.addr) == "in_sync" && state_of(s, &b.addr) == "in_sync"
    })
    .await;
    for s in &mut squatters {
        assert!(closed_within(s, Duration::from_secs(3)).await);
    }
    // 1 to 3 bytes of the binary preamble, then silence; a half-sent first line.
    for partial in [&b"\xB7"[..], b"\xB7TC", b"get||"] {
        let mut s = TcpStream::connect(orch.addr).await.unwrap();
        s.write_all(partial).await.unwrap();
        let started = Instant::now();
        assert!(
            closed_within(&mut s, Duration::from_secs(5)).await,
            "{partial:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(4));
    }
}

/// One frozen worker: its partner keeps serving every write, and the orchestrator's memory
/// stays flat (the link's outbox is capped and the frozen link closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_costs_neither_availability_nor_memory() {
    let cluster = Cluster::start(1).await;
    let pid = cluster.orch.pid();
    cluster.workers[0].signal("STOP");
    let port = cluster.orch.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-benchmark")
            .args([
                "-p", &port, "-t", "set", "-d", "1024", "-c", "4", "-P", "4", "-n", "200000", "-r",
                "100000", "-e", "-q",
            ])
            .output()
            .expect("redis-benchmark is installed (apt-get install -y redis-tools)")
    })
    .await
    .unwrap();
    cluster.workers[0].signal("CONT");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("ERR") && !text.contains("TRYAGAIN"),
        "{text}"
    );
    assert!(text.contains("requests per second"), "{text}");
    let peak = proc_kb(pid, "VmHWM");
    eprintln!("peak RSS {} MiB", peak / MB);
    assert!(peak < 100 * MB, "orchestrator peak RSS {} MiB", peak / MB);
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp_command_over_the_limit_is_refused_before_it_arrives() {
    let cluster = Cluster::start(1).await;
    let pid = cluster.orch.pid();
    let stream = TcpStream::connect(cluster.orch.addr).await.unwrap();
    // 52 bulks of 16 MiB: 832 MiB in all, over the 64 MiB a connection may hold; the
    // fourth bulk's header takes the declared total over, before its bytes arrive.
    let bulk = format!("$16777216\r\n{}\r\n", "x".repeat(16 << 20));
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        // Three whole bulks, then the fourth's header: nothing more than the server needs
        // to see, so it has no unread input to reset the connection over.
        let _ = wr.write_all(b"*52\r\n").await;
        for _ in 0..3 {
            if wr.write_all(bulk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = wr.write_all(b"$16777216\r\n").await;
    });
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut reply)).await;
    writer.abort();
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("-ERR Protocol error: command larger than the query buffer limit"),
        "{reply:?} {read:?}; log:\n{}",
        cluster.orch.log_text()
    );
    // 48 MiB buffered (within the 64 MiB limit), and the buffer's last growth copies it:
    // about twice that at the peak, never the 832 MiB declared.
    let peak = proc_kb(pid, "VmHWM");
    eprintln!("peak RSS {} MiB", peak / MB);
    assert!(peak < 220 * MB, "orchestrator peak RSS {} MiB", peak / MB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_trickled_in_small_writes_costs_linear_work() {
    let cluster = Cluster::start(1).await;
    let pid = cluster.orch.pid();
    let before = cpu_seconds(pid);
    let mut stream = TcpStream::connect(cluster.orch.addr).await.unwrap();
    // An unknown command with 400,000 one-byte arguments, 70 bytes per write.
    let mut cmd = String::from("*400001\r\n$7\r\nNOTACMD\r\n");
    cmd += &"$1\r\na\r\n".repeat(400_000);
    for piece in cmd.as_bytes().chunks(70) {
        stream.write_all(piece).await.unwrap();
    }
    let mut reply = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut reply))
        .await
        .expect("answered")
        .unwrap();
    assert!(reply[..n].starts_with(b"-ERR unknown command 'NOTACMD'"));
    let used = cpu_seconds(pid) - before;
    eprintln!("orchestrator CPU for the trickled command: {used:.2} s");
    assert!(used < 5.0, "the orchestrator used {used:.1} s of CPU");
}

/// A value larger than the orchestrator's `--max-frame`, stored on the workers directly, is
/// answered "too large", and the links to the workers survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_over_the_orchestrators_frame_limit_is_too_large_not_unreachable() {
    let cluster = Cluster::start_with(1, &["--max-frame", "1MiB"]).await;
    let big = crate::harness::noise(7, 2 * MB as usize);
    for w in &cluster.workers {
        let direct = Client::connect(&w.addr.to_string()).await.unwrap();
        let mut req = twincache_protocol::frame::Request::new(
            twincache_protocol::frame::Op::Set,
            bytes::Bytes::from_static(b"huge"),
        );
        req.value = big.clone().into();
        req.version = 1;
        assert_eq!(
            direct.call(req).await.unwrap().status,
            twincache_client::Status::Ok
        );
    }
    let c = Client::connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    for _ in 0..10 {
        let err = c.get::<Bytes>("huge").await.unwrap_err();
        assert_eq!(
            err.status(),
            Some(twincache_client::Status::TooLarge),
            "{err}"
        );
        assert!(err.to_string().contains("exceeds"), "{err}");
        c.set("small", "v").await.unwrap();
        assert_eq!(
            c.get::<Bytes>("small").await.unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
    let status = crate::faults::status(cluster.orch.addr).await;
    assert!(
        !status.contains("down") && !status.contains("stale"),
        "{status}"
    );
}

/// A connection that went quiet gives its buffers back: 500 connections that each sent a
/// GET hold far less than their two 16 KiB buffers once a quiet second has passed.
/// What a connection declares but does not send is not memory of ours: 300 connections that
/// each send a 32-byte RESP header declaring a 16 MB argument (or a binary frame header
/// declaring a 16 MB frame) and then stall. The reader reserved the declared length up to
/// 1 MiB at once (the frame codec, all of it), which the allocator made resident: 1.1 MB a
/// connection on the orchestrator and 2.2 MB on a worker, none of it charged to the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_lengths_not_sent_cost_no_memory() {
    let workers: Vec<Proc> = (0..2).map(|_| worker_on(0, &[])).collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
    let orch = Proc::orchestrator(&addrs, &[]);
    let resp_head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$16000000\r\na".to_vec();
    let mut frame_head = vec![0xB7, b'T', b'C', 1];
    frame_head.extend_from_slice(&16_000_000u32.to_be_bytes());
    frame_head.extend_from_slice(&[0u8; 30]);
    for (target, pid, head) in [
        (orch.addr, orch.pid(), &resp_head),
        (orch.addr, orch.pid(), &frame_head),
        (addrs[0], workers[0].pid(), &frame_head),
    ] {
        let before = proc_kb(pid, "VmRSS");
        let mut conns = Vec::new();
        for _ in 0..300 {
            let mut s = TcpStream::connect(target).await.unwrap();
            s.write_all(head).await.unwrap();
            conns.push(s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_conn = proc_kb(pid, "VmRSS").saturating_sub(before) / 300;
        eprintln!("{target}: {per_conn} bytes per connection");
        assert!(
            per_conn < 400 * 1024,
            "{target}: {per_conn} bytes per connection that declared 16 MB"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connections_give_their_buffers_back() {
    let cluster = Cluster::start(1).await;
    let pid = cluster.orch.pid();
    let mut warm = RespConn::connect(cluster.orch.addr).await;
    warm.call(&[b"GET", b"nothing"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = proc_kb(pid, "VmRSS");
    let mut conns = Vec::new();
    for _ in 0..500 {
        let mut c = RespConn::connect(cluster.orch.addr).await;
        c.call(&[b"GET", b"nothing"]).await;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let per_conn = proc_kb(pid, "VmRSS").saturating_sub(before) / 500;
    eprintln!("{per_conn} bytes per quiet connection");
    assert!(
        per_conn < 12 * 1024,
        "{per_conn} bytes per quiet connection"
    );
}

/// A hash the value limit lets in can be read whole: HGETALL's reply may be longer than the
/// stored hash (a field of 8 bytes and a value of 1 take 17 bytes stored, 21 in the reply),
/// and a read program may answer what a frame carries, not only the largest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_near_the_value_limit_reads_back_whole() {
    // --max-frame 1MiB: values up to about 511 KiB.
    let cluster = Cluster::start_with(1, &["--max-frame", "1MiB"]).await;
    let mut c = RespConn::connect(cluster.orch.addr).await;
    const FIELDS: usize = 30_000;
    let fields: Vec<String> = (0..FIELDS).map(|i| format!("{i:08}")).collect();
    let mut args: Vec<&[u8]> = vec![b"HSET", b"h"];
    for f in &fields {
        args.push(f.as_bytes());
        args.push(b"v");
    }
    let set = c.call(&args).await;
    assert_eq!(&set[..], format!(":{FIELDS}\r\n").as_bytes());
    let all = c.call(&[b"HGETALL", b"h"]).await;
    assert!(
        all.starts_with(format!("*{}\r\n", 2 * FIELDS).as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&all[..all.len().min(80)])
    );
    assert_eq!(
        all.len(),
        format!("*{}\r\n", 2 * FIELDS).len() + FIELDS * 21
    );
}

/// A streamed MGET (more than 16 keys) over two pairs, where one pair's chunk holds values
/// past its share of the window: that chunk's keys are read again one at a time, the other
/// chunks' values are kept, and every value comes back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_mget_rereads_only_the_chunk_too_large_for_its_share() {
    let cluster = Cluster::start(2).await;
    let c = Client::connect(&cluster.orch.addr.to_string())
        .await
        .unwrap();
    let mut keys = Vec::new();
    for n in 0..30 {
        let key = cluster.key_on_pair(n % 2, n);
        // 15 keys a pair, one chunk each: each chunk's share of the 8 MiB window is 4 MiB,
        // and pair 1's first three keys hold 4.5 MiB.
        let value = if n % 2 == 1 && n < 6 {
            vec![b'0' + n as u8; 3 * MB as usize / 2]
        } else {
            key.as_bytes().to_vec()
        };
        c.set(key.as_str(), value.clone()).await.unwrap();
        keys.push((key, value));
    }
    let mut conn = RespConn::connect(cluster.orch.addr).await;
    mget_answers(&mut conn, &keys).await;

    // 40 keys on one pair: programs of 32 and 8 keys, a 4 MiB share each. The first holds
    // 5 MiB, so it is read again as programs of 16 keys (2 MiB each), and the keys of the
    // one holding the large value one at a time.
    let mut keys = Vec::new();
    for n in 100..140 {
        let key = cluster.key_on_pair(0, n);
        let value = if n == 103 {
            vec![b'L'; 5 * MB as usize]
        } else {
            key.as_bytes().to_vec()
        };
        c.set(key.as_str(), value.clone()).await.unwrap();
        keys.push((key, value));
    }
    mget_answers(&mut conn, &keys).await;
}

/// An MGET of `keys` on `conn` answers their values, in order.
async fn mget_answers(conn: &mut RespConn, keys: &[(String, Vec<u8>)]) {
    let mut want = format!("*{}\r\n", keys.len()).into_bytes();
    let mut args: Vec<&[u8]> = vec![b"MGET"];
    for (k, v) in keys {
        args.push(k.as_bytes());
        want.extend_from_slice(format!("${}\r\n", v.len()).as_bytes());
        want.extend_from_slice(v);
        want.extend_from_slice(b"\r\n");
    }
    let got = conn.call(&args).await;
    assert_eq!(got.len(), want.len());
    assert!(got[..] == want[..], "the same values, in order");
}

/// One SCAN or KEYS with a hostile MATCH pattern (100,000 `*` and an `x`) does not take the
/// pair down: the pattern is compiled once, and a worker's scan step stops at its time
/// budget. Before, each key cost the pattern's length, a step took seconds, both workers
/// were taken for down in turn, and other clients' GETs failed for ten seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_match_pattern_does_not_take_the_pair_down() {
    let cluster = Cluster::start(1).await;
    let addr = cluster.orch.addr;
    let mut load = RespConn::connect(addr).await;
    let mut pipeline = bytes::BytesMut::new();
    for i in 0..20_000 {
        let key = format!("key:{i}");
        crate::harness::encode(&[b"SET", key.as_bytes(), b"v"], &mut pipeline);
    }
    load.send_raw(&pipeline).await;
    for _ in 0..20_000 {
        assert_eq!(&load.reply().await[..], b"+OK\r\n");
    }
    let mut pattern = vec![b'*'; 100_000];
    pattern.push(b'x');
    let mut bystander = RespConn::connect(addr).await;
    for cmd in [
        &[&b"SCAN"[..], b"0", b"MATCH", &pattern, b"COUNT", b"10000"][..],
        &[b"KEYS", &pattern],
    ] {
        let started = Instant::now();
        let mut hostile = RespConn::connect(addr).await;
        hostile.call(cmd).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            &bystander.call(&[b"GET", b"key:1"]).await[..],
            b"$1\r\nv\r\n"
        );
    }
    let status = crate::faults::status(addr).await;
    for w in &cluster.workers {
        assert_eq!(state_of(&status, &w.addr), "in_sync", "{status}");
    }
}

/// A command on many keys costs work linear in its keys. MSET's one request per key was
/// awaited with `join_all` inside the runtime's cooperative budget: past 128 answers a poll,
/// every other future answered `Pending` and woke again, so each 128 answers polled them
/// all (MSET of 50,000 keys 2 s, of 100,000 6.4 s, of 200,000 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_many_keys_costs_linear_work() {
    let cluster = Cluster::start(1).await;
    let mut conn = RespConn::connect(cluster.orch.addr).await;
    let command = |name: &'static str, n: usize, tag: &str| {
        let keys: Vec<String> = (0..n).map(|i| format!("{tag}:{i}")).collect();
        let mut args: Vec<&[u8]> = vec![name.as_bytes()];
        for k in &keys {
            args.extend([k.as_bytes(), b"v"]);
        }
        let mut cmd = bytes::BytesMut::new();
        crate::harness::encode(&args, &mut cmd);
        cmd
    };
    // MSETNX, one program per pair, searched its staged keys for each key, on the worker
    // and when grouping them by pair: 20,000 keys took the worker long enough to miss its
    // health checks.
    for (name, ok) in [("MSET", &b"+OK\r\n"[..]), ("MSETNX", b":1\r\n")] {
        let mut times = Vec::new();
        for (n, tag) in [(1_000, "warm"), (10_000, "s"), (40_000, "l")] {
            let cmd = command(name, n, &format!("{name}{tag}"));
            let started = Instant::now();
            conn.send_raw(&cmd).await;
            assert_eq!(&conn.reply().await[..], ok, "{name}");
            times.push(started.elapsed());
        }
        let (t1, t4) = (times[1], times[2]);
        eprintln!("{name} of 10,000 keys {t1:?}, of 40,000 {t4:?}");
        assert!(
            t4 < 10 * t1,
            "{name}: four times the keys took {:.1} times as long",
            t4.as_secs_f64() / t1.as_secs_f64()
        );
    }
}

/// A command on many keys holds only a window of their requests at once: each costs the
/// orchestrator about 2 KB, a key costs its client a few bytes. A DEL of a million keys (a
/// 10 MB command) took the orchestrator to 2.2 GB, and its pair past the worker timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_many_keys_holds_a_window_of_requests() {
    let cluster = Cluster::start(1).await;
    let pid = cluster.orch.pid();
    let mut c = RespConn::connect(cluster.orch.addr).await;
    c.call(&[b"SET", b"k7", b"v"]).await;
    let keys: Vec<Vec<u8>> = (0..200_000).map(|i| format!("k{i}").into_bytes()).collect();
    let peak_before = proc_kb(pid, "VmHWM");
    for (command, want) in [
        (&b"EXISTS"[..], &b":1\r\n"[..]),
        (b"TOUCH", b":1\r\n"),
        (b"MGET", b"*200000\r\n"),
        (b"DEL", b":1\r\n"),
    ] {
        let mut args: Vec<&[u8]> = vec![command];
        args.extend(keys.iter().map(Vec::as_slice));
        let reply = c.call(&args).await;
        assert!(
            reply.starts_with(want),
            "{}",
            String::from_utf8_lossy(&reply[..40])
        );
    }
    let mut args: Vec<&[u8]> = vec![b"MSET"];
    args.extend(keys.iter().map(Vec::as_slice));
    assert_eq!(&c.call(&args).await[..], b"+OK\r\n");
    let grew = proc_kb(pid, "VmHWM").saturating_sub(peak_before);
    eprintln!("peak grew by {} MB", grew >> 20);
    assert!(grew < 150 << 20, "peak grew by {} MB", grew >> 20);
}

/// One pair behind an orchestrator whose client connections may hold 2 MiB each (frames and
/// lines of up to 512 KiB): small enough for a test's few large values to reach it.
async fn small_buffers() -> Cluster {
    let flags = [
        "--max-client-buffer",
        "2MiB",
        "--max-frame",
        "512KiB",
        "--max-line",
        "512KiB",
    ];
    Cluster::start_with(1, &flags).await
}

/// The binary protocol's `command` op decodes its RESP command into a copy and a handle per
/// argument, which hold several times the frame for many small arguments (85,000 empty
/// ones: 510 KB of frame, 3.2 MB decoded). That is held within the connection's limit as a
/// RESP command is: a command whose bytes and handles pass half of it is refused as RESP
/// refuses one past its limit, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_op_of_many_arguments_is_held_within_the_connections_limit() {
    use crate::commands::command_op;
    let cluster = small_buffers().await;
    let mut stream = TcpStream::connect(cluster.orch.addr).await.unwrap();
    stream
        .write_all(&twincache_protocol::frame::PREAMBLE)
        .await
        .unwrap();
    let mut args = vec![""; 85_000];
    args[0] = "DEL";
    let refused = command_op(&mut stream, 1, &args, false).await;
    assert!(
        refused.starts_with(
            b"-ERR Protocol error: command larger than the query buffer limit (1048576 bytes)"
        ),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    args.truncate(1_000);
    assert_eq!(
        &command_op(&mut stream, 2, &args, false).await[..],
        b":0\r\n"
    );
    assert_eq!(
        &command_op(&mut stream, 3, &["PING"], false).await[..],
        b"+PONG\r\n"
    );
}

/// A pipeline of large values is charged to its connection until each is answered: one
/// client could otherwise have its whole window of them in flight (256 requests, each up to
/// the frame limit) past its limit, while a frozen worker kept them waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_large_values_is_held_within_the_connections_limit() {
    let cluster = small_buffers().await;
    let pid = cluster.orch.pid();
    let peak_before = proc_kb(pid, "VmHWM");
    cluster.workers[1].signal("STOP");
    let value = vec![b'v'; 256 << 10];
    let mut pipeline = bytes::BytesMut::new();
    const SETS: usize = 256;
    for i in 0..SETS {
        crate::harness::encode(
            &[b"SET", format!("big{i}").as_bytes(), &value],
            &mut pipeline,
        );
    }
    let mut c = RespConn::connect(cluster.orch.addr).await;
    c.send_raw(&pipeline).await;
    for i in 0..SETS {
        assert_eq!(&c.reply().await[..], b"+OK\r\n", "SET {i}");
    }
    cluster.workers[1].signal("CONT");
    let grew = proc_kb(pid, "VmHWM").saturating_sub(peak_before);
    eprintln!("peak grew by {} MB", grew / MB);
    assert!(grew < 24 * MB, "peak grew by {} MB", grew / MB);
}

/// A burst of writes from many clients at once waits its turn in their sessions: it used
/// to overflow the worker links' outboxes, which failed writes (`-TRYAGAIN`) and marked
/// healthy workers as having missed them (stale, to be resynced). Large values, and values
/// under the size a session charges to its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_from_many_clients_fails_none() {
    let cluster = Cluster::start(1).await;
    for (clients, sets, size) in [(8, 40, 256 << 10), (32, 150, 15_000)] {
        let value = vec![b'v'; size];
        let clients = (0..clients).map(|c| {
            let (addr, value) = (cluster.orch.addr, value.clone());
            tokio::spawn(async move {
                let mut pipeline = bytes::BytesMut::new();
                for i in 0..sets {
                    let key = format!("burst{size}.{c}.{i}");
                    crate::harness::encode(&[b"SET", key.as_bytes(), &value], &mut pipeline);
                }
                RespConn::pipelined(addr, &pipeline, sets).await
            })
        });
        for replies in futures_util::future::join_all(clients).await {
            for reply in replies.unwrap() {
                assert_eq!(
                    &reply[..],
                    b"+OK\r\n",
                    "{}",
                    String::from_utf8_lossy(&reply)
                );
            }
        }
    }
    let log = cluster.orch.log_text();
    assert!(!log.contains("missed a write"), "{log}");
}

/// A transaction's queued commands are charged to its connection until EXEC: past half its
/// limit a command is refused and EXEC aborts, and the connection still reads EXEC. (They
/// were held with nothing charged, so one client could queue without bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_queue_is_held_within_the_connections_limit() {
    let cluster = small_buffers().await;
    let mut c = RespConn::connect(cluster.orch.addr).await;
    assert_eq!(&c.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    let value = vec![b'v'; 256 << 10];
    let mut replies = Vec::new();
    for i in 0..8 {
        let key = format!("{{t}}k{i}");
        replies.push(c.call(&[b"SET", key.as_bytes(), &value]).await);
    }
    assert_eq!(&replies[0][..], b"+QUEUED\r\n");
    let refused = replies
        .iter()
        .filter(|r| r.starts_with(b"-ERR the transaction holds"));
    assert!(refused.count() > 0, "{replies:?}");
    let exec = c.call(&[b"EXEC"]).await;
    assert!(
        exec.starts_with(b"-EXECABORT"),
        "{:?}",
        String::from_utf8_lossy(&exec)
    );
    assert_eq!(&c.call(&[b"GET", b"{t}k0"]).await[..], b"$-1\r\n");
    // Within the limit, the same transaction runs.
    assert_eq!(&c.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    for i in 0..2 {
        let key = format!("{{t}}k{i}");
        assert_eq!(
            &c.call(&[b"SET", key.as_bytes(), &value]).await[..],
            b"+QUEUED\r\n"
        );
    }
    assert_eq!(&c.call(&[b"EXEC"]).await[..], b"*2\r\n+OK\r\n+OK\r\n");
}
