//! Image records.

use std::path::PathBuf;

use sqlx::Row;

use super::{Store, StoreError, is_unique_violation};
use crate::domain::{Image, ImageId, Resource};

const COLUMNS: &str =
    "id, name, kernel_path, initrd_path, rootfs_path, kernel_args, rootfs_size_bytes, created_at_ms, labels, origin";

fn image_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Image, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |what: &str| StoreError::Corrupt { kind: "image", id: id.clone(), what: what.into() };
    Ok(Image {
        id: id.parse().map_err(|_| corrupt("id"))?,
        name: row.try_get("name")?,
        kernel_path: PathBuf::from(row.try_get::<String, _>("kernel_path")?),
        initrd_path: row.try_get::<Option<String>, _>("initrd_path")?.map(PathBuf::from),
        rootfs_path: PathBuf::from(row.try_get::<String, _>("rootfs_path")?),
        kernel_args: row.try_get("kernel_args")?,
        rootfs_size_bytes: row.try_get::<i64, _>("rootfs_size_bytes")? as u64,
        created_at_ms: row.try_get("created_at_ms")?,
        labels: serde_json::from_str(&row.try_get::<String, _>("labels")?).map_err(|_| corrupt("labels"))?,
        origin: match row.try_get::<Option<String>, _>("origin")? {
            Some(json) => Some(serde_json::from_str(&json).map_err(|_| corrupt("origin"))?),
            None => None,
        },
    })
}

impl Store {
    /// Records a new image; fails with [`StoreError::NameTaken`] when the name is in use.
    pub async fn image_insert(&self, image: &Image) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO images (id, name, kernel_path, initrd_path, rootfs_path, kernel_args, \
             rootfs_size_bytes, created_at_ms, labels, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(image.id.to_string())
        .bind(&image.name)
        .bind(image.kernel_path.to_string_lossy().into_owned())
        .bind(image.initrd_path.as_ref().map(|p| p.to_string_lossy().into_owned()))
        .bind(image.rootfs_path.to_string_lossy().into_owned())
        .bind(&image.kernel_args)
        .bind(image.rootfs_size_bytes as i64)
        .bind(image.created_at_ms)
        .bind(serde_json::to_string(&image.labels).unwrap_or_else(|_| "{}".into()))
        .bind(image.origin.as_ref().and_then(|origin| serde_json::to_string(origin).ok()))
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::NameTaken { kind: Resource::Image, name: image.name.clone() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Finds an image by id or, failing that, by name.
    pub async fn image_get(&self, id_or_name: &str) -> Result<Image, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM images WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id_or_name).fetch_optional(&self.pool).await?;
        match row {
            Some(row) => image_from_row(&row),
            None => Err(StoreError::NotFound { kind: Resource::Image, key: id_or_name.to_owned() }),
        }
    }

    /// Every image, oldest first.
    pub async fn image_list(&self) -> Result<Vec<Image>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM images ORDER BY id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(image_from_row).collect()
    }

    /// Up to `limit` images carrying every one of `labels`, with ids after `after`, oldest first.
    pub async fn image_page(
        &self,
        labels: &crate::domain::Labels,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Image>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM images WHERE id > ?");
        for _ in labels {
            sql.push_str(" AND json_extract(labels, ?) = ?");
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(after.unwrap_or("").to_owned());
        for (key, value) in labels {
            query = query.bind(super::vms::label_path(key)).bind(value.clone());
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(image_from_row).collect()
    }

    /// Removes an image that no VM uses.
    pub async fn image_delete(&self, id: ImageId) -> Result<(), StoreError> {
        let mut tx = self.write_transaction().await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM vms WHERE image_id = ?1) + (SELECT COUNT(*) FROM snapshots WHERE image_id = ?1) \
             + (SELECT COUNT(*) FROM pools WHERE image_id = ?1)",
        )
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if count > 0 {
            return Err(StoreError::InUse { image: id.to_string(), count });
        }
        let done = sqlx::query("DELETE FROM images WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { kind: Resource::Image, key: id.to_string() });
        }
        tx.commit().await?;
        Ok(())
    }
}
