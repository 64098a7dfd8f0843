//! Reads on PostgreSQL, coalesced. Every post reads its instance's row (who owns it, whether a
//! password is set) before its body is read, and every GET reads the sealed record; one statement
//! per read made those reads, each a wake-up of a database backend, most of the database's work
//! once the posts themselves were committed in groups ([`super::sets`]). Reads of one kind waiting
//! at the same moment are taken together by one of a few lanes and answered from one `= ANY`
//! statement on the primary key. Reads change nothing, so each is answered with the rows as of its
//! statement, as a single read would be; the set-once decision is made again under the row's lock.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::{Object, Pool};
use tokio::sync::{mpsc, oneshot};

use super::{PASSWORD_CHUNK_PREFIX, db_err, pool_err, prepared, row_record};
use crate::ids::InstanceId;
use crate::store::{InstanceRecord, PasswordRecord, StoreError, chunks};

/// Lanes per kind of read: statements in flight at once, a bound on the connections reads take
/// from the pool: one per four connections, at least one, so that the three kinds of lanes
/// (registry reads, record reads, posts) hold at most three quarters of a pool of four or more.
const READ_LANES: usize = 4;

/// The most reads one statement answers.
const MAX_BATCH: usize = 256;

/// Reads that may wait for a lane.
const QUEUE_DEPTH: usize = 4096;

/// What one kind of read asks of the database for a batch of ids.
pub(super) trait BatchRead: Send + Sync + 'static {
    /// What a read of one id hears (shared between reads of the same id).
    type Row: Clone + Send + 'static;
    /// The rows of `ids` (sorted, distinct), by id; a row that cannot be read: why.
    fn read(
        conn: &Object,
        ids: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, Result<Self::Row, String>>, StoreError>> + Send;
}

type Answer<R> = Result<Option<<R as BatchRead>::Row>, StoreError>;
type Waiting<R> = Arc<tokio::sync::Mutex<mpsc::Receiver<(InstanceId, oneshot::Sender<Answer<R>>)>>>;

/// Where reads of one kind wait for a lane.
pub(super) struct Coalesced<R: BatchRead> {
    reads: mpsc::Sender<(InstanceId, oneshot::Sender<Answer<R>>)>,
}

impl<R: BatchRead> Coalesced<R> {
    /// Starts the lanes on the current runtime; they stop when the queue is dropped and empty.
    pub(super) fn start(pool: Pool) -> Self {
        let (reads, waiting) = mpsc::channel(QUEUE_DEPTH);
        let waiting: Waiting<R> = Arc::new(tokio::sync::Mutex::new(waiting));
        let lanes = (pool.status().max_size / 4).clamp(1, READ_LANES);
        for _ in 0..lanes {
            tokio::spawn(run_lane::<R>(pool.clone(), Arc::clone(&waiting)));
        }
        Self { reads }
    }

    /// The row of `id`, read with whatever else is waiting. The caller bounds the wait (a read
    /// abandoned changes nothing).
    pub(super) async fn read(&self, id: &InstanceId) -> Answer<R> {
        let (answer, answered) = oneshot::channel();
        self.reads
            .send((id.clone(), answer))
            .await
            .map_err(|_| StoreError::Unavailable("the read lanes have stopped".into()))?;
        answered
            .await
            .map_err(|_| StoreError::Unavailable("a read lane dropped the read".into()))?
    }
}

async fn run_lane<R: BatchRead>(pool: Pool, waiting: Waiting<R>) {
    loop {
        let Some(batch) = super::take_waiting(&waiting, MAX_BATCH).await else {
            return;
        };
        // A reader that has gone (its request ended) needs no answer.
        let batch: Vec<_> = batch
            .into_iter()
            .filter(|(_, answer)| !answer.is_closed())
            .collect();
        if batch.is_empty() {
            continue;
        }
        let mut ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let rows = match pool.get().await {
            Ok(conn) => R::read(&conn, &ids).await,
            Err(e) => Err(pool_err(e)),
        };
        match rows {
            Ok(rows) => {
                for (id, answer) in batch {
                    let row = match rows.get(id.as_str()) {
                        None => Ok(None),
                        Some(Ok(row)) => Ok(Some(row.clone())),
                        Some(Err(why)) => Err(StoreError::Corrupt(why.clone())),
                    };
                    let _ = answer.send(row);
                }
            }
            Err(e) => {
                let cause = match e {
                    StoreError::Unavailable(cause) => cause,
                    other => other.to_string(),
                };
                for (_, answer) in batch {
                    let _ = answer.send(Err(StoreError::Unavailable(cause.clone())));
                }
            }
        }
    }
}

/// An instance's registry row (ownership and whether a password is set).
pub(super) struct InstanceRows;

impl BatchRead for InstanceRows {
    type Row = InstanceRecord;

    async fn read(
        conn: &Object,
        ids: &[&str],
    ) -> Result<HashMap<String, Result<InstanceRecord, String>>, StoreError> {
        let statement = prepared(
            conn,
            "SELECT instance_id, project_id, password_set, password_version
             FROM instances WHERE instance_id = ANY($1)",
        )
        .await?;
        let rows = conn.query(&statement, &[&ids]).await.map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), row_record(row)))
            .collect())
    }
}

/// An instance's sealed password record: its row and its password chunks.
pub(super) struct PasswordRows;

impl BatchRead for PasswordRows {
    type Row = Arc<PasswordRecord>;

    /// The chunks come from a `LATERAL` subquery with a `LIMIT` (one more than a record may
    /// have), which is always a per-row probe of the primary key: a plain join of the batch
    /// against `instance_metadata` may be planned, from stale or missing statistics, as a hash of
    /// the whole table (see [`super::sets`]).
    async fn read(
        conn: &Object,
        ids: &[&str],
    ) -> Result<HashMap<String, Result<Arc<PasswordRecord>, String>>, StoreError> {
        let statement = prepared(
            conn,
            "SELECT i.instance_id, i.project_id, i.password_set, i.password_version, m.key, m.value
             FROM instances i
             LEFT JOIN LATERAL (
               SELECT key, value FROM instance_metadata
               WHERE instance_id = i.instance_id AND starts_with(key, $2)
               LIMIT $3
             ) m ON true
             WHERE i.instance_id = ANY($1)",
        )
        .await?;
        let limit = i64::try_from(chunks::MAX_CHUNKS + 1).unwrap_or(i64::MAX);
        let rows = conn
            .query(&statement, &[&ids, &PASSWORD_CHUNK_PREFIX, &limit])
            .await
            .map_err(db_err)?;
        let mut records: HashMap<String, Result<PasswordRecord, String>> = HashMap::new();
        for row in &rows {
            let id: String = row.get(0);
            let record = records.entry(id).or_insert_with(|| {
                row_record(row).map(|instance| PasswordRecord {
                    instance,
                    chunks: Vec::new(),
                })
            });
            let key: Option<String> = row.get(4);
            let Some(key) = key else { continue };
            if matches!(record, Ok(rec) if rec.chunks.len() >= chunks::MAX_CHUNKS) {
                *record = Err("too many password chunks".into());
            } else if let Ok(rec) = record {
                rec.chunks.push((key, row.get(5)));
            }
        }
        Ok(records
            .into_iter()
            .map(|(id, record)| (id, record.map(Arc::new)))
            .collect())
    }
}
