//! What the proxy records: the metric registry and the handles the request path increments
//! ([`metrics`]), the access log ([`access_log`]) and its live tap ([`tap`]), request traces ([`trace`], exported by
//! [`otlp`]), and the kernel's view of open sockets ([`sockets`]). The lowest layer above
//! [`crate::downstream`]: it names no upstream, route or config type, so everything above
//! can hold its handles.

pub mod access_log;
pub mod metrics;
pub mod otlp;
pub mod sockets;
pub mod tap;
pub mod trace;
