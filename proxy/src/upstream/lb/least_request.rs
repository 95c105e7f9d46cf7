//! `least_request`: of two usable endpoints drawn by weight, the one with fewer requests
//! in flight (Envoy's default power of two choices).

use super::{two_choices, Balance};
use crate::upstream::endpoint::Endpoint;

/// Power of two choices by requests in flight (no state).
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastRequest;

impl Balance for LeastRequest {
    fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        _hash: Option<u64>,
    ) -> Option<&'a Endpoint> {
        let (a, b) = two_choices(endpoints, usable)?;
        if b.state.active_requests() < a.state.active_requests() {
            Some(b)
        } else {
            Some(a)
        }
    }
}
