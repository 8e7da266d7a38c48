//! The Helm chart against the real helm (built from Go modules by
//! hack/helm) and the real API server: lint, render, server-side dry run,
//! install, upgrade, and RBAC that allows what the operator does and
//! nothing else; and kube-score (hack/kube-score) on what it renders.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn helm_binary() -> &'static PathBuf {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| support::go_tool("hack/helm/build.sh"))
}

fn kube_score_binary() -> &'static PathBuf {
    static KUBE_SCORE: OnceLock<PathBuf> = OnceLock::new();
    KUBE_SCORE.get_or_init(|| support::go_tool("hack/kube-score/build.sh"))
}

fn chart() -> PathBuf {
    support::repo_root().join("charts/nixops-operator")
}

/// helm with its own empty home, against `kubeconfig`.
fn helm_with(args: &[&str], kubeconfig: &Path) -> Output {
    let home = tempfile::tempdir().expect("helm home");
    Command::new(helm_binary())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm")
}

/// helm against the test control plane.
fn helm(args: &[&str]) -> Output {
    helm_with(args, &support::control_plane().kubeconfig)
}

/// The chart rendered with `set` (`helm template` needs no cluster).
fn render(set: &str) -> String {
    let chart = chart();
    let mut args = vec!["template", "nixops", chart.to_str().unwrap()];
    if !set.is_empty() {
        args.extend(["--set", set]);
    }
    ok(helm_with(&args, Path::new("/nonexistent/kubeconfig")), &format!("helm template --set {set}"))
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `resource` may name a subresource: "machines.nixops.io/status" (to
/// kubectl, TYPE/NAME is an object's name, so it is passed apart).
fn can_i(sa: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let mut args = vec!["auth", "can-i", verb, resource, "-n", ns, "--as", sa];
    if !subresource.is_empty() {
        args.extend(["--subresource", subresource]);
    }
    let out = support::kubectl(&args, None);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[test]
fn chart_crds_are_the_generated_crds() {
    for entry in std::fs::read_dir(support::repo_root().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let copy = chart().join("crds").join(name);
        assert_eq!(
            std::fs::read_to_string(&copy).unwrap_or_default(),
            std::fs::read_to_string(&path).unwrap(),
            "charts/nixops-operator/crds/{} differs from crds/; run make crds",
            name.to_string_lossy()
        );
    }
}

#[test]
fn chart_lints_strictly_and_its_schema_rejects_bad_values() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    ok(helm(&["lint", "--strict", chart]), "helm lint --strict");
    ok(
        helm(&[
            "lint",
            "--strict",
            chart,
            "--set",
            "replicas=3,watchNamespace=apps,metrics.serviceMonitor.enabled=true,networkPolicy.enabled=true",
        ]),
        "helm lint --strict (namespaced, HA, ServiceMonitor, NetworkPolicy)",
    );
    let bad = helm(&["template", "x", chart, "--set", "logFormat=xml"]);
    assert!(!bad.status.success(), "a logFormat outside the schema must be refused");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("logFormat"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[tokio::test]
async fn chart_installs_upgrades_and_grants_only_what_the_operator_needs() {
    let client = support::client().await;
    let release_ns = support::namespace(&client, "chart").await;
    let watched = support::namespace(&client, "apps").await;
    let other = support::namespace(&client, "other").await;
    let chart = chart();
    let chart = chart.to_str().unwrap();

    // Everything the chart renders is accepted by the API server.
    let rendered = ok(
        helm(&[
            "template",
            "nixops",
            chart,
            "--include-crds",
            "--namespace",
            &release_ns,
            "--set",
            "replicas=2,networkPolicy.enabled=true,networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
        ]),
        "helm template",
    );
    ok(support::kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered)), "kubectl apply --dry-run=server");
    assert!(rendered.contains("--leader-election"), "replicas elect a leader");
    assert!(rendered.contains("kind: PodDisruptionBudget"), "two replicas get a PodDisruptionBudget");
    assert!(rendered.contains("kind: NetworkPolicy"), "networkPolicy.enabled renders one");
    assert!(rendered.contains("readOnlyRootFilesystem: true") && rendered.contains("runAsNonRoot: true"));

    // Namespaced install, then an upgrade to two replicas.
    ok(
        helm(&["install", "nixops", chart, "--namespace", &release_ns, "--set", &format!("watchNamespace={watched}")]),
        "helm install",
    );
    ok(
        helm(&[
            "upgrade",
            "nixops",
            chart,
            "--namespace",
            &release_ns,
            "--set",
            &format!("watchNamespace={watched},replicas=2"),
        ]),
        "helm upgrade",
    );
    let deployment = ok(
        support::kubectl(&["get", "deployment", "nixops-nixops-operator", "-n", &release_ns, "-o", "yaml"], None),
        "get deployment",
    );
    assert!(deployment.contains("replicas: 2") && deployment.contains("--leader-election"), "{deployment}");
    assert!(deployment.contains(&format!("--namespace={watched}")), "{deployment}");

    let sa = format!("system:serviceaccount:{release_ns}:nixops-nixops-operator");
    for (verb, resource) in [
        ("list", "machines.nixops.io"),
        ("watch", "networks.nixops.io"),
        ("patch", "machines.nixops.io/status"),
        ("update", "machines.nixops.io"),
        ("update", "networks.nixops.io"),
        ("update", "keypairs.nixops.io"),
        ("create", "secrets"),
        ("delete", "secrets"),
        ("patch", "secrets"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(can_i(&sa, verb, resource, &watched), "the operator must be allowed to {verb} {resource}");
    }
    assert!(can_i(&sa, "update", "leases.coordination.k8s.io", &release_ns), "leader election needs its Lease");
    for (verb, resource, ns) in [
        ("get", "secrets", other.as_str()),
        ("list", "machines.nixops.io", other.as_str()),
        ("delete", "machines.nixops.io", watched.as_str()),
        ("list", "pods", watched.as_str()),
        ("get", "configmaps", watched.as_str()),
        ("update", "leases.coordination.k8s.io", watched.as_str()),
        // Only what the code does (tests/rbac.rs proves it is enough).
        ("update", "machines.nixops.io/status", watched.as_str()),
        ("get", "machines.nixops.io/status", watched.as_str()),
        ("update", "secrets", watched.as_str()),
    ] {
        assert!(!can_i(&sa, verb, resource, ns), "the operator must not be allowed to {verb} {resource} in {ns}");
    }
    ok(helm(&["uninstall", "nixops", "--namespace", &release_ns]), "helm uninstall");
}

/// A kube-score finding the chart keeps on purpose: (check, finding, why).
type Accepted = (&'static str, &'static str, &'static str);

/// Accepted in every render; values.yaml explains each to users where the
/// value is set.
const KUBE_SCORE_ACCEPTED: &[Accepted] = &[
    (
        "container-resources",
        "CPU limit is not set",
        "a CPU limit throttles the operator in the bursts after a start or resync, and a throttled leader renews \
         its Lease late and loses it; the CPU request reserves what it needs",
    ),
    (
        "container-image-pull-policy",
        "ImagePullPolicy is not set to Always",
        "the tag is a release that never changes: Always would only add a registry round trip to every restart \
         and stop restarts while the registry is down",
    ),
];

/// Accepted with default values only.
const KUBE_SCORE_ACCEPTED_WITHOUT_NETWORK_POLICY: &[Accepted] = &[(
    "pod-networkpolicy",
    "The pod does not have a matching NetworkPolicy",
    "the NetworkPolicy is off by default, as the API server's address and the machines' depend on the cluster; \
     networkPolicy.enabled turns it on, and it must then satisfy kube-score (the second render)",
)];

/// A critical kube-score finding: the object, the check's ID and the finding.
struct Finding {
    object: String,
    check: String,
    summary: String,
}

/// kube-score's critical findings in `rendered`.
fn kube_score_criticals(rendered: &str) -> Vec<Finding> {
    let dir = tempfile::tempdir().expect("temp dir");
    let manifests = dir.path().join("chart.yaml");
    std::fs::write(&manifests, rendered).expect("write the rendered chart");
    let out = Command::new(kube_score_binary())
        .args(["score", "--kubernetes-version", "v1.37", "--output-format", "json"])
        .arg(&manifests)
        .output()
        .expect("run kube-score");
    // kube-score exits 1 when it finds anything critical; the report says what.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("kube-score printed no JSON report ({e}):\n{}", String::from_utf8_lossy(&out.stderr))
    });
    let objects = report.as_array().expect("kube-score's report is a list of objects");
    assert!(
        objects.iter().any(|o| o["type_meta"]["kind"] == "Deployment"),
        "kube-score did not score the Deployment: {report}"
    );
    let mut findings = Vec::new();
    for object in objects {
        let name = object["object_name"].as_str().unwrap_or("?").to_owned();
        for check in object["checks"].as_array().into_iter().flatten() {
            if check["skipped"] == true || check["grade"] != 1 {
                continue;
            }
            let id = check["check"]["id"].as_str().expect("check id").to_owned();
            let comments = check["comments"].as_array().cloned().unwrap_or_default();
            let summaries: Vec<String> = if comments.is_empty() {
                vec![String::new()]
            } else {
                comments.iter().map(|c| c["summary"].as_str().unwrap_or_default().to_owned()).collect()
            };
            for summary in summaries {
                findings.push(Finding { object: name.clone(), check: id.clone(), summary });
            }
        }
    }
    findings
}

#[test]
fn kube_score_finds_nothing_critical_in_the_chart_but_what_it_accepts_on_purpose() {
    let renders: [(&str, &[Accepted]); 2] = [
        ("", KUBE_SCORE_ACCEPTED_WITHOUT_NETWORK_POLICY),
        ("replicas=3,metrics.serviceMonitor.enabled=true,networkPolicy.enabled=true", &[]),
    ];
    let mut unaccepted = Vec::new();
    let mut seen = HashSet::new();
    for (set, accepted_here) in renders {
        for finding in kube_score_criticals(&render(set)) {
            let accepted = KUBE_SCORE_ACCEPTED
                .iter()
                .chain(accepted_here)
                .find(|(check, summary, _)| finding.check == *check && finding.summary == *summary);
            match accepted {
                Some((check, summary, _)) => {
                    seen.insert((*check, *summary));
                }
                None => unaccepted
                    .push(format!("--set '{set}': {}: {} ({})", finding.object, finding.summary, finding.check)),
            }
        }
    }
    assert!(
        unaccepted.is_empty(),
        "kube-score finds these critical; fix the chart, or accept them in tests/chart.rs with the reason:\n{}",
        unaccepted.join("\n")
    );
    for (check, summary, _) in KUBE_SCORE_ACCEPTED.iter().chain(KUBE_SCORE_ACCEPTED_WITHOUT_NETWORK_POLICY) {
        assert!(
            seen.contains(&(*check, *summary)),
            "kube-score no longer finds '{summary}' ({check}); take it off the accepted list"
        );
    }
}
