//! What the API server itself accepts and rejects: every example is accepted,
//! and every manifest in tests/invalid/ is rejected with a message that names
//! the offending field and says what is allowed.
//!
//! Each file in tests/invalid/ starts with comment lines:
//!   `# expect: <text>`  the error must contain this text (one line per text);
//!   `# update: …`       the file holds two documents: the first is created
//!                       (then its `status`, if it has one, is written
//!                       through the status subresource, as the operator
//!                       would), the second applied over it must be rejected.

mod support;

use std::path::{Path, PathBuf};

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn stderr_and_stdout(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout))
}

/// The documents of a YAML stream that this API server knows: our kinds and
/// core v1 objects. Other kinds (Flux, Argo CD) are checked by their own tests.
fn known_documents(stream: &str) -> Vec<String> {
    stream
        .split("\n---")
        .filter(|doc| {
            doc.lines().any(|l| {
                let l = l.trim();
                l == "apiVersion: v1" || l.starts_with("apiVersion: nixops.io/")
            })
        })
        .map(str::to_owned)
        .collect()
}

/// The manifests under examples/: plain directories file by file, and each
/// Kustomize directory rendered with `kubectl kustomize`.
fn example_streams(dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).expect("read examples").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    if dir.join("kustomization.yaml").exists() {
        let rendered = support::kubectl(&["kustomize", &dir.to_string_lossy()], None);
        assert!(rendered.status.success(), "kubectl kustomize {}: {}", dir.display(), stderr_and_stdout(&rendered));
        out.push((dir.display().to_string(), String::from_utf8_lossy(&rendered.stdout).into_owned()));
    } else {
        for file in yaml_files(dir) {
            let text = std::fs::read_to_string(&file).expect("read example");
            out.push((file.display().to_string(), text));
        }
    }
    for sub in entries.into_iter().filter(|p| p.is_dir()) {
        example_streams(&sub, out);
    }
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "examples").await;

    let mut streams = Vec::new();
    example_streams(&support::repo_root().join("examples"), &mut streams);
    let mut nixops_objects = 0;
    for (source, stream) in streams {
        let docs = known_documents(&stream);
        nixops_objects += docs.iter().filter(|d| d.contains("apiVersion: nixops.io/")).count();
        if docs.is_empty() {
            continue;
        }
        let out = support::kubectl(
            &["apply", "--server-side", "--dry-run=server", "--field-manager=examples-test", "-n", &ns, "-f", "-"],
            Some(&docs.join("\n---\n")),
        );
        assert!(out.status.success(), "{source} was rejected:\n{}", stderr_and_stdout(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("Warning:"), "{source} drew warnings from the API server:\n{stderr}");
    }
    assert!(
        nixops_objects >= 10,
        "expected the examples to hold at least 10 nixops.io objects, found {nixops_objects}"
    );
}

struct InvalidCase {
    file: PathBuf,
    expect: Vec<String>,
    update: bool,
    documents: Vec<String>,
}

fn invalid_cases() -> Vec<InvalidCase> {
    yaml_files(&support::repo_root().join("tests/invalid"))
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("read case");
            let expect: Vec<String> =
                text.lines().filter_map(|l| l.strip_prefix("# expect:")).map(|s| s.trim().to_owned()).collect();
            assert!(!expect.is_empty(), "{} has no `# expect:` line", file.display());
            let update = text.lines().any(|l| l.starts_with("# update:"));
            let documents: Vec<String> = text.split("\n---\n").map(str::to_owned).collect();
            assert_eq!(documents.len(), if update { 2 } else { 1 }, "{}: wrong number of documents", file.display());
            InvalidCase { file, expect, update, documents }
        })
        .collect()
}

/// Writes the `status` of `document`, an object just created in `ns`, as the
/// operator would: rules may allow a change only while status says nothing
/// was created yet.
fn write_status(ns: &str, case: &str, document: &str) {
    let object: serde_json::Value = serde_yaml_ng::from_str(document).expect("first document is YAML");
    let Some(status) = object.get("status") else { return };
    let kind = object["kind"].as_str().expect("kind");
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    let patch = serde_json::json!({ "status": status }).to_string();
    let out = support::kubectl(
        &["patch", "-n", ns, &format!("{kind}/{name}"), "--subresource=status", "--type=merge", "-p", &patch],
        None,
    );
    assert!(out.status.success(), "{case}: writing the first document's status failed: {}", stderr_and_stdout(&out));
}

#[tokio::test]
async fn invalid_manifests_are_rejected_with_a_message_naming_the_field() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let ns = support::namespace(&client, "invalid").await;

    let cases = invalid_cases();
    assert!(cases.len() >= 20, "the corpus must hold at least 20 invalid manifests, found {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file.file_name().expect("file name").to_string_lossy();
        if case.update {
            let created = support::kubectl(&["create", "-n", &ns, "-f", "-"], Some(&case.documents[0]));
            assert!(
                created.status.success(),
                "{name}: the valid first document was rejected: {}",
                stderr_and_stdout(&created)
            );
            write_status(&ns, &name, &case.documents[0]);
        }
        let invalid = case.documents.last().expect("document");
        let verb: &[&str] =
            if case.update { &["replace", "--dry-run=server"] } else { &["create", "--dry-run=server"] };
        let out = support::kubectl(&[verb, &["-n", &ns, "-f", "-"]].concat(), Some(invalid));
        let message = stderr_and_stdout(&out);
        if out.status.success() {
            failures.push(format!("{name}: accepted, but must be rejected"));
            continue;
        }
        for expected in &case.expect {
            if !message.contains(expected.as_str()) {
                failures.push(format!("{name}: error does not contain {expected:?}:\n  {}", message.trim()));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
