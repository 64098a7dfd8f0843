//! The identity step: from a connection's certificate and a request's headers to a [`Caller`], or
//! the reason there is none.
//!
//! Every backend answers "who" and nothing else: no HTTP status, no audit facts, no rate limits
//! (the API's caller step turns an [`Attempt`] into those). What was *presented*, verified or not,
//! comes back beside the verdict, so that a refused attempt is audited with what it claimed.

use std::time::Instant;

use http::HeaderMap;
use secrecy::SecretString;
use subtle::ConstantTimeEq;

use super::keystone::{Keystone, KeystoneError};
use super::{
    AUTH_TOKEN_HEADER, ClientCert, INSTANCE_ID_HEADER, ProxyHeaderError, ProxySigner,
    SIGNATURE_HEADER, TENANT_ID_HEADER, TokenCaller, TokenEntry, TokenTable,
};
use crate::config::{InstanceAuth, ProxyAuth};
use crate::ids::{InstanceId, ProjectId};

/// How a caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// An instance's client certificate (`urn:uuid:<id>` SAN).
    ClientCertificate,
    /// The metadata proxy's signed `X-Instance-ID` headers.
    ProxySignature,
    /// A token from the token file (or one no backend knew).
    Token,
    /// A token Keystone was asked about.
    KeystoneToken,
}

/// An instance, identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCaller {
    /// The instance.
    pub instance: InstanceId,
    /// The project the proxy says owns it (`None` for a certificate: the registry decides).
    pub tenant: Option<ProjectId>,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// An instance (the instance API).
    Instance(InstanceCaller),
    /// An owner or administrator (the compute and admin APIs).
    Token(TokenCaller),
}

/// Why a request identifies no one. Each names the failure, not its answer (the API's respond
/// step owns that).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Proxy headers sent on a connection whose certificate already names an instance.
    #[error("Proxy headers are not accepted on a connection with an instance certificate.")]
    ProxyHeadersWithCertificate {
        /// The instance the certificate names.
        instance: InstanceId,
    },
    /// `mtls+signature`: signed headers from a connection without the proxy's certificate.
    #[error("Signed proxy headers are accepted only from the metadata proxy's client certificate.")]
    ProxyCertificateRequired,
    /// The proxy headers are missing, repeated, not text, or their signature is wrong.
    #[error("{0}")]
    ProxyHeader(ProxyHeaderError),
    /// A correctly signed instance id that is not an instance id.
    #[error("Instance not found.")]
    MalformedInstance {
        /// The signed value.
        claimed: String,
    },
    /// A correctly signed instance whose tenant header is not a project id.
    #[error("Instance not found.")]
    MalformedTenant {
        /// The instance.
        instance: InstanceId,
    },
    /// No `X-Auth-Token`.
    #[error("Authentication required: send X-Auth-Token.")]
    TokenMissing,
    /// `X-Auth-Token` more than once: ambiguous, so it proves nothing.
    #[error("X-Auth-Token appears more than once.")]
    TokenRepeated,
    /// No backend vouches for the token.
    #[error("{0}")]
    TokenInvalid(&'static str),
    /// A token-file token bound to a client certificate the connection does not present.
    #[error("This token is bound to a client certificate; present it.")]
    CertificateRequired,
    /// A valid token scoped to no project.
    #[error("The token is not scoped to a project.")]
    NotProjectScoped,
    /// Keystone could not answer for a token it has not vouched for recently.
    #[error("Keystone is unavailable: {0}")]
    Unavailable(String),
}

impl IdentityError {
    /// Whether this is a failed authentication (credentials that did not verify), which costs its
    /// source `failed_auth_cost` (see `crate::limits`). A missing token, an unscoped one or
    /// Keystone being away is not.
    pub fn is_failed_authentication(&self) -> bool {
        matches!(
            self,
            IdentityError::ProxyCertificateRequired
                | IdentityError::ProxyHeader(_)
                | IdentityError::TokenRepeated
                | IdentityError::TokenInvalid(_)
                | IdentityError::CertificateRequired
        )
    }
}

impl From<KeystoneError> for IdentityError {
    fn from(e: KeystoneError) -> Self {
        match e {
            KeystoneError::Invalid(message) => IdentityError::TokenInvalid(message),
            KeystoneError::NotProjectScoped => IdentityError::NotProjectScoped,
            KeystoneError::Unavailable(why) => IdentityError::Unavailable(why),
        }
    }
}

/// What a request presented, verified or not: what its audit event records of the attempt. The
/// token is borrowed from the request's headers, not copied: the caller step only fingerprints it.
#[derive(Default)]
pub struct Presented<'h> {
    /// The last method tried.
    pub method: Option<Method>,
    /// `X-Instance-ID` as sent.
    pub claimed_instance: Option<String>,
    /// `X-Tenant-ID` as sent.
    pub claimed_tenant: Option<String>,
    /// The token's bytes as sent (fingerprinted for the event, never written).
    pub token: Option<&'h [u8]>,
}

/// An authentication attempt: what was presented and who, if anyone, it proved.
pub struct Attempt<'h> {
    /// What was presented.
    pub presented: Presented<'h>,
    /// The verdict.
    pub result: Result<Caller, IdentityError>,
}

/// A source of token verdicts. The token file answers from memory; Keystone may be asked.
pub trait TokenAuthority {
    /// Whether this authority knows `token`: `None` to let the next one try.
    fn vouch(
        &self,
        token: &SecretString,
        cert: Option<&ClientCert>,
        deadline: Instant,
    ) -> impl Future<Output = Option<Result<TokenCaller, IdentityError>>> + Send;
}

impl TokenAuthority for TokenTable {
    async fn vouch(
        &self,
        token: &SecretString,
        cert: Option<&ClientCert>,
        _: Instant,
    ) -> Option<Result<TokenCaller, IdentityError>> {
        let entry = self.lookup(token)?;
        Some(check_certificate_binding(entry, cert).map(|()| TokenCaller::from_file(entry)))
    }
}

impl TokenAuthority for Keystone {
    async fn vouch(
        &self,
        token: &SecretString,
        _: Option<&ClientCert>,
        deadline: Instant,
    ) -> Option<Result<TokenCaller, IdentityError>> {
        Some(
            self.validate(token, deadline.into())
                .await
                .map(|identity| TokenCaller::from_keystone(&identity))
                .map_err(IdentityError::from),
        )
    }
}

/// A token-file entry bound to a client certificate is valid only on a connection presenting it
/// (compared in constant time).
fn check_certificate_binding(
    entry: &TokenEntry,
    cert: Option<&ClientCert>,
) -> Result<(), IdentityError> {
    let Some(bound) = &entry.client_cert_sha256 else {
        return Ok(());
    };
    let presented = cert.map(|c| c.sha256).unwrap_or([0; 32]);
    if bool::from(presented.ct_eq(bound)) {
        Ok(())
    } else {
        Err(IdentityError::CertificateRequired)
    }
}

/// Every way metapass knows a caller, built once from the configuration.
pub struct Identities {
    /// Verifies the metadata proxy's signatures.
    pub signer: ProxySigner,
    /// The token file.
    pub tokens: TokenTable,
    /// Keystone, when `[keystone]` is configured.
    pub keystone: Option<Keystone>,
    /// Proxy-header mode and the proxy certificate's names.
    pub instance_auth: InstanceAuth,
}

impl Identities {
    /// The calling instance: by its client certificate (the tenant is then whatever the registry
    /// says), or by the proxy's signed headers, checked in Nova's order (see
    /// [`ProxySigner::verify`]). In `mtls+signature` mode the headers count only on a connection
    /// with the metadata proxy's client certificate.
    pub fn instance<'h>(&self, cert: Option<&ClientCert>, headers: &'h HeaderMap) -> Attempt<'h> {
        let mut presented = Presented::default();
        if let Some(id) = cert.and_then(|c| c.instance_id.clone()) {
            presented.method = Some(Method::ClientCertificate);
            let sent = [INSTANCE_ID_HEADER, TENANT_ID_HEADER, SIGNATURE_HEADER];
            let result = if sent.iter().any(|h| headers.contains_key(*h)) {
                Err(IdentityError::ProxyHeadersWithCertificate { instance: id })
            } else {
                Ok(Caller::Instance(InstanceCaller {
                    instance: id,
                    tenant: None,
                }))
            };
            return Attempt { presented, result };
        }
        let from_proxy = cert.is_some_and(|c| c.is_proxy(&self.instance_auth.proxy_cert_names));
        let (claim, verdict) = self.signer.verify(headers);
        presented.method = Some(Method::ProxySignature);
        presented.claimed_instance = claim.instance_id;
        presented.claimed_tenant = claim.tenant_id;
        let result = if self.instance_auth.proxy_auth == ProxyAuth::MtlsAndSignature && !from_proxy
        {
            Err(IdentityError::ProxyCertificateRequired)
        } else {
            verdict
                .map_err(IdentityError::ProxyHeader)
                .and_then(|()| signed_instance(&presented))
        };
        Attempt { presented, result }
    }

    /// The owner or administrator an `X-Auth-Token` names: the token file first (compared in
    /// constant time), then Keystone when one is configured.
    pub async fn token<'h>(
        &self,
        cert: Option<&ClientCert>,
        headers: &'h HeaderMap,
        deadline: Instant,
    ) -> Attempt<'h> {
        let mut presented = Presented {
            method: Some(Method::Token),
            ..Presented::default()
        };
        let mut values = headers.get_all(AUTH_TOKEN_HEADER).iter();
        let token = match (values.next(), values.next()) {
            (None, _) => return presented.refused(IdentityError::TokenMissing),
            (Some(_), Some(_)) => return presented.refused(IdentityError::TokenRepeated),
            (Some(v), None) => v,
        };
        presented.token = Some(token.as_bytes());
        let token = SecretString::from(String::from_utf8_lossy(token.as_bytes()).into_owned());
        let mut verdict = self.tokens.vouch(&token, cert, deadline).await;
        if verdict.is_none()
            && let Some(keystone) = &self.keystone
        {
            presented.method = Some(Method::KeystoneToken);
            verdict = keystone.vouch(&token, cert, deadline).await;
        }
        let result = verdict
            .unwrap_or(Err(IdentityError::TokenInvalid("The token is not valid.")))
            .map(Caller::Token);
        Attempt { presented, result }
    }
}

impl<'h> Presented<'h> {
    fn refused(self, error: IdentityError) -> Attempt<'h> {
        Attempt {
            presented: self,
            result: Err(error),
        }
    }
}

/// The instance a verified signature names, as identifiers.
fn signed_instance(presented: &Presented<'_>) -> Result<Caller, IdentityError> {
    let claimed = presented.claimed_instance.clone().unwrap_or_default();
    let instance =
        InstanceId::parse(&claimed).map_err(|_| IdentityError::MalformedInstance { claimed })?;
    let tenant = presented.claimed_tenant.as_deref().unwrap_or_default();
    let tenant = ProjectId::parse(tenant).map_err(|_| IdentityError::MalformedTenant {
        instance: instance.clone(),
    })?;
    Ok(Caller::Instance(InstanceCaller {
        instance,
        tenant: Some(tenant),
    }))
}
