#!/usr/bin/env bash
# Starts kube-controller-manager, running only the namespace controller,
# against a control plane started by start.sh DIR. Without it nothing empties
# a deleted namespace: `kubectl delete namespace` would leave its objects
# (and the namespace, Terminating) in place for ever. Tests that delete
# namespaces start it; the rest do without (it costs a process and a watch).
#
#   controller-manager.sh DIR
#
# Stopped by stop.sh DIR (and so by start.sh's --watch-pid watchdog). Returns
# once the namespace controller has started.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:?usage: controller-manager.sh DIR}
dir=$(cd "$dir" && pwd)
bin=$("$here/build.sh" | tail -n1)

# --secure-port=0: no HTTPS endpoint, so no port to collide with another
# test binary's controller manager.
setsid "$bin/kube-controller-manager" \
  --kubeconfig="$dir/kubeconfig" \
  --controllers=namespace \
  --leader-elect=false \
  --secure-port=0 \
  --namespace-sync-period=10s \
  --v=2 \
  >"$dir/kube-controller-manager.log" 2>&1 </dev/null &
echo $! > "$dir/kube-controller-manager.pid"

for _ in $(seq 1 600); do
  if ! kill -0 "$(cat "$dir/kube-controller-manager.pid")" 2>/dev/null; then
    echo "controller-manager.sh: kube-controller-manager exited; last lines of $dir/kube-controller-manager.log:" >&2
    tail -n 30 "$dir/kube-controller-manager.log" >&2
    exit 1
  fi
  if grep -q 'Starting namespace controller' "$dir/kube-controller-manager.log"; then
    exit 0
  fi
  sleep 0.1
done
echo "controller-manager.sh: the namespace controller did not start within 60 s; see $dir/kube-controller-manager.log" >&2
exit 1
