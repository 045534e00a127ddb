//! The [`Client`]: one multiplexed connection at a time, to one of the orchestrators it was
//! given, replaced when it dies.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use twincache_protocol::frame::{Message, Op, Request, Response};
use twincache_protocol::Status;

use crate::cmd::{read, Cmd};
use crate::config::ClientBuilder;
use crate::options::SetOptions;
use crate::value::{FromValue, ToArg, Value};
use crate::{Connection, Error};

/// A cloneable, multiplexed twincache client. See the [crate docs](crate).
///
/// A clone is an `Arc` bump and shares the connection: make one client per cluster and hand
/// clones to every task.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// The orchestrators, as given; connections go to one at a time.
    addrs: Arc<[String]>,
    config: ClientBuilder,
    /// The live connection and the index of its address; `None` before the first call of a
    /// lazy client.
    conn: Mutex<Option<(Connection, usize)>>,
    /// The address the first connection tries first: a random one, so that many
    /// applications given the same list spread over its orchestrators.
    first: usize,
    /// Serialises reconnects so a dead connection is replaced once, not once per caller.
    reconnect: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self
            .lock()
            .as_ref()
            .map(|(_, i)| self.inner.addrs[*i].clone());
        f.debug_struct("Client")
            .field("addrs", &self.inner.addrs)
            .field("connected_to", &at)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) fn new(addrs: Arc<[String]>, config: ClientBuilder) -> Client {
        let first = std::collections::hash_map::RandomState::new().hash_one(0u8) as usize;
        Client {
            inner: Arc::new(Inner {
                first: first % addrs.len().max(1),
                addrs,
                config,
                conn: Mutex::new(None),
                reconnect: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Connects with default settings to `target`: an orchestrator's `host:port` (the port
    /// defaults to 7000), several separated by commas (one is picked at random and the others
    /// are failed over to), or a `twincache://` URL with credentials and settings (see
    /// [`ClientBuilder`]). Fails if none can be reached; [`ClientBuilder::build`] connects
    /// on the first call instead.
    pub async fn connect(target: &str) -> Result<Client, Error> {
        ClientBuilder::default().connect(target).await
    }

    /// Settings: timeouts, limits, credentials.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The value stored under `key` read as `T` (`Bytes`, `String`, `Vec<u8>`, an integer,
    /// ...), or `None` if there is none.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
    /// # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
    /// use bytes::Bytes;
    ///
    /// client.set("greeting", "hello").await?;
    /// assert_eq!(client.get::<String>("greeting").await?.as_deref(), Some("hello"));
    /// let raw: Option<Bytes> = client.get("greeting").await?; // no copy of the value
    /// assert_eq!(raw.as_deref(), Some(&b"hello"[..]));
    /// assert_eq!(client.get::<String>("nobody").await?, None);
    /// // A value that is not an integer, read as one, is an error rather than a guess.
    /// assert!(client.get::<i64>("greeting").await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get<T: FromValue>(&self, key: impl AsRef<[u8]>) -> Result<Option<T>, Error> {
        Option::<T>::from_value(self.one(Cmd::get(key)).await?)
    }

    /// Stores `value` under `key`, replacing any previous value and its expiry.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl ToArg) -> Result<(), Error> {
        self.one(Cmd::set(key, value)).await.map(drop)
    }

    /// Stores `value` under `key` for `ttl` (rounded down to milliseconds, at least 1 ms),
    /// after which it is gone. A zero `ttl` is refused with [`Error::InvalidArgument`], as
    /// Redis refuses `SET key value PX 0`.
    pub async fn set_with_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl ToArg,
        ttl: Duration,
    ) -> Result<(), Error> {
        self.one(Cmd::set_with_ttl(key, value, ttl)?)
            .await
            .map(drop)
    }

    /// Stores `value` under `key` only if the key does not exist (Redis `SET NX`); whether
    /// it did.
    pub async fn set_nx(&self, key: impl AsRef<[u8]>, value: impl ToArg) -> Result<bool, Error> {
        self.set_options(key, value, SetOptions::new().nx()).await
    }

    /// Stores `value` under `key` with [`SetOptions`] (Redis' `NX`, `XX`, `PX`, `KEEPTTL`,
    /// `GET`), answering as Redis does: `OK`, or nil when a condition did not hold (read it as
    /// `bool`: whether the value was written); with `GET`, the previous value or nil (read it
    /// as `Option<T>`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
    /// # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
    /// use std::time::Duration;
    /// use twincache_client::SetOptions;
    ///
    /// let lock = SetOptions::new().nx().ttl(Duration::from_secs(30));
    /// assert!(client.set_options::<bool>("lock", "me", lock).await?);
    /// assert!(!client.set_options::<bool>("lock", "you", lock).await?); // taken
    ///
    /// let old: Option<String> = client.set_options("lock", "you", SetOptions::new().get()).await?;
    /// assert_eq!(old.as_deref(), Some("me"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn set_options<T: FromValue>(
        &self,
        key: impl AsRef<[u8]>,
        value: impl ToArg,
        opts: SetOptions,
    ) -> Result<T, Error> {
        T::from_value(self.one(Cmd::set_options(key, value, opts)?).await?)
    }

    /// Deletes `key`; true if it existed.
    pub async fn del(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        bool::from_value(self.one(Cmd::del(key)).await?)
    }

    /// Whether `key` exists (no value travels).
    pub async fn exists(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        bool::from_value(self.one(Cmd::exists(key)).await?)
    }

    /// The values of `keys`, in order, each read as `T` or `None` where there is none. The
    /// keys may live on different pairs: one request per key, all sent in one write and in
    /// flight at once. One key failing (its pair unreachable) fails the call; a
    /// [`Pipeline`](crate::Pipeline) gives each key's outcome.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let cluster = twincache_orchestrator::local::LocalCluster::start(2).await?;
    /// # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
    /// client.mset([("a", "1"), ("b", "2")]).await?;
    /// let values = client.mget::<String>(["a", "missing", "b"]).await?;
    /// assert_eq!(values, [Some("1".into()), None, Some("2".into())]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn mget<T: FromValue>(
        &self,
        keys: impl IntoIterator<Item = impl AsRef<[u8]>>,
    ) -> Result<Vec<Option<T>>, Error> {
        let cmds: Vec<Cmd> = keys.into_iter().map(Cmd::get).collect();
        self.run(&cmds)
            .await?
            .into_iter()
            .map(|answer| answer.and_then(Option::<T>::from_value))
            .collect()
    }

    /// Stores every `(key, value)`, all sent in one write. Not atomic: each key is written
    /// on its own pair, and if one fails (its error is returned) the others may have been
    /// written.
    pub async fn mset(
        &self,
        items: impl IntoIterator<Item = (impl AsRef<[u8]>, impl ToArg)>,
    ) -> Result<(), Error> {
        let cmds: Vec<Cmd> = items.into_iter().map(|(k, v)| Cmd::set(k, v)).collect();
        for answer in self.run(&cmds).await? {
            answer?;
        }
        Ok(())
    }

    /// Every worker's counters (keys, bytes, logical and stored bytes, compression ratio,
    /// hits, misses, expirations, evictions) on one line, as the text protocol's `stats`.
    pub async fn stats(&self) -> Result<String, Error> {
        let text = Bytes::from_value(self.one(Cmd::stats()).await?)?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Checks that the server answers.
    pub async fn ping(&self) -> Result<(), Error> {
        self.one(Cmd::ping()).await.map(drop)
    }

    /// Sends a raw request and returns the raw response (any status), within the timeout.
    /// For operations this crate has no method for; the request is checked against
    /// [`ClientBuilder::max_request`] like every other.
    pub async fn call(&self, req: Request) -> Result<Response, Error> {
        self.check_size(&req)?;
        self.connection().await?.call(&req).await
    }

    /// Sends one call and reads its answer.
    pub(crate) async fn one(&self, cmd: Cmd) -> Result<Value, Error> {
        self.check_size(&cmd.req)?;
        let resp = self.connection().await?.call(&cmd.req).await?;
        read(cmd.reading, resp)
    }

    /// Sends `cmds` in one write and reads each answer, in order. Nothing is sent if one of
    /// them is too large.
    pub(crate) async fn run(&self, cmds: &[Cmd]) -> Result<Vec<Result<Value, Error>>, Error> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        for cmd in cmds {
            self.check_size(&cmd.req)?;
        }
        let replies = self
            .connection()
            .await?
            .send_many(cmds.iter().map(|c| &c.req));
        let mut answers = Vec::with_capacity(cmds.len());
        // Every request is in flight already; awaiting in order costs no extra wait.
        for (cmd, reply) in cmds.iter().zip(replies) {
            answers.push(reply.await.and_then(|resp| read(cmd.reading, resp)));
        }
        Ok(answers)
    }

    /// Refuses a request the server would refuse by closing the connection, which would fail
    /// every other call in flight on it: the client's own limit keeps one call's fate its own.
    fn check_size(&self, req: &Request) -> Result<(), Error> {
        let (size, limit) = (req.body_len(), self.inner.config.max_request);
        if size > limit {
            return Err(Error::TooLarge { size, limit });
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Connection, usize)>> {
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection, if there is one.
    fn live(&self) -> Option<Connection> {
        self.lock()
            .as_ref()
            .map(|(c, _)| c)
            .filter(|c| !c.is_closed())
            .cloned()
    }

    /// The live connection, connecting first if there is none (a lazy client's first call)
    /// or the last one died: to the address after the dead one's first, so a client fails
    /// over to the next orchestrator when its own goes away.
    pub(crate) async fn connection(&self) -> Result<Connection, Error> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let _guard = self.inner.reconnect.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let start = self
            .lock()
            .as_ref()
            .map_or(self.inner.first, |(_, i)| i + 1);
        let (conn, at) = self.open(start).await?;
        *self.lock() = Some((conn.clone(), at));
        Ok(conn)
    }

    /// Tries every address once, from `start`; the first connection made, or the last error.
    async fn open(&self, start: usize) -> Result<(Connection, usize), Error> {
        let addrs = &self.inner.addrs;
        let mut last = None;
        for i in (0..addrs.len()).map(|n| (start + n) % addrs.len()) {
            match open(&addrs[i], &self.inner.config).await {
                Ok(conn) => return Ok((conn, i)),
                // Wrong credentials are wrong at every orchestrator.
                Err(e @ Error::Auth(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(addr = %addrs[i], error = %e, "cannot connect");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(Error::ConnectionClosed))
    }
}

/// Connects to one address and authenticates, within the connect timeout.
async fn open(addr: &str, config: &ClientBuilder) -> Result<Connection, Error> {
    let connect = async {
        let conn = Connection::open(
            addr,
            config.max_frame,
            config.timeout,
            config.secret.as_ref(),
            config.tls.as_ref(),
        )
        .await?;
        if let Some((user, password)) = &config.credentials {
            let mut req = Request::new(
                Op::Auth,
                Bytes::copy_from_slice(user.as_deref().unwrap_or("").as_bytes()),
            );
            req.value = Bytes::copy_from_slice(password.as_bytes());
            let resp = conn.call(&req).await?;
            if resp.status != Status::Ok {
                return Err(Error::Auth(
                    String::from_utf8_lossy(&resp.payload).into_owned(),
                ));
            }
        }
        Ok(conn)
    };
    tokio::time::timeout(config.connect_timeout, connect)
        .await
        .map_err(|_| Error::Timeout(config.connect_timeout))?
}
