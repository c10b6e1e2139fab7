#!/usr/bin/env bash
# Installs redis-server from the system package manager when it is missing.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
echo "installing redis-server with apt"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y --no-install-recommends redis-server >/dev/null 2>&1 || {
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y --no-install-recommends redis-server >/dev/null
}
redis-server --version
