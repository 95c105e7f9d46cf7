//! Envoy's response flags: why the proxy answered or shaped a response itself. They go to
//! `x-nip-response-flags`, the access log and `nip_response_flags_total`.

/// Why the proxy answered or shaped a response itself, as Envoy's response flags say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// No route matched (404).
    NoRoute,
    /// The route names a cluster that does not exist (503).
    NoCluster,
    /// No healthy endpoint (503).
    NoHealthyUpstream,
    /// Connecting failed (503).
    UpstreamConnectFailure,
    /// The upstream did not answer in time (504).
    UpstreamTimeout,
    /// The upstream reset or closed the connection (502).
    UpstreamReset,
    /// Retries were used up and the last try still failed.
    RetryLimitExceeded,
    /// The client went away.
    DownstreamClosed,
    /// A fail-closed plugin failed (503).
    PluginFailure,
    /// The cluster's `max_requests` circuit breaker is open (503).
    UpstreamOverflow,
    /// Shed by the cluster's adaptive concurrency: its limit is reached for this request's
    /// priority (503 unless configured; Envoy's overload flag).
    Overload,
    /// Refused by the route's local rate limit (429 unless configured).
    RateLimited,
    /// Refused by an RBAC policy (403).
    RbacDenied,
    /// Refused by the external authorization service, or because it could not be asked.
    UnauthorizedExternalService,
    /// The rate limit service did not answer and the filter fails closed (500).
    RateLimitServiceError,
}

impl ResponseFlag {
    /// Every flag, in counter order.
    pub const ALL: [ResponseFlag; 15] = [
        ResponseFlag::NoRoute,
        ResponseFlag::NoCluster,
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectFailure,
        ResponseFlag::UpstreamTimeout,
        ResponseFlag::UpstreamReset,
        ResponseFlag::RetryLimitExceeded,
        ResponseFlag::DownstreamClosed,
        ResponseFlag::PluginFailure,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::Overload,
        ResponseFlag::RateLimited,
        ResponseFlag::RbacDenied,
        ResponseFlag::UnauthorizedExternalService,
        ResponseFlag::RateLimitServiceError,
    ];

    /// Envoy's short name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoCluster => "NC",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::UpstreamReset => "UR",
            ResponseFlag::RetryLimitExceeded => "URX",
            ResponseFlag::DownstreamClosed => "DC",
            ResponseFlag::PluginFailure => "PF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::Overload => "OM",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::RbacDenied => "RBAC",
            ResponseFlag::UnauthorizedExternalService => "UAEX",
            ResponseFlag::RateLimitServiceError => "RLSE",
        }
    }

    /// Position in [`ResponseFlag::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}
