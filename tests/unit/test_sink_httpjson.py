"""HttpJsonCodec: NDJSON or a JSON array of records, all-or-nothing answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from agent.config import HttpFormatConfig, SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import ContainerEncoder, RecordFormat
from agent.sinks.base import Batch, Outcome, Response
from agent.sinks.http import HttpTransport
from agent.sinks.httpjson import HttpJsonCodec
from simnode.esbulk import Answer, RecordingServer

T = 1_764_633_600_123_456_789


def meta() -> ContainerMeta:
    return ContainerMeta(namespace="ns", pod_name="p", pod_uid="u", container_name="c",
                         container_id="id1", runtime="containerd", image="img:1", host="n",
                         qos_class="besteffort", labels={"a.b": "1"})


def codec(fmt: str = "ndjson", url: str = "http://h/in", **kw: Any) -> HttpJsonCodec:
    return HttpJsonCodec(SinkConfig(kind="http", url=url, http=HttpFormatConfig(format=fmt), **kw),
                         RecordFormat())


def batch(c: HttpJsonCodec, n: int) -> Batch:
    enc = c.encoder(meta())
    items = [enc.encode(T + i, 1 + i % 2, b"line %d" % i, i == 2) for i in range(n)]
    return Batch(seq=1, groups={b"": items}, records=n, nbytes=sum(map(len, items)),
                 created_ns=0)


def test_items_are_the_records_of_agent_records() -> None:
    c = codec()
    item = c.encoder(meta()).encode(T, 2, b"hi", True)
    assert item == ContainerEncoder(meta(), RecordFormat()).encode(T, 2, b"hi", True)
    assert c.encoder(meta()).group == b""


@pytest.mark.parametrize("n", [1, 3, 50])
def test_ndjson_body(n: int) -> None:
    c = codec()
    assert (c.url, c.content_type) == ("http://h/in", "application/x-ndjson")
    b = batch(c, n)
    body = c.body(b)
    assert body.endswith(b"\n") and body.count(b"\n") == n
    assert [orjson.loads(x)["message"] for x in body.splitlines()] == [
        f"line {i}" for i in range(n)]


@pytest.mark.parametrize("n", [1, 3, 50])
def test_json_array_body(n: int) -> None:
    c = codec("json_array")
    assert c.content_type == "application/json"
    doc = orjson.loads(c.body(batch(c, n)))
    assert [r["message"] for r in doc] == [f"line {i}" for i in range(n)]
    assert doc[0]["stream"] == "stdout" and doc[-1]["partial"] is (n - 1 == 2)


def test_dedot_follows_the_sink_then_the_records_option() -> None:
    def labels(c: HttpJsonCodec) -> set[str]:
        return set(orjson.loads(c.encoder(meta()).encode(T, 1, b"x", False))["kubernetes"]
                   ["labels"])

    assert labels(codec()) == {"a.b"}
    assert labels(codec(dedot_labels=True)) == {"a_b"}
    on = HttpJsonCodec(SinkConfig(kind="http", url="http://h"), RecordFormat(dedot_labels=True))
    assert labels(on) == {"a_b"}


def test_outcomes() -> None:
    c = codec()
    b = batch(c, 3)
    for status in (200, 201, 202, 204):
        assert c.outcome(b, Response(status, {}, b"")) == Outcome(delivered=3)
    for status in (408, 429, 500, 503):
        out = c.outcome(b, Response(status, {"retry-after": "2"}, b""))
        assert out.retry is b and out.retry_after_s == 2.0 and out.delivered == 0
    for status in (400, 401, 403, 404, 413, 302):
        out = c.outcome(b, Response(status, {}, b"bad\nrequest"))
        assert out.dead == [(b.items(), f"HTTP {status}: bad request")]


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer() as s:
        yield s


@pytest.mark.parametrize(("fmt", "gzip"), [("ndjson", True), ("json_array", False)])
def test_round_trip(server: RecordingServer, fmt: str, gzip: bool) -> None:
    cfg = SinkConfig(kind="http", url=server.url + "/logs", gzip=gzip,
                     http=HttpFormatConfig(format=fmt))
    c = HttpJsonCodec(cfg, RecordFormat())
    server.answer(Answer(503), Answer(204))
    b = batch(c, 4)

    async def main() -> list[Outcome]:
        t = HttpTransport(cfg, c.url, c.content_type)
        try:
            return [c.outcome(b, await t.send(c.body(b))) for _ in range(2)]
        finally:
            await t.close()

    first, second = asyncio.run(main())
    assert first.retry is b and second == Outcome(delivered=4)
    reqs = server.requests()
    assert [r.path for r in reqs] == ["/logs", "/logs"]
    assert reqs[1].body == c.body(b)
    assert reqs[1].headers["content-type"] == c.content_type
