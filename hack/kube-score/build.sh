#!/usr/bin/env bash
# Builds kube-score (a Go module) into the cache outside the repository and
# prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/../go-tool.sh" "$here" kube-score github.com/zegl/kube-score/cmd/kube-score
