//! NIP's end-to-end tests: real `nip` processes, real backends and real peers, one module
//! per area. They form one test binary so that a build links pingora, wasmtime and tonic
//! into a test executable once instead of once per area (each link is ~100 MB on disk).
//! Run one area with `cargo test --test e2e data_plane::`.

mod common;

mod control_plane;
mod dashboard;
mod data_plane;
mod deploy;
mod developer_cli;
mod edge_policy;
mod examples;
mod front_door;
mod gateway;
mod interception;
mod interop;
mod migration;
mod multi_region;
mod observability;
mod overload;
mod plugin_sdk;
mod plugins;
mod trust;
