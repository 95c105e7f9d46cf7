//! Responses the proxy writes itself: refusals (text bodies carrying the request id and
//! the response flag) and the verdicts of plugins (their local replies, 503 `PF`, 413, 500).

use super::context::RequestCtx;
use super::flags::ResponseFlag;
use crate::plugins::chain::Verdict;
use crate::route::actions::RequestTarget;
use crate::route::{HeaderEdits, LocalAction};
use bytes::Bytes;
use nip_filters::host::LocalResponse;
use pingora::http::ResponseHeader;
use pingora::prelude::Session;

/// Answers the request when a plugin phase ended it; returns whether it did.
pub(super) async fn answer_plugin_verdict(
    session: &mut Session,
    ctx: &mut RequestCtx,
    verdict: Verdict,
) -> bool {
    match verdict {
        Verdict::Continue => return false,
        Verdict::Reply(reply) => {
            ctx.local_status = reply.status;
            respond_local(session, ctx, reply).await;
        }
        Verdict::Failed => {
            ctx.flag = Some(ResponseFlag::PluginFailure);
            ctx.local_status = 503;
            respond(session, ctx, 503, "a plugin failed\n").await;
        }
        Verdict::RequestBodyTooLarge => {
            ctx.local_status = 413;
            respond(
                session,
                ctx,
                413,
                "request body too large for a plugin's buffer\n",
            )
            .await;
        }
        Verdict::ResponseBodyTooLarge => {
            ctx.local_status = 500;
            respond(
                session,
                ctx,
                500,
                "response body too large for a plugin's buffer\n",
            )
            .await;
        }
        // The stream ends without an answer; the caller closes the connection.
        Verdict::Reset => {}
    }
    true
}

/// Writes a response the proxy generates itself (text body, response flag if any).
pub(super) async fn respond(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: &'static str,
) {
    let headers = [("content-type".to_string(), "text/plain".to_string())];
    write_local(
        session,
        ctx,
        status,
        &headers,
        Bytes::from_static(body.as_bytes()),
    )
    .await;
}

/// Sends a plugin's local reply.
async fn respond_local(session: &mut Session, ctx: &RequestCtx, reply: LocalResponse) {
    write_local(
        session,
        ctx,
        reply.status,
        &reply.headers,
        Bytes::from(reply.body),
    )
    .await;
}

/// Writes a complete response from the proxy: `headers`, content length, request id and
/// the response flag. Write errors mean the client left; they are only logged at debug.
async fn write_local(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    headers: &[(String, String)],
    body: Bytes,
) {
    write_answer(session, ctx, status, headers, body, None).await;
}

/// [`write_local`], with the route's response header edits (for the answers of routes
/// that answer by themselves, as Envoy applies them).
pub(super) async fn write_answer(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    headers: &[(String, String)],
    body: Bytes,
    edits: Option<&HeaderEdits>,
) {
    let mut header = match ResponseHeader::build(status, Some(headers.len() + 3)) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot build a {status} response: {e}");
            return;
        }
    };
    for (name, value) in headers {
        if let Err(e) = header.append_header(name.clone(), value.as_str()) {
            tracing::warn!("response header {name:?} skipped: {e}");
        }
    }
    let _ = header.insert_header(http::header::CONTENT_LENGTH, body.len());
    if !ctx.request_id.is_empty() {
        let _ = header.insert_header("x-request-id", ctx.request_id.as_str());
    }
    if let Some(flag) = ctx.flag {
        let _ = header.insert_header("x-nip-response-flags", flag.as_str());
    }
    if let Some(edits) = edits.filter(|e| !e.is_empty()) {
        super::edits::with_vars(session, ctx, |vars| {
            super::edits::apply(edits, &mut header, vars)
        });
    }
    let result = async {
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("could not send the {status} response: {e}");
    }
}

/// The status, headers and body a route that answers by itself gives this request.
pub(super) fn local_action_answer(
    session: &Session,
    action: &LocalAction,
) -> (u16, Vec<(String, String)>, Bytes) {
    match action {
        LocalAction::Redirect(redirect) => {
            let request = session.req_header();
            let authority = super::request_authority(request);
            let location = redirect.location(RequestTarget {
                scheme: super::client_scheme(session),
                authority,
                path: request.uri.path(),
                query: request.uri.query(),
            });
            let Some(location) = location else {
                return (
                    400,
                    vec![("content-type".to_string(), "text/plain".to_string())],
                    Bytes::from_static(b"the redirect needs the request's Host\n"),
                );
            };
            (
                redirect.status,
                vec![("location".to_string(), location)],
                Bytes::new(),
            )
        }
        LocalAction::DirectResponse { status, body } => {
            let headers = if body.is_empty() {
                Vec::new()
            } else {
                vec![("content-type".to_string(), "text/plain".to_string())]
            };
            (*status, headers, body.clone())
        }
    }
}
