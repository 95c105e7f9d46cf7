//! HTTP/1.1 CONNECT tunnels for a connection manager whose `upgrade_configs` allow CONNECT:
//! the request's authority is routed through the manager's `connect_matcher` routes, and
//! the tunnel opens to an endpoint of the route's cluster (for an `ORIGINAL_DST` cluster,
//! the authority itself, when it is an IP address and port). The front door answers 200
//! and relays the bytes ([`crate::downstream::app::ConnectTunnels`]).

use super::HttpManager;
use crate::downstream::app::ConnectTunnels;
use async_trait::async_trait;
use http::{HeaderMap, Method};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

/// The CONNECT routes of one connection manager.
pub struct ConnectRoutes {
    manager: Arc<HttpManager>,
}

impl ConnectRoutes {
    /// The tunnels `manager`'s routes allow.
    pub fn new(manager: Arc<HttpManager>) -> Self {
        ConnectRoutes { manager }
    }
}

#[async_trait]
impl ConnectTunnels for ConnectRoutes {
    async fn open(&self, authority: &str) -> Result<TcpStream, u16> {
        let Some(route) =
            self.manager
                .router
                .route(authority, "", &Method::CONNECT, &HeaderMap::new())
        else {
            self.manager.unrouted.count(404);
            return Err(404);
        };
        let Some(target) = route.pick_target().and_then(|i| route.targets.get(i)) else {
            return Err(503);
        };
        let result = async {
            let cluster = target.cluster.as_ref().ok_or(503u16)?;
            let address = if cluster.original_destination {
                authority.parse::<SocketAddr>().map_err(|_| 400u16)?
            } else {
                let endpoint = cluster.pick(&[]).ok_or(503u16)?;
                if endpoint.tls.is_some() {
                    // The tunnel carries the client's own bytes; NIP does not wrap them in
                    // TLS of its own.
                    return Err(502);
                }
                endpoint.address
            };
            cluster.stats.cx_total.inc();
            match tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    Ok(stream)
                }
                Ok(Err(_)) => {
                    cluster.stats.cx_connect_fail.inc();
                    Err(503)
                }
                Err(_) => {
                    cluster.stats.cx_connect_fail.inc();
                    Err(504)
                }
            }
        }
        .await;
        target.counters.count(match &result {
            Ok(_) => 200,
            Err(status) => *status,
        });
        result
    }
}
