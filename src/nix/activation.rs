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
/// Recorded as the switch's exit status when it ran past its timeout.
pub const EXIT_TIMED_OUT: u32 = 124;
/// Exit status of confirm when the machine had already rolled back.
pub const EXIT_ALREADY_DECIDED: u32 = 3;
/// Exit status of confirm while the watchdog is rolling back.
pub const EXIT_ROLLING_BACK: u32 = 4;

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

/// One activation on a machine: everything the machine keeps about it
/// lives under `/run/nixops/deploy-<token>/`, so the operator (or its
/// successor after a restart) settles it from facts, never from guesses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activation {
    /// Names this deployment's directory; letters, digits and '-' only.
    pub token: String,
    pub closure: String,
    pub action: ActivationAction,
    /// Seconds switch-to-configuration may run before it is stopped.
    pub timeout_seconds: u32,
    /// Magic rollback: seconds the watchdog waits for the confirmation
    /// once the switch has ended.
    pub confirm_seconds: Option<u32>,
}

/// Why a machine was rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollbackCause {
    /// switch-to-configuration (or setting the profile) failed or timed out.
    SwitchFailed,
    /// A health check failed.
    Unhealthy,
    /// Magic rollback: nobody confirmed in time.
    Unconfirmed,
}

impl RollbackCause {
    fn as_word(self) -> &'static str {
        match self {
            Self::SwitchFailed => "switch-failed",
            Self::Unhealthy => "unhealthy",
            Self::Unconfirmed => "unconfirmed",
        }
    }

    fn from_word(word: &str) -> Option<Self> {
        [Self::SwitchFailed, Self::Unhealthy, Self::Unconfirmed].into_iter().find(|c| c.as_word() == word)
    }
}

/// The outcome of an activation, as the machine recorded it in `outcome`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The operator confirmed the new system.
    Confirmed,
    /// The machine runs the system it ran before again; the note says why.
    RolledBack(RollbackCause, String),
    /// Rolling back failed; the machine may run anything. The note says what failed.
    RollbackFailed(String),
    /// There was no earlier system to go back to.
    NothingToRollBackTo(String),
}

/// What a machine keeps about one activation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActivationFacts {
    /// The activation was started (its directory exists).
    pub started: bool,
    /// switch-to-configuration's exit status, once it has ended
    /// ([`EXIT_PROFILE_FAILED`] when the profile could not be set,
    /// [`EXIT_TIMED_OUT`] when it ran too long).
    pub switch_rc: Option<u32>,
    /// The last lines the switch printed.
    pub log_tail: String,
    /// Someone (operator or watchdog) has claimed the decision.
    pub decided: bool,
    pub outcome: Option<Outcome>,
}

impl Activation {
    fn dir(&self) -> String {
        format!("{STATE_DIR}/deploy-{}", self.token)
    }

    /// Starts the activation detached from the SSH session, at most once
    /// per token: records the system and generation active now (the
    /// rollback target), arms the watchdog (magic rollback) *before* the
    /// switch, sets the profile, runs switch-to-configuration under a
    /// timeout and records its exit status. A dropped connection or a
    /// killed operator changes none of that.
    pub fn start_script(&self) -> String {
        let d = self.dir();
        // Earlier activations that have an outcome are settled: their records go.
        let mut script = format!(
            "set -u\nmkdir -p {STATE_DIR}\nmkdir {d} 2>/dev/null || {{ echo already-started; exit 0; }}\n\
             for o in {STATE_DIR}/deploy-*/outcome; do [ -e \"$o\" ] && rm -rf \"${{o%/outcome}}\"; done\n\
             cat >{d}/rollback.sh <<'NIXOPS_ROLLBACK'\n{}NIXOPS_ROLLBACK\n\
             cat >{d}/activate.sh <<'NIXOPS_ACTIVATE'\n{}NIXOPS_ACTIVATE\n",
            self.rollback_sh(),
            self.activate_sh(),
        );
        if self.confirm_seconds.is_some() {
            script += &format!("cat >{d}/watchdog.sh <<'NIXOPS_WATCHDOG'\n{}NIXOPS_WATCHDOG\n", self.watchdog_sh());
        }
        script += &format!("nohup setsid sh {d}/activate.sh </dev/null >/dev/null 2>&1 &\necho started\n");
        script
    }

    fn activate_sh(&self) -> String {
        let d = self.dir();
        let c = shell_quote(&self.closure);
        let arg = self.action.as_arg();
        // The rollback target: the running system (the boot default for `boot`).
        let previous = match self.action {
            ActivationAction::Boot => format!("readlink -f {PROFILE}"),
            _ => "readlink -f /run/current-system".to_owned(),
        };
        let mut script = format!(
            "d={d}\nfinish() {{ echo \"$1\" >$d/switch-rc.tmp && mv $d/switch-rc.tmp $d/switch-rc; exit 0; }}\n\
             generation() {{ l=$(readlink {PROFILE} 2>/dev/null) || return 0; l=${{l#system-}}; echo ${{l%-link}}; }}\n\
             echo \"$(generation)\" >$d/previous-generation\n\
             echo \"$({previous} 2>/dev/null)\" >$d/previous-system\n"
        );
        if self.confirm_seconds.is_some() {
            script += "nohup setsid sh $d/watchdog.sh </dev/null >/dev/null 2>&1 &\n";
        }
        if matches!(self.action, ActivationAction::Switch | ActivationAction::Boot) {
            script += &format!(
                "nix-env -p {PROFILE} --set {c} >$d/switch.log 2>&1 || finish {EXIT_PROFILE_FAILED}\n\
                 echo \"$(generation)\" >$d/new-generation\n"
            );
        }
        script += &format!(
            "timeout {t} {c}/bin/switch-to-configuration {arg} >>$d/switch.log 2>&1 </dev/null\nrc=$?\n\
             [ $rc -eq 124 ] && rc={EXIT_TIMED_OUT}\nfinish $rc\n",
            t = self.timeout_seconds.max(1),
        );
        script
    }

    /// Waits for the switch to end, then for the confirmation; without it,
    /// claims the decision and rolls back.
    fn watchdog_sh(&self) -> String {
        let d = self.dir();
        let confirm = self.confirm_seconds.unwrap_or_default();
        format!(
            "d={d}\ni=0\nwhile [ ! -e $d/switch-rc ] && [ $i -lt {switch_wait} ]; do sleep 1; i=$((i+1)); done\n\
             i=0\nwhile [ $i -lt {confirm} ]; do\n  [ -d $d/decided ] && exit 0\n  sleep 1\n  i=$((i+1))\ndone\n\
             mkdir $d/decided 2>/dev/null || exit 0\n\
             sh $d/rollback.sh {cause} 'no confirmation for {closure} within {confirm} s (magic rollback)'\n",
            switch_wait = self.timeout_seconds + 30,
            cause = RollbackCause::Unconfirmed.as_word(),
            closure = self.closure,
        )
    }

    /// Goes back to the recorded system and generation, removes the failed
    /// generation, and records the outcome; `$1` is the cause (a
    /// [`RollbackCause`] word), `$2` the reason.
    fn rollback_sh(&self) -> String {
        let d = self.dir();
        let arg = self.action.as_arg();
        let steps = match self.action {
            ActivationAction::Switch | ActivationAction::Boot => format!(
                "[ -n \"$prev_gen\" ] && [ -n \"$prev_sys\" ] || nothing\n\
                 nix-env -p {PROFILE} --switch-generation \"$prev_gen\" || exit 1\n\
                 \"$prev_sys\"/bin/switch-to-configuration {arg} </dev/null\n\
                 rc=$?; [ $rc -eq 0 ] || [ $rc -eq {EXIT_REBOOT_REQUIRED} ] || exit $rc\n\
                 if [ -n \"$new_gen\" ] && [ \"$new_gen\" != \"$prev_gen\" ]; then\n\
                 \x20 nix-env -p {PROFILE} --delete-generations \"$new_gen\" || exit 1\nfi\n"
            ),
            // `test` left the profile alone: activate the running system again.
            ActivationAction::Test => {
                format!(
                    "[ -n \"$prev_sys\" ] || nothing\n\"$prev_sys\"/bin/switch-to-configuration test </dev/null\n\
                     rc=$?; [ $rc -eq 0 ] || [ $rc -eq {EXIT_REBOOT_REQUIRED} ] || exit $rc\n"
                )
            }
            ActivationAction::DryActivate => "true\n".to_owned(),
        };
        format!(
            "d={d}\ncause=$1\nreason=$2\n\
             prev_gen=$(cat $d/previous-generation 2>/dev/null)\nprev_sys=$(cat $d/previous-system 2>/dev/null)\n\
             new_gen=$(cat $d/new-generation 2>/dev/null)\n\
             record() {{ printf '%s\\n%s\\n' \"$1\" \"$2\" >$d/outcome.tmp && mv $d/outcome.tmp $d/outcome; }}\n\
             nothing() {{ record nothing-to-roll-back \"$reason; there is no earlier system to roll back to\"; exit 0; }}\n\
             ( set -u\n{steps}) >$d/rollback.log 2>&1 </dev/null\nrc=$?\n\
             [ -e $d/outcome ] && exit 0\n\
             if [ $rc -eq 0 ]; then\n\
             \x20 record \"rolled-back $cause\" \"$reason; rolled back to $prev_sys${{prev_gen:+ (generation $prev_gen)}}\"\n\
             else\n\
             \x20 record rollback-failed \"$reason; rolling back to $prev_sys failed (exit $rc): $(tail -c 400 $d/rollback.log | tr '\\n' ' ')\"\n\
             fi\n",
        )
    }

    /// Waits up to `seconds` for the switch to end, then prints the facts
    /// (see [`parse_facts`]).
    pub fn facts_script(&self, seconds: u32) -> String {
        let d = self.dir();
        format!(
            "d={d}\ni=0\nwhile [ -d $d ] && [ ! -e $d/switch-rc ] && [ $i -lt {seconds} ]; do sleep 1; i=$((i+1)); done\n\
             [ -d $d ] || {{ echo started=no; exit 0; }}\necho started=yes\n\
             [ -e $d/switch-rc ] && echo \"switch-rc=$(cat $d/switch-rc)\"\n\
             [ -d $d/decided ] && echo decided=yes\n\
             if [ -e $d/outcome ]; then echo \"outcome=$(head -n 1 $d/outcome)\"; echo \"note=$(tail -n +2 $d/outcome | tr '\\n' ' ')\"; fi\n\
             echo \"log=$(tail -c 2000 $d/switch.log 2>/dev/null | tr '\\n' '\\036')\"\n"
        )
    }

    /// The operator's confirmation (health checks passed; with magic
    /// rollback, over a new connection). Exits 0 when confirmed (also when
    /// confirmed before), [`EXIT_ALREADY_DECIDED`] with the outcome once
    /// the machine has rolled back, [`EXIT_ROLLING_BACK`] while it is.
    pub fn confirm_script(&self) -> String {
        let d = self.dir();
        format!(
            "d={d}\n[ -d $d ] || {{ echo 'no such activation'; exit 1; }}\n\
             if mkdir $d/decided 2>/dev/null; then printf 'confirmed\\n\\n' >$d/outcome.tmp && mv $d/outcome.tmp $d/outcome; exit 0; fi\n\
             [ -e $d/outcome ] || exit {EXIT_ROLLING_BACK}\n\
             [ \"$(head -n 1 $d/outcome)\" = confirmed ] && exit 0\n\
             tail -n +2 $d/outcome\nexit {EXIT_ALREADY_DECIDED}\n"
        )
    }

    /// Rolls back on the operator's initiative (failed switch or health
    /// check) unless the decision is already taken, then prints the facts.
    pub fn rollback_script(&self, cause: RollbackCause, reason: &str) -> String {
        let d = self.dir();
        format!(
            "d={d}\nif mkdir $d/decided 2>/dev/null; then sh $d/rollback.sh {} {}; fi\n{}",
            cause.as_word(),
            shell_quote(reason),
            self.facts_script(0)
        )
    }
}

/// Reads what [`Activation::facts_script`] printed.
pub fn parse_facts(stdout: &str) -> ActivationFacts {
    let mut facts = ActivationFacts::default();
    let mut outcome = None;
    let mut note = String::new();
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        match key {
            "started" => facts.started = value == "yes",
            "switch-rc" => facts.switch_rc = value.trim().parse().ok(),
            "decided" => facts.decided = value == "yes",
            "outcome" => outcome = Some(value.trim().to_owned()),
            "note" => note = value.trim().to_owned(),
            "log" => facts.log_tail = value.replace('\u{1e}', "\n").trim().to_owned(),
            _ => {}
        }
    }
    facts.outcome = outcome.and_then(|o| match o.split_once(' ').unwrap_or((o.as_str(), "")) {
        ("confirmed", _) => Some(Outcome::Confirmed),
        ("rolled-back", cause) => Some(Outcome::RolledBack(
            RollbackCause::from_word(cause).unwrap_or(RollbackCause::SwitchFailed),
            note.clone(),
        )),
        ("rollback-failed", _) => Some(Outcome::RollbackFailed(note.clone())),
        ("nothing-to-roll-back", _) => Some(Outcome::NothingToRollBackTo(note.clone())),
        _ => None,
    });
    facts
}

/// Makes the machine realise `closure` from the binary cache at `url`
/// itself, trusting only `public_keys`.
pub fn substitute_script(closure: &str, url: &str, public_keys: &[String]) -> String {
    format!(
        "nix-store --realise {} --option substituters {} --option trusted-public-keys {} --option require-sigs true >/dev/null",
        shell_quote(closure),
        shell_quote(url),
        shell_quote(&public_keys.join(" "))
    )
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

    fn activation(action: ActivationAction, confirm: Option<u32>) -> Activation {
        Activation {
            token: "t1".into(),
            closure: "/nix/store/x-s".into(),
            action,
            timeout_seconds: 240,
            confirm_seconds: confirm,
        }
    }

    #[test]
    fn scripts_are_valid_shell() {
        for action in [ActivationAction::Switch, ActivationAction::Test, ActivationAction::Boot] {
            for confirm in [None, Some(5)] {
                let a = activation(action, confirm);
                for script in [
                    a.start_script(),
                    a.activate_sh(),
                    a.watchdog_sh(),
                    a.rollback_sh(),
                    a.rollback_script(RollbackCause::Unhealthy, "it's broken"),
                    a.confirm_script(),
                    a.facts_script(10),
                    probe_script(),
                ] {
                    let out = std::process::Command::new("sh").args(["-n", "-c", &script]).output().unwrap();
                    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn only_switch_and_boot_set_the_profile_and_the_watchdog_comes_first() {
        assert!(activation(ActivationAction::Switch, None).activate_sh().contains("--set"));
        assert!(activation(ActivationAction::Boot, None).activate_sh().contains("--set"));
        assert!(!activation(ActivationAction::Test, None).activate_sh().contains("--set"));
        let magic = activation(ActivationAction::Switch, Some(7)).activate_sh();
        let armed = magic.find("watchdog.sh").expect("the watchdog is started");
        assert!(armed < magic.find("--set").unwrap(), "armed before the profile changes: {magic}");
        assert!(!activation(ActivationAction::Switch, None).activate_sh().contains("watchdog"));
    }

    #[test]
    fn facts_are_parsed() {
        let facts = parse_facts(
            "started=yes\nswitch-rc=1\ndecided=yes\noutcome=rolled-back unhealthy\nnote=switch failed; rolled back to /nix/store/a \nlog=line one\u{1e}line two\u{1e}\n",
        );
        assert!(facts.started && facts.decided);
        assert_eq!(facts.switch_rc, Some(1));
        assert_eq!(
            facts.outcome,
            Some(Outcome::RolledBack(RollbackCause::Unhealthy, "switch failed; rolled back to /nix/store/a".into()))
        );
        assert_eq!(facts.log_tail, "line one\nline two");
        assert_eq!(parse_facts("started=no\n"), ActivationFacts::default());
        let running = parse_facts("started=yes\nlog=\n");
        assert!(running.started && running.switch_rc.is_none() && running.outcome.is_none());
    }
}
