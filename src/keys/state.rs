//! The keyring in use while serving: swapped whole on reload, checked against the store before it
//! is used.
//!
//! A keyring is refused (and the one in use stays) if a key that records are still sealed under is
//! missing from it, or if a key id the store has seen comes with a different secret (its check
//! value differs). Every load, reload and refusal is an audit event.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use http::StatusCode;
use serde::Serialize;

use super::KeyError;
use crate::api::respond::ApiError;
use crate::app::App;
use crate::audit::gate::{Audited, SystemTask, gated};
use crate::audit::{Activity, Facts};
use crate::config::{KeySettings, RewrapMode};
use crate::crypto::{KeyId, Keyring, MAX_SEALS_PER_KEY};
use crate::store::{KeySync, Store, StoreError};

/// The keyring in use and the state of the rewrap task.
pub struct KeyState {
    current: RwLock<Arc<Keyring>>,
    /// Where keys come from, and how rewrap proceeds.
    pub settings: KeySettings,
    pub(super) wake: tokio::sync::Notify,
    pub(super) requested: AtomicBool,
    pub(super) running: AtomicBool,
    pub(super) rewrapped: AtomicU64,
    pub(super) unreadable: AtomicU64,
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

/// One key in [`KeyStatus`].
#[derive(Debug, Serialize)]
pub(crate) struct KeyRow {
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
pub(crate) struct RewrapStatus {
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
pub(crate) struct KeyStatus {
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
pub(crate) async fn status(app: &App) -> Result<KeyStatus, StoreError> {
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

fn refused(message: String) -> KeyError {
    KeyError::Refused(message)
}

fn answer_sync(outcome: &KeySync, _: &mut Facts) -> Result<StatusCode, ApiError> {
    if outcome.mismatched.is_empty() {
        return Ok(StatusCode::OK);
    }
    Err(refused(format!(
        "Key id(s) {:?} come with another secret than the one that sealed records under them; the keys in use stay.",
        outcome.mismatched
    ))
    .into())
}

/// Checks `fresh` against the store and, if it passes, makes it the keyring in use (and wakes
/// the rewrap task). The event of `host` records the active key before and after and every key
/// held.
pub(crate) async fn install<A: Audited>(
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

    let usage = app.store.key_usage().await?;
    let missing: Vec<String> = usage
        .iter()
        .filter(|u| u.records > 0 && !fresh.holds(u.key_id))
        .map(|u| format!("key {} ({} passwords)", u.key_id, u.records))
        .collect();
    if !missing.is_empty() {
        return Err(refused(format!(
            "The keyring lacks {} that passwords are still sealed under; keep a key until a rewrap has moved its passwords. The keys in use stay.",
            missing.join(", ")
        ))
        .into());
    }
    let checks = fresh.check_values();
    let outcome = gated(host, &app.auditor, answer_sync, |gate| {
        app.store.sync_keys(checks, gate)
    })
    .await?;
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
            task.finish(&app.auditor, 200)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        Err(e) => {
            let message = e.message.to_string();
            let _ = task.fail(&app.auditor, &e).await;
            Err(format!(
                "keyring {}: {message}",
                app.keys.settings.source.describe()
            ))
        }
    }
}

/// Reads the keyring from its source again and installs it.
pub(crate) async fn reload_from_source<A: Audited>(
    app: &App,
    host: &mut A,
) -> Result<(), ApiError> {
    let source = &app.keys.settings.source;
    if !source.reloadable() {
        return Err(KeyError::NotReloadable(source.describe()).into());
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
pub(crate) async fn reload_on_signal(app: &App) {
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
            task.finish(&app.auditor, 200).await
        }
        Err(e) => {
            tracing::error!(reason = %e.message, "keyring reload refused; the keys in use stay");
            task.fail(&app.auditor, &e).await
        }
    };
    if let Err(e) = recorded {
        tracing::error!(error = %e, "could not audit a keyring reload");
    }
}

/// Asks the rewrap task for a pass now (`POST /admin/v1/keys/rewrap`, in both modes).
pub(crate) fn request_rewrap(app: &App) {
    app.keys.requested.store(true, Ordering::SeqCst);
    app.keys.wake.notify_one();
}
