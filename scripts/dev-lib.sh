# Shared by run-dev.sh (`make run`) and run-cluster.sh (`make cluster`):
# process bookkeeping, waiting for ports, Redis and the workers. Sourced,
# not run; expects to be in the repository root.

mkdir -p .run
bin="target/debug"
pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping (${pids[*]:-})" >&2
  # Newest first: the workers finish with NATS and Redis still up, then
  # the servers stop.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1 after 10 s" >&2
  return 1
}

# Refuses to start over servers that are already running.
ports_free() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port is already in use: stop the other nats-server or redis-server first" >&2
      exit 1
    fi
  done
}

# Read models live in memory only: if Redis restarts empty, the projector
# notices and rebuilds them from the event stream.
start_redis() {
  redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    > >(sed -u 's/^/[redis] /' >&2) 2>&1 &
  pids+=($!)
  wait_port 6379
}

# The three workers, against JETSOURCE__NATS__URL and the local Redis.
start_workers() {
  export JETSOURCE__REDIS__URL="redis://127.0.0.1:6379/"
  "$bin/jetsource-command" &
  pids+=($!)
  "$bin/jetsource-projector" &
  pids+=($!)
  "$bin/jetsource-snapshotter" &
  pids+=($!)
}
