//! Keys at rest: the keyring CLI, rotation with online re-encryption, refusals of keyrings that
//! cannot open the store, the per-key seal limit, rollback protection, keyrings from the
//! environment or a descriptor, and core dumps off while serving. The real daemon over TLS on a
//! real SQLite file throughout.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::Value;

const A: &str = "project-a";

/// Runs the `metapass` binary with `args`; returns (success, stdout, stderr).
fn metapass(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(args)
        .output()
        .expect("run metapass");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `metapass args...`, which must succeed; returns its stdout.
fn metapass_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = metapass(args);
    assert!(ok, "{args:?}: {stderr}");
    stdout
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The secrets of a keyring file, by key id.
fn secrets_of(keyring: &Path) -> Vec<(u64, String)> {
    let value: toml::Value = toml::from_str(&std::fs::read_to_string(keyring).unwrap()).unwrap();
    value["key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_integer().unwrap() as u64,
                k["secret"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A fresh keyring file (`metapass keys generate`) in `dir`.
fn generated_keyring(dir: &Path) -> PathBuf {
    let keyring = dir.join("keyring.toml");
    metapass_ok(&["keys", "generate", "--out", path_str(&keyring)]);
    keyring
}

/// The dev config using `keyring` as its keyring file, with `keys_extra` (TOML lines) added to
/// its `[keys]` table.
fn config_with_keyring(dir: &Path, keyring: &Path, keys_extra: &str) -> PathBuf {
    let dev_keyring = format!("{:?}", repo().join("policy/dev-keyring.toml"));
    config_with(dir, |text| {
        assert!(
            text.contains(&dev_keyring),
            "the dev config names its keyring"
        );
        // The dev config's own rewrap settings give way to `keys_extra`.
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("rewrap"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.replace(
            &format!("file = {dev_keyring}"),
            &format!("file = {keyring:?}\n{keys_extra}"),
        )
    })
}

/// `GET /admin/v1/keys` as the admin.
async fn key_status(client: &Client) -> Value {
    let reply = client
        .get("/admin/v1/keys", &[("x-auth-token", ADMIN_TOKEN)])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// How many passwords key `id` seals, by `GET /admin/v1/keys` (0 if it is not listed).
fn records_under(status: &Value, id: u64) -> u64 {
    status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .map_or(0, |k| k["records"].as_u64().unwrap())
}

/// `POST` to an admin keys endpoint as the admin.
async fn admin_post(client: &Client, path: &str) -> Reply {
    client
        .send(Method::POST, path, &[("x-auth-token", ADMIN_TOKEN)], "")
        .await
}

/// Registers `count` instances of project-a and posts `pw-<id>` for each; returns their ids.
async fn instances_with_passwords(client: &Client, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let id = new_instance();
        client.register(&id, A).await;
        let reply = client.post_password(&id, A, format!("pw-{id}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        ids.push(id);
    }
    ids
}

async fn assert_all_read_back(client: &Client, ids: &[String]) {
    for id in ids {
        let reply = client.get_password(id, A).await;
        assert_eq!(reply.status, 200, "{id}: {}", reply.text());
        assert_eq!(reply.text(), format!("pw-{id}"));
    }
}

/// The system events of `operation` so far.
fn events_of(daemon: &Daemon, operation: &str) -> Vec<Value> {
    daemon
        .audit_events()
        .into_iter()
        .filter(|e| e["api"]["operation"] == operation)
        .collect()
}

/// Waits up to 10 s for `count` events of `operation`; returns them.
fn wait_for_events(daemon: &Daemon, operation: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = events_of(daemon, operation);
        if events.len() >= count || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_keyring_cli_generates_rotates_and_retires_without_printing_secrets() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.toml");
    let printed = metapass_ok(&["keys", "generate", "--out", path_str(&keyring)]);
    let mode = std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a new keyring is owner-only");
    let first = secrets_of(&keyring);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, 1);
    assert_eq!(first[0].1.len(), 64, "a 256-bit key in hex");
    assert!(
        !printed.contains(&first[0].1),
        "generate printed the secret"
    );

    // Never overwrites.
    let (ok, _, stderr) = metapass(&["keys", "generate", "--out", path_str(&keyring)]);
    assert!(!ok, "generate overwrote a keyring");
    assert!(stderr.contains("exists"), "{stderr}");
    assert_eq!(secrets_of(&keyring), first);

    // Rotate adds key 2 and makes it active; key 1 is kept exactly.
    let printed = metapass_ok(&["keys", "rotate", "--file", path_str(&keyring)]);
    let second = secrets_of(&keyring);
    assert_eq!(second.len(), 2);
    assert_eq!(second[0], first[0]);
    assert_eq!(second[1].0, 2);
    assert_ne!(second[1].1, first[0].1);
    assert!(printed.contains("added key 2"), "{printed}");
    assert!(second.iter().all(|(_, s)| !printed.contains(s.as_str())));
    let mode = std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a rotated keyring stays owner-only");
    let text = std::fs::read_to_string(&keyring).unwrap();
    assert!(text.contains("active = 2"), "{text}");

    // The active key cannot be retired; an unknown one is named; key 1 can go.
    let (ok, _, stderr) = metapass(&["keys", "retire", "--file", path_str(&keyring), "--id", "2"]);
    assert!(!ok && stderr.contains("active key"), "{stderr}");
    let (ok, _, stderr) = metapass(&["keys", "retire", "--file", path_str(&keyring), "--id", "9"]);
    assert!(!ok && stderr.contains("no key 9"), "{stderr}");
    metapass_ok(&["keys", "retire", "--file", path_str(&keyring), "--id", "1"]);
    assert_eq!(secrets_of(&keyring), vec![second[1].clone()]);

    // A broken keyring is refused without quoting its contents.
    std::fs::write(
        &keyring,
        "active = 1\n[[key]]\nid = 1\nsecret = \"not-hex-sekrit\"\n",
    )
    .unwrap();
    let (ok, _, stderr) = metapass(&["keys", "rotate", "--file", path_str(&keyring)]);
    assert!(!ok, "a broken keyring was rotated");
    assert!(!stderr.contains("not-hex-sekrit"), "{stderr}");
}

#[tokio::test]
async fn rotation_reseals_every_password_online_and_retire_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = generated_keyring(dir.path());
    let config = config_with_keyring(
        dir.path(),
        &keyring,
        "rewrap = \"manual\"\nrewrap_batch = 4\nrewrap_pause_ms = 10",
    );
    let daemon = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    let client = daemon.client();
    let old = instances_with_passwords(&client, 10).await;
    // The chunks sealed under key 1, to look for after the rewrap.
    let under_key_1: Vec<Vec<u8>> = old
        .iter()
        .flat_map(|id| chunks_of(&daemon.db_path(), id))
        .map(|(_, value)| value)
        .collect();

    let status = key_status(&client).await;
    assert_eq!(status["active"], 1);
    assert_eq!(records_under(&status, 1), 10);
    assert_eq!(status["keys"][0]["seals"], 10);
    assert_eq!(status["rewrap"]["mode"], "manual");
    assert!(
        !status.to_string().contains(&secrets_of(&keyring)[0].1),
        "the status shows a secret"
    );
    let cli = metapass_ok(&[
        "keys",
        "status",
        "--config",
        path_str(&config),
        "--data-dir",
        path_str(&daemon.data_dir()),
    ]);
    assert!(
        cli.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "yes", "yes", "10", "10"]),
        "{cli}"
    );

    // Rotate, reload by SIGHUP: new passwords are sealed under key 2, old ones still open.
    metapass_ok(&["keys", "rotate", "--config", path_str(&config)]);
    signal(daemon.pid(), "HUP");
    let reloads = wait_for_events(&daemon, "keys:reload", 1);
    assert_eq!(reloads.len(), 1, "one keys:reload event");
    assert_eq!(reloads[0]["status_id"], 1, "{}", reloads[0]);
    assert_eq!(reloads[0]["unmapped"]["key_id"], 2);
    assert_eq!(reloads[0]["unmapped"]["previous_key_id"], 1);
    let new = instances_with_passwords(&client, 2).await;
    let status = key_status(&client).await;
    assert_eq!(status["active"], 2);
    assert_eq!(records_under(&status, 1), 10);
    assert_eq!(records_under(&status, 2), 2);
    assert_eq!(status["rewrap"]["pending"], 10);
    assert_all_read_back(&client, &old).await;

    // Key 1 still seals passwords: retiring it is refused.
    let data_dir = daemon.data_dir();
    let retire_key_1 = [
        "keys",
        "retire",
        "--config",
        path_str(&config),
        "--data-dir",
        path_str(&data_dir),
        "--id",
        "1",
    ];
    let (ok, _, stderr) = metapass(&retire_key_1);
    assert!(!ok, "retired a key that passwords still need");
    assert!(stderr.contains("still seals 10 passwords"), "{stderr}");

    // The admin asks for the rewrap; every old password moves to key 2 and still reads back.
    let reply = admin_post(&client, "/admin/v1/keys/rewrap").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while records_under(&key_status(&client).await, 1) > 0 {
        assert!(Instant::now() < deadline, "the rewrap did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = key_status(&client).await;
    assert_eq!(records_under(&status, 2), 12);
    assert_eq!(status["rewrap"]["rewrapped"], 10);
    // The old key's ciphertext is gone from the files (secure_delete wiped the pages, and each
    // rewrap batch truncated the WAL): a copy taken now does not open with the retired key. The
    // status above sees the last batch's commit a moment before that batch truncates the WAL, so
    // the files are read until they are clean, within a bound.
    let remaining = || {
        ["metapass.sqlite3", "metapass.sqlite3-wal"]
            .into_iter()
            .filter(|file| {
                let bytes = std::fs::read(daemon.data_dir().join(file)).unwrap_or_default();
                under_key_1
                    .iter()
                    .any(|chunk| bytes.windows(32).any(|w| w == &chunk[..32]))
            })
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !remaining().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        remaining(),
        Vec::<&str>::new(),
        "key 1's ciphertext remains"
    );
    assert_eq!(status["rewrap"]["unreadable"], 0);
    assert_all_read_back(&client, &old).await;
    assert_all_read_back(&client, &new).await;
    let rewraps = wait_for_events(&daemon, "password:rewrap", 10);
    assert_eq!(rewraps.len(), 10, "one event per resealed password");
    for id in &old {
        let event = rewraps
            .iter()
            .find(|e| e["resources"][0]["uid"] == id.as_str())
            .unwrap_or_else(|| panic!("no rewrap event for {id}"));
        assert_eq!(event["status_id"], 1);
        assert_eq!(event["unmapped"]["key_id"], 2);
        assert_eq!(event["unmapped"]["previous_key_id"], 1);
        assert_eq!(event["unmapped"]["caller_kind"], "system");
    }

    // Now key 1 may go, and the daemon takes the smaller keyring.
    metapass_ok(&retire_key_1);
    let reply = admin_post(&client, "/admin/v1/keys/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // Key 1 stays listed (its seal count is history) but is no longer held.
    let keys = reply.json()["keys"].clone();
    let held: Vec<u64> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["loaded"] == true)
        .map(|k| k["id"].as_u64().unwrap())
        .collect();
    assert_eq!(held, [2], "{keys}");
    assert_eq!(keys[0]["id"], 1);
    assert_eq!(keys[0]["records"], 0);
    assert_all_read_back(&client, &old).await;

    // The key operations are in the audit log, and the chain verifies.
    let events = daemon.audit_events();
    let schema = schema_validator();
    for event in &events {
        assert!(schema.is_valid(event), "{event}");
    }
    let operations: Vec<&str> = events
        .iter()
        .filter_map(|e| e["api"]["operation"].as_str())
        .filter(|op| op.starts_with("keys:"))
        .collect();
    assert_eq!(operations.first(), Some(&"keys:load"));
    assert!(operations.contains(&"keys:rewrap") && operations.contains(&"keys:status"));
    assert_eq!(
        operations.iter().filter(|op| **op == "keys:reload").count(),
        2
    );
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
    assert_valid_ocsf(&daemon);
}

#[tokio::test]
async fn the_automatic_rewrap_runs_while_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = generated_keyring(dir.path());
    let config = config_with_keyring(
        dir.path(),
        &keyring,
        "rewrap_batch = 2\nrewrap_pause_ms = 30",
    );
    let daemon = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    let client = daemon.client();
    let ids = instances_with_passwords(&client, 24).await;
    metapass_ok(&["keys", "rotate", "--file", path_str(&keyring)]);
    let reply = admin_post(&client, "/admin/v1/keys/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["active"], 2);
    // 12 batches with a 30 ms pause: reads run all along and every one answers the password.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reads_during = 0;
    loop {
        let status = key_status(&client).await;
        if records_under(&status, 1) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rewrap did not finish: {status}"
        );
        let id = &ids[reads_during % ids.len()];
        let reply = client.get_password(id, A).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("pw-{id}"));
        reads_during += 1;
    }
    assert!(reads_during > 0, "the rewrap finished before any read");
    assert_eq!(records_under(&key_status(&client).await, 2), 24);
    assert_all_read_back(&client, &ids).await;
    assert_eq!(wait_for_events(&daemon, "password:rewrap", 24).len(), 24);
}

/// Starts `metapass serve` on an existing data directory, expecting it to refuse; returns stderr.
fn serve_refuses_on(config: &Path, data_dir: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["serve", "--config", path_str(config)])
        .args(["--listen", "127.0.0.1:0", "--data-dir", path_str(data_dir)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started with a keyring it should refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_keyring_that_cannot_open_the_store_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = generated_keyring(dir.path());
    let original = std::fs::read(&keyring).unwrap();
    let config = config_with_keyring(dir.path(), &keyring, "");
    let mut daemon = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    let client = daemon.client();
    let ids = instances_with_passwords(&client, 3).await;

    // 1. Another secret under the same id (a keyring from the wrong environment).
    let other_dir = tempfile::tempdir().unwrap();
    let impostor = generated_keyring(other_dir.path());
    let impostor_text = std::fs::read(&impostor).unwrap();
    std::fs::copy(&impostor, &keyring).unwrap();
    let reply = admin_post(&client, "/admin/v1/keys/reload").await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(
        reply.error_message().contains("another secret"),
        "{}",
        reply.text()
    );
    let events = daemon.request_events();
    let event = event_for(&events, &reply.request_id());
    assert_eq!(event["unmapped"]["reason"], "keyring_refused");
    assert_eq!(event["api"]["operation"], "keys:reload");
    assert_all_read_back(&client, &ids).await;
    let posted = instances_with_passwords(&client, 1).await;

    // 2. A keyring without the key the passwords are sealed under (retired too early), by SIGHUP.
    metapass_ok(&["keys", "rotate", "--file", path_str(&impostor)]);
    metapass_ok(&["keys", "retire", "--file", path_str(&impostor), "--id", "1"]);
    std::fs::copy(&impostor, &keyring).unwrap();
    signal(daemon.pid(), "HUP");
    let reloads = wait_for_events(&daemon, "keys:reload", 2);
    let refused = reloads.last().expect("a keys:reload event");
    assert_eq!(
        refused["unmapped"]["reason"], "keyring_refused",
        "{refused}"
    );
    assert!(daemon.log_shows(&["keyring reload refused", "key 1 (4 passwords)"]));
    assert_all_read_back(&client, &ids).await;
    assert_all_read_back(&client, &posted).await;
    assert_eq!(
        key_status(&client).await["active"],
        1,
        "the keys in use stay"
    );

    // 3. Neither keyring starts a daemon on this store; the right one does.
    daemon.kill();
    let stderr = serve_refuses_on(&config, &daemon.data_dir());
    assert!(stderr.contains("key 1 (4 passwords)"), "{stderr}");
    std::fs::write(&keyring, &impostor_text).unwrap();
    let stderr = serve_refuses_on(&config, &daemon.data_dir());
    assert!(stderr.contains("another secret"), "{stderr}");
    for (_, secret) in secrets_of(&keyring) {
        assert!(!stderr.contains(&secret), "a secret in the refusal");
    }
    std::fs::write(&keyring, &original).unwrap();
    daemon.restart();
    assert_all_read_back(&daemon.client(), &ids).await;
    let loads = events_of(&daemon, "keys:load");
    assert_eq!(loads.len(), 4, "two refused starts and two good ones");
    assert_eq!(loads[1]["unmapped"]["reason"], "keyring_refused");
    assert_eq!(loads[3]["status_id"], 1);
}

#[tokio::test]
async fn a_key_refuses_to_seal_past_its_limit_until_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = generated_keyring(dir.path());
    let config = config_with_keyring(dir.path(), &keyring, "");
    let daemon = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    let client = daemon.client();
    let status = key_status(&client).await;
    let limit = status["seal_limit"].as_u64().unwrap();
    assert_eq!(limit, 1 << 30);

    // Pretend key 1 has sealed all but one of its allowance.
    let conn = rusqlite::Connection::open(daemon.db_path()).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute(
        "UPDATE data_keys SET seals = ?1 WHERE key_id = 1",
        [(limit - 1) as i64],
    )
    .unwrap();
    let ids: Vec<String> = (0..3).map(|_| new_instance()).collect();
    for id in &ids {
        client.register(id, A).await;
    }
    assert_eq!(client.post_password(&ids[0], A, "last").await.status, 200);
    let refused = client.post_password(&ids[1], A, "one-too-many").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.error_message().contains("rotate"),
        "{}",
        refused.text()
    );
    let events = daemon.request_events();
    let event = event_for(&events, &refused.request_id());
    assert_eq!(event["unmapped"]["reason"], "key_exhausted");
    assert_eq!(event["unmapped"]["key_id"], 1);
    // Nothing was stored, and the guest may post again later.
    let empty = client.get_password(&ids[1], A).await;
    assert_eq!((empty.status, empty.body.len()), (200, 0));
    let status = key_status(&client).await;
    assert_eq!(status["keys"][0]["seals"].as_u64(), Some(limit));

    // Rotation lifts it.
    metapass_ok(&["keys", "rotate", "--file", path_str(&keyring)]);
    assert_eq!(
        admin_post(&client, "/admin/v1/keys/reload").await.status,
        200
    );
    assert_eq!(
        client.post_password(&ids[1], A, "rotated").await.status,
        200
    );
    assert_eq!(client.get_password(&ids[1], A).await.text(), "rotated");
    assert_eq!(client.get_password(&ids[0], A).await.text(), "last");
}

/// The password chunks of `id`, as stored.
fn chunks_of(db: &Path, id: &str) -> Vec<(String, Vec<u8>)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT key, value FROM instance_metadata WHERE instance_id = ?1 ORDER BY key")
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Puts `chunks` back as the stored password chunks of `id` (a restore from a backup).
fn restore_chunks(db: &Path, id: &str, chunks: &[(String, Vec<u8>)]) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("DELETE FROM instance_metadata WHERE instance_id = ?1", [id])
        .unwrap();
    for (key, value) in chunks {
        conn.execute(
            "INSERT INTO instance_metadata (instance_id, key, value) VALUES (?1, ?2, ?3)",
            rusqlite::params![id, key, value],
        )
        .unwrap();
    }
}

async fn assert_integrity(daemon: &Daemon, client: &Client, id: &str, case: &str) {
    let reply = client.get_password(id, A).await;
    assert_eq!(reply.status, 500, "{case}: {}", reply.text());
    assert!(reply.error_message().contains("integrity"), "{case}");
    let events = daemon.request_events();
    let event = event_for(&events, &reply.request_id());
    assert_eq!(event["unmapped"]["reason"], "integrity", "{case}");
}

#[tokio::test]
async fn old_records_restored_from_a_backup_and_unknown_keys_do_not_open() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let db = daemon.db_path();

    // 1. Cleared by its owner and posted again (a rebuild): the old record is stale.
    let rebuilt = new_instance();
    client.register(&rebuilt, A).await;
    client.post_password(&rebuilt, A, "before-rebuild").await;
    let backup = chunks_of(&db, &rebuilt);
    let clear = client
        .send(
            Method::DELETE,
            &format!("/v2.1/servers/{rebuilt}/os-server-password"),
            &[("x-auth-token", TOKEN_A)],
            "",
        )
        .await;
    assert_eq!(clear.status, 204, "{}", clear.text());
    client.post_password(&rebuilt, A, "after-rebuild").await;
    restore_chunks(&db, &rebuilt, &backup);
    assert_integrity(&daemon, &client, &rebuilt, "restored after a clear").await;

    // 2. Deleted, registered again and posted: versions are store-wide, so even a fresh
    //    registration never reuses the version the old record was sealed under.
    let recycled = new_instance();
    client.register(&recycled, A).await;
    client.post_password(&recycled, A, "first-life").await;
    let backup = chunks_of(&db, &recycled);
    let delete = client
        .send(
            Method::DELETE,
            &format!("/admin/v1/instances/{recycled}"),
            &[("x-auth-token", ADMIN_TOKEN)],
            "",
        )
        .await;
    assert_eq!(delete.status, 204, "{}", delete.text());
    client.register(&recycled, A).await;
    client.post_password(&recycled, A, "second-life").await;
    restore_chunks(&db, &recycled, &backup);
    assert_integrity(
        &daemon,
        &client,
        &recycled,
        "restored after re-registration",
    )
    .await;

    // 3. A record naming a key the keyring does not hold.
    let unknown = new_instance();
    client.register(&unknown, A).await;
    client.post_password(&unknown, A, "sealed").await;
    let mut chunks = chunks_of(&db, &unknown);
    chunks[0].1[1..5].copy_from_slice(&99u32.to_be_bytes());
    restore_chunks(&db, &unknown, &chunks);
    assert_integrity(&daemon, &client, &unknown, "unknown key id").await;

    // The current records of untouched instances still open.
    let fine = new_instance();
    client.register(&fine, A).await;
    client.post_password(&fine, A, "fine").await;
    assert_eq!(client.get_password(&fine, A).await.text(), "fine");
}

#[tokio::test]
async fn keyrings_from_the_environment_or_a_descriptor_are_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = generated_keyring(dir.path());
    let text = std::fs::read_to_string(&keyring).unwrap();
    let secret = secrets_of(&keyring)[0].1.clone();
    let dev_keyring = format!("file = {:?}", repo().join("policy/dev-keyring.toml"));
    let from = |source: &str| {
        let sub = dir.path().join(source.split(' ').next().unwrap());
        std::fs::create_dir_all(&sub).unwrap();
        config_with(&sub, |t| t.replace(&dev_keyring, source))
    };
    let env_assignment = format!("METAPASS_TEST_KEYRING={text}");
    let keyring_arg = path_str(&keyring).to_owned();
    let cases: [(PathBuf, Vec<&str>, &str); 2] = [
        (
            from("env = \"METAPASS_TEST_KEYRING\""),
            vec!["env", &env_assignment],
            "environment variable METAPASS_TEST_KEYRING",
        ),
        (
            from("fd = 3"),
            // bash opens the keyring as descriptor 3 and execs the daemon with it.
            vec!["bash", "-c", "exec \"$@\" 3<\"$0\"", &keyring_arg],
            "file descriptor 3",
        ),
    ];
    for (config, wrapper, described) in &cases {
        let daemon = Daemon::start_wrapped(config, tempfile::tempdir().unwrap(), wrapper);
        let client = daemon.client();
        let ids = instances_with_passwords(&client, 1).await;
        assert_all_read_back(&client, &ids).await;
        let status = key_status(&client).await;
        assert_eq!(status["source"], *described, "{status}");
        assert_eq!(status["reloadable"], false);
        let reply = admin_post(&client, "/admin/v1/keys/reload").await;
        assert_eq!(reply.status, 409, "{}", reply.text());
        assert!(
            reply.error_message().contains("restart"),
            "{}",
            reply.text()
        );
        signal(daemon.pid(), "HUP");
        assert!(daemon.log_shows(&["keyring is read once; not reloaded"]));
        assert!(
            !daemon.log().contains(&secret),
            "the secret reached the log"
        );
        let events = std::fs::read_to_string(
            metapass::audit::review::files_of(&daemon.audit_dir()).unwrap()[0].clone(),
        )
        .unwrap();
        assert!(
            !events.contains(&secret),
            "the secret reached the audit log"
        );
    }
    // Unset or empty, the daemon does not start.
    let stderr = serve_must_fail(&cases[0].0);
    assert!(
        stderr.contains("METAPASS_TEST_KEYRING") && stderr.contains("not set"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serving_turns_core_dumps_off() {
    let daemon = Daemon::start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    assert!(daemon.log_shows(&["core dumps disabled", "dumpable=false"]));
}

#[tokio::test]
async fn the_key_endpoints_are_for_admins_only() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let anonymous = client.get("/admin/v1/keys", &[]).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    for token in [TOKEN_A, READER_A] {
        for (method, path) in [
            (Method::GET, "/admin/v1/keys"),
            (Method::POST, "/admin/v1/keys/reload"),
            (Method::POST, "/admin/v1/keys/rewrap"),
        ] {
            let reply = client
                .send(method.clone(), path, &[("x-auth-token", token)], "")
                .await;
            assert_eq!(reply.status, 403, "{method} {path}: {}", reply.text());
        }
    }
    let wrong = client
        .get("/admin/v1/keys/reload", &[("x-auth-token", ADMIN_TOKEN)])
        .await;
    assert_eq!(wrong.status, 405, "{}", wrong.text());
    assert_eq!(wrong.header("allow"), Some("POST"));
    let missing = client
        .get("/admin/v1/keys/other", &[("x-auth-token", ADMIN_TOKEN)])
        .await;
    assert_eq!(missing.status, 404);
    let events = daemon.request_events();
    assert_eq!(events.len(), 9, "one event per request");
    assert!(
        events[1..7]
            .iter()
            .all(|e| e["unmapped"]["reason"] == "forbidden"),
        "{events:?}"
    );
}

#[test]
fn the_audit_and_keys_commands_turn_core_dumps_off_too() {
    // `audit hash` waits for its value on standard input: look at it while it holds the audit
    // secret.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_metapass"))
        .args(["audit", "hash", "--audit-key"])
        .arg(repo().join("policy/dev-audit-key.toml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut core = String::new();
    for _ in 0..100 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
        core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap()
            .to_owned();
        // The hard limit: the soft one may already be 0 in the test's environment.
        if core.split_whitespace().nth(5) == Some("0") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(child.stdin.take());
    let _ = child.wait();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}
