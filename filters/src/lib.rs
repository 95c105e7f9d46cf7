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
//! request     ──create_http_context / on_request_headers / on_response_headers /
//!               finish_http_context──▶ the plugin reads and edits an HttpState (headers,
//!                                       local reply, properties) through host functions
//! ```
//!
//! * [`abi`]: status codes, enumerations and the header-map wire format.
//! * [`host`]: the store's state and the `env` host functions.
//! * [`wasi`]: the full WASI preview1 import set (real where plugins need it, ENOSYS else).
//! * [`plugin`]: engine (epoch deadlines, compile cache), modules and instances.
//! * [`shared`]: shared data (with CAS) and plugin metrics, common to all instances.
//!
//! This crate knows nothing of pingora or sockets; the proxy copies a request's headers in
//! and the plugin's edits out. Not yet here (see the issue note): bodies, `proxy_http_call`,
//! timers, shared queues; they answer `UNIMPLEMENTED` today.

#![warn(missing_docs)]

pub mod abi;
pub mod host;
pub mod plugin;
pub mod shared;
pub mod wasi;

pub use plugin::{PluginEngine, PluginError, PluginInstance, PluginLimits, PluginModule};
