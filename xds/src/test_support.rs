//! Helpers the server and client tests share: resources from YAML, a real ADS server on an
//! OS-chosen port, and polling for a condition.

use crate::config::Config;
use crate::server::{AdsServer, ProxyRegistry, SnapshotCache};
use crate::translate::translate;
use crate::ResourceSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The resources a v4 YAML config translates to.
pub fn resources(yaml: &str) -> ResourceSet {
    translate(&Config::from_yaml(yaml).expect("config loads")).resources
}

/// Serves ADS for `cache` on 127.0.0.1 (port chosen by the OS) in a background task.
pub async fn serve_ads(cache: Arc<SnapshotCache>, registry: Arc<ProxyRegistry>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdsServer::new(cache, registry).into_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    address
}

/// Polls `check` every 10 ms for up to 5 s.
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
