#!/usr/bin/env bash
# Memory per idle client connection: the orchestrator against twemproxy, in one run.
#
#   bench/idle-connections.sh
#
# Starts a redis-server with a twemproxy (nutcracker) in front of it, and one pair of workers
# with an orchestrator in front of them (target/release, built first with
# `cargo build --release`), all on free loopback ports. Against each proxy in turn it opens N
# client connections that send nothing, waits until the proxy's resident memory settles, and
# reports the growth per connection; then every connection sends one GET of a missing key,
# reads its answer and goes idle again, and the growth is reported again. All connections
# are closed before the next proxy is measured. Stops what it started, and only that.
#
# Needs: apt-get install -y redis-server nutcracker python3; raises `ulimit -n` itself
# (to N + 1000: as root, or under a hard limit at least that high).
# Env: N (10000) connections; ORCH_FLAGS (none), extra orchestrator flags; BIN
#      (target/release), where the worker and orchestrator binaries are.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
N=${N:-10000}
ORCH_FLAGS=${ORCH_FLAGS:-}
BIN=${BIN:-target/release}
# shellcheck source=bench/servers.sh
. bench/servers.sh
need redis-server nutcracker python3 "$BIN/worker" "$BIN/orchestrator"
# Each process holds one end of every connection: N descriptors and a few.
ulimit -n $((N + 1000))
start_redis
start_twemproxy
# shellcheck disable=SC2086 # a list of flags
start_pair "$BIN" --max-clients $((N + 100)) $ORCH_FLAGS

python3 - "$N" twemproxy "$PROXY_PID" "$PROXY_PORT" orchestrator "$ORCH_PID" "$ORCH_PORT" <<'PY'
import socket, sys, time

n = int(sys.argv[1])
targets = [(sys.argv[i], int(sys.argv[i + 1]), int(sys.argv[i + 2])) for i in range(2, len(sys.argv), 3)]

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no process {pid}")

def settled(pid):
    """Resident memory once it has stopped moving for a second (at most 20 s)."""
    last, since = rss(pid), time.monotonic()
    deadline = since + 20
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
    return last

GET = b"*2\r\n$3\r\nGET\r\n$14\r\nidle:no-such-k\r\n"
rows = []
for name, pid, port in targets:
    # A warm-up connection: the first request's one-off allocations are not per connection.
    w = socket.create_connection(("127.0.0.1", port))
    w.sendall(GET)
    w.recv(64)
    w.close()
    before = settled(pid)
    socks = []
    for _ in range(n):
        socks.append(socket.create_connection(("127.0.0.1", port)))
    idle = settled(pid)
    for s in socks:
        s.sendall(GET)
    for s in socks:
        got = b""
        while not got.endswith(b"\r\n"):
            chunk = s.recv(64)
            if not chunk:
                raise SystemExit(f"{name} closed a connection")
            got += chunk
    used = settled(pid)
    for s in socks:
        s.close()
    rows.append((name, before, (idle - before) / n, (used - before) / n))
    time.sleep(1)

print(f"{n} connections; bytes of resident memory per connection")
print(f"{'proxy':<14} {'before (MiB)':>12} {'idle, never sent':>17} {'idle after one GET':>19}")
for name, before, idle, used in rows:
    print(f"{name:<14} {before / 2**20:>12.1f} {idle:>17,.0f} {used:>19,.0f}")
base = dict((r[0], r) for r in rows)
if "twemproxy" in base and "orchestrator" in base:
    t, o = base["twemproxy"], base["orchestrator"]
    print(f"orchestrator / twemproxy: {o[2] / t[2]:.2f} idle, {o[3] / t[3]:.2f} after one GET")
PY
