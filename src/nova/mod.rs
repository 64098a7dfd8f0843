//! Living beside Nova: taking over its stored passwords ([`import`]) and keeping the registry true
//! from its versioned notifications ([`notifications`]).
//!
//! Both act without a request, so every change they make is a system event in the audit log
//! (caller `System`, surface `admin`), recorded durably before the store commits, exactly like a
//! request's.

pub(crate) mod import;
pub(crate) mod lookup;
pub(crate) mod notifications;

use crate::api::respond::ApiError;
use crate::app::App;
use crate::audit::gate::{SystemTask, gated};
use crate::audit::{Activity, Surface};
use crate::ids::{InstanceId, ProjectId};
use crate::store::{RegisterOutcome, Store};

/// A system task for `operation` on `instance` (and its `project`, when known).
fn task(
    operation: &'static str,
    activity: Activity,
    instance: Option<&str>,
    project: Option<&str>,
) -> SystemTask {
    let mut task = SystemTask::new(operation, activity);
    task.facts.surface = Surface::Admin;
    task.facts.target_instance = instance.map(str::to_owned);
    task.facts.target_project = project.map(str::to_owned);
    task
}

/// Registers `id` to `project`, audited as `operation`. Returns the outcome, or the store error
/// (already audited).
async fn register(
    app: &App,
    operation: &'static str,
    id: &InstanceId,
    project: &ProjectId,
    detail: String,
) -> Result<RegisterOutcome, ApiError> {
    let mut task = task(
        operation,
        Activity::Create,
        Some(id.as_str()),
        Some(project.as_str()),
    );
    task.facts.detail = Some(detail);
    let result = gated(
        &mut task,
        &app.auditor,
        crate::api::admin::answer_register,
        |gate| {
            app.store
                .register(id, project, crate::store::Registration::Ordinary, gate)
        },
    )
    .await;
    finish(app, task, result).await
}

/// Ends `task` after a gated store call: the gate already recorded the event, or the failure is
/// recorded now. The store error, as an answer, is returned for the caller to act on.
async fn finish<O>(
    app: &App,
    task: SystemTask,
    result: Result<O, crate::store::StoreError>,
) -> Result<O, ApiError> {
    match result {
        Ok(outcome) => {
            if let Err(e) = task.finish(&app.auditor, 200).await {
                return Err(audit_failed(&e));
            }
            Ok(outcome)
        }
        Err(e) => {
            let error = ApiError::from(e);
            let _ = task.fail(&app.auditor, &error).await;
            Err(error)
        }
    }
}

fn audit_failed(e: &crate::audit::AuditError) -> ApiError {
    tracing::error!(error = %e, "could not audit a Nova change");
    ApiError::audit_unavailable()
}

/// Records a refused item (nothing changed) as `operation` with `error`. Only a valid instance
/// id is named as the target.
async fn refuse(
    app: &App,
    operation: &'static str,
    instance: Option<&str>,
    project: Option<&str>,
    error: &ApiError,
) -> Result<(), ApiError> {
    let instance = instance.filter(|i| InstanceId::parse(i).is_ok());
    let project = project.filter(|p| ProjectId::parse(p).is_ok());
    let task = task(operation, Activity::Unknown, instance, project);
    task.fail(&app.auditor, error)
        .await
        .map_err(|e| audit_failed(&e))
}
