//! Works on bodies in both directions.
//!
//! * Request: buffers the whole body (pausing until its end) and answers 403 when it
//!   contains the `deny` word, before anything reaches the upstream's handler.
//! * Response: buffers the whole body and replaces every `from` with `to`.
//!
//! Plugin config: `from=…;to=…;deny=…` (defaults: `from=hello`, `to=goodbye`,
//! `deny=forbidden`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root(Rules::default())));
}}

#[derive(Clone)]
struct Rules {
    from: String,
    to: String,
    deny: String,
}

impl Default for Rules {
    fn default() -> Self {
        Rules { from: "hello".into(), to: "goodbye".into(), deny: "forbidden".into() }
    }
}

struct Root(Rules);

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = self.get_plugin_configuration() else {
            return true;
        };
        for item in String::from_utf8_lossy(&config).split(';').filter(|s| !s.trim().is_empty()) {
            match item.split_once('=').map(|(k, v)| (k.trim(), v.trim().to_string())) {
                Some(("from", v)) if !v.is_empty() => self.0.from = v,
                Some(("to", v)) => self.0.to = v,
                Some(("deny", v)) if !v.is_empty() => self.0.deny = v,
                _ => {
                    proxy_wasm::hostcalls::log(LogLevel::Error, &format!("bad config item {item:?}; want from=, to= or deny=")).ok();
                    return false;
                }
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Rewrite(self.0.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Rewrite(Rules);

impl Context for Rewrite {}

impl HttpContext for Rewrite {
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if contains(&body, self.0.deny.as_bytes()) {
            self.send_http_response(403, vec![("x-denied-by", "body-rewrite")], Some(b"body refused\n"));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // The length changes with the rewrite; let the proxy frame the body.
        self.set_http_response_header("content-length", None);
        self.set_http_response_header("x-body-rewritten", Some("yes"));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, body_size).unwrap_or_default();
        let text = String::from_utf8_lossy(&body).replace(&self.0.from, &self.0.to);
        self.set_http_response_body(0, body_size, text.as_bytes());
        Action::Continue
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
