//! `[tokens]`: the token file (owner and admin tokens, held as SHA-256 hashes).

use std::path::Path;

use serde::Deserialize;

use super::secrets::read_text;
use super::{ConfigError, err};
use crate::identity::{Role, TokenEntry, TokenTable};
use crate::ids::ProjectId;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenFile {
    #[serde(default, rename = "token")]
    tokens: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    label: String,
    sha256: String,
    project: String,
    roles: Vec<Role>,
    #[serde(default)]
    client_cert_sha256: Option<String>,
}

/// Loads a token file.
pub fn load_tokens(path: &Path) -> Result<TokenTable, ConfigError> {
    parse_tokens(&read_text(path)?, path)
}

/// Parses the text of a token file (`path` names it in messages).
pub fn parse_tokens(text: &str, path: &Path) -> Result<TokenTable, ConfigError> {
    let raw: RawTokenFile = toml::from_str(text).map_err(|e| super::syntax(path, e))?;
    let mut entries = Vec::with_capacity(raw.tokens.len());
    for t in raw.tokens {
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&t.sha256, &mut sha256).map_err(|_| {
            err(
                path,
                format!("token {:?}: sha256 must be 64 hex digits", t.label),
            )
        })?;
        let project = ProjectId::parse(&t.project)
            .map_err(|e| err(path, format!("token {:?}: {e}", t.label)))?;
        if t.roles.is_empty() {
            return Err(err(path, format!("token {:?} has no roles", t.label)));
        }
        let client_cert_sha256 = match &t.client_cert_sha256 {
            None => None,
            Some(hex_text) => {
                let mut fingerprint = [0u8; 32];
                hex::decode_to_slice(hex_text.replace(':', ""), &mut fingerprint).map_err(
                    |_| {
                        err(
                            path,
                            format!(
                                "token {:?}: client_cert_sha256 must be 64 hex digits",
                                t.label
                            ),
                        )
                    },
                )?;
                Some(fingerprint)
            }
        };
        entries.push(TokenEntry {
            label: t.label,
            sha256,
            project,
            roles: t.roles,
            client_cert_sha256,
        });
    }
    Ok(TokenTable::new(entries))
}
