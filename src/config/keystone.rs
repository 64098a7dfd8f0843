//! `[keystone]`: validating owners' Keystone tokens (keystonemiddleware's `[keystone_authtoken]`).
//!
//! ```toml
//! [keystone]
//! auth_url = "https://keystone.example:5000"   # with or without /v3
//! username = "metapass"                        # the service user (role `service`)
//! password_file = "/etc/metapass/keystone-password"
//! project_name = "service"
//! user_domain_id = "default"
//! project_domain_id = "default"
//! # or: application_credential_id = "...", application_credential_secret_file = "..."
//! ca_file = "/etc/metapass/keystone-ca.pem"    # else the public web roots
//! cache_ttl_secs = 300                         # keystonemiddleware's token_cache_time
//! max_cached_tokens = 10000
//! timeout_secs = 5
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::secrets::{check_certificate_mode, read_secret_file, under};
use super::{ConfigError, err};
use crate::identity::keystone::{KeystoneSettings, ServiceCredentials};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeystone {
    auth_url: String,
    username: Option<String>,
    password_file: Option<PathBuf>,
    project_name: Option<String>,
    #[serde(default = "default_domain")]
    user_domain_id: String,
    #[serde(default = "default_domain")]
    project_domain_id: String,
    application_credential_id: Option<String>,
    application_credential_secret_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_cache_ttl_secs")]
    cache_ttl_secs: u64,
    #[serde(default = "default_max_cached_tokens")]
    max_cached_tokens: usize,
    #[serde(default = "default_timeout_secs")]
    timeout_secs: u64,
}

fn default_domain() -> String {
    "default".into()
}
fn default_cache_ttl_secs() -> u64 {
    300
}
fn default_max_cached_tokens() -> usize {
    10_000
}
fn default_timeout_secs() -> u64 {
    5
}

/// A secret file's text as a [`SecretString`].
fn secret_file(
    path: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<SecretString, ConfigError> {
    read_secret_file(path, dev_mode, warnings).map(|s| SecretString::from(s.as_str().to_owned()))
}

impl RawKeystone {
    /// The settings: the URL, the service's credentials (a user with a password file, or an
    /// application credential), the CA, and the cache and timeout bounds, each checked in turn.
    pub(super) fn validate(
        self,
        path: &Path,
        base: &Path,
        dev_mode: bool,
        warnings: &mut Vec<String>,
    ) -> Result<KeystoneSettings, ConfigError> {
        let mut auth_url = url::Url::parse(&self.auth_url)
            .map_err(|_| err(path, "[keystone] auth_url is not a URL"))?;
        match auth_url.scheme() {
            "https" => {}
            "http" if dev_mode => warnings.push(
                "[keystone] auth_url is http://: tokens and metapass's own password cross the network in clear (dev_mode only)".into(),
            ),
            "http" => {
                return Err(err(
                    path,
                    "[keystone] auth_url must be https:// outside dev_mode (tokens and metapass's password would cross the network in clear)",
                ));
            }
            _ => return Err(err(path, "[keystone] auth_url must be https://")),
        }
        if auth_url.query().is_some()
            || auth_url.fragment().is_some()
            || auth_url.password().is_some()
            || !auth_url.username().is_empty()
        {
            return Err(err(
                path,
                "[keystone] auth_url must be a plain base URL (no credentials, query or fragment)",
            ));
        }
        // Keystone's base: catalogs and keystonemiddleware configurations name it with or
        // without the version.
        let trimmed = auth_url.path().trim_end_matches('/');
        let trimmed = trimmed.strip_suffix("/v3").unwrap_or(trimmed).to_owned();
        auth_url.set_path(&trimmed);

        let password_credentials = (self.username, self.password_file, self.project_name);
        let application = (
            self.application_credential_id,
            self.application_credential_secret_file,
        );
        let credentials = match (password_credentials, application) {
            ((Some(username), Some(file), Some(project_name)), (None, None)) => {
                ServiceCredentials::Password {
                    username,
                    password: secret_file(&under(base, &file), dev_mode, warnings)?,
                    project_name,
                    user_domain_id: self.user_domain_id,
                    project_domain_id: self.project_domain_id,
                }
            }
            ((None, None, None), (Some(id), Some(file))) => {
                ServiceCredentials::ApplicationCredential {
                    id,
                    secret: secret_file(&under(base, &file), dev_mode, warnings)?,
                }
            }
            _ => {
                return Err(err(
                    path,
                    "[keystone] needs either username, password_file and project_name (a service user with the service role), or application_credential_id and application_credential_secret_file",
                ));
            }
        };
        let ca_file = self.ca_file.map(|f| under(base, &f));
        if let Some(ca) = &ca_file {
            check_certificate_mode(ca, dev_mode, warnings)?;
        }
        if self.cache_ttl_secs > 3600 {
            return Err(err(
                path,
                "[keystone] cache_ttl_secs is at most 3600 (a revoked token keeps working that long)",
            ));
        }
        if !(1..=1_000_000).contains(&self.max_cached_tokens) {
            return Err(err(
                path,
                "[keystone] max_cached_tokens must be 1 to 1000000",
            ));
        }
        if !(1..=60).contains(&self.timeout_secs) {
            return Err(err(path, "[keystone] timeout_secs must be 1 to 60"));
        }
        Ok(KeystoneSettings {
            auth_url,
            credentials,
            ca_file,
            cache_ttl: Duration::from_secs(self.cache_ttl_secs),
            max_cached_tokens: self.max_cached_tokens,
            timeout: Duration::from_secs(self.timeout_secs),
        })
    }
}
