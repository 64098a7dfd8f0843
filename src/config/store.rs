//! `[store]`: the embedded SQLite file, or the PostgreSQL database replicas share.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::secrets::{check_certificate_mode, check_secret_mode, read_text, under};
use super::{ConfigError, err};

/// Which store backend, and where.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded SQLite file.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database shared by several replicas.
    Postgres(PostgresSettings),
}

/// How to reach the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// The connection URL (`postgresql://user@host:port/db?...`); secret, since in dev mode it
    /// may carry a password.
    pub url: SecretString,
    /// The password, read from `password_file`.
    pub password: Option<SecretString>,
    /// The CA certificates the database server's certificate must chain to; TLS is required when
    /// set.
    pub ca_file: Option<PathBuf>,
    /// The most connections one replica opens for requests (a few more serve seal counters).
    pub pool_size: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "snake_case")]
pub(super) enum RawStore {
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        url: SecretString,
        password_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// Outside dev mode, TLS to the database (`ca_file`) is required unless this waives it
        /// (a database on a socket-only or otherwise protected path).
        #[serde(default)]
        insecure_plaintext: bool,
    },
}

fn default_pool_size() -> usize {
    16
}

impl RawStore {
    /// The backend: SQLite under the data directory, or PostgreSQL with its password from a file
    /// and TLS required outside dev mode (unless explicitly waived).
    pub(super) fn validate(
        self,
        path: &Path,
        base: &Path,
        data_dir: &Path,
        dev_mode: bool,
        warnings: &mut Vec<String>,
    ) -> Result<StoreConfig, ConfigError> {
        let (url, password_file, ca_file, pool_size, insecure_plaintext) = match self {
            RawStore::Sqlite { path: p } => {
                return Ok(StoreConfig::Sqlite {
                    path: under(data_dir, &p),
                });
            }
            RawStore::Postgres {
                url,
                password_file,
                ca_file,
                pool_size,
                insecure_plaintext,
            } => (url, password_file, ca_file, pool_size, insecure_plaintext),
        };
        let parsed: tokio_postgres::Config = url
            .expose_secret()
            .parse()
            .map_err(|_| err(path, "[store] url is not a PostgreSQL connection URL"))?;
        if parsed.get_password().is_some() && !dev_mode {
            return Err(err(
                path,
                "a password in [store] url is only allowed with dev_mode = true; use password_file",
            ));
        }
        let password = match password_file {
            Some(file) => {
                let file = under(base, &file);
                check_secret_mode(&file, dev_mode, warnings)?;
                Some(SecretString::from(read_text(&file)?.trim().to_owned()))
            }
            None => None,
        };
        let ca_file = ca_file.map(|f| under(base, &f));
        if let Some(ca) = &ca_file {
            check_certificate_mode(ca, dev_mode, warnings)?;
        }
        match (&ca_file, dev_mode, insecure_plaintext) {
            (Some(_), _, _) | (None, true, _) => {}
            (None, false, false) => {
                return Err(err(
                    path,
                    "[store] backend = \"postgres\" needs ca_file (TLS to the database) outside dev_mode; set insecure_plaintext = true only for a database reached over a protected path",
                ));
            }
            (None, false, true) => warnings.push(
                "[store] insecure_plaintext = true: passwords' sealed records and the database password cross the network without TLS".into(),
            ),
        }
        if !(1..=1024).contains(&pool_size) {
            return Err(err(path, "[store] pool_size must be between 1 and 1024"));
        }
        Ok(StoreConfig::Postgres(PostgresSettings {
            url,
            password,
            ca_file,
            pool_size,
        }))
    }
}
