//! The admin key endpoints; the key lifecycle itself is in [`crate::keys`].
//!
//! | request | action | answer |
//! |---|---|---|
//! | `GET /admin/v1/keys` | `keys:status` | the active key, every key's records and seals, rewrap progress |
//! | `POST /admin/v1/keys/reload` | `keys:reload` | reads the keyring file again (as SIGHUP does) |
//! | `POST /admin/v1/keys/rewrap` | `keys:rewrap` | starts a rewrap pass now (202) |

use http::{Method, Response, StatusCode};

use super::Exchange;
use super::caller::authenticate_token;
use super::respond::{self, ApiError, Body};
use crate::app::App;
use crate::audit::{Activity, Surface};
use crate::keys::state::{reload_from_source, request_rewrap, status};
use crate::policy::{Action, Principal, Target};

/// Handles `/admin/v1/keys...` (see the module docs).
pub(crate) async fn handle(
    app: &App,
    ex: &mut Exchange,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<Response<Body>, ApiError> {
    ex.facts.surface = Surface::Admin;
    let (action, allowed_method, allow) = match path {
        "/admin/v1/keys" => (Action::KeysStatus, Method::GET, "GET"),
        "/admin/v1/keys/reload" => (Action::KeysReload, Method::POST, "POST"),
        "/admin/v1/keys/rewrap" => (Action::KeysRewrap, Method::POST, "POST"),
        _ => return Err(ApiError::no_such_resource()),
    };
    ex.facts.operation = action.as_str();
    ex.facts.activity = if allowed_method == Method::GET {
        Activity::Read
    } else {
        Activity::Update
    };
    if *method != allowed_method {
        return Err(ApiError::wrong_method(Surface::Admin, allow));
    }
    let token = authenticate_token(app, ex, headers).await?;
    let principal = Principal::Token {
        project: &token.project,
        roles: &token.roles,
    };
    let target = Target {
        instance_id: None,
        project: None,
    };
    ex.authorize(
        app,
        principal,
        action,
        target,
        &ApiError::no_such_resource(),
    )?;
    match action {
        Action::KeysReload => reload_from_source(app, ex).await?,
        Action::KeysRewrap => request_rewrap(app),
        _ => {}
    }
    let report = status(app).await?;
    let facts = &mut ex.facts;
    facts.key_id = Some(report.active);
    facts.key_ids = report
        .keys
        .iter()
        .filter(|k| k.loaded)
        .map(|k| k.id)
        .collect();
    let code = if action == Action::KeysRewrap {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(respond::json(code, &report))
}
