//! `[nova_lookup]`: registering an unknown instance at once from Nova's database.
//!
//! ```toml
//! [nova_lookup]
//! url = "mysql://metapass_ro@nova-db:3306/nova"   # a read-only account; no password in the URL
//! password_file = "/etc/metapass/nova-db-password"
//! ca_file = "/etc/metapass/nova-db-ca.pem"        # TLS to the database: required outside dev mode
//! # insecure_plaintext = true                      # ...unless waived (a protected path only)
//! timeout_ms = 2000
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::secrets::{under, url_password};
use super::{ConfigError, err};

/// Where and how to look an unknown instance up in Nova's database.
#[derive(Debug, Clone)]
pub struct NovaLookupSettings {
    /// The database URL, password included (never logged).
    pub url: SecretString,
    /// How long one lookup may take; past it the instance counts as not registered yet.
    pub timeout: Duration,
    /// The CA the database server's certificate must chain to (TLS); `None`: plaintext, only in
    /// dev mode or with `insecure_plaintext`.
    pub ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNovaLookup {
    url: SecretString,
    password_file: Option<PathBuf>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    insecure_plaintext: bool,
}

fn default_timeout_ms() -> u64 {
    2000
}

impl RawNovaLookup {
    pub(super) fn validate(
        self,
        path: &Path,
        base: &Path,
        dev_mode: bool,
        warnings: &mut Vec<String>,
    ) -> Result<NovaLookupSettings, ConfigError> {
        let mut url = url::Url::parse(self.url.expose_secret())
            .map_err(|_| err(path, "[nova_lookup] url is not a mysql:// URL"))?;
        if url.scheme() != "mysql" {
            return Err(err(path, "[nova_lookup] url must be mysql://"));
        }
        url_password(
            &mut url,
            "nova_lookup",
            self.password_file.as_deref(),
            path,
            base,
            dev_mode,
            warnings,
        )?;
        if !(100..=30_000).contains(&self.timeout_ms) {
            return Err(err(path, "[nova_lookup] timeout_ms must be 100 to 30000"));
        }
        let ca_file = self.ca_file.map(|f| under(base, &f));
        if let Some(ca) = &ca_file
            && !ca.is_file()
        {
            return Err(err(
                path,
                format!("[nova_lookup] ca_file {} is not a file", ca.display()),
            ));
        }
        if ca_file.is_none() {
            if !(dev_mode || self.insecure_plaintext) {
                return Err(err(
                    path,
                    "[nova_lookup] needs TLS to Nova's database outside dev mode: set ca_file (the CA of the database server's certificate), or insecure_plaintext = true on a protected network",
                ));
            }
            warnings.push(
                "[nova_lookup]: Nova's database is reached without TLS; keep it on a protected network and give metapass a read-only account".into(),
            );
        }
        Ok(NovaLookupSettings {
            url: SecretString::from(url.to_string()),
            timeout: Duration::from_millis(self.timeout_ms),
            ca_file,
        })
    }
}
