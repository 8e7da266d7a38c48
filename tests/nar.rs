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
