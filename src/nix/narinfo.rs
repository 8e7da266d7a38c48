//! `.narinfo` files of a Nix binary cache: what a cache says about one store
//! path, and whether a key we trust signed it.
//!
//! A binary cache is untrusted storage: anyone who can write to the bucket
//! or sits on the network path can change its files. What makes a path safe
//! to install is an ed25519 signature, made with the cache owner's secret
//! key, over the path's *fingerprint* (store path, NAR hash, NAR size and
//! references). The NAR itself is then checked against the signed hash.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::{PathInfo, StorePath, base32};

/// Why a narinfo cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NarinfoError {
    #[error("line {line}: {text:?} is not a `Field: value` line")]
    Line { line: usize, text: String },
    #[error("line {line}, field {field}: {reason}")]
    Field { line: usize, field: &'static str, reason: String },
    #[error("field {field} is missing")]
    Missing { field: &'static str },
    /// Nix can write caches this operator cannot read; re-uploading with a
    /// supported compression is the fix, so this is kept apart from damage.
    #[error(
        "compression {compression:?} is not supported (only none, xz and zstd); \
         copy the closure again with `nix copy --to '<cache>?compression=zstd'`"
    )]
    UnsupportedCompression { compression: String },
}

/// How a cache stores the NAR file a narinfo points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

impl FromStr for Compression {
    type Err = NarinfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "xz" => Ok(Self::Xz),
            "zstd" => Ok(Self::Zstd),
            other => Err(NarinfoError::UnsupportedCompression { compression: other.to_owned() }),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
        })
    }
}

/// One parsed `.narinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Narinfo {
    pub path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache root.
    pub url: String,
    pub compression: Compression,
    /// `sha256:<nix base32>` of the file at `url`, when the cache recorded it.
    pub file_hash: Option<String>,
    /// Size of the file at `url`, when the cache recorded it.
    pub file_size: Option<u64>,
    /// `sha256:<nix base32>` of the uncompressed NAR, whatever form the file used.
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// `<key name>:<base64 signature>`, as many as the cache has.
    pub sigs: Vec<String>,
    /// Content address, for content-addressed paths.
    pub ca: Option<String>,
}

impl Narinfo {
    /// Parses the text of a `.narinfo`. Unknown fields (e.g. `System`) are
    /// ignored, as Nix does; a repeated field other than `Sig` is refused,
    /// because two readers could disagree on which value counts.
    pub fn parse(text: &str) -> Result<Self, NarinfoError> {
        let mut path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;

        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let (name, value) = raw.split_once(':').ok_or_else(|| NarinfoError::Line { line, text: raw.to_owned() })?;
            let value = value.strip_prefix(' ').unwrap_or(value);
            // Field names as Nix spells them; the &'static str goes into errors.
            let field: &'static str = match name {
                "StorePath" => "StorePath",
                "URL" => "URL",
                "Compression" => "Compression",
                "FileHash" => "FileHash",
                "FileSize" => "FileSize",
                "NarHash" => "NarHash",
                "NarSize" => "NarSize",
                "References" => "References",
                "Deriver" => "Deriver",
                "Sig" => "Sig",
                "CA" => "CA",
                _ => continue,
            };
            let bad = |reason: String| NarinfoError::Field { line, field, reason };
            let once = |slot: bool| if slot { Err(bad("the field appears twice".into())) } else { Ok(()) };
            match field {
                "StorePath" => {
                    once(path.is_some())?;
                    path = Some(StorePath::parse(value).map_err(|e| bad(e.to_string()))?);
                }
                "URL" => {
                    once(url.is_some())?;
                    if value.is_empty() {
                        return Err(bad("it is empty".into()));
                    }
                    url = Some(value.to_owned());
                }
                "Compression" => {
                    once(compression.is_some())?;
                    compression = Some(value.parse::<Compression>()?);
                }
                "FileHash" => {
                    once(file_hash.is_some())?;
                    file_hash = Some(normalize_sha256(value).map_err(|r| bad(r.into()))?);
                }
                "FileSize" => {
                    once(file_size.is_some())?;
                    file_size = Some(value.parse::<u64>().map_err(|e| bad(format!("{value:?}: {e}")))?);
                }
                "NarHash" => {
                    once(nar_hash.is_some())?;
                    nar_hash = Some(normalize_sha256(value).map_err(|r| bad(r.into()))?);
                }
                "NarSize" => {
                    once(nar_size.is_some())?;
                    let size = value.parse::<u64>().map_err(|e| bad(format!("{value:?}: {e}")))?;
                    // No NAR is empty; Nix refuses a zero size too.
                    if size == 0 {
                        return Err(bad("it is 0".into()));
                    }
                    nar_size = Some(size);
                }
                "References" => {
                    once(references.is_some())?;
                    let refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(StorePath::from_base_name)
                        .collect::<Result<BTreeSet<_>, _>>()
                        .map_err(|e| bad(e.to_string()))?;
                    references = Some(refs);
                }
                "Deriver" => {
                    once(deriver.is_some())?;
                    // Nix writes this placeholder when it does not know the deriver.
                    if value != "unknown-deriver" && !value.is_empty() {
                        deriver = Some(StorePath::from_base_name(value).map_err(|e| bad(e.to_string()))?);
                    }
                }
                "Sig" => sigs.push(value.to_owned()),
                "CA" => {
                    once(ca.is_some())?;
                    ca = Some(value.to_owned());
                }
                _ => {}
            }
        }

        Ok(Self {
            path: path.ok_or(NarinfoError::Missing { field: "StorePath" })?,
            url: url.ok_or(NarinfoError::Missing { field: "URL" })?,
            // Nix reads a missing Compression as bzip2 (the format's original default).
            compression: match compression {
                Some(c) => c,
                None => "bzip2".parse()?,
            },
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarinfoError::Missing { field: "NarHash" })?,
            nar_size: nar_size.ok_or(NarinfoError::Missing { field: "NarSize" })?,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
        })
    }

    /// What the cache owner signed, exactly as Nix computes it:
    /// `1;<store path>;sha256:<nix base32>;<NAR size>;<references, full paths, sorted, comma-separated>`.
    pub fn fingerprint(&self) -> String {
        let references: Vec<String> = self.references.iter().map(ToString::to_string).collect();
        format!("1;{};{};{};{}", self.path, self.nar_hash, self.nar_size, references.join(","))
    }
}

impl FromStr for Narinfo {
    type Err = NarinfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<&Narinfo> for PathInfo {
    fn from(n: &Narinfo) -> Self {
        PathInfo {
            path: n.path.clone(),
            references: n.references.clone(),
            deriver: n.deriver.as_ref().map(ToString::to_string),
            nar_hash: n.nar_hash.clone(),
            nar_size: n.nar_size,
        }
    }
}

/// Reads a SHA-256 in any form Nix accepts in a narinfo (`sha256:` followed
/// by hex, Nix base32 or base64, or SRI `sha256-<base64>`) and returns it as
/// `sha256:<nix base32>`, the form fingerprints and comparisons use.
pub fn normalize_sha256(text: &str) -> Result<String, &'static str> {
    let bytes = if let Some(sri) = text.strip_prefix("sha256-") {
        BASE64.decode(sri).ok()
    } else if let Some(digest) = text.strip_prefix("sha256:") {
        match digest.len() {
            64 => hex(digest),
            52 => base32::decode(digest, 32),
            44 => BASE64.decode(digest).ok(),
            _ => None,
        }
    } else {
        return Err("only sha256 hashes (sha256:… or sha256-…) are supported");
    };
    match bytes {
        Some(b) if b.len() == 32 => Ok(format!("sha256:{}", base32::encode(&b))),
        _ => Err("it is not a SHA-256 in hex, Nix base32 or base64"),
    }
}

fn hex(text: &str) -> Option<Vec<u8>> {
    (0..text.len()).step_by(2).map(|i| text.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok())).collect()
}

/// A public key given as `name:base64(32 bytes)` that is not one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "public key {key:?} is not `<name>:<base64 of 32 bytes>` ({reason}); \
     use the contents of the public key file `nix-store --generate-binary-cache-key` wrote"
)]
pub struct InvalidPublicKey {
    pub key: String,
    pub reason: &'static str,
}

/// Why a narinfo's signatures do not make it trustworthy.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "it is unsigned (no Sig field); sign the cache with `nix store sign -k <secret key>` \
         or copy with `nix copy --to '<cache>?secret-key=<file>'`"
    )]
    Unsigned,
    #[error(
        "it is signed only by untrusted keys (names {}); trusted key names are {}; \
         add the signer's public key or sign with a trusted key",
        .signers.join(", "),
        .trusted.join(", ")
    )]
    Untrusted { signers: Vec<String>, trusted: Vec<String> },
    #[error(
        "bad signature by {key}: the narinfo was changed after it was signed, \
         or a different key is using the name {key}"
    )]
    BadSignature { key: String },
}

/// The public keys whose signatures make a path trustworthy.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, [u8; 32])>,
}

impl TrustedKeys {
    /// Parses keys in Nix's `name:base64(32-byte ed25519 public key)` form.
    pub fn parse(keys: &[String]) -> Result<Self, InvalidPublicKey> {
        let mut parsed = Vec::with_capacity(keys.len());
        for key in keys {
            let bad = |reason| InvalidPublicKey { key: key.clone(), reason };
            let (name, b64) = key.trim().split_once(':').ok_or_else(|| bad("there is no ':' after the name"))?;
            if name.is_empty() {
                return Err(bad("the name is empty"));
            }
            let bytes = BASE64.decode(b64).map_err(|_| bad("the key is not base64"))?;
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad("the key is not 32 bytes"))?;
            parsed.push((name.to_owned(), bytes));
        }
        Ok(Self { keys: parsed })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key names, for messages.
    pub fn names(&self) -> Vec<String> {
        self.keys.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Accepts the narinfo if any of its signatures by a trusted key name
    /// verifies over its fingerprint. A bad signature by a trusted name is
    /// reported even when other signatures are by untrusted keys, since it
    /// is the one that points at tampering.
    pub fn verify(&self, narinfo: &Narinfo) -> Result<(), SignatureError> {
        if narinfo.sigs.is_empty() {
            return Err(SignatureError::Unsigned);
        }
        let fingerprint = narinfo.fingerprint();
        let mut bad_by = None;
        let mut signers = Vec::new();
        for sig in &narinfo.sigs {
            let (name, b64) = sig.split_once(':').unwrap_or(("", sig));
            let mut trusted_name = false;
            for (_, key) in self.keys.iter().filter(|(n, _)| n == name) {
                trusted_name = true;
                let Ok(signature) = BASE64.decode(b64) else { continue };
                let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key);
                if key.verify(fingerprint.as_bytes(), &signature).is_ok() {
                    return Ok(());
                }
            }
            if trusted_name {
                bad_by.get_or_insert_with(|| name.to_owned());
            } else {
                signers.push(if name.is_empty() { "(no name)".to_owned() } else { name.to_owned() });
            }
        }
        match bad_by {
            Some(key) => Err(SignatureError::BadSignature { key }),
            None => Err(SignatureError::Untrusted { signers, trusted: self.names() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Nix 2.8 (`nix copy --to 'file://…?compression=xz&secret-key=…'`)
    /// for a path that refers to two others, signed with the key below.
    const TOP: &str = "StorePath: /nix/store/bbmpm8ymyv9xwj831kp9k788hpxyihr5-top
URL: nar/0arrhmw391zsml4jd0rhv7ajx53nvyjmcg99pr6kdwq4pcayxsjx.nar.xz
Compression: xz
FileHash: sha256:0arrhmw391zsml4jd0rhv7ajx53nvyjmcg99pr6kdwq4pcayxsjx
FileSize: 256
NarHash: sha256:063f2b9fl8xkfbckaxz42iqy434hi1g9nfjphyqwxyg17b6cf50g
NarSize: 568
References: r25a0gcs3w1z0w988gqmcv74zd7b91al-leaf snavgci0xfzxh4vqnjpmrz245blgr60d-mid
Deriver: gk47dzqxpgvw6nqpnh419m02awdjw7rl-top.drv
Sig: test-1:o7WSnfepNyD1yIONspFqP2aws1LjhuCBw0rQR3jDIGnRuEb4DLv1I3kAOft+fLINk48Gfab+JTMk08zOWtN4AA==
";

    /// A path without references: Nix writes `References: ` with a trailing space.
    const LEAF: &str = "StorePath: /nix/store/r25a0gcs3w1z0w988gqmcv74zd7b91al-leaf
URL: nar/0ad0h7nsfhn46j4q13dn5s0kbiwxyhjij28kas8xkwba5pm6xq5k.nar.xz
Compression: xz
FileHash: sha256:0ad0h7nsfhn46j4q13dn5s0kbiwxyhjij28kas8xkwba5pm6xq5k
FileSize: 128
NarHash: sha256:1c6fzd62x6b99hrhfcgpc688b34cfi3vyvapki3r0nh7vx8p9q4a
NarSize: 120
References: 
Deriver: 4lfd6c6zac44j0r2c113d8mwhca818bm-leaf.drv
Sig: test-1:FA9aVcXA7G2B9VcVWLuRVVET3Au0D7E+s/TkTqjRXmvrmVXQXv0vKU4P5Vntm7OkSABdBNN2rhAoY7zeODbdAw==
";

    /// `nix-store --generate-binary-cache-key test-1 …` (the signer) and another key.
    const TEST_KEY: &str = "test-1:VlDQOnU/V9X4DrKXE7oZ59GtmhYKA5B3XIsn1KXeNNU=";
    const OTHER_KEY: &str = "other-1:8UCfejar6RVdtUUrO9Odu7vuYO/lXz19uOYWx91QUHA=";

    fn keys(keys: &[&str]) -> TrustedKeys {
        TrustedKeys::parse(&keys.iter().map(|k| k.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn parses_what_nix_writes() {
        let n = Narinfo::parse(TOP).unwrap();
        assert_eq!(n.path.name(), "top");
        assert_eq!(n.url, "nar/0arrhmw391zsml4jd0rhv7ajx53nvyjmcg99pr6kdwq4pcayxsjx.nar.xz");
        assert_eq!(n.compression, Compression::Xz);
        assert_eq!(n.file_hash.as_deref(), Some("sha256:0arrhmw391zsml4jd0rhv7ajx53nvyjmcg99pr6kdwq4pcayxsjx"));
        assert_eq!(n.file_size, Some(256));
        assert_eq!(n.nar_size, 568);
        let refs: Vec<&str> = n.references.iter().map(|r| r.name()).collect();
        assert_eq!(refs, ["leaf", "mid"]);
        assert_eq!(
            n.deriver.as_ref().map(ToString::to_string).as_deref(),
            Some("/nix/store/gk47dzqxpgvw6nqpnh419m02awdjw7rl-top.drv")
        );
        assert_eq!(n.sigs.len(), 1);

        let leaf = Narinfo::parse(LEAF).unwrap();
        assert!(leaf.references.is_empty());

        let info = PathInfo::from(&n);
        assert_eq!(info.path, n.path);
        assert_eq!(info.references, n.references);
        assert_eq!(info.nar_hash, "sha256:063f2b9fl8xkfbckaxz42iqy434hi1g9nfjphyqwxyg17b6cf50g");
        assert_eq!(info.nar_size, 568);
        assert_eq!(info.deriver.as_deref(), Some("/nix/store/gk47dzqxpgvw6nqpnh419m02awdjw7rl-top.drv"));
    }

    #[test]
    fn fingerprint_is_what_nix_signs() {
        assert_eq!(
            Narinfo::parse(TOP).unwrap().fingerprint(),
            "1;/nix/store/bbmpm8ymyv9xwj831kp9k788hpxyihr5-top;\
             sha256:063f2b9fl8xkfbckaxz42iqy434hi1g9nfjphyqwxyg17b6cf50g;568;\
             /nix/store/r25a0gcs3w1z0w988gqmcv74zd7b91al-leaf,/nix/store/snavgci0xfzxh4vqnjpmrz245blgr60d-mid"
        );
        assert_eq!(
            Narinfo::parse(LEAF).unwrap().fingerprint(),
            "1;/nix/store/r25a0gcs3w1z0w988gqmcv74zd7b91al-leaf;\
             sha256:1c6fzd62x6b99hrhfcgpc688b34cfi3vyvapki3r0nh7vx8p9q4a;120;"
        );
    }

    #[test]
    fn nix_signatures_verify_with_the_trusted_key() {
        let trusted = keys(&[OTHER_KEY, TEST_KEY]);
        assert_eq!(trusted.verify(&Narinfo::parse(TOP).unwrap()), Ok(()));
        assert_eq!(trusted.verify(&Narinfo::parse(LEAF).unwrap()), Ok(()));
    }

    #[test]
    fn other_hash_forms_give_the_same_fingerprint() {
        // The same NarHash as hex, base64 and SRI (as `nix hash to-base16/to-sri` print it).
        for form in [
            "sha256:0f14c7cc3ae1f9ceb187573a9b5e88900ce27114e47735d972b323ead2126e18",
            "sha256:DxTHzDrh+c6xh1c6m16IkAzicRTkdzXZcrMj6tISbhg=",
            "sha256-DxTHzDrh+c6xh1c6m16IkAzicRTkdzXZcrMj6tISbhg=",
        ] {
            let text = TOP.replace("sha256:063f2b9fl8xkfbckaxz42iqy434hi1g9nfjphyqwxyg17b6cf50g", form);
            let n = Narinfo::parse(&text).unwrap();
            assert_eq!(n.nar_hash, "sha256:063f2b9fl8xkfbckaxz42iqy434hi1g9nfjphyqwxyg17b6cf50g", "{form}");
            assert_eq!(keys(&[TEST_KEY]).verify(&n), Ok(()), "{form}");
        }
    }

    #[test]
    fn untrusted_unsigned_and_tampered_are_told_apart() {
        let top = Narinfo::parse(TOP).unwrap();
        assert_eq!(
            keys(&[OTHER_KEY]).verify(&top),
            Err(SignatureError::Untrusted { signers: vec!["test-1".into()], trusted: vec!["other-1".into()] })
        );

        let unsigned = Narinfo { sigs: vec![], ..top.clone() };
        assert_eq!(keys(&[TEST_KEY]).verify(&unsigned), Err(SignatureError::Unsigned));

        let bigger = Narinfo::parse(&TOP.replace("NarSize: 568", "NarSize: 569")).unwrap();
        assert_eq!(keys(&[TEST_KEY]).verify(&bigger), Err(SignatureError::BadSignature { key: "test-1".into() }));

        let fewer_refs = Narinfo::parse(&TOP.replace(" snavgci0xfzxh4vqnjpmrz245blgr60d-mid", "")).unwrap();
        assert_eq!(fewer_refs.references.len(), 1);
        assert_eq!(keys(&[TEST_KEY]).verify(&fewer_refs), Err(SignatureError::BadSignature { key: "test-1".into() }));

        // Another key claiming the trusted name is a bad signature, not a pass.
        let impostor = keys(&[&format!("test-1:{}", OTHER_KEY.split_once(':').unwrap().1)]);
        assert_eq!(impostor.verify(&top), Err(SignatureError::BadSignature { key: "test-1".into() }));

        // One good signature among untrusted ones is enough.
        let two = Narinfo { sigs: vec![format!("other-1:{}", "A".repeat(88)), top.sigs[0].clone()], ..top };
        assert_eq!(keys(&[TEST_KEY]).verify(&two), Ok(()));
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let err = Narinfo::parse(&TOP.replace("NarSize: 568", "NarSize: lots")).unwrap_err();
        assert!(matches!(err, NarinfoError::Field { line: 7, field: "NarSize", .. }), "{err}");

        let err = Narinfo::parse(&TOP.replace("NarHash: sha256:", "NarHash: md5:")).unwrap_err();
        assert!(matches!(err, NarinfoError::Field { line: 6, field: "NarHash", .. }), "{err}");

        let err = Narinfo::parse(&TOP.replace("-mid", "-m/d")).unwrap_err();
        assert!(matches!(err, NarinfoError::Field { line: 8, field: "References", .. }), "{err}");

        let err = Narinfo::parse(&format!("{TOP}garbage\n")).unwrap_err();
        assert_eq!(err, NarinfoError::Line { line: 11, text: "garbage".into() });

        let err = Narinfo::parse(&format!("{TOP}NarSize: 568\n")).unwrap_err();
        assert!(matches!(err, NarinfoError::Field { line: 11, field: "NarSize", .. }), "{err}");

        let err = Narinfo::parse(&TOP.replace("URL: ", "Url: ")).unwrap_err();
        assert_eq!(err, NarinfoError::Missing { field: "URL" });
        assert!(err.to_string().contains("URL"));
    }

    #[test]
    fn only_none_xz_and_zstd_are_read() {
        for (text, name) in [
            (TOP.replace("Compression: xz", "Compression: bzip2"), "bzip2"),
            (TOP.replace("Compression: xz", "Compression: br"), "br"),
            // Nix reads an absent Compression as bzip2.
            (TOP.replace("Compression: xz\n", ""), "bzip2"),
        ] {
            let err = Narinfo::parse(&text).unwrap_err();
            assert_eq!(err, NarinfoError::UnsupportedCompression { compression: name.into() });
            assert!(err.to_string().contains("not supported"), "{err}");
        }
        let zstd = Narinfo::parse(&TOP.replace("Compression: xz", "Compression: zstd")).unwrap();
        assert_eq!(zstd.compression, Compression::Zstd);
        let none = Narinfo::parse(&TOP.replace("Compression: xz", "Compression: none")).unwrap();
        assert_eq!(none.compression, Compression::None);
    }

    #[test]
    fn bad_public_keys_are_refused() {
        for bad in ["test-1", ":VlDQOnU/V9X4DrKXE7oZ59GtmhYKA5B3XIsn1KXeNNU=", "test-1:not base64", "test-1:AAAA"] {
            assert!(TrustedKeys::parse(&[bad.to_string()]).is_err(), "{bad} must be refused");
        }
    }
}
