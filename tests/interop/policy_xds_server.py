"""An independent xDS server (grpcio + xds-protos + PyJWT, no NIP code) whose listener
carries Envoy's edge policy filters, written as any Envoy control plane writes them:

  jwt_authn   provider "idp" (RS256 key made here, local_jwks inline, claim_to_headers
              x-user <- sub), requirement_map "needs-idp", chosen per route
  rbac        DENY policy "no-delete": any DELETE
  local_ratelimit  no bucket of its own; route "/jwt" has a per-route token bucket of 3
                   per minute with the x-ratelimit headers
  router

Routes: "/jwt" (jwt_authn per-route requirement_name needs-idp + the bucket) and "/" to
cluster "backend" (EDS, endpoint at BACKEND_PORT).

Prints "TOKEN <jwt>" (a valid token for the provider), "listening", then one line per
event: "ACK TYPE VERSION", "NACK TYPE REASON".

Usage: policy_xds_server.py XDS_PORT LISTEN_PORT BACKEND_PORT
"""

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import token_bucket_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from google.protobuf import duration_pb2, wrappers_pb2
from jwt.algorithms import RSAAlgorithm

from xds_server import CLUSTER, ENDPOINT, LISTENER, ROUTE, Ads, ads_source, packed, socket

ISSUER = "https://issuer.example"


def key_and_token() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    claims = {"iss": ISSUER, "aud": "api", "sub": "xds-user", "exp": int(time.time()) + 3600}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    return json.dumps({"keys": [jwk]}), token


def resources(listen_port: int, backend_port: int, jwks: str) -> dict:
    authn = jwt_pb2.JwtAuthentication(
        providers={
            "idp": jwt_pb2.JwtProvider(
                issuer=ISSUER,
                audiences=["api"],
                local_jwks=base_pb2.DataSource(inline_string=jwks),
                payload_in_metadata="idp",
                claim_to_headers=[jwt_pb2.JwtClaimToHeader(header_name="x-user", claim_name="sub")],
            )
        },
        requirement_map={"needs-idp": jwt_pb2.JwtRequirement(provider_name="idp")},
    )
    deny_deletes = rbac_pb2.RBAC(
        rules=rbac_config_pb2.RBAC(
            action=rbac_config_pb2.RBAC.DENY,
            policies={
                "no-delete": rbac_config_pb2.Policy(
                    permissions=[
                        rbac_config_pb2.Permission(
                            header=rc.HeaderMatcher(
                                name=":method",
                                string_match=string_pb2.StringMatcher(exact="DELETE"),
                            )
                        )
                    ],
                    principals=[rbac_config_pb2.Principal(any=True)],
                )
            },
        )
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="ingress",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name="local_route"),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.jwt_authn", typed_config=packed(authn)),
            hcm_pb2.HttpFilter(name="envoy.filters.http.rbac", typed_config=packed(deny_deletes)),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.local_ratelimit",
                typed_config=packed(local_rate_limit_pb2.LocalRateLimit(stat_prefix="local")),
            ),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
            ),
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
    bucket = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix="jwt_route",
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=3,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=3),
            fill_interval=duration_pb2.Duration(seconds=60),
        ),
        enable_x_ratelimit_headers=1,  # DRAFT_VERSION_03
    )
    to_backend = route_components_pb2.RouteAction(cluster="backend")
    routes = route_pb2.RouteConfiguration(
        name="local_route",
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        name="jwt",
                        match=route_components_pb2.RouteMatch(prefix="/jwt"),
                        route=to_backend,
                        typed_per_filter_config={
                            "envoy.filters.http.jwt_authn": packed(
                                jwt_pb2.PerRouteConfig(requirement_name="needs-idp")
                            ),
                            "envoy.filters.http.local_ratelimit": packed(bucket),
                        },
                    ),
                    route_components_pb2.Route(
                        name="open",
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=to_backend,
                    ),
                ],
            )
        ],
    )
    cluster = cluster_pb2.Cluster(
        name="backend",
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration_pb2.Duration(seconds=1),
    )
    assignment = endpoint_pb2.ClusterLoadAssignment(
        cluster_name="backend",
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=socket(backend_port))
                    )
                ]
            )
        ],
    )
    return {
        LISTENER: {listener.name: listener},
        ROUTE: {routes.name: routes},
        CLUSTER: {cluster.name: cluster},
        ENDPOINT: {assignment.cluster_name: assignment},
    }


async def main() -> None:
    xds_port, listen_port, backend_port = (int(a) for a in sys.argv[1:4])
    jwks, token = key_and_token()
    print("TOKEN", token, flush=True)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        Ads(resources(listen_port, backend_port, jwks)), server
    )
    server.add_insecure_port(f"127.0.0.1:{xds_port}")
    await server.start()
    print("listening", flush=True)
    await server.wait_for_termination()


asyncio.run(main())
