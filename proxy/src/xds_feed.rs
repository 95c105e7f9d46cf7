//! Following a control plane: the proxy as an ADS client.
//!
//! ```text
//! bootstrap (local YAML: node, admin, control_plane) ──▶ nip-xds AdsClient (own thread)
//!     ──complete ResourceSet──▶ FeedSink::apply ──Compiler::compile──▶ ArcSwap::store
//!                                    │ error → NACK with the compile error   │
//!                                    └──────────────── "swapped" ────────────▶ control thread
//! ```
//!
//! Every set goes through the same compiler as a file config, so what the control plane
//! sends is checked exactly as strictly; a set that does not compile is NACKed with the
//! compiler's message and the last good snapshot keeps serving. The first set is awaited
//! before the proxy binds its listener (whose address comes from it).

use crate::cluster::EndpointRegistry;
use crate::metrics::Metrics;
use crate::plugins::PluginLoader;
use crate::snapshot::{Compiler, Snapshot};
use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use nip_xds::client::{AdsClient, ResourceSink};
use nip_xds::ResourceSet;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Where compiled snapshots go: to the starting proxy (the first), then into its `ArcSwap`.
enum Destination {
    /// The proxy is waiting for its first snapshot; later ones wait in `pending`.
    Starting {
        first: mpsc::SyncSender<Snapshot>,
        pending: Option<Box<Snapshot>>,
    },
    /// The proxy runs on this swap.
    Running(Arc<ArcSwap<Snapshot>>),
}

/// Compiles what the control plane sends; the verdict is the ACK or NACK.
struct FeedSink {
    bootstrap: Bootstrap,
    registry: Arc<EndpointRegistry>,
    metrics: Arc<Metrics>,
    plugins: Arc<PluginLoader>,
    destination: Arc<Mutex<Destination>>,
    swapped: tokio::sync::mpsc::UnboundedSender<()>,
    /// Why the last set was refused: a proxy that never gets a usable config says why.
    last_refusal: Arc<Mutex<Option<String>>>,
}

impl ResourceSink for FeedSink {
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        let mut destination = self.destination.lock().unwrap_or_else(|p| p.into_inner());
        let previous_access_log = match &*destination {
            Destination::Running(swap) => swap.load().access_log.clone(),
            Destination::Starting { .. } => None,
        };
        let compiler = Compiler {
            registry: &self.registry,
            metrics: &self.metrics,
            previous_access_log,
            plugins: &self.plugins,
        };
        let snapshot = compiler.compile(&self.bootstrap, resources).map_err(|e| {
            self.metrics.config_reload_failures.inc();
            let reason = e.to_string();
            *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            reason
        })?;
        match &mut *destination {
            Destination::Starting { first, pending } => {
                // Sets after the first, before the proxy runs, wait for `running_on`.
                if let Err(mpsc::TrySendError::Full(later)) = first.try_send(snapshot) {
                    *pending = Some(Box::new(later));
                }
            }
            Destination::Running(swap) => {
                tracing::info!(version = %snapshot.version, "config from the control plane swapped in");
                swap.store(Arc::new(snapshot));
                self.metrics.config_reloads.inc();
                let _ = self.swapped.send(());
            }
        }
        Ok(())
    }
}

/// A running feed, and how the proxy hands over its swap.
pub struct XdsFeed {
    destination: Arc<Mutex<Destination>>,
    swapped: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl XdsFeed {
    /// Connects to `target` (`host:port`) on a thread of its own and waits up to `wait` for
    /// the first complete, compilable set, which it returns with the feed.
    pub fn start(
        target: &str,
        bootstrap: Bootstrap,
        registry: Arc<EndpointRegistry>,
        metrics: Arc<Metrics>,
        plugins: Arc<PluginLoader>,
        wait: Duration,
    ) -> Result<(Snapshot, XdsFeed), String> {
        let (first_tx, first_rx) = mpsc::sync_channel(1);
        let destination = Arc::new(Mutex::new(Destination::Starting {
            first: first_tx,
            pending: None,
        }));
        let (swapped_tx, swapped) = tokio::sync::mpsc::unbounded_channel();
        let node = bootstrap.node.clone().unwrap_or_default();
        let sink = FeedSink {
            bootstrap,
            registry,
            metrics,
            plugins,
            destination: Arc::clone(&destination),
            swapped: swapped_tx,
            last_refusal: Arc::default(),
        };
        let last_refusal = Arc::clone(&sink.last_refusal);
        let server = format!("http://{target}");
        crate::server::spawn_runtime_thread("nip-xds", move || {
            AdsClient::new(server, node, sink).run()
        })
        .map_err(|e| format!("xDS thread: {e}"))?;
        let first = first_rx.recv_timeout(wait).map_err(|_| {
            let why = match last_refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                Some(reason) => format!("; the last set it sent was refused: {reason}"),
                None => " (is it running and reachable?)".to_string(),
            };
            format!("no usable config from the control plane at {target} within {wait:?}{why}")
        })?;
        Ok((
            first,
            XdsFeed {
                destination,
                swapped,
            },
        ))
    }

    /// From now on, snapshots go into `swap` (starting with one that arrived meanwhile).
    /// Returns a signal per later swap: the control thread then reconciles health checks and
    /// frees what the old snapshot held.
    pub fn running_on(
        self,
        swap: &Arc<ArcSwap<Snapshot>>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<()> {
        let mut destination = self.destination.lock().unwrap_or_else(|p| p.into_inner());
        if let Destination::Starting {
            pending: Some(later),
            ..
        } = std::mem::replace(&mut *destination, Destination::Running(Arc::clone(swap)))
        {
            swap.store(Arc::new(*later));
        }
        drop(destination);
        self.swapped
    }
}
