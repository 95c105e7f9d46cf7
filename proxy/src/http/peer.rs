//! The upstream peer of one try: where it connects, how long it may take, which protocol.

use crate::upstream::cluster::Cluster;
use pingora::prelude::HttpPeer;
use std::net::SocketAddr;
use std::time::Duration;

/// Pooled upstream connections idle longer than this are closed.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one try may wait for its answer: the route's `per_try_timeout`, bounded by the
/// route's `timeout` (zero: none).
pub fn try_timeout(route_timeout: Duration, per_try: Option<Duration>) -> Duration {
    match per_try {
        Some(per_try) if route_timeout.is_zero() => per_try,
        Some(per_try) => per_try.min(route_timeout),
        None => route_timeout,
    }
}

/// The peer of a try to `address`, an endpoint of `cluster`, answering within `timeout`
/// (zero: no limit).
pub fn for_try(address: SocketAddr, cluster: &Cluster, timeout: Duration) -> HttpPeer {
    let mut peer = HttpPeer::new(address, false, String::new());
    peer.options.connection_timeout = Some(cluster.connect_timeout);
    peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
    if !timeout.is_zero() {
        peer.options.read_timeout = Some(timeout);
    }
    if cluster.http2 {
        peer.options.set_http_version(2, 2);
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_waits_the_shorter_of_its_own_and_the_routes_timeout() {
        let s = Duration::from_secs;
        assert_eq!(try_timeout(s(15), None), s(15));
        assert_eq!(try_timeout(s(15), Some(s(2))), s(2));
        assert_eq!(try_timeout(s(1), Some(s(2))), s(1));
        assert_eq!(try_timeout(Duration::ZERO, Some(s(2))), s(2));
        assert_eq!(try_timeout(Duration::ZERO, None), Duration::ZERO);
    }
}
