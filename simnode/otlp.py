"""A loopback OTLP/HTTP logs receiver: `POST /v1/logs`, as the OTLP specification says.

- `Content-Type: application/json`: the body is parsed by protobuf's JSON parser into
  the official `ExportLogsServiceRequest` of the `opentelemetry-proto` package, with the
  two OTLP/JSON departures from the plain protobuf mapping: `traceId`/`spanId` are hex
  strings (not base64), and unknown fields are ignored. `application/x-protobuf`: the
  binary message. Anything else: 415.
- `Content-Encoding`: none, gzip or deflate (others: 400).
- a body that does not parse (a value of the wrong JSON type where an object, array,
  number or string belongs, an unknown enum name, a trace/span id that is not 16/8 bytes
  of hex): 400 with a `google.rpc.Status` (code 3, InvalidArgument) in the request's
  encoding, as the Collector's OTLP receiver answers.
- success: 200 with an `ExportLogsServiceResponse`, `{}` in JSON; with
  `partial_success(rejected, message)` the next request's first `rejected` log records
  are refused and `partialSuccess {rejectedLogRecords, errorMessage}` says so.
- knobs of `LoopbackBackend`: `fail_next(n, status, retry_after)`, `delay_s`,
  `down()`/`up()`, `requests`.
"""

from __future__ import annotations

import binascii
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from simnode.loki import BadRequest, LoopbackBackend, decode_body

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
INVALID_ARGUMENT = 3  # google.rpc.Code


@dataclass(frozen=True)
class OtlpRecord:
    """One stored log record with its resource and scope."""

    resource: dict[str, Any]  # attribute key -> Python value
    scope_name: str
    scope_version: str
    record: LogRecord

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: any_value(kv.value) for kv in self.record.attributes}

    @property
    def body(self) -> Any:
        return any_value(self.record.body)


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a plain Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


class FakeOtlpReceiver(LoopbackBackend):
    """An OTLP/HTTP logs receiver on loopback; see the module docstring."""

    _display_name = "FakeOtlpReceiver"
    _thread_name = "fake-otlp"

    def __init__(self, *, tls: bool = False, token: str | None = None) -> None:
        super().__init__(tls=tls, token=token)
        self._data_lock = threading.Lock()
        self._records: list[OtlpRecord] = []
        self._exports: list[ExportLogsServiceRequest] = []
        self._partial: deque[tuple[int, str]] = deque()

    # -- what was received

    def records(self) -> list[OtlpRecord]:
        with self._data_lock:
            return list(self._records)

    def exports(self) -> list[ExportLogsServiceRequest]:
        """Every request that parsed, as the official protobuf message."""
        with self._data_lock:
            return list(self._exports)

    def clear(self) -> None:
        with self._data_lock:
            self._records.clear()
            self._exports.clear()
        with self._lock:
            self.requests.clear()

    def partial_success(self, rejected: int, message: str, requests: int = 1) -> None:
        """The next `requests` requests: refuse their first `rejected` log records."""
        with self._data_lock:
            self._partial.extend([(rejected, message)] * requests)

    # -- the endpoint

    async def _route(self, request: web.Request, body: bytes) -> web.Response:
        if request.path != "/v1/logs":
            return web.Response(status=404, text="404 page not found\n")
        if request.method != "POST":
            return web.Response(status=405, text="405 method not allowed, supported: [POST]\n")
        media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media not in (JSON, PROTOBUF):
            return web.Response(status=415, text=f"415 unsupported media type, supported: "
                                                 f"[{JSON}, {PROTOBUF}]\n")
        try:
            raw = decode_body(body, request.headers.get("Content-Encoding", ""),
                              ("", "gzip", "deflate"))
        except BadRequest as e:
            return _status(400, e.text.strip(), media)
        try:
            export = _parse(raw, media)
        except ValueError as e:
            return _status(400, str(e), media)
        return self._store(export, media)

    def _store(self, export: ExportLogsServiceRequest, media: str) -> web.Response:
        with self._data_lock:
            rejected, message = self._partial.popleft() if self._partial else (0, "")
            self._exports.append(export)
            skip = rejected
            for resource_logs in export.resource_logs:
                resource = {kv.key: any_value(kv.value)
                            for kv in resource_logs.resource.attributes}
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        if skip > 0:
                            skip -= 1
                            continue
                        self._records.append(OtlpRecord(resource, scope_logs.scope.name,
                                                        scope_logs.scope.version, record))
        answer = ExportLogsServiceResponse()
        if rejected:
            answer.partial_success.rejected_log_records = rejected - skip
            answer.partial_success.error_message = message
        if media == JSON:
            text = json_format.MessageToJson(answer, indent=None)
            return web.Response(status=200, body=text.encode(), content_type=JSON)
        return web.Response(status=200, body=answer.SerializeToString(), content_type=PROTOBUF)


def _parse(raw: bytes, media: str) -> ExportLogsServiceRequest:
    export = ExportLogsServiceRequest()
    if media == PROTOBUF:
        try:
            export.ParseFromString(raw)
        except DecodeError as e:
            raise ValueError(f"proto: {e}") from None
        return export
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"ReadObject: {e}") from None
    known = _otlp_json(doc, export.DESCRIPTOR, "ExportLogsServiceRequest")
    try:
        json_format.ParseDict(known, export)
    except json_format.ParseError as e:
        raise ValueError(str(e)) from None
    return export


def _otlp_json(value: Any, descriptor: Descriptor, path: str) -> dict[str, Any]:
    """An OTLP/JSON object made ready for protobuf's strict JSON parser: unknown fields
    dropped (OTLP/JSON receivers must ignore them), hex trace and span ids turned into
    base64, and every message checked to be an object (protobuf's Python parser would
    otherwise read a string where an object belongs as a list of unknown field names)."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected an object, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)
        if field is None or item is None:
            continue
        where = f"{path}.{key}"
        if field.is_repeated:
            if not isinstance(item, list):
                raise ValueError(f"{where}: expected an array")
            out[key] = [_otlp_value(field, v, f"{where}[{i}]") for i, v in enumerate(item)]
        else:
            out[key] = _otlp_value(field, item, where)
    return out


_ID_BYTES = {"trace_id": 16, "span_id": 8}


def _otlp_value(field: FieldDescriptor, value: Any, path: str) -> Any:
    if field.message_type is not None:
        return _otlp_json(value, field.message_type, path)
    if field.enum_type is not None and isinstance(value, str) and (
            value not in field.enum_type.values_by_name):
        raise ValueError(f"{path}: unknown enum value {value!r}")
    if field.type == FieldDescriptor.TYPE_BYTES and field.name in _ID_BYTES:
        if value == "":
            return value
        try:
            data = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            data = b""
        if len(data) != _ID_BYTES[field.name]:
            raise ValueError(f"{path}: invalid length for ID {value!r}")
        return binascii.b2a_base64(data, newline=False).decode()
    return value


def _status(status: int, message: str, media: str) -> web.Response:
    """A failed request's answer: a google.rpc.Status in the request's encoding."""
    if media == JSON:
        body = orjson.dumps({"code": INVALID_ARGUMENT, "message": message})
        return web.Response(status=status, body=body, content_type=JSON)
    # google.rpc.Status: field 1 code (varint), field 2 message (string).
    text = message.encode()
    encoded = bytes([0x08, INVALID_ARGUMENT, 0x12]) + _varint(len(text)) + text
    return web.Response(status=status, body=encoded, content_type=PROTOBUF)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
