//! The one place where outcomes become HTTP answers.
//!
//! Every error is JSON: `{"error": {"code": <status>, "message": "<what was wrong>", "request_id":
//! "<id>"}}` (the instance API's messages are Nova's, e.g. "Request is too large."). Every answer
//! carries `X-Request-Id` (added when the exchange finishes), `Cache-Control: no-store` (answers may
//! hold secrets) and `X-Content-Type-Options: nosniff`. No message ever contains a secret, an
//! internal path or a stack trace: messages are fixed strings or validated identifiers.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use super::body::BodyError;
use super::metadata::PasswordBodyError;
use crate::audit::gate::Verdict;
use crate::audit::{Facts, Reason, Surface};
use crate::identity::ProxyHeaderError;
use crate::identity::authenticate::IdentityError;
use crate::keys::KeyError;
use crate::limits::Limited;
use crate::microversion::VersionError;
use crate::store::StoreError;
use crate::store::rules::IntegrityFailure;

/// The response body type of every answer.
pub type Body = Full<Bytes>;

/// A refusal or failure, with the status, the audit reason and the message to send.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The audit reason code.
    pub reason: Reason,
    /// The message sent to the client (never a secret).
    pub message: Cow<'static, str>,
    /// `Allow` header for method refusals.
    pub allow: Option<&'static str>,
    /// `Retry-After` seconds, for rate limits and temporary unavailability.
    pub retry_after: Option<u64>,
    /// Close the connection after answering (the body was not read to its end).
    pub close: bool,
}

impl ApiError {
    /// An error with `status`, `reason` and `message`.
    pub fn new(status: StatusCode, reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            allow: None,
            retry_after: None,
            close: false,
        }
    }

    /// Adds an `Allow` header.
    pub fn with_allow(mut self, allow: &'static str) -> Self {
        self.allow = Some(allow);
        self
    }

    /// Adds `Retry-After`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Closes the connection after the answer.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// The answer to an unrouted path (the same on every surface).
    pub fn no_such_resource() -> Self {
        Self::not_found(Reason::NotFound, "No such resource.")
    }

    /// 404 for an instance that does not exist or that the caller may not know of (the same
    /// answer for both; the reason may later say which).
    pub fn unknown_instance(message: impl Into<Cow<'static, str>>) -> Self {
        Self::not_found(Reason::UnknownInstance, message)
    }

    /// 409: the request conflicts with what is stored.
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::CONFLICT, Reason::Conflict, message)
    }

    /// A method the route does not serve: 405 with `Allow`, or on the instance API (Nova's rule,
    /// see [`on_surface`]) a 400.
    pub fn wrong_method(surface: Surface, allow: &'static str) -> Self {
        let message = if surface == Surface::Instance {
            // Nova's wording: "GET and POST only are supported."
            let verb = if allow.contains(',') { "are" } else { "is" };
            format!("{} only {verb} supported.", allow.replace(", ", " and "))
        } else {
            format!("Only {allow} is supported here.")
        };
        Self::new(
            on_surface(surface, StatusCode::METHOD_NOT_ALLOWED),
            Reason::MethodNotAllowed,
            message,
        )
        .with_allow(allow)
    }

    /// Over a rate limit: 429 (503 on the instance API, see [`on_surface`]), `Retry-After` in whole
    /// seconds, rounded up.
    pub fn rate_limited(surface: Surface, limited: &Limited) -> Self {
        Self::new(
            on_surface(surface, StatusCode::TOO_MANY_REQUESTS),
            Reason::RateLimited,
            format!(
                "Rate limit exceeded ({}); retry after {} s.",
                limited.limit, limited.retry_after_secs
            ),
        )
        .with_retry_after(limited.retry_after_secs)
    }

    /// 403: the caller may know the target, but policy does not allow `action`.
    pub fn forbidden_by_policy(action: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            Reason::Forbidden,
            format!("Policy does not allow {action} to be performed."),
        )
    }

    /// 503 on the instance API (it passes the Neutron proxy; cloudbase-init retries): the
    /// instance is identified but not registered yet, nothing was read or stored.
    pub fn not_yet_registered(retry_after: u64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::NotYetRegistered,
            "This instance is not registered yet; post the password again shortly.",
        )
        .with_retry_after(retry_after)
    }

    /// 503: an HTTP/2 request beyond the connection's stream limit.
    pub fn streams_exceeded(max: u32) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited,
            format!(
                "Too many concurrent streams on this connection (at most {max}); retry shortly."
            ),
        )
        .with_retry_after(1)
    }

    /// 404 with a reason.
    pub fn not_found(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, reason, message)
    }

    /// 400 with a reason.
    pub fn bad_request(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason, message)
    }

    /// 500: a stored record failed authentication.
    pub fn integrity() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Reason::Integrity,
            "The stored password failed its integrity check; it was not returned.",
        )
    }

    /// 503: the store is unavailable.
    pub fn store_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::StoreUnavailable,
            "The password store is unavailable; nothing was changed.",
        )
        .with_retry_after(1)
    }

    /// 503: the active data key has sealed its limit; nothing was stored.
    pub fn key_exhausted() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::KeyExhausted,
            "The data key has sealed its limit; nothing was stored. An operator must rotate keys.",
        )
    }

    /// 503: the audit log cannot record; nothing is released or changed.
    pub fn audit_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::AuditUnavailable,
            "The audit log cannot record this request; nothing was released or changed.",
        )
        .with_retry_after(1)
    }

    /// 500: an unexpected internal error.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Reason::Internal,
            "Internal error.",
        )
    }
}

/// The one table of the instance API's departures from plain HTTP: the Neutron/OVN metadata proxy
/// passes only 200, 400, 403, 404, 409, 500, 502, 503 and 504 through to the guest (anything else
/// becomes a 500), and Nova answers a wrong method with 400 and a rate limit with 503; agents
/// such as cloudbase-init retry on those. Every other surface answers plain HTTP.
pub fn on_surface(surface: Surface, status: StatusCode) -> StatusCode {
    match (surface, status) {
        (Surface::Instance, StatusCode::METHOD_NOT_ALLOWED) => StatusCode::BAD_REQUEST,
        (Surface::Instance, StatusCode::TOO_MANY_REQUESTS) => StatusCode::SERVICE_UNAVAILABLE,
        (_, status) => status,
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
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
}

impl From<BodyError> for ApiError {
    /// The body was not read to its end, so the connection closes after the answer.
    fn from(error: BodyError) -> Self {
        let (reason, message) = match error {
            BodyError::TooLarge { .. } => (Reason::BodyTooLarge, "Request is too large."),
            BodyError::Timeout { .. } => (
                Reason::BodyTimeout,
                "The request body did not arrive in time.",
            ),
            BodyError::Broken { .. } => (Reason::BadRequest, "The request body could not be read."),
        };
        ApiError::bad_request(reason, message).closing()
    }
}

impl From<PasswordBodyError> for ApiError {
    fn from(error: PasswordBodyError) -> Self {
        let (reason, message) = match error {
            PasswordBodyError::Empty => (Reason::BodyEmpty, "Request body is empty."),
            PasswordBodyError::NotUtf8 => (Reason::BodyInvalid, "Request body is not valid UTF-8."),
            PasswordBodyError::ControlCharacter => (
                Reason::BodyInvalid,
                "Request body contains NUL or control characters.",
            ),
        };
        ApiError::bad_request(reason, message)
    }
}

impl From<IdentityError> for ApiError {
    /// Nova's order and codes for the proxy headers (400 malformed, 403 forged, 404 unknown);
    /// 401 for a token no one vouches for; 503 when Keystone cannot answer, releasing nothing.
    fn from(error: IdentityError) -> Self {
        let message = error.to_string();
        match error {
            IdentityError::ProxyHeadersWithCertificate { .. } => {
                ApiError::bad_request(Reason::BadRequest, message)
            }
            IdentityError::ProxyCertificateRequired => ApiError::new(
                StatusCode::FORBIDDEN,
                Reason::ProxyCertificateRequired,
                message,
            ),
            IdentityError::ProxyHeader(ProxyHeaderError::BadSignature) => {
                ApiError::new(StatusCode::FORBIDDEN, Reason::BadSignature, message)
            }
            IdentityError::ProxyHeader(header) => {
                let reason = match header {
                    ProxyHeaderError::Missing(_) => Reason::MissingHeader,
                    ProxyHeaderError::Duplicate(_) => Reason::DuplicateHeader,
                    _ => Reason::InvalidHeader,
                };
                ApiError::bad_request(reason, message)
            }
            IdentityError::MalformedInstance { .. } => ApiError::unknown_instance(message),
            IdentityError::MalformedTenant { .. } => {
                ApiError::not_found(Reason::TenantMismatch, message)
            }
            IdentityError::NotProjectScoped => {
                ApiError::new(StatusCode::FORBIDDEN, Reason::Forbidden, message)
            }
            IdentityError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::IdentityUnavailable,
                "The identity service cannot validate the token right now; nothing was released.",
            )
            .with_retry_after(1),
            _ => ApiError::new(StatusCode::UNAUTHORIZED, Reason::Unauthenticated, message),
        }
    }
}

impl From<IntegrityFailure> for ApiError {
    fn from(_: IntegrityFailure) -> Self {
        ApiError::integrity()
    }
}

impl From<VersionError> for ApiError {
    /// Nova's answers: 400 for a malformed version, 406 for one outside 2.1 to the maximum.
    fn from(error: VersionError) -> Self {
        let status = match error {
            VersionError::Malformed(_) => StatusCode::BAD_REQUEST,
            VersionError::Unsupported { .. } => StatusCode::NOT_ACCEPTABLE,
        };
        ApiError::new(status, Reason::InvalidHeader, error.to_string())
    }
}

impl From<KeyError> for ApiError {
    fn from(error: KeyError) -> Self {
        match error {
            KeyError::Refused(message) => {
                ApiError::new(StatusCode::CONFLICT, Reason::KeyringRefused, message)
            }
            e @ KeyError::NotReloadable(_) => ApiError::conflict(e.to_string()),
            KeyError::Store(e) => e.into(),
        }
    }
}

/// A refusal's event carries its reason, its message and its status.
impl Verdict for ApiError {
    fn record(&self, facts: &mut Facts) -> u16 {
        facts.reason = self.reason;
        facts.detail = Some(self.message.to_string());
        self.status.as_u16()
    }
}

/// An answer decided from a store outcome (see [`crate::audit::gate`]).
impl Verdict for Result<StatusCode, ApiError> {
    fn record(&self, facts: &mut Facts) -> u16 {
        match self {
            Ok(status) => status.as_u16(),
            Err(refusal) => refusal.record(facts),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: u16,
    message: &'a str,
    request_id: &'a str,
}

fn with_common_headers(mut response: Response<Body>) -> Response<Body> {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn build(status: StatusCode, content_type: Option<&'static str>, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    with_common_headers(response)
}

/// Records `error` in the facts and renders it.
pub fn error(facts: &mut Facts, error: &ApiError) -> Response<Body> {
    error.record(facts);
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorDetail {
            code: error.status.as_u16(),
            message: &error.message,
            request_id: facts.request_id.as_str(),
        },
    })
    .expect("an error body serializes");
    let mut response = build(error.status, Some("application/json"), Bytes::from(body));
    let h = response.headers_mut();
    if let Some(allow) = error.allow {
        h.insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(seconds) = error.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if error.close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// 200 with a `text/plain; charset=utf-8` body (the instance API's answers).
pub fn text(body: impl Into<Bytes>) -> Response<Body> {
    build(
        StatusCode::OK,
        Some("text/plain; charset=utf-8"),
        body.into(),
    )
}

/// `status` with a JSON body.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("a response body serializes");
    build(status, Some("application/json"), Bytes::from(body))
}

/// A request id as a header value, marked never to be indexed by HTTP/2's header compression:
/// each value is new, so indexing it only evicts the headers worth keeping, and HPACK then
/// compared every answer's id against the ids before it in its table (HPACK fell from 8.5 to
/// 5.6 % of an HTTP/2 worker's time). `None` if the id is not a valid header value (it always
/// is: `req-` and a UUID).
pub fn request_id_header(request_id: &str) -> Option<http::HeaderValue> {
    let mut value = http::HeaderValue::from_str(request_id).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// `status` with no body.
pub fn empty(status: StatusCode) -> Response<Body> {
    build(status, None, Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_out_of_hpack_tables() {
        let id = request_id_header("req-50460dfb-cdb4-4fd9-a02e-b1dff54f8d26").unwrap();
        assert!(id.is_sensitive());
        assert_eq!(id, "req-50460dfb-cdb4-4fd9-a02e-b1dff54f8d26");
        assert!(request_id_header("req-\n").is_none());
    }
}
