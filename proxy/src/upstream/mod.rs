//! Where a request goes once it has a route: clusters and their endpoints.
//!
//! A try's way: [`cluster`] narrows a cluster's [`endpoint`]s to those the try may use
//! (priorities, localities, pinned regions, health, ejection) and [`lb`] picks one by the
//! cluster's policy (one file per policy); [`breakers`] bound requests, retries and
//! connections; [`registry`] keeps per-endpoint state across config versions. Around them:
//! [`ewma`] measures latency, [`hash`] keys the ring, [`outlier`] ejects endpoints that keep
//! failing, [`concurrency`] sheds load by a gradient limit, [`health`] probes endpoints.
//! Depends only on [`crate::telemetry`].

pub mod breakers;
pub mod cluster;
pub mod concurrency;
pub mod endpoint;
pub mod ewma;
pub mod hash;
pub mod health;
pub mod lb;
pub mod outlier;
pub mod peer;
pub mod registry;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;

/// The clusters of one config version, by name.
pub type Clusters = BTreeMap<String, Arc<cluster::Cluster>>;
