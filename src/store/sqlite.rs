//! The embedded default store: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! Writes go through one writer thread that owns the only write connection. It takes every job that
//! is queued (up to [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE` transaction (each inside its
//! own savepoint), waits for every job's [`Gate`], and commits once: one fsync for the whole batch,
//! which is what makes durable set-once fast under concurrency. If any gate refuses, the whole batch
//! rolls back and every job learns whether its own gate had passed.
//!
//! Reads use a small pool of read-only connections and run inline on the calling task: a primary-key
//! read in WAL mode never waits for the writer, and takes microseconds.
//!
//! `secure_delete` is on, and a batch that purged a password checkpoints and truncates the WAL, so
//! bytes of a cleared or deleted record do not linger in the files.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::read_cache::{ReadCache, Touches};
use super::rules;
use super::{
    AuditAnchor, ClearOutcome, DeleteOutcome, Gate, GateDenied, GateTicket, InstanceRecord,
    InventoryRow, KeySync, KeyUsage, PASSWORD_CHUNK_PREFIX, PASSWORD_FIELD, PasswordRecord,
    RegisterOutcome, RegisterPlan, Registration, ResealFn, RewrapCandidate, RewrapOutcome, SealFn,
    SetOutcome, Store, StoreError, chunks, key_id_from, now_unix, plan_register, stored_project,
    to_i64, version_from,
};
use crate::crypto::{KeyCheck, KeyId, MAX_SEALS_PER_KEY};
use crate::ids::{InstanceId, ProjectId};

/// The most jobs committed in one transaction.
pub const MAX_BATCH: usize = 512;
/// How many write jobs may wait for the writer before callers wait to enqueue.
pub const QUEUE_CAPACITY: usize = 4096;
/// How many idle read connections are kept.
const MAX_IDLE_READERS: usize = 16;
/// How long a connection waits on a lock held by another process before failing.
const BUSY_TIMEOUT_MS: u32 = 5_000;

/// The schema, one entry per version; `PRAGMA user_version` records how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: registry and chunked metadata.
    "CREATE TABLE instances (
        instance_id TEXT NOT NULL PRIMARY KEY,
        project_id TEXT NOT NULL,
        password_set INTEGER NOT NULL DEFAULT 0 CHECK (password_set IN (0, 1)),
        password_version INTEGER NOT NULL DEFAULT 0 CHECK (password_version >= 0),
        password_key_id INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE instance_metadata (
        instance_id TEXT NOT NULL REFERENCES instances(instance_id) ON DELETE CASCADE,
        key TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
        value BLOB NOT NULL CHECK (length(value) BETWEEN 1 AND 255),
        PRIMARY KEY (instance_id, key)
     ) STRICT, WITHOUT ROWID;",
    // 2: data-key bookkeeping (check values, seal counters) and the store-wide version sequence.
    "CREATE TABLE data_keys (
        key_id INTEGER NOT NULL PRIMARY KEY CHECK (key_id >= 0),
        check_value BLOB NOT NULL CHECK (length(check_value) = 32),
        seals INTEGER NOT NULL CHECK (seals >= 0),
        first_seen INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE record_versions (
        id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
        last INTEGER NOT NULL CHECK (last >= 0)
     ) STRICT;
     INSERT INTO record_versions (id, last)
        SELECT 1, coalesce(max(password_version), 0) FROM instances;
     CREATE INDEX instances_by_key ON instances (password_key_id) WHERE password_set = 1;",
    // 3: tombstones: which project a deleted instance id belonged to.
    "CREATE TABLE deleted_instances (
        instance_id TEXT NOT NULL PRIMARY KEY,
        project_id TEXT NOT NULL,
        deleted_at INTEGER NOT NULL
     ) STRICT;",
    // 4: the newest audit anchor per log writer (see `AuditAnchor`).
    "CREATE TABLE audit_anchor (
        writer TEXT NOT NULL PRIMARY KEY,
        seq INTEGER NOT NULL CHECK (seq >= 1),
        mac TEXT NOT NULL
     ) STRICT;",
];

/// A job for the writer thread: runs inside the batch transaction, then hears how the batch ended.
trait Job: Send {
    /// Runs the job's statements and calls its gate with the outcome.
    fn execute(&mut self, conn: &Connection) -> Result<GateTicket, StoreError>;
    /// Whether the job removes sealed bytes: a clear, a delete, a rewrap (the batch then
    /// truncates the WAL).
    fn purges(&self) -> bool;
    /// Delivers the result: `None` if the batch committed, or why this job's work was lost.
    fn finish(self: Box<Self>, failure: Option<StoreError>);
    /// The deadline of the request it works for: past it, the job is not started.
    fn deadline(&self) -> Option<tokio::time::Instant>;
    /// What it may change that a cached read could have seen.
    fn touches(&self) -> &Touches;
}

struct TypedJob<O, F> {
    run: Option<F>,
    gate: Option<Gate<O>>,
    outcome: Option<O>,
    reply: Option<oneshot::Sender<Result<O, StoreError>>>,
    purges: bool,
    deadline: Option<tokio::time::Instant>,
    touches: Touches,
}

impl<O, F> Job for TypedJob<O, F>
where
    O: Send + 'static,
    F: FnOnce(&Connection) -> Result<O, StoreError> + Send,
{
    fn execute(&mut self, conn: &Connection) -> Result<GateTicket, StoreError> {
        let run = self.run.take().expect("a job executes once");
        let outcome = run(conn)?;
        let gate = self.gate.take().expect("a job executes once");
        let ticket = gate(&outcome);
        self.outcome = Some(outcome);
        Ok(ticket)
    }

    fn purges(&self) -> bool {
        self.purges
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    fn touches(&self) -> &Touches {
        &self.touches
    }

    fn finish(mut self: Box<Self>, failure: Option<StoreError>) {
        let result = match (failure, self.outcome.take()) {
            (None, Some(outcome)) => Ok(outcome),
            (Some(e), _) => Err(e),
            (None, None) => Err(StoreError::Unavailable("job did not run".into())),
        };
        if let Some(reply) = self.reply.take() {
            // The caller may have gone away (connection closed); the result is then unneeded.
            let _ = reply.send(result);
        }
    }
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    jobs: mpsc::Sender<Box<dyn Job>>,
    readers: Mutex<Vec<Connection>>,
    /// Sealed records recently read (see [`super::read_cache`]).
    cache: Arc<ReadCache>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600 in a 0700 directory) the database at `path`, applies
    /// migrations, and starts the writer thread. Must be called inside a Tokio runtime: the writer
    /// waits for gates on it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        }
        // Create the file ourselves so it is never world-readable, even for an instant. SQLite gives
        // the -wal and -shm files the database file's mode.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Unavailable(format!("opening {}: {e}", path.display())))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Unavailable(format!("chmod {}: {e}", path.display())))?;

        let mut conn = Connection::open(path).map_err(db_err)?;
        configure_writer(&conn)?;
        migrate(&mut conn)?;

        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Unavailable("the SQLite store needs a Tokio runtime".into())
        })?;
        let cache = Arc::new(ReadCache::default());
        let invalidated = cache.clone();
        thread::Builder::new()
            .name("metapass-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, runtime, &invalidated))
            .map_err(|e| StoreError::Unavailable(format!("starting writer: {e}")))?;
        Ok(Self {
            path: path.to_owned(),
            jobs: tx,
            readers: Mutex::new(Vec::new()),
            cache,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a pooled read-only connection (not after the request's deadline).
    fn read<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        super::check_deadline()?;
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_reader(&self.path)?,
        };
        let result = f(&conn);
        let mut idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }

    /// A password record as the database holds it now, past the read cache: what a GET cost
    /// before the cache, and what every miss still costs (benches/hot_path.rs compares the two).
    pub fn password_from_database(
        &self,
        id: &InstanceId,
    ) -> Result<Option<PasswordRecord>, StoreError> {
        // Two primary-key reads in one read transaction (one WAL snapshot, so the row and its
        // chunks are consistent). A single LEFT JOIN was re-prepared by SQLite on every execution
        // (the bound id is propagated into the join), costing four times as much.
        self.read(|conn| {
            let snapshot = conn.unchecked_transaction().map_err(db_err)?;
            let Some(instance) = instance_row(&snapshot, id.as_str())? else {
                return Ok(None);
            };
            let mut stmt = snapshot
                .prepare_cached("SELECT key, value FROM instance_metadata WHERE instance_id = ?1")
                .map_err(db_err)?;
            let mut rows = stmt.query(params![id.as_str()]).map_err(db_err)?;
            let mut record = PasswordRecord {
                instance,
                chunks: Vec::new(),
            };
            while let Some(row) = rows.next().map_err(db_err)? {
                let key: String = row.get(0).map_err(db_err)?;
                if !key.starts_with(PASSWORD_CHUNK_PREFIX) {
                    continue;
                }
                if record.chunks.len() >= chunks::MAX_CHUNKS {
                    return Err(StoreError::Corrupt("too many password chunks".into()));
                }
                record.chunks.push((key, row.get(1).map_err(db_err)?));
            }
            drop(rows);
            drop(stmt);
            snapshot.commit().map_err(db_err)?;
            Ok(Some(record))
        })
    }

    /// Hands a job to the writer thread and waits for its result.
    async fn write<O, F>(
        &self,
        gate: Gate<O>,
        purges: bool,
        touches: Touches,
        run: F,
    ) -> Result<O, StoreError>
    where
        O: Send + 'static,
        F: FnOnce(&Connection) -> Result<O, StoreError> + Send + 'static,
    {
        super::check_deadline()?;
        let deadline = super::request_deadline();
        let (reply, result) = oneshot::channel();
        let job = TypedJob {
            run: Some(run),
            gate: Some(gate),
            outcome: None,
            reply: Some(reply),
            purges,
            deadline,
            touches,
        };
        // Each batch is bounded by one audit deadline and the busy timeout.
        super::enqueue(&self.jobs, Box::new(job), deadline, "the writer thread").await?;
        result
            .await
            .map_err(|_| StoreError::Unavailable("the writer thread dropped the job".into()))?
    }
}

fn configure_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS.into()))
        .map_err(db_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(db_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "journal_mode is {mode}, not wal"
        )));
    }
    // Every statement the writer runs stays prepared (rusqlite keeps 16 by default; the writer
    // has more).
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA secure_delete = ON;",
    )
    .map_err(db_err)
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS.into()))
        .map_err(db_err)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    let applied = usize::try_from(applied)
        .map_err(|_| StoreError::Corrupt(format!("negative schema version {applied}")))?;
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {applied} is newer than this metapass knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        let version = i64::try_from(i + 1).expect("a handful of migrations fit in i64");
        tx.pragma_update(None, "user_version", version)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(version = i + 1, "applied SQLite schema migration");
    }
    Ok(())
}

fn writer_loop(
    mut conn: Connection,
    mut jobs: mpsc::Receiver<Box<dyn Job>>,
    runtime: tokio::runtime::Handle,
    cache: &ReadCache,
) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // No job starts after its request's deadline (it waited behind a slow batch).
        let now = crate::clock::io_now_tokio();
        let (late, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|job| job.deadline().is_some_and(|d| now >= d));
        for job in late {
            job.finish(Some(StoreError::DeadlinePassed));
        }
        if !batch.is_empty() {
            run_batch(&mut conn, batch, &runtime, cache);
        }
    }
    tracing::debug!("SQLite writer stopped: no more senders");
}

/// Runs one batch of writes in one transaction: each job, then every gate, then one commit (or a
/// rollback of all). Long on purpose: the group commit's order (no commit before every gate said
/// yes) is the audit guarantee, and reads as one sequence.
fn run_batch(
    conn: &mut Connection,
    mut batch: Vec<Box<dyn Job>>,
    runtime: &tokio::runtime::Handle,
    cache: &ReadCache,
) {
    let purges = batch.iter().any(|j| j.purges());
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let cause = e.to_string();
            for job in batch {
                job.finish(Some(StoreError::NotCommitted {
                    gate_passed: false,
                    cause: cause.clone(),
                }));
            }
            return;
        }
    };

    // Run every job in its own savepoint, so one job's error undoes only its own statements. The
    // gates' events reach the audit writer together, when the last job has run.
    let mut tickets: Vec<Option<GateTicket>> = Vec::with_capacity(batch.len());
    let mut errors: Vec<Option<StoreError>> = Vec::with_capacity(batch.len());
    crate::audit::submitted_together(|| {
        for job in batch.iter_mut() {
            let result = cached(&tx, "SAVEPOINT job").and_then(|()| job.execute(&tx));
            match result {
                Ok(ticket) => {
                    let released = cached(&tx, "RELEASE job");
                    tickets.push(Some(ticket));
                    errors.push(released.err());
                }
                Err(e) => {
                    let _ = tx.execute_batch("ROLLBACK TO job; RELEASE job");
                    tickets.push(None);
                    errors.push(Some(e));
                }
            }
        }
    });

    // Wait for every gate (the audit events of the whole batch) together, then commit once: the
    // batch waits as long as its slowest ticket (each bounded by its own deadline, fixed when its
    // event was queued), never the sum of them.
    let results: Vec<Option<Result<Option<AuditAnchor>, GateDenied>>> = runtime.block_on(
        futures_util::future::join_all(tickets.into_iter().map(|ticket| async move {
            match ticket {
                Some(t) => Some(t.await),
                None => None,
            }
        })),
    );
    let verdicts: Vec<Option<bool>> = results
        .iter()
        .map(|r| r.as_ref().map(Result::is_ok))
        .collect();
    let gates_passed = verdicts.iter().all(|v| *v != Some(false));
    // The batch records the newest anchor its events reached, in the same transaction.
    let anchor = AuditAnchor::newest(results.iter().filter_map(|r| {
        r.as_ref()
            .and_then(|r| r.as_ref().ok())
            .and_then(Option::as_ref)
    }));
    let anchored = match (gates_passed, anchor) {
        (true, Some(anchor)) => record_anchor(&tx, anchor).map_err(|e| e.to_string()),
        _ => Ok(()),
    };
    // A job that ran (it has a verdict) but whose savepoint could not be released is in an
    // unknown state: do not commit it.
    let released = errors
        .iter()
        .zip(&verdicts)
        .all(|(e, v)| e.is_none() || v.is_none());
    let commit = if !gates_passed {
        let _ = tx.rollback();
        Err(None)
    } else if !released {
        let _ = tx.rollback();
        Err(Some("a savepoint could not be released".to_owned()))
    } else if let Err(cause) = anchored {
        let _ = tx.rollback();
        Err(Some(format!(
            "the audit anchor could not be recorded: {cause}"
        )))
    } else {
        tx.commit().map_err(|e| Some(e.to_string()))
    };
    // Before any job is answered: a reader that starts after an acknowledgement reads the new
    // state. (After a rollback nothing changed, but a failed commit is not trusted to say so.)
    cache.invalidate(batch.iter().map(|job| job.touches()));

    match commit {
        Ok(()) => {
            // Purge the WAL before answering: when a clear or delete is acknowledged, the old
            // sealed bytes are already gone from every file.
            if purges {
                truncate_wal(conn);
            }
            for (job, error) in batch.into_iter().zip(errors) {
                job.finish(error);
            }
        }
        Err(cause) => {
            for ((job, error), verdict) in batch.into_iter().zip(errors).zip(verdicts) {
                let gate_passed = verdict == Some(true);
                let failure = match (verdict, error, &cause) {
                    (None, Some(e), _) => e,
                    (_, _, None) => StoreError::GateRefused { gate_passed },
                    (_, _, Some(cause)) => StoreError::NotCommitted {
                        gate_passed,
                        cause: cause.clone(),
                    },
                };
                job.finish(Some(failure));
            }
        }
    }
}

/// Runs one statement of no parameters and no rows from the statement cache (a batch's per-job
/// savepoints: `execute_batch` would parse them again for every job).
fn cached(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute([]))
        .map(|_| ())
        .map_err(db_err)
}

/// Records `anchor` as its writer's newest. Batches are serialised by the one writer thread and a
/// writer's sequence numbers only grow, except after an accepted gap, which forgets the anchor
/// first; so the newest batch's anchor simply replaces the row.
fn record_anchor(conn: &Connection, anchor: &AuditAnchor) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit_anchor (writer, seq, mac) VALUES (?1, ?2, ?3)
         ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, mac = excluded.mac",
    )
    .and_then(|mut stmt| stmt.execute(params![&*anchor.writer, to_i64(anchor.seq), anchor.mac]))
    .map(|_| ())
    .map_err(db_err)
}

/// Copies the WAL into the database and truncates it, so purged pages (zeroed by `secure_delete`)
/// replace the old ones everywhere. The busy timeout lets in-flight reads finish first; if one is
/// still running after it, the old frames stay until the next purge and a warning is logged.
fn truncate_wal(conn: &Connection) {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => {}
        Ok(_) => tracing::warn!("WAL checkpoint after a purge was blocked by a reader"),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint after a purge failed"),
    }
}

fn instance_row(conn: &Connection, id: &str) -> Result<Option<InstanceRecord>, StoreError> {
    conn.prepare_cached(
        "SELECT project_id, password_set, password_version FROM instances WHERE instance_id = ?1",
    )
    .map_err(db_err)?
    .query_row([id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })
    .optional()
    .map_err(db_err)?
    .map(|(project_id, set, version)| {
        Ok(InstanceRecord {
            project_id: stored_project(&project_id)?,
            password_set: set != 0,
            password_version: version_from(version)?,
        })
    })
    .transpose()
}

/// The next record version of the store-wide sequence (inside the caller's transaction).
fn next_version(conn: &Connection) -> Result<u64, StoreError> {
    let v: i64 = conn
        .prepare_cached("UPDATE record_versions SET last = last + 1 WHERE id = 1 RETURNING last")
        .map_err(db_err)?
        .query_row([], |r| r.get(0))
        .map_err(db_err)?;
    version_from(v)
}

/// Takes one seal from `key_id`'s budget, or says why not (inside the caller's transaction).
fn reserve_seal(conn: &Connection, key_id: KeyId) -> Result<(), StoreError> {
    let limit = i64::try_from(MAX_SEALS_PER_KEY).expect("the limit fits in i64");
    let taken = conn
        .prepare_cached("UPDATE data_keys SET seals = seals + 1 WHERE key_id = ?1 AND seals < ?2")
        .map_err(db_err)?
        .execute(params![key_id, limit])
        .map_err(db_err)?;
    if taken == 1 {
        return Ok(());
    }
    let known: Option<i64> = conn
        .prepare_cached("SELECT seals FROM data_keys WHERE key_id = ?1")
        .map_err(db_err)?
        .query_row([key_id], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    Err(rules::seal_refused(key_id, known.is_some()))
}

/// Replaces the chunks of `field` with those of `sealed`.
fn write_chunks(conn: &Connection, id: &str, sealed: &[u8]) -> Result<(), StoreError> {
    delete_chunks(conn, id)?;
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO instance_metadata (instance_id, key, value) VALUES (?1, ?2, ?3)",
        )
        .map_err(db_err)?;
    for (key, value) in chunks::split(PASSWORD_FIELD, sealed) {
        insert.execute(params![id, key, value]).map_err(db_err)?;
    }
    Ok(())
}

/// Every key the store knows or a record names, with counts (see [`Store::key_usage`]).
fn key_usage_on(conn: &Connection) -> Result<Vec<KeyUsage>, StoreError> {
    let mut usage = std::collections::BTreeMap::<KeyId, KeyUsage>::new();
    let mut known = conn
        .prepare_cached("SELECT key_id, seals FROM data_keys")
        .map_err(db_err)?;
    let rows = known
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(db_err)?;
    for row in rows {
        let (id, seals) = row.map_err(db_err)?;
        let key_id = key_id_from(id)?;
        usage.insert(
            key_id,
            KeyUsage {
                key_id,
                records: 0,
                seals: version_from(seals)?,
                known: true,
            },
        );
    }
    let mut counted = conn
        .prepare_cached(
            "SELECT password_key_id, count(*) FROM instances
             WHERE password_set = 1 AND password_key_id IS NOT NULL GROUP BY password_key_id",
        )
        .map_err(db_err)?;
    let rows = counted
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(db_err)?;
    for row in rows {
        let (id, records) = row.map_err(db_err)?;
        let key_id = key_id_from(id)?;
        let entry = usage.entry(key_id).or_insert(KeyUsage {
            key_id,
            records: 0,
            seals: 0,
            known: false,
        });
        entry.records = version_from(records)?;
    }
    Ok(usage.into_values().collect())
}

/// Key usage read straight from the database file at `path`, read-only, for `metapass keys
/// status` (the daemon may be serving from it meanwhile).
pub fn read_key_usage(path: &Path) -> Result<Vec<KeyUsage>, StoreError> {
    if !path.exists() {
        return Err(StoreError::Unavailable(format!(
            "{} does not exist (has the daemon ever run with this configuration?)",
            path.display()
        )));
    }
    let conn = open_reader(path)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    if usize::try_from(version).ok() != Some(MIGRATIONS.len()) {
        return Err(StoreError::Unavailable(format!(
            "{} has schema version {version}; start this metapass once to migrate it",
            path.display()
        )));
    }
    key_usage_on(&conn)
}

/// Deletes the password's chunks of `id`.
///
/// The chunk-name pattern `'password_*'` (see [`PASSWORD_FIELD`]) is a literal in every statement:
/// a GLOB whose pattern is a bound parameter makes SQLite re-prepare the statement on each
/// execution (its GLOB optimisation depends on the value), which cost a third of a password read.
fn delete_chunks(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM instance_metadata WHERE instance_id = ?1 AND key GLOB 'password_*'",
    )
    .map_err(db_err)?
    .execute(params![id])
    .map_err(db_err)?;
    Ok(())
}

impl Store for SqliteStore {
    async fn register(
        &self,
        id: &InstanceId,
        project: &ProjectId,
        how: Registration,
        gate: Gate<RegisterOutcome>,
    ) -> Result<RegisterOutcome, StoreError> {
        let (id, project) = (id.to_string(), project.to_string());
        self.write(gate, false, Touches::Instance(id.clone()), move |conn| {
            let existing = instance_row(conn, &id)?;
            let tombstone: Option<String> = conn
                .prepare_cached("SELECT project_id FROM deleted_instances WHERE instance_id = ?1")
                .map_err(db_err)?
                .query_row([&id], |r| r.get(0))
                .optional()
                .map_err(db_err)?;
            let plan = plan_register(
                existing.as_ref().map(|r| r.project_id.as_str()),
                tombstone.as_deref(),
                &project,
                how,
            );
            if let RegisterPlan::Answer(outcome) = plan {
                return Ok(outcome);
            }
            let now = now_unix();
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO instances (instance_id, project_id, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?3) ON CONFLICT (instance_id) DO NOTHING",
                )
                .map_err(db_err)?
                .execute(params![id, project, now])
                .map_err(db_err)?;
            if inserted == 1 {
                conn.prepare_cached("DELETE FROM deleted_instances WHERE instance_id = ?1")
                    .map_err(db_err)?
                    .execute([&id])
                    .map_err(db_err)?;
                return Ok(RegisterOutcome::Created);
            }
            let existing = instance_row(conn, &id)?
                .ok_or_else(|| StoreError::Corrupt("conflicting row vanished".into()))?;
            Ok(if existing.project_id.as_str() == project {
                RegisterOutcome::Unchanged
            } else {
                RegisterOutcome::OwnedByOther
            })
        })
        .await
    }

    async fn instance(&self, id: &InstanceId) -> Result<Option<InstanceRecord>, StoreError> {
        self.read(|conn| instance_row(conn, id.as_str()))
    }

    async fn password(&self, id: &InstanceId) -> Result<Option<Arc<PasswordRecord>>, StoreError> {
        super::check_deadline()?;
        let miss = match self.cache.get(id.as_str()) {
            Ok(record) => return Ok(Some(record)),
            Err(miss) => miss,
        };
        let record = self.password_from_database(id)?.map(Arc::new);
        if let Some(record) = &record {
            self.cache.fill(id.as_str(), record.clone(), miss);
        }
        Ok(record)
    }

    async fn set_password_once(
        &self,
        id: &InstanceId,
        project: &ProjectId,
        key_id: KeyId,
        seal: SealFn,
        gate: Gate<SetOutcome>,
    ) -> Result<SetOutcome, StoreError> {
        let (id, project) = (id.to_string(), project.to_string());
        self.write(gate, false, Touches::Instance(id.clone()), move |conn| {
            // The compare-and-set: only a row with no password changes, and only once. The new
            // version is the sequence's next, taken below in the same transaction.
            let changed = conn
                .prepare_cached(
                    "UPDATE instances
                     SET password_set = 1,
                         password_version = (SELECT last + 1 FROM record_versions WHERE id = 1),
                         password_key_id = ?4, updated_at = ?3
                     WHERE instance_id = ?1 AND project_id = ?2 AND password_set = 0",
                )
                .map_err(db_err)?
                .execute(params![id, project, now_unix(), key_id])
                .map_err(db_err)?;
            if changed == 0 {
                return Ok(rules::set_once_refused(
                    instance_row(conn, &id)?.as_ref(),
                    &project,
                ));
            }
            let version = next_version(conn)?;
            reserve_seal(conn, key_id)?;
            let sealed = seal(version)?;
            rules::check_sealed_under(&sealed, key_id)?;
            write_chunks(conn, &id, &sealed)?;
            Ok(SetOutcome::Stored { version })
        })
        .await
    }

    async fn sync_keys(
        &self,
        checks: Vec<(KeyId, KeyCheck)>,
        gate: Gate<KeySync>,
    ) -> Result<KeySync, StoreError> {
        self.write(gate, false, Touches::Nothing, move |conn| {
            let mut outcome = KeySync::default();
            let mut lookup = conn
                .prepare_cached("SELECT check_value FROM data_keys WHERE key_id = ?1")
                .map_err(db_err)?;
            for (id, check) in &checks {
                let stored: Option<Vec<u8>> = lookup
                    .query_row([id], |r| r.get(0))
                    .optional()
                    .map_err(db_err)?;
                match stored {
                    Some(stored) => {
                        use subtle::ConstantTimeEq;
                        if !bool::from(stored.as_slice().ct_eq(check.as_slice())) {
                            outcome.mismatched.push(*id);
                        }
                    }
                    None => outcome.added.push(*id),
                }
            }
            if !outcome.mismatched.is_empty() {
                outcome.added.clear();
                return Ok(outcome);
            }
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO data_keys (key_id, check_value, seals, first_seen)
                     VALUES (?1, ?2,
                       (SELECT count(*) FROM instances WHERE password_set = 1 AND password_key_id = ?1),
                       ?3)",
                )
                .map_err(db_err)?;
            for (id, check) in checks.iter().filter(|(id, _)| outcome.added.contains(id)) {
                insert
                    .execute(params![id, check.as_slice(), now_unix()])
                    .map_err(db_err)?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        self.read(key_usage_on)
    }

    async fn rewrap_candidates(
        &self,
        active: KeyId,
        after: Option<&InstanceId>,
        limit: usize,
    ) -> Result<Vec<RewrapCandidate>, StoreError> {
        let after = after.map_or_else(String::new, |a| a.to_string());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT instance_id, password_version, password_key_id, project_id FROM instances
                     WHERE password_set = 1 AND password_key_id IS NOT NULL
                       AND password_key_id != ?1 AND instance_id > ?2
                     ORDER BY instance_id LIMIT ?3",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![active, after, limit], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(db_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, version, key, project) = row.map_err(db_err)?;
                out.push(RewrapCandidate {
                    id: InstanceId::parse(&id)
                        .map_err(|_| StoreError::Corrupt(format!("bad instance id {id:?}")))?,
                    project: stored_project(&project)?,
                    version: version_from(version)?,
                    key_id: key_id_from(key)?,
                });
            }
            Ok(out)
        })
    }

    async fn rewrap(
        &self,
        candidate: &RewrapCandidate,
        to_key: KeyId,
        reseal: ResealFn,
        gate: Gate<RewrapOutcome>,
    ) -> Result<RewrapOutcome, StoreError> {
        let (id, expected) = (candidate.id.to_string(), candidate.clone());
        // Resealing removes the old key's ciphertext: like a purge, its batch truncates the WAL,
        // so no copy of the files taken afterwards still opens with the old key.
        self.write(gate, true, Touches::Instance(id.clone()), move |conn| {
            // Still the record that was listed? Anything else (changed, cleared, deleted) is left.
            let current: Option<(i64, i64, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT password_set, password_version, password_key_id FROM instances
                     WHERE instance_id = ?1",
                )
                .map_err(db_err)?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
                .map_err(db_err)?;
            let current = current.map(|(set, version, key)| rules::SealedState {
                set: set == 1,
                version: version_from(version).ok(),
                key_id: key.and_then(|k| key_id_from(k).ok()),
            });
            if !rules::still_listed(current, &expected) {
                return Ok(RewrapOutcome::Skipped);
            }
            let mut stmt = conn
                .prepare_cached(
                    "SELECT key, value FROM instance_metadata WHERE instance_id = ?1 AND key GLOB 'password_*'",
                )
                .map_err(db_err)?;
            let stored: Vec<(String, Vec<u8>)> = stmt
                .query_map(params![id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            let Ok(old) = chunks::join(PASSWORD_FIELD, &stored) else {
                return Ok(RewrapOutcome::Unreadable {
                    from: expected.key_id,
                });
            };
            let version = next_version(conn)?;
            reserve_seal(conn, to_key)?;
            let Ok(sealed) = reseal(&old, expected.version, version)? else {
                // The record stays as it is. The version number and seal slot taken above are
                // spent unused: a skipped version and an over-count are both harmless.
                return Ok(RewrapOutcome::Unreadable {
                    from: expected.key_id,
                });
            };
            rules::check_sealed_under(&sealed, to_key)?;
            write_chunks(conn, &id, &sealed)?;
            conn.prepare_cached(
                "UPDATE instances SET password_version = ?2, password_key_id = ?3, updated_at = ?4
                 WHERE instance_id = ?1",
            )
            .map_err(db_err)?
            .execute(params![id, to_i64(version), to_key, now_unix()])
            .map_err(db_err)?;
            Ok(RewrapOutcome::Rewrapped {
                from: expected.key_id,
                version,
            })
        })
        .await
    }

    async fn clear_password(
        &self,
        id: &InstanceId,
        gate: Gate<ClearOutcome>,
    ) -> Result<ClearOutcome, StoreError> {
        let id = id.to_string();
        self.write(gate, true, Touches::Instance(id.clone()), move |conn| {
            // Inside the IMMEDIATE transaction of the only writer: nothing changes between the read
            // and the update.
            let Some(before) = instance_row(conn, &id)? else {
                return Ok(ClearOutcome::NotFound);
            };
            let version = next_version(conn)?;
            conn.prepare_cached(
                "UPDATE instances
                 SET password_set = 0, password_version = ?3,
                     password_key_id = NULL, updated_at = ?2
                 WHERE instance_id = ?1",
            )
            .map_err(db_err)?
            .execute(params![id, now_unix(), to_i64(version)])
            .map_err(db_err)?;
            delete_chunks(conn, &id)?;
            Ok(ClearOutcome::Cleared {
                was_set: before.password_set,
                version,
            })
        })
        .await
    }

    async fn delete_instance(
        &self,
        id: &InstanceId,
        gate: Gate<DeleteOutcome>,
    ) -> Result<DeleteOutcome, StoreError> {
        let id = id.to_string();
        self.write(gate, true, Touches::Instance(id.clone()), move |conn| {
            conn.prepare_cached("DELETE FROM instance_metadata WHERE instance_id = ?1")
                .map_err(db_err)?
                .execute([&id])
                .map_err(db_err)?;
            let deleted_from: Option<String> = conn
                .prepare_cached("DELETE FROM instances WHERE instance_id = ?1 RETURNING project_id")
                .map_err(db_err)?
                .query_row([&id], |r| r.get(0))
                .optional()
                .map_err(db_err)?;
            let Some(project) = deleted_from else {
                return Ok(DeleteOutcome::NotFound);
            };
            // The tombstone: no notification or import may give this id to another project.
            conn.prepare_cached(
                "INSERT INTO deleted_instances (instance_id, project_id, deleted_at)
                 VALUES (?1, ?2, ?3)
                 ON CONFLICT (instance_id) DO UPDATE SET project_id = excluded.project_id,
                    deleted_at = excluded.deleted_at",
            )
            .map_err(db_err)?
            .execute(params![id, project, now_unix()])
            .map_err(db_err)?;
            Ok(DeleteOutcome::Deleted)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(db_err))
    }

    async fn inventory(&self) -> Result<Vec<InventoryRow>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT instance_id, project_id, password_set, password_version, password_key_id
                     FROM instances ORDER BY instance_id",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                })
                .map_err(db_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, project, set, version, key) = row.map_err(db_err)?;
                out.push(InventoryRow {
                    id,
                    project,
                    password_set: set != 0,
                    version: version_from(version)?,
                    key_id: key.map(key_id_from).transpose()?,
                });
            }
            Ok(out)
        })
    }

    async fn audit_anchor(&self, writer: &str) -> Result<Option<AuditAnchor>, StoreError> {
        let writer = writer.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT seq, mac FROM audit_anchor WHERE writer = ?1",
                [&writer],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(db_err)?
            .map(|(seq, mac)| {
                Ok(AuditAnchor {
                    writer: writer.as_str().into(),
                    seq: version_from(seq)?,
                    mac,
                })
            })
            .transpose()
        })
    }

    async fn forget_audit_anchor(&self, writer: &str) -> Result<(), StoreError> {
        let writer = writer.to_owned();
        self.write(super::open_gate(), false, Touches::Nothing, move |conn| {
            conn.execute("DELETE FROM audit_anchor WHERE writer = ?1", [&writer])
                .map(|_| ())
                .map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{Gate, GateDenied, Store};
    use super::*;
    use crate::ids::{InstanceId, ProjectId};

    /// A gate whose audit event never lands: its ticket gives up `after` it is first awaited
    /// (the least favourable timer: the batch must not await its tickets one after another).
    fn stuck_gate<O>(after: Duration) -> Gate<O> {
        Box::new(move |_| {
            Box::pin(async move {
                tokio::time::sleep(after).await;
                Err(GateDenied("the audit log did not answer".into()))
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_audit_log_fails_a_whole_batch_within_one_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SqliteStore::open(&dir.path().join("db.sqlite3")).unwrap());
        let project = ProjectId::parse("project-a").unwrap();
        // A first job holds the writer briefly, so the next twenty queue up into one batch.
        let first = {
            let (store, project) = (store.clone(), project.clone());
            tokio::spawn(async move {
                let id = InstanceId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
                let slow_but_fine: Gate<_> = Box::new(|_| {
                    Box::pin(async {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok(None)
                    })
                });
                store
                    .register(&id, &project, Registration::Ordinary, slow_but_fine)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ack_timeout = Duration::from_millis(500);
        let started = crate::clock::io_now();
        let jobs: Vec<_> = (0..20)
            .map(|_| {
                let (store, project) = (store.clone(), project.clone());
                tokio::spawn(async move {
                    let id = InstanceId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
                    store
                        .register(
                            &id,
                            &project,
                            Registration::Ordinary,
                            stuck_gate(ack_timeout),
                        )
                        .await
                })
            })
            .collect();
        for job in jobs {
            assert!(matches!(
                job.await.unwrap(),
                Err(StoreError::GateRefused { gate_passed: false })
            ));
        }
        // Bounded by the first job and one audit deadline for the whole batch (not twenty).
        assert!(
            started.elapsed() < Duration::from_millis(300) + 4 * ack_timeout,
            "the batch took {:?}",
            started.elapsed()
        );
        assert!(first.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn no_job_starts_after_its_requests_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite3")).unwrap();
        let project = ProjectId::parse("project-a").unwrap();
        let id = InstanceId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
        let past = crate::clock::io_now_tokio() - Duration::from_millis(1);
        let gate_called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let called = gate_called.clone();
        let gate: Gate<_> = Box::new(move |_| {
            called.store(true, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(None) })
        });
        let result = super::super::DEADLINE
            .scope(
                past,
                store.register(&id, &project, Registration::Ordinary, gate),
            )
            .await;
        assert!(matches!(result, Err(StoreError::DeadlinePassed)));
        assert!(!gate_called.load(std::sync::atomic::Ordering::SeqCst));
        let read = super::super::DEADLINE
            .scope(past, store.instance(&id))
            .await;
        assert!(matches!(read, Err(StoreError::DeadlinePassed)));
        assert!(
            store.instance(&id).await.unwrap().is_none(),
            "nothing was registered"
        );
    }

    #[test]
    fn the_chunk_pattern_in_the_sql_names_the_password_field() {
        // The statements spell `'password_*'` out (see `delete_chunks`).
        assert_eq!(format!("{}*", super::PASSWORD_CHUNK_PREFIX), "password_*");
    }
}
