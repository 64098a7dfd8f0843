//! Registry reads on PostgreSQL, coalesced: every post reads its instance's row (who owns it,
//! whether a password is set) before its body is read, and one statement per read had made those
//! reads, each a wake-up of a database backend, most of the database's work once the posts
//! themselves were committed in groups ([`super::sets`]). Reads waiting at the same moment are
//! taken together by one of a few lanes and answered from one `= ANY` statement on the primary
//! key. Reads change nothing, so each is answered with the row as of its statement, as a single
//! read would be; the set-once decision is made again under the row's lock.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::{db_err, pool_err, prepared, row_record};
use crate::ids::InstanceId;
use crate::store::{InstanceRecord, StoreError};

/// Lanes: statements in flight at once (a bound on the connections reads take from the pool).
const READ_LANES: usize = 4;

/// The most reads one statement answers.
const MAX_BATCH: usize = 256;

/// Reads that may wait for a lane.
const QUEUE_DEPTH: usize = 4096;

const READ_ROWS: &str = "SELECT instance_id, project_id, password_set, password_version
     FROM instances WHERE instance_id = ANY($1)";

type Answer = Result<Option<InstanceRecord>, StoreError>;

/// Where reads wait for a lane.
pub(super) struct InstanceReads {
    reads: mpsc::Sender<(InstanceId, oneshot::Sender<Answer>)>,
}

impl InstanceReads {
    /// Starts the lanes on the current runtime; they stop when the queue is dropped and empty.
    pub(super) fn start(pool: Pool) -> Self {
        let (reads, waiting) = mpsc::channel(QUEUE_DEPTH);
        let waiting = Arc::new(tokio::sync::Mutex::new(waiting));
        let lanes = (pool.status().max_size / 2).clamp(1, READ_LANES);
        for _ in 0..lanes {
            tokio::spawn(run_lane(pool.clone(), Arc::clone(&waiting)));
        }
        Self { reads }
    }

    /// The row of `id`, read with whatever else is waiting. The caller bounds the wait (a read
    /// abandoned changes nothing).
    pub(super) async fn read(&self, id: &InstanceId) -> Answer {
        let (answer, answered) = oneshot::channel();
        self.reads
            .send((id.clone(), answer))
            .await
            .map_err(|_| StoreError::Unavailable("the registry read lanes have stopped".into()))?;
        answered
            .await
            .map_err(|_| StoreError::Unavailable("a registry read lane dropped the read".into()))?
    }
}

type Waiting = Arc<tokio::sync::Mutex<mpsc::Receiver<(InstanceId, oneshot::Sender<Answer>)>>>;

async fn run_lane(pool: Pool, waiting: Waiting) {
    loop {
        let batch = {
            let mut waiting = waiting.lock().await;
            let Some(first) = waiting.recv().await else {
                return;
            };
            let mut batch = Vec::with_capacity(MAX_BATCH);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match waiting.try_recv() {
                    Ok(read) => batch.push(read),
                    Err(_) => break,
                }
            }
            batch
        };
        // A reader that has gone (its request ended) needs no answer.
        let batch: Vec<_> = batch
            .into_iter()
            .filter(|(_, answer)| !answer.is_closed())
            .collect();
        if batch.is_empty() {
            continue;
        }
        match read_rows(&pool, &batch).await {
            Ok(mut rows) => {
                for (id, answer) in batch {
                    let row = match rows.get_mut(id.as_str()) {
                        None => Ok(None),
                        Some(Ok(record)) => Ok(Some(record.clone())),
                        Some(Err(why)) => Err(StoreError::Corrupt(why.clone())),
                    };
                    let _ = answer.send(row);
                }
            }
            Err(e) => {
                for (_, answer) in batch {
                    let _ = answer.send(Err(StoreError::Unavailable(e.clone())));
                }
            }
        }
    }
}

/// The rows the batch names, by instance id (a row that cannot be read: why).
async fn read_rows(
    pool: &Pool,
    batch: &[(InstanceId, oneshot::Sender<Answer>)],
) -> Result<HashMap<String, Result<InstanceRecord, String>>, String> {
    let unavailable = |e: StoreError| match e {
        StoreError::Unavailable(cause) => cause,
        other => other.to_string(),
    };
    let conn = pool.get().await.map_err(|e| unavailable(pool_err(e)))?;
    let mut ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let statement = prepared(&conn, READ_ROWS).await.map_err(unavailable)?;
    let rows = conn
        .query(&statement, &[&ids])
        .await
        .map_err(|e| unavailable(db_err(e)))?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), row_record(row)))
        .collect())
}
