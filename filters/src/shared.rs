//! State plugins share across instances (and so across worker threads): key-value data
//! with compare-and-swap, and the metrics plugins define.
//!
//! One [`SharedState`] belongs to the engine. Shared data is scoped by VM id, as in Envoy:
//! every instance of the same plugin sees the same keys. Metrics are scoped by plugin name,
//! so the proxy can export them with a `plugin` label.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Why a shared-data write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// The caller's CAS token is stale.
    CasMismatch,
}

/// The kind of a plugin metric (ABI: COUNTER 0, GAUGE 1, HISTOGRAM 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Set to a value.
    Gauge,
    /// Records values; exported as sum and count.
    Histogram,
}

impl MetricKind {
    /// Decodes the ABI value.
    pub fn from_raw(raw: i32) -> Option<Self> {
        match raw {
            0 => Some(MetricKind::Counter),
            1 => Some(MetricKind::Gauge),
            2 => Some(MetricKind::Histogram),
            _ => None,
        }
    }
}

/// One metric a plugin defined.
#[derive(Debug)]
pub struct PluginMetric {
    /// Plugin that defined it.
    pub plugin: String,
    /// Name the plugin gave.
    pub name: String,
    /// Kind.
    pub kind: MetricKind,
    /// Counter/gauge value, or histogram sum.
    pub value: AtomicI64,
    /// Histogram observations.
    pub count: AtomicU64,
}

/// Shared values by (VM id, key): the bytes and their CAS token.
type SharedData = HashMap<(String, String), (Vec<u8>, u32)>;

/// Shared data and metrics of all plugin instances of one engine.
#[derive(Debug, Default)]
pub struct SharedState {
    data: Mutex<SharedData>,
    metrics: RwLock<Vec<Arc<PluginMetric>>>,
    metric_ids: Mutex<HashMap<(String, String), u32>>,
}

impl SharedState {
    /// Reads a key: its value and CAS token.
    pub fn get(&self, vm: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(vm.to_string(), key.to_string()))
            .cloned()
    }

    /// Writes a key; with `cas != 0` only if the token still matches.
    pub fn set(&self, vm: &str, key: &str, value: Vec<u8>, cas: u32) -> Result<(), SetError> {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let entry = data
            .entry((vm.to_string(), key.to_string()))
            .or_insert_with(|| (Vec::new(), 0));
        if cas != 0 && cas != entry.1 {
            return Err(SetError::CasMismatch);
        }
        entry.0 = value;
        // Tokens start at 1 so that 0 keeps meaning "no check".
        entry.1 = entry.1.wrapping_add(1).max(1);
        Ok(())
    }

    /// Defines (or finds) a metric; the same plugin and name always get the same id.
    pub fn define_metric(&self, plugin: &str, name: &str, kind: MetricKind) -> u32 {
        let mut ids = self.metric_ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = ids.get(&(plugin.to_string(), name.to_string())) {
            return *id;
        }
        let mut metrics = self.metrics.write().unwrap_or_else(|p| p.into_inner());
        let id = metrics.len() as u32;
        metrics.push(Arc::new(PluginMetric {
            plugin: plugin.to_string(),
            name: name.to_string(),
            kind,
            value: AtomicI64::new(0),
            count: AtomicU64::new(0),
        }));
        ids.insert((plugin.to_string(), name.to_string()), id);
        id
    }

    /// A metric by id.
    pub fn metric(&self, id: u32) -> Option<Arc<PluginMetric>> {
        self.metrics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id as usize)
            .cloned()
    }

    /// Every metric, for export.
    pub fn metrics(&self) -> Vec<Arc<PluginMetric>> {
        self.metrics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl PluginMetric {
    /// Adds to a counter or gauge.
    pub fn increment(&self, delta: i64) {
        self.value.fetch_add(delta, Ordering::Relaxed);
    }

    /// Sets a gauge, or records a histogram value.
    pub fn record(&self, value: i64) {
        match self.kind {
            MetricKind::Histogram => {
                self.value.fetch_add(value, Ordering::Relaxed);
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.value.store(value, Ordering::Relaxed),
        }
    }

    /// The current value (histograms: the sum).
    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_protects_concurrent_writers() {
        let shared = SharedState::default();
        assert!(shared.get("vm", "k").is_none());
        shared.set("vm", "k", b"1".to_vec(), 0).unwrap();
        let (value, cas) = shared.get("vm", "k").unwrap();
        assert_eq!(value, b"1");
        shared.set("vm", "k", b"2".to_vec(), cas).unwrap();
        assert_eq!(
            shared.set("vm", "k", b"3".to_vec(), cas),
            Err(SetError::CasMismatch)
        );
        assert!(
            shared.get("other-vm", "k").is_none(),
            "data is scoped by VM id"
        );
    }

    #[test]
    fn metrics_are_defined_once_per_plugin_and_name() {
        let shared = SharedState::default();
        let a = shared.define_metric("p", "hits", MetricKind::Counter);
        assert_eq!(shared.define_metric("p", "hits", MetricKind::Counter), a);
        let b = shared.define_metric("q", "hits", MetricKind::Counter);
        assert_ne!(a, b);
        shared.metric(a).unwrap().increment(2);
        assert_eq!(shared.metric(a).unwrap().get(), 2);
        let h = shared.define_metric("p", "size", MetricKind::Histogram);
        shared.metric(h).unwrap().record(10);
        shared.metric(h).unwrap().record(5);
        assert_eq!(shared.metric(h).unwrap().get(), 15);
        assert_eq!(shared.metric(h).unwrap().count.load(Ordering::Relaxed), 2);
    }
}
