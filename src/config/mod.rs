//! Configuration: every file and secret metapass needs is read and validated here, at startup.
//!
//! The main file is TOML (see `policy/dev.toml` for a commented example). Paths in it are relative
//! to the file's own directory; the store and audit paths are relative to the data directory.
//! Secrets come from files (or, for the proxy secret, inline in dev configurations) and are held in
//! `secrecy` types from the moment they are read. Files holding secrets must not be readable by
//! group or others; a configuration with `dev_mode = true` is allowed to break that rule, loudly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

mod audit;
mod compute;
mod instance;
mod keys;
mod keystone;
mod limits;
mod listeners;
mod notifications;
mod nova_lookup;
mod secrets;
mod store;
mod tls;
mod tokens;

pub use audit::{AuditSettings, MIN_AUDIT_FILE_BYTES, MIN_SECRET_LEN, SyncMode, load_audit_secret};
pub use compute::ComputeApi;
pub use instance::{InstanceAuth, ProxyAuth};
pub use keys::{KeySettings, RewrapMode};
pub use limits::Limits;
pub use listeners::{ClientAuth, ClientIpHeader, ListenerConfig};
pub use notifications::NotificationSettings;
pub use nova_lookup::NovaLookupSettings;
pub use store::{PostgresSettings, StoreConfig};
pub use tls::TlsFiles;
pub use tokens::{load_tokens, parse_tokens};

use crate::crypto::Keyring;
use crate::identity::TokenTable;
/// The rate limits file's contents (`Config::rate_limits`), nameable for tools that load another.
pub use crate::limits::RateLimitConfig;
use crate::policy::Policy;
use secrets::{check_secret_mode, read_text, under};

/// Why the configuration was refused. Every message names the file and, where the parser knows
/// it, the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read (missing, unreadable).
    #[error("{}: {why}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        why: String,
    },
    /// A file is not valid TOML for its schema (unknown keys included).
    #[error("{}: {why}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (secrets redacted).
        why: String,
    },
    /// A value breaks a rule (the message names the key and the rule).
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file holding the value.
        path: PathBuf,
        /// The rule broken.
        why: String,
    },
    /// A file holding secrets or TLS material is open to group or others (outside dev mode).
    #[error("{why}")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// The mode found and the fix.
        why: String,
    },
    /// The keyring could not be read or is not valid.
    #[error("{0}")]
    Keyring(String),
}

/// A value in `path` that breaks a rule.
fn err(path: &Path, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// `path` that does not parse.
fn syntax(path: &Path, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::Syntax {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// Command-line overrides of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`: the address of the first listener.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

/// The loaded configuration.
#[derive(Debug)]
pub struct Config {
    /// Development mode: dev secrets and lax file modes are allowed, with warnings.
    pub dev_mode: bool,
    /// The listening sockets.
    pub listeners: Vec<ListenerConfig>,
    /// The data directory (store and audit log live under it by default).
    pub data_dir: PathBuf,
    /// Connection and request bounds.
    pub limits: Limits,
    /// The server certificate.
    pub tls: TlsFiles,
    /// The metadata proxy's shared secret.
    pub proxy_secret: SecretString,
    /// How instances are identified.
    pub instance_auth: InstanceAuth,
    /// Accepted owner and admin tokens from the token file (empty without `[tokens]`).
    pub tokens: TokenTable,
    /// Keystone token validation, when `[keystone]` is configured.
    pub keystone: Option<crate::identity::keystone::KeystoneSettings>,
    /// How the compute API is reached (microversions, path prefix).
    pub compute_api: compute::ComputeApi,
    /// The access policy.
    pub policy: Policy,
    /// The rate limits.
    pub rate_limits: RateLimitConfig,
    /// Where the data keys come from, and how rotation proceeds.
    pub keys: KeySettings,
    /// The data keys, as loaded at startup.
    pub keyring: Keyring,
    /// The store.
    pub store: StoreConfig,
    /// The audit log.
    pub audit: AuditSettings,
    /// Following Nova's notifications, if enabled.
    pub notifications: Option<NotificationSettings>,
    /// Registering unknown instances from Nova's database, when configured.
    pub nova_lookup: Option<NovaLookupSettings>,
    /// Warnings to log at startup (dev mode, lax modes).
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    dev_mode: bool,
    server: RawServer,
    #[serde(rename = "listener")]
    listeners: Vec<ListenerConfig>,
    tls: tls::RawTls,
    instance_api: instance::RawInstanceApi,
    #[serde(default)]
    tokens: Option<RawFileRef>,
    #[serde(default)]
    keystone: Option<keystone::RawKeystone>,
    #[serde(default)]
    compute_api: compute::RawComputeApi,
    #[serde(default)]
    policy: Option<RawFileRef>,
    rate_limits: RawFileRef,
    keys: keys::RawKeys,
    store: store::RawStore,
    #[serde(default)]
    nova_notifications: Option<notifications::RawNotifications>,
    #[serde(default)]
    nova_lookup: Option<nova_lookup::RawNovaLookup>,
    audit: audit::RawAudit,
    #[serde(default)]
    limits: Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    data_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileRef {
    file: PathBuf,
}

impl Config {
    /// Reads the configuration at `path` and everything it names; each section validates its
    /// own part.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| syntax(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let dev_mode = raw.dev_mode;
        let mut warnings = Vec::new();
        if dev_mode {
            warnings.push(
                "dev_mode = true: this configuration uses public development secrets; never use it for real instances"
                    .into(),
            );
        }
        let data_dir = match &overrides.data_dir {
            Some(d) => d.clone(),
            None => under(base, &raw.server.data_dir),
        };
        let mut listeners = raw.listeners;
        if let (Some(first), Some(address)) = (listeners.first_mut(), overrides.listen) {
            first.address = address;
        }
        listeners::validate_listeners(path, &listeners, raw.tls.client_ca.is_some())?;
        let tls = raw.tls.validate(path, base, dev_mode, &mut warnings)?;
        let (instance_auth, proxy_secret) =
            raw.instance_api
                .validate(path, base, dev_mode, &listeners, &mut warnings)?;
        let (tokens, keystone) = owner_authentication(
            raw.tokens,
            raw.keystone,
            path,
            base,
            dev_mode,
            &mut warnings,
        )?;
        let policy = match &raw.policy {
            Some(p) => {
                let policy_path = under(base, &p.file);
                Policy::from_toml(&read_text(&policy_path)?).map_err(|e| err(&policy_path, e))?
            }
            None => Policy::nova_defaults(),
        };
        let limits_path = under(base, &raw.rate_limits.file);
        let rate_limits = RateLimitConfig::from_toml(&read_text(&limits_path)?)
            .map_err(|e| err(&limits_path, e))?;
        let keys = raw.keys.validate(path, base, dev_mode)?;
        let keyring = keys.load(&mut warnings)?;
        Ok(Self {
            dev_mode,
            store: raw
                .store
                .validate(path, base, &data_dir, dev_mode, &mut warnings)?,
            notifications: match raw.nova_notifications {
                Some(n) => n.validate(path, base, dev_mode, &mut warnings)?,
                None => None,
            },
            nova_lookup: raw
                .nova_lookup
                .map(|n| n.validate(path, base, dev_mode, &mut warnings))
                .transpose()?,
            audit: raw
                .audit
                .validate(base, &data_dir, dev_mode, &mut warnings)?,
            compute_api: raw.compute_api.validate(path)?,
            listeners,
            data_dir,
            limits: raw.limits,
            tls,
            proxy_secret,
            instance_auth,
            tokens,
            keystone,
            policy,
            rate_limits,
            keys,
            keyring,
            warnings,
        })
    }
}

/// `[tokens]` and `[keystone]`: owners need at least one of them.
fn owner_authentication(
    tokens: Option<RawFileRef>,
    keystone: Option<keystone::RawKeystone>,
    path: &Path,
    base: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<
    (
        TokenTable,
        Option<crate::identity::keystone::KeystoneSettings>,
    ),
    ConfigError,
> {
    if tokens.is_none() && keystone.is_none() {
        return Err(err(
            path,
            "owners need a way to authenticate: configure [keystone], [tokens] (a token file), or both",
        ));
    }
    let table = match &tokens {
        Some(file) => {
            let tokens_path = under(base, &file.file);
            check_secret_mode(&tokens_path, dev_mode, warnings)?;
            load_tokens(&tokens_path)?
        }
        None => TokenTable::default(),
    };
    let keystone = keystone
        .map(|k| k.validate(path, base, dev_mode, warnings))
        .transpose()?;
    Ok((table, keystone))
}
