//! libvirt's domain, network and storage volume XML, as typed structs that
//! quick-xml's serde support writes and reads. Pure: unit-tested here and
//! against libvirt's test driver, and by the VMs the tests boot.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::api::machine::LibvirtDomainType;
use crate::api::network::{DhcpRange, LibvirtForwardMode};

/// The XML namespace of the operator's metadata element in a domain.
pub const METADATA_NS: &str = "https://nixops.io/libvirt/v1";
const METADATA_PREFIX: &str = "nixops";

/// Writes `value` as the XML element `root`.
fn to_xml<T: Serialize>(root: &str, value: &T) -> Result<String, String> {
    quick_xml::se::to_string_with_root(root, value).map_err(|e| format!("cannot write {root} XML: {e}"))
}

/// An element holding only text with a `unit` attribute (`<memory unit='MiB'>512</memory>`).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sized {
    #[serde(rename = "@unit")]
    unit: String,
    #[serde(rename = "$text")]
    value: u64,
}

/// An element with a single `type` attribute (`<format type='qcow2'/>`).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Typed {
    #[serde(rename = "@type")]
    kind: String,
}

impl Typed {
    fn new(kind: &str) -> Self {
        Self { kind: kind.into() }
    }
}

// ---------------------------------------------------------------- domains

/// Who a domain belongs to and the host key its seed installs: written in
/// the domain's `<metadata>`, read back after a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DomainOwner {
    #[serde(rename = "@namespace")]
    pub namespace: String,
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@uid")]
    pub uid: String,
    /// The public SSH host key injected through the seed (OpenSSH format).
    #[serde(rename = "@hostKey", default)]
    pub host_key: String,
    /// A digest of what the Machine's spec put in the definition
    /// ([`DomainSpec::digest`]): a different one means it must be defined anew.
    #[serde(rename = "@specDigest", default)]
    pub spec_digest: String,
}

/// What a machine's domain is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainSpec {
    pub name: String,
    /// The owner's UID, which is the domain's UUID too.
    pub uuid: String,
    pub owner: DomainOwner,
    pub domain_type: ResolvedDomainType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub pool: String,
    /// The root disk's overlay volume, attached first (vda).
    pub root_volume: String,
    /// The NoCloud seed volume (raw).
    pub seed_volume: String,
    /// The libvirt networks of its interfaces, the Network's own first.
    pub networks: Vec<String>,
    /// Raw XML for inside `<domain>` and `<devices>`, the escape hatches
    /// (`extraDomainXML`, `extraDevicesXML`).
    pub extra_domain_xml: Option<String>,
    pub extra_devices_xml: Option<String>,
    /// Where QEMU writes the serial console, on the hypervisor.
    pub console_log: Option<String>,
    /// Volumes attached since the domain was defined (libvirt Volumes),
    /// kept when it is defined anew.
    pub data_disks: Vec<DiskXml>,
}

impl DomainSpec {
    /// A digest of what comes from the Machine's spec (not the owner, disks
    /// or attached volumes), stable for the same spec.
    pub fn digest(&self) -> String {
        let inputs = format!(
            "{:?}",
            (
                self.domain_type,
                self.vcpus,
                self.memory_mib,
                &self.kernel,
                &self.initrd,
                &self.cmdline,
                &self.networks,
                &self.extra_domain_xml,
                &self.extra_devices_xml
            )
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, inputs.as_bytes());
        digest.as_ref()[..12].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The domain type after `auto` is resolved on the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolvedDomainType {
    Kvm,
    Qemu,
}

/// The parts of libvirt's capabilities XML `auto` looks at.
#[derive(Debug, Default, Deserialize)]
struct CapabilitiesXml {
    #[serde(default)]
    host: CapsHost,
    #[serde(default)]
    guest: Vec<CapsGuest>,
}

#[derive(Debug, Default, Deserialize)]
struct CapsHost {
    #[serde(default)]
    cpu: CapsCpu,
}

#[derive(Debug, Default, Deserialize)]
struct CapsCpu {
    #[serde(default)]
    feature: Vec<CapsFeature>,
}

#[derive(Debug, Deserialize)]
struct CapsFeature {
    #[serde(rename = "@name")]
    name: String,
}

#[derive(Debug, Deserialize)]
struct CapsGuest {
    arch: CapsArch,
}

#[derive(Debug, Deserialize)]
struct CapsArch {
    #[serde(rename = "@name")]
    name: String,
    #[serde(default)]
    domain: Vec<Typed>,
}

/// Whether kvm domains work on the hypervisor whose capabilities XML this
/// is: libvirt must offer them for x86_64, and the host must have hardware
/// virtualisation. A host that is itself a guest (CPU feature `hypervisor`)
/// without `vmx` or `svm` has a paravirtual /dev/kvm at best (PVM, on which
/// stock guest kernels hang), so qemu it is there.
pub fn kvm_works(capabilities: &str) -> bool {
    let Ok(caps) = quick_xml::de::from_str::<CapabilitiesXml>(capabilities) else { return false };
    let offered = caps.guest.iter().any(|g| g.arch.name == "x86_64" && g.arch.domain.iter().any(|d| d.kind == "kvm"));
    let has = |name: &str| caps.host.cpu.feature.iter().any(|f| f.name == name);
    offered && (!has("hypervisor") || has("vmx") || has("svm"))
}

impl ResolvedDomainType {
    /// `auto` takes kvm when [`kvm_works`] on the hypervisor (`offers_kvm`,
    /// asked only for `auto`; failing to tell is an error, not "no kvm").
    pub fn resolve<E>(wanted: LibvirtDomainType, offers_kvm: impl FnOnce() -> Result<bool, E>) -> Result<Self, E> {
        Ok(match wanted {
            LibvirtDomainType::Kvm => Self::Kvm,
            LibvirtDomainType::Qemu => Self::Qemu,
            LibvirtDomainType::Auto if offers_kvm()? => Self::Kvm,
            LibvirtDomainType::Auto => Self::Qemu,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        }
    }
}

#[derive(Serialize)]
struct DomainXml {
    #[serde(rename = "@type")]
    kind: &'static str,
    name: String,
    uuid: String,
    metadata: DomainMetadataXml,
    memory: Sized,
    vcpu: u32,
    os: OsXml,
    features: FeaturesXml,
    on_poweroff: &'static str,
    on_reboot: &'static str,
    on_crash: &'static str,
    devices: DevicesXml,
}

#[derive(Serialize)]
struct DomainMetadataXml {
    #[serde(rename = "nixops:machine")]
    machine: MetadataElement,
}

#[derive(Serialize)]
struct MetadataElement {
    #[serde(rename = "@xmlns:nixops")]
    xmlns: &'static str,
    #[serde(flatten)]
    owner: DomainOwner,
}

#[derive(Serialize)]
struct OsXml {
    #[serde(rename = "type")]
    os_type: OsTypeXml,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
}

#[derive(Serialize)]
struct OsTypeXml {
    #[serde(rename = "@arch")]
    arch: &'static str,
    #[serde(rename = "$text")]
    value: &'static str,
}

#[derive(Serialize)]
struct FeaturesXml {
    acpi: (),
    /// TCG's translation cache defaults to 1 GiB of the host's memory per
    /// VM; a small machine needs far less.
    #[serde(skip_serializing_if = "Option::is_none")]
    tcg: Option<TcgXml>,
}

#[derive(Serialize)]
struct TcgXml {
    #[serde(rename = "tb-cache")]
    tb_cache: Sized,
}

#[derive(Serialize)]
struct DevicesXml {
    disk: Vec<DiskXml>,
    interface: Vec<InterfaceXml>,
    serial: SerialXml,
    console: Typed,
    channel: ChannelXml,
    rng: RngXml,
}

/// A disk from a storage pool volume; also the device XML of an attach.
/// Read leniently: other domains on a shared hypervisor have disks of
/// every kind (an empty CD-ROM has no source), and none may stop the
/// operator from reading the rest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskXml {
    #[serde(rename = "@type", default)]
    kind: String,
    #[serde(rename = "@device", default)]
    device: String,
    #[serde(default)]
    driver: DriverXml,
    #[serde(default)]
    source: DiskSourceXml,
    #[serde(default)]
    target: DiskTargetXml,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    readonly: Option<()>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct DriverXml {
    #[serde(rename = "@name", default)]
    name: String,
    #[serde(rename = "@type", default)]
    format: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct DiskSourceXml {
    #[serde(rename = "@pool", default, skip_serializing_if = "Option::is_none")]
    pool: Option<String>,
    #[serde(rename = "@volume", default, skip_serializing_if = "Option::is_none")]
    volume: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct DiskTargetXml {
    #[serde(rename = "@dev", default)]
    dev: String,
    #[serde(rename = "@bus", default)]
    bus: String,
}

impl DiskXml {
    /// A virtio disk of volume `volume` in `pool`, seen by the guest as
    /// `dev` with serial number `serial` (what /sys/block/*/serial shows).
    pub fn volume(pool: &str, volume: &str, format: &str, dev: &str, serial: Option<&str>) -> Self {
        Self {
            kind: "volume".into(),
            device: "disk".into(),
            driver: DriverXml { name: "qemu".into(), format: format.into() },
            source: DiskSourceXml { pool: Some(pool.into()), volume: Some(volume.into()) },
            target: DiskTargetXml { dev: dev.into(), bus: "virtio".into() },
            serial: serial.map(str::to_owned),
            readonly: None,
        }
    }

    /// The device XML for attaching or detaching this disk.
    pub fn to_xml(&self) -> Result<String, String> {
        to_xml("disk", self)
    }

    /// The volume this disk shows, as (pool, volume).
    pub fn source_volume(&self) -> Option<(&str, &str)> {
        Some((self.source.pool.as_deref()?, self.source.volume.as_deref()?))
    }

    /// The guest device name (`vdb`).
    pub fn target_dev(&self) -> &str {
        &self.target.dev
    }
}

#[derive(Serialize)]
struct InterfaceXml {
    #[serde(rename = "@type")]
    kind: &'static str,
    source: NetworkSourceXml,
    model: Typed,
}

#[derive(Serialize)]
struct NetworkSourceXml {
    #[serde(rename = "@network")]
    network: String,
}

#[derive(Serialize)]
struct SerialXml {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<LogXml>,
}

#[derive(Serialize)]
struct LogXml {
    #[serde(rename = "@file")]
    file: String,
    #[serde(rename = "@append")]
    append: &'static str,
}

/// A virtio-serial port; here the QEMU guest agent's, which libvirt
/// connects to a socket of its own.
#[derive(Serialize)]
struct ChannelXml {
    #[serde(rename = "@type")]
    kind: &'static str,
    target: ChannelTargetXml,
}

#[derive(Serialize)]
struct ChannelTargetXml {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@name")]
    name: &'static str,
}

/// The port name QEMU guest agents listen on (NixOS:
/// `services.qemuGuest.enable`).
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

#[derive(Serialize)]
struct RngXml {
    #[serde(rename = "@model")]
    model: &'static str,
    backend: RngBackendXml,
}

#[derive(Serialize)]
struct RngBackendXml {
    #[serde(rename = "@model")]
    model: &'static str,
    #[serde(rename = "$text")]
    device: &'static str,
}

/// The guest device of the seed disk: after every data disk a machine may
/// get (vdb…vdy).
pub const SEED_DEVICE: &str = "vdz";

/// The domain XML of a machine.
pub fn domain_xml(spec: &DomainSpec) -> Result<String, String> {
    let mut owner = spec.owner.clone();
    owner.spec_digest = spec.digest();
    let tcg = (spec.domain_type == ResolvedDomainType::Qemu)
        .then(|| TcgXml { tb_cache: Sized { unit: "MiB".into(), value: 64 } });
    let domain = DomainXml {
        kind: spec.domain_type.as_str(),
        name: spec.name.clone(),
        uuid: spec.uuid.clone(),
        metadata: DomainMetadataXml { machine: MetadataElement { xmlns: METADATA_NS, owner } },
        memory: Sized { unit: "MiB".into(), value: spec.memory_mib },
        vcpu: spec.vcpus,
        os: OsXml {
            os_type: OsTypeXml { arch: "x86_64", value: "hvm" },
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.cmdline.clone(),
        },
        features: FeaturesXml { acpi: (), tcg },
        on_poweroff: "destroy",
        on_reboot: "restart",
        on_crash: "destroy",
        devices: DevicesXml {
            disk: [
                DiskXml::volume(&spec.pool, &spec.root_volume, "qcow2", "vda", None),
                DiskXml {
                    readonly: Some(()),
                    ..DiskXml::volume(&spec.pool, &spec.seed_volume, "raw", SEED_DEVICE, None)
                },
            ]
            .into_iter()
            .chain(spec.data_disks.iter().cloned())
            .collect(),
            interface: spec
                .networks
                .iter()
                .map(|network| InterfaceXml {
                    kind: "network",
                    source: NetworkSourceXml { network: network.clone() },
                    model: Typed::new("virtio"),
                })
                .collect(),
            serial: SerialXml { kind: "pty", log: spec.console_log.clone().map(|file| LogXml { file, append: "on" }) },
            console: Typed::new("pty"),
            channel: ChannelXml { kind: "unix", target: ChannelTargetXml { kind: "virtio", name: GUEST_AGENT_PORT } },
            rng: RngXml { model: "virtio", backend: RngBackendXml { model: "random", device: "/dev/urandom" } },
        },
    };
    let mut xml = to_xml("domain", &domain)?;
    // The escape hatches go in as the user wrote them, once they are known
    // to be well-formed elements: libvirt judges the rest.
    if let Some(extra) = &spec.extra_devices_xml {
        check_fragment(extra, "spec.provider.libvirt.extraDevicesXML")?;
        let at = xml.rfind("</devices>").ok_or("the domain XML has no </devices>")?;
        xml.insert_str(at, extra);
    }
    if let Some(extra) = &spec.extra_domain_xml {
        check_fragment(extra, "spec.provider.libvirt.extraDomainXML")?;
        let at = xml.rfind("</domain>").ok_or("the domain XML has no </domain>")?;
        xml.insert_str(at, extra);
    }
    Ok(xml)
}

/// Whether `fragment` is a sequence of complete, well-formed elements (and
/// whitespace or comments), so spliced into a document it ends where it
/// began.
fn check_fragment(fragment: &str, field: &str) -> Result<(), String> {
    use quick_xml::events::Event;
    let invalid = |why: String| format!("{field} is not well-formed XML elements: {why}");
    let mut reader = quick_xml::Reader::from_str(fragment);
    reader.config_mut().check_end_names = true;
    let mut depth = 0usize;
    loop {
        match reader.read_event().map_err(|e| invalid(e.to_string()))? {
            Event::Start(_) => depth += 1,
            Event::End(_) if depth == 0 => return Err(invalid("a closing tag without its opening one".into())),
            Event::End(_) => depth -= 1,
            Event::Empty(_) | Event::Comment(_) => {}
            Event::Text(t) if depth > 0 || t.iter().all(u8::is_ascii_whitespace) => {}
            Event::Text(_) => return Err(invalid("text outside an element".into())),
            Event::CData(_) | Event::GeneralRef(_) if depth > 0 => {}
            Event::Eof if depth == 0 => return Ok(()),
            Event::Eof => return Err(invalid("an element is not closed".into())),
            other => return Err(invalid(format!("{other:?} is not allowed here"))),
        }
    }
}

/// What the operator reads back from a domain's XML.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct DomainDescription {
    #[serde(rename = "@type", default)]
    kind: String,
    #[serde(default)]
    pub devices: DomainDevices,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct DomainDevices {
    #[serde(default)]
    pub disk: Vec<DiskXml>,
    #[serde(default)]
    interface: Vec<InterfaceDescription>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
struct InterfaceDescription {
    mac: Option<MacXml>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
struct MacXml {
    #[serde(rename = "@address")]
    address: String,
}

impl DomainDescription {
    pub fn parse(xml: &str) -> Result<Self, String> {
        quick_xml::de::from_str(xml).map_err(|e| format!("cannot read domain XML: {e}"))
    }

    /// The domain's type, when it is one the operator defines.
    pub fn domain_type(&self) -> Option<ResolvedDomainType> {
        match self.kind.as_str() {
            "kvm" => Some(ResolvedDomainType::Kvm),
            "qemu" => Some(ResolvedDomainType::Qemu),
            _ => None,
        }
    }

    /// The MAC addresses of the domain's interfaces, in its order,
    /// lowercase (libvirt assigns them at define).
    pub fn interface_macs(&self) -> Vec<String> {
        self.devices.interface.iter().filter_map(|i| i.mac.as_ref()).map(|m| m.address.to_ascii_lowercase()).collect()
    }
}

/// The operator's metadata element as libvirt returns it.
pub fn parse_owner(xml: &str) -> Result<DomainOwner, String> {
    quick_xml::de::from_str(xml).map_err(|e| format!("cannot read the domain's {METADATA_PREFIX} metadata: {e}"))
}

// ---------------------------------------------------------------- networks

#[derive(Serialize)]
struct NetworkXml {
    name: String,
    uuid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    forward: Option<ForwardXml>,
    ip: IpXml,
}

#[derive(Serialize)]
struct ForwardXml {
    #[serde(rename = "@mode")]
    mode: &'static str,
}

#[derive(Serialize)]
struct IpXml {
    #[serde(rename = "@address")]
    address: String,
    #[serde(rename = "@prefix")]
    prefix: u8,
    dhcp: DhcpXml,
}

#[derive(Serialize)]
struct DhcpXml {
    range: RangeXml,
}

#[derive(Serialize)]
struct RangeXml {
    #[serde(rename = "@start")]
    start: String,
    #[serde(rename = "@end")]
    end: String,
}

/// An IPv4 CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str, field: &str) -> Result<Self, String> {
        let bad = || format!("{field} {text:?} is not an IPv4 CIDR block such as 192.168.100.0/24");
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=28).contains(&prefix) {
            return Err(format!("{field} {text}: the prefix length must be between /8 and /28"));
        }
        let network = Ipv4Addr::from(u32::from(addr) & (u32::MAX << (32 - prefix)));
        Ok(Self { network, prefix })
    }

    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }

    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & (u32::MAX << (32 - self.prefix)) == u32::from(self.network)
    }

    /// The hypervisor's address: the first of the block.
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }

    /// From the tenth address (or the second, in a small block) to the last but one.
    pub fn default_dhcp(&self) -> (Ipv4Addr, Ipv4Addr) {
        let start = if self.size() > 32 { 10 } else { 2 };
        (self.nth(start), self.nth(self.size() - 2))
    }
}

/// The network XML of a Network's libvirt network.
pub fn network_xml(
    name: &str,
    uuid: &str,
    mode: LibvirtForwardMode,
    cidr: &Cidr,
    dhcp: Option<&DhcpRange>,
) -> Result<String, String> {
    let (start, end) = match dhcp {
        Some(range) => {
            let parse = |text: &str, field: &str| -> Result<Ipv4Addr, String> {
                let addr: Ipv4Addr = text
                    .parse()
                    .map_err(|_| format!("spec.provider.libvirt.dhcpRange.{field} {text:?} is not an IPv4 address"))?;
                if !cidr.contains(addr) || addr == cidr.gateway() {
                    return Err(format!(
                        "spec.provider.libvirt.dhcpRange.{field} {addr} must lie in spec.provider.libvirt.cidr {}/{} and not be its first address {}",
                        cidr.network,
                        cidr.prefix,
                        cidr.gateway()
                    ));
                }
                Ok(addr)
            };
            let (start, end) = (parse(&range.start, "start")?, parse(&range.end, "end")?);
            if start > end {
                return Err(format!("spec.provider.libvirt.dhcpRange: start {start} is after end {end}"));
            }
            (start, end)
        }
        None => cidr.default_dhcp(),
    };
    let forward = match mode {
        LibvirtForwardMode::Nat => Some("nat"),
        LibvirtForwardMode::Route => Some("route"),
        LibvirtForwardMode::Open => Some("open"),
        LibvirtForwardMode::Isolated => None,
    };
    let network = NetworkXml {
        name: name.into(),
        uuid: uuid.into(),
        forward: forward.map(|mode| ForwardXml { mode }),
        ip: IpXml {
            address: cidr.gateway().to_string(),
            prefix: cidr.prefix,
            dhcp: DhcpXml { range: RangeXml { start: start.to_string(), end: end.to_string() } },
        },
    };
    to_xml("network", &network)
}

// ---------------------------------------------------------------- volumes

#[derive(Serialize)]
struct VolumeXml {
    name: String,
    capacity: Sized,
    target: VolumeTargetXml,
    #[serde(rename = "backingStore", skip_serializing_if = "Option::is_none")]
    backing_store: Option<BackingStoreXml>,
}

#[derive(Serialize)]
struct VolumeTargetXml {
    format: Typed,
}

#[derive(Serialize)]
struct BackingStoreXml {
    path: String,
    format: Typed,
}

/// What the operator reads back from a storage volume's XML.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct VolumeDescription {
    #[serde(default)]
    target: VolumeTargetDescription,
    #[serde(rename = "backingStore", default)]
    backing_store: Option<BackingStoreDescription>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
struct VolumeTargetDescription {
    format: Option<Typed>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
struct BackingStoreDescription {
    path: Option<String>,
}

impl VolumeDescription {
    pub fn parse(xml: &str) -> Result<Self, String> {
        quick_xml::de::from_str(xml).map_err(|e| format!("cannot read volume XML: {e}"))
    }

    /// The format libvirt gives the volume (`qcow2`, `raw`); empty if none.
    pub fn format(&self) -> &str {
        self.target.format.as_ref().map(|f| f.kind.as_str()).unwrap_or_default()
    }

    /// The path of the image this volume is an overlay of.
    pub fn backing(&self) -> Option<&str> {
        self.backing_store.as_ref().and_then(|b| b.path.as_deref())
    }
}

/// A storage volume of `capacity_bytes` in `format` (qcow2, raw); a qcow2
/// volume may be an overlay of the qcow2 image `backing`.
pub fn volume_xml(name: &str, capacity_bytes: u64, format: &str, backing: Option<&str>) -> Result<String, String> {
    let volume = VolumeXml {
        name: name.into(),
        capacity: Sized { unit: "bytes".into(), value: capacity_bytes },
        target: VolumeTargetXml { format: Typed::new(format) },
        backing_store: backing.map(|path| BackingStoreXml { path: path.into(), format: Typed::new("qcow2") }),
    };
    to_xml("volume", &volume)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "prod-web-1-0123abcd".into(),
            uuid: "0123abcd-0000-4000-8000-000000000001".into(),
            owner: DomainOwner {
                namespace: "prod".into(),
                name: "web-1".into(),
                uid: "0123abcd-0000-4000-8000-000000000001".into(),
                host_key: "ssh-ed25519 AAAAC3Nza k".into(),
                spec_digest: String::new(),
            },
            domain_type: ResolvedDomainType::Qemu,
            vcpus: 2,
            memory_mib: 256,
            kernel: Some("/img/vmlinuz".into()),
            initrd: Some("/img/initrd.img".into()),
            cmdline: Some("console=ttyS0 root=/dev/vda".into()),
            pool: "default".into(),
            root_volume: "prod-web-1-0123abcd.qcow2".into(),
            seed_volume: "prod-web-1-0123abcd-seed.img".into(),
            networks: vec!["prod-lan".into()],
            extra_domain_xml: None,
            extra_devices_xml: None,
            console_log: None,
            data_disks: Vec::new(),
        }
    }

    #[test]
    fn domain_xml_has_owner_disks_network_and_kernel() {
        let xml = domain_xml(&spec()).unwrap();
        for part in [
            "<domain type=\"qemu\">",
            "<uuid>0123abcd-0000-4000-8000-000000000001</uuid>",
            "<nixops:machine xmlns:nixops=\"https://nixops.io/libvirt/v1\" namespace=\"prod\" name=\"web-1\"",
            "hostKey=\"ssh-ed25519 AAAAC3Nza k\"",
            "<memory unit=\"MiB\">256</memory>",
            "<vcpu>2</vcpu>",
            "<kernel>/img/vmlinuz</kernel>",
            "<cmdline>console=ttyS0 root=/dev/vda</cmdline>",
            "<source pool=\"default\" volume=\"prod-web-1-0123abcd.qcow2\"/><target dev=\"vda\" bus=\"virtio\"/>",
            "<target dev=\"vdz\" bus=\"virtio\"/><readonly/>",
            "<interface type=\"network\"><source network=\"prod-lan\"/><model type=\"virtio\"/></interface>",
            "<tcg><tb-cache unit=\"MiB\">64</tb-cache></tcg>",
            "<channel type=\"unix\"><target type=\"virtio\" name=\"org.qemu.guest_agent.0\"/></channel>",
        ] {
            assert!(xml.contains(part), "{part} missing from {xml}");
        }
    }

    #[test]
    fn kvm_domains_have_no_tcg_settings_and_text_is_escaped() {
        let mut spec = spec();
        spec.domain_type = ResolvedDomainType::Kvm;
        spec.cmdline = Some("a<b & c".into());
        let xml = domain_xml(&spec).unwrap();
        assert!(xml.starts_with("<domain type=\"kvm\">"), "{xml}");
        assert!(!xml.contains("<tcg>"), "{xml}");
        assert!(xml.contains("<cmdline>a&lt;b &amp; c</cmdline>"), "{xml}");
    }

    #[test]
    fn auto_takes_kvm_only_where_offered() {
        let resolve = |wanted, kvm: Result<bool, &'static str>| ResolvedDomainType::resolve(wanted, || kvm);
        assert_eq!(resolve(LibvirtDomainType::Auto, Ok(true)), Ok(ResolvedDomainType::Kvm));
        assert_eq!(resolve(LibvirtDomainType::Auto, Ok(false)), Ok(ResolvedDomainType::Qemu));
        assert_eq!(resolve(LibvirtDomainType::Qemu, Ok(true)), Ok(ResolvedDomainType::Qemu));
        assert_eq!(resolve(LibvirtDomainType::Kvm, Ok(false)), Ok(ResolvedDomainType::Kvm));
        // Capabilities that cannot be read are an error, never a quiet qemu;
        // an explicit type does not ask.
        assert_eq!(resolve(LibvirtDomainType::Auto, Err("no answer")), Err("no answer"));
        assert_eq!(resolve(LibvirtDomainType::Qemu, Err("no answer")), Ok(ResolvedDomainType::Qemu));
    }

    #[test]
    fn owner_and_disks_are_read_back() {
        let owner = parse_owner(
            "<nixops:machine xmlns:nixops=\"https://nixops.io/libvirt/v1\" namespace=\"prod\" name=\"web-1\" uid=\"u\" hostKey=\"ssh-ed25519 AAAA\"/>",
        )
        .unwrap();
        assert_eq!(owner.uid, "u");
        assert_eq!(owner.host_key, "ssh-ed25519 AAAA");
        let described = DomainDescription::parse(
            "<domain type='qemu'><name>x</name><devices><emulator>/usr/bin/qemu</emulator>\
             <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='p' volume='v'/>\
             <backingStore/><target dev='vdb' bus='virtio'/><alias name='virtio-disk1'/></disk>\
             <disk type='file' device='cdrom'><driver name='qemu'/><target dev='sda' bus='sata'/><readonly/></disk>\
             <disk type='block' device='lun'><source dev='/dev/sdx'/></disk>\
             <interface type='network'/><interface type='network'><mac address='52:54:00:AB:cd:01'/></interface>\
             </devices></domain>",
        )
        .unwrap();
        assert_eq!(described.interface_macs(), ["52:54:00:ab:cd:01"]);
        assert_eq!(described.domain_type(), Some(ResolvedDomainType::Qemu));
        // Disks of other kinds are read too, and are no pool's volumes.
        assert_eq!(described.devices.disk.len(), 3);
        assert_eq!(described.devices.disk[0].source_volume(), Some(("p", "v")));
        assert_eq!(described.devices.disk[1].source_volume(), None);
        assert_eq!(described.devices.disk[2].source_volume(), None);
        assert_eq!(described.devices.disk[0].target_dev(), "vdb");
    }

    #[test]
    fn network_xml_per_mode_with_default_and_given_dhcp() {
        let cidr = Cidr::parse("10.20.30.0/24", "cidr").unwrap();
        let nat = network_xml("n", "u", LibvirtForwardMode::Nat, &cidr, None).unwrap();
        assert_eq!(
            nat,
            "<network><name>n</name><uuid>u</uuid><forward mode=\"nat\"/><ip address=\"10.20.30.1\" prefix=\"24\">\
             <dhcp><range start=\"10.20.30.10\" end=\"10.20.30.254\"/></dhcp></ip></network>"
        );
        let isolated = network_xml("n", "u", LibvirtForwardMode::Isolated, &cidr, None).unwrap();
        assert!(!isolated.contains("<forward"), "{isolated}");
        let range = DhcpRange { start: "10.20.30.100".into(), end: "10.20.30.110".into() };
        let routed = network_xml("n", "u", LibvirtForwardMode::Route, &cidr, Some(&range)).unwrap();
        assert!(routed.contains("<forward mode=\"route\"/>") && routed.contains("start=\"10.20.30.100\""), "{routed}");
        let outside = DhcpRange { start: "10.20.31.1".into(), end: "10.20.30.110".into() };
        let err = network_xml("n", "u", LibvirtForwardMode::Nat, &cidr, Some(&outside)).unwrap_err();
        assert!(err.contains("dhcpRange.start") && err.contains("10.20.30.0/24"), "{err}");
        let small = Cidr::parse("192.168.1.16/28", "cidr").unwrap();
        assert_eq!(small.default_dhcp(), ("192.168.1.18".parse().unwrap(), "192.168.1.30".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/30", "spec.cidr").unwrap_err().contains("/28"));
    }

    #[test]
    fn volume_format_and_backing_file_are_read_back() {
        let xml = "<volume type='file'><name>a</name><target><path>/p/a</path><format type='qcow2'/>\
                   <permissions><mode>0600</mode></permissions></target></volume>";
        let described = VolumeDescription::parse(xml).unwrap();
        assert_eq!((described.format(), described.backing()), ("qcow2", None));
        let bare =
            VolumeDescription::parse("<volume><target><path>/p</path></target><backingStore/></volume>").unwrap();
        assert_eq!((bare.format(), bare.backing()), ("", None));
        let overlay = VolumeDescription::parse(&volume_xml("o.qcow2", 1 << 20, "qcow2", Some("/img/b.qcow2")).unwrap());
        assert_eq!(overlay.unwrap().backing(), Some("/img/b.qcow2"));
    }

    #[test]
    fn volume_xml_overlay_and_raw() {
        let overlay = volume_xml("a.qcow2", 8 << 30, "qcow2", Some("/img/base.qcow2")).unwrap();
        assert_eq!(
            overlay,
            "<volume><name>a.qcow2</name><capacity unit=\"bytes\">8589934592</capacity><target><format type=\"qcow2\"/></target>\
             <backingStore><path>/img/base.qcow2</path><format type=\"qcow2\"/></backingStore></volume>"
        );
        assert!(!volume_xml("s.img", 1 << 20, "raw", None).unwrap().contains("backingStore"));
        let disk = DiskXml::volume("default", "data.qcow2", "qcow2", "vdb", Some("pgdata")).to_xml().unwrap();
        assert_eq!(
            disk,
            "<disk type=\"volume\" device=\"disk\"><driver name=\"qemu\" type=\"qcow2\"/>\
             <source pool=\"default\" volume=\"data.qcow2\"/><target dev=\"vdb\" bus=\"virtio\"/><serial>pgdata</serial></disk>"
        );
    }

    /// Capabilities of a host with `features`, offering `domains` for x86_64.
    fn capabilities(features: &[&str], domains: &[&str]) -> String {
        let features: String = features.iter().map(|f| format!("<feature name='{f}'/>")).collect();
        let domains: String = domains.iter().map(|d| format!("<domain type='{d}'/>")).collect();
        format!(
            "<capabilities><host><uuid>x</uuid><cpu><arch>x86_64</arch><model>Skylake-Client-IBRS</model>{features}</cpu></host>\
             <guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>{domains}</arch></guest></capabilities>"
        )
    }

    #[test]
    fn kvm_is_used_only_with_hardware_virtualisation() {
        // Bare metal, and a guest with nested virtualisation.
        assert!(kvm_works(&capabilities(&["ds", "vmx"], &["qemu", "kvm"])));
        assert!(kvm_works(&capabilities(&["hypervisor", "svm"], &["qemu", "kvm"])));
        assert!(kvm_works(&capabilities(&["ds"], &["qemu", "kvm"])));
        // A guest with a paravirtual /dev/kvm (this machine), or no kvm at all.
        assert!(!kvm_works(&capabilities(&["hypervisor", "ss"], &["qemu", "kvm"])));
        assert!(!kvm_works(&capabilities(&["vmx"], &["qemu"])));
        assert!(!kvm_works("not xml"));
    }

    #[test]
    fn more_networks_are_more_interfaces_and_extra_xml_goes_inside() {
        let mut spec = spec();
        spec.networks.push("default".into());
        spec.extra_devices_xml = Some("<watchdog model='i6300esb' action='reset'/>".into());
        spec.extra_domain_xml = Some("<description>from extraDomainXML</description>\n".into());
        let xml = domain_xml(&spec).unwrap();
        assert_eq!(xml.matches("<interface type=\"network\">").count(), 2, "{xml}");
        assert!(xml.find("source network=\"prod-lan\"") < xml.find("source network=\"default\""), "{xml}");
        assert!(xml.contains("<watchdog model='i6300esb' action='reset'/></devices>"), "{xml}");
        assert!(xml.ends_with("<description>from extraDomainXML</description>\n</domain>"), "{xml}");
    }

    #[test]
    fn extra_xml_that_is_not_whole_elements_is_refused_naming_the_field() {
        for bad in ["<a>", "</devices><evil/>", "text", "<a></b>", "<a/><b>"] {
            let mut spec = spec();
            spec.extra_devices_xml = Some(bad.into());
            let err = domain_xml(&spec).unwrap_err();
            assert!(err.contains("spec.provider.libvirt.extraDevicesXML"), "{bad}: {err}");
        }
    }
}
