//! Following a control plane: the proxy as an ADS client.
//!
//! ```text
//! bootstrap (local YAML: node, admin, control_plane) ──▶ nip-xds AdsClient (own thread)
//!     ──complete ResourceSet──▶ FeedSink::apply ──compile::Compiler::build──▶ ArcSwap::store
//!                                    │ error → NACK with the compile error   │
//!                                    └──────────────── "swapped" ────────────▶ control thread
//! ```
//!
//! Every set goes through the same compiler as a file config, so what the control plane
//! sends is checked exactly as strictly; a set that does not compile is NACKed with the
//! compiler's message and the last good snapshot keeps serving. The first set is awaited
//! before the proxy binds its listener (whose address comes from it).
//!
//! With `control_plane.last_good`, every accepted set is also written to that file
//! (atomically); a proxy that starts while the control plane does not answer serves the
//! saved set after a short wait, and swaps in whatever the control plane sends later.

use crate::compile::{Compiler, Snapshot};
use crate::plugins::PluginLoader;
use crate::telemetry::metrics::Metrics;
use crate::upstream::registry::EndpointRegistry;
use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use nip_xds::client::{AdsClient, ResourceSink};
use nip_xds::ResourceSet;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How long a proxy with a saved set waits for its control plane before serving the set.
const LAST_GOOD_GRACE: Duration = Duration::from_secs(2);

/// Writes `resources` to `path` through a temporary file and a rename, so a crash never
/// leaves half a file.
fn save_last_good(path: &Path, resources: &ResourceSet) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, resources.to_file_bytes())?;
    std::fs::rename(&temporary, path)
}

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
    /// Where accepted sets are saved, if anywhere.
    last_good: Option<PathBuf>,
    /// The proxy's workload identity (SDS secret `default`).
    identity: Option<Arc<crate::identity::WorkloadIdentity>>,
}

impl ResourceSink for FeedSink {
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        let mut destination = self.destination.lock().unwrap_or_else(|p| p.into_inner());
        let previous_access_logs = match &*destination {
            Destination::Running(swap) => swap.load().access_loggers(),
            Destination::Starting { .. } => Vec::new(),
        };
        let compiler = Compiler {
            registry: &self.registry,
            metrics: &self.metrics,
            previous_access_logs,
            identity: self.identity.as_ref(),
        };
        // A cluster (or its endpoints) the proxy cannot run is left out and the rest is
        // applied, as Envoy does; the response is still NACKed, naming what was left out.
        // Anything else wrong refuses the whole set.
        let mut applied = std::borrow::Cow::Borrowed(resources);
        let mut left_out = Vec::new();
        let snapshot = loop {
            match compiler.build(&self.plugins, &self.bootstrap, &applied) {
                Ok(snapshot) => break snapshot,
                Err(e)
                    if matches!(e.kind, "Cluster" | "ClusterLoadAssignment")
                        && left_out.len() < applied.clusters.len() =>
                {
                    let mut reduced = applied.into_owned();
                    reduced.clusters.retain(|c| c.name != e.name);
                    reduced.endpoints.retain(|a| a.cluster_name != e.name);
                    reduced.version = reduced.content_version();
                    left_out.push(e.to_string());
                    applied = std::borrow::Cow::Owned(reduced);
                }
                Err(e) => {
                    self.metrics.config_reload_failures.inc();
                    let reason = left_out
                        .into_iter()
                        .chain(std::iter::once(e.to_string()))
                        .collect::<Vec<_>>()
                        .join("; ");
                    *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(reason.clone());
                    return Err(reason);
                }
            }
        };
        if let Some(path) = &self.last_good {
            if let Err(e) = save_last_good(path, &applied) {
                tracing::warn!(file = %path.display(), "cannot save the accepted config: {e}");
            }
        }
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
        if left_out.is_empty() {
            Ok(())
        } else {
            self.metrics.config_reload_failures.inc();
            Err(format!(
                "applied without what it cannot run: {}",
                left_out.join("; ")
            ))
        }
    }
}

/// A running feed, and how the proxy hands over its swap.
pub struct XdsFeed {
    destination: Arc<Mutex<Destination>>,
    swapped: tokio::sync::mpsc::UnboundedReceiver<()>,
    /// Where the control plane's first set lands while the proxy starts on a saved one.
    first: mpsc::Receiver<Snapshot>,
}

/// What [`XdsFeed::start`] needs besides the target.
pub struct FeedParts {
    /// The proxy's bootstrap (node identity, admin).
    pub bootstrap: Bootstrap,
    /// Endpoint state shared with health checks.
    pub registry: Arc<EndpointRegistry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Plugin modules.
    pub plugins: Arc<PluginLoader>,
    /// `control_plane.last_good`: where accepted sets are saved and read back at start.
    pub last_good: Option<PathBuf>,
    /// The proxy's certificate for mutual TLS with the control plane (`None`: plaintext).
    pub identity: Option<Arc<crate::identity::WorkloadIdentity>>,
    /// Stream access records to the control plane (`control_plane.stream_access_logs`).
    pub stream_access_logs: bool,
}

impl XdsFeed {
    /// Connects to `target` (`host:port`) on a thread of its own and waits up to `wait` for
    /// the first complete, compilable set, which it returns with the feed. With a saved
    /// last good set, it waits only a short grace (2 s) before starting on that.
    pub fn start(
        target: &str,
        parts: FeedParts,
        wait: Duration,
    ) -> Result<(Snapshot, XdsFeed), String> {
        let saved = parts.last_good.as_deref().and_then(|path| {
            let saved = std::fs::read(path).ok()?;
            let compiled = ResourceSet::from_file_bytes(&saved).and_then(|resources| {
                Compiler {
                    registry: &parts.registry,
                    metrics: &parts.metrics,
                    previous_access_logs: Vec::new(),
                    identity: parts.identity.as_ref(),
                }
                .build(&parts.plugins, &parts.bootstrap, &resources)
                .map_err(|e| e.to_string())
            });
            match compiled {
                Ok(snapshot) => Some(snapshot),
                Err(e) => {
                    tracing::warn!(file = %path.display(), "saved config not usable, waiting for the control plane: {e}");
                    None
                }
            }
        });
        let (first_tx, first_rx) = mpsc::sync_channel(1);
        let destination = Arc::new(Mutex::new(Destination::Starting {
            first: first_tx,
            pending: None,
        }));
        let (swapped_tx, swapped) = tokio::sync::mpsc::unbounded_channel();
        let node = parts.bootstrap.node.clone().unwrap_or_default();
        let server = format!("http://{target}");
        let log_stream = parts.stream_access_logs.then(|| {
            (
                server.clone(),
                node.clone(),
                parts.identity.as_ref().map(|i| i.tls_settings()),
                Arc::clone(&parts.metrics),
            )
        });
        let sink = FeedSink {
            bootstrap: parts.bootstrap,
            registry: parts.registry,
            metrics: parts.metrics,
            plugins: parts.plugins,
            destination: Arc::clone(&destination),
            swapped: swapped_tx,
            last_refusal: Arc::default(),
            last_good: parts.last_good.clone(),
            identity: parts.identity.clone(),
        };
        let last_refusal = Arc::clone(&sink.last_refusal);
        let identity = parts.identity.clone();
        crate::threads::spawn_runtime_thread("nip-xds", move || async move {
            if let Some((server, node, tls, metrics)) = log_stream {
                tokio::spawn(super::log_stream::stream_access_logs(
                    server, node, tls, metrics,
                ));
            }
            let client = AdsClient::new(server, node, sink);
            match identity {
                Some(identity) => {
                    tokio::spawn(Arc::clone(&identity).renew_forever());
                    client.with_tls(identity.tls_settings()).run().await
                }
                None => client.run().await,
            }
        })
        .map_err(|e| format!("xDS thread: {e}"))?;
        let feed = |first| XdsFeed {
            destination,
            swapped,
            first,
        };
        if let Some(saved) = saved {
            return match first_rx.recv_timeout(LAST_GOOD_GRACE) {
                Ok(first) => Ok((first, feed(first_rx))),
                Err(_) => {
                    tracing::warn!(
                        control_plane = %target,
                        version = %saved.version,
                        file = %parts.last_good.unwrap_or_default().display(),
                        "the control plane does not answer; serving the last good config until it does"
                    );
                    Ok((saved, feed(first_rx)))
                }
            };
        }
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
        Ok((first, feed(first_rx)))
    }

    /// From now on, snapshots go into `swap` (starting with one that arrived meanwhile).
    /// Returns a signal per later swap: the control thread then reconciles health checks and
    /// frees what the old snapshot held.
    pub fn running_on(
        self,
        swap: &Arc<ArcSwap<Snapshot>>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<()> {
        let mut destination = self.destination.lock().unwrap_or_else(|p| p.into_inner());
        if let Destination::Starting { pending, .. } =
            std::mem::replace(&mut *destination, Destination::Running(Arc::clone(swap)))
        {
            // The newest set that arrived while starting: a pending one, or the control
            // plane's first when the proxy started on its saved set.
            let newest = pending
                .map(|later| *later)
                .or_else(|| self.first.try_recv().ok());
            if let Some(snapshot) = newest {
                swap.store(Arc::new(snapshot));
            }
        }
        drop(destination);
        self.swapped
    }
}
