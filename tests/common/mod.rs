//! Test support: the real daemon on 127.0.0.1:0 over TLS, a client that trusts the dev CA, and
//! readers for the audit log and the SQLite file.
//!
//! Every test starts its own daemon with its own data directory, so tests run in parallel.

#![allow(dead_code)]

pub mod keystone;
pub mod small_disk;

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

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The dev config.
pub fn dev_config() -> PathBuf {
    repo().join("policy/dev.toml")
}

/// The dev proxy secret.
pub const PROXY_SECRET: &str = "dev-metadata-proxy-secret";
/// Dev tokens.
pub const ADMIN_TOKEN: &str = "dev-admin-token";
/// project-a reader+member.
pub const TOKEN_A: &str = "dev-token-project-a";
/// project-a reader only.
pub const READER_A: &str = "dev-token-reader-a";
/// project-b reader+member.
pub const TOKEN_B: &str = "dev-token-project-b";
/// project-a manager (Keystone's role, which implies member and reader).
pub const MANAGER_A: &str = "dev-token-manager-a";

/// A fresh random instance id.
pub fn new_instance() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The metadata proxy's three headers for `instance` of `tenant`, signed with `signature`.
pub fn proxy_headers<'a>(
    instance: &'a str,
    tenant: &'a str,
    signature: &'a str,
) -> [(&'static str, &'a str); 3] {
    [
        ("x-instance-id", instance),
        ("x-tenant-id", tenant),
        ("x-instance-id-signature", signature),
    ]
}

/// Reads a raw HTTP/1 answer to its end; returns its status and its text.
pub async fn read_answer(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> (Option<u16>, String) {
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read answer");
    (
        raw_status(&answer),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

/// GETs `path` over plain HTTP/1.1 (an ops listener) on a new connection.
pub async fn plain_http_get(addr: SocketAddr, path: &str) -> (Option<u16>, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    read_answer(&mut tcp).await
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

/// An HTTP/1.1 keep-alive connection over `client`'s TLS, for requests made with [`get_request`].
pub async fn keep_alive(client: &Client) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = client.connect().await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

/// A GET of `path` for [`keep_alive`] connections.
pub fn get_request(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Sends `signal` (`HUP`, `TERM`) to the process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// The proxy's signature for `instance`.
pub fn sign(instance: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, PROXY_SECRET.as_bytes());
    hex::encode(ring::hmac::sign(&key, instance.as_bytes()).as_ref())
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
fn spawn(
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
fn listener_count(config: &Path) -> usize {
    let text = std::fs::read_to_string(config).expect("config");
    let value: toml::Value = toml::from_str(&text).expect("config TOML");
    value
        .get("listener")
        .and_then(|l| l.as_array())
        .map_or(1, Vec::len)
}

fn wait_exit(child: &mut Child, within: Duration) -> bool {
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

/// How a signed checkpoint line (the writer's own, about once a second) is told apart.
pub const CHECKPOINT_MARK: &str = r#""operation":"audit:checkpoint""#;

/// The writer's signed checkpoint events in `dir`, in chain order.
pub fn audit_checkpoints(dir: &Path) -> Vec<Value> {
    all_audit_lines(dir)
        .into_iter()
        .filter(|l| l.contains(CHECKPOINT_MARK))
        .map(|l| serde_json::from_str(&l).expect("audit line is JSON"))
        .collect()
}

/// Reads every event of every audit file in `dir`, in chain order, except the writer's
/// checkpoints (they come with time, not with requests: see [`audit_checkpoints`]).
pub fn audit_events(dir: &Path) -> Vec<Value> {
    all_audit_lines(dir)
        .into_iter()
        .filter(|l| !l.contains(CHECKPOINT_MARK))
        .map(|l| serde_json::from_str(&l).expect("audit line is JSON"))
        .collect()
}

/// Every complete line of every audit file in `dir`, in chain order.
fn all_audit_lines(dir: &Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p: &PathBuf| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    let mut events = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("audit file");
        // Only complete lines: the writer may be in the middle of appending the next one.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.lines() {
            events.push(line.to_owned());
        }
    }
    events
}

/// Counts complete audit lines incrementally, reading only what was appended since the last call.
#[derive(Default)]
pub struct AuditCounter {
    offsets: std::collections::HashMap<PathBuf, u64>,
    lines: usize,
}

impl AuditCounter {
    /// Complete lines in every audit file of `dir` so far.
    pub fn count(&mut self, dir: &Path) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(entries) = std::fs::read_dir(dir) else {
            return self.lines;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let offset = self.offsets.entry(path.clone()).or_default();
            let mut file = std::fs::File::open(&path).expect("audit file");
            file.seek(SeekFrom::Start(*offset)).expect("seek");
            let mut new = Vec::new();
            file.read_to_end(&mut new).expect("read");
            // Count only up to the last newline; a partial line is read again next time.
            if let Some(end) = new.iter().rposition(|&b| b == b'\n') {
                self.lines += String::from_utf8_lossy(&new[..=end])
                    .lines()
                    .filter(|l| !l.contains(CHECKPOINT_MARK))
                    .count();
                *offset += end as u64 + 1;
            }
        }
        self.lines
    }
}

/// The event with request id `id`.
pub fn event_for<'a>(events: &'a [Value], id: &str) -> &'a Value {
    let matching: Vec<_> = events
        .iter()
        .filter(|e| e["metadata"]["uid"] == id)
        .collect();
    assert_eq!(matching.len(), 1, "exactly one event for {id}");
    matching[0]
}

/// A response.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The request id the daemon assigned.
    pub fn request_id(&self) -> String {
        self.header("x-request-id")
            .expect("x-request-id")
            .to_owned()
    }

    /// The error message of a JSON error body.
    pub fn error_message(&self) -> String {
        let v = self.json();
        assert_eq!(v["error"]["code"], self.status, "error body code");
        assert_eq!(
            v["error"]["request_id"],
            self.request_id(),
            "error body request id"
        );
        v["error"]["message"].as_str().expect("message").to_owned()
    }
}

/// A TLS client configuration presenting the dev certificate `name` (`certs-dev/<name>.pem`).
pub fn tls_client_config_with_cert(name: &str) -> Arc<rustls::ClientConfig> {
    tls_client_config_from(&repo().join("certs-dev"), name)
}

/// A TLS client configuration trusting `<dir>/ca.pem` and presenting `<dir>/<name>.pem`.
pub fn tls_client_config_from(dir: &Path, name: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::PrivateKeyDer;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    Arc::new(config)
}

/// The dev CA's TLS client configuration.
pub fn tls_client_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(repo().join("certs-dev/ca.pem")).expect("ca.pem");
    roots.add(ca).expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS client for one daemon; each request uses a fresh HTTP/1.1 connection unless noted.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    connector: TlsConnector,
}

impl Client {
    fn with_config(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            addr,
            connector: TlsConnector::from(tls.clone()),
            tls,
        }
    }

    /// A client for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_config(addr, tls_client_config())
    }

    /// A client for `addr` presenting the dev client certificate `name`.
    pub fn with_cert(addr: SocketAddr, name: &str) -> Self {
        Self::with_config(addr, tls_client_config_with_cert(name))
    }

    /// A client for `addr` trusting `<dir>/ca.pem` and presenting `<dir>/<name>.pem`.
    pub fn with_cert_from(addr: SocketAddr, dir: &Path, name: &str) -> Self {
        Self::with_config(addr, tls_client_config_from(dir, name))
    }

    /// The TLS connector (trusting the dev CA).
    pub fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }

    /// A TLS stream to the daemon.
    pub async fn connect(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
        self.connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }

    /// Sends one request on a new connection.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.try_send(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends one request on a new connection; connection failures are errors, not panics.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
        let stream = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1");
        for (k, v) in headers {
            builder = builder.header(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let request = builder.body(Full::new(body.into())).expect("request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("response: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// Sends one request over HTTP/2 (ALPN `h2`) on a new connection.
    pub async fn send_h2(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut config = (*self.tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        assert_eq!(
            stream.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN h2"
        );
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("https://127.0.0.1{path}"));
        for (k, v) in headers {
            builder = builder.header(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let response = sender
            .send_request(builder.body(Full::new(body.into())).unwrap())
            .await
            .expect("response");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    /// GET `path`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, path, headers, Bytes::new()).await
    }

    /// Writes raw bytes on a new TLS connection and reads until the daemon closes it (or `wait`
    /// passes); returns everything read.
    pub async fn raw(&self, bytes: &[u8], wait: Duration) -> Vec<u8> {
        let mut stream = self.connect().await;
        stream.write_all(bytes).await.expect("write");
        stream.flush().await.expect("flush");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
        out
    }

    /// GET `path` on a new connection from `local` (a loopback address) that starts with a PROXY v2
    /// header naming `source`, then TLS and HTTP/1.1.
    pub async fn get_via_proxy_protocol(
        &self,
        local: &str,
        source: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        use ppp::v2::{Builder, Command, Protocol, Version};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
        let mut tcp = socket.connect(self.addr).await.map_err(|e| e.to_string())?;
        let header = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (source, self.addr),
        )
        .build()
        .unwrap();
        tcp.write_all(&header).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut request = Request::get(path).header("host", "x");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::new())).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.map_err(|e| e.to_string())?.to_bytes(),
        })
    }

    /// The instance's password, through signed proxy headers.
    pub async fn get_password(&self, instance: &str, tenant: &str) -> Reply {
        let sig = sign(instance);
        self.get(
            "/openstack/latest/password",
            &[
                ("x-instance-id", instance),
                ("x-tenant-id", tenant),
                ("x-instance-id-signature", &sig),
            ],
        )
        .await
    }

    /// Posts a password, through signed proxy headers.
    pub async fn post_password(
        &self,
        instance: &str,
        tenant: &str,
        body: impl Into<Bytes>,
    ) -> Reply {
        let sig = sign(instance);
        self.send(
            Method::POST,
            "/openstack/2013-04-04/password",
            &[
                ("x-instance-id", instance),
                ("x-tenant-id", tenant),
                ("x-instance-id-signature", &sig),
            ],
            body,
        )
        .await
    }

    /// Posts a password; `None` if the connection failed (the daemon died).
    pub async fn post_password_nopanic(
        &self,
        instance: &str,
        tenant: &str,
        body: impl Into<Bytes>,
    ) -> Option<Reply> {
        let sig = sign(instance);
        let headers = [
            ("x-instance-id", instance),
            ("x-tenant-id", tenant),
            ("x-instance-id-signature", sig.as_str()),
        ];
        self.try_send(
            Method::POST,
            "/openstack/2013-04-04/password",
            &headers,
            body,
        )
        .await
        .ok()
    }

    /// Registers `instance` to `project` with the admin token; asserts 201.
    pub async fn register(&self, instance: &str, project: &str) {
        let reply = self
            .send(
                Method::PUT,
                &format!("/admin/v1/instances/{instance}"),
                &[
                    ("x-auth-token", ADMIN_TOKEN),
                    ("content-type", "application/json"),
                ],
                format!("{{\"project_id\": \"{project}\"}}"),
            )
            .await;
        assert_eq!(reply.status, 201, "register: {}", reply.text());
    }
}

/// Parses the status code of a raw HTTP/1 response.
pub fn raw_status(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    let line = text.lines().next()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

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

/// The pinned audit event schema, compiled (formats checked).
pub fn schema_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("schema/audit-event-v1.schema.json")).unwrap(),
    )
    .unwrap();
    jsonschema::meta::validate(&schema).expect("the pinned schema is a valid JSON Schema");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

/// Runs `metapass serve --listen 127.0.0.1:0` expecting it to refuse to start; returns its stderr.
pub fn serve_must_fail(config: &Path) -> String {
    refused_serve(config, &["--listen", "127.0.0.1:0"])
}

/// Like [`serve_must_fail`], but every listener keeps the address the config gives it.
pub fn serve_must_fail_as_configured(config: &Path) -> String {
    refused_serve(config, &[])
}

fn refused_serve(config: &Path, extra_args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    refused_serve_on(config, extra_args, dir.path())
}

/// Like [`refused_serve`], on the data directory `data_dir`.
fn refused_serve_on(config: &Path, extra_args: &[&str], data_dir: &Path) -> String {
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

/// The real OCSF schema files at the version events declare: `METAPASS_OCSF_SCHEMA`, or
/// `../shared/ocsf-schema/<version>` beside the repository (scripts/test-all says which).
pub fn ocsf_schema_dir() -> Option<PathBuf> {
    let version = metapass::audit::event::OCSF_VERSION;
    let dir = std::env::var_os("METAPASS_OCSF_SCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/ocsf-schema").join(version));
    dir.join("dictionary.json").is_file().then_some(dir)
}

/// Runs tests/ocsf/validate_ocsf.py on `files`; returns (success, its report).
pub fn validate_ocsf(schema: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(repo().join("tests/ocsf/validate_ocsf.py"))
        .arg(schema)
        .args(files)
        .output()
        .expect("run tests/ocsf/validate_ocsf.py");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every event in the daemon's log validates against the real OCSF schema, when its files are
/// available (tests/audit_log.rs reports SKIPPED when they are not).
pub fn assert_valid_ocsf(daemon: &Daemon) {
    let Some(schema) = ocsf_schema_dir() else {
        return;
    };
    let files = metapass::audit::review::files_of(&daemon.audit_dir()).expect("audit files");
    let (ok, report) = validate_ocsf(&schema, &files);
    assert!(ok, "events that are not valid OCSF:\n{report}");
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
