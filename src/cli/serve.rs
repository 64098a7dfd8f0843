//! `metapass serve`: the daemon.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::load;
use crate::app::App;
use crate::background::{self, Background, notify_systemd};
use crate::config::{Config, Overrides};
use crate::limits;
use crate::server;
use crate::tls::TlsMaterial;

pub(crate) fn run(
    config_path: PathBuf,
    overrides: Overrides,
    accept_audit_gap: bool,
) -> Result<ExitCode, String> {
    // Before any secret is read: no core dumps, no same-user ptrace or /proc/<pid>/mem.
    let hardening =
        crate::hygiene::disable_core_dumps().map_err(|e| format!("disabling core dumps: {e}"))?;
    tracing::info!(
        dumpable = hardening.dumpable,
        core_limit = ?hardening.core_limit,
        "core dumps disabled (PR_SET_DUMPABLE, RLIMIT_CORE)"
    );
    let mut config = load(&config_path, &overrides)?;
    config.audit.accept_gap = accept_audit_gap;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("metapass-worker")
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(serve(config))
}

/// Binds every listener, opens the app, checks the keyring, starts the background tasks, then
/// serves until SIGTERM or SIGINT and drains.
async fn serve(config: Config) -> Result<ExitCode, String> {
    let mut material = TlsMaterial::load(config.tls.clone()).map_err(|e| e.to_string())?;
    let endpoints = bind(&config, &mut material)?;
    let data_dir = config.data_dir.clone();
    let sweep_every = limits::cleanup_interval(&config.rate_limits);
    let notifications = config.notifications.clone();
    let app = Arc::new(App::open(config).await?);
    tracing::info!(store = app.store.kind(), "store open");
    // The keyring must match what the store has seen before anything is sealed or opened.
    crate::keys::state::load_at_startup(&app).await?;
    background::spawn(
        &app,
        Background {
            tls: material,
            notifications,
            sweep_every,
        },
    );
    tracing::info!(data_dir = %data_dir.display(), "metapass serving");
    // One line per listener on stdout: scripts and tests wait for them to know the ports.
    for endpoint in &endpoints {
        let url = endpoint.url().map_err(|e| e.to_string())?;
        println!("metapass listening on {url} ({})", endpoint.config.name);
    }
    let _ = std::io::stdout().flush();
    // Under systemd (Type=notify), readiness is the same moment: every listener is bound and
    // the keyring matched the store.
    notify_systemd(&[sd_notify::NotifyState::Ready]);

    let shutdown_app = app.clone();
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested: draining");
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        shutdown_app.shutting_down.store(true, Ordering::SeqCst);
    };
    server::run(app.clone(), endpoints, shutdown).await;
    crate::api::flush_refusals(&app, true).await;
    app.auditor
        .flush()
        .await
        .map_err(|e| format!("flushing the audit log at shutdown: {e}"))?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Binds every configured listener with its TLS configuration.
fn bind(config: &Config, material: &mut TlsMaterial) -> Result<Vec<server::Endpoint>, String> {
    let mut endpoints = Vec::new();
    for listener in config.listeners.clone() {
        let tls = if listener.tls {
            Some(
                material
                    .listener(listener.client_auth)
                    .map_err(|e| format!("listener {:?}: {e}", listener.name))?,
            )
        } else {
            None
        };
        let (name, address) = (listener.name.clone(), listener.address);
        endpoints.push(
            server::Endpoint::bind(listener, tls)
                .map_err(|e| format!("listener {name:?}: binding {address}: {e}"))?,
        );
    }
    Ok(endpoints)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
