//! The audit event: what handlers record about a request, and its OCSF 1.3.0 "API Activity" form.
//!
//! Handlers fill [`Facts`] as the request moves along (who called, what they asked, which rule
//! decided, why it ended); [`encode`] turns the facts and the final HTTP status into one JSON line.
//! Nothing secret is ever a fact: tokens, certificates and password blobs appear only as keyed
//! fingerprints (see [`super::AuditKeys::fingerprint`]).
//!
//! The line is produced *open*: it ends inside the `metadata` object, which is serialized last, so
//! that the writer can append `metadata.sequence`, the chain fields and the MAC without parsing it
//! again (see [`super::chain`]).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use crate::ids::RequestId;

/// The OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.4.0";
/// metapass's own version of the event layout (the `unmapped.schema` field).
pub const SCHEMA: &str = "metapass.audit/1";
pub use crate::text::{MAX_TEXT, bounded};

/// The most of the path and user agent kept in the event of an unauthenticated caller that was
/// refused: such clients choose those strings and how often they are refused, so their events
/// stay small (about a kilobyte).
pub const MAX_ANONYMOUS_TEXT: usize = 64;

/// `s` cut to `max` bytes on a character boundary (no marker: the cut is documented).
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// How a request ended, in the terms a reviewer filters by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done as asked.
    Success,
    /// Refused because of who is asking or how often: authentication, authorization, rate limits.
    Denied,
    /// Refused because of what was asked: bad input, no such thing, conflicting state.
    Failure,
    /// metapass could not do it: storage, audit or integrity failures, internal errors.
    Error,
}

impl Outcome {
    /// The snake_case name written in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Failure => "failure",
            Outcome::Error => "error",
        }
    }
}

/// Declares [`Reason`] with each code written once: the enum, its code as events carry it
/// ([`Reason::as_str`], also its JSON form) and the list of all of them ([`Reason::ALL`]).
macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, )*) => {
        /// Why a request ended as it did: a stable, documented code (see `SECURITY.md`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Reason {
            $( $(#[$doc])* $variant, )*
        }

        impl Reason {
            /// Every reason, in the order declared.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];

            /// The snake_case code, as written in events.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }
        }
    };
}

reasons! {
    /// Success.
    Ok = "ok",
    /// A malformed request not covered by a more specific code.
    BadRequest = "bad_request",
    /// HTTP that could not be parsed (request line, header syntax); hyper answered 400.
    MalformedRequest = "malformed_request",
    /// A request head (line plus headers) over the size or count limits; hyper answered 431.
    HeadTooLarge = "head_too_large",
    /// A required header is absent.
    MissingHeader = "missing_header",
    /// A header that must appear once appears more than once.
    DuplicateHeader = "duplicate_header",
    /// A header value that is not valid (not text, not an address, ...).
    InvalidHeader = "invalid_header",
    /// No such route, version or resource.
    NotFound = "not_found",
    /// The instance is not registered.
    UnknownInstance = "unknown_instance",
    /// A method the route does not support.
    MethodNotAllowed = "method_not_allowed",
    /// The body is longer than the route allows.
    BodyTooLarge = "body_too_large",
    /// The body is not acceptable (encoding, control characters, JSON shape).
    BodyInvalid = "body_invalid",
    /// The body is empty where content is required.
    BodyEmpty = "body_empty",
    /// The body did not arrive in time.
    BodyTimeout = "body_timeout",
    /// The request conflicts with the current state (password already set, owned elsewhere).
    Conflict = "conflict",
    /// The instance signature does not match.
    BadSignature = "bad_signature",
    /// The claimed tenant does not own the instance.
    TenantMismatch = "tenant_mismatch",
    /// No credentials, or unknown credentials.
    Unauthenticated = "unauthenticated",
    /// Authenticated, but the policy denies the action.
    Forbidden = "forbidden",
    /// The target belongs to another project (answered exactly like a missing one).
    NotOwner = "not_owner",
    /// Signed proxy headers without the metadata proxy's client certificate (`mtls+signature`).
    ProxyCertificateRequired = "proxy_certificate_required",
    /// A rate limit was hit.
    RateLimited = "rate_limited",
    /// A stored record failed authentication: tampered, swapped, missing or foreign chunks.
    Integrity = "integrity",
    /// The store could not be reached or failed.
    StoreUnavailable = "store_unavailable",
    /// Keystone could not validate a token (unreachable, failing, or refusing metapass's own
    /// credentials); nothing was released.
    IdentityUnavailable = "identity_unavailable",
    /// A correctly identified instance that the registry does not know yet (its create
    /// notification is still on its way); nothing was revealed or stored.
    NotYetRegistered = "not_yet_registered",
    /// The audit log could not record the event; nothing was released or changed.
    AuditUnavailable = "audit_unavailable",
    /// The store refused to commit after the event was recorded; this event corrects that one.
    CommitFailed = "commit_failed",
    /// A readiness check found the service not ready.
    NotReady = "not_ready",
    /// A certificate reload failed; the previous certificate is still served.
    CertificateReloadFailed = "certificate_reload_failed",
    /// The active data key has sealed its limit; nothing was sealed until keys are rotated.
    KeyExhausted = "key_exhausted",
    /// A keyring was refused (a secret differs from the one that sealed records, or a key that
    /// records still need is missing); the keys in use stay.
    KeyringRefused = "keyring_refused",
    /// The audit file being written was deleted or replaced behind the writer's back; the events
    /// it held are no longer in the log directory (the writer's own incident event).
    AuditFileLost = "audit_file_lost",
    /// An unexpected internal error.
    Internal = "internal",
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl Reason {
    /// The outcome class of this reason.
    pub fn outcome(self) -> Outcome {
        use Reason::*;
        match self {
            Ok => Outcome::Success,
            BadSignature
            | TenantMismatch
            | Unauthenticated
            | Forbidden
            | NotOwner
            | RateLimited
            | ProxyCertificateRequired => Outcome::Denied,
            BadRequest | MalformedRequest | HeadTooLarge | MissingHeader | DuplicateHeader
            | InvalidHeader | NotFound | UnknownInstance | MethodNotAllowed | BodyTooLarge
            | BodyInvalid | BodyEmpty | BodyTimeout | Conflict | NotYetRegistered => {
                Outcome::Failure
            }
            Integrity
            | StoreUnavailable
            | IdentityUnavailable
            | AuditUnavailable
            | CommitFailed
            | NotReady
            | CertificateReloadFailed
            | KeyExhausted
            | KeyringRefused
            | AuditFileLost
            | Internal => Outcome::Error,
        }
    }

    fn severity(self) -> (u8, &'static str) {
        match (self, self.outcome()) {
            (Reason::Integrity | Reason::AuditFileLost, _) => (5, "Critical"),
            (_, Outcome::Success) => (1, "Informational"),
            (_, Outcome::Failure) => (2, "Low"),
            (_, Outcome::Denied) => (3, "Medium"),
            (_, Outcome::Error) => (4, "High"),
        }
    }
}

/// The OCSF API Activity activity of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Create (POST a password, register an instance).
    Create,
    /// Read.
    Read,
    /// Update.
    Update,
    /// Delete (clear a password, delete an instance).
    Delete,
    /// Unknown (no route matched).
    Unknown,
}

impl Activity {
    fn id_and_name(self) -> (u8, &'static str) {
        match self {
            Activity::Create => (1, "Create"),
            Activity::Read => (2, "Read"),
            Activity::Update => (3, "Update"),
            Activity::Delete => (4, "Delete"),
            Activity::Unknown => (0, "Unknown"),
        }
    }

    /// OCSF's `type_name` of an API Activity event of this activity.
    fn type_name(self) -> &'static str {
        match self {
            Activity::Create => "API Activity: Create",
            Activity::Read => "API Activity: Read",
            Activity::Update => "API Activity: Update",
            Activity::Delete => "API Activity: Delete",
            Activity::Unknown => "API Activity: Unknown",
        }
    }
}

/// Who is calling, as far as the request got in finding out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerKind {
    /// Not (yet, or not successfully) authenticated.
    Anonymous,
    /// A guest instance.
    Instance,
    /// A project member or reader with a token.
    Owner,
    /// An operator with the admin role.
    Admin,
    /// metapass itself (certificate reloads and other events without a request).
    System,
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// No proof (yet).
    None,
    /// The metadata proxy's signed `X-Instance-ID` headers.
    ProxySignature,
    /// A client certificate.
    ClientCertificate,
    /// An `X-Auth-Token` from the token file.
    Token,
    /// An `X-Auth-Token` that Keystone validated.
    KeystoneToken,
}

/// The caller facts of an event.
#[derive(Debug, Clone)]
pub struct Caller {
    /// What kind of caller.
    pub kind: CallerKind,
    /// How it authenticated.
    pub auth: AuthMethod,
    /// The verified instance id (instances only).
    pub instance_id: Option<String>,
    /// The caller's project.
    pub project_id: Option<String>,
    /// The token's label from the token file, or the Keystone user's name (never the token).
    pub name: Option<String>,
    /// The Keystone user's id.
    pub user_id: Option<String>,
    /// A keyed fingerprint of the credential (token), `hmac-sha256:<hex>`.
    pub credential_fingerprint: Option<String>,
    /// The caller's roles (a Keystone token's role names, implied roles included).
    pub roles: Vec<std::borrow::Cow<'static, str>>,
    /// An unverified claimed identity (e.g. the instance id of a request with a bad signature).
    pub claimed_instance: Option<String>,
    /// An unverified claimed tenant.
    pub claimed_tenant: Option<String>,
}

impl Caller {
    /// An unauthenticated caller.
    pub fn anonymous() -> Self {
        Self {
            kind: CallerKind::Anonymous,
            auth: AuthMethod::None,
            instance_id: None,
            project_id: None,
            name: None,
            user_id: None,
            credential_fingerprint: None,
            roles: Vec::new(),
            claimed_instance: None,
            claimed_tenant: None,
        }
    }
}

pub use crate::surface::Surface;

/// A policy decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Whether the rule allowed the action.
    pub allowed: bool,
    /// The action's policy name (`password:get`).
    pub action: &'static str,
    /// The rule that decided, as written in the policy.
    pub rule: String,
}

/// Everything an event records about one request.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The request id, also sent as `X-Request-Id`.
    pub request_id: RequestId,
    /// When the request arrived (wall clock).
    pub received_at: OffsetDateTime,
    /// When the request arrived (monotonic, for latency).
    pub started: Instant,
    /// The TCP peer (or the source a trusted proxy's PROXY header named).
    pub peer: SocketAddr,
    /// The load balancer that sent a PROXY header, if one did.
    pub proxied_by: Option<SocketAddr>,
    /// The client: the peer, or the address a trusted proxy's forwarding header named.
    pub client: IpAddr,
    /// The addresses a trusted proxy's forwarding header named, remotest first.
    pub forwarded_for: Vec<IpAddr>,
    /// What became of the forwarding headers.
    pub forwarded: crate::forwarded::Verdict,
    /// A forwarding header as received, when it was ignored or not well-formed (cut to
    /// [`MAX_TEXT`]).
    pub forwarded_for_raw: Option<String>,
    /// The listener the request arrived on.
    pub listener: String,
    /// A keyed fingerprint of the client certificate presented, if any.
    pub client_certificate: Option<String>,
    /// The negotiated TLS version.
    pub tls_version: Option<&'static str>,
    /// The HTTP version.
    pub http_version: &'static str,
    /// The request method (cut to [`MAX_TEXT`]).
    pub method: String,
    /// The request path without the query (cut to [`MAX_TEXT`]).
    pub path: String,
    /// The `User-Agent` (cut to [`MAX_TEXT`]).
    pub user_agent: Option<String>,
    /// The API surface.
    pub surface: Surface,
    /// The operation name (`password:get`, ...), `unknown` before routing.
    pub operation: &'static str,
    /// The OCSF activity.
    pub activity: Activity,
    /// Who called.
    pub caller: Caller,
    /// The target instance.
    pub target_instance: Option<String>,
    /// The target instance's project.
    pub target_project: Option<String>,
    /// The policy decision, if one was made.
    pub decision: Option<Decision>,
    /// Why the request ended.
    pub reason: Reason,
    /// A short human-readable detail (the error message sent; never a secret).
    pub detail: Option<String>,
    /// Request body bytes the handler read.
    pub body_bytes: usize,
    /// A keyed fingerprint of the stored or posted secret, for correlation.
    pub secret_fingerprint: Option<String>,
    /// The sealed record version involved.
    pub record_version: Option<u64>,
    /// Set on a correction event: the store did not commit what the earlier event recorded.
    pub corrects_earlier_event: bool,
    /// The data key involved: the one a record is sealed under now, or the active key.
    pub key_id: Option<u32>,
    /// The data key before: the one a rewrapped record was sealed under, or the previous active key.
    pub previous_key_id: Option<u32>,
    /// Every data key held after a keyring load.
    pub key_ids: Vec<u32>,
    /// For a `rate_limit:aggregate` event: the refusals it counts.
    pub aggregate: Option<Aggregate>,
    /// For an `audit:checkpoint` event: what it signs.
    pub checkpoint: Option<Checkpoint>,
}

/// A signed checkpoint over the log's lines (see [`super::checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// The first sequence number the digest covers (the previous checkpoint's own line, so that
    /// checkpoints link; or the first line of the log).
    pub from_sequence: u64,
    /// The last sequence number it covers (the line before the checkpoint).
    pub through_sequence: u64,
    /// `sha256:<hex>` of the covered lines' bytes, newlines included.
    pub digest: String,
    /// `ed25519:<hex>` signature of the checkpoint message.
    pub signature: String,
}

/// The refusals an aggregate event stands for (see [`super::aggregate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// How many requests were refused.
    pub count: u64,
    /// The first of their request ids (each was sent as its answer's `X-Request-Id`).
    pub request_ids: Vec<String>,
}

impl Facts {
    /// Facts for something metapass did by itself (a certificate reload): no peer, caller
    /// `System`.
    pub fn system(operation: &'static str, activity: Activity) -> Self {
        let mut facts = Self::new(SocketAddr::from(([0, 0, 0, 0], 0)), None);
        facts.surface = Surface::Ops;
        facts.operation = operation;
        facts.activity = activity;
        facts.caller.kind = CallerKind::System;
        facts.method = "-".into();
        facts.path = "-".into();
        facts
    }

    /// Facts for a request that just arrived, on the system clock.
    pub fn new(peer: SocketAddr, tls_version: Option<&'static str>) -> Self {
        Self::arrived(peer, tls_version, &crate::clock::Clock::system())
    }

    /// Facts for a request that arrived now on `clock`.
    pub fn arrived(
        peer: SocketAddr,
        tls_version: Option<&'static str>,
        clock: &crate::clock::Clock,
    ) -> Self {
        Self {
            request_id: RequestId::new(),
            received_at: clock.now_utc(),
            started: clock.now(),
            peer,
            proxied_by: None,
            client: peer.ip(),
            forwarded_for: Vec::new(),
            forwarded: crate::forwarded::Verdict::None,
            forwarded_for_raw: None,
            listener: String::new(),
            client_certificate: None,
            tls_version,
            http_version: "HTTP/1.1",
            method: String::new(),
            path: String::new(),
            user_agent: None,
            surface: Surface::Unknown,
            operation: "unknown",
            activity: Activity::Unknown,
            caller: Caller::anonymous(),
            target_instance: None,
            target_project: None,
            decision: None,
            reason: Reason::Ok,
            detail: None,
            body_bytes: 0,
            secret_fingerprint: None,
            record_version: None,
            corrects_earlier_event: false,
            key_id: None,
            previous_key_id: None,
            key_ids: Vec::new(),
            aggregate: None,
            checkpoint: None,
        }
    }
}

/// An HTTP status as OCSF's `status_code` string, written without a `String` of its own.
struct StatusText(u16);

impl Serialize for StatusText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(itoa::Buffer::new().format(self.0))
    }
}

/// The event's `message`: "<operation> <outcome>", then ": <detail>" when there is one. Built by
/// appending: `format!` was a visible share of an event's encoding.
fn message(operation: &str, outcome: Outcome, detail: Option<&str>) -> String {
    let outcome = outcome.as_str();
    let mut message = String::with_capacity(
        operation.len() + 1 + outcome.len() + detail.map_or(0, |d| d.len() + 2),
    );
    message.push_str(operation);
    message.push(' ');
    message.push_str(outcome);
    if let Some(detail) = detail {
        message.push_str(": ");
        message.push_str(detail);
    }
    message
}

#[derive(Serialize)]
struct Event<'a> {
    activity_id: u8,
    activity_name: &'static str,
    category_uid: u8,
    category_name: &'static str,
    class_uid: u16,
    class_name: &'static str,
    type_uid: u32,
    type_name: &'static str,
    severity_id: u8,
    severity: &'static str,
    time: i64,
    time_dt: String,
    duration: u64,
    status_id: u8,
    status: &'static str,
    status_code: StatusText,
    status_detail: &'static str,
    message: String,
    actor: Actor<'a>,
    api: Api<'a>,
    cloud: Cloud,
    src_endpoint: Endpoint,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_request: Option<HttpRequest<'a>>,
    http_response: HttpResponse,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    resources: Vec<Resource<'a>>,
}

#[derive(Serialize)]
struct Actor<'a> {
    /// metapass itself, for system events.
    #[serde(skip_serializing_if = "Option::is_none")]
    app_name: Option<&'static str>,
    user: User<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    authorizations: Vec<Authorization<'a>>,
}

#[derive(Serialize)]
struct User<'a> {
    type_id: u8,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<Account<'a>>,
}

#[derive(Serialize)]
struct Account<'a> {
    uid: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    type_id: u8,
}

fn project_account(uid: &str) -> Account<'_> {
    Account {
        uid,
        kind: "OpenStack Project",
        type_id: 99,
    }
}

#[derive(Serialize)]
struct Authorization<'a> {
    decision: &'static str,
    policy: Policy<'a>,
}

#[derive(Serialize)]
struct Policy<'a> {
    name: &'static str,
    desc: &'a str,
}

#[derive(Serialize)]
struct Api<'a> {
    operation: &'static str,
    request: ApiRequest<'a>,
    response: ApiResponse,
    service: Service,
}

#[derive(Serialize)]
struct ApiRequest<'a> {
    uid: &'a str,
}

#[derive(Serialize)]
struct ApiResponse {
    code: u16,
}

#[derive(Serialize)]
struct Service {
    name: &'static str,
}

#[derive(Serialize)]
struct Cloud {
    provider: &'static str,
}

#[derive(Serialize)]
struct Endpoint {
    /// The client address; none for a system event (it has no peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<IpAddr>,
    /// This host, for a system event.
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    intermediate_ips: Vec<IpAddr>,
}

#[derive(Serialize)]
struct HttpRequest<'a> {
    /// One of the methods OCSF enumerates; another method (or none, for a request that did
    /// not parse) is left out here and kept as received in `unmapped.http_method`.
    #[serde(skip_serializing_if = "Option::is_none")]
    http_method: Option<&'a str>,
    url: Url<'a>,
    version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "<[IpAddr]>::is_empty")]
    x_forwarded_for: &'a [IpAddr],
}

#[derive(Serialize)]
struct Url<'a> {
    path: &'a str,
    scheme: &'static str,
}

#[derive(Serialize)]
struct HttpResponse {
    code: u16,
    latency: u64,
}

#[derive(Serialize)]
struct Resource<'a> {
    uid: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<Owner<'a>>,
}

#[derive(Serialize)]
struct Owner<'a> {
    account: Account<'a>,
}

#[derive(Serialize)]
struct Unmapped<'a> {
    schema: &'static str,
    outcome: Outcome,
    reason: Reason,
    surface: Surface,
    caller_kind: CallerKind,
    auth: AuthMethod,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    roles: &'a [std::borrow::Cow<'static, str>],
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    claimed_instance: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    claimed_tenant: Option<&'a str>,
    forwarded: crate::forwarded::Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarded_for_raw: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    listener: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_certificate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_version: Option<&'static str>,
    latency_us: u64,
    body_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_fingerprint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_version: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    corrects_earlier_event: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_key_id: Option<u32>,
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    key_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregated_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregated_request_ids: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<&'a Checkpoint>,
    /// A request method OCSF does not enumerate, as received (cut).
    #[serde(skip_serializing_if = "Option::is_none")]
    http_method: Option<&'a str>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    product: Product,
    version: &'static str,
    uid: &'a str,
    log_name: &'static str,
    profiles: [&'static str; 2],
}

#[derive(Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

fn service_name(surface: Surface) -> &'static str {
    match surface {
        Surface::Instance => "metapass.instance",
        Surface::Compute => "metapass.compute",
        Surface::Admin => "metapass.admin",
        Surface::Ops => "metapass.ops",
        Surface::Unknown => "metapass",
    }
}

fn user_type(kind: CallerKind) -> (u8, &'static str) {
    match kind {
        CallerKind::Anonymous => (0, "Unknown"),
        CallerKind::Owner => (1, "User"),
        CallerKind::Admin => (2, "Admin"),
        CallerKind::System => (3, "System"),
        CallerKind::Instance => (99, "Instance"),
    }
}

/// The method as OCSF 1.4.0's `http_method` enumerates it, if it is one of those.
fn ocsf_method(method: &str) -> Option<&str> {
    const METHODS: [&str; 8] = [
        "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT", "TRACE",
    ];
    METHODS.contains(&method).then_some(method)
}

/// This host's name (for system events' `src_endpoint`), read once.
fn host_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes `facts` and the answered `status` as an open event line (see the module docs).
///
/// Long on purpose: the order of the writes is the order of the members on the line, which the
/// golden vectors pin; one function lets the layout be read top to bottom.
pub fn encode(facts: &Facts, status: u16, latency: Duration) -> Vec<u8> {
    let (activity_id, activity_name) = facts.activity.id_and_name();
    let outcome = facts.reason.outcome();
    let (severity_id, severity) = facts.reason.severity();
    let (status_id, status_name) = match outcome {
        Outcome::Success => (1, "Success"),
        _ => (2, "Failure"),
    };
    let (type_id, type_name) = user_type(facts.caller.kind);
    let caller = &facts.caller;
    let system = caller.kind == CallerKind::System;
    // Refused before anyone was authenticated: the client chose the text and the rate.
    let small = caller.kind == CallerKind::Anonymous && facts.reason != Reason::Ok;
    let uid = caller
        .instance_id
        .as_deref()
        .or(caller.user_id.as_deref())
        .or(caller.credential_fingerprint.as_deref());
    let time_ms = facts.received_at.unix_timestamp_nanos() / 1_000_000;
    let time_dt = facts
        .received_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let authorizations = facts
        .decision
        .iter()
        .map(|d| Authorization {
            decision: if d.allowed { "allowed" } else { "denied" },
            policy: Policy {
                name: d.action,
                desc: &d.rule,
            },
        })
        .collect();
    let resources = facts
        .target_instance
        .as_deref()
        .map(|uid| Resource {
            uid,
            kind: "OpenStack::Nova::Server",
            owner: facts.target_project.as_deref().map(|p| Owner {
                account: project_account(p),
            }),
        })
        .into_iter()
        .collect();
    let message = message(facts.operation, outcome, facts.detail.as_deref());

    let event = Event {
        activity_id,
        activity_name,
        category_uid: 6,
        category_name: "Application Activity",
        class_uid: 6003,
        class_name: "API Activity",
        type_uid: 600_300 + u32::from(activity_id),
        type_name: facts.activity.type_name(),
        severity_id,
        severity,
        time: i64::try_from(time_ms).unwrap_or(i64::MAX),
        time_dt,
        duration: millis(latency),
        status_id,
        status: status_name,
        status_code: StatusText(status),
        status_detail: reason_str(facts.reason),
        message,
        actor: Actor {
            app_name: system.then_some(crate::PRODUCT_NAME),
            user: User {
                type_id,
                kind: type_name,
                uid,
                // OCSF's user needs a uid, a name or an account.
                name: caller.name.as_deref().or(match caller.kind {
                    CallerKind::System => Some(crate::PRODUCT_NAME),
                    _ if uid.is_none() && caller.project_id.is_none() => Some("anonymous"),
                    _ => None,
                }),
                credential_uid: caller.credential_fingerprint.as_deref(),
                account: caller.project_id.as_deref().map(project_account),
            },
            authorizations,
        },
        api: Api {
            operation: facts.operation,
            request: ApiRequest {
                uid: facts.request_id.as_str(),
            },
            response: ApiResponse { code: status },
            service: Service {
                name: service_name(facts.surface),
            },
        },
        cloud: Cloud {
            provider: "OpenStack",
        },
        src_endpoint: {
            // The client; the peer it came through (and a PROXY-protocol load balancer) are
            // intermediaries.
            let direct = facts.client == facts.peer.ip();
            let mut intermediate_ips = Vec::new();
            if !direct {
                intermediate_ips.push(facts.peer.ip());
            }
            intermediate_ips.extend(facts.proxied_by.map(|p| p.ip()));
            Endpoint {
                ip: (!system).then_some(facts.client),
                hostname: system.then(host_name),
                // A system event has no peer: its placeholder port 0 is left out.
                port: (direct && facts.peer.port() != 0).then_some(facts.peer.port()),
                intermediate_ips,
            }
        },
        // metapass's own actions are no HTTP request.
        http_request: (!system).then(|| HttpRequest {
            http_method: ocsf_method(&facts.method),
            url: Url {
                path: if small {
                    cut(&facts.path, MAX_ANONYMOUS_TEXT)
                } else {
                    &facts.path
                },
                scheme: if facts.tls_version.is_some() {
                    "https"
                } else {
                    "http"
                },
            },
            version: facts.http_version,
            user_agent: facts.user_agent.as_deref().map(|ua| {
                if small {
                    cut(ua, MAX_ANONYMOUS_TEXT)
                } else {
                    ua
                }
            }),
            x_forwarded_for: &facts.forwarded_for,
        }),
        http_response: HttpResponse {
            code: status,
            latency: millis(latency),
        },
        resources,
    };
    let unmapped = Unmapped {
        schema: SCHEMA,
        outcome,
        reason: facts.reason,
        surface: facts.surface,
        caller_kind: caller.kind,
        auth: caller.auth,
        roles: &caller.roles,
        policy_rule: facts.decision.as_ref().map(|d| d.rule.as_str()),
        claimed_instance: caller.claimed_instance.as_deref(),
        claimed_tenant: caller.claimed_tenant.as_deref(),
        forwarded: facts.forwarded,
        forwarded_for_raw: facts.forwarded_for_raw.as_deref(),
        listener: &facts.listener,
        client_certificate: facts.client_certificate.as_deref(),
        tls_version: facts.tls_version,
        latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        body_bytes: facts.body_bytes,
        secret_fingerprint: facts.secret_fingerprint.as_deref(),
        record_version: facts.record_version,
        corrects_earlier_event: facts.corrects_earlier_event,
        key_id: facts.key_id,
        previous_key_id: facts.previous_key_id,
        key_ids: &facts.key_ids,
        aggregated_count: facts.aggregate.as_ref().map(|a| a.count),
        aggregated_request_ids: facts.aggregate.as_ref().map(|a| a.request_ids.as_slice()),
        checkpoint: facts.checkpoint.as_ref(),
        http_method: (!system && !facts.method.is_empty() && ocsf_method(&facts.method).is_none())
            .then_some(facts.method.as_str()),
    };
    let metadata = Metadata {
        product: Product {
            name: crate::PRODUCT_NAME,
            vendor_name: crate::PRODUCT_NAME,
            version: crate::PRODUCT_VERSION,
        },
        version: OCSF_VERSION,
        uid: facts.request_id.as_str(),
        log_name: "audit",
        profiles: ["cloud", "datetime"],
    };
    open_line(&event, &metadata, &unmapped)
}

/// The byte between an open line's head and its `unmapped` members (see [`open_line`]). JSON
/// text never holds it raw: serde escapes control characters inside strings.
pub(crate) const UNMAPPED_SEPARATOR: u8 = 0x1e;

/// An open event line for the writer: `{...event members...,"metadata":{...metadata members...`,
/// then [`UNMAPPED_SEPARATOR`], then `{...unmapped members...` (both objects left open). The
/// writer closes metadata with the sequence number and puts the chain fields last in `unmapped`
/// (see [`super::chain`]), where OCSF allows attributes of one's own.
pub(crate) fn open_line(
    event: &impl Serialize,
    metadata: &impl Serialize,
    unmapped: &impl Serialize,
) -> Vec<u8> {
    // One buffer, sized for a typical event with its chain fields (about 2.1 KB), that each
    // object is serialized into in turn: three growing buffers and their copies cost more than
    // the JSON itself.
    let mut line = Vec::with_capacity(OPEN_LINE_CAPACITY);
    append_open(&mut line, event);
    line.extend_from_slice(b",\"metadata\":");
    append_open(&mut line, metadata);
    line.push(UNMAPPED_SEPARATOR);
    append_open(&mut line, unmapped);
    line
}

/// What [`open_line`] reserves: a read's event and the writer's additions fit.
const OPEN_LINE_CAPACITY: usize = 2560;

/// Serializes `value` (a JSON object) into `line`, leaving the object open (no closing brace).
fn append_open(line: &mut Vec<u8>, value: &impl Serialize) {
    let start = line.len();
    // Serializing plain structs of strings and numbers into a Vec cannot fail.
    serde_json::to_writer(&mut *line, value).expect("event part serializes");
    debug_assert!(line.len() >= start + 2 && line[start] == b'{' && line.ends_with(b"}"));
    line.pop();
}

/// The snake_case code of a reason, as written in events.
pub fn reason_str(reason: Reason) -> &'static str {
    reason.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_are_unique_snake_case_and_their_json_form() {
        let mut seen = std::collections::HashSet::new();
        for &r in Reason::ALL {
            let code = r.as_str();
            assert!(seen.insert(code), "{code} twice");
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
            assert_eq!(serde_json::to_value(r).unwrap(), code);
        }
        assert_eq!(Reason::ALL.len(), 34);
    }

    #[test]
    fn an_encoded_event_is_open_ocsf_json() {
        let mut facts = Facts::new("127.0.0.1:4000".parse().unwrap(), Some("TLSv1_3"));
        facts.operation = "password:get";
        facts.activity = Activity::Read;
        facts.path = "/openstack/latest/password".into();
        facts.method = "GET".into();
        let open = encode(&facts, 200, Duration::from_micros(1500));
        let keys = crate::audit::AuditKeys::derive(&[9; 32]).unwrap();
        let mut line = Vec::new();
        keys.seal_line(&open, 7, crate::audit::chain::GENESIS, &mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["unmapped"]["chain_prev"], crate::audit::chain::GENESIS);
        assert!(v.get("seq").is_none() && v.get("mac").is_none());
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(v["type_uid"], 600302);
        assert_eq!(v["type_name"], "API Activity: Read");
        assert_eq!(v["status_code"], "200");
        assert_eq!(v["message"], "password:get success");
        assert_eq!(v["metadata"]["sequence"], 7);
        assert_eq!(v["metadata"]["uid"], facts.request_id.as_str());
        assert_eq!(v["unmapped"]["latency_us"], 1500);
        assert_eq!(v["unmapped"]["outcome"], "success");
        assert_eq!(v["src_endpoint"]["ip"], "127.0.0.1");
        facts.detail = Some("a detail".into());
        let open = encode(&facts, 404, Duration::ZERO);
        let mut line = Vec::new();
        keys.seal_line(&open, 8, crate::audit::chain::GENESIS, &mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["message"], "password:get success: a detail");
        assert_eq!(v["status_code"], "404");
    }

    #[test]
    fn type_names_are_the_ocsf_caption_of_each_activity() {
        for activity in [
            Activity::Create,
            Activity::Read,
            Activity::Update,
            Activity::Delete,
            Activity::Unknown,
        ] {
            let (_, name) = activity.id_and_name();
            assert_eq!(activity.type_name(), format!("API Activity: {name}"));
        }
    }

    #[test]
    fn bounded_cuts_on_a_character_boundary() {
        let s = "é".repeat(200);
        let b = bounded(&s);
        assert!(b.len() <= MAX_TEXT + "…".len());
        assert!(b.ends_with('…'));
        assert_eq!(bounded("short"), "short");
    }
}
