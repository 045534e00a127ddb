#!/usr/bin/env bash
# What placement by slot map costs on the request path: GET and SET through one pair (default
# flags) of this build and of BASE (a directory holding another build's `worker` and
# `orchestrator`, e.g. the jump-hash commit 58b63de built apart), alternating, ROUNDS times,
# twincache-bench -c 50 -P $PIPELINE (default 16) -d 100. Prints each run's ops/s and p99.
# Used for any change on the request path, not only placement.
#
#   mkdir -p /tmp/base && git archive 58b63de | tar -x -C /tmp/base && (cd /tmp/base && cargo build --release)
#   cargo build --release && BASE=/tmp/base/target/release bench/placement.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NEW=target/release; OLD=${BASE:?give BASE=<the directory of another build>}
ROUNDS=${ROUNDS:-3}
PIPELINE=${PIPELINE:-16}
BENCH=$NEW/twincache-bench
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; exit 1; }
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null || true; done' EXIT
# Starts a pair and its orchestrator from the binaries in $1; sets PORT. (Not in a subshell:
# the processes must be in PIDS to be stopped.)
start() {
  local B=$1 a b o
  a=$(free_port); $B/worker --port $a >/dev/null 2>&1 & PIDS+=($!); wait_port $a
  b=$(free_port); $B/worker --port $b >/dev/null 2>&1 & PIDS+=($!); wait_port $b
  o=$(free_port); $B/orchestrator --listen 127.0.0.1:$o 127.0.0.1:$a 127.0.0.1:$b >/dev/null 2>&1 & PIDS+=($!); wait_port $o
  PORT=$o
}
start $OLD; PO=$PORT; start $NEW; PN=$PORT; sleep 1
$BENCH --addr 127.0.0.1:$PO --op set -r 100000 -n 100000 -c 50 -P 16 >/dev/null
$BENCH --addr 127.0.0.1:$PN --op set -r 100000 -n 100000 -c 50 -P 16 >/dev/null
for round in $(seq $ROUNDS); do
  for op in get set; do
    for t in old new; do
      p=$PO; [ $t = new ] && p=$PN
      r=$($BENCH --addr 127.0.0.1:$p --op $op --no-load -r 100000 -n 300000 -c 50 -P $PIPELINE -d 100 | tr '\n' ' ')
      echo "round $round $op $t $(echo "$r" | grep -o 'throughput: [0-9]* ops/s') $(echo "$r" | grep -o 'p99 [0-9.]* ms')"
    done
  done
done
