//! [`Dispatch`]: pingora's server app for one bound listener. It finds the listener that
//! owns each accepted connection (following the original destination), runs the listener
//! filters, chooses the filter chain, and hands the connection to the front door (HTTP,
//! after TLS when the chain has it) or to a `tcp_proxy`.

use super::bindings::{self, Binding};
use super::chains::ConnectionFacts;
use super::inspect::{self, Detected, Inspection};
use super::{ChainAction, Listeners, ServedListener};
use crate::downstream::app::FrontDoor;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::ProxyHttp;
use pingora::server::ShutdownWatch;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// The listeners in force now (the server reads them from the snapshot).
pub type CurrentListeners = Arc<dyn Fn() -> Arc<Listeners> + Send + Sync>;

/// The server app of one bound listener.
pub struct Dispatch<SV> {
    /// The address this socket is bound to: its listener is the bound one there.
    bound: SocketAddr,
    /// The listener's name when the socket was bound: a reload that moves the listener
    /// elsewhere leaves this socket serving it until the restart that rebinds.
    name: Arc<str>,
    current: CurrentListeners,
    http: Arc<FrontDoor<SV>>,
    /// TLS for HTTP chains that have it (`None`: the proxy has no listener TLS).
    tls: Option<Arc<Acceptor>>,
}

impl<SV> Dispatch<SV> {
    /// The app for listener `name` bound to `bound`, sharing the front door `http`.
    pub fn new(
        bound: SocketAddr,
        name: Arc<str>,
        current: CurrentListeners,
        http: Arc<FrontDoor<SV>>,
        tls: Option<Arc<Acceptor>>,
    ) -> Self {
        Dispatch {
            bound,
            name,
            current,
            http,
            tls,
        }
    }
}

/// Why inspection ended without an answer.
enum InspectionEnd {
    /// The client sent too little within `listener_filters_timeout`.
    Timeout,
    /// The client left, or reading failed.
    Gone,
    /// The stream is not one whose bytes can be put back.
    NotRewindable,
}

/// Reads the connection's first bytes until the listener filters know what it carries,
/// then puts them back for whoever reads next.
async fn inspect_connection(
    stream: Stream,
    listener: &ServedListener,
) -> Result<(Stream, Detected), InspectionEnd> {
    let deadline = listener
        .inspection_timeout
        .map(|t| tokio::time::Instant::now() + t);
    let mut stream = stream;
    let mut seen = Vec::with_capacity(1024);
    let mut closed = false;
    let (tls, http) = (listener.inspect_tls, listener.inspect_http);
    // Decide with the bytes there are (the client is done, or the time or room is up).
    let decide_now = |seen: &[u8]| inspect::inspect(seen, tls, http, true).done_or_default();
    let detected = loop {
        match inspect::inspect(&seen, tls, http, closed) {
            Inspection::Done(detected) => break detected,
            Inspection::NeedMore if seen.len() >= inspect::MAX_INSPECTED => {
                break decide_now(&seen)
            }
            Inspection::NeedMore => {}
        }
        let read = stream.read_buf(&mut seen);
        let read = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                Ok(read) => read,
                Err(_) if listener.continue_on_inspection_timeout => break decide_now(&seen),
                Err(_) => return Err(InspectionEnd::Timeout),
            },
            None => read.await,
        };
        match read {
            Ok(0) if seen.is_empty() => return Err(InspectionEnd::Gone),
            Ok(0) => closed = true,
            Ok(_) => {}
            Err(_) => return Err(InspectionEnd::Gone),
        }
    };
    if seen.is_empty() {
        return Ok((stream, detected));
    }
    match into_l4(stream) {
        Some(mut l4) => {
            l4.rewind(&seen);
            Ok((l4, detected))
        }
        None => Err(InspectionEnd::NotRewindable),
    }
}

/// The TCP stream under a just-accepted connection (pingora hands plaintext listeners'
/// connections over as its `l4` stream).
fn into_l4(stream: Stream) -> Option<Box<L4Stream>> {
    stream.into_any().downcast::<L4Stream>().ok()
}

/// The connection's local and peer addresses.
fn addresses(stream: &Stream) -> Option<(SocketAddr, SocketAddr, Option<SocketAddr>)> {
    let digest = stream.get_socket_digest()?;
    let local = *digest.local_addr()?.as_inet()?;
    let peer = *digest.peer_addr()?.as_inet()?;
    let original = digest.original_dst().and_then(|a| a.as_inet()).copied();
    Some((local, peer, original))
}

#[async_trait]
impl<SV> ServerApp for Dispatch<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let listeners = (self.current)();
        let mut listener = listeners
            .bound_at(self.bound)
            .or_else(|| listeners.by_name(&self.name))?;
        let Some((local, peer, original)) = addresses(&stream) else {
            tracing::debug!(listener = %listener.name, "a connection without socket addresses");
            return None;
        };
        let mut destination = local;
        if listener.use_original_dst {
            if let Some(original) = original.filter(|o| *o != local) {
                destination = original;
                if let Some(owner) = listeners.for_original_destination(original) {
                    listener = owner;
                }
            }
        }
        let (stream, detected) = if listener.inspects() {
            match inspect_connection(stream, listener).await {
                Ok(inspected) => inspected,
                Err(InspectionEnd::Timeout) => {
                    listener.stats.inspection_timeout.inc();
                    return None;
                }
                Err(InspectionEnd::Gone) => return None,
                Err(InspectionEnd::NotRewindable) => {
                    tracing::error!(listener = %listener.name, "cannot put inspected bytes back on this stream");
                    return None;
                }
            }
        } else {
            (stream, Detected::default())
        };
        let facts = ConnectionFacts {
            destination,
            source: peer,
            detected: &detected,
        };
        let Some((index, chain)) = listener.choose(&facts) else {
            listener.stats.no_filter_chain_match.inc();
            return None;
        };
        let (tls, manager) = match &chain.action {
            ChainAction::Tcp(tcp) => {
                let _slot = self.http.admit_other(&listener.limits)?;
                tcp.serve(stream, destination, local).await;
                return None;
            }
            ChainAction::Http { tls, manager } => (*tls, manager),
        };
        let limits = manager.downstream.clone();
        let mut stream = stream;
        bindings::bind(
            &mut stream,
            Binding {
                listener: Arc::clone(&listener.name),
                chain: index,
                manager: Arc::clone(manager),
            },
        );
        let stream = if tls {
            let Some(acceptor) = &self.tls else {
                tracing::warn!(listener = %listener.name, "a TLS filter chain, and the proxy has no listener TLS yet (it takes effect at the next restart)");
                return None;
            };
            let Some(l4) = into_l4(stream) else {
                tracing::error!(listener = %listener.name, "cannot start TLS on this stream");
                return None;
            };
            let handshake = acceptor.tls_handshake(*l4);
            // A client gets as long for its handshake as for its first request head.
            let tls = match limits.request_headers_timeout.or(limits.idle_timeout) {
                Some(limit) => tokio::time::timeout(limit, handshake).await.ok()?,
                None => handshake.await,
            };
            match tls {
                Ok(tls) => Box::new(tls) as Stream,
                Err(e) => {
                    tracing::debug!(listener = %listener.name, %peer, "TLS handshake failed: {e}");
                    return None;
                }
            }
        } else {
            stream
        };
        let tunnels = manager.allow_connect.then(|| {
            Arc::new(super::connect::ConnectRoutes::new(Arc::clone(manager)))
                as Arc<dyn crate::downstream::app::ConnectTunnels>
        });
        self.http
            .serve(stream, shutdown, limits, manager.h2c, tunnels)
            .await
    }

    async fn cleanup(&self) {
        self.http.cleanup().await;
    }
}
