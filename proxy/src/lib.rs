//! # nip-proxy: the NIP data plane
//!
//! A `nip proxy` process takes client traffic on its listeners — an edge gateway's one
//! (HTTP/1.1 and h2c on the same port, or TLS with HTTP/2 by ALPN), or a sidecar's
//! intercepting ones, which tell HTTP, TLS and other protocols apart by their first bytes
//! and pass what is not HTTP through as TCP — routes each request by host, path, headers
//! and method, balances it over healthy endpoints of a cluster, retries what the route
//! allows, and reports everything on an admin port.
//!
//! How config flows (one way only):
//!
//! ```text
//! config_source (file: YAML ─nip-xds─▶ xDS resources; ads: a control plane)
//!        ──▶ compile::Compiler::compile ──▶ compile::Snapshot ──ArcSwap──▶ http::Gateway
//!                                                        (each request loads it once)
//! ```
//!
//! How a connection is taken: [`listener`] finds the listener that owns it (following its
//! original destination), inspects its first bytes and chooses a filter chain: a TCP relay,
//! or the HTTP path of that chain's connection manager. [`downstream`] admits it under the
//! listener's connection limit, keeps its idle, head and write-stall clocks, bounds its
//! head and checks its framing, and runs the HTTP/1 keep-alive loop (HTTP/2 goes through
//! pingora's own, behind a flood guard).
//!
//! How a request flows: [`http`] is pingora's `ProxyHttp`, its callbacks are the phases
//! (route → policy → admit → pick endpoint → forward → retry? → respond → log). [`route`]
//! matches (with [`matchers`]); [`policy`] authenticates (JWT), authorizes (RBAC, an
//! external service) and rate-limits (per route, per client, or for the fleet through a
//! rate limit service);
//! [`upstream`] narrows a cluster to the endpoints a try may use and its balancing policy
//! picks one (by latency across regions, by ring, …), ejects endpoints that keep failing
//! and probes them; [`plugins`] run proxy-wasm filters; [`ext_proc`] asks process
//! plugins over Envoy's external processing protocol, which [`supervisor`] keeps running
//! when the config gives their command; [`telemetry`] records; [`admin`]
//! shows. [`server`] wires the threads: pingora workers carry requests; one control thread
//! carries the admin port, reloads, health checks and draining.
//!
//! The modules are layers, declared below lowest first; a module uses only those above it
//! (ARCHITECTURE.md, "Layers of nip-proxy").
//!
//! With `control_plane` in its local config, the proxy follows a control plane over ADS
//! ([`config_source::ads`]): every set it receives goes through the same compiler, and a
//! set that does not compile is NACKed with the compiler's message. With
//! `control_plane.ca_file`, that stream is mutual TLS: [`identity`] gets the proxy a
//! certificate from the control plane's CA (joining with a join token the first time) and
//! renews it at half-life.
//!
//! This crate may not parse YAML except through [`config_source::file`], and nothing on
//! the request path blocks, locks a shared mutex, or logs on success — except that an
//! `ext_proc` processor's answer about a response body is waited for on the worker
//! (pingora filters response bodies synchronously), bounded by its `message_timeout`.

#![warn(missing_docs)]

pub mod admin;
pub mod compile;
pub mod config_source;
pub mod downstream;
pub mod ext_proc;
pub mod http;
pub mod identity;
pub mod listener;
pub mod matchers;
pub mod plugins;
pub mod policy;
pub mod route;
pub mod server;
pub mod supervisor;
pub mod telemetry;
mod threads;
pub mod upstream;

pub use config_source::ConfigSource;
pub use server::{run, ProxyOptions, StartError};
