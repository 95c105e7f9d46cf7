//! Replays every fuzz target's in-tree corpus (inputs found by `./dev fuzz`, findings
//! included) through the target's function: seconds, on every `cargo test`.

use std::path::Path;

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    for (name, target) in nip_fuzz_entries::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: the corpus is empty");
        for input in inputs {
            let bytes = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name}: {} panicked", input.display());
        }
    }
}

/// Writes the seed inputs of each corpus from NIP's own encoders (run once, by hand:
/// `cargo test -p nip-fuzz-entries -- --ignored write_seeds`); findings are added beside.
#[test]
#[ignore]
fn write_seeds() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;
    use nip_xds::resources::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
    use prost::{Message, Name};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let config = r#"
api_gateway:
  address: "127.0.0.1:8080"
  request_headers_timeout: 5s
  idle_timeout: 30s
  max_request_headers_kb: 32
  max_active_downstream_connections: 1000
services:
  web:
    endpoints: ["127.0.0.1:8081", { address: "127.0.0.1:8082", region: eu, weight: 3 }]
    lb: latency
    circuit_breakers: { max_requests: 100 }
routes:
  - name: api
    match: { host: "*.example.com", path_regex: "/v[0-9]+", headers: [{ name: x-a, exact: "1" }] }
    service: web
    timeout: 250ms
    retries: { on: [connect-failure, 5xx], max: 3 }
"#;
    write("config_yaml", "seed-full", config.as_bytes());
    write(
        "config_yaml",
        "seed-deep-flow",
        format!("a: {}", "[".repeat(100)).as_bytes(),
    );
    write(
        "config_yaml",
        "seed-deep-block",
        "- ".repeat(100).as_bytes(),
    );
    write(
        "config_yaml",
        "seed-bad-field",
        b"api_gateway: { adress: x }\n",
    );
    write(
        "api_body",
        "seed-yaml",
        &[b"\x01".as_slice(), config.as_bytes()].concat(),
    );
    let json = serde_json_string(config);
    write(
        "api_body",
        "seed-json",
        &[b"\x00".as_slice(), json.as_bytes()].concat(),
    );
    let translation =
        nip_xds::translate::translate(&nip_xds::config::Config::from_yaml(config).unwrap());
    let resources = &translation.resources;
    fn response<M: Message + Name>(type_url: &str, items: &[M]) -> Vec<u8> {
        DiscoveryResponse {
            version_info: "1".into(),
            type_url: type_url.into(),
            nonce: "1".into(),
            resources: items
                .iter()
                .map(|m| Any {
                    type_url: M::type_url(),
                    value: m.encode_to_vec(),
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec()
    }
    write(
        "xds_response",
        "seed-lds",
        &response(LISTENER_TYPE, &resources.listeners),
    );
    write(
        "xds_response",
        "seed-rds",
        &response(ROUTE_TYPE, &resources.routes),
    );
    write(
        "xds_response",
        "seed-cds",
        &response(CLUSTER_TYPE, &resources.clusters),
    );
    write(
        "xds_response",
        "seed-eds",
        &response(ENDPOINT_TYPE, &resources.endpoints),
    );
    let pairs: [(&str, &[u8]); 3] = [(":method", b"GET"), (":path", b"/"), ("x-a", b"1")];
    write(
        "header_map",
        "seed-request",
        &nip_filters::abi::encode_pairs(pairs),
    );
    write(
        "header_map",
        "seed-empty",
        &nip_filters::abi::encode_pairs(std::iter::empty::<(&str, &[u8])>()),
    );
    write("header_map", "seed-truncated", &[3, 0, 0, 0, 200, 0, 0, 0]);
    // host_calls: one record per host function, with small in-bounds arguments, and one
    // with hostile ones.
    let record = |op: u8, args: [i32; 10]| {
        let mut bytes = vec![op];
        for arg in args {
            bytes.extend_from_slice(&arg.to_le_bytes());
        }
        bytes
    };
    let gentle: Vec<u8> = (0..25u8)
        .flat_map(|op| record(op, [0, 8, 4, 16, 4, 24, 4, 0, 100, 32]))
        .collect();
    write("host_calls", "seed-every-call", &gentle);
    let hostile: Vec<u8> = (0..25u8)
        .flat_map(|op| {
            record(
                op,
                [-1, i32::MAX, i32::MIN, 65535, 131071, -8, 1 << 30, 7, 0, -1],
            )
        })
        .collect();
    write("host_calls", "seed-hostile", &hostile);
}

/// `{"yaml": TEXT, "message": "seed"}` without a JSON dependency.
fn serde_json_string(yaml: &str) -> String {
    let escaped: String = yaml
        .chars()
        .map(|c| match c {
            '"' => "\\\"".to_string(),
            '\\' => "\\\\".to_string(),
            '\n' => "\\n".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!("{{\"yaml\": \"{escaped}\", \"message\": \"seed\"}}")
}
