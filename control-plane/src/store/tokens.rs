//! API tokens in the store: created, looked up by id, listed and revoked. Only the SHA-256
//! of a token's secret is stored; the auth layer above makes the secrets and checks them.

use super::{
    insert_event, is_write_race, now_ms, race_pause, retry_races, Store, StoreError,
    INSERT_ATTEMPTS,
};
use sqlx::any::AnyRow;
use sqlx::Row;

/// A stored API token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredToken {
    /// The public part of the token (`nip_<id>_<secret>`), used to find it.
    pub id: String,
    /// A name for people: what `nip token revoke` takes.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// The tenants it is limited to; empty: every tenant.
    pub tenants: Vec<String>,
    /// SHA-256 of the secret, lower-case hex.
    #[serde(skip)]
    pub secret_sha256: String,
    /// When it was made (ms since the epoch).
    pub created_at_ms: i64,
    /// Who made it.
    pub created_by: String,
    /// When it stops working, if ever.
    pub expires_at_ms: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// For a join token: which node may use it (`node:ID`, `region:NAME`, empty: any).
    pub scope: String,
}

impl StoredToken {
    /// Neither revoked nor expired at `now_ms`.
    pub fn usable_at(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|end| now_ms < end)
    }
}

const TOKEN_COLUMNS: &str = "id, name, role, tenants, secret_sha256, created_at_ms, created_by, \
                             expires_at_ms, revoked_at_ms, scope";

fn token_from(row: &AnyRow) -> Result<StoredToken, sqlx::Error> {
    let tenants: String = row.try_get("tenants")?;
    Ok(StoredToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        tenants: tenants
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        secret_sha256: row.try_get("secret_sha256")?,
        created_at_ms: row.try_get("created_at_ms")?,
        created_by: row.try_get("created_by")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
        scope: row.try_get("scope")?,
    })
}

impl Store {
    /// Stores `token` and records who made it. A name already taken is a conflict.
    pub async fn create_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        if self.token_named(&token.name).await?.is_some() {
            return Err(StoreError::NameTaken(token.name.clone()));
        }
        let mut last_error = None;
        for _ in 0..INSERT_ATTEMPTS {
            match self.try_create_token(token).await {
                Err(e) if is_write_race(&e) => {
                    if self.token_named(&token.name).await?.is_some() {
                        return Err(StoreError::NameTaken(token.name.clone()));
                    }
                    last_error = Some(e);
                    race_pause().await;
                }
                other => return Ok(other?),
            }
        }
        Err(StoreError::Query(
            last_error.unwrap_or(sqlx::Error::PoolClosed),
        ))
    }

    async fn try_create_token(&self, token: &StoredToken) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO nip_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(&token.id)
        .bind(&token.name)
        .bind(&token.role)
        .bind(token.tenants.join(","))
        .bind(&token.secret_sha256)
        .bind(token.created_at_ms)
        .bind(&token.created_by)
        .bind(token.expires_at_ms)
        .bind(token.revoked_at_ms)
        .bind(&token.scope)
        .execute(&mut *tx)
        .await?;
        let scope = match (token.scope.as_str(), token.tenants.is_empty()) {
            ("", true) => "every tenant".to_string(),
            ("", false) => format!("tenants {}", token.tenants.join(", ")),
            (scope, _) => scope.to_string(),
        };
        let detail = format!("token {:?}: {} for {scope}", token.name, token.role);
        insert_event(&mut tx, &token.created_by, "token_created", None, &detail).await?;
        tx.commit().await
    }

    /// The token with this public id, if any.
    pub async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        self.token_where("id = $1", id).await
    }

    /// The token with this name, if any.
    pub async fn token_named(&self, name: &str) -> Result<Option<StoredToken>, StoreError> {
        self.token_where("name = $1", name).await
    }

    async fn token_where(
        &self,
        condition: &str,
        value: &str,
    ) -> Result<Option<StoredToken>, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM nip_tokens WHERE {condition}");
        let row = sqlx::query(&sql)
            .bind(value)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(token_from).transpose()?)
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM nip_tokens ORDER BY created_at_ms, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(token_from).collect::<Result<_, _>>()?)
    }

    /// Revokes the token named `name` (for good: a revoked token is never usable again).
    /// `Ok(false)` when no token has that name.
    pub async fn revoke_token(&self, name: &str, actor: &str) -> Result<bool, StoreError> {
        let Some(token) = self.token_named(name).await? else {
            return Ok(false);
        };
        if token.revoked_at_ms.is_some() {
            return Ok(true);
        }
        retry_races(|| async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "UPDATE nip_tokens SET revoked_at_ms = $1 WHERE id = $2 \
                 AND revoked_at_ms IS NULL",
            )
            .bind(now_ms())
            .bind(&token.id)
            .execute(&mut *tx)
            .await?;
            let detail = format!("token {name:?}");
            insert_event(&mut tx, actor, "token_revoked", None, &detail).await?;
            tx.commit().await
        })
        .await
        .map(|()| true)
    }
}
