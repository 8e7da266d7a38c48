//! Named fault points where tests make the operator fail at an exact step:
//! `kill` ends the process with SIGKILL right there (what a crash, an OOM
//! kill or a node loss does), `drop` cuts the SSH connection the step is
//! using. Tests set them with the `FAILPOINTS` variable of fail-rs, e.g.
//! `FAILPOINTS=deploy-after-start=return(kill)`. Without the
//! `fault-injection` feature every point compiles to nothing.

use crate::ssh::Session;

/// The points, in the order a deployment passes them.
pub mod points {
    /// The closure is on the machine; nothing is activated yet.
    pub const DEPLOY_AFTER_PUSH: &str = "deploy-after-push";
    /// The activation was started on the machine (watchdog armed, switch
    /// running or done); the operator has not seen how it ended.
    pub const DEPLOY_AFTER_START: &str = "deploy-after-start";
    /// The switch ended; the health checks are about to run.
    pub const DEPLOY_BEFORE_HEALTH_CHECKS: &str = "deploy-before-health-checks";
    /// The health checks passed; the confirmation is about to be sent.
    pub const DEPLOY_BEFORE_CONFIRM: &str = "deploy-before-confirm";
    /// A build script was started on a builder (its credentials sent);
    /// the operator has not seen it end.
    pub const BUILD_AFTER_START: &str = "build-after-start";
    /// A build was started or found; the reconcile is about to look whether
    /// it ended. `return(hold)` makes the reconcile wait there until the
    /// build has ended, as when a build fails faster than the reconcile
    /// that started it gets to look.
    pub const BUILD_BEFORE_OUTCOME: &str = "build-before-outcome";
    /// A reboot is recorded as under way (status.lastReboot Rebooting, the
    /// marker on the machine); systemctl reboot is not asked for yet.
    pub const REBOOT_BEFORE_REQUEST: &str = "reboot-before-request";
    /// systemctl reboot was asked for; the operator has not seen the
    /// machine come back.
    pub const REBOOT_AFTER_REQUEST: &str = "reboot-after-request";
    /// The intent to create a cloud resource is recorded; the call is next.
    pub const CREATE_BEFORE_CALL: &str = "create-before-call";
    /// The cloud answered a create; its ID is not recorded yet.
    ///
    /// Both create points are also evaluated per kind of resource, as
    /// `create-after-call:<kind>` with kind one of `instance`, `volume`,
    /// `bucket`, `vpc`, `subnet`, `internet-gateway`, `security-group`,
    /// `key-pair`, `snapshot` (a Backup's, after the call only), so a test
    /// kills the operator after exactly that create.
    pub const CREATE_AFTER_CALL: &str = "create-after-call";
    /// A libvirt machine's domain is defined (root disk overlay and seed
    /// exist) but not started, and its ID is not recorded yet.
    pub const LIBVIRT_AFTER_DEFINE: &str = "libvirt-after-define";
    /// A Network's cloud resources are deleted and its credentials Secret
    /// released; its own finalizer is not removed yet.
    pub const NETWORK_AFTER_CREDENTIALS_RELEASED: &str = "network-after-credentials-released";
    /// A mesh member's key Secret is created; the Network's status does
    /// not record the member's key and address yet.
    pub const MESH_AFTER_KEY_CREATED: &str = "mesh-after-key-created";
    /// A lookup of a cloud resource the operator creates (by its UID tag,
    /// or by its name within its VPC) is about to run. `return` makes it
    /// find nothing, as a cloud whose reads lag its writes does:
    /// `tag-lookup-empty=3*return` empties the first three lookups.
    pub const TAG_LOOKUP_EMPTY: &str = "tag-lookup-empty";
}

/// Whether this lookup is to find nothing ([`points::TAG_LOOKUP_EMPTY`]).
pub fn lookup_lags() -> bool {
    #[cfg(feature = "fault-injection")]
    {
        let lags = fail::eval(points::TAG_LOOKUP_EMPTY, |_| ()).is_some();
        if lags {
            tracing::warn!(point = points::TAG_LOOKUP_EMPTY, "fault point: the lookup finds nothing");
        }
        lags
    }
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// Whether point `name` is set to `return(hold)`: the step there is to
/// wait for what the point's documentation names.
pub fn holds(name: &str) -> bool {
    #[cfg(feature = "fault-injection")]
    {
        let holds = fail::eval(name, |arg| arg.unwrap_or_default()).is_some_and(|action| action == "hold");
        if holds {
            tracing::warn!(point = name, "fault point: holding");
        }
        holds
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = name;
        false
    }
}

/// Reads `FAILPOINTS` (fault-injection builds only).
pub fn setup() {
    #[cfg(feature = "fault-injection")]
    {
        // The scenario lives as long as the process.
        std::mem::forget(fail::FailScenario::setup());
    }
}

/// Evaluates fault point `name`; `session` is the connection a `drop` cuts.
pub async fn point(name: &str, session: Option<&Session>) {
    #[cfg(feature = "fault-injection")]
    {
        let Some(action) = fail::eval(name, |arg| arg.unwrap_or_default()) else { return };
        tracing::warn!(point = name, action = %action, "fault point");
        match action.as_str() {
            "kill" => {
                let pid = std::process::id().to_string();
                let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
                // SIGKILL is not handled; nothing after this line runs.
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
            "drop" => {
                if let Some(session) = session {
                    session.disconnect().await;
                }
            }
            _ => {}
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = (name, session);
}
