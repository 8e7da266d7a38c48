//! Closures read from real binary caches written by Nix itself (Debian's
//! nix-bin 2.8): `nix copy --to file://…` with each compression, served as a
//! directory, over HTTP and from an S3 bucket (moto), with the signatures,
//! tampering and corruption a user could meet.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use nixops_operator::nix::cache::{BinaryCacheSource, CacheError};
use nixops_operator::nix::narinfo::SignatureError;
use nixops_operator::nix::{PathInfo, StorePath};

/// Runs a Nix command and returns its standard output; panics with its
/// standard error if it fails.
fn nix(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(["--option", "substituters", ""]) // never ask cache.nixos.org: tests stay on this host
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A closure freshly built by Nix for one test, and a signing key pair.
struct Built {
    dir: tempfile::TempDir,
    root: StorePath,
    /// `nix-store -qR root`.
    paths: Vec<StorePath>,
    /// `test-1:<base64>`, the key the caches are signed with.
    public_key: String,
    /// A valid key of someone else.
    other_key: String,
}

impl Built {
    /// Builds four new store paths (a nonce makes them new on every run):
    /// `top` refers to `mid` and `leaf`, `mid` to `leaf` and `tool`, and
    /// `tool` (an executable, a symlink, a directory) to itself.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        );
        let expr = format!(
            r#"
let
  mk = name: script: builtins.derivation {{
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
    nonce = "{nonce}";
  }};
  leaf = mk "leaf" "echo leaf $nonce > $out";
  tool = mk "tool" ''
    /bin/mkdir -p $out/bin $out/share/doc
    echo '#!/bin/sh' > $out/bin/tool; echo "echo $out" >> $out/bin/tool; /bin/chmod +x $out/bin/tool
    /bin/ln -s bin/tool $out/tool-link
    echo docs $nonce > $out/share/doc/README
  '';
  mid = mk "mid" "/bin/mkdir $out; echo ${{leaf}} > $out/leaf; echo ${{tool}} > $out/tool";
in mk "top" "/bin/mkdir $out; echo ${{mid}} > $out/mid; echo ${{leaf}} > $out/leaf"
"#
        );
        let file = dir.path().join("closure.nix");
        std::fs::write(&file, expr).unwrap();
        // -o keeps a GC root (in the temporary directory) while the test runs.
        let out = nix("nix-build", &[file.to_str().unwrap(), "-o", dir.path().join("result").to_str().unwrap()]);
        let root = StorePath::parse(out.trim()).unwrap();
        let paths = nix("nix-store", &["-qR", &root.to_string()])
            .lines()
            .map(|l| StorePath::parse(l).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(paths.len(), 4, "{paths:?}");

        let key = |name: &str| {
            let (secret, public) = (dir.path().join(format!("{name}.sec")), dir.path().join(format!("{name}.pub")));
            nix(
                "nix-store",
                &["--generate-binary-cache-key", name, secret.to_str().unwrap(), public.to_str().unwrap()],
            );
            std::fs::read_to_string(public).unwrap().trim().to_owned()
        };
        let public_key = key("test-1");
        let other_key = key("other-1");
        Self { dir, root, paths, public_key, other_key }
    }

    /// `nix copy`s the closure into a new file cache `name` with the store
    /// URL parameters `params` (e.g. `compression=xz`); signed by test-1
    /// unless `signed` is false. Returns the cache directory.
    fn cache(&self, name: &str, params: &str, signed: bool) -> PathBuf {
        let dir = self.dir.path().join(name);
        let secret = self.dir.path().join("test-1.sec");
        let mut url = format!("file://{}?{params}", dir.display());
        if signed {
            url.push_str(&format!("&secret-key={}", secret.display()));
        }
        nix("nix", &["--extra-experimental-features", "nix-command", "copy", "--to", &url, &self.root.to_string()]);
        dir
    }

    fn path(&self, name: &str) -> &StorePath {
        self.paths.iter().find(|p| p.name() == name).unwrap()
    }

    fn keys(&self) -> Vec<String> {
        vec![self.public_key.clone()]
    }
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn narinfo_file(cache: &Path, path: &StorePath) -> PathBuf {
    cache.join(format!("{}.narinfo", path.hash()))
}

/// The NAR file a narinfo points to.
fn nar_file(cache: &Path, path: &StorePath) -> PathBuf {
    let narinfo = std::fs::read_to_string(narinfo_file(cache, path)).unwrap();
    let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    cache.join(url)
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no {from:?}:\n{text}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-r").arg(from).arg(to).status().unwrap();
    assert!(status.success());
}

/// What `nix-store --dump` writes for `path`.
fn dump(path: &StorePath) -> Vec<u8> {
    let out = Command::new("nix-store").arg("--dump").arg(path.to_string()).output().unwrap();
    assert!(out.status.success(), "nix-store --dump {path} failed");
    out.stdout
}

/// Checks a closure against what the local Nix store says about each path.
fn assert_matches_nix(built: &Built, closure: &[PathInfo]) {
    let mut got: Vec<&StorePath> = closure.iter().map(|i| &i.path).collect();
    got.sort();
    let mut want: Vec<&StorePath> = built.paths.iter().collect();
    want.sort();
    assert_eq!(got, want, "the closure has other paths than nix-store -qR");
    assert_eq!(closure.last().map(|i| &i.path), Some(&built.root), "the root comes last");

    for (index, info) in closure.iter().enumerate() {
        let p = info.path.to_string();
        let references: Vec<String> =
            nix("nix-store", &["-q", "--references", &p]).lines().map(str::to_owned).collect();
        let mut ours: Vec<String> = info.references.iter().map(ToString::to_string).collect();
        ours.sort();
        let mut theirs = references.clone();
        theirs.sort();
        assert_eq!(ours, theirs, "references of {p}");
        assert_eq!(info.nar_hash, nix("nix-store", &["-q", "--hash", &p]).trim(), "NarHash of {p}");
        assert_eq!(info.nar_size.to_string(), nix("nix-store", &["-q", "--size", &p]).trim(), "NarSize of {p}");
        assert_eq!(info.deriver.as_deref(), Some(nix("nix-store", &["-q", "--deriver", &p]).trim()), "{p}");
        for reference in info.references.iter().filter(|r| **r != info.path) {
            let at = closure.iter().position(|i| i.path == *reference).unwrap();
            assert!(at < index, "{reference} must come before {p}, which refers to it");
        }
    }
    let tool = built.path("tool");
    let tool_info = closure.iter().find(|i| i.path == *tool).unwrap();
    assert!(tool_info.references.contains(tool), "tool refers to itself");
}

/// Reads every NAR of the closure through `cache` and compares it with
/// `nix-store --dump`.
async fn assert_nars_match_nix(cache: &BinaryCacheSource, closure: &[PathInfo]) {
    for info in closure {
        let nar = cache.nar(&info.path).await.unwrap();
        assert!(nar == dump(&info.path), "NAR of {} differs from nix-store --dump", info.path);
    }
}

#[tokio::test]
async fn closure_comes_in_dependency_order_with_nixs_metadata() {
    let built = Built::new();
    let dir = built.cache("xz", "compression=xz", true);
    let cache = BinaryCacheSource::new(&file_url(&dir), &built.keys(), None).unwrap();
    let closure = cache.closure(&built.root).await.unwrap();
    assert_matches_nix(&built, &closure);

    // Any path's own closure works too, and a cache URL with Nix store settings is read the same.
    let cache = BinaryCacheSource::new(&format!("{}?compression=xz", file_url(&dir)), &built.keys(), None).unwrap();
    let mid = cache.closure(built.path("mid")).await.unwrap();
    let names: Vec<&str> = mid.iter().map(|i| i.path.name()).collect();
    assert_eq!(names.last(), Some(&"mid"));
    assert_eq!(names.len(), 3, "{names:?}");
}

#[tokio::test]
async fn nars_are_what_nix_store_dump_writes_for_every_compression() {
    let built = Built::new();
    for (compression, extension) in [("xz", ".nar.xz"), ("zstd", ".nar.zst"), ("none", ".nar")] {
        let dir = built.cache(compression, &format!("compression={compression}"), true);
        // Make sure Nix really wrote this compression, or the test would prove nothing.
        let narinfo = std::fs::read_to_string(narinfo_file(&dir, &built.root)).unwrap();
        assert!(narinfo.contains(&format!("Compression: {compression}\n")), "{narinfo}");
        assert!(nar_file(&dir, &built.root).to_str().unwrap().ends_with(extension), "{narinfo}");

        let cache = BinaryCacheSource::new(&file_url(&dir), &built.keys(), None).unwrap();
        let closure = cache.closure(&built.root).await.unwrap();
        assert_nars_match_nix(&cache, &closure).await;

        // nar() without closure() first fetches and verifies the narinfo itself.
        let fresh = BinaryCacheSource::new(&file_url(&dir), &built.keys(), None).unwrap();
        assert!(fresh.nar(built.path("tool")).await.unwrap() == dump(built.path("tool")), "{compression}");
    }
}

#[tokio::test]
async fn a_cache_signed_by_an_untrusted_key_is_refused() {
    let built = Built::new();
    let dir = built.cache("xz", "compression=xz", true);
    let cache = BinaryCacheSource::new(&file_url(&dir), std::slice::from_ref(&built.other_key), None).unwrap();
    let err = cache.closure(&built.root).await.unwrap_err();
    match &err {
        CacheError::Signature { path, reason: SignatureError::Untrusted { signers, trusted } } => {
            assert_eq!(path, &built.root);
            assert_eq!(signers, &["test-1"]);
            assert_eq!(trusted, &["other-1"]);
        }
        other => panic!("expected an untrusted-key refusal, got {other}"),
    }
    let message = err.to_string();
    assert!(message.contains(&built.root.to_string()) && message.contains("test-1"), "{message}");
    // nar() refuses it as well: it never hands out bytes of an unverified path.
    let err = cache.nar(built.path("leaf")).await.unwrap_err();
    assert!(matches!(err, CacheError::Signature { .. }), "{err}");

    // Trusting both keys is fine.
    let both = [built.other_key.clone(), built.public_key.clone()];
    let cache = BinaryCacheSource::new(&file_url(&dir), &both, None).unwrap();
    assert_eq!(cache.closure(&built.root).await.unwrap().len(), 4);
}

#[tokio::test]
async fn an_unsigned_cache_is_refused() {
    let built = Built::new();
    let dir = built.cache("unsigned", "compression=xz", false);
    let cache = BinaryCacheSource::new(&file_url(&dir), &built.keys(), None).unwrap();
    let err = cache.closure(&built.root).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Signature { path, reason: SignatureError::Unsigned } if *path == built.root),
        "{err}"
    );
    assert!(err.to_string().contains("unsigned"), "{err}");
}

#[tokio::test]
async fn a_tampered_narinfo_fails_its_signature() {
    let built = Built::new();
    let signed = built.cache("xz", "compression=xz", true);
    let leaf = built.path("leaf");
    let mid = built.path("mid");

    // A bigger NarSize for a path deep in the closure: the whole closure is refused.
    let bigger = built.dir.path().join("bigger");
    copy_dir(&signed, &bigger);
    let size = nix("nix-store", &["-q", "--size", &leaf.to_string()]).trim().to_owned();
    edit(
        &narinfo_file(&bigger, leaf),
        &format!("NarSize: {size}\n"),
        &format!("NarSize: {}\n", size.parse::<u64>().unwrap() + 8),
    );
    let cache = BinaryCacheSource::new(&file_url(&bigger), &built.keys(), None).unwrap();
    let err = cache.closure(&built.root).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Signature { path, reason: SignatureError::BadSignature { key } }
            if path == leaf && key == "test-1"),
        "{err}"
    );

    // A reference dropped from mid (it would hide a dependency from the deployment).
    let fewer = built.dir.path().join("fewer");
    copy_dir(&signed, &fewer);
    let narinfo = narinfo_file(&fewer, mid);
    let text = std::fs::read_to_string(&narinfo).unwrap();
    let references = text.lines().find(|l| l.starts_with("References: ")).unwrap();
    let without_leaf: Vec<&str> =
        references["References: ".len()..].split(' ').filter(|r| *r != leaf.base_name()).collect();
    assert_eq!(without_leaf.len(), 1, "{references}");
    edit(&narinfo, references, &format!("References: {}", without_leaf.join(" ")));
    let cache = BinaryCacheSource::new(&file_url(&fewer), &built.keys(), None).unwrap();
    let err = cache.closure(&built.root).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Signature { path, reason: SignatureError::BadSignature { .. } } if path == mid),
        "{err}"
    );
    assert!(err.to_string().contains("bad signature by test-1"), "{err}");
}

#[tokio::test]
async fn a_corrupted_nar_is_reported_as_corrupt() {
    let built = Built::new();
    let leaf = built.path("leaf");
    let flip = |file: &Path| {
        let mut bytes = std::fs::read(file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(file, bytes).unwrap();
    };

    // A damaged xz file: its FileHash no longer matches.
    let xz = built.cache("xz", "compression=xz", true);
    flip(&nar_file(&xz, leaf));
    let cache = BinaryCacheSource::new(&file_url(&xz), &built.keys(), None).unwrap();
    cache.closure(&built.root).await.unwrap(); // the narinfos are intact
    let err = cache.nar(leaf).await.unwrap_err();
    assert!(matches!(&err, CacheError::Corrupt { path, .. } if path == leaf), "{err}");
    assert!(err.to_string().contains("FileHash"), "{err}");
    // The other paths are still served.
    assert!(cache.nar(built.path("mid")).await.unwrap() == dump(built.path("mid")));

    // FileHash and FileSize are not signed, so someone who changes the NAR can
    // drop them; the signed NarHash still catches it.
    let none = built.cache("none", "compression=none", true);
    let narinfo = narinfo_file(&none, leaf);
    let text = std::fs::read_to_string(&narinfo).unwrap();
    let unsigned_fields: String = text
        .lines()
        .filter(|l| !l.starts_with("FileHash:") && !l.starts_with("FileSize:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&narinfo, unsigned_fields).unwrap();
    flip(&nar_file(&none, leaf));
    let cache = BinaryCacheSource::new(&file_url(&none), &built.keys(), None).unwrap();
    let err = cache.nar(leaf).await.unwrap_err();
    assert!(matches!(&err, CacheError::Corrupt { path, .. } if path == leaf), "{err}");
    assert!(err.to_string().contains("NarHash"), "{err}");

    // A NAR file that is gone.
    std::fs::remove_file(nar_file(&xz, built.path("tool"))).unwrap();
    let err = cache_for(&xz, &built).nar(built.path("tool")).await.unwrap_err();
    assert!(matches!(&err, CacheError::NotFound { .. }), "{err}");
}

fn cache_for(dir: &Path, built: &Built) -> BinaryCacheSource {
    BinaryCacheSource::new(&file_url(dir), &built.keys(), None).unwrap()
}

#[tokio::test]
async fn missing_paths_and_non_caches_are_named() {
    let built = Built::new();
    let dir = built.cache("xz", "compression=xz", true);
    let leaf = built.path("leaf");
    std::fs::remove_file(narinfo_file(&dir, leaf)).unwrap();
    let err = cache_for(&dir, &built).closure(&built.root).await.unwrap_err();
    match &err {
        CacheError::NotFound { path, url } => {
            assert_eq!(path, leaf);
            assert_eq!(url, &narinfo_file(&dir, leaf).display().to_string());
        }
        other => panic!("expected NotFound, got {other}"),
    }

    // A directory that is not a cache at all (a typo in the URL, say).
    let err = cache_for(&built.dir.path().join("no-such-cache"), &built).closure(&built.root).await.unwrap_err();
    assert!(matches!(&err, CacheError::BadUrl { .. }), "{err}");
    assert!(err.to_string().contains("nix-cache-info"), "{err}");
}

#[tokio::test]
async fn the_same_cache_over_http() {
    let built = Built::new();
    let dir = built.cache("zstd", "compression=zstd", true);
    let server = support::HttpServer::start(built.dir.path());
    let url = format!("{}/zstd/?priority=30", server.url);
    let cache = BinaryCacheSource::new(&url, &built.keys(), None).unwrap();
    assert_eq!(cache.public_url(), url);
    let closure = cache.closure(&built.root).await.unwrap();
    assert_matches_nix(&built, &closure);
    assert_nars_match_nix(&cache, &closure).await;

    std::fs::remove_file(narinfo_file(&dir, built.path("tool"))).unwrap();
    let fresh = BinaryCacheSource::new(&url, &built.keys(), None).unwrap();
    let err = fresh.closure(&built.root).await.unwrap_err();
    match &err {
        CacheError::NotFound { path, url } => {
            assert_eq!(path, built.path("tool"));
            assert_eq!(url, &format!("{}/zstd/{}.narinfo", server.url, built.path("tool").hash()));
        }
        other => panic!("expected NotFound, got {other}"),
    }

    let elsewhere = BinaryCacheSource::new(&format!("{}/nothing", server.url), &built.keys(), None).unwrap();
    let err = elsewhere.closure(&built.root).await.unwrap_err();
    assert!(matches!(&err, CacheError::BadUrl { .. }), "{err}");
}

#[tokio::test]
async fn the_same_cache_from_an_s3_bucket() {
    let built = Built::new();
    let dir = built.cache("xz", "compression=xz", true);
    let s3 = support::s3_client().await;
    let bucket = format!("nix-cache-{}", built.root.hash());
    support::create_bucket(&s3, &bucket).await;
    let mut uploaded = 0;
    for entry in walk(&dir) {
        let key = entry.strip_prefix(&dir).unwrap().to_str().unwrap().to_owned();
        let body = aws_sdk_s3::primitives::ByteStream::from(std::fs::read(&entry).unwrap());
        s3.put_object().bucket(&bucket).key(key).body(body).send().await.unwrap();
        uploaded += 1;
    }
    assert_eq!(uploaded, 1 + 4 + 4, "nix-cache-info, four narinfos, four NARs");

    // The client from the caller as is.
    let cache = BinaryCacheSource::new(&format!("s3://{bucket}"), &built.keys(), Some(s3.clone())).unwrap();
    let closure = cache.closure(&built.root).await.unwrap();
    assert_matches_nix(&built, &closure);
    assert_nars_match_nix(&cache, &closure).await;

    // A client aimed at a closed loopback port: only the URL's endpoint
    // (as Nix spells it, host and scheme apart) can lead it to the bucket.
    let config = support::aws_sdk_config().await;
    let misdirected = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config).endpoint_url("http://127.0.0.1:1").build(),
    );
    let endpoint = support::moto().endpoint.strip_prefix("http://").unwrap();
    let url = format!("s3://{bucket}?region=eu-west-1&endpoint={endpoint}&scheme=http");
    let cache = BinaryCacheSource::new(&url, &built.keys(), Some(misdirected)).unwrap();
    assert_eq!(cache.closure(&built.root).await.unwrap().len(), 4);
    assert!(cache.nar(&built.root).await.unwrap() == dump(&built.root));

    // A missing object is NotFound, naming the key.
    s3.delete_object().bucket(&bucket).key(format!("{}.narinfo", built.path("leaf").hash())).send().await.unwrap();
    let fresh = BinaryCacheSource::new(&format!("s3://{bucket}"), &built.keys(), Some(s3)).unwrap();
    let err = fresh.closure(&built.root).await.unwrap_err();
    match &err {
        CacheError::NotFound { path, url } => {
            assert_eq!(path, built.path("leaf"));
            assert_eq!(url, &format!("s3://{bucket}/{}.narinfo", built.path("leaf").hash()));
        }
        other => panic!("expected NotFound, got {other}"),
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files
}
