//! NARs written in Rust are byte-identical to what Nix itself writes
//! (`nix-store --dump`, from Debian's nix-bin).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn nar_matches_nix_store_dump() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("share/doc/empty")).unwrap();
    std::fs::write(root.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    std::fs::set_permissions(root.join("bin/hello"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("share/doc/README"), vec![b'x'; 4097]).unwrap();
    std::fs::write(root.join("share/doc/a"), b"").unwrap();
    std::fs::write(root.join("Zed"), b"sorted before lower case").unwrap();
    std::os::unix::fs::symlink("bin/hello", root.join("hello-link")).unwrap();

    let ours = {
        let mut out = Vec::new();
        let written = nixops_operator::nix::nar::dump(&root, &mut out).unwrap();
        assert_eq!(written, out.len() as u64);
        out
    };
    let theirs = Command::new("nix-store").arg("--dump").arg(&root).output().expect("run nix-store --dump");
    assert!(theirs.status.success(), "nix-store --dump failed: {}", String::from_utf8_lossy(&theirs.stderr));
    assert_eq!(ours.len(), theirs.stdout.len(), "NAR sizes differ");
    assert!(ours == theirs.stdout, "NAR bytes differ from nix-store --dump");
}

/// The local store reads a closure from Nix's database in dependency order,
/// with the NAR sizes and hashes Nix recorded, and serialises each path to
/// the NAR Nix itself would send.
#[tokio::test]
async fn local_store_closure_matches_nix() {
    use nixops_operator::nix::{StorePath, local_store::LocalStore};
    let nonce: u64 = rand_nonce();
    let expr = format!(
        r#"let
          mk = name: script: builtins.derivation {{ inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" script]; }};
          leaf = mk "leaf-{nonce}" "echo {nonce} > $out";
          mid = mk "mid-{nonce}" "/bin/mkdir $out; echo ${{leaf}} > $out/leaf";
        in mk "top-{nonce}" "/bin/mkdir $out; echo ${{mid}} ${{leaf}} > $out/deps""#
    );
    let built = Command::new("nix-build")
        .args(["--no-out-link", "--option", "substituters", "", "-E", &expr])
        .output()
        .expect("run nix-build");
    assert!(built.status.success(), "nix-build: {}", String::from_utf8_lossy(&built.stderr));
    let top = String::from_utf8(built.stdout).unwrap().trim().to_owned();
    let top = StorePath::parse(&top).unwrap();

    let closure = LocalStore::new("/nix").closure(&top).await.unwrap();
    let names: Vec<&str> = closure.iter().map(|i| i.path.name()).collect();
    assert_eq!(names, [format!("leaf-{nonce}"), format!("mid-{nonce}"), format!("top-{nonce}")]);
    let requisites = Command::new("nix-store").args(["-qR", &top.to_string()]).output().unwrap();
    assert_eq!(String::from_utf8(requisites.stdout).unwrap().lines().count(), 3);

    for info in &closure {
        let nar = LocalStore::new("/nix").nar(&info.path).await.unwrap();
        assert_eq!(nar.len() as u64, info.nar_size, "NAR size of {}", info.path);
        let theirs = Command::new("nix-store").args(["--dump", &info.path.to_string()]).output().unwrap();
        assert!(theirs.status.success());
        assert!(nar == theirs.stdout, "NAR of {} differs from nix-store --dump", info.path);
        let hash = Command::new("nix-store").args(["-q", "--hash", &info.path.to_string()]).output().unwrap();
        assert_eq!(String::from_utf8(hash.stdout).unwrap().trim(), info.nar_hash);
    }
}

fn rand_nonce() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}
