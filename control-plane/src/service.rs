//! Changing the desired config: validate, store, serve — and canary rollouts.
//!
//! ```text
//! apply / rollback ──validate (same parser + translator as `nip validate`)──▶ Store::commit
//!        └─▶ sync: Store head ──translate──▶ Views {default, canary region} ──▶ SnapshotCache
//! canary: wait until every connected proxy of the region ACKs the canary's state
//!        ├─ all ACKed ──▶ Store::promote ──sync──▶ every proxy
//!        └─ a NACK, no proxy, or the deadline ──▶ Store::abort ──sync──▶ region back
//! ```
//!
//! What is served always follows the store's head, so replicas sharing a PostgreSQL store
//! converge by polling it ([`ConfigService::sync`]). A canary decision is made by the
//! replica that started it, from the proxies connected to that replica; a canary whose
//! replica died is aborted by any replica once its deadline has passed.

use crate::store::{
    now_ms, Head, NewRevision, Revision, RevisionAction, RevisionState, Store, StoreError,
};
use nip_xds::config::{Config, ConfigError, FieldError};
use nip_xds::server::{CacheState, ProxyRegistry, SnapshotCache, Views};
use nip_xds::translate::translate;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Who rolls back a failed or abandoned canary, in the audit trail.
pub const CONTROL_PLANE_ACTOR: &str = "control-plane";

/// How long after its deadline an unfinished canary counts as abandoned.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

/// How often a canary checks its region's proxies.
const CANARY_POLL: Duration = Duration::from_millis(20);

/// Pushes of config changes are at least this far apart: the first change of a burst goes
/// out at once, the rest of the burst together at the end of the window (istiod's lesson:
/// a burst of changes must not become a burst of pushes to every proxy).
pub const PUSH_DEBOUNCE: Duration = Duration::from_millis(100);

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The document is not a valid v4 config.
    #[error("{0}")]
    Invalid(ConfigError),
    /// Another change is in the way (a canary in progress), or the target cannot be
    /// restored.
    #[error("{0}")]
    Conflict(String),
    /// No such version.
    #[error("no config version {0}")]
    NotFound(i64),
    /// The canary was rolled back.
    #[error("canary of version {version} rolled back: {reason}")]
    CanaryFailed {
        /// The aborted revision.
        version: i64,
        /// What went wrong (which proxy NACKed and why, or who did not answer).
        reason: String,
    },
    /// The store failed.
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for ChangeError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(version) => ChangeError::NotFound(version),
            e @ (StoreError::CanaryInProgress { .. }
            | StoreError::WrongState { .. }
            | StoreError::NameTaken(_)) => ChangeError::Conflict(e.to_string()),
            e => ChangeError::Store(e),
        }
    }
}

/// A canary rollout: which region goes first and how long its proxies have to ACK.
#[derive(Debug, Clone)]
pub struct Canary {
    /// `node.locality.region` of the proxies that get the change first.
    pub region: String,
    /// How long to wait for every one of them to ACK.
    pub timeout: Duration,
}

/// What this control plane accepts beyond a valid document: rules of the operator's, not
/// of the config format.
#[derive(Debug, Clone, Default)]
pub struct ChangePolicy {
    /// Hosts a plugin's `source.url` may point at (exact host names, or `*.example.com`
    /// for its subdomains). Empty: no URL sources, so an apply can never make every proxy
    /// fetch an address of the caller's choosing.
    pub plugin_hosts: Vec<String>,
}

impl ChangePolicy {
    /// Every problem of `config` under this policy, with its field path. Without
    /// `allow_empty`, a change may not take every route away (`had_routes`: the current
    /// config has some) nor leave a routed service with no endpoints.
    pub fn problems(
        &self,
        config: &Config,
        had_routes: bool,
        allow_empty: bool,
    ) -> Vec<FieldError> {
        let mut problems = Vec::new();
        for (name, plugin) in &config.plugins {
            let Some(url) = plugin.source.as_ref().and_then(|s| s.url.as_deref()) else {
                continue;
            };
            let host = url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_ascii_lowercase))
                .unwrap_or_default();
            if !self
                .plugin_hosts
                .iter()
                .any(|allowed| host_allowed(allowed, &host))
            {
                problems.push(FieldError {
                    path: format!("plugins.{name}.source.url"),
                    message: if self.plugin_hosts.is_empty() {
                        "this control plane takes no plugin URLs (start it with \
                         --allow-plugin-host HOST to allow a registry)"
                            .to_string()
                    } else {
                        format!(
                            "{host:?} is not an allowed plugin host ({})",
                            self.plugin_hosts.join(", ")
                        )
                    },
                });
            }
        }
        if allow_empty {
            return problems;
        }
        if config.routes.is_empty() && had_routes {
            problems.push(FieldError {
                path: "routes".into(),
                message: "no routes: every request would answer 404 (apply with --allow-empty \
                          if that is meant)"
                    .into(),
            });
        }
        for (i, route) in config.routes.iter().enumerate() {
            let targets = route
                .service
                .iter()
                .chain(route.split.iter().map(|s| &s.service));
            for service in targets {
                if config
                    .services
                    .get(service)
                    .is_some_and(|s| s.endpoints.is_empty() && !s.original_destination)
                {
                    problems.push(FieldError {
                        path: format!("services.{service}.endpoints"),
                        message: format!(
                            "empty, but routes[{i}] sends traffic here: it would answer 503 \
                             (apply with --allow-empty if that is meant)"
                        ),
                    });
                }
            }
        }
        problems.dedup();
        problems
    }
}

/// `host` matches `allowed`: equal, or a subdomain of `*.domain`.
fn host_allowed(allowed: &str, host: &str) -> bool {
    let allowed = allowed.to_ascii_lowercase();
    match allowed.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => !host.is_empty() && host == allowed,
    }
}

/// A change someone asks for.
#[derive(Debug, Clone)]
pub struct Change {
    /// Who (recorded in the audit trail).
    pub author: String,
    /// Why.
    pub message: String,
    /// The whole v4 YAML document.
    pub yaml: String,
    /// Roll out to one region first.
    pub canary: Option<Canary>,
    /// How the change came (API or the followed file).
    pub action: RevisionAction,
    /// Apply even a config that serves nothing (no routes, or a routed service with no
    /// endpoints).
    pub allow_empty: bool,
}

/// What a change did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The document equals the current config: nothing stored or pushed.
    Unchanged(Revision),
    /// Stored and pushed to every proxy.
    Applied(Revision),
    /// Every proxy of the canary region ACKed, so it was pushed to every proxy.
    Promoted {
        /// The revision, now active.
        revision: Revision,
        /// The proxies that ACKed it during the canary.
        acked_by: Vec<String>,
    },
}

impl Outcome {
    /// The revision now current.
    pub fn revision(&self) -> &Revision {
        match self {
            Outcome::Unchanged(r) | Outcome::Applied(r) => r,
            Outcome::Promoted { revision, .. } => revision,
        }
    }
}

/// A document that passed validation: what it translates to and what does not act yet.
#[derive(Debug)]
pub struct Validated {
    /// Parts that load but are not applied, each with its field path.
    pub notes: Vec<String>,
}

/// Validates a document exactly as a proxy would, without storing it: the v4 rules, the
/// translation, then the proxy's own compiler ([`nip_proxy::compile::check`]), so a
/// document accepted here is one every proxy of this version compiles (a plugin module or
/// a host name a proxy cannot reach is still the proxy's to find).
pub fn validate(yaml: &str) -> Result<Validated, ConfigError> {
    let config = Config::from_yaml(yaml)?;
    let translation = translate(&config);
    nip_proxy::compile::check(&translation.bootstrap, &translation.resources)
        .map_err(|e| ConfigError::Invalid(vec![compile_error_field(&e)]))?;
    let mut notes = translation.not_applied;
    if config.control_plane.is_some() {
        notes.push(
            "control_plane: ignored in a config the control plane serves (it belongs in a \
             proxy's own file)"
                .to_string(),
        );
    }
    Ok(Validated { notes })
}

/// The v4 field a compiler error is about (the resource it names, by what the translation
/// makes of each part of the document), with the compiler's message.
fn compile_error_field(e: &nip_proxy::compile::CompileError) -> nip_xds::config::FieldError {
    let path = match e.kind {
        "Cluster" => format!("services.{}", e.name),
        "ClusterLoadAssignment" => format!("services.{}.endpoints", e.name),
        "Listener" => "api_gateway".to_string(),
        "RouteConfiguration" => "routes".to_string(),
        _ => String::new(),
    };
    nip_xds::config::FieldError {
        path,
        message: format!("the proxy's compiler refuses it: {e}"),
    }
}

/// Documents parsed and translated at once. Each runs on tokio's blocking pool, so a large
/// or hostile body never holds an async worker (the API, xDS streams and sync keep going),
/// and at most this many cores are spent on parsing.
const PARSE_CONCURRENCY: usize = 2;

static PARSING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PARSE_CONCURRENCY);

/// Runs config work off the async workers, [`PARSE_CONCURRENCY`] at a time.
async fn off_async_workers<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ConfigError> + Send + 'static,
) -> Result<T, ConfigError> {
    let _permit = PARSING.acquire().await;
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(ConfigError::Syntax(nip_xds::config::FieldError {
            path: String::new(),
            message: format!("the document could not be processed: {e}"),
        }))
    })
}

/// The `tenant.id` of a document (`None`: no tenant block, or no valid document), parsed on
/// the blocking pool like every document the API receives.
pub async fn tenant_of(yaml: String) -> Option<String> {
    off_async_workers(move || {
        Ok(Config::from_yaml(&yaml)
            .ok()
            .and_then(|c| c.tenant)
            .map(|t| t.id))
    })
    .await
    .ok()
    .flatten()
}

/// [`validate`] on the blocking pool, bounded (what the API and `apply` use).
pub async fn validate_bounded(yaml: String) -> Result<Validated, ConfigError> {
    off_async_workers(move || validate(&yaml)).await
}

/// The serving state of one revision, labelled with its version (parsed off the async
/// workers); a tenant whose admin requires signed plugins gets the keys added, so every
/// proxy refuses a module they did not sign; the CA's trust bundle goes with every state
/// as the SDS secret `ROOTCA`, and endpoints that are mesh proxies are reached over mesh
/// mutual TLS ([`nip_xds::mesh`]).
async fn state_of(
    revision: &Revision,
    plugin_keys: &BTreeMap<String, Vec<String>>,
    mesh: Arc<MeshState>,
    store: &Store,
) -> Result<CacheState, ConfigError> {
    let yaml = revision.yaml.clone();
    let version = revision.version.to_string();
    let plugin_keys = plugin_keys.clone();
    let modules = stored_modules_of(&yaml, store).await?;
    off_async_workers(move || {
        let config = Config::from_yaml(&yaml)?;
        let mut translation = translate(&config);
        if !modules.is_empty() {
            nip_xds::stored_modules::inline_stored_modules(&mut translation.resources, &modules)
                .map_err(|message| {
                    ConfigError::Invalid(vec![FieldError {
                        path: "plugins".to_string(),
                        message,
                    }])
                })?;
        }
        if let Some(keys) = config.tenant.as_ref().and_then(|t| plugin_keys.get(&t.id)) {
            nip_xds::translate::require_signed_plugins(&mut translation.resources, keys);
        }
        if let Some(pem) = &mesh.trust_bundle {
            translation
                .resources
                .secrets
                .push(nip_xds::secrets::trust_bundle(pem));
            nip_xds::mesh::reach_members_over_mtls(
                &mut translation.resources,
                &mesh.trust_domain,
                &mesh.members,
            );
            translation.resources.version = translation.resources.content_version();
        }
        Ok(CacheState::new(&version, &translation.resources))
    })
    .await
}

/// The modules of the store a document names (by digest), read from the store; one the
/// store does not have is an error naming the field.
async fn stored_modules_of(
    yaml: &str,
    store: &Store,
) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
    let yaml = yaml.to_string();
    let refs = off_async_workers(move || {
        Ok(nip_xds::stored_modules::stored_module_refs(
            &Config::from_yaml(&yaml)?,
        ))
    })
    .await?;
    let mut modules = BTreeMap::new();
    let mut missing = Vec::new();
    for (path, digest) in refs {
        match store.module(&digest).await {
            Ok(Some(bytes)) => {
                modules.insert(digest, bytes);
            }
            Ok(None) => missing.push(FieldError {
                path,
                message: format!(
                    "no plugin module {digest} in this control plane's store: upload it first \
                     (nip deploy does; PUT /v1/modules)"
                ),
            }),
            Err(e) => missing.push(FieldError {
                path,
                message: format!("cannot read module {digest} from the store: {e}"),
            }),
        }
    }
    if missing.is_empty() {
        Ok(modules)
    } else {
        Err(ConfigError::Invalid(missing))
    }
}

/// The mesh TLS `config` asks for, refused on a control plane without a CA (`--plaintext`):
/// no proxy could get the workload certificate or the trust bundle it needs.
pub fn mesh_without_ca(config: &Config) -> Vec<FieldError> {
    let why = "mesh mutual TLS needs the control plane's CA (it runs with --plaintext)";
    let listener = config
        .api_gateway
        .tls
        .mesh
        .then(|| "api_gateway.tls.mesh".to_string())
        .into_iter()
        .chain(
            config
                .sidecar
                .as_ref()
                .filter(|s| s.mesh)
                .map(|_| "sidecar.mesh".to_string()),
        );
    let services = config
        .services
        .iter()
        .filter(|(_, s)| s.tls.as_ref().is_some_and(|t| t.mesh))
        .map(|(name, _)| format!("services.{name}.tls.mesh"));
    listener
        .chain(services)
        .map(|path| FieldError {
            path,
            message: why.to_string(),
        })
        .collect()
}

/// The plugins of `config` that carry no signature while its tenant requires signed ones.
pub fn unsigned_plugins(config: &Config, required: bool) -> Vec<FieldError> {
    if !required {
        return Vec::new();
    }
    let tenant = config.tenant.as_ref().map_or("", |t| t.id.as_str());
    config
        .plugins
        .iter()
        .filter(|(_, plugin)| {
            plugin
                .source
                .as_ref()
                .is_some_and(|source| source.signature.is_none())
        })
        .map(|(name, _)| FieldError {
            path: format!("plugins.{name}.source.signature"),
            message: format!(
                "tenant {tenant} requires signed plugins: sign the module with one of its keys \
                 (ed25519, base64)"
            ),
        })
        .collect()
}

/// The store, what is served from it, and the proxies that are served.
#[derive(Debug)]
pub struct ConfigService {
    store: Store,
    cache: Arc<SnapshotCache>,
    registry: Arc<ProxyRegistry>,
    /// The store head the cache serves; `None` before the first sync.
    served: tokio::sync::Mutex<Option<Head>>,
    /// One change at a time per replica (validation to commit).
    changing: tokio::sync::Mutex<()>,
    /// The operator's rules for changes.
    policy: ChangePolicy,
    /// When the cache last changed.
    last_push: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// How many times the cache changed.
    pushes: std::sync::atomic::AtomicU64,
    /// What the CA adds to every state served: the trust bundle and the mesh's members.
    mesh: std::sync::Mutex<Arc<MeshState>>,
}

/// What the CA adds to every state served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshState {
    /// The CA's trust bundle (PEM), served to every proxy as the SDS secret `ROOTCA`.
    pub trust_bundle: Option<String>,
    /// The CA's trust domain.
    pub trust_domain: String,
    /// Certified proxies by node id, with the address each connects from: endpoints there
    /// (at the mesh listener's port) are reached over mesh mutual TLS.
    pub members: BTreeMap<String, std::net::IpAddr>,
}

impl ConfigService {
    /// A service over `store`, serving into `cache`, reading ACKs from `registry`.
    pub fn new(
        store: Store,
        cache: Arc<SnapshotCache>,
        registry: Arc<ProxyRegistry>,
        policy: ChangePolicy,
    ) -> Self {
        ConfigService {
            store,
            cache,
            registry,
            served: tokio::sync::Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
            policy,
            last_push: std::sync::Mutex::new(None),
            pushes: std::sync::atomic::AtomicU64::new(0),
            mesh: std::sync::Mutex::new(Arc::default()),
        }
    }

    /// Serves `pem` as the mesh's trust bundle (SDS secret `ROOTCA`) of `trust_domain`
    /// from now on; a changed bundle is pushed to every proxy even when the config did not
    /// change.
    pub async fn set_trust_bundle(&self, pem: &str, trust_domain: &str) -> Result<(), StoreError> {
        self.change_mesh(|mesh| {
            mesh.trust_bundle = Some(pem.to_string());
            mesh.trust_domain = trust_domain.to_string();
        })
        .await
    }

    /// Reaches `members` (certified node → address) over mesh mutual TLS from now on.
    pub async fn set_mesh_members(
        &self,
        members: BTreeMap<String, std::net::IpAddr>,
    ) -> Result<(), StoreError> {
        self.change_mesh(|mesh| mesh.members = members).await
    }

    async fn change_mesh(&self, change: impl FnOnce(&mut MeshState)) -> Result<(), StoreError> {
        {
            let mut mesh = self.mesh.lock().unwrap_or_else(|p| p.into_inner());
            let mut changed = MeshState::clone(&mesh);
            change(&mut changed);
            if changed == **mesh {
                return Ok(());
            }
            *mesh = Arc::new(changed);
        }
        *self.served.lock().await = None;
        self.sync().await
    }

    fn current_mesh(&self) -> Arc<MeshState> {
        Arc::clone(&self.mesh.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The store (for history and events).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every proxy that connected.
    pub fn registry(&self) -> &ProxyRegistry {
        &self.registry
    }

    /// How many times what is served has changed since start.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What is served now.
    pub fn views(&self) -> Arc<Views> {
        self.cache.views()
    }

    /// Serves the store's head if it is not served yet (a change here or by another
    /// replica), and aborts a canary whose deadline passed long ago.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let mut served = self.served.lock().await;
        let mut head = self.store.head().await?;
        if head.canary.is_some() && self.abort_abandoned().await? {
            head = self.store.head().await?;
        }
        if *served == Some(head) {
            return Ok(());
        }
        let current = self.store.current().await?;
        let canary = self.store.canary().await?;
        let plugin_keys = self.store.plugin_signing_all().await?;
        let mesh = self.current_mesh();
        let previous = self.cache.views();
        let default = match &current {
            Some(revision) => {
                match state_of(revision, &plugin_keys, Arc::clone(&mesh), &self.store).await {
                    Ok(state) => Arc::new(state),
                    Err(e) => {
                        tracing::error!(
                        version = revision.version,
                        "stored config no longer validates, still serving the previous one: {e}"
                    );
                        Arc::clone(&previous.default)
                    }
                }
            }
            None => Arc::new(CacheState::default()),
        };
        let mut by_region = BTreeMap::new();
        if let Some(revision) = &canary {
            match state_of(revision, &plugin_keys, Arc::clone(&mesh), &self.store).await {
                Ok(state) => {
                    let region = revision.canary_region.clone().unwrap_or_default();
                    by_region.insert(region, Arc::new(state));
                }
                Err(e) => tracing::error!(
                    version = revision.version,
                    "stored canary no longer validates, not served: {e}"
                ),
            }
        }
        self.cache.set_views(Views { default, by_region });
        *self.last_push.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now());
        self.pushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(active = ?head.active, canary = ?head.canary, "serving config");
        *served = Some(head);
        Ok(())
    }

    /// Aborts a canary whose deadline passed more than [`ABANDON_GRACE`] ago (the replica
    /// running it is gone); returns whether it aborted one.
    async fn abort_abandoned(&self) -> Result<bool, StoreError> {
        let Some(canary) = self.store.canary().await? else {
            return Ok(false);
        };
        let grace = i64::try_from(ABANDON_GRACE.as_millis()).unwrap_or(i64::MAX);
        let deadline = canary.canary_deadline_ms.unwrap_or(canary.created_at_ms);
        if now_ms() <= deadline.saturating_add(grace) {
            return Ok(false);
        }
        tracing::warn!(
            version = canary.version,
            "canary outlived its deadline (its control plane stopped); rolling it back"
        );
        self.store
            .abort(
                canary.version,
                CONTROL_PLANE_ACTOR,
                "abandoned: the rollout did not finish by its deadline",
            )
            .await?;
        Ok(true)
    }

    /// `sync` no sooner than [`PUSH_DEBOUNCE`] after the last push; changes stored
    /// meanwhile go out together.
    async fn sync_debounced(&self) -> Result<(), StoreError> {
        let last = *self.last_push.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = last {
            tokio::time::sleep_until(last + PUSH_DEBOUNCE).await;
        }
        self.sync().await
    }

    /// [`validate`], then this control plane's [`ChangePolicy`] and tenant policies.
    async fn check(&self, yaml: String, allow_empty: bool) -> Result<(), ConfigError> {
        let policy = self.policy.clone();
        let current = self.store.current().await.ok().flatten();
        let signing = self.store.plugin_signing_all().await.map_err(|e| {
            ConfigError::Syntax(FieldError {
                path: String::new(),
                message: format!("cannot read tenant policies: {e}"),
            })
        })?;
        let has_ca = self.current_mesh().trust_bundle.is_some();
        let document = yaml.clone();
        off_async_workers(move || {
            validate(&yaml)?;
            let config = Config::from_yaml(&yaml)?;
            let had_routes = current
                .and_then(|c| Config::from_yaml(&c.yaml).ok())
                .is_some_and(|c| !c.routes.is_empty());
            let mut problems = policy.problems(&config, had_routes, allow_empty);
            let signed = config
                .tenant
                .as_ref()
                .is_some_and(|t| signing.contains_key(&t.id));
            problems.extend(unsigned_plugins(&config, signed));
            if !has_ca {
                problems.extend(mesh_without_ca(&config));
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(ConfigError::Invalid(problems))
            }
        })
        .await?;
        stored_modules_of(&document, &self.store).await.map(drop)
    }

    /// Validates, stores and serves `change`; with a canary, waits for the region's
    /// proxies and promotes or rolls back.
    pub async fn apply(&self, change: Change) -> Result<Outcome, ChangeError> {
        let started = SystemTime::now();
        let revision = {
            let _one_change = self.changing.lock().await;
            let checked = self.check(change.yaml.clone(), change.allow_empty).await;
            if let Err(e) = checked {
                self.store
                    .record(&change.author, "refused", None, &e.to_string())
                    .await?;
                return Err(ChangeError::Invalid(e));
            }
            if change.canary.is_none() {
                if let Some(current) = self.store.current().await? {
                    if current.yaml == change.yaml && self.store.canary().await?.is_none() {
                        return Ok(Outcome::Unchanged(current));
                    }
                }
            }
            let deadline = change.canary.as_ref().map(|c| {
                now_ms().saturating_add(i64::try_from(c.timeout.as_millis()).unwrap_or(i64::MAX))
            });
            let revision = self
                .store
                .commit(NewRevision {
                    author: &change.author,
                    message: &change.message,
                    action: change.action,
                    restored_from: None,
                    canary: change
                        .canary
                        .as_ref()
                        .zip(deadline)
                        .map(|(c, d)| (c.region.as_str(), d)),
                    yaml: &change.yaml,
                })
                .await?;
            revision
        };
        match change.canary {
            None => {
                self.sync_debounced().await?;
                Ok(Outcome::Applied(revision))
            }
            Some(canary) => {
                self.sync().await?;
                self.finish_canary(revision, &canary, started).await
            }
        }
    }

    /// Waits for the canary region's verdict, then promotes or rolls back.
    async fn finish_canary(
        &self,
        revision: Revision,
        canary: &Canary,
        started: SystemTime,
    ) -> Result<Outcome, ChangeError> {
        let state = self.cache.views().by_region.get(&canary.region).cloned();
        let verdict = match state {
            Some(state) => self.region_verdict(&state, canary, started).await,
            None => Err("its config could not be served".to_string()),
        };
        let _one_change = self.changing.lock().await;
        match verdict {
            Ok(acked_by) => {
                self.store
                    .promote(revision.version, CONTROL_PLANE_ACTOR)
                    .await?;
                self.sync().await?;
                let revision = self.store.revision(revision.version).await?;
                tracing::info!(version = revision.version, region = %canary.region, "canary promoted");
                Ok(Outcome::Promoted { revision, acked_by })
            }
            Err(reason) => {
                self.store
                    .abort(revision.version, CONTROL_PLANE_ACTOR, &reason)
                    .await?;
                self.sync().await?;
                tracing::warn!(version = revision.version, region = %canary.region, "canary rolled back: {reason}");
                Err(ChangeError::CanaryFailed {
                    version: revision.version,
                    reason,
                })
            }
        }
    }

    /// Every connected proxy of the region ACKed `state` (their node ids), or why not.
    async fn region_verdict(
        &self,
        state: &CacheState,
        canary: &Canary,
        started: SystemTime,
    ) -> Result<Vec<String>, String> {
        let deadline = tokio::time::Instant::now() + canary.timeout;
        loop {
            let proxies: Vec<_> = self
                .registry
                .list()
                .into_iter()
                .filter(|p| p.connected && p.region == canary.region)
                .collect();
            if let Some((proxy, nack)) = proxies.iter().find_map(|p| {
                p.last_nack
                    .as_ref()
                    .filter(|n| n.at >= started)
                    .map(|n| (p, n))
            }) {
                return Err(format!(
                    "proxy {} NACKed {}: {}",
                    proxy.node_id, nack.type_url, nack.reason
                ));
            }
            let waiting: Vec<&str> = proxies
                .iter()
                .filter(|p| !state.is_acked_by(&p.acked))
                .map(|p| p.node_id.as_str())
                .collect();
            if !proxies.is_empty() && waiting.is_empty() {
                return Ok(proxies.into_iter().map(|p| p.node_id).collect());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(if proxies.is_empty() {
                    format!("no proxy of region {:?} is connected", canary.region)
                } else {
                    format!(
                        "no ACK within {} from {}",
                        humantime::format_duration(canary.timeout),
                        waiting.join(", ")
                    )
                });
            }
            tokio::time::sleep(CANARY_POLL).await;
        }
    }

    /// Restores `version`'s document as a new revision.
    pub async fn rollback(
        &self,
        version: i64,
        author: &str,
        message: &str,
    ) -> Result<Outcome, ChangeError> {
        let one_change = self.changing.lock().await;
        let target = self.store.revision(version).await?;
        if target.state != RevisionState::Active {
            return Err(ChangeError::Conflict(format!(
                "version {version} is {} and cannot be restored; apply its document again instead",
                match target.state {
                    RevisionState::Canary => "a canary in progress",
                    _ => "a rolled-back canary",
                }
            )));
        }
        // A version that was served once may restore an empty config on purpose; the
        // plugin hosts allowed now still apply.
        self.check(target.yaml.clone(), true)
            .await
            .map_err(ChangeError::Invalid)?;
        if let Some(current) = self.store.current().await? {
            if current.yaml == target.yaml {
                return Ok(Outcome::Unchanged(current));
            }
        }
        let revision = self
            .store
            .commit(NewRevision {
                author,
                message,
                action: RevisionAction::Rollback,
                restored_from: Some(version),
                canary: None,
                yaml: &target.yaml,
            })
            .await?;
        drop(one_change);
        self.sync_debounced().await?;
        Ok(Outcome::Applied(revision))
    }
}

#[cfg(test)]
mod tests;
