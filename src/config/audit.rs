//! `[audit]`: where the log lives, how durable it is, and the secret its chain is keyed with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{SecretBox, SecretString};
use serde::Deserialize;

use super::secrets::{check_secret_mode, decode_hex_secret, read_text, under};
use super::{ConfigError, err};

/// The shortest audit secret accepted.
pub const MIN_SECRET_LEN: usize = 32;

/// When the writer flushes to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// `fdatasync` every batch before acknowledging it.
    Always,
    /// Acknowledge once written to the OS; `fdatasync` only batches holding a mutation's event.
    Write,
}

/// Audit log settings.
#[derive(Debug)]
pub struct AuditSettings {
    /// Directory of the log files.
    pub dir: PathBuf,
    /// When to flush.
    pub sync: SyncMode,
    /// Rotation size.
    pub max_file_bytes: u64,
    /// Events that may wait for the writer.
    pub queue_capacity: usize,
    /// How long a request waits for its event to be recorded before failing closed.
    pub ack_timeout: Duration,
    /// Below this much free space on the log's filesystem, `/readyz` turns unready (so the load
    /// balancer drains the replica before its disk is full); 0 disables the check.
    pub min_free_bytes: u64,
    /// The name the store records this log's chain head under (`None`: host name and log
    /// directory). Replicas sharing one PostgreSQL store each need their own.
    pub writer_id: Option<String>,
    /// `serve --accept-audit-gap`: start although the log lacks the line the store anchored,
    /// recording the loss as an event (never from the file: an operator's decision per start).
    pub accept_gap: bool,
    /// The audit secret (chain MAC and fingerprint keys are derived from it).
    pub secret: SecretBox<Vec<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    dir: PathBuf,
    sync: SyncMode,
    key_file: PathBuf,
    #[serde(default = "default_max_file_bytes")]
    max_file_bytes: u64,
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    #[serde(default = "default_ack_timeout_ms")]
    ack_timeout_ms: u64,
    #[serde(default = "default_min_free_bytes")]
    min_free_bytes: u64,
    #[serde(default)]
    writer_id: Option<String>,
}

fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_max_file_bytes() -> u64 {
    64 * 1024 * 1024
}

/// The smallest rotation size accepted (one event is about 1.5 KiB).
pub const MIN_AUDIT_FILE_BYTES: u64 = 4096;

fn default_queue_capacity() -> usize {
    16_384
}

fn default_ack_timeout_ms() -> u64 {
    5_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuditKey {
    secret: SecretString,
}

/// Loads the audit secret file.
pub fn load_audit_secret(path: &Path) -> Result<SecretBox<Vec<u8>>, ConfigError> {
    let text = zeroize::Zeroizing::new(read_text(path)?);
    let raw: RawAuditKey = toml::from_str(&text)
        .map_err(|e| super::syntax(path, crate::keys::redacted_toml_error(&text, &e)))?;
    let bytes = decode_hex_secret(path, "secret", &raw.secret)?;
    if bytes.len() < MIN_SECRET_LEN {
        return Err(err(
            path,
            "the audit secret must be at least 32 bytes (64 hex digits)",
        ));
    }
    Ok(SecretBox::new(Box::new(bytes.to_vec())))
}

impl RawAudit {
    /// The log's settings, its directory under the data directory, its key file owner-only.
    pub(super) fn validate(
        self,
        base: &Path,
        data_dir: &Path,
        dev_mode: bool,
        warnings: &mut Vec<String>,
    ) -> Result<AuditSettings, ConfigError> {
        let audit_key_path = under(base, &self.key_file);
        check_secret_mode(&audit_key_path, dev_mode, warnings)?;
        Ok(AuditSettings {
            dir: under(data_dir, &self.dir),
            sync: self.sync,
            max_file_bytes: self.max_file_bytes.max(MIN_AUDIT_FILE_BYTES),
            queue_capacity: self.queue_capacity.max(16),
            ack_timeout: Duration::from_millis(self.ack_timeout_ms.max(1)),
            min_free_bytes: self.min_free_bytes,
            writer_id: self.writer_id.filter(|w| !w.trim().is_empty()),
            accept_gap: false,
            secret: load_audit_secret(&audit_key_path)?,
        })
    }
}
