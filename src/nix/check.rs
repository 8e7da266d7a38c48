//! What `kubectl nixops check` and `reboot` run on a machine, as shell
//! scripts built here (pure, unit-tested) and run over SSH by the operator:
//! the probe NixOps `check` made (active system, failed systemd units, load,
//! free space for the store) and a reboot the operator can tell happened.
//!
//! A reboot is told from the machine's own facts: the operator leaves a
//! marker in `/run` (a tmpfs on NixOS, empty after every boot) before it
//! asks systemd to reboot; the machine has rebooted once it answers with the
//! pinned host key and the marker is gone.

use super::activation::{STATE_DIR, shell_quote};

/// systemctl of the running NixOS system, else of a systemd that runs here.
const SYSTEMCTL: &str = "if [ -x /run/current-system/sw/bin/systemctl ]; then systemctl=/run/current-system/sw/bin/systemctl\n\
     elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then systemctl=systemctl\n\
     else systemctl=; fi\n";

/// Prints the machine's health as key=value lines.
pub fn check_script() -> String {
    format!(
        "{SYSTEMCTL}\
         printf 'active=%s\\n' \"$(readlink -f /run/current-system 2>/dev/null)\"\n\
         printf 'load=%s\\n' \"$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)\"\n\
         df -Pk /nix 2>/dev/null | awk 'NR==2 {{print \"nix_kib=\" $2; print \"nix_free_kib=\" $4}}'\n\
         if [ -n \"$systemctl\" ]; then\n\
           echo systemd=yes\n\
           \"$systemctl\" list-units --state=failed --plain --no-legend --no-pager 2>/dev/null |\n\
             while read -r unit rest; do [ -n \"$unit\" ] && printf 'failed=%s\\n' \"$unit\"; done\n\
         fi\n\
         true\n"
    )
}

/// What [`check_script`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub active: Option<String>,
    pub load: Option<String>,
    pub nix_size_bytes: Option<i64>,
    pub nix_free_bytes: Option<i64>,
    /// Whether the machine runs systemd (else failed units are unknown).
    pub systemd: bool,
    pub failed_units: Vec<String>,
}

/// Reads what [`check_script`] printed.
pub fn parse_check(stdout: &str) -> Health {
    let mut health = Health::default();
    let kib = |v: &str| v.parse::<i64>().ok().map(|k| k.saturating_mul(1024));
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key {
            "active" => health.active = Some(value.to_owned()),
            "load" => health.load = Some(value.to_owned()),
            "nix_kib" => health.nix_size_bytes = kib(value),
            "nix_free_kib" => health.nix_free_bytes = kib(value),
            "systemd" => health.systemd = value == "yes",
            "failed" => health.failed_units.push(value.to_owned()),
            _ => {}
        }
    }
    health
}

impl Health {
    /// What is wrong with the machine, given the closure it should run
    /// (None when nothing is deployed to it); empty when nothing is.
    pub fn problems(&self, desired: Option<&str>) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(desired) = desired
            && self.active.as_deref() != Some(desired)
        {
            problems.push(format!(
                "runs {} instead of spec.nixos.closure {desired}",
                self.active.as_deref().unwrap_or("no system")
            ));
        }
        if !self.failed_units.is_empty() {
            problems.push(format!("failed units: {}", self.failed_units.join(", ")));
        }
        if !self.systemd {
            problems.push("no systemd found: units not checked".into());
        }
        problems
    }
}

/// Where the reboot marker of the operator lives on the machine.
fn reboot_marker() -> String {
    format!("{STATE_DIR}/reboot-request")
}

/// Leaves the marker naming `request`, after making sure there is a systemd
/// to ask for the reboot (exit status 2 if not).
pub fn reboot_mark_script(request: &str) -> String {
    format!(
        "{SYSTEMCTL}\
         if [ -z \"$systemctl\" ]; then echo 'no systemctl found: cannot reboot this machine' >&2; exit 2; fi\n\
         mkdir -p {STATE_DIR}\n\
         printf '%s\\n' {request} > {marker}\n",
        request = shell_quote(request),
        marker = reboot_marker(),
    )
}

/// Notes in the marker that the reboot was asked for, then asks systemd,
/// a second later and detached, so the command reports that the reboot is
/// on its way before the connection goes.
pub fn reboot_script() -> String {
    format!(
        "{SYSTEMCTL}\
         if [ -z \"$systemctl\" ]; then echo 'no systemctl found: cannot reboot this machine' >&2; exit 2; fi\n\
         echo asked >> {marker}\n\
         nohup sh -c \"sleep 1; exec $systemctl reboot\" </dev/null >/dev/null 2>&1 &\n",
        marker = reboot_marker(),
    )
}

/// Where a reboot stands, from the machine's marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebootProgress {
    /// The marker is gone (or is another request's): the machine rebooted.
    Rebooted,
    /// Asked for; the machine has not gone down yet.
    Pending,
    /// Marked but never asked for (the operator stopped in between).
    NotAsked,
}

/// Prints `rebooted`, `pending` or `not-asked` for `request` (see
/// [`RebootProgress`]).
pub fn reboot_done_script(request: &str) -> String {
    format!(
        "if [ \"$(head -n1 {marker} 2>/dev/null)\" != {request} ]; then echo rebooted\n\
         elif grep -qx asked {marker}; then echo pending\n\
         else echo not-asked; fi\n",
        marker = reboot_marker(),
        request = shell_quote(request),
    )
}

/// Reads what [`reboot_done_script`] printed; None for anything else.
pub fn parse_reboot_done(stdout: &str) -> Option<RebootProgress> {
    match stdout.trim() {
        "rebooted" => Some(RebootProgress::Rebooted),
        "pending" => Some(RebootProgress::Pending),
        "not-asked" => Some(RebootProgress::NotAsked),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh_n(script: &str) {
        let out = std::process::Command::new("sh").args(["-n", "-c", script]).output().unwrap();
        assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn scripts_are_valid_shell() {
        sh_n(&check_script());
        sh_n(&reboot_mark_script("it's 1"));
        sh_n(&reboot_script());
        sh_n(&reboot_done_script("it's 1"));
    }

    #[test]
    fn the_check_runs_here_and_is_read_back() {
        let out = std::process::Command::new("sh").args(["-c", &check_script()]).output().unwrap();
        assert!(out.status.success());
        let health = parse_check(&String::from_utf8_lossy(&out.stdout));
        assert!(health.load.as_deref().is_some_and(|l| l.split(' ').count() == 3), "{health:?}");
    }

    #[test]
    fn the_marker_tells_a_reboot_asked_for_from_one_that_was_not_and_from_one_done() {
        let dir = tempfile::tempdir().unwrap();
        let run = |script: &str| {
            let script = script.replace(STATE_DIR, &dir.path().display().to_string());
            let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
            parse_reboot_done(&String::from_utf8_lossy(&out.stdout))
        };
        let mark = |lines: &str| std::fs::write(dir.path().join("reboot-request"), lines).unwrap();
        assert_eq!(run(&reboot_done_script("r 1")), Some(RebootProgress::Rebooted), "no marker");
        mark("r 1\n");
        assert_eq!(run(&reboot_done_script("r 1")), Some(RebootProgress::NotAsked));
        mark("r 1\nasked\n");
        assert_eq!(run(&reboot_done_script("r 1")), Some(RebootProgress::Pending));
        assert_eq!(run(&reboot_done_script("r 2")), Some(RebootProgress::Rebooted), "another request's marker");
    }

    #[test]
    fn problems_name_drift_failed_units_and_a_missing_systemd() {
        let health = parse_check(
            "active=/nix/store/a-sys\nload=0.1 0.2 0.3\nnix_kib=1000\nnix_free_kib=10\nsystemd=yes\nfailed=x.service\nfailed=y.mount\n",
        );
        assert_eq!(health.nix_free_bytes, Some(10 * 1024));
        assert_eq!(health.nix_size_bytes, Some(1000 * 1024));
        assert_eq!(health.failed_units, ["x.service", "y.mount"]);
        assert_eq!(health.problems(Some("/nix/store/b-sys")).len(), 2);
        assert_eq!(health.problems(Some("/nix/store/a-sys")), ["failed units: x.service, y.mount"]);
        let healthy = parse_check("active=/nix/store/a-sys\nsystemd=yes\n");
        assert!(healthy.problems(Some("/nix/store/a-sys")).is_empty());
        assert!(healthy.problems(None).is_empty(), "nothing deployed: any system will do");
        assert_eq!(parse_check("active=\n").problems(None), ["no systemd found: units not checked"]);
    }
}
