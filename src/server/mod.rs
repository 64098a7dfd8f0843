//! The listeners: a connection cap per listener and per source (shedding idle connections under
//! pressure, [`pressure`]), an optional PROXY v2 preamble from trusted proxies, TLS (with client
//! certificates where configured), hyper with bounds, a timer from accept to the first request
//! and an idle timer between requests, and graceful shutdown.
//!
//! Every stall has a bound: from accept, a connection has `first_request_timeout_secs` to deliver
//! its first request head (PROXY header, TLS handshake and protocol detection included; the TLS
//! handshake alone also has `tls_handshake_timeout_secs`); between requests it may idle
//! `idle_timeout_secs`, HTTP/1 keep-alive and HTTP/2 alike (a client answering pings gains
//! nothing: the timer counts requests, not bytes), then it is closed (HTTP/2: GOAWAY, then
//! close). Both timers shorten as the listener fills.
//!
//! `run(app, endpoints, shutdown)` serves every endpoint until `shutdown` resolves, then stops
//! accepting, lets in-flight requests finish (each is audited), and returns once every connection
//! is done or the drain deadline passes.

pub(crate) mod pressure;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use pressure::{Admission, ConnState, Registry};

use crate::api::{self, ConnInfo};
use crate::app::App;
use crate::audit::Reason;
use crate::config::{Limits, ListenerConfig};
use crate::identity::ClientCert;
use crate::limits::ConnectionCaps;
use crate::tls::{ListenerTls, version_name};

/// How long in-flight connections may take to finish after shutdown begins.
pub(crate) const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The backlog of each listening socket: a burst of connections waits here instead of being
/// dropped (the kernel caps it at `net.core.somaxconn`).
pub(crate) const ACCEPT_BACKLOG: u32 = 4096;

/// The largest PROXY v2 header accepted (the fixed part, addresses, and TLVs).
const MAX_PROXY_HEADER: usize = 1024;

/// The fixed part of a PROXY v2 header: the 12-byte signature, version and command, family and
/// protocol, and the 2-byte length of what follows.
const PROXY_FIXED_LEN: usize = 16;

/// A bound listening socket with what it serves.
pub(crate) struct Endpoint {
    /// The listener's configuration.
    pub config: Arc<ListenerConfig>,
    /// The socket.
    pub tcp: TcpListener,
    /// The TLS configuration, or `None` for a plain-HTTP (ops, loopback) listener.
    pub tls: Option<Arc<ListenerTls>>,
}

impl Endpoint {
    /// Binds `config.address` with [`ACCEPT_BACKLOG`].
    pub(crate) fn bind(
        config: ListenerConfig,
        tls: Option<Arc<ListenerTls>>,
    ) -> std::io::Result<Self> {
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
    pub(crate) fn url(&self) -> std::io::Result<String> {
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

/// How long a connection asked to close (idle, shed, shutdown) may take to finish the requests it
/// has in flight before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How often a connection's timers are looked at.
const TIMER_TICK: Duration = Duration::from_millis(250);

/// What every accept loop shares.
struct Shared {
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    /// Set when shutdown begins.
    stopping: watch::Receiver<bool>,
}

/// What one listener's connections share.
struct Listener {
    config: Arc<ListenerConfig>,
    tls: Option<Arc<ListenerTls>>,
    registry: Arc<Registry>,
    caps: Arc<ConnectionCaps>,
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
        // Advertised (and enforced by h2) at twice the limit: streams between the limit and twice
        // it reach metapass and are refused there, with an audit event (api::StreamsExceeded);
        // only a client ignoring SETTINGS meets h2's own, unaudited refusal.
        .max_concurrent_streams(limits.h2_max_concurrent_streams.saturating_mul(2))
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
pub(crate) async fn run(
    app: Arc<App>,
    endpoints: Vec<Endpoint>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop, stopping) = watch::channel(false);
    let shared = Arc::new(Shared {
        builder: http_builder(&app.limits),
        stopping: stopping.clone(),
        app,
    });
    let limits = &shared.app.limits;
    let mut registries = Vec::new();
    let mut loops = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        let listener = Listener {
            registry: Registry::new(
                endpoint
                    .config
                    .max_connections
                    .unwrap_or(limits.max_connections),
            ),
            caps: Arc::new(ConnectionCaps::new(
                endpoint
                    .config
                    .max_connections_per_source
                    .unwrap_or(limits.max_connections_per_source),
                shared.app.limiters.ipv6_prefix(),
            )),
            config: endpoint.config,
            tls: endpoint.tls,
        };
        registries.push(listener.registry.clone());
        loops.spawn(accept_loop(
            shared.clone(),
            Arc::new(listener),
            endpoint.tcp,
            stopping.clone(),
        ));
    }
    shutdown.await;
    let _ = stop.send(true);
    while loops.join_next().await.is_some() {}
    let deadline = crate::clock::io_now_tokio() + DRAIN_DEADLINE;
    futures_util::future::join_all(registries.iter().map(|r| r.drain(deadline))).await;
    if registries.iter().all(|r| r.is_empty()) {
        tracing::info!("all connections drained");
    } else {
        tracing::warn!("connections still open after the drain deadline");
    }
}

/// Accepts on one endpoint until `stopped`.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    tcp_listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = tcp_listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(listener = %listener.config.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        shared.app.metrics.connections.inc();
        let admitted = match listener.registry.admit(peer.ip()) {
            Admission::Admitted(a) => a,
            Admission::Shed(a) => {
                shared.app.metrics.connections_shed.inc();
                a
            }
            Admission::Full => {
                // Every connection has a request in flight: nothing to shed, and waiting would
                // only hold this socket too.
                shared.app.metrics.connections_refused.inc();
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (shared, listener) = (shared.clone(), listener.clone());
        tokio::spawn(async move {
            let state = admitted.state.clone();
            tokio::select! {
                () = connection(&shared, &listener, state.clone(), tcp, peer) => {}
                // Shed before it was serving (PROXY header, TLS): dropped at once. Once
                // serving, `serve` closes it itself.
                () = async {
                    state.shed_requested().await;
                    if state.is_serving() {
                        std::future::pending::<()>().await;
                    }
                } => {}
            }
            drop(admitted);
        });
    }
}

/// One connection from accept to close: PROXY header, the per-source cap, TLS, protocol detection,
/// then HTTP/1 or HTTP/2 with their timers. Long on purpose: each stage has its own deadline and
/// refusal, and their order is the defence (nothing is parsed before its stage is reached).
async fn connection(
    shared: &Shared,
    listener: &Listener,
    state: Arc<ConnState>,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
) {
    let app = &shared.app;
    let config = listener.config.clone();
    let limits = &app.limits;
    // From accept to the first request head: this deadline bounds the PROXY header and the TLS
    // handshake too; the handshake alone also has its own (shorter by default) bound.
    let first_request_by =
        state.accepted() + listener.registry.scaled(limits.first_request_timeout());
    let handshake_by =
        first_request_by.min(crate::clock::io_now_tokio() + limits.tls_handshake_timeout());
    let mut proxied_by = None;
    if config.proxy_protocol {
        // Only a trusted proxy may say who the client is.
        if !config.trusts(peer.ip()) {
            app.metrics.connections_refused.inc();
            tracing::info!(%peer, listener = %config.name, "PROXY header expected from an untrusted peer; closed");
            return;
        }
        match tokio::time::timeout_at(handshake_by, read_proxy_header(&mut tcp)).await {
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
    let Some(_slot) = listener.caps.admit(peer.ip()) else {
        app.metrics.connections_refused.inc();
        return;
    };
    let _open = OpenConnection::new(&app.metrics.connections_open);
    let Some(tls) = listener.tls.clone() else {
        let conn = ConnInfo {
            peer,
            proxied_by,
            tls_version: None,
            client_cert: None,
            listener: config,
        };
        serve(shared, listener, state, TokioIo::new(tcp), conn).await;
        return;
    };
    let stream = match tokio::time::timeout_at(handshake_by, tls.acceptor().accept(tcp)).await {
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
    serve(shared, listener, state, TokioIo::new(stream), conn).await;
}

/// Counts a request on its connection for as long as it runs (also when its client goes away
/// and hyper drops it).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: &Arc<ConnState>) -> Self {
        state.request_started();
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// No first request before the deadline.
    FirstRequestTimeout,
    /// Idle between requests past the idle timeout.
    IdleTimeout,
    /// Shed to make room, or shutdown.
    Asked,
}

/// Serves HTTP/1 or HTTP/2 on one connection, under its timers; requests hyper refuses before
/// routing are audited when the connection ends.
async fn serve<I>(
    shared: &Shared,
    listener: &Listener,
    state: Arc<ConnState>,
    io: TokioIo<I>,
    conn: ConnInfo,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    state.set_serving();
    let conn = Arc::new(conn);
    let app = shared.app.clone();
    let service_conn = conn.clone();
    let service_state = state.clone();
    let stream_limit =
        usize::try_from(shared.app.limits.h2_max_concurrent_streams).unwrap_or(usize::MAX);
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let (app, conn) = (app.clone(), service_conn.clone());
        let in_flight = InFlight::new(&service_state);
        if req.version() == http::Version::HTTP_2 && service_state.active() > stream_limit {
            req.extensions_mut().insert(api::StreamsExceeded);
        }
        async move {
            let response = api::serve(app, conn, req).await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = shared.builder.serve_connection(io, service);
    tokio::pin!(connection);
    let limits = &shared.app.limits;
    let mut stopping = shared.stopping.clone();
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing: Option<(Closing, Instant)> = None;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = state.shed_requested(), if closing.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing = Some((Closing::Asked, crate::clock::io_now_tokio() + CLOSE_GRACE));
            }
            _ = stopping.changed(), if closing.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing = Some((Closing::Asked, crate::clock::io_now_tokio() + DRAIN_DEADLINE));
            }
            _ = tick.tick() => {
                if let Some((why, by)) = closing {
                    if crate::clock::io_now_tokio() >= by {
                        tracing::debug!(peer = %conn.peer, ?why, "connection dropped after its grace period");
                        break Ok(());
                    }
                    continue;
                }
                if state.active() > 0 {
                    continue;
                }
                let (why, limit) = if state.served() == 0 {
                    (Closing::FirstRequestTimeout, limits.first_request_timeout())
                } else {
                    (Closing::IdleTimeout, limits.idle_timeout())
                };
                if state.waiting_since().elapsed() >= listener.registry.scaled(limit) {
                    shared.app.metrics.connections_timed_out.inc();
                    connection.as_mut().graceful_shutdown();
                    closing = Some((why, crate::clock::io_now_tokio() + CLOSE_GRACE));
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
        if let Some((status, reason)) = unparsed_refusal(e.as_ref()) {
            api::audit_unparsed_request(&shared.app, &conn, status, reason).await;
        }
    }
}
