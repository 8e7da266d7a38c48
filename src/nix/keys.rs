//! NixOps `deployment.keys`: secret files placed on a machine with an owner
//! and mode, written atomically (temporary file in the same directory, then
//! rename) and compared by hash, so the content itself only ever travels
//! over SSH as a command's input and is never printed.

use super::activation::shell_quote;

/// One key file as it should be on the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    pub path: String,
    pub user: String,
    pub group: String,
    /// Octal mode, e.g. 400 (parsed from "0400").
    pub mode: u32,
    /// sha256 of the content, hex.
    pub sha256: String,
}

impl KeyFile {
    /// `sha256 user:group mode` as [`inspect_script`] prints it.
    fn fingerprint(&self) -> String {
        format!("{} {}:{} {:o}", self.sha256, self.user, self.group, self.mode)
    }
}

/// Prints one line per path: `sha256 user:group mode`, or `missing`.
pub fn inspect_script(paths: &[&str]) -> String {
    let mut script = String::new();
    for path in paths {
        let p = shell_quote(path);
        script += &format!(
            "if [ -f {p} ]; then printf '%s %s\\n' \"$(sha256sum <{p} | cut -d' ' -f1)\" \"$(stat -c '%U:%G %a' {p})\"; else echo missing; fi\n"
        );
    }
    script
}

/// The keys whose file on the machine differs from what it should be, given
/// what [`inspect_script`] printed for them (in the same order).
pub fn stale<'a>(wanted: &'a [KeyFile], inspected: &str) -> Vec<&'a KeyFile> {
    let mut lines = inspected.lines();
    wanted.iter().filter(|key| lines.next().map(str::trim) != Some(key.fingerprint().as_str())).collect()
}

/// Writes standard input to the key's path atomically with its owner and mode.
pub fn write_script(key: &KeyFile) -> String {
    let (dir, name) = key.path.rsplit_once('/').unwrap_or(("", &key.path));
    let dir = if dir.is_empty() { "/" } else { dir };
    format!(
        "set -eu\numask 077\nmkdir -p {d}\ntmp=$(mktemp {d}/.{n}.XXXXXX)\ntrap 'rm -f \"$tmp\"' EXIT\ncat >\"$tmp\"\n\
         chown {owner} \"$tmp\"\nchmod {mode:o} \"$tmp\"\nmv -f \"$tmp\" {p}\ntrap - EXIT\n",
        d = shell_quote(dir),
        n = name.trim_start_matches('.'),
        owner = shell_quote(&format!("{}:{}", key.user, key.group)),
        mode = key.mode,
        p = shell_quote(&key.path),
    )
}

/// Removes key files no longer in the spec.
pub fn remove_script(paths: &[String]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| shell_quote(p)).collect();
    format!("rm -f {}\n", quoted.join(" "))
}

/// Parses "0400" / "640" into a mode.
pub fn parse_mode(text: &str) -> Option<u32> {
    u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o7777)
}

/// sha256 of `content`, hex.
pub fn sha256_hex(content: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, content).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, content: &[u8]) -> KeyFile {
        KeyFile {
            path: path.into(),
            user: "root".into(),
            group: "root".into(),
            mode: 0o400,
            sha256: sha256_hex(content),
        }
    }

    #[test]
    fn only_differing_keys_are_stale() {
        let a = key("/run/keys/a", b"one");
        let b = key("/run/keys/b", b"two");
        let wanted = [a.clone(), b.clone()];
        let inspected = format!("{} root:root 400\nmissing\n", a.sha256);
        assert_eq!(stale(&wanted, &inspected), vec![&b]);
        let wrong_mode = format!("{} root:root 644\n{} root:root 400\n", a.sha256, b.sha256);
        assert_eq!(stale(&wanted, &wrong_mode), vec![&a]);
        assert!(stale(&wanted, &format!("{}\n{}\n", a.fingerprint(), b.fingerprint())).is_empty());
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0400"), Some(0o400));
        assert_eq!(parse_mode("640"), Some(0o640));
        assert_eq!(parse_mode("0999"), None);
    }

    #[test]
    fn sha256_matches_sha256sum() {
        // printf abc | sha256sum
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
