//! The data keys' whole lifecycle, apart from the cryptography itself ([`crate::crypto`]):
//!
//! - [`files`]: where a keyring comes from (file, environment, descriptor) and the keyring file the
//!   `metapass keys` commands edit;
//! - [`state`]: the keyring in use while serving, the checks a keyring must pass before it is used
//!   (at startup, on SIGHUP, on `POST /admin/v1/keys/reload`), and the key status report;
//! - [`rewrap`]: the background task that reseals passwords under the active key.
//!
//! The admin endpoints that reach these are in `api::keys`.

pub(crate) mod files;
pub(crate) mod rewrap;
pub(crate) mod state;

pub(crate) use files::{KeySource, KeyringFile, redacted_toml_error};

/// Why a keyring is not installed. Whatever the reason, the keys in use stay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The keyring fails a check against the store (a key missing, a key id with another secret),
    /// or could not be read.
    #[error("{0}")]
    Refused(String),
    /// The keyring's source is read once (environment, descriptor).
    #[error("The keyring comes from {0}, which is read once; restart to change keys.")]
    NotReloadable(String),
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}
