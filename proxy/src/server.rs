//! Process wiring: load the first config, start the control thread (admin port, reload,
//! health checks, drain) and hand the listener to pingora's workers.
//!
//! Threads and why:
//! * pingora's worker runtime(s): requests only.
//! * `nip-control`: one current-thread tokio runtime for the admin port, config reloads
//!   (SIGHUP and file changes), active health checks, the per-interval outlier detectors and
//!   shutdown draining — so none of that
//!   competes with requests, and a slow scrape cannot hurt tail latency.
//! * `nip-access-log`: writes access log lines when enabled.

use crate::admin::{self, AdminState, ProxyStatus};
use crate::compile::{CompileError, Compiler, Snapshot};
use crate::config_source::ads::XdsFeed;
use crate::config_source::{ConfigSource, Fingerprint};
use crate::downstream::admission::Admission;
use crate::downstream::app::FrontDoor;
use crate::http::Gateway;
use crate::listener::dispatch::{CurrentListeners, Dispatch};
use crate::plugins::PluginLoader;
use crate::policy::jwt::fetch::JwksFetcher;
use crate::telemetry::metrics::Metrics;
use crate::upstream::health::HealthChecker;
use crate::upstream::outlier::OutlierSweeper;
use crate::upstream::registry::EndpointRegistry;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use nip_xds::config::ConfigError;
use pingora::apps::HttpServerOptions;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// How long a proxy following a control plane waits for its first config.
const CONTROL_PLANE_WAIT: Duration = Duration::from_secs(30);

/// How to run a proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Where the config comes from.
    pub source: ConfigSource,
    /// Worker threads.
    pub threads: usize,
    /// Longest wait for in-flight requests after SIGTERM.
    pub drain_timeout: Duration,
    /// How often a config file is checked for changes.
    pub watch_interval: Duration,
    /// Where listening sockets pass between an old and a new process in an upgrade (`None`:
    /// `/tmp/nip-upgrade-ADMINPORT.sock`). On SIGQUIT a running proxy sends its sockets
    /// there, then stops accepting and drains.
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// Start by taking the listening sockets of the proxy running on `upgrade_socket` (it
    /// hands them over when sent SIGQUIT): a restart or binary upgrade that refuses no
    /// connection.
    pub take_over: bool,
    /// Hands memory the allocator keeps for the calling thread back to the OS (the
    /// binary's allocator knows how); run on each worker thread once a second after
    /// connections closed there, so a burst's peak does not stay resident.
    pub release_memory: Option<fn()>,
}

/// Why a proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid (exit code 2).
    #[error("invalid config:\n{0}")]
    Config(#[from] ConfigError),
    /// The resources could not be compiled (exit code 2).
    #[error("invalid config: {0}")]
    Compile(#[from] CompileError),
    /// A port could not be bound.
    #[error("cannot listen on {what} {address}: {source}")]
    Bind {
        /// `api_gateway.address` or `admin.address`.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// TLS certificate or key unusable.
    #[error("api_gateway.tls: {0}")]
    Tls(String),
    /// The WebAssembly engine could not start.
    #[error("cannot start the plugin engine: {0}")]
    Plugins(String),
    /// A thread or runtime could not start.
    #[error("cannot start: {0}")]
    Runtime(std::io::Error),
    /// The control plane gave no usable config in time.
    #[error("control plane: {0}")]
    ControlPlane(String),
}

impl StartError {
    /// Whether the user's config is at fault (the CLI exits with 2 then).
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            StartError::Config(_) | StartError::Compile(_) | StartError::Tls(_)
        )
    }
}

/// Runs a proxy until SIGTERM (drain, then exit) or SIGINT (exit now).
/// Returns only when start-up fails.
pub fn run(options: ProxyOptions) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(EndpointRegistry::default());
    let plugins = Arc::new(PluginLoader::new(plugin_cache_dir()).map_err(StartError::Plugins)?);
    let translation = options.source.load()?;
    for note in &translation.not_applied {
        tracing::warn!("{note}");
    }
    let compiler = Compiler {
        registry: &registry,
        metrics: &metrics,
        previous_access_logs: Vec::new(),
        identity: None,
    };
    // The workload identity, when following a control plane with its CA.
    let mut workload_identity = None;
    let ads_target = nip_xds::translate::ads_target(&translation.bootstrap);
    let (snapshot, feed) = match &ads_target {
        None => (
            compiler.build(&plugins, &translation.bootstrap, &translation.resources)?,
            None,
        ),
        Some(target) => {
            tracing::info!(control_plane = %target, "waiting for config from the control plane");
            let identity = match &translation.control_plane_identity {
                Some(settings) => {
                    let node = translation.bootstrap.node.clone().unwrap_or_default();
                    let region = node
                        .locality
                        .as_ref()
                        .map(|l| l.region.clone())
                        .unwrap_or_default();
                    // With a saved config the proxy can serve while it cannot join.
                    let may_defer = translation
                        .last_good_file
                        .as_ref()
                        .is_some_and(|f| f.is_file());
                    Some(
                        crate::identity::WorkloadIdentity::obtain_or_defer(
                            settings, target, &node.id, &region, may_defer,
                        )
                        .map_err(|e| StartError::ControlPlane(format!("identity: {e}")))?,
                    )
                }
                None => {
                    tracing::warn!(control_plane = %target, "plaintext xDS: set control_plane.ca_file for mutual TLS");
                    None
                }
            };
            workload_identity = identity.clone();
            let (first, feed) = XdsFeed::start(
                target,
                crate::config_source::ads::FeedParts {
                    bootstrap: translation.bootstrap.clone(),
                    registry: Arc::clone(&registry),
                    metrics: Arc::clone(&metrics),
                    plugins: Arc::clone(&plugins),
                    last_good: translation.last_good_file.clone(),
                    identity,
                    stream_access_logs: translation.stream_access_logs,
                },
                CONTROL_PLANE_WAIT,
            )
            .map_err(StartError::ControlPlane)?;
            (first, Some(feed))
        }
    };
    metrics.config_reloads.inc();
    let listeners = Arc::clone(&snapshot.listeners);
    let http = snapshot.http.clone();
    let admin_address = snapshot
        .admin_address()
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901)));
    // Bind-check each listener's port now, so a busy port is a clear error, not a worker
    // panic (taking over, the running proxy holds them and hands them over).
    for listener in listeners.bound().filter(|_| !options.take_over) {
        for &address in std::iter::once(&listener.address).chain(&listener.additional_addresses) {
            drop(bind_check(address).map_err(|source| StartError::Bind {
                what: "a listener's address",
                address,
                source,
            })?);
        }
    }
    // Taking over, the running proxy frees the admin port when it hands its sockets over.
    let admin_listener = if options.take_over {
        None
    } else {
        Some(
            TcpListener::bind(admin_address).map_err(|source| StartError::Bind {
                what: "admin.address",
                address: admin_address,
                source,
            })?,
        )
    };
    let upgrade_socket = options.upgrade_socket.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("nip-upgrade-{}.sock", admin_address.port()))
    });
    let bound: Vec<String> = listeners
        .bound()
        .map(|l| format!("{} {}", l.name, l.address))
        .collect();
    tracing::info!(
        version = %snapshot.version,
        listeners = %bound.join(", "),
        admin = %admin_address,
        tls = http.tls.is_some(),
        "nip proxy starting with {}",
        options.source.describe()
    );
    let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
    let status = Arc::new(ProxyStatus::default());
    let swapped = feed.map(|feed| feed.running_on(&snapshot));

    // The listener's certificates and client roots: the control thread replaces them on
    // reloads, certificate file changes, renewals of the workload certificate and pushes of
    // the trust bundle (the listener itself is bound once).
    let listener_certificates = match &http.tls {
        Some(tls) => Some(Arc::new(crate::downstream::tls::SniResolver::new(
            listener_certificate_set(tls, workload_identity.as_ref()).map_err(StartError::Tls)?,
        ))),
        None => None,
    };
    let client_verifier = match (&http.tls, &snapshot.load().listener_client_roots) {
        (Some(tls), Some(roots)) => Some(Arc::new(
            crate::downstream::tls::ClientVerifier::new(roots, tls.require_client_certificate)
                .map_err(StartError::Tls)?,
        )),
        _ => None,
    };
    let process_statuses: crate::supervisor::ProcessStatuses = Arc::default();
    let control = Control {
        listener_certificates: listener_certificates.clone(),
        client_verifier: client_verifier.clone(),
        workload_certificate: workload_identity.as_ref().map(|i| i.current()),
        identity: workload_identity,
        certificate_fingerprints: Default::default(),
        source: options.source.clone(),
        snapshot: Arc::clone(&snapshot),
        metrics: Arc::clone(&metrics),
        registry,
        plugins: Arc::clone(&plugins),
        status: Arc::clone(&status),
        health: HealthChecker::default(),
        jwks: JwksFetcher::default(),
        jwks_client: {
            let in_force = Arc::clone(&snapshot);
            Arc::new(crate::plugins::callout::CalloutClient::new(Arc::new(
                move |name: &str| in_force.load().clusters.get(name).cloned(),
            )))
        },
        fingerprint: options.source.fingerprint(),
        plugin_fingerprints: Default::default(),
        drain_timeout: options.drain_timeout,
        watch_interval: options.watch_interval,
        swapped,
        supervisor: crate::supervisor::Supervisor::new(
            Arc::clone(&process_statuses),
            crate::supervisor::SupervisorMetrics {
                restarts: {
                    let metrics = Arc::clone(&metrics);
                    Arc::new(move |name: &str| metrics.plugin_process_restarts(name))
                },
                health: {
                    let metrics = Arc::clone(&metrics);
                    Arc::new(move |name: &str, healthy: bool| metrics.plugin_health(name, healthy))
                },
            },
        ),
        processes: translation.processes.clone(),
    };
    let admin_state = AdminState {
        snapshot: Arc::clone(&snapshot),
        metrics: Arc::clone(&metrics),
        status,
        plugins,
        processes: process_statuses,
    };
    crate::threads::spawn_runtime_thread("nip-control", move || {
        control.run(admin_listener, admin_address, admin_state)
    })
    .map_err(StartError::Runtime)?;

    let conf = ServerConf {
        threads: options.threads.max(1),
        // A request's plugin contexts live in its worker thread's plugin instances.
        work_stealing: false,
        grace_period_seconds: Some(options.drain_timeout.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: upgrade_socket.display().to_string(),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade: options.take_over,
        ..Default::default()
    };
    if options.take_over {
        tracing::info!(socket = %upgrade_socket.display(), "waiting for the running proxy's sockets (send it SIGQUIT)");
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy(
        &server.configuration,
        Gateway::new(Arc::clone(&snapshot), Arc::clone(&metrics)),
    );
    let mut server_options = HttpServerOptions::default();
    server_options.h2c = http.h2c;
    // HTTP/2 connections with no stream open close after the idle timeout too (pingora
    // takes it once, at start).
    server_options.h2_idle_timeout = snapshot.load().primary_http().downstream.idle_timeout;
    proxy.server_options = Some(server_options);
    // HTTP/2 heads are bounded like HTTP/1 ones (pingora keeps its 100 concurrent streams).
    let mut h2_options = pingora::protocols::http::v2::server::default_h2_options();
    let max_head = snapshot
        .load()
        .http_managers
        .iter()
        .map(|m| m.downstream.max_head_bytes())
        .max()
        .unwrap_or(0);
    h2_options.max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
    proxy.h2_options = Some(h2_options);
    let admission = Admission::new(metrics.downstream.clone());
    let front_door = Arc::new(
        FrontDoor::new(proxy, admission)
            .releasing_memory(options.release_memory)
            .draining_for(options.drain_timeout),
    );
    // TLS is terminated per filter chain, after the listener filters chose it.
    let tls_acceptor = match &listener_certificates {
        Some(certificates) => Some(Arc::new(
            crate::downstream::tls::settings(certificates, client_verifier.as_ref())
                .map_err(StartError::Tls)?
                .build(),
        )),
        None => None,
    };
    let in_force = Arc::clone(&snapshot);
    let current: CurrentListeners = Arc::new(move || Arc::clone(&in_force.load().listeners));
    for listener in listeners.bound() {
        let app = Dispatch::new(
            listener.address,
            Arc::clone(&listener.name),
            Arc::clone(&current),
            Arc::clone(&front_door),
            tls_acceptor.clone(),
        );
        let mut service = Service::new(format!("nip {}", listener.name), app);
        let read_buffer = if listener_terminates_tls(listener) {
            DOWNSTREAM_TLS_READ_BUFFER
        } else {
            DOWNSTREAM_READ_BUFFER
        };
        for address in std::iter::once(&listener.address).chain(&listener.additional_addresses) {
            let mut endpoint =
                ListenerConfig::tcp(address.to_string()).l4_buffer(L4BufferSettings {
                    read: Some(read_buffer),
                    write: None,
                });
            if address.is_ipv6() {
                // Beside an IPv4 address on the same port: each family its own socket.
                let mut options = pingora::listeners::TcpSocketOptions::default();
                options.ipv6_only = Some(true);
                endpoint = endpoint.tcp_socket_options(options);
            }
            service.add_listener(endpoint);
        }
        server.add_service(service);
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals),
    });
    Ok(())
}

/// Binds `address` to see it is free (an IPv6 one IPv6-only, as the listener will be).
fn bind_check(address: SocketAddr) -> std::io::Result<TcpListener> {
    if address.is_ipv4() {
        return TcpListener::bind(address);
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.bind(&address.into())?;
    socket.listen(16)?;
    Ok(socket.into())
}

/// Whether any filter chain of `listener` (or of a listener it hands connections to)
/// terminates TLS.
fn listener_terminates_tls(listener: &crate::listener::ServedListener) -> bool {
    listener
        .chains
        .iter()
        .chain(listener.default_chain.as_ref())
        .any(|c| {
            matches!(
                c.action,
                crate::listener::ChainAction::Http { tls: true, .. }
            )
        })
        || listener.use_original_dst
}

/// How long a proxy taking over waits for the running one to free the admin port.
const ADMIN_TAKE_OVER_WAIT: Duration = Duration::from_secs(120);

/// Binds `address` as soon as the running proxy frees it (it does on SIGQUIT); `None` when
/// it stays busy for [`ADMIN_TAKE_OVER_WAIT`].
async fn bind_when_free(address: SocketAddr) -> Option<TcpListener> {
    let deadline = Instant::now() + ADMIN_TAKE_OVER_WAIT;
    loop {
        match TcpListener::bind(address) {
            Ok(listener) => return Some(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::error!(%address, "cannot bind the admin port: {e}");
                return None;
            }
        }
    }
}

/// The certificates a listener serves: its files, or the proxy's workload certificate.
fn listener_certificate_set(
    tls: &crate::compile::TlsFiles,
    identity: Option<&Arc<crate::identity::WorkloadIdentity>>,
) -> Result<crate::downstream::tls::CertificateSet, String> {
    if !tls.workload_certificate {
        return crate::downstream::tls::CertificateSet::load(&tls.certificates);
    }
    match identity {
        Some(identity) => {
            let certificate = identity.current().certified_key.clone();
            if certificate.is_none() {
                tracing::warn!("the listener serves the workload certificate, which this proxy does not have yet (it has not joined): handshakes fail until it does");
            }
            Ok(crate::downstream::tls::CertificateSet::workload(certificate))
        }
        None => Err("the listener serves the workload certificate, and this proxy has none (control_plane.ca_file makes it join the mesh)".into()),
    }
}

/// Where compiled plugin code is cached across restarts.
fn plugin_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))?;
    let dir = base.join("nip").join("wasm");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// SIGTERM: stop accepting and drain; SIGQUIT: hand the listening sockets to a proxy
/// taking over, then drain; SIGINT: stop now. SIGHUP is the control thread's.
struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; the proxy will only stop when killed");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
        }
    }
}

/// The control thread's state.
struct Control {
    source: ConfigSource,
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    registry: Arc<EndpointRegistry>,
    plugins: Arc<PluginLoader>,
    status: Arc<ProxyStatus>,
    health: HealthChecker,
    /// Fetches the remote JWKS of the snapshot in force.
    jwks: JwksFetcher,
    /// The client those fetches go through (to clusters of the snapshot in force).
    jwks_client: Arc<crate::plugins::callout::CalloutClient>,
    fingerprint: Option<Fingerprint>,
    plugin_fingerprints: std::collections::HashMap<std::path::PathBuf, Option<Fingerprint>>,
    drain_timeout: Duration,
    watch_interval: Duration,
    /// When following a control plane: a signal per snapshot it swapped in. The local file
    /// is then only the bootstrap, so it is not reloaded.
    swapped: Option<tokio::sync::mpsc::UnboundedReceiver<()>>,
    /// The listener's certificates, replaced live (`None`: no TLS).
    listener_certificates: Option<Arc<crate::downstream::tls::SniResolver>>,
    /// The listener's client roots, replaced live (`None`: clients are not verified).
    client_verifier: Option<Arc<crate::downstream::tls::ClientVerifier>>,
    /// The proxy's workload identity (when following a control plane with its CA).
    identity: Option<Arc<crate::identity::WorkloadIdentity>>,
    /// The workload certificate the listener was last given.
    workload_certificate: Option<Arc<crate::identity::Credentials>>,
    /// Each listener certificate or key file as last seen.
    certificate_fingerprints: std::collections::HashMap<std::path::PathBuf, Option<Fingerprint>>,
    /// Keeps the config's plugin processes running.
    supervisor: crate::supervisor::Supervisor,
    /// The plugin processes of the config loaded at start (started once the control
    /// runtime runs).
    processes: Vec<nip_xds::translate::PluginProcess>,
}

/// The first of `files` whose fingerprint differs from the one `known` holds (files seen
/// for the first time are remembered, not reported); every changed one is remembered anew.
fn first_changed(
    known: &mut std::collections::HashMap<std::path::PathBuf, Option<Fingerprint>>,
    files: impl Iterator<Item = std::path::PathBuf>,
) -> Option<std::path::PathBuf> {
    let mut changed = None;
    for file in files {
        let current = Fingerprint::of(&file);
        let seen = known.entry(file.clone()).or_insert_with(|| current.clone());
        if *seen != current {
            *seen = current;
            changed.get_or_insert(file);
        }
    }
    changed
}

/// What a reload produces: a new snapshot, none (unchanged), or why it was refused; and
/// the plugin processes the config asks for.
type ReloadResult = Result<(Option<Snapshot>, Vec<nip_xds::translate::PluginProcess>), String>;

/// Each plaintext client connection's read buffer. Pingora's default is 64 KiB, which every
/// idle or slow client holds for nothing; a request head fits in 4 KiB, and larger reads
/// (bodies) go past the buffer straight into the caller's.
const DOWNSTREAM_READ_BUFFER: usize = 4 * 1024;
/// With TLS, a record (16 KiB) per read.
const DOWNSTREAM_TLS_READ_BUFFER: usize = 16 * 1024;

/// A reload running on the blocking pool, and the snapshot it started from.
struct ReloadTask {
    task: Pin<Box<tokio::task::JoinHandle<ReloadResult>>>,
    current: Arc<Snapshot>,
}

/// The next swap the control plane made; never, without one.
async fn next_swap(swapped: &mut Option<tokio::sync::mpsc::UnboundedReceiver<()>>) -> Option<()> {
    match swapped {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Control {
    async fn run(
        mut self,
        admin_listener: Option<TcpListener>,
        admin_address: SocketAddr,
        admin_state: AdminState,
    ) {
        let admin = tokio::spawn(async move {
            let listener = match admin_listener {
                Some(listener) => listener,
                None => match bind_when_free(admin_address).await {
                    Some(listener) => listener,
                    None => {
                        tracing::error!(%admin_address, "the admin port stayed busy; this proxy runs without it");
                        return;
                    }
                },
            };
            if let Err(e) = admin::serve(listener, admin_state).await {
                tracing::error!("admin server stopped: {e}");
            }
        });
        let processes = std::mem::take(&mut self.processes);
        self.supervisor.reconcile(&processes);
        self.health
            .reconcile(&self.snapshot.load().clusters, &self.metrics);
        self.reconcile_jwks();
        let (Ok(mut hangup), Ok(mut terminate), Ok(mut quit)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install SIGHUP/SIGTERM/SIGQUIT handlers");
            return;
        };
        let mut admin = Some(admin);
        let mut watch = tokio::time::interval(self.watch_interval);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outliers = OutlierSweeper::default();
        let mut sweep = tokio::time::interval(OutlierSweeper::TICK);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // At most one reload runs; a SIGHUP meanwhile runs another after it.
        let mut reloading: Option<ReloadTask> = None;
        let mut hangup_pending = false;
        loop {
            let follows_control_plane = self.swapped.is_some();
            if reloading.is_none() && hangup_pending {
                hangup_pending = false;
                let plugin_changed = self.changed_plugin_file().is_some();
                reloading = Some(self.start_reload(plugin_changed));
            }
            tokio::select! {
                Some(()) = next_swap(&mut self.swapped) => {
                    self.after_swap();
                }
                result = async { (&mut reloading.as_mut()?.task).await.into() }, if reloading.is_some() => {
                    if let (Some(result), Some(task)) = (result, reloading.take()) {
                        self.finish_reload(result, task.current);
                    }
                }
                _ = hangup.recv() => {
                    if follows_control_plane {
                        tracing::info!("SIGHUP: config comes from the control plane; nothing to reload");
                        continue;
                    }
                    tracing::info!("SIGHUP: reloading {}", self.source.describe());
                    hangup_pending = true;
                }
                _ = watch.tick(), if reloading.is_none() => {
                    // Certificate files are watched whatever the config comes from.
                    if let Some(file) = self.changed_certificate_file() {
                        tracing::info!("listener certificate {} changed", file.display());
                        self.load_listener_certificates();
                    } else if self.workload_certificate_renewed() {
                        self.load_listener_certificates();
                    }
                    if follows_control_plane {
                        continue;
                    }
                    let current = self.source.fingerprint();
                    if current.is_some() && current != self.fingerprint {
                        tracing::info!("{} changed: reloading", self.source.describe());
                        reloading = Some(self.start_reload(false));
                    } else if let Some(file) = self.changed_plugin_file() {
                        tracing::info!("plugin module {} changed: reloading", file.display());
                        reloading = Some(self.start_reload(true));
                    }
                }
                _ = sweep.tick() => {
                    outliers.sweep(&self.snapshot.load().clusters, tokio::time::Instant::now());
                }
                _ = terminate.recv() => {
                    self.drain().await;
                }
                _ = quit.recv() => {
                    // pingora hands the listening sockets to the proxy taking over, keeps
                    // accepting a few seconds, then drains and exits; the admin port goes
                    // to the new proxy now.
                    tracing::info!("SIGQUIT: handing over to a new proxy, then draining");
                    self.status.start_draining();
                    if let Some(admin) = admin.take() {
                        admin.abort();
                    }
                }
            }
        }
    }

    /// The first listener certificate or key file whose fingerprint changed since it was
    /// last seen.
    fn changed_certificate_file(&mut self) -> Option<std::path::PathBuf> {
        let snapshot = self.snapshot.load();
        let files = snapshot.http.tls.as_ref()?;
        let paths = files
            .certificates
            .iter()
            .flat_map(|(cert, key)| [cert, key])
            .map(std::path::PathBuf::from);
        first_changed(&mut self.certificate_fingerprints, paths)
    }

    /// Whether the workload certificate changed since the listener was last given it.
    fn workload_certificate_renewed(&mut self) -> bool {
        let Some(identity) = &self.identity else {
            return false;
        };
        let current = identity.current();
        let renewed = self
            .workload_certificate
            .as_ref()
            .is_none_or(|seen| !Arc::ptr_eq(seen, &current));
        self.workload_certificate = Some(current);
        renewed
    }

    /// Serves the current snapshot's listener certificates and client roots from the next
    /// handshake on; a set that cannot be read leaves the one in use.
    fn load_listener_certificates(&self) {
        let snapshot = self.snapshot.load();
        let Some(tls) = &snapshot.http.tls else {
            return;
        };
        if let Some(resolver) = &self.listener_certificates {
            match listener_certificate_set(tls, self.identity.as_ref()) {
                Ok(set) => resolver.replace(set),
                Err(e) => {
                    tracing::error!(
                        "listener certificates not replaced, the old ones serve on: {e}"
                    )
                }
            }
        }
        if let (Some(verifier), Some(roots)) =
            (&self.client_verifier, &snapshot.listener_client_roots)
        {
            if let Err(e) = verifier.replace(roots) {
                tracing::error!("listener client roots not replaced, the old ones verify on: {e}")
            }
        }
    }

    /// The first plugin module file whose fingerprint changed since it was last seen.
    fn changed_plugin_file(&mut self) -> Option<std::path::PathBuf> {
        let snapshot = self.snapshot.load();
        let paths = snapshot
            .plugins
            .values()
            .filter_map(|p| p.source_file.clone());
        first_changed(&mut self.plugin_fingerprints, paths)
    }

    /// Starts loading the source again on the blocking pool: reading, translating,
    /// resolving host names, downloading and compiling plugins take as long as they take
    /// there, while this thread keeps serving the admin port, probes, sweeps and signals.
    /// Unless `force`d (a plugin module changed on disk), an unchanged config is left alone.
    fn start_reload(&mut self, force: bool) -> ReloadTask {
        self.fingerprint = self.source.fingerprint();
        let current = self.snapshot.load_full();
        let source = self.source.clone();
        let (registry, metrics, plugins) = (
            Arc::clone(&self.registry),
            Arc::clone(&self.metrics),
            Arc::clone(&self.plugins),
        );
        let previous = Arc::clone(&current);
        let task = tokio::task::spawn_blocking(move || {
            source.load().map_err(|e| e.to_string()).and_then(|t| {
                if !force
                    && t.resources.version == previous.version
                    && t.bootstrap == previous.bootstrap
                {
                    return Ok((None, t.processes));
                }
                let compiler = Compiler {
                    registry: &registry,
                    metrics: &metrics,
                    previous_access_logs: previous.access_loggers(),
                    identity: None,
                };
                compiler
                    .build(&plugins, &t.bootstrap, &t.resources)
                    .map(|snapshot| (Some(snapshot), t.processes))
                    .map_err(|e| e.to_string())
            })
        });
        ReloadTask {
            task: Box::pin(task),
            current,
        }
    }

    /// Swaps in what a reload compiled, or keeps the old snapshot and says why.
    fn finish_reload(
        &mut self,
        result: Result<ReloadResult, tokio::task::JoinError>,
        current: Arc<Snapshot>,
    ) {
        let result = result.unwrap_or_else(|e| Err(format!("the reload failed: {e}")));
        let result = result.map(|(snapshot, processes)| {
            self.supervisor.reconcile(&processes);
            snapshot
        });
        match result {
            Ok(None) => {
                tracing::debug!("config unchanged (version {})", current.version);
                self.status.set_reload_error(None);
            }
            Ok(Some(snapshot)) => {
                // What the process set up at start: bound addresses, h2c, the kind of TLS.
                let fixed = |s: &Snapshot| {
                    let mut bound: Vec<SocketAddr> =
                        s.listeners.bound().map(|l| l.address).collect();
                    bound.sort();
                    (
                        bound,
                        s.http.h2c,
                        s.http.tls.as_ref().map(|t| {
                            (
                                t.client_roots.is_some(),
                                t.require_client_certificate,
                                t.workload_certificate,
                            )
                        }),
                    )
                };
                if fixed(&snapshot) != fixed(&current) {
                    tracing::warn!(
                        "listener addresses or TLS settings changed; the process keeps {:?} until restart (filter chains, routes and certificates follow the config)",
                        fixed(&current)
                    );
                }
                if snapshot.admin_address() != current.admin_address() {
                    tracing::warn!("admin.address changed; it takes effect at restart");
                }
                let version = snapshot.version.clone();
                self.snapshot.store(Arc::new(snapshot));
                self.after_swap();
                self.metrics.config_reloads.inc();
                self.status.set_reload_error(None);
                tracing::info!(%version, previous = %current.version, "config swapped in");
            }
            Err(reason) => {
                self.metrics.config_reload_failures.inc();
                tracing::error!(
                    "config reload refused, still serving version {}:\n{reason}",
                    current.version
                );
                self.status.set_reload_error(Some(reason));
            }
        }
    }

    /// After a new snapshot is in: probe its endpoints, forget state of endpoints and
    /// compiled plugin versions no snapshot uses (in-flight requests keep theirs through
    /// their own snapshot).
    fn after_swap(&mut self) {
        self.health
            .reconcile(&self.snapshot.load().clusters, &self.metrics);
        self.reconcile_jwks();
        self.load_listener_certificates();
        self.registry.prune();
        let live: Vec<u64> = self
            .snapshot
            .load()
            .plugins
            .values()
            .map(|p| p.key)
            .collect();
        self.plugins.retain(&live);
    }

    /// Fetches the remote JWKS the snapshot in force uses (and stops fetching others).
    fn reconcile_jwks(&mut self) {
        let remotes = self.snapshot.load().remote_jwks();
        self.jwks
            .reconcile(&remotes, &self.jwks_client, &self.metrics);
    }

    /// After SIGTERM: report not-ready, let pingora close the listener, wait for in-flight
    /// requests (up to the drain timeout), then exit.
    async fn drain(&self) {
        self.status.start_draining();
        let deadline = Instant::now() + self.drain_timeout;
        tracing::info!(
            "SIGTERM: draining in-flight requests (at most {:?})",
            self.drain_timeout
        );
        // Give pingora a moment to stop accepting before counting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        loop {
            let in_flight = self.metrics.downstream_rq_active.get();
            if in_flight <= 0 {
                tracing::info!("drained; exiting");
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!("drain timeout with {in_flight} requests in flight; exiting");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::process::exit(0);
    }
}
