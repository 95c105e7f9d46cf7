//! # Listeners: which filter chain takes a connection
//!
//! A proxy serves Envoy `Listener`s: each bound to an address (or, with `bind_to_port:
//! false`, only reached through a `use_original_dst` listener that hands it the
//! connections redirected to its address, as a sidecar's outbound port does), each with
//! filter chains chosen per connection:
//!
//! ```text
//! accept on a bound listener
//!   ─▶ use_original_dst? the original destination (SO_ORIGINAL_DST); a listener bound to
//!      it (bind_to_port: false) takes over
//!   ─▶ listener filters: tls_inspector (ClientHello: SNI, ALPN), http_inspector
//!      (request line or h2 preface) — [`inspect`], the bytes read put back
//!   ─▶ filter_chain_match ([`chains`]) or default_filter_chain, else close
//!   ─▶ http_connection_manager (TLS if the chain has it, then the front door and the
//!      gateway) │ tcp_proxy ([`tcp_proxy`]: bytes relayed to a cluster or the original
//!      destination)
//! ```
//!
//! This module holds the compiled listeners and the connection dispatcher
//! ([`dispatch::Dispatch`], pingora's server app for each bound listener); it knows the
//! front door and clusters, never routes or snapshots (the server hands it the listeners in
//! force through a closure).

pub mod bindings;
pub mod chains;
pub mod connect;
pub mod dispatch;
pub mod inspect;
pub mod tcp_proxy;

use crate::downstream::limits::DownstreamLimits;
use crate::route::Router;
use crate::telemetry::access_log::AccessLogger;
use crate::telemetry::metrics::{ListenerStats, RequestCounters};
use chains::{ChainMatch, ConnectionFacts};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tcp_proxy::TcpProxy;

/// Envoy's default `listener_filters_timeout`.
pub const DEFAULT_INSPECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// The listeners of a snapshot.
#[derive(Debug, Default)]
pub struct Listeners {
    /// In the order of the resources.
    pub all: Vec<ServedListener>,
}

impl Listeners {
    /// The listener named `name`.
    pub fn by_name(&self, name: &str) -> Option<&ServedListener> {
        self.all.iter().find(|l| *l.name == *name)
    }

    /// The bound listener at `address` (a listener renamed across a reload keeps its
    /// socket).
    pub fn bound_at(&self, address: SocketAddr) -> Option<&ServedListener> {
        self.bound()
            .find(|l| l.address == address || l.additional_addresses.contains(&address))
    }

    /// The listeners the process binds (`bind_to_port` true).
    pub fn bound(&self) -> impl Iterator<Item = &ServedListener> {
        self.all.iter().filter(|l| l.bind_to_port)
    }

    /// The listener a connection redirected to `destination` belongs to: one with
    /// `bind_to_port: false` on that address, else on that port of the unspecified address
    /// of its family (Envoy's rule for handing connections off a `use_original_dst`
    /// listener).
    pub fn for_original_destination(&self, destination: SocketAddr) -> Option<&ServedListener> {
        let virtual_listeners = || self.all.iter().filter(|l| !l.bind_to_port);
        virtual_listeners()
            .find(|l| l.address == destination)
            .or_else(|| {
                virtual_listeners().find(|l| {
                    l.address.port() == destination.port()
                        && l.address.ip().is_unspecified()
                        && l.address.is_ipv4() == destination.ip().to_canonical().is_ipv4()
                })
            })
    }
}

/// One listener, compiled.
#[derive(Debug)]
pub struct ServedListener {
    /// Its name (pingora's service for it, log lines, metrics).
    pub name: Arc<str>,
    /// Its address.
    pub address: SocketAddr,
    /// More addresses it is bound to as well (`additional_addresses`: an IPv6 one beside
    /// an IPv4 one, each socket IPv6-only).
    pub additional_addresses: Vec<SocketAddr>,
    /// Whether the process binds the address (`bind_to_port`, default true).
    pub bind_to_port: bool,
    /// Read each connection's original destination and hand it to the listener bound to
    /// it (`use_original_dst`, or the `original_dst` listener filter).
    pub use_original_dst: bool,
    /// The `tls_inspector` listener filter.
    pub inspect_tls: bool,
    /// The `http_inspector` listener filter.
    pub inspect_http: bool,
    /// `listener_filters_timeout` (`None`: wait as long as the client takes).
    pub inspection_timeout: Option<Duration>,
    /// `continue_on_listener_filters_timeout`: at the timeout, choose with what was seen
    /// instead of closing.
    pub continue_on_inspection_timeout: bool,
    /// `filter_chains`.
    pub chains: Vec<FilterChain>,
    /// `default_filter_chain`: takes what no chain matches.
    pub default_chain: Option<FilterChain>,
    /// Client limits for connections its `tcp_proxy` chains take (its first connection
    /// manager's): `max_active_downstream_connections`.
    pub limits: DownstreamLimits,
    /// Counters.
    pub stats: ListenerStats,
}

/// A compiled `http_connection_manager`: what the HTTP path of a connection that one of
/// its filter chains took uses. Chains carrying the same connection manager share one.
#[derive(Debug)]
pub struct HttpManager {
    /// Its `stat_prefix`.
    pub stat_prefix: String,
    /// Client timeouts and limits (taken by each new connection).
    pub downstream: DownstreamLimits,
    /// Route selection.
    pub router: Router,
    /// Access log, when enabled.
    pub access_log: Option<Arc<AccessLogger>>,
    /// Counters for requests no route matched.
    pub unrouted: RequestCounters,
    /// Accepts h2c (prior knowledge) next to HTTP/1.1 (`codec_type` is not `HTTP1`).
    pub h2c: bool,
    /// Tunnels HTTP/1.1 CONNECT requests through its `connect_matcher` routes
    /// (`upgrade_configs` has CONNECT).
    pub allow_connect: bool,
    /// Its policy filters (JWT, RBAC, local rate limit), in `http_filters` order.
    pub policy: Vec<crate::policy::PolicyFilter>,
    /// Request tracing, when it traces (`tracing`).
    pub tracing: Option<Arc<crate::telemetry::trace::Tracing>>,
}

impl FilterChain {
    /// Its connection manager, for an HTTP chain.
    pub fn http_manager(&self) -> Option<&Arc<HttpManager>> {
        match &self.action {
            ChainAction::Http { manager, .. } => Some(manager),
            ChainAction::Tcp(_) => None,
        }
    }
}

impl ServedListener {
    /// Its chain at `index` in `filter_chains`, or its default chain (`None`).
    pub fn chain(&self, index: Option<usize>) -> Option<&FilterChain> {
        match index {
            Some(i) => self.chains.get(i),
            None => self.default_chain.as_ref(),
        }
    }

    /// The chain that takes a connection with `facts`, and where it is ([`Self::chain`]).
    pub fn choose(&self, facts: &ConnectionFacts<'_>) -> Option<(Option<usize>, &FilterChain)> {
        match chains::select(&self.chains, |c| &c.matches, facts) {
            Some(i) => self.chains.get(i).map(|c| (Some(i), c)),
            None => self.default_chain.as_ref().map(|c| (None, c)),
        }
    }

    /// Whether it inspects the first bytes of connections.
    pub fn inspects(&self) -> bool {
        self.inspect_tls || self.inspect_http
    }
}

/// One filter chain.
#[derive(Debug)]
pub struct FilterChain {
    /// Its `name` (may be empty).
    pub name: String,
    /// Its `filter_chain_match`.
    pub matches: ChainMatch,
    /// What it does with a connection.
    pub action: ChainAction,
}

/// The network filter of a chain.
#[derive(Debug)]
pub enum ChainAction {
    /// `http_connection_manager`: the proxy's HTTP path with this manager's routes and
    /// limits, behind TLS when `tls` (the proxy's one listener TLS context).
    Http {
        /// Terminate TLS first.
        tls: bool,
        /// The connection manager.
        manager: Arc<HttpManager>,
    },
    /// `tcp_proxy`.
    Tcp(TcpProxy),
}
