#!/usr/bin/env bash
# Stops a control plane started by start.sh DIR (the controller manager if
# controller-manager.sh started one, kube-apiserver, then etcd).
set -uo pipefail
dir=${1:?usage: stop.sh DIR}
for name in kube-controller-manager kube-apiserver etcd; do
  pidfile="$dir/$name.pid"
  [[ -f $pidfile ]] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
done
exit 0
