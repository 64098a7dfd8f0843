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

use crate::audit::{Facts, Reason};

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
    facts.reason = error.reason;
    facts.detail = Some(error.message.to_string());
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

/// `status` with no body.
pub fn empty(status: StatusCode) -> Response<Body> {
    build(status, None, Bytes::new())
}
