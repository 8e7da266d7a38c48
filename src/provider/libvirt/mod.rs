//! libvirt (QEMU): NixOps's libvirtd backend. A Network's `provider.libvirt`
//! names a hypervisor (its connection URI and storage pool) and owns a
//! libvirt network; a Machine's is a domain on it, booted from a qcow2
//! overlay of a shared base image, with a NoCloud seed that installs the
//! login key and a host key the operator generated.
//!
//! Every libvirt object is identified by its owner: a domain's and a
//! network's UUID is the owning object's UID, so after a crash the lookup by
//! UUID finds what was defined and a second define could only redefine the
//! same one. Volumes are named after their domain. Calls go through the
//! `virt` crate (libvirt's own client library) on blocking threads.

pub mod image;
pub mod remote;
pub mod seed;
pub mod volume;
pub mod xml;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorDomain, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::{
    CloudTarget, Instance, InstanceState, Lookup, MachineProvider, MachineTarget, NetworkPart, NetworkProvider,
    NetworkResources, NetworkState, Owner, ProviderError, Providers,
};
use crate::api::machine::{LibvirtMachine, MachineAddress};
use crate::api::network::LibvirtNetwork;
use crate::metrics::Metrics;
use remote::Connection;
use xml::{Cidr, DomainOwner, DomainSpec, ResolvedDomainType};

/// Port sshd listens on in the image; spec.ssh.port overrides it.
/// A libvirt Machine's providerID is this and its domain's UUID (the Machine's UID).
pub(crate) const PROVIDER_ID_PREFIX: &str = "libvirt:///";

const SSH_PORT: u16 = 22;

/// How long a stop waits for the guest to power off after the ACPI
/// shutdown request before it pulls the plug.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long a reconcile waits for a started domain's DHCP lease before it
/// returns and tries again later.
const LEASE_WAIT: Duration = Duration::from_secs(20);

/// How long a look at a domain waits for its guest agent's addresses.
const AGENT_WAIT: Duration = Duration::from_secs(5);

/// The providers of this module, registered for `provider.libvirt` blocks.
/// `client` reads the credentials Secrets of remote hypervisors, and
/// `ssh_timeout` bounds the SSH connection to them.
pub fn register(providers: &mut Providers, client: kube::Client, metrics: Metrics, ssh_timeout: Duration) {
    let tunnels = remote::Tunnels::new(client, metrics.clone(), ssh_timeout);
    let libvirt =
        Arc::new(Libvirt { metrics, tunnels, images: Default::default(), refused_images: Default::default() });
    providers.add_machine_provider(libvirt.clone());
    providers.networks.insert("libvirt", libvirt.clone());
    providers.volumes.insert("libvirt", libvirt);
}

/// Provider for `provider.libvirt` of Machines, Networks and Volumes.
pub struct Libvirt {
    metrics: Metrics,
    tunnels: remote::Tunnels,
    /// One upload at a time per downloaded image volume.
    images: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Image URLs and checksums refused lately (wrong checksum, 4xx), with why.
    refused_images: std::sync::Mutex<std::collections::HashMap<String, RefusedImage>>,
}

/// When an image URL was refused, and the Stalled reason and message.
type RefusedImage = (Instant, &'static str, String);

/// How long a refused image URL and checksum are answered from memory
/// instead of being downloaded again.
const REFUSED_IMAGE_MEMORY: Duration = Duration::from_secs(30 * 60);

impl Libvirt {
    /// Runs `work` (blocking libvirt calls) on a blocking thread, counted in
    /// `nixops_provider_calls_total` as `operation`.
    async fn call<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let result = tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Err(ProviderError::Transient(format!("libvirt call {operation} failed: {e}"))));
        self.metrics.provider_call("libvirt", operation, result.is_ok());
        result
    }
}

impl Libvirt {
    /// Downloads and uploads the image of a baseImage URL into the pool,
    /// unless the Network has it already. One at a time per image: machines
    /// created together share one download.
    async fn ensure_image(&self, place: &MachinePlace, conn: &Connection) -> Result<(), ProviderError> {
        let Some(name) = place.downloaded_image() else { return Ok(()) };
        let lock = self.images.lock().unwrap_or_else(|e| e.into_inner()).entry(name.clone()).or_default().clone();
        let _one = lock.lock().await;
        let (pool_name, looking, lookup_conn) = (place.network.storage_pool.clone(), name.clone(), conn.clone());
        let present = self
            .call("find-image", move || {
                let hv = Hypervisor::open(&lookup_conn)?;
                Ok(lookup_volume(&hv.pool(&pool_name)?, &looking)?.is_some())
            })
            .await?;
        if present {
            return Ok(());
        }
        let url = place.spec.base_image.clone();
        let sha256 = place.spec.base_image_sha256.clone().unwrap_or_default();
        // A Machine stalled on a wrong checksum is retried at every resync:
        // the same URL and checksum are not downloaded again for a while.
        let key = format!("{url}#{sha256}");
        if let Some((at, reason, message)) = self.refused_images.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && at.elapsed() < REFUSED_IMAGE_MEMORY
        {
            return Err(ProviderError::permanent(reason, message.clone()));
        }
        let started = Instant::now();
        let (file, length) = match image::download(&url, &sha256).await {
            Ok(downloaded) => downloaded,
            Err(ProviderError::Permanent { reason, message }) => {
                let remembered = (Instant::now(), reason, message.clone());
                self.refused_images.lock().unwrap_or_else(|e| e.into_inner()).insert(key, remembered);
                return Err(ProviderError::Permanent { reason, message });
            }
            Err(other) => return Err(other),
        };
        tracing::info!(%url, length, seconds = started.elapsed().as_secs_f64(), "downloaded a base image");
        let (pool_name, conn) = (place.network.storage_pool.clone(), conn.clone());
        self.call("upload-image", move || {
            let hv = Hypervisor::open(&conn)?;
            let pool = hv.pool(&pool_name)?;
            image::install(&hv, &pool, &name, std::io::BufReader::new(file), length).map(drop)
        })
        .await
    }
}

/// A connection to a hypervisor, closed when dropped.
struct Hypervisor(Connect);

impl Hypervisor {
    fn open(conn: &Connection) -> Result<Self, ProviderError> {
        // libvirt prints every error to stderr by default; they are returned.
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(virt::error::clear_error_callback);
        Connect::open(Some(&conn.uri)).map(Self).map_err(|e| {
            ProviderError::Transient(format!(
                "cannot connect to libvirt at {} (the Network's spec.provider.libvirt.uri): {}",
                conn.shown,
                e.message()
            ))
        })
    }

    fn pool(&self, name: &str) -> Result<StoragePool, ProviderError> {
        let pool = StoragePool::lookup_by_name(&self.0, name).map_err(|e| match e.code() {
            ErrorNumber::NoStoragePool => ProviderError::permanent(
                "StoragePoolNotFound",
                format!(
                    "storage pool {name} (the Network's spec.provider.libvirt.storagePool) does not exist on the hypervisor; create it (virsh pool-define-as) or name another"
                ),
            ),
            _ => failed(format!("looking up storage pool {name}"))(e),
        })?;
        if !pool.is_active().map_err(failed(format!("checking storage pool {name}")))? {
            pool.create(0).map_err(failed(format!("starting storage pool {name}")))?;
        }
        Ok(pool)
    }

    /// The storage pool, or None when the hypervisor has no pool of that
    /// name: for deletions, which have nothing to delete there then (a
    /// pool that never existed must not keep a Network from going).
    fn pool_if_exists(&self, name: &str) -> Result<Option<StoragePool>, ProviderError> {
        match self.pool(name) {
            Ok(pool) => Ok(Some(pool)),
            Err(ProviderError::Permanent { reason: "StoragePoolNotFound", .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether kvm domains work on the hypervisor ([`xml::kvm_works`]).
    fn offers_kvm(&self) -> Result<bool, ProviderError> {
        let caps =
            self.0.get_capabilities().map_err(failed("reading the hypervisor's capabilities (domainType auto)"))?;
        Ok(xml::kvm_works(&caps))
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// A libvirt error, for a provider error saying what was being done.
fn failed(doing: impl std::fmt::Display) -> impl FnOnce(virt::error::Error) -> ProviderError {
    move |e| match e.code() {
        ErrorNumber::XmlError | ErrorNumber::XmlDetail | ErrorNumber::InvalidArg => {
            ProviderError::permanent("LibvirtRejected", format!("libvirt refused {doing}: {}", e.message()))
        }
        _ => ProviderError::Transient(format!("libvirt: {doing}: {}", e.message())),
    }
}

/// Whether libvirt failed to answer rather than refused: the connection
/// (RPC, a remote tunnel) or the hypervisor's own resources (a system call
/// failing: a full disk, permissions). Such an error is retried and never
/// taken as a verdict on the spec.
fn is_unanswered(e: &virt::error::Error) -> bool {
    matches!(e.domain(), ErrorDomain::Rpc | ErrorDomain::Remote)
        || matches!(
            e.code(),
            ErrorNumber::SystemError
                | ErrorNumber::Rpc
                | ErrorNumber::NoConnect
                | ErrorNumber::OperationTimeout
                | ErrorNumber::OperationAborted
                | ErrorNumber::NoMemory
        )
}

fn is_not_found(e: &virt::error::Error) -> bool {
    matches!(e.code(), ErrorNumber::NoDomain | ErrorNumber::NoNetwork | ErrorNumber::NoStorageVolume)
}

/// The object's own `provider.libvirt` of a Network.
fn network_spec(network: &crate::api::Network) -> Result<LibvirtNetwork, ProviderError> {
    network.spec.provider.as_ref().and_then(|p| p.libvirt.clone()).ok_or_else(|| {
        ProviderError::permanent(
            "NoLibvirtNetwork",
            format!(
                "Network {} has no spec.provider.libvirt; a libvirt machine or volume needs a Network with a libvirt hypervisor",
                kube::ResourceExt::name_any(network)
            ),
        )
    })
}

/// A name unique on the hypervisor and readable in `virsh list`.
fn object_name(owner: &Owner) -> String {
    let short: String = owner.uid.chars().filter(|c| *c != '-').take(8).collect();
    format!("{}-{}-{short}", owner.namespace, owner.name)
}

/// The libvirt network of a Network.
pub fn network_name(network: &crate::api::Network) -> String {
    object_name(&Owner::of(network))
}

/// The hypervisor a Machine's Network names, and the machine's spec.
struct MachinePlace {
    network: LibvirtNetwork,
    /// The Network's own libvirt network's range.
    cidr: Cidr,
    network_name: String,
    spec: LibvirtMachine,
    domain: String,
}

impl MachinePlace {
    fn of(target: &MachineTarget) -> Result<Self, ProviderError> {
        let network =
            target.network.as_ref().ok_or_else(|| ProviderError::Refused("the Network is not resolved yet".into()))?;
        let spec = target
            .provider
            .libvirt
            .clone()
            .ok_or_else(|| ProviderError::permanent("NoProvider", "spec.provider.libvirt is not set"))?;
        let network_spec = network_spec(network)?;
        let cidr = Cidr::parse(&network_spec.cidr, "spec.provider.libvirt.cidr")
            .map_err(|e| ProviderError::permanent("InvalidCIDR", e))?;
        Ok(Self {
            network: network_spec,
            cidr,
            network_name: network_name(network),
            spec,
            domain: object_name(&target.owner),
        })
    }

    /// The place, and how to reach its hypervisor.
    async fn reached(target: &MachineTarget, libvirt: &Libvirt) -> Result<(Self, Connection), ProviderError> {
        let place = Self::of(target)?;
        let network =
            target.network.as_ref().ok_or_else(|| ProviderError::Refused("the Network is not resolved yet".into()))?;
        let conn = libvirt.tunnels.connect(network, &place.network).await?;
        Ok((place, conn))
    }

    /// The volume the Network keeps the image of a baseImage URL in.
    fn downloaded_image(&self) -> Option<String> {
        let sha256 = self.spec.base_image_sha256.as_deref().filter(|_| image::is_url(&self.spec.base_image))?;
        Some(image::volume_name(&self.network_name, sha256))
    }

    fn overlay(&self) -> String {
        format!("{}.qcow2", self.domain)
    }

    fn seed(&self) -> String {
        format!("{}-seed.img", self.domain)
    }
}

fn state_of(domain: &Domain) -> Result<InstanceState, ProviderError> {
    let (state, _) = domain.get_state().map_err(failed("reading the domain's state"))?;
    Ok(match state {
        virt::sys::VIR_DOMAIN_SHUTDOWN => InstanceState::Stopping,
        virt::sys::VIR_DOMAIN_SHUTOFF | virt::sys::VIR_DOMAIN_CRASHED => InstanceState::Stopped,
        virt::sys::VIR_DOMAIN_NOSTATE => InstanceState::Pending,
        _ => InstanceState::Running,
    })
}

/// The domain as the provider reports it: state, addresses (those in
/// `primary`, the Network's own network, first: SSH uses the first; see
/// [`interface_addresses`]), and the host key its seed installed (from the
/// domain's metadata).
fn instance_of(domain: &Domain, primary: Option<&Cidr>) -> Result<Instance, ProviderError> {
    let uuid = domain.get_uuid_string().map_err(failed("reading the domain's UUID"))?;
    let state = state_of(domain)?;
    let owner = domain
        .get_metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(xml::METADATA_NS), 0)
        .ok()
        .and_then(|text| xml::parse_owner(&text).ok());
    let mut addresses = Vec::new();
    if state == InstanceState::Running {
        let macs = domain
            .get_xml_desc(0)
            .ok()
            .and_then(|text| xml::DomainDescription::parse(&text).ok())
            .map(|d| d.interface_macs())
            .unwrap_or_default();
        // No lease yet is no address yet, not an error; nor is an image
        // without a guest agent.
        let leased =
            domain.interface_addresses(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0).unwrap_or_default();
        addresses = interface_addresses(&macs, leased, || agent_interfaces(domain, &uuid))
            .into_iter()
            .map(|address| MachineAddress { address_type: "InternalIP".into(), address: address.to_string() })
            .collect();
    }
    let in_primary = |a: &MachineAddress| {
        primary.is_none_or(|cidr| a.address.parse().is_ok_and(|ip: std::net::Ipv4Addr| cidr.contains(ip)))
    };
    // Stable: the other networks' addresses keep their interface order.
    addresses.sort_by_key(|a| !in_primary(a));
    Ok(Instance {
        provider_id: Some(format!("{PROVIDER_ID_PREFIX}{uuid}")),
        ssh_host: addresses.first().filter(|a| in_primary(a)).map(|a| a.address.clone()).unwrap_or_default(),
        ssh_port: SSH_PORT,
        addresses,
        state,
        host_key: owner.map(|o| o.host_key).filter(|k| !k.is_empty()),
        restart_pending: None,
    })
}

/// Domains (by UUID) whose guest agent has a query in flight.
static AGENT_QUERIES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);

/// The interfaces the domain's QEMU guest agent reports; none from a guest
/// without one. libvirt waits for an agent's answer without limit once it
/// has answered its sync, so the query runs on a thread of its own and is
/// waited for [`AGENT_WAIT`]; a domain whose agent has not answered yet is
/// not asked again until it does (or the domain stops, which ends the
/// query), so a hung agent holds one thread, never a reconcile.
fn agent_interfaces(domain: &Domain, uuid: &str) -> Vec<virt::domain::Interface> {
    let queries = || AGENT_QUERIES.lock().unwrap_or_else(|e| e.into_inner());
    if !queries().insert(uuid.to_owned()) {
        return Vec::new();
    }
    let (answer, answered) = std::sync::mpsc::channel();
    let (asked, asking) = (domain.clone(), uuid.to_owned());
    std::thread::spawn(move || {
        let result = asked.interface_addresses(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0);
        queries().remove(&asking);
        let _ = answer.send(result);
    });
    match answered.recv_timeout(AGENT_WAIT) {
        Ok(Ok(interfaces)) => interfaces,
        Ok(Err(e)) => {
            tracing::debug!(domain = %uuid, error = %e, "no addresses from the guest agent");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                domain = %uuid,
                "the guest agent has not answered in {} s; its addresses are left out until it does",
                AGENT_WAIT.as_secs()
            );
            Vec::new()
        }
    }
}

/// The IPv4 addresses of a domain's interfaces (`macs`, lowercase, in the
/// domain's order): each interface's DHCP leases from libvirt's own
/// dnsmasq, or, for an interface without one (a network without libvirt's
/// DHCP, an address configured inside the guest), what the QEMU guest
/// agent reports for it. The agent is asked only then, so a guest without
/// one costs nothing; it is the guest's word, which is why leases come
/// first (and SSH checks the pinned host key whichever address it uses).
/// Loopback, link-local and other interfaces the guest made itself (bridges,
/// containers' veths) are left out. With no MACs known, every lease counts.
fn interface_addresses(
    macs: &[String],
    leased: Vec<virt::domain::Interface>,
    agent: impl FnOnce() -> Vec<virt::domain::Interface>,
) -> Vec<std::net::Ipv4Addr> {
    fn ipv4(interface: &virt::domain::Interface) -> impl Iterator<Item = std::net::Ipv4Addr> + '_ {
        interface
            .addrs
            .iter()
            .filter(|a| a.typed == virt::sys::VIR_IP_ADDR_TYPE_IPV4 as i64)
            .filter_map(|a| a.addr.parse::<std::net::Ipv4Addr>().ok())
            .filter(|ip| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified())
    }
    let of = |interfaces: &[virt::domain::Interface], mac: &str| -> Vec<std::net::Ipv4Addr> {
        interfaces.iter().filter(|i| i.hwaddr.eq_ignore_ascii_case(mac)).flat_map(ipv4).collect()
    };
    if macs.is_empty() {
        return leased.iter().flat_map(ipv4).collect();
    }
    let mut agent = Some(agent);
    let mut reported: Vec<virt::domain::Interface> = Vec::new();
    let mut addresses = Vec::new();
    for mac in macs {
        let mut found = of(&leased, mac);
        if found.is_empty() {
            if let Some(ask) = agent.take() {
                reported = ask();
            }
            found = of(&reported, mac);
        }
        addresses.extend(found);
    }
    addresses
}

fn lookup_domain(hv: &Hypervisor, uid: &str) -> Result<Option<Domain>, ProviderError> {
    match Domain::lookup_by_uuid_string(&hv.0, uid) {
        Ok(domain) => Ok(Some(domain)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(failed("looking up the domain")(e)),
    }
}

fn lookup_volume(pool: &StoragePool, name: &str) -> Result<Option<StorageVol>, ProviderError> {
    match StorageVol::lookup_by_name(pool, name) {
        Ok(vol) => Ok(Some(vol)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(failed(format!("looking up volume {name}"))(e)),
    }
}

fn delete_volume(pool: &StoragePool, name: &str) -> Result<(), ProviderError> {
    match lookup_volume(pool, name)? {
        Some(vol) => delete_found_volume(&vol, name),
        None => Ok(()),
    }
}

/// Deletes `vol` (named `name`); one deleted meanwhile is success.
fn delete_found_volume(vol: &StorageVol, name: &str) -> Result<(), ProviderError> {
    match vol.delete(0) {
        Err(e) if !is_not_found(&e) => Err(failed(format!("deleting volume {name}"))(e)),
        _ => Ok(()),
    }
}

/// Writes the `length` bytes `from` reads into volume `vol` from offset 0.
fn upload(
    hv: &Hypervisor,
    vol: &StorageVol,
    mut from: impl std::io::Read,
    length: u64,
    what: &str,
) -> Result<(), ProviderError> {
    let stream = Stream::new(&hv.0, 0).map_err(failed(format!("opening a stream for {what}")))?;
    vol.upload(&stream, 0, length, 0).map_err(failed(format!("uploading {what}")))?;
    let mut buffer = vec![0; 1 << 20];
    loop {
        let read = from
            .read(&mut buffer)
            .map_err(|e| ProviderError::Transient(format!("reading {what} for its upload: {e}")))?;
        if read == 0 {
            break;
        }
        let mut sent = 0;
        while sent < read {
            sent += stream.send(&buffer[sent..read]).map_err(failed(format!("uploading {what}")))?;
        }
    }
    stream.finish().map_err(failed(format!("finishing the upload of {what}")))
}

/// Starts a defined domain; one already running is success.
fn start(domain: &Domain, name: &str) -> Result<(), ProviderError> {
    match domain.create() {
        Ok(_) => Ok(()),
        // Started by someone (or something) else in the meantime.
        Err(e) if e.code() == ErrorNumber::OperationInvalid && domain.is_active().unwrap_or(false) => Ok(()),
        Err(e) => Err(failed(format!("starting domain {name} (spec.running: true)"))(e)),
    }
}

/// Waits up to [`LEASE_WAIT`] for a running domain's lease in the
/// Network's own network (`primary`).
fn wait_for_lease(domain: &Domain, primary: &Cidr) -> Result<Instance, ProviderError> {
    let deadline = Instant::now() + LEASE_WAIT;
    loop {
        let instance = instance_of(domain, Some(primary))?;
        if instance.state != InstanceState::Running || !instance.ssh_host.is_empty() || Instant::now() > deadline {
            return Ok(instance);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The path on the hypervisor of the machine's base image: baseImage
/// itself, the path of the pool's volume of that name, or that of the
/// Network's copy of the URL's image (see [`image`]).
fn base_image_path(pool: &StoragePool, place: &MachinePlace) -> Result<String, ProviderError> {
    let base = &place.spec.base_image;
    if base.starts_with('/') {
        return Ok(base.clone());
    }
    if let Some(name) = place.downloaded_image() {
        let volume = lookup_volume(pool, &name)?
            .ok_or_else(|| ProviderError::Transient(format!("the base image's volume {name} is not uploaded yet")))?;
        return volume.get_path().map_err(failed(format!("reading the path of volume {name}")));
    }
    let volume = lookup_volume(pool, base)?.ok_or_else(|| {
        ProviderError::permanent(
            "BaseImageNotFound",
            format!(
                "spec.provider.libvirt.baseImage {base}: storage pool {} has no such volume; upload the image (virsh vol-create-as {} {base} SIZE --format qcow2 && virsh vol-upload) or give an absolute path",
                place.network.storage_pool, place.network.storage_pool
            ),
        )
    })?;
    volume.get_path().map_err(failed(format!("reading the path of volume {base}")))
}

/// The definition of the machine's domain: from its spec, with the host
/// key its seed installs and the volumes attached to it so far.
fn domain_spec(
    place: &MachinePlace,
    owner: &Owner,
    domain_type: ResolvedDomainType,
    host_key: String,
    data_disks: Vec<xml::DiskXml>,
) -> DomainSpec {
    let kernel = place.spec.direct_kernel_boot.clone();
    DomainSpec {
        name: place.domain.clone(),
        uuid: owner.uid.clone(),
        owner: DomainOwner {
            namespace: owner.namespace.clone(),
            name: owner.name.clone(),
            uid: owner.uid.clone(),
            host_key,
            spec_digest: String::new(),
        },
        domain_type,
        vcpus: u32::try_from(place.spec.vcpus).unwrap_or(1),
        memory_mib: u64::try_from(place.spec.memory_mib).unwrap_or(512),
        kernel: kernel.as_ref().map(|k| k.kernel.clone()),
        initrd: kernel.as_ref().and_then(|k| k.initrd.clone()),
        cmdline: kernel.as_ref().and_then(|k| k.cmdline.clone()),
        pool: place.network.storage_pool.clone(),
        root_volume: place.overlay(),
        seed_volume: place.seed(),
        networks: std::iter::once(place.network_name.clone()).chain(place.spec.networks.iter().cloned()).collect(),
        extra_domain_xml: place.spec.extra_domain_xml.clone(),
        extra_devices_xml: place.spec.extra_devices_xml.clone(),
        console_log: Some(format!("/var/log/libvirt/qemu/{}-console.log", place.domain)),
        data_disks,
    }
}

/// The operator's metadata of the domain's persistent definition
/// (`VIR_DOMAIN_AFFECT_CONFIG`) or of the running one (`AFFECT_LIVE`).
fn owner_metadata(domain: &Domain, flags: u32) -> Option<DomainOwner> {
    let text =
        domain.get_metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(xml::METADATA_NS), flags).ok()?;
    xml::parse_owner(&text).ok()
}

/// Defines the domain anew when what the Machine's spec puts in its
/// definition (vcpus, memory, networks, kernel, extra XML) changed, keeping
/// its host key and the volumes attached since. Returns the definition's
/// digest. A running domain goes on with its old definition until it is
/// powered off and started again.
fn converge_definition(
    hv: &Hypervisor,
    domain: &Domain,
    place: &MachinePlace,
    owner: &Owner,
) -> Result<String, ProviderError> {
    let Some(defined) = owner_metadata(domain, virt::sys::VIR_DOMAIN_AFFECT_CONFIG) else {
        return Ok(String::new());
    };
    let inactive =
        domain.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).map_err(failed("reading the domain's definition"))?;
    let described = xml::DomainDescription::parse(&inactive).map_err(ProviderError::Transient)?;
    // auto keeps the type the domain was defined with: the hypervisor's
    // answer does not move a defined machine between kvm and emulation.
    let domain_type = match (place.spec.domain_type, described.domain_type()) {
        (crate::api::machine::LibvirtDomainType::Auto, Some(defined)) => defined,
        (wanted, _) => ResolvedDomainType::resolve(wanted, || hv.offers_kvm())?,
    };
    let (root, seed) = (place.overlay(), place.seed());
    let data_disks = described
        .devices
        .disk
        .into_iter()
        .filter(|d| {
            d.source_volume()
                .is_some_and(|(pool, volume)| pool == place.network.storage_pool && volume != root && volume != seed)
        })
        .collect();
    let spec = domain_spec(place, owner, domain_type, defined.host_key.clone(), data_disks);
    let digest = spec.digest();
    if defined.spec_digest != digest {
        let domain_xml = xml::domain_xml(&spec).map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
        Domain::define_xml(&hv.0, &domain_xml).map_err(failed(format!("defining domain {} anew", place.domain)))?;
        tracing::info!(domain = %place.domain, "defined the domain anew after a change of its spec");
    }
    Ok(digest)
}

/// Why a running domain does not run its current definition, if it does not.
fn restart_pending(domain: &Domain, digest: &str) -> Option<String> {
    let live = owner_metadata(domain, virt::sys::VIR_DOMAIN_AFFECT_LIVE)?;
    // A domain defined before digests were recorded is taken as current.
    (!live.spec_digest.is_empty() && !digest.is_empty() && live.spec_digest != digest).then(|| {
        "the domain was defined anew after a change of vcpus, memoryMiB, networks, directKernelBoot or the extra XML; \
         it runs the old definition until it is powered off and started again (spec.running false, then true)"
            .to_owned()
    })
}

/// Creates what a machine's domain needs and defines it (not started):
/// the root disk overlay (kept if it exists: it may hold data), a new seed
/// with a new host key, and the domain.
fn define_machine(
    hv: &Hypervisor,
    place: &MachinePlace,
    owner: &Owner,
    authorized_key: Option<String>,
) -> Result<Domain, ProviderError> {
    let pool = hv.pool(&place.network.storage_pool)?;
    let overlay = place.overlay();
    if lookup_volume(&pool, &overlay)?.is_none() {
        let capacity = u64::try_from(place.spec.disk_size_gib).unwrap_or(1) << 30;
        let base = base_image_path(&pool, place)?;
        let volume = xml::volume_xml(&overlay, capacity, "qcow2", Some(&base))
            .map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
        StorageVol::create_xml(&pool, &volume, 0).map_err(|e| {
            if is_unanswered(&e) {
                return failed(format!("creating root disk {overlay} over the base image {base}"))(e);
            }
            ProviderError::permanent(
                "BaseImageUnusable",
                format!(
                    "cannot create the root disk from spec.provider.libvirt.baseImage {}: {}; it must be a qcow2 image on the hypervisor",
                    place.spec.base_image,
                    e.message()
                ),
            )
        })?;
    }
    // The seed is read at first boot only: until the domain is defined
    // (it is not yet, or this create would not run) a new one is safe.
    let host_key =
        seed::generate_host_key(&format!("{}/{}", owner.namespace, owner.name)).map_err(ProviderError::Transient)?;
    let seed_bytes = seed::SeedContent {
        instance_id: &owner.uid,
        hostname: &owner.name,
        authorized_keys: authorized_key.into_iter().collect(),
        host_key: &host_key,
    }
    .image()
    .map_err(ProviderError::Transient)?;
    let seed_name = place.seed();
    delete_volume(&pool, &seed_name)?;
    let seed_xml = xml::volume_xml(&seed_name, seed::SEED_BYTES, "raw", None)
        .map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
    let seed_vol =
        StorageVol::create_xml(&pool, &seed_xml, 0).map_err(failed(format!("creating seed volume {seed_name}")))?;
    upload(hv, &seed_vol, seed_bytes.as_slice(), seed_bytes.len() as u64, "the seed")?;

    let domain_type = ResolvedDomainType::resolve(place.spec.domain_type, || hv.offers_kvm())?;
    let spec = domain_spec(place, owner, domain_type, host_key.public_openssh.clone(), Vec::new());
    let domain_xml = xml::domain_xml(&spec).map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
    Domain::define_xml(&hv.0, &domain_xml).map_err(failed(format!("defining domain {}", place.domain)))
}

#[async_trait]
impl MachineProvider for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    async fn observe(&self, target: &MachineTarget) -> Result<Option<Instance>, ProviderError> {
        let (place, conn) = MachinePlace::reached(target, self).await?;
        let uid = target.owner.uid.clone();
        self.call("observe", move || {
            let hv = Hypervisor::open(&conn)?;
            lookup_domain(&hv, &uid)?.map(|d| instance_of(&d, Some(&place.cidr))).transpose()
        })
        .await
    }

    /// A domain is looked up by its UUID, the Machine's UID: libvirtd
    /// answers from the definitions it holds.
    fn lookup(&self) -> Lookup {
        Lookup::Immediate
    }

    fn check_create(&self, target: &MachineTarget) -> Result<(), ProviderError> {
        MachinePlace::of(target)?;
        let ready = target.network.as_ref().and_then(|n| n.status.as_ref()).is_some_and(|s| {
            crate::controller::status::is_true(&s.conditions, crate::api::condition::READY) && s.vpc_id.is_some()
        });
        if !ready {
            return Err(ProviderError::Refused("waiting for the Network's libvirt network to be created".into()));
        }
        Ok(())
    }

    async fn create(&self, target: &MachineTarget) -> Result<Instance, ProviderError> {
        let (place, conn) = MachinePlace::reached(target, self).await?;
        self.ensure_image(&place, &conn).await?;
        let place = Arc::new(place);
        let owner = target.owner.clone();
        let key = target.authorized_key.clone();
        let defining = place.clone();
        let uid = owner.uid.clone();
        let defining_conn = conn.clone();
        self.call("define", move || {
            let hv = Hypervisor::open(&defining_conn)?;
            define_machine(&hv, &defining, &owner, key).map(drop)
        })
        .await?;
        crate::fault::point(crate::fault::points::LIBVIRT_AFTER_DEFINE, None).await;
        let running = target.running;
        self.call("start", move || {
            let hv = Hypervisor::open(&conn)?;
            let domain = lookup_domain(&hv, &uid)?.ok_or_else(|| {
                ProviderError::Transient(format!("domain {} vanished after its define", place.domain))
            })?;
            if running {
                start(&domain, &place.domain)?;
                return wait_for_lease(&domain, &place.cidr);
            }
            instance_of(&domain, Some(&place.cidr))
        })
        .await
    }

    async fn update(&self, target: &MachineTarget, current: Instance) -> Result<Instance, ProviderError> {
        let owner = target.owner.clone();
        let running = target.running;
        let (place, conn) = MachinePlace::reached(target, self).await?;
        self.call("update", move || {
            let hv = Hypervisor::open(&conn)?;
            let Some(domain) = lookup_domain(&hv, &owner.uid)? else { return Ok(current) };
            let digest = converge_definition(&hv, &domain, &place, &owner)?;
            let mut instance = match (running, state_of(&domain)?) {
                (true, InstanceState::Stopped) => {
                    start(&domain, &place.domain)?;
                    wait_for_lease(&domain, &place.cidr)
                }
                (true, InstanceState::Running) if !current.ssh_host.is_empty() => {
                    instance_of(&domain, Some(&place.cidr))
                }
                (true, _) => wait_for_lease(&domain, &place.cidr),
                (false, InstanceState::Stopped) => instance_of(&domain, Some(&place.cidr)),
                (false, _) => {
                    // ACPI first, so the guest shuts down cleanly; then the plug.
                    // The power button, not libvirt's default of the guest
                    // agent first: an agent that does not answer holds that
                    // up for half a minute.
                    let _ = domain.shutdown_flags(virt::sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN);
                    let deadline = Instant::now() + SHUTDOWN_GRACE;
                    while state_of(&domain)? != InstanceState::Stopped && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    if state_of(&domain)? != InstanceState::Stopped {
                        domain
                            .destroy()
                            .map_err(failed(format!("stopping domain {} (spec.running: false)", place.domain)))?;
                    }
                    instance_of(&domain, Some(&place.cidr))
                }
            }?;
            if instance.state == InstanceState::Running {
                instance.restart_pending = restart_pending(&domain, &digest);
            }
            Ok(instance)
        })
        .await
    }

    /// The hypervisor's own SSH session, where its network is reached only
    /// through it (see [`remote::jumps_through_hypervisor`]).
    async fn jump(&self, target: &MachineTarget) -> Result<Option<Arc<crate::ssh::Session>>, ProviderError> {
        let place = MachinePlace::of(target)?;
        if !remote::jumps_through_hypervisor(&place.network) {
            return Ok(None);
        }
        Ok(MachinePlace::reached(target, self).await?.1.session())
    }

    async fn delete(&self, target: &MachineTarget) -> Result<(), ProviderError> {
        let (place, conn) = MachinePlace::reached(target, self).await?;
        let uid = target.owner.uid.clone();
        self.call("delete", move || {
            let hv = Hypervisor::open(&conn)?;
            if let Some(domain) = lookup_domain(&hv, &uid)? {
                if domain.is_active().map_err(failed("checking the domain"))? {
                    match domain.destroy() {
                        Err(e) if !is_not_found(&e) && e.code() != ErrorNumber::OperationInvalid => {
                            return Err(failed(format!("stopping domain {}", place.domain))(e));
                        }
                        _ => {}
                    }
                }
                match domain.undefine() {
                    Err(e) if !is_not_found(&e) => {
                        return Err(failed(format!("undefining domain {}", place.domain))(e));
                    }
                    _ => {}
                }
            }
            // Also when the domain is gone already: a crash may have come
            // between the undefine and these.
            let Some(pool) = hv.pool_if_exists(&place.network.storage_pool)? else { return Ok(()) };
            delete_volume(&pool, &place.overlay())?;
            delete_volume(&pool, &place.seed())
        })
        .await
    }
}

fn lookup_network(hv: &Hypervisor, uid: &str) -> Result<Option<virt::network::Network>, ProviderError> {
    match virt::network::Network::lookup_by_uuid_string(&hv.0, uid) {
        Ok(net) => Ok(Some(net)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(failed("looking up the libvirt network")(e)),
    }
}

#[async_trait]
impl NetworkProvider for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    /// The network named `known` (the external-name annotation, for
    /// managementPolicy Observe), else the one whose UUID is the owner's UID.
    async fn find(&self, target: &CloudTarget, known: Option<&str>) -> Result<Option<String>, ProviderError> {
        let spec = network_spec(&target.network)?;
        let conn = self.tunnels.connect(&target.network, &spec).await?;
        let uid = target.owner.uid.clone();
        let known = known.map(str::to_owned);
        self.call("find-network", move || {
            let hv = Hypervisor::open(&conn)?;
            let found = match &known {
                Some(name) => match virt::network::Network::lookup_by_name(&hv.0, name) {
                    Ok(net) => Some(net),
                    Err(e) if is_not_found(&e) => None,
                    Err(e) => return Err(failed(format!("looking up network {name}"))(e)),
                },
                None => lookup_network(&hv, &uid)?,
            };
            found.map(|n| n.get_name().map_err(failed("reading the network's name"))).transpose()
        })
        .await
    }

    async fn ensure(&self, target: &CloudTarget, _known: Option<&str>) -> Result<NetworkState, ProviderError> {
        let spec = network_spec(&target.network)?;
        let conn = self.tunnels.connect(&target.network, &spec).await?;
        let uid = target.owner.uid.clone();
        self.call("ensure-network", move || {
            let hv = Hypervisor::open(&conn)?;
            let Some(net) = lookup_network(&hv, &uid)? else {
                return Ok(NetworkState { missing: Some(NetworkPart::Vpc), ..Default::default() });
            };
            let name = net.get_name().map_err(failed("reading the network's name"))?;
            if !net.is_active().map_err(failed(format!("checking network {name}")))? {
                net.create().map_err(failed(format!("starting network {name}")))?;
            }
            Ok(NetworkState {
                resources: NetworkResources { vpc_id: name, ..Default::default() },
                found: vec![NetworkPart::Vpc],
                missing: None,
            })
        })
        .await
    }

    async fn create(
        &self,
        target: &CloudTarget,
        _part: &NetworkPart,
        _found: &NetworkResources,
    ) -> Result<String, ProviderError> {
        let spec = network_spec(&target.network)?;
        let name = network_name(&target.network);
        let cidr = Cidr::parse(&spec.cidr, "spec.provider.libvirt.cidr")
            .map_err(|e| ProviderError::permanent("InvalidCIDR", e))?;
        let network_xml = xml::network_xml(&name, &target.owner.uid, spec.mode, &cidr, spec.dhcp_range.as_ref())
            .map_err(|e| ProviderError::permanent("InvalidDhcpRange", e))?;
        let conn = self.tunnels.connect(&target.network, &spec).await?;
        self.call("create-network", move || {
            let hv = Hypervisor::open(&conn)?;
            let net = virt::network::Network::define_xml(&hv.0, &network_xml)
                .map_err(failed(format!("defining network {name}")))?;
            net.create().map_err(|e| {
                if is_unanswered(&e) {
                    return failed(format!("starting network {name}"))(e);
                }
                ProviderError::permanent(
                    "NetworkNotStarted",
                    format!(
                        "libvirt defined network {name} but cannot start it: {}. The usual cause is a \
                         spec.provider.libvirt.cidr overlapping a network the hypervisor has; the CIDR is \
                         immutable, so recreate the Network with another one",
                        e.message()
                    ),
                )
            })?;
            let _ = net.set_autostart(true);
            Ok(name)
        })
        .await
    }

    async fn delete(&self, target: &CloudTarget, _known: Option<&str>) -> Result<(), ProviderError> {
        let spec = network_spec(&target.network)?;
        let conn = self.tunnels.connect(&target.network, &spec).await?;
        let uid = target.owner.uid.clone();
        let name = network_name(&target.network);
        self.call("delete-network", move || {
            let hv = Hypervisor::open(&conn)?;
            // Its members are gone; only domains they orphaned may still use its images.
            if let Some(pool) = hv.pool_if_exists(&spec.storage_pool)? {
                for kept in image::delete_unused(&pool, &name)? {
                    tracing::info!(
                        network = %name,
                        volume = %kept,
                        "kept the base image: overlays of domains kept by deletionPolicy Orphan use it"
                    );
                }
            }
            let Some(net) = lookup_network(&hv, &uid)? else { return Ok(()) };
            if net.is_active().map_err(failed("checking the network"))? {
                net.destroy().map_err(failed("stopping the network"))?;
            }
            match net.undefine() {
                Err(e) if !is_not_found(&e) => Err(failed("undefining the network")(e)),
                _ => Ok(()),
            }
        })
        .await?;
        self.tunnels.forget(&target.network);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_namespace_name_and_uid() {
        let owner =
            Owner { namespace: "prod".into(), name: "web-1".into(), uid: "0123abcd-ef01-4000-8000-00000000".into() };
        assert_eq!(object_name(&owner), "prod-web-1-0123abcd");
    }

    /// libvirt's own test driver accepts what the serializer writes: the
    /// network, volumes and domain define, and the domain is found again by
    /// the owner's UID.
    #[test]
    fn test_driver_accepts_network_volume_and_domain_xml() {
        let hv = Hypervisor::open(&Connection::direct("test:///default")).unwrap();
        let uid = "6f1c2a7e-4b7d-4c1e-9a51-1d2e3f405061";
        let cidr = Cidr::parse("10.77.1.0/24", "cidr").unwrap();
        let net_xml =
            xml::network_xml("t-net", "6f1c2a7e-0000-4c1e-9a51-1d2e3f405061", Default::default(), &cidr, None).unwrap();
        let net = virt::network::Network::define_xml(&hv.0, &net_xml).unwrap();
        net.create().unwrap();
        let pool = hv.pool("default-pool").unwrap();
        let vol_xml = xml::volume_xml("t.img", 1 << 20, "raw", None).unwrap();
        let vol = StorageVol::create_xml(&pool, &vol_xml, 0).unwrap();
        let spec = DomainSpec {
            name: "t-dom".into(),
            uuid: uid.into(),
            owner: DomainOwner {
                namespace: "ns".into(),
                name: "m".into(),
                uid: uid.into(),
                host_key: "ssh-ed25519 AAAA".into(),
                spec_digest: String::new(),
            },
            domain_type: ResolvedDomainType::resolve(crate::api::machine::LibvirtDomainType::Auto, || hv.offers_kvm())
                .unwrap(),
            vcpus: 1,
            memory_mib: 128,
            kernel: None,
            initrd: None,
            cmdline: None,
            pool: "default-pool".into(),
            root_volume: "t.img".into(),
            seed_volume: "t.img".into(),
            networks: vec!["t-net".into()],
            extra_domain_xml: None,
            extra_devices_xml: None,
            console_log: None,
            data_disks: Vec::new(),
        };
        let xml = xml::domain_xml(&spec).unwrap();
        Domain::define_xml(&hv.0, &xml).unwrap();
        let found = lookup_domain(&hv, uid).unwrap().expect("domain found by the owner's UID");
        let instance = instance_of(&found, None).unwrap();
        assert_eq!(instance.provider_id.as_deref(), Some(format!("libvirt:///{uid}").as_str()));
        assert_eq!(instance.host_key.as_deref(), Some("ssh-ed25519 AAAA"));
        assert_eq!(instance.state, InstanceState::Stopped);
        // A second define with the same UUID redefines, never duplicates.
        Domain::define_xml(&hv.0, &xml).unwrap();
        let count =
            hv.0.list_all_domains(0).unwrap().into_iter().filter(|d| d.get_uuid_string().unwrap() == uid).count();
        assert_eq!(count, 1);
        vol.delete(0).unwrap();
        assert!(lookup_volume(&pool, "t.img").unwrap().is_none());
    }

    fn interface(hwaddr: &str, addrs: &[&str]) -> virt::domain::Interface {
        let addrs: Vec<virt::domain::IPAddress> = addrs
            .iter()
            .map(|a| virt::domain::IPAddress {
                typed: i64::from(if a.contains(':') {
                    virt::sys::VIR_IP_ADDR_TYPE_IPV6
                } else {
                    virt::sys::VIR_IP_ADDR_TYPE_IPV4
                }),
                addr: (*a).into(),
                prefix: 24,
            })
            .collect();
        virt::domain::Interface { name: "x".into(), hwaddr: hwaddr.into(), naddrs: addrs.len() as u64, addrs }
    }

    fn ips(list: &[&str]) -> Vec<std::net::Ipv4Addr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn leases_first_the_guest_agent_only_for_interfaces_without_one() {
        let macs = ["52:54:00:00:00:01".to_owned(), "52:54:00:00:00:02".to_owned()];
        let leased = || vec![interface("52:54:00:00:00:01", &["10.1.1.10"])];
        // The agent knows eth1's static address, and things to leave out:
        // a second address on eth0 (its lease wins), loopback, link-local,
        // IPv6 and a bridge of the guest's own.
        let agent = || {
            vec![
                interface("00:00:00:00:00:00", &["127.0.0.1", "::1"]),
                interface("52:54:00:00:00:01", &["10.1.1.10", "10.1.1.99"]),
                interface("52:54:00:00:00:02", &["10.1.2.5", "169.254.3.4", "fe80::1"]),
                interface("02:42:ac:11:00:01", &["172.17.0.1"]),
            ]
        };
        assert_eq!(interface_addresses(&macs, leased(), agent), ips(&["10.1.1.10", "10.1.2.5"]));

        // With every interface leased, the agent is not asked.
        let both = vec![interface("52:54:00:00:00:01", &["10.1.1.10"]), interface("52:54:00:00:00:02", &["10.1.2.11"])];
        let unasked = || -> Vec<virt::domain::Interface> { panic!("the agent was asked") };
        assert_eq!(interface_addresses(&macs, both, unasked), ips(&["10.1.1.10", "10.1.2.11"]));

        // No agent, no lease on eth1: eth0's lease only. Unknown MACs (the
        // domain XML unreadable): every lease.
        assert_eq!(interface_addresses(&macs, leased(), Vec::new), ips(&["10.1.1.10"]));
        let upper = vec![interface("52:54:00:00:00:0A", &["10.1.1.12"])];
        assert_eq!(interface_addresses(&[], upper, agent), ips(&["10.1.1.12"]));
    }
}
