//! Test support: a real control plane (etcd + kube-apiserver built from Go
//! modules by hack/controlplane), shared by the tests of one test binary.
//!
//! The control plane is started once per test binary on first use and is tied
//! to the test process: a watchdog started by hack/controlplane/start.sh
//! stops it and removes its files as soon as the process exits, whether the
//! tests passed, panicked or were killed.
#![allow(dead_code)]

pub mod fleet;
pub mod libvirt;
pub mod netns;
pub mod node;
pub mod plugin;

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

/// Starts kube-controller-manager (its namespace controller only) against
/// the control plane, once per test binary: without it a deleted namespace
/// is never emptied. Stopped with the control plane.
pub fn controller_manager() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let dir = control_plane().kubeconfig.parent().expect("control plane directory").to_owned();
        let started = std::time::Instant::now();
        let output = Command::new(repo_root().join("hack/controlplane/controller-manager.sh"))
            .arg(&dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("run hack/controlplane/controller-manager.sh");
        assert!(output.status.success(), "hack/controlplane/controller-manager.sh failed; see its output above");
        eprintln!("kube-controller-manager started in {:?}", started.elapsed());
    });
}

/// A Go tool built into the cache by its hack/<tool>/build.sh (helm, …).
pub fn go_tool(build_script: &str) -> PathBuf {
    let out = Command::new(repo_root().join(build_script)).output().expect("run the build script");
    assert!(out.status.success(), "{build_script} failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
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

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Waits until `cond` holds for object `name`, or panics after `timeout`
/// showing the object's last state.
pub async fn wait_for<K>(api: &Api<K>, name: &str, timeout: Duration, what: &str, cond: impl Fn(&K) -> bool)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let current = api.get_opt(name).await.expect("get object");
        if let Some(obj) = &current
            && cond(obj)
        {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {name}: {what}; last state:\n{}",
                serde_yaml_ng::to_string(&current).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until object `name` is gone.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while let Some(obj) = api.get_opt(name).await.expect("get object") {
        if tokio::time::Instant::now() >= deadline {
            panic!("{name} still exists after {timeout:?}:\n{}", serde_yaml_ng::to_string(&obj).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status of condition `type_` ("True", "False"), if present.
pub fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<String> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.status.clone())
}

/// The message of condition `type_`.
pub fn condition_message(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> String {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.message.clone()).unwrap_or_default()
}

/// An operator process (the real binary) against the control plane.
pub struct Operator {
    child: std::process::Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts `nixops-operator run` watching `namespace`, with `extra` flags.
    pub fn start(namespace: &str, extra: &[&str]) -> Self {
        Self::start_env(namespace, extra, &[])
    }

    /// Like `start`, with extra environment variables (e.g. `FAILPOINTS`).
    pub fn start_env(namespace: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_as(Some(namespace), &control_plane().kubeconfig, extra, env)
    }

    /// Starts `nixops-operator run` with `kubeconfig`'s credentials, watching
    /// `namespace` or (None) every namespace.
    pub fn start_as(namespace: Option<&str>, kubeconfig: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("operator dir");
        let log = dir.path().join("operator.log");
        let metrics_port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_nixops-operator"))
            .arg("run")
            .args(namespace.map(|ns| ["--namespace", ns]).into_iter().flatten())
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("NIXOPS_LOG", "info,nixops_operator=debug")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(dir.path().join("operator.stdout")).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start nixops-operator");
        Self { child, metrics_port, log, _dir: dir }
    }

    /// The operator's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path from the operator's HTTP server; (status code, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((code, body))
    }

    /// Sum of a metric's samples whose labels contain all of `labels` (e.g. `kind="Machine"`).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let Some((200, body)) = self.http_get("/metrics") else { return 0.0 };
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|lab| l.contains(lab)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until the HTTP server answers /readyz.
    pub async fn wait_ready(&self) {
        for _ in 0..300 {
            if let Some((200, _)) = self.http_get("/readyz") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("operator never became ready; log:\n{}", self.logs());
    }

    /// Waits until this operator leads (its nixops_leader gauge is 1).
    pub async fn wait_leading(&self, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.metric("nixops_leader", &[]) < 1.0 {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- operator log ----\n{}", self.logs());
        }
    }
}

/// An SSH server on a loopback address with its own host key: what a
/// machine looks like before anything is deployed to it.
pub struct SshHost {
    child: std::process::Child,
    pub host: String,
    pub port: u16,
    /// The host's public key line.
    pub host_key: String,
    pub dir: tempfile::TempDir,
}

/// Writes a new ed25519 key pair with ssh-keygen: the private key (OpenSSH
/// format) at `path`, the public key line at `path`.pub.
pub fn ssh_keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
}

impl SshHost {
    /// Starts sshd on 127.0.0.1 at a free port.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts sshd with `extra` lines appended to its configuration.
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("sshd dir");
        let key = dir.path().join("ssh_host_ed25519_key");
        ssh_keygen(&key);
        let host_key = std::fs::read_to_string(key.with_extension("pub")).expect("read host key").trim().to_owned();
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}/sshd.pid\nAuthorizedKeysFile {}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n{extra}",
                key.display(),
                dir.path().display(),
                dir.path().display()
            ),
        )
        .expect("write sshd_config");
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let mut child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(std::fs::File::create(dir.path().join("sshd.log")).expect("sshd log"))
            .spawn()
            .expect("start sshd");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, host: "127.0.0.1".into(), port, host_key, dir };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("sshd did not start on port {port}");
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// kstatus' verdict ("Current", "InProgress", "Failed", …) on an object, from
/// the real library (sigs.k8s.io/cli-utils) built by hack/kstatus.
pub fn kstatus<K: serde::Serialize>(obj: &K) -> String {
    use std::io::Write;
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let out = Command::new(repo_root().join("hack/kstatus/build.sh")).output().expect("run hack/kstatus/build.sh");
        assert!(out.status.success(), "hack/kstatus/build.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    });
    let mut child = Command::new(bin).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("run kstatus");
    child.stdin.take().expect("stdin").write_all(&serde_json::to_vec(obj).expect("json")).expect("write");
    let out = child.wait_with_output().expect("kstatus output");
    assert!(out.status.success(), "kstatus failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A moto server (the AWS EC2 and S3 APIs) on a free loopback port, shared
/// by the tests of one binary and stopped when the test process exits.
pub struct Moto {
    pub endpoint: String,
}

/// The moto server of this test binary, started on first use.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let out = Command::new(repo_root().join("hack/moto/install.sh")).output().expect("run hack/moto/install.sh");
        assert!(out.status.success(), "hack/moto/install.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let port = free_port();
        let log = std::env::temp_dir().join(format!("moto-{}-{port}.log", std::process::id()));
        // A detached shell keeps moto exactly as long as this process lives.
        let script = format!(
            "{}/moto_server -H 127.0.0.1 -p {port} >{} 2>&1 & child=$!; \
             while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill $child",
            bin.display(),
            log.display(),
            std::process::id()
        );
        Command::new("setsid")
            .args(["-f", "bash", "-c", &script])
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("start moto_server");
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Moto { endpoint: format!("http://127.0.0.1:{port}") };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("moto_server did not start; see {}", log.display());
    })
}

/// Creates, in `ns`, a credentials Secret and an AWS Network named `name`
/// whose endpoint is `endpoint` (moto, or a proxy in front of it).
pub async fn aws_network(client: &Client, ns: &str, name: &str, endpoint: &str) {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{name}-aws")},
        "stringData": {"accessKeyId": "testing", "secretAccessKey": "testing"}
    }))
    .expect("secret");
    let _ = secrets.create(&PostParams::default(), &secret).await;
    let networks: Api<nixops_operator::api::Network> = Api::namespaced(client.clone(), ns);
    let net: nixops_operator::api::Network = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixops.io/v1alpha1", "kind": "Network", "metadata": {"name": name},
        "spec": {"provider": {"ec2": {
            "region": "eu-west-1",
            "endpoint": endpoint,
            "credentialsSecretRef": {"name": format!("{name}-aws")},
            "vpc": {"cidrBlock": "10.42.0.0/16"},
            "subnets": [{"name": "public-a", "cidrBlock": "10.42.1.0/24", "zone": "eu-west-1a"}],
            "securityGroup": {"ingress": [{"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["0.0.0.0/0"]}]}
        }}}
    }))
    .expect("network");
    networks.create(&PostParams::default(), &net).await.expect("create network");
}

/// A toxiproxy server (built by hack/toxiproxy) on a free loopback port,
/// stopped when the test process exits.
pub struct Toxiproxy {
    api_port: u16,
}

/// Starts a toxiproxy server for this test.
pub fn toxiproxy() -> Toxiproxy {
    let out = Command::new(repo_root().join("hack/toxiproxy/build.sh")).output().expect("run hack/toxiproxy/build.sh");
    assert!(out.status.success(), "hack/toxiproxy/build.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let api_port = free_port();
    let script = format!(
        "{bin} -host 127.0.0.1 -port {api_port} >/dev/null 2>&1 & child=$!; \
         while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill $child",
        std::process::id()
    );
    Command::new("setsid")
        .args(["-f", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start toxiproxy");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", api_port)).is_ok() {
            return Toxiproxy { api_port };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("toxiproxy did not start");
}

impl Toxiproxy {
    /// Sends a request to toxiproxy's HTTP API; panics unless it succeeds.
    fn call(&self, method: &str, path: &str, body: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.api_port)).expect("connect to toxiproxy");
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        let code: u16 = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!((200..300).contains(&code), "toxiproxy {method} {path}: {response}");
        response
    }

    /// Creates a proxy from a free loopback port to `upstream`; returns its address.
    pub fn proxy(&self, name: &str, upstream: &str) -> String {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        self.call(
            "POST",
            "/proxies",
            &serde_json::json!({"name": name, "listen": listen, "upstream": upstream}).to_string(),
        );
        listen
    }

    /// Adds a toxic (latency, reset_peer, timeout, bandwidth, …) to a proxy's
    /// answers (server to client).
    pub fn toxic(&self, proxy: &str, name: &str, kind: &str, toxicity: f64, attributes: serde_json::Value) {
        self.toxic_on(proxy, name, kind, "downstream", toxicity, attributes);
    }

    /// Adds a toxic to one direction: "upstream" (client to server) or "downstream".
    pub fn toxic_on(
        &self,
        proxy: &str,
        name: &str,
        kind: &str,
        stream: &str,
        toxicity: f64,
        attributes: serde_json::Value,
    ) {
        let body = serde_json::json!({"name": name, "type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes});
        self.call("POST", &format!("/proxies/{proxy}/toxics"), &body.to_string());
    }

    /// Removes a toxic.
    pub fn remove_toxic(&self, proxy: &str, name: &str) {
        self.call("DELETE", &format!("/proxies/{proxy}/toxics/{name}"), "");
    }
}

/// SDK settings for talking to this binary's moto server directly (to check
/// what the operator did), with the test credentials.
pub async fn aws_sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("eu-west-1"))
        .endpoint_url(&moto().endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await
}

/// An EC2 client for moto.
pub async fn ec2_client() -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&aws_sdk_config().await)
}

/// An S3 client for moto (path-style addressing, as moto needs).
/// An AMI moto knows (it validates AMIs).
pub async fn some_ami(ec2: &aws_sdk_ec2::Client) -> String {
    let images = ec2.describe_images().send().await.unwrap();
    images.images().iter().find_map(|i| i.image_id().map(str::to_owned)).expect("moto lists AMIs")
}

/// An EC2 Machine of Network `aws` whose SSH is `host` (moto runs no VMs);
/// `extra` replaces or adds top-level spec fields.
pub fn ec2_machine(name: &str, ami: &str, host: &SshHost, extra: serde_json::Value) -> nixops_operator::api::Machine {
    let mut spec = serde_json::json!({
        "networkRef": {"name": "aws"},
        "provider": {"ec2": {"instanceType": "t3.small", "ami": ami, "subnet": "public-a", "rootVolume": {"sizeGiB": 12}}},
        "ssh": {"host": host.host, "port": host.port},
    });
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::from_value(
        serde_json::json!({"apiVersion": "nixops.io/v1alpha1", "kind": "Machine", "metadata": {"name": name}, "spec": spec}),
    )
    .unwrap()
}

pub async fn s3_client() -> aws_sdk_s3::Client {
    let config = aws_sdk_config().await;
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(true).build())
}

/// Creates bucket `name` in moto's eu-west-1 directly, as someone other
/// than the operator would.
pub async fn create_bucket(s3: &aws_sdk_s3::Client, name: &str) {
    let region = aws_sdk_s3::types::BucketLocationConstraint::from("eu-west-1");
    s3.create_bucket()
        .bucket(name)
        .create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder().location_constraint(region).build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {name}: {e:?}"));
}

/// examples/ec2 for tests against moto: moto's endpoint and test credentials,
/// an AMI moto knows, a local sshd as the machine's address, no NixOS
/// closure (there is no cache to fetch it from), names unique to the
/// namespace, and Delete instead of Orphan so that nothing is meant to stay.
pub fn examples_ec2(ns: &str, ami: &str, host: &SshHost) -> String {
    let dir = repo_root().join("examples/ec2");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("read examples/ec2").map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read example");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut obj: serde_json::Value = serde::Deserialize::deserialize(doc).expect("example YAML");
            let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
            let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            match (kind.as_str(), name.as_str()) {
                ("Secret", "aws-credentials") => {
                    obj["stringData"] = serde_json::json!({"accessKeyId": "testing", "secretAccessKey": "testing"})
                }
                ("Network", _) => obj["spec"]["provider"]["ec2"]["endpoint"] = serde_json::json!(moto().endpoint),
                ("Volume", _) => obj["spec"]["deletionPolicy"] = serde_json::json!("Delete"),
                ("S3Bucket", _) => {
                    obj["spec"]["bucketName"] = serde_json::json!(format!("{ns}-nix-cache"));
                    obj["spec"]["deletionPolicy"] = serde_json::json!("Delete");
                }
                ("KeyPair", _) => {
                    obj["spec"]["provider"]["ec2"]["keyName"] = serde_json::json!(format!("{ns}-deployer"))
                }
                ("Machine", _) => {
                    let spec = obj["spec"].as_object_mut().expect("Machine spec");
                    spec.remove("nixos");
                    spec.remove("keys");
                    spec["provider"]["ec2"]["ami"] = serde_json::json!(ami);
                    spec["ssh"]["host"] = serde_json::json!(host.host);
                    spec["ssh"]["port"] = serde_json::json!(host.port);
                }
                _ => {}
            }
            docs.push(serde_yaml_ng::to_string(&obj).expect("YAML"));
        }
    }
    docs.join("---\n")
}

/// Waits until object `name` has Ready=True.
pub async fn wait_ready<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
{
    wait_for(api, name, Duration::from_secs(120), "Ready", |obj| {
        let value = serde_json::to_value(obj).unwrap_or_default();
        let conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> =
            serde_json::from_value(value["status"]["conditions"].clone()).unwrap_or_default();
        is_ready(&conditions)
    })
    .await;
}

/// Whether a status' conditions hold Ready=True.
pub fn is_ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    condition(conditions, "Ready").as_deref() == Some("True")
}

/// `python3 -m http.server` on a loopback port: a plain static file server,
/// as a cache behind nginx or a CDN looks to Nix.
pub struct HttpServer {
    child: std::process::Child,
    pub port: u16,
    pub url: String,
}

impl HttpServer {
    /// Serves the files under `dir`.
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let mut child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, port, url: format!("http://127.0.0.1:{port}") };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("python3 -m http.server did not start on port {port}");
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Argo CD's verdict on an object, from the chart's Lua health check run by
/// a real Lua interpreter: (status, message), e.g. ("Healthy", "…").
pub fn argocd_health<K: serde::Serialize>(obj: &K) -> (String, String) {
    fn lua(value: &serde_json::Value) -> String {
        match value {
            serde_json::Value::Null => "nil".into(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => format!("{s:?}"),
            serde_json::Value::Array(items) => format!("{{{}}}", items.iter().map(lua).collect::<Vec<_>>().join(", ")),
            serde_json::Value::Object(map) => format!(
                "{{{}}}",
                map.iter().map(|(k, v)| format!("[{k:?}] = {}", lua(v))).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    let script = std::fs::read_to_string(repo_root().join("charts/nixops-operator/files/argocd-health.lua"))
        .expect("read argocd-health.lua");
    let object = serde_json::to_value(obj).expect("object as JSON");
    // Argo CD runs the script as a function body with `obj` in scope.
    let program = format!(
        "local obj = {}\nlocal function health()\n{script}\nend\nlocal hs = health()\nprint(hs.status)\nprint(hs.message or '')\n",
        lua(&object)
    );
    let out = Command::new("lua5.4").arg("-").stdin_bytes(program.as_bytes());
    assert!(out.status.success(), "lua5.4 failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    (lines.next().unwrap_or_default().to_owned(), lines.next().unwrap_or_default().to_owned())
}

/// Runs a command with `input` on its standard input.
trait StdinBytes {
    fn stdin_bytes(&mut self, input: &[u8]) -> Output;
}

impl StdinBytes for Command {
    fn stdin_bytes(&mut self, input: &[u8]) -> Output {
        use std::io::Write;
        let mut child =
            self.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn command");
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
        child.wait_with_output().expect("wait for command")
    }
}
