//! The sqlx repository over SQLite: durable records of VMs and images, nothing transient.
//!
//! SQLite runs in WAL mode with a busy timeout and foreign keys on. Updates of a VM
//! compare and set its `generation`, so two writers never silently overwrite each other.

mod cache;
mod events;
mod images;
mod requests;
mod vms;

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

pub use events::{Event, EventKind, StageRecord};
pub use requests::RequestRecord;
pub use vms::{NewVmRecord, VmFilter, VmUpdate};

/// What can go wrong reading or writing records.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No record matched.
    #[error("{kind} {key:?} not found")]
    NotFound {
        /// `vm` or `image`.
        kind: &'static str,
        /// The id or name looked up.
        key: String,
    },
    /// A record with the same unique name exists.
    #[error("{kind} named {name:?} already exists")]
    NameTaken {
        /// `vm` or `image`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The record changed since it was read (its generation moved on).
    #[error("{kind} {id} changed concurrently (expected generation {expected})")]
    Conflict {
        /// `vm` or `image`.
        kind: &'static str,
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
    /// Committed VM records, for reads by id or name.
    vm_cache: cache::VmCache,
}

impl Store {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
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
        Ok(Self { pool, revisions: std::sync::Arc::new(revisions), vm_cache: cache::VmCache::default() })
    }

    /// Closes every connection, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
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
