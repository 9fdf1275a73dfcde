"""Tests of agent.enrich.Enricher: lines -> JSON records, holding lines of unknown cgroups.

The lookup is a dict the test changes (cgroup id -> Known), standing in for Discovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.enrich import HELD_LINE_OVERHEAD as O
from agent.enrich import Enricher
from agent.kube.discovery import Known
from agent.kube.model import ContainerMeta
from agent.lines import Line
from agent.records import ContainerEncoder, RecordFormat, format_rfc3339_ns
from agent.sinks.base import Enriched

STDOUT, STDERR = 1, 2
OFFSET = 1_700_000_000 * 1_000_000_000  # boot time -> realtime
SECOND = 1_000_000_000
CG_A, CG_B, CG_C = 1001, 2002, 3003


def meta_for(cg: int, **overrides: Any) -> ContainerMeta:
    values: dict[str, Any] = {
        "namespace": f"ns-{cg}",
        "pod_name": f"pod-{cg}",
        "pod_uid": f"uid-{cg}",
        "container_name": f"c-{cg}",
        "container_id": f"{cg:064x}",
        "runtime": "containerd",
        "image": f"img-{cg}:1",
        "host": "node-1",
        "qos_class": "besteffort",
        "labels": {"app": f"app-{cg}"},
        "owner_kind": "ReplicaSet",
        "owner_name": f"rs-{cg}",
    }
    values.update(overrides)
    return ContainerMeta(**values)


def known(cg: int, stdout: bool = True, stderr: bool = True, **overrides: Any) -> Known:
    return Known(meta_for(cg, **overrides), f"/cg/{cg}", stdout, stderr)


def line(cg: int, message: bytes, ts: int = 0, stream: int = STDOUT, partial: bool = False) -> Line:
    return (ts, 4242, stream, (cg, b"comm\0\0\0"), message, partial)


@dataclass
class Harness:
    """An Enricher over a dict lookup, counting on_unknown calls and lookups."""

    hold_max_bytes: int = 1 << 20
    hold_timeout_ns: int = 30 * SECOND
    fmt: RecordFormat = field(default_factory=RecordFormat)
    table: dict[int, Known] = field(default_factory=dict)
    unknown_calls: int = 0
    lookups: list[int] = field(default_factory=list)
    offset: int = OFFSET
    unknown_cgroups: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.enricher = Enricher(
            self.lookup,
            1,
            lambda: self.offset,
            self.hold_max_bytes,
            self.hold_timeout_ns,
            self.on_unknown,
        )

    def lookup(self, cg: int) -> Known | None:
        self.lookups.append(cg)
        return self.table.get(cg)

    def on_unknown(self, cg: int) -> None:
        self.unknown_calls += 1
        self.unknown_cgroups.append(cg)

    def process(self, *lines: Line) -> list[dict[str, Any]]:
        out: list[Enriched] = []
        self.enricher.process(list(lines), out)
        return self.records(out)

    def release(self, now_ns: int = 0, final: bool = False) -> list[dict[str, Any]]:
        out: list[Enriched] = []
        self.enricher.release(now_ns, out, final)
        return self.records(out)

    def records(self, enriched: list[Enriched]) -> list[dict[str, Any]]:
        """The JSON records a sink would build (one encoder per Origin, as sinks cache it)."""
        out = []
        for origin, time_ns, stream, message, partial in enriched:
            if origin.encoders[0] is None:
                origin.encoders[0] = ContainerEncoder(origin.meta, self.fmt)  # type: ignore[assignment]
            encoder = origin.encoders[0]
            assert isinstance(encoder, ContainerEncoder)
            out.append(orjson.loads(encoder.encode(time_ns, stream, message, partial)))
        return out


def messages(records: list[dict[str, Any]]) -> list[str]:
    return [r["message"] for r in records]


def cgroup_of(record: dict[str, Any]) -> int:
    """The cgroup a record was enriched for (its container id encodes it)."""
    if "kubernetes" in record:
        return int(record["kubernetes"]["docker_id"], 16)
    return int(record["container.id"], 16)


# --- known containers ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [STDOUT, STDERR])
@pytest.mark.parametrize("partial", [False, True])
def test_known_container_is_encoded_at_once_fluentbit(stream: int, partial: bool) -> None:
    h = Harness()
    h.table[CG_A] = known(CG_A)
    ts = 123 * SECOND + 456_789
    [record] = h.process(line(CG_A, 'héllo "wörld"\t\x01'.encode(), ts, stream, partial))
    assert record["time"] == format_rfc3339_ns(ts + OFFSET)
    assert record["stream"] == ("stdout" if stream == STDOUT else "stderr")
    assert record["message"] == 'héllo "wörld"\t\x01'
    assert record["partial"] is partial
    assert record["kubernetes"] == {
        "pod_name": f"pod-{CG_A}",
        "namespace_name": f"ns-{CG_A}",
        "pod_id": f"uid-{CG_A}",
        "labels": {"app": f"app-{CG_A}"},
        "ownerReferences": [{"kind": "ReplicaSet", "name": f"rs-{CG_A}"}],
        "host": "node-1",
        "container_name": f"c-{CG_A}",
        "docker_id": f"{CG_A:064x}",
        "container_image": f"img-{CG_A}:1",
    }
    assert h.enricher.stats.records == 1
    assert h.enricher.stats.held_lines == 0
    assert h.unknown_calls == 0
    assert not h.enricher.holding


def test_known_container_is_encoded_at_once_otel() -> None:
    h = Harness(fmt=RecordFormat(schema="otel", time_key="ts", timestamp_key_es=True))
    h.table[CG_B] = known(CG_B)
    [record] = h.process(line(CG_B, b"x", 5 * SECOND, STDERR))
    assert record["ts"] == record["@timestamp"] == format_rfc3339_ns(5 * SECOND + OFFSET)
    assert record["stream"] == "stderr"
    assert record["k8s.pod.name"] == f"pod-{CG_B}"
    assert record["k8s.namespace.name"] == f"ns-{CG_B}"
    assert record["container.id"] == f"{CG_B:064x}"
    assert record["k8s.replicaset.name"] == f"rs-{CG_B}"
    assert record["k8s.pod.label.app"] == f"app-{CG_B}"


def test_batch_of_several_known_containers_keeps_order_and_metadata() -> None:
    h = Harness()
    for cg in (CG_A, CG_B, CG_C):
        h.table[cg] = known(cg)
    order = [(cg, f"{cg}-{i}") for i in range(30) for cg in (CG_C, CG_A, CG_B)]
    records = h.process(*(line(cg, m.encode(), i) for i, (cg, m) in enumerate(order)))
    assert messages(records) == [m for _cg, m in order]
    assert [cgroup_of(r) for r in records] == [cg for cg, _m in order]
    assert [r["kubernetes"]["pod_name"] for r in records] == [f"pod-{cg}" for cg, _m in order]
    assert h.enricher.stats.records == 90


def test_process_appends_to_out() -> None:
    h = Harness()
    h.table[CG_A] = known(CG_A)
    out = [b"before"]
    h.enricher.process([line(CG_A, b"x")], out)
    assert out[0] == b"before" and len(out) == 2
    assert h.enricher.stats.records == 1


@pytest.mark.parametrize(
    ("capture_stdout", "capture_stderr"), [(True, False), (False, True), (False, False)]
)
def test_stream_flags_of_a_known_container(capture_stdout: bool, capture_stderr: bool) -> None:
    h = Harness()
    h.table[CG_A] = known(CG_A, capture_stdout, capture_stderr)
    fed = [line(CG_A, f"m{i}".encode(), i, STDOUT if i % 3 else STDERR) for i in range(12)]
    records = h.process(*fed)
    keep = {STDOUT: capture_stdout, STDERR: capture_stderr}
    assert messages(records) == [ln[4].decode() for ln in fed if keep[ln[2]]]
    assert h.enricher.stats.records == len(records)
    assert not h.enricher.holding


# --- holding unknown containers ------------------------------------------------------------


def test_unknown_cgroup_lines_are_held_and_on_unknown_called_once_per_cgroup() -> None:
    h = Harness()
    h.table[CG_C] = known(CG_C)
    out = h.process(line(CG_A, b"a1", 1), line(CG_C, b"c1", 2), line(CG_B, b"b1", 3))
    out += h.process(line(CG_A, b"a2", 4), line(CG_B, b"b2", 5), line(CG_A, b"a3", 6))
    assert messages(out) == ["c1"]  # the known one is not delayed by the others
    assert h.unknown_calls == 2
    assert h.enricher.holding
    assert h.enricher.stats.held_lines == 5
    assert h.enricher.held_bytes == 5 * cost(b"a1")
    # Not known yet, not timed out: release keeps holding and does not call on_unknown again.
    assert h.release(now_ns=10) == []
    assert h.unknown_calls == 2
    assert h.enricher.held_bytes == 5 * cost(b"a1")
    assert h.enricher.stats.released_lines == 0


def test_release_ships_held_lines_in_order_once_known() -> None:
    h = Harness()
    h.process(line(CG_A, b"a1", 1), line(CG_B, b"b1", 2))
    h.process(line(CG_A, b"a2", 3, STDERR), line(CG_A, b"a3", 4, partial=True))
    h.table[CG_A] = known(CG_A)
    records = h.release(now_ns=5)
    assert messages(records) == ["a1", "a2", "a3"]
    assert [r["stream"] for r in records] == ["stdout", "stderr", "stdout"]
    assert [r["partial"] for r in records] == [False, False, True]
    assert [r["time"] for r in records] == [format_rfc3339_ns(t + OFFSET) for t in (1, 3, 4)]
    assert {cgroup_of(r) for r in records} == {CG_A}
    stats = h.enricher.stats
    assert (stats.released_lines, stats.records, stats.excluded_lines) == (3, 3, 0)
    assert h.enricher.held_bytes == cost(b"b1")  # b1 is still held
    assert h.enricher.holding
    h.table[CG_B] = known(CG_B)
    assert messages(h.release(now_ns=6)) == ["b1"]
    assert h.enricher.held_bytes == 0
    assert not h.enricher.holding
    # Known now: the next lines go out at once.
    assert messages(h.process(line(CG_A, b"a4", 7), line(CG_B, b"b2", 8))) == ["a4", "b2"]
    assert h.unknown_calls == 2


def test_lines_after_the_hold_wait_for_the_release() -> None:
    """Once a cgroup has held lines, its later lines are held too, even if the lookup knows
    it already: the release ships them after the earlier ones."""
    h = Harness()
    h.process(line(CG_A, b"1"), line(CG_A, b"2"))
    h.table[CG_A] = known(CG_A)
    h.table[CG_B] = known(CG_B)
    out = h.process(line(CG_A, b"3"), line(CG_B, b"b"), line(CG_A, b"4"))
    assert messages(out) == ["b"]
    assert h.unknown_calls == 1
    out = h.release()
    assert messages(out) == ["1", "2", "3", "4"]
    assert messages(h.process(line(CG_A, b"5"))) == ["5"]


@pytest.mark.parametrize(
    ("capture_stdout", "capture_stderr"),
    [(True, True), (True, False), (False, True), (False, False)],
)
def test_held_lines_follow_the_stream_flags(capture_stdout: bool, capture_stderr: bool) -> None:
    h = Harness()
    fed = [line(CG_A, f"m{i}".encode(), i, STDERR if i % 4 == 1 else STDOUT) for i in range(10)]
    h.process(*fed)
    h.table[CG_A] = known(CG_A, capture_stdout, capture_stderr)
    records = h.release()
    keep = {STDOUT: capture_stdout, STDERR: capture_stderr}
    expected = [ln for ln in fed if keep[ln[2]]]
    assert messages(records) == [ln[4].decode() for ln in expected]
    stats = h.enricher.stats
    assert stats.released_lines == len(expected)
    assert stats.excluded_lines == len(fed) - len(expected)
    assert stats.records == len(expected)
    assert h.enricher.held_bytes == 0
    assert not h.enricher.holding
    # Later lines follow the same flags, without being counted as excluded held lines.
    later = h.process(line(CG_A, b"o", 20, STDOUT), line(CG_A, b"e", 21, STDERR))
    assert messages(later) == [m for m, k in (("o", capture_stdout), ("e", capture_stderr)) if k]
    assert stats.excluded_lines == len(fed) - len(expected)


def cost(message: bytes) -> int:
    """What a held line counts against hold_max_bytes."""
    return len(message) + O


# --- bounds --------------------------------------------------------------------------------


def test_hold_is_bounded_in_bytes_across_cgroups() -> None:
    h = Harness(hold_max_bytes=100 + 3 * O)
    h.table[CG_C] = known(CG_C)
    a1, b1, a2, b2, a3 = b"a" * 40, b"b" * 40, b"A" * 40, b"B" * 10, b"x" * 30
    out = h.process(
        line(CG_A, a1),  # 40 + O
        line(CG_B, b1),  # 80 + 2 O
        line(CG_A, a2),  # 120 + 3 O > 100 + 3 O: dropped
        line(CG_C, b"known lines are never bounded by the hold" * 10),
        line(CG_B, b2),  # 90 + 3 O
        line(CG_A, a3),  # 120 + 4 O: dropped
    )
    assert messages(out) == ["known lines are never bounded by the hold" * 10]
    stats = h.enricher.stats
    assert stats.dropped_hold_full == 2
    assert stats.held_lines == 3
    assert 90 + 3 * O <= h.enricher.held_bytes <= 100 + 3 * O
    h.table[CG_A] = known(CG_A)
    h.table[CG_B] = known(CG_B)
    released = h.release()
    assert [(cgroup_of(r), r["message"].encode()) for r in released] == [
        (CG_A, a1),
        (CG_B, b1),
        (CG_B, b2),
    ]
    assert stats.released_lines == 3
    assert h.enricher.held_bytes == 0


def test_a_line_larger_than_the_bound_is_dropped_even_when_the_hold_is_empty() -> None:
    h = Harness(hold_max_bytes=100 + O)
    h.process(line(CG_A, b"z" * 101), line(CG_A, b"small"))
    assert h.enricher.stats.dropped_hold_full == 1
    h.table[CG_A] = known(CG_A)
    assert messages(h.release()) == ["small"]


def test_hold_bound_also_bounds_the_number_of_held_lines() -> None:
    h = Harness(hold_max_bytes=1000)
    h.process(*(line(CG_A, b"", ts=i) for i in range(5000)))
    assert h.enricher.stats.held_lines <= 1000
    assert h.enricher.stats.dropped_hold_full >= 4000


def test_hold_has_room_again_after_release() -> None:
    h = Harness(hold_max_bytes=6 + O)
    h.process(line(CG_A, b"123456"), line(CG_B, b"7"))
    assert h.enricher.stats.dropped_hold_full == 1
    h.table[CG_A] = known(CG_A)
    assert messages(h.release()) == ["123456"]
    assert h.enricher.held_bytes == 0
    h.process(line(CG_B, b"abcdef"))
    assert h.enricher.held_bytes == cost(b"abcdef")
    assert h.enricher.stats.dropped_hold_full == 1
    h.table[CG_B] = known(CG_B)
    assert messages(h.release()) == ["abcdef"]


def test_zero_hold_bytes_drops_every_unknown_line() -> None:
    h = Harness(hold_max_bytes=0)
    h.process(*(line(CG_A, b"x") for _ in range(5)))
    assert h.enricher.stats.dropped_hold_full == 5
    assert h.enricher.held_bytes == 0
    h.table[CG_A] = known(CG_A)
    assert h.release() == []


def test_hold_timeout_drops_and_counts_unresolved_lines() -> None:
    h = Harness(hold_timeout_ns=1000)
    h.process(line(CG_A, b"a1", ts=100), line(CG_B, b"b1", ts=600))
    h.process(line(CG_A, b"a2", ts=900))
    assert h.release(now_ns=1100) == []  # exactly the timeout: kept
    assert h.enricher.stats.dropped_unresolved == 0
    assert h.release(now_ns=1101) == []  # A's first line waited too long: all of A goes
    stats = h.enricher.stats
    assert stats.dropped_unresolved == 2
    assert h.enricher.held_bytes == cost(b"b1")  # B's line stays
    assert h.release(now_ns=1601) == []
    assert stats.dropped_unresolved == 3
    assert h.enricher.held_bytes == 0
    assert not h.enricher.holding
    assert stats.released_lines == 0
    # The cgroup writes again: held again, and discovery is asked again.
    calls = h.unknown_calls
    h.process(line(CG_A, b"a3", ts=2000))
    assert h.unknown_calls == calls + 1
    h.table[CG_A] = known(CG_A)
    assert messages(h.release(now_ns=2001)) == ["a3"]


def test_resolution_wins_over_the_timeout() -> None:
    h = Harness(hold_timeout_ns=1000)
    h.process(line(CG_A, b"late but known", ts=0))
    h.table[CG_A] = known(CG_A)
    assert messages(h.release(now_ns=10 * SECOND)) == ["late but known"]
    assert h.enricher.stats.dropped_unresolved == 0


def test_final_release_drops_everything_unresolved() -> None:
    h = Harness()
    h.process(line(CG_A, b"a", ts=5), line(CG_B, b"b1", ts=5), line(CG_C, b"c", ts=5))
    h.process(line(CG_B, b"b2", ts=6))
    h.table[CG_B] = known(CG_B)
    records = h.release(now_ns=7, final=True)  # far from the timeout
    assert messages(records) == ["b1", "b2"]
    stats = h.enricher.stats
    assert stats.dropped_unresolved == 2
    assert stats.released_lines == 2
    assert h.enricher.held_bytes == 0
    assert not h.enricher.holding


def test_forget_makes_the_next_line_wait_for_fresh_metadata() -> None:
    h = Harness()
    h.table[CG_A] = known(CG_A, pod_name="old")
    assert h.process(line(CG_A, b"1"))[0]["kubernetes"]["pod_name"] == "old"
    # Discovery forgets the container: the enricher must not keep using the old metadata.
    del h.table[CG_A]
    h.enricher.forget(CG_A)
    assert h.process(line(CG_A, b"2")) == []
    assert h.unknown_calls == 1
    assert h.enricher.holding
    h.table[CG_A] = known(CG_A, pod_name="new")
    [record] = h.release()
    assert (record["message"], record["kubernetes"]["pod_name"]) == ("2", "new")
    # Forgetting a cgroup that is known again re-reads its metadata.
    h.table[CG_A] = known(CG_A, False, True, pod_name="newer")
    h.enricher.forget(CG_A)
    assert h.process(line(CG_A, b"3"), line(CG_A, b"4", stream=STDERR)) == [
        {
            **record,
            "message": "4",
            "stream": "stderr",
            "kubernetes": {**record["kubernetes"], "pod_name": "newer"},
        }
    ]
    h.enricher.forget(99)  # unknown cgroup: no error


# --- property: per-cgroup order and completeness -------------------------------------------

CGROUPS = (11, 22, 33, 44)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[int, tuple[bool, bool]], set[int], list[Any]]:
    """Capture flags per cgroup, the cgroups known from the start, and a list of operations:
    ("lines", [(cg, stream, partial)]), ("resolve", cg), ("forget", cg), ("release",)."""
    flags = {cg: (draw(st.booleans()), draw(st.booleans())) for cg in CGROUPS}
    initially = set(draw(st.lists(st.sampled_from(CGROUPS), unique=True)))
    line_spec = st.tuples(
        st.sampled_from(CGROUPS), st.sampled_from([STDOUT, STDERR]), st.booleans()
    )
    op = st.one_of(
        st.tuples(st.just("lines"), st.lists(line_spec, max_size=8)),
        st.tuples(st.just("resolve"), st.sampled_from(CGROUPS)),
        st.tuples(st.just("forget"), st.sampled_from(CGROUPS)),
        st.tuples(st.just("release")),
    )
    return flags, initially, draw(st.lists(op, max_size=40))


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_every_line_ships_once_in_order_per_cgroup(
    scenario: tuple[dict[int, tuple[bool, bool]], set[int], list[Any]],
) -> None:
    flags, initially, ops = scenario
    h = Harness()
    for cg in initially:
        h.table[cg] = known(cg, *flags[cg])
    fed: dict[int, list[tuple[str, str, bool]]] = {cg: [] for cg in CGROUPS}
    shipped: list[dict[str, Any]] = []
    n = 0
    for op in ops:
        if op[0] == "lines":
            batch = []
            for cg, stream, partial in op[1]:
                n += 1
                message = f"{cg}:{n}"
                fed[cg].append((message, "stdout" if stream == STDOUT else "stderr", partial))
                batch.append(line(cg, message.encode(), n, stream, partial))
            shipped += h.process(*batch)
        elif op[0] == "resolve":
            h.table[op[1]] = known(op[1], *flags[op[1]])
        elif op[0] == "forget":
            h.enricher.forget(op[1])  # the lookup still knows it: nothing may be lost
        else:
            shipped += h.release(now_ns=n)
    for cg in CGROUPS:  # everything gets resolved in the end
        h.table[cg] = known(cg, *flags[cg])
    shipped += h.release(now_ns=n, final=True)

    stream_on = {cg: {"stdout": f[0], "stderr": f[1]} for cg, f in flags.items()}
    for cg in CGROUPS:
        got = [(r["message"], r["stream"], r["partial"]) for r in shipped if cgroup_of(r) == cg]
        assert got == [x for x in fed[cg] if stream_on[cg][x[1]]], cg
    # Timestamps are the lines' own, whatever the delay.
    for r in shipped:
        assert r["time"] == format_rfc3339_ns(int(r["message"].split(":")[1]) + OFFSET)
    stats = h.enricher.stats
    assert stats.records == len(shipped)
    assert stats.dropped_hold_full == stats.dropped_unresolved == 0
    assert stats.released_lines + stats.excluded_lines == stats.held_lines
    assert h.enricher.held_bytes == 0
    assert not h.enricher.holding
    # Cgroups known from the start and never forgotten never triggered on_unknown.
    if not any(op[0] in ("forget",) for op in ops) and set(initially) == set(CGROUPS):
        assert h.unknown_calls == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(CGROUPS), st.binary(min_size=1, max_size=30)), max_size=40),
    st.integers(min_value=0, max_value=300 + 4 * O),
)
def test_held_bytes_accounting_under_a_bound(lines: list[tuple[int, bytes]], bound: int) -> None:
    """With any bound: every line is held or counted as dropped, the held messages never
    exceed the bound, a line is not dropped while there is plenty of room, what was held
    ships in order once known, and held_bytes returns to 0."""
    h = Harness(hold_max_bytes=bound)
    stats = h.enricher.stats
    kept: dict[int, list[bytes]] = {cg: [] for cg in CGROUPS}
    kept_bytes = kept_lines = 0
    for cg, message in lines:
        held_before, dropped_before = stats.held_lines, stats.dropped_hold_full
        h.process(line(cg, message))
        held = stats.held_lines - held_before
        assert held + stats.dropped_hold_full - dropped_before == 1
        if held:
            kept[cg].append(message)
            kept_bytes += cost(message)
            kept_lines += 1
        else:  # only a lack of room explains a drop
            assert kept_bytes + cost(message) > bound
        assert kept_bytes <= bound
        assert 0 <= h.enricher.held_bytes <= bound
    assert h.unknown_calls == sum(1 for cg in CGROUPS if kept[cg])
    for cg in CGROUPS:
        h.table[cg] = known(cg)
    records = h.release()
    for cg in CGROUPS:
        got = [r["message"] for r in records if cgroup_of(r) == cg]
        assert got == [m.decode("utf-8", "replace") for m in kept[cg]]
    assert stats.released_lines == kept_lines
    assert h.enricher.held_bytes == 0


def test_clock_steps_show_in_the_next_batch() -> None:
    """Unix time = boot time + the offset read per batch: an NTP step or a VM resume
    after start moves the records' time (issue 8, item 4)."""
    h = Harness()
    h.table[CG_A] = known(CG_A)
    [before] = h.process(line(CG_A, b"a", 7 * SECOND))
    h.offset = OFFSET + 3600 * SECOND  # the wall clock jumped an hour ahead
    [after] = h.process(line(CG_A, b"b", 8 * SECOND))
    assert before["time"] == format_rfc3339_ns(7 * SECOND + OFFSET)
    assert after["time"] == format_rfc3339_ns(8 * SECOND + OFFSET + 3600 * SECOND)


def test_one_origin_per_container_until_forgotten() -> None:
    h = Harness()
    h.table[CG_A] = known(CG_A)
    out: list[Enriched] = []
    h.enricher.process([line(CG_A, b"a"), line(CG_A, b"b")], out)
    assert out[0][0] is out[1][0]
    assert out[0][0].cgroup_id == CG_A and out[0][0].meta == h.table[CG_A].meta
    h.table[CG_A] = known(CG_A, labels={"app": "new"})
    h.enricher.forget(CG_A)
    h.enricher.process([line(CG_A, b"c")], out)
    assert out[2][0] is not out[0][0]
    assert out[2][0].meta.labels == {"app": "new"}


def test_on_unknown_names_the_cgroup_once_per_held_episode() -> None:
    h = Harness()
    h.process(line(CG_A, b"a1"), line(CG_B, b"b1"), line(CG_A, b"a2"))
    assert h.unknown_cgroups == [CG_A, CG_B]
