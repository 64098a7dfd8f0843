//! From a request to its handler: the surface it belongs to (one table), the checks every request
//! passes before any handler (stream cap, the client behind trusted proxies, the pre-authentication
//! limit, the listener's surfaces, framing), then the surface's handler.

use http::{HeaderMap, Request, Response};

use super::exchange::Exchange;
use super::respond::{ApiError, Body};
use super::{RequestBody, admin, compute, health, metadata};
use crate::app::App;
use crate::audit::event::bounded;
use crate::audit::{Reason, Surface};
use crate::config::ComputeApi;
use crate::identity::{AUTH_TOKEN_HEADER, SIGNATURE_HEADER};

/// Marks an HTTP/2 request beyond `h2_max_concurrent_streams` on its connection: refused with
/// 503 and audited, like any refusal (the HTTP/2 layer itself only refuses streams beyond twice
/// the limit, which compliant clients never open).
#[derive(Debug, Clone, Copy)]
pub struct StreamsExceeded;

/// Whether a surface owns a path (the compute API's depends on its configured prefix).
type OwnsPath = fn(&ComputeApi, &str) -> bool;

/// Which surface a path belongs to, first match wins. The instance API is matched as Nova's
/// normalising lookup would match it, so no spelling of its paths reaches another surface.
const SURFACES: [(OwnsPath, Surface); 4] = [
    (
        |_, path| metadata::is_openstack_path(path),
        Surface::Instance,
    ),
    (|_, path| path.starts_with("/admin/"), Surface::Admin),
    (
        |_, path| matches!(path, "/healthz" | "/readyz" | "/metrics"),
        Surface::Ops,
    ),
    (compute::owns, Surface::Compute),
];

/// The surface a path belongs to.
pub(crate) fn surface_of(api: &ComputeApi, path: &str) -> Surface {
    SURFACES
        .iter()
        .find(|(owns, _)| owns(api, path))
        .map_or(Surface::Unknown, |(_, surface)| *surface)
}

/// Routes a request: the checks every request passes, then its surface's handler.
pub(crate) async fn route<B: RequestBody>(
    app: &App,
    ex: &mut Exchange,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path();
    ex.facts.surface = surface_of(&app.compute_api, path);
    if req.extensions().get::<StreamsExceeded>().is_some() {
        return Err(ApiError::streams_exceeded(
            app.limits.h2_max_concurrent_streams,
        ));
    }
    // Who the client is (behind trusted proxies) comes first: it is what the source limit counts.
    resolve_client(ex, req.headers())?;
    ex.credentialed = carries_credentials(app, ex, path, req.headers());
    if let Err(limited) = app.limiters.before_auth(ex.facts.client, ex.credentialed) {
        // Its client, not metapass, decides how fast these come: counted, not written one by one.
        ex.aggregated = true;
        return Err(ex.rate_limited(app, limited));
    }
    if !ex.conn.listener.serves(ex.facts.surface) {
        return Err(ApiError::no_such_resource());
    }
    if let Some(problem) = ambiguous_framing(req.headers()) {
        return Err(ApiError::bad_request(Reason::MalformedRequest, problem).closing());
    }
    // The instance API's future is the request task's inline; the other surfaces' (Keystone
    // validation, admin operations) are boxed, so that a GET's task is not the size of the
    // largest of them (it is copied whole when it is boxed and spawned).
    match ex.facts.surface {
        Surface::Instance => metadata::handle(app, ex, req).await,
        Surface::Admin => Box::pin(admin::handle(app, ex, req)).await,
        Surface::Ops => Box::pin(health::handle(app, ex, req)).await,
        Surface::Compute => Box::pin(compute::handle(app, ex, req)).await,
        Surface::Unknown => Err(ApiError::no_such_resource()),
    }
}

/// Records the client behind trusted proxies (`Forwarded`, `X-Forwarded-For`); a malformed header
/// from a trusted proxy is a 400.
fn resolve_client(ex: &mut Exchange, headers: &HeaderMap) -> Result<(), ApiError> {
    let source = crate::forwarded::resolve(&ex.conn.listener, ex.facts.peer.ip(), headers)
        .map_err(|malformed| {
            ex.facts.forwarded_for_raw = headers
                .get("forwarded")
                .or_else(|| headers.get("x-forwarded-for"))
                .map(|v| bounded(&String::from_utf8_lossy(v.as_bytes())));
            ApiError::bad_request(Reason::InvalidHeader, malformed.0)
        })?;
    ex.facts.client = source.client;
    ex.facts.forwarded_for = source.chain;
    ex.facts.forwarded = source.verdict;
    if source.ignored.is_some() {
        ex.facts.forwarded_for_raw = source.ignored;
    }
    Ok(())
}

/// Whether the request brings credentials to a route that verifies them: the proxy's signature
/// or an instance certificate on the password route, a token on the compute or admin API. Such a
/// request costs its source nothing before authentication (a verified one never does; a failed
/// one costs `failed_auth_cost`, see [`crate::limits`]), so the metadata proxy's one address is
/// not a budget every guest behind it shares.
pub(super) fn carries_credentials(
    app: &App,
    ex: &Exchange,
    path: &str,
    headers: &HeaderMap,
) -> bool {
    match ex.facts.surface {
        Surface::Instance => {
            metadata::route_as_nova(path) == metadata::InstanceRoute::Password
                && (headers.contains_key(SIGNATURE_HEADER)
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

/// Refuses a `Transfer-Encoding` other than exactly `chunked` (`chunked, chunked` and the like are
/// request-smuggling shapes that hyper would accept, since it checks only the last coding). hyper
/// already refuses a last coding other than `chunked`, and resolves `Content-Length` together with
/// `Transfer-Encoding` itself (the latter wins and the length is dropped); for that case RFC 9112
/// asks the server to close the connection, which the finish step does for every request that used
/// `Transfer-Encoding`.
pub(crate) fn ambiguous_framing(headers: &HeaderMap) -> Option<&'static str> {
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
