//! The daemon's background tasks, started in one place: the keyring's rewrap, Nova's
//! notifications, the rate limiter's sweep, SIGHUP reloads, and the timer that writes aggregated
//! refusals and lets the audit writer sign its checkpoints. Each runs until the process ends (the
//! rewrap stops on its own once shutdown begins).

use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::audit::Reason;
use crate::config::NotificationSettings;
use crate::tls::TlsMaterial;

/// What the background tasks need besides the app.
pub(crate) struct Background {
    /// The certificates and trust that SIGHUP reloads.
    pub tls: TlsMaterial,
    /// Nova's notification bus, when configured.
    pub notifications: Option<NotificationSettings>,
    /// How often idle rate-limit keys are swept.
    pub sweep_every: Duration,
}

/// Starts every background task.
pub(crate) fn spawn(app: &Arc<App>, background: Background) {
    tokio::spawn(crate::keys::rewrap::rewrap_loop(app.clone()));
    if let Some(settings) = background.notifications {
        tokio::spawn(crate::nova::notifications::run(app.clone(), settings));
    }
    tokio::spawn(sweep_limiters(app.clone(), background.sweep_every));
    tokio::spawn(reload_on_hangup(app.clone(), background.tls));
    tokio::spawn(aggregate_and_checkpoint(app.clone()));
}

/// Idle rate-limit keys are swept on a timer, so limiter memory follows live traffic.
async fn sweep_limiters(app: Arc<App>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        app.limiters.maintain();
    }
}

/// SIGHUP reloads the certificate, key, client CA and CRLs (if any file is broken nothing
/// changes), then the keyring file (refused if it does not match the store). All audited.
async fn reload_on_hangup(app: Arc<App>, material: TlsMaterial) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            notify_systemd(&[sd_notify::NotifyState::Reloading, now]);
        }
        let cert_file = material.cert_file().display().to_string();
        let (reason, detail) = match material.reload() {
            Ok(()) => {
                tracing::info!(cert = %cert_file, "certificate, client CA and CRLs reloaded");
                (
                    Reason::Ok,
                    format!("reloaded {cert_file} and the client CA and CRLs"),
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate reload failed; still serving the previous certificate and trust");
                (
                    Reason::CertificateReloadFailed,
                    format!("{e}; the previous certificate, client CA and CRLs stay in use"),
                )
            }
        };
        crate::audit::gate::record_system_event(&app.auditor, "tls:reload", reason, detail).await;
        crate::keys::state::reload_on_signal(&app).await;
        notify_systemd(&[sd_notify::NotifyState::Ready]);
    }
}

/// Refusals before authentication are written as one event per source and window; the same
/// timer lets the writer sign a checkpoint when one is due.
async fn aggregate_and_checkpoint(app: Arc<App>) {
    let mut tick = tokio::time::interval(crate::audit::aggregate::WINDOW / 2);
    loop {
        tick.tick().await;
        crate::api::flush_refusals(&app, false).await;
        app.auditor.tick();
    }
}

/// Tells systemd about a state change when it started us with `NOTIFY_SOCKET`; nothing otherwise.
pub(crate) fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
