//! A Nix binary cache (what `nix copy --to <url>` writes) as the source of
//! closures to deploy: `file://` directories, `http(s)://` servers and
//! `s3://` buckets.
//!
//! Nothing in a cache is trusted by itself. Every narinfo must carry a
//! signature by one of the configured public keys before its path is part
//! of a closure, and every NAR must match the signed hash and size before
//! its bytes are handed out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

use super::narinfo::{Compression, InvalidPublicKey, Narinfo, NarinfoError, SignatureError, TrustedKeys};
use super::path_info::dependency_order;
use super::store_path::STORE_DIR;
use super::{PathInfo, StorePath, base32};

/// How many narinfos are fetched at once while walking a closure: enough to
/// hide the round trips of a remote cache, few enough to be polite to it.
const CONCURRENT_FETCHES: usize = 16;

/// The file at the cache root that marks a directory, server or bucket as a binary cache.
const CACHE_INFO: &str = "nix-cache-info";

/// What can go wrong reading a closure from a binary cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("binary cache URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("binary cache {url}: {source}")]
    PublicKey {
        url: String,
        #[source]
        source: InvalidPublicKey,
    },

    #[error(
        "no public keys are configured for binary cache {url}, so every path in it would be refused; \
         add the cache's public key (`<name>:<base64>`, from `nix-store --generate-binary-cache-key`)"
    )]
    NoPublicKeys { url: String },

    #[error(
        "{path} is not in the binary cache: {url} does not exist; copy it there with `nix copy --to <cache> {path}`"
    )]
    NotFound { path: StorePath, url: String },

    #[error("refusing {path} from the binary cache: {reason}")]
    Signature {
        path: StorePath,
        #[source]
        reason: SignatureError,
    },

    #[error("{path} in the binary cache is corrupt: {reason}; copy it to the cache again")]
    Corrupt { path: StorePath, reason: String },

    #[error(
        "{url} is larger than {limit} bytes ({why}); the operator stopped reading it. \
         Check the cache, or raise --max-nar-mib if the path really is that large"
    )]
    TooLarge { url: String, limit: u64, why: String },

    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },

    #[error("{url}: {reason}")]
    Unsupported { url: String, reason: String },
}

/// Where the cache's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    File(PathBuf),
    /// Base URL without query and without a trailing '/'.
    Http(String),
    S3 {
        bucket: String,
        region: Option<String>,
        endpoint: Option<String>,
    },
}

impl Location {
    /// Reads a cache URL the way Nix does: store settings in the query
    /// (`?compression=…`, `?priority=…`) are accepted and, except for S3's
    /// `region`, `endpoint` and `scheme`, ignored, since they only matter to
    /// writers.
    fn parse(url: &str) -> Result<Self, CacheError> {
        let bad = |reason: &str| CacheError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
        let mut parsed = reqwest::Url::parse(url)
            .map_err(|e| bad(&format!("{e}; expected file:///dir, http(s)://host/path or s3://bucket")))?;
        let query: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
        parsed.set_query(None);
        parsed.set_fragment(None);
        match parsed.scheme() {
            "file" => {
                let dir = parsed.to_file_path().map_err(|()| {
                    bad("a file:// cache must be an absolute local directory, as in file:///var/cache/nix")
                })?;
                Ok(Self::File(dir))
            }
            "http" | "https" => Ok(Self::Http(parsed.as_str().trim_end_matches('/').to_owned())),
            "s3" => {
                let bucket =
                    parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| bad("there is no bucket name"))?;
                if !matches!(parsed.path(), "" | "/") {
                    return Err(bad("Nix reads s3:// caches from the bucket root; a key prefix is not supported"));
                }
                let endpoint = query.get("endpoint").filter(|e| !e.is_empty()).map(|e| {
                    // Nix takes a host name here and a separate `scheme` (default https).
                    if e.contains("://") {
                        e.clone()
                    } else {
                        format!("{}://{e}", query.get("scheme").map_or("https", String::as_str))
                    }
                });
                Ok(Self::S3 { bucket: bucket.to_owned(), region: query.get("region").cloned(), endpoint })
            }
            other => Err(bad(&format!(
                "scheme {other}:// is not a binary cache this operator can read (file://, http://, https://, s3://)"
            ))),
        }
    }
}

/// The client for one kind of location.
#[derive(Debug)]
enum Backend {
    File(PathBuf),
    Http { client: reqwest::Client, base: String },
    S3 { client: aws_sdk_s3::Client, bucket: String },
}

impl Backend {
    /// Where `key` (a path relative to the cache root) is, for messages.
    fn location(&self, key: &str) -> String {
        match self {
            Self::File(dir) => dir.join(key).display().to_string(),
            Self::Http { .. } if is_absolute_http(key) => key.to_owned(),
            Self::Http { base, .. } => format!("{base}/{key}"),
            Self::S3 { bucket, .. } => format!("s3://{bucket}/{key}"),
        }
    }

    /// The file at `key`, or None when the cache does not have it. Reading
    /// stops past `limit` bytes (`why` says where the limit comes from): a
    /// cache serving an endless or oversized body costs at most `limit`.
    async fn get(&self, key: &str, limit: u64, why: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(mut body) = self.open(key, limit, why).await? else { return Ok(None) };
        let mut bytes = Vec::new();
        while let Some(chunk) = body.chunk().await? {
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    /// The file at `key` as it arrives, or None when the cache does not
    /// have it; the body ends in an error past `limit` bytes.
    async fn open(&self, key: &str, limit: u64, why: &str) -> Result<Option<Body>, CacheError> {
        let url = self.location(key);
        let fetch = |reason: String| CacheError::Fetch { url: url.clone(), reason };
        let too_large = || CacheError::TooLarge { url: url.clone(), limit, why: why.to_owned() };
        let reader = match self {
            Self::File(dir) => match tokio::fs::File::open(dir.join(key)).await {
                Ok(file) => Reader::File(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(fetch(e.to_string())),
            },
            Self::Http { client, .. } => {
                let response = client.get(&url).send().await.map_err(|e| fetch(error_chain(&e)))?;
                let status = response.status();
                if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
                    return Ok(None);
                }
                if !status.is_success() {
                    return Err(fetch(format!("the server answered {status}")));
                }
                if response.content_length().is_some_and(|n| n > limit) {
                    return Err(too_large());
                }
                Reader::Http(response)
            }
            Self::S3 { client, bucket } => {
                let output = match client.get_object().bucket(bucket).key(key).send().await {
                    Ok(output) => output,
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
                    Err(e) => return Err(fetch(aws_sdk_s3::error::DisplayErrorContext(&e).to_string())),
                };
                if output.content_length().is_some_and(|n| n as u64 > limit) {
                    return Err(too_large());
                }
                Reader::S3(output.body)
            }
        };
        Ok(Some(Body { reader, url, limit, why: why.to_owned(), read: 0 }))
    }
}

/// A file of the cache being read, bounded.
struct Body {
    reader: Reader,
    url: String,
    limit: u64,
    why: String,
    read: u64,
}

enum Reader {
    File(tokio::fs::File),
    Http(reqwest::Response),
    S3(aws_sdk_s3::primitives::ByteStream),
}

impl Body {
    /// The next piece of the file; None at its end. An error once the
    /// file would pass the limit.
    async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, CacheError> {
        let fetch = |reason: String| CacheError::Fetch { url: self.url.clone(), reason };
        let chunk = match &mut self.reader {
            Reader::File(file) => {
                let mut buf = vec![0u8; 1 << 16];
                let n = tokio::io::AsyncReadExt::read(file, &mut buf).await.map_err(|e| fetch(e.to_string()))?;
                buf.truncate(n);
                (n > 0).then(|| bytes::Bytes::from(buf))
            }
            Reader::Http(response) => response.chunk().await.map_err(|e| fetch(error_chain(&e)))?,
            Reader::S3(body) => body.try_next().await.map_err(|e| fetch(error_chain(&e)))?,
        };
        if let Some(chunk) = &chunk {
            self.read += chunk.len() as u64;
            if self.read > self.limit {
                return Err(CacheError::TooLarge { url: self.url.clone(), limit: self.limit, why: self.why.clone() });
            }
        }
        Ok(chunk)
    }
}

fn is_absolute_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// An error and its causes on one line: reqwest's own message alone
/// ("error sending request") does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A binary cache that closures and NARs are read from, with the public
/// keys whose signatures it must carry.
#[derive(Debug)]
pub struct BinaryCacheSource {
    url: String,
    public_keys: Vec<String>,
    keys: TrustedKeys,
    backend: Backend,
    /// Verified narinfos from earlier `closure` calls, so that `nar` does not
    /// fetch and verify them again.
    narinfos: Mutex<HashMap<StorePath, Narinfo>>,
    /// The largest NAR (and compressed file) read from the cache.
    max_nar_bytes: u64,
}

/// The largest narinfo read: far more than the references of any real path.
const MAX_NARINFO_BYTES: u64 = 1 << 20;
/// The default largest NAR read from a cache.
pub const DEFAULT_MAX_NAR_BYTES: u64 = 4 << 30;

impl BinaryCacheSource {
    /// A cache at `url` (`file:///dir`, `http(s)://…`, or `s3://bucket` with
    /// optional `?region=…&endpoint=…`), trusting paths signed by any of
    /// `public_keys` (`name:base64`). An `s3://` cache is read with `s3`,
    /// an already configured client; the URL's region and endpoint, when
    /// given, override the client's, as they do for Nix.
    pub fn new(url: &str, public_keys: &[String], s3: Option<aws_sdk_s3::Client>) -> Result<Self, CacheError> {
        let keys =
            TrustedKeys::parse(public_keys).map_err(|source| CacheError::PublicKey { url: url.to_owned(), source })?;
        if keys.is_empty() {
            return Err(CacheError::NoPublicKeys { url: url.to_owned() });
        }
        let backend = match Location::parse(url)? {
            Location::File(dir) => Backend::File(dir),
            Location::Http(base) => {
                // No overall timeout: a large NAR over a slow link may take long.
                let client = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(30))
                    .read_timeout(Duration::from_secs(300))
                    .build()
                    .map_err(|e| CacheError::Fetch { url: url.to_owned(), reason: error_chain(&e) })?;
                Backend::Http { client, base }
            }
            Location::S3 { bucket, region, endpoint } => {
                let client = s3.ok_or_else(|| CacheError::BadUrl {
                    url: url.to_owned(),
                    reason: "an s3:// cache needs AWS credentials, but no S3 client was configured for it".into(),
                })?;
                let client = if region.is_none() && endpoint.is_none() {
                    client
                } else {
                    let mut config = client.config().to_builder();
                    if let Some(region) = region {
                        config = config.region(aws_sdk_s3::config::Region::new(region));
                    }
                    if let Some(endpoint) = endpoint {
                        // Like Nix: a custom endpoint (MinIO, Ceph, …) gets path-style addressing.
                        config = config.endpoint_url(endpoint).force_path_style(true);
                    }
                    aws_sdk_s3::Client::from_conf(config.build())
                };
                Backend::S3 { client, bucket }
            }
        };
        Ok(Self {
            url: url.to_owned(),
            public_keys: public_keys.to_vec(),
            keys,
            backend,
            narinfos: Mutex::new(HashMap::new()),
            max_nar_bytes: DEFAULT_MAX_NAR_BYTES,
        })
    }

    /// Refuses NARs (compressed or not) larger than `bytes`, whatever their
    /// narinfo says.
    pub fn with_max_nar_bytes(mut self, bytes: u64) -> Self {
        self.max_nar_bytes = bytes;
        self
    }

    /// The URL as given, for a node's `substituters`: Nix on the node reads
    /// the same URL (with its own credentials, for s3://).
    pub fn public_url(&self) -> &str {
        &self.url
    }

    /// The public keys as given, for a node's `trusted-public-keys`.
    pub fn public_keys(&self) -> &[String] {
        &self.public_keys
    }

    /// The closure of `root` (it and everything it refers to, transitively),
    /// references before referrers. Refuses the whole closure if any path is
    /// missing, unsigned or badly signed: deploying part of a closure is
    /// never useful.
    pub async fn closure(&self, root: &StorePath) -> Result<Vec<PathInfo>, CacheError> {
        self.check_cache_info().await?;
        let mut seen = HashSet::from([root.clone()]);
        let mut queue = VecDeque::from([root.clone()]);
        let mut in_flight = FuturesUnordered::new();
        let mut infos = Vec::new();
        loop {
            while in_flight.len() < CONCURRENT_FETCHES
                && let Some(path) = queue.pop_front()
            {
                in_flight.push(self.fetch_narinfo(path));
            }
            let Some(narinfo) = in_flight.next().await else { break };
            let narinfo = narinfo?;
            for reference in &narinfo.references {
                if seen.insert(reference.clone()) {
                    queue.push_back(reference.clone());
                }
            }
            infos.push(PathInfo::from(&narinfo));
            self.remember(narinfo);
        }
        dependency_order(infos).map_err(|e| CacheError::Corrupt { path: e.by.clone(), reason: e.to_string() })
    }

    /// The NAR serialisation of `path`, checked against its signed narinfo.
    pub async fn nar(&self, path: &StorePath) -> Result<Vec<u8>, CacheError> {
        self.nar_into(path, Vec::new()).await
    }

    /// Writes the NAR serialisation of `path` to `out` as it arrives
    /// (decompressing and hashing on a blocking thread), never holding it
    /// whole, and returns `out` once it is checked against the signed
    /// narinfo. On an error `out` may hold unchecked bytes.
    pub async fn nar_into<W: Write + Send + 'static>(&self, path: &StorePath, mut out: W) -> Result<W, CacheError> {
        let known = self.narinfos.lock().unwrap_or_else(PoisonError::into_inner).get(path).cloned();
        let narinfo = match known {
            Some(narinfo) => narinfo,
            None => {
                let narinfo = self.fetch_narinfo(path.clone()).await?;
                self.remember(narinfo.clone());
                narinfo
            }
        };
        let key = self.nar_key(&narinfo)?;
        let url = self.backend.location(&key);
        if narinfo.nar_size > self.max_nar_bytes {
            return Err(CacheError::TooLarge {
                url,
                limit: self.max_nar_bytes,
                why: format!("its narinfo says NarSize {}; the operator's --max-nar-mib", narinfo.nar_size),
            });
        }
        // The signed FileSize when there is one; otherwise what a compressor
        // can add to NarSize, at most.
        let (limit, why) = match narinfo.file_size {
            Some(size) => (size, "its narinfo's FileSize".to_owned()),
            None => (narinfo.nar_size + narinfo.nar_size / 64 + (64 << 10), "its narinfo's NarSize".to_owned()),
        };
        let (limit, why) = if limit > self.max_nar_bytes {
            (self.max_nar_bytes, "the operator's --max-nar-mib".into())
        } else {
            (limit, why)
        };
        let mut body = self
            .backend
            .open(&key, limit, &why)
            .await?
            .ok_or_else(|| CacheError::NotFound { path: path.clone(), url: url.clone() })?;
        // Hashing and decompressing hundreds of megabytes must not stall the runtime.
        let (tx, chunks) = tokio::sync::mpsc::channel(8);
        let unpacking = tokio::task::spawn_blocking(move || {
            unpack(&narinfo, &url, Arriving { chunks, current: bytes::Bytes::new() }, &mut out).map(|()| out)
        });
        let mut fetched = Ok(());
        loop {
            match body.chunk().await {
                Ok(Some(chunk)) => {
                    if tx.send(chunk).await.is_err() {
                        break; // the unpacker stopped; it says why
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    fetched = Err(err);
                    break;
                }
            }
        }
        drop(tx);
        let unpacked = unpacking
            .await
            .map_err(|e| CacheError::Corrupt { path: path.clone(), reason: format!("unpacking stopped: {e}") })?;
        // A failed fetch explains a short file better than the unpacker can.
        fetched?;
        unpacked
    }

    fn remember(&self, narinfo: Narinfo) {
        self.narinfos.lock().unwrap_or_else(PoisonError::into_inner).insert(narinfo.path.clone(), narinfo);
    }

    /// A wrong URL otherwise shows up as "path not found"; Nix itself
    /// refuses a cache without nix-cache-info, so this says it plainly.
    async fn check_cache_info(&self) -> Result<(), CacheError> {
        let location = self.backend.location(CACHE_INFO);
        let Some(bytes) =
            self.backend.get(CACHE_INFO, MAX_NARINFO_BYTES, "the largest nix-cache-info the operator reads").await?
        else {
            return Err(CacheError::BadUrl {
                url: self.url.clone(),
                reason: format!(
                    "{location} does not exist, so this is not a binary cache; `nix copy --to <url>` creates one"
                ),
            });
        };
        let text = String::from_utf8_lossy(&bytes);
        let store_dir = text.lines().find_map(|l| l.strip_prefix("StoreDir:")).map(str::trim);
        match store_dir {
            Some(dir) if dir != STORE_DIR => Err(CacheError::Unsupported {
                url: location,
                reason: format!("the cache holds paths for the store directory {dir}, not {STORE_DIR}"),
            }),
            _ => Ok(()),
        }
    }

    /// Fetches, parses and verifies the narinfo of `path`.
    async fn fetch_narinfo(&self, path: StorePath) -> Result<Narinfo, CacheError> {
        let key = format!("{}.narinfo", path.hash());
        let url = self.backend.location(&key);
        let Some(bytes) = self.backend.get(&key, MAX_NARINFO_BYTES, "the largest narinfo the operator reads").await?
        else {
            return Err(CacheError::NotFound { path, url });
        };
        let corrupt = |reason: String| CacheError::Corrupt { path: path.clone(), reason };
        let text = std::str::from_utf8(&bytes).map_err(|_| corrupt(format!("{url} is not UTF-8 text")))?;
        let narinfo = Narinfo::parse(text).map_err(|e| match e {
            NarinfoError::UnsupportedCompression { .. } => {
                CacheError::Unsupported { url: url.clone(), reason: e.to_string() }
            }
            e => corrupt(format!("{url}: {e}")),
        })?;
        if narinfo.path != path {
            return Err(corrupt(format!("{url} describes {} instead", narinfo.path)));
        }
        self.keys.verify(&narinfo).map_err(|reason| CacheError::Signature { path, reason })?;
        Ok(narinfo)
    }

    /// The narinfo's URL as a key under the cache root. The URL is not
    /// covered by the signature, so it must not lead elsewhere on the disk
    /// or in the bucket; an HTTP cache may, as with Nix, name an absolute URL.
    fn nar_key(&self, narinfo: &Narinfo) -> Result<String, CacheError> {
        let url = &narinfo.url;
        let outside = || CacheError::Corrupt {
            path: narinfo.path.clone(),
            reason: format!("its URL {url:?} points outside the cache"),
        };
        if is_absolute_http(url) {
            return if matches!(self.backend, Backend::Http { .. }) { Ok(url.clone()) } else { Err(outside()) };
        }
        if url.starts_with('/') || url.contains("://") || url.split('/').any(|s| s == "..") {
            return Err(outside());
        }
        Ok(url.clone())
    }
}

/// Counts and hashes what passes through (a reader or a writer).
struct Hashing<T> {
    inner: T,
    digest: ring::digest::Context,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self { inner, digest: ring::digest::Context::new(&ring::digest::SHA256), bytes: 0 }
    }

    /// `sha256:<nix base32>` of what passed, the form narinfos are normalised to.
    fn hash(&self) -> String {
        format!("sha256:{}", base32::encode(self.digest.clone().finish().as_ref()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digest.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a file of the cache as it arrives (on a blocking thread).
struct Arriving {
    chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl Read for Arriving {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Decompresses the downloaded `file` into `out` as it is read, checking
/// the file and the NAR against the narinfo (whose NarHash and NarSize the
/// signature covers). `out` may have received bytes when this fails, so
/// nothing may be kept from it unless this returns Ok (a machine's
/// nix-store checks the NAR hash itself, and registers nothing that fails).
fn unpack(narinfo: &Narinfo, url: &str, file: impl Read, out: &mut dyn Write) -> Result<(), CacheError> {
    let corrupt = |reason: String| CacheError::Corrupt { path: narinfo.path.clone(), reason };
    let mut file = Hashing::new(file);
    let mut nar = Hashing::new(out);
    // Reading one byte past NarSize is enough to tell "too big" without
    // letting a damaged file inflate without bound.
    let limit = narinfo.nar_size.saturating_add(1);
    let copied = match narinfo.compression {
        Compression::None => std::io::copy(&mut (&mut file).take(limit), &mut nar),
        Compression::Xz => {
            std::io::copy(&mut liblzma::read::XzDecoder::new_multi_decoder(&mut file).take(limit), &mut nar)
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(&mut file).and_then(|d| std::io::copy(&mut d.take(limit), &mut nar))
        }
    };
    // The whole file counts for its size and hash, also past a failure.
    let rest = std::io::copy(&mut file, &mut std::io::sink());
    if let Some(size) = narinfo.file_size
        && file.bytes != size
    {
        return Err(corrupt(format!("{url} is {} bytes, but its narinfo says FileSize {size}", file.bytes)));
    }
    if let Some(expected) = &narinfo.file_hash {
        let actual = file.hash();
        if actual != *expected {
            return Err(corrupt(format!("{url} has hash {actual}, but its narinfo says FileHash {expected}")));
        }
    }
    copied.and(rest).map_err(|e| corrupt(format!("{url} does not decompress as {}: {e}", narinfo.compression)))?;
    if nar.bytes != narinfo.nar_size {
        let size = if nar.bytes > narinfo.nar_size { "more than" } else { "only" };
        return Err(corrupt(format!(
            "{url} holds {size} {} bytes of NAR, but NarSize is {}",
            nar.bytes.min(narinfo.nar_size),
            narinfo.nar_size
        )));
    }
    let actual = nar.hash();
    if actual != narinfo.nar_hash {
        return Err(corrupt(format!("the NAR in {url} has hash {actual}, but NarHash is {}", narinfo.nar_hash)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_urls_are_read_like_nix_reads_them() {
        assert_eq!(Location::parse("file:///tmp/cache?compression=xz").unwrap(), Location::File("/tmp/cache".into()));
        assert_eq!(
            Location::parse("https://cache.example.org/sub/?priority=40").unwrap(),
            Location::Http("https://cache.example.org/sub".into())
        );
        assert_eq!(Location::parse("http://127.0.0.1:8080").unwrap(), Location::Http("http://127.0.0.1:8080".into()));
        assert_eq!(
            Location::parse("s3://closures").unwrap(),
            Location::S3 { bucket: "closures".into(), region: None, endpoint: None }
        );
        assert_eq!(
            Location::parse("s3://closures?region=eu-west-1&endpoint=minio.local:9000&scheme=http").unwrap(),
            Location::S3 {
                bucket: "closures".into(),
                region: Some("eu-west-1".into()),
                endpoint: Some("http://minio.local:9000".into())
            }
        );
        assert_eq!(
            Location::parse("s3://closures?endpoint=https://s3.example.org").unwrap(),
            Location::S3 { bucket: "closures".into(), region: None, endpoint: Some("https://s3.example.org".into()) }
        );
        for bad in ["/tmp/cache", "ssh://host", "file://host/tmp/cache", "s3://closures/prefix", "not a url"] {
            let err = Location::parse(bad).unwrap_err();
            assert!(matches!(err, CacheError::BadUrl { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn s3_needs_a_client_and_every_cache_needs_keys() {
        let key = vec!["test-1:VlDQOnU/V9X4DrKXE7oZ59GtmhYKA5B3XIsn1KXeNNU=".to_owned()];
        let err = BinaryCacheSource::new("s3://closures", &key, None).unwrap_err();
        assert!(err.to_string().contains("no S3 client"), "{err}");
        let err = BinaryCacheSource::new("file:///tmp/cache", &[], None).unwrap_err();
        assert!(matches!(err, CacheError::NoPublicKeys { .. }), "{err}");
        let err = BinaryCacheSource::new("file:///tmp/cache", &["test-1".to_owned()], None).unwrap_err();
        assert!(matches!(err, CacheError::PublicKey { .. }), "{err}");
        let cache = BinaryCacheSource::new("file:///tmp/cache?compression=xz", &key, None).unwrap();
        assert_eq!(cache.public_url(), "file:///tmp/cache?compression=xz");
    }

    #[test]
    fn a_cache_can_be_shared_between_tasks() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let key = vec!["test-1:VlDQOnU/V9X4DrKXE7oZ59GtmhYKA5B3XIsn1KXeNNU=".to_owned()];
        let cache = BinaryCacheSource::new("file:///tmp/cache", &key, None).unwrap();
        let path = StorePath::parse("/nix/store/r25a0gcs3w1z0w988gqmcv74zd7b91al-leaf").unwrap();
        send_sync(&cache);
        send(&cache.closure(&path));
        send(&cache.nar(&path));
    }

    #[test]
    fn nar_urls_stay_inside_the_cache() {
        let key = vec!["test-1:VlDQOnU/V9X4DrKXE7oZ59GtmhYKA5B3XIsn1KXeNNU=".to_owned()];
        let file = BinaryCacheSource::new("file:///tmp/cache", &key, None).unwrap();
        let http = BinaryCacheSource::new("http://127.0.0.1:1/cache", &key, None).unwrap();
        let narinfo = |url: &str| Narinfo {
            path: StorePath::parse("/nix/store/r25a0gcs3w1z0w988gqmcv74zd7b91al-leaf").unwrap(),
            url: url.to_owned(),
            compression: Compression::None,
            file_hash: None,
            file_size: None,
            nar_hash: String::new(),
            nar_size: 1,
            references: Default::default(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        assert_eq!(file.nar_key(&narinfo("nar/x.nar.xz")).unwrap(), "nar/x.nar.xz");
        for bad in ["../../etc/shadow", "nar/../../x", "/etc/shadow", "https://elsewhere/x.nar"] {
            assert!(matches!(file.nar_key(&narinfo(bad)), Err(CacheError::Corrupt { .. })), "{bad}");
        }
        assert_eq!(http.nar_key(&narinfo("https://elsewhere/x.nar")).unwrap(), "https://elsewhere/x.nar");
        assert_eq!(http.backend.location("nar/x.nar"), "http://127.0.0.1:1/cache/nar/x.nar");
    }

    /// `sha256:<nix base32>` of `bytes`, the form narinfos are normalised to.
    fn sha256(bytes: &[u8]) -> String {
        format!("sha256:{}", base32::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()))
    }

    #[test]
    fn unpack_checks_sizes_and_hashes() {
        let nar = b"pretend this is a NAR".to_vec();
        let xz = {
            let mut out = Vec::new();
            liblzma::read::XzEncoder::new(&nar[..], 6).read_to_end(&mut out).unwrap();
            out
        };
        let zst = zstd::encode_all(&nar[..], 3).unwrap();
        let narinfo = |compression, file: &[u8]| Narinfo {
            path: StorePath::parse("/nix/store/r25a0gcs3w1z0w988gqmcv74zd7b91al-leaf").unwrap(),
            url: "nar/x".into(),
            compression,
            file_hash: Some(sha256(file)),
            file_size: Some(file.len() as u64),
            nar_hash: sha256(&nar),
            nar_size: nar.len() as u64,
            references: Default::default(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let unpack = |n: &Narinfo, _: &str, file: Vec<u8>| {
            let mut out = Vec::new();
            unpack(n, "x", &file[..], &mut out).map(|()| out)
        };
        for (compression, file) in [(Compression::None, &nar), (Compression::Xz, &xz), (Compression::Zstd, &zst)] {
            let n = narinfo(compression, file);
            assert_eq!(unpack(&n, "x", file.clone()).unwrap(), nar, "{compression}");

            let mut flipped = file.clone();
            flipped[file.len() / 2] ^= 1;
            let err = unpack(&n, "x", flipped.clone()).unwrap_err();
            assert!(err.to_string().contains("FileHash"), "{compression}: {err}");

            // Without FileHash, the signed NarHash and NarSize still catch it.
            let unchecked = Narinfo { file_hash: None, file_size: None, ..n.clone() };
            assert!(matches!(unpack(&unchecked, "x", flipped).unwrap_err(), CacheError::Corrupt { .. }));
            let smaller = Narinfo { nar_size: n.nar_size - 1, ..unchecked };
            let err = unpack(&smaller, "x", file.clone()).unwrap_err();
            assert!(err.to_string().contains("NarSize"), "{compression}: {err}");
        }
    }
}
