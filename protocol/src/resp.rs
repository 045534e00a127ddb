//! RESP, the Redis protocol: commands in, replies out (RESP2, and RESP3 after `HELLO 3`).
//!
//! A command is either a multibulk array (`*2\r\n$3\r\nGET\r\n$1\r\na\r\n`, what client
//! libraries send) or an inline line (`GET a`, what a person types into netcat). The decoder
//! checks every count and length against its limits before reserving anything, and only
//! splits a command off the buffer once all of it has arrived; the arguments are then
//! zero-copy slices of it. Error texts are Redis' own, so tools that match on them work.
//!
//! ## Incremental parsing
//! The decoder remembers how far it got through an unfinished command (the position of the
//! next argument header, the argument ranges found so far, the bytes declared so far), so a
//! command trickled in small reads is parsed once, not again from its start on every read:
//! the work is linear in the bytes received. Re-parsing from the start cost 116 s of CPU for
//! 400,000 one-byte arguments fed in 70-byte pieces (2.8 MB), quadratic in the size. The price
//! is a contract: between calls the buffer may only grow at its end, until `decode` splits a
//! command off it (a caller that drops buffered input calls [`RespDecoder::reset`]).
//!
//! ## Limits
//! - each bulk string: `max_bulk` bytes (`invalid bulk length`, as Redis says);
//! - a whole multibulk command: `max_command` bytes, headers included, in the spirit of Redis'
//!   `client-query-buffer-limit`, and [`ARG_HANDLE`] bytes more for each argument, the handle
//!   that keeps it once decoded (so what a decoded command holds while it runs is within the
//!   limit too: a million one-byte keys take 7 MB on the wire and 30 MB of handles). The
//!   declared lengths are summed as their headers arrive, so a command that announces more
//!   than the limit is refused before its bytes are sent, not after they are buffered; an
//!   argument count that could not fit even with empty arguments (6 bytes each and the
//!   handle) is refused at once;
//! - at most [`MAX_ARGS`] arguments, and an inline line of at most [`MAX_INLINE`] bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

/// Redis' limit on an inline command (`PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 1024 * 1024;
/// The fewest bytes an argument of a multibulk can take: `$0\r\n\r\n`.
const MIN_ARG_LEN: usize = 6;
/// What each argument of a decoded command holds besides its bytes: its [`Bytes`] handle.
/// Counted toward the command's limit.
pub const ARG_HANDLE: usize = std::mem::size_of::<Bytes>();
/// The most bytes of a count or length line read before giving up on it: 20 digits and a sign
/// are all an `i64` needs, and the line end.
const MAX_INT_LINE: usize = 32;

/// A protocol error. The connection is closed after replying, as Redis does, since the stream
/// can no longer be trusted to be in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Malformed input; the text is Redis' own.
    #[error("{0}")]
    Syntax(&'static str),
    /// A multibulk command declared more bytes than the decoder's `max_command`.
    #[error("command larger than the query buffer limit ({limit} bytes)")]
    TooLarge { limit: usize },
}

impl ProtocolError {
    /// The full error reply.
    pub fn reply(self) -> Reply {
        Reply::Error(format!("ERR Protocol error: {self}"))
    }
}

/// Shorthand for the malformed-input errors.
const fn syntax(text: &'static str) -> ProtocolError {
    ProtocolError::Syntax(text)
}

/// Splits a byte stream into RESP commands.
#[derive(Debug, Clone)]
pub struct RespDecoder {
    max_bulk: usize,
    max_command: usize,
    /// How far the parse of an unfinished multibulk at the front of the buffer got.
    partial: Option<Partial>,
    /// Bytes of an unfinished inline line at the front of the buffer already searched for
    /// its `\n`.
    inline_scanned: usize,
    /// Bytes examined since the decoder was made: the tests check that it stays linear in the
    /// bytes received however the input is split.
    scanned: u64,
}

/// An unfinished multibulk: everything the decoder learned about it so far.
#[derive(Debug, Clone)]
struct Partial {
    /// Arguments the command declared.
    count: usize,
    /// The next byte to parse: an argument header, or the body of `bulk`.
    pos: usize,
    /// The range of the argument whose header is read but whose body (and CRLF) has not all
    /// arrived.
    bulk: Option<(usize, usize)>,
    /// Ranges of the arguments complete so far (a usual command's fit in place: no
    /// allocation per command).
    args: Ranges,
    /// Bytes the command has declared so far: the headers read, and each bulk's length with
    /// its CRLF.
    declared: usize,
}

/// Argument ranges within a command.
type Ranges = SmallVec<[(usize, usize); 4]>;

/// Where a decode attempt got to.
enum Parse {
    Incomplete,
    /// A complete command spanning `len` bytes, with argument ranges within them.
    Command {
        len: usize,
        args: Ranges,
    },
    /// Blank inline lines to skip (Redis ignores them).
    Skip(usize),
}

impl RespDecoder {
    /// A decoder refusing bulk strings longer than `max_bulk` bytes and multibulk commands
    /// longer than `max_command` bytes (headers included).
    pub fn new(max_bulk: usize, max_command: usize) -> RespDecoder {
        RespDecoder {
            max_bulk,
            max_command,
            partial: None,
            inline_scanned: 0,
            scanned: 0,
        }
    }

    /// Forgets the progress through an unfinished command; needed only by a caller that
    /// removes bytes from the buffer itself.
    pub fn reset(&mut self) {
        self.partial = None;
        self.inline_scanned = 0;
    }

    /// The next complete command in `buf` (removed from it), `Ok(None)` if more bytes are
    /// needed. Between calls `buf` may only grow at its end (see the module docs).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        // A buffer shorter than what was parsed broke the contract: start over rather than
        // index past its end.
        let parsed_to = self.partial.as_ref().map_or(self.inline_scanned, |p| p.pos);
        if parsed_to > buf.len() {
            self.reset();
        }
        loop {
            if buf.is_empty() {
                return Ok(None);
            }
            let parsed = if buf[0] == b'*' {
                match self.whole_multibulk(buf) {
                    Some(whole) => Ok(whole),
                    None => self.parse_multibulk(buf),
                }
            } else {
                self.parse_inline(buf)
            };
            let parsed = match parsed {
                Ok(parsed) => parsed,
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            };
            match parsed {
                Parse::Incomplete => return Ok(None),
                Parse::Skip(n) => buf.advance(n),
                Parse::Command { len, args } => {
                    let mut frame = buf.split_to(len).freeze();
                    // Every argument a slice of the frame; the last one is the frame itself,
                    // cut down: one reference count taken and dropped less per command.
                    let mut out = Vec::with_capacity(args.len());
                    if let Some((&(last_start, last_end), rest)) = args.split_last() {
                        out.extend(rest.iter().map(|&(s, e)| frame.slice(s..e)));
                        frame.truncate(last_end);
                        frame.advance(last_start);
                        out.push(frame);
                    }
                    return Ok(Some(out));
                }
            }
        }
    }

    /// A decoder for one command carried whole in `len` bytes (a frame's value): any command
    /// of that many bytes is within its limit, its arguments' handles counted.
    pub fn for_bytes(max_bulk: usize, len: usize) -> RespDecoder {
        RespDecoder::new(max_bulk, len.max(1) + (len / MIN_ARG_LEN + 1) * ARG_HANDLE)
    }

    /// Memory the command being read holds besides the buffer: the ranges of its arguments
    /// read so far. A command of many empty arguments holds more here than in the buffer
    /// (16 bytes a range against 6 for `$0\r\n\r\n`), so a reader that charges only its
    /// buffer let clients stalled mid-command hold four times their budget.
    pub fn held(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| {
            p.args.capacity() * std::mem::size_of::<(usize, usize)>()
        })
    }

    /// Bytes the buffer lacks to hold the argument being read, as its header declared (0
    /// when none is being read): a reader can make room for it at once rather than read by
    /// read. `buffered` is what the buffer holds.
    pub fn wanted(&self, buffered: usize) -> usize {
        match &self.partial {
            Some(Partial {
                bulk: Some((_, end)),
                ..
            }) => (end + 2).saturating_sub(buffered),
            _ => 0,
        }
    }

    /// The usual case in one pass: a multibulk that has all arrived, with nothing unusual in
    /// its headers and within every limit, parsed without recording progress. `None` for
    /// anything else (a command still arriving, one the decoder has started on, an error),
    /// which [`RespDecoder::parse_multibulk`] then decides; what this looked at is at most
    /// the buffer once, so the work stays linear.
    fn whole_multibulk(&mut self, buf: &[u8]) -> Option<Parse> {
        if self.partial.is_some() {
            return None;
        }
        let (count, mut pos) = usual_int(buf, 1)?;
        if count == 0 || count > MAX_ARGS as u64 {
            return None;
        }
        let mut args = Ranges::new();
        // Room for every argument at once (an MGET's hundred keys grew it five times), but
        // no more than the bytes here could hold, whatever the count claims.
        let room = usize::try_from(count).map_or(0, |n| n.min((buf.len() - pos) / MIN_ARG_LEN));
        if room > args.inline_size() {
            args.reserve_exact(room);
        }
        for _ in 0..count {
            let (start, end) = usual_bulk(buf, pos)?;
            if end - start > self.max_bulk {
                return None;
            }
            args.push((start, end));
            pos = end + 2;
        }
        if pos.saturating_add(args.len() * ARG_HANDLE) > self.max_command {
            return None;
        }
        self.scanned += pos as u64;
        Some(Parse::Command { len: pos, args })
    }

    /// Continues the multibulk at the front of `buf` from where the last call left it.
    fn parse_multibulk(&mut self, buf: &[u8]) -> Result<Parse, ProtocolError> {
        if self.partial.is_none() {
            let Some((count, pos)) = read_int_line(
                buf,
                1,
                syntax("invalid multibulk length"),
                &mut self.scanned,
            )?
            else {
                return Ok(Parse::Incomplete);
            };
            if count <= 0 {
                // Redis skips an empty or negative multibulk without a word.
                return Ok(Parse::Skip(pos));
            }
            if count as usize > MAX_ARGS {
                return Err(syntax("invalid multibulk length"));
            }
            let count = count as usize;
            if pos.saturating_add(count.saturating_mul(MIN_ARG_LEN + ARG_HANDLE)) > self.max_command
            {
                return Err(ProtocolError::TooLarge {
                    limit: self.max_command,
                });
            }
            self.partial = Some(Partial {
                count,
                pos,
                bulk: None,
                args: Ranges::new(),
                declared: pos,
            });
        }
        let Some(p) = self.partial.as_mut() else {
            unreachable!("set just above");
        };
        while p.args.len() < p.count {
            let (start, end) = match p.bulk {
                Some(range) => range,
                None => {
                    let Some(&tag) = buf.get(p.pos) else {
                        return Ok(Parse::Incomplete);
                    };
                    self.scanned += 1;
                    if tag != b'$' {
                        return Err(match tag {
                            b'+' => syntax("expected '$', got '+'"),
                            b'-' => syntax("expected '$', got '-'"),
                            b':' => syntax("expected '$', got ':'"),
                            b'*' => syntax("expected '$', got '*'"),
                            _ => syntax("expected '$', got something else"),
                        });
                    }
                    let Some((len, start)) = read_int_line(
                        buf,
                        p.pos + 1,
                        syntax("invalid bulk length"),
                        &mut self.scanned,
                    )?
                    else {
                        return Ok(Parse::Incomplete);
                    };
                    if len < 0 || len as usize > self.max_bulk {
                        return Err(syntax("invalid bulk length"));
                    }
                    let len = len as usize;
                    // This argument in full, and the least the ones after it can take.
                    let later = (p.count - p.args.len() - 1) * (MIN_ARG_LEN + ARG_HANDLE);
                    let declared = p
                        .declared
                        .saturating_add(start - p.pos)
                        .saturating_add(len)
                        .saturating_add(2 + ARG_HANDLE);
                    if declared.saturating_add(later) > self.max_command {
                        return Err(ProtocolError::TooLarge {
                            limit: self.max_command,
                        });
                    }
                    p.declared = declared;
                    // `len` fits an i64 and `start` lies within a buffer (under isize::MAX
                    // bytes), so neither this nor `end + 2` below can overflow.
                    let range = (start, start + len);
                    p.bulk = Some(range);
                    p.pos = start;
                    range
                }
            };
            if buf.len() < end + 2 {
                return Ok(Parse::Incomplete);
            }
            self.scanned += 2;
            if &buf[end..end + 2] != b"\r\n" {
                return Err(syntax("invalid bulk format"));
            }
            // The ranges grow with the arguments present, never past the declared count.
            if p.args.len() == p.args.capacity() {
                let more = p.args.len().max(16).min(p.count - p.args.len());
                p.args.reserve_exact(more);
            }
            p.args.push((start, end));
            p.bulk = None;
            p.pos = end + 2;
        }
        let p = self.partial.take().expect("parsing a multibulk");
        Ok(Parse::Command {
            len: p.pos,
            args: p.args,
        })
    }

    /// Continues the inline line at the front of `buf`, searching only the bytes that arrived
    /// since the last call.
    fn parse_inline(&mut self, buf: &[u8]) -> Result<Parse, ProtocolError> {
        let from = self.inline_scanned;
        let Some(nl) = buf[from..].iter().position(|&b| b == b'\n') else {
            self.scanned += (buf.len() - from) as u64;
            if buf.len() > MAX_INLINE {
                return Err(syntax("too big inline request"));
            }
            self.inline_scanned = buf.len();
            return Ok(Parse::Incomplete);
        };
        let nl = from + nl;
        self.scanned += (nl + 1 - from) as u64;
        self.inline_scanned = 0;
        if nl > MAX_INLINE {
            return Err(syntax("too big inline request"));
        }
        let line = &buf[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        self.scanned += line.len() as u64;
        let args = split_inline(line)?;
        if args.is_empty() {
            return Ok(Parse::Skip(nl + 1));
        }
        Ok(Parse::Command { len: nl + 1, args })
    }
}

/// Reads `<digits>\r\n` starting at `from`; the number and the position after the line.
/// Looks at no more than [`MAX_INT_LINE`] bytes, so an unfinished header costs a bounded
/// re-read per call.
fn read_int_line(
    buf: &[u8],
    from: usize,
    err: ProtocolError,
    scanned: &mut u64,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    if let Some((n, next)) = usual_int(buf, from) {
        *scanned += (next - from) as u64;
        // At most 18 digits: it fits.
        return Ok(Some((n as i64, next)));
    }
    let window = &buf[from.min(buf.len())..buf.len().min(from.saturating_add(MAX_INT_LINE))];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        *scanned += window.len() as u64;
        if window.len() >= MAX_INT_LINE {
            return Err(err);
        }
        return Ok(None);
    };
    *scanned += nl as u64 + 1;
    let line = &window[..nl];
    let line = line.strip_suffix(b"\r").ok_or(err)?;
    // As Redis reads a length: `*+2`, `*02` and `$-0` are refused, and no UTF-8 check or
    // generic parse is spent per header.
    let n = string2ll(line).ok_or(err)?;
    Ok(Some((n, from + nl + 1)))
}

/// The usual count or length line at `from`, read in one pass with no search for its
/// newline: 1 to 18 digits (which cannot overflow), no leading zero, then CRLF. The number
/// and the position after the line; `None` for anything else, which [`read_int_line`]'s
/// general path decides as Redis does (a sign, a leading zero, a line not all here).
#[inline]
fn usual_int(buf: &[u8], from: usize) -> Option<(u64, usize)> {
    let rest = buf.get(from..)?;
    let mut n = 0u64;
    let mut i = 0;
    while i < 18 {
        let d = rest.get(i)?.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        n = n * 10 + u64::from(d);
        i += 1;
    }
    let usual = i > 0 && (rest[0] != b'0' || i == 1) && rest.get(i..i + 2)? == b"\r\n";
    usual.then_some((n, from + i + 2))
}

/// A bulk string at `pos` whose length line is usual ([`usual_int`]), all here and ended by
/// CRLF: the range of its body. `None` for anything else, which the general paths decide.
/// Shared by the command decoder's one-pass path and the reply decoders.
#[inline]
fn usual_bulk(buf: &[u8], pos: usize) -> Option<(usize, usize)> {
    if *buf.get(pos)? != b'$' {
        return None;
    }
    let (len, start) = usual_int(buf, pos + 1)?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (buf.get(end..end.checked_add(2)?)? == b"\r\n").then_some((start, end))
}

/// Splits an inline line into argument ranges like Redis' `sdssplitargs`: bare words, and
/// words in single or double quotes. Arguments stay zero-copy slices, so a backslash escape
/// inside quotes (which would need unescaping into a copy) is refused with an error; send
/// such arguments as a multibulk command.
fn split_inline(line: &[u8]) -> Result<Ranges, ProtocolError> {
    let mut args = Ranges::new();
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
                .ok_or(syntax("unbalanced quotes in request"))?;
            let end = start + close;
            if line[start..end].contains(&b'\\') {
                return Err(syntax(
                    "escapes in quoted inline arguments are not supported",
                ));
            }
            if end + 1 < line.len() && !line[end + 1].is_ascii_whitespace() {
                return Err(syntax("unbalanced quotes in request"));
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

/// Which RESP a connection speaks: RESP2 unless it asked for RESP3 with `HELLO 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    #[default]
    Resp2,
    Resp3,
}

/// A reply, built once and encoded for the connection's [`Version`]: the RESP3 shapes (maps,
/// sets, doubles, booleans, nulls, verbatim text) become the RESP2 ones Redis sends to a RESP2
/// client (flat arrays, arrays, bulk strings, integers, `$-1`/`*-1`).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+<text>`
    Simple(&'static str),
    /// `+<text>` made at run time (`TYPE`'s answer, a worker's simple string).
    Line(String),
    /// `-<text>`: the text starts with the error prefix (`ERR`, `TRYAGAIN`, ...).
    Error(String),
    /// `:<n>`
    Int(i64),
    /// `$<len>\r\n<bytes>`
    Bulk(Bytes),
    /// A missing value: `$-1` in RESP2, `_` in RESP3.
    Nil,
    /// A missing aggregate (an aborted EXEC): `*-1` in RESP2, `_` in RESP3.
    NilArray,
    /// `*<n>` followed by the elements
    Array(Vec<Reply>),
    /// `%<n>` pairs in RESP3; a flat array of 2n elements in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// `~<n>` in RESP3; an array in RESP2.
    Set(Vec<Reply>),
    /// `,<%.17g>` in RESP3; a bulk string of the same text in RESP2.
    Double(f64),
    /// `#t`/`#f` in RESP3; `:1`/`:0` in RESP2.
    Bool(bool),
    /// `=<len>\r\n<fmt>:<text>` in RESP3 (INFO, CLIENT INFO); a bulk string in RESP2.
    Verbatim(&'static str, Bytes),
    /// A reply already encoded (one passed through from another Redis, or a worker's).
    Raw(Bytes),
    /// HELLO's answer: the connection speaks `Version` from this reply on, this one
    /// included. The session notices it when it encodes it, so replies queued before it
    /// keep the version they were asked in.
    Switch(Version, Box<Reply>),
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

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Appends the reply's RESP2 encoding to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_as(Version::Resp2, out);
    }

    /// Appends the reply's encoding in `version` to `out`.
    pub fn encode_as(&self, version: Version, out: &mut BytesMut) {
        let resp3 = version == Version::Resp3;
        match self {
            Reply::Simple(s) => put_line(out, b'+', s.as_bytes()),
            Reply::Line(s) => put_line(out, b'+', s.as_bytes()),
            Reply::Error(s) => put_line(out, b'-', s.as_bytes()),
            Reply::Int(n) => put_header(out, b':', *n),
            Reply::Bulk(b) => put_bulk(out, b'$', b),
            Reply::Nil if resp3 => out.put_slice(b"_\r\n"),
            Reply::Nil => out.put_slice(b"$-1\r\n"),
            Reply::NilArray if resp3 => out.put_slice(b"_\r\n"),
            Reply::NilArray => out.put_slice(b"*-1\r\n"),
            Reply::Array(items) => {
                put_header(out, b'*', items.len() as i64);
                for item in items {
                    item.encode_as(version, out);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    put_header(out, b'%', pairs.len() as i64);
                } else {
                    put_header(out, b'*', 2 * pairs.len() as i64);
                }
                for (k, v) in pairs {
                    k.encode_as(version, out);
                    v.encode_as(version, out);
                }
            }
            Reply::Set(items) => {
                put_header(out, if resp3 { b'~' } else { b'*' }, items.len() as i64);
                for item in items {
                    item.encode_as(version, out);
                }
            }
            Reply::Double(d) if resp3 => put_line(out, b',', format_double(*d).as_bytes()),
            Reply::Double(d) => put_bulk(out, b'$', format_double(*d).as_bytes()),
            Reply::Bool(b) if resp3 => out.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Reply::Bool(b) => put_header(out, b':', i64::from(*b)),
            Reply::Verbatim(format, text) if resp3 => {
                put_header(out, b'=', (format.len() + 1 + text.len()) as i64);
                out.put_slice(format.as_bytes());
                out.put_u8(b':');
                out.put_slice(text);
                out.put_slice(b"\r\n");
            }
            Reply::Verbatim(_, text) => put_bulk(out, b'$', text),
            Reply::Raw(bytes) => out.put_slice(bytes),
            Reply::Switch(to, reply) => reply.encode_as(*to, out),
        }
    }
}

/// Redis' `string2ll`: the strict integer syntax of every integer argument and counter (no
/// sign but `-`, no leading zeros or spaces, at most 20 characters, within i64).
pub fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        v = if neg {
            v.checked_mul(10)?.checked_sub(d)?
        } else {
            v.checked_mul(10)?.checked_add(d)?
        };
    }
    Some(v)
}

/// A double as Redis writes it (`%.17g`, and `inf`/`-inf`/`nan` spelled out).
pub fn format_double(d: f64) -> String {
    if d.is_nan() {
        return "nan".into();
    }
    if d.is_infinite() {
        return if d > 0.0 { "inf" } else { "-inf" }.into();
    }
    if d == 0.0 {
        return if d.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // 17 significant digits, then C's %g rules: scientific below 1e-4 or from 1e17 on, and
    // no trailing zeros either way.
    let sci = format!("{d:.16e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is a number");
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..17).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.unsigned_abs())
    } else {
        let decimals = (16 - exp).max(0) as usize;
        trim(&format!("{d:.decimals$}"))
    }
}

fn put_line(out: &mut BytesMut, tag: u8, text: &[u8]) {
    // A reply line cannot hold CR or LF; Redis replaces them with spaces too.
    let clean = |b: u8| if b == b'\r' || b == b'\n' { b' ' } else { b };
    // A short line (every SET's OK) is assembled on the stack and appended once: one capacity
    // check, where appending tag, text and CRLF in turn cost a few hundred instructions.
    const SHORT: usize = 61;
    if text.len() <= SHORT {
        let mut line = [0u8; SHORT + 3];
        line[0] = tag;
        for (to, &b) in line[1..].iter_mut().zip(text) {
            *to = clean(b);
        }
        line[1 + text.len()..3 + text.len()].copy_from_slice(b"\r\n");
        out.put_slice(&line[..3 + text.len()]);
        return;
    }
    out.reserve(text.len() + 3);
    out.put_u8(tag);
    out.extend(text.iter().map(|&b| clean(b)));
    out.put_slice(b"\r\n");
}

fn put_bulk(out: &mut BytesMut, tag: u8, bytes: &[u8]) {
    put_header(out, tag, bytes.len() as i64);
    out.put_slice(bytes);
    out.put_slice(b"\r\n");
}

/// Why bytes are not one RESP reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply cut short")]
    Incomplete,
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
}

/// Aggregates nested deeper than this are refused: a reply comes from a peer, and decoding
/// recurses.
pub const MAX_REPLY_DEPTH: usize = 32;

/// Decodes one reply (RESP2 or RESP3) from the front of `buf`, which holds it whole; the
/// reply and the bytes it took. Every count and length is checked against what `buf` holds
/// before anything is reserved, so a hostile peer can make it fail but not allocate or
/// recurse beyond the input.
pub fn decode_reply(buf: &Bytes) -> Result<(Reply, usize), ReplyError> {
    let mut pos = 0;
    let reply = decode_at(buf, &mut pos, 0)?;
    Ok((reply, pos))
}

/// Decodes replies until `buf` is used up.
pub fn decode_replies(buf: &Bytes) -> Result<Vec<Reply>, ReplyError> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        out.push(decode_at(buf, &mut pos, 0)?);
    }
    Ok(out)
}

/// [`decode_replies`] for replies that are passed on as they are: a bulk string comes back
/// as its encoded bytes ([`Reply::Raw`], a slice of `buf`), which read the same in RESP2
/// and RESP3, so it is copied out whole instead of decoded and encoded again (MGET's
/// values). Anything else (a nil, whose form depends on the version, an error) is decoded.
/// `expected`: how many replies the caller expects (room is made for them, within what
/// `buf` could hold).
pub fn decode_replies_raw_bulk(buf: &Bytes, expected: usize) -> Result<Vec<Reply>, ReplyError> {
    let mut pos = 0;
    let mut out = Vec::with_capacity(expected.min(buf.len() / 3));
    while pos < buf.len() {
        match usual_bulk(buf, pos) {
            Some((_, end)) => {
                out.push(Reply::Raw(buf.slice(pos..end + 2)));
                pos = end + 2;
            }
            None => out.push(decode_at(buf, &mut pos, 0)?),
        }
    }
    Ok(out)
}

fn decode_at(buf: &Bytes, pos: &mut usize, depth: usize) -> Result<Reply, ReplyError> {
    if depth > MAX_REPLY_DEPTH {
        return Err(ReplyError::Malformed("nested too deep"));
    }
    // The usual bulk string without a search for its line's end (anything else below).
    if let Some((start, end)) = usual_bulk(buf, *pos) {
        *pos = end + 2;
        return Ok(Reply::Bulk(buf.slice(start..end)));
    }
    let tag = *buf.get(*pos).ok_or(ReplyError::Incomplete)?;
    let line = line_at(buf, *pos + 1)?;
    let text = &buf[*pos + 1..line];
    *pos = line + 2;
    // Redis' own digits read without a UTF-8 check; anything else (`+5`, `007`) as before.
    let int = || -> Result<i64, ReplyError> {
        string2ll(text)
            .or_else(|| std::str::from_utf8(text).ok()?.parse().ok())
            .ok_or(ReplyError::Malformed("not an integer"))
    };
    let string = || String::from_utf8_lossy(text).into_owned();
    // Elements take at least 3 bytes each, so a count past that is a lie.
    let count = |n: i64, per: usize| -> Result<usize, ReplyError> {
        let n = usize::try_from(n).map_err(|_| ReplyError::Malformed("negative count"))?;
        if n.saturating_mul(3 * per) > buf.len() - *pos {
            return Err(ReplyError::Incomplete);
        }
        Ok(n)
    };
    Ok(match tag {
        b'+' => Reply::Line(string()),
        b'-' => Reply::Error(string()),
        b':' => Reply::Int(int()?),
        b'_' => Reply::Nil,
        b'#' => match text {
            b"t" => Reply::Bool(true),
            b"f" => Reply::Bool(false),
            _ => return Err(ReplyError::Malformed("boolean")),
        },
        b',' => Reply::Double(
            std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or(ReplyError::Malformed("not a double"))?,
        ),
        b'$' | b'=' => {
            let n = int()?;
            if n < 0 {
                return Ok(if tag == b'$' {
                    Reply::Nil
                } else {
                    return Err(ReplyError::Malformed("negative length"));
                });
            }
            let n = n as usize;
            let end = pos.checked_add(n).ok_or(ReplyError::Incomplete)?;
            if buf.len() < end.saturating_add(2) {
                return Err(ReplyError::Incomplete);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ReplyError::Malformed("bulk not ended by CRLF"));
            }
            let body = buf.slice(*pos..end);
            *pos = end + 2;
            if tag == b'$' {
                Reply::Bulk(body)
            } else {
                match body.get(..4) {
                    Some(b"mkd:") => Reply::Verbatim("mkd", body.slice(4..)),
                    Some(_) => Reply::Verbatim("txt", body.slice(4..)),
                    None => return Err(ReplyError::Malformed("verbatim without a format")),
                }
            }
        }
        b'*' | b'~' => {
            let n = int()?;
            if n < 0 {
                return Ok(Reply::NilArray);
            }
            let n = count(n, 1)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(decode_at(buf, pos, depth + 1)?);
            }
            if tag == b'*' {
                Reply::Array(items)
            } else {
                Reply::Set(items)
            }
        }
        b'%' => {
            let n = count(int()?, 2)?;
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                let k = decode_at(buf, pos, depth + 1)?;
                let v = decode_at(buf, pos, depth + 1)?;
                pairs.push((k, v));
            }
            Reply::Map(pairs)
        }
        _ => return Err(ReplyError::Malformed("unknown type")),
    })
}

/// Where the CRLF ending the line that starts at `from` is.
fn line_at(buf: &[u8], from: usize) -> Result<usize, ReplyError> {
    let rest = buf.get(from..).ok_or(ReplyError::Incomplete)?;
    let cr = rest
        .iter()
        .position(|&b| b == b'\r')
        .ok_or(ReplyError::Incomplete)?;
    match rest.get(cr + 1) {
        Some(b'\n') => Ok(from + cr),
        Some(_) => Err(ReplyError::Malformed("CR without LF")),
        None => Err(ReplyError::Incomplete),
    }
}

/// What a [`Reply::Bulk`] of `bytes` encodes to (in either version), from a borrowed slice.
pub fn put_bulk_string(out: &mut BytesMut, bytes: &[u8]) {
    put_bulk(out, b'$', bytes);
}

/// What a [`Reply::Bulk`] of `len` bytes encodes to before its bytes (`$<len>\r\n`, in
/// either version), for a writer that sends those bytes from where they lie; `\r\n` follows
/// them.
pub fn put_bulk_head(out: &mut BytesMut, len: usize) {
    put_header(out, b'$', len as i64);
}

fn put_header(out: &mut BytesMut, tag: u8, n: i64) {
    // Assembled on the stack and appended once (one capacity check, not four): the tag, a
    // sign, at most 20 digits and CRLF.
    let mut line = [0u8; 24];
    line[22..].copy_from_slice(b"\r\n");
    let mut i = 22;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        line[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        line[i] = b'-';
    }
    i -= 1;
    line[i] = tag;
    out.put_slice(&line[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::reads;
    use proptest::prelude::*;

    #[test]
    fn headers_are_the_tag_the_number_and_crlf() {
        for (n, want) in [
            (0, ":0\r\n"),
            (7, ":7\r\n"),
            (-1, ":-1\r\n"),
            (1234567, ":1234567\r\n"),
            (i64::MAX, ":9223372036854775807\r\n"),
            (i64::MIN, ":-9223372036854775808\r\n"),
        ] {
            let mut out = BytesMut::new();
            put_header(&mut out, b':', n);
            assert_eq!(out, want.as_bytes());
        }
    }

    /// A line reply is its text whole, with any CR or LF in it a space (as Redis does), so
    /// that it stays one line.
    #[test]
    fn a_line_reply_has_no_line_break_inside() {
        for (reply, want) in [
            (Reply::Simple("OK"), "+OK\r\n"),
            (Reply::Line(String::new()), "+\r\n"),
            (Reply::Error("ERR a\r\nb\nc\r".into()), "-ERR a  b c \r\n"),
            (
                Reply::Line("x".repeat(61)),
                &format!("+{}\r\n", "x".repeat(61)),
            ),
            (
                Reply::Line("x".repeat(62)),
                &format!("+{}\r\n", "x".repeat(62)),
            ),
            (
                Reply::Error(format!("ERR {}\n{}", "y".repeat(60), "z".repeat(60))),
                &format!("-ERR {} {}\r\n", "y".repeat(60), "z".repeat(60)),
            ),
        ] {
            let mut out = BytesMut::new();
            reply.encode_as(Version::Resp2, &mut out);
            assert_eq!(out, want.as_bytes());
        }
    }

    /// A length line read by the fast path reads as Redis' `string2ll` reads the line.
    #[test]
    fn a_length_line_reads_as_string2ll_reads_it() {
        let err = syntax("invalid bulk length");
        for line in [
            "0",
            "1",
            "9",
            "10",
            "16",
            "00",
            "01",
            "012",
            "-1",
            "-0",
            "+1",
            " 1",
            "1 ",
            "12a",
            "999999999999999999",
            "9999999999999999999",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "",
        ] {
            for tail in ["\r\n", "\r\nrest", "\n", "\r", ""] {
                let buf = format!("*{line}{tail}");
                let mut scanned = 0;
                let got = read_int_line(buf.as_bytes(), 1, err, &mut scanned);
                let want = match tail {
                    "\r\n" | "\r\nrest" => match string2ll(line.as_bytes()) {
                        Some(n) => Ok(Some((n, 1 + line.len() + 2))),
                        None => Err(err),
                    },
                    "\n" => Err(err),
                    _ => Ok(None),
                };
                assert_eq!(got, want, "{buf:?}");
                if let Ok(Some(_)) = got {
                    assert_eq!(scanned, line.len() as u64 + 2, "{buf:?}");
                }
            }
        }
    }

    /// Lengths are read as Redis' `string2ll` reads them.
    #[test]
    fn lengths_follow_redis_string2ll() {
        for (text, want) in [
            ("0", Some(0)),
            ("7", Some(7)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("+2", None),
            ("02", None),
            ("-0", None),
            ("", None),
            ("-", None),
            ("1a", None),
            (" 1", None),
            ("12345678901234567890", None),
        ] {
            assert_eq!(string2ll(text.as_bytes()), want, "{text:?}");
        }
    }

    fn decode_all(input: &[u8]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut d = RespDecoder::new(1024, 1 << 20);
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

    /// A command all in the buffer takes the one-pass path (`whole_multibulk`), one fed byte
    /// by byte the incremental one: both give the same commands and the same errors.
    #[test]
    fn whole_and_trickled_commands_decode_alike() {
        let decode = |wire: &[u8], cuts: &[usize]| feed(&mut RespDecoder::new(16, 64), wire, cuts);
        let wires: [&[u8]; 12] = [
            b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*1\r\n$4\r\nPING\r\n",
            b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$16\r\n0123456789abcdef\r\n",
            b"*1\r\n$17\r\n0123456789abcdefg\r\n",
            b"*2\r\n$03\r\nGET\r\n$1\r\na\r\n",
            b"*02\r\n$3\r\nGET\r\n",
            b"*2\r\n$+3\r\nGET\r\n$1\r\na\r\n",
            b"*0\r\n",
            b"*1\r\n$2\r\nabcd\r\n",
            b"*1\r\n+ab\r\n",
            b"*5\r\n$16\r\n0123456789abcdef\r\n$16\r\n0123456789abcdef\r\n$16\r\n0123456789abcdef\r\n$1\r\na\r\n$1\r\nb\r\n",
            b"*1\r\n$1\r\nx\r\nPING\r\n*1\r\n$1\r\ny\r\n",
            b"*1\r\n$1\r\nx\n\n",
        ];
        for wire in wires {
            assert_eq!(
                decode(wire, &[]),
                decode(wire, &vec![1; wire.len()]),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn incomplete_commands_wait_and_leave_the_buffer_alone() {
        let full = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            let mut d = RespDecoder::new(1024, 1 << 20);
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

    /// What a command stalled halfway holds besides its bytes is said, so it can be charged.
    #[test]
    fn a_command_read_halfway_says_what_its_arguments_hold() {
        let mut d = RespDecoder::new(1 << 20, 64 << 20);
        let mut buf = BytesMut::from(&b"*1000\r\n"[..]);
        for _ in 0..500 {
            buf.extend_from_slice(b"$0\r\n\r\n");
        }
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert!(d.held() >= 500 * 16, "{}", d.held());
        for _ in 0..500 {
            buf.extend_from_slice(b"$0\r\n\r\n");
        }
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().len(), 1000);
        assert_eq!(d.held(), 0, "nothing held once the command is out");
    }

    #[test]
    fn protocol_errors_use_redis_texts() {
        let err = |input: &[u8]| decode_all(input).unwrap_err().to_string();
        assert_eq!(err(b"*abc\r\n"), "invalid multibulk length");
        // An empty or negative multibulk is skipped, as Redis does.
        assert_eq!(
            decode_all(b"*-5\r\n*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n").unwrap(),
            vec![args(&[b"PING"])]
        );
        // Lengths follow `string2ll`, as Redis reads them: no `+`, no leading zero.
        assert_eq!(err(b"*02\r\n$3\r\nGET\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*+2\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*2\r\n$+3\r\nGET\r\n"), "invalid bulk length");
        assert_eq!(err(b"*2\r\n$03\r\nGET\r\n"), "invalid bulk length");
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
        assert_eq!(RespDecoder::new(1024, 64 << 20).decode(&mut buf), Ok(None));
    }

    /// Feeds `wire` in `piece`-byte reads; the commands decoded and the decoder's work.
    fn trickle(d: &mut RespDecoder, wire: &[u8], piece: usize) -> (Vec<Vec<Bytes>>, u64) {
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(piece) {
            buf.extend_from_slice(chunk);
            while let Some(cmd) = d.decode(&mut buf).unwrap() {
                got.push(cmd);
            }
        }
        assert!(buf.is_empty());
        (got, d.scanned)
    }

    /// Issue 9: 400,000 one-byte arguments in 70-byte writes took 116 s (release) when every
    /// read re-parsed the command from its start; now each byte is looked at about once.
    #[test]
    fn a_command_trickled_in_small_pieces_is_parsed_in_linear_work() {
        let n = 400_000;
        let mut wire = BytesMut::new();
        encode_command(&vec![Bytes::from_static(b"x"); n], &mut wire);
        let mut d = RespDecoder::new(1024, 64 << 20);
        let started = std::time::Instant::now();
        let (got, scanned) = trickle(&mut d, &wire, 70);
        let took = started.elapsed();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), n);
        assert!(got[0].iter().all(|a| a == "x"));
        // A header is re-read at most once per call while unfinished (a few bytes).
        assert!(
            scanned <= 2 * wire.len() as u64,
            "{scanned} bytes scanned for {} received",
            wire.len()
        );
        assert!(took < std::time::Duration::from_secs(20), "{took:?}");

        // An inline line trickled byte by byte is searched once too.
        let mut line = vec![b'a'; MAX_INLINE - 10];
        line.extend_from_slice(b" b\r\n");
        let mut d = RespDecoder::new(1024, 1024);
        let (got, scanned) = trickle(&mut d, &line, 1);
        assert_eq!(got.len(), 1);
        assert!(scanned <= 2 * line.len() as u64, "{scanned}");
    }

    #[test]
    fn a_command_larger_than_its_limit_is_refused_before_its_bytes_arrive() {
        // Headers only: the second bulk's declared length takes the total past 100 bytes
        // and the two arguments' handles.
        let limit = 100 + 2 * ARG_HANDLE;
        let mut d = RespDecoder::new(1024, limit);
        let mut buf = BytesMut::from(&b"*2\r\n$50\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[b'x'; 50]);
        buf.extend_from_slice(b"\r\n$40\r\n");
        let err = d.decode(&mut buf).unwrap_err();
        assert_eq!(err, ProtocolError::TooLarge { limit });
        assert_eq!(
            err.reply(),
            Reply::err(format!(
                "ERR Protocol error: command larger than the query buffer limit ({limit} bytes)"
            ))
        );
        // A count that cannot fit even with empty arguments is refused at once.
        let mut buf = BytesMut::from(&b"*20\r\n"[..]);
        assert_eq!(
            RespDecoder::new(1024, 100).decode(&mut buf),
            Err(ProtocolError::TooLarge { limit: 100 })
        );
        // The issue's case: bulks each within the bulk limit, together past the command's.
        let mut d = RespDecoder::new(16 << 20, 64 << 20);
        let mut buf = BytesMut::from(&b"*52\r\n$16777216\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        let mut refused = false;
        for _ in 0..4 {
            buf.extend_from_slice(&vec![b'v'; 16 << 20]);
            buf.extend_from_slice(b"\r\n$16777216\r\n");
            if d.decode(&mut buf).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "refused within the first 64 MiB");
        // Exactly at the limit passes: 4 + 7 + 7 bytes, and a handle per argument.
        let wire = b"*2\r\n$1\r\na\r\n$1\r\nb\r\n";
        assert_eq!(wire.len(), 18);
        let limit = 18 + 2 * ARG_HANDLE;
        let mut d = RespDecoder::new(1024, limit);
        let (got, _) = trickle(&mut d, wire, 1);
        assert_eq!(got, vec![args(&[b"a", b"b"])]);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            RespDecoder::new(1024, limit)
                .decode(&mut buf)
                .unwrap()
                .map(|c| c.len()),
            Some(2),
            "whole at once too"
        );
        let mut buf = BytesMut::from(&wire[..]);
        assert!(RespDecoder::new(1024, limit - 1).decode(&mut buf).is_err());
        let mut d = RespDecoder::new(1024, limit - 1);
        let mut buf = BytesMut::new();
        let refused = wire.iter().any(|&b| {
            buf.extend_from_slice(&[b]);
            d.decode(&mut buf).is_err()
        });
        assert!(refused, "trickled too");
    }

    #[test]
    fn a_decoder_for_a_frames_bytes_takes_any_command_they_hold() {
        for args in [
            vec![Bytes::new(); 1000],
            vec![Bytes::from_static(b"GET"); 1],
        ] {
            let mut wire = BytesMut::new();
            encode_command(&args, &mut wire);
            let len = wire.len();
            let got = RespDecoder::for_bytes(1024, len).decode(&mut wire);
            assert_eq!(got, Ok(Some(args)), "{len} bytes");
        }
    }

    #[test]
    fn argument_ranges_grow_with_the_arguments_present_up_to_the_count() {
        let mut d = RespDecoder::new(1024, 1 << 20);
        let mut buf = BytesMut::from(&b"*3\r\n$1\r\na\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        // In place: no allocation at all.
        assert!(!d.partial.as_ref().unwrap().args.spilled());
        let mut buf =
            BytesMut::from(&b"*7\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n"[..]);
        let mut d = RespDecoder::new(1024, 1 << 20);
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(d.partial.as_ref().unwrap().args.capacity(), 7);
        let mut buf = BytesMut::from(&b"*1000000\r\n$1\r\na\r\n"[..]);
        let mut d = RespDecoder::new(1024, 64 << 20);
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(d.partial.as_ref().unwrap().args.capacity(), 4);
        let mut buf = BytesMut::from(
            &b"*1000000\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n$1\r\na\r\n"[..],
        );
        let mut d = RespDecoder::new(1024, 64 << 20);
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(d.partial.as_ref().unwrap().args.capacity(), 4 + 16);
    }

    #[test]
    fn the_argument_being_read_says_what_it_lacks() {
        let mut d = RespDecoder::new(1 << 20, 1 << 21);
        let mut buf = BytesMut::from(&b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\nabc"[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        // The value's 100,000 bytes and its CRLF, less the 3 that are here.
        assert_eq!(d.wanted(buf.len()), 100_000 + 2 - 3);
        buf.extend_from_slice(&vec![b'v'; 100_000 - 3]);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().len(), 3);
        assert_eq!(d.wanted(buf.len()), 0);
    }

    #[test]
    fn a_buffer_that_shrank_or_was_reset_is_parsed_afresh() {
        let mut d = RespDecoder::new(1024, 1 << 20);
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$5\r\nhel"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.clear();
        buf.extend_from_slice(b"*1\r\n");
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"$4\r\nPING\r\n");
        assert_eq!(d.decode(&mut buf), Ok(Some(args(&[b"PING"]))));
        // After an explicit reset, any buffer will do.
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        d.reset();
        let mut buf = BytesMut::from(&b"PING\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(Some(args(&[b"PING"]))));
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

    #[test]
    fn resp3_shapes_and_their_resp2_forms() {
        let reply = Reply::Array(vec![
            Reply::Map(vec![(Reply::Simple("a"), Reply::Int(1))]),
            Reply::Set(vec![Reply::Bulk(Bytes::from_static(b"x"))]),
            Reply::Double(1.5),
            Reply::Bool(true),
            Reply::Nil,
            Reply::NilArray,
            Reply::Verbatim("txt", Bytes::from_static(b"hi")),
        ]);
        let mut out = BytesMut::new();
        reply.encode_as(Version::Resp3, &mut out);
        assert_eq!(
            &out[..],
            &b"*7\r\n%1\r\n+a\r\n:1\r\n~1\r\n$1\r\nx\r\n,1.5\r\n#t\r\n_\r\n_\r\n=6\r\ntxt:hi\r\n"[..]
        );
        let (back, used) = decode_reply(&out.clone().freeze()).unwrap();
        assert_eq!(used, out.len());
        let mut again = BytesMut::new();
        back.encode_as(Version::Resp3, &mut again);
        assert_eq!(again, out, "RESP3 survives a round trip");
        let mut out = BytesMut::new();
        reply.encode(&mut out);
        assert_eq!(
            &out[..],
            &b"*7\r\n*2\r\n+a\r\n:1\r\n*1\r\n$1\r\nx\r\n$3\r\n1.5\r\n:1\r\n$-1\r\n*-1\r\n$2\r\nhi\r\n"[..]
        );
    }

    #[test]
    fn doubles_format_like_c_percent_17g() {
        for (d, want) in [
            (1.5, "1.5"),
            (0.1, "0.10000000000000001"),
            (100.0, "100"),
            (1e17, "1e+17"),
            (1.25e-5, "1.2500000000000001e-05"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (-2.0, "-2"),
            (f64::INFINITY, "inf"),
            (0.0001, "0.0001"),
        ] {
            assert_eq!(format_double(d), want, "{d}");
        }
    }

    /// Bulk strings pass through as their bytes, everything else decodes as before, and the
    /// two encode to the same bytes for either version.
    #[test]
    fn replies_with_raw_bulk_strings_encode_as_decoded_ones() {
        let wire = Bytes::from_static(
            b"$3\r\nabc\r\n$-1\r\n$0\r\n\r\n-WRONGTYPE no\r\n:5\r\n$4\r\na\r\nb\r\n*1\r\n$1\r\nx\r\n",
        );
        let raw = decode_replies_raw_bulk(&wire, 7).unwrap();
        let decoded = decode_replies(&wire).unwrap();
        assert_eq!(raw.len(), 7);
        assert!(matches!(&raw[0], Reply::Raw(b) if b == "$3\r\nabc\r\n"));
        assert_eq!(raw[1], Reply::Nil);
        assert!(matches!(&raw[3], Reply::Error(e) if e.starts_with("WRONGTYPE")));
        for version in [Version::Resp2, Version::Resp3] {
            let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
            Reply::Array(raw.clone()).encode_as(version, &mut a);
            Reply::Array(decoded.clone()).encode_as(version, &mut b);
            assert_eq!(a, b, "{version:?}");
        }
        for bad in [&b"$5\r\nabc\r\n"[..], b"$3\r\nabcde", b"$3\r\nab"] {
            let bad = Bytes::copy_from_slice(bad);
            assert_eq!(
                decode_replies_raw_bulk(&bad, 1),
                decode_replies(&bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hostile_replies_fail_without_allocating() {
        for bad in [
            &b"*99999999999\r\n"[..],
            b"$5\r\nab\r\n",
            b"%3\r\n:1\r\n",
            b"?x\r\n",
            b":12a\r\n",
            b"+ok",
            b"$2\r\nabcd",
        ] {
            assert!(decode_reply(&Bytes::from_static(bad)).is_err(), "{bad:?}");
        }
        let deep = "*1\r\n".repeat(MAX_REPLY_DEPTH + 2) + ":1\r\n";
        assert!(decode_reply(&Bytes::from(deep)).is_err());
        let many = decode_replies(&Bytes::from_static(b":1\r\n$-1\r\n*-1\r\n")).unwrap();
        assert_eq!(many, vec![Reply::Int(1), Reply::Nil, Reply::NilArray]);
    }

    /// Feeds `input` in reads of the sizes in `cuts` (then the rest at once) until the
    /// decoder errs or has all of it: the commands, and the error if one ended it. Whatever
    /// the bytes, it must return, not panic.
    fn feed(
        d: &mut RespDecoder,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<Vec<Bytes>>, Option<ProtocolError>) {
        let mut buf = BytesMut::new();
        let mut commands = Vec::new();
        for read in reads(input, cuts) {
            buf.extend_from_slice(read);
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(cmd)) => {
                        assert!(!cmd.is_empty());
                        commands.push(cmd);
                    }
                    Ok(None) => break,
                    Err(e) => return (commands, Some(e)),
                }
            }
        }
        (commands, None)
    }

    /// A valid command stream with `edits` applied: (position, byte) overwrites, then a cut.
    fn mutated(cmds: &[Vec<Vec<u8>>], edits: &[(usize, u8)], truncate: usize) -> Vec<u8> {
        let mut wire = BytesMut::new();
        for cmd in cmds {
            encode_command(
                &cmd.iter()
                    .map(|a| Bytes::from(a.clone()))
                    .collect::<Vec<_>>(),
                &mut wire,
            );
        }
        let mut wire = wire.to_vec();
        for &(at, byte) in edits {
            if !wire.is_empty() {
                let at = at % wire.len();
                wire[at] = byte;
            }
        }
        wire.truncate(wire.len().saturating_sub(truncate));
        wire
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..512),
            cuts in proptest::collection::vec(0usize..64, 0..16),
            max_bulk in 0usize..64,
            max_command in 0usize..256,
        ) {
            feed(&mut RespDecoder::new(max_bulk, max_command), &input, &cuts);
        }

        #[test]
        fn mutated_commands_never_panic(
            cmds in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..5), 1..4),
            edits in proptest::collection::vec((any::<usize>(), prop_oneof![Just(b'*'), Just(b'$'), Just(b'\r'), Just(b'\n'), Just(b'-'), Just(b'9'), any::<u8>()]), 0..4),
            truncate in 0usize..8,
            cuts in proptest::collection::vec(0usize..16, 0..16),
        ) {
            let wire = mutated(&cmds, &edits, truncate);
            feed(&mut RespDecoder::new(64, 512), &wire, &cuts);
        }

        #[test]
        fn random_replies_never_panic(input in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_replies(&Bytes::from(input));
        }

        #[test]
        fn multibulk_round_trips_through_split_reads(
            cmds in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5), 1..6),
            cut in 1usize..50,
        ) {
            let mut wire = BytesMut::new();
            for cmd in &cmds {
                Reply::Array(cmd.iter().map(|a| Reply::Bulk(Bytes::from(a.clone()))).collect()).encode(&mut wire);
            }
            let mut d = RespDecoder::new(1024, 1 << 20);
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
