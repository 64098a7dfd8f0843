//! The instance-facing API: `GET|POST /openstack/{version}/password`, as Nova serves it.
//!
//! Status codes follow Nova wherever the Neutron/OVN metadata proxy or a guest agent depends on
//! them: the proxy passes only 200, 400, 403, 404, 409, 500, 502, 503 and 504 through, so a wrong
//! method is a 400 (not 405) and a rate limit a 503 (not 429). See the shared `CONTRACT.md`.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::body::read_limited;
use super::caller::identify_instance;
use super::exchange::Exchange;
use super::respond::{self, ApiError, Body};
use crate::app::App;
use crate::audit::gate::{Audited, gated};
use crate::audit::{Activity, Facts, Reason, Surface};
use crate::crypto::{MAX_PLAINTEXT_LEN, RecordBinding};
use crate::identity::authenticate::InstanceCaller;
use crate::ids::{InstanceId, ProjectId};
use crate::policy::{Action, Principal, Target};
use crate::store::{PASSWORD_FIELD, SetOutcome, Store};

/// Nova's metadata versions, oldest first; `latest` is the newest.
pub(crate) const VERSIONS: [&str; 10] = [
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
    "2025-04-04",
];

/// The first version with a `password` entry.
pub(crate) const PASSWORD_SINCE: &str = "2013-04-04";

/// Whether `version` serves the password (`latest`, or a known version from 2013-04-04 on).
pub(crate) fn serves_password(version: &str) -> bool {
    version == "latest" || (VERSIONS.contains(&version) && version >= PASSWORD_SINCE)
}

/// A route of the instance API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstanceRoute {
    /// `/openstack` or `/openstack/`: the version listing.
    Versions,
    /// `/openstack/{v}` or `/openstack/{v}/`: the listing of a version.
    Version,
    /// `/openstack/{v}/password`.
    Password,
    /// Anything else.
    NotFound,
}

/// Routes a path under `/openstack`, exactly: no decoding, no normalisation, so `..`, `%2e%2e`,
/// doubled slashes and unknown versions all miss.
pub(crate) fn route(path: &str) -> InstanceRoute {
    let Some(rest) = path.strip_prefix("/openstack") else {
        return InstanceRoute::NotFound;
    };
    let rest = match rest {
        "" | "/" => return InstanceRoute::Versions,
        r => match r.strip_prefix('/') {
            Some(r) => r,
            None => return InstanceRoute::NotFound,
        },
    };
    let (version, tail) = match rest.split_once('/') {
        Some((v, t)) => (v, Some(t)),
        None => (rest, None),
    };
    if !serves_password(version) {
        return InstanceRoute::NotFound;
    }
    match tail {
        None | Some("") => InstanceRoute::Version,
        Some("password") => InstanceRoute::Password,
        Some(_) => InstanceRoute::NotFound,
    }
}

/// The path Nova's metadata handler looks up for the request path `raw`: percent-decoded (as
/// the WSGI server decodes `PATH_INFO`), then `posixpath.normpath`'d (as
/// `InstanceMetadata.lookup` does), so `/openstack/latest/password/`, `//`, `/./`, `..` and
/// `%70assword` spellings reach the password handler in Nova, and must reach metapass's too.
/// `None` for a path that does not decode to UTF-8 (Nova cannot route it either).
pub(crate) fn nova_path(raw: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    Some(normpath(&decoded))
}

/// Python's `posixpath.normpath` for an absolute path: empty and `.` segments go, `..` removes
/// the segment before it (never above the root), and exactly two leading slashes are kept (POSIX
/// leaves their meaning to the implementation; Python keeps them, and Nova's lookup then
/// reads the path as an EC2 one).
fn normpath(path: &str) -> String {
    let leading = if path.starts_with("//") && !path.starts_with("///") {
        "//"
    } else if path.starts_with('/') {
        "/"
    } else {
        ""
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." if !leading.is_empty() => {
                parts.pop();
            }
            ".." if parts.last().is_none_or(|p| *p == "..") => parts.push(".."),
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let joined = format!("{leading}{}", parts.join("/"));
    if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

/// Routes a request path as Nova would: exactly when it is already canonical, else after
/// [`nova_path`].
pub(crate) fn route_as_nova(raw: &str) -> InstanceRoute {
    match route(raw) {
        InstanceRoute::NotFound => nova_path(raw).map_or(InstanceRoute::NotFound, |p| route(&p)),
        found => found,
    }
}

/// Whether Nova would look `raw` up in its `/openstack` tree.
pub(crate) fn is_openstack_path(raw: &str) -> bool {
    let under = |p: &str| p == "/openstack" || p.starts_with("/openstack/");
    under(raw) || nova_path(raw).is_some_and(|p| under(&p))
}

/// Why a posted password is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordBodyError {
    /// No bytes.
    Empty,
    /// Not UTF-8.
    NotUtf8,
    /// NUL or a control character other than tab, line feed and carriage return (which line-wrapped
    /// base64 contains).
    ControlCharacter,
}

/// Checks a posted password: non-empty UTF-8 text without NUL or control characters (tab, LF and CR
/// are allowed: some agents wrap their base64).
pub(crate) fn validate_password(body: &[u8]) -> Result<&str, PasswordBodyError> {
    if body.is_empty() {
        return Err(PasswordBodyError::Empty);
    }
    let text = std::str::from_utf8(body).map_err(|_| PasswordBodyError::NotUtf8)?;
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(PasswordBodyError::ControlCharacter);
    }
    Ok(text)
}

/// Handles a request under `/openstack`.
pub(crate) async fn handle<B: super::RequestBody>(
    app: &App,
    ex: &mut Exchange,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    ex.facts.surface = Surface::Instance;
    let (parts, body) = req.into_parts();
    match route_as_nova(parts.uri.path()) {
        InstanceRoute::Versions => {
            let mut listing: Vec<&str> = VERSIONS
                .iter()
                .copied()
                .filter(|v| serves_password(v))
                .collect();
            listing.push("latest");
            list(ex, &parts.method, listing.join("\n"))
        }
        InstanceRoute::Version => list(ex, &parts.method, PASSWORD_FIELD.to_owned()),
        InstanceRoute::Password => match parts.method {
            Method::GET => get_password(app, ex, &parts.headers).await,
            Method::POST => post_password(app, ex, &parts.headers, body).await,
            _ => {
                ex.facts.operation = "password:other";
                Err(ApiError::wrong_method(Surface::Instance, "GET, POST"))
            }
        },
        InstanceRoute::NotFound => Err(ApiError::not_found(
            Reason::NotFound,
            "No such metadata path.",
        )),
    }
}

fn list(ex: &mut Exchange, method: &Method, body: String) -> Result<Response<Body>, ApiError> {
    ex.facts.operation = "metadata:list";
    ex.facts.activity = Activity::Read;
    if method != Method::GET {
        return Err(ApiError::wrong_method(Surface::Instance, "GET"));
    }
    Ok(respond::text(body))
}

/// `Retry-After` for a post from an instance that is not registered yet: Nova's create
/// notification usually follows within a second or two.
pub(crate) const NOT_YET_REGISTERED_RETRY_SECS: u64 = 2;

/// Records that a correctly identified instance is not in the registry (yet).
fn not_yet_registered(ex: &mut Exchange) {
    ex.facts.reason = Reason::NotYetRegistered;
    ex.facts.detail =
        Some("the instance is not registered (yet); nothing revealed or stored".into());
}

fn not_found() -> ApiError {
    ApiError::unknown_instance("Instance not found.")
}

/// Checks that the claimed tenant (if the proxy claimed one) owns the instance, and that policy
/// lets the instance act on itself.
fn check_owner(
    app: &App,
    ex: &mut Exchange,
    id: &InstanceId,
    tenant: Option<&ProjectId>,
    owner: &ProjectId,
    action: Action,
) -> Result<(), ApiError> {
    ex.facts.target_project = Some(owner.to_string());
    if tenant.is_some_and(|t| t != owner) {
        let mut e = not_found();
        e.reason = Reason::TenantMismatch;
        return Err(e);
    }
    ex.facts.caller.project_id = Some(owner.to_string());
    let principal = Principal::Instance { instance_id: id };
    let target = Target {
        instance_id: Some(id),
        project: Some(owner),
    };
    ex.authorize(app, principal, action, target, &not_found())
}

async fn get_password(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    ex.facts.operation = Action::PasswordGet.as_str();
    ex.facts.activity = Activity::Read;
    let InstanceCaller {
        instance: id,
        tenant,
    } = identify_instance(app, ex, headers)?;
    let mut record = app.store.password(&id).await?;
    if record.is_none() && crate::nova::lookup::register_unknown(app, &id).await {
        record = app.store.password(&id).await?;
    }
    let Some(record) = record else {
        // Signed for an instance the registry does not know yet: there is no password to reveal,
        // and cloudbase-init reads a 404 as an error, so the answer is "no password".
        not_yet_registered(ex);
        return Ok(respond::text(Bytes::new()));
    };
    check_owner(
        app,
        ex,
        &id,
        tenant.as_ref(),
        &record.instance.project_id,
        Action::PasswordGet,
    )?;
    ex.facts.record_version = Some(record.instance.password_version);
    let Some(plaintext) = record.open(&id, &app.keyring())? else {
        // No password: an empty 200 (cloudbase-init reads a 404 as an error).
        return Ok(respond::text(Bytes::new()));
    };
    ex.facts.secret_fingerprint = Some(app.auditor.keys().fingerprint(&plaintext));
    Ok(respond::text(Bytes::copy_from_slice(&plaintext)))
}

fn answer_set(outcome: &SetOutcome, facts: &mut Facts) -> Result<StatusCode, ApiError> {
    match *outcome {
        SetOutcome::Stored { version } => {
            facts.record_version = Some(version);
            Ok(StatusCode::OK)
        }
        SetOutcome::AlreadySet => Err(already_set()),
        SetOutcome::NotFound => Err(not_found()),
        SetOutcome::ProjectMismatch => {
            let mut e = not_found();
            e.reason = Reason::TenantMismatch;
            Err(e)
        }
    }
}

fn already_set() -> ApiError {
    ApiError::conflict("A password is already set for this instance.")
}

async fn post_password<B: super::RequestBody>(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
    body: B,
) -> Result<Response<Body>, ApiError> {
    ex.facts.operation = Action::PasswordSet.as_str();
    ex.facts.activity = Activity::Create;
    let InstanceCaller {
        instance: id,
        tenant,
    } = identify_instance(app, ex, headers)?;
    let mut record = app.store.instance(&id).await?;
    if record.is_none() && crate::nova::lookup::register_unknown(app, &id).await {
        record = app.store.instance(&id).await?;
    }
    let Some(record) = record else {
        // Signed for an instance the registry does not know yet: "try again shortly" (503 passes
        // the Neutron proxy; cloudbase-init retries), without reading the body or storing anything.
        not_yet_registered(ex);
        return Err(ApiError::not_yet_registered(NOT_YET_REGISTERED_RETRY_SECS).closing());
    };
    check_owner(
        app,
        ex,
        &id,
        tenant.as_ref(),
        &record.project_id,
        Action::PasswordSet,
    )?;
    // The compare-and-set re-checks the owner: the proxy's claim, or (certificate identity) the
    // project just read.
    let tenant = match tenant {
        Some(t) => t,
        None => record.project_id.clone(),
    };
    if record.password_set {
        // Answer early without reading the body; the compare-and-set below decides for real.
        return Err(already_set().closing());
    }

    let body_deadline = ex
        .deadline
        .min(app.clock.now() + app.limits.body_read_timeout());
    let body = read_limited(body, MAX_PLAINTEXT_LEN, body_deadline)
        .await
        .inspect_err(|e| ex.facts.body_bytes = e.bytes_read())?;
    ex.facts.body_bytes = body.len();
    validate_password(&body)?;
    let outcome = seal_once(app, ex, &id, &tenant, body, answer_set).await?;
    answer_set(&outcome, &mut ex.facts)?;
    Ok(respond::text(Bytes::new()))
}

/// Seals `blob` under the active key and stores it for `id` if none is set, with the audit event
/// of `host` (its blob fingerprint and key id filled in, `answer` deciding its outcome) made
/// durable before the commit. The one set-once path: the guest's POST and `import-nova`.
pub(crate) async fn seal_once<A: Audited>(
    app: &App,
    host: &mut A,
    id: &InstanceId,
    project: &ProjectId,
    blob: impl AsRef<[u8]> + Send + 'static,
    answer: fn(&SetOutcome, &mut Facts) -> Result<StatusCode, ApiError>,
) -> Result<SetOutcome, crate::store::StoreError> {
    let keyring = app.keyring();
    let key_id = keyring.active_key_id();
    let facts = host.facts();
    facts.secret_fingerprint = Some(app.auditor.keys().fingerprint(blob.as_ref()));
    facts.key_id = Some(key_id);
    let instance = id.to_string();
    let owner = project.to_string();
    let seal = Box::new(move |version: u64| {
        let binding = RecordBinding {
            project_id: &owner,
            instance_id: &instance,
            field: PASSWORD_FIELD,
            version,
        };
        keyring.seal(&binding, blob.as_ref())
    });
    gated(host, &app.auditor, answer, |gate| {
        app.store.set_password_once(id, project, key_id, seal, gate)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_exact() {
        use InstanceRoute::*;
        for (path, want) in [
            ("/openstack", Versions),
            ("/openstack/", Versions),
            ("/openstack/latest", Version),
            ("/openstack/2013-04-04/", Version),
            ("/openstack/latest/password", Password),
            ("/openstack/2013-04-04/password", Password),
            ("/openstack/2025-04-04/password", Password),
            ("/openstack/2012-08-10/password", NotFound),
            ("/openstack/2013-04-05/password", NotFound),
            ("/openstack/latest/password/", NotFound),
            ("/openstack/latest//password", NotFound),
            ("/openstack//latest/password", NotFound),
            ("/openstack/../admin", NotFound),
            ("/openstack/%2e%2e/admin", NotFound),
            ("/openstack/latest/%70assword", NotFound),
            ("/openstackx", NotFound),
            ("/openstack/latest/meta_data.json", NotFound),
        ] {
            assert_eq!(route(path), want, "{path}");
        }
    }

    #[test]
    fn paths_are_normalised_as_nova_normalises_them() {
        use InstanceRoute::*;
        for (path, want) in [
            ("/openstack/latest/password", Password),
            ("/openstack/latest/password/", Password),
            ("/openstack/latest//password", Password),
            ("///openstack/latest/password", Password),
            ("/openstack/./latest/./password/.", Password),
            ("/openstack/2013-04-04/x/../password", Password),
            ("/x/../openstack/latest/password", Password),
            ("/../../openstack/latest/password", Password),
            ("/openstack/latest/%70assword", Password),
            ("/openstack/latest%2Fpassword", Password),
            ("/openstack/%6Catest/password", Password),
            ("/openstack/latest/", Version),
            ("/openstack//", Versions),
            // Exactly two leading slashes stay, and Nova then reads an EC2 path.
            ("//openstack/latest/password", NotFound),
            ("/openstack/latest/password/x", NotFound),
            ("/openstack/latest/password/..", Version),
            ("/openstack/2012-08-10/password/", NotFound),
            ("/openstack/latest/Password", NotFound),
            ("/openstack/latest/%ff", NotFound),
            ("/openstack/latest/%2570assword", NotFound),
        ] {
            assert_eq!(route_as_nova(path), want, "{path}");
        }
        assert!(is_openstack_path("/x/../openstack/latest/password"));
        assert!(is_openstack_path("/openstack/../admin/v1/instances/x"));
        assert!(!is_openstack_path("/admin/v1/instances/x"));
        assert!(!is_openstack_path("//openstack/latest/password"));
        assert_eq!(normpath("/a/b/../../.."), "/");
        assert_eq!(normpath("//a//b/"), "//a/b");
    }

    #[test]
    fn password_bodies() {
        assert_eq!(validate_password(b"abc+/=="), Ok("abc+/=="));
        assert_eq!(
            validate_password(b"line1\nline2\r\n\t"),
            Ok("line1\nline2\r\n\t")
        );
        assert_eq!(validate_password(b""), Err(PasswordBodyError::Empty));
        assert_eq!(
            validate_password(b"a\0b"),
            Err(PasswordBodyError::ControlCharacter)
        );
        assert_eq!(
            validate_password(b"a\x1bb"),
            Err(PasswordBodyError::ControlCharacter)
        );
        assert_eq!(
            validate_password(b"a\x7fb"),
            Err(PasswordBodyError::ControlCharacter)
        );
        assert_eq!(
            validate_password("a\u{85}b".as_bytes()),
            Err(PasswordBodyError::ControlCharacter)
        );
        assert_eq!(
            validate_password(b"\xff\xfe"),
            Err(PasswordBodyError::NotUtf8)
        );
        assert_eq!(
            validate_password(b"\xc0\xaf"),
            Err(PasswordBodyError::NotUtf8)
        );
    }
}
