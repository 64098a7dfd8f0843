//! Real clients from PyPI against the real daemon (see tests/interop/).

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn cloudbase_init_posts_and_reads_back_its_encrypted_password() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    let port = daemon.addr.port().to_string();
    let repo = repo();
    let out = tokio::task::spawn_blocking(move || {
        run_interop_script(
            "cloudbase_init_roundtrip.py",
            &[&port, &id, "project-a", repo.to_str().unwrap()],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.trim(), "OK");
    // The guest's two posts and three reads went through the proxy and were audited as such.
    let events = daemon.audit_events();
    let guest: Vec<_> = events
        .iter()
        .filter(|e| e["unmapped"]["surface"] == "instance")
        .collect();
    let sets: Vec<_> = guest
        .iter()
        .filter(|e| e["api"]["operation"] == "password:set")
        .collect();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0]["status_code"], "200");
    assert_eq!(sets[1]["status_code"], "409");
    assert!(
        guest
            .iter()
            .all(|e| e["http_request"]["x_forwarded_for"][0] == "10.0.0.42")
    );
    let (ok, report) = daemon.verify_audit();
    assert!(ok, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn novaclient_the_nova_cli_and_openstacksdk_read_and_clear_the_password() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    let port = daemon.addr.port().to_string();
    let work = daemon.dir.path().to_str().unwrap().to_owned();
    let repo = repo();
    let id_for_script = id.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_interop_script(
            "owner_clients.py",
            &[&port, &id_for_script, repo.to_str().unwrap(), &work],
        )
    })
    .await
    .unwrap();
    assert!(out.trim_end().ends_with("OK"), "{out}");
    // Both clears answered 204, and every owner request was audited with its decision.
    let events = daemon.audit_events();
    let clears: Vec<_> = events
        .iter()
        .filter(|e| e["api"]["operation"] == "password:clear")
        .collect();
    assert_eq!(clears.len(), 2);
    assert!(clears.iter().all(|e| e["status_code"] == "204"));
    let owner_reads: Vec<_> = events
        .iter()
        .filter(|e| {
            e["unmapped"]["surface"] == "compute" && e["api"]["operation"] == "password:get"
        })
        .collect();
    assert!(owner_reads.len() >= 4, "{}", owner_reads.len());
    assert!(
        owner_reads
            .iter()
            .all(|e| e["actor"]["authorizations"][0]["decision"] == "allowed")
    );
    let (ok, report) = daemon.verify_audit();
    assert!(ok, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudbase_init_with_its_default_retries_posts_once_its_instance_is_registered() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    let port = daemon.addr.port().to_string();
    let repo = repo();
    let script_id = id.clone();
    let started = std::time::Instant::now();
    let guest = tokio::task::spawn_blocking(move || {
        run_interop_script(
            "cloudbase_init_early_boot.py",
            &[&port, &script_id, "project-a", repo.to_str().unwrap()],
        )
    });
    // Nova's create notification arrives "late": after the guest's first post was refused and at
    // least five seconds after it started (bounded: the guest's retries last 20 s).
    let early_post = |events: &[serde_json::Value]| {
        events.iter().any(|e| {
            e["api"]["operation"] == "password:set"
                && e["unmapped"]["reason"] == "not_yet_registered"
        })
    };
    // The wait for the first post is generous: a first run in a fresh venv spends most of it
    // importing (and byte-compiling) cloudbase-init; its retries only start at that post.
    let mut waited = 0;
    while !(early_post(&daemon.audit_events()) && started.elapsed().as_secs() >= 5) {
        assert!(waited < 600, "the guest never posted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        waited += 1;
    }
    client.register(&id, "project-a").await;
    let out = guest.await.unwrap();
    assert!(out.trim_end().ends_with("OK"), "{out}");
    let events = daemon.audit_events();
    let sets: Vec<_> = events
        .iter()
        .filter(|e| e["api"]["operation"] == "password:set")
        .collect();
    assert!(sets.len() >= 2, "{}", sets.len());
    assert!(
        sets[..sets.len() - 1]
            .iter()
            .all(|e| e["status_code"] == "503" && e["unmapped"]["reason"] == "not_yet_registered")
    );
    assert_eq!(sets.last().unwrap()["status_code"], "200");
    let (ok, report) = daemon.verify_audit();
    assert!(ok, "{report}");
}
