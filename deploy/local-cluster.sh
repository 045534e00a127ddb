#!/usr/bin/env bash
# Starts a local twincache cluster: two pairs of workers and an orchestrator on loopback.
#
#   deploy/local-cluster.sh            # orchestrator on 127.0.0.1:7000, workers on 7001-7004
#   PAIRS=3 BASE_PORT=8000 deploy/local-cluster.sh
#
# Env: PAIRS (2) pairs of workers; BASE_PORT (7000) the orchestrator's port, the workers on the
# ports after it; LOG_DIR (target/cluster-logs) where each process's output goes.
# Builds the release binaries first (worker, orchestrator and twincache-bench; the first build
# takes a few minutes, and cargo shows its progress). Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-2}
BASE_PORT=${BASE_PORT:-7000}
LOG_DIR=${LOG_DIR:-target/cluster-logs}
BIN=target/release

echo "building the release binaries (a few minutes the first time)..."
cargo build --release --bin worker --bin orchestrator --bin twincache-bench
mkdir -p "$LOG_DIR"
PIDS=()
cleanup() {
  trap - INT TERM EXIT
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

WORKERS=()
for i in $(seq 1 $((PAIRS * 2))); do
  port=$((BASE_PORT + i))
  "$BIN/worker" --port "$port" >"$LOG_DIR/worker-$port.out" 2>"$LOG_DIR/worker-$port.log" &
  PIDS+=($!)
  WORKERS+=(127.0.0.1 "$port")
done
"$BIN/orchestrator" --listen "127.0.0.1:$BASE_PORT" "${WORKERS[@]}" \
  >"$LOG_DIR/orchestrator.out" 2>"$LOG_DIR/orchestrator.log" &
PIDS+=($!)

# Bounded wait for every process to announce itself.
for _ in $(seq 100); do
  ready=$(cat "$LOG_DIR"/*.out 2>/dev/null | grep -c 'listening on' || true)
  [ "$ready" -ge $((PAIRS * 2 + 1)) ] && break
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "a process failed to start; logs:"; tail -n 5 "$LOG_DIR"/*.log; exit 1; }
  done
  sleep 0.1
done
cat "$LOG_DIR"/worker-*.out "$LOG_DIR/orchestrator.out"
echo
echo "twincache is up: $PAIRS pairs behind 127.0.0.1:$BASE_PORT (logs in $LOG_DIR). Try:"
echo "  printf 'set||a||hello\\nget||a\\nexit\\n' | nc 127.0.0.1 $BASE_PORT"
echo "  target/release/twincache-bench --addr 127.0.0.1:$BASE_PORT -c 50 -P 16 --op get"
echo "Ctrl-C stops the cluster."
wait
