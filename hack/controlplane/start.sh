#!/usr/bin/env bash
# Starts etcd and kube-apiserver on free loopback ports, with TLS and an admin
# token, in the background. Used by the tests (tests/support) and by
# `make dev-cluster`, so both run the very same control plane.
#
#   start.sh DIR [--watch-pid PID]
#
# DIR receives the certificates, etcd's data, logs and DIR/kubeconfig (user
# "admin", group system:masters). With --watch-pid, both processes are
# stopped and DIR removed as soon as process PID exits, however it exits
# (end of tests, a panic, kill -9). Without it they run until
# `stop.sh DIR`. Returns once the API server answers /readyz.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:?usage: start.sh DIR [--watch-pid PID]}
watch_pid=
if [[ ${2:-} == --watch-pid ]]; then watch_pid=${3:?--watch-pid needs a PID}; fi

bin=$("$here/build.sh" | tail -n1)
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
certs="$dir/certs"
mkdir -p "$certs"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# --- credentials -----------------------------------------------------------
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
  -subj "/CN=nixops-operator test CA" -keyout "$certs/ca.key" -out "$certs/ca.crt"
openssl_quiet req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=kube-apiserver" -keyout "$certs/apiserver.key" -out "$certs/apiserver.csr"
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > "$certs/apiserver.ext"
openssl_quiet x509 -req -in "$certs/apiserver.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" \
  -CAcreateserial -days 3650 -extfile "$certs/apiserver.ext" -out "$certs/apiserver.crt"
openssl_quiet genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$certs/sa.key"
openssl_quiet pkey -in "$certs/sa.key" -pubout -out "$certs/sa.pub"
token=$(openssl rand -hex 32)
printf '%s,admin,admin,"system:masters"\n' "$token" > "$certs/tokens.csv"
chmod 600 "$certs"/*.key "$certs/tokens.csv"

# A start that fails half-way leaves nothing running.
trap 'status=$?; if (( status != 0 )); then "$here/stop.sh" "$dir"; fi' EXIT

# --- etcd ------------------------------------------------------------------
etcd_client_port=$(free_port)
etcd_peer_port=$(free_port)
setsid "$bin/etcd" \
  --name=default \
  --data-dir="$dir/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_client_port" \
  --advertise-client-urls="http://127.0.0.1:$etcd_client_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster="default=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync \
  >"$dir/etcd.log" 2>&1 </dev/null &
echo $! > "$dir/etcd.pid"

# --- kube-apiserver --------------------------------------------------------
port=$(free_port)
setsid "$bin/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_client_port" \
  --cert-dir="$certs" \
  --tls-cert-file="$certs/apiserver.crt" \
  --tls-private-key-file="$certs/apiserver.key" \
  --client-ca-file="$certs/ca.crt" \
  --secure-port="$port" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --endpoint-reconciler-type=none \
  --authorization-mode=RBAC \
  --token-auth-file="$certs/tokens.csv" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$certs/sa.pub" \
  --service-account-signing-key-file="$certs/sa.key" \
  --service-cluster-ip-range=10.96.0.0/24 \
  --allow-privileged=true \
  --enable-priority-and-fairness=false \
  >"$dir/kube-apiserver.log" 2>&1 </dev/null &
echo $! > "$dir/kube-apiserver.pid"

cat > "$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: nixops-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority: $certs/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: nixops-test
  context: {cluster: nixops-test, user: admin, namespace: default}
current-context: nixops-test
KUBECONFIG
chmod 600 "$dir/kubeconfig"
ln -sf "$bin/kubectl" "$dir/kubectl"

if [[ -n $watch_pid ]]; then
  # Detached watchdog: the control plane lives exactly as long as PID.
  setsid bash -c '
    while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
    "$2/stop.sh" "$3"
    rm -rf "$3"
  ' watchdog "$watch_pid" "$here" "$dir" >/dev/null 2>&1 </dev/null &
fi

# --- wait for readiness ----------------------------------------------------
for _ in $(seq 1 1200); do
  if ! kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null; then
    echo "start.sh: kube-apiserver exited; last lines of $dir/kube-apiserver.log:" >&2
    tail -n 30 "$dir/kube-apiserver.log" >&2
    exit 1
  fi
  if "$bin/kubectl" --kubeconfig="$dir/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
    echo "$dir/kubeconfig"
    exit 0
  fi
  sleep 0.1
done
echo "start.sh: kube-apiserver not ready after 120 s; see $dir/kube-apiserver.log" >&2
exit 1
