"""A small external authorization service for the ext_authz tests, with no NIP code: Envoy's
HTTP protocol (http.server) and its gRPC one (grpcio + the published protos from
xds-protos, envoy.service.auth.v3.Authorization/Check).

Both allow a request carrying "authorization: Bearer letmein" and deny the rest:
  HTTP  allow: 200, x-auth-user: alice (and x-ignored, which no config copies)
        deny:  403 "denied by authz", x-authz-reason: no-token, www-authenticate: Bearer
        a path under /slow is answered after 2 s
  gRPC  allow: OK, upstream header x-auth-user: alice, x-context-tier from the route's
              context extension "tier", response header x-authz: grpc
        deny:  401 "grpc says no"
Prints "listening" when both are up; counts checks at HTTP /checks.

Usage: authz_server.py HTTP_PORT GRPC_PORT
"""

import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

HTTP_PORT = int(sys.argv[1])
GRPC_PORT = int(sys.argv[2])
CHECKS = {"http": 0, "grpc": 0}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers):
        data = body.encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def check(self):
        if self.path == "/checks":
            with LOCK:
                return self.reply(200, f"{CHECKS['http']} {CHECKS['grpc']}", [])
        with LOCK:
            CHECKS["http"] += 1
        if self.path.startswith("/slow"):
            time.sleep(2)
        if self.headers.get("authorization") == "Bearer letmein":
            return self.reply(200, "", [("x-auth-user", "alice"), ("x-ignored", "1")])
        self.reply(
            403,
            "denied by authz",
            [("x-authz-reason", "no-token"), ("www-authenticate", "Bearer")],
        )

    do_GET = check
    do_POST = check
    do_DELETE = check


def header(key, value):
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(self, request, context):
        with LOCK:
            CHECKS["grpc"] += 1
        http = request.attributes.request.http
        if http.headers.get("authorization") == "Bearer letmein":
            tier = request.attributes.context_extensions.get("tier", "none")
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[header("x-auth-user", "alice"), header("x-context-tier", tier)],
                    response_headers_to_add=[header("x-authz", "grpc")],
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
                body="grpc says no",
            ),
        )


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(), server)
server.add_insecure_port(f"127.0.0.1:{GRPC_PORT}")
server.start()
http_server = ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), Handler)
print("listening", flush=True)
http_server.serve_forever()
