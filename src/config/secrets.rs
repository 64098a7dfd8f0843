//! Reading the files that hold secrets and TLS material: paths resolved against the file that
//! names them, modes checked (owner-only outside dev mode), text trimmed and zeroized.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::{ConfigError, err};

/// Puts the password of `[section]` into its `url`: from `password_file` (owner-only outside dev
/// mode); a password written in the URL itself is only for dev mode.
pub(super) fn url_password(
    url: &mut url::Url,
    section: &str,
    password_file: Option<&Path>,
    path: &Path,
    base: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if url.password().is_some() && !dev_mode {
        return Err(err(
            path,
            format!(
                "a password in [{section}] url is only allowed with dev_mode = true; use password_file"
            ),
        ));
    }
    if let Some(file) = password_file {
        let password = read_secret_file(&under(base, file), dev_mode, warnings)?;
        url.set_password(Some(&password))
            .map_err(|()| err(path, format!("[{section}] url cannot carry a password")))?;
    }
    Ok(())
}

/// Resolves `p` against `base` unless it is absolute.
pub(super) fn under(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

pub(super) fn read_text(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// Reads a secret file (mode-checked as [`check_secret_mode`] does) to its trimmed text; an
/// empty file is an error.
pub(super) fn read_secret_file(
    path: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<Zeroizing<String>, ConfigError> {
    check_secret_mode(path, dev_mode, warnings)?;
    let text = Zeroizing::new(read_text(path)?);
    let secret = text.trim();
    if secret.is_empty() {
        return Err(err(path, "is empty"));
    }
    Ok(Zeroizing::new(secret.to_owned()))
}

/// Refuses (or, in dev mode, warns about) a secret file readable by group or others.
pub(super) fn check_secret_mode(
    path: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    check_private_mode(path, "holds secrets", dev_mode, warnings)
}

/// Refuses (or, in dev mode, warns about) a certificate file open to group or others. Certificates
/// are public, but PEM bundles often carry the key too, and a group-writable CA file lets someone
/// else choose whom the daemon trusts: TLS material is kept owner-only as a whole.
pub(super) fn check_certificate_mode(
    path: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    check_private_mode(path, "is TLS material", dev_mode, warnings)
}

pub(super) fn check_private_mode(
    path: &Path,
    what: &str,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let mode = fs::metadata(path)
        .map_err(|e| ConfigError::Unreadable {
            path: path.to_owned(),
            why: e.to_string(),
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        let message = format!(
            "{} {what} but its mode is {:o} (group/others may read it); chmod 600 it",
            path.display(),
            mode & 0o777
        );
        if !dev_mode {
            return Err(ConfigError::Permissions {
                path: path.to_owned(),
                why: message,
            });
        }
        warnings.push(format!("{message} (allowed because dev_mode = true)"));
    }
    Ok(())
}

pub(super) fn decode_hex_secret(
    path: &Path,
    what: &str,
    hex_text: &SecretString,
) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    hex::decode(hex_text.expose_secret().trim())
        .map(Zeroizing::new)
        .map_err(|_| err(path, format!("{what} is not hex")))
}
