//! The audit log as a security reviewer relies on it: a pinned schema, a verifiable chain across
//! rotated files, tampering reported at the first bad sequence number, fail-closed behaviour when
//! the disk is full, no acknowledged write lost to SIGKILL, and the reviewer tools.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use http::Method;
use serde_json::Value;

/// Drives one of each kind of request a deployment sees.
async fn mixed_traffic(client: &Client) {
    let id = new_instance();
    client.register(&id, "project-a").await;
    let sig = sign(&id);
    client.get_password(&id, "project-a").await;
    client.post_password(&id, "project-a", "blob").await;
    client.post_password(&id, "project-a", "again").await;
    client.get_password(&id, "project-a").await;
    client.get_password(&id, "project-b").await;
    client.get_password(&new_instance(), "project-a").await;
    client
        .post_password(&id, "project-a", vec![b'x'; 2000])
        .await;
    let bad_sig_guest = as_instance(&id, "project-a").signed_with(&sig[2..]);
    let bad_sig = bad_sig_guest.headers();
    client.get("/openstack/latest/password", &bad_sig).await;
    client
        .get("/openstack/latest/password", &[("x-forwarded-for", "nope")])
        .await;
    client
        .send(Method::PUT, "/openstack/latest/password", &[], "")
        .await;
    client.get("/openstack", &[]).await;
    client.get("/v2.1/", &[]).await;
    let pw = format!("/v2.1/servers/{id}/os-server-password");
    client.get(&pw, &[("x-auth-token", TOKEN_A)]).await;
    client.get(&pw, &[("x-auth-token", TOKEN_B)]).await;
    client.get(&pw, &[]).await;
    client
        .send(Method::DELETE, &pw, &[("x-auth-token", READER_A)], "")
        .await;
    client
        .send(Method::DELETE, &pw, &[("x-auth-token", TOKEN_A)], "")
        .await;
    client
        .get(&format!("/v2.1/servers/{id}"), &[("x-auth-token", TOKEN_A)])
        .await;
    client
        .get(
            &pw,
            &[
                ("x-auth-token", TOKEN_A),
                ("openstack-api-version", "compute 2.99"),
            ],
        )
        .await;
    client
        .get(
            &format!("/admin/v1/instances/{id}"),
            &[("x-auth-token", ADMIN_TOKEN)],
        )
        .await;
    client
        .send(
            Method::PUT,
            &format!("/admin/v1/instances/{id}"),
            &[("x-auth-token", ADMIN_TOKEN)],
            "{",
        )
        .await;
    client
        .send(
            Method::DELETE,
            &format!("/admin/v1/instances/{id}"),
            &[("x-auth-token", ADMIN_TOKEN)],
            "",
        )
        .await;
    client.get("/healthz", &[]).await;
    client.get("/readyz", &[]).await;
    client.get("/metrics", &[]).await;
    client.get("/nowhere/../etc", &[]).await;
    client
        .raw(b"NOT HTTP AT ALL\r\n\r\n", Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn a_real_runs_events_validate_against_the_pinned_schema() {
    let daemon = Daemon::start();
    mixed_traffic(&daemon.client()).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // the unparsed request's event lands as its connection ends
    let validator = schema_validator();
    assert_eq!(
        daemon.request_events().len(),
        28,
        "one event for each of the 28 requests"
    );
    // Every event is validated, the daemon's own startup keys:load event included.
    let events = daemon.audit_events();
    assert_eq!(events.len(), 29);
    for event in &events {
        let errors: Vec<String> = validator
            .iter_errors(event)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "event {} does not match the schema: {errors:?}\n{event:#}",
            event["metadata"]["sequence"]
        );
        assert!(event.get("seq").is_none() && event.get("mac").is_none());
    }
    // Every operation and outcome class appeared.
    for outcome in ["success", "denied", "failure"] {
        assert!(
            events.iter().any(|e| e["unmapped"]["outcome"] == outcome),
            "{outcome}"
        );
    }
    // The schema is strict: an extra field anywhere, or a secret-looking one, is refused.
    let mut leaky = events[0].clone();
    leaky["unmapped"]["password"] = Value::from("hunter2");
    assert!(!validator.is_valid(&leaky));
}

/// A config whose audit log rotates every `bytes`.
fn rotating_config(dir: &Path, bytes: u64) -> PathBuf {
    config_with(dir, |t| {
        t.replace(
            "max_file_bytes = 67108864",
            &format!("max_file_bytes = {bytes}"),
        )
    })
}

async fn rotated_log(rotate_bytes: u64) -> (Daemon, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let config = rotating_config(dir.path(), rotate_bytes);
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    for _ in 0..4 {
        mixed_traffic(&client).await;
    }
    let files = metapass::audit::review::files_of(&daemon.audit_dir()).unwrap();
    (daemon, files)
}

#[tokio::test]
async fn rotation_continues_the_chain_across_files() {
    let (daemon, files) = rotated_log(4096).await;
    assert!(files.len() >= 10, "rotated into {} files", files.len());
    let mut last: Option<Value> = None;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let first = &lines[0];
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(&format!(
                "audit-{:020}-",
                first["metadata"]["sequence"].as_u64().unwrap()
            )),
            "{name}"
        );
        if let Some(last) = &last {
            assert_eq!(
                first["metadata"]["sequence"].as_u64().unwrap(),
                last["metadata"]["sequence"].as_u64().unwrap() + 1
            );
            assert_eq!(
                first["unmapped"]["chain_prev"], last["unmapped"]["chain_mac"],
                "{name} continues the previous file's chain"
            );
        } else {
            assert_eq!(first["metadata"]["sequence"], 1);
            assert_eq!(first["unmapped"]["chain_prev"], "0".repeat(64));
        }
        last = Some(lines.last().unwrap().clone());
    }
    let (ok, out) = daemon.verify_audit();
    assert!(
        ok && out.contains(&format!("in {} files", files.len())),
        "{out}"
    );
}

/// Runs `metapass audit verify --audit-key <dev key> FILES`; returns (exit code, stdout).
fn verify_files(files: &[PathBuf]) -> (i32, String) {
    let mut args = vec![
        "audit".into(),
        "verify".into(),
        "--audit-key".into(),
        repo().join("policy/dev-audit-key.toml").into_os_string(),
    ];
    args.extend(files.iter().map(|f| f.as_os_str().to_owned()));
    run_metapass::<std::ffi::OsString>(args)
}

/// Copies `files` into a fresh directory, applies `tamper` to the copies, and verifies them.
fn tampered(files: &[PathBuf], tamper: impl FnOnce(&mut Vec<PathBuf>)) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut copies: Vec<PathBuf> = files
        .iter()
        .map(|f| {
            let to = dir.path().join(f.file_name().unwrap());
            std::fs::copy(f, &to).unwrap();
            to
        })
        .collect();
    tamper(&mut copies);
    verify_files(&copies)
}

fn edit_lines(file: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    edit(&mut lines);
    std::fs::write(file, lines.join("\n") + "\n").unwrap();
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["metadata"]["sequence"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn verify_names_the_first_bad_sequence_number_for_every_kind_of_tampering() {
    let (_daemon, files) = rotated_log(16384).await;
    assert!(files.len() >= 4, "{} files", files.len());
    let (code, out) = verify_files(&files);
    assert_eq!(code, 0, "{out}");
    let total: usize = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
        .sum();
    assert!(out.starts_with(&format!("OK: {total} events")), "{out}");
    let middle = files.len() / 2;
    let second_line_seq = seq_of(
        std::fs::read_to_string(&files[middle])
            .unwrap()
            .lines()
            .nth(1)
            .unwrap(),
    );

    // Edited: one character of an event changed.
    let (code, out) = tampered(&files, |f| {
        edit_lines(&f[middle], |l| {
            l[1] = l[1].replacen("\"status_code\":\"", "\"status_code\":\"9", 1)
        })
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("first bad sequence number {second_line_seq}"))
            && out.contains("MAC mismatch"),
        "{out}"
    );

    // Deleted: one line removed.
    let (code, out) = tampered(&files, |f| {
        edit_lines(&f[middle], |l| {
            l.remove(1);
        })
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("first bad sequence number {second_line_seq}"))
            && out.contains("deleted"),
        "{out}"
    );

    // Reordered: two lines swapped.
    let (code, out) = tampered(&files, |f| edit_lines(&f[middle], |l| l.swap(1, 2)));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("first bad sequence number {second_line_seq}")),
        "{out}"
    );

    // Inserted: a genuine line replayed.
    let (code, out) = tampered(&files, |f| {
        edit_lines(&f[middle], |l| {
            let copy = l[0].clone();
            l.insert(1, copy);
        })
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("first bad sequence number {second_line_seq}")),
        "{out}"
    );

    // A gap between files: a middle file deleted.
    let first_of_next = seq_of(
        std::fs::read_to_string(&files[middle + 1])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    );
    let first_of_missing = seq_of(
        std::fs::read_to_string(&files[middle])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    );
    let (code, out) = tampered(&files, |f| {
        f.remove(middle);
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("first bad sequence number {first_of_missing}"))
            && out.contains(&format!(
                "sequence {first_of_next} where {first_of_missing} was expected"
            )),
        "{out}"
    );

    // A torn last line (a crash mid-write) is reported as such, not as tampering.
    let (code, out) = tampered(&files, |f| {
        let last = f.last().unwrap();
        let mut bytes = std::fs::read(last).unwrap();
        bytes.extend_from_slice(b"{\"activity_id\":2,\"activity_na");
        std::fs::write(last, bytes).unwrap();
    });
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("torn line") && out.starts_with("warning:"),
        "{out}"
    );

    // A forged line with a recomputed-looking but wrong MAC.
    let (code, out) = tampered(&files, |f| {
        edit_lines(&f[0], |l| {
            let end = l[0].len() - 66;
            l[0].replace_range(end..end + 64, &"a".repeat(64));
        })
    });
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("first bad sequence number 1"), "{out}");
}

/// The daemon with its audit log on a 1 MiB tmpfs in a private mount namespace.
fn daemon_with_small_audit_disk() -> Daemon {
    common::small_disk::daemon_with_audit_disk("1m", |t| {
        t.replace("ack_timeout_ms = 5000", "ack_timeout_ms = 1000")
            .replace("min_free_bytes = 67108864", "min_free_bytes = 0")
    })
}

/// Fills the daemon's audit filesystem to the last byte; returns the ballast file.
fn fill(daemon: &Daemon) -> PathBuf {
    use std::io::Write;
    let ballast = common::small_disk::audit_dir_inside(daemon).join("ballast");
    let mut f = std::fs::File::create(&ballast).expect("ballast in the daemon's tmpfs");
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    while f.write_all(&block[..1]).is_ok() {}
    ballast
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_audit_disk_fails_closed_and_service_resumes_by_itself() {
    let daemon = daemon_with_small_audit_disk();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    assert_eq!(
        client
            .post_password(&id, "project-a", "before")
            .await
            .status,
        200
    );
    let fresh = new_instance();
    client.register(&fresh, "project-a").await;
    let ballast = fill(&daemon);

    // Mutations and secret reads answer 503 and release or change nothing.
    let post = client
        .post_password(&fresh, "project-a", "while-full")
        .await;
    assert_eq!(post.status, 503, "{}", post.text());
    assert!(post.error_message().contains("audit log"));
    let read = client.get_password(&id, "project-a").await;
    assert_eq!(read.status, 503);
    assert!(!read.text().contains("before"));
    let owner = client
        .get(
            &format!("/v2.1/servers/{id}/os-server-password"),
            &[("x-auth-token", TOKEN_A)],
        )
        .await;
    assert_eq!(owner.status, 503);
    let clear = client
        .send(
            Method::DELETE,
            &format!("/v2.1/servers/{id}/os-server-password"),
            &[("x-auth-token", TOKEN_A)],
            "",
        )
        .await;
    assert_eq!(clear.status, 503);
    assert_eq!(
        client.get("/readyz", &[]).await.status,
        503,
        "readiness turns false"
    );
    let conn = rusqlite::Connection::open(daemon.db_path()).unwrap();
    let stored: i64 = conn
        .query_row(
            "SELECT password_set FROM instances WHERE instance_id = ?1",
            [&fresh],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 0, "nothing committed without its audit record");
    let still: i64 = conn
        .query_row(
            "SELECT password_set FROM instances WHERE instance_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(still, 1, "the clear was not committed either");

    // Space comes back: service resumes without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let ready = client.get("/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{} {}", ready.text(), daemon.log());
    assert_eq!(
        client
            .post_password(&fresh, "project-a", "after")
            .await
            .status,
        200
    );
    assert_eq!(
        client.get_password(&fresh, "project-a").await.text(),
        "after"
    );
    assert_eq!(client.get_password(&id, "project-a").await.text(), "before");

    // The log on the daemon's tmpfs still verifies: failed batches were cut back, not left torn.
    let audit = PathBuf::from(format!(
        "/proc/{}/root{}",
        daemon.pid(),
        daemon.audit_dir().display()
    ));
    let files = metapass::audit::review::files_of(&audit).unwrap();
    let (code, out) = verify_files(&files);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let metrics = client.get("/metrics", &[]).await.text();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("metapass_audit_write_failures_total"))
        .unwrap();
    assert!(!failures.ends_with(" 0"), "{failures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_post_load_loses_nothing_acknowledged() {
    let mut daemon = Daemon::start();
    let client = daemon.client();
    let mut ids = Vec::new();
    for _ in 0..240 {
        let id = new_instance();
        client.register(&id, "project-a").await;
        ids.push(id);
    }
    // 16 clients post to their own instances as fast as they can; the daemon is killed mid-stream.
    let tasks: Vec<_> = ids
        .chunks(15)
        .map(|chunk| {
            let (client, chunk) = (client.clone(), chunk.to_vec());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for id in chunk {
                    let value = format!("pw-{id}");
                    let post = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.post_password_nopanic(&id, "project-a", value.clone()),
                    )
                    .await;
                    match post {
                        Ok(Some(reply)) if reply.status == 200 => {
                            acked.push((id, value, reply.request_id()))
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed_at = std::time::Instant::now();
    let _ = Command::new("kill")
        .args(["-KILL", &daemon.pid().to_string()])
        .status();
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    assert!(
        !acknowledged.is_empty(),
        "some posts were acknowledged before the kill"
    );
    assert!(
        acknowledged.len() < ids.len(),
        "the kill happened mid-stream ({} of {})",
        acknowledged.len(),
        ids.len()
    );
    let _ = killed_at;

    daemon.restart();
    let client = daemon.client();
    let events = daemon.audit_events_lenient();
    for (id, value, request_id) in &acknowledged {
        assert_eq!(
            &client.get_password(id, "project-a").await.text(),
            value,
            "acknowledged write of {id} lost"
        );
        let event = event_for(&events, request_id);
        assert_eq!(
            event["status_code"], "200",
            "acknowledged write of {id} audited as success"
        );
    }
    // Nothing torn: every instance reads back as set or unset, never as an integrity failure.
    for id in &ids {
        let reply = client.get_password(id, "project-a").await;
        assert_eq!(reply.status, 200, "{id}: {}", reply.text());
        assert!(reply.body.is_empty() || reply.text() == format!("pw-{id}"));
    }
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
    assert!(!out.contains("MAC mismatch"), "{out}");
}

#[tokio::test]
async fn reviewer_tools_show_summarize_and_find_fingerprints() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    client.post_password(&id, "project-a", "blob").await;
    for _ in 0..3 {
        client
            .get(
                &format!("/v2.1/servers/{id}/os-server-password"),
                &[("x-auth-token", TOKEN_B)],
            )
            .await;
    }
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let run_with_input = |args: &[&str], input: &str| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_metapass"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dir = daemon.audit_dir();
    let dir = dir.to_str().unwrap();
    let denied = run(&["audit", "show", "--dir", dir, "--outcome", "denied"]);
    assert!(denied.trim_end().ends_with("3 of 6 events"), "{denied}");
    assert!(
        denied.contains("dev-project-b (project-b)") && denied.contains("not_owner"),
        "{denied}"
    );
    let by_instance = run(&[
        "audit",
        "show",
        "--dir",
        dir,
        "--instance",
        &id,
        "--since",
        "10m",
    ]);
    assert!(
        by_instance.trim_end().ends_with("5 of 6 events"),
        "{by_instance}"
    );
    let by_project = run(&["audit", "show", "--dir", dir, "--project", "project-b"]);
    assert!(
        by_project.trim_end().ends_with("3 of 6 events"),
        "{by_project}"
    );
    let future = run(&[
        "audit",
        "show",
        "--dir",
        dir,
        "--since",
        "2999-01-01T00:00:00Z",
    ]);
    assert!(future.trim_end().ends_with("0 of 6 events"), "{future}");
    let summary = run(&[
        "audit",
        "summary",
        "--config",
        daemon.config.to_str().unwrap(),
        "--data-dir",
        daemon.data_dir().to_str().unwrap(),
    ]);
    assert!(
        summary.starts_with("6 events")
            && summary.contains("3  not_owner")
            && summary.contains("3  127.0.0.1"),
        "{summary}"
    );

    // An investigator holding a token can find its uses without the log revealing it.
    // The value comes on standard input: a token on the command line is every local user's.
    let fingerprint = run_with_input(
        &[
            "audit",
            "hash",
            "--audit-key",
            repo().join("policy/dev-audit-key.toml").to_str().unwrap(),
        ],
        &format!("{TOKEN_B}\n"),
    );
    let events = daemon.audit_events();
    let matching = events
        .iter()
        .filter(|e| e["actor"]["user"]["credential_uid"] == fingerprint.trim())
        .count();
    assert_eq!(matching, 3);
    let blob = run_with_input(
        &["audit", "hash", "--config", daemon.config.to_str().unwrap()],
        "blob",
    );
    // A value on the command line is refused, not fingerprinted.
    let refused = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args([
            "audit",
            "hash",
            "--config",
            daemon.config.to_str().unwrap(),
            "blob",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        events
            .iter()
            .any(|e| e["unmapped"]["secret_fingerprint"] == blob.trim())
    );
}

#[tokio::test]
async fn metrics_count_requests_refusals_and_audit_writes() {
    let daemon = Daemon::start();
    let client = daemon.client();
    for _ in 0..4 {
        client.get("/openstack/latest/password", &[]).await;
    }
    let reply = client.get("/metrics", &[]).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = reply.text();
    for expected in [
        "metapass_requests_total{surface=\"instance\",operation=\"password:get\",status=\"400\"} 4",
        "metapass_refusals_total{reason=\"missing_header\"} 4",
        // Four requests and the startup keys:load event.
        "metapass_audit_events_written_total 5",
        "metapass_audit_queue_depth",
        "metapass_audit_fsync_seconds_count",
        "metapass_tls_handshake_failures_total 0",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
}

#[test]
fn the_documented_examples_match_the_pinned_schema() {
    let validator = schema_validator();
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("schema/examples")).unwrap() {
        let path = entry.unwrap().path();
        let event: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&event)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        seen += 1;
    }
    assert!(seen >= 8, "{seen} examples");
}

#[tokio::test]
async fn verifying_an_empty_or_deleted_log_fails() {
    let daemon = Daemon::start();
    daemon.client().get("/healthz", &[]).await;
    let (ok, report) = daemon.verify_audit();
    assert!(ok, "{report}");
    // Every file emptied: nothing verifies, and that is a failure, not "OK: 0 events".
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("audit-00000000000000000001.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (code, out) = verify_files(&[empty]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no audit event to verify"), "{out}");
    // A directory whose files were all deleted fails too.
    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["audit", "verify", "--audit-key"])
        .arg(repo().join("policy/dev-audit-key.toml"))
        .arg("--dir")
        .arg(dir.path().join("nothing-here"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::create_dir(dir.path().join("emptied")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["audit", "verify", "--audit-key"])
        .arg(repo().join("policy/dev-audit-key.toml"))
        .arg("--dir")
        .arg(dir.path().join("emptied"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// The live audit file deleted while requests flow: nothing is acknowledged into the unlinked
/// inode. Every change acknowledged by a request that started after the deletion has its event
/// in the log directory; the first batch after it is refused (503); the new file opens with an
/// `audit:file_lost` incident naming the lost file; readiness comes back; and `audit verify`
/// fails, naming the missing start, unless told where the retained log begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_the_live_audit_file_acknowledges_nothing_into_it_and_is_recorded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let daemon = Daemon::start();
    let client = daemon.client();
    client.register(&new_instance(), "project-a").await;
    let live = metapass::audit::review::files_of(&daemon.audit_dir()).unwrap();
    assert_eq!(live.len(), 1);
    let live = live[0].clone();

    let deleted = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..6 {
        let (client, deleted) = (daemon.client(), deleted.clone());
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..60 {
                let after = deleted.load(Ordering::SeqCst);
                let id = new_instance();
                let reply = client
                    .send(
                        Method::PUT,
                        &format!("/admin/v1/instances/{id}"),
                        &[
                            ("x-auth-token", ADMIN_TOKEN),
                            ("content-type", "application/json"),
                        ],
                        r#"{"project_id":"project-a"}"#,
                    )
                    .await;
                seen.push((after, reply.status, reply.request_id()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    std::fs::remove_file(&live).unwrap();
    deleted.store(true, Ordering::SeqCst);
    let mut results = Vec::new();
    for task in load {
        results.extend(task.await.unwrap());
    }
    // One more request surely after the deletion: the writer has noticed by now.
    let ready = client.get("/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.text());

    let events = daemon.audit_events();
    let after: Vec<_> = results.iter().filter(|(after, ..)| *after).collect();
    assert!(!after.is_empty());
    for (_, status, request_id) in &after {
        if *status == 201 {
            assert!(
                events
                    .iter()
                    .any(|e| e["metadata"]["uid"] == request_id.as_str()),
                "register {request_id} acknowledged after the deletion has no visible event"
            );
        } else {
            assert_eq!(*status, 503, "only refusals besides acknowledged changes");
        }
    }
    // The batch that found the file gone was refused: a request batch (its requests answered
    // 503) or, rarely, the writer's own checkpoint tick (then no request needed refusing).
    let refused = results
        .iter()
        .filter(|(_, status, _)| *status == 503)
        .count();
    eprintln!("{refused} requests refused while the lost file was found");
    let incident = &events[0];
    assert_eq!(
        incident["api"]["operation"], "audit:file_lost",
        "{incident}"
    );
    assert_eq!(incident["unmapped"]["reason"], "audit_file_lost");
    assert_eq!(incident["severity"], "Critical");
    let name = live.file_name().unwrap().to_str().unwrap();
    assert!(
        incident["message"].as_str().unwrap().contains(name),
        "{incident}"
    );
    assert!(daemon.log_shows(&["deleted or replaced while open"]));
    let errors: Vec<String> = schema_validator()
        .iter_errors(incident)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:?}\n{incident:#}");

    let (ok, report) = daemon.verify_audit();
    assert!(
        !ok,
        "a log whose first file is gone must not verify: {report}"
    );
    assert!(report.contains("oldest files are missing"), "{report}");
    let first = incident["metadata"]["sequence"].as_u64().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["audit", "verify", "--audit-key"])
        .arg(repo().join("policy/dev-audit-key.toml"))
        .arg("--dir")
        .arg(daemon.audit_dir())
        .args(["--from-sequence", &first.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Replaced rather than deleted: the same bytes under the same name, another inode.
    let live = metapass::audit::review::files_of(&daemon.audit_dir())
        .unwrap()
        .pop()
        .unwrap();
    let stand_in = daemon.audit_dir().join("stand-in.tmp");
    std::fs::copy(&live, &stand_in).unwrap();
    std::fs::rename(&stand_in, &live).unwrap();
    client.get("/healthz", &[]).await;
    client.get("/healthz", &[]).await;
    let lost: Vec<Value> = daemon
        .audit_events()
        .into_iter()
        .filter(|e| e["api"]["operation"] == "audit:file_lost")
        .collect();
    assert_eq!(lost.len(), 2, "{lost:#?}");
    let name = live.file_name().unwrap().to_str().unwrap();
    assert!(
        lost[1]["message"].as_str().unwrap().contains(name),
        "{lost:#?}"
    );
}

/// The seq of the store's anchor (the chain head recorded with the last change).
fn anchored_seq(daemon: &Daemon) -> u64 {
    let conn = rusqlite::Connection::open(daemon.db_path()).unwrap();
    let seq: i64 = conn
        .query_row("SELECT seq FROM audit_anchor", [], |r| r.get(0))
        .unwrap();
    u64::try_from(seq).unwrap()
}

/// The store records with every change where its audit event stands in the chain. Offline, an
/// attacker who cuts the log's tail or deletes its files leaves a valid chain behind, but not the
/// anchored line: `audit verify --config` fails naming the gap, `serve` refuses to start, and
/// `serve --accept-audit-gap` starts only after recording the loss as an event.
#[tokio::test]
async fn the_store_anchors_the_chain_so_a_cut_tail_or_deleted_files_are_found() {
    let mut daemon = Daemon::start();
    let client = daemon.client();
    for i in 0..3 {
        let id = new_instance();
        client.register(&id, "project-a").await;
        assert_eq!(
            client
                .post_password(&id, "project-a", format!("s{i}"))
                .await
                .status,
            200
        );
    }
    client.get("/healthz", &[]).await; // after the last change: not anchored
    assert!(daemon.terminate());
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
    let anchored = anchored_seq(&daemon);
    assert!(
        out.contains(&format!(
            "anchor: the store's last change was audited at sequence {anchored}"
        )),
        "{out}"
    );

    // The tail cut just before the anchored line: the rest is a valid chain.
    let files = metapass::audit::review::files_of(&daemon.audit_dir()).unwrap();
    assert_eq!(files.len(), 1);
    let keep = usize::try_from(anchored - 1).unwrap();
    edit_lines(&files[0], |lines| lines.truncate(keep));
    let (ok, out) = daemon.verify_audit();
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("events {anchored}..={anchored} are missing")),
        "{out}"
    );
    let refused = daemon.start_refused();
    assert!(
        refused.contains(&format!("ends at sequence {}", anchored - 1))
            && refused.contains("--accept-audit-gap"),
        "{refused}"
    );

    // The operator accepts the loss: recorded first, then service resumes and anchors again.
    daemon.restart_with(&["--accept-audit-gap"]);
    let client = daemon.client();
    let events = daemon.audit_events();
    let accepted = events
        .iter()
        .find(|e| e["api"]["operation"] == "audit:gap_accepted")
        .expect("the accepted gap is in the log");
    assert_eq!(accepted["unmapped"]["reason"], "audit_file_lost");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("are missing"),
        "{accepted}"
    );
    client.register(&new_instance(), "project-a").await;
    assert!(daemon.terminate());
    assert_valid_ocsf(&daemon);
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
    daemon.restart();
    assert!(daemon.terminate());

    // Every file deleted: the anchor outlives them.
    for file in metapass::audit::review::files_of(&daemon.audit_dir()).unwrap() {
        std::fs::remove_file(file).unwrap();
    }
    let refused = daemon.start_refused();
    assert!(refused.contains("ends at sequence 0"), "{refused}");
    let (ok, out) = daemon.verify_audit();
    assert!(!ok, "{out}");
}

/// Runs `metapass audit verify --public-key KEY` on `files`; returns (exit code, stdout).
fn verify_public(key: &Path, files: &[PathBuf]) -> (i32, String) {
    let mut args = vec![
        "audit".into(),
        "verify".into(),
        "--public-key".into(),
        key.into(),
    ];
    args.extend(files.iter().map(|f| f.as_os_str().to_owned()));
    run_metapass::<std::ffi::OsString>(args)
}

/// A reviewer with only the public key (`audit public-key`) verifies the log up to its last
/// signed checkpoint, and any edit, reordering, insertion or removal of a line before it fails;
/// so does a log signed by another key.
#[tokio::test]
async fn the_public_key_alone_verifies_the_signed_checkpoints() {
    let mut daemon = Daemon::start();
    let client = daemon.client();
    for round in 0..2 {
        for i in 0..4 {
            let id = new_instance();
            client.register(&id, "project-a").await;
            client
                .post_password(&id, "project-a", format!("r{round}-{i}"))
                .await;
        }
        // Past the checkpoint interval while events flow: the writer signs.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        client.get("/healthz", &[]).await;
    }
    assert!(daemon.terminate(), "a clean shutdown signs what is left");
    let checkpoints = audit_checkpoints(&daemon.audit_dir());
    assert!(checkpoints.len() >= 2, "{checkpoints:#?}");
    let validator = schema_validator();
    for checkpoint in &checkpoints {
        assert!(validator.is_valid(checkpoint), "{checkpoint:#}");
        assert_eq!(checkpoint["unmapped"]["caller_kind"], "system");
    }
    assert!(
        daemon.log_shows(&["audit checkpoint signed"]),
        "checkpoints also go to the operational log"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["audit", "public-key", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = String::from_utf8(out.stdout).unwrap();
    assert!(
        public.starts_with("ed25519:") && public.trim().len() == 8 + 64,
        "{public}"
    );
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("audit.pub");
    std::fs::write(&key_file, &public).unwrap();

    let files = metapass::audit::review::files_of(&daemon.audit_dir()).unwrap();
    let (code, out) = verify_public(&key_file, &files);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("checkpoints verified with the public key"),
        "{out}"
    );
    assert!(
        !out.contains("unsealed"),
        "shutdown sealed everything: {out}"
    );

    // After a restart the writer continues the segment from the last checkpoint; and lines
    // written after the last checkpoint of a killed daemon are reported unsealed.
    daemon.restart();
    daemon.client().register(&new_instance(), "project-a").await;
    assert!(daemon.terminate());
    let (code, out) = verify_public(&key_file, &files);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("unsealed"), "{out}");
    daemon.restart();
    daemon.client().register(&new_instance(), "project-a").await;
    daemon.kill();
    let (code, out) = verify_public(&key_file, &files);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("unsealed: sequence"), "{out}");

    // Tampering before the last checkpoint, in a copy.
    let copy = |edit: &dyn Fn(&mut Vec<String>)| -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut copies = Vec::new();
        for f in &files {
            let to = dir.path().join(f.file_name().unwrap());
            std::fs::copy(f, &to).unwrap();
            copies.push(to);
        }
        edit_lines(&copies[0], |lines| edit(lines));
        let result = verify_public(&key_file, &copies);
        drop(dir);
        result
    };
    let edited = copy(&|lines| lines[2] = lines[2].replace("project-a", "project-b"));
    assert_eq!(edited.0, 1, "{}", edited.1);
    assert!(edited.1.contains("not the ones it signed"), "{}", edited.1);
    let reordered = copy(&|lines| lines.swap(1, 2));
    assert_eq!(reordered.0, 1, "{}", reordered.1);
    let inserted = copy(&|lines| {
        let again = lines[1].clone();
        lines.insert(2, again);
    });
    assert_eq!(inserted.0, 1, "{}", inserted.1);
    let removed = copy(&|lines| {
        lines.remove(3);
    });
    assert_eq!(removed.0, 1, "{}", removed.1);

    // Another log's key does not verify this one.
    let other_secret = keys.path().join("other-audit-key.toml");
    std::fs::write(&other_secret, format!("secret = \"{}\"\n", "ab".repeat(32))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["audit", "public-key", "--audit-key"])
        .arg(&other_secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let other_public = keys.path().join("other.pub");
    std::fs::write(&other_public, out.stdout).unwrap();
    let (code, out) = verify_public(&other_public, &files);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("signature does not verify"), "{out}");

    // The chain key's verification is unchanged by the checkpoints among the events.
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
}

/// Every kind of event a run produces (each operation and refusal of the mixed traffic, the
/// unparsable request, the startup keyring load, signed checkpoints, the incident of a lost live
/// file) validates against the real OCSF schema files of the version it declares: no unknown
/// attribute, every value of its type and in its enum, every requirement and constraint met.
#[tokio::test]
async fn every_event_validates_against_the_real_ocsf_schema() {
    let Some(schema) = ocsf_schema_dir() else {
        eprintln!(
            "SKIPPED: the OCSF {} schema files are not available (set METAPASS_OCSF_SCHEMA to a checkout of ocsf/ocsf-schema at that tag, or put them at ../shared/ocsf-schema/)",
            metapass::audit::event::OCSF_VERSION
        );
        return;
    };
    let mut daemon = Daemon::start();
    let client = daemon.client();
    mixed_traffic(&client).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    client.get("/healthz", &[]).await; // a checkpoint is due
    let live = metapass::audit::review::files_of(&daemon.audit_dir()).unwrap();
    let kept = tempfile::tempdir().unwrap();
    let mut copies = Vec::new();
    for file in &live {
        let copy = kept.path().join(file.file_name().unwrap());
        std::fs::copy(file, &copy).unwrap();
        copies.push(copy);
    }
    std::fs::remove_file(live.last().unwrap()).unwrap();
    client.get("/healthz", &[]).await; // refused: the file is gone
    client.get("/healthz", &[]).await; // the new file opens with the incident
    assert!(daemon.terminate());
    let mut files = copies;
    files.extend(metapass::audit::review::files_of(&daemon.audit_dir()).unwrap());
    let operations: std::collections::BTreeSet<String> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .map(|l| {
            serde_json::from_str::<Value>(&l).unwrap()["api"]["operation"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for expected in [
        "audit:file_lost",
        "audit:checkpoint",
        "http:unparsed",
        "password:set",
    ] {
        assert!(
            operations.contains(expected),
            "{expected} not in {operations:?}"
        );
    }
    let (ok, report) = validate_ocsf(&schema, &files);
    assert!(ok, "{report}");
    assert!(report.contains(": 0 problems"), "{report}");
    // The validator is no rubber stamp: metapass's former top-level chain fields, an unknown
    // enum value and a user without uid, name or account are each refused.
    let bad = kept.path().join("bad.jsonl");
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&files[0])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let mut lines = Vec::new();
    for edit in [
        |e: &mut Value| e["seq"] = Value::from(1),
        |e: &mut Value| e["severity_id"] = Value::from(42),
        |e: &mut Value| e["actor"]["user"] = serde_json::json!({"type_id": 0, "type": "Unknown"}),
    ] {
        let mut e = first.clone();
        edit(&mut e);
        lines.push(e.to_string());
    }
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let (ok, report) = validate_ocsf(&schema, &[bad]);
    assert!(!ok, "{report}");
    for problem in [
        "unknown attribute 'seq'",
        "severity_id: value 42",
        "at_least_one",
    ] {
        assert!(report.contains(problem), "{problem}: {report}");
    }
}
