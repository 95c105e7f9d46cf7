//! What the proxy records: the metric registry and the handles the request path increments
//! ([`metrics`]), the access log ([`access_log`]), and the kernel's view of open sockets
//! ([`sockets`]). The lowest layer above [`crate::downstream`]: it names no upstream, route
//! or config type, so everything above can hold its handles.

pub mod access_log;
pub mod metrics;
pub mod sockets;
