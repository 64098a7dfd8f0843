//! The real daemon: started on 127.0.0.1:0 with its own data directory, read, signalled and
//! stopped; `metapass` run as a command.

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

/// Sends `signal` (`HUP`, `TERM`) to the process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// A running daemon. Killed on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Where its first listener listens.
    pub addr: SocketAddr,
    /// Every listener, by name.
    pub listeners: std::collections::HashMap<String, SocketAddr>,
    /// Its data directory (deleted on drop).
    pub dir: tempfile::TempDir,
    /// The config it runs with.
    pub config: PathBuf,
}

impl Daemon {
    /// Starts the daemon with the dev config and a fresh data directory.
    pub fn start() -> Self {
        Self::start_with(&dev_config(), tempfile::tempdir().expect("tempdir"))
    }

    /// Starts the daemon with `config` and `dir` as its data directory.
    pub fn start_with(config: &Path, dir: tempfile::TempDir) -> Self {
        Self::start_wrapped(config, dir, &[])
    }

    /// Starts the daemon through `wrapper` (a command that ends by exec-ing its arguments, such as
    /// `unshare -rm sh -c '...; exec "$@"' sh`), with `config` and `dir` as its data directory.
    pub fn start_wrapped(config: &Path, dir: tempfile::TempDir, wrapper: &[&str]) -> Self {
        let (child, listeners) = spawn(config, dir.path(), wrapper, &[]);
        Self {
            child: Some(child),
            addr: listeners[0].1,
            listeners: listeners.into_iter().collect(),
            dir,
            config: config.to_owned(),
        }
    }

    /// Kills the daemon if it runs and starts a new one on the same data directory (a new port).
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Like [`Self::restart`], with more arguments for `serve`.
    pub fn restart_with(&mut self, args: &[&str]) {
        self.kill();
        let (child, listeners) = spawn(&self.config, self.dir.path(), &[], args);
        self.child = Some(child);
        self.addr = listeners[0].1;
        self.listeners = listeners.into_iter().collect();
    }

    /// Stops the daemon if it runs, then runs `serve` on the same data directory expecting it to
    /// refuse to start; returns what it printed on stderr.
    pub fn start_refused(&mut self) -> String {
        self.kill();
        refused_serve_on(&self.config, &["--listen", "127.0.0.1:0"], &self.data_dir())
    }

    /// The data directory the daemon uses.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Waits until a record the daemon read before an edit made behind its back (a test editing
    /// the database file) has left its read cache: past the cache's TTL (one second, see
    /// `src/store/read_cache.rs`), the next read goes to the database.
    pub async fn outlast_read_cache(&self) {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir().join("metapass.sqlite3")
    }

    /// The audit log directory.
    pub fn audit_dir(&self) -> PathBuf {
        self.data_dir().join("audit")
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Whether every one of `needles` appears in the log within 5 s. The daemon logs through a
    /// non-blocking writer, so a line can land just after the event that caused it.
    pub fn log_shows(&self, needles: &[&str]) -> bool {
        for _ in 0..100 {
            let log = self.log();
            if needles.iter().all(|n| log.contains(n)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// A client for this daemon.
    pub fn client(&self) -> Client {
        Client::new(self.addr)
    }

    /// Every audit event written so far, in order.
    pub fn audit_events(&self) -> Vec<Value> {
        audit_events(&self.audit_dir())
    }

    /// The audit events of requests so far: every event but the daemon's own (`caller_kind`
    /// "system": the startup `keys:load`, reloads, re-encryption).
    pub fn request_events(&self) -> Vec<Value> {
        let mut events = self.audit_events();
        events.retain(|e| e["unmapped"]["caller_kind"] != "system");
        events
    }

    /// Every complete audit event written so far (a torn last line, left by a crash, is skipped).
    pub fn audit_events_lenient(&self) -> Vec<Value> {
        let files = metapass::audit::review::files_of(&self.audit_dir()).expect("audit dir");
        let mut events = metapass::audit::review::read_events(&files)
            .expect("read")
            .0;
        events.retain(|e| e["api"]["operation"] != "audit:checkpoint");
        events
    }

    /// Runs `metapass audit verify` on this daemon's log; returns (success, stdout).
    pub fn verify_audit(&self) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
            .args(["audit", "verify", "--config"])
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.data_dir())
            .output()
            .expect("run audit verify");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_exit(&mut child, Duration::from_secs(20))
    }

    /// Kills the process with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

/// Spawns `metapass serve` (through `wrapper`, if any) and waits for its listening lines; returns
/// the listeners (name, address) in configuration order.
pub(crate) fn spawn(
    config: &Path,
    dir: &Path,
    wrapper: &[&str],
    args: &[&str],
) -> (Child, Vec<(String, SocketAddr)>) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .expect("log file");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_metapass"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_metapass")),
    };
    let mut child = command
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(args)
        .env("METAPASS_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn metapass");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let listeners = listener_count(config);
    std::thread::spawn(move || {
        // "metapass listening on https://127.0.0.1:1234 (name)"
        let pattern =
            regex::Regex::new(r"^metapass listening on https?://(\S+) \((\S+)\)$").unwrap();
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(c) = pattern.captures(&line) {
                seen.push((
                    c[2].to_owned(),
                    c[1].parse::<SocketAddr>().expect("address"),
                ));
                if seen.len() == listeners {
                    let _ = tx.send(std::mem::take(&mut seen));
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(listeners) => (child, listeners),
        Err(_) => {
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
            panic!("metapass did not start:\n{log}");
        }
    }
}

/// How many `[[listener]]` tables a config has.
pub(crate) fn listener_count(config: &Path) -> usize {
    let text = std::fs::read_to_string(config).expect("config");
    let value: toml::Value = toml::from_str(&text).expect("config TOML");
    value
        .get("listener")
        .and_then(|l| l.as_array())
        .map_or(1, Vec::len)
}

pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    false
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `metapass serve --listen 127.0.0.1:0` expecting it to refuse to start; returns its stderr.
pub fn serve_must_fail(config: &Path) -> String {
    refused_serve(config, &["--listen", "127.0.0.1:0"])
}

/// Like [`serve_must_fail`], but every listener keeps the address the config gives it.
pub fn serve_must_fail_as_configured(config: &Path) -> String {
    refused_serve(config, &[])
}

pub(crate) fn refused_serve(config: &Path, extra_args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    refused_serve_on(config, extra_args, dir.path())
}

/// Like [`refused_serve`], on the data directory `data_dir`.
pub(crate) fn refused_serve_on(config: &Path, extra_args: &[&str], data_dir: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["serve", "--config"])
        .arg(config)
        .args(extra_args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run metapass");
    // A config that wrongly starts must fail the test, not hang it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "serve started with a config it should refuse:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("collect output");
    assert!(!out.status.success(), "serve should have refused to start");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `metapass ARGS`; returns (exit code, stdout).
pub fn run_metapass<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(args)
        .output()
        .expect("run metapass");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
