"""Tests of agent.sinks.otlp against the loopback OTLP receiver (simnode/otlp.py),
through the real HTTP transport: the payload as the official protobuf types read it, and
how the receiver's answers are read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from agent.config import BatchConfig, RetryConfig, SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import RecordFormat
from agent.sinks.base import Batch, Enriched, Origin, Outcome, Response
from agent.sinks.http import HttpTransport
from agent.sinks.otlp import RETRYABLE_STATUSES, OtlpCodec, OtlpEncoder
from agent.sinks.runner import BatchingSink
from simnode.otlp import FakeOtlpReceiver, OtlpRecord

META = ContainerMeta(
    namespace="shop",
    pod_name="web-7d9f-abcde",
    pod_uid="0f1e2d3c-aaaa-bbbb-cccc-123456789abc",
    container_name="app",
    container_id="0123456789abcdef" * 4,
    runtime="containerd",
    image="registry.example.com:5000/team/web:1.4.2",
    host="node-3",
    qos_class="burstable",
    labels={"app.kubernetes.io/name": "web", "tier": "front"},
    annotations={"prometheus.io/scrape": "true"},
    owner_kind="ReplicaSet",
    owner_name="web-7d9f",
    namespace_labels={"team": "shop-team"},
    node_labels={"zone": "a"},
)
OTHER = replace(META, pod_name="db-0", container_name="postgres", container_id="f" * 64,
                image="postgres", labels={}, owner_kind="StatefulSet", owner_name="db")


@pytest.fixture(scope="module")
def receiver() -> Iterator[FakeOtlpReceiver]:
    with FakeOtlpReceiver() as server:
        yield server


@pytest.fixture
def fresh(receiver: FakeOtlpReceiver) -> FakeOtlpReceiver:
    receiver.clear()
    return receiver


def sink_cfg(url: str) -> SinkConfig:
    return SinkConfig(kind="otlp", url=url)


def batch_of(lines: list[tuple[OtlpEncoder, int, int, bytes, bool]]) -> Batch:
    groups: dict[bytes, list[bytes]] = {}
    for encoder, t, stream, message, partial in lines:
        groups.setdefault(encoder.group, []).append(encoder.encode(t, stream, message, partial))
    items = sum(len(v) for v in groups.values())
    return Batch(seq=1, groups=groups, records=items, nbytes=0, created_ns=time.time_ns())


def send(codec: OtlpCodec, cfg: SinkConfig, body: bytes) -> Response:
    async def go() -> Response:
        transport = HttpTransport(cfg, codec.url, codec.content_type, codec.extra_headers)
        try:
            return await transport.send(body)
        finally:
            await transport.close()

    return asyncio.run(go())


def export(codec: OtlpCodec, cfg: SinkConfig, batch: Batch) -> tuple[Response, Outcome]:
    response = send(codec, cfg, codec.body(batch))
    return response, codec.outcome(batch, response)


def test_every_semantic_convention_attribute(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    t = time.time_ns()
    response, outcome = export(codec, cfg, batch_of([(codec.encoder(META), t, 1, b"hi", False)]))
    assert response.status == 200 and outcome.delivered == 1 and not outcome.dead
    (record,) = fresh.records()
    assert record.resource == {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-7d9f-abcde",
        "k8s.pod.uid": "0f1e2d3c-aaaa-bbbb-cccc-123456789abc",
        "k8s.container.name": "app",
        "k8s.node.name": "node-3",
        "container.id": "0123456789abcdef" * 4,
        "container.image.name": "registry.example.com:5000/team/web",
        "container.image.tags": ["1.4.2"],
        "container.runtime": "containerd",
        "k8s.replicaset.name": "web-7d9f",
        "k8s.pod.label.app.kubernetes.io/name": "web",  # never de-dotted
        "k8s.pod.label.tier": "front",
    }
    assert record.scope_name == "podtap"
    assert record.record.time_unix_nano == t and record.record.observed_time_unix_nano == t
    assert record.body == "hi"
    assert record.attributes == {"log.iostream": "stdout", "logtag": "F"}
    # Severity is left unset, as the Collector's container parser leaves it.
    assert record.record.severity_number == 0 and record.record.severity_text == ""


def test_annotations_and_namespace_and_node_labels_when_asked(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url)
    fmt = RecordFormat(include_annotations=True, include_namespace_labels=True,
                       include_node_labels=True, dedot_labels=True)
    codec = OtlpCodec(cfg, fmt)
    export(codec, cfg, batch_of([(codec.encoder(META), time.time_ns(), 2, b"x", False)]))
    resource = fresh.records()[0].resource
    assert resource["k8s.pod.annotation.prometheus.io/scrape"] == "true"
    assert resource["k8s.namespace.label.team"] == "shop-team"
    assert resource["k8s.node.label.zone"] == "a"
    assert resource["k8s.pod.label.app.kubernetes.io/name"] == "web"


def test_stderr_and_partial_lines(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    enc = codec.encoder(META)
    t = time.time_ns()
    export(codec, cfg, batch_of([(enc, t, 2, b"piece", True), (enc, t + 1, 1, b"out", True),
                                 (enc, t + 2, 2, b"err", False)]))
    got = [(r.body, r.attributes["log.iostream"], r.attributes["logtag"])
           for r in fresh.records()]
    assert got == [("piece", "stderr", "P"), ("out", "stdout", "P"), ("err", "stderr", "F")]


def test_one_resource_per_container(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    a, b = codec.encoder(META), codec.encoder(OTHER)
    t = time.time_ns()
    export(codec, cfg, batch_of([(a, t, 1, b"a1", False), (b, t, 1, b"b1", False),
                                 (a, t + 1, 1, b"a2", False)]))
    (request,) = fresh.exports()
    assert len(request.resource_logs) == 2
    by_pod = {r.resource["k8s.pod.name"]: [] for r in fresh.records()}
    for r in fresh.records():
        by_pod[r.resource["k8s.pod.name"]].append(r.body)
    assert by_pod == {"web-7d9f-abcde": ["a1", "a2"], "db-0": ["b1"]}
    assert "k8s.statefulset.name" in next(
        r.resource for r in fresh.records() if r.resource["k8s.pod.name"] == "db-0")


@given(st.binary(max_size=64), st.sampled_from([1, 2]), st.booleans(),
       st.integers(0, 2**63 - 1),
       st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4))
def test_any_line_parses_with_the_official_types(
    message: bytes, stream: int, partial: bool, t: int, labels: dict[str, str]
) -> None:
    codec = OtlpCodec(sink_cfg("http://127.0.0.1:1"), RecordFormat())
    enc = codec.encoder(replace(META, labels=labels))
    body = codec.body(batch_of([(enc, t, stream, message, partial)]))
    request = json_format.Parse(body, ExportLogsServiceRequest())
    (resource_logs,) = request.resource_logs
    (record,) = resource_logs.scope_logs[0].log_records
    assert record.body.string_value == message.decode("utf-8", "replace")
    assert record.time_unix_nano == t == record.observed_time_unix_nano
    resource = {kv.key: kv.value.string_value for kv in resource_logs.resource.attributes}
    for key, value in labels.items():
        assert resource["k8s.pod.label." + key] == value


def test_partial_success_counts_the_rejected_as_dead(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    enc = codec.encoder(META)
    t = time.time_ns()
    batch = batch_of([(enc, t + i, 1, f"line {i}".encode(), False) for i in range(5)])
    fresh.partial_success(2, "too old for this receiver")
    response, outcome = export(codec, cfg, batch)
    assert response.status == 200
    assert outcome.delivered == 3 and outcome.retry is None
    ((items, reason),) = outcome.dead
    assert len(items) == 2
    assert "2 of 5 log records rejected" in reason and "too old for this receiver" in reason
    assert [r.body for r in fresh.records()] == ["line 2", "line 3", "line 4"]


def test_partial_success_without_rejections_is_success() -> None:
    codec = OtlpCodec(sink_cfg("http://127.0.0.1:1"), RecordFormat())
    batch = batch_of([(codec.encoder(META), 1, 1, b"x", False)])
    for body in (b"", b"{}", b'{"partialSuccess":{}}',
                 b'{"partialSuccess":{"rejectedLogRecords":"0","errorMessage":"warning"}}'):
        outcome = codec.outcome(batch, Response(200, {}, body))
        assert outcome.delivered == 1 and not outcome.dead, body


@pytest.mark.parametrize("status", sorted(RETRYABLE_STATUSES))
def test_retryable_statuses(fresh: FakeOtlpReceiver, status: int) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    batch = batch_of([(codec.encoder(META), time.time_ns(), 1, b"x", False)])
    fresh.fail_next(1, status=status, retry_after="3")
    response, outcome = export(codec, cfg, batch)
    assert response.status == status
    assert outcome.retry is batch and outcome.retry_after_s == 3.0 and not outcome.dead


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 413, 415, 500, 501, 505])
def test_other_failures_are_never_retried(fresh: FakeOtlpReceiver, status: int) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    batch = batch_of([(codec.encoder(META), time.time_ns(), 1, b"x", False)])
    fresh.fail_next(1, status=status, retry_after="3", body="refused")
    _, outcome = export(codec, cfg, batch)
    assert outcome.retry is None and outcome.delivered == 0
    ((items, reason),) = outcome.dead
    assert len(items) == 1 and reason == f"OTLP receiver answered {status}: refused"


def test_400_status_message_from_the_receiver(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    batch = batch_of([(codec.encoder(META), time.time_ns(), 1, b"x", False)])
    broken = codec.body(batch).replace(b'"timeUnixNano":"', b'"timeUnixNano":"x')
    response = send(codec, cfg, broken)
    assert response.status == 400
    outcome = codec.outcome(batch, response)
    ((_, reason),) = outcome.dead
    assert reason.startswith("OTLP receiver answered 400: ") and "timeUnixNano" in reason
    assert "{" not in reason  # the Status message, not the JSON around it


def test_request_shape(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url + "/")
    codec = OtlpCodec(cfg, RecordFormat())
    assert codec.url == fresh.url + "/v1/logs" and codec.extra_headers == {}
    export(codec, cfg, batch_of([(codec.encoder(META), time.time_ns(), 1, b"y" * 3000, False)]))
    request = fresh.requests[-1]
    assert request.path == "/v1/logs" and request.status == 200
    assert request.headers["content-type"] == "application/json"
    assert request.headers["content-encoding"] == "gzip" and request.body_bytes < 1500
    assert orjson.loads(request.answer) == {}


def test_records_are_official_log_records(fresh: FakeOtlpReceiver) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat())
    export(codec, cfg, batch_of([(codec.encoder(META), 5, 1, b"\xff\xfe", False)]))
    (record,) = fresh.records()
    assert isinstance(record, OtlpRecord)
    assert record.body == "\ufffd\ufffd"
    assert not record.record.trace_id and not record.record.span_id


@pytest.mark.parametrize("mode", ["base64", "escape"])
def test_exact_bytes_as_bytes_value(fresh: FakeOtlpReceiver, mode: str) -> None:
    cfg = sink_cfg(fresh.url)
    codec = OtlpCodec(cfg, RecordFormat(invalid_utf8=mode))  # type: ignore[arg-type]
    enc = codec.encoder(META)
    raw = b"bad \xff\xfe tail \xe2\x82"
    export(codec, cfg, batch_of([(enc, 7, 2, raw, True), (enc, 8, 1, "ok ✓".encode(), False)]))
    bad, ok = fresh.records()
    assert bad.body == raw and bad.attributes == {"log.iostream": "stderr", "logtag": "P"}
    assert bad.record.time_unix_nano == 7 == bad.record.observed_time_unix_nano
    assert ok.body == "ok ✓"


@given(st.binary(max_size=40))
def test_exact_bytes_for_any_line(raw: bytes) -> None:
    codec = OtlpCodec(sink_cfg("http://127.0.0.1:1"), RecordFormat(invalid_utf8="base64"))
    body = codec.body(batch_of([(codec.encoder(META), 1, 1, raw, False)]))
    request = json_format.Parse(body, ExportLogsServiceRequest())
    value = request.resource_logs[0].scope_logs[0].log_records[0].body
    try:
        assert value.string_value == raw.decode("utf-8")
    except UnicodeDecodeError:
        assert value.bytes_value == raw


def test_batching_sink_with_partial_success_and_outage(fresh: FakeOtlpReceiver,
                                                      tmp_path: Path) -> None:
    """OtlpCodec in the real runner and transport: a receiver that is down, then answers
    503, then accepts all but 2 records of one request; every record is delivered or
    dead-lettered exactly once."""
    cfg = replace(
        sink_cfg(fresh.url),
        batch=BatchConfig(max_bytes=4096, max_records=20, max_age_s=0.02),
        retry=RetryConfig(initial_backoff_s=0.01, max_backoff_s=0.05),
        dead_letter_dir=str(tmp_path / "dead"),
        max_in_flight=1,
    )
    codec = OtlpCodec(cfg, RecordFormat())
    transport = HttpTransport(cfg, codec.url, codec.content_type, codec.extra_headers)
    origins = [Origin(1, META, 1), Origin(2, OTHER, 1)]
    lines: list[Enriched] = [(origins[i % 2], 1_000 + i, 1 + i % 2, f"r{i}".encode(), False)
                             for i in range(100)]

    async def scenario() -> BatchingSink:
        sink = BatchingSink("otlp", 0, cfg, codec, transport)
        runner = asyncio.create_task(sink.run())
        fresh.down()
        sink.put(lines[:50])
        deadline = time.monotonic() + 60
        while sink.stats.failures.get("transport", 0) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        fresh.fail_next(1, status=503, retry_after="0")
        fresh.partial_success(2, "dropped by policy")
        fresh.up()
        sink.put(lines[50:])
        while (sink.stats.records_sent + sink.stats.dead_records < len(lines)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.02)
        await sink.close(5.0)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return sink

    sink = asyncio.run(scenario())
    assert sink.stats.records_sent == 98 and sink.stats.dead_records == 2
    received = sorted(r.body for r in fresh.records())
    assert len(received) == 98 and len(set(received)) == 98
    letters = [orjson.loads(line)
               for f in (tmp_path / "dead").iterdir() for line in f.read_bytes().splitlines()]
    assert len(letters) == 2
    assert all("dropped by policy" in letter["reason"] for letter in letters)
    dead_bodies = {orjson.loads(letter["item"])["body"]["stringValue"] for letter in letters}
    assert dead_bodies.isdisjoint(received)
    assert {f"r{i}" for i in range(100)} == dead_bodies | set(received)
