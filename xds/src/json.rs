//! Proto3 JSON of xDS resources, as Envoy prints them in `/config_dump`.
//!
//! The descriptors of the resource types NIP uses are compiled at build time from the
//! `.proto` files inside `envoy-types` (see `build.rs`); `Any` fields (typed configs) are
//! expanded when their type is among them.

use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{json, Value};
use std::sync::OnceLock;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xds_descriptors.bin"));

/// The descriptors of the xDS resource types NIP reads and writes (`None` only when the
/// build found no `.proto` files), for proto3 JSON and for finding which fields a resource
/// sets.
pub fn descriptor_pool() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        if DESCRIPTORS.is_empty() {
            return None;
        }
        DescriptorPool::decode(DESCRIPTORS).ok()
    })
    .as_ref()
}

/// Renders a message as proto3 JSON with an `@type` field, like an expanded `Any`.
pub fn to_json<M: prost::Message + prost::Name>(message: &M) -> Value {
    let bytes = message.encode_to_vec();
    let mut value = decode_json(&M::full_name(), &bytes).unwrap_or_else(
        || json!({ "unavailable": "descriptors were not compiled in", "encoded_len": bytes.len() }),
    );
    if let Value::Object(map) = &mut value {
        map.insert("@type".to_string(), Value::String(M::type_url()));
    }
    value
}

fn decode_json(full_name: &str, bytes: &[u8]) -> Option<Value> {
    let descriptor = descriptor_pool()?.get_message_by_name(full_name)?;
    let message = DynamicMessage::decode(descriptor, bytes).ok()?;
    serde_json::to_value(&message).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::translate::translate;

    #[test]
    fn resources_render_with_field_names_and_expanded_typed_configs() {
        let config = Config::from_yaml(
            "services:\n  web: { endpoints: [\"127.0.0.1:8081\"] }\nroutes:\n  - service: web\n",
        )
        .unwrap();
        let t = translate(&config);
        let listener = to_json(&t.resources.listeners[0]);
        assert_eq!(
            listener["@type"],
            "type.googleapis.com/envoy.config.listener.v3.Listener"
        );
        assert_eq!(listener["name"], "api_gateway");
        let hcm = &listener["filterChains"][0]["filters"][0]["typedConfig"];
        assert_eq!(
            hcm["@type"],
            "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        );
        assert_eq!(hcm["rds"]["routeConfigName"], "api_gateway_routes");
        let cla = to_json(&t.resources.endpoints[0]);
        assert_eq!(
            cla["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
                ["portValue"],
            8081
        );
    }
}
