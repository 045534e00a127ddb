#!/usr/bin/env bash
# MGET of 100 keys spread over 4 pairs, against twemproxy over 4 Redis servers, in one run.
#
#   bench/mget.sh BINDIR [BINDIR2]
#   CMD=EXISTS bench/mget.sh BINDIR      (another command of 100 keys: EXISTS, DEL, ...)
#
# Starts 4 redis-servers with twemproxy (nutcracker) in front of them, and 4 pairs of
# workers with an orchestrator from BINDIR (default flags; a second orchestrator cluster from
# BINDIR2 when given, to compare two builds). Each gets 10,000 keys of 100 bytes, then
# redis-benchmark runs `MGET` of 100 random keys (50 clients, pipeline 1) against each in
# turn, alternating the order every round; prints the medians: requests/s, p50 and p99.
#
# Needs: apt-get install -y redis-server redis-tools nutcracker python3
# Env: ROUNDS (3), N (requests per run, 20000), CMD (MGET).
set -u -o pipefail
case "${1:-}" in -h | --help | "") sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
ROUNDS=${ROUNDS:-3}
N=${N:-20000}
CMD=${CMD:-MGET}
# shellcheck source=bench/servers.sh
. "$(dirname "$0")/servers.sh"
need redis-server redis-benchmark nutcracker python3 "$1/worker" "$1/orchestrator"
[ -n "${2:-}" ] && need "$2/worker" "$2/orchestrator"

declare -A PORT
REDIS_PORTS=()
for _ in 1 2 3 4; do
  start_redis
  REDIS_PORTS+=("$REDIS_PORT")
done
PROXY_PORT=$(free_port)
{
  echo "pool:"
  echo "  listen: 127.0.0.1:$PROXY_PORT"
  echo "  redis: true"
  echo "  hash: fnv1a_64"
  echo "  distribution: ketama"
  echo "  preconnect: true"
  echo "  server_connections: 1"
  echo "  servers:"
  for p in "${REDIS_PORTS[@]}"; do echo "    - 127.0.0.1:$p:1 redis$p"; done
} >"$WORK/twemproxy4.yml"
nutcracker -c "$WORK/twemproxy4.yml" -s "$(free_port)" -a 127.0.0.1 -o "$WORK/twemproxy.log" &
STARTED+=($!)
await_port "$PROXY_PORT"
PORT[twemproxy]=$PROXY_PORT
TARGETS=(twemproxy)

# Four pairs of workers and an orchestrator from $2, named $1.
start_cluster() {
  local name=$1 bin=$2 workers=() port
  for _ in 1 2 3 4 5 6 7 8; do
    port=$(free_port)
    "$bin/worker" --port "$port" >"$WORK/worker-$port.log" 2>&1 &
    STARTED+=($!)
    await_port "$port"
    workers+=(127.0.0.1 "$port")
  done
  PORT[$name]=$(free_port)
  "$bin/orchestrator" --listen "127.0.0.1:${PORT[$name]}" "${workers[@]}" >"$WORK/$name.log" 2>&1 &
  STARTED+=($!)
  await_port "${PORT[$name]}"
  sleep 1 # the orchestrator serves once it has seen the workers
  TARGETS+=("$name")
}
start_cluster orchestrator "$1"
[ -n "${2:-}" ] && start_cluster orchestrator2 "$2"

KEYS=()
for _ in $(seq 100); do KEYS+=("key:__rand_int__"); done
for t in "${TARGETS[@]}"; do
  redis-benchmark -p "${PORT[$t]}" -t set -n 100000 -r 10000 -d 100 -c 50 -P 16 -q >/dev/null
done
: >"$WORK/results.tsv"
for round in $(seq "$ROUNDS"); do
  mapfile -t order < <(in_turn "$round" "${TARGETS[@]}")
  for t in "${order[@]}"; do
    echo "round $round/$ROUNDS: $t" >&2
    timeout 300 redis-benchmark -p "${PORT[$t]}" -c 50 -n "$N" -r 10000 --csv "$CMD" "${KEYS[@]}" 2>/dev/null |
      awk -F'"' -v t="$t" 'NR > 1 && $2 != "" {print t "\t" $4 "\t" $10 "\t" $14}' >>"$WORK/results.tsv"
  done
done
python3 - "$WORK/results.tsv" "$CMD" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    t, rps, p50, p99 = line.rstrip("\n").split("\t")
    runs[t].append((float(rps), float(p50), float(p99)))
base = statistics.median(r[0] for r in runs["twemproxy"])
print(f"{'target':<14} {sys.argv[2] + '/s':>10} {'p50 ms':>8} {'p99 ms':>8}   ratio to twemproxy")
for t, rs in runs.items():
    rps = statistics.median(r[0] for r in rs)
    p50 = statistics.median(r[1] for r in rs)
    p99 = statistics.median(r[2] for r in rs)
    print(f"{t:<14} {rps:>10,.0f} {p50:>8.3f} {p99:>8.3f}   {rps / base:.2f}")
PY
