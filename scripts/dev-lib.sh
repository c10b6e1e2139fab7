# Shared by run-dev.sh (`make run`) and run-cluster.sh (`make cluster`):
# process bookkeeping, waiting for ports, Redis and the workers. Sourced,
# not run; expects to be in the repository root.

mkdir -p .run
bin="target/debug"

# Which application to run: APP=bank (the default) or APP=shop. Its
# binaries are <prefix>-command, <prefix>-projector, <prefix>-snapshotter
# and the CLI <cli>. One NATS/Redis setup serves one application at a time
# (the event stream is shared; each app's projections read only its own
# aggregate types).
app="${APP:-bank}"
case "$app" in
  bank) prefix="jetsource" cli="jetsource" ;;
  shop) prefix="shop" cli="shop" ;;
  *)
    echo "unknown APP=$app: use APP=bank (the default) or APP=shop" >&2
    exit 1
    ;;
esac
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

# The app's three workers, against JETSOURCE__NATS__URL and the local Redis.
start_workers() {
  export JETSOURCE__REDIS__URL="redis://127.0.0.1:6379/"
  local role
  for role in command projector snapshotter; do
    if [ ! -x "$bin/$prefix-$role" ]; then
      echo "$bin/$prefix-$role is not built: run \`cargo build --workspace --bins\`" >&2
      exit 1
    fi
  done
  "$bin/$prefix-command" &
  pids+=($!)
  "$bin/$prefix-projector" &
  pids+=($!)
  "$bin/$prefix-snapshotter" &
  pids+=($!)
}

# What to try in another terminal, for the app that runs.
print_examples() {
  case "$app" in
    bank)
      cat <<MSG
  $bin/$cli send account acc-1 OpenAccount '{"owner":"ada"}'
  $bin/$cli send account acc-1 Deposit '{"amount":100}'
  $bin/$cli history account acc-1
  $bin/$cli query account acc-1
MSG
      ;;
    shop)
      cat <<MSG
  $bin/$cli send item tea AddItem '{"name":"Green tea"}'
  $bin/$cli send item tea Restock '{"quantity":10}'
  $bin/$cli send order o-1 PlaceOrder '{"customer":"ada","lines":[{"sku":"tea","quantity":2,"price":150}]}'
  $bin/$cli send item tea Reserve '{"order":"o-1","quantity":2}'
  $bin/$cli send order o-1 Pay '{"amount":300}'
  $bin/$cli history order o-1
  $bin/$cli query order o-1
  $bin/$cli query orders.by_customer ada
  $bin/$cli query item tea
  $bin/$cli query items.low_stock
MSG
      ;;
  esac
  cat <<MSG
  $bin/$cli projection status
  $bin/$cli snapshot status
MSG
}
