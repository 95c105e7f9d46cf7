//! The SDK examples' common behaviour (the same in every language, driven by the same
//! tests), written on the Rust SDK:
//!
//! * a request of priority `low` gets 503 and a JSON error, here, not upstream;
//! * with `lookup_cluster` set, a request with `x-user` is looked up there
//!   (`GET /users/NAME`): the answer's `tier` goes upstream as `x-user-tier`, an unknown
//!   user gets 403 and a lookup that fails 502;
//! * every request is stamped `metadata.checked-by` (and `metadata.tenant`,
//!   `metadata.principal` when it has them), which reach the upstream as `x-nip-meta-*`
//!   headers;
//! * JSON responses have the fields named in `redact` replaced by `"[redacted]"` at any
//!   depth (a response's head has gone by then: its body is what a handler may change).
//!
//! Config (JSON): `{ "redact": ["card"], "lookup_cluster": "users" }`.

use nip_plugin::{
    json, main, Context, Error, HttpRequest, Message, MessageType, Plugin, Reply, Value,
};
use serde::Deserialize;

#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    lookup_cluster: Option<String>,
}

main! {
    Plugin::<Config>::with_config("sdk-guard")
        .version("1.0.0")
        .author("NIP")
        .capability("local_reply")
        .capability("http_calls")
        .capability("modify_body")
        .responses(true)
        .on_config_change(|config| {
            if config.redact.iter().any(String::is_empty) {
                return Err("redact: a field name is empty".into());
            }
            Ok(())
        })
        .on_message(handle)
        .run()
}

async fn handle(mut message: Message, ctx: Context<Config>) -> Result<nip_plugin::Outcome, Error> {
    match message.kind() {
        MessageType::Request => {
            // A request may ask to be held a while (a timer, as a future).
            if let Some(ms) = message
                .header("x-delay-ms")
                .and_then(|v| v.parse::<u64>().ok())
            {
                ctx.sleep(std::time::Duration::from_millis(ms.min(5_000)))
                    .await;
            }
            if message.priority() == "low" {
                return Ok(Reply::json(
                    503,
                    &json!({ "error": "low priority requests are not served on this route" }),
                )
                .into());
            }
            if let (Some(cluster), Some(user)) =
                (&ctx.config().lookup_cluster, message.header("x-user"))
            {
                let answer = ctx
                    .http_call(cluster, HttpRequest::get(&format!("/users/{user}")))
                    .await?;
                match answer.status {
                    200 => {
                        let found: Value = answer.json()?;
                        let tier = found
                            .get("tier")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown");
                        message.set_header("x-user-tier", tier);
                    }
                    404 => return Err(Error::with_status(403, format!("unknown user {user}"))),
                    status => {
                        return Err(Error::with_status(
                            502,
                            format!("user lookup answered {status}"),
                        ))
                    }
                }
            }
            message.stamp("checked-by", ctx.name());
            if let Some(tenant) = message.tenant().map(str::to_string) {
                message.stamp("tenant", tenant);
            }
            if let Some(principal) = message.principal().map(str::to_string) {
                message.stamp("principal", principal);
            }
            Ok(message.into())
        }
        MessageType::Response => {
            let redact = &ctx.config().redact;
            if message.data().as_json().is_some() {
                let count = message
                    .data_mut()
                    .as_json_mut()
                    .map_or(0, |data| redact_fields(data, redact));
                if count > 0 {
                    ctx.log_info(&format!("redacted {count} field(s) of {}", message.id()));
                }
            }
            Ok(message.into())
        }
    }
}

/// Replaces the values of `fields` at any depth; returns how many.
fn redact_fields(value: &mut Value, fields: &[String]) -> usize {
    match value {
        Value::Object(map) => map
            .iter_mut()
            .map(|(key, item)| {
                if fields.iter().any(|f| f == key) {
                    *item = Value::String("[redacted]".into());
                    1
                } else {
                    redact_fields(item, fields)
                }
            })
            .sum(),
        Value::Array(items) => items
            .iter_mut()
            .map(|item| redact_fields(item, fields))
            .sum(),
        _ => 0,
    }
}
