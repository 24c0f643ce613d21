//! Warm pool records. Their members are VM records (see `domain::POOL_LABEL`).

use sqlx::Row;

use super::{Store, StoreError, is_unique_violation};
use crate::domain::{Pool, Resource};

const COLUMNS: &str =
    "id, name, image_id, vcpus, memory_mib, disk_size_bytes, egress, size, created_at_ms, snapshot_id";

fn pool_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Pool, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |what: &str| StoreError::Corrupt { kind: "pool", id: id.clone(), what: what.into() };
    Ok(Pool {
        id: id.parse().map_err(|_| corrupt("id"))?,
        name: row.try_get("name")?,
        image_id: row.try_get::<String, _>("image_id")?.parse().map_err(|_| corrupt("image_id"))?,
        spec: super::spec_from_row(row)?,
        egress: serde_json::from_str(&row.try_get::<String, _>("egress")?).map_err(|_| corrupt("egress"))?,
        size: row.try_get::<i64, _>("size")? as u32,
        created_at_ms: row.try_get("created_at_ms")?,
        snapshot: match row.try_get::<Option<String>, _>("snapshot_id")? {
            Some(id) => Some(id.parse().map_err(|_| corrupt("snapshot_id"))?),
            None => None,
        },
    })
}

impl Store {
    /// Records a new pool; its name must be free.
    pub async fn pool_insert(&self, pool: &Pool) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO pools (id, name, image_id, vcpus, memory_mib, disk_size_bytes, egress, size, created_at_ms, \
             snapshot_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(pool.id.to_string())
        .bind(&pool.name)
        .bind(pool.image_id.to_string())
        .bind(i64::from(pool.spec.vcpus))
        .bind(i64::from(pool.spec.memory_mib))
        .bind(pool.spec.disk_bytes as i64)
        .bind(serde_json::to_string(&pool.egress).unwrap_or_default())
        .bind(i64::from(pool.size))
        .bind(pool.created_at_ms)
        .bind(pool.snapshot.map(|id| id.to_string()))
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::NameTaken { kind: Resource::Pool, name: pool.name.clone() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A pool by id or name.
    pub async fn pool_get(&self, id_or_name: &str) -> Result<Pool, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM pools WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1");
        match sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id_or_name).fetch_optional(&self.pool).await? {
            Some(row) => pool_from_row(&row),
            None => Err(StoreError::NotFound { kind: Resource::Pool, key: id_or_name.to_owned() }),
        }
    }

    /// Every pool, oldest first.
    pub async fn pool_list(&self) -> Result<Vec<Pool>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM pools ORDER BY id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(pool_from_row).collect()
    }

    /// Removes a pool record (its members are VMs, deleted on their own).
    pub async fn pool_delete(&self, pool: &Pool) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM pools WHERE id = ?").bind(pool.id.to_string()).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { kind: Resource::Pool, key: pool.id.to_string() });
        }
        Ok(())
    }
}
