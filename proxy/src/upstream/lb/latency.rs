//! `latency`: of two usable endpoints drawn by weight, the one with the lower predicted
//! cost (peak EWMA latency, or a silence past its grace, × requests in flight + 1), in the
//! region traffic goes to now ([`Regions`]).

use super::{two_choices, Balance};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::ewma::EwmaConfig;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Endpoints by region and which region `lb: latency` sends traffic to now.
///
/// The predicted latency of a region is the lowest [`EndpointState::region_predicted`] among
/// its usable endpoints — the smoothed average, or a silence past its grace (load is
/// weighed inside the region, by the two choices; weighing it here too would send traffic
/// back and forth between regions as requests come and go). Traffic stays in the proxy's
/// own region until that is
/// slower than the best region by more than [`REGION_MARGIN`] (or has nothing usable),
/// then goes to the best; it comes back once the local prediction is within half the margin
/// of where traffic is (hysteresis: no flapping between close regions). Other regions are
/// explored so that their predictions stay current — that is how a recovered region is
/// noticed: each at most once per [`EXPLORE_INTERVAL`], and only on one pick in
/// [`EXPLORE_EVERY`], so exploring costs a bounded share of traffic at any rate (p99 stays
/// the local region's), and never while a try explored there is still unanswered.
#[derive(Debug)]
pub struct Regions {
    /// Region names and the indexes of their endpoints.
    groups: Vec<(String, Vec<usize>)>,
    /// The group of the proxy's own region.
    local: Option<usize>,
    /// The group traffic goes to now.
    current: AtomicUsize,
    /// Counts picks, to spread exploration.
    picks: AtomicU64,
    /// When each group was last explored, in ms since `base` (0: never).
    explored_at_ms: Vec<AtomicU64>,
    base: tokio::time::Instant,
}

/// How much slower (relative) the current region may be than the best before traffic moves.
pub const REGION_MARGIN: f64 = 0.5;

/// At most one pick in this many explores another region.
pub const EXPLORE_EVERY: u64 = 50;

/// A region is explored at most this often.
pub const EXPLORE_INTERVAL: Duration = Duration::from_secs(1);

impl Regions {
    /// Groups `endpoints` by region, in the order regions first appear.
    fn new(endpoints: &[Endpoint]) -> Self {
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, endpoint) in endpoints.iter().enumerate() {
            match groups
                .iter_mut()
                .find(|(r, _)| *r == endpoint.locality.region)
            {
                Some((_, members)) => members.push(i),
                None => groups.push((endpoint.locality.region.clone(), vec![i])),
            }
        }
        Regions {
            explored_at_ms: groups.iter().map(|_| AtomicU64::new(0)).collect(),
            groups,
            local: None,
            current: AtomicUsize::new(0),
            picks: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
        }
    }
}

/// The `latency` policy: its decay settings and region tracking.
#[derive(Debug)]
pub struct Latency {
    config: EwmaConfig,
    regions: Regions,
}

impl Latency {
    /// `latency` over `endpoints`, with no local region yet.
    pub fn new(config: EwmaConfig, endpoints: &[Endpoint]) -> Self {
        Latency {
            config,
            regions: Regions::new(endpoints),
        }
    }

    /// Tells the policy which region the proxy runs in: it is preferred.
    pub fn set_local_region(&mut self, region: &str) {
        self.regions.local = self.regions.groups.iter().position(|(r, _)| r == region);
        if let Some(local) = self.regions.local {
            self.regions.current.store(local, Ordering::Relaxed);
        }
    }

    /// The region traffic goes to now, if the endpoints span several.
    pub fn current_region(&self) -> Option<&str> {
        if self.regions.groups.len() < 2 {
            return None;
        }
        let current = self.regions.current.load(Ordering::Relaxed);
        self.regions.groups.get(current).map(|(r, _)| r.as_str())
    }

    /// Predicted latency of each region (lowest estimate among its usable endpoints),
    /// `None` when nothing there is usable.
    pub fn region_predictions<'a>(
        &'a self,
        endpoints: &[Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
    ) -> Vec<(&'a str, Option<Duration>)> {
        let now = tokio::time::Instant::now();
        self.regions
            .groups
            .iter()
            .enumerate()
            .map(|(g, (region, _))| {
                let cost = self.region_cost(endpoints, g, usable, now);
                (
                    region.as_str(),
                    cost.map(|ns| Duration::from_nanos(ns as u64)),
                )
            })
            .collect()
    }

    fn region_cost(
        &self,
        endpoints: &[Endpoint],
        group: usize,
        usable: &impl Fn(&Endpoint) -> bool,
        now: tokio::time::Instant,
    ) -> Option<f64> {
        self.regions.groups[group]
            .1
            .iter()
            .filter_map(|&i| endpoints.get(i))
            .filter(|e| usable(e))
            .map(|e| e.state.region_predicted(&self.config, now).as_nanos() as f64)
            .min_by(|a, b| a.total_cmp(b))
    }

    /// The region traffic should go to now (see [`Regions`]), remembered for the next pick.
    fn choose_region(
        &self,
        endpoints: &[Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        now: tokio::time::Instant,
    ) -> Option<usize> {
        // No allocation: a region count is small, each cost a pass over its endpoints.
        let cost = |g: usize| self.region_cost(endpoints, g, usable, now);
        let best = (0..self.regions.groups.len())
            .filter_map(|g| cost(g).map(|c| (g, c)))
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        let current = self.regions.current.load(Ordering::Relaxed);
        let here = (current < self.regions.groups.len())
            .then(|| cost(current))
            .flatten();
        let local = self.regions.local.and_then(|l| cost(l).map(|c| (l, c)));
        let next = match (local, here) {
            // Nothing usable where traffic goes: the best region.
            (_, None) => best.0,
            (Some((l, local_cost)), Some(_)) if current == l => {
                if local_cost > best.1 * (1.0 + REGION_MARGIN) {
                    best.0
                } else {
                    l
                }
            }
            (Some((l, local_cost)), Some(here))
                if local_cost <= here * (1.0 + REGION_MARGIN / 2.0) =>
            {
                l
            }
            (_, Some(here)) if best.1 * (1.0 + REGION_MARGIN) < here => best.0,
            _ => current,
        };
        if next != current {
            self.regions.current.store(next, Ordering::Relaxed);
        }
        Some(next)
    }

    /// Another region due for exploration (see [`Regions`]), claimed for this pick: not
    /// explored for [`EXPLORE_INTERVAL`], something usable, no explored try unanswered.
    fn region_to_explore(
        &self,
        endpoints: &[Endpoint],
        chosen: usize,
        usable: &impl Fn(&Endpoint) -> bool,
        now: tokio::time::Instant,
    ) -> Option<usize> {
        let now_ms = u64::try_from(now.saturating_duration_since(self.regions.base).as_millis())
            .unwrap_or(u64::MAX)
            + 1;
        let interval_ms = u64::try_from(EXPLORE_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        (0..self.regions.groups.len()).find(|&g| {
            let last = self.regions.explored_at_ms[g].load(Ordering::Relaxed);
            g != chosen
                && (last == 0 || now_ms >= last.saturating_add(interval_ms))
                && !self.regions.groups[g]
                    .1
                    .iter()
                    .filter_map(|&i| endpoints.get(i))
                    .any(|e| e.state.awaiting_answer())
                && self.region_cost(endpoints, g, usable, now).is_some()
                && self.regions.explored_at_ms[g]
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// Power of two choices by predicted cost (peak EWMA or silence, × in flight + 1).
    fn cheaper_of_two<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        now: tokio::time::Instant,
    ) -> Option<&'a Endpoint> {
        let (a, b) = two_choices(endpoints, usable)?;
        let config = &self.config;
        Some(if b.state.cost(config, now) < a.state.cost(config, now) {
            b
        } else {
            a
        })
    }
}

impl Balance for Latency {
    fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        _hash: Option<u64>,
    ) -> Option<&'a Endpoint> {
        // One clock read per pick: region costs, exploration and the two choices.
        let now = tokio::time::Instant::now();
        if self.regions.groups.len() < 2 {
            return self.cheaper_of_two(endpoints, usable, now);
        }
        let chosen = self.choose_region(endpoints, usable, now)?;
        let picks = self.regions.picks.fetch_add(1, Ordering::Relaxed);
        let group = if picks % EXPLORE_EVERY == 0 {
            self.region_to_explore(endpoints, chosen, usable, now)
                .unwrap_or(chosen)
        } else {
            chosen
        };
        let region = self.regions.groups[group].0.as_str();
        self.cheaper_of_two(
            endpoints,
            &|e: &Endpoint| usable(e) && e.locality.region == region,
            now,
        )
    }
}
