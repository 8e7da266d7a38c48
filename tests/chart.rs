//! The Helm chart against the real helm (built from Go modules by
//! hack/helm) and the real API server: lint, render, server-side dry run,
//! install, upgrade, and RBAC that allows what the operator does and
//! nothing else.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

fn helm_binary() -> &'static PathBuf {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out =
            Command::new(support::repo_root().join("hack/helm/build.sh")).output().expect("run hack/helm/build.sh");
        assert!(out.status.success(), "hack/helm/build.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn chart() -> PathBuf {
    support::repo_root().join("charts/nixops-operator")
}

fn helm(args: &[&str]) -> Output {
    let cp = support::control_plane();
    let home = tempfile::tempdir().expect("helm home");
    Command::new(helm_binary())
        .args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm")
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

fn can_i(sa: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let out = support::kubectl(&["auth", "can-i", verb, resource, "-n", ns, "--as", sa], None);
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
            "replicas=3,watchNamespace=apps,metrics.serviceMonitor.enabled=true",
        ]),
        "helm lint --strict (namespaced, HA, ServiceMonitor)",
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
        helm(&["template", "nixops", chart, "--include-crds", "--namespace", &release_ns, "--set", "replicas=2"]),
        "helm template",
    );
    ok(support::kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered)), "kubectl apply --dry-run=server");
    assert!(rendered.contains("--leader-election"), "two replicas elect a leader");
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
        ("update", "keypairs.nixops.io"),
        ("create", "secrets"),
        ("delete", "secrets"),
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
    ] {
        assert!(!can_i(&sa, verb, resource, ns), "the operator must not be allowed to {verb} {resource} in {ns}");
    }
    ok(helm(&["uninstall", "nixops", "--namespace", &release_ns]), "helm uninstall");
}
