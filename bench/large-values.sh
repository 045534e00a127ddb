#!/usr/bin/env bash
# Large values, GET and SET: the orchestrator in front of one pair against Redis directly
# and twemproxy in front of that Redis.
#
#   bench/large-values.sh
#
# Starts a redis-server, twemproxy in front of it, and one pair of workers with an
# orchestrator in front of them (target/release, built first with `cargo build --release`),
# all on free loopback ports.
# Then, for each value size in SIZES, runs redis-benchmark's SET and GET (one key, C clients,
# pipeline 1) against each target, in alternating order over ROUNDS rounds so the machine's
# drift favours none, and prints the median ops/s and MB/s with each proxy's ratio to Redis
# and the orchestrator's to twemproxy. Stops what it started, and only that.
#
# Needs: apt-get install -y redis-server redis-tools nutcracker python3
# Env: SIZES (65536 1048576) bytes per value; N (2000) requests per test at 64 KiB, scaled
#      down for larger values (at least 200); C (10) clients; ROUNDS (3); BIN
#      (target/release), where the worker and orchestrator binaries are; BEFORE, another
#      such folder (say, binaries built from an older commit): a second pair and
#      orchestrator from it are measured in the same rounds, as "before"; ORCH_FLAGS and
#      WORKER_FLAGS, extra flags.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
SIZES=${SIZES:-65536 1048576}
N=${N:-2000}
C=${C:-10}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/release}
ORCH_FLAGS=${ORCH_FLAGS:-}
WORKER_FLAGS=${WORKER_FLAGS:-}

# shellcheck source=bench/servers.sh
. bench/servers.sh
need redis-server redis-benchmark nutcracker python3 "$BIN/worker" "$BIN/orchestrator"
start_redis
start_twemproxy
# shellcheck disable=SC2086 # a list of flags
start_pair "$BIN" $ORCH_FLAGS

declare -A PORT=([redis]=$REDIS_PORT [twemproxy]=$PROXY_PORT [orchestrator]=$ORCH_PORT)
TARGETS=(redis twemproxy orchestrator)
if [ -n "${BEFORE:-}" ]; then
  # shellcheck disable=SC2086 # a list of flags
  start_pair "$BEFORE" $ORCH_FLAGS
  PORT[before]=$ORCH_PORT
  TARGETS+=(before)
fi
: >"$WORK/results.tsv"
for round in $(seq "$ROUNDS"); do
  for size in $SIZES; do
    n=$((N * 65536 / size))
    [ "$n" -lt 200 ] && n=200
    mapfile -t order < <(in_turn "$round" "${TARGETS[@]}")
    for target in "${order[@]}"; do
      echo "round $round/$ROUNDS: $target, $size bytes, $n requests" >&2
      timeout 300 redis-benchmark -p "${PORT[$target]}" -t set,get -n "$n" -c "$C" -d "$size" --csv 2>/dev/null |
        awk -F'"' -v t="$target" -v d="$size" 'NR > 1 && $2 != "" {print t "\t" $2 "\t" d "\t" $4}' >>"$WORK/results.tsv"
    done
  done
done

python3 - "$WORK/results.tsv" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    target, op, size, ops = line.rstrip("\n").split("\t")
    runs[(target, op, int(size))].append(float(ops))
targets = [t for t in ("redis", "twemproxy", "orchestrator", "before") if any(k[0] == t for k in runs)]
print(f"{'op':<4} {'value':>8} " + " ".join(f"{t + ' ops/s':>18} {'MB/s':>6}" for t in targets) + "   ratio to redis; orchestrator to twemproxy")
for op in ("SET", "GET"):
    for size in sorted({k[2] for k in runs}):
        m = {t: statistics.median(runs[(t, op, size)]) for t in targets if runs[(t, op, size)]}
        if "redis" not in m:
            continue
        label = f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        cells = " ".join(f"{m.get(t, 0):>18,.0f} {m.get(t, 0) * size / 1e6:>6,.0f}" for t in targets)
        ratios = " ".join(f"{t}={m.get(t, 0) / m['redis']:.2f}" for t in targets if t != "redis")
        if m.get("twemproxy"):
            ratios += f"; {m.get('orchestrator', 0) / m['twemproxy']:.2f}"
        print(f"{op:<4} {label:>8} {cells}   {ratios}")
PY
