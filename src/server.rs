//! The listeners: a shared connection cap, an optional PROXY v2 preamble from trusted proxies, TLS
//! under a deadline (with client certificates where configured), hyper with bounds, and graceful
//! shutdown.
//!
//! `run(app, endpoints, shutdown)` serves every endpoint until `shutdown` resolves, then stops
//! accepting, lets in-flight requests finish (each is audited), and returns once every connection
//! is done or the drain deadline passes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::api::{self, App, ConnInfo};
use crate::audit::Reason;
use crate::config::{Limits, ListenerConfig};
use crate::identity::ClientCert;
use crate::limits::ConnectionCaps;
use crate::tls::{ListenerTls, version_name};

/// How long in-flight connections may take to finish after shutdown begins.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The backlog of each listening socket: a burst of connections waits here instead of being
/// dropped (the kernel caps it at `net.core.somaxconn`).
pub const ACCEPT_BACKLOG: u32 = 4096;

/// The largest PROXY v2 header accepted (the fixed part, addresses, and TLVs).
const MAX_PROXY_HEADER: usize = 1024;

/// The fixed part of a PROXY v2 header: the 12-byte signature, version and command, family and
/// protocol, and the 2-byte length of what follows.
const PROXY_FIXED_LEN: usize = 16;

/// A bound listening socket with what it serves.
pub struct Endpoint {
    /// The listener's configuration.
    pub config: Arc<ListenerConfig>,
    /// The socket.
    pub tcp: TcpListener,
    /// The TLS configuration, or `None` for a plain-HTTP (ops, loopback) listener.
    pub tls: Option<Arc<ListenerTls>>,
}

impl Endpoint {
    /// Binds `config.address` with [`ACCEPT_BACKLOG`].
    pub fn bind(config: ListenerConfig, tls: Option<Arc<ListenerTls>>) -> std::io::Result<Self> {
        let addr = config.address;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(Self {
            config: Arc::new(config),
            tcp: socket.listen(ACCEPT_BACKLOG)?,
            tls,
        })
    }

    /// The URL clients reach this endpoint at.
    pub fn url(&self) -> std::io::Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}", self.tcp.local_addr()?))
    }
}

/// Counts a connection in the open-connections gauge for as long as it lives.
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl OpenConnection {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What every accept loop shares.
struct Shared {
    app: Arc<App>,
    connections: Arc<Semaphore>,
    caps: Arc<ConnectionCaps>,
    builder: auto::Builder<TokioExecutor>,
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_header_list_size(limits.h2_max_header_list_bytes)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// The answer hyper itself sent for a request it could not parse, if it sent one (see hyper's
/// `Server::on_error`): 431 for an oversize head, 400 for other parse errors. Other connection
/// errors (resets, header-read timeouts on idle keep-alive connections) answered nothing and are
/// not requests.
fn unparsed_refusal(
    error: &(dyn std::error::Error + 'static),
) -> Option<(http::StatusCode, Reason)> {
    let hyper_error = error.downcast_ref::<hyper::Error>()?;
    if hyper_error.is_parse_too_large() {
        Some((
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::HeadTooLarge,
        ))
    } else if hyper_error.is_parse()
        && !hyper_error.is_parse_status()
        && !hyper_error.is_parse_version_h2()
    {
        Some((http::StatusCode::BAD_REQUEST, Reason::MalformedRequest))
    } else {
        None
    }
}

/// Reads a PROXY protocol v2 header; returns the source it names, or `None` for a LOCAL command
/// (the proxy's own health check) or an unspecified address family.
async fn read_proxy_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, String> {
    use ppp::v2::{Addresses, Header, ParseError};
    let mut buf = vec![0u8; PROXY_FIXED_LEN];
    tcp.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    loop {
        match Header::try_from(buf.as_slice()) {
            Ok(header) => {
                return Ok(match header.addresses {
                    Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    _ => None,
                });
            }
            Err(ParseError::Partial(have, need))
                if buf.len() + (need - have) <= MAX_PROXY_HEADER =>
            {
                let start = buf.len();
                buf.resize(start + (need - have), 0);
                tcp.read_exact(&mut buf[start..])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Serves every endpoint until `shutdown` resolves, then drains.
pub async fn run(app: Arc<App>, endpoints: Vec<Endpoint>, shutdown: impl Future<Output = ()>) {
    let shared = Arc::new(Shared {
        connections: Arc::new(Semaphore::new(app.limits.max_connections.max(1))),
        caps: Arc::new(ConnectionCaps::new(
            app.limits.max_connections_per_source,
            app.limiters.ipv6_prefix(),
        )),
        builder: http_builder(&app.limits),
        app,
    });
    let (stop, stopped) = watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        loops.spawn(accept_loop(shared.clone(), endpoint, stopped.clone()));
    }
    shutdown.await;
    let _ = stop.send(true);
    // Each accept loop hands back the shutdown handle of its connections; all drain together.
    let mut draining = Vec::new();
    while let Some(finished) = loops.join_next().await {
        if let Ok(graceful) = finished {
            draining.push(graceful.shutdown());
        }
    }
    tokio::select! {
        _ = futures_util::future::join_all(draining) => tracing::info!("all connections drained"),
        () = tokio::time::sleep(DRAIN_DEADLINE) => tracing::warn!("connections still open after the drain deadline"),
    }
}

/// Accepts on one endpoint until `stopped`; returns the handle that drains its connections.
async fn accept_loop(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    mut stopped: watch::Receiver<bool>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            permit = shared.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return graceful,
            },
            _ = stopped.changed() => return graceful,
        };
        let (tcp, peer) = tokio::select! {
            accepted = endpoint.tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(listener = %endpoint.config.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return graceful,
        };
        shared.app.metrics.connections.inc();
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let (shared, config, tls) = (
            shared.clone(),
            endpoint.config.clone(),
            endpoint.tls.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            connection(shared, config, tls, tcp, peer, watcher).await;
        });
    }
}

async fn connection(
    shared: Arc<Shared>,
    config: Arc<ListenerConfig>,
    tls: Option<Arc<ListenerTls>>,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    watcher: Watcher,
) {
    let app = &shared.app;
    let deadline = app.limits.tls_handshake_timeout();
    let mut proxied_by = None;
    if config.proxy_protocol {
        // Only a trusted proxy may say who the client is.
        if !config.trusts(peer.ip()) {
            app.metrics.connections_refused.inc();
            tracing::info!(%peer, listener = %config.name, "PROXY header expected from an untrusted peer; closed");
            return;
        }
        match tokio::time::timeout(deadline, read_proxy_header(&mut tcp)).await {
            Ok(Ok(Some(source))) => {
                proxied_by = Some(peer);
                peer = source;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                app.metrics.connections_refused.inc();
                tracing::info!(%peer, listener = %config.name, error = %e, "bad PROXY header; closed");
                return;
            }
            Err(_) => {
                app.metrics.connections_refused.inc();
                return;
            }
        }
    }
    // A source holding its share of connections gets no more: closing at once is cheaper than any
    // answer, and the slot it would take stays free for others.
    let Some(_slot) = shared.caps.admit(peer.ip()) else {
        app.metrics.connections_refused.inc();
        return;
    };
    let _open = OpenConnection::new(&app.metrics.connections_open);
    let Some(tls) = tls else {
        let conn = ConnInfo {
            peer,
            proxied_by,
            tls_version: None,
            client_cert: None,
            listener: config,
        };
        serve(&shared, TokioIo::new(tcp), conn, watcher).await;
        return;
    };
    let stream = match tokio::time::timeout(deadline, tls.acceptor().accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            app.metrics.tls_handshake_failures.inc();
            tracing::info!(%peer, listener = %config.name, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            app.metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, listener = %config.name, "TLS handshake timed out");
            return;
        }
    };
    let session = stream.get_ref().1;
    let conn = ConnInfo {
        peer,
        proxied_by,
        tls_version: version_name(session.protocol_version()),
        client_cert: session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| ClientCert::from_der(leaf)),
        listener: config,
    };
    serve(&shared, TokioIo::new(stream), conn, watcher).await;
}

/// Serves HTTP/1 or HTTP/2 on one connection; requests hyper refuses before routing are audited
/// when the connection ends.
async fn serve<I>(shared: &Shared, io: TokioIo<I>, conn: ConnInfo, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let app = shared.app.clone();
    let service_conn = conn.clone();
    let service = service_fn(move |req| {
        let (app, conn) = (app.clone(), service_conn.clone());
        async move { Ok::<_, Infallible>(api::serve(app, conn, req).await) }
    });
    let connection = shared.builder.serve_connection(io, service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
        if let Some((status, reason)) = unparsed_refusal(e.as_ref()) {
            api::audit_unparsed_request(&shared.app, &conn, status, reason).await;
        }
    }
}
