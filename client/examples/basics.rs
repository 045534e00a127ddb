//! The calls a cache needs: set and get (typed), expiry, conditional writes, delete.
//!
//! Start a cluster first (`deploy/local-cluster.sh` from the repository's root), then:
//!
//! ```text
//! cargo run -p twincache-client --example basics [-- twincache://127.0.0.1:7000]
//! ```

use std::error::Error;
use std::time::Duration;

use twincache_client::{Bytes, Client, SetOptions};

pub async fn run(client: &Client) -> Result<(), Box<dyn Error>> {
    // Values: text, bytes, numbers; borrowed or owned.
    let name = String::from("Ada Lovelace");
    client.set("user:1:name", &name).await?;
    client
        .set("user:1:avatar", &b"\x89PNG\r\n\x1a\n"[..])
        .await?;
    client.set("user:1:visits", 41).await?;

    // Answers: read as the type you want; `None` when the key is missing.
    let got: Option<String> = client.get("user:1:name").await?;
    println!("name: {got:?}");
    let avatar = client.get::<Bytes>("user:1:avatar").await?;
    println!("avatar: {} bytes", avatar.map_or(0, |a| a.len()));
    let visits = client.get::<u64>("user:1:visits").await?.unwrap_or(0);
    client.set("user:1:visits", visits + 1).await?;
    println!("visits: {:?}", client.get::<u64>("user:1:visits").await?);

    // Expiry, and conditional writes.
    client
        .set_with_ttl("session:abc", "user:1", Duration::from_secs(60))
        .await?;
    let first = client.set_nx("lock:report", "worker-7").await?;
    let second = client.set_nx("lock:report", "worker-8").await?;
    println!("lock taken by the first: {first}, by the second: {second}");
    let previous: Option<String> = client
        .set_options("lock:report", "worker-8", SetOptions::new().xx().get())
        .await?;
    println!("lock handed over from {previous:?}");

    println!("exists: {}", client.exists("session:abc").await?);
    println!("deleted: {}", client.del("session:abc").await?);
    println!("exists: {}", client.exists("session:abc").await?);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    run(&Client::connect(&target).await?).await
}
