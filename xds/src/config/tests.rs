use super::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(e) => e.field_errors().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn plan_examples_load_as_written() {
    let gateway = r#"
api_gateway:
  address: ":8080"
  tls:
    enabled: false
services:
  message_router:
    replicas: 3
    resources:
      cpu: "500m"
      memory: "512Mi"
plugins:
  my-plugin:
    version: "2.0.0"
    enabled: true
    isolation: "wasm"
"#;
    let config = Config::from_yaml(gateway).unwrap();
    assert_eq!(config.services["message_router"].replicas, Some(3));
    assert_eq!(
        parse_listen_address(&config.api_gateway.address).unwrap(),
        "0.0.0.0:8080".parse().unwrap()
    );
    let tenant = r#"
tenant:
  id: "acme-corp"
  namespace: "acme"
  resource_quota:
    cpu: "16"
    memory: "32Gi"
    message_rate: "10000/sec"
  plugins:
    isolated: true
    allow_custom: false
    whitelist:
      - "official:*"
      - "acme:*"
  data:
    isolated: true
    retention: "90d"
    encryption: true
    locality: "EU-West"
"#;
    let config = Config::from_yaml(tenant).unwrap();
    let t = config.tenant.unwrap();
    assert_eq!(t.data.unwrap().locality.as_deref(), Some("EU-West"));
    assert_eq!(parse_rate("10000/sec").unwrap(), 10000.0);
}

#[test]
fn bad_regex_names_the_field_path() {
    let yaml = r#"
services:
  a: { endpoints: ["127.0.0.1:1"] }
routes:
  - service: a
  - service: a
  - match: { path_regex: "([a-z" }
    service: a
"#;
    let errors = errors_of(yaml);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("routes[2].match.path_regex: invalid regex"),
        "{errors:?}"
    );
}

#[test]
fn unknown_field_and_wrong_type_name_their_path() {
    let errors = errors_of("services:\n  a:\n    endpointz: []\n");
    assert!(
        errors[0].starts_with("services.a.endpointz: unknown field"),
        "{errors:?}"
    );
    assert!(errors[0].contains("endpointz"), "{errors:?}");
    let errors = errors_of("routes:\n  - service: a\n    timeout: 10\n");
    assert!(errors[0].starts_with("routes[0].timeout"), "{errors:?}");
    let errors = errors_of("services:\n  a:\n    lb: fastest\n");
    assert!(errors[0].starts_with("services.a.lb"), "{errors:?}");
}

#[test]
fn every_rule_reports_its_field() {
    let yaml = r#"
api_gateway: { address: "nope" }
admin: { address: ":99999" }
services:
  a:
    endpoints:
      - "127.0.0.1"
      - { address: "127.0.0.1:80", weight: 0 }
    health_check: { path: healthz, unhealthy_threshold: 0 }
routes:
  - service: missing
  - match: { path: relative, path_prefix: /x, headers: [{ name: x }], methods: [get] }
    split: [{ service: a, weight: 0 }]
  - service: a
    split: [{ service: a, weight: 1 }]
  - service: a
    retries: { on: [sometimes], max: 99 }
  - match: { host: "a.*.com" }
    service: a
"#;
    let errors = errors_of(yaml).join("\n");
    for expected in [
        "api_gateway.address:",
        "admin.address:",
        "services.a.endpoints[0].address:",
        "services.a.endpoints[1].weight:",
        "services.a.health_check.path:",
        "services.a.health_check.unhealthy_threshold:",
        "routes[0].service: no service named \"missing\"",
        "routes[1].match: use only one of",
        "routes[1].match.path: must start with '/'",
        "routes[1].match.headers[0]: set exactly one of",
        "routes[1].match.methods[0]:",
        "routes[1].split: weights must add up",
        "routes[2]: set either `service` or `split`",
        "routes[3].retries.on[0]:",
        "routes[3].retries.max:",
        "routes[4].match.host:",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
}

#[test]
fn tls_requires_existing_files() {
    let errors = errors_of("api_gateway:\n  tls: { enabled: true, cert_file: /nonexistent.pem }\n")
        .join("\n");
    assert!(errors.contains("api_gateway.tls.cert_file: file \"/nonexistent.pem\" does not exist"));
    assert!(errors.contains("api_gateway.tls.key_file: is required"));
}

#[test]
fn listen_addresses() {
    assert_eq!(
        parse_listen_address(":80").unwrap(),
        "0.0.0.0:80".parse().unwrap()
    );
    assert_eq!(
        parse_listen_address("localhost:80").unwrap(),
        "127.0.0.1:80".parse().unwrap()
    );
    assert_eq!(
        parse_listen_address("[::1]:80").unwrap(),
        "[::1]:80".parse().unwrap()
    );
    assert!(parse_listen_address("80").is_err());
    assert_eq!(
        parse_endpoint_address("backend.local:8080").unwrap(),
        ("backend.local".to_string(), 8080)
    );
    assert!(parse_endpoint_address("bad host:1").is_err());
}

#[test]
fn plugin_sources_and_limits_are_checked_field_by_field() {
    let hash = "a".repeat(64);
    let good = format!(
        "plugins:\n  remote:\n    source: {{ url: \"https://plugins.example/auth.wasm\", sha256: \"{hash}\" }}\n    limits: {{ memory: 32Mi, cpu: 20ms, body: 256Ki }}\n"
    );
    let config = Config::from_yaml(&good).expect("a pinned URL and limits load");
    Config::from_yaml(&format!(
        "plugins:\n  stored: {{ source: {{ sha256: \"{hash}\" }} }}\n"
    ))
    .expect("a digest alone names a module in the control plane's store");
    let limits = config.plugins["remote"].limits;
    assert_eq!(limits.memory, Some(ByteSize(32 << 20)));
    assert_eq!(limits.body, Some(ByteSize(256 << 10)));
    assert_eq!(limits.cpu.map(|c| c.0.as_millis()), Some(20));

    let errors = errors_of(
        "plugins:\n  a: { source: { url: \"https://x/a.wasm\" } }\n  b: { source: { url: \"ftp://x/b.wasm\", sha256: \"abc\" } }\n  c: { source: { } }\n  s: { source: { sha256: \"xyz\" } }\n  d: { source: { file: /nonexistent.wasm, url: \"https://x/d.wasm\" } }\n  e: { limits: { memory: 10Ki, cpu: 1m, body: 1Gi } }\n",
    )
    .join("\n");
    for expected in [
        "plugins.a.source.sha256: a `url` source needs the module's sha256",
        "plugins.b.source.url: \"ftp://x/b.wasm\" is not an http:// or https:// URL",
        "plugins.b.source.sha256: \"abc\" is not 64 hex digits",
        "plugins.c.source: give `file`, `url` (with `sha256`), or `sha256` alone",
        "plugins.s.source.sha256: \"xyz\" is not 64 hex digits",
        "plugins.d.source: give either `file` or `url`, not both",
        "plugins.e.limits.memory: 10240 bytes is outside 1Mi..4Gi",
        "plugins.e.limits.cpu: 60s is outside 1ms..10s",
        "plugins.e.limits.body: 1073741824 bytes is more than 64Mi",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    let errors = errors_of("plugins:\n  a: { limits: { memory: 12Zi } }\n").join("\n");
    assert!(
        errors.contains("plugins.a.limits.memory") && errors.contains("unknown size unit"),
        "{errors}"
    );
}

#[test]
fn byte_sizes_read_like_kubernetes_quantities() {
    for (text, bytes) in [
        ("1000", 1000),
        ("64Mi", 64 << 20),
        ("1Gi", 1 << 30),
        ("512KiB", 512 << 10),
        ("10M", 10_000_000),
        ("2k", 2000),
    ] {
        assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
    }
    assert!(ByteSize::parse("Mi").is_err());
    assert!(ByteSize::parse("99999999999999999999Gi").is_err());
}

#[test]
fn adaptive_concurrency_and_outlier_limits_name_their_fields() {
    let yaml = r#"
services:
  a:
    endpoints: ["127.0.0.1:80"]
    outlier_detection: { max_ejection_percent: 150, latency_factor: 0.5 }
    circuit_breakers: { retry_budget: { percent: 120 } }
    adaptive_concurrency:
      percentile: 101
      buffer: -1
      update_interval: 0s
      max_limit: 10
      min_limit: 20
      min_rtt_requests: 0
      status: 200
routes:
  - service: a
"#;
    let errors = errors_of(yaml).join("\n");
    for expected in [
        "services.a.outlier_detection.max_ejection_percent: 150 is more than 100",
        "services.a.circuit_breakers.retry_budget.percent: 120 is not between 0 and 100",
        "services.a.outlier_detection.latency_factor: 0.5 is not between 1 and 1000",
        "services.a.adaptive_concurrency.percentile:",
        "services.a.adaptive_concurrency.buffer:",
        "services.a.adaptive_concurrency.update_interval: must be more than 0",
        "services.a.adaptive_concurrency.min_limit: 20 is more than max_limit 10",
        "services.a.adaptive_concurrency.min_rtt_requests: must be at least 1",
        "services.a.adaptive_concurrency.status: 200 is not a 4xx or 5xx status",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
}

#[test]
fn pinned_routes_need_an_endpoint_in_their_region_and_obey_the_tenant() {
    let yaml = r#"
tenant:
  id: acme
  data: { locality: eu }
services:
  web: { endpoints: [{ address: "127.0.0.1:80", region: eu }, { address: "127.0.0.1:81", region: us }] }
  us-only: { endpoints: [{ address: "127.0.0.1:82", region: us }] }
routes:
  - match: { path_prefix: /a }
    service: web
    locality: us
  - match: { path_prefix: /b }
    service: us-only
  - service: web
"#;
    let errors = errors_of(yaml).join("\n");
    for expected in [
        "routes[0].locality: the tenant's data must stay in \"eu\"",
        "tenant.data.locality: routes[1] goes to service \"us-only\", which has no endpoint in region \"eu\"",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    assert!(!errors.contains("routes[2]"), "{errors}");
}

#[test]
fn hash_policies_and_ring_sizes_name_their_fields() {
    let yaml = r#"
services:
  web:
    endpoints: ["127.0.0.1:80"]
    lb: ring_hash
    ring_hash: { minimum_ring_size: 100, maximum_ring_size: 10 }
  rr:
    endpoints: ["127.0.0.1:81"]
    ring_hash: {}
routes:
  - service: web
    hash_policy: [{ header: "bad header" }, { cookie: a, source_ip: true }, {}]
"#;
    let errors = errors_of(yaml).join("\n");
    for expected in [
        "services.web.ring_hash: ring sizes must satisfy",
        "services.rr.ring_hash: only applies with lb: ring_hash",
        "routes[0].hash_policy[0].header: \"bad header\" is not a valid header name",
        "routes[0].hash_policy[1]: set exactly one of",
        "routes[0].hash_policy[2]: set exactly one of",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
}

#[test]
fn sidecar_ports_and_timeouts_are_checked_by_field() {
    let errors = errors_of(
        "sidecar: { outbound_port: 9901, inbound_port: 9901, protocol_detection_timeout: 0s }\napi_gateway: { tls: { mesh: true } }\nservices:\n  sidecar_passthrough: { endpoints: [\"127.0.0.1:1\"] }\n",
    );
    let joined = errors.join("\n");
    for expected in [
        "sidecar.outbound_port: port 9901 is already used by admin.address",
        "sidecar.inbound_port: must differ from sidecar.outbound_port",
        "sidecar.protocol_detection_timeout: must be more than 0s",
        "api_gateway.tls: a sidecar terminates no TLS of its own (",
        "services.sidecar_passthrough: is the sidecar's own cluster",
    ] {
        assert!(joined.contains(expected), "{expected:?} in:\n{joined}");
    }
    assert!(Config::from_yaml("sidecar: {}\n").is_ok());
}

#[test]
fn service_addresses_are_checked_and_need_a_sidecar() {
    let errors = errors_of(
        "services:\n  a: { endpoints: [\"10.0.0.1:80\"], addresses: [\"10.96.0.1:80\"] }\n",
    )
    .join("\n");
    assert!(
        errors.contains("services.a.addresses: only a sidecar"),
        "{errors}"
    );
    let errors = errors_of(
        "sidecar: {}\nservices:\n  a: { endpoints: [\"10.0.0.1:80\"], addresses: [\"nope\", \"10.96.0.1:80\"] }\n  b: { endpoints: [\"10.0.0.2:80\"], addresses: [\"10.96.0.1:80\"] }\n",
    )
    .join("\n");
    assert!(
        errors.contains("services.a.addresses[0]: \"nope\" is not an ip:port"),
        "{errors}"
    );
    assert!(
        errors.contains("services.b.addresses: 10.96.0.1:80 is also services.a's"),
        "{errors}"
    );
}

#[test]
fn a_connect_route_matches_its_host_only() {
    let errors = errors_of(
        "services:\n  db: { endpoints: [\"127.0.0.1:5432\"] }\nroutes:\n  - { match: { connect: true, path_prefix: /x, methods: [GET] }, service: db }\n",
    )
    .join("\n");
    assert!(
        errors.contains("routes[0].match.path_prefix: a CONNECT request has no path"),
        "{errors}"
    );
    assert!(
        errors.contains("routes[0].match.methods: a CONNECT request has no path"),
        "{errors}"
    );
}

#[test]
fn a_rate_limit_needs_requests_and_a_period() {
    let errors = errors_of(
        "services:\n  web: { endpoints: [\"127.0.0.1:80\"] }\nroutes:\n  - { service: web, rate_limit: { requests: 0, per: 0s, burst: 0 } }\n",
    )
    .join("\n");
    for field in [
        "requests: must be at least 1",
        "per: must be at least 1ms",
        "burst: must be at least 1",
    ] {
        assert!(
            errors.contains(&format!("routes[0].rate_limit.{field}")),
            "{field}: {errors}"
        );
    }
}

#[test]
fn a_tenant_named_by_certificate_needs_client_certificates_and_principals() {
    let errors = errors_of(
        r#"
tenants:
  acme: {}
tenant_key: { certificate: true }
"#,
    );
    for expected in [
        "tenant_key.certificate: needs client certificates",
        "tenant_key.certificate: no tenant has principals",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "{expected:?} in {errors:?}"
        );
    }
    let errors = errors_of(
        r#"
api_gateway: { tls: { enabled: true, mesh: true } }
tenants:
  acme: { principals: ["spiffe://nip.local/ns/acme/*"] }
tenant_key: { certificate: true, header: x-tenant }
"#,
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("tenant_key: set exactly one of header, claim, certificate")),
        "{errors:?}"
    );
}

#[test]
fn process_plugin_body_and_trailer_modes_are_checked_by_field() {
    let yaml = r#"
services:
  a: { endpoints: ["127.0.0.1:1"] }
  p: { endpoints: ["127.0.0.1:2"], protocol: http2 }
plugins:
  both: { isolation: process, process: { service: p, stream_bodies: true, body_mode: streamed } }
  tails: { isolation: process, process: { service: p, trailers: true } }
routes:
  - { service: a, plugins: [both, tails] }
"#;
    let errors = errors_of(yaml);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("plugins.both.process.body_mode: contradicts stream_bodies")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e
            .starts_with("plugins.tails.process.trailers: response trailers need responses: true")),
        "{errors:?}"
    );
    let unknown = Config::from_yaml(&yaml.replace("body_mode: streamed", "body_mode: partial"))
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("body_mode"), "{unknown}");
    let config = Config::from_yaml(
        "services:\n  p: { endpoints: [\"127.0.0.1:2\"], protocol: http2 }\nplugins:\n  s: { isolation: process, process: { service: p, responses: true, body_mode: STREAMED, trailers: true } }\n",
    )
    .unwrap();
    let process = config.plugins["s"].process.as_ref().unwrap();
    assert_eq!(process.bodies(), ProcessBodyMode::Streamed);
}

#[test]
fn a_plugin_with_nothing_under_it_is_the_same_written_empty_or_null() {
    for yaml in [
        "plugins:\n  a:\n",
        "plugins:\n  a: null\n",
        "plugins:\n  a: {}\n",
    ] {
        let config = Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{yaml:?}: {e}"));
        let plugin = &config.plugins["a"];
        assert!(plugin.enabled && plugin.source.is_none(), "{yaml:?}");
    }
    let errors = errors_of("plugins:\n  a: { sourc: {} }\n").join("\n");
    assert!(
        errors.contains("plugins.a.sourc: unknown field"),
        "{errors}"
    );
}
