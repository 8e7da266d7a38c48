//! Nix without a `nix` binary: store paths, Nix's base32, NAR serialisation,
//! path metadata, closure sources and the serve protocol, as needed to push
//! closures to machines.

pub mod activation;
pub mod base32;
pub mod build;
pub mod cache;
pub mod check;
pub mod keys;
pub mod local_store;
pub mod membership;
pub mod nar;
pub mod narinfo;
pub mod path_info;
pub mod push;
pub mod remote_store;
pub mod serve;
pub mod store_path;

pub use path_info::PathInfo;
pub use store_path::StorePath;
