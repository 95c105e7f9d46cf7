//! JWT authentication, as Envoy's `jwt_authn` filter.
//!
//! ```text
//! request ─▶ requirement (the route's per-route config, else the first matching rule)
//!   ─▶ each provider it names: token from its locations (token.rs)
//!        ─▶ issuer, audiences, exp/nbf (clock skew), lifetime, subject
//!        ─▶ signature by a key of the token's alg and kid (keys.rs; remote JWKS fetched
//!           off the request path by fetch.rs)
//!   ─▶ any-of / all-of / allow-missing combine the providers' outcomes
//!   ─▶ pass: payloads kept for RBAC, claims to headers, payload header, token removed
//!      unless `forward`; fail: 401 (403 for a wrong audience) with WWW-Authenticate
//! ```
//!
//! Headers a provider writes (`forward_payload_header`, `claim_to_headers`) are removed
//! from every request first, so a client cannot send them itself.

pub mod cache;
pub mod fetch;
pub mod keys;
pub mod token;

use crate::matchers::{RouteMatch, StringMatch};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use keys::{KeySet, RemoteJwks};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use token::{ParsedJwt, TokenLocation};

/// Why a request's token was not accepted. The messages are Envoy's (its `Status`
/// strings), sent as the 401/403 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// No token where the provider looks.
    #[error("Jwt is missing")]
    Missing,
    /// Not three base64url segments.
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    /// The header segment is not a JSON object.
    #[error("Jwt header is an invalid JSON")]
    HeaderBadJson,
    /// The payload segment is not a JSON object (or a time claim is not a number).
    #[error("Jwt payload is an invalid JSON")]
    PayloadBadJson,
    /// `alg` is missing, `none`, or not one NIP verifies.
    #[error("Jwt header [alg] field is not supported")]
    UnsupportedAlgorithm,
    /// `iss` is not the provider's issuer.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    /// No `aud` is among the provider's audiences.
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    /// `exp` has passed.
    #[error("Jwt is expired")]
    Expired,
    /// `nbf` is still to come.
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// The provider requires `exp` and there is none.
    #[error("Jwt has no expiration time")]
    NoExpiration,
    /// `exp` is further from `iat`/now than the provider's `max_lifetime`.
    #[error("Jwt lifetime exceeds the allowed maximum")]
    LifetimeTooLong,
    /// `sub` does not match the provider's `subjects`.
    #[error("Jwt subject is not allowed")]
    SubjectNotAllowed,
    /// No key of the JWKS has the token's `kid` and fits its `alg`.
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    NoMatchingKey,
    /// The signature does not verify.
    #[error("Jwt verification fails")]
    VerificationFailed,
    /// The provider's remote JWKS has never been fetched.
    #[error("Jwks remote fetch is failed")]
    JwksFetchFailed,
    /// A per-route config names a requirement the filter does not have.
    #[error("Jwt requirement is not configured")]
    UnknownRequirement,
}

impl JwtError {
    /// The status Envoy answers with: 403 when a valid token is for another audience,
    /// else 401.
    pub fn status(self) -> u16 {
        match self {
            JwtError::AudienceNotAllowed | JwtError::UnknownRequirement => 403,
            _ => 401,
        }
    }
}

/// Where a provider's keys are.
#[derive(Debug, Clone)]
pub enum ProviderKeys {
    /// `local_jwks`: parsed at compile time.
    Local(Arc<KeySet>),
    /// `remote_jwks`: fetched by the control thread.
    Remote(Arc<RemoteJwks>),
}

/// One `JwtProvider`.
#[derive(Debug)]
pub struct Provider {
    /// Its name in the filter's `providers`.
    pub name: Arc<str>,
    /// Its id in this process (a recompiled provider has a new one).
    pub id: u64,
    /// How many verified tokens each worker thread remembers (`jwt_cache_config`; 0: none).
    pub cache_size: usize,
    /// `issuer`: tokens' `iss` must equal it (empty: any).
    pub issuer: String,
    /// `audiences`: one of a token's `aud` must be among them (empty: any).
    pub audiences: Vec<String>,
    /// `subjects`: a token's `sub` must match.
    pub subjects: Option<StringMatch>,
    /// `require_expiration`.
    pub require_expiration: bool,
    /// `max_lifetime`.
    pub max_lifetime: Option<Duration>,
    /// `forward`: keep the token in the request going upstream.
    pub forward: bool,
    /// Where tokens are looked for.
    pub locations: Vec<TokenLocation>,
    /// `forward_payload_header`.
    pub forward_payload_header: Option<HeaderName>,
    /// `pad_forward_payload_header`.
    pub pad_forward_payload_header: bool,
    /// `payload_in_metadata`: the key the verified payload is kept under (for RBAC's
    /// metadata matchers, filter `envoy.filters.http.jwt_authn`).
    pub payload_in_metadata: Option<Arc<str>>,
    /// `claim_to_headers`: header ← claim path.
    pub claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    /// `clock_skew_seconds` (default 60).
    pub clock_skew: u64,
    /// Its keys.
    pub keys: ProviderKeys,
}

/// A verified token's payload, kept for the filters after this one.
#[derive(Debug, Clone)]
pub struct VerifiedPayload {
    /// `payload_in_metadata` of the provider that verified it.
    pub key: Arc<str>,
    /// The claims.
    pub claims: Arc<Map<String, Value>>,
}

/// What verifying a request's tokens produced.
#[derive(Debug, Default)]
pub struct Verified {
    /// Payloads of providers with `payload_in_metadata`.
    pub payloads: Vec<VerifiedPayload>,
    /// Headers to set on the request.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers to remove (tokens not forwarded).
    pub remove_headers: Vec<HeaderName>,
}

impl Provider {
    /// Checks `token`'s claims at `now` (seconds since the epoch), then its signature.
    pub fn verify(
        &self,
        token: &ParsedJwt<'_>,
        keys: Option<&KeySet>,
        audiences: Option<&[String]>,
        now: u64,
    ) -> Result<(), JwtError> {
        self.check_claims(token, audiences, now)?;
        let keys = keys.ok_or(JwtError::JwksFetchFailed)?;
        keys.verify(token.raw, token.alg, token.kid.as_deref())
    }

    /// Checks `token`'s claims at `now`: issuer, audiences, times, subject.
    pub fn check_claims(
        &self,
        token: &ParsedJwt<'_>,
        audiences: Option<&[String]>,
        now: u64,
    ) -> Result<(), JwtError> {
        if !self.issuer.is_empty() && token.string_claim("iss") != Some(self.issuer.as_str()) {
            return Err(JwtError::UnknownIssuer);
        }
        let allowed = audiences.unwrap_or(&self.audiences);
        if !allowed.is_empty()
            && !token
                .audiences()
                .iter()
                .any(|a| allowed.iter().any(|x| x == a))
        {
            return Err(JwtError::AudienceNotAllowed);
        }
        let exp = token.time_claim("exp")?;
        let nbf = token.time_claim("nbf")?;
        match exp {
            Some(exp) if now > exp.saturating_add(self.clock_skew) => {
                return Err(JwtError::Expired)
            }
            None if self.require_expiration || self.max_lifetime.is_some() => {
                return Err(JwtError::NoExpiration)
            }
            _ => {}
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(self.clock_skew)) {
            return Err(JwtError::NotYetValid);
        }
        if let (Some(max), Some(exp)) = (self.max_lifetime, exp) {
            let from = token.time_claim("iat")?.unwrap_or(now);
            if exp.saturating_sub(from) > max.as_secs() {
                return Err(JwtError::LifetimeTooLong);
            }
        }
        if let Some(subjects) = &self.subjects {
            if !token
                .string_claim("sub")
                .is_some_and(|s| subjects.matches(s))
            {
                return Err(JwtError::SubjectNotAllowed);
            }
        }
        Ok(())
    }

    /// Verifies `raw` (from this provider's locations): from this thread's cache when it
    /// verified the same token with the same keys, else in full (and remembered).
    fn verify_raw<'r>(
        &self,
        raw: &'r str,
        audiences: Option<&[String]>,
        now: u64,
    ) -> Result<ParsedJwt<'r>, JwtError> {
        let keys = self.current_keys();
        let keys_id = keys.as_ref().map_or(0, |k| k.id);
        if self.cache_size > 0 {
            if let Some(claims) = cache::get(self.id, keys_id, raw) {
                let token = ParsedJwt::verified(raw, claims)?;
                self.check_claims(&token, audiences, now)?;
                return Ok(token);
            }
        }
        let token = ParsedJwt::parse(raw)?;
        self.verify(&token, keys.as_deref(), audiences, now)?;
        if self.cache_size > 0 {
            cache::put(
                self.id,
                self.cache_size,
                keys_id,
                raw,
                Arc::clone(&token.claims),
            );
        }
        Ok(token)
    }

    /// The keys as they are now (`None`: a remote JWKS never fetched).
    fn current_keys(&self) -> Option<Arc<KeySet>> {
        match &self.keys {
            ProviderKeys::Local(keys) => Some(Arc::clone(keys)),
            ProviderKeys::Remote(remote) => remote.keys(),
        }
    }

    /// What a verified `token` found at `location` does to the request.
    fn accept(&self, token: &ParsedJwt<'_>, location: &TokenLocation, verified: &mut Verified) {
        if !self.forward {
            if let TokenLocation::Header { name, .. } = location {
                verified.remove_headers.push(name.clone());
            }
        }
        if let Some(header) = &self.forward_payload_header {
            let mut payload = token.payload_segment.to_string();
            if self.pad_forward_payload_header {
                while payload.len() % 4 != 0 {
                    payload.push('=');
                }
            }
            if let Ok(value) = HeaderValue::from_str(&payload) {
                verified.set_headers.push((header.clone(), value));
            }
        }
        for (header, path) in &self.claim_to_headers {
            let value = token::claim_header_value(&token.claims, path)
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let Some(value) = value {
                verified.set_headers.push((header.clone(), value));
            }
        }
        if let Some(key) = &self.payload_in_metadata {
            verified.payloads.push(VerifiedPayload {
                key: Arc::clone(key),
                claims: Arc::clone(&token.claims),
            });
        }
    }

    /// The first token of the request at one of this provider's locations.
    fn find<'r>(
        &self,
        headers: &'r HeaderMap,
        query: Option<&'r str>,
    ) -> Option<(&'r str, &TokenLocation)> {
        self.locations
            .iter()
            .find_map(|l| l.find(headers, query).map(|t| (t, l)))
    }
}

/// A `JwtRequirement`.
#[derive(Debug)]
pub enum Requirement {
    /// `provider_name` / `provider_and_audiences`: a valid token of that provider.
    Provider {
        /// The provider.
        provider: Arc<Provider>,
        /// Audiences in place of the provider's.
        audiences: Option<Vec<String>>,
    },
    /// `requires_any`: one of them passes.
    Any(Vec<Requirement>),
    /// `requires_all`: all of them pass.
    All(Vec<Requirement>),
    /// `allow_missing_or_failed`: always passes; valid tokens still count.
    AllowMissingOrFailed,
    /// `allow_missing`: passes without a token, fails with a bad one.
    AllowMissing,
}

/// One provider's verdict on a request: `None` when the request has no token for it.
type Outcome = Option<Result<(), JwtError>>;

/// The token facts of one request, checked once per provider however many requirements
/// name it.
struct Checks<'r> {
    headers: &'r HeaderMap,
    query: Option<&'r str>,
    now: u64,
    /// Every provider checked so far, with its outcome.
    outcomes: Vec<(Arc<Provider>, Outcome)>,
    verified: Verified,
}

impl Checks<'_> {
    /// The provider's outcome: Ok, or why not (`Missing` when the request has no token).
    fn check(
        &mut self,
        provider: &Arc<Provider>,
        audiences: Option<&[String]>,
    ) -> Result<(), JwtError> {
        if audiences.is_none() {
            if let Some((_, outcome)) = self.outcomes.iter().find(|(p, _)| Arc::ptr_eq(p, provider))
            {
                return outcome.unwrap_or(Err(JwtError::Missing));
            }
        }
        let outcome = provider
            .find(self.headers, self.query)
            .map(|(raw, location)| {
                let token = provider.verify_raw(raw, audiences, self.now)?;
                provider.accept(&token, location, &mut self.verified);
                Ok(())
            });
        if audiences.is_none() {
            self.outcomes.push((Arc::clone(provider), outcome));
        }
        outcome.unwrap_or(Err(JwtError::Missing))
    }
}

impl Requirement {
    fn evaluate(&self, checks: &mut Checks<'_>) -> Result<(), JwtError> {
        match self {
            Requirement::Provider {
                provider,
                audiences,
            } => checks.check(provider, audiences.as_deref()),
            Requirement::Any(list) => {
                // Envoy's answer when none passes: the first error that is not "missing",
                // else missing.
                let mut error = None;
                for requirement in list {
                    match requirement.evaluate(checks) {
                        Ok(()) => return Ok(()),
                        Err(JwtError::Missing) => {}
                        Err(e) => {
                            error.get_or_insert(e);
                        }
                    }
                }
                Err(error.unwrap_or(JwtError::Missing))
            }
            Requirement::All(list) => {
                for requirement in list {
                    requirement.evaluate(checks)?;
                }
                Ok(())
            }
            Requirement::AllowMissingOrFailed => Ok(()),
            Requirement::AllowMissing => Ok(()),
        }
    }

    /// Every provider this requirement names (to verify all tokens under the allow
    /// modes, and to wait for their keys).
    fn providers<'a>(&'a self, out: &mut Vec<&'a Arc<Provider>>) {
        match self {
            Requirement::Provider { provider, .. } => out.push(provider),
            Requirement::Any(list) | Requirement::All(list) => {
                list.iter().for_each(|r| r.providers(out))
            }
            _ => {}
        }
    }
}

/// A route's JWT requirement (the filter's `PerRouteConfig`).
#[derive(Debug, Clone, Default)]
pub enum RouteRequirement {
    /// No per-route config: the filter's rules decide.
    #[default]
    Rules,
    /// `disabled: true`.
    Disabled,
    /// `requirement_name`, resolved in the filter's `requirement_map` at compile time.
    Named(Arc<Requirement>),
}

/// One `jwt_authn` filter (`JwtAuthentication`).
#[derive(Debug)]
pub struct JwtAuthn {
    /// Its name in `http_filters`.
    pub name: Arc<str>,
    /// `providers`, by name.
    pub providers: HashMap<String, Arc<Provider>>,
    /// `rules`: the first whose match holds gives the requirement (`None`: none).
    pub rules: Vec<(RouteMatch, Option<Arc<Requirement>>)>,
    /// `requirement_map`.
    pub requirement_map: HashMap<String, Arc<Requirement>>,
    /// `bypass_cors_preflight`: an OPTIONS request with `origin` and
    /// `access-control-request-method` passes without a token.
    pub bypass_cors_preflight: bool,
    /// Every header any provider writes (stripped from requests first).
    pub written_headers: Vec<HeaderName>,
    /// Every remote JWKS of the providers.
    pub remotes: Vec<Arc<RemoteJwks>>,
    /// Its counters.
    pub stats: crate::telemetry::metrics::JwtAuthnCounters,
}

/// The request as the filter sees it.
#[derive(Debug, Clone, Copy)]
pub struct JwtRequest<'r> {
    /// Method.
    pub method: &'r Method,
    /// Path without the query.
    pub path: &'r str,
    /// Query string.
    pub query: Option<&'r str>,
    /// Headers.
    pub headers: &'r HeaderMap,
}

impl JwtAuthn {
    /// The requirement for a request on a route with `route` as its per-route config.
    pub fn requirement<'a>(
        &'a self,
        route: &'a RouteRequirement,
        request: &JwtRequest<'_>,
    ) -> Option<&'a Arc<Requirement>> {
        if self.bypass_cors_preflight
            && *request.method == Method::OPTIONS
            && request.headers.contains_key(http::header::ORIGIN)
            && request
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        match route {
            RouteRequirement::Disabled => None,
            RouteRequirement::Named(requirement) => Some(requirement),
            RouteRequirement::Rules => self
                .rules
                .iter()
                .find(|(m, _)| m.matches(request.path, request.method, request.headers))
                .and_then(|(_, r)| r.as_ref()),
        }
    }

    /// Remote JWKS of `requirement` whose first fetch has not ended (the request waits
    /// for them, up to their fetch timeout).
    pub fn unsettled_keys(requirement: &Requirement) -> Vec<Arc<RemoteJwks>> {
        let mut providers = Vec::new();
        requirement.providers(&mut providers);
        providers
            .into_iter()
            .filter_map(|p| match &p.keys {
                ProviderKeys::Remote(remote) if remote.unsettled() => Some(Arc::clone(remote)),
                _ => None,
            })
            .collect()
    }

    /// Checks a request against `requirement` at `now` (seconds since the epoch).
    pub fn verify(
        &self,
        requirement: &Requirement,
        request: &JwtRequest<'_>,
        now: u64,
    ) -> Result<Verified, JwtError> {
        let mut checks = Checks {
            headers: request.headers,
            query: request.query,
            now,
            outcomes: Vec::new(),
            verified: Verified::default(),
        };
        let result = requirement.evaluate(&mut checks);
        if matches!(
            requirement,
            Requirement::AllowMissing | Requirement::AllowMissingOrFailed
        ) {
            // These verify every provider's token, to pass on the payloads of good ones.
            // Under `allow_missing` a token must not be bad: a failure fails the request,
            // except a provider's "not my issuer" when another provider took the token.
            let (mut accepted, mut foreign) = (false, None);
            for provider in self.providers.values() {
                match checks.check(provider, None) {
                    Ok(()) => accepted = true,
                    Err(JwtError::Missing) => {}
                    Err(JwtError::UnknownIssuer) => foreign = Some(JwtError::UnknownIssuer),
                    Err(e) if matches!(requirement, Requirement::AllowMissing) => return Err(e),
                    Err(_) => {}
                }
            }
            if let (false, Some(e), Requirement::AllowMissing) = (accepted, foreign, requirement) {
                return Err(e);
            }
        }
        result.map(|()| checks.verified)
    }
}

#[cfg(test)]
mod tests;
