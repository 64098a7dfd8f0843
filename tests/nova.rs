//! Living beside Nova, against the real components: Nova's database subset on MariaDB for
//! `metapass import-nova`, and oslo.messaging-shaped notifications on RabbitMQ for the registry
//! sync. They run when `METAPASS_TEST_MYSQL` / `METAPASS_TEST_AMQP` hold URLs (`.ci/run` sets them
//! when the local servers answer) and say SKIPPED otherwise.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use mysql_async::prelude::Queryable;
use serde_json::{Value, json};

const A: &str = "project-a";

/// A fresh database holding the subset of Nova's schema metapass reads, or `None` to skip.
async fn fresh_nova_database() -> Option<(String, mysql_async::Pool, String)> {
    let Ok(base) = std::env::var("METAPASS_TEST_MYSQL") else {
        eprintln!("SKIPPED: METAPASS_TEST_MYSQL is not set");
        return None;
    };
    Some(nova_database_on(&base).await)
}

/// Drops a database `nova_database_on` made (on the shared server, it would outlive the test).
async fn drop_nova_database(admin: &mysql_async::Pool, name: &str) {
    let mut conn = admin.get_conn().await.unwrap();
    conn.query_drop(format!("DROP DATABASE {name}"))
        .await
        .unwrap();
}

/// A fresh database with Nova's schema subset on the server at `base`: (url, admin pool, name).
async fn nova_database_on(base: &str) -> (String, mysql_async::Pool, String) {
    let admin = mysql_async::Pool::new(mysql_async::Opts::from_url(base).unwrap());
    let name = format!("mp_{}", uuid::Uuid::new_v4().simple());
    let mut conn = admin
        .get_conn()
        .await
        .expect("connect to METAPASS_TEST_MYSQL");
    conn.query_drop(format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    conn.query_drop(format!(
        "CREATE TABLE {name}.instances (
            id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            created_at DATETIME, updated_at DATETIME, deleted_at DATETIME,
            deleted INT DEFAULT 0,
            uuid VARCHAR(36) NOT NULL,
            project_id VARCHAR(255),
            user_id VARCHAR(255),
            hostname VARCHAR(255),
            UNIQUE KEY uniq_instances0uuid (uuid)
         ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
         CREATE TABLE {name}.instance_system_metadata (
            id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            created_at DATETIME, updated_at DATETIME, deleted_at DATETIME,
            deleted INT DEFAULT 0,
            instance_uuid VARCHAR(36) NOT NULL,
            `key` VARCHAR(255) NOT NULL,
            value TEXT,
            KEY instance_uuid (instance_uuid)
         ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;"
    ))
    .await
    .unwrap();
    drop(conn);
    let mut url = url::Url::parse(base).expect("a MySQL URL");
    url.set_path(&format!("/{name}"));
    (url.to_string(), admin, name)
}

/// A private MariaDB (Debian's mariadbd) serving TLS with the dev server certificate on a free
/// loopback port, in its own data directory; stopped when dropped.
struct TlsMariaDb {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsMariaDb {
    /// `None` (and SKIPPED) when mariadbd is not installed.
    fn start() -> Option<Self> {
        let (Ok(install), Ok(server)) = (which("mariadb-install-db"), which("mariadbd")) else {
            eprintln!("SKIPPED: mariadbd / mariadb-install-db are not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let user = if running_as_root() { "root" } else { "" };
        let mut init = Command::new(install);
        init.args([
            "--no-defaults",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .arg(format!("--datadir={}", data.display()));
        if !user.is_empty() {
            init.arg(format!("--user={user}"));
        }
        let out = init.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let certs = repo().join("certs-dev");
        let mut command = Command::new(server);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!(
                "--log-error={}",
                dir.path().join("error.log").display()
            ))
            .arg(format!("--ssl-cert={}", certs.join("server.pem").display()))
            .arg(format!("--ssl-key={}", certs.join("server.key").display()))
            .arg(format!("--ssl-ca={}", certs.join("ca.pem").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if !user.is_empty() {
            command.arg(format!("--user={user}"));
        }
        let child = command.spawn().unwrap();
        let server = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private MariaDB did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/", self.port)
    }
}

impl Drop for TlsMariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// import-nova over TLS: verified against the CA given with --db-ca-file (Debian's MariaDB with
/// the dev server certificate); another CA's certificate is refused, and a server that offers no
/// TLS is refused rather than read in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_nova_reads_over_verified_tls() {
    let Some(server) = TlsMariaDb::start() else {
        return;
    };
    let (url, admin, db) = nova_database_on(&server.url()).await;
    let id = nova_instance(&admin, &db, Some(A), "dGxzLWJsb2I=", false).await;
    let mut daemon = Daemon::start();
    assert!(daemon.terminate());
    let ca = repo().join("certs-dev/ca.pem");
    let foreign = repo().join("certs-dev/foreign-ca.pem");

    let (ok, _, stderr) = import(&daemon, &url, &["--db-ca-file", foreign.to_str().unwrap()]);
    assert!(!ok, "a certificate from another CA was accepted");
    assert!(stderr.contains("Nova database"), "{stderr}");
    if let Ok(plain) = std::env::var("METAPASS_TEST_MYSQL") {
        let (plain_url, plain_admin, plain_db) = nova_database_on(&plain).await;
        let (ok, _, stderr) = import(&daemon, &plain_url, &["--db-ca-file", ca.to_str().unwrap()]);
        assert!(!ok, "a server without TLS was read in plaintext");
        assert!(stderr.to_lowercase().contains("ssl"), "{stderr}");
        drop_nova_database(&plain_admin, &plain_db).await;
    }
    let (ok, out, stderr) = import(&daemon, &url, &["--db-ca-file", ca.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(out.contains("imported 1,"), "{out}");
    daemon.restart();
    assert_eq!(
        daemon.client().get_password(&id, A).await.text(),
        "dGxzLWJsb2I="
    );
}

/// Adds a Nova instance (`deleted` as Nova soft-deletes: the row's id) and its password, split
/// as Nova splits it into 255-character `password_N` rows. Returns the uuid.
async fn nova_instance(
    pool: &mysql_async::Pool,
    db: &str,
    project: Option<&str>,
    password: &str,
    deleted: bool,
) -> String {
    let uuid = new_instance();
    let mut conn = pool.get_conn().await.unwrap();
    conn.exec_drop(
        format!("INSERT INTO {db}.instances (uuid, project_id, created_at) VALUES (?, ?, NOW())"),
        (&uuid, project),
    )
    .await
    .unwrap();
    if deleted {
        conn.exec_drop(
            format!("UPDATE {db}.instances SET deleted = id, deleted_at = NOW() WHERE uuid = ?"),
            (&uuid,),
        )
        .await
        .unwrap();
    }
    let chars: Vec<char> = password.chars().collect();
    for (i, chunk) in chars.chunks(255).enumerate() {
        let value: String = chunk.iter().collect();
        conn.exec_drop(
            format!(
                "INSERT INTO {db}.instance_system_metadata (instance_uuid, `key`, value, created_at)
                 VALUES (?, ?, ?, NOW())"
            ),
            (&uuid, format!("password_{i}"), value),
        )
        .await
        .unwrap();
    }
    uuid
}

/// Runs `metapass import-nova` with `args`; returns (success, stdout, stderr).
fn import(daemon: &Daemon, url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["import-nova", "--db", url, "--config"])
        .arg(&daemon.config)
        .arg("--data-dir")
        .arg(daemon.data_dir())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_nova_takes_over_every_live_password_once() {
    let Some((url, admin, db)) = fresh_nova_database().await else {
        return;
    };
    // Nova's blobs are base64 of an RSA-encrypted password: up to 684 characters for 4096 bits.
    let long: String = "QUJD".repeat(171);
    let with_password = nova_instance(&admin, &db, Some(A), &long, false).await;
    let short = nova_instance(&admin, &db, Some(A), "c2hvcnQtYmxvYg==", false).await;
    let empty = nova_instance(&admin, &db, Some(A), "", false).await;
    let _deleted = nova_instance(&admin, &db, Some(A), "ZGVsZXRlZA==", true).await;
    let cleared = nova_instance(&admin, &db, Some(A), "b2xkLWJsb2I=", false).await;
    let mut conn = admin.get_conn().await.unwrap();
    conn.exec_drop(
        format!("UPDATE {db}.instance_system_metadata SET deleted = id WHERE instance_uuid = ?"),
        (&cleared,),
    )
    .await
    .unwrap();
    drop(conn);
    let _no_project = nova_instance(&admin, &db, None, "bm8tcHJvamVjdA==", false).await;
    let _control = nova_instance(&admin, &db, Some(A), "bad\u{1}blob", false).await;
    let elsewhere = nova_instance(&admin, &db, Some(A), "ZWxzZXdoZXJl", false).await;

    let mut daemon = Daemon::start();
    let client = daemon.client();
    client.register(&elsewhere, "project-b").await;

    // A dry run may run beside the daemon; the real import may not (one audit writer).
    let (ok, dry, stderr) = import(&daemon, &url, &["--dry-run", "--batch", "3"]);
    assert!(ok, "{stderr}");
    assert!(
        dry.contains(
            "would import 2, already present 0, skipped deleted 1, empty 2, conflicts 1, invalid 2"
        ),
        "{dry}"
    );
    // The dry run registered and sealed nothing: the guest still finds no password.
    let nothing = client.get_password(&with_password, A).await;
    assert_eq!((nothing.status, nothing.body.len()), (200, 0));
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &nothing.request_id())["unmapped"]["reason"],
        "not_yet_registered"
    );
    let (ok, _, stderr) = import(&daemon, &url, &[]);
    assert!(!ok, "imported beside a running daemon");
    assert!(
        stderr.contains("in use by another metapass process"),
        "{stderr}"
    );

    assert!(daemon.terminate());
    let (ok, first, stderr) = import(&daemon, &url, &["--batch", "3"]);
    assert!(ok, "{stderr}");
    assert!(
        first.contains(
            "imported 2, already present 0, skipped deleted 1, empty 2, conflicts 1, invalid 2"
        ),
        "{first}"
    );
    for text in [&first, &stderr, &dry] {
        assert!(
            !text.contains("QUJD") && !text.contains("c2hvcnQ"),
            "a password printed"
        );
    }
    // Idempotent: a second run changes nothing and says so.
    let (ok, second, stderr) = import(&daemon, &url, &[]);
    assert!(ok, "{stderr}");
    assert!(
        second.contains(
            "imported 0, already present 2, skipped deleted 1, empty 2, conflicts 1, invalid 2"
        ),
        "{second}"
    );
    // Resuming after the last id: nothing left.
    let last_id = second.rsplit("last_id ").next().unwrap().trim().to_owned();
    let (ok, resumed, _) = import(&daemon, &url, &["--after", &last_id]);
    assert!(ok);
    assert!(
        resumed.contains("imported 0, already present 0"),
        "{resumed}"
    );

    daemon.restart();
    let client = daemon.client();
    assert_eq!(client.get_password(&with_password, A).await.text(), long);
    assert_eq!(
        client.get_password(&short, A).await.text(),
        "c2hvcnQtYmxvYg=="
    );
    let nothing = client.get_password(&empty, A).await;
    assert_eq!((nothing.status, nothing.body.len()), (200, 0));
    // The owner reads it with the compute API, and the guest of an empty one may post.
    let owner = client
        .get(
            &format!("/v2.1/servers/{short}/os-server-password"),
            &[("x-auth-token", TOKEN_A)],
        )
        .await;
    assert_eq!(owner.json()["password"], "c2hvcnQtYmxvYg==");
    assert_eq!(client.post_password(&empty, A, "bmV3").await.status, 200);

    // Every imported record is an audited import event; no password is in the log.
    let events = daemon.audit_events();
    let imported: Vec<&Value> = events
        .iter()
        .filter(|e| e["api"]["operation"] == "import:password" && e["status_id"] == 1)
        .collect();
    assert_eq!(imported.len(), 4, "two imported, then two found present");
    assert!(
        imported
            .iter()
            .all(|e| e["unmapped"]["secret_fingerprint"].is_string())
    );
    let schema = schema_validator();
    for event in &events {
        assert!(schema.is_valid(event), "{event}");
    }
    assert_valid_ocsf(&daemon);
    for file in metapass::audit::review::files_of(&daemon.audit_dir()).unwrap() {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!text.contains("QUJDQUJD") && !text.contains("c2hvcnQtYmxvYg"));
    }
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");

    // A password on the command line is refused.
    let with_password_url = url.replacen("root@", "root:secret@", 1);
    let (ok, _, stderr) = import(&daemon, &with_password_url, &["--dry-run"]);
    assert!(!ok && stderr.contains("--db-password-file"), "{stderr}");
    drop_nova_database(&admin, &db).await;
}

/// Nova's notification as oslo.messaging sends it: the 2.0 envelope around the message.
fn oslo_notification(event_type: &str, data: Value) -> Vec<u8> {
    let message = json!({
        "message_id": uuid::Uuid::new_v4().to_string(),
        "publisher_id": "nova-compute:compute-1",
        "event_type": event_type,
        "priority": "INFO",
        "payload": {
            "nova_object.name": "InstanceActionPayload",
            "nova_object.namespace": "nova",
            "nova_object.version": "1.8",
            "nova_object.data": data,
        },
        "timestamp": "2026-11-23 18:00:00.000000",
    });
    serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": message.to_string()}))
        .unwrap()
}

struct Broker {
    channel: lapin::Channel,
    exchange: String,
}

impl Broker {
    /// Connects and declares the exchange as oslo.messaging does (topic, not durable).
    async fn connect(amqp: &str, exchange: &str) -> Self {
        let connection = Connection::connect(amqp, ConnectionProperties::default())
            .await
            .expect("connect to METAPASS_TEST_AMQP");
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            channel,
            exchange: exchange.to_owned(),
        }
    }

    async fn publish(&self, body: Vec<u8>) {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                "versioned_notifications.info".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Waits up to 10 s for `check` to hold.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sync_events(daemon: &Daemon, operation: &str) -> Vec<Value> {
    daemon
        .audit_events()
        .into_iter()
        .filter(|e| e["api"]["operation"] == operation)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nova_notifications_keep_the_registry_true() {
    let Ok(amqp) = std::env::var("METAPASS_TEST_AMQP") else {
        eprintln!("SKIPPED: METAPASS_TEST_AMQP is not set");
        return;
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("nova-test-{tag}");
    let queue = format!("metapass-test-{tag}");
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), |text| {
        format!(
            "{text}\n[nova_notifications]\nenabled = true\nurl = {amqp:?}\nexchange = {exchange:?}\nqueue = {queue:?}\n"
        )
    });
    let mut broker = Broker::connect(&amqp, &exchange).await;
    let daemon = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    assert!(daemon.log_shows(&["consuming Nova notifications"]));
    let client = daemon.client();
    let admin_get = |id: String| {
        let client = client.clone();
        async move {
            client
                .get(
                    &format!("/admin/v1/instances/{id}"),
                    &[("x-auth-token", ADMIN_TOKEN)],
                )
                .await
        }
    };

    // instance.create.end registers; delivered twice (at least once), it changes nothing more.
    let id = new_instance();
    let created = json!({"uuid": id, "tenant_id": A, "state": "active"});
    broker
        .publish(oslo_notification("instance.create.end", created.clone()))
        .await;
    eventually("the registration", || async {
        admin_get(id.clone()).await.status == 200
    })
    .await;
    assert_eq!(admin_get(id.clone()).await.json()["project_id"], A);
    broker
        .publish(oslo_notification("instance.create.end", created))
        .await;
    eventually("the second create event", || async {
        sync_events(&daemon, "sync:create").len() == 2
    })
    .await;

    // instance.rebuild.start clears the password, so the rebuilt guest can post again.
    assert_eq!(client.post_password(&id, A, "first").await.status, 200);
    assert_eq!(client.post_password(&id, A, "second").await.status, 409);
    broker
        .publish(oslo_notification(
            "instance.rebuild.start",
            json!({"uuid": id, "tenant_id": A}),
        ))
        .await;
    eventually("the clear", || async {
        client.get_password(&id, A).await.body.is_empty()
    })
    .await;
    assert_eq!(
        client.post_password(&id, A, "after-rebuild").await.status,
        200
    );

    // Malformed messages are audited and dropped; other events are ignored; nothing stops.
    broker.publish(b"not json at all".to_vec()).await;
    broker
        .publish(oslo_notification(
            "instance.create.end",
            json!({"uuid": id}),
        ))
        .await;
    broker
        .publish(oslo_notification(
            "instance.power_off.end",
            json!({"uuid": id}),
        ))
        .await;
    eventually("two malformed events", || async {
        sync_events(&daemon, "sync:malformed").len() == 2
    })
    .await;
    let malformed = sync_events(&daemon, "sync:malformed");
    assert_eq!(malformed[0]["unmapped"]["reason"], "body_invalid");
    assert!(
        malformed[1]["message"]
            .as_str()
            .unwrap()
            .contains("tenant_id")
    );

    // The broker drops every connection: the consumer reconnects (with backoff) and goes on.
    let closed = Command::new("rabbitmqctl")
        .args(["close_all_connections", "metapass test: forced reconnect"])
        .output();
    if closed.is_ok_and(|o| o.status.success()) {
        assert!(daemon.log_shows(&["reconnecting"]), "{}", daemon.log());
        broker = Broker::connect(&amqp, &broker.exchange).await;
        eventually("the consumer to come back", || async {
            daemon.log().matches("consuming Nova notifications").count() >= 2
        })
        .await;
    } else {
        eprintln!("SKIPPED (part): rabbitmqctl could not close the broker's connections");
    }

    // instance.delete.end forgets the instance and its password.
    broker
        .publish(oslo_notification(
            "instance.delete.end",
            json!({"uuid": id, "tenant_id": A}),
        ))
        .await;
    eventually("the deletion", || async {
        admin_get(id.clone()).await.status == 404
    })
    .await;
    // Purged with its password: the guest finds none.
    let purged = client.get_password(&id, A).await;
    assert_eq!((purged.status, purged.body.len()), (200, 0));

    // A create notification for the deleted id with another tenant does not move it there: the
    // tombstone refuses, audited as a conflict, and nothing is registered.
    let creates_before = sync_events(&daemon, "sync:create").len();
    broker
        .publish(oslo_notification(
            "instance.create.end",
            json!({"uuid": id, "tenant_id": "project-b"}),
        ))
        .await;
    eventually("the refused re-registration", || async {
        sync_events(&daemon, "sync:create").len() > creates_before
    })
    .await;
    let refused = sync_events(&daemon, "sync:create").pop().unwrap();
    assert_eq!(refused["status_code"], "409", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("deleted from another project")
    );
    assert_eq!(admin_get(id.clone()).await.status, 404);

    let schema = schema_validator();
    let events = daemon.audit_events();
    for event in events.iter().filter(|e| {
        e["api"]["operation"]
            .as_str()
            .is_some_and(|op| op.starts_with("sync:"))
    }) {
        assert!(schema.is_valid(event), "{event}");
        assert_eq!(event["actor"]["user"]["type"], "System");
    }
    assert_eq!(sync_events(&daemon, "sync:rebuild").len(), 1);
    assert_eq!(sync_events(&daemon, "sync:delete").len(), 1);
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
    assert_valid_ocsf(&daemon);
    let _ = broker
        .channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}

#[tokio::test]
async fn an_unknown_instance_is_registered_at_once_from_novas_database() {
    let Some((url, pool, db)) = fresh_nova_database().await else {
        return;
    };
    let live = nova_instance(&pool, &db, Some(A), "", false).await;
    let deleted = nova_instance(&pool, &db, Some(A), "", true).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), |text| {
        format!("{text}\n[nova_lookup]\nurl = \"{url}\"\ntimeout_ms = 5000\n")
    });
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    // The guest's first request: no notification has arrived, yet its post succeeds at once.
    assert_eq!(client.post_password(&live, A, "blob").await.status, 200);
    assert_eq!(client.get_password(&live, A).await.text(), "blob");
    // A tenant the lookup contradicts is refused like any foreign tenant.
    let other = nova_instance(&pool, &db, Some("project-b"), "", false).await;
    assert_eq!(client.post_password(&other, A, "x").await.status, 404);
    // Deleted in Nova, or unknown to it: not registered; the guest is told to retry.
    assert_eq!(client.post_password(&deleted, A, "x").await.status, 503);
    assert_eq!(
        client.post_password(&new_instance(), A, "x").await.status,
        503
    );

    let events = daemon.audit_events();
    let lookups: Vec<_> = events
        .iter()
        .filter(|e| e["api"]["operation"] == "registry:lookup")
        .collect();
    assert_eq!(lookups.len(), 2, "{lookups:#?}");
    assert_eq!(lookups[0]["resources"][0]["uid"], live.as_str());
    assert_eq!(lookups[0]["resources"][0]["owner"]["account"]["uid"], A);
    assert_eq!(lookups[0]["unmapped"]["caller_kind"], "system");
    assert_eq!(
        lookups[1]["resources"][0]["owner"]["account"]["uid"],
        "project-b"
    );
    // Nova's database was only read.
    let mut conn = pool.get_conn().await.unwrap();
    let rows: Option<u64> = conn
        .query_first(format!("SELECT COUNT(*) FROM {db}.instances"))
        .await
        .unwrap();
    assert_eq!(rows, Some(3));
    let (ok, report) = daemon.verify_audit();
    assert!(ok, "{report}");
    assert_valid_ocsf(&daemon);
    drop(daemon); // its lookup sessions first
    drop_nova_database(&pool, &db).await;
}

#[tokio::test]
async fn an_unreachable_nova_database_only_means_not_registered_yet() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = config_with(dir.path(), |text| {
        format!(
            "{text}\n[nova_lookup]\nurl = \"mysql://root@127.0.0.1:{port}/nova\"\ntimeout_ms = 500\n"
        )
    });
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    let id = new_instance();
    let read = client.get_password(&id, A).await;
    assert_eq!((read.status, read.body.len()), (200, 0));
    assert_eq!(client.post_password(&id, A, "x").await.status, 503);
    client.register(&id, A).await;
    assert_eq!(client.post_password(&id, A, "x").await.status, 200);
}
