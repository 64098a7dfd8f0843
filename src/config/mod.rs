//! Configuration: every file and secret metapass needs is read and validated here, at startup.
//!
//! The main file is TOML (see `policy/dev.toml` for a commented example). Paths in it are relative
//! to the file's own directory; the store and audit paths are relative to the data directory.
//! Secrets come from files (or, for the proxy secret, inline in dev configurations) and are held in
//! `secrecy` types from the moment they are read. Files holding secrets must not be readable by
//! group or others; a configuration with `dev_mode = true` is allowed to break that rule, loudly.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

mod compute;
mod keystone;
mod nova_lookup;

pub use compute::ComputeApi;
pub use nova_lookup::NovaLookupSettings;

use crate::audit::SyncMode;
use crate::crypto::Keyring;
use crate::identity::{Role, TokenEntry, TokenTable};
use crate::ids::ProjectId;
use crate::keys::KeySource;
use crate::limits::RateLimitConfig;
use crate::policy::Policy;

/// Why the configuration was refused. The message names the file and, where the parser knows it,
/// the line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(path: &Path, message: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{}: {message}", path.display()))
}

/// Command-line overrides of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`: the address of the first listener.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

/// Bounds on connections and requests. Each has a documented default (README, "Bounds").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections each listener holds at once (unless the listener sets its own); when full, a
    /// new connection sheds one that serves nobody, or is closed (see `server::pressure`).
    pub max_connections: usize,
    /// Connections one source address (IPv6: one /64) may hold at once on each listener; more are
    /// closed at accept.
    pub max_connections_per_source: usize,
    /// Seconds allowed for the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Seconds from accept to the first request's head (PROXY header, TLS handshake and protocol
    /// detection included); shortened as a listener fills.
    pub first_request_timeout_secs: u64,
    /// Seconds a connection may wait between requests (HTTP/1 keep-alive, HTTP/2 with no open
    /// stream, whatever the client does with pings); shortened as a listener fills.
    pub idle_timeout_secs: u64,
    /// Seconds allowed to receive a request's headers.
    pub header_read_timeout_secs: u64,
    /// Seconds allowed to receive a request's body.
    pub body_read_timeout_secs: u64,
    /// Seconds allowed for a whole request, from its first byte to the answer.
    pub request_timeout_secs: u64,
    /// Most header fields in one HTTP/1 request.
    pub max_headers: usize,
    /// Largest HTTP/1 read buffer (bounds the request line plus headers), in bytes.
    pub max_header_bytes: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Most HTTP/2 streams reset by the client but not yet accepted (the "rapid reset" bound).
    pub h2_max_pending_reset_streams: usize,
    /// Largest HTTP/2 header list, in bytes.
    pub h2_max_header_list_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 256,
            tls_handshake_timeout_secs: 10,
            first_request_timeout_secs: 15,
            idle_timeout_secs: 30,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 10,
            request_timeout_secs: 30,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            h2_max_concurrent_streams: 64,
            h2_max_pending_reset_streams: 20,
            h2_max_header_list_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// The TLS handshake deadline.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.tls_handshake_timeout_secs)
    }
    /// The deadline from accept to the first request.
    pub fn first_request_timeout(&self) -> Duration {
        Duration::from_secs(self.first_request_timeout_secs.max(1))
    }
    /// How long a connection may idle between requests.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
    /// The header read deadline.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
    /// The body read deadline.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_secs)
    }
    /// The whole-request deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// Whether a TLS listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificates.
    None,
    /// A client may present a certificate from the client CA; one that does not verify fails the
    /// handshake.
    Optional,
    /// Every client must present a certificate from the client CA.
    Required,
}

/// When signed proxy headers are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProxyAuth {
    /// Only on a connection with the metadata proxy's client certificate, and only with a valid
    /// signature (the hardened default).
    #[serde(rename = "mtls+signature")]
    MtlsAndSignature,
    /// With a valid signature from anywhere (Nova's behaviour; warned about at startup).
    #[serde(rename = "signature")]
    Signature,
}

/// One listening socket and what it serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name for logs and audit events.
    pub name: String,
    /// The address to bind.
    pub address: SocketAddr,
    /// TLS (`true`), or plain HTTP, allowed only for an ops-only listener on loopback.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// The API surfaces answered here (`instance`, `compute`, `admin`, `ops`); others are 404.
    pub serves: Vec<crate::audit::Surface>,
    /// Client certificates on this listener.
    #[serde(default = "default_client_auth")]
    pub client_auth: ClientAuth,
    /// Expect a HAProxy PROXY protocol v2 header from a trusted proxy before TLS.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers whose `Forwarded`/`X-Forwarded-For` headers (and PROXY headers) are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The one header this listener's trusted proxies set to name the client; the other is
    /// never believed.
    #[serde(default)]
    pub client_ip_header: ClientIpHeader,
    /// The most connections this listener holds (default `[limits] max_connections`); each
    /// listener has its own, so one network cannot exhaust another's.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// The most connections one source holds on this listener (default `[limits]
    /// max_connections_per_source`).
    #[serde(default)]
    pub max_connections_per_source: Option<usize>,
}

/// Which forwarding header a listener's trusted proxies set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For` (the Neutron/OVN metadata agents, HAProxy's `option forwardfor`,
    /// nginx's `real_ip_header` default).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

fn default_true() -> bool {
    true
}
fn default_client_auth() -> ClientAuth {
    ClientAuth::None
}

impl ListenerConfig {
    /// Whether `peer` is a trusted proxy of this listener (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// Whether this listener answers `surface`.
    pub fn serves(&self, surface: crate::audit::Surface) -> bool {
        self.serves.contains(&surface)
    }
}

/// Which store backend, and where.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded SQLite file.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database shared by several replicas.
    Postgres(PostgresSettings),
}

/// How to reach the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// The connection URL (`postgresql://user@host:port/db?...`); secret, since in dev mode it
    /// may carry a password.
    pub url: SecretString,
    /// The password, read from `password_file`.
    pub password: Option<SecretString>,
    /// The CA certificates the database server's certificate must chain to; TLS is required when
    /// set.
    pub ca_file: Option<PathBuf>,
    /// The most connections one replica opens for requests (a few more serve seal counters).
    pub pool_size: usize,
}

/// Audit log settings.
#[derive(Debug)]
pub struct AuditSettings {
    /// Directory of the log files.
    pub dir: PathBuf,
    /// When to flush.
    pub sync: SyncMode,
    /// Rotation size.
    pub max_file_bytes: u64,
    /// Events that may wait for the writer.
    pub queue_capacity: usize,
    /// How long a request waits for its event to be recorded before failing closed.
    pub ack_timeout: Duration,
    /// Below this much free space on the log's filesystem, `/readyz` turns unready (so the load
    /// balancer drains the replica before its disk is full); 0 disables the check.
    pub min_free_bytes: u64,
    /// The name the store records this log's chain head under (`None`: host name and log
    /// directory). Replicas sharing one PostgreSQL store each need their own.
    pub writer_id: Option<String>,
    /// `serve --accept-audit-gap`: start although the log lacks the line the store anchored,
    /// recording the loss as an event (never from the file: an operator's decision per start).
    pub accept_gap: bool,
    /// The audit secret (chain MAC and fingerprint keys are derived from it).
    pub secret: SecretBox<Vec<u8>>,
}

/// TLS certificate and key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// PEM certificate revocation lists for client certificates.
    pub client_crls: Vec<PathBuf>,
}

/// How instances are identified.
#[derive(Debug, Clone)]
pub struct InstanceAuth {
    /// When signed proxy headers are accepted.
    pub proxy_auth: ProxyAuth,
    /// DNS names (SAN) that mark a client certificate as the metadata proxy's.
    pub proxy_cert_names: Vec<String>,
}

/// The loaded configuration.
#[derive(Debug)]
pub struct Config {
    /// Development mode: dev secrets and lax file modes are allowed, with warnings.
    pub dev_mode: bool,
    /// The listening sockets.
    pub listeners: Vec<ListenerConfig>,
    /// The data directory (store and audit log live under it by default).
    pub data_dir: PathBuf,
    /// Connection and request bounds.
    pub limits: Limits,
    /// The server certificate.
    pub tls: TlsFiles,
    /// The metadata proxy's shared secret.
    pub proxy_secret: SecretString,
    /// How instances are identified.
    pub instance_auth: InstanceAuth,
    /// Accepted owner and admin tokens from the token file (empty without `[tokens]`).
    pub tokens: TokenTable,
    /// Keystone token validation, when `[keystone]` is configured.
    pub keystone: Option<crate::identity::keystone::KeystoneSettings>,
    /// How the compute API is reached (microversions, path prefix).
    pub compute_api: compute::ComputeApi,
    /// The access policy.
    pub policy: Policy,
    /// The rate limits.
    pub rate_limits: RateLimitConfig,
    /// Where the data keys come from, and how rotation proceeds.
    pub keys: KeySettings,
    /// The data keys, as loaded at startup.
    pub keyring: Keyring,
    /// The store.
    pub store: StoreConfig,
    /// The audit log.
    pub audit: AuditSettings,
    /// Following Nova's notifications, if enabled.
    pub notifications: Option<NotificationSettings>,
    /// Registering unknown instances from Nova's database, when configured.
    pub nova_lookup: Option<NovaLookupSettings>,
    /// Warnings to log at startup (dev mode, lax modes).
    pub warnings: Vec<String>,
}

/// Where Nova's versioned notifications arrive (oslo.messaging on RabbitMQ).
#[derive(Debug, Clone)]
pub struct NotificationSettings {
    /// The AMQP URL (`amqp://user@host:5672/vhost`), with the password from `password_file`
    /// already in it; secret.
    pub url: SecretString,
    /// Nova's control exchange (`nova`).
    pub exchange: String,
    /// The notification topic (`versioned_notifications`); metapass binds `<topic>.info`.
    pub topic: String,
    /// metapass's own queue on that exchange.
    pub queue: String,
    /// Whether the exchange and queue are durable (oslo.messaging's `amqp_durable_queues`).
    pub durable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    dev_mode: bool,
    server: RawServer,
    #[serde(rename = "listener")]
    listeners: Vec<ListenerConfig>,
    tls: RawTls,
    instance_api: RawInstanceApi,
    #[serde(default)]
    tokens: Option<RawFileRef>,
    #[serde(default)]
    keystone: Option<keystone::RawKeystone>,
    #[serde(default)]
    compute_api: compute::RawComputeApi,
    #[serde(default)]
    policy: Option<RawFileRef>,
    rate_limits: RawFileRef,
    keys: RawKeys,
    store: RawStore,
    #[serde(default)]
    nova_notifications: Option<RawNotifications>,
    #[serde(default)]
    nova_lookup: Option<nova_lookup::RawNovaLookup>,
    audit: RawAudit,
    #[serde(default)]
    limits: Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    data_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    client_crls: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstanceApi {
    proxy_shared_secret: Option<SecretString>,
    proxy_shared_secret_file: Option<PathBuf>,
    #[serde(default = "default_proxy_auth")]
    proxy_auth: ProxyAuth,
    #[serde(default)]
    proxy_cert_names: Vec<String>,
}

fn default_proxy_auth() -> ProxyAuth {
    ProxyAuth::MtlsAndSignature
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileRef {
    file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    enabled: bool,
    url: SecretString,
    password_file: Option<PathBuf>,
    #[serde(default = "default_exchange")]
    exchange: String,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default = "default_queue")]
    queue: String,
    #[serde(default)]
    durable: bool,
}

fn default_exchange() -> String {
    "nova".into()
}

fn default_topic() -> String {
    "versioned_notifications".into()
}

fn default_queue() -> String {
    "metapass.versioned_notifications".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "snake_case")]
enum RawStore {
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        url: SecretString,
        password_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// Outside dev mode, TLS to the database (`ca_file`) is required unless this waives it
        /// (a database on a socket-only or otherwise protected path).
        #[serde(default)]
        insecure_plaintext: bool,
    },
}

fn default_pool_size() -> usize {
    16
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    dir: PathBuf,
    sync: SyncMode,
    key_file: PathBuf,
    #[serde(default = "default_max_file_bytes")]
    max_file_bytes: u64,
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    #[serde(default = "default_ack_timeout_ms")]
    ack_timeout_ms: u64,
    #[serde(default = "default_min_free_bytes")]
    min_free_bytes: u64,
    #[serde(default)]
    writer_id: Option<String>,
}

fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_max_file_bytes() -> u64 {
    64 * 1024 * 1024
}

/// The smallest rotation size accepted (one event is about 1.5 KiB).
pub const MIN_AUDIT_FILE_BYTES: u64 = 4096;
fn default_queue_capacity() -> usize {
    16_384
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenFile {
    #[serde(default, rename = "token")]
    tokens: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    label: String,
    sha256: String,
    project: String,
    roles: Vec<Role>,
    #[serde(default)]
    client_cert_sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    file: Option<PathBuf>,
    env: Option<String>,
    fd: Option<u32>,
    #[serde(default)]
    rewrap: RewrapMode,
    #[serde(default = "default_rewrap_batch")]
    rewrap_batch: usize,
    #[serde(default = "default_rewrap_pause_ms")]
    rewrap_pause_ms: u64,
}

fn default_rewrap_batch() -> usize {
    64
}
fn default_rewrap_pause_ms() -> u64 {
    100
}

/// When records sealed under older keys are resealed under the active key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewrapMode {
    /// In the background, whenever records under a non-active key exist (after a rotation).
    #[default]
    Auto,
    /// Only when an admin asks (`POST /admin/v1/keys/rewrap`).
    Manual,
}

/// The data keys: where they come from and how rotation proceeds.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// Where the keyring is read from.
    pub source: KeySource,
    /// Whether the daemon may read a key file open to group or others (dev mode).
    pub dev_mode: bool,
    /// When records are resealed under the active key.
    pub rewrap: RewrapMode,
    /// How many records one rewrap step reseals (each in its own audited transaction).
    pub rewrap_batch: usize,
    /// The pause between rewrap steps, so serving traffic keeps the store.
    pub rewrap_pause: Duration,
}

impl KeySettings {
    /// Reads the keyring from its source, enforcing the key file's mode outside dev mode.
    pub fn load(&self, warnings: &mut Vec<String>) -> Result<Keyring, ConfigError> {
        if let KeySource::File(path) = &self.source {
            check_secret_mode(path, self.dev_mode, warnings)?;
        }
        self.source
            .read()
            .and_then(|file| file.to_keyring())
            .map_err(|e| ConfigError(e.to_string()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuditKey {
    secret: SecretString,
}

/// Resolves `p` against `base` unless it is absolute.
fn under(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|e| err(path, e))
}

/// Reads a secret file (mode-checked as [`check_secret_mode`] does) to its trimmed text; an
/// empty file is an error.
fn read_secret_file(
    path: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<Zeroizing<String>, ConfigError> {
    check_secret_mode(path, dev_mode, warnings)?;
    let text = Zeroizing::new(read_text(path)?);
    let secret = text.trim();
    if secret.is_empty() {
        return Err(err(path, "is empty"));
    }
    Ok(Zeroizing::new(secret.to_owned()))
}

/// Refuses (or, in dev mode, warns about) a secret file readable by group or others.
fn check_secret_mode(
    path: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    check_private_mode(path, "holds secrets", dev_mode, warnings)
}

/// Refuses (or, in dev mode, warns about) a certificate file open to group or others. Certificates
/// are public, but PEM bundles often carry the key too, and a group-writable CA file lets someone
/// else choose whom the daemon trusts: TLS material is kept owner-only as a whole.
fn check_certificate_mode(
    path: &Path,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    check_private_mode(path, "is TLS material", dev_mode, warnings)
}

fn check_private_mode(
    path: &Path,
    what: &str,
    dev_mode: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let mode = fs::metadata(path)
        .map_err(|e| err(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        let message = format!(
            "{} {what} but its mode is {:o} (group/others may read it); chmod 600 it",
            path.display(),
            mode & 0o777
        );
        if !dev_mode {
            return Err(ConfigError(message));
        }
        warnings.push(format!("{message} (allowed because dev_mode = true)"));
    }
    Ok(())
}

fn decode_hex_secret(
    path: &Path,
    what: &str,
    hex_text: &SecretString,
) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    hex::decode(hex_text.expose_secret().trim())
        .map(Zeroizing::new)
        .map_err(|_| err(path, format!("{what} is not hex")))
}

/// Loads a token file.
pub fn load_tokens(path: &Path) -> Result<TokenTable, ConfigError> {
    parse_tokens(&read_text(path)?, path)
}

/// Parses the text of a token file (`path` names it in messages).
pub fn parse_tokens(text: &str, path: &Path) -> Result<TokenTable, ConfigError> {
    let raw: RawTokenFile = toml::from_str(text).map_err(|e| err(path, e))?;
    let mut entries = Vec::with_capacity(raw.tokens.len());
    for t in raw.tokens {
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&t.sha256, &mut sha256).map_err(|_| {
            err(
                path,
                format!("token {:?}: sha256 must be 64 hex digits", t.label),
            )
        })?;
        let project = ProjectId::parse(&t.project)
            .map_err(|e| err(path, format!("token {:?}: {e}", t.label)))?;
        if t.roles.is_empty() {
            return Err(err(path, format!("token {:?} has no roles", t.label)));
        }
        let client_cert_sha256 = match &t.client_cert_sha256 {
            None => None,
            Some(hex_text) => {
                let mut fingerprint = [0u8; 32];
                hex::decode_to_slice(hex_text.replace(':', ""), &mut fingerprint).map_err(
                    |_| {
                        err(
                            path,
                            format!(
                                "token {:?}: client_cert_sha256 must be 64 hex digits",
                                t.label
                            ),
                        )
                    },
                )?;
                Some(fingerprint)
            }
        };
        entries.push(TokenEntry {
            label: t.label,
            sha256,
            project,
            roles: t.roles,
            client_cert_sha256,
        });
    }
    Ok(TokenTable::new(entries))
}

/// Loads the audit secret file.
pub fn load_audit_secret(path: &Path) -> Result<SecretBox<Vec<u8>>, ConfigError> {
    let text = zeroize::Zeroizing::new(read_text(path)?);
    let raw: RawAuditKey = toml::from_str(&text)
        .map_err(|e| err(path, crate::keys::redacted_toml_error(&text, &e)))?;
    let bytes = decode_hex_secret(path, "secret", &raw.secret)?;
    if bytes.len() < crate::audit::chain::MIN_SECRET_LEN {
        return Err(err(
            path,
            "the audit secret must be at least 32 bytes (64 hex digits)",
        ));
    }
    Ok(SecretBox::new(Box::new(bytes.to_vec())))
}

/// Checks the listeners: at least one, unique names, known surfaces, plain HTTP only for an
/// ops-only listener on loopback, client certificates only with a client CA, PROXY protocol only
/// from trusted proxies.
fn validate_listeners(
    path: &Path,
    listeners: &[ListenerConfig],
    has_client_ca: bool,
) -> Result<(), ConfigError> {
    use crate::audit::Surface;
    if listeners.is_empty() {
        return Err(err(path, "at least one [[listener]] is needed"));
    }
    let mut names = std::collections::HashSet::new();
    for l in listeners {
        let named = |m: &str| err(path, format!("listener {:?}: {m}", l.name));
        if !names.insert(l.name.as_str()) {
            return Err(named("the name is used twice"));
        }
        if l.serves.is_empty() || l.serves.contains(&Surface::Unknown) {
            return Err(named(
                "serves must list some of instance, compute, admin, ops",
            ));
        }
        if !l.tls && (!l.address.ip().is_loopback() || l.serves.iter().any(|s| *s != Surface::Ops))
        {
            return Err(named(
                "plain HTTP (tls = false) is only for an ops-only listener on a loopback address",
            ));
        }
        if !l.tls && l.client_auth != ClientAuth::None {
            return Err(named("client_auth needs tls = true"));
        }
        if l.client_auth != ClientAuth::None && !has_client_ca {
            return Err(named("client_auth needs [tls] client_ca"));
        }
        if l.proxy_protocol && l.trusted_proxies.is_empty() {
            return Err(named(
                "proxy_protocol needs trusted_proxies (only they may send PROXY headers)",
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Reads the configuration at `path` and everything it names.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let dev_mode = raw.dev_mode;
        let mut warnings = Vec::new();
        if dev_mode {
            warnings.push(
                "dev_mode = true: this configuration uses public development secrets; never use it for real instances"
                    .into(),
            );
        }

        let data_dir = match &overrides.data_dir {
            Some(d) => d.clone(),
            None => under(base, &raw.server.data_dir),
        };
        let mut listeners = raw.listeners;
        if let (Some(first), Some(address)) = (listeners.first_mut(), overrides.listen) {
            first.address = address;
        }
        validate_listeners(path, &listeners, raw.tls.client_ca.is_some())?;
        if raw.tls.client_ca.is_none() && !raw.tls.client_crls.is_empty() {
            return Err(err(
                path,
                "[tls] client_crls needs client_ca (the CRLs check client certificates)",
            ));
        }

        let tls = TlsFiles {
            cert: under(base, &raw.tls.cert),
            key: under(base, &raw.tls.key),
            client_ca: raw.tls.client_ca.as_deref().map(|p| under(base, p)),
            client_crls: raw.tls.client_crls.iter().map(|p| under(base, p)).collect(),
        };
        let instance_auth = InstanceAuth {
            proxy_auth: raw.instance_api.proxy_auth,
            proxy_cert_names: raw.instance_api.proxy_cert_names.clone(),
        };
        match instance_auth.proxy_auth {
            ProxyAuth::Signature => warnings.push(
                "proxy_auth = \"signature\": signed proxy headers are accepted from any peer that knows the shared secret (Nova's behaviour); use \"mtls+signature\" to require the proxy's client certificate".into(),
            ),
            ProxyAuth::MtlsAndSignature => {
                if instance_auth.proxy_cert_names.is_empty() {
                    return Err(err(path, "proxy_auth = \"mtls+signature\" needs proxy_cert_names (the DNS names of the proxy's client certificates)"));
                }
                let asks_certs = listeners.iter().any(|l| {
                    l.serves(crate::audit::Surface::Instance) && l.client_auth != ClientAuth::None
                });
                if !asks_certs {
                    return Err(err(path, "proxy_auth = \"mtls+signature\" needs a listener serving the instance API with client_auth = \"optional\" or \"required\""));
                }
            }
        }
        check_secret_mode(&tls.key, dev_mode, &mut warnings)?;
        for certificate in std::iter::once(&tls.cert)
            .chain(&tls.client_ca)
            .chain(&tls.client_crls)
        {
            check_certificate_mode(certificate, dev_mode, &mut warnings)?;
        }

        let proxy_secret = match (
            raw.instance_api.proxy_shared_secret,
            raw.instance_api.proxy_shared_secret_file,
        ) {
            (Some(_), Some(_)) => {
                return Err(err(
                    path,
                    "give proxy_shared_secret or proxy_shared_secret_file, not both",
                ));
            }
            (Some(inline), None) => {
                if !dev_mode {
                    return Err(err(
                        path,
                        "an inline proxy_shared_secret is only allowed with dev_mode = true; use proxy_shared_secret_file",
                    ));
                }
                inline
            }
            (None, Some(file)) => {
                let file = under(base, &file);
                check_secret_mode(&file, dev_mode, &mut warnings)?;
                SecretString::from(read_text(&file)?.trim().to_owned())
            }
            (None, None) => return Err(err(path, "instance_api needs proxy_shared_secret_file")),
        };
        if proxy_secret.expose_secret().len() < 16 {
            return Err(err(
                path,
                "the proxy shared secret must be at least 16 characters",
            ));
        }

        let tokens = match &raw.tokens {
            Some(file) => {
                let tokens_path = under(base, &file.file);
                check_secret_mode(&tokens_path, dev_mode, &mut warnings)?;
                load_tokens(&tokens_path)?
            }
            None => TokenTable::default(),
        };
        let keystone = raw
            .keystone
            .map(|k| k.validate(path, base, dev_mode, &mut warnings))
            .transpose()?;
        if raw.tokens.is_none() && keystone.is_none() {
            return Err(err(
                path,
                "owners need a way to authenticate: configure [keystone], [tokens] (a token file), or both",
            ));
        }
        let compute_api = raw.compute_api.validate(path)?;

        let policy = match &raw.policy {
            Some(p) => {
                let policy_path = under(base, &p.file);
                Policy::from_toml(&read_text(&policy_path)?).map_err(|e| err(&policy_path, e))?
            }
            None => Policy::nova_defaults(),
        };

        let limits_path = under(base, &raw.rate_limits.file);
        let rate_limits = RateLimitConfig::from_toml(&read_text(&limits_path)?)
            .map_err(|e| err(&limits_path, e))?;

        let source = match (raw.keys.file, raw.keys.env, raw.keys.fd) {
            (Some(file), None, None) => KeySource::File(under(base, &file)),
            (None, Some(name), None) => KeySource::Env(name),
            (None, None, Some(fd)) => KeySource::Fd(fd),
            _ => {
                return Err(err(
                    path,
                    "[keys] needs exactly one of file, env (a variable holding the keyring) or fd (an inherited descriptor)",
                ));
            }
        };
        let keys = KeySettings {
            source,
            dev_mode,
            rewrap: raw.keys.rewrap,
            rewrap_batch: raw.keys.rewrap_batch.clamp(1, 4096),
            rewrap_pause: Duration::from_millis(raw.keys.rewrap_pause_ms),
        };
        let keyring = keys.load(&mut warnings)?;

        let store = match raw.store {
            RawStore::Sqlite { path: p } => StoreConfig::Sqlite {
                path: under(&data_dir, &p),
            },
            RawStore::Postgres {
                url,
                password_file,
                ca_file,
                pool_size,
                insecure_plaintext,
            } => {
                let parsed: tokio_postgres::Config = url
                    .expose_secret()
                    .parse()
                    .map_err(|_| err(path, "[store] url is not a PostgreSQL connection URL"))?;
                if parsed.get_password().is_some() && !dev_mode {
                    return Err(err(
                        path,
                        "a password in [store] url is only allowed with dev_mode = true; use password_file",
                    ));
                }
                let password = match password_file {
                    Some(file) => {
                        let file = under(base, &file);
                        check_secret_mode(&file, dev_mode, &mut warnings)?;
                        Some(SecretString::from(read_text(&file)?.trim().to_owned()))
                    }
                    None => None,
                };
                let ca_file = ca_file.map(|f| under(base, &f));
                if let Some(ca) = &ca_file {
                    check_certificate_mode(ca, dev_mode, &mut warnings)?;
                }
                match (&ca_file, dev_mode, insecure_plaintext) {
                    (Some(_), _, _) | (None, true, _) => {}
                    (None, false, false) => {
                        return Err(err(
                            path,
                            "[store] backend = \"postgres\" needs ca_file (TLS to the database) outside dev_mode; set insecure_plaintext = true only for a database reached over a protected path",
                        ));
                    }
                    (None, false, true) => warnings.push(
                        "[store] insecure_plaintext = true: passwords' sealed records and the database password cross the network without TLS".into(),
                    ),
                }
                if !(1..=1024).contains(&pool_size) {
                    return Err(err(path, "[store] pool_size must be between 1 and 1024"));
                }
                StoreConfig::Postgres(PostgresSettings {
                    url,
                    password,
                    ca_file,
                    pool_size,
                })
            }
        };

        let notifications = match raw.nova_notifications {
            Some(n) if n.enabled => {
                let mut url = url::Url::parse(n.url.expose_secret())
                    .map_err(|_| err(path, "[nova_notifications] url is not an AMQP URL"))?;
                if url.scheme() != "amqp" {
                    return Err(err(
                        path,
                        "[nova_notifications] url must be amqp:// (this build has no AMQP over TLS; keep the broker on a protected network)",
                    ));
                }
                if url.password().is_some() && !dev_mode {
                    return Err(err(
                        path,
                        "a password in [nova_notifications] url is only allowed with dev_mode = true; use password_file",
                    ));
                }
                if let Some(file) = n.password_file {
                    let password = read_secret_file(&under(base, &file), dev_mode, &mut warnings)?;
                    url.set_password(Some(&password)).map_err(|()| {
                        err(path, "[nova_notifications] url cannot carry a password")
                    })?;
                }
                for (name, value) in [
                    ("exchange", &n.exchange),
                    ("topic", &n.topic),
                    ("queue", &n.queue),
                ] {
                    if value.is_empty() || value.len() > 255 {
                        return Err(err(
                            path,
                            format!("[nova_notifications] {name} must be 1 to 255 characters"),
                        ));
                    }
                }
                Some(NotificationSettings {
                    url: SecretString::from(url.to_string()),
                    exchange: n.exchange,
                    topic: n.topic,
                    queue: n.queue,
                    durable: n.durable,
                })
            }
            _ => None,
        };

        let nova_lookup = raw
            .nova_lookup
            .map(|n| n.validate(path, base, dev_mode, &mut warnings))
            .transpose()?;

        let audit_key_path = under(base, &raw.audit.key_file);
        check_secret_mode(&audit_key_path, dev_mode, &mut warnings)?;
        let audit = AuditSettings {
            dir: under(&data_dir, &raw.audit.dir),
            sync: raw.audit.sync,
            max_file_bytes: raw.audit.max_file_bytes.max(MIN_AUDIT_FILE_BYTES),
            queue_capacity: raw.audit.queue_capacity.max(16),
            ack_timeout: Duration::from_millis(raw.audit.ack_timeout_ms.max(1)),
            min_free_bytes: raw.audit.min_free_bytes,
            writer_id: raw.audit.writer_id.filter(|w| !w.trim().is_empty()),
            accept_gap: false,
            secret: load_audit_secret(&audit_key_path)?,
        };

        Ok(Self {
            dev_mode,
            listeners,
            data_dir,
            limits: raw.limits,
            tls,
            proxy_secret,
            instance_auth,
            tokens,
            keystone,
            compute_api,
            policy,
            rate_limits,
            keys,
            keyring,
            store,
            audit,
            notifications,
            nova_lookup,
            warnings,
        })
    }
}
