//! Plugins in the proxy: loading `envoy.extensions.filters.http.wasm.v3.Wasm` filters from
//! the listener, one VM per plugin version per worker thread, and moving a request's headers
//! in and out of a plugin.
//!
//! Loading happens on the control thread when a snapshot is compiled: the module is read,
//! compiled (once per content, cached across reloads) and canaried — instantiated and
//! configured on a fresh instance — so a plugin that cannot start is a compile error and the
//! previous config keeps serving. Worker threads start their own instance on first use
//! (pingora runs without work stealing, so a request's plugin contexts stay on its thread);
//! a failed callback drops that thread's instance and the next request starts a fresh one.

use crate::metrics::Metrics;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{plugin_config, FailurePolicy};
use envoy_types::pb::google::protobuf::{Any, BytesValue, StringValue};
use nip_filters::abi::Pairs;
use nip_filters::host::{NodeInfo, PluginIdentity};
use nip_filters::{PluginEngine, PluginError, PluginInstance, PluginLimits, PluginModule};
use pingora::http::{RequestHeader, ResponseHeader};
use prost::{Message, Name};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A thread's instance unused this long is dropped (old plugin versions after a reload).
const IDLE_INSTANCE: Duration = Duration::from_secs(60);

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
    /// The module file, watched for changes.
    pub source_file: PathBuf,
}

/// Compiles plugins for snapshots, reusing modules whose bytes did not change.
pub struct PluginLoader {
    engine: PluginEngine,
    modules: Mutex<HashMap<u64, PluginModule>>,
}

impl std::fmt::Debug for PluginLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginLoader")
    }
}

fn any_bytes(any: &Option<Any>) -> Vec<u8> {
    let Some(any) = any else {
        return Vec::new();
    };
    if any.type_url == StringValue::type_url() {
        StringValue::decode(any.value.as_slice())
            .map(|v| v.value.into_bytes())
            .unwrap_or_default()
    } else if any.type_url == BytesValue::type_url() {
        BytesValue::decode(any.value.as_slice())
            .map(|v| v.value)
            .unwrap_or_default()
    } else {
        any.value.clone()
    }
}

impl PluginLoader {
    /// Starts the wasm engine; compiled code is cached in `cache_dir` across restarts.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, String> {
        Ok(PluginLoader {
            engine: PluginEngine::new(cache_dir)?,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Loads the plugin a Wasm filter describes, and canaries it on a fresh instance.
    pub fn load(&self, any: &Any, node: &NodeInfo) -> Result<LoadedPlugin, String> {
        let wasm =
            Wasm::decode(any.value.as_slice()).map_err(|e| format!("cannot decode Wasm: {e}"))?;
        let config = wasm.config.ok_or("Wasm.config is missing")?;
        let Some(plugin_config::Vm::VmConfig(vm)) = &config.vm else {
            return Err("config.vm_config is missing".into());
        };
        let file = match vm.code.as_ref().and_then(|c| c.specifier.as_ref()) {
            Some(
                envoy_types::pb::envoy::config::core::v3::async_data_source::Specifier::Local(
                    local,
                ),
            ) => match &local.specifier {
                Some(
                    envoy_types::pb::envoy::config::core::v3::data_source::Specifier::Filename(f),
                ) => f.clone(),
                _ => return Err("vm_config.code.local must be a filename".into()),
            },
            _ => return Err("vm_config.code must be local (remote code comes later)".into()),
        };
        let bytes =
            std::fs::read(&file).map_err(|e| format!("cannot read plugin module {file:?}: {e}"))?;
        let plugin_config = any_bytes(&config.configuration);
        let vm_config = any_bytes(&vm.configuration);
        #[allow(deprecated)]
        let fail_open = config.fail_open || config.failure_policy == FailurePolicy::FailOpen as i32;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            &bytes,
            &plugin_config,
            &vm_config,
            &config.name,
            &vm.vm_id,
            fail_open,
        )
            .hash(&mut hasher);
        let key = hasher.finish();
        let cached = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let module = match cached {
            Some(module) => module,
            None => {
                let module = PluginModule::compile(
                    &self.engine,
                    PluginIdentity {
                        name: config.name.clone(),
                        root_id: config.root_id.clone(),
                        vm_id: vm.vm_id.clone(),
                        vm_config,
                        plugin_config,
                    },
                    node.clone(),
                    PluginLimits::default(),
                    &bytes,
                )
                .map_err(|e| e.to_string())?;
                // The canary: a fresh instance must start and accept its configuration.
                PluginInstance::start(&module).map_err(|e| e.to_string())?;
                self.modules
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, module.clone());
                module
            }
        };
        Ok(LoadedPlugin {
            name: config.name.as_str().into(),
            key,
            module,
            fail_open,
            source_file: PathBuf::from(file),
        })
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

    /// Forgets compiled modules no live snapshot uses.
    pub fn retain(&self, live: &[u64]) {
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, _| live.contains(key));
    }
}

/// Failures in a row a thread tolerates before it backs off restarting a plugin.
const QUICK_RESTARTS: u32 = 3;
/// Longest back-off between restarts of a crash-looping plugin.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A thread's running instances, and the back-off of plugins that keep failing.
#[derive(Default)]
struct ThreadPlugins {
    instances: HashMap<u64, (PluginInstance, Instant)>,
    /// Consecutive failures and the time before which no restart is tried.
    backoff: HashMap<u64, (u32, Instant)>,
}

thread_local! {
    static PLUGINS: RefCell<ThreadPlugins> = RefCell::new(ThreadPlugins::default());
}

/// The back-off after `failures` failures in a row: none for the first few, then doubling
/// from 10 ms up to [`MAX_BACKOFF`].
fn backoff_after(failures: u32) -> Duration {
    if failures < QUICK_RESTARTS {
        return Duration::ZERO;
    }
    let exponent = (failures - QUICK_RESTARTS).min(20);
    Duration::from_millis(10u64 << exponent).min(MAX_BACKOFF)
}

/// Runs `call` on this thread's instance of `plugin`, starting one if needed. A failure
/// drops the instance (the next call starts a fresh one) and is counted; a plugin that keeps
/// failing is restarted with exponential back-off, failing requests per its policy meanwhile.
pub fn with_instance<T>(
    plugin: &LoadedPlugin,
    metrics: &Metrics,
    call: impl FnOnce(&mut PluginInstance) -> Result<T, PluginError>,
) -> Result<T, PluginError> {
    PLUGINS.with(|cell| {
        let mut plugins = cell.borrow_mut();
        let ThreadPlugins { instances, backoff } = &mut *plugins;
        let now = Instant::now();
        let failed = |backoff: &mut HashMap<u64, (u32, Instant)>, e: &PluginError| {
            metrics.plugin_failure(&plugin.name);
            let entry = backoff.entry(plugin.key).or_insert((0, now));
            entry.0 = entry.0.saturating_add(1);
            entry.1 = now + backoff_after(entry.0);
            tracing::warn!(
                "{e}; the plugin instance is replaced (failure {} in a row)",
                entry.0
            );
        };
        if !instances.contains_key(&plugin.key) {
            if let Some((failures, until)) = backoff.get(&plugin.key) {
                if now < *until {
                    metrics.plugin_failure(&plugin.name);
                    return Err(PluginError::Start {
                        plugin: plugin.name.to_string(),
                        reason: format!("backing off after {failures} failures in a row"),
                    });
                }
            }
            instances.retain(|_, (_, used)| now.duration_since(*used) < IDLE_INSTANCE);
            metrics.plugin_instance_start(&plugin.name);
            match PluginInstance::start(&plugin.module) {
                Ok(instance) => {
                    instances.insert(plugin.key, (instance, now));
                }
                Err(e) => {
                    failed(backoff, &e);
                    return Err(e);
                }
            }
        }
        let Some((instance, used)) = instances.get_mut(&plugin.key) else {
            return Err(PluginError::Start {
                plugin: plugin.name.to_string(),
                reason: "instance vanished".into(),
            });
        };
        *used = now;
        let result = call(instance);
        match &result {
            Ok(_) => {
                backoff.remove(&plugin.key);
            }
            Err(e) => {
                instances.remove(&plugin.key);
                failed(backoff, e);
            }
        }
        result
    })
}

/// The request head as plugins see it: pseudo-headers first, names in lower case.
pub fn request_pairs(request: &RequestHeader, scheme: &str) -> Pairs {
    let authority = request
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut pairs = Vec::with_capacity(request.headers.len() + 4);
    pairs.push((":method".to_string(), request.method.as_str().to_string()));
    pairs.push((
        ":path".to_string(),
        request
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
    ));
    pairs.push((":authority".to_string(), authority));
    pairs.push((":scheme".to_string(), scheme.to_string()));
    for (name, value) in &request.headers {
        if name == http::header::HOST {
            continue;
        }
        pairs.push((
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    }
    pairs
}

/// Writes a plugin's edited request head back; bad names or values are skipped and logged.
pub fn apply_request_pairs(request: &mut RequestHeader, pairs: &Pairs) {
    let names: Vec<http::HeaderName> = request.headers.keys().cloned().collect();
    for name in names {
        request.remove_header(&name);
    }
    for (name, value) in pairs {
        let result = match name.as_str() {
            ":method" => http::Method::from_bytes(value.as_bytes())
                .map(|m| request.set_method(m))
                .map_err(|e| e.to_string()),
            ":path" => value
                .parse::<http::Uri>()
                .map(|uri| request.set_uri(uri))
                .map_err(|e| e.to_string()),
            ":authority" => request
                .insert_header(http::header::HOST, value.as_str())
                .map_err(|e| e.to_string()),
            ":scheme" => Ok(()),
            _ => request
                .append_header(name.clone(), value.as_str())
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!("plugin set an invalid request header {name:?}: {e}");
        }
    }
}

/// The response head as plugins see it.
pub fn response_pairs(response: &ResponseHeader) -> Pairs {
    let mut pairs = Vec::with_capacity(response.headers.len() + 1);
    pairs.push((":status".to_string(), response.status.as_u16().to_string()));
    for (name, value) in &response.headers {
        pairs.push((
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    }
    pairs
}

/// Writes a plugin's edited response head back.
pub fn apply_response_pairs(response: &mut ResponseHeader, pairs: &Pairs) {
    let names: Vec<http::HeaderName> = response.headers.keys().cloned().collect();
    for name in names {
        response.remove_header(&name);
    }
    for (name, value) in pairs {
        let result = if name == ":status" {
            value
                .parse::<u16>()
                .map_err(|e| e.to_string())
                .and_then(|s| response.set_status(s).map_err(|e| e.to_string()))
        } else {
            response
                .append_header(name.clone(), value.as_str())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if let Err(e) = result {
            tracing::warn!("plugin set an invalid response header {name:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_after_a_few_quick_restarts_and_is_capped() {
        assert_eq!(backoff_after(0), Duration::ZERO);
        assert_eq!(backoff_after(2), Duration::ZERO);
        assert_eq!(backoff_after(3), Duration::from_millis(10));
        assert_eq!(backoff_after(4), Duration::from_millis(20));
        assert_eq!(backoff_after(100), MAX_BACKOFF);
    }
}
