//! Where config comes from: a local YAML file ([`file`]), or a control plane over ADS
//! ([`ads`]). Both end in the same compiler ([`crate::compile`]); a source never touches
//! the request path. A proxy following a control plane may stream its access records
//! there too ([`log_stream`]).

pub mod ads;
pub mod file;
pub mod log_stream;

pub use file::{ConfigSource, Fingerprint};
