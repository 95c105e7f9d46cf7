//! Runs the connection manager's policy filters on a request whose route is chosen, in
//! `http_filters` order, and writes their refusals: 401/403 from `jwt_authn` (with
//! `WWW-Authenticate`), 403 `RBAC: access denied` (flag `RBAC`), the authorization
//! service's denial (flag `UAEX`), 429 from the route's
//! local rate limit (flag `RL`, `retry-after`, `x-ratelimit-*`).

use super::context::RequestCtx;
use super::flags::ResponseFlag;
use super::local_reply;
use super::local_reply::respond;
use crate::policy::ext_authz::{CheckFacts, Decision, ExtAuthz};
use crate::policy::global_ratelimit::GlobalOutcome;
use crate::policy::jwt::{JwtAuthn, JwtError, JwtRequest, VerifiedPayload};
use crate::policy::ratelimit::{descriptors, DescriptorFacts};
use crate::policy::rbac::Facts;
use crate::policy::tenant::IdentityFacts;
use crate::policy::PolicyFilter;
use crate::route::Route;
use crate::upstream::concurrency::Priority;
use pingora::prelude::Session;
use std::sync::Arc;
use std::time::SystemTime;

/// Runs `filters` for `route`; true when one of them answered the request.
pub(super) async fn run(
    session: &mut Session,
    ctx: &mut RequestCtx,
    filters: &[PolicyFilter],
    route: &Route,
    gateway: &super::Gateway,
) -> bool {
    // Verified JWT payloads, for the RBAC filters after the jwt_authn one.
    let mut payloads: Vec<VerifiedPayload> = Vec::new();
    // Whether a verified claim set the priority (a tenant's then leaves it).
    let mut claimed_priority = false;
    for filter in filters {
        match filter {
            PolicyFilter::Jwt(authn) => {
                match authenticate(session, authn, route, &mut payloads).await {
                    Ok(false) => {}
                    Ok(true) => {
                        authn.stats.allowed.inc();
                        // Only plugins read the principal: others pay nothing for it.
                        let plugins_read_it =
                            !route.plugins.is_empty() || !route.processors.is_empty();
                        if plugins_read_it
                            && ctx.rare.as_ref().is_none_or(|r| r.jwt_principal.is_none())
                        {
                            if let Some(principal) = jwt_principal(&payloads) {
                                ctx.rare().jwt_principal = Some(principal);
                            }
                        }
                        // A verified claim may carry the priority (claim_to_headers into
                        // x-nip-priority; a client's own copy was removed first). Only
                        // then: a client's header must not undo a tenant's priority.
                        let writes_priority = authn
                            .written_headers
                            .iter()
                            .any(|h| h.as_str() == Priority::HEADER);
                        let claimed = session.req_header().headers.get(Priority::HEADER);
                        if let (true, Some(priority)) = (
                            writes_priority,
                            claimed.and_then(|v| Priority::parse(v.as_bytes())),
                        ) {
                            ctx.priority = priority;
                            claimed_priority = true;
                        }
                    }
                    Err(error) => {
                        authn.stats.denied.inc();
                        deny_jwt(session, ctx, error).await;
                        return true;
                    }
                }
            }
            PolicyFilter::Tenant(identity) => {
                if route.tenant.is_some() {
                    continue;
                }
                let facts = IdentityFacts {
                    headers: &session.req_header().headers,
                    jwt: &payloads,
                    peer: super::verified_peer(session).map(|p| &*p.certificate),
                };
                if let Some(found) = identity.identify(&facts) {
                    if let (true, false, Some(priority)) =
                        (found.verified, claimed_priority, found.tenant.priority)
                    {
                        ctx.priority = priority;
                    }
                    ctx.rare().tenant = Some(Arc::clone(found.tenant));
                }
            }
            PolicyFilter::Rbac(listener_rules) => {
                let rbac = match &route.policy.rbac {
                    Some(None) => continue,
                    Some(Some(rules)) => rules,
                    None => listener_rules,
                };
                let request = session.req_header();
                let peer = super::verified_peer(session).map(|p| &*p.certificate);
                let facts = Facts {
                    method: &request.method,
                    path: request.uri.path(),
                    headers: &request.headers,
                    source: session
                        .client_addr()
                        .and_then(|a| a.as_inet())
                        .map(|a| a.ip()),
                    destination: session.server_addr().and_then(|a| a.as_inet()).copied(),
                    peer,
                    jwt: &payloads,
                    tenant: ctx.tenant().map(|t| &*t.id),
                };
                if let Err(denied) = rbac.check(&facts) {
                    tracing::debug!(policy = ?denied.policy, route = %route.name, "RBAC denied a request");
                    ctx.flag = Some(ResponseFlag::RbacDenied);
                    ctx.local_status = 403;
                    let headers = [("content-type".to_string(), "text/plain".to_string())];
                    Box::pin(local_reply::write_answer(
                        session,
                        ctx,
                        403,
                        &headers,
                        bytes::Bytes::from_static(b"RBAC: access denied"),
                        None,
                    ))
                    .await;
                    return true;
                }
            }
            PolicyFilter::ExtAuthz(authz) => {
                if route.policy.ext_authz.disabled {
                    continue;
                }
                if authorize(session, ctx, authz, route, gateway).await {
                    return true;
                }
            }
            PolicyFilter::GlobalRateLimit(limiter) => {
                if route.policy.rate_limit_rules.is_empty() {
                    continue;
                }
                let descriptors = request_descriptors(session, ctx, route, &payloads);
                if descriptors.is_empty() {
                    continue;
                }
                match limiter.check(&gateway.callouts, &descriptors).await {
                    Ok(GlobalOutcome::Allowed) => {
                        limiter.stats.ok.inc();
                    }
                    Ok(GlobalOutcome::Limited { limit, retry_after }) => {
                        limiter.stats.over_limit.inc();
                        ctx.flag = Some(ResponseFlag::RateLimited);
                        ctx.local_status = 429;
                        let mut headers = vec![
                            ("content-type".to_string(), "text/plain".to_string()),
                            ("x-envoy-ratelimited".to_string(), "true".to_string()),
                        ];
                        if let Some(wait) = retry_after {
                            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
                            headers.push(("retry-after".into(), seconds.to_string()));
                            if limiter.headers {
                                headers.push(("x-ratelimit-reset".into(), seconds.to_string()));
                            }
                        }
                        if let (true, Some(limit)) = (limiter.headers, limit) {
                            headers.push(("x-ratelimit-limit".into(), limit.to_string()));
                            headers.push(("x-ratelimit-remaining".into(), "0".into()));
                        }
                        Box::pin(local_reply::write_answer(
                            session,
                            ctx,
                            429,
                            &headers,
                            bytes::Bytes::new(),
                            None,
                        ))
                        .await;
                        return true;
                    }
                    Err(error) => {
                        limiter.stats.error.inc();
                        tracing::debug!(filter = %limiter.name, "rate limit service: {error}");
                        if limiter.failure_mode_deny {
                            ctx.flag = Some(ResponseFlag::RateLimitServiceError);
                            ctx.local_status = 500;
                            respond(session, ctx, 500, "the rate limit service did not answer\n")
                                .await;
                            return true;
                        }
                    }
                }
            }
            PolicyFilter::LocalRateLimit { name, shared } => {
                let own = route.policy.rate_limits.iter().find(|(n, _)| n == name);
                let Some(limit) = own.map_or(shared.as_ref(), |(_, l)| l.as_ref()) else {
                    continue;
                };
                let descriptors = request_descriptors(session, ctx, route, &payloads);
                let Err(limited) = limit.check(&descriptors) else {
                    continue;
                };
                ctx.flag = Some(ResponseFlag::RateLimited);
                ctx.local_status = limit.status;
                let retry = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let mut headers = vec![
                    ("content-type".to_string(), "text/plain".to_string()),
                    ("retry-after".to_string(), retry.to_string()),
                ];
                if limit.headers {
                    headers.push(("x-ratelimit-limit".into(), limited.limit.to_string()));
                    headers.push(("x-ratelimit-remaining".into(), "0".into()));
                    headers.push(("x-ratelimit-reset".into(), retry.to_string()));
                }
                Box::pin(local_reply::write_answer(
                    session,
                    ctx,
                    limit.status,
                    &headers,
                    bytes::Bytes::from_static(b"local_rate_limited"),
                    None,
                ))
                .await;
                return true;
            }
        }
    }
    false
}

/// `iss/sub` of the first verified payload that has both (Istio's request principal).
fn jwt_principal(payloads: &[VerifiedPayload]) -> Option<Arc<str>> {
    payloads.iter().find_map(|p| {
        let claim = |name: &str| p.claims.get(name).and_then(|v| v.as_str());
        Some(format!("{}/{}", claim("iss")?, claim("sub")?).into())
    })
}

/// The descriptors the route's `rate_limits` actions make of this request.
fn request_descriptors(
    session: &Session,
    ctx: &RequestCtx,
    route: &Route,
    payloads: &[VerifiedPayload],
) -> Vec<crate::policy::ratelimit::Descriptor> {
    let facts = DescriptorFacts {
        headers: &session.req_header().headers,
        source: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        jwt: payloads,
        tenant: ctx.tenant().map(|t| &*t.id),
    };
    descriptors(&route.policy.rate_limit_rules, &facts)
}

/// Asks the authorization service; true when the request was answered (denied, or
/// refused because the service could not be asked).
async fn authorize(
    session: &mut Session,
    ctx: &mut RequestCtx,
    authz: &ExtAuthz,
    route: &Route,
    gateway: &super::Gateway,
) -> bool {
    let peer = super::verified_peer(session).map(|p| Arc::clone(&p.certificate));
    let facts = CheckFacts {
        request: session.req_header(),
        request_id: &ctx.request_id,
        scheme: super::client_scheme(session),
        protocol: if session.as_ref().is_http2() {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        source: session.client_addr().and_then(|a| a.as_inet()).copied(),
        destination: session.server_addr().and_then(|a| a.as_inet()).copied(),
        peer: peer.as_deref(),
        context_extensions: &route.policy.ext_authz.context_extensions,
    };
    match authz.check(&gateway.callouts, &facts).await {
        Ok(Decision::Allow {
            set,
            append,
            remove,
            response,
        }) => {
            authz.stats.ok.inc();
            let request = session.req_header_mut();
            for name in remove {
                request.remove_header(&name);
            }
            for (name, value) in set {
                let _ = request.insert_header(name, value);
            }
            for (name, value) in append {
                let _ = request.append_header(name, value);
            }
            if !response.is_empty() {
                ctx.rare().response_headers_to_add = response;
            }
            false
        }
        Ok(Decision::Deny {
            status,
            headers,
            body,
        }) => {
            authz.stats.denied.inc();
            ctx.flag = Some(ResponseFlag::UnauthorizedExternalService);
            ctx.local_status = status;
            let headers: Vec<(String, String)> = headers
                .iter()
                .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            Box::pin(local_reply::write_answer(
                session, ctx, status, &headers, body, None,
            ))
            .await;
            true
        }
        Err(error) => {
            authz.stats.error.inc();
            tracing::debug!(filter = %authz.name, "external authorization failed: {error}");
            if authz.failure_mode_allow {
                authz.stats.failure_mode_allowed.inc();
                if authz.failure_mode_allow_header_add {
                    let _ = session
                        .req_header_mut()
                        .insert_header("x-envoy-auth-failure-mode-allowed", "true");
                }
                return false;
            }
            ctx.flag = Some(ResponseFlag::UnauthorizedExternalService);
            ctx.local_status = authz.status_on_error;
            let headers = [("content-type".to_string(), "text/plain".to_string())];
            Box::pin(local_reply::write_answer(
                session,
                ctx,
                authz.status_on_error,
                &headers,
                bytes::Bytes::new(),
                None,
            ))
            .await;
            true
        }
    }
}

/// Verifies the request's tokens against the route's requirement and applies what the
/// verified ones say (headers set and removed, payloads kept); false when no requirement
/// applies to the request.
async fn authenticate(
    session: &mut Session,
    authn: &JwtAuthn,
    route: &Route,
    payloads: &mut Vec<VerifiedPayload>,
) -> Result<bool, JwtError> {
    let request = session.req_header_mut();
    // Headers the providers write are theirs alone: a client's copies go first.
    for header in &authn.written_headers {
        request.remove_header(header);
    }
    let request = session.req_header();
    let view = JwtRequest {
        method: &request.method,
        path: request.uri.path(),
        query: request.uri.query(),
        headers: &request.headers,
    };
    let Some(requirement) = authn.requirement(&route.policy.jwt, &view) else {
        return Ok(false);
    };
    for remote in JwtAuthn::unsettled_keys(requirement) {
        // Only until the first fetch of a new remote JWKS has ended (bounded by its
        // timeout); afterwards the keys are read without waiting.
        remote.keys_when_fetched().await;
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let verified = authn.verify(requirement, &view, now)?;
    let request = session.req_header_mut();
    for header in &verified.remove_headers {
        request.remove_header(header);
    }
    for (name, value) in verified.set_headers {
        // Both are valid header parts already.
        let _ = request.insert_header(name, value);
    }
    payloads.extend(verified.payloads);
    Ok(true)
}

/// Envoy's answer to a request whose token was not accepted.
async fn deny_jwt(session: &mut Session, ctx: &mut RequestCtx, error: JwtError) {
    let status = error.status();
    ctx.local_status = status;
    let request = session.req_header();
    // The realm is quoted: a client's quotes and backslashes stay out of it.
    let host: String = super::request_authority(request)
        .chars()
        .filter(|c| !matches!(c, '"' | '\\') && !c.is_control())
        .collect();
    let realm = format!(
        "{}://{}{}",
        super::client_scheme(session),
        host,
        request.uri.path()
    );
    let challenge = if error == JwtError::Missing {
        format!("Bearer realm=\"{realm}\"")
    } else {
        format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
    };
    let headers = [
        ("content-type".to_string(), "text/plain".to_string()),
        ("www-authenticate".to_string(), challenge),
    ];
    Box::pin(local_reply::write_answer(
        session,
        ctx,
        status,
        &headers,
        bytes::Bytes::from(error.to_string()),
        None,
    ))
    .await;
}
