//! `kubectl nixops`: NixOps's command line for Machines in Kubernetes.
//!
//! Reads go straight to the API server and to the machines (over SSH, with
//! the Machine's KeyPair and pinned host key, the way the operator
//! connects); whatever changes something (check, reboot, rollback, deploy)
//! is asked of the operator through the Machine (an annotation or the
//! spec), so it stays RBAC-gated and shows in status and events.

pub mod backups;
pub mod build_log;
pub mod connect;
pub mod generations;
pub mod info;
pub mod output;
pub mod requests;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::api::Machine;

/// NixOps's command line for NixOS machines managed by nixops-operator.
#[derive(Parser, Debug)]
#[command(name = "kubectl-nixops", bin_name = "kubectl nixops", version)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every kubectl plugin takes.
#[derive(Args, Debug, Clone, Default)]
pub struct Global {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// All namespaces (info, check --all).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Path to the kubeconfig file (default: KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Output format: a table by default; json, yaml, or a wider table.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Format>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Yaml,
    Wide,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The fleet at a glance (NixOps info): machines, provider, address,
    /// active closure and generation, last deploy, conditions.
    Info {
        /// Only this Network's machines.
        network: Option<String>,
    },
    /// Log in to a machine (or run a command there) with its KeyPair,
    /// through its jump host, verifying its pinned host key.
    Ssh {
        machine: String,
        /// Force a terminal even with a command (ssh -t).
        #[arg(short = 't')]
        tty: bool,
        /// The command to run; omitted, an interactive shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Copy files from and to machines: MACHINE:PATH names a path on one.
    Scp {
        /// Copy directories recursively.
        #[arg(short = 'r')]
        recursive: bool,
        /// Sources, then the destination.
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
    },
    /// The system profile's generations on the machine, with dates and closures.
    ListGenerations { machine: String },
    /// The whole log of the machine's last build (status.build), read from
    /// the machine that built it (its Network's builder, or itself).
    BuildLog { machine: String },
    /// Sets spec.nixos.closure to an earlier generation's closure (prints
    /// the manifest change instead when Argo CD or Flux manage the Machine).
    Rollback {
        machine: String,
        /// The generation to go back to.
        #[arg(long, conflicts_with = "previous", required_unless_present = "previous")]
        to: Option<i64>,
        /// The generation before the current one.
        #[arg(long)]
        previous: bool,
        /// Patch even though a GitOps tool manages the Machine.
        #[arg(long)]
        force: bool,
        /// Wait until the machine runs it.
        #[arg(long)]
        wait: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Asks the operator to check machines now (NixOps check) and prints
    /// what it found: active vs desired system, failed units, load, /nix space.
    Check {
        /// The machine to check.
        #[arg(required_unless_present = "all")]
        machine: Option<String>,
        /// Every machine of the namespace (with -A, of all namespaces).
        #[arg(long)]
        all: bool,
        /// How long to wait for the answers, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Asks the operator to reboot a machine, or a Network's machines
    /// (at most the rollout's maxUnavailable at a time).
    Reboot {
        #[arg(required_unless_present = "network")]
        machine: Option<String>,
        /// Every machine of this Network.
        #[arg(long, conflicts_with = "machine")]
        network: Option<String>,
        /// Wait until the machines are back and checked.
        #[arg(long)]
        wait: bool,
        /// How long to wait for each machine, in seconds.
        #[arg(long, default_value_t = 660)]
        timeout: u64,
    },
    /// Snapshots a Network's Volumes (NixOps backup): creates a Backup the
    /// operator carries out.
    Backup {
        network: String,
        /// Only this Volume (repeatable); default: all of the Network's.
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Keep only the newest N complete Backups of the Network.
        #[arg(long)]
        keep_last: Option<i32>,
        /// Wait until every snapshot is complete.
        #[arg(long)]
        wait: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// The Backups and their snapshots (NixOps backup-status).
    Backups { network: Option<String> },
    /// New Volumes from a Backup's snapshots (NixOps restore).
    Restore {
        backup: String,
        /// Only this Volume's snapshot (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Swap the restored Volumes into this Machine in place of the
        /// originals, stopping it first and starting it after, as NixOps
        /// restore did (repeatable).
        #[arg(long = "machine")]
        machines: Vec<String>,
        /// How long to wait for each stop, swap and start, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Follows the deployment of a machine or a Network with a progress
    /// line per machine; exits non-zero when one fails or rolls back.
    Deploy {
        #[arg(required_unless_present = "network")]
        machine: Option<String>,
        /// Every machine of this Network.
        #[arg(long, conflicts_with = "machine")]
        network: Option<String>,
        /// Set spec.nixos.closure first (one machine).
        #[arg(long, requires = "machine")]
        closure: Option<String>,
        /// Patch even though a GitOps tool manages the Machine.
        #[arg(long)]
        force: bool,
        /// Wait until every machine runs its closure or failed.
        #[arg(long)]
        wait: bool,
        /// Only show what activating the closure (--closure, else the
        /// Machine's) would change: the operator copies it to the machine
        /// and runs switch-to-configuration dry-activate; nothing else changes.
        #[arg(long, requires = "machine", conflicts_with = "wait")]
        dry_activate: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

/// Why a command failed; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// Bad flags or a missing object: the message says what to change.
    #[error("{0}")]
    Usage(String),
    /// The machine cannot be reached as pinned (wrong host key, no key).
    #[error("{0}")]
    Refused(String),
    /// The operation ran and failed (a degraded check, a failed deploy).
    #[error("{0}")]
    Failed(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl PluginError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Failed(_) => 1,
            Self::Kube(_) | Self::Usage(_) => 2,
            Self::Timeout(_) => 3,
            // As ssh does when it cannot connect.
            Self::Refused(_) => 255,
        }
    }
}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;

/// The cluster connection and the namespace to work in.
pub struct Kube {
    pub client: Client,
    pub namespace: String,
    pub all_namespaces: bool,
}

impl Kube {
    pub async fn connect(global: &Global) -> Result<Self> {
        let options = KubeConfigOptions { context: global.context.clone(), cluster: None, user: None };
        let config = match &global.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| PluginError::Usage(format!("--kubeconfig {}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(kubeconfig, &options).await
            }
            None => Config::from_kubeconfig(&options).await,
        };
        let config = match config {
            Ok(config) => config,
            Err(err) if global.context.is_none() => {
                Config::incluster().map_err(|_| PluginError::Usage(format!("no usable kubeconfig: {err}")))?
            }
            Err(err) => return Err(PluginError::Usage(format!("kubeconfig: {err}"))),
        };
        let namespace = global.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(PluginError::Kube)?;
        Ok(Self { client, namespace, all_namespaces: global.all_namespaces })
    }

    pub fn machines(&self) -> Api<Machine> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A Machine of the namespace, or an error naming it.
    pub async fn machine(&self, name: &str) -> Result<Machine> {
        self.machines().get_opt(name).await?.ok_or_else(|| {
            PluginError::Usage(format!("Machine {name} not found in namespace {} (use -n NAMESPACE)", self.namespace))
        })
    }

    /// Machines of the namespace (all with -A), optionally of one Network, by name.
    pub async fn list_machines(&self, network: Option<&str>) -> Result<Vec<Machine>> {
        let api = if self.all_namespaces { Api::all(self.client.clone()) } else { self.machines() };
        let mut machines: Vec<Machine> = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|m| network.is_none_or(|n| m.spec.network_ref.name == n))
            .collect();
        machines.sort_by_key(|m| (m.metadata.namespace.clone(), m.metadata.name.clone()));
        Ok(machines)
    }
}

/// Runs the command line; returns the exit status.
pub async fn run(cli: Cli) -> i32 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            err.exit_code()
        }
    }
}

async fn dispatch(cli: Cli) -> Result<i32> {
    let kube = Kube::connect(&cli.global).await?;
    let format = cli.global.output;
    match cli.command {
        Command::Info { network } => info::run(&kube, network.as_deref(), format).await.map(|()| 0),
        Command::Ssh { machine, tty, command } => connect::ssh(&kube, &machine, tty, &command).await,
        Command::Scp { recursive, paths } => connect::scp(&kube, recursive, &paths).await,
        Command::ListGenerations { machine } => generations::list(&kube, &machine, format).await.map(|()| 0),
        Command::BuildLog { machine } => build_log::show(&kube, &machine).await.map(|()| 0),
        Command::Rollback { machine, to, previous, force, wait, timeout } => {
            let to =
                if previous { generations::Choice::Previous } else { generations::Choice::Number(to.unwrap_or(0)) };
            generations::rollback(&kube, &machine, to, force, wait.then_some(Duration::from_secs(timeout)))
                .await
                .map(|()| 0)
        }
        Command::Check { machine, all, timeout } => {
            let machines = match (all, machine) {
                (true, _) => kube.list_machines(None).await?,
                (false, Some(name)) => vec![kube.machine(&name).await?],
                (false, None) => return Err(PluginError::Usage("name a machine or give --all".into())),
            };
            requests::check(&kube, machines, Duration::from_secs(timeout), format).await.map(|()| 0)
        }
        Command::Reboot { machine, network, wait, timeout } => {
            requests::reboot(&kube, machine.as_deref(), network.as_deref(), wait, Duration::from_secs(timeout))
                .await
                .map(|()| 0)
        }
        Command::Backup { network, volumes, keep_last, wait, timeout } => {
            let wait = wait.then_some(Duration::from_secs(timeout));
            backups::backup(&kube, &network, &volumes, keep_last, wait).await.map(|()| 0)
        }
        Command::Backups { network } => backups::list(&kube, network.as_deref(), format).await.map(|()| 0),
        Command::Restore { backup, volumes, machines, timeout } => {
            backups::restore(&kube, &backup, &volumes, &machines, Duration::from_secs(timeout)).await.map(|()| 0)
        }
        Command::Deploy { machine: Some(machine), closure, dry_activate: true, timeout, .. } => {
            requests::dry_activate(&kube, &machine, closure.as_deref(), Duration::from_secs(timeout)).await.map(|()| 0)
        }
        Command::Deploy { machine, network, closure, force, wait, timeout, .. } => {
            let deploy = requests::Deploy {
                machine: machine.as_deref(),
                network: network.as_deref(),
                closure: closure.as_deref(),
                force,
                wait: wait.then_some(Duration::from_secs(timeout)),
            };
            requests::deploy(&kube, deploy).await.map(|()| 0)
        }
    }
}

/// Every change the plugin makes is recorded under its own field manager.
pub fn patch_params() -> kube::api::PatchParams {
    kube::api::PatchParams { field_manager: Some("kubectl-nixops".into()), ..Default::default() }
}

/// A name for a request (the annotation's value) no earlier one had.
pub fn request_id() -> String {
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    let now = k8s_openapi::jiff::Timestamp::now();
    format!("{}-{}", now.as_second(), bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn krew_style_flags_go_before_or_after_the_command() {
        let cli =
            Cli::try_parse_from(["kubectl-nixops", "-n", "prod", "info", "-o", "wide", "--context", "c"]).unwrap();
        assert_eq!(cli.global.namespace.as_deref(), Some("prod"));
        assert_eq!(cli.global.output, Some(Format::Wide));
        assert_eq!(cli.global.context.as_deref(), Some("c"));
        let cli = Cli::try_parse_from(["kubectl-nixops", "ssh", "web-1", "--", "uname", "-a"]).unwrap();
        let Command::Ssh { machine, command, .. } = cli.command else { panic!() };
        assert_eq!((machine.as_str(), command), ("web-1", vec!["uname".to_owned(), "-a".to_owned()]));
        assert!(Cli::try_parse_from(["kubectl-nixops", "rollback", "web-1"]).is_err(), "--to or --previous");
        assert!(Cli::try_parse_from(["kubectl-nixops", "check"]).is_err(), "a machine or --all");
        assert!(Cli::try_parse_from(["kubectl-nixops", "-A", "check", "--all"]).is_ok());
    }
}
