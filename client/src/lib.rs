//! Async Rust client for [twincache](https://example.invalid/twincache), a distributed
//! in-memory cache: an orchestrator routes every key to a pair of workers that hold it twice.
//!
//! A [`Client`] holds one TCP connection to an orchestrator speaking the binary frame
//! protocol, so keys and values are arbitrary bytes: `\n`, `||` and NUL round-trip exactly.
//! The connection is multiplexed: clone the client freely (a clone is an `Arc` bump) and call
//! it from as many tasks as you like; their requests are in flight together on the one
//! connection and leave in shared writes. If the connection dies, the next call opens a new
//! one. The model is redis-rs's multiplexed connection and connection manager in one type.
//!
//! Every example below runs as a test against an in-process cluster
//! (`twincache_orchestrator::local::LocalCluster`); in an application, the address is your
//! orchestrator's (`127.0.0.1:7000` for `deploy/local-cluster.sh`).
//!
//! ## At a glance
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(2).await?;
//! # let addr = cluster.addr().to_string();
//! use std::time::Duration;
//! use twincache_client::{Client, Pipeline, SetOptions};
//!
//! let client = Client::connect(&addr).await?;  // cheap to clone, share across tasks
//! client.set("greeting", "hello").await?;
//! let greeting: Option<String> = client.get("greeting").await?;
//! # assert_eq!(greeting.as_deref(), Some("hello"));
//! client.set(b"any\n||\0bytes", &b"\xff\x00"[..]).await?;
//! client.set("visits", 41).await?;
//! assert_eq!(client.get::<i64>("visits").await?, Some(41));
//! assert!(client.set_options::<bool>("lock", "me", SetOptions::new().nx().ttl(Duration::from_secs(30))).await?);
//! let values = client.mget::<String>(["greeting", "missing"]).await?;
//! # assert_eq!(values, [Some("hello".to_string()), None]);
//! let mut pipe = Pipeline::new();
//! pipe.set("a", "1").get("a").del("a");
//! let (_, a, deleted): ((), Option<String>, bool) = pipe.query(&client).await?;
//! # assert_eq!((a.as_deref(), deleted), (Some("1"), true));
//! # Ok(())
//! # }
//! ```
//!
//! ## Getting and setting
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let addr = cluster.addr().to_string();
//! use twincache_client::Client;
//!
//! let client = Client::connect(&addr).await?;
//! client.set("greeting", "hello").await?;
//! let greeting: Option<String> = client.get("greeting").await?;
//! assert_eq!(greeting.as_deref(), Some("hello"));
//!
//! // Keys and values are bytes: any bytes.
//! client.set(b"k\n||\0", &b"\xff\x00 line\nbreak"[..]).await?;
//! assert_eq!(client.get::<Vec<u8>>(b"k\n||\0").await?.as_deref(), Some(&b"\xff\x00 line\nbreak"[..]));
//!
//! assert!(client.exists("greeting").await?);
//! assert!(client.del("greeting").await?);
//! assert_eq!(client.get::<String>("greeting").await?, None);
//! # Ok(())
//! # }
//! ```
//!
//! ## Borrowed data in, typed data out
//! Values are anything [`ToArg`]: borrowed text and bytes (`&str`, `&String`, `&[u8]`),
//! owned buffers taken without a copy (`String`, `Vec<u8>`, `Bytes`), numbers. Answers are read
//! as the type asked for ([`FromValue`]): `get::<String>`, `get::<i64>`, `get::<Bytes>` (no
//! copy), and a value that does not fit is an [`Error::Type`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
//! let user = String::from("ada");
//! let key = format!("user:{user}:visits");
//! client.set(&key, 41).await?;
//! let visits = client.get::<u64>(&key).await?.unwrap_or(0);
//! client.set(&key, visits + 1).await?;
//! assert_eq!(client.get::<u64>(&key).await?, Some(42));
//! client.set("name", &user).await?; // `user` is only borrowed
//! assert_eq!(client.get::<String>("name").await?, Some(user));
//! # Ok(())
//! # }
//! ```
//!
//! ## Expiry and conditional writes
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
//! use std::time::Duration;
//! use twincache_client::{Error, SetOptions};
//!
//! client.set_with_ttl("session", "token", Duration::from_millis(50)).await?;
//! tokio::time::sleep(Duration::from_millis(100)).await;
//! assert_eq!(client.get::<String>("session").await?, None);
//!
//! // As Redis does, a zero TTL is refused rather than guessed at.
//! let zero = client.set_with_ttl("session", "token", Duration::ZERO).await;
//! assert!(matches!(zero, Err(Error::InvalidArgument(_))));
//!
//! assert!(client.set_nx("leader", "node-1").await?);
//! assert!(!client.set_nx("leader", "node-2").await?);
//! let replaced: bool = client.set_options("leader", "node-2", SetOptions::new().xx().keep_ttl()).await?;
//! assert!(replaced);
//! # Ok(())
//! # }
//! ```
//!
//! ## Counters, expiry and strings
//! Redis commands run through the orchestrator's command op, one method each. A Redis error
//! keeps Redis' text: `ERR value is not an integer or out of range` for a counter over text.
//! [`Client::ttl`] tells "no such key" from "no expiry" by name ([`Ttl`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
//! use std::time::Duration;
//! use twincache_client::Ttl;
//!
//! assert_eq!(client.incr("page:views").await?, 1);
//! assert_eq!(client.incr_by("page:views", 10).await?, 11);
//! assert_eq!(client.decr("page:views").await?, 10);
//! assert_eq!(client.incr_by_float("temperature", 21.5).await?, 21.5);
//!
//! client.set("greeting", "hello").await?;
//! let err = client.incr("greeting").await.unwrap_err();
//! assert_eq!(err.to_string(), "server answered WrongType: ERR value is not an integer or out of range");
//!
//! assert_eq!(client.ttl("greeting").await?, Ttl::NoExpiry);
//! assert!(client.expire("greeting", Duration::from_secs(60)).await?);
//! assert!(client.ttl("greeting").await?.remaining() > Some(Duration::from_secs(59)));
//! assert!(client.persist("greeting").await?);
//! assert_eq!(client.ttl("nobody").await?, Ttl::NoKey);
//!
//! assert_eq!(client.append("greeting", ", world").await?, 12);
//! assert_eq!(client.strlen("greeting").await?, 12);
//! assert_eq!(client.getdel::<String>("greeting").await?.as_deref(), Some("hello, world"));
//! # Ok(())
//! # }
//! ```
//!
//! ## Hashes
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
//! use std::collections::HashMap;
//!
//! client.hset("user:1", "name", "Ada").await?;
//! client.hset_multiple("user:1", [("born", "1815"), ("city", "London")]).await?;
//! assert_eq!(client.hget::<u32>("user:1", "born").await?, Some(1815));
//! let fields = client.hmget::<String>("user:1", ["name", "email"]).await?;
//! assert_eq!(fields, [Some("Ada".to_string()), None]);
//! let user: HashMap<String, String> = client.hgetall("user:1").await?;
//! assert_eq!(user["city"], "London");
//! assert_eq!(client.hincr_by("user:1", "visits", 1).await?, 1);
//! assert_eq!(client.hlen("user:1").await?, 4);
//! assert_eq!(client.hdel("user:1", ["city", "visits"]).await?, 2);
//! assert!(!client.hexists("user:1", "city").await?);
//! # Ok(())
//! # }
//! ```
//!
//! ## Any command
//! [`cmd`] builds any command the cluster runs, as redis-rs's `redis::cmd`, and
//! [`Client::command`] takes one as a list; the reply is read as the type asked for, or as a
//! [`Value`]. A [`Pipeline`] mixes commands with the other calls.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(2).await?;
//! # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
//! use twincache_client::{cmd, Pipeline, Status};
//!
//! let n: i64 = cmd("INCRBY").arg("hits").arg(5).query(&client).await?;
//! assert_eq!(n, 5);
//! let score: Option<String> = client.command(["HGET", "scores", "ada"]).await?;
//! assert_eq!(score, None);
//!
//! let mut pipe = Pipeline::new();
//! pipe.set("n", 41).add_command(cmd("INCR").arg("n")).command(["HSET", "h", "f", "v"]).get("n");
//! let (_, n, added, again): ((), i64, i64, i64) = pipe.query(&client).await?;
//! assert_eq!((n, added, again), (42, 1, 42));
//!
//! // An error reply is an Error::Server with Redis' text; Error::code gives its first word.
//! let err = client.command::<i64>(["HLEN", "n"]).await.unwrap_err();
//! assert_eq!((err.status(), err.code()), (Some(Status::WrongType), Some("WRONGTYPE")));
//! # Ok(())
//! # }
//! ```
//!
//! ## Many keys, and pipelines
//! [`Client::mget`] and [`Client::mset`] send one request per key, all in one write, and
//! answer in order; a [`Pipeline`] does the same for any mix of calls.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(2).await?;
//! # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
//! use twincache_client::{Pipeline, Value};
//!
//! client.mset((0..100).map(|i| (format!("item:{i}"), i))).await?;
//! let items = client.mget::<i64>((0..100).map(|i| format!("item:{i}"))).await?;
//! assert_eq!(items[99], Some(99));
//!
//! let mut pipe = Pipeline::new();
//! pipe.set("x", "1").get("x").del("x").get("x");
//! let answers: Vec<Value> = pipe.query(&client).await?;
//! assert_eq!(answers, [Value::Okay, Value::Data("1".into()), Value::Int(1), Value::Nil]);
//! # Ok(())
//! # }
//! ```
//!
//! ## From many tasks at once
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(2).await?;
//! # let addr = cluster.addr().to_string();
//! use twincache_client::Client;
//!
//! let client = Client::connect(&addr).await?;
//! let tasks: Vec<_> = (0..100)
//!     .map(|i| {
//!         let client = client.clone();
//!         tokio::spawn(async move { client.set(format!("key:{i}"), format!("value {i}")).await })
//!     })
//!     .collect();
//! for t in tasks {
//!     t.await??;
//! }
//! assert_eq!(client.get::<String>("key:42").await?.as_deref(), Some("value 42"));
//! # Ok(())
//! # }
//! ```
//!
//! ## Configuration
//! By [builder](ClientBuilder) or by URL: timeouts, limits, credentials, and several
//! orchestrators. A client given several picks one at random (so many applications spread
//! over them) and moves to the next when its connection dies or cannot be made.
//! [`ClientBuilder::build`] makes a client that connects on its first call, so an application
//! can start before the cluster.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let one = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let (a, b) = ("127.0.0.1:1".to_string(), one.addr().to_string());
//! use std::time::Duration;
//! use twincache_client::Client;
//!
//! // `a` is down and `b` is up: calls go to `b`, whichever the client tries first.
//! let client = Client::builder()
//!     .timeout(Duration::from_secs(1))
//!     .build(&format!("{a},{b}"))?;
//! client.set("k", "v").await?;
//!
//! let client = Client::connect(&format!("twincache://{a},{b}?timeout=1s&connect_timeout=200ms")).await?;
//! assert_eq!(client.get::<String>("k").await?.as_deref(), Some("v"));
//! # Ok(())
//! # }
//! ```
//!
//! With passwords (the orchestrator's `--requirepass-file` or `--users-file`):
//! `Client::builder().user("app", "secret")`, `.password("secret")`, or
//! `twincache://app:secret@host:7000` (`twincache://:secret@host:7000` for the default user).
//!
//! ## TLS
//! [`ClientBuilder::tls`] with a [`TlsConnector`] (the CA to trust, and a client certificate
//! for a server that requires one) connects over TLS; everything else is unchanged.
//!
//! ## Errors
//! Every call returns [`Error`], which says whether the failure was a timeout, a dropped
//! connection (the next call reconnects), a TLS failure, an answer from the server such as
//! [`Status::Unavailable`] (no worker of the key's pair is reachable), or a call refused
//! before it was sent (too large, invalid arguments). [`Error::is_retryable`] tells which a
//! retry may fix; a write that timed out or lost its connection may or may not have been
//! applied.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
//! # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
//! use std::time::Duration;
//! use twincache_client::Error;
//!
//! let mut tries = 0;
//! let value = loop {
//!     match client.get::<String>("config").await {
//!         Err(e) if e.is_retryable() && tries < 3 => {
//!             tries += 1;
//!             tokio::time::sleep(Duration::from_millis(100)).await;
//!         }
//!         other => break other?,
//!     }
//! };
//! assert_eq!(value, None);
//!
//! // A value over the server's frame limit is refused here, before it could cost the
//! // connection (and every other call on it), and a retry would not help.
//! let big = client.set("big", vec![0u8; 17 << 20]).await.unwrap_err();
//! assert!(matches!(big, Error::TooLarge { .. }) && !big.is_retryable());
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout
//! [`client`](Client) (connections, failover, the calls), `command` ([`cmd`],
//! [`Client::command`], the typed methods on Redis commands, [`Ttl`]), `config`
//! ([`ClientBuilder`], addresses, URLs), `cmd` (each call's request and how its answer
//! reads), [`value`](Value) ([`ToArg`], [`Value`], [`FromValue`]), `options`
//! ([`SetOptions`]), `pipeline` ([`Pipeline`]), `connection` (the multiplexed
//! [`Connection`], also the orchestrator's link to each worker), `error` ([`Error`]).

mod client;
mod cmd;
mod command;
mod config;
mod connection;
mod error;
mod options;
mod pipeline;
mod value;

pub use bytes::Bytes;
pub use client::Client;
pub use command::{cmd, Command, Ttl};
pub use config::{ClientBuilder, DEFAULT_PORT};
pub use connection::{Connection, Reply, OUTBOX_LIMIT, PATIENCE};
pub use error::Error;
pub use options::SetOptions;
pub use pipeline::Pipeline;
pub use twincache_protocol::auth::ClusterSecret;
pub use twincache_protocol::budget::Account;
pub use twincache_protocol::frame::{flags, Op, Request, Response};
pub use twincache_protocol::Status;
pub use twincache_tls::{rustls, Connector as TlsConnector, TlsError};
pub use value::{FromValue, ToArg, Value};
