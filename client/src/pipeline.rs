//! Many calls sent in one write, answered in order.

use std::time::Duration;

use crate::cmd::Cmd;
use crate::command::Command;
use crate::options::SetOptions;
use crate::value::{FromValue, ToArg, Value};
use crate::{Client, Error};

/// Calls queued to be sent together: all of them leave in one write on the client's
/// connection, and their answers come back in the order they were queued. The orchestrator
/// runs the calls of one connection in order, so a `get` sees an earlier `set` of the same
/// pipeline. It is not a transaction: other clients' calls may run in between, and each call
/// succeeds or fails on its own.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let cluster = twincache_orchestrator::local::LocalCluster::start(2).await?;
/// # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
/// use twincache_client::{Pipeline, SetOptions};
///
/// let mut pipe = Pipeline::new();
/// pipe.set("a", "1").set_options("a", "2", SetOptions::new().nx()).get("a").del("a").exists("a");
/// let (_, applied, a, deleted, exists): ((), bool, Option<String>, bool, bool) =
///     pipe.query(&client).await?;
/// assert_eq!((applied, a.as_deref(), deleted, exists), (false, Some("1"), true, false));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    cmds: Vec<Cmd>,
    /// The first call refused while queueing (a zero TTL, NX with XX): reported when the
    /// pipeline runs, before anything is sent, so the builder methods can chain.
    refused: Option<String>,
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Calls queued.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// Whether no call is queued.
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// Forgets every queued call, to reuse the pipeline.
    pub fn clear(&mut self) {
        self.cmds.clear();
        self.refused = None;
    }

    fn push(&mut self, cmd: Result<Cmd, Error>) -> &mut Pipeline {
        match cmd {
            Ok(cmd) => self.cmds.push(cmd),
            Err(e) => {
                let why = match e {
                    Error::InvalidArgument(why) => why,
                    other => other.to_string(),
                };
                self.refused.get_or_insert(why);
            }
        }
        self
    }

    /// Queues a `get`: answers the value, or nil.
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> &mut Pipeline {
        self.push(Ok(Cmd::get(key)))
    }

    /// Queues a `set`: answers `OK`.
    pub fn set(&mut self, key: impl AsRef<[u8]>, value: impl ToArg) -> &mut Pipeline {
        self.push(Ok(Cmd::set(key, value)))
    }

    /// Queues a `set` with a time to live (a zero one makes the whole pipeline fail with
    /// [`Error::InvalidArgument`] before anything is sent).
    pub fn set_with_ttl(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl ToArg,
        ttl: Duration,
    ) -> &mut Pipeline {
        self.push(Cmd::set_with_ttl(key, value, ttl))
    }

    /// Queues a `set` with options: answers as [`Client::set_options`] does.
    pub fn set_options(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl ToArg,
        opts: SetOptions,
    ) -> &mut Pipeline {
        self.push(Cmd::set_options(key, value, opts))
    }

    /// Queues a `del`: answers 1 if the key existed, else 0.
    pub fn del(&mut self, key: impl AsRef<[u8]>) -> &mut Pipeline {
        self.push(Ok(Cmd::del(key)))
    }

    /// Queues an `exists`: answers 1 if the key exists, else 0.
    pub fn exists(&mut self, key: impl AsRef<[u8]>) -> &mut Pipeline {
        self.push(Ok(Cmd::exists(key)))
    }

    /// Queues a Redis command built with [`cmd`](crate::cmd): answers its reply, an error
    /// reply as that call's [`Error::Server`].
    pub fn add_command(&mut self, cmd: &Command) -> &mut Pipeline {
        self.push(cmd.to_cmd())
    }

    /// Queues a Redis command given as its name and arguments, as
    /// [`Client::command`]: `pipe.command(["INCR", "hits"])`.
    pub fn command(&mut self, args: impl IntoIterator<Item = impl ToArg>) -> &mut Pipeline {
        self.push(args.into_iter().collect::<Command>().to_cmd())
    }

    /// Queues a `ping`: answers `PONG`.
    pub fn ping(&mut self) -> &mut Pipeline {
        self.push(Ok(Cmd::ping()))
    }

    /// Sends every queued call in one write and reads their answers, in order, as `T`: a
    /// tuple with one element per call, or `Vec<Value>`. The first call that failed fails
    /// the whole (the others still ran); [`Pipeline::query_each`] gives each call's outcome.
    pub async fn query<T: FromValue>(&self, client: &Client) -> Result<T, Error> {
        let answers = self
            .query_each(client)
            .await?
            .into_iter()
            .collect::<Result<Vec<Value>, Error>>()?;
        T::from_value(Value::Array(answers))
    }

    /// Sends every queued call in one write and returns each one's outcome, in order: one
    /// call failing (its key's pair unreachable, say) does not hide the others' answers. The
    /// outer error is for the pipeline as a whole: nothing could be sent.
    pub async fn query_each(&self, client: &Client) -> Result<Vec<Result<Value, Error>>, Error> {
        if let Some(why) = &self.refused {
            return Err(Error::InvalidArgument(why.clone()));
        }
        client.run(&self.cmds).await
    }
}
