//! State plugins share across instances (and so across worker threads): key-value data
//! with compare-and-swap, shared queues, the metrics plugins define, and the names of the
//! upstreams `proxy_http_call` may reach.
//!
//! One [`SharedState`] belongs to the engine. Shared data and queues are scoped by VM id, as
//! in Envoy: every instance of the same plugin sees the same keys and queues. Metrics are
//! scoped by plugin name, so the proxy can export them with a `plugin` label.
//!
//! A queue wakes the instances that registered it: each instance has a [`Notify`] that its
//! worker's background task waits on, and an enqueue notifies every live registrant (the
//! first to dequeue gets the item; the others find the queue empty).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use tokio::sync::Notify;

/// Items a queue holds; past this an enqueue drops the oldest item, so a queue nobody drains
/// cannot grow without bound (SDKs treat any enqueue status but OK/NOT_FOUND as fatal).
pub const QUEUE_CAPACITY: usize = 10_000;

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

/// Why a queue operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// No queue has this token.
    NotFound,
    /// Nothing to dequeue.
    Empty,
}

/// One shared queue.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Vec<u8>>,
    /// The instances that registered the queue and want `on_queue_ready`.
    waiters: Vec<Weak<Notify>>,
}

/// Queues by token, and tokens by (VM id, name).
#[derive(Debug, Default)]
struct Queues {
    tokens: HashMap<(String, String), u32>,
    queues: Vec<Queue>,
}

/// Shared data, queues and metrics of all plugin instances of one engine.
#[derive(Debug, Default)]
pub struct SharedState {
    data: Mutex<SharedData>,
    queues: Mutex<Queues>,
    metrics: RwLock<Vec<Arc<PluginMetric>>>,
    metric_ids: Mutex<HashMap<(String, String), u32>>,
    upstreams: RwLock<HashSet<String>>,
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

    /// Registers (or finds) the queue `name` of `vm` and subscribes `waiter` to it; returns
    /// its token. Tokens start at 1.
    pub fn register_queue(&self, vm: &str, name: &str, waiter: &Arc<Notify>) -> u32 {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let Queues { tokens, queues } = &mut *queues;
        let token = *tokens
            .entry((vm.to_string(), name.to_string()))
            .or_insert_with(|| {
                queues.push(Queue::default());
                queues.len() as u32
            });
        if let Some(queue) = queues.get_mut(token as usize - 1) {
            queue.waiters.retain(|w| w.strong_count() > 0);
            if !queue
                .waiters
                .iter()
                .any(|w| w.ptr_eq(&Arc::downgrade(waiter)))
            {
                queue.waiters.push(Arc::downgrade(waiter));
            }
        }
        token
    }

    /// The token of an existing queue.
    pub fn resolve_queue(&self, vm: &str, name: &str) -> Option<u32> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .get(&(vm.to_string(), name.to_string()))
            .copied()
    }

    /// Appends to a queue (dropping its oldest item when full) and wakes its registrants.
    pub fn enqueue(&self, token: u32, item: Vec<u8>) -> Result<(), QueueError> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queue = token
            .checked_sub(1)
            .and_then(|i| queues.queues.get_mut(i as usize))
            .ok_or(QueueError::NotFound)?;
        if queue.items.len() >= QUEUE_CAPACITY {
            queue.items.pop_front();
            tracing::debug!("shared queue {token} is full; its oldest item was dropped");
        }
        queue.items.push_back(item);
        for waiter in queue.waiters.iter().filter_map(Weak::upgrade) {
            waiter.notify_one();
        }
        Ok(())
    }

    /// Takes the oldest item of a queue.
    pub fn dequeue(&self, token: u32) -> Result<Vec<u8>, QueueError> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queue = token
            .checked_sub(1)
            .and_then(|i| queues.queues.get_mut(i as usize))
            .ok_or(QueueError::NotFound)?;
        queue.items.pop_front().ok_or(QueueError::Empty)
    }

    /// Whether a queue has items waiting.
    pub fn queue_has_items(&self, token: u32) -> bool {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        token
            .checked_sub(1)
            .and_then(|i| queues.queues.get(i as usize))
            .is_some_and(|q| !q.items.is_empty())
    }

    /// Sets the upstream (cluster) names `proxy_http_call` accepts; the proxy calls this
    /// with each configuration it loads.
    pub fn set_upstreams(&self, names: impl IntoIterator<Item = String>) {
        *self.upstreams.write().unwrap_or_else(|p| p.into_inner()) = names.into_iter().collect();
    }

    /// Whether `name` is an upstream a callout may reach (the SDK's timer always is).
    pub fn has_upstream(&self, name: &str) -> bool {
        name == crate::sdk::TIMER_UPSTREAM
            || self
                .upstreams
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(name)
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
    fn queues_are_scoped_by_vm_bounded_and_wake_their_registrants() {
        let shared = SharedState::default();
        let waiter = Arc::new(Notify::new());
        let token = shared.register_queue("vm", "jobs", &waiter);
        assert_eq!(shared.register_queue("vm", "jobs", &waiter), token);
        assert_eq!(shared.resolve_queue("vm", "jobs"), Some(token));
        assert_eq!(shared.resolve_queue("other-vm", "jobs"), None);
        assert_eq!(shared.dequeue(token), Err(QueueError::Empty));
        assert_eq!(
            shared.enqueue(token + 7, b"x".to_vec()),
            Err(QueueError::NotFound)
        );
        shared.enqueue(token, b"a".to_vec()).unwrap();
        shared.enqueue(token, b"b".to_vec()).unwrap();
        assert!(shared.queue_has_items(token));
        // The enqueue left a permit: a waiter that starts waiting now returns at once.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), waiter.notified())
                .await
                .expect("the enqueue woke the registrant");
        });
        assert_eq!(shared.dequeue(token).unwrap(), b"a");
        assert_eq!(shared.dequeue(token).unwrap(), b"b");
        for i in 0..=QUEUE_CAPACITY {
            shared.enqueue(token, i.to_string().into_bytes()).unwrap();
        }
        assert_eq!(
            shared.dequeue(token).unwrap(),
            b"1",
            "a full queue drops its oldest item"
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
