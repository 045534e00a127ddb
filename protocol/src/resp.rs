//! RESP2, the Redis protocol: commands in, replies out.
//!
//! A command is either a multibulk array (`*2\r\n$3\r\nGET\r\n$1\r\na\r\n`, what client
//! libraries send) or an inline line (`GET a`, what a person types into netcat). The decoder
//! checks every count and length against its limits before reserving anything, and only
//! splits a command off the buffer once all of it has arrived; the arguments are then
//! zero-copy slices of it. Error texts are Redis' own, so tools that match on them work.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Redis' limit on an inline command (`PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 1024 * 1024;

/// A protocol error: the text after `-ERR Protocol error: `. The connection is closed after
/// replying, as Redis does, since the stream can no longer be trusted to be in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

impl ProtocolError {
    /// The full error reply.
    pub fn reply(self) -> Reply {
        Reply::Error(format!("ERR Protocol error: {}", self.0))
    }
}

/// Splits a byte stream into RESP commands.
#[derive(Debug, Clone)]
pub struct RespDecoder {
    max_bulk: usize,
}

/// Where a decode attempt got to.
enum Parse {
    Incomplete,
    /// A complete command spanning `len` bytes, with argument ranges within them.
    Command {
        len: usize,
        args: Vec<(usize, usize)>,
    },
    /// Blank inline lines to skip (Redis ignores them).
    Skip(usize),
}

impl RespDecoder {
    /// A decoder refusing bulk strings longer than `max_bulk` bytes.
    pub fn new(max_bulk: usize) -> RespDecoder {
        RespDecoder { max_bulk }
    }

    /// The next complete command in `buf` (removed from it), `Ok(None)` if more bytes are
    /// needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            if buf.is_empty() {
                return Ok(None);
            }
            let parsed = if buf[0] == b'*' {
                self.parse_multibulk(buf)?
            } else {
                parse_inline(buf)?
            };
            match parsed {
                Parse::Incomplete => return Ok(None),
                Parse::Skip(n) => buf.advance(n),
                Parse::Command { len, args } => {
                    let frame = buf.split_to(len).freeze();
                    return Ok(Some(
                        args.into_iter().map(|(s, e)| frame.slice(s..e)).collect(),
                    ));
                }
            }
        }
    }

    fn parse_multibulk(&self, buf: &[u8]) -> Result<Parse, ProtocolError> {
        let Some((count, mut pos)) =
            read_int_line(buf, 1, ProtocolError("invalid multibulk length"))?
        else {
            return Ok(Parse::Incomplete);
        };
        if count <= 0 || count as usize > MAX_ARGS {
            return Err(ProtocolError("invalid multibulk length"));
        }
        let count = count as usize;
        // Bounded: grows only with arguments actually present in the buffer.
        let mut args = Vec::with_capacity(count.min(16));
        for _ in 0..count {
            let Some(&tag) = buf.get(pos) else {
                return Ok(Parse::Incomplete);
            };
            if tag != b'$' {
                return Err(match tag {
                    b'+' => ProtocolError("expected '$', got '+'"),
                    b'-' => ProtocolError("expected '$', got '-'"),
                    b':' => ProtocolError("expected '$', got ':'"),
                    b'*' => ProtocolError("expected '$', got '*'"),
                    _ => ProtocolError("expected '$', got something else"),
                });
            }
            let Some((len, start)) =
                read_int_line(buf, pos + 1, ProtocolError("invalid bulk length"))?
            else {
                return Ok(Parse::Incomplete);
            };
            if len < 0 || len as usize > self.max_bulk {
                return Err(ProtocolError("invalid bulk length"));
            }
            let end = start + len as usize;
            if buf.len() < end + 2 {
                return Ok(Parse::Incomplete);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("invalid bulk format"));
            }
            args.push((start, end));
            pos = end + 2;
        }
        Ok(Parse::Command { len: pos, args })
    }
}

/// Reads `<digits>\r\n` starting at `from`; the number and the position after the line.
fn read_int_line(
    buf: &[u8],
    from: usize,
    err: ProtocolError,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    let Some(nl) = buf[from..].iter().position(|&b| b == b'\n') else {
        // 20 digits and a sign are the most a length can need.
        if buf.len() - from > 32 {
            return Err(err);
        }
        return Ok(None);
    };
    let line = &buf[from..from + nl];
    let line = line.strip_suffix(b"\r").ok_or(err)?;
    let n = std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(err)?;
    Ok(Some((n, from + nl + 1)))
}

fn parse_inline(buf: &[u8]) -> Result<Parse, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err(ProtocolError("too big inline request"));
        }
        return Ok(Parse::Incomplete);
    };
    if nl > MAX_INLINE {
        return Err(ProtocolError("too big inline request"));
    }
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = split_inline(line)?;
    if args.is_empty() {
        return Ok(Parse::Skip(nl + 1));
    }
    Ok(Parse::Command { len: nl + 1, args })
}

/// Splits an inline line into argument ranges like Redis' `sdssplitargs`: bare words, and
/// words in single or double quotes. Arguments stay zero-copy slices, so a backslash escape
/// inside quotes (which would need unescaping into a copy) is refused with an error; send
/// such arguments as a multibulk command.
fn split_inline(line: &[u8]) -> Result<Vec<(usize, usize)>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            break;
        }
        let quote = line[i];
        if quote == b'"' || quote == b'\'' {
            let start = i + 1;
            let close = line[start..]
                .iter()
                .position(|&b| b == quote)
                .ok_or(ProtocolError("unbalanced quotes in request"))?;
            let end = start + close;
            if line[start..end].contains(&b'\\') {
                return Err(ProtocolError(
                    "escapes in quoted inline arguments are not supported",
                ));
            }
            if end + 1 < line.len() && !line[end + 1].is_ascii_whitespace() {
                return Err(ProtocolError("unbalanced quotes in request"));
            }
            args.push((start, end));
            i = end + 1;
        } else {
            let start = i;
            while i < line.len() && !line[i].is_ascii_whitespace() {
                i += 1;
            }
            args.push((start, i));
        }
    }
    Ok(args)
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+<text>`
    Simple(&'static str),
    /// `-<text>`: the text starts with the error prefix (`ERR`, `TRYAGAIN`, ...).
    Error(String),
    /// `:<n>`
    Int(i64),
    /// `$<len>\r\n<bytes>`
    Bulk(Bytes),
    /// `$-1` (Redis' nil)
    Nil,
    /// `*<n>` followed by the elements
    Array(Vec<Reply>),
    /// A reply already encoded (one passed through from another Redis).
    Raw(Bytes),
}

/// Encodes a command as a RESP array of bulk strings (what clients send).
pub fn encode_command(args: &[Bytes], out: &mut BytesMut) {
    put_header(out, b'*', args.len() as i64);
    for a in args {
        put_header(out, b'$', a.len() as i64);
        out.put_slice(a);
        out.put_slice(b"\r\n");
    }
}

impl Reply {
    pub const OK: Reply = Reply::Simple("OK");

    pub fn err(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }

    /// Appends the reply's encoding to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Reply::Simple(s) => {
                out.put_u8(b'+');
                out.put_slice(s.as_bytes());
                out.put_slice(b"\r\n");
            }
            Reply::Error(s) => {
                out.put_u8(b'-');
                // A reply line cannot hold CR or LF; Redis replaces them with spaces too.
                out.extend(
                    s.bytes()
                        .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
                );
                out.put_slice(b"\r\n");
            }
            Reply::Int(n) => put_header(out, b':', *n),
            Reply::Bulk(b) => {
                put_header(out, b'$', b.len() as i64);
                out.put_slice(b);
                out.put_slice(b"\r\n");
            }
            Reply::Nil => out.put_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                put_header(out, b'*', items.len() as i64);
                for item in items {
                    item.encode(out);
                }
            }
            Reply::Raw(bytes) => out.put_slice(bytes),
        }
    }
}

fn put_header(out: &mut BytesMut, tag: u8, n: i64) {
    out.put_u8(tag);
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        out.put_u8(b'-');
    }
    out.put_slice(&digits[i..]);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(input: &[u8]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut d = RespDecoder::new(1024);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(cmd) = d.decode(&mut buf)? {
            out.push(cmd);
        }
        Ok(out)
    }

    fn args(list: &[&'static [u8]]) -> Vec<Bytes> {
        list.iter().map(|a| Bytes::from_static(a)).collect()
    }

    #[test]
    fn multibulk_commands() {
        let got = decode_all(
            b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n",
        )
        .unwrap();
        assert_eq!(
            got,
            vec![args(&[b"GET", b"a"]), args(&[b"SET", b"k", b"a\r\nb"])]
        );
    }

    #[test]
    fn incomplete_commands_wait_and_leave_the_buffer_alone() {
        let full = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            let mut d = RespDecoder::new(1024);
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(d.decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn inline_commands() {
        let got = decode_all(b"PING\r\n\r\n  set  k   'a b' \nGET \"x y\"\n").unwrap();
        assert_eq!(
            got,
            vec![
                args(&[b"PING"]),
                args(&[b"set", b"k", b"a b"]),
                args(&[b"GET", b"x y"])
            ]
        );
    }

    #[test]
    fn protocol_errors_use_redis_texts() {
        let err = |input: &[u8]| decode_all(input).unwrap_err().0;
        assert_eq!(err(b"*-5\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*abc\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*0\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*2\r\n$-3\r\n"), "invalid bulk length");
        assert_eq!(err(b"*1\r\n$2000\r\n"), "invalid bulk length");
        assert_eq!(
            err(b"*1\r\n$999999999999999999999\r\n"),
            "invalid bulk length"
        );
        assert_eq!(err(b"*1\r\n+ab\r\n"), "expected '$', got '+'");
        assert_eq!(err(b"*1\r\n$2\r\nabcd\r\n"), "invalid bulk format");
        assert_eq!(err(b"set \"a b\r\n"), "unbalanced quotes in request");
        assert_eq!(err(&[b'x'; MAX_INLINE + 2]), "too big inline request");
        // A huge count with nothing behind it reserves nothing and waits.
        let mut buf = BytesMut::from(&b"*1048576\r\n"[..]);
        assert_eq!(RespDecoder::new(1024).decode(&mut buf), Ok(None));
    }

    #[test]
    fn replies_encode_as_redis_does() {
        let mut out = BytesMut::new();
        Reply::OK.encode(&mut out);
        Reply::err("ERR bad\r\nthing").encode(&mut out);
        Reply::Int(-42).encode(&mut out);
        Reply::Bulk(Bytes::from_static(b"hi")).encode(&mut out);
        Reply::Nil.encode(&mut out);
        Reply::Array(vec![Reply::Int(1), Reply::Nil]).encode(&mut out);
        assert_eq!(
            &out[..],
            &b"+OK\r\n-ERR bad  thing\r\n:-42\r\n$2\r\nhi\r\n$-1\r\n*2\r\n:1\r\n$-1\r\n"[..]
        );
    }

    proptest! {
        #[test]
        fn multibulk_round_trips_through_split_reads(
            cmds in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5), 1..6),
            cut in 1usize..50,
        ) {
            let mut wire = BytesMut::new();
            for cmd in &cmds {
                Reply::Array(cmd.iter().map(|a| Reply::Bulk(Bytes::from(a.clone()))).collect()).encode(&mut wire);
            }
            let mut d = RespDecoder::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                buf.extend_from_slice(chunk);
                while let Some(c) = d.decode(&mut buf).unwrap() {
                    got.push(c.into_iter().map(|b| b.to_vec()).collect::<Vec<_>>());
                }
            }
            prop_assert_eq!(got, cmds);
        }
    }
}
