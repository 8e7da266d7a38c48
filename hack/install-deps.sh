#!/usr/bin/env bash
# Installs what a fresh machine lacks for building and testing: Debian
# packages (openssh-server for test hosts, …), the Rust lint components, and,
# cached outside the repository: the Go-built control plane
# (kube-apiserver, kube-controller-manager, kubectl, etcd), kstatus, toxiproxy, helm and kube-score, and
# moto server in a Python virtualenv.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

need_apt=()
for cmd_pkg in openssl:openssl curl:curl python3:python3 git:git sshd:openssh-server ssh-keygen:openssh-client setsid:util-linux nsenter:util-linux nix-store:nix-bin zstd:zstd sudo:sudo lua5.4:lua5.4; do
  command -v "${cmd_pkg%%:*}" >/dev/null || need_apt+=("${cmd_pkg#*:}")
done
[[ -e /etc/ssl/certs/ca-certificates.crt ]] || need_apt+=(ca-certificates)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if (( ${#need_apt[@]} )); then
  echo "install-deps: apt-get install ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${need_apt[@]}"
fi

# Nix creates the host store's database on first use, and parallel first
# uses (the tests build closures concurrently) race to create it: "SQLite
# database '/nix/var/nix/db/db.sqlite' is busy". Create it once, here.
if [[ ! -e /nix/var/nix/db/db.sqlite ]]; then
  nix-store --init
fi

command -v cargo >/dev/null || { echo "install-deps: Rust (cargo) is required" >&2; exit 1; }
command -v go >/dev/null || { echo "install-deps: Go is required to build the test control plane" >&2; exit 1; }
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >&2 || true
fi

"$root/hack/controlplane/build.sh" >/dev/null
"$root/hack/kstatus/build.sh" >/dev/null
"$root/hack/moto/install.sh" >/dev/null
"$root/hack/toxiproxy/build.sh" >/dev/null
"$root/hack/helm/build.sh" >/dev/null
"$root/hack/kube-score/build.sh" >/dev/null
"$root/hack/wireguard/build.sh" >/dev/null
"$root/hack/libvirt/install.sh" >/dev/null
"$root/hack/image/install.sh" >/dev/null
