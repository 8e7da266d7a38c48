#!/usr/bin/env bash
# Builds the toxiproxy server (a Go module) into the cache outside the
# repository and prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NIXOPS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nixops-operator}
key=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
bin="$cache/toxiproxy-$key/toxiproxy-server"
if [[ ! -x $bin ]]; then
  mkdir -p "$(dirname "$bin")"
  (cd "$here" && go build -trimpath -o "$bin.tmp" github.com/Shopify/toxiproxy/v2/cmd/server)
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
