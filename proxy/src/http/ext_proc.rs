//! A request through its route's `ext_proc` processors (after the route's wasm plugins
//! on the request, before them on the response): one stream per processor, opened at
//! the request head and kept until the request ends.

use super::context::RequestCtx;
use super::local_reply;
use crate::ext_proc::client::ProcessorStream;
use crate::ext_proc::{ExtProc, MutationRules, Mutations};
use crate::route::Route;
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, HttpBody, HttpHeaders, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::Session;
use std::sync::Arc;

/// The key of the attributes Envoy's ext_proc filter sends.
const ATTRIBUTES_KEY: &str = "envoy.filters.http.ext_proc";

/// The processors' side of one request.
#[derive(Debug, Default)]
pub(super) struct Processors {
    /// Open streams, in route order.
    streams: Vec<(Arc<ExtProc>, ProcessorStream)>,
    /// The response body held for processors that want it whole.
    response_body: Vec<u8>,
    /// Whether some processor wants the response body whole.
    buffering_response: bool,
    /// A processor's own answer replacing the upstream's body.
    replacement: Option<Bytes>,
}

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
    let mode = |buffered: bool| {
        let mode = if buffered {
            BodySendMode::Buffered
        } else {
            BodySendMode::None
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
        (other, _) => {
            return Err(format!(
                "answered {} to {expected}",
                match other {
                    None => "nothing",
                    Some(Response::RequestHeaders(_)) => "request_headers",
                    Some(Response::ResponseHeaders(_)) => "response_headers",
                    Some(Response::RequestBody(_)) => "request_body",
                    Some(Response::ResponseBody(_)) => "response_body",
                    Some(_) => "a message NIP does not take",
                }
            ))
        }
    };
    Mutations::of(common.as_ref(), rules).map(Answer::Continue)
}

/// The rules without `disallow_is_error` (an immediate answer leaves refused headers out).
fn lenient(rules: &MutationRules) -> MutationRules {
    MutationRules {
        disallow_is_error: false,
        ..rules.clone()
    }
}

/// Sends a processor's immediate response to the client.
async fn answer_immediately(
    session: &mut Session,
    ctx: &mut RequestCtx,
    processor: &ExtProc,
    immediate: ImmediateResponse,
) {
    processor.stats.immediate.inc();
    let status = immediate
        .status
        .as_ref()
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|s| (200..600).contains(s))
        .unwrap_or(200);
    let mut mutations = Mutations::default();
    if let Some(headers) = &immediate.headers {
        // A header the rules refuse is left out of an immediate answer.
        let _ = mutations.add_headers(headers, &lenient(&processor.rules));
    }
    let headers: Vec<(String, String)> = mutations
        .set
        .iter()
        .filter_map(|(n, v, _)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    ctx.local_status = status;
    Box::pin(local_reply::write_answer(
        session,
        ctx,
        status,
        &headers,
        Bytes::from(immediate.body),
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
        if processor.mode.request_body && has_body {
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
        if processor.mode.response_headers || processor.mode.response_body {
            processors.streams.push((Arc::clone(processor), stream));
        }
    }
    if !processors.streams.is_empty() {
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

/// Runs the processors on the response head, last first. A processor's immediate
/// response replaces the upstream's (status, headers, and, in the body phase, body).
pub(super) async fn on_response(
    processors: &mut Processors,
    response: &mut ResponseHeader,
    end_of_stream: bool,
    protocol_is_h2: bool,
) {
    for (processor, stream) in processors.streams.iter().rev() {
        if processor.mode.response_body && !end_of_stream {
            processors.buffering_response = true;
        }
        if !processor.mode.response_headers {
            continue;
        }
        let message = ProcessingRequest {
            request: Some(processing_request::Request::ResponseHeaders(HttpHeaders {
                headers: Some(response_pairs(response)),
                end_of_stream,
                ..Default::default()
            })),
            ..Default::default()
        };
        match stream
            .exchange(message)
            .await
            .and_then(|a| read_answer(a, "response_headers", &processor.rules))
        {
            Ok(Answer::Continue(mutations)) => {
                processor.stats.ok.inc();
                apply_response(response, &mutations);
            }
            Ok(Answer::Immediate(immediate)) => {
                processor.stats.immediate.inc();
                let status = immediate
                    .status
                    .as_ref()
                    .and_then(|s| u16::try_from(s.code).ok())
                    .filter(|s| (200..600).contains(s))
                    .unwrap_or(200);
                let _ = response.set_status(status);
                let mut mutations = Mutations::default();
                if let Some(headers) = &immediate.headers {
                    // A header the rules refuse is left out of an immediate answer.
                    let _ = mutations.add_headers(headers, &lenient(&processor.rules));
                }
                apply_response(response, &mutations);
                processors.replacement = Some(Bytes::from(immediate.body));
                processors.buffering_response = true;
                break;
            }
            Err(why) => {
                processor.stats.failed.inc();
                tracing::debug!(filter = %processor.name, "ext_proc: {why}");
            }
        }
    }
    if processors.buffering_response && !end_of_stream {
        // The body may change length; the head goes now.
        crate::plugins::headers::unframe_for_new_body(response, protocol_is_h2);
    }
}

/// Holds the response body for the processors that want it whole and, at its end, asks
/// them (last first; the worker waits, bounded by each one's timeout) and puts out what
/// they made of it. A failed processor leaves the body as it was.
pub(super) fn on_response_body(
    processors: &mut Processors,
    chunk: &mut Option<Bytes>,
    end_of_stream: bool,
) {
    if !processors.buffering_response {
        return;
    }
    if let Some(data) = chunk.take() {
        if processors.replacement.is_none() {
            processors.response_body.extend_from_slice(&data);
        }
    }
    if !end_of_stream {
        return;
    }
    if let Some(replacement) = processors.replacement.take() {
        *chunk = Some(replacement);
        return;
    }
    let mut body = Bytes::from(std::mem::take(&mut processors.response_body));
    for (processor, stream) in processors.streams.iter().rev() {
        if !processor.mode.response_body {
            continue;
        }
        let message = ProcessingRequest {
            request: Some(processing_request::Request::ResponseBody(HttpBody {
                body: body.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        };
        match stream
            .exchange_blocking(message)
            .and_then(|a| read_answer(a, "response_body", &processor.rules))
        {
            Ok(Answer::Continue(mutations)) => {
                processor.stats.ok.inc();
                if let Some(new) = mutations.body {
                    body = new;
                }
            }
            Ok(Answer::Immediate(immediate)) => {
                // The head has gone: only the body can still be the processor's.
                processor.stats.immediate.inc();
                body = Bytes::from(immediate.body);
                break;
            }
            Err(why) => {
                processor.stats.failed.inc();
                tracing::debug!(filter = %processor.name, "ext_proc: {why}");
            }
        }
    }
    *chunk = (!body.is_empty()).then_some(body);
}
