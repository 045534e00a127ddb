//! One client shared by many tasks: clones share the connection, and the requests of every
//! task are in flight together on it.
//!
//! ```text
//! cargo run -p twincache-client --example many_tasks [-- twincache://127.0.0.1:7000]
//! ```

use std::error::Error;
use std::time::Instant;

use twincache_client::Client;

pub async fn run(client: &Client) -> Result<(), Box<dyn Error>> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|t| {
            let client = client.clone(); // an Arc bump, not a new connection
            tokio::spawn(async move {
                for i in 0..100 {
                    let key = format!("task:{t}:{i}");
                    client.set(&key, i).await?;
                    assert_eq!(client.get::<i32>(&key).await?, Some(i));
                }
                Ok::<_, twincache_client::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    println!("20,000 calls from 100 tasks in {:.1?}", started.elapsed());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    run(&Client::connect(&target).await?).await
}
