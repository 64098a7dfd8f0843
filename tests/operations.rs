//! Operations: systemd readiness notifications and the store latency metric.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

/// The next notification systemd would receive, as text (waits up to 10 s).
fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()
}

#[tokio::test]
async fn systemd_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let assignment = format!("NOTIFY_SOCKET={}", path.display());
    let mut daemon = Daemon::start_wrapped(
        &dev_config(),
        tempfile::tempdir().unwrap(),
        &["env", &assignment],
    );
    // READY=1 comes once the listeners are bound (the harness saw them) and the keyring matched.
    assert_eq!(next_notification(&socket), "READY=1");
    assert_eq!(daemon.client().get("/readyz", &[]).await.status, 200);
    signal(daemon.pid(), "HUP");
    let reloading = next_notification(&socket);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next_notification(&socket), "READY=1");
    assert!(daemon.terminate(), "clean exit");
    assert_eq!(next_notification(&socket), "STOPPING=1");
}

#[tokio::test]
async fn store_latency_is_measured_by_backend_and_operation() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    client.post_password(&id, "project-a", "blob").await;
    client.get_password(&id, "project-a").await;
    let text = client.get("/metrics", &[]).await.text();
    for operation in ["register", "set_password_once", "password", "sync_keys"] {
        let line = format!(
            "metapass_store_seconds_count{{backend=\"sqlite\",operation=\"{operation}\"}} 1"
        );
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
}
