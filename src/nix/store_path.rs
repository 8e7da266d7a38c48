//! Store paths: `/nix/store/<32 chars of Nix base32>-<name>`.

use std::fmt;

/// The store directory everything lives in.
pub const STORE_DIR: &str = "/nix/store";

/// Why a string is not a store path.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path:?} is not a Nix store path: {reason}")]
pub struct InvalidStorePath {
    pub path: String,
    pub reason: &'static str,
}

/// A parsed store path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: String,
    name: String,
}

impl StorePath {
    /// Parses a full path such as /nix/store/…-nixos-system-web-1.
    pub fn parse(path: &str) -> Result<Self, InvalidStorePath> {
        let bad = |reason| InvalidStorePath { path: path.to_owned(), reason };
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(|| bad("it is not under /nix/store/"))?;
        Self::from_base_name(base).map_err(|e| InvalidStorePath { path: path.to_owned(), reason: e.reason })
    }

    /// Parses the part after /nix/store/.
    pub fn from_base_name(base: &str) -> Result<Self, InvalidStorePath> {
        let bad = |reason| InvalidStorePath { path: base.to_owned(), reason };
        let (hash, name) = base.split_once('-').ok_or_else(|| bad("no '-' after the hash"))?;
        if hash.len() != 32 {
            return Err(bad("the hash is not 32 characters"));
        }
        if !hash.bytes().all(|c| super::base32::ALPHABET.contains(&c)) {
            return Err(bad("the hash is not Nix base32"));
        }
        if name.is_empty() || name.len() > 211 || name.starts_with('.') {
            return Err(bad("the name is empty, too long or starts with '.'"));
        }
        if !name.bytes().all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)) {
            return Err(bad("the name has characters outside [A-Za-z0-9+-._?=]"));
        }
        Ok(Self { hash: hash.to_owned(), name: name.to_owned() })
    }

    /// The 32-character hash part.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The name part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    /// For display: first 7 hash characters and the name.
    pub fn short(&self) -> String {
        format!("{}-{}", &self.hash[..7], self.name)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_like_the_crd_pattern() {
        let p = StorePath::parse("/nix/store/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d-nixos-system-web-1-25.05").unwrap();
        assert_eq!(p.hash(), "0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d");
        assert_eq!(p.name(), "nixos-system-web-1-25.05");
        assert_eq!(p.short(), "0c0wwg3-nixos-system-web-1-25.05");
        assert_eq!(p.to_string(), "/nix/store/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d-nixos-system-web-1-25.05");
        for bad in [
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x",
            "/nix/store/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8-x",
            "/nix/store/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d-",
            "/nix/store/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d-.hidden",
            "/tmp/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d-x",
            "/nix/store/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d-a/b",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad} must be rejected");
        }
    }
}
