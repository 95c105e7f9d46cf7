//! Which connection manager a connection's requests belong to.
//!
//! The dispatcher chose an HTTP filter chain for the connection before pingora read a
//! single request; pingora's request callbacks see only the session, whose socket digest
//! names the connection's socket. So while the front door serves the connection, the
//! dispatcher keeps a binding from the socket to the chain in a table of its worker thread
//! (a connection and its HTTP/2 streams run on the thread that accepted it: pingora's
//! workers do not steal work), and the gateway reads it at each request's start. Each
//! request resolves the chain in the snapshot in force then, so route changes reach open
//! connections; a chain that is gone leaves the manager the connection started with.

use super::{HttpManager, Listeners};
use pingora::protocols::{Digest, SocketDigest};
use std::cell::RefCell;
use std::collections::HashMap;
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

/// A connection's key: the address of its socket digest, which pingora shares between
/// the stream and every session on it for the connection's life.
type Key = usize;

thread_local! {
    static BINDINGS: RefCell<HashMap<Key, (u64, Binding)>> = RefCell::new(HashMap::new());
    static NEXT_TOKEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Removes a connection's binding when its serving ends.
pub struct BindingGuard {
    key: Key,
    token: u64,
}

impl Drop for BindingGuard {
    fn drop(&mut self) {
        BINDINGS.with(|b| {
            let mut bindings = b.borrow_mut();
            // A digest freed and its address reused by a newer connection keeps the newer
            // binding.
            if bindings
                .get(&self.key)
                .is_some_and(|(t, _)| *t == self.token)
            {
                bindings.remove(&self.key);
            }
        });
    }
}

/// Binds the connection whose socket digest is `digest` for as long as the guard lives.
pub fn bind(digest: &Arc<SocketDigest>, binding: Binding) -> BindingGuard {
    let key = Arc::as_ptr(digest) as Key;
    let token = NEXT_TOKEN.with(|n| {
        let token = n.get().wrapping_add(1);
        n.set(token);
        token
    });
    BINDINGS.with(|b| b.borrow_mut().insert(key, (token, binding)));
    BindingGuard { key, token }
}

/// The binding of the connection a request came on.
pub fn binding_of(digest: Option<&Digest>) -> Option<Binding> {
    let key = Arc::as_ptr(digest?.socket_digest.as_ref()?) as Key;
    BINDINGS.with(|b| b.borrow().get(&key).map(|(_, binding)| binding.clone()))
}
