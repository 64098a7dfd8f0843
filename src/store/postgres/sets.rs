//! Set-once posts on PostgreSQL, committed in groups.
//!
//! One transaction per post made PostgreSQL's per-transaction work (four statements, a WAL
//! flush, a backend wake-up for each) the limit on posts: about 1,900 per second on the bench
//! machine, where pgbench itself reaches 3,500 transactions per second. So posts are queued, and a
//! few lanes each take what is waiting (up to [`MAX_BATCH`] posts) and run it as one transaction
//! of five round trips, whatever its size:
//!
//! 1. lock the batch's instance rows (`FOR NO KEY UPDATE`, the lock an update takes) and read
//!    them; pipelined behind it, one record version per post from the store-wide sequence, taken
//!    once the locks are held (so each instance's version only grows). The lock is taken with
//!    `SKIP LOCKED`: a row another transaction holds (another lane's or replica's batch, a
//!    rewrap, an operator's open session) is not waited for. Its post goes back to the queue and
//!    is tried again [`HELD_ROW_RETRY`] later (until its request's deadline), so one held row
//!    never holds up the other posts of its batch, and no lane ever waits for a row lock (so
//!    lanes and replicas cannot deadlock on them);
//! 2. decide each post in queue order against the locked rows, a second post for the same
//!    instance seeing the first one's result ([`rules::set_once_allowed`]), then reserve its
//!    seal and seal it;
//! 3. mark the winners' rows set and, pipelined, insert every winner's chunks in one statement
//!    (first removing chunks the lock found under an unset row, which should never happen);
//! 4. every post's gate (the batch's audit events, which the audit writer writes together), the
//!    newest anchor, and one `COMMIT`.
//!
//! The guarantees are the single transaction's: each post is decided under its row's lock, so
//! the set-once check cannot race, on this replica or another (a post that found its row held
//! reads it, when it has it, as the holder left it); nothing commits before every gate
//! of the batch said yes, and a refusal or failure rolls back the whole batch, each post told
//! whether its own gate had passed (as the SQLite writer's batches do). A post whose own step
//! fails (its key's seal budget spent, its seal failing) gets that error, is left out of the
//! batch's writes, and the others go on.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::{Pool, Transaction};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::{ToSql, Type};

use super::{
    AnchorPruning, SealBudget, db_err, pool_err, prepared, record_anchor, row_record, rules,
};
use crate::crypto::KeyId;
use crate::ids::{InstanceId, ProjectId};
use crate::store::{
    AuditAnchor, Gate, GateDenied, GateTicket, InstanceRecord, PASSWORD_CHUNK_PREFIX,
    PASSWORD_FIELD, SealFn, SetOutcome, StoreError, chunks, now_unix, to_i64, version_from,
};

/// The most lanes (batches in flight at once): one lane would leave the database idle while its
/// batch waits for the audit log; a few keep it busy without holding many row locks at a time.
/// A small pool gets fewer (one per four connections, at least one), as for the read lanes.
const SET_LANES: usize = 4;

/// The most posts one batch takes (a bound on how many rows one transaction locks).
const MAX_BATCH: usize = 64;

/// Posts that may wait for a lane; past that, a post waits for room (up to its deadline).
const QUEUE_DEPTH: usize = 1024;

/// How long a post whose row another transaction held waits before it is tried again.
const HELD_ROW_RETRY: std::time::Duration = std::time::Duration::from_millis(2);

/// Locks the batch's rows that no one else holds and reads them (see the module docs), with whether an
/// unset row has chunks left under it (there should be none: written behind metapass's back),
/// which the set then removes.
///
/// The probe is a scalar subquery with `LIMIT 1`, run per locked row (at most [`MAX_BATCH`]
/// index probes), and the statement is planned for each batch (unnamed, still one round trip),
/// on the table as it is. Joining the winners against `instance_metadata` (as a single post's
/// statement had), or an `EXISTS`, let the planner hash the whole table instead whenever its
/// statistics were stale or missing (a table that grew since it was last analysed: a new
/// deployment, an import): 20 to 270 ms per batch at 90,000 chunks instead of under one.
const LOCK_ROWS: &str = "SELECT i.instance_id, i.project_id, i.password_set, i.password_version,
            NOT i.password_set AND (
              SELECT true FROM instance_metadata m
              WHERE m.instance_id = i.instance_id AND starts_with(m.key, $2) LIMIT 1
            )
     FROM instances i WHERE i.instance_id = ANY($1)
     FOR NO KEY UPDATE OF i SKIP LOCKED";

/// Which of the ids the lock statement did not return exist: their rows were held elsewhere.
const HELD_ELSEWHERE: &str = "SELECT instance_id FROM instances WHERE instance_id = ANY($1)";

/// One record version per post of the batch.
const TAKE_VERSIONS: &str = "SELECT nextval('record_versions') FROM generate_series(1, $1::bigint)";

/// Marks the winners set (each probe is of the primary key, whatever the statistics say).
const MARK_SET: &str = "WITH won AS (
       UPDATE instances t
       SET password_set = true, password_version = w.version, password_key_id = w.key_id,
           updated_at = $4
       FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS w (instance_id, version, key_id)
       WHERE t.instance_id = w.instance_id AND NOT t.password_set
       RETURNING 1
     )
     SELECT count(*) FROM won";

/// Removes the chunks found under unset rows that are about to be set (rare; see
/// [`LOCK_ROWS`]), before the INSERT that would meet them.
const REMOVE_STALE: &str =
    "DELETE FROM instance_metadata WHERE instance_id = ANY($1) AND starts_with(key, $2)";

/// Every winner's chunks, in one statement.
const INSERT_CHUNKS: &str = "INSERT INTO instance_metadata (instance_id, key, value)
     SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])";

/// Where posts wait for a lane.
pub(super) struct SetQueue {
    posts: mpsc::Sender<Post>,
}

/// One post, as it waits and as its batch works on it.
struct Post {
    id: InstanceId,
    project: ProjectId,
    key_id: KeyId,
    seal: Option<SealFn>,
    gate: Option<Gate<SetOutcome>>,
    /// The deadline of the request it works for: past it, the post is not started.
    deadline: Option<tokio::time::Instant>,
    reply: oneshot::Sender<Result<SetOutcome, StoreError>>,
}

impl SetQueue {
    /// Starts the lanes on the current runtime; they stop when the queue is dropped and empty.
    pub(super) fn start(pool: Pool, seals: Arc<SealBudget>, anchors: Arc<AnchorPruning>) -> Self {
        let (posts, waiting) = mpsc::channel(QUEUE_DEPTH);
        let waiting = Arc::new(tokio::sync::Mutex::new(waiting));
        let lanes = (pool.status().max_size / 4).clamp(1, SET_LANES);
        for _ in 0..lanes {
            let lane = Lane {
                pool: pool.clone(),
                seals: Arc::clone(&seals),
                anchors: Arc::clone(&anchors),
                waiting: Arc::clone(&waiting),
                requeue: posts.downgrade(),
            };
            tokio::spawn(lane.run());
        }
        Self { posts }
    }

    /// Queues a post and waits for its batch's result.
    pub(super) async fn submit(
        &self,
        id: &InstanceId,
        project: &ProjectId,
        key_id: KeyId,
        seal: SealFn,
        gate: Gate<SetOutcome>,
    ) -> Result<SetOutcome, StoreError> {
        crate::store::check_deadline()?;
        let deadline = crate::store::request_deadline();
        let (reply, result) = oneshot::channel();
        let post = Post {
            id: id.clone(),
            project: project.clone(),
            key_id,
            seal: Some(seal),
            gate: Some(gate),
            deadline,
            reply,
        };
        // Each batch is bounded by one audit deadline and the pool's timeouts.
        crate::store::enqueue(&self.posts, post, deadline, "the set-once lanes").await?;
        result
            .await
            .map_err(|_| StoreError::Unavailable("a set-once lane dropped the post".into()))?
    }
}

/// A lane: takes what is waiting, runs it as one batch, and again.
struct Lane {
    pool: Pool,
    seals: Arc<SealBudget>,
    anchors: Arc<AnchorPruning>,
    waiting: Arc<tokio::sync::Mutex<mpsc::Receiver<Post>>>,
    /// The queue, for posts whose row was held elsewhere (weak: the lanes stop when the store
    /// drops the queue).
    requeue: mpsc::WeakSender<Post>,
}

impl Lane {
    async fn run(self) {
        loop {
            let Some(batch) = super::take_waiting(&self.waiting, MAX_BATCH).await else {
                return;
            };
            // No post starts after its request's deadline (it waited behind slow batches).
            let now = crate::clock::io_now_tokio();
            let (late, batch): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|post| post.deadline.is_some_and(|d| now >= d));
            for post in late {
                let _ = post.reply.send(Err(StoreError::DeadlinePassed));
            }
            if !batch.is_empty() {
                self.commit(batch).await;
            }
        }
    }

    /// Runs one batch and answers each of its posts (or queues again those whose row was held).
    async fn commit(&self, mut batch: Vec<Post>) {
        let mut decided: Vec<Option<Result<SetOutcome, StoreError>>> =
            batch.iter().map(|_| None).collect();
        let mut verdicts: Vec<Option<bool>> = vec![None; batch.len()];
        let mut held = vec![false; batch.len()];
        let failure = self
            .write(&mut batch, &mut decided, &mut verdicts, &mut held)
            .await;
        for (((post, own), verdict), held) in batch.into_iter().zip(decided).zip(verdicts).zip(held)
        {
            if held {
                self.retry_later(post);
                continue;
            }
            let gate_passed = verdict == Some(true);
            let result = match (&failure, own) {
                // A post's own error stands: nothing of it was written.
                (_, Some(Err(e))) => Err(e),
                (None, Some(Ok(outcome))) => Ok(outcome),
                (None, None) => Err(StoreError::Unavailable("the post was not decided".into())),
                (Some(BatchFailure::Before(e)), _) => Err(copy_of(e)),
                (Some(BatchFailure::GateRefused), _) => {
                    Err(StoreError::GateRefused { gate_passed })
                }
                (Some(BatchFailure::NotCommitted(cause)), _) => Err(StoreError::NotCommitted {
                    gate_passed,
                    cause: cause.clone(),
                }),
            };
            // The caller may have gone away (connection closed); the result is then unneeded.
            let _ = post.reply.send(result);
        }
    }

    /// Queues `post` again after [`HELD_ROW_RETRY`]; its seal and gate are untouched.
    fn retry_later(&self, post: Post) {
        let Some(queue) = self.requeue.upgrade() else {
            let _ = post.reply.send(Err(StoreError::Unavailable(
                "the set-once lanes have stopped".into(),
            )));
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(HELD_ROW_RETRY).await;
            if let Err(mpsc::error::SendError(post)) = queue.send(post).await {
                let _ = post.reply.send(Err(StoreError::Unavailable(
                    "the set-once lanes have stopped".into(),
                )));
            }
        });
    }

    /// The batch's transaction (see the module docs); `None` if it committed. Long on purpose:
    /// the order (no commit before every gate said yes) is the audit guarantee, and reads as one
    /// sequence.
    async fn write(
        &self,
        batch: &mut [Post],
        decided: &mut [Option<Result<SetOutcome, StoreError>>],
        verdicts: &mut [Option<bool>],
        held: &mut [bool],
    ) -> Option<BatchFailure> {
        let mut conn = match self.pool.get().await {
            Ok(conn) => conn,
            Err(e) => return Some(BatchFailure::Before(pool_err(e))),
        };
        let tx = match conn.transaction().await {
            Ok(tx) => tx,
            Err(e) => return Some(BatchFailure::Before(db_err(e))),
        };
        if let Err(e) = self.decide_and_write(&tx, batch, decided, held).await {
            let _ = tx.rollback().await;
            return Some(BatchFailure::Before(e));
        }

        // Every gate of the batch together; the batch waits as long as its slowest ticket
        // (each bounded by its own deadline), never the sum of them.
        // A gate is taken only by a post decided here: a post whose row was held keeps its own
        // for its next batch. A decided post without one would commit unaudited: refuse.
        if batch
            .iter()
            .zip(decided.iter())
            .any(|(post, own)| matches!(own, Some(Ok(_))) && post.gate.is_none())
        {
            let _ = tx.rollback().await;
            return Some(BatchFailure::Before(StoreError::Unavailable(
                "a post's commit gate was spent".into(),
            )));
        }
        // Their events reach the audit writer as one item: one write and one flush for all.
        let tickets: Vec<Option<GateTicket>> = crate::audit::submitted_together(|| {
            batch
                .iter_mut()
                .zip(decided.iter())
                .map(|(post, own)| match own {
                    Some(Ok(outcome)) => post.gate.take().map(|gate| gate(outcome)),
                    _ => None,
                })
                .collect()
        });
        let results: Vec<Option<Result<Option<AuditAnchor>, GateDenied>>> =
            futures_util::future::join_all(tickets.into_iter().map(|ticket| async move {
                match ticket {
                    Some(t) => Some(t.await),
                    None => None,
                }
            }))
            .await;
        for (verdict, result) in verdicts.iter_mut().zip(&results) {
            *verdict = result.as_ref().map(Result::is_ok);
        }
        if verdicts.contains(&Some(false)) {
            let _ = tx.rollback().await;
            return Some(BatchFailure::GateRefused);
        }
        let anchor = AuditAnchor::newest(results.iter().filter_map(|r| {
            r.as_ref()
                .and_then(|r| r.as_ref().ok())
                .and_then(Option::as_ref)
        }));
        if let Some(anchor) = anchor
            && let Err(e) = record_anchor(&tx, &self.anchors, anchor).await
        {
            let _ = tx.rollback().await;
            return Some(BatchFailure::NotCommitted(format!(
                "the audit anchor could not be recorded: {e}"
            )));
        }
        match tx.commit().await {
            Ok(()) => None,
            Err(e) => Some(BatchFailure::NotCommitted(match db_err(e) {
                StoreError::Unavailable(cause) => cause,
                other => other.to_string(),
            })),
        }
    }

    /// Steps 1 to 3 of the module docs: fills `decided` with each post's outcome or own error,
    /// and `held` for the posts whose row another transaction held.
    async fn decide_and_write(
        &self,
        tx: &Transaction<'_>,
        batch: &mut [Post],
        decided: &mut [Option<Result<SetOutcome, StoreError>>],
        held: &mut [bool],
    ) -> Result<(), StoreError> {
        let mut ids: Vec<&str> = batch.iter().map(|post| post.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let posts = i64::try_from(batch.len()).unwrap_or(i64::MAX);
        let take = prepared(tx, TAKE_VERSIONS).await?;
        let lock_params: [(&(dyn ToSql + Sync), Type); 2] = [
            (&ids, Type::TEXT_ARRAY),
            (&PASSWORD_CHUNK_PREFIX, Type::TEXT),
        ];
        let take_params: [&(dyn ToSql + Sync); 1] = [&posts];
        let (rows, versions) = tokio::join!(
            tx.query_typed(LOCK_ROWS, &lock_params),
            tx.query(&take, &take_params)
        );
        let rows = rows.map_err(db_err)?;
        let stale: std::collections::HashSet<&str> = rows
            .iter()
            .filter(|row| row.get::<_, Option<bool>>(4) == Some(true))
            .map(|row| row.get(0))
            .collect();
        let mut rows: HashMap<&str, Result<InstanceRecord, String>> = rows
            .iter()
            .map(|row| (row.get(0), row_record(row)))
            .collect();
        let unlocked: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !rows.contains_key(id))
            .collect();
        let held_elsewhere: std::collections::HashSet<String> = if unlocked.is_empty() {
            std::collections::HashSet::new()
        } else {
            tx.query(&prepared(tx, HELD_ELSEWHERE).await?, &[&unlocked])
                .await
                .map_err(db_err)?
                .iter()
                .map(|row| row.get(0))
                .collect()
        };
        let mut versions = versions
            .map_err(db_err)?
            .into_iter()
            .map(|row| version_from(row.get(0)));

        let mut won = Winners::default();
        for ((post, own), held) in batch.iter_mut().zip(decided.iter_mut()).zip(held) {
            if held_elsewhere.contains(post.id.as_str()) {
                *held = true;
                continue;
            }
            let row = match rows.get(post.id.as_str()) {
                Some(Err(corrupt)) => {
                    *own = Some(Err(StoreError::Corrupt(corrupt.clone())));
                    continue;
                }
                Some(Ok(row)) => Some(row),
                None => None,
            };
            if let Err(refused) = rules::set_once_allowed(row, post.project.as_str()) {
                *own = Some(Ok(refused));
                continue;
            }
            let version = versions.next().ok_or_else(|| {
                StoreError::Corrupt("the sequence gave fewer versions than asked".into())
            })??;
            match self.seal(post, version).await {
                Err(e) => *own = Some(Err(e)),
                Ok(sealed) => {
                    won.add(post, version, &sealed);
                    rows.insert(
                        post.id.as_str(),
                        Ok(InstanceRecord {
                            project_id: post.project.clone(),
                            password_set: true,
                            password_version: version,
                        }),
                    );
                    *own = Some(Ok(SetOutcome::Stored { version }));
                }
            }
        }
        if won.ids.is_empty() {
            return Ok(());
        }
        let stale: Vec<&str> = won
            .ids
            .iter()
            .map(String::as_str)
            .filter(|id| stale.contains(id))
            .collect();
        if !stale.is_empty() {
            tx.execute(REMOVE_STALE, &[&stale, &PASSWORD_CHUNK_PREFIX])
                .await
                .map_err(db_err)?;
        }
        let (mark, insert) = (
            prepared(tx, MARK_SET).await?,
            prepared(tx, INSERT_CHUNKS).await?,
        );
        let now = now_unix();
        let mark_params: [&(dyn ToSql + Sync); 4] = [&won.ids, &won.versions, &won.keys, &now];
        let insert_params: [&(dyn ToSql + Sync); 3] =
            [&won.chunk_owners, &won.chunk_keys, &won.chunk_values];
        let (marked, inserted) = tokio::join!(
            tx.query_one(&mark, &mark_params),
            tx.execute(&insert, &insert_params),
        );
        let marked: i64 = marked.map_err(db_err)?.get(0);
        inserted.map_err(db_err)?;
        if usize::try_from(marked).ok() != Some(won.ids.len()) {
            // The rows are locked and were read unset: anything else is not the database this
            // code knows.
            return Err(StoreError::Corrupt(format!(
                "{marked} of {} locked rows were marked set",
                won.ids.len()
            )));
        }
        Ok(())
    }

    /// Reserves the post's seal and seals its password for `version`.
    async fn seal(&self, post: &mut Post, version: u64) -> Result<Vec<u8>, StoreError> {
        let seal = post
            .seal
            .take()
            .ok_or_else(|| StoreError::Unavailable("a post was sealed twice".into()))?;
        self.seals.reserve(post.key_id).await?;
        let sealed = seal(version)?;
        rules::check_sealed_under(&sealed, post.key_id)?;
        Ok(sealed)
    }
}

/// The posts of a batch that set a password, as the arrays its two statements take.
#[derive(Default)]
struct Winners {
    ids: Vec<String>,
    versions: Vec<i64>,
    keys: Vec<i64>,
    chunk_owners: Vec<String>,
    chunk_keys: Vec<String>,
    chunk_values: Vec<Vec<u8>>,
}

impl Winners {
    fn add(&mut self, post: &Post, version: u64, sealed: &[u8]) {
        let id = post.id.as_str();
        self.ids.push(id.to_owned());
        self.versions.push(to_i64(version));
        self.keys.push(i64::from(post.key_id));
        for (key, value) in chunks::split(PASSWORD_FIELD, sealed) {
            self.chunk_owners.push(id.to_owned());
            self.chunk_keys.push(key);
            self.chunk_values.push(value.to_vec());
        }
    }
}

/// How a batch ended when it did not commit.
enum BatchFailure {
    /// A statement or the connection failed before any gate was called.
    Before(StoreError),
    /// A gate refused: the batch was rolled back.
    GateRefused,
    /// The anchor or the commit failed after every gate had passed.
    NotCommitted(String),
}

/// The batch's failure as each of its posts hears it.
fn copy_of(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(cause) => StoreError::Unavailable(cause.clone()),
        StoreError::Corrupt(why) => StoreError::Corrupt(why.clone()),
        other => StoreError::Unavailable(other.to_string()),
    }
}
