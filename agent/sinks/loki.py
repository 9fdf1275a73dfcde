"""The Loki codec: push API (`POST <url>/loki/api/v1/push`), JSON, gzip by the transport.

    {"streams": [{"stream": {<labels>}, "values": [["<ns>", "<line>", {<metadata>}], ...]}]}

Stream labels (`loki.labels`; a small set, each value makes streams):

    namespace, pod, container, node, pod_uid, container_id, image   the container's
    stream        stdout | stderr
    app           the pod label app.kubernetes.io/name, else app (left out when neither)
    job           <namespace>/<container> (as Grafana's Kubernetes monitoring sets it)

plus the pod labels named in `loki.pod_labels`, under their sanitised key
(`app.kubernetes.io/name` -> `app_kubernetes_io_name`). Names follow Loki's label syntax
(`sanitize_label_name`); a label with an empty value is left out (Loki drops it too).

`loki.metadata` says where the rest of the metadata goes:

- `structured`: Loki's structured metadata (the third element of each value, Loki >= 2.9
  with `allow_structured_metadata`, the default in 3.x): the fields above that are not
  labels, `owner_kind`/`owner_name`, the pod's labels under their sanitised keys,
  `partial: "true"` on a line split or flushed before its newline, and, when
  `records.invalid_utf8` is `base64` or `escape`, `message_base64` with the exact bytes
  of a line that is not valid UTF-8 (a Loki line is text: it has U+FFFD in their place);
- `json`: the line is the whole record (`records.ContainerEncoder`, in `records.schema`
  and with its `invalid_utf8` rule);
- `none`: the line is the message, nothing else (invalid UTF-8 as U+FFFD).

Items and groups. A batch keeps the items of one `ItemEncoder.group` together, and the
group is fixed per encoder, that is per container. When `stream` is a label, one container
makes two Loki streams, so the group holds the container's labels without `stream` and
each item starts with one whitespace byte naming its stream (`_TAG`: " " stdout, "\\t"
stderr) before the value array. JSON allows whitespace there, so an item is still a JSON
value and the body joins items without copying them; `body()` sorts each group by
(tag, timestamp) and splits it into its two streams. Timestamps are written zero-padded
to 19 digits (Loki parses them as base-10 int64, so leading zeros are fine): the first
22 bytes of an item then sort as (stream, time), with a stable sort keeping the order of
lines with equal times.
"""

from __future__ import annotations

import base64
import re
import time
from bisect import bisect_left
from operator import itemgetter

import orjson

from agent.config import SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import STDERR, STDOUT, ContainerEncoder, RecordFormat
from agent.sinks.base import Batch, Outcome, Response
from agent.sinks.retry import classify_status, parse_retry_after

__all__ = ["PUSH_PATH", "LokiCodec", "LokiEncoder", "label_values", "sanitize_label_name"]

PUSH_PATH = "/loki/api/v1/push"
CONTENT_TYPE = "application/json"

_TAG = {STDOUT: b" ", STDERR: b"\t"}
_STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
_KEY_END = 22  # tag, '["', 19 digits
_sort_key = itemgetter(slice(0, _KEY_END))
_tag_of = itemgetter(slice(0, 1))
_time_key = itemgetter(slice(1, _KEY_END))
# Loki's default max_label_value_length; a longer value makes Loki refuse the stream.
MAX_LABEL_VALUE_BYTES = 2048
# Labels every container has a value for: a push needs at least one label per stream.
_ALWAYS_SET = frozenset({"namespace", "pod", "container", "stream", "node", "pod_uid",
                         "container_id", "job"})

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label_name(name: str) -> str:
    """A Loki (Prometheus) label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`.

    Each invalid character becomes `_`; a leading digit gets a `_` in front; leading
    underscores are cut to one (`__` names are reserved for Loki's own use)."""
    out = _INVALID.sub("_", name)
    if not out:
        return "_"
    if out[0].isdigit():
        out = "_" + out
    if out.startswith("__"):
        out = "_" + out.lstrip("_")
    return out


def _label_value(value: str) -> str:
    """Valid UTF-8 (lone surrogates replaced) and at most MAX_LABEL_VALUE_BYTES bytes."""
    data = value.encode("utf-8", "replace")
    if len(data) <= MAX_LABEL_VALUE_BYTES:
        return data.decode("utf-8")
    return data[:MAX_LABEL_VALUE_BYTES].decode("utf-8", "ignore")


def _app(meta: ContainerMeta) -> str:
    return meta.labels.get("app.kubernetes.io/name") or meta.labels.get("app") or ""


def label_values(meta: ContainerMeta) -> dict[str, str]:
    """The value of each name of `config.LOKI_LABELS` but `stream`, for one container."""
    return {
        "namespace": meta.namespace,
        "pod": meta.pod_name,
        "container": meta.container_name,
        "node": meta.host,
        "app": _app(meta),
        "job": f"{meta.namespace}/{meta.container_name}",
        "pod_uid": meta.pod_uid,
        "container_id": meta.container_id,
        "image": meta.image,
    }


def _json_members(pairs: dict[str, str]) -> bytes:
    """`"k":"v",...` (an object without its braces)."""
    return orjson.dumps(pairs)[1:-1]


class LokiEncoder:
    """The values of one container's lines (see the module docstring for the item bytes)."""

    __slots__ = ("_exact", "_heads", "_metadata", "_record", "_tails", "group")

    def __init__(self, codec: LokiCodec, meta: ContainerMeta) -> None:
        fixed = label_values(meta)
        labels = codec.stream_labels(meta, fixed)
        self.group: bytes = _json_members(labels)
        mode = codec.metadata_mode
        self._record = ContainerEncoder(meta, codec.fmt) if mode == "json" else None
        self._exact = mode == "structured" and codec.fmt.invalid_utf8 != "replace"
        # Per stream: the bytes up to the line; per (stream, partial): the structured
        # metadata object (b"" for none) and what follows the line.
        # Indexed by stream (1, 2) and by 2 * stream + partial: no key tuple per line.
        self._heads = (b"", *(_TAG[s] + b'["%019d",%s' for s in (STDOUT, STDERR)))
        self._metadata: dict[tuple[int, bool], bytes] = {}
        tails = [b""] * 6
        for stream in _TAG:
            for partial in (False, True):
                metadata = b""
                if mode == "structured":
                    fields = codec.structured_metadata(meta, fixed, labels, stream, partial)
                    metadata = orjson.dumps(fields) if fields else b""
                self._metadata[stream, partial] = metadata
                tails[2 * stream + partial] = (b"," + metadata if metadata else b"") + b"]"
        self._tails = tuple(tails)

    def encode(self, time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
        if self._record is not None:
            message = self._record.encode(time_ns, stream, message, partial)
        try:
            line = orjson.dumps(message.decode("utf-8"))
        except UnicodeDecodeError:
            line = orjson.dumps(message.decode("utf-8", "replace"))
            if self._exact:
                return self._heads[stream] % (time_ns, line) + self._exact_tail(
                    stream, partial, message)
        return self._heads[stream] % (time_ns, line) + self._tails[2 * stream + partial]

    def _exact_tail(self, stream: int, partial: bool, message: bytes) -> bytes:
        """Structured metadata with `message_base64`: the exact bytes of a line that is not
        valid UTF-8 (`records.invalid_utf8` base64 or escape; a Loki line must be text)."""
        metadata = self._metadata[stream, partial]
        opening = metadata[:-1] + b"," if metadata else b"{"
        return (b"," + opening + b'"message_base64":"' + base64.b64encode(message) + b'"}]')


class LokiCodec:
    """Implements `agent.sinks.base.Codec` for Loki.

    The pipeline builds the transport with `HttpTransport(cfg, codec.url,
    codec.content_type, codec.extra_headers)`; `extra_headers` holds `X-Scope-OrgID`
    when `loki.tenant` is set. Raises ValueError when no configured label has a value
    for every container (a stream without labels is refused by Loki).
    """

    content_type = CONTENT_TYPE

    def __init__(self, cfg: SinkConfig, fmt: RecordFormat) -> None:
        loki = cfg.loki
        if not _ALWAYS_SET.intersection(loki.labels):
            raise ValueError(
                f"loki.labels must hold one of {sorted(_ALWAYS_SET)}: Loki refuses a "
                "stream without labels"
            )
        self.fmt = fmt
        self.url = cfg.url.rstrip("/") + PUSH_PATH
        self.extra_headers: dict[str, str] = {"X-Scope-OrgID": loki.tenant} if loki.tenant else {}
        self.metadata_mode = loki.metadata
        self.stream_label = "stream" in loki.labels
        self._fixed_labels = tuple(name for name in loki.labels if name != "stream")
        self._pod_labels = loki.pod_labels

    # -- Codec

    def encoder(self, meta: ContainerMeta) -> LokiEncoder:
        return LokiEncoder(self, meta)

    def body(self, batch: Batch) -> bytes:
        """One join over the values: the stream openings and closings are glued to the
        first and last value of each stream, so the body is copied once (a 1 MiB batch
        built from nested joins and concatenations was copied four times)."""
        pieces: list[bytes] = []
        opening = b'{"streams":['
        for group, items in batch.groups.items():
            for labels, values in self._streams(group, items):
                head = opening + b'{"stream":{' + labels + b'},"values":['
                if pieces:
                    pieces[-1] += b"]}"
                pieces.append(head + values[0])
                pieces += values[1:]
                opening = b""
        if not pieces:
            return b'{"streams":[]}'
        pieces[-1] += b"]}]}"
        return b",".join(pieces)

    def outcome(self, batch: Batch, response: Response) -> Outcome:
        status = response.status
        verdict = classify_status(status)
        if verdict == "ok":
            return Outcome(delivered=batch.records)
        if verdict == "retry":
            retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
            return Outcome(retry=batch, retry_after_s=retry_after)
        # 400 is how Loki refuses entries: out of order, too far behind, too old or too new,
        # line too long, invalid labels. The valid entries of the push were stored; the
        # others never will be, so nothing is retried. Loki documents each reason as "not
        # retryable" in docs/sources/operations/request-validation-rate-limits.md
        # ("Enforce rate limits and push request validation"). Which entries were refused
        # cannot be told from the answer: all of them count as dead, with its text.
        reason = f"loki answered {status}: {_text(response.body)}"
        return Outcome(dead=[(self.dead_items(batch), reason)])

    # -- helpers of the encoder

    def stream_labels(self, meta: ContainerMeta, fixed: dict[str, str]) -> dict[str, str]:
        """The container's labels but `stream`, sanitised, without empty values."""
        labels: dict[str, str] = {}
        for name in self._fixed_labels:
            if fixed[name]:
                labels[name] = _label_value(fixed[name])
        for key in self._pod_labels:
            value = meta.labels.get(key, "")
            name = sanitize_label_name(key)
            if value and name not in labels and name != "stream":
                labels[name] = _label_value(value)
        return labels

    def structured_metadata(self, meta: ContainerMeta, fixed: dict[str, str],
                            labels: dict[str, str], stream: int,
                            partial: bool) -> dict[str, str]:
        """What is not a label, as Loki structured metadata (string values)."""
        out: dict[str, str] = {}
        for name, value in fixed.items():
            if value and name not in labels:
                out[name] = value
        if not self.stream_label:
            out["stream"] = _STREAM_NAMES[stream]
        if meta.owner_kind and meta.owner_name:
            out["owner_kind"] = meta.owner_kind
            out["owner_name"] = meta.owner_name
        for key, value in meta.labels.items():
            name = sanitize_label_name(key)
            if value and name not in labels and name not in out:
                out[name] = value
        if partial:
            out["partial"] = "true"
        return {k: v.encode("utf-8", "replace").decode("utf-8") for k, v in out.items()}

    # -- helpers of body and outcome

    def _streams(self, group: bytes, items: list[bytes]) -> list[tuple[bytes, list[bytes]]]:
        """(labels, values in time order) of each Loki stream of one group."""
        if not self.stream_label:
            return [(group, sorted(items, key=_time_key))]
        ordered = sorted(items, key=_sort_key)  # stderr's tag sorts first
        split = bisect_left(ordered, _TAG[STDOUT], key=_tag_of)
        out = []
        for stream, part in ((STDERR, ordered[:split]), (STDOUT, ordered[split:])):
            if part:
                out.append((_with_stream(group, stream), part))
        return out

    def dead_items(self, batch: Batch) -> list[bytes]:
        """Each item as a push stream object of its own (labels and the one value), so
        that a dead letter says which stream the line was for."""
        out = []
        for group, items in batch.groups.items():
            for item in items:
                labels = group
                if self.stream_label:
                    stream = STDERR if item[:1] == _TAG[STDERR] else STDOUT
                    labels = _with_stream(group, stream)
                out.append(_stream_object(labels, [item.lstrip()]))
        return out


def _with_stream(group: bytes, stream: int) -> bytes:
    member = b'"stream":"' + _STREAM_NAMES[stream].encode() + b'"'
    return group + b"," + member if group else member


def _stream_object(labels: bytes, values: list[bytes]) -> bytes:
    return b'{"stream":{' + labels + b'},"values":[' + b",".join(values) + b"]}"


def _text(body: bytes, limit: int = 4096) -> str:
    return body[:limit].decode("utf-8", "replace").strip()
