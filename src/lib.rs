//! nixops-operator: NixOps as a Kubernetes operator.
//!
//! Users declare NixOS machines and the cloud resources around them as
//! custom resources ([`api`]); controllers provision them and deploy NixOS
//! closures over SSH.
#![forbid(unsafe_code)]
// kube's `#[kube(printcolumn(...))]` repeats `type_ = ...` across columns, which
// this lint mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod api;
pub mod controller;
pub mod crdgen;
pub mod fault;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod nix;
pub mod operator;
pub mod plugin;
pub mod provider;
pub mod ssh;

/// Errors of the operator's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serialise {what} to YAML: {source}")]
    Yaml {
        what: String,
        #[source]
        source: serde_yaml_ng::Error,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
