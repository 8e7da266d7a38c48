//! Building NixOS systems from Git on a builder over SSH, as scripts the
//! builder runs and parsers of what they print: pure, so the decisions and
//! the shell are tested without a builder (`sh -n`), and the I/O around
//! them lives in the controller.
//!
//! One build evaluates every requested toplevel in one `nix eval` (the
//! expensive part, paid once per commit however many machines use it) and
//! realises them in one `nix-store --realise`. Sources come from a bare
//! mirror of the repository the builder keeps under root's home, exported
//! at the commit (`git archive`), so only committed files are built.

use super::activation::shell_quote;

/// Experimental features Nix 2.4 to 2.x need for `nix eval` and flakes.
const FEATURES: &str = "--extra-experimental-features 'nix-command flakes'";

/// Exit statuses of the build script, and what they mean.
pub mod exit {
    /// Fetching the repository failed: retried (a network blip).
    pub const FETCH: u32 = 10;
    /// The commit is not in the repository.
    pub const NO_COMMIT: u32 = 11;
    /// The commit is not signed by an allowed key.
    pub const UNSIGNED: u32 = 12;
    /// Evaluation failed.
    pub const EVAL: u32 = 13;
    /// Building failed.
    pub const BUILD: u32 = 14;
    /// Stopped by SIGTERM (a newer commit's build, or the operator).
    pub const STOPPED: u32 = 143;
}

/// What is built: the repository, the expression kind, and the attribute
/// paths of the toplevels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Expression {
    /// A flake; each attribute is an output holding a NixOS configuration
    /// (`nixosConfigurations.web-1`) whose system toplevel is built.
    Flake,
    /// A Nix file (relative to the repository root); each attribute is the
    /// toplevel derivation itself.
    File(String),
}

impl Expression {
    /// The installable of `attribute`, for messages and status.
    pub fn installable(&self, url: &str, attribute: &str) -> String {
        match self {
            Self::Flake => format!("{url}#{attribute}"),
            Self::File(file) => format!("{url} {file} -A {attribute}"),
        }
    }

    /// The Nix expression whose value is one line `<drv> <out>` per
    /// attribute, in order, with the sources at `./src`.
    fn pairs(&self, attributes: &[String]) -> String {
        let (source, suffix) = match self {
            Self::Flake => {
                ("builtins.getFlake (\"path:\" + toString ./src)".to_owned(), ".config.system.build.toplevel")
            }
            Self::File(file) => (
                format!(
                    "let f = import (./src + \"/{}\"); in if builtins.isFunction f then f {{ }} else f",
                    nix_escape(file)
                ),
                "",
            ),
        };
        let toplevels: Vec<String> =
            attributes.iter().map(|a| format!("(src.{}{suffix})", attribute_path(a))).collect();
        format!(
            "let src = {source}; in builtins.concatStringsSep \"\" (map (t: t.drvPath + \" \" + t.outPath + \"\\n\") [ {} ])",
            toplevels.join(" ")
        )
    }
}

/// `a.b-c` → `"a"."b-c"`: every name quoted, so no name is read as Nix syntax.
fn attribute_path(attribute: &str) -> String {
    attribute.split('.').map(|name| format!("\"{}\"", nix_escape(name))).collect::<Vec<_>>().join(".")
}

/// Escapes text for a double-quoted Nix string.
fn nix_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace("${", "\\${")
}

/// A build of one commit on a builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRequest {
    pub url: String,
    pub rev: String,
    pub expression: Expression,
    /// Attribute paths, without duplicates.
    pub attributes: Vec<String>,
    /// Allowed signers (spec.nixos.build.requireSignedBy); empty: not checked.
    pub signers: Vec<String>,
    /// Names the job's pid file, so a superseded build can be stopped:
    /// `<line>-<rev>-<digest>`, the line being what follows one ref (any
    /// other rev of it is superseded), all three without '-'.
    pub job: String,
}

/// What the build script prints first, once it runs and can be found by
/// its pid file: the operator waits for it before it counts the build as
/// started.
pub const STARTED: &str = "nixops-build-started";

/// Where the builder keeps its mirrors, job pid files and GC roots.
const BASE: &str = "~root/.cache/nixops-operator";
const GC_ROOTS: &str = "/nix/var/nix/gcroots/nixops-operator";
/// Where the builder keeps the whole log of each build, `<job>.log`, and
/// how many of them it keeps per line (a ref followed, a pinned rev): the
/// oldest go when a build of the line starts.
pub const LOG_DIR: &str = "/nix/var/log/nixops-operator/builds";
pub const KEEP_LOGS: usize = 5;

/// The path of the log of the build `job` on its builder.
pub fn log_path(job: &str) -> String {
    format!("{LOG_DIR}/{job}.log")
}

/// Whether `path` is a build log's path as [`log_path`] makes it (so a
/// status field names no other file to read).
pub fn is_log_path(path: &str) -> bool {
    path.strip_prefix(LOG_DIR)
        .and_then(|p| p.strip_prefix('/'))
        .and_then(|p| p.strip_suffix(".log"))
        .is_some_and(|job| !job.is_empty() && job.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// The directory of the bare mirror of `url` on the builder.
fn mirror_name(url: &str) -> String {
    let digest = crate::nix::keys::sha256_hex(url.as_bytes());
    format!("{}.git", &digest[..24])
}

/// Sets up git's credentials from standard input, lines `name=base64`
/// (identity, known_hosts, username, password), into the work directory.
const CREDENTIALS: &str = r#"while IFS='=' read -r name value; do
  case $name in identity|known_hosts|username|password) printf '%s' "$value" | base64 -d > "$work/cred-$name" ;; esac
done
if [ -s "$work/cred-identity" ]; then
  touch "$work/cred-known_hosts"
  export GIT_SSH_COMMAND="ssh -i $work/cred-identity -o IdentitiesOnly=yes -o UserKnownHostsFile=$work/cred-known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes"
fi
if [ -s "$work/cred-password" ]; then
  printf '#!/bin/sh\ncase "$1" in Username*) cat "%s/cred-username" ;; *) cat "%s/cred-password" ;; esac\n' "$work" "$work" > "$work/askpass"
  chmod 700 "$work/askpass"
  export GIT_ASKPASS="$work/askpass"
fi
export GIT_TERMINAL_PROMPT=0
"#;

impl BuildRequest {
    /// The script the builder runs, as root, in a session of its own
    /// (`setsid`, so [`cancel_script`] stops all of it). Standard input
    /// carries the credentials (possibly none); standard output gets one
    /// `<drv> <out>` line per attribute; standard error the log, of which
    /// only the last 64 KiB come back (the whole of it stays at
    /// [`log_path`] of the job). Exits with an [`exit`] status.
    pub fn script(&self) -> String {
        let mut s = String::from("set -u\numask 077\n");
        s += &format!("base={BASE}\nmirror=\"$base/git/{}\"\n", mirror_name(&self.url));
        s += &format!(
            "url={}\nrev={}\njob={}\n",
            shell_quote(&self.url),
            shell_quote(&self.rev),
            shell_quote(&self.job)
        );
        s += &format!("logs={LOG_DIR}\nlog=\"$logs/$job.log\"\n");
        s += "mkdir -p \"$base/git\" \"$base/jobs\" \"$logs\" || exit 10\n";
        s += "work=$(mktemp -d \"${TMPDIR:-/tmp}/nixops-build.XXXXXX\") || exit 10\n";
        s += JOB_FILES;
        // One pid file per running script, <job>.<pid>.pid, locked while it
        // (or anything it started) runs, so a stale file names no one.
        s += "rest=${job#*-}\nline_jobs=\"$base/jobs/${job%%-*}\"\nme=\"$base/jobs/$job.$$.pid\"\n";
        s += "exec 9>\"$me\" && flock -n 9 && echo $$ >&9 || exit 10\n";
        s += &format!("echo {STARTED}\n");
        // The build goes on if the operator's connection goes (the next
        // operator finds it): output goes to files, sent at the end if
        // anyone still listens. The log (everything on standard error,
        // Nix's output included) stays for `kubectl nixops build-log`;
        // another attempt of the same job appends to it, and only this
        // attempt's part (from `offset`) goes back to the operator.
        s += "trap '' PIPE\nexec 3>&1 4>&2 >\"$work/out\" 2>>\"$log\"\n";
        s += "offset=$(($(stat -c %s \"$log\") + 1))\n";
        s += "trap 'st=$?; tail -c \"+$offset\" \"$log\" | tail -c 65536 >&4; cat \"$work/out\" >&3; \
              echo \"== the build script exited with status $st at $(date -u +%FT%TZ)\" >&2; rm -rf \"$work\" \"$me\"' EXIT\n\
              trap 'exit 143' TERM\n";
        // Builds of other commits of this line, left by an operator that is
        // gone (a live one stops them itself), stop now; the same build left
        // so is waited for: its result is this one's.
        s += "for f in \"$line_jobs\"-*.pid; do case $f in \"$line_jobs-${rest%%-*}-\"*) ;; *) stop \"$f\" ;; esac; done\n";
        s += "for f in \"$base/jobs/$job\".*.pid; do [ \"$f\" = \"$me\" ] || while alive \"$f\"; do sleep 1; done; done\n";
        s += &format!(
            "echo \"== nixops-operator: building $url at $rev ({}) on $(uname -n), started $(date -u +%FT%TZ)\" >&2\n",
            self.attributes.join(", ").replace(['"', '`', '$', '\\'], "_")
        );
        s += "offset=$(($(stat -c %s \"$log\") + 1))\n";
        s += &prune_logs();
        s += CREDENTIALS;
        s += "[ -d \"$mirror\" ] || git init -q --bare \"$mirror\" >&2 || exit 10\n";
        s += "git -C \"$mirror\" fetch -q --force --prune \"$url\" '+refs/heads/*:refs/heads/*' '+refs/tags/*:refs/tags/*' >&2 \
               || { echo \"fetching $url failed\" >&2; exit 10; }\n";
        s += "git -C \"$mirror\" cat-file -e \"$rev^{commit}\" 2>/dev/null \
               || { echo \"commit $rev is not in $url\" >&2; exit 11; }\n";
        if !self.signers.is_empty() {
            s += &self.verify_script();
        }
        s += "mkdir \"$work/src\" && git -C \"$mirror\" archive \"$rev\" | tar -x -C \"$work/src\" || exit 10\n";
        s += "cd \"$work\" || exit 10\n";
        s += &format!(
            "nix eval {FEATURES} --impure --raw --expr {} > \"$work/pairs\" || exit 13\n",
            shell_quote(&self.expression.pairs(&self.attributes))
        );
        s += "cut -d' ' -f1 \"$work/pairs\" | sort -u > \"$work/drvs\"\n";
        s += "xargs nix-store --realise --keep-going < \"$work/drvs\" > /dev/null || exit 14\n";
        // Roots keep what was built until the machines have it.
        s += &format!("mkdir -p {GC_ROOTS}\n");
        s += "cut -d' ' -f2 \"$work/pairs\" | while read -r out; do ln -sfn \"$out\" \"";
        s += GC_ROOTS;
        s += "/${out#/nix/store/}\"; done\n";
        s += "cat \"$work/pairs\"\n";
        s
    }

    /// Checks the commit's signature against the allowed keys: OpenSSH keys
    /// through an allowed-signers file (git's gpg.format=ssh), OpenPGP key
    /// blocks through a keyring of their own.
    fn verify_script(&self) -> String {
        let mut s = String::from(
            "mkdir -m 700 \"$work/gnupg\"\nexport GNUPGHOME=\"$work/gnupg\"\n: > \"$work/allowed_signers\"\n",
        );
        for key in &self.signers {
            if key.starts_with("-----BEGIN PGP") {
                s += &format!("printf '%s\\n' {} | gpg --batch --quiet --import 2>/dev/null\n", shell_quote(key));
            } else {
                s += &format!(
                    "printf 'nixops-trusted %s\\n' {} >> \"$work/allowed_signers\"\n",
                    shell_quote(key.trim())
                );
            }
        }
        s += "if ! git -C \"$mirror\" -c gpg.ssh.allowedSignersFile=\"$work/allowed_signers\" verify-commit \"$rev\" > \"$work/verify\" 2>&1; then\n\
              [ -s \"$work/verify\" ] || echo 'the commit carries no signature' > \"$work/verify\"\n\
              echo \"commit $rev is not signed by a key of spec.nixos.build.requireSignedBy:\" >&2; tail -c 2048 \"$work/verify\" >&2; exit 12\nfi\n";
        s
    }

    /// Runs [`Self::script`] in a session of its own.
    pub fn command(&self) -> String {
        // --wait: the session leader sshd started would otherwise fork and
        // exit at once, and its exit status would say nothing.
        format!("setsid --wait sh -c {}", shell_quote(&self.script()))
    }
}

/// Removes the oldest logs of the job's line (`${job%%-*}`) in `$logs`
/// but the newest [`KEEP_LOGS`], never `$log` (this build's).
fn prune_logs() -> String {
    format!(
        "ls -t \"$logs/${{job%%-*}}\"-*.log 2>/dev/null | tail -n +{} | while read -r f; do [ \"$f\" = \"$log\" ] || rm -f \"$f\"; done\n",
        KEEP_LOGS + 1
    )
}

/// Shell functions on a job's pid file: `alive FILE` (it names a running
/// build script: the file is locked while the script runs, so a stale
/// file, whose pid may have been reused, names no one) and `stop FILE` (stops that script's
/// whole session).
const JOB_FILES: &str = r#"alive() {
  [ -s "$1" ] && ! flock -n "$1" true 2>/dev/null || return 1
  p=$(cat "$1" 2>/dev/null) || return 1
  case $p in ''|*[!0-9]*) return 1 ;; esac
}
stop() { if alive "$1"; then kill -TERM "-$p" 2>/dev/null; fi; return 0; }
"#;

/// Stops the build running as `job` on the builder, with everything it started.
pub fn cancel_script(job: &str) -> String {
    format!("{JOB_FILES}for f in {BASE}/jobs/{}.*.pid; do stop \"$f\"; done", shell_quote(job))
}

/// Resolves `reference` (or HEAD) to a commit with `git ls-remote`.
pub fn ls_remote_script(url: &str, reference: Option<&str>) -> String {
    format!(
        "GIT_TERMINAL_PROMPT=0 GIT_SSH_COMMAND='ssh -o BatchMode=yes' git ls-remote {} {}",
        shell_quote(url),
        shell_quote(reference.unwrap_or("HEAD"))
    )
}

/// The commit `reference` names in `git ls-remote` output: the branch
/// `refs/heads/<ref>`, else the tag (peeled, for an annotated tag), else
/// the ref spelled out in full.
pub fn parse_ls_remote(output: &str, reference: Option<&str>) -> Option<String> {
    let refs: Vec<(&str, &str)> = output
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(rev, _)| rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    let find = |name: &str| refs.iter().find(|(_, r)| *r == name).map(|(rev, _)| rev.to_string());
    let Some(reference) = reference else { return find("HEAD") };
    if reference.starts_with("refs/") {
        return find(&format!("{reference}^{{}}")).or_else(|| find(reference));
    }
    find(&format!("refs/heads/{reference}"))
        .or_else(|| find(&format!("refs/tags/{reference}^{{}}")))
        .or_else(|| find(&format!("refs/tags/{reference}")))
}

/// The toplevel built for each attribute, in order, from the script's
/// standard output; None if it does not have one line per attribute.
pub fn parse_pairs(stdout: &str, attributes: &[String]) -> Option<Vec<(String, String)>> {
    let outs: Vec<&str> = stdout.lines().filter_map(|l| l.split_once(' ').map(|(_, out)| out.trim())).collect();
    (outs.len() == attributes.len() && outs.iter().all(|o| o.starts_with("/nix/store/")))
        .then(|| attributes.iter().cloned().zip(outs.into_iter().map(str::to_owned)).collect())
}

/// The credentials as the script reads them from standard input.
pub fn credentials_input(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use base64::Engine;
    let mut out = Vec::new();
    for (name, value) in entries {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(value).as_bytes());
        out.push(b'\n');
    }
    out
}

/// The last `lines` lines of `log`.
pub fn log_tail(log: &str, lines: usize) -> String {
    let log = log.trim_end();
    let start = log.rmatch_indices('\n').nth(lines.saturating_sub(1)).map_or(0, |(i, _)| i + 1);
    log[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(expression: Expression, signers: Vec<String>) -> BuildRequest {
        BuildRequest {
            url: "https://example.org/it's.git".into(),
            rev: "0123456789abcdef0123456789abcdef01234567".into(),
            expression,
            attributes: vec!["nixosConfigurations.web-1".into(), "nixosConfigurations.db".into()],
            signers,
            job: "ns-abc".into(),
        }
    }

    fn sh_n(script: &str) {
        let out = std::process::Command::new("sh").args(["-n", "-c", script]).output().unwrap();
        assert!(out.status.success(), "sh -n: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn scripts_are_valid_shell() {
        let ssh = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsf5n2k2cOqRk8yE1xXKmbvmN4QUeTSR3dOzU6pD6VJ a'b";
        let pgp = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQ\n-----END PGP PUBLIC KEY BLOCK-----";
        for r in [
            request(Expression::Flake, vec![]),
            request(Expression::File("nix/machines.nix".into()), vec![ssh.into(), pgp.into()]),
        ] {
            sh_n(&r.script());
            sh_n(&r.command());
        }
        sh_n(&cancel_script("a'b"));
        sh_n(&ls_remote_script("file:///tmp/x y", Some("main")));
    }

    #[test]
    fn attribute_names_are_quoted_for_nix() {
        assert_eq!(attribute_path("nixosConfigurations.web-1"), "\"nixosConfigurations\".\"web-1\"");
        assert_eq!(nix_escape("a\"${b}"), "a\\\"\\${b}");
        let e = Expression::File("default.nix".into()).pairs(&["a".into()]);
        assert!(e.contains("(src.\"a\")") && e.contains("./src + \"/default.nix\""), "{e}");
        let f = Expression::Flake.pairs(&["nixosConfigurations.a".into()]);
        assert!(f.contains("(src.\"nixosConfigurations\".\"a\".config.system.build.toplevel)"), "{f}");
    }

    #[test]
    fn refs_resolve_to_branches_then_peeled_tags() {
        let a = "1".repeat(40);
        let b = "2".repeat(40);
        let c = "3".repeat(40);
        let out = format!(
            "{a}\tHEAD\n{a}\trefs/heads/main\n{b}\trefs/tags/v1\n{c}\trefs/tags/v1^{{}}\n{b}\trefs/heads/v1x\n"
        );
        assert_eq!(parse_ls_remote(&out, None), Some(a.clone()));
        assert_eq!(parse_ls_remote(&out, Some("main")), Some(a.clone()));
        assert_eq!(
            parse_ls_remote(&out, Some("v1")),
            Some(c.clone()),
            "an annotated tag names the commit it points to"
        );
        assert_eq!(parse_ls_remote(&out, Some("refs/tags/v1")), Some(c));
        assert_eq!(parse_ls_remote(&out, Some("v2")), None);
        assert_eq!(parse_ls_remote("fatal: no such repository", Some("main")), None);
    }

    #[test]
    fn outputs_map_to_attributes_in_order() {
        let attrs = vec!["a".to_owned(), "b".to_owned()];
        let out = "/nix/store/x.drv /nix/store/aaa-a\n/nix/store/x.drv /nix/store/aaa-a\n";
        let pairs = parse_pairs(out, &attrs).unwrap();
        assert_eq!(pairs[1], ("b".to_owned(), "/nix/store/aaa-a".to_owned()), "identical systems map to both");
        assert_eq!(parse_pairs("/nix/store/x.drv /nix/store/aaa-a\n", &attrs), None);
    }

    #[test]
    fn log_paths_are_recognised() {
        let path = log_path("abc-0123-def");
        assert!(is_log_path(&path), "{path}");
        assert!(!is_log_path(&format!("{LOG_DIR}/../../../etc/shadow.log")));
        assert!(!is_log_path(&format!("{LOG_DIR}/.log")));
        assert!(!is_log_path("/etc/passwd"));
        assert!(request(Expression::Flake, vec![]).script().contains(&format!("logs={LOG_DIR}\n")));
    }

    #[test]
    fn only_the_newest_logs_of_a_line_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().display().to_string();
        // Seven builds of line "aaa" (older to newer), two of line "bbb".
        for (i, name) in (0..7).map(|i| format!("aaa-{i}-x")).chain(["bbb-0-x".into(), "bbb-1-x".into()]).enumerate() {
            let file = dir.path().join(format!("{name}.log"));
            std::fs::write(&file, "log").unwrap();
            let touched = std::process::Command::new("touch")
                .args(["-d", &format!("2020-01-01 00:00:{i:02}")])
                .arg(&file)
                .status()
                .unwrap();
            assert!(touched.success());
        }
        let script = format!("logs={logs}\njob=aaa-6-x\nlog=\"$logs/$job.log\"\n{}", prune_logs());
        let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let newest: Vec<String> = (2..7).map(|i| format!("aaa-{i}-x.log")).collect();
        assert_eq!(left, [newest, vec!["bbb-0-x.log".into(), "bbb-1-x.log".into()]].concat(), "other lines untouched");
    }

    #[test]
    fn log_tails_keep_the_last_lines() {
        assert_eq!(log_tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(log_tail("a", 5), "a");
    }
}
