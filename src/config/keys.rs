//! `[keys]`: where the data keys come from, and how the rewrap proceeds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::secrets::{check_secret_mode, under};
use super::{ConfigError, err};
use crate::crypto::Keyring;
use crate::keys::KeySource;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeys {
    file: Option<PathBuf>,
    env: Option<String>,
    fd: Option<u32>,
    #[serde(default)]
    rewrap: RewrapMode,
    #[serde(default = "default_rewrap_batch")]
    rewrap_batch: usize,
    #[serde(default = "default_rewrap_pause_ms")]
    rewrap_pause_ms: u64,
}

fn default_rewrap_batch() -> usize {
    64
}

fn default_rewrap_pause_ms() -> u64 {
    100
}

/// When records sealed under older keys are resealed under the active key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewrapMode {
    /// In the background, whenever records under a non-active key exist (after a rotation).
    #[default]
    Auto,
    /// Only when an admin asks (`POST /admin/v1/keys/rewrap`).
    Manual,
}

/// The data keys: where they come from and how rotation proceeds.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// Where the keyring is read from.
    pub source: KeySource,
    /// Whether the daemon may read a key file open to group or others (dev mode).
    pub dev_mode: bool,
    /// When records are resealed under the active key.
    pub rewrap: RewrapMode,
    /// How many records one rewrap step reseals (each in its own audited transaction).
    pub rewrap_batch: usize,
    /// The pause between rewrap steps, so serving traffic keeps the store.
    pub rewrap_pause: Duration,
}

impl KeySettings {
    /// Reads the keyring from its source, enforcing the key file's mode outside dev mode.
    pub fn load(&self, warnings: &mut Vec<String>) -> Result<Keyring, ConfigError> {
        if let KeySource::File(path) = &self.source {
            check_secret_mode(path, self.dev_mode, warnings)?;
        }
        self.source
            .read()
            .and_then(|file| file.to_keyring())
            .map_err(|e| ConfigError::Keyring(e.to_string()))
    }
}

impl RawKeys {
    /// The key source (exactly one of file, environment, descriptor) and the rewrap settings.
    pub(super) fn validate(
        self,
        path: &Path,
        base: &Path,
        dev_mode: bool,
    ) -> Result<KeySettings, ConfigError> {
        let source = match (self.file, self.env, self.fd) {
            (Some(file), None, None) => KeySource::File(under(base, &file)),
            (None, Some(name), None) => KeySource::Env(name),
            (None, None, Some(fd)) => KeySource::Fd(fd),
            _ => {
                return Err(err(
                    path,
                    "[keys] needs exactly one of file, env (a variable holding the keyring) or fd (an inherited descriptor)",
                ));
            }
        };
        Ok(KeySettings {
            source,
            dev_mode,
            rewrap: self.rewrap,
            rewrap_batch: self.rewrap_batch.clamp(1, 4096),
            rewrap_pause: Duration::from_millis(self.rewrap_pause_ms),
        })
    }
}
