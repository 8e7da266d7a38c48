//! The CustomResourceDefinitions: checked-in YAML is current, and every CRD
//! installs into a real API server with the names users type.

mod support;

use std::collections::BTreeSet;

use kube::discovery::Discovery;

/// `crds/` must match what the code generates; run `make crds` after changing src/api.
#[test]
fn checked_in_crds_are_current() {
    let dir = support::repo_root().join("crds");
    let generated = nixops_operator::crdgen::render().expect("render CRDs");
    let mut expected_files = BTreeSet::new();
    for file in &generated {
        expected_files.insert(file.file_name.clone());
        let on_disk = std::fs::read_to_string(dir.join(&file.file_name))
            .unwrap_or_else(|e| panic!("crds/{} missing ({e}); run `make crds`", file.file_name));
        assert!(on_disk == file.yaml, "crds/{} is stale; run `make crds`", file.file_name);
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("read crds/")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected_files, "crds/ holds files the code no longer generates; run `make crds`");
}

#[tokio::test]
async fn every_crd_is_established_and_discoverable_by_category_and_short_name() {
    let client = support::client().await;
    support::install_crds(&client).await;

    let expected: BTreeSet<String> =
        ["Backup", "KeyPair", "Machine", "Network", "S3Bucket", "Volume"].iter().map(|s| s.to_string()).collect();
    // An Established CRD reaches the API server's discovery a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let discovery = loop {
        let discovery = Discovery::new(client.clone()).filter(&["nixops.io"]).run().await.expect("discovery");
        let found: BTreeSet<String> =
            discovery.groups().flat_map(|g| g.recommended_resources()).map(|(r, _)| r.kind).collect();
        if found == expected || std::time::Instant::now() > deadline {
            break discovery;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let mut kinds = BTreeSet::new();
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            assert_eq!(resource.version, "v1alpha1");
            assert_eq!(caps.scope, kube::discovery::Scope::Namespaced, "{} must be namespaced", resource.kind);
            assert!(
                caps.subresources.iter().any(|(s, _)| s.plural == "status"),
                "{} has no status subresource",
                resource.kind
            );
            kinds.insert(resource.kind.clone());
        }
    }
    assert_eq!(kinds, expected);

    // What a user types: the category lists all six, short names resolve.
    let out = support::kubectl(&["api-resources", "--categories=nixops", "-o", "name"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    let expected: BTreeSet<String> = ["backups", "keypairs", "machines", "networks", "s3buckets", "volumes"]
        .iter()
        .map(|p| format!("{p}.nixops.io"))
        .collect();
    assert_eq!(listed, expected);

    for short in ["nm", "nixmachine", "nixnet", "nixvol", "nixkey", "nixbucket", "nixbackup"] {
        let out = support::kubectl(&["get", short, "-A"], None);
        assert!(out.status.success(), "kubectl get {short}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = support::kubectl(&["get", "nixops", "-A"], None);
    assert!(out.status.success(), "kubectl get nixops: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let client = support::client().await;
    support::install_crds(&client).await;
    // Discovery caches in kubectl can lag a fresh CRD by a moment; retry briefly.
    let mut last = String::new();
    for _ in 0..50 {
        let out = support::kubectl(&["explain", "machine.spec.nixos.closure"], None);
        last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            assert!(last.contains("NixOS system closure to activate"), "{last}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("kubectl explain failed: {last}");
}
