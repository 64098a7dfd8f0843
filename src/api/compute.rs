//! The owner-facing compute API subset that python-novaclient, the `nova get-password` CLI and
//! openstacksdk call:
//!
//! - `GET /`, `GET /v2.1`, `GET /v2.1/`: the version documents clients discover microversions from;
//! - `GET /v2.1/servers/{id}`: a minimal server document (the CLI looks the server up first);
//! - `GET /v2.1/servers/{id}/os-server-password`: `{"password": "<blob or empty>"}`;
//! - `DELETE /v2.1/servers/{id}/os-server-password`: 204, the guest may post again.
//!
//! Only microversion 2.1 exists here (the password API never changed); a request for another one is
//! answered 406 as Nova does. Another project's instance answers exactly like a missing one: the
//! same 404 body, after the same single store read, with no decryption on either path.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::respond::{self, ApiError, Body};
use super::{App, Exchange, authenticate_token, store_failure};
use crate::audit::event::bounded;
use crate::audit::{Activity, Facts, Reason, Surface};
use crate::crypto::RecordBinding;
use crate::ids::InstanceId;
use crate::policy::{Action, Principal, Target};
use crate::store::{ClearOutcome, PASSWORD_FIELD, Store, chunks};

/// The one compute microversion served.
pub const MICROVERSION: &str = "2.1";

/// A route of the compute API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeRoute<'a> {
    /// `/`: the list of API versions.
    Versions,
    /// `/v2.1` or `/v2.1/`: the v2.1 version document.
    Version,
    /// `/v2.1/servers/{id}`.
    Server(&'a str),
    /// `/v2.1/servers/{id}/os-server-password`.
    Password(&'a str),
    /// Anything else.
    NotFound,
}

/// Routes a path exactly (no decoding, no normalisation).
pub fn route(path: &str) -> ComputeRoute<'_> {
    match path {
        "/" => return ComputeRoute::Versions,
        "/v2.1" | "/v2.1/" => return ComputeRoute::Version,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2.1/servers/") else {
        return ComputeRoute::NotFound;
    };
    match rest.split_once('/') {
        None if !rest.is_empty() => ComputeRoute::Server(rest),
        Some((id, "os-server-password")) if !id.is_empty() => ComputeRoute::Password(id),
        _ => ComputeRoute::NotFound,
    }
}

/// Whether `path` belongs to the compute API.
pub fn owns(path: &str) -> bool {
    path == "/" || path == "/v2.1" || path.starts_with("/v2.1/")
}

/// Checks the requested microversion (`OpenStack-API-Version: compute X` or the legacy
/// `X-OpenStack-Nova-API-Version: X`): absent, `latest` and `2.1` are served; a well-formed other
/// version is 406; anything else is 400.
pub fn check_microversion(headers: &HeaderMap) -> Result<(), ApiError> {
    let mut requested = Vec::new();
    for value in headers.get_all("openstack-api-version") {
        let text = value.to_str().unwrap_or("");
        for part in text.split(',') {
            let mut words = part.split_whitespace();
            if let (Some(service), Some(version), None) = (words.next(), words.next(), words.next())
            {
                if service.eq_ignore_ascii_case("compute") {
                    requested.push(version.to_owned());
                }
            } else if !part.trim().is_empty() {
                return Err(bad_version());
            }
        }
    }
    for value in headers.get_all("x-openstack-nova-api-version") {
        requested.push(value.to_str().map_err(|_| bad_version())?.trim().to_owned());
    }
    for version in requested {
        if version.eq_ignore_ascii_case("latest") || version == MICROVERSION {
            continue;
        }
        let well_formed = version.split_once('.').is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major.len() <= 3
                && minor.len() <= 3
                && major.bytes().all(|b| b.is_ascii_digit())
                && minor.bytes().all(|b| b.is_ascii_digit())
        });
        if !well_formed {
            return Err(bad_version());
        }
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            Reason::BadRequest,
            format!(
                "Version {} is not supported by the API. Minimum is {MICROVERSION} and maximum is {MICROVERSION}.",
                bounded(&version)
            ),
        ));
    }
    Ok(())
}

fn bad_version() -> ApiError {
    ApiError::bad_request(
        Reason::InvalidHeader,
        "OpenStack-API-Version must be 'compute <major>.<minor>' (only 2.1 is served).",
    )
}

/// Adds the microversion headers every compute answer carries.
fn with_version_headers(mut response: Response<Body>) -> Response<Body> {
    let h = response.headers_mut();
    h.insert(
        "openstack-api-version",
        HeaderValue::from_static("compute 2.1"),
    );
    h.insert(
        "x-openstack-nova-api-version",
        HeaderValue::from_static("2.1"),
    );
    h.insert(
        header::VARY,
        HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
    );
    response
}

/// `https://<host>` for links, from the request's authority or `Host` header; `localhost` if
/// neither is a valid authority.
fn base_url(uri: &http::Uri, headers: &HeaderMap) -> String {
    let authority = uri.authority().map(|a| a.as_str().to_owned()).or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .map(|a| a.as_str().to_owned())
    });
    format!("https://{}", authority.as_deref().unwrap_or("localhost"))
}

fn version_document(base: &str) -> serde_json::Value {
    json!({
        "id": "v2.1",
        "status": "CURRENT",
        "version": MICROVERSION,
        "min_version": MICROVERSION,
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}/v2.1/")}],
        "media-types": [{
            "base": "application/json",
            "type": "application/vnd.openstack.compute+json;version=2.1"
        }]
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(
        Reason::UnknownInstance,
        format!("Instance {} could not be found.", bounded(id)),
    )
}

#[derive(Serialize)]
struct PasswordBody<'a> {
    password: &'a str,
}

/// Handles a compute API request.
pub async fn handle<B: super::RequestBody>(
    app: &App,
    ex: &mut Exchange,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    ex.facts.surface = Surface::Compute;
    let (parts, _body) = req.into_parts();
    let route = route(parts.uri.path());
    let response = match route {
        ComputeRoute::Versions | ComputeRoute::Version => {
            ex.facts.operation = "compute:versions";
            ex.facts.activity = Activity::Read;
            only_get(&parts.method)?;
            let base = base_url(&parts.uri, &parts.headers);
            let document = if route == ComputeRoute::Version {
                json!({ "version": version_document(&base) })
            } else {
                json!({ "versions": [version_document(&base)] })
            };
            respond::json(StatusCode::OK, &document)
        }
        ComputeRoute::Server(id) => {
            ex.facts.operation = Action::InstanceShow.as_str();
            ex.facts.activity = Activity::Read;
            only_get(&parts.method)?;
            show_server(
                app,
                ex,
                &parts.headers,
                id,
                &base_url(&parts.uri, &parts.headers),
            )
            .await?
        }
        ComputeRoute::Password(id) => match parts.method {
            Method::GET => {
                ex.facts.operation = Action::PasswordGet.as_str();
                ex.facts.activity = Activity::Read;
                get_password(app, ex, &parts.headers, id).await?
            }
            Method::DELETE => {
                ex.facts.operation = Action::PasswordClear.as_str();
                ex.facts.activity = Activity::Delete;
                clear_password(app, ex, &parts.headers, id).await?
            }
            _ => {
                ex.facts.operation = "password:other";
                return Err(method_not_allowed("GET, DELETE"));
            }
        },
        ComputeRoute::NotFound => {
            return Err(ApiError::not_found(Reason::NotFound, "No such resource."));
        }
    };
    Ok(with_version_headers(response))
}

/// 405 with `Allow`.
fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Reason::MethodNotAllowed,
        format!("Only {allow} is supported here."),
    )
    .with_allow(allow)
}

/// Refuses any method but GET.
fn only_get(method: &Method) -> Result<(), ApiError> {
    if method == Method::GET {
        Ok(())
    } else {
        Err(method_not_allowed("GET"))
    }
}

/// Authenticates the token, checks the microversion, parses the id (a malformed id is the same 404
/// as a missing instance) and records the target.
fn begin<'a>(
    app: &'a App,
    ex: &mut Exchange,
    headers: &HeaderMap,
    id: &str,
) -> Result<(&'a crate::identity::TokenEntry, InstanceId), ApiError> {
    ex.facts.target_instance = Some(bounded(id));
    let token = authenticate_token(app, ex, headers)?;
    check_microversion(headers)?;
    let instance = InstanceId::parse(id).map_err(|_| not_found(id))?;
    Ok((token, instance))
}

fn authorize(
    app: &App,
    ex: &mut Exchange,
    token: &crate::identity::TokenEntry,
    action: Action,
    id: &InstanceId,
    project: Option<&str>,
) -> Result<(), ApiError> {
    ex.facts.target_project = project.map(str::to_owned);
    let principal = Principal::Token {
        project: token.project.as_str(),
        roles: &token.roles,
    };
    let target = Target {
        instance_id: id.as_str(),
        project,
    };
    ex.authorize(app, principal, action, target, &not_found(id.as_str()))?;
    // Allowed on an instance that does not exist (an admin asking): still a 404.
    if project.is_none() {
        return Err(not_found(id.as_str()));
    }
    Ok(())
}

async fn show_server(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
    id: &str,
    base: &str,
) -> Result<Response<Body>, ApiError> {
    let (token, id) = begin(app, ex, headers, id)?;
    let record = app
        .store
        .instance(&id)
        .await
        .map_err(|e| store_failure(&e))?;
    authorize(
        app,
        ex,
        token,
        Action::InstanceShow,
        &id,
        record.as_ref().map(|r| r.project_id.as_str()),
    )?;
    let project = record.map(|r| r.project_id).unwrap_or_default();
    // metapass knows an instance's id and project, not its power state: status UNKNOWN.
    Ok(respond::json(
        StatusCode::OK,
        &json!({"server": {
            "id": id.as_str(),
            "name": id.as_str(),
            "status": "UNKNOWN",
            "tenant_id": project,
            "metadata": {},
            "links": [
                {"rel": "self", "href": format!("{base}/v2.1/servers/{id}")},
                {"rel": "bookmark", "href": format!("{base}/servers/{id}")}
            ]
        }}),
    ))
}

async fn get_password(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let (token, id) = begin(app, ex, headers, id)?;
    let record = app
        .store
        .password(&id)
        .await
        .map_err(|e| store_failure(&e))?;
    let project = record.as_ref().map(|r| r.instance.project_id.as_str());
    authorize(app, ex, token, Action::PasswordGet, &id, project)?;
    let record = record.ok_or_else(|| not_found(id.as_str()))?;
    let version = record.instance.password_version;
    ex.facts.record_version = Some(version);
    if !record.instance.password_set {
        if !record.chunks.is_empty() {
            return Err(ApiError::integrity());
        }
        return Ok(respond::json(
            StatusCode::OK,
            &PasswordBody { password: "" },
        ));
    }
    let sealed = chunks::join(PASSWORD_FIELD, &record.chunks).map_err(|_| ApiError::integrity())?;
    let binding = RecordBinding {
        instance_id: id.as_str(),
        field: PASSWORD_FIELD,
        version,
    };
    let plaintext = app
        .keyring()
        .open(&binding, &sealed)
        .map_err(|_| ApiError::integrity())?;
    // The guest posted UTF-8 (validated on the way in); anything else is not what was sealed.
    let text = std::str::from_utf8(&plaintext).map_err(|_| ApiError::integrity())?;
    ex.facts.secret_fingerprint = Some(app.auditor.keys().fingerprint(&plaintext));
    Ok(respond::json(
        StatusCode::OK,
        &PasswordBody { password: text },
    ))
}

fn answer_clear(outcome: &ClearOutcome, _: &mut Facts) -> Result<StatusCode, ApiError> {
    match outcome {
        ClearOutcome::Cleared { .. } => Ok(StatusCode::NO_CONTENT),
        ClearOutcome::NotFound => Err(ApiError::not_found(
            Reason::UnknownInstance,
            "Instance could not be found.",
        )),
    }
}

async fn clear_password(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let (token, id) = begin(app, ex, headers, id)?;
    let record = app
        .store
        .instance(&id)
        .await
        .map_err(|e| store_failure(&e))?;
    authorize(
        app,
        ex,
        token,
        Action::PasswordClear,
        &id,
        record.as_ref().map(|r| r.project_id.as_str()),
    )?;
    let (gate, invoked) = ex.gate(app, answer_clear);
    let result = app.store.clear_password(&id, gate).await;
    ex.settle_gate(&invoked, &result);
    let outcome = result.map_err(|e| store_failure(&e))?;
    Ok(respond::empty(answer_clear(&outcome, &mut ex.facts)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use ComputeRoute::*;
        let id = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";
        assert_eq!(route("/"), Versions);
        assert_eq!(route("/v2.1"), Version);
        assert_eq!(route("/v2.1/"), Version);
        assert_eq!(route(&format!("/v2.1/servers/{id}")), Server(id));
        assert_eq!(
            route(&format!("/v2.1/servers/{id}/os-server-password")),
            Password(id)
        );
        for bad in [
            "/v2.1/servers/",
            "/v2.1/servers",
            "/v2.1/servers//os-server-password",
            "/v2.1/servers/x/os-server-password/",
            "/v2.1/servers/x/action",
            "/v2.0/servers/x",
            "/v2.1/project/servers/x",
        ] {
            assert_eq!(route(bad), NotFound, "{bad}");
        }
    }

    #[test]
    fn microversions() {
        let check = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_str(v).unwrap());
            }
            check_microversion(&h).map_err(|e| e.status.as_u16())
        };
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(check(&[("openstack-api-version", "compute 2.1")]), Ok(()));
        assert_eq!(
            check(&[("openstack-api-version", "compute latest")]),
            Ok(())
        );
        assert_eq!(check(&[("openstack-api-version", "volume 3.5")]), Ok(()));
        assert_eq!(check(&[("x-openstack-nova-api-version", "2.1")]), Ok(()));
        assert_eq!(
            check(&[("openstack-api-version", "compute 2.90")]),
            Err(406)
        );
        assert_eq!(check(&[("x-openstack-nova-api-version", "3.0")]), Err(406));
        assert_eq!(check(&[("openstack-api-version", "compute two")]), Err(400));
        assert_eq!(check(&[("openstack-api-version", "garbage")]), Err(400));
    }
}
