//! VM events, for watchers: written in the same transaction as the change they describe,
//! numbered by a durable revision, announced to live watchers after commit.

use sqlx::{Row, SqliteConnection};

use super::{Store, StoreError};
use crate::domain::{Labels, Vm, VmState};

/// A completed operation stage, as recorded.
#[derive(Debug, Clone, Copy)]
pub struct StageRecord<'a> {
    /// The VM's id.
    pub vm_id: &'a str,
    /// The VM's name.
    pub vm_name: &'a str,
    /// The VM's labels.
    pub labels: &'a Labels,
    /// The operation.
    pub operation: &'a str,
    /// Its id.
    pub op_id: &'a str,
    /// The stage.
    pub stage: &'a str,
    /// Milliseconds from the operation's start.
    pub since_start_ms: u64,
    /// Milliseconds the stage took.
    pub since_last_stage_ms: u64,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The observed state changed; `previous` is `None` for a new VM.
    State {
        /// The new state.
        state: VmState,
        /// The state before.
        previous: Option<VmState>,
    },
    /// An operation stage completed.
    Stage {
        /// The operation.
        operation: String,
        /// Its id.
        op_id: String,
        /// The stage.
        stage: String,
        /// Milliseconds from the operation's start.
        since_start_ms: u64,
        /// Milliseconds the stage took.
        since_last_stage_ms: u64,
    },
    /// The VM was deleted.
    Deleted,
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its revision.
    pub revision: u64,
    /// The VM's id.
    pub vm_id: String,
    /// The VM's name then.
    pub vm_name: String,
    /// The VM's labels then.
    pub labels: Labels,
    /// What happened.
    pub kind: EventKind,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// Records a state change of `vm` inside the caller's transaction; returns its revision.
pub(super) async fn record_state(
    conn: &mut SqliteConnection,
    vm: &Vm,
    state: VmState,
    previous: Option<VmState>,
    at_ms: i64,
) -> Result<u64, StoreError> {
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO events (vm_id, vm_name, labels, kind, state, previous_state, created_at_ms) \
         VALUES (?, ?, ?, 'state', ?, ?, ?) RETURNING revision",
    )
    .bind(vm.id.to_string())
    .bind(&vm.name)
    .bind(serde_json::to_string(&vm.labels).unwrap_or_else(|_| "{}".into()))
    .bind(state.as_str())
    .bind(previous.map(VmState::as_str))
    .bind(at_ms)
    .fetch_one(conn)
    .await?;
    Ok(revision as u64)
}

/// Records the deletion of `vm` inside the caller's transaction; returns its revision.
pub(super) async fn record_deleted(conn: &mut SqliteConnection, vm: &Vm, at_ms: i64) -> Result<u64, StoreError> {
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO events (vm_id, vm_name, labels, kind, created_at_ms) VALUES (?, ?, ?, 'deleted', ?) RETURNING revision",
    )
    .bind(vm.id.to_string())
    .bind(&vm.name)
    .bind(serde_json::to_string(&vm.labels).unwrap_or_else(|_| "{}".into()))
    .bind(at_ms)
    .fetch_one(conn)
    .await?;
    Ok(revision as u64)
}

fn event_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Event, StoreError> {
    let revision: i64 = row.try_get("revision")?;
    let corrupt = |what: &str| StoreError::Corrupt { kind: "event", id: revision.to_string(), what: what.into() };
    let state = |column: &str| -> Result<Option<VmState>, StoreError> {
        match row.try_get::<Option<String>, _>(column)? {
            None => Ok(None),
            Some(value) => VmState::parse(&value).map(Some).ok_or_else(|| corrupt(column)),
        }
    };
    let text = |column: &str| -> Result<String, StoreError> {
        Ok(row.try_get::<Option<String>, _>(column)?.unwrap_or_default())
    };
    let kind = match row.try_get::<String, _>("kind")?.as_str() {
        "state" => EventKind::State {
            state: state("state")?.ok_or_else(|| corrupt("state"))?,
            previous: state("previous_state")?,
        },
        "stage" => EventKind::Stage {
            operation: text("operation")?,
            op_id: text("op_id")?,
            stage: text("stage")?,
            since_start_ms: row.try_get::<Option<i64>, _>("since_start_ms")?.unwrap_or_default() as u64,
            since_last_stage_ms: row.try_get::<Option<i64>, _>("since_last_stage_ms")?.unwrap_or_default() as u64,
        },
        "deleted" => EventKind::Deleted,
        _ => return Err(corrupt("kind")),
    };
    Ok(Event {
        revision: revision as u64,
        vm_id: row.try_get("vm_id")?,
        vm_name: row.try_get("vm_name")?,
        labels: serde_json::from_str(&row.try_get::<String, _>("labels")?).map_err(|_| corrupt("labels"))?,
        kind,
        at_ms: row.try_get("created_at_ms")?,
    })
}

impl Store {
    /// Announces `revision` to live watchers (after its transaction committed).
    pub(super) fn announce(&self, revision: u64) {
        self.revisions.send_if_modified(|latest| {
            let newer = revision > *latest;
            if newer {
                *latest = revision;
            }
            newer
        });
    }

    /// Changes to the latest revision, for live watchers: subscribe, then read.
    pub fn subscribe_revisions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// The latest revision announced (after its commit); no database read.
    pub fn announced_revision(&self) -> u64 {
        *self.revisions.borrow()
    }

    /// Records a completed stage of an operation on a VM.
    pub async fn event_stage(&self, stage: &StageRecord<'_>) -> Result<u64, StoreError> {
        let revision: i64 = sqlx::query_scalar(
            "INSERT INTO events (vm_id, vm_name, labels, kind, operation, op_id, stage, since_start_ms, \
             since_last_stage_ms, created_at_ms) VALUES (?, ?, ?, 'stage', ?, ?, ?, ?, ?, ?) RETURNING revision",
        )
        .bind(stage.vm_id)
        .bind(stage.vm_name)
        .bind(serde_json::to_string(stage.labels).unwrap_or_else(|_| "{}".into()))
        .bind(stage.operation)
        .bind(stage.op_id)
        .bind(stage.stage)
        .bind(stage.since_start_ms as i64)
        .bind(stage.since_last_stage_ms as i64)
        .bind(self.clock.now_ms())
        .fetch_one(&self.pool)
        .await?;
        self.announce(revision as u64);
        Ok(revision as u64)
    }

    /// Up to `limit` events after `revision`, oldest first.
    pub async fn events_after(&self, revision: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query("SELECT * FROM events WHERE revision > ? ORDER BY revision LIMIT ?")
            .bind(revision as i64)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// The latest revision: 1 before the first event (revisions start at 1, see migration
    /// 0007), so that it is never the 0 of "watch from now on".
    pub async fn latest_revision(&self) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
            .fetch_optional(&self.pool)
            .await?;
        Ok(seq.unwrap_or(1).max(1) as u64)
    }

    /// The oldest revision a watcher may resume after: events after it are all kept.
    pub async fn oldest_resumable_revision(&self) -> Result<u64, StoreError> {
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(revision) FROM events").fetch_one(&self.pool).await?;
        match oldest {
            Some(oldest) => Ok(oldest as u64 - 1),
            None => self.latest_revision().await,
        }
    }

    /// Forgets events older than `before_ms`; returns how many.
    pub async fn event_prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM events WHERE created_at_ms < ?").bind(before_ms).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }
}
