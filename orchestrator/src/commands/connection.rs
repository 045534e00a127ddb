//! Connection commands, answered by the orchestrator in either mode: PING, ECHO, QUIT,
//! SELECT, AUTH, HELLO (which switches a connection to RESP3), CLIENT.

use bytes::Bytes;
use twincache_protocol::resp::{Reply, Version};

use super::{int, syntax_error, wrong_args, Adapter, Cmd, Conn, Family, Group, Spec};
use crate::auth::{Access, Denied};
use crate::session::{Ctx, Step};

const HERE: Family = Family::new(Group::Connection, Adapter::Here).fast();

pub static SPECS: &[Spec] = &[
    HERE.cmd(
        "ping",
        -1,
        Access::Connection,
        "Returns the server's liveliness response.",
        ping,
    ),
    HERE.cmd(
        "echo",
        2,
        Access::Connection,
        "Returns the given string.",
        echo,
    ),
    HERE.cmd("quit", -1, Access::Anyone, "Closes the connection.", |_| {
        Ok(Cmd::Quit)
    }),
    HERE.cmd(
        "select",
        2,
        Access::Connection,
        "Changes the selected database (only 0 exists).",
        select,
    ),
    HERE.cmd(
        "auth",
        -2,
        Access::Anyone,
        "Authenticates the connection.",
        auth_args,
    ),
    HERE.since("6.0.0").cmd(
        "hello",
        -1,
        Access::Anyone,
        "Handshakes with the server, optionally switching to RESP3.",
        hello_args,
    ),
    HERE.since("2.4.0").cmd(
        "client",
        -2,
        Access::Connection,
        "A container for client connection commands.",
        client_args,
    ),
];

fn ping(args: &[Bytes]) -> Result<Cmd, Reply> {
    match args {
        [_] => Ok(Cmd::Answer(Reply::Simple("PONG"))),
        [_, msg] => Ok(Cmd::Answer(Reply::Bulk(msg.clone()))),
        _ => Err(wrong_args("ping")),
    }
}

fn echo(args: &[Bytes]) -> Result<Cmd, Reply> {
    Ok(Cmd::Answer(Reply::Bulk(args[1].clone())))
}

fn select(args: &[Bytes]) -> Result<Cmd, Reply> {
    match int(&args[1])? {
        0 => Ok(Cmd::Select),
        _ => Err(Reply::err("ERR DB index is out of range")),
    }
}

fn auth_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    match &args[1..] {
        [password] => Ok(Cmd::Auth(None, password.clone())),
        [user, password] => Ok(Cmd::Auth(Some(user.clone()), password.clone())),
        _ => Err(syntax_error()),
    }
}

/// `HELLO [protover [AUTH user password] [SETNAME name]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: Option<Version>,
    pub auth: Option<(Bytes, Bytes)>,
    pub name: Option<Bytes>,
}

fn hello_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    let version = match args.get(1) {
        None => None,
        Some(v) => match twincache_protocol::resp::string2ll(v) {
            Some(2) => Some(Version::Resp2),
            Some(3) => Some(Version::Resp3),
            Some(_) => return Err(Reply::err("NOPROTO unsupported protocol version")),
            None => {
                return Err(Reply::err(
                    "ERR Protocol version is not an integer or out of range",
                ))
            }
        },
    };
    let mut hello = Hello {
        version,
        auth: None,
        name: None,
    };
    let mut rest = args.get(2..).unwrap_or_default();
    while let Some(opt) = rest.first() {
        match rest {
            [o, user, password, more @ ..] if o.eq_ignore_ascii_case(b"auth") => {
                hello.auth = Some((user.clone(), password.clone()));
                rest = more;
            }
            [o, n, more @ ..] if o.eq_ignore_ascii_case(b"setname") => {
                hello.name = Some(n.clone());
                rest = more;
            }
            _ => {
                return Err(Reply::err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&opt[..opt.len().min(64)])
                )))
            }
        }
    }
    Ok(Cmd::Hello(hello))
}

/// The CLIENT subcommands clients send on connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    SetName(Bytes),
    GetName,
    Id,
    Info,
    /// SETINFO, NO-EVICT, NO-TOUCH: accepted and ignored (they change nothing here).
    Accepted,
}

fn client_args(args: &[Bytes]) -> Result<Cmd, Reply> {
    let sub = args[1].to_ascii_lowercase();
    Ok(Cmd::Client(match (sub.as_slice(), args.len()) {
        (b"setname", 3) => {
            if args[2].iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                return Err(Reply::err(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ));
            }
            Client::SetName(args[2].clone())
        }
        (b"getname", 2) => Client::GetName,
        (b"id", 2) => Client::Id,
        (b"info", 2) => Client::Info,
        (b"setinfo", 4) | (b"no-evict", 3) | (b"no-touch", 3) => Client::Accepted,
        (b"setname" | b"getname" | b"id" | b"info" | b"setinfo" | b"no-evict" | b"no-touch", _) => {
            return Err(Reply::err(format!(
                "ERR wrong number of arguments for 'client|{}' command",
                String::from_utf8_lossy(&sub)
            )))
        }
        _ => {
            return Err(Reply::err(format!(
                "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(&args[1][..args[1].len().min(64)])
            )))
        }
    }))
}

/// `AUTH [user] password`, answered once checked; nothing after it is read until then.
pub(super) fn auth(user: Option<Bytes>, password: Bytes, ctx: &Ctx) -> Step<Reply> {
    let (auth, who) = (ctx.auth.clone(), ctx.who.clone());
    Step::Settle(Box::pin(async move {
        let user = user.as_deref().map(String::from_utf8_lossy);
        match auth.authenticate(&who, user.as_deref(), &password).await {
            Ok(()) => Reply::OK,
            Err(denied) => denied_reply(denied),
        }
    }))
}

/// Redis' replies to a failed AUTH.
pub(crate) fn denied_reply(denied: Denied) -> Reply {
    match denied {
        Denied::NoPasswordSet => Reply::err(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        ),
        Denied::WrongPass | Denied::TooManyFailures => {
            Reply::err("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }
}

/// HELLO: authenticates if asked, names the connection, and switches its protocol. The
/// reply is a map (a flat array in RESP2), in the new protocol.
pub(super) fn hello(hello: Hello, conn: &mut Conn, ctx: &Ctx) -> Step<Reply> {
    let id = ctx.id;
    let Some((user, password)) = hello.auth else {
        if !ctx.who.authenticated() {
            return Step::Reply(Reply::err(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise \
                 the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the \
                 client and select the RESP protocol version at the same time",
            ));
        }
        if hello.name.is_some() {
            conn.name = hello.name;
        }
        // Commands read from now on are asked of the workers in the new version; the
        // session encodes in it from this reply on.
        let version = hello.version.unwrap_or(conn.version);
        conn.version = version;
        return Step::Reply(Reply::Switch(version, Box::new(hello_reply(id, version))));
    };
    if hello.name.is_some() {
        conn.name = hello.name;
    }
    let version = hello.version.unwrap_or(conn.version);
    let (auth, who) = (ctx.auth.clone(), ctx.who.clone());
    // Nothing after it is read before it is answered, and the session switches versions
    // when it encodes this reply (see `resp::RespProtocol::encode`).
    Step::Settle(Box::pin(async move {
        let user = String::from_utf8_lossy(&user);
        match auth.authenticate(&who, Some(&user), &password).await {
            Ok(()) => Reply::Switch(version, Box::new(hello_reply(id, version))),
            Err(denied) => denied_reply(denied),
        }
    }))
}

fn hello_reply(id: usize, version: Version) -> Reply {
    let s = |t: &'static str| Reply::Bulk(Bytes::from_static(t.as_bytes()));
    Reply::Map(vec![
        (s("server"), s("redis")),
        (s("version"), s(super::server::REDIS_VERSION)),
        (
            s("proto"),
            Reply::Int(if version == Version::Resp3 { 3 } else { 2 }),
        ),
        (s("id"), Reply::Int(id as i64)),
        (s("mode"), s("standalone")),
        (s("role"), s("master")),
        (s("modules"), Reply::Array(Vec::new())),
    ])
}

pub(super) fn client(client: Client, conn: &mut Conn, ctx: &Ctx) -> Step<Reply> {
    Step::Reply(match client {
        Client::SetName(name) => {
            conn.name = (!name.is_empty()).then_some(name);
            Reply::OK
        }
        Client::GetName => conn.name.clone().map_or(Reply::Nil, Reply::Bulk),
        Client::Id => Reply::Int(ctx.id as i64),
        Client::Info => Reply::Verbatim(
            "txt",
            Bytes::from(format!(
                "id={} name={} db=0 resp={}\n",
                ctx.id,
                conn.name
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default(),
                if conn.resp3() { 3 } else { 2 }
            )),
        ),
        Client::Accepted => Reply::OK,
    })
}
