//! # nip-filters: the proxy-wasm plugin host
//!
//! Runs HTTP filter plugins written against the proxy-wasm ABI 0.2.1 (and 0.2.0) — in Rust,
//! C, AssemblyScript, TinyGo or anything else that targets wasm32 — on wasmtime.
//!
//! How a plugin flows:
//!
//! ```text
//! .wasm bytes ──PluginModule::compile──▶ compiled once, ABI checked, imports linked
//!             ──PluginInstance::start──▶ one VM per plugin per worker: _initialize, root
//!                                        context, on_vm_start, on_configure
//! request     ──create_http_context / on_request_headers / on_request_body /
//!               on_response_headers / on_response_body / finish_http_context──▶
//!               the plugin reads and edits an HttpState (headers, bodies, local reply,
//!               properties) through host functions
//! callouts    ──take_callouts──▶ the proxy performs them ──on_http_call_response──▶ plugin
//! background  ──on_tick / on_queue_ready──▶ the root context, driven by the proxy
//! ```
//!
//! * [`abi`]: status codes, enumerations and the header-map wire format.
//! * [`host`]: the store's state and the `env` host functions.
//! * [`logs`]: the latest lines plugins logged, in a bounded ring an operator can read.
//! * [`wasi`]: the full WASI preview1 import set (real where plugins need it, ENOSYS else).
//! * [`plugin`]: engine (epoch deadlines, compile cache), modules and instances.
//! * [`shared`]: shared data (with CAS), shared queues and plugin metrics, common to all
//!   instances.
//! * [`sdk`]: what SDK v2 plugins declare (name, version, API version, checked at start)
//!   and report (health, resource usage) through the ABI's foreign functions.
//!
//! This crate knows nothing of pingora or sockets: the proxy copies a request's headers and
//! body chunks in and the plugin's edits out, and performs the HTTP calls plugins dispatch.
//! gRPC callouts, L4 callbacks, foreign functions other than the SDK's,
//! `proxy_set_property` and `proxy_get_status` answer `UNIMPLEMENTED` (`NOT_FOUND` for an
//! unknown foreign function).

#![warn(missing_docs)]

pub mod abi;
pub mod host;
pub mod logs;
pub mod plugin;
pub mod sdk;
pub mod shared;
pub mod wasi;

pub use plugin::{PluginEngine, PluginError, PluginInstance, PluginLimits, PluginModule};
