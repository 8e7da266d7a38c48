//! The operator's image, built offline by hack/image/build.sh (umoci, from
//! the binary and the libraries it links) and run here with runc (Debian's
//! OCI runtime) from the unpacked image, with a read-only root file system
//! and the image's own user, sharing only the host's network namespace so
//! it reaches the test control plane on loopback: `--version` and `crds`
//! run inside it, and the operator inside reconciles a KeyPair.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::json;

const TAG: &str = env!("CARGO_PKG_VERSION");

/// Builds the image from this build's operator binary into `out`; returns
/// the OCI layout.
fn build_image(out: &Path) -> PathBuf {
    let status = Command::new(support::repo_root().join("hack/image/build.sh"))
        .env("BINARY", env!("CARGO_BIN_EXE_nixops-operator"))
        .env("OUT", out)
        .stdout(Stdio::null())
        .status()
        .expect("run hack/image/build.sh");
    assert!(status.success(), "hack/image/build.sh failed");
    assert!(out.join(format!("nixops-operator-{TAG}.tar")).exists(), "the docker-archive for kind/k3d is written");
    out.join("oci")
}

/// An unpacked image, configured to run `args`; removed with its container.
struct Container {
    id: String,
    bundle: tempfile::TempDir,
}

impl Container {
    fn new(layout: &Path, args: &[&str], files: &[(&str, &str)]) -> Self {
        let bundle = tempfile::Builder::new().prefix("nixops-image-").tempdir().unwrap();
        let dir = bundle.path().join("b");
        let image = format!("{}:{TAG}", layout.display());
        let out = Command::new("umoci").args(["unpack", "--image", &image]).arg(&dir).output().unwrap();
        assert!(out.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
        for (path, content) in files {
            let file = dir.join("rootfs").join(path.trim_start_matches('/'));
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, content).unwrap();
        }
        let config_path = dir.join("config.json");
        let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
        config["process"]["terminal"] = json!(false);
        let mut argv = vec![json!("/usr/local/bin/nixops-operator")];
        argv.extend(args.iter().map(|a| json!(a)));
        config["process"]["args"] = json!(argv);
        config["root"]["readonly"] = json!(true);
        // The host's network: the control plane listens on its loopback.
        let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|n| n["type"] != "network");
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
        let id = bundle.path().file_name().unwrap().to_string_lossy().into_owned();
        Self { id, bundle }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("runc");
        command.args(["run", "--bundle"]).arg(self.bundle.path().join("b")).arg(&self.id).stdin(Stdio::null());
        command
    }

    /// Runs to the end; its standard output.
    fn output(&self) -> String {
        let out = self.command().output().expect("run runc");
        assert!(out.status.success(), "runc run: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&self, log: &Path) -> Child {
        let log = std::fs::File::create(log).unwrap();
        self.command().stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("run runc")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc").args(["delete", "--force", &self.id]).output();
    }
}

#[tokio::test]
async fn the_offline_image_runs_the_operator() {
    let out = tempfile::tempdir().unwrap();
    let layout = build_image(out.path());

    let version = Container::new(&layout, &["--version"], &[]).output();
    assert_eq!(version.trim(), format!("nixops-operator {TAG}"));
    let crds = Container::new(&layout, &["crds"], &[]).output();
    assert_eq!(crds.matches("kind: CustomResourceDefinition").count(), nixops_operator::api::crds().len());

    // The operator in the container, against the control plane, with a
    // kubeconfig that carries its CA (the container sees no host files).
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "image").await;
    let cp = support::control_plane();
    let kubeconfig = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let ca_file = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority: "))
        .expect("the kubeconfig names its CA file");
    let ca = base64::engine::general_purpose::STANDARD.encode(std::fs::read(ca_file).unwrap());
    let inside =
        kubeconfig.replace(&format!("certificate-authority: {ca_file}"), &format!("certificate-authority-data: {ca}"));
    let metrics = format!("127.0.0.1:{}", support::free_port());
    let operator = Container::new(
        &layout,
        &["run", "--namespace", &ns, "--metrics-addr", &metrics, "--resync-seconds", "5"],
        &[("/etc/nixops/kubeconfig", &inside)],
    );
    // The image's config runs as 65532 and sets no KUBECONFIG; add it.
    let config_path = operator.bundle.path().join("b/config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(config["process"]["user"]["uid"], 65532, "the image runs as the chart's non-root user");
    config["process"]["env"].as_array_mut().unwrap().push(json!("KUBECONFIG=/etc/nixops/kubeconfig"));
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let log = out.path().join("operator.log");
    let mut child = operator.spawn(&log);

    let keypairs = support::fleet::create_deployer_keypair(&client, &ns).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let ready = loop {
        let k = keypairs.get("deployer").await.unwrap();
        if k.status.as_ref().is_some_and(|s| support::is_ready(&s.conditions)) {
            break true;
        }
        if std::time::Instant::now() >= deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ready, "the operator in the image did not make the KeyPair Ready; its log:\n{logs}");
    let secret = Api::<Secret>::namespaced(client, &ns).get("deployer-ssh").await.unwrap();
    assert!(secret.data.unwrap().contains_key("ssh-privatekey"), "the key was generated inside the container");
    let _ = Command::new("runc").args(["kill", &operator.id, "KILL"]).output();
    let _ = child.wait();
}
