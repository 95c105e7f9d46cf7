//! The endpoint registry: per-endpoint state and per-cluster controllers handed from one
//! compiled config to the next, so what they learned survives reloads.

use crate::upstream::breakers::ConnectionSlots;
use crate::upstream::concurrency::{ConcurrencyController, GradientConfig};
use crate::upstream::endpoint::EndpointState;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Hands out [`EndpointState`] per (cluster, address) and each cluster's adaptive
/// concurrency controller, so that what they learned survives reloads.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    states: Mutex<HashMap<(String, SocketAddr), Arc<EndpointState>>>,
    /// Each cluster's adaptive concurrency controller, with the settings it was made for.
    controllers: Mutex<HashMap<String, Arc<ConcurrencyController>>>,
    /// Each HTTP/1 cluster's connection slots, with the limits they were made for.
    slots: Mutex<HashMap<String, Arc<ConnectionSlots>>>,
}

impl EndpointRegistry {
    /// The state for an endpoint, created healthy on first sight.
    pub fn state(&self, cluster: &str, address: SocketAddr) -> Arc<EndpointState> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(states.entry((cluster.to_string(), address)).or_default())
    }

    /// The adaptive concurrency controller of a cluster: the one it had while its settings
    /// stay the same (a reload keeps the limit it learned), a new one otherwise.
    pub fn concurrency_controller(
        &self,
        cluster: &str,
        config: GradientConfig,
    ) -> Arc<ConcurrencyController> {
        let mut controllers = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        match controllers.get(cluster) {
            Some(existing) if *existing.config() == config => Arc::clone(existing),
            _ => {
                let controller = Arc::new(ConcurrencyController::new(config));
                controllers.insert(cluster.to_string(), Arc::clone(&controller));
                controller
            }
        }
    }

    /// The connection slots of a cluster: the ones it had while its limits stay the same
    /// (requests holding or waiting for a slot keep counting), new ones otherwise.
    pub fn connection_slots(
        &self,
        cluster: &str,
        max_connections: u32,
        max_pending: u32,
    ) -> Arc<ConnectionSlots> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get(cluster) {
            Some(existing) if existing.limits == (max_connections, max_pending) => {
                Arc::clone(existing)
            }
            _ => {
                let fresh = Arc::new(ConnectionSlots::new(max_connections, max_pending));
                slots.insert(cluster.to_string(), Arc::clone(&fresh));
                fresh
            }
        }
    }

    /// Forgets endpoints and controllers no live snapshot refers to any more.
    pub fn prune(&self) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|_, state| Arc::strong_count(state) > 1);
        drop(states);
        let mut controllers = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        controllers.retain(|_, controller| Arc::strong_count(controller) > 1);
        drop(controllers);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slots| Arc::strong_count(slots) > 1);
    }
}
