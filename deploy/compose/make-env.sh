#!/bin/sh
# Writes .env beside compose.yaml with a random password per NATS role and
# Redis user (hex: safe inside redis:// URLs) and the gateway's API key with
# its hash. Keeps an existing .env.
set -eu
cd "$(dirname "$0")"
if [ -e .env ]; then
    echo ".env exists; remove it to make new passwords" >&2
    exit 0
fi
umask 077
for name in JETSOURCE_CLIENT_PASSWORD JETSOURCE_COMMAND_PASSWORD \
    JETSOURCE_PROJECTOR_PASSWORD JETSOURCE_SNAPSHOTTER_PASSWORD \
    JETSOURCE_ADMIN_PASSWORD JETSOURCE_GATEWAY_PASSWORD JETSOURCE_PROCESS_PASSWORD REDIS_PROJECTOR_PASSWORD \
    REDIS_QUERY_PASSWORD; do
    echo "$name=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
done > .env
# The gateway's API key for you, and its hash for the gateway.
key="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
echo "GATEWAY_WRITE_KEY=$key" >> .env
echo "GATEWAY_WRITE_KEY_SHA256=$(printf %s "$key" | sha256sum | cut -d' ' -f1)" >> .env
echo "wrote $(pwd)/.env"
