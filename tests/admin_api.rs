//! The admin API (instance registry), row by row.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use http::Method;

fn path(id: &str) -> String {
    format!("/admin/v1/instances/{id}")
}

async fn put(client: &Client, id: &str, token: &str, body: &str) -> Reply {
    client
        .send(
            Method::PUT,
            &path(id),
            &[("x-auth-token", token)],
            body.to_owned(),
        )
        .await
}

#[tokio::test]
async fn register_show_and_delete() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    let admin = [("x-auth-token", ADMIN_TOKEN)];

    let created = put(&client, &id, ADMIN_TOKEN, r#"{"project_id": "project-a"}"#).await;
    assert_eq!(created.status, 201);
    assert_eq!(
        created.json(),
        serde_json::json!({"instance_id": id, "project_id": "project-a"})
    );
    let again = put(&client, &id, ADMIN_TOKEN, r#"{"project_id": "project-a"}"#).await;
    assert_eq!(again.status, 200);
    let elsewhere = put(&client, &id, ADMIN_TOKEN, r#"{"project_id": "project-b"}"#).await;
    assert_eq!(elsewhere.status, 409);
    assert!(elsewhere.error_message().contains("another project"));

    let shown = client.get(&path(&id), &admin).await;
    assert_eq!(shown.status, 200);
    assert_eq!(
        shown.json(),
        serde_json::json!({"instance_id": id, "project_id": "project-a", "password_set": false})
    );
    client.post_password(&id, "project-a", "pw").await;
    assert_eq!(
        client.get(&path(&id), &admin).await.json()["password_set"],
        true
    );

    let deleted = client.send(Method::DELETE, &path(&id), &admin, "").await;
    assert_eq!(deleted.status, 204);
    assert!(deleted.body.is_empty());
    assert_eq!(client.get(&path(&id), &admin).await.status, 404);
    assert_eq!(
        client
            .send(Method::DELETE, &path(&id), &admin, "")
            .await
            .status,
        404
    );
    // Purged: the guest finds no password (and could post only after a new registration).
    let after = client.get_password(&id, "project-a").await;
    assert_eq!((after.status, after.body.len()), (200, 0));

    let events = daemon.audit_events();
    let event = event_for(&events, &created.request_id());
    assert_eq!(event["api"]["operation"], "instance:register");
    assert_eq!(event["activity_id"], 1);
    assert_eq!(event["actor"]["user"]["type"], "Admin");
    assert_eq!(event["actor"]["user"]["name"], "dev-admin");
    assert_eq!(
        event["actor"]["authorizations"][0]["policy"]["desc"],
        "instance:register: role:admin project:any"
    );
    let credential = event["actor"]["user"]["credential_uid"].as_str().unwrap();
    assert!(credential.starts_with("hmac-sha256:"));
    let raw_log: String = std::fs::read_dir(daemon.audit_dir())
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        !raw_log.contains(ADMIN_TOKEN),
        "tokens never reach the audit log"
    );
    assert_eq!(event_for(&events, &deleted.request_id())["activity_id"], 4);
}

#[tokio::test]
async fn tokens_are_required_and_checked() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    for headers in [
        vec![],
        vec![("x-auth-token", "wrong")],
        vec![("x-auth-token", "")],
        vec![("x-auth-token", "dev-admin-tokenX")],
        vec![("x-auth-token", "DEV-ADMIN-TOKEN")],
        vec![("x-auth-token", ADMIN_TOKEN), ("x-auth-token", ADMIN_TOKEN)],
    ] {
        let reply = client
            .send(Method::PUT, &path(&id), &headers, r#"{"project_id": "p"}"#)
            .await;
        assert_eq!(reply.status, 401, "{headers:?}");
        assert!(!reply.error_message().is_empty());
    }
    // Project tokens may not register or delete, whatever the instance: 403 that reveals nothing.
    let registered = new_instance();
    client.register(&registered, "project-a").await;
    for target in [&id, &registered] {
        assert_eq!(
            put(&client, target, TOKEN_A, r#"{"project_id": "project-a"}"#)
                .await
                .status,
            403
        );
        let delete = client
            .send(
                Method::DELETE,
                &path(target),
                &[("x-auth-token", TOKEN_A)],
                "",
            )
            .await;
        assert_eq!(delete.status, 403);
    }
    // Showing follows instance:show: the own project sees it, another project gets the 404 of a
    // missing instance.
    assert_eq!(
        client
            .get(&path(&registered), &[("x-auth-token", READER_A)])
            .await
            .status,
        200
    );
    let other = client
        .get(&path(&registered), &[("x-auth-token", TOKEN_B)])
        .await;
    let missing = client
        .get(&path(&new_instance()), &[("x-auth-token", TOKEN_B)])
        .await;
    assert_eq!((other.status, missing.status), (404, 404));
    assert_eq!(other.error_message(), missing.error_message());
}

#[tokio::test]
async fn bad_input_is_400_and_stores_nothing() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    for bad_id in [
        "not-a-uuid",
        "8A2E6D4C-0B1F-4C53-9A4E-2F1D3C5B7A90",
        "%2e%2e",
    ] {
        let reply = put(
            &client,
            bad_id,
            ADMIN_TOKEN,
            r#"{"project_id": "project-a"}"#,
        )
        .await;
        assert_eq!(reply.status, 400, "{bad_id}");
        assert!(reply.error_message().contains("UUID"));
    }
    for body in [
        "",
        "not json",
        "{}",
        r#"{"project_id": 5}"#,
        r#"{"project_id": "project-a", "extra": 1}"#,
        r#"{"project_id": "has space"}"#,
        r#"{"project_id": ""}"#,
        &format!(r#"{{"project_id": "{}"}}"#, "p".repeat(65)),
        &format!(r#"{{"project_id": "{}"}}"#, "p".repeat(5000)),
    ] {
        let reply = put(&client, &id, ADMIN_TOKEN, body).await;
        assert_eq!(reply.status, 400, "{body:.60}");
        assert!(!reply.error_message().is_empty());
    }
    assert_eq!(
        client
            .get(&path(&id), &[("x-auth-token", ADMIN_TOKEN)])
            .await
            .status,
        404
    );
    let wrong_method = client
        .send(
            Method::POST,
            &path(&id),
            &[("x-auth-token", ADMIN_TOKEN)],
            "",
        )
        .await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("GET, PUT, DELETE"));
    for unknown in [
        "/admin/v1/instances/",
        "/admin/v1/instances",
        "/admin/v1/instances/a/b",
        "/admin/v2/instances/x",
    ] {
        assert_eq!(
            client
                .get(unknown, &[("x-auth-token", ADMIN_TOKEN)])
                .await
                .status,
            404,
            "{unknown}"
        );
    }
}

#[tokio::test]
async fn deleting_an_instance_purges_its_sealed_bytes_from_every_file() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    assert_eq!(
        client
            .post_password(&id, "project-a", "to-be-purged")
            .await
            .status,
        200
    );
    let conn = rusqlite::Connection::open(daemon.db_path()).unwrap();
    let sealed: Vec<Vec<u8>> = conn
        .prepare("SELECT value FROM instance_metadata WHERE instance_id = ?1")
        .unwrap()
        .query_map([&id], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    drop(conn);
    assert_eq!(sealed.len(), 5);
    let reply = client
        .send(
            Method::DELETE,
            &path(&id),
            &[("x-auth-token", ADMIN_TOKEN)],
            "",
        )
        .await;
    assert_eq!(reply.status, 204);
    for file in ["metapass.sqlite3", "metapass.sqlite3-wal"] {
        let bytes = std::fs::read(daemon.data_dir().join(file)).unwrap_or_default();
        for chunk in &sealed {
            assert!(
                !bytes.windows(32).any(|w| w == &chunk[..32]),
                "sealed bytes remain in {file}"
            );
        }
    }
}

#[tokio::test]
async fn a_deleted_instance_goes_to_another_project_only_on_the_operators_explicit_word() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let admin = [("x-auth-token", ADMIN_TOKEN)];
    let id = new_instance();
    client.register(&id, "project-a").await;
    let deleted = client.send(Method::DELETE, &path(&id), &admin, "").await;
    assert_eq!(deleted.status, 204);
    let moved = client
        .send(
            Method::PUT,
            &path(&id),
            &admin,
            r#"{"project_id": "project-b"}"#,
        )
        .await;
    assert_eq!(moved.status, 409, "{}", moved.text());
    assert!(moved.error_message().contains("replace_deleted"));
    assert_eq!(client.get(&path(&id), &admin).await.status, 404);
    let replaced = client
        .send(
            Method::PUT,
            &path(&id),
            &admin,
            r#"{"project_id": "project-b", "replace_deleted": true}"#,
        )
        .await;
    assert_eq!(replaced.status, 201, "{}", replaced.text());
    assert_eq!(
        client.get(&path(&id), &admin).await.json()["project_id"],
        "project-b"
    );
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &moved.request_id())["unmapped"]["reason"],
        "conflict"
    );
}
