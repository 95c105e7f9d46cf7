//! # nip-control-plane: the desired config, pushed to every proxy over xDS v3
//!
//! ```text
//! config file ──(poll, debounced)──▶ Config::from_yaml ──translate──▶ ResourceSet
//!        ──SnapshotCache::set──▶ nip_xds::server::AdsServer ──ADS──▶ proxies, gRPC clients
//!                                        └─ ACK / NACK per proxy ──▶ ProxyRegistry
//!                                                                  └─▶ REST: GET /v1/proxies
//! ```
//!
//! Today the desired state comes from one v4 YAML file, watched for changes: a change is
//! debounced (100 ms, so an editor's several writes make one push), validated with the same
//! parser and translator as `nip validate`, and served; an invalid file is logged with its
//! field paths and the last good config keeps being served. The store with history and
//! rollback, the REST API and the CLI verbs come next (issue 4).

#![warn(missing_docs)]

pub mod store;

use nip_xds::config::Config;
use nip_xds::server::{AdsServer, ProxyRegistry, SnapshotCache};
use nip_xds::translate::translate;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a config file must stay unchanged before it is pushed.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How to run a control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// The v4 YAML file holding the desired config.
    pub config: PathBuf,
    /// Where ADS is served.
    pub xds_address: SocketAddr,
    /// Where the REST API is served.
    pub api_address: SocketAddr,
    /// How often the file is checked for changes.
    pub watch_interval: Duration,
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
        matches!(self, ControlPlaneError::Config { .. })
    }
}

/// Size and modification time: enough to notice a file was rewritten.
fn fingerprint(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Loads, validates and translates the file into the cache; returns the version served.
fn load_into(path: &Path, cache: &SnapshotCache) -> Result<String, ControlPlaneError> {
    let config = Config::from_file(path).map_err(|error| ControlPlaneError::Config {
        path: path.display().to_string(),
        error,
    })?;
    let translation = translate(&config);
    for note in &translation.not_applied {
        tracing::warn!("{note}");
    }
    cache.set(&translation.resources);
    Ok(translation.resources.version)
}

/// Runs until the process ends: serves ADS and follows the config file.
pub async fn run(options: ControlPlaneOptions) -> Result<(), ControlPlaneError> {
    let cache = Arc::new(SnapshotCache::default());
    let registry = Arc::new(ProxyRegistry::default());
    let version = load_into(&options.config, &cache)?;
    let listener = tokio::net::TcpListener::bind(options.xds_address)
        .await
        .map_err(serve_error(options.xds_address))?;
    tracing::info!(
        %version,
        xds = %options.xds_address,
        api = %options.api_address,
        config = %options.config.display(),
        "nip control plane serving ADS"
    );
    let api = tokio::net::TcpListener::bind(options.api_address)
        .await
        .map_err(serve_error(options.api_address))?;
    let api_state = Arc::clone(&registry);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api, api_router(api_state)).await {
            tracing::error!("REST API stopped: {e}");
        }
    });
    tokio::spawn(watch_file(
        options.config.clone(),
        options.watch_interval,
        Arc::clone(&cache),
    ));
    tonic::transport::Server::builder()
        .add_service(AdsServer::new(cache, registry).into_service())
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
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

/// Polls the file; a change that has settled for [`DEBOUNCE`] is loaded and pushed, an
/// invalid one is logged and the last good config stays.
async fn watch_file(path: PathBuf, interval: Duration, cache: Arc<SnapshotCache>) {
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
        match load_into(&path, &cache) {
            Ok(version) => tracing::info!(%version, "config changed; pushed to proxies"),
            Err(e) => {
                tracing::error!("config change refused, still serving the last good one: {e}")
            }
        }
    }
}

/// The REST API: `GET /v1/proxies` lists every proxy that connected, with what it ACKed
/// and its last NACK.
fn api_router(registry: Arc<ProxyRegistry>) -> axum::Router {
    axum::Router::new().route(
        "/v1/proxies",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            async move { axum::Json(proxies_json(&registry)) }
        }),
    )
}

/// Every proxy as JSON: node, locality, connected, ACKed versions by type, last NACK.
pub fn proxies_json(registry: &ProxyRegistry) -> serde_json::Value {
    let seconds = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    serde_json::Value::Array(
        registry
            .list()
            .into_iter()
            .map(|p| {
                serde_json::json!({
                    "node_id": p.node_id,
                    "region": p.region,
                    "zone": p.zone,
                    "connected": p.connected,
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
