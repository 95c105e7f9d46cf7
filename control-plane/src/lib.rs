//! # nip-control-plane: the desired config, stored with its history, pushed to every proxy
//! over xDS v3
//!
//! ```text
//! nip apply / REST / dashboard ──▶ api ──▶ service: validate ──▶ store (SQLite | PostgreSQL)
//! config file ──(poll, debounced)──┘                      │ revisions, events
//!                           sync (after a change, and every poll) ◀─┘
//!                                  ──translate──▶ Views ──▶ SnapshotCache
//!        ──▶ nip_xds::server::AdsServer ──ADS──▶ proxies, gRPC clients
//!                 └─ ACK / NACK per proxy ──▶ ProxyRegistry ──▶ GET /v1/proxies, canaries
//! ```
//!
//! The store is the source of truth: every change becomes a numbered revision (with who,
//! when, why and the diff) and an audit event; what proxies are served always follows the
//! store's head, so several replicas sharing one PostgreSQL database converge by polling it.
//! A change arrives through the REST API ([`api`]) or from the optional config file the
//! control plane follows (a change there is debounced 100 ms and applied like an API call).
//! Proxies may stream their access records to the xDS port ([`access_logs`], Envoy's gRPC
//! access log service): `GET /v1/logs` follows them, the dashboard shows per-route figures.
//! [`dashboard`] is a page over the same API (same token, same roles); plugin modules
//! `nip deploy` uploads are kept in the store by digest and sent inline with the config.
//! [`service`] validates with the same parser and translator as `nip validate`, stores,
//! serves, and runs canary rollouts (one region first, promoted when all its proxies ACK,
//! rolled back on a NACK).

#![warn(missing_docs)]

pub mod access_logs;
pub mod api;
pub mod auth;
pub mod ca;
pub mod dashboard;
pub mod https;
pub mod inject;
pub mod oidc;
pub mod ratelimit;
pub mod service;
pub mod store;
pub mod tenancy;
pub mod xds_port;

use nip_xds::server::{AdsServer, ProxyRegistry, SnapshotCache, Views};
use service::{Change, ChangeError, ConfigService};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use store::{RevisionAction, Store};

/// How long a config file must stay unchanged before it is applied.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How to run a control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Where revisions and events are kept: `sqlite://PATH` or `postgres://…`.
    pub store: String,
    /// A v4 YAML file to follow: applied at start and whenever it changes.
    pub config: Option<PathBuf>,
    /// Where ADS is served.
    pub xds_address: SocketAddr,
    /// Where the REST API is served.
    pub api_address: SocketAddr,
    /// How often the file and the store are checked for changes.
    pub watch_interval: Duration,
    /// The first admin token: read from this file if it exists (and made known to the
    /// store), else made and written here when the store has no usable admin token.
    pub admin_token_file: PathBuf,
    /// The operator's rules for changes (which hosts plugin URLs may name).
    pub policy: service::ChangePolicy,
    /// JWTs of an OIDC issuer accepted as API credentials (besides NIP tokens).
    pub oidc: Option<oidc::OidcOptions>,
    /// Workload identity: the CA and the names the xDS port and the REST API answer to
    /// over TLS. `None` serves both in plaintext (`--plaintext`, development only).
    pub identity: Option<IdentityOptions>,
    /// What the admission webhook injects (`POST /v1/inject`).
    pub inject: inject::InjectSettings,
}

/// The control plane as a certificate authority, and how its xDS port is named.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// The CA.
    pub ca: ca::CaOptions,
    /// DNS names and IPs the xDS port's certificate carries (its bind IP is added).
    pub server_names: Vec<String>,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The config file is missing or invalid at start.
    #[error("{path}: {error}")]
    Config {
        /// The file.
        path: String,
        /// Every problem, with field paths.
        error: nip_xds::config::ConfigError,
    },
    /// The store could not be opened or used.
    #[error("{0}")]
    Store(#[from] store::StoreError),
    /// The file's change could not be stored.
    #[error("{path}: {error}")]
    Change {
        /// The file.
        path: String,
        /// What went wrong.
        error: ChangeError,
    },
    /// The certificate authority could not start.
    #[error("{0}")]
    Ca(#[from] ca::CaError),
    /// The admin token could not be read, made or stored.
    #[error("{0}")]
    Auth(#[from] auth::AuthError),
    /// The xDS port could not be bound or served.
    #[error("xDS server on {address}: {reason}")]
    Serve {
        /// The address.
        address: SocketAddr,
        /// What failed.
        reason: String,
    },
}

impl ControlPlaneError {
    /// Whether the user must fix the config (exit 2) rather than the environment.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            ControlPlaneError::Config { .. }
                | ControlPlaneError::Change {
                    error: ChangeError::Invalid(_),
                    ..
                }
        )
    }
}

/// Size and modification time: enough to notice a file was rewritten.
fn fingerprint(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Applies the file's document as a change by `file:PATH`.
async fn apply_file(path: &Path, service: &ConfigService) -> Result<(), ControlPlaneError> {
    let yaml = std::fs::read_to_string(path).map_err(|source| ControlPlaneError::Config {
        path: path.display().to_string(),
        error: nip_xds::config::ConfigError::Read {
            path: path.display().to_string(),
            source,
        },
    })?;
    let outcome = service
        .apply(Change {
            author: format!("file:{}", path.display()),
            message: String::new(),
            yaml,
            canary: None,
            action: RevisionAction::File,
            // The operator's own file: what it says is meant.
            allow_empty: true,
        })
        .await
        .map_err(|error| match error {
            ChangeError::Invalid(error) => ControlPlaneError::Config {
                path: path.display().to_string(),
                error,
            },
            error => ControlPlaneError::Change {
                path: path.display().to_string(),
                error,
            },
        })?;
    tracing::info!(
        version = outcome.revision().version,
        file = %path.display(),
        "config file applied"
    );
    Ok(())
}

/// Runs until the process ends: serves ADS and the REST API, follows the store (and the
/// config file, if any).
pub async fn run(options: ControlPlaneOptions) -> Result<(), ControlPlaneError> {
    let store = Store::open(&options.store).await?;
    match auth::bootstrap_admin(&store, &options.admin_token_file).await? {
        auth::Bootstrap::Created => tracing::info!(
            file = %options.admin_token_file.display(),
            "made the first admin token; the CLI reads it from this file (or NIP_TOKEN)"
        ),
        auth::Bootstrap::Imported => tracing::info!(
            file = %options.admin_token_file.display(),
            "admin token from the file is now known to the store"
        ),
        auth::Bootstrap::Unchanged => {}
    }
    let mut authenticator = auth::Authenticator::new(store.clone());
    if let Some(oidc) = &options.oidc {
        let verifier = oidc::OidcVerifier::new(oidc.clone())
            .map_err(|reason| ControlPlaneError::Auth(auth::AuthError::BadRequest(reason)))?;
        tracing::info!(issuer = %oidc.issuer, audience = %oidc.audience, "REST API also takes JWTs of this OIDC issuer");
        authenticator = authenticator.with_oidc(verifier);
    }
    let issuer = match &options.identity {
        Some(identity) => {
            let ca = ca::CertificateAuthority::open(&identity.ca)?;
            tracing::info!(
                trust_domain = ca.trust_domain(),
                "certificate authority ready"
            );
            let serving = xds_port::ServingCertificate::make(
                &ca,
                &identity.server_names,
                &[options.xds_address, options.api_address],
            )?;
            Some((
                xds_port::Issuer {
                    ca: Arc::new(ca),
                    auth: authenticator.clone(),
                    store: store.clone(),
                },
                serving,
            ))
        }
        None => None,
    };
    let cache = Arc::new(SnapshotCache::default());
    let registry = Arc::new(ProxyRegistry::default());
    let service = Arc::new(ConfigService::new(
        store,
        cache.clone(),
        registry.clone(),
        options.policy.clone(),
    ));
    if let Some((issuer, _)) = &issuer {
        service
            .set_trust_bundle(issuer.ca.trust_bundle_pem(), issuer.ca.trust_domain())
            .await?;
        // Proxies that join (or come back from another address) are reached over mesh
        // mutual TLS as soon as they are known.
        let (service, registry) = (Arc::clone(&service), Arc::clone(&registry));
        tokio::spawn(async move {
            let mut members = registry.watch_members();
            loop {
                if let Err(e) = service.set_mesh_members(registry.mesh_members()).await {
                    tracing::error!("mesh members not served: {e}");
                }
                if members.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    service.sync().await?;
    if let Some(path) = &options.config {
        apply_file(path, &service).await?;
    }
    let listener = tokio::net::TcpListener::bind(options.xds_address)
        .await
        .map_err(serve_error(options.xds_address))?;
    let api = tokio::net::TcpListener::bind(options.api_address)
        .await
        .map_err(serve_error(options.api_address))?;
    tracing::info!(
        xds = %options.xds_address,
        api = %options.api_address,
        store = %store::redact(&options.store),
        "nip control plane serving ADS and the REST API"
    );
    let access_logs = Arc::new(access_logs::AccessLogHub::default());
    let router = api::router(
        Arc::clone(&service),
        authenticator,
        options.inject.clone(),
        Arc::clone(&access_logs),
    );
    match &issuer {
        Some((_, serving)) => {
            let config =
                https::server_config(&serving.chain_pem, &serving.key_pem).map_err(|reason| {
                    ControlPlaneError::Serve {
                        address: options.api_address,
                        reason,
                    }
                })?;
            tokio::spawn(https::serve(api, config, router));
        }
        None => {
            tracing::warn!(api = %options.api_address, "REST API in plaintext (--plaintext): tokens cross the network in the clear");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(api, router).await {
                    tracing::error!("REST API stopped: {e}");
                }
            });
        }
    }
    tokio::spawn(follow_store(Arc::clone(&service), options.watch_interval));
    if let Some(path) = options.config.clone() {
        tokio::spawn(watch_file(
            path,
            options.watch_interval,
            Arc::clone(&service),
        ));
    }
    xds_port::serve(
        listener,
        options.xds_address,
        AdsServer::new(cache, registry),
        issuer,
        access_logs,
    )
    .await
    .map_err(serve_error(options.xds_address))
}

/// Turns a bind or serve failure on `address` into a [`ControlPlaneError`].
fn serve_error<E: std::fmt::Display>(address: SocketAddr) -> impl FnOnce(E) -> ControlPlaneError {
    move |e| ControlPlaneError::Serve {
        address,
        reason: e.to_string(),
    }
}

/// Serves changes other replicas stored, and ends abandoned canaries.
async fn follow_store(service: Arc<ConfigService>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = service.sync().await {
            tracing::error!("cannot read the store, still serving what was served: {e}");
        }
    }
}

/// Polls the file; a change that has settled for [`DEBOUNCE`] is applied, an invalid one
/// is logged (and recorded as refused) and the last good config stays.
async fn watch_file(path: PathBuf, interval: Duration, service: Arc<ConfigService>) {
    let mut known = fingerprint(&path);
    loop {
        tokio::time::sleep(interval).await;
        let mut current = fingerprint(&path);
        if current == known {
            continue;
        }
        // Let a burst of writes settle before reading.
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            let settled = fingerprint(&path);
            if settled == current {
                break;
            }
            current = settled;
        }
        known = current;
        if let Err(e) = apply_file(&path, &service).await {
            tracing::error!("config change refused, still serving the last good one: {e}");
        }
    }
}

/// Every proxy as JSON: node, locality, connected, where its stream comes from and whether
/// its certificate names it (a mesh member), the config version it runs (when it ACKed
/// everything of the state it is served), ACKed versions by type, last NACK.
pub fn proxies_json(registry: &ProxyRegistry, views: &Views) -> serde_json::Value {
    let seconds = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    serde_json::Value::Array(
        registry
            .list()
            .into_iter()
            .map(|p| {
                let served = views.for_region(&p.region);
                let config_version = (!served.label.is_empty() && served.is_acked_by(&p.acked))
                    .then(|| served.label.clone());
                serde_json::json!({
                    "stream_id": p.stream_id,
                    "node_id": p.node_id,
                    "region": p.region,
                    "zone": p.zone,
                    "connected": p.connected,
                    "address": p.address.map(|a| a.to_string()),
                    "certified": p.certified,
                    "disconnected_at_unix_seconds": p.disconnected_at.map(seconds),
                    "config_version": config_version,
                    "acked": p.acked,
                    "last_nack": p.last_nack.map(|n| serde_json::json!({
                        "type_url": n.type_url,
                        "reason": n.reason,
                        "at_unix_seconds": seconds(n.at),
                    })),
                })
            })
            .collect(),
    )
}
