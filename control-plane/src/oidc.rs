//! JWTs from an OIDC issuer as credentials for the REST API (Okta, Keycloak, Dex, a cloud's
//! workload identity …): no NIP token to hand out when a company already has a login.
//!
//! ```text
//! Bearer <JWT> ──header.kid──▶ the issuer's JWKS (discovered at
//!   ISSUER/.well-known/openid-configuration, cached; fetched again for an unknown kid, at
//!   most every 30 s) ──signature, iss, aud, exp, nbf──▶ claims
//!   ──▶ Claims {subject, role, tenants} (the auth layer makes them an identity)
//! ```
//!
//! The issuer must be `https://` (its keys decide who may change the fleet); plain `http://`
//! is accepted for a loopback address only, for development and tests.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long fetched keys are used before they are fetched again.
const KEYS_MAX_AGE: Duration = Duration::from_secs(600);
/// The least time between two fetches (an unknown `kid` cannot make us hammer the issuer).
const MIN_REFETCH: Duration = Duration::from_secs(30);
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;
/// How long a fetch from the issuer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where tokens come from and how their claims map to NIP's roles.
#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// The issuer URL: tokens' `iss`, and where its configuration is discovered.
    pub issuer: String,
    /// The audience tokens must be for (`aud`).
    pub audience: String,
    /// The claim holding the role (`viewer`, `operator` or `admin`).
    pub role_claim: String,
    /// The claim holding the tenants (a list of tenant ids; absent: every tenant).
    pub tenants_claim: String,
    /// PEM roots to trust for the issuer (default: the system's).
    pub ca_file: Option<PathBuf>,
}

/// Why a JWT was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// It does not verify (signature, issuer, audience, time, form).
    #[error("{0}")]
    Invalid(String),
    /// The issuer could not be asked for its keys.
    #[error("{0}")]
    Issuer(String),
}

/// What a verified JWT says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`.
    pub subject: String,
    /// The role claim, if it is a string.
    pub role: Option<String>,
    /// The tenants claim: `None` when absent.
    pub tenants: Option<Vec<String>>,
}

/// Keys fetched from the issuer, and when it was last asked.
#[derive(Default)]
struct Keys {
    /// The last set fetched.
    set: Option<JwkSet>,
    /// When `set` was fetched.
    fetched: Option<Instant>,
    /// When the issuer was last asked (successfully or not).
    asked: Option<Instant>,
    /// Why the last fetch failed, if it did.
    failure: Option<String>,
}

/// Verifies JWTs of one issuer.
pub struct OidcVerifier {
    options: OidcOptions,
    keys: tokio::sync::Mutex<Keys>,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.options.issuer)
            .finish_non_exhaustive()
    }
}

/// Whether `url` may be fetched: `https://`, or `http://` to a loopback address.
fn acceptable_url(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn jwt_error(e: impl std::fmt::Display) -> OidcError {
    OidcError::Invalid(e.to_string())
}

impl OidcVerifier {
    /// A verifier for `options` (nothing is fetched until the first token).
    pub fn new(options: OidcOptions) -> Result<OidcVerifier, String> {
        if !acceptable_url(&options.issuer) {
            return Err(format!(
                "--oidc-issuer {:?} must be https:// (http:// only on a loopback address)",
                options.issuer
            ));
        }
        if options.audience.is_empty() {
            return Err("--oidc-audience must not be empty".into());
        }
        Ok(OidcVerifier {
            options,
            keys: tokio::sync::Mutex::new(Keys::default()),
        })
    }

    /// The claims of a JWT signed by a key of the issuer, for our audience, in time.
    pub async fn verify(&self, token: &str) -> Result<Claims, OidcError> {
        let header = jsonwebtoken::decode_header(token).map_err(jwt_error)?;
        let allowed = [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
        ];
        if !allowed.contains(&header.alg) {
            return Err(OidcError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| OidcError::Invalid("the token names no key (kid)".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.options.issuer]);
        validation.set_audience(&[&self.options.audience]);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map_err(jwt_error)?
            .claims;
        let tenants = match claims.get(&self.options.tenants_claim) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(list)) => Some(
                list.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect(),
            ),
            Some(_) => {
                return Err(OidcError::Invalid(format!(
                    "{} must be a list of tenant ids",
                    self.options.tenants_claim
                )))
            }
        };
        Ok(Claims {
            subject: claims["sub"].as_str().unwrap_or_default().to_string(),
            role: claims
                .get(&self.options.role_claim)
                .and_then(|r| r.as_str())
                .map(str::to_string),
            tenants,
        })
    }

    /// The claim that holds the role (for messages).
    pub fn role_claim(&self) -> &str {
        &self.options.role_claim
    }

    /// The key `kid`, from the cached set or a fresh fetch. The issuer is asked when the set
    /// is old or lacks `kid`, but at most every [`MIN_REFETCH`]: an issuer that is down (or
    /// tokens naming made-up keys) cannot make every request wait for a fetch.
    async fn key(&self, kid: &str) -> Result<DecodingKey, OidcError> {
        let mut keys = self.keys.lock().await;
        let stale = keys.fetched.is_none_or(|at| at.elapsed() > KEYS_MAX_AGE);
        let unknown = keys.set.as_ref().is_none_or(|set| set.find(kid).is_none());
        let may_ask = keys.asked.is_none_or(|at| at.elapsed() > MIN_REFETCH);
        if (stale || unknown) && may_ask {
            keys.asked = Some(Instant::now());
            let options = self.options.clone();
            let fetched = tokio::task::spawn_blocking(move || fetch_keys(&options))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match fetched {
                Ok(set) => {
                    keys.set = Some(set);
                    keys.fetched = keys.asked;
                    keys.failure = None;
                }
                Err(e) => {
                    if keys.set.is_some() {
                        tracing::warn!(
                            "OIDC: cannot refresh the issuer's keys, using the cached ones: {e}"
                        );
                    }
                    keys.failure = Some(e);
                }
            }
        }
        let Some(set) = &keys.set else {
            let why = keys.failure.clone().unwrap_or_else(|| "no keys yet".into());
            return Err(OidcError::Issuer(why));
        };
        let jwk = set
            .find(kid)
            .ok_or_else(|| OidcError::Invalid(format!("the issuer has no key {kid:?}")))?;
        DecodingKey::from_jwk(jwk).map_err(jwt_error)
    }
}

/// The issuer's key set, through its discovery document (blocking).
fn fetch_keys(options: &OidcOptions) -> Result<JwkSet, String> {
    let mut config = ureq::Agent::config_builder().timeout_global(Some(FETCH_TIMEOUT));
    if let Some(path) = &options.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let roots: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                .build(),
        );
    }
    let agent: ureq::Agent = config.build().into();
    let get = |url: &str| -> Result<serde_json::Value, String> {
        let text = agent
            .get(url)
            .call()
            .map_err(|e| format!("{url}: {e}"))?
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("{url}: {e}"))
    };
    let discovery = format!(
        "{}/.well-known/openid-configuration",
        options.issuer.trim_end_matches('/')
    );
    let document = get(&discovery)?;
    let jwks_uri = document["jwks_uri"]
        .as_str()
        .ok_or_else(|| format!("{discovery}: no jwks_uri"))?;
    if !acceptable_url(jwks_uri) {
        return Err(format!("{discovery}: jwks_uri {jwks_uri:?} is not https"));
    }
    let set = get(jwks_uri)?;
    serde_json::from_value(set).map_err(|e| format!("{jwks_uri}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_must_be_https_or_loopback_http() {
        for (url, ok) in [
            ("https://login.example.com/realms/nip", true),
            ("http://127.0.0.1:8080", true),
            ("http://localhost/x", true),
            ("http://[::1]:9/x", true),
            ("http://login.example.com", false),
            ("http://10.0.0.1", false),
            ("ftp://x", false),
        ] {
            assert_eq!(acceptable_url(url), ok, "{url}");
        }
    }

    #[tokio::test]
    async fn an_issuer_that_is_down_is_asked_at_most_every_min_refetch() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // An "issuer" that takes connections and closes them: every fetch fails at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&asked);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        let verifier = OidcVerifier::new(OidcOptions {
            issuer: format!("http://127.0.0.1:{port}"),
            audience: "nip".into(),
            role_claim: "nip_role".into(),
            tenants_claim: "nip_tenants".into(),
            ca_file: None,
        })
        .unwrap();
        // A token whose header names an RS256 key (its signature is never reached).
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.e30.c2ln";
        for _ in 0..5 {
            assert!(matches!(
                verifier.verify(token).await,
                Err(OidcError::Issuer(_))
            ));
        }
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "one fetch, not one per request"
        );
    }
}
