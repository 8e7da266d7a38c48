//! Test support: a LAN of network namespaces on this machine.
//!
//! A `Lan` is a bridge inside a network namespace of its own (the
//! "switch"), held by a process whose standard input only this test process
//! holds; the host gets an address on it through a veth pair, so the
//! operator, running on the host, reaches every node. A node started with
//! `NodeSetup::net` lives in a network namespace of its own, joined to the
//! bridge by a veth pair whose node end is `eth0`.
//!
//! Nothing outlives the test: when the `Lan` is dropped, or this process
//! dies however it dies, the switch process sees EOF and exits, its
//! namespace goes, and with it the bridge and every veth pair with an end
//! in it (the host's included); a node's namespace goes with the node.
//! Subnets are picked at random among those the host does not route yet,
//! and interface names carry a per-LAN id, so parallel tests do not clash.

use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A bridge in a namespace of its own, with the host on it at `.1`.
pub struct Lan {
    /// e.g. "10.213.7" (the LAN is that /24).
    prefix: String,
    id: String,
    switch: Child,
    lifeline: Option<ChildStdin>,
    next: AtomicU32,
}

/// A node's place on a LAN: how its namespace is wired once its init runs.
#[derive(Clone, Debug)]
pub struct NodePort {
    pub address: String,
    switch_pid: u32,
    /// The veth end in the switch.
    link: String,
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sh -c script` in the network namespace of process `pid`.
fn in_netns(pid: u32, script: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.args([&format!("--net=/proc/{pid}/ns/net"), "--", "sh", "-c", script]);
    cmd
}

impl Lan {
    pub fn new() -> Self {
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).expect("random bytes");
        let routes = run("ip route", Command::new("ip").args(["-4", "route", "show"]));
        let (a, b) = (0..64)
            .map(|i| (100 + (random[0].wrapping_add(i) % 100), random[1].wrapping_add(i.wrapping_mul(37))))
            .find(|(a, b)| !routes.contains(&format!("10.{a}.{b}.")))
            .expect("a free 10.x.y.0/24");
        let id: String = random[2..].iter().map(|b| format!("{b:02x}")).collect();
        let mut switch = Command::new("unshare")
            .args([
                "--net",
                "sh",
                "-c",
                "ip link set lo up && ip link add br0 type bridge && ip link set br0 up && echo up && cat >/dev/null",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start the LAN's switch (unshare --net)");
        let lifeline = switch.stdin.take();
        // "up" once the bridge exists.
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(switch.stdout.take().expect("stdout")), &mut line)
            .expect("read from the switch");
        assert_eq!(line.trim(), "up", "the LAN's switch did not start");
        let lan = Self { prefix: format!("10.{a}.{b}"), id, switch, lifeline, next: AtomicU32::new(10) };
        let host = format!("nx{}h", lan.id);
        let pid = lan.switch.id();
        run(
            "wire the host to the LAN",
            Command::new("ip").args([
                "link",
                "add",
                &host,
                "type",
                "veth",
                "peer",
                "name",
                "up0",
                "netns",
                &pid.to_string(),
            ]),
        );
        run("bridge the host's port", &mut in_netns(pid, "ip link set up0 master br0 && ip link set up0 up"));
        run(
            "address the host",
            Command::new("sh")
                .args(["-c", &format!("ip addr add {}/24 dev {host} && ip link set {host} up", lan.host_address())]),
        );
        lan
    }

    /// The host's address on the LAN.
    pub fn host_address(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// A new port for a node: `NodeSetup { net: Some(lan.port()), .. }`.
    pub fn port(&self) -> NodePort {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        NodePort {
            address: format!("{}.{n}", self.prefix),
            switch_pid: self.switch.id(),
            link: format!("nx{}n{n}", self.id),
        }
    }

    /// Starts tcpdump on the bridge with `filter`; it is listening when
    /// this returns.
    pub fn capture(&self, filter: &str) -> Capture {
        let dir = tempfile::tempdir().expect("capture directory");
        let out = std::fs::File::create(dir.path().join("out")).expect("capture file");
        let err = std::fs::File::create(dir.path().join("err")).expect("capture log");
        let child = Command::new("nsenter")
            .args([&format!("--net=/proc/{}/ns/net", self.switch.id()), "--", "tcpdump", "-i", "br0", "-n", "-l", "-U"])
            .arg(filter)
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("start tcpdump");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(dir.path().join("err")).unwrap_or_default().contains("listening on") {
            assert!(Instant::now() < deadline, "tcpdump did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture { child, dir }
    }
}

impl Default for Lan {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        drop(self.lifeline.take());
        let _ = self.switch.wait();
    }
}

impl NodePort {
    /// Joins the network namespace of process `pid` (a node's init) to the
    /// LAN: a veth pair whose switch end is on the bridge and whose node
    /// end is `eth0` with this port's address.
    pub fn wire(&self, pid: u32) {
        run(
            "create the node's link",
            Command::new("ip").args([
                "link",
                "add",
                &self.link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pid.to_string(),
            ]),
        );
        run(
            "move the link to the switch",
            Command::new("ip").args(["link", "set", &self.link, "netns", &self.switch_pid.to_string()]),
        );
        run(
            "bridge the node's link",
            &mut in_netns(self.switch_pid, &format!("ip link set {0} master br0 && ip link set {0} up", self.link)),
        );
        run(
            "address the node",
            &mut in_netns(pid, &format!("ip addr add {}/24 dev eth0 && ip link set eth0 up", self.address)),
        );
    }
}

/// A running tcpdump.
pub struct Capture {
    child: Child,
    dir: tempfile::TempDir,
}

impl Capture {
    /// Stops the capture; the packets it printed, one a line.
    pub fn stop(mut self) -> Vec<String> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use std::os::unix::process::CommandExt;
