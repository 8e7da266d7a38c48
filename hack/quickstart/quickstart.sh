#!/usr/bin/env bash
# `make quickstart` / `make quickstart-down`: a local control plane, a local
# NixOS-like node and the operator, with examples/quickstart/ applied and
# the demo system deployed. Running `up` again reuses what is running.
#
#   quickstart.sh up | down | redeploy MESSAGE | build MESSAGE
#
# `build` shows the other way in: it commits the demo system (as a flake)
# with MESSAGE to a Git repository under the state directory and points the
# Machine at that repository instead of a closure; the operator resolves
# main, builds the commit on the node itself over SSH and deploys it. Run
# it again with another message: the new commit is built and rolled out.
#
# The node is Debian's Nix + sshd in its own mount and pid namespaces, with
# a private /nix, /run and /root under the state directory, listening on
# 127.0.0.2:2222 (as examples/quickstart/machine.yaml says). Needs root (for
# the namespaces) and what hack/install-deps.sh installs.
#
# With QUICKSTART_PROVIDER=libvirt (`make quickstart PROVIDER=libvirt`) the
# machine is a real QEMU VM instead: libvirtd and virtlogd in their own
# namespaces (hack/libvirt/start.sh), the Debian image hack/libvirt/image.sh
# builds, a routed libvirt network, and the operator provisioning the VM.
#
# Environment: QUICKSTART_DIR (state, default .quickstart), QUICKSTART_PORT
# (the node's SSH port, default 2222), QUICKSTART_PROVIDER (node or libvirt,
# default node), NIXOPS_OPERATOR_BIN (an operator binary to use instead of
# building one).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${QUICKSTART_DIR:-$root/.quickstart}
port=${QUICKSTART_PORT:-2222}
host=127.0.0.2
ns=quickstart
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cluster="$dir/cluster"
node="$dir/node"
hv="$dir/hypervisor"
# The provider the running quickstart was started with wins.
provider=$(cat "$dir/provider" 2>/dev/null || echo "${QUICKSTART_PROVIDER:-node}")
case $provider in node | libvirt) ;; *) echo "QUICKSTART_PROVIDER must be node or libvirt" >&2; exit 2 ;; esac

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
k() { "$cluster/kubectl" --kubeconfig "$cluster/kubeconfig" "$@"; }

start_cluster() {
  if alive "$cluster/kube-apiserver.pid"; then
    say "control plane already running"
  else
    say "starting etcd and kube-apiserver (built from Go modules on first use)"
    rm -rf "$cluster"
    "$root/hack/controlplane/start.sh" "$cluster" >/dev/null
  fi
  k apply --server-side --force-conflicts -f "$root/crds/" >/dev/null
  k wait --for=condition=Established crd --all --timeout=60s >/dev/null
  k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
}

start_node() {
  if alive "$node/unshare.pid"; then
    say "node already running on $host:$port"
    return
  fi
  say "starting a NixOS-like node on $host:$port (own /nix, /run and /root)"
  rm -rf "$node"
  mkdir -p "$node/nix" "$node/root"
  ssh-keygen -q -t ed25519 -N '' -f "$node/ssh_host_ed25519_key"
  touch "$node/authorized_keys"
  cat > "$node/sshd_config" <<EOF
Port $port
ListenAddress $host
HostKey $node/ssh_host_ed25519_key
AuthorizedKeysFile $node/authorized_keys
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PidFile none
EOF
  cat > "$node/init.sh" <<EOF
mount --no-mtab --make-rprivate /
mount --no-mtab --bind $node/nix /nix
mount --no-mtab -t tmpfs tmpfs /run
mount --no-mtab --bind $node/root /root
mkdir -p /run/sshd
nix-store --init
exec /usr/sbin/sshd -D -f $node/sshd_config -E $node/sshd.log
EOF
  setsid unshare --mount --pid --fork --kill-child sh "$node/init.sh" </dev/null >"$node/node.log" 2>&1 &
  echo $! > "$node/unshare.pid"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return; fi
    sleep 0.1
  done
  cat "$node/node.log" "$node/sshd.log" >&2 || true
  echo "the node did not start" >&2
  exit 1
}

# Runs a command inside the node.
in_node() {
  local inner
  inner=$(pgrep -P "$(cat "$node/unshare.pid")" | head -n1)
  nsenter --target "$inner" --mount --pid -- sh -c "$1"
}

start_operator() {
  local bin=${NIXOPS_OPERATOR_BIN:-}
  if [[ -z $bin ]]; then
    say "building the operator"
    (cd "$root" && cargo build --quiet --locked --bin nixops-operator)
    bin="$root/target/debug/nixops-operator"
  fi
  if alive "$dir/operator.pid"; then
    kill "$(cat "$dir/operator.pid")" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$dir/operator.pid" || break; sleep 0.1; done
  fi
  say "starting the operator (log: $dir/operator.log)"
  KUBECONFIG="$cluster/kubeconfig" setsid "$bin" run --namespace "$ns" --metrics-addr 127.0.0.1:0 \
    --resync-seconds 30 </dev/null >"$dir/operator.log" 2>&1 &
  echo $! > "$dir/operator.pid"
}

# libvirtd and virtlogd for the libvirt quickstart, kept until `down`
# (a holder process stands for the quickstart's life in start.sh's watchdog).
start_hypervisor() {
  if alive "$dir/hypervisor-holder.pid"; then
    say "libvirtd already running"
    return
  fi
  say "building the VM image (Debian packages, on first use) and starting libvirtd"
  "$root/hack/libvirt/image.sh" >"$dir/image-dir"
  setsid sleep infinity </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/hypervisor-holder.pid"
  rm -rf "$hv"
  "$root/hack/libvirt/start.sh" "$hv" --watch-pid "$(cat "$dir/hypervisor-holder.pid")" >"$dir/hypervisor.env"
  # shellcheck disable=SC1091
  . "$dir/hypervisor.env"
  virsh -q -c "$URI" pool-define-as default dir --target "$POOL_DIR" >/dev/null
  virsh -q -c "$URI" pool-start default >/dev/null
}

apply_libvirt() {
  local closure=$1 image
  # shellcheck disable=SC1091
  . "$dir/hypervisor.env"
  image=$(cat "$dir/image-dir")
  say "applying a libvirt Network and a Machine (a QEMU VM) with the demo closure $closure"
  k -n "$ns" apply -f "$root/examples/quickstart/keypair.yaml" >/dev/null
  k -n "$ns" wait --for=condition=Ready keypair/deployer --timeout=60s >/dev/null
  k -n "$ns" apply -f - >/dev/null <<MANIFESTS
apiVersion: nixops.io/v1alpha1
kind: Network
metadata: {name: quickstart}
spec:
  provider:
    libvirt: {uri: "$URI", mode: route, cidr: "${CIDR%.0.0/16}.1.0/24", storagePool: default}
---
apiVersion: nixops.io/v1alpha1
kind: Machine
metadata: {name: demo}
spec:
  networkRef: {name: quickstart}
  provider:
    libvirt:
      vcpus: 1
      memoryMiB: 256
      diskSizeGiB: 4
      baseImage: $image/base.qcow2
      directKernelBoot: {kernel: $image/vmlinuz, initrd: $image/initrd.img, cmdline: "$(cat "$image/cmdline")"}
      domainType: qemu
  ssh: {keyPairRef: {name: deployer}}
  nixos: {closure: $closure, action: switch}
MANIFESTS
}

# Runs a command in the VM over SSH, pinning the host key the Machine's status records.
in_vm() {
  local tmp address
  tmp=$(mktemp -d)
  k -n "$ns" get secret "$(k -n "$ns" get keypair deployer -o jsonpath='{.spec.secretRef.name}')" \
    -o jsonpath='{.data.ssh-privatekey}' | base64 -d >"$tmp/id"
  chmod 600 "$tmp/id"
  address=$(k -n "$ns" get machine demo -o jsonpath='{.status.addresses[0].address}')
  echo "$address $(k -n "$ns" get machine demo -o jsonpath='{.status.hostKey}')" >"$tmp/known_hosts"
  ssh -i "$tmp/id" -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$tmp/known_hosts" \
    "root@$address" "$1"
  rm -rf "$tmp"
}

build_demo() {
  nix-build --no-out-link --option substituters '' "$root/hack/quickstart/demo.nix" \
    --argstr message "$1" 2>"$dir/nix-build.log" | tail -n1
}

apply_examples() {
  local closure=$1
  say "applying examples/quickstart/ with the demo closure $closure"
  k -n "$ns" apply -f "$root/examples/quickstart/network.yaml" -f "$root/examples/quickstart/keypair.yaml" >/dev/null
  k -n "$ns" wait --for=condition=Ready keypair/deployer --timeout=60s >/dev/null
  # Authorise the generated key on the node, as one would on a real host.
  k -n "$ns" get keypair deployer -o jsonpath='{.status.publicKey}' > "$node/authorized_keys"
  # After `build`, back to a pasted closure: both fields change in one write
  # (a Machine has exactly one of them), then apply owns the closure again.
  if [[ -n $(k -n "$ns" get machine demo -o jsonpath='{.spec.nixos.build}' --ignore-not-found) ]]; then
    k -n "$ns" patch machine demo --type merge -p "{\"spec\":{\"nixos\":{\"closure\":\"$closure\",\"build\":null}}}" >/dev/null
  fi
  sed -e "s|^    closure: /nix/store/.*|    closure: $closure|" -e "s|^      port: [0-9]*|      port: $port|" \
    "$root/examples/quickstart/machine.yaml" | k -n "$ns" apply -f - >/dev/null
}

wait_deployed() {
  local closure=$1
  say "waiting for the Machine to deploy"
  for _ in $(seq 1 180); do
    if [[ $(k -n "$ns" get machine demo -o jsonpath='{.status.closure}') == "$closure" ]] &&
      k -n "$ns" wait --for=condition=Ready machine/demo --timeout=1s >/dev/null 2>&1; then
      return
    fi
    sleep 1
  done
  k -n "$ns" describe machine demo >&2
  tail -n 30 "$dir/operator.log" >&2
  echo "the Machine did not become Ready" >&2
  exit 1
}

show() {
  echo
  k -n "$ns" get nixops
  echo
  k -n "$ns" get machines -o wide
  echo
  if [[ $provider == libvirt ]]; then
    echo "In the VM, /run/current-system -> $(in_vm 'readlink /run/current-system')"
    echo "and /run/motd says: $(in_vm 'cat /run/motd')"
    return
  fi
  echo "On the node, /run/current-system -> $(in_node 'readlink /run/current-system')"
  echo "and /run/motd says: $(in_node 'cat /run/motd')"
}

# Commits the demo system, with message $1, as a flake to $dir/repo.
commit_demo() {
  local repo="$dir/repo"
  if [[ ! -d $repo/.git ]]; then
    git init -q -b main "$repo"
    cp "$root/hack/quickstart/demo.nix" "$repo/demo.nix"
    cat > "$repo/flake.nix" <<'EOF'
{
  outputs = { self }: {
    nixosConfigurations.demo.config.system.build.toplevel =
      import ./demo.nix { message = builtins.readFile ./message; };
  };
}
EOF
  fi
  printf '%s' "$1" > "$repo/message"
  git -C "$repo" add -A
  git -C "$repo" -c user.name=quickstart -c user.email=quickstart@localhost -c commit.gpgsign=false \
    commit -q --allow-empty -m "demo: $1"
  git -C "$repo" rev-parse HEAD
}

wait_built() {
  local rev=$1 closure=
  say "waiting for the node to build $rev"
  for _ in $(seq 1 180); do
    if [[ $(k -n "$ns" get machine demo -o jsonpath='{.status.build.rev} {.status.build.result}') == "$rev Succeeded" ]]; then
      closure=$(k -n "$ns" get machine demo -o jsonpath='{.status.build.closure}')
      break
    fi
    sleep 1
  done
  if [[ -z $closure ]]; then
    k -n "$ns" describe machine demo >&2
    echo "the node did not build $rev" >&2
    exit 1
  fi
  wait_deployed "$closure"
}

case ${1:-up} in
  up)
    echo "$provider" >"$dir/provider"
    start_cluster
    if [[ $provider == libvirt ]]; then start_hypervisor; else start_node; fi
    start_operator
    closure=$(build_demo "hello from nixops-operator")
    if [[ $provider == libvirt ]]; then apply_libvirt "$closure"; else apply_examples "$closure"; fi
    wait_deployed "$closure"
    show
    cat <<EOF

The demo Machine is deployed. Next:
  export KUBECONFIG=$cluster/kubeconfig PATH=$cluster:\$PATH
  kubectl -n $ns describe machine demo        # conditions and events
  make quickstart-redeploy MESSAGE='hello again'   # build a changed system and watch it roll out
  make quickstart-build MESSAGE='hello from git'   # let the operator build it from a Git commit instead
  kubectl -n $ns get machines -w
  make quickstart-down                        # stop everything and remove $dir
EOF
    ;;
  redeploy)
    closure=$(build_demo "${2:?usage: quickstart.sh redeploy MESSAGE}")
    say "deploying $closure"
    k -n "$ns" patch machine demo --type merge -p "{\"spec\":{\"nixos\":{\"closure\":\"$closure\"}}}" >/dev/null
    wait_deployed "$closure"
    show
    ;;
  build)
    message=${2:?usage: quickstart.sh build MESSAGE}
    rev=$(commit_demo "$message")
    # The node builds offline: no substituters for its root.
    in_node 'mkdir -p /root/.config/nix && echo "substituters =" > /root/.config/nix/nix.conf'
    say "building commit $rev of $dir/repo on the node"
    k -n "$ns" patch machine demo --type merge -p "{\"spec\":{\"nixos\":{\"closure\":null,
      \"build\":{\"git\":{\"url\":\"file://$dir/repo\",\"ref\":\"main\"},\"buildOn\":\"Target\"}}}}" >/dev/null
    wait_built "$rev"
    show
    ;;
  down)
    if alive "$dir/operator.pid"; then kill "$(cat "$dir/operator.pid")" 2>/dev/null || true; fi
    # unshare ignores SIGTERM while it waits; SIGKILL makes it kill the node (--kill-child).
    if alive "$node/unshare.pid"; then kill -KILL "$(cat "$node/unshare.pid")" 2>/dev/null || true; fi
    # The hypervisor's watchdog stops libvirtd and every VM once its holder is gone.
    if alive "$dir/hypervisor-holder.pid"; then kill "$(cat "$dir/hypervisor-holder.pid")" 2>/dev/null || true; fi
    [[ -d $cluster ]] && "$root/hack/controlplane/stop.sh" "$cluster"
    rm -rf "$dir"
    say "quickstart stopped"
    ;;
  *)
    echo "usage: quickstart.sh up | down | redeploy MESSAGE | build MESSAGE" >&2
    exit 2
    ;;
esac
