//! What `kubectl nixops` asks of the operator — check, reboot, deploy — and
//! waiting for its answer in the Machine's status.
//!
//! A check or reboot is an annotation (`nixops.io/check`,
//! `nixops.io/reboot`) whose value names the request; the operator answers
//! in status.lastCheck / lastReboot with that name. A deploy is a change of
//! spec.nixos.closure, followed through status.lastDeploy.

use std::io::Write as _;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, Patch};
use serde::Serialize;

use super::output::{self, Cell, Tone};
use super::{Format, Kube, PluginError, Result, generations, request_id};
use crate::api::condition::READY;
use crate::api::machine::{
    CHECK_ANNOTATION, CheckRecord, CheckResult, DRY_ACTIVATE_ANNOTATION, DRY_ACTIVATE_CLOSURE_ANNOTATION, DeployRecord,
    REBOOT_ANNOTATION, RebootResult, deploy_result,
};
use crate::api::{Machine, Network};
use crate::controller::deploy::{deploy_failed, is_up_to_date};
use crate::controller::status::is_true;

const POLL: Duration = Duration::from_millis(500);

fn api_of(kube: &Kube, machine: &Machine) -> Api<Machine> {
    Api::namespaced(kube.client.clone(), &machine.namespace().unwrap_or_default())
}

/// Sets `annotations` (name → value) on `machine`: how the plugin asks the operator.
async fn annotate(kube: &Kube, machine: &Machine, annotations: &[(&str, &str)]) -> Result<()> {
    let annotations: serde_json::Map<String, serde_json::Value> =
        annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).into())).collect();
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    api_of(kube, machine).patch(&machine.name_any(), &super::patch_params(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Why a machine has not answered: its Ready condition's message.
fn waiting_for(machine: &Machine) -> String {
    let ready = machine.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    ready.map(|c| format!("Ready={} ({})", c.status, c.message)).unwrap_or_else(|| "no status yet".into())
}

/// One machine's answer to a check.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckAnswer {
    pub namespace: String,
    pub machine: String,
    pub check: CheckRecord,
}

/// Pure: the check table, as NixOps check printed it.
pub fn render_checks(answers: &[CheckAnswer], colour: bool) -> String {
    let rows: Vec<Vec<Cell>> = answers
        .iter()
        .map(|a| {
            let c = &a.check;
            let units = if c.failed_units.is_empty() {
                Cell::toned("ok", Tone::Good)
            } else {
                Cell::toned(c.failed_units.join(","), Tone::Bad)
            };
            let disk = match (c.nix_free_bytes, c.nix_size_bytes) {
                (Some(free), Some(size)) if size > 0 => {
                    format!("{} free ({}%)", output::bytes(free), free.saturating_mul(100) / size)
                }
                (Some(free), _) => format!("{} free", output::bytes(free)),
                _ => "-".into(),
            };
            let result = match c.result {
                CheckResult::Healthy => Cell::toned("Healthy", Tone::Good),
                CheckResult::Degraded => Cell::toned("Degraded", Tone::Bad),
            };
            vec![
                Cell::plain(&a.machine),
                result,
                if c.in_sync { Cell::toned("yes", Tone::Good) } else { Cell::toned("no", Tone::Bad) },
                units,
                Cell::plain(c.load.as_deref().unwrap_or("-")),
                Cell::plain(disk),
                Cell::plain(c.message.as_deref().unwrap_or("")),
            ]
        })
        .collect();
    output::table(&["MACHINE", "RESULT", "IN SYNC", "FAILED UNITS", "LOAD", "/NIX", "NOTES"], &rows, colour)
}

/// `kubectl nixops check`: asks for a check of each machine, waits for the
/// answers, prints them; fails when one is degraded or missing.
pub async fn check(kube: &Kube, machines: Vec<Machine>, timeout: Duration, format: Option<Format>) -> Result<()> {
    if machines.is_empty() {
        return Err(PluginError::Usage(format!("no machines in namespace {}", kube.namespace)));
    }
    let request = request_id();
    for machine in &machines {
        annotate(kube, machine, &[(CHECK_ANNOTATION, &request)]).await?;
    }
    let deadline = Instant::now() + timeout;
    let mut answers = Vec::new();
    let mut missing = Vec::new();
    for machine in &machines {
        let api = api_of(kube, machine);
        let name = machine.name_any();
        let answered = wait_until(&api, &name, deadline, |m| {
            m.status.as_ref()?.last_check.clone().filter(|c| c.request == request)
        })
        .await?;
        match answered {
            Ok(check) => {
                answers.push(CheckAnswer { namespace: machine.namespace().unwrap_or_default(), machine: name, check })
            }
            Err(latest) => missing.push(format!("{name}: {}", waiting_for(&latest))),
        }
    }
    if !output::structured(format, &answers)? {
        print!("{}", render_checks(&answers, output::colour_enabled()));
    }
    if !missing.is_empty() {
        return Err(PluginError::Timeout(format!(
            "no answer within {} s from {}",
            timeout.as_secs(),
            missing.join("; ")
        )));
    }
    let degraded: Vec<&str> =
        answers.iter().filter(|a| a.check.result != CheckResult::Healthy).map(|a| a.machine.as_str()).collect();
    if !degraded.is_empty() {
        return Err(PluginError::Failed(format!("degraded: {}", degraded.join(", "))));
    }
    Ok(())
}

/// Polls object `name` until `answer` finds something in it: Ok(answer), or
/// Err(the last copy seen) past the deadline.
pub(super) async fn wait_until<K, T>(
    api: &Api<K>,
    name: &str,
    deadline: Instant,
    answer: impl Fn(&K) -> Option<T>,
) -> Result<Result<T, K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    loop {
        let machine = api.get(name).await?;
        if let Some(found) = answer(&machine) {
            return Ok(Ok(found));
        }
        if Instant::now() >= deadline {
            return Ok(Err(machine));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `kubectl nixops reboot MACHINE | --network N [--wait]`. A Network's
/// members go in groups of its rollout's maxUnavailable (one without a
/// rollout policy), each group waited for; a failure stops the rest.
pub async fn reboot(
    kube: &Kube,
    machine: Option<&str>,
    network: Option<&str>,
    wait: bool,
    timeout: Duration,
) -> Result<()> {
    let (machines, group) = match (machine, network) {
        (Some(name), _) => (vec![kube.machine(name).await?], 1),
        (None, Some(network)) => {
            let spec =
                Api::<Network>::namespaced(kube.client.clone(), &kube.namespace).get_opt(network).await?.ok_or_else(
                    || PluginError::Usage(format!("Network {network} not found in namespace {}", kube.namespace)),
                )?;
            let max = spec.spec.rollout.as_ref().map_or(1, |r| r.max_unavailable.max(1) as usize);
            let Kube { client, namespace, .. } = kube;
            let scoped = Kube { client: client.clone(), namespace: namespace.clone(), all_namespaces: false };
            (scoped.list_machines(Some(network)).await?, max)
        }
        (None, None) => return Err(PluginError::Usage("name a machine or give --network".into())),
    };
    let wait = wait || machines.len() > group;
    for batch in machines.chunks(group) {
        let request = request_id();
        for machine in batch {
            annotate(kube, machine, &[(REBOOT_ANNOTATION, &request)]).await?;
            println!("{}: reboot requested ({REBOOT_ANNOTATION}={request})", machine.name_any());
        }
        if !wait {
            continue;
        }
        let deadline = Instant::now() + timeout;
        for machine in batch {
            let name = machine.name_any();
            let answered = wait_until(&api_of(kube, machine), &name, deadline, |m| {
                let status = m.status.as_ref()?;
                let reboot = status.last_reboot.clone().filter(|r| r.request == request)?;
                (reboot.result != RebootResult::Rebooting).then(|| (reboot, status.last_check.clone()))
            })
            .await?;
            let (record, check) = answered.map_err(|latest| {
                PluginError::Timeout(format!(
                    "{name} not back within {} s: {}",
                    timeout.as_secs(),
                    waiting_for(&latest)
                ))
            })?;
            let message = record.message.unwrap_or_default();
            if record.result != RebootResult::Succeeded {
                return Err(PluginError::Failed(format!("{name}: reboot failed: {message}")));
            }
            println!("{name}: rebooted, {message}");
            if let Some(check) = check.filter(|c| c.request == request) {
                let answer = CheckAnswer { namespace: machine.namespace().unwrap_or_default(), machine: name, check };
                print!("{}", render_checks(std::slice::from_ref(&answer), output::colour_enabled()));
            }
        }
    }
    Ok(())
}

/// `kubectl nixops deploy MACHINE [--closure P] --dry-activate`: asks the
/// operator for a dry activation, prints what it said; fails when it failed.
pub async fn dry_activate(kube: &Kube, name: &str, closure: Option<&str>, timeout: Duration) -> Result<()> {
    let machine = kube.machine(name).await?;
    let closure =
        match closure {
            Some(c) => c.to_owned(),
            None => machine.spec.nixos.as_ref().map(|n| n.closure.clone()).ok_or_else(|| {
                PluginError::Usage(format!("Machine {name} has no spec.nixos.closure: give --closure"))
            })?,
        };
    let request = request_id();
    annotate(kube, &machine, &[(DRY_ACTIVATE_ANNOTATION, &request), (DRY_ACTIVATE_CLOSURE_ANNOTATION, &closure)])
        .await?;
    let deadline = Instant::now() + timeout;
    let answer = wait_until(&api_of(kube, &machine), name, deadline, |m| {
        m.status.as_ref()?.last_dry_activation.clone().filter(|d| d.request == request)
    })
    .await?
    .map_err(|latest| {
        PluginError::Timeout(format!(
            "{name}: no dry activation within {} s: {}",
            timeout.as_secs(),
            waiting_for(&latest)
        ))
    })?;
    println!("{name}: switch-to-configuration dry-activate of {}:", answer.closure);
    println!("{}", answer.output);
    if !answer.succeeded {
        return Err(PluginError::Failed(format!("{name}: the dry activation failed")));
    }
    Ok(())
}

/// What `kubectl nixops deploy` was asked.
pub struct Deploy<'a> {
    pub machine: Option<&'a str>,
    pub network: Option<&'a str>,
    pub closure: Option<&'a str>,
    pub force: bool,
    pub wait: Option<Duration>,
}

pub async fn deploy(kube: &Kube, args: Deploy<'_>) -> Result<()> {
    let names: Vec<String> = match (args.machine, args.network) {
        (Some(name), _) => {
            let machine = kube.machine(name).await?;
            if let Some(closure) = args.closure
                && !generations::set_closure(kube, &machine, closure, args.force).await?
            {
                return Ok(());
            }
            vec![name.to_owned()]
        }
        (None, Some(network)) => kube.list_machines(Some(network)).await?.iter().map(ResourceExt::name_any).collect(),
        (None, None) => return Err(PluginError::Usage("name a machine or give --network".into())),
    };
    match args.wait {
        Some(timeout) => follow_deploys(kube, names, timeout).await,
        None => {
            for name in names {
                let machine = kube.machine(&name).await?;
                println!("{}", progress_line(&machine, 0));
            }
            Ok(())
        }
    }
}

/// Where a machine's deployment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Waiting,
    Done,
    Failed,
}

/// Pure: whether `machine` runs its desired closure for its current spec,
/// failed to, or is still on its way.
pub fn progress(machine: &Machine) -> Progress {
    let observed = machine.status.as_ref().and_then(|s| s.observed_generation);
    if observed != machine.metadata.generation {
        return Progress::Waiting;
    }
    if deploy_failed(machine) {
        Progress::Failed
    } else if is_up_to_date(machine) && machine.status.as_ref().is_some_and(|s| is_true(&s.conditions, READY)) {
        Progress::Done
    } else {
        Progress::Waiting
    }
}

/// Pure: one line of progress: name, result, a bar of the bytes pushed.
pub fn progress_line(machine: &Machine, name_width: usize) -> String {
    let name = machine.name_any();
    let record: DeployRecord = machine.status.as_ref().and_then(|s| s.last_deploy.clone()).unwrap_or_default();
    let progress = progress(machine);
    let state = match progress {
        Progress::Done => "Deployed".to_owned(),
        Progress::Failed => record.result.clone().unwrap_or_else(|| "Failed".into()),
        Progress::Waiting => record
            .result
            .clone()
            .filter(|r| r == deploy_result::PUSHING || r == deploy_result::ACTIVATING)
            .unwrap_or_else(|| "Waiting".into()),
    };
    let bar = if record.bytes_total > 0 {
        let width = 20;
        let filled = ((record.bytes_copied.max(0) as f64 / record.bytes_total as f64) * width as f64).round() as usize;
        let filled = filled.min(width);
        format!(
            " [{}{}] {}/{} paths, {} of {}",
            "#".repeat(filled),
            " ".repeat(width - filled),
            record.paths_copied,
            record.paths_total,
            output::bytes(record.bytes_copied),
            output::bytes(record.bytes_total)
        )
    } else {
        String::new()
    };
    let note = match progress {
        Progress::Failed => format!(": {}", record.message.unwrap_or_default()),
        Progress::Done => {
            format!(" {}", machine.status.as_ref().and_then(|s| s.closure_short.clone()).unwrap_or_default())
        }
        Progress::Waiting => String::new(),
    };
    format!("{name:name_width$}  {state:<10}{bar}{note}")
}

/// Follows the deployments of `names` until each runs its closure or
/// failed; a progress line per machine (redrawn on a terminal). Fails when
/// one failed or rolled back, or time ran out.
pub async fn follow_deploys(kube: &Kube, names: Vec<String>, timeout: Duration) -> Result<()> {
    let api = kube.machines();
    let width = names.iter().map(String::len).max().unwrap_or(0);
    let redraw = output::colour_enabled();
    let deadline = Instant::now() + timeout;
    let mut printed: Vec<String> = Vec::new();
    loop {
        let mut machines = Vec::new();
        for name in &names {
            machines.push(api.get(name).await?);
        }
        let lines: Vec<String> = machines.iter().map(|m| progress_line(m, width)).collect();
        if lines != printed {
            let mut out = std::io::stdout().lock();
            if redraw && !printed.is_empty() {
                // Back to the first line of the block, then over it.
                let _ = write!(out, "\x1b[{}A", printed.len());
            }
            for (i, line) in lines.iter().enumerate() {
                if redraw || printed.get(i) != Some(line) {
                    let _ = writeln!(out, "{}{line}", if redraw { "\x1b[2K" } else { "" });
                }
            }
            let _ = out.flush();
            printed = lines;
        }
        let states: Vec<Progress> = machines.iter().map(progress).collect();
        if states.iter().all(|s| *s != Progress::Waiting) {
            let failed: Vec<String> = machines
                .iter()
                .zip(&states)
                .filter(|(_, s)| **s == Progress::Failed)
                .map(|(m, _)| m.name_any())
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            return Err(PluginError::Failed(format!("deployment failed on {}", failed.join(", "))));
        }
        if Instant::now() >= deadline {
            return Err(PluginError::Timeout(format!("deployments not finished within {} s", timeout.as_secs())));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/00000000000000000000000000000000-nixos-system-a";

    fn machine(generation: i64, status: serde_json::Value) -> Machine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine",
            "metadata": {"name": "web-1", "namespace": "prod", "generation": generation},
            "spec": {"networkRef": {"name": "net"}, "nixos": {"closure": A}},
            "status": status,
        }))
        .unwrap()
    }

    fn ready() -> serde_json::Value {
        serde_json::json!([{"type": "Ready", "status": "True", "reason": "Deployed", "message": "", "lastTransitionTime": "1970-01-01T00:00:00Z"}])
    }

    #[test]
    fn a_deploy_is_followed_to_its_end_for_the_current_spec() {
        let pushing = machine(
            2,
            serde_json::json!({"observedGeneration": 2, "lastDeploy": {
            "closure": A, "result": "Pushing", "pathsCopied": 1, "pathsTotal": 4, "bytesCopied": 512, "bytesTotal": 1024, "specGeneration": 2}}),
        );
        assert_eq!(progress(&pushing), Progress::Waiting);
        let line = progress_line(&pushing, 6);
        assert!(line.contains("Pushing") && line.contains("[##########          ] 1/4 paths"), "{line}");
        let stale = machine(
            3,
            serde_json::json!({"observedGeneration": 2, "closure": A, "conditions": ready(),
            "lastDeploy": {"closure": A, "result": "Succeeded", "specGeneration": 2}}),
        );
        assert_eq!(progress(&stale), Progress::Waiting, "status of an older spec");
        let done = machine(
            2,
            serde_json::json!({"observedGeneration": 2, "closure": A, "conditions": ready(),
            "lastDeploy": {"closure": A, "result": "Succeeded", "specGeneration": 2}}),
        );
        assert_eq!(progress(&done), Progress::Done);
        let failed = machine(
            2,
            serde_json::json!({"observedGeneration": 2,
            "lastDeploy": {"closure": A, "result": "RolledBack", "message": "health check failed", "specGeneration": 2}}),
        );
        assert_eq!(progress(&failed), Progress::Failed);
        assert!(
            progress_line(&failed, 0).contains("RolledBack")
                && progress_line(&failed, 0).ends_with(": health check failed")
        );
    }

    #[test]
    fn checks_print_like_nixops_check() {
        let answer = CheckAnswer {
            namespace: "prod".into(),
            machine: "web-1".into(),
            check: CheckRecord {
                request: "1".into(),
                result: CheckResult::Degraded,
                message: Some("failed units: x.service".into()),
                failed_units: vec!["x.service".into()],
                in_sync: true,
                load: Some("0.10 0.20 0.30".into()),
                nix_free_bytes: Some(1 << 30),
                nix_size_bytes: Some(4 << 30),
                ..CheckRecord::default()
            },
        };
        let text = render_checks(&[answer], false);
        assert!(text.lines().nth(1).unwrap().contains("Degraded   yes       x.service"), "{text}");
        assert!(text.contains("1.0 GiB free (25%)"), "{text}");
    }
}
