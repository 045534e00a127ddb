#!/usr/bin/env bash
# APPEND growing a few strings: the orchestrator in front of one pair against Redis directly
# and twemproxy.
#
#   bench/append.sh
#
# Starts a redis-server, twemproxy in front of it, and one pair of workers with an
# orchestrator in front of them (target/release, built first with `cargo build --release`),
# all on free loopback ports. Then runs redis-benchmark's APPEND of a TAIL-byte value to
# KEYS keys chosen at random (C clients, pipeline P, N requests: the strings grow to about
# N * TAIL / KEYS bytes each) against each target, emptied first, in alternating order over
# ROUNDS rounds, and prints the median ops/s with ratios to twemproxy. Stops what it
# started, and only that.
#
# Needs: apt-get install -y redis-server redis-tools nutcracker python3
# Env: N (64000), TAIL (1000), KEYS (4), C (50), P (16), ROUNDS (3), BIN (target/release);
#      BEFORE, another such folder (binaries built from an older commit), measured in the
#      same rounds as "before"; ORCH_FLAGS and WORKER_FLAGS, extra flags.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
N=${N:-64000}
TAIL=${TAIL:-1000}
KEYS=${KEYS:-4}
C=${C:-50}
P=${P:-16}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/release}
ORCH_FLAGS=${ORCH_FLAGS:-}

# shellcheck source=bench/servers.sh
. bench/servers.sh
need redis-server redis-benchmark redis-cli nutcracker python3 "$BIN/worker" "$BIN/orchestrator"
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
tail=$(head -c "$TAIL" /dev/zero | tr '\0' x)
: >"$WORK/results.tsv"
for round in $(seq "$ROUNDS"); do
  mapfile -t order < <(in_turn "$round" "${TARGETS[@]}")
  for target in "${order[@]}"; do
    echo "round $round/$ROUNDS: $target" >&2
    port=${PORT[$target]}
    for k in $(seq 0 $((KEYS - 1))); do
      redis-cli -p "$port" del "$(printf 'append:%012d' "$k")" >/dev/null
    done
    # redis-benchmark stops at the first error reply, and says so on stderr.
    if ! timeout 300 redis-benchmark -p "$port" -n "$N" -c "$C" -P "$P" -r "$KEYS" --csv \
      APPEND append:__rand_int__ "$tail" 2>"$WORK/stderr" >"$WORK/out.csv"; then
      echo "$target failed: $(tail -c 300 "$WORK/stderr")" >&2
      printf '%s\tfailed\n' "$target" >>"$WORK/results.tsv"
      continue
    fi
    awk -F'"' -v t="$target" 'NR > 1 && $4 != "" {print t "\t" $4 "\t" $10 "\t" $14}' \
      "$WORK/out.csv" >>"$WORK/results.tsv"
  done
done

python3 - "$WORK/results.tsv" "$N" "$TAIL" "$KEYS" "$P" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
failed = collections.Counter()
for line in open(sys.argv[1]):
    target, *fields = line.rstrip("\n").split("\t")
    if fields == ["failed"]:
        failed[target] += 1
    else:
        runs[target].append(tuple(float(f) for f in fields))
n, tail, keys, p = (int(a) for a in sys.argv[2:])
print(f"APPEND of {tail} bytes to {keys} keys, {n} requests at -P {p} (strings grow to ~{n * tail // keys:,} bytes)")
base = statistics.median(r[0] for r in runs["twemproxy"])
print(f"{'target':<14} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8}   ratio to twemproxy")
for t in ("redis", "twemproxy", "orchestrator", "before"):
    if failed[t]:
        print(f"{t:<14} failed in {failed[t]} of {failed[t] + len(runs[t])} rounds (error replies)")
    if runs[t]:
        ops, p50, p99 = (statistics.median(r[i] for r in runs[t]) for i in range(3))
        print(f"{t:<14} {ops:>10,.0f} {p50:>8.3f} {p99:>8.3f}   {ops / base:.2f}")
PY
