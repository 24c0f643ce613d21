//! The sqlx repository over SQLite: durable records of VMs and images, nothing transient.
//!
//! SQLite runs in WAL mode with a busy timeout and foreign keys on. Updates of a VM
//! compare and set its `generation`, so two writers never silently overwrite each other.

mod events;
mod images;
mod index;
mod pools;
mod requests;
mod snapshots;
mod vms;

use std::{path::Path, str::FromStr, time::Duration};

use crate::{clock::Clock, domain::Resource};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

pub use events::{Event, EventKind, StageRecord};
pub use requests::RequestRecord;
pub use vms::{LastError, NewVmRecord, VmClaim, VmFilter, VmUpdate};

/// What can go wrong reading or writing records.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No record matched.
    #[error("{kind} {key:?} not found")]
    NotFound {
        /// A VM or an image.
        kind: Resource,
        /// The id or name looked up.
        key: String,
    },
    /// A record with the same unique name exists.
    #[error("{kind} named {name:?} already exists")]
    NameTaken {
        /// A VM or an image.
        kind: Resource,
        /// The name.
        name: String,
    },
    /// The record changed since it was read (its generation moved on).
    #[error("{kind} {id} changed concurrently (expected generation {expected})")]
    Conflict {
        /// A VM or an image.
        kind: Resource,
        /// The record's id.
        id: String,
        /// The generation the writer had read.
        expected: i64,
    },
    /// An image is still used by VMs.
    #[error("image {image} is used by {count} vm(s)")]
    InUse {
        /// The image's id.
        image: String,
        /// How many VMs use it.
        count: i64,
    },
    /// A snapshot is still used by VMs.
    #[error("snapshot {snapshot} is used by {count} vm(s) or snapshot(s)")]
    SnapshotInUse {
        /// The snapshot's id.
        snapshot: String,
        /// How many VMs depend on it.
        count: i64,
    },
    /// Every address of the VM network is taken.
    #[error("no free address left in {pool}")]
    PoolExhausted {
        /// The pool.
        pool: String,
    },
    /// A stored value could not be read back (a bug or a hand-edited database).
    #[error("corrupt {kind} record {id}: {what}")]
    Corrupt {
        /// `vm`, `image` or `event`.
        kind: &'static str,
        /// The record's id.
        id: String,
        /// What was wrong.
        what: String,
    },
    /// SQLite failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The database of one daemon.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// The latest event revision, announced after each commit that recorded events.
    revisions: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Every committed VM record, for reads that need not wait for SQLite.
    vms: index::VmIndex,
    /// What "now" is, for timestamps.
    clock: Clock,
}

impl Store {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_clock(path, Clock::system()).await
    }

    /// [`Store::open`], with timestamps read from `clock`.
    pub async fn open_with_clock(path: &Path, clock: Clock) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::migrate!("../migrations").run(&pool).await?;
        let latest: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetch_optional(&pool).await?;
        let (revisions, _) = tokio::sync::watch::channel(latest.unwrap_or(1) as u64);
        let vms = index::VmIndex::load(vms::load_all(&pool).await?);
        Ok(Self { pool, revisions: std::sync::Arc::new(revisions), vms, clock })
    }

    /// A transaction that writes: it takes SQLite's write lock at its start (waiting for
    /// it up to the busy timeout), so that no read it made goes stale before its write (a
    /// deferred transaction upgraded after another commit fails at once, busy).
    async fn write_transaction(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// The clock its timestamps come from.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Closes every connection, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The request log, as `api`'s idempotency sees it: a view of the store that reaches
/// nothing else (records are `ops`' to read and write).
#[derive(Debug, Clone)]
pub struct RequestLog(Store);

impl RequestLog {
    /// See [`Store::request_begin`].
    pub async fn begin(&self, request_id: &str, method: &str, body: &[u8]) -> Result<bool, StoreError> {
        self.0.request_begin(request_id, method, body).await
    }

    /// See [`Store::request_get`].
    pub async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.0.request_get(request_id).await
    }

    /// See [`Store::request_done`].
    pub async fn done(&self, request_id: &str, response: &[u8], op_id: Option<&str>) -> Result<(), StoreError> {
        self.0.request_done(request_id, response, op_id).await
    }

    /// See [`Store::request_forget`].
    pub async fn forget(&self, request_id: &str) -> Result<(), StoreError> {
        self.0.request_forget(request_id).await
    }

    /// See [`Store::request_prune`].
    pub async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.0.request_prune(before_ms).await
    }
}

/// The event log, as `api`'s watches see it: read, follow, prune; nothing else.
#[derive(Debug, Clone)]
pub struct EventLog(Store);

impl EventLog {
    /// See [`Store::subscribe_revisions`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe_revisions()
    }

    /// See [`Store::events_after`].
    pub async fn after(&self, revision: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.0.events_after(revision, limit).await
    }

    /// See [`Store::latest_revision`].
    pub async fn latest_revision(&self) -> Result<u64, StoreError> {
        self.0.latest_revision().await
    }

    /// See [`Store::oldest_resumable_revision`].
    pub async fn oldest_resumable_revision(&self) -> Result<u64, StoreError> {
        self.0.oldest_resumable_revision().await
    }

    /// See [`Store::event_prune`].
    pub async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.0.event_prune(before_ms).await
    }
}

impl Store {
    /// The request log.
    pub fn request_log(&self) -> RequestLog {
        RequestLog(self.clone())
    }

    /// The event log.
    pub fn event_log(&self) -> EventLog {
        EventLog(self.clone())
    }
}

/// A VM's or a pool's shape, from the columns both tables name alike.
fn spec_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<crate::domain::VmSpec, StoreError> {
    use sqlx::Row;
    Ok(crate::domain::VmSpec {
        vcpus: row.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: row.try_get::<i64, _>("memory_mib")? as u32,
        disk_bytes: row.try_get::<i64, _>("disk_size_bytes")? as u64,
    })
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[cfg(test)]
pub(crate) async fn test_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("banger.db")).await.expect("open store");
    (store, dir)
}
