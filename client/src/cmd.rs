//! One call as the client sends it: a binary request and how to read its answer as a
//! [`Value`]. Every binary-op method of [`Client`](crate::Client) and
//! [`Pipeline`](crate::Pipeline) is a constructor here plus a conversion, so a new one is one
//! small function in each; Redis commands are built in `command` and read as
//! [`Reading::Resp`].

use std::time::Duration;

use bytes::Bytes;
use twincache_protocol::frame::{Op, Request, Response};
use twincache_protocol::Status;

use crate::options::{ttl_ms, SetOptions};
use crate::value::{ToArg, Value};
use crate::Error;

/// How the status and payload of a response become a [`Value`], following the reply Redis
/// gives to the same command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// `get`: the value, or nil for a missing key.
    Value,
    /// `set`: `OK`, or nil when an `NX`/`XX` condition did not hold.
    Written,
    /// `set` with `GET`: the previous value behind a presence byte, or nil.
    Previous,
    /// `del`, `exists`: 1 if the key was there, else 0.
    Found,
    /// `ping`: `PONG`.
    Pong,
    /// `stats`: a line of text.
    Text,
    /// A Redis command (`Op::Command`): the payload is its RESP reply, an error reply
    /// included.
    Resp,
}

/// A request and how to read its answer.
#[derive(Debug, Clone)]
pub(crate) struct Cmd {
    pub req: Request,
    pub reading: Reading,
}

fn key_req(op: Op, key: impl AsRef<[u8]>) -> Request {
    Request::new(op, Bytes::copy_from_slice(key.as_ref()))
}

impl Cmd {
    fn new(req: Request, reading: Reading) -> Cmd {
        Cmd { req, reading }
    }

    pub fn get(key: impl AsRef<[u8]>) -> Cmd {
        Cmd::new(key_req(Op::Get, key), Reading::Value)
    }

    pub fn set(key: impl AsRef<[u8]>, value: impl ToArg) -> Cmd {
        let mut req = key_req(Op::Set, key);
        req.value = value.into_arg();
        Cmd::new(req, Reading::Written)
    }

    pub fn set_with_ttl(
        key: impl AsRef<[u8]>,
        value: impl ToArg,
        ttl: Duration,
    ) -> Result<Cmd, Error> {
        let mut cmd = Cmd::set(key, value);
        cmd.req.ttl_ms = ttl_ms(ttl)?;
        Ok(cmd)
    }

    pub fn set_options(
        key: impl AsRef<[u8]>,
        value: impl ToArg,
        opts: SetOptions,
    ) -> Result<Cmd, Error> {
        let mut cmd = Cmd::set(key, value);
        opts.apply(&mut cmd.req)?;
        if opts.wants_old() {
            cmd.reading = Reading::Previous;
        }
        Ok(cmd)
    }

    pub fn del(key: impl AsRef<[u8]>) -> Cmd {
        Cmd::new(key_req(Op::Del, key), Reading::Found)
    }

    pub fn exists(key: impl AsRef<[u8]>) -> Cmd {
        Cmd::new(key_req(Op::Exists, key), Reading::Found)
    }

    pub fn ping() -> Cmd {
        Cmd::new(Request::new(Op::Ping, Bytes::new()), Reading::Pong)
    }

    pub fn stats() -> Cmd {
        Cmd::new(Request::new(Op::Stats, Bytes::new()), Reading::Text)
    }
}

/// The answer `resp` to a request read as `reading`; a status the command does not expect is
/// the server's error.
pub(crate) fn read(reading: Reading, resp: Response) -> Result<Value, Error> {
    let value = match (reading, resp.status) {
        (Reading::Resp, Status::Ok) => return crate::command::decode(resp.payload),
        (Reading::Value | Reading::Text, Status::Ok) => Value::Data(resp.payload),
        (Reading::Value, Status::NotFound) => Value::Nil,
        (Reading::Written, Status::Ok) => Value::Okay,
        (Reading::Written, Status::NotApplied) => Value::Nil,
        // Whether or not the condition held, the answer is what the key held before.
        (Reading::Previous, Status::Ok | Status::NotApplied) => match resp.payload.first() {
            Some(1) => Value::Data(resp.payload.slice(1..)),
            _ => Value::Nil,
        },
        (Reading::Found, Status::Ok) => Value::Int(1),
        (Reading::Found, Status::NotFound) => Value::Int(0),
        (Reading::Pong, Status::Ok) => Value::Status("PONG".into()),
        _ => return Err(Error::from_response(resp)),
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: Status, payload: &'static [u8]) -> Response {
        Response {
            id: 1,
            status,
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn answers_read_as_redis_answers() {
        use Reading::{Found, Pong, Previous, Text, Written};
        let value = Reading::Value;
        let cases = [
            (value, resp(Status::Ok, b"v"), Ok(Value::Data("v".into()))),
            (
                value,
                resp(Status::NotFound, b"key not found"),
                Ok(Value::Nil),
            ),
            (Written, resp(Status::Ok, b""), Ok(Value::Okay)),
            (Written, resp(Status::NotApplied, b""), Ok(Value::Nil)),
            (
                Previous,
                resp(Status::Ok, b"\x01old"),
                Ok(Value::Data("old".into())),
            ),
            (
                Previous,
                resp(Status::NotApplied, b"\x01old"),
                Ok(Value::Data("old".into())),
            ),
            (Previous, resp(Status::Ok, b"\x00"), Ok(Value::Nil)),
            (Found, resp(Status::Ok, b""), Ok(Value::Int(1))),
            (Found, resp(Status::NotFound, b""), Ok(Value::Int(0))),
            (
                Pong,
                resp(Status::Ok, b"PONG"),
                Ok(Value::Status("PONG".into())),
            ),
            (
                Text,
                resp(Status::Ok, b"pair0"),
                Ok(Value::Data("pair0".into())),
            ),
            (
                value,
                resp(Status::Unavailable, b"down"),
                Err(Status::Unavailable),
            ),
            (Written, resp(Status::NotFound, b""), Err(Status::NotFound)),
        ];
        for (reading, resp, want) in cases {
            let got = read(reading, resp.clone());
            match want {
                Ok(v) => assert_eq!(got.unwrap(), v, "{reading:?} {resp:?}"),
                Err(status) => assert_eq!(got.unwrap_err().status(), Some(status)),
            }
        }
    }
}
