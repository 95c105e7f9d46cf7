use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

const NOW: u64 = 1_800_000_000;

/// An ES256 key pair: the signing key and its JWK.
fn es256(kid: &str) -> (EncodingKey, String) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let (x, y) = (
        URL_SAFE_NO_PAD.encode(&point[1..33]),
        URL_SAFE_NO_PAD.encode(&point[33..65]),
    );
    let jwk = format!(r#"{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"{kid}"}}"#);
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

fn sign(key: &EncodingKey, kid: &str, claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn provider(name: &str, issuer: &str, jwk: &str) -> Arc<Provider> {
    Arc::new(Provider {
        name: name.into(),
        id: cache::next_id(),
        cache_size: cache::DEFAULT_SIZE,
        issuer: issuer.into(),
        audiences: vec!["api".into()],
        subjects: None,
        require_expiration: false,
        max_lifetime: None,
        forward: false,
        locations: TokenLocation::defaults(),
        forward_payload_header: Some(HeaderName::from_static("x-jwt-payload")),
        pad_forward_payload_header: false,
        payload_in_metadata: Some(name.into()),
        claim_to_headers: vec![(HeaderName::from_static("x-user"), vec!["sub".into()])],
        clock_skew: 60,
        keys: ProviderKeys::Local(Arc::new(
            KeySet::parse(&format!(r#"{{"keys":[{jwk}]}}"#)).unwrap(),
        )),
    })
}

fn filter(providers: &[&Arc<Provider>]) -> JwtAuthn {
    JwtAuthn {
        name: "jwt".into(),
        providers: providers
            .iter()
            .map(|p| (p.name.to_string(), Arc::clone(p)))
            .collect(),
        rules: Vec::new(),
        requirement_map: HashMap::new(),
        bypass_cors_preflight: false,
        written_headers: Vec::new(),
        remotes: Vec::new(),
        stats: Default::default(),
    }
}

fn with_token(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers
}

fn check(
    authn: &JwtAuthn,
    requirement: &Requirement,
    headers: &HeaderMap,
) -> Result<Verified, JwtError> {
    let request = JwtRequest {
        method: &Method::GET,
        path: "/",
        query: None,
        headers,
    };
    authn.verify(requirement, &request, NOW)
}

fn one(provider: &Arc<Provider>) -> Requirement {
    Requirement::Provider {
        provider: Arc::clone(provider),
        audiences: None,
    }
}

#[test]
fn claims_are_checked_with_the_clock_skew() {
    let (key, jwk) = es256("k1");
    let idp = provider("idp", "https://idp", &jwk);
    let authn = filter(&[&idp]);
    let base = serde_json::json!({"iss": "https://idp", "aud": "api", "sub": "alice"});
    let token = |extra: serde_json::Value| {
        let mut claims = base.clone();
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        with_token(&sign(&key, "k1", claims))
    };
    let cases = [
        (serde_json::json!({"exp": NOW + 10}), Ok(())),
        (serde_json::json!({"exp": NOW - 30}), Ok(())),
        (serde_json::json!({"exp": NOW - 61}), Err(JwtError::Expired)),
        (serde_json::json!({"nbf": NOW + 30}), Ok(())),
        (
            serde_json::json!({"nbf": NOW + 61}),
            Err(JwtError::NotYetValid),
        ),
        (
            serde_json::json!({"iss": "https://other"}),
            Err(JwtError::UnknownIssuer),
        ),
        (serde_json::json!({"aud": ["x", "api"]}), Ok(())),
        (
            serde_json::json!({"aud": "web"}),
            Err(JwtError::AudienceNotAllowed),
        ),
        (
            serde_json::json!({"exp": "soon"}),
            Err(JwtError::PayloadBadJson),
        ),
    ];
    for (extra, expected) in cases {
        let got = check(&authn, &one(&idp), &token(extra.clone())).map(|_| ());
        assert_eq!(got, expected, "{extra}");
    }
    assert_eq!(
        check(&authn, &one(&idp), &HeaderMap::new()).map(|_| ()),
        Err(JwtError::Missing)
    );
    let (forger, _) = es256("k1");
    let forged = with_token(&sign(&forger, "k1", base.clone()));
    assert_eq!(
        check(&authn, &one(&idp), &forged).map(|_| ()),
        Err(JwtError::VerificationFailed)
    );
}

#[test]
fn a_verified_token_sets_headers_keeps_its_payload_and_is_not_forwarded() {
    let (key, jwk) = es256("k1");
    let idp = provider("idp", "https://idp", &jwk);
    let authn = filter(&[&idp]);
    let token = sign(
        &key,
        "k1",
        serde_json::json!({"iss": "https://idp", "aud": "api", "sub": "alice"}),
    );
    let verified = check(&authn, &one(&idp), &with_token(&token)).unwrap();
    assert_eq!(verified.remove_headers, vec![http::header::AUTHORIZATION]);
    let payload = token.split('.').nth(1).unwrap();
    assert!(verified
        .set_headers
        .iter()
        .any(|(h, v)| h == "x-jwt-payload" && v == payload));
    assert!(verified
        .set_headers
        .iter()
        .any(|(h, v)| h == "x-user" && v == "alice"));
    assert_eq!(&*verified.payloads[0].key, "idp");
    assert_eq!(verified.payloads[0].claims["sub"], "alice");
}

#[test]
fn any_all_and_allow_missing_combine_providers() {
    let (key_a, jwk_a) = es256("a");
    let (key_b, jwk_b) = es256("b");
    let a = provider("a", "https://a", &jwk_a);
    let b = provider("b", "https://b", &jwk_b);
    let authn = filter(&[&a, &b]);
    let token_a = with_token(&sign(
        &key_a,
        "a",
        serde_json::json!({"iss": "https://a", "aud": "api"}),
    ));
    let token_b = with_token(&sign(
        &key_b,
        "b",
        serde_json::json!({"iss": "https://b", "aud": "api"}),
    ));
    let any = Requirement::Any(vec![one(&a), one(&b)]);
    assert!(check(&authn, &any, &token_a).is_ok());
    assert!(check(&authn, &any, &token_b).is_ok());
    assert_eq!(
        check(&authn, &any, &HeaderMap::new()).map(|_| ()),
        Err(JwtError::Missing)
    );
    let all = Requirement::All(vec![one(&a), one(&b)]);
    assert_eq!(
        check(&authn, &all, &token_a).map(|_| ()),
        Err(JwtError::UnknownIssuer),
        "b's provider sees a's token in the same header"
    );
    let allow_missing = Requirement::AllowMissing;
    assert!(check(&authn, &allow_missing, &HeaderMap::new()).is_ok());
    let good = check(&authn, &allow_missing, &token_b).unwrap();
    assert_eq!(&*good.payloads[0].key, "b", "a valid token still counts");
    let (forger, _) = es256("b");
    let bad = with_token(&sign(
        &forger,
        "b",
        serde_json::json!({"iss": "https://b", "aud": "api"}),
    ));
    assert_eq!(
        check(&authn, &allow_missing, &bad).map(|_| ()),
        Err(JwtError::VerificationFailed)
    );
    let unknown = with_token(&sign(
        &key_a,
        "a",
        serde_json::json!({"iss": "https://nobody", "aud": "api"}),
    ));
    assert_eq!(
        check(&authn, &allow_missing, &unknown).map(|_| ()),
        Err(JwtError::UnknownIssuer)
    );
    let allow_failed = Requirement::AllowMissingOrFailed;
    let passed = check(&authn, &allow_failed, &bad).unwrap();
    assert!(passed.payloads.is_empty());
}

#[test]
fn a_route_requirement_overrides_the_rules() {
    let (_, jwk) = es256("k1");
    let idp = provider("idp", "https://idp", &jwk);
    let mut authn = filter(&[&idp]);
    authn.rules = vec![(
        RouteMatch {
            path: crate::matchers::PathMatch::Prefix("/api".into()),
            headers: Vec::new(),
        },
        Some(Arc::new(one(&idp))),
    )];
    let headers = HeaderMap::new();
    let request = |path| JwtRequest {
        method: &Method::GET,
        path,
        query: None,
        headers: &headers,
    };
    assert!(authn
        .requirement(&RouteRequirement::Rules, &request("/api/x"))
        .is_some());
    assert!(authn
        .requirement(&RouteRequirement::Rules, &request("/public"))
        .is_none());
    assert!(authn
        .requirement(&RouteRequirement::Disabled, &request("/api/x"))
        .is_none());
}

#[test]
fn a_remembered_token_still_expires_and_is_still_checked_for_its_audience() {
    let (key, jwk) = es256("k1");
    let idp = provider("idp", "https://idp", &jwk);
    let authn = filter(&[&idp]);
    let token = sign(
        &key,
        "k1",
        serde_json::json!({"iss": "https://idp", "aud": "api", "exp": NOW + 10}),
    );
    let headers = with_token(&token);
    let request = JwtRequest {
        method: &Method::GET,
        path: "/",
        query: None,
        headers: &headers,
    };
    assert!(authn.verify(&one(&idp), &request, NOW).is_ok());
    assert!(
        cache::get(idp.id, current_keys_id(&idp), &token).is_some(),
        "remembered"
    );
    // From the cache, the claims are checked again.
    assert_eq!(
        authn.verify(&one(&idp), &request, NOW + 100).map(|_| ()),
        Err(JwtError::Expired)
    );
    let other_audience = Requirement::Provider {
        provider: Arc::clone(&idp),
        audiences: Some(vec!["billing".into()]),
    };
    assert_eq!(
        authn.verify(&other_audience, &request, NOW).map(|_| ()),
        Err(JwtError::AudienceNotAllowed)
    );
}

fn current_keys_id(provider: &Provider) -> u64 {
    match &provider.keys {
        ProviderKeys::Local(keys) => keys.id,
        ProviderKeys::Remote(remote) => remote.keys().map_or(0, |k| k.id),
    }
}
