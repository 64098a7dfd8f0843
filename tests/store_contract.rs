//! The store contract, run against every backend: each test below is one async function over a
//! [`Fixture`], instantiated once for SQLite (a real file) and once for PostgreSQL (a real server,
//! a fresh schema per test). The PostgreSQL half runs when `METAPASS_TEST_POSTGRES` holds a
//! connection URL (`.ci/run` sets it to the local server); without it each of those tests says
//! SKIPPED and passes, and `scripts/test-all` says so too.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::Arc;

use metapass::crypto::{KeyId, Keyring, MAX_SEALS_PER_KEY, RecordBinding};
use metapass::ids::{InstanceId, ProjectId};
use metapass::store::{
    AuditAnchor, Backend, ClearOutcome, DeleteOutcome, Gate, GateDenied, KeySync, PASSWORD_FIELD,
    RegisterOutcome, Registration, RewrapOutcome, SetOutcome, Store, StoreError, chunks, open_gate,
};
use zeroize::Zeroizing;

/// A store under test, and a way around it to inspect or tamper with its tables.
struct Fixture {
    store: Arc<Backend>,
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
}

enum Raw {
    Sqlite(std::path::PathBuf),
    Postgres(tokio_postgres::Client, String),
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite3");
        let config = metapass::config::StoreConfig::Sqlite { path: path.clone() };
        Self {
            store: Arc::new(
                Backend::open(&config, metapass::metrics::Metrics::new().store_seconds)
                    .await
                    .expect("open SQLite"),
            ),
            raw: Raw::Sqlite(path),
            _dir: Some(dir),
        }
    }

    /// A fresh schema on the server `METAPASS_TEST_POSTGRES` names, or `None` to skip.
    async fn postgres() -> Option<Self> {
        let (url, client, schema) = common::fresh_postgres_schema().await?;
        let config = metapass::config::StoreConfig::Postgres(metapass::config::PostgresSettings {
            url: url.into(),
            password: None,
            ca_file: None,
            pool_size: 8,
        });
        let store = Backend::open(&config, metapass::metrics::Metrics::new().store_seconds)
            .await
            .expect("open PostgreSQL");
        Some(Self {
            store: Arc::new(store),
            raw: Raw::Postgres(client, schema),
            _dir: None,
        })
    }

    /// Sets the seal counter of `key`.
    async fn set_seals(&self, key: KeyId, seals: u64) {
        let seals = i64::try_from(seals).unwrap();
        match &self.raw {
            Raw::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute(
                    "UPDATE data_keys SET seals = ?1 WHERE key_id = ?2",
                    rusqlite::params![seals, key],
                )
                .unwrap();
            }
            Raw::Postgres(client, schema) => {
                client
                    .execute(
                        &format!("UPDATE {schema}.data_keys SET seals = $1 WHERE key_id = $2"),
                        &[&seals, &i64::from(key)],
                    )
                    .await
                    .unwrap();
            }
        }
    }

    /// Writes a metadata row for `id` behind the store's back.
    async fn plant_chunk(&self, id: &InstanceId, key: &str, value: &[u8]) {
        match &self.raw {
            Raw::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute(
                    "INSERT INTO instance_metadata (instance_id, key, value) VALUES (?1, ?2, ?3)",
                    rusqlite::params![id.as_str(), key, value],
                )
                .unwrap();
            }
            Raw::Postgres(client, schema) => {
                client
                    .execute(
                        &format!(
                            "INSERT INTO {schema}.instance_metadata (instance_id, key, value)
                             VALUES ($1, $2, $3)"
                        ),
                        &[&id.as_str(), &key, &value],
                    )
                    .await
                    .unwrap();
            }
        }
    }

    /// How many metadata rows `id` has.
    async fn metadata_rows(&self, id: &InstanceId) -> i64 {
        match &self.raw {
            Raw::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.query_row(
                    "SELECT count(*) FROM instance_metadata WHERE instance_id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .unwrap()
            }
            Raw::Postgres(client, schema) => client
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {schema}.instance_metadata WHERE instance_id = $1"
                    ),
                    &[&id.as_str()],
                )
                .await
                .unwrap()
                .get(0),
        }
    }

    async fn drop_schema(&self) {
        if let Raw::Postgres(client, schema) = &self.raw {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await;
        }
    }
}

fn keyring(active: KeyId) -> Arc<Keyring> {
    let keys: Vec<(KeyId, Zeroizing<Vec<u8>>)> = (1..=active)
        .map(|id| (id, Zeroizing::new(vec![u8::try_from(id).unwrap(); 32])))
        .collect();
    Arc::new(Keyring::new(&keys, active).unwrap())
}

fn new_id() -> InstanceId {
    InstanceId::parse(&uuid::Uuid::new_v4().to_string()).unwrap()
}

fn project(name: &str) -> ProjectId {
    ProjectId::parse(name).unwrap()
}

fn refusing_gate<O>() -> Gate<O> {
    Box::new(|_| Box::pin(async { Err(GateDenied("the audit log refused".into())) }))
}

async fn register(store: &Backend, id: &InstanceId, owner: &str) {
    let outcome = store
        .register(id, &project(owner), Registration::Ordinary, open_gate())
        .await
        .unwrap();
    assert_eq!(outcome, RegisterOutcome::Created);
}

/// Sets `password` for `id` (project-a) sealed under `ring`'s active key.
async fn set(
    store: &Backend,
    ring: &Arc<Keyring>,
    id: &InstanceId,
    password: &'static [u8],
) -> Result<SetOutcome, StoreError> {
    set_through(store, ring, id, password, open_gate()).await
}

/// Like [`set`], through `gate`.
async fn set_through(
    store: &Backend,
    ring: &Arc<Keyring>,
    id: &InstanceId,
    password: &'static [u8],
    gate: Gate<SetOutcome>,
) -> Result<SetOutcome, StoreError> {
    let (ring_for_seal, instance) = (ring.clone(), id.to_string());
    let seal = Box::new(move |version| {
        let binding = RecordBinding {
            project_id: "project-a",
            instance_id: &instance,
            field: PASSWORD_FIELD,
            version,
        };
        ring_for_seal.seal(&binding, password)
    });
    store
        .set_password_once(id, &project("project-a"), ring.active_key_id(), seal, gate)
        .await
}

async fn sync(store: &Backend, ring: &Keyring) -> KeySync {
    store
        .sync_keys(ring.check_values(), open_gate())
        .await
        .unwrap()
}

/// Opens the stored password of `id` with `ring`.
async fn read(store: &Backend, ring: &Keyring, id: &InstanceId) -> Option<Vec<u8>> {
    let record = store.password(id).await.unwrap()?;
    if !record.instance.password_set {
        assert!(record.chunks.is_empty(), "chunks without a password");
        return None;
    }
    let joined = chunks::join(PASSWORD_FIELD, &record.chunks).expect("chunks join");
    let binding = RecordBinding {
        project_id: record.instance.project_id.as_str(),
        instance_id: id.as_str(),
        field: PASSWORD_FIELD,
        version: record.instance.password_version,
    };
    Some(ring.open(&binding, &joined).expect("opens").to_vec())
}

async fn registration_is_idempotent_per_project(f: &Fixture) {
    let store = &f.store;
    let id = new_id();
    register(store, &id, "project-a").await;
    let again = store
        .register(
            &id,
            &project("project-a"),
            Registration::Ordinary,
            open_gate(),
        )
        .await;
    assert_eq!(again.unwrap(), RegisterOutcome::Unchanged);
    let other = store
        .register(
            &id,
            &project("project-b"),
            Registration::Ordinary,
            open_gate(),
        )
        .await;
    assert_eq!(other.unwrap(), RegisterOutcome::OwnedByOther);
    let record = store.instance(&id).await.unwrap().unwrap();
    assert_eq!(record.project_id.as_str(), "project-a");
    assert!(!record.password_set);
    assert!(store.instance(&new_id()).await.unwrap().is_none());
    store.ping().await.unwrap();
}

async fn a_deleted_id_is_not_given_to_another_project_without_an_operator(f: &Fixture) {
    let store = &f.store;
    let id = new_id();
    let register_to = |owner: &'static str, how: Registration| {
        let id = id.clone();
        async move {
            store
                .register(&id, &project(owner), how, open_gate())
                .await
                .unwrap()
        }
    };
    let delete = || async { store.delete_instance(&id, open_gate()).await.unwrap() };
    register(store, &id, "project-a").await;
    assert_eq!(delete().await, DeleteOutcome::Deleted);
    // The tombstone: another project is refused, and nothing is registered.
    assert_eq!(
        register_to("project-b", Registration::Ordinary).await,
        RegisterOutcome::DeletedFromOther
    );
    assert!(store.instance(&id).await.unwrap().is_none());
    // The same project may register it again (Nova re-sending its create notification).
    assert_eq!(
        register_to("project-a", Registration::Ordinary).await,
        RegisterOutcome::Created
    );
    // Deleted again, an operator may give it to another project, explicitly; that clears the
    // tombstone, so the next delete records the new owner.
    delete().await;
    assert_eq!(
        register_to("project-b", Registration::ReplacingDeleted).await,
        RegisterOutcome::Created
    );
    assert_eq!(
        store
            .instance(&id)
            .await
            .unwrap()
            .unwrap()
            .project_id
            .as_str(),
        "project-b"
    );
    delete().await;
    assert_eq!(
        register_to("project-a", Registration::Ordinary).await,
        RegisterOutcome::DeletedFromOther
    );
}

async fn of_concurrent_sets_exactly_one_wins(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let id = new_id();
    register(&f.store, &id, "project-a").await;
    let attempts: Vec<_> = (0..32)
        .map(|_| {
            let (store, ring, id) = (f.store.clone(), ring.clone(), id.clone());
            tokio::spawn(async move { set(&store, &ring, &id, b"racer").await.unwrap() })
        })
        .collect();
    let mut stored = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            SetOutcome::Stored { .. } => stored += 1,
            SetOutcome::AlreadySet => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored, 1, "exactly one winner");
    assert_eq!(
        read(&f.store, &ring, &id).await.as_deref(),
        Some(&b"racer"[..])
    );
    // Unknown instance, and another project's instance.
    assert_eq!(
        set(&f.store, &ring, &new_id(), b"x").await.unwrap(),
        SetOutcome::NotFound
    );
    let foreign = new_id();
    register(&f.store, &foreign, "project-b").await;
    assert_eq!(
        set(&f.store, &ring, &foreign, b"x").await.unwrap(),
        SetOutcome::ProjectMismatch
    );
}

async fn versions_only_grow_and_are_never_reused(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let id = new_id();
    register(&f.store, &id, "project-a").await;
    let mut versions = Vec::new();
    let SetOutcome::Stored { version } = set(&f.store, &ring, &id, b"one").await.unwrap() else {
        panic!("not stored")
    };
    versions.push(version);
    let cleared = f.store.clear_password(&id, open_gate()).await.unwrap();
    assert!(matches!(
        cleared,
        ClearOutcome::Cleared { was_set: true, .. }
    ));
    versions.push(
        f.store
            .instance(&id)
            .await
            .unwrap()
            .unwrap()
            .password_version,
    );
    assert_eq!(read(&f.store, &ring, &id).await, None);
    assert_eq!(f.metadata_rows(&id).await, 0, "a clear removes the chunks");
    let SetOutcome::Stored { version } = set(&f.store, &ring, &id, b"two").await.unwrap() else {
        panic!("not stored")
    };
    versions.push(version);
    // Deleted and registered again: the versions go on from where they were.
    let deleted = f.store.delete_instance(&id, open_gate()).await.unwrap();
    assert_eq!(deleted, DeleteOutcome::Deleted);
    assert_eq!(f.metadata_rows(&id).await, 0, "a delete purges the chunks");
    assert!(f.store.instance(&id).await.unwrap().is_none());
    register(&f.store, &id, "project-a").await;
    let SetOutcome::Stored { version } = set(&f.store, &ring, &id, b"three").await.unwrap() else {
        panic!("not stored")
    };
    versions.push(version);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions must grow: {versions:?}"
    );
    assert_eq!(
        read(&f.store, &ring, &id).await.as_deref(),
        Some(&b"three"[..])
    );
    assert_eq!(
        f.store
            .clear_password(&new_id(), open_gate())
            .await
            .unwrap(),
        ClearOutcome::NotFound
    );
    assert_eq!(
        f.store
            .delete_instance(&new_id(), open_gate())
            .await
            .unwrap(),
        DeleteOutcome::NotFound
    );
}

async fn a_refused_gate_commits_nothing(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let id = new_id();
    let refused = f
        .store
        .register(
            &id,
            &project("project-a"),
            Registration::Ordinary,
            refusing_gate(),
        )
        .await;
    assert!(matches!(
        refused,
        Err(StoreError::GateRefused { gate_passed: false })
    ));
    assert!(f.store.instance(&id).await.unwrap().is_none());
    register(&f.store, &id, "project-a").await;
    let refused = set_through(&f.store, &ring, &id, b"never", refusing_gate()).await;
    assert!(matches!(refused, Err(StoreError::GateRefused { .. })));
    assert_eq!(read(&f.store, &ring, &id).await, None);
    assert_eq!(f.metadata_rows(&id).await, 0);
    set(&f.store, &ring, &id, b"kept").await.unwrap();
    let refused = f.store.clear_password(&id, refusing_gate()).await;
    assert!(matches!(refused, Err(StoreError::GateRefused { .. })));
    let refused = f.store.delete_instance(&id, refusing_gate()).await;
    assert!(matches!(refused, Err(StoreError::GateRefused { .. })));
    assert_eq!(
        read(&f.store, &ring, &id).await.as_deref(),
        Some(&b"kept"[..])
    );
}

/// A gate that passes and names where its audit event stands.
fn anchoring_gate<O>(writer: &str, seq: u64) -> Gate<O> {
    let anchor = AuditAnchor {
        writer: writer.into(),
        seq,
        mac: format!("{seq:064x}"),
    };
    Box::new(move |_| Box::pin(async move { Ok(Some(anchor)) }))
}

async fn register_anchored(f: &Fixture, writer: &str, seq: u64) {
    f.store
        .register(
            &new_id(),
            &project("project-a"),
            Registration::Ordinary,
            anchoring_gate(writer, seq),
        )
        .await
        .unwrap();
}

async fn a_change_records_its_audit_anchor_in_its_transaction(f: &Fixture) {
    let writer = format!("host:/audit/{}", uuid::Uuid::new_v4());
    assert_eq!(f.store.audit_anchor(&writer).await.unwrap(), None);
    register_anchored(f, &writer, 7).await;
    register_anchored(f, &writer, 9).await;
    let newest = f.store.audit_anchor(&writer).await.unwrap().unwrap();
    assert_eq!(
        (newest.seq, newest.mac.as_str()),
        (9, format!("{:064x}", 9).as_str())
    );
    // Another writer's anchors are its own.
    let other = format!("{writer}-other");
    f.store
        .register(
            &new_id(),
            &project("project-a"),
            Registration::Ordinary,
            anchoring_gate(&other, 3),
        )
        .await
        .unwrap();
    assert_eq!(f.store.audit_anchor(&writer).await.unwrap().unwrap().seq, 9);
    // A refused gate records nothing; a forgotten anchor is gone for that writer only.
    let refused = f
        .store
        .register(
            &new_id(),
            &project("project-a"),
            Registration::Ordinary,
            refusing_gate(),
        )
        .await;
    assert!(refused.is_err());
    f.store.forget_audit_anchor(&writer).await.unwrap();
    assert_eq!(f.store.audit_anchor(&writer).await.unwrap(), None);
    assert_eq!(f.store.audit_anchor(&other).await.unwrap().unwrap().seq, 3);
    register_anchored(f, &writer, 1).await;
    assert_eq!(f.store.audit_anchor(&writer).await.unwrap().unwrap().seq, 1);
}

fn assert_not_committed<O: std::fmt::Debug>(result: &Result<O, StoreError>) {
    assert!(
        matches!(
            result,
            Err(StoreError::NotCommitted {
                gate_passed: true,
                ..
            })
        ),
        "{result:?}"
    );
}

/// The anchor is written in the mutation's own transaction (on PostgreSQL pipelined with its
/// COMMIT): when it cannot be recorded (sequence 0 breaks the table's CHECK), nothing of the
/// mutation is committed, the caller hears that the gate passed, and the store goes on working.
async fn a_change_whose_anchor_cannot_be_recorded_commits_nothing(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let writer = format!("host:/audit/{}", uuid::Uuid::new_v4());
    let id = new_id();
    let failed = f
        .store
        .register(
            &id,
            &project("project-a"),
            Registration::Ordinary,
            anchoring_gate(&writer, 0),
        )
        .await;
    assert_not_committed(&failed);
    assert!(f.store.instance(&id).await.unwrap().is_none());
    register(&f.store, &id, "project-a").await;
    for _ in 0..3 {
        let failed = set_through(&f.store, &ring, &id, b"never", anchoring_gate(&writer, 0)).await;
        assert_not_committed(&failed);
        assert_eq!(read(&f.store, &ring, &id).await, None);
        assert_eq!(f.metadata_rows(&id).await, 0);
        assert_eq!(f.store.audit_anchor(&writer).await.unwrap(), None);
    }
    // The same connections serve the next changes, outside any transaction left open.
    set_through(&f.store, &ring, &id, b"kept", anchoring_gate(&writer, 5))
        .await
        .unwrap();
    assert_eq!(
        read(&f.store, &ring, &id).await.as_deref(),
        Some(&b"kept"[..])
    );
    assert_eq!(f.store.audit_anchor(&writer).await.unwrap().unwrap().seq, 5);
    let cleared = f
        .store
        .clear_password(&id, anchoring_gate(&writer, 0))
        .await;
    assert_not_committed(&cleared);
    assert_eq!(
        read(&f.store, &ring, &id).await.as_deref(),
        Some(&b"kept"[..])
    );
}

async fn keys_are_checked_and_counted(f: &Fixture) {
    let ring = keyring(1);
    let first = sync(&f.store, &ring).await;
    assert_eq!(first.added, [1]);
    assert!(
        sync(&f.store, &ring).await.added.is_empty(),
        "known keys stay"
    );
    // Another secret under id 1 (and a new key 2): refused as a whole, nothing recorded.
    let impostor = Keyring::new(
        &[
            (1, Zeroizing::new(vec![0xee; 32])),
            (2, Zeroizing::new(vec![0x02; 32])),
        ],
        2,
    )
    .unwrap();
    let outcome = sync(&f.store, &impostor).await;
    assert_eq!(outcome.mismatched, [1]);
    assert!(outcome.added.is_empty());
    let usage = f.store.key_usage().await.unwrap();
    assert_eq!(usage.len(), 1, "key 2 was not recorded: {usage:?}");

    let ids: Vec<InstanceId> = (0..3).map(|_| new_id()).collect();
    for id in &ids {
        register(&f.store, id, "project-a").await;
    }
    // The seal limit: one seal left, then none, and nothing stored past it. (Set before the first
    // seal: a backend may reserve seals ahead, in the database, and spend them from memory.)
    f.set_seals(1, MAX_SEALS_PER_KEY - 1).await;
    set(&f.store, &ring, &ids[0], b"a").await.unwrap();
    let usage = f.store.key_usage().await.unwrap();
    assert_eq!((usage[0].key_id, usage[0].records), (1, 1));
    assert_eq!(usage[0].seals, MAX_SEALS_PER_KEY);
    set(&f.store, &ring, &ids[1], b"b").await.unwrap_err();
    let refused = set(&f.store, &ring, &ids[2], b"c").await;
    assert!(
        matches!(refused, Err(StoreError::KeyExhausted(1))),
        "{refused:?}"
    );
    assert_eq!(read(&f.store, &ring, &ids[2]).await, None);
    assert_eq!(f.metadata_rows(&ids[2]).await, 0);
    // A key the store was never told about cannot seal.
    let unsynced = keyring(3);
    let refused = set(&f.store, &unsynced, &ids[2], b"c").await;
    assert!(
        matches!(refused, Err(StoreError::UnknownKey(3))),
        "{refused:?}"
    );
}

async fn rewrap_moves_records_to_the_active_key(f: &Fixture) {
    let old = keyring(1);
    sync(&f.store, &old).await;
    let ids: Vec<InstanceId> = (0..5).map(|_| new_id()).collect();
    for id in &ids {
        register(&f.store, id, "project-a").await;
        set(&f.store, &old, id, b"secret").await.unwrap();
    }
    let new = keyring(2);
    sync(&f.store, &new).await;
    let mut candidates = f.store.rewrap_candidates(2, None, 3).await.unwrap();
    assert_eq!(candidates.len(), 3);
    let rest = f
        .store
        .rewrap_candidates(2, Some(&candidates[2].id), 10)
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    candidates.extend(rest);
    let mut sorted: Vec<String> = ids.iter().map(ToString::to_string).collect();
    sorted.sort();
    let listed: Vec<String> = candidates.iter().map(|c| c.id.to_string()).collect();
    assert_eq!(listed, sorted, "in instance order, each once");

    // One record changes after it was listed: the rewrap leaves it.
    let changed = candidates[0].clone();
    f.store
        .clear_password(&changed.id, open_gate())
        .await
        .unwrap();
    set(&f.store, &new, &changed.id, b"changed").await.unwrap();
    for candidate in &candidates {
        let ring = new.clone();
        let instance = candidate.id.to_string();
        let reseal = Box::new(move |sealed: &[u8], old_version: u64, new_version: u64| {
            let open = RecordBinding {
                project_id: "project-a",
                instance_id: &instance,
                field: PASSWORD_FIELD,
                version: old_version,
            };
            let Ok(plain) = ring.open(&open, sealed) else {
                return Ok(Err(metapass::store::Unreadable));
            };
            let seal = RecordBinding {
                version: new_version,
                ..open
            };
            ring.seal(&seal, &plain).map(Ok)
        });
        let outcome = f
            .store
            .rewrap(candidate, 2, reseal, open_gate())
            .await
            .unwrap();
        if candidate.id == changed.id {
            assert_eq!(outcome, RewrapOutcome::Skipped);
        } else {
            assert!(
                matches!(outcome, RewrapOutcome::Rewrapped { from: 1, version } if version > candidate.version)
            );
        }
    }
    assert!(
        f.store
            .rewrap_candidates(2, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let usage = f.store.key_usage().await.unwrap();
    let key = |id| usage.iter().find(|u| u.key_id == id).unwrap();
    assert_eq!(key(1).records, 0);
    assert_eq!(key(2).records, 5);
    for id in &ids {
        let want: &[u8] = if *id == changed.id {
            b"changed"
        } else {
            b"secret"
        };
        assert_eq!(read(&f.store, &new, id).await.as_deref(), Some(want));
    }
}

/// A gate that passes and anchors its event at the next number of `counter`, taken when the
/// gate is called: the order a real audit writer gives its events.
fn counting_gate<O>(writer: &str, counter: &Arc<std::sync::atomic::AtomicU64>) -> Gate<O> {
    let (writer, counter) = (Arc::<str>::from(writer), Arc::clone(counter));
    Box::new(move |_| {
        let seq = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let anchor = AuditAnchor {
            writer,
            seq,
            mac: format!("{seq:064x}"),
        };
        Box::pin(async move { Ok(Some(anchor)) })
    })
}

/// A password made for one test, kept for its whole run.
fn password_for(label: String) -> &'static [u8] {
    Box::leak(label.into_bytes().into_boxed_slice())
}

/// Many posts at once, as a batching backend takes them together: per instance exactly one wins
/// and its own password reads back (bound to its own version), the instance's other posts hear
/// `AlreadySet`, an unknown id and another project's instance are refused, no two winners share a
/// version, and the newest anchor of all their events is the one recorded.
async fn posts_taken_together_are_each_decided_on_their_own(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let writer = format!("host:/audit/{}", uuid::Uuid::new_v4());
    let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ids: Vec<InstanceId> = (0..24).map(|_| new_id()).collect();
    for id in &ids {
        register(&f.store, id, "project-a").await;
    }
    let foreign = new_id();
    register(&f.store, &foreign, "project-b").await;
    let mut posts = Vec::new();
    for round in 0..3 {
        for (i, id) in ids.iter().enumerate() {
            let password = password_for(format!("password {i} of round {round}"));
            let (store, ring, id) = (f.store.clone(), ring.clone(), id.clone());
            let gate = counting_gate(&writer, &events);
            posts.push(tokio::spawn(async move {
                let outcome = set_through(&store, &ring, &id, password, gate).await;
                (Some(i), password, outcome.unwrap())
            }));
        }
        for stray in [new_id(), foreign.clone()] {
            let (store, ring) = (f.store.clone(), ring.clone());
            let gate = counting_gate(&writer, &events);
            posts.push(tokio::spawn(async move {
                let outcome = set_through(&store, &ring, &stray, b"stray", gate).await;
                (None, &b"stray"[..], outcome.unwrap())
            }));
        }
    }
    let mut winners: Vec<Option<(&[u8], u64)>> = vec![None; ids.len()];
    let mut strays = Vec::new();
    for post in posts {
        match post.await.unwrap() {
            (Some(i), password, SetOutcome::Stored { version }) => {
                assert!(winners[i].is_none(), "two winners for instance {i}");
                winners[i] = Some((password, version));
            }
            (Some(_), _, SetOutcome::AlreadySet) => {}
            (None, _, outcome) => strays.push(outcome),
            other => panic!("unexpected {other:?}"),
        }
    }
    strays.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        strays,
        [
            SetOutcome::NotFound,
            SetOutcome::NotFound,
            SetOutcome::NotFound,
            SetOutcome::ProjectMismatch,
            SetOutcome::ProjectMismatch,
            SetOutcome::ProjectMismatch
        ]
    );
    let mut versions = Vec::new();
    for (id, winner) in ids.iter().zip(&winners) {
        let (password, version) = winner.expect("every instance has a winner");
        assert_eq!(read(&f.store, &ring, id).await.as_deref(), Some(password));
        assert_eq!(
            f.store
                .instance(id)
                .await
                .unwrap()
                .unwrap()
                .password_version,
            version
        );
        versions.push(version);
    }
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), ids.len(), "winners share versions");
    let all_events = events.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(all_events, 3 * (ids.len() as u64 + 2));
    assert_eq!(
        f.store.audit_anchor(&writer).await.unwrap().unwrap().seq,
        all_events
    );
}

/// A post that fails on its own among posts taken at the same time (one too long to seal, one
/// under a key the store never registered) fails alone: nothing of it is stored, and every other
/// post is.
async fn a_post_that_fails_on_its_own_fails_alone(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let unregistered = keyring(9);
    let ids: Vec<InstanceId> = (0..16).map(|_| new_id()).collect();
    for id in &ids {
        register(&f.store, id, "project-a").await;
    }
    let too_long: &'static [u8] = password_for("x".repeat(2_000));
    let posts: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (store, id) = (f.store.clone(), id.clone());
            let ring = if i == 5 {
                unregistered.clone()
            } else {
                ring.clone()
            };
            let password = if i == 9 { too_long } else { b"fine" };
            tokio::spawn(async move { set(&store, &ring, &id, password).await })
        })
        .collect();
    for (i, post) in posts.into_iter().enumerate() {
        let outcome = post.await.unwrap();
        match i {
            5 => assert!(
                matches!(outcome, Err(StoreError::UnknownKey(9))),
                "{outcome:?}"
            ),
            9 => assert!(matches!(outcome, Err(StoreError::Seal(_))), "{outcome:?}"),
            _ => assert!(
                matches!(outcome, Ok(SetOutcome::Stored { .. })),
                "{outcome:?}"
            ),
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let stored = read(&f.store, &ring, id).await;
        if i == 5 || i == 9 {
            assert_eq!(stored, None);
            assert_eq!(f.metadata_rows(id).await, 0);
            // The failure left the instance as it was: a later post sets it.
            assert!(matches!(
                set(&f.store, &ring, id, b"later").await,
                Ok(SetOutcome::Stored { .. })
            ));
        } else {
            assert_eq!(stored.as_deref(), Some(&b"fine"[..]));
        }
    }
}

/// One refused gate among posts taken at the same time: that post stores nothing and hears its
/// gate did not pass; every other post either stored its password, or shared the refused
/// transaction, then stored nothing and hears that its own gate had passed.
async fn a_refused_gate_among_many_rolls_back_only_its_own_transaction(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let ids: Vec<InstanceId> = (0..16).map(|_| new_id()).collect();
    for id in &ids {
        register(&f.store, id, "project-a").await;
    }
    let posts: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (store, ring, id) = (f.store.clone(), ring.clone(), id.clone());
            let gate = if i == 7 { refusing_gate() } else { open_gate() };
            tokio::spawn(async move { set_through(&store, &ring, &id, b"mine", gate).await })
        })
        .collect();
    for (i, (post, id)) in posts.into_iter().zip(&ids).enumerate() {
        let outcome = post.await.unwrap();
        let stored = read(&f.store, &ring, id).await;
        match outcome {
            Err(StoreError::GateRefused { gate_passed: false }) if i == 7 => {
                assert_eq!(stored, None)
            }
            Ok(SetOutcome::Stored { .. }) if i != 7 => {
                assert_eq!(stored.as_deref(), Some(&b"mine"[..]))
            }
            Err(StoreError::GateRefused { gate_passed: true }) if i != 7 => {
                assert_eq!(stored, None)
            }
            other => panic!("post {i}: unexpected {other:?}"),
        }
    }
}

/// Chunks planted under an unset password (one with the name the set will write, one beyond it)
/// do not block the set, in a batch or alone, and do not survive it: the password reads back
/// whole, and the instance has exactly the set's chunks.
async fn chunks_planted_under_an_unset_password_are_replaced_by_the_set(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let ids: Vec<InstanceId> = (0..8).map(|_| new_id()).collect();
    for id in &ids {
        register(&f.store, id, "project-a").await;
    }
    for id in ids.iter().step_by(2) {
        f.plant_chunk(id, &chunks::chunk_key(PASSWORD_FIELD, 0), b"planted")
            .await;
        f.plant_chunk(id, &chunks::chunk_key(PASSWORD_FIELD, 7), b"planted")
            .await;
    }
    let posts: Vec<_> = ids
        .iter()
        .map(|id| {
            let (store, ring, id) = (f.store.clone(), ring.clone(), id.clone());
            tokio::spawn(async move { set(&store, &ring, &id, b"real").await })
        })
        .collect();
    for post in posts {
        let outcome = post.await.unwrap();
        assert!(
            matches!(outcome, Ok(SetOutcome::Stored { .. })),
            "{outcome:?}"
        );
    }
    let alone_rows = {
        let alone = &ids[1];
        assert_eq!(
            read(&f.store, &ring, alone).await.as_deref(),
            Some(&b"real"[..])
        );
        f.metadata_rows(alone).await
    };
    for id in &ids {
        assert_eq!(
            read(&f.store, &ring, id).await.as_deref(),
            Some(&b"real"[..])
        );
        assert_eq!(
            f.metadata_rows(id).await,
            alone_rows,
            "planted chunks survived"
        );
    }
}

/// Registry reads at the same moment (as a coalescing backend answers them from one statement):
/// each hears its own instance's row, an unknown id hears none, the same id read twice hears the
/// same row twice.
async fn reads_taken_together_each_hear_their_own_row(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let ids: Vec<InstanceId> = (0..40).map(|_| new_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        let owner = if i % 3 == 0 { "project-b" } else { "project-a" };
        register(&f.store, id, owner).await;
        if i % 4 == 0 && owner == "project-a" {
            set(&f.store, &ring, id, b"set").await.unwrap();
        }
    }
    let unknown = new_id();
    let mut wanted: Vec<InstanceId> = ids.iter().chain(ids.iter().take(10)).cloned().collect();
    wanted.push(unknown.clone());
    let reads: Vec<_> = wanted
        .iter()
        .map(|id| {
            let (store, id) = (f.store.clone(), id.clone());
            tokio::spawn(async move { store.instance(&id).await.unwrap() })
        })
        .collect();
    for (id, read) in wanted.iter().zip(reads) {
        let got = read.await.unwrap();
        if *id == unknown {
            assert_eq!(got, None);
            continue;
        }
        let i = ids.iter().position(|x| x == id).unwrap();
        let got = got.expect("a registered instance is found");
        let owner = if i % 3 == 0 { "project-b" } else { "project-a" };
        assert_eq!(got.project_id.as_str(), owner, "instance {i}");
        assert_eq!(
            got.password_set,
            i % 4 == 0 && owner == "project-a",
            "instance {i}"
        );
    }
}

/// Sealed-record reads at the same moment (as a coalescing backend answers them from one
/// statement): each opens to its own instance's password, an unset one has none, and one with
/// more chunks than a record may have is refused as corrupt without failing the others.
async fn password_reads_taken_together_each_hear_their_own_record(f: &Fixture) {
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let ids: Vec<InstanceId> = (0..30).map(|_| new_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        register(&f.store, id, "project-a").await;
        if i % 5 != 0 {
            set(&f.store, &ring, id, password_for(format!("password {i}")))
                .await
                .unwrap();
        }
    }
    let bloated = &ids[0];
    for index in 0..=chunks::MAX_CHUNKS {
        f.plant_chunk(bloated, &chunks::chunk_key(PASSWORD_FIELD, index), b"x")
            .await;
    }
    let wanted: Vec<InstanceId> = ids.iter().chain(ids.iter().take(8)).cloned().collect();
    let reads: Vec<_> = wanted
        .iter()
        .map(|id| {
            let (store, id) = (f.store.clone(), id.clone());
            tokio::spawn(async move { store.password(&id).await })
        })
        .collect();
    for (id, reading) in wanted.iter().zip(reads) {
        let got = reading.await.unwrap();
        let i = ids.iter().position(|x| x == id).unwrap();
        if id == bloated {
            assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
            continue;
        }
        let record = got.unwrap().expect("a registered instance has a record");
        if i % 5 == 0 {
            assert!(!record.instance.password_set && record.chunks.is_empty());
        } else {
            let opened = read(&f.store, &ring, id).await;
            assert_eq!(opened, Some(format!("password {i}").into_bytes()));
            assert!(record.instance.password_set);
        }
    }
    assert!(f.store.password(&new_id()).await.unwrap().is_none());
}

/// Rows held by another transaction (an operator's open session holding four rows, as many as a
/// store runs batches at once) hold up only their own posts: the posts for every other instance
/// are stored while the rows are held, and the held ones are stored once they are let go.
/// PostgreSQL only: SQLite has one writer, and a session holding its write lock holds every
/// write, by design.
async fn a_row_held_elsewhere_holds_up_only_its_own_post(f: &Fixture) {
    let Raw::Postgres(client, schema) = &f.raw else {
        return;
    };
    let ring = keyring(1);
    sync(&f.store, &ring).await;
    let ids: Vec<InstanceId> = (0..16).map(|_| new_id()).collect();
    for id in &ids {
        register(&f.store, id, "project-a").await;
    }
    let held: Vec<&str> = ids[..4].iter().map(InstanceId::as_str).collect();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .query(
            &format!("SELECT 1 FROM {schema}.instances WHERE instance_id = ANY($1) FOR UPDATE"),
            &[&held],
        )
        .await
        .unwrap();
    let writer = format!("host:/audit/{}", uuid::Uuid::new_v4());
    let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let posts: Vec<_> = ids
        .iter()
        .map(|id| {
            let (store, ring, id) = (f.store.clone(), ring.clone(), id.clone());
            let gate = counting_gate(&writer, &events);
            tokio::spawn(async move { set_through(&store, &ring, &id, b"mine", gate).await })
        })
        .collect();
    let (held_posts, free_posts) = posts.split_at(4);
    // A bound on a hang, not a timing: without the skip, free posts batched with held rows
    // would never finish while those are held.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        for post in free_posts {
            while !post.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    })
    .await
    .expect("the posts for rows no one holds finish while the others are held");
    assert!(held_posts.iter().all(|post| !post.is_finished()));
    client.batch_execute("ROLLBACK").await.unwrap();
    for (id, post) in ids.iter().zip(posts) {
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), post)
            .await
            .expect("every post finishes once the rows are let go")
            .unwrap();
        assert!(
            matches!(outcome, Ok(SetOutcome::Stored { .. })),
            "{outcome:?}"
        );
        assert_eq!(
            read(&f.store, &ring, id).await.as_deref(),
            Some(&b"mine"[..])
        );
    }
    // One event per post, the retried ones included, and the newest is anchored.
    assert_eq!(events.load(std::sync::atomic::Ordering::SeqCst), 16);
    assert_eq!(
        f.store.audit_anchor(&writer).await.unwrap().unwrap().seq,
        16
    );
}

/// Instantiates each contract function once per backend.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = super::Fixture::sqlite().await;
                    super::$name(&fixture).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(fixture) = super::Fixture::postgres().await else {
                        return;
                    };
                    super::$name(&fixture).await;
                    fixture.drop_schema().await;
                }
            )*
        }
    };
}

contract!(
    registration_is_idempotent_per_project,
    a_deleted_id_is_not_given_to_another_project_without_an_operator,
    of_concurrent_sets_exactly_one_wins,
    versions_only_grow_and_are_never_reused,
    a_refused_gate_commits_nothing,
    keys_are_checked_and_counted,
    rewrap_moves_records_to_the_active_key,
    a_change_records_its_audit_anchor_in_its_transaction,
    a_change_whose_anchor_cannot_be_recorded_commits_nothing,
    posts_taken_together_are_each_decided_on_their_own,
    a_post_that_fails_on_its_own_fails_alone,
    a_refused_gate_among_many_rolls_back_only_its_own_transaction,
    chunks_planted_under_an_unset_password_are_replaced_by_the_set,
    reads_taken_together_each_hear_their_own_row,
    password_reads_taken_together_each_hear_their_own_record,
    a_row_held_elsewhere_holds_up_only_its_own_post,
);
