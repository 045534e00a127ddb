#!/usr/bin/env bash
# What TLS on the client port costs: GET and SET ops/s through a plaintext orchestrator and a
# TLS one (--tls-cert-file), in one run on loopback, with redis-server plaintext and TLS
# (its tls-port) beside them for scale.
#
#   cargo build --release && bench/tls.sh
#
# Starts two one-pair clusters (everything --threads 1, as in README's benchmark), plaintext
# workers behind both, and one redis-server listening plaintext and TLS. Then runs
# redis-benchmark (50 clients, 100-byte values, -P 1 and -P 16) against each target in turn,
# ROUNDS times, alternating the order. Prints each target's median ops/s and the TLS/plain
# ratios, and the orchestrators' CPU per request. Certificates: a throwaway EC P-256 CA and
# a leaf for 127.0.0.1 made with openssl. Stops only the processes it started.
#
# With BASE=DIR (a directory holding another build's `worker` and `orchestrator`, e.g. the
# commit before TLS), a third cluster runs those binaries in plaintext, to check that
# plaintext did not get slower.
# Env: ROUNDS (3), N1 (100000), N16 (400000), BASE (unset).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; N1=${N1:-100000}; N16=${N16:-400000}
B=target/release
for t in redis-server redis-benchmark openssl python3; do
  command -v $t >/dev/null || { echo "missing $t (apt-get install -y redis-server redis-tools openssl python3)"; exit 2; }
done
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened"; exit 1; }
PIDS=()
OUT=$(mktemp -d)
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"; }
trap stop EXIT

# A CA and a certificate for 127.0.0.1 it signed.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$OUT/ca.key" -out "$OUT/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench \
  -keyout "$OUT/node.key" -out "$OUT/node.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$OUT/ext"
openssl x509 -req -in "$OUT/node.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" -CAcreateserial \
  -days 2 -extfile "$OUT/ext" -out "$OUT/node.pem" 2>/dev/null

# start_cluster NAME BIN_DIR [orchestrator flags...]: the orchestrator's port in $OUT/NAME.port.
start_cluster() {
  local name=$1 bin=$2; shift 2
  local w1 w2 op
  w1=$(free_port); w2=$(free_port); op=$(free_port)
  for p in $w1 $w2; do "$bin/worker" --threads 1 --port "$p" >/dev/null 2>&1 & PIDS+=($!); wait_port "$p"; done
  "$bin/orchestrator" --threads 1 --listen "127.0.0.1:$op" "$@" 127.0.0.1 "$w1" 127.0.0.1 "$w2" \
    >"$OUT/$name.log" 2>&1 & PIDS+=($!)
  echo $! >"$OUT/$name.pid"
  wait_port "$op"
  echo "$op" >"$OUT/$name.port"
}

SIDES=(plain tls)
start_cluster plain "$B"
start_cluster tls "$B" --tls-cert-file "$OUT/node.pem" --tls-key-file "$OUT/node.key"
if [ -n "${BASE:-}" ]; then start_cluster base "$BASE"; SIDES+=(base); fi
RP=$(free_port); RT=$(free_port)
redis-server --port "$RP" --tls-port "$RT" --bind 127.0.0.1 --save "" --appendonly no \
  --tls-cert-file "$OUT/node.pem" --tls-key-file "$OUT/node.key" --tls-ca-cert-file "$OUT/ca.pem" \
  --tls-auth-clients no >"$OUT/redis.log" 2>&1 & PIDS+=($!)
wait_port "$RP"; wait_port "$RT"
echo "$RP" >"$OUT/redis-plain.port"; echo "$RT" >"$OUT/redis-tls.port"
TARGETS=("${SIDES[@]}" redis-plain redis-tls)
cpu() { awk '{print $14 + $15}' "/proc/$(cat "$OUT/$1.pid")/stat"; }
sleep 1

for r in $(seq "$ROUNDS"); do
  order=("${TARGETS[@]}"); [ $((r % 2)) = 0 ] && order=($(printf '%s\n' "${TARGETS[@]}" | tac))
  for t in "${order[@]}"; do
    tls=(); case $t in tls|redis-tls) tls=(--tls --cacert "$OUT/ca.pem");; esac
    [ -f "$OUT/$t.pid" ] && before=$(cpu "$t")
    for P in 1 16; do
      n=$N1; [ $P = 16 ] && n=$N16
      echo "round $r: $t -P $P" >&2
      timeout 300 redis-benchmark -h 127.0.0.1 -p "$(cat "$OUT/$t.port")" "${tls[@]}" -t set,get -n $n -c 50 -P $P \
        -d 100 -r 100000 --csv 2>/dev/null \
        | awk -F'"' -v t="$t" -v P=$P 'NR>1 && $2!="" {print t"\t"$2"\t"P"\t"$4}' >>"$OUT/res.tsv"
    done
    [ -f "$OUT/$t.pid" ] && echo "$t $(( $(cpu "$t") - before ))" >>"$OUT/cpu.txt"
  done
done
python3 - "$OUT/res.tsv" "$OUT/cpu.txt" "$(getconf CLK_TCK)" "$N1" "$N16" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    t, op, P, v = l.split("\t"); d[(t, op, int(P))].append(float(v.replace(",", "")))
targets = [t for t in ("plain", "tls", "base", "redis-plain", "redis-tls") if (t, "GET", 1) in d]
n = len(d[("plain", "GET", 1)])
print(f"ops/s, median of {n} runs (redis-benchmark -c 50 -d 100)")
print(f"{'op':<4} {'P':>3} " + " ".join(f"{t:>12}" for t in targets) + "   tls/plain  redis tls/plain" + ("  plain/base" if "base" in targets else ""))
for op in ("GET", "SET"):
    for P in (1, 16):
        m = {t: statistics.median(d[(t, op, P)]) for t in targets}
        line = f"{op:<4} {P:>3} " + " ".join(f"{m[t]:>12,.0f}" for t in targets)
        line += f"   {m['tls'] / m['plain']:>9.3f}  {m['redis-tls'] / m['redis-plain']:>15.3f}"
        if "base" in m:
            line += f"  {m['plain'] / m['base']:>10.3f}"
        print(line)
# CPU per request is steadier than throughput on a shared machine: it leaves out the time an
# orchestrator waited for a core. Each target ran GET and SET at -P 1 (N1 each) and -P 16 (N16
# each) per round.
ticks = collections.defaultdict(list)
for l in open(sys.argv[2]):
    side, t = l.split(); ticks[side].append(int(t))
per_run = 2 * (int(sys.argv[4]) + int(sys.argv[5]))
us = {s: statistics.median(t) / int(sys.argv[3]) * 1e6 / per_run for s, t in ticks.items()}
print("orchestrator CPU per request (all four tests): " + ", ".join(f"{s} {v:.2f} us" for s, v in us.items())
      + f"; tls/plain {us['tls'] / us['plain']:.3f}")
print("runs, in order:", file=sys.stderr)
for k, v in sorted(d.items()):
    print(" ", *k, " ".join(f"{x:,.0f}" for x in v), file=sys.stderr)
PY
