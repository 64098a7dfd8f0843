//! Routes and handlers.
//!
//! Every request becomes an [`Exchange`]: the audit facts begin when it arrives, handlers add to
//! them, and `finish` records exactly one event before the answer leaves. A read's event is
//! written before the secret is sent; a mutation's event is made durable *inside* the store
//! transaction, before the commit (through the store's gate, see [`Exchange::gate`]), so that no
//! change is ever committed without its audit record.
//!
//! Each request runs in its own task: if the client goes away mid-request, the handler still runs
//! to its end and its event is still written; a panic becomes a 500 with an `internal` event.

pub mod admin;
pub mod body;
pub mod compute;
pub mod health;
pub mod keys;
pub mod metadata;
pub mod respond;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};

use crate::audit::event::{bounded, encode};
use crate::audit::{
    AuditError, AuditKeys, Auditor, AuthMethod, CallerKind, Decision, Durability, Facts, Reason,
    WriterConfig,
};
use crate::config::{Config, InstanceAuth, Limits, ListenerConfig};
use crate::identity::keystone::{Keystone, KeystoneError};
use crate::identity::{
    AUTH_TOKEN_HEADER, ClientCert, ProxySigner, TokenCaller, TokenEntry, TokenTable,
};
use crate::limits::{Limited, Limiters};
use crate::metrics::{LimitLabels, Metrics, ReasonLabels, RequestLabels, SurfaceLabels};
use crate::policy::{Action, Policy, Principal, Refusal, Target};
use crate::store::Backend;
use crate::store::{AuditAnchor, Gate, GateDenied, Store, StoreError};
use respond::{ApiError, Body};

/// A request body the handlers can read: hyper's `Incoming` on the wire, `Full<Bytes>` in fuzz
/// targets and benchmarks.
pub trait RequestBody:
    hyper::body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
    + Send
    + Unpin
    + 'static
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
        + Send
        + Unpin
        + 'static
{
}

/// Everything a request may need, shared by all connections.
pub struct App {
    /// The store.
    pub store: Backend,
    /// The data keys in use (swapped on reload) and the rewrap state.
    pub keys: keys::KeyState,
    /// The audit log.
    pub auditor: Auditor,
    /// Verifies the metadata proxy's signatures.
    pub signer: ProxySigner,
    /// Accepted tokens.
    pub tokens: TokenTable,
    /// Validates Keystone tokens, when `[keystone]` is configured.
    pub keystone: Option<Keystone>,
    /// How the compute API is reached (microversions, path prefix).
    pub compute_api: crate::config::ComputeApi,
    /// The access policy.
    pub policy: Policy,
    /// Request bounds.
    pub limits: Limits,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Rate limits.
    pub limiters: Limiters,
    /// How instances are identified (proxy-header mode, proxy certificate names).
    pub instance_auth: InstanceAuth,
    /// The audit log's directory (its filesystem's free space decides readiness).
    pub audit_dir: std::path::PathBuf,
    /// `[audit] min_free_bytes`.
    pub audit_min_free_bytes: u64,
    /// Pre-authentication rate-limit refusals, counted into one event per source and window.
    pub refusals: crate::audit::aggregate::Refusals,
    /// Registers unknown instances from Nova's database, when `[nova_lookup]` is configured.
    pub nova_lookup: Option<crate::nova::lookup::NovaLookup>,
    /// Set when shutdown begins: readiness turns false.
    pub shutting_down: AtomicBool,
}

impl App {
    /// Opens everything the configuration names: the store, the audit log (continuing its
    /// chain), the metrics, the limiters.
    pub async fn open(config: Config) -> Result<Self, String> {
        let metrics = Arc::new(Metrics::new());
        let store = Backend::open(&config.store, metrics.store_seconds.clone())
            .await
            .map_err(|e| e.to_string())?;
        let keys =
            AuditKeys::derive(config.audit.secret.expose_secret()).map_err(|e| e.to_string())?;
        let auditor = Auditor::start(
            WriterConfig {
                dir: config.audit.dir.clone(),
                sync: config.audit.sync,
                max_file_bytes: config.audit.max_file_bytes,
                queue_capacity: config.audit.queue_capacity,
                ack_timeout: config.audit.ack_timeout,
                writer_id: config.audit.writer_id.clone(),
            },
            Arc::new(keys),
            metrics.audit.clone(),
        )
        .map_err(|e| format!("audit log {}: {e}", config.audit.dir.display()))?;
        check_audit_anchor(&store, &auditor, &config.audit.dir, config.audit.accept_gap).await?;
        Ok(Self {
            store,
            keys: keys::KeyState::new(config.keyring, config.keys),
            auditor,
            signer: ProxySigner::new(&config.proxy_secret),
            tokens: config.tokens,
            keystone: config
                .keystone
                .map(Keystone::new)
                .transpose()
                .map_err(|e| format!("[keystone]: {e}"))?,
            compute_api: config.compute_api,
            policy: config.policy,
            limits: config.limits,
            metrics,
            limiters: Limiters::new(&config.rate_limits),
            refusals: crate::audit::aggregate::Refusals::new(config.rate_limits.max_keys),
            audit_dir: config.audit.dir.clone(),
            audit_min_free_bytes: config.audit.min_free_bytes,
            instance_auth: config.instance_auth,
            nova_lookup: config
                .nova_lookup
                .as_ref()
                .map(crate::nova::lookup::NovaLookup::new)
                .transpose()?,
            shutting_down: AtomicBool::new(false),
        })
    }
}

/// Refuses to start on a log that lacks the line the store anchored with the last change (see
/// [`crate::audit::anchor`]), unless the operator accepts the gap: then the loss is recorded as a
/// durable `audit:gap_accepted` event first, and the stale anchor is forgotten.
async fn check_audit_anchor(
    store: &Backend,
    auditor: &Auditor,
    dir: &std::path::Path,
    accept_gap: bool,
) -> Result<(), String> {
    let anchor = store
        .audit_anchor(auditor.writer_id())
        .await
        .map_err(|e| format!("reading the audit anchor: {e}"))?;
    let Some(anchor) = anchor else {
        return Ok(());
    };
    let ends_at = auditor.recovered().map_or(0, |w| w.seq);
    let Err(gap) =
        crate::audit::anchor::check(auditor.keys(), dir, ends_at, (anchor.seq, &anchor.mac))
            .map_err(|e| format!("audit log {}: {e}", dir.display()))?
    else {
        return Ok(());
    };
    if !accept_gap {
        return Err(format!(
            "audit log {} (writer {:?}): {gap}. Nothing was started. `metapass audit verify --config` shows what remains; to start anyway and record the loss in the log, run serve with --accept-audit-gap",
            dir.display(),
            auditor.writer_id()
        ));
    }
    tracing::error!(%gap, "starting with an audit gap the operator accepted (--accept-audit-gap)");
    let mut facts = Facts::system("audit:gap_accepted", crate::audit::Activity::Update);
    facts.reason = crate::audit::Reason::AuditFileLost;
    facts.detail = Some(crate::audit::event::bounded(&format!(
        "started with --accept-audit-gap: {gap}"
    )));
    auditor
        .record(
            encode(&facts, 500, std::time::Duration::ZERO),
            Durability::Durable,
        )
        .await
        .map_err(|e| format!("recording the accepted audit gap: {e}"))?;
    store
        .forget_audit_anchor(auditor.writer_id())
        .await
        .map_err(|e| format!("forgetting the stale audit anchor: {e}"))
}

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
    /// Facts for a request on this connection.
    fn facts(&self) -> Facts {
        let mut facts = Facts::new(self.peer, self.tls_version);
        facts.proxied_by = self.proxied_by;
        facts.listener = self.listener.name.clone();
        facts
    }
}

/// What became of the event a mutation's gate submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateEvent {
    /// No gate ran: [`finish`] records the event.
    None,
    /// The gate's event is the request's event.
    Recorded,
    /// The gate submitted an event but the store did not commit: [`finish`] records a correction.
    NeedsCorrection,
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
    /// source before authentication (see `carries_credentials`).
    pub credentialed: bool,
    /// Refused by a rate limit before authentication: counted in an aggregate event
    /// ([`crate::audit::aggregate`]) instead of one of its own.
    aggregated: bool,
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
            Some(Refusal::Forbidden) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                Reason::Forbidden,
                format!("Policy does not allow {} to be performed.", action.as_str()),
            )),
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

    /// A store gate that records this request's event, durably, before the store commits.
    ///
    /// `answer` maps the outcome to the answer (a status, or the refusal) and may add facts (the
    /// record version); the handler calls the same function on the returned outcome, so the event
    /// and the answer cannot disagree.
    pub fn gate<O: 'static>(
        &mut self,
        app: &App,
        answer: fn(&O, &mut Facts) -> Result<StatusCode, ApiError>,
    ) -> (Gate<O>, Arc<AtomicBool>) {
        gate_recording(self.facts.clone(), app, answer)
    }

    /// After a gated store call: notes whether the gate's event stands as the request's event.
    pub fn settle_gate<O>(&mut self, invoked: &AtomicBool, result: &Result<O, StoreError>) {
        settle(&mut self.gate_event, invoked, result);
    }
}

/// A gate that records `facts` (completed by `answer` from the outcome) durably before the store
/// commits; the flag says whether the store called it.
fn gate_recording<O: 'static>(
    mut facts: Facts,
    app: &App,
    answer: fn(&O, &mut Facts) -> Result<StatusCode, ApiError>,
) -> (Gate<O>, Arc<AtomicBool>) {
    let invoked = Arc::new(AtomicBool::new(false));
    let flag = invoked.clone();
    let auditor = app.auditor.clone();
    let gate: Gate<O> = Box::new(move |outcome: &O| {
        flag.store(true, Ordering::SeqCst);
        let status = match answer(outcome, &mut facts) {
            Ok(status) => status,
            Err(refusal) => {
                facts.reason = refusal.reason;
                facts.detail = Some(refusal.message.to_string());
                refusal.status
            }
        };
        let line = encode(&facts, status.as_u16(), facts.started.elapsed());
        let ticket = auditor.submit(line, Durability::Durable);
        let writer = auditor.shared_writer_id();
        Box::pin(async move {
            match ticket.written().await {
                Ok(written) => Ok(written.map(|w| AuditAnchor {
                    writer,
                    seq: w.seq,
                    mac: w.mac,
                })),
                Err(e) => Err(GateDenied(e.to_string())),
            }
        })
    });
    (gate, invoked)
}

/// After a panic the answer is a 500; if a gate had already recorded the request's event (with
/// the status the handler meant to send), that event is corrected rather than left standing.
fn after_panic(state: GateEvent) -> GateEvent {
    match state {
        GateEvent::Recorded => GateEvent::NeedsCorrection,
        other => other,
    }
}

fn settle<O>(state: &mut GateEvent, invoked: &AtomicBool, result: &Result<O, StoreError>) {
    if !invoked.load(Ordering::SeqCst) {
        return;
    }
    *state = match result {
        Ok(_) => GateEvent::Recorded,
        Err(_) => GateEvent::NeedsCorrection,
    };
}

/// Something audited that may change the store through a gate: a request ([`Exchange`]) or an
/// operation metapass performs by itself ([`SystemTask`]).
pub trait Audited {
    /// The event's facts.
    fn facts(&mut self) -> &mut Facts;
    /// A gate recording this event before the store commits (see [`Exchange::gate`]).
    fn gate<O: 'static>(
        &mut self,
        app: &App,
        answer: fn(&O, &mut Facts) -> Result<StatusCode, ApiError>,
    ) -> (Gate<O>, Arc<AtomicBool>);
    /// After a gated store call (see [`Exchange::settle_gate`]).
    fn settle_gate<O>(&mut self, invoked: &AtomicBool, result: &Result<O, StoreError>);
}

impl Audited for Exchange {
    fn facts(&mut self) -> &mut Facts {
        &mut self.facts
    }
    fn gate<O: 'static>(
        &mut self,
        app: &App,
        answer: fn(&O, &mut Facts) -> Result<StatusCode, ApiError>,
    ) -> (Gate<O>, Arc<AtomicBool>) {
        Exchange::gate(self, app, answer)
    }
    fn settle_gate<O>(&mut self, invoked: &AtomicBool, result: &Result<O, StoreError>) {
        Exchange::settle_gate(self, invoked, result);
    }
}

/// An operation metapass performs by itself (a keyring load, a rewrap): audited exactly like a
/// request, with caller `System`.
pub struct SystemTask {
    /// The event's facts.
    pub facts: Facts,
    gate_event: GateEvent,
}

impl SystemTask {
    /// A task named `operation` (its `api.operation`).
    pub fn new(operation: &'static str, activity: crate::audit::Activity) -> Self {
        Self {
            facts: Facts::system(operation, activity),
            gate_event: GateEvent::None,
        }
    }

    /// Records the task's event with `status`, unless its gate already did; after a gate whose
    /// store call failed, records the correction. Durable either way.
    pub async fn finish(mut self, app: &App, status: u16) -> Result<(), AuditError> {
        let correction = match self.gate_event {
            GateEvent::Recorded => return Ok(()),
            GateEvent::None => false,
            GateEvent::NeedsCorrection => true,
        };
        self.facts.corrects_earlier_event = correction;
        let line = encode(&self.facts, status, self.facts.started.elapsed());
        app.auditor.record(line, Durability::Durable).await
    }

    /// Ends the task as refused by `error` (reason, detail and status from it).
    pub async fn fail(mut self, app: &App, error: &ApiError) -> Result<(), AuditError> {
        self.facts.reason = error.reason;
        self.facts.detail = Some(error.message.to_string());
        self.finish(app, error.status.as_u16()).await
    }
}

impl Audited for SystemTask {
    fn facts(&mut self) -> &mut Facts {
        &mut self.facts
    }
    fn gate<O: 'static>(
        &mut self,
        app: &App,
        answer: fn(&O, &mut Facts) -> Result<StatusCode, ApiError>,
    ) -> (Gate<O>, Arc<AtomicBool>) {
        gate_recording(self.facts.clone(), app, answer)
    }
    fn settle_gate<O>(&mut self, invoked: &AtomicBool, result: &Result<O, StoreError>) {
        settle(&mut self.gate_event, invoked, result);
    }
}

/// Maps a failed store call to its answer.
pub fn store_failure(error: &StoreError) -> ApiError {
    match error {
        StoreError::GateRefused { .. } => ApiError::audit_unavailable(),
        StoreError::Corrupt(_) => ApiError::integrity(),
        StoreError::KeyExhausted(_) => ApiError::key_exhausted(),
        StoreError::DeadlinePassed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::StoreUnavailable,
            "The request ran out of time before the store could take it; nothing was changed.",
        )
        .with_retry_after(1),
        _ => ApiError::store_unavailable(),
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

/// Serves one request: a task of its own, so it completes (and is audited) even if the client
/// leaves.
pub async fn serve<B: RequestBody>(
    app: Arc<App>,
    conn: Arc<ConnInfo>,
    req: Request<B>,
) -> Response<Body> {
    let task = tokio::spawn(handle(app, conn, req));
    match task.await {
        Ok(response) => response,
        // `handle` catches panics itself; a join error means the runtime is shutting down.
        Err(_) => respond::empty(StatusCode::SERVICE_UNAVAILABLE),
    }
}

async fn handle<B: RequestBody>(
    app: Arc<App>,
    conn: Arc<ConnInfo>,
    req: Request<B>,
) -> Response<Body> {
    let mut facts = conn.facts();
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
    let mut ex = Exchange {
        conn,
        facts,
        deadline,
        close_after,
        gate_event: GateEvent::None,
        microversion: None,
        credentialed: false,
        aggregated: false,
    };
    // No store operation starts after the request's deadline (crate::store::DEADLINE).
    let store_deadline = tokio::time::Instant::from_std(ex.deadline);
    let routed =
        AssertUnwindSafe(crate::store::DEADLINE.scope(store_deadline, route(&app, &mut ex, req)))
            .catch_unwind()
            .await;
    let response = match routed {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => respond::error(&mut ex.facts, &e),
        Err(_) => {
            tracing::error!(request_id = %ex.facts.request_id, "handler panicked");
            ex.gate_event = after_panic(ex.gate_event);
            respond::error(&mut ex.facts, &ApiError::internal())
        }
    };
    finish(&app, ex, response).await
}

/// The answer to a request over a rate limit: 503 on the instance API (the Neutron proxy turns a
/// 429 into a 500 for the guest), 429 elsewhere; `Retry-After` in whole seconds, rounded up.
pub fn rate_limited(app: &App, ex: &Exchange, limited: Limited) -> ApiError {
    app.metrics
        .rate_limit_hits
        .get_or_create(&LimitLabels {
            limit: limited.limit,
        })
        .inc();
    let status = if ex.facts.surface == crate::audit::Surface::Instance {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    ApiError::new(
        status,
        Reason::RateLimited,
        format!(
            "Rate limit exceeded ({}); retry after {} s.",
            limited.limit, limited.retry_after_secs
        ),
    )
    .with_retry_after(limited.retry_after_secs)
}

/// Refuses a `Transfer-Encoding` other than exactly `chunked` (`chunked, chunked` and the like are
/// request-smuggling shapes that hyper would accept, since it checks only the last coding). hyper
/// already refuses a last coding other than `chunked`, and resolves `Content-Length` together with
/// `Transfer-Encoding` itself (the latter wins and the length is dropped); for that case RFC 9112
/// asks the server to close the connection, which `finish` does for every request that used
/// `Transfer-Encoding`.
pub fn ambiguous_framing(headers: &HeaderMap) -> Option<&'static str> {
    let mut encodings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|e| e.trim_ascii().to_ascii_lowercase());
    match (encodings.next(), encodings.next()) {
        (None, _) => None,
        (Some(first), None) if first == b"chunked" => None,
        _ => Some("Transfer-Encoding must be exactly \"chunked\"."),
    }
}

/// The surface a path belongs to, before routing (for the answer to a pre-authentication refusal).
fn surface_of(app: &App, path: &str) -> crate::audit::Surface {
    use crate::audit::Surface;
    if metadata::is_openstack_path(path) {
        Surface::Instance
    } else if path.starts_with("/admin/") {
        Surface::Admin
    } else if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        Surface::Ops
    } else if compute::owns(&app.compute_api, path) {
        Surface::Compute
    } else {
        Surface::Unknown
    }
}

/// Marks an HTTP/2 request beyond `h2_max_concurrent_streams` on its connection: refused with
/// 503 and audited, like any refusal (the HTTP/2 layer itself only refuses streams beyond twice
/// the limit, which compliant clients never open).
#[derive(Debug, Clone, Copy)]
pub struct StreamsExceeded;

async fn route<B: RequestBody>(
    app: &App,
    ex: &mut Exchange,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path();
    ex.facts.surface = surface_of(app, path);
    if req.extensions().get::<StreamsExceeded>().is_some() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited,
            format!(
                "Too many concurrent streams on this connection (at most {}); retry shortly.",
                app.limits.h2_max_concurrent_streams
            ),
        )
        .with_retry_after(1));
    }
    // Who the client is (behind trusted proxies) comes first: it is what the source limit counts.
    let source = crate::forwarded::resolve(&ex.conn.listener, ex.facts.peer.ip(), req.headers());
    let source = match source {
        Ok(source) => source,
        Err(malformed) => {
            ex.facts.forwarded_for_raw = req
                .headers()
                .get("forwarded")
                .or_else(|| req.headers().get("x-forwarded-for"))
                .map(|v| bounded(&String::from_utf8_lossy(v.as_bytes())));
            return Err(ApiError::bad_request(Reason::InvalidHeader, malformed.0));
        }
    };
    ex.facts.client = source.client;
    ex.facts.forwarded_for = source.chain;
    ex.facts.forwarded = source.verdict;
    if source.ignored.is_some() {
        ex.facts.forwarded_for_raw = source.ignored;
    }
    ex.credentialed = carries_credentials(app, ex, path, req.headers());
    if let Err(limited) = app.limiters.before_auth(ex.facts.client, ex.credentialed) {
        // Its client, not metapass, decides how fast these come: counted, not written one by one.
        ex.aggregated = true;
        return Err(rate_limited(app, ex, limited));
    }
    if !ex.conn.listener.serves(ex.facts.surface) {
        return Err(ApiError::not_found(Reason::NotFound, "No such resource."));
    }
    if let Some(problem) = ambiguous_framing(req.headers()) {
        return Err(ApiError::bad_request(Reason::MalformedRequest, problem).closing());
    }
    if ex.facts.surface == crate::audit::Surface::Instance {
        metadata::handle(app, ex, req).await
    } else if path.starts_with("/admin/") {
        admin::handle(app, ex, req).await
    } else if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        health::handle(app, ex, req).await
    } else if compute::owns(&app.compute_api, path) {
        compute::handle(app, ex, req).await
    } else {
        Err(ApiError::not_found(Reason::NotFound, "No such resource."))
    }
}

/// Whether the request brings credentials to a route that verifies them: the proxy's signature
/// or an instance certificate on the password route, a token on the compute or admin API. Such a
/// request costs its source nothing before authentication (a verified one never does; a failed
/// one costs `failed_auth_cost`, see [`crate::limits`]), so the metadata proxy's one address is
/// not a budget every guest behind it shares.
fn carries_credentials(app: &App, ex: &Exchange, path: &str, headers: &HeaderMap) -> bool {
    use crate::audit::Surface;
    match ex.facts.surface {
        Surface::Instance => {
            metadata::route_as_nova(path) == metadata::InstanceRoute::Password
                && (headers.contains_key(crate::identity::SIGNATURE_HEADER)
                    || ex
                        .conn
                        .client_cert
                        .as_ref()
                        .is_some_and(|c| c.instance_id.is_some()))
        }
        Surface::Compute => {
            headers.contains_key(AUTH_TOKEN_HEADER)
                && matches!(
                    compute::route(&app.compute_api, path),
                    compute::ComputeRoute::Server(..) | compute::ComputeRoute::Password(..)
                )
        }
        Surface::Admin => headers.contains_key(AUTH_TOKEN_HEADER),
        Surface::Ops | Surface::Unknown => false,
    }
}

/// Records the request's event (unless its gate already did) and releases the answer only once
/// it is recorded. If the log cannot record it, the answer becomes a 503 that releases nothing.
async fn finish(app: &App, mut ex: Exchange, mut response: Response<Body>) -> Response<Body> {
    let record = match ex.gate_event {
        GateEvent::Recorded => None,
        GateEvent::None => Some(false),
        GateEvent::NeedsCorrection => Some(true),
    };
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
    if let Ok(id) = HeaderValue::from_str(ex.facts.request_id.as_str()) {
        response.headers_mut().insert("x-request-id", id);
    }
    if ex.facts.surface == crate::audit::Surface::Compute {
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

fn surface_name(surface: crate::audit::Surface) -> &'static str {
    use crate::audit::Surface::*;
    match surface {
        Instance => "instance",
        Compute => "compute",
        Admin => "admin",
        Ops => "ops",
        Unknown => "unknown",
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

/// Records an event metapass caused itself (`operation`, e.g. `tls:reload`), with `reason` and a
/// `detail` that must not contain secrets.
pub async fn record_system_event(
    app: &App,
    operation: &'static str,
    reason: Reason,
    detail: String,
) {
    let mut facts = Facts::system(operation, crate::audit::Activity::Update);
    facts.reason = reason;
    facts.detail = Some(detail);
    let status = if reason == Reason::Ok { 200 } else { 500 };
    let line = encode(&facts, status, facts.started.elapsed());
    if let Err(e) = app.auditor.record(line, Durability::Durable).await {
        tracing::error!(error = %e, operation, "could not audit a system event");
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
    let mut facts = conn.facts();
    facts.operation = "http:unparsed";
    facts.reason = reason;
    facts.detail = Some(format!("hyper answered {status} before routing"));
    let line = encode(&facts, status.as_u16(), facts.started.elapsed());
    if let Err(e) = app.auditor.record(line, Durability::Written).await {
        tracing::error!(error = %e, "could not audit an unparsed request");
    }
}

/// Authenticates an `X-Auth-Token` and records the caller: the token file first (compared in
/// constant time), then Keystone when one is configured. Missing, repeated or unknown tokens are
/// 401 (a repeated header is ambiguous, so it proves nothing); Keystone unable to answer for a
/// token it has not vouched for recently is 503, and nothing is released.
pub async fn authenticate_token(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
) -> Result<TokenCaller, ApiError> {
    let unauthenticated = |message: &'static str| {
        ApiError::new(StatusCode::UNAUTHORIZED, Reason::Unauthenticated, message)
    };
    ex.facts.caller.auth = AuthMethod::Token;
    let mut values = headers.get_all(AUTH_TOKEN_HEADER).iter();
    let token = match (values.next(), values.next()) {
        (None, _) => {
            return Err(unauthenticated(
                "Authentication required: send X-Auth-Token.",
            ));
        }
        (Some(_), Some(_)) => {
            app.limiters.failed_auth(ex.facts.client, !ex.credentialed);
            return Err(unauthenticated("X-Auth-Token appears more than once."));
        }
        (Some(v), None) => v,
    };
    ex.facts.caller.credential_fingerprint = Some(app.auditor.keys().fingerprint(token.as_bytes()));
    let token = SecretString::from(String::from_utf8_lossy(token.as_bytes()).into_owned());
    let caller = match app.tokens.lookup(&token) {
        Some(entry) => {
            check_certificate_binding(ex, entry).inspect_err(|_| {
                app.limiters.failed_auth(ex.facts.client, !ex.credentialed);
            })?;
            TokenCaller::from_file(entry)
        }
        None => match &app.keystone {
            Some(keystone) => {
                ex.facts.caller.auth = AuthMethod::KeystoneToken;
                match keystone.validate(&token, ex.deadline.into()).await {
                    Ok(identity) => TokenCaller::from_keystone(&identity),
                    Err(e) => return Err(keystone_refusal(app, ex, e)),
                }
            }
            None => {
                app.limiters.failed_auth(ex.facts.client, !ex.credentialed);
                return Err(unauthenticated("The token is not valid."));
            }
        },
    };
    let facts = &mut ex.facts.caller;
    facts.kind = if caller.is_admin() {
        CallerKind::Admin
    } else {
        CallerKind::Owner
    };
    facts.project_id = Some(caller.project.to_string());
    facts.name = Some(caller.name.clone());
    facts.user_id = caller.user_id.clone();
    facts.roles = caller.role_names.clone();
    let key = if caller.is_admin() {
        format!(
            "admin:{}",
            caller.user_id.as_deref().unwrap_or(&caller.name)
        )
    } else {
        caller.project.to_string()
    };
    if let Err(limited) = app.limiters.project(&key) {
        return Err(rate_limited(app, ex, limited));
    }
    Ok(caller)
}

/// A token-file entry bound to a client certificate is valid only on a connection presenting it.
fn check_certificate_binding(ex: &Exchange, entry: &TokenEntry) -> Result<(), ApiError> {
    let Some(bound) = &entry.client_cert_sha256 else {
        return Ok(());
    };
    use subtle::ConstantTimeEq;
    let presented = ex
        .conn
        .client_cert
        .as_ref()
        .map(|c| c.sha256)
        .unwrap_or([0; 32]);
    if bool::from(presented.ct_eq(bound)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            Reason::Unauthenticated,
            "This token is bound to a client certificate; present it.",
        ))
    }
}

/// The answer when Keystone did not vouch for a token.
fn keystone_refusal(app: &App, ex: &Exchange, error: KeystoneError) -> ApiError {
    match error {
        KeystoneError::Invalid(message) => {
            app.limiters.failed_auth(ex.facts.client, !ex.credentialed);
            ApiError::new(StatusCode::UNAUTHORIZED, Reason::Unauthenticated, message)
        }
        KeystoneError::NotProjectScoped => ApiError::new(
            StatusCode::FORBIDDEN,
            Reason::Forbidden,
            "The token is not scoped to a project.",
        ),
        KeystoneError::Unavailable(why) => {
            tracing::warn!(request_id = %ex.facts.request_id, %why, "Keystone could not validate a token; failing closed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::IdentityUnavailable,
                "The identity service cannot validate the token right now; nothing was released.",
            )
            .with_retry_after(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_after_a_recorded_gate_corrects_the_event() {
        // The gate recorded the status the handler meant to send; the answer is now a 500.
        assert_eq!(after_panic(GateEvent::Recorded), GateEvent::NeedsCorrection);
        assert_eq!(after_panic(GateEvent::None), GateEvent::None);
        assert_eq!(
            after_panic(GateEvent::NeedsCorrection),
            GateEvent::NeedsCorrection
        );
    }
}
