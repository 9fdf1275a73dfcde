"""The loopback Loki refuses what Loki refuses (that is what makes it a faithful stand-in),
keeps the valid entries of a partly refused push, and its fault knobs work."""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
import time
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simnode.loki import SINGLE_TENANT, FakeLoki

NS = 1_000_000_000
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLoki]:
    with FakeLoki() as loki:
        yield loki


@pytest.fixture
def loki(server: FakeLoki) -> FakeLoki:
    server.clear()
    return server


def post(url: str, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/loki/api/v1/push", method: str = "POST") -> tuple[int, str, dict[str, str]]:
    async def go() -> tuple[int, str, dict[str, str]]:
        headers_ = headers or {}
        skip = () if "Content-Type" in headers_ else ("Content-Type",)
        async with aiohttp.ClientSession() as session, session.request(
            method, url + path, data=body, headers=headers_, skip_auto_headers=skip
        ) as r:
            return r.status, await r.text(), dict(r.headers)

    return asyncio.run(go())


def push_doc(streams: list[tuple[dict[str, Any], list[Any]]]) -> bytes:
    return orjson.dumps({"streams": [{"stream": s, "values": v} for s, v in streams]})


def ts(t: int) -> str:
    return str(t)


# --- what a push looks like ----------------------------------------------------------


def test_valid_push_is_stored_and_answered_204(loki: FakeLoki) -> None:
    t = time.time_ns()
    body = push_doc([({"app": "a", "stream": "stdout"},
                      [[ts(t), "one"], [ts(t + 1), "two", {"trace_id": "abc"}]])])
    status, text, _ = post(loki.url, body, JSON_HEADERS)
    assert (status, text) == (204, "")
    entries = loki.entries(SINGLE_TENANT)
    assert [(e.line, e.metadata, e.time_ns) for e in entries] == [
        ("one", {}, t), ("two", {"trace_id": "abc"}, t + 1)]
    assert list(loki.streams()) == ['{app="a", stream="stdout"}']


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies(loki: FakeLoki, encoding: str) -> None:
    body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])
    data = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    status, _, _ = post(loki.url, data, {**JSON_HEADERS, "Content-Encoding": encoding})
    assert status == 204 and len(loki.entries()) == 1


def test_unknown_content_encoding_is_400(loki: FakeLoki) -> None:
    body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])
    status, text, _ = post(loki.url, body, {**JSON_HEADERS, "Content-Encoding": "br"})
    assert status == 400 and 'Content-Encoding "br" not supported' in text
    assert loki.entries() == []


def test_body_not_gzip_as_announced_is_400(loki: FakeLoki) -> None:
    status, _, _ = post(loki.url, b"{}", {**JSON_HEADERS, "Content-Encoding": "gzip"})
    assert status == 400


def test_content_types(loki: FakeLoki) -> None:
    body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])
    assert post(loki.url, body, {})[0] == 400  # no media type
    assert post(loki.url, body, {"Content-Type": "application/x-protobuf"})[0] == 415
    assert post(loki.url, body, {"Content-Type": "application/json; charset=utf-8"})[0] == 204


@pytest.mark.parametrize(
    "value",
    [
        [1700000000000000000, "numeric timestamp"],
        ["1.5e18", "float text"],
        ["", "empty"],
        ["abc", "letters"],
        ["99999999999999999999", "beyond int64"],
        [None, "null"],
        ["1", 5],
        ["1", "x", {"k": 1}],
        ["1", "x", ["not", "an", "object"]],
        ["1", "x", {}, "fourth"],
        ["1"],
        "not an array",
    ],
)
def test_malformed_values_are_refused_whole(loki: FakeLoki, value: Any) -> None:
    good = [ts(time.time_ns()), "fine"]
    body = push_doc([({"a": "1"}, [good, value])])
    status, _, _ = post(loki.url, body, JSON_HEADERS)
    assert status == 400
    assert loki.entries() == []  # a decoding error refuses the whole request


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"streams": 5}',
                                  b'{"streams": [{"stream": {"a": 1}, "values": []}]}'])
def test_malformed_documents(loki: FakeLoki, body: bytes) -> None:
    assert post(loki.url, body, JSON_HEADERS)[0] == 400


# --- labels -------------------------------------------------------------------------


BAD_NAME = st.text(min_size=1, max_size=12).filter(
    lambda n: not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", n))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BAD_NAME)
def test_every_invalid_label_name_is_refused(loki: FakeLoki, name: str) -> None:
    loki.clear()
    t = time.time_ns()
    body = push_doc([({name: "v"}, [[ts(t), "bad"]]), ({"ok": "v"}, [[ts(t), "good"]])])
    status, text, _ = post(loki.url, body, JSON_HEADERS)
    assert status == 400 and "Error parsing labels" in text
    # The other stream of the push is kept, as Loki keeps valid streams.
    assert [e.line for e in loki.entries()] == ["good"]


def test_empty_values_are_dropped_and_no_label_at_all_is_refused(loki: FakeLoki) -> None:
    t = time.time_ns()
    status, _, _ = post(loki.url, push_doc([({"a": "1", "b": ""}, [[ts(t), "x"]])]),
                        JSON_HEADERS)
    assert status == 204 and loki.entries()[0].labels == {"a": "1"}
    for labels in ({}, {"a": ""}):
        status, text, _ = post(loki.url, push_doc([(labels, [[ts(t), "y"]])]), JSON_HEADERS)
        assert status == 400 and "at least one label pair is required" in text


def test_label_count_and_length_limits(loki: FakeLoki) -> None:
    t = time.time_ns()
    fifteen = {f"l{i}": "v" for i in range(15)}
    assert post(loki.url, push_doc([(fifteen, [[ts(t), "x"]])]), JSON_HEADERS)[0] == 204
    sixteen = {**fifteen, "l15": "v"}
    status, text, _ = post(loki.url, push_doc([(sixteen, [[ts(t), "x"]])]), JSON_HEADERS)
    assert status == 400 and "has 16 label names; limit 15" in text
    long_value = {"a": "v" * 2049}
    status, text, _ = post(loki.url, push_doc([(long_value, [[ts(t), "x"]])]), JSON_HEADERS)
    assert status == 400 and "label value too long" in text
    long_name = {"n" * 1025: "v"}
    status, text, _ = post(loki.url, push_doc([(long_name, [[ts(t), "x"]])]), JSON_HEADERS)
    assert status == 400 and "label name too long" in text


# --- entries ------------------------------------------------------------------------


def test_too_old_too_new_and_too_long_entries_are_refused_one_by_one(loki: FakeLoki) -> None:
    t = time.time_ns()
    values = [
        [ts(t - 8 * 86400 * NS), "a week and a day ago"],
        [ts(t + 3600 * NS), "an hour ahead"],
        [ts(t), "x" * (256 * 1024 + 1)],
        [ts(t), "fine"],
    ]
    status, text, _ = post(loki.url, push_doc([({"a": "1"}, values)]), JSON_HEADERS)
    assert status == 400 and "Max entry size" in text  # the last refusal's text
    assert [e.line for e in loki.entries()] == ["fine"]
    for value, words in ((values[0], "timestamp too old"), (values[1], "timestamp too new")):
        status, text, _ = post(loki.url, push_doc([({"a": "1"}, [value])]), JSON_HEADERS)
        assert status == 400 and words in text


def test_unordered_writes_refuse_entries_too_far_behind(loki: FakeLoki) -> None:
    t = time.time_ns()
    window = 3600 * NS  # max_chunk_age (2h) / 2
    body = push_doc([({"a": "1"}, [[ts(t), "newest"], [ts(t - window + NS), "in window"],
                                   [ts(t - window - NS), "behind"]])])
    status, text, _ = post(loki.url, body, JSON_HEADERS)
    assert status == 400
    assert "entry too far behind" in text and "total ignored: 1 out of 3" in text
    assert sorted(e.line for e in loki.entries()) == ["in window", "newest"]
    # Out of order within the window is fine; another stream has its own newest entry.
    body = push_doc([({"a": "1"}, [[ts(t - 5), "earlier"]]),
                     ({"a": "2"}, [[ts(t - window - NS), "other stream"]])])
    assert post(loki.url, body, JSON_HEADERS)[0] == 204


def test_ordered_writes_refuse_any_entry_older_than_the_newest() -> None:
    with FakeLoki(unordered_writes=False) as loki:
        t = time.time_ns()
        body = push_doc([({"a": "1"}, [[ts(t), "first"], [ts(t - 1), "older"],
                                       [ts(t), "same time"], [ts(t + 1), "newer"]])])
        status, text, _ = post(loki.url, body, JSON_HEADERS)
        assert status == 400 and "'entry out of order'" in text
        assert "total ignored: 1 out of 4" in text
        assert [e.line for e in loki.entries()] == ["first", "same time", "newer"]


def test_exact_duplicates_are_dropped_silently(loki: FakeLoki) -> None:
    t = time.time_ns()
    body = push_doc([({"a": "1"}, [[ts(t), "x"], [ts(t), "x"], [ts(t), "y"]])])
    assert post(loki.url, body, JSON_HEADERS)[0] == 204
    assert post(loki.url, body, JSON_HEADERS)[0] == 204
    assert [e.line for e in loki.entries()] == ["x", "y"]


def test_structured_metadata_limits() -> None:
    with FakeLoki(allow_structured_metadata=False) as loki:
        t = time.time_ns()
        body = push_doc([({"a": "1"}, [[ts(t), "with", {"k": "v"}], [ts(t), "without"]])])
        status, text, _ = post(loki.url, body, JSON_HEADERS)
        assert status == 400 and "structured metadata, but this feature is disallowed" in text
        assert [e.line for e in loki.entries()] == ["without"]
    with FakeLoki() as loki:
        many = {f"k{i}": "v" for i in range(129)}
        body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x", many]])])
        status, text, _ = post(loki.url, body, JSON_HEADERS)
        assert status == 400 and "too many structured metadata labels" in text


# --- tenants and limits -------------------------------------------------------------


def test_multi_tenant_requires_and_separates_tenants() -> None:
    with FakeLoki(multi_tenant=True) as loki:
        body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])
        status, text, _ = post(loki.url, body, JSON_HEADERS)
        assert (status, text) == (401, "no org id\n")
        for bad in ("..", "a b", "x" * 151):
            assert post(loki.url, body, {**JSON_HEADERS, "X-Scope-OrgID": bad})[0] == 401
        assert post(loki.url, body, {**JSON_HEADERS, "X-Scope-OrgID": "team-a"})[0] == 204
        assert post(loki.url, body, {**JSON_HEADERS, "X-Scope-OrgID": "team-b"})[0] == 204
        assert [e.tenant for e in loki.entries()] == ["team-a", "team-b"]
        assert len(loki.entries("team-a")) == 1


def test_single_tenant_ignores_the_header(loki: FakeLoki) -> None:
    body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])
    assert post(loki.url, body, {**JSON_HEADERS, "X-Scope-OrgID": "team-a"})[0] == 204
    assert [e.tenant for e in loki.entries()] == ["fake"]


def test_rate_limit_refuses_the_whole_push_with_429(loki: FakeLoki) -> None:
    loki.rate_limit(100, burst=100)
    try:
        t = time.time_ns()
        small = push_doc([({"a": "1"}, [[ts(t), "x" * 60]])])
        assert post(loki.url, small, JSON_HEADERS)[0] == 204
        big = push_doc([({"a": "1"}, [[ts(t + 1), "y" * 60]]), ({"b": "1"}, [[ts(t), "z"]])])
        status, text, _ = post(loki.url, big, JSON_HEADERS)
        assert status == 429 and "Ingestion rate limit exceeded for user fake" in text
        assert [e.line for e in loki.entries()] == ["x" * 60]
    finally:
        loki.rate_limit(None)


# --- other endpoints and the knobs --------------------------------------------------


def test_ready_and_unknown_paths(loki: FakeLoki) -> None:
    assert post(loki.url, b"", path="/ready", method="GET")[:2] == (200, "ready\n")
    assert post(loki.url, b"", path="/nope", method="GET")[0] == 404
    assert post(loki.url, b"", method="GET")[0] == 405


def test_fail_next_then_normal(loki: FakeLoki) -> None:
    body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])
    loki.fail_next(2, status=429, retry_after="1")
    first, second = post(loki.url, body, JSON_HEADERS), post(loki.url, body, JSON_HEADERS)
    assert first[0] == second[0] == 429 and first[2]["Retry-After"] == "1"
    assert post(loki.url, body, JSON_HEADERS)[0] == 204
    assert [r.status for r in loki.requests] == [429, 429, 204]


def test_down_and_up_keep_the_port(loki: FakeLoki) -> None:
    port = loki.port
    loki.down()
    try:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        loki.up()
    assert loki.port == port
    body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])
    assert post(loki.url, body, JSON_HEADERS)[0] == 204


def test_delay(loki: FakeLoki) -> None:
    loki.delay_s = 0.3
    try:
        started = time.monotonic()
        post(loki.url, b"", path="/ready", method="GET")
        assert time.monotonic() - started >= 0.3
    finally:
        loki.delay_s = 0.0


def test_tls_and_bearer_token() -> None:
    with FakeLoki(tls=True, token="s3cret") as loki:
        assert loki.url.startswith("https://")
        body = push_doc([({"a": "1"}, [[ts(time.time_ns()), "x"]])])

        async def go(token: str | None) -> int:
            import ssl

            ctx = ssl.create_default_context(cafile=loki.ca_path)
            headers = {**JSON_HEADERS}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            async with aiohttp.ClientSession() as session, session.post(
                loki.url + "/loki/api/v1/push", data=body, headers=headers, ssl=ctx
            ) as r:
                return r.status

        assert asyncio.run(go(None)) == 401
        assert asyncio.run(go("s3cret")) == 204
