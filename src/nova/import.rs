//! `metapass import-nova`: takes over the passwords Nova keeps in its database.
//!
//! Nova stores a posted password in `instance_system_metadata` as up to four `password_N` rows of
//! at most 255 characters, joined in key order (`nova.api.metadata.password.extract_password`).
//! The import reads live instances (`instances.deleted = 0`) and their live metadata rows in
//! batches by `instances.id`, on a session set `READ ONLY`, registers each instance with its
//! project and seals its joined password into the metapass store.
//!
//! It is idempotent: a second run finds every instance registered and every password set, and
//! counts them as already present; `--after ID` resumes after the last id a run reported. Each
//! instance it changes (or refuses) is audited: `import:instance` for the registration,
//! `import:password` for the password. A dry run reads both databases and changes nothing.

use std::collections::HashMap;

use http::StatusCode;
use mysql_async::prelude::Queryable;
use serde::Serialize;
use zeroize::Zeroizing;

use super::{finish, refuse, register, task};
use crate::api::metadata::{PasswordBodyError, seal_once, validate_password};
use crate::api::respond::ApiError;
use crate::app::App;
use crate::audit::{Activity, Facts, Reason};
use crate::ids::{InstanceId, ProjectId};
use crate::store::{Backend, RegisterOutcome, SetOutcome, Store};

/// The `password_N` keys Nova writes.
const PASSWORD_KEYS: [&str; 4] = ["password_0", "password_1", "password_2", "password_3"];

/// How a run went; printed by the command. Never holds a password.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ImportReport {
    /// Passwords sealed into metapass by this run (in a dry run: that would be).
    pub imported: u64,
    /// Instances whose password metapass already had.
    pub already_present: u64,
    /// Deleted instances in Nova, not imported.
    pub skipped_deleted: u64,
    /// Live instances without a password in Nova (registered, nothing to seal).
    pub empty: u64,
    /// Instances metapass has registered to another project (left as they are).
    pub conflicts: u64,
    /// Rows that are not a valid instance id, project id or password blob (left out).
    pub invalid: u64,
    /// The highest `instances.id` handled: resume with `--after` this.
    pub last_id: u64,
}

/// Options of a run.
#[derive(Debug, Clone)]
pub(crate) struct ImportOptions {
    /// Instances per batch.
    pub batch: usize,
    /// Start after this `instances.id` (0: from the start).
    pub after: u64,
}

/// One live Nova instance and its joined password.
struct NovaInstance {
    id: u64,
    uuid: String,
    project: Option<String>,
    password: Zeroizing<String>,
}

/// Nova's database, read only.
pub(crate) struct NovaDatabase {
    pool: mysql_async::Pool,
}

impl NovaDatabase {
    /// Connects to `url` (`mysql://user:password@host:3306/nova`), over TLS verified against
    /// `ca_file` when one is given (a server that does not offer TLS is then refused, never used
    /// in plaintext). Whether plaintext is acceptable is the caller's decision (dev mode or an
    /// explicit waiver).
    pub(crate) fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Self, String> {
        let opts = mysql_async::Opts::from_url(url)
            .map_err(|_| "--db is not a MySQL URL (mysql://user@host:3306/nova)".to_owned())?;
        let mut builder = mysql_async::OptsBuilder::from_opts(opts);
        if let Some(ca) = ca_file {
            builder = builder.ssl_opts(
                mysql_async::SslOpts::default()
                    .with_root_certs(vec![ca.to_path_buf().into()])
                    .with_disable_built_in_roots(true),
            );
        }
        Ok(Self {
            pool: mysql_async::Pool::new(builder),
        })
    }

    async fn conn(&self) -> Result<mysql_async::Conn, String> {
        let mut conn = self
            .pool
            .get_conn()
            .await
            .map_err(|e| format!("Nova database: {e}"))?;
        // Any write on this session is refused by the server itself.
        conn.query_drop("SET SESSION TRANSACTION READ ONLY")
            .await
            .map_err(|e| format!("Nova database: {e}"))?;
        Ok(conn)
    }

    /// The project of the live (not deleted) instance `uuid`, if Nova has one: the registry
    /// lookup of an instance metapass does not know yet.
    pub(crate) async fn live_project(&self, uuid: &str) -> Result<Option<String>, String> {
        let mut conn = self.conn().await?;
        let row: Option<Option<String>> = conn
            .exec_first(
                "SELECT project_id FROM instances WHERE deleted = 0 AND uuid = ?",
                (uuid,),
            )
            .await
            .map_err(|e| format!("Nova database: {e}"))?;
        Ok(row.flatten())
    }

    /// How many instances Nova has deleted.
    async fn deleted(&self) -> Result<u64, String> {
        let mut conn = self.conn().await?;
        let count: Option<u64> = conn
            .query_first("SELECT COUNT(*) FROM instances WHERE deleted != 0")
            .await
            .map_err(|e| format!("Nova database: {e}"))?;
        Ok(count.unwrap_or(0))
    }

    /// Up to `limit` live instances after `after`, with their joined passwords.
    async fn batch(&self, after: u64, limit: usize) -> Result<Vec<NovaInstance>, String> {
        let mut conn = self.conn().await?;
        let rows: Vec<(u64, String, Option<String>)> = conn
            .exec(
                "SELECT id, uuid, project_id FROM instances
                 WHERE deleted = 0 AND id > ? ORDER BY id LIMIT ?",
                (after, limit as u64),
            )
            .await
            .map_err(|e| format!("Nova database: {e}"))?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; rows.len()].join(",");
        let query = format!(
            "SELECT instance_uuid, `key`, value FROM instance_system_metadata
             WHERE deleted = 0 AND `key` IN ('password_0','password_1','password_2','password_3')
               AND instance_uuid IN ({placeholders})"
        );
        let uuids: Vec<mysql_async::Value> =
            rows.iter().map(|(_, u, _)| u.clone().into()).collect();
        let chunks: Vec<(String, String, Option<String>)> = conn
            .exec(query, uuids)
            .await
            .map_err(|e| format!("Nova database: {e}"))?;
        let mut by_instance: HashMap<String, Vec<(String, Zeroizing<String>)>> = HashMap::new();
        for (uuid, key, value) in chunks {
            by_instance
                .entry(uuid)
                .or_default()
                .push((key, Zeroizing::new(value.unwrap_or_default())));
        }
        Ok(rows
            .into_iter()
            .map(|(id, uuid, project)| {
                let mut parts = by_instance.remove(&uuid).unwrap_or_default();
                parts.sort_by(|a, b| a.0.cmp(&b.0));
                let mut password = Zeroizing::new(String::new());
                for key in PASSWORD_KEYS {
                    if let Some((_, value)) = parts.iter().find(|(k, _)| k == key) {
                        password.push_str(value);
                    }
                }
                NovaInstance {
                    id,
                    uuid,
                    project,
                    password,
                }
            })
            .collect())
    }

    /// Closes the connections.
    pub(crate) async fn close(self) {
        let _ = self.pool.disconnect().await;
    }
}

/// An instance row that is not usable as it is.
fn invalid_row(row: &NovaInstance) -> Option<String> {
    if InstanceId::parse(&row.uuid).is_err() {
        return Some(format!(
            "Nova instance row {}: not a valid instance id",
            row.id
        ));
    }
    match row.project.as_deref().map(ProjectId::parse) {
        Some(Ok(_)) => None,
        _ => Some(format!("Nova instance row {}: no valid project id", row.id)),
    }
}

fn invalid_password(row: &NovaInstance) -> Option<&'static str> {
    match validate_password(row.password.as_bytes()) {
        Ok(_) => None,
        Err(PasswordBodyError::Empty) => None,
        Err(PasswordBodyError::NotUtf8) => Some("the stored password is not UTF-8"),
        Err(PasswordBodyError::ControlCharacter) => {
            Some("the stored password contains NUL or control characters")
        }
    }
}

/// Walks every live Nova instance after `options.after`, batch by batch, handing each to `visit`
/// with the report to count into; an error from `visit` stops the walk.
async fn walk(
    nova: &NovaDatabase,
    options: &ImportOptions,
    mut visit: impl AsyncFnMut(NovaInstance, &mut ImportReport) -> Result<(), String>,
) -> Result<ImportReport, String> {
    let mut report = ImportReport {
        skipped_deleted: nova.deleted().await?,
        last_id: options.after,
        ..ImportReport::default()
    };
    loop {
        let rows = nova.batch(report.last_id, options.batch).await?;
        let Some(last) = rows.last() else { break };
        let last_id = last.id;
        for row in rows {
            visit(row, &mut report).await?;
        }
        report.last_id = last_id;
        tracing::info!(after = last_id, "import batch done");
    }
    Ok(report)
}

/// Counts what an import would do, changing nothing (no audit log needed).
pub(crate) async fn dry_run(
    nova: &NovaDatabase,
    store: &Backend,
    options: &ImportOptions,
) -> Result<ImportReport, String> {
    walk(nova, options, async |row, report| {
        if invalid_row(&row).is_some() || invalid_password(&row).is_some() {
            report.invalid += 1;
            return Ok(());
        }
        let id = InstanceId::parse(&row.uuid).map_err(|e| e.to_string())?;
        let existing = store.instance(&id).await.map_err(|e| e.to_string())?;
        match existing {
            Some(r) if Some(r.project_id.as_str()) != row.project.as_deref() => {
                report.conflicts += 1;
            }
            _ if row.password.is_empty() => report.empty += 1,
            Some(r) if r.password_set => report.already_present += 1,
            _ => report.imported += 1,
        }
        Ok(())
    })
    .await
}

fn answer_import(outcome: &SetOutcome, facts: &mut Facts) -> Result<StatusCode, ApiError> {
    match *outcome {
        SetOutcome::Stored { version } => {
            facts.record_version = Some(version);
            Ok(StatusCode::OK)
        }
        SetOutcome::AlreadySet => {
            facts.detail = Some("metapass already has a password for this instance; kept".into());
            Ok(StatusCode::OK)
        }
        SetOutcome::NotFound => Err(ApiError::unknown_instance(
            "The instance vanished during the import.",
        )),
        SetOutcome::ProjectMismatch => Err(ApiError::conflict(
            "The instance is registered to another project; left as it is.",
        )),
    }
}

/// Imports every live instance after `options.after`, batch by batch (see the module docs).
pub(crate) async fn run(
    nova: &NovaDatabase,
    app: &App,
    options: &ImportOptions,
) -> Result<ImportReport, String> {
    walk(nova, options, async |row, report| {
        import_one(app, row, report).await
    })
    .await
}

/// Imports one instance; an error stops the run (the store or the audit log failed).
async fn import_one(app: &App, row: NovaInstance, report: &mut ImportReport) -> Result<(), String> {
    let stop = |e: ApiError| {
        format!(
            "import stopped at Nova instance row {}: {}",
            row.id, e.message
        )
    };
    if let Some(problem) = invalid_row(&row) {
        report.invalid += 1;
        let error = ApiError::bad_request(Reason::BodyInvalid, problem);
        refuse(
            app,
            "import:instance",
            Some(&row.uuid),
            row.project.as_deref(),
            &error,
        )
        .await
        .map_err(stop)?;
        return Ok(());
    }
    let id = InstanceId::parse(&row.uuid).map_err(|e| e.to_string())?;
    let project =
        ProjectId::parse(row.project.as_deref().unwrap_or_default()).map_err(|e| e.to_string())?;
    let detail = format!("imported from Nova (instance row {})", row.id);
    match register(app, "import:instance", &id, &project, detail).await {
        Ok(RegisterOutcome::OwnedByOther | RegisterOutcome::DeletedFromOther) => {
            report.conflicts += 1;
            return Ok(());
        }
        Ok(_) => {}
        Err(e) => return Err(stop(e)),
    }
    if row.password.is_empty() {
        report.empty += 1;
        return Ok(());
    }
    if let Some(problem) = invalid_password(&row) {
        report.invalid += 1;
        let error = ApiError::bad_request(Reason::BodyInvalid, problem);
        refuse(
            app,
            "import:password",
            Some(id.as_str()),
            Some(project.as_str()),
            &error,
        )
        .await
        .map_err(stop)?;
        return Ok(());
    }

    let mut task = task(
        "import:password",
        Activity::Create,
        Some(id.as_str()),
        Some(project.as_str()),
    );
    let blob = Zeroizing::new(row.password.as_bytes().to_vec());
    let result = seal_once(app, &mut task, &id, &project, blob, answer_import).await;
    match finish(app, task, result).await {
        Ok(SetOutcome::Stored { .. }) => report.imported += 1,
        Ok(SetOutcome::AlreadySet) => report.already_present += 1,
        Ok(SetOutcome::ProjectMismatch) => report.conflicts += 1,
        Ok(SetOutcome::NotFound) => report.invalid += 1,
        Err(e) => return Err(stop(e)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nova_password_keys_sort_in_join_order() {
        let mut keys = super::PASSWORD_KEYS;
        keys.sort_unstable();
        assert_eq!(keys, super::PASSWORD_KEYS);
    }
}
