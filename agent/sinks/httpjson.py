"""The generic HTTP sink: the records as NDJSON or as one JSON array, POSTed to any URL.

A record is what `agent.records` builds (time key, stream, message, partial, metadata).
The answer is all or nothing: 2xx delivered, 408/429/5xx sent again (Retry-After
honoured), anything else dead-lettered with the start of the answer.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Final

from agent.config import SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import ContainerEncoder, RecordFormat
from agent.sinks.base import Batch, ItemEncoder, Outcome, Response
from agent.sinks.retry import classify_status, parse_retry_after

NDJSON: Final = "application/x-ndjson"
JSON: Final = "application/json"
_EXCERPT_CHARS: Final = 500


class RecordItemEncoder:
    """One container's lines as records: the item is the record itself."""

    __slots__ = ("encode", "group")

    def __init__(self, meta: ContainerMeta, fmt: RecordFormat) -> None:
        self.group = b""
        # The bound method itself, so encoding a line costs no extra call.
        self.encode = ContainerEncoder(meta, fmt).encode


class HttpJsonCodec:
    """Implements `agent.sinks.base.Codec`; `url`, `content_type` and `extra_headers` build
    the transport."""

    def __init__(self, cfg: SinkConfig, fmt: RecordFormat) -> None:
        if cfg.dedot_labels is not None:
            fmt = dataclasses.replace(fmt, dedot_labels=cfg.dedot_labels)
        self._fmt = fmt
        self._array = cfg.http.format == "json_array"
        self.url = cfg.url
        self.content_type = JSON if self._array else NDJSON
        self.extra_headers: dict[str, str] = {}

    def encoder(self, meta: ContainerMeta) -> ItemEncoder:
        return RecordItemEncoder(meta, self._fmt)

    def body(self, batch: Batch) -> bytes:
        items = batch.items()
        if self._array:
            return b"[" + b",".join(items) + b"]"
        return b"\n".join(items) + b"\n" if items else b""

    def outcome(self, batch: Batch, response: Response) -> Outcome:
        verdict = classify_status(response.status)
        if verdict == "ok":
            return Outcome(delivered=batch.records)
        if verdict == "retry":
            wait = parse_retry_after(response.headers.get("retry-after"), time.time())
            return Outcome(retry=batch, retry_after_s=wait)
        text = response.body[: _EXCERPT_CHARS * 4].decode("utf-8", "replace")
        text = " ".join(text.split())[:_EXCERPT_CHARS] or "(empty body)"
        return Outcome(dead=[(batch.items(), f"HTTP {response.status}: {text}")])
