#!/usr/bin/env bash
# Slot moves under load: 2 pairs -> 3 -> 2 (the middle pair removed) with KEYS keys of VALUE
# incompressible bytes while twincache-bench runs mixed reads and writes (90% GET) on them.
# Prints, for each change, the time it took and the keys and MB moved (from the
# orchestrator's log), the workers' key counts after it (the old pairs dropped what moved),
# and the clients' errors and latency before, during and between the moves.
#
#   cargo build --release && bench/membership.sh
#
# Env: KEYS (200000), VALUE (1000), CLIENTS (20), RATE (--move-rate-limit, 32MiB; 0: none),
#      BATCH (--move-batch-slots, 256), LOGS (a directory to keep the orchestrator's,
#      workers' and bench's logs and the latency log in; default: not kept).
# Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-200000}; VALUE=${VALUE:-1000}; CLIENTS=${CLIENTS:-20}
RATE=${RATE:-32MiB}; BATCH=${BATCH:-256}
B=target/release
for t in redis-cli python3; do
  command -v $t >/dev/null || { echo "missing $t (apt-get install -y redis-tools python3)"; exit 2; }
done
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened"; exit 1; }
now_ms() { python3 -c 'import time;print(int(time.time()*1000))'; }
PIDS=()
OUT=$(mktemp -d)
BENCH=
stop() {
  # A run that failed midway still shows what the clients saw.
  if [ -n "$BENCH" ] && kill -INT "$BENCH" 2>/dev/null; then
    wait "$BENCH" 2>/dev/null || true
    echo "bench, stopped early:"; cat "$OUT/bench.out"
  fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS" && cp "$OUT"/* "$LOGS"/ && echo "logs kept in $LOGS"; fi
  rm -rf "$OUT"
}
trap stop EXIT

W=()
for i in 0 1 2 3 4 5; do
  p=$(free_port); W+=("127.0.0.1:$p")
  $B/worker --port "$p" >"$OUT/w$i.log" 2>&1 & PIDS+=($!)
  wait_port "$p"
done
pairs() { for i in "$@"; do echo "${W[$((2*i))]} ${W[$((2*i+1))]}"; done; }
pairs 0 1 >"$OUT/pairs"
OP=$(free_port)
RUST_LOG=info $B/orchestrator --listen "127.0.0.1:$OP" --cluster-file "$OUT/pairs" \
  --move-rate-limit "$RATE" --move-batch-slots "$BATCH" >"$OUT/orch.out" 2>"$OUT/orch.log" &
ORCH=$!; PIDS+=($ORCH)
wait_port "$OP"
info() { redis-cli -p "$OP" INFO cluster | tr -d '\r'; }
# Waits until no slot moves and the pairs hold $1 slots (e.g. "8192 8192").
settle() {
  for _ in $(seq 6000); do
    local i; i=$(info)
    local got; got=$(echo "$i" | grep '^pair' | sed 's/.*slots=//' | tr '\n' ' ' | sed 's/ $//')
    if [ "$got" = "$1" ] && echo "$i" | grep -q '^membership:idle' \
       && ! echo "$i" | grep -q move_current && ! echo "$i" | grep '^pair' | grep -vq 'in_sync,in_sync'; then
      return 0
    fi
    sleep 0.05
  done
  echo "did not settle on $1:"; info; exit 1
}
settle "8192 8192"
# Each worker's key count, through the orchestrator's `stats` (text protocol).
worker_keys() {
  printf 'stats\n' | timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$OP; cat >&3; timeout 2 cat <&3" 2>/dev/null \
    | tr '|' '\n' | sed -n 's/^ *\(pair[0-9]* [^ ]*\).* keys=\([0-9]*\).*/  \1 keys=\2/p' || true
}

echo "loading $KEYS keys of $VALUE bytes"
$B/twincache-bench --addr "127.0.0.1:$OP" -c "$CLIENTS" --op mixed -d "$VALUE" --incompressible \
  -r "$KEYS" -n 1 >/dev/null
echo "$(redis-cli -p "$OP" DBSIZE) keys in all"; worker_keys

$B/twincache-bench --addr "127.0.0.1:$OP" -c "$CLIENTS" --op mixed -d "$VALUE" --incompressible \
  -r "$KEYS" -n 1000000000 --no-load --duration 600 --latency-log "$OUT/lat" >"$OUT/bench.out" 2>&1 &
BENCH=$!; PIDS+=($BENCH)
sleep 5
T0=$(now_ms); pairs 0 1 2 >"$OUT/pairs"; kill -HUP $ORCH
settle "5462 5461 5461"; T1=$(now_ms)
echo "after 2 -> 3: $(info | grep '^last_change')"
echo "$(redis-cli -p "$OP" DBSIZE) keys in all"; worker_keys
sleep 5
T2=$(now_ms); pairs 0 2 >"$OUT/pairs"; kill -HUP $ORCH
settle "8192 8192"; T3=$(now_ms)
echo "after 3 -> 2: $(info | grep '^last_change')"
echo "$(redis-cli -p "$OP" DBSIZE) keys in all"; worker_keys
sleep 5
T4=$(now_ms)
kill -INT $BENCH 2>/dev/null || true
# SIGINT: the bench stops sending, and writes its results and latency log.
wait $BENCH 2>/dev/null || true
BENCH=
# The kinds of the clients' errors, if any, and the gets that found nothing: every key was
# loaded and none is deleted, so each is a key the cluster lost, for a while or for good.
grep '^errors: \|^gets that found nothing' "$OUT/bench.out" || true
grep 'membership change done\|slot move done' "$OUT/orch.log" | sed 's/\x1b\[[0-9;]*m//g' | grep 'membership change done' | sed 's/.*membership change done: /change: /'
python3 - "$OUT/lat" "$T0" "$T1" "$T2" "$T3" "$T4" <<'EOF'
import sys
path, t0, t1, t2, t3, t4 = sys.argv[1], *map(int, sys.argv[2:])
rows = []
try:
    with open(path) as f:
        for line in f:
            at, us, ok = line.split()
            rows.append((int(at), int(us), ok == "1"))
except FileNotFoundError:
    sys.exit("no latency log: the bench did not finish")
def show(name, lo, hi):
    lat = sorted(us for at, us, ok in rows if lo <= at < hi)
    errors = sum(1 for at, us, ok in rows if lo <= at < hi and not ok)
    if not lat:
        print(f"{name:22} no requests"); return
    p = lambda q: lat[min(len(lat) - 1, int((len(lat) - 1) * q))] / 1000
    secs = (hi - lo) / 1000
    print(f"{name:22} {secs:6.1f}s {len(lat)/secs:8.0f} ops/s  p50 {p(.5):6.3f} ms  p99 {p(.99):6.3f} ms  "
          f"p99.9 {p(.999):6.3f} ms  max {lat[-1]/1000:7.1f} ms  errors {errors}")
start = min(at for at, _, _ in rows)
show("before", start, t0)
show("move 2 -> 3", t0, t1)
show("between", t1, t2)
show("move 3 -> 2", t2, t3)
show("after", t3, t4)
EOF
