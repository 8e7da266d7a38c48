//! The client side of Nix's serve protocol, spoken to `nix-store --serve
//! --write` on a machine: the handshake, QueryValidPaths (which of these
//! paths do you have?) and ImportPaths (here are paths in `nix-store
//! --export` format).
//!
//! ImportPaths takes any number of paths in one request and answers once at
//! the end, so a push costs one round trip however many paths it carries;
//! the legacy per-path commands wait a round trip for every path.

use std::collections::BTreeSet;

use super::{PathInfo, StorePath};
use crate::ssh::{RemoteProcess, Session, SshError};

const SERVE_MAGIC_1: u64 = 0x390c_9deb;
const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// Protocol 2.6, as Nix 2.8's own client sends.
const CLIENT_VERSION: u64 = 0x206;
const CMD_QUERY_VALID_PATHS: u64 = 1;
const CMD_IMPORT_PATHS: u64 = 4;
const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Errors in a serve conversation.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("nix-store --serve on the machine: {0}")]
    Protocol(String),
    #[error("nix-store --serve on the machine failed (exit status {status}): {stderr}")]
    Remote { status: String, stderr: String },
}

/// Appends a protocol integer (little-endian u64).
pub fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends a protocol string: length, bytes, zero padding to 8.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u64(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
    out.extend_from_slice(&[0u8; 8][..(8 - bytes.len() % 8) % 8]);
}

fn put_paths<'a>(out: &mut Vec<u8>, paths: impl ExactSizeIterator<Item = &'a StorePath>) {
    put_u64(out, paths.len() as u64);
    for path in paths {
        put_bytes(out, path.to_string().as_bytes());
    }
}

/// What a client sends first: its magic and version. The server's answer
/// (its magic and version) can be read later, which lets a whole request be
/// written without waiting.
pub fn client_hello() -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    put_u64(&mut out, SERVE_MAGIC_1);
    put_u64(&mut out, CLIENT_VERSION);
    out
}

/// The start of an ImportPaths request, after the hello.
pub fn import_paths_command() -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    put_u64(&mut out, CMD_IMPORT_PATHS);
    out
}

/// One path in `nix-store --export` format, as ImportPaths reads it:
/// a 1 (another path follows), the NAR, the export magic, the path, its
/// references, its deriver and a 0 (no legacy signature).
pub fn export_record(info: &PathInfo, nar: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nar.len() + 256 + 64 * info.references.len());
    put_u64(&mut out, 1);
    out.extend_from_slice(nar);
    put_u64(&mut out, EXPORT_MAGIC);
    put_bytes(&mut out, info.path.to_string().as_bytes());
    put_paths(&mut out, info.references.iter());
    put_bytes(&mut out, info.deriver.as_deref().unwrap_or("").as_bytes());
    put_u64(&mut out, 0);
    out
}

/// The end of an ImportPaths stream.
pub fn import_paths_end() -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    put_u64(&mut out, 0);
    out
}

/// Checks the server's magic and protocol version.
fn check_server_hello(magic: u64, version: u64) -> Result<(), ServeError> {
    if magic != SERVE_MAGIC_2 {
        return Err(ServeError::Protocol(format!(
            "unexpected answer {magic:#x} to the handshake; is the login shell printing something?"
        )));
    }
    if version >> 8 != 2 {
        return Err(ServeError::Protocol(format!("unsupported serve protocol version {version:#x}")));
    }
    Ok(())
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Reads the reply to an ImportPaths stream written in one go: the server's
/// hello, then 1 for success.
pub fn check_import_reply(stdout: &[u8]) -> Result<(), ServeError> {
    let (Some(magic), Some(version)) = (u64_at(stdout, 0), u64_at(stdout, 8)) else {
        return Err(ServeError::Protocol("no handshake answer".into()));
    };
    check_server_hello(magic, version)?;
    match u64_at(stdout, 16) {
        Some(1) => Ok(()),
        other => Err(ServeError::Protocol(format!("ImportPaths answered {other:?} instead of 1"))),
    }
}

/// An interactive `nix-store --serve --write` on a machine.
pub struct ServeConnection {
    process: RemoteProcess,
}

impl ServeConnection {
    /// Starts `nix-store --serve --write` and completes the handshake.
    pub async fn open(session: &Session) -> Result<Self, ServeError> {
        let mut process = session.spawn("nix-store --serve --write").await?;
        process.send(client_hello()).await?;
        let mut conn = Self { process };
        let magic = conn.read_u64().await?;
        let version = conn.read_u64().await?;
        check_server_hello(magic, version)?;
        Ok(conn)
    }

    async fn read_u64(&mut self) -> Result<u64, ServeError> {
        let bytes = self.process.read_exact(8).await?;
        u64_at(&bytes, 0).ok_or_else(|| ServeError::Protocol("short read".into()))
    }

    async fn read_string(&mut self) -> Result<String, ServeError> {
        let len = self.read_u64().await?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l < 1 << 16)
            .ok_or_else(|| ServeError::Protocol(format!("a string of {len} bytes where a store path was expected")))?;
        let padded = len + (8 - len % 8) % 8;
        let bytes = self.process.read_exact(padded).await?;
        String::from_utf8(bytes[..len].to_vec()).map_err(|_| ServeError::Protocol("a path that is not UTF-8".into()))
    }

    /// Which of `paths` the machine has. With `lock`, the machine keeps them
    /// from garbage collection while this connection is open.
    pub async fn query_valid_paths(
        &mut self,
        paths: impl ExactSizeIterator<Item = &StorePath>,
        lock: bool,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        let mut request = Vec::new();
        put_u64(&mut request, CMD_QUERY_VALID_PATHS);
        put_u64(&mut request, u64::from(lock));
        put_u64(&mut request, 0); // do not substitute
        put_paths(&mut request, paths);
        self.process.send(request).await?;
        let count = self.read_u64().await?;
        let mut valid = BTreeSet::new();
        for _ in 0..count {
            let path = self.read_string().await?;
            valid.insert(StorePath::parse(&path).map_err(|e| ServeError::Protocol(e.to_string()))?);
        }
        Ok(valid)
    }

    /// Ends the conversation.
    pub async fn close(self) -> Result<(), ServeError> {
        let out = self.process.finish().await?;
        match out.status {
            Some(0) => Ok(()),
            status => Err(ServeError::Remote {
                status: status.map_or("none".into(), |s| s.to_string()),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded_to_eight_bytes() {
        let mut out = Vec::new();
        put_bytes(&mut out, b"abc");
        assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]);
        out.clear();
        put_bytes(&mut out, b"12345678");
        assert_eq!(out.len(), 16);
    }

    #[test]
    fn import_reply_needs_the_handshake_and_a_one() {
        let mut reply = Vec::new();
        put_u64(&mut reply, SERVE_MAGIC_2);
        put_u64(&mut reply, 0x207);
        put_u64(&mut reply, 1);
        assert!(check_import_reply(&reply).is_ok());
        assert!(check_import_reply(&reply[..16]).is_err());
        reply[0] ^= 1;
        assert!(check_import_reply(&reply).is_err());
    }
}
