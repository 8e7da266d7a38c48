//! Test support: NixOS-like nodes, and test systems to deploy to them.
//!
//! A node is Debian's Nix 2.8 and OpenSSH's sshd on a loopback port, in a
//! mount namespace of its own where a private directory is `/nix` (its own,
//! initially empty store), a fresh tmpfs is `/run` and a private directory is
//! `/root`. Everything else (the binaries, `/etc/nix/nix.conf`, `/tmp`) is the
//! host's. Root logs in with the key given at start; commands run as root
//! with sshd's default PATH, where Debian keeps nix-store, nix-env and the
//! coreutils.
//!
//! A `NodeSetup` adds host keys of other types beside the ed25519 one, and
//! login users beside root (with or without passwordless sudo): they live
//! in the node's own copies of /etc/passwd, group, shadow and
//! /etc/sudoers.d, bind-mounted over the host's in the node only, so
//! nothing of them outlives the node.
//!
//! A node also has a pid namespace of its own, whose init holds one end of a
//! pipe whose other end only this test process holds. When the node is
//! dropped, or this process ends however it ends (a panic, `kill -9`), the
//! pipe closes, the init exits and the kernel kills every process of the node
//! with it; then the node's directory is removed.
//!
//! Test systems are closures built on the host store without nixpkgs
//! (`builtins.derivation` with `/bin/sh` builders): one store path per
//! package and a `nixos-system-<name>` toplevel whose
//! `bin/switch-to-configuration` records each activation in the node.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Inside a node: one line `<action> <toplevel>` per run of a test system's
/// switch-to-configuration.
pub const ACTIVATIONS: &str = "/run/nixops-test/activations";

/// Inside a node: root's authorized keys. `Activation::BreakSsh` moves the
/// file to `<this>.off`, and any other test system moves it back.
pub const AUTHORIZED_KEYS: &str = "/run/node/authorized_keys";

/// Inside a node: the home directories of `NodeSetup::users`, each with
/// the user's authorized_keys.
const HOMES: &str = "/run/node/home";

/// PATH for commands run in a node with `exec`: sshd's default for root.
const NODE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a node may take to start, and to stop.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's init (pid 1 of its pid namespace), run by unshare in the new
/// mount namespace; `$1` is the node's directory. sshd runs in the
/// background while the init waits for EOF on its stdin, the pipe from the
/// test process. When it exits the kernel kills all of the node.
const NODE_INIT: &str = r#"
set -eu
dir=$1
mount --no-mtab --bind "$dir/nix" /nix
mount --no-mtab --bind "$dir/root" /root
# Its own hosts file (the operator manages a block in it), and tools of its own.
mount --no-mtab --bind "$dir/hosts" /etc/hosts
if [ -d "$dir/bin" ]; then mount --no-mtab --bind "$dir/bin" /usr/local/sbin; fi
if [ -n "${NODE_NET:-}" ]; then ip link set lo up; fi
# What a boot makes: a fresh /run (a tmpfs, as on NixOS) whose
# current-system is the system profile's (the boot default).
boot() {
  # --no-mtab: otherwise mount creates /run/mount on the host's /run.
  mount --no-mtab -t tmpfs -o mode=0755 node-run /run
  mkdir -p /run/sshd /run/node
  install -m 600 "$dir/authorized_keys" /run/node/authorized_keys
  if [ -e "$dir/users.sh" ]; then . "$dir/users.sh"; fi
  if [ -e /nix/var/nix/profiles/system ]; then
    ln -sfn "$(readlink -f /nix/var/nix/profiles/system)" /run/current-system
  fi
}
# SIGUSR1 (a test system's `systemctl reboot`) simulates a reboot: every
# process of the node but this init is killed, /run starts afresh, sshd
# comes back with the same host keys.
reboots=0
trap 'reboots=$((reboots + 1))' USR1
boot
nix-store --init
# The lifeline is this init's stdin; an asynchronous command's stdin would
# be /dev/null, so it reads a copy.
exec 3<&0
cat <&3 >/dev/null &
lifeline=$!
while :; do
  /usr/sbin/sshd -D -e -f "$dir/sshd_config" &
  seen=$reboots
  while [ "$seen" = "$reboots" ] && kill -0 "$lifeline" 2>/dev/null; do wait "$lifeline" || true; done
  # The lifeline closed: the node stops.
  [ "$seen" != "$reboots" ] || break
  echo "node: rebooting"
  # kill -1 from the init of a pid namespace reaches only that namespace.
  [ "$$" = 1 ] && kill -s KILL -- -1 || true
  wait || true
  umount -l /run
  boot
  cat <&3 >/dev/null &
  lifeline=$!
done
"#;

/// Runs NODE_INIT in new mount and pid namespaces, then removes the node's
/// directory. unshare returns only once the init has exited, and the kernel
/// lets the init exit only once every other process of its pid namespace is
/// gone, so nothing of the node still writes to the directory by then.
const NODE_SUPERVISOR: &str = r#"
unshare --mount --propagation private --pid ${NODE_NET:+--net} --kill-child sh -c "$2" node-init "$1"
status=$?
rm -rf "$1"
exit $status
"#;

/// A NixOS-like node: its own /nix, /run and sshd, on 127.0.0.1:`port`.
pub struct NixNode {
    pub host: String,
    pub port: u16,
    /// The node's directory: `nix/` is its /nix, `root/` its /root, `node.log`
    /// its log. Removed when the node stops.
    pub dir: tempfile::TempDir,
    /// NODE_SUPERVISOR, in a process group of its own.
    supervisor: Child,
    /// The init's stdin: the node lives as long as this is open.
    lifeline: Option<ChildStdin>,
    /// The node's init, as seen from here: the target for nsenter.
    init_pid: u32,
    /// The node's own network namespace's link to a LAN, once wired.
    net: Option<(super::netns::NodePort, bool)>,
}

/// What a node has beyond an ed25519 host key and root.
#[derive(Clone, Debug, Default)]
pub struct NodeSetup {
    /// More host key types (`ssh-keygen -t`: "rsa", "ecdsa"); sshd offers
    /// them after the ed25519 key.
    pub host_keys: Vec<&'static str>,
    /// Login users besides root; they accept the same key as root.
    pub users: Vec<NodeUser>,
    /// A network namespace of its own, on this LAN port, instead of the
    /// host's loopback.
    pub net: Option<super::netns::NodePort>,
    /// Commands the node has in /usr/local/sbin (e.g. wireguard-go).
    pub bin: Vec<std::path::PathBuf>,
}

/// A login user of a node.
#[derive(Clone, Debug)]
pub struct NodeUser {
    pub name: String,
    /// Whether the user may run anything as root with `sudo -n` (NOPASSWD).
    pub sudo: bool,
}

impl NixNode {
    /// Starts a node whose root account accepts `authorized_key` (an OpenSSH
    /// public key line), and waits until its sshd accepts connections.
    pub fn start(authorized_key: &str) -> Self {
        Self::start_with(authorized_key, &NodeSetup::default())
    }

    /// Like `start`, with the host keys and users of `setup`.
    pub fn start_with(authorized_key: &str, setup: &NodeSetup) -> Self {
        let mut last_error = String::new();
        // Another process may take the free port before sshd binds it.
        for _ in 0..3 {
            let mut node = Self::spawn(authorized_key, setup);
            match node.wait_ready() {
                Ok(()) => return node,
                Err(NotReady::PortTaken(log)) => last_error = log,
                // Dropping the node on the way out prints its log.
                Err(NotReady::Failed(why)) => panic!("node on 127.0.0.1:{} did not start: {why}", node.port),
            }
        }
        panic!("node: sshd could not bind a free port three times; last log:\n{last_error}");
    }

    fn spawn(authorized_key: &str, setup: &NodeSetup) -> Self {
        let dir = tempfile::Builder::new().prefix("nixops-node-").tempdir().expect("create node directory");
        let path = dir.path();
        for sub in ["nix", "root"] {
            std::fs::create_dir(path.join(sub)).unwrap_or_else(|e| panic!("create {}/{sub}: {e}", path.display()));
        }
        let mut host_keys = String::new();
        for kind in std::iter::once("ed25519").chain(setup.host_keys.iter().copied()) {
            let host_key = path.join(format!("ssh_host_{kind}_key"));
            let keygen = Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-C", "nixops-test-node", "-f"])
                .arg(&host_key)
                .output()
                .expect("run ssh-keygen");
            assert!(
                keygen.status.success(),
                "ssh-keygen -t {kind} failed: {}",
                String::from_utf8_lossy(&keygen.stderr)
            );
            host_keys += &format!("HostKey {}\n", host_key.display());
        }
        std::fs::write(path.join("authorized_keys"), format!("{}\n", authorized_key.trim()))
            .expect("write authorized_keys");
        if !setup.users.is_empty() {
            write_users(path, &setup.users);
        }
        std::fs::copy("/etc/hosts", path.join("hosts")).expect("copy /etc/hosts for the node");
        if !setup.bin.is_empty() {
            std::fs::create_dir(path.join("bin")).expect("create the node's bin");
            for bin in &setup.bin {
                let name = bin.file_name().expect("a command's file name");
                std::fs::copy(bin, path.join("bin").join(name))
                    .unwrap_or_else(|e| panic!("copy {}: {e}", bin.display()));
            }
        }
        let listen = if setup.net.is_some() { "0.0.0.0" } else { "127.0.0.1" };
        let port = super::free_port();
        std::fs::write(
            path.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress {listen}\n{host_keys}PidFile none\n\
                 AuthorizedKeysFile {AUTHORIZED_KEYS} {HOMES}/%u/authorized_keys\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nLogLevel VERBOSE\n\
                 PrintMotd no\nPrintLastLog no\nSubsystem sftp internal-sftp\n"
            ),
        )
        .expect("write sshd_config");
        let log = std::fs::File::create(path.join("node.log")).expect("create node.log");
        let mut supervisor = Command::new("sh");
        supervisor.env_clear();
        if setup.net.is_some() {
            supervisor.env("NODE_NET", "1");
        }
        let mut supervisor = supervisor
            .args(["-c", NODE_SUPERVISOR, "node-supervisor"])
            .arg(path)
            .arg(NODE_INIT)
            .env("PATH", NODE_PATH)
            .env("HOME", "/root")
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("clone node.log"))
            .stderr(log)
            // Not stopped by a Ctrl-C meant for the tests: the lifeline is.
            .process_group(0)
            .spawn()
            .expect("start the node (sh, unshare)");
        let lifeline = supervisor.stdin.take();
        let host = setup.net.as_ref().map_or_else(|| "127.0.0.1".to_owned(), |n| n.address.clone());
        let net = setup.net.clone().map(|n| (n, false));
        Self { host, port, dir, supervisor, lifeline, init_pid: 0, net }
    }

    /// Waits until sshd listens and the init's pid is known.
    fn wait_ready(&mut self) -> Result<(), NotReady> {
        let listen = if self.net.is_some() { "0.0.0.0" } else { "127.0.0.1" };
        let listening = format!("Server listening on {listen} port {}.", self.port);
        let deadline = Instant::now() + NODE_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.supervisor.try_wait() {
                return Err(NotReady::Failed(format!("the node exited ({status})")));
            }
            let log = self.sshd_log();
            if log.contains("Cannot bind any address") {
                return Err(NotReady::PortTaken(log));
            }
            if self.init_pid == 0 {
                let unshare = children(self.supervisor.id());
                self.init_pid = unshare.first().map(|&pid| children(pid)).and_then(|c| c.first().copied()).unwrap_or(0);
            }
            if self.init_pid != 0
                && let Some((port, wired @ false)) = &mut self.net
            {
                port.wire(self.init_pid);
                *wired = true;
            }
            if self.init_pid != 0
                && log.contains(&listening)
                && std::net::TcpStream::connect((self.host.as_str(), self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NotReady::Failed(format!("sshd not listening after {NODE_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The public key line ("ssh-ed25519 AAAA…") of the node's sshd.
    pub fn host_key(&self) -> String {
        self.host_key_of("ed25519")
    }

    /// The public key line of the node's host key of type `kind` (as given
    /// to `ssh-keygen -t`: "ed25519", "rsa", "ecdsa").
    pub fn host_key_of(&self, kind: &str) -> String {
        let file = self.dir.path().join(format!("ssh_host_{kind}_key.pub"));
        let line = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    /// Runs `sh -c script` as root inside the node (its mount and pid
    /// namespaces, so it sees the node's /nix and /run and dies with it).
    pub fn exec(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["--target", &self.init_pid.to_string(), "--mount", "--pid", "--net", "--", "sh", "-c", script])
            .env_clear()
            .env("PATH", NODE_PATH)
            .env("HOME", "/root")
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter")
    }

    /// Like `exec`, but panics (showing the output and the node's log) unless
    /// the script succeeds; returns its standard output.
    pub fn exec_ok(&self, script: &str) -> String {
        let out = self.exec(script);
        assert!(
            out.status.success(),
            "in node {}:{}, `{script}` failed ({}):\n{}{}\nnode log:\n{}",
            self.host,
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.sshd_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Target of the node's /run/current-system, if it has one.
    pub fn current_system(&self) -> Option<String> {
        let out = self.exec("readlink /run/current-system");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Activations recorded in the node, oldest first: `"<action> <toplevel>"`.
    pub fn activations(&self) -> Vec<String> {
        self.exec_ok(&format!("if [ -e {ACTIVATIONS} ]; then cat {ACTIVATIONS}; fi"))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The system profile's generations, oldest first: (number, system).
    pub fn generations(&self) -> Vec<(i64, String)> {
        let out = self.exec_ok(
            "for l in /nix/var/nix/profiles/system-*-link; do [ -e \"$l\" ] && echo \"$l $(readlink -f $l)\"; done; true",
        );
        let mut generations: Vec<(i64, String)> = out
            .lines()
            .filter_map(|l| {
                let (link, target) = l.split_once(' ')?;
                let n = link.rsplit('/').next()?.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()?;
                Some((n, target.to_owned()))
            })
            .collect();
        generations.sort();
        generations
    }

    /// Target of the system profile (the boot default), if there is one.
    pub fn profile(&self) -> Option<String> {
        let out = self.exec("readlink -f /nix/var/nix/profiles/system");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|s| !s.is_empty())
    }

    /// Whether `store_path` is valid in the node's store.
    pub fn has_path(&self, store_path: &str) -> bool {
        self.exec(&format!("nix-store --check-validity '{store_path}'")).status.success()
    }

    /// All valid paths in the node's store, sorted.
    pub fn store_paths(&self) -> Vec<String> {
        let out = self.exec_ok("nix --extra-experimental-features nix-command path-info --all");
        let mut paths: Vec<String> = out.lines().map(str::to_owned).collect();
        paths.sort();
        paths
    }

    /// Asserts that the node's store is consistent and every path's contents
    /// match the hash recorded for it.
    pub fn verify(&self) {
        if let Err(problems) = self.check_store() {
            panic!("the store of node 127.0.0.1:{} does not verify:\n{problems}", self.port);
        }
    }

    /// `nix-store --verify --check-contents` in the node: its complaints if
    /// it fails.
    pub fn check_store(&self) -> Result<(), String> {
        let out = self.exec("nix-store --verify --check-contents");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// The node's log: sshd's (LogLevel VERBOSE) and its start-up messages.
    pub fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }
}

impl Drop for NixNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- node {}:{} log ----\n{}", self.host, self.port, self.sshd_log());
        }
        // EOF for the init: it exits, the kernel kills the rest of the node,
        // and the supervisor removes the directory.
        drop(self.lifeline.take());
        let deadline = Instant::now() + NODE_TIMEOUT;
        while let Ok(None) = self.supervisor.try_wait() {
            if Instant::now() >= deadline {
                eprintln!("node 127.0.0.1:{} did not stop within {NODE_TIMEOUT:?}; killing it", self.port);
                // The supervisor leads a process group holding unshare and the init.
                let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.supervisor.id())]).status();
                let _ = self.supervisor.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Writes the node's copies of /etc/passwd, group and shadow with `users`
/// added, its /etc/sudoers.d (only their NOPASSWD rules), and users.sh,
/// which NODE_INIT sources to mount them and give each user a home holding
/// the node's authorized key.
fn write_users(dir: &Path, users: &[NodeUser]) {
    assert!(
        Path::new("/etc/sudoers").exists() && Path::new("/usr/bin/sudo").exists(),
        "test nodes with login users need sudo on the host: run hack/install-deps.sh"
    );
    let etc = dir.join("etc");
    let sudoers = etc.join("sudoers.d");
    std::fs::create_dir_all(&sudoers).expect("create the node's etc");
    let read =
        |f: &str| std::fs::read_to_string(Path::new("/etc").join(f)).unwrap_or_else(|e| panic!("read /etc/{f}: {e}"));
    let (mut passwd, mut group, mut shadow) = (read("passwd"), read("group"), read("shadow"));
    let mut script = String::from(
        "for f in passwd group shadow; do mount --no-mtab --bind \"$dir/etc/$f\" /etc/$f; done\n\
         mount --no-mtab --bind \"$dir/etc/sudoers.d\" /etc/sudoers.d\n",
    );
    for (i, user) in users.iter().enumerate() {
        // Ids no host account has; they mean nothing outside the node.
        let id = 61000 + i;
        let (name, home) = (&user.name, format!("{HOMES}/{}", user.name));
        passwd += &format!("{name}:x:{id}:{id}:node user:{home}:/bin/sh\n");
        group += &format!("{name}:x:{id}:\n");
        // `*`: no password, and not locked (sshd refuses locked accounts).
        shadow += &format!("{name}:*:19000:0:99999:7:::\n");
        if user.sudo {
            let rule = sudoers.join(name);
            std::fs::write(&rule, format!("{name} ALL=(ALL:ALL) NOPASSWD: ALL\n")).expect("write sudoers rule");
            std::fs::set_permissions(&rule, std::os::unix::fs::PermissionsExt::from_mode(0o440))
                .expect("chmod sudoers rule");
        }
        script += &format!(
            "mkdir -p {home}\ninstall -m 644 \"$dir/authorized_keys\" {home}/authorized_keys\nchown -R {id}:{id} {home}\n"
        );
    }
    for (file, text) in [("passwd", passwd), ("group", group), ("shadow", shadow)] {
        std::fs::write(etc.join(file), text).unwrap_or_else(|e| panic!("write the node's /etc/{file}: {e}"));
    }
    std::fs::set_permissions(etc.join("shadow"), std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod the node's shadow");
    std::fs::write(dir.join("users.sh"), script).expect("write users.sh");
}

enum NotReady {
    /// sshd could not bind its port; the log so far.
    PortTaken(String),
    Failed(String),
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// How a test system's switch-to-configuration ends, after recording the
/// activation, pointing /run/current-system at it (actions `switch` and
/// `test`) and restoring SSH logins if an earlier system broke them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exits 0.
    Ok,
    /// Exits 1.
    Fail,
    /// Exits 100: NixOS' "a reboot is required".
    RebootRequired,
    /// Moves root's authorized keys away (no new SSH logins), exits 0.
    BreakSsh,
    /// Never ends (sleeps for an hour).
    Hang,
}

/// A NixOS-like system closure to build on the host.
#[derive(Clone, Debug)]
pub struct TestSystem {
    /// The toplevel is named `nixos-system-<name>`.
    pub name: String,
    /// (name, file content): each becomes a store path of its own, holding
    /// the file `<name>`, referenced by the toplevel. The content
    /// `random-mib:N` stands for N MiB of random bytes.
    pub packages: Vec<(String, String)>,
    pub activation: Activation,
    /// Part of every derivation: another nonce gives entirely new paths.
    pub nonce: String,
}

impl TestSystem {
    /// A system whose activation succeeds, with a nonce no other system of
    /// this test run has, so none of its paths exist anywhere yet.
    pub fn new(name: &str, packages: &[(&str, &str)]) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let nonce = format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        Self {
            name: name.to_owned(),
            packages: packages.iter().map(|&(n, c)| (n.to_owned(), c.to_owned())).collect(),
            activation: Activation::Ok,
            nonce,
        }
    }

    /// The toplevel's bin/switch-to-configuration; `@out@` is the toplevel.
    fn switch_to_configuration(&self) -> String {
        let ending = match self.activation {
            Activation::Ok => "exit 0".to_owned(),
            Activation::Fail => format!("echo 'switch-to-configuration: test system {} fails' >&2; exit 1", self.name),
            Activation::RebootRequired => {
                format!("echo 'switch-to-configuration: test system {} needs a reboot' >&2; exit 100", self.name)
            }
            Activation::BreakSsh => format!("/bin/mv {AUTHORIZED_KEYS} {AUTHORIZED_KEYS}.off; exit 0"),
            Activation::Hang => hang_command(&self.nonce),
        };
        format!(
            "#!/bin/sh\n\
             # Test system {name}: records the activation, then {activation:?}.\n\
             set -e\n\
             action=$1\n\
             toplevel=@out@\n\
             /bin/mkdir -p {dir}\n\
             echo \"$action $toplevel\" >> {ACTIVATIONS}\n\
             case $action in switch|test) /bin/ln -sfn \"$toplevel\" /run/current-system ;; esac\n\
             case $action in dry-activate) echo \"would activate $toplevel\" ;; esac\n\
             if [ -e {AUTHORIZED_KEYS}.off ]; then /bin/mv {AUTHORIZED_KEYS}.off {AUTHORIZED_KEYS}; fi\n\
             {ending}\n",
            name = self.name,
            activation = self.activation,
            dir = Path::new(ACTIVATIONS).parent().expect("activations directory").display(),
        )
    }
}

/// A test system's `sw/bin/systemctl`: what the operator asks of a NixOS
/// system's systemctl. `reboot` has the node's init simulate a reboot;
/// `list-units` (the check's `--state=failed`) prints the lines of
/// FAILED_UNITS, so a test can make units fail.
const SYSTEMCTL: &str = "#!/bin/sh\n\
    case \"$1\" in\n\
      reboot) kill -USR1 1 ;;\n\
      list-units) if [ -e /run/nixops-test/failed-units ]; then /bin/cat /run/nixops-test/failed-units; fi ;;\n\
      *) echo \"test systemctl: $1 is not simulated\" >&2; exit 1 ;;\n\
    esac\n";

/// Inside a node: `<unit> loaded failed failed <description>` lines the
/// test systems' systemctl lists as failed units.
pub const FAILED_UNITS: &str = "/run/nixops-test/failed-units";

/// Builds a TestSystem from a JSON spec: a derivation per package, and the
/// toplevel listing them (so they are in its closure) with its
/// switch-to-configuration. Builders have an empty PATH: absolute tools.
const SYSTEM_EXPR: &str = r#"
{ specFile }:
let
  spec = builtins.fromJSON (builtins.readFile specFile);
  package = p: builtins.derivation {
    inherit (p) name content;
    inherit (spec) nonce;
    passAsFile = [ "content" ];
    system = builtins.currentSystem;
    builder = "/bin/sh";
    # Content "random-mib:N" makes N MiB of random bytes instead.
    args = [ "-c" ''
      /bin/mkdir $out
      read -r first < "$contentPath" || true
      case "$first" in
        random-mib:*) /usr/bin/head -c "''${first#random-mib:}M" /dev/urandom > "$out/$name" ;;
        *) /bin/cat "$contentPath" > "$out/$name" ;;
      esac
    '' ];
  };
in builtins.derivation {
  name = "nixos-system-${spec.name}";
  inherit (spec) nonce;
  packages = map package spec.packages;
  switch = builtins.replaceStrings [ "@out@" ] [ (builtins.placeholder "out") ] spec.switch;
  inherit (spec) systemctl;
  passAsFile = [ "switch" "systemctl" ];
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    /bin/mkdir -p $out/bin
    for p in $packages; do echo "$p"; done > $out/packages
    /bin/cp "$switchPath" $out/bin/switch-to-configuration
    /bin/chmod 0555 $out/bin/switch-to-configuration
    /bin/mkdir -p $out/sw/bin
    /bin/cp "$systemctlPath" $out/sw/bin/systemctl
    /bin/chmod 0555 $out/sw/bin/systemctl
  '' ];
}
"#;

/// Builds `sys` in the host store; returns its toplevel store path.
pub fn build_system(sys: &TestSystem) -> String {
    let spec = serde_json::json!({
        "name": sys.name,
        "nonce": sys.nonce,
        "packages": sys.packages.iter().map(|(name, content)| serde_json::json!({"name": name, "content": content})).collect::<Vec<_>>(),
        "switch": sys.switch_to_configuration(),
        "systemctl": SYSTEMCTL,
    });
    let spec_file = tempfile::NamedTempFile::new().expect("create spec file");
    std::fs::write(spec_file.path(), spec.to_string()).expect("write spec file");
    let out = Command::new("nix-build")
        // No substituters: there is no network, and asking cache.nixos.org
        // costs seconds of DNS time-outs.
        .args(["--no-out-link", "--option", "substituters", "", "--argstr", "specFile"])
        .arg(spec_file.path())
        .args(["-E", SYSTEM_EXPR])
        .stdin(Stdio::null())
        .output()
        .expect("run nix-build");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let toplevel = stdout.lines().last().unwrap_or_default().trim().to_owned();
    assert!(
        out.status.success() && toplevel.starts_with("/nix/store/"),
        "nix-build of test system {} failed ({}):\n{stdout}{}",
        sys.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    toplevel
}

/// The closure of `path` in the host store, sorted.
pub fn closure(path: &str) -> Vec<String> {
    let out = Command::new("nix-store").args(["-qR", path]).output().expect("run nix-store -qR");
    assert!(out.status.success(), "nix-store -qR {path} failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut paths: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    paths.sort();
    paths
}

/// What a system built with [`Activation::Hang`] and `nonce` runs for ever:
/// a sleep of its own, which pgrep finds apart from any other test's (the
/// nodes share the host's /proc).
pub fn hang_command(nonce: &str) -> String {
    format!("/bin/sleep 3600.{}", u64::from_str_radix(nonce, 16).expect("a hex nonce"))
}
