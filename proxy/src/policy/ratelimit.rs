//! A route's local rate limit (Envoy's `local_ratelimit` token bucket), lock-free: the
//! generic cell rate algorithm keeps one atomic, the theoretical arrival time of the next
//! request. A bucket of `max_tokens` refilled with `tokens_per_fill` every `fill_interval`
//! lets a burst of `max_tokens` through, then one request every `fill_interval /
//! tokens_per_fill` (refilled continuously rather than in steps).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One route's bucket, shared by every worker thread (and kept across reloads while its
/// settings stay the same).
#[derive(Debug)]
pub struct LocalRateLimit {
    /// Nanoseconds one token is worth.
    per_token_ns: u64,
    /// How far ahead of now the theoretical arrival time may run (the burst).
    tolerance_ns: u64,
    /// `max_tokens`, for `x-ratelimit-limit`.
    pub max_tokens: u32,
    /// The status a limited request gets (429 unless configured).
    pub status: u16,
    /// Send `x-ratelimit-limit`, `-remaining` and `-reset` on answers.
    pub headers: bool,
    base: Instant,
    /// Theoretical arrival time, in ns since `base`.
    tat_ns: AtomicU64,
}

/// A limited request's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// When a token is back.
    pub retry_after: Duration,
}

impl LocalRateLimit {
    /// A bucket of `max_tokens`, `tokens_per_fill` added every `fill_interval`.
    pub fn new(
        max_tokens: u32,
        tokens_per_fill: u32,
        fill_interval: Duration,
        status: u16,
        headers: bool,
    ) -> LocalRateLimit {
        let per_token_ns =
            u64::try_from(fill_interval.as_nanos() / u128::from(tokens_per_fill.max(1)))
                .unwrap_or(u64::MAX)
                .max(1);
        LocalRateLimit {
            per_token_ns,
            tolerance_ns: per_token_ns.saturating_mul(u64::from(max_tokens.max(1) - 1)),
            max_tokens,
            status,
            headers,
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

/// What identifies a bucket across reloads: its route and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    /// The route's name.
    pub route: String,
    /// `max_tokens`.
    pub max_tokens: u32,
    /// `tokens_per_fill`.
    pub tokens_per_fill: u32,
    /// `fill_interval`.
    pub fill_interval: Duration,
    /// The refusal status.
    pub status: u16,
    /// Whether `x-ratelimit-*` headers are sent.
    pub headers: bool,
}

/// The buckets in use, by key: a reload that keeps a route's limit keeps its bucket (and
/// its count), as Envoy keeps a token bucket across route updates. Only compiles look here
/// (never a request); entries die with the last snapshot using them.
type Buckets = std::collections::HashMap<BucketKey, std::sync::Weak<LocalRateLimit>>;
static BUCKETS: std::sync::LazyLock<std::sync::Mutex<Buckets>> =
    std::sync::LazyLock::new(Default::default);

/// The bucket for `key`: the one in use if a snapshot still holds it, else a new one.
pub fn shared(key: BucketKey) -> std::sync::Arc<LocalRateLimit> {
    let mut buckets = BUCKETS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bucket) = buckets.get(&key).and_then(std::sync::Weak::upgrade) {
        return bucket;
    }
    buckets.retain(|_, bucket| bucket.strong_count() > 0);
    let bucket = std::sync::Arc::new(LocalRateLimit::new(
        key.max_tokens,
        key.tokens_per_fill,
        key.fill_interval,
        key.status,
        key.headers,
    ));
    buckets.insert(key, std::sync::Arc::downgrade(&bucket));
    bucket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_max_tokens_passes_then_the_fill_rate() {
        let limit = LocalRateLimit::new(5, 5, Duration::from_secs(1), 429, true);
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
}
