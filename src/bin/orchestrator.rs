use twincache_orchestrator::{Config, Orchestrator};

fn main() {
    let config = Config::from_args();
    twincache::runtime(config.threads).block_on(run(config));
}

async fn run(config: Config) {
    twincache::init_tracing(&config.log_format);
    let listen = config.listen;
    let orchestrator = Orchestrator::bind(config)
        .await
        .unwrap_or_else(|e| twincache::fail(1, format_args!("cannot listen on {listen}: {e}")));
    let shutdown = twincache::shutdown_on_signal();
    // Before the listening line, which scripts wait for: once it is out, both are.
    if let Some(http) = orchestrator.http_addr() {
        println!("twincache orchestrator http on {http}");
    }
    println!(
        "twincache orchestrator listening on {}",
        orchestrator.local_addr()
    );
    orchestrator.run(shutdown).await;
}
