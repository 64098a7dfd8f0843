//! Keystone token validation: what keystonemiddleware's `auth_token` does for Nova, done here.
//!
//! A presented `X-Auth-Token` is validated with `GET /v3/auth/tokens?nocatalog` (the token in
//! `X-Subject-Token`), authorised by a service token that metapass obtains with its own
//! credentials and renews before it expires (or at once when Keystone rejects it). A valid,
//! project-scoped token becomes a [`KeystoneIdentity`]: user, project, roles (Keystone has already
//! added the implied ones) and expiry.
//!
//! Only valid results are cached, for at most `cache_ttl` and never past the token's own expiry,
//! keyed by an HMAC of the token under a key made at startup: the cache never holds a token, and
//! its keys cannot be checked against guessed tokens by anyone who reads the process memory
//! layout from outside. A revoked token therefore keeps working for at most `cache_ttl` (as with
//! keystonemiddleware's `token_cache_time`). The cache is bounded: when full, expired entries go
//! first, then the ones closest to expiry.
//!
//! Keystone unreachable, slow or failing is [`KeystoneError::Unavailable`] for a token that is not
//! cached: the request fails closed with 503 and nothing is released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ring::hmac;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::time::Instant;
use time::OffsetDateTime;

use crate::clock::Clock;

use crate::ids::ProjectId;

/// The largest token document read from Keystone (without the catalog they are a few KiB).
const MAX_TOKEN_DOCUMENT: usize = 256 * 1024;
/// A service token is renewed when it has less than this left.
const SERVICE_TOKEN_MARGIN: Duration = Duration::from_secs(120);
/// The most role names kept for the audit event.
const MAX_ROLES: usize = 32;

/// How metapass authenticates itself to Keystone.
#[derive(Debug, Clone)]
pub enum ServiceCredentials {
    /// A service user's password, scoped to a project (keystonemiddleware's `password` plugin).
    Password {
        /// The user's name.
        username: String,
        /// The user's password (read from `password_file`).
        password: SecretString,
        /// The project the service token is scoped to.
        project_name: String,
        /// The user's domain.
        user_domain_id: String,
        /// The project's domain.
        project_domain_id: String,
    },
    /// An application credential (keystonemiddleware's `v3applicationcredential` plugin).
    ApplicationCredential {
        /// Its id.
        id: String,
        /// Its secret (read from `secret_file`).
        secret: SecretString,
    },
}

/// The `[keystone]` section, validated.
#[derive(Debug, Clone)]
pub struct KeystoneSettings {
    /// Keystone's base URL, without `/v3` (`https://keystone.example:5000`).
    pub auth_url: url::Url,
    /// metapass's own credentials.
    pub credentials: ServiceCredentials,
    /// The CA certificates that Keystone's certificate must chain to (PEM); the public web roots
    /// when absent.
    pub ca_file: Option<std::path::PathBuf>,
    /// How long a validated token is trusted without asking Keystone again.
    pub cache_ttl: Duration,
    /// The most validated tokens kept.
    pub max_cached_tokens: usize,
    /// How long one call to Keystone may take.
    pub timeout: Duration,
}

/// Who a valid Keystone token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeystoneIdentity {
    /// The user's id.
    pub user_id: String,
    /// The user's name.
    pub user_name: String,
    /// The project the token is scoped to.
    pub project_id: ProjectId,
    /// The token's role names, implied roles included.
    pub roles: Vec<String>,
    /// When the token expires.
    pub expires_at: OffsetDateTime,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeystoneError {
    /// Keystone says the token is not valid (unknown, expired or revoked): 401.
    #[error("{0}")]
    Invalid(&'static str),
    /// The token is valid but not scoped to a project, so it owns no instance: 403.
    #[error("The token is not scoped to a project.")]
    NotProjectScoped,
    /// Keystone could not answer (unreachable, timed out, failing, or refusing metapass's own
    /// credentials): 503, nothing released.
    #[error("Keystone is unavailable: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct TokenDocument {
    token: TokenBody,
}

#[derive(Deserialize)]
struct TokenBody {
    expires_at: String,
    user: Option<Named>,
    project: Option<Named>,
    #[serde(default)]
    roles: Vec<Named>,
}

#[derive(Deserialize)]
struct Named {
    id: String,
    #[serde(default)]
    name: String,
}

struct ServiceToken {
    token: SecretString,
    renew_at: Instant,
}

struct Cached {
    identity: Arc<KeystoneIdentity>,
    valid_until: Instant,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Validates tokens against one Keystone.
pub struct Keystone {
    settings: KeystoneSettings,
    tokens_url: String,
    client: HttpsClient,
    service_token: tokio::sync::Mutex<Option<ServiceToken>>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    cache_key: hmac::Key,
    clock: Clock,
}

impl std::fmt::Debug for Keystone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keystone")
            .field("auth_url", &self.settings.auth_url.as_str())
            .finish_non_exhaustive()
    }
}

fn unavailable(what: impl std::fmt::Display) -> KeystoneError {
    KeystoneError::Unavailable(what.to_string())
}

impl Keystone {
    /// A validator for `settings` (reads the CA file; makes no request yet).
    pub fn new(settings: KeystoneSettings, clock: Clock) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &settings.ca_file {
            Some(ca) => {
                use rustls_pki_types::pem::PemObject;
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("[keystone] ca_file {}: {e}", ca.display()))?;
                for cert in certs {
                    let cert =
                        cert.map_err(|e| format!("[keystone] ca_file {}: {e}", ca.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("[keystone] ca_file {}: {e}", ca.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let tokens_url = format!(
            "{}/v3/auth/tokens",
            settings.auth_url.as_str().trim_end_matches('/')
        );
        let rng = ring::rand::SystemRandom::new();
        let cache_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| "no randomness for the token cache key".to_owned())?;
        Ok(Self {
            settings,
            tokens_url,
            client,
            service_token: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            cache_key,
            clock,
        })
    }

    /// Validates `token`, from the cache when it was validated less than `cache_ttl` ago.
    /// `deadline` bounds the whole call (the request's own deadline).
    pub async fn validate(
        &self,
        token: &SecretString,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<KeystoneIdentity>, KeystoneError> {
        let key = self.cache_key_of(token);
        if let Some(identity) = self.cached(&key) {
            return Ok(identity);
        }
        let deadline = deadline.min(crate::clock::io_now_tokio() + self.settings.timeout);
        let identity = tokio::time::timeout_at(deadline, self.ask_keystone(token))
            .await
            .map_err(|_| unavailable("no answer in time"))??;
        let identity = Arc::new(identity);
        self.remember(key, identity.clone());
        Ok(identity)
    }

    fn cache_key_of(&self, token: &SecretString) -> [u8; 32] {
        let tag = hmac::sign(&self.cache_key, token.expose_secret().as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(tag.as_ref());
        key
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Arc<KeystoneIdentity>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(key)?;
        (entry.valid_until > self.clock.now()).then(|| entry.identity.clone())
    }

    fn remember(&self, key: [u8; 32], identity: Arc<KeystoneIdentity>) {
        let now = self.clock.now();
        let left = identity.expires_at - self.clock.now_utc();
        let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
        let valid_until = now + self.settings.cache_ttl.min(left);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.settings.max_cached_tokens && !cache.contains_key(&key) {
            cache.retain(|_, c| c.valid_until > now);
            if cache.len() >= self.settings.max_cached_tokens {
                // Still full of live entries: the one closest to expiry makes room.
                if let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.valid_until)
                    .map(|(k, _)| *k)
                {
                    cache.remove(&oldest);
                }
            }
        }
        if self.settings.max_cached_tokens > 0 {
            cache.insert(
                key,
                Cached {
                    identity,
                    valid_until,
                },
            );
        }
    }

    /// How many validated tokens are cached (for tests and metrics).
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn ask_keystone(&self, token: &SecretString) -> Result<KeystoneIdentity, KeystoneError> {
        let subject = HeaderValue::from_str(token.expose_secret())
            .map_err(|_| KeystoneError::Invalid("The token is not valid."))?;
        // A rejected service token is renewed once: it may have been revoked or expired early.
        for attempt in 0..2 {
            let service = self.service_token(attempt > 0).await?;
            let mut auth = HeaderValue::from_str(service.expose_secret())
                .map_err(|_| unavailable("Keystone issued an unusable service token"))?;
            auth.set_sensitive(true);
            let mut subject = subject.clone();
            subject.set_sensitive(true);
            let request = Request::builder()
                .method(Method::GET)
                .uri(format!("{}?nocatalog", self.tokens_url))
                .header("x-auth-token", auth)
                .header("x-subject-token", subject)
                .header(http::header::ACCEPT, "application/json")
                .header(http::header::USER_AGENT, crate::PRODUCT_NAME)
                .body(Full::new(Bytes::new()))
                .map_err(unavailable)?;
            let (status, _, body) = self.call(request).await?;
            match status {
                StatusCode::OK => return identity_from(&body, self.clock.now_utc()),
                StatusCode::NOT_FOUND => {
                    return Err(KeystoneError::Invalid("The token is not valid."));
                }
                StatusCode::UNAUTHORIZED if attempt == 0 => continue,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    tracing::error!(
                        %status,
                        "Keystone refused metapass's service token for token validation: give the service user the service role"
                    );
                    return Err(unavailable(format!(
                        "Keystone refused metapass's own credentials ({status})"
                    )));
                }
                other => return Err(unavailable(format!("Keystone answered {other}"))),
            }
        }
        Err(unavailable("Keystone refused metapass's service token"))
    }

    /// Sends `request`; returns the status, the `X-Subject-Token` header (a token Keystone
    /// issued) and the body, read up to [`MAX_TOKEN_DOCUMENT`].
    async fn call(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Option<SecretString>, Bytes), KeystoneError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| unavailable(format!("cannot reach Keystone ({e})")))?;
        let status = response.status();
        let issued = response
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(|t| SecretString::from(t.to_owned()));
        let body = Limited::new(response.into_body(), MAX_TOKEN_DOCUMENT)
            .collect()
            .await
            .map_err(|_| unavailable("Keystone's answer could not be read"))?
            .to_bytes();
        Ok((status, issued, body))
    }

    /// The service token, obtained or renewed when `renew` is set or it is near its expiry.
    async fn service_token(&self, renew: bool) -> Result<SecretString, KeystoneError> {
        let mut held = self.service_token.lock().await;
        if let Some(current) = held.as_ref()
            && !renew
            && current.renew_at > self.clock.now()
        {
            return Ok(current.token.clone());
        }
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.tokens_url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, crate::PRODUCT_NAME)
            .body(Full::new(Bytes::from(self.auth_request())))
            .map_err(unavailable)?;
        let (status, token, body) = self.call(request).await?;
        let token = match (status, token) {
            (StatusCode::CREATED, Some(token)) => token,
            (status, _) => {
                tracing::error!(%status, "Keystone refused metapass's service credentials");
                return Err(unavailable(format!(
                    "Keystone refused metapass's service credentials ({status})"
                )));
            }
        };
        let document: TokenDocument = serde_json::from_slice(&body)
            .map_err(|_| unavailable("Keystone's service token document did not parse"))?;
        let expires = parse_time(&document.token.expires_at)
            .ok_or_else(|| unavailable("Keystone's service token has no valid expiry"))?;
        let left = Duration::try_from(expires - self.clock.now_utc()).unwrap_or_default();
        let renew_at = self.clock.now() + left.saturating_sub(SERVICE_TOKEN_MARGIN);
        *held = Some(ServiceToken {
            token: token.clone(),
            renew_at,
        });
        Ok(token)
    }

    /// The body of `POST /v3/auth/tokens` for metapass's own credentials.
    fn auth_request(&self) -> Vec<u8> {
        let body = match &self.settings.credentials {
            ServiceCredentials::Password {
                username,
                password,
                project_name,
                user_domain_id,
                project_domain_id,
            } => serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": username,
                    "domain": {"id": user_domain_id},
                    "password": password.expose_secret(),
                }}},
                "scope": {"project": {"name": project_name, "domain": {"id": project_domain_id}}},
            }}),
            ServiceCredentials::ApplicationCredential { id, secret } => {
                serde_json::json!({"auth": {
                    "identity": {"methods": ["application_credential"], "application_credential": {
                        "id": id,
                        "secret": secret.expose_secret(),
                    }},
                }})
            }
        };
        // The serialized body holds the secret only until the request is sent.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// Reads a validated token's document.
fn identity_from(body: &[u8], now: OffsetDateTime) -> Result<KeystoneIdentity, KeystoneError> {
    let document: TokenDocument = serde_json::from_slice(body)
        .map_err(|_| unavailable("Keystone's token document did not parse"))?;
    let token = document.token;
    let expires_at = parse_time(&token.expires_at)
        .ok_or_else(|| unavailable("Keystone's token document has no valid expiry"))?;
    if expires_at <= now {
        return Err(KeystoneError::Invalid("The token has expired."));
    }
    let user = token
        .user
        .ok_or_else(|| unavailable("Keystone's token document names no user"))?;
    let project = token.project.ok_or(KeystoneError::NotProjectScoped)?;
    let project_id = ProjectId::parse(&project.id)
        .map_err(|_| unavailable("Keystone's token names a project id metapass cannot hold"))?;
    let roles = token
        .roles
        .into_iter()
        .take(MAX_ROLES)
        .map(|r| crate::text::bounded(&r.name))
        .collect();
    Ok(KeystoneIdentity {
        user_id: crate::text::bounded(&user.id),
        user_name: crate::text::bounded(&user.name),
        project_id,
        roles,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(expires: &str, project: bool) -> Vec<u8> {
        let mut token = serde_json::json!({
            "expires_at": expires,
            "user": {"id": "u1", "name": "alice", "domain": {"id": "default"}},
            "roles": [{"id": "r1", "name": "member"}, {"id": "r2", "name": "reader"}],
            "methods": ["password"],
        });
        if project {
            token["project"] = serde_json::json!({"id": "0123abcd", "name": "project-a"});
        }
        serde_json::to_vec(&serde_json::json!({ "token": token })).unwrap()
    }

    #[test]
    fn a_token_document_becomes_an_identity() {
        let id = identity_from(
            &document("2999-01-01T00:00:00.000000Z", true),
            crate::clock::wall_now(),
        )
        .unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.user_name, "alice");
        assert_eq!(id.project_id.as_str(), "0123abcd");
        assert_eq!(id.roles, ["member", "reader"]);
    }

    fn keystone(max: usize, ttl: Duration, clock: &Clock) -> Keystone {
        Keystone::new(
            KeystoneSettings {
                auth_url: url::Url::parse("https://keystone.invalid:5000").unwrap(),
                credentials: ServiceCredentials::ApplicationCredential {
                    id: "id".into(),
                    secret: SecretString::from("secret"),
                },
                ca_file: None,
                cache_ttl: ttl,
                max_cached_tokens: max,
                timeout: Duration::from_secs(1),
            },
            clock.clone(),
        )
        .unwrap()
    }

    fn identity(clock: &Clock, expires_in: time::Duration) -> Arc<KeystoneIdentity> {
        Arc::new(KeystoneIdentity {
            user_id: "u".into(),
            user_name: "alice".into(),
            project_id: ProjectId::parse("p").unwrap(),
            roles: vec!["member".into()],
            expires_at: clock.now_utc() + expires_in,
        })
    }

    #[test]
    fn the_cache_is_bounded_keyed_by_hmac_and_never_outlives_a_token() {
        let clock = Clock::manual();
        let ks = keystone(2, Duration::from_secs(300), &clock);
        let token = |t: &str| SecretString::from(t.to_owned());
        let (a, b, c) = (token("a"), token("b"), token("c"));
        assert_ne!(ks.cache_key_of(&a), ks.cache_key_of(&b));
        // Not the token's plain hash either: the key is secret to this process.
        assert_ne!(
            ks.cache_key_of(&a).to_vec(),
            ring::digest::digest(&ring::digest::SHA256, b"a")
                .as_ref()
                .to_vec()
        );
        ks.remember(
            ks.cache_key_of(&a),
            identity(&clock, time::Duration::hours(1)),
        );
        // b's token expires in 10 s: cached for 10 s, not the 300 s TTL.
        ks.remember(
            ks.cache_key_of(&b),
            identity(&clock, time::Duration::seconds(10)),
        );
        assert_eq!(ks.cached_tokens(), 2);
        // Full: the entry nearest its end (b) makes room for c.
        ks.remember(
            ks.cache_key_of(&c),
            identity(&clock, time::Duration::hours(1)),
        );
        assert_eq!(ks.cached_tokens(), 2);
        assert!(ks.cached(&ks.cache_key_of(&a)).is_some());
        assert!(ks.cached(&ks.cache_key_of(&b)).is_none());
        assert!(ks.cached(&ks.cache_key_of(&c)).is_some());
        clock.advance(Duration::from_secs(301));
        assert!(
            ks.cached(&ks.cache_key_of(&a)).is_none(),
            "the TTL bounds every entry"
        );
    }

    #[test]
    fn expired_unscoped_and_malformed_documents_are_refused() {
        assert_eq!(
            identity_from(
                &document("2000-01-01T00:00:00Z", true),
                crate::clock::wall_now()
            ),
            Err(KeystoneError::Invalid("The token has expired."))
        );
        assert_eq!(
            identity_from(
                &document("2999-01-01T00:00:00Z", false),
                crate::clock::wall_now()
            ),
            Err(KeystoneError::NotProjectScoped)
        );
        assert!(matches!(
            identity_from(b"{\"token\": 1}", crate::clock::wall_now()),
            Err(KeystoneError::Unavailable(_))
        ));
    }
}
