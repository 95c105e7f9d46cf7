//! Compiling plugins and running their instances.
//!
//! [`PluginEngine`] is one per process: a wasmtime engine with epoch interruption (a
//! background thread advances the epoch every millisecond, so each callback gets a CPU
//! deadline) and an optional on-disk cache of compiled code. [`PluginModule`] is a plugin
//! compiled once and checked (ABI version exported, every import defined).
//! [`PluginInstance`] is one instantiated, configured VM; the proxy keeps one per plugin per
//! worker thread and drives HTTP contexts through it.

use crate::abi::Action;
use crate::host::{self, Callout, CalloutResponse, HostState, HttpState, NodeInfo, PluginIdentity};
use crate::shared::SharedState;
use crate::wasi;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{
    Config, Engine, Instance, InstancePre, Linker, Module, Store, StoreLimitsBuilder, TypedFunc,
};

/// How often the epoch advances; callback deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Numbers instances, so a context can tell whether the instance it was created in is
/// still the one running.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Why a plugin could not be loaded or a callback failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a module wasmtime accepts.
    #[error("plugin {plugin}: cannot compile: {reason}")]
    Compile {
        /// Plugin name.
        plugin: String,
        /// What wasmtime said.
        reason: String,
    },
    /// The module is not a proxy-wasm 0.2.x plugin.
    #[error("plugin {plugin}: {reason}")]
    Abi {
        /// Plugin name.
        plugin: String,
        /// What is missing.
        reason: String,
    },
    /// Instantiation or start-up failed (missing import, trap in `_initialize`…).
    #[error("plugin {plugin}: cannot start: {reason}")]
    Start {
        /// Plugin name.
        plugin: String,
        /// What failed.
        reason: String,
    },
    /// `on_vm_start` or `on_configure` returned false.
    #[error("plugin {plugin}: {callback} returned false (the plugin rejected its configuration)")]
    Rejected {
        /// Plugin name.
        plugin: String,
        /// Which callback.
        callback: &'static str,
    },
    /// An SDK plugin built for a plugin API this host does not run.
    #[error("plugin {plugin}: {reason}")]
    Incompatible {
        /// Plugin name.
        plugin: String,
        /// Both versions.
        reason: String,
    },
    /// A callback trapped, ran out of memory or passed its CPU deadline.
    #[error("plugin {plugin}: {callback} failed: {reason}")]
    Trap {
        /// Plugin name.
        plugin: String,
        /// Which callback.
        callback: &'static str,
        /// The trap.
        reason: String,
    },
}

/// Resource ceilings of one plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginLimits {
    /// Linear memory ceiling in bytes.
    pub memory_bytes: usize,
    /// CPU time one callback may take.
    pub callback_deadline: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory_bytes: 64 << 20,
            callback_deadline: Duration::from_millis(100),
        }
    }
}

/// The process-wide wasm engine.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    shared: Arc<SharedState>,
    linker: Arc<Linker<HostState>>,
    _ticker: Arc<Ticker>,
}

/// Stops the epoch thread when the last engine handle goes.
struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// Data and metrics shared by all plugin instances of this engine.
    pub fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }

    /// Creates the engine; `cache_dir` keeps compiled code across restarts.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        if let Some(dir) = cache_dir {
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            let cache = wasmtime::Cache::new(cache).map_err(|e| format!("plugin cache: {e}"))?;
            config.cache(Some(cache));
        }
        let engine = Engine::new(&config).map_err(|e| format!("wasm engine: {e}"))?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(|e| format!("linking env: {e}"))?;
        wasi::add_to_linker(&mut linker).map_err(|e| format!("linking WASI: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticking = engine.clone();
        let stop_flag = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("nip-wasm-epoch".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| format!("epoch thread: {e}"))?;
        Ok(PluginEngine {
            engine,
            shared: Arc::default(),
            linker: Arc::new(linker),
            _ticker: Arc::new(Ticker(stop)),
        })
    }
}

/// A compiled, checked plugin.
#[derive(Clone)]
pub struct PluginModule {
    engine: PluginEngine,
    pre: InstancePre<HostState>,
    identity: Arc<PluginIdentity>,
    node: Arc<NodeInfo>,
    limits: PluginLimits,
}

impl PluginModule {
    /// Compiles `wasm` and checks it is a proxy-wasm 0.2.x plugin this host can link.
    pub fn compile(
        engine: &PluginEngine,
        identity: PluginIdentity,
        node: NodeInfo,
        limits: PluginLimits,
        wasm: &[u8],
    ) -> Result<Self, PluginError> {
        let plugin = identity.name.clone();
        let module = Module::new(&engine.engine, wasm).map_err(|e| PluginError::Compile {
            plugin: plugin.clone(),
            reason: format!("{e:#}"),
        })?;
        let abi = module.exports().any(|e| {
            matches!(
                e.name(),
                "proxy_abi_version_0_2_1" | "proxy_abi_version_0_2_0"
            )
        });
        if !abi {
            return Err(PluginError::Abi {
                plugin,
                reason: "exports neither proxy_abi_version_0_2_1 nor proxy_abi_version_0_2_0; \
                         is it built with a proxy-wasm SDK?"
                    .into(),
            });
        }
        let pre = engine
            .linker
            .instantiate_pre(&module)
            .map_err(|e| PluginError::Abi {
                plugin,
                reason: format!("{e:#} (this host provides proxy-wasm 0.2.1 and WASI preview1)"),
            })?;
        Ok(PluginModule {
            engine: engine.clone(),
            pre,
            identity: Arc::new(identity),
            node: Arc::new(node),
            limits,
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.identity.name
    }
}

/// `proxy_on_http_call_response(root, token, headers, body_size, trailers)`.
type HttpCallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The guest functions the host calls, resolved once per instance.
struct Callbacks {
    context_create: TypedFunc<(i32, i32), ()>,
    request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    http_call_response: Option<HttpCallResponseFn>,
    tick: Option<TypedFunc<i32, ()>>,
    queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    log: Option<TypedFunc<i32, ()>>,
    done: Option<TypedFunc<i32, i32>>,
    delete: Option<TypedFunc<i32, ()>>,
    foreign_function: Option<TypedFunc<(i32, i32, i32), ()>>,
}

/// One running, configured plugin VM.
pub struct PluginInstance {
    store: Store<HostState>,
    callbacks: Callbacks,
    name: Arc<PluginIdentity>,
    root_context: i32,
    next_context: i32,
    deadline_ticks: u64,
    generation: u64,
}

impl PluginInstance {
    /// Instantiates and starts a plugin: `_initialize`/`_start`, `main`, the root context,
    /// `on_vm_start` and `on_configure`, which must both accept.
    pub fn start(module: &PluginModule) -> Result<Self, PluginError> {
        let plugin = module.identity.name.clone();
        let start_error = |reason: String| PluginError::Start {
            plugin: plugin.clone(),
            reason,
        };
        let state = HostState {
            plugin: Arc::clone(&module.identity),
            node: Arc::clone(&module.node),
            limits: StoreLimitsBuilder::new()
                .memory_size(module.limits.memory_bytes)
                .instances(1)
                .build(),
            started: Instant::now(),
            tick_period_ms: 0,
            effective_context: 0,
            http: None,
            shared: Arc::clone(&module.engine.shared),
            callouts: Vec::new(),
            last_token: 0,
            callout_response: None,
            wake: Arc::default(),
            queues: Vec::new(),
            declaration: None,
            report: None,
        };
        let mut store = Store::new(&module.engine.engine, state);
        store.limiter(|s| &mut s.limits);
        let deadline_ticks = (module.limits.callback_deadline.as_millis() as u64).max(1);
        store.set_epoch_deadline(deadline_ticks);
        let instance: Instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| start_error(format!("{e:#}")))?;
        for init in ["_initialize", "_start"] {
            if let Ok(f) = instance.get_typed_func::<(), ()>(&mut store, init) {
                store.set_epoch_deadline(deadline_ticks);
                f.call(&mut store, ())
                    .map_err(|e| start_error(format!("{init}: {e:#}")))?;
                break;
            }
        }
        if let Ok(main) = instance.get_typed_func::<(i32, i32), i32>(&mut store, "main") {
            store.set_epoch_deadline(deadline_ticks);
            main.call(&mut store, (0, 0))
                .map_err(|e| start_error(format!("main: {e:#}")))?;
        }
        let callbacks = Callbacks {
            context_create: instance
                .get_typed_func(&mut store, "proxy_on_context_create")
                .map_err(|_| PluginError::Abi {
                    plugin: plugin.clone(),
                    reason: "does not export proxy_on_context_create".into(),
                })?,
            request_headers: instance
                .get_typed_func(&mut store, "proxy_on_request_headers")
                .ok(),
            request_body: instance
                .get_typed_func(&mut store, "proxy_on_request_body")
                .ok(),
            response_headers: instance
                .get_typed_func(&mut store, "proxy_on_response_headers")
                .ok(),
            response_body: instance
                .get_typed_func(&mut store, "proxy_on_response_body")
                .ok(),
            response_trailers: instance
                .get_typed_func(&mut store, "proxy_on_response_trailers")
                .ok(),
            http_call_response: instance
                .get_typed_func(&mut store, "proxy_on_http_call_response")
                .ok(),
            tick: instance.get_typed_func(&mut store, "proxy_on_tick").ok(),
            queue_ready: instance
                .get_typed_func(&mut store, "proxy_on_queue_ready")
                .ok(),
            log: instance.get_typed_func(&mut store, "proxy_on_log").ok(),
            done: instance.get_typed_func(&mut store, "proxy_on_done").ok(),
            delete: instance.get_typed_func(&mut store, "proxy_on_delete").ok(),
            foreign_function: instance
                .get_typed_func(&mut store, "proxy_on_foreign_function")
                .ok(),
        };
        let mut this = PluginInstance {
            store,
            callbacks,
            name: Arc::clone(&module.identity),
            root_context: 1,
            next_context: 2,
            deadline_ticks,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        };
        let root = this.root_context;
        this.guard(root, "proxy_on_context_create", |store, cb| {
            cb.context_create.call(store, (root, 0))
        })?;
        let vm_config_len = module.identity.vm_config.len() as i32;
        let plugin_config_len = module.identity.plugin_config.len() as i32;
        for (callback, size) in [
            ("proxy_on_vm_start", vm_config_len),
            ("proxy_on_configure", plugin_config_len),
        ] {
            let Ok(f) = instance.get_typed_func::<(i32, i32), i32>(&mut this.store, callback)
            else {
                continue;
            };
            let accepted = this.guard(root, callback, |store, _| f.call(store, (root, size)))?;
            // An SDK plugin declares itself in on_vm_start: refuse an API this host does
            // not run before any more of its code does.
            if let Some(declared) = &this.store.data().declaration {
                declared
                    .check()
                    .map_err(|reason| PluginError::Incompatible {
                        plugin: module.identity.name.clone(),
                        reason: format!("{} {}: {reason}", declared.name, declared.version),
                    })?;
            }
            if accepted == 0 {
                return Err(PluginError::Rejected {
                    plugin: module.identity.name.clone(),
                    callback,
                });
            }
        }
        Ok(this)
    }

    /// Runs one guest call for `context` under the CPU deadline.
    fn guard<T>(
        &mut self,
        context: i32,
        callback: &'static str,
        call: impl FnOnce(&mut Store<HostState>, &Callbacks) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        self.store.data_mut().effective_context = context as u32;
        self.store.set_epoch_deadline(self.deadline_ticks);
        call(&mut self.store, &self.callbacks).map_err(|e| PluginError::Trap {
            plugin: self.name.name.clone(),
            callback,
            reason: describe_trap(&e),
        })
    }

    /// Starts an HTTP context for one request; returns its id.
    pub fn create_http_context(&mut self) -> Result<i32, PluginError> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        let root = self.root_context;
        self.guard(id, "proxy_on_context_create", |store, cb| {
            cb.context_create.call(store, (id, root))
        })?;
        Ok(id)
    }

    /// Runs `on_request_headers` with `http` in reach of the host functions.
    pub fn on_request_headers(
        &mut self,
        context: i32,
        http: &mut HttpState,
        end_of_stream: bool,
    ) -> Result<Action, PluginError> {
        let count = http.request_headers.len() as i32;
        self.with_http(
            context,
            http,
            "proxy_on_request_headers",
            |store, cb| match &cb.request_headers {
                Some(f) => f.call(store, (context, count, i32::from(end_of_stream))),
                None => Ok(0),
            },
        )
        .map(Action::from_raw)
    }

    /// Runs `on_request_body` on `http.request_body` (everything buffered for this plugin so
    /// far); the plugin may edit it there.
    pub fn on_request_body(
        &mut self,
        context: i32,
        http: &mut HttpState,
        end_of_stream: bool,
    ) -> Result<Action, PluginError> {
        let size = http.request_body.len() as i32;
        self.with_http(
            context,
            http,
            "proxy_on_request_body",
            |store, cb| match &cb.request_body {
                Some(f) => f.call(store, (context, size, i32::from(end_of_stream))),
                None => Ok(0),
            },
        )
        .map(Action::from_raw)
    }

    /// Runs `on_response_body` on `http.response_body`.
    pub fn on_response_body(
        &mut self,
        context: i32,
        http: &mut HttpState,
        end_of_stream: bool,
    ) -> Result<Action, PluginError> {
        let size = http.response_body.len() as i32;
        self.with_http(
            context,
            http,
            "proxy_on_response_body",
            |store, cb| match &cb.response_body {
                Some(f) => f.call(store, (context, size, i32::from(end_of_stream))),
                None => Ok(0),
            },
        )
        .map(Action::from_raw)
    }

    /// Runs `on_response_trailers` on `http.response_trailers`.
    pub fn on_response_trailers(
        &mut self,
        context: i32,
        http: &mut HttpState,
    ) -> Result<Action, PluginError> {
        let count = http.response_trailers.len() as i32;
        self.with_http(
            context,
            http,
            "proxy_on_response_trailers",
            |store, cb| match &cb.response_trailers {
                Some(f) => f.call(store, (context, count)),
                None => Ok(0),
            },
        )
        .map(Action::from_raw)
    }

    /// Delivers the answer to callout `token`. `http` is the request that made the call when
    /// it is waiting for it, so the plugin can resume it or answer it locally.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: CalloutResponse,
        http: Option<&mut HttpState>,
    ) -> Result<(), PluginError> {
        let root = self.root_context;
        let counts = (
            response.headers.len() as i32,
            response.body.len() as i32,
            response.trailers.len() as i32,
        );
        self.store.data_mut().callout_response = Some(response);
        let call = |store: &mut Store<HostState>, cb: &Callbacks| match &cb.http_call_response {
            Some(f) => f.call(store, (root, token as i32, counts.0, counts.1, counts.2)),
            None => Ok(()),
        };
        let result = match http {
            Some(http) => self.with_http(root, http, "proxy_on_http_call_response", call),
            None => self.guard(root, "proxy_on_http_call_response", call),
        };
        self.store.data_mut().callout_response = None;
        result
    }

    /// What the plugin declared about itself, if it was built with an SDK.
    pub fn declaration(&self) -> Option<&crate::sdk::Declaration> {
        self.store.data().declaration.as_ref()
    }

    /// Asks an SDK plugin for a report ([`crate::sdk::HEALTH_CHECK`],
    /// [`crate::sdk::RESOURCE_USAGE`]) under the CPU deadline; `None` from a raw plugin or
    /// one that did not answer.
    pub fn sdk_report(&mut self, function: i32) -> Result<Option<Vec<u8>>, PluginError> {
        if self.store.data().declaration.is_none() || self.callbacks.foreign_function.is_none() {
            return Ok(None);
        }
        let root = self.root_context;
        self.store.data_mut().report = None;
        self.guard(root, "proxy_on_foreign_function", |store, cb| {
            match &cb.foreign_function {
                Some(f) => f.call(store, (root, function, 0)),
                None => Ok(()),
            }
        })?;
        Ok(self.store.data_mut().report.take())
    }

    /// Runs `on_tick` on the root context.
    pub fn on_tick(&mut self) -> Result<(), PluginError> {
        let root = self.root_context;
        self.guard(root, "proxy_on_tick", |store, cb| match &cb.tick {
            Some(f) => f.call(store, root),
            None => Ok(()),
        })
    }

    /// Runs `on_queue_ready` for a queue this instance registered.
    pub fn on_queue_ready(&mut self, token: u32) -> Result<(), PluginError> {
        let root = self.root_context;
        self.guard(root, "proxy_on_queue_ready", |store, cb| {
            match &cb.queue_ready {
                Some(f) => f.call(store, (root, token as i32)),
                None => Ok(()),
            }
        })
    }

    /// Takes the calls the plugin dispatched since the last time; the proxy performs them.
    pub fn take_callouts(&mut self) -> Vec<Callout> {
        std::mem::take(&mut self.store.data_mut().callouts)
    }

    /// The tick period the plugin asked for, if any.
    pub fn tick_period(&self) -> Option<Duration> {
        match self.store.data().tick_period_ms {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        }
    }

    /// Notified when a queue this instance registered receives an item.
    pub fn queue_wake(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.store.data().wake)
    }

    /// Registered queues that have items waiting.
    pub fn ready_queues(&self) -> Vec<u32> {
        let state = self.store.data();
        state
            .queues
            .iter()
            .copied()
            .filter(|token| state.shared.queue_has_items(*token))
            .collect()
    }

    /// Identifies this instance among all instances ever started in the process.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Runs `on_response_headers`.
    pub fn on_response_headers(
        &mut self,
        context: i32,
        http: &mut HttpState,
        end_of_stream: bool,
    ) -> Result<Action, PluginError> {
        let count = http.response_headers.len() as i32;
        self.with_http(
            context,
            http,
            "proxy_on_response_headers",
            |store, cb| match &cb.response_headers {
                Some(f) => f.call(store, (context, count, i32::from(end_of_stream))),
                None => Ok(0),
            },
        )
        .map(Action::from_raw)
    }

    /// Runs `on_log`, `on_done` and `on_delete`: the end of a context.
    pub fn finish_http_context(
        &mut self,
        context: i32,
        http: &mut HttpState,
    ) -> Result<(), PluginError> {
        self.with_http(context, http, "proxy_on_log", |store, cb| match &cb.log {
            Some(f) => f.call(store, context),
            None => Ok(()),
        })?;
        self.guard(context, "proxy_on_done", |store, cb| match &cb.done {
            Some(f) => f.call(store, context).map(|_| ()),
            None => Ok(()),
        })?;
        self.guard(context, "proxy_on_delete", |store, cb| match &cb.delete {
            Some(f) => f.call(store, context),
            None => Ok(()),
        })
    }

    /// Moves the request's state into the store for one call and back out afterwards.
    fn with_http<T>(
        &mut self,
        context: i32,
        http: &mut HttpState,
        callback: &'static str,
        call: impl FnOnce(&mut Store<HostState>, &Callbacks) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        self.store.data_mut().http = Some(std::mem::take(http));
        let result = self.guard(context, callback, call);
        if let Some(state) = self.store.data_mut().http.take() {
            *http = state;
        }
        result
    }
}

fn describe_trap(error: &wasmtime::Error) -> String {
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        return match trap {
            wasmtime::Trap::Interrupt => "CPU deadline exceeded".to_string(),
            other => format!("trap: {other}"),
        };
    }
    format!("{error:#}")
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginEngine")
    }
}

impl std::fmt::Debug for PluginModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginModule")
            .field("name", &self.identity.name)
            .field("limits", &self.limits)
            .finish()
    }
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance")
            .field("name", &self.name.name)
            .field("next_context", &self.next_context)
            .finish()
    }
}
