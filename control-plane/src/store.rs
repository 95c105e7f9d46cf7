//! The control plane's store: every version of the desired config and the audit trail.
//!
//! One code path for SQLite (the embedded default) and PostgreSQL (several replicas behind a
//! load balancer share one database), through sqlx's `Any` driver and portable SQL. Schema
//! changes are migrations in `control-plane/migrations`, applied at open.
//!
//! A revision is a whole v4 config document. Versions are numbered 1, 2, 3… by the store;
//! they are never rewritten: a rollback is a new revision holding an old one's document. A
//! revision is `active` (served to every proxy; the newest active one is current), `canary`
//! (served to one region while the rollout waits for its ACKs; at most one at a time) or
//! `aborted` (a canary that a proxy NACKed or that was given up). Every change is also an
//! event: who, when, what, with the diff kept on the revision.

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row};
use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or its URL is not understood.
    #[error("cannot open store {url}: {reason}")]
    Open {
        /// The URL, without its password.
        url: String,
        /// What failed.
        reason: String,
    },
    /// A migration failed.
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// No revision has this version.
    #[error("no config version {0}")]
    NotFound(i64),
    /// Something stored does not read back as it was written.
    #[error("the store holds a damaged record: {0}")]
    Corrupt(String),
    /// A canary rollout is in progress; nothing else may change until it ends.
    #[error("canary rollout of version {version} to region {region:?} is in progress")]
    CanaryInProgress {
        /// The canary's version.
        version: i64,
        /// Its region.
        region: String,
    },
    /// A token of this name exists already.
    #[error("a token named {0:?} exists already")]
    NameTaken(String),
    /// The operation does not apply to this revision.
    #[error("version {version} is {state}, not {expected}")]
    WrongState {
        /// The revision.
        version: i64,
        /// Its state.
        state: String,
        /// The state the operation needs.
        expected: String,
    },
}

/// Where a revision stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RevisionState {
    /// Served to every proxy (the newest active revision is the current config).
    Active,
    /// Served to one region while a rollout waits for its proxies' ACKs.
    Canary,
    /// A canary that was rolled back.
    Aborted,
}

impl RevisionState {
    fn as_str(self) -> &'static str {
        match self {
            RevisionState::Active => "active",
            RevisionState::Canary => "canary",
            RevisionState::Aborted => "aborted",
        }
    }

    fn parse(s: &str) -> RevisionState {
        match s {
            "canary" => RevisionState::Canary,
            "aborted" => RevisionState::Aborted,
            _ => RevisionState::Active,
        }
    }
}

/// How a revision came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RevisionAction {
    /// Applied through the API or `nip apply`.
    Apply,
    /// A past revision restored (`nip rollback`).
    Rollback,
    /// Read from the config file the control plane follows.
    File,
}

impl RevisionAction {
    fn as_str(self) -> &'static str {
        match self {
            RevisionAction::Apply => "apply",
            RevisionAction::Rollback => "rollback",
            RevisionAction::File => "file",
        }
    }

    fn parse(s: &str) -> RevisionAction {
        match s {
            "rollback" => RevisionAction::Rollback,
            "file" => RevisionAction::File,
            _ => RevisionAction::Apply,
        }
    }
}

/// One stored version of the desired config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Revision {
    /// 1, 2, 3…: the version users see in `nip history` and pass to `nip rollback`.
    pub version: i64,
    /// When it was stored, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// Who made it.
    pub author: String,
    /// Why, in the author's words (may be empty).
    pub message: String,
    /// How it was made.
    pub action: RevisionAction,
    /// For a rollback: the version whose document it restores.
    pub restored_from: Option<i64>,
    /// Where it stands.
    pub state: RevisionState,
    /// For a canary (or an aborted one): the region it went to first.
    pub canary_region: Option<String>,
    /// For a canary: when the rollout must have ended (ms since the epoch). A canary still
    /// in progress after that was abandoned (its control plane died) and any replica
    /// aborts it.
    pub canary_deadline_ms: Option<i64>,
    /// The whole v4 YAML document.
    pub yaml: String,
    /// Unified diff from the config that was current when it was made.
    pub diff: String,
}

/// What a caller asks the store to record as a new revision.
#[derive(Debug, Clone)]
pub struct NewRevision<'a> {
    /// Who.
    pub author: &'a str,
    /// Why.
    pub message: &'a str,
    /// How.
    pub action: RevisionAction,
    /// For a rollback: the version restored.
    pub restored_from: Option<i64>,
    /// `Some((region, deadline_ms))` makes it a canary served to that region only, whose
    /// rollout ends by the deadline.
    pub canary: Option<(&'a str, i64)>,
    /// The whole document (already validated by the caller).
    pub yaml: &'a str,
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    /// 1, 2, 3… in the order things happened.
    pub id: i64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Who (a user, `file:PATH`, or `control-plane` for automatic rollbacks).
    pub actor: String,
    /// What: `apply`, `rollback`, `file`, `refused`, `canary_started`, `canary_promoted`,
    /// `canary_aborted`.
    pub action: String,
    /// The revision concerned, if any.
    pub version: Option<i64>,
    /// Details: the reason of a refusal or an abort, the region of a canary.
    pub detail: String,
}

/// The newest active and the canary version: cheap to poll, so replicas notice each
/// other's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// The current config's version.
    pub active: Option<i64>,
    /// The canary in progress, if any.
    pub canary: Option<i64>,
    /// The last change of a tenant policy (an event id): what is served depends on them.
    pub policies: Option<i64>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The schema, embedded in the binary.
fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![
            Migration::new(
                1,
                Cow::Borrowed("revisions and events"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0001_revisions.sql")),
                false,
            ),
            Migration::new(
                2,
                Cow::Borrowed("api tokens"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0002_tokens.sql")),
                false,
            ),
            Migration::new(
                3,
                Cow::Borrowed("join token scope"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0003_join_scope.sql")),
                false,
            ),
            Migration::new(
                4,
                Cow::Borrowed("tenant policies"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0004_tenant_policies.sql")),
                false,
            ),
            Migration::new(
                5,
                Cow::Borrowed("plugin modules"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0005_modules.sql")),
                false,
            ),
        ]),
        ..Migrator::DEFAULT
    }
}

/// A URL safe to print: the password, if any, is replaced.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

const REVISION_COLUMNS: &str = "version, created_at_ms, author, message, action, restored_from, \
                                state, canary_region, canary_deadline_ms, yaml, diff";

fn revision_from(row: &AnyRow) -> Result<Revision, sqlx::Error> {
    Ok(Revision {
        version: row.try_get("version")?,
        created_at_ms: row.try_get("created_at_ms")?,
        author: row.try_get("author")?,
        message: row.try_get("message")?,
        action: RevisionAction::parse(&row.try_get::<String, _>("action")?),
        restored_from: row.try_get("restored_from")?,
        state: RevisionState::parse(&row.try_get::<String, _>("state")?),
        canary_region: row.try_get("canary_region")?,
        canary_deadline_ms: row.try_get("canary_deadline_ms")?,
        yaml: row.try_get("yaml")?,
        diff: row.try_get("diff")?,
    })
}

fn event_from(row: &AnyRow) -> Result<Event, sqlx::Error> {
    Ok(Event {
        id: row.try_get("id")?,
        at_ms: row.try_get("at_ms")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        version: row.try_get("version")?,
        detail: row.try_get("detail")?,
    })
}

/// The unified diff between two documents, labelled with their versions.
pub fn diff(old: &str, old_label: &str, new: &str, new_label: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(old_label, new_label)
        .to_string()
}

/// How many times an insert that lost a race for the next number is retried.
const INSERT_ATTEMPTS: usize = 50;

/// Runs a write transaction, again when it lost a race with another writer (up to
/// [`INSERT_ATTEMPTS`] times, pausing between); the last race's error when all lost.
async fn retry_races<T, F, Fut>(mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut last_error = None;
    for _ in 0..INSERT_ATTEMPTS {
        match attempt().await {
            Err(e) if is_write_race(&e) => {
                last_error = Some(e);
                race_pause().await;
            }
            other => return other.map_err(StoreError::from),
        }
    }
    Err(StoreError::Query(
        last_error.unwrap_or(sqlx::Error::PoolClosed),
    ))
}

/// The store, shared by the API, the file follower and the rollout logic.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Opens (creating if needed) the store at `url` — `sqlite://PATH` or
    /// `postgres://USER@HOST:PORT/DB` — and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let open_error = |reason: String| StoreError::Open {
            url: redact(url),
            reason,
        };
        let (url, connections) = if let Some(path) = url.strip_prefix("sqlite://") {
            let file = path.split('?').next().unwrap_or(path);
            if let Some(dir) = std::path::Path::new(file).parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| open_error(format!("{}: {e}", dir.display())))?;
                }
            }
            let url = if path.contains('?') {
                url.to_string()
            } else {
                format!("{url}?mode=rwc")
            };
            // One writer at a time is how SQLite works; one connection avoids lock waits.
            (url, 1)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (url.to_string(), 8)
        } else {
            return Err(open_error(
                "the URL must start with sqlite:// or postgres://".to_string(),
            ));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(|e| open_error(e.to_string()))?;
        migrator().run(&pool).await?;
        Ok(Store { pool })
    }

    /// The current config: the newest active revision.
    pub async fn current(&self) -> Result<Option<Revision>, StoreError> {
        self.one_where("state = 'active' ORDER BY version DESC LIMIT 1", None)
            .await
    }

    /// The canary in progress, if any.
    pub async fn canary(&self) -> Result<Option<Revision>, StoreError> {
        self.one_where("state = 'canary' ORDER BY version DESC LIMIT 1", None)
            .await
    }

    /// One revision by version.
    pub async fn revision(&self, version: i64) -> Result<Revision, StoreError> {
        self.one_where("version = $1", Some(version))
            .await?
            .ok_or(StoreError::NotFound(version))
    }

    async fn one_where(
        &self,
        condition: &str,
        bind: Option<i64>,
    ) -> Result<Option<Revision>, StoreError> {
        let sql = format!("SELECT {REVISION_COLUMNS} FROM nip_revisions WHERE {condition}");
        let mut query = sqlx::query(&sql);
        if let Some(value) = bind {
            query = query.bind(value);
        }
        let row = query.fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(revision_from).transpose()?)
    }

    /// The newest revisions first, at most `limit`.
    pub async fn history(&self, limit: i64) -> Result<Vec<Revision>, StoreError> {
        let sql =
            format!("SELECT {REVISION_COLUMNS} FROM nip_revisions ORDER BY version DESC LIMIT $1");
        let rows = sqlx::query(&sql).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(revision_from).collect::<Result<_, _>>()?)
    }

    /// The newest events first, at most `limit`.
    pub async fn events(&self, limit: i64) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, actor, action, version, detail FROM nip_events \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(event_from).collect::<Result<_, _>>()?)
    }

    /// The active and canary versions, for noticing changes made by another replica.
    pub async fn head(&self) -> Result<Head, StoreError> {
        let row = sqlx::query(
            "SELECT \
               (SELECT MAX(version) FROM nip_revisions WHERE state = 'active') AS active, \
               (SELECT MAX(version) FROM nip_revisions WHERE state = 'canary') AS canary, \
               (SELECT MAX(id) FROM nip_events WHERE action LIKE 'plugin_signing%') AS policies",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Head {
            active: row.try_get("active")?,
            canary: row.try_get("canary")?,
            policies: row.try_get("policies")?,
        })
    }

    /// Records `new` as the next version, with its diff from the current config and an
    /// event. Refused while a canary is in progress.
    pub async fn commit(&self, new: NewRevision<'_>) -> Result<Revision, StoreError> {
        let mut last_error = None;
        for _ in 0..INSERT_ATTEMPTS {
            match self.try_commit(&new).await {
                Err(StoreError::Query(e)) if is_write_race(&e) => {
                    last_error = Some(e);
                    race_pause().await;
                }
                other => return other,
            }
        }
        Err(StoreError::Query(
            last_error.unwrap_or(sqlx::Error::PoolClosed),
        ))
    }

    async fn try_commit(&self, new: &NewRevision<'_>) -> Result<Revision, StoreError> {
        let mut tx = self.pool.begin().await?;
        let canary_sql =
            format!("SELECT {REVISION_COLUMNS} FROM nip_revisions WHERE state = 'canary' LIMIT 1");
        if let Some(row) = sqlx::query(&canary_sql).fetch_optional(&mut *tx).await? {
            let canary = revision_from(&row)?;
            return Err(StoreError::CanaryInProgress {
                version: canary.version,
                region: canary.canary_region.unwrap_or_default(),
            });
        }
        let current_sql = format!(
            "SELECT {REVISION_COLUMNS} FROM nip_revisions WHERE state = 'active' \
             ORDER BY version DESC LIMIT 1"
        );
        let current = sqlx::query(&current_sql)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(revision_from)
            .transpose()?;
        let version: i64 =
            sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS next FROM nip_revisions")
                .fetch_one(&mut *tx)
                .await?
                .try_get("next")?;
        let (old_yaml, old_label) = match &current {
            Some(c) => (c.yaml.as_str(), format!("version {}", c.version)),
            None => ("", "empty".to_string()),
        };
        let revision = Revision {
            version,
            created_at_ms: now_ms(),
            author: new.author.to_string(),
            message: new.message.to_string(),
            action: new.action,
            restored_from: new.restored_from,
            state: if new.canary.is_some() {
                RevisionState::Canary
            } else {
                RevisionState::Active
            },
            canary_region: new.canary.map(|(region, _)| region.to_string()),
            canary_deadline_ms: new.canary.map(|(_, deadline)| deadline),
            yaml: new.yaml.to_string(),
            diff: diff(
                old_yaml,
                &old_label,
                new.yaml,
                &format!("version {version}"),
            ),
        };
        sqlx::query(&format!(
            "INSERT INTO nip_revisions ({REVISION_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(revision.version)
        .bind(revision.created_at_ms)
        .bind(&revision.author)
        .bind(&revision.message)
        .bind(revision.action.as_str())
        .bind(revision.restored_from)
        .bind(revision.state.as_str())
        .bind(revision.canary_region.clone())
        .bind(revision.canary_deadline_ms)
        .bind(&revision.yaml)
        .bind(&revision.diff)
        .execute(&mut *tx)
        .await?;
        let (action, detail) = match (new.canary, new.restored_from) {
            (Some((region, _)), _) => ("canary_started", format!("region {region}")),
            (None, Some(from)) => ("rollback", format!("restores version {from}")),
            (None, None) => (new.action.as_str(), new.message.to_string()),
        };
        insert_event(&mut tx, new.author, action, Some(version), &detail).await?;
        tx.commit().await?;
        Ok(revision)
    }

    /// A canary passed: its revision becomes active for every proxy.
    pub async fn promote(&self, version: i64, actor: &str) -> Result<(), StoreError> {
        self.end_canary(version, actor, RevisionState::Active, "canary_promoted", "")
            .await
    }

    /// A canary failed: its revision is aborted and the previous config stays current.
    pub async fn abort(&self, version: i64, actor: &str, reason: &str) -> Result<(), StoreError> {
        self.end_canary(
            version,
            actor,
            RevisionState::Aborted,
            "canary_aborted",
            reason,
        )
        .await
    }

    async fn end_canary(
        &self,
        version: i64,
        actor: &str,
        to: RevisionState,
        action: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let revision = self.revision(version).await?;
        if revision.state != RevisionState::Canary {
            return Err(StoreError::WrongState {
                version,
                state: revision.state.as_str().to_string(),
                expected: RevisionState::Canary.as_str().to_string(),
            });
        }
        let mut last_error = None;
        for _ in 0..INSERT_ATTEMPTS {
            match self
                .try_end_canary(version, actor, to, action, detail)
                .await
            {
                Err(e) if is_write_race(&e) => {
                    last_error = Some(e);
                    race_pause().await;
                }
                Err(e) => return Err(e.into()),
                Ok(()) => return Ok(()),
            }
        }
        Err(StoreError::Query(
            last_error.unwrap_or(sqlx::Error::PoolClosed),
        ))
    }

    async fn try_end_canary(
        &self,
        version: i64,
        actor: &str,
        to: RevisionState,
        action: &str,
        detail: &str,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE nip_revisions SET state = $1 WHERE version = $2 AND state = 'canary'")
            .bind(to.as_str())
            .bind(version)
            .execute(&mut *tx)
            .await?;
        insert_event(&mut tx, actor, action, Some(version), detail).await?;
        tx.commit().await
    }

    /// Records an event that made no revision (a refused change, for instance).
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        version: Option<i64>,
        detail: &str,
    ) -> Result<(), StoreError> {
        let mut last_error = None;
        for _ in 0..INSERT_ATTEMPTS {
            let mut tx = self.pool.begin().await?;
            match insert_event(&mut tx, actor, action, version, detail).await {
                Ok(()) => {
                    tx.commit().await?;
                    return Ok(());
                }
                Err(e) if is_write_race(&e) => {
                    last_error = Some(e);
                    race_pause().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Query(
            last_error.unwrap_or(sqlx::Error::PoolClosed),
        ))
    }
}

async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    actor: &str,
    action: &str,
    version: Option<i64>,
    detail: &str,
) -> Result<(), sqlx::Error> {
    let id: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) + 1 AS next FROM nip_events")
        .fetch_one(&mut **tx)
        .await?
        .try_get("next")?;
    sqlx::query(
        "INSERT INTO nip_events (id, at_ms, actor, action, version, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(now_ms())
    .bind(actor)
    .bind(action)
    .bind(version)
    .bind(detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Two writers raced: both picked the same next number (unique violation), or SQLite
/// refused a second writer (`SQLITE_BUSY` when a read transaction wants to write). The loser
/// retries after a short, jittered pause.
fn is_write_race(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                || db
                    .code()
                    .is_some_and(|c| c == "23505" || c == "5" || c == "517")
                || db.message().contains("database is locked")
        }
        _ => false,
    }
}

/// The pause before retrying a write that lost a race.
async fn race_pause() {
    tokio::time::sleep(std::time::Duration::from_millis(fastrand::u64(2..20))).await;
}

mod modules;
mod policies;
mod tokens;

pub use tokens::StoredToken;

#[cfg(test)]
mod tests;
