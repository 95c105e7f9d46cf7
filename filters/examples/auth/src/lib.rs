//! External authorization: before a request goes upstream, asks an auth service (a cluster
//! of the proxy) whether its `authorization` header is good, via `proxy_http_call`.
//!
//! * 200 from the service: the request goes on with `x-auth-user` set from the service's
//!   `x-user` answer header.
//! * Anything else, or no answer: 401 (403 if the service said 403), with the service's
//!   body; the upstream never sees the request.
//!
//! Plugin config: `cluster=…;path=…;timeout_ms=…` (defaults: `auth`, `/check`, `1000`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root(Settings::default())));
}}

#[derive(Clone)]
struct Settings {
    cluster: String,
    path: String,
    timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { cluster: "auth".into(), path: "/check".into(), timeout: Duration::from_millis(1000) }
    }
}

struct Root(Settings);

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = self.get_plugin_configuration() else {
            return true;
        };
        for item in String::from_utf8_lossy(&config).split(';').filter(|s| !s.trim().is_empty()) {
            match item.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("cluster", v)) if !v.is_empty() => self.0.cluster = v.to_string(),
                Some(("path", v)) if v.starts_with('/') => self.0.path = v.to_string(),
                Some(("timeout_ms", v)) if v.parse::<u64>().is_ok() => {
                    self.0.timeout = Duration::from_millis(v.parse().unwrap_or(1000))
                }
                _ => {
                    proxy_wasm::hostcalls::log(LogLevel::Error, &format!("bad config item {item:?}; want cluster=, path= or timeout_ms=")).ok();
                    return false;
                }
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Auth(self.0.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Auth(Settings);

impl HttpContext for Auth {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let token = self.get_http_request_header("authorization").unwrap_or_default();
        let call = self.dispatch_http_call(
            &self.0.cluster,
            vec![
                (":method", "GET"),
                (":path", &self.0.path),
                (":authority", &self.0.cluster),
                ("authorization", &token),
            ],
            None,
            vec![],
            self.0.timeout,
        );
        match call {
            Ok(_) => Action::Pause,
            Err(status) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("cannot call {}: {status:?}", self.0.cluster)).ok();
                self.send_http_response(503, vec![], Some(b"auth service unavailable\n"));
                Action::Pause
            }
        }
    }
}

impl Context for Auth {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        if status == "200" {
            let user = self.get_http_call_response_header("x-user").unwrap_or_default();
            self.set_http_request_header("x-auth-user", Some(&user));
            self.resume_http_request();
            return;
        }
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_else(|| b"unauthorized\n".to_vec());
        let code = if status == "403" { 403 } else { 401 };
        self.send_http_response(code, vec![("x-auth-status", if status.is_empty() { "none" } else { &status })], Some(&body));
    }
}
