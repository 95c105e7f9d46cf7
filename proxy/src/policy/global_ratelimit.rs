//! Global rate limits, as Envoy's `ratelimit` filter: the request's descriptors (made by
//! the route's `rate_limits` actions) go to a rate limit service over gRPC
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), which counts them for
//! every proxy that asks it — NIP's (`nip ratelimit`, counting in Redis) or any other
//! speaking the protocol. Over the limit: 429 (`x-envoy-ratelimited`, `x-ratelimit-*`).
//! When the service cannot answer within `timeout`, the request passes, unless
//! `failure_mode_deny` (then 500, as Envoy).

use super::ratelimit::Descriptor;
use crate::plugins::callout::CalloutClient;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    rate_limit_response, RateLimitRequest, RateLimitResponse,
};
use std::sync::Arc;
use std::time::Duration;

/// One `ratelimit` filter.
#[derive(Debug)]
pub struct GlobalRateLimit {
    /// Its name in `http_filters` (metrics).
    pub name: Arc<str>,
    /// `domain`: the service's namespace for this fleet's limits.
    pub domain: String,
    /// The service's cluster (`rate_limit_service.grpc_service.envoy_grpc`).
    pub cluster: String,
    /// `:authority` of the calls.
    pub authority: String,
    /// How long a call may take (`timeout`, default 20 ms as Envoy).
    pub timeout: Duration,
    /// Refuse requests (500) when the service cannot answer.
    pub failure_mode_deny: bool,
    /// Send `x-ratelimit-*` headers (`enable_x_ratelimit_headers: DRAFT_VERSION_03`).
    pub headers: bool,
    /// Its counters.
    pub stats: crate::telemetry::metrics::GlobalRateLimitCounters,
}

/// The service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalOutcome {
    /// Under every limit.
    Allowed,
    /// Over a limit.
    Limited {
        /// The limit's requests per unit, if the service said.
        limit: Option<u32>,
        /// When to try again, if the service said.
        retry_after: Option<Duration>,
    },
}

impl GlobalRateLimit {
    /// Asks the service about `descriptors`.
    pub async fn check(
        &self,
        client: &CalloutClient,
        descriptors: &[Descriptor],
    ) -> Result<GlobalOutcome, String> {
        let request = RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: descriptors
                .iter()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .iter()
                        .map(|(key, value)| rate_limit_descriptor::Entry {
                            key: key.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            hits_addend: 1,
        };
        let response: RateLimitResponse = super::grpc::unary(
            client,
            &self.cluster,
            &self.authority,
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            &request,
            self.timeout,
        )
        .await?;
        Ok(outcome(&response))
    }
}

/// A `RateLimitResponse` as an outcome: the first status over its limit says which.
fn outcome(response: &RateLimitResponse) -> GlobalOutcome {
    use rate_limit_response::Code;
    if response.overall_code != Code::OverLimit as i32 {
        return GlobalOutcome::Allowed;
    }
    let over = response
        .statuses
        .iter()
        .find(|s| s.code == Code::OverLimit as i32);
    GlobalOutcome::Limited {
        limit: over
            .and_then(|s| s.current_limit.as_ref())
            .map(|l| l.requests_per_unit),
        retry_after: over
            .and_then(|s| s.duration_until_reset.as_ref())
            .and_then(|d| {
                Some(Duration::new(
                    u64::try_from(d.seconds).ok()?,
                    u32::try_from(d.nanos).ok()?,
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
        Code, DescriptorStatus, RateLimit,
    };

    #[test]
    fn the_status_over_its_limit_says_which_limit_and_when() {
        let allowed = RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        };
        assert_eq!(outcome(&allowed), GlobalOutcome::Allowed);
        let over = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                DescriptorStatus {
                    code: Code::OverLimit as i32,
                    current_limit: Some(RateLimit {
                        requests_per_unit: 100,
                        ..Default::default()
                    }),
                    duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: 0,
                        nanos: 250_000_000,
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            outcome(&over),
            GlobalOutcome::Limited {
                limit: Some(100),
                retry_after: Some(Duration::from_millis(250)),
            }
        );
    }
}
