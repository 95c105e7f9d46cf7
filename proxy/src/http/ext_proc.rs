//! A request through its route's `ext_proc` processors (after the route's wasm plugins
//! on the request, before them on the response): one stream per processor, opened at
//! the request head and kept until the request ends.
//!
//! Bodies go to a processor whole (`BUFFERED`) or chunk by chunk (`STREAMED`). A whole
//! request body is read before the head goes (and every `STREAMED` processor of the
//! route then gets it whole too, in one message); a streamed one goes upstream with
//! chunked framing, each chunk as its processors made it. A response body flows through
//! the processors last first, each one holding it (`BUFFERED`) or changing it chunk by
//! chunk. A response that ends with trailers (gRPC) never says its body ended before
//! them: processors that want it whole get it with the trailers, as a copy — it has
//! already reached the client unchanged (pingora puts out no body with trailers).

use super::context::RequestCtx;
use super::local_reply;
use crate::ext_proc::client::ProcessorStream;
use crate::ext_proc::{BodyMode, ExtProc, MutationRules, Mutations};
use crate::route::Route;
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, HttpBody, HttpHeaders, HttpTrailers,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use nip_filters::host::LocalResponse;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::Session;
use std::sync::Arc;

/// The key of the attributes Envoy's ext_proc filter sends.
const ATTRIBUTES_KEY: &str = "envoy.filters.http.ext_proc";

/// The processors' side of one request.
#[derive(Debug, Default)]
pub(super) struct Processors {
    /// Open streams, in route order.
    stages: Vec<Stage>,
    /// Some processor gets the response body (the body goes through [`on_response_body`]).
    response_body_stages: bool,
    /// The response ends with trailers (gRPC): processors wanting it whole get a copy.
    trailers_follow: bool,
    /// A processor's own answer replacing the upstream's body.
    replacement: Option<Bytes>,
    /// The request body going through `STREAMED` processors chunk by chunk.
    request_stream: Option<RequestStream>,
}

/// One processor's stream and what it holds of the request.
#[derive(Debug)]
struct Stage {
    processor: Arc<ExtProc>,
    stream: ProcessorStream,
    /// It gets the request body chunk by chunk.
    streams_request_body: bool,
    /// The response body held for it (`BUFFERED`).
    held: Vec<u8>,
    /// The response body outgrew its bound: the rest goes past it.
    overflowed: bool,
}

/// A request body streamed through processors, as far as it went.
#[derive(Debug, Default)]
struct RequestStream {
    /// The try whose chunks are going through (pingora replays a retry's body).
    try_number: u32,
    /// Bytes of the client's body gone through so far.
    input: usize,
    /// What the processors made of them, kept for a retry while within pingora's retry
    /// buffer (a longer body is not retried); `None` past it.
    output: Option<Vec<u8>>,
    /// The body's end went through.
    done: bool,
}

/// The most request body kept for a retry's replay: pingora's retry buffer.
const REPLAY_BOUND: usize = 64 * 1024;

/// Why a processor could not be asked.
type Failure = String;

fn headers_of(pairs: impl Iterator<Item = (String, Vec<u8>)>) -> HeaderMap {
    HeaderMap {
        headers: pairs
            .map(|(key, raw_value)| HeaderValue {
                key,
                raw_value,
                ..Default::default()
            })
            .collect(),
    }
}

fn request_pairs(request: &RequestHeader, scheme: &str) -> HeaderMap {
    let authority = super::request_authority(request).to_string();
    let pseudo = [
        (
            ":method".to_string(),
            request.method.as_str().as_bytes().to_vec(),
        ),
        (
            ":path".to_string(),
            request
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes()
                .to_vec(),
        ),
        (":authority".to_string(), authority.into_bytes()),
        (":scheme".to_string(), scheme.as_bytes().to_vec()),
    ];
    headers_of(
        pseudo.into_iter().chain(
            request
                .headers
                .iter()
                .filter(|(n, _)| *n != http::header::HOST)
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())),
        ),
    )
}

fn response_pairs(response: &ResponseHeader) -> HeaderMap {
    headers_of(
        std::iter::once((
            ":status".to_string(),
            response.status.as_str().as_bytes().to_vec(),
        ))
        .chain(
            response
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())),
        ),
    )
}

/// The attributes a processor asked for (`request_attributes`), those NIP knows.
fn attributes(processor: &ExtProc, session: &Session, ctx: &RequestCtx) -> Struct {
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let mut fields = std::collections::HashMap::new();
    for name in &processor.attributes {
        let value = match name.as_str() {
            "request.id" => Some(text(&ctx.request_id)),
            "request.time" => Some(text(
                &humantime::format_rfc3339_millis(ctx.start_wall).to_string(),
            )),
            "source.address" => session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| text(&a.to_string())),
            "route_name" | "xds.route_name" => ctx.route.as_ref().map(|r| text(&r.name)),
            "listener_name" => ctx.manager.as_ref().map(|m| text(&m.stat_prefix)),
            "nip.tenant" => ctx.tenant().map(|t| text(&t.id)),
            "nip.principal" => super::request_principal(session, ctx).map(|p| text(&p)),
            "nip.priority" => Some(text(ctx.priority.as_str())),
            _ => None,
        };
        if let Some(value) = value {
            fields.insert(name.clone(), value);
        }
    }
    Struct { fields }
}

/// The body modes, told with the first message so the processor knows whether a body
/// will follow a head.
fn protocol_config(processor: &ExtProc) -> ProtocolConfiguration {
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    let mode = |body: BodyMode| {
        let mode = match body {
            BodyMode::None => BodySendMode::None,
            BodyMode::Buffered => BodySendMode::Buffered,
            BodyMode::Streamed => BodySendMode::Streamed,
        };
        mode as i32
    };
    ProtocolConfiguration {
        request_body_mode: mode(processor.mode.request_body),
        response_body_mode: mode(processor.mode.response_body),
        ..Default::default()
    }
}

fn apply_request(request: &mut RequestHeader, mutations: &Mutations) {
    for name in &mutations.remove {
        request.remove_header(name);
    }
    for (name, value, append) in &mutations.set {
        if *append {
            let _ = request.append_header(name.clone(), value.clone());
        } else {
            let _ = request.insert_header(name.clone(), value.clone());
        }
    }
    if let Some(path) = &mutations.path {
        if let Ok(uri) = http::Uri::try_from(path.as_str()) {
            request.set_uri(uri);
        }
    }
}

fn apply_response(response: &mut ResponseHeader, mutations: &Mutations) {
    for name in &mutations.remove {
        response.remove_header(name);
    }
    for (name, value, append) in &mutations.set {
        if *append {
            let _ = response.append_header(name.clone(), value.clone());
        } else {
            let _ = response.insert_header(name.clone(), value.clone());
        }
    }
    if let Some(status) = mutations.status {
        let _ = response.set_status(status);
    }
}

/// The answer's common part, if it is the answer to `expected`; an immediate response.
enum Answer {
    Continue(Mutations),
    Immediate(ImmediateResponse),
}

fn read_answer(
    answer: ProcessingResponse,
    expected: &'static str,
    rules: &MutationRules,
) -> Result<Answer, Failure> {
    use processing_response::Response;
    let common = match (answer.response, expected) {
        (Some(Response::ImmediateResponse(immediate)), _) => {
            return Ok(Answer::Immediate(immediate))
        }
        (Some(Response::RequestHeaders(h)), "request_headers") => h.response,
        (Some(Response::ResponseHeaders(h)), "response_headers") => h.response,
        (Some(Response::RequestBody(b)), "request_body") => b.response,
        (Some(Response::ResponseBody(b)), "response_body") => b.response,
        (Some(Response::ResponseTrailers(t)), "response_trailers") => {
            let mut mutations = Mutations::default();
            if let Some(headers) = &t.header_mutation {
                mutations.add_headers(headers, rules)?;
            }
            return Ok(Answer::Continue(mutations));
        }
        (other, _) => {
            return Err(format!(
                "answered {} to {expected}",
                match other {
                    None => "nothing",
                    Some(Response::RequestHeaders(_)) => "request_headers",
                    Some(Response::ResponseHeaders(_)) => "response_headers",
                    Some(Response::RequestBody(_)) => "request_body",
                    Some(Response::ResponseBody(_)) => "response_body",
                    Some(Response::ResponseTrailers(_)) => "response_trailers",
                    Some(_) => "a message NIP does not take",
                }
            ))
        }
    };
    Mutations::of(common.as_ref(), rules).map(Answer::Continue)
}

/// Sends a processor's immediate response to the client.
async fn answer_immediately(
    session: &mut Session,
    ctx: &mut RequestCtx,
    processor: &ExtProc,
    immediate: ImmediateResponse,
) {
    processor.stats.immediate.inc();
    let reply = immediate_reply(processor, immediate);
    ctx.local_status = reply.status;
    Box::pin(local_reply::write_answer(
        session,
        ctx,
        reply.status,
        &reply.headers,
        Bytes::from(reply.body),
        None,
    ))
    .await;
}

/// What a failed processor means for the request: `None` to go on without it
/// (`failure_mode_allow`), else the request is answered 500.
async fn fail(session: &mut Session, ctx: &mut RequestCtx, processor: &ExtProc, why: &str) -> bool {
    processor.stats.failed.inc();
    tracing::debug!(filter = %processor.name, "ext_proc: {why}");
    if processor.failure_mode_allow {
        return false;
    }
    ctx.local_status = 500;
    local_reply::respond(session, ctx, 500, "the external processor failed\n").await;
    true
}

/// What a request does after one exchange of the request phase.
enum Step {
    /// Go on, with the processor's changes.
    Go(Mutations),
    /// The request was answered (the processor's immediate response, or 500).
    Answered,
    /// The processor failed and fails open: go on without it.
    Skip,
}

/// Sends `message` on the request phase and turns the answer into the next step.
async fn ask(
    session: &mut Session,
    ctx: &mut RequestCtx,
    processor: &ExtProc,
    stream: &ProcessorStream,
    message: ProcessingRequest,
    expected: &'static str,
) -> Step {
    let answer = stream
        .exchange(message)
        .await
        .and_then(|a| read_answer(a, expected, &processor.rules));
    match answer {
        Ok(Answer::Continue(mutations)) => {
            processor.stats.ok.inc();
            Step::Go(mutations)
        }
        Ok(Answer::Immediate(immediate)) => {
            answer_immediately(session, ctx, processor, immediate).await;
            Step::Answered
        }
        Err(why) if fail(session, ctx, processor, &why).await => Step::Answered,
        Err(_) => Step::Skip,
    }
}

/// Runs the route's processors on the request head (and body, for those that want it);
/// true when the request was answered.
pub(super) async fn on_request(
    session: &mut Session,
    ctx: &mut RequestCtx,
    route: &Route,
    gateway: &super::Gateway,
) -> pingora::Result<bool> {
    let Some(client) = gateway.ext_proc_client() else {
        for processor in &route.processors {
            if fail(session, ctx, processor, "no ext_proc runtime").await {
                return Ok(true);
            }
        }
        return Ok(false);
    };
    let scheme = super::client_scheme(session);
    let mut processors = Processors::default();
    // A body read before the head goes (for a plugin or a processor that wants it whole)
    // goes whole to the processors that would take it in chunks, too.
    let body_read_early = ctx.rare.as_ref().is_some_and(|r| r.request_body.is_some())
        || route
            .processors
            .iter()
            .any(|p| p.mode.request_body == BodyMode::Buffered);
    for processor in &route.processors {
        let address = ctx
            .snapshot
            .as_ref()
            .and_then(|s| s.clusters.get(&processor.cluster))
            .and_then(|c| c.pick(&[]))
            .map(|e| e.address);
        let Some(address) = address else {
            if fail(session, ctx, processor, "no healthy endpoint").await {
                return Ok(true);
            }
            continue;
        };
        let stream = client.open(processor, address);
        let has_body = !session.is_body_empty();
        if processor.mode.request_headers {
            let message = ProcessingRequest {
                attributes: [(
                    ATTRIBUTES_KEY.to_string(),
                    attributes(processor, session, ctx),
                )]
                .into(),
                protocol_config: Some(protocol_config(processor)),
                request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                    headers: Some(request_pairs(session.req_header(), scheme)),
                    end_of_stream: !has_body,
                    ..Default::default()
                })),
                ..Default::default()
            };
            match ask(session, ctx, processor, &stream, message, "request_headers").await {
                Step::Go(mutations) => apply_request(session.req_header_mut(), &mutations),
                Step::Answered => return Ok(true),
                Step::Skip => continue,
            }
        }
        let streams_request_body =
            processor.mode.request_body == BodyMode::Streamed && has_body && !body_read_early;
        if processor.mode.request_body.sends() && has_body && !streams_request_body {
            let body = match early_body(session, ctx, processor.max_body_bytes).await? {
                Some(body) => body,
                None => {
                    ctx.local_status = 413;
                    local_reply::respond(
                        session,
                        ctx,
                        413,
                        "request body too large for an external processor's buffer\n",
                    )
                    .await;
                    return Ok(true);
                }
            };
            let original_len = body.len();
            let message = ProcessingRequest {
                request: Some(processing_request::Request::RequestBody(HttpBody {
                    body: body.to_vec(),
                    end_of_stream: true,
                    ..Default::default()
                })),
                ..Default::default()
            };
            match ask(session, ctx, processor, &stream, message, "request_body").await {
                Step::Go(mutations) => {
                    let request = session.req_header_mut();
                    apply_request(request, &mutations);
                    if let Some(new) = mutations.body {
                        if new.len() != original_len {
                            crate::plugins::headers::fit_content_length(request, new.len());
                        }
                        ctx.rare().request_body = Some(new);
                    }
                }
                Step::Answered => return Ok(true),
                Step::Skip => continue,
            }
        }
        if streams_request_body && processors.request_stream.is_none() {
            processors.request_stream = Some(RequestStream {
                output: Some(Vec::new()),
                ..Default::default()
            });
        }
        if streams_request_body
            || processor.mode.response_headers
            || processor.mode.response_body.sends()
            || processor.mode.response_trailers
        {
            processors.stages.push(Stage {
                processor: Arc::clone(processor),
                stream,
                streams_request_body,
                held: Vec::new(),
                overflowed: false,
            });
        }
    }
    if !processors.stages.is_empty() {
        ctx.rare().processors = Some(Box::new(processors));
    }
    Ok(false)
}

/// The request body, read before the head goes (or as an earlier filter read it), at
/// most `limit` bytes; `None` past it.
async fn early_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    limit: usize,
) -> pingora::Result<Option<Bytes>> {
    if let Some(body) = ctx.rare.as_ref().and_then(|r| r.request_body.clone()) {
        return Ok((body.len() <= limit).then_some(body));
    }
    let body = super::read_early_body(session, limit).await?;
    if let Some(body) = &body {
        ctx.rare().request_body = Some(body.clone());
    }
    Ok(body)
}

/// Sends one message (after the request head) to a stage's processor and reads its
/// answer to it.
async fn exchange(
    stage: &Stage,
    request: processing_request::Request,
    expected: &'static str,
) -> Result<Answer, Failure> {
    let message = ProcessingRequest {
        request: Some(request),
        ..Default::default()
    };
    stage
        .stream
        .exchange(message)
        .await
        .and_then(|a| read_answer(a, expected, &stage.processor.rules))
}

/// Whether the request body goes upstream through processors chunk by chunk: its length
/// may change, so it goes without `content-length`.
pub(super) fn streams_request_body(processors: &Processors) -> bool {
    processors.request_stream.is_some()
}

/// Frames an upstream request whose body processors change chunk by chunk: without its
/// `content-length` (pingora frames such a body chunked for HTTP/1.1; HTTP/2 ends it with
/// the stream).
pub(super) fn unframe_request(request: &mut RequestHeader) {
    request.remove_header(&http::header::CONTENT_LENGTH);
}

/// A reply to the client from the request body phase, where the head may have gone.
fn failure_reply() -> LocalResponse {
    LocalResponse {
        status: 500,
        headers: Vec::new(),
        body: b"the external processor failed\n".to_vec(),
        details: "ext_proc_error".into(),
    }
}

/// A processor's immediate response as a reply from the request body phase.
fn immediate_reply(processor: &ExtProc, immediate: ImmediateResponse) -> LocalResponse {
    let mutations = immediate_headers(processor, &immediate);
    LocalResponse {
        status: immediate_status(&immediate),
        headers: mutations
            .set
            .iter()
            .filter_map(|(n, v, _)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: immediate.body,
        details: "ext_proc_immediate_response".into(),
    }
}

/// An immediate response's headers, under the processor's rules; a header the rules
/// refuse is left out (never an error: the answer goes anyway).
fn immediate_headers(processor: &ExtProc, immediate: &ImmediateResponse) -> Mutations {
    let mut mutations = Mutations::default();
    if let Some(headers) = &immediate.headers {
        let lenient = MutationRules {
            disallow_is_error: false,
            ..processor.rules.clone()
        };
        let _ = mutations.add_headers(headers, &lenient);
    }
    mutations
}

/// The status of an immediate response (200 when it names none that is valid).
fn immediate_status(immediate: &ImmediateResponse) -> u16 {
    immediate
        .status
        .as_ref()
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|s| (200..600).contains(s))
        .unwrap_or(200)
}

/// Sends a request body chunk through the processors that take it chunk by chunk
/// (`STREAMED`), in route order, each answer replacing the chunk; header changes are
/// not applied (the head has gone). A retry's replay of the body (pingora sends what it
/// read again, in one piece) gets what the processors made of it the first time. `Err`:
/// the reply the request ends with (an immediate response, or 500 from a processor
/// failing closed).
pub(super) async fn on_request_body(
    processors: &mut Processors,
    try_number: u32,
    chunk: &mut Option<Bytes>,
    end_of_stream: bool,
) -> Result<(), LocalResponse> {
    let Some(state) = processors.request_stream.as_mut() else {
        return Ok(());
    };
    if state.try_number != try_number {
        state.try_number = try_number;
        if state.input > 0 {
            let replay = chunk.as_ref().map_or(0, Bytes::len);
            return match &state.output {
                Some(output) if replay == state.input => {
                    *chunk = (!output.is_empty()).then(|| Bytes::copy_from_slice(output));
                    Ok(())
                }
                _ => Err(failure_reply()),
            };
        }
    }
    if state.done || (chunk.is_none() && !end_of_stream) {
        return Ok(());
    }
    let mut data = chunk.take().unwrap_or_default();
    state.input += data.len();
    for stage in processors.stages.iter().filter(|s| s.streams_request_body) {
        let processor = &stage.processor;
        let body = processing_request::Request::RequestBody(HttpBody {
            body: data.to_vec(),
            end_of_stream,
            ..Default::default()
        });
        match exchange(stage, body, "request_body").await {
            Ok(Answer::Continue(mutations)) => {
                processor.stats.ok.inc();
                if let Some(new) = mutations.body {
                    data = new;
                }
            }
            Ok(Answer::Immediate(immediate)) => {
                processor.stats.immediate.inc();
                return Err(immediate_reply(processor, immediate));
            }
            Err(why) => {
                processor.stats.failed.inc();
                tracing::debug!(filter = %processor.name, "ext_proc: {why}");
                if !processor.failure_mode_allow {
                    return Err(failure_reply());
                }
            }
        }
    }
    if state.input > REPLAY_BOUND {
        state.output = None;
    }
    if let Some(output) = state.output.as_mut() {
        output.extend_from_slice(&data);
    }
    state.done = end_of_stream;
    *chunk = (!data.is_empty()).then_some(data);
    Ok(())
}

/// Runs the processors on the response head, last first. A processor's immediate
/// response replaces the upstream's (status, headers, and, in the body phase, body).
pub(super) async fn on_response(
    processors: &mut Processors,
    response: &mut ResponseHeader,
    end_of_stream: bool,
    protocol_is_h2: bool,
) {
    processors.trailers_follow = crate::plugins::headers::trailers_follow(response);
    let mut body_changes = false;
    for stage in processors.stages.iter().rev() {
        let processor = &stage.processor;
        match processor.mode.response_body {
            BodyMode::None => {}
            // A gRPC body reaches the client as it comes; a copy goes to the processor.
            BodyMode::Buffered if processors.trailers_follow => {
                processors.response_body_stages = true
            }
            BodyMode::Buffered | BodyMode::Streamed => {
                processors.response_body_stages = true;
                body_changes = true;
            }
        }
        if !processor.mode.response_headers {
            continue;
        }
        let head = processing_request::Request::ResponseHeaders(HttpHeaders {
            headers: Some(response_pairs(response)),
            end_of_stream,
            ..Default::default()
        });
        match exchange(stage, head, "response_headers").await {
            Ok(Answer::Continue(mutations)) => {
                processor.stats.ok.inc();
                apply_response(response, &mutations);
            }
            Ok(Answer::Immediate(immediate)) => {
                processor.stats.immediate.inc();
                let _ = response.set_status(immediate_status(&immediate));
                apply_response(response, &immediate_headers(processor, &immediate));
                processors.replacement = Some(Bytes::from(immediate.body));
                processors.response_body_stages = true;
                body_changes = true;
                break;
            }
            Err(why) => {
                processor.stats.failed.inc();
                tracing::debug!(filter = %processor.name, "ext_proc: {why}");
            }
        }
    }
    if body_changes && !end_of_stream {
        // The body may change length; the head goes now.
        crate::plugins::headers::unframe_for_new_body(response, protocol_is_h2);
    }
}

/// The response must be cut: a processor failing closed could not answer about a body
/// whose head has gone (Envoy resets the stream then).
#[derive(Debug)]
pub(super) struct CutResponse;

/// What a failed processor means for a response body: going on with it unchanged when it
/// fails open, else the response is cut.
fn failed_on_response(processor: &ExtProc, why: &str, body: Bytes) -> Result<Bytes, CutResponse> {
    processor.stats.failed.inc();
    tracing::debug!(filter = %processor.name, "ext_proc: {why}");
    if processor.failure_mode_allow {
        Ok(body)
    } else {
        Err(CutResponse)
    }
}

/// Asks `stage` about a response body (all of it, or a chunk) and returns what it made
/// of it; the worker waits, bounded by the processor's timeout (pingora filters response
/// bodies synchronously). An immediate response's body replaces the rest of the
/// response (the head has gone).
fn ask_response_body(
    stage: &Stage,
    body: Bytes,
    end_of_stream: bool,
    replacement: &mut Option<Bytes>,
) -> Result<Bytes, CutResponse> {
    let answer = stage
        .stream
        .exchange_blocking(response_body_message(&body, end_of_stream));
    body_after(stage, answer, body, end_of_stream, replacement)
}

/// [`ask_response_body`] where the worker may wait (the trailer phase, where nothing can
/// be cut any more: pingora sends the trailers whatever the filter says, so a failed
/// processor leaves the body as it was).
async fn ask_response_body_async(
    stage: &Stage,
    body: Bytes,
    replacement: &mut Option<Bytes>,
) -> Bytes {
    let answer = stage
        .stream
        .exchange(response_body_message(&body, false))
        .await;
    let unchanged = body.clone();
    body_after(stage, answer, body, false, replacement).unwrap_or(unchanged)
}

/// The body after a processor's answer (or its failure) to a response body message.
fn body_after(
    stage: &Stage,
    answer: Result<ProcessingResponse, Failure>,
    body: Bytes,
    end_of_stream: bool,
    replacement: &mut Option<Bytes>,
) -> Result<Bytes, CutResponse> {
    let processor = &stage.processor;
    match answer.and_then(|a| read_answer(a, "response_body", &processor.rules)) {
        Ok(answer) => Ok(body_answer(
            processor,
            answer,
            body,
            end_of_stream,
            replacement,
        )),
        Err(why) => failed_on_response(processor, &why, body),
    }
}

fn response_body_message(body: &Bytes, end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseBody(HttpBody {
            body: body.to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The body after a processor's answer to a response body message.
fn body_answer(
    processor: &ExtProc,
    answer: Answer,
    body: Bytes,
    end_of_stream: bool,
    replacement: &mut Option<Bytes>,
) -> Bytes {
    match answer {
        Answer::Continue(mutations) => {
            processor.stats.ok.inc();
            mutations.body.unwrap_or(body)
        }
        Answer::Immediate(immediate) => {
            processor.stats.immediate.inc();
            if !end_of_stream {
                // What is still to come of the upstream's body is dropped.
                *replacement = Some(Bytes::new());
            }
            Bytes::from(immediate.body)
        }
    }
}

/// Runs a response body chunk through the processors, last first: a `STREAMED` one
/// changes the chunk; a `BUFFERED` one holds the body to its end (within its bound; past
/// it, the response is cut — or, failing open, what it held and the rest go on without
/// it) and then answers for all of it, or — on a gRPC response — keeps a copy for the
/// trailer phase while the chunk goes on.
pub(super) fn on_response_body(
    processors: &mut Processors,
    chunk: &mut Option<Bytes>,
    end_of_stream: bool,
) -> Result<(), CutResponse> {
    if !processors.response_body_stages {
        return Ok(());
    }
    if let Some(replacement) = processors.replacement.as_mut() {
        *chunk = end_of_stream
            .then(|| std::mem::take(replacement))
            .filter(|r| !r.is_empty());
        return Ok(());
    }
    let mut data = chunk.take().unwrap_or_default();
    let mut replacement = None;
    for stage in processors.stages.iter_mut().rev() {
        let bound = stage.processor.max_body_bytes;
        match stage.processor.mode.response_body {
            BodyMode::None => {}
            BodyMode::Streamed => {
                if !data.is_empty() || end_of_stream {
                    data = ask_response_body(stage, data, end_of_stream, &mut replacement)?;
                }
            }
            BodyMode::Buffered if stage.overflowed => {}
            BodyMode::Buffered if stage.held.len() + data.len() > bound => {
                stage.overflowed = true;
                stage.processor.stats.failed.inc();
                tracing::warn!(
                    filter = %stage.processor.name,
                    bound,
                    fails_open = stage.processor.failure_mode_allow,
                    "ext_proc: the response body outgrew the processor's buffer"
                );
                if !stage.processor.failure_mode_allow {
                    return Err(CutResponse);
                }
                if !processors.trailers_follow && !stage.held.is_empty() {
                    let mut all = std::mem::take(&mut stage.held);
                    all.extend_from_slice(&data);
                    data = Bytes::from(all);
                }
                stage.held = Vec::new();
            }
            BodyMode::Buffered if processors.trailers_follow => {
                stage.held.extend_from_slice(&data);
            }
            BodyMode::Buffered => {
                stage.held.extend_from_slice(&data);
                data = if end_of_stream {
                    let whole = Bytes::from(std::mem::take(&mut stage.held));
                    ask_response_body(stage, whole, true, &mut replacement)?
                } else {
                    Bytes::new()
                };
            }
        }
        if replacement.is_some() {
            break;
        }
    }
    processors.replacement = replacement;
    *chunk = (!data.is_empty()).then_some(data);
    Ok(())
}

/// Runs the processors on response trailers, last first. Those wanting the body whole get
/// it now (a body followed by trailers never says it ended; `end_of_stream` is false, as
/// in Envoy); those taking trailers (`response_trailer_mode: SEND`) may change them. The
/// answer is a body that still has to go out — only when a non-gRPC response brought
/// trailers nobody expected while a processor held its body: pingora can then send the
/// body but not the trailers after it (they are dropped, and logged).
pub(super) async fn on_response_trailers(
    processors: &mut Processors,
    trailers: &mut http::HeaderMap,
) -> Option<Bytes> {
    let trailers_follow = processors.trailers_follow;
    let mut pending = Bytes::new();
    // Nothing comes after the trailers for an immediate response to replace.
    let mut replacement = None;
    for stage in processors.stages.iter_mut().rev() {
        match stage.processor.mode.response_body {
            BodyMode::Buffered if !stage.overflowed && processors.replacement.is_none() => {
                let mut whole = std::mem::take(&mut stage.held);
                whole.extend_from_slice(&pending);
                if whole.is_empty() {
                    continue;
                }
                let whole = Bytes::from(whole);
                let answer = ask_response_body_async(stage, whole.clone(), &mut replacement).await;
                if !trailers_follow {
                    pending = answer;
                } else if answer != whole {
                    tracing::debug!(
                        filter = %stage.processor.name,
                        "ext_proc: a gRPC body has reached the client; the processor's change is not applied"
                    );
                }
            }
            BodyMode::Streamed if !pending.is_empty() => {
                pending = ask_response_body_async(stage, pending, &mut replacement).await;
            }
            _ => {}
        }
    }
    for stage in processors.stages.iter().rev() {
        let processor = &stage.processor;
        if !processor.mode.response_trailers {
            continue;
        }
        let sent = processing_request::Request::ResponseTrailers(HttpTrailers {
            trailers: Some(headers_of(
                trailers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())),
            )),
        });
        match exchange(stage, sent, "response_trailers").await {
            Ok(Answer::Continue(mutations)) => {
                processor.stats.ok.inc();
                for name in &mutations.remove {
                    trailers.remove(name);
                }
                for (name, value, append) in mutations.set {
                    if append {
                        trailers.append(name, value);
                    } else {
                        trailers.insert(name, value);
                    }
                }
            }
            Ok(Answer::Immediate(_)) => {
                // Nothing of the response can change any more but its trailers.
                processor.stats.failed.inc();
                tracing::debug!(filter = %processor.name, "ext_proc: an immediate response to trailers is ignored");
            }
            Err(why) => {
                processor.stats.failed.inc();
                tracing::debug!(filter = %processor.name, "ext_proc: {why}");
            }
        }
    }
    (!pending.is_empty()).then_some(pending)
}
