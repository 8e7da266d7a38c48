#!/usr/bin/env bash
# Builds the operator's OCI image without a registry or a daemon, for
# machines that cannot pull the Dockerfile's base images: the binary, the
# shared libraries it links (as ldd resolves them, with the dynamic loader),
# Debian's CA certificates, an nsswitch.conf and passwd/group entries for
# the non-root user 65532 the chart runs as, assembled with umoci.
#
#   hack/image/build.sh                      # cargo build --release first
#   BINARY=target/debug/nixops-operator hack/image/build.sh
#
# Writes, under OUT (default target/image):
#   oci/                          the OCI image layout, tag $TAG
#   nixops-operator-$TAG.tar      a docker-archive named $IMAGE:$TAG, for
#                                 kind load image-archive / k3d image import
# and prints the layout's image reference (oci:DIR:TAG).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
tag=${TAG:-$version}
image=${IMAGE:-ghcr.io/nixops-operator/nixops-operator}
out=${OUT:-$root/target/image}
binary=${BINARY:-}
"$root/hack/image/install.sh"

if [[ -z $binary ]]; then
  (cd "$root" && cargo build --release --locked --bin nixops-operator >&2)
  binary=$root/target/release/nixops-operator
fi
[[ -x $binary ]] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
rootfs=$stage/rootfs
mkdir -p "$rootfs"/{usr/local/bin,etc/ssl/certs,tmp,home/nonroot}
chmod 1777 "$rootfs/tmp"
install -m 0755 "$binary" "$rootfs/usr/local/bin/nixops-operator"

# Every library the binary links, at the path the loader finds it, and the
# loader itself ("not a dynamic executable": nothing to copy).
libs=$(ldd "$binary" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
for lib in $libs; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"

rm -rf "$out/oci"
mkdir -p "$out"
umoci init --layout "$out/oci"
umoci new --image "$out/oci:$tag"
# An empty image unpacked, filled, and repacked as one layer.
umoci unpack --rootless --image "$out/oci:$tag" "$stage/bundle" >/dev/null
cp -a "$rootfs/." "$stage/bundle/rootfs/"
umoci repack --image "$out/oci:$tag" "$stage/bundle"
umoci config --image "$out/oci:$tag" \
  --author "nixops-operator hack/image/build.sh" \
  --config.user 65532:65532 \
  --config.workingdir / \
  --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --config.entrypoint /usr/local/bin/nixops-operator \
  --config.cmd run \
  --config.exposedports 8080/tcp \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.source=https://github.com/nixops-operator/nixops-operator"
umoci gc --layout "$out/oci"
rm -f "$out/nixops-operator-$tag.tar"
skopeo --insecure-policy copy --quiet "oci:$out/oci:$tag" "docker-archive:$out/nixops-operator-$tag.tar:$image:$tag"
echo "oci:$out/oci:$tag"
