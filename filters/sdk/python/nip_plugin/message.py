"""The v4 message (filters/sdk/MESSAGE.md) and what a handler may answer."""

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

META_PREFIX = "x-nip-meta-"
PRIORITY_HEADER = "x-nip-priority"
RETRY_COUNT_HEADER = "x-nip-retry-count"

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id(traceparent: str) -> Optional[str]:
    """The trace id of a valid W3C traceparent."""
    found = _TRACEPARENT.match(traceparent.strip().lower())
    if not found or found.group(1) == "0" * 32:
        return None
    return found.group(1)


class Data:
    """A body: JSON (``json``), bytes (``raw``), or nothing."""

    def __init__(self, json_value: Any = None, raw: Optional[bytes] = None):
        self.json = json_value
        self.raw = raw

    @classmethod
    def from_body(cls, content_type: Optional[str], body: bytes) -> "Data":
        if not body:
            return cls()
        essence = (content_type or "").split(";")[0].strip().lower()
        if essence == "application/json" or essence.endswith("+json"):
            try:
                return cls(json_value=json.loads(body))
            except ValueError:
                pass
        return cls(raw=body)

    def is_json(self) -> bool:
        return self.raw is None and self.json is not None

    def to_bytes(self) -> bytes:
        if self.raw is not None:
            return self.raw
        if self.json is None:
            return b""
        return json.dumps(self.json, separators=(",", ":")).encode()

    def __eq__(self, other):
        return isinstance(other, Data) and (self.json, self.raw) == (other.json, other.raw)


@dataclass
class Source:
    listener: str = ""
    route: str = ""
    address: str = ""


@dataclass
class Metadata:
    priority: str = "normal"
    retry_count: int = 0
    fields: Dict[str, str] = field(default_factory=dict)


@dataclass
class Message:
    """One request or response as the plugin sees it."""

    id: str
    type: str  # "request" or "response"
    timestamp: str
    correlation_id: str
    source: Source
    data: Data
    metadata: Metadata
    headers: Dict[str, str]
    tenant: Optional[str] = None
    principal: Optional[str] = None
    method: Optional[str] = None
    path: Optional[str] = None
    status: Optional[int] = None

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    def set_header(self, name: str, value: str) -> None:
        self.headers[name.lower()] = value

    def remove_header(self, name: str) -> None:
        self.headers.pop(name.lower(), None)

    def stamp(self, name: str, value: str) -> None:
        """Sets a metadata field (an ``x-nip-meta-NAME`` header on the wire)."""
        self.metadata.fields[name.lower()] = value


class Reply:
    """An answer to the client instead of the message going on."""

    def __init__(self, status: int, body: bytes = b"", headers: Optional[List[Tuple[str, str]]] = None):
        self.status = status
        self.body = body
        self.headers = list(headers or [])

    @classmethod
    def text(cls, status: int, text: str) -> "Reply":
        return cls(status, text.encode(), [("content-type", "text/plain")])

    @classmethod
    def json(cls, status: int, value: Any) -> "Reply":
        return cls(status, json.dumps(value).encode(), [("content-type", "application/json")])


class PluginError(Exception):
    """A handler's failure: the client gets ``status`` (500 unless set) and the message."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status
        self.message = message


Outcome = Union[Message, Reply]
