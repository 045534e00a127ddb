//! Any Redis command the cluster runs, through the orchestrator's command op (`Op::Command`):
//! the generic call ([`cmd`], [`Command`], [`Client::command`]) and the typed methods built on
//! it (counters, expiry, strings, hashes), one small function each.
//!
//! The request's value is the command as a RESP array of bulk strings; the answer is the RESP
//! reply, decoded by `twincache_protocol::resp` into a [`Value`]. An error reply (`-WRONGTYPE
//! ...`, `-ERR ...`) is an [`Error::Server`] carrying Redis' text as it is.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use twincache_protocol::frame::{flags, Op, Request};
use twincache_protocol::resp::{decode_reply, encode_command, Reply};
use twincache_protocol::Status;

use crate::cmd::{Cmd, Reading};
use crate::options::ttl_ms;
use crate::value::{FromValue, ToArg, Value};
use crate::{Client, Error};

/// A Redis command to run: its name, then [`Command::arg`] for each argument, as redis-rs's
/// `redis::cmd`. Run it with [`Command::query`], or queue it in a
/// [`Pipeline`](crate::Pipeline) with [`Pipeline::add_command`](crate::Pipeline::add_command).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
/// # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
/// use twincache_client::cmd;
///
/// let n: i64 = cmd("INCRBY").arg("hits").arg(5).query(&client).await?;
/// assert_eq!(n, 5);
/// # Ok(())
/// # }
/// ```
pub fn cmd(name: impl ToArg) -> Command {
    Command {
        args: vec![name.into_arg()],
        resp3: false,
    }
}

/// A Redis command and its arguments; see [`cmd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    args: Vec<Bytes>,
    resp3: bool,
}

impl Command {
    /// Appends an argument: text, bytes or a number ([`ToArg`]).
    pub fn arg(&mut self, arg: impl ToArg) -> &mut Command {
        self.args.push(arg.into_arg());
        self
    }

    /// Asks for the reply in RESP3's shapes: [`Value::Map`] for `HGETALL`, [`Value::Double`],
    /// [`Value::Boolean`], [`Value::Set`]. Without it the reply is RESP2's, as redis-rs reads
    /// by default (a map is a flat [`Value::Array`]); [`FromValue`] reads maps from either.
    pub fn resp3(&mut self) -> &mut Command {
        self.resp3 = true;
        self
    }

    /// Runs the command and reads its reply as `T`.
    pub async fn query<T: FromValue>(&self, client: &Client) -> Result<T, Error> {
        T::from_value(client.one(self.to_cmd()?).await?)
    }

    /// The binary request carrying the command. An empty command is refused before it is
    /// sent.
    pub(crate) fn to_cmd(&self) -> Result<Cmd, Error> {
        if self.args.is_empty() {
            return Err(Error::invalid("a command needs at least its name"));
        }
        let mut value =
            BytesMut::with_capacity(16 + self.args.iter().map(|a| a.len() + 16).sum::<usize>());
        encode_command(&self.args, &mut value);
        let mut req = Request::new(Op::Command, Bytes::new());
        req.value = value.freeze();
        if self.resp3 {
            req.flags |= flags::RESP3;
        }
        Ok(Cmd {
            req,
            reading: Reading::Resp,
        })
    }
}

impl<A: ToArg> FromIterator<A> for Command {
    /// A command from its name and arguments, in order.
    fn from_iter<I: IntoIterator<Item = A>>(iter: I) -> Command {
        Command {
            args: iter.into_iter().map(ToArg::into_arg).collect(),
            resp3: false,
        }
    }
}

/// The RESP reply `payload` of a command as a [`Value`]; an error reply is the error.
pub(crate) fn decode(payload: Bytes) -> Result<Value, Error> {
    match decode_reply(&payload) {
        Ok((Reply::Error(text), n)) if n == payload.len() => Err(reply_error(text)),
        Ok((reply, n)) if n == payload.len() => Ok(value_of(reply)),
        Ok(_) => Err(malformed("bytes after the reply")),
        Err(e) => Err(malformed(e)),
    }
}

fn malformed(why: impl std::fmt::Display) -> Error {
    Error::Server {
        status: Status::ServerError,
        message: format!("malformed command reply: {why}"),
    }
}

/// A Redis error reply as an [`Error::Server`] with Redis' text as its message, under the
/// status that says what a caller does about it: `TRYAGAIN` (no worker of the key's pair is
/// reachable), `CLUSTERDOWN`, `LOADING`, `MASTERDOWN` are [`Status::Unavailable`], retryable;
/// `NOAUTH`/`WRONGPASS` [`Status::NoAuth`]; `NOPERM` [`Status::NoPerm`]; an unknown command
/// [`Status::InvalidCommand`]; anything else (`WRONGTYPE`, `ERR value is not an integer ...`,
/// `ERR syntax error`) [`Status::WrongType`], as the orchestrator's own binary ops answer a
/// value the command cannot use. [`Error::code`] gives the error's first word.
pub(crate) fn reply_error(text: String) -> Error {
    let code = text.split(' ').next().unwrap_or_default();
    let status = match code {
        "TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN" => Status::Unavailable,
        "NOAUTH" | "WRONGPASS" => Status::NoAuth,
        "NOPERM" => Status::NoPerm,
        "ERR" if text.starts_with("ERR unknown command") => Status::InvalidCommand,
        _ => Status::WrongType,
    };
    Error::Server {
        status,
        message: text,
    }
}

/// A decoded reply as the crate's [`Value`]; an error inside an aggregate stays a value.
fn value_of(reply: Reply) -> Value {
    match reply {
        Reply::Simple("OK") => Value::Okay,
        Reply::Simple(s) => Value::Status(s.into()),
        Reply::Line(s) if s == "OK" => Value::Okay,
        Reply::Line(s) => Value::Status(s),
        Reply::Error(e) => Value::Error(e),
        Reply::Int(n) => Value::Int(n),
        Reply::Bulk(b) | Reply::Verbatim(_, b) | Reply::Raw(b) => Value::Data(b),
        Reply::Nil | Reply::NilArray => Value::Nil,
        Reply::Array(items) => Value::Array(items.into_iter().map(value_of).collect()),
        Reply::Set(items) => Value::Set(items.into_iter().map(value_of).collect()),
        Reply::Map(pairs) => Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (value_of(k), value_of(v)))
                .collect(),
        ),
        Reply::Double(d) => Value::Double(d),
        Reply::Bool(b) => Value::Boolean(b),
        Reply::Switch(_, reply) => value_of(*reply),
    }
}

/// How long a key has left to live: Redis' `PTTL`, whose `-2` and `-1` are told apart by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// There is no such key (Redis answers -2).
    NoKey,
    /// The key exists and never expires (Redis answers -1).
    NoExpiry,
    /// The key expires after this long (milliseconds precision).
    ExpiresIn(Duration),
}

impl Ttl {
    /// The time left, if the key exists and expires.
    pub fn remaining(self) -> Option<Duration> {
        match self {
            Ttl::ExpiresIn(d) => Some(d),
            Ttl::NoKey | Ttl::NoExpiry => None,
        }
    }

    fn from_pttl(ms: i64) -> Result<Ttl, Error> {
        match ms {
            -2 => Ok(Ttl::NoKey),
            -1 => Ok(Ttl::NoExpiry),
            ms => u64::try_from(ms)
                .map(|ms| Ttl::ExpiresIn(Duration::from_millis(ms)))
                .map_err(|_| Error::type_error("Ttl", format!("the integer {ms}"))),
        }
    }
}

/// Reads an array reply element by element.
fn items<T: FromValue>(v: Value) -> Result<Vec<T>, Error> {
    Vec::<Value>::from_value(v)?
        .into_iter()
        .map(T::from_value)
        .collect()
}

impl Client {
    /// Runs one Redis command, given as its name and arguments, and reads the reply as `T`:
    /// `client.command::<i64>(["INCR", "hits"])`. Arguments of different types take
    /// [`cmd`]'s builder instead. An error reply is an [`Error::Server`] whose message is
    /// Redis' text (`WRONGTYPE Operation against a key holding the wrong kind of value`);
    /// `TRYAGAIN` (the key's pair unreachable) is retryable, as [`Status::Unavailable`] is.
    ///
    /// The orchestrator runs the command as this client's user, without connection state:
    /// `MULTI`, `WATCH`, `HELLO`, `CLIENT` answer an error that needs a RESP connection.
    pub async fn command<T: FromValue>(
        &self,
        args: impl IntoIterator<Item = impl ToArg>,
    ) -> Result<T, Error> {
        args.into_iter().collect::<Command>().query(self).await
    }

    /// Adds 1 to the integer stored under `key` (0 if there is none) and answers the result.
    /// A value that is not an integer is an error with Redis' text, `ERR value is not an
    /// integer or out of range`.
    pub async fn incr(&self, key: impl AsRef<[u8]>) -> Result<i64, Error> {
        cmd("INCR").arg(key.as_ref()).query(self).await
    }

    /// Adds `delta` to the integer stored under `key` (0 if there is none); the result.
    pub async fn incr_by(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64, Error> {
        cmd("INCRBY").arg(key.as_ref()).arg(delta).query(self).await
    }

    /// Subtracts 1 from the integer stored under `key` (0 if there is none); the result.
    pub async fn decr(&self, key: impl AsRef<[u8]>) -> Result<i64, Error> {
        cmd("DECR").arg(key.as_ref()).query(self).await
    }

    /// Subtracts `delta` from the integer stored under `key` (0 if there is none); the result.
    pub async fn decr_by(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64, Error> {
        cmd("DECRBY").arg(key.as_ref()).arg(delta).query(self).await
    }

    /// Adds `delta` to the number stored under `key` (0 if there is none); the result.
    pub async fn incr_by_float(&self, key: impl AsRef<[u8]>, delta: f64) -> Result<f64, Error> {
        cmd("INCRBYFLOAT")
            .arg(key.as_ref())
            .arg(delta)
            .query(self)
            .await
    }

    /// Makes `key` expire after `ttl` (Redis `PEXPIRE`: rounded down to milliseconds, at
    /// least 1 ms); whether the key exists. A zero `ttl` is refused with
    /// [`Error::InvalidArgument`], as in [`Client::set_with_ttl`] (`del` deletes).
    pub async fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool, Error> {
        let ms = ttl_ms(ttl)?;
        cmd("PEXPIRE").arg(key.as_ref()).arg(ms).query(self).await
    }

    /// Makes `key` expire at `at` (Redis `PEXPIREAT`, in milliseconds); whether the key
    /// exists. A time already past deletes the key, as in Redis; a time before 1970 is
    /// refused with [`Error::InvalidArgument`].
    pub async fn expire_at(&self, key: impl AsRef<[u8]>, at: SystemTime) -> Result<bool, Error> {
        let ms = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| Error::invalid("an expiry time before 1970"))?
            .as_millis();
        cmd("PEXPIREAT").arg(key.as_ref()).arg(ms).query(self).await
    }

    /// Removes `key`'s expiry; whether it had one.
    pub async fn persist(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        cmd("PERSIST").arg(key.as_ref()).query(self).await
    }

    /// How long `key` has left (Redis `PTTL`): [`Ttl::NoKey`] if there is no such key (Redis'
    /// -2), [`Ttl::NoExpiry`] if it never expires (-1), else [`Ttl::ExpiresIn`];
    /// [`Ttl::remaining`] gives the last as an `Option`.
    pub async fn ttl(&self, key: impl AsRef<[u8]>) -> Result<Ttl, Error> {
        Ttl::from_pttl(cmd("PTTL").arg(key.as_ref()).query(self).await?)
    }

    /// Appends `value` to the value stored under `key` (creating it); the new length.
    pub async fn append(&self, key: impl AsRef<[u8]>, value: impl ToArg) -> Result<usize, Error> {
        cmd("APPEND").arg(key.as_ref()).arg(value).query(self).await
    }

    /// The length in bytes of the value stored under `key`, 0 if there is none.
    pub async fn strlen(&self, key: impl AsRef<[u8]>) -> Result<usize, Error> {
        cmd("STRLEN").arg(key.as_ref()).query(self).await
    }

    /// The value stored under `key` read as `T`, deleting it (Redis `GETDEL`); `None` if
    /// there was none.
    pub async fn getdel<T: FromValue>(&self, key: impl AsRef<[u8]>) -> Result<Option<T>, Error> {
        cmd("GETDEL").arg(key.as_ref()).query(self).await
    }

    /// The value stored under `key` read as `T`, making the key expire after `ttl` (Redis
    /// `GETEX key PX ms`; a zero `ttl` is refused); `None` if there is none.
    pub async fn getex<T: FromValue>(
        &self,
        key: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<Option<T>, Error> {
        let ms = ttl_ms(ttl)?;
        cmd("GETEX")
            .arg(key.as_ref())
            .arg("PX")
            .arg(ms)
            .query(self)
            .await
    }

    /// Sets `field` of the hash under `key` to `value`; whether the field is new.
    pub async fn hset(
        &self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
        value: impl ToArg,
    ) -> Result<bool, Error> {
        let new: usize = cmd("HSET")
            .arg(key.as_ref())
            .arg(field.as_ref())
            .arg(value)
            .query(self)
            .await?;
        Ok(new > 0)
    }

    /// Sets every `(field, value)` of the hash under `key` in one command; how many fields
    /// are new.
    pub async fn hset_multiple(
        &self,
        key: impl AsRef<[u8]>,
        items: impl IntoIterator<Item = (impl AsRef<[u8]>, impl ToArg)>,
    ) -> Result<usize, Error> {
        let mut c = cmd("HSET");
        c.arg(key.as_ref());
        for (field, value) in items {
            c.arg(field.as_ref()).arg(value);
        }
        c.query(self).await
    }

    /// `field` of the hash under `key` read as `T`; `None` if the hash or the field is
    /// missing.
    pub async fn hget<T: FromValue>(
        &self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
    ) -> Result<Option<T>, Error> {
        cmd("HGET")
            .arg(key.as_ref())
            .arg(field.as_ref())
            .query(self)
            .await
    }

    /// The `fields` of the hash under `key`, in order, each read as `T` or `None` where it is
    /// missing.
    pub async fn hmget<T: FromValue>(
        &self,
        key: impl AsRef<[u8]>,
        fields: impl IntoIterator<Item = impl AsRef<[u8]>>,
    ) -> Result<Vec<Option<T>>, Error> {
        let mut c = cmd("HMGET");
        c.arg(key.as_ref());
        for field in fields {
            c.arg(field.as_ref());
        }
        items(c.query(self).await?)
    }

    /// Every field and value of the hash under `key`, read as a map: `HashMap<K, V>`,
    /// `BTreeMap<K, V>` or `Vec<(K, V)>` (see [`FromValue`]); empty if there is no such key.
    pub async fn hgetall<M: FromValue>(&self, key: impl AsRef<[u8]>) -> Result<M, Error> {
        cmd("HGETALL").arg(key.as_ref()).query(self).await
    }

    /// Deletes `fields` from the hash under `key`; how many were there.
    pub async fn hdel(
        &self,
        key: impl AsRef<[u8]>,
        fields: impl IntoIterator<Item = impl AsRef<[u8]>>,
    ) -> Result<usize, Error> {
        let mut c = cmd("HDEL");
        c.arg(key.as_ref());
        for field in fields {
            c.arg(field.as_ref());
        }
        c.query(self).await
    }

    /// Whether the hash under `key` has `field`.
    pub async fn hexists(
        &self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
    ) -> Result<bool, Error> {
        cmd("HEXISTS")
            .arg(key.as_ref())
            .arg(field.as_ref())
            .query(self)
            .await
    }

    /// How many fields the hash under `key` has, 0 if there is no such key.
    pub async fn hlen(&self, key: impl AsRef<[u8]>) -> Result<usize, Error> {
        cmd("HLEN").arg(key.as_ref()).query(self).await
    }

    /// Adds `delta` to the integer in `field` of the hash under `key` (0 if there is none);
    /// the result.
    pub async fn hincr_by(
        &self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
        delta: i64,
    ) -> Result<i64, Error> {
        cmd("HINCRBY")
            .arg(key.as_ref())
            .arg(field.as_ref())
            .arg(delta)
            .query(self)
            .await
    }

    /// The field names of the hash under `key`, each read as `T`.
    pub async fn hkeys<T: FromValue>(&self, key: impl AsRef<[u8]>) -> Result<Vec<T>, Error> {
        items(cmd("HKEYS").arg(key.as_ref()).query(self).await?)
    }

    /// The values of the hash under `key`, each read as `T`.
    pub async fn hvals<T: FromValue>(&self, key: impl AsRef<[u8]>) -> Result<Vec<T>, Error> {
        items(cmd("HVALS").arg(key.as_ref()).query(self).await?)
    }

    /// Adds a pair of two fresh (started, empty) workers, `a` and `b` as `ip:port` (or
    /// `ip:port@peer-ip:port`), and moves its share of the slots to it (`CLUSTER ADDPAIR`,
    /// an admin user's). Answered once the change is accepted; it runs in the background:
    /// [`Client::cluster_info`] shows its progress. A change that cannot be made is an
    /// [`Error::Server`] with the reason, and changes nothing.
    pub async fn add_pair(&self, a: &str, b: &str) -> Result<(), Error> {
        self.command(["CLUSTER", "ADDPAIR", a, b]).await
    }

    /// Removes a pair (`pairN` as `cluster_info` names it, or one of its workers'
    /// addresses) once its slots have moved to the others (`CLUSTER REMOVEPAIR`).
    pub async fn remove_pair(&self, pair: &str) -> Result<(), Error> {
        self.command(["CLUSTER", "REMOVEPAIR", pair]).await
    }

    /// Replaces worker `old` by the fresh worker `new`, which refills from its partner
    /// before it serves (`CLUSTER REPLACE`).
    pub async fn replace_worker(&self, old: &str, new: &str) -> Result<(), Error> {
        self.command(["CLUSTER", "REPLACE", old, new]).await
    }

    /// `INFO cluster`: the pairs, their workers' states, the slot map and its epoch, and a
    /// change under way (`membership:`, `move_slots_done:`, ...), one `field:value` a line.
    pub async fn cluster_info(&self) -> Result<String, Error> {
        self.command(["INFO", "cluster"]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &'static [u8]) -> Result<Value, Error> {
        decode(Bytes::from_static(bytes))
    }

    #[test]
    fn replies_read_as_values() {
        assert_eq!(reply(b"+OK\r\n").unwrap(), Value::Okay);
        assert_eq!(reply(b"+PONG\r\n").unwrap(), Value::Status("PONG".into()));
        assert_eq!(reply(b":-2\r\n").unwrap(), Value::Int(-2));
        assert_eq!(reply(b"$1\r\nv\r\n").unwrap(), Value::Data("v".into()));
        assert_eq!(reply(b"$-1\r\n").unwrap(), Value::Nil);
        assert_eq!(reply(b"_\r\n").unwrap(), Value::Nil);
        assert_eq!(reply(b",1.5\r\n").unwrap(), Value::Double(1.5));
        assert_eq!(reply(b"#t\r\n").unwrap(), Value::Boolean(true));
        assert_eq!(
            reply(b"*2\r\n$1\r\na\r\n-ERR inner\r\n").unwrap(),
            Value::Array(vec![
                Value::Data("a".into()),
                Value::Error("ERR inner".into())
            ])
        );
        assert_eq!(
            reply(b"%1\r\n$1\r\nf\r\n:1\r\n").unwrap(),
            Value::Map(vec![(Value::Data("f".into()), Value::Int(1))])
        );
        for bad in [&b""[..], b"$5\r\nab\r\n", b":1\r\n:2\r\n", b"?\r\n"] {
            let err = decode(Bytes::from_static(bad)).unwrap_err();
            assert_eq!(err.status(), Some(Status::ServerError), "{bad:?}");
        }
    }

    #[test]
    fn error_replies_keep_redis_text() {
        let cases = [
            (
                "WRONGTYPE Operation against a key",
                Status::WrongType,
                false,
            ),
            (
                "ERR value is not an integer or out of range",
                Status::WrongType,
                false,
            ),
            ("ERR unknown command 'x'", Status::InvalidCommand, false),
            (
                "TRYAGAIN a pair has no reachable worker",
                Status::Unavailable,
                true,
            ),
            ("NOPERM no", Status::NoPerm, false),
            ("NOAUTH Authentication required.", Status::NoAuth, false),
        ];
        for (text, status, retryable) in cases {
            let err = decode(Bytes::from(format!("-{text}\r\n"))).unwrap_err();
            assert_eq!(err.status(), Some(status), "{text}");
            assert_eq!(err.is_retryable(), retryable, "{text}");
            assert_eq!(err.code(), text.split(' ').next());
            assert!(matches!(&err, Error::Server { message, .. } if message == text));
        }
        assert_eq!(Error::invalid("x").code(), None);
        let binary = Error::Server {
            status: Status::Unavailable,
            message: "no worker of this key's pair is reachable".into(),
        };
        assert_eq!(binary.code(), None);
    }

    #[test]
    fn pttl_reads_as_ttl() {
        assert_eq!(Ttl::from_pttl(-2).unwrap(), Ttl::NoKey);
        assert_eq!(Ttl::from_pttl(-1).unwrap(), Ttl::NoExpiry);
        assert_eq!(
            Ttl::from_pttl(1500).unwrap().remaining(),
            Some(Duration::from_millis(1500))
        );
        assert!(Ttl::from_pttl(-3).is_err());
    }

    #[test]
    fn commands_are_resp_arrays() {
        let c = cmd("SET").arg("k").arg(1).to_cmd().unwrap();
        assert_eq!(c.req.op, Op::Command);
        assert_eq!(
            &c.req.value[..],
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n"
        );
        assert_eq!(c.req.flags, 0);
        assert_eq!(
            cmd("PING").resp3().to_cmd().unwrap().req.flags,
            flags::RESP3
        );
        let from_iter: Command = ["SET", "k", "1"].into_iter().collect();
        assert_eq!(from_iter.to_cmd().unwrap().req.value, c.req.value);
    }
}
