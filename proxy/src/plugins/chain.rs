//! One request through its route's plugins, phase by phase.
//!
//! ```text
//! request headers ─▶ request body chunks ─▶ (upstream) ─▶ response headers ─▶ response body
//!   plugins in route order                                 plugins in reverse order
//! ```
//!
//! Envoy's filter-chain rules, on pingora's callbacks:
//! * A plugin that pauses the request after dispatching `proxy_http_call`s holds the request
//!   until their answers are delivered and it resumes it (or answers locally).
//! * A plugin that pauses request headers without a callout while a body follows (Envoy's
//!   `StopIteration`: it wants the body first) holds the head until the body's end: the
//!   request path reads the whole body (up to the retry buffer, 64 KiB, and the plugins'
//!   body limits; 413 past them), runs the body phase on it, then sends the head with
//!   every edit the plugins made in either phase ([`RequestPlugins::wants_body_first`]).
//! * A plugin that pauses response headers cannot hold them (pingora sends the head when
//!   the response filter ends): the head goes with the plugins' header edits so far, its
//!   `content-length` replaced by chunked framing, since the body may change length.
//! * Body chunks flow from plugin to plugin. A plugin that pauses a body keeps what it got so
//!   far; later plugins see nothing until it continues, then everything at once. A plugin's
//!   buffer is bounded: past its limit the request ends with 413 (request body) or 500
//!   (response body, while the response head is still unsent). Pausing at the end of a body
//!   continues — there is nothing more to wait for. A body that trailers follow (gRPC)
//!   never says it ended and pingora can put out no body with the trailers: such a body
//!   is not held — each chunk goes on as the plugins left it. A body held when trailers
//!   nobody expected arrive goes out then, in place of the trailers.
//! * Callouts made while nobody waits (response phase, root context) run in the background
//!   and their answers go to the plugin's root context.

use super::headers::{
    apply_header_pairs, apply_request_pairs, apply_response_pairs, header_pairs, response_headers,
};
use super::runtime::PluginRuntime;
use super::LoadedPlugin;
use bytes::Bytes;
use nip_filters::abi::Action;
use nip_filters::host::{Callout, Headers, HttpState, LocalResponse};
use nip_filters::{PluginError, PluginInstance};
use pingora::http::{RequestHeader, ResponseHeader};
use std::collections::VecDeque;
use std::sync::Arc;

/// What the request does after a plugin phase.
#[derive(Debug)]
pub enum Verdict {
    /// Go on to the next phase.
    Continue,
    /// A plugin answered the request itself.
    Reply(LocalResponse),
    /// A fail-closed plugin failed: answer 503 with response flag `PF`.
    Failed,
    /// A plugin's request body buffer passed its limit (413).
    RequestBodyTooLarge,
    /// A plugin's response body buffer passed its limit (500 while the head is unsent).
    ResponseBodyTooLarge,
    /// A plugin reset the stream (`proxy_close_stream`): close without an answer.
    Reset,
}

/// A plugin context opened for this request.
struct Context {
    plugin: Arc<LoadedPlugin>,
    id: i32,
    /// The instance the context lives in.
    generation: u64,
    /// Request body this plugin holds while it pauses.
    request_held: Vec<u8>,
    /// Response body this plugin holds while it pauses.
    response_held: Vec<u8>,
}

/// The plugin side of one request: open contexts, and what plugins see between callbacks.
pub struct RequestPlugins {
    runtime: Arc<PluginRuntime>,
    contexts: Vec<Context>,
    http: HttpState,
    request_has_body: bool,
    response_body_seen: bool,
    /// The response's body is followed by trailers (gRPC): no plugin may hold it.
    trailers_follow: bool,
    /// A plugin paused the head for the body (see the module's notes).
    body_first: bool,
}

impl RequestPlugins {
    /// Runs `plugins` (in order) on the request head in `http`, and writes their header
    /// edits to `request`. Returns the plugin side of the request and what to do next.
    pub async fn on_request_headers(
        runtime: &Arc<PluginRuntime>,
        plugins: &[Arc<LoadedPlugin>],
        http: HttpState,
        request: &mut RequestHeader,
        end_of_stream: bool,
    ) -> (Self, Verdict) {
        let mut this = RequestPlugins {
            runtime: Arc::clone(runtime),
            contexts: Vec::with_capacity(plugins.len()),
            http,
            request_has_body: !end_of_stream,
            response_body_seen: false,
            trailers_follow: false,
            body_first: false,
        };
        for plugin in plugins {
            let http = &mut this.http;
            let result = runtime.with_instance(plugin, |vm| {
                let context = vm.create_http_context()?;
                let action = vm.on_request_headers(context, http, end_of_stream)?;
                Ok((context, action, vm.take_callouts()))
            });
            let ((id, action, callouts), generation) = match result {
                Ok(done) => done,
                Err(_) if plugin.fail_open => continue,
                Err(_) => return (this, Verdict::Failed),
            };
            this.contexts.push(Context {
                plugin: Arc::clone(plugin),
                id,
                generation,
                request_held: Vec::new(),
                response_held: Vec::new(),
            });
            let index = this.contexts.len() - 1;
            let waits_for_body = action == Action::Pause
                && !end_of_stream
                && !callouts.iter().any(|c| c.context == id as u32);
            let verdict = this.settle_request(index, action, callouts).await;
            if !matches!(verdict, Verdict::Continue) {
                return (this, verdict);
            }
            this.body_first |= waits_for_body && !this.http.request_resumed;
        }
        if let Some(pairs) = this.http.request_headers.take_changes() {
            apply_request_pairs(request, pairs);
        }
        (this, Verdict::Continue)
    }

    /// After a request-direction callback: answers a local reply, and holds the request
    /// while the plugin paused it for its own callouts, delivering their answers.
    async fn settle_request(
        &mut self,
        index: usize,
        action: Action,
        callouts: Vec<Callout>,
    ) -> Verdict {
        let Some(context) = self.contexts.get(index) else {
            return Verdict::Continue;
        };
        let (plugin, id, generation) =
            (Arc::clone(&context.plugin), context.id, context.generation);
        let (mine, others): (Vec<Callout>, Vec<Callout>) =
            callouts.into_iter().partition(|c| c.context == id as u32);
        self.runtime.dispatch(&plugin, generation, others);
        if self.http.reset {
            return Verdict::Reset;
        }
        if let Some(reply) = self.http.local_response.take() {
            self.runtime.dispatch(&plugin, generation, mine);
            return Verdict::Reply(reply);
        }
        if action == Action::Continue || mine.is_empty() {
            self.runtime.dispatch(&plugin, generation, mine);
            return Verdict::Continue;
        }
        self.http.request_resumed = false;
        let mut pending: VecDeque<Callout> = mine.into();
        while let Some(callout) = pending.pop_front() {
            // Boxed: a callout's future is large and most requests never make one.
            let response = Box::pin(self.runtime.call(&callout)).await;
            let http = &mut self.http;
            let delivered = self.runtime.with_context(&plugin, generation, |vm| {
                vm.on_http_call_response(callout.token, response, Some(http))?;
                Ok(vm.take_callouts())
            });
            let more = match delivered {
                Ok(more) => more,
                Err(_) if plugin.fail_open => return Verdict::Continue,
                Err(_) => return Verdict::Failed,
            };
            let (mine, others): (Vec<Callout>, Vec<Callout>) =
                more.into_iter().partition(|c| c.context == id as u32);
            self.runtime.dispatch(&plugin, generation, others);
            pending.extend(mine);
            if self.http.reset {
                return Verdict::Reset;
            }
            if let Some(reply) = self.http.local_response.take() {
                self.runtime.dispatch(&plugin, generation, pending.into());
                return Verdict::Reply(reply);
            }
            if self.http.request_resumed {
                self.runtime.dispatch(&plugin, generation, pending.into());
                break;
            }
        }
        Verdict::Continue
    }

    /// Whether a plugin paused the request head until the body's end: the request path
    /// then reads the body first ([`RequestPlugins::on_whole_request_body`]).
    pub fn wants_body_first(&self) -> bool {
        self.body_first
    }

    /// The largest body every plugin here can hold.
    pub fn max_body_bytes(&self) -> usize {
        self.contexts
            .iter()
            .map(|c| c.plugin.max_body_bytes)
            .min()
            .unwrap_or(usize::MAX)
    }

    /// Runs the whole request body, read before the head went upstream, through the
    /// plugins; writes the head edits of both phases to `request` and returns the body to
    /// send. Later body callbacks pass chunks through untouched.
    pub async fn on_whole_request_body(
        &mut self,
        request: &mut RequestHeader,
        body: Bytes,
    ) -> Result<Bytes, Verdict> {
        let original_len = body.len();
        let mut chunk = Some(body);
        match self.on_request_body(&mut chunk, true).await {
            Verdict::Continue => {}
            other => return Err(other),
        }
        self.request_has_body = false;
        if let Some(pairs) = self.http.request_headers.take_changes() {
            apply_request_pairs(request, pairs);
        }
        let body = chunk.unwrap_or_default();
        if body.len() != original_len {
            super::headers::fit_content_length(request, body.len());
        }
        Ok(body)
    }

    /// Runs a request body chunk through the plugins. `chunk` is replaced by what goes
    /// upstream now: the chunk as the last plugin passed it, or nothing while one holds it.
    /// A chunk no plugin holds or edits passes without being copied.
    pub async fn on_request_body(
        &mut self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Verdict {
        if !self.request_has_body {
            return Verdict::Continue;
        }
        let mut flowing = chunk.take().unwrap_or_default();
        for index in 0..self.contexts.len() {
            let context = &mut self.contexts[index];
            let input = hold_or_pass(&mut context.request_held, flowing);
            if input.len() > context.plugin.max_body_bytes {
                return Verdict::RequestBodyTooLarge;
            }
            self.http.request_body = input;
            // "Resumed" is about this callback: a resume during the header phase must not
            // turn a later pause into a continue.
            self.http.request_resumed = false;
            let (plugin, id, generation) =
                (Arc::clone(&context.plugin), context.id, context.generation);
            let http = &mut self.http;
            let result = self.runtime.with_context(&plugin, generation, |vm| {
                let action = vm.on_request_body(id, http, end_of_stream)?;
                Ok((action, vm.take_callouts()))
            });
            let action = match result {
                Ok((action, callouts)) => {
                    match self.settle_request(index, action, callouts).await {
                        Verdict::Continue => action,
                        other => return other,
                    }
                }
                Err(_) if plugin.fail_open => Action::Continue,
                Err(_) => return Verdict::Failed,
            };
            let body = std::mem::take(&mut self.http.request_body);
            if self.http.reset {
                return Verdict::Reset;
            }
            if action == Action::Pause && !end_of_stream && !self.http.request_resumed {
                self.contexts[index].request_held = Vec::from(body);
                *chunk = Some(Bytes::new());
                return Verdict::Continue;
            }
            flowing = body;
        }
        *chunk = if flowing.is_empty() && end_of_stream {
            None
        } else {
            Some(flowing)
        };
        Verdict::Continue
    }

    /// Runs the plugins on the response head, last plugin first (Envoy's encoder order). A
    /// failure here cannot turn into a 503 any more: it is counted and the plugin skipped.
    /// Returns `Reset` when a plugin reset the stream, else `Continue`.
    pub fn on_response_headers(
        &mut self,
        response: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Verdict {
        self.http.response_headers = response_headers(response);
        self.http.info.response_code = Some(response.status.as_u16());
        self.trailers_follow = super::headers::trailers_follow(response);
        let paused = std::cell::Cell::new(false);
        self.each_in_response_order(|vm, context, http| {
            let action = vm.on_response_headers(context, http, end_of_stream)?;
            paused.set(paused.get() || action == Action::Pause);
            Ok(())
        });
        if let Some(pairs) = self.http.response_headers.take_changes() {
            apply_response_pairs(response, pairs);
        }
        // A plugin waits for the whole body and may change its length, but the head goes
        // now (pingora cannot hold it): the body's length is left to the framing
        // (chunked on HTTP/1.1, the stream's end on HTTP/2).
        if paused.get() && !end_of_stream {
            super::headers::unframe_for_new_body(response, self.http.info.protocol == "HTTP/2");
        }
        self.reset_or_continue()
    }

    /// Runs a head-like response callback on every context, last plugin first; a failure
    /// is counted (by the runtime) and that plugin skipped. Callouts go to the background.
    fn each_in_response_order(
        &mut self,
        callback: impl Fn(&mut PluginInstance, i32, &mut HttpState) -> Result<(), PluginError>,
    ) {
        for context in self.contexts.iter().rev() {
            let http = &mut self.http;
            let result = self
                .runtime
                .with_context(&context.plugin, context.generation, |vm| {
                    callback(vm, context.id, http)?;
                    Ok(vm.take_callouts())
                });
            if let Ok(callouts) = result {
                self.runtime
                    .dispatch(&context.plugin, context.generation, callouts);
            }
        }
        self.drop_response_phase_reply();
    }

    fn reset_or_continue(&self) -> Verdict {
        if self.http.reset {
            Verdict::Reset
        } else {
            Verdict::Continue
        }
    }

    /// Runs a response body chunk through the plugins, last plugin first: `Continue`, or
    /// `ResponseBodyTooLarge` when a plugin's buffer passed its limit.
    pub fn on_response_body(&mut self, chunk: &mut Option<Bytes>, end_of_stream: bool) -> Verdict {
        let empty = chunk.as_ref().is_none_or(|c| c.is_empty());
        if empty && !(end_of_stream && self.response_body_seen) {
            return Verdict::Continue;
        }
        self.response_body_seen = true;
        let mut flowing = chunk.take().unwrap_or_default();
        for index in (0..self.contexts.len()).rev() {
            let context = &mut self.contexts[index];
            let input = hold_or_pass(&mut context.response_held, flowing);
            if input.len() > context.plugin.max_body_bytes {
                return Verdict::ResponseBodyTooLarge;
            }
            self.http.response_body = input;
            self.http.response_resumed = false;
            let http = &mut self.http;
            let result = self
                .runtime
                .with_context(&context.plugin, context.generation, |vm| {
                    let action = vm.on_response_body(context.id, http, end_of_stream)?;
                    Ok((action, vm.take_callouts()))
                });
            let action = match result {
                Ok((action, callouts)) => {
                    self.runtime
                        .dispatch(&context.plugin, context.generation, callouts);
                    action
                }
                Err(_) => Action::Continue,
            };
            let body = std::mem::take(&mut self.http.response_body);
            if self.http.reset {
                return Verdict::Reset;
            }
            // A body trailers follow flows on (pingora could not put it out later).
            if action == Action::Pause
                && !end_of_stream
                && !self.http.response_resumed
                && !self.trailers_follow
            {
                context.response_held = Vec::from(body);
                self.drop_response_phase_reply();
                return Verdict::Continue;
            }
            flowing = body;
        }
        self.drop_response_phase_reply();
        *chunk = (!flowing.is_empty()).then_some(flowing);
        Verdict::Continue
    }

    /// Whether a plugin holds part of the response body (trailers came after a body
    /// nobody expected them after).
    pub fn holds_response_body(&self) -> bool {
        self.contexts.iter().any(|c| !c.response_held.is_empty())
    }

    /// Runs the plugins on the response trailers, last plugin first, and writes their edits
    /// back. (Pingora has no request-trailer phase, so `on_request_trailers` never runs.)
    /// Returns `Reset` when a plugin reset the stream, else `Continue`.
    pub fn on_response_trailers(&mut self, trailers: &mut http::HeaderMap) -> Verdict {
        self.http.response_trailers = Headers::from_pairs(header_pairs(trailers));
        self.each_in_response_order(|vm, context, http| {
            vm.on_response_trailers(context, http).map(drop)
        });
        if let Some(pairs) = self.http.response_trailers.take_changes() {
            apply_header_pairs(trailers, pairs);
        }
        self.reset_or_continue()
    }

    fn drop_response_phase_reply(&mut self) {
        if let Some(reply) = self.http.local_response.take() {
            tracing::warn!(
                request_id = %self.http.info.id,
                status = reply.status,
                "a plugin sent a local reply from the response phase; only the request phase supports that, so it is ignored"
            );
        }
    }

    /// Ends every context: `on_log`, `on_done`, `on_delete`.
    pub fn finish(&mut self, status: u16) {
        self.http.info.response_code = Some(status);
        for context in std::mem::take(&mut self.contexts) {
            let http = &mut self.http;
            let _ = self
                .runtime
                .with_context(&context.plugin, context.generation, |vm| {
                    vm.finish_http_context(context.id, http)
                });
        }
    }
}

/// What a plugin sees of a body now: `chunk` alone when it holds nothing (no copy), or what
/// it held with `chunk` appended.
fn hold_or_pass(held: &mut Vec<u8>, chunk: Bytes) -> Bytes {
    if held.is_empty() {
        return chunk;
    }
    held.extend_from_slice(&chunk);
    Bytes::from(std::mem::take(held))
}
