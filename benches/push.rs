//! `make bench-push`: our push against Nix's own `nix-copy-closure --to`,
//! in the same run, to empty nodes each time (Debian's Nix + sshd in their
//! own mount namespaces), with a closure shaped like a NixOS system: about
//! 1,000 store paths and 130 MiB of real files copied from this machine
//! (shared libraries, documentation, man pages, Python modules).
//!
//! Prints `push_ratio_fresh`, `push_ratio_wan` (50 ms round trip, 100 Mbit/s
//! through toxiproxy), `push_ratio_incremental` and
//! `push_ratio_incremental_wan` (one changed package, loopback and over that
//! link) and `push_ratio_fanout10` (10 nodes at once against 10 parallel
//! nix-copy-closure runs), each ours ÷ theirs, plus the raw seconds.
//! The incremental figures are medians over three changes in a row;
//! `push_ratio_incremental_wan_kept` times ours on a session already logged
//! in, as the operator deploys on the session its last look kept.
//! `BENCH_PUSH=wan` (a comma-separated list of fresh, wan and fanout10)
//! runs only those parts; the incremental figures come with their link.
//! Ours runs the deploy path's steps in its order and concurrency: the
//! probe alongside `push::survey`, then the import, then the release.
//! A benchmark, not a test: figures go in notes, not assertions.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixops_operator::nix::StorePath;
use nixops_operator::nix::activation;
use nixops_operator::nix::local_store::LocalStore;
use nixops_operator::nix::push::{self, PathSource, RecordCache};
use nixops_operator::ssh::{HostKey, Session};
use russh::keys::PrivateKey;
use support::node::NixNode;

const PACKAGES: usize = 1000;
const TOTAL_BYTES: u64 = 130 << 20;
const MAX_FILE: u64 = 4 << 20;
const SOURCES: &[&str] = &["/usr/lib/x86_64-linux-gnu", "/usr/share/doc", "/usr/share/man", "/usr/lib/python3.11"];

fn run(cmd: &mut Command) -> String {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn files_under(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if meta.is_dir() {
            files_under(&entry.path(), out);
        } else if meta.is_file() && meta.len() > 0 && meta.len() <= MAX_FILE {
            out.push((entry.path(), meta.len()));
        }
    }
}

/// The packages (store paths with no references, like most of a system's
/// leaves) and a system path referring to all of them. `variant` changes
/// one package, so the system differs from the plain one in two paths.
fn build_closure(variant: &str) -> String {
    let work = std::env::temp_dir().join("nixops-bench-push");
    let stamp = work.join(format!("system-{variant}"));
    if let Ok(path) = std::fs::read_to_string(&stamp)
        && Path::new(path.trim()).exists()
    {
        return path.trim().to_owned();
    }
    let mut files = Vec::new();
    for source in SOURCES {
        files_under(Path::new(source), &mut files);
    }
    let mut total = 0;
    files.retain(|(_, size)| {
        total += size;
        total <= TOTAL_BYTES
    });
    let pkgs = work.join(format!("pkgs-{variant}"));
    let _ = std::fs::remove_dir_all(&pkgs);
    for i in 0..PACKAGES {
        let dir = pkgs.join(format!("pkg-{i:04}"));
        std::fs::create_dir_all(&dir).expect("package dir");
        std::fs::write(dir.join("name"), format!("package {i}\n")).expect("name file");
    }
    for (i, (file, _)) in files.iter().enumerate() {
        let dir = pkgs.join(format!("pkg-{:04}", i % PACKAGES));
        let name = file.to_string_lossy().trim_start_matches('/').replace('/', "_");
        std::fs::copy(file, dir.join(name)).expect("copy file");
    }
    std::fs::write(pkgs.join("pkg-0000/variant"), variant).expect("variant file");
    let dirs: Vec<PathBuf> = (0..PACKAGES).map(|i| pkgs.join(format!("pkg-{i:04}"))).collect();
    let added = run(Command::new("nix-store").arg("--add").args(&dirs));
    let paths: Vec<&str> = added.lines().collect();
    let refs: Vec<String> = paths.iter().map(|p| format!("${{builtins.storePath \"{p}\"}}")).collect();
    let expr = format!(
        r#"builtins.derivation {{
          name = "nixos-system-bench-{variant}"; system = builtins.currentSystem; builder = "/bin/sh";
          args = ["-c" ''
            /bin/mkdir -p $out/bin
            echo "{}" > $out/packages
            printf '#!/bin/sh\nexit 0\n' > $out/bin/switch-to-configuration
            /bin/chmod +x $out/bin/switch-to-configuration
          ''];
        }}"#,
        refs.join(" ")
    );
    let system = run(Command::new("nix-build").args(["--no-out-link", "-E", &expr])).trim().to_owned();
    std::fs::write(&stamp, &system).expect("stamp");
    let _ = std::fs::remove_dir_all(&pkgs);
    system
}

struct Keys {
    private: PrivateKey,
    public: String,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().expect("key dir");
    let file = dir.path().join("id_ed25519");
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&file));
    let private = PrivateKey::from_openssh(std::fs::read_to_string(&file).expect("key")).expect("parse key");
    let public = std::fs::read_to_string(file.with_extension("pub")).expect("public key");
    Keys { private, public, file, _dir: dir }
}

/// A login to `port` (the node, or a proxy in front of it).
async fn login(keys: &Keys, node: &NixNode, port: u16) -> Session {
    let pinned = HostKey::parse(&node.host_key(), "node").expect("host key");
    Session::connect("127.0.0.1", port, "root", &keys.private, &pinned, Duration::from_secs(30), None)
        .await
        .expect("connect")
}

/// Our push of `closure` to `port`, logging in first.
async fn ours(keys: &Keys, node: &NixNode, port: u16, closure: &str, records: &RecordCache) -> (Duration, u64) {
    let started = Instant::now();
    let session = login(keys, node, port).await;
    let wire = push_on(&session, closure, records).await;
    session.close().await;
    (started.elapsed(), wire)
}

/// Our push of `closure` on a session already logged in: the deploy
/// path's steps in its order and concurrency. Returns the bytes sent.
async fn push_on(session: &Session, closure: &str, records: &RecordCache) -> u64 {
    let source = PathSource::Local(LocalStore::new("/nix"));
    let root = StorePath::parse(closure).expect("store path");
    let probe_script = activation::probe_script();
    let (probe, survey) = tokio::join!(session.exec(&probe_script), push::survey(session, &source, &root));
    let state = activation::parse_probe(&String::from_utf8_lossy(&probe.expect("probe").stdout));
    let mut survey = survey.expect("survey");
    let stats = push::import(session, &mut survey.serve, &source, &survey.missing, state.has_zstd, records, &|_| {})
        .await
        .expect("import");
    survey.serve.release().await;
    stats.wire_bytes
}

/// `nix-copy-closure --to` of `closure` to `port`.
fn theirs_command(keys: &Keys, port: u16, closure: &str) -> Command {
    let mut cmd = Command::new("nix-copy-closure");
    cmd.args(["--to", "root@127.0.0.1", closure]).env(
        "NIX_SSHOPTS",
        format!(
            "-p {port} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            keys.file.display()
        ),
    );
    cmd
}

fn theirs(keys: &Keys, port: u16, closure: &str) -> Duration {
    let started = Instant::now();
    run(&mut theirs_command(keys, port, closure));
    started.elapsed()
}

fn assert_complete(node: &NixNode, closure: &str) {
    assert!(node.has_path(closure), "{closure} did not arrive");
    node.verify();
}

fn wan(proxy: &support::Toxiproxy, name: &str, node: &NixNode) -> u16 {
    let listen = proxy.proxy(name, &format!("127.0.0.1:{}", node.port));
    for stream in ["upstream", "downstream"] {
        // 25 ms each way: a 50 ms round trip; 100 Mbit/s = 12,500 KB/s.
        proxy.toxic_on(
            name,
            &format!("{name}-latency-{stream}"),
            "latency",
            stream,
            1.0,
            serde_json::json!({"latency": 25}),
        );
        proxy.toxic_on(
            name,
            &format!("{name}-rate-{stream}"),
            "bandwidth",
            stream,
            1.0,
            serde_json::json!({"rate": 12500}),
        );
    }
    listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("proxy port")
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Ours and theirs each deploying `increments` in turn (one changed
/// package each) to nodes that have the previous one: the medians. With
/// `kept`, ours runs on a session logged in beforehand, untimed, as the
/// operator deploys on the session its last look kept.
async fn incremental(
    keys: &Keys,
    (mine, my_port): (&NixNode, u16),
    (other, other_port): (&NixNode, u16),
    increments: &[String],
    kept: bool,
) -> (Duration, Duration) {
    let (mut ours_times, mut theirs_times) = (Vec::new(), Vec::new());
    for closure in increments {
        let records = RecordCache::new(1 << 30);
        ours_times.push(if kept {
            let session = login(keys, mine, my_port).await;
            let started = Instant::now();
            push_on(&session, closure, &records).await;
            let took = started.elapsed();
            session.close().await;
            took
        } else {
            ours(keys, mine, my_port, closure, &records).await.0
        });
        theirs_times.push(theirs(keys, other_port, closure));
        assert_complete(mine, closure);
        assert_complete(other, closure);
    }
    (median(ours_times), median(theirs_times))
}

fn ratio(name: &str, ours: Duration, theirs: Duration) {
    println!("{name}: {:.3}", ours.as_secs_f64() / theirs.as_secs_f64());
    println!("{name}_seconds: ours {:.2} theirs {:.2}", ours.as_secs_f64(), theirs.as_secs_f64());
}

#[tokio::main]
async fn main() {
    let only = std::env::var("BENCH_PUSH").ok();
    let wanted = |part: &str| only.as_deref().is_none_or(|o| o.split(',').any(|p| p.trim() == part));
    let keys = keys();
    let v1 = build_closure("v1");
    let increments: Vec<String> = ["v2", "v3", "v4"].into_iter().map(build_closure).collect();
    let paths = run(Command::new("nix-store").args(["-qR", &v1])).lines().count();
    let size: u64 = run(Command::new("nix-store")
        .args(["-q", "--size"])
        .args(run(Command::new("nix-store").args(["-qR", &v1])).lines()))
    .lines()
    .filter_map(|l| l.trim().parse::<u64>().ok())
    .sum();
    println!("closure_paths: {paths}");
    println!("closure_mib: {:.1}", size as f64 / (1 << 20) as f64);
    let fresh_cache = || RecordCache::new(1 << 30);

    if wanted("fresh") {
        // Fresh, loopback; then one changed package at a time.
        let (a, b) = (NixNode::start(&keys.public), NixNode::start(&keys.public));
        let (ours_fresh, wire) = ours(&keys, &a, a.port, &v1, &fresh_cache()).await;
        let theirs_fresh = theirs(&keys, b.port, &v1);
        assert_complete(&a, &v1);
        assert_complete(&b, &v1);
        println!("wire_mib: {:.1}", wire as f64 / (1 << 20) as f64);
        ratio("push_ratio_fresh", ours_fresh, theirs_fresh);
        let (ours_inc, theirs_inc) = incremental(&keys, (&a, a.port), (&b, b.port), &increments, false).await;
        ratio("push_ratio_incremental", ours_inc, theirs_inc);
    }

    if wanted("wan") {
        // Fresh, over a 50 ms / 100 Mbit/s link; then one changed package at a time.
        let proxy = support::toxiproxy();
        let (c, d) = (NixNode::start(&keys.public), NixNode::start(&keys.public));
        let (port_c, port_d) = (wan(&proxy, "wan-ours", &c), wan(&proxy, "wan-theirs", &d));
        let (ours_wan, _) = ours(&keys, &c, port_c, &v1, &fresh_cache()).await;
        let theirs_wan = theirs(&keys, port_d, &v1);
        assert_complete(&c, &v1);
        assert_complete(&d, &v1);
        ratio("push_ratio_wan", ours_wan, theirs_wan);
        let (ours_inc_wan, theirs_inc_wan) = incremental(&keys, (&c, port_c), (&d, port_d), &increments, false).await;
        ratio("push_ratio_incremental_wan", ours_inc_wan, theirs_inc_wan);
        // As the operator deploys after a resync: on the session that look
        // logged in with (--ssh-keep-seconds), so the login is not timed.
        let more: Vec<String> = ["v5", "v6", "v7"].into_iter().map(build_closure).collect();
        let (ours_kept, theirs_kept) = incremental(&keys, (&c, port_c), (&d, port_d), &more, true).await;
        ratio("push_ratio_incremental_wan_kept", ours_kept, theirs_kept);
    }

    if wanted("fanout10") {
        // Fan-out to 10 empty nodes at once, loopback.
        let ours_nodes: Vec<NixNode> = (0..10).map(|_| NixNode::start(&keys.public)).collect();
        let their_nodes: Vec<NixNode> = (0..10).map(|_| NixNode::start(&keys.public)).collect();
        let shared = Arc::new(fresh_cache());
        let started = Instant::now();
        let pushes = ours_nodes.iter().map(|n| ours(&keys, n, n.port, &v1, &shared));
        futures::future::join_all(pushes).await;
        let ours_fanout = started.elapsed();
        let started = Instant::now();
        let mut children: Vec<_> =
            their_nodes.iter().map(|n| theirs_command(&keys, n.port, &v1).spawn().expect("nix-copy-closure")).collect();
        for child in &mut children {
            assert!(child.wait().expect("wait").success());
        }
        let theirs_fanout = started.elapsed();
        for node in ours_nodes.iter().chain(&their_nodes) {
            assert!(node.has_path(&v1));
        }
        ratio("push_ratio_fanout10", ours_fanout, theirs_fanout);
    }
}
