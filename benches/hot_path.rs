//! In-process costs of the hot path (criterion): sealing and opening a password, splitting and
//! joining its chunks, checking a proxy signature, encoding an audit event, the audit chain's MAC
//! (ring's HMAC-SHA256, used before, against RustCrypto's on the CPU's SHA extensions, used
//! now), the SQLite password read (through the read cache and straight from the database), and a
//! whole `GET /openstack/latest/password` through the handler with an in-memory transport (store
//! and audit log real, on a temporary directory, audit writes not fsynced).
//!
//! `cargo bench --bench hot_path`; the figures are in BENCHMARKS.md.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use hmac::{KeyInit, Mac};
use http_body_util::Full;
use metapass::api::{self, ConnInfo};
use metapass::app::App;
use metapass::audit::{AuditKeys, Facts, SyncMode};
use metapass::config::{Config, Overrides};
use metapass::crypto::{Keyring, RecordBinding};
use metapass::identity::ProxySigner;
use metapass::ids::{InstanceId, ProjectId};
use metapass::store::sqlite::SqliteStore;
use metapass::store::{PASSWORD_FIELD, Registration, SealFn, Store, chunks, open_gate};
use secrecy::SecretString;
use zeroize::Zeroizing;

const INSTANCE: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";
const SECRET: &str = "dev-metadata-proxy-secret";

fn blob() -> Vec<u8> {
    vec![b'A'; 344]
}

/// Seals the bench's password for [`INSTANCE`] under `keyring`'s active key.
fn seal_blob(keyring: Arc<Keyring>) -> SealFn {
    Box::new(move |version| {
        let binding = RecordBinding {
            project_id: "project-a",
            instance_id: INSTANCE,
            field: PASSWORD_FIELD,
            version,
        };
        keyring.seal(&binding, &blob())
    })
}

fn crypto(c: &mut Criterion) {
    let keyring = Keyring::new(&[(1, Zeroizing::new(vec![7; 32]))], 1).unwrap();
    let binding = RecordBinding {
        project_id: "project-a",
        instance_id: INSTANCE,
        field: PASSWORD_FIELD,
        version: 42,
    };
    let blob = blob();
    c.bench_function("seal 344 bytes (padded to 1024)", |b| {
        b.iter(|| keyring.seal(&binding, &blob).unwrap())
    });
    let sealed = keyring.seal(&binding, &blob).unwrap();
    c.bench_function("open", |b| {
        b.iter(|| keyring.open(&binding, &sealed).unwrap())
    });
    c.bench_function("chunk split", |b| {
        b.iter(|| chunks::split(PASSWORD_FIELD, &sealed).len())
    });
    let stored: Vec<(String, Vec<u8>)> = chunks::split(PASSWORD_FIELD, &sealed)
        .into_iter()
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    c.bench_function("chunk join", |b| {
        b.iter(|| chunks::join(PASSWORD_FIELD, &stored).unwrap())
    });
}

fn identity_and_audit(c: &mut Criterion) {
    let signer = ProxySigner::new(&SecretString::from(SECRET));
    let mut headers = http::HeaderMap::new();
    headers.insert("x-instance-id", INSTANCE.parse().unwrap());
    headers.insert("x-tenant-id", "project-a".parse().unwrap());
    headers.insert(
        "x-instance-id-signature",
        signer.sign(INSTANCE).parse().unwrap(),
    );
    c.bench_function("proxy signature check", |b| {
        b.iter(|| signer.verify(&headers).1.is_ok())
    });
    let mut facts = Facts::new(SocketAddr::from(([127, 0, 0, 1], 40000)), Some("TLSv1.3"));
    facts.operation = "password:get";
    facts.target_instance = Some(INSTANCE.into());
    facts.target_project = Some("project-a".into());
    c.bench_function("audit event encoding", |b| {
        b.iter(|| metapass::audit::event::encode(&facts, 200, Duration::from_micros(150)).len())
    });
}

/// An event line's size in the dev configuration (an OCSF API Activity object).
const EVENT_LINE_BYTES: usize = 2100;

fn chain_mac(c: &mut Criterion) {
    let line = vec![b'x'; EVENT_LINE_BYTES];
    let key = [7u8; 32];
    let ring_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    c.bench_function(
        "chain MAC of a 2.1 KB line, before: ring HMAC-SHA256",
        |b| b.iter(|| ring::hmac::sign(&ring_key, &line)),
    );
    let keyed = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    c.bench_function("chain MAC of a 2.1 KB line, now: sha2 HMAC-SHA256", |b| {
        b.iter(|| {
            let mut mac = keyed.clone();
            mac.update(&line);
            mac.finalize().into_bytes()
        })
    });
    let keys = AuditKeys::derive(&[9u8; 32]).unwrap();
    let prev = "0".repeat(64);
    let mut out = Vec::with_capacity(EVENT_LINE_BYTES + 256);
    c.bench_function("seal_line: a 2.1 KB event into the chain", |b| {
        b.iter(|| {
            out.clear();
            keys.seal_line(&line[..EVENT_LINE_BYTES - 100], 42, &prev, &mut out)
        })
    });
}

fn store_read(c: &mut Criterion) {
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let id = InstanceId::parse(INSTANCE).unwrap();
    let store = runtime.block_on(async {
        let store = SqliteStore::open(&data.path().join("metapass.sqlite3")).unwrap();
        let project = ProjectId::parse("project-a").unwrap();
        store
            .register(&id, &project, Registration::Ordinary, open_gate())
            .await
            .unwrap();
        let keyring = Arc::new(Keyring::new(&[(1, Zeroizing::new(vec![7; 32]))], 1).unwrap());
        store
            .sync_keys(keyring.check_values(), open_gate())
            .await
            .unwrap();
        store
            .set_password_once(&id, &project, 1, seal_blob(keyring), open_gate())
            .await
            .unwrap();
        store
    });
    c.bench_function("SQLite password read, before: from the database", |b| {
        b.iter(|| store.password_from_database(&id).unwrap().unwrap())
    });
    c.bench_function("SQLite password read, now: through the read cache", |b| {
        b.iter(|| runtime.block_on(store.password(&id)).unwrap().unwrap())
    });
}

fn handler(c: &mut Criterion) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::load(
        &repo.join("policy/dev.toml"),
        &Overrides {
            listen: None,
            data_dir: Some(data.path().to_owned()),
        },
    )
    .unwrap();
    config.audit.sync = SyncMode::Write;
    // bench/run's limits: every limiter runs, none refuses one instance read in a loop.
    config.rate_limits = metapass::config::RateLimitConfig::from_toml(
        &std::fs::read_to_string(repo.join("bench/limits.toml")).unwrap(),
    )
    .unwrap();
    let listener = Arc::new(config.listeners[0].clone());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(async {
        let app = App::open(config).await.unwrap();
        metapass::load_keyring_at_startup(&app).await.unwrap();
        let id = InstanceId::parse(INSTANCE).unwrap();
        let project = ProjectId::parse("project-a").unwrap();
        app.store
            .register(&id, &project, Registration::Ordinary, open_gate())
            .await
            .unwrap();
        app.store
            .set_password_once(&id, &project, 1, seal_blob(app.keyring()), open_gate())
            .await
            .unwrap();
        Arc::new(app)
    });
    let signature = ProxySigner::new(&SecretString::from(SECRET)).sign(INSTANCE);
    let conn = Arc::new(ConnInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        proxied_by: None,
        tls_version: Some("TLSv1.3"),
        client_cert: None,
        listener,
    });
    c.bench_function("GET /openstack/latest/password, whole handler", |b| {
        b.iter(|| {
            let request = http::Request::get("/openstack/latest/password")
                .header("x-instance-id", INSTANCE)
                .header("x-tenant-id", "project-a")
                .header("x-instance-id-signature", signature.as_str())
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = runtime.block_on(api::serve(app.clone(), conn.clone(), request));
            if response.status() != 200 {
                let body = runtime.block_on(http_body_util::BodyExt::collect(response.into_body()));
                panic!("{:?}", body.map(|b| b.to_bytes()));
            }
        })
    });
}

criterion_group!(
    benches,
    crypto,
    identity_and_audit,
    chain_mac,
    store_read,
    handler
);
criterion_main!(benches);
