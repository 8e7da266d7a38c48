//! What runs on a machine around a deployment, as shell scripts built here
//! (pure, unit-tested) and run over SSH: reading the active system,
//! activating a closure, health checks, the magic-rollback watchdog and
//! confirmation, and rolling back.
//!
//! Magic rollback follows deploy-rs: after a successful activation the
//! machine starts a detached watchdog. The operator confirms by creating a
//! directory over a *new* SSH connection; the watchdog rolls back if that
//! does not happen in time. Both sides claim the decision with `mkdir`,
//! which is atomic, so exactly one of confirm and rollback wins.

use crate::api::machine::{ActivationAction, HealthCheck};

/// The system profile NixOS boots from.
pub const PROFILE: &str = "/nix/var/nix/profiles/system";
/// Where the operator keeps its markers and logs on the machine (a tmpfs on NixOS).
pub const STATE_DIR: &str = "/run/nixops";

/// Exit status of the activation script when the profile could not be set.
pub const EXIT_PROFILE_FAILED: u32 = 90;
/// switch-to-configuration's exit status when a reboot is needed.
pub const EXIT_REBOOT_REQUIRED: u32 = 100;
/// Exit status of confirm/rollback when the watchdog had already decided.
pub const EXIT_ALREADY_DECIDED: u32 = 3;
/// Exit status of confirm while the watchdog is rolling back.
pub const EXIT_ROLLING_BACK: u32 = 4;
/// Exit status of rollback when there is no earlier generation.
pub const EXIT_NO_PREVIOUS: u32 = 2;

/// What is active on a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// Target of /run/current-system.
    pub current: Option<String>,
    /// Target of the system profile (the boot default).
    pub profile: Option<String>,
    /// The profile's generation number.
    pub generation: Option<i64>,
    /// Whether `zstd` is on the machine's PATH (compressed pushes).
    pub has_zstd: bool,
}

impl NodeState {
    /// The closure an action makes "active": the boot default for `boot`,
    /// the running system otherwise.
    pub fn active_for(&self, action: ActivationAction) -> Option<&str> {
        match action {
            ActivationAction::Boot => self.profile.as_deref(),
            _ => self.current.as_deref(),
        }
    }
}

/// Prints the machine's state as key=value lines.
pub fn probe_script() -> String {
    format!(
        "printf 'current=%s\\n' \"$(readlink -f /run/current-system 2>/dev/null)\"\n\
         printf 'profile=%s\\n' \"$(readlink -f {PROFILE} 2>/dev/null)\"\n\
         printf 'generation=%s\\n' \"$(readlink {PROFILE} 2>/dev/null)\"\n\
         if command -v zstd >/dev/null 2>&1; then echo zstd=yes; fi\n"
    )
}

/// Reads what [`probe_script`] printed.
pub fn parse_probe(stdout: &str) -> NodeState {
    let mut state = NodeState::default();
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        let value = (!value.is_empty()).then(|| value.to_owned());
        match key {
            "current" => state.current = value,
            "profile" => state.profile = value,
            "generation" => state.generation = value.as_deref().and_then(generation_number),
            "zstd" => state.has_zstd = value.as_deref() == Some("yes"),
            _ => {}
        }
    }
    state
}

/// `system-12-link` → 12.
fn generation_number(link: &str) -> Option<i64> {
    link.rsplit('/').next()?.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Magic rollback settings of one activation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watchdog {
    /// Names this deployment's markers; letters, digits and '-' only.
    pub token: String,
    pub timeout_seconds: u32,
}

/// Sets the profile (for switch and boot), runs switch-to-configuration,
/// and on success starts the watchdog. Activation output goes to a file so
/// a dropped connection cannot kill activation halfway with SIGPIPE.
pub fn activate_script(closure: &str, action: ActivationAction, watchdog: Option<&Watchdog>) -> String {
    let c = shell_quote(closure);
    let arg = action.as_arg();
    let mut script = format!("set -u\nmkdir -p {STATE_DIR}\n");
    if matches!(action, ActivationAction::Switch | ActivationAction::Boot) {
        script += &format!("nix-env -p {PROFILE} --set {c} || exit {EXIT_PROFILE_FAILED}\n");
    }
    script += &format!("{c}/bin/switch-to-configuration {arg} >{STATE_DIR}/activation.log 2>&1 </dev/null\nrc=$?\n");
    if let Some(w) = watchdog {
        let token = &w.token;
        script += &format!(
            "if [ $rc -eq 0 ] || [ $rc -eq {EXIT_REBOOT_REQUIRED} ]; then\n\
             cat >{STATE_DIR}/watchdog-{token}.sh <<'NIXOPS_WATCHDOG'\n{}NIXOPS_WATCHDOG\n\
             nohup setsid sh {STATE_DIR}/watchdog-{token}.sh </dev/null >/dev/null 2>&1 &\n\
             fi\n",
            watchdog_script(closure, action, w)
        );
    }
    script += &format!("tail -c 4000 {STATE_DIR}/activation.log\nexit $rc\n");
    script
}

/// Waits for the confirmation; without it, claims the decision and rolls back.
fn watchdog_script(closure: &str, action: ActivationAction, w: &Watchdog) -> String {
    let token = &w.token;
    // The note is written once the rollback is over, so whoever reads it
    // knows the machine runs the previous generation again.
    format!(
        "i=0\nwhile [ $i -lt {t} ]; do\n  [ -d {STATE_DIR}/decided-{token} ] && exit 0\n  sleep 1\n  i=$((i+1))\ndone\n\
         mkdir {STATE_DIR}/decided-{token} 2>/dev/null || exit 0\n\
         ( {steps} ) >{STATE_DIR}/rollback-{token}.log 2>&1\n\
         echo 'no confirmation for {closure} within {t} s; rolled back' >{STATE_DIR}/rolledback-{token}\n",
        steps = rollback_steps(action).trim_end().replace('\n', "\n  "),
        t = w.timeout_seconds,
    )
}

/// Re-activates the previous generation.
fn rollback_steps(action: ActivationAction) -> String {
    match action {
        ActivationAction::Switch | ActivationAction::Boot => format!(
            "nix-env -p {PROFILE} --rollback >/dev/null 2>&1 || {{ echo 'no previous generation to roll back to'; exit {EXIT_NO_PREVIOUS}; }}\n\
             {PROFILE}/bin/switch-to-configuration {} </dev/null\n",
            action.as_arg()
        ),
        // `test` left the boot default alone: activate it again.
        ActivationAction::Test => format!(
            "[ -e {PROFILE} ] || {{ echo 'no previous generation to roll back to'; exit {EXIT_NO_PREVIOUS}; }}\n\
             {PROFILE}/bin/switch-to-configuration test </dev/null\n"
        ),
        ActivationAction::DryActivate => "true\n".into(),
    }
}

/// The operator's confirmation. Exits 0 when confirmed (also when this
/// operator confirmed before a restart), [`EXIT_ALREADY_DECIDED`] with the
/// watchdog's note once the machine has rolled back, and
/// [`EXIT_ROLLING_BACK`] while the watchdog is still rolling back.
pub fn confirm_script(token: &str) -> String {
    format!(
        "mkdir -p {STATE_DIR}\n\
         if mkdir {STATE_DIR}/decided-{token} 2>/dev/null; then touch {STATE_DIR}/confirmed-{token}; exit 0; fi\n\
         [ -e {STATE_DIR}/confirmed-{token} ] && exit 0\n\
         [ -e {STATE_DIR}/rolledback-{token} ] || exit {EXIT_ROLLING_BACK}\n\
         cat {STATE_DIR}/rolledback-{token}\nexit {EXIT_ALREADY_DECIDED}\n"
    )
}

/// Rolls back on the operator's initiative (failed activation or health
/// check); with a watchdog, only if it has not already done so.
pub fn rollback_script(action: ActivationAction, token: Option<&str>) -> String {
    let mut script = String::new();
    if let Some(token) = token {
        script += &format!(
            "mkdir -p {STATE_DIR}\nmkdir {STATE_DIR}/decided-{token} 2>/dev/null || \
             [ -e {STATE_DIR}/confirmed-{token} ] || exit {EXIT_ALREADY_DECIDED}\n"
        );
    }
    script + &rollback_steps(action)
}

/// A health check as a command on the machine; exit 0 means healthy.
pub fn health_script(check: &HealthCheck) -> String {
    let timeout = check.timeout_seconds.max(1);
    if let Some(http) = &check.http {
        format!(
            "code=$(curl -sS -o /dev/null -w '%{{http_code}}' --max-time {timeout} {url}) || exit 1\n\
             [ \"$code\" = {expected} ] || {{ echo \"HTTP status $code, expected {expected}\"; exit 1; }}\n",
            url = shell_quote(&http.url),
            expected = http.expected_status,
        )
    } else {
        let command = check.command.as_deref().unwrap_or("true");
        format!("timeout {timeout} sh -c {} 2>&1", shell_quote(command))
    }
}

/// A short human description of a check, for messages.
pub fn describe_check(check: &HealthCheck) -> String {
    match (&check.http, &check.command) {
        (Some(http), _) => format!("GET {}", http.url),
        (None, Some(command)) => format!("`{command}`"),
        (None, None) => "an empty check".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_is_parsed() {
        let state = parse_probe(
            "current=/nix/store/abc-sys\nprofile=/nix/store/def-sys\ngeneration=system-12-link\nzstd=yes\n",
        );
        assert_eq!(state.current.as_deref(), Some("/nix/store/abc-sys"));
        assert_eq!(state.generation, Some(12));
        assert!(state.has_zstd);
        assert_eq!(state.active_for(ActivationAction::Boot), Some("/nix/store/def-sys"));
        assert_eq!(state.active_for(ActivationAction::Switch), Some("/nix/store/abc-sys"));
        let empty = parse_probe("current=\nprofile=\ngeneration=\n");
        assert_eq!(empty, NodeState::default());
    }

    #[test]
    fn scripts_are_valid_shell() {
        let w = Watchdog { token: "t1".into(), timeout_seconds: 5 };
        for action in [ActivationAction::Switch, ActivationAction::Test, ActivationAction::Boot] {
            for script in [
                activate_script("/nix/store/x-s", action, Some(&w)),
                rollback_script(action, Some("t1")),
                confirm_script("t1"),
                probe_script(),
            ] {
                let out = std::process::Command::new("sh").args(["-n", "-c", &script]).output().unwrap();
                assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn only_switch_and_boot_set_the_profile() {
        assert!(activate_script("/nix/store/x-s", ActivationAction::Switch, None).contains("--set"));
        assert!(activate_script("/nix/store/x-s", ActivationAction::Boot, None).contains("--set"));
        assert!(!activate_script("/nix/store/x-s", ActivationAction::Test, None).contains("--set"));
        let w = Watchdog { token: "t1".into(), timeout_seconds: 7 };
        let script = activate_script("/nix/store/x-s", ActivationAction::Switch, Some(&w));
        assert!(script.contains("decided-t1") && script.contains("-lt 7"), "{script}");
    }
}
