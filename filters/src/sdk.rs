//! The NIP plugin API (Plugin SDK v2) as the host sees it.
//!
//! SDK plugins are ordinary proxy-wasm modules: the SDK turns the ABI's callbacks into the
//! message API. Two foreign functions (the ABI's extension point) carry what the ABI has
//! no call for:
//!
//! * [`DECLARE`] — called by the SDK in `on_vm_start` with the plugin's declaration (JSON:
//!   `api`, `sdk`, `name`, `version`, `author`, `capabilities`); answered with the host's
//!   API version. The host refuses a plugin whose API major version differs from its own,
//!   or whose minor version is newer, naming the plugin and both versions.
//! * [`REPORT`] — the SDK's answer when the host calls `proxy_on_foreign_function` on the
//!   root context with [`HEALTH_CHECK`] (JSON `{ healthy, message? }`) or
//!   [`RESOURCE_USAGE`] (a JSON object of the plugin's own figures).
//!
//! Timers: a `proxy_http_call` to [`TIMER_UPSTREAM`] is answered (empty) after its
//! timeout, with no call made — a sleep the host holds a request for like any callout.
//!
//! Raw proxy-wasm plugins never call them and are run as before.

use serde::{Deserialize, Serialize};

/// The plugin API this host implements (`major.minor`).
pub const HOST_API: (u32, u32) = (2, 0);
/// Foreign function an SDK calls to declare its plugin.
pub const DECLARE: &str = "nip_sdk_declare";
/// Foreign function an SDK calls to answer a host request.
pub const REPORT: &str = "nip_sdk_report";
/// The upstream name of a timer: a `proxy_http_call` to it makes no call — its answer
/// (no headers, like a timed-out call) comes when its timeout has passed. SDKs build
/// `sleep` on it, so a request waits on a timer the way it waits on a callout.
pub const TIMER_UPSTREAM: &str = "nip.timer";
/// `proxy_on_foreign_function` id: report health.
pub const HEALTH_CHECK: i32 = 1;
/// `proxy_on_foreign_function` id: report resource usage.
pub const RESOURCE_USAGE: i32 = 2;

/// What an SDK plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declaration {
    /// The plugin API version the SDK speaks (`2.0`).
    pub api: String,
    /// Which SDK (`rust`, `assemblyscript`).
    pub sdk: String,
    /// The plugin's own name.
    pub name: String,
    /// The plugin's version.
    #[serde(default)]
    pub version: String,
    /// Its author.
    #[serde(default)]
    pub author: String,
    /// What it does (`modify_headers`, `modify_body`, `http_calls`, `local_reply`…).
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// The host's API version as text.
pub fn host_api() -> String {
    format!("{}.{}", HOST_API.0, HOST_API.1)
}

impl Declaration {
    /// Reads a declaration.
    pub fn parse(bytes: &[u8]) -> Result<Declaration, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a plugin declaration: {e}"))
    }

    /// Whether this host can run the plugin: the same major version, a minor version no
    /// newer than the host's.
    pub fn check(&self) -> Result<(), String> {
        let parsed = self.api.split_once('.').and_then(|(major, minor)| {
            Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
        });
        let Some((major, minor)) = parsed else {
            return Err(format!("API version {:?} is not MAJOR.MINOR", self.api));
        };
        if major != HOST_API.0 || minor > HOST_API.1 {
            return Err(format!(
                "built with the NIP plugin API {} ({} SDK); this proxy runs API {}",
                self.api,
                self.sdk,
                host_api()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(api: &str) -> Declaration {
        Declaration::parse(
            format!(r#"{{"api": "{api}", "sdk": "rust", "name": "redact"}}"#).as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn the_same_major_and_an_older_or_equal_minor_run() {
        assert!(declared("2.0").check().is_ok());
        let newer = declared("2.9").check().unwrap_err();
        assert!(
            newer.contains("API 2.9") && newer.contains("runs API 2.0"),
            "{newer}"
        );
        assert!(declared("3.0").check().is_err());
        assert!(declared("1.4").check().is_err());
        assert!(declared("two").check().is_err());
        assert!(Declaration::parse(b"{}").is_err());
    }
}
