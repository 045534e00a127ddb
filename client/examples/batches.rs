//! Many keys at once: `mset`, `mget`, and a pipeline of mixed calls, each sent in one write
//! and answered in order.
//!
//! ```text
//! cargo run -p twincache-client --example batches [-- twincache://127.0.0.1:7000]
//! ```

use std::error::Error;

use twincache_client::{Client, Pipeline, Value};

pub async fn run(client: &Client) -> Result<(), Box<dyn Error>> {
    let items: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("item:{i}"), format!("value {i}")))
        .collect();
    client.mset(items.iter().map(|(k, v)| (k, v))).await?;

    let keys = ["item:1", "item:999", "item:none"];
    let values = client.mget::<String>(keys).await?;
    for (k, v) in keys.iter().zip(&values) {
        println!("{k} = {v:?}");
    }

    // Any mix of calls; the answers come back in order, typed as a tuple.
    let mut pipe = Pipeline::new();
    pipe.set("counter", 1)
        .get("counter")
        .exists("item:1")
        .del("item:1")
        .exists("item:1");
    let (_, counter, before, deleted, after): ((), Option<i64>, bool, bool, bool) =
        pipe.query(client).await?;
    println!("counter {counter:?}, existed {before}, deleted {deleted}, exists now {after}");

    // Or each call's own outcome, when one failing should not hide the others.
    let mut pipe = Pipeline::new();
    pipe.get("item:2").get("").get("item:3");
    for outcome in pipe.query_each(client).await? {
        match outcome {
            Ok(Value::Data(v)) => println!("got {}", String::from_utf8_lossy(&v)),
            Ok(other) => println!("got {other:?}"),
            Err(e) => println!("failed: {e}"),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    run(&Client::connect(&target).await?).await
}
