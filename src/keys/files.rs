//! Where the data keys come from, and the keyring file the `metapass keys` commands edit.
//!
//! A keyring is TOML: `active = <id>` and one `[[key]]` per data key (`id`, `secret` as 64 hex
//! digits, optional `created`). It is read from a file (mode 0600 or 0400 enforced outside dev mode),
//! an environment variable, or an inherited file descriptor (for secret managers). Only a file can
//! be reloaded while serving; the others are read once at startup.
//!
//! Secrets stay in [`SecretString`] / [`Zeroizing`] buffers; rendering a file builds it in a
//! [`Zeroizing`] string, and nothing here prints a secret.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::crypto::{self, KeyId, Keyring};

/// Why a keyring could not be read, built or written.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct KeyFileError {
    /// The file, variable or descriptor.
    pub origin: String,
    /// What went wrong (never a secret).
    pub message: String,
}

fn fail(origin: &str, message: impl std::fmt::Display) -> KeyFileError {
    KeyFileError {
        origin: origin.to_owned(),
        message: message.to_string(),
    }
}

/// Where the keyring comes from (`[keys]` in the configuration: exactly one of `file`, `env`, `fd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A TOML file; reloadable.
    File(PathBuf),
    /// An environment variable holding the TOML text.
    Env(String),
    /// An inherited file descriptor to read the TOML text from, once.
    Fd(u32),
}

impl KeySource {
    /// How messages name the source.
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(p) => p.display().to_string(),
            KeySource::Env(name) => format!("environment variable {name}"),
            KeySource::Fd(fd) => format!("file descriptor {fd}"),
        }
    }

    /// Whether the source can be read again while serving (only a file can).
    pub fn reloadable(&self) -> bool {
        matches!(self, KeySource::File(_))
    }

    /// Reads the keyring text. A file must already have passed the mode check.
    pub fn read(&self) -> Result<KeyringFile, KeyFileError> {
        let origin = self.describe();
        let text = match self {
            KeySource::File(path) => {
                Zeroizing::new(fs::read_to_string(path).map_err(|e| fail(&origin, e))?)
            }
            KeySource::Env(name) => Zeroizing::new(
                std::env::var(name).map_err(|_| fail(&origin, "is not set (or not UTF-8)"))?,
            ),
            // Through /dev/fd: the descriptor is opened by path, so no unsafe ownership of a raw fd.
            KeySource::Fd(fd) => Zeroizing::new(
                fs::read_to_string(format!("/dev/fd/{fd}")).map_err(|e| fail(&origin, e))?,
            ),
        };
        KeyringFile::parse(&text, &origin)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyring {
    active: KeyId,
    #[serde(rename = "key", default)]
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: KeyId,
    secret: SecretString,
    #[serde(default)]
    created: Option<String>,
}

/// One data key of a keyring file.
pub struct KeyEntry {
    /// Its id (named in every record it seals).
    pub id: KeyId,
    /// When it was made (`YYYY-MM-DD`), for the operator.
    pub created: Option<String>,
    secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// A keyring as written in its TOML file.
#[derive(Debug)]
pub struct KeyringFile {
    /// The id that seals new records.
    pub active: KeyId,
    /// Every key, in file order.
    pub keys: Vec<KeyEntry>,
}

fn today() -> String {
    crate::clock::wall_now().date().to_string()
}

/// A TOML error in a file that holds secrets, said without quoting the file: the line number and,
/// unless that line holds a secret, the parser's message (a message can quote a value).
pub(crate) fn redacted_toml_error(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return error.message().to_owned();
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let holds_secret = text
        .lines()
        .nth(line - 1)
        .is_some_and(|l| l.contains("secret"));
    if holds_secret {
        format!(
            "line {line}: not valid (the line holds a secret, so it is not shown; a secret is a quoted string of hex digits)"
        )
    } else {
        format!("line {line}: {}", error.message())
    }
}

impl KeyringFile {
    /// Parses keyring TOML (`origin` names it in messages).
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyFileError> {
        let raw: RawKeyring =
            toml::from_str(text).map_err(|e| fail(origin, redacted_toml_error(text, &e)))?;
        let mut keys = Vec::with_capacity(raw.keys.len());
        for k in raw.keys {
            let secret = hex::decode(k.secret.expose_secret().trim())
                .map(Zeroizing::new)
                .map_err(|_| fail(origin, format!("key {}: the secret is not hex", k.id)))?;
            keys.push(KeyEntry {
                id: k.id,
                created: k.created,
                secret,
            });
        }
        let file = Self {
            active: raw.active,
            keys,
        };
        file.to_keyring().map_err(|e| fail(origin, e.message))?;
        Ok(file)
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        KeySource::File(path.to_owned()).read()
    }

    /// The keyring these keys make.
    pub fn to_keyring(&self) -> Result<Keyring, KeyFileError> {
        let keys: Vec<_> = self.keys.iter().map(|k| (k.id, k.secret.clone())).collect();
        Keyring::new(&keys, self.active).map_err(|e| fail("keyring", e))
    }

    /// A new keyring: one fresh random key, id 1, active.
    pub fn generate() -> Result<Self, KeyFileError> {
        Ok(Self {
            active: 1,
            keys: vec![KeyEntry {
                id: 1,
                created: Some(today()),
                secret: crypto::generate_key().map_err(|e| fail("random", e))?,
            }],
        })
    }

    /// Adds a fresh random key with the next id and makes it active; returns its id.
    pub fn rotate(&mut self) -> Result<KeyId, KeyFileError> {
        let id = self
            .keys
            .iter()
            .map(|k| k.id)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| fail("keyring", "no key id is left"))?;
        self.keys.push(KeyEntry {
            id,
            created: Some(today()),
            secret: crypto::generate_key().map_err(|e| fail("random", e))?,
        });
        self.active = id;
        Ok(id)
    }

    /// Removes key `id`, which must exist and not be active.
    pub fn retire(&mut self, id: KeyId) -> Result<(), KeyFileError> {
        if id == self.active {
            return Err(fail(
                "keyring",
                format!("key {id} is the active key; rotate first, then retire it"),
            ));
        }
        let before = self.keys.len();
        self.keys.retain(|k| k.id != id);
        if self.keys.len() == before {
            return Err(fail("keyring", format!("there is no key {id}")));
        }
        Ok(())
    }

    /// The file's text, in a buffer wiped on drop.
    pub fn render(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::from(
            "# metapass keyring: data keys (AES-256). Secret: keep mode 0600, outside version control.\n\
             # `active` seals new records; every [[key]] opens the records sealed under it. Edit with\n\
             # `metapass keys rotate|retire`, then reload the daemon (SIGHUP).\n",
        ));
        out.push_str(&format!("active = {}\n", self.active));
        for k in &self.keys {
            out.push_str(&format!("\n[[key]]\nid = {}\n", k.id));
            if let Some(created) = &k.created {
                out.push_str(&format!("created = {created:?}\n"));
            }
            out.push_str("secret = \"");
            out.push_str(&Zeroizing::new(hex::encode(&*k.secret)));
            out.push_str("\"\n");
        }
        out
    }

    /// Writes a new file at `path` (mode 0600); refuses to overwrite one.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let origin = path.display().to_string();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(&origin, e))?;
        file.write_all(self.render().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| fail(&origin, e))?;
        sync_parent(path).map_err(|e| fail(&origin, e))
    }

    /// Replaces the file at `path` atomically: a 0600 temporary file beside it, synced, renamed
    /// over it, and the directory synced. A crash leaves the old file or the new one, never half.
    pub fn replace(&self, path: &Path) -> Result<(), KeyFileError> {
        let origin = path.display().to_string();
        let name = path
            .file_name()
            .ok_or_else(|| fail(&origin, "not a file name"))?;
        let tmp = path.with_file_name(format!(".{}.new", name.to_string_lossy()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(self.render().as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            sync_parent(path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(|e| fail(&origin, e))
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_rotate_retire_and_render_round_trip() {
        let mut file = KeyringFile::generate().unwrap();
        assert_eq!((file.active, file.keys.len()), (1, 1));
        assert_eq!(file.rotate().unwrap(), 2);
        assert_eq!(file.active, 2);
        let text = file.render();
        let again = KeyringFile::parse(&text, "test").unwrap();
        assert_eq!(again.active, 2);
        assert_eq!(
            again.to_keyring().unwrap().check_values(),
            file.to_keyring().unwrap().check_values(),
            "the secrets survive rendering"
        );
        assert!(file.retire(2).unwrap_err().message.contains("active"));
        assert!(file.retire(9).unwrap_err().message.contains("no key 9"));
        file.retire(1).unwrap();
        assert_eq!(file.keys.iter().map(|k| k.id).collect::<Vec<_>>(), [2]);
        assert!(!format!("{file:?}").contains(&hex::encode(&*file.keys[0].secret)));
    }

    #[test]
    fn bad_files_are_refused_without_echoing_secrets() {
        let secret = "ab".repeat(32);
        for (text, expected) in [
            (
                format!("active = 2\n[[key]]\nid = 1\nsecret = \"{secret}\"\n"),
                "active",
            ),
            (
                format!("active = 1\n[[key]]\nid = 1\nsecret = \"zz{secret}\"\n"),
                "not hex",
            ),
            (
                "active = 1\n[[key]]\nid = 1\nsecret = \"abcd\"\n".to_owned(),
                "32 bytes",
            ),
            (
                format!("active = 1\nextra = 1\n[[key]]\nid = 1\nsecret = \"{secret}\"\n"),
                "unknown field",
            ),
            // A secret the parser would quote back: an unterminated string, an unquoted number.
            (
                format!("active = 1\n[[key]]\nid = 1\nsecret = \"{secret}\n"),
                "line 4",
            ),
            (
                "active = 1\n[[key]]\nid = 1\nsecret = 123456789\n".to_owned(),
                "holds a secret",
            ),
        ] {
            let e = KeyringFile::parse(&text, "k.toml").unwrap_err();
            assert!(e.to_string().contains(expected), "{e}");
            assert!(!e.to_string().contains(&secret), "{e}");
            assert!(!e.to_string().contains("123456789"), "{e}");
        }
    }

    #[test]
    fn files_are_written_owner_only_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.toml");
        let mut file = KeyringFile::generate().unwrap();
        file.write_new(&path).unwrap();
        assert!(file.write_new(&path).is_err(), "never overwrites");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        file.rotate().unwrap();
        file.replace(&path).unwrap();
        assert_eq!(KeyringFile::read(&path).unwrap().active, 2);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}
