#!/usr/bin/env bash
# Builds a command from a Go module pinned by DIR/go.mod (and DIR/go.sum)
# into the cache outside the repository, keyed by those files, and prints
# the binary's path. Used by hack/*/build.sh.
#
#   go-tool.sh DIR NAME PACKAGE
set -euo pipefail
here=${1:?usage: go-tool.sh DIR NAME PACKAGE}
name=${2:?usage: go-tool.sh DIR NAME PACKAGE}
package=${3:?usage: go-tool.sh DIR NAME PACKAGE}
cache=${NIXOPS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nixops-operator}
key=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
bin="$cache/$name-$key/$name"
if [[ ! -x $bin ]]; then
  mkdir -p "$(dirname "$bin")"
  (cd "$here" && go build -trimpath -o "$bin.tmp" "$package")
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
