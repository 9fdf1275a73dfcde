"""The loopback OTLP/HTTP receiver accepts what the OTLP/JSON mapping allows, refuses what
a receiver refuses (400 with a google.rpc.Status, 415), and its knobs work."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

from simnode.otlp import FakeOtlpReceiver

JSON = {"Content-Type": "application/json"}
PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOtlpReceiver]:
    with FakeOtlpReceiver() as receiver:
        yield receiver


@pytest.fixture
def otlp(server: FakeOtlpReceiver) -> FakeOtlpReceiver:
    server.clear()
    return server


def post(url: str, body: bytes, headers: dict[str, str], path: str = "/v1/logs",
         method: str = "POST") -> tuple[int, bytes, dict[str, str]]:
    async def go() -> tuple[int, bytes, dict[str, str]]:
        async with aiohttp.ClientSession() as session, session.request(
            method, url + path, data=body, headers=headers
        ) as r:
            return r.status, await r.read(), dict(r.headers)

    return asyncio.run(go())


def record(**fields: Any) -> dict[str, Any]:
    return {"timeUnixNano": "1", "body": {"stringValue": "x"}, **fields}


def doc(*records: dict[str, Any], resource: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"resourceLogs": [{
        "resource": resource or {"attributes": [{"key": "k8s.pod.name",
                                                 "value": {"stringValue": "p"}}]},
        "scopeLogs": [{"scope": {"name": "t"}, "logRecords": list(records)}],
    }]}


def test_json_export_is_parsed_into_the_official_types(otlp: FakeOtlpReceiver) -> None:
    body = orjson.dumps(doc(
        record(timeUnixNano="1700000000000000001", severityNumber=9, severityText="INFO",
               traceId="0102030405060708090a0b0c0d0e0f10", spanId="0102030405060708",
               attributes=[{"key": "n", "value": {"intValue": "7"}},
                           {"key": "l", "value": {"arrayValue": {"values": [
                               {"stringValue": "a"}, {"boolValue": True}]}}}]),
        record(timeUnixNano=5, body={"kvlistValue": {"values": [
            {"key": "k", "value": {"doubleValue": 1.5}}]}}),
    ))
    status, answer, headers = post(otlp.url, body, JSON)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    json_format.Parse(answer, ExportLogsServiceResponse())
    first, second = otlp.records()
    assert first.resource == {"k8s.pod.name": "p"} and first.scope_name == "t"
    assert first.record.time_unix_nano == 1700000000000000001
    assert first.record.trace_id == bytes(range(1, 17)) and first.record.span_id == bytes(
        range(1, 9))
    assert first.attributes == {"n": 7, "l": ["a", True]}
    assert second.record.time_unix_nano == 5 and second.body == {"k": 1.5}
    assert isinstance(otlp.exports()[0], ExportLogsServiceRequest)


def test_gzip_and_protobuf(otlp: FakeOtlpReceiver) -> None:
    body = orjson.dumps(doc(record()))
    status, _, _ = post(otlp.url, gzip.compress(body), {**JSON, "Content-Encoding": "gzip"})
    assert status == 200
    binary = json_format.Parse(body, ExportLogsServiceRequest()).SerializeToString()
    status, answer, headers = post(otlp.url, binary, PROTOBUF)
    assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
    ExportLogsServiceResponse().ParseFromString(answer)
    assert len(otlp.records()) == 2


def test_unknown_fields_are_ignored(otlp: FakeOtlpReceiver) -> None:
    body = orjson.dumps({**doc(record(futureField={"a": 1})), "alsoUnknown": 3})
    assert post(otlp.url, body, JSON)[0] == 200
    assert len(otlp.records()) == 1


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"not json",
        b"[]",
        b'{"resourceLogs": 3}',
        orjson.dumps(doc(record(timeUnixNano="soon"))),
        orjson.dumps(doc(record(timeUnixNano=-1))),
        orjson.dumps(doc(record(body="a bare string, not an AnyValue"))),
        orjson.dumps(doc(record(severityNumber="LOUD"))),
        orjson.dumps(doc(record(traceId="xyz"))),
        orjson.dumps(doc(record(traceId="0102"))),
        orjson.dumps(doc(record(spanId="0102030405060708090a"))),
        orjson.dumps(doc(record(attributes=[{"key": "k", "value": {"stringValue": 5}}]))),
    ],
)
def test_what_does_not_parse_is_400_with_a_status(otlp: FakeOtlpReceiver, bad: bytes) -> None:
    status, answer, _ = post(otlp.url, bad, JSON)
    assert status == 400
    problem = orjson.loads(answer)
    assert problem["code"] == 3 and problem["message"]
    assert otlp.records() == []


def test_protobuf_that_does_not_parse_is_400(otlp: FakeOtlpReceiver) -> None:
    status, answer, _ = post(otlp.url, b"\xff\xff\xff", PROTOBUF)
    assert status == 400 and answer.startswith(b"\x08\x03\x12")


def test_unsupported_media_type_and_encoding(otlp: FakeOtlpReceiver) -> None:
    body = orjson.dumps(doc(record()))
    assert post(otlp.url, body, {"Content-Type": "text/plain"})[0] == 415
    assert post(otlp.url, body, {**JSON, "Content-Encoding": "snappy"})[0] == 400
    assert post(otlp.url, body, JSON, path="/v1/traces")[0] == 404
    assert post(otlp.url, b"", JSON, method="GET")[0] == 405


def test_partial_success_answer(otlp: FakeOtlpReceiver) -> None:
    otlp.partial_success(2, "quota")
    body = orjson.dumps(doc(record(body={"stringValue": "a"}), record(body={"stringValue": "b"}),
                            record(body={"stringValue": "c"})))
    status, answer, _ = post(otlp.url, body, JSON)
    assert status == 200
    response = json_format.Parse(answer, ExportLogsServiceResponse())
    assert response.partial_success.rejected_log_records == 2
    assert response.partial_success.error_message == "quota"
    assert [r.body for r in otlp.records()] == ["c"]
    # Only the next request: then whole successes again, with an empty answer.
    status, answer, _ = post(otlp.url, body, JSON)
    assert status == 200 and orjson.loads(answer) == {}


def test_knobs(otlp: FakeOtlpReceiver) -> None:
    body = orjson.dumps(doc(record()))
    otlp.fail_next(1, status=503, retry_after="2")
    status, _, headers = post(otlp.url, body, JSON)
    assert status == 503 and headers["Retry-After"] == "2"
    port = otlp.port
    otlp.down()
    try:
        with pytest.raises(aiohttp.ClientConnectionError):
            post(otlp.url, body, JSON)
    finally:
        otlp.up()
    assert otlp.port == port
    otlp.delay_s = 0.3
    try:
        started = time.monotonic()
        assert post(otlp.url, body, JSON)[0] == 200
        assert time.monotonic() - started >= 0.3
    finally:
        otlp.delay_s = 0.0
    assert [r.status for r in otlp.requests] == [503, 200]
