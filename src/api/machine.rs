//! `Machine`: one NixOS host — where it runs, how to reach it, what it runs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Condition, DeletionPolicy, LocalObjectReference, ManagementPolicy, SecretKeyReference, Tags, rules};

/// A NixOS machine in a Network, the counterpart of a machine in a NixOps
/// deployment. `spec.nixos`, `keys` and `volumes` say what the machine is;
/// `provider` says where it runs.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[kube(
    group = "nixops.io",
    version = "v1alpha1",
    kind = "Machine",
    namespaced,
    status = "MachineStatus",
    shortname = "nixmachine",
    shortname = "nm",
    category = "nixops",
    doc = "A NixOS machine: where it runs (provider), how to reach it (ssh) and what it runs (nixos).",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Provider", type_ = "string", json_path = ".status.provider"),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.addresses[0].address"),
    printcolumn(name = "Closure", type_ = "string", json_path = ".status.closureShort"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.networkRef.name", priority = 1),
    printcolumn(name = "Generation", type_ = "integer", json_path = ".status.generation", priority = 1),
    printcolumn(name = "Provider-ID", type_ = "string", json_path = ".status.providerID", priority = 1),
    printcolumn(name = "Last-Deploy", type_ = "string", json_path = ".status.lastDeploy.result", priority = 1),
    printcolumn(name = "Rev", type_ = "string", json_path = ".status.build.rev", priority = 1),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.provider) == has(oldSelf.provider)")
    .message("cannot be added or removed after creation: the machine would move to or from its Network's machineDefaults.provider; create a new Machine instead")
    .field_path(".provider"))]
pub struct MachineSpec {
    /// The Network this machine belongs to. The Network supplies the cloud
    /// account, the physical network and defaults for provider and ssh.
    /// Immutable.
    #[x_kube(validation = rules::immutable("the Network"))]
    pub network_ref: LocalObjectReference,

    /// Where the machine runs. Exactly one block is set. When omitted, the
    /// Network's `machineDefaults.provider` is used. The kind of provider
    /// cannot change after creation, and this field cannot be added or
    /// removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<MachineProvider>,

    /// Whether the machine should be running (NixOps start/stop). `false`
    /// stops a cloud instance; it has no effect on existing hosts.
    #[serde(default = "default_true")]
    pub running: bool,

    /// How the operator reaches the machine over SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshSpec>,

    /// The NixOS system to deploy. Without it the machine is provisioned but
    /// nothing is deployed to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nixos: Option<NixosSpec>,

    /// Secrets uploaded to the machine before activation (NixOps
    /// `deployment.keys`), kept out of the Nix store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = rules::list_map("name"))]
    pub keys: Vec<MachineKey>,

    /// Volumes attached to this machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = rules::list_map("device"))]
    pub volumes: Vec<VolumeAttachment>,

    /// `Default` creates, updates and deletes the cloud resource; `Observe`
    /// only reads the existing one named by the `nixops.io/external-name`
    /// annotation and never changes or deletes it. With that annotation and
    /// `Default`, an existing resource is adopted instead of created.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// What happens to the cloud instance when this Machine is deleted:
    /// `Delete` terminates it, `Orphan` leaves it running. Existing hosts are
    /// never touched.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_true() -> bool {
    true
}

/// Where a machine runs. Exactly one block is set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.existing), has(self.ec2), has(self.libvirt)].filter(x, x).size() == 1")
    .message("exactly one provider block must be set: existing, ec2 or libvirt"))]
#[x_kube(validation = Rule::new("has(self.existing) == has(oldSelf.existing) && has(self.ec2) == has(oldSelf.ec2) && has(self.libvirt) == has(oldSelf.libvirt)")
    .message("the provider kind is immutable: a machine cannot move between existing, ec2 and libvirt; create a new Machine instead"))]
pub struct MachineProvider {
    /// A host that already runs NixOS and is reachable over SSH (NixOps
    /// `targetHost`). The operator deploys to it but never creates or deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<ExistingHost>,

    /// An Amazon EC2 instance in the Network's VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2: Option<Ec2Instance>,

    /// A libvirt (QEMU) virtual machine on the hypervisor of the Network's
    /// `provider.libvirt`, NixOps's libvirtd backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtMachine>,
}

impl MachineProvider {
    /// The name of the provider block that is set, as shown in `status.provider`.
    pub fn kind(&self) -> Option<&'static str> {
        match (&self.existing, &self.ec2, &self.libvirt) {
            (Some(_), _, _) => Some("existing"),
            (None, Some(_), _) => Some("ec2"),
            (None, None, Some(_)) => Some("libvirt"),
            (None, None, None) => None,
        }
    }
}

/// An existing host reachable over SSH.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExistingHost {
    /// DNS name or IP address of the host.
    #[x_kube(validation = rules::host())]
    #[schemars(length(min = 1, max = 253))]
    pub host: String,

    /// SSH port.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

fn default_ssh_port() -> i32 {
    22
}

/// An Amazon EC2 instance.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ec2Instance {
    /// Instance type, e.g. t3.small.
    #[x_kube(validation = Rule::new("self.matches('^[a-z][a-z0-9-]*\\\\.[a-z0-9]+$')")
        .message("must be an EC2 instance type such as t3.small or m7g.large"))]
    #[schemars(length(min = 3, max = 64))]
    pub instance_type: String,

    /// The AMI to boot, a NixOS image for the region (ami- followed by 8 or
    /// 17 hex digits). Changing it has no effect on a running instance:
    /// NixOS is updated by deploying a new closure, not by replacing the AMI.
    #[x_kube(validation = Rule::new("self.matches('^ami-([0-9a-f]{8}|[0-9a-f]{17})$')")
        .message("must be an AMI ID: 'ami-' followed by 8 or 17 hex digits, e.g. ami-0123456789abcdef0"))]
    #[schemars(length(max = 21))]
    pub ami: String,

    /// Name of a subnet declared in the Network's `provider.ec2.subnets`.
    /// Immutable: an instance cannot move between subnets.
    #[x_kube(validation = rules::immutable("the subnet"))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be the name of a subnet in the Network's spec.provider.ec2.subnets (lower-case letters, digits and '-')"))]
    #[schemars(length(min = 1, max = 63))]
    pub subnet: String,

    /// The root volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<RootVolume>,

    /// User data passed to the instance at first boot (plain text; the
    /// operator base64-encodes it). Do not put secrets here; use `keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub user_data: Option<String>,

    /// Extra tags for the instance and its root volume.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    #[schemars(length(max = 40))]
    pub tags: Tags,
}

/// A libvirt virtual machine. Its root disk is a qcow2 overlay in the
/// Network's storage pool backed by `baseImage`, so many machines share one
/// image. At first boot a NoCloud seed (a `cidata` disk) gives the machine
/// the login key of `spec.ssh.keyPairRef` and an SSH host key the operator
/// generated, which the operator pins before its first connection.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.baseImage.startsWith('https://') || self.baseImage.startsWith('http://')) || has(self.baseImageSha256)")
    .message("a baseImage URL needs baseImageSha256 (sha256sum IMAGE): the operator checks what it downloads")
    .field_path(".baseImageSha256"))]
pub struct LibvirtMachine {
    /// Virtual CPUs. A change of this, memoryMiB, networks,
    /// directKernelBoot or the extra XML defines the domain anew; a running
    /// machine gets it when powered off and started again (spec.running
    /// false, then true), and says so in its RestartRequired condition.
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: i32,

    /// Memory in MiB. Changes apply like those of vcpus.
    #[serde(rename = "memoryMiB", default = "default_memory_mib")]
    #[schemars(range(min = 128, max = 1048576))]
    pub memory_mib: i32,

    /// Size of the root disk in GiB (the overlay's virtual size), applied
    /// when the disk is created. It cannot shrink; an image that grows its
    /// root file system at boot uses the rest.
    #[serde(rename = "diskSizeGiB", default = "default_disk_size_gib")]
    #[schemars(range(min = 1, max = 16384))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("the root disk cannot shrink; set a size at least the current one"))]
    pub disk_size_gib: i32,

    /// The qcow2 image the root disk is an overlay of: an absolute path on
    /// the hypervisor, the name of a volume in the Network's storage pool
    /// (e.g. one uploaded with `virsh vol-upload`), or an http(s) URL with
    /// `baseImageSha256`, which the operator downloads, checks and uploads
    /// into the pool once per Network (as `<network>-base-<sha256>.qcow2`,
    /// deleted with the Network). Immutable: NixOS is updated by deploying
    /// a new closure, not by changing the image.
    #[x_kube(validation = Rule::new("self.startsWith('/') ? !self.split('/').exists(c, c == '..') : (self.startsWith('https://') || self.startsWith('http://') || self.matches('^[A-Za-z0-9][A-Za-z0-9._+-]*$'))")
        .message("must be an absolute path on the hypervisor without '..' components (/var/lib/libvirt/images/nixos.qcow2), a volume name in the storage pool (nixos.qcow2) or an http(s) URL"))]
    #[x_kube(validation = rules::immutable("the base image"))]
    #[schemars(length(min = 2, max = 4096))]
    pub base_image: String,

    /// The SHA-256 (hex) of the image a `baseImage` URL serves, required
    /// with one: the download is refused unless it matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("must be 64 lowercase hex digits (sha256sum IMAGE)"))]
    #[x_kube(validation = rules::immutable("the base image's checksum"))]
    pub base_image_sha256: Option<String>,

    /// Boot this kernel directly (QEMU's -kernel) instead of the image's
    /// boot loader, for images without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_kernel_boot: Option<DirectKernelBoot>,

    /// More libvirt networks on the hypervisor, by name (e.g. `default`):
    /// the machine gets an interface in each, after its interface in the
    /// Network's own network, which SSH uses (NixOps's
    /// `deployment.libvirtd.networks`). Changes apply like those of vcpus.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub networks: Vec<String>,

    /// Raw XML put inside the domain's `<devices>`, e.g. `<watchdog
    /// model='i6300esb' action='reset'/>` (NixOps's `extraDevicesXML`).
    /// It must be whole elements; libvirt checks the rest. Changes apply
    /// like those of vcpus.
    #[serde(rename = "extraDevicesXML", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub extra_devices_xml: Option<String>,

    /// Raw XML put inside `<domain>`, e.g. `<cputune>…</cputune>` (NixOps's
    /// `extraDomainXML`). Whole elements only; changes apply like those of
    /// vcpus.
    #[serde(rename = "extraDomainXML", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub extra_domain_xml: Option<String>,

    /// `qemu` emulates the CPU (TCG; works everywhere, slowly), `kvm` uses
    /// hardware virtualisation, `auto` uses kvm where it works: where the
    /// hypervisor's libvirt offers it and its CPU has hardware
    /// virtualisation (vmx or svm, or is not itself a guest), and qemu
    /// elsewhere, such as on a paravirtual /dev/kvm; decided when the
    /// domain is first defined, which then keeps its type.
    #[serde(default)]
    pub domain_type: LibvirtDomainType,
}

fn default_vcpus() -> i32 {
    1
}

fn default_memory_mib() -> i32 {
    512
}

fn default_disk_size_gib() -> i32 {
    8
}

/// A kernel, initrd and command line booted directly, all on the hypervisor.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectKernelBoot {
    /// Absolute path of the kernel image on the hypervisor.
    #[x_kube(validation = rules::absolute_path())]
    #[schemars(length(min = 2, max = 4096))]
    pub kernel: String,

    /// Absolute path of the initrd on the hypervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::absolute_path())]
    #[schemars(length(min = 2, max = 4096))]
    pub initrd: Option<String>,

    /// Kernel command line, e.g. `console=ttyS0 root=/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
}

/// How libvirt runs a machine's CPU.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LibvirtDomainType {
    /// kvm where it works on the hypervisor, else qemu.
    #[default]
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// CPU emulation (TCG).
    Qemu,
}

/// Root volume of an EC2 instance.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootVolume {
    /// Size in GiB (1 to 16384).
    #[serde(rename = "sizeGiB")]
    #[schemars(range(min = 1, max = 16384))]
    pub size_gib: i32,

    /// EBS volume type.
    #[serde(default, rename = "type")]
    pub volume_type: EbsVolumeType,
}

/// EBS volume types.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EbsVolumeType {
    /// General purpose SSD (current generation).
    #[default]
    Gp3,
    /// General purpose SSD (previous generation).
    Gp2,
    /// Provisioned IOPS SSD.
    Io1,
    /// Provisioned IOPS SSD (current generation).
    Io2,
    /// Throughput-optimised HDD.
    St1,
    /// Cold HDD.
    Sc1,
    /// Magnetic (previous generation).
    Standard,
}

/// How the operator connects to the machine.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshSpec {
    /// Login user. Deploying runs store, activation and key commands as
    /// root: directly as root, through `sudo -n` as any other user, which then
    /// needs passwordless sudo (NOPASSWD); without it the Machine stalls with
    /// SudoRefused. Defaults to root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::unix_name())]
    #[schemars(length(min = 1, max = 32))]
    pub user: Option<String>,

    /// The KeyPair whose private key the operator logs in with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pair_ref: Option<LocalObjectReference>,

    /// Address the operator connects to instead of the one the provider
    /// reports (a DNS name, a NAT or port forward). For ec2 the default is
    /// the public IP, else the private one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::host())]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,

    /// Port for `host`; defaults to the provider's (22, or existing.port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// The host's SSH public key, as in /etc/ssh/ssh_host_ed25519_key.pub;
    /// any type the host has (ed25519, ECDSA, RSA): the operator asks the
    /// host for a key of that type and refuses to talk to a host presenting
    /// any other key. When empty, the first key seen (ed25519 if the host has
    /// one) is recorded in status.hostKey and enforced from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::ssh_public_key())]
    #[schemars(length(max = 16384))]
    pub host_key: Option<String>,

    /// A bastion the operator connects through, like `ssh -J`. Taken from
    /// the Network's machineDefaults when the Machine does not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump_host: Option<JumpHost>,
}

/// A jump host (bastion). Its host key must be pinned: the operator never
/// sends credentials through an unverified host.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JumpHost {
    /// Address of the jump host.
    #[x_kube(validation = rules::host())]
    #[schemars(length(min = 1, max = 253))]
    pub host: String,

    /// SSH port of the jump host.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Login user on the jump host; defaults to the machine's ssh.user. It
    /// only forwards connections, so it needs no sudo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::unix_name())]
    #[schemars(length(min = 1, max = 32))]
    pub user: Option<String>,

    /// The KeyPair to log in to the jump host with; defaults to the machine's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pair_ref: Option<LocalObjectReference>,

    /// The jump host's SSH public key (`ssh-keyscan -t ed25519 HOST`), of
    /// any type it has; the operator asks for a key of that type.
    #[x_kube(validation = rules::ssh_public_key())]
    #[schemars(length(min = 1, max = 16384))]
    pub host_key: String,
}

/// The NixOS system deployed to a machine.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.delivery != 'Substitute' || (has(self.source) && has(self.source.binaryCache))")
    .message("delivery Substitute needs source.binaryCache: the node fetches the closure from that cache itself")
    .field_path(".delivery"))]
#[x_kube(validation = Rule::new("has(self.closure) != has(self.build)")
    .message("set exactly one of closure (a prebuilt store path) or build (a Git repository the operator builds)"))]
#[x_kube(validation = Rule::new("!has(self.build) || (!has(self.source) && self.delivery == 'Push')")
    .message("build pushes from the builder's store: source and delivery Substitute apply to a prebuilt closure only"))]
pub struct NixosSpec {
    /// The NixOS system closure to activate: the store path of a built
    /// `config.system.build.toplevel`, e.g. the output of
    /// `nix build .#nixosConfigurations.web-1.config.system.build.toplevel`.
    /// Empty when `build` is set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = rules::store_path())]
    #[schemars(length(min = 44, max = 256))]
    pub closure: String,

    /// Build the closure from Git instead (NixOps' way): the operator
    /// resolves the commit, builds it over SSH and deploys the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<super::build::BuildSpec>,

    /// Where the closure's store paths come from. Defaults to the operator
    /// host's local Nix store (for development).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ClosureSource>,

    /// How store paths reach the machine: `Push` streams the missing paths
    /// from the operator over SSH; `Substitute` makes the machine fetch them
    /// from source.binaryCache.
    #[serde(default)]
    pub delivery: Delivery,

    /// How the new configuration is activated (switch-to-configuration action).
    #[serde(default)]
    pub action: ActivationAction,

    /// Rollback behaviour when activation or health checks fail. Omitted,
    /// magic rollback is on with a 30 s confirmation window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackSpec>,

    /// Seconds switch-to-configuration may run before it is stopped and the
    /// machine rolled back to the system it ran before (10 to 3600; default
    /// 240, as deploy-rs).
    #[serde(default = "default_activation_timeout")]
    #[schemars(range(min = 10, max = 3600))]
    pub activation_timeout_seconds: i32,

    /// Checks run after activation; a failure rolls the machine back to the
    /// system it ran before this deployment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub health_checks: Vec<HealthCheck>,

    /// What to do when the active system differs from `closure` (someone ran
    /// nixos-rebuild on the machine, say): `Correct` re-activates `closure`,
    /// `Report` only sets InSync=False, `Ignore` does not check.
    #[serde(default)]
    pub drift: DriftPolicy,
}

/// Where store paths come from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.binaryCache), has(self.localStore)].filter(x, x).size() <= 1")
    .message("set at most one of binaryCache or localStore"))]
pub struct ClosureSource {
    /// A Nix binary cache holding the closure, with the keys its narinfo
    /// files must be signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_cache: Option<BinaryCache>,

    /// The Nix store of the host the operator runs on (development only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_store: Option<LocalStore>,
}

/// A Nix binary cache.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BinaryCache {
    /// Cache URL: file:///path, http(s)://host/path or s3://bucket?region=…
    #[x_kube(validation = Rule::new("self.matches('^(file|https?|s3)://.+$')")
        .message("must be a binary cache URL starting with file://, http://, https:// or s3://"))]
    #[schemars(length(min = 8, max = 2048))]
    pub url: String,

    /// Trusted public keys, as in nix.conf's trusted-public-keys
    /// (`name:base64`). Every path must carry a signature by one of them.
    #[schemars(length(min = 1, max = 16), inner(length(max = 256)))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[A-Za-z0-9._-]+:[A-Za-z0-9+/]{43}=$'))")
        .message("each public key must look like 'cache.example.org-1:<44 characters of base64>', as printed by nix key convert-secret-to-public"))]
    pub public_keys: Vec<PublicKey>,
}

/// A Nix signing public key, `name:base64`.
pub type PublicKey = String;

/// The operator host's local Nix store.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalStore {
    /// Root of the Nix state directory; defaults to /nix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::absolute_path())]
    #[schemars(length(max = 4096))]
    pub root: Option<String>,
}

/// How store paths reach the machine.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum Delivery {
    /// The operator streams missing paths over SSH.
    #[default]
    Push,
    /// The machine fetches the paths from the binary cache itself.
    Substitute,
}

/// The `switch-to-configuration` action.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationAction {
    /// Activate now and make it the boot default.
    #[default]
    Switch,
    /// Make it the boot default; activate on next reboot.
    Boot,
    /// Activate now without changing the boot default.
    Test,
    /// Show what activation would do, change nothing.
    DryActivate,
}

impl ActivationAction {
    /// The argument `switch-to-configuration` takes.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Switch => "switch",
            Self::Boot => "boot",
            Self::Test => "test",
            Self::DryActivate => "dry-activate",
        }
    }
}

/// Rollback behaviour. Every failed activation or health check rolls the
/// machine back to the system it ran before the deployment, and the failed
/// generation is removed from the system profile.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RollbackSpec {
    /// Magic rollback (default true): a watchdog started on the machine
    /// before switch-to-configuration reverts it to the system it ran
    /// before unless the operator confirms over a new SSH connection in
    /// time, so a configuration that breaks SSH, or an operator that dies
    /// mid-deployment, cannot strand it.
    #[serde(default = "default_true")]
    pub magic: bool,

    /// Seconds the machine waits for the confirmation (5 to 3600).
    #[serde(default = "default_confirm_timeout")]
    #[schemars(range(min = 5, max = 3600))]
    pub confirm_timeout_seconds: i32,
}

fn default_confirm_timeout() -> i32 {
    30
}

fn default_activation_timeout() -> i32 {
    240
}

impl Default for RollbackSpec {
    fn default() -> Self {
        Self { magic: true, confirm_timeout_seconds: default_confirm_timeout() }
    }
}

/// A check run after activation. Exactly one of command or http is set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.command), has(self.http)].filter(x, x).size() == 1")
    .message("a health check sets exactly one of command or http"))]
pub struct HealthCheck {
    /// A shell command run on the machine; exit code 0 means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub command: Option<String>,

    /// An HTTP GET made from the machine (so it can reach localhost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,

    /// Seconds before the check counts as failed.
    #[serde(default = "default_check_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,
}

fn default_check_timeout() -> i32 {
    60
}

/// An HTTP probe run from the machine.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// URL to GET, e.g. http://localhost:8080/healthz.
    #[x_kube(validation = rules::http_url())]
    #[schemars(length(max = 2048))]
    pub url: String,

    /// Status code that counts as healthy.
    #[serde(default = "default_expected_status")]
    #[schemars(range(min = 100, max = 599))]
    pub expected_status: i32,
}

fn default_expected_status() -> i32 {
    200
}

/// What to do about drift between the active and the desired system.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum DriftPolicy {
    /// Re-activate the desired closure.
    #[default]
    Correct,
    /// Only report it (InSync=False).
    Report,
    /// Do not check.
    Ignore,
}

/// A secret file uploaded to the machine (NixOps `deployment.keys`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineKey {
    /// File name of the key within destDir.
    #[x_kube(validation = rules::file_name())]
    #[schemars(length(min = 1, max = 255))]
    pub name: String,

    /// The Secret key holding the file's content.
    pub secret_ref: SecretKeyReference,

    /// Directory the file is written to.
    #[serde(default = "default_key_dir")]
    #[x_kube(validation = rules::absolute_path())]
    #[schemars(length(min = 1, max = 4096))]
    pub dest_dir: String,

    /// Owner of the file.
    #[serde(default = "default_root")]
    #[x_kube(validation = rules::unix_name())]
    #[schemars(length(min = 1, max = 32))]
    pub user: String,

    /// Group of the file.
    #[serde(default = "default_root")]
    #[x_kube(validation = rules::unix_name())]
    #[schemars(length(min = 1, max = 32))]
    pub group: String,

    /// File mode as an octal string, e.g. "0400".
    #[serde(default = "default_key_mode")]
    #[x_kube(validation = rules::file_mode())]
    #[schemars(length(min = 3, max = 4))]
    pub permissions: String,
}

fn default_key_dir() -> String {
    "/run/keys".into()
}

fn default_root() -> String {
    "root".into()
}

fn default_key_mode() -> String {
    "0600".into()
}

/// A Volume attached to this machine.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachment {
    /// The Volume to attach, in this namespace.
    pub volume_ref: LocalObjectReference,

    /// Device name the volume appears as on the machine, e.g. /dev/xvdf.
    #[x_kube(validation = rules::device_path())]
    #[schemars(length(min = 6, max = 256))]
    pub device: String,
}

/// Observed state of a Machine.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of where the machine is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MachinePhase>,

    /// Ready, Reconciling, Stalled, Provisioned, Deployed, Healthy, InSync, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = rules::list_map("type"))]
    pub conditions: Vec<Condition>,

    /// The provider block in use: existing or ec2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,

    /// Cloud identity, e.g. aws:///eu-west-1a/i-0abc…; empty for existing hosts.
    #[serde(default, rename = "providerID", skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,

    /// Addresses the machine is reachable at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<MachineAddress>,

    /// The SSH host key the machine presented and the operator pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,

    /// The system closure active on the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure: Option<String>,

    /// The active closure shortened for display: first 7 hash characters and the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure_short: Option<String>,

    /// Number of the active system profile generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,

    /// The most recent deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deploy: Option<DeployRecord>,

    /// Key files (spec.keys) the operator has placed on the machine; paths
    /// only, never contents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,

    /// The last build of spec.nixos.build: the commit, the closure and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<super::build::BuildRecord>,
    /// The last check asked for with the `nixops.io/check` annotation
    /// (`kubectl nixops check`), or made after a reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckRecord>,

    /// The last reboot asked for with the `nixops.io/reboot` annotation
    /// (`kubectl nixops reboot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reboot: Option<RebootRecord>,

    /// The last dry activation asked for with the `nixops.io/dry-activate`
    /// annotation (`kubectl nixops deploy --dry-activate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dry_activation: Option<DryActivationRecord>,

    /// The last file system sync asked for with the `nixops.io/sync`
    /// annotation (a Backup of an attached Volume asks before snapshotting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncRecord>,
}

/// Lifecycle phase of a Machine.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum MachinePhase {
    Pending,
    Provisioning,
    Deploying,
    Running,
    Stopped,
    Failed,
    Deleting,
}

/// An address of a machine.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineAddress {
    /// ExternalIP, InternalIP or Hostname.
    #[serde(rename = "type")]
    pub address_type: String,
    /// The address.
    pub address: String,
}

/// Record of one deployment.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeployRecord {
    /// The closure deployed.
    pub closure: String,
    /// When the deployment started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The system the machine ran when the deployment started: what a
    /// failed activation or health check rolls back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_closure: Option<String>,
    /// Store paths copied to the machine.
    #[serde(default)]
    pub paths_copied: i64,
    /// Bytes of NAR data copied to the machine.
    #[serde(default)]
    pub bytes_copied: i64,
    /// Store paths the machine lacked when the deployment started.
    #[serde(default)]
    pub paths_total: i64,
    /// Their NAR size in bytes.
    #[serde(default)]
    pub bytes_total: i64,
    /// Pushing, Activating, Succeeded, Failed or RolledBack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// What happened, for a failure or rollback: the step, the exit status
    /// and the end of the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The Machine's metadata.generation this deployment was made for. A
    /// failed closure is not retried until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_generation: Option<i64>,
}

/// Results a deployment ends in (DeployRecord.result).
pub mod deploy_result {
    pub const PUSHING: &str = "Pushing";
    pub const ACTIVATING: &str = "Activating";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const ROLLED_BACK: &str = "RolledBack";
}

/// Annotation asking the operator to check the machine now (NixOps
/// `check`); its value names the request, and status.lastCheck.request
/// acknowledges it.
pub const CHECK_ANNOTATION: &str = "nixops.io/check";
/// Annotation asking the operator to reboot the machine (NixOps `reboot`);
/// its value names the request, and status.lastReboot.request acknowledges it.
pub const REBOOT_ANNOTATION: &str = "nixops.io/reboot";

/// Annotation asking the operator for a dry activation of the closure in
/// `nixops.io/dry-activate-closure` (default spec.nixos.closure); its value
/// names the request, and status.lastDryActivation.request acknowledges it.
pub const DRY_ACTIVATE_ANNOTATION: &str = "nixops.io/dry-activate";
/// The closure a dry activation is asked for.
pub const DRY_ACTIVATE_CLOSURE_ANNOTATION: &str = "nixops.io/dry-activate-closure";

/// Annotation asking the operator to flush the machine's file systems
/// (`sync`); its value names the request (a Backup's UID), and
/// status.lastSync.request acknowledges it.
pub const SYNC_ANNOTATION: &str = "nixops.io/sync";

/// A `sync` the operator ran on the machine.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncRecord {
    /// The value of the annotation this answers.
    pub request: String,
    /// When `sync` returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_at: Option<Time>,
}

/// What `switch-to-configuration dry-activate` said a closure would change.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DryActivationRecord {
    /// The value of the annotation this answers.
    pub request: String,
    /// The closure copied to the machine and dry-activated.
    pub closure: String,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Whether it ran to the end with exit status 0.
    pub succeeded: bool,
    /// The end of what it printed: the units it would start, stop, restart.
    #[serde(default)]
    pub output: String,
}

/// What a check found on the machine.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckRecord {
    /// The value of the annotation this check answers.
    pub request: String,
    /// When the machine was probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
    /// Healthy, or Degraded with the message saying what is wrong.
    pub result: CheckResult,
    /// What is wrong, for a result other than Healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The system /run/current-system points to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_closure: Option<String>,
    /// Whether that is spec.nixos.closure (true when nothing is deployed).
    #[serde(default)]
    pub in_sync: bool,
    /// systemd units in the failed state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_units: Vec<String>,
    /// Load averages over 1, 5 and 15 minutes, as in /proc/loadavg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<String>,
    /// Free bytes on the file system holding /nix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix_free_bytes: Option<i64>,
    /// Size in bytes of the file system holding /nix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix_size_bytes: Option<i64>,
}

/// How a check ended.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum CheckResult {
    /// The desired system is active, no unit failed.
    #[default]
    Healthy,
    /// Another system is active, or units failed, or the check could not run.
    Degraded,
}

/// A reboot the operator made.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebootRecord {
    /// The value of the annotation this reboot answers.
    pub request: String,
    /// When the reboot was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the machine was back (or the reboot failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Rebooting, Succeeded or Failed.
    pub result: RebootResult,
    /// What happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a reboot is.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum RebootResult {
    /// Asked for; the machine is not back yet.
    #[default]
    Rebooting,
    /// The machine came back with the same host key.
    Succeeded,
    /// It did not come back in time, came back with another host key, or
    /// refused to reboot; the message says which.
    Failed,
}
