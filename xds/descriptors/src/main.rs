//! Regenerates `xds/generated/`: the descriptors of the xDS resources NIP reads and writes,
//! compiled from the `.proto` files that ship inside the `envoy-types` crate (so
//! `/config_dump` can print resources as proto3 JSON the way Envoy does), and the message
//! schema table `nip_xds::schema` walks. Pure Rust (protox): no protoc needed.
//!
//! Run it after adding a resource type to ROOTS (or moving to a new envoy-types):
//!   cargo run --manifest-path xds/descriptors/Cargo.toml
//! It is a crate of its own so that building NIP never compiles protox and its parser
//! stack (what the generated files save every cold build).

use std::path::{Path, PathBuf};

const ROOTS: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/http/local_ratelimit/v3/local_rate_limit.proto",
    "envoy/extensions/filters/http/jwt_authn/v3/config.proto",
    "envoy/extensions/filters/http/rbac/v3/rbac.proto",
    "envoy/extensions/filters/http/ext_authz/v3/ext_authz.proto",
    "envoy/extensions/filters/http/ratelimit/v3/rate_limit.proto",
    "envoy/extensions/path/match/uri_template/v3/uri_template_match.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/http/wasm/v3/wasm.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/config/trace/v3/opentelemetry.proto",
    "envoy/extensions/filters/http/adaptive_concurrency/v3/adaptive_concurrency.proto",
    "envoy/extensions/filters/http/ext_proc/v3/ext_proc.proto",
    "envoy/extensions/load_balancing_policies/least_request/v3/least_request.proto",
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
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../generated");
    let Some(dir) = envoy_types_proto_dir() else {
        eprintln!("envoy-types .proto files not found (fetch the crate: cargo fetch, or set NIP_ENVOY_PROTO_DIR)");
        std::process::exit(1);
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
    let descriptors = match protox::compile(ROOTS, &includes) {
        Ok(descriptors) => descriptors,
        Err(e) => {
            eprintln!("compiling xDS descriptors from {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    use protox::prost::Message;
    let write = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        if let Err(e) = std::fs::write(&path, bytes) {
            eprintln!("cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
        println!("wrote {}", path.display());
    };
    write("xds_descriptors.bin", &descriptors.encode_to_vec());
    write("message_schemas.rs", schemas(&descriptors).as_bytes());
}

/// The field names, numbers and message types of every message, as a static table
/// (`nip_xds::schema`): enough to walk an encoded resource field by field without a
/// descriptor pool in memory.
fn schemas(set: &prost_types::FileDescriptorSet) -> String {
    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::DescriptorProto;
    /// (number, name, message type, repeated)
    type Field = (i32, String, String, bool);
    /// (full name, map entry, fields)
    type Row = (String, bool, Vec<Field>);
    fn visit(prefix: &str, message: &DescriptorProto, rows: &mut Vec<Row>) {
        let name = format!("{prefix}.{}", message.name());
        let map_entry = message.options.as_ref().is_some_and(|o| o.map_entry());
        let fields = message
            .field
            .iter()
            .map(|f| {
                let nested = if f.r#type() == Type::Message {
                    f.type_name().trim_start_matches('.').to_string()
                } else {
                    String::new()
                };
                (
                    f.number(),
                    f.name().to_string(),
                    nested,
                    f.label() == Label::Repeated,
                )
            })
            .collect();
        rows.push((name.clone(), map_entry, fields));
        for nested in &message.nested_type {
            visit(&name, nested, rows);
        }
    }
    let mut rows = Vec::new();
    for file in &set.file {
        for message in &file.message_type {
            visit(file.package(), message, &mut rows);
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.dedup_by(|a, b| a.0 == b.0);
    let mut out = String::from("/// Generated by xds/descriptors: (message, map entry, [(number, name, message type, repeated)]).\npub static MESSAGES: &[MessageSchema] = &[\n");
    for (name, map_entry, fields) in rows {
        out.push_str(&format!(
            "    MessageSchema {{ name: {name:?}, map_entry: {map_entry}, fields: &["
        ));
        for (number, field, nested, repeated) in fields {
            out.push_str(&format!(
                "FieldSchema {{ number: {number}, name: {field:?}, message: {nested:?}, repeated: {repeated} }},"
            ));
        }
        out.push_str("] },\n");
    }
    out.push_str("];\n");
    out
}
