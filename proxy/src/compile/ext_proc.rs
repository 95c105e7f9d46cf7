//! Compiling Envoy's `ext_proc` filters of a connection manager (`ExternalProcessor`):
//! the processor's cluster and stream settings, and which parts of a request it gets.
//! What NIP cannot do is refused by field, not ignored: the body modes `BUFFERED_PARTIAL`
//! and `FULL_DUPLEX_STREAMED`, request trailers (pingora hands filters none), an HTTP
//! service, observability or async modes, mode overrides.

use super::*;
use crate::ext_proc::{BodyMode, ExtProc, ProcessingMode};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    processing_mode::{BodySendMode, HeaderSendMode},
    ExternalProcessor,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;

/// Envoy's default `message_timeout`.
const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_millis(200);

/// A connection manager's `ext_proc` filters by name, with their place in the chain and
/// whether they run on routes that do not mention them.
#[derive(Debug, Default)]
pub(super) struct ManagerProcessors(pub BTreeMap<String, (Arc<ExtProc>, usize, bool)>);

impl Compiler<'_> {
    /// The `ext_proc` filters of `hcm`.
    pub(super) fn manager_processors(
        &self,
        hcm: &HttpConnectionManager,
        clusters: &BTreeMap<String, Arc<Cluster>>,
    ) -> Result<ManagerProcessors, String> {
        let mut out = ManagerProcessors::default();
        for (i, http) in hcm.http_filters.iter().enumerate() {
            let Some(http_filter::ConfigType::TypedConfig(any)) = &http.config_type else {
                continue;
            };
            if any.type_url != ExternalProcessor::type_url() {
                continue;
            }
            let field = |m: String| format!("http_filters[{i}] {:?}: {m}", http.name);
            let config: ExternalProcessor = decode(any).map_err(field)?;
            let mut processor = ext_proc(&http.name, &config, clusters).map_err(field)?;
            processor.stats = self.metrics.ext_proc(&http.name);
            out.0
                .insert(http.name.clone(), (Arc::new(processor), i, !http.disabled));
        }
        Ok(out)
    }
}

/// One `ExternalProcessor`.
fn ext_proc(
    name: &str,
    config: &ExternalProcessor,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> Result<ExtProc, String> {
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    if config.http_service.is_some() {
        return Err("http_service is not supported; use grpc_service (envoy_grpc)".into());
    }
    for (field, set) in [
        ("observability_mode", config.observability_mode),
        ("allow_mode_override", config.allow_mode_override),
        (
            "disable_immediate_response",
            config.disable_immediate_response,
        ),
        (
            "send_body_without_waiting_for_header_response",
            config.send_body_without_waiting_for_header_response,
        ),
        (
            "response_attributes",
            !config.response_attributes.is_empty(),
        ),
        ("forward_rules", config.forward_rules.is_some()),
        ("metadata_options", config.metadata_options.is_some()),
        (
            "processing_request_modifier",
            config.processing_request_modifier.is_some(),
        ),
        (
            "on_processing_response",
            config.on_processing_response.is_some(),
        ),
    ] {
        if set {
            return Err(format!("{field} is not supported"));
        }
    }
    let rules = mutation_rules(config.mutation_rules.as_ref())
        .map_err(|e| format!("mutation_rules.{e}"))?;
    let grpc = config
        .grpc_service
        .as_ref()
        .ok_or("grpc_service is missing")?;
    let Some(TargetSpecifier::EnvoyGrpc(target)) = &grpc.target_specifier else {
        return Err("grpc_service: only envoy_grpc (a cluster) is supported".into());
    };
    if !clusters.contains_key(&target.cluster_name) {
        return Err(format!(
            "grpc_service.envoy_grpc.cluster_name {:?} is not a cluster",
            target.cluster_name
        ));
    }
    let mode = config.processing_mode.unwrap_or_default();
    let header = |value: i32, field: &str, default_send: bool| match HeaderSendMode::try_from(value)
    {
        Ok(HeaderSendMode::Default) => Ok(default_send),
        Ok(HeaderSendMode::Send) => Ok(true),
        Ok(HeaderSendMode::Skip) => Ok(false),
        _ => Err(format!(
            "processing_mode.{field}: {value} is not a send mode"
        )),
    };
    let body = |value: i32, field: &str| match BodySendMode::try_from(value) {
        Ok(BodySendMode::None) => Ok(BodyMode::None),
        Ok(BodySendMode::Buffered) => Ok(BodyMode::Buffered),
        Ok(BodySendMode::Streamed) => Ok(BodyMode::Streamed),
        Ok(other) => Err(format!(
            "processing_mode.{field}: {} is not supported (NONE, BUFFERED or STREAMED)",
            other.as_str_name()
        )),
        Err(_) => Err(format!(
            "processing_mode.{field}: {value} is not a body mode"
        )),
    };
    // Trailers are skipped by default. Pingora reads no request trailers for filters.
    if header(mode.request_trailer_mode, "request_trailer_mode", false)? {
        return Err(
            "processing_mode.request_trailer_mode: SEND is not supported (the proxy hands \
             filters no request trailers)"
                .into(),
        );
    }
    let timeout = config
        .message_timeout
        .as_ref()
        .map(|d| super::duration(d).ok_or("message_timeout is negative"))
        .transpose()?
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_MESSAGE_TIMEOUT);
    Ok(ExtProc {
        name: name.to_string(),
        cluster: target.cluster_name.clone(),
        authority: super::grpc_authority(target),
        initial_metadata: grpc
            .initial_metadata
            .iter()
            .map(|h| (h.key.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        timeout,
        failure_mode_allow: config.failure_mode_allow,
        mode: ProcessingMode {
            request_headers: header(mode.request_header_mode, "request_header_mode", true)?,
            response_headers: header(mode.response_header_mode, "response_header_mode", true)?,
            request_body: body(mode.request_body_mode, "request_body_mode")?,
            response_body: body(mode.response_body_mode, "response_body_mode")?,
            response_trailers: header(mode.response_trailer_mode, "response_trailer_mode", false)?,
        },
        attributes: config.request_attributes.clone(),
        rules,
        max_body_bytes: crate::plugins::DEFAULT_MAX_BODY_BYTES,
        stats: Default::default(),
    })
}

/// Envoy's `HeaderMutationRules` (absent: its defaults).
fn mutation_rules(
    rules: Option<&envoy_types::pb::envoy::config::common::mutation_rules::v3::HeaderMutationRules>,
) -> Result<crate::ext_proc::MutationRules, String> {
    let Some(rules) = rules else {
        return Ok(Default::default());
    };
    let flag = |v: &Option<envoy_types::pb::google::protobuf::BoolValue>| {
        v.as_ref().is_some_and(|b| b.value)
    };
    let expression = |m: &Option<envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher>,
                      field: &str| {
        m.as_ref()
            .map(|m| {
                regex::Regex::new(&format!("^(?:{})$", m.regex))
                    .map_err(|e| format!("{field}.regex {:?}: {e}", m.regex))
            })
            .transpose()
    };
    Ok(crate::ext_proc::MutationRules {
        allow_all_routing: flag(&rules.allow_all_routing),
        allow_envoy: flag(&rules.allow_envoy),
        disallow_system: flag(&rules.disallow_system),
        disallow_all: flag(&rules.disallow_all),
        allow_expression: expression(&rules.allow_expression, "allow_expression")?,
        disallow_expression: expression(&rules.disallow_expression, "disallow_expression")?,
        disallow_is_error: flag(&rules.disallow_is_error),
    })
}
