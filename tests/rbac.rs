//! Least privilege, for real: the operator runs end to end under the chart's
//! ServiceAccount, with a token from the TokenRequest API, once with the
//! chart's ClusterRole (every namespace) and once with its Role (one
//! namespace). It provisions and deletes the whole examples/ec2 network in
//! moto; any call the chart's RBAC does not allow shows as "forbidden" in
//! the operator's log and fails the test.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};
use kube::config::Kubeconfig;
use nixops_operator::api::{KeyPair, Machine, Network, S3Bucket, Volume};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The tests take turns: the cluster-wide operator would also act on the
/// other test's namespace.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The chart's ServiceAccount and RBAC objects, rendered by the real helm
/// for release `release` in `release_ns` with `set`, applied as the admin.
fn apply_chart_rbac(release: &str, release_ns: &str, set: &str) {
    let helm = support::go_tool("hack/helm/build.sh");
    let home = tempfile::tempdir().expect("helm home");
    let chart = support::repo_root().join("charts/nixops-operator");
    let out = std::process::Command::new(helm)
        .args(["template", release])
        .arg(&chart)
        .args(["--namespace", release_ns, "--set", set])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8_lossy(&out.stdout);
    let kinds = ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"];
    let mut docs = Vec::new();
    let mut seen = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&rendered) {
        let obj: serde_json::Value = serde::Deserialize::deserialize(doc).expect("rendered YAML");
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        if kinds.contains(&kind.as_str()) {
            docs.push(serde_yaml_ng::to_string(&obj).expect("YAML"));
            seen.push(kind);
        }
    }
    assert!(
        seen.iter().any(|k| k == "ServiceAccount") && seen.iter().any(|k| k.ends_with("Binding")),
        "the chart renders a ServiceAccount and its bindings: {seen:?}"
    );
    let out = support::kubectl(&["apply", "-f", "-"], Some(&docs.join("---\n")));
    assert!(out.status.success(), "kubectl apply the chart's RBAC: {}", String::from_utf8_lossy(&out.stderr));
}

/// A kubeconfig for ServiceAccount `sa` in `ns`, with a token from the
/// TokenRequest API (`kubectl create token`).
fn service_account_kubeconfig(ns: &str, sa: &str, dir: &Path) -> PathBuf {
    let out = support::kubectl(&["create", "token", sa, "-n", ns, "--duration=1h"], None);
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let admin = Kubeconfig::read_from(&support::control_plane().kubeconfig).expect("admin kubeconfig");
    let cluster = admin.clusters[0].cluster.clone().expect("cluster");
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cluster.server, "certificate-authority": cluster.certificate_authority}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": sa, "namespace": ns}}],
        "current-context": "sa",
    });
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml_ng::to_string(&config).expect("kubeconfig YAML")).expect("write kubeconfig");
    // The credentials are the ServiceAccount's, not the admin's.
    let out = support::kubectl(&["--kubeconfig", path.to_str().unwrap(), "get", "pods", "-n", ns], None);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "the ServiceAccount must not list pods: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// Provisions the examples/ec2 network in `ns` with `operator` running,
/// deletes it again, and checks the operator was never refused.
async fn full_flow(ns: &str, operator: &support::Operator) {
    let client = support::client().await;
    let ec2 = support::ec2_client().await;
    let ami =
        ec2.describe_images().send().await.expect("describe images").images()[0].image_id().expect("AMI ID").to_owned();
    let host = support::SshHost::start();
    let out = support::kubectl(&["apply", "-n", ns, "-f", "-"], Some(&support::examples_ec2(ns, &ami, &host)));
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    let networks = Api::<Network>::namespaced(client.clone(), ns);
    let keypairs = Api::<KeyPair>::namespaced(client.clone(), ns);
    let volumes = Api::<Volume>::namespaced(client.clone(), ns);
    let buckets = Api::<S3Bucket>::namespaced(client.clone(), ns);
    let machines = Api::<Machine>::namespaced(client.clone(), ns);
    support::wait_ready(&networks, "prod").await;
    support::wait_ready(&keypairs, "deployer").await;
    support::wait_ready(&volumes, "pgdata").await;
    support::wait_ready(&buckets, "nix-cache").await;
    support::wait_ready(&machines, "db-1").await;

    // Everything goes at once; the operator orders the cleanups.
    let dp = DeleteParams::default();
    machines.delete("db-1", &dp).await.expect("delete Machine");
    volumes.delete("pgdata", &dp).await.expect("delete Volume");
    buckets.delete("nix-cache", &dp).await.expect("delete S3Bucket");
    keypairs.delete("deployer", &dp).await.expect("delete KeyPair");
    networks.delete("prod", &dp).await.expect("delete Network");
    support::wait_gone(&machines, "db-1", TIMEOUT).await;
    support::wait_gone(&volumes, "pgdata", TIMEOUT).await;
    support::wait_gone(&buckets, "nix-cache", TIMEOUT).await;
    support::wait_gone(&keypairs, "deployer", TIMEOUT).await;
    support::wait_gone(&networks, "prod", TIMEOUT).await;
    // The KeyPair's generated Secret went with it; the credentials are released.
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    support::wait_gone(&secrets, "prod-deployer", TIMEOUT).await;
    let credentials = secrets.get("aws-credentials").await.expect("credentials Secret");
    assert!(credentials.metadata.finalizers.is_none_or(|f| f.is_empty()), "the Network released its credentials");

    let log = operator.logs();
    let refused: Vec<&str> = log.lines().filter(|l| l.to_lowercase().contains("forbidden")).collect();
    assert!(refused.is_empty(), "the chart's RBAC refused the operator:\n{}", refused.join("\n"));
}

/// The chart's flags for the operator: it always elects a leader, through a
/// Lease in the release namespace.
fn chart_flags(release: &str) -> [String; 2] {
    ["--leader-election".to_owned(), format!("--lease-name={release}-nixops-operator")]
}

#[tokio::test]
async fn the_operator_needs_nothing_beyond_the_charts_cluster_role() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let client = support::client().await;
    support::install_crds(&client).await;
    let release_ns = support::namespace(&client, "rbac-release").await;
    let ns = support::namespace(&client, "rbac-cluster").await;
    apply_chart_rbac("cluster", &release_ns, "watchNamespace=");
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = service_account_kubeconfig(&release_ns, "cluster-nixops-operator", dir.path());
    let flags = chart_flags("cluster");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let operator = support::Operator::start_as(None, &kubeconfig, &flags, &[("POD_NAMESPACE", &release_ns)]);
    operator.wait_ready().await;
    full_flow(&ns, &operator).await;
}

#[tokio::test]
async fn the_operator_needs_nothing_beyond_the_charts_namespaced_role() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let client = support::client().await;
    support::install_crds(&client).await;
    let release_ns = support::namespace(&client, "rbac-release").await;
    let ns = support::namespace(&client, "rbac-watched").await;
    apply_chart_rbac("namespaced", &release_ns, &format!("watchNamespace={ns}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = service_account_kubeconfig(&release_ns, "namespaced-nixops-operator", dir.path());
    let flags = chart_flags("namespaced");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let operator = support::Operator::start_as(Some(&ns), &kubeconfig, &flags, &[("POD_NAMESPACE", &release_ns)]);
    operator.wait_ready().await;
    full_flow(&ns, &operator).await;
}
