//! SIGTERM drains: a request in flight when the signal arrives is answered and audited, on every
//! listener, and the daemon then exits cleanly; new connections are no longer accepted.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_request_in_flight_at_sigterm_is_answered_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let listeners = "[[listener]]\nname = \"metadata\"\naddress = \"127.0.0.1:0\"\nserves = [\"instance\"]\n\n\
                     [[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nserves = [\"compute\", \"admin\"]\n";
    let config = config_with_listeners(dir.path(), listeners, |t| t);
    let mut daemon = Daemon::start_with(&config, dir);
    let (metadata, api) = (daemon.listeners["metadata"], daemon.listeners["api"]);
    let id = new_instance();
    Client::new(api).register(&id, "project-a").await;

    // A post whose body is still arriving when SIGTERM comes, on one listener...
    let sig = sign(&id);
    let blob = "c2VhbGVkLWR1cmluZy1zaHV0ZG93bg==";
    let mut post = Client::new(metadata).connect().await;
    let head = format!(
        "POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nX-Instance-ID: {id}\r\n\
         X-Tenant-ID: project-a\r\nX-Instance-ID-Signature: {sig}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        blob.len()
    );
    post.write_all(head.as_bytes()).await.unwrap();
    post.write_all(&blob.as_bytes()[..8]).await.unwrap();
    post.flush().await.unwrap();
    // ...and a read whose head is half sent, on the other.
    let mut read = Client::new(api).connect().await;
    read.write_all(
        format!("GET /v2.1/servers/{id}/os-server-password HTTP/1.1\r\nHost: x\r\n").as_bytes(),
    )
    .await
    .unwrap();
    read.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    signal(daemon.pid(), "TERM");
    // The listening sockets close once the accept loops stop.
    let mut closed = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(metadata).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "no new connections once draining");

    post.write_all(&blob.as_bytes()[8..]).await.unwrap();
    post.flush().await.unwrap();
    let (status, answer) = read_answer(&mut post).await;
    assert_eq!(status, Some(200), "{answer}");
    read.write_all(format!("X-Auth-Token: {TOKEN_A}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, answer) = read_answer(&mut read).await;
    assert_eq!(status, Some(200), "{answer}");
    assert!(answer.contains(blob));

    assert!(
        daemon.terminate(),
        "the daemon exits cleanly after draining"
    );
    let events = daemon.audit_events();
    let posted = events
        .iter()
        .filter(|e| e["api"]["operation"] == "password:set" && e["status_code"] == "200")
        .count();
    assert_eq!(posted, 1, "the drained post is audited");
    assert!(daemon.log().contains("all connections drained"));
}
