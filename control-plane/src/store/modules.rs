//! Plugin modules in the store, by SHA-256 (uploaded by `nip deploy` or `PUT
//! /v1/modules`). A module never changes under its digest, so storing one twice is a
//! no-op; each new one is an event (`module_uploaded`).

use super::{insert_event, now_ms, retry_races, Store, StoreError};
use base64::Engine as _;
use sqlx::Row;

impl Store {
    /// Stores `module` under `sha256` (its digest, checked by the caller) as uploaded by
    /// `actor`; returns whether it was new.
    pub async fn put_module(
        &self,
        sha256: &str,
        module: &[u8],
        actor: &str,
    ) -> Result<bool, StoreError> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(module);
        let size = i64::try_from(module.len()).unwrap_or(i64::MAX);
        retry_races(|| async {
            let mut tx = self.pool.begin().await?;
            let known = sqlx::query("SELECT 1 AS one FROM nip_modules WHERE sha256 = $1")
                .bind(sha256)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if known {
                tx.rollback().await?;
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO nip_modules (sha256, module_base64, size_bytes, uploaded_by, \
                 uploaded_at_ms) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(sha256)
            .bind(&encoded)
            .bind(size)
            .bind(actor)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            let detail = format!("module {sha256} ({size} bytes)");
            insert_event(&mut tx, actor, "module_uploaded", None, &detail).await?;
            tx.commit().await?;
            Ok::<bool, sqlx::Error>(true)
        })
        .await
    }

    /// The module stored under `sha256`, if any.
    pub async fn module(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT module_base64 FROM nip_modules WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let encoded: String = row.try_get("module_base64")?;
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("module {sha256}: {e}")))
    }
}
