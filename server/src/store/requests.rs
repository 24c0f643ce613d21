//! Records of idempotent requests: what a client's `request_id` named and what it answered.

use sqlx::Row;

use super::{Store, StoreError, is_unique_violation};

/// A recorded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The RPC method (`CreateVm`, ...).
    pub method: String,
    /// The request's encoded body, without its request id.
    pub body: Vec<u8>,
    /// The encoded response and operation id once it succeeded; `None` while it runs (or when
    /// the daemon that ran it died before it finished).
    pub outcome: Option<(Vec<u8>, Option<String>)>,
    /// When it was first received.
    pub created_at_ms: i64,
}

impl Store {
    /// Records a request as running; `false` when the id is already recorded.
    pub async fn request_begin(&self, request_id: &str, method: &str, body: &[u8]) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO requests (request_id, method, body, state, created_at_ms) VALUES (?, ?, ?, 'running', ?)",
        )
        .bind(request_id)
        .bind(method)
        .bind(body)
        .bind(self.clock.now_ms())
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The request recorded under `request_id`, if any.
    pub async fn request_get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT method, body, state, response, op_id, created_at_ms FROM requests WHERE request_id = ?",
        )
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.try_get("state")?;
        let outcome = match state.as_str() {
            "done" => Some((row.try_get::<Option<Vec<u8>>, _>("response")?.unwrap_or_default(), row.try_get("op_id")?)),
            _ => None,
        };
        Ok(Some(RequestRecord {
            method: row.try_get("method")?,
            body: row.try_get("body")?,
            outcome,
            created_at_ms: row.try_get("created_at_ms")?,
        }))
    }

    /// Records the response of a request that succeeded.
    pub async fn request_done(&self, request_id: &str, response: &[u8], op_id: Option<&str>) -> Result<(), StoreError> {
        sqlx::query("UPDATE requests SET state = 'done', response = ?, op_id = ? WHERE request_id = ?")
            .bind(response)
            .bind(op_id)
            .bind(request_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a request (one that failed: a retry runs it again).
    pub async fn request_forget(&self, request_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM requests WHERE request_id = ?").bind(request_id).execute(&self.pool).await?;
        Ok(())
    }

    /// Forgets every request received before `before_ms`; returns how many.
    pub async fn request_prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM requests WHERE created_at_ms < ?").bind(before_ms).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_store;

    #[tokio::test]
    async fn a_request_is_recorded_once_then_answered_forgotten_or_pruned() {
        let (store, _dir) = test_store().await;
        assert!(store.request_begin("r1", "CreateVm", b"body").await.expect("begin"));
        assert!(!store.request_begin("r1", "CreateVm", b"other").await.expect("again"), "an id is recorded once");
        let running = store.request_get("r1").await.expect("get").expect("recorded");
        assert_eq!(
            (running.method.as_str(), running.body.as_slice(), running.outcome),
            ("CreateVm", &b"body"[..], None)
        );
        store.request_done("r1", b"response", Some("op")).await.expect("done");
        let done = store.request_get("r1").await.expect("get").expect("recorded");
        assert_eq!(done.outcome, Some((b"response".to_vec(), Some("op".into()))));
        store.request_forget("r1").await.expect("forget");
        assert_eq!(store.request_get("r1").await.expect("get"), None);
        assert!(store.request_begin("r2", "DeleteVm", b"").await.expect("begin"));
        assert_eq!(store.request_prune(store.clock().now_ms() + 1).await.expect("prune"), 1);
        assert_eq!(store.request_get("r2").await.expect("get"), None);
    }
}
