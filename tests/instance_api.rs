//! The instance-facing contract, row by row, over real TLS against the real daemon.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use http::Method;

const A: &str = "project-a";

async fn registered(client: &Client) -> String {
    let id = new_instance();
    client.register(&id, A).await;
    id
}

#[tokio::test]
async fn get_without_a_password_is_an_empty_200_text_plain() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let reply = client.get_password(&id, A).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert!(reply.header("x-request-id").unwrap().starts_with("req-"));
}

#[tokio::test]
async fn a_posted_password_reads_back_exactly_through_every_version() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let blob = "aGVsbG8gd29ybGQ=\n/+AB==";
    let post = client.post_password(&id, A, blob).await;
    assert_eq!(post.status, 200, "{}", post.text());
    assert!(post.body.is_empty());
    let guest = as_instance(&id, A);
    let headers = guest.headers();
    for version in [
        "2013-04-04",
        "2013-10-17",
        "2015-10-15",
        "2016-06-30",
        "2016-10-06",
        "2017-02-22",
        "2018-08-27",
        "2020-10-14",
        "2025-04-04",
        "latest",
    ] {
        let reply = client
            .get(&format!("/openstack/{version}/password"), &headers)
            .await;
        assert_eq!(reply.status, 200, "{version}");
        assert_eq!(reply.text(), blob, "{version}");
    }
}

#[tokio::test]
async fn a_second_post_is_409_and_changes_nothing() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    assert_eq!(client.post_password(&id, A, "first").await.status, 200);
    let second = client.post_password(&id, A, "second").await;
    assert_eq!(second.status, 409);
    assert!(second.error_message().contains("already set"));
    assert_eq!(client.get_password(&id, A).await.text(), "first");
}

#[tokio::test]
async fn old_unknown_versions_and_other_paths_are_404() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let guest = as_instance(&id, A);
    let headers = guest.headers();
    for path in [
        "/openstack/2012-08-10/password",
        "/openstack/2013-04-05/password",
        "/openstack/foo/password",
        "/openstack/latest/password/x",
        "//openstack/latest/password",
        "/openstack/latest/meta_data.json",
        "/openstack/../admin/v1/instances/x",
        "/openstack/%2e%2e/admin",
        "/openstack/latest/%2570assword",
        "/latest/password",
    ] {
        let reply = client.get(path, &headers).await;
        assert_eq!(reply.status, 404, "{path}");
        assert!(!reply.error_message().is_empty());
    }
}

#[tokio::test]
async fn listings_name_the_versions_and_the_password() {
    let daemon = Daemon::start();
    let client = daemon.client();
    for path in ["/openstack", "/openstack/"] {
        let reply = client.get(path, &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        let text = reply.text();
        assert!(
            text.lines().any(|l| l == "2013-04-04") && text.ends_with("latest"),
            "{text}"
        );
        assert!(!text.contains("2012-08-10"));
    }
    for path in ["/openstack/latest", "/openstack/2013-04-04/"] {
        let reply = client.get(path, &[]).await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "password"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn missing_and_repeated_headers_are_400_naming_the_header() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let sig = sign(&id);
    let path = "/openstack/latest/password";
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("x-tenant-id", A), ("x-instance-id-signature", &sig)],
            "X-Instance-ID",
        ),
        (
            vec![("x-instance-id", &id), ("x-tenant-id", A)],
            "X-Instance-ID-Signature",
        ),
        (
            vec![("x-instance-id", &id), ("x-instance-id-signature", &sig)],
            "X-Tenant-ID",
        ),
        (vec![], "X-Instance-ID"),
        (
            vec![
                ("x-instance-id", &id),
                ("x-instance-id", &id),
                ("x-tenant-id", A),
                ("x-instance-id-signature", &sig),
            ],
            "Multiple X-Instance-ID",
        ),
        (
            vec![
                ("x-instance-id", &id),
                ("x-tenant-id", A),
                ("x-tenant-id", A),
                ("x-instance-id-signature", &sig),
            ],
            "Multiple X-Tenant-ID",
        ),
        (
            vec![
                ("x-instance-id", &id),
                ("x-tenant-id", A),
                ("x-instance-id-signature", &sig),
                ("x-forwarded-for", "not-an-ip"),
            ],
            "X-Forwarded-For",
        ),
    ];
    for (headers, named) in cases {
        let reply = client.get(path, &headers).await;
        assert_eq!(reply.status, 400, "{named}: {}", reply.text());
        assert!(
            reply.error_message().contains(named),
            "{named}: {}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn bad_signatures_are_403() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let other = registered(&client).await;
    let sig = sign(&id);
    for bad in [
        sig.to_uppercase(),
        sig[..63].to_owned(),
        sig[..32].to_owned(),
        format!("{sig}00"),
        sign(&other),
        String::new(),
        "z".repeat(64),
    ] {
        let guest = as_instance(&id, A).signed_with(bad.as_str());
        let headers = guest.headers();
        let reply = client.get("/openstack/latest/password", &headers).await;
        assert_eq!(reply.status, 403, "{bad:?}");
        let message = reply.error_message();
        assert!(
            !message.contains(&sig),
            "the expected signature must never be revealed"
        );
    }
    // The expected signature never reaches the audit log either.
    let log = std::fs::read_to_string(
        std::fs::read_dir(daemon.audit_dir())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(!log.contains(&sig));
}

#[tokio::test]
async fn unknown_instances_and_foreign_tenants_are_the_same_404() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    client.post_password(&id, A, "secret").await;
    // An unknown (not yet registered) instance has no password: an empty 200 (see
    // a_guest_that_arrives_before_its_registration_is_told_to_retry).
    let unknown = client.get_password(&new_instance(), A).await;
    assert_eq!((unknown.status, unknown.body.len()), (200, 0));
    let foreign = client.get_password(&id, "project-b").await;
    let malformed = client.get_password("not-a-uuid", A).await;
    for reply in [&foreign, &malformed] {
        assert_eq!(reply.status, 404);
        assert_eq!(reply.error_message(), "Instance not found.");
        assert!(!reply.text().contains("secret"));
    }
    // POSTs too, and nothing is stored for the foreign tenant.
    assert_eq!(
        client.post_password(&new_instance(), A, "x").await.status,
        503
    );
    assert_eq!(
        client.post_password(&id, "project-b", "x").await.status,
        404
    );
    assert_eq!(client.get_password(&id, A).await.text(), "secret");
    let events = daemon.audit_events();
    let reason = |r: &Reply| event_for(&events, &r.request_id())["unmapped"]["reason"].clone();
    assert_eq!(reason(&unknown), "not_yet_registered");
    assert_eq!(reason(&foreign), "tenant_mismatch");
}

#[tokio::test]
async fn other_methods_are_400_with_allow() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let guest = as_instance(&id, A);
    let headers = guest.headers();
    for method in [
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::HEAD,
    ] {
        let reply = client
            .send(method.clone(), "/openstack/latest/password", &headers, "x")
            .await;
        assert_eq!(reply.status, 400, "{method}");
        assert_eq!(reply.header("allow"), Some("GET, POST"), "{method}");
        if method != Method::HEAD {
            assert_eq!(reply.error_message(), "GET and POST only are supported.");
        }
    }
}

#[tokio::test]
async fn bodies_are_checked_and_nothing_bad_is_stored() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "empty"),
        (b"abc\0def".to_vec(), "NUL or control"),
        (b"abc\x1b[31m".to_vec(), "NUL or control"),
        (b"abc\x7f".to_vec(), "NUL or control"),
        ("abc\u{85}".as_bytes().to_vec(), "NUL or control"),
        (b"abc\xff\xfe".to_vec(), "not valid UTF-8"),
        (b"\xc0\xaf".to_vec(), "not valid UTF-8"),
        (vec![b'a'; 1021], "Request is too large."),
        (vec![b'a'; 100_000], "Request is too large."),
    ];
    for (body, named) in cases {
        let id = registered(&client).await;
        let reply = client.post_password(&id, A, body.clone()).await;
        assert_eq!(reply.status, 400, "{named}");
        assert!(
            reply.error_message().contains(named),
            "{named}: {}",
            reply.text()
        );
        let read = client.get_password(&id, A).await;
        assert_eq!(
            (read.status, read.body.len()),
            (200, 0),
            "nothing stored for {named}"
        );
    }
    let id = registered(&client).await;
    let max = "b".repeat(1020);
    assert_eq!(client.post_password(&id, A, max.clone()).await.status, 200);
    assert_eq!(client.get_password(&id, A).await.text(), max);
}

#[tokio::test]
async fn a_guest_that_arrives_before_its_registration_is_told_to_retry() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    // GET: no password yet (an empty 200, as for a registered instance without one); POST: 503
    // with Retry-After (the Neutron proxy passes 503 through, cloudbase-init retries), the body
    // unread and the connection closed.
    let read = client.get_password(&id, A).await;
    assert_eq!((read.status, read.body.len()), (200, 0));
    let post = client.post_password(&id, A, "x").await;
    assert_eq!(post.status, 503);
    assert_eq!(post.header("retry-after"), Some("2"));
    assert_eq!(post.header("connection"), Some("close"));
    assert!(post.error_message().contains("not registered yet"));
    let events = daemon.audit_events();
    for reply in [&read, &post] {
        let event = event_for(&events, &reply.request_id());
        assert_eq!(event["unmapped"]["reason"], "not_yet_registered");
        assert_eq!(event["status_code"], reply.status.to_string());
    }
    // Neither created state: the registration that follows is a creation, and the retried post
    // then succeeds.
    client.register(&id, A).await;
    assert_eq!(client.post_password(&id, A, "x").await.status, 200);
    assert_eq!(client.get_password(&id, A).await.text(), "x");
}

#[tokio::test]
async fn every_path_form_nova_routes_to_its_password_handler_reaches_metapass() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    assert_eq!(client.post_password(&id, A, "pw").await.status, 200);
    let sig = sign(&id);
    let headers = proxy_headers(&id, A, &sig);
    for path in [
        "/openstack/latest/password/",
        "/openstack/latest//password",
        "/openstack//latest/password",
        "///openstack/latest/password",
        "/openstack/./latest/password",
        "/openstack/2013-04-04/x/../password",
        "/x/../openstack/latest/password",
        "/openstack/latest/%70assword",
        "/%6fpenstack/latest/password",
    ] {
        let reply = client.get(path, &headers).await;
        assert_eq!(
            (reply.status, reply.text()),
            (200, "pw".to_owned()),
            "{path}"
        );
        // And a second post through that spelling is still refused: set-once holds.
        let again = client.send(Method::POST, path, &headers, "other").await;
        assert_eq!(again.status, 409, "{path}");
    }
    // The audit event keeps the path exactly as it was sent.
    let reply = client.get("/openstack/latest//password", &headers).await;
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &reply.request_id())["http_request"]["url"]["path"],
        "/openstack/latest//password"
    );
}

#[tokio::test]
async fn every_answer_carries_its_audit_event_id() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let replies = vec![
        client.get_password(&id, A).await,
        client.post_password(&id, A, "pw").await,
        client.get_password(&id, A).await,
        client.post_password(&id, A, "again").await,
        client.get("/openstack/latest/password", &[]).await,
        client.get("/nowhere", &[]).await,
    ];
    let events = daemon.audit_events();
    for reply in &replies {
        let event = event_for(&events, &reply.request_id());
        assert_eq!(event["http_response"]["code"], reply.status);
        assert_eq!(event["status_code"], reply.status.to_string());
    }
    let read = event_for(&events, &replies[2].request_id());
    assert_eq!(read["api"]["operation"], "password:get");
    assert_eq!(read["actor"]["user"]["uid"], id.as_str());
    assert_eq!(read["unmapped"]["auth"], "proxy-signature");
    assert_eq!(read["unmapped"]["tls_version"], "TLSv1.3");
    assert!(
        read["unmapped"]["secret_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:")
    );
}

#[tokio::test]
async fn forwarded_for_is_recorded_for_audit_only() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    let guest = as_instance(&id, A);
    let headers = guest.with(&[("x-forwarded-for", "10.0.0.5, 192.0.2.1")]);
    let reply = client.get("/openstack/latest/password", &headers).await;
    assert_eq!(reply.status, 200);
    let events = daemon.audit_events();
    let event = event_for(&events, &reply.request_id());
    assert_eq!(
        event["http_request"]["x_forwarded_for"],
        serde_json::json!(["10.0.0.5", "192.0.2.1"])
    );
    // The dev listener trusts 127.0.0.1 as a proxy: the client is the nearest untrusted hop, the
    // peer an intermediary.
    assert_eq!(event["src_endpoint"]["ip"], "192.0.2.1");
    assert_eq!(
        event["src_endpoint"]["intermediate_ips"],
        serde_json::json!(["127.0.0.1"])
    );
    assert_eq!(event["unmapped"]["forwarded"], "trusted");
}

#[tokio::test]
async fn http2_and_http10_clients_are_served() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = registered(&client).await;
    client.post_password(&id, A, "pw").await;
    let sig = sign(&id);
    let raw = format!(
        "GET /openstack/latest/password HTTP/1.0\r\nX-Instance-ID: {id}\r\nX-Tenant-ID: {A}\r\nX-Instance-ID-Signature: {sig}\r\n\r\n"
    );
    let out = client.raw(raw.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(raw_status(&out), Some(200));
    assert!(String::from_utf8_lossy(&out).ends_with("\r\n\r\npw"));

    let guest = as_instance(&id, A);
    let headers = guest.headers();
    let h2 = client
        .send_h2(Method::GET, "/openstack/latest/password", &headers, "")
        .await;
    assert_eq!((h2.status, h2.text().as_str()), (200, "pw"));
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &h2.request_id())["http_request"]["version"],
        "HTTP/2"
    );
}

#[tokio::test]
async fn requests_hyper_refuses_before_routing_are_audited_too() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let many_headers: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(String, u16, &str)> = vec![
        ("GARBAGE\r\n\r\n".into(), 400, "malformed_request"),
        (
            "GET /openstack HTTP/1.1\r\nBad Header Name: x\r\n\r\n".into(),
            400,
            "malformed_request",
        ),
        (
            "GET /openstack HTTP/9.9\r\n\r\n".into(),
            400,
            "malformed_request",
        ),
        (
            format!("GET /openstack HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n"),
            431,
            "head_too_large",
        ),
        (
            format!(
                "GET /openstack HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(20_000)
            ),
            431,
            "head_too_large",
        ),
    ];
    for (i, (request, status, reason)) in cases.iter().enumerate() {
        let out = client.raw(request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(raw_status(&out), Some(*status), "case {i}");
        // The event is written as the connection ends; wait for it.
        let mut events = daemon.request_events();
        for _ in 0..100 {
            if events.len() == i + 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            events = daemon.request_events();
        }
        assert_eq!(
            events.len(),
            i + 1,
            "one event per refused request (case {i})"
        );
        let event = events.last().unwrap();
        assert_eq!(event["unmapped"]["reason"], *reason, "case {i}");
        assert_eq!(event["http_response"]["code"], *status, "case {i}");
        assert_eq!(event["api"]["operation"], "http:unparsed");
    }
}
