#!/usr/bin/env bash
# twincache-client against redis-rs through the same orchestrator: GET and SET with 1 and 16
# requests in flight per task over 50 tasks, and MGET of 100 keys (client/benches/vs_redis.rs).
#
#   bench/client.sh [-- extra flags for vs_redis, e.g. --rounds 5 --only get1,mget]
#
# Builds the release binaries and the benchmark, starts one pair of workers and an
# orchestrator on free loopback ports (all --threads 1, as README's other benchmarks), runs
# the benchmark against that orchestrator, and prints a table of medians. Stops what it
# started, and only that. Env: LOG_DIR (a temporary folder) for the servers' logs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--" ] && shift
echo "building (a few minutes the first time)..." >&2
cargo build --release --bin worker --bin orchestrator
cargo bench -p twincache-client --bench vs_redis --no-run

LOG_DIR=${LOG_DIR:-$(mktemp -d)}
STARTED=()
finish() {
  for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap finish EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
await_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1 after 10 s; logs in $LOG_DIR" >&2
  exit 1
}

W1=$(free_port); W2=$(free_port); OP=$(free_port)
for port in "$W1" "$W2"; do
  target/release/worker --threads 1 --port "$port" >"$LOG_DIR/worker-$port.log" 2>&1 &
  STARTED+=($!)
  await_port "$port"
done
target/release/orchestrator --threads 1 --listen "127.0.0.1:$OP" "127.0.0.1:$W1" "127.0.0.1:$W2" \
  >"$LOG_DIR/orchestrator.log" 2>&1 &
STARTED+=($!)
await_port "$OP"
cargo bench -p twincache-client --bench vs_redis -- --addr "127.0.0.1:$OP" "$@"
