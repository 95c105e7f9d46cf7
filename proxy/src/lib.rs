//! # nip-proxy: the NIP data plane
//!
//! A `nip proxy` process takes client traffic on one listener (HTTP/1.1 and h2c on the same
//! port, or TLS with HTTP/2 by ALPN), routes each request by host, path, headers and method,
//! balances it over healthy endpoints of a cluster, retries what the route allows, and
//! reports everything on an admin port.
//!
//! How config flows (one way only):
//!
//! ```text
//! source::ConfigSource ──(nip-xds: YAML → xDS resources)──▶ snapshot::Compiler::compile
//!        ──▶ snapshot::Snapshot ──ArcSwap──▶ gateway::Gateway (each request loads it once)
//! ```
//!
//! How a connection is taken: [`downstream`] admits it under the listener's connection
//! limit, keeps its idle and head clocks, bounds its head and checks its framing, and runs
//! the HTTP/1 keep-alive loop (HTTP/2 goes through pingora's own, behind a flood guard).
//!
//! How a request flows: [`gateway`] is pingora's `ProxyHttp`, its callbacks are the phases
//! (route → pick endpoint → forward → retry? → respond → log). [`router`] matches,
//! [`cluster`] picks endpoints (by latency with [`ewma`], across regions, within circuit
//! breakers), [`outlier`] ejects the ones that keep failing, [`health`] probes them, [`metrics`] and [`access_log`]
//! record, [`admin`] shows. [`server`] wires the threads: pingora workers carry requests;
//! one control thread carries the admin port, reloads, health checks and draining.
//!
//! With `control_plane` in its local config, the proxy instead follows a control plane over
//! ADS ([`xds_feed`]): every set it receives goes through the same compiler, and a set that
//! does not compile is NACKed with the compiler's message.
//!
//! This crate may not parse YAML except through [`source`], and nothing on the request path
//! blocks, locks a shared mutex, or logs on success.

#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod cluster;
pub mod concurrency;
pub mod downstream;
pub mod ewma;
pub mod gateway;
pub mod hash;
pub mod health;
pub mod metrics;
pub mod outlier;
pub mod plugins;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod sockets;
pub mod source;
mod threads;
pub mod xds_feed;

pub use server::{run, ProxyOptions, StartError};
pub use source::ConfigSource;
