#!/usr/bin/env bash
# Builds the toxiproxy server (a Go module) into the cache outside the
# repository and prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/../go-tool.sh" "$here" toxiproxy-server github.com/Shopify/toxiproxy/v2/cmd/server
