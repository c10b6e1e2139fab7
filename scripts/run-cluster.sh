#!/usr/bin/env bash
# `make cluster`: a local 3-node nats-server cluster (JetStream, replicas 3),
# redis-server and the workers of an application (APP=bank, the default, or
# APP=shop) in the foreground. Ctrl-C stops
# everything this script started (by PID). Stop a node to watch failover:
# `kill <pid of one nats-server>` (the PIDs are printed below).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/dev-lib.sh

ports_free 4222 4223 4224 6222 6223 6224 6379
# Authorization on: per-role passwords in .run/<role>.env, the servers'
# users in .run/nats-accounts.conf (dev-lib.sh).
ensure_credentials
# Process substitution, not a pipe, so that $! is nats-server's own PID.
for n in 1 2 3; do
  tools/bin/nats-server -c "nats/cluster/n$n.conf" > >(sed -u "s/^/[nats-n$n] /" >&2) 2>&1 &
  pids+=($!)
  echo "nats-server n$n: PID $!" >&2
done
for port in 4222 4223 4224; do wait_port "$port"; done
# The workers create replicated streams: wait until the cluster has elected
# its JetStream meta leader (every node's /healthz answers 200).
healthy() {
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  local status
  read -r _ status _ <&3 || true
  exec 3<&-
  [ "$status" = 200 ]
}
for _ in $(seq 1 300); do
  if healthy 8222 2>/dev/null && healthy 8223 2>/dev/null && healthy 8224 2>/dev/null; then break; fi
  sleep 0.1
done

start_redis

export JETSOURCE__NATS__URL="nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
export JETSOURCE__STORE__REPLICAS=3
start_workers

{
  cat <<MSG

$([ "$app" = bank ] && echo jetsource || echo "the $app") is running on a 3-node cluster: nats on 127.0.0.1:4222, 4223 and
4224 (monitoring http://127.0.0.1:8222 and up), streams with 3 replicas,
redis on 127.0.0.1:6379, $prefix-command, -projector and -snapshotter.
Authorization is on: one NATS user per role, passwords in .run/<role>.env
(client, command, projector, snapshotter, admin; docs/SECURITY.md).
Try, in another terminal (the CLI reaches any node with this):
  export JETSOURCE__NATS__URL=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
MSG
  print_examples
  cat <<'MSG'
Kill one nats-server (PIDs above) and commands keep working; start it again
with `tools/bin/nats-server -c nats/cluster/n<N>.conf`.
Ctrl-C stops everything.

MSG
} >&2
# Exit (and stop the rest) as soon as redis or a worker ends; a nats-server
# may die: that is what the cluster is for.
wait -n "${pids[@]:3}"
