#!/usr/bin/env bash
# Installs moto server (the AWS EC2 and S3 API endpoint the tests use) into
# a virtualenv in the cache outside the repository; prints its bin directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NIXOPS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nixops-operator}
key=$(sha256sum "$here/requirements.txt" | cut -c1-16)
venv="$cache/moto-$key"
if [[ ! -x $venv/bin/moto_server ]]; then
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  rm -rf "$venv"
  mv "$venv.tmp" "$venv"
  # venv scripts carry absolute shebangs; rewrite them for the final path.
  grep -rl "$venv.tmp" "$venv/bin" | xargs -r sed -i "s|$venv.tmp|$venv|g"
fi
echo "$venv/bin"
