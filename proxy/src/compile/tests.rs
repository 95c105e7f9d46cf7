use super::routes::retry_policy;
use super::*;
use crate::upstream::ewma::EwmaConfig;
use crate::upstream::lb::LbPolicy;
use crate::upstream::outlier::OutlierConfig;
use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy as XdsLbPolicy;
use nip_xds::config::Config;
use nip_xds::translate::translate;

fn loader() -> &'static PluginLoader {
    static LOADER: std::sync::OnceLock<PluginLoader> = std::sync::OnceLock::new();
    LOADER.get_or_init(|| PluginLoader::new(None).expect("wasm engine"))
}

fn translated(yaml: &str) -> nip_xds::translate::Translation {
    translate(&Config::from_yaml(yaml).expect("valid yaml"))
}

const BASE: &str = r#"
services:
  web:
    endpoints: ["127.0.0.1:8081", { address: "127.0.0.1:8082", region: eu, zone: a, weight: 3 }]
    lb: least_request
    protocol: http2
    health_check: { path: /hz, interval: 1s, timeout: 100ms, expected_statuses: [204] }
routes:
  - name: api
    match: { host: "*.example.com", path_regex: "/v[0-9]+" }
    service: web
    timeout: 250ms
    retries: { on: [connect-failure, gateway-error], max: 3 }
  - name: rest
    service: web
"#;

fn compile(t: &nip_xds::translate::Translation) -> Result<Snapshot, CompileError> {
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    compiler(&registry, &metrics).build(loader(), &t.bootstrap, &t.resources)
}

/// Compiles `t` with its first listener's connection manager changed by `edit` (what
/// another xDS server might send instead).
fn compile_with_manager(
    t: &nip_xds::translate::Translation,
    edit: impl FnOnce(&mut HttpConnectionManager),
) -> Result<Snapshot, CompileError> {
    let mut resources = t.resources.clone();
    let listener = &mut resources.listeners[0];
    let Some(filter::ConfigType::TypedConfig(any)) =
        &listener.filter_chains[0].filters[0].config_type
    else {
        panic!("hcm is typed");
    };
    let mut hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    edit(&mut hcm);
    listener.filter_chains[0].filters[0].config_type = Some(filter::ConfigType::TypedConfig(
        envoy_types::util::pack_any(hcm),
    ));
    compile(&nip_xds::translate::Translation {
        resources,
        ..t.clone()
    })
}

/// A compiler with no access log carried over.
fn compiler<'a>(registry: &'a EndpointRegistry, metrics: &'a Metrics) -> Compiler<'a> {
    Compiler {
        registry,
        metrics,
        previous_access_logs: Vec::new(),
        identity: None,
    }
}

#[test]
fn translated_config_compiles_with_every_field_carried_over() {
    let snapshot = compile(&translated(BASE)).unwrap();
    let web = &snapshot.clusters["web"];
    assert_eq!(web.lb, LbPolicy::LeastRequest);
    assert!(web.http2);
    assert_eq!(web.endpoints.len(), 2);
    assert_eq!(web.endpoints[1].weight, 3);
    assert_eq!(web.endpoints[1].locality.region, "eu");
    let hc = web.health_check.as_ref().unwrap();
    assert_eq!(hc.path, "/hz");
    assert!(hc.accepts(204) && !hc.accepts(200));
    let headers = http::HeaderMap::new();
    let route = snapshot
        .primary_http()
        .router
        .route("a.example.com", "/v2", &http::Method::GET, &headers)
        .unwrap();
    assert_eq!(&*route.name, "api");
    assert_eq!(route.timeout, Duration::from_millis(250));
    assert_eq!(route.retry.max_retries, 3);
    assert!(route.retry.retries_status(503) && !route.retry.retries_status(500));
    // The regex must match the whole path.
    let route = snapshot
        .primary_http()
        .router
        .route("a.example.com", "/v2/x", &http::Method::GET, &headers)
        .unwrap();
    assert_eq!(&*route.name, "rest");
    let bound: Vec<_> = snapshot.listeners.bound().map(|l| l.address).collect();
    assert_eq!(bound, ["0.0.0.0:8080".parse().unwrap()]);
    assert!(snapshot.http.h2c && snapshot.http.tls.is_none());
    assert_eq!(
        snapshot.admin_address(),
        Some("127.0.0.1:9901".parse().unwrap())
    );
}

#[test]
fn unsupported_fields_are_refused_naming_the_resource() {
    let mut t = translated(BASE);
    t.resources.clusters[0].lb_policy = XdsLbPolicy::Maglev as i32;
    let e = compile(&t).unwrap_err();
    assert_eq!(e.kind, "Cluster");
    assert_eq!(e.name, "web");
    assert!(
        e.message.contains("lb_policy MAGLEV is not supported"),
        "{e}"
    );

    let mut t = translated(BASE);
    t.resources.routes[0].name = "other".into();
    let e = compile(&t).unwrap_err();
    assert!(
        e.to_string()
            .contains("rds.route_config_name \"api_gateway_routes\""),
        "{e}"
    );

    let mut t = translated(BASE);
    t.resources.listeners.clear();
    assert!(compile(&t)
        .unwrap_err()
        .message
        .contains("there is no listener to serve"));

    let mut t = translated(BASE);
    let api = t.resources.routes[0]
        .virtual_hosts
        .iter_mut()
        .flat_map(|v| v.routes.iter_mut())
        .find(|r| r.name == "api")
        .unwrap();
    if let Some(route::Action::Route(action)) = &mut api.action {
        action.retry_policy.as_mut().unwrap().retry_on = "retriable-4xx".into();
    }
    let e = compile(&t).unwrap_err();
    assert_eq!(e.kind, "RouteConfiguration");
    assert!(e.message.contains("retry_on"), "{e}");

    let mut t = translated(BASE);
    let cla = &mut t.resources.endpoints[0];
    let duplicate = cla.endpoints[0].lb_endpoints[0].clone();
    cla.endpoints[0].lb_endpoints.push(duplicate);
    let e = compile(&t).unwrap_err();
    assert!(
        e.message
            .contains("endpoints[0].lb_endpoints[1]: 127.0.0.1:8081 is listed twice"),
        "{e}"
    );
}

#[test]
fn a_route_to_a_missing_cluster_compiles_and_answers_503_nc_at_request_time() {
    let mut t = translated(BASE);
    t.resources.clusters.clear();
    let snapshot = compile(&t).unwrap();
    let headers = http::HeaderMap::new();
    let route = snapshot
        .primary_http()
        .router
        .route("x", "/", &http::Method::GET, &headers)
        .unwrap();
    assert!(route.targets[0].cluster.is_none());
}

#[test]
fn endpoint_state_survives_recompilation() {
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    let compiler = compiler(&registry, &metrics);
    let t = translated(BASE);
    let first = compiler
        .build(loader(), &t.bootstrap, &t.resources)
        .unwrap();
    first.clusters["web"].endpoints[0].state.set_healthy(false);
    let second = compiler
        .build(loader(), &t.bootstrap, &t.resources)
        .unwrap();
    assert!(!second.clusters["web"].endpoints[0].state.is_healthy());
    assert!(second.clusters["web"].endpoints[1].state.is_healthy());
}

#[test]
fn unopenable_access_log_is_a_compile_error() {
    let t = translated(
        "api_gateway:\n  access_log: { enabled: true, path: /nonexistent-dir/access.log }\n",
    );
    let e = compile(&t).unwrap_err();
    assert_eq!(e.kind, "Listener");
    assert!(e.message.starts_with("access_log: cannot open"), "{e}");
}

#[test]
fn a_refused_config_does_not_change_what_plugins_may_call() {
    let loader = PluginLoader::new(None).expect("wasm engine");
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    let compiler = Compiler {
        registry: &registry,
        metrics: &metrics,
        previous_access_logs: Vec::new(),
        identity: None,
    };
    let good = translated(BASE);
    compiler
        .build(&loader, &good.bootstrap, &good.resources)
        .unwrap();
    assert!(loader.may_call("web"));
    let refused = translated(
        "api_gateway:\n  access_log: { enabled: true, path: /nonexistent-dir/access.log }\nservices:\n  other: { endpoints: [\"127.0.0.1:9\"] }\n",
    );
    compiler
        .build(&loader, &refused.bootstrap, &refused.resources)
        .unwrap_err();
    assert!(
        !loader.may_call("other"),
        "a refused config opened a cluster to plugins"
    );
    assert!(loader.may_call("web"));
}

#[test]
fn client_limits_come_from_the_hcm_with_envoy_meanings() {
    let defaults = compile(&translated(BASE)).unwrap();
    assert_eq!(
        defaults.primary_http().downstream,
        DownstreamLimits::default()
    );
    let t = translated(
        "api_gateway:\n  request_headers_timeout: 0s\n  idle_timeout: 5s\n  stream_idle_timeout: 1m\n  max_connection_duration: 1h\n  max_requests_per_connection: 7\n  max_request_headers_kb: 8\n  max_headers_count: 20\n  max_active_downstream_connections: 300\n  trust_priority_header: true\n",
    );
    let limits = compile(&t).unwrap().primary_http().downstream.clone();
    assert_eq!(
        limits.request_headers_timeout, None,
        "0s disables, as in Envoy"
    );
    assert_eq!(limits.idle_timeout, Some(Duration::from_secs(5)));
    assert_eq!(limits.stream_idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(
        limits.max_connection_duration,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(limits.max_requests_per_connection, Some(7));
    assert_eq!(limits.max_head_bytes(), 8 * 1024);
    assert_eq!(limits.max_headers_count, 20);
    assert_eq!(limits.connection_limit(), 300);
    assert!(limits.trust_priority_header);
    // What a foreign xDS server might send: out of range, or unknown keys.
    let mut resources = t.resources.clone();
    let listener = &mut resources.listeners[0];
    listener
        .metadata
        .as_mut()
        .unwrap()
        .filter_metadata
        .get_mut(names::DOWNSTREAM_METADATA)
        .unwrap()
        .fields
        .insert("max_connections".into(), Default::default());
    let e = compile(&nip_xds::translate::Translation {
        resources,
        ..t.clone()
    })
    .unwrap_err();
    assert!(e.message.contains("unknown key \"max_connections\""), "{e}");
}

/// Mutated configs must come back as errors or snapshots, never as panics: the same path
/// that will take resources from a control plane takes whatever the mutation makes.
#[test]
fn mutated_configs_never_panic_the_loader_or_compiler() {
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    let compiler = compiler(&registry, &metrics);
    let alphabet = b" :-{}[]\n\"'*/.,0123456789abcxyz_#&!|>";
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut outcomes = [0usize; 2];
    for _ in 0..3000 {
        let mut bytes = BASE.as_bytes().to_vec();
        for _ in 0..rng.usize(1..3) {
            let at = rng.usize(..bytes.len());
            match rng.u8(..3) {
                0 => bytes[at] = alphabet[rng.usize(..alphabet.len())],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, alphabet[rng.usize(..alphabet.len())]),
            }
        }
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        let result = Config::from_yaml(&text).map(|c| translate(&c));
        let compiled = result.ok().map(|t| {
            let built = compiler.build(loader(), &t.bootstrap, &t.resources);
            // One compile path: the check refuses exactly what a proxy refuses (these
            // configs name no host and no plugin a proxy could fail to reach).
            let checked = check(&t.bootstrap, &t.resources);
            // A mutated IP that became a host name is the proxy's to resolve.
            let unresolvable = built
                .as_ref()
                .is_err_and(|e| e.message.contains("cannot resolve"));
            if !unresolvable {
                assert_eq!(
                    built.as_ref().err(),
                    checked.as_ref().err(),
                    "check and build disagree on:\n{text}"
                );
            }
            built.is_ok()
        });
        outcomes[usize::from(compiled == Some(true))] += 1;
    }
    // Both outcomes occur, so the mutations exercise the compiler and the error paths.
    assert!(outcomes[0] > 100 && outcomes[1] > 50, "{outcomes:?}");
}

#[test]
fn lb_latency_travels_as_a_load_balancing_policy_with_a_fallback() {
    let t = translated(
        "services:\n  web:\n    endpoints: [\"127.0.0.1:8081\"]\n    lb: latency\n    latency: { decay: 5s }\nroutes:\n  - { service: web }\n",
    );
    let xds = &t.resources.clusters[0];
    assert_eq!(
        xds.lb_policy,
        XdsLbPolicy::LeastRequest as i32,
        "for old clients"
    );
    let policies = &xds.load_balancing_policy.as_ref().unwrap().policies;
    let names: Vec<&str> = policies
        .iter()
        .map(|p| p.typed_extension_config.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(
        names,
        [names::PEAK_EWMA_POLICY, names::LEAST_REQUEST_POLICY]
    );
    let snapshot = compile(&t).unwrap();
    assert_eq!(
        snapshot.clusters["web"].lb,
        LbPolicy::Latency(EwmaConfig {
            decay: Duration::from_secs(5),
            default_rtt: Duration::from_millis(30),
        })
    );

    // A client of this compiler that gets only policies it does not know refuses the cluster;
    // one with an unknown policy first falls back to the next.
    let mut unknown_first = t.clone();
    let list = unknown_first.resources.clusters[0]
        .load_balancing_policy
        .as_mut()
        .unwrap();
    list.policies[0]
        .typed_extension_config
        .as_mut()
        .unwrap()
        .name = "example.com/magic".into();
    assert_eq!(
        compile(&unknown_first).unwrap().clusters["web"].lb,
        LbPolicy::LeastRequest
    );
    unknown_first.resources.clusters[0]
        .load_balancing_policy
        .as_mut()
        .unwrap()
        .policies
        .truncate(1);
    let Err(error) = compile(&unknown_first) else {
        panic!("nothing supported must be an error");
    };
    assert!(
        error
            .to_string()
            .contains("none of its policies is supported"),
        "{error}"
    );

    // Bad parameters name the field.
    let mut bad = t.clone();
    let parameters = envoy_types::pb::google::protobuf::Struct {
        fields: [(
            "decay_seconds".to_string(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::NumberValue(
                    -1.0,
                )),
            },
        )]
        .into(),
    };
    bad.resources.clusters[0]
        .load_balancing_policy
        .as_mut()
        .unwrap()
        .policies[0]
        .typed_extension_config
        .as_mut()
        .unwrap()
        .typed_config = Some(envoy_types::util::pack_any(parameters));
    let Err(error) = compile(&bad) else {
        panic!("a negative decay must be an error");
    };
    assert!(error.to_string().contains("decay_seconds"), "{error}");
}

#[test]
fn outlier_detection_takes_envoy_defaults_and_refuses_nonsense() {
    let t = translated(
        "services:\n  web:\n    endpoints: [\"127.0.0.1:8081\"]\n    outlier_detection: { consecutive_gateway_errors: 2, max_ejection_percent: 50 }\nroutes:\n  - { service: web }\n",
    );
    let snapshot = compile(&t).unwrap();
    assert_eq!(
        snapshot.clusters["web"].outlier,
        Some(OutlierConfig {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 2,
            max_ejection_percent: 50,
            ..OutlierConfig::default()
        })
    );
    let mut disabled = t.clone();
    let od = disabled.resources.clusters[0]
        .outlier_detection
        .as_mut()
        .unwrap();
    od.enforcing_consecutive_5xx = Some(UInt32Value { value: 0 });
    assert_eq!(
        compile(&disabled).unwrap().clusters["web"]
            .outlier
            .unwrap()
            .consecutive_5xx,
        0
    );
    let mut bad = t.clone();
    bad.resources.clusters[0]
        .outlier_detection
        .as_mut()
        .unwrap()
        .max_ejection_percent = Some(UInt32Value { value: 150 });
    let Err(error) = compile(&bad) else {
        panic!("150 % must be refused");
    };
    assert!(
        error.to_string().contains("max_ejection_percent"),
        "{error}"
    );
    // Without the block there is no outlier detection.
    assert_eq!(
        compile(&translated(BASE)).unwrap().clusters["web"].outlier,
        None
    );
}

#[test]
fn endpoint_priorities_travel_in_eds_and_gaps_are_refused() {
    let t = translated(
        "services:\n  web:\n    endpoints:\n      - { address: \"127.0.0.1:8081\", region: eu }\n      - { address: \"127.0.0.1:8082\", region: eu, priority: 1 }\nroutes:\n  - { service: web }\n",
    );
    let priorities: Vec<u32> = t.resources.endpoints[0]
        .endpoints
        .iter()
        .map(|l| l.priority)
        .collect();
    assert_eq!(
        priorities,
        [0, 1],
        "one LocalityLbEndpoints per locality and priority"
    );
    let snapshot = compile(&t).unwrap();
    let levels: Vec<u32> = snapshot.clusters["web"]
        .endpoints
        .iter()
        .map(|e| e.priority)
        .collect();
    assert_eq!(levels, [0, 1]);
    let error = Config::from_yaml(
        "services:\n  web:\n    endpoints: [{ address: \"127.0.0.1:8081\", priority: 2 }]\n",
    )
    .expect_err("a gap");
    assert!(
        error
            .to_string()
            .contains("services.web.endpoints[0].priority"),
        "{error}"
    );
}

#[test]
fn locality_weights_travel_in_eds_and_switch_on_locality_weighting() {
    let t = translated(
        "services:\n  web:\n    endpoints:\n      - { address: \"127.0.0.1:8081\", region: eu, zone: a }\n      - { address: \"127.0.0.1:8082\", region: us }\n    locality_weights: { eu/a: 3 }\nroutes:\n  - { service: web }\n",
    );
    let weights: Vec<u32> = t.resources.endpoints[0]
        .endpoints
        .iter()
        .map(|l| l.load_balancing_weight.as_ref().unwrap().value)
        .collect();
    assert_eq!(weights, [3, 1]);
    assert!(t.resources.clusters[0].common_lb_config.is_some());
    let snapshot = compile(&t).unwrap();
    let web = &snapshot.clusters["web"];
    assert_eq!(web.endpoints[0].locality_weight, 3);
    let error = Config::from_yaml(
        "services:\n  web:\n    endpoints: [{ address: \"127.0.0.1:8081\", region: eu }]\n    locality_weights: { mars: 2 }\n",
    )
    .expect_err("unknown locality");
    assert!(
        error
            .to_string()
            .contains("services.web.locality_weights.mars"),
        "{error}"
    );
}

#[test]
fn adaptive_concurrency_travels_as_envoys_filter_config_and_survives_reloads() {
    use crate::upstream::concurrency::GradientConfig;
    let yaml = "services:\n  web:\n    endpoints: [\"127.0.0.1:8081\"]\n    adaptive_concurrency: { percentile: 90, max_limit: 200, min_rtt: 15ms, buffer: 50, status: 429 }\nroutes:\n  - { service: web }\n";
    let t = translated(yaml);
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    let compiler = compiler(&registry, &metrics);
    let first = compiler
        .build(loader(), &t.bootstrap, &t.resources)
        .unwrap();
    let adaptive = first.clusters["web"].adaptive_concurrency.as_ref().unwrap();
    assert_eq!(adaptive.status, 429);
    assert_eq!(
        *adaptive.controller.config(),
        GradientConfig {
            percentile: 90.0,
            max_limit: 200,
            buffer_percent: 50.0,
            fixed_min_rtt: Some(Duration::from_millis(15)),
            ..GradientConfig::default()
        }
    );
    // A reload with the same settings keeps the controller (and what it learned).
    let second = compiler
        .build(loader(), &t.bootstrap, &t.resources)
        .unwrap();
    assert!(Arc::ptr_eq(
        &adaptive.controller,
        &second.clusters["web"]
            .adaptive_concurrency
            .as_ref()
            .unwrap()
            .controller
    ));
    // Broken fields from another control plane are refused by name.
    let mut bad = t.clone();
    let metadata = bad.resources.clusters[0].metadata.as_mut().unwrap();
    let any = metadata
        .typed_filter_metadata
        .get_mut(names::ADAPTIVE_CONCURRENCY_METADATA)
        .unwrap();
    let mut config: envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::AdaptiveConcurrency =
        decode(any).unwrap();
    config.concurrency_limit_exceeded_status =
        Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 200 });
    *any = envoy_types::util::pack_any(config);
    let Err(error) = compile(&bad) else {
        panic!("status 200 must be refused");
    };
    assert!(
        error
            .to_string()
            .contains("nip.adaptive_concurrency.concurrency_limit_exceeded_status"),
        "{error}"
    );
    // Without the block there is none.
    assert!(compile(&translated(BASE)).unwrap().clusters["web"]
        .adaptive_concurrency
        .is_none());
}

#[test]
fn interval_outlier_detectors_carry_over_and_latency_rides_in_metadata() {
    use crate::upstream::outlier::{
        FailurePercentageDetector, LatencyDetector, SuccessRateDetector,
    };
    let t = translated(
        "services:\n  web:\n    endpoints: [\"127.0.0.1:8081\"]\n    outlier_detection: { success_rate_minimum_hosts: 3, success_rate_stdev_factor: 1.5, failure_percentage_threshold: 60, latency_factor: 4, latency_request_volume: 10 }\nroutes:\n  - { service: web }\n",
    );
    let config = compile(&t).unwrap().clusters["web"].outlier.unwrap();
    assert_eq!(
        config.success_rate,
        Some(SuccessRateDetector {
            minimum_hosts: 3,
            stdev_factor_milli: 1500,
            ..SuccessRateDetector::default()
        })
    );
    assert_eq!(
        config.failure_percentage,
        Some(FailurePercentageDetector {
            threshold_percent: 60,
            ..FailurePercentageDetector::default()
        })
    );
    assert_eq!(
        config.latency,
        Some(LatencyDetector {
            factor_milli: 4000,
            request_volume: 10,
            ..LatencyDetector::default()
        })
    );
    // enforcing_success_rate 0 switches the success-rate detector off, as in Envoy.
    let mut off = t.clone();
    off.resources.clusters[0]
        .outlier_detection
        .as_mut()
        .unwrap()
        .enforcing_success_rate = Some(UInt32Value { value: 0 });
    assert_eq!(
        compile(&off).unwrap().clusters["web"]
            .outlier
            .unwrap()
            .success_rate,
        None
    );
    // A latency factor that is not a number is refused by name.
    let mut bad = t.clone();
    bad.resources.clusters[0]
        .metadata
        .as_mut()
        .unwrap()
        .filter_metadata
        .get_mut(names::OUTLIER_LATENCY_METADATA)
        .unwrap()
        .fields
        .insert(
            "factor".into(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                    "fast".into(),
                )),
            },
        );
    let Err(error) = compile(&bad) else {
        panic!("a string factor must be refused");
    };
    assert!(
        error.to_string().contains("nip.outlier_latency.factor"),
        "{error}"
    );
}

#[test]
fn ring_hash_and_hash_policies_carry_over_and_unsupported_parts_are_named() {
    use crate::route::HashSource;
    let t = translated(
        "services:\n  web:\n    endpoints: [\"127.0.0.1:8081\", \"127.0.0.1:8082\"]\n    lb: ring_hash\n    ring_hash: { minimum_ring_size: 64 }\nroutes:\n  - service: web\n    hash_policy: [{ header: x-user }, { cookie: session, terminal: true }, { source_ip: true }]\n",
    );
    let snapshot = compile(&t).unwrap();
    assert_eq!(snapshot.clusters["web"].lb, LbPolicy::RingHash);
    let route = snapshot
        .primary_http()
        .router
        .route("x", "/", &http::Method::GET, &http::HeaderMap::new())
        .unwrap();
    let sources: Vec<(HashSource, bool)> = route
        .hash_policy
        .iter()
        .map(|p| (p.source.clone(), p.terminal))
        .collect();
    assert_eq!(
        sources,
        vec![
            (HashSource::Header(HeaderName::from_static("x-user")), false),
            (HashSource::Cookie("session".into()), true),
            (HashSource::SourceIp, false),
        ]
    );
    // Cookie generation (ttl) is Envoy's; NIP refuses it by name.
    let mut bad = t.clone();
    let Some(route::Action::Route(action)) = bad.resources.routes[0].virtual_hosts[0].routes[0]
        .action
        .as_mut()
    else {
        panic!("a route action");
    };
    if let Some(
        envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier::Cookie(
            cookie,
        ),
    ) = action.hash_policy[1].policy_specifier.as_mut()
    {
        cookie.ttl = Some(PbDuration {
            seconds: 60,
            nanos: 0,
        });
    }
    let Err(error) = compile(&bad) else {
        panic!("a cookie ttl must be refused");
    };
    assert!(
        error.to_string().contains("hash_policy[1].cookie.ttl"),
        "{error}"
    );
    // A ring larger than Envoy allows is refused.
    let mut huge = t.clone();
    if let Some(cluster::LbConfig::RingHashLbConfig(ring)) =
        huge.resources.clusters[0].lb_config.as_mut()
    {
        ring.maximum_ring_size =
            Some(envoy_types::pb::google::protobuf::UInt64Value { value: 1 << 40 });
    }
    let Err(error) = compile(&huge) else {
        panic!("a huge ring must be refused");
    };
    assert!(error.to_string().contains("ring_hash_lb_config"), "{error}");
}

#[test]
fn a_check_neither_resolves_host_names_nor_loads_plugins_but_refuses_what_the_proxy_would() {
    let yaml = r#"
services:
  web: { endpoints: ["web.invalid:8080", "web.invalid:8081"] }
plugins:
  stamp: { source: { url: "http://127.0.0.1:9/stamp.wasm", sha256: "0000000000000000000000000000000000000000000000000000000000000000" } }
routes:
  - { service: web, plugins: [stamp] }
"#;
    let t = translated(yaml);
    check(&t.bootstrap, &t.resources).expect("a check leaves hosts and modules to the proxy");
    // A proxy must reach both, so building fails on the first it cannot.
    let built = compile(&t).expect_err("a proxy cannot resolve web.invalid");
    assert!(built.message.contains("web.invalid"), "{built}");
    let resolvable = translated(&yaml.replace("web.invalid", "127.0.0.1"));
    let built = compile(&resolvable).expect_err("a proxy cannot download the module");
    assert!(built.message.contains("stamp"), "{built}");
    // The same host and port twice is refused by both (placeholders keep names apart and
    // equal names equal).
    let mut twice = translated(yaml);
    let assignment = &mut twice.resources.endpoints[0].endpoints[0];
    let first = assignment.lb_endpoints[0].clone();
    assignment.lb_endpoints.push(first);
    let checked = check(&twice.bootstrap, &twice.resources).expect_err("listed twice");
    assert!(checked.message.contains("listed twice"), "{checked}");
    // Compiling itself is pure: with nothing prepared, a host name is an error, not a
    // lookup.
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    let unprepared = compiler(&registry, &metrics)
        .compile(&Prepared::default(), &t.bootstrap, &t.resources)
        .expect_err("nothing prepared");
    assert!(
        unprepared.message.contains("was not resolved"),
        "{unprepared}"
    );
}

#[test]
fn retry_policies_carry_statuses_and_back_off_and_refuse_nonsense_by_field() {
    use envoy_types::pb::envoy::config::route::v3::{retry_policy, RetryPolicy as XdsRetry};
    let ms = |n: i32| PbDuration {
        seconds: 0,
        nanos: n * 1_000_000,
    };
    let policy = retry_policy(&XdsRetry {
        retry_on: "retriable-status-codes,connect-failure".into(),
        retriable_status_codes: vec![409, 429],
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(ms(40)),
            max_interval: None,
        }),
        ..Default::default()
    })
    .unwrap();
    assert!(policy.retries_status(429) && !policy.retries_status(503));
    assert_eq!(
        (policy.back_off.base, policy.back_off.max),
        (Duration::from_millis(40), Duration::from_millis(400)),
        "max defaults to 10 × base, as in Envoy"
    );
    let refused = |p: XdsRetry| retry_policy(&p).unwrap_err();
    assert!(refused(XdsRetry {
        retriable_status_codes: vec![99],
        ..Default::default()
    })
    .starts_with("retriable_status_codes"));
    assert!(refused(XdsRetry {
        retry_back_off: Some(retry_policy::RetryBackOff::default()),
        ..Default::default()
    })
    .contains("base_interval is required"));
    assert!(refused(XdsRetry {
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(ms(100)),
            max_interval: Some(ms(50)),
        }),
        ..Default::default()
    })
    .contains("max_interval must be at least base_interval"));
}

#[test]
fn rewrites_and_redirects_that_would_write_no_valid_path_are_refused_by_field() {
    use super::routes::{path_rewrite, redirect_action};
    use crate::matchers::PathMatch;
    use envoy_types::pb::envoy::config::route::v3::{redirect_action, RedirectAction, RouteAction};
    use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
    let prefix = PathMatch::Prefix("/old".into());
    let with_prefix = |to: &str| RouteAction {
        prefix_rewrite: to.into(),
        ..Default::default()
    };
    assert!(path_rewrite(&with_prefix("/new/"), &prefix).is_ok());
    assert_eq!(
        path_rewrite(&with_prefix("/new?x"), &prefix).unwrap_err(),
        "route.prefix_rewrite: '?' cannot appear in a path"
    );
    let with_regex = |substitution: &str| RouteAction {
        regex_rewrite: Some(RegexMatchAndSubstitute {
            pattern: Some(RegexMatcher {
                regex: "^/old/(.*)$".into(),
                ..Default::default()
            }),
            substitution: substitution.into(),
        }),
        ..Default::default()
    };
    assert!(path_rewrite(&with_regex("/new/\\1"), &prefix).is_ok());
    assert_eq!(
        path_rewrite(&with_regex("/new/\\1#top"), &prefix).unwrap_err(),
        "route.regex_rewrite: substitution: '#' cannot appear in a path"
    );
    let redirect = |to: &str| RedirectAction {
        path_rewrite_specifier: Some(redirect_action::PathRewriteSpecifier::PathRedirect(
            to.into(),
        )),
        ..Default::default()
    };
    assert!(redirect_action(&redirect("/landing?from=old"), &prefix).is_ok());
    assert!(redirect_action(&redirect("/land ing"), &prefix)
        .unwrap_err()
        .starts_with("path_redirect: \"/land ing\": ' ' cannot appear"));
}

#[test]
fn access_log_formats_other_than_the_two_nip_writes_are_refused() {
    use super::listeners::log_format;
    use envoy_types::pb::envoy::config::core::v3::{
        substitution_format_string::Format, SubstitutionFormatString,
    };
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    use nip_xds::translate::{ENVOY_DEFAULT_TEXT_FORMAT, JSON_ACCESS_LOG_FIELDS};
    let format = |format: Format| SubstitutionFormatString {
        format: Some(format),
        ..Default::default()
    };
    let json = |fields: &[(&str, &str)]| {
        Format::JsonFormat(Struct {
            fields: fields
                .iter()
                .map(|(key, command)| {
                    let value = Value {
                        kind: Some(Kind::StringValue(command.to_string())),
                    };
                    (key.to_string(), value)
                })
                .collect(),
        })
    };
    assert_eq!(
        log_format(&SubstitutionFormatString::default()),
        Ok(LogFormat::Text)
    );
    #[allow(deprecated)]
    let text = |t: &str| Format::TextFormat(t.into());
    assert_eq!(
        log_format(&format(text(ENVOY_DEFAULT_TEXT_FORMAT))),
        Ok(LogFormat::Text)
    );
    assert_eq!(
        log_format(&format(json(JSON_ACCESS_LOG_FIELDS))),
        Ok(LogFormat::Json)
    );
    assert!(log_format(&format(text("%RESPONSE_CODE%\n")))
        .unwrap_err()
        .contains("custom command strings are not supported"));
    assert!(log_format(&format(json(&[("status", "%RESPONSE_CODE%")])))
        .unwrap_err()
        .starts_with("log_format.json_format:"));
}

#[test]
fn protocol_options_of_other_extensions_are_refused_by_key() {
    use super::cluster_policies::upstream_http2;
    let cluster = XdsCluster {
        name: "c".into(),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions".to_string(),
            Any::default(),
        )]
        .into(),
        ..Default::default()
    };
    assert_eq!(
        upstream_http2(&cluster).unwrap_err(),
        "typed_extension_protocol_options[\"envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions\"]: \
         only envoy.extensions.upstreams.http.v3.HttpProtocolOptions is supported"
    );
}

#[test]
fn upstream_tls_files_are_read_when_prepared_and_bad_ones_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let yaml = format!(
        "services:\n  s: {{ endpoints: [\"127.0.0.1:9\"], tls: {{ ca_file: \"{}\", sni: api.example.com }} }}\nroutes:\n  - service: s\n",
        garbage.display()
    );
    let t = translated(&yaml);
    // A check (the control plane) does not read the proxies' files.
    assert!(check(&t.bootstrap, &t.resources).is_ok());
    let refused = compile(&t).expect_err("unreadable roots");
    assert_eq!(refused.kind, "Cluster");
    assert!(
        refused.message.contains("transport_socket: trusted_ca"),
        "{refused}"
    );
    // A transport socket NIP does not implement is named.
    let mut other = t.clone();
    other.resources.clusters[0]
        .transport_socket
        .as_mut()
        .unwrap()
        .name = "envoy.transport_sockets.alts".into();
    let refused = check(&other.bootstrap, &other.resources).expect_err("alts");
    assert!(
        refused.message.contains("only envoy.transport_sockets.tls"),
        "{refused}"
    );
}

#[test]
fn transport_socket_matches_pick_each_endpoints_transport_by_its_metadata() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
    use envoy_types::pb::envoy::config::core::v3::{Metadata, TransportSocket};
    use envoy_types::pb::google::protobuf::{value, Struct, Value};
    let yaml = "services:\n  s: { endpoints: [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"], tls: { sni: a.example } }\nroutes:\n  - service: s\n";
    let mut t = translated(yaml);
    let labels = |kind: &str| Struct {
        fields: [(
            "kind".to_string(),
            Value {
                kind: Some(value::Kind::StringValue(kind.into())),
            },
        )]
        .into(),
    };
    let cluster = &mut t.resources.clusters[0];
    let mut other = cluster.transport_socket.clone().unwrap();
    let yaml_b = yaml.replace("a.example", "b.example");
    other.config_type = translated(&yaml_b).resources.clusters[0]
        .transport_socket
        .clone()
        .unwrap()
        .config_type;
    cluster.transport_socket_matches = vec![
        TransportSocketMatch {
            name: "plain".into(),
            r#match: Some(labels("plain")),
            transport_socket: Some(TransportSocket {
                name: names::RAW_BUFFER_TRANSPORT_SOCKET.into(),
                config_type: None,
            }),
        },
        TransportSocketMatch {
            name: "other".into(),
            r#match: Some(labels("other")),
            transport_socket: Some(other),
        },
    ];
    let endpoints = &mut t.resources.endpoints[0].endpoints[0].lb_endpoints;
    for (endpoint, kind) in endpoints.iter_mut().zip(["plain", "other"]) {
        endpoint.metadata = Some(Metadata {
            filter_metadata: [(names::TRANSPORT_SOCKET_MATCH_METADATA.into(), labels(kind))].into(),
            ..Default::default()
        });
    }
    let snapshot = compile(&t).expect("compiles");
    let sni = |i: usize| {
        snapshot.clusters["s"].endpoints[i]
            .tls
            .as_ref()
            .map(|tls| tls.settings.sni.clone().unwrap_or_default())
    };
    assert_eq!(sni(0), None, "raw buffer: plaintext");
    assert_eq!(sni(1).as_deref(), Some("b.example"), "the matching entry");
    assert_eq!(
        sni(2).as_deref(),
        Some("a.example"),
        "no match: the cluster's own"
    );
    // A transport socket NIP does not run is named with its entry.
    t.resources.clusters[0].transport_socket_matches[0]
        .transport_socket
        .as_mut()
        .unwrap()
        .name = "envoy.transport_sockets.alts".into();
    let refused = check(&t.bootstrap, &t.resources).expect_err("alts");
    assert!(
        refused
            .message
            .contains("transport_socket_matches[0] \"plain\""),
        "{refused}"
    );
}

#[test]
fn mesh_tls_needs_the_workload_identity_and_the_pushed_bundle_and_says_which_is_missing() {
    let yaml = "api_gateway: { address: \"127.0.0.1:8443\", tls: { mesh: true } }\nservices:\n  s: { endpoints: [\"127.0.0.1:1\"], tls: { mesh: true } }\nroutes:\n  - service: s\n";
    let mut t = translated(yaml);
    // The control plane's check does not need the proxies' secrets.
    assert!(check(&t.bootstrap, &t.resources).is_ok());
    let refused = compile(&t).expect_err("no trust bundle");
    assert!(
        refused
            .message
            .contains("secret \"ROOTCA\" was not received over SDS"),
        "{refused}"
    );
    let root = rcgen::generate_simple_self_signed(vec!["root.example".to_string()]).unwrap();
    t.resources
        .secrets
        .push(nip_xds::secrets::trust_bundle(&root.cert.pem()));
    let refused = compile(&t).expect_err("no workload identity");
    assert_eq!(refused.kind, "Cluster", "{refused}");
    assert!(
        refused
            .message
            .contains("secret \"default\" is the proxy's workload certificate"),
        "{refused}"
    );
    // A bundle that holds no certificate is refused for the listener too.
    t.resources.clusters.clear();
    t.resources.endpoints.clear();
    t.resources.routes[0].virtual_hosts[0].routes.clear();
    t.resources.secrets = vec![nip_xds::secrets::trust_bundle("not PEM")];
    let refused = compile(&t).expect_err("roots that verify nothing");
    assert_eq!(refused.kind, "Listener", "{refused}");
    assert!(
        refused
            .message
            .contains("secret \"ROOTCA\": no certificate"),
        "{refused}"
    );
}

#[test]
fn an_original_destination_service_is_an_original_dst_cluster_and_nothing_else_is() {
    let t = translated(
        "services:\n  passthrough: { original_destination: true }\nroutes:\n  - service: passthrough\n",
    );
    assert!(t.resources.endpoints.is_empty(), "no endpoints of its own");
    let snapshot = compile(&t).expect("compiles");
    let cluster = &snapshot.clusters["passthrough"];
    assert!(cluster.original_destination && cluster.endpoints.is_empty());
    // CLUSTER_PROVIDED belongs to ORIGINAL_DST only, and the other way round.
    let mut other =
        translated("services:\n  s: { endpoints: [\"127.0.0.1:1\"] }\nroutes:\n  - service: s\n");
    other.resources.clusters[0].lb_policy =
        envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy::ClusterProvided as i32;
    let refused = check(&other.bootstrap, &other.resources).expect_err("not ORIGINAL_DST");
    assert!(refused.message.contains("CLUSTER_PROVIDED"), "{refused}");
    let invalid = nip_xds::config::Config::from_yaml(
        "services:\n  p: { original_destination: true, endpoints: [\"127.0.0.1:1\"] }\nroutes:\n  - service: p\n",
    )
    .expect_err("endpoints too");
    assert!(
        invalid.to_string().contains("services.p.endpoints"),
        "{invalid}"
    );
}

#[test]
fn connect_routes_terminate_here_and_anything_else_is_refused_by_name() {
    use envoy_types::pb::envoy::config::route::v3::route::Action;
    let yaml = "services:\n  db: { endpoints: [\"127.0.0.1:5432\"] }\nroutes:\n  - { name: tunnel, match: { connect: true, host: db.internal }, service: db }\n";
    let t = translated(yaml);
    let snapshot = compile(&t).expect("compiles");
    assert!(snapshot.primary_http().allow_connect);
    let headers = http::HeaderMap::new();
    let router = &snapshot.primary_http().router;
    assert!(router
        .route("db.internal:5432", "", &http::Method::CONNECT, &headers)
        .is_some());
    // A CONNECT route never takes other requests, nor another route CONNECT.
    assert!(router
        .route("db.internal", "/", &http::Method::GET, &headers)
        .is_none());

    fn route_action(t: &mut nip_xds::translate::Translation) -> &mut RouteAction {
        let route = t.resources.routes[0]
            .virtual_hosts
            .iter_mut()
            .flat_map(|v| v.routes.iter_mut())
            .find(|r| r.name == "tunnel")
            .unwrap();
        match route.action.as_mut().unwrap() {
            Action::Route(action) => action,
            _ => panic!("a route action"),
        }
    }
    let mut forwarding = translated(yaml);
    route_action(&mut forwarding).upgrade_configs[0].connect_config = None;
    let e = compile(&forwarding).unwrap_err().to_string();
    assert!(
        e.contains("forwarding CONNECT to an upstream proxy is not supported"),
        "{e}"
    );
    let mut other = translated(yaml);
    route_action(&mut other).upgrade_configs[0].upgrade_type = "h2c".into();
    let e = compile(&other).unwrap_err().to_string();
    assert!(e.contains("upgrade type \"h2c\" is not supported"), "{e}");
}

#[test]
fn the_tenant_filter_runs_after_jwt_authn_and_before_rbac_and_its_config_is_checked() {
    use crate::policy::ratelimit::DescriptorAction;
    use crate::policy::tenant::TenantKey;
    use crate::policy::PolicyFilter;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    let t = translated(
        r#"
tenants:
  acme: { priority: high, resource_quota: { message_rate: "5/sec" } }
  globex: {}
tenant_key: { header: X-Tenant }
auth:
  jwt_providers:
    idp: { issuer: "https://idp.example", jwks: '{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}' }
  rbac:
    policies:
      acme-only: { permissions: [{ any: true }], principals: [{ tenant: acme }] }
services:
  web: { endpoints: ["127.0.0.1:8081"] }
routes:
  - { name: shared, service: web }
"#,
    );
    let snapshot = compile(&t).unwrap();
    let manager = snapshot.primary_http();
    let kinds: Vec<&str> = manager
        .policy
        .iter()
        .map(|f| match f {
            PolicyFilter::Jwt(_) => "jwt_authn",
            PolicyFilter::Tenant(_) => "nip.tenant",
            PolicyFilter::Rbac(_) => "rbac",
            PolicyFilter::LocalRateLimit { .. } => "local_ratelimit",
            PolicyFilter::ExtAuthz(_) => "ext_authz",
            PolicyFilter::GlobalRateLimit(_) => "ratelimit",
        })
        .collect();
    assert_eq!(
        kinds,
        ["jwt_authn", "nip.tenant", "rbac", "local_ratelimit"]
    );
    let PolicyFilter::Tenant(identity) = &manager.policy[1] else {
        unreachable!()
    };
    assert!(matches!(&identity.key, TenantKey::Header(h) if h == "x-tenant"));
    assert_eq!(
        identity.tenants["acme"].priority,
        Some(crate::upstream::concurrency::Priority::High)
    );
    assert_eq!(identity.tenants["globex"].priority, None);
    let route = manager
        .router
        .route("any", "/", &http::Method::GET, &http::HeaderMap::new())
        .unwrap();
    assert!(matches!(
        route.policy.rate_limit_rules.as_slice(),
        [rule] if matches!(rule.as_slice(), [DescriptorAction::Tenant { key }] if key == "tenant")
    ));

    // What another xDS server might send instead.
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let object = |fields: Vec<(&str, Value)>| Value {
        kind: Some(Kind::StructValue(Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })),
    };
    let tenants = |settings: Value| ("tenants", object(vec![("acme", settings)]));
    let cases = [
        (
            vec![
                ("header", text("x-t")),
                ("claim", text("org")),
                tenants(object(vec![])),
            ],
            "set exactly one of header, claim, certificate: true",
        ),
        (
            vec![("header", text("x t")), tenants(object(vec![]))],
            "header \"x t\" is not a header name",
        ),
        (
            vec![("claim", text("org..id")), tenants(object(vec![]))],
            "claim \"org..id\" is not a claim path",
        ),
        (
            vec![("header", text("x-t"))],
            "tenants must map at least one",
        ),
        (
            vec![
                ("header", text("x-t")),
                tenants(object(vec![("priority", text("urgent"))])),
            ],
            "tenants.acme.priority \"urgent\" is not low, normal or high",
        ),
        (
            vec![
                ("header", text("x-t")),
                tenants(object(vec![("quota", text("1"))])),
            ],
            "tenants.acme.\"quota\" is not a field",
        ),
        (
            vec![
                (
                    "certificate",
                    Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                ),
                tenants(object(vec![])),
            ],
            "certificate: true needs principals on at least one tenant",
        ),
        (
            vec![
                (
                    "certificate",
                    Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                ),
                tenants(object(vec![(
                    "principals",
                    Value {
                        kind: Some(Kind::ListValue(
                            envoy_types::pb::google::protobuf::ListValue {
                                values: vec![text("*")],
                            },
                        )),
                    },
                )])),
            ],
            "tenants.acme.principals[0] \"*\" would match every certificate",
        ),
    ];
    for (fields, expected) in cases {
        let e = compile_with_manager(&t, |hcm| {
            let tenant = hcm
                .http_filters
                .iter_mut()
                .find(|f| f.name == names::TENANT_FILTER)
                .unwrap();
            tenant.config_type = Some(http_filter::ConfigType::TypedConfig(
                envoy_types::util::pack_any(Struct {
                    fields: fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                }),
            ));
        })
        .unwrap_err();
        assert!(e.message.contains(expected), "{expected:?} in {e}");
    }
}

#[test]
fn ext_proc_filters_compile_with_their_modes_and_refuse_what_nip_cannot_do() {
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
        processing_mode::{BodySendMode, HeaderSendMode},
        ExtProcHttpService, ExternalProcessor,
    };
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
    let t = translated(
        r#"
services:
  web: { endpoints: ["127.0.0.1:8081"] }
  processor: { endpoints: ["127.0.0.1:9100"], protocol: http2 }
plugins:
  shout:
    isolation: process
    process: { service: processor, responses: true, timeout: 300ms }
    config: { mood: loud }
  flow:
    isolation: process
    process: { service: processor, responses: true, body_mode: streamed, trailers: true }
routes:
  - { name: flowing, match: { path_prefix: /flow }, service: web, plugins: [flow] }
  - { name: shouted, service: web, plugins: [shout] }
  - { name: quiet, service: web }
"#,
    );
    let snapshot = compile(&t).unwrap();
    let router = &snapshot.primary_http().router;
    let route = |path: &str| {
        router
            .route("any", path, &http::Method::GET, &http::HeaderMap::new())
            .unwrap()
            .clone()
    };
    let shouted = route("/");
    assert_eq!(shouted.processors.len(), 1);
    let processor = &shouted.processors[0];
    assert_eq!(processor.cluster, "processor");
    assert_eq!(processor.timeout, Duration::from_millis(300));
    assert!(!processor.failure_mode_allow);
    assert_eq!(
        processor.mode,
        crate::ext_proc::ProcessingMode {
            request_headers: true,
            response_headers: true,
            request_body: crate::ext_proc::BodyMode::Buffered,
            response_body: crate::ext_proc::BodyMode::Buffered,
            response_trailers: false,
        }
    );
    assert_eq!(
        route("/flow").processors[0].mode,
        crate::ext_proc::ProcessingMode {
            request_headers: true,
            response_headers: true,
            request_body: crate::ext_proc::BodyMode::Streamed,
            response_body: crate::ext_proc::BodyMode::Streamed,
            response_trailers: true,
        }
    );
    assert!(processor.initial_metadata.contains(&(
        "x-nip-plugin-config".to_string(),
        r#"{"mood":"loud"}"#.to_string()
    )));
    assert!(processor.attributes.iter().any(|a| a == "nip.tenant"));

    // What another xDS server might send instead.
    let mutate = |change: &dyn Fn(&mut ExternalProcessor)| {
        compile_with_manager(&t, |hcm| {
            let filter = hcm
                .http_filters
                .iter_mut()
                .find(|f| f.name == names::plugin_filter("shout"))
                .unwrap();
            let Some(http_filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
                panic!("typed");
            };
            let mut processor = ExternalProcessor::decode(any.value.as_slice()).unwrap();
            change(&mut processor);
            filter.config_type = Some(http_filter::ConfigType::TypedConfig(
                envoy_types::util::pack_any(processor),
            ));
        })
        .map(drop)
        .unwrap_err()
        .message
    };
    type Change = Box<dyn Fn(&mut ExternalProcessor)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|p| p.http_service = Some(ExtProcHttpService::default())),
            "http_service is not supported",
        ),
        (
            Box::new(|p| {
                p.processing_mode.as_mut().unwrap().request_body_mode =
                    BodySendMode::BufferedPartial as i32
            }),
            "request_body_mode: BUFFERED_PARTIAL is not supported",
        ),
        (
            Box::new(|p| {
                p.processing_mode.as_mut().unwrap().request_trailer_mode =
                    HeaderSendMode::Send as i32
            }),
            "request_trailer_mode: SEND is not supported",
        ),
        (
            Box::new(|p| p.observability_mode = true),
            "observability_mode is not supported",
        ),
        (
            Box::new(|p| {
                use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
                if let Some(TargetSpecifier::EnvoyGrpc(g)) = p
                    .grpc_service
                    .as_mut()
                    .and_then(|g| g.target_specifier.as_mut())
                {
                    g.cluster_name = "nowhere".into();
                }
            }),
            "cluster_name \"nowhere\" is not a cluster",
        ),
        (
            Box::new(|p| {
                p.mutation_rules = Some(
                    envoy_types::pb::envoy::config::common::mutation_rules::v3::HeaderMutationRules {
                        allow_expression: Some(
                            envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                                regex: "x-(".into(),
                                ..Default::default()
                            },
                        ),
                        ..Default::default()
                    },
                )
            }),
            "mutation_rules.allow_expression.regex \"x-(\"",
        ),
    ];
    for (change, expected) in cases {
        let message = mutate(&*change);
        assert!(message.contains(expected), "{expected:?} in {message}");
    }
}

#[test]
fn tracing_compiles_from_envoys_fields_and_refuses_what_nip_does_not_do() {
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    use envoy_types::pb::envoy::config::trace::v3::{tracing::http::ConfigType, OpenTelemetryConfig};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as XdsTracing;
    let t = translated(
        r#"
tracing: { address: "127.0.0.1:4317", random_sampling: 20, spawn_upstream_span: false, max_path_tag_length: 64 }
services:
  web: { endpoints: ["127.0.0.1:8081"] }
  secure: { endpoints: ["127.0.0.1:8443"], tls: { sni: a.example } }
routes:
  - { service: web }
"#,
    );
    let snapshot = compile(&t).unwrap();
    let tracing = snapshot.primary_http().tracing.as_ref().expect("traced");
    assert!((tracing.sampling - 0.2).abs() < 1e-9);
    assert!(tracing.parent_based && !tracing.errors && !tracing.upstream_spans);
    assert_eq!(tracing.max_path_length, 64);

    let refusal = |change: &dyn Fn(&mut XdsTracing, &mut OpenTelemetryConfig)| {
        compile_with_manager(&t, |hcm| {
            let tracing = hcm.tracing.as_mut().unwrap();
            let Some(ConfigType::TypedConfig(any)) = tracing
                .provider
                .as_ref()
                .and_then(|p| p.config_type.clone())
            else {
                panic!("typed");
            };
            let mut otel = OpenTelemetryConfig::decode(any.value.as_slice()).unwrap();
            change(tracing, &mut otel);
            tracing.provider.as_mut().unwrap().config_type =
                Some(ConfigType::TypedConfig(envoy_types::util::pack_any(otel)));
        })
        .map(drop)
        .unwrap_err()
        .message
    };
    type Change = Box<dyn Fn(&mut XdsTracing, &mut OpenTelemetryConfig)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|t, _| {
                t.client_sampling = Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 1.0 })
            }),
            "tracing.client_sampling is not supported",
        ),
        (
            Box::new(|t, _| {
                t.random_sampling =
                    Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 120.0 })
            }),
            "random_sampling: 120 is not a percentage",
        ),
        (
            Box::new(|_, o| o.http_service = Some(Default::default())),
            "grpc_service and http_service are both set",
        ),
        (
            Box::new(|_, o| {
                if let Some(TargetSpecifier::EnvoyGrpc(g)) = o
                    .grpc_service
                    .as_mut()
                    .and_then(|g| g.target_specifier.as_mut())
                {
                    g.cluster_name = "secure".into();
                }
            }),
            "\"secure\": the cluster uses TLS",
        ),
        (
            Box::new(|_, o| o.sampler = Some(Default::default())),
            "sampler is not supported",
        ),
    ];
    for (change, expected) in cases {
        let message = refusal(&*change);
        assert!(message.contains(expected), "{expected:?} in {message}");
    }
}
