#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kube-controller-manager,
# kubectl, etcd) from Go modules and caches the binaries outside the
# repository, keyed by version, so a second run reuses them. Only missing
# binaries are built, so a cache made before a binary was added here is
# completed, not rebuilt. Prints the directory holding the binaries as its
# last line.
#
# The versions are pinned by the wrapper modules next to this script:
#   kube/go.mod  k8s.io/kubernetes (staging modules replaced by their releases)
#   etcd/go.mod  go.etcd.io/etcd/server/v3
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NIXOPS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nixops-operator}

k8s_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/kube/go.mod")
etcd_version=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$here/etcd/go.mod")
bin="$cache/controlplane/kubernetes-$k8s_version-etcd-$etcd_version"

kube_commands=(kube-apiserver kube-controller-manager kubectl)
missing=()
for name in "${kube_commands[@]}" etcd; do
  [[ -x "$bin/$name" ]] || missing+=("$name")
done
if (( ${#missing[@]} == 0 )); then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is required to build the control plane" >&2; exit 1; }

staging=$(mktemp -d "$cache/controlplane/.build.XXXXXX" 2>/dev/null || { mkdir -p "$cache/controlplane"; mktemp -d "$cache/controlplane/.build.XXXXXX"; })
trap 'rm -rf "$staging"' EXIT

minor=${k8s_version#v1.}; minor=${minor%%.*}
version_flags="-X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version \
 -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

echo "build.sh: building ${missing[*]} (kubernetes $k8s_version, etcd $etcd_version; several minutes the first time)" >&2
for name in "${missing[@]}"; do
  if [[ $name == etcd ]]; then
    (cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$staging/etcd" go.etcd.io/etcd/server/v3)
  else
    (cd "$here/kube" && go build -trimpath -ldflags "-s -w $version_flags" -o "$staging/$name" "k8s.io/kubernetes/cmd/$name")
  fi
done

# Each binary is published by a rename once built, so a build interrupted
# half-way is never reused and a control plane running from this directory
# (other checkouts share the cache) never sees a binary missing.
mkdir -p "$bin"
for name in "${missing[@]}"; do
  mv -f "$staging/$name" "$bin/$name"
done
rm -rf "$staging"
trap - EXIT
echo "$bin"
