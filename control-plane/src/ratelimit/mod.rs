//! NIP's rate limit service: Envoy's `RateLimitService` over gRPC, counting in Redis, so
//! every proxy of a region (each asking it through its `ratelimit` filter) shares one
//! count per limit.
//!
//! ```text
//! proxy ─ShouldRateLimit(domain, descriptors)─▶ limits of the config (routes with
//!   rate_limit.scope: global) ─▶ descriptor [("route", R), (key, value)…] ─▶ R's limit
//!   ─▶ one Lua script in Redis per descriptor: the generic cell rate algorithm on Redis's
//!      own clock (TIME), so several services and proxies count as one
//!   ─▶ OK / OVER_LIMIT per descriptor, with the limit, what is left and when to retry
//! ```
//!
//! A descriptor whose route has no global limit is OK, as with Envoy's reference service.
//! When Redis cannot be asked, the call fails (UNAVAILABLE) and each proxy applies its
//! filter's failure mode (pass, unless `failure_mode_deny`).

pub mod redis;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use nip_xds::config::Config;
use redis::{Redis, Reply};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The descriptor entry that names the route whose limit counts.
pub const ROUTE_KEY: &str = "route";

/// One route's global limit: `requests` per `per`, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests per `per`.
    pub requests: u32,
    /// The period.
    pub per: Duration,
    /// The most let through at once.
    pub burst: u32,
}

/// The global limits of a config, by route name.
pub fn limits_of(config: &Config) -> HashMap<String, Limit> {
    config
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, route)| {
            let limit = route.rate_limit.as_ref().filter(|l| l.is_global())?;
            Some((
                nip_xds::config::route_name(route, i),
                Limit {
                    requests: limit.requests,
                    per: limit.per.0,
                    burst: limit.burst.unwrap_or(limit.requests),
                },
            ))
        })
        .collect()
}

/// The generic cell rate algorithm on Redis's clock. KEYS[1]: the bucket; ARGV: µs per
/// token, tolerance in µs (burst − 1 tokens), hits. Returns {allowed, µs until a token is
/// back, tokens left}.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local per = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new = tat + per * hits
if new - now > tolerance + per then
  return {0, tat - now - tolerance, 0}
end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.floor((new - now) / 1000) + 1)
return {1, 0, math.floor((tolerance + per - (new - now)) / per)}
"#;

/// The service: limits (replaced on reload) and Redis.
#[derive(Debug)]
pub struct RateLimiter {
    limits: ArcSwap<HashMap<String, Limit>>,
    redis: Redis,
}

impl RateLimiter {
    /// A service with `limits`, counting in the Redis at `redis` (`host:port`).
    pub fn new(limits: HashMap<String, Limit>, redis: &str) -> RateLimiter {
        RateLimiter {
            limits: ArcSwap::from_pointee(limits),
            redis: Redis::new(redis, Duration::from_millis(500)),
        }
    }

    /// Replaces the limits (a config reload); counts in Redis stay.
    pub fn set_limits(&self, limits: HashMap<String, Limit>) {
        self.limits.store(Arc::new(limits));
    }

    /// Decides one request of `domain` with `descriptors` (each key and value).
    pub async fn decide(
        &self,
        domain: &str,
        descriptors: &[Vec<(String, String)>],
        hits: u32,
    ) -> Result<(bool, Vec<DescriptorStatus>), redis::RedisError> {
        let limits = self.limits.load_full();
        let mut all_ok = true;
        let mut statuses = Vec::with_capacity(descriptors.len());
        for entries in descriptors {
            let limit = entries
                .first()
                .filter(|(key, _)| key == ROUTE_KEY)
                .and_then(|(_, route)| limits.get(route));
            let Some(limit) = limit else {
                statuses.push(DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                });
                continue;
            };
            let per_token = (limit.per.as_micros() / u128::from(limit.requests.max(1))).max(1);
            let tolerance = per_token * u128::from(limit.burst.max(1) - 1);
            let mut key = format!("nip:ratelimit:{domain}");
            for (k, v) in entries {
                key.push('|');
                key.push_str(k);
                key.push('=');
                key.push_str(v);
            }
            let reply = self
                .redis
                .command(&[
                    b"EVAL",
                    GCRA.as_bytes(),
                    b"1",
                    key.as_bytes(),
                    per_token.to_string().as_bytes(),
                    tolerance.to_string().as_bytes(),
                    hits.max(1).to_string().as_bytes(),
                ])
                .await?;
            let numbers: Vec<i64> = match reply {
                Reply::Array(items) => items
                    .into_iter()
                    .filter_map(|i| match i {
                        Reply::Integer(n) => Some(n),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let [allowed, wait_us, left] = numbers[..] else {
                return Err(redis::RedisError::Server(
                    "the rate limit script answered unexpectedly".into(),
                ));
            };
            let ok = allowed == 1;
            all_ok &= ok;
            let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0));
            statuses.push(DescriptorStatus {
                code: if ok { Code::Ok } else { Code::OverLimit } as i32,
                current_limit: Some(RateLimit {
                    name: entries[0].1.clone(),
                    requests_per_unit: limit.requests,
                    unit: unit_of(limit.per) as i32,
                }),
                limit_remaining: u32::try_from(left).unwrap_or(0),
                duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(wait.subsec_nanos()).unwrap_or(0),
                }),
                ..Default::default()
            });
        }
        Ok((all_ok, statuses))
    }
}

/// Envoy's unit for a period (`Unknown` when it is not one of them).
fn unit_of(
    per: Duration,
) -> envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
    match per.as_secs() {
        _ if per.subsec_nanos() != 0 => Unit::Unknown,
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Unknown,
    }
}

/// The gRPC face of a [`RateLimiter`].
#[derive(Debug, Clone)]
pub struct RateLimitGrpc(pub Arc<RateLimiter>);

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let request = request.into_inner();
        let descriptors: Vec<Vec<(String, String)>> = request
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        match self
            .0
            .decide(&request.domain, &descriptors, request.hits_addend)
            .await
        {
            Ok((ok, statuses)) => Ok(tonic::Response::new(RateLimitResponse {
                overall_code: if ok { Code::Ok } else { Code::OverLimit } as i32,
                statuses,
                ..Default::default()
            })),
            Err(e) => {
                tracing::warn!("rate limit service: {e}");
                Err(tonic::Status::unavailable(e.to_string()))
            }
        }
    }
}

/// Serves the rate limit service on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    limiter: Arc<RateLimiter>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(RateLimitGrpc(limiter)))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await
}

/// Why the standalone service stopped.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitServiceError {
    /// The config does not load.
    #[error("{path}: {error}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        error: nip_xds::config::ConfigError,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server stopped.
    #[error("the gRPC server stopped: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// `nip ratelimit`: serves the global limits of the config at `config` (reloaded when the
/// file changes) on `listen`, counting in the Redis at `redis`.
pub async fn run_standalone(
    config: std::path::PathBuf,
    redis: String,
    listen: std::net::SocketAddr,
) -> Result<(), RateLimitServiceError> {
    let load = |path: &std::path::Path| {
        Config::from_file(path).map_err(|error| RateLimitServiceError::Config {
            path: path.display().to_string(),
            error,
        })
    };
    let limiter = Arc::new(RateLimiter::new(limits_of(&load(&config)?), &redis));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| RateLimitServiceError::Bind {
            address: listen,
            source,
        })?;
    tracing::info!(%listen, %redis, "rate limit service: {} global limits", limiter.limits.load().len());
    let watched = Arc::clone(&limiter);
    tokio::spawn(async move {
        let mut last = std::fs::read(&config).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = std::fs::read(&config).ok();
            if now == last {
                continue;
            }
            last = now;
            match load(&config) {
                Ok(loaded) => {
                    let limits = limits_of(&loaded);
                    tracing::info!(
                        "{} changed: {} global limits",
                        config.display(),
                        limits.len()
                    );
                    watched.set_limits(limits);
                }
                Err(e) => tracing::warn!("{e}; the previous limits stay"),
            }
        }
    });
    serve(listener, limiter).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_limits_come_from_routes_with_global_scope() {
        let config = Config::from_yaml(
            r#"
rate_limit_service: { address: "127.0.0.1:8081" }
services:
  web: { endpoints: ["127.0.0.1:9000"] }
routes:
  - { name: shared, match: { path_prefix: /a }, service: web, rate_limit: { requests: 10, per: 1s, burst: 2, scope: global } }
  - { name: mine, match: { path_prefix: /b }, service: web, rate_limit: { requests: 5, per: 1s } }
  - { service: web, rate_limit: { requests: 60, per: 1m, scope: global } }
"#,
        )
        .unwrap();
        let limits = limits_of(&config);
        assert_eq!(limits.len(), 2);
        assert_eq!(
            limits["shared"],
            Limit {
                requests: 10,
                per: Duration::from_secs(1),
                burst: 2
            }
        );
        assert_eq!(limits["route-2"].burst, 60);
        assert_eq!(unit_of(Duration::from_secs(60)) as i32, 2);
    }
}
