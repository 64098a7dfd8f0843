//! The background rewrap: reseals every password sealed under a key other than the active one,
//! one audited `password:rewrap` event each, a batch at a time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::StatusCode;

use crate::api::respond::ApiError;
use crate::app::App;
use crate::audit::gate::{SystemTask, gated};
use crate::audit::{Activity, Facts, Surface};
use crate::config::RewrapMode;
use crate::crypto::{Keyring, RecordBinding};
use crate::store::{PASSWORD_FIELD, RewrapCandidate, RewrapOutcome, Store, Unreadable};

fn answer_rewrap(outcome: &RewrapOutcome, facts: &mut Facts) -> Result<StatusCode, ApiError> {
    match *outcome {
        RewrapOutcome::Rewrapped { from, version } => {
            facts.previous_key_id = Some(from);
            facts.record_version = Some(version);
            Ok(StatusCode::OK)
        }
        RewrapOutcome::Skipped => Err(ApiError::conflict(
            "The password changed since it was listed; it was left as it is.",
        )),
        RewrapOutcome::Unreadable { from } => {
            facts.previous_key_id = Some(from);
            Err(ApiError::integrity())
        }
    }
}

/// Reseals one password under the active key of `keyring`, audited as `password:rewrap`.
async fn rewrap_one(app: &App, keyring: Arc<Keyring>, candidate: RewrapCandidate) {
    let mut task = SystemTask::new("password:rewrap", Activity::Update);
    task.facts.surface = Surface::Admin;
    task.facts.target_instance = Some(candidate.id.to_string());
    task.facts.key_id = Some(keyring.active_key_id());
    task.facts.previous_key_id = Some(candidate.key_id);
    let instance = candidate.id.to_string();
    let owner = candidate.project.to_string();
    let sealing = keyring.clone();
    let reseal = Box::new(move |old: &[u8], old_version: u64, new_version: u64| {
        let open_binding = RecordBinding {
            project_id: &owner,
            instance_id: &instance,
            field: PASSWORD_FIELD,
            version: old_version,
        };
        let Ok(plaintext) = sealing.open(&open_binding, old) else {
            return Ok(Err(Unreadable));
        };
        let seal_binding = RecordBinding {
            version: new_version,
            ..open_binding
        };
        sealing.seal(&seal_binding, &plaintext).map(Ok)
    });
    let active = keyring.active_key_id();
    let result = gated(&mut task, &app.auditor, answer_rewrap, |gate| {
        app.store.rewrap(&candidate, active, reseal, gate)
    })
    .await;
    let recorded = match result {
        Ok(outcome) => {
            match outcome {
                RewrapOutcome::Rewrapped { .. } => {
                    app.keys.rewrapped.fetch_add(1, Ordering::SeqCst)
                }
                RewrapOutcome::Unreadable { .. } => {
                    tracing::error!(instance = %candidate.id, "a password failed its integrity check during rewrap; left as it is");
                    app.keys.unreadable.fetch_add(1, Ordering::SeqCst)
                }
                RewrapOutcome::Skipped => 0,
            };
            task.finish(&app.auditor, 200).await
        }
        Err(e) => {
            tracing::warn!(instance = %candidate.id, error = %e, "rewrap of one password failed");
            task.fail(&app.auditor, &ApiError::from(e)).await
        }
    };
    if let Err(e) = recorded {
        tracing::error!(error = %e, "could not audit a rewrap");
    }
}

/// One pass over every password sealed under a non-active key, in instance order, a batch at a
/// time with a pause between batches. A reload during the pass restarts it under the new key.
async fn rewrap_pass(app: &App) {
    let settings = &app.keys.settings;
    let mut keyring = app.keyring();
    let mut after = None;
    loop {
        if app.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let now = app.keyring();
        if now.active_key_id() != keyring.active_key_id() {
            keyring = now;
            after = None;
        }
        let batch = match app
            .store
            .rewrap_candidates(
                keyring.active_key_id(),
                after.as_ref(),
                settings.rewrap_batch,
            )
            .await
        {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "listing passwords to rewrap failed; retrying later");
                return;
            }
        };
        let Some(last) = batch.last() else {
            return;
        };
        after = Some(last.id.clone());
        // Concurrently, so the store's writer commits the batch in one or a few transactions.
        let steps = batch
            .into_iter()
            .map(|candidate| rewrap_one(app, keyring.clone(), candidate));
        futures_util::future::join_all(steps).await;
        tokio::time::sleep(settings.rewrap_pause).await;
    }
}

/// The background rewrap: a pass at startup and after every keyring change (`auto`), or when an
/// admin asks (`POST /admin/v1/keys/rewrap`, in both modes).
pub(crate) async fn rewrap_loop(app: Arc<App>) {
    loop {
        let asked = app.keys.requested.swap(false, Ordering::SeqCst);
        if asked || app.keys.settings.rewrap == RewrapMode::Auto {
            app.keys.running.store(true, Ordering::SeqCst);
            rewrap_pass(&app).await;
            app.keys.running.store(false, Ordering::SeqCst);
        }
        if app.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        app.keys.wake.notified().await;
    }
}
