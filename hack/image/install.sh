#!/usr/bin/env bash
# Installs the Debian tools hack/image/build.sh and its test use: umoci
# (OCI image layouts, unpack and repack without a daemon), skopeo (to write
# a docker-archive that kind and k3d load) and runc (an OCI runtime, to run
# the image here; crun refuses hosts with hybrid cgroups). Idempotent.
set -euo pipefail
need=()
command -v umoci >/dev/null || need+=(umoci)
command -v runc >/dev/null || need+=(runc)
command -v skopeo >/dev/null || need+=(skopeo)
if (( ${#need[@]} )); then
  echo "hack/image/install.sh: apt-get install ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  for attempt in 1 2 3 4 5 6; do
    if apt-get install -y -qq "${need[@]}" >&2; then exit 0; fi
    # Another apt may hold the lock, or the lists may be stale.
    sleep 5
    apt-get update -qq >&2 || true
  done
  exit 1
fi
