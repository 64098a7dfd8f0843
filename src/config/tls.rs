//! `[tls]`: the server certificate and the client CA and CRLs.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::secrets::{check_certificate_mode, check_secret_mode, under};
use super::{ConfigError, err};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    key: PathBuf,
    pub(super) client_ca: Option<PathBuf>,
    #[serde(default)]
    client_crls: Vec<PathBuf>,
}

/// TLS certificate and key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// PEM certificate revocation lists for client certificates.
    pub client_crls: Vec<PathBuf>,
}

impl RawTls {
    /// The files, resolved against `base`, with the key owner-only and the certificates kept as
    /// TLS material (outside dev mode).
    pub(super) fn validate(
        self,
        path: &Path,
        base: &Path,
        dev_mode: bool,
        warnings: &mut Vec<String>,
    ) -> Result<TlsFiles, ConfigError> {
        if self.client_ca.is_none() && !self.client_crls.is_empty() {
            return Err(err(
                path,
                "[tls] client_crls needs client_ca (the CRLs check client certificates)",
            ));
        }
        let tls = TlsFiles {
            cert: under(base, &self.cert),
            key: under(base, &self.key),
            client_ca: self.client_ca.as_deref().map(|p| under(base, p)),
            client_crls: self.client_crls.iter().map(|p| under(base, p)).collect(),
        };
        check_secret_mode(&tls.key, dev_mode, warnings)?;
        for certificate in std::iter::once(&tls.cert)
            .chain(&tls.client_ca)
            .chain(&tls.client_crls)
        {
            check_certificate_mode(certificate, dev_mode, warnings)?;
        }
        Ok(tls)
    }
}
