//! The caller step: runs the identity step ([`crate::identity::authenticate`]) for a request and
//! turns its [`Attempt`] into what the API needs: the caller's audit facts, the rate limits that
//! follow from who it is, the failed-authentication cost, and the refusal.

use http::HeaderMap;

use super::exchange::Exchange;
use super::respond::ApiError;
use crate::app::App;
use crate::audit::event::bounded;
use crate::audit::{AuthMethod, CallerKind};
use crate::identity::TokenCaller;
use crate::identity::authenticate::{
    Attempt, Caller, IdentityError, InstanceCaller, Method, Presented,
};

/// The owner or administrator an `X-Auth-Token` names (see
/// [`crate::identity::authenticate::Identities::token`]), then the project (or admin) rate limit.
pub(crate) async fn authenticate_token(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
) -> Result<TokenCaller, ApiError> {
    let cert = ex.conn.client_cert.as_ref();
    let attempt = app.identities.token(cert, headers, ex.deadline).await;
    record_presented(app, ex, &attempt.presented);
    let caller = match attempt.result {
        Ok(Caller::Token(caller)) => caller,
        Ok(Caller::Instance(_)) => unreachable!("a token attempt yields a token caller"),
        Err(error) => return Err(refuse(app, ex, error)),
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
        return Err(ex.rate_limited(app, limited));
    }
    Ok(caller)
}

/// The calling instance (see [`crate::identity::authenticate::Identities::instance`]), then its
/// rate limit, counted on the instance the credential verified for, before its shape is judged.
pub(crate) fn identify_instance(
    app: &App,
    ex: &mut Exchange,
    headers: &HeaderMap,
) -> Result<InstanceCaller, ApiError> {
    let attempt = app
        .identities
        .instance(ex.conn.client_cert.as_ref(), headers);
    record_presented(app, ex, &attempt.presented);
    if attempt.presented.method == Some(Method::ClientCertificate) {
        record_certificate_instance(ex, &attempt);
    }
    let verified = match &attempt.result {
        Ok(Caller::Instance(caller)) => Some(caller.instance.as_str()),
        Err(IdentityError::MalformedInstance { claimed }) => Some(claimed.as_str()),
        Err(IdentityError::MalformedTenant { instance }) => Some(instance.as_str()),
        _ => None,
    };
    if let Some(instance) = verified {
        if let Err(limited) = app.limiters.instance(instance) {
            return Err(ex.rate_limited(app, limited));
        }
        ex.facts.caller.kind = CallerKind::Instance;
        ex.facts.target_instance = Some(bounded(instance));
    }
    match attempt.result {
        Ok(Caller::Instance(caller)) => {
            ex.facts.caller.instance_id = Some(caller.instance.to_string());
            Ok(caller)
        }
        Ok(Caller::Token(_)) => unreachable!("an instance attempt yields an instance caller"),
        Err(error) => Err(refuse(app, ex, error)),
    }
}

/// A certificate names its instance whatever else the request sent.
fn record_certificate_instance(ex: &mut Exchange, attempt: &Attempt<'_>) {
    let instance = match &attempt.result {
        Ok(Caller::Instance(caller)) => &caller.instance,
        Err(IdentityError::ProxyHeadersWithCertificate { instance }) => instance,
        _ => return,
    };
    let facts = &mut ex.facts;
    facts.caller.kind = CallerKind::Instance;
    facts.caller.instance_id = Some(instance.to_string());
    facts.caller.credential_fingerprint = facts.client_certificate.clone();
    facts.target_instance = Some(instance.to_string());
}

/// The answer to an attempt that identified no one; credentials that did not verify cost their
/// source a failed authentication.
fn refuse(app: &App, ex: &mut Exchange, error: IdentityError) -> ApiError {
    if let IdentityError::MalformedTenant { instance } = &error {
        ex.facts.caller.instance_id = Some(instance.to_string());
    }
    if error.is_failed_authentication() {
        app.limiters.failed_auth(ex.facts.client, !ex.credentialed);
    }
    if let IdentityError::Unavailable(why) = &error {
        tracing::warn!(request_id = %ex.facts.request_id, %why, "Keystone could not validate a token; failing closed");
    }
    ApiError::from(error)
}

fn record_presented(app: &App, ex: &mut Exchange, presented: &Presented<'_>) {
    let facts = &mut ex.facts.caller;
    if let Some(method) = presented.method {
        facts.auth = match method {
            Method::ClientCertificate => AuthMethod::ClientCertificate,
            Method::ProxySignature => AuthMethod::ProxySignature,
            Method::Token => AuthMethod::Token,
            Method::KeystoneToken => AuthMethod::KeystoneToken,
        };
    }
    if presented.method == Some(Method::ProxySignature) {
        facts.claimed_instance = presented.claimed_instance.as_deref().map(bounded);
        facts.claimed_tenant = presented.claimed_tenant.as_deref().map(bounded);
    }
    if let Some(token) = presented.token {
        facts.credential_fingerprint = Some(app.auditor.keys().fingerprint(token));
    }
}
