//! Configuration by builder and by URL: timeouts, limits, credentials, several orchestrators.
//!
//! ```text
//! cargo run -p twincache-client --example configure -- 127.0.0.1:7000
//! cargo run -p twincache-client --example configure -- 'twincache://:secret@10.0.0.1:7000,10.0.0.2:7000?timeout=2s'
//! ```

use std::error::Error;
use std::time::Duration;

use twincache_client::Client;

pub async fn run(client: &Client) -> Result<(), Box<dyn Error>> {
    client.ping().await?;
    println!("connected: {client:?}"); // the password is never shown
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    // What a URL says wins over the builder; passwords can come from the environment.
    let mut builder = Client::builder()
        .timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500));
    if let Ok(password) = std::env::var("TWINCACHE_PASSWORD") {
        builder = builder.password(password);
    }
    // Connects on the first call, to one of the addresses at random, and fails over to the
    // others when its connection dies.
    let client = builder.build(&target)?;
    run(&client).await
}
