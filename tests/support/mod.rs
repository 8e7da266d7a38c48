//! Test support: a real control plane (etcd + kube-apiserver built from Go
//! modules by hack/controlplane), shared by the tests of one test binary.
//!
//! The control plane is started once per test binary on first use and is tied
//! to the test process: a watchdog started by hack/controlplane/start.sh
//! stops it and removes its files as soon as the process exits, whether the
//! tests passed, panicked or were killed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};

/// A running control plane.
pub struct ControlPlane {
    /// Kubeconfig with admin credentials.
    pub kubeconfig: PathBuf,
    /// The kubectl built alongside the API server.
    pub kubectl: PathBuf,
}

/// Root of the repository.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The control plane of this test binary, started on first use.
pub fn control_plane() -> &'static ControlPlane {
    static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();
    CONTROL_PLANE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("nixops-controlplane-")
            .tempdir()
            .expect("create control plane directory")
            .keep(); // the watchdog removes it when this process exits
        let output = Command::new(repo_root().join("hack/controlplane/start.sh"))
            .arg(&dir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("run hack/controlplane/start.sh");
        assert!(output.status.success(), "hack/controlplane/start.sh failed; see its output above");
        ControlPlane { kubeconfig: dir.join("kubeconfig"), kubectl: dir.join("kubectl") }
    })
}

/// A client for the control plane, as the admin user.
pub async fn client() -> Client {
    let kubeconfig = Kubeconfig::read_from(&control_plane().kubeconfig).expect("read kubeconfig");
    let config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("load kubeconfig");
    Client::try_from(config).expect("build client")
}

/// Runs kubectl against the control plane, with `stdin` as its input.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let cp = control_plane();
    let mut child = Command::new(&cp.kubectl)
        .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    if let Some(input) = stdin {
        child.stdin.take().expect("kubectl stdin").write_all(input.as_bytes()).expect("write kubectl stdin");
    }
    child.wait_with_output().expect("wait for kubectl")
}

/// Installs (server-side apply) every CRD and waits until all are Established.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("nixops-operator-tests").force();
    for crd in nixops_operator::api::crds() {
        let name = crd.metadata.name.clone().expect("CRD name");
        api.patch(&name, &params, &Patch::Apply(&crd)).await.expect("apply CRD");
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(60), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 60 s"))
            .expect("watch CRD");
    }
}

/// Creates a namespace with a unique name starting with `prefix`.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.generate_name = Some(format!("{prefix}-"));
    let created = api.create(&PostParams::default(), &ns).await.expect("create namespace");
    created.metadata.name.expect("generated namespace name")
}
