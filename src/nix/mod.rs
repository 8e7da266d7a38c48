//! Nix without a `nix` binary: store paths, Nix's base32, and NAR
//! serialisation, as needed to push closures to machines.

pub mod base32;
pub mod nar;
pub mod store_path;

pub use store_path::StorePath;
