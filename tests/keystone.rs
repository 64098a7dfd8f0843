//! Owners with real Keystone tokens: a real Keystone (tests/keystone/keystone-up: SQLite, fernet,
//! gunicorn over TLS) validates every token metapass has not vouched for recently.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::keystone::{self, Keystone};
use common::*;
use http::Method;

fn password_path(id: &str) -> String {
    format!("/v2.1/servers/{id}/os-server-password")
}

/// A metapass daemon validating against the shared Keystone, and an instance of project-a (by its
/// Keystone id) whose guest has posted `pw`.
async fn daemon_with_password(ks: &Keystone, extra: &str) -> (Daemon, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = ks.config(dir.path(), &ks.auth_url(), extra);
    started_with_password(ks, &config, dir).await
}

/// The daemon on `config`, and an instance of project-a whose guest has posted `pw`.
async fn started_with_password(
    ks: &Keystone,
    config: &std::path::Path,
    dir: tempfile::TempDir,
) -> (Daemon, String) {
    let daemon = Daemon::start_with(config, dir);
    let client = daemon.client();
    let id = new_instance();
    let project = ks.project_id("project-a");
    client.register(&id, &project).await;
    assert_eq!(client.post_password(&id, &project, "pw").await.status, 200);
    (daemon, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn keystone_users_read_and_clear_as_their_roles_allow() {
    let Some(ks) = keystone::shared() else { return };
    let (daemon, id) = daemon_with_password(&ks, "").await;
    let client = daemon.client();
    let path = password_path(&id);
    let get = |token: String| {
        let client = client.clone();
        let path = path.clone();
        async move { client.get(&path, &[("x-auth-token", &token)]).await }
    };

    let alice = ks.token("alice").await;
    let read = get(alice.clone()).await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(read.json()["password"], "pw");
    // A reader reads but may not clear; another project's member gets the missing instance's 404.
    let rita = ks.token("rita").await;
    assert_eq!(get(rita.clone()).await.json()["password"], "pw");
    let denied = client
        .send(Method::DELETE, &path, &[("x-auth-token", &rita)], "")
        .await;
    assert_eq!(denied.status, 403);
    let bob = get(ks.token("bob").await).await;
    let missing = client
        .get(&password_path(&new_instance()), &[("x-auth-token", &alice)])
        .await;
    assert_eq!((bob.status, missing.status), (404, 404));
    assert_eq!(
        bob.error_message().replace(&id, "X"),
        missing
            .error_message()
            .split_whitespace()
            .map(|w| if w.len() == 36 { "X" } else { w })
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Keystone's admin reads any project's; a manager (implied member) clears.
    assert_eq!(get(ks.token("admin").await).await.json()["password"], "pw");
    let mona = ks.token("mona").await;
    let cleared = client
        .send(Method::DELETE, &path, &[("x-auth-token", &mona)], "")
        .await;
    assert_eq!(cleared.status, 204);
    assert_eq!(get(alice.clone()).await.json()["password"], "");
    // Unknown tokens are 401; the token file still works beside Keystone.
    assert_eq!(get("not-a-keystone-token".into()).await.status, 401);
    assert_eq!(get(ADMIN_TOKEN.into()).await.status, 200);

    // The audit event names the Keystone user, project and roles, never the token.
    let events = daemon.audit_events();
    let event = event_for(&events, &read.request_id());
    let user = &event["actor"]["user"];
    assert_eq!(user["uid"], ks.user_id("alice"));
    assert_eq!(user["name"], "alice");
    assert_eq!(user["account"]["uid"], ks.project_id("project-a"));
    assert!(
        user["credential_uid"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:")
    );
    assert_eq!(event["unmapped"]["auth"], "keystone-token");
    let roles = event["unmapped"]["roles"].as_array().unwrap();
    assert!(roles.contains(&"member".into()) && roles.contains(&"reader".into()));
    let manager = event_for(&events, &cleared.request_id());
    assert!(
        manager["unmapped"]["roles"]
            .as_array()
            .unwrap()
            .contains(&"manager".into())
    );
    let log = all_audit_text(&daemon);
    for token in [&alice, &rita, &mona] {
        assert!(
            !log.contains(token.as_str()),
            "a token reached the audit log"
        );
    }
    assert!(!daemon.log().contains(alice.as_str()));
    let (ok, report) = daemon.verify_audit();
    assert!(ok, "{report}");
}

fn all_audit_text(daemon: &Daemon) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(daemon.audit_dir()).unwrap() {
        text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default());
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_stops_working_within_the_cache_ttl() {
    let Some(ks) = keystone::shared() else { return };
    let (daemon, id) = daemon_with_password(&ks, "cache_ttl_secs = 1").await;
    let client = daemon.client();
    let alice = ks.token("alice").await;
    let token = [("x-auth-token", alice.as_str())];
    assert_eq!(client.get(&password_path(&id), &token).await.status, 200);
    ks.revoke(&alice).await;
    // Bounded: the cache may vouch for it for at most cache_ttl_secs after its validation.
    let mut refused = None;
    for attempt in 0..40 {
        let reply = client.get(&password_path(&id), &token).await;
        if reply.status == 401 {
            refused = Some(attempt);
            break;
        }
        assert_eq!(reply.status, 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        refused.is_some(),
        "the revoked token still worked after 10 s"
    );
    // A token Keystone refuses is never cached: it stays refused.
    assert_eq!(client.get(&password_path(&id), &token).await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn keystone_unreachable_fails_closed_for_tokens_it_has_not_vouched_for() {
    let Some(ks) = keystone::shared() else { return };
    let (mut server, url) = ks.start_another().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ks.config(dir.path(), &url, "cache_ttl_secs = 300\ntimeout_secs = 15");
    let (daemon, id) = started_with_password(&ks, &config, dir).await;
    let client = daemon.client();
    let alice = ks.token("alice").await;
    let rita = ks.token("rita").await;
    let path = password_path(&id);
    assert_eq!(
        client.get(&path, &[("x-auth-token", &alice)]).await.status,
        200
    );

    server.stop();
    // Alice was validated within the cache TTL: still served. Rita was never validated: 503,
    // nothing released, and audited as such.
    assert_eq!(
        client.get(&path, &[("x-auth-token", &alice)]).await.json()["password"],
        "pw"
    );
    let refused = client.get(&path, &[("x-auth-token", &rita)]).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(!refused.text().contains("pw\""));
    assert!(refused.error_message().contains("identity service"));
    let cleared = client
        .send(Method::DELETE, &path, &[("x-auth-token", &rita)], "")
        .await;
    assert_eq!(cleared.status, 503);
    let events = daemon.audit_events();
    let event = event_for(&events, &refused.request_id());
    assert_eq!(event["unmapped"]["reason"], "identity_unavailable");
    assert_eq!(event["status_code"], "503");
    assert!(event["unmapped"].get("secret_fingerprint").is_none());
    // Nothing was cleared.
    assert_eq!(
        client
            .get(&path, &[("x-auth-token", ADMIN_TOKEN)])
            .await
            .json()["password"],
        "pw"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_credential_serves_as_metapass_s_own_credentials() {
    let Some(ks) = keystone::shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = ks.config_with_application_credential(dir.path(), "");
    let (daemon, id) = started_with_password(&ks, &config, dir).await;
    let client = daemon.client();
    let alice = ks.token("alice").await;
    let read = client
        .get(&password_path(&id), &[("x-auth-token", &alice)])
        .await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(read.json()["password"], "pw");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_clients_with_keystone_sessions_read_and_clear() {
    let Some(ks) = keystone::shared() else { return };
    // The catalog names the compute API under a prefix, as many deployments do.
    let (daemon, id) =
        daemon_with_password(&ks, "\n[compute_api]\npath_prefix = \"/compute\"").await;
    // The guest's post above was plain text; the owner clients need an RSA-encrypted one, so the
    // script clears it (as the owner) and posts its own as the guest.
    let port = daemon.addr.port().to_string();
    let work = daemon.dir.path().to_str().unwrap().to_owned();
    let fixtures = std::env::var("METAPASS_TEST_KEYSTONE").unwrap();
    let project = ks.project_id("project-a");
    let repo = repo();
    let out = tokio::task::spawn_blocking(move || {
        run_interop_script(
            "keystone_clients.py",
            &[
                &port,
                &id,
                &project,
                repo.to_str().unwrap(),
                &work,
                &fixtures,
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.trim_end().ends_with("OK"), "{out}");
    let events = daemon.audit_events();
    let keystone_reads = events
        .iter()
        .filter(|e| {
            e["unmapped"]["auth"] == "keystone-token"
                && e["api"]["operation"] == "password:get"
                && e["status_code"] == "200"
        })
        .count();
    assert!(keystone_reads >= 3, "{keystone_reads}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keystone_whose_certificate_does_not_chain_to_ca_file_is_not_asked() {
    let Some(ks) = keystone::shared() else { return };
    // Keystone serves the dev CA's certificate; metapass trusts only a foreign CA here.
    let dir = tempfile::tempdir().unwrap();
    let config = ks.config(dir.path(), &ks.auth_url(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    let ca = repo().join("certs-dev/ca.pem").display().to_string();
    let foreign = repo()
        .join("certs-dev/foreign-ca.pem")
        .display()
        .to_string();
    let (head, keystone_section) = text.split_at(text.find("[keystone]").unwrap());
    std::fs::write(
        &config,
        format!("{head}{}", keystone_section.replace(&ca, &foreign)),
    )
    .unwrap();
    let (daemon, id) = started_with_password(&ks, &config, dir).await;
    let alice = ks.token("alice").await;
    let refused = daemon
        .client()
        .get(&password_path(&id), &[("x-auth-token", &alice)])
        .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &refused.request_id())["unmapped"]["reason"],
        "identity_unavailable"
    );
}
