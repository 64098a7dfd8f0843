//! A bounded in-process cache of sealed password records for the SQLite store, where this process
//! is the only writer (the audit directory's lock keeps a second daemon or `import-nova` out).
//!
//! It holds what the database holds, sealed: every read still opens the record (AES-GCM, the
//! binding to instance, project and version) exactly as after a database read, so a cached record
//! proves nothing more than a stored one. What it saves is the read transaction (a WAL snapshot,
//! two B-tree lookups, file locks): about a tenth of a GET's CPU on a loaded machine.
//!
//! Coherence: the writer thread invalidates every instance a batch touched after the batch's
//! transaction ends and before any of its jobs is answered, and bumps a generation. A reader that
//! missed records the generation before reading the database and fills the cache only if it has
//! not moved since, so a read that began before a commit can never put the old record back after
//! the commit's invalidation.
//!
//! An edit made behind metapass's back (another process writing the database file, which the
//! deployment must not allow) bypasses that invalidation: a cached record is therefore used for at
//! most [`TTL`], after which the next read goes to the database again and sees the edit (and its
//! integrity failure, if the edit was tampering). Until then the read is answered from the record
//! as metapass last read it, which was genuine: a cached record never releases anything the
//! stored one did not.
//!
//! Bound: [`CAPACITY`] records (about 1.5 KiB each); a fill into a full cache empties it first.
//! Under random reads over more instances than that no cache policy helps much, and emptying is
//! O(1) per fill amortised, cannot be steered by a caller, and keeps memory flat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::PasswordRecord;

/// The most records held.
pub(super) const CAPACITY: usize = 8192;
/// How long a cached record is used before the database is read again.
pub(super) const TTL: Duration = Duration::from_secs(1);

/// What a write batch changed, for invalidation.
#[derive(Debug, Clone)]
pub(super) enum Touches {
    /// Nothing a password read sees (audit anchors, key bookkeeping).
    Nothing,
    /// This instance's registry row or chunks.
    Instance(String),
}

/// The cache; shared by the readers and the writer thread.
#[derive(Debug, Default)]
pub(super) struct ReadCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, (Arc<PasswordRecord>, Instant)>,
    generation: u64,
}

/// A miss: the generation to fill under.
#[derive(Debug, Clone, Copy)]
pub(super) struct Miss(u64);

impl ReadCache {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached record of `id`, or the miss to fill with after reading the database.
    pub(super) fn get(&self, id: &str) -> Result<Arc<PasswordRecord>, Miss> {
        let inner = self.inner();
        match inner.records.get(id) {
            Some((record, filled)) if filled.elapsed() < TTL => Ok(record.clone()),
            _ => Err(Miss(inner.generation)),
        }
    }

    /// Caches what the database said of `id`, unless a write batch ended since the miss.
    pub(super) fn fill(&self, id: &str, record: Arc<PasswordRecord>, miss: Miss) {
        let mut inner = self.inner();
        if inner.generation != miss.0 {
            return;
        }
        if inner.records.len() >= CAPACITY {
            inner.records.clear();
        }
        inner
            .records
            .insert(id.to_owned(), (record, crate::clock::io_now()));
    }

    /// Forgets what a batch touched (called by the writer thread once its transaction ended).
    pub(super) fn invalidate<'a>(&self, touched: impl IntoIterator<Item = &'a Touches>) {
        let mut inner = self.inner();
        inner.generation += 1;
        for touch in touched {
            if let Touches::Instance(id) = touch {
                inner.records.remove(id);
            }
        }
    }

    /// How many records are held (for tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner().records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InstanceRecord;

    fn record(version: u64) -> Arc<PasswordRecord> {
        Arc::new(PasswordRecord {
            instance: InstanceRecord {
                project_id: crate::ids::ProjectId::parse("project-a").unwrap(),
                password_set: true,
                password_version: version,
            },
            chunks: vec![("password_0".into(), b"sealed".to_vec())],
        })
    }

    #[test]
    fn a_read_that_began_before_a_commit_does_not_refill_the_old_record() {
        let cache = ReadCache::default();
        let miss = cache.get("i").unwrap_err();
        // The writer commits version 2 and invalidates while the reader holds version 1.
        cache.invalidate(&[Touches::Instance("i".into())]);
        cache.fill("i", record(1), miss);
        assert!(
            cache.get("i").is_err(),
            "the stale record must not be cached"
        );
        let miss = cache.get("i").unwrap_err();
        cache.fill("i", record(2), miss);
        assert_eq!(cache.get("i").unwrap().instance.password_version, 2);
    }

    #[test]
    fn an_invalidation_removes_only_what_it_names() {
        let cache = ReadCache::default();
        for id in ["a", "b"] {
            let miss = cache.get(id).unwrap_err();
            cache.fill(id, record(1), miss);
        }
        cache.invalidate(&[Touches::Instance("a".into()), Touches::Nothing]);
        assert!(cache.get("a").is_err());
        assert!(cache.get("b").is_ok());
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let cache = ReadCache::default();
        for i in 0..CAPACITY + 10 {
            let id = format!("i-{i}");
            let miss = cache.get(&id).unwrap_err();
            cache.fill(&id, record(1), miss);
        }
        assert!(cache.len() <= CAPACITY);
        assert!(cache.get(&format!("i-{}", CAPACITY + 9)).is_ok());
    }
}
