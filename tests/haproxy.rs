//! HAProxy for real (Debian's `haproxy`), running `deploy/haproxy.cfg` adapted to loopback in front
//! of metapass and a stand-in for the rest of Nova (tests/haproxy/nova_standin.py): every spelling
//! of the password path reaches metapass and none reaches Nova, the metadata agents' certificate
//! is required at the edge, and the owner clients work through the split (their version document
//! from Nova, the password from metapass). Says SKIPPED without `haproxy` on the PATH.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http::Method;

/// A child process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// metapass as deploy/metapass.toml separates it: the instance API (certificates required, the
/// proxy's certificate for signed headers), the compute API behind PROXY v2, a health listener
/// for HAProxy's checks, and an admin listener for the test to register instances.
fn metapass(dir: tempfile::TempDir) -> Daemon {
    let listeners = r#"
[[listener]]
name = "metadata"
address = "127.0.0.1:0"
serves = ["instance"]
client_auth = "required"

[[listener]]
name = "compute"
address = "127.0.0.1:0"
serves = ["compute"]
client_auth = "optional"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]

[[listener]]
name = "health"
address = "127.0.0.1:0"
serves = ["ops"]
client_auth = "required"

[[listener]]
name = "admin"
address = "127.0.0.1:0"
serves = ["admin"]
client_auth = "optional"
"#;
    let config = config_with_listeners(dir.path(), listeners, |text| {
        text.replace(
            "proxy_auth = \"signature\"",
            "proxy_auth = \"mtls+signature\"",
        )
    });
    Daemon::start_with(&config, dir)
}

/// `deploy/haproxy.cfg` with its addresses, certificates and names made local. Every replacement
/// must apply, so a change to the example's shape fails here rather than testing something else.
fn adapted_config(
    work: &Path,
    edge: (u16, u16),
    metapass: &Daemon,
    nova: (u16, u16),
) -> std::path::PathBuf {
    let certs = repo().join("certs-dev");
    let bundle = |name: &str, out: &str| {
        let pem = std::fs::read_to_string(certs.join(format!("{name}.pem"))).unwrap();
        let key = std::fs::read_to_string(certs.join(format!("{name}.key"))).unwrap();
        let path = work.join(out);
        std::fs::write(&path, format!("{pem}{key}")).unwrap();
        path.display().to_string()
    };
    let server = bundle("server", "server-bundle.pem");
    let proxy = bundle("proxy", "proxy-bundle.pem");
    let ca = certs.join("ca.pem").display().to_string();
    let l = &metapass.listeners;
    let mut text = std::fs::read_to_string(repo().join("deploy/haproxy.cfg")).unwrap();
    let replacements = [
        (
            "log stdout format raw local0",
            "log stderr format raw local0".to_owned(),
        ),
        ("10.0.0.10:8775", format!("127.0.0.1:{}", edge.0)),
        ("10.0.0.10:8774", format!("127.0.0.1:{}", edge.1)),
        ("10.0.1.11:8775", l["metadata"].to_string()),
        ("10.0.1.11:8774", l["compute"].to_string()),
        (
            "check port 9776",
            format!("check port {}", l["health"].port()),
        ),
        ("10.0.2.10:8775", format!("127.0.0.1:{}", nova.0)),
        ("10.0.2.10:8774", format!("127.0.0.1:{}", nova.1)),
        ("/etc/haproxy/metadata.pem", server.clone()),
        ("/etc/haproxy/compute.pem", server),
        ("/etc/haproxy/metadata-agents-ca.pem", ca.clone()),
        ("/etc/haproxy/metapass-ca.pem", ca),
        ("/etc/haproxy/metadata-proxy-client.pem", proxy.clone()),
        ("/etc/haproxy/health-client.pem", proxy),
        (
            "metadata-agent.example.internal",
            "metadata-proxy.dev.invalid".to_owned(),
        ),
    ];
    for (from, to) in &replacements {
        assert!(
            text.contains(from),
            "deploy/haproxy.cfg no longer has {from}"
        );
        text = text.replace(from, to);
    }
    // One replica of each: the example's others are not running here.
    let before = text.lines().count();
    text = text
        .lines()
        .filter(|line| !line.contains("server metapass-2") && !line.contains("server metapass-3"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        before - text.lines().count(),
        4,
        "two spare replicas per backend"
    );
    assert!(!text.contains("10.0."), "every example address replaced");
    let path = work.join("haproxy.cfg");
    std::fs::write(&path, text + "\n").unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn haproxy_routes_every_password_spelling_to_metapass_and_keeps_its_guarantees() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let daemon = metapass(tempfile::tempdir().unwrap());

    let seen = work.path().join("nova-seen.log");
    std::fs::write(&seen, "").unwrap();
    let mut standin = Command::new("python3")
        .arg(repo().join("tests/haproxy/nova_standin.py"))
        .arg(&seen)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut ports = String::new();
    BufReader::new(standin.stdout.take().unwrap())
        .read_line(&mut ports)
        .unwrap();
    let _standin = Running(standin);
    let nova: Vec<u16> = ports
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();

    let edge = (free_port(), free_port());
    let config = adapted_config(work.path(), edge, &daemon, (nova[0], nova[1]));
    let check = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let log = std::fs::File::create(work.path().join("haproxy.log")).unwrap();
    let _haproxy = Running(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let metadata: SocketAddr = format!("127.0.0.1:{}", edge.0).parse().unwrap();
    let agent = Client::with_cert(metadata, "proxy");

    // The instance, registered; the guest posts through HAProxy (once HAProxy serves).
    let id = new_instance();
    Client::new(daemon.listeners["admin"])
        .register(&id, "project-a")
        .await;
    let sig = sign(&id);
    let headers = proxy_headers(&id, "project-a", &sig);
    let mut posted = None;
    for _ in 0..100 {
        if let Ok(reply) = agent
            .try_send(Method::POST, "/openstack/latest/password", &headers, "pw")
            .await
            && reply.status != 503
        {
            posted = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let posted = posted.expect("HAProxy never served");
    assert_eq!(posted.status, 200, "{}", posted.text());

    // Every spelling Nova routes to its password handler reaches metapass through HAProxy.
    for path in [
        "/openstack/latest/password",
        "/openstack/latest/password/",
        "/openstack/latest//password",
        "/openstack//latest/password",
        "/openstack/./latest/password",
        "/openstack/2013-04-04/x/../password",
        "/x/../openstack/latest/password",
        "/openstack/latest/%70assword",
        "/%6fpenstack/latest/password",
    ] {
        let reply = agent.get(path, &headers).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(reply.text(), "pw", "{path}");
        assert!(
            reply.header("x-request-id").is_some(),
            "{path}: metapass answered"
        );
        let again = agent.send(Method::POST, path, &headers, "other").await;
        assert_eq!(again.status, 409, "{path}: set-once holds");
    }
    // Spellings Nova would not route to its handler still go to metapass (the rule is wider than
    // Nova's routing), which answers them as Nova would: 404.
    for path in [
        "/openstack/latest/%50assword",
        "/openstack/latest/password/x",
    ] {
        let reply = agent.get(path, &headers).await;
        assert_eq!(reply.status, 404, "{path}");
        assert!(
            reply.header("x-request-id").is_some(),
            "{path}: metapass answered"
        );
    }
    // The rest of the metadata tree is still Nova's.
    let other = agent
        .get("/openstack/latest/meta_data.json", &headers)
        .await;
    assert_eq!(other.header("x-stand-in"), Some("nova-metadata"));

    // The edge: no certificate, no session; another certificate of the CA, 403 from HAProxy.
    assert!(
        Client::new(metadata)
            .try_send(Method::GET, "/openstack/latest/password", &headers, "")
            .await
            .is_err(),
        "a connection without the agent's certificate got through"
    );
    let instance = Client::with_cert(metadata, "instance-1")
        .get("/openstack/latest/password", &[])
        .await;
    assert_eq!(instance.status, 403);
    assert!(
        instance.header("x-request-id").is_none(),
        "refused at the edge"
    );

    // The owner clients through the compute frontend: Nova's version document, metapass's password.
    let urls = (
        format!("https://127.0.0.1:{}", edge.0),
        format!("https://127.0.0.1:{}", edge.1),
    );
    let repo_dir = repo();
    let owner_id = new_instance();
    Client::new(daemon.listeners["admin"])
        .register(&owner_id, "project-a")
        .await;
    let work_dir = work.path().to_str().unwrap().to_owned();
    let script_id = owner_id.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_interop_script(
            "haproxy_owner_clients.py",
            &[
                &urls.0,
                &urls.1,
                &script_id,
                repo_dir.to_str().unwrap(),
                &work_dir,
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.trim_end().ends_with("OK"), "{out}");

    // Nova saw the discovery and server lookups, never a password request.
    let nova_seen = std::fs::read_to_string(&seen).unwrap();
    assert!(nova_seen.contains("compute GET /v2.1"), "{nova_seen}");
    assert!(
        nova_seen.contains(&format!("/servers/{owner_id}")),
        "{nova_seen}"
    );
    assert!(
        !nova_seen.to_lowercase().contains("password"),
        "a password request reached Nova: {nova_seen}"
    );
    // metapass audited the owner's requests with the client's address from PROXY v2, and the
    // guest's with the agent's X-Forwarded-For.
    let events = daemon.audit_events();
    let owner_reads: Vec<_> = events
        .iter()
        .filter(|e| {
            e["unmapped"]["listener"] == "compute" && e["api"]["operation"] == "password:get"
        })
        .collect();
    assert!(!owner_reads.is_empty());
    assert!(owner_reads.iter().all(|e| e["status_code"] == "200"));
    let guest_posts = events
        .iter()
        .filter(|e| {
            e["unmapped"]["listener"] == "metadata" && e["api"]["operation"] == "password:set"
        })
        .count();
    assert!(guest_posts >= 11, "{guest_posts}");
    let (ok, report) = daemon.verify_audit();
    assert!(ok, "{report}");
}
