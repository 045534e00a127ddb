use twincache_orchestrator::{Config, Orchestrator};

fn main() {
    let config = Config::from_args();
    if config.hash_password {
        let mut password = String::new();
        if std::io::stdin().read_line(&mut password).is_err() || password.trim_end().is_empty() {
            twincache::fail(2, "--hash-password reads the password on standard input");
        }
        let hash = twincache_orchestrator::auth::hash_password(password.trim_end().as_bytes())
            .unwrap_or_else(|e| twincache::fail(1, e));
        println!("{hash}");
        return;
    }
    twincache::runtime(config.threads).block_on(run(config));
}

async fn run(config: Config) {
    twincache::init_tracing(&config.log_format);
    twincache::log_runtime(config.threads);
    let listen = config.listen;
    let mut orchestrator = match Orchestrator::bind(config).await {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => twincache::fail(2, e),
        Err(e) => twincache::fail(1, format_args!("cannot listen on {listen}: {e}")),
    };
    let shutdown = twincache::shutdown_on_signal();
    let reload = twincache::reload_on_signal();
    orchestrator.reload_on(reload.clone());
    match orchestrator.tls() {
        Some(tls) => drop(tokio::spawn(tls.reload_on(reload))),
        None => drop(reload),
    }
    // A worker listed twice, or an orchestrator listed as a worker, is an error at start;
    // checked while serving, so that an orchestrator given its own address answers as one.
    let check = orchestrator.check_workers(std::time::Duration::from_secs(1));
    let (http, addr) = (orchestrator.http_addr(), orchestrator.local_addr());
    let serving = tokio::spawn(orchestrator.run(shutdown));
    if let Err(msg) = check.await {
        twincache::fail(2, msg);
    }
    // Before the listening line, which scripts wait for: once it is out, both are.
    if let Some(http) = http {
        println!("twincache orchestrator http on {http}");
    }
    println!("twincache orchestrator listening on {addr}");
    let _ = serving.await;
}
