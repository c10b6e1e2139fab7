#!/usr/bin/env bash
# `make run`: a single-node nats-server and the jetsource workers in the
# foreground. Ctrl-C stops everything this script started (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
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

for port in 4222 6379; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use: stop the other nats-server or redis-server first" >&2
    exit 1
  fi
done
# Process substitution, not a pipe, so that $! is nats-server's own PID.
tools/bin/nats-server -c nats/dev.conf > >(sed -u 's/^/[nats] /' >&2) 2>&1 &
pids+=($!)
wait_port 4222

# Read models live in memory only: if Redis restarts empty, the projector
# notices and rebuilds them from the event stream.
redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  > >(sed -u 's/^/[redis] /' >&2) 2>&1 &
pids+=($!)
wait_port 6379

export JETSOURCE__NATS__URL="nats://127.0.0.1:4222"
export JETSOURCE__REDIS__URL="redis://127.0.0.1:6379/"
"$bin/jetsource-command" &
pids+=($!)
"$bin/jetsource-projector" &
pids+=($!)
"$bin/jetsource-snapshotter" &
pids+=($!)

cat >&2 <<'MSG'

jetsource is running: nats on 127.0.0.1:4222 (monitoring http://127.0.0.1:8222),
redis on 127.0.0.1:6379, jetsource-command, -projector and -snapshotter.
Try, in another terminal:
  target/debug/jetsource send account acc-1 OpenAccount '{"owner":"ada"}'
  target/debug/jetsource send account acc-1 Deposit '{"amount":100}'
  target/debug/jetsource history account acc-1
  target/debug/jetsource query account acc-1
  target/debug/jetsource projection status
  target/debug/jetsource snapshot status
Ctrl-C stops everything.

MSG
# Exit (and stop the rest) as soon as any process ends.
wait -n "${pids[@]}"
