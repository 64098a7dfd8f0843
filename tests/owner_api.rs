//! The owner-facing compute API and the policy, over real TLS against the real daemon.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use http::Method;

fn password_path(id: &str) -> String {
    format!("/v2.1/servers/{id}/os-server-password")
}

/// A registered instance of `project` with a password posted by its guest.
async fn instance_with_password(client: &Client, project: &str, password: &str) -> String {
    let id = new_instance();
    client.register(&id, project).await;
    assert_eq!(
        client
            .post_password(&id, project, password.to_owned())
            .await
            .status,
        200
    );
    id
}

#[tokio::test]
async fn version_documents_for_discovery() {
    let daemon = Daemon::start();
    let client = daemon.client();
    for path in ["/v2.1", "/v2.1/"] {
        let reply = client.get(path, &[]).await;
        assert_eq!(reply.status, 200);
        let v = &reply.json()["version"];
        assert_eq!(v["id"], "v2.1");
        assert_eq!(v["status"], "CURRENT");
        // The range served: 2.1 to Nova's current maximum.
        assert_eq!(v["version"], "2.104");
        assert_eq!(v["min_version"], "2.1");
        assert_eq!(v["links"][0]["rel"], "self");
        assert_eq!(v["links"][0]["href"], "https://127.0.0.1/v2.1/");
        assert_eq!(reply.header("openstack-api-version"), Some("compute 2.1"));
    }
    let root = client.get("/", &[]).await;
    assert_eq!(root.status, 200);
    assert_eq!(root.json()["versions"][0]["id"], "v2.1");
}

#[tokio::test]
async fn owners_read_and_clear_and_the_guest_may_post_again() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = instance_with_password(&client, "project-a", "first-blob").await;

    for token in [TOKEN_A, READER_A, ADMIN_TOKEN] {
        let reply = client
            .get(&password_path(&id), &[("x-auth-token", token)])
            .await;
        assert_eq!(reply.status, 200, "{token}");
        assert_eq!(
            reply.json(),
            serde_json::json!({"password": "first-blob"}),
            "{token}"
        );
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("cache-control"), Some("no-store"));
    }
    let cleared = client
        .send(
            Method::DELETE,
            &password_path(&id),
            &[("x-auth-token", TOKEN_A)],
            "",
        )
        .await;
    assert_eq!(cleared.status, 204);
    assert!(cleared.body.is_empty());
    let empty = client
        .get(&password_path(&id), &[("x-auth-token", TOKEN_A)])
        .await;
    assert_eq!(empty.json(), serde_json::json!({"password": ""}));
    assert_eq!(
        client.get_password(&id, "project-a").await.body.len(),
        0,
        "the guest sees no password"
    );
    // Nova's rebuild flow: after a clear, the guest posts again.
    assert_eq!(
        client
            .post_password(&id, "project-a", "second-blob")
            .await
            .status,
        200
    );
    let again = client
        .get(&password_path(&id), &[("x-auth-token", READER_A)])
        .await;
    assert_eq!(again.json()["password"], "second-blob");
    // Clearing twice is fine.
    for _ in 0..2 {
        let reply = client
            .send(
                Method::DELETE,
                &password_path(&id),
                &[("x-auth-token", ADMIN_TOKEN)],
                "",
            )
            .await;
        assert_eq!(reply.status, 204);
    }

    let events = daemon.audit_events();
    let clear = event_for(&events, &cleared.request_id());
    assert_eq!(clear["api"]["operation"], "password:clear");
    assert_eq!(clear["activity_id"], 4);
    assert_eq!(clear["actor"]["user"]["name"], "dev-project-a");
    assert_eq!(clear["actor"]["user"]["account"]["uid"], "project-a");
    assert_eq!(clear["actor"]["authorizations"][0]["decision"], "allowed");
    assert_eq!(
        clear["actor"]["authorizations"][0]["policy"]["desc"],
        "password:clear: role:member project:owner"
    );
    assert_eq!(
        clear["resources"][0]["owner"]["account"]["uid"],
        "project-a"
    );
}

#[tokio::test]
async fn another_projects_instance_answers_exactly_like_a_missing_one() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let theirs = instance_with_password(&client, "project-a", "not-yours").await;
    let missing = new_instance();
    let b = [("x-auth-token", TOKEN_B)];
    for (method, path) in [
        (Method::GET, password_path(&theirs)),
        (Method::DELETE, password_path(&theirs)),
        (Method::GET, format!("/v2.1/servers/{theirs}")),
    ] {
        let foreign = client.send(method.clone(), &path, &b, "").await;
        let absent = client
            .send(method.clone(), &path.replace(&theirs, &missing), &b, "")
            .await;
        assert_eq!(
            (foreign.status, absent.status),
            (404, 404),
            "{method} {path}"
        );
        assert_eq!(
            foreign.error_message().replace(&theirs, "ID"),
            absent.error_message().replace(&missing, "ID")
        );
        assert_eq!(foreign.headers.len(), absent.headers.len());
        assert!(!foreign.text().contains("not-yours"));
        let events = daemon.audit_events();
        assert_eq!(
            event_for(&events, &foreign.request_id())["unmapped"]["reason"],
            "not_owner"
        );
        assert_eq!(
            event_for(&events, &absent.request_id())["unmapped"]["reason"],
            "unknown_instance"
        );
    }
    // Nothing was cleared.
    let mine = client
        .get(&password_path(&theirs), &[("x-auth-token", TOKEN_A)])
        .await;
    assert_eq!(mine.json()["password"], "not-yours");
    // A malformed id is the same 404 too.
    let malformed = client.get(&password_path("not-a-uuid"), &b).await;
    assert_eq!(malformed.status, 404);
}

#[tokio::test]
async fn tokens_are_required() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = instance_with_password(&client, "project-a", "pw").await;
    for headers in [
        vec![],
        vec![("x-auth-token", "nope")],
        vec![("x-auth-token", TOKEN_A), ("x-auth-token", TOKEN_A)],
    ] {
        let reply = client.get(&password_path(&id), &headers).await;
        assert_eq!(reply.status, 401, "{headers:?}");
        assert!(!reply.text().contains("pw\""));
        let reply = client
            .send(Method::DELETE, &password_path(&id), &headers, "")
            .await;
        assert_eq!(reply.status, 401, "{headers:?}");
    }
    assert_eq!(
        client
            .get(&password_path(&id), &[("x-auth-token", TOKEN_A)])
            .await
            .json()["password"],
        "pw"
    );
}

#[tokio::test]
async fn microversions_and_methods() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = instance_with_password(&client, "project-a", "pw").await;
    let path = password_path(&id);
    for (header, value, status) in [
        ("openstack-api-version", "compute 2.1", 200),
        ("openstack-api-version", "compute latest", 200),
        ("x-openstack-nova-api-version", "2.1", 200),
        ("openstack-api-version", "compute 2.96", 200),
        ("x-openstack-nova-api-version", "2.104", 200),
        ("openstack-api-version", "compute 2.105", 406),
        ("openstack-api-version", "compute 3.0", 406),
        ("openstack-api-version", "compute banana", 400),
    ] {
        let reply = client
            .get(&path, &[("x-auth-token", TOKEN_A), (header, value)])
            .await;
        assert_eq!(reply.status, status, "{header}: {value}");
        if status != 200 {
            assert!(!reply.error_message().is_empty());
        }
    }
    for method in [Method::PUT, Method::POST, Method::PATCH] {
        let reply = client
            .send(method.clone(), &path, &[("x-auth-token", TOKEN_A)], "")
            .await;
        assert_eq!(reply.status, 405, "{method}");
        assert_eq!(reply.header("allow"), Some("GET, DELETE"));
    }
    let server = client
        .get(&format!("/v2.1/servers/{id}"), &[("x-auth-token", TOKEN_A)])
        .await;
    assert_eq!(server.status, 200);
    let doc = server.json();
    assert_eq!(doc["server"]["id"], id.as_str());
    assert_eq!(doc["server"]["tenant_id"], "project-a");
    let delete_server = client
        .send(
            Method::DELETE,
            &format!("/v2.1/servers/{id}"),
            &[("x-auth-token", ADMIN_TOKEN)],
            "",
        )
        .await;
    assert_eq!(
        delete_server.status, 405,
        "the compute API never deletes servers"
    );
    assert_eq!(
        client
            .get("/v2.1/flavors", &[("x-auth-token", TOKEN_A)])
            .await
            .status,
        404
    );
}

/// Each token (admin; project-a reader+member; project-a reader; project-b reader+member) against an
/// instance of its own project and of the other one, for every action.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_matrix() {
    let daemon = Daemon::start();
    let client = daemon.client();
    #[derive(Clone, Copy, Debug)]
    enum Act {
        Show,
        Get,
        Clear,
        Register,
        Delete,
    }
    // (token, action, expected status on a project-a instance, on a project-b one)
    let matrix = [
        (ADMIN_TOKEN, Act::Show, 200, 200),
        (ADMIN_TOKEN, Act::Get, 200, 200),
        (ADMIN_TOKEN, Act::Clear, 204, 204),
        (ADMIN_TOKEN, Act::Register, 200, 200),
        (ADMIN_TOKEN, Act::Delete, 204, 204),
        (TOKEN_A, Act::Show, 200, 404),
        (TOKEN_A, Act::Get, 200, 404),
        (TOKEN_A, Act::Clear, 204, 404),
        (TOKEN_A, Act::Register, 403, 403),
        (TOKEN_A, Act::Delete, 403, 403),
        (READER_A, Act::Show, 200, 404),
        (READER_A, Act::Get, 200, 404),
        (READER_A, Act::Clear, 403, 403),
        (READER_A, Act::Register, 403, 403),
        (READER_A, Act::Delete, 403, 403),
        (TOKEN_B, Act::Show, 404, 200),
        (TOKEN_B, Act::Get, 404, 200),
        (TOKEN_B, Act::Clear, 404, 204),
        (TOKEN_B, Act::Register, 403, 403),
        (TOKEN_B, Act::Delete, 403, 403),
    ];
    for (token, act, on_a, on_b) in matrix {
        for (project, expected) in [("project-a", on_a), ("project-b", on_b)] {
            let id = instance_with_password(&client, project, "blob").await;
            let auth = [("x-auth-token", token)];
            let reply = match act {
                Act::Show => client.get(&format!("/v2.1/servers/{id}"), &auth).await,
                Act::Get => client.get(&password_path(&id), &auth).await,
                Act::Clear => {
                    client
                        .send(Method::DELETE, &password_path(&id), &auth, "")
                        .await
                }
                Act::Register => {
                    let body = format!("{{\"project_id\": \"{project}\"}}");
                    client
                        .send(
                            Method::PUT,
                            &format!("/admin/v1/instances/{id}"),
                            &auth,
                            body,
                        )
                        .await
                }
                Act::Delete => {
                    client
                        .send(
                            Method::DELETE,
                            &format!("/admin/v1/instances/{id}"),
                            &auth,
                            "",
                        )
                        .await
                }
            };
            assert_eq!(
                reply.status,
                expected,
                "{token} {act:?} on a {project} instance: {}",
                reply.text()
            );
            // The effect matches the answer.
            let after = client
                .get(&password_path(&id), &[("x-auth-token", ADMIN_TOKEN)])
                .await;
            match (act, expected) {
                (Act::Clear, 204) => assert_eq!(after.json()["password"], ""),
                (Act::Delete, 204) => assert_eq!(after.status, 404),
                _ => assert_eq!(
                    after.json()["password"],
                    "blob",
                    "{token} {act:?} on {project} changed nothing"
                ),
            }
            // And the decision is in the audit event.
            let events = daemon.audit_events();
            let event = event_for(&events, &reply.request_id());
            let decision = &event["actor"]["authorizations"][0];
            let allowed = expected < 400;
            assert_eq!(
                decision["decision"],
                if allowed { "allowed" } else { "denied" },
                "{token} {act:?} {project}"
            );
            assert!(
                decision["policy"]["desc"]
                    .as_str()
                    .unwrap()
                    .starts_with(decision["policy"]["name"].as_str().unwrap())
            );
            assert_eq!(event["resources"][0]["owner"]["account"]["uid"], project);
        }
    }
}

#[tokio::test]
async fn microversions_are_echoed_with_vary_and_request_ids_as_nova_sends_them() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = instance_with_password(&client, "project-a", "pw").await;
    let path = password_path(&id);
    for (header, value, served) in [
        ("openstack-api-version", "compute 2.96", "2.96"),
        ("openstack-api-version", "compute latest", "2.104"),
        ("x-openstack-nova-api-version", "2.53", "2.53"),
        ("user-agent", "no version header", "2.1"),
    ] {
        let reply = client
            .get(&path, &[("x-auth-token", TOKEN_A), (header, value)])
            .await;
        assert_eq!(reply.status, 200, "{value}");
        let compute = format!("compute {served}");
        assert_eq!(
            reply.header("openstack-api-version"),
            Some(compute.as_str())
        );
        assert_eq!(reply.header("x-openstack-nova-api-version"), Some(served));
        assert_eq!(
            reply.header("vary"),
            Some("OpenStack-API-Version, X-OpenStack-Nova-API-Version")
        );
        let rid = reply.request_id();
        assert!(rid.starts_with("req-"), "{rid}");
        assert_eq!(reply.header("x-openstack-request-id"), Some(rid.as_str()));
        assert_eq!(reply.header("x-compute-request-id"), Some(rid.as_str()));
    }
    // Refusals carry the request ids too; a malformed version gets no version headers.
    let refused = client
        .get(
            &path,
            &[
                ("x-auth-token", TOKEN_A),
                ("openstack-api-version", "compute 2.x"),
            ],
        )
        .await;
    assert_eq!(refused.status, 400);
    assert!(
        refused.error_message().contains("invalid format"),
        "{}",
        refused.text()
    );
    assert_eq!(refused.header("openstack-api-version"), None);
    assert_eq!(
        refused.header("x-compute-request-id"),
        Some(refused.request_id().as_str())
    );
    let too_new = client
        .get(
            &path,
            &[
                ("x-auth-token", TOKEN_A),
                ("openstack-api-version", "compute 2.200"),
            ],
        )
        .await;
    assert_eq!(too_new.status, 406);
    assert_eq!(
        too_new.error_message(),
        "Version 2.200 is not supported by the API. Minimum is 2.1 and maximum is 2.104."
    );
}

#[tokio::test]
async fn the_legacy_project_path_and_a_configured_prefix_serve_the_same_api() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), |text| {
        format!("{text}\n[compute_api]\npath_prefix = \"/compute\"\nmax_microversion = \"2.96\"\n")
    });
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    let id = instance_with_password(&client, "project-a", "pw").await;
    let token = [("x-auth-token", TOKEN_A)];
    for path in [
        format!("/v2.1/servers/{id}/os-server-password"),
        format!("/v2.1/project-a/servers/{id}/os-server-password"),
        format!("/compute/v2.1/servers/{id}/os-server-password"),
        format!("/compute/v2.1/project-a/servers/{id}/os-server-password"),
    ] {
        let reply = client.get(&path, &token).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.json()["password"], "pw", "{path}");
    }
    // Another project in the URL is the same 404 as a missing instance, even for the admin.
    let missing = client.get(&password_path(&new_instance()), &token).await;
    for (path, token) in [
        (
            format!("/v2.1/project-b/servers/{id}/os-server-password"),
            TOKEN_A,
        ),
        (
            format!("/compute/v2.1/admin/servers/{id}/os-server-password"),
            TOKEN_A,
        ),
        (
            format!("/v2.1/project-b/servers/{id}/os-server-password"),
            ADMIN_TOKEN,
        ),
    ] {
        let reply = client.get(&path, &[("x-auth-token", token)]).await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(
            reply.error_message().replace(&id, "ID"),
            missing.error_message().replace(&missing_id(&missing), "ID")
        );
    }
    // The prefix's version document advertises the configured maximum and links under it.
    let doc = client.get("/compute/v2.1/", &[]).await.json();
    assert_eq!(doc["version"]["version"], "2.96");
    assert_eq!(
        doc["version"]["links"][0]["href"],
        "https://127.0.0.1/compute/v2.1/"
    );
    let latest = client
        .get(
            &format!("/compute/v2.1/servers/{id}/os-server-password"),
            &[
                ("x-auth-token", TOKEN_A),
                ("openstack-api-version", "compute latest"),
            ],
        )
        .await;
    assert_eq!(latest.header("x-openstack-nova-api-version"), Some("2.96"));
    let events = daemon.audit_events();
    let mismatch = client
        .get(
            &format!("/v2.1/project-b/servers/{id}/os-server-password"),
            &token,
        )
        .await;
    let events_after = daemon.audit_events();
    assert!(events_after.len() > events.len());
    assert_eq!(
        event_for(&events_after, &mismatch.request_id())["unmapped"]["reason"],
        "not_owner"
    );
}

/// The instance id a 404 message names ("Instance <id> could not be found.").
fn missing_id(reply: &Reply) -> String {
    reply
        .error_message()
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn keystones_manager_role_reads_and_clears_as_novas_defaults_give_it() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = instance_with_password(&client, "project-a", "pw").await;
    let reply = client
        .get(&password_path(&id), &[("x-auth-token", MANAGER_A)])
        .await;
    assert_eq!(reply.json()["password"], "pw");
    let cleared = client
        .send(
            Method::DELETE,
            &password_path(&id),
            &[("x-auth-token", MANAGER_A)],
            "",
        )
        .await;
    assert_eq!(cleared.status, 204);
    let events = daemon.audit_events();
    let event = event_for(&events, &cleared.request_id());
    assert_eq!(event["unmapped"]["roles"], serde_json::json!(["manager"]));
    assert_eq!(
        event["unmapped"]["policy_rule"],
        "password:clear: role:member project:owner"
    );
}
