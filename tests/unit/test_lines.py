"""Tests of agent.lines.LineAssembler (line reassembly per (pid, stream))."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.lines import Line, LineAssembler

Key = tuple[int, int]


def reference(stream: bytes, max_line: int) -> list[tuple[bytes, bool]]:
    """What the whole byte stream of one key must become (no break/idle/eviction flushes).

    Every line of L bytes is L // max_line partial pieces of max_line bytes, then a
    non-partial piece of L % max_line bytes; an unterminated tail is cut the same way and its
    last piece (if any) is partial too.
    """
    res: list[tuple[bytes, bool]] = []
    *complete, tail = stream.split(b"\n")
    for line in complete:
        off = 0
        while len(line) - off >= max_line:
            res.append((line[off : off + max_line], True))
            off += max_line
        res.append((line[off:], False))
    for off in range(0, len(tail), max_line):
        res.append((tail[off : off + max_line], True))
    return res


# --------------------------------------------------------------------------- model checking


@dataclass
class KeyModel:
    data: bytearray = field(default_factory=bytearray)  # every byte fed for the key
    owner: list[int] = field(default_factory=list)  # feed id that contributed each byte
    emitted: int = 0  # bytes of `data` covered by emitted segments
    last_feed_ts: int = -1


class Checker:
    """Drives a LineAssembler and checks every emitted line against a byte-level model."""

    def __init__(self, max_line: int, idle: int, max_streams: int) -> None:
        self.asm = LineAssembler(max_line=max_line, idle_timeout_ns=idle, max_streams=max_streams)
        self.max_line = max_line
        self.max_streams = max_streams
        self.keys: dict[Key, KeyModel] = {}
        self.feeds: dict[int, tuple[int, object]] = {}  # feed id -> (ts, tag)
        self.clock = 1000

    def km(self, key: Key) -> KeyModel:
        return self.keys.setdefault(key, KeyModel())

    def pending(self, key: Key) -> int:
        m = self.keys.get(key)
        return 0 if m is None else len(m.data) - m.emitted

    def consume(self, out: list[Line]) -> None:
        for ts, pid, stream, tag, msg, partial in out:
            m = self.keys[(pid, stream)]
            assert len(msg) <= self.max_line
            if partial:
                assert msg, "a partial line is never empty"
            else:
                assert len(msg) < self.max_line, "non-partial lines are < max_line"
            seg = msg if partial else msg + b"\n"
            start = m.emitted
            assert bytes(m.data[start : start + len(seg)]) == seg, "bytes out of order/joined"
            feed_ts, feed_tag = self.feeds[m.owner[start]]
            assert ts == feed_ts
            assert tag is feed_tag
            m.emitted += len(seg)

    def check_state(self) -> None:
        live = {k for k in self.keys if self.pending(k)}
        for k in self.keys:
            assert self.pending(k) < self.max_line, "pending reached max_line unflushed"
        assert self.asm.pending_streams == len(live)
        assert self.asm.pending_streams <= self.max_streams
        assert self.asm.pending_bytes == sum(self.pending(k) for k in self.keys)
        # White-box: the per-pid index must not keep pids that have nothing pending (leak).
        assert self.asm._pids == {
            pid: {s for p, s in live if p == pid} for pid in {p for p, _ in live}
        }

    def feed(self, key: Key, data: bytes) -> None:
        self.clock += 1
        fid = len(self.feeds)
        tag = ("tag", fid)  # a distinct object per feed, checked with `is`
        self.feeds[fid] = (self.clock, tag)
        m = self.km(key)
        before = {k: self.pending(k) for k in self.keys}  # before this feed's bytes
        m.data += data
        m.owner += [fid] * len(data)
        if data:
            m.last_feed_ts = self.clock
        out: list[Line] = []
        self.asm.feed(key[0], key[1], self.clock, tag, data, out)
        self.consume(out)
        if not data:
            assert out == []
        # Other keys are untouched, except the least recently fed one when a new pending
        # key would exceed max_streams: it is evicted (flushed whole).
        changed = {k for k in self.keys if k != key and self.pending(k) != before[k]}
        live_before = [k for k, n in before.items() if n]
        if not before[key] and self.pending(key) and len(live_before) >= self.max_streams:
            lru = min(live_before, key=lambda k: self.keys[k].last_feed_ts)
            assert changed == {lru}
            assert self.pending(lru) == 0
        else:
            assert changed == set()

    def break_line(self, key: Key) -> None:
        before = self.pending(key)
        out: list[Line] = []
        self.asm.break_line(key[0], key[1], out)
        assert len(out) == (1 if before else 0)
        assert all(line[5] and (line[1], line[2]) == key for line in out)
        self.consume(out)
        assert self.pending(key) == 0

    def end_process(self, pid: int) -> None:
        others = {k: self.pending(k) for k in self.keys if k[0] != pid}
        out: list[Line] = []
        self.asm.end_process(pid, out)
        assert all(line[5] and line[1] == pid for line in out)
        self.consume(out)
        assert all(self.pending(k) == 0 for k in self.keys if k[0] == pid)
        assert {k: self.pending(k) for k in self.keys if k[0] != pid} == others

    def flush_idle(self, advance: int, idle: int) -> None:
        self.clock += advance
        now = self.clock
        out: list[Line] = []
        expected = {
            k: (0 if now - self.keys[k].last_feed_ts > idle else self.pending(k)) for k in self.keys
        }
        self.asm.flush_idle(now, out)
        assert all(line[5] for line in out)
        self.consume(out)
        assert {k: self.pending(k) for k in self.keys} == expected

    def finish(self) -> None:
        """flush_all: afterwards every byte fed so far is covered by emitted lines."""
        out: list[Line] = []
        self.asm.flush_all(out)
        assert all(line[5] for line in out)
        self.consume(out)
        for m in self.keys.values():
            assert m.emitted == len(m.data)
        assert self.asm.pending_streams == 0
        assert self.asm.pending_bytes == 0


PIDS = [10, 11, 12]
STREAMS = [1, 2, 7]  # 7: streams are not hard-coded


def chunks(max_line: int) -> st.SearchStrategy[bytes]:
    """Chunks of every flavour, including lengths around multiples of max_line."""
    near_multiple = st.tuples(st.integers(0, 3), st.integers(-2, 2)).map(
        lambda t: max(0, t[0] * max_line + t[1])
    )
    return st.one_of(
        st.just(b""),
        st.binary(max_size=40),
        # newline-heavy
        st.lists(st.sampled_from([b"\n", b"\n", b"a", b"bc"]), max_size=20).map(b"".join),
        # short runs without newline, up to max_line: pending lines meet the limit exactly
        st.integers(1, max_line).map(lambda n: b"s" * n),
        # no newline at all
        st.lists(st.sampled_from([b"x", b"yz", b"\r", b"\x00"]), max_size=30).map(b"".join),
        # runs of about k * max_line bytes, with or without newline around them
        st.tuples(st.booleans(), near_multiple, st.booleans(), near_multiple).map(
            lambda t: b"\n" * t[0] + b"L" * t[1] + b"\n" * t[2] + b"M" * t[3]
        ),
    )


Op = tuple[str, int, int, bytes]  # (kind, pid or advance, stream, data)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, int, list[Op]]:
    max_line = draw(st.one_of(st.integers(1, 8), st.integers(9, 64)))
    idle = draw(st.integers(0, 40))  # the clock moves 1 per feed, 0..8 per idle op
    max_streams = draw(st.one_of(st.integers(1, 5), st.just(1000)))
    # Few keys most of the time, so that feeds of one key meet pending bytes often.
    n_pids = draw(st.integers(1, len(PIDS)))
    n_streams = draw(st.integers(1, len(STREAMS)))
    pid_st = st.sampled_from(PIDS[:n_pids])
    stream_st = st.sampled_from(STREAMS[:n_streams])
    # Mostly feeds (12 in 16): flushes are rarer, so that pending lines get to grow.
    # (st.one_of would not weight repeated branches: it deduplicates them.)
    kinds = ["feed"] * 12 + ["break", "end", "idle", "all"]
    op = st.tuples(
        st.sampled_from(kinds), pid_st, stream_st, chunks(max_line), st.integers(0, 8)
    ).map(lambda t: (t[0], t[4] if t[0] == "idle" else t[1], t[2], t[3]))
    return max_line, idle, max_streams, draw(st.lists(op, min_size=15, max_size=100))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_random_interleavings_keep_invariant(scenario: tuple[int, int, int, list[Op]]) -> None:
    max_line, idle, max_streams, ops = scenario
    c = Checker(max_line, idle, max_streams)
    for kind, a, b, data in ops:
        if kind == "feed":
            c.feed((a, b), data)
        elif kind == "break":
            c.break_line((a, b))
        elif kind == "end":
            c.end_process(a)
        elif kind == "all":
            c.finish()
        else:
            c.flush_idle(a, idle)
        c.check_state()
    c.finish()


@settings(max_examples=300, deadline=None)
@given(
    max_line=st.one_of(st.integers(1, 8), st.integers(9, 40)),
    stream=st.lists(st.sampled_from([b"\n", b"a", b"bcd", b"efghijklmnop"]), max_size=40).map(
        b"".join
    ),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_output_does_not_depend_on_chunking(max_line: int, stream: bytes, cuts: list[int]) -> None:
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    asm = LineAssembler(max_line=max_line)
    out: list[Line] = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        asm.feed(5, 1, i, None, stream[a:b], out)
    asm.flush_all(out)
    assert [(m, p) for *_, m, p in out] == reference(stream, max_line)


# --------------------------------------------------------------------------- examples


def test_line_split_across_three_feeds() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.feed(1, 1, 100, "t1", b"hel", out)
    asm.feed(1, 1, 200, "t2", b"lo wo", out)
    assert out == []
    assert asm.pending_bytes == 8
    asm.feed(1, 1, 300, "t3", b"rld\nnext", out)
    assert out == [(100, 1, 1, "t1", b"hello world", False)]
    out.clear()
    asm.flush_all(out)
    assert out == [(300, 1, 1, "t3", b"next", True)]


def test_fast_path_many_lines_in_one_chunk() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    tag = object()
    asm.feed(3, 2, 7, tag, b"a\n\nbb\nccc\n", out)
    assert out == [(7, 3, 2, tag, m, False) for m in (b"a", b"", b"bb", b"ccc")]
    assert all(line[3] is tag for line in out)
    assert asm.pending_streams == 0


def test_two_pids_interleaved_partials_never_join() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.feed(1, 1, 1, "A", b"from-1 ", out)
    asm.feed(2, 1, 2, "B", b"from-2 ", out)
    asm.feed(1, 2, 3, "C", b"err-1 ", out)
    asm.feed(2, 1, 4, "B", b"end2\n", out)
    asm.feed(1, 1, 5, "A", b"end1\n", out)
    asm.feed(1, 2, 6, "C", b"end-err\n", out)
    assert out == [
        (2, 2, 1, "B", b"from-2 end2", False),
        (1, 1, 1, "A", b"from-1 end1", False),
        (3, 1, 2, "C", b"err-1 end-err", False),
    ]
    assert asm.pending_streams == 0


def test_end_process_flushes_only_that_pid_as_partial() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"out of 1", out)
    asm.feed(1, 2, 2, "b", b"err of 1", out)
    asm.feed(1, 9, 3, "c", b"odd stream", out)
    asm.feed(2, 1, 4, "d", b"out of 2", out)
    asm.end_process(1, out)
    assert sorted(out) == sorted(
        [
            (1, 1, 1, "a", b"out of 1", True),
            (2, 1, 2, "b", b"err of 1", True),
            (3, 1, 9, "c", b"odd stream", True),
        ]
    )
    assert asm.pending_streams == 1
    assert asm.pending_bytes == len(b"out of 2")
    out.clear()
    asm.end_process(1, out)  # unknown / already ended pid: no-op
    assert out == []
    asm.feed(2, 1, 5, "e", b"!\n", out)
    assert out == [(4, 2, 1, "d", b"out of 2!", False)]


def test_break_line_emits_partial_and_forgets() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"before loss", out)
    asm.feed(1, 2, 2, "b", b"other", out)
    asm.break_line(1, 1, out)
    assert out == [(1, 1, 1, "a", b"before loss", True)]
    asm.break_line(1, 1, out)  # nothing pending: no empty line
    asm.break_line(3, 1, out)
    assert len(out) == 1
    asm.feed(1, 1, 3, "c", b"after loss\n", out)
    assert out[1] == (3, 1, 1, "c", b"after loss", False)
    assert asm.pending_streams == 1  # (1, 2) untouched


def test_flush_idle_respects_timeout_and_keeps_fresh() -> None:
    asm = LineAssembler(idle_timeout_ns=1000)
    out: list[Line] = []
    asm.feed(1, 1, 100, "old", b"old", out)
    asm.feed(2, 1, 500, "mid", b"mid", out)
    asm.feed(3, 1, 900, "new", b"new", out)
    asm.feed(1, 1, 950, "old2", b"er", out)  # refreshes (1, 1); its first byte stays at 100
    asm.flush_idle(1500, out)  # mid idle for exactly 1000: not *more* than the timeout
    assert out == []
    asm.flush_idle(1501, out)
    assert out == [(500, 2, 1, "mid", b"mid", True)]
    asm.flush_idle(1951, out)
    assert out[1:] == [
        (900, 3, 1, "new", b"new", True),
        (100, 1, 1, "old", b"older", True),
    ]
    assert asm.pending_streams == 0
    asm.flush_idle(10**12, out)
    assert len(out) == 3


@pytest.mark.parametrize(
    ("second", "emitted", "left"),
    [
        (b"b", [], (0, "f0", b"ab")),  # the pending line grows
        (b"b\nc", [(0, "f0", b"ab", False)], (900, "f1", b"c")),  # ends, a new one starts
        (b"bcdef", [(0, "f0", b"abcd", True)], (900, "f1", b"ef")),  # reaches max_line
    ],
)
def test_idle_clock_restarts_on_every_feed(
    second: bytes, emitted: list[tuple[int, str, bytes, bool]], left: tuple[int, str, bytes]
) -> None:
    asm = LineAssembler(max_line=4, idle_timeout_ns=1000)
    out: list[Line] = []
    asm.feed(1, 1, 0, "f0", b"a", out)
    asm.feed(1, 1, 900, "f1", second, out)
    assert [(ts, tag, m, partial) for ts, _, _, tag, m, partial in out] == emitted
    out.clear()
    asm.flush_idle(1900, out)  # last fed 1000 ns ago: not idle yet
    assert out == []
    asm.flush_idle(1901, out)
    assert out == [(left[0], 1, 1, left[1], left[2], True)]


def test_max_streams_evicts_least_recently_fed() -> None:
    asm = LineAssembler(max_streams=2)
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"a", out)
    asm.feed(2, 1, 2, "b", b"b", out)
    asm.feed(1, 1, 3, "a", b"A", out)  # (1, 1) is now the most recently fed
    assert out == []
    asm.feed(3, 1, 4, "c", b"c", out)
    assert out == [(2, 2, 1, "b", b"b", True)]
    assert asm.pending_streams == 2
    asm.feed(4, 1, 5, "d", b"d", out)
    assert out[1] == (1, 1, 1, "a", b"aA", True)
    asm.feed(3, 1, 6, "x", b"\n", out)
    assert out[2] == (4, 3, 1, "c", b"c", False)
    assert asm.pending_streams == 1


def test_huge_line_without_newline_is_cut_in_max_line_pieces() -> None:
    asm = LineAssembler(max_line=16384)
    out: list[Line] = []
    data = bytes(range(256)) * 4096  # 1 MiB, no newline (byte 10 replaced below)
    data = data.replace(b"\n", b"N")
    asm.feed(7, 1, 42, "t", data, out)
    assert len(out) == 64
    assert all(line[5] and len(line[4]) == 16384 for line in out)
    assert b"".join(line[4] for line in out) == data
    assert asm.pending_streams == 0
    asm.feed(7, 1, 43, "u", b"\n", out)  # 1 MiB is a multiple: the newline ends it alone
    assert out[-1] == (43, 7, 1, "u", b"", False)


def test_exact_multiple_of_max_line_ends_with_empty_line() -> None:
    asm = LineAssembler(max_line=4)
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"abcd\nefghijklm\nxyz\n", out)
    assert [(m, p) for *_, m, p in out] == [
        (b"abcd", True),
        (b"", False),
        (b"efgh", True),
        (b"ijkl", True),
        (b"m", False),
        (b"xyz", False),
    ]


def test_pending_reaching_max_line_is_emitted_at_once() -> None:
    asm = LineAssembler(max_line=4)
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"ab", out)
    asm.feed(1, 1, 2, "b", b"cd", out)  # 4 bytes, no newline yet: emitted now
    assert out == [(1, 1, 1, "a", b"abcd", True)]
    assert (asm.pending_streams, asm.pending_bytes) == (0, 0)
    asm.feed(1, 1, 3, "c", b"\n", out)
    assert out[1] == (3, 1, 1, "c", b"", False)


def test_pending_completed_to_exactly_max_line() -> None:
    asm = LineAssembler(max_line=4)
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"ab", out)
    asm.feed(1, 1, 2, "b", b"cd\nef", out)
    assert out == [(1, 1, 1, "a", b"abcd", True), (2, 1, 1, "b", b"", False)]
    assert asm.pending_bytes == 2


def test_long_line_completing_pending_attributes_pieces() -> None:
    asm = LineAssembler(max_line=4)
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"ab", out)
    asm.feed(1, 1, 2, "b", b"cdefghi\nj", out)
    assert out == [
        (1, 1, 1, "a", b"abcd", True),
        (2, 1, 1, "b", b"efgh", True),
        (2, 1, 1, "b", b"i", False),
    ]
    assert asm.pending_bytes == 1


def test_pending_counters_follow_state_and_return_to_zero() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    assert (asm.pending_streams, asm.pending_bytes) == (0, 0)
    asm.feed(1, 1, 1, None, b"abc", out)
    asm.feed(1, 2, 1, None, b"de", out)
    asm.feed(2, 1, 1, None, b"full\n", out)  # ends with newline: no entry kept
    assert (asm.pending_streams, asm.pending_bytes) == (2, 5)
    asm.feed(1, 1, 2, None, b"", out)  # empty data: no-op
    assert (asm.pending_streams, asm.pending_bytes) == (2, 5)
    asm.feed(1, 1, 2, None, b"\nfg", out)
    assert (asm.pending_streams, asm.pending_bytes) == (2, 4)
    asm.feed(1, 1, 3, None, b"\n", out)
    assert (asm.pending_streams, asm.pending_bytes) == (1, 2)
    asm.flush_all(out)
    assert (asm.pending_streams, asm.pending_bytes) == (0, 0)
    assert [m for *_, m, _ in out] == [b"full", b"abc", b"fg", b"de"]


def test_flush_all_emits_partials_and_clears() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"x", out)
    asm.feed(2, 2, 2, "b", b"y", out)
    asm.flush_all(out)
    assert out == [(1, 1, 1, "a", b"x", True), (2, 2, 2, "b", b"y", True)]
    asm.flush_all(out)
    asm.end_process(1, out)
    assert len(out) == 2


@pytest.mark.parametrize("kwargs", [{"max_line": 0}, {"idle_timeout_ns": -1}, {"max_streams": 0}])
def test_rejects_bad_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        LineAssembler(**kwargs)
