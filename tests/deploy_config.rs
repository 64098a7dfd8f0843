//! `deploy/metapass.toml`, the documented production example, starts as written (paths moved to a
//! scratch directory, addresses to loopback) and does what its comments say: four listeners
//! separated by exposure, certificates required where it says so, PROXY v2 on the owner API, plain
//! HTTP only for ops on loopback, and owner-only files without dev mode.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use http::Method;

/// Copies `from` to `to` with mode 0600, as the example asks of every file it names.
fn install(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The example, rewritten to run in `dir` on loopback, with the dev certificates and policy files.
fn installed_example(dir: &Path) -> std::path::PathBuf {
    let etc = dir.join("etc");
    let dev = repo().join("certs-dev");
    let policy = repo().join("policy");
    for (from, to) in [
        (dev.join("server.pem"), "tls/server.pem"),
        (dev.join("server.key"), "tls/server.key"),
        (dev.join("ca.pem"), "tls/client-ca.pem"),
        (dev.join("ca.crl"), "tls/client-ca.crl"),
        (policy.join("dev-tokens.toml"), "tokens.toml"),
        (policy.join("policy.toml"), "policy.toml"),
        (policy.join("limits.toml"), "limits.toml"),
        (policy.join("dev-keyring.toml"), "keyring.toml"),
        (policy.join("dev-audit-key.toml"), "audit-key.toml"),
    ] {
        install(&from, &etc.join(to));
    }
    let secret = dir.join("proxy-secret.src");
    std::fs::write(&secret, format!("{PROXY_SECRET}\n")).unwrap();
    install(&secret, &etc.join("proxy-secret"));
    // Keystone is contacted only when an unknown token arrives; these tests use the token file.
    let keystone_password = dir.join("keystone-password.src");
    std::fs::write(&keystone_password, "not-contacted-in-this-test\n").unwrap();
    install(&keystone_password, &etc.join("keystone-password"));
    install(&dev.join("ca.pem"), &etc.join("tls/keystone-ca.pem"));

    let text = std::fs::read_to_string(repo().join("deploy/metapass.toml")).unwrap();
    let addresses = regex::Regex::new(r#""(192\.0\.2\.1[0-9]|127\.0\.0\.1):[0-9]+""#).unwrap();
    let text = addresses
        .replace_all(&text, "\"127.0.0.1:0\"")
        .replace("/etc/metapass/", &format!("{}/", etc.display()))
        .replace("/var/lib/metapass", &dir.join("data").display().to_string())
        .replace("\"192.0.2.0/28\"", "\"127.0.0.1/32\"")
        .replace(
            "metadata-proxy.example.internal",
            "metadata-proxy.dev.invalid",
        );
    assert!(
        text.lines()
            .all(|l| l.trim_start().starts_with('#') || !l.contains("192.0.2.")),
        "every placeholder address replaced"
    );
    let path = dir.join("metapass.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_production_example_starts_and_separates_its_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let config = installed_example(dir.path());
    let daemon = Daemon::start_with(&config, dir);
    let mut names: Vec<_> = daemon.listeners.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["admin", "compute", "health", "metadata", "ops"]);
    // Startup warnings come before this line, through the same (ordered) writer.
    assert!(daemon.log_shows(&["metapass serving"]));
    let log = daemon.log();
    assert!(!log.contains("dev_mode"), "no dev-mode allowances: {log}");
    assert!(!log.contains("WARN"), "a clean start: {log}");

    // Admin: a certificate is required, then the admin token.
    let admin_addr = daemon.listeners["admin"];
    let id = new_instance();
    assert!(
        Client::new(admin_addr)
            .try_send(Method::GET, "/healthz", &[], "")
            .await
            .is_err(),
        "no certificate, no handshake"
    );
    Client::with_cert(admin_addr, "proxy")
        .register(&id, "project-a")
        .await;

    // Metadata: the proxy's certificate plus its signature; instances on their own certificate.
    let metadata_addr = daemon.listeners["metadata"];
    let sig = sign(&id);
    let headers = proxy_headers(&id, "project-a", &sig);
    let path = "/openstack/latest/password";
    let proxy = Client::with_cert(metadata_addr, "proxy");
    let post = proxy.send(Method::POST, path, &headers, "blob").await;
    assert_eq!(post.status, 200, "{}", post.text());
    assert!(
        Client::new(metadata_addr)
            .try_send(Method::GET, path, &headers, "")
            .await
            .is_err(),
        "the shared secret alone gets nowhere"
    );
    assert!(
        Client::with_cert(metadata_addr, "revoked")
            .try_send(Method::GET, path, &[], "")
            .await
            .is_err(),
        "the CRL is in force"
    );
    assert_eq!(
        proxy
            .get(&format!("/v2.1/servers/{id}/os-server-password"), &[])
            .await
            .status,
        404,
        "no owner API on the metadata listener"
    );

    // Compute: behind the load balancer's PROXY v2 header, which names the client.
    let compute = Client::new(daemon.listeners["compute"]);
    let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let owner = compute
        .get_via_proxy_protocol(
            "127.0.0.1",
            client,
            &format!("/v2.1/servers/{id}/os-server-password"),
            &[("x-auth-token", TOKEN_A)],
        )
        .await
        .unwrap();
    assert_eq!(owner.status, 200);
    assert_eq!(owner.json()["password"], "blob");
    assert!(
        compute
            .try_send(Method::GET, "/healthz", &[], "")
            .await
            .is_err(),
        "a connection without the PROXY header is not served"
    );

    // Ops: plain HTTP on loopback, and only there.
    let ops = daemon.listeners["ops"];
    assert_eq!(plain_http_get(ops, "/readyz").await.0, Some(200));
    assert_eq!(plain_http_get(ops, path).await.0, Some(404));
    // Readiness for the load balancer: TLS with its client certificate, ops routes only.
    let health = Client::with_cert(daemon.listeners["health"], "proxy");
    assert_eq!(health.get("/readyz", &[]).await.status, 200);
    assert_eq!(health.get(path, &[]).await.status, 404);
    assert!(
        Client::new(daemon.listeners["health"])
            .try_send(Method::GET, "/readyz", &[], "")
            .await
            .is_err(),
        "no certificate, no answer"
    );

    let events = daemon.audit_events();
    let event = event_for(&events, &owner.request_id());
    assert_eq!(event["src_endpoint"]["ip"], "198.51.100.7");
    assert_eq!(event["src_endpoint"]["intermediate_ips"][0], "127.0.0.1");
    assert_eq!(event["unmapped"]["listener"], "compute");
}

#[test]
fn a_database_password_must_come_from_an_owner_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = installed_example(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    let sqlite = "backend = \"sqlite\"\npath = \"metapass.sqlite3\"";
    assert!(text.contains(sqlite));
    let with_store = |store: &str| {
        let path = dir.path().join("postgres.toml");
        std::fs::write(&path, text.replace(sqlite, store)).unwrap();
        path
    };
    // A password inside the URL is refused outside dev mode, and not echoed.
    let stderr = serve_must_fail(&with_store(
        "backend = \"postgres\"\nurl = \"postgresql://metapass:hunter2-db@127.0.0.1:5432/test\"",
    ));
    assert!(
        stderr.contains("only allowed with dev_mode = true; use password_file"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2-db"), "{stderr}");
    // A password file others may read is refused, naming it.
    let password = dir.path().join("db-password");
    std::fs::write(&password, "hunter2-db\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = format!(
        "backend = \"postgres\"\nurl = \"postgresql://metapass@127.0.0.1:5432/test\"\npassword_file = {password:?}"
    );
    let stderr = serve_must_fail(&with_store(&store));
    assert!(
        stderr.contains("db-password") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2-db"), "{stderr}");
    // Outside dev mode Keystone is reached over https only (tokens and metapass's password).
    let plain_keystone = dir.path().join("plain-keystone.toml");
    std::fs::write(
        &plain_keystone,
        text.replace(
            "auth_url = \"https://keystone.example.internal:5000/v3\"",
            "auth_url = \"http://keystone.example.internal:5000/v3\"",
        ),
    )
    .unwrap();
    let stderr = serve_must_fail(&plain_keystone);
    assert!(
        stderr.contains("must be https:// outside dev_mode"),
        "{stderr}"
    );
    // Outside dev mode the database is reached over TLS, unless that is waived explicitly.
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let stderr = serve_must_fail(&with_store(&store));
    assert!(
        stderr.contains("needs ca_file") && stderr.contains("insecure_plaintext"),
        "{stderr}"
    );
    // So is Nova's database, for the registry lookup.
    let lookup = dir.path().join("lookup.toml");
    std::fs::write(
        &lookup,
        format!("{text}\n[nova_lookup]\nurl = \"mysql://metapass_ro@127.0.0.1:3306/nova\"\n"),
    )
    .unwrap();
    let stderr = serve_must_fail(&lookup);
    assert!(
        stderr.contains("[nova_lookup] needs TLS") && stderr.contains("insecure_plaintext"),
        "{stderr}"
    );
    // And for import-nova, refused before it connects.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args([
            "import-nova",
            "--db",
            "mysql://nova_ro@127.0.0.1:1/nova",
            "--dry-run",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("over TLS outside dev mode") && stderr.contains("--db-insecure-plaintext"),
        "{stderr}"
    );
    // An unknown setting or a URL that is not one is refused before connecting.
    let stderr = serve_must_fail(&with_store(
        "backend = \"postgres\"\nurl = \"postgresql://x@127.0.0.1/test\"\npool = 3",
    ));
    assert!(stderr.contains("pool"), "{stderr}");
    let stderr = serve_must_fail(&with_store(
        "backend = \"postgres\"\nurl = \"host=127.0.0.1 port=notaport\"",
    ));
    assert!(
        stderr.contains("not a PostgreSQL connection URL"),
        "{stderr}"
    );
}
