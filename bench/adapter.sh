#!/usr/bin/env bash
# Adapter-mode GET throughput through the orchestrator, by path, next to the destination Redis
# directly, in one run on loopback:
#
#   cargo build --release && bench/adapter.sh
#
# Each path gets a fresh tier: a source and a destination redis-server, one pair of workers
# in adapter mode (--delete-from-source) and an orchestrator, all --threads 1. redis-benchmark
# then runs GET (50 clients, -P 1) over R keys written beforehand by redis-benchmark SET:
#   destination direct : the destination Redis itself
#   destination hit    : keys only in the destination, first reads (repeats, ~N/R, are hits)
#   cache hit          : a small key set read before, so every read is a cache hit
#   source copy        : keys only in the source: first reads copy them to the destination
# Env: N (requests per run, 100000), R (key space, 500000). Needs redis-server, redis-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}; R=${R:-500000}
B=target/release
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened"; exit 1; }
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap stop EXIT
start_tier() {
  SP=$(free_port); DP=$(free_port); W1=$(free_port); W2=$(free_port); OP=$(free_port)
  for p in $SP $DP; do redis-server --port $p --bind 127.0.0.1 --save "" --appendonly no >/dev/null & PIDS+=($!); wait_port $p; done
  local a=(--threads 1 --source redis://127.0.0.1:$SP --destination redis://127.0.0.1:$DP --delete-from-source)
  for p in $W1 $W2; do $B/worker --port $p "${a[@]}" >/dev/null 2>&1 & PIDS+=($!); wait_port $p; done
  $B/orchestrator --threads 1 --listen 127.0.0.1:$OP 127.0.0.1 $W1 127.0.0.1 $W2 >/dev/null 2>&1 & PIDS+=($!); wait_port $OP
  sleep 1 # the orchestrator learns adapter mode from its first health checks
}
get() { redis-benchmark -p "$1" -t get -n "$2" -c 50 -P 1 -r "$3" --csv 2>/dev/null | awk -F'"' '$2=="GET"{print $4}'; }
fill() { redis-benchmark -p "$1" -t set -n $((4 * $2)) -c 50 -P 16 -d 100 -r "$2" -q >/dev/null 2>&1; }

start_tier
fill $DP $R
direct=$(get $DP $N $R)
dest_hit=$(get $OP $N $R)
get $OP $N 1000 >/dev/null            # read a small key set once: cached from now on
cache_hit=$(get $OP $N 1000)
stop

start_tier
fill $SP $R
source_copy=$(get $OP $N $R)
copied=$(redis-cli -p $DP dbsize)
stop

python3 - "$direct" "$dest_hit" "$cache_hit" "$source_copy" "$copied" "$N" <<'PY'
import sys
direct, dest, cache, source = (float(x) for x in sys.argv[1:5])
copied, n = int(sys.argv[5]), int(sys.argv[6])
print(f"{'path':<22}{'GET ops/s':>12}{'of direct':>11}")
for name, v in [("destination direct", direct), ("cache hit", cache), ("destination hit", dest), ("source copy", source)]:
    print(f"{name:<22}{v:>12,.0f}{v / direct:>11.2f}")
print(f"({copied} keys copied to the destination by {n} source-path reads)")
PY
