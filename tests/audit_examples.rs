//! The example events in `schema/examples/` are real: this test produces each one from a live
//! daemon and checks that the documented example has exactly the fields the daemon emits today
//! (values such as times, ports and MACs naturally differ). When the event shape changes on
//! purpose, regenerate the examples with
//!
//! ```sh
//! METAPASS_WRITE_AUDIT_EXAMPLES=1 cargo nextest run --test audit_examples
//! ```

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use http::Method;
use serde_json::Value;

const INSTANCE: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";
const CURL: (&str, &str) = ("user-agent", "curl/8.14.1");
const CLOUDBASE_INIT: (&str, &str) = ("user-agent", "cloudbase-init/1.1.9");

/// Every key path of `value`, array positions collapsed to `[]`.
fn shape(value: &Value, prefix: String, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = format!("{prefix}.{key}");
                out.insert(path.clone());
                shape(child, path, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                shape(item, format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn shape_of(value: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    shape(value, String::new(), &mut out);
    out
}

/// Produces one real event per documented example, keyed by the example's file name.
async fn live_events() -> Vec<(&'static str, Value)> {
    let daemon = Daemon::start();
    let admin = daemon.client();
    let mut picked: Vec<(&'static str, String)> = Vec::new();

    let register = admin
        .send_h2(
            Method::PUT,
            &format!("/admin/v1/instances/{INSTANCE}"),
            &[
                ("x-auth-token", ADMIN_TOKEN),
                ("content-type", "application/json"),
                CURL,
            ],
            r#"{"project_id":"project-a"}"#,
        )
        .await;
    assert_eq!(register.status, 201, "{}", register.text());
    picked.push(("register-instance-created", register.request_id()));

    // The guest agent, through the metadata proxy (a trusted peer in the dev config).
    let sig = sign(INSTANCE);
    let agent = as_instance(INSTANCE, "project-a");
    let guest = agent.with(&[("x-forwarded-for", "10.0.0.42"), CLOUDBASE_INIT]);
    let guest_path = "/openstack/2013-04-04/password";
    let blob = "c2VhbGVkLWJ5LXRoZS1ndWVzdA==";
    let post = admin.send_h2(Method::POST, guest_path, &guest, blob).await;
    assert_eq!(post.status, 200, "{}", post.text());
    picked.push(("guest-posts-password", post.request_id()));
    let read = admin.send_h2(Method::GET, guest_path, &guest, "").await;
    assert_eq!(read.status, 200);
    picked.push(("guest-reads-password", read.request_id()));

    let forged_guest = as_instance(INSTANCE, "project-a").signed_with(&sig[1..]);
    let forged = forged_guest.with(&[CURL]);
    let refused = admin
        .send_h2(Method::GET, "/openstack/latest/password", &forged, "")
        .await;
    assert_eq!(refused.status, 403);
    picked.push(("bad-signature-refused", refused.request_id()));

    // The instance itself, on its own certificate.
    let own = Client::with_cert(daemon.addr, "instance-1")
        .send_h2(Method::GET, "/openstack/latest/password", &[CURL], "")
        .await;
    assert_eq!(own.status, 200, "{}", own.text());
    picked.push(("instance-certificate-read", own.request_id()));

    let owner_path = format!("/v2.1/servers/{INSTANCE}/os-server-password");
    let other = admin
        .send_h2(
            Method::GET,
            &owner_path,
            &[("x-auth-token", TOKEN_B), CURL],
            "",
        )
        .await;
    assert_eq!(other.status, 404);
    picked.push(("other-project-read-refused", other.request_id()));

    // A flipped bit in the stored record.
    let conn = rusqlite::Connection::open(daemon.db_path()).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut chunk: Vec<u8> = conn
        .query_row(
            "SELECT value FROM instance_metadata WHERE instance_id = ?1 AND key = 'password_0'",
            [INSTANCE],
            |r| r.get(0),
        )
        .unwrap();
    chunk[40] ^= 1;
    conn.execute(
        "UPDATE instance_metadata SET value = ?2 WHERE instance_id = ?1 AND key = 'password_0'",
        rusqlite::params![INSTANCE, chunk],
    )
    .unwrap();
    daemon.outlast_read_cache().await;
    let integrity = admin
        .send_h2(
            Method::GET,
            &owner_path,
            &[("x-auth-token", TOKEN_A), CURL],
            "",
        )
        .await;
    assert_eq!(integrity.status, 500);
    picked.push(("owner-read-integrity-failure", integrity.request_id()));

    let clear = admin
        .send_h2(
            Method::DELETE,
            &owner_path,
            &[("x-auth-token", TOKEN_A), CURL],
            "",
        )
        .await;
    assert_eq!(clear.status, 204);
    picked.push(("owner-clears-password", clear.request_id()));

    let keys = admin
        .get("/admin/v1/keys", &[("x-auth-token", ADMIN_TOKEN)])
        .await;
    assert_eq!(keys.status, 200);
    picked.push(("admin-reads-key-status", keys.request_id()));

    admin
        .raw(b"NOT-HTTP\x00\r\n\r\n", Duration::from_millis(500))
        .await;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut events = Vec::new();
    for _ in 0..50 {
        events = daemon.audit_events();
        if events.iter().any(|e| e["api"]["operation"] == "tls:reload") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out: Vec<(&'static str, Value)> = picked
        .into_iter()
        .map(|(name, id)| (name, event_for(&events, &id).clone()))
        .collect();
    for (name, operation) in [
        ("unparseable-request", "http:unparsed"),
        ("certificate-reloaded", "tls:reload"),
        ("keyring-loaded-at-startup", "keys:load"),
    ] {
        let event = events
            .iter()
            .find(|e| e["api"]["operation"] == operation)
            .unwrap_or_else(|| panic!("no {operation} event"));
        out.push((name, event.clone()));
    }
    out
}

#[tokio::test]
async fn the_documented_examples_have_the_fields_the_daemon_emits() {
    let dir = repo().join("schema/examples");
    let live = live_events().await;
    let validator = schema_validator();
    let write = std::env::var_os("METAPASS_WRITE_AUDIT_EXAMPLES").is_some();
    for (name, event) in &live {
        assert!(validator.is_valid(event), "{name}: {event:#}");
        let path = dir.join(format!("{name}.json"));
        if write {
            let text = serde_json::to_string_pretty(event).unwrap() + "\n";
            std::fs::write(&path, text).unwrap();
            continue;
        }
        let documented: Value = serde_json::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap();
        let (want, have) = (shape_of(event), shape_of(&documented));
        let missing: Vec<_> = want.difference(&have).collect();
        let stale: Vec<_> = have.difference(&want).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "{name}.json is out of date (regenerate it, see the module doc): \
             missing {missing:?}, no longer emitted {stale:?}"
        );
    }
    // No example documents an event the daemon no longer produces.
    let names: BTreeSet<String> = live.iter().map(|(n, _)| format!("{n}.json")).collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        assert!(names.contains(&file), "{file} is not produced by this test");
    }
}
