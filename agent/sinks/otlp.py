"""The OTLP/HTTP logs codec: `POST <url>/v1/logs`, JSON encoding (protobuf's JSON mapping).

    {"resourceLogs": [{"resource": {"attributes": [...]},
                       "scopeLogs": [{"scope": {"name": "podtap", "version": "..."},
                                      "logRecords": [...]}]}]}

One resource, and so one group, per container. Its attributes are the OpenTelemetry
Kubernetes semantic conventions of `records.metadata_fields` in the otel schema
(`k8s.namespace.name`, `k8s.pod.name`, `k8s.pod.uid`, `k8s.container.name`,
`k8s.node.name`, `container.id`, `container.image.name`, `container.image.tags`,
`container.runtime`, `k8s.<owner kind>.name`, `k8s.pod.label.<key>`, and annotations,
namespace and node labels when `records` asks for them); label keys are never de-dotted.

A log record is what the OpenTelemetry Collector's filelog receiver makes of a container
log line with its `container` parser: `timeUnixNano` the capture time,
`observedTimeUnixNano` the same (the agent observed the line as it was written), `body`
the message as a string, attributes `log.iostream` (stdout|stderr) and
`logtag` ("F" for a whole line, "P" for a piece of a line split at the maximum length or
flushed without its newline: the CRI log tag the container parser also sets).
`severityText`/`severityNumber` are left unset, as that parser leaves them.

A line that is not valid UTF-8 (an OTLP string must be) has U+FFFD in place of the
invalid bytes with `records.invalid_utf8: replace` (nothing extra is counted); with
`base64` or `escape` its body is a `bytesValue` holding the exact bytes instead.

Answers, per the OTLP specification (opentelemetry-proto docs/specification.md, "OTLP/HTTP
Response"): 200 is success, possibly partial (`partialSuccess.rejectedLogRecords`: those
records will never be accepted and must not be sent again); 429, 502, 503 and 504 are
retried, honouring Retry-After; every other 4xx and 5xx (400 for data the server cannot
parse) must not be retried.
"""

from __future__ import annotations

import base64
import time
from importlib.metadata import PackageNotFoundError, version

import orjson

from agent.config import SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import STDERR, STDOUT, RecordFormat, metadata_fields
from agent.sinks.base import Batch, Outcome, Response
from agent.sinks.retry import parse_retry_after

__all__ = ["LOGS_PATH", "RETRYABLE_STATUSES", "OtlpCodec", "OtlpEncoder", "resource_attributes"]

LOGS_PATH = "/v1/logs"
CONTENT_TYPE = "application/json"
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
SCOPE_NAME = "podtap"

_STREAM_NAMES = {STDOUT: b"stdout", STDERR: b"stderr"}
_HEAD = b'{"timeUnixNano":"%d","observedTimeUnixNano":"%d","body":{"stringValue":%s}'
_HEAD_BYTES = b'{"timeUnixNano":"%d","observedTimeUnixNano":"%d","body":{"bytesValue":"%s"}'


def _scope_version() -> str:
    try:
        return version("podtap")
    except PackageNotFoundError:
        return ""


def _any_value(value: object) -> dict[str, object]:
    """An OTLP AnyValue in the JSON mapping (strings and lists of strings are all we have)."""
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    return {"stringValue": str(value).encode("utf-8", "replace").decode("utf-8")}


def resource_attributes(meta: ContainerMeta, fmt: RecordFormat) -> list[dict[str, object]]:
    """The resource attributes of one container (KeyValue list of the JSON mapping)."""
    otel = RecordFormat(
        schema="otel",
        include_annotations=fmt.include_annotations,
        include_namespace_labels=fmt.include_namespace_labels,
        include_node_labels=fmt.include_node_labels,
    )
    return [{"key": key, "value": _any_value(value)}
            for key, value in metadata_fields(meta, otel).items()]


def _attributes(stream: int, partial: bool) -> bytes:
    return (b',"attributes":[{"key":"log.iostream","value":{"stringValue":"'
            + _STREAM_NAMES[stream] + b'"}},{"key":"logtag","value":{"stringValue":"'
            + (b"P" if partial else b"F") + b'"}}]}')


_TAILS = {(stream, partial): _attributes(stream, partial)
          for stream in _STREAM_NAMES for partial in (False, True)}


class OtlpEncoder:
    """The log records of one container; `group` opens its ResourceLogs up to the records."""

    __slots__ = ("_exact", "group")

    def __init__(self, meta: ContainerMeta, fmt: RecordFormat, scope: bytes) -> None:
        resource = orjson.dumps({"attributes": resource_attributes(meta, fmt)})
        self.group: bytes = (b'{"resource":' + resource + b',"scopeLogs":[{"scope":' + scope
                             + b',"logRecords":[')
        self._exact = fmt.invalid_utf8 != "replace"

    def encode(self, time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
        try:
            body = orjson.dumps(message.decode("utf-8"))
        except UnicodeDecodeError:
            if self._exact:
                return (_HEAD_BYTES % (time_ns, time_ns, base64.b64encode(message))
                        + _TAILS[stream, partial])
            body = orjson.dumps(message.decode("utf-8", "replace"))
        return _HEAD % (time_ns, time_ns, body) + _TAILS[stream, partial]


class OtlpCodec:
    """Implements `agent.sinks.base.Codec` for OTLP/HTTP logs (JSON).

    The pipeline builds the transport with `HttpTransport(cfg, codec.url,
    codec.content_type, codec.extra_headers)` (no extra headers for OTLP).
    """

    content_type = CONTENT_TYPE

    def __init__(self, cfg: SinkConfig, fmt: RecordFormat) -> None:
        self.fmt = fmt
        self.url = cfg.url.rstrip("/") + LOGS_PATH
        self.extra_headers: dict[str, str] = {}
        self._scope = orjson.dumps({"name": SCOPE_NAME, "version": _scope_version()})

    def encoder(self, meta: ContainerMeta) -> OtlpEncoder:
        return OtlpEncoder(meta, self.fmt, self._scope)

    def body(self, batch: Batch) -> bytes:
        resources = [group + b",".join(items) + b"]}]}" for group, items in batch.groups.items()]
        return b'{"resourceLogs":[' + b",".join(resources) + b"]}"

    def outcome(self, batch: Batch, response: Response) -> Outcome:
        status = response.status
        if 200 <= status <= 299:
            return _partial_success(batch, response.body)
        if status in RETRYABLE_STATUSES:
            retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
            return Outcome(retry=batch, retry_after_s=retry_after)
        reason = f"OTLP receiver answered {status}: {_status_message(response.body)}"
        return Outcome(dead=[(batch.items(), reason)])


def _partial_success(batch: Batch, body: bytes) -> Outcome:
    """Read an ExportLogsServiceResponse. The answer says how many records were rejected,
    not which: the first `rejected` items of the batch stand for them in the dead-letter
    store (the count is exact, the choice of items is not)."""
    rejected, message = 0, ""
    try:
        answer = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        answer = {}  # a protobuf answer to a JSON request: nothing to read
    partial = answer.get("partialSuccess") if isinstance(answer, dict) else None
    if isinstance(partial, dict):
        try:
            rejected = int(partial.get("rejectedLogRecords", 0) or 0)  # int64: str or number
        except (TypeError, ValueError):
            rejected = 0
        message = str(partial.get("errorMessage", "") or "")
    rejected = max(0, min(rejected, batch.records))
    if rejected == 0:
        return Outcome(delivered=batch.records)
    reason = (f"OTLP partial success: {rejected} of {batch.records} log records rejected "
              f"(the receiver does not say which): {message}")
    return Outcome(delivered=batch.records - rejected,
                   dead=[(batch.items()[:rejected], reason)])


def _status_message(body: bytes, limit: int = 4096) -> str:
    """The `message` of a google.rpc.Status answer, else the body as text."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return str(answer["message"])[:limit]
    return body[:limit].decode("utf-8", "replace").strip()
