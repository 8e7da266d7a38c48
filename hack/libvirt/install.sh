#!/usr/bin/env bash
# Installs what the libvirt provider's tests need from Debian: libvirtd with
# its QEMU driver, QEMU itself, dnsmasq (libvirt networks' DHCP), iptables
# (libvirt's network firewall rules), the client library and headers the
# `virt` crate links against, and the tools hack/libvirt/image.sh builds the
# test image with. Then builds (or finds cached) that image.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 qemu-utils dnsmasq-base iptables
  mmdebstrap e2fsprogs busybox-static cpio kmod zstd)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "libvirt/install: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Another apt-get may hold the lock for a while; wait for it.
  for _ in $(seq 60); do
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" && break
    sleep 5
  done
  for p in "${missing[@]}"; do dpkg-query -W "$p" >/dev/null; done
fi
"$here/image.sh"
