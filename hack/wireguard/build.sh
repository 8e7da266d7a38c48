#!/usr/bin/env bash
# Builds wireguard-go (a Go module; the userspace WireGuard the mesh tests'
# nodes run, since this kernel has no WireGuard module) into the cache
# outside the repository, and installs Debian's wireguard-tools (`wg`) and
# tcpdump (the tests' packet capture) when missing. Prints wireguard-go's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
need=()
command -v wg >/dev/null || need+=(wireguard-tools)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
if (( ${#need[@]} )); then
  echo "wireguard: apt-get install ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Another installer may hold the lock for a while.
  for _ in $(seq 30); do
    if apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 2>/dev/null; then need=(); break; fi
    apt-get update -qq >&2 2>/dev/null || true
    sleep 5
  done
  if (( ${#need[@]} )); then apt-get install -y -qq --no-install-recommends "${need[@]}" >&2; fi
fi
exec "$here/../go-tool.sh" "$here" wireguard-go golang.zx2c4.com/wireguard
