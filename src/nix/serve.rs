//! The client side of Nix's serve protocol, spoken to `nix-store --serve
//! --write` on a machine: the handshake, QueryValidPaths (which of these
//! paths do you have?) and AddToStoreNar (here is a path), pipelined.

use std::collections::BTreeSet;

use super::{PathInfo, StorePath};
use crate::ssh::{RemoteProcess, Session, SshError};

const SERVE_MAGIC_1: u64 = 0x390c_9deb;
const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// Protocol 2.6, as Nix 2.8's own client sends.
const CLIENT_VERSION: u64 = 0x206;
const CMD_QUERY_VALID_PATHS: u64 = 1;
const CMD_QUERY_PATH_INFOS: u64 = 2;
const CMD_QUERY_CLOSURE: u64 = 7;
const CMD_ADD_TO_STORE_NAR: u64 = 9;

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

/// Failures of the machine's store that retrying cannot fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFailure {
    /// The machine's disk (or /nix) is full.
    DiskFull,
    /// What arrived does not hash to what its path info says.
    HashMismatch,
}

impl ServeError {
    /// What the machine's nix-store said as it failed (the end of it).
    pub fn remote(out: &crate::ssh::CommandOutput) -> Self {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let start = stderr.char_indices().rev().nth(999).map_or(0, |(i, _)| i);
        Self::Remote {
            status: out.status.map_or("none".into(), |s| s.to_string()),
            stderr: stderr[start..].replace('\n', " | "),
        }
    }

    /// Whether the machine's answer names a failure that needs a person.
    pub fn store_failure(&self) -> Option<StoreFailure> {
        let Self::Remote { stderr, .. } = self else { return None };
        if stderr.contains("No space left on device") || stderr.contains("Disk quota exceeded") {
            Some(StoreFailure::DiskFull)
        } else if stderr.contains("hash mismatch") {
            Some(StoreFailure::HashMismatch)
        } else {
            None
        }
    }
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

/// One path as an AddToStoreNar command: its metadata, then the NAR.
/// The server answers each with a 1, but nothing obliges the client to wait
/// for it, so a push writes all of them back to back and reads the answers
/// at the end: one round trip for the whole closure, where Nix's own client
/// waits for every path. The machine restores and hashes each NAR in one
/// streaming pass.
pub fn add_to_store_nar(info: &PathInfo, nar: &[u8], registration_time: u64) -> Vec<u8> {
    let mut out = add_to_store_nar_header(info, nar.len() as u64, registration_time);
    out.reserve_exact(nar.len());
    out.extend_from_slice(nar);
    out
}

/// An AddToStoreNar command without its NAR, which follows it on the wire
/// (as a large path's does, streamed).
pub fn add_to_store_nar_header(info: &PathInfo, nar_size: u64, registration_time: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + 64 * info.references.len());
    put_u64(&mut out, CMD_ADD_TO_STORE_NAR);
    put_bytes(&mut out, info.path.to_string().as_bytes());
    put_bytes(&mut out, info.deriver.as_deref().unwrap_or("").as_bytes());
    // As Nix's client sends it: base16 without the algorithm.
    put_bytes(&mut out, nar_hash_base16(&info.nar_hash).unwrap_or_default().as_bytes());
    put_paths(&mut out, info.references.iter());
    put_u64(&mut out, registration_time);
    put_u64(&mut out, nar_size);
    put_u64(&mut out, 0); // not "ultimate": built elsewhere
    put_u64(&mut out, 0); // no signatures
    put_bytes(&mut out, b""); // not content-addressed
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

/// `sha256:<nix base32>` → lowercase hex digits.
fn nar_hash_base16(hash: &str) -> Option<String> {
    let bytes = super::base32::decode(hash.strip_prefix("sha256:")?, 32)?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads the replies to a stream of `paths` AddToStoreNar commands written
/// in one go: the server's hello, then a 1 for every path.
pub fn check_add_replies(stdout: &[u8], paths: usize) -> Result<(), ServeError> {
    let (Some(magic), Some(version)) = (u64_at(stdout, 0), u64_at(stdout, 8)) else {
        return Err(ServeError::Protocol("no handshake answer".into()));
    };
    check_server_hello(magic, version)?;
    if version & 0xff < 5 {
        return Err(ServeError::Protocol(format!(
            "the machine's Nix speaks serve protocol {version:#x}; pushing needs 2.5 or later (Nix 2.4+)"
        )));
    }
    for i in 0..paths {
        match u64_at(stdout, 16 + 8 * i) {
            Some(1) => {}
            other => {
                return Err(ServeError::Protocol(format!(
                    "AddToStoreNar of path {} of {paths} answered {other:?} instead of 1",
                    i + 1
                )));
            }
        }
    }
    Ok(())
}

/// An interactive `nix-store --serve --write` on a machine.
pub struct ServeConnection {
    process: RemoteProcess,
    /// Whether the server's half of the handshake has been read and checked.
    greeted: bool,
}

impl ServeConnection {
    /// Starts `nix-store --serve --write` and sends the client's half of the
    /// handshake. The server's half is read with the first answer, so the
    /// first request follows at once instead of a round trip later.
    pub async fn open(session: &Session) -> Result<Self, ServeError> {
        let mut process = session.spawn("nix-store --serve --write").await?;
        process.send(client_hello()).await?;
        Ok(Self { process, greeted: false })
    }

    async fn greeting(&mut self) -> Result<(), ServeError> {
        if !self.greeted {
            let magic = self.read_u64().await?;
            let version = self.read_u64().await?;
            check_server_hello(magic, version)?;
            self.greeted = true;
        }
        Ok(())
    }

    async fn read_u64(&mut self) -> Result<u64, ServeError> {
        let bytes = match self.process.read_exact(8).await {
            Ok(bytes) => bytes,
            // nix-store exited: what it said is the cause, not the short read.
            Err(err) => return Err(self.process.ended().map_or(err.into(), ServeError::remote)),
        };
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
        self.greeting().await?;
        self.read_paths().await
    }

    /// The closure of `paths` in the machine's store (a store that builds
    /// and serves, such as a builder's).
    pub async fn query_closure(
        &mut self,
        paths: impl ExactSizeIterator<Item = &StorePath>,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        let mut request = Vec::new();
        put_u64(&mut request, CMD_QUERY_CLOSURE);
        put_u64(&mut request, 0); // not the outputs of derivations
        put_paths(&mut request, paths);
        self.process.send(request).await?;
        self.greeting().await?;
        self.read_paths().await
    }

    /// What the machine's store knows about `paths`; paths it lacks are left out.
    pub async fn query_path_infos(
        &mut self,
        paths: impl ExactSizeIterator<Item = &StorePath>,
    ) -> Result<Vec<PathInfo>, ServeError> {
        let mut request = Vec::new();
        put_u64(&mut request, CMD_QUERY_PATH_INFOS);
        put_paths(&mut request, paths);
        self.process.send(request).await?;
        self.greeting().await?;
        let mut infos = Vec::new();
        loop {
            let path = self.read_string().await?;
            if path.is_empty() {
                return Ok(infos);
            }
            let path = StorePath::parse(&path).map_err(|e| ServeError::Protocol(e.to_string()))?;
            let deriver = Some(self.read_string().await?).filter(|d| !d.is_empty());
            let references = self.read_paths().await?;
            let _download_size = self.read_u64().await?;
            let nar_size = self.read_u64().await?;
            // Protocol 2.4 and later (this client speaks 2.6).
            let nar_hash = self.read_string().await?;
            let _content_address = self.read_string().await?;
            for _ in 0..self.read_u64().await? {
                self.read_string().await?;
            }
            infos.push(PathInfo { path, references, deriver, nar_hash, nar_size });
        }
    }

    async fn read_paths(&mut self) -> Result<BTreeSet<StorePath>, ServeError> {
        let count = self.read_u64().await?;
        let mut paths = BTreeSet::new();
        for _ in 0..count {
            let path = self.read_string().await?;
            paths.insert(StorePath::parse(&path).map_err(|e| ServeError::Protocol(e.to_string()))?);
        }
        Ok(paths)
    }

    /// Sends one AddToStoreNar record (see [`add_to_store_nar`]) without
    /// waiting for its answer; [`Self::added`] reads the answers.
    pub async fn send_record(&mut self, record: bytes::Bytes) -> Result<(), ServeError> {
        if let Err(err) = self.process.send(record).await {
            // The machine's nix-store stopped reading: it said why as it exited.
            self.process.wait_ended().await;
            return Err(self.process.ended().map_or(err.into(), ServeError::remote));
        }
        Ok(())
    }

    /// Reads the answers to `paths` records sent with [`Self::send_record`]:
    /// a 1 for each. The paths stay protected from garbage collection (as
    /// temporary roots of this connection) until it is released.
    pub async fn added(&mut self, paths: usize) -> Result<(), ServeError> {
        self.greeting().await?;
        for i in 0..paths {
            let answer = self.read_u64().await?;
            if answer != 1 {
                return Err(ServeError::Protocol(format!(
                    "AddToStoreNar of path {} of {paths} answered {answer} instead of 1",
                    i + 1
                )));
            }
        }
        Ok(())
    }

    /// Ends the conversation without waiting for the machine's nix-store
    /// to exit: nothing it could still say is needed. It drops its
    /// temporary GC roots when it exits, at the end of its input.
    pub async fn release(self) {
        self.process.close_input().await;
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
    fn nar_hashes_go_as_base16() {
        // nix-hash --type sha256 --to-base32 01473aca…5804
        let hash = "sha256:012qc4jwskny31nq3v8awc9qa94wkvs8fjzj3yrq2gr73z53liq1";
        assert_eq!(
            nar_hash_base16(hash).as_deref(),
            Some("01473aca1f273f81b31ff24b87f49e9c248513e30aed816d18de4ecd25615804")
        );
    }

    #[test]
    fn replies_need_the_handshake_and_a_one_per_path() {
        let mut reply = Vec::new();
        put_u64(&mut reply, SERVE_MAGIC_2);
        put_u64(&mut reply, 0x207);
        put_u64(&mut reply, 1);
        put_u64(&mut reply, 1);
        assert!(check_add_replies(&reply, 2).is_ok());
        assert!(check_add_replies(&reply, 3).is_err(), "a missing answer");
        assert!(check_add_replies(&reply[..16], 1).is_err());
        let mut old = reply.clone();
        old[8] = 0x04;
        assert!(check_add_replies(&old, 2).is_err(), "protocol 2.4 has no AddToStoreNar");
        reply[0] ^= 1;
        assert!(check_add_replies(&reply, 2).is_err());
    }
}
