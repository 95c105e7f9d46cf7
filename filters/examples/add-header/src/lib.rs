//! Adds headers in both directions (and a trailer to responses that have trailers). Plugin config: `name=value` (default `x-plugin=add-header`).
//! A value written `%a.b%` is the host property `a.b` of each request (e.g.
//! `x-peer=%connection.uri_san_peer_certificate%`), or empty when the host has none.
//! Also answers 403 locally when the request carries `x-deny: yes`, to exercise local replies.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(AddHeaderRoot { name: "x-plugin".into(), value: "add-header".into() }));
}}

struct AddHeaderRoot {
    name: String,
    value: String,
}

impl Context for AddHeaderRoot {}

impl RootContext for AddHeaderRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(config) = self.get_plugin_configuration() {
            let text = String::from_utf8_lossy(&config).to_string();
            match text.trim().split_once('=') {
                Some((name, value)) => {
                    self.name = name.trim().to_string();
                    self.value = value.trim().to_string();
                }
                None => {
                    proxy_wasm::hostcalls::log(LogLevel::Error, "config must be name=value").ok();
                    return false;
                }
            }
        }
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("configured {}={}", self.name, self.value)).ok();
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AddHeader { name: self.name.clone(), value: self.value.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AddHeader {
    name: String,
    value: String,
}

impl Context for AddHeader {}

impl HttpContext for AddHeader {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.get_http_request_header("x-deny").as_deref() == Some("yes") {
            self.send_http_response(403, vec![("x-denied-by", "add-header")], Some(b"denied\n"));
            return Action::Pause;
        }
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let value = match self.value.strip_prefix('%').and_then(|v| v.strip_suffix('%')) {
            Some(property) => self
                .get_property(property.split('.').collect())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default(),
            None => self.value.clone(),
        };
        self.add_http_request_header(&self.name.clone(), &value);
        self.set_http_request_header("x-seen-path", Some(&path));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header(&self.name.clone(), Some(&self.value.clone()));
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // Responses that end with trailers (gRPC) carry the tag there too.
        self.add_http_response_trailer(&format!("{}-trailer", self.name), &self.value.clone());
        Action::Continue
    }
}
