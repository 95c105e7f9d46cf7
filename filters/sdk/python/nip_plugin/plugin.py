"""The plugin a user builds, and its ext_proc server.

Per request the proxy opens one stream; the SDK turns its messages into the v4 message:

    request_headers ─(a body follows in buffered mode)─▶ CONTINUE, wait for request_body
           └──────(no body, or bodies stream past)──────▶ handler ─▶ header mutations
    request_body  ─▶ handler ─▶ header and body mutations (the head has not gone yet)
    response_headers / response_body: the same for the response
    a Reply or a PluginError ─▶ immediate_response

A message is whole: in STREAMED body mode (process.body_mode: streamed) the handler runs
on the head alone and body chunks pass unchanged, as with streaming on. Trailers are
answered unchanged.
"""

import asyncio
import json
import logging
import os
import sys
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2

from .message import (
    META_PREFIX,
    PRIORITY_HEADER,
    RETRY_COUNT_HEADER,
    Data,
    Message,
    Metadata,
    PluginError,
    Reply,
    Source,
    trace_id,
)

log = logging.getLogger("nip_plugin")

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
CONFIG_METADATA = "x-nip-plugin-config"
BODY_BUFFERED = 2  # ProcessingMode.BodySendMode.BUFFERED (NONE 0, STREAMED 1)
# The service beside ExternalProcessor that answers the proxy's supervisor:
# Report(StringValue "health" | "resource_usage") -> StringValue (JSON).
REPORT_SERVICE = "nip.plugin.v2.Plugin"


class HttpResponse:
    """An answer to ``Context.http_call``."""

    def __init__(self, status: int, headers: Dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class Context:
    """What a handler reaches besides its message."""

    def __init__(self, plugin: "Plugin", config: Any):
        self.plugin = plugin
        self.config = config

    @property
    def name(self) -> str:
        return self.plugin.name

    async def http_call(
        self,
        url: str,
        method: str = "GET",
        headers: Optional[Dict[str, str]] = None,
        body: Optional[bytes] = None,
        timeout: float = 1.0,
    ) -> HttpResponse:
        """Calls a service (a process plugin reaches services itself, by URL)."""

        def call() -> HttpResponse:
            request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    return HttpResponse(answer.status, dict(answer.headers), answer.read())
            except urllib.error.HTTPError as answer:
                return HttpResponse(answer.code, dict(answer.headers), answer.read())
            except OSError as e:
                raise PluginError(f"the HTTP call to {url} failed: {e}", 503) from e

        return await asyncio.get_running_loop().run_in_executor(None, call)


def _pairs(header_map) -> List[Tuple[str, str]]:
    return [
        (h.key.lower(), (h.raw_value or h.value.encode()).decode("latin-1"))
        for h in header_map.headers
    ]


def _option(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode("latin-1"))
    )


class _Exchange:
    """One request's state on its stream."""

    def __init__(self):
        self.request_pairs: List[Tuple[str, str]] = []
        self.attributes: Dict[str, str] = {}
        self.response_pairs: List[Tuple[str, str]] = []
        # (request, response): whole bodies until the proxy says otherwise.
        self.body_modes = (BODY_BUFFERED, BODY_BUFFERED)


class Plugin:
    """A NIP plugin: its declaration, hooks and message handler."""

    def __init__(self, name: str, version: str = "", author: str = "", capabilities=()):
        self.name = name
        self.version = version
        self.author = author
        self.capabilities = list(capabilities)
        self._handler: Optional[Callable] = None
        self._on_init: Optional[Callable] = None
        self._on_start: Optional[Callable] = None
        self._on_stop: Optional[Callable] = None
        self._on_config_change: Optional[Callable] = None
        self._health: Optional[Callable] = None
        self._usage: Optional[Callable] = None
        self._configs: Dict[str, Any] = {}

    # Decorators -------------------------------------------------------------------

    def on_message(self, handler: Callable) -> Callable:
        self._handler = handler
        return handler

    def on_init(self, hook: Callable) -> Callable:
        self._on_init = hook
        return hook

    def on_start(self, hook: Callable) -> Callable:
        self._on_start = hook
        return hook

    def on_stop(self, hook: Callable) -> Callable:
        self._on_stop = hook
        return hook

    def on_config_change(self, hook: Callable) -> Callable:
        self._on_config_change = hook
        return hook

    def health_check(self, hook: Callable) -> Callable:
        self._health = hook
        return hook

    def resource_usage(self, hook: Callable) -> Callable:
        self._usage = hook
        return hook

    def declaration(self) -> Dict[str, Any]:
        """What the plugin says about itself (``--describe`` prints it)."""
        from . import API_VERSION

        return {
            "api": API_VERSION,
            "sdk": "python",
            "name": self.name,
            "version": self.version,
            "author": self.author,
            "capabilities": self.capabilities,
        }

    # Configuration ----------------------------------------------------------------

    def _config(self, raw: str) -> Any:
        """The parsed config of a stream; a new one is checked once and kept."""
        if raw in self._configs:
            return self._configs[raw]
        config = json.loads(raw) if raw.strip() else None
        if self._on_config_change is not None:
            self._on_config_change(config)
        if len(self._configs) > 16:
            self._configs.clear()
        self._configs[raw] = config
        return config

    # Messages ---------------------------------------------------------------------

    def _message(self, kind: str, exchange: _Exchange, pairs, body: bytes) -> Message:
        attrs = exchange.attributes
        request = dict(exchange.request_pairs)
        headers: Dict[str, str] = {}
        fields: Dict[str, str] = {}
        pseudo: Dict[str, str] = {}
        for name, value in pairs:
            if name.startswith(":"):
                pseudo[name] = value
            elif name.startswith(META_PREFIX):
                fields[name[len(META_PREFIX):]] = value
            elif name in headers:
                headers[name] += "," + value
            else:
                headers[name] = value
        request_id = attrs.get("request.id") or request.get("x-request-id", "")
        try:
            retries = int(request.get(RETRY_COUNT_HEADER, "0"))
        except ValueError:
            retries = 0
        return Message(
            id=request_id,
            type=kind,
            timestamp=attrs.get("request.time", ""),
            correlation_id=trace_id(request.get("traceparent", "")) or request_id,
            source=Source(
                listener=attrs.get("listener_name", ""),
                route=attrs.get("route_name", ""),
                address=attrs.get("source.address", ""),
            ),
            data=Data.from_body(headers.get("content-type"), body),
            metadata=Metadata(
                priority=attrs.get("nip.priority") or request.get(PRIORITY_HEADER, "normal"),
                retry_count=retries,
                fields=fields,
            ),
            headers=headers,
            tenant=attrs.get("nip.tenant") or None,
            principal=attrs.get("nip.principal") or None,
            method=pseudo.get(":method") if kind == "request" else None,
            path=pseudo.get(":path") if kind == "request" else None,
            status=int(pseudo[":status"]) if kind == "response" and ":status" in pseudo else None,
        )

    @staticmethod
    def _changes(original: Message, changed: Message, with_body: bool) -> ep.CommonResponse:
        set_headers, remove = [], []
        for name, value in changed.headers.items():
            if original.headers.get(name) != value:
                set_headers.append(_option(name, value))
        remove += [n for n in original.headers if n not in changed.headers]
        for name, value in changed.metadata.fields.items():
            if original.metadata.fields.get(name) != value:
                set_headers.append(_option(META_PREFIX + name, value))
        remove += [META_PREFIX + n for n in original.metadata.fields if n not in changed.metadata.fields]
        if changed.metadata.priority != original.metadata.priority:
            set_headers.append(_option(PRIORITY_HEADER, changed.metadata.priority))
        if changed.path and changed.path != original.path:
            set_headers.append(_option(":path", changed.path))
        if changed.status and changed.status != original.status:
            set_headers.append(_option(":status", str(changed.status)))
        common = ep.CommonResponse(
            header_mutation=ep.HeaderMutation(set_headers=set_headers, remove_headers=remove)
        )
        if with_body and changed.data != original.data:
            body = changed.data.to_bytes()
            common.body_mutation.CopyFrom(ep.BodyMutation(body=body))
            if changed.data.is_json() and "content-type" not in changed.headers:
                common.header_mutation.set_headers.append(_option("content-type", "application/json"))
        return common

    @staticmethod
    def _immediate(status: int, body: bytes, headers) -> ep.ProcessingResponse:
        return ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=status),
                headers=ep.HeaderMutation(set_headers=[_option(n, v) for n, v in headers]),
                body=body,
            )
        )

    async def _handle(self, kind, phase, exchange, pairs, body, ctx) -> ep.ProcessingResponse:
        message = self._message(kind, exchange, pairs, body)
        original = self._message(kind, exchange, pairs, body)
        try:
            outcome = self._handler(message, ctx) if self._handler else message
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
        except PluginError as error:
            log.warning("%s: %s (%d)", self.name, error.message, error.status)
            return self._immediate(error.status, (error.message + "\n").encode(), [("content-type", "text/plain")])
        except Exception as error:  # a plugin's bug: the request gets 500, the plugin lives on
            log.exception("%s: the handler failed", self.name)
            return self._immediate(500, f"{type(error).__name__}\n".encode(), [("content-type", "text/plain")])
        if isinstance(outcome, Reply):
            return self._immediate(outcome.status, outcome.body, outcome.headers)
        if outcome is None:
            outcome = message
        common = self._changes(original, outcome, with_body=phase.endswith("body"))
        wrapper = {
            "request_headers": lambda: ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common)),
            "request_body": lambda: ep.ProcessingResponse(request_body=ep.BodyResponse(response=common)),
            "response_headers": lambda: ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common)),
            "response_body": lambda: ep.ProcessingResponse(response_body=ep.BodyResponse(response=common)),
        }
        return wrapper[phase]()

    async def _process(self, request_iterator, context):
        metadata = dict(context.invocation_metadata())
        try:
            ctx = Context(self, self._config(metadata.get(CONFIG_METADATA, "")))
        except Exception as error:  # a config the plugin refuses: the proxy fails the request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"configuration refused: {error}")
            return
        exchange = _Exchange()
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if request.HasField("protocol_config"):
                config = request.protocol_config
                exchange.body_modes = (config.request_body_mode, config.response_body_mode)
            if kind == "request_headers":
                fields = request.attributes[ATTRIBUTES_KEY].fields if ATTRIBUTES_KEY in request.attributes else {}
                exchange.attributes = {k: v.string_value for k, v in fields.items()}
                exchange.request_pairs = _pairs(request.request_headers.headers)
                body_follows = not request.request_headers.end_of_stream and exchange.body_modes[0] == BODY_BUFFERED
                if body_follows:
                    yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                else:
                    yield await self._handle("request", "request_headers", exchange, exchange.request_pairs, b"", ctx)
            elif kind == "request_body" and exchange.body_modes[0] != BODY_BUFFERED:
                yield ep.ProcessingResponse(request_body=ep.BodyResponse())  # a chunk, unchanged
            elif kind == "response_body" and exchange.body_modes[1] != BODY_BUFFERED:
                yield ep.ProcessingResponse(response_body=ep.BodyResponse())
            elif kind == "request_body":
                yield await self._handle(
                    "request", "request_body", exchange, exchange.request_pairs, request.request_body.body, ctx
                )
            elif kind == "response_headers":
                exchange.response_pairs = _pairs(request.response_headers.headers)
                body_follows = not request.response_headers.end_of_stream and exchange.body_modes[1] == BODY_BUFFERED
                if body_follows:
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
                else:
                    yield await self._handle("response", "response_headers", exchange, exchange.response_pairs, b"", ctx)
            elif kind == "response_body":
                yield await self._handle(
                    "response", "response_body", exchange, exchange.response_pairs, request.response_body.body, ctx
                )
            elif kind == "response_trailers":
                yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
            else:
                yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())

    def _report(self, what: str) -> Any:
        """The answer to the supervisor's ``health`` or ``resource_usage`` request."""
        try:
            if what == "health":
                answer = self._health() if self._health else {"healthy": True}
                if isinstance(answer, bool):
                    answer = {"healthy": answer}
                return answer
            if what == "resource_usage":
                return self._usage() if self._usage else {}
        except Exception as error:  # a failing check is an unhealthy plugin
            return {"healthy": False, "message": f"{type(error).__name__}: {error}"}
        return {}

    # Serving ----------------------------------------------------------------------

    def run(self, port: Optional[int] = None, host: str = "127.0.0.1") -> None:
        """Serves the plugin until the process is told to stop.

        ``--describe`` prints the declaration (JSON) and exits, for the supervisor's
        version check.
        """
        if "--describe" in sys.argv:
            print(json.dumps(self.declaration()))
            return
        if port is None:
            args = [a for a in sys.argv[1:] if not a.startswith("-")]
            port = int(args[0]) if args else int(os.environ.get("NIP_PLUGIN_PORT", "9000"))
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        asyncio.run(self._serve(host, port))

    async def _serve(self, host: str, port: int) -> None:
        plugin = self

        class Servicer(ep_grpc.ExternalProcessorServicer):
            async def Process(self, request_iterator, context):
                async for response in plugin._process(request_iterator, context):
                    yield response

        async def report(request, context):
            return wrappers_pb2.StringValue(value=json.dumps(plugin._report(request.value)))

        if self._on_init:
            self._on_init()
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(Servicer(), server)
        # The proxy's supervisor asks for health and resource usage here.
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    REPORT_SERVICE,
                    {
                        "Report": grpc.unary_unary_rpc_method_handler(
                            report,
                            request_deserializer=wrappers_pb2.StringValue.FromString,
                            response_serializer=wrappers_pb2.StringValue.SerializeToString,
                        )
                    },
                ),
            )
        )
        server.add_insecure_port(f"{host}:{port}")
        await server.start()
        if self._on_start:
            self._on_start()
        print(f"{self.name} {self.version} listening on {host}:{port}", flush=True)
        try:
            await server.wait_for_termination()
        finally:
            if self._on_stop:
                self._on_stop()
