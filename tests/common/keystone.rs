//! The real Keystone that `tests/keystone/keystone-up` brought up (scripts/test-all does, and
//! exports `METAPASS_TEST_KEYSTONE` with its fixtures file): its users, tokens from it, and
//! metapass configurations that validate against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};

use super::{Client, config_with, repo};

/// The fixtures of the shared test Keystone.
pub struct Keystone {
    fixtures: Value,
}

/// The shared test Keystone, or `None` (the test then says SKIPPED) when it is not configured.
pub fn shared() -> Option<Keystone> {
    let Ok(path) = std::env::var("METAPASS_TEST_KEYSTONE") else {
        eprintln!("SKIPPED: METAPASS_TEST_KEYSTONE is not set (scripts/test-all sets it)");
        return None;
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Some(Keystone {
        fixtures: serde_json::from_str(&text).expect("fixtures JSON"),
    })
}

/// `host:port` of a URL such as `https://127.0.0.1:5000`.
fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .expect("auth_url is https://IP:PORT")
}

impl Keystone {
    /// Its base URL.
    pub fn auth_url(&self) -> String {
        self.fixtures["auth_url"].as_str().unwrap().to_owned()
    }

    /// The Keystone id of project `name` (`project-a`, `project-b`, `admin`, `service`).
    pub fn project_id(&self, name: &str) -> String {
        self.fixtures["projects"][name].as_str().unwrap().to_owned()
    }

    /// The Keystone id of user `name`.
    pub fn user_id(&self, name: &str) -> String {
        self.fixtures["users"][name]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A project-scoped token for user `name` (on the project the fixtures gave it), issued by
    /// the Keystone at `auth_url`.
    pub async fn token_from(&self, auth_url: &str, name: &str) -> String {
        let user = &self.fixtures["users"][name];
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": name, "domain": {"id": "default"}, "password": user["password"],
            }}},
            "scope": {"project": {"id": user["project_id"]}},
        }});
        // Keystone on SQLite (two gunicorn workers) answers 500, "database is locked", when both
        // workers update a user's `last_active_at` at once (each user's first authentication of
        // the day): a fault of the test's Keystone backend, not of what is under test. Retried.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let reply = Client::new(addr_of(auth_url))
                .send(
                    Method::POST,
                    "/v3/auth/tokens",
                    &[("content-type", "application/json")],
                    body.to_string(),
                )
                .await;
            if reply.status == 500 && attempts < 5 {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(reply.status, 201, "token for {name}: {}", reply.text());
            return reply.header("x-subject-token").unwrap().to_owned();
        }
    }

    /// A token for user `name` from the shared Keystone.
    pub async fn token(&self, name: &str) -> String {
        self.token_from(&self.auth_url(), name).await
    }

    /// Revokes `token` (as the admin would with `openstack token revoke`).
    pub async fn revoke(&self, token: &str) {
        let admin = self.token("admin").await;
        let reply = Client::new(addr_of(&self.auth_url()))
            .send(
                Method::DELETE,
                "/v3/auth/tokens",
                &[("x-auth-token", &admin), ("x-subject-token", token)],
                "",
            )
            .await;
        assert_eq!(reply.status, 204, "revoke: {}", reply.text());
    }

    /// A metapass configuration in `dir` (the dev configuration, token file included) whose
    /// `[keystone]` points at `auth_url` with metapass's service user, and `extra` TOML lines
    /// appended to that section.
    pub fn config(&self, dir: &Path, auth_url: &str, extra: &str) -> PathBuf {
        let password_file = self.fixtures["service_password_file"].as_str().unwrap();
        let credentials = format!(
            "username = \"metapass\"\npassword_file = \"{password_file}\"\nproject_name = \"service\"\nuser_domain_id = \"default\"\nproject_domain_id = \"default\""
        );
        self.config_with_credentials(dir, auth_url, &credentials, extra)
    }

    /// Like [`Keystone::config`], with the service user's application credential instead of its
    /// password.
    pub fn config_with_application_credential(&self, dir: &Path, extra: &str) -> PathBuf {
        let credential = &self.fixtures["service_application_credential"];
        let credentials = format!(
            "application_credential_id = \"{}\"\napplication_credential_secret_file = \"{}\"",
            credential["id"].as_str().unwrap(),
            credential["secret_file"].as_str().unwrap()
        );
        self.config_with_credentials(dir, &self.auth_url(), &credentials, extra)
    }

    fn config_with_credentials(
        &self,
        dir: &Path,
        auth_url: &str,
        credentials: &str,
        extra: &str,
    ) -> PathBuf {
        let ca = repo().join("certs-dev/ca.pem");
        let section = format!(
            "\n[keystone]\nauth_url = \"{auth_url}/v3\"\n{credentials}\nca_file = \"{}\"\n{extra}\n",
            ca.display()
        );
        config_with(dir, |text| format!("{text}{section}"))
    }

    /// Starts another Keystone server on the shared database and keys (a test may stop it);
    /// returns it with its URL once it answers.
    pub async fn start_another(&self) -> (KeystoneServer, String) {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let serve: Vec<String> = self.fixtures["serve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let child = Command::new(&serve[0])
            .args(&serve[1..])
            .args(["--bind", &format!("127.0.0.1:{port}"), "--workers", "1"])
            .env(
                "OS_KEYSTONE_CONFIG_FILES",
                self.fixtures["config_file"].as_str().unwrap(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gunicorn");
        let server = KeystoneServer { child };
        let url = format!("https://127.0.0.1:{port}");
        let client = Client::new(addr_of(&url));
        for _ in 0..120 {
            if let Ok(reply) = client.try_send(Method::GET, "/v3", &[], "").await
                && reply.status == 200
            {
                return (server, url);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("the second Keystone did not start");
    }
}

/// A Keystone server a test started; stopped on drop.
pub struct KeystoneServer {
    child: Child,
}

impl KeystoneServer {
    /// Stops it (gunicorn's master and its workers).
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KeystoneServer {
    fn drop(&mut self) {
        self.stop();
    }
}
