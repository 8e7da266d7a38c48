//! The NoCloud seed a libvirt machine reads at first boot: a small FAT file
//! system labelled `cidata` holding `meta-data` and `user-data`, as
//! cloud-init's NoCloud data source reads it. `user-data` is `#cloud-config`
//! followed by JSON (which is YAML): root's authorized key and the SSH host
//! key the operator generated, so the operator knows the machine's host key
//! before it first connects.

use std::io::{Cursor, Write};

use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

/// Size of the seed volume: the smallest FAT file system fatfs formats comfortably.
pub const SEED_BYTES: u64 = 2 << 20;

/// A generated SSH host key: the private half goes into the seed only.
pub struct HostKeyPair {
    pub private_openssh: String,
    pub public_openssh: String,
}

/// Generates an ed25519 host key for machine `comment`.
pub fn generate_host_key(comment: &str) -> Result<HostKeyPair, String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("cannot read random bytes: {e}"))?;
    let mut private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    private.set_comment(comment);
    let private_openssh =
        private.to_openssh(LineEnding::LF).map_err(|e| format!("cannot encode the host key: {e}"))?.to_string();
    let public_openssh = private.public_key().to_openssh().map_err(|e| format!("cannot encode the host key: {e}"))?;
    Ok(HostKeyPair { private_openssh, public_openssh })
}

/// What a seed tells the machine.
pub struct SeedContent<'a> {
    /// cloud-init's instance-id: the seed is applied once per value.
    pub instance_id: &'a str,
    pub hostname: &'a str,
    pub authorized_keys: Vec<String>,
    pub host_key: &'a HostKeyPair,
}

impl SeedContent<'_> {
    fn meta_data(&self) -> String {
        format!("instance-id: {}\nlocal-hostname: {}\n", self.instance_id, self.hostname)
    }

    fn user_data(&self) -> String {
        let config = serde_json::json!({
            "ssh_authorized_keys": self.authorized_keys,
            "ssh_deletekeys": true,
            "ssh_keys": {
                "ed25519_private": self.host_key.private_openssh,
                "ed25519_public": self.host_key.public_openssh,
            },
        });
        format!("#cloud-config\n{config}\n")
    }

    /// The seed disk's bytes: a FAT file system labelled CIDATA.
    pub fn image(&self) -> Result<Vec<u8>, String> {
        let io = |e: std::io::Error| format!("cannot write the seed file system: {e}");
        let mut disk = Cursor::new(vec![0u8; SEED_BYTES as usize]);
        fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     ")).map_err(io)?;
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(io)?;
            for (name, content) in [("meta-data", self.meta_data()), ("user-data", self.user_data())] {
                let mut file = fs.root_dir().create_file(name).map_err(io)?;
                file.truncate().map_err(io)?;
                file.write_all(content.as_bytes()).map_err(io)?;
                file.flush().map_err(io)?;
            }
            fs.unmount().map_err(io)?;
        }
        Ok(disk.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn seed_is_a_cidata_fat_with_keys() {
        let key = generate_host_key("test").unwrap();
        assert!(key.public_openssh.starts_with("ssh-ed25519 "), "{}", key.public_openssh);
        assert!(key.private_openssh.contains("BEGIN OPENSSH PRIVATE KEY"));
        let seed = SeedContent {
            instance_id: "uid-1",
            hostname: "web-1",
            authorized_keys: vec!["ssh-ed25519 AAAA login".into()],
            host_key: &key,
        };
        let image = seed.image().unwrap();
        assert_eq!(image.len() as u64, SEED_BYTES);
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "CIDATA");
        let read = |name: &str| {
            let mut text = String::new();
            fs.root_dir().open_file(name).unwrap().read_to_string(&mut text).unwrap();
            text
        };
        assert_eq!(read("meta-data"), "instance-id: uid-1\nlocal-hostname: web-1\n");
        let user_data = read("user-data");
        let json = user_data.strip_prefix("#cloud-config\n").expect("cloud-config header");
        let config: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(config["ssh_authorized_keys"][0], "ssh-ed25519 AAAA login");
        assert_eq!(config["ssh_keys"]["ed25519_public"], key.public_openssh.as_str());
        assert_eq!(config["ssh_keys"]["ed25519_private"], key.private_openssh.as_str());
    }
}
