#![deny(warnings)]
// The release build of the controller futures needs a deeper query limit
// than the default 128 ("queries overflow the depth limit").
#![recursion_limit = "256"]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use nixops_operator::controller::Settings;
use nixops_operator::crdgen;
use nixops_operator::leader::LeaseTiming;
use nixops_operator::operator::{self, Options};

/// NixOps as a Kubernetes operator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers against the cluster in KUBECONFIG (or in-cluster config).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (pipe to `kubectl apply -f -`).
    Crds {
        /// Write one file per kind into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "NIXOPS_NAMESPACE")]
    namespace: Option<String>,

    /// Most objects of one kind reconciled at once.
    #[arg(long, env = "NIXOPS_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "NIXOPS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Elect a leader through a Lease, so only one replica reconciles.
    #[arg(long, env = "NIXOPS_LEADER_ELECTION", default_value_t = false)]
    leader_election: bool,

    /// Namespace of the leader Lease (default: POD_NAMESPACE, else "default").
    #[arg(long, env = "NIXOPS_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(long, env = "NIXOPS_LEASE_NAME", default_value = "nixops-operator")]
    lease_name: String,

    /// Seconds a lease is valid without renewal.
    #[arg(long, env = "NIXOPS_LEASE_DURATION", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// Seconds the leader keeps acting without a successful renewal (shorter
    /// than the lease duration: it stops before a standby may take over).
    #[arg(long, env = "NIXOPS_LEASE_RENEW_DEADLINE", default_value_t = 10)]
    lease_renew_deadline_seconds: u64,

    /// Seconds between lease renewals (and retries by standbys).
    #[arg(long, env = "NIXOPS_LEASE_RETRY", default_value_t = 2)]
    lease_retry_seconds: u64,

    /// Seconds between checks of an up-to-date object.
    #[arg(long, env = "NIXOPS_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,

    /// Seconds to wait for an SSH connection.
    #[arg(long, env = "NIXOPS_SSH_TIMEOUT_SECONDS", default_value_t = 10)]
    ssh_timeout_seconds: u64,

    /// Seconds after its login an SSH session is kept for the next look
    /// at its machine, as NixOps kept an SSH ControlMaster: a deployment
    /// that follows a resync starts without a new login. Kept only after a
    /// look that activated nothing (a new system proves new logins work)
    /// and never through a jump host. 0 logs in for every look.
    #[arg(long, env = "NIXOPS_SSH_KEEP_SECONDS", default_value_t = 600)]
    ssh_keep_seconds: u64,

    /// The largest NAR (one store path, compressed or not) read from a
    /// binary cache, in MiB; a larger one is refused before it is read.
    #[arg(long, env = "NIXOPS_MAX_NAR_MIB", default_value_t = 4096)]
    max_nar_mib: u64,

    /// Seconds a cloud create whose outcome is unknown is looked for by its
    /// UID tag before it is tried again (or, after a crash, the object stalls).
    #[arg(long, env = "NIXOPS_CREATE_PENDING_SECONDS", default_value_t = 120)]
    create_pending_seconds: u64,

    /// Seconds to let reconciliations in flight finish after SIGTERM.
    #[arg(long, env = "NIXOPS_SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    shutdown_grace_seconds: u64,

    /// Log format.
    #[arg(long, env = "NIXOPS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIXOPS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn identity() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .map(|h| format!("{h}-{}", std::process::id()))
        .unwrap_or_else(|_| format!("nixops-operator-{}", std::process::id()))
}

async fn run(args: RunArgs) -> Result<(), operator::RunError> {
    init_logging(args.log_format);
    let lease_namespace =
        args.lease_namespace.or_else(|| std::env::var("POD_NAMESPACE").ok()).unwrap_or_else(|| "default".to_owned());
    let opts = Options {
        namespace: args.namespace,
        concurrency: args.concurrency,
        metrics_addr: args.metrics_addr,
        leader_election: args.leader_election.then_some((lease_namespace, args.lease_name)),
        lease: LeaseTiming {
            duration: Duration::from_secs(args.lease_duration_seconds),
            renew_deadline: Duration::from_secs(args.lease_renew_deadline_seconds),
            retry: Duration::from_secs(args.lease_retry_seconds),
        },
        identity: identity(),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
        settings: Settings {
            resync: Duration::from_secs(args.resync_seconds),
            ssh_timeout: Duration::from_secs(args.ssh_timeout_seconds),
            ssh_keep: Duration::from_secs(args.ssh_keep_seconds),
            max_nar_bytes: args.max_nar_mib.saturating_mul(1 << 20),
            create_pending_window: Duration::from_secs(args.create_pending_seconds),
            ..Settings::default()
        },
    };
    operator::run(opts).await
}

/// Stack of each runtime thread (workers and blocking threads).
const WORKER_STACK_BYTES: usize = 8 * 1024 * 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    nixops_operator::fault::setup();
    let result: Result<(), String> = match cli.command {
        Command::Crds { out_dir: Some(dir) } => crdgen::write_dir(&dir).map_err(|e| e.to_string()),
        Command::Crds { out_dir: None } => {
            crdgen::render_stream().map(|yaml| print!("{yaml}")).map_err(|e| e.to_string())
        }
        // Reconciles nest deep futures (a deployment from an S3 cache, with
        // the mesh and build steps around it); tokio's 2 MiB worker stacks
        // overflowed on that path in debug builds. 8 MiB, as the main
        // thread has, is address space, not resident memory.
        Command::Run(args) => {
            match tokio::runtime::Builder::new_multi_thread().thread_stack_size(WORKER_STACK_BYTES).enable_all().build()
            {
                Ok(rt) => rt.block_on(run(args)).map_err(|e| e.to_string()),
                Err(e) => Err(format!("cannot start the async runtime: {e}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nixops-operator: {err}");
            ExitCode::FAILURE
        }
    }
}
