//! # nip-plugin: NIP Plugin SDK v2 for Rust
//!
//! Write a plugin as a message handler; the SDK runs it on the proxy-wasm ABI (build for
//! `wasm32-wasip1`), so it loads in NIP like any proxy-wasm plugin:
//!
//! ```ignore
//! use nip_plugin::{main, Message, Outcome, Plugin, Reply};
//!
//! main! {
//!     Plugin::new("hello")
//!         .version("1.0.0")
//!         .on_message(|mut message: Message, _ctx| async move {
//!             if message.priority() == "low" {
//!                 return Ok(Reply::text(503, "busy").into());
//!             }
//!             message.stamp("seen-by", "hello");
//!             Ok(message.into())
//!         })
//!         .run()
//! }
//! ```
//!
//! How a request flows: the SDK holds the request until its body is in (unless
//! [`Plugin::stream_bodies`]), hands the handler a [`Message`] whose parts are read from
//! the proxy when asked for (`message.rs` says how each is made), and writes back what the returned message changed — or sends
//! the [`Reply`], or answers an [`Error`] with its status. A handler is `async`: awaiting
//! [`Context::http_call`] pauses the request until the cluster answers. Responses work the
//! same way with [`Plugin::responses`].
//!
//! The plugin declares itself to the host at start (name, version, author, capabilities
//! and [`API_VERSION`]); a host that runs another major version of the API refuses it with
//! both versions named. The host may ask for [`Plugin::health_check`] and
//! [`Plugin::resource_usage`] reports at any time.

pub mod context;
pub mod message;
pub mod plugin;
mod runtime;

pub use context::{Context, HttpCall, HttpRequest, HttpResponse};
pub use message::{Data, Error, Message, MessageType, Outcome, Reply, Source};
pub use plugin::{Health, Plugin};
pub use serde_json::{json, Value};

/// The NIP plugin API version this SDK speaks (`MAJOR.MINOR`).
pub const API_VERSION: &str = "2.0";
/// Foreign function declaring the plugin to the host.
pub(crate) const DECLARE: &str = "nip_sdk_declare";
/// Foreign function answering a host request.
pub(crate) const REPORT: &str = "nip_sdk_report";
/// The host's timer upstream (`Context::sleep`).
pub(crate) const TIMER_UPSTREAM: &str = "nip.timer";
/// Host request: report health.
pub(crate) const HEALTH_CHECK: u32 = 1;
/// Host request: report resource usage.
pub(crate) const RESOURCE_USAGE: u32 = 2;

/// Declares the plugin's entry point: the body builds a [`Plugin`] and calls `.run()`.
#[macro_export]
macro_rules! main {
    ($($body:tt)*) => {
        $crate::proxy_wasm::main! {{
            $crate::proxy_wasm::set_log_level($crate::proxy_wasm::types::LogLevel::Info);
            $($body)*
        }}
    };
}

#[doc(hidden)]
pub use proxy_wasm;
