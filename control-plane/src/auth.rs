//! Who may call the control plane's REST API, and what each caller may do.
//!
//! ```text
//! Authorization: Bearer nip_<id>_<secret> ──Authenticator──▶ Identity {name, role, tenants}
//!                                  │ store: token by id, SHA-256(secret) compared
//!                                  └─ unknown, wrong, revoked or expired ──▶ 401
//! Identity ──api: the route's Role──▶ allowed, or 403 naming the role it needs
//! ```
//!
//! A token is `nip_` + a public id (12 hex digits, how it is found) + `_` + a secret (256
//! random bits, 64 hex digits). The store keeps the SHA-256 of the secret, never the secret
//! (a secret of 256 random bits needs no slow hash: nothing can be guessed from its digest),
//! and no log line carries a token. Roles are ordered: `viewer` reads, `operator` also
//! changes the config, `admin` also manages tokens. A token may be limited to tenants: it
//! then acts only on a config whose `tenant.id` is one of them.
//!
//! The first admin token comes from [`bootstrap_admin`]: at start, a token in the admin
//! token file is made known to the store (so replicas given the same file agree); with no
//! file and no usable admin token in the store, one is made and written to the file
//! (mode 0600) for the operator to read, as kubeadm or Vault hand out their first credential.

use crate::store::{now_ms, Store, StoreError, StoredToken};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;

/// What a caller may do; each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads config, history, proxies and events; validates documents.
    Viewer,
    /// Also applies and rolls back config.
    Operator,
    /// Also creates, lists and revokes tokens.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The role's name in tokens and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// A caller the API has authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Who, as the audit trail shows it: `token:NAME`.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The tenants it may act on; empty: every tenant.
    pub tenants: Vec<String>,
}

impl Identity {
    /// Whether it may act on a config of `tenant` (`None`: a config with no tenant block,
    /// which only a caller limited to no tenant may touch).
    pub fn covers_tenant(&self, tenant: Option<&str>) -> bool {
        self.tenants.is_empty() || tenant.is_some_and(|t| self.tenants.iter().any(|x| x == t))
    }
}

/// Why a caller was not authenticated (401) or a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("authentication required: send Authorization: Bearer <token> (nip token create)")]
    Missing,
    /// A bearer token that is not (or no longer) valid; the reason is safe to show.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// A JWT that does not verify (signature, issuer, audience, time, form).
    #[error("invalid token: {0}")]
    InvalidJwt(String),
    /// An authenticated caller with no role NIP knows (403, not 401).
    #[error("no role: {0}")]
    NoRole(String),
    /// The OIDC issuer could not be asked for its keys.
    #[error("cannot check the token with its issuer: {0}")]
    Issuer(String),
    /// A token asked for with a bad name, role or lifetime.
    #[error("{0}")]
    BadRequest(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The admin token file could not be read or written.
    #[error("admin token file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
}

/// The prefix of every NIP API token (lets secret scanners and people recognise one).
pub const TOKEN_PREFIX: &str = "nip_";

/// A token just made: the secret, shown once, and what the store keeps.
#[derive(Debug)]
pub struct NewToken {
    /// The whole token (`nip_<id>_<secret>`), for the caller only.
    pub token: String,
    /// What is stored (the secret's digest only).
    pub stored: StoredToken,
}

/// The lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(len: usize) -> Result<String, AuthError> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes)
        .map_err(|e| AuthError::BadRequest(format!("no randomness from the system: {e}")))?;
    Ok(hex(&bytes))
}

/// Checks a token's name: what `nip token revoke` takes and the audit trail shows.
fn check_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadRequest(format!(
            "name: {name:?} must be 1–64 letters, digits, '-', '_', '.' or '@'"
        )))
    }
}

/// The role column of a join token: it gets a proxy its first certificate and nothing else.
pub const JOIN_ROLE: &str = "join";

/// Which proxies may join with a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinScope {
    /// Any node id.
    Any,
    /// Exactly this node id.
    Node(String),
    /// Nodes that say they are in this region.
    Region(String),
}

impl JoinScope {
    /// As stored: `node:ID`, `region:NAME`, or empty.
    pub fn as_stored(&self) -> String {
        match self {
            JoinScope::Any => String::new(),
            JoinScope::Node(id) => format!("node:{id}"),
            JoinScope::Region(region) => format!("region:{region}"),
        }
    }

    /// From what [`JoinScope::as_stored`] wrote.
    pub fn from_stored(text: &str) -> JoinScope {
        match text.split_once(':') {
            Some(("node", id)) => JoinScope::Node(id.to_string()),
            Some(("region", region)) => JoinScope::Region(region.to_string()),
            _ => JoinScope::Any,
        }
    }

    /// Whether a node `node_id` in `region` may join with it.
    pub fn admits(&self, node_id: &str, region: &str) -> bool {
        match self {
            JoinScope::Any => true,
            JoinScope::Node(id) => id == node_id,
            JoinScope::Region(r) => r == region,
        }
    }
}

/// What a token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// Calls the REST API with a role, for some tenants (empty: all).
    Api {
        /// What it may do.
        role: Role,
        /// The tenants it may act on.
        tenants: Vec<String>,
    },
    /// Gets a proxy its first certificate.
    Join(JoinScope),
}

/// A join token checked: who may join with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinGrant {
    /// The token's name (the audit trail's actor: `join:NAME`).
    pub name: String,
    /// Which nodes it admits.
    pub scope: JoinScope,
}

/// Makes a token of `kind`, valid for `ttl` (`None`: until revoked).
pub fn mint(
    name: &str,
    kind: TokenKind,
    ttl: Option<Duration>,
    created_by: &str,
) -> Result<NewToken, AuthError> {
    check_name(name)?;
    let (role, tenants, scope) = match kind {
        TokenKind::Api { role, tenants } => (role.as_str().to_string(), tenants, String::new()),
        TokenKind::Join(scope) => {
            if let JoinScope::Node(id) = &scope {
                nip_xds::identity::check_node_id(id)
                    .map_err(|e| AuthError::BadRequest(format!("node: {e}")))?;
            }
            if matches!(&scope, JoinScope::Region(r) if r.is_empty() || r.contains(':')) {
                return Err(AuthError::BadRequest("region: must name a region".into()));
            }
            (JOIN_ROLE.to_string(), Vec::new(), scope.as_stored())
        }
    };
    if let Some(bad) = tenants
        .iter()
        .find(|t| t.is_empty() || t.contains(',') || t.len() > 128)
    {
        return Err(AuthError::BadRequest(format!(
            "tenants: {bad:?} is not a tenant id"
        )));
    }
    let id = random_hex(6)?;
    let secret = random_hex(32)?;
    let now = now_ms();
    let expires_at_ms = match ttl {
        None => None,
        Some(ttl) if !ttl.is_zero() => {
            Some(now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)))
        }
        Some(_) => return Err(AuthError::BadRequest("ttl: must be more than 0".into())),
    };
    Ok(NewToken {
        token: format!("{TOKEN_PREFIX}{id}_{secret}"),
        stored: StoredToken {
            id,
            name: name.to_string(),
            role,
            tenants,
            secret_sha256: sha256_hex(secret.as_bytes()),
            created_at_ms: now,
            created_by: created_by.to_string(),
            expires_at_ms,
            revoked_at_ms: None,
            scope,
        },
    })
}

/// `nip_<id>_<secret>` into its id and secret.
fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 64)).then_some((id, secret))
}

/// The identity a verified JWT's claims give: `oidc:SUB` with the role and tenants they
/// name. A caller without a role NIP knows, or with an empty tenant list (which must not
/// widen to every tenant), gets none.
fn identity_of(claims: crate::oidc::Claims, role_claim: &str) -> Result<Identity, AuthError> {
    let name = format!("oidc:{}", claims.subject);
    let role = match claims.role.as_deref() {
        Some(role) => Role::parse(role).ok_or_else(|| {
            AuthError::NoRole(format!("{name}: {role:?} is not viewer, operator or admin"))
        })?,
        None => {
            return Err(AuthError::NoRole(format!(
                "{name}: the token has no {role_claim} claim"
            )))
        }
    };
    let tenants = match claims.tenants {
        Some(tenants) if tenants.is_empty() => {
            return Err(AuthError::NoRole(format!("{name}: an empty tenant list")))
        }
        Some(tenants) => tenants,
        None => Vec::new(),
    };
    Ok(Identity {
        name,
        role,
        tenants,
    })
}

/// The token of an `Authorization: Bearer TOKEN` header value.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Equal in time independent of where they differ (digests of equal length).
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Authenticates callers of the REST API.
#[derive(Debug, Clone)]
pub struct Authenticator {
    store: Store,
    oidc: Option<std::sync::Arc<crate::oidc::OidcVerifier>>,
}

impl Authenticator {
    /// Checks NIP tokens against `store`.
    pub fn new(store: Store) -> Authenticator {
        Authenticator { store, oidc: None }
    }

    /// Also accepts JWTs of an OIDC issuer.
    pub fn with_oidc(mut self, verifier: crate::oidc::OidcVerifier) -> Authenticator {
        self.oidc = Some(std::sync::Arc::new(verifier));
        self
    }

    /// The stored token behind an `Authorization: Bearer` header value, if it is usable.
    async fn usable_token(&self, authorization: Option<&str>) -> Result<StoredToken, AuthError> {
        let token = bearer(authorization).ok_or(AuthError::Missing)?;
        let (id, secret) = split_token(token).ok_or(AuthError::Invalid("not a NIP token"))?;
        let stored = self
            .store
            .token(id)
            .await?
            .filter(|t| same_digest(&t.secret_sha256, &sha256_hex(secret.as_bytes())))
            .ok_or(AuthError::Invalid("unknown token"))?;
        if stored.revoked_at_ms.is_some() {
            return Err(AuthError::Invalid("the token was revoked"));
        }
        if !stored.usable_at(now_ms()) {
            return Err(AuthError::Invalid("the token expired"));
        }
        Ok(stored)
    }

    /// The join grant behind an `Authorization` header value (a join token only).
    pub async fn authenticate_join(
        &self,
        authorization: Option<&str>,
    ) -> Result<JoinGrant, AuthError> {
        let stored = self.usable_token(authorization).await?;
        if stored.role != JOIN_ROLE {
            return Err(AuthError::Invalid("not a join token"));
        }
        Ok(JoinGrant {
            name: stored.name,
            scope: JoinScope::from_stored(&stored.scope),
        })
    }

    /// The identity behind an `Authorization` header value: a NIP token, or a JWT of the
    /// OIDC issuer when one is configured.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        if let (Some(verifier), Some(token)) = (&self.oidc, bearer(authorization)) {
            if !token.starts_with(TOKEN_PREFIX) && token.matches('.').count() == 2 {
                let claims = verifier.verify(token).await.map_err(|e| match e {
                    crate::oidc::OidcError::Invalid(e) => AuthError::InvalidJwt(e),
                    crate::oidc::OidcError::Issuer(e) => AuthError::Issuer(e),
                })?;
                return identity_of(claims, verifier.role_claim());
            }
        }
        let stored = self.usable_token(authorization).await?;
        if stored.role == JOIN_ROLE {
            return Err(AuthError::Invalid("a join token cannot call the API"));
        }
        let role = Role::parse(&stored.role).ok_or(AuthError::Invalid("the token has no role"))?;
        Ok(Identity {
            name: format!("token:{}", stored.name),
            role,
            tenants: stored.tenants,
        })
    }
}

/// The name the first admin token is stored under.
pub const BOOTSTRAP_TOKEN_NAME: &str = "bootstrap-admin";

/// What [`bootstrap_admin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// A new admin token was made and written to the file.
    Created,
    /// The file's token was made known to the store.
    Imported,
    /// Nothing to do: the file's token is known, or an admin token exists and no file.
    Unchanged,
}

/// Makes sure an operator has a way in: see the module documentation.
pub async fn bootstrap_admin(store: &Store, file: &Path) -> Result<Bootstrap, AuthError> {
    let file_error = |reason: String| AuthError::File {
        path: file.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let token = text.trim();
            let (id, secret) = split_token(token)
                .ok_or_else(|| file_error("does not hold a NIP token (nip_…)".into()))?;
            if let Some(known) = store.token(id).await? {
                if !same_digest(&known.secret_sha256, &sha256_hex(secret.as_bytes())) {
                    return Err(file_error("its token does not match the stored one".into()));
                }
                // A revoked bootstrap token stays revoked: the file does not revive it.
                return Ok(Bootstrap::Unchanged);
            }
            let stored = StoredToken {
                id: id.to_string(),
                name: format!("{BOOTSTRAP_TOKEN_NAME}-{id}"),
                role: Role::Admin.as_str().to_string(),
                tenants: Vec::new(),
                secret_sha256: sha256_hex(secret.as_bytes()),
                created_at_ms: now_ms(),
                created_by: format!("file:{}", file.display()),
                expires_at_ms: None,
                revoked_at_ms: None,
                scope: String::new(),
            };
            match store.create_token(&stored).await {
                // Another replica imported it first.
                Err(StoreError::NameTaken(_)) => Ok(Bootstrap::Unchanged),
                other => other.map(|()| Bootstrap::Imported).map_err(AuthError::from),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let now = now_ms();
            let has_admin = store
                .tokens()
                .await?
                .iter()
                .any(|t| t.role == Role::Admin.as_str() && t.usable_at(now));
            if has_admin {
                return Ok(Bootstrap::Unchanged);
            }
            let admin = TokenKind::Api {
                role: Role::Admin,
                tenants: Vec::new(),
            };
            let new = mint(BOOTSTRAP_TOKEN_NAME, admin, None, "control-plane")?;
            let stored = StoredToken {
                name: format!("{BOOTSTRAP_TOKEN_NAME}-{}", new.stored.id),
                ..new.stored
            };
            write_private(file, &new.token).map_err(|e| file_error(e.to_string()))?;
            store.create_token(&stored).await?;
            Ok(Bootstrap::Created)
        }
        Err(e) => Err(file_error(e.to_string())),
    }
}

/// Writes `text` to a new file only its owner may read (0600); an existing file is kept.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_a_public_id_and_a_secret_only_whose_digest_is_kept() {
        let operator = |tenants: Vec<String>| TokenKind::Api {
            role: Role::Operator,
            tenants,
        };
        let new = mint("ci", operator(vec![]), None, "token:root").unwrap();
        let (id, secret) = split_token(&new.token).unwrap();
        assert_eq!(id, new.stored.id);
        assert_eq!(new.stored.secret_sha256, sha256_hex(secret.as_bytes()));
        assert!(!format!("{:?}", new.stored).contains(secret));
        assert_ne!(
            mint("ci", operator(vec![]), None, "x").unwrap().token,
            new.token,
            "random every time"
        );
        for bad in ["nip_x_y", "Bearer", "nip_0123456789ab_short", "abc"] {
            assert_eq!(split_token(bad), None, "{bad}");
        }
        assert!(mint("", operator(vec![]), None, "x").is_err());
        assert!(mint("a b", operator(vec![]), None, "x").is_err());
        assert!(mint("ok", operator(vec!["a,b".into()]), None, "x").is_err());
        assert!(mint("ok", operator(vec![]), Some(Duration::ZERO), "x").is_err());
        let join = |scope| mint("j", TokenKind::Join(scope), None, "x");
        assert_eq!(
            join(JoinScope::Node("edge-1".into())).unwrap().stored.scope,
            "node:edge-1"
        );
        assert!(join(JoinScope::Node("a/b".into())).is_err());
        assert!(join(JoinScope::Region(String::new())).is_err());
        let scope = JoinScope::from_stored("region:eu");
        assert!(scope.admits("any", "eu") && !scope.admits("any", "us"));
        assert!(JoinScope::from_stored("").admits("x", ""));
    }

    #[test]
    fn roles_are_ordered_and_tenant_limits_apply() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
        let acme = Identity {
            name: "token:acme".into(),
            role: Role::Operator,
            tenants: vec!["acme".into()],
        };
        assert!(acme.covers_tenant(Some("acme")));
        assert!(!acme.covers_tenant(Some("globex")));
        assert!(!acme.covers_tenant(None));
        let all = Identity {
            tenants: vec![],
            ..acme
        };
        assert!(all.covers_tenant(None) && all.covers_tenant(Some("globex")));
    }

    #[tokio::test]
    async fn the_first_admin_token_is_made_once_kept_0600_and_imported_by_other_replicas() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/a.db", dir.path().display()))
            .await
            .unwrap();
        let file = dir.path().join("secrets/admin-token");
        assert_eq!(
            bootstrap_admin(&store, &file).await.unwrap(),
            Bootstrap::Created
        );
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
        let auth = Authenticator::new(store.clone());
        let me = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .await
            .unwrap();
        assert_eq!(me.role, Role::Admin);
        assert_eq!(
            bootstrap_admin(&store, &file).await.unwrap(),
            Bootstrap::Unchanged
        );

        // Another store (a replica's, or a new database) given the same file imports it.
        let other = Store::open(&format!("sqlite://{}/b.db", dir.path().display()))
            .await
            .unwrap();
        assert_eq!(
            bootstrap_admin(&other, &file).await.unwrap(),
            Bootstrap::Imported
        );
        assert!(Authenticator::new(other.clone())
            .authenticate(Some(&format!("Bearer {token}")))
            .await
            .is_ok());

        // Revoked stays revoked, file or not; a file whose token differs is an error.
        store
            .revoke_token(&me.name["token:".len()..], "test")
            .await
            .unwrap();
        assert_eq!(
            bootstrap_admin(&store, &file).await.unwrap(),
            Bootstrap::Unchanged
        );
        assert!(matches!(
            auth.authenticate(Some(&format!("Bearer {token}"))).await,
            Err(AuthError::Invalid("the token was revoked"))
        ));
        let (id, _) = split_token(&token).unwrap();
        std::fs::write(&file, format!("nip_{id}_{}", "f".repeat(64))).unwrap();
        assert!(matches!(
            bootstrap_admin(&store, &file).await,
            Err(AuthError::File { .. })
        ));
        for header in [
            None,
            Some("Basic abc"),
            Some("Bearer nip_x"),
            Some("Bearer "),
        ] {
            assert!(auth.authenticate(header).await.is_err(), "{header:?}");
        }
    }
}
