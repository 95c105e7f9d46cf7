//! The request path: pingora's `ProxyHttp` phases, in the order a request meets them.
//!
//! ```text
//! new_ctx ─▶ request_filter ─▶ upstream_peer ─▶ upstream_request_filter ─▶ (connect)
//!   snapshot, route,   pick endpoint     x-forwarded-*, retry      │ fail_to_connect: retry?
//!   request id, 404    (503 UH)          count                     ▼
//!                                   upstream_response_filter ─▶ response_filter ─▶ logging
//!                                   5xx retry?                  x-request-id      metrics,
//!                                                                                 access log
//! fail_to_proxy: the error becomes an Envoy-like status and response flag (503 UF, 504 UT…)
//! ```
//!
//! The phases stay thin; each step lives in a file of this folder: [`context`] (what a
//! request carries, retry bookkeeping), [`admission`] (breakers, adaptive concurrency,
//! connection slots), [`failure`] (pure: which
//! errors the route retries, error → status + response flag), [`local_reply`] (answers the
//! proxy writes itself), [`request_id`], [`flags`].
//!
//! Each request holds the `Arc<Snapshot>` it started with, so a reload never changes the
//! rules under a request in flight. Nothing here locks, allocates per header beyond what the
//! headers need, or logs on success.

mod admission;
mod context;
mod edits;
mod ext_proc;
mod failure;
mod flags;
mod local_reply;
mod policy;
mod request_id;

pub use context::RequestCtx;
pub use flags::ResponseFlag;

use crate::compile::Snapshot;
use crate::downstream;
use crate::downstream::stats::CloseReason;
use crate::listener::bindings;
use crate::plugins::callout::ClusterLookup;
use crate::plugins::chain::{RequestPlugins, Verdict};
use crate::plugins::headers::request_headers;
use crate::plugins::runtime::PluginRuntime;
use crate::plugins::LoadedPlugin;
use crate::telemetry::metrics::Metrics;
use crate::upstream::concurrency::Priority;
use crate::upstream::endpoint::ActiveRequest;
use crate::upstream::lb::LbPolicy;
use crate::upstream::outlier::TryOutcome;
use crate::upstream::peer;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use context::GaugeGuard;
use local_reply::{answer_plugin_verdict, respond};
use nip_filters::host::{HttpState, RequestInfo};
use pingora::http::ResponseHeader;
use pingora::prelude::{HttpPeer, Session};
use pingora::protocols::Digest;
use pingora::proxy::{FailToProxy, ProxyHttp};
use pingora::{Error, ErrorType, Result};
use prometheus_client::metrics::counter::Counter;
use request_id::new_request_id;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The host a request is for: its absolute target's authority (HTTP/2), else `Host`.
fn request_authority(request: &pingora::http::RequestHeader) -> &str {
    request
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// `https` when the client connected over TLS, else `http`.
fn client_scheme(session: &Session) -> &'static str {
    if session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
        "https"
    } else {
        "http"
    }
}

/// Marks an upstream response that the route's retry policy wants tried again.
const RETRIABLE_STATUS: ErrorType = ErrorType::Custom("UpstreamRetriableStatus");

/// A plugin ended the request from a body phase; `RequestCtx::take_plugin_stop` says how.
const PLUGIN_STOP: ErrorType = ErrorType::Custom("PluginStoppedRequest");

/// The proxy: reads the current snapshot, routes, balances, retries and reports.
pub struct Gateway {
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    flag_counters: [Counter; ResponseFlag::ALL.len()],
    plugin_runtime: Arc<PluginRuntime>,
    /// Calls to clusters the policy filters make (external authorization).
    callouts: Arc<crate::plugins::callout::CalloutClient>,
    /// The `ext_proc` streams' runtime, started when a route first has a processor
    /// (`None` inside: it could not be started).
    ext_proc: Arc<std::sync::OnceLock<Option<crate::ext_proc::client::ExtProcClient>>>,
}

impl Gateway {
    /// A gateway serving whatever snapshot `snapshot` holds at each request's start.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Self {
        let flag_counters = ResponseFlag::ALL.map(|f| metrics.response_flag(f.as_str()));
        let in_force = Arc::clone(&snapshot);
        let clusters: ClusterLookup =
            Arc::new(move |name: &str| in_force.load().clusters.get(name).cloned());
        let callouts = Arc::new(crate::plugins::callout::CalloutClient::new(Arc::clone(
            &clusters,
        )));
        let plugin_runtime = PluginRuntime::new(Arc::clone(&metrics), clusters);
        Gateway {
            snapshot,
            metrics,
            flag_counters,
            plugin_runtime,
            callouts,
            ext_proc: Arc::default(),
        }
    }

    /// The `ext_proc` client, started on first use.
    fn ext_proc_client(&self) -> Option<&crate::ext_proc::client::ExtProcClient> {
        self.ext_proc
            .get_or_init(|| match crate::ext_proc::client::ExtProcClient::new() {
                Ok(client) => Some(client),
                Err(e) => {
                    tracing::error!("cannot start the ext_proc runtime: {e}");
                    None
                }
            })
            .as_ref()
    }
}

/// Who the request was authenticated as: a verified JWT's `iss/sub`, else the client
/// certificate's URI SAN, DNS SAN or subject.
fn request_principal(session: &Session, ctx: &RequestCtx) -> Option<Arc<str>> {
    ctx.rare
        .as_ref()
        .and_then(|r| r.jwt_principal.clone())
        .or_else(|| {
            let peer = &verified_peer(session)?.certificate;
            let name = peer
                .uris
                .first()
                .or(peer.dns_names.first())
                .unwrap_or(&peer.subject);
            (!name.is_empty()).then(|| Arc::from(name.as_str()))
        })
}

/// The verified client, on a mutual TLS connection.
fn verified_peer(session: &Session) -> Option<&crate::downstream::tls::VerifiedPeer> {
    session
        .digest()?
        .ssl_digest
        .as_ref()?
        .extension
        .get::<crate::downstream::tls::VerifiedPeer>()
}

impl Gateway {
    /// Runs the route's plugins on the request head, in order. Returns true when the
    /// request was answered (a plugin's local reply, or 503 `PF` for a fail-closed failure),
    /// an error when a plugin reset it.
    async fn run_request_plugins(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        plugins: &[Arc<LoadedPlugin>],
    ) -> Result<bool> {
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let http = HttpState {
            request_headers: request_headers(
                session.req_header(),
                if tls { "https" } else { "http" },
            ),
            info: RequestInfo {
                id: ctx.request_id.clone(),
                protocol: if session.as_ref().is_http2() {
                    "HTTP/2"
                } else {
                    "HTTP/1.1"
                }
                .into(),
                source: session.client_addr().and_then(|a| a.as_inet()).copied(),
                destination: session.server_addr().and_then(|a| a.as_inet()).copied(),
                tls,
                peer_certificate: verified_peer(session).map(|p| Arc::clone(&p.certificate)),
                route_name: ctx
                    .route
                    .as_ref()
                    .map(|r| Arc::clone(&r.name))
                    .unwrap_or_default(),
                cluster_name: ctx
                    .cluster
                    .as_ref()
                    .map(|c| Arc::clone(&c.name))
                    .unwrap_or_default(),
                response_code: None,
                listener_name: ctx
                    .manager
                    .as_ref()
                    .map(|m| Arc::from(m.stat_prefix.as_str()))
                    .unwrap_or_default(),
                tenant: ctx.tenant().map(|t| Arc::clone(&t.id)),
                principal: request_principal(session, ctx),
                priority: ctx.priority.as_str(),
            },
            ..Default::default()
        };
        let end_of_stream = session.is_body_empty();
        let (chain, verdict) = RequestPlugins::on_request_headers(
            &self.plugin_runtime,
            plugins,
            http,
            session.req_header_mut(),
            end_of_stream,
        )
        .await;
        let mut chain = Box::new(chain);
        let verdict = match verdict {
            Verdict::Continue if chain.wants_body_first() => {
                match Box::pin(read_body_first(session, &mut chain)).await? {
                    Ok(body) => {
                        ctx.rare().request_body = Some(body);
                        Verdict::Continue
                    }
                    Err(verdict) => verdict,
                }
            }
            verdict => verdict,
        };
        ctx.plugins = Some(chain);
        if matches!(verdict, Verdict::Reset) {
            // No answer at all: fail_to_proxy closes the connection (or resets the stream).
            ctx.stop_by_plugin(verdict);
            return Err(Error::explain(PLUGIN_STOP, "a plugin reset the request"));
        }
        Ok(answer_plugin_verdict(session, ctx, verdict).await)
    }
}

/// The most of a request body pingora keeps to send upstream after it was read early (its
/// retry buffer): a plugin that wants the body before the head can hold no more.
const EARLY_BODY_LIMIT: usize = 64 * 1024;

/// For a plugin that paused the head until the body's end: reads the body early
/// ([`read_early_body`]) and runs the plugins' body phase on it.
async fn read_body_first(
    session: &mut Session,
    chain: &mut RequestPlugins,
) -> Result<std::result::Result<Bytes, Verdict>> {
    let Some(body) = read_early_body(session, chain.max_body_bytes()).await? else {
        return Ok(Err(Verdict::RequestBodyTooLarge));
    };
    Ok(chain
        .on_whole_request_body(session.req_header_mut(), body)
        .await)
}

/// Reads the whole request body before the head goes upstream, at most `limit` bytes and
/// [`EARLY_BODY_LIMIT`] (`None` past them). pingora keeps what was read in its retry
/// buffer and sends it upstream through `request_body_filter`, where the filters' version
/// (`RareState::request_body`) takes its place.
async fn read_early_body(session: &mut Session, limit: usize) -> Result<Option<Bytes>> {
    let limit = limit.min(EARLY_BODY_LIMIT);
    session.as_mut().enable_retry_buffering();
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// A request header's value as text (empty when absent or not text).
fn header_text<'a>(request: &'a pingora::http::RequestHeader, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Starts a traced request's span for the try `upstream_peer` just picked (the context's
/// fields apart: the cluster stays borrowed there).
fn begin_traced_try(
    manager: &Option<Arc<crate::listener::HttpManager>>,
    rare: &mut Option<Box<context::RareState>>,
    endpoint: std::net::SocketAddr,
) {
    let upstream_spans = manager
        .as_ref()
        .and_then(|m| m.tracing.as_ref())
        .is_some_and(|t| t.upstream_spans);
    if let Some(trace) = rare.as_mut().and_then(|r| r.trace.as_mut()) {
        trace.begin_try(Some(endpoint), upstream_spans);
    }
}

/// Ends a request's trace: what the request was goes to its spans' attributes.
fn finish_trace(
    session: &Session,
    ctx: &RequestCtx,
    trace: crate::telemetry::trace::RequestTrace,
    tracing: &crate::telemetry::trace::Tracing,
    status: u16,
) {
    let request = session.req_header();
    let header = |name: &str| header_text(request, name);
    let http2 = session.as_ref().is_http2();
    trace.finish(
        tracing,
        &crate::telemetry::trace::RequestFacts {
            method: request.method.as_str(),
            path: request.uri.path(),
            scheme: client_scheme(session),
            authority: request_authority(request),
            protocol_version: if http2 { "2" } else { "1.1" },
            client: session.client_addr().and_then(|a| a.as_inet()).copied(),
            user_agent: header("user-agent"),
            route: ctx.route.as_ref().map_or("", |r| &r.name),
            cluster: ctx.cluster.as_ref().map_or("", |c| &c.name),
            status,
            flag: ctx.flag.map(ResponseFlag::as_str),
            request_id: &ctx.request_id,
        },
    );
}

/// Whether a response ends with its head: HEAD requests, 1xx/204/304, `content-length: 0`.
fn response_has_no_body(session: &Session, response: &ResponseHeader) -> bool {
    let status = response.status.as_u16();
    session.req_header().method == http::Method::HEAD
        || status < 200
        || status == 204
        || status == 304
        || response
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            start_wall: SystemTime::now(),
            snapshot: None,
            manager: None,
            route: None,
            target: 0,
            cluster: None,
            endpoint: None,
            tried: Vec::new(),
            retries: 0,
            flag: None,
            local_status: 0,
            request_id: String::new(),
            active_endpoint: None,
            active_cluster: None,
            retry_slot: None,
            priority: Priority::Normal,
            concurrency: None,
            connection_slot: None,
            plugins: None,
            rare: None,
            _downstream: GaugeGuard::new(&self.metrics.downstream_rq_active),
        }
    }

    /// Takes the snapshot, assigns the request id and picks the route and cluster.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.snapshot.load_full();
        // The connection manager of the filter chain that took the connection.
        let manager = match bindings::binding_of(session.downstream_session.digest()) {
            Some(binding) => binding.manager_in(&snapshot.listeners),
            None => Arc::clone(snapshot.primary_http()),
        };
        let connection = match downstream::on_request_head(session, &manager.downstream) {
            Ok(connection) => connection,
            Err(refusal) => {
                self.metrics.downstream.closed(CloseReason::BadFraming);
                // The body's length is unknown: nothing after this head can be trusted.
                session.set_keepalive(None);
                ctx.snapshot = Some(snapshot);
                ctx.manager = Some(manager);
                ctx.local_status = refusal.status();
                respond(session, ctx, refusal.status(), refusal.message()).await;
                return Ok(true);
            }
        };
        let request = session.req_header_mut();
        if !connection.trust_priority_header {
            // Only a listener that trusts its clients takes their priority (and forwards it).
            request.remove_header(Priority::HEADER);
        }
        ctx.request_id = match request
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        {
            Some(id) => id.to_string(),
            None => {
                let id = new_request_id();
                request.insert_header("x-request-id", id.as_str())?;
                id
            }
        };
        if let Some(value) = request.headers.get(Priority::HEADER) {
            match Priority::parse(value.as_bytes()) {
                Some(priority) => ctx.priority = priority,
                None => {
                    ctx.snapshot = Some(snapshot);
                    ctx.manager = Some(manager);
                    ctx.local_status = 400;
                    respond(
                        session,
                        ctx,
                        400,
                        "x-nip-priority must be low, normal or high\n",
                    )
                    .await;
                    return Ok(true);
                }
            }
        }
        let host = request_authority(request);
        let route = manager
            .router
            .route(host, request.uri.path(), &request.method, &request.headers)
            .cloned();
        ctx.snapshot = Some(snapshot);
        if let Some(tracing) = &manager.tracing {
            let parent = request.headers.get("traceparent").map(|v| v.as_bytes());
            if let Some(trace) = tracing.start(parent, ctx.start_wall) {
                ctx.rare().trace = Some(trace);
            }
        }
        ctx.manager = Some(manager);
        let Some(route) = route else {
            ctx.flag = Some(ResponseFlag::NoRoute);
            ctx.local_status = 404;
            respond(session, ctx, 404, "no route matched this request\n").await;
            return Ok(true);
        };
        let index = route.pick_target().unwrap_or(0);
        let cluster = route.targets.get(index).and_then(|t| t.cluster.clone());
        if let Some(first) = cluster.as_ref() {
            ctx.cluster = Some(Arc::clone(first));
        }
        let has_plugins = !route.plugins.is_empty();
        // A tenant's priority is the proxy's to set, whatever the client sent.
        if let Some(priority) = route.tenant.as_ref().and_then(|t| t.priority) {
            ctx.priority = priority;
        }
        ctx.route = Some(Arc::clone(&route));
        ctx.target = index;
        // Authentication, authorization and rate limits, before the route's plugins (boxed
        // like the plugin path: only managers with policy filters pay for its future).
        let manager = ctx.manager.clone();
        if let Some(manager) = manager.filter(|m| !m.policy.is_empty()) {
            let clock = ctx.trace_clock();
            let answered = Box::pin(policy::run(session, ctx, &manager.policy, &route, self)).await;
            ctx.trace_event("policy", clock);
            if answered {
                return Ok(true);
            }
        }
        // Boxed: the plugin path's future is large (it may await a callout), and async_trait
        // moves this whole future into a box on every request, plugins or not.
        if has_plugins {
            let clock = ctx.trace_clock();
            let answered = Box::pin(self.run_request_plugins(session, ctx, &route.plugins)).await?;
            ctx.trace_event("plugins.request", clock);
            if answered {
                return Ok(true);
            }
        }
        if !route.processors.is_empty() {
            let clock = ctx.trace_clock();
            let answered = Box::pin(ext_proc::on_request(session, ctx, &route, self)).await?;
            ctx.trace_event("ext_proc.request", clock);
            if answered {
                return Ok(true);
            }
        }
        if let Some(local) = &route.local {
            // A redirect or a direct response, after the route's plugins (as Envoy's router
            // answers after the filters before it): nothing goes upstream.
            let (status, headers, body) = local_reply::local_action_answer(session, local);
            ctx.local_status = status;
            // Boxed like the plugin path: a rare path must not grow every request's future.
            Box::pin(local_reply::write_answer(
                session,
                ctx,
                status,
                &headers,
                body,
                Some(&route.edits.response_headers),
            ))
            .await;
            return Ok(true);
        }
        let Some(cluster) = cluster else {
            ctx.flag = Some(ResponseFlag::NoCluster);
            ctx.local_status = 503;
            respond(session, ctx, 503, "the route's cluster does not exist\n").await;
            return Ok(true);
        };
        if let Err(refusal) = admission::admit(&cluster, ctx, route.timeout).await {
            ctx.flag = Some(refusal.flag);
            ctx.local_status = refusal.status;
            respond(session, ctx, refusal.status, refusal.body).await;
            return Ok(true);
        }
        ctx.active_cluster = Some(GaugeGuard::new(&cluster.stats.rq_active));
        ctx.cluster = Some(cluster);
        Ok(false)
    }

    /// Runs request body chunks through the route's plugins.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A body the plugins had before the head went: pingora sends what it read (its
        // retry buffer) in one piece, on each try; the plugins' version goes instead.
        if let Some(early) = ctx.rare.as_ref().and_then(|r| r.request_body.as_ref()) {
            if body.is_some() {
                *body = (!early.is_empty()).then(|| early.clone());
            }
            return Ok(());
        }
        if let Some(plugins) = ctx.plugins.as_mut() {
            match Box::pin(plugins.on_request_body(body, end_of_stream)).await {
                Verdict::Continue => {}
                verdict => {
                    ctx.stop_by_plugin(verdict);
                    return Err(Error::explain(
                        PLUGIN_STOP,
                        "a plugin ended the request in its body phase",
                    ));
                }
            }
        }
        let try_number = ctx.retries;
        if let Some(processors) = ctx.rare.as_mut().and_then(|r| r.processors.as_mut()) {
            if let Err(reply) = Box::pin(ext_proc::on_request_body(
                processors,
                try_number,
                body,
                end_of_stream,
            ))
            .await
            {
                ctx.stop_by_plugin(Verdict::Reply(reply));
                return Err(Error::explain(
                    PLUGIN_STOP,
                    "an external processor ended the request in its body phase",
                ));
            }
        }
        Ok(())
    }

    /// The route's budget covers the whole response: a body still arriving when it runs
    /// out is cut (the client sees the stream end early, as with Envoy).
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if ctx.deadline().is_some_and(|d| Instant::now() >= d) {
            ctx.flag = Some(ResponseFlag::UpstreamTimeout);
            return Err(Error::create(
                ErrorType::ReadTimedout,
                pingora::ErrorSource::Upstream,
                Some("the route's timeout ran out during the response body".into()),
                None,
            ));
        }
        Ok(None)
    }

    /// Runs response body chunks through the route's plugins.
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(processors) = ctx.rare.as_mut().and_then(|r| r.processors.as_mut()) {
            if ext_proc::on_response_body(processors, body, end_of_stream).is_err() {
                ctx.stop_by_plugin(Verdict::Reset);
                return Err(Error::explain(
                    PLUGIN_STOP,
                    "an external processor failing closed could not answer about the response body",
                ));
            }
        }
        let Some(plugins) = ctx.plugins.as_mut() else {
            return Ok(None);
        };
        match plugins.on_response_body(body, end_of_stream) {
            Verdict::Continue => Ok(None),
            verdict => {
                ctx.stop_by_plugin(verdict);
                Err(Error::explain(
                    PLUGIN_STOP,
                    "a plugin ended the response in its body phase",
                ))
            }
        }
    }

    /// Runs response trailers through the route's processors, then its plugins (the
    /// response's order). A body still to go out replaces the trailers (see
    /// [`ext_proc::on_response_trailers`]).
    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Bytes>> {
        let mut body = None;
        if let Some(processors) = ctx.rare.as_mut().and_then(|r| r.processors.as_mut()) {
            body = Box::pin(ext_proc::on_response_trailers(processors, trailers)).await;
        }
        if let Some(plugins) = ctx.plugins.as_mut() {
            // A body still held (trailers nobody expected) ends here, through the plugins.
            if body.is_some() || plugins.holds_response_body() {
                let verdict = plugins.on_response_body(&mut body, true);
                if !matches!(verdict, Verdict::Continue) {
                    ctx.stop_by_plugin(verdict);
                    return Err(Error::explain(
                        PLUGIN_STOP,
                        "a plugin ended the response in its body phase",
                    ));
                }
            }
            if let Verdict::Reset = plugins.on_response_trailers(trailers) {
                ctx.stop_by_plugin(Verdict::Reset);
                return Err(Error::explain(PLUGIN_STOP, "a plugin reset the response"));
            }
        }
        if body.is_some() {
            tracing::warn!(
                request_id = %ctx.request_id,
                "a response body held by a filter met trailers: the body goes out and the trailers are dropped"
            );
        }
        Ok(body)
    }

    /// Picks an endpoint: healthy, and not one that already failed this request.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let (Some(cluster), Some(route)) = (&ctx.cluster, &ctx.route) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no cluster chosen",
            ));
        };
        // A retry waits its back-off first; the budget bounds the wait and every try.
        let deadline = ctx.deadline();
        if ctx.retries > 0 {
            let wait = route.retry.back_off.wait(ctx.retries, fastrand::u64(..));
            let within_budget = deadline.is_none_or(|d| Instant::now() + wait < d);
            if within_budget && !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        // What is left of the budget (one clock read per try, none without a budget).
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining.is_some_and(|r| r.is_zero()) {
            ctx.flag = Some(ResponseFlag::UpstreamTimeout);
            return Err(Error::explain(
                ErrorType::HTTPStatus(504),
                "the route's timeout ran out before another try",
            ));
        }
        if cluster.original_destination {
            // Where the client's connection was going before a redirect sent it here; a
            // connection made to this listener itself has none (it would loop).
            let original = session
                .digest()
                .and_then(|d| d.socket_digest.as_ref())
                .and_then(|s| s.original_dst())
                .and_then(|a| a.as_inet())
                .copied();
            let local = session.server_addr().and_then(|a| a.as_inet()).copied();
            let Some(address) = original.filter(|o| Some(*o) != local) else {
                ctx.flag = Some(ResponseFlag::NoHealthyUpstream);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no original destination: the connection was not redirected here",
                ));
            };
            ctx.endpoint = Some(address);
            ctx.tried.push(address);
            begin_traced_try(&ctx.manager, &mut ctx.rare, address);
            let read_timeout =
                peer::read_timeout(remaining, route.retry.per_try_timeout, route.idle_timeout);
            return Ok(Box::new(peer::to_address(address, cluster, read_timeout)));
        }
        // The request's key for ring_hash (the same for each of its tries).
        let hash = if cluster.lb == LbPolicy::RingHash && !route.hash_policy.is_empty() {
            let request = session.req_header();
            let client = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            route.request_hash(&request.headers, request.uri.query(), client)
        } else {
            None
        };
        let Some(endpoint) = cluster.pick_in(&ctx.tried, route.locality.as_deref(), hash) else {
            ctx.flag = Some(ResponseFlag::NoHealthyUpstream);
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no healthy upstream",
            ));
        };
        let address = endpoint.address;
        endpoint.locality_picks.inc();
        ctx.active_endpoint = Some(ActiveRequest::start(&endpoint.state));
        ctx.endpoint = Some(address);
        ctx.tried.push(address);
        begin_traced_try(&ctx.manager, &mut ctx.rare, address);
        let read_timeout =
            peer::read_timeout(remaining, route.retry.per_try_timeout, route.idle_timeout);
        Ok(Box::new(peer::for_try(endpoint, cluster, read_timeout)))
    }

    /// Adds x-forwarded-for/-proto and, on retries, the retry count.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
            let ip = client.ip().to_string();
            let forwarded = match upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(previous) if !previous.is_empty() => format!("{previous}, {ip}"),
                _ => ip,
            };
            upstream_request.insert_header("x-forwarded-for", forwarded)?;
        }
        upstream_request.insert_header("x-forwarded-proto", client_scheme(session))?;
        if ctx.retries > 0 {
            upstream_request.insert_header("x-nip-retry-count", ctx.retries.to_string())?;
        }
        if let Some(trace) = ctx.trace() {
            upstream_request.insert_header("traceparent", trace.traceparent())?;
        }
        let streamed_body = ctx
            .rare
            .as_ref()
            .and_then(|r| r.processors.as_deref())
            .is_some_and(ext_proc::streams_request_body);
        if streamed_body {
            ext_proc::unframe_request(upstream_request);
        }
        if let Some(route) = &ctx.route {
            let route_edits = &route.edits;
            if let Some(rewrite) = &route_edits.path {
                if let Err(edits::InvalidRewrite(target)) =
                    edits::rewrite_path(rewrite, upstream_request)
                {
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(500),
                        format!("the route's rewrite made {target:?}, which is no request target"),
                    ));
                }
            }
            if let Some(rewrite) = &route_edits.host {
                // The try's endpoint, for `auto_host_rewrite` (found only for such routes).
                let hostname = ctx.cluster.as_ref().and_then(|cluster| {
                    cluster
                        .endpoints
                        .iter()
                        .find(|e| Some(e.address) == ctx.endpoint)
                        .and_then(|e| e.hostname.as_deref())
                });
                edits::rewrite_host(rewrite, hostname, upstream_request);
            }
            if !route_edits.request_headers.is_empty() {
                edits::with_vars(session, ctx, |vars| {
                    edits::apply(&route_edits.request_headers, upstream_request, vars)
                });
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !reused {
            if let Some(cluster) = &ctx.cluster {
                cluster.stats.cx_total.inc();
            }
            if let Some(active) = &ctx.active_endpoint {
                active
                    .state()
                    .connections_total
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// A failed connection is retried on another endpoint when the route allows it.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.flag = Some(ResponseFlag::UpstreamConnectFailure);
        if let Some(trace) = ctx.trace() {
            trace.end_try(None, Some("connect_failure"));
        }
        if let Some(cluster) = &ctx.cluster {
            cluster.stats.cx_connect_fail.inc();
            if failure::is_tls_error(&e.etype) {
                cluster.stats.cx_tls_fail.inc();
            }
        }
        if let (Some(active), Some(cluster)) = (&mut ctx.active_endpoint, &ctx.cluster) {
            active
                .state()
                .connect_failures_total
                .fetch_add(1, Ordering::Relaxed);
            if active.failed(&cluster.lb.ewma()) {
                cluster.record_outcome(active.state(), TryOutcome::NoAnswer);
            }
        }
        let retry = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.retry.retries_connect_failure())
            && ctx.try_retry();
        e.set_retry(retry);
        e
    }

    /// A 5xx the route retries on is turned into a retriable error before the client sees it.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.flag = None;
        if let Some(trace) = ctx.trace() {
            trace.end_try(Some(status), None);
        }
        if let (Some(active), Some(cluster)) = (&mut ctx.active_endpoint, &ctx.cluster) {
            active.answered(&cluster.lb.ewma());
            cluster.record_outcome(active.state(), TryOutcome::Status(status));
        }
        let Some(route) = &ctx.route else {
            return Ok(());
        };
        if route.retry.retries_status(status) {
            if !session.as_ref().retry_buffer_truncated() && ctx.try_retry() {
                let mut e = Error::explain(RETRIABLE_STATUS, format!("upstream answered {status}"));
                e.set_retry(true);
                return Err(e);
            }
            if ctx.retries > 0 {
                ctx.flag = Some(ResponseFlag::RetryLimitExceeded);
            }
        }
        // The final answer's delay is the adaptive concurrency sample (retries included).
        if let Some(permit) = &mut ctx.concurrency {
            permit.answered();
        }
        Ok(())
    }

    /// Keeps our own retry decisions; otherwise pingora's rule (retry a reused connection
    /// that died) plus the route's `reset` policy.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        if e.etype() == &RETRIABLE_STATUS || e.etype() == &PLUGIN_STOP {
            return e;
        }
        if let Some(trace) = ctx.trace() {
            trace.end_try(None, Some(e.etype().as_str()));
        }
        // A try that ends without an answer counts as slow (a no-op once its head came).
        if let (Some(active), Some(cluster)) = (&mut ctx.active_endpoint, &ctx.cluster) {
            if active.failed(&cluster.lb.ewma()) {
                cluster.record_outcome(active.state(), TryOutcome::NoAnswer);
            }
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        if !replayable {
            e.set_retry(false);
            return e;
        }
        e.retry.decide_reuse(client_reused);
        if !e.retry()
            && session.response_written().is_none()
            && ctx
                .route
                .as_ref()
                .is_some_and(|r| failure::retry_policy_covers(&r.retry, e.etype()))
            && ctx.try_retry()
        {
            e.set_retry(true);
        }
        e
    }

    /// Turns the final error into an Envoy-like status and response flag.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy
    where
        RequestCtx: Send + Sync,
    {
        if let Some(verdict) = ctx.take_plugin_stop() {
            session.set_keepalive(None);
            if matches!(verdict, Verdict::Reset) {
                tracing::debug!(request_id = %ctx.request_id, "a plugin reset the stream");
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            if session.response_written().is_none() {
                answer_plugin_verdict(session, ctx, verdict).await;
            } else {
                tracing::warn!(request_id = %ctx.request_id, "a plugin ended the response after its head was sent; the connection is closed");
            }
            return FailToProxy {
                error_code: ctx.local_status,
                can_reuse_downstream: false,
            };
        }
        let failure::Failure {
            status: code,
            flag,
            body,
        } = failure::classify(e.etype(), e.esource(), ctx.flag);
        ctx.flag = flag;
        ctx.local_status = code;
        // A timeout is a latency sample too (at least this slow): an upstream that stops
        // answering in time must pull the adaptive concurrency limit down. Faster failures
        // (refused connections, resets) say nothing about queueing and are not samples.
        if flag == Some(ResponseFlag::UpstreamTimeout) {
            if let Some(permit) = &mut ctx.concurrency {
                permit.answered();
            }
        }
        // Pingora closes the client connection after a failed proxy attempt; say so in the
        // response (`Connection: close`) so HTTP/1.1 clients do not reuse it and hit a reset.
        session.set_keepalive(None);
        if code > 0 && session.response_written().is_none() {
            respond(session, ctx, code, body).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Failed requests are already counted (`nip_response_flags_total`) and, when enabled,
    /// access-logged with their flag; like Envoy, the proxy log stays quiet about each one.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        tracing::debug!(
            request_id = %ctx.request_id,
            flag = ctx.flag.map_or("-", ResponseFlag::as_str),
            "request failed: {error}"
        );
        true
    }

    /// Retries are counted in `nip_upstream_rq_retry_total`; log them at debug level only.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        tracing::debug!(request_id = %ctx.request_id, retries = ctx.retries, "retrying after: {error}");
        true
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !ctx.request_id.is_empty() {
            upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
        }
        if let Some(route) = &ctx.route {
            if !route.edits.response_headers.is_empty() {
                edits::with_vars(session, ctx, |vars| {
                    edits::apply(&route.edits.response_headers, upstream_response, vars)
                });
            }
        }
        if let Some(rare) = ctx.rare.as_mut() {
            for (name, value) in std::mem::take(&mut rare.response_headers_to_add) {
                upstream_response.append_header(name, value)?;
            }
        }
        if downstream::past_max_connection_duration(session) {
            session.set_keepalive(None);
            self.metrics
                .downstream
                .closed(CloseReason::MaxConnectionDuration);
        }
        if let Some(processors) = ctx.rare.as_mut().and_then(|r| r.processors.as_mut()) {
            let end_of_stream = response_has_no_body(session, upstream_response);
            let h2 = session.as_ref().is_http2();
            Box::pin(ext_proc::on_response(
                processors,
                upstream_response,
                end_of_stream,
                h2,
            ))
            .await;
        }
        if let Some(plugins) = ctx.plugins.as_mut() {
            let end_of_stream = response_has_no_body(session, upstream_response);
            if let Verdict::Reset = plugins.on_response_headers(upstream_response, end_of_stream) {
                ctx.stop_by_plugin(Verdict::Reset);
                return Err(Error::explain(PLUGIN_STOP, "a plugin reset the response"));
            }
        }
        Ok(())
    }

    /// Counts the request and writes its access log line.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map_or(ctx.local_status, |r| r.status.as_u16());
        let elapsed = ctx.start.elapsed();
        if let Some(mut plugins) = ctx.plugins.take() {
            plugins.finish(status);
        }
        if let Some(flag) = ctx.flag {
            self.flag_counters[flag.index()].inc();
        }
        let trace = ctx.rare.as_mut().and_then(|r| r.trace.take());
        let Some(manager) = &ctx.manager else {
            return;
        };
        let watched = self.metrics.tap.watching();
        // Its id for the access log, before the trace is handed to the exporter.
        let trace_id = trace
            .as_ref()
            .filter(|_| manager.access_log.is_some() || watched)
            .map(|t| t.trace_id_hex());
        if let (Some(trace), Some(tracing)) = (trace, &manager.tracing) {
            finish_trace(session, ctx, trace, tracing, status);
        }
        match &ctx.route {
            Some(route) => {
                route.stats.duration.observe(elapsed);
                if let Some(target) = route.targets.get(ctx.target) {
                    target.counters.count(status);
                }
            }
            None => manager.unrouted.count(status),
        }
        if let Some(tenant) = ctx.tenant() {
            tenant.counters.count(status);
        }
        let peer = verified_peer(session);
        if let Some(peer) = peer.filter(|p| !p.certificate.uri().is_empty()) {
            peer.requests
                .get_or_init(|| self.metrics.peer_requests(peer.certificate.uri()))
                .inc();
        }
        if manager.access_log.is_none() && !watched {
            return;
        }
        let request = session.req_header();
        let header = |name: &str| header_text(request, name);
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let upstream = ctx.endpoint.map(|a| a.to_string()).unwrap_or_default();
        let forwarded_for = match session.client_addr().and_then(|a| a.as_inet()) {
            Some(addr) => addr.ip().to_string(),
            None => String::new(),
        };
        let entry = crate::telemetry::access_log::LogEntry {
            start: ctx.start_wall,
            method: request.method.as_str(),
            path,
            protocol: if session.as_ref().is_http2() {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            status,
            flags: ctx.flag.map_or("-", ResponseFlag::as_str),
            bytes_received: session.as_ref().body_bytes_read(),
            bytes_sent: session.as_ref().body_bytes_sent(),
            duration: elapsed,
            forwarded_for: if header("x-forwarded-for").is_empty() {
                &forwarded_for
            } else {
                header("x-forwarded-for")
            },
            user_agent: header("user-agent"),
            request_id: &ctx.request_id,
            authority: request
                .uri
                .authority()
                .map_or_else(|| header("host"), |a| a.as_str()),
            route: ctx.route.as_ref().map_or("", |r| &r.name),
            cluster: ctx.cluster.as_ref().map_or("", |c| &c.name),
            upstream_host: &upstream,
            peer_uri_san: peer.map_or("", |p| p.certificate.uri()),
            tenant: ctx.tenant().map_or("", |t| &t.id),
            trace_id: trace_id.as_deref().unwrap_or(""),
        };
        if let Some(log) = &manager.access_log {
            log.log(&entry);
        }
        if watched {
            self.metrics.tap.show(&entry);
        }
    }
}
