//! A machine's Nix store as a closure source: a builder's (or a target's
//! own, after it built its system), read over SSH with the host key the
//! operator pinned for that machine. Path metadata comes over the serve
//! protocol (QueryClosure, QueryPathInfos: one round trip each for the
//! whole closure); each NAR from `nix-store --dump`, one SSH channel per
//! path, so the push's lookahead reads several at once. The push then
//! sends only what the target lacks, and the target's nix-store checks
//! every NAR against the hash the builder recorded.

use std::io::Write;
use std::sync::Arc;

use super::activation::shell_quote;
use super::path_info::dependency_order;
use super::serve::{ServeConnection, ServeError};
use super::{PathInfo, StorePath};
use crate::ssh::Session;

/// The store of a machine reached over an open session.
#[derive(Clone)]
pub struct RemoteStore {
    session: Arc<Session>,
}

impl RemoteStore {
    pub fn new(session: Arc<Session>) -> Self {
        Self { session }
    }

    /// The closure of `root`, references before referrers.
    pub async fn closure(&self, root: &StorePath) -> Result<Vec<PathInfo>, ServeError> {
        let mut serve = ServeConnection::open(&self.session).await?;
        let result = async {
            let paths = serve.query_closure(std::iter::once(root)).await?;
            serve.query_path_infos(paths.iter()).await
        }
        .await;
        serve.release().await;
        let infos = result?;
        if !infos.iter().any(|i| &i.path == root) {
            return Err(ServeError::Protocol(format!("{root} is not valid in {}'s store", self.session.addr())));
        }
        dependency_order(infos).map_err(|e| ServeError::Protocol(format!("{}: {e}", self.session.addr())))
    }

    /// Writes the NAR serialisation of `path` to `out` (on a blocking
    /// thread, as the push's writers expect) and returns `out`.
    pub async fn nar_into<W: Write + Send + 'static>(&self, path: &StorePath, mut out: W) -> Result<W, ServeError> {
        let dumped = self.session.exec(&format!("nix-store --dump {}", shell_quote(&path.to_string()))).await?;
        if dumped.status != Some(0) {
            return Err(ServeError::remote(&dumped));
        }
        tokio::task::spawn_blocking(move || {
            out.write_all(&dumped.stdout)?;
            Ok::<_, std::io::Error>(out)
        })
        .await
        .map_err(|e| ServeError::Protocol(e.to_string()))?
        .map_err(|e| ServeError::Protocol(format!("writing the NAR of {path}: {e}")))
    }
}
