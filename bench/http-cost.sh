#!/usr/bin/env bash
# What metrics cost on the hot path: GET and SET throughput through an orchestrator with
# --http on (and scraped every second, as Prometheus would) against one with it off, in one
# run on loopback.
#
#   cargo build --release && bench/http-cost.sh
#
# Starts two one-pair clusters (all --threads 1, as in README's benchmark), then runs
# bench/peers.sh against each in turn, alternating, ROUNDS times each (redis and
# twemproxy are measured in every run too, so each run's ratio to twemproxy cancels some of
# the machine's drift). Prints the orchestrator's median ops/s per test for each side and
# the ratio on/off. Stops only the processes it started.
# Env: ROUNDS (3), PEERS (bench/peers.sh), N1, N16 (passed on to peers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
PEERS=${PEERS:-bench/peers.sh}
[ -x "$PEERS" ] || { echo "cannot run $PEERS; set PEERS"; exit 2; }
B=target/release
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened"; exit 1; }
PIDS=()
OUT=$(mktemp -d)
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"; }
trap stop EXIT

# start_cluster NAME [orchestrator flags...]: prints the orchestrator's client port.
start_cluster() {
  local name=$1; shift
  local w1 w2 op
  w1=$(free_port); w2=$(free_port); op=$(free_port)
  for p in $w1 $w2; do $B/worker --threads 1 --port "$p" >/dev/null 2>&1 & PIDS+=($!); wait_port "$p"; done
  $B/orchestrator --threads 1 --listen "127.0.0.1:$op" "$@" 127.0.0.1 "$w1" 127.0.0.1 "$w2" \
    >/dev/null 2>&1 & PIDS+=($!)
  echo $! >"$OUT/$name.pid"
  wait_port "$op"
  echo "$op" >"$OUT/$name.port"
}

start_cluster off
HP=$(free_port)
start_cluster on --http "127.0.0.1:$HP"
wait_port "$HP"
OFF=$(cat "$OUT/off.port"); ON=$(cat "$OUT/on.port")
# CPU time (user + system, clock ticks) the orchestrator of a side has used so far.
cpu() { awk '{print $14 + $15}' "/proc/$(cat "$OUT/$1.pid")/stat"; }
sleep 1
# A scrape a second, as Prometheus would (the status page polls about as often).
( while :; do curl -s -o /dev/null "http://127.0.0.1:$HP/metrics"; sleep 1; done ) & PIDS+=($!)

for r in $(seq "$ROUNDS"); do
  order=(off on); [ $((r % 2)) = 0 ] && order=(on off)
  for side in "${order[@]}"; do
    port=$OFF; [ "$side" = on ] && port=$ON
    echo "round $r: --http $side" >&2
    before=$(cpu "$side")
    ROUNDS=1 "$PEERS" "$port" | awk -v s="$side" '$1=="GET"||$1=="SET" {print s"\t"$1"\t"$2"\t"$5}' >>"$OUT/res.tsv"
    echo "$side $(( $(cpu "$side") - before ))" >>"$OUT/cpu.txt"
  done
done
python3 - "$OUT/res.tsv" "$OUT/cpu.txt" "$(getconf CLK_TCK)" "${N1:-100000}" "${N16:-400000}" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    side, op, P, v = l.split("\t"); d[(side, op, int(P))].append(float(v.replace(",", "")))
print(f"{'op':<4} {'P':>3} {'--http off':>12} {'--http on':>12}  on/off   (orchestrator ops/s, median of {len(d[('on','GET',1)])})")
for op in ("GET", "SET"):
    for P in (1, 16):
        off, on = statistics.median(d[("off", op, P)]), statistics.median(d[("on", op, P)])
        print(f"{op:<4} {P:>3} {off:>12,.0f} {on:>12,.0f}  {on / off:.3f}")
# CPU per request is steadier than throughput on a shared machine: it does not count the
# time the orchestrator waited for a core. Each peers.sh run sends GET and SET at -P 1 (N1
# each) and -P 16 (N16 each) to the orchestrator.
ticks = collections.defaultdict(list)
for l in open(sys.argv[2]):
    side, t = l.split(); ticks[side].append(int(t))
per_run = 2 * (int(sys.argv[4]) + int(sys.argv[5]))
us = {s: statistics.median(t) / int(sys.argv[3]) * 1e6 / per_run for s, t in ticks.items()}
print(f"orchestrator CPU per request (all four tests): off {us['off']:.2f} us, on {us['on']:.2f} us, on/off {us['on'] / us['off']:.3f}")
print("runs, in order:", file=sys.stderr)
for side, t in ticks.items():
    print(" ", side, "CPU ticks", t, file=sys.stderr)
for k, v in sorted(d.items()):
    print(" ", *k, " ".join(f"{x:,.0f}" for x in v), file=sys.stderr)
PY
