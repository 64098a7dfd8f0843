//! Two replicas on one PostgreSQL database, as behind a load balancer: set-once holds across
//! them, what one stores the other reads, and killing one loses nothing it acknowledged.
//! Runs when `METAPASS_TEST_POSTGRES` holds a connection URL (`.ci/run` sets it); says SKIPPED
//! otherwise.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const A: &str = "project-a";

/// The dev config on the PostgreSQL store at `url`.
fn postgres_config(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    config_with(dir, |text| {
        let sqlite = "backend = \"sqlite\"\npath = \"metapass.sqlite3\"";
        assert!(text.contains(sqlite), "the dev config's store section");
        text.replace(
            sqlite,
            &format!("backend = \"postgres\"\nurl = {url:?}\npool_size = 8"),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_truth_and_a_killed_one_loses_nothing_acknowledged() {
    let Some((url, admin_db, schema)) = fresh_postgres_schema().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = postgres_config(dir.path(), &url);
    let first = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    let mut second = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    assert!(first.log_shows(&["store open", "postgres"]));
    let clients = [first.client(), second.client()];

    // Concurrent posts for one instance, spread over both replicas: exactly one 200.
    let id = new_instance();
    clients[0].register(&id, A).await;
    let posts: Vec<_> = (0..24)
        .map(|i| {
            let (client, id) = (clients[i % 2].clone(), id.clone());
            tokio::spawn(async move {
                let reply = client.post_password(&id, A, format!("racer-{i}")).await;
                (i, reply.status)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for post in posts {
        let (i, status) = post.await.unwrap();
        match status {
            200 => winners.push(i),
            409 => {}
            other => panic!("post {i}: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    for client in &clients {
        let reply = client.get_password(&id, A).await;
        assert_eq!(reply.text(), format!("racer-{}", winners[0]));
    }

    // Set through one, read and cleared through the other; the guest may post again.
    let other = new_instance();
    clients[1].register(&other, A).await;
    assert_eq!(
        clients[1]
            .post_password(&other, A, "via-second")
            .await
            .status,
        200
    );
    assert_eq!(
        clients[0].get_password(&other, A).await.text(),
        "via-second"
    );
    let clear = clients[0]
        .send(
            http::Method::DELETE,
            &format!("/v2.1/servers/{other}/os-server-password"),
            &[("x-auth-token", TOKEN_A)],
            "",
        )
        .await;
    assert_eq!(clear.status, 204);
    assert_eq!(clients[1].get_password(&other, A).await.body.len(), 0);
    assert_eq!(
        clients[1].post_password(&other, A, "again").await.status,
        200
    );

    // Posts to the second replica while it is killed: every acknowledged one survives.
    let ids: Vec<String> = (0..40).map(|_| new_instance()).collect();
    for id in &ids {
        clients[0].register(id, A).await;
    }
    let (results, mut finished) = tokio::sync::mpsc::unbounded_channel();
    for (i, id) in ids.iter().enumerate() {
        let (client, id, results) = (clients[1].clone(), id.clone(), results.clone());
        tokio::spawn(async move {
            // Spread the posts out so that some are answered before the kill and some are not.
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let reply = client
                .post_password_nopanic(&id, A, format!("pw-{id}"))
                .await;
            let _ = results.send((id, reply.map(|r| r.status)));
        });
    }
    drop(results);
    // Kill the replica once a few posts have been acknowledged, with the rest in flight.
    let mut outcomes = Vec::new();
    while let Ok(Some(outcome)) =
        tokio::time::timeout(Duration::from_secs(20), finished.recv()).await
    {
        outcomes.push(outcome);
        if outcomes.iter().filter(|(_, s)| *s == Some(200)).count() == 5 {
            break;
        }
    }
    second.kill();
    while let Some(outcome) = finished.recv().await {
        outcomes.push(outcome);
    }
    assert_eq!(outcomes.len(), ids.len());
    let mut acknowledged = 0;
    for (id, status) in outcomes {
        let read = clients[0].get_password(&id, A).await;
        assert_eq!(read.status, 200, "{}", read.text());
        if status == Some(200) {
            acknowledged += 1;
            assert_eq!(
                read.text(),
                format!("pw-{id}"),
                "an acknowledged post was lost"
            );
        } else {
            // Not acknowledged: either stored whole or not at all.
            assert!(read.body.is_empty() || read.text() == format!("pw-{id}"));
        }
    }
    eprintln!("{acknowledged} of 40 posts were acknowledged before the kill");
    assert!(acknowledged >= 5);

    // The key status CLI reads the shared database (without migrating it).
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["keys", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let key_1: Vec<&str> = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_else(|| panic!("{stdout}"))
        .split_whitespace()
        .collect();
    assert_eq!(key_1[..3], ["1", "yes", "yes"], "{stdout}");
    let sealed: usize = key_1[3].parse().unwrap();
    assert!(sealed >= 2 + acknowledged, "{stdout}");

    // The surviving replica's audit chain verifies.
    let (ok, out) = first.verify_audit();
    assert!(ok, "{out}");
    let _ = admin_db
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_connection_can_require_verified_tls() {
    let Some((url, admin_db, schema)) = fresh_postgres_schema().await else {
        return;
    };
    // The server's certificate on a Debian PostgreSQL: self-signed, for DNS name localhost.
    let server_cert = std::path::Path::new("/etc/ssl/certs/ssl-cert-snakeoil.pem");
    let ssl: String = admin_db.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" || !server_cert.exists() {
        eprintln!("SKIPPED: the PostgreSQL server has no TLS certificate to verify against");
        return;
    }
    let name = format!("metapass-{schema}");
    let url = format!(
        "{}&application_name={name}",
        url.replace("@127.0.0.1:", "@localhost:")
    );
    let dir = tempfile::tempdir().unwrap();
    let with_roots = |roots: &std::path::Path| {
        let config = postgres_config(dir.path(), &url);
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "pool_size = 8",
            &format!("pool_size = 8\nca_file = {roots:?}"),
        );
        std::fs::write(&config, text).unwrap();
        config
    };

    // Roots that did not issue the server's certificate: the daemon refuses to start.
    let stderr = serve_must_fail(&with_roots(&repo().join("certs-dev/ca.pem")));
    assert!(
        stderr.contains("TLS") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );

    // The right roots: it starts, and its database connections are encrypted.
    let daemon = Daemon::start_with(&with_roots(server_cert), tempfile::tempdir().unwrap());
    let id = new_instance();
    daemon.client().register(&id, A).await;
    let encrypted: Vec<bool> = admin_db
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1 AND a.client_port IS NOT NULL",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!encrypted.is_empty());
    assert!(encrypted.iter().all(|tls| *tls), "{encrypted:?}");
    drop(daemon);
    let _ = admin_db
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await;
}
