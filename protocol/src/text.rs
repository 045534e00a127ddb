//! The netcat-friendly text protocol.
//!
//! ```text
//! request  = get||<key> | set||<key>||<value> | del||<key>                  ("\n" or "\r\n")
//!          | setex||<key>||<seconds>||<value> | ping | stats | status | exit
//!          | auth||<password> | auth||<user>||<password>
//!          | incr||<key> | incrby||<key>||<n> | expire||<key>||<seconds> | ttl||<key>
//! response = 0||<result> | <code>||<message>                                 ("\n")
//! ```
//!
//! Verbs are case-insensitive. `set` splits into at most three fields, so a value may contain
//! `||`; a key may not (it would make `set` ambiguous). Lines are bytes, not UTF-8, so any byte
//! but `\n` may appear in a value; values containing `\n` need the binary protocol.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::status::Status;

/// The field separator.
pub const SEP: &[u8] = b"||";

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Get(Bytes),
    Set(Bytes, Bytes),
    /// Set with a time to live in seconds (more than zero).
    SetEx(Bytes, u64, Bytes),
    Del(Bytes),
    Ping,
    /// Every worker's counters.
    Stats,
    /// Every worker's state (in sync, down, stale, resyncing).
    Status,
    /// Authenticate as the user (the default user if none), with the password.
    Auth(Option<Bytes>, Bytes),
    /// Add to the integer value (`incr` adds 1), as Redis' INCRBY.
    IncrBy(Bytes, i64),
    /// Set the time to live in seconds (zero or less deletes the key), as Redis' EXPIRE.
    Expire(Bytes, i64),
    /// The time to live left in seconds (-1: none), as Redis' TTL.
    Ttl(Bytes),
    Exit,
}

/// Why a line is not a valid request: the code and message to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineError {
    pub status: Status,
    pub message: &'static str,
}

impl LineError {
    const fn parse(message: &'static str) -> LineError {
        LineError {
            status: Status::ParseError,
            message,
        }
    }
}

fn find_sep(haystack: &[u8]) -> Option<usize> {
    haystack.windows(2).position(|w| w == SEP)
}

/// Splits off the key of a `get` or `del`, which must be non-empty and hold no separator.
fn single_key(rest: Option<Bytes>, usage: &'static str) -> Result<Bytes, LineError> {
    let key = rest.ok_or(LineError::parse(usage))?;
    if key.is_empty() {
        return Err(LineError::parse("empty key"));
    }
    if find_sep(&key).is_some() {
        return Err(LineError::parse(
            "too many fields (a key cannot contain ||)",
        ));
    }
    Ok(key)
}

/// Splits the field before the next `||` off `rest`; `None` if there is no separator.
fn split_field(rest: &mut Bytes) -> Option<Bytes> {
    let i = find_sep(rest)?;
    let field = rest.split_to(i);
    rest.advance(SEP.len());
    Some(field)
}

/// Parses one line (without its line end).
pub fn parse_line(mut line: Bytes) -> Result<Command, LineError> {
    let verb = split_field(&mut line);
    let (verb, rest) = match verb {
        Some(verb) => (verb, Some(line)),
        None => (line, None),
    };
    if verb.is_empty() && rest.is_none() {
        return Err(LineError::parse("empty request"));
    }
    let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());
    if is("get") {
        single_key(rest, "expected get||<key>").map(Command::Get)
    } else if is("del") {
        single_key(rest, "expected del||<key>").map(Command::Del)
    } else if is("set") {
        const USAGE: LineError = LineError::parse("expected set||<key>||<value>");
        let mut rest = rest.ok_or(USAGE)?;
        let key = split_field(&mut rest).ok_or(USAGE)?;
        nonempty(&key)?;
        Ok(Command::Set(key, rest))
    } else if is("setex") {
        const USAGE: LineError = LineError::parse("expected setex||<key>||<seconds>||<value>");
        let mut rest = rest.ok_or(USAGE)?;
        let key = split_field(&mut rest).ok_or(USAGE)?;
        let secs = split_field(&mut rest).ok_or(USAGE)?;
        nonempty(&key)?;
        let secs = std::str::from_utf8(&secs)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0 && s < u64::MAX / 1000)
            .ok_or(LineError::parse("seconds must be a whole number above 0"))?;
        Ok(Command::SetEx(key, secs, rest))
    } else if is("incr") {
        single_key(rest, "expected incr||<key>").map(|k| Command::IncrBy(k, 1))
    } else if is("ttl") {
        single_key(rest, "expected ttl||<key>").map(Command::Ttl)
    } else if is("incrby") || is("expire") {
        let usage = if is("incrby") {
            LineError::parse("expected incrby||<key>||<integer>")
        } else {
            LineError::parse("expected expire||<key>||<seconds>")
        };
        let mut rest = rest.ok_or(usage)?;
        let key = split_field(&mut rest).ok_or(usage)?;
        nonempty(&key)?;
        let n = std::str::from_utf8(&rest)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or(usage)?;
        Ok(if is("incrby") {
            Command::IncrBy(key, n)
        } else {
            Command::Expire(key, n)
        })
    } else if is("auth") {
        const USAGE: LineError =
            LineError::parse("expected auth||<password> or auth||<user>||<password>");
        let mut rest = rest.ok_or(USAGE)?;
        match split_field(&mut rest) {
            Some(user) => Ok(Command::Auth(Some(user), rest)),
            None => Ok(Command::Auth(None, rest)),
        }
    } else if is("ping") || is("exit") || is("stats") || is("status") {
        if rest.is_some() {
            return Err(LineError::parse(
                "ping, stats, status and exit take no arguments",
            ));
        }
        Ok(if is("ping") {
            Command::Ping
        } else if is("stats") {
            Command::Stats
        } else if is("status") {
            Command::Status
        } else {
            Command::Exit
        })
    } else {
        Err(LineError {
            status: Status::InvalidCommand,
            message:
                "invalid command type (expected get, set, setex, del, incr, incrby, expire, ttl, ping, stats, status, auth or exit)",
        })
    }
}

fn nonempty(key: &Bytes) -> Result<(), LineError> {
    if key.is_empty() {
        return Err(LineError::parse("empty key"));
    }
    Ok(())
}

/// Appends a response line: `0||<payload>` on success, `<code>||<payload>` otherwise.
pub fn encode_response(status: Status, payload: &[u8], dst: &mut BytesMut) {
    dst.reserve(payload.len() + 6);
    let code = status.code();
    if code >= 10 {
        dst.put_u8(b'0' + code / 10);
    }
    dst.put_u8(b'0' + code % 10);
    dst.put_slice(SEP);
    dst.put_slice(payload);
    dst.put_u8(b'\n');
}

/// What the line decoder found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A whole line, line end stripped.
    Complete(Bytes),
    /// A line longer than the limit. Reported once, as soon as the limit is passed; the rest
    /// of that line is then skipped without being buffered.
    TooLong,
}

/// Splits a byte stream into lines of at most `max_len` bytes, in bounded memory.
///
/// Like tokio-util's `LinesCodec` it scans each byte once and skips an overlong line instead
/// of dropping the connection, but it works on bytes, not UTF-8.
#[derive(Debug)]
pub struct LineDecoder {
    max_len: usize,
    /// Bytes of the buffer already searched for `\n`.
    scanned: usize,
    /// Inside an overlong line: drop input up to the next `\n`.
    discarding: bool,
}

impl LineDecoder {
    pub fn new(max_len: usize) -> LineDecoder {
        LineDecoder {
            max_len,
            scanned: 0,
            discarding: false,
        }
    }

    /// The next line in `buf`, if a whole one (or an overlong one) is there.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Line> {
        loop {
            let newline = buf[self.scanned..].iter().position(|&b| b == b'\n');
            match (newline, self.discarding) {
                (Some(i), true) => {
                    buf.advance(self.scanned + i + 1);
                    self.scanned = 0;
                    self.discarding = false;
                }
                (Some(i), false) => {
                    let mut line = buf.split_to(self.scanned + i + 1).freeze();
                    self.scanned = 0;
                    line.truncate(line.len() - 1);
                    if line.last() == Some(&b'\r') {
                        line.truncate(line.len() - 1);
                    }
                    if line.len() > self.max_len {
                        return Some(Line::TooLong);
                    }
                    return Some(Line::Complete(line));
                }
                (None, true) => {
                    buf.clear();
                    self.scanned = 0;
                    return None;
                }
                (None, false) => {
                    // +1 leaves room for a "\r" before the "\n" of a line of exactly max_len.
                    if buf.len() > self.max_len + 1 {
                        buf.clear();
                        self.scanned = 0;
                        self.discarding = true;
                        return Some(Line::TooLong);
                    }
                    self.scanned = buf.len();
                    return None;
                }
            }
        }
    }

    /// Whether bytes of an unfinished line are waiting in `buf` (used at end of input: an
    /// unterminated line is never executed, so a client cut off mid-`set` stores nothing).
    pub fn has_partial(&self, buf: &BytesMut) -> bool {
        !self.discarding && !buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::reads;
    use proptest::prelude::*;

    fn parse(line: &[u8]) -> Result<Command, LineError> {
        parse_line(Bytes::copy_from_slice(line))
    }

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    #[test]
    fn parses_the_seed_commands() {
        assert_eq!(parse(b"get||a"), Ok(Command::Get(b(b"a"))));
        assert_eq!(
            parse(b"set||a||hello"),
            Ok(Command::Set(b(b"a"), b(b"hello")))
        );
        assert_eq!(parse(b"set||a||"), Ok(Command::Set(b(b"a"), b(b""))));
        assert_eq!(
            parse(b"set||a||x||y||"),
            Ok(Command::Set(b(b"a"), b(b"x||y||")))
        );
        assert_eq!(parse(b"del||a"), Ok(Command::Del(b(b"a"))));
        assert_eq!(parse(b"auth||pw"), Ok(Command::Auth(None, b(b"pw"))));
        assert_eq!(
            parse(b"auth||bob||p||w"),
            Ok(Command::Auth(Some(b(b"bob")), b(b"p||w")))
        );
        assert_eq!(parse(b"GET||a"), Ok(Command::Get(b(b"a"))));
        assert_eq!(parse(b"ping"), Ok(Command::Ping));
        assert_eq!(parse(b"exit"), Ok(Command::Exit));
        assert_eq!(parse(b"get||\xff\x00"), Ok(Command::Get(b(b"\xff\x00"))));
        assert_eq!(
            parse(b"setex||k||30||a||b"),
            Ok(Command::SetEx(b(b"k"), 30, b(b"a||b")))
        );
        assert_eq!(parse(b"stats"), Ok(Command::Stats));
        assert_eq!(parse(b"incr||n"), Ok(Command::IncrBy(b(b"n"), 1)));
        assert_eq!(parse(b"INCRBY||n||-5"), Ok(Command::IncrBy(b(b"n"), -5)));
        assert_eq!(parse(b"expire||k||30"), Ok(Command::Expire(b(b"k"), 30)));
        assert_eq!(parse(b"ttl||k"), Ok(Command::Ttl(b(b"k"))));
    }

    #[test]
    fn reports_the_right_code() {
        let code = |l: &[u8]| parse(l).unwrap_err().status;
        assert_eq!(code(b"get"), Status::ParseError);
        assert_eq!(code(b"get||"), Status::ParseError);
        assert_eq!(code(b"get||a||b"), Status::ParseError);
        assert_eq!(code(b"set||a"), Status::ParseError);
        assert_eq!(code(b"set||||v"), Status::ParseError);
        assert_eq!(code(b""), Status::ParseError);
        assert_eq!(code(b"ping||x"), Status::ParseError);
        assert_eq!(code(b"setex||k||0||v"), Status::ParseError);
        assert_eq!(code(b"setex||k||soon||v"), Status::ParseError);
        assert_eq!(code(b"setex||k||5"), Status::ParseError);
        assert_eq!(code(b"setex||||5||v"), Status::ParseError);
        assert_eq!(code(b"incrby||n||x"), Status::ParseError);
        assert_eq!(code(b"incrby||n"), Status::ParseError);
        assert_eq!(code(b"expire||k||1||2"), Status::ParseError);
        assert_eq!(code(b"incr||"), Status::ParseError);
        assert_eq!(code(b"foo||x"), Status::InvalidCommand);
        assert_eq!(code(b"foo"), Status::InvalidCommand);
        assert_eq!(code(b"||x"), Status::InvalidCommand);
        assert_eq!(code(b"\x00\xff\xfe"), Status::InvalidCommand);
    }

    #[test]
    fn encodes_responses() {
        let mut out = BytesMut::new();
        encode_response(Status::Ok, b"hello", &mut out);
        encode_response(Status::NotFound, b"key not found", &mut out);
        assert_eq!(&out[..], b"0||hello\n2||key not found\n");
    }

    #[test]
    fn splits_lines_and_strips_crlf() {
        let mut d = LineDecoder::new(100);
        let mut buf = BytesMut::from(&b"get||a\r\nping\nget"[..]);
        assert_eq!(d.decode(&mut buf), Some(Line::Complete(b(b"get||a"))));
        assert_eq!(d.decode(&mut buf), Some(Line::Complete(b(b"ping"))));
        assert_eq!(d.decode(&mut buf), None);
        assert!(d.has_partial(&buf));
        buf.extend_from_slice(b"||b\n");
        assert_eq!(d.decode(&mut buf), Some(Line::Complete(b(b"get||b"))));
        assert!(!d.has_partial(&buf));
    }

    #[test]
    fn overlong_line_is_reported_once_and_skipped_in_bounded_memory() {
        let mut d = LineDecoder::new(8);
        let mut buf = BytesMut::from(&b"set||k||0123456789"[..]);
        assert_eq!(d.decode(&mut buf), Some(Line::TooLong));
        assert!(buf.is_empty());
        buf.extend_from_slice(&[b'x'; 1000]);
        assert_eq!(d.decode(&mut buf), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"xx\nping\n");
        assert_eq!(d.decode(&mut buf), Some(Line::Complete(b(b"ping"))));
        // A line that arrives whole but too long is also reported once.
        let mut buf = BytesMut::from(&b"0123456789\nping\n"[..]);
        let mut d = LineDecoder::new(8);
        assert_eq!(d.decode(&mut buf), Some(Line::TooLong));
        assert_eq!(d.decode(&mut buf), Some(Line::Complete(b(b"ping"))));
    }

    #[test]
    fn line_of_exactly_the_limit_passes_with_crlf() {
        let mut d = LineDecoder::new(4);
        let mut buf = BytesMut::from(&b"ping\r"[..]);
        assert_eq!(d.decode(&mut buf), None);
        buf.extend_from_slice(b"\n");
        assert_eq!(d.decode(&mut buf), Some(Line::Complete(b(b"ping"))));
    }

    proptest! {
        /// Whatever the bytes and however they are split, lines come out within the limit and
        /// parsing them returns.
        #[test]
        fn random_bytes_never_panic(
            input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'|'), any::<u8>()], 0..512),
            cuts in proptest::collection::vec(1usize..64, 0..16),
            max_len in 0usize..64,
        ) {
            let mut d = LineDecoder::new(max_len);
            let mut buf = BytesMut::new();
            for read in reads(&input, &cuts) {
                buf.extend_from_slice(read);
                while let Some(line) = d.decode(&mut buf) {
                    if let Line::Complete(line) = line {
                        prop_assert!(line.len() <= max_len);
                        let _ = parse_line(line);
                    }
                }
                prop_assert!(buf.len() <= max_len + 1, "{} bytes held", buf.len());
            }
            let _ = d.has_partial(&buf);
        }

        #[test]
        fn any_line_parses_or_errs(line in proptest::collection::vec(prop_oneof![Just(b'|'), Just(b'0'), Just(b's'), any::<u8>()], 0..64), verb in prop_oneof![Just("get||"), Just("set||"), Just("setex||"), Just("del||"), Just("ping"), Just("")]) {
            let mut full = verb.as_bytes().to_vec();
            full.extend_from_slice(&line);
            let _ = parse_line(Bytes::from(full));
        }
    }
}
