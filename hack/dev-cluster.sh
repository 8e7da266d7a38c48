#!/usr/bin/env bash
# `make dev-cluster` / `make dev-cluster-down`: the tests' control plane,
# kept running in the background under .dev-cluster/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir="$root/.dev-cluster"

case ${1:-up} in
  up)
    if [[ -f $dir/kube-apiserver.pid ]] && kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null; then
      echo "dev cluster already running" >&2
    else
      rm -rf "$dir"
      "$root/hack/controlplane/start.sh" "$dir" >/dev/null
      # So that deleting a namespace empties it, as in a real cluster.
      "$root/hack/controlplane/controller-manager.sh" "$dir"
      echo "dev cluster started; logs in $dir/*.log" >&2
    fi
    echo "# run this to use it (kubectl is in .dev-cluster/):"
    echo "export KUBECONFIG=$dir/kubeconfig PATH=$dir:\$PATH"
    ;;
  down)
    "$root/hack/controlplane/stop.sh" "$dir"
    rm -rf "$dir"
    echo "dev cluster stopped" >&2
    ;;
  *)
    echo "usage: dev-cluster.sh up|down" >&2
    exit 2
    ;;
esac
