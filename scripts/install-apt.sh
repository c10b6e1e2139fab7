#!/usr/bin/env bash
# Installs, with the system package manager, the packages whose command is
# missing. Arguments: <command>=<package> pairs, e.g. redis-server=redis-server
# openssl=openssl (make run generates its development certificates with
# openssl).
set -euo pipefail
missing=()
for pair in "$@"; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
echo "installing ${missing[*]} with apt"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
}
