"""Sinks from the configuration: one per `sinks.<name>`, each its own codec and transport."""

from __future__ import annotations

import dataclasses
from typing import BinaryIO

from agent.config import Config, RecordsConfig, SinkConfig
from agent.records import RecordFormat
from agent.sinks.base import Codec, Sink
from agent.sinks.stdout import StdoutSink


def make_codec(cfg: SinkConfig, fmt: RecordFormat) -> Codec:
    if cfg.kind == "elasticsearch":
        from agent.sinks.elasticsearch import ElasticsearchCodec

        return ElasticsearchCodec(cfg, fmt)
    if cfg.kind == "loki":
        from agent.sinks.loki import LokiCodec

        return LokiCodec(cfg, fmt)
    if cfg.kind == "otlp":
        from agent.sinks.otlp import OtlpCodec

        return OtlpCodec(cfg, fmt)
    if cfg.kind == "http":
        from agent.sinks.httpjson import HttpJsonCodec

        return HttpJsonCodec(cfg, fmt)
    raise ValueError(f"no codec for sink kind {cfg.kind!r}")


def make_sink(name: str, index: int, cfg: SinkConfig, fmt: RecordFormat, out: BinaryIO) -> Sink:
    if cfg.kind == "stdout":
        return StdoutSink(name, index, out, fmt)
    from agent.sinks.http import HttpTransport
    from agent.sinks.runner import BatchingSink

    codec = make_codec(cfg, fmt)
    try:
        transport = HttpTransport(cfg, codec.url, codec.content_type, codec.extra_headers)
    except ValueError as e:
        raise ValueError(f"sinks.{name}: {e}") from e
    return BatchingSink(name, index, cfg, codec, transport)


def build_sinks(cfg: Config, out: BinaryIO) -> list[Sink]:
    fmt = RecordFormat.from_section(cfg.records)
    return [
        make_sink(name, index, with_records_defaults(sink, cfg.records), fmt, out)
        for index, (name, sink) in enumerate(cfg.sinks.items())
    ]


def with_records_defaults(sink: SinkConfig, records: RecordsConfig) -> SinkConfig:
    """A sink without its own `dedot_labels` follows `records.dedot_labels` when that is
    set; unset in both, each codec decides (Elasticsearch de-dots)."""
    if sink.dedot_labels is None and records.dedot_labels is not None:
        return dataclasses.replace(sink, dedot_labels=records.dedot_labels)
    return sink
