//! The PostgreSQL store, for several replicas behind a load balancer on one database.
//!
//! Same contract as [`super::sqlite`], built for concurrency across processes:
//!
//! - Every mutation but a post is one transaction on a pooled connection (deadpool-postgres). Its
//!   [`Gate`] is awaited after the statements and before `COMMIT`; a refusal rolls back.
//! - Posts are committed in groups ([`sets`]), their gates awaited together before the batch's
//!   `COMMIT`: a lane locks its batch's rows (`FOR NO KEY UPDATE SKIP LOCKED` at
//!   `READ COMMITTED`), decides each post against its locked row, and commits the batch as one
//!   transaction. A post whose row another transaction holds (on any replica) is tried again a
//!   moment later and then reads the row as the holder left it, so of concurrent posts exactly
//!   one finds it unset; the conditional `UPDATE ... WHERE NOT password_set` re-checks it.
//! - Reads (registry rows, sealed records) waiting at the same moment are answered from one
//!   statement per kind ([`reads`]).
//! - Record versions come from a sequence, taken only while the instance's row is locked, so each
//!   instance's version only grows, and is never reused store-wide.
//! - Seal counters are reserved 256 at a time by one autocommit statement on a separate small
//!   pool, so the hot `data_keys` row is locked for one statement, not for the whole transaction
//!   (which waits for the audit fsync), and not once per post. Seals reserved and not used (a
//!   rollback, a restart) stay counted: an over-count, which only brings rotation earlier.
//! - Migrations are versioned in `metapass_schema` and applied at startup under an advisory lock,
//!   so replicas starting together apply each one once.
//!
//! Error messages keep PostgreSQL's SQLSTATE and message only, never its DETAIL (which can quote
//! row values).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use secrecy::ExposeSecret;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Statement};

mod reads;
mod sets;

use super::rules;
use super::{
    AuditAnchor, ClearOutcome, DeleteOutcome, Gate, InstanceRecord, InventoryRow, KeySync,
    KeyUsage, PASSWORD_CHUNK_PREFIX, PASSWORD_FIELD, PasswordRecord, RegisterOutcome, RegisterPlan,
    Registration, ResealFn, RewrapCandidate, RewrapOutcome, SealFn, SetOutcome, Store, StoreError,
    chunks, key_id_from, now_unix, plan_register, stored_project, to_i64, version_from,
};
use crate::config::PostgresSettings;
use crate::crypto::{KeyCheck, KeyId, MAX_SEALS_PER_KEY};
use crate::ids::{InstanceId, ProjectId};

/// The schema, one entry per version; `metapass_schema` records which have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: registry, chunked metadata, data-key bookkeeping and the store-wide version sequence.
    "CREATE TABLE instances (
        instance_id text NOT NULL PRIMARY KEY,
        project_id text NOT NULL,
        password_set boolean NOT NULL DEFAULT false,
        password_version bigint NOT NULL DEFAULT 0 CHECK (password_version >= 0),
        password_key_id bigint,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL
     );
     CREATE TABLE instance_metadata (
        instance_id text NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
        key text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
        value bytea NOT NULL CHECK (octet_length(value) BETWEEN 1 AND 255),
        PRIMARY KEY (instance_id, key)
     );
     CREATE TABLE data_keys (
        key_id bigint NOT NULL PRIMARY KEY CHECK (key_id >= 0),
        check_value bytea NOT NULL CHECK (octet_length(check_value) = 32),
        seals bigint NOT NULL CHECK (seals >= 0),
        first_seen bigint NOT NULL
     );
     CREATE SEQUENCE record_versions AS bigint MINVALUE 1;
     CREATE INDEX instances_by_key ON instances (password_key_id) WHERE password_set;",
    // 2: tombstones: which project a deleted instance id belonged to.
    "CREATE TABLE deleted_instances (
        instance_id text NOT NULL PRIMARY KEY,
        project_id text NOT NULL,
        deleted_at bigint NOT NULL
     );",
    // 3: audit anchors (see `AuditAnchor`): inserted, never updated, so concurrent transactions
    // never wait on one row; the newest per writer counts, older ones are pruned as it grows.
    "CREATE TABLE audit_anchors (
        writer text NOT NULL,
        seq bigint NOT NULL CHECK (seq >= 1),
        mac text NOT NULL,
        PRIMARY KEY (writer, seq)
     );",
];

/// The first anchor a process records in each block of this many sequence numbers also prunes
/// its writer's anchors older than that (see [`AnchorPruning`]).
const ANCHOR_PRUNE_EVERY: u64 = 1024;

/// The advisory lock that serialises migrations between replicas (an arbitrary constant).
const MIGRATION_LOCK: i64 = 0x6d65_7461_7061_7373; // "metapass"

/// Connections of the seal-counter pool: one short statement each, never inside a transaction.
const COUNTER_POOL_SIZE: usize = 4;

/// How long a caller waits for a pooled connection, or for a new one to connect.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    pool: Pool,
    seals: Arc<SealBudget>,
    anchors: Arc<AnchorPruning>,
    /// The set-once lanes, started by the first post (they need the runtime; tools that only
    /// read never start them).
    sets: std::sync::OnceLock<sets::SetQueue>,
    /// The read lanes, started by the first read of each kind.
    instance_reads: std::sync::OnceLock<reads::Coalesced<reads::InstanceRows>>,
    password_reads: std::sync::OnceLock<reads::Coalesced<reads::PasswordRows>>,
    target: String,
}

/// Seals one reservation takes from a key's budget (see [`SealBudget::reserve`]).
const SEAL_LEASE: u64 = 256;

/// The seal counters: a small pool of its own, and the seals this process leased and has not
/// used yet.
struct SealBudget {
    counters: Pool,
    /// Seals reserved in the database and not yet used by this process, per key.
    leases: tokio::sync::Mutex<std::collections::HashMap<KeyId, u64>>,
}

/// When this process last pruned its anchors: a batch records only its newest anchor, so the
/// prune runs when a recorded sequence number enters a new block of [`ANCHOR_PRUNE_EVERY`], not
/// when one happens to be a multiple of it.
#[derive(Debug, Default)]
struct AnchorPruning {
    block: std::sync::atomic::AtomicU64,
}

impl AnchorPruning {
    /// Whether `seq` is the first anchor this process records in its block (then prune).
    fn enters_new_block(&self, seq: u64) -> bool {
        let block = seq / ANCHOR_PRUNE_EVERY;
        block > 0
            && self
                .block
                .fetch_max(block, std::sync::atomic::Ordering::Relaxed)
                < block
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A database error as a store error: SQLSTATE and message, never the DETAIL.
fn db_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(match e.as_db_error() {
        Some(db) => format!("PostgreSQL {}: {}", db.code().code(), db.message()),
        None => format!("PostgreSQL: {e}"),
    })
}

/// A pool error with its causes (a TLS handshake failure says why: unknown issuer, name mismatch).
fn pool_err<E: std::error::Error>(e: E) -> StoreError {
    let mut message = format!("PostgreSQL pool: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    StoreError::Unavailable(message)
}

/// Where a store connects, for logs: host, port and database, never the user's password.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}:{port}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// A rustls client configuration (ring provider) trusting only the roots in `ca_file`.
fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, StoreError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StoreError::Unavailable(format!("{}: {e}", ca_file.display())))?;
    if certs.is_empty() {
        return Err(StoreError::Unavailable(format!(
            "{}: no certificate",
            ca_file.display()
        )));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", ca_file.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| StoreError::Unavailable(format!("database TLS: {e}")))
}

impl PostgresStore {
    /// Connects (TLS when `ca_file` is set, then required), applies migrations, and returns the
    /// store. Fails if the database cannot be reached within a few seconds.
    pub async fn open(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let store = Self::connect(settings)?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without changing the schema, which must be this metapass's; for tools that only
    /// read (`metapass keys status`).
    pub async fn open_existing(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let store = Self::connect(settings)?;
        let conn = store.conn().await?;
        let version: Option<i32> = conn
            .query_opt("SELECT max(version) FROM metapass_schema", &[])
            .await
            .ok()
            .flatten()
            .and_then(|row| row.get(0));
        if usize::try_from(version.unwrap_or(0)).ok() != Some(MIGRATIONS.len()) {
            return Err(StoreError::Unavailable(format!(
                "{} has schema version {}; start this metapass once to migrate it",
                store.target,
                version.unwrap_or(0)
            )));
        }
        drop(conn);
        Ok(store)
    }

    /// The pools, without connecting yet.
    fn connect(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = settings
            .url
            .expose_secret()
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("the PostgreSQL URL: {e}")))?;
        if let Some(password) = &settings.password {
            config.password(password.expose_secret().as_bytes());
        }
        if config.get_application_name().is_none() {
            config.application_name("metapass");
        }
        config.connect_timeout(POOL_TIMEOUT);
        let target = describe(&config);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = |config: tokio_postgres::Config| -> Result<Manager, StoreError> {
            Ok(match &settings.ca_file {
                Some(ca) => {
                    let mut config = config;
                    config.ssl_mode(tokio_postgres::config::SslMode::Require);
                    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(ca)?);
                    Manager::from_config(config, tls, manager_config.clone())
                }
                None => Manager::from_config(config, NoTls, manager_config.clone()),
            })
        };
        let build = |size: usize| -> Result<Pool, StoreError> {
            Pool::builder(manager(config.clone())?)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(POOL_TIMEOUT))
                .create_timeout(Some(POOL_TIMEOUT))
                .recycle_timeout(Some(POOL_TIMEOUT))
                .build()
                .map_err(pool_err)
        };
        Ok(Self {
            pool: build(settings.pool_size.max(1))?,
            seals: Arc::new(SealBudget {
                counters: build(COUNTER_POOL_SIZE)?,
                leases: tokio::sync::Mutex::new(std::collections::HashMap::new()),
            }),
            anchors: Arc::default(),
            sets: std::sync::OnceLock::new(),
            instance_reads: std::sync::OnceLock::new(),
            password_reads: std::sync::OnceLock::new(),
            target,
        })
    }

    /// A pooled connection: not after the request's deadline, nor waiting for one past it.
    async fn conn(&self) -> Result<Object, StoreError> {
        super::within_deadline(async { self.pool.get().await.map_err(pool_err) }).await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db_err)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS metapass_schema (
                version integer NOT NULL PRIMARY KEY,
                applied_at bigint NOT NULL
             )",
        )
        .await
        .map_err(db_err)?;
        let applied: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM metapass_schema", &[])
            .await
            .map_err(db_err)?
            .get(0);
        let applied = usize::try_from(applied)
            .map_err(|_| StoreError::Corrupt(format!("negative schema version {applied}")))?;
        if applied > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {applied} is newer than this metapass knows ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            tx.batch_execute(sql).await.map_err(db_err)?;
            let version = i32::try_from(i + 1).expect("a handful of migrations fit in i32");
            tx.execute(
                "INSERT INTO metapass_schema (version, applied_at) VALUES ($1, $2)",
                &[&version, &now_unix()],
            )
            .await
            .map_err(db_err)?;
            tracing::info!(version = i + 1, "applied PostgreSQL schema migration");
        }
        tx.commit().await.map_err(db_err)
    }
}

impl SealBudget {
    /// Takes one seal from `key_id`'s budget. The budget is leased from the database
    /// [`SEAL_LEASE`] seals at a time, in one short autocommit statement (see the module docs):
    /// one counter update per seal made every post wait for its own database commit, which held
    /// POSTs on PostgreSQL to about 750 per second. Seals leased and unused when the process ends
    /// stay counted, which only brings rotation earlier; near the limit, single seals are taken.
    async fn reserve(&self, key_id: KeyId) -> Result<(), StoreError> {
        let mut leases = self.leases.lock().await;
        if let Some(left) = leases.get_mut(&key_id).filter(|left| **left > 0) {
            *left -= 1;
            return Ok(());
        }
        let conn = self.counters.get().await.map_err(pool_err)?;
        let limit = to_i64(MAX_SEALS_PER_KEY);
        let key = i64::from(key_id);
        for lease in [SEAL_LEASE, 1] {
            let taken = conn
                .execute(
                    "UPDATE data_keys SET seals = seals + $3 WHERE key_id = $1 AND seals + $3 <= $2",
                    &[&key, &limit, &to_i64(lease)],
                )
                .await
                .map_err(db_err)?;
            if taken == 1 {
                leases.insert(key_id, lease - 1);
                return Ok(());
            }
        }
        let known = conn
            .query_opt("SELECT 1 FROM data_keys WHERE key_id = $1", &[&key])
            .await
            .map_err(db_err)?;
        Err(rules::seal_refused(key_id, known.is_some()))
    }
}

/// Calls the gate with `outcome` and commits only if it lets the transaction through.
async fn settle<O>(
    tx: Transaction<'_>,
    anchors: &AnchorPruning,
    gate: Gate<O>,
    outcome: O,
) -> Result<O, StoreError> {
    let Ok(anchor) = gate(&outcome).await else {
        let _ = tx.rollback().await;
        return Err(StoreError::GateRefused { gate_passed: false });
    };
    if let Some(anchor) = anchor
        && let Err(e) = record_anchor(&tx, anchors, &anchor).await
    {
        let _ = tx.rollback().await;
        return Err(StoreError::NotCommitted {
            gate_passed: true,
            cause: format!("the audit anchor could not be recorded: {e}"),
        });
    }
    // Not pipelined with the anchor's INSERT: a COMMIT sent behind a failed statement is
    // answered as a ROLLBACK without an error, and tokio-postgres's Transaction cannot be ended
    // without sending its own COMMIT or ROLLBACK (one more round trip, or a warning in
    // PostgreSQL's log for every post).
    match tx.commit().await {
        Ok(()) => Ok(outcome),
        Err(e) => Err(StoreError::NotCommitted {
            gate_passed: true,
            cause: match db_err(e) {
                StoreError::Unavailable(cause) => cause,
                other => other.to_string(),
            },
        }),
    }
}

/// Records `anchor` in the mutation's transaction (see migration 3).
async fn record_anchor(
    tx: &Transaction<'_>,
    anchors: &AnchorPruning,
    anchor: &AuditAnchor,
) -> Result<(), StoreError> {
    let insert = prepared(
        tx,
        "INSERT INTO audit_anchors (writer, seq, mac) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .await?;
    tx.execute(
        &insert,
        &[&&*anchor.writer, &to_i64(anchor.seq), &anchor.mac],
    )
    .await
    .map_err(db_err)?;
    if anchors.enters_new_block(anchor.seq) {
        prune_anchors(tx, anchor).await?;
    }
    Ok(())
}

/// Keeps the anchor table small: the anchors of this writer more than [`ANCHOR_PRUNE_EVERY`]
/// sequence numbers older than `anchor` are removed, in the same transaction.
async fn prune_anchors(tx: &Transaction<'_>, anchor: &AuditAnchor) -> Result<(), StoreError> {
    let keep_from = to_i64(anchor.seq) - to_i64(ANCHOR_PRUNE_EVERY);
    tx.execute(
        "DELETE FROM audit_anchors WHERE writer = $1 AND seq < $2",
        &[&&*anchor.writer, &keep_from],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

async fn instance_row(
    client: &impl GenericClient,
    id: &str,
) -> Result<Option<InstanceRecord>, StoreError> {
    let row = client
        .query_opt(
            &prepared(
                client,
                "SELECT project_id, password_set, password_version FROM instances
                 WHERE instance_id = $1",
            )
            .await?,
            &[&id],
        )
        .await
        .map_err(db_err)?;
    row.map(|r| {
        Ok(InstanceRecord {
            project_id: stored_project(r.get(0))?,
            password_set: r.get(1),
            password_version: version_from(r.get(2))?,
        })
    })
    .transpose()
}

/// What is waiting in a lanes' queue, at most `max` items, once there is at least one; `None`
/// when the queue is closed and empty. One lane at a time waits on the queue, so each batch takes
/// everything that arrived while the others were busy.
async fn take_waiting<T>(
    waiting: &tokio::sync::Mutex<tokio::sync::mpsc::Receiver<T>>,
    max: usize,
) -> Option<Vec<T>> {
    let mut waiting = waiting.lock().await;
    let first = waiting.recv().await?;
    let mut batch = Vec::with_capacity(max);
    batch.push(first);
    while batch.len() < max {
        match waiting.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// An instance row selected as `instance_id, project_id, password_set, password_version`, or why
/// it cannot be read (for the batches, where one bad row must not fail the others).
fn row_record(row: &tokio_postgres::Row) -> Result<InstanceRecord, String> {
    let read = || -> Result<InstanceRecord, StoreError> {
        Ok(InstanceRecord {
            project_id: stored_project(row.get(1))?,
            password_set: row.get(2),
            password_version: version_from(row.get(3))?,
        })
    };
    read().map_err(|e| match e {
        StoreError::Corrupt(why) => why,
        other => other.to_string(),
    })
}

/// A statement prepared once per connection: an unprepared one costs a Parse round trip (and
/// the server's planning) every time, which on the hot paths was half of their round trips.
async fn prepared(client: &impl GenericClient, sql: &str) -> Result<Statement, StoreError> {
    client.prepare_cached(sql).await.map_err(db_err)
}

/// Replaces the password chunks of `id` with those of `sealed`: the DELETE and the INSERT are
/// pipelined on the connection (one round trip), and run in the caller's transaction in the
/// order they are sent.
async fn write_chunks(tx: &Transaction<'_>, id: &str, sealed: &[u8]) -> Result<(), StoreError> {
    let delete = prepared(tx, DELETE_CHUNKS).await?;
    let params: [&(dyn ToSql + Sync); 2] = [&id, &PASSWORD_CHUNK_PREFIX];
    let (deleted, inserted) =
        tokio::join!(tx.execute(&delete, &params), insert_chunks(tx, id, sealed));
    deleted.map_err(db_err)?;
    inserted
}

/// Inserts every chunk of `sealed` in one statement (`unnest` of two arrays), however many
/// chunks there are.
async fn insert_chunks(tx: &Transaction<'_>, id: &str, sealed: &[u8]) -> Result<(), StoreError> {
    let (keys, values): (Vec<String>, Vec<&[u8]>) =
        chunks::split(PASSWORD_FIELD, sealed).into_iter().unzip();
    let insert = prepared(
        tx,
        "INSERT INTO instance_metadata (instance_id, key, value)
         SELECT $1, key, value FROM unnest($2::text[], $3::bytea[]) AS chunk (key, value)",
    )
    .await?;
    tx.execute(&insert, &[&id, &keys, &values])
        .await
        .map_err(db_err)?;
    Ok(())
}

const DELETE_CHUNKS: &str =
    "DELETE FROM instance_metadata WHERE instance_id = $1 AND starts_with(key, $2)";

async fn delete_chunks(tx: &Transaction<'_>, id: &str) -> Result<(), StoreError> {
    tx.execute(
        &prepared(tx, DELETE_CHUNKS).await?,
        &[&id, &PASSWORD_CHUNK_PREFIX],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// The next record version; call only while holding the instance's row lock.
async fn next_version(tx: &Transaction<'_>) -> Result<u64, StoreError> {
    let v: i64 = tx
        .query_one(
            &prepared(tx, "SELECT nextval('record_versions')").await?,
            &[],
        )
        .await
        .map_err(db_err)?
        .get(0);
    version_from(v)
}

impl Store for PostgresStore {
    async fn register(
        &self,
        id: &InstanceId,
        project: &ProjectId,
        how: Registration,
        gate: Gate<RegisterOutcome>,
    ) -> Result<RegisterOutcome, StoreError> {
        let (id, project) = (id.as_str(), project.as_str());
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let existing = instance_row(&tx, id).await?;
        let tombstone: Option<String> = tx
            .query_opt(
                "SELECT project_id FROM deleted_instances WHERE instance_id = $1",
                &[&id],
            )
            .await
            .map_err(db_err)?
            .map(|row| row.get(0));
        let plan = plan_register(
            existing.as_ref().map(|r| r.project_id.as_str()),
            tombstone.as_deref(),
            project,
            how,
        );
        if let RegisterPlan::Answer(outcome) = plan {
            return settle(tx, &self.anchors, gate, outcome).await;
        }
        let inserted = tx
            .execute(
                "INSERT INTO instances (instance_id, project_id, created_at, updated_at)
                 VALUES ($1, $2, $3, $3) ON CONFLICT (instance_id) DO NOTHING",
                &[&id, &project, &now_unix()],
            )
            .await
            .map_err(db_err)?;
        let outcome = if inserted == 1 {
            tx.execute(
                "DELETE FROM deleted_instances WHERE instance_id = $1",
                &[&id],
            )
            .await
            .map_err(db_err)?;
            RegisterOutcome::Created
        } else {
            let existing = instance_row(&tx, id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("conflicting row vanished".into()))?;
            if existing.project_id.as_str() == project {
                RegisterOutcome::Unchanged
            } else {
                RegisterOutcome::OwnedByOther
            }
        };
        settle(tx, &self.anchors, gate, outcome).await
    }

    async fn instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>, StoreError> {
        let reads = self
            .instance_reads
            .get_or_init(|| reads::Coalesced::start(self.pool.clone()));
        super::within_deadline(reads.read(id)).await
    }

    async fn password(&self, id: &InstanceId) -> Result<Option<Arc<PasswordRecord>>, StoreError> {
        let reads = self
            .password_reads
            .get_or_init(|| reads::Coalesced::start(self.pool.clone()));
        super::within_deadline(reads.read(id)).await
    }

    async fn set_password_once(
        &self,
        id: &InstanceId,
        project: &ProjectId,
        key_id: KeyId,
        seal: SealFn,
        gate: Gate<SetOutcome>,
    ) -> Result<SetOutcome, StoreError> {
        let queue = self.sets.get_or_init(|| {
            sets::SetQueue::start(
                self.pool.clone(),
                Arc::clone(&self.seals),
                Arc::clone(&self.anchors),
            )
        });
        queue.submit(id, project, key_id, seal, gate).await
    }

    async fn sync_keys(
        &self,
        checks: Vec<(KeyId, KeyCheck)>,
        gate: Gate<KeySync>,
    ) -> Result<KeySync, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let mut outcome = KeySync::default();
        for (id, check) in &checks {
            // Insert if new (a replica starting at the same time waits here for the other's
            // commit), then compare what is recorded.
            let key = i64::from(*id);
            let added = tx
                .execute(
                    "INSERT INTO data_keys (key_id, check_value, seals, first_seen)
                     VALUES ($1, $2,
                       (SELECT count(*) FROM instances WHERE password_set AND password_key_id = $1),
                       $3)
                     ON CONFLICT (key_id) DO NOTHING",
                    &[&key, &check.as_slice(), &now_unix()],
                )
                .await
                .map_err(db_err)?;
            if added == 1 {
                outcome.added.push(*id);
                continue;
            }
            let stored: Vec<u8> = tx
                .query_one(
                    "SELECT check_value FROM data_keys WHERE key_id = $1",
                    &[&key],
                )
                .await
                .map_err(db_err)?
                .get(0);
            use subtle::ConstantTimeEq;
            if !bool::from(stored.as_slice().ct_eq(check.as_slice())) {
                outcome.mismatched.push(*id);
            }
        }
        if !outcome.mismatched.is_empty() {
            // Nothing is recorded when any key mismatches: undo this transaction's inserts.
            let added: Vec<i64> = outcome.added.iter().map(|id| i64::from(*id)).collect();
            tx.execute("DELETE FROM data_keys WHERE key_id = ANY($1)", &[&added])
                .await
                .map_err(db_err)?;
            outcome.added.clear();
        }
        settle(tx, &self.anchors, gate, outcome).await
    }

    async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        let conn = self.conn().await?;
        let mut usage = std::collections::BTreeMap::<KeyId, KeyUsage>::new();
        for row in conn
            .query("SELECT key_id, seals FROM data_keys", &[])
            .await
            .map_err(db_err)?
        {
            let key_id = key_id_from(row.get(0))?;
            usage.insert(
                key_id,
                KeyUsage {
                    key_id,
                    records: 0,
                    seals: version_from(row.get(1))?,
                    known: true,
                },
            );
        }
        for row in conn
            .query(
                "SELECT password_key_id, count(*) FROM instances
                 WHERE password_set AND password_key_id IS NOT NULL GROUP BY password_key_id",
                &[],
            )
            .await
            .map_err(db_err)?
        {
            let key_id = key_id_from(row.get(0))?;
            let entry = usage.entry(key_id).or_insert(KeyUsage {
                key_id,
                records: 0,
                seals: 0,
                known: false,
            });
            entry.records = version_from(row.get(1))?;
        }
        Ok(usage.into_values().collect())
    }

    async fn rewrap_candidates(
        &self,
        active: KeyId,
        after: Option<&InstanceId>,
        limit: usize,
    ) -> Result<Vec<RewrapCandidate>, StoreError> {
        let conn = self.conn().await?;
        let after = after.map_or("", |a| a.as_str());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = conn
            .query(
                "SELECT instance_id, password_version, password_key_id, project_id FROM instances
                 WHERE password_set AND password_key_id IS NOT NULL
                   AND password_key_id <> $1 AND instance_id > $2
                 ORDER BY instance_id LIMIT $3",
                &[&i64::from(active), &after, &limit],
            )
            .await
            .map_err(db_err)?;
        rows.into_iter()
            .map(|row| {
                let id: String = row.get(0);
                Ok(RewrapCandidate {
                    id: InstanceId::parse(&id)
                        .map_err(|_| StoreError::Corrupt(format!("bad instance id {id:?}")))?,
                    project: stored_project(row.get(3))?,
                    version: version_from(row.get(1))?,
                    key_id: key_id_from(row.get(2))?,
                })
            })
            .collect()
    }

    async fn rewrap(
        &self,
        candidate: &RewrapCandidate,
        to_key: KeyId,
        reseal: ResealFn,
        gate: Gate<RewrapOutcome>,
    ) -> Result<RewrapOutcome, StoreError> {
        let id = candidate.id.as_str();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        // Lock the row, then check it is still the record that was listed.
        let current = tx
            .query_opt(
                "SELECT password_set, password_version, password_key_id FROM instances
                 WHERE instance_id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(db_err)?;
        let current = current.map(|row| {
            let (set, version, key): (bool, i64, Option<i64>) =
                (row.get(0), row.get(1), row.get(2));
            rules::SealedState {
                set,
                version: version_from(version).ok(),
                key_id: key.and_then(|k| key_id_from(k).ok()),
            }
        });
        let outcome = if !rules::still_listed(current, candidate) {
            RewrapOutcome::Skipped
        } else {
            let stored: Vec<(String, Vec<u8>)> = tx
                .query(
                    "SELECT key, value FROM instance_metadata
                     WHERE instance_id = $1 AND starts_with(key, $2)",
                    &[&id, &PASSWORD_CHUNK_PREFIX],
                )
                .await
                .map_err(db_err)?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            match chunks::join(PASSWORD_FIELD, &stored) {
                Err(_) => RewrapOutcome::Unreadable {
                    from: candidate.key_id,
                },
                Ok(old) => {
                    let version = next_version(&tx).await?;
                    self.seals.reserve(to_key).await?;
                    match reseal(&old, candidate.version, version)? {
                        // Left as it is; the version and seal taken are spent unused (harmless).
                        Err(_) => RewrapOutcome::Unreadable {
                            from: candidate.key_id,
                        },
                        Ok(sealed) => {
                            rules::check_sealed_under(&sealed, to_key)?;
                            write_chunks(&tx, id, &sealed).await?;
                            tx.execute(
                                "UPDATE instances
                                 SET password_version = $2, password_key_id = $3, updated_at = $4
                                 WHERE instance_id = $1",
                                &[&id, &to_i64(version), &i64::from(to_key), &now_unix()],
                            )
                            .await
                            .map_err(db_err)?;
                            RewrapOutcome::Rewrapped {
                                from: candidate.key_id,
                                version,
                            }
                        }
                    }
                }
            }
        };
        settle(tx, &self.anchors, gate, outcome).await
    }

    async fn clear_password(
        &self,
        id: &InstanceId,
        gate: Gate<ClearOutcome>,
    ) -> Result<ClearOutcome, StoreError> {
        let id = id.as_str();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        // Lock the row first, so the version is taken while it is held.
        let before = tx
            .query_opt(
                &prepared(
                    &tx,
                    "SELECT password_set FROM instances WHERE instance_id = $1 FOR UPDATE",
                )
                .await?,
                &[&id],
            )
            .await
            .map_err(db_err)?;
        let outcome = match before {
            None => ClearOutcome::NotFound,
            Some(row) => {
                let was_set: bool = row.get(0);
                let version = next_version(&tx).await?;
                tx.execute(
                    &prepared(
                        &tx,
                        "UPDATE instances
                         SET password_set = false, password_version = $2,
                             password_key_id = NULL, updated_at = $3
                         WHERE instance_id = $1",
                    )
                    .await?,
                    &[&id, &to_i64(version), &now_unix()],
                )
                .await
                .map_err(db_err)?;
                delete_chunks(&tx, id).await?;
                ClearOutcome::Cleared { was_set, version }
            }
        };
        settle(tx, &self.anchors, gate, outcome).await
    }

    async fn delete_instance(
        &self,
        id: &InstanceId,
        gate: Gate<DeleteOutcome>,
    ) -> Result<DeleteOutcome, StoreError> {
        let id = id.as_str();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        tx.execute(
            "DELETE FROM instance_metadata WHERE instance_id = $1",
            &[&id],
        )
        .await
        .map_err(db_err)?;
        let deleted_from: Option<String> = tx
            .query_opt(
                "DELETE FROM instances WHERE instance_id = $1 RETURNING project_id",
                &[&id],
            )
            .await
            .map_err(db_err)?
            .map(|row| row.get(0));
        let outcome = match deleted_from {
            Some(project) => {
                // The tombstone: no notification or import may give this id to another project.
                tx.execute(
                    "INSERT INTO deleted_instances (instance_id, project_id, deleted_at)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (instance_id) DO UPDATE SET project_id = excluded.project_id,
                        deleted_at = excluded.deleted_at",
                    &[&id, &project, &now_unix()],
                )
                .await
                .map_err(db_err)?;
                DeleteOutcome::Deleted
            }
            None => DeleteOutcome::NotFound,
        };
        settle(tx, &self.anchors, gate, outcome).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.query_one("SELECT 1", &[]).await.map_err(db_err)?;
        Ok(())
    }

    async fn inventory(&self) -> Result<Vec<InventoryRow>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT instance_id, project_id, password_set, password_version, password_key_id
                 FROM instances ORDER BY instance_id",
                &[],
            )
            .await
            .map_err(db_err)?;
        rows.into_iter()
            .map(|row| {
                Ok(InventoryRow {
                    id: row.get(0),
                    project: row.get(1),
                    password_set: row.get(2),
                    version: version_from(row.get(3))?,
                    key_id: row.get::<_, Option<i64>>(4).map(key_id_from).transpose()?,
                })
            })
            .collect()
    }

    async fn audit_anchor(&self, writer: &str) -> Result<Option<AuditAnchor>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT seq, mac FROM audit_anchors WHERE writer = $1 ORDER BY seq DESC LIMIT 1",
                &[&writer],
            )
            .await
            .map_err(db_err)?;
        row.map(|row| {
            Ok(AuditAnchor {
                writer: writer.into(),
                seq: version_from(row.get(0))?,
                mac: row.get(1),
            })
        })
        .transpose()
    }

    async fn forget_audit_anchor(&self, writer: &str) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.execute("DELETE FROM audit_anchors WHERE writer = $1", &[&writer])
            .await
            .map_err(db_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_pruned_once_per_block_whatever_numbers_the_batches_record() {
        let pruning = AnchorPruning::default();
        // Batches record only their newest anchor, so the numbers skip the multiples.
        assert!(!pruning.enters_new_block(1000));
        assert!(pruning.enters_new_block(1030));
        assert!(!pruning.enters_new_block(1500));
        assert!(!pruning.enters_new_block(1029));
        assert!(pruning.enters_new_block(2051));
        assert!(pruning.enters_new_block(5000));
        assert!(!pruning.enters_new_block(4100));
    }
}
