//! Cache-aside: read through the cache, fall back to the source of truth on a miss, and keep
//! serving (from the source) when the cache cannot answer. Errors that a retry may fix are
//! told apart from those it will not.
//!
//! ```text
//! cargo run -p twincache-client --example cache_aside [-- twincache://127.0.0.1:7000]
//! ```

use std::error::Error;
use std::time::Duration;

use twincache_client::Client;

/// The slow source of truth (a database, say).
async fn load_profile(id: u32) -> String {
    tokio::time::sleep(Duration::from_millis(20)).await;
    format!("{{\"id\":{id},\"name\":\"user {id}\"}}")
}

/// The profile from the cache, or from the source (then cached for five minutes).
async fn profile(client: &Client, id: u32) -> Result<String, Box<dyn Error>> {
    let key = format!("profile:{id}");
    match client.get::<String>(&key).await {
        Ok(Some(hit)) => return Ok(hit),
        Ok(None) => {}
        // The cluster is starting, a pair is down, the link dropped: serve from the source.
        Err(e) if e.is_retryable() => eprintln!("cache unavailable ({e}); reading the source"),
        Err(e) => return Err(e.into()),
    }
    let fresh = load_profile(id).await;
    if let Err(e) = client
        .set_with_ttl(&key, &fresh, Duration::from_secs(300))
        .await
    {
        eprintln!("could not cache {key}: {e}");
    }
    Ok(fresh)
}

pub async fn run(client: &Client) -> Result<(), Box<dyn Error>> {
    client.del("profile:7").await?;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let p = profile(client, 7).await?;
        println!("{p} in {:.1?}", started.elapsed());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    // A lazy client: the application starts even if the cluster is not up yet.
    let client = Client::builder()
        .timeout(Duration::from_millis(500))
        .build(&target)?;
    run(&client).await
}
