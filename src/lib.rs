//! Shared start-up code for the `worker`, `orchestrator` and `twincache-bench` binaries:
//! logging and signal handling. The servers themselves live in the library crates.

use tokio_util::sync::CancellationToken;

/// Logs to stderr at the level given by `RUST_LOG` (default `info`), so stdout carries only
/// the startup line scripts read.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A token cancelled on the first SIGINT or SIGTERM; a second signal exits at once.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down (signal again to exit at once)");
        t.cancel();
        wait_for_signal().await;
        std::process::exit(130);
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Prints `error: <msg>` and exits with `code`; for start-up failures, which deserve a
/// clear line rather than a panic backtrace.
pub fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(code)
}
