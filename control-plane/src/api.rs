//! The REST API (axum): apply and validate config, list proxies, history, rollback, the
//! audit trail, and the OpenAPI document describing all of it (`GET /v1/openapi.json`).
//!
//! Every route but the OpenAPI document needs `Authorization: Bearer <token>`
//! ([`crate::auth`]); [`required_role`] is the one table of which role each route needs.
//! Who made a change is the authenticated identity (`token:NAME`), never a header the
//! client chose.
//!
//! Bodies are JSON. A config can also be posted as raw YAML (`Content-Type:
//! application/yaml`, options in the query string), so `curl --data-binary @routes.yaml`
//! works. Errors are `{"error": "...", "errors": [{"path", "message"}]}` with a status that
//! says whose fault it is: 400 unreadable request, 401 no or bad token, 403 a role or tenant
//! that may not, 404 unknown version, 409 conflict or rolled-back canary, 422 invalid
//! config, 500 store failure.

use crate::auth::{AuthError, Authenticator, Identity, Role};
use crate::service::{
    validate, validate_bounded, Canary, Change, ChangeError, ConfigService, Outcome,
};
use crate::store::{now_ms, Revision, RevisionAction};
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use nip_xds::config::ConfigError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// How long a canary waits for its region by default.
pub const DEFAULT_CANARY_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest plugin module the store takes (what `PUT /v1/modules` reads at most).
const MAX_MODULE_BYTES: usize = 16 << 20;

/// Longest canary wait a request may ask for.
const MAX_CANARY_TIMEOUT: Duration = Duration::from_secs(600);

/// Every route of the API, behind the authentication and role check.
pub fn router(
    service: Arc<ConfigService>,
    auth: Authenticator,
    inject: crate::inject::InjectSettings,
    access_logs: Arc<crate::access_logs::AccessLogHub>,
) -> Router {
    Router::new()
        .route("/v1/config", get(current_config).post(apply_config))
        .route("/v1/validate", post(validate_config))
        .route("/v1/proxies", get(proxies))
        .route("/v1/history", get(history))
        .route("/v1/history/{version}", get(revision))
        .route("/v1/rollback/{version}", post(rollback))
        .route("/v1/events", get(events))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", delete(revoke_token))
        .route(
            "/v1/tenants/{tenant}/config",
            get(tenant_config).put(apply_tenant_config),
        )
        .route(
            "/v1/tenants/{tenant}/plugin-signing",
            get(plugin_signing)
                .put(set_plugin_signing)
                .delete(clear_plugin_signing),
        )
        .route(
            "/v1/modules",
            axum::routing::put(upload_module)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_MODULE_BYTES)),
        )
        .route("/v1/modules/{sha256}", get(download_module))
        .route("/v1/logs", get(logs))
        .route("/v1/traffic", get(traffic))
        .route("/v1/openapi.json", get(openapi))
        .merge(crate::dashboard::router())
        .route("/v1/inject", post(inject_webhook))
        .layer(Extension(Arc::new(inject)))
        .layer(Extension(access_logs))
        .with_state(service)
        .layer(middleware::from_fn_with_state(auth, authorize))
}

/// The role a request needs: `None` for the public OpenAPI document; every other route,
/// known or not, needs at least a viewer (a stranger learns nothing, not even which
/// paths exist).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    let path = path.trim_end_matches('/');
    match (method.as_str(), path) {
        ("GET", "/v1/openapi.json") => None,
        // The dashboard's page and files: the same for everyone, no data; what they show
        // comes from API calls carrying the operator's token.
        (_, p) if crate::dashboard::is_dashboard(method, p) => None,
        // The admission webhook changes nothing here: it answers with a patch of the pod
        // it is given (the apiserver calls it without an API token).
        ("POST", "/v1/inject") => None,
        (_, "/v1/tokens") => Some(Role::Admin),
        (_, p) if p.starts_with("/v1/tokens/") => Some(Role::Admin),
        ("POST", "/v1/config") => Some(Role::Operator),
        ("PUT", "/v1/modules") => Some(Role::Operator),
        ("POST", p) if p.starts_with("/v1/rollback/") => Some(Role::Operator),
        // A tenant's own routes and services: its operators change them (scoped by the
        // token's tenants in the handler).
        ("PUT", p) if p.starts_with("/v1/tenants/") && p.ends_with("/config") => {
            Some(Role::Operator)
        }
        ("PUT" | "DELETE", p) if p.starts_with("/v1/tenants/") => Some(Role::Admin),
        _ => Some(Role::Viewer),
    }
}

/// Authenticates the caller and checks its role against [`required_role`]; the identity
/// rides on to the handler in the request's extensions.
async fn authorize(
    State(auth): State<Authenticator>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(needed) = required_role(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.authenticate(header).await {
        Ok(identity) if identity.role >= needed => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Ok(identity) => ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} is a {}; {} {} needs {}",
                identity.name,
                identity.role.as_str(),
                request.method(),
                request.uri().path(),
                needed.as_str()
            ),
        )
        .into_response(),
        Err(AuthError::Store(e)) => {
            tracing::error!("REST API: cannot check a token: {e}");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot check the token")
                .into_response()
        }
        Err(e @ AuthError::NoRole(_)) => {
            ApiError::new(StatusCode::FORBIDDEN, e.to_string()).into_response()
        }
        Err(e @ AuthError::Issuer(_)) => {
            tracing::warn!("REST API: {e}");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
        }
        Err(e) => {
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"nip\""),
            );
            response
        }
    }
}

/// Refuses a caller limited to tenants when the current config (and `incoming`, a
/// document it wants to apply) belongs to a tenant it is not limited to.
async fn check_tenants(
    identity: &Identity,
    service: &ConfigService,
    incoming: Option<&str>,
) -> Result<(), ApiError> {
    if identity.tenants.is_empty() {
        return Ok(());
    }
    let current = service.store().current().await?;
    let documents = current
        .as_ref()
        .map(|r| ("the current config", r.yaml.as_str()))
        .into_iter()
        .chain(incoming.map(|yaml| ("the new config", yaml)));
    for (which, yaml) in documents {
        // Parsed off the async workers: a large document must not hold one.
        let tenant = crate::service::tenant_of(yaml.to_string()).await;
        if !identity.covers_tenant(tenant.as_deref()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} may act on tenants {} only; {which} belongs to {}",
                    identity.name,
                    identity.tenants.join(", "),
                    tenant.map_or("no tenant".to_string(), |t| format!("tenant {t}")),
                ),
            ));
        }
    }
    Ok(())
}

/// An error answer.
struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": message.into() }),
        }
    }

    fn invalid(error: &ConfigError) -> ApiError {
        let errors: Vec<Value> = error
            .field_errors()
            .into_iter()
            .map(|e| json!({ "path": e.path, "message": e.message }))
            .collect();
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: json!({ "error": "invalid config", "errors": errors }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ChangeError> for ApiError {
    fn from(error: ChangeError) -> Self {
        match &error {
            ChangeError::Invalid(e) => ApiError::invalid(e),
            ChangeError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, error.to_string()),
            ChangeError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, error.to_string()),
            ChangeError::CanaryFailed { version, reason } => ApiError {
                status: StatusCode::CONFLICT,
                body: json!({
                    "error": error.to_string(),
                    "version": version,
                    "state": "aborted",
                    "reason": reason,
                }),
            },
            ChangeError::Store(_) => {
                tracing::error!("REST API: {error}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        ApiError::from(ChangeError::from(error))
    }
}

/// A revision without its document (for lists).
fn summary(revision: &Revision) -> Value {
    json!({
        "version": revision.version,
        "created_at_ms": revision.created_at_ms,
        "author": revision.author,
        "message": revision.message,
        "action": revision.action,
        "restored_from": revision.restored_from,
        "state": revision.state,
        "canary_region": revision.canary_region,
    })
}

/// A revision with its document and diff.
fn full(revision: &Revision) -> Value {
    let mut value = summary(revision);
    value["yaml"] = json!(revision.yaml);
    value["diff"] = json!(revision.diff);
    value
}

fn outcome_json(outcome: &Outcome) -> (StatusCode, Value) {
    match outcome {
        Outcome::Unchanged(revision) => (
            StatusCode::OK,
            json!({ "result": "unchanged", "revision": summary(revision) }),
        ),
        Outcome::Applied(revision) => (
            StatusCode::CREATED,
            json!({ "result": "applied", "revision": summary(revision), "diff": revision.diff }),
        ),
        Outcome::Promoted { revision, acked_by } => (
            StatusCode::CREATED,
            json!({
                "result": "promoted",
                "revision": summary(revision),
                "diff": revision.diff,
                "canary_acked_by": acked_by,
            }),
        ),
    }
}

/// A config change as JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    yaml: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    canary: Option<CanaryBody>,
    #[serde(default)]
    allow_empty: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CanaryBody {
    region: String,
    #[serde(default)]
    timeout_seconds: Option<f64>,
}

/// Options of a raw YAML post.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyQuery {
    #[serde(default)]
    message: String,
    #[serde(default)]
    canary: Option<String>,
    #[serde(default)]
    canary_timeout_seconds: Option<f64>,
    #[serde(default)]
    allow_empty: bool,
}

fn canary_of(region: Option<String>, timeout: Option<f64>) -> Result<Option<Canary>, ApiError> {
    let Some(region) = region else {
        return Ok(None);
    };
    if region.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "canary.region: must name a region",
        ));
    }
    let timeout = match timeout {
        None => DEFAULT_CANARY_TIMEOUT,
        Some(seconds)
            if seconds.is_finite()
                && seconds > 0.0
                && seconds <= MAX_CANARY_TIMEOUT.as_secs_f64() =>
        {
            Duration::from_secs_f64(seconds)
        }
        Some(seconds) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "canary.timeout_seconds: {seconds} is not between 0 and {}",
                    MAX_CANARY_TIMEOUT.as_secs()
                ),
            ))
        }
    };
    Ok(Some(Canary { region, timeout }))
}

/// What the API does with an apply or validate body before anything is stored: decode it
/// (JSON or raw YAML, by `content_type`) and validate the document; the answer's status
/// when refused. The fuzz target of API bodies calls this.
pub fn check_body(content_type: &str, body: &[u8]) -> Result<(), u16> {
    let mut headers = HeaderMap::new();
    if let Ok(value) = content_type.parse() {
        headers.insert(axum::http::header::CONTENT_TYPE, value);
    }
    let change = read_change(&headers, None, &Bytes::copy_from_slice(body))
        .map_err(|e| e.status.as_u16())?;
    validate(&change.yaml)
        .map(drop)
        .map_err(|e| ApiError::invalid(&e).status.as_u16())
}

/// A change as a request asks for it.
struct ChangeRequest {
    yaml: String,
    message: String,
    canary: Option<Canary>,
    allow_empty: bool,
}

/// Reads a change from a JSON or raw YAML body.
fn read_change(
    headers: &HeaderMap,
    query: Option<ApplyQuery>,
    body: &Bytes,
) -> Result<ChangeRequest, ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/json") {
        let body: ApplyBody = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
        let canary = match body.canary {
            Some(c) => canary_of(Some(c.region), c.timeout_seconds)?,
            None => None,
        };
        return Ok(ChangeRequest {
            yaml: body.yaml,
            message: body.message,
            canary,
            allow_empty: body.allow_empty,
        });
    }
    let yaml = std::str::from_utf8(body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "request body: not UTF-8 text"))?
        .to_string();
    let query = query.unwrap_or_default();
    let canary = canary_of(query.canary, query.canary_timeout_seconds)?;
    Ok(ChangeRequest {
        yaml,
        message: query.message,
        canary,
        allow_empty: query.allow_empty,
    })
}

async fn apply_config(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    headers: HeaderMap,
    query: Result<Query<ApplyQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let query =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("query string: {e}")))?;
    let request = read_change(&headers, Some(query.0), &body)?;
    check_tenants(&identity, &service, Some(&request.yaml)).await?;
    let outcome = service
        .apply(Change {
            author: identity.name,
            message: request.message,
            yaml: request.yaml,
            canary: request.canary,
            action: RevisionAction::Apply,
            allow_empty: request.allow_empty,
        })
        .await?;
    let (status, body) = outcome_json(&outcome);
    Ok((status, Json(body)))
}

/// Validates a document without storing it; a valid one comes with its change against
/// the config served now (`diff`, empty when it is the same), what a reviewer looks at
/// before applying.
async fn validate_config(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request = read_change(&headers, None, &body)?;
    let yaml = request.yaml.clone();
    let validated = validate_bounded(request.yaml)
        .await
        .map_err(|e| ApiError::invalid(&e))?;
    // A tenant's token sees no more of the served config than before.
    let diff = if identity.tenants.is_empty() {
        match service.store().current().await? {
            Some(current) if current.yaml != yaml => crate::store::diff(
                &current.yaml,
                &format!("version {}", current.version),
                &yaml,
                "proposed",
            ),
            Some(_) => String::new(),
            None => crate::store::diff("", "nothing", &yaml, "proposed"),
        }
    } else {
        String::new()
    };
    Ok(Json(
        json!({ "valid": true, "notes": validated.notes, "diff": diff }),
    ))
}

async fn current_config(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
) -> Result<Json<Value>, ApiError> {
    check_tenants(&identity, &service, None).await?;
    match service.store().current().await? {
        Some(revision) => {
            let mut body = full(&revision);
            if let Some(canary) = service.store().canary().await? {
                body["canary"] = summary(&canary);
            }
            Ok(Json(body))
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no config applied yet (nip apply -f FILE)",
        )),
    }
}

async fn proxies(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
) -> Result<Json<Value>, ApiError> {
    check_tenants(&identity, &service, None).await?;
    Ok(Json(crate::proxies_json(
        service.registry(),
        &service.views(),
    )))
}

#[derive(Debug, Deserialize)]
struct Limit {
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    50
}

fn checked_limit(
    query: Result<Query<Limit>, axum::extract::rejection::QueryRejection>,
) -> Result<i64, ApiError> {
    let Query(Limit { limit }) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("query string: {e}")))?;
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit: {limit} is not between 1 and 10000"),
        ));
    }
    Ok(limit)
}

async fn history(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    query: Result<Query<Limit>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    check_tenants(&identity, &service, None).await?;
    let limit = checked_limit(query)?;
    let revisions = service.store().history(limit).await?;
    Ok(Json(Value::Array(revisions.iter().map(summary).collect())))
}

async fn revision(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_tenants(&identity, &service, None).await?;
    let version = parse_version(&version)?;
    Ok(Json(full(&service.store().revision(version).await?)))
}

fn parse_version(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("version: {text:?} is not a version number (see nip history)"),
        )
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    message: String,
}

async fn rollback(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(version): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let version = parse_version(&version)?;
    let restored = service.store().revision(version).await?;
    check_tenants(&identity, &service, Some(&restored.yaml)).await?;
    let body: RollbackBody = if body.is_empty() {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?
    };
    let outcome = service
        .rollback(version, &identity.name, &body.message)
        .await?;
    let (status, body) = outcome_json(&outcome);
    Ok((status, Json(body)))
}

async fn events(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    query: Result<Query<Limit>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    check_tenants(&identity, &service, None).await?;
    let limit = checked_limit(query)?;
    let events = service.store().events(limit).await?;
    Ok(Json(json!(events)))
}

/// A token asked for (`POST /v1/tokens`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: String,
    #[serde(default)]
    tenants: Vec<String>,
    /// A lifetime such as `30d` or `12h`; none: until revoked (join tokens: 24 h).
    #[serde(default)]
    ttl: Option<String>,
    /// A join token for this node id only.
    #[serde(default)]
    node: Option<String>,
    /// A join token for nodes of this region only.
    #[serde(default)]
    region: Option<String>,
}

/// How long a join token lives unless asked otherwise.
const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(24 * 3600);

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Store(e) => ApiError::from(e),
            AuthError::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            e => ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()),
        }
    }
}

async fn create_token(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: TokenBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
    let join = body.role == crate::auth::JOIN_ROLE;
    let role = match Role::parse(&body.role) {
        Some(role) => Some(role),
        None if join => None,
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "role: {:?} is not viewer, operator, admin or join",
                    body.role
                ),
            ))
        }
    };
    if !join && (body.node.is_some() || body.region.is_some()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "node and region limit join tokens (role: join) only",
        ));
    }
    if join && !body.tenants.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "tenants limit API tokens; a join token is limited by node or region",
        ));
    }
    // A caller limited to tenants hands out no more than it has.
    if !identity.tenants.is_empty()
        && (body.tenants.is_empty() || !body.tenants.iter().all(|t| identity.tenants.contains(t)))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} may create tokens for tenants {} only",
                identity.name,
                identity.tenants.join(", ")
            ),
        ));
    }
    let ttl = body
        .ttl
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("ttl: {e}")))?;
    let (kind, ttl) = match role {
        Some(role) => (
            crate::auth::TokenKind::Api {
                role,
                tenants: body.tenants,
            },
            ttl,
        ),
        None => {
            use crate::auth::JoinScope;
            let scope = match (body.node, body.region) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "a join token is for one node or one region, not both",
                    ))
                }
                (Some(node), None) => JoinScope::Node(node),
                (None, Some(region)) => JoinScope::Region(region),
                (None, None) => JoinScope::Any,
            };
            (
                crate::auth::TokenKind::Join(scope),
                Some(ttl.unwrap_or(DEFAULT_JOIN_TTL)),
            )
        }
    };
    let new = crate::auth::mint(&body.name, kind, ttl, &identity.name)?;
    service.store().create_token(&new.stored).await?;
    let mut answer = token_json(&new.stored);
    answer["token"] = json!(new.token);
    Ok((StatusCode::CREATED, Json(answer)))
}

/// A token as the API shows it: never its secret or digest.
fn token_json(token: &crate::store::StoredToken) -> Value {
    let state = if token.revoked_at_ms.is_some() {
        "revoked"
    } else if token.usable_at(now_ms()) {
        "active"
    } else {
        "expired"
    };
    let mut value = json!(token);
    value["state"] = json!(state);
    value
}

/// Whether `identity` may see and revoke `token`: a caller limited to tenants only
/// those limited to some of its tenants.
fn within_scope(identity: &Identity, token: &crate::store::StoredToken) -> bool {
    identity.tenants.is_empty()
        || (!token.tenants.is_empty() && token.tenants.iter().all(|t| identity.tenants.contains(t)))
}

async fn list_tokens(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
) -> Result<Json<Value>, ApiError> {
    let tokens = service.store().tokens().await?;
    Ok(Json(Value::Array(
        tokens
            .iter()
            .filter(|t| within_scope(&identity, t))
            .map(token_json)
            .collect(),
    )))
}

async fn revoke_token(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let visible = service
        .store()
        .token_named(&name)
        .await?
        .is_some_and(|t| within_scope(&identity, &t));
    if visible && service.store().revoke_token(&name, &identity.name).await? {
        Ok(Json(json!({ "revoked": name })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no token named {name:?} (nip token list)"),
        ))
    }
}

/// A tenant's plugin signing keys (`PUT /v1/tenants/{tenant}/plugin-signing`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningBody {
    /// Base64 ed25519 public keys.
    keys: Vec<String>,
}

/// Refuses a caller limited to other tenants.
fn check_tenant_scope(identity: &Identity, tenant: &str) -> Result<(), ApiError> {
    if identity.covers_tenant(Some(tenant)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} may act on tenants {} only",
                identity.name,
                identity.tenants.join(", ")
            ),
        ))
    }
}

/// The current config's routes and services of `tenant` (`GET /v1/tenants/T/config`):
/// `{ tenant, version, yaml }`.
async fn tenant_config(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_tenant_scope(&identity, &tenant)?;
    let current = service.store().current().await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no config applied yet (nip apply -f FILE)",
        )
    })?;
    let part = crate::tenancy::fragment_of(&current.yaml, &tenant).map_err(tenancy_error)?;
    Ok(Json(json!({
        "tenant": tenant,
        "version": current.version,
        "yaml": part,
    })))
}

/// Replaces `tenant`'s routes and services in the current config and applies the result
/// as a new version (`PUT /v1/tenants/T/config`, a YAML body of `services` and `routes`).
async fn apply_tenant_config(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ApplyQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_tenant_scope(&identity, &tenant)?;
    let query =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("query string: {e}")))?;
    let request = read_change(&headers, Some(query.0), &body)?;
    let current = service.store().current().await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no config applied yet (nip apply -f FILE)",
        )
    })?;
    let merged = crate::tenancy::merge_fragment(&current.yaml, &tenant, &request.yaml)
        .map_err(tenancy_error)?;
    let outcome = service
        .apply(Change {
            author: identity.name,
            message: if request.message.is_empty() {
                format!("tenant {tenant}: routes and services")
            } else {
                request.message
            },
            yaml: merged,
            canary: request.canary,
            action: RevisionAction::Apply,
            allow_empty: request.allow_empty,
        })
        .await?;
    let (status, body) = outcome_json(&outcome);
    Ok((status, Json(body)))
}

fn tenancy_error(error: crate::tenancy::TenancyError) -> ApiError {
    match error {
        crate::tenancy::TenancyError::NoTenant(m) => ApiError::new(StatusCode::NOT_FOUND, m),
        crate::tenancy::TenancyError::Invalid(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m)
        }
    }
}

async fn plugin_signing(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_tenant_scope(&identity, &tenant)?;
    let keys = service.store().plugin_signing(&tenant).await?;
    Ok(Json(json!({
        "tenant": tenant,
        "required": keys.is_some(),
        "keys": keys.unwrap_or_default(),
    })))
}

async fn set_plugin_signing(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    check_tenant_scope(&identity, &tenant)?;
    let body: SigningBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
    if body.keys.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "keys: give at least one key (DELETE removes the requirement)",
        ));
    }
    for (i, key) in body.keys.iter().enumerate() {
        let ok = nip_xds::config::decode_base64(key)
            .is_some_and(|k| k.len() == nip_xds::config::ED25519_KEY_BYTES);
        if !ok {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("keys[{i}]: not the base64 of an ed25519 public key (32 bytes)"),
            ));
        }
    }
    let keys: Vec<String> = body.keys.iter().map(|k| k.trim().to_string()).collect();
    service
        .store()
        .set_plugin_signing(&tenant, &keys, &identity.name)
        .await?;
    service.sync().await?;
    Ok(Json(
        json!({ "tenant": tenant, "required": true, "keys": keys }),
    ))
}

async fn clear_plugin_signing(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_tenant_scope(&identity, &tenant)?;
    if !service
        .store()
        .set_plugin_signing(&tenant, &[], &identity.name)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("tenant {tenant:?} requires no signed plugins"),
        ));
    }
    service.sync().await?;
    Ok(Json(json!({ "tenant": tenant, "required": false })))
}

/// The mutating admission webhook: an `AdmissionReview` of a pod in, the same review
/// answered (allowed, with the patch that adds the sidecar) out.
async fn inject_webhook(
    Extension(settings): Extension<Arc<crate::inject::InjectSettings>>,
    body: Bytes,
) -> Response {
    let review: Value = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("not an AdmissionReview: {e}"),
            )
            .into_response()
        }
    };
    match crate::inject::review(&review, &settings) {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Stores a plugin module (the body: the `.wasm` bytes) by its SHA-256, which a config
/// then names alone (`source: { sha256 }`); storing one twice changes nothing.
async fn upload_module(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !body.starts_with(b"\0asm") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body is not a WebAssembly module (no \\0asm header)",
        ));
    }
    let digest = nip_proxy::plugins::fetch::hex_sha256(&body);
    let new = service
        .store()
        .put_module(&digest, &body, &identity.name)
        .await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "sha256": digest, "size": body.len(), "new": new })),
    ))
}

/// A stored plugin module's bytes (`application/wasm`).
async fn download_module(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    check_tenants(&identity, &service, None).await?;
    if !nip_xds::config::is_sha256_hex(&sha256) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("sha256: {sha256:?} is not 64 hex digits"),
        ));
    }
    match service.store().module(&sha256.to_ascii_lowercase()).await? {
        Some(bytes) => Ok((
            [(axum::http::header::CONTENT_TYPE, "application/wasm")],
            bytes,
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no module {sha256} in the store"),
        )),
    }
}

/// What `GET /v1/logs` returns.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    /// Keep the answer open and send lines as they come.
    #[serde(default)]
    follow: bool,
    /// Only this proxy's (node id).
    proxy: Option<String>,
    /// Only this route's.
    route: Option<String>,
    /// Only these statuses: `503` or a class (`5xx`).
    status: Option<String>,
    /// The kept lines to start with (default 100; 0 with `follow` for only new ones).
    limit: Option<usize>,
}

/// The access records proxies streamed here (`control_plane.stream_access_logs`), one
/// JSON object per line: the newest kept ones, then, with `follow`, each as it comes
/// (`{"lost": N}` where a slow reader missed some) until the reader leaves.
async fn logs(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Extension(hub): Extension<Arc<crate::access_logs::AccessLogHub>>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    // Records of every tenant's traffic: not for a token limited to some.
    check_tenants(&identity, &service, None).await?;
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("query string: {e}")))?;
    let statuses = match query.status.as_deref() {
        None => 0..=u16::MAX,
        Some(text) => nip_proxy::admin::status_filter(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("status: {text:?} is not a code (503) or a class (5xx)"),
            )
        })?,
    };
    let wanted = move |line: &crate::access_logs::StreamedLine| {
        u16::try_from(line.status).is_ok_and(|s| statuses.contains(&s))
            && query.proxy.as_deref().is_none_or(|p| p == line.node)
            && query.route.as_deref().is_none_or(|r| r == line.route)
    };
    let limit = query.limit.unwrap_or(100).min(crate::access_logs::RECENT);
    let mut kept: Vec<String> = hub
        .recent()
        .iter()
        .filter(|l| wanted(l))
        .map(|l| ndjson(&**l))
        .collect();
    let kept = kept.split_off(kept.len().saturating_sub(limit));
    let (lines, body) = tokio::sync::mpsc::channel::<Result<String, std::convert::Infallible>>(64);
    let mut follower = query.follow.then(|| hub.follow());
    tokio::spawn(async move {
        for line in kept {
            if lines.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let Some(follower) = follower.as_mut() else {
            return;
        };
        loop {
            let next = tokio::select! {
                _ = lines.closed() => return,
                next = follower.recv() => next,
            };
            let line = match next {
                Ok(line) if wanted(&line) => ndjson(&*line),
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(lost)) => {
                    format!("{{\"lost\":{lost}}}\n")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if lines.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body)),
    )
        .into_response())
}

fn ndjson(value: &impl serde::Serialize) -> String {
    let mut line = serde_json::to_string(value).unwrap_or_default();
    line.push('\n');
    line
}

/// Each route's request rate, 5xx share and latency over the last minute, from the access
/// records proxies stream here.
async fn traffic(
    State(service): State<Arc<ConfigService>>,
    Extension(identity): Extension<Identity>,
    Extension(hub): Extension<Arc<crate::access_logs::AccessLogHub>>,
) -> Result<Json<Value>, ApiError> {
    check_tenants(&identity, &service, None).await?;
    Ok(Json(json!({
        "window_seconds": crate::access_logs::ROUTE_WINDOW.as_secs(),
        "routes": hub.routes(),
    })))
}

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}
