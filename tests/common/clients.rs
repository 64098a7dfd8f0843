//! Clients of the daemon: TLS that trusts the dev CA, requests and their replies, raw HTTP, and
//! the metadata proxy's signed headers.

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

/// What the metadata proxy sends for a guest: `instance` of `tenant`, signed with the dev secret
/// (or, with [`AsInstance::signed_with`], any signature). `headers()` gives the three headers;
/// `with(..)` adds more.
pub struct AsInstance {
    instance: String,
    tenant: String,
    signature: String,
}

/// The proxy's signed headers for `instance` of `tenant` (see [`AsInstance`]).
pub fn as_instance(instance: &str, tenant: &str) -> AsInstance {
    AsInstance {
        instance: instance.to_owned(),
        tenant: tenant.to_owned(),
        signature: sign(instance),
    }
}

impl AsInstance {
    /// The same claim with another signature (forged, malformed).
    pub fn signed_with(mut self, signature: &str) -> Self {
        self.signature = signature.to_owned();
        self
    }

    /// `X-Instance-ID`, `X-Tenant-ID`, `X-Instance-ID-Signature`.
    pub fn headers(&self) -> [(&'static str, &str); 3] {
        [
            ("x-instance-id", &self.instance),
            ("x-tenant-id", &self.tenant),
            ("x-instance-id-signature", &self.signature),
        ]
    }

    /// The three headers and `extra`.
    pub fn with<'a>(&'a self, extra: &[(&'static str, &'a str)]) -> Vec<(&'static str, &'a str)> {
        let mut all = self.headers().to_vec();
        all.extend_from_slice(extra);
        all
    }
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

/// The proxy's signature for `instance`.
pub fn sign(instance: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, PROXY_SECRET.as_bytes());
    hex::encode(ring::hmac::sign(&key, instance.as_bytes()).as_ref())
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
        self.get(
            "/openstack/latest/password",
            &as_instance(instance, tenant).headers(),
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
        self.send(
            Method::POST,
            "/openstack/2013-04-04/password",
            &as_instance(instance, tenant).headers(),
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
        let guest = as_instance(instance, tenant);
        let headers = guest.headers();
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
