//! Test support: a real hypervisor for the libvirt provider. libvirtd and
//! virtlogd from Debian's packages, started once per test binary by
//! hack/libvirt/start.sh in namespaces of their own (mount, pid, network)
//! and stopped with the test process however it ends; QEMU VMs (TCG) boot
//! the image hack/libvirt/image.sh builds from Debian packages.
//!
//! The hypervisor's network namespace is routed from the host through a
//! veth pair: libvirt networks inside its /16 (mode `route`) reach the
//! operator, which SSHes to the VMs as it would on a workstation.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use nixops_operator::api::{Machine, Network};
use serde_json::json;

use super::fleet::Fleet;

/// TCG VMs are slow, more so on a shared machine: generous deadlines.
pub const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// A running libvirtd and the test image.
pub struct Hypervisor {
    /// The libvirt URI (qemu:///system through this hypervisor's socket).
    pub uri: String,
    /// Second octet of the routed 10.X.0.0/16.
    pub octet: u8,
    /// The directory of the test image (base.qcow2, vmlinuz, initrd.img, cmdline).
    pub image: PathBuf,
    /// The same hypervisor as a remote one: sshd in its network namespace.
    pub remote: Remote,
}

/// What a `qemu+ssh://` login to the hypervisor needs.
pub struct Remote {
    /// sshd's address (port 22), in the hypervisor's network namespace.
    pub host: String,
    /// sshd's ed25519 public key.
    pub host_key: String,
    /// A private key root may log in with.
    pub private_key: String,
    /// libvirtd's socket.
    pub socket: String,
    /// A process in the hypervisor's namespaces, for `nsenter`.
    pub ns_pid: String,
}

/// VMs take much of this machine's CPU: one test boots VMs at a time.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The hypervisor of this test binary, started on first use, with a storage
/// pool "default" in its directory.
pub fn hypervisor() -> &'static Hypervisor {
    static HYPERVISOR: OnceLock<Hypervisor> = OnceLock::new();
    HYPERVISOR.get_or_init(|| {
        let image = Command::new(super::repo_root().join("hack/libvirt/image.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run hack/libvirt/image.sh");
        assert!(image.status.success(), "hack/libvirt/image.sh failed; run hack/libvirt/install.sh first");
        let image = PathBuf::from(String::from_utf8_lossy(&image.stdout).trim());
        let dir =
            tempfile::Builder::new().prefix("nixops-libvirt-").tempdir().expect("create hypervisor directory").keep(); // the watchdog removes it when this process exits
        let started = std::time::Instant::now();
        let out = Command::new(super::repo_root().join("hack/libvirt/start.sh"))
            .arg(&dir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("run hack/libvirt/start.sh");
        assert!(out.status.success(), "hack/libvirt/start.sh failed; see its output above");
        let vars: std::collections::HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let cidr = &vars["CIDR"];
        let octet = cidr.split('.').nth(1).and_then(|o| o.parse().ok()).expect("CIDR 10.X.0.0/16");
        let remote = Remote {
            host: vars["SSH_HOST"].clone(),
            host_key: std::fs::read_to_string(&vars["SSH_HOST_KEY_FILE"])
                .expect("the hypervisor's host key")
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
            private_key: std::fs::read_to_string(&vars["SSH_KEY"]).expect("the hypervisor's login key"),
            socket: vars["SOCKET"].clone(),
            ns_pid: vars["NS_PID"].clone(),
        };
        let hv = Hypervisor { uri: vars["URI"].clone(), octet, image, remote };
        hv.virsh(&["pool-define-as", "default", "dir", "--target", &vars["POOL_DIR"]]);
        hv.virsh(&["pool-start", "default"]);
        eprintln!("libvirtd started in {:?} ({})", started.elapsed(), hv.uri);
        hv
    })
}

impl Hypervisor {
    /// Runs virsh against this hypervisor; panics on failure.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("virsh").arg("-q").arg("-c").arg(&self.uri).args(args).output().expect("run virsh");
        assert!(out.status.success(), "virsh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn names(&self, args: &[&str]) -> Vec<String> {
        self.virsh(args).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
    }

    /// `virsh list --all`: every domain, running or not.
    pub fn domains(&self) -> Vec<String> {
        self.names(&["list", "--all", "--name"])
    }

    /// `virsh net-list --all`.
    pub fn networks(&self) -> Vec<String> {
        self.names(&["net-list", "--all", "--name"])
    }

    /// The volumes of pool "default".
    pub fn volumes(&self) -> Vec<String> {
        self.virsh(&["vol-list", "default"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// `virsh domstate` of the domain whose UUID is `uid`.
    pub fn domain_state(&self, uid: &str) -> String {
        self.virsh(&["domstate", uid]).trim().to_owned()
    }

    /// A Network's `spec.provider`: a routed libvirt network 10.X.`subnet`.0/24.
    pub fn network_provider(&self, subnet: u8) -> serde_json::Value {
        json!({"libvirt": {
            "uri": self.uri,
            "mode": "route",
            "cidr": format!("10.{}.{subnet}.0/24", self.octet),
            "storagePool": "default",
        }})
    }

    /// A Network's `spec.provider` reaching this hypervisor as a remote
    /// one over SSH, pinning `host_key`, with the login key in Secret
    /// `secret`: a NAT network 10.X.`subnet`.0/24, which only the
    /// hypervisor reaches (libvirt's firewall rejects new connections into
    /// it from outside).
    pub fn remote_network_provider(&self, subnet: u8, secret: &str, host_key: &str) -> serde_json::Value {
        json!({"libvirt": {
            "uri": format!("qemu+ssh://root@{}/system?socket={}", self.remote.host, self.remote.socket),
            "mode": "nat",
            "cidr": format!("10.{}.{subnet}.0/24", self.octet),
            "storagePool": "default",
            "ssh": {"credentialsSecretRef": {"name": secret}, "hostKey": host_key},
        }})
    }

    /// A Machine's `spec.provider`: a small TCG VM of the test image.
    pub fn machine_provider(&self) -> serde_json::Value {
        let cmdline = std::fs::read_to_string(self.image.join("cmdline")).expect("image cmdline");
        json!({"libvirt": {
            "vcpus": 1,
            "memoryMiB": 256,
            "diskSizeGiB": 4,
            "baseImage": self.image.join("base.qcow2"),
            "directKernelBoot": {
                "kernel": self.image.join("vmlinuz"),
                "initrd": self.image.join("initrd.img"),
                "cmdline": cmdline.trim(),
            },
            "domainType": "qemu",
        }})
    }

    /// The test image's base.qcow2 as a volume of pool "default" (copied
    /// in once), for a baseImage naming a volume instead of a path.
    pub fn base_volume(&self) -> &'static str {
        static COPIED: OnceLock<()> = OnceLock::new();
        const NAME: &str = "test-base.qcow2";
        COPIED.get_or_init(|| {
            let pool = self.virsh(&["pool-dumpxml", "default"]);
            let dir =
                pool.split("<path>").nth(1).and_then(|rest| rest.split("</path>").next()).expect("pool default's path");
            std::fs::copy(self.image.join("base.qcow2"), format!("{dir}/{NAME}")).expect("copy the base image");
            self.virsh(&["pool-refresh", "default"]);
        });
        NAME
    }

    /// RSS of every QEMU process of this hypervisor, in KiB.
    pub fn qemu_rss_kib(&self) -> Vec<u64> {
        let out = Command::new("ps").args(["-C", "qemu-system-x86_64", "-o", "rss="]).output().expect("ps");
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

/// SSH to a VM as root with `private_key`, accepting only `host_key` (the
/// key the Machine's status pins): a VM that presented another one fails.
pub fn ssh(address: &str, private_key: &str, host_key: &str, command: &str) -> std::process::Output {
    ssh_from(None, address, private_key, host_key, command)
}

/// [`ssh`] from inside the network namespace of the process `ns_pid`
/// (the hypervisor's, which alone reaches its NAT networks), or the host's.
pub fn ssh_from(
    ns_pid: Option<&str>,
    address: &str,
    private_key: &str,
    host_key: &str,
    command: &str,
) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("ssh dir");
    let key = dir.path().join("id");
    std::fs::write(&key, private_key).expect("write key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, format!("{address} {host_key}\n")).expect("write known_hosts");
    let mut ssh = match ns_pid {
        Some(pid) => {
            let mut nsenter = Command::new("nsenter");
            nsenter.args(["-t", pid, "-n", "ssh"]);
            nsenter
        }
        None => Command::new("ssh"),
    };
    ssh.args(["-i", &key.to_string_lossy()])
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"])
        .args(["-o", &format!("UserKnownHostsFile={}", known.display())])
        .arg(format!("root@{address}"))
        .arg(command)
        .output()
        .expect("run ssh")
}

/// A Fleet whose Network "net" has `provider.libvirt` on `hv`'s subnet
/// 10.X.`subnet`.0/24, once that Network is Ready.
pub async fn start_fleet(prefix: &str, hv: &Hypervisor, subnet: u8) -> Fleet {
    let fleet = Fleet::start(prefix, json!({"provider": hv.network_provider(subnet)})).await;
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    super::wait_for(&networks, "net", VM_TIMEOUT, "Network Ready", |n| {
        n.status.as_ref().is_some_and(|s| super::is_ready(&s.conditions) && s.vpc_id.is_some())
    })
    .await;
    fleet
}

/// Creates Machine `name` in "net" on `hv`, deploying `nixos` if given;
/// `extra` is merged into its spec.
pub async fn create_machine_with(
    fleet: &Fleet,
    hv: &Hypervisor,
    name: &str,
    nixos: Option<&str>,
    extra: serde_json::Value,
) {
    let mut spec = json!({
        "networkRef": {"name": "net"},
        "provider": hv.machine_provider(),
        "ssh": {"keyPairRef": {"name": "deployer"}},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    if let Some(closure) = nixos {
        spec["nixos"] = json!({"closure": closure});
    }
    let machine: Machine = serde_json::from_value(json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    fleet.machines.create(&PostParams::default(), &machine).await.unwrap();
}

/// The deployer KeyPair's private key (the Secret the Fleet made).
pub async fn private_key(fleet: &Fleet) -> String {
    let secret = Api::<Secret>::namespaced(fleet.client.clone(), &fleet.ns).get("deployer-ssh").await.unwrap();
    let data = secret.data.unwrap();
    String::from_utf8(data["ssh-privatekey"].0.clone()).unwrap()
}

/// Runs `command` in the machine over SSH, pinning the host key its status records.
pub async fn exec(fleet: &Fleet, machine: &Machine, command: &str) -> String {
    let status = machine.status.clone().unwrap();
    let address = status.addresses.first().expect("an address").address.clone();
    let host_key = status.host_key.expect("status.hostKey");
    let out = ssh(&address, &private_key(fleet).await, &host_key, command);
    assert!(out.status.success(), "ssh {address} {command:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Deletes the Machines and the Network and waits until they are gone.
pub async fn delete_all(fleet: &Fleet, machines: &[&str]) {
    for name in machines {
        fleet.machines.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let networks: Api<Network> = Api::namespaced(fleet.client.clone(), &fleet.ns);
    networks.delete("net", &DeleteParams::default()).await.unwrap();
    for name in machines {
        super::wait_gone(&fleet.machines, name, VM_TIMEOUT).await;
    }
    super::wait_gone(&networks, "net", VM_TIMEOUT).await;
}
