//! Test support: the real daemon on 127.0.0.1:0 over TLS, a client that trusts the dev CA, and
//! readers for the audit log and the SQLite file.
//!
//! Every test starts its own daemon with its own data directory, so tests run in parallel.

#![allow(dead_code, unused_imports)]

pub mod keystone;
pub mod small_disk;

mod audit;
mod clients;
mod config;
mod daemon;
mod interop;

pub use audit::*;
pub use clients::*;
pub use config::*;
pub use daemon::*;
pub use interop::*;

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The dev proxy secret.
pub const PROXY_SECRET: &str = "dev-metadata-proxy-secret";

/// Dev tokens.
pub const ADMIN_TOKEN: &str = "dev-admin-token";

/// project-a reader+member.
pub const TOKEN_A: &str = "dev-token-project-a";

/// project-a reader only.
pub const READER_A: &str = "dev-token-reader-a";

/// project-b reader+member.
pub const TOKEN_B: &str = "dev-token-project-b";

/// project-a manager (Keystone's role, which implies member and reader).
pub const MANAGER_A: &str = "dev-token-manager-a";

/// A fresh random instance id.
pub fn new_instance() -> String {
    uuid::Uuid::new_v4().to_string()
}
