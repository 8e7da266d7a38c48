//! The Nix store of the host the operator runs on, read directly: path
//! metadata from its SQLite database and file trees from its store directory.
//! For development; production closures come from a binary cache.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::path_info::{IncompleteClosure, dependency_order};
use super::{PathInfo, StorePath, nar};

/// Errors reading the local store.
#[derive(Debug, thiserror::Error)]
pub enum LocalStoreError {
    #[error(
        "cannot open the Nix database {db}: {reason}; is Nix installed on the operator's host (spec.nixos.source.localStore.root)?"
    )]
    Open { db: String, reason: String },
    #[error("{path} is not valid in the operator host's Nix store; build it there first or use a binary cache")]
    NotValid { path: StorePath },
    #[error("reading the Nix database: {0}")]
    Query(String),
    #[error("the local store's database has a bad entry for {path}: {reason}")]
    BadEntry { path: String, reason: String },
    #[error(transparent)]
    Incomplete(#[from] IncompleteClosure),
    #[error("serialising {path}: {reason}")]
    Nar { path: StorePath, reason: String },
}

/// A Nix store rooted at `root` (normally /nix).
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn db_path(&self) -> PathBuf {
        self.root.join("var/nix/db/db.sqlite")
    }

    /// The closure of `root_path` (it and everything it refers to, transitively),
    /// references before referrers.
    pub async fn closure(&self, root_path: &StorePath) -> Result<Vec<PathInfo>, LocalStoreError> {
        let db = self.db_path();
        let root_path = root_path.clone();
        tokio::task::spawn_blocking(move || query_closure(&db, &root_path))
            .await
            .map_err(|e| LocalStoreError::Query(e.to_string()))?
    }

    /// The NAR serialisation of `path`.
    pub async fn nar(&self, path: &StorePath) -> Result<Vec<u8>, LocalStoreError> {
        self.nar_into(path, Vec::new()).await
    }

    /// Writes the NAR serialisation of `path` to `out` as it reads the
    /// files (on a blocking thread), and returns `out`.
    pub async fn nar_into<W: Write + Send + 'static>(
        &self,
        path: &StorePath,
        mut out: W,
    ) -> Result<W, LocalStoreError> {
        let dir = self.root.join("store").join(path.base_name());
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            nar::dump(&dir, &mut out).map_err(|e| LocalStoreError::Nar { path, reason: e.to_string() })?;
            Ok(out)
        })
        .await
        .map_err(|e| LocalStoreError::Query(e.to_string()))?
    }
}

fn query_closure(db: &Path, root: &StorePath) -> Result<Vec<PathInfo>, LocalStoreError> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| LocalStoreError::Open { db: db.display().to_string(), reason: e.to_string() })?;
    let q = |e: rusqlite::Error| LocalStoreError::Query(e.to_string());
    let root_id: Option<i64> = conn
        .query_row("SELECT id FROM ValidPaths WHERE path = ?1", [root.to_string()], |r| r.get(0))
        .optional()
        .map_err(q)?;
    let root_id = root_id.ok_or_else(|| LocalStoreError::NotValid { path: root.clone() })?;

    const CLOSURE: &str = "WITH RECURSIVE closure(id) AS ( \
        SELECT ?1 UNION SELECT r.reference FROM Refs r JOIN closure c ON r.referrer = c.id)";
    let mut rows = conn
        .prepare(&format!(
            "{CLOSURE} SELECT v.id, v.path, v.hash, v.deriver, v.narSize FROM ValidPaths v JOIN closure c ON v.id = c.id"
        ))
        .map_err(q)?;
    let mut by_id = HashMap::new();
    let entries = rows
        .query_map([root_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })
        .map_err(q)?;
    for entry in entries {
        let (id, path, hash, deriver, nar_size) = entry.map_err(q)?;
        let bad = |reason: &str| LocalStoreError::BadEntry { path: path.clone(), reason: reason.to_owned() };
        let store_path = StorePath::parse(&path).map_err(|e| bad(&e.to_string()))?;
        let nar_hash = nar_hash_base32(&hash).ok_or_else(|| bad("the hash is not sha256:<hex>"))?;
        let nar_size = nar_size.and_then(|s| u64::try_from(s).ok()).ok_or_else(|| bad("no NAR size"))?;
        by_id.insert(id, PathInfo { path: store_path, references: BTreeSet::new(), deriver, nar_hash, nar_size });
    }
    let mut refs = conn
        .prepare(&format!("{CLOSURE} SELECT r.referrer, r.reference FROM Refs r JOIN closure c ON r.referrer = c.id"))
        .map_err(q)?;
    let pairs = refs.query_map([root_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).map_err(q)?;
    let mut edges = Vec::new();
    for pair in pairs {
        edges.push(pair.map_err(q)?);
    }
    for (referrer, reference) in edges {
        let Some(target) = by_id.get(&reference).map(|i| i.path.clone()) else { continue };
        if let Some(info) = by_id.get_mut(&referrer) {
            info.references.insert(target);
        }
    }
    Ok(dependency_order(by_id.into_values().collect())?)
}

/// The database's `sha256:<hex>` as the `sha256:<nix base32>` used
/// everywhere else (narinfo files, signatures' fingerprints).
fn nar_hash_base32(hash: &str) -> Option<String> {
    super::narinfo::normalize_sha256(hash).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_hashes_become_nix_base32() {
        let hex = "sha256:01473aca1f273f81b31ff24b87f49e9c248513e30aed816d18de4ecd25615804";
        let b32 = nar_hash_base32(hex).unwrap();
        // As `nix-hash --type sha256 --to-base32` prints it.
        assert_eq!(b32, "sha256:012qc4jwskny31nq3v8awc9qa94wkvs8fjzj3yrq2gr73z53liq1");
        assert_eq!(nar_hash_base32(&b32).as_deref(), Some(b32.as_str()), "already base32 stays as is");
        assert_eq!(nar_hash_base32("md5:abc"), None);
    }
}
