//! Building a Machine's system from Git (`spec.nixos.build`), on a builder
//! the Network names (`spec.build`) or on the machine itself: the API half.
//! The controller half is `src/controller/build.rs`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::LocalObjectReference;

/// Where a Machine's NixOS system is built from: a Git repository holding a
/// flake (NixOps' network expressions, `nixos-rebuild --flake`) or a plain
/// Nix file. The operator resolves `ref` to a commit on every resync, builds
/// the system over SSH on a builder (it needs no Nix of its own), and
/// deploys the result as it deploys a pasted `closure`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.flake) || (!has(self.file) && !has(self.attribute))")
    .message("set flake for a flake repository, or file and attribute for a plain Nix expression, not both"))]
#[x_kube(validation = Rule::new("has(self.file) || !has(self.attribute)")
    .message("attribute needs file: the Nix file (relative to the repository root) the attribute is taken from")
    .field_path(".attribute"))]
pub struct BuildSpec {
    /// The Git repository and the commit to build.
    pub git: GitSource,

    /// The flake output holding this machine's NixOS configuration; the
    /// operator builds its `config.system.build.toplevel`. Defaults to
    /// `nixosConfigurations.<Machine name>`. Attribute names are separated
    /// by dots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = attribute_path())]
    #[schemars(length(min = 1, max = 512))]
    pub flake: Option<String>,

    /// For repositories without a flake: the Nix file, relative to the
    /// repository root, e.g. `default.nix` or `network.nix`. If it is a
    /// function it is called with no arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_+-][A-Za-z0-9._+/-]*$') && !self.split('/').exists(c, c == '..' || c == '')")
        .message("must be a path relative to the repository root, e.g. default.nix or machines/web.nix, without '..'"))]
    #[schemars(length(min = 1, max = 1024))]
    pub file: Option<String>,

    /// With `file`: the attribute path of the system toplevel derivation in
    /// that file, e.g. `web-1` or `machines.web-1.system`. Defaults to the
    /// Machine's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = attribute_path())]
    #[schemars(length(min = 1, max = 512))]
    pub attribute: Option<String>,

    /// Where the system is built: `Builder`, the Machine named by the
    /// Network's `spec.build.builder` (as `nixos-rebuild --build-host`),
    /// whose store the operator then pushes from; `Target`, this machine
    /// itself (nothing to copy afterwards). Defaults to `Builder` when the
    /// Network names one, else `Target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_on: Option<BuildOn>,

    /// Only build and deploy commits signed by one of these keys (an
    /// OpenSSH public key line, `ssh-ed25519 AAAA…`, as `git commit -S`
    /// with `gpg.format=ssh` signs; or an ASCII-armored OpenPGP public key
    /// block). Checked with `git verify-commit` on the builder. Empty:
    /// signatures are not required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 16, max = 16384)))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh.com) [A-Za-z0-9+/]+={0,3}( .*)?$') || k.startsWith('-----BEGIN PGP PUBLIC KEY BLOCK-----'))")
        .message("each key must be an OpenSSH public key line ('ssh-ed25519 AAAA…') or an ASCII-armored OpenPGP public key block"))]
    pub require_signed_by: Vec<String>,
}

fn attribute_path() -> kube::core::Rule {
    kube::core::Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9_\\'-]*(\\\\.[A-Za-z0-9_][A-Za-z0-9_\\'-]*)*$')").message(
        "must be a Nix attribute path: names of letters, digits, '_', '-' and \"'\" separated by dots, e.g. nixosConfigurations.web-1",
    )
}

/// A Git repository and the commit to build.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.ref) && has(self.rev))")
    .message("set ref (a branch or tag the operator follows) or rev (a pinned commit), not both"))]
pub struct GitSource {
    /// Repository URL as the builder's `git` reads it: https://, ssh://,
    /// user@host:path or file:///path.
    #[x_kube(validation = Rule::new("self.matches('^(https?://|ssh://|git://|file:///|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:)[^\\\\s]+$')")
        .message("must be a Git URL: https://host/repo.git, ssh://host/repo.git, git@host:repo.git or file:///path"))]
    #[schemars(length(min = 8, max = 2048))]
    pub url: String,

    /// The branch or tag to follow (`main`, `refs/tags/v1`); resolved to a
    /// commit on every resync, so a push to it is built and rolled out.
    /// Defaults to the repository's HEAD when neither ref nor rev is set.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9._/-]+$') && !self.contains('..') && !self.startsWith('-')")
        .message("must be a branch or tag name such as main or refs/tags/v1.2"))]
    #[schemars(length(min = 1, max = 255))]
    pub ref_name: Option<String>,

    /// A pinned commit (40 hex digits). A pinned rev never moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{40}$')")
        .message("must be a full commit hash: 40 lower-case hex digits"))]
    #[schemars(length(min = 40, max = 40))]
    pub rev: Option<String>,

    /// Secret with credentials for the repository: `identity` (an SSH
    /// private key) and optional `known_hosts` for ssh URLs; `username` and
    /// `password` (or a token) for https URLs. Written to the builder for
    /// the fetch only, never to the Nix store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectReference>,
}

/// Where a system is built.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum BuildOn {
    /// The Network's builder (spec.build.builder).
    Builder,
    /// The machine being deployed.
    Target,
}

/// A Network's build host (spec.build).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkBuild {
    /// The Machine of this namespace that builds the members' systems (it
    /// needs Nix and git, and is reached with its own ssh settings and
    /// pinned host key). Members' closures are pushed from its store.
    pub builder: LocalObjectReference,

    /// Most builds running on the builder at once (1 to 64, default 1).
    #[serde(default = "default_max_builds")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_builds: i32,
}

fn default_max_builds() -> i32 {
    1
}

/// How a build ended.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum BuildResult {
    /// Under way (or waiting for a builder slot).
    Building,
    /// Built; `closure` is the result.
    Succeeded,
    /// Evaluation or build failed; the machine stays on its current system.
    Failed,
    /// The commit is not signed by a key of spec.nixos.build.requireSignedBy.
    Refused,
}

/// The last build of a Machine's system (status.build).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildRecord {
    /// The commit built.
    pub rev: String,
    /// What was built: the repository and the installable (and whose
    /// signature the commit needed), to tell a new build source from the old one.
    pub source: String,
    /// The system closure the build produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure: Option<String>,
    /// The Machine that built it (empty: the machine itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// When the build started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Building, Succeeded, Failed or Refused.
    pub result: BuildResult,
    /// For a failure: what failed and the last lines of the log (the
    /// Machine's BuildFailed event carries more of it, `logPath` all of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Where the whole log of the build is kept: a file on the Machine
    /// named by `builder` (empty: on this machine), shown by `kubectl
    /// nixops build-log <machine>`. The builder keeps the last 5 logs of
    /// each followed ref or pinned rev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// The Machine's metadata.generation the build was made for: a failed
    /// rev is built again only when the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_generation: Option<i64>,
}
