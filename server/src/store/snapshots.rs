//! Snapshot records. Their files live in each snapshot's directory; VMs that depend on one
//! name it in their `snapshot_id`.

use sqlx::Row;

use super::{Store, StoreError, is_unique_violation};
use crate::domain::{Labels, Resource, RootDiskStrategy, Snapshot, SnapshotId};

const COLUMNS: &str = "id, name, source_vm_id, source_vm_name, image_id, vcpus, memory_mib, disk_size_bytes, egress, \
    root_disk, networked, labels, dir, grp, ready, created_at_ms, last_operation, base_id, without_agent";

fn snapshot_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Snapshot, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |what: &str| StoreError::Corrupt { kind: "snapshot", id: id.clone(), what: what.into() };
    Ok(Snapshot {
        id: id.parse().map_err(|_| corrupt("id"))?,
        name: row.try_get("name")?,
        source_vm_id: row.try_get::<String, _>("source_vm_id")?.parse().map_err(|_| corrupt("source_vm_id"))?,
        source_vm_name: row.try_get("source_vm_name")?,
        image_id: row.try_get::<String, _>("image_id")?.parse().map_err(|_| corrupt("image_id"))?,
        spec: super::spec_from_row(row)?,
        egress: serde_json::from_str(&row.try_get::<String, _>("egress")?).map_err(|_| corrupt("egress"))?,
        root_disk: RootDiskStrategy::parse(&row.try_get::<String, _>("root_disk")?)
            .ok_or_else(|| corrupt("root_disk"))?,
        networked: row.try_get::<i64, _>("networked")? != 0,
        labels: serde_json::from_str(&row.try_get::<String, _>("labels")?).map_err(|_| corrupt("labels"))?,
        dir: std::path::PathBuf::from(row.try_get::<String, _>("dir")?),
        group: row.try_get::<i64, _>("grp")? as u32,
        ready: row.try_get::<i64, _>("ready")? != 0,
        created_at_ms: row.try_get("created_at_ms")?,
        last_operation: row.try_get("last_operation")?,
        base: match row.try_get::<Option<String>, _>("base_id")? {
            Some(id) => Some(id.parse().map_err(|_| corrupt("base_id"))?),
            None => None,
        },
        without_agent: row.try_get::<i64, _>("without_agent")? != 0,
    })
}

/// Counts what depends on snapshot `?1`: VMs whose disk overlays it, snapshots whose disk
/// does, pools whose members are restored from it.
const DEPENDENTS: &str = "SELECT (SELECT COUNT(*) FROM vms WHERE snapshot_id = ?1) \
    + (SELECT COUNT(*) FROM snapshots WHERE base_id = ?1) + (SELECT COUNT(*) FROM pools WHERE snapshot_id = ?1)";

/// A snapshot to record: everything but its group number, which the store assigns.
pub type NewSnapshot = Snapshot;

impl Store {
    /// Records a snapshot being taken (not ready), with the lowest group number above
    /// every live snapshot's; its name must be free.
    pub async fn snapshot_insert(&self, new: &NewSnapshot) -> Result<Snapshot, StoreError> {
        let result = sqlx::query(
            "INSERT INTO snapshots (id, name, source_vm_id, source_vm_name, image_id, vcpus, memory_mib, \
             disk_size_bytes, egress, root_disk, networked, labels, dir, grp, ready, created_at_ms, last_operation, \
             base_id, without_agent) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, \
             (SELECT COALESCE(MAX(grp), 0) + 1 FROM snapshots), 0, ?14, ?15, ?16, ?17)",
        )
        .bind(new.id.to_string())
        .bind(&new.name)
        .bind(new.source_vm_id.to_string())
        .bind(&new.source_vm_name)
        .bind(new.image_id.to_string())
        .bind(i64::from(new.spec.vcpus))
        .bind(i64::from(new.spec.memory_mib))
        .bind(new.spec.disk_bytes as i64)
        .bind(serde_json::to_string(&new.egress).unwrap_or_default())
        .bind(new.root_disk.as_str())
        .bind(i64::from(new.networked))
        .bind(serde_json::to_string(&new.labels).unwrap_or_else(|_| "{}".into()))
        .bind(new.dir.to_string_lossy().into_owned())
        .bind(new.created_at_ms)
        .bind(&new.last_operation)
        .bind(new.base.map(|id| id.to_string()))
        .bind(i64::from(new.without_agent))
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => self.snapshot_get(&new.id.to_string()).await,
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::NameTaken { kind: Resource::Snapshot, name: new.name.clone() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Marks a snapshot's files complete.
    pub async fn snapshot_mark_ready(&self, id: SnapshotId) -> Result<Snapshot, StoreError> {
        sqlx::query("UPDATE snapshots SET ready = 1 WHERE id = ?").bind(id.to_string()).execute(&self.pool).await?;
        self.snapshot_get(&id.to_string()).await
    }

    /// A snapshot by id or name.
    pub async fn snapshot_get(&self, id_or_name: &str) -> Result<Snapshot, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1");
        match sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id_or_name).fetch_optional(&self.pool).await? {
            Some(row) => snapshot_from_row(&row),
            None => Err(StoreError::NotFound { kind: Resource::Snapshot, key: id_or_name.to_owned() }),
        }
    }

    /// The snapshots carrying every label of `selector`, oldest first.
    pub async fn snapshot_list(&self, selector: &Labels) -> Result<Vec<Snapshot>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots ORDER BY id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        let all: Result<Vec<Snapshot>, StoreError> = rows.iter().map(snapshot_from_row).collect();
        Ok(all?.into_iter().filter(|s| crate::domain::labels_match(&s.labels, selector)).collect())
    }

    /// How many VM records, and snapshots taken of them, depend on the snapshot.
    pub async fn snapshot_dependents(&self, id: SnapshotId) -> Result<u32, StoreError> {
        let count: i64 = sqlx::query_scalar(DEPENDENTS).bind(id.to_string()).fetch_one(&self.pool).await?;
        Ok(count as u32)
    }

    /// Removes a snapshot record; refused while a VM depends on it.
    pub async fn snapshot_delete(&self, id: SnapshotId) -> Result<(), StoreError> {
        let mut tx = self.write_transaction().await?;
        let count: i64 = sqlx::query_scalar(DEPENDENTS).bind(id.to_string()).fetch_one(&mut *tx).await?;
        if count > 0 {
            return Err(StoreError::SnapshotInUse { snapshot: id.to_string(), count });
        }
        let done = sqlx::query("DELETE FROM snapshots WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { kind: Resource::Snapshot, key: id.to_string() });
        }
        tx.commit().await?;
        Ok(())
    }
}
