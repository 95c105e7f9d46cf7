//! v3 → v4: recognising a v3 file, and converting one.
//!
//! A v3 config was one monolith's: `server` (`port`, `host`) and `plugins` as a list of
//! `{ name, enabled, … }`. v4 splits listening (`api_gateway`), upstreams (`services`),
//! what runs where (`routes`) and plugins by name (`plugins`, each with its module's
//! `source`). [`from_v3`] writes the v4 file, with a `TODO` comment wherever a human must
//! decide (v3 never said where a plugin's module is, or which requests go where), and a
//! report of what it changed.

use serde_yaml::Value;

/// What a conversion made, and what a human must still decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The v4 YAML (with `TODO` comments).
    pub yaml: String,
    /// What changed, one line each.
    pub changed: Vec<String>,
    /// What needs a human, one line each (also a `TODO` in the file).
    pub todo: Vec<String>,
}

/// Why a file could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrateError {
    /// Not YAML.
    #[error("not YAML: {0}")]
    Syntax(String),
    /// YAML, but not a v3 config.
    #[error("not a v3 config: {0}")]
    NotV3(String),
}

/// Whether `text` is a v3 config (its `server` block, or `plugins` as a list); what says so.
pub fn v3_marks(text: &str) -> Option<&'static str> {
    let value: Value = serde_yaml::from_str(text).ok()?;
    let map = value.as_mapping()?;
    if map.get("server").is_some_and(Value::is_mapping) && map.get("api_gateway").is_none() {
        return Some("a `server` block");
    }
    if map.get("plugins").is_some_and(Value::is_sequence) {
        return Some("`plugins` as a list");
    }
    None
}

/// What a v3 config did with requests, for `nip migrate verify`: where its server
/// listened (as a v4 address) and the plugins every request went through, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V3Behaviour {
    /// `server` as a v4 listen address (what [`from_v3`] writes).
    pub address: String,
    /// The enabled plugins, in v3's order (v3 ran them all on every request).
    pub plugins: Vec<String>,
}

/// A v3 config's top-level mapping; not YAML, or not v3, is the error.
fn v3_document(text: &str) -> Result<serde_yaml::Mapping, MigrateError> {
    let value: Value =
        serde_yaml::from_str(text).map_err(|e| MigrateError::Syntax(e.to_string()))?;
    let Value::Mapping(map) = value else {
        return Err(MigrateError::NotV3("the document is not a mapping".into()));
    };
    if v3_marks(text).is_none() {
        return Err(MigrateError::NotV3(
            "it has neither a `server` block nor `plugins` as a list".into(),
        ));
    }
    Ok(map)
}

/// Reads what a v3 config did with requests.
pub fn v3_behaviour(text: &str) -> Result<V3Behaviour, MigrateError> {
    let map = v3_document(text)?;
    let map = &map;
    let (address, _, _) = v3_address(map);
    let plugins = v3_plugins(map)
        .into_iter()
        .filter(|(_, _, on)| *on)
        .map(|(name, _, _)| name)
        .collect();
    Ok(V3Behaviour { address, plugins })
}

/// `server { host, port }` as a v4 listen address, with the host and port it read.
fn v3_address(map: &serde_yaml::Mapping) -> (String, String, u64) {
    let server = map.get("server").and_then(Value::as_mapping);
    let port = server
        .and_then(|s| s.get("port"))
        .and_then(Value::as_u64)
        .unwrap_or(8080);
    let host = server
        .and_then(|s| s.get("host"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let address = match host.as_str() {
        "" | "0.0.0.0" | "::" | "*" => format!(":{port}"),
        "localhost" => format!("127.0.0.1:{port}"),
        other => format!("{other}:{port}"),
    };
    (address, host, port)
}

/// The v3 plugins list: each plugin's v4 name, its entry, and whether it was enabled.
fn v3_plugins(map: &serde_yaml::Mapping) -> Vec<(String, Value, bool)> {
    map.get("plugins")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, plugin)| {
            let name = plugin
                .get("name")
                .and_then(Value::as_str)
                .map_or_else(|| format!("plugin-{}", i + 1), str::to_string);
            let on = plugin
                .get("enabled")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            (name, plugin.clone(), on)
        })
        .collect()
}

/// Converts a v3 config to v4.
pub fn from_v3(text: &str) -> Result<Migration, MigrateError> {
    let map = v3_document(text)?;
    let map = &map;
    let mut changed = Vec::new();
    let mut todo = Vec::new();
    let mut out = String::from(
        "# Converted from v3 by `nip migrate config --from-v3`. Lines marked TODO need a\n# human; `nip validate` checks the result.\n",
    );

    // server → api_gateway.
    let server = map.get("server").and_then(Value::as_mapping);
    let (address, host, port) = v3_address(map);
    out.push_str(&format!("api_gateway:\n  address: \"{address}\"\n"));
    changed.push(format!(
        "server {{ host: {host:?}, port: {port} }} → api_gateway.address {address:?}"
    ));
    for (key, _) in server.into_iter().flatten() {
        let key = key.as_str().unwrap_or("?");
        if !matches!(key, "port" | "host") {
            todo.push(format!("server.{key}: v4 has no such setting (left out)"));
        }
    }

    // plugins list → plugins map.
    let plugins = v3_plugins(map);
    let mut enabled = Vec::new();
    if !plugins.is_empty() {
        out.push_str("plugins:\n");
    }
    for (i, (name, plugin, on)) in plugins.into_iter().enumerate() {
        out.push_str(&format!(
            "  {name}:\n    # TODO: where the plugin's WebAssembly module is (v3 loaded it by name), then\n    #   name the plugin on the route below. Until then it loads but runs nowhere.\n    # source: {{ file: plugins/{name}.wasm }}\n"
        ));
        todo.push(format!(
            "plugins.{name}.source: the module's file or URL (v3 found plugins by name)"
        ));
        if let Some(config) = plugin.get("config") {
            let json = serde_json::to_string(config).unwrap_or_else(|_| "{}".into());
            out.push_str(&format!("    config: {json}\n"));
            changed.push(format!("plugins[{i}].config → plugins.{name}.config"));
        }
        for (key, _) in plugin.as_mapping().into_iter().flatten() {
            let key = key.as_str().unwrap_or("?");
            if !matches!(key, "name" | "enabled" | "config") {
                todo.push(format!(
                    "plugins[{i}].{key}: v4 has no such plugin setting (left out)"
                ));
            }
        }
        changed.push(format!("plugins[{i}] ({name}) → plugins.{name}"));
        if on {
            enabled.push(name);
        } else {
            changed.push(format!(
                "plugins.{name} was disabled: defined, but on no route"
            ));
        }
    }

    // v3 ran every request through its enabled plugins; v4 says where requests go.
    out.push_str(
        "# TODO: where requests go. v3 had no upstreams; name yours here.\nservices:\n  app: { endpoints: [\"127.0.0.1:3000\"] }\nroutes:\n",
    );
    out.push_str("  - name: all          # every request\n    service: app\n");
    if !enabled.is_empty() {
        out.push_str(&format!(
            "    # TODO: with their sources set, run the plugins v3 enabled on it:\n    # plugins: [{}]\n",
            enabled.join(", ")
        ));
        todo.push(format!(
            "routes[0].plugins: [{}] once their sources are set (v3 ran them on every request)",
            enabled.join(", ")
        ));
    }
    todo.push("services.app: the upstream requests go to (v3 had none)".into());
    changed.push("one route (all) takes every request, as v3's server did".into());
    for (key, _) in map {
        let key = key.as_str().unwrap_or("?");
        if !matches!(key, "server" | "plugins") {
            todo.push(format!(
                "{key}: not a v3 setting this tool knows (left out)"
            ));
        }
    }
    Ok(Migration {
        yaml: out,
        changed,
        todo,
    })
}

/// A v3 message (`{ id, type, data }`, and what else v3 senders put there) as a v4
/// envelope: `id`, `type`, `timestamp`, `correlation_id`, `source`, `data`,
/// `metadata.priority`, `metadata.retry_count` — the fields NIP carries on HTTP as
/// `x-request-id`, `traceparent`'s trace id, `x-nip-priority` and `x-nip-retry-count`.
/// `now` stamps a message that has no timestamp; `id` stands for a missing correlation id.
pub fn message_from_v3(v3: &serde_json::Value, now: &str) -> Result<serde_json::Value, String> {
    use serde_json::{json, Value};
    let Some(fields) = v3.as_object() else {
        return Err("a v3 message is a JSON object".into());
    };
    let text = |keys: &[&str]| {
        keys.iter().find_map(|k| match fields.get(*k) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    };
    let id = text(&["id"]).ok_or("id: a v3 message has one (a string or a number)")?;
    let kind = text(&["type"]).ok_or("type: a v3 message has one")?;
    let priority = match text(&["priority"]).as_deref() {
        None => "normal".to_string(),
        Some(p @ ("low" | "normal" | "high")) => p.to_string(),
        Some(other) => return Err(format!("priority: {other:?} is not low, normal or high")),
    };
    let retry_count = match fields.get("retry_count").or_else(|| fields.get("retries")) {
        None => 0,
        Some(n) => n.as_u64().ok_or("retry_count: a whole number of retries")?,
    };
    let known = [
        "id",
        "type",
        "data",
        "timestamp",
        "correlation_id",
        "correlationId",
        "source",
        "priority",
        "retry_count",
        "retries",
    ];
    let mut metadata = serde_json::Map::new();
    metadata.insert("priority".into(), json!(priority));
    metadata.insert("retry_count".into(), json!(retry_count));
    // Anything else v3 carried stays, as metadata fields (x-nip-meta-NAME on HTTP).
    let extra: serde_json::Map<String, Value> = fields
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !extra.is_empty() {
        metadata.insert("fields".into(), Value::Object(extra));
    }
    Ok(json!({
        "id": id,
        "type": kind,
        "timestamp": text(&["timestamp"]).unwrap_or_else(|| now.to_string()),
        "correlation_id": text(&["correlation_id", "correlationId"]).unwrap_or_else(|| id.clone()),
        "source": fields.get("source").cloned().unwrap_or_else(|| json!({ "from": "v3" })),
        "data": fields.get("data").cloned().unwrap_or(Value::Null),
        "metadata": metadata,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan's own v3 example.
    const PLAN_V3: &str = r#"
server:
  port: 8080
  host: "localhost"
plugins:
  - name: "my-plugin"
    enabled: true
"#;

    #[test]
    fn the_plans_v3_example_converts_to_a_valid_v4_config() {
        assert_eq!(v3_marks(PLAN_V3), Some("a `server` block"));
        let migration = from_v3(PLAN_V3).unwrap();
        let config = crate::config::Config::from_yaml(&migration.yaml)
            .unwrap_or_else(|e| panic!("{e}\n{}", migration.yaml));
        assert_eq!(config.api_gateway.address, "127.0.0.1:8080");
        assert!(config.plugins.contains_key("my-plugin"));
        assert!(config.routes[0].plugins.is_empty(), "no module to run yet");
        assert!(migration.yaml.contains("# plugins: [my-plugin]"));
        assert!(migration
            .todo
            .iter()
            .any(|t| t.starts_with("plugins.my-plugin.source")));
        assert!(migration
            .todo
            .iter()
            .any(|t| t.starts_with("routes[0].plugins: [my-plugin]")));
        assert!(migration
            .changed
            .iter()
            .any(|c| c.contains("api_gateway.address")));
    }

    #[test]
    fn disabled_plugins_stay_off_routes_and_unknown_keys_are_reported() {
        let migration = from_v3(
            "server: { port: 9000, host: 0.0.0.0, workers: 4 }\nplugins:\n  - { name: a, enabled: false, config: { k: 1 } }\n  - { name: b, priority: 3 }\nlogging: { level: debug }\n",
        )
        .unwrap();
        let config = crate::config::Config::from_yaml(&migration.yaml)
            .unwrap_or_else(|e| panic!("{e}\n{}", migration.yaml));
        assert_eq!(config.api_gateway.address, ":9000");
        assert!(config.plugins.contains_key("a"));
        assert!(
            migration.yaml.contains("# plugins: [b]\n"),
            "{}",
            migration.yaml
        );
        for expected in ["server.workers", "plugins[1].priority", "logging"] {
            assert!(
                migration.todo.iter().any(|t| t.starts_with(expected)),
                "{expected} in {:?}",
                migration.todo
            );
        }
    }

    #[test]
    fn v3_messages_become_v4_envelopes() {
        let now = "2026-11-30T12:00:00.000Z";
        let v4 = message_from_v3(
            &serde_json::json!({ "id": 42, "type": "order.created", "data": { "sku": "a" } }),
            now,
        )
        .unwrap();
        assert_eq!(
            v4,
            serde_json::json!({
                "id": "42", "type": "order.created", "timestamp": now,
                "correlation_id": "42", "source": { "from": "v3" },
                "data": { "sku": "a" },
                "metadata": { "priority": "normal", "retry_count": 0 }
            })
        );
        let v4 = message_from_v3(
            &serde_json::json!({ "id": "m1", "type": "t", "priority": "high", "retries": 2,
                                 "correlationId": "c9", "tenant": "acme" }),
            now,
        )
        .unwrap();
        assert_eq!(v4["metadata"]["priority"], "high");
        assert_eq!(v4["metadata"]["retry_count"], 2);
        assert_eq!(v4["correlation_id"], "c9");
        assert_eq!(v4["metadata"]["fields"]["tenant"], "acme");
        for (bad, field) in [
            (serde_json::json!({ "type": "t" }), "id"),
            (serde_json::json!({ "id": "x" }), "type"),
            (
                serde_json::json!({ "id": "x", "type": "t", "priority": "urgent" }),
                "priority",
            ),
            (
                serde_json::json!({ "id": "x", "type": "t", "retries": -1 }),
                "retry_count",
            ),
            (serde_json::json!([1]), "JSON object"),
        ] {
            let e = message_from_v3(&bad, now).unwrap_err();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn a_v4_file_is_not_taken_for_v3() {
        assert_eq!(
            v3_marks("api_gateway: { address: \":8080\" }\nplugins: { a: {} }\n"),
            None
        );
        assert!(matches!(
            from_v3("api_gateway: { address: \":8080\" }\n"),
            Err(MigrateError::NotV3(_))
        ));
    }
}
