//! libvirt Volumes: a qcow2 or raw volume in the Network's storage pool,
//! named after the Volume (namespace, name, UID) so it is found again after
//! a crash, attached to a machine's domain as a virtio disk whose serial
//! number is the Volume's name. Attachments are read from the domains'
//! XML: a volume is attached where a domain's disk names it.

use async_trait::async_trait;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_vol::StorageVol;

use super::remote::Connection;
use super::xml::{DiskXml, DomainDescription};
use super::{Hypervisor, Libvirt, failed, lookup_domain, lookup_volume, network_spec, object_name};
use crate::api::volume::{LibvirtVolume, VolumeProvider as VolumeProviderSpec};
use crate::provider::{
    AttachmentState, CloudTarget, Lookup, ProviderError, SnapshotState, VolumeAttachment, VolumeProvider, VolumeState,
};

const GIB: u64 = 1 << 30;

fn spec(spec: &VolumeProviderSpec) -> Result<&LibvirtVolume, ProviderError> {
    spec.libvirt.as_ref().ok_or_else(|| ProviderError::permanent("NoProvider", "spec.provider.libvirt is not set"))
}

/// The volume's name in the pool.
fn volume_name(target: &CloudTarget, format: &str) -> String {
    let ext = if format == "raw" { "img" } else { "qcow2" };
    format!("{}.{ext}", object_name(&target.owner))
}

/// The guest's device name (vdb) of a Machine.spec.volumes device (/dev/vdb).
fn guest_dev(device: &str) -> Result<&str, ProviderError> {
    let dev = device.strip_prefix("/dev/").unwrap_or(device);
    let ok = dev.len() == 3 && dev.starts_with("vd") && matches!(dev.as_bytes()[2], b'b'..=b'y');
    if !ok {
        return Err(ProviderError::permanent(
            "InvalidDevice",
            format!(
                "device {device} (Machine spec.volumes[].device) is not a virtio disk name; libvirt volumes attach as /dev/vdb … /dev/vdy"
            ),
        ));
    }
    Ok(dev)
}

/// Where a domain has a volume's disk: in its persistent definition, in
/// the running guest, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Presence {
    config: bool,
    live: bool,
}

impl Presence {
    /// A disk the running guest still has but the definition no longer
    /// does is an unplug asked for that the guest has not done yet (libvirt
    /// waits 5 s for it, then returns): detaching, not attached.
    fn state(self) -> AttachmentState {
        if self.live && !self.config { AttachmentState::Detaching } else { AttachmentState::Attached }
    }

    /// The flags of a detach: each side that still has the disk, or None
    /// while an unplug is pending (asking again fails on the definition).
    fn detach_flags(self) -> Option<u32> {
        let mut flags = 0;
        if self.config {
            flags |= virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
            if self.live {
                flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
            }
        }
        (flags != 0).then_some(flags)
    }
}

/// The disk of `domain` that shows volume `name` of `pool`, and where.
fn disk_of(domain: &Domain, pool: &str, name: &str) -> Result<Option<(DiskXml, Presence)>, ProviderError> {
    let find = |flags: u32| -> Result<Option<DiskXml>, ProviderError> {
        let xml = domain.get_xml_desc(flags).map_err(failed("reading a domain's XML"))?;
        let described = DomainDescription::parse(&xml).map_err(ProviderError::Transient)?;
        Ok(described.devices.disk.into_iter().find(|d| d.source_volume() == Some((pool, name))))
    };
    let in_config = find(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
    let in_live = if domain.is_active().map_err(failed("checking a domain"))? { find(0)? } else { None };
    let presence = Presence { config: in_config.is_some(), live: in_live.is_some() };
    Ok(in_live.or(in_config).map(|disk| (disk, presence)))
}

/// The disks of every domain on the hypervisor that show volume `name` of `pool`.
fn attachments(conn: &Connect, pool: &str, name: &str) -> Result<Vec<(Domain, DiskXml, Presence)>, ProviderError> {
    let mut found = Vec::new();
    for domain in conn.list_all_domains(0).map_err(failed("listing domains"))? {
        if let Some((disk, presence)) = disk_of(&domain, pool, name)? {
            found.push((domain, disk, presence));
        }
    }
    Ok(found)
}

fn state_of(
    conn: &Connect,
    pool: &str,
    vol: &StorageVol,
    name: &str,
    format: &str,
) -> Result<VolumeState, ProviderError> {
    let info = vol.get_info().map_err(failed(format!("reading volume {name}")))?;
    let attached = attachments(conn, pool, name)?
        .into_iter()
        .map(|(domain, disk, presence)| {
            Ok(VolumeAttachment {
                instance_id: domain.get_uuid_string().map_err(failed("reading a domain's UUID"))?,
                device: format!("/dev/{}", disk.target_dev()),
                state: presence.state(),
            })
        })
        .collect::<Result<Vec<_>, ProviderError>>()?;
    Ok(VolumeState {
        id: name.to_owned(),
        zone: pool.to_owned(),
        size_gib: i32::try_from(info.capacity.div_ceil(GIB)).unwrap_or(i32::MAX),
        volume_type: Some(format.to_owned()),
        iops: None,
        throughput: None,
        state: if attached.is_empty() { "available".into() } else { "in-use".into() },
        attachments: attached,
    })
}

/// Device-modification flags: the persistent config always, the running guest too.
fn affect(domain: &Domain) -> u32 {
    let mut flags = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
    if domain.is_active().unwrap_or(false) {
        flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    flags
}

/// The domain UUID of a libvirt Machine's providerID.
fn machine_id(provider_id: &str) -> Option<&str> {
    provider_id.strip_prefix(super::PROVIDER_ID_PREFIX).filter(|id| !id.is_empty())
}

struct Place {
    conn: Connection,
    pool: String,
    format: &'static str,
    name: String,
}

impl Libvirt {
    /// Where the volume is (`id`, else the name `volume`'s spec gives it),
    /// and how to reach its hypervisor.
    async fn volume_place(
        &self,
        target: &CloudTarget,
        volume: Option<&LibvirtVolume>,
        id: Option<&str>,
    ) -> Result<Place, ProviderError> {
        let network = network_spec(&target.network)?;
        let format = volume.map_or("qcow2", |v| v.format.as_str());
        let name = id.map_or_else(|| volume_name(target, format), str::to_owned);
        // The recorded name tells the format of a volume whose spec is not at hand.
        let format = if name.ends_with(".img") { "raw" } else { format };
        let conn = self.tunnels.connect(&target.network, &network).await?;
        Ok(Place { conn, pool: network.storage_pool, format, name })
    }
}

#[async_trait]
impl VolumeProvider for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn noun(&self) -> &'static str {
        "libvirt volume"
    }

    /// A volume is looked up by its name in the pool, which libvirtd knows
    /// as soon as it is created.
    fn lookup(&self) -> Lookup {
        Lookup::Immediate
    }

    async fn find(&self, target: &CloudTarget, id: Option<&str>) -> Result<Option<VolumeState>, ProviderError> {
        let place = self.volume_place(target, None, id).await?;
        // Without a recorded ID the format is not known here: the volume
        // is either name (qcow2 or raw).
        let names: Vec<(String, &'static str)> = match id {
            Some(_) => vec![(place.name.clone(), place.format)],
            None => ["qcow2", "raw"].into_iter().map(|format| (volume_name(target, format), format)).collect(),
        };
        self.call("find-volume", move || {
            let hv = Hypervisor::open(&place.conn)?;
            // No pool, no volume: a create says what is missing.
            let Some(pool) = hv.pool_if_exists(&place.pool)? else { return Ok(None) };
            for (name, format) in &names {
                if let Some(vol) = lookup_volume(&pool, name)? {
                    return state_of(&hv.0, &place.pool, &vol, name, format).map(Some);
                }
            }
            Ok(None)
        })
        .await
    }

    async fn create(&self, target: &CloudTarget, spec_: &VolumeProviderSpec) -> Result<VolumeState, ProviderError> {
        let volume = spec(spec_)?;
        let place = self.volume_place(target, Some(volume), None).await?;
        let bytes = u64::try_from(volume.size_gib).unwrap_or(1) * GIB;
        let xml = super::xml::volume_xml(&place.name, bytes, place.format, None)
            .map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
        self.call("create-volume", move || {
            let hv = Hypervisor::open(&place.conn)?;
            let pool = hv.pool(&place.pool)?;
            let vol =
                StorageVol::create_xml(&pool, &xml, 0).map_err(failed(format!("creating volume {}", place.name)))?;
            state_of(&hv.0, &place.pool, &vol, &place.name, place.format)
        })
        .await
    }

    fn needs_update(&self, spec_: &VolumeProviderSpec, current: &VolumeState) -> bool {
        spec(spec_).is_ok_and(|v| v.size_gib > current.size_gib)
    }

    async fn update(&self, target: &CloudTarget, id: &str, spec_: &VolumeProviderSpec) -> Result<(), ProviderError> {
        let volume = spec(spec_)?;
        let place = self.volume_place(target, Some(volume), Some(id)).await?;
        let bytes = u64::try_from(volume.size_gib).unwrap_or(1) * GIB;
        self.call("resize-volume", move || {
            let hv = Hypervisor::open(&place.conn)?;
            let pool = hv.pool(&place.pool)?;
            // A running guest's disk grows through QEMU (the guest sees the
            // new size at once); a disk no guest runs grows in the pool.
            for (domain, disk, _) in attachments(&hv.0, &place.pool, &place.name)? {
                if domain.is_active().unwrap_or(false) {
                    domain
                        .block_resize(disk.target_dev(), bytes, virt::sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                        .map_err(failed(format!("growing volume {} in its running machine", place.name)))?;
                    return Ok(());
                }
            }
            let vol = lookup_volume(&pool, &place.name)?
                .ok_or_else(|| ProviderError::Transient(format!("volume {} is gone", place.name)))?;
            vol.resize(bytes, 0).map_err(failed(format!("growing volume {}", place.name)))?;
            Ok(())
        })
        .await
    }

    fn machine_id<'a>(&self, provider_id: &'a str) -> Option<&'a str> {
        machine_id(provider_id)
    }

    async fn attach(&self, target: &CloudTarget, id: &str, instance: &str, device: &str) -> Result<(), ProviderError> {
        let place = self.volume_place(target, None, Some(id)).await?;
        let dev = guest_dev(device)?.to_owned();
        let instance = instance.to_owned();
        // What /sys/block/<dev>/serial shows in the guest (virtio allows 20 bytes).
        let serial: String = target.owner.name.chars().take(20).collect();
        self.call("attach-volume", move || {
            let hv = Hypervisor::open(&place.conn)?;
            let domain = lookup_domain(&hv, &instance)?
                .ok_or_else(|| ProviderError::Transient(format!("domain {instance} is gone")))?;
            let disk = DiskXml::volume(&place.pool, &place.name, place.format, &dev, Some(&serial));
            let xml = disk.to_xml().map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
            domain
                .attach_device_flags(&xml, affect(&domain))
                .map_err(failed(format!("attaching volume {} as {dev}", place.name)))?;
            Ok(())
        })
        .await
    }

    async fn detach(&self, target: &CloudTarget, id: &str, instance: &str) -> Result<(), ProviderError> {
        let place = self.volume_place(target, None, Some(id)).await?;
        let instance = instance.to_owned();
        self.call("detach-volume", move || {
            let hv = Hypervisor::open(&place.conn)?;
            let Some(domain) = lookup_domain(&hv, &instance)? else { return Ok(()) };
            let Some((disk, presence)) = disk_of(&domain, &place.pool, &place.name)? else { return Ok(()) };
            // An unplug already asked for is the guest's to finish.
            let Some(flags) = presence.detach_flags() else { return Ok(()) };
            let xml = disk.to_xml().map_err(ProviderError::Transient)?;
            domain.detach_device_flags(&xml, flags).map_err(failed(format!("detaching volume {}", place.name)))?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, target: &CloudTarget, id: &str) -> Result<(), ProviderError> {
        let place = self.volume_place(target, None, Some(id)).await?;
        self.call("delete-volume", move || {
            let hv = Hypervisor::open(&place.conn)?;
            let Some(pool) = hv.pool_if_exists(&place.pool)? else { return Ok(()) };
            super::delete_volume(&pool, &place.name)
        })
        .await
    }

    // Backups of libvirt volumes are not built yet: a Backup that names
    // one stalls, and there is never a snapshot to list or delete.
    async fn snapshots(&self, _target: &CloudTarget) -> Result<Vec<SnapshotState>, ProviderError> {
        Ok(Vec::new())
    }

    async fn create_snapshot(
        &self,
        _target: &CloudTarget,
        _id: &str,
        volume: &str,
    ) -> Result<SnapshotState, ProviderError> {
        Err(ProviderError::permanent(
            "SnapshotsUnsupported",
            format!(
                "Volume {volume} is a libvirt volume, which Backups cannot snapshot yet; \
                 list only EBS Volumes in spec.volumes"
            ),
        ))
    }

    async fn delete_snapshot(&self, _target: &CloudTarget, _id: &str) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_virtio_disk_names_after_the_root_disk() {
        assert_eq!(guest_dev("/dev/vdb").unwrap(), "vdb");
        assert_eq!(guest_dev("/dev/vdy").unwrap(), "vdy");
        for bad in ["/dev/vda", "/dev/vdz", "/dev/xvdf", "/dev/sdb", "/dev/vdbb"] {
            let err = guest_dev(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("/dev/vdb"), "{err}");
        }
    }

    #[test]
    fn a_disk_only_the_running_guest_has_is_an_unplug_under_way() {
        use virt::sys::{VIR_DOMAIN_AFFECT_CONFIG as CONFIG, VIR_DOMAIN_AFFECT_LIVE as LIVE};
        let both = Presence { config: true, live: true };
        let defined = Presence { config: true, live: false };
        let unplugging = Presence { config: false, live: true };
        assert_eq!(both.state(), AttachmentState::Attached);
        assert_eq!(defined.state(), AttachmentState::Attached);
        assert_eq!(unplugging.state(), AttachmentState::Detaching);
        assert_eq!(both.detach_flags(), Some(CONFIG | LIVE));
        assert_eq!(defined.detach_flags(), Some(CONFIG));
        assert_eq!(unplugging.detach_flags(), None);
    }

    #[test]
    fn machine_ids_come_from_libvirt_provider_ids_only() {
        assert_eq!(machine_id("libvirt:///6f1c2a7e-4b7d"), Some("6f1c2a7e-4b7d"));
        assert_eq!(machine_id("aws:///eu-west-1a/i-0abc"), None);
        assert_eq!(machine_id("libvirt:///"), None);
    }
}
