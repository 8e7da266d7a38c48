#!/usr/bin/env bash
# Builds the libvirt provider's test VM image from Debian packages, cached
# outside the repository; prints the directory holding it:
#
#   base.qcow2   root file system (ext4 on the whole disk, no partitions):
#                Debian with sshd, Nix (Debian's nix-bin, root uses the store
#                directly), zstd, jq, busybox as init and DHCP client, and
#                the QEMU guest agent on its virtio-serial port
#   vmlinuz      Debian's kernel, booted directly by QEMU (no boot loader)
#   initrd.img   a small initramfs: busybox, the virtio/ext4/vfat modules,
#                mounts /dev/vda and switches to it
#   cmdline      the kernel command line to boot with
#
# At boot the image reads a NoCloud seed (a vfat or iso9660 file system
# labelled cidata: meta-data, and user-data as `#cloud-config` followed by
# JSON, which is YAML too) once per instance-id: root's authorized keys
# (ssh_authorized_keys), the SSH host key (ssh_keys.ed25519_private /
# ed25519_public) and the hostname. The operator generates the host key,
# so it knows the key before the first connection. The root file system is
# grown to the disk's size at every boot.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NIXOPS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nixops-operator}
suite=bookworm
kernel_pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)
[[ -n $kernel_pkg ]] || { echo "libvirt/image: cannot find the kernel package behind linux-image-amd64" >&2; exit 1; }
key=$( (cat "$here/image.sh"; echo "$kernel_pkg $suite") | sha256sum | cut -c1-16)
out="$cache/libvirt-image-$key"
if [[ -e $out/base.qcow2 ]]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d "$cache/libvirt-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "libvirt/image: building $out (kernel $kernel_pkg)" >&2

# The kernel and its modules, from the package without installing it.
(cd "$work" && apt-get download -q "$kernel_pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
kver=${kernel_pkg#linux-image-}
depmod -b "$work/kernel" "$kver"
mkdir -p "$work/out"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/out/vmlinuz"

# initramfs: load the modules the root disk, its file system, the seed's
# file systems and the network need, in dependency order; then mount the root.
initrd=$work/initrd
mkdir -p "$initrd/bin" "$initrd/modules"
cp /bin/busybox "$initrd/bin/busybox"
: >"$initrd/modules/order"
# button and evdev: the ACPI power button as an input device for acpid;
# virtio_console: the guest agent's virtio-serial port.
for mod in virtio_pci virtio_blk virtio_net virtio_console ext4 vfat isofs nls_cp437 nls_ascii nls_utf8 button evdev; do
  modprobe -d "$work/kernel" -S "$kver" --show-depends "$mod" | sed -n 's/^insmod \([^ ]*\).*/\1/p' |
    while read -r ko; do
      name=$(basename "$ko")
      grep -qx "$name" "$initrd/modules/order" && continue
      # Needs CPU features TCG may lack; crc32c_generic does the same.
      [[ $name == crc32c-intel.ko ]] && continue
      cp "$ko" "$initrd/modules/$name"
      echo "$name" >>"$initrd/modules/order"
    done
done
cat >"$initrd/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/modules/$m"; done </modules/order
root=/dev/vda
for arg in $(cat /proc/cmdline); do case $arg in root=/dev/*) root=${arg#root=} ;; esac; done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
  echo "initrd: cannot mount $root" >&2
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
chmod +x "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | zstd -q -19 >"$work/out/initrd.img")
echo "console=ttyS0 root=/dev/vda quiet" >"$work/out/cmdline"

# The root file system.
rootfs=$work/rootfs
customize=$work/customize.sh
cat >"$customize" <<'EOS'
#!/bin/sh
set -eu
r=$1
# Host keys come from the seed (or are generated at boot without one):
# never shared by every VM made from this image.
rm -f "$r"/etc/ssh/ssh_host_*
ln -sf /bin/busybox "$r/sbin/init"
mkdir -p "$r/usr/lib/nixops-image" "$r/var/lib/nixops-seed" "$r/root/.ssh" "$r/etc/nix"
chmod 700 "$r/root/.ssh"
printf 'sandbox = false\n' >"$r/etc/nix/nix.conf"
chroot "$r" nix-store --init
echo nixops-vm >"$r/etc/hostname"
cat >"$r/etc/inittab" <<'EOF'
::sysinit:/usr/lib/nixops-image/boot
::respawn:/usr/sbin/sshd -D -e
::respawn:/bin/busybox udhcpc -f -i eth0 -s /usr/lib/nixops-image/udhcpc
::respawn:/usr/lib/nixops-image/dhcp eth1
::respawn:/usr/lib/nixops-image/guest-agent
::respawn:/bin/busybox acpid -f -c /etc/acpi -l /dev/null
::ctrlaltdel:/bin/busybox reboot
::shutdown:/bin/busybox sync
::shutdown:/bin/busybox umount -a -r
EOF
cat >"$r/usr/lib/nixops-image/boot" <<'EOF'
#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
busybox mount -t devpts devpts /dev/pts
busybox mount -t tmpfs -o mode=0755 run /run
busybox mount -t tmpfs tmp /tmp
busybox mount -o remount,rw /
busybox ip link set lo up
busybox ip link set eth0 up
/usr/lib/nixops-image/seed
hostname -F /etc/hostname
resize2fs "$(awk '$2 == "/" {print $1}' /proc/mounts | tail -n1)" >/dev/null 2>&1 &
mkdir -p /run/sshd
[ -e /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
echo "nixops-image: up" >/dev/console
EOF
cat >"$r/usr/lib/nixops-image/seed" <<'EOF'
#!/bin/sh
# Applies a NoCloud seed once per instance-id.
dev=$(busybox findfs LABEL=CIDATA 2>/dev/null || busybox findfs LABEL=cidata 2>/dev/null) || exit 0
mkdir -p /run/seed
busybox mount -o ro "$dev" /run/seed || exit 0
trap 'busybox umount /run/seed' EXIT
id=$(sed -n 's/^instance-id: *//p' /run/seed/meta-data)
[ -n "$id" ] && [ "$id" = "$(cat /var/lib/nixops-seed/instance-id 2>/dev/null)" ] && exit 0
host=$(sed -n 's/^local-hostname: *//p' /run/seed/meta-data)
[ -n "$host" ] && echo "$host" >/etc/hostname
# user-data is "#cloud-config" and one line of JSON (which is YAML too).
config() { sed 1d /run/seed/user-data | jq -r "$1"; }
umask 077
config '.ssh_authorized_keys[]?' >/root/.ssh/authorized_keys
if [ -n "$(config '.ssh_keys.ed25519_private // empty')" ]; then
  rm -f /etc/ssh/ssh_host_*
  config '.ssh_keys.ed25519_private' >/etc/ssh/ssh_host_ed25519_key
  config '.ssh_keys.ed25519_public' >/etc/ssh/ssh_host_ed25519_key.pub
fi
echo "$id" >/var/lib/nixops-seed/instance-id
sync
EOF
# A second interface (a machine in more libvirt networks) gets DHCP too.
cat >"$r/usr/lib/nixops-image/dhcp" <<'EOF'
#!/bin/sh
[ -e "/sys/class/net/$1" ] || exec busybox sleep 3600
busybox ip link set "$1" up
exec busybox udhcpc -f -i "$1" -s /usr/lib/nixops-image/udhcpc
EOF
cat >"$r/usr/lib/nixops-image/udhcpc" <<'EOF'
#!/bin/busybox sh
case $1 in
  deconfig) busybox ip -4 addr flush dev "$interface" ;;
  bound | renew)
    busybox ip -4 addr show dev "$interface" | grep -q " $ip/" || {
      busybox ip -4 addr flush dev "$interface"
      busybox ip addr add "$ip/${mask:-24}" dev "$interface"
    }
    # The default route is the first interface's: the Network's own.
    [ -n "$router" ] && [ "$interface" = eth0 ] && busybox ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
EOF
# The QEMU guest agent (addresses for interfaces without a DHCP lease), on
# the port libvirt names; there is no udev to link /dev/virtio-ports/.
cat >"$r/usr/lib/nixops-image/guest-agent" <<'EOF'
#!/bin/sh
for port in /sys/class/virtio-ports/*; do
  [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
  exec /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${port##*/}" -t /run
done
exec busybox sleep 3600
EOF
# libvirt's shutdown presses the ACPI power button: power off cleanly.
mkdir -p "$r/etc/acpi/PWRF"
printf '#!/bin/sh\nexec /bin/busybox poweroff\n' >"$r/etc/acpi/PWRF/00000080"
chmod +x "$r"/usr/lib/nixops-image/* "$r/etc/acpi/PWRF/00000080"
EOS
chmod +x "$customize"
mmdebstrap --quiet --variant=essential \
  --include=openssh-server,nix-bin,zstd,jq,busybox-static,e2fsprogs,procps,qemu-guest-agent \
  --customize-hook="$customize \"\$1\"" \
  "$suite" "$rootfs" >&2
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
mkfs.ext4 -q -L nixops-root -d "$rootfs" "$work/root.raw" 2G
qemu-img convert -f raw -O qcow2 "$work/root.raw" "$work/out/base.qcow2"
rm -rf "$out"
mv "$work/out" "$out"
echo "$out"
