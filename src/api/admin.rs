//! The admin API: the instance registry (`PUT|GET|DELETE /admin/v1/instances/{id}`), and the data
//! keys under `/admin/v1/keys` (see [`super::keys`]).
//!
//! An instance must be registered to its project before it can post a password. Deleting an
//! instance purges its sealed password with it.

use http::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::body::read_limited;
use super::caller::authenticate_token;
use super::exchange::Exchange;
use super::respond::{self, ApiError, Body};
use crate::app::App;
use crate::audit::event::bounded;
use crate::audit::gate::gated;
use crate::audit::{Activity, Facts, Reason, Surface};
use crate::ids::{InstanceId, ProjectId};
use crate::policy::{Action, Principal, Target};
use crate::store::{DeleteOutcome, RegisterOutcome, Store};

/// The largest registration body accepted.
pub(crate) const MAX_REGISTER_BODY: usize = 4096;

const INSTANCES_PREFIX: &str = "/admin/v1/instances/";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    project_id: String,
    /// The operator's explicit word that an id deleted from another project may be registered
    /// to this one (its tombstone is then dropped).
    #[serde(default)]
    replace_deleted: bool,
}

#[derive(Serialize)]
struct InstanceView<'a> {
    instance_id: &'a str,
    project_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_set: Option<bool>,
}

fn not_found() -> ApiError {
    ApiError::unknown_instance("Instance not found.")
}

/// Handles a request under `/admin/`.
pub(crate) async fn handle<B: super::RequestBody>(
    app: &App,
    ex: &mut Exchange,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    ex.facts.surface = Surface::Admin;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/admin/v1/keys" || path.starts_with("/admin/v1/keys/") {
        return super::keys::handle(app, ex, &parts.method, path, &parts.headers).await;
    }
    let id_text = parts
        .uri
        .path()
        .strip_prefix(INSTANCES_PREFIX)
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .ok_or_else(ApiError::no_such_resource)?;
    let (action, activity) = match parts.method {
        Method::PUT => (Action::InstanceRegister, Activity::Create),
        Method::GET => (Action::InstanceShow, Activity::Read),
        Method::DELETE => (Action::InstanceDelete, Activity::Delete),
        _ => return Err(ApiError::wrong_method(Surface::Admin, "GET, PUT, DELETE")),
    };
    ex.facts.operation = action.as_str();
    ex.facts.activity = activity;
    ex.facts.target_instance = Some(bounded(id_text));
    let token = authenticate_token(app, ex, &parts.headers).await?;
    let id = InstanceId::parse(id_text)
        .map_err(|e| ApiError::bad_request(Reason::BadRequest, e.to_string()))?;

    let existing = app.store.instance(&id).await?;
    ex.facts.target_project = existing.as_ref().map(|r| r.project_id.to_string());
    let principal = Principal::Token {
        project: &token.project,
        roles: &token.roles,
    };
    let target = Target {
        instance_id: Some(&id),
        project: existing.as_ref().map(|r| &r.project_id),
    };
    ex.authorize(app, principal, action, target, &not_found())?;

    match action {
        Action::InstanceRegister => register(app, ex, &id, body).await,
        Action::InstanceShow => {
            let record = existing.ok_or_else(not_found)?;
            Ok(respond::json(
                StatusCode::OK,
                &InstanceView {
                    instance_id: id.as_str(),
                    project_id: record.project_id.as_str(),
                    password_set: Some(record.password_set),
                },
            ))
        }
        _ => {
            existing.ok_or_else(not_found)?;
            let outcome = gated(ex, &app.auditor, answer_delete, |gate| {
                app.store.delete_instance(&id, gate)
            })
            .await?;
            Ok(respond::empty(answer_delete(&outcome, &mut ex.facts)?))
        }
    }
}

/// The answer to a registration (also the outcome of the registrations Nova's notifications and
/// `import-nova` make).
pub(crate) fn answer_register(
    outcome: &RegisterOutcome,
    _: &mut Facts,
) -> Result<StatusCode, ApiError> {
    match outcome {
        RegisterOutcome::Created => Ok(StatusCode::CREATED),
        RegisterOutcome::Unchanged => Ok(StatusCode::OK),
        RegisterOutcome::OwnedByOther => Err(ApiError::conflict(
            "The instance is registered to another project.",
        )),
        RegisterOutcome::DeletedFromOther => Err(ApiError::conflict(
            "This instance id was deleted from another project; an operator may register it again with \"replace_deleted\": true.",
        )),
    }
}

fn answer_delete(outcome: &DeleteOutcome, _: &mut Facts) -> Result<StatusCode, ApiError> {
    match outcome {
        DeleteOutcome::Deleted => Ok(StatusCode::NO_CONTENT),
        DeleteOutcome::NotFound => Err(not_found()),
    }
}

async fn register<B: super::RequestBody>(
    app: &App,
    ex: &mut Exchange,
    id: &InstanceId,
    body: B,
) -> Result<Response<Body>, ApiError> {
    let deadline = ex
        .deadline
        .min(app.clock.now() + app.limits.body_read_timeout());
    let body = read_limited(body, MAX_REGISTER_BODY, deadline)
        .await
        .inspect_err(|e| ex.facts.body_bytes = e.bytes_read())?;
    ex.facts.body_bytes = body.len();
    let invalid = |detail: String| {
        ApiError::bad_request(
            Reason::BodyInvalid,
            format!("The body must be a JSON object {{\"project_id\": \"...\"}}: {detail}"),
        )
    };
    // serde also accepts a struct written as a JSON array; only an object is the contract. (Parsing
    // to a serde_json::Value first would lose duplicate keys, which the struct parse refuses.)
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(invalid("not an object".into()));
    }
    let parsed: RegisterBody = serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
    let project = ProjectId::parse(&parsed.project_id)
        .map_err(|e| ApiError::bad_request(Reason::BodyInvalid, e.to_string()))?;
    ex.facts.target_project = Some(project.to_string());
    let how = if parsed.replace_deleted {
        crate::store::Registration::ReplacingDeleted
    } else {
        crate::store::Registration::Ordinary
    };
    let outcome = gated(ex, &app.auditor, answer_register, |gate| {
        app.store.register(id, &project, how, gate)
    })
    .await?;
    let status = answer_register(&outcome, &mut ex.facts)?;
    Ok(respond::json(
        status,
        &InstanceView {
            instance_id: id.as_str(),
            project_id: project.as_str(),
            password_set: None,
        },
    ))
}
