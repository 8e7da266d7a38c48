//! `kubectl nixops list-generations` and `rollback`: the system profile's
//! generations as the machine has them, and going back to one by setting
//! spec.nixos.closure to its closure, so Git, the cluster and the machine
//! agree (NixOps switched the profile behind its state file's back).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Patch;
use serde::Serialize;

use super::output::{self, Cell, Tone};
use super::{Format, Kube, PluginError, Result, connect, requests};
use crate::api::Machine;
use crate::nix::activation::PROFILE;

/// One generation of the system profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Generation {
    pub number: i64,
    /// When it was made (the link's mtime), seconds since the epoch.
    pub created: i64,
    pub closure: String,
    /// The profile points to it (the boot default).
    pub current: bool,
    /// /run/current-system is its closure.
    pub running: bool,
}

/// Lists `<profile>-N-link name, mtime, target`, then the profile's own
/// link and the running system.
pub fn list_script() -> String {
    format!(
        "for l in {PROFILE}-*-link; do [ -e \"$l\" ] || continue; \
         printf 'gen %s %s %s\\n' \"${{l##*/}}\" \"$(stat -c %Y \"$l\")\" \"$(readlink -f \"$l\")\"; done\n\
         printf 'current %s\\n' \"$(readlink {PROFILE} 2>/dev/null)\"\n\
         printf 'running %s\\n' \"$(readlink -f /run/current-system 2>/dev/null)\"\n"
    )
}

/// Reads what [`list_script`] printed, oldest first.
pub fn parse_list(stdout: &str) -> Vec<Generation> {
    let mut generations = Vec::new();
    let mut current = None;
    let mut running = None;
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("gen") => {
                let (Some(link), Some(mtime), Some(closure)) = (words.next(), words.next(), words.next()) else {
                    continue;
                };
                let Some(number) = link_number(link) else { continue };
                generations.push(Generation {
                    number,
                    created: mtime.parse().unwrap_or_default(),
                    closure: closure.to_owned(),
                    current: false,
                    running: false,
                });
            }
            Some("current") => current = words.next().and_then(link_number),
            Some("running") => running = words.next().map(str::to_owned),
            _ => {}
        }
    }
    generations.sort_by_key(|g| g.number);
    for g in &mut generations {
        g.current = Some(g.number) == current;
        g.running = running.as_deref() == Some(g.closure.as_str());
    }
    generations
}

/// `system-12-link` → 12.
fn link_number(link: &str) -> Option<i64> {
    link.rsplit('/').next()?.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
}

/// Which generation to go back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Number(i64),
    /// The one before the current one.
    Previous,
}

/// Pure: the generation `choice` names.
pub fn choose(generations: &[Generation], choice: Choice) -> Result<&Generation, String> {
    let numbers = || generations.iter().map(|g| g.number.to_string()).collect::<Vec<_>>().join(", ");
    match choice {
        Choice::Number(n) => generations
            .iter()
            .find(|g| g.number == n)
            .ok_or_else(|| format!("the machine has no generation {n} (it has {})", numbers())),
        Choice::Previous => {
            let current = generations
                .iter()
                .find(|g| g.current)
                .map(|g| g.number)
                .ok_or("the machine has no current generation")?;
            generations
                .iter()
                .filter(|g| g.number < current)
                .max_by_key(|g| g.number)
                .ok_or_else(|| format!("generation {current} is the oldest; there is none before it"))
        }
    }
}

/// Pure: the GitOps tool that manages `machine`'s spec, if any, from its
/// managed fields (the field managers Argo CD and Flux apply with) and
/// their tracking labels and annotations.
pub fn gitops_manager(machine: &Machine) -> Option<String> {
    let managers = machine.metadata.managed_fields.iter().flatten();
    for entry in managers {
        let manager = entry.manager.as_deref().unwrap_or_default();
        let owns_spec = entry.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").is_some());
        let tool = if manager.starts_with("argocd") {
            "Argo CD"
        } else if matches!(manager, "kustomize-controller" | "helm-controller" | "gotk-sync-manager") {
            "Flux"
        } else {
            continue;
        };
        if owns_spec {
            return Some(format!("{tool} (field manager {manager})"));
        }
    }
    let labels = machine.labels();
    let annotations = machine.annotations();
    if annotations.contains_key("argocd.argoproj.io/tracking-id") || labels.contains_key("argocd.argoproj.io/instance")
    {
        return Some("Argo CD (tracking annotation)".into());
    }
    for label in ["kustomize.toolkit.fluxcd.io/name", "helm.toolkit.fluxcd.io/name"] {
        if labels.contains_key(label) {
            return Some(format!("Flux (label {label})"));
        }
    }
    None
}

/// Pure: the manifest change a GitOps user makes instead of a patch.
pub fn manifest_change(machine: &Machine, closure: &str, why: &str) -> String {
    let old = machine.spec.nixos.as_ref().map(|n| n.closure.as_str()).unwrap_or("(none)");
    format!(
        "# Machine {ns}/{name}: {why}\n\
         # Change its manifest in Git instead (or pass --force to patch the cluster anyway):\n\
         apiVersion: nixops.io/v1alpha1\n\
         kind: Machine\n\
         metadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n  nixos:\n\
         -    closure: {old}\n\
         +    closure: {closure}\n",
        ns = machine.namespace().unwrap_or_default(),
        name = machine.name_any(),
    )
}

/// The machine's generations, read from it over SSH.
pub async fn read(kube: &Kube, machine: &Machine) -> Result<Vec<Generation>> {
    let route = connect::route(kube, machine).await?;
    let session = connect::session(&route).await?;
    let out = session.exec(&list_script()).await.map_err(|e| PluginError::Failed(e.to_string()))?;
    session.close().await;
    if out.status != Some(0) {
        return Err(PluginError::Failed(format!(
            "listing the generations on {} failed: {}",
            route.machine,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_list(&String::from_utf8_lossy(&out.stdout)))
}

pub async fn list(kube: &Kube, name: &str, format: Option<Format>) -> Result<()> {
    let machine = kube.machine(name).await?;
    let generations = read(kube, &machine).await?;
    if output::structured(format, &generations)? {
        return Ok(());
    }
    if generations.is_empty() {
        eprintln!("{name} has no system generations yet.");
        return Ok(());
    }
    let rows: Vec<Vec<Cell>> = generations
        .iter()
        .map(|g| {
            let date = Timestamp::from_second(g.created).map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string());
            let mut notes = Vec::new();
            if g.current {
                notes.push("current");
            }
            if g.running {
                notes.push("running");
            }
            vec![
                Cell::plain(g.number.to_string()),
                Cell::plain(date.unwrap_or_else(|_| "-".into())),
                Cell::plain(&g.closure),
                Cell::toned(notes.join(", "), if g.current { Tone::Good } else { Tone::Plain }),
            ]
        })
        .collect();
    print!("{}", output::table(&["GENERATION", "DATE (UTC)", "CLOSURE", ""], &rows, output::colour_enabled()));
    Ok(())
}

/// Sets spec.nixos.closure to `closure`, unless a GitOps tool manages the
/// Machine (then prints the manifest change); false when it only printed.
pub async fn set_closure(kube: &Kube, machine: &Machine, closure: &str, force: bool) -> Result<bool> {
    if let Some(manager) = gitops_manager(machine).filter(|_| !force) {
        let why = format!("managed by {manager}; a patch would be undone at its next sync");
        print!("{}", manifest_change(machine, closure, &why));
        return Ok(false);
    }
    let patch = serde_json::json!({"spec": {"nixos": {"closure": closure}}});
    kube.machines().patch(&machine.name_any(), &super::patch_params(), &Patch::Merge(&patch)).await?;
    Ok(true)
}

pub async fn rollback(kube: &Kube, name: &str, choice: Choice, force: bool, wait: Option<Duration>) -> Result<()> {
    let machine = kube.machine(name).await?;
    if machine.spec.nixos.is_none() {
        return Err(PluginError::Usage(format!("Machine {name} has no spec.nixos: nothing is deployed to roll back")));
    }
    let generations = read(kube, &machine).await?;
    let target = choose(&generations, choice).map_err(|e| PluginError::Usage(format!("{name}: {e}")))?;
    let closure = target.closure.clone();
    if machine.spec.nixos.as_ref().is_some_and(|n| n.closure == closure) {
        println!("{name}: spec.nixos.closure already is generation {}'s closure {closure}", target.number);
    } else if set_closure(kube, &machine, &closure, force).await? {
        println!("{name}: spec.nixos.closure set to generation {}'s closure {closure}", target.number);
    } else {
        return Ok(());
    }
    if let Some(timeout) = wait {
        requests::follow_deploys(kube, vec![name.to_owned()], timeout).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = "gen system-1-link 100 /nix/store/a-sys\ngen system-3-link 300 /nix/store/c-sys\n\
                          gen system-2-link 200 /nix/store/b-sys\ncurrent system-3-link\nrunning /nix/store/b-sys\n";

    #[test]
    fn the_list_script_is_valid_shell() {
        let out = std::process::Command::new("sh").args(["-n", "-c", &list_script()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn generations_are_read_in_order_with_current_and_running_marked() {
        let g = parse_list(LISTED);
        assert_eq!(g.iter().map(|g| g.number).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(g[2].current && !g[2].running);
        assert!(g[1].running && !g[1].current);
        assert_eq!(g[0].created, 100);
        assert_eq!(choose(&g, Choice::Previous).unwrap().closure, "/nix/store/b-sys");
        assert_eq!(choose(&g, Choice::Number(1)).unwrap().closure, "/nix/store/a-sys");
        assert!(choose(&g, Choice::Number(9)).unwrap_err().contains("it has 1, 2, 3"));
        let oldest = parse_list("gen system-1-link 100 /nix/store/a-sys\ncurrent system-1-link\n");
        assert!(choose(&oldest, Choice::Previous).is_err());
    }

    fn machine(meta: serde_json::Value) -> Machine {
        let mut obj = serde_json::json!({
            "apiVersion": "nixops.io/v1alpha1", "kind": "Machine",
            "metadata": {"name": "web-1", "namespace": "prod"},
            "spec": {"networkRef": {"name": "net"}, "nixos": {"closure": "/nix/store/00000000000000000000000000000000-nixos-system-b"}},
        });
        obj["metadata"].as_object_mut().unwrap().extend(meta.as_object().unwrap().clone());
        serde_json::from_value(obj).unwrap()
    }

    #[test]
    fn gitops_managers_are_told_from_their_fields_and_labels() {
        let managed = |manager: &str, fields: serde_json::Value| {
            machine(serde_json::json!({"managedFields": [
                {"manager": manager, "operation": "Apply", "apiVersion": "nixops.io/v1alpha1", "fieldsType": "FieldsV1", "fieldsV1": fields}
            ]}))
        };
        let spec = serde_json::json!({"f:spec": {"f:nixos": {"f:closure": {}}}});
        assert!(gitops_manager(&managed("argocd-controller", spec.clone())).unwrap().starts_with("Argo CD"));
        assert!(gitops_manager(&managed("kustomize-controller", spec.clone())).unwrap().starts_with("Flux"));
        assert_eq!(gitops_manager(&managed("kubectl-client-side-apply", spec)), None);
        assert_eq!(gitops_manager(&managed("argocd-controller", serde_json::json!({"f:metadata": {}}))), None);
        let labelled = machine(serde_json::json!({"labels": {"kustomize.toolkit.fluxcd.io/name": "apps"}}));
        assert!(gitops_manager(&labelled).unwrap().starts_with("Flux"));
        let change = manifest_change(&labelled, "/nix/store/a", "managed by Flux");
        assert!(change.contains(
            "-    closure: /nix/store/00000000000000000000000000000000-nixos-system-b\n+    closure: /nix/store/a\n"
        ));
    }
}
