//! Redis commands through the orchestrator's command op: the generic call, the typed methods
//! on it (counters, expiry, strings, hashes), their errors as Redis words them, and pipelines
//! mixing them with the binary calls.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use twincache_client::{cmd, Client, Error, Pipeline, Status, Ttl, Value};
use twincache_orchestrator::local::LocalCluster;
use twincache_orchestrator::{Config, Orchestrator};

async fn cluster(pairs: usize) -> (LocalCluster, Client) {
    let cluster = LocalCluster::start(pairs).await.expect("local cluster");
    let client = Client::connect(&cluster.addr().to_string())
        .await
        .expect("connect");
    (cluster, client)
}

/// The Redis error text of a failed call, with its status.
fn server_error<T: std::fmt::Debug>(r: Result<T, Error>) -> (Status, String) {
    match r {
        Err(Error::Server { status, message }) => (status, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";

#[tokio::test]
async fn generic_command_calls() {
    let (_cluster, client) = cluster(2).await;
    assert_eq!(client.command::<i64>(["INCR", "n"]).await.unwrap(), 1);
    assert_eq!(
        cmd("INCRBY")
            .arg("n")
            .arg(41)
            .query::<i64>(&client)
            .await
            .unwrap(),
        42
    );
    assert_eq!(
        client.command::<Value>(["SET", "s", "v"]).await.unwrap(),
        Value::Okay
    );
    assert_eq!(
        client.command::<Value>(["GET", "s"]).await.unwrap(),
        Value::Data("v".into())
    );
    assert_eq!(
        client.command::<Value>(["GET", "missing"]).await.unwrap(),
        Value::Nil
    );
    assert_eq!(
        client.command::<Value>(["PING"]).await.unwrap(),
        Value::Status("PONG".into())
    );
    // Binary-safe arguments: the command is RESP bulk strings, not a line of text.
    cmd("SET")
        .arg(&b"k\r\n\0"[..])
        .arg(&b"\xff\r\n"[..])
        .query::<()>(&client)
        .await
        .unwrap();
    assert_eq!(
        client.get::<Vec<u8>>(b"k\r\n\0").await.unwrap().as_deref(),
        Some(&b"\xff\r\n"[..])
    );

    // RESP3 shapes when asked for.
    client.hset("h", "f", "v").await.unwrap();
    let map: Value = cmd("HGETALL")
        .arg("h")
        .resp3()
        .query(&client)
        .await
        .unwrap();
    assert_eq!(
        map,
        Value::Map(vec![(Value::Data("f".into()), Value::Data("v".into()))])
    );
    let flat: Value = cmd("HGETALL").arg("h").query(&client).await.unwrap();
    assert_eq!(
        flat,
        Value::Array(vec![Value::Data("f".into()), Value::Data("v".into())])
    );

    // Errors: Redis' text, unknown commands, and an empty command refused before sending.
    let (status, text) = server_error(client.command::<Value>(["NOSUCHCOMMAND", "x"]).await);
    assert_eq!(status, Status::InvalidCommand);
    assert!(text.starts_with("ERR unknown command"), "{text}");
    let (_, text) = server_error(client.command::<Value>(["GET"]).await);
    assert!(text.starts_with("ERR wrong number of arguments"), "{text}");
    let empty = client.command::<Value>(Vec::<&str>::new()).await;
    assert!(matches!(empty, Err(Error::InvalidArgument(_))), "{empty:?}");
    let multi = server_error(client.command::<Value>(["MULTI"]).await).1;
    assert!(multi.contains("needs a RESP connection"), "{multi}");
}

#[tokio::test]
async fn counters() {
    let (_cluster, client) = cluster(1).await;
    assert_eq!(client.incr("c").await.unwrap(), 1);
    assert_eq!(client.incr_by("c", 10).await.unwrap(), 11);
    assert_eq!(client.decr("c").await.unwrap(), 10);
    assert_eq!(client.decr_by("c", 15).await.unwrap(), -5);
    assert_eq!(client.incr_by("c", -5).await.unwrap(), -10);
    // A counter is a stored value like any other.
    assert_eq!(client.get::<i64>("c").await.unwrap(), Some(-10));
    client.set("c2", 41).await.unwrap();
    assert_eq!(client.incr("c2").await.unwrap(), 42);

    assert_eq!(client.incr_by_float("f", 1.5).await.unwrap(), 1.5);
    assert_eq!(client.incr_by_float("f", -0.25).await.unwrap(), 1.25);
    assert_eq!(
        client.get::<String>("f").await.unwrap().as_deref(),
        Some("1.25")
    );

    // Not an integer: Redis' own text, not retryable.
    client.set("word", "hello").await.unwrap();
    let err = client.incr("word").await.unwrap_err();
    assert!(!err.is_retryable());
    assert_eq!(err.code(), Some("ERR"));
    assert_eq!(server_error::<i64>(Err(err)).1, NOT_INTEGER);
    let (_, text) = server_error(client.incr_by_float("word", 1.0).await);
    assert_eq!(text, "ERR value is not a valid float");
    client.set("max", i64::MAX).await.unwrap();
    let (_, text) = server_error(client.incr("max").await);
    assert_eq!(text, "ERR increment or decrement would overflow");
    assert_eq!(
        client.get::<String>("word").await.unwrap().as_deref(),
        Some("hello")
    );
}

#[tokio::test]
async fn wrong_type() {
    let (_cluster, client) = cluster(1).await;
    client.set("s", "v").await.unwrap();
    client.hset("h", "f", "1").await.unwrap();
    let err = client.hget::<String>("s", "f").await.unwrap_err();
    assert_eq!(err.code(), Some("WRONGTYPE"));
    assert!(!err.is_retryable());
    assert_eq!(
        server_error::<()>(Err(err)),
        (Status::WrongType, WRONGTYPE.into())
    );
    for err in [
        client.incr("h").await.unwrap_err(),
        client.append("h", "x").await.map(drop).unwrap_err(),
        client.hset("s", "f", "v").await.map(drop).unwrap_err(),
        client
            .hgetall::<Vec<(String, String)>>("s")
            .await
            .map(drop)
            .unwrap_err(),
        client.hlen("s").await.map(drop).unwrap_err(),
        client.get::<String>("h").await.map(drop).unwrap_err(),
    ] {
        assert_eq!(
            err.to_string(),
            format!("server answered WrongType: {WRONGTYPE}")
        );
    }
}

#[tokio::test]
async fn expiry_and_ttl() {
    let (_cluster, client) = cluster(1).await;
    assert_eq!(client.ttl("nobody").await.unwrap(), Ttl::NoKey);
    assert_eq!(client.ttl("nobody").await.unwrap().remaining(), None);
    assert!(!client
        .expire("nobody", Duration::from_secs(5))
        .await
        .unwrap());
    assert!(!client.persist("nobody").await.unwrap());

    client.set("k", "v").await.unwrap();
    assert_eq!(client.ttl("k").await.unwrap(), Ttl::NoExpiry);
    assert!(!client.persist("k").await.unwrap()); // nothing to remove
    assert!(client.expire("k", Duration::from_secs(100)).await.unwrap());
    let left = client.ttl("k").await.unwrap().remaining().unwrap();
    assert!(
        left <= Duration::from_secs(100) && left > Duration::from_secs(90),
        "{left:?}"
    );
    assert!(client.persist("k").await.unwrap());
    assert_eq!(client.ttl("k").await.unwrap(), Ttl::NoExpiry);

    // Zero is refused before sending, as for set_with_ttl.
    let zero = client.expire("k", Duration::ZERO).await;
    assert!(matches!(zero, Err(Error::InvalidArgument(_))), "{zero:?}");

    // Expiry takes effect.
    assert!(client.expire("k", Duration::from_millis(50)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(client.get::<String>("k").await.unwrap(), None);
    assert_eq!(client.ttl("k").await.unwrap(), Ttl::NoKey);

    // At an instant: in the future it is a TTL, in the past it deletes.
    client.set("at", "v").await.unwrap();
    let at = SystemTime::now() + Duration::from_secs(60);
    assert!(client.expire_at("at", at).await.unwrap());
    let left = client.ttl("at").await.unwrap().remaining().unwrap();
    assert!(left > Duration::from_secs(50), "{left:?}");
    assert!(client
        .expire_at("at", SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        .await
        .unwrap());
    assert!(!client.exists("at").await.unwrap());
    let early = client
        .expire_at("at", SystemTime::UNIX_EPOCH - Duration::from_secs(1))
        .await;
    assert!(matches!(early, Err(Error::InvalidArgument(_))), "{early:?}");

    // A TTL set by set_with_ttl reads back through ttl, and getex sets one.
    client
        .set_with_ttl("t", "v", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(client.ttl("t").await.unwrap().remaining().unwrap() > Duration::from_secs(25));
    client.set("g", "v").await.unwrap();
    let v: Option<String> = client.getex("g", Duration::from_secs(10)).await.unwrap();
    assert_eq!(v.as_deref(), Some("v"));
    let left = client.ttl("g").await.unwrap().remaining().unwrap();
    assert!(
        left <= Duration::from_secs(10) && left > Duration::from_secs(5),
        "{left:?}"
    );
    assert_eq!(
        client
            .getex::<String>("nobody", Duration::from_secs(1))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn strings() {
    let (_cluster, client) = cluster(1).await;
    assert_eq!(client.append("s", "hello").await.unwrap(), 5);
    assert_eq!(client.append("s", &b" world"[..]).await.unwrap(), 11);
    assert_eq!(client.strlen("s").await.unwrap(), 11);
    assert_eq!(client.strlen("nobody").await.unwrap(), 0);
    assert_eq!(
        client.getdel::<String>("s").await.unwrap().as_deref(),
        Some("hello world")
    );
    assert_eq!(client.getdel::<String>("s").await.unwrap(), None);
    assert!(!client.exists("s").await.unwrap());
}

#[tokio::test]
async fn hashes() {
    let (_cluster, client) = cluster(2).await;
    assert!(client.hset("user:1", "name", "ada").await.unwrap());
    assert!(!client.hset("user:1", "name", "Ada").await.unwrap()); // replaced, not new
    assert_eq!(
        client
            .hset_multiple("user:1", [("born", "1815"), ("name", "Ada Lovelace")])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        client
            .hget::<String>("user:1", "name")
            .await
            .unwrap()
            .as_deref(),
        Some("Ada Lovelace")
    );
    assert_eq!(
        client.hget::<u32>("user:1", "born").await.unwrap(),
        Some(1815)
    );
    assert_eq!(
        client.hget::<String>("user:1", "missing").await.unwrap(),
        None
    );
    assert_eq!(client.hget::<String>("nobody", "name").await.unwrap(), None);
    assert_eq!(
        client
            .hmget::<String>("user:1", ["name", "missing", "born"])
            .await
            .unwrap(),
        [Some("Ada Lovelace".into()), None, Some("1815".into())]
    );

    let all: HashMap<String, String> = client.hgetall("user:1").await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["born"], "1815");
    let sorted: BTreeMap<String, String> = client.hgetall("user:1").await.unwrap();
    assert_eq!(sorted.keys().collect::<Vec<_>>(), ["born", "name"]);
    let pairs: Vec<(String, Vec<u8>)> = client.hgetall("user:1").await.unwrap();
    assert_eq!(pairs.len(), 2);
    let none: HashMap<String, String> = client.hgetall("nobody").await.unwrap();
    assert!(none.is_empty());

    assert!(client.hexists("user:1", "born").await.unwrap());
    assert!(!client.hexists("user:1", "missing").await.unwrap());
    assert_eq!(client.hlen("user:1").await.unwrap(), 2);
    assert_eq!(client.hlen("nobody").await.unwrap(), 0);
    let mut keys: Vec<String> = client.hkeys("user:1").await.unwrap();
    keys.sort();
    assert_eq!(keys, ["born", "name"]);
    let mut vals: Vec<String> = client.hvals("user:1").await.unwrap();
    vals.sort();
    assert_eq!(vals, ["1815", "Ada Lovelace"]);

    assert_eq!(client.hincr_by("user:1", "visits", 3).await.unwrap(), 3);
    assert_eq!(client.hincr_by("user:1", "visits", -1).await.unwrap(), 2);
    let (_, text) = server_error(client.hincr_by("user:1", "name", 1).await);
    assert_eq!(text, "ERR hash value is not an integer");

    assert_eq!(
        client.hdel("user:1", ["visits", "missing"]).await.unwrap(),
        1
    );
    assert_eq!(client.hdel("user:1", ["name", "born"]).await.unwrap(), 2);
    // The last field gone, the key is gone, as in Redis.
    assert!(!client.exists("user:1").await.unwrap());
    assert_eq!(
        client.hkeys::<String>("user:1").await.unwrap(),
        Vec::<String>::new()
    );

    // Binary fields and values.
    client.hset(b"h\0", b"f\r\n", &b"\xff"[..]).await.unwrap();
    assert_eq!(
        client.hget::<Vec<u8>>(b"h\0", b"f\r\n").await.unwrap(),
        Some(vec![0xff])
    );
}

#[tokio::test]
async fn pipeline_mixes_binary_calls_and_commands() {
    let (_cluster, client) = cluster(2).await;
    let mut hset = cmd("HSET");
    hset.arg("p:h").arg("f").arg("v");
    let mut pipe = Pipeline::new();
    pipe.set("p:n", 41)
        .get("p:n")
        .add_command(cmd("INCR").arg("p:n"))
        .add_command(&hset)
        .command(["HGET", "p:h", "f"])
        .get("p:n");
    let (_, before, n, new, f, after): ((), i64, i64, bool, String, i64) =
        pipe.query(&client).await.unwrap();
    assert_eq!((before, n, new, f.as_str(), after), (41, 42, true, "v", 42));

    // One failing command fails its own entry; the others keep their answers.
    let mut pipe = Pipeline::new();
    pipe.set("p:s", "text")
        .command(["INCR", "p:s"])
        .command(["HLEN", "p:s"])
        .add_command(cmd("INCR").arg("p:n"));
    let answers = pipe.query_each(&client).await.unwrap();
    assert_eq!(answers.len(), 4);
    assert_eq!(answers[0].as_ref().unwrap(), &Value::Okay);
    assert_eq!(
        answers[1].as_ref().unwrap_err().to_string(),
        format!("server answered WrongType: {NOT_INTEGER}")
    );
    assert_eq!(answers[2].as_ref().unwrap_err().code(), Some("WRONGTYPE"));
    assert_eq!(answers[3].as_ref().unwrap(), &Value::Int(43));
    // query fails with the first error.
    let err = pipe.query::<Vec<Value>>(&client).await.unwrap_err();
    assert_eq!(err.code(), Some("ERR"));

    let mut pipe = Pipeline::new();
    pipe.command(Vec::<&str>::new());
    let empty = pipe.query::<Vec<Value>>(&client).await;
    assert!(matches!(empty, Err(Error::InvalidArgument(_))), "{empty:?}");
}

#[tokio::test]
async fn tryagain_is_retryable() {
    // An orchestrator whose workers are all down answers a command -TRYAGAIN, which reads as
    // Status::Unavailable: retryable, like the binary ops' answer.
    let dead: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        })
        .collect();
    let orchestrator = Orchestrator::bind(Config::for_workers(&dead))
        .await
        .unwrap();
    let addr = orchestrator.local_addr().to_string();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(orchestrator.run(shutdown.clone()));
    let client = Client::connect(&addr).await.unwrap();
    let err = client.incr("k").await.unwrap_err();
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.code(), Some("TRYAGAIN"));
    shutdown.cancel();
}
