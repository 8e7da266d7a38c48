//! Pushing a closure to a machine: ask which paths it lacks (one round trip
//! on a `nix-store --serve` connection that also keeps them from garbage
//! collection), then stream only those, references first, as pipelined
//! AddToStoreNar commands written in one go (no round trip per path),
//! zstd-compressed when the machine has `zstd`.
//!
//! Each path's record is built (and compressed) once and shared by
//! every machine that needs it at about the same time, so pushing one
//! closure to many machines serialises and compresses each path once.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::{OnceCell, mpsc};

use super::cache::{BinaryCacheSource, CacheError};
use super::local_store::{LocalStore, LocalStoreError};
use super::remote_store::RemoteStore;
use super::serve::{self, ServeConnection, ServeError};
use super::{PathInfo, StorePath};
use crate::ssh::{RemoteProcess, Session};

/// zstd level: fast enough to keep up with a gigabit link on one core while
/// shrinking typical closures to about a third.
const ZSTD_LEVEL: i32 = 3;
/// Records prepared ahead of the one being sent.
const LOOKAHEAD: usize = 4;
/// Paths with more NAR than this are streamed from the source to the
/// machine, never held whole (nor shared between machines); smaller ones
/// are built whole, once, and shared. So a push holds at most about
/// LOOKAHEAD such records, plus a few chunks of a streamed path.
const STREAM_BYTES: u64 = 32 << 20;
/// The pieces a streamed path travels in.
const CHUNK_BYTES: usize = 1 << 20;

/// Errors pushing a closure.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Local(#[from] LocalStoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("compressing {path}: {reason}")]
    Compress { path: String, reason: String },
}

impl From<crate::ssh::SshError> for PushError {
    fn from(err: crate::ssh::SshError) -> Self {
        Self::Serve(err.into())
    }
}

/// Where a closure's paths come from.
#[derive(Clone)]
pub enum PathSource {
    Local(LocalStore),
    Cache(Arc<BinaryCacheSource>),
    /// Another machine's store (a builder's), over SSH.
    Remote(RemoteStore),
}

impl PathSource {
    /// The closure of `root`, references before referrers.
    pub async fn closure(&self, root: &StorePath) -> Result<Vec<PathInfo>, PushError> {
        Ok(match self {
            Self::Local(store) => store.closure(root).await?,
            Self::Cache(cache) => cache.closure(root).await?,
            Self::Remote(store) => store.closure(root).await?,
        })
    }

    /// The NAR serialisation of `path`.
    pub async fn nar(&self, path: &StorePath) -> Result<Vec<u8>, PushError> {
        self.nar_into(path, Vec::new()).await
    }

    /// Writes the NAR serialisation of `path` to `out` as it is read, on a
    /// blocking thread, and returns `out`. From a cache, the NAR is checked
    /// against its signed hash only at its end: `out` may have received
    /// bytes when this fails (a machine's nix-store checks the hash too, and
    /// registers nothing that fails).
    pub async fn nar_into<W: Write + Send + 'static>(&self, path: &StorePath, out: W) -> Result<W, PushError> {
        Ok(match self {
            Self::Local(store) => store.nar_into(path, out).await?,
            Self::Cache(cache) => cache.nar_into(path, out).await?,
            Self::Remote(store) => store.nar_into(path, out).await?,
        })
    }
}

/// A streamed path on its way to the machine: written in pieces on a
/// blocking thread, sent by the push as they come.
struct Chunks {
    tx: mpsc::Sender<bytes::Bytes>,
    buf: Vec<u8>,
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
            self.tx
                .blocking_send(chunk.into())
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the push stopped"))?;
        }
        Ok(())
    }
}

/// A streamed NAR as it leaves: as is, or as one zstd frame.
enum Outgoing {
    Plain(Chunks),
    Compressed(zstd::stream::write::Encoder<'static, Chunks>),
}

impl Write for Outgoing {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(chunks) => chunks.write(data),
            Self::Compressed(encoder) => encoder.write(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(chunks) => chunks.flush(),
            Self::Compressed(encoder) => encoder.flush(),
        }
    }
}

impl Outgoing {
    /// Ends the frame and sends what is left (blocking).
    fn finish(self) -> std::io::Result<()> {
        match self {
            Self::Plain(mut chunks) => chunks.flush(),
            Self::Compressed(encoder) => encoder.finish()?.flush(),
        }
    }
}

/// How far a push has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub paths_done: u64,
    pub paths_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a push moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Store paths copied.
    pub paths: u64,
    /// Their NAR size.
    pub nar_bytes: u64,
    /// Bytes sent over SSH for them (after compression).
    pub wire_bytes: u64,
}

/// One path ready to send.
struct Record {
    bytes: bytes::Bytes,
}

/// A record is shared only between pushes whose own source verified the
/// same path info (path, NAR hash and size, references, deriver): a path
/// fetched for a Machine that trusts one cache is never sent to a Machine
/// whose cache says something else about that path. And compressed or not.
type RecordKey = (PathInfo, bool);

/// Recently built path records, shared between concurrent pushes of the
/// same paths and bounded in bytes (oldest first out).
pub struct RecordCache {
    budget: u64,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    cells: HashMap<RecordKey, Arc<OnceCell<Arc<Record>>>>,
    filled: VecDeque<(RecordKey, u64)>,
    bytes: u64,
}

impl RecordCache {
    pub fn new(budget_bytes: u64) -> Self {
        Self { budget: budget_bytes, inner: Mutex::new(CacheInner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn get(&self, source: &PathSource, info: &PathInfo, compress: bool) -> Result<Arc<Record>, PushError> {
        let key = (info.clone(), compress);
        let cell = self.lock().cells.entry(key.clone()).or_default().clone();
        let mut built = false;
        let record = cell
            .get_or_try_init(|| async {
                built = true;
                build_record(source, info, compress).await.map(Arc::new)
            })
            .await?
            .clone();
        if built {
            let mut inner = self.lock();
            let size = record.bytes.len() as u64;
            inner.filled.push_back((key, size));
            inner.bytes += size;
            while inner.bytes > self.budget {
                let Some((old, size)) = inner.filled.pop_front() else { break };
                inner.bytes -= size;
                inner.cells.remove(&old);
            }
        }
        Ok(record)
    }

    /// Drops the records of `paths`: after a push the machine refused,
    /// whatever it refused must be read again from the source next time
    /// (say, once a corrupt store path has been repaired).
    fn forget(&self, paths: &[PathInfo], compress: bool) {
        let mut inner = self.lock();
        for info in paths {
            let key = (info.clone(), compress);
            inner.cells.remove(&key);
            if let Some(at) = inner.filled.iter().position(|(k, _)| k == &key)
                && let Some((_, size)) = inner.filled.remove(at)
            {
                inner.bytes -= size;
            }
        }
    }
}

async fn build_record(source: &PathSource, info: &PathInfo, compress: bool) -> Result<Record, PushError> {
    let nar = source.nar(&info.path).await?;
    let info = info.clone();
    tokio::task::spawn_blocking(move || {
        let record = serve::add_to_store_nar(&info, &nar, now());
        let bytes = if compress { zstd_frame(&record, &info.path.to_string())? } else { record };
        Ok(Record { bytes: bytes.into() })
    })
    .await
    .map_err(|e| PushError::Compress { path: String::new(), reason: e.to_string() })?
}

fn zstd_frame(bytes: &[u8], what: &str) -> Result<Vec<u8>, PushError> {
    zstd::bulk::compress(bytes, ZSTD_LEVEL)
        .map_err(|e| PushError::Compress { path: what.to_owned(), reason: e.to_string() })
}

/// A closure as a machine has it: the paths it lacks, in dependency order,
/// and the serve connection that keeps the ones it has from garbage
/// collection until released (once the machine's profile refers to them).
pub struct Survey {
    pub serve: ServeConnection,
    pub missing: Vec<PathInfo>,
}

/// Reads the closure of `root` while the serve connection starts, then
/// asks the machine which paths it has: the handshake and the question go
/// in one round trip.
pub async fn survey(session: &Session, source: &PathSource, root: &StorePath) -> Result<Survey, PushError> {
    let (closure, serve) = tokio::join!(source.closure(root), ServeConnection::open(session));
    let mut serve = serve?;
    let closure = match closure {
        Ok(closure) => closure,
        Err(err) => {
            serve.release().await;
            return Err(err);
        }
    };
    let missing = missing_paths(&mut serve, &closure).await?;
    Ok(Survey { serve, missing })
}

/// The paths of `closure` the machine lacks, in the same (dependency) order.
/// The connection holds a temporary GC root on the ones it has until closed.
async fn missing_paths(conn: &mut ServeConnection, closure: &[PathInfo]) -> Result<Vec<PathInfo>, PushError> {
    let valid = conn.query_valid_paths(closure.iter().map(|i| &i.path), true).await?;
    Ok(closure.iter().filter(|i| !valid.contains(&i.path)).cloned().collect())
}

/// Pushes of at most this much NAR go uncompressed on the connection the
/// survey opened: at 100 Mbit/s, compressing 2 MiB to a third saves about
/// what the second connection's channel and command cost in round trips.
const SMALL_PUSH_BYTES: u64 = 2 << 20;

/// Where the records go: the survey's own connection, or a connection of
/// their own that decompresses first.
enum Sink<'a> {
    Open(&'a mut ServeConnection),
    Compressed(RemoteProcess),
}

impl Sink<'_> {
    async fn send(&mut self, record: bytes::Bytes) -> Result<(), ServeError> {
        match self {
            Self::Open(conn) => conn.send_record(record).await,
            Self::Compressed(process) => {
                if let Err(err) = process.send(record).await {
                    // The command on the machine died mid-stream: what it said is the cause.
                    process.wait_ended().await;
                    return Err(process.ended().map_or(err.into(), ServeError::remote));
                }
                Ok(())
            }
        }
    }

    /// Reads the machine's answers: every path added.
    async fn finish(self, paths: usize) -> Result<(), ServeError> {
        match self {
            Self::Open(conn) => conn.added(paths).await,
            Self::Compressed(process) => {
                let out = process.finish().await?;
                if out.status != Some(0) {
                    return Err(ServeError::remote(&out));
                }
                serve::check_add_replies(&out.stdout, paths)
            }
        }
    }
}

/// Sends one large path as it is read from the source, never whole in
/// memory: its AddToStoreNar header, then its NAR in pieces (one zstd
/// frame when compressing). Returns the bytes sent.
async fn stream(sink: &mut Sink<'_>, source: &PathSource, info: &PathInfo, compress: bool) -> Result<u64, PushError> {
    let what = info.path.to_string();
    let header = serve::add_to_store_nar_header(info, info.nar_size, now());
    let header = if compress { zstd_frame(&header, &what)? } else { header };
    let mut sent = header.len() as u64;
    sink.send(header.into()).await?;
    let (tx, rx) = mpsc::channel(4);
    let chunks = Chunks { tx, buf: Vec::with_capacity(CHUNK_BYTES) };
    let compress_error = |e: std::io::Error| PushError::Compress { path: what.clone(), reason: e.to_string() };
    let out = if compress {
        Outgoing::Compressed(zstd::stream::write::Encoder::new(chunks, ZSTD_LEVEL).map_err(compress_error)?)
    } else {
        Outgoing::Plain(chunks)
    };
    let producing = async {
        let out = source.nar_into(&info.path, out).await?;
        tokio::task::spawn_blocking(move || out.finish())
            .await
            .map_err(|e| PushError::Compress { path: what.clone(), reason: e.to_string() })?
            .map_err(compress_error)
    };
    // Whichever side stops first ends the other: the receiver, dropped
    // with this block, stops the writer; a finished writer ends the loop.
    let sending = async {
        let mut rx = rx;
        while let Some(chunk) = rx.recv().await {
            sent += chunk.len() as u64;
            sink.send(chunk).await?;
        }
        Ok::<_, PushError>(())
    };
    let (produced, sending) = tokio::join!(producing, sending);
    // The machine's own words first: a writer cut off by a failed send only says "stopped".
    sending?;
    produced?;
    Ok(sent)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Sends `missing` (in dependency order) without waiting between paths:
/// a small push (or any, when the machine has no zstd) on `serve`, the
/// connection that asked which paths were missing, so it costs no new
/// channel and keeps the added paths from garbage collection with the
/// rest; a larger one zstd-compressed on a connection of its own.
pub async fn import(
    session: &Session,
    serve: &mut ServeConnection,
    source: &PathSource,
    missing: &[PathInfo],
    compress: bool,
    cache: &RecordCache,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<PushStats, PushError> {
    let mut stats = PushStats::default();
    if missing.is_empty() {
        return Ok(stats);
    }
    let mut done = Progress {
        paths_total: missing.len() as u64,
        bytes_total: missing.iter().map(|i| i.nar_size).sum(),
        ..Progress::default()
    };
    let compress = compress && done.bytes_total > SMALL_PUSH_BYTES;
    let mut sink = if compress {
        let mut process = session.spawn("zstd -dcq | nix-store --serve --write").await?;
        let header = zstd_frame(&serve::client_hello(), "the request")?;
        stats.wire_bytes += header.len() as u64;
        process.send(header).await?;
        Sink::Compressed(process)
    } else {
        Sink::Open(serve)
    };
    progress(done);
    // Indices, not references: a closure over `&PathInfo` would not be Send here.
    let prepare = |i: usize| async move {
        if missing[i].nar_size > STREAM_BYTES {
            Ok(None)
        } else {
            cache.get(source, &missing[i], compress).await.map(Some)
        }
    };
    let mut records = futures::stream::iter(0..missing.len()).map(prepare).buffered(LOOKAHEAD);
    let mut sizes = missing.iter().map(|i| i.nar_size);
    let mut next = missing.iter();
    let sent = async {
        while let Some(record) = records.try_next().await? {
            let info = next.next().expect("one record per path");
            stats.wire_bytes += match record {
                Some(record) => {
                    sink.send(record.bytes.clone()).await?;
                    record.bytes.len() as u64
                }
                None => stream(&mut sink, source, info, compress).await?,
            };
            done.paths_done += 1;
            done.bytes_done += sizes.next().unwrap_or(0);
            progress(done);
        }
        sink.finish(missing.len()).await.map_err(PushError::from)
    };
    if let Err(err) = sent.await {
        cache.forget(missing, compress);
        return Err(err);
    }
    stats.paths = done.paths_done;
    stats.nar_bytes = done.bytes_done;
    Ok(stats)
}
