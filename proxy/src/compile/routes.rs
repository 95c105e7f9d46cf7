//! Compiling a `RouteConfiguration`: virtual hosts, routes and their matches, what each
//! route forwards to and how (retries, timeouts, hash policy, locality, plugins), what it
//! changes (rewrites, header edits at the route, virtual host and route configuration
//! levels) or how it answers by itself (redirect, direct response).

use super::*;

/// Envoy's default route timeout, used when a route gives none.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// Envoy regexes must match the whole input.
/// Envoy's default `max_direct_response_body_size_bytes`.
const DEFAULT_DIRECT_RESPONSE_BODY_LIMIT: usize = 4096;

/// Plugins of a listener by HTTP filter name.
pub(super) type PluginFilters = BTreeMap<String, prepare::PreparedPlugin>;

impl Compiler<'_> {
    /// Loads every plugin filter of the listener (compile + canary).
    pub(super) fn router(
        &self,
        config: &RouteConfiguration,
        clusters: &BTreeMap<String, Arc<Cluster>>,
        plugins: &PluginFilters,
        policy: &ManagerPolicy,
    ) -> Result<Router, CompileError> {
        let name = config.name.as_str();
        let fail = |field: String| {
            move |m: String| err("RouteConfiguration", name, format!("{field}: {m}"))
        };
        let config_edits = (
            header_edits(
                &config.request_headers_to_add,
                &config.request_headers_to_remove,
            )
            .map_err(fail("request_headers_to_add".into()))?,
            header_edits(
                &config.response_headers_to_add,
                &config.response_headers_to_remove,
            )
            .map_err(fail("response_headers_to_add".into()))?,
        );
        let body_limit = match config.max_direct_response_body_size_bytes.as_ref() {
            Some(limit) => usize::try_from(limit.value).unwrap_or(usize::MAX),
            None => DEFAULT_DIRECT_RESPONSE_BODY_LIMIT,
        };
        let mut builder = RouterBuilder::default();
        // Routes shared by several virtual hosts (hostless routes) compile once per name.
        let mut compiled: BTreeMap<Vec<u8>, Arc<Route>> = BTreeMap::new();
        for (vi, vhost) in config.virtual_hosts.iter().enumerate() {
            let vhost_field = format!("virtual_hosts[{vi}]");
            let outer = (
                header_edits(
                    &vhost.request_headers_to_add,
                    &vhost.request_headers_to_remove,
                )
                .map_err(fail(format!("{vhost_field}.request_headers_to_add")))?
                .then(&config_edits.0),
                header_edits(
                    &vhost.response_headers_to_add,
                    &vhost.response_headers_to_remove,
                )
                .map_err(fail(format!("{vhost_field}.response_headers_to_add")))?
                .then(&config_edits.1),
            );
            // A route shared by virtual hosts compiles once per set of outer header edits.
            let vhost_headers = envoy_types::pb::envoy::config::route::v3::VirtualHost {
                request_headers_to_add: vhost.request_headers_to_add.clone(),
                request_headers_to_remove: vhost.request_headers_to_remove.clone(),
                response_headers_to_add: vhost.response_headers_to_add.clone(),
                response_headers_to_remove: vhost.response_headers_to_remove.clone(),
                ..Default::default()
            }
            .encode_to_vec();
            let mut routes = Vec::with_capacity(vhost.routes.len());
            for (ri, xds_route) in vhost.routes.iter().enumerate() {
                let mut key = xds_route.encode_to_vec();
                key.extend_from_slice(&vhost_headers);
                if let Some(route) = compiled.get(&key) {
                    routes.push(Arc::clone(route));
                    continue;
                }
                let field = format!("virtual_hosts[{vi}].routes[{ri}]");
                let route = self
                    .route(xds_route, clusters, plugins, policy, &outer, body_limit)
                    .map_err(|m| err("RouteConfiguration", name, format!("{field}: {m}")))?;
                let route = Arc::new(route);
                compiled.insert(key, Arc::clone(&route));
                routes.push(route);
            }
            builder
                .add(
                    &vhost.domains,
                    VirtualHost {
                        name: vhost.name.clone(),
                        routes,
                    },
                )
                .map_err(|m| {
                    err(
                        "RouteConfiguration",
                        name,
                        format!("virtual_hosts[{vi}].domains: {m}"),
                    )
                })?;
        }
        Ok(builder.build())
    }

    pub(super) fn route(
        &self,
        xds: &envoy_types::pb::envoy::config::route::v3::Route,
        clusters: &BTreeMap<String, Arc<Cluster>>,
        plugins: &PluginFilters,
        policy: &ManagerPolicy,
        outer: &(HeaderEdits, HeaderEdits),
        body_limit: usize,
    ) -> Result<Route, String> {
        let route_name: Arc<str> = xds.name.as_str().into();
        let matcher = xds.r#match.as_ref().ok_or("match is missing")?;
        let RouteMatch { path, headers } = route_match(matcher)?;
        connect_upgrade(xds, matches!(path, PathMatch::Connect))?;
        let route_policy = policy::route_policy(self, xds, policy)?;
        let request_headers =
            header_edits(&xds.request_headers_to_add, &xds.request_headers_to_remove)
                .map_err(|e| format!("request_headers_to_add: {e}"))?
                .then(&outer.0);
        let response_headers = header_edits(
            &xds.response_headers_to_add,
            &xds.response_headers_to_remove,
        )
        .map_err(|e| format!("response_headers_to_add: {e}"))?
        .then(&outer.1);
        // A route that answers by itself (after its filters, as Envoy's router does).
        let local = match &xds.action {
            Some(route::Action::Redirect(redirect)) => {
                Some(redirect_action(redirect, &path).map_err(|e| format!("redirect.{e}"))?)
            }
            Some(route::Action::DirectResponse(direct)) => Some(
                direct_response(direct, body_limit).map_err(|e| format!("direct_response.{e}"))?,
            ),
            _ => None,
        };
        let (plugins, processors) = route_plugins(xds, plugins, policy)?;
        if let Some(local) = local {
            return Ok(self
                .local_route(
                    route_name,
                    RouteMatch { path, headers },
                    local,
                    response_headers,
                    plugins,
                )
                .with_processors(processors)
                .with_policy(route_policy)
                .with_tenant(self.tenant(xds)?));
        }
        let action = match &xds.action {
            Some(route::Action::Route(action)) => action,
            _ => {
                return Err("only route, redirect and direct_response actions are supported".into())
            }
        };
        let edits = RouteEdits {
            request_headers,
            response_headers,
            path: path_rewrite(action, &path)?,
            host: match &action.host_rewrite_specifier {
                None => None,
                Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(host)) => {
                    <http::uri::Authority as std::str::FromStr>::from_str(host).map_err(|_| {
                        format!("route.host_rewrite_literal: {host:?} is not a host")
                    })?;
                    Some(HostRewrite::Literal(host.clone()))
                }
                Some(route_action::HostRewriteSpecifier::AutoHostRewrite(on)) => {
                    on.value.then_some(HostRewrite::Auto)
                }
                Some(_) => {
                    return Err(
                        "route: only host_rewrite_literal and auto_host_rewrite are supported"
                            .into(),
                    )
                }
            },
        };
        let target = |cluster_name: &str, weight: u32| Target {
            cluster_name: cluster_name.into(),
            cluster: clusters.get(cluster_name).cloned(),
            weight,
            counters: self.metrics.request_counters(&route_name, cluster_name),
        };
        let targets = match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(name)) => vec![target(name, 1)],
            Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) => {
                if weighted.clusters.is_empty() {
                    return Err("route.weighted_clusters is empty".into());
                }
                weighted
                    .clusters
                    .iter()
                    .map(|c| target(&c.name, c.weight.as_ref().map_or(0, |w| w.value)))
                    .collect()
            }
            _ => return Err("route needs cluster or weighted_clusters".into()),
        };
        let timeout = match &action.timeout {
            Some(d) => duration(d).ok_or("route.timeout is negative")?,
            None => DEFAULT_ROUTE_TIMEOUT,
        };
        let retry = match &action.retry_policy {
            Some(policy) => retry_policy(policy).map_err(|e| format!("route.retry_policy.{e}"))?,
            None => RetryPolicy::default(),
        };
        let idle_timeout = action
            .idle_timeout
            .as_ref()
            .map(|d| duration(d).ok_or("route.idle_timeout is negative"))
            .transpose()?
            .filter(|d| !d.is_zero());
        Ok(Route::new(
            Arc::clone(&route_name),
            RouteMatch { path, headers },
            targets,
            timeout,
            retry,
            self.metrics.route_stats(&route_name),
            plugins,
        )
        .with_processors(processors)
        .with_idle_timeout(idle_timeout)
        .with_edits(edits)
        .with_locality(route_locality(xds)?)
        .with_hash_policy(hash_policy(action)?)
        .with_policy(route_policy)
        .with_tenant(self.tenant(xds)?))
    }
}

impl Compiler<'_> {
    /// The tenant of a route, with its counters.
    fn tenant(
        &self,
        xds: &envoy_types::pb::envoy::config::route::v3::Route,
    ) -> Result<Option<Tenant>, String> {
        Ok(route_tenant(xds)?.map(|(id, priority)| Tenant {
            counters: self.metrics.tenant_counters(&id),
            id,
            priority,
        }))
    }

    /// A route that answers by itself.
    pub(super) fn local_route(
        &self,
        name: Arc<str>,
        matcher: RouteMatch,
        local: LocalAction,
        response_headers: HeaderEdits,
        plugins: Vec<Arc<LoadedPlugin>>,
    ) -> Route {
        Route::new(
            Arc::clone(&name),
            matcher,
            Vec::new(),
            Duration::ZERO,
            RetryPolicy::default(),
            self.metrics.route_stats(&name),
            plugins,
        )
        .with_edits(RouteEdits {
            response_headers,
            ..RouteEdits::default()
        })
        .with_local_action(Some(local))
    }
}

/// A route's hash policy (Envoy's `RouteAction.hash_policy`): header, cookie (without
/// generating one), source IP and query parameter sources.
pub(super) fn hash_policy(
    action: &envoy_types::pb::envoy::config::route::v3::RouteAction,
) -> Result<Vec<HashPolicy>, String> {
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
    action
        .hash_policy
        .iter()
        .enumerate()
        .map(|(i, policy)| {
            let field = format!("route.hash_policy[{i}]");
            let source = match &policy.policy_specifier {
                Some(PolicySpecifier::Header(h)) => {
                    if h.regex_rewrite.is_some() {
                        return Err(format!("{field}.header.regex_rewrite is not supported"));
                    }
                    HashSource::Header(HeaderName::from_bytes(h.header_name.as_bytes()).map_err(
                        |_| {
                            format!(
                                "{field}.header.header_name: {:?} is not a header name",
                                h.header_name
                            )
                        },
                    )?)
                }
                Some(PolicySpecifier::Cookie(c)) => {
                    if c.ttl.is_some() {
                        return Err(format!(
                            "{field}.cookie.ttl: generating cookies is not supported"
                        ));
                    }
                    HashSource::Cookie(c.name.clone())
                }
                Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => {
                    HashSource::SourceIp
                }
                Some(PolicySpecifier::QueryParameter(q)) => {
                    HashSource::QueryParameter(q.name.clone())
                }
                Some(PolicySpecifier::ConnectionProperties(_)) => {
                    return Err(format!(
                        "{field}.connection_properties: source_ip must be true"
                    ))
                }
                Some(PolicySpecifier::FilterState(_)) => {
                    return Err(format!("{field}.filter_state is not supported"))
                }
                None => return Err(format!("{field}: no policy")),
            };
            Ok(HashPolicy {
                source,
                terminal: policy.terminal,
            })
        })
        .collect()
}

/// A route's retry policy (Envoy's `RetryPolicy`); errors name the field under
/// `retry_policy`.
pub(super) fn retry_policy(
    policy: &envoy_types::pb::envoy::config::route::v3::RetryPolicy,
) -> Result<RetryPolicy, String> {
    let positive = |d: &PbDuration, field: &str| {
        duration(d)
            .filter(|d| !d.is_zero())
            .ok_or(format!("{field} must be more than 0"))
    };
    let mut retry = RetryPolicy::parse(
        &policy.retry_on,
        policy.num_retries.as_ref().map_or(1, |n| n.value),
    )
    .map_err(|e| format!("retry_on: {e}"))?;
    retry.per_try_timeout = policy
        .per_try_timeout
        .as_ref()
        .map(|d| positive(d, "per_try_timeout"))
        .transpose()?;
    retry.retriable_status_codes = policy
        .retriable_status_codes
        .iter()
        .map(|&code| {
            u16::try_from(code)
                .ok()
                .filter(|c| (100..600).contains(c))
                .ok_or(format!(
                    "retriable_status_codes: {code} is not an HTTP status"
                ))
        })
        .collect::<Result<_, _>>()?;
    if let Some(back_off) = &policy.retry_back_off {
        let base = match &back_off.base_interval {
            Some(d) => positive(d, "retry_back_off.base_interval")?,
            None => return Err("retry_back_off.base_interval is required".into()),
        };
        let max = match &back_off.max_interval {
            Some(d) => positive(d, "retry_back_off.max_interval")?,
            None => base.saturating_mul(10),
        };
        if max < base {
            return Err("retry_back_off.max_interval must be at least base_interval".into());
        }
        retry.back_off = crate::route::BackOff { base, max };
    }
    Ok(retry)
}

/// A route's data locality from its metadata (`nip.locality` → `region`).
/// A tenant's id and the priority it gives its requests.
type TenantMetadata = (Arc<str>, Option<crate::upstream::concurrency::Priority>);

/// The tenant whose route this is and the priority it gives its requests (metadata
/// `nip.tenant`: `{ id, priority? }`), if any.
pub(super) fn route_tenant(
    xds: &envoy_types::pb::envoy::config::route::v3::Route,
) -> Result<Option<TenantMetadata>, String> {
    let Some(fields) = xds
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::TENANT_METADATA))
    else {
        return Ok(None);
    };
    use envoy_types::pb::google::protobuf::value::Kind;
    let priority = match fields.fields.get("priority").and_then(|v| v.kind.as_ref()) {
        None => None,
        Some(Kind::StringValue(p)) => Some(
            crate::upstream::concurrency::Priority::parse(p.as_bytes()).ok_or_else(|| {
                format!(
                    "metadata {}: priority {p:?} is not low, normal or high",
                    names::TENANT_METADATA
                )
            })?,
        ),
        Some(_) => {
            return Err(format!(
                "metadata {}: priority must be a string",
                names::TENANT_METADATA
            ))
        }
    };
    match fields.fields.get("id").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(id)) if !id.is_empty() => Ok(Some((id.as_str().into(), priority))),
        _ => Err(format!(
            "metadata {}: needs a non-empty string `id`",
            names::TENANT_METADATA
        )),
    }
}

pub(super) fn route_locality(
    xds: &envoy_types::pb::envoy::config::route::v3::Route,
) -> Result<Option<Arc<str>>, String> {
    let Some(fields) = xds
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::LOCALITY_METADATA))
    else {
        return Ok(None);
    };
    match fields.fields.get("region").and_then(|v| v.kind.as_ref()) {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(region))
            if !region.is_empty() =>
        {
            Ok(Some(region.as_str().into()))
        }
        _ => Err(format!(
            "metadata {}: needs a non-empty string `region`",
            names::LOCALITY_METADATA
        )),
    }
}

/// The plugins a route runs: the listener's filters that are on by default (not `disabled`)
/// unless the route switches them off, and those the route switches on
/// (`typed_per_filter_config` with `disabled: false`), ordered by the per-route position
/// (`UInt32Value` in `FilterConfig.config`), then as the listener lists them.
pub(super) fn route_plugins(
    xds: &envoy_types::pb::envoy::config::route::v3::Route,
    plugins: &PluginFilters,
    policy: &ManagerPolicy,
) -> Result<RoutePlugins, String> {
    let mut enabled = Vec::new();
    let mut processors = Vec::new();
    for (filter, any) in &xds.typed_per_filter_config {
        if policy.has(filter) {
            continue;
        }
        let prepared = plugins.get(filter);
        let processor = policy.processors.0.get(filter);
        if prepared.is_none() && processor.is_none() {
            return Err(format!(
                "typed_per_filter_config names {filter:?}, which is not a plugin filter of the listener"
            ));
        }
        if any.type_url != FilterConfig::type_url() {
            return Err(format!(
                "typed_per_filter_config[{filter:?}] must be a {}",
                FilterConfig::type_url()
            ));
        }
        let config: FilterConfig = decode(any)?;
        if config.disabled {
            continue;
        }
        let position = match &config.config {
            Some(inner) if inner.type_url == UInt32Value::type_url() => {
                decode::<UInt32Value>(inner)?.value
            }
            _ => u32::MAX,
        };
        if let Some(prepared) = prepared {
            enabled.push((position, prepared.order, prepared.plugin.clone()));
        } else if let Some((processor, order, _)) = processor {
            processors.push((position, *order, Arc::clone(processor)));
        }
    }
    for (filter, prepared) in plugins {
        if prepared.on_by_default && !xds.typed_per_filter_config.contains_key(filter) {
            enabled.push((u32::MAX, prepared.order, prepared.plugin.clone()));
        }
    }
    for (filter, (processor, order, on_by_default)) in &policy.processors.0 {
        if *on_by_default && !xds.typed_per_filter_config.contains_key(filter) {
            processors.push((u32::MAX, *order, Arc::clone(processor)));
        }
    }
    enabled.sort_by_key(|(position, order, _)| (*position, *order));
    processors.sort_by_key(|(position, order, _)| (*position, *order));
    Ok((
        enabled.into_iter().filter_map(|(_, _, p)| p).collect(),
        processors.into_iter().map(|(_, _, p)| p).collect(),
    ))
}

/// A route's plugins and its `ext_proc` processors, each in the order they run.
pub(super) type RoutePlugins = (Vec<Arc<LoadedPlugin>>, Vec<Arc<crate::ext_proc::ExtProc>>);

pub(super) fn header_match(h: &HeaderMatcher) -> Result<HeaderMatch, String> {
    let is_method = h.name == ":method";
    let name = if is_method {
        HeaderName::from_static("x-nip-method")
    } else {
        HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("name {:?} is not a valid header name", h.name))?
    };
    let value = match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(present)) => {
            if !present {
                // present_match: false means "absent"; express it as inverted presence.
                return Ok(HeaderMatch {
                    name,
                    is_method,
                    value: HeaderValueMatch::Present,
                    invert: !h.invert_match,
                });
            }
            HeaderValueMatch::Present
        }
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => {
            if sm.ignore_case {
                return Err("string_match.ignore_case is not supported".into());
            }
            match &sm.match_pattern {
                Some(string_matcher::MatchPattern::Exact(v)) => HeaderValueMatch::Exact(v.clone()),
                Some(string_matcher::MatchPattern::Prefix(v)) => {
                    HeaderValueMatch::Prefix(v.clone())
                }
                Some(string_matcher::MatchPattern::Suffix(v)) => HeaderValueMatch::Regex(
                    full_match_regex(&format!(".*{}", regex::escape(v)))
                        .map_err(|e| e.to_string())?,
                ),
                Some(string_matcher::MatchPattern::Contains(v)) => HeaderValueMatch::Regex(
                    full_match_regex(&format!(".*{}.*", regex::escape(v)))
                        .map_err(|e| e.to_string())?,
                ),
                Some(string_matcher::MatchPattern::SafeRegex(r)) => HeaderValueMatch::Regex(
                    full_match_regex(&r.regex).map_err(|e| format!("safe_regex: {e}"))?,
                ),
                _ => return Err("string_match pattern is not supported".into()),
            }
        }
        None => HeaderValueMatch::Present,
        Some(_) => {
            return Err("only string_match and present_match are supported".into());
        }
    };
    Ok(HeaderMatch {
        name,
        is_method,
        value,
        invert: h.invert_match,
    })
}

/// Header edits from Envoy's `*_headers_to_add` and `*_headers_to_remove` of one level.
pub(super) fn header_edits(
    add: &[HeaderValueOption],
    remove: &[String],
) -> Result<HeaderEdits, String> {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    let name_of = |name: &str, field: &str| {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{field}: {name:?} is not a header name"))?;
        if name.starts_with(':') || header == http::header::HOST {
            return Err(format!(
                "{field}: {name:?} cannot be edited (use the route's host rewrite)"
            ));
        }
        Ok(header)
    };
    let mut edits = HeaderEdits::default();
    for (i, option) in add.iter().enumerate() {
        let field = format!("[{i}]");
        let header = option
            .header
            .as_ref()
            .ok_or(format!("{field}.header is missing"))?;
        let name = name_of(&header.key, &format!("{field}.header.key"))?;
        let text = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8(header.raw_value.clone())
                .map_err(|_| format!("{field}.header.raw_value is not UTF-8"))?
        };
        let value =
            ValueTemplate::parse(&text).map_err(|e| format!("{field}.header.value: {e}"))?;
        if let Some(literal) = value.literal() {
            http::HeaderValue::from_str(literal)
                .map_err(|_| format!("{field}.header.value: {literal:?} is not a header value"))?;
        }
        #[allow(deprecated)]
        let action = match (
            option.append.as_ref(),
            HeaderAppendAction::try_from(option.append_action),
        ) {
            (Some(append), _) if option.append_action == 0 => {
                if append.value {
                    AppendAction::Append
                } else {
                    AppendAction::Overwrite
                }
            }
            (Some(_), _) => {
                return Err(format!(
                    "{field}: append and append_action cannot both be set"
                ))
            }
            (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => AppendAction::Append,
            (None, Ok(HeaderAppendAction::AddIfAbsent)) => AppendAction::AddIfAbsent,
            (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => AppendAction::Overwrite,
            (None, Ok(HeaderAppendAction::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
            (None, Err(_)) => {
                return Err(format!(
                    "{field}.append_action {} is unknown",
                    option.append_action
                ))
            }
        };
        edits.add.push(HeaderAdd {
            name,
            value,
            action,
            keep_empty_value: option.keep_empty_value,
        });
    }
    for (i, name) in remove.iter().enumerate() {
        edits.remove.push(name_of(name, &format!("(remove)[{i}]"))?);
    }
    Ok(edits)
}

/// The forwarded path's rewrite (`prefix_rewrite` or `regex_rewrite`).
pub(super) fn path_rewrite(
    action: &RouteAction,
    path: &PathMatch,
) -> Result<Option<PathRewrite>, String> {
    match (action.prefix_rewrite.is_empty(), &action.regex_rewrite) {
        (true, None) => Ok(None),
        (false, Some(_)) => {
            Err("route: prefix_rewrite and regex_rewrite exclude each other".into())
        }
        (false, None) => prefix_rewrite(&action.prefix_rewrite, path)
            .map(Some)
            .map_err(|e| format!("route.prefix_rewrite: {e}")),
        (true, Some(rewrite)) => regex_rewrite(rewrite)
            .map(Some)
            .map_err(|e| format!("route.regex_rewrite: {e}")),
    }
}

pub(super) fn prefix_rewrite(replacement: &str, path: &PathMatch) -> Result<PathRewrite, String> {
    let matched = match path {
        PathMatch::Prefix(prefix) | PathMatch::Exact(prefix) => prefix.clone(),
        PathMatch::Regex(_) => return Err("needs a prefix or path match, not a regex".into()),
        PathMatch::Connect => return Err("a CONNECT request has no path to rewrite".into()),
    };
    if let Some(problem) = nip_xds::config::path_text_problem(replacement) {
        return Err(problem);
    }
    Ok(PathRewrite::Prefix {
        matched,
        replacement: replacement.to_string(),
    })
}

pub(super) fn regex_rewrite(
    rewrite: &envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute,
) -> Result<PathRewrite, String> {
    let pattern = rewrite.pattern.as_ref().ok_or("pattern is missing")?;
    let regex = Regex::new(&pattern.regex).map_err(|e| {
        format!(
            "pattern.regex: {}",
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    })?;
    if let Some(problem) = nip_xds::config::substitution_problem(&rewrite.substitution) {
        return Err(format!("substitution: {problem}"));
    }
    Ok(PathRewrite::Regex {
        pattern: regex,
        substitution: crate::route::actions::envoy_substitution(&rewrite.substitution),
    })
}

/// A `RedirectAction`; errors name the field under `redirect`.
pub(super) fn redirect_action(
    redirect: &RedirectAction,
    path: &PathMatch,
) -> Result<LocalAction, String> {
    use envoy_types::pb::envoy::config::route::v3::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
    };
    let scheme = match &redirect.scheme_rewrite_specifier {
        None => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(https)) => https.then(|| "https".to_string()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(scheme)) => match scheme.as_str() {
            "http" | "https" => Some(scheme.clone()),
            other => return Err(format!("scheme_redirect: {other:?} is not http or https")),
        },
    };
    if !redirect.host_redirect.is_empty() {
        <http::uri::Authority as std::str::FromStr>::from_str(&redirect.host_redirect)
            .map_err(|_| format!("host_redirect: {:?} is not a host", redirect.host_redirect))?;
    }
    let port = u16::try_from(redirect.port_redirect)
        .map_err(|_| format!("port_redirect: {} is not a port", redirect.port_redirect))?;
    let path = match &redirect.path_rewrite_specifier {
        None => None,
        Some(PathRewriteSpecifier::PathRedirect(to)) => {
            if let Some(problem) = nip_xds::config::redirect_path_problem(to) {
                return Err(format!("path_redirect: {to:?}: {problem}"));
            }
            Some(RedirectPath::Replace(to.clone()))
        }
        Some(PathRewriteSpecifier::PrefixRewrite(to)) => Some(RedirectPath::Rewrite(
            prefix_rewrite(to, path).map_err(|e| format!("prefix_rewrite: {e}"))?,
        )),
        Some(PathRewriteSpecifier::RegexRewrite(rewrite)) => Some(RedirectPath::Rewrite(
            regex_rewrite(rewrite).map_err(|e| format!("regex_rewrite: {e}"))?,
        )),
        Some(PathRewriteSpecifier::PathRewrite(_)) => {
            return Err("path_rewrite (a path template) is not supported".into())
        }
    };
    let status = match RedirectResponseCode::try_from(redirect.response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => 301,
        Ok(RedirectResponseCode::Found) => 302,
        Ok(RedirectResponseCode::SeeOther) => 303,
        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => {
            return Err(format!(
                "response_code {} is unknown",
                redirect.response_code
            ))
        }
    };
    Ok(LocalAction::Redirect(Redirect {
        scheme,
        host: (!redirect.host_redirect.is_empty()).then(|| redirect.host_redirect.clone()),
        port,
        path,
        status,
        strip_query: redirect.strip_query,
    }))
}

/// A `DirectResponseAction` (inline bodies, at most `limit` bytes).
pub(super) fn direct_response(
    direct: &DirectResponseAction,
    limit: usize,
) -> Result<LocalAction, String> {
    let status = u16::try_from(direct.status)
        .ok()
        .filter(|s| (200..600).contains(s))
        .ok_or(format!("status: {} must be 200–599", direct.status))?;
    if direct.body_format.is_some() {
        return Err("body_format is not supported".into());
    }
    let body = match direct.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => Vec::new(),
        Some(data_source::Specifier::InlineString(text)) => text.clone().into_bytes(),
        Some(data_source::Specifier::InlineBytes(bytes)) => bytes.clone(),
        Some(_) => return Err("body: only inline_string and inline_bytes are supported".into()),
    };
    if body.len() > limit {
        return Err(format!(
            "body: {} bytes is more than max_direct_response_body_size_bytes ({limit})",
            body.len()
        ));
    }
    Ok(LocalAction::DirectResponse {
        status,
        body: bytes::Bytes::from(body),
    })
}

pub(super) fn full_match_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        format!(
            "invalid regex: {}",
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}

/// A CONNECT route terminates the tunnel (its action's CONNECT `upgrade_configs` entry
/// has a `connect_config`: NIP answers 200 and relays the bytes to the cluster as TCP);
/// forwarding CONNECT to an upstream proxy is not supported, and other routes may not ask
/// for CONNECT.
fn connect_upgrade(
    xds: &envoy_types::pb::envoy::config::route::v3::Route,
    connect_route: bool,
) -> Result<(), String> {
    let upgrades = match &xds.action {
        Some(route::Action::Route(action)) => action.upgrade_configs.as_slice(),
        _ if connect_route => {
            return Err("a connect_matcher route needs a route action to a cluster".into())
        }
        _ => &[],
    };
    let mut terminates = false;
    for (i, upgrade) in upgrades.iter().enumerate() {
        let enabled = upgrade.enabled.as_ref().is_none_or(|e| e.value);
        if upgrade
            .upgrade_type
            .eq_ignore_ascii_case(nip_xds::resources::CONNECT_UPGRADE)
        {
            if !connect_route {
                return Err(format!(
                    "route.upgrade_configs[{i}]: CONNECT on a route without connect_matcher"
                ));
            }
            if enabled && upgrade.connect_config.is_none() {
                return Err(format!(
                    "route.upgrade_configs[{i}]: forwarding CONNECT to an upstream proxy is not supported; connect_config: {{}} terminates it here"
                ));
            }
            terminates |= enabled;
        } else if !upgrade.upgrade_type.eq_ignore_ascii_case("websocket") {
            return Err(format!(
                "route.upgrade_configs[{i}]: upgrade type {:?} is not supported (CONNECT, websocket)",
                upgrade.upgrade_type
            ));
        }
    }
    if connect_route && !terminates {
        return Err("a connect_matcher route needs route.upgrade_configs [{ upgrade_type: CONNECT, connect_config: {} }]".into());
    }
    Ok(())
}

/// A `RouteMatch` (a route's, a JWT requirement rule's).
pub(super) fn route_match(
    matcher: &envoy_types::pb::envoy::config::route::v3::RouteMatch,
) -> Result<RouteMatch, String> {
    let path = match &matcher.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(route_match::PathSpecifier::SafeRegex(r)) => PathMatch::Regex(
            full_match_regex(&r.regex).map_err(|e| format!("match.safe_regex: {e}"))?,
        ),
        Some(route_match::PathSpecifier::ConnectMatcher(_)) => PathMatch::Connect,
        Some(_) => {
            return Err(
                "match: only prefix, path, safe_regex and connect_matcher are supported".into(),
            )
        }
        None => return Err("match needs a path specifier".into()),
    };
    if matcher.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err("match.case_sensitive=false is not supported".into());
    }
    let headers = matcher
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_match(h).map_err(|e| format!("match.headers[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RouteMatch { path, headers })
}
