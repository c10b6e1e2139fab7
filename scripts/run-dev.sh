#!/usr/bin/env bash
# `make run`: a single-node nats-server and the workers of an application
# (APP=bank, the default, or APP=shop) in the foreground. Ctrl-C stops
# everything this script started (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/dev-lib.sh

ports_free 4222 6379 8080
# TLS and authorization on: development certificates in .run/tls, per-role
# settings in .run/<role>.env, the server's users in .run/nats-accounts.conf
# (dev-lib.sh).
ensure_certificates
ensure_credentials "tls://127.0.0.1:4222" 1
# Process substitution, not a pipe, so that $! is nats-server's own PID.
tools/bin/nats-server -c nats/dev.conf > >(sed -u 's/^/[nats] /' >&2) 2>&1 &
pids+=($!)
# Monitoring, not the TLS client port: a bare probe there logs a handshake error.
wait_healthy 8222

start_redis

start_workers

{
  cat <<MSG

$([ "$app" = bank ] && echo jetsource || echo "the $app") is running: nats on tls://127.0.0.1:4222 (monitoring http://127.0.0.1:8222),
redis on rediss://127.0.0.1:6379, $prefix-command, -projector, -snapshotter, -gateway (HTTP API and console on 127.0.0.1:8080) and -process (process managers).
TLS and authorization are on: a development CA in .run/tls, one NATS user per
role (client, command, projector, snapshotter, admin, gateway, process) with its settings in
.run/<role>.env (docs/SECURITY.md, docs/TLS.md).
Try, in another terminal:
MSG
  print_examples
  printf 'Ctrl-C stops everything.\n\n'
} >&2
# Exit (and stop the rest) as soon as any process ends.
wait -n "${pids[@]}"
