//! Tenant policies in the store: the keys a tenant's plugin modules must be signed by.
//! Each change is an event (`plugin_signing_set`, `plugin_signing_cleared`), so replicas see
//! it in the store's head and serve again.

use super::{insert_event, now_ms, retry_races, Store, StoreError};
use sqlx::Row;
use std::collections::BTreeMap;

impl Store {
    /// The keys `tenant`'s plugins must be signed by (`None`: no requirement).
    pub async fn plugin_signing(&self, tenant: &str) -> Result<Option<Vec<String>>, StoreError> {
        let row = sqlx::query("SELECT plugin_keys FROM nip_tenant_policies WHERE tenant = $1")
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| r.try_get::<String, _>("plugin_keys"))
            .transpose()?
            .map(|keys| keys.split(',').map(str::to_string).collect()))
    }

    /// Every tenant's required plugin keys.
    pub async fn plugin_signing_all(&self) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
        let rows = sqlx::query("SELECT tenant, plugin_keys FROM nip_tenant_policies")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let keys: String = r.try_get("plugin_keys")?;
                Ok((
                    r.try_get("tenant")?,
                    keys.split(',').map(str::to_string).collect(),
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Requires `tenant`'s plugins to be signed by one of `keys` (replacing what was
    /// required before), recorded as done by `actor`; `keys` empty removes the requirement.
    /// Returns whether anything was required before.
    pub async fn set_plugin_signing(
        &self,
        tenant: &str,
        keys: &[String],
        actor: &str,
    ) -> Result<bool, StoreError> {
        retry_races(|| async {
            let mut tx = self.pool.begin().await?;
            let removed = sqlx::query("DELETE FROM nip_tenant_policies WHERE tenant = $1")
                .bind(tenant)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let (action, detail) = if keys.is_empty() {
                if removed == 0 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                ("plugin_signing_cleared", format!("tenant {tenant}"))
            } else {
                sqlx::query(
                    "INSERT INTO nip_tenant_policies (tenant, plugin_keys, updated_by, \
                     updated_at_ms) VALUES ($1, $2, $3, $4)",
                )
                .bind(tenant)
                .bind(keys.join(","))
                .bind(actor)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                (
                    "plugin_signing_set",
                    format!("tenant {tenant}: {} key(s)", keys.len()),
                )
            };
            insert_event(&mut tx, actor, action, None, &detail).await?;
            tx.commit().await?;
            Ok::<bool, sqlx::Error>(removed > 0)
        })
        .await
    }
}
