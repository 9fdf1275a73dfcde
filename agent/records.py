"""Log records as JSON bytes: one captured line plus pod metadata, built on the hot path.

Everything that does not change from line to line is serialized once: per container, the
metadata with orjson, and the bytes around the per-line values as a small ``bytes %``
template per stream plus a tail per ``partial`` value. Encoding a line is one UTF-8 decode,
one orjson string escape, one small ``bytes %`` formatting and one concatenation; no dict
is built.

A record is one JSON object without a trailing newline; NDJSON sinks join records with
``b"\\n"``. Field order: time key(s), ``stream``, ``message``, (``message_base64``),
``partial``, metadata.

Messages are bytes; a line that is not valid UTF-8 is written as `RecordFormat.invalid_utf8`
says: ``replace`` (invalid sequences as U+FFFD: lossy), ``base64`` (the same text, plus the
exact bytes in ``message_base64``, a member present only on such lines), or ``escape``
(``message`` holds each invalid byte as a ``\\udcXX`` escape, the convention of Python's
``surrogateescape``: ``json.loads(record)["message"].encode("utf-8", "surrogateescape")``
gives the exact bytes back; parsers that reject lone surrogates reject such records).
Valid lines are the same in every mode.

Schemas of the metadata part:

``fluentbit``
    ``{"kubernetes": {...}}`` with the key names of Fluent Bit's kubernetes filter:
    ``pod_name, namespace_name, pod_id, labels, annotations, ownerReferences, host,
    container_name, docker_id, container_image``. As in Fluent Bit, ``docker_id`` holds
    the container id whatever the runtime, ``labels``/``annotations`` are left out when
    the pod has none, and ``ownerReferences`` is a list (here of ``{"kind", "name"}``
    only: the kubelet data in ContainerMeta carries no apiVersion/uid). With
    ``include_namespace_labels``, ``{"kubernetes_namespace": {"name", "labels"}}``.
``otel``
    Flat keys of the OpenTelemetry semantic conventions: ``k8s.namespace.name,
    k8s.pod.name, k8s.pod.uid, k8s.container.name, container.id, container.image.name,
    container.image.tags, container.runtime, k8s.node.name, k8s.<owner kind>.name,
    k8s.pod.label.<key>, k8s.pod.annotation.<key>, k8s.namespace.label.<key>``.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import orjson

from agent.capture.abi import STREAM_STDERR, STREAM_STDOUT
from agent.kube.model import ContainerMeta

if TYPE_CHECKING:
    from agent.config import RecordsConfig

__all__ = [
    "STDERR",
    "STDOUT",
    "ContainerEncoder",
    "RecordFormat",
    "encode_tap_line",
    "format_rfc3339_ns",
    "metadata_fields",
]

STDOUT = STREAM_STDOUT
STDERR = STREAM_STDERR

Schema = Literal["fluentbit", "otel"]
_SCHEMAS = ("fluentbit", "otel")
InvalidUtf8 = Literal["replace", "escape", "base64"]
_INVALID_UTF8 = ("replace", "escape", "base64")
_RESERVED_KEYS = frozenset(
    {"stream", "message", "message_base64", "partial", "kubernetes", "kubernetes_namespace"}
)

_STREAMS = (b"stdout", b"stderr")
_NS_PER_S = 1_000_000_000
# RFC 3339 allows years 0000-9999; time.gmtime would print a fifth digit past 9999.
_MAX_SECONDS = 253_402_300_800  # 10000-01-01T00:00:00Z
_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z

_OTEL_OWNER_KEYS = {
    "ReplicaSet": "k8s.replicaset.name",
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
    "ReplicationController": "k8s.replicationcontroller.name",
}


@dataclass(frozen=True, slots=True)
class RecordFormat:
    """How records look.

    schema: ``"fluentbit"`` (nested ``kubernetes`` object) or ``"otel"`` (flat keys).
    dedot_labels: replace ``.`` with ``_`` in label and annotation keys, so that
        Elasticsearch does not map ``app`` and ``app.kubernetes.io/name`` onto
        conflicting objects. Off by default; the caller turns it on for Elasticsearch.
    include_annotations: add pod annotations (they can be large and are often noise).
    include_namespace_labels: add the labels of the pod's namespace.
    include_node_labels: add the labels of the node (``kubernetes.node_labels``,
        ``k8s.node.label.<key>``).
    time_key: name of the time field.
    timestamp_key_es: also write the time as ``@timestamp`` (Elasticsearch/Kibana default).
    invalid_utf8: how a line that is not valid UTF-8 is written: ``"replace"`` (lossy),
        ``"base64"`` (exact bytes in ``message_base64`` as well) or ``"escape"`` (exact bytes
        as ``\\udcXX`` escapes in ``message``); see the module documentation.
    """

    schema: Schema = "fluentbit"
    dedot_labels: bool = False
    include_annotations: bool = False
    include_namespace_labels: bool = False
    include_node_labels: bool = False
    time_key: str = "time"
    timestamp_key_es: bool = False
    invalid_utf8: InvalidUtf8 = "replace"

    def __post_init__(self) -> None:
        if self.schema not in _SCHEMAS:
            raise ValueError(f"unknown record schema {self.schema!r}; expected one of {_SCHEMAS}")
        if self.invalid_utf8 not in _INVALID_UTF8:
            raise ValueError(
                f"unknown invalid_utf8 {self.invalid_utf8!r}; expected one of {_INVALID_UTF8}"
            )
        if not self.time_key or self.time_key in _RESERVED_KEYS:
            raise ValueError(f"time_key {self.time_key!r} is empty or clashes with another field")
        if self.timestamp_key_es and self.time_key == "@timestamp":
            raise ValueError('time_key is already "@timestamp"; leave timestamp_key_es off')

    @classmethod
    def from_section(cls, records: RecordsConfig) -> RecordFormat:
        """From the `records` configuration section (validated there). A sink may adjust
        the result: Elasticsearch writes `@timestamp` and de-dots label keys."""
        return cls(
            schema=records.schema,  # type: ignore[arg-type]
            dedot_labels=bool(records.dedot_labels),
            include_annotations=records.include_annotations,
            include_namespace_labels=records.include_namespace_labels,
            include_node_labels=records.include_node_labels,
            time_key=records.time_key,
            timestamp_key_es=records.timestamp_key_es,
            invalid_utf8=records.invalid_utf8,  # type: ignore[arg-type]
        )


# --- time --------------------------------------------------------------------------------

# (unix second, b"YYYY-MM-DDTHH:MM:SS.") of the last second formatted. One tuple, read
# and replaced as a whole, so a concurrent reader never pairs a second with another's text.
_last_second: tuple[int, bytes] = (_MIN_SECONDS - 1, b"")


def _second_prefix(seconds: int) -> bytes:
    """``b"YYYY-MM-DDTHH:MM:SS."`` for a unix second; cached for the last second seen."""
    global _last_second
    cached = _last_second
    if cached[0] == seconds:
        return cached[1]
    if not _MIN_SECONDS <= seconds < _MAX_SECONDS:
        raise ValueError(f"time {seconds}s is outside the years 0001-9999 of RFC 3339")
    t = time.gmtime(seconds)
    text = (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
        f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
    ).encode("ascii")
    _last_second = (seconds, text)
    return text


def format_rfc3339_ns(time_ns: int) -> str:
    """``2026-11-22T02:51:34.123456789Z``: UTC, always nine fractional digits."""
    seconds, nanos = divmod(time_ns, _NS_PER_S)
    return f"{_second_prefix(seconds).decode('ascii')}{nanos:09d}Z"


# --- metadata ----------------------------------------------------------------------------


def _dedot(mapping: dict[str, str], enabled: bool) -> dict[str, str]:
    if not enabled:
        return dict(mapping)
    return {key.replace(".", "_"): value for key, value in mapping.items()}


def _split_image(image: str) -> tuple[str, str | None]:
    """``registry:5000/org/app:1.2@sha256:...`` -> (``registry:5000/org/app``, ``1.2``)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, None


def _fluentbit_fields(meta: ContainerMeta, fmt: RecordFormat) -> dict[str, object]:
    kube: dict[str, object] = {
        "pod_name": meta.pod_name,
        "namespace_name": meta.namespace,
        "pod_id": meta.pod_uid,
    }
    if meta.labels:
        kube["labels"] = _dedot(meta.labels, fmt.dedot_labels)
    if fmt.include_annotations and meta.annotations:
        kube["annotations"] = _dedot(meta.annotations, fmt.dedot_labels)
    if meta.owner_kind and meta.owner_name:
        kube["ownerReferences"] = [{"kind": meta.owner_kind, "name": meta.owner_name}]
    kube["host"] = meta.host
    kube["container_name"] = meta.container_name
    kube["docker_id"] = meta.container_id
    kube["container_image"] = meta.image
    if fmt.include_node_labels and meta.node_labels:
        kube["node_labels"] = _dedot(meta.node_labels, fmt.dedot_labels)  # Vector's name
    fields: dict[str, object] = {"kubernetes": kube}
    if fmt.include_namespace_labels and meta.namespace_labels:
        fields["kubernetes_namespace"] = {
            "name": meta.namespace,
            "labels": _dedot(meta.namespace_labels, fmt.dedot_labels),
        }
    return fields


def _prefixed(prefix: str, mapping: dict[str, str], dedot: bool) -> dict[str, str]:
    return {prefix + key: value for key, value in _dedot(mapping, dedot).items()}


def _otel_fields(meta: ContainerMeta, fmt: RecordFormat) -> dict[str, object]:
    image_name, image_tag = _split_image(meta.image)
    fields: dict[str, object] = {
        "k8s.namespace.name": meta.namespace,
        "k8s.pod.name": meta.pod_name,
        "k8s.pod.uid": meta.pod_uid,
        "k8s.container.name": meta.container_name,
        "container.id": meta.container_id,
        "container.image.name": image_name,
    }
    if image_tag is not None:
        fields["container.image.tags"] = [image_tag]
    fields["container.runtime"] = meta.runtime
    fields["k8s.node.name"] = meta.host
    owner_key = _OTEL_OWNER_KEYS.get(meta.owner_kind or "")
    if owner_key and meta.owner_name:
        fields[owner_key] = meta.owner_name
    fields.update(_prefixed("k8s.pod.label.", meta.labels, fmt.dedot_labels))
    if fmt.include_annotations:
        fields.update(_prefixed("k8s.pod.annotation.", meta.annotations, fmt.dedot_labels))
    if fmt.include_namespace_labels:
        ns_labels = _prefixed("k8s.namespace.label.", meta.namespace_labels, fmt.dedot_labels)
        fields.update(ns_labels)
    if fmt.include_node_labels:
        fields.update(_prefixed("k8s.node.label.", meta.node_labels, fmt.dedot_labels))
    return fields


def metadata_fields(meta: ContainerMeta, fmt: RecordFormat) -> dict[str, object]:
    """The metadata part of every record of this container, as a dict (not on the hot path)."""
    if fmt.schema == "otel":
        return _otel_fields(meta, fmt)
    return _fluentbit_fields(meta, fmt)


# --- per-line encoding -------------------------------------------------------------------


def _escape(message: bytes) -> bytes:
    """JSON string literal of the bytes read as UTF-8, invalid sequences as U+FFFD."""
    return orjson.dumps(message.decode("utf-8", "replace"))


def _invalid_message(message: bytes, mode: str) -> bytes:
    """The message member's value for bytes that are not valid UTF-8 (and, with base64,
    the ``message_base64`` member after it)."""
    if mode == "escape":
        # ensure_ascii: every non-ASCII character, lone surrogates included, as \uXXXX.
        return json.dumps(message.decode("utf-8", "surrogateescape")).encode("ascii")
    text = orjson.dumps(message.decode("utf-8", "replace"))
    if mode == "base64":
        return text + b',"message_base64":"' + base64.b64encode(message) + b'"'
    return text


def _line_heads(fmt: RecordFormat) -> tuple[bytes, bytes]:
    """``bytes %`` templates for stdout and stderr, up to the message included; their
    fields: seconds prefix, nanoseconds, message (twice the time with ``@timestamp``)."""
    time_key = orjson.dumps(fmt.time_key).replace(b"%", b"%%")
    head = b"{" + time_key + b':"%s%09dZ"'
    if fmt.timestamp_key_es:
        # The nanosecond part is formatted again: cheaper than building the time once.
        head += b',"@timestamp":"%s%09dZ"'
    stdout, stderr = (head + b',"stream":"' + name + b'","message":%s' for name in _STREAMS)
    return stdout, stderr


def _line_tails(metadata: bytes) -> tuple[bytes, bytes]:
    """What follows the message, for partial False and True: appended as is, because
    ``bytes %`` would scan the whole metadata for conversion specifiers on every line."""
    rest = (b"," + metadata if metadata else b"") + b"}"
    return b',"partial":false' + rest, b',"partial":true' + rest


class ContainerEncoder:
    """Encodes the lines of one container; build it once per container (and format).

    ``metadata`` holds the pre-serialized metadata members (the JSON object's inside,
    without braces), for callers that want to reuse or inspect them.
    """

    __slots__ = ("_double_time", "_heads", "_invalid_utf8", "_tails", "metadata")

    def __init__(self, meta: ContainerMeta, fmt: RecordFormat | None = None,
                 prefix: bytes = b"", suffix: bytes = b"") -> None:
        """`prefix` and `suffix` are bytes every encoded line starts and ends with (an
        Elasticsearch action line, a newline): part of the templates, not copied per line."""
        fmt = fmt or RecordFormat()
        self.metadata: bytes = orjson.dumps(metadata_fields(meta, fmt))[1:-1]
        escaped = prefix.replace(b"%", b"%%")
        heads = _line_heads(fmt)
        self._heads = (escaped + heads[0], escaped + heads[1])
        tails = _line_tails(self.metadata)
        self._tails = (tails[0] + suffix, tails[1] + suffix)
        self._double_time = fmt.timestamp_key_es
        self._invalid_utf8 = fmt.invalid_utf8

    def encode(self, time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
        """One record: ``time_ns`` since the epoch (UTC), ``stream`` 1 (stdout) or 2 (stderr)."""
        if stream != STDOUT and stream != STDERR:
            raise ValueError(f"stream must be 1 (stdout) or 2 (stderr), not {stream!r}")
        seconds, nanos = divmod(time_ns, _NS_PER_S)
        cached = _last_second  # the cache hit inlined: most lines share the previous second
        prefix = cached[1] if cached[0] == seconds else _second_prefix(seconds)
        try:
            value = orjson.dumps(message.decode())
        except UnicodeDecodeError:
            value = _invalid_message(message, self._invalid_utf8)
        head = self._heads[stream - 1]
        if self._double_time:
            head = head % (prefix, nanos, prefix, nanos, value)
        else:
            head = head % (prefix, nanos, value)
        return head + self._tails[partial]


_TAP_TEMPLATES = (
    b'{"time":"%s%09dZ","stream":"stdout","pid":%d,"comm":%s,"cgroup_id":%d,'
    b'"message":%s,"partial":false}',
    b'{"time":"%s%09dZ","stream":"stdout","pid":%d,"comm":%s,"cgroup_id":%d,'
    b'"message":%s,"partial":true}',
    b'{"time":"%s%09dZ","stream":"stderr","pid":%d,"comm":%s,"cgroup_id":%d,'
    b'"message":%s,"partial":false}',
    b'{"time":"%s%09dZ","stream":"stderr","pid":%d,"comm":%s,"cgroup_id":%d,'
    b'"message":%s,"partial":true}',
)

_COMM_CACHE_LIMIT = 4096
_comm_cache: dict[bytes, bytes] = {}


def _escaped_comm(comm: bytes) -> bytes:
    """The task comm (NUL-padded, as the kernel copies it) as a JSON string; cached."""
    escaped = _comm_cache.get(comm)
    if escaped is None:
        escaped = _escape(comm.split(b"\0", 1)[0])
        if len(_comm_cache) >= _COMM_CACHE_LIMIT:
            _comm_cache.clear()
        _comm_cache[comm] = escaped
    return escaped


def encode_tap_line(
    time_ns: int,
    stream: int,
    pid: int,
    comm: bytes,
    cgroup_id: int,
    message: bytes,
    partial: bool,
    invalid_utf8: InvalidUtf8 = "replace",
) -> bytes:
    """A record without pod metadata (``podtap tap``): fields ``time, stream, pid, comm,
    cgroup_id, message, (message_base64), partial``; `invalid_utf8` as in RecordFormat."""
    if stream != STDOUT and stream != STDERR:
        raise ValueError(f"stream must be 1 (stdout) or 2 (stderr), not {stream!r}")
    seconds, nanos = divmod(time_ns, _NS_PER_S)
    cached = _last_second
    prefix = cached[1] if cached[0] == seconds else _second_prefix(seconds)
    template = _TAP_TEMPLATES[(stream - 1) * 2 + partial]
    try:
        value = orjson.dumps(message.decode())
    except UnicodeDecodeError:
        value = _invalid_message(message, invalid_utf8)
    return template % (prefix, nanos, pid, _escaped_comm(comm), cgroup_id, value)
