"""An independent xDS server (grpcio + xds-protos, no NIP code) that configures a NIP proxy
the way Istio configures an Envoy sidecar's outbound listener.

Listener "virtualOutbound" on LISTEN_PORT with use_original_dst, the tls_inspector and
http_inspector listener filters (1 s, continuing on timeout so server-first protocols
pass), and three ways out:
  * HTTP/1.1 or h2c (application_protocols) -> the connection manager, RDS "local_route",
    cluster "backend" (EDS, HTTP_PORT);
  * TLS whose SNI is passthrough.test -> tcp_proxy to cluster "tls" (EDS, TLS_PORT), bytes
    untouched;
  * anything else (default_filter_chain) -> tcp_proxy "opaque" to cluster "tcp" (EDS,
    TCP_PORT), idle_timeout 2 s.
And listener "virtualInbound" on INBOUND_PORT, a connection manager of its own whose inline
route answers every request itself (200 "inbound"): two listeners, two managers.
Once every type is ACKed it pushes version 2, whose listener adds a listener filter NIP
does not run: the proxy must NACK it by name and keep serving version 1.

Prints "listening", then "ACK TYPE VERSION" / "NACK TYPE REASON" lines, flushed.

Usage: sidecar_xds_server.py XDS_PORT LISTEN_PORT HTTP_PORT TLS_PORT TCP_PORT INBOUND_PORT
"""

import asyncio
import sys

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf import duration_pb2, wrappers_pb2

from xds_server import CLUSTER, ENDPOINT, LISTENER, ROUTE, Ads, ads_source, packed, socket


def network_filter(name: str, config) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name=name, typed_config=packed(config))


def tcp_proxy(stat_prefix: str, cluster: str, idle_seconds: int = 0):
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    if idle_seconds:
        proxy.idle_timeout.CopyFrom(duration_pb2.Duration(seconds=idle_seconds))
    return network_filter("envoy.filters.network.tcp_proxy", proxy)


def outbound_listener(listen_port: int, extra_listener_filter: bool):
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="outbound_http",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name="local_route"),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
            )
        ],
    )
    listener_filters = [
        listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.tls_inspector",
            typed_config=packed(tls_inspector_pb2.TlsInspector()),
        ),
        listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.http_inspector",
            typed_config=packed(http_inspector_pb2.HttpInspector()),
        ),
    ]
    if extra_listener_filter:
        listener_filters.append(
            listener_components_pb2.ListenerFilter(name="envoy.filters.listener.proxy_protocol")
        )
    return listener_pb2.Listener(
        name="virtualOutbound",
        address=socket(listen_port),
        use_original_dst=wrappers_pb2.BoolValue(value=True),
        listener_filters=listener_filters,
        listener_filters_timeout=duration_pb2.Duration(seconds=1),
        continue_on_listener_filters_timeout=True,
        filter_chains=[
            listener_components_pb2.FilterChain(
                name="http",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    transport_protocol="raw_buffer", application_protocols=["http/1.1", "h2c"]
                ),
                filters=[
                    network_filter("envoy.filters.network.http_connection_manager", manager)
                ],
            ),
            listener_components_pb2.FilterChain(
                name="tls-passthrough",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    transport_protocol="tls", server_names=["passthrough.test"]
                ),
                filters=[tcp_proxy("passthrough", "tls")],
            ),
        ],
        default_filter_chain=listener_components_pb2.FilterChain(
            name="opaque", filters=[tcp_proxy("opaque", "tcp", idle_seconds=2)]
        ),
    )


def inbound_listener(inbound_port: int):
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="inbound_http",
        route_config=route_pb2.RouteConfiguration(
            name="inbound",
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name="local",
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            direct_response=route_components_pb2.DirectResponseAction(
                                status=200, body=base_pb2.DataSource(inline_string="inbound")
                            ),
                        )
                    ],
                )
            ],
        ),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name="virtualInbound",
        address=socket(inbound_port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[network_filter("envoy.filters.network.http_connection_manager", manager)]
            )
        ],
    )


def resources(listen_port: int, inbound_port: int, ports: dict, v2: bool) -> dict:
    routes = route_pb2.RouteConfiguration(
        name="local_route",
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster="backend"),
                    )
                ],
            )
        ],
    )
    clusters = [
        cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
            connect_timeout=duration_pb2.Duration(seconds=1),
        )
        for name in ports
    ]
    assignments = [
        endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(address=socket(port))
                        )
                    ]
                )
            ],
        )
        for name, port in ports.items()
    ]
    listeners = [
        outbound_listener(listen_port, extra_listener_filter=v2),
        inbound_listener(inbound_port),
    ]
    return {
        LISTENER: {listener.name: listener for listener in listeners},
        ROUTE: {routes.name: routes},
        CLUSTER: {c.name: c for c in clusters},
        ENDPOINT: {a.cluster_name: a for a in assignments},
    }


async def main() -> None:
    xds_port, listen_port, http_port, tls_port, tcp_port, inbound_port = (
        int(a) for a in sys.argv[1:7]
    )
    ports = {"backend": http_port, "tls": tls_port, "tcp": tcp_port}
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        Ads(
            resources(listen_port, inbound_port, ports, v2=False),
            resources(listen_port, inbound_port, ports, v2=True),
        ),
        server,
    )
    server.add_insecure_port(f"127.0.0.1:{xds_port}")
    await server.start()
    print("listening", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
