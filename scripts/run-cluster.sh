#!/usr/bin/env bash
# `make cluster`: a local 3-node nats-server cluster (JetStream, replicas 3),
# redis-server and the workers of an application (APP=bank, the default, or
# APP=shop) in the foreground. Ctrl-C stops
# everything this script started (by PID). Stop a node to watch failover:
# `kill <pid of one nats-server>` (the PIDs are printed below).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/dev-lib.sh

ports_free 4222 4223 4224 6222 6223 6224 6379 8080
# TLS and authorization on: development certificates in .run/tls, per-role
# settings in .run/<role>.env, the servers' users in .run/nats-accounts.conf
# (dev-lib.sh).
ensure_certificates
ensure_credentials "tls://127.0.0.1:4222,tls://127.0.0.1:4223,tls://127.0.0.1:4224" 3
# Process substitution, not a pipe, so that $! is nats-server's own PID.
for n in 1 2 3; do
  tools/bin/nats-server -c "nats/cluster/n$n.conf" > >(sed -u "s/^/[nats-n$n] /" >&2) 2>&1 &
  pids+=($!)
  echo "nats-server n$n: PID $!" >&2
done
# The workers create replicated streams: wait until the cluster has elected
# its JetStream meta leader (every node's /healthz answers 200). Probing
# the client ports instead would log a TLS handshake error per probe.
wait_healthy 8222 8223 8224

start_redis

start_workers

{
  cat <<MSG

$([ "$app" = bank ] && echo jetsource || echo "the $app") is running on a 3-node cluster: nats on 127.0.0.1:4222, 4223 and
4224 (monitoring http://127.0.0.1:8222 and up), streams with 3 replicas,
redis on rediss://127.0.0.1:6379, $prefix-command, -projector, -snapshotter, -gateway (HTTP API and console on 127.0.0.1:8080) and -process (process managers).
TLS (clients and routes) and authorization are on: a development CA in
.run/tls, one NATS user per role (client, command, projector, snapshotter,
admin) with its settings, all three nodes' URLs among them, in
.run/<role>.env (docs/SECURITY.md, docs/TLS.md).
Try, in another terminal:
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
