//! The interop venv (python-novaclient, openstacksdk, cloudbase-init) and its scripts.

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

/// The Python interpreter of the interop virtualenv, created on first use.
///
/// `METAPASS_INTEROP_VENV` names an existing venv (scripts/test-all prepares one). Otherwise the
/// venv is `target/interop-venv`, created under a file lock (tests run in parallel processes) and
/// filled from `tests/interop/requirements.txt`, which pins the real clients from PyPI.
pub fn interop_python() -> PathBuf {
    let venv = std::env::var_os("METAPASS_INTEROP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/interop-venv"));
    let python = venv.join("bin/python");
    let requirements = repo().join("tests/interop/requirements.txt");
    let stamp = venv.join(".requirements-installed");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    std::fs::create_dir_all(repo().join("target")).expect("target dir");
    let lock = std::fs::File::create(repo().join("target/interop-venv.lock")).expect("lock file");
    lock.lock().expect("lock");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run");
            assert!(
                out.status.success(),
                "{cmd:?} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if !python.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        }
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements));
        std::fs::write(&stamp, &wanted).expect("stamp");
    }
    python
}

/// Runs a script from `tests/interop/` with the interop venv; returns its stdout, or panics with
/// both streams.
pub fn run_interop_script(script: &str, args: &[&str]) -> String {
    let python = interop_python();
    let out = Command::new(python)
        .arg(repo().join("tests/interop").join(script))
        .args(args)
        .current_dir(repo().join("tests/interop"))
        .output()
        .expect("run interop script");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
