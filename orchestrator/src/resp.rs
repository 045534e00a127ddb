//! RESP sessions: commands read off a Redis connection, checked, and run from the command
//! table (see [`crate::commands`]).
//!
//! Per command: find it in the table, check the session's user may run it, then either pass
//! it to the destination Redis (adapter mode, see [`commands::adapter`]), queue it (inside
//! MULTI), or parse and run it. The connection speaks RESP2 until `HELLO 3`; a reply is
//! encoded in the version in force when it is written, which changes exactly at HELLO's own
//! reply (see [`Reply::Switch`]), so replies queued before it keep the version they were
//! asked in.

use bytes::{Bytes, BytesMut};
use twincache_protocol::resp::{put_bulk_head, Reply, RespDecoder, Version, ARG_HANDLE};

use crate::auth::Who;
use crate::commands::batch::Batches;
use crate::commands::{self, adapter, Adapter, Conn};
use crate::metrics::{Closed, Cmd, ErrorCode, Proto};
use crate::session::{Ctx, Outgoing, Protocol, Step};

/// Whether a connection's first line (not starting with `*`) is an inline Redis command
/// rather than a text-protocol request: it has no `||`, it is not the text protocol's own
/// `ping` or `exit`, and it starts with a Redis command name followed by an argument (or is
/// a command that takes none, such as INFO, QUIT, DBSIZE, COMMAND, HELLO).
pub fn is_inline_command(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.windows(2).any(|w| w == b"||") {
        return false;
    }
    let mut words = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let Some(first) = words.next() else {
        return false;
    };
    let Some(spec) = commands::lookup(first).filter(|s| s.native()) else {
        return false;
    };
    if first.eq_ignore_ascii_case(b"ping") {
        return false;
    }
    words.next().is_some() || spec.arity == 1 || spec.arity == -1
}

pub struct RespProtocol {
    decoder: RespDecoder,
    /// The connection's state for its commands (RESP version asked of the workers, name,
    /// transaction).
    conn: Conn,
    /// The version replies are encoded in now.
    writing: Version,
    /// The last command read, for the metrics.
    cmd: Cmd,
    /// Plain SETs read and not yet sent (see [`commands::batch`]).
    batches: Batches,
    /// How many arguments the last command read has.
    args: usize,
}

impl RespProtocol {
    /// A session refusing bulk strings over `max_bulk` bytes and commands over
    /// `max_command` bytes in all.
    pub fn new(max_bulk: usize, max_command: usize) -> RespProtocol {
        RespProtocol {
            decoder: RespDecoder::new(max_bulk, max_command),
            conn: Conn {
                stateful: true,
                ..Conn::default()
            },
            writing: Version::Resp2,
            cmd: Cmd::Other,
            batches: Batches::default(),
            args: 0,
        }
    }
}

impl Protocol for RespProtocol {
    type Out = Reply;
    const PROTO: Proto = Proto::Resp;

    fn command(&self) -> Cmd {
        self.cmd
    }

    fn error_of(out: &Reply) -> Option<ErrorCode> {
        match out {
            Reply::Error(msg) => Some(ErrorCode::of_resp(msg)),
            Reply::Raw(raw) if raw.first() == Some(&b'-') => {
                let end = raw.len().min(64);
                Some(ErrorCode::of_resp(&String::from_utf8_lossy(&raw[1..end])))
            }
            _ => None,
        }
    }

    fn next(&mut self, buf: &mut BytesMut, ctx: &Ctx) -> Step<Reply> {
        let args = match self.decoder.decode(buf) {
            Ok(None) => return Step::NeedMore,
            Ok(Some(args)) => args,
            Err(e) => {
                self.cmd = Cmd::Other;
                ctx.metrics.closed(Closed::ProtocolError);
                return Step::Close(Some(e.reply()));
            }
        };
        self.args = args.len();
        self.cmd = Cmd::from_name(&args[0]);
        let spec = commands::lookup(&args[0]);
        let passes = ctx.router.is_adapter() && adapter::passes_through(spec, &args);
        let access = match spec {
            Some(spec) if !passes && spec.native() => spec.access,
            _ => adapter::access(spec),
        };
        if !ctx.who.may(access) {
            // Inside MULTI, as any refused command, it fails the transaction (Redis too).
            self.conn.multi.refuse_queued();
            return Step::Reply(refusal(&ctx.who, &args[0]));
        }
        if ctx.router.mode().is_none() && spec.is_none_or(|s| s.adapter != Adapter::Here) {
            // Whether a command runs here or on the destination Redis depends on the mode.
            return Step::Reply(Reply::err("TRYAGAIN the cluster is starting; retry"));
        }
        if passes {
            self.batches.flush(ctx);
            return adapter::passthrough(spec, args, ctx);
        }
        let Some(spec) = spec.filter(|s| s.native()) else {
            self.conn.multi.refuse_queued();
            return Step::Reply(commands::unknown_command(&args));
        };
        if self.conn.multi.open && !commands::transaction::runs_at_once(spec) {
            if !spec.arity_ok(args.len()) {
                self.conn.multi.refuse_queued();
                return Step::Reply(commands::wrong_args(spec.name));
            }
            let parsed = commands::parse(spec, &args);
            return Step::Reply(commands::transaction::queue(
                spec,
                &args,
                parsed,
                &mut self.conn,
                ctx,
            ));
        }
        let cmd = match commands::parse(spec, &args) {
            Ok(commands::Cmd::Write(req)) if self.batches.may_gather(buf) => {
                match self.batches.gather(req, buf, ctx) {
                    Ok(gathered) => return gathered,
                    Err(req) => commands::Cmd::Write(req),
                }
            }
            Ok(cmd) => cmd,
            Err(reply) => return Step::Reply(reply),
        };
        // Whatever it sends reaches the workers after the SETs before it.
        self.batches.flush(ctx);
        commands::execute(cmd, &mut self.conn, ctx)
    }

    #[inline]
    fn flush(&mut self, ctx: &Ctx) {
        self.batches.flush(ctx);
    }

    fn encode(&mut self, reply: Reply, out: &mut Outgoing) {
        if let Reply::Switch(version, _) = &reply {
            self.writing = *version;
            self.conn.version = *version;
        }
        match &reply {
            // A value read back (GET): written from where it lies if it is large.
            Reply::Bulk(value) => {
                put_bulk_head(out.buf(), value.len());
                out.put(value);
                out.buf().extend_from_slice(b"\r\n");
            }
            _ => reply.encode_as(self.writing, out.buf()),
        }
    }

    fn wanted(&self, buf: &BytesMut) -> usize {
        self.decoder.wanted(buf.len())
    }

    fn held(&self) -> usize {
        self.decoder.held()
    }

    fn kept(&self) -> usize {
        self.args * ARG_HANDLE
    }

    fn at_eof(&mut self, _buf: &BytesMut) -> Option<Reply> {
        None
    }
}

/// Redis' answer to a command this session may not run.
pub(crate) fn refusal(who: &Who, name: &[u8]) -> Reply {
    if who.authenticated() {
        Reply::err(format!(
            "NOPERM User {} has no permissions to run the '{}' command",
            who.user(),
            String::from_utf8_lossy(&name[..name.len().min(64)]).to_ascii_lowercase()
        ))
    } else {
        Reply::err("NOAUTH Authentication required.")
    }
}

/// The arguments of a RESP-encoded command (the binary protocol's `command` op): exactly one
/// whole command, within the session's limits: bulks of `max_bulk`, and `max_command` for
/// the whole with its arguments' handles, as a RESP session counts it (the decoded copy
/// and its handles hold several times the frame for many small arguments).
pub fn decode_one(value: &Bytes, max_bulk: usize, max_command: usize) -> Result<Vec<Bytes>, Reply> {
    let mut buf = BytesMut::from(&value[..]);
    let mut decoder = RespDecoder::new(max_bulk, max_command);
    match decoder.decode(&mut buf) {
        Ok(Some(args)) if buf.is_empty() => Ok(args),
        Ok(Some(_)) => Err(Reply::err("ERR the command op carries exactly one command")),
        Ok(None) => Err(Reply::err("ERR Protocol error: incomplete command")),
        Err(e) => Err(e.reply()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_sniffing() {
        assert!(is_inline_command(b"GET a"));
        assert!(is_inline_command(b"set k v\r"));
        assert!(is_inline_command(b"INFO"));
        assert!(is_inline_command(b"multi"));
        assert!(!is_inline_command(b"get||a"));
        assert!(!is_inline_command(b"ping"));
        assert!(!is_inline_command(b"PING"));
        assert!(!is_inline_command(b"exit"));
        assert!(!is_inline_command(b"stats"));
        assert!(!is_inline_command(b"get"));
        assert!(!is_inline_command(b"foo bar"));
        assert!(
            !is_inline_command(b"lpush a b"),
            "adapter-only: not a command here"
        );
        assert!(!is_inline_command(b""));
    }

    #[test]
    fn the_command_op_takes_one_whole_command() {
        let one = Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n");
        assert_eq!(decode_one(&one, 1024, 1024).unwrap().len(), 2);
        let two = Bytes::from([&one[..], &one[..]].concat());
        assert!(decode_one(&two, 1024, 1024).is_err());
        assert!(decode_one(&one.slice(..10), 1024, 1024).is_err());
        assert!(decode_one(&Bytes::from_static(b"*-1\r\n"), 1024, 1024).is_err());
        // Its 18 bytes and two handles: one byte less is refused, as a RESP session would.
        let whole = one.len() + 2 * ARG_HANDLE;
        assert!(decode_one(&one, 1024, whole).is_ok());
        assert_eq!(
            decode_one(&one, 1024, whole - 1),
            Err(Reply::err(format!(
                "ERR Protocol error: command larger than the query buffer limit ({} bytes)",
                whole - 1
            )))
        );
    }
}
