//! Compiling the `Listener`: its address and TLS, the connection manager (codec, filters in
//! order, route source), the plugins' resource limits and the access log.

use super::*;
use nip_xds::translate::{ENVOY_DEFAULT_TEXT_FORMAT, JSON_ACCESS_LOG_FIELDS};

/// Where the listener's TLS material comes from: files, or SDS secrets (read by the
/// control thread and, for secrets, by `prepare`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `(certificate chain, private key)` PEM files, chosen by SNI; the first is the default.
    pub certificates: Vec<(String, String)>,
    /// Serve the proxy's workload certificate (SDS secret `default`), renewed in place.
    pub workload_certificate: bool,
    /// The roots client certificates must chain to (`validation_context.trusted_ca`, or an
    /// SDS validation context such as the mesh's `ROOTCA`).
    pub client_roots: Option<super::secrets::TrustRef>,
    /// Refuse clients without a verified certificate (`require_client_certificate`).
    pub require_client_certificate: bool,
}

/// What the listening socket looks like. Pingora binds it once at start; a reload that
/// changes it is logged and takes effect at the next restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Address to bind.
    pub address: SocketAddr,
    /// TLS termination, with HTTP/2 offered through ALPN.
    pub tls: Option<TlsFiles>,
    /// Accept h2c (prior knowledge) next to HTTP/1.1 on plaintext.
    pub h2c: bool,
}

/// The one listener NIP serves (listeners with `api_listener` are for proxyless gRPC
/// clients, not for a proxy).
pub(super) fn served_listener(resources: &ResourceSet) -> Result<&Listener, CompileError> {
    let served: Vec<&Listener> = resources
        .listeners
        .iter()
        .filter(|l| l.api_listener.is_none())
        .collect();
    match served.as_slice() {
        [listener] => Ok(listener),
        _ => Err(err(
            "Listener",
            "",
            format!("NIP serves exactly one listener, got {}", served.len()),
        )),
    }
}

pub(super) fn listener_spec(
    listener: &Listener,
    prepared: &Prepared,
) -> Result<(ListenerSpec, HttpConnectionManager), CompileError> {
    let name = listener.name.as_str();
    let fail = |m: String| err("Listener", name, m);
    let address = listener
        .address
        .as_ref()
        .ok_or_else(|| fail("address is missing".into()))?;
    let address = socket_addr(address, prepared).map_err(|e| fail(format!("address: {e}")))?;
    let [chain] = listener.filter_chains.as_slice() else {
        return Err(fail("exactly one filter chain is supported".into()));
    };
    let [network_filter] = chain.filters.as_slice() else {
        return Err(fail(
            "the filter chain must hold exactly the http_connection_manager".into(),
        ));
    };
    let Some(filter::ConfigType::TypedConfig(any)) = &network_filter.config_type else {
        return Err(fail(
            "filter_chains[0].filters[0].typed_config is missing".into(),
        ));
    };
    if any.type_url != HttpConnectionManager::type_url() {
        return Err(fail(format!(
            "filter {} is not supported; only {}",
            any.type_url,
            names::HTTP_CONNECTION_MANAGER
        )));
    }
    let hcm: HttpConnectionManager = decode(any).map_err(&fail)?;
    if hcm.generate_request_id.as_ref().is_some_and(|g| !g.value) {
        return Err(fail(
            "http_connection_manager.generate_request_id: false is not supported (NIP keeps or makes x-request-id on every request)".into(),
        ));
    }
    for (i, http) in hcm.http_filters.iter().enumerate() {
        let last = i + 1 == hcm.http_filters.len();
        let type_url = match &http.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => a.type_url.as_str(),
            _ => "",
        };
        let is_router = http.name == names::ROUTER || type_url.ends_with(".router.v3.Router");
        if last != is_router {
            return Err(fail(format!(
                "http_filters[{i}] {:?}: the router must be the last filter, and only there",
                http.name
            )));
        }
        if !is_router && type_url != Wasm::type_url() {
            return Err(fail(format!(
                "http_filters[{i}] {:?}: {type_url:?} is not supported (NIP runs {} plugins and the router)",
                http.name,
                Wasm::type_url()
            )));
        }
    }
    let codec = http_connection_manager::CodecType::try_from(hcm.codec_type)
        .unwrap_or(http_connection_manager::CodecType::Auto);
    let tls = match &chain.transport_socket {
        None => None,
        Some(socket) => {
            let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
                return Err(fail("transport_socket.typed_config is missing".into()));
            };
            if any.type_url != DownstreamTlsContext::type_url() {
                return Err(fail(format!(
                    "transport socket {} is not supported",
                    any.type_url
                )));
            }
            let tls: DownstreamTlsContext = decode(any).map_err(&fail)?;
            let refs = super::secrets::tls_context(&tls.common_tls_context.unwrap_or_default())
                .map_err(|e| fail(format!("tls: {e}")))?;
            if refs.certificates.is_empty() {
                return Err(fail(
                    "tls: common_tls_context has no certificate (tls_certificates or tls_certificate_sds_secret_configs)".into(),
                ));
            }
            if !refs.san_matchers.is_empty() {
                return Err(fail(
                    "tls: validation_context.match_typed_subject_alt_names is not supported on a listener (plugins see the client's names)".into(),
                ));
            }
            let mut certificates = Vec::new();
            let mut workload_certificate = false;
            for certificate in refs.certificates {
                match certificate {
                    super::secrets::CertificateRef::Files { chain, key } => {
                        certificates.push((chain, key))
                    }
                    super::secrets::CertificateRef::Secret(name)
                        if name == nip_xds::secrets::WORKLOAD_CERTIFICATE
                            && !workload_certificate =>
                    {
                        workload_certificate = true
                    }
                    super::secrets::CertificateRef::Secret(name) => {
                        return Err(fail(format!(
                            "tls: secret {name:?}: a listener serves certificate files or the workload certificate (\"{}\"), once",
                            nip_xds::secrets::WORKLOAD_CERTIFICATE
                        )))
                    }
                }
            }
            if workload_certificate && !certificates.is_empty() {
                return Err(fail(
                    "tls: the workload certificate and certificate files cannot be mixed on one listener".into(),
                ));
            }
            let require_client_certificate =
                tls.require_client_certificate.is_some_and(|r| r.value);
            if require_client_certificate && refs.trust.is_none() {
                return Err(fail(
                    "tls: require_client_certificate needs a validation context (trusted_ca or an SDS secret)".into(),
                ));
            }
            Some(TlsFiles {
                certificates,
                workload_certificate,
                client_roots: refs.trust,
                require_client_certificate,
            })
        }
    };
    let spec = ListenerSpec {
        address,
        h2c: tls.is_none() && codec != http_connection_manager::CodecType::Http1,
        tls,
    };
    Ok((spec, hcm))
}

/// The signature a plugin filter's module must carry, when the listener says modules must
/// be signed (`nip.plugin_signing.trusted_keys`, added by a control plane for a tenant
/// whose admin requires it).
pub(super) fn plugin_signature(
    listener: &Listener,
    filter: &str,
) -> Result<Option<crate::plugins::SignatureCheck>, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(signing) = listener
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::PLUGIN_SIGNING_METADATA))
    else {
        return Ok(None);
    };
    let keys = match signing
        .fields
        .get("trusted_keys")
        .and_then(|v| v.kind.as_ref())
    {
        None => return Ok(None),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(Kind::StringValue(key)) => nip_xds::config::decode_base64(key)
                    .filter(|k| k.len() == nip_xds::config::ED25519_KEY_BYTES)
                    .ok_or_else(|| {
                        format!("trusted_keys: {key:?} is not a base64 ed25519 public key")
                    }),
                _ => Err("trusted_keys: must be strings".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("trusted_keys: must be a list".into()),
    };
    if keys.is_empty() {
        return Ok(None);
    }
    let signature = signing
        .fields
        .get("signatures")
        .and_then(|v| match &v.kind {
            Some(Kind::StructValue(s)) => s.fields.get(filter),
            _ => None,
        })
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .ok_or_else(|| {
            format!("{filter:?}: the tenant requires signed plugins and this one has no signature")
        })?;
    let signature = nip_xds::config::decode_base64(signature)
        .filter(|s| s.len() == nip_xds::config::ED25519_SIGNATURE_BYTES)
        .ok_or_else(|| format!("{filter:?}: the signature is not base64 of 64 bytes"))?;
    Ok(Some(crate::plugins::SignatureCheck {
        trusted_keys: keys,
        signature,
    }))
}

/// The resource limits of plugin filter `filter` from the listener's `nip.plugin_limits`
/// metadata; defaults for a plugin (or a field) it does not mention.
pub(super) fn plugin_limits(listener: &Listener, filter: &str) -> Result<ResourceLimits, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let mut limits = ResourceLimits::default();
    let Some(entry) = listener
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::PLUGIN_LIMITS_METADATA))
        .and_then(|s| s.fields.get(filter))
    else {
        return Ok(limits);
    };
    let Some(Kind::StructValue(fields)) = &entry.kind else {
        return Err(format!("{filter:?} must be a struct"));
    };
    for (key, value) in &fields.fields {
        let Some(Kind::NumberValue(n)) = value.kind else {
            return Err(format!("{filter:?}.{key} must be a number"));
        };
        if !(n.is_finite() && n >= 0.0 && n <= u32::MAX as f64 * 4.0) {
            return Err(format!("{filter:?}.{key} = {n} is out of range"));
        }
        match key.as_str() {
            "memory_bytes" if n >= 65536.0 => limits.instance.memory_bytes = n as usize,
            "cpu_ms" if n >= 1.0 => {
                limits.instance.callback_deadline = Duration::from_millis(n as u64)
            }
            "body_bytes" => limits.max_body_bytes = n as usize,
            "memory_bytes" | "cpu_ms" => {
                return Err(format!("{filter:?}.{key} = {n} is too small"))
            }
            other => return Err(format!("{filter:?}: unknown limit {other:?}")),
        }
    }
    Ok(limits)
}

/// The line format of an access log. NIP writes two formats: Envoy's default text line and
/// its JSON line ([`JSON_ACCESS_LOG_FIELDS`]); a `log_format` asking for anything else (other
/// command strings, other JSON keys) is refused rather than written in a format the user
/// did not ask for.
#[allow(deprecated)] // `text_format`: deprecated in Envoy, still sent by older servers.
pub(super) fn log_format(format: &SubstitutionFormatString) -> Result<LogFormat, String> {
    use substitution_format_string::Format;
    let default_text = |text: &str| {
        text.trim_end_matches('\n') == ENVOY_DEFAULT_TEXT_FORMAT.trim_end_matches('\n')
    };
    match &format.format {
        None => Ok(LogFormat::Text),
        Some(Format::TextFormat(text)) if default_text(text) => Ok(LogFormat::Text),
        Some(Format::TextFormatSource(source)) if matches!(&source.specifier, Some(data_source::Specifier::InlineString(text)) if default_text(text)) => {
            Ok(LogFormat::Text)
        }
        Some(Format::JsonFormat(fields)) => {
            let ours = fields.fields.len() == JSON_ACCESS_LOG_FIELDS.len()
                && JSON_ACCESS_LOG_FIELDS.iter().all(|(key, command)| {
                    matches!(
                        fields.fields.get(*key).and_then(|v| v.kind.as_ref()),
                        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(c)) if c == command
                    )
                });
            if ours {
                Ok(LogFormat::Json)
            } else {
                Err(
                    "log_format.json_format: NIP writes its own JSON fields only (those `nip` \
                     translates an `access_log: { format: json }` to); custom fields are not \
                     supported"
                        .into(),
                )
            }
        }
        Some(_) => Err(
            "log_format: NIP writes Envoy's default text format only; custom \
                        command strings are not supported"
                .into(),
        ),
    }
}

impl Compiler<'_> {
    pub(super) fn access_log(
        &self,
        listener: &str,
        logs: &[AccessLog],
    ) -> Result<Option<Arc<AccessLogger>>, CompileError> {
        let fail = |m: String| err("Listener", listener, format!("access_log: {m}"));
        let Some(log) = logs.first() else {
            return Ok(None);
        };
        if logs.len() > 1 {
            return Err(fail("only one access log is supported".into()));
        }
        let Some(access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
            return Err(fail("typed_config is missing".into()));
        };
        let (sink, format) = if any.type_url == StdoutAccessLog::type_url() {
            let stdout: StdoutAccessLog = decode(any).map_err(fail)?;
            let format = match stdout.access_log_format {
                Some(stdout_access_log::AccessLogFormat::LogFormat(f)) => {
                    log_format(&f).map_err(fail)?
                }
                None => LogFormat::Text,
            };
            (LogSink::Stdout, format)
        } else if any.type_url == FileAccessLog::type_url() {
            let file: FileAccessLog = decode(any).map_err(fail)?;
            let format = match file.access_log_format {
                Some(file_access_log::AccessLogFormat::LogFormat(f)) => {
                    log_format(&f).map_err(fail)?
                }
                Some(_) => return Err(fail("only log_format is supported".into())),
                None => LogFormat::Text,
            };
            let sink = if file.path == "/dev/stdout" {
                LogSink::Stdout
            } else {
                LogSink::File(file.path)
            };
            (sink, format)
        } else {
            return Err(fail(format!("{} is not supported", any.type_url)));
        };
        if let Some(previous) = &self.previous_access_log {
            if previous.is(format, &sink) {
                return Ok(Some(Arc::clone(previous)));
            }
        }
        let logger = AccessLogger::start(
            format,
            sink.clone(),
            self.metrics.access_log_dropped.clone(),
        )
        .map_err(|e| fail(format!("cannot open {sink:?}: {e}")))?;
        Ok(Some(Arc::new(logger)))
    }
}
