"""The hand-made exposition against prometheus_client itself, the oracle.

For each `Snapshot` the oracle builds the families the agent's prometheus_client
collector built before (the same names, HELP texts, labels and values) and renders
them with `generate_latest`; our page and the oracle's are both parsed with
prometheus_client's own parser and must give the same families and samples."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from agent.exposition import (
    Family,
    ProcessMetrics,
    escape_help,
    escape_label_value,
    format_value,
    gauge,
    render,
)
from agent.sinks.base import LATENCY_BUCKETS_S, SinkStats
from agent.telemetry import (
    KERNEL_METRICS,
    LATENCY_LE,
    PREFIX,
    SINK_COUNTERS,
    STREAMS,
    Snapshot,
    age_s,
    metric_families,
)

BUILD = {"version": "1.2.3", "python": "3.11.2"}
Parsed = list[tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], str]]]]


# --- the oracle: the prometheus_client collector the agent had, unchanged in substance ---

def oracle_families(snap: Snapshot, build: Mapping[str, str]) -> Iterator[Metric]:
    info = GaugeMetricFamily(PREFIX + "build_info", "Constant 1, labelled with the agent's build.",
                             labels=sorted(build))
    info.add_metric([build[k] for k in sorted(build)], 1)
    yield info
    kernel = snap.kernel
    per_stream = {f"{base}_{s}" for base in ("records", "bytes") for s in STREAMS}
    for base in ("records", "bytes"):
        if all(f"{base}_{s}" in kernel for s in STREAMS):
            name, doc = KERNEL_METRICS[base]
            family = CounterMetricFamily(PREFIX + name, doc, labels=["stream"])
            for s in STREAMS:
                family.add_metric([s], kernel[f"{base}_{s}"])
            yield family
        elif base in kernel:
            name, doc = KERNEL_METRICS[base]
            yield CounterMetricFamily(PREFIX + name, doc, value=kernel[base])
    for key, v in kernel.items():
        if key in ("records", "bytes") or key in per_stream:
            continue
        name, doc = KERNEL_METRICS.get(key, (f"kernel_{key}", f"Kernel counter {key}."))
        yield CounterMetricFamily(PREFIX + name, doc, value=v)
    yield from oracle_pipeline(snap)
    yield from oracle_sinks(snap.sinks, time.time_ns(), time.monotonic_ns())


def oracle_pipeline(snap: Snapshot) -> Iterator[Metric]:
    def c(name: str, doc: str, v: float) -> Metric:
        return CounterMetricFamily(PREFIX + name, doc, value=v)

    def g(name: str, doc: str, v: float) -> Metric:
        return GaugeMetricFamily(PREFIX + name, doc, value=v)

    yield c("lines", "Lines emitted by line reassembly.", snap.lines)
    yield c("partial_lines", "Lines emitted incomplete (idle, exit, loss, max length).",
            snap.partial_lines)
    yield c("records", "Lines enriched with pod metadata and encoded.", snap.records)
    yield c("hold_lines", "Lines held until their container's metadata was known.",
            snap.held_lines)
    yield c("hold_released_lines", "Held lines released to the sinks.", snap.released_lines)
    dropped = CounterMetricFamily(PREFIX + "hold_dropped_lines", "Held lines dropped, by reason.",
                                  labels=["reason"])
    for reason, n in sorted(snap.dropped_from_hold.items()):
        dropped.add_metric([reason], n)
    yield dropped
    yield c("kubelet_polls", "Kubelet /pods requests.", snap.kubelet_polls)
    yield c("kubelet_poll_errors", "Kubelet /pods requests that failed.", snap.kubelet_errors)
    yield g("containers_watched", "Containers in the kernel's watch map.",
            snap.containers_watched)
    yield g("containers_excluded", "Containers excluded by the filters.",
            snap.containers_excluded)


def oracle_sinks(sinks: Mapping[str, SinkStats], wall_ns: int, mono_ns: int) -> Iterator[Metric]:
    names = sorted(sinks)
    for attr, name, doc in SINK_COUNTERS:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["sink"])
        for sink in names:
            family.add_metric([sink], getattr(sinks[sink], attr))
        yield family
    failures = CounterMetricFamily(
        PREFIX + "sink_failures", "Failed send attempts, by status class (429, 4xx, 5xx, "
        "transport).", labels=["sink", "status_class"])
    for sink in names:
        for status_class, n in sorted(sinks[sink].failures.items()):
            failures.add_metric([sink, status_class], n)
    yield failures
    gauges: list[tuple[str, str, Callable[[SinkStats], float]]] = [
        ("sink_buffered_memory_bytes", "Bytes of batches waiting in memory.",
         lambda s: s.memory_bytes_now),
        ("sink_buffered_disk_bytes", "Bytes of batches waiting in the disk buffer.",
         lambda s: s.disk_bytes_now),
        ("sink_oldest_buffered_age_seconds",
         "Age of the oldest batch not acknowledged yet (0: none).",
         lambda s: age_s(s.oldest_ns_now, wall_ns)),
        ("sink_failing_seconds", "How long deliveries have failed in a row (0: healthy).",
         lambda s: age_s(s.failing_since_ns, mono_ns)),
    ]
    for name, doc, get in gauges:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["sink"])
        for sink in names:
            family.add_metric([sink], get(sinks[sink]))
        yield family
    histogram = HistogramMetricFamily(
        PREFIX + "sink_send_latency_seconds", "Time from sending a request to its answer.",
        labels=["sink"])
    for sink in names:
        buckets, total = [], 0
        for le, n in zip(LATENCY_LE, sinks[sink].latency_counts, strict=True):
            total += n
            buckets.append((le, float(total)))
        histogram.add_metric([sink], buckets, sinks[sink].latency_sum_s)
    yield histogram


class OracleCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        return oracle_families(self.snap, BUILD)


def oracle_page(snap: Snapshot, proc: str | None = None) -> str:
    registry = CollectorRegistry()
    registry.register(OracleCollector(snap))  # type: ignore[arg-type]
    if proc is not None:
        ProcessCollector(proc=proc, registry=registry)
    return generate_latest(registry).decode()


def our_page(snap: Snapshot, proc: str | None = None) -> str:
    process = ProcessMetrics(proc) if proc is not None else None
    return render(metric_families(snap, BUILD, process)).decode()


def parsed(text: str) -> Parsed:
    """Families in page order, samples as text (NaN == NaN) sorted within a family."""
    return [
        (f.name, f.type, f.documentation, sorted(
            (s.name, tuple(sorted(s.labels.items())), repr(float(s.value))) for s in f.samples))
        for f in text_string_to_metric_families(text)
    ]


# --- snapshots: every kind of value and label the agent can show ---

def full_snapshot(rng: random.Random, big: bool = False) -> Snapshot:
    top = 2**62 if big else 10**9

    def n() -> int:
        return rng.randrange(top)

    kernel = {k: n() for k in KERNEL_METRICS if rng.random() < 0.8}
    if rng.random() < 0.5:
        kernel |= {f"{b}_{s}": n() for b in ("records", "bytes") for s in STREAMS}
    if rng.random() < 0.5:
        kernel["brand_new"] = n()
    sinks = {}
    for name in rng.sample(["es", "loki", "otlp", "http", "stdout"], rng.randrange(6)):
        stats = SinkStats()
        for attr, _name, _doc in SINK_COUNTERS:
            setattr(stats, attr, n())
        stats.failures = {c: n() for c in ("429", "4xx", "5xx", "transport") if rng.random() < .6}
        stats.memory_bytes_now, stats.disk_bytes_now = n(), n()
        for _ in range(rng.randrange(50)):
            stats.observe_latency(rng.choice([0.0, *LATENCY_BUCKETS_S, rng.expovariate(2)]))
        sinks[name] = stats
    return Snapshot(
        kernel=kernel, lines=n(), partial_lines=n(), records=n(), held_lines=n(),
        released_lines=n(),
        dropped_from_hold={r: n() for r in ("hold_full", "unresolved", "excluded")
                           if rng.random() < 0.6},
        kubelet_polls=n(), kubelet_errors=n(), containers_watched=n(), containers_excluded=n(),
        sinks=sinks,
    )


@pytest.mark.parametrize("seed", range(40))
def test_random_snapshots_render_as_the_oracle_does(seed: int) -> None:
    snap = full_snapshot(random.Random(seed), big=seed % 2 == 1)
    assert parsed(our_page(snap)) == parsed(oracle_page(snap))


def test_an_empty_snapshot_renders_as_the_oracle_does() -> None:
    assert parsed(our_page(Snapshot())) == parsed(oracle_page(Snapshot()))


def test_ages_render_as_the_oracle_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 10**18)
    monkeypatch.setattr(time, "monotonic_ns", lambda: 5 * 10**12)
    sinks = {"es": SinkStats(oldest_ns_now=10**18 - 1_234_567_891,
                             failing_since_ns=5 * 10**12 - 7 * 10**9)}
    snap = Snapshot(sinks=sinks)
    ours = parsed(our_page(snap))
    assert ours == parsed(oracle_page(snap))
    assert ("podtap_sink_oldest_buffered_age_seconds", (("sink", "es"),), "1.234567891") in [
        s for _n, _t, _d, samples in ours for s in samples]


NASTY = ['back\\slash', 'quo"te', "new\nline", 'all\\"\n\\n', "ünïcødé ✓", "", " sp ace ",
         "{a=\"b\"}", "\\"]


@pytest.mark.parametrize("label", NASTY)
def test_label_values_are_escaped_as_the_oracle_does(label: str) -> None:
    snap = Snapshot(dropped_from_hold={label: 1}, sinks={label: SinkStats(records_in=2)})
    ours = parsed(our_page(snap))
    assert ours == parsed(oracle_page(snap))
    samples = {s for _n, _t, _d, ss in ours for s in ss}
    assert ("podtap_hold_dropped_lines_total", (("reason", label),), "1.0") in samples
    assert ("podtap_sink_input_records_total", (("sink", label),), "2.0") in samples


@pytest.mark.parametrize("value", [0, 1, -1, 2**53, 2**53 + 1, 2**64, 10**7, 0.1 + 0.2, 1e-9,
                                   1e22, 123456789.125, -0.0, math.inf, -math.inf, math.nan])
def test_values_parse_back_as_the_oracle_writes_them(value: float) -> None:
    ours = render([gauge("g", "A gauge.", value)]).decode()
    oracle = GaugeMetricFamily("g", "A gauge.", value=value)
    registry = CollectorRegistry()
    registry.register(type("C", (), {"collect": lambda self: [oracle]})())
    assert parsed(ours) == parsed(generate_latest(registry).decode())


def test_value_formats() -> None:
    assert format_value(10**7) == "10000000"
    assert format_value(1e7) == "10000000"
    assert format_value(2.0**60) == repr(2.0**60)
    assert format_value(0.25) == "0.25"
    assert format_value(3.0) == "3"
    assert format_value(-0.0) == "-0.0"
    assert (format_value(math.inf), format_value(-math.inf)) == ("+Inf", "-Inf")
    assert format_value(math.nan) == "NaN"


def test_escapes() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'


@pytest.mark.parametrize("doc", ["plain", "back\\slash", "new\nline", 'quo"te', "\\n literal"])
def test_help_is_escaped_as_the_oracle_does(doc: str) -> None:
    ours = render([Family("x_total", "counter", doc, (), [("x_total", "", 1)])]).decode()
    registry = CollectorRegistry()
    family = CounterMetricFamily("x", doc, value=1)
    registry.register(type("C", (), {"collect": lambda self: [family]})())
    assert parsed(ours) == parsed(generate_latest(registry).decode())
    assert parsed(ours)[0][2] == doc


def test_a_label_count_mismatch_is_an_error() -> None:
    family = gauge("g", "A gauge.", labels=("sink",))
    with pytest.raises(ValueError):
        family.add([], 1)


# --- process_* from a /proc of our own making, then from the real one ---

def fake_proc(root: Path, limits_line: str) -> str:
    (root / "self" / "fd").mkdir(parents=True)
    (root / "stat").write_text("cpu  1 2 3\nbtime 1764000000\nprocesses 5\n")
    # pid (comm with ") " in it) state ppid ... : utime=1234 stime=567 starttime=89012
    # vsize=123456789 rss=4321
    fields = ["S", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "1234", "567", "0", "0",
              "20", "0", "1", "0", "89012", "123456789", "4321", "18446744073709551615"]
    (root / "self" / "stat").write_text("42 (po) dtap) " + " ".join(fields) + " 0 0\n")
    (root / "self" / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        "Max cpu time              unlimited            unlimited            seconds   \n"
        + limits_line)
    for i in range(7):
        (root / "self" / "fd" / str(i)).touch()
    return str(root)


def test_process_metrics_render_as_the_oracle_does(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "Max open files      1048576      1048576      files\n")
    ours = parsed(our_page(Snapshot(), proc))
    assert ours == parsed(oracle_page(Snapshot(), proc))
    samples = {s[0]: float(s[2]) for _n, _t, _d, ss in ours for s in ss}
    ticks = os.sysconf("SC_CLK_TCK")
    assert samples["process_cpu_seconds_total"] == pytest.approx((1234 + 567) / ticks)
    assert samples["process_resident_memory_bytes"] == 4321 * os.sysconf("SC_PAGE_SIZE")
    assert samples["process_virtual_memory_bytes"] == 123456789
    assert samples["process_start_time_seconds"] == pytest.approx(1764000000 + 89012 / ticks)
    assert samples["process_open_fds"] == 7
    assert samples["process_max_fds"] == 1048576


def test_unlimited_open_files_is_plus_inf(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "Max open files      unlimited    unlimited    files\n")
    samples = {s.name: s.value for f in text_string_to_metric_families(our_page(Snapshot(), proc))
               for s in f.samples}
    assert samples["process_max_fds"] == math.inf


def test_without_proc_there_are_no_process_metrics(tmp_path: Path) -> None:
    names = {f.name for f in text_string_to_metric_families(our_page(Snapshot(),
                                                                     str(tmp_path)))}
    assert not any(n.startswith("process_") for n in names)
    assert "podtap_lines" in names


def test_real_process_metrics_have_the_oracles_families_and_near_values() -> None:
    ours = {f.name: f for f in text_string_to_metric_families(our_page(Snapshot(), "/proc"))
            if f.name.startswith("process_")}
    oracle = {f.name: f for f in text_string_to_metric_families(oracle_page(Snapshot(), "/proc"))
              if f.name.startswith("process_")}
    assert set(ours) == set(oracle) == {
        "process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
        "process_start_time_seconds", "process_open_fds", "process_max_fds"}
    for name, family in ours.items():
        assert (family.type, family.documentation) == (oracle[name].type,
                                                       oracle[name].documentation)
        got, want = family.samples[0].value, oracle[name].samples[0].value
        if name in ("process_start_time_seconds", "process_max_fds"):
            assert got == want, name
        else:
            assert got == pytest.approx(want, rel=0.5, abs=2), name
