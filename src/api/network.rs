//! `Network`: the NixOps deployment — a group of machines, the cloud
//! account they live in, and the physical network behind them.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::machine::{MachineAddress, MachineProvider, SshSpec};
use super::{Condition, DeletionPolicy, LocalObjectReference, ManagementPolicy, Tags, rules};

/// A logical group of machines, the counterpart of a NixOps deployment.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[kube(
    group = "nixops.io",
    version = "v1alpha1",
    kind = "Network",
    namespaced,
    status = "NetworkStatus",
    shortname = "nixnet",
    category = "nixops",
    doc = "A group of NixOS machines (a NixOps deployment), its cloud account and physical network.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Provider", type_ = "string", json_path = ".status.provider"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.provider.ec2.region"),
    printcolumn(name = "Machines", type_ = "integer", json_path = ".status.machines"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Mesh", type_ = "string", json_path = ".status.conditions[?(@.type==\"MeshReady\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Ready-Machines", type_ = "integer", json_path = ".status.readyMachines", priority = 1),
    printcolumn(name = "Updated", type_ = "integer", json_path = ".status.updatedMachines", priority = 1),
    printcolumn(name = "VPC", type_ = "string", json_path = ".status.vpcId", priority = 1),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.?provider.?libvirt.hasValue() == oldSelf.?provider.?libvirt.hasValue()")
    .message("the provider kind is immutable: a Network keeps the hypervisor it was created with (removing provider.libvirt would leave its libvirt network behind); create a new Network instead")
    .field_path(".provider"))]
#[x_kube(validation = Rule::new("self.?provider.?ec2.hasValue() == oldSelf.?provider.?ec2.hasValue()")
    .message("the provider kind is immutable: a Network keeps the cloud it was created with (removing provider.ec2 would leave its VPC behind), and a Network of existing hosts cannot gain one; create a new Network instead")
    .field_path(".provider"))]
pub struct NetworkSpec {
    /// The cloud account and physical network. Omit it for a network of
    /// existing hosts only. Which cloud (or none) cannot change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<NetworkProvider>,

    /// Defaults for member Machines that leave these fields empty, so the
    /// same logical Machine can be placed by its Network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_defaults: Option<MachineDefaults>,

    /// How many machines change at once when several need a new closure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,

    /// An encrypted mesh between all members (NixOps' encrypted links),
    /// configured on the machines at run time over SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshSpec>,

    /// The build host of members whose spec.nixos.build builds on `Builder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<super::build::NetworkBuild>,

    /// `Default` creates, updates and deletes the cloud resource; `Observe`
    /// only reads the existing one named by the `nixops.io/external-name`
    /// annotation and never changes or deletes it. With that annotation and
    /// `Default`, an existing resource is adopted instead of created.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// What happens to the VPC, subnets and security group when this Network
    /// is deleted. The Network waits until no Machine uses it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// The cloud behind a Network. At most one block is set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.ec2) && has(self.libvirt))")
    .message("at most one provider block may be set: ec2 or libvirt"))]
pub struct NetworkProvider {
    /// An AWS account and region, with a VPC the operator creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2: Option<Ec2Network>,

    /// A libvirt hypervisor, with a libvirt network the operator creates
    /// (NixOps's `libvirtd-network`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtNetwork>,
}

/// A libvirt hypervisor and the virtual network its machines share.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.uri.startsWith('qemu+ssh://') || has(self.ssh)")
    .message("a qemu+ssh:// hypervisor needs ssh.credentialsSecretRef and ssh.hostKey: the operator logs in with the Secret's key and talks only to the host proving that key")
    .field_path(".ssh"))]
#[x_kube(validation = Rule::new("!has(self.ssh) || self.uri.startsWith('qemu+ssh://')")
    .message("ssh applies to qemu+ssh:// URIs only")
    .field_path(".ssh"))]
pub struct LibvirtNetwork {
    /// The libvirt connection URI of the hypervisor: `qemu:///system` for
    /// libvirtd on the operator's host, `qemu+ssh://USER@HOST[:PORT]/system`
    /// for a remote one (with `ssh`). The operator makes the SSH connection
    /// itself, with its own host key check, and forwards libvirtd's socket
    /// (`/var/run/libvirt/libvirt-sock`, or the URI's `socket=` parameter);
    /// the remote user needs access to that socket. Immutable.
    #[serde(default = "default_libvirt_uri")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9+]+://')")
        .message("must be a libvirt URI such as qemu:///system or qemu+ssh://root@host/system"))]
    #[x_kube(validation = rules::immutable("the hypervisor URI"))]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,

    /// How the network reaches the outside: `nat` (libvirt's default: the
    /// host masquerades), `route` (routed, no NAT: the host must route the
    /// CIDR to the hypervisor), `open` (routed, libvirt adds no firewall
    /// rules) or `isolated` (machines reach only each other and the host).
    /// Immutable.
    #[serde(default)]
    #[x_kube(validation = rules::immutable("the forward mode"))]
    pub mode: LibvirtForwardMode,

    /// The network's IPv4 range, e.g. 192.168.100.0/24; the hypervisor
    /// takes its first address. Immutable.
    #[x_kube(validation = rules::ipv4_cidr())]
    #[x_kube(validation = Rule::new("cidr(self).prefixLength() >= 8 && cidr(self).prefixLength() <= 28")
        .message("the prefix length must be between /8 and /28, e.g. 192.168.100.0/24"))]
    #[x_kube(validation = rules::immutable("the CIDR"))]
    #[schemars(length(min = 9, max = 18))]
    pub cidr: String,

    /// The addresses DHCP hands out; by default from the tenth address of
    /// the CIDR to the last but one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_range: Option<DhcpRange>,

    /// The storage pool (it must exist) holding machines' root disk
    /// overlays, their seeds and libvirt Volumes. Immutable: what is in
    /// the pool stays there.
    #[serde(default = "default_storage_pool")]
    #[x_kube(validation = rules::immutable("the storage pool"))]
    #[schemars(length(min = 1, max = 253))]
    pub storage_pool: String,

    /// The login to a remote hypervisor (`qemu+ssh://` URIs), checked like
    /// every SSH connection the operator makes: the host must prove the
    /// pinned key before anything is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<HypervisorSsh>,
}

/// How the operator logs in to a remote hypervisor.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorSsh {
    /// Secret with the private key to log in with, under `ssh-privatekey`
    /// (a `kubernetes.io/ssh-auth` Secret: `kubectl create secret generic
    /// NAME --type=kubernetes.io/ssh-auth --from-file=ssh-privatekey=KEY`).
    /// The Network keeps it from deletion until its cleanup is done.
    pub credentials_secret_ref: LocalObjectReference,

    /// The hypervisor's SSH public key (`ssh-keyscan -t ed25519 HOST`), of
    /// any type it has; the operator asks for a key of that type and refuses
    /// a host presenting any other.
    #[x_kube(validation = rules::ssh_public_key())]
    #[schemars(length(min = 1, max = 16384))]
    pub host_key: String,

    /// Whether Machines reach their SSH through the hypervisor (like
    /// `ssh -J`) when they set no jumpHost of their own: by default in
    /// `nat` and `isolated` networks, whose addresses only the hypervisor
    /// reaches, and not in `route` and `open` ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump: Option<bool>,
}

fn default_libvirt_uri() -> String {
    "qemu:///system".into()
}

fn default_storage_pool() -> String {
    "default".into()
}

/// A libvirt network's forward mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LibvirtForwardMode {
    /// NAT to the host's network.
    #[default]
    Nat,
    /// Routed, without NAT.
    Route,
    /// Routed, without firewall rules from libvirt.
    Open,
    /// No forwarding: machines reach each other and the host only.
    Isolated,
}

/// A range of IPv4 addresses, both ends included.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DhcpRange {
    /// First address handed out.
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4").message("must be an IPv4 address"))]
    #[schemars(length(min = 7, max = 15))]
    pub start: String,
    /// Last address handed out.
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4").message("must be an IPv4 address"))]
    #[schemars(length(min = 7, max = 15))]
    pub end: String,
}

impl NetworkProvider {
    /// The name of the provider block that is set (`ec2`, `libvirt`).
    pub fn kind(&self) -> Option<&'static str> {
        match (&self.ec2, &self.libvirt) {
            (Some(_), _) => Some("ec2"),
            (None, Some(_)) => Some("libvirt"),
            (None, None) => None,
        }
    }
}

/// An AWS VPC with subnets, internet gateway and security group.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.subnets.all(s, cidr(self.vpc.cidrBlock).containsCIDR(s.cidrBlock))")
    .message("every subnet's cidrBlock must lie inside vpc.cidrBlock")
    .field_path(".subnets"))]
#[x_kube(validation = Rule::new("self.subnets.all(s, s.zone.startsWith(self.region))")
    .message("every subnet's zone must be in the Network's region, e.g. eu-west-1a for eu-west-1")
    .field_path(".subnets"))]
pub struct Ec2Network {
    /// AWS region, e.g. eu-west-1. Immutable.
    #[x_kube(validation = rules::aws_region())]
    #[x_kube(validation = rules::immutable("the region"))]
    #[schemars(length(min = 1, max = 32))]
    pub region: String,

    /// Secret with the account's credentials: keys `accessKeyId`,
    /// `secretAccessKey`, optional `sessionToken`. Without it the operator
    /// uses the default AWS credential chain (environment, IRSA, instance role).
    /// The operator keeps the Secret from being deleted (finalizer
    /// `nixops.io/network-<Network UID>`) until this Network's cloud resources
    /// are deleted, so deleting a whole namespace cannot strand them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectReference>,

    /// API endpoint override for S3/EC2-compatible or test endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::http_url())]
    #[schemars(length(max = 2048))]
    pub endpoint: Option<String>,

    /// The VPC.
    pub vpc: Vpc,

    /// Subnets of the VPC; machines name one in `provider.ec2.subnet`.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = rules::list_map("name"))]
    pub subnets: Vec<Subnet>,

    /// The security group every member machine is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_group: Option<SecurityGroup>,

    /// Extra tags for every resource the Network creates.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    #[schemars(length(max = 40))]
    pub tags: Tags,
}

/// A VPC.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Vpc {
    /// IPv4 CIDR block of the VPC, /16 to /28. Immutable.
    #[x_kube(validation = rules::ipv4_cidr())]
    #[x_kube(validation = Rule::new("cidr(self).prefixLength() >= 16 && cidr(self).prefixLength() <= 28")
        .message("the VPC's prefix length must be between /16 and /28, e.g. 10.0.0.0/16"))]
    #[x_kube(validation = rules::immutable("the VPC CIDR block"))]
    #[schemars(length(min = 9, max = 18))]
    pub cidr_block: String,
}

/// A subnet of the VPC.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.zone == oldSelf.zone && self.cidrBlock == oldSelf.cidrBlock")
    .message("a subnet's zone and cidrBlock are immutable; add a subnet with a new name instead"))]
pub struct Subnet {
    /// Name machines use to pick this subnet.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be lower-case letters, digits and '-', e.g. public-a"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// IPv4 CIDR block inside the VPC's block.
    #[x_kube(validation = rules::ipv4_cidr())]
    #[schemars(length(min = 9, max = 18))]
    pub cidr_block: String,

    /// Availability zone, e.g. eu-west-1a.
    #[x_kube(validation = rules::aws_zone())]
    #[schemars(length(min = 1, max = 32))]
    pub zone: String,

    /// Give instances in this subnet a public IP and a route to the internet gateway.
    #[serde(default = "default_true")]
    pub public: bool,
}

fn default_true() -> bool {
    true
}

/// A security group.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroup {
    /// Inbound rules; everything else is refused. Outbound is open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub ingress: Vec<IngressRule>,
}

/// An inbound security group rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.protocol == 'all' || self.protocol == 'icmp' || (has(self.fromPort) && has(self.toPort) && self.fromPort <= self.toPort)")
    .message("tcp and udp rules need fromPort and toPort with fromPort <= toPort"))]
pub struct IngressRule {
    /// tcp, udp, icmp or all.
    pub protocol: IpProtocol,

    /// First port of the range (tcp, udp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub from_port: Option<i32>,

    /// Last port of the range (tcp, udp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub to_port: Option<i32>,

    /// Source IPv4 CIDR blocks.
    #[schemars(length(min = 1, max = 20), inner(length(min = 9, max = 18)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c).ip().family() == 4)")
        .message("each entry must be an IPv4 CIDR block, e.g. 0.0.0.0/0 or 203.0.113.0/24"))]
    pub cidr_blocks: Vec<String>,

    /// What the rule is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,
}

/// IP protocols for security group rules.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpProtocol {
    #[default]
    Tcp,
    Udp,
    Icmp,
    All,
}

/// Defaults for member machines.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineDefaults {
    /// Provider for members that set none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<MachineProvider>,

    /// SSH settings for members; a member's own fields win.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshSpec>,
}

/// The encrypted mesh between a Network's members.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// A WireGuard mesh: every member is a peer of every other. The
    /// operator generates each member's key pair (the private half in the
    /// Secret `<machine>-wireguard`), gives each member an address from
    /// `addressRange`, and configures the interface `nixops0` and its peers
    /// on every member over SSH; members need WireGuard and wireguard-tools
    /// (nix/nixops-network.nix provides them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardMesh>,
}

/// A WireGuard mesh.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireguardMesh {
    /// The IPv4 range members' mesh addresses come from, /16 to /29, e.g.
    /// 10.77.0.0/24. A member keeps its address while it exists. Immutable:
    /// members' addresses are kept while they exist.
    #[x_kube(validation = rules::ipv4_cidr())]
    #[x_kube(validation = Rule::new("cidr(self).prefixLength() >= 16 && cidr(self).prefixLength() <= 29")
        .message("the mesh range's prefix length must be between /16 and /29, e.g. 10.77.0.0/24"))]
    #[x_kube(validation = rules::immutable("the mesh address range"))]
    #[schemars(length(min = 9, max = 18))]
    pub address_range: String,

    /// UDP port every member listens on (the AWS security group opens it
    /// to the VPC and to members' public addresses). Default 51820.
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: i32,

    /// Seconds between keepalive packets to each peer, for members behind
    /// NAT or stateful firewalls; off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub persistent_keepalive: Option<i32>,
}

fn default_listen_port() -> i32 {
    51820
}

/// Rollout policy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Most machines deploying (and so possibly unavailable) at once.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_unavailable: i32,
}

fn default_max_unavailable() -> i32 {
    1
}

/// Observed state of a Network.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the Network's lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ResourcePhase>,

    /// Ready, Reconciling, Stalled, Provisioned, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = rules::list_map("type"))]
    pub conditions: Vec<Condition>,

    /// ec2, or empty for a network of existing hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,

    /// Number of member machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines: Option<i32>,

    /// Number of member machines that are Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_machines: Option<i32>,

    /// Member machines running their desired closure (rollout progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_machines: Option<i32>,

    /// Membership published to every member as /run/nixops/network.json
    /// (and its names in the member's hosts file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<NetworkMember>,

    /// The physical network the operator made for this Network: the VPC's
    /// ID (ec2), or the libvirt network's name (libvirt). `kubectl get
    /// networks -o wide` shows it as VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,

    /// IDs of the subnets by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<SubnetStatus>,

    /// ID of the security group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_group_id: Option<String>,

    /// ID of the internet gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internet_gateway_id: Option<String>,

    /// The credentials Secret this Network keeps from deletion until its
    /// cloud resources are deleted; released when the spec stops naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Lifecycle phase of Networks, Volumes, KeyPairs and S3Buckets.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum ResourcePhase {
    Pending,
    Provisioning,
    Ready,
    Failed,
    Deleting,
}

/// One member of a Network as published to the others.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMember {
    /// Machine name.
    pub name: String,
    /// Its addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<MachineAddress>,
    /// Its SSH host key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// Its address in the mesh (spec.mesh), kept while it is a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_address: Option<String>,
    /// Its WireGuard public key (spec.mesh.wireguard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_key: Option<String>,
}

/// A created subnet.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubnetStatus {
    /// Name from the spec.
    pub name: String,
    /// Subnet ID.
    pub id: String,
}
