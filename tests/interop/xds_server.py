"""An independent xDS server (grpcio + xds-protos, no NIP code) that drives a NIP proxy.

It serves, over ADS state of the world, resources written the way any Envoy control plane
writes them: a Listener "ingress" on LISTEN_PORT whose connection manager takes routes over
RDS ("local_route"), a route to cluster "backend", an EDS cluster and its endpoint at
BACKEND_PORT. Once the client has ACKed all four types it pushes version 2: a route for
/v2 to a new cluster "backend2" (at BACKEND2_PORT) with Envoy's gateway fields (prefix and
host rewrites, header edits at the route, virtual host and route configuration levels with
%VARIABLE%s, a retry policy with retriable status codes and back-off, an idle timeout), a
redirect and a direct response, and clusters with "backend2" and one the proxy cannot run
(LOGICAL_DNS) or that sets a field NIP does not implement. The proxy must apply the good
ones and NACK the clusters with a reason naming the bad ones.

Prints one line per event, flushed: "listening", "ACK TYPE VERSION", "NACK TYPE REASON".
With PLUGIN (a proxy-wasm module file), version 2's connection manager also carries a
Wasm filter that is not `disabled`: Envoy runs such a filter on every route.

Usage: xds_server.py XDS_PORT LISTEN_PORT BACKEND_PORT BACKEND2_PORT [PLUGIN]
"""

import asyncio
import sys

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as wasm_filter_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def packed(message) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)
    return value


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def socket(port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def stamp_filter(plugin: str) -> hcm_pb2.HttpFilter:
    """A Wasm filter on every route (not disabled) that stamps responses with x-stamp."""
    config = wasm_pb2.PluginConfig(
        name="stamp",
        vm_config=wasm_pb2.VmConfig(
            runtime="envoy.wasm.runtime.v8",
            code=base_pb2.AsyncDataSource(local=base_pb2.DataSource(filename=plugin)),
        ),
        configuration=packed(wrappers_pb2.StringValue(value="x-stamp=on")),
    )
    return hcm_pb2.HttpFilter(
        name="stamp", typed_config=packed(wasm_filter_pb2.Wasm(config=config))
    )


def resources(listen_port: int, backend_ports: tuple, v2: bool, plugin: str = "") -> dict:
    filters = [stamp_filter(plugin)] if v2 and plugin else []
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="ingress",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name="local_route"),
        http_filters=filters + [
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
            )
        ],
    )
    listener = listener_pb2.Listener(
        name="ingress",
        address=socket(listen_port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=packed(manager),
                    )
                ]
            )
        ],
    )
    def add(name: str, value: str, action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD):
        return base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=value), append_action=action
        )

    gateway_routes = [
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(path="/moved"),
            redirect=route_components_pb2.RedirectAction(
                https_redirect=True,
                path_redirect="/here",
                response_code=route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
            ),
        ),
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(path="/ping"),
            direct_response=route_components_pb2.DirectResponseAction(
                status=202, body=base_pb2.DataSource(inline_string="pong")
            ),
        ),
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/v2"),
            route=route_components_pb2.RouteAction(
                cluster="backend2",
                prefix_rewrite="/internal",
                host_rewrite_literal="backend2.local",
                idle_timeout=duration_pb2.Duration(seconds=5),
                retry_policy=route_components_pb2.RetryPolicy(
                    retry_on="retriable-status-codes",
                    retriable_status_codes=[409],
                    retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
                        base_interval=duration_pb2.Duration(nanos=10_000_000)
                    ),
                ),
            ),
            request_headers_to_add=[add("x-route", "%PROTOCOL%")],
            response_headers_to_add=[add("x-upstream", "%UPSTREAM_HOST%")],
        ),
    ]
    routes = route_pb2.RouteConfiguration(
        name="local_route",
        request_headers_to_add=[
            add("x-level", "config", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        ] if v2 else [],
        response_headers_to_remove=["x-internal"] if v2 else [],
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                request_headers_to_add=[add("x-level", "vhost")] if v2 else [],
                request_headers_to_remove=["x-drop"] if v2 else [],
                routes=(gateway_routes if v2 else []) + [
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster="backend"),
                    )
                ],
            )
        ],
    )
    def eds_cluster(name: str) -> cluster_pb2.Cluster:
        return cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
            connect_timeout=duration_pb2.Duration(seconds=1),
            lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        )

    clusters = [eds_cluster("backend")]
    if v2:
        clusters.append(eds_cluster("backend2"))
        clusters.append(
            cluster_pb2.Cluster(
                name="logical",
                type=cluster_pb2.Cluster.LOGICAL_DNS,
                connect_timeout=duration_pb2.Duration(seconds=1),
            )
        )
        # A field NIP does not implement: refused by name, never ignored.
        buffered = eds_cluster("buffered")
        buffered.per_connection_buffer_limit_bytes.value = 32768
        clusters.append(buffered)
    def assignment(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
        return endpoint_pb2.ClusterLoadAssignment(
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

    assignments = [assignment("backend", backend_ports[0])]
    if v2:
        assignments.append(assignment("backend2", backend_ports[1]))
        assignments.append(assignment("buffered", backend_ports[1]))
    return {
        LISTENER: {listener.name: listener},
        ROUTE: {routes.name: routes},
        CLUSTER: {c.name: c for c in clusters},
        ENDPOINT: {a.cluster_name: a for a in assignments},
    }


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """ADS state of the world: FIRST (resources by type URL, then by name) at version 1;
    once the client has ACKed every type, SECOND (if any) at version 2."""

    def __init__(self, first: dict, second: dict = None) -> None:
        self.first = first
        self.second = second

    async def StreamAggregatedResources(self, request_iterator, context):
        outbox: asyncio.Queue = asyncio.Queue()
        versions = {t: "1" for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)}
        current = self.first
        subscribed: dict = {}
        last_nonce: dict = {}
        acked: set = set()
        nonce = 0

        def respond(type_url: str) -> None:
            nonlocal nonce
            names = subscribed.get(type_url) or []
            of_type = current[type_url]
            chosen = [r for n, r in of_type.items() if not names or n in names]
            nonce += 1
            last_nonce[type_url] = str(nonce)
            outbox.put_nowait(
                discovery_pb2.DiscoveryResponse(
                    version_info=versions[type_url],
                    type_url=type_url,
                    nonce=str(nonce),
                    resources=[packed(r) for r in chosen],
                )
            )

        async def push_version_2() -> None:
            nonlocal current
            await asyncio.sleep(0.3)
            current = self.second
            for type_url in (CLUSTER, ENDPOINT, ROUTE, LISTENER):
                versions[type_url] = "2"
            respond(CLUSTER)
            respond(ROUTE)
            respond(LISTENER)

        async def read() -> None:
            try:
                await read_requests()
            except Exception as error:  # a bug here must not look like a silent server
                print("ERROR", repr(error), flush=True)
            outbox.put_nowait(None)

        async def read_requests() -> None:
            pushed = False
            async for request in request_iterator:
                type_url = request.type_url
                if request.response_nonce and request.response_nonce != last_nonce.get(type_url):
                    continue  # stale
                if request.HasField("error_detail"):
                    print("NACK", type_url, request.error_detail.message, flush=True)
                    continue
                if request.response_nonce:
                    print("ACK", type_url, request.version_info, flush=True)
                    acked.add(type_url)
                names = list(request.resource_names)
                if request.response_nonce == "" or names != subscribed.get(type_url):
                    subscribed[type_url] = names
                    respond(type_url)
                if not pushed and len(acked) == 4 and self.second is not None:
                    pushed = True
                    asyncio.ensure_future(push_version_2())

        reader = asyncio.ensure_future(read())
        while True:
            response = await outbox.get()
            if response is None:
                break
            yield response
        reader.cancel()


async def main() -> None:
    xds_port, listen_port, backend_port, backend2_port = (int(a) for a in sys.argv[1:5])
    plugin = sys.argv[5] if len(sys.argv) > 5 else ""
    server = grpc.aio.server()
    backends = (backend_port, backend2_port)
    first = resources(listen_port, backends, v2=False)
    second = resources(listen_port, backends, v2=True, plugin=plugin)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(first, second), server)
    server.add_insecure_port(f"127.0.0.1:{xds_port}")
    await server.start()
    print("listening", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
