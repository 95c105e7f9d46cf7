//! `ring_hash`: consistent hashing on a ring built exactly as Envoy builds it, so every
//! proxy, and Envoy, sends the same key to the same endpoint.

use super::{weighted_random, Balance};
use crate::upstream::endpoint::Endpoint;
use std::fmt::Write as _;

/// Ring sizes of `ring_hash` (Envoy's `RingHashLbConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSize {
    /// Fewest points.
    pub minimum: u64,
    /// Most points.
    pub maximum: u64,
}

impl Default for RingSize {
    /// Envoy's defaults.
    fn default() -> Self {
        RingSize {
            minimum: 1024,
            maximum: 8 * 1024 * 1024,
        }
    }
}

/// The ring: points (hash, endpoint index), sorted by hash.
#[derive(Debug)]
pub struct RingHash {
    ring: Vec<(u64, u32)>,
    size: RingSize,
}

impl RingHash {
    /// Builds the ring as Envoy's `RingHashLoadBalancer` does: scale = min(⌈min normalized
    /// weight × minimum⌉ / min normalized weight, maximum); endpoints take points in order
    /// from running sums of scale × normalized weight; a point is xxHash64 of
    /// `"address_n"`. (Envoy rebuilds its ring without unhealthy hosts; NIP keeps the ring
    /// and walks past them clockwise.)
    pub fn new(endpoints: &[Endpoint], size: RingSize) -> Self {
        let mut ring = Vec::new();
        if endpoints.is_empty() {
            return RingHash { ring, size };
        }
        let total: f64 = endpoints.iter().map(|e| f64::from(e.weight.max(1))).sum();
        let normalized: Vec<f64> = endpoints
            .iter()
            .map(|e| f64::from(e.weight.max(1)) / total)
            .collect();
        let min_normalized = normalized.iter().copied().fold(f64::INFINITY, f64::min);
        let scale = ((min_normalized * size.minimum as f64).ceil() / min_normalized)
            .min(size.maximum.max(1) as f64);
        ring.reserve(scale.ceil() as usize);
        let (mut current, mut target) = (0.0f64, 0.0f64);
        let mut key = String::new();
        for (index, (endpoint, weight)) in endpoints.iter().zip(&normalized).enumerate() {
            target += scale * weight;
            let mut n = 0u64;
            while current < target {
                key.clear();
                let _ = write!(key, "{}_{n}", endpoint.address);
                ring.push((
                    crate::upstream::hash::hash64(key.as_bytes()),
                    u32::try_from(index).unwrap_or(u32::MAX),
                ));
                n += 1;
                current += 1.0;
            }
        }
        ring.sort_unstable();
        RingHash { ring, size }
    }

    /// The sizes the ring was built for.
    pub fn size(&self) -> RingSize {
        self.size
    }

    /// The points, for tests.
    pub fn points(&self) -> &[(u64, u32)] {
        &self.ring
    }

    /// The first usable endpoint clockwise from `hash` on the ring.
    pub fn walk<'a>(
        &self,
        endpoints: &'a [Endpoint],
        hash: u64,
        usable: &impl Fn(&Endpoint) -> bool,
    ) -> Option<&'a Endpoint> {
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|(point, _)| *point < hash);
        let mut seen_last = u32::MAX;
        for step in 0..self.ring.len() {
            let (_, index) = self.ring[(start + step) % self.ring.len()];
            if index == seen_last {
                continue;
            }
            seen_last = index;
            let endpoint = endpoints.get(index as usize)?;
            if usable(endpoint) {
                return Some(endpoint);
            }
        }
        None
    }
}

impl Balance for RingHash {
    /// Without a hash (the route has no hash policy, or none of its sources was present),
    /// a weighted random endpoint.
    fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        hash: Option<u64>,
    ) -> Option<&'a Endpoint> {
        match hash {
            Some(hash) => self.walk(endpoints, hash, usable),
            None => weighted_random(endpoints, usable),
        }
    }
}
