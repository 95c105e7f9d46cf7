//! `round_robin`: weighted round robin on a precomputed, interleaved schedule.

use super::Balance;
use crate::upstream::endpoint::Endpoint;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The schedule (endpoint indexes, each repeated by weight, interleaved) and where the
/// next pick starts in it.
#[derive(Debug)]
pub struct RoundRobin {
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// The schedule of `endpoints`, entered at a random place (so proxies started together
    /// do not all begin with the same endpoint).
    pub fn new(endpoints: &[Endpoint]) -> Self {
        RoundRobin {
            schedule: interleaved_schedule(endpoints),
            cursor: AtomicUsize::new(fastrand::usize(..1 << 16)),
        }
    }

    /// The schedule, for tests and `/clusters`.
    pub fn schedule(&self) -> &[u32] {
        &self.schedule
    }
}

impl Balance for RoundRobin {
    fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        _hash: Option<u64>,
    ) -> Option<&'a Endpoint> {
        let len = self.schedule.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .filter_map(|i| endpoints.get(self.schedule[(start + i) % len] as usize))
            .find(|e| usable(e))
    }
}

/// The longest round-robin schedule built: weights whose sum (after dividing by their
/// greatest common divisor) is larger are scaled down to it, keeping ratios to within
/// 1/16384 of the total.
pub const MAX_SCHEDULE_LEN: u64 = 16 * 1024;

/// The weights the schedule is built from: full EDS weights (1–2³²−1), divided by their
/// greatest common divisor, scaled down only when their sum passes [`MAX_SCHEDULE_LEN`].
fn schedule_weights(endpoints: &[Endpoint]) -> Vec<u64> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let weights: Vec<u64> = endpoints
        .iter()
        .map(|e| u64::from(e.weight.max(1)))
        .collect();
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let total: u64 = weights.iter().sum();
    if total <= MAX_SCHEDULE_LEN {
        return weights;
    }
    weights
        .iter()
        .map(|w| {
            let scaled = u128::from(*w) * u128::from(MAX_SCHEDULE_LEN) / u128::from(total);
            u64::try_from(scaled).unwrap_or(MAX_SCHEDULE_LEN).max(1)
        })
        .collect()
}

/// Spreads each endpoint's weight evenly over the schedule (smooth weighted round robin,
/// precomputed), so weights 3:1 give `a a b a`, not `a a a b` bursts.
fn interleaved_schedule(endpoints: &[Endpoint]) -> Vec<u32> {
    let weights = schedule_weights(endpoints);
    let total: i64 = weights.iter().map(|w| i64::try_from(*w).unwrap_or(0)).sum();
    let mut current = vec![0i64; endpoints.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::try_from(*w).unwrap_or(0);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(u32::try_from(best).unwrap_or(0));
    }
    schedule
}
