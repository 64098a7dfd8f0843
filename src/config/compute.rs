//! `[compute_api]`: how owners' clients reach the compute API subset.
//!
//! ```toml
//! [compute_api]
//! max_microversion = "2.104"   # the highest microversion accepted (default: Nova's current maximum)
//! path_prefix = "/compute"     # catalogs such as https://host/compute/v2.1 (default: none)
//! ```

use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, err};
use crate::microversion::{self, Microversion};

/// The compute API's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeApi {
    /// The highest microversion served (requests above it are 406, `latest` resolves to it).
    pub max_microversion: Microversion,
    /// A path prefix the compute API is also served under (`""` for none): `/compute` serves
    /// `/compute/v2.1/...` as well as `/v2.1/...`.
    pub path_prefix: String,
}

impl Default for ComputeApi {
    fn default() -> Self {
        Self {
            max_microversion: microversion::NOVA_MAX,
            path_prefix: String::new(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawComputeApi {
    max_microversion: Option<String>,
    #[serde(default)]
    path_prefix: String,
}

/// Paths the other surfaces own: a prefix may not shadow them.
const RESERVED: [&str; 6] = [
    "/openstack",
    "/admin",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v2.1",
];

impl RawComputeApi {
    pub(super) fn validate(self, path: &Path) -> Result<ComputeApi, ConfigError> {
        let max_microversion = match self.max_microversion {
            None => microversion::NOVA_MAX,
            Some(text) => Microversion::parse(&text)
                .filter(|v| v.major == 2 && *v >= microversion::MIN)
                .ok_or_else(|| {
                    err(
                        path,
                        format!("[compute_api] max_microversion {text:?} must be 2.N with N >= 1 (Nova's maximum today is {})", microversion::NOVA_MAX),
                    )
                })?,
        };
        let prefix = self.path_prefix;
        if !prefix.is_empty() {
            let segments_ok = prefix.starts_with('/')
                && prefix[1..].split('/').all(|s| {
                    !s.is_empty()
                        && s != "."
                        && s != ".."
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                });
            if !segments_ok {
                return Err(err(
                    path,
                    "[compute_api] path_prefix must look like \"/compute\": segments of letters, digits, '-', '_' and '.', no trailing '/'",
                ));
            }
            if RESERVED
                .iter()
                .any(|r| prefix == *r || prefix.starts_with(&format!("{r}/")))
            {
                return Err(err(
                    path,
                    format!("[compute_api] path_prefix {prefix:?} would shadow another API"),
                ));
            }
        }
        Ok(ComputeApi {
            max_microversion,
            path_prefix: prefix,
        })
    }
}
