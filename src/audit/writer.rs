//! The audit writer: one thread that owns the log, fed by a bounded queue, acknowledging each event
//! once it is written (and, where asked, on disk).
//!
//! Handlers hand over an open event line and a [`Durability`]; the writer takes every queued line
//! (up to [`MAX_BATCH`]), seals each into the chain, appends the batch with one `write`, calls
//! `fdatasync` once if any line in the batch must be durable (or always, in [`SyncMode::Always`]),
//! and then acknowledges the whole batch. This is group commit: one disk flush for many requests.
//! A store batch's gates queue their events as one item ([`submitted_together`]), so that the
//! writer does not flush the first of them alone while the store is still running the rest.
//!
//! In [`SyncMode::Write`], an event that need not be durable (a read's) does not go through the
//! thread: the request's own task takes the writer's lock and seals its line into a staged group,
//! yields once so that the other requests ready on its worker seal theirs, and then the first of
//! the group to take the lock again writes the whole group with one `write` and one file check
//! ([`Auditor::record`]); every request of the group answers only after that write, with its
//! outcome. On a loaded machine the hop to a sleeping writer thread and back (two wake-ups, two
//! context switches) cost more than the write itself, and one `write` per read was a sixth of a
//! GET's CPU. The thread still does everything that waits for the disk (durable events, flushes,
//! the 4 MiB write-mode flush, checkpoint ticks), under the same lock, writing any staged group
//! before its own batch, so there is one chain in one order either way.
//!
//! Files are `audit-<first sequence, 20 digits>-<creation time in ms, 15 digits>.jsonl`, so that
//! name order is chain order. A file is rotated when it passes the size limit; a new file's first
//! line continues the chain of the previous file. The writer never deletes a file.
//!
//! If a write or flush fails, the batch is refused (every requester hears an error and answers
//! 503), the chain position rolls back to the last acknowledged line, and the file is truncated
//! back to it; if truncation fails too, the next batch starts a new file. The writer stays up and
//! resumes by itself when writing works again.
//!
//! After every batch (a staged group of reads is one) the writer checks that the file it writes
//! is still linked under its name and is the file it opened (same device and inode). A file deleted or replaced while
//! open would otherwise take acknowledged events into an inode nobody can read: the batch is
//! refused instead, and the next batch (or readiness probe) opens a new file whose first line is
//! an `audit:file_lost` incident event (reason `audit_file_lost`, Critical) naming the lost file and
//! the sequence numbers it held; the chain continues from the last acknowledged line.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc, oneshot};

use super::chain::{AuditKeys, GENESIS};
use super::checkpoint::{CHECKPOINT_EVERY, Segment, recover_segment};
use super::event::{self, Activity, Facts, Reason};
use crate::metrics::AuditMetrics;

/// The most events written in one batch.
pub const MAX_BATCH: usize = 1024;
/// In [`SyncMode::Write`], the most bytes left unflushed: past this the writer thread flushes
/// the file, outside the writer's lock (see [`Writer::start_flush`]). Without it the whole file
/// (up to `max_file_bytes`) was flushed at rotation in one go, stalling every request behind it
/// for a hundred milliseconds (bench/run's p99).
pub const WRITE_MODE_SYNC_BYTES: u64 = 4 * 1024 * 1024;

/// In [`SyncMode::Write`], how many unflushed bytes a file may carry into its rotation: once a
/// file is this close to `max_file_bytes` with this much unflushed, the thread flushes it
/// (outside the lock, as every write-mode flush), so that the rotation's own flush, which runs
/// under the lock on whichever request's write crossed the limit, has little left to do. Without
/// it the rotation flushed up to [`WRITE_MODE_SYNC_BYTES`] there: under GET load, every 32,000
/// events, a worker spent 3.6-4.7 ms in `fdatasync` and 0.7 ms dropping pages with the lock held,
/// and every request in flight waited behind it (`perf trace`, 2026-12-06).
const ROTATION_SYNC_MARGIN: u64 = 256 * 1024;

/// How many synced bytes of the current file may stay in the page cache before the writer lets
/// them go (`POSIX_FADV_DONTNEED`, after their `fdatasync`; a rotated file goes whole). The log is
/// written once and never read back by the daemon, yet the kernel kept all of it cached, so every
/// line landed on a page taken afresh from free memory. On the bench machine (a Firecracker VM
/// with a balloon device) that copy into fresh pages was at times 11 % of a GET's CPU under load,
/// and 0.3 % with the synced pages dropped, so that the kernel reuses their memory; when the
/// kernel has recently freed memory to hand out, the copy is cheap either way. Dropping also
/// keeps the log from pushing the store's pages out of the cache. Dirty pages are never dropped,
/// so letting go loses nothing; a reader of the log (`metapass audit verify`, startup's scan of
/// the newest file) reads it from the disk.
const PAGE_CACHE_KEPT_BYTES: u64 = WRITE_MODE_SYNC_BYTES;

/// When the writer flushes to disk (configured in `[audit] sync`).
pub use crate::config::SyncMode;

/// How durable an event must be before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the operating system (survives a crash of metapass, not of the machine).
    Written,
    /// On disk (`fdatasync`); required for every mutation's event.
    Durable,
}

/// The writer's settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The directory of the log files (created 0700 if missing).
    pub dir: PathBuf,
    /// When to flush.
    pub sync: SyncMode,
    /// Rotate after a file reaches this many bytes.
    pub max_file_bytes: u64,
    /// How many items may wait for the writer: an event, a flush or a probe each, and the events
    /// of one store batch (queued together by [`submitted_together`], at most one store batch
    /// per store writer or lane) as one.
    pub queue_capacity: usize,
    /// How long a requester waits for space in the queue and then for its acknowledgement.
    pub ack_timeout: Duration,
    /// The name under which the store records this log's chain head (one per log: each replica
    /// writes its own); `None` is `<host name>:<log directory>`.
    pub writer_id: Option<String>,
}

/// Where an acknowledged event stands in the chain: the store records the last mutation's, and
/// startup and `audit verify --config` check that the log still holds that line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The event's sequence number.
    pub seq: u64,
    /// The event's MAC.
    pub mac: String,
}

/// What a batch acknowledges: its events' positions (none for a flush or a probe).
type Ack = oneshot::Sender<Result<Option<Written>, AuditError>>;

/// Why an event could not be recorded. The request it belongs to must not release or change
/// anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The queue stayed full past the deadline.
    #[error("the audit queue is full")]
    QueueFull,
    /// The writer has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
    /// The writer did not acknowledge in time.
    #[error("the audit writer did not acknowledge in time")]
    Timeout,
    /// Writing or flushing failed.
    #[error("the audit log could not be written: {0}")]
    Io(String),
}

enum Item {
    Event {
        line: Vec<u8>,
        durability: Durability,
        ack: Ack,
    },
    Flush {
        ack: Ack,
    },
    /// After a failure: can the log's filesystem take a batch again?
    Probe {
        ack: Ack,
    },
    /// Time passed: sign a checkpoint if one is due.
    Tick,
    /// Events submitted inside one [`submitted_together`] scope, queued as one item so that the
    /// writer takes them into one batch (one `write`, one `fdatasync`).
    Together(Vec<Item>),
}

/// An event held back by a [`submitted_together`] scope, with the queue it is for.
type HeldEvent = (mpsc::Sender<Item>, Item);

thread_local! {
    /// The events [`Auditor::submit`] holds back on this thread while a [`submitted_together`]
    /// scope is open.
    static HELD: std::cell::RefCell<Option<Vec<HeldEvent>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`, holding back every event [`Auditor::submit`] queues on this thread meanwhile, and
/// then queues them as one item: the writer takes them into one batch, with one `write` and one
/// `fdatasync`. The store's batches call their gates this way (SQLite's writer between its jobs'
/// statements, PostgreSQL's lanes in one loop): submitted one by one, the first gate's event woke
/// the writer, which wrote and flushed it while the next jobs ran, so one store batch cost the
/// log two or three flushes in a row, and the batch waited for the last of them.
///
/// `f` is synchronous, so the scope cannot span an `await` (and another task's submissions on
/// this thread). A scope inside another adds to the outer one. The held events' tickets work as
/// any others; if the queue is full when the scope ends, they fail as a full queue does, and if
/// `f` panics they are still queued.
pub fn submitted_together<R>(f: impl FnOnce() -> R) -> R {
    struct Release(bool);
    impl Drop for Release {
        fn drop(&mut self) {
            if self.0 {
                release_held();
            }
        }
    }
    let outermost = HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.is_some() {
            return false;
        }
        *held = Some(Vec::new());
        true
    });
    let _release = Release(outermost);
    f()
}

/// Queues what this thread's scope held back: one item per queue, in submission order.
fn release_held() {
    let held = HELD
        .with(|held| held.borrow_mut().take())
        .unwrap_or_default();
    let mut groups: Vec<(mpsc::Sender<Item>, Vec<Item>)> = Vec::new();
    for (tx, item) in held {
        match groups.iter_mut().find(|(queue, _)| queue.same_channel(&tx)) {
            Some((_, items)) => items.push(item),
            None => groups.push((tx, vec![item])),
        }
    }
    for (tx, items) in groups {
        if let Err(refused) = tx.try_send(Item::Together(items)) {
            let (error, item) = match refused {
                mpsc::error::TrySendError::Full(item) => (AuditError::QueueFull, item),
                mpsc::error::TrySendError::Closed(item) => (AuditError::Stopped, item),
            };
            if let Item::Together(items) = item {
                for item in items {
                    if let Item::Event { ack, .. } = item {
                        let _ = ack.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}

/// Read events sealed into the chain by their requests' own tasks and not yet written: one
/// `write` and one file check for all of them (group commit without the thread hop).
struct Staged {
    /// The chain as it stood before the group's first line: what a failed write rolls back to.
    before: ChainMark,
    /// Lines in the group (with an incident line, if the group opens the file after a lost one).
    events: u64,
    group: Arc<Group>,
}

/// What a staged group's requests wait for.
#[derive(Default)]
struct Group {
    /// Set once, under the writer's lock, when the group was written or refused.
    outcome: std::sync::OnceLock<Result<(), AuditError>>,
    published: tokio::sync::Notify,
}

impl Group {
    fn publish(&self, outcome: Result<(), AuditError>) {
        let _ = self.outcome.set(outcome);
        self.published.notify_waiters();
    }
}

/// The chain's position and checkpoint state at one point, to roll a failed write back to.
struct ChainMark {
    seq: u64,
    prev: String,
    segment: Segment,
    unsealed: u64,
    last_checkpoint: Instant,
}

/// The name of the scratch file a probe writes (never an audit file: those start with `audit-`).
const PROBE_FILE: &str = ".writable-probe";
/// How much a probe writes: about one large batch of events.
const PROBE_BYTES: usize = 64 * 1024;

/// What the writer shares for health checks.
#[derive(Debug, Default)]
struct WriterHealth {
    /// Whether the last batch was written.
    healthy: AtomicBool,
    /// When the current batch started (ms since `epoch`), 0 when idle.
    batch_started_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl WriterHealth {
    fn now_ms(&self) -> u64 {
        let epoch = self.epoch.get_or_init(crate::clock::io_now);
        u64::try_from(epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// A pending acknowledgement.
pub struct AuditTicket {
    ack: Result<oneshot::Receiver<Result<Option<Written>, AuditError>>, AuditError>,
    /// Fixed when the event was queued, not when the ticket is awaited: a store batch waiting
    /// for many tickets waits at most one `ack_timeout` for all of them.
    deadline: tokio::time::Instant,
}

impl AuditTicket {
    /// Waits for the writer's acknowledgement, at most until `ack_timeout` after the event was
    /// queued.
    pub async fn wait(self) -> Result<(), AuditError> {
        self.written().await.map(|_| ())
    }

    /// Like [`Self::wait`], and says where the event stands in the chain.
    pub async fn written(self) -> Result<Option<Written>, AuditError> {
        let rx = self.ack?;
        match tokio::time::timeout_at(self.deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::Timeout),
        }
    }
}

/// The handle through which requests record events. Cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Item>,
    /// The writer's state, shared by its thread and, in [`SyncMode::Write`], by requests writing
    /// their own (non-durable) events.
    writer: Arc<Mutex<Writer>>,
    sync: SyncMode,
    keys: Arc<AuditKeys>,
    health: Arc<WriterHealth>,
    metrics: AuditMetrics,
    ack_timeout: Duration,
    queue_capacity: usize,
    writer_id: Arc<str>,
    /// Where the chain stood when the writer started (the last line recovered).
    recovered: Option<Written>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").finish_non_exhaustive()
    }
}

impl Auditor {
    /// Opens the log directory, recovers the chain position from the newest file, and starts the
    /// writer thread.
    pub fn start(
        config: WriterConfig,
        keys: Arc<AuditKeys>,
        metrics: AuditMetrics,
    ) -> Result<Self, io::Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.dir)?;
        let lock = lock_dir(&config.dir)?;
        let position = recover(&config.dir, &keys)?;
        let writer_id: Arc<str> = writer_id(config.writer_id.as_deref(), &config.dir).into();
        let segment = recover_segment(&log_files(&config.dir)?)?;
        let recovered = (position.seq > 0).then(|| Written {
            seq: position.seq,
            mac: position.prev.clone(),
        });
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let health = Arc::new(WriterHealth::default());
        health.healthy.store(true, Ordering::Relaxed);
        let file_id = match &position.file {
            Some((file, _)) => Some(file_identity(file)?),
            None => None,
        };
        let writer = Writer {
            dir: config.dir.clone(),
            file_id,
            lost: None,
            segment,
            unsealed: 0,
            last_checkpoint: crate::clock::io_now(),
            sync: config.sync,
            max_file_bytes: config.max_file_bytes,
            keys: keys.clone(),
            file: position.file,
            size: position.size,
            seq: position.seq,
            prev: position.prev,
            health: health.clone(),
            metrics: metrics.clone(),
            buf: Vec::with_capacity(64 * 1024),
            unsynced: false,
            unsynced_bytes: 0,
            cached_from: 0,
            staged: None,
            _lock: lock,
        };
        let writer = Arc::new(Mutex::new(writer));
        let shared = writer.clone();
        thread::Builder::new()
            .name("metapass-audit-writer".into())
            .spawn(move || Writer::run(&shared, rx))?;
        Ok(Self {
            tx,
            writer,
            sync: config.sync,
            keys,
            health,
            metrics,
            ack_timeout: config.ack_timeout,
            queue_capacity: config.queue_capacity,
            writer_id,
            recovered,
        })
    }

    /// The name the store records this log's chain head under.
    pub fn writer_id(&self) -> &str {
        &self.writer_id
    }

    /// The same name, shared (each mutation's anchor carries it).
    pub fn shared_writer_id(&self) -> Arc<str> {
        self.writer_id.clone()
    }

    /// The last line of the log when the writer started (`None` for an empty log).
    pub fn recovered(&self) -> Option<&Written> {
        self.recovered.as_ref()
    }

    /// The audit keys (for fingerprints).
    pub fn keys(&self) -> &AuditKeys {
        &self.keys
    }

    /// Queues an event without waiting for queue space (for callers that must not block, such as
    /// the store's writer thread). A full queue yields a ticket that fails at once. Inside a
    /// [`submitted_together`] scope, the event is queued when the scope ends.
    pub fn submit(&self, line: Vec<u8>, durability: Durability) -> AuditTicket {
        let (ack, rx) = oneshot::channel();
        let item = Item::Event {
            line,
            durability,
            ack,
        };
        let deadline = crate::clock::io_now_tokio() + self.ack_timeout;
        // Inside a `submitted_together` scope: queued when the scope ends.
        let item = HELD.with(|held| match held.borrow_mut().as_mut() {
            Some(held) => {
                held.push((self.tx.clone(), item));
                None
            }
            None => Some(item),
        });
        let Some(item) = item else {
            return AuditTicket {
                ack: Ok(rx),
                deadline,
            };
        };
        let ack = match self.tx.try_send(item) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => Err(AuditError::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(AuditError::Stopped),
        };
        AuditTicket { ack, deadline }
    }

    /// Records an event and waits until it is as durable as asked.
    ///
    /// In [`SyncMode::Write`] an event that need only be [`Durability::Written`] is sealed by the
    /// calling task under the writer's lock and written with the other reads staged with it
    /// (see [`Self::written_with`]). Everything else is queued for the writer thread, waiting for
    /// queue space up to the deadline, and then for its acknowledgement.
    pub async fn record(&self, line: Vec<u8>, durability: Durability) -> Result<(), AuditError> {
        // One deadline for the wait for queue space and the acknowledgement; for a read in write
        // mode, for the wait for the lock (its group's write then has none: see written_with).
        let deadline = crate::clock::io_now_tokio() + self.ack_timeout;
        if durability == Durability::Written && self.sync == SyncMode::Write {
            let Ok(mut writer) = tokio::time::timeout_at(deadline, self.writer.lock()).await else {
                return Err(AuditError::Timeout);
            };
            let group = writer.stage(&line);
            drop(writer);
            return self.written_with(&group).await;
        }
        let (ack, rx) = oneshot::channel();
        let item = Item::Event {
            line,
            durability,
            ack,
        };
        match tokio::time::timeout_at(deadline, self.tx.send(item)).await {
            Ok(Ok(())) => {}
            Err(_) => return Err(AuditError::QueueFull),
            Ok(Err(_)) => return Err(AuditError::Stopped),
        }
        AuditTicket {
            ack: Ok(rx),
            deadline,
        }
        .wait()
        .await
    }

    /// Waits until the staged `group` holding this task's line is written, and returns its
    /// outcome.
    ///
    /// Yields first, so that the other requests ready on this worker stage their lines into the
    /// same group; then whichever of the group's requests takes the lock first writes it for all
    /// (the writer thread also writes a staged group before its own batch). No deadline here: the
    /// line is already sealed into the chain, so the answer must follow what becomes of it, and
    /// that is known within one `write` (the lock is never held across a staged group's disk
    /// flush: the thread writes the group before flushing its own batch).
    async fn written_with(&self, group: &Group) -> Result<(), AuditError> {
        tokio::task::yield_now().await;
        if let Some(outcome) = group.outcome.get() {
            return outcome.clone();
        }
        let published = group.published.notified();
        tokio::pin!(published);
        published.as_mut().enable();
        if group.outcome.get().is_none() {
            tokio::select! {
                biased;
                () = &mut published => {}
                mut writer = self.writer.lock() => {
                    // Groups are written in order: one not yet written is the one staged.
                    if group.outcome.get().is_none() && writer.write_staged() {
                        // The write-mode flush (every WRITE_MODE_SYNC_BYTES, and before a
                        // rotation) waits for the disk: the thread's.
                        self.tick();
                    }
                }
            }
        }
        group
            .outcome
            .get()
            .cloned()
            .unwrap_or(Err(AuditError::Stopped))
    }

    /// Asks the writer to sign a checkpoint if events were written since the last one and
    /// [`CHECKPOINT_EVERY`] has passed, and to flush if a write-mode flush is due (called on a
    /// timer and after a request wrote a staged group; never waits).
    pub fn tick(&self) {
        let _ = self.tx.try_send(Item::Tick);
    }

    /// Waits until everything queued before this call is written, sealed by a signed
    /// checkpoint, and on disk.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send_timeout(Item::Flush { ack }, self.ack_timeout)
            .await
            .map_err(|_| AuditError::Stopped)?;
        AuditTicket {
            ack: Ok(rx),
            deadline: crate::clock::io_now_tokio() + self.ack_timeout,
        }
        .wait()
        .await
    }

    /// Whether the log can record: healthy, or, after a failure, a probe of the log's filesystem
    /// (a scratch file of about one batch, synced and removed) now succeeds. Readiness uses this,
    /// so a replica becomes ready again as soon as the disk has room, without waiting for traffic.
    pub async fn writable(&self) -> bool {
        if self.healthy() {
            return true;
        }
        let (ack, rx) = oneshot::channel();
        if self
            .tx
            .send_timeout(Item::Probe { ack }, self.ack_timeout)
            .await
            .is_err()
        {
            return false;
        }
        AuditTicket {
            ack: Ok(rx),
            deadline: crate::clock::io_now_tokio() + self.ack_timeout,
        }
        .wait()
        .await
        .is_ok()
    }

    /// Whether the log is writable: the last batch succeeded and the writer is not stuck in one
    /// for longer than the acknowledgement deadline.
    pub fn healthy(&self) -> bool {
        let started = self.health.batch_started_ms.load(Ordering::Relaxed);
        let stuck = started != 0
            && self.health.now_ms().saturating_sub(started)
                > u64::try_from(self.ack_timeout.as_millis()).unwrap_or(u64::MAX);
        self.health.healthy.load(Ordering::Relaxed) && !stuck && !self.tx.is_closed()
    }

    /// Events waiting in the queue; also sets the queue-depth gauge.
    pub fn queue_depth(&self) -> usize {
        let depth = self.queue_capacity.saturating_sub(self.tx.capacity());
        self.metrics
            .queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        depth
    }
}

struct Position {
    file: Option<(File, PathBuf)>,
    size: u64,
    seq: u64,
    prev: String,
}

/// Finds where the chain stands: the last complete line of the newest file that has one. A torn
/// last line (a crash mid-write) is left in place and the next write starts a new file.
fn recover(dir: &Path, keys: &AuditKeys) -> io::Result<Position> {
    let files = log_files(dir)?;
    let mut append_to = None;
    for (i, path) in files.iter().enumerate().rev() {
        let (len, torn, last_complete) = last_complete_line(path)?;
        let newest = i + 1 == files.len();
        if newest && !torn {
            append_to = Some(path.clone());
        }
        if torn {
            tracing::warn!(file = %path.display(), "audit file ends with a torn line (an earlier crash); continuing the chain in a new file");
        }
        if let Some(line) = last_complete {
            let fields = keys.check_line(&line).map_err(|e| {
                io::Error::other(format!(
                    "the last audit line of {} does not verify with the configured audit key ({e}); \
                     run `metapass audit verify` before starting",
                    path.display()
                ))
            })?;
            let file = match append_to.filter(|_| newest) {
                Some(p) => Some((OpenOptions::new().append(true).open(&p)?, p)),
                None => None,
            };
            let size = if file.is_some() { len } else { 0 };
            return Ok(Position {
                file,
                size,
                seq: fields.seq,
                prev: fields.mac,
            });
        }
    }
    Ok(Position {
        file: None,
        size: 0,
        seq: 0,
        prev: GENESIS.to_owned(),
    })
}

/// The length of `path`, whether it ends with a torn line, and its last complete non-empty line
/// (without its newline). Reads from the end, a window that doubles until it holds that line:
/// a file is up to `max_file_bytes`, and reading it whole had set the daemon's peak memory.
fn last_complete_line(path: &Path) -> io::Result<(u64, bool, Option<Vec<u8>>)> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut window = 16 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        let mut tail = vec![0u8; usize::try_from(len - start).map_err(io::Error::other)?];
        file.read_exact_at(&mut tail, start)?;
        let torn = !tail.is_empty() && !tail.ends_with(b"\n");
        // Complete lines end at a newline; the bytes after the last one are torn.
        let mut end = tail.iter().rposition(|&b| b == b'\n');
        while let Some(line_end) = end {
            let line_start = match tail[..line_end].iter().rposition(|&b| b == b'\n') {
                Some(newline) => newline + 1,
                // The window's first line is whole only if the window starts the file.
                None if start == 0 => 0,
                None => break,
            };
            if line_start < line_end {
                return Ok((len, torn, Some(tail[line_start..line_end].to_vec())));
            }
            end = line_start.checked_sub(1);
        }
        if start == 0 {
            return Ok((len, torn, None));
        }
        window = window.saturating_mul(2);
    }
}

/// The audit files of `dir` in chain order.
pub fn log_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Takes the audit directory for this process alone: one chain has one writer. A second daemon
/// (or `import-nova`) on the same directory is refused instead of interleaving sequence numbers.
fn lock_dir(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(".lock"))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "in use by another metapass process (one audit directory per process)",
                )
            } else {
                io::Error::from(e)
            }
        },
    )?;
    Ok(file)
}

/// Lets the page cache drop `file`'s synced bytes from `from` to `to` (rounded down to a page, the
/// last partial page still being appended to; `u64::MAX`: to the end), and returns where the
/// cached bytes now begin. Advice only: a failure is logged and changes nothing else, and a page
/// still dirty is not dropped (see [`PAGE_CACHE_KEPT_BYTES`]).
fn release_page_cache(file: &File, from: u64, to: u64) -> u64 {
    let page = rustix::param::page_size() as u64;
    let end = if to == u64::MAX { to } else { to - to % page };
    let start = from - from % page;
    if end <= start {
        return from;
    }
    let len = if end == u64::MAX {
        None
    } else {
        std::num::NonZeroU64::new(end - start)
    };
    if let Err(e) = rustix::fs::fadvise(file, start, len, rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "letting the page cache drop synced audit bytes failed");
        return from;
    }
    end
}

/// An audit file that disappeared from under the writer.
#[derive(Debug, Clone)]
struct LostFile {
    path: PathBuf,
    /// The last sequence number acknowledged before the loss was seen.
    last_acknowledged: u64,
}

fn file_identity(file: &File) -> io::Result<(u64, u64)> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// A write-mode flush started under the lock and finished without it.
struct PendingFlush {
    /// The current file's second handle: syncing it syncs the file.
    file: File,
    file_id: Option<(u64, u64)>,
    /// The file's size when the flush started: what it covers at least.
    size: u64,
    /// The file's [`Writer::cached_from`] when the flush started.
    cached_from: u64,
}

impl PendingFlush {
    /// `fdatasync`s, then records the outcome under the lock. The file counts as flushed only if
    /// nothing was written to it meanwhile; a failure is counted and logged, readiness reports
    /// it until the next write succeeds, and the flush is due again at the next tick.
    fn finish(self, shared: &Mutex<Writer>) {
        let started = crate::clock::io_now();
        let synced = self.file.sync_data();
        let elapsed = started.elapsed();
        // Without the lock too: dropping 4 MiB of pages takes 0.2-0.3 ms here.
        let released = match synced {
            Ok(()) => release_page_cache(&self.file, self.cached_from, self.size),
            Err(_) => self.cached_from,
        };
        let mut writer = shared.blocking_lock();
        match synced {
            Ok(()) => {
                writer.metrics.fsync_seconds.observe(elapsed.as_secs_f64());
                if writer.file_id == self.file_id {
                    writer.cached_from = writer.cached_from.max(released).min(writer.size);
                    if writer.size == self.size {
                        writer.unsynced = false;
                    }
                }
            }
            Err(e) => {
                writer.health.healthy.store(false, Ordering::Relaxed);
                writer.metrics.write_failures.inc();
                writer.unsynced_bytes = writer.unsynced_bytes.max(WRITE_MODE_SYNC_BYTES);
                tracing::error!(error = %e, "flushing the audit file to disk failed: events written since the last flush would not survive a crash of the host; retried at the next tick");
            }
        }
    }
}

/// Adds `item` to the thread's batch, the events of a [`Item::Together`] one by one.
fn push_flat(batch: &mut Vec<Item>, item: Item) {
    match item {
        Item::Together(items) => batch.extend(items),
        item => batch.push(item),
    }
}

/// What [`Writer::write_batch`] needs of a batch: its event lines and how it must end.
#[derive(Clone, Copy)]
struct BatchView<'a> {
    lines: &'a [&'a [u8]],
    /// Some event must be on disk before it is acknowledged, or a flush was asked for.
    must_sync: bool,
    /// A flush was asked for (shutdown, import-nova): the batch ends with a checkpoint.
    flushing: bool,
    /// Nothing but ticks: write only a due checkpoint or a due flush.
    ticks_only: bool,
    /// Leave the write-mode flush to the thread (an inline write).
    defer_flush: bool,
}

impl<'a> BatchView<'a> {
    /// The view of the thread's batch; `lines` receives its event lines, in order.
    fn of(batch: &'a [Item], lines: &'a mut Vec<&'a [u8]>) -> Self {
        lines.extend(batch.iter().filter_map(|i| match i {
            Item::Event { line, .. } => Some(line.as_slice()),
            _ => None,
        }));
        Self {
            lines,
            must_sync: batch.iter().any(|i| match i {
                Item::Event { durability, .. } => *durability == Durability::Durable,
                Item::Flush { .. } => true,
                // Never in a batch: push_flat opened it.
                Item::Probe { .. } | Item::Tick | Item::Together(_) => false,
            }),
            flushing: batch.iter().any(|i| matches!(i, Item::Flush { .. })),
            ticks_only: batch.iter().all(|i| matches!(i, Item::Tick)),
            defer_flush: false,
        }
    }
}

struct Writer {
    /// The directory's lock, held for as long as the writer runs.
    _lock: File,
    dir: PathBuf,
    sync: SyncMode,
    max_file_bytes: u64,
    keys: Arc<AuditKeys>,
    file: Option<(File, PathBuf)>,
    /// The (device, inode) of `file` when it was opened.
    file_id: Option<(u64, u64)>,
    /// A file found deleted or replaced, whose incident event the next file opens with.
    lost: Option<LostFile>,
    /// The lines since the last checkpoint (its own line first).
    segment: Segment,
    /// Lines written since the last checkpoint.
    unsealed: u64,
    /// When the last checkpoint was written.
    last_checkpoint: Instant,
    size: u64,
    seq: u64,
    prev: String,
    health: Arc<WriterHealth>,
    metrics: AuditMetrics,
    buf: Vec<u8>,
    /// Written lines not yet flushed to disk.
    unsynced: bool,
    /// Bytes written since the last fdatasync (see [`WRITE_MODE_SYNC_BYTES`]).
    unsynced_bytes: u64,
    /// Where the current file's bytes that may still be in the page cache begin (see
    /// [`PAGE_CACHE_KEPT_BYTES`]): everything before it is synced and has been let go.
    cached_from: u64,
    /// The read events sealed into `buf` but not yet written, if any.
    staged: Option<Staged>,
}

impl Writer {
    /// The writer thread: takes every queued item (up to [`MAX_BATCH`]), writes them as one batch
    /// under the lock, and acknowledges them.
    fn run(shared: &Mutex<Writer>, mut rx: mpsc::Receiver<Item>) {
        let mut written = Vec::with_capacity(MAX_BATCH);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.blocking_recv() {
            push_flat(&mut batch, first);
            // A `Together` item goes in whole: the batch may pass MAX_BATCH by one store batch.
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(item) => push_flat(&mut batch, item),
                    Err(_) => break,
                }
            }
            let has_events = batch.iter().any(|i| matches!(i, Item::Event { .. }));
            let probing = batch.iter().any(|i| matches!(i, Item::Probe { .. }));
            let mut lines = Vec::with_capacity(batch.len());
            let view = BatchView::of(&batch, &mut lines);
            written.clear();
            let (result, flush) = {
                let mut writer = shared.blocking_lock();
                // Reads staged by requests come first in the chain, and are written (and
                // answered) before this batch waits for any disk flush.
                writer.write_staged();
                let flush = writer.start_flush();
                let result = writer.attempt(|w| {
                    w.write_batch(view, Some(&mut written)).and_then(|()| {
                        // A batch of events answers a probe by itself; otherwise test the space.
                        if probing && !has_events {
                            w.probe_space()
                        } else {
                            Ok(())
                        }
                    })
                });
                (result, flush)
            };
            let mut positions = written.drain(..);
            for item in batch.drain(..) {
                let (ack, position) = match item {
                    Item::Event { ack, .. } => (ack, positions.next()),
                    Item::Flush { ack } | Item::Probe { ack } => (ack, None),
                    Item::Tick | Item::Together(_) => continue,
                };
                let _ = ack.send(result.clone().map(|()| position));
            }
            // The write-mode flush waits for the disk without the lock, after the batch is
            // answered: requests go on writing their own events meanwhile (under the lock it had
            // been most of the GET p99 at half of peak).
            if let Some(flush) = flush {
                flush.finish(shared);
            }
        }
        let writer = shared.blocking_lock();
        if writer.unsynced
            && let Some((file, _)) = &writer.file
        {
            let _ = file.sync_data();
        }
    }

    /// In [`SyncMode::Write`], when a flush is due ([`Self::write_mode_flush_due`]): a second
    /// handle on the current file, for [`PendingFlush::finish`] to `fdatasync` without holding
    /// the lock. `None` otherwise, or when the handle cannot be had (the flush is then done under
    /// the lock, by the next batch, as before).
    fn start_flush(&mut self) -> Option<PendingFlush> {
        if self.sync != SyncMode::Write || !self.write_mode_flush_due() {
            return None;
        }
        let file = self.file.as_ref()?.0.try_clone().ok()?;
        // Counted afresh from here, so that no other flush starts while this one runs.
        self.unsynced_bytes = 0;
        Some(PendingFlush {
            file,
            file_id: self.file_id,
            size: self.size,
            cached_from: self.cached_from,
        })
    }

    /// Runs one write under the health bookkeeping: marks the batch as started (for the stuck
    /// check), then healthy or failed (counted and logged: requests fail closed).
    fn attempt(
        &mut self,
        write: impl FnOnce(&mut Self) -> io::Result<()>,
    ) -> Result<(), AuditError> {
        self.health
            .batch_started_ms
            .store(self.health.now_ms(), Ordering::Relaxed);
        let result = write(self).map_err(|e| io_failure(&e));
        self.health.batch_started_ms.store(0, Ordering::Relaxed);
        match &result {
            Ok(()) => self.health.healthy.store(true, Ordering::Relaxed),
            Err(e) => {
                self.health.healthy.store(false, Ordering::Relaxed);
                self.metrics.write_failures.inc();
                tracing::error!(error = %e, "audit batch could not be written; requests fail closed");
            }
        }
        result
    }

    /// Seals a read's event line into the staged group (starting one if none is staged) and
    /// returns the group to wait on: see [`Auditor::written_with`].
    fn stage(&mut self, line: &[u8]) -> Arc<Group> {
        if self.staged.is_none() {
            let before = self.mark();
            self.buf.clear();
            let mut events = 0;
            if self.file.is_none()
                && let Some(lost) = &self.lost
            {
                let incident = incident_line(lost);
                self.seal(&incident);
                events += 1;
            }
            self.staged = Some(Staged {
                before,
                events,
                group: Arc::default(),
            });
        }
        self.seal(line);
        let staged = self.staged.as_mut().expect("a group is staged");
        staged.events += 1;
        staged.group.clone()
    }

    /// Writes the staged group, if there is one, and publishes its outcome to its requests (one
    /// `write` and one file check; never flushed here). Returns whether a write-mode flush is
    /// due, for the thread to do.
    fn write_staged(&mut self) -> bool {
        if self.staged.is_none() {
            return false;
        }
        let view = BatchView {
            lines: &[],
            must_sync: false,
            flushing: false,
            ticks_only: false,
            defer_flush: true,
        };
        // The outcome reaches the group's requests through `write_batch`'s publication.
        let _ = self.attempt(|w| w.write_batch(view, None));
        self.write_mode_flush_due()
    }

    /// Whether the unflushed bytes call for a write-mode flush: [`WRITE_MODE_SYNC_BYTES`] of
    /// them, or [`ROTATION_SYNC_MARGIN`] of them with the file that close to its rotation.
    fn write_mode_flush_due(&self) -> bool {
        self.unsynced
            && (self.unsynced_bytes >= WRITE_MODE_SYNC_BYTES
                || (self.unsynced_bytes >= ROTATION_SYNC_MARGIN
                    && self.size.saturating_add(ROTATION_SYNC_MARGIN) >= self.max_file_bytes))
    }

    /// Where the chain stands now.
    fn mark(&self) -> ChainMark {
        ChainMark {
            seq: self.seq,
            prev: self.prev.clone(),
            segment: self.segment.clone(),
            unsealed: self.unsealed,
            last_checkpoint: self.last_checkpoint,
        }
    }

    /// Writes, syncs and removes a scratch file of [`PROBE_BYTES`] in the log directory.
    fn probe_space(&self) -> io::Result<()> {
        let path = self.dir.join(PROBE_FILE);
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(&[0u8; PROBE_BYTES])?;
            file.sync_data()
        })();
        let _ = std::fs::remove_file(&path);
        written
    }

    /// Writes the batch; on success `written` (if asked for) holds each event's position, in
    /// batch order.
    ///
    /// Long on purpose: the order of its steps (seal, write, fsync, file identity, checkpoint)
    /// is the durability argument, and reads as one sequence.
    fn write_batch(
        &mut self,
        batch: BatchView<'_>,
        mut written: Option<&mut Vec<Written>>,
    ) -> io::Result<()> {
        let must_sync = self.sync == SyncMode::Always || batch.must_sync;
        let checkpoint_due =
            self.unsealed > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
        let flush_due = self.write_mode_flush_due();
        if batch.ticks_only && !checkpoint_due && !flush_due && self.staged.is_none() {
            return Ok(());
        }
        // A staged group's lines are already in `buf`, sealed from where the chain stood then.
        let staged = self.staged.take();
        let (before, mut events, group) = match staged {
            Some(Staged {
                before,
                events,
                group,
            }) => (before, events, Some(group)),
            None => {
                let before = self.mark();
                self.buf.clear();
                let mut events = 0u64;
                if self.file.is_none()
                    && let Some(lost) = &self.lost
                {
                    let line = incident_line(lost);
                    self.seal(&line);
                    events += 1;
                }
                (before, events, None)
            }
        };
        let seq0 = before.seq;
        // A batch that opens a new file starts it at zero; otherwise it starts at the current size.
        let size0 = if self.file.is_some() { self.size } else { 0 };
        for line in batch.lines {
            self.seal(line);
            if let Some(written) = written.as_deref_mut() {
                written.push(Written {
                    seq: self.seq,
                    mac: self.prev.clone(),
                });
            }
            events += 1;
        }
        // Sign what is unsealed when a second has passed, before a rotation (every file ends
        // sealed), and on a flush (what shutdown and import-nova end with).
        let rotating = size0 + self.buf.len() as u64 >= self.max_file_bytes;
        let flushing = batch.flushing;
        let checkpointed = self.unsealed > 0
            && (rotating || flushing || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY);
        if checkpointed {
            let line = self.segment.checkpoint_line(&self.keys, self.seq);
            self.segment = Segment::default();
            self.seal(&line);
            self.unsealed = 0;
            self.last_checkpoint = crate::clock::io_now();
            events += 1;
        }
        // Written into a file that was unlinked or replaced is not written: checked after.
        let result = self
            .append(must_sync, batch.defer_flush, seq0 + 1)
            .and_then(|()| self.check_in_place());
        if let Some(group) = group {
            group.publish(result.as_ref().map(|_| ()).map_err(io_failure));
        }
        match result {
            Ok(()) => {
                self.lost = None;
                if checkpointed {
                    // For an off-host witness: the operational log (journald under systemd).
                    tracing::info!(
                        through_sequence = self.seq - 1,
                        checkpoint_sequence = self.seq,
                        checkpoint_mac = %self.prev,
                        "audit checkpoint signed"
                    );
                }
                self.metrics.events_written.inc_by(events);
                self.metrics.batches_written.inc();
                if self.size >= self.max_file_bytes {
                    self.close_current();
                }
                Ok(())
            }
            Err(e) => {
                // A loss seen after the write: this batch's lines were never acknowledged.
                if let Some(lost) = &mut self.lost {
                    lost.last_acknowledged = lost.last_acknowledged.min(seq0);
                }
                self.seq = before.seq;
                self.prev = before.prev;
                self.segment = before.segment;
                self.unsealed = before.unsealed;
                self.last_checkpoint = before.last_checkpoint;
                self.roll_back(size0);
                Err(e)
            }
        }
    }

    /// Appends `buf` to the current file (opening one, named after `first_seq`, if needed) and
    /// flushes if asked, or if [`WRITE_MODE_SYNC_BYTES`] are unflushed (unless `defer_flush`:
    /// an inline write leaves that flush to the thread).
    fn append(&mut self, must_sync: bool, defer_flush: bool, first_seq: u64) -> io::Result<()> {
        if self.file.is_none() {
            self.open_new_file(first_seq)?;
        }
        let (file, _) = self.file.as_mut().expect("a file is open");
        if !self.buf.is_empty() {
            file.write_all(&self.buf)?;
            self.size += self.buf.len() as u64;
            self.unsynced = true;
            self.unsynced_bytes += self.buf.len() as u64;
        }
        // The rotation margin's flush is left to the thread's next batch (outside the lock).
        let due = must_sync || (!defer_flush && self.unsynced_bytes >= WRITE_MODE_SYNC_BYTES);
        if due && self.unsynced {
            let started = crate::clock::io_now();
            file.sync_data()?;
            self.metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            self.unsynced = false;
            self.unsynced_bytes = 0;
            // Under the lock, as the sync before it: 0.2-0.3 ms once per 4 MiB (about 2,000
            // events), on the writer thread's durable batches or the rare write-mode flush that
            // could not get a second handle.
            if self.size - self.cached_from >= PAGE_CACHE_KEPT_BYTES {
                self.cached_from = release_page_cache(file, self.cached_from, self.size);
            }
        }
        Ok(())
    }

    /// Seals `open` as the next line of the chain into the batch buffer and adds it to the
    /// checkpoint segment.
    fn seal(&mut self, open: &[u8]) {
        let start = self.buf.len();
        self.seq += 1;
        self.prev = self
            .keys
            .seal_line(open, self.seq, &self.prev, &mut self.buf);
        self.segment.add(self.seq, &self.buf[start..]);
        self.unsealed += 1;
    }

    /// Fails (and gives the file up) when the open file is no longer the one linked under its
    /// name: deleted (the name gone, or another inode there) or replaced (another inode there).
    /// One `lstat` of the name: the open file keeps its inode number while it is held, so the
    /// name shows that (device, inode) exactly when it still links the file written to.
    ///
    /// Called after a batch is written, not before as well: a file lost between two batches is
    /// found by the next one, which is then refused (its requests answered 503) and the chain
    /// goes on in a new file. Checking before as well saved that one batch for three more
    /// system calls on every request.
    fn check_in_place(&mut self) -> io::Result<()> {
        let (Some((_, path)), Some(id)) = (&self.file, self.file_id) else {
            return Ok(());
        };
        let in_place = match fs::symlink_metadata(path) {
            Ok(meta) => (meta.dev(), meta.ino()) == id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if in_place {
            return Ok(());
        }
        let path = path.clone();
        tracing::error!(file = %path.display(), "the audit file was deleted or replaced while open; refusing this batch and continuing the chain in a new file");
        self.lost = Some(LostFile {
            path: path.clone(),
            last_acknowledged: self.seq,
        });
        self.file = None;
        self.file_id = None;
        self.size = 0;
        self.unsynced = false;
        self.unsynced_bytes = 0;
        Err(io::Error::other(format!(
            "the audit file {} was deleted or replaced while open",
            path.display()
        )))
    }

    /// After a failed batch: cut the file back to `acked` bytes (the end of the last acknowledged
    /// line), or give the file up so that the next batch starts a new one.
    fn roll_back(&mut self, acked: u64) {
        let Some((file, path)) = &self.file else {
            return;
        };
        let repaired = file.set_len(acked).and_then(|()| file.sync_data());
        match repaired {
            Ok(()) => {
                self.size = acked;
                self.cached_from = self.cached_from.min(acked);
                self.unsynced = false;
                self.unsynced_bytes = 0;
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "could not truncate the audit file after a failed write; the next batch starts a new file");
                self.file = None;
            }
        }
    }

    fn close_current(&mut self) {
        if let Some((file, _)) = self.file.take() {
            let synced = if self.unsynced {
                self.unsynced = false;
                file.sync_data().inspect_err(
                    |e| tracing::error!(error = %e, "flushing a rotated audit file failed"),
                )
            } else {
                Ok(())
            };
            if synced.is_ok() {
                // The whole file, its last partial page included: nothing writes to it again.
                release_page_cache(&file, self.cached_from, u64::MAX);
            }
        }
        self.unsynced_bytes = 0;
        self.size = 0;
        self.cached_from = 0;
    }

    fn open_new_file(&mut self, first_seq: u64) -> io::Result<()> {
        let created_ms = crate::clock::wall_now().unix_timestamp_nanos() / 1_000_000;
        for bump in 0..1000i128 {
            let name = format!("audit-{first_seq:020}-{:015}.jsonl", created_ms + bump);
            let path = self.dir.join(name);
            match OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    File::open(&self.dir)?.sync_all()?;
                    self.file_id = Some(file_identity(&file)?);
                    self.file = Some((file, path));
                    self.size = 0;
                    self.cached_from = 0;
                    self.unsynced = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("no free audit file name"))
    }
}

/// The writer id the store anchors a log's chain under: the configured one, or
/// `<host name>:<log directory>` (unique per log on a host, stable across restarts).
pub fn writer_id(configured: Option<&str>, dir: &Path) -> String {
    if let Some(id) = configured {
        return id.to_owned();
    }
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    // The parent too, so that `audit verify` finds the same id for a log directory deleted whole.
    let dir = fs::canonicalize(dir)
        .ok()
        .or_else(|| {
            let parent = fs::canonicalize(dir.parent()?).ok()?;
            Some(parent.join(dir.file_name()?))
        })
        .unwrap_or_else(|| dir.to_path_buf());
    format!("{host}:{}", dir.display())
}

/// What requests hear of a failed write or flush.
fn io_failure(e: &io::Error) -> AuditError {
    AuditError::Io(e.to_string())
}

/// The open line of the incident event that starts the file after a lost one.
fn incident_line(lost: &LostFile) -> Vec<u8> {
    let name = lost
        .path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut facts = Facts::system("audit:file_lost", Activity::Update);
    facts.reason = Reason::AuditFileLost;
    facts.detail = Some(event::bounded(&format!(
        "the audit file {name} was deleted or replaced while metapass was writing it; the events up to sequence {} that it held are no longer in the log directory, and requests in flight were refused",
        lost.last_acknowledged
    )));
    event::encode(&facts, 500, Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_mode_auditor(dir: &Path) -> Auditor {
        write_mode_auditor_rotating_at(dir, 1 << 30)
    }

    fn write_mode_auditor_rotating_at(dir: &Path, max_file_bytes: u64) -> Auditor {
        let config = WriterConfig {
            dir: dir.to_owned(),
            sync: SyncMode::Write,
            max_file_bytes,
            queue_capacity: 16,
            ack_timeout: Duration::from_secs(5),
            writer_id: Some("test".into()),
        };
        let keys = Arc::new(AuditKeys::derive(&[9; 32]).unwrap());
        Auditor::start(config, keys, AuditMetrics::default()).unwrap()
    }

    #[test]
    fn the_last_complete_line_is_found_from_the_end_of_any_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let last = |content: &[u8]| {
            fs::write(&path, content).unwrap();
            let (len, torn, line) = last_complete_line(&path).unwrap();
            assert_eq!(len, content.len() as u64);
            (torn, line.map(|l| String::from_utf8(l).unwrap()))
        };
        assert_eq!(last(b""), (false, None));
        assert_eq!(last(b"torn"), (true, None));
        assert_eq!(last(b"\n\n"), (false, None));
        assert_eq!(last(b"one\n"), (false, Some("one".into())));
        assert_eq!(last(b"one\ntwo\n\n"), (false, Some("two".into())));
        assert_eq!(last(b"one\ntwo\ntor"), (true, Some("two".into())));
        // Lines longer than the first window, and a last line that starts exactly at the
        // file's beginning.
        let long = "x".repeat(100_000);
        let content = format!("{long}\n{long}y\n");
        assert_eq!(last(content.as_bytes()), (false, Some(format!("{long}y"))));
        let content = format!("{long}\n{}", "z".repeat(40_000));
        assert_eq!(last(content.as_bytes()), (true, Some(long.clone())));
        let content = format!("{long}\n\n\n");
        assert_eq!(last(content.as_bytes()), (false, Some(long)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_mode_flush_holds_no_lock_and_covers_only_what_it_found() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = write_mode_auditor(dir.path());
        let line = event::encode(
            &Facts::system("test:line", Activity::Read),
            200,
            Duration::ZERO,
        );
        // Written under the lock without `record`, so that no tick reaches the thread.
        let flush = {
            let mut writer = auditor.writer.lock().await;
            while writer.unsynced_bytes < WRITE_MODE_SYNC_BYTES {
                writer.stage(&line);
                writer.write_staged();
            }
            let flush = writer.start_flush().expect("a flush is due");
            assert!(writer.start_flush().is_none(), "one flush at a time");
            flush
        };
        // While it is pending, requests still write their own events: the lock is free.
        auditor
            .record(line.clone(), Durability::Written)
            .await
            .unwrap();
        let shared = auditor.writer.clone();
        tokio::task::spawn_blocking(move || flush.finish(&shared))
            .await
            .unwrap();
        assert!(auditor.health.healthy.load(Ordering::Relaxed));
        assert!(
            auditor.writer.lock().await.unsynced,
            "the line written during the flush is not known to be on disk"
        );
        // With nothing written meanwhile, the flush covers the file.
        write_until_a_flush_is_due_and_flush(&auditor, &line).await;
        assert!(!auditor.writer.lock().await.unsynced);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_near_its_rotation_is_flushed_by_the_thread_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let max = 2 * 1024 * 1024;
        let auditor = write_mode_auditor_rotating_at(dir.path(), max);
        let line = read_line();
        // Written under the lock without `record`, so that no tick reaches the thread.
        let flush = {
            let mut writer = auditor.writer.lock().await;
            loop {
                writer.stage(&line);
                if writer.write_staged() {
                    break;
                }
                assert!(writer.file.is_some(), "rotated with no flush asked for");
            }
            assert!(writer.size + ROTATION_SYNC_MARGIN >= max && writer.size < max);
            assert!(writer.unsynced_bytes < WRITE_MODE_SYNC_BYTES);
            writer.start_flush().expect("the thread's flush is due")
        };
        let shared = auditor.writer.clone();
        tokio::task::spawn_blocking(move || flush.finish(&shared))
            .await
            .unwrap();
        // What is left to flush when the file rotates is what was written since.
        let mut writer = auditor.writer.lock().await;
        let first = writer.file.as_ref().unwrap().1.clone();
        let mut carried = 0;
        while writer.file.as_ref().is_some_and(|(_, path)| *path == first) {
            carried = writer.unsynced_bytes;
            writer.stage(&line);
            assert!(!writer.write_staged(), "one flush before the rotation");
        }
        assert!(
            carried < ROTATION_SYNC_MARGIN,
            "{carried} bytes flushed at rotation"
        );
    }

    /// Writes `line` under the lock until a write-mode flush is due, then runs that flush as the
    /// writer thread does (outside the lock).
    async fn write_until_a_flush_is_due_and_flush(auditor: &Auditor, line: &[u8]) {
        let flush = {
            let mut writer = auditor.writer.lock().await;
            while writer.unsynced_bytes < WRITE_MODE_SYNC_BYTES {
                writer.stage(line);
                writer.write_staged();
            }
            writer.start_flush().expect("a flush is due")
        };
        let shared = auditor.writer.clone();
        tokio::task::spawn_blocking(move || flush.finish(&shared))
            .await
            .unwrap();
    }

    /// How many of `path`'s bytes are in the page cache (util-linux `fincore`), or `None` where
    /// that cannot be told: no `fincore`, or a tmpfs (whose pages are the file: never dropped).
    fn resident_bytes(path: &Path) -> Option<u64> {
        let fs = rustix::fs::statfs(path).ok()?;
        if fs.f_type == 0x0102_1994 {
            eprintln!("SKIPPED: {} is on tmpfs", path.display());
            return None;
        }
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .inspect_err(|e| eprintln!("SKIPPED: fincore: {e}"))
            .ok()?;
        assert!(out.status.success(), "fincore failed: {out:?}");
        Some(
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        )
    }

    fn audit_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        files
    }

    /// A directory for page-cache checks: in the build's `target/`, not in a `/tmp` that may be
    /// tmpfs.
    fn disk_tempdir() -> tempfile::TempDir {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        fs::create_dir_all(&base).unwrap();
        tempfile::tempdir_in(base).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn synced_audit_bytes_leave_the_page_cache_and_the_log_still_verifies() {
        let dir = disk_tempdir();
        let auditor = write_mode_auditor_rotating_at(dir.path(), 6 * WRITE_MODE_SYNC_BYTES);
        let line = read_line();
        // Four write-mode flushes' worth, each flushed as the writer thread flushes.
        for _ in 0..4 {
            write_until_a_flush_is_due_and_flush(&auditor, &line).await;
        }
        let files = audit_files(dir.path());
        assert_eq!(files.len(), 1);
        let size = fs::metadata(&files[0]).unwrap().len();
        assert!(size >= 4 * WRITE_MODE_SYNC_BYTES);
        let Some(resident) = resident_bytes(&files[0]) else {
            return;
        };
        // What the last flush synced is let go too; only the unfinished page may stay.
        assert!(
            resident <= 64 * 1024,
            "{resident} of {size} bytes still cached after four flushes"
        );
        // Durable events (their own fdatasync each batch) past the size limit: the writer rotates,
        // and the finished file leaves the cache whole.
        let writers: Vec<_> = (0..32)
            .map(|_| {
                let auditor = auditor.clone();
                tokio::spawn(async move {
                    for _ in 0..200 {
                        auditor
                            .record(read_line(), Durability::Durable)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let files = audit_files(dir.path());
        assert_eq!(files.len(), 2, "rotated once");
        assert_eq!(
            resident_bytes(&files[0]),
            Some(0),
            "a rotated file stays cached"
        );
        let current = fs::metadata(&files[1]).unwrap().len();
        let resident = resident_bytes(&files[1]).unwrap();
        assert!(
            resident <= PAGE_CACHE_KEPT_BYTES + 64 * 1024,
            "{resident} of {current} bytes of the current file cached"
        );
        // Every line is still there, read back from the disk.
        let report =
            crate::audit::verify::verify_dir(&auditor.keys, dir.path(), Default::default())
                .unwrap();
        assert!(report.problem.is_none(), "{:?}", report.problem);
    }

    fn read_line() -> Vec<u8> {
        event::encode(
            &Facts::system("test:read", Activity::Read),
            200,
            Duration::ZERO,
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_ready_together_are_written_with_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = write_mode_auditor(dir.path());
        // Ten requests ready on one worker: each seals its line and yields; the first to run
        // again writes the group for all.
        let readers: Vec<_> = (0..10)
            .map(|_| {
                let auditor = auditor.clone();
                tokio::spawn(async move { auditor.record(read_line(), Durability::Written).await })
            })
            .collect();
        for reader in readers {
            reader.await.unwrap().unwrap();
        }
        assert_eq!(auditor.metrics.events_written.get(), 10);
        assert_eq!(auditor.metrics.batches_written.get(), 1);
        // One after the other, each is its own group.
        for _ in 0..3 {
            auditor
                .record(read_line(), Durability::Written)
                .await
                .unwrap();
        }
        assert_eq!(auditor.metrics.batches_written.get(), 4);
        let report =
            crate::audit::verify::verify_dir(&auditor.keys, dir.path(), Default::default())
                .unwrap();
        assert!(report.problem.is_none(), "{:?}", report.problem);
        assert_eq!(report.range, Some((1, 13)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_group_that_cannot_be_written_is_refused_whole_and_the_chain_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = write_mode_auditor(dir.path());
        auditor
            .record(read_line(), Durability::Written)
            .await
            .unwrap();
        let (groups, lost) = {
            let mut writer = auditor.writer.lock().await;
            let groups: Vec<_> = (0..3).map(|_| writer.stage(&read_line())).collect();
            assert!(groups.iter().all(|g| Arc::ptr_eq(g, &groups[0])));
            assert_eq!(writer.seq, 4, "sealed into the chain, not yet written");
            let lost = writer.file.as_ref().unwrap().1.clone();
            // Deleted before the group's write: the write lands in an unlinked file.
            fs::remove_file(&lost).unwrap();
            writer.write_staged();
            assert_eq!(writer.seq, 1, "rolled back to the last acknowledged line");
            (groups, lost)
        };
        assert!(matches!(
            groups[0].outcome.get(),
            Some(Err(AuditError::Io(_)))
        ));
        // The next group opens a new file with the incident, continuing from sequence 1.
        auditor
            .record(read_line(), Durability::Written)
            .await
            .unwrap();
        let files = log_files(dir.path()).unwrap();
        assert_eq!(files.len(), 1);
        assert_ne!(files[0], lost);
        let report = crate::audit::verify::verify_files(
            &auditor.keys,
            &files,
            crate::audit::verify::Start::Retained(2),
        )
        .unwrap();
        assert!(report.problem.is_none(), "{:?}", report.problem);
        assert_eq!(report.range, Some((2, 3)));
        let content = fs::read_to_string(&files[0]).unwrap();
        assert!(content.lines().next().unwrap().contains("audit:file_lost"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn events_submitted_together_are_written_as_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = write_mode_auditor(dir.path());
        let tickets = submitted_together(|| {
            let first = auditor.submit(read_line(), Durability::Durable);
            // Queued at once, the first event would be written (and flushed) by now, alone.
            std::thread::sleep(Duration::from_millis(100));
            let mut tickets = vec![first];
            // A scope inside the scope adds to it.
            tickets.extend(submitted_together(|| {
                (0..4)
                    .map(|_| auditor.submit(read_line(), Durability::Durable))
                    .collect::<Vec<_>>()
            }));
            tickets
        });
        let mut positions = Vec::new();
        for ticket in tickets {
            positions.push(ticket.written().await.unwrap().unwrap().seq);
        }
        assert_eq!(positions, [1, 2, 3, 4, 5], "in submission order");
        assert_eq!(auditor.metrics.batches_written.get(), 1);
        assert_eq!(auditor.metrics.events_written.get(), 5);
        // Outside a scope, each is queued at once again, and is a batch of its own.
        let alone = auditor.submit(read_line(), Durability::Durable);
        assert_eq!(alone.written().await.unwrap().unwrap().seq, 6);
        assert_eq!(auditor.metrics.batches_written.get(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn events_held_in_a_scope_that_panics_are_still_queued() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = write_mode_auditor(dir.path());
        let held = std::sync::Mutex::new(None);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            submitted_together(|| {
                *held.lock().unwrap() = Some(auditor.submit(read_line(), Durability::Durable));
                panic!("a job panicked");
            })
        }));
        assert!(panicked.is_err());
        let ticket = held.into_inner().unwrap().unwrap();
        assert_eq!(ticket.written().await.unwrap().unwrap().seq, 1);
        // The scope is closed: the next event is not held.
        let next = auditor.submit(read_line(), Durability::Durable);
        assert_eq!(next.written().await.unwrap().unwrap().seq, 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn events_held_for_a_full_queue_fail_as_a_full_queue() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = write_mode_auditor(dir.path());
        // The writer thread takes what is queued and then waits for the lock held here, so the
        // queue fills up.
        let writer = auditor.writer.lock().await;
        let mut queued = Vec::new();
        loop {
            let ticket = auditor.submit(read_line(), Durability::Durable);
            if ticket.ack.is_err() {
                break;
            }
            queued.push(ticket);
        }
        let held = submitted_together(|| {
            (0..2)
                .map(|_| auditor.submit(read_line(), Durability::Durable))
                .collect::<Vec<_>>()
        });
        for ticket in held {
            assert_eq!(ticket.wait().await, Err(AuditError::QueueFull));
        }
        drop(writer);
        for ticket in queued {
            ticket.wait().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tickets_deadline_runs_from_when_its_event_was_queued() {
        let (_writer_never_answers, rx) = oneshot::channel::<Result<Option<Written>, AuditError>>();
        let ticket = AuditTicket {
            ack: Ok(rx),
            deadline: crate::clock::io_now_tokio() + Duration::from_secs(5),
        };
        // Awaited late (after other tickets of its batch): it does not get another 5 s.
        tokio::time::advance(Duration::from_secs(4)).await;
        let waited = crate::clock::io_now_tokio();
        assert!(matches!(ticket.wait().await, Err(AuditError::Timeout)));
        assert_eq!(waited.elapsed(), Duration::from_secs(1));
    }
}
