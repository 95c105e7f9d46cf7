"""An independent SDS client (grpcio + xds-protos): asks a control plane's Secret Discovery
Service for secrets over mutual TLS, as an Envoy configured with an SDS api_config_source
would. Prints one line per answer:

  fetch NAME CERTIFICATES          FetchSecrets: the secret and how many roots it holds
  stream NAME CERTIFICATES         StreamSecrets: the first response
  ads NAME CERTIFICATES            the same secret over ADS (type Secret)
  denied CODE                      a stream that claims another node is refused
  wrong-type CODE                  a stream asking SDS for another type is refused

Usage: sds_client.py ADDRESS BUNDLE CERT KEY NODE_ID NAME
"""

import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def certificates(any_resource) -> tuple[str, int]:
    secret = secret_pb2.Secret()
    any_resource.Unpack(secret)
    pem = secret.validation_context.trusted_ca.inline_string
    return secret.name, pem.count("BEGIN CERTIFICATE")


def request(node_id: str, name: str, **fields) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=node_id, locality=base_pb2.Locality(region="eu")),
        type_url=SECRET,
        resource_names=[name],
        **fields,
    )


def first_of_stream(call, node_id: str, name: str):
    """Subscribes to NAME and returns the first response."""
    return next(call(iter([request(node_id, name)])))


def main() -> int:
    address, bundle, cert, key, node_id, name = sys.argv[1:7]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=open(bundle, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    channel = grpc.secure_channel(address, credentials)
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    fetched = sds.FetchSecrets(request(node_id, name), timeout=10)
    for resource in fetched.resources:
        print("fetch %s %d" % certificates(resource), flush=True)
    first = first_of_stream(sds.StreamSecrets, node_id, name)
    for resource in first.resources:
        print("stream %s %d" % certificates(resource), flush=True)
    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    first = first_of_stream(ads.StreamAggregatedResources, node_id, name)
    for resource in first.resources:
        print("ads %s %d" % certificates(resource), flush=True)
    try:
        first_of_stream(sds.StreamSecrets, "someone-else", name)
        print("denied none", flush=True)
    except grpc.RpcError as error:
        print("denied", error.code().name, flush=True)
    try:
        cluster = request(node_id, name)
        cluster.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        next(sds.StreamSecrets(iter([cluster])))
        print("wrong-type none", flush=True)
    except grpc.RpcError as error:
        print("wrong-type", error.code().name, flush=True)
    # The streams above are still open: closing the channel cancels them (left open, the
    # interpreter could wait on gRPC's threads at exit).
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
