# Sourced by the bench scripts: servers on free loopback ports, and stopping them at exit.
#
# Sets WORK (a temporary folder for configs and logs, removed at exit) and STARTED (the pids
# of what was started: at exit each gets SIGINT, then SIGKILL, and only those). Functions:
#   free_port                 prints a free loopback port
#   await_port PORT           waits (at most 10 s) until something accepts on PORT
#   start_redis               a redis-server; sets REDIS_PORT
#   start_twemproxy           twemproxy (nutcracker) in front of it; sets PROXY_PORT, PROXY_PID
#   start_pair BIN [FLAGS]    two workers and an orchestrator (with FLAGS) from BIN; sets
#                             ORCH_PORT, ORCH_PID (WORKER_FLAGS: extra worker flags)
#   in_turn ROUND NAME...     the names, one a line, reversed on even rounds: targets
#                             measured in turn, so the machine's drift favours none
#   need TOOL...              exits (2) naming a missing tool and how to get it: its Debian
#                             package, or `cargo build --release` for a binary path
# Debian installs nutcracker in /usr/sbin, which a user's PATH may lack.
PATH=$PATH:/usr/sbin
need() {
  local tool package
  for tool in "$@"; do
    command -v "$tool" >/dev/null && continue
    case $tool in
      */*) echo "$0: no $tool (cargo build --release first)" >&2 ;;
      *)
        case $tool in redis-benchmark | redis-cli) package=redis-tools ;; *) package=$tool ;; esac
        echo "$0 needs $tool: apt-get install -y $package" >&2
        ;;
    esac
    exit 2
  done
}
WORK=$(mktemp -d)
STARTED=()
stop_started() {
  for pid in "${STARTED[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  sleep 0.2
  for pid in "${STARTED[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap stop_started EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
await_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1 after 10 s; logs in $WORK" >&2
  exit 1
}

start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
  STARTED+=($!)
  await_port "$REDIS_PORT"
}

start_twemproxy() {
  PROXY_PORT=$(free_port)
  local stats_port
  stats_port=$(free_port)
  cat >"$WORK/twemproxy.yml" <<YML
pool:
  listen: 127.0.0.1:$PROXY_PORT
  redis: true
  hash: fnv1a_64
  distribution: ketama
  preconnect: true
  server_connections: 1
  servers:
    - 127.0.0.1:$REDIS_PORT:1 redis
YML
  nutcracker -c "$WORK/twemproxy.yml" -s "$stats_port" -a 127.0.0.1 -o "$WORK/twemproxy.log" &
  PROXY_PID=$!
  STARTED+=($PROXY_PID)
  await_port "$PROXY_PORT"
}

start_pair() {
  local bin=$1 w1 w2 port
  shift
  w1=$(free_port)
  w2=$(free_port)
  ORCH_PORT=$(free_port)
  for port in "$w1" "$w2"; do
    # shellcheck disable=SC2086 # a list of flags
    "$bin/worker" ${WORKER_FLAGS:-} --port "$port" >"$WORK/worker-$port.log" 2>&1 &
    STARTED+=($!)
    await_port "$port"
  done
  "$bin/orchestrator" "$@" --listen "127.0.0.1:$ORCH_PORT" "127.0.0.1:$w1" "127.0.0.1:$w2" \
    >"$WORK/orchestrator.log" 2>&1 &
  ORCH_PID=$!
  STARTED+=($ORCH_PID)
  await_port "$ORCH_PORT"
  sleep 1 # the orchestrator serves once it has seen the workers
}

in_turn() {
  local round=$1
  shift
  if [ $((round % 2)) = 1 ]; then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}
