//! The store's promises, checked from outside: one winner of a race, no plaintext on disk,
//! tampering detected, the body read through a hard limit, one audit event per request.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "project-a";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_concurrent_posts_exactly_one_wins_and_its_value_is_stored() {
    let daemon = Daemon::start();
    let client = daemon.client();
    for _round in 0..3 {
        let id = new_instance();
        client.register(&id, A).await;
        let posts = (0..48).map(|i| {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move {
                (
                    i,
                    client
                        .post_password(&id, A, format!("candidate-{i}"))
                        .await
                        .status,
                )
            })
        });
        let results: Vec<(usize, u16)> = futures_util::future::join_all(posts)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let winners: Vec<usize> = results
            .iter()
            .filter(|(_, s)| *s == 200)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert!(
            results.iter().all(|(_, s)| *s == 200 || *s == 409),
            "{results:?}"
        );
        assert_eq!(
            client.get_password(&id, A).await.text(),
            format!("candidate-{}", winners[0])
        );
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn the_plaintext_never_touches_disk() {
    let mut daemon = Daemon::start();
    let client = daemon.client();
    let marker = "PLAINTEXT-MARKER-7f3a9c1e-do-not-store";
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = new_instance();
        client.register(&id, A).await;
        assert_eq!(client.post_password(&id, A, marker).await.status, 200);
        ids.push(id);
    }
    for id in &ids {
        assert_eq!(client.get_password(id, A).await.text(), marker);
    }
    // Grep while running (WAL and shm present) and after a clean stop (checkpointed).
    for stage in ["running", "stopped"] {
        let files = files_under(&daemon.data_dir());
        assert!(
            files.iter().any(|f| f.ends_with("metapass.sqlite3")),
            "{files:?}"
        );
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            for needle in [marker.as_bytes(), &marker.as_bytes()[..16]] {
                assert!(
                    !contains(&bytes, needle),
                    "{stage}: plaintext found in {}",
                    file.display()
                );
            }
        }
        if stage == "running" {
            assert!(daemon.terminate(), "clean shutdown");
        }
    }
    // Nor the operational log.
    let log = daemon.log();
    assert!(log.contains("metapass serving"), "the log was captured");
    assert!(!log.contains(marker), "plaintext in the operational log");
}

fn chunks_of(db: &std::path::Path, id: &str) -> Vec<(String, Vec<u8>)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT key, value FROM instance_metadata WHERE instance_id = ?1 ORDER BY key")
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn set_chunk(db: &std::path::Path, id: &str, key: &str, value: &[u8]) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute(
        "UPDATE instance_metadata SET value = ?3 WHERE instance_id = ?1 AND key = ?2",
        rusqlite::params![id, key, value],
    )
    .unwrap();
}

async fn assert_integrity_failure(daemon: &Daemon, client: &Client, id: &str, case: &str) {
    let reply = client.get_password(id, A).await;
    assert_eq!(reply.status, 500, "{case}: {}", reply.text());
    assert!(reply.error_message().contains("integrity"), "{case}");
    let events = daemon.audit_events();
    let event = event_for(&events, &reply.request_id());
    assert_eq!(event["unmapped"]["reason"], "integrity", "{case}");
    assert_eq!(event["severity"], "Critical", "{case}");
}

#[tokio::test]
async fn swapped_missing_and_foreign_chunks_fail_closed_with_an_integrity_event() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let db = daemon.db_path();
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = new_instance();
        client.register(&id, A).await;
        assert_eq!(
            client
                .post_password(&id, A, format!("secret-{i}"))
                .await
                .status,
            200
        );
        ids.push(id);
    }
    let original = chunks_of(&db, &ids[0]);
    assert_eq!(
        original.len(),
        5,
        "a sealed password is five 255-byte chunks"
    );
    assert!(original.iter().all(|(_, v)| v.len() <= 255));

    // 1. Two chunks of one instance swapped.
    set_chunk(&db, &ids[0], "password_1", &original[2].1);
    set_chunk(&db, &ids[0], "password_2", &original[1].1);
    assert_integrity_failure(&daemon, &client, &ids[0], "swapped within").await;

    // 2. A chunk taken from another instance.
    let foreign = chunks_of(&db, &ids[2]);
    set_chunk(&db, &ids[1], "password_3", &foreign[3].1);
    assert_integrity_failure(&daemon, &client, &ids[1], "foreign chunk").await;

    // 3. The whole record of another instance copied over.
    for (key, value) in &foreign {
        set_chunk(&db, &ids[3], key, value);
    }
    assert_integrity_failure(&daemon, &client, &ids[3], "foreign record").await;

    // 4. A missing chunk.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "DELETE FROM instance_metadata WHERE instance_id = ?1 AND key = 'password_4'",
        [&ids[4]],
    )
    .unwrap();
    assert_integrity_failure(&daemon, &client, &ids[4], "missing chunk").await;

    // 5. One flipped bit.
    let mut flipped = chunks_of(&db, &ids[5])[0].1.clone();
    flipped[40] ^= 1;
    set_chunk(&db, &ids[5], "password_0", &flipped);
    assert_integrity_failure(&daemon, &client, &ids[5], "flipped bit").await;

    // 6. Chunks present while no password is recorded (written behind metapass's back).
    let planted = new_instance();
    client.register(&planted, A).await;
    conn.execute(
        "INSERT INTO instance_metadata (instance_id, key, value) VALUES (?1, 'password_0', x'00')",
        [&planted],
    )
    .unwrap();
    assert_integrity_failure(&daemon, &client, &planted, "planted chunk").await;

    // Untouched neighbours still read fine.
    let ok = new_instance();
    client.register(&ok, A).await;
    client.post_password(&ok, A, "fine").await;
    assert_eq!(client.get_password(&ok, A).await.text(), "fine");
}

fn post_head(id: &str, extra: &str) -> String {
    format!(
        "POST /openstack/latest/password HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Instance-ID: {id}\r\nX-Tenant-ID: {A}\r\nX-Instance-ID-Signature: {}\r\n{extra}\r\n",
        sign(id)
    )
}

#[tokio::test]
async fn a_declared_oversize_body_is_refused_before_it_is_sent() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, A).await;
    // Claim 10 MB, send only the headers: the answer comes without waiting for a byte of body.
    let mut stream = client.connect().await;
    stream
        .write_all(post_head(&id, "Content-Length: 10000000\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answered without the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(raw_status(&buf[..n]), Some(400), "{text}");
    assert!(text.contains("Request is too large."));
    assert!(text.to_ascii_lowercase().contains("connection: close"));
    let events = daemon.audit_events();
    let last = events.last().unwrap();
    assert_eq!(last["unmapped"]["reason"], "body_too_large");
    assert_eq!(last["unmapped"]["body_bytes"], 0);
}

#[tokio::test]
async fn a_lying_content_length_cannot_smuggle_a_longer_body() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, A).await;
    // Declares 4 bytes, sends more: only 4 are the body; the rest is a (bad) next request.
    let request = format!(
        "{}abcdXXXXXXXXXXXXXXXXXXXXXX\r\n\r\n",
        post_head(&id, "Content-Length: 4\r\n")
    );
    let out = client.raw(request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(
        raw_status(&out),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(client.get_password(&id, A).await.text(), "abcd");
}

#[tokio::test]
async fn a_chunked_body_stops_at_the_1021st_byte() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, A).await;
    let mut stream = client.connect().await;
    stream
        .write_all(post_head(&id, "Transfer-Encoding: chunked\r\n").as_bytes())
        .await
        .unwrap();
    // Stream up to 10 MB in 8 KiB chunks while reading whatever comes back.
    let chunk = format!("2000\r\n{}\r\n", "a".repeat(0x2000));
    let (mut reader, mut writer) = tokio::io::split(stream);
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < 10 * 1024 * 1024 {
            if writer.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 0x2000;
        }
        sent
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer)).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("sender stops")
        .unwrap();
    assert_eq!(
        raw_status(&answer),
        Some(400),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(String::from_utf8_lossy(&answer).contains("Request is too large."));
    assert!(
        sent < 10 * 1024 * 1024,
        "the daemon must stop reading, not drain 10 MB (sent {sent})"
    );
    let events = daemon.audit_events();
    let last = events.last().unwrap();
    assert_eq!(last["unmapped"]["reason"], "body_too_large");
    assert_eq!(
        last["unmapped"]["body_bytes"], 1021,
        "the handler stops at the 1021st byte"
    );
    assert_eq!(client.get_password(&id, A).await.body.len(), 0);
}

#[tokio::test]
async fn bogus_chunk_sizes_are_400() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, A).await;
    for body in [
        "zz\r\nabc\r\n0\r\n\r\n",
        "-1\r\nabc\r\n0\r\n\r\n",
        "ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    ] {
        let request = format!("{}{body}", post_head(&id, "Transfer-Encoding: chunked\r\n"));
        let out = client.raw(request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(
            raw_status(&out),
            Some(400),
            "{body:?}: {}",
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!(client.get_password(&id, A).await.body.len(), 0);
}

#[tokio::test]
async fn every_request_yields_exactly_one_audit_event_and_the_chain_verifies() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, A).await;
    let sig = sign(&id);
    let mut ids = Vec::new();
    let mut requests = 1; // the registration
    for _ in 0..3 {
        ids.push(client.get_password(&id, A).await.request_id());
        ids.push(client.post_password(&id, A, "pw").await.request_id());
        ids.push(client.get_password(&id, "project-b").await.request_id());
        ids.push(
            client
                .get(
                    "/openstack/latest/password",
                    &[
                        ("x-instance-id", &id),
                        ("x-tenant-id", A),
                        ("x-instance-id-signature", &sig[1..]),
                    ],
                )
                .await
                .request_id(),
        );
        ids.push(
            client
                .get("/openstack/latest/password", &[])
                .await
                .request_id(),
        );
        ids.push(
            client
                .send(http::Method::DELETE, "/openstack/latest/password", &[], "")
                .await
                .request_id(),
        );
        ids.push(client.get("/admin/v1/instances/x", &[]).await.request_id());
        ids.push(client.get("/readyz", &[]).await.request_id());
        ids.push(client.get("/../../etc/passwd", &[]).await.request_id());
        requests += 9;
    }
    let events = daemon.request_events();
    assert_eq!(events.len(), requests, "one event per request");
    for id in &ids {
        event_for(&events, id);
    }
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
    // The chain also holds the daemon's own startup event (keys:load).
    let all = requests + 1;
    assert!(out.contains(&format!("OK: {all} events")), "{out}");
}

/// An attacker with write access to the database moves an instance to their own project:
/// `UPDATE instances SET project_id = 'project-b'`. The seal binds the owning project, so the
/// moved record opens for nobody: project-b's owner and a guest claiming project-b get the
/// integrity failure (500, audited Critical), project-a's owner now gets the missing-instance 404,
/// and the password is in no answer.
#[tokio::test]
async fn a_project_edited_in_the_database_releases_nothing() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let db = daemon.db_path();
    let id = new_instance();
    client.register(&id, A).await;
    let secret = "moved-project-secret-5f1c";
    assert_eq!(client.post_password(&id, A, secret).await.status, 200);
    let owner_path = format!("/v2.1/servers/{id}/os-server-password");
    let before = client.get(&owner_path, &[("x-auth-token", TOKEN_A)]).await;
    assert_eq!(before.status, 200);
    assert!(before.text().contains(secret));

    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let moved = conn
        .execute(
            "UPDATE instances SET project_id = 'project-b' WHERE instance_id = ?1",
            [&id],
        )
        .unwrap();
    assert_eq!(moved, 1);
    daemon.outlast_read_cache().await;

    let as_b = client.get(&owner_path, &[("x-auth-token", TOKEN_B)]).await;
    assert_eq!(as_b.status, 500, "{}", as_b.text());
    assert!(as_b.error_message().contains("integrity"));
    assert!(!as_b.text().contains(secret));
    let events = daemon.audit_events();
    let event = event_for(&events, &as_b.request_id());
    assert_eq!(event["unmapped"]["reason"], "integrity");
    assert_eq!(event["severity"], "Critical");

    let guest_b = client.get_password(&id, "project-b").await;
    assert_eq!(guest_b.status, 500, "{}", guest_b.text());
    assert!(!guest_b.text().contains(secret));

    let as_a = client.get(&owner_path, &[("x-auth-token", TOKEN_A)]).await;
    assert_eq!(as_a.status, 404, "{}", as_a.text());
    assert!(!as_a.text().contains(secret));
}

/// The read cache (src/store/read_cache.rs) follows metapass's own writes at once: a record read
/// (and cached) a moment ago is never answered after a clear, and the next password is answered
/// as soon as it is set.
#[tokio::test]
async fn a_cached_record_never_outlives_a_clear_or_hides_the_next_password() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, A).await;
    let owner_path = format!("/v2.1/servers/{id}/os-server-password");
    for round in 0..3 {
        let secret = format!("cached-round-{round}-secret");
        assert_eq!(
            client.post_password(&id, A, secret.clone()).await.status,
            200
        );
        // Twice: the second read is the cached one.
        for _ in 0..2 {
            let read = client.get_password(&id, A).await;
            assert_eq!(read.status, 200, "{}", read.text());
            assert_eq!(read.text(), secret);
        }
        let cleared = client
            .send(
                http::Method::DELETE,
                &owner_path,
                &[("x-auth-token", TOKEN_A)],
                "",
            )
            .await;
        assert_eq!(cleared.status, 204, "{}", cleared.text());
        let after = client.get_password(&id, A).await;
        assert_eq!(after.status, 200);
        assert_eq!(
            after.text(),
            "",
            "a cleared password must not be answered from the cache"
        );
    }
}

/// Runs `metapass audit reconcile` on the daemon's store and log; returns (exit code, stdout).
fn reconcile(daemon: &Daemon) -> (i32, String) {
    run_metapass([
        "audit".as_ref(),
        "reconcile".as_ref(),
        "--config".as_ref(),
        daemon.config.as_os_str(),
        "--data-dir".as_ref(),
        daemon.data_dir().as_os_str(),
    ])
}

/// An attacker with write access to the database bends it in ways the seal cannot see: an
/// instance's whole older record restored (row, version, key id and chunks, all consistent),
/// a row planted, an instance moved, an instance deleted. `audit reconcile` replays the log
/// and names every one of them; on an untouched store it agrees.
#[tokio::test]
async fn audit_reconcile_names_rolled_back_planted_moved_and_deleted_records() {
    let mut daemon = Daemon::start();
    let client = daemon.client();
    let owner = |id: &str| format!("/v2.1/servers/{id}/os-server-password");
    let ids: Vec<String> = (0..4).map(|_| new_instance()).collect();
    for (i, id) in ids.iter().enumerate() {
        client.register(id, A).await;
        assert_eq!(
            client
                .post_password(id, A, format!("first-{i}"))
                .await
                .status,
            200
        );
    }
    let rolled_back = &ids[0];
    let db = daemon.db_path();
    let old_chunks = chunks_of(&db, rolled_back);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let old_row: (i64, Option<i64>) = conn
        .query_row(
            "SELECT password_version, password_key_id FROM instances WHERE instance_id = ?1",
            [rolled_back],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let clear = client
        .send(
            http::Method::DELETE,
            &owner(rolled_back),
            &[("x-auth-token", TOKEN_A)],
            "",
        )
        .await;
    assert_eq!(clear.status, 204);
    assert_eq!(
        client.post_password(rolled_back, A, "second").await.status,
        200
    );
    assert!(daemon.terminate());
    let (code, out) = reconcile(&daemon);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: the store's 4 instances agree"), "{out}");

    // 1. The whole older record restored: consistent, so it opens and is served as current.
    conn.execute(
        "UPDATE instances SET password_version = ?2, password_key_id = ?3 WHERE instance_id = ?1",
        rusqlite::params![rolled_back, old_row.0, old_row.1],
    )
    .unwrap();
    conn.execute(
        "DELETE FROM instance_metadata WHERE instance_id = ?1",
        [rolled_back],
    )
    .unwrap();
    for (key, value) in &old_chunks {
        conn.execute(
            "INSERT INTO instance_metadata (instance_id, key, value) VALUES (?1, ?2, ?3)",
            rusqlite::params![rolled_back, key, value],
        )
        .unwrap();
    }
    // 2. A row planted without any audited registration.
    let planted = new_instance();
    conn.execute(
        "INSERT INTO instances (instance_id, project_id, created_at, updated_at) VALUES (?1, 'project-a', 0, 0)",
        [&planted],
    )
    .unwrap();
    // 3. Moved, 4. deleted.
    conn.execute(
        "UPDATE instances SET project_id = 'project-b' WHERE instance_id = ?1",
        [&ids[1]],
    )
    .unwrap();
    conn.execute("DELETE FROM instances WHERE instance_id = ?1", [&ids[2]])
        .unwrap();
    drop(conn);

    daemon.restart();
    let served = daemon.client().get_password(rolled_back, A).await;
    assert_eq!(
        served.text(),
        "first-0",
        "the seal alone cannot tell a consistent old record from the current one"
    );
    assert!(daemon.terminate());
    let (code, out) = reconcile(&daemon);
    assert_eq!(code, 1, "{out}");
    for (id, what) in [
        (rolled_back.as_str(), "rolled back"),
        (planted.as_str(), "planted"),
        (ids[1].as_str(), "moved"),
        (ids[2].as_str(), "deleted behind metapass's back"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("DIFFERS") && l.contains(id) && l.contains(what)),
            "{id} {what}:\n{out}"
        );
    }
    assert!(
        !out.contains(&ids[3]),
        "the untouched instance agrees: {out}"
    );
    assert!(out.contains("FAILED: 4 instances differ"), "{out}");
}
