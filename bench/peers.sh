#!/usr/bin/env bash
# Throughput of twincache's peers and of a running orchestrator, side by side, in one run.
#
#   bench/peers.sh [ORCHESTRATOR_PORT]
#
# Starts a redis-server and a twemproxy (nutcracker) in front of it on free loopback ports,
# then runs redis-benchmark (50 clients, 100-byte values, 100,000 keys; pipeline 1 and 16)
# against Redis directly, against twemproxy and, when a port is given, against the
# orchestrator listening there (start one first: README's "Benchmarks" says how). Targets
# take turns in every round, in alternating order, so the machine's drift favours none; the
# table shows the median of the rounds and each target's ratio to twemproxy (with the
# orchestrator's lowest and highest ratio in a single round), then the median of each
# target's p99 latency. Stops what it
# started, and only that.
#
# Needs: apt-get install -y redis-server redis-tools nutcracker python3
# Env: ROUNDS (3); N1 and N16, requests per test at pipeline 1 (100000) and 16 (400000);
#      TESTS, redis-benchmark's -t list (set,get; e.g. TESTS=set,get,mset,incr);
#      KEYSPACE, -r (100000; HSET writes fields of one hash, so KEYSPACE=1000 keeps it at
#      1,000 fields).
set -u -o pipefail
case "${1:-}" in -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
ORCHESTRATOR=${1:-}
ROUNDS=${ROUNDS:-3}
N1=${N1:-100000}
N16=${N16:-400000}
TESTS=${TESTS:-set,get}
KEYSPACE=${KEYSPACE:-100000}

# shellcheck source=bench/servers.sh
. "$(dirname "$0")/servers.sh"
need redis-server redis-benchmark nutcracker python3
start_redis
start_twemproxy

declare -A PORT=([redis]=$REDIS_PORT [twemproxy]=$PROXY_PORT)
TARGETS=(redis twemproxy)
if [ -n "$ORCHESTRATOR" ]; then
  await_port "$ORCHESTRATOR"
  PORT[orchestrator]=$ORCHESTRATOR
  TARGETS+=(orchestrator)
fi

# One redis-benchmark run: target, pipeline, requests; appends "target op P ops/s" lines.
measure() {
  timeout 300 redis-benchmark -p "${PORT[$1]}" -t "$TESTS" -n "$3" -c 50 -P "$2" -d 100 -r "$KEYSPACE" --csv 2>/dev/null |
    awk -F'"' -v target="$1" -v P="$2" 'NR > 1 && $2 != "" {print target "\t" $2 "\t" P "\t" $4 "\t" $14}' >>"$WORK/results.tsv"
}

: >"$WORK/results.tsv"
for round in $(seq "$ROUNDS"); do
  mapfile -t order < <(in_turn "$round" "${TARGETS[@]}")
  for P in 1 16; do
    n=$N1
    [ "$P" = 16 ] && n=$N16
    for target in "${order[@]}"; do
      echo "round $round/$ROUNDS: $target, pipeline $P" >&2
      measure "$target" "$P" "$n"
    done
  done
done

python3 - "$WORK/results.tsv" <<'PY'
import collections
import statistics
import sys

runs = collections.defaultdict(list)
p99s = collections.defaultdict(list)
for line in open(sys.argv[1]):
    target, op, pipeline, ops, p99 = line.rstrip("\n").split("\t")
    runs[(target, op, int(pipeline))].append(float(ops))
    p99s[(target, op, int(pipeline))].append(float(p99))
targets = [t for t in ("redis", "twemproxy", "orchestrator") if any(k[0] == t for k in runs)]
print(f"{'op':<8} {'P':>3} " + " ".join(f"{t:>14}" for t in targets) + "   ratio to twemproxy")
ops = sorted({k[1] for k in runs}, key=lambda o: (o != "GET", o != "SET", o))
for op in ops:
    for pipeline in (1, 16):
        median = {t: statistics.median(runs[(t, op, pipeline)]) for t in targets if runs[(t, op, pipeline)]}
        base = median.get("twemproxy") or 1
        cells = " ".join(f"{median.get(t, 0):>14,.0f}" for t in targets)
        ratios = " ".join(f"{t}={median.get(t, 0) / base:.2f}" for t in targets if t != "twemproxy")
        # Each round's own ratio (its targets ran minutes apart, not sessions): the spread
        # says how far the median may be trusted on a noisy machine.
        pairs = list(zip(runs[("orchestrator", op, pipeline)], runs[("twemproxy", op, pipeline)]))
        spread = [o / t for o, t in pairs if t]
        if len(spread) > 1:
            ratios += f" (rounds {min(spread):.2f}-{max(spread):.2f})"
        print(f"{op:<8} {pipeline:>3} {cells}   {ratios}")
print()
print("p99 latency (ms, median of the rounds' p99s)")
print(f"{'op':<8} {'P':>3} " + " ".join(f"{t:>14}" for t in targets))
for op in ops:
    for pipeline in (1, 16):
        cells = " ".join(f"{statistics.median(p99s[(t, op, pipeline)]) if p99s[(t, op, pipeline)] else 0:>14.3f}" for t in targets)
        print(f"{op:<8} {pipeline:>3} {cells}")
PY
