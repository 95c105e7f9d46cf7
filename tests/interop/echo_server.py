"""A gRPC server with one unary method, /nip.Echo/Say, answering "NAME: REQUEST".

No generated code: the method takes and returns raw bytes. Prints "listening" once ready.
Usage: echo_server.py PORT NAME
"""

import sys
from concurrent import futures

import grpc


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]

    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return name.encode() + b": " + request

    handler = grpc.method_handlers_generic_handler(
        "nip.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
