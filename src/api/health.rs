//! Liveness and readiness for the load balancer, and metrics for Prometheus.
//!
//! `/healthz` answers 200 while the process serves. `/readyz` answers 200 only when the store
//! answers, the audit log is writable, the keys are loaded and shutdown has not begun; otherwise
//! 503 with the failing checks named.

use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::exchange::Exchange;
use super::respond::{self, ApiError, Body};
use crate::app::App;
use crate::audit::{Activity, Reason, Surface};
use crate::store::Store;

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    store: bool,
    audit: bool,
    /// The log's filesystem has at least `[audit] min_free_bytes` free.
    audit_space: bool,
    keys: bool,
    shutting_down: bool,
}

/// Whether the audit log's filesystem has at least `min` bytes free for an unprivileged writer
/// (`statvfs`'s `f_bavail`). A filesystem that cannot be asked counts as full.
pub(crate) fn audit_space_left(dir: &std::path::Path, min: u64) -> bool {
    if min == 0 {
        return true;
    }
    match rustix::fs::statvfs(dir) {
        Ok(v) => v.f_bavail.saturating_mul(v.f_frsize) >= min,
        Err(_) => false,
    }
}

/// Handles `/healthz`, `/readyz` and `/metrics`.
pub(crate) async fn handle<B: super::RequestBody>(
    app: &App,
    ex: &mut Exchange,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    ex.facts.surface = Surface::Ops;
    ex.facts.activity = Activity::Read;
    let path = req.uri().path();
    let ready = path == "/readyz";
    ex.facts.operation = match path {
        "/readyz" => "health:ready",
        "/metrics" => "metrics:scrape",
        _ => "health:live",
    };
    if req.method() != Method::GET {
        return Err(ApiError::wrong_method(Surface::Ops, "GET"));
    }
    if path == "/metrics" {
        app.auditor.queue_depth();
        let (source, instance, project) = app.limiters.key_counts();
        for (limit, keys) in [
            ("source", source),
            ("instance", instance),
            ("project", project),
        ] {
            app.metrics
                .rate_limit_keys
                .get_or_create(&crate::metrics::LimitLabels { limit })
                .set(i64::try_from(keys).unwrap_or(i64::MAX));
        }
        let mut response = respond::text(app.metrics.encode());
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        return Ok(response);
    }
    if !ready {
        return Ok(respond::json(
            StatusCode::OK,
            &serde_json::json!({"status": "alive"}),
        ));
    }
    let shutting_down = app.shutting_down.load(Ordering::SeqCst);
    let report = Readiness {
        status: "ready",
        store: app.store.ping().await.is_ok(),
        audit: app.auditor.writable().await,
        audit_space: audit_space_left(&app.audit_dir, app.audit_min_free_bytes),
        keys: app.keyring().key_ids().next().is_some(),
        shutting_down,
    };
    if report.store && report.audit && report.audit_space && report.keys && !shutting_down {
        Ok(respond::json(StatusCode::OK, &report))
    } else {
        ex.facts.reason = Reason::NotReady;
        ex.facts.detail = Some("not ready".into());
        Ok(respond::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Readiness {
                status: "unready",
                ..report
            },
        ))
    }
}
