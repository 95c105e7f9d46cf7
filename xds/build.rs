//! Compiles the descriptors of the xDS resources NIP reads and writes, from the `.proto`
//! files that ship inside the `envoy-types` crate, so `/config_dump` can print resources as
//! proto3 JSON the way Envoy does. Pure Rust (protox): no protoc needed.

use std::path::{Path, PathBuf};

const ROOTS: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/http/wasm/v3/wasm.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
];

fn envoy_types_proto_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("NIP_ENVOY_PROTO_DIR") {
        return Some(PathBuf::from(dir));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let mut candidates = Vec::new();
    for registry in std::fs::read_dir(cargo_home.join("registry/src"))
        .ok()?
        .flatten()
    {
        for krate in std::fs::read_dir(registry.path()).ok()?.flatten() {
            let name = krate.file_name().to_string_lossy().to_string();
            if name.starts_with("envoy-types-0.7.") && krate.path().join("proto").is_dir() {
                candidates.push(krate.path().join("proto"));
            }
        }
    }
    candidates.sort();
    candidates.pop()
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NIP_ENVOY_PROTO_DIR");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = out.join("xds_descriptors.bin");
    let Some(dir) = envoy_types_proto_dir() else {
        println!("cargo:warning=envoy-types .proto files not found: /config_dump will show resources without field names; set NIP_ENVOY_PROTO_DIR");
        std::fs::write(&target, []).expect("write empty descriptor set");
        return;
    };
    let includes: Vec<PathBuf> = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec",
        "opentelemetry-proto",
        "client_model",
    ]
    .iter()
    .map(|d| dir.join(d))
    .filter(|d| d.is_dir())
    .collect();
    let descriptors = protox::compile(ROOTS, &includes)
        .unwrap_or_else(|e| panic!("compiling xDS descriptors from {}: {e}", dir.display()));
    use protox::prost::Message;
    std::fs::write(&target, descriptors.encode_to_vec()).expect("write descriptor set");
}
