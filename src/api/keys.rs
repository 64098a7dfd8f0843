//! Data keys while serving: the keyring in use (swapped on reload), the checks a keyring must pass
//! before it is used, the admin key endpoints, and the background rewrap.
//!
//! A keyring is refused (and the one in use stays) if a key that records are still sealed under is
//! missing from it, or if a key id the store has seen comes with a different secret (its check
//! value differs). Every load, reload, refusal and resealed record is an audit event.
//!
//! | request | action | answer |
//! |---|---|---|
//! | `GET /admin/v1/keys` | `keys:status` | the active key, every key's records and seals, rewrap progress |
//! | `POST /admin/v1/keys/reload` | `keys:reload` | reads the keyring file again (as SIGHUP does) |
//! | `POST /admin/v1/keys/rewrap` | `keys:rewrap` | starts a rewrap pass now (202) |

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use http::{Method, Response, StatusCode};
use serde::Serialize;

use super::respond::{self, ApiError, Body};
use super::{App, Audited, Exchange, SystemTask, authenticate_token, store_failure};
use crate::audit::{Activity, Facts, Reason, Surface};
use crate::config::{KeySettings, RewrapMode};
use crate::crypto::{KeyId, Keyring, MAX_SEALS_PER_KEY, RecordBinding};
use crate::policy::{Action, Principal, Target};
use crate::store::{
    KeySync, PASSWORD_FIELD, RewrapCandidate, RewrapOutcome, Store, StoreError, Unreadable,
};

/// The keyring in use and the state of the rewrap task.
pub struct KeyState {
    current: RwLock<Arc<Keyring>>,
    /// Where keys come from, and how rewrap proceeds.
    pub settings: KeySettings,
    wake: tokio::sync::Notify,
    requested: AtomicBool,
    running: AtomicBool,
    rewrapped: AtomicU64,
    unreadable: AtomicU64,
    installing: tokio::sync::Mutex<()>,
}

impl KeyState {
    /// Starts with `keyring` (not yet checked against the store: see [`load_at_startup`]).
    pub fn new(keyring: Keyring, settings: KeySettings) -> Self {
        Self {
            current: RwLock::new(Arc::new(keyring)),
            settings,
            wake: tokio::sync::Notify::new(),
            requested: AtomicBool::new(false),
            running: AtomicBool::new(false),
            rewrapped: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            installing: tokio::sync::Mutex::new(()),
        }
    }

    /// The keyring in use now.
    pub fn current(&self) -> Arc<Keyring> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, keyring: Arc<Keyring>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keyring;
    }
}

impl App {
    /// The keyring in use now.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keys.current()
    }
}

/// One key in [`KeyStatus`].
#[derive(Debug, Serialize)]
pub struct KeyRow {
    /// The key id.
    pub id: KeyId,
    /// Whether it seals new records.
    pub active: bool,
    /// Whether the keyring in use holds it.
    pub loaded: bool,
    /// Passwords sealed under it now.
    pub records: u64,
    /// Seals made under it since it was first loaded (limit: `seal_limit`).
    pub seals: u64,
}

/// The rewrap task in [`KeyStatus`].
#[derive(Debug, Serialize)]
pub struct RewrapStatus {
    /// `auto` or `manual`.
    pub mode: &'static str,
    /// Whether a pass is running.
    pub running: bool,
    /// Passwords sealed under another key than the active one.
    pub pending: u64,
    /// Passwords resealed since the daemon started.
    pub rewrapped: u64,
    /// Passwords a rewrap found failing their integrity check (left as they are).
    pub unreadable: u64,
}

/// The answer of `GET /admin/v1/keys`. Ids and counts only: never a secret.
#[derive(Debug, Serialize)]
pub struct KeyStatus {
    /// The active key id.
    pub active: KeyId,
    /// Where the keyring comes from.
    pub source: String,
    /// Whether it can be reloaded without a restart.
    pub reloadable: bool,
    /// The most seals one key may make.
    pub seal_limit: u64,
    /// Every key held or still named by a record.
    pub keys: Vec<KeyRow>,
    /// The rewrap task.
    pub rewrap: RewrapStatus,
}

/// The key status now.
pub async fn status(app: &App) -> Result<KeyStatus, StoreError> {
    let keyring = app.keyring();
    let usage = app.store.key_usage().await?;
    let mut rows: Vec<KeyRow> = keyring
        .key_ids()
        .map(|id| {
            let used = usage.iter().find(|u| u.key_id == id);
            KeyRow {
                id,
                active: id == keyring.active_key_id(),
                loaded: true,
                records: used.map_or(0, |u| u.records),
                seals: used.map_or(0, |u| u.seals),
            }
        })
        .collect();
    for u in usage.iter().filter(|u| !keyring.holds(u.key_id)) {
        rows.push(KeyRow {
            id: u.key_id,
            active: false,
            loaded: false,
            records: u.records,
            seals: u.seals,
        });
    }
    rows.sort_by_key(|r| r.id);
    let pending = rows.iter().filter(|r| !r.active).map(|r| r.records).sum();
    Ok(KeyStatus {
        active: keyring.active_key_id(),
        source: app.keys.settings.source.describe(),
        reloadable: app.keys.settings.source.reloadable(),
        seal_limit: MAX_SEALS_PER_KEY,
        keys: rows,
        rewrap: RewrapStatus {
            mode: match app.keys.settings.rewrap {
                RewrapMode::Auto => "auto",
                RewrapMode::Manual => "manual",
            },
            running: app.keys.running.load(Ordering::SeqCst),
            pending,
            rewrapped: app.keys.rewrapped.load(Ordering::SeqCst),
            unreadable: app.keys.unreadable.load(Ordering::SeqCst),
        },
    })
}

fn refused(message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, Reason::KeyringRefused, message)
}

fn answer_sync(outcome: &KeySync, _: &mut Facts) -> Result<StatusCode, ApiError> {
    if outcome.mismatched.is_empty() {
        return Ok(StatusCode::OK);
    }
    Err(refused(format!(
        "Key id(s) {:?} come with another secret than the one that sealed records under them; the keys in use stay.",
        outcome.mismatched
    )))
}

/// Checks `fresh` against the store and, if it passes, makes it the keyring in use (and wakes
/// the rewrap task). The event of `host` records the active key before and after and every key
/// held.
pub async fn install<A: Audited>(
    app: &App,
    host: &mut A,
    fresh: Arc<Keyring>,
) -> Result<(), ApiError> {
    let _one_at_a_time = app.keys.installing.lock().await;
    let before = app.keyring();
    let facts = host.facts();
    facts.key_id = Some(fresh.active_key_id());
    facts.previous_key_id = Some(before.active_key_id());
    facts.key_ids = fresh.key_ids().collect();

    let usage = app.store.key_usage().await.map_err(|e| store_failure(&e))?;
    let missing: Vec<String> = usage
        .iter()
        .filter(|u| u.records > 0 && !fresh.holds(u.key_id))
        .map(|u| format!("key {} ({} passwords)", u.key_id, u.records))
        .collect();
    if !missing.is_empty() {
        return Err(refused(format!(
            "The keyring lacks {} that passwords are still sealed under; keep a key until a rewrap has moved its passwords. The keys in use stay.",
            missing.join(", ")
        )));
    }
    let (gate, invoked) = host.gate(app, answer_sync);
    let result = app.store.sync_keys(fresh.check_values(), gate).await;
    host.settle_gate(&invoked, &result);
    let outcome = result.map_err(|e| store_failure(&e))?;
    answer_sync(&outcome, host.facts())?;
    app.keys.replace(fresh);
    app.keys.wake.notify_one();
    Ok(())
}

/// Checks the keyring loaded at startup against the store and records the `keys:load` event.
/// An error means the daemon must not serve (the message says why).
pub async fn load_at_startup(app: &App) -> Result<(), String> {
    let mut task = SystemTask::new("keys:load", Activity::Update);
    let current = app.keyring();
    match install(app, &mut task, current).await {
        Ok(()) => {
            task.finish(app, 200).await.map_err(|e| e.to_string())?;
            Ok(())
        }
        Err(e) => {
            let message = e.message.to_string();
            let _ = task.fail(app, &e).await;
            Err(format!(
                "keyring {}: {message}",
                app.keys.settings.source.describe()
            ))
        }
    }
}

/// Reads the keyring from its source again and installs it.
async fn reload_from_source<A: Audited>(app: &App, host: &mut A) -> Result<(), ApiError> {
    let source = &app.keys.settings.source;
    if !source.reloadable() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            Reason::Conflict,
            format!(
                "The keyring comes from {}, which is read once; restart to change keys.",
                source.describe()
            ),
        ));
    }
    let mut warnings = Vec::new();
    let fresh = app
        .keys
        .settings
        .load(&mut warnings)
        .map_err(|e| refused(format!("{e}. The keys in use stay.")))?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    install(app, host, Arc::new(fresh)).await
}

/// SIGHUP: reloads a keyring file, audited as `keys:reload`. A keyring read once (environment,
/// descriptor) is left alone.
pub async fn reload_on_signal(app: &App) {
    if !app.keys.settings.source.reloadable() {
        tracing::info!(source = %app.keys.settings.source.describe(), "keyring is read once; not reloaded");
        return;
    }
    let mut task = SystemTask::new("keys:reload", Activity::Update);
    let recorded = match reload_from_source(app, &mut task).await {
        Ok(()) => {
            let keyring = app.keyring();
            tracing::info!(
                active = keyring.active_key_id(),
                keys = ?keyring.key_ids().collect::<Vec<_>>(),
                "keyring reloaded"
            );
            task.finish(app, 200).await
        }
        Err(e) => {
            tracing::error!(reason = %e.message, "keyring reload refused; the keys in use stay");
            task.fail(app, &e).await
        }
    };
    if let Err(e) = recorded {
        tracing::error!(error = %e, "could not audit a keyring reload");
    }
}

/// Handles `/admin/v1/keys...` (see the module docs).
pub async fn handle(
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
        _ => return Err(ApiError::not_found(Reason::NotFound, "No such resource.")),
    };
    ex.facts.operation = action.as_str();
    ex.facts.activity = if allowed_method == Method::GET {
        Activity::Read
    } else {
        Activity::Update
    };
    if *method != allowed_method {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Reason::MethodNotAllowed,
            format!("Only {allow} is supported here."),
        )
        .with_allow(allow));
    }
    let token = authenticate_token(app, ex, headers).await?;
    let principal = Principal::Token {
        project: token.project.as_str(),
        roles: &token.roles,
    };
    let target = Target {
        instance_id: "",
        project: None,
    };
    let hidden = ApiError::not_found(Reason::NotFound, "No such resource.");
    ex.authorize(app, principal, action, target, &hidden)?;
    match action {
        Action::KeysReload => reload_from_source(app, ex).await?,
        Action::KeysRewrap => {
            app.keys.requested.store(true, Ordering::SeqCst);
            app.keys.wake.notify_one();
        }
        _ => {}
    }
    let report = status(app).await.map_err(|e| store_failure(&e))?;
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

fn answer_rewrap(outcome: &RewrapOutcome, facts: &mut Facts) -> Result<StatusCode, ApiError> {
    match *outcome {
        RewrapOutcome::Rewrapped { from, version } => {
            facts.previous_key_id = Some(from);
            facts.record_version = Some(version);
            Ok(StatusCode::OK)
        }
        RewrapOutcome::Skipped => Err(ApiError::new(
            StatusCode::CONFLICT,
            Reason::Conflict,
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
    let (gate, invoked) = task.gate(app, answer_rewrap);
    let result = app
        .store
        .rewrap(&candidate, keyring.active_key_id(), reseal, gate)
        .await;
    task.settle_gate(&invoked, &result);
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
            task.finish(app, 200).await
        }
        Err(e) => {
            tracing::warn!(instance = %candidate.id, error = %e, "rewrap of one password failed");
            task.fail(app, &store_failure(&e)).await
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
pub async fn rewrap_loop(app: Arc<App>) {
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
