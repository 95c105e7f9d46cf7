//! `random`: weighted random over the usable endpoints.

use super::{weighted_random, Balance};
use crate::upstream::endpoint::Endpoint;

/// Weighted random (no state).
#[derive(Debug, Clone, Copy, Default)]
pub struct Random;

impl Balance for Random {
    fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        _hash: Option<u64>,
    ) -> Option<&'a Endpoint> {
        weighted_random(endpoints, usable)
    }
}
