#!/usr/bin/env bash
# twincache-client against redis-rs through the same orchestrator: GET and SET with 1 and 16
# requests in flight per task over 50 tasks, and MGET of 100 keys (client/benches/vs_redis.rs).
#
#   bench/client.sh [-- extra flags for vs_redis, e.g. --rounds 5 --only get1,mget]
#
# Builds the release binaries and the benchmark, starts one pair of workers and an
# orchestrator on free loopback ports (all --threads 1, as README's other benchmarks), runs
# the benchmark against that orchestrator, and prints a table of medians. Stops what it
# started, and only that (bench/servers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--" ] && shift
echo "building (a few minutes the first time)..." >&2
cargo build --release --bin worker --bin orchestrator
cargo bench -p twincache-client --bench vs_redis --no-run

# shellcheck source=bench/servers.sh
. bench/servers.sh
WORKER_FLAGS="--threads 1" start_pair target/release --threads 1
cargo bench -p twincache-client --bench vs_redis -- --addr "127.0.0.1:$ORCH_PORT" "$@"
