//! `kubectl nixops info [NETWORK]`: the fleet at a glance, as NixOps info.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use super::output::{self, Cell, Tone};
use super::{Format, Kube, Result};
use crate::api::Machine;
use crate::api::condition::{READY, RECONCILING, STALLED};
use crate::api::machine::{DeployRecord, deploy_result};

/// One machine, as `info` shows it (and prints with -o json|yaml).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MachineInfo {
    pub namespace: String,
    pub name: String,
    pub network: String,
    pub provider: Option<String>,
    pub provider_id: Option<String>,
    pub address: Option<String>,
    pub phase: Option<String>,
    pub ready: Option<bool>,
    /// The closure active on the machine.
    pub closure: Option<String>,
    pub closure_short: Option<String>,
    /// The closure spec.nixos asks for.
    pub desired_closure: Option<String>,
    pub generation: Option<i64>,
    pub last_deploy: Option<DeployRecord>,
    pub host_key: Option<String>,
    /// Conditions that are not as a healthy machine has them: "Type=Status: message".
    pub conditions: Vec<String>,
}

/// Pure: what `info` shows of `machine`.
pub fn machine_info(machine: &Machine) -> MachineInfo {
    let status = machine.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().find(|c| c.type_ == READY).map(|c| c.status == "True");
    // A healthy machine has every condition True except Reconciling and
    // Stalled, which it has False (or not at all).
    let conditions = status
        .conditions
        .iter()
        .filter(|c| {
            let bad_when_true = c.type_ == RECONCILING || c.type_ == STALLED;
            (c.status == "True") == bad_when_true
        })
        .map(|c| format!("{}={}: {}", c.type_, c.status, c.message))
        .collect();
    MachineInfo {
        namespace: machine.namespace().unwrap_or_default(),
        name: machine.name_any(),
        network: machine.spec.network_ref.name.clone(),
        provider: status.provider.clone(),
        provider_id: status.provider_id.clone(),
        address: status.addresses.first().map(|a| a.address.clone()),
        phase: status.phase.map(|p| format!("{p:?}")),
        ready,
        closure: status.closure.clone(),
        closure_short: status.closure_short.clone(),
        desired_closure: machine.spec.nixos.as_ref().map(|n| n.closure.clone()),
        generation: status.generation,
        last_deploy: status.last_deploy.clone(),
        host_key: status.host_key.clone(),
        conditions,
    }
}

/// Pure: the table of `machines` (wide adds provider ID, desired closure
/// and host key fingerprint).
pub fn render(machines: &[MachineInfo], all_namespaces: bool, wide: bool, colour: bool, now: Timestamp) -> String {
    let mut headers = Vec::new();
    if all_namespaces {
        headers.push("NAMESPACE");
    }
    headers.extend([
        "NETWORK",
        "MACHINE",
        "PROVIDER",
        "ADDRESS",
        "READY",
        "CLOSURE",
        "GEN",
        "LAST DEPLOY",
        "CONDITIONS",
    ]);
    if wide {
        headers.extend(["PROVIDER-ID", "DESIRED", "HOST KEY"]);
    }
    let dash = |s: Option<&str>| s.filter(|s| !s.is_empty()).unwrap_or("-").to_owned();
    let rows: Vec<Vec<Cell>> = machines
        .iter()
        .map(|m| {
            let mut row = Vec::new();
            if all_namespaces {
                row.push(Cell::plain(&m.namespace));
            }
            let ready = match (m.ready, m.phase.as_deref()) {
                (Some(true), _) => Cell::toned("True", Tone::Good),
                (_, Some("Failed")) => Cell::toned("Failed", Tone::Bad),
                (Some(false), _) => Cell::toned(format!("False ({})", dash(m.phase.as_deref())), Tone::Busy),
                (None, _) => Cell::plain("-"),
            };
            let last = match &m.last_deploy {
                None => Cell::plain("-"),
                Some(d) => {
                    let result = d.result.as_deref().unwrap_or("-");
                    let tone = match result {
                        deploy_result::SUCCEEDED => Tone::Good,
                        deploy_result::FAILED | deploy_result::ROLLED_BACK => Tone::Bad,
                        _ => Tone::Busy,
                    };
                    let when = output::age(d.finished_at.as_ref().or(d.started_at.as_ref()), now);
                    Cell::toned(format!("{result} {when} ago"), tone)
                }
            };
            let conditions = if m.conditions.is_empty() {
                Cell::toned("ok", Tone::Good)
            } else {
                let tone =
                    if m.conditions.iter().any(|c| c.starts_with("Stalled=True")) { Tone::Bad } else { Tone::Busy };
                let text = m.conditions.join("; ");
                let text = if wide || text.chars().count() <= 80 {
                    text
                } else {
                    format!("{}…", text.chars().take(79).collect::<String>())
                };
                Cell::toned(text, tone)
            };
            row.extend([
                Cell::plain(&m.network),
                Cell::plain(&m.name),
                Cell::plain(dash(m.provider.as_deref())),
                Cell::plain(dash(m.address.as_deref())),
                ready,
                Cell::plain(dash(if wide { m.closure.as_deref() } else { m.closure_short.as_deref() })),
                Cell::plain(m.generation.map_or("-".into(), |g| g.to_string())),
                last,
                conditions,
            ]);
            if wide {
                let fingerprint = m
                    .host_key
                    .as_deref()
                    .and_then(|k| crate::ssh::HostKey::parse(k, "status.hostKey").ok())
                    .map(|k| k.fingerprint());
                row.extend([
                    Cell::plain(dash(m.provider_id.as_deref())),
                    Cell::plain(dash(m.desired_closure.as_deref())),
                    Cell::plain(dash(fingerprint.as_deref())),
                ]);
            }
            row
        })
        .collect();
    output::table(&headers, &rows, colour)
}

pub async fn run(kube: &Kube, network: Option<&str>, format: Option<Format>) -> Result<()> {
    let machines: Vec<MachineInfo> = kube.list_machines(network).await?.iter().map(machine_info).collect();
    if output::structured(format, &machines)? {
        return Ok(());
    }
    if machines.is_empty() {
        let scope = if kube.all_namespaces { "any namespace".into() } else { format!("namespace {}", kube.namespace) };
        let of = network.map(|n| format!(" of Network {n}")).unwrap_or_default();
        eprintln!("No machines{of} in {scope}.");
        return Ok(());
    }
    let wide = format == Some(Format::Wide);
    print!("{}", render(&machines, kube.all_namespaces, wide, output::colour_enabled(), Timestamp::now()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine",
            "metadata": {"name": "web-1", "namespace": "prod"},
            "spec": {"networkRef": {"name": "net"}, "nixos": {"closure": "/nix/store/00000000000000000000000000000000-nixos-system-b"}},
            "status": {
                "provider": "existing", "phase": "Failed", "generation": 3,
                "addresses": [{"type": "ExternalIP", "address": "203.0.113.5"}],
                "closure": "/nix/store/11111111111111111111111111111111-nixos-system-a", "closureShort": "1111111-nixos-system-a",
                "lastDeploy": {"closure": "/nix/store/00000000000000000000000000000000-nixos-system-b", "result": "RolledBack",
                               "finishedAt": "1970-01-12T13:46:00Z"},
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "RolledBack", "message": "health check failed", "lastTransitionTime": "1970-01-01T00:00:00Z"},
                    {"type": "Stalled", "status": "True", "reason": "RolledBack", "message": "health check failed", "lastTransitionTime": "1970-01-01T00:00:00Z"},
                    {"type": "Provisioned", "status": "True", "reason": "Provisioned", "message": "answers", "lastTransitionTime": "1970-01-01T00:00:00Z"},
                    {"type": "Reconciling", "status": "False", "reason": "Done", "message": "", "lastTransitionTime": "1970-01-01T00:00:00Z"}
                ]
            }
        }))
        .unwrap()
    }

    #[test]
    fn info_shows_what_is_wrong_and_only_that() {
        let info = machine_info(&machine());
        assert_eq!(info.address.as_deref(), Some("203.0.113.5"));
        assert_eq!(info.ready, Some(false));
        assert_eq!(info.conditions, ["Ready=False: health check failed", "Stalled=True: health check failed"]);
        let now = Timestamp::from_second(1_000_000 + 60).unwrap();
        let text = render(std::slice::from_ref(&info), false, false, false, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NETWORK   MACHINE   PROVIDER"), "{text}");
        assert!(lines[1].contains("web-1") && lines[1].contains("1111111-nixos-system-a"), "{text}");
        assert!(lines[1].contains("Failed") && lines[1].contains("RolledBack 100s ago"), "{text}");
        assert!(!text.contains('\x1b'), "no colour unless asked");
        let coloured = render(&[info], true, true, true, now);
        assert!(coloured.starts_with("NAMESPACE") && coloured.contains("\x1b[31mFailed"), "{coloured}");
    }
}
