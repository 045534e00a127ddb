use clap::Parser;
use twincache_worker::config::Command;
use twincache_worker::seal::Cipher;
use twincache_worker::{Config, Worker};

fn main() {
    let config = Config::parse();
    if let Some(Command::Keygen) = config.command {
        println!("{}", Cipher::generate_hex());
        return;
    }
    // Check the key before anything starts: a bad key file is a usage error.
    if let Err(msg) = config.cipher() {
        twincache::fail(2, msg);
    }
    if let Err(msg) = config.adapter() {
        twincache::fail(2, msg);
    }
    if let Err(msg) = config.tls() {
        twincache::fail(2, msg);
    }
    if let Err(msg) = config
        .cluster_secret()
        .and_then(|_| config.check_exposure())
    {
        twincache::fail(2, msg);
    }
    twincache::runtime(config.threads).block_on(run(config));
}

async fn run(config: Config) {
    twincache::init_tracing(&config.log_format);
    twincache::log_runtime(config.threads);
    let addr = (config.bind, config.port);
    let worker = Worker::bind(config).await.unwrap_or_else(|e| {
        twincache::fail(
            1,
            format_args!("cannot listen on {}:{}: {e}", addr.0, addr.1),
        )
    });
    let shutdown = twincache::shutdown_on_signal();
    let reload = twincache::reload_on_signal();
    match worker.tls() {
        Some(tls) => drop(tokio::spawn(tls.reload_on(reload))),
        None => drop(reload),
    }
    // The last line on stdout: what the user feeds to the orchestrator. With --http, the
    // HTTP address comes first, so a script that waits for the listening line has both.
    if let Some(http) = worker.http_addr() {
        println!("twincache worker http on {http}");
    }
    println!("twincache worker listening on {}", worker.local_addr());
    worker.run(shutdown).await;
}
