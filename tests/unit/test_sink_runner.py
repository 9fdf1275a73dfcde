"""Tests of agent.sinks.runner.BatchingSink: batching, delivery, retries, dead letters, close.

Real SQLite files and real dead-letter files; an in-process transport (the HTTP transport
has its own tests) and a tiny codec (the real codecs have theirs). Time is a `JumpClock`:
when the sink waits and nothing happens for a moment, time jumps to the sink's deadline,
so a Retry-After of minutes takes milliseconds and is still checked exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.config import BatchConfig, BufferConfig, RetryConfig, SinkConfig
from agent.kube.model import ContainerMeta
from agent.sinks.base import (
    LATENCY_BUCKETS_S,
    Batch,
    Enriched,
    Origin,
    Outcome,
    Response,
    TransportError,
)
from agent.sinks.retry import classify_status
from agent.sinks.runner import BatchingSink

DEADLINE_S = 60.0  # generous: CI machines are loaded


# --------------------------------------------------------------------------- test doubles
class JumpClock:
    """Monotonic time that jumps to a wait's deadline once nothing happened for 20 ms."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.epoch_ns = 1_760_000_000 * 10**9

    def monotonic(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return self.epoch_ns + int(self.now * 1e9)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        if timeout is None:
            await event.wait()
            return
        try:
            await asyncio.wait_for(event.wait(), 0.02)
        except TimeoutError:
            self.now += max(timeout, 0.0)


class ItemEncoderStub:
    """Items `container|time|message`; grouped by container; b"BAD..." cannot be encoded."""

    def __init__(self, meta: ContainerMeta, grouped: bool) -> None:
        self.name = meta.container_name.encode()
        self.group = self.name if grouped else b""

    def encode(self, time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
        if message.startswith(b"BAD"):
            raise ValueError("cannot encode")
        return b"%s|%d|%s" % (self.name, time_ns, message)


class LineCodec:
    """The body is the items, one a line. A 2xx answer whose body is `{"items": [...]}`
    gives one status per item (like Elasticsearch's _bulk); otherwise the status decides
    for the whole batch (`classify_status`)."""

    url = "http://127.0.0.1:1/test"
    content_type = "text/plain"

    def __init__(self, grouped: bool = True) -> None:
        self.grouped = grouped
        self.extra_headers: dict[str, str] = {}

    def encoder(self, meta: ContainerMeta) -> ItemEncoderStub:
        if meta.container_name == "unencodable":
            raise ValueError("no encoder for this one")
        return ItemEncoderStub(meta, self.grouped)

    def body(self, batch: Batch) -> bytes:
        return b"\n".join(batch.items())

    def outcome(self, batch: Batch, response: Response) -> Outcome:
        verdict = classify_status(response.status)
        if verdict == "retry":
            return Outcome(retry=batch)
        if verdict == "dead":
            return Outcome(dead=[(batch.items(), response.body.decode())])
        if not response.body.startswith(b'{"items"'):
            return Outcome(delivered=batch.records)
        statuses = iter(json.loads(response.body)["items"])
        retry: dict[bytes, list[bytes]] = {}
        dead: list[bytes] = []
        delivered = 0
        for group, items in batch.groups.items():
            for item in items:
                status = next(statuses)
                if classify_status(status) == "ok":
                    delivered += 1
                elif classify_status(status) == "retry":
                    retry.setdefault(group, []).append(item)
                else:
                    dead.append(item)
        rest = None
        if retry:
            rest = Batch(seq=batch.seq, groups=retry, records=sum(map(len, retry.values())),
                         nbytes=sum(len(i) for v in retry.values() for i in v),
                         created_ns=batch.created_ns)
        return Outcome(delivered=delivered, retry=rest,
                       dead=[(dead, "item rejected: mapper_parsing_exception")] if dead else [])


Answer = Response | Exception | Callable[[bytes], Response]


class FakeTransport:
    """Answers from `script` in order, then 200. Records every request and what a 2xx
    answer accepted. `gate`, when set, holds every request until it opens."""

    def __init__(self, clock: JumpClock) -> None:
        self.clock = clock
        self.script: deque[Answer] = deque()
        self.requests: list[tuple[float, bytes]] = []
        self.accepted: list[bytes] = []  # items, in the order accepted
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def send(self, body: bytes) -> Response:
        self.requests.append((self.clock.monotonic(), body))
        if self.gate is not None:
            await self.gate.wait()
        answer = self.script.popleft() if self.script else Response(200, {}, b"")
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            answer = answer(body)
        if classify_status(answer.status) == "ok":
            items = body.split(b"\n")
            if answer.body.startswith(b'{"items"'):
                statuses = json.loads(answer.body)["items"]
                items = [i for i, s in zip(items, statuses, strict=True)
                         if classify_status(s) == "ok"]
            self.accepted += items
        return answer

    async def close(self) -> None:
        self.closed = True


def meta(container: str) -> ContainerMeta:
    return ContainerMeta(namespace="default", pod_name=f"pod-{container}", pod_uid="uid",
                         container_name=container, container_id="c" * 64,
                         runtime="containerd", image="busybox", host="node-1",
                         qos_class="besteffort")


class Lines:
    """Lines of a few containers, numbered per container so order can be checked."""

    def __init__(self, containers: int = 3) -> None:
        self.origins = [Origin(i + 1, meta(f"c{i}"), 1) for i in range(containers)]
        self.counts = [0] * containers
        self.t = 1_000_000

    def make(self, n: int, size: int = 20, start: int = 0) -> list[Enriched]:
        out: list[Enriched] = []
        for k in range(n):
            c = (start + k) % len(self.origins)
            self.t += 1
            msg = b"%08d-" % self.counts[c] + b"x" * max(size - 9, 0)
            self.counts[c] += 1
            out.append((self.origins[c], self.t, 1, msg, False))
        return out


def per_container(items: list[bytes]) -> dict[bytes, list[int]]:
    """The line numbers each container's accepted items carry, in arrival order."""
    out: dict[bytes, list[int]] = {}
    for item in items:
        name, _t, msg = item.split(b"|", 2)
        out.setdefault(name, []).append(int(msg[:8]))
    return out


def sink_config(tmp: Path | None, **kw: Any) -> SinkConfig:
    batch = kw.pop("batch", BatchConfig(max_bytes=4096, max_records=50, max_age_s=1.0))
    buffer = kw.pop("buffer", BufferConfig(memory_bytes=1 << 20,
                                           disk_dir=str(tmp / "buf") if tmp else ""))
    retry = kw.pop("retry", RetryConfig(initial_backoff_s=0.5, max_backoff_s=30.0,
                                        max_retry_after_s=300.0))
    return SinkConfig(kind="http", url="http://127.0.0.1:1/", batch=batch, buffer=buffer,
                      retry=retry, **kw)


def make_sink(cfg: SinkConfig, clock: JumpClock | None = None,
              grouped: bool = True) -> tuple[BatchingSink, FakeTransport, JumpClock]:
    clock = clock or JumpClock()
    transport = FakeTransport(clock)
    sink = BatchingSink("test", 0, cfg, LineCodec(grouped), transport, clock=clock,
                        random=lambda: 1.0)
    return sink, transport, clock


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(sink: BatchingSink, grace_s: float = 0.0) -> Any:
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        await sink.close(grace_s)
        assert task.done()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def expect_all_in_order(transport: FakeTransport, lines: Lines) -> None:
    got = per_container(transport.accepted)
    assert len(transport.accepted) == sum(lines.counts)
    for i, count in enumerate(lines.counts):
        assert got.get(f"c{i}".encode(), []) == list(range(count))


# --------------------------------------------------------------------------- batching
def test_batches_close_by_records_bytes_and_age(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = sink_config(None, batch=BatchConfig(max_bytes=1000, max_records=10, max_age_s=2.0))
        sink, transport, clock = make_sink(cfg)
        lines = Lines(1)
        sink.put(lines.make(25, size=20))  # items of ~35 bytes: 10 per batch by records
        assert [e.records for e in sink.buffer.entries.values()] == [10, 10]
        sink.put(lines.make(1, size=600))
        sink.put(lines.make(1, size=600))  # would pass 1000 bytes: the open batch closes first
        assert [e.records for e in sink.buffer.entries.values()] == [10, 10, 6]
        assert all(e.nbytes <= 1000 for e in sink.buffer.entries.values())
        opened = clock.now
        async with running(sink):
            await until(lambda: len(transport.accepted) == 27, "the open batch to close by age")
        assert clock.now - opened >= 2.0
        assert len(transport.requests) == 4
        assert sink.stats.records_in == 27 and sink.stats.records_sent == 27
        expect_all_in_order(transport, lines)

    run(body)


def test_items_are_grouped_by_encoder_group_in_put_order() -> None:
    async def body() -> None:
        sink, _t, _c = make_sink(sink_config(None, batch=BatchConfig(max_records=9)))
        lines = Lines(3)
        sink.put(lines.make(9))
        (entry,) = sink.buffer.entries.values()
        assert entry.batch is not None
        assert list(entry.batch.groups) == [b"c0", b"c1", b"c2"]
        assert [per_container(v) for v in entry.batch.groups.values()] == [
            {b"c0": [0, 1, 2]}, {b"c1": [0, 1, 2]}, {b"c2": [0, 1, 2]}]
        await sink.close(0)

    run(body)


def test_encode_errors_are_counted_and_skipped() -> None:
    async def body() -> None:
        sink, transport, _c = make_sink(sink_config(None))
        lines = Lines(1)
        good = lines.make(3)
        bad_origin = Origin(9, meta("unencodable"), 1)
        batch: list[Enriched] = [good[0], (good[0][0], 5, 1, b"BAD line", False), good[1],
                                 (bad_origin, 6, 1, b"x", False), (bad_origin, 7, 1, b"y", False),
                                 good[2]]
        sink.put(batch)
        assert sink.stats.encode_errors == 3
        assert sink.stats.records_in == 6
        assert bad_origin.encoders[0] is None and good[0][0].encoders[0] is not None
        async with running(sink, grace_s=DEADLINE_S):
            await until(lambda: len(transport.accepted) == 3, "the good lines")
        expect_all_in_order(transport, lines)

    run(body)


# --------------------------------------------------------------------------- delivery
def test_many_batches_with_several_in_flight_all_delivered_once() -> None:
    async def body() -> None:
        cfg = sink_config(None, max_in_flight=4)
        sink, transport, _c = make_sink(cfg)
        lines = Lines(5)
        async with running(sink):
            for _ in range(40):
                sink.put(lines.make(37))
                await asyncio.sleep(0)
            await until(lambda: len(transport.accepted) == 40 * 37, "everything")
        expect_all_in_order(transport, lines)
        s = sink.stats
        assert s.records_sent == 40 * 37 and s.failures == {} and s.retries == 0
        assert s.batches_sent == len(transport.requests)
        assert s.bytes_sent == sum(len(b) for _t, b in transport.requests)
        assert sum(s.latency_counts) == len(transport.requests)
        assert len(s.latency_counts) == len(LATENCY_BUCKETS_S) + 1
        assert s.memory_bytes_now == 0 and s.disk_bytes_now == 0 and s.oldest_ns_now == 0

    run(body)


def test_in_flight_requests_are_bounded() -> None:
    async def body() -> None:
        for limit in (1, 3):
            sink, transport, _c = make_sink(sink_config(None, max_in_flight=limit))
            transport.gate = asyncio.Event()
            lines = Lines(2)
            async with running(sink):
                sink.put(lines.make(50 * 6))
                await until(lambda: len(transport.requests) == limit, "requests")  # noqa: B023
                for _ in range(20):
                    await asyncio.sleep(0.005)
                assert len(transport.requests) == limit
                transport.gate.set()
                await until(lambda: len(transport.accepted) == 300, "everything")  # noqa: B023
            expect_all_in_order(transport, lines)

    run(body)


def test_429_retry_after_is_honoured() -> None:
    async def body() -> None:
        sink, transport, clock = make_sink(sink_config(None))
        transport.script += [Response(429, {"retry-after": "120"}, b"slow down"),
                             Response(503, {}, b"")]
        lines = Lines(2)
        async with running(sink):
            sink.put(lines.make(50))
            await until(lambda: len(transport.accepted) == 50, "delivery after the 429")
        (t1, b1), (t2, b2), (t3, b3) = transport.requests
        assert b1 == b2 == b3
        assert t2 - t1 >= 120.0  # Retry-After, not the 0.5 s backoff
        assert t3 - t2 >= 0.5 and t3 - t2 <= 1.0  # then backoff: 2nd attempt, full jitter=1.0
        s = sink.stats
        assert s.failures == {"429": 1, "5xx": 1}
        assert s.retries == 2 and s.records_sent == 50 and s.batches_sent == 1
        assert s.failing_since_ns == 0
        expect_all_in_order(transport, lines)

    run(body)


def test_retry_after_is_capped_and_http_dates_work() -> None:
    async def body() -> None:
        cfg = sink_config(None, retry=RetryConfig(initial_backoff_s=0.5, max_backoff_s=1.0,
                                                  max_retry_after_s=100.0))
        sink, transport, clock = make_sink(cfg)
        # asked for after the first (capped) wait of 100 s: 90 s from then
        in_90s = time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                               time.gmtime(clock.time_ns() / 1e9 + 100 + 90))
        transport.script += [Response(429, {"retry-after": "3600"}, b""),
                             Response(503, {"retry-after": in_90s}, b""),
                             Response(429, {"retry-after": "soon"}, b"")]  # malformed: backoff
        async with running(sink):
            sink.put(Lines(1).make(50))
            await until(lambda: len(transport.accepted) == 50, "delivery")
        times = [t for t, _b in transport.requests]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert 100.0 <= gaps[0] < 101.0
        assert 89.0 <= gaps[1] <= 91.0
        assert gaps[2] <= 1.0 + 0.1

    run(body)


def test_transport_errors_back_off_exponentially_and_health_follows() -> None:
    async def body() -> None:
        cfg = sink_config(None, retry=RetryConfig(initial_backoff_s=1.0, max_backoff_s=8.0))
        sink, transport, clock = make_sink(cfg)
        transport.script += [TransportError("connection refused")] * 6
        async with running(sink):
            sink.put(Lines(1).make(50))
            await until(lambda: len(transport.requests) == 5, "retries")
            assert sink.stats.failing_since_ns > 0
            assert not sink.healthy(10.0)
            assert sink.healthy(1e6)
            await until(lambda: len(transport.accepted) == 50, "delivery")
        times = [t for t, _b in transport.requests]
        gaps = [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]
        # full jitter with random() == 1.0: exactly the ceiling, doubling up to the max
        assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        assert sink.stats.failures == {"transport": 6}
        assert sink.stats.retries == 6
        assert sink.stats.failing_since_ns == 0 and sink.healthy(0.0)

    run(body)


def test_4xx_is_dead_lettered_with_the_response(tmp_path: Path) -> None:
    async def body() -> None:
        sink, transport, clock = make_sink(sink_config(tmp_path))
        transport.script.append(Response(400, {}, b'{"error":"bad request"}' + b"x" * 9000))
        lines = Lines(2)
        async with running(sink):
            sink.put(lines.make(50))  # batch 1: dead
            sink.put(lines.make(10))  # batch 2: accepted
            await until(lambda: len(transport.accepted) == 10, "the second batch")
        assert len(transport.requests) == 2  # never retried
        s = sink.stats
        assert s.dead_records == 50 and s.records_sent == 10 and s.failures == {"4xx": 1}
        path = tmp_path / "buf" / "test" / "dead" / "dead-letters.ndjson"
        dead = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        assert len(dead) == 50
        first = dead[0]
        assert set(first) == {"time", "sink", "reason", "item"}
        assert first["sink"] == "test"
        assert first["reason"].startswith('{"error":"bad request"}')
        assert len(first["reason"].encode()) == 4096
        assert first["time"].endswith("Z")
        items = [d["item"].encode() for d in dead]
        assert per_container(items) == {b"c0": list(range(25)), b"c1": list(range(25))}
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)

    run(body)


def test_dead_letters_only_counted_without_a_directory() -> None:
    async def body() -> None:
        sink, transport, _c = make_sink(sink_config(None))
        assert sink.dead_letters is None
        transport.script.append(Response(413, {}, b"too large"))
        async with running(sink, grace_s=DEADLINE_S):
            sink.put(Lines(1).make(50))
            await until(lambda: sink.stats.dead_records == 50, "dead letters")
        assert len(sink.buffer) == 0

    run(body)


def test_partial_outcome_retries_some_items_and_dead_letters_others(tmp_path: Path) -> None:
    async def body() -> None:
        dead_dir = tmp_path / "dl"
        sink, transport, clock = make_sink(sink_config(tmp_path, dead_letter_dir=str(dead_dir)))
        lines = Lines(2)
        # 10 items, grouped c0 (0..4) then c1 (0..4): statuses per item in body order
        statuses = [200, 429, 400, 200, 503, 200, 200, 429, 200, 200]
        transport.script.append(Response(200, {}, orjson.dumps({"items": statuses})))
        transport.script.append(Response(200, {}, orjson.dumps({"items": [200, 429, 200]})))
        async with running(sink):
            sink.put(lines.make(10))
            await until(lambda: len(sink.buffer) == 0 and len(transport.requests) == 3,
                        "the retried remainder")
            assert sink.stats.failing_since_ns == 0  # partly accepted is not failing
        bodies = [b for _t, b in transport.requests]
        assert bodies[1] == b"\n".join([b for b in bodies[0].split(b"\n")][i]
                                       for i in (1, 4, 7))
        assert bodies[2] == bodies[1].split(b"\n")[1]
        s = sink.stats
        assert s.records_sent == 6 + 2 + 1 and s.dead_records == 1 and s.retries == 2
        assert s.failures == {}
        dead = [orjson.loads(x) for x in (dead_dir / "dead-letters.ndjson").read_bytes().split(
            b"\n") if x]
        assert [d["item"].split("|")[0] for d in dead] == ["c0"]
        assert dead[0]["reason"] == "item rejected: mapper_parsing_exception"
        assert sorted(per_container(transport.accepted)[b"c0"]) == [0, 1, 3, 4]
        assert sorted(per_container(transport.accepted)[b"c1"]) == [0, 1, 2, 3, 4]

    run(body)


def test_a_retry_holds_back_younger_batches_with_one_in_flight() -> None:
    async def body() -> None:
        sink, transport, _c = make_sink(sink_config(None, max_in_flight=1))
        transport.script += [Response(500, {}, b""), Response(429, {}, b"")]
        lines = Lines(3)
        async with running(sink):
            for _ in range(10):
                sink.put(lines.make(50))
            await until(lambda: len(transport.accepted) == 500, "everything")
        expect_all_in_order(transport, lines)  # strictly in order despite the retries
        bodies = [b for _t, b in transport.requests]
        assert bodies[0] == bodies[1] == bodies[2]

    run(body)


def test_concurrent_batches_after_a_retry_send_the_oldest_alone() -> None:
    async def body() -> None:
        sink, transport, _c = make_sink(sink_config(None, max_in_flight=4))
        gate = transport.gate = asyncio.Event()
        transport.script.append(Response(503, {}, b""))  # the first request fails
        lines = Lines(1)
        async with running(sink):
            for _ in range(8):
                sink.put(lines.make(50))
            await until(lambda: len(transport.requests) == 4, "4 in flight")
            gate.set()
            await until(lambda: len(transport.accepted) == 400, "everything")
        bodies = [b for _t, b in transport.requests]
        assert bodies[4] == bodies[0]  # the retried batch went first, alone
        assert len(bodies) == 9
        got = per_container(transport.accepted)[b"c0"]
        assert sorted(got) == list(range(400))
        assert got[:150] == list(range(50, 200)) and got[150:200] == list(range(50))

    run(body)


# --------------------------------------------------------------------------- close
def test_close_within_grace_delivers_everything(tmp_path: Path) -> None:
    async def body() -> None:
        sink, transport, _c = make_sink(sink_config(tmp_path))
        transport.script += [TransportError("reset")] * 3
        lines = Lines(2)
        task = asyncio.create_task(sink.run())
        sink.put(lines.make(120))  # 2 closed batches + an open one
        await sink.close(grace_s=600.0)
        assert task.done()
        expect_all_in_order(transport, lines)
        assert transport.closed
        assert len(sink.buffer) == 0 and sink.stats.disk_bytes_now == 0
        rows = _rows(tmp_path / "buf" / "test" / "buffer.db")
        assert rows == []

    run(body)


def test_close_with_grace_zero_persists_and_the_next_start_delivers(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = sink_config(tmp_path)
        sink, transport, _c = make_sink(cfg)
        lines = Lines(2)
        sink.put(lines.make(120))  # two closed batches, one open
        await sink.close(0)  # run() never started
        assert transport.requests == [] and transport.closed
        assert sink.stats.dropped_records == 0
        assert [r[0] for r in _rows(tmp_path / "buf" / "test" / "buffer.db")] == [1, 2, 3]
        assert sink.stats.disk_bytes_now > 0 and sink.stats.memory_bytes_now == 0

        again, transport2, _c2 = make_sink(cfg)
        assert [e.seq for e in again.buffer.entries.values()] == [1, 2, 3]
        async with running(again):
            again.put(lines.make(10))
            await until(lambda: len(transport2.accepted) == 130, "the replay and the new lines")
        expect_all_in_order(transport2, lines)
        assert [e for e in again.buffer.entries] == []

    run(body)


def test_close_with_grace_zero_without_disk_counts_drops() -> None:
    async def body() -> None:
        sink, transport, _c = make_sink(sink_config(None))
        sink.put(Lines(1).make(120))
        await sink.close(0)
        assert sink.stats.dropped_records == 120 and sink.stats.dropped_bytes > 0
        sink.put(Lines(1).make(3))  # after close: dropped too
        assert sink.stats.dropped_records == 123

    run(body)


def test_close_after_grace_abandons_a_hanging_request_and_persists_it(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = sink_config(tmp_path, max_in_flight=2)
        sink, transport, clock = make_sink(cfg)
        transport.gate = asyncio.Event()  # never answers
        lines = Lines(1)
        task = asyncio.create_task(sink.run())
        sink.put(lines.make(100))
        await until(lambda: len(transport.requests) == 2, "two requests (max_in_flight)")
        await sink.close(grace_s=5.0)
        assert task.done()
        assert len(_rows(tmp_path / "buf" / "test" / "buffer.db")) == 2

        again, transport2, _c = make_sink(cfg)
        async with running(again):
            await until(lambda: len(transport2.accepted) == 100, "the replay")
        expect_all_in_order(transport2, lines)

    run(body)


def _rows(path: Path) -> list[tuple[int, int]]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return list(db.execute("SELECT seq, records FROM batches ORDER BY seq"))
    finally:
        db.close()


def test_stats_gauges_follow_the_buffer(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = sink_config(tmp_path)
        sink, transport, clock = make_sink(cfg)
        transport.gate = asyncio.Event()
        lines = Lines(1)
        sink.put(lines.make(50))
        created = clock.time_ns()
        assert sink.stats.oldest_ns_now == created
        entry = next(iter(sink.buffer.entries.values()))
        assert sink.stats.memory_bytes_now == entry.nbytes
        assert sink.stats.disk_bytes_now == 0
        async with running(sink):
            await until(lambda: len(transport.requests) == 1, "a request")
            transport.gate.set()
            await until(lambda: sink.stats.records_sent == 50, "delivery")
            assert sink.stats.oldest_ns_now == 0 and sink.stats.memory_bytes_now == 0

    run(body)


def test_preflight_asks_the_transport() -> None:
    async def body() -> None:
        sink, transport, _c = make_sink(sink_config(None))
        assert await sink.preflight() is None

        async def problem() -> str:
            return "certificate not trusted"

        transport.preflight = problem  # type: ignore[attr-defined]
        assert await sink.preflight() == "certificate not trusted"
        await sink.close(0)

    run(body)


@pytest.mark.parametrize("mode", ["overflow", "always"])
def test_sink_config_variants_deliver(tmp_path: Path, mode: str) -> None:
    async def body() -> None:
        cfg = sink_config(tmp_path)
        cfg = dataclasses.replace(cfg, buffer=dataclasses.replace(cfg.buffer, mode=mode))
        sink, transport, _c = make_sink(cfg, grouped=False)
        lines = Lines(4)
        async with running(sink):
            for _ in range(20):
                sink.put(lines.make(33))
            await until(lambda: len(transport.accepted) == 660, "everything")
        expect_all_in_order(transport, lines)
        assert os.path.exists(tmp_path / "buf" / "test" / "buffer.db")

    run(body)


def test_a_partly_accepted_batch_on_disk_keeps_only_the_remainder(tmp_path: Path) -> None:
    """After a partial answer the row on disk holds only what is left, so a restart does
    not send the accepted items again."""

    async def body() -> None:
        cfg = sink_config(tmp_path, buffer=BufferConfig(memory_bytes=1 << 20, mode="always",
                                                        disk_dir=str(tmp_path / "buf")))
        sink, transport, _c = make_sink(cfg)
        statuses = [200] * 8 + [429, 429]
        transport.script.append(Response(200, {}, orjson.dumps({"items": statuses})))
        transport.script.append(Response(200, {}, orjson.dumps({"items": [429, 429]})))
        lines = Lines(1)
        async with running(sink):
            sink.put(lines.make(10))
            await until(lambda: len(transport.requests) == 2, "the retry of the remainder")
        assert _rows(tmp_path / "buf" / "test" / "buffer.db") == [(1, 2)]
        again, transport2, _c2 = make_sink(cfg)
        async with running(again):
            await until(lambda: len(again.buffer) == 0, "the remainder")
        assert per_container(transport2.accepted) == {b"c0": [8, 9]}
        assert per_container(transport.accepted) == {b"c0": list(range(8))}

    run(body)


def test_whole_batch_retries_do_not_rewrite_the_disk_row(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = sink_config(tmp_path, buffer=BufferConfig(memory_bytes=1 << 20, mode="always",
                                                        disk_dir=str(tmp_path / "buf")))
        sink, transport, _c = make_sink(cfg)
        writes: list[int] = []
        store = sink.buffer.store
        assert store is not None
        real_write = store.write

        def counted(batch: Batch) -> None:
            writes.append(batch.seq)
            real_write(batch)

        store.write = counted  # type: ignore[method-assign]
        transport.script += [TransportError("refused"), Response(503, {}, b"")] * 2
        async with running(sink):
            sink.put(Lines(1).make(50))
            await until(lambda: sink.stats.records_sent == 50, "delivery")
        assert writes == [1] and sink.stats.retries == 4

    run(body)


# --------------------------------------------------------------------------- dead letters
def test_dead_letter_store_rotates_to_one_old_file(tmp_path: Path) -> None:
    from agent.sinks.deadletter import DeadLetterStore, dead_letter_dir

    assert dead_letter_dir("/dl", "/buf", "es") == "/dl"
    assert dead_letter_dir("", "/buf", "es") == "/buf/es/dead"
    assert dead_letter_dir("", "", "es") is None
    store = DeadLetterStore(str(tmp_path / "dead"), "es", max_bytes=2000, time_ns=lambda: 5)
    for i in range(30):
        store.write([b'{"n":%d}' % i], "x" * 10)
    current = (tmp_path / "dead" / "dead-letters.ndjson").read_bytes().splitlines()
    old = (tmp_path / "dead" / "dead-letters.ndjson.1").read_bytes().splitlines()
    assert sorted(p.name for p in (tmp_path / "dead").iterdir()) == [
        "dead-letters.ndjson", "dead-letters.ndjson.1"]
    assert (tmp_path / "dead" / "dead-letters.ndjson").stat().st_size <= 2000
    numbers = [orjson.loads(orjson.loads(line)["item"])["n"] for line in old + current]
    assert numbers == list(range(30 - len(numbers), 30))  # the newest, in order
    first = orjson.loads(current[0])
    assert first["time"] == "1970-01-01T00:00:00.000000005Z"


def test_dead_letter_reason_is_cut_at_4_kib_without_a_half_character(tmp_path: Path) -> None:
    from agent.sinks.deadletter import DeadLetterStore

    store = DeadLetterStore(str(tmp_path), "s")
    store.write([b"\xff not utf-8"], "é" * 5000)
    (line,) = (tmp_path / "dead-letters.ndjson").read_bytes().splitlines()
    record = orjson.loads(line)
    assert record["reason"] == "é" * 2048
    assert record["item"] == "\ufffd not utf-8"
