//! Configuration as operators meet it: policy overrides without recompiling, and files that are
//! refused at startup with a message naming the file and line.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use http::Method;

#[tokio::test]
async fn an_operator_policy_override_takes_effect_without_recompiling() {
    let dir = tempfile::tempdir().unwrap();
    // Readers may no longer read passwords; members still may.
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[actions.\"password:get\"]\nallow = [\n  { instance = \"self\" },\n  { role = \"member\", project = \"owner\" },\n]\n",
    )
    .unwrap();
    let config = config_with(dir.path(), |t| {
        t.replace(
            &format!("\"{}/policy.toml\"", repo().join("policy").display()),
            &format!("{:?}", policy),
        )
    });
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    let id = new_instance();
    client.register(&id, "project-a").await;
    let post = client.post_password(&id, "project-a", "pw").await;
    assert_eq!(post.status, 200, "{}", post.text());
    let path = format!("/v2.1/servers/{id}/os-server-password");
    let reader = client.get(&path, &[("x-auth-token", READER_A)]).await;
    assert_eq!(reader.status, 403, "{}", reader.text());
    assert_eq!(
        client.get(&path, &[("x-auth-token", TOKEN_A)]).await.json()["password"],
        "pw"
    );
    // Admins lost the grant too: a role that can never read is refused with 403, whatever the target.
    assert_eq!(
        client
            .get(&path, &[("x-auth-token", ADMIN_TOKEN)])
            .await
            .status,
        403
    );
    // Unlisted actions keep Nova's defaults.
    assert_eq!(
        client
            .send(Method::DELETE, &path, &[("x-auth-token", TOKEN_A)], "")
            .await
            .status,
        204
    );
    let events = daemon.audit_events();
    let denied = event_for(&events, &reader.request_id());
    assert_eq!(
        denied["actor"]["authorizations"][0]["policy"]["desc"],
        "password:get: no grant matched"
    );
}

#[test]
fn a_bad_policy_file_stops_startup_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    for (text, line, word) in [
        (
            "# ok\n[actions.\"password:steal\"]\nallow = []\n",
            "line 2",
            "password:steal",
        ),
        (
            "[actions.\"password:get\"]\nallow = [\n  { role = \"superuser\", project = \"any\" },\n]\n",
            "line 3",
            "superuser",
        ),
        (
            "[actions.\"password:get\"]\nallow = [\n  { role = \"reader\" },\n]\n",
            "line 3",
            "project",
        ),
    ] {
        std::fs::write(&policy, text).unwrap();
        let config = config_with(dir.path(), |t| {
            t.replace(
                &format!("\"{}/policy.toml\"", repo().join("policy").display()),
                &format!("{:?}", policy),
            )
        });
        let stderr = serve_must_fail(&config);
        assert!(
            stderr.contains("policy.toml") && stderr.contains(line) && stderr.contains(word),
            "{stderr}"
        );
    }
}

#[test]
fn a_bad_token_file_stops_startup_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[token]]\nlabel = \"x\"\nsha256 = \"00\"\nproject = \"p\"\nroles = [\"reader\"]\n\n[[token]]\nlabel = \"y\"\nsha256 = \"00\"\nproject = \"p\"\nroles = [\"root\"]\n",
    )
    .unwrap();
    let config = config_with(dir.path(), |t| {
        t.replace(
            &format!("\"{}/dev-tokens.toml\"", repo().join("policy").display()),
            &format!("{:?}", tokens),
        )
    });
    let stderr = serve_must_fail(&config);
    assert!(
        stderr.contains("tokens.toml") && stderr.contains("line 11") && stderr.contains("root"),
        "{stderr}"
    );
    std::fs::write(
        &tokens,
        "[[token]]\nlabel = \"x\"\nsha256 = \"not-hex\"\nproject = \"p\"\nroles = [\"reader\"]\n",
    )
    .unwrap();
    let stderr = serve_must_fail(&config);
    assert!(stderr.contains("sha256 must be 64 hex digits"), "{stderr}");
}

#[test]
fn unknown_configuration_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), |t| {
        t.replace("[tls]\n", "[tls]\ncertificate_chain = \"x\"\n")
    });
    let stderr = serve_must_fail(&config);
    assert!(
        stderr.contains("config.toml") && stderr.contains("certificate_chain"),
        "{stderr}"
    );
}

/// Copies a secret file into `dir` with `mode`, returning the copy's path.
fn secret_copy(dir: &std::path::Path, from: &std::path::Path, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let to = dir.join(from.file_name().unwrap());
    std::fs::copy(from, &to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    to
}

#[tokio::test]
async fn secret_and_tls_files_open_to_others_are_refused_outside_dev_mode() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("proxy-secret");
    std::fs::write(&secret, "a-long-enough-proxy-secret\n").unwrap();
    let originals = [
        repo().join("certs-dev/server.key"),
        repo().join("certs-dev/server.pem"),
        repo().join("certs-dev/ca.pem"),
        repo().join("certs-dev/ca.crl"),
        repo().join("policy/dev-tokens.toml"),
        repo().join("policy/dev-keyring.toml"),
        repo().join("policy/dev-audit-key.toml"),
        secret.clone(),
    ];
    let production_config = |copies: &[std::path::PathBuf]| {
        config_with(dir.path(), |mut t| {
            t = t.replace("dev_mode = true", "dev_mode = false").replace(
                "proxy_shared_secret = \"dev-metadata-proxy-secret\"",
                &format!("proxy_shared_secret_file = {:?}", copies[7]),
            );
            for (original, copy) in originals[..7].iter().zip(copies) {
                t = t.replace(&format!("{:?}", original), &format!("{:?}", copy));
            }
            t
        })
    };
    let copies_dir = tempfile::tempdir().unwrap();
    for open in 0..originals.len() {
        let copies: Vec<_> = originals
            .iter()
            .enumerate()
            .map(|(i, f)| secret_copy(copies_dir.path(), f, if i == open { 0o640 } else { 0o600 }))
            .collect();
        let stderr = serve_must_fail(&production_config(&copies));
        let name = copies[open].file_name().unwrap().to_str().unwrap();
        assert!(
            stderr.contains(name) && stderr.contains("chmod 600"),
            "{name}: {stderr}"
        );
    }
    // All 0600 and no inline secret: production mode starts and serves.
    let copies: Vec<_> = originals
        .iter()
        .map(|f| secret_copy(copies_dir.path(), f, 0o600))
        .collect();
    let config = production_config(&copies);
    let daemon = Daemon::start_with(&config, tempfile::tempdir().unwrap());
    assert_eq!(daemon.client().get("/healthz", &[]).await.status, 200);
    // An inline proxy secret is refused outright outside dev mode, even with every file 0600.
    let inline = std::fs::read_to_string(&config).unwrap().replace(
        &format!("proxy_shared_secret_file = {:?}", copies[7]),
        "proxy_shared_secret = \"an-inline-proxy-secret\"",
    );
    std::fs::write(dir.path().join("inline.toml"), inline).unwrap();
    let stderr = serve_must_fail(&dir.path().join("inline.toml"));
    assert!(
        stderr.contains("inline proxy_shared_secret is only allowed with dev_mode"),
        "{stderr}"
    );
}

#[test]
fn keystone_and_compute_api_settings_are_checked_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("keystone-password");
    std::fs::write(&password, "secret\n").unwrap();
    let keystone = |body: &str| {
        let body = body.replace("PASSWORD", &password.display().to_string());
        move |t: String| format!("{t}\n[keystone]\n{body}\n")
    };
    for (body, needle) in [
        (
            "auth_url = \"ftp://k\"\nusername = \"m\"\npassword_file = \"PASSWORD\"\nproject_name = \"s\"",
            "https://",
        ),
        (
            "auth_url = \"https://k:5000/v3\"\nusername = \"m\"\nproject_name = \"s\"",
            "password_file",
        ),
        (
            "auth_url = \"https://k:5000/v3\"\nusername = \"m\"\npassword_file = \"PASSWORD\"\nproject_name = \"s\"\ncache_ttl_secs = 86400",
            "cache_ttl_secs",
        ),
        (
            "auth_url = \"https://k:5000/v3\"\nusername = \"m\"\npassword_file = \"PASSWORD\"\nproject_name = \"s\"\ntimeout_secs = 0",
            "timeout_secs",
        ),
    ] {
        let config = config_with(dir.path(), keystone(body));
        let stderr = serve_must_fail(&config);
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    for (section, needle) in [
        (
            "[compute_api]\nmax_microversion = \"3.1\"",
            "max_microversion",
        ),
        (
            "[compute_api]\nmax_microversion = \"2.x\"",
            "max_microversion",
        ),
        ("[compute_api]\npath_prefix = \"compute/\"", "path_prefix"),
        ("[compute_api]\npath_prefix = \"/admin\"", "shadow"),
        ("[compute_api]\npath_prefix = \"/a/../b\"", "path_prefix"),
    ] {
        let config = config_with(dir.path(), |t| format!("{t}\n{section}\n"));
        let stderr = serve_must_fail(&config);
        assert!(stderr.contains(needle), "{section}: {stderr}");
    }
    // Neither Keystone nor a token file: owners could never authenticate.
    let config = config_with(dir.path(), |t| {
        t.replace("[tokens]\nfile = ", "# no tokens: ")
    });
    let stderr = serve_must_fail(&config);
    assert!(stderr.contains("[keystone], [tokens]"), "{stderr}");
}

#[tokio::test]
async fn keystone_alone_is_enough_and_an_unreachable_one_fails_closed() {
    // A Keystone on a closed port: every token not in the (absent) token file is 503, never 200.
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("keystone-password");
    std::fs::write(&password, "secret\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let section = format!(
        "\n[keystone]\nauth_url = \"https://127.0.0.1:{port}\"\nusername = \"metapass\"\npassword_file = \"{}\"\nproject_name = \"service\"\ntimeout_secs = 2\n",
        password.display()
    );
    let config = config_with(dir.path(), |t| {
        t.replace("[tokens]\nfile = ", "# no tokens: ") + &section
    });
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    let path = format!("/v2.1/servers/{}/os-server-password", new_instance());
    let reply = client.get(&path, &[("x-auth-token", TOKEN_A)]).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    let none = client.get(&path, &[]).await;
    assert_eq!(none.status, 401);
    let events = daemon.audit_events();
    assert_eq!(
        event_for(&events, &reply.request_id())["unmapped"]["reason"],
        "identity_unavailable"
    );
    assert!(!daemon.log().contains(TOKEN_A));
}
