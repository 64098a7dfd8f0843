//! `[instance_api]`: how instances are identified (the proxy's shared secret, and when its signed
//! headers count).

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::listeners::{ClientAuth, ListenerConfig};
use super::secrets::{check_secret_mode, read_text, under};
use super::{ConfigError, err};
use crate::surface::Surface;

/// When signed proxy headers are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProxyAuth {
    /// Only on a connection with the metadata proxy's client certificate, and only with a valid
    /// signature (the hardened default).
    #[serde(rename = "mtls+signature")]
    MtlsAndSignature,
    /// With a valid signature from anywhere (Nova's behaviour; warned about at startup).
    #[serde(rename = "signature")]
    Signature,
}

/// How instances are identified.
#[derive(Debug, Clone)]
pub struct InstanceAuth {
    /// When signed proxy headers are accepted.
    pub proxy_auth: ProxyAuth,
    /// DNS names (SAN) that mark a client certificate as the metadata proxy's.
    pub proxy_cert_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInstanceApi {
    proxy_shared_secret: Option<SecretString>,
    proxy_shared_secret_file: Option<PathBuf>,
    #[serde(default = "default_proxy_auth")]
    proxy_auth: ProxyAuth,
    #[serde(default)]
    proxy_cert_names: Vec<String>,
}

fn default_proxy_auth() -> ProxyAuth {
    ProxyAuth::MtlsAndSignature
}

impl RawInstanceApi {
    /// The identification mode (checked against the listeners it needs) and the proxy's secret.
    pub(super) fn validate(
        self,
        path: &Path,
        base: &Path,
        dev_mode: bool,
        listeners: &[ListenerConfig],
        warnings: &mut Vec<String>,
    ) -> Result<(InstanceAuth, SecretString), ConfigError> {
        let instance_auth = InstanceAuth {
            proxy_auth: self.proxy_auth,
            proxy_cert_names: self.proxy_cert_names.clone(),
        };
        match instance_auth.proxy_auth {
            ProxyAuth::Signature => warnings.push(
                "proxy_auth = \"signature\": signed proxy headers are accepted from any peer that knows the shared secret (Nova's behaviour); use \"mtls+signature\" to require the proxy's client certificate".into(),
            ),
            ProxyAuth::MtlsAndSignature => {
                if instance_auth.proxy_cert_names.is_empty() {
                    return Err(err(path, "proxy_auth = \"mtls+signature\" needs proxy_cert_names (the DNS names of the proxy's client certificates)"));
                }
                let asks_certs = listeners
                    .iter()
                    .any(|l| l.serves(Surface::Instance) && l.client_auth != ClientAuth::None);
                if !asks_certs {
                    return Err(err(path, "proxy_auth = \"mtls+signature\" needs a listener serving the instance API with client_auth = \"optional\" or \"required\""));
                }
            }
        }
        let secret = proxy_secret(
            (self.proxy_shared_secret, self.proxy_shared_secret_file),
            path,
            base,
            dev_mode,
            warnings,
        )?;
        Ok((instance_auth, secret))
    }
}

/// The shared secret: from its file, or inline in dev mode only; at least 16 characters.
fn proxy_secret(
    given: (Option<SecretString>, Option<PathBuf>),
    path: &Path,
    base: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<SecretString, ConfigError> {
    let proxy_secret = match given {
        (Some(_), Some(_)) => {
            return Err(err(
                path,
                "give proxy_shared_secret or proxy_shared_secret_file, not both",
            ));
        }
        (Some(inline), None) => {
            if !dev_mode {
                return Err(err(
                    path,
                    "an inline proxy_shared_secret is only allowed with dev_mode = true; use proxy_shared_secret_file",
                ));
            }
            inline
        }
        (None, Some(file)) => {
            let file = under(base, &file);
            check_secret_mode(&file, dev_mode, warnings)?;
            SecretString::from(read_text(&file)?.trim().to_owned())
        }
        (None, None) => return Err(err(path, "instance_api needs proxy_shared_secret_file")),
    };
    if proxy_secret.expose_secret().len() < 16 {
        return Err(err(
            path,
            "the proxy shared secret must be at least 16 characters",
        ));
    }
    Ok(proxy_secret)
}
