#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kubectl, etcd) from Go modules
# and caches the binaries outside the repository, keyed by version, so a second
# run reuses them. Prints the directory holding the binaries as its last line.
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

if [[ -x "$bin/kube-apiserver" && -x "$bin/kubectl" && -x "$bin/etcd" ]]; then
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

echo "build.sh: building kube-apiserver and kubectl $k8s_version, etcd $etcd_version (several minutes the first time)" >&2
(
  cd "$here/kube"
  go build -trimpath -ldflags "-s -w $version_flags" -o "$staging/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  go build -trimpath -ldflags "-s -w $version_flags" -o "$staging/kubectl" k8s.io/kubernetes/cmd/kubectl
)
(
  cd "$here/etcd"
  go build -trimpath -ldflags "-s -w" -o "$staging/etcd" go.etcd.io/etcd/server/v3
)

# Publish all three at once so a build interrupted half-way is never reused.
rm -rf "$bin"
mv "$staging" "$bin"
trap - EXIT
echo "$bin"
