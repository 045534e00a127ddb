#!/usr/bin/env bash
# twincache-migrate throughput, next to Redis' own MIGRATE, in one run on loopback:
#
#   cargo build --release --bin twincache-migrate && bench/migrate.sh
#
# A source redis-server is filled with N keys of about 1 KiB (90% strings with TTLs, 10%
# hashes of ten ~100-byte fields; random bytes, so RDB compression does not shrink them).
# Then, each into a fresh destination redis-server:
#   twincache-migrate copy : SCAN + one script read and one RESTORE pipeline per batch,
#                            batches of 1000, --concurrency C (default 8)
#   MIGRATE                : SCAN COUNT 1000, then MIGRATE host port "" 0 timeout COPY REPLACE
#                            KEYS k1..k1000 for each batch, one connection (bench/migrate_driver.py)
# Both are checked: the destination ends with N keys. Then T users of seed 003's version 1.0.0
# are migrated in place to 3.0.0 with `transform` (with and without --backup).
# Env: N (keys, 1000000), T (users, 200000), C (concurrency, 8). Needs redis-server, redis-tools, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}; T=${T:-200000}; C=${C:-8}
B=target/release/twincache-migrate
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened"; exit 1; }
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap stop EXIT
# Starts a redis-server on a free port and sets PORT (not in a subshell: PIDS must keep its pid).
start_redis() { PORT=$(free_port); redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 & PIDS+=($!); wait_port "$PORT"; }
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1 / ($3 - $2):,.0f}')"; }

# Fills keys [from, to) with random ~1 KiB values; a script call per 50,000 keys.
FILL='
local from, to = tonumber(ARGV[1]), tonumber(ARGV[2])
local blobs = {}
for b = 1, 97 do
  local t = {}
  for j = 1, 128 do t[j] = string.format("%08x", math.random(0, 2147483646)) end
  blobs[b] = table.concat(t)
end
for i = from, to - 1 do
  local blob = blobs[i % 97 + 1]
  if i % 10 == 0 then
    local args = {"bench:h:" .. i}
    for f = 1, 10 do args[#args + 1] = "field" .. f; args[#args + 1] = string.sub(blob, f * 90, f * 90 + 99) end
    redis.call("HSET", unpack(args))
  else
    redis.call("SET", "bench:s:" .. i, string.sub(blob, 1 + i % 7, 1000 + i % 7), "EX", 86400 + i % 3600)
  end
end
return to - from'
start_redis; SRC=$PORT
echo "filling $N keys into the source ($SRC)..."
for ((i = 0; i < N; i += 50000)); do
  redis-cli -p "$SRC" EVAL "$FILL" 0 "$i" "$(( i + 50000 < N ? i + 50000 : N ))" >/dev/null
done
echo "source: $(redis-cli -p "$SRC" dbsize) keys, $(redis-cli -p "$SRC" info memory | grep '^used_memory_human' | tr -d '\r')"

start_redis; DST=$PORT
t0=$(now)
$B copy --source "redis://127.0.0.1:$SRC" --destination "redis://127.0.0.1:$DST" --concurrency "$C" --quiet >/tmp/twincache-migrate-bench.out
t1=$(now)
copied=$(redis-cli -p "$DST" dbsize)
copy_rate=$(rate "$N" "$t0" "$t1")
cat /tmp/twincache-migrate-bench.out

start_redis; DST2=$PORT
t0=$(now)
python3 bench/migrate_driver.py "$SRC" "$DST2" 1000
t1=$(now)
migrated=$(redis-cli -p "$DST2" dbsize)
migrate_rate=$(rate "$N" "$t0" "$t1")
[ "$copied" = "$N" ] && [ "$migrated" = "$N" ] || { echo "key counts differ: copy $copied, MIGRATE $migrated, want $N"; exit 1; }

# transform: T users of version 1.0.0, in place to 3.0.0.
USERS_FILL='
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do
  redis.call("SET", "user:" .. i, "{\"userName\":\"Ada Lovelace" .. i .. "\",\"age\":" .. (i % 90) .. ",\"email\":\"ada" .. i .. "@example.com\",\"preferences\":{\"theme\":\"dark\",\"lang\":\"en\"}}", "EX", 86400)
end
return 1'
start_redis; USR=$PORT
for ((i = 0; i < T; i += 50000)); do
  redis-cli -p "$USR" EVAL "$USERS_FILL" 0 "$i" "$(( i + 50000 < T ? i + 50000 : T ))" >/dev/null
done
t0=$(now)
$B transform --redis "redis://127.0.0.1:$USR" --registry migrate/examples/users --to 3.0.0 --concurrency "$C" --quiet >/dev/null
t1=$(now)
transform_rate=$(rate "$T" "$t0" "$t1")
BACKUP=$(mktemp -u /tmp/twincache-migrate-bench-backup.XXXXXX)
$B transform --redis "redis://127.0.0.1:$USR" --registry migrate/examples/users --to 1.0.0 --concurrency "$C" --quiet >/dev/null
t0=$(now)
$B transform --redis "redis://127.0.0.1:$USR" --registry migrate/examples/users --to 3.0.0 --concurrency "$C" --backup "$BACKUP" --quiet >/dev/null
t1=$(now)
transform_backup_rate=$(rate "$T" "$t0" "$t1")
rm -f "$BACKUP"

echo
echo "| what | keys | keys/s |"
echo "|---|---|---|"
echo "| twincache-migrate copy (--concurrency $C) | $N | $copy_rate |"
echo "| MIGRATE ... COPY REPLACE KEYS, batches of 1000 | $N | $migrate_rate |"
echo "| twincache-migrate transform 1.0.0 -> 3.0.0 | $T | $transform_rate |"
echo "| twincache-migrate transform with --backup | $T | $transform_backup_rate |"
python3 -c "print(f'copy / MIGRATE: {float(\"$copy_rate\".replace(\",\", \"\")) / float(\"$migrate_rate\".replace(\",\", \"\")):.2f}')"
