//! A provider's verification keys: a parsed JWKS ([`KeySet`]), held inline or fetched from
//! the issuer ([`RemoteJwks`], refreshed by [`super::fetch::JwksFetcher`] off the request
//! path and kept across reloads while its source stays the same).
//!
//! Each key accepts only the algorithms of its type (RSA: RS*/PS*; EC: ES256 on P-256,
//! ES384 on P-384; OKP: EdDSA; oct: HS*), narrowed to its `alg` when the JWKS gives one. An
//! RSA public key is never an HMAC secret: a token signed HS256 "with the public key" finds
//! no key to check it.

use super::JwtError;
use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// One verification key.
pub struct Key {
    /// `kid`, if the JWKS gave one.
    pub kid: Option<String>,
    /// The algorithms it verifies.
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

/// A parsed JWKS.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Its id in this process (tokens verified with it are remembered under it).
    pub id: u64,
    /// The usable keys (keys of a type or curve NIP cannot verify are left out).
    pub keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`); a set without one usable key is an
    /// error, so a provider never runs with nothing to verify against.
    pub fn parse(document: &str) -> Result<KeySet, String> {
        let value: Value =
            serde_json::from_str(document).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
        let Some(keys) = value.get("keys").and_then(Value::as_array) else {
            return Err("the JWKS has no \"keys\" list".into());
        };
        let mut set = KeySet {
            id: super::cache::next_id(),
            keys: Vec::new(),
        };
        let mut skipped = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match parse_key(key) {
                Ok(key) => set.keys.push(key),
                Err(reason) => skipped.push(format!("keys[{i}]: {reason}")),
            }
        }
        if set.keys.is_empty() {
            return Err(if skipped.is_empty() {
                "the JWKS has no keys".into()
            } else {
                format!("the JWKS has no usable key ({})", skipped.join("; "))
            });
        }
        Ok(set)
    }

    /// Verifies `token`'s signature and returns nothing else: the claims are checked by
    /// the provider. A `kid` selects its key; without one every key of the right type is
    /// tried.
    pub fn verify(&self, token: &str, alg: Algorithm, kid: Option<&str>) -> Result<(), JwtError> {
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.algorithms.contains(&alg))
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::NoMatchingKey);
        }
        let mut validation = jsonwebtoken::Validation::new(alg);
        // The provider checks the claims itself (to say which one failed).
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        for key in candidates {
            if jsonwebtoken::decode::<serde::de::IgnoredAny>(token, &key.key, &validation).is_ok() {
                return Ok(());
            }
        }
        Err(JwtError::VerificationFailed)
    }
}

fn parse_key(value: &Value) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    use Algorithm::*;
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return Err(format!("curve {:?} is not supported", ec.curve)),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => vec![EdDSA],
            _ => return Err(format!("curve {:?} is not supported", okp.curve)),
        },
        AlgorithmParameters::OctetKey(_) => vec![HS256, HS384, HS512],
    };
    let algorithms = match value.get("alg").and_then(Value::as_str) {
        None => by_type,
        Some(alg) => {
            let alg: Algorithm = alg
                .parse()
                .map_err(|_| format!("alg {alg:?} is not supported"))?;
            if !by_type.contains(&alg) {
                return Err(format!("alg {alg:?} does not fit the key's type"));
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}

/// Where a remote JWKS comes from and how it is kept (Envoy's `RemoteJwks`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteSource {
    /// The cluster the fetch goes through (`http_uri.cluster`).
    pub cluster: String,
    /// `http_uri.uri`.
    pub uri: String,
    /// `:authority` of the fetch (the URI's host).
    pub authority: String,
    /// Path and query of the fetch.
    pub path: String,
    /// The fetch's timeout (`http_uri.timeout`); also how long a request waits for the
    /// first keys.
    pub timeout: Duration,
    /// How long fetched keys are used before they are fetched again (`cache_duration`,
    /// default 10 minutes).
    pub cache_duration: Duration,
    /// How soon a failed fetch is tried again (`async_fetch.failed_refetch_duration`,
    /// default 1 s).
    pub failed_refetch: Duration,
}

/// A remote JWKS: the keys last fetched. While fetches fail, the last good keys stay in
/// use (an issuer that is briefly down does not lock every user out); until the first
/// fetch succeeds, tokens are refused with "Jwks remote fetch is failed".
#[derive(Debug)]
pub struct RemoteJwks {
    /// Where it comes from.
    pub source: RemoteSource,
    keys: ArcSwapOption<KeySet>,
    /// Set once the first fetch has ended, well or not.
    settled: AtomicBool,
    settle: Notify,
}

impl RemoteJwks {
    fn new(source: RemoteSource) -> RemoteJwks {
        RemoteJwks {
            source,
            keys: ArcSwapOption::empty(),
            settled: AtomicBool::new(false),
            settle: Notify::new(),
        }
    }

    /// The keys in use, if a fetch ever succeeded.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// The keys, waiting (up to the fetch timeout) for the first fetch if none has ended.
    pub async fn keys_when_fetched(&self) -> Option<Arc<KeySet>> {
        if !self.settled.load(Ordering::Acquire) {
            let settled = self.settle.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if !self.settled.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(self.source.timeout, settled).await;
            }
        }
        self.keys()
    }

    /// Whether a request must wait for the first fetch.
    pub fn unsettled(&self) -> bool {
        !self.settled.load(Ordering::Acquire)
    }

    /// Records a fetch's outcome: new keys replace the old; a failure keeps them.
    pub fn fetched(&self, keys: Option<KeySet>) {
        if let Some(keys) = keys {
            self.keys.store(Some(Arc::new(keys)));
        }
        self.settled.store(true, Ordering::Release);
        self.settle.notify_waiters();
    }
}

type Registry = std::collections::HashMap<RemoteSource, Weak<RemoteJwks>>;
static REMOTES: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

/// The remote JWKS of `source`: the one a snapshot still uses (with its keys), else a new
/// one. Only compiles look here, never a request.
pub fn shared_remote(source: RemoteSource) -> Arc<RemoteJwks> {
    let mut remotes = REMOTES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(remote) = remotes.get(&source).and_then(Weak::upgrade) {
        return remote;
    }
    remotes.retain(|_, remote| remote.strong_count() > 0);
    let remote = Arc::new(RemoteJwks::new(source.clone()));
    remotes.insert(source, Arc::downgrade(&remote));
    remote
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn ed25519() -> (EncodingKey, String) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        (EncodingKey::from_ed_der(pkcs8.as_ref()), x)
    }

    #[test]
    fn a_key_verifies_its_own_algorithms_only() {
        let (signing, x) = ed25519();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"e1"}},{{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}}]}}"#
        );
        let set = KeySet::parse(&jwks).unwrap();
        assert_eq!(set.keys.len(), 1, "the P-521 key is left out");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("e1".into());
        let token =
            jsonwebtoken::encode(&header, &serde_json::json!({"sub": "a"}), &signing).unwrap();
        assert_eq!(set.verify(&token, Algorithm::EdDSA, Some("e1")), Ok(()));
        assert_eq!(set.verify(&token, Algorithm::EdDSA, None), Ok(()));
        assert_eq!(
            set.verify(&token, Algorithm::EdDSA, Some("other")),
            Err(JwtError::NoMatchingKey)
        );
        assert_eq!(
            set.verify(&token, Algorithm::HS256, None),
            Err(JwtError::NoMatchingKey),
            "an OKP public key is no HMAC secret"
        );
        let (other, _) = ed25519();
        let forged =
            jsonwebtoken::encode(&header, &serde_json::json!({"sub": "a"}), &other).unwrap();
        assert_eq!(
            set.verify(&forged, Algorithm::EdDSA, Some("e1")),
            Err(JwtError::VerificationFailed)
        );
    }

    #[test]
    fn a_jwks_without_usable_keys_is_refused() {
        assert!(KeySet::parse("{}").unwrap_err().contains("no \"keys\""));
        assert!(KeySet::parse(r#"{"keys":[]}"#)
            .unwrap_err()
            .contains("no keys"));
        let only_bad = r#"{"keys":[{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}]}"#;
        assert!(KeySet::parse(only_bad)
            .unwrap_err()
            .contains("no usable key"));
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_last_keys() {
        let (_, x) = ed25519();
        let remote = RemoteJwks::new(RemoteSource {
            cluster: "idp".into(),
            uri: "http://idp/jwks".into(),
            authority: "idp".into(),
            path: "/jwks".into(),
            timeout: Duration::from_millis(50),
            cache_duration: Duration::from_secs(600),
            failed_refetch: Duration::from_secs(1),
        });
        assert!(
            remote.keys_when_fetched().await.is_none(),
            "waits out the timeout"
        );
        let jwks = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}"}}]}}"#);
        remote.fetched(Some(KeySet::parse(&jwks).unwrap()));
        remote.fetched(None);
        assert_eq!(remote.keys().map(|k| k.keys.len()), Some(1));
    }
}
