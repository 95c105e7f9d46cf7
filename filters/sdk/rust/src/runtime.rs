//! The proxy-wasm side: turns the ABI's callbacks into messages, runs the handler's
//! future (polled again whenever an HTTP call it waits on is answered), and writes back
//! what the returned message changed.
//!
//! ```text
//! on_http_request_headers ─(body follows)─▶ Pause ─▶ on_http_request_body … end
//!        └──────────────(no body)──────────────┐        │
//!                                              ▼        ▼
//!                              build Message ─▶ handler future ─▶ Ready: apply, Continue
//!                                                   │
//!                                                Pending (an HTTP call): Pause
//!                                                   ▼
//!                            on_http_call_response ─▶ poll again ─▶ Ready: apply, resume
//! ```

use crate::context::{deliver, Context, HttpResponse};
use crate::message::{
    Data, Error, Message, MessageType, Outcome, Parts, Reply, META_HEADER_PREFIX, PRIORITY_HEADER,
};
use crate::plugin::{HandlerFuture, Plugin};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context as ProxyContext, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use serde::de::DeserializeOwned;
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll, Waker};

thread_local! {
    /// The root context `run()` built, until the host asks for it.
    static ROOT: RefCell<Option<Box<dyn RootContext>>> = RefCell::new(None);
}

/// Registers the plugin with proxy-wasm.
pub(crate) fn install<C: DeserializeOwned + Default + 'static>(plugin: Plugin<C>) {
    let root: Box<dyn RootContext> = Box::new(Root {
        plugin: Rc::new(plugin),
        config: Rc::new(C::default()),
        started: false,
    });
    ROOT.with(|slot| *slot.borrow_mut() = Some(root));
    proxy_wasm::set_root_context(|_| {
        ROOT.with(|slot| slot.borrow_mut().take())
            .unwrap_or_else(|| Box::new(Unconfigured))
    });
}

/// A second root context of the same VM (the host makes one per plugin): nothing to run.
struct Unconfigured;
impl ProxyContext for Unconfigured {}
impl RootContext for Unconfigured {}

struct Root<C> {
    plugin: Rc<Plugin<C>>,
    config: Rc<C>,
    started: bool,
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

impl<C> ProxyContext for Root<C> {
    fn on_done(&mut self) -> bool {
        if let Some(hook) = &self.plugin.on_stop {
            hook();
        }
        true
    }

    fn on_foreign_function(&mut self, function_id: u32, _arguments_size: usize) {
        let report = match function_id {
            crate::HEALTH_CHECK => serde_json::to_vec(
                &self
                    .plugin
                    .health_check
                    .as_ref()
                    .map_or_else(crate::Health::ok, |check| check()),
            ),
            crate::RESOURCE_USAGE => serde_json::to_vec(
                &self
                    .plugin
                    .resource_usage
                    .as_ref()
                    .map_or_else(|| serde_json::json!({}), |usage| usage()),
            ),
            _ => return,
        };
        if let Ok(report) = report {
            let _ = hostcalls::call_foreign_function(crate::REPORT, Some(&report));
        }
    }
}

impl<C: DeserializeOwned + Default + 'static> RootContext for Root<C> {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        if let Ok(declaration) = serde_json::to_vec(&self.plugin.declaration) {
            // A host without the NIP API (NOT_FOUND) runs the plugin all the same.
            if let Err(status) =
                hostcalls::call_foreign_function(crate::DECLARE, Some(&declaration))
            {
                log(
                    LogLevel::Debug,
                    &format!("the host took no plugin declaration ({status:?})"),
                );
            }
        }
        if let Some(hook) = &self.plugin.on_init {
            hook();
        }
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config: C = if raw.iter().all(u8::is_ascii_whitespace) {
            C::default()
        } else {
            match serde_json::from_slice(&raw) {
                Ok(config) => config,
                Err(e) => {
                    log(
                        LogLevel::Error,
                        &format!(
                            "{}: the plugin configuration is not valid: {e}",
                            self.plugin.declaration.name
                        ),
                    );
                    return false;
                }
            }
        };
        if let Some(check) = &self.plugin.on_config_change {
            if let Err(reason) = check(&config) {
                log(
                    LogLevel::Error,
                    &format!(
                        "{}: configuration refused: {reason}",
                        self.plugin.declaration.name
                    ),
                );
                return false;
            }
        }
        self.config = Rc::new(config);
        if !self.started {
            self.started = true;
            if let Some(hook) = &self.plugin.on_start {
                hook();
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            plugin: Rc::clone(&self.plugin),
            context: Context {
                config: Rc::clone(&self.config),
                name: self.plugin.declaration.name.as_str().into(),
            },
            task: None,
            started: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request through the plugin.
struct Stream<C> {
    plugin: Rc<Plugin<C>>,
    context: Context<C>,
    /// The handler's future while it waits for an HTTP call, and the kind of message.
    task: Option<(MessageType, HandlerFuture)>,
    /// The kind of message started and its body's size on the wire (for writing a new
    /// body over it).
    started: Option<(MessageType, usize)>,
}

impl<C> ProxyContext for Stream<C> {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let headers = hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| v.parse().ok());
        let response = status.map(|status| HttpResponse {
            status,
            headers: headers
                .into_iter()
                .filter(|(n, _)| !n.starts_with(':'))
                .collect(),
            body: hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default(),
        });
        deliver(token, response);
        if let Some((kind, mut future)) = self.task.take() {
            match poll(&mut future) {
                Poll::Pending => self.task = Some((kind, future)),
                Poll::Ready(result) => {
                    if self.finish(kind, result) {
                        match kind {
                            MessageType::Request => {
                                let _ = hostcalls::resume_http_request();
                            }
                            MessageType::Response => {
                                let _ = hostcalls::resume_http_response();
                            }
                        }
                    }
                }
            }
        }
    }
}

impl<C: 'static> HttpContext for Stream<C> {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if !self.plugin.phases.requests {
            return Action::Continue;
        }
        if self.plugin.phases.bodies && !end_of_stream {
            return Action::Pause; // until the body's end
        }
        self.start(MessageType::Request, 0)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.plugin.phases.requests || !self.plugin.phases.bodies || self.started.is_some() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.start(MessageType::Request, size)
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if !self.plugin.phases.responses {
            return Action::Continue;
        }
        self.started = None;
        if self.plugin.phases.bodies && !end_of_stream {
            return Action::Pause;
        }
        self.start(MessageType::Response, 0)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let started = self
            .started
            .is_some_and(|(kind, _)| kind == MessageType::Response);
        if !self.plugin.phases.responses || !self.plugin.phases.bodies || started {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.start(MessageType::Response, size)
    }
}

/// Polls a handler's future once (an HTTP call's answer, not a waker, brings the next poll).
fn poll(future: &mut HandlerFuture) -> Poll<Result<Outcome, Error>> {
    let mut cx = TaskContext::from_waker(Waker::noop());
    Pin::as_mut(future).poll(&mut cx)
}

impl<C> Stream<C> {
    /// Makes the message, runs the handler on it, and says what the host does next.
    fn start(&mut self, kind: MessageType, body_size: usize) -> Action {
        let Some(handler) = self.plugin.handler.clone() else {
            return Action::Continue;
        };
        let message = Message::new(kind, Box::new(HostParts { kind, body_size }));
        self.started = Some((kind, body_size));
        let mut future = handler(message, self.context.clone());
        match poll(&mut future) {
            Poll::Ready(result) => {
                if self.finish(kind, result) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
            Poll::Pending => {
                self.task = Some((kind, future));
                Action::Pause
            }
        }
    }

    /// Applies the handler's result; false when the message was answered instead.
    fn finish(&mut self, kind: MessageType, result: Result<Outcome, Error>) -> bool {
        match result {
            Ok(Outcome::Continue(message)) => {
                if let Some((_, body_size)) = self.started {
                    apply(&message, body_size);
                }
                let _ = kind;
                true
            }
            Ok(Outcome::Reply(reply)) => {
                send(&reply);
                false
            }
            Err(error) => {
                log(
                    LogLevel::Warn,
                    &format!("{}: {}", self.plugin.declaration.name, error),
                );
                send(&Reply::text(error.status, format!("{}\n", error.message)));
                false
            }
        }
    }
}

fn send(reply: &Reply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let _ = hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body));
}

/// The maps of one direction.
fn maps(kind: MessageType) -> (MapType, BufferType) {
    match kind {
        MessageType::Request => (MapType::HttpRequestHeaders, BufferType::HttpRequestBody),
        MessageType::Response => (MapType::HttpResponseHeaders, BufferType::HttpResponseBody),
    }
}

fn property(path: &[&str]) -> Option<String> {
    hostcalls::get_property(path.to_vec())
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
}

/// A message's parts, read from the host when the handler asks.
struct HostParts {
    kind: MessageType,
    body_size: usize,
}

impl Parts for HostParts {
    fn headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(maps(self.kind).0).unwrap_or_default()
    }

    fn request_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
    }

    fn body(&self) -> Vec<u8> {
        if self.body_size == 0 {
            return Vec::new();
        }
        hostcalls::get_buffer(maps(self.kind).1, 0, self.body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn property(&self, path: &[&str]) -> Option<String> {
        property(path)
    }

    fn arrived_nanos(&self) -> u64 {
        hostcalls::get_property(vec!["request", "time"])
            .ok()
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes)
            .or_else(|| {
                hostcalls::get_current_time()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_nanos() as u64)
            })
            .unwrap_or(0)
    }
}

/// Writes back what the handler changed of its message.
fn apply(message: &Message, body_size: usize) {
    let (map, buffer) = maps(message.kind());
    let set = |name: &str, value: Option<&str>| {
        let _ = hostcalls::set_map_value(map, name, value);
    };
    if let Some((original, changed)) = message.head_change() {
        for (name, value) in &changed.headers {
            if original.headers.get(name) != Some(value) {
                set(name, Some(value));
            }
        }
        for name in original.headers.keys() {
            if !changed.headers.contains_key(name) {
                set(name, None);
            }
        }
        for (field, value) in &changed.fields {
            if original.fields.get(field) != Some(value) {
                set(&format!("{META_HEADER_PREFIX}{field}"), Some(value));
            }
        }
        for field in original.fields.keys() {
            if !changed.fields.contains_key(field) {
                set(&format!("{META_HEADER_PREFIX}{field}"), None);
            }
        }
        if let Some(path) = changed
            .path
            .as_ref()
            .filter(|p| Some(*p) != original.path.as_ref())
        {
            set(":path", Some(path));
        }
        if let Some(status) = changed.status.filter(|s| Some(*s) != original.status) {
            set(":status", Some(&status.to_string()));
        }
    }
    if let Some(priority) = message.priority_change() {
        set(PRIORITY_HEADER, Some(priority));
    }
    if let Some(data) = message.data_change() {
        let body = data.to_bytes();
        let _ = hostcalls::set_buffer(buffer, 0, body_size, &body);
        if message.headers().contains_key("content-length") {
            set("content-length", Some(&body.len().to_string()));
        }
        if matches!(data, Data::Json(_)) && !message.headers().contains_key("content-type") {
            set("content-type", Some("application/json"));
        }
    }
}
