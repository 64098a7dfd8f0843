//! Hostile clients, on loopback only, bounded in count and time: silent TLS connections and idle
//! HTTP/2 connections that answer pings, from several source addresses, against a daemon with
//! small caps. A legitimate client must still be answered, every silent connection must be closed
//! soon after the timers, and a flood on one listener must leave the others reachable.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// Small caps and short timers (seconds) for these tests.
fn tight_limits(text: String) -> String {
    text.replace("max_connections = 4096", "max_connections = 24")
        .replace(
            "max_connections_per_source = 1024",
            "max_connections_per_source = 8",
        )
        .replace(
            "tls_handshake_timeout_secs = 10",
            "tls_handshake_timeout_secs = 2",
        )
        .replace(
            "first_request_timeout_secs = 15",
            "first_request_timeout_secs = 3",
        )
        .replace("idle_timeout_secs = 30", "idle_timeout_secs = 3")
}

/// A TCP connection to `server` from the loopback address `local`.
async fn connect_from(local: Ipv4Addr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(local), 0))?;
    socket.connect(server).await
}

/// Completes TLS from `local` and then says nothing; returns how long the server kept it open
/// (up to `patience`), or `None` if it never got a session.
async fn silent_tls(
    client: &Client,
    local: Ipv4Addr,
    server: SocketAddr,
    patience: Duration,
) -> Option<Duration> {
    let tcp = connect_from(local, server).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .unwrap()
        .to_owned();
    let opened = Instant::now();
    let mut stream = tokio::time::timeout(patience, client.connector().connect(name, tcp))
        .await
        .ok()?
        .ok()?;
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(patience, stream.read(&mut buf)).await;
    Some(opened.elapsed())
}

/// An HTTP/2 connection from `local` that never opens a stream but keeps answering pings (the h2
/// client does); returns how long the server kept it.
async fn idle_h2(
    client: &Client,
    local: Ipv4Addr,
    server: SocketAddr,
    patience: Duration,
) -> Option<Duration> {
    let tcp = connect_from(local, server).await.ok()?;
    let mut config = (*tls_client_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .unwrap()
        .to_owned();
    let _ = client;
    let opened = Instant::now();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let (_sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(500))
        .keep_alive_while_idle(true)
        .handshake::<_, http_body_util::Full<bytes::Bytes>>(TokioIo::new(stream))
        .await
        .ok()?;
    // The connection task answers the server's pings and sends its own until the server closes.
    let _ = tokio::time::timeout(patience, conn).await;
    Some(opened.elapsed())
}

/// Runs attackers from `sources` against `server` until `stop`: each keeps `per_source` silent
/// TLS connections (every third one an idle HTTP/2 connection) open, reopening whatever the
/// server closes. Returns how long the server kept each connection it closed.
fn attack(
    client: &Client,
    server: SocketAddr,
    sources: &[Ipv4Addr],
    per_source: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<Vec<Duration>> {
    let mut set = tokio::task::JoinSet::new();
    for &source in sources {
        for n in 0..per_source {
            let (client, stop) = (client.clone(), stop.clone());
            set.spawn(async move {
                let mut held = Vec::new();
                let mut attempts = 0;
                while !stop.load(Ordering::SeqCst) && attempts < 40 {
                    attempts += 1;
                    let patience = Duration::from_secs(20);
                    let kept = if n % 3 == 2 {
                        idle_h2(&client, source, server, patience).await
                    } else {
                        silent_tls(&client, source, server, patience).await
                    };
                    match kept {
                        Some(d) => held.push(d),
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                held
            });
        }
    }
    set
}

/// Asks `path` from `local` every 200 ms for `rounds` rounds, each on a fresh connection with
/// `patience`; returns how many were answered 200.
async fn legitimate(
    client: &Client,
    local: Ipv4Addr,
    server: SocketAddr,
    path: &str,
    rounds: usize,
    patience: Duration,
) -> usize {
    let mut answered = 0;
    for _ in 0..rounds {
        let attempt = async {
            let tcp = connect_from(local, server).await.ok()?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
                .unwrap()
                .to_owned();
            let stream = client.connector().connect(name, tcp).await.ok()?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(conn);
            let response = sender.send_request(get_request(path)).await.ok()?;
            Some(response.status().as_u16())
        };
        if let Ok(Some(200)) = tokio::time::timeout(patience, attempt).await {
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    answered
}

fn open_connections(metrics: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("metapass_connections_open "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(i64::MAX)
}

fn daemon_with(edit: impl FnOnce(String) -> String) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), edit);
    Daemon::start_with(&config, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_cannot_lock_out_a_legitimate_client() {
    let daemon = daemon_with(tight_limits);
    let server = daemon.addr;
    let client = daemon.client();
    // Five attacking addresses, eight connections each: 40 against a listener cap of 24, each
    // source at its per-source cap of 8.
    let sources: Vec<Ipv4Addr> = (2..7).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = attack(&client, server, &sources, 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let answered = legitimate(
        &client,
        Ipv4Addr::new(127, 0, 0, 9),
        server,
        "/healthz",
        30,
        Duration::from_secs(3),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    assert!(
        answered >= 28,
        "the legitimate client was answered {answered} of 30 times"
    );

    // Every connection the server closed, it closed soon after its timer (3 s, shorter under
    // pressure) or to make room; none was held for the attackers' patience (20 s).
    let mut held = Vec::new();
    while let Some(done) = attackers.join_next().await {
        held.extend(done.unwrap());
    }
    assert!(held.len() >= 40, "{} connections observed", held.len());
    let longest = held.iter().max().unwrap();
    assert!(
        *longest < Duration::from_secs(8),
        "a silent connection was held {longest:?}"
    );
    // And once the attack stops, nothing is left open but the scrape itself.
    let mut open = i64::MAX;
    for _ in 0..40 {
        open = open_connections(&client.get("/metrics", &[]).await.text());
        if open <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(open <= 1, "{open} connections still open");
    let metrics = client.get("/metrics", &[]).await.text();
    assert!(
        metrics.contains("metapass_connections_timed_out_total")
            && metrics.contains("metapass_connections_shed_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_the_instance_listener_leaves_the_admin_and_ops_listeners_reachable() {
    let listeners = r#"
[[listener]]
name = "metadata"
address = "127.0.0.1:0"
serves = ["instance"]
client_auth = "optional"
max_connections = 8

[[listener]]
name = "admin"
address = "127.0.0.1:0"
serves = ["admin", "compute"]
client_auth = "optional"

[[listener]]
name = "ops"
address = "127.0.0.1:0"
tls = false
serves = ["ops"]
"#;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_listeners(dir.path(), listeners, |t| {
        tight_limits(t).replace("max_connections = 24", "max_connections = 256")
    });
    let daemon = Daemon::start_with(&config, dir);
    let metadata = daemon.listeners["metadata"];
    let client = Client::new(metadata);
    let sources: Vec<Ipv4Addr> = (2..6).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = attack(&client, metadata, &sources, 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let admin = Client::new(daemon.listeners["admin"]);
    let ops = daemon.listeners["ops"];
    let reached = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let id = new_instance();
        let registered = tokio::time::timeout(Duration::from_secs(3), async {
            admin
                .send(
                    http::Method::PUT,
                    &format!("/admin/v1/instances/{id}"),
                    &[("x-auth-token", ADMIN_TOKEN)],
                    r#"{"project_id": "project-a"}"#,
                )
                .await
                .status
        })
        .await;
        let healthz =
            tokio::time::timeout(Duration::from_secs(3), plain_http_get(ops, "/healthz")).await;
        if registered == Ok(201) && matches!(healthz, Ok((Some(200), _))) {
            reached.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The metadata listener itself still serves a guest: its silent connections give way.
    let guest = legitimate(
        &client,
        Ipv4Addr::new(127, 0, 0, 9),
        metadata,
        "/openstack",
        10,
        Duration::from_secs(3),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    while attackers.join_next().await.is_some() {}
    assert_eq!(
        reached.load(Ordering::SeqCst),
        10,
        "admin and ops stayed reachable"
    );
    assert!(guest >= 9, "the metadata listener answered {guest} of 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_limit_are_refused_and_audited() {
    let daemon = daemon_with(|t| {
        t.replace(
            "h2_max_concurrent_streams = 64",
            "h2_max_concurrent_streams = 4",
        )
    });
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    let sig = sign(&id);
    let mut config = (*tls_client_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(daemon.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .unwrap()
        .to_owned();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<
        _,
        _,
        http_body_util::StreamBody<
            futures_util::stream::Pending<
                Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
            >,
        >,
    >(TokioExecutor::new(), TokioIo::new(stream))
    .await
    .unwrap();
    tokio::spawn(conn);
    // Eight posts whose bodies never come: four occupy the connection's streams (each waits for
    // its body), the other four are past the limit.
    let mut posts = Vec::new();
    for _ in 0..8 {
        let mut sender = sender.clone();
        let request = http::Request::post("https://127.0.0.1/openstack/latest/password")
            .header("x-instance-id", id.as_str())
            .header("x-tenant-id", "project-a")
            .header("x-instance-id-signature", sig.as_str())
            .body(http_body_util::StreamBody::new(
                futures_util::stream::pending(),
            ))
            .unwrap();
        posts.push(tokio::spawn(async move {
            let response =
                tokio::time::timeout(Duration::from_secs(20), sender.send_request(request)).await;
            response.ok().and_then(|r| r.ok()).map(|r| {
                (
                    r.status().as_u16(),
                    r.headers()
                        .get("x-request-id")
                        .map(|v| v.to_str().unwrap().to_owned()),
                )
            })
        }));
    }
    let mut refused = Vec::new();
    for post in posts {
        if let Some((503, Some(id))) = post.await.unwrap() {
            refused.push(id);
        }
    }
    assert!(refused.len() >= 4, "{} refused", refused.len());
    let events = daemon.audit_events();
    for id in &refused {
        let event = event_for(&events, id);
        assert_eq!(event["http_request"]["version"], "HTTP/2");
        let reason = event["unmapped"]["reason"].as_str().unwrap();
        assert!(
            reason == "rate_limited" || reason == "body_timeout",
            "{reason}"
        );
    }
    assert!(
        refused.iter().any(|id| event_for(&events, id)["message"]
            .as_str()
            .unwrap()
            .contains("Too many concurrent streams")),
        "the streams past the limit were refused as such"
    );
}
