//! What a store knows about one store path: its references (the paths it
//! needs), its NAR hash and size, and how to put a closure in dependency order.

use std::collections::{BTreeMap, BTreeSet};

use super::StorePath;

/// Metadata of one valid store path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PathInfo {
    pub path: StorePath,
    /// Paths this one refers to (may include itself).
    pub references: BTreeSet<StorePath>,
    /// The derivation that built it, if known (full store path).
    pub deriver: Option<String>,
    /// `sha256:<nix base32>` of the NAR serialisation.
    pub nar_hash: String,
    /// Size of the NAR serialisation in bytes.
    pub nar_size: u64,
}

/// A closure that lacks some of its paths.
#[derive(Debug, thiserror::Error)]
#[error("{missing} is referenced by {by} but is not in the closure")]
pub struct IncompleteClosure {
    pub missing: StorePath,
    pub by: StorePath,
}

/// Orders a closure so that every path comes after all of its references
/// (ties broken by path, so the order is stable).
pub fn dependency_order(infos: Vec<PathInfo>) -> Result<Vec<PathInfo>, IncompleteClosure> {
    let mut pending: BTreeMap<StorePath, PathInfo> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    for info in pending.values() {
        if let Some(missing) = info.references.iter().find(|r| !pending.contains_key(r)) {
            return Err(IncompleteClosure { missing: missing.clone(), by: info.path.clone() });
        }
    }
    let mut done = BTreeSet::new();
    let mut ordered = Vec::with_capacity(pending.len());
    // Depth-first post-order with an explicit stack: closures can be deep.
    let roots: Vec<StorePath> = pending.keys().cloned().collect();
    for root in roots {
        let mut stack = vec![(root, false)];
        while let Some((path, expanded)) = stack.pop() {
            if done.contains(&path) {
                continue;
            }
            if expanded {
                done.insert(path.clone());
                if let Some(info) = pending.remove(&path) {
                    ordered.push(info);
                }
                continue;
            }
            stack.push((path.clone(), true));
            if let Some(info) = pending.get(&path) {
                for r in info.references.iter().rev() {
                    if *r != path && !done.contains(r) {
                        stack.push((r.clone(), false));
                    }
                }
            }
        }
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, refs: &[&str]) -> PathInfo {
        let p = |n: &str| StorePath::from_base_name(&format!("{}-{n}", "0".repeat(31) + &n[..1])).unwrap();
        PathInfo {
            path: p(name),
            references: refs.iter().map(|r| p(r)).collect(),
            deriver: None,
            nar_hash: String::new(),
            nar_size: 0,
        }
    }

    #[test]
    fn references_come_first() {
        let infos = vec![info("a", &["b", "c", "a"]), info("b", &["c"]), info("c", &[]), info("d", &["a"])];
        let order: Vec<String> = dependency_order(infos).unwrap().iter().map(|i| i.path.name().to_owned()).collect();
        assert_eq!(order, ["c", "b", "a", "d"]);
    }

    #[test]
    fn a_missing_reference_is_reported() {
        let err = dependency_order(vec![info("a", &["b"])]).unwrap_err();
        assert_eq!(err.missing.name(), "b");
    }
}
