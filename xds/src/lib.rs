//! # nip-xds: from the config a user writes to the xDS resources a proxy runs on
//!
//! NIP has one path from configuration to traffic:
//!
//! ```text
//! YAML ──config::Config::from_yaml──▶ Config ──translate::translate──▶ ResourceSet (xDS v3)
//!                                                                          │
//!                        (later: the control plane sends the same over ADS)│
//!                                                                          ▼
//!                                                     nip-proxy compiles it into a snapshot
//! ```
//!
//! * [`config`] owns the v4 YAML model: strict parsing, and validation whose every error
//!   names the field path it is about.
//! * [`translate`] turns a validated config into Envoy's own resource types (`envoy-types`):
//!   `Listener` + `HttpConnectionManager`, `RouteConfiguration`, `Cluster`,
//!   `ClusterLoadAssignment`, and a `Bootstrap` holding node identity and the admin address.
//! * [`identity`] names workloads (SPIFFE IDs), makes a proxy's key and CSR, and reads what
//!   a certificate says about its holder.
//! * [`resources`] groups one consistent set of resources under one content version.
//! * [`mesh`] builds mesh mutual TLS (workload certificates, the trust bundle) and makes
//!   clusters reach endpoints that are mesh proxies over it, with no per-service config.
//! * [`secrets`] names TLS material (SDS): which secrets listeners and clusters use, and
//!   the one a proxy resolves itself (its workload certificate).
//! * [`client`] keeps a proxy's resource set in step with any ADS server, ACKing what the
//!   proxy's compiler accepts and NACKing the rest with the reason.
//! * [`server`] serves resource sets to any xDS client over ADS: a snapshot cache with
//!   per-resource versions, nonces, ACK/NACK tracking per proxy, make-before-break pushes.
//!
//! Only [`server`] and [`client`] open sockets (through tonic); nothing here looks at a request, and the
//! proxy may not read YAML.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod identity;
pub mod json;
pub mod mesh;
pub mod resources;
pub mod schema;
pub mod secrets;
pub mod server;
pub mod stored_modules;
#[cfg(test)]
mod test_support;
pub mod translate;

pub use envoy_types;
pub use resources::ResourceSet;
