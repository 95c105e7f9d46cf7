//! # nip-fuzz-entries: the fuzz targets' bodies
//!
//! Each function takes arbitrary bytes and drives one parser or decoder of NIP the way
//! hostile input reaches it. None may panic, hang or allocate without bound; each checks
//! the properties that must hold (a header map round-trips, a refused document names why).
//!
//! ```text
//! fuzz/targets/fuzz_targets/NAME.rs (cargo fuzz) ──▶ nip_fuzz_entries::NAME(bytes)
//! fuzz/entries/tests/corpus.rs (cargo test)     ──▶ the same, over fuzz/corpus/NAME/*
//! ```
//!
//! This crate may hold only glue: no logic of its own that the product does not run.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use nip_proxy::compile::Compiler;
use nip_proxy::plugins::PluginLoader;
use nip_proxy::telemetry::metrics::Metrics;
use nip_proxy::upstream::registry::EndpointRegistry;
use nip_xds::config::Config;
use nip_xds::resources::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE};
use nip_xds::translate::{translate, Translation};
use prost::Message;
use std::sync::OnceLock;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (each has `fuzz/targets/fuzz_targets/NAME.rs` and
/// `fuzz/corpus/NAME/`).
pub const TARGETS: [(&str, Target); 5] = [
    ("config_yaml", config_yaml),
    ("xds_response", xds_response),
    ("header_map", header_map),
    ("api_body", api_body),
    ("host_calls", host_calls),
];

/// The v4 YAML loader and translator (what `nip proxy --config` and `nip validate` run).
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_yaml(text) {
        Ok(config) => {
            let _ = translate(&config);
        }
        Err(e) => assert!(!e.to_string().is_empty(), "a refusal says why"),
    }
}

/// A config that compiles, whose resources an arbitrary `DiscoveryResponse` replaces one
/// type of.
const BASELINE: &str = r#"
services:
  web:
    endpoints: ["127.0.0.1:8081", { address: "127.0.0.1:8082", region: eu, weight: 3 }]
    health_check: { path: /hz, interval: 1s, timeout: 100ms }
  ring: { endpoints: ["127.0.0.1:8083"], lb: ring_hash }
routes:
  - { match: { path_prefix: /r }, service: ring, hash_policy: [{ header: x-user }] }
  - { service: web, timeout: 1s, retries: { on: [5xx], max: 2 } }
"#;

struct CompileContext {
    baseline: Translation,
    registry: EndpointRegistry,
    metrics: Metrics,
    plugins: PluginLoader,
}

fn context() -> &'static CompileContext {
    static CONTEXT: OnceLock<CompileContext> = OnceLock::new();
    CONTEXT.get_or_init(|| CompileContext {
        baseline: translate(&Config::from_yaml(BASELINE).expect("the baseline config is valid")),
        registry: EndpointRegistry::default(),
        metrics: Metrics::new(),
        plugins: PluginLoader::new(None).expect("a wasm engine"),
    })
}

/// The proxy's compiler fed what an xDS server sends: a `DiscoveryResponse` whose
/// resources replace those of its type in a working set, decoded and compiled as the ADS
/// client does. Host names are not resolved and plugin URLs not fetched here (the
/// compiler would do both; they are not parsers).
pub fn xds_response(data: &[u8]) {
    let Ok(response) = DiscoveryResponse::decode(data) else {
        return;
    };
    let context = context();
    let mut resources = context.baseline.resources.clone();
    fn decode_all<M: Message + Default>(response: &DiscoveryResponse) -> Option<Vec<M>> {
        response
            .resources
            .iter()
            .map(|any| M::decode(any.value.as_slice()).ok())
            .collect()
    }
    let replaced = match response.type_url.as_str() {
        LISTENER_TYPE => decode_all::<Listener>(&response).map(|l| resources.listeners = l),
        ROUTE_TYPE => decode_all::<RouteConfiguration>(&response).map(|r| resources.routes = r),
        CLUSTER_TYPE => decode_all::<Cluster>(&response).map(|c| resources.clusters = c),
        ENDPOINT_TYPE => {
            decode_all::<ClusterLoadAssignment>(&response).map(|e| resources.endpoints = e)
        }
        SECRET_TYPE => decode_all::<Secret>(&response).map(|s| resources.secrets = s),
        _ => None,
    };
    if replaced.is_none() || reaches_outside(&resources) {
        return;
    }
    resources.version = resources.content_version();
    let compiler = Compiler {
        registry: &context.registry,
        metrics: &context.metrics,
        previous_access_logs: Vec::new(),
        identity: None,
    };
    if let Err(e) = compiler.build(&context.plugins, &context.baseline.bootstrap, &resources) {
        assert!(!e.to_string().is_empty(), "a NACK says why");
    }
}

/// Whether compiling would resolve a host name, download a plugin or open a file: slow
/// or side effects, not parsing.
fn reaches_outside(resources: &nip_xds::ResourceSet) -> bool {
    let text = format!("{resources:?}");
    text.contains("Filename(") || text.contains("HttpUri") || {
        let hostnames = resources
            .clusters
            .iter()
            .map(|c| format!("{c:?}"))
            .chain(resources.endpoints.iter().map(|e| format!("{e:?}")))
            .chain(resources.listeners.iter().map(|l| format!("{l:?}")));
        hostnames.into_iter().any(|t| {
            t.split("address: \"").skip(1).any(|rest| {
                let host = rest.split('"').next().unwrap_or("");
                host.parse::<std::net::IpAddr>().is_err()
            })
        })
    }
}

/// The proxy-wasm header-map codec: whatever decodes encodes back to the same bytes'
/// meaning.
pub fn header_map(data: &[u8]) {
    use nip_filters::abi::{decode_pairs, encode_pairs, encoded_len};
    let Ok(pairs) = decode_pairs(data) else {
        return;
    };
    let view = || pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let encoded = encode_pairs(view());
    assert_eq!(encoded.len(), encoded_len(view()));
    assert_eq!(decode_pairs(&encoded).ok().as_ref(), Some(&pairs));
}

/// The control plane's apply/validate body handling: the first byte picks the content
/// type (JSON or YAML), the rest is the body.
pub fn api_body(data: &[u8]) {
    let Some((first, body)) = data.split_first() else {
        return;
    };
    let content_type = if first % 2 == 0 {
        "application/json"
    } else {
        "application/yaml"
    };
    if let Err(status) = nip_control_plane::api::check_body(content_type, body) {
        assert!(
            (400..500).contains(&status),
            "a refused body is the client's error"
        );
    }
}

/// The host-call guest (`guest.wat`): it runs its request body as a program of host calls
/// with arbitrary arguments.
const GUEST: &str = include_str!("guest.wat");

thread_local! {
    static GUEST_INSTANCE: std::cell::RefCell<Option<nip_filters::PluginInstance>> =
        const { std::cell::RefCell::new(None) };
}

fn guest_module() -> &'static nip_filters::PluginModule {
    static MODULE: OnceLock<nip_filters::PluginModule> = OnceLock::new();
    MODULE.get_or_init(|| {
        let engine = nip_filters::PluginEngine::new(None).expect("a wasm engine");
        nip_filters::PluginModule::compile(
            &engine,
            nip_filters::host::PluginIdentity {
                name: "host-calls".into(),
                ..Default::default()
            },
            nip_filters::host::NodeInfo::default(),
            nip_filters::PluginLimits::default(),
            GUEST.as_bytes(),
        )
        .expect("the host-call guest compiles")
    })
}

/// The proxy-wasm host (header maps, buffers, properties, local replies, shared data and
/// queues, HTTP calls, logs, ticks) called by a plugin with arguments it chose: every
/// call returns a status or traps the instance, never takes the host down; the request
/// state stays well-formed.
pub fn host_calls(data: &[u8]) {
    use nip_filters::host::{Headers, HttpState};
    GUEST_INSTANCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let instance = slot.get_or_insert_with(|| {
            nip_filters::PluginInstance::start(guest_module()).expect("the host-call guest starts")
        });
        let mut http = HttpState {
            request_headers: Headers::from_pairs(vec![
                (":method".into(), "POST".into()),
                (":path".into(), "/fuzz".into()),
                (":authority".into(), "example.com".into()),
                ("x-a".into(), "1".into()),
            ]),
            request_body: data.to_vec().into(),
            ..Default::default()
        };
        let outcome = instance.create_http_context().and_then(|ctx| {
            instance.on_request_body(ctx, &mut http, true)?;
            instance.finish_http_context(ctx, &mut http)
        });
        if outcome.is_err() {
            // A trap ends the instance, as the proxy would replace it.
            *slot = None;
        }
        // Whatever the plugin made of the headers is still a map the ABI can carry.
        let pairs = http.request_headers.pairs();
        let encoded =
            nip_filters::abi::encode_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
        let decoded = nip_filters::abi::decode_pairs(&encoded).expect("an encodable map");
        assert_eq!(decoded.len(), pairs.len());
    });
}
