"""The telemetry server, for real on loopback: /metrics parsed with prometheus_client's
own parser, /healthz, /readyz, start and stop."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import TelemetryConfig
from agent.sinks.base import LATENCY_BUCKETS_S, SinkStats
from agent.telemetry import (
    KERNEL_METRICS,
    SINK_COUNTERS,
    Snapshot,
    TelemetryError,
    TelemetryServer,
    readiness_reasons,
)

T = TypeVar("T")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SINKS = ("es", "loki", "otlp", "http")
STATUS_CLASSES = ("429", "4xx", "5xx", "transport")


def sink_stats(i: int) -> SinkStats:
    """Distinct values in every field, so a value exported under the wrong name shows."""
    stats = SinkStats()
    for j, (attr, _name, _doc) in enumerate(SINK_COUNTERS):
        setattr(stats, attr, 1000 * (i + 1) + j)
    stats.failures = {c: 10 * (i + 1) + k for k, c in enumerate(STATUS_CLASSES)}
    stats.memory_bytes_now = 5000 + i
    stats.disk_bytes_now = 6000 + i
    return stats


def snapshot() -> Snapshot:
    kernel = {name: 100 + k for k, name in enumerate(KERNEL_METRICS)}
    return Snapshot(
        kernel=kernel,
        lines=11,
        partial_lines=12,
        records=13,
        held_lines=14,
        released_lines=15,
        dropped_from_hold={"hold_full": 16, "unresolved": 17, "excluded": 18},
        kubelet_polls=19,
        kubelet_errors=20,
        containers_watched=21,
        containers_excluded=22,
        sinks={name: sink_stats(i) for i, name in enumerate(SINKS)},
    )


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text) for s in f.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def serve(
    snap: Callable[[], Snapshot],
    body: Callable[[TelemetryServer], Awaitable[T]],
    readiness: Callable[[], list[str]] = list,
) -> T:
    async def run() -> T:
        server = TelemetryServer(TelemetryConfig(address="127.0.0.1", port=0), snap, readiness)
        await server.start()
        try:
            return await body(server)
        finally:
            await server.stop()

    return asyncio.run(run())


async def get(
    server: TelemetryServer, path: str, accept: str | None = None
) -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{server.port}{path}", headers=headers
    ) as r:
        return r.status, r.headers["Content-Type"], await r.text()


def scrape(snap: Callable[[], Snapshot]) -> Samples:
    async def body(server: TelemetryServer) -> str:
        status, ctype, text = await get(server, "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain")
        return text

    return parse(serve(snap, body))


def test_kernel_counters_each_under_its_own_name() -> None:
    snap = snapshot()
    samples = scrape(lambda: snap)
    for key, (name, _doc) in KERNEL_METRICS.items():
        assert value(samples, f"podtap_{name}_total") == snap.kernel[key], key


def test_kernel_counter_without_a_name_is_still_exported() -> None:
    samples = scrape(lambda: Snapshot(kernel={"records": 1, "new_counter": 42}))
    assert value(samples, "podtap_kernel_new_counter_total") == 42
    assert value(samples, "podtap_captured_records_total") == 1


def test_per_stream_kernel_counters_get_a_stream_label() -> None:
    kernel = {"records_stdout": 1, "records_stderr": 2, "bytes_stdout": 30, "bytes_stderr": 40}
    samples = scrape(lambda: Snapshot(kernel=kernel))
    assert value(samples, "podtap_captured_records_total", stream="stdout") == 1
    assert value(samples, "podtap_captured_records_total", stream="stderr") == 2
    assert value(samples, "podtap_captured_bytes_total", stream="stdout") == 30
    assert value(samples, "podtap_captured_bytes_total", stream="stderr") == 40
    assert not any(name.startswith("podtap_kernel_") for name, _ in samples)


def test_pipeline_counters_and_gauges() -> None:
    samples = scrape(snapshot)
    expected = {
        "podtap_lines_total": 11,
        "podtap_partial_lines_total": 12,
        "podtap_records_total": 13,
        "podtap_hold_lines_total": 14,
        "podtap_hold_released_lines_total": 15,
        "podtap_kubelet_polls_total": 19,
        "podtap_kubelet_poll_errors_total": 20,
        "podtap_containers_watched": 21,
        "podtap_containers_excluded": 22,
    }
    for name, want in expected.items():
        assert value(samples, name) == want, name
    for reason, want in {"hold_full": 16, "unresolved": 17, "excluded": 18}.items():
        assert value(samples, "podtap_hold_dropped_lines_total", reason=reason) == want


def test_every_sink_counter_per_sink_and_failures_per_status_class() -> None:
    samples = scrape(snapshot)
    for i, sink in enumerate(SINKS):
        for j, (_attr, name, _doc) in enumerate(SINK_COUNTERS):
            assert value(samples, f"podtap_{name}_total", sink=sink) == 1000 * (i + 1) + j, name
        for k, status_class in enumerate(STATUS_CLASSES):
            got = value(samples, "podtap_sink_failures_total", sink=sink, status_class=status_class)
            assert got == 10 * (i + 1) + k
        assert value(samples, "podtap_sink_buffered_memory_bytes", sink=sink) == 5000 + i
        assert value(samples, "podtap_sink_buffered_disk_bytes", sink=sink) == 6000 + i


def test_latency_histogram_buckets_are_cumulative_with_inclusive_bounds() -> None:
    stats = SinkStats()
    observed = []
    for bound in LATENCY_BUCKETS_S:  # every bound exactly, and just above it
        observed += [bound, bound * 1.001]
    observed.append(0.0)
    for seconds in observed:
        stats.observe_latency(seconds)
    samples = scrape(lambda: Snapshot(sinks={"es": stats}))
    name = "podtap_sink_send_latency_seconds"
    for bound in LATENCY_BUCKETS_S:
        want = sum(1 for s in observed if s <= bound)
        assert value(samples, f"{name}_bucket", sink="es", le=repr(bound)) == want, bound
    assert value(samples, f"{name}_bucket", sink="es", le="+Inf") == len(observed)
    assert value(samples, f"{name}_count", sink="es") == len(observed)
    assert value(samples, f"{name}_sum", sink="es") == pytest.approx(sum(observed))


def test_oldest_buffered_age_and_failing_time_are_gauges_in_seconds() -> None:
    stats = SinkStats(oldest_ns_now=time.time_ns() - 5_000_000_000,
                      failing_since_ns=time.monotonic_ns() - 7_000_000_000)
    before = time.monotonic()
    samples = scrape(lambda: Snapshot(sinks={"es": stats, "idle": SinkStats()}))
    slack = time.monotonic() - before + 1
    age = value(samples, "podtap_sink_oldest_buffered_age_seconds", sink="es")
    failing = value(samples, "podtap_sink_failing_seconds", sink="es")
    assert 5 <= age <= 5 + slack
    assert 7 <= failing <= 7 + slack
    assert value(samples, "podtap_sink_oldest_buffered_age_seconds", sink="idle") == 0
    assert value(samples, "podtap_sink_failing_seconds", sink="idle") == 0


def test_build_info_and_process_metrics() -> None:
    samples = scrape(Snapshot)
    info = [labels for name, labels in samples if name == "podtap_build_info"]
    assert len(info) == 1
    assert {k for k, _ in info[0]} == {"version", "python"}
    assert value(samples, "process_resident_memory_bytes") > 0


def test_each_scrape_takes_a_new_snapshot() -> None:
    snap = Snapshot(lines=1)
    calls = []

    def take() -> Snapshot:
        calls.append(1)
        return snap

    async def body(server: TelemetryServer) -> tuple[str, str]:
        first = (await get(server, "/metrics"))[2]
        snap.lines = 2
        return first, (await get(server, "/metrics"))[2]

    first, second = serve(take, body)
    assert value(parse(first), "podtap_lines_total") == 1
    assert value(parse(second), "podtap_lines_total") == 2
    assert len(calls) == 2


# Prometheus's own scrape Accept header: OpenMetrics first, the 0.0.4 text accepted.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize("accept", ["application/openmetrics-text", PROMETHEUS_ACCEPT])
def test_the_text_format_is_served_when_openmetrics_is_asked_for(accept: str) -> None:
    async def body(server: TelemetryServer) -> tuple[str, str]:
        _status, ctype, text = await get(server, "/metrics", accept)
        return ctype, text

    ctype, text = serve(snapshot, body)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse(text)
    assert value(samples, "podtap_sink_sent_records_total", sink="loki") == 2001
    assert value(samples, "podtap_sink_send_latency_seconds_count", sink="es") == 0


def test_a_failing_snapshot_is_a_500_and_the_server_keeps_serving() -> None:
    fail = [True]

    def take() -> Snapshot:
        if fail[0]:
            raise RuntimeError("stage gone")
        return Snapshot(lines=3)

    async def body(server: TelemetryServer) -> tuple[int, int, str]:
        bad = (await get(server, "/metrics"))[0]
        fail[0] = False
        status, _ctype, text = await get(server, "/metrics")
        return bad, status, text

    bad, status, text = serve(take, body)
    assert (bad, status) == (500, 200)
    assert value(parse(text), "podtap_lines_total") == 3


def test_readyz_lists_the_reasons_then_turns_ok() -> None:
    reasons = ["probes not attached", "sink es failing for 312 s"]

    async def body(server: TelemetryServer) -> list[tuple[int, str]]:
        out = [(s, t) for s, _c, t in [await get(server, "/readyz")]]
        reasons.clear()
        out += [(s, t) for s, _c, t in [await get(server, "/readyz")]]
        return out

    (s1, t1), (s2, t2) = serve(Snapshot, body, readiness=lambda: list(reasons))
    assert s1 == 503
    assert t1.splitlines() == ["probes not attached", "sink es failing for 312 s"]
    assert (s2, t2.strip()) == (200, "ok")


def test_readyz_is_503_when_the_check_itself_fails() -> None:
    def broken() -> list[str]:
        raise RuntimeError("no pipeline")

    async def body(server: TelemetryServer) -> tuple[int, str]:
        status, _c, text = await get(server, "/readyz")
        return status, text

    status, text = serve(Snapshot, body, readiness=broken)
    assert status == 503
    assert "no pipeline" in text


def test_healthz_answers_while_not_ready() -> None:
    async def body(server: TelemetryServer) -> tuple[int, str]:
        status, _c, text = await get(server, "/healthz")
        return status, text

    status, text = serve(Snapshot, body, readiness=lambda: ["kubelet never answered"])
    assert (status, text.strip()) == (200, "ok")


def test_stop_frees_the_port() -> None:
    async def run() -> int:
        server = TelemetryServer(TelemetryConfig(address="127.0.0.1", port=0), Snapshot, list)
        await server.start()
        port = server.port
        assert port != 0
        assert (await get(server, "/healthz"))[0] == 200
        await server.stop()
        return port

    port = asyncio.run(run())
    with socket.socket() as s:  # the same port can be bound again, without SO_REUSEADDR
        s.bind(("127.0.0.1", port))
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def run() -> None:
            cfg = TelemetryConfig(address="127.0.0.1", port=port)
            await TelemetryServer(cfg, Snapshot, list).start()

        with pytest.raises(TelemetryError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(run())


def test_readiness_reasons() -> None:
    now = 1_000_000_000_000
    sinks = {
        "es": SinkStats(failing_since_ns=now - 312_000_000_000),
        "loki": SinkStats(failing_since_ns=now - 10_000_000_000),  # failing, not long enough
        "otlp": SinkStats(),
    }
    assert readiness_reasons(attached=False, kubelet_answered=False, sinks=sinks,
                             max_failing_s=300, mono_ns=now) == [
        "probes not attached", "kubelet never answered", "sink es failing for 312 s"]
    assert readiness_reasons(attached=True, kubelet_answered=True, sinks=sinks,
                             max_failing_s=400, mono_ns=now) == []
