#!/usr/bin/env bash
# Builds hack/kstatus (sigs.k8s.io/cli-utils' kstatus as a command) into the
# cache outside the repository and prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NIXOPS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nixops-operator}
# Keyed by the sources, so an edit to main.go or go.mod rebuilds.
key=$(cat "$here/main.go" "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
bin="$cache/kstatus-$key/kstatus"
if [[ ! -x $bin ]]; then
  mkdir -p "$(dirname "$bin")"
  (cd "$here" && go build -trimpath -o "$bin.tmp" .)
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
