"""ElasticsearchCodec: `_bulk` items, URLs, deterministic ids, and every kind of answer."""

from __future__ import annotations

import asyncio
import base64
import calendar
import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from agent.config import ElasticsearchConfig, SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import RecordFormat
from agent.sinks.base import Batch, Outcome, Response
from agent.sinks.elasticsearch import FILTER_PATH, ElasticsearchCodec
from agent.sinks.http import HttpTransport
from simnode.esbulk import Answer, EsBulkServer

T0 = calendar.timegm((2026, 12, 1, 23, 59, 59)) * 10**9 + 123456789  # one second to midnight
DAY2 = T0 + 2 * 10**9  # 2026-12-02T00:00:01.123456789Z


def meta(container_id: str = "c0ffee" * 10 + "abcd", **kw: Any) -> ContainerMeta:
    base: dict[str, Any] = dict(
        namespace="shop", pod_name="web-1", pod_uid="uid-1", container_name="web",
        container_id=container_id, runtime="containerd", image="nginx:1.25", host="node-1",
        qos_class="burstable",
        labels={"app": "web", "app.kubernetes.io/name": "web", "tier": "front"},
    )
    base.update(kw)
    return ContainerMeta(**base)


def es_cfg(url: str = "http://es:9200", **es: Any) -> SinkConfig:
    return SinkConfig(kind="elasticsearch", url=url, elasticsearch=ElasticsearchConfig(**es))


def codec(url: str = "http://es:9200", dedot: bool | None = None, **es: Any) -> ElasticsearchCodec:
    c = es_cfg(url, **es)
    if dedot is not None:
        c = SinkConfig(kind="elasticsearch", url=url, elasticsearch=c.elasticsearch,
                       dedot_labels=dedot)
    return ElasticsearchCodec(c, RecordFormat())


def batch_of(items: list[bytes], seq: int = 7) -> Batch:
    return Batch(seq=seq, groups={b"": list(items)}, records=len(items),
                 nbytes=sum(map(len, items)), created_ns=123)


def lines(c: ElasticsearchCodec, messages: list[bytes], t: int = T0,
          m: ContainerMeta | None = None) -> list[bytes]:
    enc = c.encoder(m or meta())
    return [enc.encode(t + i, 1 + i % 2, msg, False) for i, msg in enumerate(messages)]


def split(item: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    assert item.endswith(b"\n") and item.count(b"\n") == 2
    action, source, _ = item.split(b"\n")
    return orjson.loads(action), orjson.loads(source)


# --- items and URLs -------------------------------------------------------------------------


def test_data_stream_items_create_without_index_and_at_timestamp() -> None:
    c = codec()
    assert c.url == f"http://es:9200/logs-podtap-default/_bulk?filter_path={FILTER_PATH}"
    assert c.content_type == "application/x-ndjson"
    (item,) = lines(c, ["GET / 200 \u00e9\"x".encode()])
    assert item.startswith(b'{"create":{}}\n{"@timestamp":"2026-12-01T23:59:59.123456789Z"')
    action, source = split(item)
    assert action == {"create": {}}
    assert "time" not in source
    assert source["message"] == 'GET / 200 \u00e9"x'
    assert source["stream"] == "stdout"
    assert source["kubernetes"]["pod_name"] == "web-1"


@pytest.mark.parametrize(("dedot", "keys"), [
    (None, {"app", "app_kubernetes_io/name", "tier"}),
    (True, {"app", "app_kubernetes_io/name", "tier"}),
    (False, {"app", "app.kubernetes.io/name", "tier"}),
])
def test_label_dedot_is_on_unless_the_sink_turns_it_off(dedot: bool | None,
                                                        keys: set[str]) -> None:
    (item,) = lines(codec(dedot=dedot), [b"x"])
    assert set(split(item)[1]["kubernetes"]["labels"]) == keys


@pytest.mark.parametrize(("url", "expected"), [
    ("https://es.example:9243", "https://es.example:9243/logs-podtap-default/_bulk"),
    ("https://es.example:9243/", "https://es.example:9243/logs-podtap-default/_bulk"),
    ("http://proxy/es/", "http://proxy/es/logs-podtap-default/_bulk"),
])
def test_bulk_url_keeps_a_base_path(url: str, expected: str) -> None:
    assert codec(url).url == f"{expected}?filter_path={FILTER_PATH}"


def test_pipeline_is_a_query_parameter() -> None:
    c = codec(pipeline="podtap parse")
    assert c.url.endswith(f"/_bulk?filter_path={FILTER_PATH}&pipeline=podtap+parse")


def test_index_mode_with_a_date_pattern_names_the_index_of_the_records_utc_day() -> None:
    c = codec(index="logs-%Y.%m.%d", data_stream=False)
    assert c.url == f"http://es:9200/_bulk?filter_path={FILTER_PATH}"
    enc = c.encoder(meta())
    items = [enc.encode(t, 1, b"m", False) for t in (T0, DAY2, T0, DAY2 + 86400 * 10**9 * 40)]
    indices = [split(i)[0]["index"]["_index"] for i in items]
    assert indices == ["logs-2026.12.01", "logs-2026.12.02", "logs-2026.12.01",
                       "logs-2027.01.11"]


def test_index_mode_without_a_pattern_puts_the_index_in_the_url() -> None:
    c = codec(index="podtap", data_stream=False)
    assert c.url == f"http://es:9200/podtap/_bulk?filter_path={FILTER_PATH}"
    (item,) = lines(c, [b"x"])
    assert split(item)[0] == {"index": {}}


def test_body_is_the_items_joined() -> None:
    c = codec()
    items = lines(c, [b"a", b"b", b"c"])
    assert c.body(batch_of(items)) == b"".join(items)


# --- deterministic ids -----------------------------------------------------------------------


def test_document_ids_are_stable_across_runs() -> None:
    # The id depends on nothing but the record (no per-process seed): the documented
    # formula, and a fixed value so that a change of the formula is noticed (ids of records
    # in disk buffers written by an older agent must not change).
    digest = hashlib.blake2b(meta().container_id.encode() + b"\0" + struct.pack("<qBB", T0, 1, 0)
                             + b"hello", digest_size=16).digest()
    expected = base64.urlsafe_b64encode(digest)[:22].decode()
    assert expected == "KDfekMtejAn67Ii7FOaogg"
    c = codec(document_id=True)
    (item,) = lines(c, [b"hello"])
    assert split(item)[0] == {"create": {"_id": expected}}
    dated = codec(document_id=True, data_stream=False, index="l-%Y")
    (item,) = lines(dated, [b"hello"])
    assert split(item)[0] == {"index": {"_index": "l-2026", "_id": expected}}


def test_document_id_depends_on_every_part_of_the_record() -> None:
    c = codec(document_id=True)

    def doc_id(cid: str = "c1", t: int = T0, stream: int = 1, msg: bytes = b"m",
               partial: bool = False) -> str:
        item = c.encoder(meta(container_id=cid)).encode(t, stream, msg, partial)
        return str(split(item)[0]["create"]["_id"])

    ids = [doc_id(), doc_id(cid="c2"), doc_id(t=T0 + 1), doc_id(stream=2), doc_id(msg=b"n"),
           doc_id(partial=True)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 22 and "=" not in i for i in ids)
    assert doc_id() == ids[0]


def test_identical_lines_of_one_write_get_distinct_reproducible_ids() -> None:
    c = codec(document_id=True)

    def ids() -> list[str]:
        enc = c.encoder(meta())
        writes = [(T0, [b"", b"x", b"", b"x", b""]), (T0 + 5, [b"", b"x"]), (T0 + 5, [b"x"])]
        out = []
        for t, msgs in writes:
            out += [str(split(enc.encode(t, 1, m, False))[0]["create"]["_id"]) for m in msgs]
        return out

    first = ids()
    assert len(set(first)) == len(first)
    assert ids() == first  # a new encoder (a restart) numbers them the same way


# --- answers --------------------------------------------------------------------------------


def bulk_answer(*items: tuple[int, str | None], op: str = "create") -> bytes:
    out = []
    for status, etype in items:
        res: dict[str, Any] = {"status": status}
        if etype:
            res["error"] = {"type": etype, "reason": f"{etype} happened"}
        out.append({op: res})
    errors = any(s >= 300 for s, _ in items)
    return orjson.dumps({"errors": errors, "items": out})


def answer(status: int, body: bytes = b"", **headers: str) -> Response:
    return Response(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)


def test_all_accepted() -> None:
    c = codec()
    b = batch_of(lines(c, [b"a", b"b"]))
    for body in (b'{"errors":false,"items":[{"create":{"status":201}},{"create":{"status":201}}]}',
                 b'{"took":3,"errors":false,"items":[]}'):
        assert c.outcome(b, answer(200, body)) == Outcome(delivered=2)


def test_mixed_items_resend_only_429_and_5xx_and_dead_letter_the_rest() -> None:
    c = codec(document_id=True)
    items = lines(c, [b"ok", b"dup", b"busy", b"mapping", b"down", b"ok2", b"other-409"])
    b = batch_of(items, seq=42)
    b.attempts = 3
    body = bulk_answer((201, None), (409, "version_conflict_engine_exception"),
                       (429, "es_rejected_execution_exception"),
                       (400, "document_parsing_exception"), (503, "unavailable_shards_exception"),
                       (200, None), (409, "some_other_conflict"))
    out = c.outcome(b, answer(200, body))
    assert out.delivered == 3  # 201, our 409, 200
    assert out.retry is not None
    assert out.retry.items() == [items[2], items[4]]
    assert (out.retry.seq, out.retry.records, out.retry.created_ns, out.retry.attempts) == (
        42, 2, 123, 3)
    assert out.retry.nbytes == len(items[2]) + len(items[4])
    assert list(out.retry.groups) == [b""]
    assert [d[0] for d in out.dead] == [[items[3]], [items[6]]]
    assert "document_parsing_exception" in out.dead[0][1] and "400" in out.dead[0][1]
    assert orjson.loads(out.dead[0][1].split(": ", 1)[1])["type"] == "document_parsing_exception"
    assert out.retry_after_s is None


def test_retry_keeps_the_groups_layout() -> None:
    c = codec()
    g1, g2 = lines(c, [b"a", b"b"]), lines(c, [b"c", b"d"])
    b = Batch(seq=1, groups={b"g1": g1, b"g2": g2}, records=4, nbytes=1, created_ns=1)
    body = bulk_answer((503, "x"), (201, None), (201, None), (429, "y"))
    out = c.outcome(b, answer(200, body))
    assert out.retry is not None and out.retry.groups == {b"g1": [g1[0]], b"g2": [g2[1]]}


def test_409_without_podtap_ids_is_not_delivered() -> None:
    for c in (codec(), codec(document_id=True, data_stream=False, index="x")):
        b = batch_of(lines(c, [b"a"]))
        out = c.outcome(b, answer(200, bulk_answer((409, "version_conflict_engine_exception"))))
        assert out.delivered == 0 and len(out.dead) == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 408])
def test_whole_request_retryable(status: int) -> None:
    c = codec()
    b = batch_of(lines(c, [b"a", b"b"]))
    out = c.outcome(b, answer(status, b"busy", retry_after="7"))
    assert out.retry is b and out.retry_after_s == 7.0 and out.delivered == 0 and not out.dead
    assert c.outcome(b, answer(status, b"")).retry_after_s is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 406, 413, 301])
def test_whole_request_refused_is_dead_with_the_answer(status: int) -> None:
    c = codec()
    items = lines(c, [b"a", b"b"])
    body = b'{"error":{"type":"x_exception","reason":"because"},\n "status":%d}' % status
    out = c.outcome(batch_of(items), answer(status, body))
    assert out.retry is None and out.delivered == 0
    ((dead, reason),) = out.dead
    assert dead == items
    assert reason.startswith(f"HTTP {status}: ") and "because" in reason and "\n" not in reason
    if status == 413:
        assert "batch.max_bytes" in reason


@pytest.mark.parametrize("body", [
    b"", b"<html>gateway</html>", b"[]", b'{"items":[]}', b'{"errors":"no"}',
    b'{"errors":true,"items":[{"create":{"status":201}}]}',  # one item for two
    b'{"errors":true,"items":[{"create":{}},{"create":{"status":201}}]}',
    b'{"errors":true,"items":[1,2]}', b'{"errors":true}',
])
def test_unreadable_2xx_is_retried_and_counted(body: bytes) -> None:
    c = codec()
    b = batch_of(lines(c, [b"a", b"b"]))
    out = c.outcome(b, answer(200, body))
    assert out.retry is b and out.delivered == 0 and not out.dead
    assert c.parse_errors == 1


# --- through the transport, against the loopback _bulk server ---------------------------------


@pytest.fixture
def es() -> Iterator[EsBulkServer]:
    with EsBulkServer() as server:
        yield server


def deliver(c: ElasticsearchCodec, cfg: SinkConfig, b: Batch) -> Outcome:
    async def main() -> Outcome:
        t = HttpTransport(cfg, c.url, c.content_type)
        try:
            return c.outcome(b, await t.send(c.body(b)))
        finally:
            await t.close()

    return asyncio.run(main())


@pytest.mark.parametrize("gzip", [True, False])
def test_bulk_round_trip_with_retry_and_dead_letters(es: EsBulkServer, gzip: bool) -> None:
    cfg = SinkConfig(kind="elasticsearch", url=es.url, gzip=gzip,
                     elasticsearch=ElasticsearchConfig(document_id=True))
    c = ElasticsearchCodec(cfg, RecordFormat())
    es.item_plan = {"busy": [429], "down": [503, 503]}
    good = lines(c, [b"one", b"busy", b"two", b"down"])
    first = deliver(c, cfg, batch_of(good))
    assert first.delivered == 2 and not first.dead
    assert first.retry is not None
    second = deliver(c, cfg, first.retry)
    assert second.delivered == 1 and second.retry is not None
    third = deliver(c, cfg, second.retry)
    assert third == Outcome(delivered=1)
    assert es.count("logs-podtap-default") == 4
    again = deliver(c, cfg, batch_of(good))  # a resend of everything: nothing duplicated
    assert again == Outcome(delivered=4)
    assert es.count("logs-podtap-default") == 4
    (req,) = {r.query["filter_path"] for r in es.requests()}
    assert req == FILTER_PATH
    assert all(("content-encoding" in r.headers) == gzip for r in es.requests())


def test_bulk_mapping_conflict_is_dead_and_the_rest_lands(es: EsBulkServer) -> None:
    cfg = SinkConfig(kind="elasticsearch", url=es.url)
    c = ElasticsearchCodec(cfg, RecordFormat())
    items = lines(c, [b"a", b"b"])
    action, source = split(items[1])
    source["message"] = {"an": "object"}  # message is mapped as text by the first item
    bad = orjson.dumps(action) + b"\n" + orjson.dumps(source) + b"\n"
    out = deliver(c, cfg, batch_of([items[0], bad, *lines(c, [b"c"])]))
    assert out.delivered == 2 and out.retry is None
    ((dead, reason),) = out.dead
    assert dead == [bad] and "document_parsing_exception" in reason
    assert es.count() == 2


def test_bulk_whole_request_errors_from_the_server(es: EsBulkServer) -> None:
    cfg = SinkConfig(kind="elasticsearch", url=es.url, gzip=False)
    c = ElasticsearchCodec(cfg, RecordFormat())
    malformed = batch_of([b'"not an action"\n{"message":"x"}\n'])
    out = deliver(c, cfg, malformed)
    assert out.dead and "Malformed action/metadata line [1]" in out.dead[0][1]
    es.max_content_length = 100
    out = deliver(c, cfg, batch_of(lines(c, [b"x" * 200])))
    assert out.dead and out.dead[0][1].startswith("HTTP 413")
    assert "batch.max_bytes" in out.dead[0][1]
    es.max_content_length = 100 << 20
    es.answer(Answer(429, b'{"error":"too many"}', {"Retry-After": "3"}))
    b = batch_of(lines(c, [b"y"]))
    out = deliver(c, cfg, b)
    assert out.retry is b and out.retry_after_s == 3.0
    es.auth = "ApiKey abc"
    out = deliver(c, cfg, b)
    assert out.dead and out.dead[0][1].startswith("HTTP 401") and "auth" in out.dead[0][1]
    assert es.count() == 0
