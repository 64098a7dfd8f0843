//! Configurations for tests: the dev one, edited copies, dev certificates, a fresh PostgreSQL
//! schema.

#![allow(unused_imports)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::*;

/// The dev config.
pub fn dev_config() -> PathBuf {
    repo().join("policy/dev.toml")
}

/// Writes a copy of the dev config into `dir` with every path made absolute, after `edit` (applied
/// to the config text); returns its path. For tests that change a setting or a referenced file.
pub fn config_with(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let policy = repo().join("policy");
    let mut text = std::fs::read_to_string(dev_config())
        .expect("dev.toml")
        .replace(
            "\"../certs-dev/",
            &format!("\"{}/certs-dev/", repo().display()),
        );
    for file in [
        "dev-tokens.toml",
        "dev-keyring.toml",
        "dev-audit-key.toml",
        "dev-limits.toml",
        "policy.toml",
    ] {
        text = text.replace(
            &format!("\"{file}\""),
            &format!("\"{}/{file}\"", policy.display()),
        );
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, edit(text)).expect("write config");
    path
}

/// Like [`config_with`], with the dev config's listener replaced by `listeners` (TOML
/// `[[listener]]` tables).
pub fn config_with_listeners(
    dir: &Path,
    listeners: &str,
    edit: impl FnOnce(String) -> String,
) -> PathBuf {
    config_with(dir, |text| {
        let start = text.find("[[listener]]").expect("a listener");
        let end = text.find("[tls]").expect("[tls]");
        edit(format!("{}{listeners}\n{}", &text[..start], &text[end..]))
    })
}

/// Writes a fresh dev certificate set with `metapass dev-certs` into `out`.
pub fn dev_certs_into(out: &Path) {
    let made = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["dev-certs", "--out"])
        .arg(out)
        .output()
        .expect("run metapass dev-certs");
    assert!(made.status.success(), "{made:?}");
}

/// A fresh schema on the PostgreSQL server `METAPASS_TEST_POSTGRES` names: (a URL that uses it,
/// an administrative connection, the schema's name); `None`, after saying SKIPPED, without one.
pub async fn fresh_postgres_schema() -> Option<(String, tokio_postgres::Client, String)> {
    let Ok(base) = std::env::var("METAPASS_TEST_POSTGRES") else {
        eprintln!("SKIPPED: METAPASS_TEST_POSTGRES is not set");
        return None;
    };
    let schema = format!("mp_{}", uuid::Uuid::new_v4().simple());
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("connect to METAPASS_TEST_POSTGRES");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    Some((url, client, schema))
}
