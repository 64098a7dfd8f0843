//! Identity and TLS operations: instance certificates, the proxy certificate requirement, trusted
//! proxies and PROXY protocol v2, separate listeners, token binding, and certificate hot reload.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::Method;

const INSTANCE_1: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";

fn dev_listener(extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"dev\"\naddress = \"127.0.0.1:0\"\nserves = [\"instance\", \"compute\", \"admin\", \"ops\"]\nclient_auth = \"optional\"\n{extra}\n"
    )
}

#[tokio::test]
async fn an_instance_certificate_is_that_instance() {
    let daemon = Daemon::start();
    let admin = daemon.client();
    admin.register(INSTANCE_1, "project-a").await;
    let own = Client::with_cert(daemon.addr, "instance-1");
    let path = "/openstack/latest/password";
    assert_eq!(own.get(path, &[]).await.body.len(), 0);
    let post = own.send(Method::POST, path, &[], "cert-posted-blob").await;
    assert_eq!(post.status, 200, "{}", post.text());
    let read = own.get(path, &[]).await;
    assert_eq!(
        (read.status, read.text().as_str()),
        (200, "cert-posted-blob")
    );
    assert_eq!(own.send(Method::POST, path, &[], "again").await.status, 409);
    // The owner sees what the instance posted.
    let owner = admin
        .get(
            &format!("/v2.1/servers/{INSTANCE_1}/os-server-password"),
            &[("x-auth-token", TOKEN_A)],
        )
        .await;
    assert_eq!(owner.json()["password"], "cert-posted-blob");

    // Headers cannot speak for another instance on an instance certificate's connection.
    let other = new_instance();
    admin.register(&other, "project-a").await;
    let sig = sign(&other);
    let claim = proxy_headers(&other, "project-a", &sig);
    let mixed = own.get(path, &claim).await;
    assert_eq!(mixed.status, 400, "{}", mixed.text());
    // An instance certificate for an unregistered instance finds nothing, and may not post yet.
    let unregistered = Client::with_cert(daemon.addr, "instance-2");
    let nothing = unregistered.get(path, &[]).await;
    assert_eq!((nothing.status, nothing.body.len()), (200, 0));
    assert_eq!(
        unregistered.send(Method::POST, path, &[], "x").await.status,
        503
    );
    // It grants nothing on the owner API.
    let owner_path = format!("/v2.1/servers/{INSTANCE_1}/os-server-password");
    assert_eq!(own.get(&owner_path, &[]).await.status, 401);

    let events = daemon.audit_events();
    let event = event_for(&events, &read.request_id());
    assert_eq!(event["unmapped"]["auth"], "client-certificate");
    assert_eq!(event["actor"]["user"]["uid"], INSTANCE_1);
    let fingerprint = event["unmapped"]["client_certificate"].as_str().unwrap();
    assert!(fingerprint.starts_with("hmac-sha256:"));
    assert_eq!(event["actor"]["user"]["credential_uid"], fingerprint);
}

#[tokio::test]
async fn expired_and_foreign_certificates_fail_the_handshake_and_are_counted() {
    let daemon = Daemon::start();
    for name in ["expired", "foreign", "revoked"] {
        let client = Client::with_cert(daemon.addr, name);
        // TLS 1.3: the client learns of the rejection on its first read.
        let result = client.try_send(Method::GET, "/healthz", &[], "").await;
        assert!(result.is_err(), "{name}: {result:?}");
    }
    // The server counts a failure when it sees it, which may be just after the client does.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = daemon.client().get("/metrics", &[]).await.text();
        if metrics.contains("metapass_tls_handshake_failures_total 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metrics.contains("metapass_tls_handshake_failures_total 3"),
        "{metrics}"
    );
    assert!(
        daemon.log_shows(&[
            "TLS handshake failed",
            "certificate expired",
            "UnknownIssuer",
            "Revoked"
        ]),
        "{}",
        daemon.log()
    );
}

fn mtls_proxy_daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), |t| {
        t.replace(
            "proxy_auth = \"signature\"",
            "proxy_auth = \"mtls+signature\"",
        )
    });
    Daemon::start_with(&config, dir)
}

#[tokio::test]
async fn in_mtls_mode_signed_headers_need_the_proxy_certificate() {
    let daemon = mtls_proxy_daemon();
    let admin = daemon.client();
    let id = new_instance();
    admin.register(&id, "project-a").await;
    let sig = sign(&id);
    let headers = proxy_headers(&id, "project-a", &sig);
    let path = "/openstack/latest/password";

    let bare = admin.get(path, &headers).await;
    assert_eq!(bare.status, 403, "{}", bare.text());
    assert!(
        bare.error_message()
            .contains("metadata proxy's client certificate")
    );
    let wrong_cert = Client::with_cert(daemon.addr, "instance-2")
        .get(path, &headers)
        .await;
    assert_eq!(
        wrong_cert.status, 400,
        "an instance certificate is that instance; headers claiming another are refused"
    );
    let proxy = Client::with_cert(daemon.addr, "proxy");
    assert_eq!(proxy.get(path, &headers).await.status, 200);
    let forged = proxy_headers(&id, "project-a", &sig[1..]);
    assert_eq!(
        proxy.get(path, &forged).await.status,
        403,
        "the signature is still checked"
    );
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &bare.request_id())["unmapped"]["reason"],
        "proxy_certificate_required"
    );
}

#[tokio::test]
async fn forwarding_headers_from_untrusted_peers_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_listeners(
        dir.path(),
        &dev_listener("trusted_proxies = [\"10.0.0.0/8\"]"),
        |t| t,
    );
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    let spoofed = client
        .get("/healthz", &[("x-forwarded-for", "203.0.113.66")])
        .await;
    assert_eq!(spoofed.status, 200);
    // Garbage from an untrusted peer proves nothing and breaks nothing.
    let garbage = client
        .get(
            "/healthz",
            &[
                ("x-forwarded-for", "not an address"),
                ("forwarded", "for=???"),
            ],
        )
        .await;
    assert_eq!(garbage.status, 200);
    let events = daemon.audit_events();
    for reply in [&spoofed, &garbage] {
        let event = event_for(&events, &reply.request_id());
        assert_eq!(
            event["src_endpoint"]["ip"], "127.0.0.1",
            "the spoofed address is not the source"
        );
        assert_eq!(event["unmapped"]["forwarded"], "ignored_untrusted_peer");
        assert!(event["unmapped"]["forwarded_for_raw"].as_str().is_some());
        assert!(event["http_request"].get("x_forwarded_for").is_none());
    }
}

#[tokio::test]
async fn proxy_protocol_v2_names_the_source_and_only_trusted_peers_may_send_it() {
    let dir = tempfile::tempdir().unwrap();
    let listener = dev_listener("proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]");
    let config = config_with_listeners(dir.path(), &listener, |t| {
        t.replace(
            "tls_handshake_timeout_secs = 10",
            "tls_handshake_timeout_secs = 2",
        )
    });
    let daemon = Daemon::start_with(&config, dir);
    let source: SocketAddr = "198.51.100.23:5555".parse().unwrap();
    let reply = daemon
        .client()
        .get_via_proxy_protocol("127.0.0.1", source, "/healthz", &[])
        .await
        .expect("served");
    assert_eq!(reply.status, 200);
    let events = daemon.audit_events();
    let event = event_for(&events, &reply.request_id());
    assert_eq!(event["src_endpoint"]["ip"], "198.51.100.23");
    assert_eq!(event["src_endpoint"]["port"], 5555);
    assert_eq!(
        event["src_endpoint"]["intermediate_ips"],
        serde_json::json!(["127.0.0.1"])
    );
    // An untrusted peer may not say who the client is: closed at once.
    assert!(
        daemon
            .client()
            .get_via_proxy_protocol("127.0.0.3", source, "/healthz", &[])
            .await
            .is_err()
    );
    // A trusted peer that skips the header is closed too (the TLS ClientHello is not a PROXY header).
    assert!(
        daemon
            .client()
            .try_send(Method::GET, "/healthz", &[], "")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn separate_listeners_serve_only_their_surfaces() {
    let dir = tempfile::tempdir().unwrap();
    let listeners = "[[listener]]\nname = \"metadata\"\naddress = \"127.0.0.1:0\"\nserves = [\"instance\"]\n\n\
                     [[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nserves = [\"compute\", \"admin\"]\n\n\
                     [[listener]]\nname = \"ops\"\naddress = \"127.0.0.1:0\"\ntls = false\nserves = [\"ops\"]\n";
    let config = config_with_listeners(dir.path(), listeners, |t| t);
    let daemon = Daemon::start_with(&config, dir);
    let metadata = Client::new(daemon.listeners["metadata"]);
    let api = Client::new(daemon.listeners["api"]);
    let id = new_instance();
    api.register(&id, "project-a").await;
    assert_eq!(metadata.get_password(&id, "project-a").await.status, 200);
    assert_eq!(
        api.get_password(&id, "project-a").await.status,
        404,
        "no instance API on the API listener"
    );
    let owner_path = format!("/v2.1/servers/{id}/os-server-password");
    assert_eq!(
        metadata
            .get(&owner_path, &[("x-auth-token", TOKEN_A)])
            .await
            .status,
        404
    );
    assert_eq!(
        api.get(&owner_path, &[("x-auth-token", TOKEN_A)])
            .await
            .status,
        200
    );
    assert_eq!(
        metadata.get("/healthz", &[]).await.status,
        404,
        "ops only on the ops listener"
    );
    // The ops listener is plain HTTP on loopback.
    let ops = daemon.listeners["ops"];
    let (status, answer) = plain_http_get(ops, "/readyz").await;
    assert_eq!(status, Some(200), "{answer}");
    let events = daemon.audit_events();
    let names: std::collections::HashSet<_> = events
        .iter()
        .filter_map(|e| e["unmapped"]["listener"].as_str())
        .collect();
    assert_eq!(names, ["metadata", "api", "ops"].into_iter().collect());
    let readyz = events
        .iter()
        .find(|e| e["api"]["operation"] == "health:ready")
        .unwrap();
    assert!(
        readyz["unmapped"].get("tls_version").is_none(),
        "plain HTTP has no TLS version"
    );
}

#[tokio::test]
async fn a_token_bound_to_a_certificate_needs_that_certificate() {
    let dir = tempfile::tempdir().unwrap();
    use rustls::pki_types::pem::PemObject;
    let proxy_der =
        rustls::pki_types::CertificateDer::from_pem_file(repo().join("certs-dev/proxy.pem"))
            .unwrap();
    let fingerprint = hex::encode(ring::digest::digest(&ring::digest::SHA256, &proxy_der).as_ref());
    let tokens = dir.path().join("tokens.toml");
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, b"bound-token").as_ref());
    std::fs::write(
        &tokens,
        format!(
            "{}\n[[token]]\nlabel = \"bound\"\nsha256 = \"{hash}\"\nproject = \"project-a\"\nroles = [\"reader\"]\nclient_cert_sha256 = \"{fingerprint}\"\n",
            std::fs::read_to_string(repo().join("policy/dev-tokens.toml")).unwrap()
        ),
    )
    .unwrap();
    let dev_tokens = repo().join("policy/dev-tokens.toml");
    let config = config_with(dir.path(), |t| {
        t.replace(&format!("{dev_tokens:?}"), &format!("{tokens:?}"))
    });
    let daemon = Daemon::start_with(&config, dir);
    let id = new_instance();
    daemon.client().register(&id, "project-a").await;
    let path = format!("/v2.1/servers/{id}/os-server-password");
    let token = [("x-auth-token", "bound-token")];
    assert_eq!(
        Client::with_cert(daemon.addr, "proxy")
            .get(&path, &token)
            .await
            .status,
        200
    );
    let without = daemon.client().get(&path, &token).await;
    assert_eq!(without.status, 401);
    assert!(
        without
            .error_message()
            .contains("bound to a client certificate")
    );
    assert_eq!(
        Client::with_cert(daemon.addr, "instance-1")
            .get(&path, &token)
            .await
            .status,
        401
    );
}

/// The DER of the certificate a fresh connection to `addr` is served, with `roots` trusted.
async fn served_certificate(addr: SocketAddr, roots: &[&Path]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(rustls::pki_types::CertificateDer::from_pem_file(root).unwrap())
            .unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .unwrap()
        .to_owned();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem)
        .unwrap()
        .to_vec()
}

/// The reasons of the daemon's `tls:reload` events, once there are `count` of them (waits up to 5 s:
/// a reload runs on its own task after the signal).
async fn reload_reasons(daemon: &Daemon, count: usize) -> Vec<String> {
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = daemon
            .audit_events()
            .into_iter()
            .filter(|e| e["api"]["operation"] == "tls:reload")
            .map(|e| e["unmapped"]["reason"].as_str().unwrap().to_owned())
            .collect();
        if reasons.len() >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reasons
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_the_certificate_and_keeps_connections_and_a_broken_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The daemon serves copies, so the test can replace them.
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::copy(repo().join("certs-dev/server.pem"), &cert).unwrap();
    std::fs::copy(repo().join("certs-dev/server.key"), &key).unwrap();
    let dev = repo().join("certs-dev");
    let config = config_with(dir.path(), |t| {
        t.replace(
            &format!("{:?}", dev.join("server.pem")),
            &format!("{cert:?}"),
        )
        .replace(
            &format!("{:?}", dev.join("server.key")),
            &format!("{key:?}"),
        )
    });
    // A second CA and server certificate, made by the daemon's own dev-certs command.
    let fresh = dir.path().join("fresh");
    dev_certs_into(&fresh);
    let daemon = Daemon::start_with(&config, dir);
    let (old_ca, new_ca) = (dev.join("ca.pem"), fresh.join("ca.pem"));
    let both = [old_ca.as_path(), new_ca.as_path()];
    assert_eq!(
        served_certificate(daemon.addr, &both).await,
        der_of(&dev.join("server.pem"))
    );

    // A keep-alive connection opened before the reload.
    let mut sender = keep_alive(&daemon.client()).await;
    let healthz = || get_request("/healthz");
    assert_eq!(sender.send_request(healthz()).await.unwrap().status(), 200);

    std::fs::copy(
        fresh.join("server.pem"),
        daemon.dir.path().join("server.pem"),
    )
    .unwrap();
    std::fs::copy(
        fresh.join("server.key"),
        daemon.dir.path().join("server.key"),
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    let mut swapped = false;
    for _ in 0..50 {
        if served_certificate(daemon.addr, &both).await == der_of(&fresh.join("server.pem")) {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(swapped, "new connections get the new certificate");
    assert_eq!(
        sender.send_request(healthz()).await.unwrap().status(),
        200,
        "the old connection lives on"
    );

    // A broken file: the certificate served stays, and the failure is logged and audited.
    std::fs::write(
        daemon.dir.path().join("server.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    assert_eq!(
        reload_reasons(&daemon, 2).await,
        ["ok", "certificate_reload_failed"]
    );
    assert_eq!(
        served_certificate(daemon.addr, &both).await,
        der_of(&fresh.join("server.pem"))
    );
    let events = daemon.audit_events();
    let reloads: Vec<_> = events
        .iter()
        .filter(|e| e["api"]["operation"] == "tls:reload")
        .collect();
    assert_eq!(reloads.len(), 2);
    assert_eq!(reloads[0]["unmapped"]["reason"], "ok");
    assert_eq!(
        reloads[1]["unmapped"]["reason"],
        "certificate_reload_failed"
    );
    assert_eq!(reloads[1]["actor"]["user"]["type"], "System");
    let validator = schema_validator();
    for event in &reloads {
        assert!(validator.is_valid(event), "{event:#}");
    }
    assert!(daemon.log_shows(&["certificate reload failed"]));
}

#[test]
fn listener_configurations_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    for (listeners, expected) in [
        (
            "[[listener]]\nname = \"x\"\naddress = \"0.0.0.0:0\"\ntls = false\nserves = [\"ops\"]\n",
            "loopback",
        ),
        (
            "[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\ntls = false\nserves = [\"instance\"]\n",
            "ops-only",
        ),
        (
            "[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nserves = []\n",
            "serves must list",
        ),
        (
            "[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nserves = [\"ops\"]\n[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nserves = [\"ops\"]\n",
            "used twice",
        ),
        (
            "[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nserves = [\"ops\"]\nproxy_protocol = true\n",
            "trusted_proxies",
        ),
        (
            "[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nserves = [\"gossip\"]\n",
            "gossip",
        ),
    ] {
        let config = config_with_listeners(dir.path(), listeners, |t| t);
        let stderr = serve_must_fail_as_configured(&config);
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    let no_ca = config_with(dir.path(), |t| {
        t.replace(
            &format!("client_ca = {:?}", repo().join("certs-dev/ca.pem")),
            "",
        )
    });
    assert!(serve_must_fail(&no_ca).contains("client_auth needs [tls] client_ca"));
    let crls_without_ca = config_with_listeners(
        dir.path(),
        "[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\nserves = [\"ops\"]\n",
        |t| {
            t.replace(
                &format!("client_ca = {:?}", repo().join("certs-dev/ca.pem")),
                "",
            )
        },
    );
    assert!(serve_must_fail(&crls_without_ca).contains("client_crls needs client_ca"));
    let no_names = config_with(dir.path(), |t| {
        t.replace(
            "proxy_auth = \"signature\"",
            "proxy_auth = \"mtls+signature\"",
        )
        .replace("proxy_cert_names = [\"metadata-proxy.dev.invalid\"]", "")
    });
    assert!(serve_must_fail(&no_names).contains("proxy_cert_names"));
}

#[tokio::test]
async fn dev_certs_writes_a_complete_owner_only_set_the_daemon_runs_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh");
    dev_certs_into(&fresh);
    let mut names: Vec<String> = std::fs::read_dir(&fresh)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let expected = [
        "ca.crl",
        "ca.key",
        "ca.pem",
        "expired.key",
        "expired.pem",
        "foreign-ca.pem",
        "foreign.key",
        "foreign.pem",
        "instance-1.key",
        "instance-1.pem",
        "instance-2.key",
        "instance-2.pem",
        "proxy.key",
        "proxy.pem",
        "revoked.key",
        "revoked.pem",
        "server.key",
        "server.pem",
    ];
    assert_eq!(names, expected);
    for name in &names {
        let mode = std::fs::metadata(fresh.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }

    // A daemon on the fresh set, requiring the fresh proxy certificate for signed headers.
    let repo_certs = format!("{}/certs-dev/", repo().display());
    let config = config_with(dir.path(), |t| {
        t.replace(&repo_certs, &format!("{}/", fresh.display()))
            .replace(
                "proxy_auth = \"signature\"",
                "proxy_auth = \"mtls+signature\"",
            )
    });
    let daemon = Daemon::start_with(&config, dir);
    let admin = Client::with_cert_from(daemon.addr, &fresh, "proxy");
    admin.register(INSTANCE_1, "project-a").await;
    let path = "/openstack/latest/password";
    let instance = Client::with_cert_from(daemon.addr, &fresh, "instance-1");
    assert_eq!(
        instance
            .send(Method::POST, path, &[], "fresh-ca-blob")
            .await
            .status,
        200
    );
    let id = new_instance();
    admin.register(&id, "project-a").await;
    let sig = sign(&id);
    let headers = proxy_headers(&id, "project-a", &sig);
    assert_eq!(admin.get(path, &headers).await.status, 200);
    for refused in ["expired", "foreign", "revoked"] {
        let client = Client::with_cert_from(daemon.addr, &fresh, refused);
        let result = client.try_send(Method::GET, "/healthz", &[], "").await;
        assert!(result.is_err(), "{refused}: {result:?}");
    }
    // The repository's instance certificate, presented by a client that trusts the fresh CA, is
    // from a CA the daemon no longer trusts.
    let mixed = tempfile::tempdir().unwrap();
    std::fs::copy(fresh.join("ca.pem"), mixed.path().join("ca.pem")).unwrap();
    for file in ["instance-1.pem", "instance-1.key"] {
        std::fs::copy(repo().join("certs-dev").join(file), mixed.path().join(file)).unwrap();
    }
    let old = Client::with_cert_from(daemon.addr, mixed.path(), "instance-1");
    assert!(
        old.try_send(Method::GET, "/healthz", &[], "")
            .await
            .is_err()
    );
    assert!(daemon.log_shows(&["UnknownIssuer"]));
}

/// A directory holding `<name>.pem/.key` from `certs` and the repository's dev CA (which signed the
/// daemon's server certificate) as `ca.pem`, for [`Client::with_cert_from`].
fn client_dir(certs: &Path, name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("certs-dev/ca.pem"), dir.path().join("ca.pem")).unwrap();
    for ext in ["pem", "key"] {
        let file = format!("{name}.{ext}");
        std::fs::copy(certs.join(&file), dir.path().join(&file)).unwrap();
    }
    dir
}

#[tokio::test]
async fn sighup_reloads_the_client_ca_and_crls_and_a_broken_crl_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh");
    dev_certs_into(&fresh);
    let (ca, crl) = (
        dir.path().join("client-ca.pem"),
        dir.path().join("client.crl"),
    );
    std::fs::copy(fresh.join("ca.pem"), &ca).unwrap();
    std::fs::copy(fresh.join("ca.crl"), &crl).unwrap();
    let dev = repo().join("certs-dev");
    let config = config_with(dir.path(), |t| {
        t.replace(
            &format!("client_ca = {:?}", dev.join("ca.pem")),
            &format!("client_ca = {ca:?}"),
        )
        .replace(
            &format!("client_crls = [{:?}]", dev.join("ca.crl")),
            &format!("client_crls = [{crl:?}]"),
        )
    });
    let daemon = Daemon::start_with(&config, dir);
    daemon.client().register(INSTANCE_1, "project-a").await;
    let path = "/openstack/latest/password";
    let (fresh_instance, fresh_revoked) = (
        client_dir(&fresh, "instance-1"),
        client_dir(&fresh, "revoked"),
    );
    let fresh_instance = Client::with_cert_from(daemon.addr, fresh_instance.path(), "instance-1");
    let fresh_revoked = Client::with_cert_from(daemon.addr, fresh_revoked.path(), "revoked");
    let old_instance = Client::with_cert(daemon.addr, "instance-1");
    let old_revoked = Client::with_cert(daemon.addr, "revoked");
    let works = |client: Client| async move {
        match client.try_send(Method::GET, path, &[], "").await {
            Ok(reply) => reply.status == 200,
            Err(_) => false,
        }
    };
    assert!(works(fresh_instance.clone()).await);
    assert!(
        !works(fresh_revoked.clone()).await,
        "listed in the fresh CRL"
    );
    assert!(
        !works(old_instance.clone()).await,
        "not issued by the trusted CA"
    );

    // A keep-alive connection on the fresh CA's certificate, opened before the reload.
    let mut sender = keep_alive(&fresh_instance).await;
    let request = || get_request(path);
    assert_eq!(sender.send_request(request()).await.unwrap().status(), 200);

    std::fs::copy(dev.join("ca.pem"), &ca).unwrap();
    std::fs::copy(dev.join("ca.crl"), &crl).unwrap();
    signal(daemon.pid(), "HUP");
    let mut swapped = false;
    for _ in 0..50 {
        if works(old_instance.clone()).await {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(swapped, "the repository CA is trusted after SIGHUP");
    assert!(
        !works(fresh_instance.clone()).await,
        "the fresh CA no longer is, not even for a session resumed from before the reload"
    );
    assert!(!works(old_revoked.clone()).await, "the new CRL applies");
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        200,
        "a connection open across the reload keeps working"
    );

    // A broken CRL: the reload fails and the trust loaded before stays.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n",
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    assert_eq!(
        reload_reasons(&daemon, 2).await,
        ["ok", "certificate_reload_failed"]
    );
    assert!(works(old_instance.clone()).await);
    assert!(!works(old_revoked).await);
    assert!(!works(fresh_instance).await);
    // An empty CRL file is refused too, not read as "nothing revoked".
    std::fs::write(&crl, "").unwrap();
    signal(daemon.pid(), "HUP");
    assert_eq!(
        reload_reasons(&daemon, 3).await[2],
        "certificate_reload_failed"
    );
    let last = daemon
        .audit_events()
        .into_iter()
        .rfind(|e| e["api"]["operation"] == "tls:reload")
        .unwrap();
    let message = last["message"].as_str().unwrap();
    assert!(message.contains("no X509 CRL found"), "{message}");
}

#[tokio::test]
async fn only_the_configured_forwarding_header_chooses_the_audited_source() {
    // The dev listener trusts 127.0.0.1 and names X-Forwarded-For. A proxy that appends
    // X-Forwarded-For passes a client's own Forwarded header through: it must choose nothing.
    let daemon = Daemon::start();
    let client = daemon.client();
    let both = [
        ("x-forwarded-for", "192.0.2.7"),
        ("forwarded", "for=203.0.113.99"),
    ];
    let reply = client.get("/healthz", &both).await;
    let events = daemon.audit_events();
    let event = event_for(&events, &reply.request_id());
    assert_eq!(event["src_endpoint"]["ip"], "192.0.2.7");
    assert_eq!(event["unmapped"]["forwarded"], "trusted");
    assert_eq!(event["unmapped"]["forwarded_for_raw"], "for=203.0.113.99");
    // Forwarded alone names nobody: the peer is the source.
    let alone = client
        .get("/healthz", &[("forwarded", "for=203.0.113.99")])
        .await;
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &alone.request_id())["src_endpoint"]["ip"],
        "127.0.0.1"
    );

    // A listener configured for Forwarded believes only Forwarded.
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), |t| {
        t.replace(
            "client_ip_header = \"x-forwarded-for\"",
            "client_ip_header = \"forwarded\"",
        )
    });
    let daemon = Daemon::start_with(&config, dir);
    let reply = daemon.client().get("/healthz", &both).await;
    let events = daemon.audit_events();
    let event = event_for(&events, &reply.request_id());
    assert_eq!(event["src_endpoint"]["ip"], "203.0.113.99");
    assert_eq!(event["unmapped"]["forwarded_for_raw"], "192.0.2.7");
}
