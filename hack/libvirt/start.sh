#!/usr/bin/env bash
# Starts a private hypervisor for the libvirt provider's tests (there is no
# systemd here): virtlogd and libvirtd from Debian's packages, with their own
# state, runtime and config directories under DIR, in mount, pid and network
# namespaces of their own. libvirt networks (bridges, dnsmasq, firewall
# rules) live in that network namespace; a veth pair links it to the host,
# which routes ROUTED_CIDR (a /16 in 10.0.0.0/8 no host route overlaps)
# through it, so the operator reaches the VMs of networks inside that range.
#
#   start.sh DIR --watch-pid PID
#
# Prints `KEY=value` lines (values without spaces: the output is sourced by
# the quickstart): URI (the libvirt URI to connect to), CIDR (the
# routed /16), NS_PID (a process in the namespaces, for nsenter), and what a
# remote hypervisor's login needs: SSH_HOST (sshd in the namespace, port
# 22), SSH_HOST_KEY_FILE (its ed25519 public key), SSH_KEY (a private key root
# there accepts) and SOCKET (libvirtd's socket, for the URI's socket=). When PID
# exits, however it exits, the namespaces' init is killed: the kernel kills
# libvirtd, virtlogd, dnsmasq and every QEMU with it, the network namespace
# goes and with it its bridges, the veth pair and the host's route.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:?usage: start.sh DIR --watch-pid PID}
[[ ${2:-} == --watch-pid ]] || { echo "usage: start.sh DIR --watch-pid PID" >&2; exit 2; }
watch_pid=${3:?--watch-pid needs a PID}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir"/{run,lib,log/qemu,cache,etc,sock,pool}
# Mount points for the namespace's own directories.
mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /etc/libvirt

cat >"$dir/etc/libvirtd.conf" <<EOF
unix_sock_dir = "$dir/sock"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:$dir/libvirtd.log"
EOF
cat >"$dir/etc/virtlogd.conf" <<EOF
log_outputs = "3:file:$dir/virtlogd.log"
EOF
# QEMU runs as root with no confinement: no security driver (no AppArmor
# here), no cgroups (no systemd), no private /dev per VM.
cat >"$dir/etc/qemu.conf" <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
EOF
printf 'uri_default = "qemu:///system"\n' >"$dir/etc/libvirt.conf"
# sshd, so the hypervisor can be reached as a remote one (qemu+ssh): its
# own host key, and one login key for root.
ssh-keygen -q -t ed25519 -N '' -C hypervisor -f "$dir/ssh_host_ed25519_key"
ssh-keygen -q -t ed25519 -N '' -C operator -f "$dir/login"
cp "$dir/login.pub" "$dir/authorized_keys"
mkdir -p /run/sshd

# A /16 of 10.0.0.0/8 that no route of the host overlaps, and a /30 for the link.
pick=$(python3 - <<'EOF'
import ipaddress, random, subprocess
routes = [ipaddress.ip_network(l.split()[0], strict=False)
          for l in subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout.splitlines()
          if l and l.split()[0][0].isdigit()]
for _ in range(200):
    n = random.randrange(100, 250)
    net = ipaddress.ip_network(f"10.{n}.0.0/16")
    if not any(net.overlaps(r) for r in routes if r.prefixlen > 0):
        print(n, random.randrange(0, 1 << 14))
        break
EOF
)
read -r octet link <<<"$pick"
cidr="10.$octet.0.0/16"
host_ip="10.$octet.255.253"
ns_ip="10.$octet.255.254"
veth="nxlv$link"

inner=$(cat <<'EOF'
import os, subprocess, sys, time
d, ns_ip, host_ip, veth = sys.argv[1:5]
for sub, target in [("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"), ("log", "/var/log/libvirt"),
                    ("cache", "/var/cache/libvirt"), ("etc", "/etc/libvirt")]:
    subprocess.run(["mount", "--bind", f"{d}/{sub}", target], check=True)
# libvirt resolves its default QEMU user before it reads qemu.conf; Debian's
# libvirt-daemon-system would create it. Here it exists in this namespace only.
for name, line in [("passwd", "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n"),
                   ("group", "libvirt-qemu:x:64055:\nlibvirt:x:64056:\n")]:
    with open(f"/etc/{name}") as src, open(f"{d}/{name}", "w") as dst:
        dst.write(src.read() + line)
    subprocess.run(["mount", "--bind", f"{d}/{name}", f"/etc/{name}"], check=True)
# This pid namespace's own /proc: libvirtd looks up its clients (sshd's
# forwarding, for a remote connection) by the pid their socket reports.
subprocess.run(["mount", "-t", "proc", "proc", "/proc"], check=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
    f.write("1")
# Wait for the host to hand over our end of the veth pair.
while subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0:
    time.sleep(0.05)
subprocess.run(["ip", "addr", "add", f"{ns_ip}/30", "dev", veth], check=True)
subprocess.run(["ip", "link", "set", veth, "up"], check=True)
subprocess.run(["ip", "route", "add", "default", "via", host_ip], check=True)
log = open(f"{d}/daemons.log", "ab")
# Their own pid files: the host's /run is shared with other hypervisors.
subprocess.Popen(["virtlogd", "--pid-file", f"{d}/virtlogd.pid"], stdout=log, stderr=log)
subprocess.Popen(["libvirtd", "--config", f"{d}/etc/libvirtd.conf", "--pid-file", f"{d}/libvirtd.pid"],
                 stdout=log, stderr=log)
subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null",
                  "-o", f"ListenAddress={ns_ip}", "-o", f"HostKey={d}/ssh_host_ed25519_key",
                  "-o", f"AuthorizedKeysFile={d}/authorized_keys", "-o", "PermitRootLogin=prohibit-password",
                  "-o", "StrictModes=no", "-o", "UsePAM=no", "-o", "PidFile=none", "-o", "LogLevel=VERBOSE",
                  "-o", "AllowStreamLocalForwarding=yes", "-o", "AllowTcpForwarding=yes"],
                 stdout=log, stderr=log)
# pid 1 of the namespace: reap every orphan (QEMU is daemonized), or
# libvirt would wait for zombies to die.
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
EOF
)
setsid unshare --mount --propagation private --net --pid --fork --kill-child \
  python3 -c "$inner" "$dir" "$ns_ip" "$host_ip" "$veth" </dev/null >>"$dir/daemons.log" 2>&1 &
unshare_pid=$!
echo "$unshare_pid" >"$dir/unshare.pid"
# The namespace's pid 1 (python) is unshare's child.
ns_pid=
for _ in $(seq 100); do
  ns_pid=$(pgrep -P "$unshare_pid" | head -n1 || true)
  [[ -n $ns_pid ]] && break
  sleep 0.05
done
[[ -n $ns_pid ]] || { echo "libvirt/start: the namespace did not start; see $dir/daemons.log" >&2; exit 1; }

stop() { kill -9 "$unshare_pid" 2>/dev/null || true; }
trap 'status=$?; if (( status != 0 )); then stop; fi' EXIT

ip link add "${veth}h" type veth peer name "$veth" netns "$ns_pid"
ip addr add "$host_ip/30" dev "${veth}h"
ip link set "${veth}h" up
ip route add "$cidr" via "$ns_ip" dev "${veth}h"

# The watchdog: when the test process exits, the namespaces go.
(
  while kill -0 "$watch_pid" 2>/dev/null; do sleep 1; done
  kill -9 "$unshare_pid" 2>/dev/null || true
  sleep 1
  ip link del "${veth}h" 2>/dev/null || true
  rm -rf "$dir"
) </dev/null >/dev/null 2>&1 &
disown

uri="qemu:///system?socket=$dir/sock/libvirt-sock"
for _ in $(seq 300); do
  if virsh -q -c "$uri" version >/dev/null 2>&1; then
    echo "URI=$uri"
    echo "CIDR=$cidr"
    echo "NS_PID=$ns_pid"
    echo "POOL_DIR=$dir/pool"
    echo "SSH_HOST=$ns_ip"
    echo "SSH_HOST_KEY_FILE=$dir/ssh_host_ed25519_key.pub"
    echo "SSH_KEY=$dir/login"
    echo "SOCKET=$dir/sock/libvirt-sock"
    exit 0
  fi
  sleep 0.1
done
echo "libvirt/start: libvirtd did not answer within 30 s; see $dir/daemons.log and $dir/libvirtd.log" >&2
exit 1
