//! Compiling a `Cluster` and its `ClusterLoadAssignment`: balancing policy, health
//! checks, breakers, outlier detection, adaptive concurrency (`cluster_policies.rs`), and
//! the endpoints with their localities, weights, priorities and shared state.

use super::*;

/// Envoy's default connect timeout, used when a cluster gives none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Compiler<'_> {
    pub(super) fn cluster(
        &self,
        xds: &XdsCluster,
        assignments: &[ClusterLoadAssignment],
        prepared: &Prepared,
    ) -> Result<Cluster, CompileError> {
        let name = xds.name.as_str();
        let fail = |m: String| err("Cluster", name, m);
        let discovery = match &xds.cluster_discovery_type {
            Some(cluster::ClusterDiscoveryType::Type(t)) => cluster::DiscoveryType::try_from(*t)
                .map_err(|_| fail(format!("type {t} is unknown")))?,
            Some(cluster::ClusterDiscoveryType::ClusterType(_)) => {
                return Err(fail(
                    "cluster_type (custom cluster) is not supported".into(),
                ))
            }
            None => cluster::DiscoveryType::Static,
        };
        let assignment = match discovery {
            cluster::DiscoveryType::Eds => {
                let service_name = xds
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.as_str())
                    .filter(|s| !s.is_empty())
                    .unwrap_or(name);
                assignments.iter().find(|a| a.cluster_name == service_name)
            }
            cluster::DiscoveryType::Static | cluster::DiscoveryType::StrictDns => {
                xds.load_assignment.as_ref()
            }
            cluster::DiscoveryType::OriginalDst => {
                if xds.load_assignment.is_some() || xds.transport_socket.is_some() {
                    return Err(fail(
                        "an ORIGINAL_DST cluster has no load_assignment and no transport_socket here"
                            .into(),
                    ));
                }
                None
            }
            other => {
                return Err(fail(format!(
                    "type {} is not supported (use EDS, STATIC, STRICT_DNS or ORIGINAL_DST)",
                    other.as_str_name()
                )))
            }
        };
        let original_destination = discovery == cluster::DiscoveryType::OriginalDst;
        let cluster_provided = xds.lb_policy == cluster::LbPolicy::ClusterProvided as i32;
        if original_destination != cluster_provided {
            return Err(fail(
                "lb_policy CLUSTER_PROVIDED goes with type ORIGINAL_DST, and only with it".into(),
            ));
        }
        let lb = match load_balancing_policy(xds).map_err(fail)? {
            Some(policy) => policy,
            // The original destination is the one endpoint: nothing to balance.
            None if original_destination => crate::upstream::lb::LbPolicy::RoundRobin,
            None => legacy_lb_policy(xds).map_err(fail)?,
        };
        let connect_timeout = match &xds.connect_timeout {
            Some(d) => duration(d).ok_or_else(|| fail("connect_timeout is negative".into()))?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        if connect_timeout.is_zero() {
            return Err(fail("connect_timeout must be more than 0".into()));
        }
        let health_check = match xds.health_checks.as_slice() {
            [] => None,
            [hc] => Some(health_check_spec(hc).map_err(fail)?),
            _ => {
                return Err(fail(
                    "only one health check per cluster is supported".into(),
                ))
            }
        };
        let http2 = upstream_http2(xds).map_err(fail)?;
        // The TLS settings are checked here; their files were read by prepare.
        let tls = super::cluster_policies::upstream_tls_spec(xds)
            .map_err(fail)?
            .and_then(|_| prepared.upstream_tls.get(name).cloned());
        let transports = Transports {
            http2,
            connect_timeout,
            matches: super::cluster_policies::transport_socket_matches(xds)
                .map_err(fail)?
                .into_iter()
                .enumerate()
                .map(|(i, entry)| {
                    (
                        entry.criteria,
                        prepared
                            .upstream_tls_matches
                            .get(&(name.to_string(), i))
                            .cloned(),
                    )
                })
                .collect(),
            default: tls,
        };
        let endpoints = match assignment {
            Some(cla) => self.endpoints(name, cla, prepared, &transports)?,
            None => Vec::new(),
        };
        let outlier = xds
            .outlier_detection
            .as_ref()
            .map(|od| outlier_config(od, xds))
            .transpose()
            .map_err(fail)?;
        let breakers = circuit_breakers(xds).map_err(fail)?;
        let adaptive = adaptive_concurrency(xds)
            .map_err(fail)?
            .map(|(config, status)| AdaptiveConcurrency {
                controller: self.registry.concurrency_controller(name, config),
                status,
            });
        Ok(Cluster::new(
            name.into(),
            lb,
            http2,
            connect_timeout,
            endpoints,
            health_check,
            self.metrics.cluster_stats(name),
        )
        .with_outlier_detection(outlier)
        .with_circuit_breakers(breakers)
        // HTTP/2 carries many requests per connection; max_requests limits those.
        .with_connection_slots((!http2).then(|| {
            self.registry.connection_slots(
                name,
                breakers.max_connections,
                breakers.max_pending_requests,
            )
        }))
        .with_adaptive_concurrency(adaptive)
        .with_original_destination(original_destination)
        .with_ring(ring_size(xds).map_err(fail)?)
        .with_locality_weights(matches!(
            xds.common_lb_config
                .as_ref()
                .and_then(|c| c.locality_config_specifier.as_ref()),
            Some(cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        )))
    }

    pub(super) fn endpoints(
        &self,
        cluster: &str,
        cla: &ClusterLoadAssignment,
        prepared: &Prepared,
        transports: &Transports,
    ) -> Result<Vec<Endpoint>, CompileError> {
        let mut endpoints = Vec::new();
        for (li, locality_endpoints) in cla.endpoints.iter().enumerate() {
            let locality = locality_endpoints
                .locality
                .as_ref()
                .map(|l| Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    sub_zone: l.sub_zone.clone(),
                })
                .unwrap_or_default();
            for (ei, lb_endpoint) in locality_endpoints.lb_endpoints.iter().enumerate() {
                let field = format!("endpoints[{li}].lb_endpoints[{ei}]");
                let fail = |m: String| {
                    err(
                        "ClusterLoadAssignment",
                        &cla.cluster_name,
                        format!("{field}: {m}"),
                    )
                };
                let (address, hostname) = match &lb_endpoint.host_identifier {
                    Some(lb_endpoint::HostIdentifier::Endpoint(e)) => (
                        e.address
                            .as_ref()
                            .ok_or_else(|| fail("endpoint.address is missing".into()))?,
                        e.hostname.as_str(),
                    ),
                    _ => return Err(fail("only endpoint addresses are supported".into())),
                };
                let hostname = match (hostname, &address.address) {
                    ("", Some(address::Address::SocketAddress(sa)))
                        if sa.address.parse::<std::net::IpAddr>().is_err() =>
                    {
                        Some(sa.address.as_str().into())
                    }
                    ("", _) => None,
                    (name, _) => Some(name.into()),
                };
                let address = socket_addr(address, prepared).map_err(fail)?;
                if endpoints.iter().any(|e: &Endpoint| e.address == address) {
                    return Err(fail(format!("{address} is listed twice")));
                }
                let weight = lb_endpoint
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |w| w.value);
                if weight == 0 {
                    return Err(fail("load_balancing_weight must be at least 1".into()));
                }
                let tls = transports
                    .settings_for(
                        lb_endpoint.metadata.as_ref(),
                        locality_endpoints.metadata.as_ref(),
                    )
                    .map(|settings| {
                        settings
                            .for_endpoint(
                                address,
                                hostname.as_deref(),
                                transports.http2,
                                transports.connect_timeout,
                            )
                            .map(Arc::new)
                    })
                    .transpose()
                    .map_err(|e| fail(format!("transport_socket: {e}")))?;
                endpoints.push(Endpoint {
                    address,
                    locality: locality.clone(),
                    weight,
                    priority: locality_endpoints.priority,
                    locality_weight: locality_endpoints
                        .load_balancing_weight
                        .as_ref()
                        .map_or(1, |w| w.value.max(1)),
                    state: self.registry.state(cluster, address),
                    hostname,
                    tls,
                    locality_picks: self.metrics.locality_picks(
                        cluster,
                        &locality.region,
                        &locality.zone,
                        &locality.sub_zone,
                    ),
                });
            }
        }
        Ok(endpoints)
    }
}

/// How a cluster's endpoints are reached: `transport_socket_matches` entries in order, each
/// with its TLS (`None`: plaintext), else the cluster's own transport socket; and what each
/// endpoint's connector needs.
pub(super) struct Transports {
    matches: Vec<(
        envoy_types::pb::google::protobuf::Struct,
        Option<Arc<crate::upstream::tls::UpstreamTls>>,
    )>,
    default: Option<Arc<crate::upstream::tls::UpstreamTls>>,
    http2: bool,
    connect_timeout: std::time::Duration,
}

impl Transports {
    /// The TLS of an endpoint with these metadata (the endpoint's, then its locality's,
    /// under `envoy.transport_socket_match`): the first entry whose every field they hold
    /// with the same value, else the cluster's.
    fn settings_for(
        &self,
        endpoint: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
        locality: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
    ) -> Option<&Arc<crate::upstream::tls::UpstreamTls>> {
        let labels = endpoint
            .and_then(|m| {
                m.filter_metadata
                    .get(names::TRANSPORT_SOCKET_MATCH_METADATA)
            })
            .or_else(|| {
                locality.and_then(|m| {
                    m.filter_metadata
                        .get(names::TRANSPORT_SOCKET_MATCH_METADATA)
                })
            });
        let holds = |key: &String, value| labels.and_then(|l| l.fields.get(key)) == Some(value);
        self.matches
            .iter()
            .find(|(criteria, _)| criteria.fields.iter().all(|(k, v)| holds(k, v)))
            .map_or(self.default.as_ref(), |(_, tls)| tls.as_ref())
    }
}
