"""An external processor for the ext_proc tests, with no NIP code: grpcio and the
published protos (xds-protos, envoy.service.ext_proc.v3.ExternalProcessor/Process).

Per request (one stream), by what the request carries:
  request head   adds x-ext-proc: seen, x-ext-request-id and x-ext-tenant (from the
                 attributes NIP sends), x-ext-config (the stream's x-nip-plugin-config
                 metadata); rewrites a path under /old/ to /new/;
                 x-ext-deny: immediate 403 "denied by processor" with x-denied-by: ext-proc
                 x-ext-slow: answers after 2 s (past the filter's timeout)
                 a path with "slow-body": answers about the response body after 2 s
  request body   upper-cases it, and says its length in x-ext-body-length (whole
                 body) — in STREAMED mode chunk by chunk
  response head  adds x-ext-proc-response: seen, removes x-internal
  response body  replaces every "secret" with "******"; in STREAMED mode (as the
                 first message's protocol_config says) upper-cases each chunk
  response trailers  adds x-ext-trailer: seen and x-ext-body-messages (how many
                 response body messages came, and how many said end_of_stream)
Prints "listening" when up; counts streams at nothing (the tests look at effects).

Usage: ext_proc_server.py PORT
"""

import sys
import time
from concurrent import futures

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2

PORT = int(sys.argv[1])


def header(name, value):
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode())
    )


def headers_of(message):
    out = {}
    for h in message.headers.headers:
        out[h.key] = (h.raw_value or h.value.encode()).decode()
    return out


class Processor(ep_grpc.ExternalProcessorServicer):
    def Process(self, request_iterator, context):
        config = dict(context.invocation_metadata()).get("x-nip-plugin-config", "")
        streamed_response = False
        body_messages, body_ends = 0, 0
        slow_body = False
        for request in request_iterator:
            if request.HasField("protocol_config"):
                streamed_response = (
                    request.protocol_config.response_body_mode
                    == ext_proc_pb2.ProcessingMode.STREAMED
                )
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                seen = headers_of(request.request_headers)
                slow_body = "slow-body" in seen.get(":path", "")
                if "x-ext-slow" in seen:
                    time.sleep(2)
                if "x-ext-deny" in seen:
                    yield ep.ProcessingResponse(
                        immediate_response=ep.ImmediateResponse(
                            status=http_status_pb2.HttpStatus(code=403),
                            headers=ep.HeaderMutation(
                                set_headers=[header("x-denied-by", "ext-proc")]
                            ),
                            body=b"denied by processor",
                        )
                    )
                    return
                attributes = request.attributes["envoy.filters.http.ext_proc"].fields
                text = lambda key: attributes[key].string_value if key in attributes else ""
                set_headers = [
                    header("x-ext-proc", "seen"),
                    header("x-ext-request-id", text("request.id")),
                    header("x-ext-tenant", text("nip.tenant") or "none"),
                    header("x-ext-config", config or "none"),
                ]
                path = seen.get(":path", "")
                if path.startswith("/old/"):
                    set_headers.append(header(":path", "/new/" + path[len("/old/"):]))
                yield ep.ProcessingResponse(
                    request_headers=ep.HeadersResponse(
                        response=ep.CommonResponse(
                            header_mutation=ep.HeaderMutation(set_headers=set_headers)
                        )
                    )
                )
            elif kind == "request_body":
                body = request.request_body.body.upper()
                yield ep.ProcessingResponse(
                    request_body=ep.BodyResponse(
                        response=ep.CommonResponse(
                            header_mutation=ep.HeaderMutation(
                                set_headers=[header("x-ext-body-length", str(len(body)))]
                            ),
                            body_mutation=ep.BodyMutation(body=body),
                        )
                    )
                )
            elif kind == "response_headers":
                yield ep.ProcessingResponse(
                    response_headers=ep.HeadersResponse(
                        response=ep.CommonResponse(
                            header_mutation=ep.HeaderMutation(
                                set_headers=[header("x-ext-proc-response", "seen")],
                                remove_headers=["x-internal"],
                            )
                        )
                    )
                )
            elif kind == "response_body":
                body_messages += 1
                if slow_body:
                    time.sleep(2)
                body_ends += request.response_body.end_of_stream
                if streamed_response:
                    body = request.response_body.body.upper()
                else:
                    body = request.response_body.body.replace(b"secret", b"******")
                yield ep.ProcessingResponse(
                    response_body=ep.BodyResponse(
                        response=ep.CommonResponse(body_mutation=ep.BodyMutation(body=body))
                    )
                )


            elif kind == "response_trailers":
                yield ep.ProcessingResponse(
                    response_trailers=ep.TrailersResponse(
                        header_mutation=ep.HeaderMutation(
                            set_headers=[
                                header("x-ext-trailer", "seen"),
                                header(
                                    "x-ext-body-messages", f"{body_messages}/{body_ends}"
                                ),
                            ]
                        )
                    )
                )


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    ep_grpc.add_ExternalProcessorServicer_to_server(Processor(), server)
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
