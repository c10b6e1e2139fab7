#!/usr/bin/env bash
# Installs, with the system package manager, the packages whose command is
# missing. Arguments: <command>=<package> pairs, e.g. redis-server=redis-server
# openssl=openssl (make run generates its development certificates with
# openssl). A command with a slash is a path pattern instead, for programs a
# package keeps off PATH: '/usr/lib/postgresql/*/bin/initdb=postgresql'
# (quote it, so that the shell does not expand it first).
set -euo pipefail
missing=()
for pair in "$@"; do
  cmd="${pair%%=*}"
  if [[ "$cmd" == */* ]]; then
    found=$(compgen -G "$cmd" || true)
    [ -n "$found" ] || missing+=("${pair#*=}")
  else
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${pair#*=}")
  fi
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
