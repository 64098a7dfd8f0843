//! The composition root: everything a request may need, opened once from the configuration and
//! shared by all connections.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use secrecy::ExposeSecret;

use crate::audit::event::{bounded, encode};
use crate::audit::{Activity, AuditKeys, Auditor, Durability, Facts, Reason, WriterConfig};
use crate::clock::Clock;
use crate::config::{ComputeApi, Config, Limits};
use crate::identity::ProxySigner;
use crate::identity::authenticate::Identities;
use crate::identity::keystone::Keystone;
use crate::keys::state::KeyState;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::store::{Backend, Store};

/// Everything a request may need, shared by all connections.
pub struct App {
    /// The store.
    pub store: Backend,
    /// The data keys in use (swapped on reload) and the rewrap state.
    pub keys: KeyState,
    /// The audit log.
    pub auditor: Auditor,
    /// Who may call: the proxy's signatures, instance certificates, tokens, Keystone.
    pub identities: Identities,
    /// How the compute API is reached (microversions, path prefix).
    pub compute_api: ComputeApi,
    /// The access policy.
    pub policy: Policy,
    /// Request bounds.
    pub limits: Limits,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Rate limits.
    pub limiters: Limiters,
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
    /// Where the request path's "now" comes from.
    pub clock: Clock,
}

impl App {
    /// Opens everything the configuration names: the store, the audit log (continuing its
    /// chain), the metrics, the limiters; on the system clock.
    pub async fn open(config: Config) -> Result<Self, String> {
        Self::open_with_clock(config, Clock::system()).await
    }

    /// [`App::open`] with time read from `clock` (a manual clock in tests).
    pub async fn open_with_clock(config: Config, clock: Clock) -> Result<Self, String> {
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
        let keystone = config
            .keystone
            .map(|settings| Keystone::new(settings, clock.clone()))
            .transpose()
            .map_err(|e| format!("[keystone]: {e}"))?;
        Ok(Self {
            store,
            keys: KeyState::new(config.keyring, config.keys),
            auditor,
            identities: Identities {
                signer: ProxySigner::new(&config.proxy_secret),
                tokens: config.tokens,
                keystone,
                instance_auth: config.instance_auth,
            },
            compute_api: config.compute_api,
            policy: config.policy,
            limits: config.limits,
            metrics,
            limiters: Limiters::new(&config.rate_limits),
            refusals: crate::audit::aggregate::Refusals::new(
                config.rate_limits.max_keys,
                clock.clone(),
            ),
            audit_dir: config.audit.dir.clone(),
            audit_min_free_bytes: config.audit.min_free_bytes,
            nova_lookup: config
                .nova_lookup
                .as_ref()
                .map(crate::nova::lookup::NovaLookup::new)
                .transpose()?,
            shutting_down: AtomicBool::new(false),
            clock,
        })
    }

    /// The keyring in use now.
    pub fn keyring(&self) -> Arc<crate::crypto::Keyring> {
        self.keys.current()
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
    let mut facts = Facts::system("audit:gap_accepted", Activity::Update);
    facts.reason = Reason::AuditFileLost;
    facts.detail = Some(bounded(&format!("started with --accept-audit-gap: {gap}")));
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
