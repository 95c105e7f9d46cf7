//! Where config comes from: a local YAML file ([`file`]), or a control plane over ADS
//! ([`ads`]). Both end in the same compiler ([`crate::compile`]); a source never touches
//! the request path.

pub mod ads;
pub mod file;

pub use file::{ConfigSource, Fingerprint};
