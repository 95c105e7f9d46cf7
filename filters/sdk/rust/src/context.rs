//! What a handler can reach besides its message: the plugin's configuration, HTTP calls
//! to the proxy's clusters (as futures), shared data and the log.

use crate::message::Error;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, Status};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

/// The plugin's side of one message: its configuration and what it may call.
pub struct Context<C> {
    pub(crate) config: Rc<C>,
    pub(crate) name: Rc<str>,
}

impl<C> Clone for Context<C> {
    fn clone(&self) -> Self {
        Context {
            config: Rc::clone(&self.config),
            name: Rc::clone(&self.name),
        }
    }
}

impl<C> Context<C> {
    /// The plugin's configuration (the one in force when the message arrived).
    pub fn config(&self) -> &C {
        &self.config
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls `cluster` (one of the proxy's clusters) and waits for its answer.
    pub fn http_call(&self, cluster: &str, request: HttpRequest) -> HttpCall {
        HttpCall {
            state: CallState::Ready(cluster.to_string(), request),
        }
    }

    /// Waits `duration`: the request is held meanwhile (the host answers the SDK's timer
    /// callout when it has passed).
    pub async fn sleep(&self, duration: Duration) {
        let timer = HttpCall {
            state: CallState::Ready(
                crate::TIMER_UPSTREAM.to_string(),
                HttpRequest {
                    timeout: duration,
                    ..HttpRequest::get("/")
                },
            ),
        };
        // The answer is always "none": the point is when it comes.
        let _ = timer.await;
    }

    /// Logs at info level.
    pub fn log_info(&self, message: &str) {
        let _ = hostcalls::log(LogLevel::Info, message);
    }

    /// Logs at warn level.
    pub fn log_warn(&self, message: &str) {
        let _ = hostcalls::log(LogLevel::Warn, message);
    }

    /// A value shared by every instance of every plugin in the proxy.
    pub fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(key).ok().and_then(|(v, _)| v)
    }

    /// Sets a shared value.
    pub fn shared_set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        hostcalls::set_shared_data(key, Some(value), None)
            .map_err(|s| Error::new(format!("shared data {key}: {s:?}")))
    }
}

/// A request to a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method.
    pub method: String,
    /// Path with query.
    pub path: String,
    /// `:authority` (the cluster's name when not set).
    pub authority: Option<String>,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Option<Vec<u8>>,
    /// How long to wait for the answer.
    pub timeout: Duration,
}

impl HttpRequest {
    /// A GET of `path`, waiting up to a second.
    pub fn get(path: &str) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            path: path.into(),
            authority: None,
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(1),
        }
    }

    /// A POST of `body` to `path`.
    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> HttpRequest {
        HttpRequest {
            method: "POST".into(),
            body: Some(body.into()),
            ..HttpRequest::get(path)
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> HttpRequest {
        self.timeout = timeout;
        self
    }
}

/// A cluster's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::new(format!("the answer is not the JSON expected: {e}")))
    }
}

thread_local! {
    /// Answers delivered by the host, by callout token, until their future takes them.
    static ANSWERS: RefCell<HashMap<u32, Option<HttpResponse>>> = RefCell::new(HashMap::new());
}

/// Files the host's answer to callout `token` (`None`: no answer — a timeout or reset).
pub(crate) fn deliver(token: u32, response: Option<HttpResponse>) {
    ANSWERS.with(|answers| {
        if let Some(slot) = answers.borrow_mut().get_mut(&token) {
            *slot = Some(response.unwrap_or(HttpResponse {
                status: 0,
                headers: Vec::new(),
                body: Vec::new(),
            }));
        }
    });
}

enum CallState {
    Ready(String, HttpRequest),
    Waiting(u32),
    Done,
}

/// An HTTP call in flight: `await` it for the answer.
pub struct HttpCall {
    state: CallState,
}

impl Future for HttpCall {
    type Output = Result<HttpResponse, Error>;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match std::mem::replace(&mut self.state, CallState::Done) {
            CallState::Ready(cluster, request) => {
                let authority = request.authority.clone().unwrap_or_else(|| cluster.clone());
                let mut headers: Vec<(&str, &str)> = vec![
                    (":method", &request.method),
                    (":path", &request.path),
                    (":authority", &authority),
                ];
                headers.extend(
                    request
                        .headers
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_str())),
                );
                match hostcalls::dispatch_http_call(
                    &cluster,
                    headers,
                    request.body.as_deref(),
                    Vec::new(),
                    request.timeout,
                ) {
                    Ok(token) => {
                        ANSWERS.with(|a| a.borrow_mut().insert(token, None));
                        self.state = CallState::Waiting(token);
                        Poll::Pending
                    }
                    Err(status) => Poll::Ready(Err(call_error(&cluster, status))),
                }
            }
            CallState::Waiting(token) => {
                let answer = ANSWERS.with(|a| {
                    let mut answers = a.borrow_mut();
                    match answers.get(&token) {
                        Some(Some(_)) => answers.remove(&token).flatten(),
                        _ => None,
                    }
                });
                match answer {
                    Some(response) if response.status == 0 => {
                        Poll::Ready(Err(Error::with_status(503, "the HTTP call got no answer")))
                    }
                    Some(response) => Poll::Ready(Ok(response)),
                    None => {
                        self.state = CallState::Waiting(token);
                        Poll::Pending
                    }
                }
            }
            CallState::Done => Poll::Ready(Err(Error::new("HTTP call polled after it ended"))),
        }
    }
}

impl Drop for HttpCall {
    fn drop(&mut self) {
        if let CallState::Waiting(token) = self.state {
            ANSWERS.with(|a| a.borrow_mut().remove(&token));
        }
    }
}

fn call_error(cluster: &str, status: Status) -> Error {
    Error::with_status(503, format!("cannot call cluster {cluster}: {status:?}"))
}
