#!/usr/bin/env bash
# Builds the helm CLI (a Go module) into the cache outside the repository
# and prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/../go-tool.sh" "$here" helm helm.sh/helm/v3/cmd/helm
