//! Bad input: the offender gets a clear code, everyone else keeps being served.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;
use twincache_protocol::frame::{FrameCodec, Response, PREAMBLE};
use twincache_protocol::Status;

use crate::harness::{exchange, Cluster, TextConn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_overlong_lines_and_disconnects_leave_others_unaffected() {
    let cluster = Cluster::start_with(1, &["--max-line", "1KiB"]).await;
    let addr = cluster.orch.addr;
    // A well-behaved client, connected throughout.
    let mut good = TextConn::connect(addr).await;
    assert_eq!(good.request("set||good||1").await, "0||");

    // Garbage bytes, then a valid request on the same connection.
    let garbage: Vec<u8> = (0u8..=255).filter(|&b| b != b'\n').collect();
    let mut input = garbage.clone();
    input.extend_from_slice(b"\nping\n");
    let out = exchange(addr, &input).await;
    assert!(out.starts_with("3||"), "{out}");
    assert!(out.ends_with("0||PONG\n"), "{out}");

    // An overlong line: code 5, the line skipped, the connection still usable.
    let mut input = b"set||long||".to_vec();
    input.extend(std::iter::repeat_n(b'x', 100_000));
    input.extend_from_slice(b"\nget||long\nping\n");
    let out = exchange(addr, &input).await;
    assert_eq!(out, "5||line too long\n2||key not found\n0||PONG\n");

    // A client that disconnects mid-line: nothing is stored.
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"set||half||abc").await.unwrap();
    }
    // A client that stops sending mid-line is told, and nothing is stored either.
    let out = exchange(addr, b"set||half||abc").await;
    assert!(out.starts_with("1||incomplete line"), "{out}");
    assert_eq!(good.request("get||half").await, "2||key not found");

    // Many at once, while the good client keeps working.
    let abusers: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                let mut junk = vec![b'*'; 5000 + i];
                junk.extend_from_slice(b"\r\n\x00\x01||||\n");
                exchange(addr, &junk).await
            })
        })
        .collect();
    for _ in 0..20 {
        assert_eq!(good.request("get||good").await, "0||1");
    }
    for a in abusers {
        a.await.unwrap();
    }
    assert_eq!(good.request("get||good").await, "0||1");
}

async fn read_response(stream: &mut TcpStream) -> Option<Response> {
    let mut codec = FrameCodec::<Response>::new(1 << 20);
    let mut buf = BytesMut::new();
    loop {
        if let Some(resp) = codec.decode(&mut buf).unwrap() {
            return Some(resp);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(&mut buf))
            .await
            .expect("answer in time")
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_binary_frames_are_answered_and_the_connection_closed() {
    let cluster = Cluster::start_with(1, &["--max-frame", "64KiB"]).await;
    let addr = cluster.orch.addr;
    let client = twincache_client::Client::connect(&addr.to_string())
        .await
        .unwrap();

    // A frame announcing 4 GiB: refused before anything is allocated.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&PREAMBLE).await.unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(
        read_response(&mut s).await.unwrap().status,
        Status::TooLarge
    );
    assert!(
        read_response(&mut s).await.is_none(),
        "connection closed after"
    );

    // A body too short to be a request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut frame = BytesMut::new();
    frame.put_slice(&PREAMBLE);
    frame.put_u32(3);
    frame.put_slice(b"abc");
    s.write_all(&frame).await.unwrap();
    assert_eq!(
        read_response(&mut s).await.unwrap().status,
        Status::ParseError
    );

    // A wrong protocol version.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[PREAMBLE[0], b'T', b'C', 99]).await.unwrap();
    assert_eq!(
        read_response(&mut s).await.unwrap().status,
        Status::ParseError
    );

    // An oversized value through the client: a clear error, and the client recovers.
    let err = client.set("big", vec![0u8; 100_000]).await.unwrap_err();
    assert!(
        err.status() == Some(Status::TooLarge)
            || matches!(err, twincache_client::Error::ConnectionClosed),
        "{err}"
    );
    client.set("small", "ok").await.unwrap();
    assert_eq!(
        client.get::<Bytes>("small").await.unwrap().as_deref(),
        Some(&b"ok"[..])
    );
}
