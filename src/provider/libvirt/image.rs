//! Base images named by URL: downloaded by the operator, checked against
//! the Machine's `baseImageSha256`, and uploaded into the Network's storage
//! pool through libvirt (so a remote hypervisor needs no access to the URL)
//! as one volume per Network and image, which all its machines' overlays
//! share and which is deleted with the Network, unless overlays of domains
//! kept by `deletionPolicy: Orphan` still need it.
//!
//! The upload goes to a `.part` volume first and becomes the image's volume
//! by a clone inside libvirtd, so a volume of the final name is always
//! complete, whenever the operator is killed. Images must be qcow2.

use std::io::{Read, Seek, Write};

use futures::StreamExt;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::xml::VolumeDescription;
use super::{Hypervisor, delete_found_volume, delete_volume, failed, lookup_volume, upload};
use crate::provider::ProviderError;

/// The volume of `network`'s (libvirt network name) copy of the image with
/// digest `sha256`.
pub fn volume_name(network: &str, sha256: &str) -> String {
    format!("{}{}.qcow2", prefix(network), &sha256[..sha256.len().min(16)])
}

/// What every downloaded image volume of `network` starts with.
pub fn prefix(network: &str) -> String {
    format!("{network}-base-")
}

/// Whether `base` is a URL the operator downloads.
pub fn is_url(base: &str) -> bool {
    base.starts_with("https://") || base.starts_with("http://")
}

/// Downloads `url` into a temporary file, refusing it unless its SHA-256 is
/// `sha256`; returns the file (at its start) and its length.
pub async fn download(url: &str, sha256: &str) -> Result<(std::fs::File, u64), ProviderError> {
    let failed = |e: &dyn std::fmt::Display| {
        ProviderError::Transient(format!("downloading spec.provider.libvirt.baseImage {url}: {e}"))
    };
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| failed(&e))?;
    let response = client.get(url).send().await.map_err(|e| failed(&e))?;
    let status = response.status();
    if status.is_client_error() {
        return Err(ProviderError::permanent(
            "BaseImageNotFound",
            format!("spec.provider.libvirt.baseImage {url} answered {status}; fix the URL"),
        ));
    }
    if !status.is_success() {
        return Err(failed(&format!("the server answered {status}")));
    }
    let mut file = tempfile::tempfile().map_err(|e| failed(&e))?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut length = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(&e))?;
        digest.update(&chunk);
        file.write_all(&chunk).map_err(|e| failed(&e))?;
        length += chunk.len() as u64;
    }
    let got: String = digest.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    if got != sha256 {
        return Err(ProviderError::permanent(
            "BaseImageChecksumMismatch",
            format!(
                "spec.provider.libvirt.baseImage {url} served {length} bytes with sha256 {got}, but baseImageSha256 is {sha256}; nothing was uploaded. Fix the checksum if the image changed on purpose"
            ),
        ));
    }
    file.rewind().map_err(|e| failed(&e))?;
    Ok((file, length))
}

/// Uploads `file` (`length` bytes) into `pool` as volume `name`, through a
/// `.part` volume; returns the volume's path on the hypervisor.
pub(super) fn install(
    hv: &Hypervisor,
    pool: &StoragePool,
    name: &str,
    file: impl Read,
    length: u64,
) -> Result<String, ProviderError> {
    let part = format!("{name}.part");
    delete_volume(pool, &part)?;
    // Created raw, so the upload writes the file's bytes as they are.
    let part_xml =
        super::xml::volume_xml(&part, length, "raw", None).map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
    let part_vol = StorageVol::create_xml(pool, &part_xml, 0).map_err(failed(format!("creating volume {part}")))?;
    upload(hv, &part_vol, file, length, "the base image")?;
    // libvirt probes the .part volume's format when it refreshes the pool,
    // which it starts by itself after an upload but without waiting for
    // it: refresh here, so the clone reads it as the qcow2 image it is
    // (qemu-img convert from qcow2), never as raw bytes to wrap.
    pool.refresh(0).map_err(failed("refreshing the storage pool after the upload"))?;
    let part_vol = lookup_volume(pool, &part)?
        .ok_or_else(|| ProviderError::Transient(format!("volume {part} vanished after its upload")))?;
    let described = part_vol.get_xml_desc(0).map_err(failed(format!("reading volume {part}")))?;
    let described = VolumeDescription::parse(&described).map_err(ProviderError::Transient)?;
    let format = described.format();
    if format != "qcow2" {
        delete_volume(pool, &part)?;
        return Err(ProviderError::permanent(
            "BaseImageNotQcow2",
            format!(
                "spec.provider.libvirt.baseImage is a {} image, not qcow2; convert it (qemu-img convert -O qcow2) \
                 and give its new URL and sha256",
                if format.is_empty() { "unknown" } else { format }
            ),
        ));
    }
    let final_xml =
        super::xml::volume_xml(name, length, "qcow2", None).map_err(|e| ProviderError::permanent("InvalidSpec", e))?;
    let volume = match StorageVol::create_xml_from(pool, &final_xml, &part_vol, 0) {
        Ok(volume) => volume,
        // Installed by someone else meanwhile: the name means it is complete.
        Err(e) => lookup_volume(pool, name)?.ok_or_else(|| failed(format!("creating volume {name}"))(e))?,
    };
    delete_volume(pool, &part)?;
    volume.get_path().map_err(failed(format!("reading the path of volume {name}")))
}

/// Deletes every downloaded image volume of `network` (and any `.part`)
/// that no other volume in the pool is an overlay of. Overlays left are
/// those of domains kept by `deletionPolicy: Orphan`: without their backing
/// image their disks could not be read, so the image is kept with them.
/// Returns the names of the images kept.
pub fn delete_unused(pool: &StoragePool, network: &str) -> Result<Vec<String>, ProviderError> {
    let prefix = prefix(network);
    let volumes = pool.list_volumes().map_err(failed("listing the storage pool's volumes"))?;
    let (images, others): (Vec<&String>, Vec<&String>) = volumes.iter().partition(|n| n.starts_with(&prefix));
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let mut backing = std::collections::HashSet::new();
    for name in others {
        let Some(vol) = lookup_volume(pool, name)? else { continue };
        let xml = vol.get_xml_desc(0).map_err(failed(format!("reading volume {name}")))?;
        // Only overlays matter: a volume libvirt describes oddly is none.
        if let Some(path) = VolumeDescription::parse(&xml).ok().as_ref().and_then(VolumeDescription::backing) {
            backing.insert(path.to_owned());
        }
    }
    let mut kept = Vec::new();
    for name in images {
        let Some(vol) = lookup_volume(pool, name)? else { continue };
        let path = vol.get_path().map_err(failed(format!("reading the path of volume {name}")))?;
        if backing.contains(&path) {
            kept.push(name.clone());
        } else {
            delete_found_volume(&vol, name)?;
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_volumes_belong_to_their_network() {
        let sha = "0123456789abcdef".repeat(4);
        let name = volume_name("prod-lab-1a2b3c4d", &sha);
        assert_eq!(name, "prod-lab-1a2b3c4d-base-0123456789abcdef.qcow2");
        assert!(name.starts_with(&prefix("prod-lab-1a2b3c4d")));
        assert!(is_url("https://images.example/nixos.qcow2") && !is_url("/var/lib/nixos.qcow2"));
    }
}
