//! The owner-facing compute API subset that python-novaclient, the `nova get-password` CLI and
//! openstacksdk call:
//!
//! - `GET /`, `GET /v2.1`, `GET /v2.1/`: the version documents clients discover microversions from;
//! - `GET /v2.1/servers/{id}`: a minimal server document (the CLI looks the server up first);
//! - `GET /v2.1/servers/{id}/os-server-password`: `{"password": "<blob or empty>"}`;
//! - `DELETE /v2.1/servers/{id}/os-server-password`: 204, the guest may post again.
//!
//! Each also under the legacy `/v2.1/{project_id}/servers/...` form (the URL's project must be
//! the caller's: any other is the same 404 as a missing instance) and under the configured
//! `path_prefix`. Microversions from 2.1 to the configured maximum (and `latest`) are accepted and
//! echoed as Nova does (see [`crate::microversion`]); the password API is the same in all of them.
//! Another project's instance answers exactly like a missing one: the same 404 body, after the
//! same single store read, with no decryption on either path.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::caller::authenticate_token;
use super::exchange::Exchange;
use super::respond::{self, ApiError, Body};
use crate::app::App;
use crate::audit::event::bounded;
use crate::audit::gate::gated;
use crate::audit::{Activity, Facts, Reason, Surface};
use crate::config::ComputeApi;
use crate::identity::TokenCaller;
use crate::ids::{InstanceId, ProjectId};
use crate::microversion::{self, Microversion};
use crate::policy::{Action, Principal, Target};
use crate::store::{ClearOutcome, Store};

/// A route of the compute API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ComputeRoute<'a> {
    /// `/`: the list of API versions.
    Versions,
    /// `/v2.1` or `/v2.1/`: the v2.1 version document.
    Version,
    /// `/v2.1[/{project}]/servers/{id}`.
    Server(Option<&'a str>, &'a str),
    /// `/v2.1[/{project}]/servers/{id}/os-server-password`.
    Password(Option<&'a str>, &'a str),
    /// Anything else.
    NotFound,
}

/// `path` without the configured prefix (which must be followed by `/` or end the path); the
/// API is served with and without it.
fn unprefixed<'a>(api: &ComputeApi, path: &'a str) -> &'a str {
    if api.path_prefix.is_empty() {
        return path;
    }
    match path.strip_prefix(api.path_prefix.as_str()) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// `servers/{id}` or `servers/{id}/os-server-password`.
fn server_route<'a>(project: Option<&'a str>, rest: &'a str) -> ComputeRoute<'a> {
    let Some(rest) = rest.strip_prefix("servers/") else {
        return ComputeRoute::NotFound;
    };
    match rest.split_once('/') {
        None if !rest.is_empty() => ComputeRoute::Server(project, rest),
        Some((id, "os-server-password")) if !id.is_empty() => ComputeRoute::Password(project, id),
        _ => ComputeRoute::NotFound,
    }
}

/// Routes a path exactly (no decoding, no normalisation).
pub(crate) fn route<'a>(api: &ComputeApi, path: &'a str) -> ComputeRoute<'a> {
    let path = unprefixed(api, path);
    match path {
        "/" => return ComputeRoute::Versions,
        "/v2.1" | "/v2.1/" => return ComputeRoute::Version,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2.1/") else {
        return ComputeRoute::NotFound;
    };
    match server_route(None, rest) {
        ComputeRoute::NotFound => match rest.split_once('/') {
            Some((project, rest)) if !project.is_empty() => server_route(Some(project), rest),
            _ => ComputeRoute::NotFound,
        },
        found => found,
    }
}

/// Whether `path` belongs to the compute API.
pub(crate) fn owns(api: &ComputeApi, path: &str) -> bool {
    let path = unprefixed(api, path);
    path == "/" || path == "/v2.1" || path.starts_with("/v2.1/")
}

/// The microversion a request is served at, or the refusal Nova would give: 400 for a malformed
/// version, 406 for one outside 2.1 to the configured maximum.
pub(crate) fn negotiate_microversion(
    api: &ComputeApi,
    headers: &HeaderMap,
) -> Result<Microversion, ApiError> {
    Ok(microversion::negotiate(headers, api.max_microversion)?)
}

/// Adds the headers every compute answer carries, as Nova sends them: the version served, `Vary`
/// on the version headers, and the request id under Nova's two names.
///
/// `version` is `None` when the request was refused before its version was known (no token, a
/// malformed version): Nova sends no version headers then either.
pub(crate) fn with_compute_headers(
    response: &mut Response<Body>,
    version: Option<Microversion>,
    request_id: &str,
) {
    let h = response.headers_mut();
    if let Some(version) = version {
        let served = version.to_string();
        if let Ok(v) = HeaderValue::from_str(&format!("compute {served}")) {
            h.insert("openstack-api-version", v);
        }
        if let Ok(v) = HeaderValue::from_str(&served) {
            h.insert("x-openstack-nova-api-version", v);
        }
        h.insert(
            header::VARY,
            HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
        );
    }
    if let Some(id) = super::respond::request_id_header(request_id) {
        h.insert("x-openstack-request-id", id.clone());
        h.insert("x-compute-request-id", id);
    }
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

fn version_document(base: &str, api: &ComputeApi) -> serde_json::Value {
    json!({
        "id": "v2.1",
        "status": "CURRENT",
        "version": api.max_microversion.to_string(),
        "min_version": microversion::MIN.to_string(),
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}{}/v2.1/", api.path_prefix)}],
        "media-types": [{
            "base": "application/json",
            "type": "application/vnd.openstack.compute+json;version=2.1"
        }]
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::unknown_instance(format!("Instance {} could not be found.", bounded(id)))
}

#[derive(Serialize)]
struct PasswordBody<'a> {
    password: &'a str,
}

/// Handles a compute API request.
pub(crate) async fn handle<B: super::RequestBody>(
    app: &App,
    ex: &mut Exchange,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    ex.facts.surface = Surface::Compute;
    let (parts, _body) = req.into_parts();
    let api = &app.compute_api;
    let route = route(api, parts.uri.path());
    match route {
        ComputeRoute::Versions | ComputeRoute::Version => {
            ex.facts.operation = "compute:versions";
            ex.facts.activity = Activity::Read;
            only_get(&parts.method)?;
            ex.microversion = Some(negotiate_microversion(api, &parts.headers)?);
            let base = base_url(&parts.uri, &parts.headers);
            let document = if route == ComputeRoute::Version {
                json!({ "version": version_document(&base, api) })
            } else {
                json!({ "versions": [version_document(&base, api)] })
            };
            Ok(respond::json(StatusCode::OK, &document))
        }
        ComputeRoute::Server(project, id) => {
            ex.facts.operation = Action::InstanceShow.as_str();
            ex.facts.activity = Activity::Read;
            only_get(&parts.method)?;
            let base = base_url(&parts.uri, &parts.headers);
            let caller = begin(app, ex, &parts.headers, project, id).await?;
            show_server(app, ex, caller, &base).await
        }
        ComputeRoute::Password(project, id) => match parts.method {
            Method::GET => {
                ex.facts.operation = Action::PasswordGet.as_str();
                ex.facts.activity = Activity::Read;
                let caller = begin(app, ex, &parts.headers, project, id).await?;
                get_password(app, ex, caller).await
            }
            Method::DELETE => {
                ex.facts.operation = Action::PasswordClear.as_str();
                ex.facts.activity = Activity::Delete;
                let caller = begin(app, ex, &parts.headers, project, id).await?;
                clear_password(app, ex, caller).await
            }
            _ => {
                ex.facts.operation = "password:other";
                Err(ApiError::wrong_method(Surface::Compute, "GET, DELETE"))
            }
        },
        ComputeRoute::NotFound => Err(ApiError::no_such_resource()),
    }
}

/// Refuses any method but GET.
fn only_get(method: &Method) -> Result<(), ApiError> {
    if method == Method::GET {
        Ok(())
    } else {
        Err(ApiError::wrong_method(Surface::Compute, "GET"))
    }
}

/// An authenticated request for one instance.
struct Owned {
    token: TokenCaller,
    instance: InstanceId,
}

/// Authenticates the token, checks the microversion and the URL's project (legacy form), parses
/// the id (a malformed id, like another project in the URL, is the same 404 as a missing
/// instance) and records the target.
async fn begin(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
    url_project: Option<&str>,
    id: &str,
) -> Result<Owned, ApiError> {
    ex.facts.target_instance = Some(bounded(id));
    let token = authenticate_token(app, ex, headers).await?;
    ex.microversion = Some(negotiate_microversion(&app.compute_api, headers)?);
    if url_project.is_some_and(|p| p != token.project.as_str()) {
        let mut refusal = not_found(id);
        refusal.reason = Reason::NotOwner;
        return Err(refusal);
    }
    let instance = InstanceId::parse(id).map_err(|_| not_found(id))?;
    Ok(Owned { token, instance })
}

fn authorize(
    app: &App,
    ex: &mut Exchange,
    owned: &Owned,
    action: Action,
    project: Option<&ProjectId>,
) -> Result<(), ApiError> {
    let id = &owned.instance;
    ex.facts.target_project = project.map(ProjectId::to_string);
    let principal = Principal::Token {
        project: &owned.token.project,
        roles: &owned.token.roles,
    };
    let target = Target {
        instance_id: Some(id),
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
    owned: Owned,
    base: &str,
) -> Result<Response<Body>, ApiError> {
    let record = app.store.instance(&owned.instance).await?;
    authorize(
        app,
        ex,
        &owned,
        Action::InstanceShow,
        record.as_ref().map(|r| &r.project_id),
    )?;
    let project = record.map(|r| r.project_id.to_string()).unwrap_or_default();
    let id = owned.instance;
    let prefix = &app.compute_api.path_prefix;
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
                {"rel": "self", "href": format!("{base}{prefix}/v2.1/servers/{id}")},
                {"rel": "bookmark", "href": format!("{base}{prefix}/servers/{id}")}
            ]
        }}),
    ))
}

async fn get_password(
    app: &App,
    ex: &mut Exchange,
    owned: Owned,
) -> Result<Response<Body>, ApiError> {
    let record = app.store.password(&owned.instance).await?;
    let project = record.as_ref().map(|r| &r.instance.project_id);
    authorize(app, ex, &owned, Action::PasswordGet, project)?;
    let id = &owned.instance;
    let record = record.ok_or_else(|| not_found(id.as_str()))?;
    ex.facts.record_version = Some(record.instance.password_version);
    let Some(plaintext) = record.open(id, &app.keyring())? else {
        return Ok(respond::json(
            StatusCode::OK,
            &PasswordBody { password: "" },
        ));
    };
    // The guest posted UTF-8 (validated on the way in); anything else is not what was sealed.
    let text = std::str::from_utf8(&plaintext).map_err(|_| ApiError::integrity())?;
    ex.facts.secret_fingerprint = Some(app.auditor.keys().fingerprint(&plaintext));
    Ok(respond::json(
        StatusCode::OK,
        &PasswordBody { password: text },
    ))
}

fn answer_clear(outcome: &ClearOutcome, facts: &mut Facts) -> Result<StatusCode, ApiError> {
    match outcome {
        ClearOutcome::Cleared { version, .. } => {
            facts.record_version = Some(*version);
            Ok(StatusCode::NO_CONTENT)
        }
        ClearOutcome::NotFound => Err(ApiError::unknown_instance("Instance could not be found.")),
    }
}

async fn clear_password(
    app: &App,
    ex: &mut Exchange,
    owned: Owned,
) -> Result<Response<Body>, ApiError> {
    let record = app.store.instance(&owned.instance).await?;
    authorize(
        app,
        ex,
        &owned,
        Action::PasswordClear,
        record.as_ref().map(|r| &r.project_id),
    )?;
    let outcome = gated(ex, &app.auditor, answer_clear, |gate| {
        app.store.clear_password(&owned.instance, gate)
    })
    .await?;
    Ok(respond::empty(answer_clear(&outcome, &mut ex.facts)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use ComputeRoute::*;
        let api = ComputeApi::default();
        let id = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";
        assert_eq!(route(&api, "/"), Versions);
        assert_eq!(route(&api, "/v2.1"), Version);
        assert_eq!(route(&api, "/v2.1/"), Version);
        assert_eq!(
            route(&api, &format!("/v2.1/servers/{id}")),
            Server(None, id)
        );
        assert_eq!(
            route(&api, &format!("/v2.1/servers/{id}/os-server-password")),
            Password(None, id)
        );
        // The legacy form with the project in the URL.
        assert_eq!(
            route(
                &api,
                &format!("/v2.1/project-a/servers/{id}/os-server-password")
            ),
            Password(Some("project-a"), id)
        );
        assert_eq!(
            route(&api, "/v2.1/project/servers/x"),
            Server(Some("project"), "x")
        );
        for bad in [
            "/v2.1/servers/",
            "/v2.1/servers",
            "/v2.1/servers//os-server-password",
            "/v2.1/servers/x/os-server-password/",
            "/v2.1/servers/x/action",
            "/v2.0/servers/x",
            "/v2.1/project/servers/",
            "/v2.1//servers/x",
            "/v2.1/a/b/servers/x",
            "/compute/v2.1/servers/x",
        ] {
            assert_eq!(route(&api, bad), NotFound, "{bad}");
        }
    }

    #[test]
    fn a_prefix_serves_the_api_below_it_too() {
        use ComputeRoute::*;
        let api = ComputeApi {
            path_prefix: "/compute".into(),
            ..ComputeApi::default()
        };
        assert_eq!(route(&api, "/compute"), Versions);
        assert_eq!(route(&api, "/compute/v2.1/"), Version);
        assert_eq!(
            route(&api, "/compute/v2.1/p/servers/x/os-server-password"),
            Password(Some("p"), "x")
        );
        assert_eq!(route(&api, "/v2.1/servers/x"), Server(None, "x"));
        assert_eq!(route(&api, "/computex/v2.1/servers/x"), NotFound);
        assert!(owns(&api, "/compute/v2.1/servers/x"));
        assert!(!owns(&api, "/computex"));
    }

    #[test]
    fn microversions() {
        let api = ComputeApi::default();
        let check = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_str(v).unwrap());
            }
            negotiate_microversion(&api, &h)
                .map(|v| v.to_string())
                .map_err(|e| e.status.as_u16())
        };
        assert_eq!(check(&[]).as_deref(), Ok("2.1"));
        assert_eq!(
            check(&[("openstack-api-version", "compute 2.1")]).as_deref(),
            Ok("2.1")
        );
        assert_eq!(
            check(&[("openstack-api-version", "compute latest")]).as_deref(),
            Ok("2.104")
        );
        assert_eq!(
            check(&[("openstack-api-version", "volume 3.5")]).as_deref(),
            Ok("2.1")
        );
        assert_eq!(
            check(&[("x-openstack-nova-api-version", "2.96")]).as_deref(),
            Ok("2.96")
        );
        assert_eq!(
            check(&[("openstack-api-version", "compute 2.90")]).as_deref(),
            Ok("2.90")
        );
        assert_eq!(
            check(&[("openstack-api-version", "compute 2.105")]),
            Err(406)
        );
        assert_eq!(check(&[("x-openstack-nova-api-version", "3.0")]), Err(406));
        assert_eq!(check(&[("openstack-api-version", "compute two")]), Err(400));
        assert_eq!(check(&[("openstack-api-version", "garbage")]), Err(400));
    }
}
