"""The agent's own HTTP server: /metrics (Prometheus), /healthz, /readyz.

Metrics are made at scrape time: the pipeline hands over a `snapshot` callable that
returns a `Snapshot` of the counters the stages already keep (plain ints, `SinkStats`),
and a collector turns it into metric families. Nothing on the data path calls
prometheus_client; a scrape costs one snapshot and one text rendering.

The server runs on the agent's event loop, so /healthz answering is itself the proof
that the loop is not stuck.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from agent.config import TelemetryConfig
from agent.sinks.base import LATENCY_BUCKETS_S, SinkStats

log = logging.getLogger("podtap.telemetry")

PREFIX = "podtap_"
STREAMS = ("stdout", "stderr")


@dataclass(slots=True)
class Snapshot:
    """The counters of every stage at one instant, filled by the pipeline.

    `kernel` is `Probe.counters()` as it is (names of bpf/podtap.h without CNT_);
    `dropped_from_hold` maps a reason (`hold_full`, `unresolved`, `excluded`) to the
    lines the enricher dropped from its hold for it.
    """

    kernel: dict[str, int] = field(default_factory=dict)
    lines: int = 0
    partial_lines: int = 0
    records: int = 0
    held_lines: int = 0
    released_lines: int = 0
    dropped_from_hold: dict[str, int] = field(default_factory=dict)
    kubelet_polls: int = 0
    kubelet_errors: int = 0
    containers_watched: int = 0
    containers_excluded: int = 0
    sinks: dict[str, SinkStats] = field(default_factory=dict)


# Kernel counter -> (metric name without prefix and _total, help). Counters the kernel
# gains later and that are not listed here are still exported, as kernel_<name>.
KERNEL_METRICS: dict[str, tuple[str, str]] = {
    "records": ("captured_records", "Data records the probe put in the ring buffer."),
    "bytes": ("captured_bytes", "Bytes written by containers that were captured."),
    "writes": ("captured_writes", "Write calls to a watched stream that returned > 0."),
    "drop_records": ("ringbuf_dropped_records",
                     "Data records lost because the ring buffer was full."),
    "drop_bytes": ("ringbuf_dropped_bytes", "Data bytes lost because the ring buffer was full."),
    "drop_exits": ("ringbuf_dropped_exit_records",
                   "Process-exit records lost because the ring buffer was full."),
    "drop_cgroups": ("ringbuf_dropped_cgroup_records",
                     "Cgroup-creation records lost because the ring buffer was full."),
    "trunc_bytes": ("truncated_bytes",
                    "Bytes beyond the per-write maximum or the copy budget (not captured)."),
    "uncapt_bytes": ("uncapturable_bytes",
                     "Bytes written to a watched stream by splice, sendfile, tee and the like."),
    "uncapt_calls": ("uncapturable_calls",
                     "Calls that wrote to a watched stream in a way that cannot be captured."),
    "fault_bytes": ("fault_bytes",
                    "Bytes the kernel accepted that the probe could not read from user memory."),
    "unknown_records": ("unknown_cgroup_records",
                        "Records of cgroups under the pods' subtree that were not watched yet."),
    "exits": ("exit_records", "Process-exit records put in the ring buffer."),
}

# SinkStats counter field -> (metric name without prefix and _total, help).
SINK_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("records_in", "sink_input_records", "Records put into the sink."),
    ("records_sent", "sink_sent_records", "Records the backend acknowledged."),
    ("bytes_sent", "sink_sent_bytes", "Request body bytes acknowledged, as sent (compressed)."),
    ("batches_sent", "sink_sent_batches", "Batches the backend acknowledged."),
    ("retries", "sink_retries", "Send attempts after the first, of any batch."),
    ("dead_records", "sink_dead_letter_records",
     "Records the backend will never accept, sent to the dead-letter store."),
    ("dropped_records", "sink_dropped_records",
     "Records dropped because the memory and disk buffers were full."),
    ("dropped_bytes", "sink_dropped_bytes",
     "Bytes dropped because the memory and disk buffers were full."),
    ("encode_errors", "sink_encode_errors", "Lines the sink could not encode (skipped)."),
    ("corrupt_batches", "sink_corrupt_batches",
     "Disk-buffer batches that failed their checksum (their records count as dropped)."),
)


def podtap_version() -> str:
    try:
        return version("podtap")
    except PackageNotFoundError:
        return "unknown"


def le_label(bound: float) -> str:
    """A bucket bound as prometheus_client writes it ("0.005", "1.0", "+Inf")."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


LATENCY_LE = tuple(le_label(b) for b in (*LATENCY_BUCKETS_S, float("inf")))


class SnapshotCollector:
    """A prometheus_client collector that renders one `Snapshot` per scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot], build: Mapping[str, str]) -> None:
        self.snapshot = snapshot
        self.build = dict(build)

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        info = GaugeMetricFamily(
            PREFIX + "build_info", "Constant 1, labelled with the agent's build.",
            labels=sorted(self.build),
        )
        info.add_metric([self.build[k] for k in sorted(self.build)], 1)
        yield info
        yield from kernel_metrics(snap.kernel)
        yield from pipeline_metrics(snap)
        yield from sink_metrics(snap.sinks, time.time_ns(), time.monotonic_ns())


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def kernel_metrics(kernel: Mapping[str, int]) -> Iterator[Metric]:
    """The probe's counters. They are not split by stream today; per-stream counters
    named `<records|bytes>_<stdout|stderr>` are exported with a `stream` label."""
    per_stream = {f"{base}_{s}" for base in ("records", "bytes") for s in STREAMS}
    for base in ("records", "bytes"):
        if all(f"{base}_{s}" in kernel for s in STREAMS):
            name, doc = KERNEL_METRICS[base]
            family = CounterMetricFamily(PREFIX + name, doc, labels=["stream"])
            for s in STREAMS:
                family.add_metric([s], kernel[f"{base}_{s}"])
            yield family
        elif base in kernel:
            yield counter(*KERNEL_METRICS[base], kernel[base])
    for key, value in kernel.items():
        if key in ("records", "bytes") or key in per_stream:
            continue
        name, doc = KERNEL_METRICS.get(key, (f"kernel_{key}", f"Kernel counter {key}."))
        yield counter(name, doc, value)


def pipeline_metrics(snap: Snapshot) -> Iterator[Metric]:
    yield counter("lines", "Lines emitted by line reassembly.", snap.lines)
    yield counter("partial_lines", "Lines emitted incomplete (idle, exit, loss, max length).",
                  snap.partial_lines)
    yield counter("records", "Lines enriched with pod metadata and encoded.", snap.records)
    yield counter("hold_lines", "Lines held until their container's metadata was known.",
                  snap.held_lines)
    yield counter("hold_released_lines", "Held lines released to the sinks.",
                  snap.released_lines)
    dropped = CounterMetricFamily(
        PREFIX + "hold_dropped_lines", "Held lines dropped, by reason.", labels=["reason"]
    )
    for reason, n in sorted(snap.dropped_from_hold.items()):
        dropped.add_metric([reason], n)
    yield dropped
    yield counter("kubelet_polls", "Kubelet /pods requests.", snap.kubelet_polls)
    yield counter("kubelet_poll_errors", "Kubelet /pods requests that failed.",
                  snap.kubelet_errors)
    yield gauge("containers_watched", "Containers in the kernel's watch map.",
                snap.containers_watched)
    yield gauge("containers_excluded", "Containers excluded by the filters.",
                snap.containers_excluded)


def sink_metrics(
    sinks: Mapping[str, SinkStats], wall_ns: int, mono_ns: int
) -> Iterator[Metric]:
    names = sorted(sinks)
    for attr, name, doc in SINK_COUNTERS:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["sink"])
        for sink in names:
            family.add_metric([sink], getattr(sinks[sink], attr))
        yield family
    failures = CounterMetricFamily(
        PREFIX + "sink_failures", "Failed send attempts, by status class (429, 4xx, 5xx, "
        "transport).", labels=["sink", "status_class"],
    )
    for sink in names:
        for status_class, n in sorted(sinks[sink].failures.items()):
            failures.add_metric([sink, status_class], n)
    yield failures
    yield sink_gauge("sink_buffered_memory_bytes", "Bytes of batches waiting in memory.",
                     {s: sinks[s].memory_bytes_now for s in names})
    yield sink_gauge("sink_buffered_disk_bytes", "Bytes of batches waiting in the disk buffer.",
                     {s: sinks[s].disk_bytes_now for s in names})
    yield sink_gauge(
        "sink_oldest_buffered_age_seconds",
        "Age of the oldest batch not acknowledged yet (0: none).",
        {s: age_s(sinks[s].oldest_ns_now, wall_ns) for s in names},
    )
    yield sink_gauge(
        "sink_failing_seconds", "How long deliveries have failed in a row (0: healthy).",
        {s: age_s(sinks[s].failing_since_ns, mono_ns) for s in names},
    )
    yield latency_histogram(sinks, names)


def age_s(since_ns: int, now_ns: int) -> float:
    return max(0, now_ns - since_ns) / 1e9 if since_ns else 0.0


def sink_gauge(name: str, doc: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=["sink"])
    for sink, value in values.items():
        family.add_metric([sink], value)
    return family


def latency_histogram(sinks: Mapping[str, SinkStats], names: list[str]) -> Metric:
    """`SinkStats.latency_counts` holds per-bucket counts; Prometheus wants them cumulative."""
    family = HistogramMetricFamily(
        PREFIX + "sink_send_latency_seconds", "Time from sending a request to its answer.",
        labels=["sink"],
    )
    for sink in names:
        stats = sinks[sink]
        buckets, total = [], 0
        for le, n in zip(LATENCY_LE, stats.latency_counts, strict=True):
            total += n
            buckets.append((le, float(total)))
        family.add_metric([sink], buckets, stats.latency_sum_s)
    return family


def readiness_reasons(
    *,
    attached: bool,
    kubelet_answered: bool,
    sinks: Mapping[str, SinkStats],
    max_failing_s: float,
    mono_ns: int | None = None,
) -> list[str]:
    """Why the agent is not ready (empty: ready): what a `readiness` callable returns."""
    reasons = []
    if not attached:
        reasons.append("probes not attached")
    if not kubelet_answered:
        reasons.append("kubelet never answered")
    now = time.monotonic_ns() if mono_ns is None else mono_ns
    for name in sorted(sinks):
        failing = age_s(sinks[name].failing_since_ns, now)
        if failing > max_failing_s:
            reasons.append(f"sink {name} failing for {failing:.0f} s")
    return reasons


class TelemetryError(OSError):
    """The server could not start (address in use, address not available)."""


class TelemetryServer:
    """/metrics, /healthz and /readyz on `cfg.address:cfg.port`, on the running loop."""

    def __init__(
        self,
        cfg: TelemetryConfig,
        snapshot: Callable[[], Snapshot],
        readiness: Callable[[], list[str]],
    ) -> None:
        self.cfg = cfg
        self.readiness = readiness
        self.registry = CollectorRegistry()
        build = {"version": podtap_version(), "python": platform.python_version()}
        self.registry.register(SnapshotCollector(snapshot, build))
        # process_* (RSS, CPU seconds, open fds): ~45 us a scrape, and the agent's own
        # cost is what an operator of a DaemonSet watches first.
        ProcessCollector(registry=self.registry)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def start(self) -> None:
        # access_log None: a scrape every few seconds is not worth a log line.
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.address, self.cfg.port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise TelemetryError(
                f"telemetry server cannot listen on {self.cfg.address}:{self.cfg.port}: "
                f"{e.strerror or e}"
            ) from e
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("telemetry listening", extra={"address": self.cfg.address, "port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        try:
            body = encode(self.registry)
        except Exception:
            log.exception("metrics scrape failed")
            return web.Response(status=500, text="metrics scrape failed\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        try:
            reasons = self.readiness()
        except Exception as e:
            log.exception("readiness check failed")
            reasons = [f"readiness check failed: {e}"]
        if reasons:
            return web.Response(status=503, text="".join(f"{r}\n" for r in reasons))
        return web.Response(text="ok\n")
