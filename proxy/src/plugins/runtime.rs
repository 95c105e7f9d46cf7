//! Plugin instances on worker threads, and the work they do outside requests.
//!
//! Each worker thread keeps one instance per plugin version, started on first use (pingora
//! runs without work stealing, so a request — and every task it spawns — stays on its
//! thread). A context remembers the *generation* of the instance it was created in; if that
//! instance failed meanwhile (another request trapped it), later callbacks for the context
//! fail instead of reaching a fresh instance that never heard of it.
//!
//! Next to every instance runs a small task on the same thread: it fires `on_tick` at the
//! period the plugin asked for, calls `on_queue_ready` when a queue the instance registered
//! gets an item, and performs callouts made outside a waiting request (from ticks, from the
//! response phase) and delivers their answers. It ends when its instance is replaced or its
//! plugin version is no longer configured.

use super::callout::{CalloutClient, ClusterLookup};
use super::LoadedPlugin;
use crate::telemetry::metrics::Metrics;
use nip_filters::host::{Callout, CalloutResponse};
use nip_filters::{PluginError, PluginInstance};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Failures in a row a thread tolerates before it backs off restarting a plugin.
const QUICK_RESTARTS: u32 = 3;
/// Longest back-off between restarts of a crash-looping plugin.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often an instance's background task checks for retirement when nothing else wakes it.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How often an SDK plugin is asked for its health and resource usage (first at start).
const HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// Plugin version keys are already hashes (of the module and its configuration): a map
/// keyed by them needs no second hash, which SipHash would cost on every callback.
#[derive(Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

/// A map keyed by plugin version.
type ByVersion<V> = HashMap<u64, V, BuildHasherDefault<KeyIsHash>>;

/// One instance on this thread and the plugin version it runs.
struct Running {
    instance: PluginInstance,
    plugin: Arc<LoadedPlugin>,
}

/// A thread's running instances, and the back-off of plugins that keep failing.
#[derive(Default)]
struct ThreadPlugins {
    instances: ByVersion<Running>,
    /// Consecutive failures and the time before which no restart is tried.
    backoff: ByVersion<(u32, Instant)>,
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

/// Whether this thread is waiting before it restarts the plugin version `key`.
fn in_backoff(key: u64) -> bool {
    PLUGINS.with(|cell| {
        cell.borrow()
            .backoff
            .get(&key)
            .is_some_and(|(_, until)| Instant::now() < *until)
    })
}

/// Runs plugin callbacks on this thread's instances and performs their callouts.
pub struct PluginRuntime {
    metrics: Arc<Metrics>,
    callouts: CalloutClient,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginRuntime")
    }
}

impl PluginRuntime {
    /// A runtime whose callouts reach the clusters `clusters` finds.
    pub fn new(metrics: Arc<Metrics>, clusters: ClusterLookup) -> Arc<Self> {
        Arc::new(PluginRuntime {
            metrics,
            callouts: CalloutClient::new(clusters),
        })
    }

    /// Runs `call` on this thread's instance of `plugin`, starting one if needed, and returns
    /// the instance's generation with the result. A failure drops the instance (the next call
    /// starts a fresh one) and is counted; a plugin that keeps failing is restarted with
    /// exponential back-off, failing requests per its policy meanwhile.
    pub fn with_instance<T>(
        self: &Arc<Self>,
        plugin: &Arc<LoadedPlugin>,
        call: impl FnOnce(&mut PluginInstance) -> Result<T, PluginError>,
    ) -> Result<(T, u64), PluginError> {
        let started = PLUGINS.with(|cell| {
            let mut plugins = cell.borrow_mut();
            if plugins.instances.contains_key(&plugin.key) {
                return Ok(None);
            }
            let now = Instant::now();
            if let Some((failures, until)) = plugins.backoff.get(&plugin.key) {
                if now < *until {
                    self.metrics.plugin_failure(&plugin.name);
                    return Err(PluginError::Start {
                        plugin: plugin.name.to_string(),
                        reason: format!("backing off after {failures} failures in a row"),
                    });
                }
            }
            plugins.instances.retain(|_, r| r.plugin.is_live());
            self.metrics.plugin_instance_start(&plugin.name);
            match PluginInstance::start(&plugin.module) {
                Ok(instance) => {
                    let started = (instance.generation(), instance.queue_wake());
                    plugins.instances.insert(
                        plugin.key,
                        Running {
                            instance,
                            plugin: Arc::clone(plugin),
                        },
                    );
                    Ok(Some(started))
                }
                Err(e) => {
                    self.failed(&mut plugins, plugin, &e);
                    Err(e)
                }
            }
        })?;
        if let Some((generation, wake)) = started {
            self.spawn_background(Arc::clone(plugin), generation, wake);
        }
        self.run(plugin, None, call)
    }

    /// Runs `call` on the instance a context was created in (`generation`); fails when that
    /// instance is gone, since a fresh one would not know the context.
    pub fn with_context<T>(
        &self,
        plugin: &Arc<LoadedPlugin>,
        generation: u64,
        call: impl FnOnce(&mut PluginInstance) -> Result<T, PluginError>,
    ) -> Result<T, PluginError> {
        self.run(plugin, Some(generation), call)
            .map(|(value, _)| value)
    }

    fn run<T>(
        &self,
        plugin: &Arc<LoadedPlugin>,
        generation: Option<u64>,
        call: impl FnOnce(&mut PluginInstance) -> Result<T, PluginError>,
    ) -> Result<(T, u64), PluginError> {
        PLUGINS.with(|cell| {
            let mut plugins = cell.borrow_mut();
            let running = plugins
                .instances
                .get_mut(&plugin.key)
                .filter(|r| generation.is_none_or(|g| r.instance.generation() == g))
                .ok_or_else(|| PluginError::Start {
                    plugin: plugin.name.to_string(),
                    reason: "the instance this request started in was replaced".into(),
                })?;
            let current = running.instance.generation();
            let result = call(&mut running.instance);
            match &result {
                Ok(_) => {
                    plugins.backoff.remove(&plugin.key);
                }
                Err(e) => {
                    plugins.instances.remove(&plugin.key);
                    self.failed(&mut plugins, plugin, e);
                }
            }
            result.map(|value| (value, current))
        })
    }

    /// Counts a failure and extends the plugin's back-off on this thread.
    fn failed(&self, plugins: &mut ThreadPlugins, plugin: &LoadedPlugin, e: &PluginError) {
        self.metrics.plugin_failure(&plugin.name);
        let now = Instant::now();
        let entry = plugins.backoff.entry(plugin.key).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now + backoff_after(entry.0);
        tracing::warn!(
            "{e}; the plugin instance is replaced (failure {} in a row)",
            entry.0
        );
    }

    /// Performs a callout (used by requests that wait for the answer).
    pub async fn call(&self, callout: &Callout) -> CalloutResponse {
        self.callouts.call(callout).await
    }

    /// Performs callouts nobody waits for, each in its own task on this thread, and delivers
    /// the answers to the instance `generation` (dropped if it is gone by then).
    pub fn dispatch(
        self: &Arc<Self>,
        plugin: &Arc<LoadedPlugin>,
        generation: u64,
        callouts: Vec<Callout>,
    ) {
        if callouts.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(plugin = %plugin.name, "callouts dropped: no runtime on this thread");
            return;
        };
        for callout in callouts {
            let runtime = Arc::clone(self);
            let plugin = Arc::clone(plugin);
            handle.spawn(async move {
                let response = runtime.call(&callout).await;
                let more = runtime.with_context(&plugin, generation, |vm| {
                    vm.on_http_call_response(callout.token, response, None)?;
                    Ok(vm.take_callouts())
                });
                if let Ok(more) = more {
                    runtime.dispatch(&plugin, generation, more);
                }
            });
        }
    }

    /// Starts the task that drives an instance's ticks and queues, on this thread.
    fn spawn_background(
        self: &Arc<Self>,
        plugin: Arc<LoadedPlugin>,
        generation: u64,
        wake: Arc<tokio::sync::Notify>,
    ) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let runtime = Arc::clone(self);
        handle.spawn(async move { runtime.background(plugin, generation, wake).await });
    }

    async fn background(
        self: Arc<Self>,
        plugin: Arc<LoadedPlugin>,
        generation: u64,
        wake: Arc<tokio::sync::Notify>,
    ) {
        let mut next_tick: Option<Instant> = None;
        let mut next_health = plugin.declaration.is_some().then(Instant::now);
        loop {
            if next_health.is_some_and(|at| Instant::now() >= at) {
                self.check_health(&plugin, generation);
                next_health = Some(Instant::now() + HEALTH_INTERVAL);
            }
            if !plugin.is_live() {
                // The version was replaced by a reload: free the instance on this thread.
                PLUGINS.with(|cell| {
                    let mut plugins = cell.borrow_mut();
                    if plugins
                        .instances
                        .get(&plugin.key)
                        .is_some_and(|r| r.instance.generation() == generation)
                    {
                        plugins.instances.remove(&plugin.key);
                    }
                });
                return;
            }
            let Ok(period) = self.with_context(&plugin, generation, |vm| Ok(vm.tick_period()))
            else {
                return;
            };
            let now = Instant::now();
            next_tick = match (period, next_tick) {
                (Some(period), None) => Some(now + period),
                (Some(_), Some(at)) => Some(at),
                (None, _) => None,
            };
            let wait = next_tick
                .into_iter()
                .chain(next_health)
                .min()
                .map_or(IDLE_CHECK, |at| at.saturating_duration_since(now));
            tokio::select! {
                _ = tokio::time::sleep(wait.min(IDLE_CHECK)) => {}
                _ = wake.notified() => {}
            }
            let due = next_tick.is_some_and(|at| Instant::now() >= at);
            let result = self.with_context(&plugin, generation, |vm| {
                if due {
                    vm.on_tick()?;
                }
                for queue in vm.ready_queues() {
                    vm.on_queue_ready(queue)?;
                }
                Ok(vm.take_callouts())
            });
            match result {
                Ok(callouts) => self.dispatch(&plugin, generation, callouts),
                Err(_) => {
                    // The instance failed (already counted); start its replacement once the
                    // back-off allows, so ticks go on without waiting for traffic. The
                    // replacement's own task takes over from there.
                    while plugin.is_live() {
                        if !in_backoff(plugin.key) {
                            let _ = self.with_instance(&plugin, |_| Ok(()));
                            return;
                        }
                        tokio::time::sleep(IDLE_CHECK).await;
                    }
                    return;
                }
            }
            if due {
                next_tick = period.map(|p| Instant::now() + p);
            }
        }
    }
}

impl PluginRuntime {
    /// Asks an SDK plugin's instance for its health and resource usage; records them on
    /// the plugin version and in `nip_plugin_healthy`.
    fn check_health(&self, plugin: &Arc<LoadedPlugin>, generation: u64) {
        let reports = self.with_context(plugin, generation, |vm| {
            Ok((
                vm.sdk_report(nip_filters::sdk::HEALTH_CHECK)?,
                vm.sdk_report(nip_filters::sdk::RESOURCE_USAGE)?,
            ))
        });
        let Ok((health, usage)) = reports else {
            return;
        };
        let parse = |bytes: Option<Vec<u8>>| {
            bytes.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        };
        let (health, usage) = (parse(health), parse(usage));
        let healthy = health
            .as_ref()
            .and_then(|h| h.get("healthy"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        self.metrics.plugin_health(&plugin.name, healthy);
        let mut status = plugin.status.lock().unwrap_or_else(|p| p.into_inner());
        *status = super::PluginStatus {
            health,
            usage,
            checked: Some(std::time::SystemTime::now()),
        };
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
