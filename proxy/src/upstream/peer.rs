//! The upstream peer of one try (or one callout): where it connects, how long it may
//! take, which protocol, over the endpoint's transport.

use super::cluster::Cluster;
use super::endpoint::Endpoint;
use pingora::prelude::HttpPeer;
use std::sync::Arc;
use std::time::Duration;

/// Pooled upstream connections idle longer than this are closed.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a try waits for each read from the upstream (its response head, then each
/// body chunk): the least of what is left of the route's budget, the route's
/// `per_try_timeout` and its `idle_timeout`. `None`: no limit.
pub fn read_timeout(
    budget_left: Option<Duration>,
    per_try: Option<Duration>,
    idle: Option<Duration>,
) -> Option<Duration> {
    [budget_left, per_try, idle].into_iter().flatten().min()
}

/// The peer of a try to `endpoint` (its address; its host name, if it has one) of
/// `cluster`, each read within `timeout`. Over TLS (the endpoint's transport) the endpoint's
/// certificate must name the cluster's `sni`, else its host name, else its IP address
/// (or carry a name the cluster's SAN matchers accept). pingora's own TLS carries what it
/// can (roots, a fixed client certificate, the name); SAN matchers and the renewing
/// workload certificate need NIP's connector ([`crate::upstream::tls`]), whose connected
/// stream pingora pools.
pub fn for_try(endpoint: &Endpoint, cluster: &Cluster, timeout: Option<Duration>) -> HttpPeer {
    let address = endpoint.address;
    let peer = match &endpoint.tls {
        None => HttpPeer::new(address, false, String::new()),
        Some(tls) => match &tls.connector {
            None => {
                // pingora's own TLS: it verifies the chain and the name.
                let native = tls.settings.native.as_ref();
                let mut peer = HttpPeer::new(address, true, tls.server_name.clone());
                peer.options.ca = native.and_then(|n| n.roots.clone());
                peer.client_cert_key = native.and_then(|n| n.client.clone());
                peer
            }
            Some(connector) => {
                // NIP connects (the connector knows the address); pingora pools what it is
                // handed under the endpoint's pool group. Its peer address is the
                // unspecified one, the address pingora does not hold a pooled socket's
                // peer name against (the socket it holds is NIP's relay, not the TCP one).
                let unspecified = std::net::Ipv4Addr::UNSPECIFIED.into();
                let mut peer = HttpPeer::new(
                    std::net::SocketAddr::new(unspecified, address.port()),
                    false,
                    String::new(),
                );
                peer.options.custom_l4 = Some(Arc::clone(connector));
                peer.group_key = tls.pool_group;
                peer
            }
        },
    };
    finish(peer, cluster, timeout)
}

/// The peer of a try to `address` itself, in plaintext (an `ORIGINAL_DST` cluster's
/// original destination), each read within `timeout`.
pub fn to_address(
    address: std::net::SocketAddr,
    cluster: &Cluster,
    timeout: Option<Duration>,
) -> HttpPeer {
    finish(
        HttpPeer::new(address, false, String::new()),
        cluster,
        timeout,
    )
}

/// The settings every peer of `cluster` gets: timeouts and protocol.
fn finish(mut peer: HttpPeer, cluster: &Cluster, timeout: Option<Duration>) -> HttpPeer {
    peer.options.connection_timeout = Some(cluster.connect_timeout);
    peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
    // A budget already spent still gets a read timeout, not none.
    peer.options.read_timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
    if cluster.http2 {
        peer.options.set_http_version(2, 2);
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_waits_the_least_of_the_budget_left_the_per_try_and_the_idle_timeout() {
        let s = Duration::from_secs;
        assert_eq!(read_timeout(Some(s(15)), None, None), Some(s(15)));
        assert_eq!(read_timeout(Some(s(15)), Some(s(2)), None), Some(s(2)));
        assert_eq!(read_timeout(Some(s(1)), Some(s(2)), None), Some(s(1)));
        assert_eq!(read_timeout(None, Some(s(2)), Some(s(5))), Some(s(2)));
        assert_eq!(read_timeout(None, None, Some(s(5))), Some(s(5)));
        assert_eq!(read_timeout(None, None, None), None);
    }
}
