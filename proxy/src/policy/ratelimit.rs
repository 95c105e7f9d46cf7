//! A route's local rate limits (Envoy's `local_ratelimit`), lock-free.
//!
//! A bucket of `max_tokens` refilled with `tokens_per_fill` every `fill_interval` lets a
//! burst of `max_tokens` through, then one request every `fill_interval / tokens_per_fill`
//! (refilled continuously rather than in steps). It is kept as the generic cell rate
//! algorithm does, in one atomic: the theoretical arrival time of the next request.
//!
//! ```text
//! request ─▶ the route's rate_limits actions (header, client address, generic key,
//!            verified JWT claim) ─▶ descriptors, e.g. [("client", "k-123")]
//!         ─▶ each configured descriptor they match takes a token from its bucket — one
//!            bucket for the descriptor, or (an entry with an empty value) one per value
//!            seen ([`KeyedRateLimit`]: a fixed table of atomics, no lock, no growth)
//!         ─▶ no descriptor matched: the route's default bucket, if any
//! ```

use super::jwt::VerifiedPayload;
use http::{HeaderMap, HeaderName};
use std::any::{Any, TypeId};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

/// One bucket, shared by every worker thread (and kept across reloads while its route and
/// settings stay the same).
#[derive(Debug)]
pub struct LocalRateLimit {
    /// Nanoseconds one token is worth.
    per_token_ns: u64,
    /// How far ahead of now the theoretical arrival time may run (the burst).
    tolerance_ns: u64,
    /// `max_tokens`, for `x-ratelimit-limit`.
    pub max_tokens: u32,
    base: Instant,
    /// Theoretical arrival time, in ns since `base`.
    tat_ns: AtomicU64,
}

/// A limited request's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// When a token is back.
    pub retry_after: Duration,
    /// The `max_tokens` of the bucket that refused.
    pub limit: u32,
}

/// The token cost and burst of a bucket, in some time unit.
fn gcra_params(
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: Duration,
    unit: Duration,
) -> (u64, u64) {
    let per_token = u64::try_from(
        fill_interval.as_nanos() / unit.as_nanos().max(1) / u128::from(tokens_per_fill.max(1)),
    )
    .unwrap_or(u64::MAX)
    .max(1);
    (
        per_token,
        per_token.saturating_mul(u64::from(max_tokens.max(1) - 1)),
    )
}

impl LocalRateLimit {
    /// A bucket of `max_tokens`, `tokens_per_fill` added every `fill_interval`.
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> LocalRateLimit {
        let (per_token_ns, tolerance_ns) = gcra_params(
            max_tokens,
            tokens_per_fill,
            fill_interval,
            Duration::from_nanos(1),
        );
        LocalRateLimit {
            per_token_ns,
            tolerance_ns,
            max_tokens,
            base: Instant::now(),
            tat_ns: AtomicU64::new(0),
        }
    }

    /// Takes a token: the tokens left, or how long until one is back.
    pub fn try_take(&self) -> Result<u32, Limited> {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut current = self.tat_ns.load(Ordering::Acquire);
        loop {
            let tat = current.max(now);
            if tat - now > self.tolerance_ns {
                return Err(Limited {
                    retry_after: Duration::from_nanos(tat - now - self.tolerance_ns),
                    limit: self.max_tokens,
                });
            }
            let next = tat + self.per_token_ns;
            match self.tat_ns.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let used = (next - now).div_ceil(self.per_token_ns);
                    let left = u64::from(self.max_tokens).saturating_sub(used);
                    return Ok(u32::try_from(left).unwrap_or(u32::MAX));
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// One bucket per value (a client's key, address or claim), all of the same size, with
/// no lock and a fixed footprint: a table of atomic slots, each holding a value's
/// fingerprint (20 bits) and its theoretical arrival time (44 bits of 16 µs ticks, ~8.9
/// years). A value whose bucket is full again needs no slot, so a slot is free once its
/// time has passed; a value looks for its own slot, else takes a free one, among 8 slots
/// from its hash. When all 8 hold other values still owing tokens, the request passes
/// (counted in `overflows`): the table is sized at 8 slots per expected active value.
#[derive(Debug)]
pub struct KeyedRateLimit {
    per_token: u64,
    tolerance: u64,
    /// `max_tokens` of each value's bucket.
    pub max_tokens: u32,
    base: Instant,
    slots: Box<[AtomicU64]>,
    /// Requests let through because the table had no slot for their value.
    pub overflows: AtomicU64,
}

const TICK: Duration = Duration::from_micros(16);
const TIME_BITS: u32 = 44;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const PROBES: usize = 8;

impl KeyedRateLimit {
    /// Buckets of `max_tokens`, `tokens_per_fill` every `fill_interval`, for about
    /// `active_values` values owing tokens at once.
    pub fn new(
        max_tokens: u32,
        tokens_per_fill: u32,
        fill_interval: Duration,
        active_values: usize,
    ) -> KeyedRateLimit {
        let (per_token, tolerance) = gcra_params(max_tokens, tokens_per_fill, fill_interval, TICK);
        let slots = (active_values.max(1) * PROBES).next_power_of_two();
        KeyedRateLimit {
            per_token,
            tolerance,
            max_tokens,
            base: Instant::now(),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            overflows: AtomicU64::new(0),
        }
    }

    /// Takes a token from `value`'s bucket.
    pub fn try_take(&self, value: &[u8]) -> Result<u32, Limited> {
        let hash = xxhash_rust::xxh64::xxh64(value, 0x6e69_7072);
        // Never zero, so an empty slot (0) is no value's.
        let fingerprint = (hash >> TIME_BITS) | 1;
        let now = u64::try_from(self.base.elapsed().as_micros() / TICK.as_micros())
            .unwrap_or(u64::MAX)
            & TIME_MASK;
        let mask = self.slots.len() - 1;
        let start = (hash as usize) & mask;
        let probe = |i: usize| &self.slots[(start + i) & mask];
        // Its own slot first (so a freed slot before it cannot hand it a fresh bucket),
        // else the first free one.
        let own =
            (0..PROBES).find(|i| probe(*i).load(Ordering::Acquire) >> TIME_BITS == fingerprint);
        let candidates = own.into_iter().chain(0..PROBES);
        for i in candidates {
            let slot = probe(i);
            let mut current = slot.load(Ordering::Acquire);
            loop {
                let (owner, tat) = (current >> TIME_BITS, current & TIME_MASK);
                let mine = owner == fingerprint;
                if !mine && tat > now {
                    break; // another value still owes tokens here
                }
                let tat = if mine { tat.max(now) } else { now };
                if tat - now > self.tolerance {
                    return Err(Limited {
                        retry_after: TICK
                            * u32::try_from(tat - now - self.tolerance).unwrap_or(u32::MAX),
                        limit: self.max_tokens,
                    });
                }
                let next = (tat + self.per_token).min(TIME_MASK);
                match slot.compare_exchange_weak(
                    current,
                    (fingerprint << TIME_BITS) | next,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        let used = (next - now).div_ceil(self.per_token);
                        let left = u64::from(self.max_tokens).saturating_sub(used);
                        return Ok(u32::try_from(left).unwrap_or(u32::MAX));
                    }
                    Err(actual) => current = actual,
                }
            }
        }
        self.overflows.fetch_add(1, Ordering::Relaxed);
        Ok(self.max_tokens)
    }
}

/// One action of a route's `rate_limits` entry: a descriptor entry from the request.
#[derive(Debug, Clone)]
pub enum DescriptorAction {
    /// `request_headers`: the header's value (no descriptor without it, unless
    /// `skip_if_absent`, which leaves the entry out).
    RequestHeader {
        /// The header.
        header: HeaderName,
        /// The entry's key.
        key: String,
        /// Leave the entry out when the header is absent.
        skip_if_absent: bool,
    },
    /// `remote_address`: the client's address (key `remote_address`).
    RemoteAddress,
    /// `generic_key`: a fixed entry.
    GenericKey {
        /// The entry's key (`generic_key` by default).
        key: String,
        /// Its value.
        value: String,
    },
    /// `metadata` from jwt_authn: a verified claim (`path[0]` the provider's
    /// `payload_in_metadata`), else `default_value`.
    JwtClaim {
        /// The entry's key.
        key: String,
        /// The payload's key and the claim's path.
        path: Vec<String>,
        /// The value without the claim (`None`: no descriptor).
        default: Option<String>,
    },
    /// `metadata` of `nip.tenant`, path `id`: the request's tenant (no descriptor for a
    /// request without one).
    Tenant {
        /// The entry's key.
        key: String,
    },
}

/// What descriptors are made of.
#[derive(Debug, Clone, Copy)]
pub struct DescriptorFacts<'a> {
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The client's address.
    pub source: Option<IpAddr>,
    /// Verified JWT payloads.
    pub jwt: &'a [VerifiedPayload],
    /// The request's tenant id.
    pub tenant: Option<&'a str>,
}

/// A descriptor: entries of key and value.
pub type Descriptor = Vec<(String, String)>;

impl DescriptorAction {
    /// The entry, `Ok(None)` to leave it out, `Err` for no descriptor at all.
    fn entry(&self, facts: &DescriptorFacts<'_>) -> Result<Option<(String, String)>, ()> {
        match self {
            DescriptorAction::RequestHeader {
                header,
                key,
                skip_if_absent,
            } => match facts.headers.get(header).and_then(|v| v.to_str().ok()) {
                Some(value) => Ok(Some((key.clone(), value.to_string()))),
                None if *skip_if_absent => Ok(None),
                None => Err(()),
            },
            DescriptorAction::RemoteAddress => facts
                .source
                .map(|ip| Some(("remote_address".to_string(), ip.to_canonical().to_string())))
                .ok_or(()),
            DescriptorAction::GenericKey { key, value } => Ok(Some((key.clone(), value.clone()))),
            DescriptorAction::JwtClaim { key, path, default } => {
                let claim = path.split_first().and_then(|(payload, path)| {
                    let payload = facts.jwt.iter().rev().find(|p| &*p.key == payload)?;
                    super::jwt::token::claim_header_value(&payload.claims, path)
                });
                match claim.or_else(|| default.clone()) {
                    Some(value) => Ok(Some((key.clone(), value))),
                    None => Err(()),
                }
            }
            DescriptorAction::Tenant { key } => facts
                .tenant
                .map(|id| Some((key.clone(), id.to_string())))
                .ok_or(()),
        }
    }
}

/// A configured descriptor and its bucket (Envoy's `LocalRateLimitDescriptor`).
#[derive(Debug)]
pub struct DescriptorLimit {
    /// Its entries: a key and a value, or (`None`) any value, each its own bucket.
    pub entries: Vec<(String, Option<String>)>,
    /// The bucket.
    pub bucket: DescriptorBucket,
}

/// A descriptor's bucket.
#[derive(Debug)]
pub enum DescriptorBucket {
    /// One for every request with the descriptor.
    Shared(Arc<LocalRateLimit>),
    /// One per value of its wildcard entries.
    PerValue(Arc<KeyedRateLimit>),
}

impl DescriptorLimit {
    /// The wildcard values of `descriptor` if it matches (joined: the per-value key).
    fn matches(&self, descriptor: &Descriptor) -> Option<String> {
        if descriptor.len() != self.entries.len() {
            return None;
        }
        let mut values = String::new();
        for ((key, value), (want_key, want_value)) in descriptor.iter().zip(&self.entries) {
            if key != want_key {
                return None;
            }
            match want_value {
                Some(want) if want != value => return None,
                Some(_) => {}
                None => {
                    values.push_str(value);
                    values.push('\0');
                }
            }
        }
        Some(values)
    }
}

/// The descriptors a request makes with a route's `rate_limits` entries (each entry one
/// descriptor from its actions, none when an action finds nothing).
pub fn descriptors(
    rules: &[Vec<DescriptorAction>],
    facts: &DescriptorFacts<'_>,
) -> Vec<Descriptor> {
    rules
        .iter()
        .filter_map(|rule| {
            let entries = rule
                .iter()
                .map(|a| a.entry(facts))
                .collect::<Result<Vec<_>, ()>>()
                .ok()?;
            let descriptor: Descriptor = entries.into_iter().flatten().collect();
            (!descriptor.is_empty()).then_some(descriptor)
        })
        .collect()
}

/// A route's local rate limits.
#[derive(Debug)]
pub struct RouteRateLimit {
    /// The route-wide bucket (`token_bucket`), used when no descriptor matched.
    pub default: Option<Arc<LocalRateLimit>>,
    /// `descriptors`.
    pub descriptors: Vec<DescriptorLimit>,
    /// The status a limited request gets (429 unless configured).
    pub status: u16,
    /// Send `x-ratelimit-limit`, `-remaining` and `-reset` on answers.
    pub headers: bool,
}

impl RouteRateLimit {
    /// Takes a token from every bucket the request's `descriptors` match (else the
    /// default bucket); refused when one of them has none.
    pub fn check(&self, descriptors: &[Descriptor]) -> Result<(), Limited> {
        let mut matched = false;
        let mut refused: Option<Limited> = None;
        for descriptor in descriptors {
            for limit in &self.descriptors {
                let Some(values) = limit.matches(descriptor) else {
                    continue;
                };
                matched = true;
                let taken = match &limit.bucket {
                    DescriptorBucket::Shared(bucket) => bucket.try_take(),
                    DescriptorBucket::PerValue(buckets) => buckets.try_take(values.as_bytes()),
                };
                if let Err(limited) = taken {
                    if refused.is_none_or(|r| limited.retry_after > r.retry_after) {
                        refused = Some(limited);
                    }
                }
            }
        }
        if let Some(limited) = refused {
            return Err(limited);
        }
        match (&self.default, matched) {
            (Some(bucket), false) => bucket.try_take().map(drop),
            _ => Ok(()),
        }
    }
}

/// What identifies a bucket across reloads: its route, its descriptor and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    /// The route's name.
    pub route: String,
    /// The descriptor's entries (empty: the route's default bucket).
    pub descriptor: String,
    /// `max_tokens`.
    pub max_tokens: u32,
    /// `tokens_per_fill`.
    pub tokens_per_fill: u32,
    /// `fill_interval`.
    pub fill_interval: Duration,
}

/// The buckets in use, by kind and key: a reload that keeps a route's limit keeps its
/// bucket (and its count), as Envoy keeps a token bucket across route updates. Only
/// compiles look here (never a request); entries die with the last snapshot using them.
type Buckets = std::collections::HashMap<(TypeId, BucketKey), Weak<dyn Any + Send + Sync>>;
static BUCKETS: LazyLock<Mutex<Buckets>> = LazyLock::new(Default::default);

/// The bucket for `key`: the one in use if a snapshot still holds it, else `make()`.
pub fn shared<T: Any + Send + Sync>(key: BucketKey, make: impl FnOnce() -> T) -> Arc<T> {
    let mut buckets = BUCKETS.lock().unwrap_or_else(|p| p.into_inner());
    let id = (TypeId::of::<T>(), key);
    if let Some(bucket) = buckets
        .get(&id)
        .and_then(Weak::upgrade)
        .and_then(|b| b.downcast::<T>().ok())
    {
        return bucket;
    }
    buckets.retain(|_, bucket| bucket.strong_count() > 0);
    let bucket = Arc::new(make());
    let erased: Arc<dyn Any + Send + Sync> = bucket.clone();
    buckets.insert(id, Arc::downgrade(&erased));
    bucket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_max_tokens_passes_then_the_fill_rate() {
        let limit = LocalRateLimit::new(5, 5, Duration::from_secs(1));
        let taken: Vec<_> = (0..5).map(|_| limit.try_take()).collect();
        assert!(taken.iter().all(Result::is_ok), "{taken:?}");
        assert_eq!(taken[0], Ok(4));
        assert_eq!(taken[4], Ok(0));
        let refused = limit.try_take().unwrap_err();
        assert!(
            refused.retry_after <= Duration::from_millis(200),
            "{refused:?}"
        );
        std::thread::sleep(refused.retry_after + Duration::from_millis(5));
        assert!(
            limit.try_take().is_ok(),
            "a token is back after retry_after"
        );
        assert!(limit.try_take().is_err());
    }

    #[test]
    fn each_value_has_its_own_bucket() {
        let limit = KeyedRateLimit::new(3, 3, Duration::from_secs(60), 64);
        for _ in 0..3 {
            assert!(limit.try_take(b"alice").is_ok());
        }
        assert!(limit.try_take(b"alice").is_err());
        for client in 0..200 {
            let key = format!("client-{client}");
            assert!(limit.try_take(key.as_bytes()).is_ok(), "{key}");
        }
        assert!(
            limit.try_take(b"alice").is_err(),
            "alice's debt survives the others"
        );
        assert_eq!(limit.overflows.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_table_lets_requests_through_and_counts_them() {
        // 1 value expected: 8 slots; 20 values owing tokens cannot all have one.
        let limit = KeyedRateLimit::new(1, 1, Duration::from_secs(60), 1);
        for client in 0..20 {
            let _ = limit.try_take(format!("c{client}").as_bytes());
        }
        assert!(limit.overflows.load(Ordering::Relaxed) >= 12);
    }

    #[test]
    fn descriptors_choose_buckets_and_unmatched_requests_use_the_default() {
        let per_client = DescriptorLimit {
            entries: vec![("client".into(), None)],
            bucket: DescriptorBucket::PerValue(Arc::new(KeyedRateLimit::new(
                2,
                2,
                Duration::from_secs(60),
                16,
            ))),
        };
        let rules = vec![vec![DescriptorAction::RequestHeader {
            header: HeaderName::from_static("x-api-key"),
            key: "client".into(),
            skip_if_absent: false,
        }]];
        let route = RouteRateLimit {
            default: Some(Arc::new(LocalRateLimit::new(1, 1, Duration::from_secs(60)))),
            descriptors: vec![per_client],
            status: 429,
            headers: true,
        };
        let with_key = |key: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", key.parse().unwrap());
            headers
        };
        let check = |headers: &HeaderMap| {
            route.check(&descriptors(
                &rules,
                &DescriptorFacts {
                    headers,
                    source: None,
                    jwt: &[],
                    tenant: None,
                },
            ))
        };
        let (a, b, none) = (with_key("a"), with_key("b"), HeaderMap::new());
        assert!(check(&a).is_ok() && check(&a).is_ok());
        assert_eq!(check(&a).unwrap_err().limit, 2);
        assert!(check(&b).is_ok(), "another key has its own bucket");
        assert!(check(&none).is_ok(), "no key: the default bucket");
        assert_eq!(check(&none).unwrap_err().limit, 1);
    }
}
