//! Plugins in the proxy: loading `envoy.extensions.filters.http.wasm.v3.Wasm` filters from
//! the listener, running them per worker thread, and driving a request through them.
//!
//! ```text
//! compile::prepare ──PluginSpec::decode, PluginLoader::load──▶ LoadedPlugin (compiled once
//!                                                          per content, canaried)
//! request ──chain::RequestPlugins──▶ runtime::PluginRuntime (thread-local instances)
//!                                     └─ callout::CalloutClient (proxy_http_call)
//! ```
//!
//! Loading happens off the request path before a snapshot is compiled: the module is read,
//! compiled (once per content, cached across reloads) and canaried — instantiated and
//! configured on a fresh instance — so a plugin that cannot start is a compile error and the
//! previous config keeps serving. Worker threads start their own instance on first use
//! (pingora runs without work stealing, so a request's plugin contexts stay on its thread);
//! a failed callback drops that thread's instance and the next request starts a fresh one.

pub mod callout;
pub mod chain;
pub mod fetch;
pub mod headers;
pub mod runtime;

use fetch::ModuleSource;

use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{plugin_config, FailurePolicy};
use envoy_types::pb::google::protobuf::{Any, BytesValue, StringValue};
use nip_filters::host::{NodeInfo, PluginIdentity};
use nip_filters::{PluginEngine, PluginInstance, PluginLimits, PluginModule};
use prost::{Message, Name};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Body bytes a plugin may hold while it pauses, unless its limits say otherwise (Envoy's
/// default buffer limit).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The resource ceilings of one plugin, as the listener's `nip.plugin_limits` metadata says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Memory and CPU of each instance.
    pub instance: PluginLimits,
    /// Body bytes the plugin may hold while it pauses.
    pub max_body_bytes: usize,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            instance: PluginLimits::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// A plugin version ready to run.
#[derive(Debug)]
pub struct LoadedPlugin {
    /// Plugin name.
    pub name: Arc<str>,
    /// Identifies this version (module bytes + configuration); thread-local instances are
    /// keyed by it, so a new version gets new instances.
    pub key: u64,
    /// The compiled module.
    pub module: PluginModule,
    /// Go on without the plugin when it fails (otherwise 503 `PF`).
    pub fail_open: bool,
    /// Body bytes the plugin may hold while it pauses a request or response.
    pub max_body_bytes: usize,
    /// The module file, watched for changes (none for downloaded modules).
    pub source_file: Option<PathBuf>,
    /// False once no configuration uses this version; its instances then wind down.
    live: Arc<AtomicBool>,
    /// What the plugin declared about itself, if it was built with an SDK.
    pub declaration: Option<nip_filters::sdk::Declaration>,
    /// Its last health and resource-usage reports (SDK plugins).
    pub status: Arc<Mutex<PluginStatus>>,
    /// Hex SHA-256 of the module's bytes: which build is serving (`nip dev` waits for it
    /// on the admin page after a rebuild).
    pub module_sha256: Arc<str>,
}

/// What an SDK plugin last reported, asked by the instance's background task.
#[derive(Debug, Clone, Default)]
pub struct PluginStatus {
    /// The health check's answer (`{ healthy, message? }`).
    pub health: Option<serde_json::Value>,
    /// The resource-usage answer (the plugin's own figures).
    pub usage: Option<serde_json::Value>,
    /// When it was asked.
    pub checked: Option<std::time::SystemTime>,
}

impl LoadedPlugin {
    /// Whether some loaded configuration still uses this version.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }
}

/// A compiled plugin version and whether a configuration still uses it.
#[derive(Clone)]
struct CachedModule {
    module: PluginModule,
    live: Arc<AtomicBool>,
    declaration: Option<nip_filters::sdk::Declaration>,
    status: Arc<Mutex<PluginStatus>>,
    module_sha256: Arc<str>,
}

/// Compiles plugins for snapshots, reusing modules whose bytes did not change.
pub struct PluginLoader {
    engine: PluginEngine,
    modules: Mutex<HashMap<u64, CachedModule>>,
    /// Where downloaded modules are kept, by digest.
    download_dir: Option<PathBuf>,
}

impl std::fmt::Debug for PluginLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginLoader")
    }
}

/// The bytes a configuration `Any` carries: a `StringValue`'s text, a `BytesValue`'s bytes,
/// or any other message's encoding. `field` names it in the error.
fn any_bytes(any: &Option<Any>, field: &str) -> Result<Vec<u8>, String> {
    let Some(any) = any else {
        return Ok(Vec::new());
    };
    let undecodable =
        |e: prost::DecodeError| format!("{field}: cannot decode {}: {e}", any.type_url);
    if any.type_url == StringValue::type_url() {
        StringValue::decode(any.value.as_slice())
            .map(|v| v.value.into_bytes())
            .map_err(undecodable)
    } else if any.type_url == BytesValue::type_url() {
        BytesValue::decode(any.value.as_slice())
            .map(|v| v.value)
            .map_err(undecodable)
    } else {
        Ok(any.value.clone())
    }
}

/// What a Wasm filter asks for, decoded and checked without touching the disk, the network
/// or wasmtime: what the compiler (and the control plane's check) sees of a plugin.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    config: envoy_types::pb::envoy::extensions::wasm::v3::PluginConfig,
    vm_id: String,
    source: ModuleSource,
    plugin_config: Vec<u8>,
    vm_config: Vec<u8>,
    fail_open: bool,
    signature: Option<SignatureCheck>,
}

/// A module that must be signed: the ed25519 keys it may be signed by, and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureCheck {
    /// Raw ed25519 public keys (32 bytes each).
    pub trusted_keys: Vec<Vec<u8>>,
    /// The module's signature (64 bytes).
    pub signature: Vec<u8>,
}

impl SignatureCheck {
    /// Whether one of the trusted keys signed `module`.
    pub fn verify(&self, module: &[u8]) -> Result<(), String> {
        use ring::signature::{UnparsedPublicKey, ED25519};
        let signed = self.trusted_keys.iter().any(|key| {
            UnparsedPublicKey::new(&ED25519, key)
                .verify(module, &self.signature)
                .is_ok()
        });
        if signed {
            Ok(())
        } else {
            Err("module signature: not signed by a key the tenant trusts".into())
        }
    }
}

impl PluginSpec {
    /// Requires the module to be signed (checked when it is loaded, before it is compiled).
    pub fn require_signature(mut self, check: SignatureCheck) -> PluginSpec {
        self.signature = Some(check);
        self
    }

    /// Decodes a Wasm filter's typed config; the error names the field.
    pub fn decode(any: &Any) -> Result<PluginSpec, String> {
        let wasm =
            Wasm::decode(any.value.as_slice()).map_err(|e| format!("cannot decode Wasm: {e}"))?;
        let config = wasm.config.ok_or("Wasm.config is missing")?;
        let Some(plugin_config::Vm::VmConfig(vm)) = &config.vm else {
            return Err("config.vm_config is missing".into());
        };
        let source = ModuleSource::from_code(vm.code.as_ref())?;
        let plugin_config = any_bytes(&config.configuration, "config.configuration")?;
        let vm_config = any_bytes(&vm.configuration, "vm_config.configuration")?;
        #[allow(deprecated)]
        let fail_open = config.fail_open || config.failure_policy == FailurePolicy::FailOpen as i32;
        Ok(PluginSpec {
            vm_id: vm.vm_id.clone(),
            config,
            source,
            plugin_config,
            vm_config,
            fail_open,
            signature: None,
        })
    }
}

impl PluginLoader {
    /// Starts the wasm engine; compiled code is cached in `cache_dir` across restarts.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, String> {
        Ok(PluginLoader {
            download_dir: cache_dir.as_ref().map(|dir| dir.join("modules")),
            engine: PluginEngine::new(cache_dir)?,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Loads the plugin `spec` describes, with `limits`, and canaries it on a fresh
    /// instance: reads (or downloads) the module and compiles it, unless this exact version
    /// is loaded already.
    pub fn load(
        &self,
        spec: &PluginSpec,
        node: &NodeInfo,
        limits: ResourceLimits,
    ) -> Result<LoadedPlugin, String> {
        let PluginSpec {
            config,
            vm_id,
            source,
            plugin_config,
            vm_config,
            fail_open,
            signature,
        } = spec;
        let fail_open = *fail_open;
        let bytes = source.read(self.download_dir.as_deref())?;
        if let Some(check) = signature {
            check.verify(&bytes)?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            &bytes,
            &plugin_config,
            &vm_config,
            &config.name,
            &config.root_id,
            vm_id,
            (&node.id, &node.region, &node.zone),
            fail_open,
            (
                limits.instance.memory_bytes,
                limits.instance.callback_deadline,
            ),
        )
            .hash(&mut hasher);
        let key = hasher.finish();
        let cached = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let cached = match cached {
            Some(cached) => cached,
            None => {
                let module = PluginModule::compile(
                    &self.engine,
                    PluginIdentity {
                        name: config.name.clone(),
                        root_id: config.root_id.clone(),
                        vm_id: vm_id.clone(),
                        vm_config: vm_config.clone(),
                        plugin_config: plugin_config.clone(),
                    },
                    node.clone(),
                    limits.instance,
                    &bytes,
                )
                .map_err(|e| e.to_string())?;
                // The canary: a fresh instance must start and accept its configuration
                // (an SDK plugin for another API version is refused here).
                let canary = PluginInstance::start(&module).map_err(|e| e.to_string())?;
                let cached = CachedModule {
                    module,
                    live: Arc::new(AtomicBool::new(true)),
                    declaration: canary.declaration().cloned(),
                    status: Arc::default(),
                    module_sha256: fetch::hex_sha256(&bytes).into(),
                };
                self.modules
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, cached.clone());
                cached
            }
        };
        Ok(LoadedPlugin {
            name: config.name.as_str().into(),
            key,
            module: cached.module,
            fail_open,
            max_body_bytes: limits.max_body_bytes,
            source_file: source.watched_file().map(PathBuf::from),
            live: cached.live,
            declaration: cached.declaration,
            status: cached.status,
            module_sha256: cached.module_sha256,
        })
    }

    /// Tells plugins which clusters `proxy_http_call` may reach; called once a
    /// configuration compiled, never for one that was refused.
    pub fn set_upstreams(&self, names: impl IntoIterator<Item = String>) {
        self.engine.shared().set_upstreams(names);
    }

    /// Whether `proxy_http_call` may reach `cluster` now.
    pub fn may_call(&self, cluster: &str) -> bool {
        self.engine.shared().has_upstream(cluster)
    }

    /// Plugin-defined metrics in Prometheus text: `nip_plugin_metric{plugin,name,kind}`
    /// (histograms: the sum, with `nip_plugin_metric_count` beside it).
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let metrics = self.engine.shared().metrics();
        if metrics.is_empty() {
            return String::new();
        }
        let escape = |s: &str| {
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        let mut out = String::from(
            "# HELP nip_plugin_metric Metrics plugins define (proxy_define_metric); histograms show their sum\n# TYPE nip_plugin_metric gauge\n",
        );
        for m in &metrics {
            let kind = match m.kind {
                nip_filters::shared::MetricKind::Counter => "counter",
                nip_filters::shared::MetricKind::Gauge => "gauge",
                nip_filters::shared::MetricKind::Histogram => "histogram",
            };
            let _ = writeln!(
                out,
                "nip_plugin_metric{{plugin=\"{}\",name=\"{}\",kind=\"{kind}\"}} {}",
                escape(&m.plugin),
                escape(&m.name),
                m.get()
            );
        }
        out.push_str("# HELP nip_plugin_metric_count Observations of plugin histograms\n# TYPE nip_plugin_metric_count gauge\n");
        for m in metrics
            .iter()
            .filter(|m| m.kind == nip_filters::shared::MetricKind::Histogram)
        {
            let _ = writeln!(
                out,
                "nip_plugin_metric_count{{plugin=\"{}\",name=\"{}\"}} {}",
                escape(&m.plugin),
                escape(&m.name),
                m.count.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        out
    }

    /// Forgets compiled modules no live snapshot uses; their instances on worker threads
    /// wind down.
    pub fn retain(&self, live: &[u64]) {
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, cached| {
                let keep = live.contains(key);
                if !keep {
                    cached.live.store(false, Ordering::Relaxed);
                }
                keep
            });
    }
}
