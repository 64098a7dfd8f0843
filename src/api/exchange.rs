//! One request from arrival to answer: its [`Exchange`] (connection facts, audit facts, deadline),
//! how it runs to its end, and the finish step that records exactly one event before the answer
//! leaves.
//!
//! A read's event is written before the secret is sent; a mutation's event is made durable
//! *inside* the store transaction, before the commit (through [`crate::audit::gate::gated`]), so
//! that no change is ever committed without its audit record. If the client goes away mid-request,
//! the handler moves to a task of its own and still runs to its end, and its event is still
//! written; a panic becomes a 500 with an `internal` event.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, StatusCode};

use super::respond::{self, ApiError, Body};
use super::{RequestBody, compute, router};
use crate::app::App;
use crate::audit::event::{bounded, encode};
use crate::audit::gate::{Audited, GateEvent};
use crate::audit::{AuditError, Decision, Durability, Facts, Reason, Surface};
use crate::config::ListenerConfig;
use crate::identity::ClientCert;
use crate::limits::Limited;
use crate::metrics::{LimitLabels, ReasonLabels, RequestLabels, SurfaceLabels};
use crate::policy::{Action, Principal, Refusal, Target};

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer, or the source a trusted proxy's PROXY header named.
    pub peer: SocketAddr,
    /// The load balancer that sent a PROXY header, if one did.
    pub proxied_by: Option<SocketAddr>,
    /// The negotiated TLS version (`None` on a plain-HTTP listener).
    pub tls_version: Option<&'static str>,
    /// The verified client certificate, if one was presented.
    pub client_cert: Option<ClientCert>,
    /// The listener the connection arrived on.
    pub listener: Arc<ListenerConfig>,
}

impl ConnInfo {
    /// Facts for a request arriving now (on `clock`) on this connection.
    fn facts(&self, clock: &crate::clock::Clock) -> Facts {
        let mut facts = Facts::arrived(self.peer, self.tls_version, clock);
        facts.proxied_by = self.proxied_by;
        facts.listener = self.listener.name.clone();
        facts
    }
}

/// One request in flight: its connection, its audit facts and its deadline.
pub struct Exchange {
    /// The connection it arrived on.
    pub conn: Arc<ConnInfo>,
    /// The audit facts, filled in as the request proceeds.
    pub facts: Facts,
    /// When the whole request must be done.
    pub deadline: Instant,
    /// Close the HTTP/1 connection after answering (the request used `Transfer-Encoding`, whose
    /// framing an intermediary may have read differently).
    close_after: bool,
    gate_event: GateEvent,
    /// The compute microversion the request is served at, once known (echoed in the answer).
    pub microversion: Option<crate::microversion::Microversion>,
    /// The request brought credentials to a route that verifies them, so it paid nothing to its
    /// source before authentication (see `router::carries_credentials`).
    pub credentialed: bool,
    /// Refused by a rate limit before authentication: counted in an aggregate event
    /// ([`crate::audit::aggregate`]) instead of one of its own.
    pub(super) aggregated: bool,
}

impl Exchange {
    /// Records a policy decision and turns a refusal into its answer: 403 when the caller may know
    /// the target exists, 404 (exactly as for a missing instance) otherwise.
    pub fn authorize(
        &mut self,
        app: &App,
        principal: Principal<'_>,
        action: Action,
        target: Target<'_>,
        not_found: &ApiError,
    ) -> Result<(), ApiError> {
        let verdict = app.policy.decide(principal, action, target);
        self.facts.decision = Some(Decision {
            allowed: verdict.allowed(),
            action: action.as_str(),
            rule: verdict.rule,
        });
        match verdict.refusal {
            None => Ok(()),
            Some(Refusal::Forbidden) => Err(ApiError::forbidden_by_policy(action.as_str())),
            Some(Refusal::NotVisible) => {
                // The same answer either way; the audit reason tells a reviewer which it was.
                let mut e = not_found.clone();
                if target.project.is_some() {
                    e.reason = Reason::NotOwner;
                }
                Err(e)
            }
        }
    }

    /// The answer to a request over a rate limit (counted in the metrics).
    pub fn rate_limited(&self, app: &App, limited: Limited) -> ApiError {
        app.metrics
            .rate_limit_hits
            .get_or_create(&LimitLabels {
                limit: limited.limit,
            })
            .inc();
        ApiError::rate_limited(self.facts.surface, &limited)
    }
}

impl Audited for Exchange {
    fn facts(&mut self) -> &mut Facts {
        &mut self.facts
    }
    fn gate_event(&mut self) -> &mut GateEvent {
        &mut self.gate_event
    }
}

fn http_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// Serves one request to its end, also if the client leaves: hyper drops a request's future
/// when its connection closes or its HTTP/2 stream is reset, and a request dropped half-way would
/// leave no event. The handler runs in the task that polls it (the connection's, or hyper's task
/// for an HTTP/2 stream) while the client waits; if it is dropped before it finished, the rest of
/// it is spawned onto the runtime ([`RunsToEnd`]) and completes there, its answer discarded.
///
/// The handler's future is boxed: it is large (every route's state inline) and hyper moves the
/// service's future into its own state (for HTTP/2, into a task), so a pointer moves instead of
/// kilobytes; the box is also what lets an unfinished handler move to a task of its own without
/// moving the future itself. Spawning every request instead costs a task, its join and a
/// wake-up each time, for the rare request whose client leaves.
pub async fn serve<B: RequestBody>(
    app: Arc<App>,
    conn: Arc<ConnInfo>,
    req: Request<B>,
) -> Response<Body> {
    RunsToEnd(Some(Box::pin(handle(app, conn, req)))).await
}

/// A request's handler that, if dropped unfinished, finishes on the runtime.
///
/// `handle` catches the handler's panics itself, so the future always ends in an answer.
struct RunsToEnd<F: Future<Output = Response<Body>> + Send + 'static>(Option<Pin<Box<F>>>);

impl<F: Future<Output = Response<Body>> + Send + 'static> Future for RunsToEnd<F> {
    type Output = Response<Body>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        // Polled again after its answer: a caller bug (hyper never does), not a request to
        // answer, so not one to invent an unaudited answer for.
        let handler = self.0.as_mut().expect("RunsToEnd polled after its answer");
        let answer = ready!(handler.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(answer)
    }
}

impl<F: Future<Output = Response<Body>> + Send + 'static> Drop for RunsToEnd<F> {
    fn drop(&mut self) {
        let Some(handler) = self.0.take() else {
            return;
        };
        // Outside a runtime (it is shutting down), there is nothing left to run it on: the
        // shutdown's own drain is what waits for requests in flight.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(handler));
        }
    }
}

/// Begins the exchange, routes it under the request's store deadline, turns an error or a panic
/// into its answer, and finishes.
async fn handle<B: RequestBody>(
    app: Arc<App>,
    conn: Arc<ConnInfo>,
    req: Request<B>,
) -> Response<Body> {
    let mut ex = begin(&app, conn, &req);
    // No store operation starts after the request's deadline (crate::store::DEADLINE).
    let store_deadline = tokio::time::Instant::from_std(ex.deadline);
    let routed = AssertUnwindSafe(
        crate::store::DEADLINE.scope(store_deadline, router::route(&app, &mut ex, req)),
    )
    .catch_unwind()
    .await;
    let response = match routed {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => respond::error(&mut ex.facts, &e),
        Err(_) => {
            tracing::error!(request_id = %ex.facts.request_id, "handler panicked");
            ex.gate_event = ex.gate_event.after_panic();
            respond::error(&mut ex.facts, &ApiError::internal())
        }
    };
    finish(&app, ex, response).await
}

/// The exchange of a request that just arrived: the facts its event begins with.
fn begin<B>(app: &App, conn: Arc<ConnInfo>, req: &Request<B>) -> Exchange {
    let mut facts = conn.facts(&app.clock);
    if let Some(cert) = &conn.client_cert {
        facts.client_certificate = Some(
            app.auditor
                .keys()
                .fingerprint(hex::encode(cert.sha256).as_bytes()),
        );
    }
    facts.http_version = http_version(req.version());
    facts.method = bounded(req.method().as_str());
    facts.path = bounded(req.uri().path());
    facts.user_agent = req
        .headers()
        .get(http::header::USER_AGENT)
        .map(|v| bounded(&String::from_utf8_lossy(v.as_bytes())));
    let deadline = facts.started + app.limits.request_timeout();
    let close_after = req.version() < http::Version::HTTP_2
        && req.headers().contains_key(http::header::TRANSFER_ENCODING);
    Exchange {
        conn,
        facts,
        deadline,
        close_after,
        gate_event: GateEvent::None,
        microversion: None,
        credentialed: false,
        aggregated: false,
    }
}

/// Records the request's event (unless its gate already did) and releases the answer only once
/// it is recorded. If the log cannot record it, the answer becomes a 503 that releases nothing.
async fn finish(app: &App, mut ex: Exchange, mut response: Response<Body>) -> Response<Body> {
    let record = ex.gate_event.to_write();
    if ex.aggregated && record == Some(false) {
        app.refusals.add(&ex.facts, response.status().as_u16());
    } else if let Some(correction) = record {
        ex.facts.corrects_earlier_event = correction;
        let status = response.status().as_u16();
        let line = encode(&ex.facts, status, ex.facts.started.elapsed());
        if let Err(e) = app.auditor.record(line, Durability::Written).await {
            response = audit_refusal(app, &mut ex, &e);
        }
    }
    if let Some(id) = respond::request_id_header(ex.facts.request_id.as_str()) {
        response.headers_mut().insert("x-request-id", id);
    }
    if ex.facts.surface == Surface::Compute {
        compute::with_compute_headers(&mut response, ex.microversion, ex.facts.request_id.as_str());
    }
    if ex.close_after {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    count(app, &ex.facts, response.status());
    response
}

/// Counts an answered request in the metrics.
fn count(app: &App, facts: &Facts, status: StatusCode) {
    let surface = surface_name(facts.surface);
    let m = &app.metrics;
    m.requests
        .get_or_create(&RequestLabels {
            surface,
            operation: facts.operation,
            status: status.as_u16(),
        })
        .inc();
    m.request_seconds
        .get_or_create(&SurfaceLabels { surface })
        .observe(facts.started.elapsed().as_secs_f64());
    if facts.reason != Reason::Ok {
        m.refusals
            .get_or_create(&ReasonLabels {
                reason: crate::audit::event::reason_str(facts.reason),
            })
            .inc();
    }
}

fn surface_name(surface: Surface) -> &'static str {
    match surface {
        Surface::Instance => "instance",
        Surface::Compute => "compute",
        Surface::Admin => "admin",
        Surface::Ops => "ops",
        Surface::Unknown => "unknown",
    }
}

/// The answer when the event could not be recorded. A correction event is queued (without
/// waiting) so that, if the first event does land later, the log also says what was answered.
fn audit_refusal(app: &App, ex: &mut Exchange, error: &AuditError) -> Response<Body> {
    tracing::error!(request_id = %ex.facts.request_id, error = %error, "audit event not recorded; failing closed");
    let response = respond::error(&mut ex.facts, &ApiError::audit_unavailable());
    ex.facts.corrects_earlier_event = true;
    let line = encode(
        &ex.facts,
        response.status().as_u16(),
        ex.facts.started.elapsed(),
    );
    drop(app.auditor.submit(line, Durability::Written));
    response
}

/// Writes the aggregate events of pre-authentication refusals whose window has ended (or all of
/// them, at shutdown).
pub async fn flush_refusals(app: &App, all: bool) {
    for (facts, status) in app.refusals.take_due(all) {
        let line = encode(&facts, status, facts.started.elapsed());
        if let Err(e) = app.auditor.record(line, Durability::Written).await {
            tracing::error!(error = %e, "could not audit aggregated refusals");
        }
    }
}

/// Records a request that hyper refused before it became a request (unparseable HTTP, an oversize
/// head): hyper has already answered `status`; this is its audit event.
pub async fn audit_unparsed_request(
    app: &App,
    conn: &ConnInfo,
    status: StatusCode,
    reason: Reason,
) {
    let mut facts = conn.facts(&app.clock);
    facts.operation = "http:unparsed";
    facts.reason = reason;
    facts.detail = Some(format!("hyper answered {status} before routing"));
    let line = encode(&facts, status.as_u16(), facts.started.elapsed());
    if let Err(e) = app.auditor.record(line, Durability::Written).await {
        tracing::error!(error = %e, "could not audit an unparsed request");
    }
}
