"""A proxyless gRPC client: resolves xds:///TARGET through an xDS server (grpcio's own xDS
resolver, configured by GRPC_XDS_BOOTSTRAP_CONFIG) and calls /nip.Echo/Say until an answer
contains EXPECT, printing every answer or error. Exit 0 when seen, 1 on timeout.

Usage: grpc_xds_client.py XDS_ADDRESS TARGET NODE_ID REGION EXPECT TIMEOUT_SECONDS
"""

import json
import os
import sys
import time


def main() -> int:
    xds_address, target, node_id, region, expect, timeout = sys.argv[1:7]
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(
        {
            "xds_servers": [
                {
                    "server_uri": xds_address,
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": node_id, "locality": {"region": region, "zone": "a"}},
        }
    )
    import grpc  # after the bootstrap is in the environment

    channel = grpc.insecure_channel(f"xds:///{target}")
    say = channel.unary_unary("/nip.Echo/Say")
    deadline = time.monotonic() + float(timeout)
    while time.monotonic() < deadline:
        try:
            answer = say(b"hello", timeout=2).decode()
            print("answer", answer, flush=True)
            if expect in answer:
                return 0
        except grpc.RpcError as error:
            print("error", error.code(), error.details(), flush=True)
        time.sleep(0.1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
