"""An OTLP trace receiver for the tracing tests, with no NIP code: grpcio and the
published OTLP protos (opentelemetry-proto).

Serves TraceService/Export (OTLP/gRPC) on GRPC_PORT and POST /v1/traces (OTLP/HTTP,
protobuf) on HTTP_PORT. Prints "listening" when up, then one JSON line per span received:
trace_id, span_id, parent_span_id (hex), name, kind, attributes, events (names),
status (code), service (the resource's service.name), via (grpc or http).

Usage: otlp_receiver.py GRPC_PORT HTTP_PORT [--quiet]
(--quiet: a gRPC sink that accepts exports undecoded and prints nothing — for
bench/tracing.py)
"""

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

LOCK = threading.Lock()
QUIET = "--quiet" in sys.argv


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def print_spans(request, via):
    if QUIET:
        return
    for resource_spans in request.resource_spans:
        resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
        # xds-protos ships an older copy of the OTLP protos under the same package, and
        # whichever pip installed last wins: the same field 2 is `instrumentation_library_spans`
        # there (wire-compatible with `scope_spans`).
        scopes = (resource_spans.scope_spans if hasattr(resource_spans, "scope_spans")
                  else resource_spans.instrumentation_library_spans)
        for scope_spans in scopes:
            for span in scope_spans.spans:
                line = {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": span.kind,
                    "attributes": {a.key: value_of(a.value) for a in span.attributes},
                    "events": [e.name for e in span.events],
                    "status": span.status.code,
                    "service": resource.get("service.name"),
                    "via": via,
                }
                with LOCK:
                    print(json.dumps(line), flush=True)


class TraceService(ts_grpc.TraceServiceServicer):
    def Export(self, request, context):
        print_spans(request, "grpc")
        return ts.ExportTraceServiceResponse()


class HttpReceiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(404)
            self.end_headers()
            return
        request = ts.ExportTraceServiceRequest()
        request.ParseFromString(body)
        print_spans(request, "http")
        answer = ts.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def main():
    grpc_port, http_port = int(sys.argv[1]), int(sys.argv[2])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if QUIET:
        # A sink: the request is taken as bytes, never decoded; the answer is the empty
        # ExportTraceServiceResponse (no bytes), so the sink costs the load little CPU.
        sink = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": sink}),))
    else:
        ts_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", http_port), HttpReceiver)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print("listening", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
