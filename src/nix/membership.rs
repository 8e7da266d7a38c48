//! A Network's membership as each member sees it at run time: the document
//! `/run/nixops/network.json`, the members' names in the hosts file, and
//! the WireGuard interface joining them (NixOps' `deployment.encryptedLinksTo`,
//! for every pair). Closures are built before the operator knows any of
//! this, so these are files and interface settings the operator writes over
//! SSH, never part of a closure.
//!
//! Names: NixOS makes /etc/hosts a symlink into the store. The module
//! nix/nixops-network.nix makes it a symlink to `/run/nixops/hosts`
//! instead, kept as the system's own hosts file (`/etc/nixops/hosts.base`)
//! followed by the operator's block (`/run/nixops/hosts.network`): its
//! activation script joins them at boot and on every switch, the operator
//! whenever membership changes. Where /etc/hosts is a regular file (other
//! distributions) the operator replaces its block in place. A store symlink
//! without the module is left alone and reported.
//!
//! Every script takes `NIXOPS_ROOT` (default empty) as the root of the
//! paths it touches, so tests run them against a directory.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::activation::shell_quote;

/// Where the membership document goes (root only).
pub const DOCUMENT: &str = "/run/nixops/network.json";
/// The operator's hosts block, for the NixOS module's activation script.
pub const HOSTS_BLOCK: &str = "/run/nixops/hosts.network";
/// With the NixOS module, /etc/hosts points here.
pub const HOSTS: &str = "/run/nixops/hosts";
/// With the NixOS module, the system's own hosts file.
pub const HOSTS_BASE: &str = "/etc/nixops/hosts.base";
/// The mesh's WireGuard interface on every member.
pub const INTERFACE: &str = "nixops0";
/// The interface's configuration (`wg setconf` format; root only).
pub const WIREGUARD_CONFIG: &str = "/run/nixops/wireguard/nixops0.conf";
/// First line of the operator's block in the hosts file.
const BEGIN: &str = "# BEGIN nixops-network";
/// Last line of the operator's block in the hosts file.
const END: &str = "# END nixops-network";
/// A peer whose last handshake is older than this is not connected
/// (WireGuard renews a session's keys every two minutes of traffic).
pub const HANDSHAKE_FRESH_SECONDS: u64 = 180;
/// Exit status of [`apply_script`] when the hosts file is not ours to manage.
pub const EXIT_HOSTS_UNMANAGED: u32 = 3;
/// Exit status of [`apply_script`] when the machine has no WireGuard.
pub const EXIT_NO_WIREGUARD: u32 = 4;

/// One member as the others see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub name: String,
    /// (type, address): ExternalIP, InternalIP or Hostname.
    pub addresses: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_address: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_public_key: Option<String>,
}

impl Member {
    fn address(&self, kind: &str) -> Option<&str> {
        self.addresses.iter().find(|(t, _)| t == kind).map(|(_, a)| a.as_str())
    }
}

/// The mesh's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mesh {
    pub range: Ipv4Range,
    pub listen_port: u16,
    pub persistent_keepalive: Option<u16>,
    /// The VPC's block, for Networks with one: peers both inside it talk
    /// over their private addresses.
    pub private_range: Option<Ipv4Range>,
}

/// An IPv4 CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Range {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Range {
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = text.split_once('/')?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        let network: Ipv4Addr = addr.parse().ok()?;
        Some(Self { network: Ipv4Addr::from(u32::from(network) & self::mask(prefix)), prefix })
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// The addresses members may have: all but the network and broadcast addresses.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network);
        let last = first | !mask(self.prefix);
        (first.saturating_add(1)..last).map(Ipv4Addr::from)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

/// A Network's membership, as member `this` gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// "namespace/name" of the Network.
    pub network: String,
    pub this: String,
    /// Sorted by name.
    pub members: Vec<Member>,
    pub mesh: Option<Mesh>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    network: &'a str,
    this: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh: Option<MeshDocument>,
    members: Vec<MemberDocument<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MeshDocument {
    interface: &'static str,
    address_range: String,
    listen_port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MemberDocument<'a> {
    name: &'a str,
    addresses: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_address: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_public_key: Option<&'a str>,
}

impl Membership {
    /// `/run/nixops/network.json`: every member's name, addresses (by
    /// type), SSH host key and mesh address and public key. Nothing secret.
    pub fn document(&self) -> String {
        let doc = Document {
            network: &self.network,
            this: &self.this,
            mesh: self.mesh.map(|m| MeshDocument {
                interface: INTERFACE,
                address_range: format!("{}/{}", m.range.network, m.range.prefix),
                listen_port: m.listen_port,
            }),
            members: self
                .members
                .iter()
                .map(|m| MemberDocument {
                    name: &m.name,
                    addresses: m.addresses.iter().map(|(t, a)| (t.as_str(), a.as_str())).collect(),
                    host_key: m.host_key.as_deref(),
                    mesh_address: m.mesh_address,
                    mesh_public_key: m.mesh_public_key.as_deref(),
                })
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        text.push('\n');
        text
    }

    /// The hosts block: each member's name at its mesh address when the
    /// mesh is on, else at its first IP address (private before public);
    /// members with neither are left out.
    pub fn hosts_block(&self) -> String {
        let mut block = format!("{BEGIN} {}\n", self.network);
        for m in &self.members {
            let address = match (self.mesh, m.mesh_address) {
                (Some(_), Some(mesh)) => Some(mesh.to_string()),
                (Some(_), None) => None,
                (None, _) => ["InternalIP", "ExternalIP"]
                    .iter()
                    .filter_map(|t| m.address(t))
                    .find(|a| a.parse::<std::net::IpAddr>().is_ok())
                    .map(str::to_owned),
            };
            if let Some(address) = address {
                block += &format!("{address} {}\n", m.name);
            }
        }
        block += END;
        block.push('\n');
        block
    }

    /// The interface's configuration with `private_key`, or None when
    /// there is no mesh or this member has no mesh address yet. Every other
    /// member with a key and an address is a peer.
    pub fn wireguard_config(&self, private_key: &str) -> Option<String> {
        let mesh = self.mesh?;
        let this = self.members.iter().find(|m| m.name == self.this)?;
        this.mesh_address?;
        let mut conf = format!("[Interface]\nPrivateKey = {private_key}\nListenPort = {}\n", mesh.listen_port);
        for peer in self.members.iter().filter(|m| m.name != self.this) {
            let (Some(key), Some(address)) = (&peer.mesh_public_key, peer.mesh_address) else { continue };
            conf += &format!("\n# {}\n[Peer]\nPublicKey = {key}\nAllowedIPs = {address}/32\n", peer.name);
            if let Some(endpoint) = endpoint(this, peer, &mesh) {
                conf += &format!("Endpoint = {endpoint}\n");
            }
            if let Some(keepalive) = mesh.persistent_keepalive {
                conf += &format!("PersistentKeepalive = {keepalive}\n");
            }
        }
        Some(conf)
    }

    /// This member's mesh address with the range's prefix, e.g. 10.77.0.2/24.
    pub fn interface_address(&self) -> Option<String> {
        let mesh = self.mesh?;
        let this = self.members.iter().find(|m| m.name == self.this)?;
        Some(format!("{}/{}", this.mesh_address?, mesh.range.prefix))
    }

    /// The other members with a mesh key: (name, public key).
    pub fn peers(&self) -> Vec<(&str, &str)> {
        self.members
            .iter()
            .filter(|m| m.name != self.this && m.mesh_address.is_some())
            .filter_map(|m| Some((m.name.as_str(), m.mesh_public_key.as_deref()?)))
            .collect()
    }
}

/// Where `this` sends a peer's packets: its private address when both are
/// inside the Network's VPC, else its public address, its host name, or
/// (last) any private one. Port: the mesh's.
pub fn endpoint(this: &Member, peer: &Member, mesh: &Mesh) -> Option<String> {
    let inside = |m: &Member| {
        m.address("InternalIP")
            .and_then(|a| a.parse().ok())
            .is_some_and(|a| mesh.private_range.is_some_and(|r| r.contains(a)))
    };
    let host = if inside(this) && inside(peer) {
        peer.address("InternalIP")
    } else {
        peer.address("ExternalIP").or(peer.address("Hostname")).or(peer.address("InternalIP"))
    }?;
    Some(if host.contains(':') {
        format!("[{host}]:{}", mesh.listen_port)
    } else {
        format!("{host}:{}", mesh.listen_port)
    })
}

/// Prints what the machine has, one fact a line, for [`parse_inspection`]:
/// the document's and the hosts block's sha256, how the hosts file is
/// managed, the interface configuration's sha256, whether the interface
/// exists, whether WireGuard can be set up, and each peer's last handshake.
/// Peers without a recent handshake get one ping first, which starts a
/// handshake (idle tunnels have none).
pub fn inspect_script() -> String {
    format!(
        r#"R=${{NIXOPS_ROOT:-}}
sum() {{ if [ -e "$1" ]; then sha256sum <"$1" | cut -d' ' -f1; else echo missing; fi; }}
echo "document $(sum "$R{DOCUMENT}")"
echo "hosts $(sed -n '/^{BEGIN}/,/^{END}/p' "$R/etc/hosts" 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ -e "$R{HOSTS_BASE}" ]; then echo "hostsfile module"; elif [ -L "$R/etc/hosts" ]; then echo "hostsfile unmanaged"; else echo "hostsfile plain"; fi
echo "wgconfig $(sum "$R{WIREGUARD_CONFIG}")"
if command -v wg >/dev/null 2>&1; then
  if [ -d /sys/module/wireguard ] || command -v wireguard-go >/dev/null 2>&1 || modprobe -q wireguard 2>/dev/null; then echo "wireguard yes"; else echo "wireguard nokernel"; fi
else
  echo "wireguard notools"
fi
if ip link show dev {INTERFACE} >/dev/null 2>&1 && command -v wg >/dev/null 2>&1; then
  echo "interface $(ip -4 -o addr show dev {INTERFACE} | awk '{{print $4}}' | head -n1)"
  now=$(date +%s)
  wg show {INTERFACE} latest-handshakes | {{
    while read -r key at; do
      if [ $((now - at)) -gt {fresh} ]; then
        ip=$(wg show {INTERFACE} allowed-ips | awk -v k="$key" '$1 == k {{ sub("/32", "", $2); print $2 }}')
        [ -n "$ip" ] && ping -c 1 -W 1 "$ip" >/dev/null 2>&1 &
      fi
    done
    wait
  }}
  echo "now $(date +%s)"
  wg show {INTERFACE} latest-handshakes | sed 's/^/handshake /'
else
  echo "interface none"
fi
"#,
        fresh = HANDSHAKE_FRESH_SECONDS - 30,
    )
}

/// What [`inspect_script`] found on a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    pub document: String,
    pub hosts: String,
    /// module, plain or unmanaged.
    pub hosts_file: String,
    pub wireguard_config: String,
    /// yes, nokernel or notools.
    pub wireguard: String,
    /// The interface's address with prefix, "" without one; None: no interface.
    pub interface: Option<String>,
    pub now: u64,
    /// Peer public key → last handshake (seconds since the epoch, 0 never).
    pub handshakes: BTreeMap<String, u64>,
}

pub fn parse_inspection(text: &str) -> Inspection {
    let mut found = Inspection::default();
    for line in text.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.trim();
        match key {
            "document" => found.document = value.into(),
            "hosts" => found.hosts = value.into(),
            "hostsfile" => found.hosts_file = value.into(),
            "wgconfig" => found.wireguard_config = value.into(),
            "wireguard" => found.wireguard = value.into(),
            "interface" if value == "none" => found.interface = None,
            "interface" => found.interface = Some(value.into()),
            "now" => found.now = value.parse().unwrap_or_default(),
            "handshake" => {
                let mut parts = value.split_whitespace();
                if let (Some(k), Some(at)) = (parts.next(), parts.next().and_then(|a| a.parse().ok())) {
                    found.handshakes.insert(k.to_owned(), at);
                }
            }
            _ => {}
        }
    }
    found
}

impl Inspection {
    /// The peers (name, key) without a handshake in the last
    /// [`HANDSHAKE_FRESH_SECONDS`].
    pub fn stale_peers<'a>(&self, peers: &[(&'a str, &'a str)]) -> Vec<&'a str> {
        peers
            .iter()
            .filter(|(_, key)| {
                self.handshakes
                    .get(*key)
                    .is_none_or(|at| *at == 0 || self.now.saturating_sub(*at) > HANDSHAKE_FRESH_SECONDS)
            })
            .map(|(name, _)| *name)
            .collect()
    }
}

/// What to do with the machine's WireGuard interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interface {
    /// Configure it: the configuration (with the private key: only ever
    /// on standard input, never in a command line or output) and the
    /// interface address with prefix.
    Configure { config: String, address: String },
    /// Remove the one the operator made (the mesh is off).
    Remove,
    /// Leave it as it is (this member's mesh facts are not settled yet).
    Keep,
}

/// The standard input [`apply_script`] expects: the document, the hosts
/// block and the interface configuration, back to back.
pub struct Payload {
    pub document: String,
    pub hosts: String,
    pub interface: Interface,
}

impl Payload {
    pub fn input(&self) -> Vec<u8> {
        let mut input = Vec::new();
        input.extend_from_slice(self.document.as_bytes());
        input.extend_from_slice(self.hosts.as_bytes());
        if let Interface::Configure { config, .. } = &self.interface {
            input.extend_from_slice(config.as_bytes());
        }
        input
    }
}

/// Writes the document and the hosts block from standard input (see
/// [`Payload`]), each atomically, then the hosts file; with a WireGuard
/// configuration, creates the interface if it is missing (kernel
/// WireGuard, else wireguard-go), applies the configuration with `wg
/// syncconf` (peers added, changed or removed without touching working
/// sessions), and sets its address; without one, removes an interface it
/// made before. Exits [`EXIT_HOSTS_UNMANAGED`] after everything else when
/// the hosts file is a symlink it does not manage, and
/// [`EXIT_NO_WIREGUARD`] when the interface cannot be created.
pub fn apply_script(payload: &Payload) -> String {
    let wireguard = match &payload.interface {
        Interface::Configure { config, address } => format!(
            r#"mkdir -p "$(dirname "$R{WIREGUARD_CONFIG}")"
take {len} >"$R{WIREGUARD_CONFIG}.tmp"
mv -f "$R{WIREGUARD_CONFIG}.tmp" "$R{WIREGUARD_CONFIG}"
if ! ip link show dev {INTERFACE} >/dev/null 2>&1; then
  ip link add dev {INTERFACE} type wireguard 2>/dev/null || wireguard-go {INTERFACE} </dev/null >/dev/null 2>&1 || {{
    echo "cannot create WireGuard interface {INTERFACE}: no kernel WireGuard and no wireguard-go" >&2; exit {EXIT_NO_WIREGUARD}; }}
fi
wg syncconf {INTERFACE} "$R{WIREGUARD_CONFIG}"
if [ "$(ip -4 -o addr show dev {INTERFACE} | awk '{{print $4}}')" != {address} ]; then
  ip -4 addr flush dev {INTERFACE}
  ip addr add {address} dev {INTERFACE}
fi
ip link set up dev {INTERFACE}
"#,
            len = config.len(),
            address = shell_quote(address),
        ),
        Interface::Keep => String::new(),
        Interface::Remove => format!(
            r#"if [ -e "$R{WIREGUARD_CONFIG}" ]; then
  ip link del dev {INTERFACE} 2>/dev/null || true
  rm -f "$R{WIREGUARD_CONFIG}"
fi
"#
        ),
    };
    format!(
        r#"set -eu
R=${{NIXOPS_ROOT:-}}
umask 077
take() {{ dd iflag=count_bytes,fullblock bs=65536 count="$1" status=none; }}
mkdir -p "$R/run/nixops"
# Readable by all: /etc/hosts may point into it; what is secret is 0600.
chmod 755 "$R/run/nixops"
take {doc_len} >"$R{DOCUMENT}.tmp"
mv -f "$R{DOCUMENT}.tmp" "$R{DOCUMENT}"
take {hosts_len} >"$R{HOSTS_BLOCK}.tmp"
chmod 644 "$R{HOSTS_BLOCK}.tmp"
mv -f "$R{HOSTS_BLOCK}.tmp" "$R{HOSTS_BLOCK}"
unmanaged=
if [ -e "$R{HOSTS_BASE}" ]; then
  cat "$R{HOSTS_BASE}" "$R{HOSTS_BLOCK}" >"$R{HOSTS}.tmp"
  chmod 644 "$R{HOSTS}.tmp"
  mv -f "$R{HOSTS}.tmp" "$R{HOSTS}"
elif [ -L "$R/etc/hosts" ]; then
  unmanaged=1
else
  # In place: /etc/hosts may be a mount point, which a rename cannot replace.
  {{ sed '/^{BEGIN}/,/^{END}/d' "$R/etc/hosts" 2>/dev/null || true; cat "$R{HOSTS_BLOCK}"; }} >"$R{HOSTS}.tmp"
  cat "$R{HOSTS}.tmp" >"$R/etc/hosts"
  rm -f "$R{HOSTS}.tmp"
fi
{wireguard}if [ -n "$unmanaged" ]; then
  echo "/etc/hosts is a symlink the operator does not manage (NixOS keeps it in the store)" >&2
  exit {EXIT_HOSTS_UNMANAGED}
fi
"#,
        doc_len = payload.document.len(),
        hosts_len = payload.hosts.len(),
    )
}

/// sha256 of `text`, hex, as the inspection prints it.
pub fn sha256(text: &str) -> String {
    super::keys::sha256_hex(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn member(name: &str, addresses: &[(&str, &str)], mesh: Option<(&str, &str)>) -> Member {
        Member {
            name: name.into(),
            addresses: addresses.iter().map(|(t, a)| ((*t).into(), (*a).into())).collect(),
            host_key: Some(format!("ssh-ed25519 AAAA{name}")),
            mesh_address: mesh.map(|(a, _)| a.parse().unwrap()),
            mesh_public_key: mesh.map(|(_, k)| k.into()),
        }
    }

    fn mesh() -> Mesh {
        Mesh {
            range: Ipv4Range::parse("10.77.0.0/24").unwrap(),
            listen_port: 51820,
            persistent_keepalive: Some(25),
            private_range: Ipv4Range::parse("10.0.0.0/16"),
        }
    }

    fn membership(with_mesh: bool) -> Membership {
        Membership {
            network: "prod/web".into(),
            this: "a".into(),
            members: vec![
                member("a", &[("ExternalIP", "203.0.113.1"), ("InternalIP", "10.0.1.5")], Some(("10.77.0.1", "KA="))),
                member("b", &[("ExternalIP", "203.0.113.2"), ("InternalIP", "10.0.1.6")], Some(("10.77.0.2", "KB="))),
                member("c", &[("ExternalIP", "198.51.100.7")], Some(("10.77.0.3", "KC="))),
                member("d", &[("Hostname", "d.example.org")], None),
            ],
            mesh: with_mesh.then(mesh),
        }
    }

    #[test]
    fn ranges_give_their_host_addresses() {
        let r = Ipv4Range::parse("10.77.0.9/29").unwrap();
        assert_eq!(r.network, Ipv4Addr::new(10, 77, 0, 8));
        let hosts: Vec<Ipv4Addr> = r.hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 77, 0, 9)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 77, 0, 14)));
        assert_eq!(hosts.len(), 6);
        assert!(r.contains(Ipv4Addr::new(10, 77, 0, 15)) && !r.contains(Ipv4Addr::new(10, 77, 0, 16)));
        assert!(Ipv4Range::parse("10.77.0.0/33").is_none() && Ipv4Range::parse("x/8").is_none());
    }

    #[test]
    fn endpoints_are_private_inside_the_vpc_and_public_across() {
        let m = membership(true);
        let (a, b, c, d) = (&m.members[0], &m.members[1], &m.members[2], &m.members[3]);
        let mesh = mesh();
        assert_eq!(endpoint(a, b, &mesh).as_deref(), Some("10.0.1.6:51820"), "both in the VPC");
        assert_eq!(endpoint(c, b, &mesh).as_deref(), Some("203.0.113.2:51820"), "c is outside the VPC");
        assert_eq!(endpoint(a, c, &mesh).as_deref(), Some("198.51.100.7:51820"));
        assert_eq!(endpoint(a, d, &mesh).as_deref(), Some("d.example.org:51820"));
        let no_vpc = Mesh { private_range: None, ..mesh };
        assert_eq!(endpoint(a, b, &no_vpc).as_deref(), Some("203.0.113.2:51820"), "no VPC: public addresses");
    }

    #[test]
    fn hosts_name_mesh_addresses_with_the_mesh_and_ip_addresses_without() {
        let with = membership(true).hosts_block();
        assert_eq!(
            with, "# BEGIN nixops-network prod/web\n10.77.0.1 a\n10.77.0.2 b\n10.77.0.3 c\n# END nixops-network\n",
            "d has no mesh address yet"
        );
        let without = membership(false).hosts_block();
        assert!(without.contains("10.0.1.5 a\n") && without.contains("198.51.100.7 c\n"), "{without}");
        assert!(!without.contains(" d\n"), "a host name is no hosts entry: {without}");
    }

    #[test]
    fn the_interface_configuration_lists_every_other_member_once() {
        let m = membership(true);
        let conf = m.wireguard_config("PRIVATE=").unwrap();
        assert!(conf.starts_with("[Interface]\nPrivateKey = PRIVATE=\nListenPort = 51820\n"), "{conf}");
        assert_eq!(conf.matches("[Peer]").count(), 2, "b and c; not a itself, not d without a key: {conf}");
        assert!(conf.contains(
            "PublicKey = KB=\nAllowedIPs = 10.77.0.2/32\nEndpoint = 10.0.1.6:51820\nPersistentKeepalive = 25\n"
        ));
        assert_eq!(m.interface_address().as_deref(), Some("10.77.0.1/24"));
        assert!(membership(false).wireguard_config("P").is_none());
        let doc = m.document();
        assert!(!doc.contains("PRIVATE"), "the document holds no private key");
        let parsed: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(parsed["members"][1]["meshAddress"], "10.77.0.2");
        assert_eq!(parsed["members"][0]["addresses"]["InternalIP"], "10.0.1.5");
        assert_eq!(parsed["mesh"]["interface"], INTERFACE);
    }

    #[test]
    fn stale_peers_are_those_without_a_recent_handshake() {
        let found = parse_inspection(
            "document missing\nhosts abc\nhostsfile plain\nwgconfig missing\nwireguard yes\ninterface 10.77.0.1/24\n\
             now 1000\nhandshake KB=\t990\nhandshake KC=\t0\n",
        );
        assert_eq!(found.interface.as_deref(), Some("10.77.0.1/24"));
        assert_eq!(found.hosts_file, "plain");
        let peers = [("b", "KB="), ("c", "KC="), ("e", "KE=")];
        assert_eq!(found.stale_peers(&peers), ["c", "e"]);
        assert_eq!(parse_inspection("interface none\n").interface, None);
    }

    fn run(script: &str, root: &std::path::Path, input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new("sh")
            .args(["-c", script])
            .env("NIXOPS_ROOT", root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// The scripts, run against a directory standing for the root: a plain
    /// hosts file keeps its own lines and gets the block replaced; with the
    /// module the block joins the base; a store symlink is reported.
    #[test]
    fn hosts_files_are_managed_as_the_machine_has_them() {
        for script in [inspect_script(), apply_script(&payload(&membership(false)))] {
            let out = Command::new("sh").args(["-n", "-c", &script]).output().unwrap();
            assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        let m = membership(false);
        for _ in 0..2 {
            let out = run(&apply_script(&payload(&m)), root, &payload(&m).input());
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert_eq!(hosts, format!("127.0.0.1 localhost\n{}", m.hosts_block()), "the block once, own lines kept");
        assert_eq!(std::fs::read_to_string(root.join("run/nixops/network.json")).unwrap(), m.document());
        let inspected = parse_inspection(&String::from_utf8_lossy(&run(&inspect_script(), root, b"").stdout));
        assert_eq!(inspected.document, sha256(&m.document()));
        assert_eq!(inspected.hosts, sha256(&m.hosts_block()));
        assert_eq!(inspected.hosts_file, "plain");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("run/nixops/network.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "root only");

        // NixOS with the module: /etc/hosts -> /run/nixops/hosts, base kept by the module.
        let nixos = tempfile::tempdir().unwrap();
        let root = nixos.path();
        std::fs::create_dir_all(root.join("etc/nixops")).unwrap();
        std::fs::write(root.join("etc/nixops/hosts.base"), "127.0.0.1 localhost\n").unwrap();
        std::os::unix::fs::symlink(root.join("run/nixops/hosts"), root.join("etc/hosts")).unwrap();
        let out = run(&apply_script(&payload(&m)), root, &payload(&m).input());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert_eq!(hosts, format!("127.0.0.1 localhost\n{}", m.hosts_block()));
        let inspected = parse_inspection(&String::from_utf8_lossy(&run(&inspect_script(), root, b"").stdout));
        assert_eq!((inspected.hosts_file.as_str(), inspected.hosts), ("module", sha256(&m.hosts_block())));

        // NixOS without the module: a store symlink is not touched.
        let bare = tempfile::tempdir().unwrap();
        let root = bare.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("store-hosts"), "127.0.0.1 localhost\n").unwrap();
        std::os::unix::fs::symlink(root.join("store-hosts"), root.join("etc/hosts")).unwrap();
        let out = run(&apply_script(&payload(&m)), root, &payload(&m).input());
        assert_eq!(out.status.code(), Some(EXIT_HOSTS_UNMANAGED as i32));
        assert_eq!(std::fs::read_to_string(root.join("store-hosts")).unwrap(), "127.0.0.1 localhost\n");
        assert!(root.join("run/nixops/network.json").exists(), "the document is written all the same");
    }

    fn payload(m: &Membership) -> Payload {
        Payload { document: m.document(), hosts: m.hosts_block(), interface: Interface::Remove }
    }
}
