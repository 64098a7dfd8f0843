//! Who is calling: instance certificates, the metadata proxy's signed instance headers, and
//! owner/admin tokens (the token file, Keystone in [`keystone`]).
//!
//! [`authenticate`] is the identity step every request takes; it answers "who", never "may they"
//! (that is [`crate::policy`]'s job), and knows nothing of HTTP answers or audit events.

use std::fmt;

use http::HeaderMap;
use ring::{digest, hmac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::ids::ProjectId;

pub mod authenticate;
pub mod keystone;

/// `X-Instance-ID`: the instance the proxy speaks for.
pub const INSTANCE_ID_HEADER: &str = "x-instance-id";
/// `X-Tenant-ID`: the project the proxy says owns the instance.
pub const TENANT_ID_HEADER: &str = "x-tenant-id";
/// `X-Instance-ID-Signature`: lowercase hex HMAC-SHA256 of the instance id with the shared secret.
pub const SIGNATURE_HEADER: &str = "x-instance-id-signature";
/// `X-Auth-Token`: an owner or admin token.
pub const AUTH_TOKEN_HEADER: &str = "x-auth-token";

/// Why the proxy headers do not identify an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// A required header is absent.
    #[error("{0} header is missing from request.")]
    Missing(&'static str),
    /// A header appears more than once.
    #[error("Multiple {0} headers found within request.")]
    Duplicate(&'static str),
    /// A header value that is not visible ASCII text.
    #[error("{0} header is not valid text.")]
    NotText(&'static str),
    /// The signature does not match (or is not 64 lowercase hex digits).
    #[error("Invalid proxy request signature.")]
    BadSignature,
}

/// What the proxy headers claim, verified or not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyClaim {
    /// The `X-Instance-ID` value.
    pub instance_id: Option<String>,
    /// The `X-Tenant-ID` value.
    pub tenant_id: Option<String>,
}

/// Verifies the proxy's instance signatures with the shared secret.
pub struct ProxySigner {
    key: hmac::Key,
}

impl fmt::Debug for ProxySigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxySigner { .. }")
    }
}

/// The single value of header `name`: missing, repeated and non-text values are errors.
fn single<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
    display: &'static str,
) -> Result<Option<&'h str>, ProxyHeaderError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ProxyHeaderError::Duplicate(display));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| ProxyHeaderError::NotText(display))
}

impl ProxySigner {
    /// A signer for the shared secret (Nova's `metadata_proxy_shared_secret`).
    pub fn new(secret: &SecretString) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose_secret().as_bytes()),
        }
    }

    /// The signature the proxy sends for `instance_id` (for tests and the interop proxy).
    pub fn sign(&self, instance_id: &str) -> String {
        hex::encode(hmac::sign(&self.key, instance_id.as_bytes()).as_ref())
    }

    /// Reads and checks the proxy headers in Nova's order: a missing instance id, signature or
    /// tenant, then a repeated instance id or tenant, are 400s; then the signature (403).
    ///
    /// Returns the claim alongside the verdict so that refusals can be audited with what was
    /// claimed. The expected signature is never returned or logged.
    pub fn verify(&self, headers: &HeaderMap) -> (ProxyClaim, Result<(), ProxyHeaderError>) {
        let mut claim = ProxyClaim::default();
        let result = (|| {
            let instance = single(headers, INSTANCE_ID_HEADER, "X-Instance-ID");
            let signature = single(headers, SIGNATURE_HEADER, "X-Instance-ID-Signature");
            let tenant = single(headers, TENANT_ID_HEADER, "X-Tenant-ID");
            if let Ok(Some(i)) = instance {
                claim.instance_id = Some(i.to_owned());
            }
            if let Ok(Some(t)) = tenant {
                claim.tenant_id = Some(t.to_owned());
            }
            // Presence first, as Nova checks it.
            if matches!(instance, Ok(None)) {
                return Err(ProxyHeaderError::Missing("X-Instance-ID"));
            }
            if matches!(signature, Ok(None)) {
                return Err(ProxyHeaderError::Missing("X-Instance-ID-Signature"));
            }
            if matches!(tenant, Ok(None)) {
                return Err(ProxyHeaderError::Missing("X-Tenant-ID"));
            }
            let instance = instance?.unwrap_or_default();
            tenant?;
            let signature = signature?.unwrap_or_default();
            let tag = decode_lower_hex(signature).ok_or(ProxyHeaderError::BadSignature)?;
            hmac::verify(&self.key, instance.as_bytes(), &tag)
                .map_err(|_| ProxyHeaderError::BadSignature)
        })();
        (claim, result)
    }
}

/// Decodes exactly 64 lowercase hex digits; Nova compares lowercase hexdigests, so other spellings
/// of the right value are refused too.
fn decode_lower_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// What a verified client certificate says about its holder. The handshake has already checked
/// the chain to the client CA, validity and revocation; this only reads the names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the certificate (DER): what a token can be bound to.
    pub sha256: [u8; 32],
    /// The instance named by the certificate's one `urn:uuid:<id>` URI SAN, if it has exactly one.
    pub instance_id: Option<crate::ids::InstanceId>,
    /// The certificate's DNS SANs.
    pub dns_names: Vec<String>,
}

/// The URI SAN prefix that names an instance.
pub const INSTANCE_URI_PREFIX: &str = "urn:uuid:";

impl ClientCert {
    /// Reads a certificate; names that do not parse are simply absent.
    pub fn from_der(der: &[u8]) -> Self {
        let mut instance_ids = Vec::new();
        let mut dns_names = Vec::new();
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der)
            && let Ok(Some(san)) = cert.subject_alternative_name()
        {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(uri) => {
                        if let Some(id) = uri.strip_prefix(INSTANCE_URI_PREFIX)
                            && let Ok(id) = crate::ids::InstanceId::parse(id)
                        {
                            instance_ids.push(id);
                        }
                    }
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        dns_names.push((*dns).to_owned())
                    }
                    _ => {}
                }
            }
        }
        let d = digest::digest(&digest::SHA256, der);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(d.as_ref());
        Self {
            sha256,
            // Two instance names in one certificate name no one.
            instance_id: (instance_ids.len() == 1).then(|| instance_ids.remove(0)),
            dns_names,
        }
    }

    /// Whether this is the metadata proxy's certificate (one of its DNS SANs is in `names`).
    pub fn is_proxy(&self, names: &[String]) -> bool {
        self.instance_id.is_none()
            && self
                .dns_names
                .iter()
                .any(|d| names.iter().any(|n| n.eq_ignore_ascii_case(d)))
    }
}

/// A role a token grants: Keystone's default roles, in the order of their implications
/// (`admin` implies `manager` implies `member` implies `reader`, as `keystone-manage bootstrap`
/// creates them), so a role holds every role below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May read what belongs to its project.
    Reader,
    /// May read and change what belongs to its project.
    Member,
    /// A project's manager (Keystone's `manager`): everything a member may, and more where a
    /// policy says so.
    Manager,
    /// May do anything to any instance.
    Admin,
}

impl Role {
    /// The role's name as written in token and policy files and in Keystone.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Member => "member",
            Role::Manager => "manager",
            Role::Admin => "admin",
        }
    }

    /// The role called `name` in Keystone (case as Keystone stores it), if it is one of these.
    pub fn from_name(name: &str) -> Option<Self> {
        [Role::Reader, Role::Member, Role::Manager, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == name)
    }

    /// Whether holding `self` gives `required` (the implications above).
    pub fn implies(self, required: Role) -> bool {
        self >= required
    }
}

/// Whether any of `held` gives `required`.
pub fn holds(held: &[Role], required: Role) -> bool {
    held.iter().any(|r| r.implies(required))
}

/// Which backend authenticated a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenBackend {
    /// The static token file (development, service accounts).
    File,
    /// Keystone.
    Keystone,
}

/// An owner or admin authenticated by `X-Auth-Token`, whichever backend vouched for it.
#[derive(Debug, Clone)]
pub struct TokenCaller {
    /// Who vouched.
    pub backend: TokenBackend,
    /// The token file's label, or the Keystone user's name (never the token).
    pub name: String,
    /// The Keystone user's id (`None` for the token file).
    pub user_id: Option<String>,
    /// The project the token acts for.
    pub project: ProjectId,
    /// The roles policy understands.
    pub roles: Vec<Role>,
    /// Every role name the token carries, for the audit event.
    pub role_names: Vec<std::borrow::Cow<'static, str>>,
}

impl TokenCaller {
    /// A caller from a token-file entry.
    pub fn from_file(entry: &TokenEntry) -> Self {
        Self {
            backend: TokenBackend::File,
            name: entry.label.clone(),
            user_id: None,
            project: entry.project.clone(),
            roles: entry.roles.clone(),
            role_names: entry.roles.iter().map(|r| r.as_str().into()).collect(),
        }
    }

    /// A caller from a validated Keystone token.
    pub fn from_keystone(identity: &keystone::KeystoneIdentity) -> Self {
        let mut roles: Vec<Role> = identity
            .roles
            .iter()
            .filter_map(|r| Role::from_name(r))
            .collect();
        roles.sort();
        roles.dedup();
        Self {
            backend: TokenBackend::Keystone,
            name: identity.user_name.clone(),
            user_id: Some(identity.user_id.clone()),
            project: identity.project_id.clone(),
            roles,
            role_names: identity.roles.iter().map(|r| r.clone().into()).collect(),
        }
    }

    /// Whether the caller is an administrator (every project).
    pub fn is_admin(&self) -> bool {
        holds(&self.roles, Role::Admin)
    }
}

/// One token: held only as its SHA-256 hash.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    /// A label for logs and audit events (never the token).
    pub label: String,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// The token's project.
    pub project: ProjectId,
    /// The token's roles.
    pub roles: Vec<Role>,
    /// If set, the token is only valid on a connection presenting the client certificate with
    /// this SHA-256 (of its DER).
    pub client_cert_sha256: Option<[u8; 32]>,
}

/// The tokens metapass accepts.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    entries: Vec<TokenEntry>,
}

/// The SHA-256 hash under which a token is stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenTable {
    /// A table of `entries`.
    pub fn new(entries: Vec<TokenEntry>) -> Self {
        Self { entries }
    }

    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds the entry for a presented token. Every entry is compared, in constant time, whether
    /// or not an earlier one matched, so timing does not tell how much of a hash was right or
    /// where in the file a token is.
    pub fn lookup(&self, presented: &SecretString) -> Option<&TokenEntry> {
        let hash = token_hash(presented.expose_secret());
        let mut found = 0u32;
        for (i, entry) in self.entries.iter().enumerate() {
            let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
            found = u32::conditional_select(&found, &index, entry.sha256.ct_eq(&hash));
        }
        let found = usize::try_from(found).ok()?;
        found.checked_sub(1).and_then(|i| self.entries.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const ID: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";

    fn signer() -> ProxySigner {
        ProxySigner::new(&SecretString::from("dev-metadata-proxy-secret"))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_good_signature_verifies() {
        let s = signer();
        let sig = s.sign(ID);
        let (claim, result) = s.verify(&headers(&[
            (INSTANCE_ID_HEADER, ID),
            (TENANT_ID_HEADER, "project-a"),
            (SIGNATURE_HEADER, &sig),
        ]));
        assert_eq!(result, Ok(()));
        assert_eq!(claim.instance_id.as_deref(), Some(ID));
        assert_eq!(claim.tenant_id.as_deref(), Some("project-a"));
    }

    #[test]
    fn known_signature_vector() {
        // HMAC-SHA256(key="dev-metadata-proxy-secret", msg=ID), computed independently with
        // Python's hmac module (as Nova and Neutron compute it). Must never change, or deployed
        // proxies stop working.
        assert_eq!(
            signer().sign(ID),
            "67d0e580d5ea5d494966499137d27ce1ae21ec79dbc9b89880fde2da5df9237f"
        );
    }

    #[test]
    fn refusals_follow_novas_order() {
        let s = signer();
        let sig = s.sign(ID);
        let check = |pairs: &[(&'static str, &str)]| s.verify(&headers(pairs)).1;
        assert_eq!(
            check(&[(TENANT_ID_HEADER, "p"), (SIGNATURE_HEADER, &sig)]),
            Err(ProxyHeaderError::Missing("X-Instance-ID"))
        );
        assert_eq!(
            check(&[(INSTANCE_ID_HEADER, ID), (TENANT_ID_HEADER, "p")]),
            Err(ProxyHeaderError::Missing("X-Instance-ID-Signature"))
        );
        assert_eq!(
            check(&[(INSTANCE_ID_HEADER, ID), (SIGNATURE_HEADER, &sig)]),
            Err(ProxyHeaderError::Missing("X-Tenant-ID"))
        );
        assert_eq!(
            check(&[
                (INSTANCE_ID_HEADER, ID),
                (INSTANCE_ID_HEADER, ID),
                (TENANT_ID_HEADER, "p"),
                (SIGNATURE_HEADER, &sig)
            ]),
            Err(ProxyHeaderError::Duplicate("X-Instance-ID"))
        );
        for bad in [
            sig.to_uppercase(),
            sig[..63].to_owned(),
            format!("{sig}0"),
            s.sign("other"),
        ] {
            assert_eq!(
                check(&[
                    (INSTANCE_ID_HEADER, ID),
                    (TENANT_ID_HEADER, "p"),
                    (SIGNATURE_HEADER, &bad)
                ]),
                Err(ProxyHeaderError::BadSignature),
                "{bad}"
            );
        }
    }

    #[test]
    fn client_certificates_name_instances_and_proxies() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/certs-dev");
        let der = |name: &str| {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_file(format!("{dir}/{name}.pem"))
                .unwrap()
                .to_vec()
        };
        let instance = ClientCert::from_der(&der("instance-1"));
        assert_eq!(
            instance.instance_id.as_ref().map(|i| i.as_str()),
            Some(crate::devcerts::DEV_INSTANCE_1)
        );
        assert!(!instance.is_proxy(&["metadata-proxy.dev.invalid".into()]));
        let proxy = ClientCert::from_der(&der("proxy"));
        assert_eq!(proxy.instance_id, None);
        assert!(proxy.is_proxy(&["Metadata-Proxy.dev.invalid".into()]));
        assert!(!proxy.is_proxy(&["other.invalid".into()]));
        let server = ClientCert::from_der(&der("server"));
        assert_eq!(
            (server.instance_id, server.dns_names),
            (None, vec!["localhost".to_owned()])
        );
        assert_ne!(instance.sha256, proxy.sha256);
        let junk = ClientCert::from_der(b"not a certificate");
        assert_eq!((junk.instance_id, junk.dns_names.len()), (None, 0));
    }

    #[test]
    fn token_lookup_finds_only_exact_tokens() {
        let entry = |label: &str, token: &str| TokenEntry {
            label: label.into(),
            sha256: token_hash(token),
            project: ProjectId::parse("project-a").unwrap(),
            roles: vec![Role::Reader],
            client_cert_sha256: None,
        };
        let table = TokenTable::new(vec![entry("a", "token-a"), entry("b", "token-b")]);
        let find = |t: &str| {
            table
                .lookup(&SecretString::from(t))
                .map(|e| e.label.clone())
        };
        assert_eq!(find("token-a").as_deref(), Some("a"));
        assert_eq!(find("token-b").as_deref(), Some("b"));
        assert_eq!(find("token-c"), None);
        assert_eq!(find(""), None);
        assert_eq!(find("token-a "), None);
    }
}
