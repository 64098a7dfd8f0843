//! The fuzz harness: one function per target.
//!
//! Used twice: by the libFuzzer targets in `fuzz/fuzz_targets/` (each a single call), and by the
//! main crate's `tests/fuzz_regressions.rs`, which includes this file and replays every input kept
//! under `tests/data/fuzz-regressions/<target>/`. A function returns normally for any input the
//! code handles correctly and panics (an assertion) otherwise.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http_body_util::Full;
use zeroize::Zeroizing;

use metapass::api::{self, ConnInfo};
use metapass::app::App;
use metapass::audit::{AuditKeys, SyncMode, verify};
use metapass::config::{Config, Overrides};
use metapass::crypto::{Keyring, RecordBinding};
use metapass::identity::{ClientCert, Role};
use metapass::ids::{InstanceId, ProjectId};
use metapass::policy::{Action, Policy, Principal, Target};
use metapass::store::{PASSWORD_FIELD, Registration, Store, chunks, open_gate};

/// The repository root, whether this file is compiled in the fuzz crate or in the main crate.
fn repo() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("policy/dev.toml").exists() {
        here.to_owned()
    } else {
        here.join("..")
    }
}

/// Instances registered in the fixture: three of project-a, one of project-b.
const REGISTERED: [(&str, &str); 4] = [
    ("8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90", "project-a"),
    ("5f0c7d2a-3e41-4b9a-8c6d-1a2b3c4d5e6f", "project-a"),
    ("00000000-0000-4000-8000-000000000001", "project-a"),
    ("00000000-0000-4000-8000-00000000000b", "project-b"),
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    app: Arc<App>,
    listener: Arc<metapass::config::ListenerConfig>,
    /// The dev certificates a connection may present: instance-1, instance-2, the proxy.
    certs: Vec<ClientCert>,
}

impl Fixture {
    /// Puts the registry back as the fixture made it, since earlier inputs may have deleted an
    /// instance (admin DELETE) or set a password: without this the fuzzer destroys its own
    /// fixture and every later input meets an empty registry. Reads only, unless something changed.
    fn restore(&self) {
        self.runtime.block_on(async {
            for (i, (id, project)) in REGISTERED.iter().enumerate() {
                let id = InstanceId::parse(id).unwrap();
                match self.app.store.instance(&id).await {
                    Ok(None) => {
                        let project = ProjectId::parse(project).unwrap();
                        self.app
                            .store
                            .register(&id, &project, Registration::Ordinary, open_gate())
                            .await
                            .expect("re-register");
                    }
                    // Instance 0 keeps the set-once success path reachable.
                    Ok(Some(record)) if i == 0 && record.password_set => {
                        self.app
                            .store
                            .clear_password(&id, open_gate())
                            .await
                            .expect("clear");
                    }
                    _ => {}
                }
            }
        });
    }
}

/// The fixture's data directory: one per process, removed by [`remove_data_dir`] (the
/// regression test's last step) or left for the next run with the same pid to clear.
pub fn data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("metapass-fuzz-{}", std::process::id()))
}

/// Removes [`data_dir`]: the fixture lives in a static, which is never dropped.
pub fn remove_data_dir() {
    let _ = std::fs::remove_dir_all(data_dir());
}

/// The daemon's application state on the dev configuration, in a private data directory, with
/// audit writes to the OS only (no fsync per input).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let data = data_dir();
        let _ = std::fs::remove_dir_all(&data);
        let overrides = Overrides {
            listen: None,
            data_dir: Some(data),
        };
        let mut config =
            Config::load(&repo().join("policy/dev.toml"), &overrides).expect("dev config");
        config.audit.sync = SyncMode::Write;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = Arc::new(config.listeners[0].clone());
        let certs = ["instance-1", "instance-2", "proxy"]
            .iter()
            .map(|name| {
                use rustls_pki_types::pem::PemObject;
                let pem = repo().join(format!("certs-dev/{name}.pem"));
                ClientCert::from_der(
                    &rustls_pki_types::CertificateDer::from_pem_file(pem).expect("dev cert"),
                )
            })
            .collect();
        let app = runtime.block_on(App::open(config)).expect("app");
        runtime.block_on(async {
            // As `serve` does: the store learns the keyring's keys before anything is sealed.
            metapass::load_keyring_at_startup(&app)
                .await
                .expect("keyring");
            for (id, project) in REGISTERED {
                let (id, project) = (
                    InstanceId::parse(id).unwrap(),
                    ProjectId::parse(project).unwrap(),
                );
                app.store
                    .register(&id, &project, Registration::Ordinary, open_gate())
                    .await
                    .expect("register");
            }
        });
        Fixture {
            runtime,
            app: Arc::new(app),
            listener,
            certs,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
    Head,
    Patch,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Version {
    Latest,
    Cloudbase,
    Newest,
    Before,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Id {
    Registered(u8),
    Unregistered,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Path_ {
    Password(Version),
    Listing,
    VersionListing(Version),
    ServerPassword(Id),
    Server(Id),
    AdminInstance(Id),
    ComputeVersions,
    Health,
    Ready,
    Metrics,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Tenant {
    Own,
    Other,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Signature {
    Valid,
    Uppercase,
    Missing,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Token {
    Admin,
    Member,
    Reader,
    OtherProject,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Identity {
    None,
    Proxy {
        id: Id,
        tenant: Tenant,
        signature: Signature,
    },
    Token(Token),
}

#[derive(Arbitrary, Debug)]
enum Header {
    ContentType,
    ContentLength,
    TransferEncoding,
    ForwardedFor,
    ApiVersion,
    NovaApiVersion,
    InstanceId,
    TenantId,
    Signature,
    AuthToken,
    Other(String),
}

/// A request shaped so the fuzzer reaches past authentication, while any field can be arbitrary.
#[derive(Arbitrary, Debug)]
pub struct FuzzRequest {
    /// The client certificate of the connection: none, or one of the fixture's (by index).
    client_cert: Option<u8>,
    method: Method,
    path: Path_,
    query: Option<String>,
    identity: Identity,
    headers: Vec<(Header, Vec<u8>)>,
    body: Vec<u8>,
}

fn id_text(id: &Id) -> String {
    match id {
        Id::Registered(i) => REGISTERED[usize::from(*i) % REGISTERED.len()].0.to_owned(),
        Id::Unregistered => "11111111-2222-4333-8444-555555555555".to_owned(),
        Id::Raw(s) => s.clone(),
    }
}

fn version_text(v: &Version) -> String {
    match v {
        Version::Latest => "latest".into(),
        Version::Cloudbase => "2013-04-04".into(),
        Version::Newest => "2025-04-04".into(),
        Version::Before => "2012-08-10".into(),
        Version::Other(s) => s.clone(),
    }
}

fn sign(id: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"dev-metadata-proxy-secret");
    hex::encode(ring::hmac::sign(&key, id.as_bytes()).as_ref())
}

/// Builds the HTTP request, or `None` if it is not one hyper could ever hand to the service
/// (invalid URI, header name or value).
fn build(r: &FuzzRequest) -> Option<http::Request<Full<Bytes>>> {
    let method = match &r.method {
        Method::Get => http::Method::GET,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Delete => http::Method::DELETE,
        Method::Head => http::Method::HEAD,
        Method::Patch => http::Method::PATCH,
        Method::Other(m) => http::Method::from_bytes(m.as_bytes()).ok()?,
    };
    let mut path = match &r.path {
        Path_::Password(v) => format!("/openstack/{}/password", version_text(v)),
        Path_::Listing => "/openstack".into(),
        Path_::VersionListing(v) => format!("/openstack/{}", version_text(v)),
        Path_::ServerPassword(id) => format!("/v2.1/servers/{}/os-server-password", id_text(id)),
        Path_::Server(id) => format!("/v2.1/servers/{}", id_text(id)),
        Path_::AdminInstance(id) => format!("/admin/v1/instances/{}", id_text(id)),
        Path_::ComputeVersions => "/v2.1/".into(),
        Path_::Health => "/healthz".into(),
        Path_::Ready => "/readyz".into(),
        Path_::Metrics => "/metrics".into(),
        Path_::Raw(p) => p.clone(),
    };
    if let Some(q) = &r.query {
        path = format!("{path}?{q}");
    }
    let mut builder = http::Request::builder().method(method).uri(path);
    match &r.identity {
        Identity::None => {}
        Identity::Proxy {
            id,
            tenant,
            signature,
        } => {
            let id = id_text(id);
            let tenant = match tenant {
                Tenant::Own => "project-a".to_owned(),
                Tenant::Other => "project-b".to_owned(),
                Tenant::Raw(t) => t.clone(),
            };
            builder = builder
                .header("x-instance-id", id.as_str())
                .header("x-tenant-id", tenant);
            match signature {
                Signature::Valid => builder = builder.header("x-instance-id-signature", sign(&id)),
                Signature::Uppercase => {
                    builder = builder.header("x-instance-id-signature", sign(&id).to_uppercase())
                }
                Signature::Missing => {}
                Signature::Raw(s) => {
                    builder = builder.header("x-instance-id-signature", s.as_str())
                }
            }
        }
        Identity::Token(t) => {
            let token: &[u8] = match t {
                Token::Admin => b"dev-admin-token",
                Token::Member => b"dev-token-project-a",
                Token::Reader => b"dev-token-reader-a",
                Token::OtherProject => b"dev-token-project-b",
                Token::Raw(raw) => raw,
            };
            builder = builder.header("x-auth-token", http::HeaderValue::from_bytes(token).ok()?);
        }
    }
    for (name, value) in &r.headers {
        let name = match name {
            Header::ContentType => "content-type",
            Header::ContentLength => "content-length",
            Header::TransferEncoding => "transfer-encoding",
            Header::ForwardedFor => "x-forwarded-for",
            Header::ApiVersion => "openstack-api-version",
            Header::NovaApiVersion => "x-openstack-nova-api-version",
            Header::InstanceId => "x-instance-id",
            Header::TenantId => "x-tenant-id",
            Header::Signature => "x-instance-id-signature",
            Header::AuthToken => "x-auth-token",
            Header::Other(n) => n.as_str(),
        };
        let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
        builder = builder.header(name, http::HeaderValue::from_bytes(value).ok()?);
    }
    builder.body(Full::new(Bytes::from(r.body.clone()))).ok()
}

/// Target `request`: any request through the full handler path, in memory. Never a panic, never a
/// 500 (which only a panic or a tampered store could produce), always a request id.
pub fn request(data: &[u8]) {
    let Ok(r) = FuzzRequest::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let Some(req) = build(&r) else { return };
    let fx = fixture();
    fx.restore();
    let conn = Arc::new(ConnInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        proxied_by: None,
        tls_version: Some("TLSv1.3"),
        client_cert: r
            .client_cert
            .map(|i| fx.certs[usize::from(i) % fx.certs.len()].clone()),
        listener: fx.listener.clone(),
    });
    let response = fx.runtime.block_on(api::serve(fx.app.clone(), conn, req));
    assert_ne!(
        response.status(),
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "{r:?}"
    );
    assert!(response.headers().contains_key("x-request-id"));
}

fn keyring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| Keyring::new(&[(7, Zeroizing::new(vec![0x5a; 32]))], 7).unwrap())
}

const BINDING: RecordBinding<'static> = RecordBinding {
    project_id: "project-a",
    instance_id: "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90",
    field: PASSWORD_FIELD,
    version: 3,
};

#[derive(Arbitrary, Debug)]
struct ChunkInput {
    /// Arbitrary stored chunks (names and values) as an attacker with database access writes them.
    chunks: Vec<(String, Vec<u8>)>,
    /// Byte flips applied to a genuine sealed record: (position, xor mask).
    flips: Vec<(u16, u8)>,
}

/// Target `sealed_record`: the chunk decoder and the AEAD opener. Arbitrary chunks never open; a
/// genuine record opens only if no flip changed it.
pub fn sealed_record(data: &[u8]) {
    let Ok(input) = ChunkInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    if let Ok(joined) = chunks::join(PASSWORD_FIELD, &input.chunks) {
        assert!(
            keyring().open(&BINDING, &joined).is_err(),
            "forged chunks opened"
        );
    }
    static GENUINE: OnceLock<Vec<u8>> = OnceLock::new();
    let genuine = GENUINE.get_or_init(|| keyring().seal(&BINDING, b"genuine-blob").unwrap());
    let mut record = genuine.clone();
    for (position, mask) in &input.flips {
        let i = usize::from(*position) % record.len();
        record[i] ^= mask;
    }
    let stored: Vec<(String, Vec<u8>)> = chunks::split(PASSWORD_FIELD, &record)
        .into_iter()
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    let joined = chunks::join(PASSWORD_FIELD, &stored).expect("split then join");
    let opened = keyring().open(&BINDING, &joined);
    if &record == genuine {
        assert_eq!(
            opened.as_deref().map(|p| p.as_slice()),
            Ok(&b"genuine-blob"[..])
        );
    } else {
        assert!(opened.is_err(), "a tampered record opened");
    }
}

/// Target `policy_file`: any text as a policy file; if it loads, every decision is total.
pub fn policy_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::from_toml(text) else {
        return;
    };
    let roles = [Role::Reader, Role::Member, Role::Admin];
    let instance = InstanceId::parse(REGISTERED[0].0).expect("a valid id");
    let (a, b) = (
        ProjectId::parse("project-a").expect("a valid project"),
        ProjectId::parse("project-b").expect("a valid project"),
    );
    for action in Action::ALL {
        for project in [Some(&a), Some(&b), None] {
            let target = Target {
                instance_id: Some(&instance),
                project,
            };
            let _ = policy.decide(
                Principal::Instance {
                    instance_id: &instance,
                },
                action,
                target,
            );
            let _ = policy.decide(
                Principal::Token {
                    project: &a,
                    roles: &roles,
                },
                action,
                target,
            );
        }
    }
}

/// Target `token_file`: any text as a token file; if it loads, lookups work.
pub fn token_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(table) = metapass::config::parse_tokens(text, Path::new("fuzz-tokens.toml")) {
        let _ = table.lookup(&"dev-admin-token".to_owned().into());
        let _ = table.lookup(&String::from_utf8_lossy(data).into_owned().into());
    }
}

/// Target `audit_line`: any bytes as an audit line and as a whole audit file. Nothing forged
/// verifies (the fuzzer does not hold the key).
pub fn audit_line(data: &[u8]) {
    static KEYS: OnceLock<AuditKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| AuditKeys::derive(&[0x42; 32]).unwrap());
    assert!(keys.check_line(data).is_err(), "a forged line verified");
    let report = verify::verify_contents(
        keys,
        &[(PathBuf::from("fuzz.jsonl"), data.to_vec())],
        verify::Start::Genesis,
    );
    assert_eq!(report.events, 0, "a forged file verified");
}
