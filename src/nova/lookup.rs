//! Registering an unknown instance at once from Nova's database (`[nova_lookup]`).
//!
//! A guest can boot before Nova's `instance.create.end` notification reaches metapass. Without a
//! lookup its GET is an empty 200 and its POST a 503 to retry; with one, metapass asks Nova's
//! database (read-only session) whether the instance is live and registers it to Nova's project
//! at once, audited as `registry:lookup`, so there is no lag at all. Only requests whose identity
//! was verified (the proxy's signature, or the instance's certificate) ever cause a lookup, and
//! the per-instance rate limit bounds them. A lookup that fails or is slow counts as "not
//! registered yet": it never turns a guest's request into an error.

use std::time::Duration;

use super::import::NovaDatabase;
use super::{refuse, register};
use crate::api::respond::ApiError;
use crate::app::App;
use crate::audit::Reason;
use crate::config::NovaLookupSettings;
use crate::ids::{InstanceId, ProjectId};
use crate::store::RegisterOutcome;

/// The operation name of a registration found by lookup.
pub(crate) const OPERATION: &str = "registry:lookup";

/// Nova's database, for lookups.
pub struct NovaLookup {
    db: NovaDatabase,
    timeout: Duration,
}

impl std::fmt::Debug for NovaLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NovaLookup").finish_non_exhaustive()
    }
}

impl NovaLookup {
    /// A lookup for `settings` (connects lazily).
    pub fn new(settings: &NovaLookupSettings) -> Result<Self, String> {
        use secrecy::ExposeSecret;
        Ok(Self {
            db: NovaDatabase::new(settings.url.expose_secret(), settings.ca_file.as_deref())
                .map_err(|_| "[nova_lookup] url is not a MySQL URL".to_owned())?,
            timeout: settings.timeout,
        })
    }
}

/// Registers `id` from Nova's database when Nova has it live. True when it is registered (to
/// Nova's project) now; false when lookups are off, Nova does not have it, or the lookup failed.
///
/// The lookup's future (a MySQL query, a registration behind an audit gate) is boxed and built
/// only when a lookup runs: inline, it made every GET's future, which is copied whole into its
/// task, a few kilobytes larger for a branch taken once per unknown instance.
pub(crate) async fn register_unknown(app: &App, id: &InstanceId) -> bool {
    let Some(lookup) = &app.nova_lookup else {
        return false;
    };
    Box::pin(look_up_and_register(app, lookup, id)).await
}

async fn look_up_and_register(app: &App, lookup: &NovaLookup, id: &InstanceId) -> bool {
    let project =
        match tokio::time::timeout(lookup.timeout, lookup.db.live_project(id.as_str())).await {
            Ok(Ok(Some(project))) => project,
            Ok(Ok(None)) => return false,
            Ok(Err(e)) => {
                tracing::warn!(instance = %id, error = %e, "Nova registry lookup failed");
                return false;
            }
            Err(_) => {
                tracing::warn!(instance = %id, "Nova registry lookup timed out");
                return false;
            }
        };
    let Ok(project) = ProjectId::parse(&project) else {
        let refusal = ApiError::bad_request(
            Reason::BadRequest,
            "Nova's database names a project id metapass cannot hold; not registered",
        );
        let _ = refuse(app, OPERATION, Some(id.as_str()), None, &refusal).await;
        return false;
    };
    let detail = "registered from Nova's database on the instance's first request".to_owned();
    matches!(
        register(app, OPERATION, id, &project, detail).await,
        Ok(RegisterOutcome::Created | RegisterOutcome::Unchanged)
    )
}
