//! Which connection manager a connection's requests belong to.
//!
//! The dispatcher chose an HTTP filter chain for the connection before pingora read a
//! single request; pingora's request callbacks see only the session. So the dispatcher
//! attaches a [`Binding`] to the connection ([`bind`]), which every session on it carries
//! in its digest, and the gateway reads it at each request's start ([`binding_of`]). Each
//! request resolves the chain in the snapshot in force then, so route changes reach open
//! connections; a chain that is gone leaves the manager the connection started with.

use super::{HttpManager, Listeners};
use pingora::http::ResponseHeader;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{Digest, Stream};
use std::sync::Arc;

/// Where a connection's requests go.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The listener whose chain took it (after any original-destination hand-off).
    pub listener: Arc<str>,
    /// The chain's index in `filter_chains` (`None`: the default chain).
    pub chain: Option<usize>,
    /// The connection manager when the connection was taken.
    pub manager: Arc<HttpManager>,
}

impl Binding {
    /// The connection manager of the binding's chain in `listeners` (the snapshot in
    /// force), or the one the connection started with when that chain is gone or no longer
    /// speaks HTTP.
    pub fn manager_in(&self, listeners: &Listeners) -> Arc<HttpManager> {
        listeners
            .by_name(&self.listener)
            .and_then(|l| l.chain(self.chain))
            .and_then(|c| c.http_manager())
            .unwrap_or(&self.manager)
            .clone()
    }
}

/// Attaches `binding` to a connection before its HTTP path starts (and before TLS: the
/// TLS stream shows the digest of the socket under it).
///
/// Pingora builds each session's digest from the connection's stream, and its proxy
/// digest carries `user_data` for whoever made the connection: the one channel from a
/// connection to every request on it, HTTP/2 streams included (pingora runs those on any
/// worker thread).
pub fn bind(stream: &mut Stream, binding: Binding) {
    let Ok(marker) = ResponseHeader::build(200, Some(0)) else {
        return;
    };
    stream.set_proxy_digest(ProxyDigest::new(Box::new(marker), Some(Box::new(binding))));
}

/// The binding of the connection a request came on.
pub fn binding_of(digest: Option<&Digest>) -> Option<&Binding> {
    digest?
        .proxy_digest
        .as_ref()?
        .user_data
        .as_ref()?
        .downcast_ref::<Binding>()
}
