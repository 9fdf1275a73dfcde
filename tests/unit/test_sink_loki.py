"""Tests of agent.sinks.loki against the loopback Loki (simnode/loki.py), through the
real HTTP transport (aiohttp, gzip): what Loki stores, and how its answers are read."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import BatchConfig, LokiConfig, RetryConfig, SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import ContainerEncoder, RecordFormat
from agent.sinks.base import Batch, Enriched, Origin, Outcome, Response
from agent.sinks.http import HttpTransport
from agent.sinks.loki import LokiCodec, LokiEncoder, sanitize_label_name
from agent.sinks.runner import BatchingSink
from simnode.loki import FakeLoki

NS = 1_000_000_000
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

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
    owner_kind="ReplicaSet",
    owner_name="web-7d9f",
)
OTHER = replace(META, pod_name="db-0", container_name="postgres", container_id="f" * 64,
                labels={"app": "db"}, owner_kind="StatefulSet", owner_name="db")


@pytest.fixture(scope="module")
def loki() -> Iterator[FakeLoki]:
    with FakeLoki() as server:
        yield server


@pytest.fixture
def fresh(loki: FakeLoki) -> FakeLoki:
    loki.clear()
    return loki


def now_ns() -> int:
    return time.time_ns()


def sink_cfg(url: str, **loki: object) -> SinkConfig:
    return SinkConfig(kind="loki", url=url, loki=LokiConfig(**loki))  # type: ignore[arg-type]


def batch_of(lines: list[tuple[LokiEncoder, int, int, bytes, bool]]) -> Batch:
    """What the runner makes of these lines: items grouped by their encoder's group."""
    groups: dict[bytes, list[bytes]] = {}
    for encoder, t, stream, message, partial in lines:
        groups.setdefault(encoder.group, []).append(encoder.encode(t, stream, message, partial))
    items = sum(len(v) for v in groups.values())
    nbytes = sum(len(i) for v in groups.values() for i in v)
    return Batch(seq=1, groups=groups, records=items, nbytes=nbytes, created_ns=time.time_ns())


def push(codec: LokiCodec, cfg: SinkConfig, batch: Batch) -> tuple[Response, Outcome]:
    async def send() -> Response:
        transport = HttpTransport(cfg, codec.url, codec.content_type, codec.extra_headers)
        try:
            return await transport.send(codec.body(batch))
        finally:
            await transport.close()

    response = asyncio.run(send())
    return response, codec.outcome(batch, response)


# --- label names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("app", "app"),
        ("app.kubernetes.io/name", "app_kubernetes_io_name"),
        ("9lives", "_9lives"),
        ("__meta_secret", "_meta_secret"),
        ("___", "_"),
        ("", "_"),
        ("a-b c", "a_b_c"),
        ("ünïcode", "_n_code"),
        ("_ok", "_ok"),
    ],
)
def test_sanitize_examples(name: str, expected: str) -> None:
    assert sanitize_label_name(name) == expected


@given(st.text())
def test_sanitize_always_gives_a_valid_unreserved_name(name: str) -> None:
    out = sanitize_label_name(name)
    assert LABEL_NAME.fullmatch(out)
    assert not out.startswith("__")


@given(st.from_regex(LABEL_NAME, fullmatch=True).filter(lambda n: not n.startswith("__")))
def test_sanitize_keeps_valid_names(name: str) -> None:
    assert sanitize_label_name(name) == name


HOSTILE_KEYS = ["app.kubernetes.io/name", "9lives", "__meta_x", "ünï-code", "a b", "stream",
                "namespace", "x" * 300, "dots.and/slashes", "-"]


def test_hostile_pod_label_keys_become_labels_loki_accepts(fresh: FakeLoki) -> None:
    meta = replace(META, labels={key: f"v{i}" for i, key in enumerate(HOSTILE_KEYS)})
    cfg = sink_cfg(fresh.url, pod_labels=tuple(HOSTILE_KEYS))
    codec = LokiCodec(cfg, RecordFormat())
    t = now_ns()
    response, outcome = push(codec, cfg, batch_of([(codec.encoder(meta), t, 1, b"hi", False)]))
    assert response.status == 204, response.body
    assert outcome.delivered == 1 and not outcome.dead and outcome.retry is None
    (entry,) = fresh.entries()
    assert all(LABEL_NAME.fullmatch(n) and not n.startswith("__") for n in entry.labels)
    assert entry.labels["app_kubernetes_io_name"] == "v0"
    assert entry.labels["_9lives"] == "v1"
    assert entry.labels["_meta_x"] == "v2"
    assert entry.labels["a_b"] == "v4"
    # A pod label never replaces a label podtap sets itself.
    assert entry.labels["stream"] == "stdout"
    assert entry.labels["namespace"] == "shop"


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=30), max_size=6))
def test_any_pod_labels_are_accepted_by_loki(fresh: FakeLoki, labels: dict[str, str]) -> None:
    fresh.clear()
    meta = replace(META, labels=labels)
    cfg = sink_cfg(fresh.url, pod_labels=tuple(labels))
    codec = LokiCodec(cfg, RecordFormat())
    batch = batch_of([(codec.encoder(meta), now_ns(), 2, b"x", False)])
    response, outcome = push(codec, cfg, batch)
    assert response.status == 204, response.body
    assert outcome.delivered == 1
    (entry,) = fresh.entries()
    assert len(entry.labels) <= 15


def test_empty_label_values_are_left_out(fresh: FakeLoki) -> None:
    meta = replace(META, labels={"tier": ""})
    cfg = sink_cfg(fresh.url, labels=("namespace", "app", "stream"), pod_labels=("tier",))
    codec = LokiCodec(cfg, RecordFormat())
    encoder = codec.encoder(meta)
    assert b'"app"' not in encoder.group and b'"tier"' not in encoder.group
    response, _ = push(codec, cfg, batch_of([(encoder, now_ns(), 1, b"x", False)]))
    assert response.status == 204
    assert fresh.entries()[0].labels == {"namespace": "shop", "stream": "stdout"}


def test_labels_must_include_one_that_every_container_has() -> None:
    with pytest.raises(ValueError, match="loki.labels"):
        LokiCodec(sink_cfg("http://127.0.0.1:1", labels=("app", "image")), RecordFormat())
    LokiCodec(sink_cfg("http://127.0.0.1:1", labels=("app", "job")), RecordFormat())


def test_default_label_values() -> None:
    cfg = sink_cfg("http://127.0.0.1:1", labels=("namespace", "pod", "container", "stream",
                                                "node", "app", "job", "pod_uid",
                                                "container_id", "image"))
    encoder = LokiCodec(cfg, RecordFormat()).encoder(META)
    labels = orjson.loads(b"{" + encoder.group + b"}")
    assert labels == {
        "namespace": "shop", "pod": META.pod_name, "container": "app", "node": "node-3",
        "app": "web", "job": "shop/app", "pod_uid": META.pod_uid,
        "container_id": META.container_id, "image": META.image,
    }


# --- ordering ----------------------------------------------------------------------------


def test_interleaved_pids_are_pushed_in_time_order_per_stream() -> None:
    """Two processes of one container: a line of one is finished (and put) after a newer
    line of the other. A Loki without unordered writes takes the push whole."""
    with FakeLoki(unordered_writes=False) as strict:
        cfg = sink_cfg(strict.url)
        codec = LokiCodec(cfg, RecordFormat())
        enc = codec.encoder(META)
        t = now_ns()
        lines = [
            (enc, t + 20, 1, b"pid B line 1", False),
            (enc, t + 10, 1, b"pid A line 1 (finished late)", False),
            (enc, t + 30, 2, b"pid B err", False),
            (enc, t + 5, 2, b"pid A err", False),
            (enc, t + 25, 1, b"pid B line 2", False),
            (enc, t + 25, 1, b"pid A same time", False),
            (enc, t + 15, 1, b"pid A line 2", False),
        ]
        response, outcome = push(codec, cfg, batch_of(lines))
        assert response.status == 204, response.body
        assert outcome.delivered == 7
        arrived = [(key, line) for key, _, line in strict.arrival_order()]
        stdout = [line for key, line in arrived if 'stream="stdout"' in key]
        stderr = [line for key, line in arrived if 'stream="stderr"' in key]
        assert stdout == ["pid A line 1 (finished late)", "pid A line 2", "pid B line 1",
                          "pid B line 2", "pid A same time"]  # equal times: put order kept
        assert stderr == ["pid A err", "pid B err"]


@given(st.lists(st.tuples(st.integers(0, 10**18), st.sampled_from([1, 2]), st.binary(max_size=8),
                          st.booleans()), max_size=60),
       st.booleans())
def test_body_orders_every_stream_by_time_stably(
    lines: list[tuple[int, int, bytes, bool]], stream_label: bool
) -> None:
    labels = ("namespace", "stream") if stream_label else ("namespace",)
    codec = LokiCodec(sink_cfg("http://127.0.0.1:1", labels=labels, metadata="none"),
                      RecordFormat())
    enc = codec.encoder(META)
    batch = batch_of([(enc, t, s, m, p) for t, s, m, p in lines])
    doc = orjson.loads(codec.body(batch))
    got: dict[str, list[tuple[int, str]]] = {}
    for stream in doc["streams"]:
        name = stream["stream"].get("stream", "all")
        values = [(int(ts), line) for ts, line in stream["values"]]
        assert all(isinstance(ts, str) for ts, _ in stream["values"])
        got.setdefault(name, []).extend(values)
    expected: dict[str, list[tuple[int, str]]] = {}
    for t, s, m, _ in lines:
        name = ("stdout" if s == 1 else "stderr") if stream_label else "all"
        expected.setdefault(name, []).append((t, m.decode("utf-8", "replace")))
    assert got == {k: sorted(v, key=lambda e: e[0]) for k, v in expected.items()}


@given(st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.integers(0, 10**18),
                          st.sampled_from([1, 2]), st.binary(max_size=8), st.booleans()),
                max_size=60),
       st.booleans(), st.sampled_from(["none", "structured"]))
def test_body_of_several_containers_holds_each_stream_once_in_time_order(
    lines: list[tuple[int, int, int, bytes, bool]], stream_label: bool, metadata: str
) -> None:
    """The body is one join with the stream openings glued to values: whatever the number
    of groups and streams, it is one JSON document with every value in its stream."""
    labels = ("namespace", "pod", "stream") if stream_label else ("namespace", "pod")
    codec = LokiCodec(sink_cfg("http://127.0.0.1:1", labels=labels, metadata=metadata),
                      RecordFormat())
    metas = [META, OTHER, replace(OTHER, pod_name="db-1", container_id="e" * 64)]
    encoders = [codec.encoder(m) for m in metas]
    batch = batch_of([(encoders[c], t, s, m, p) for c, t, s, m, p in lines])
    doc = orjson.loads(codec.body(batch))
    got: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for stream in doc["streams"]:
        key = (stream["stream"]["pod"], stream["stream"].get("stream", "all"))
        assert key not in got, "a stream appears twice"
        assert stream["values"], "a stream without values"
        got[key] = [(int(value[0]), value[1]) for value in stream["values"]]
    expected: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for c, t, s, m, _ in lines:
        name = ("stdout" if s == 1 else "stderr") if stream_label else "all"
        expected.setdefault((metas[c].pod_name, name), []).append((t, m.decode("utf-8", "replace")))
    assert got == {k: sorted(v, key=lambda e: e[0]) for k, v in expected.items()}


# --- metadata modes ----------------------------------------------------------------------


def test_structured_metadata_holds_what_is_not_a_label(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url, pod_labels=("tier",))
    codec = LokiCodec(cfg, RecordFormat())
    t = now_ns()
    response, _ = push(codec, cfg, batch_of([
        (codec.encoder(META), t, 1, b"whole", False),
        (codec.encoder(META), t + 1, 2, b"piece", True),
    ]))
    assert response.status == 204
    whole, piece = sorted(fresh.entries(), key=lambda e: e.time_ns)
    assert whole.labels == {"namespace": "shop", "pod": META.pod_name, "container": "app",
                            "stream": "stdout", "node": "node-3", "tier": "front"}
    assert whole.metadata == {
        "app": "web", "job": "shop/app", "pod_uid": META.pod_uid,
        "container_id": META.container_id, "image": META.image,
        "owner_kind": "ReplicaSet", "owner_name": "web-7d9f", "app_kubernetes_io_name": "web",
    }
    assert piece.metadata == {**whole.metadata, "partial": "true"}
    assert piece.labels["stream"] == "stderr"


def test_stream_goes_to_metadata_when_it_is_not_a_label(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url, labels=("namespace", "pod", "container"))
    codec = LokiCodec(cfg, RecordFormat())
    t = now_ns()
    enc = codec.encoder(META)
    push(codec, cfg, batch_of([(enc, t + 1, 2, b"e", False), (enc, t, 1, b"o", False)]))
    assert len(fresh.streams()) == 1
    out, err = fresh.entries()
    assert (out.line, out.metadata["stream"]) == ("o", "stdout")
    assert (err.line, err.metadata["stream"]) == ("e", "stderr")


def test_json_mode_line_is_the_whole_record(fresh: FakeLoki) -> None:
    fmt = RecordFormat(schema="otel")
    cfg = sink_cfg(fresh.url, metadata="json")
    codec = LokiCodec(cfg, fmt)
    t = now_ns()
    push(codec, cfg, batch_of([(codec.encoder(META), t, 2, b'quote " and \xff', True)]))
    (entry,) = fresh.entries()
    assert entry.metadata == {}
    expected = ContainerEncoder(META, fmt).encode(t, 2, b'quote " and \xff', True)
    assert orjson.loads(entry.line) == orjson.loads(expected)
    assert orjson.loads(entry.line)["message"] == 'quote " and \ufffd'


def test_none_mode_line_is_the_message_alone(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url, metadata="none")
    codec = LokiCodec(cfg, RecordFormat())
    t = now_ns()
    push(codec, cfg, batch_of([(codec.encoder(META), t, 1, b"plain \xfe", True)]))
    (entry,) = fresh.entries()
    assert (entry.line, entry.metadata, entry.time_ns) == ("plain \ufffd", {}, t)


def test_two_containers_make_their_own_streams(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    t = now_ns()
    a, b = codec.encoder(META), codec.encoder(OTHER)
    push(codec, cfg, batch_of([(a, t, 1, b"a1", False), (b, t, 1, b"b1", False),
                               (a, t + 1, 1, b"a2", False)]))
    streams = fresh.streams()
    assert sorted(len(v) for v in streams.values()) == [1, 2]
    by_container = {v[0].labels["container"]: [e.line for e in v] for v in streams.values()}
    assert by_container == {"app": ["a1", "a2"], "postgres": ["b1"]}


# --- tenant ------------------------------------------------------------------------------


def test_tenant_header() -> None:
    with FakeLoki(multi_tenant=True) as multi:
        cfg = sink_cfg(multi.url, tenant="team-a")
        codec = LokiCodec(cfg, RecordFormat())
        assert codec.extra_headers == {"X-Scope-OrgID": "team-a"}
        response, outcome = push(codec, cfg,
                                 batch_of([(codec.encoder(META), now_ns(), 1, b"x", False)]))
        assert response.status == 204 and outcome.delivered == 1
        assert [e.tenant for e in multi.entries()] == ["team-a"]
        assert multi.requests[-1].headers["x-scope-orgid"] == "team-a"

        cfg = sink_cfg(multi.url)
        codec = LokiCodec(cfg, RecordFormat())
        assert codec.extra_headers == {}
        batch = batch_of([(codec.encoder(META), now_ns(), 1, b"y", False)])
        response, outcome = push(codec, cfg, batch)
        assert response.status == 401 and b"no org id" in response.body
        assert outcome.delivered == 0 and outcome.retry is None
        assert sum(len(items) for items, _ in outcome.dead) == 1


# --- answers -----------------------------------------------------------------------------


def test_400_counts_every_entry_dead_with_lokis_text(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    enc = codec.encoder(META)
    t = now_ns()
    assert push(codec, cfg, batch_of([(enc, t, 1, b"new", False)]))[0].status == 204
    late = t - 2 * 3600 * NS  # behind the newest by more than max_chunk_age / 2
    batch = batch_of([(enc, late, 1, b"too late", False), (enc, t + 1, 1, b"fine", False)])
    response, outcome = push(codec, cfg, batch)
    assert response.status == 400
    assert outcome.delivered == 0 and outcome.retry is None
    ((items, reason),) = outcome.dead
    assert len(items) == 2
    assert "entry too far behind" in reason and reason.startswith("loki answered 400")
    # Loki kept the valid entry; the dead letters say which stream each line was for.
    assert [e.line for e in fresh.entries()] == ["new", "fine"]
    dead = [orjson.loads(item) for item in items]
    assert {d["stream"]["stream"] for d in dead} == {"stdout"}
    assert sorted(d["values"][0][1] for d in dead) == ["fine", "too late"]
    assert all(d["stream"]["namespace"] == "shop" for d in dead)


def test_429_is_retried_after_retry_after(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    batch = batch_of([(codec.encoder(META), now_ns(), 1, b"x", False)])
    fresh.fail_next(1, status=429, retry_after="7")
    response, outcome = push(codec, cfg, batch)
    assert response.status == 429
    assert outcome.retry is batch and outcome.retry_after_s == 7.0
    assert outcome.delivered == 0 and not outcome.dead
    response, outcome = push(codec, cfg, batch)
    assert response.status == 204 and outcome.delivered == 1


def test_rate_limit_429_from_loki_is_retried(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    fresh.rate_limit(10, burst=10)
    try:
        batch = batch_of([(codec.encoder(META), now_ns(), 1, b"x" * 100, False)])
        response, outcome = push(codec, cfg, batch)
    finally:
        fresh.rate_limit(None)
    assert response.status == 429 and b"Ingestion rate limit exceeded" in response.body
    assert outcome.retry is batch and outcome.retry_after_s is None
    assert fresh.entries() == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried(fresh: FakeLoki, status: int) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    batch = batch_of([(codec.encoder(META), now_ns(), 1, b"x", False)])
    fresh.fail_next(1, status=status, retry_after=None)
    _, outcome = push(codec, cfg, batch)
    assert outcome.retry is batch and outcome.retry_after_s is None and not outcome.dead


@pytest.mark.parametrize("status", [401, 403, 404, 413])
def test_other_4xx_is_dead(fresh: FakeLoki, status: int) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    batch = batch_of([(codec.encoder(META), now_ns(), 1, b"x", False)])
    fresh.fail_next(1, status=status, retry_after=None, body="nope")
    _, outcome = push(codec, cfg, batch)
    assert outcome.retry is None and outcome.delivered == 0
    ((items, reason),) = outcome.dead
    assert len(items) == 1 and f"loki answered {status}: nope" == reason


def test_gzip_reaches_loki(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    push(codec, cfg, batch_of([(codec.encoder(META), now_ns(), 1, b"x" * 2000, False)]))
    request = fresh.requests[-1]
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["content-type"] == "application/json"
    assert request.path == "/loki/api/v1/push" and request.body_bytes < 1000
    assert fresh.entries()[0].line == "x" * 2000


def test_url_gets_the_push_path() -> None:
    for url in ("http://loki:3100", "http://loki:3100/"):
        assert LokiCodec(sink_cfg(url), RecordFormat()).url == "http://loki:3100/loki/api/v1/push"


# --- lines that are not valid UTF-8 ---------------------------------------------------


@pytest.mark.parametrize("mode", ["base64", "escape"])
def test_exact_bytes_of_invalid_utf8_in_structured_metadata(fresh: FakeLoki, mode: str) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat(invalid_utf8=mode))  # type: ignore[arg-type]
    enc = codec.encoder(META)
    t = now_ns()
    raw = b"bad \xff\xfe tail \xe2\x82"
    batch = batch_of([(enc, t, 1, raw, False), (enc, t + 1, 1, b"ok", True)])
    response, _ = push(codec, cfg, batch)
    assert response.status == 204
    bad, ok = fresh.entries()
    assert bad.line == raw.decode("utf-8", "replace")
    assert base64.b64decode(bad.metadata["message_base64"]) == raw
    assert {k: v for k, v in bad.metadata.items() if k != "message_base64"} == {
        k: v for k, v in ok.metadata.items() if k != "partial"}
    assert "message_base64" not in ok.metadata and ok.metadata["partial"] == "true"


@given(st.binary(max_size=40), st.sampled_from(["base64", "escape"]), st.booleans())
def test_exact_bytes_survive_for_any_line(raw: bytes, mode: str, with_labels: bool) -> None:
    labels = {"k": "v"} if with_labels else {}
    cfg = sink_cfg("http://127.0.0.1:1", labels=("namespace", "stream", "pod_uid", "job",
                                                "container_id", "image", "node", "pod",
                                                "container", "app"))
    codec = LokiCodec(cfg, RecordFormat(invalid_utf8=mode))  # type: ignore[arg-type]
    enc = codec.encoder(replace(META, labels=labels, owner_kind=None))
    (stream,) = orjson.loads(codec.body(batch_of([(enc, 1, 2, raw, False)])))["streams"]
    (value,) = stream["values"]
    metadata = value[2] if len(value) == 3 else {}
    try:
        raw.decode("utf-8")
        assert value[1] == raw.decode() and "message_base64" not in metadata
    except UnicodeDecodeError:
        assert base64.b64decode(metadata["message_base64"]) == raw


def test_replace_mode_sends_no_copy_of_the_bytes(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url)
    codec = LokiCodec(cfg, RecordFormat())
    push(codec, cfg, batch_of([(codec.encoder(META), now_ns(), 1, b"\xff", False)]))
    (entry,) = fresh.entries()
    assert entry.line == "\ufffd" and "message_base64" not in entry.metadata


def test_json_mode_escape_gives_the_bytes_back(fresh: FakeLoki) -> None:
    cfg = sink_cfg(fresh.url, metadata="json")
    codec = LokiCodec(cfg, RecordFormat(invalid_utf8="escape"))
    raw = b"x\xc3(\xff"
    push(codec, cfg, batch_of([(codec.encoder(META), now_ns(), 1, raw, False)]))
    (entry,) = fresh.entries()
    assert json.loads(entry.line)["message"].encode("utf-8", "surrogateescape") == raw


# --- through the shared delivery machinery ---------------------------------------------


def test_batching_sink_delivers_through_429s_in_order(fresh: FakeLoki, tmp_path: Path) -> None:
    """LokiCodec in the real runner and transport: two containers, two processes each
    interleaving lines, a 429 storm; every line arrives once, each stream in time order,
    and a dead-lettered push is kept as readable Loki streams."""
    cfg = replace(
        sink_cfg(fresh.url),
        batch=BatchConfig(max_bytes=4096, max_records=50, max_age_s=0.02),
        retry=RetryConfig(initial_backoff_s=0.01, max_backoff_s=0.05),
        dead_letter_dir=str(tmp_path / "dead"),
        max_in_flight=1,
    )
    codec = LokiCodec(cfg, RecordFormat())
    transport = HttpTransport(cfg, codec.url, codec.content_type, codec.extra_headers)
    origins = [Origin(1, META, 1), Origin(2, OTHER, 1)]
    t0 = now_ns()
    lines: list[Enriched] = []
    for i in range(300):
        late = 3 if i % 4 == 3 else 0  # the other process's line, finished late
        lines.append((origins[i % 2], t0 + i * 10 - late * 10, 1 + (i % 5 == 0),
                      f"line {i}".encode(), False))

    async def scenario() -> BatchingSink:
        sink = BatchingSink("loki", 0, cfg, codec, transport)
        runner = asyncio.create_task(sink.run())
        fresh.fail_next(3, status=429, retry_after="0")
        for start in range(0, len(lines), 30):
            sink.put(lines[start:start + 30])
            await asyncio.sleep(0)
        deadline = time.monotonic() + 60
        while sink.stats.records_sent < len(lines) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # A line far behind its stream's newest entry: Loki refuses it (400), dead letter.
        sink.put([(origins[0], t0 - 2 * 3600 * NS, 1, b"from long ago", False)])
        while sink.stats.dead_records < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await sink.close(5.0)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return sink

    sink = asyncio.run(scenario())
    assert sink.stats.records_sent == len(lines) and sink.stats.dead_records == 1
    assert sink.stats.retries >= 3
    stored = fresh.entries()
    assert sorted(e.line for e in stored) == sorted(m.decode() for _, _, _, m, _ in lines)
    statuses = [r.status for r in fresh.requests]
    assert statuses[:3] == [429, 429, 429] and statuses.count(400) == 1
    assert set(statuses[3:]) == {204, 400}
    assert len(fresh.streams()) == 4  # 2 containers x 2 streams
    (dead_file,) = (tmp_path / "dead").iterdir()
    (letter,) = [orjson.loads(line) for line in dead_file.read_bytes().splitlines()]
    stream = orjson.loads(letter["item"])
    assert stream["values"][0][1] == "from long ago"
    assert stream["stream"]["container"] == "app" and stream["stream"]["stream"] == "stdout"
    assert "entry too far behind" in letter["reason"]
