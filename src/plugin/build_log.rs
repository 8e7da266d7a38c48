//! `kubectl nixops build-log`: the whole log of a Machine's last build
//! (status.build), read from the machine that built it (the Network's
//! builder, or the machine itself) over SSH with that Machine's KeyPair,
//! jump host and pinned host key, as the other commands connect.

use std::io::Write as _;

use kube::ResourceExt;

use super::{Kube, PluginError, Result, connect};
use crate::api::build::BuildRecord;
use crate::nix::activation::shell_quote;
use crate::nix::build::{KEEP_LOGS, is_log_path};

/// The exit status of [`show_script`] when the log is not there.
const GONE: u32 = 44;

/// Prints the log at `path`, or exits with [`GONE`].
pub fn show_script(path: &str) -> String {
    let path = shell_quote(path);
    format!("[ -f {path} ] || exit {GONE}\nexec cat -- {path}")
}

/// Pure: the Machine holding the log of `record`, made for Machine `name`,
/// and the log's path; or why there is none.
pub fn locate<'r>(name: &str, record: Option<&'r BuildRecord>) -> Result<(String, &'r str)> {
    let record = record.ok_or_else(|| {
        PluginError::Usage(format!(
            "Machine {name} has no build: status.build is empty (no spec.nixos.build, or its first build has not started)"
        ))
    })?;
    let path = record.log_path.as_deref().ok_or_else(|| {
        PluginError::Failed(format!(
            "the build of {} for Machine {name} records no log (status.build.logPath): it was made by an operator \
             that kept none; the end of the log is in status.build.message and the BuildFailed event",
            record.rev
        ))
    })?;
    if !is_log_path(path) {
        return Err(PluginError::Failed(format!(
            "Machine {name}'s status.build.logPath {path:?} is not a build log's path; refusing to read it"
        )));
    }
    Ok((record.builder.clone().unwrap_or_else(|| name.to_owned()), path))
}

pub async fn show(kube: &Kube, name: &str) -> Result<()> {
    let machine = kube.machine(name).await?;
    let record = machine.status.as_ref().and_then(|s| s.build.clone());
    let (holder, path) = locate(name, record.as_ref())?;
    let record = record.as_ref().expect("located");
    let holder_machine = if holder == machine.name_any() {
        machine.clone()
    } else {
        kube.machines().get_opt(&holder).await?.ok_or_else(|| {
            PluginError::Failed(format!(
                "the log of {name}'s build of {} is on builder Machine {holder}, which no longer exists",
                record.rev
            ))
        })?
    };
    let route = connect::route(kube, &holder_machine).await?;
    let session = connect::session(&route).await?;
    let out = session.exec(&show_script(path)).await.map_err(|e| PluginError::Failed(e.to_string()))?;
    session.close().await;
    match out.status {
        Some(0) => {
            // A closed pipe (`| head`) is not an error.
            let _ = std::io::stdout().write_all(&out.stdout);
            Ok(())
        }
        Some(GONE) => Err(PluginError::Failed(format!(
            "the log of {name}'s build of {} ({path} on {holder}) is gone: {holder} keeps the last {KEEP_LOGS} \
             logs of each followed ref or pinned rev, and a build waiting for a slot has none yet",
            record.rev
        ))),
        other => Err(PluginError::Failed(format!(
            "reading {path} on {holder} failed (exit {other:?}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::build::BuildResult;
    use crate::nix::build::log_path;

    fn record(builder: Option<&str>, log: Option<String>) -> BuildRecord {
        BuildRecord {
            rev: "1".repeat(40),
            source: "file:///r#x".into(),
            closure: None,
            builder: builder.map(str::to_owned),
            started_at: None,
            finished_at: None,
            result: BuildResult::Failed,
            message: None,
            log_path: log,
            spec_generation: None,
        }
    }

    #[test]
    fn the_log_is_on_the_builder_or_the_machine() {
        let path = log_path("a-b-c");
        let on_builder = record(Some("builder"), Some(path.clone()));
        assert_eq!(locate("web", Some(&on_builder)).unwrap(), ("builder".to_owned(), path.as_str()));
        let on_itself = record(None, Some(path.clone()));
        assert_eq!(locate("web", Some(&on_itself)).unwrap().0, "web");
        assert!(matches!(locate("web", None), Err(PluginError::Usage(_))));
        assert!(matches!(locate("web", Some(&record(None, None))), Err(PluginError::Failed(_))));
        let elsewhere = record(None, Some("/etc/shadow".into()));
        assert!(matches!(locate("web", Some(&elsewhere)), Err(PluginError::Failed(_))));
        let sh = std::process::Command::new("sh").args(["-n", "-c", &show_script(&path)]).output().unwrap();
        assert!(sh.status.success());
    }
}
