"""Tests of agent.lines.LineAssembler (line reassembly per (pid, stream))."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.capture.probe import CONSTANTS
from agent.lines import Line, LineAssembler

Key = tuple[int, int]


def reference(stream: bytes, max_line: int) -> list[tuple[bytes, bool]]:
    """What the whole byte stream of one key must become (no break/idle/eviction flushes).

    Every line is cut into partial pieces of max_line bytes (a little less where that
    would cut a UTF-8 character, see char_cut) while max_line bytes or more are left, then
    a non-partial piece of what is left; an unterminated tail is cut the same way and its
    last piece (if any) is partial too.
    """
    res: list[tuple[bytes, bool]] = []
    *complete, tail = stream.split(b"\n")
    for line in complete:
        off = 0
        while len(line) - off >= max_line:
            end = char_cut(line, off, off + max_line)
            res.append((line[off:end], True))
            off = end
        res.append((line[off:], False))
    off = 0
    while off < len(tail):
        end = char_cut(tail, off, off + max_line) if len(tail) - off >= max_line else len(tail)
        res.append((tail[off:end], True))
        off = end
    return res


def char_cut(buf: bytes, off: int, end: int) -> int:
    """Where a piece [off, end) of max_line bytes ends: before a UTF-8 character that
    would be cut (judged on the bytes before `end` only), unless that empties the piece."""
    for j in range(end - 1, max(off, end - 4), -1):
        b = buf[j]
        if b < 0x80:
            return end
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return j if 0xC2 <= b <= 0xF4 and j + need > end else end
    return end


# --------------------------------------------------------------------------- model checking


@dataclass
class KeyModel:
    data: bytearray = field(default_factory=bytearray)  # every byte fed for the key
    owner: list[int] = field(default_factory=list)  # feed id that contributed each byte
    emitted: int = 0  # bytes of `data` covered by emitted segments
    last_feed_ts: int = -1


class Checker:
    """Drives a LineAssembler and checks every emitted line against a byte-level model."""

    def __init__(self, max_line: int, idle: int, max_streams: int, max_bytes: int) -> None:
        self.asm = LineAssembler(
            max_line=max_line,
            idle_timeout_ns=idle,
            max_streams=max_streams,
            max_pending_bytes=max_bytes,
        )
        self.max_line = max_line
        self.max_streams = max_streams
        self.max_bytes = max_bytes
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
            # The feed of the segment's first byte; a piece that starts with a character
            # held back at a cut may get the feed that completed that character.
            owners = m.owner[start : start + min(4, len(seg))]
            assert any(ts == self.feeds[fid][0] and tag is self.feeds[fid][1] for fid in owners), (
                "ts/tag not of the feed of the segment's first character"
            )
            m.emitted += len(seg)

    def check_state(self) -> None:
        live = {k for k in self.keys if self.pending(k)}
        for k in self.keys:
            assert self.pending(k) < self.max_line, "pending reached max_line unflushed"
        assert self.asm.pending_streams == len(live)
        assert self.asm.pending_streams <= self.max_streams
        assert self.asm.pending_bytes <= self.max_bytes
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
        # Other keys are untouched, except the least recently fed ones when a new pending
        # key would exceed max_streams, or the pending bytes max_bytes: they are evicted
        # (flushed whole), oldest first, only as many as needed.
        changed = {k for k in self.keys if k != key and self.pending(k) != before[k]}
        assert all(self.pending(k) == 0 for k in changed), "evicted keys are flushed whole"
        others = sorted(
            (k for k, n in before.items() if n and k != key),
            key=lambda k: self.keys[k].last_feed_ts,
        )
        n_evicted = len(changed)
        assert changed == set(others[:n_evicted]), "evicted out of feed order"
        if n_evicted:
            kept = others[n_evicted - 1 :]  # without the last evicted one, still too much?
            streams = len(kept) + (1 if self.pending(key) else 0)
            size = sum(before[k] for k in kept) + self.pending(key)
            assert streams > self.max_streams or size > self.max_bytes, "evicted too many"

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
        # multi-byte UTF-8 characters, so that max_line cuts meet them
        st.lists(st.sampled_from(["é", "€", "🎉", "a", "\n"]), max_size=12).map(
            lambda chars: "".join(chars).encode()
        ),
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
def scenarios(draw: st.DrawFn) -> tuple[int, int, int, int, list[Op]]:
    max_line = draw(st.one_of(st.integers(1, 8), st.integers(9, 64)))
    idle = draw(st.integers(0, 40))  # the clock moves 1 per feed, 0..8 per idle op
    max_streams = draw(st.one_of(st.integers(1, 5), st.just(1000)))
    max_bytes = draw(st.one_of(st.integers(max_line, 3 * max_line), st.just(10**6)))
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
    return max_line, idle, max_streams, max_bytes, draw(st.lists(op, min_size=15, max_size=100))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_random_interleavings_keep_invariant(
    scenario: tuple[int, int, int, int, list[Op]],
) -> None:
    max_line, idle, max_streams, max_bytes, ops = scenario
    c = Checker(max_line, idle, max_streams, max_bytes)
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


# --------------------------------------------------------------------------- gaps (issue 8, 1)
#
# A record flagged F_LOSS follows bytes of its (pid, stream) that were dropped; one flagged
# F_TRUNCATED lacks the bytes of its write after it.  Either way the line ends at the gap,
# partial, and no emitted line holds bytes of both sides of a gap, whatever the pids, the
# streams and the order of their records.

F_LOSS = CONSTANTS["F_LOSS"]
F_TRUNCATED = CONSTANTS["F_TRUNCATED"]
EV_DATA = CONSTANTS["EV_DATA"]
EV_EXIT = CONSTANTS["EV_EXIT"]
EV_THREAD_EXIT = CONSTANTS["EV_THREAD_EXIT"]
EV_CGROUP = CONSTANTS["EV_CGROUP"]


def data_rec(
    pid: int,
    stream: int,
    data: bytes,
    flags: int = 0,
    ts: int = 1,
    tid: int | None = None,
    cgroup: int = 77,
) -> tuple[int, int, int, int, int, int, int, bytes, bytes]:
    return (ts, cgroup, pid, pid if tid is None else tid, EV_DATA, stream, flags, b"c", data)


def exit_rec(
    pid: int, tid: int | None = None, typ: int = EV_EXIT
) -> tuple[int, int, int, int, int, int, int, bytes, bytes]:
    return (9, 77, pid, pid if tid is None else tid, typ, 0, 0, b"c", b"")


def test_loss_on_stdout_breaks_stdout_only_and_is_not_glued() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.process(
        [
            data_rec(1, 1, b"abc"),
            data_rec(1, 2, b"err-pending"),
            data_rec(1, 1, b"ghi\n", F_LOSS),  # stdout bytes between were dropped
            data_rec(1, 2, b" done\n"),
        ],
        out,
    )
    assert [(line[2], line[4], line[5]) for line in out] == [
        (1, b"abc", True),
        (1, b"ghi", False),
        (2, b"err-pending done", False),
    ]


def test_truncated_write_ends_its_line_and_the_next_write_starts_a_new_one() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.process([data_rec(1, 1, b"x" * 100, F_TRUNCATED), data_rec(1, 1, b"next\n")], out)
    assert [(line[4], line[5]) for line in out] == [(b"x" * 100, True), (b"next", False)]


def test_truncated_empty_record_still_ends_the_line() -> None:
    # A write truncated at a multiple of the chunk size ends with an empty flagged record.
    asm = LineAssembler()
    out: list[Line] = []
    asm.process([data_rec(1, 1, b"head"), data_rec(1, 1, b"", F_TRUNCATED)], out)
    asm.process([data_rec(1, 1, b"tail\n")], out)
    assert [(line[4], line[5]) for line in out] == [(b"head", True), (b"tail", False)]


def test_loss_flag_with_nothing_pending_emits_nothing() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.process([data_rec(1, 1, b"whole\n"), data_rec(1, 1, b"next\n", F_LOSS)], out)
    assert [(line[4], line[5]) for line in out] == [(b"whole", False), (b"next", False)]


@st.composite
def gap_scenarios(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, bytes, int, int]]]:
    max_line = draw(st.integers(4, 24))
    rec = st.tuples(
        st.sampled_from([10, 11, 12]),
        st.sampled_from([1, 2]),
        st.lists(st.sampled_from([b"\n", b"a", b"bc", b"defgh"]), max_size=8).map(b"".join),
        st.sampled_from([0, 0, 0, F_LOSS, F_TRUNCATED, F_LOSS | F_TRUNCATED]),
        st.sampled_from([77, 77, 77, 78]),  # a pid seen in another cgroup: reused
    )
    return max_line, draw(st.lists(rec, min_size=1, max_size=60))


@settings(max_examples=400, deadline=None)
@given(gap_scenarios())
def test_no_line_joins_bytes_across_a_gap(
    scenario: tuple[int, list[tuple[int, int, bytes, int, int]]],
) -> None:
    """Model: each key's bytes are numbered by segment; a gap (loss before a record,
    truncation after it, a change of the key's cgroup) starts a new segment.  Every emitted line
    lies within one segment, a line ends with a newline only where the data had one, and
    the bytes of every key come out complete and in order."""
    max_line, recs = scenario
    asm = LineAssembler(max_line=max_line)
    segs: dict[Key, list[int]] = {}  # per byte: its segment
    data_of: dict[Key, bytearray] = {}
    seg_no: dict[Key, int] = {}
    owner: dict[Key, int] = {}
    out: list[Line] = []
    for ts, (pid, stream, data, flags, cgroup) in enumerate(recs):
        key = (pid, stream)
        if owner.get(key, cgroup) != cgroup:
            seg_no[key] += 1
        owner[key] = cgroup
        if flags & F_LOSS:
            seg_no[key] = seg_no.get(key, 0) + 1
        s = seg_no.setdefault(key, 0)
        data_of.setdefault(key, bytearray()).extend(data)
        segs.setdefault(key, []).extend([s] * len(data))
        if flags & F_TRUNCATED:
            seg_no[key] = s + 1
        asm.process([data_rec(pid, stream, data, flags, ts, cgroup=cgroup)], out)
    asm.flush_all(out)
    pos: dict[Key, int] = {}
    for _ts, pid, stream, _tag, msg, partial in out:
        key = (pid, stream)
        start = pos.get(key, 0)
        seg = msg if partial else msg + b"\n"
        assert bytes(data_of[key][start : start + len(seg)]) == seg
        assert len(set(segs[key][start : start + len(seg)])) <= 1, "joined across a gap"
        pos[key] = start + len(seg)
    assert pos == {k: len(v) for k, v in data_of.items() if v}


def test_one_line_writes_while_another_key_has_a_pending_line() -> None:
    """process() takes a one-line write straight to a line only when nothing is pending;
    around a pending line of another key, each key still gets its own bytes in order."""
    asm = LineAssembler()
    out: list[Line] = []
    asm.process([data_rec(1, 1, b"one "), data_rec(2, 1, b"whole\n", ts=2),
                 data_rec(1, 2, b"err\n", ts=3), data_rec(1, 1, b"two\n", ts=4),
                 data_rec(2, 1, b"again\n", ts=5)], out)
    assert [(ts, pid, stream, msg, partial) for ts, pid, stream, _tag, msg, partial in out] == [
        (2, 2, 1, b"whole", False), (3, 1, 2, b"err", False), (1, 1, 1, b"one two", False),
        (5, 2, 1, b"again", False)]
    assert asm.pending_streams == 0


def test_pid_reused_in_another_cgroup_ends_the_old_line_first() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.process([data_rec(5, 1, b"old process ", cgroup=1)], out)
    asm.process([data_rec(5, 1, b"new process\n", cgroup=2)], out)
    assert [(line[3][0], line[4], line[5]) for line in out] == [  # type: ignore[index]
        (1, b"old process ", True),
        (2, b"new process", False),
    ]


# --------------------------------------------------------------------------- exits (issue 8, 7)


def test_process_exit_record_flushes_every_stream_of_the_pid() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.process([data_rec(3, 1, b"o"), data_rec(3, 2, b"e"), data_rec(4, 1, b"x")], out)
    asm.process([exit_rec(3)], out)
    assert sorted((line[1], line[2], line[4], line[5]) for line in out) == [
        (3, 1, b"o", True),
        (3, 2, b"e", True),
    ]
    assert asm.pending_streams == 1


def test_thread_exit_flushes_the_lines_that_thread_wrote_last() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    asm.process(
        [
            data_rec(3, 1, b"main thread ", tid=3),
            data_rec(3, 1, b"then worker", tid=31),  # worker wrote last on stdout
            data_rec(3, 2, b"err by main", tid=3),
        ],
        out,
    )
    asm.process([exit_rec(3, tid=32, typ=EV_THREAD_EXIT)], out)  # another thread: nothing
    assert out == []
    asm.process([exit_rec(3, tid=31, typ=EV_THREAD_EXIT)], out)
    assert [(line[2], line[4], line[5]) for line in out] == [(1, b"main thread then worker", True)]
    assert asm.pending_streams == 1


def test_other_records_are_handed_back_in_order() -> None:
    asm = LineAssembler()
    out: list[Line] = []
    seen: list[object] = []
    cg = (5, 123, 0, 0, EV_CGROUP, 0, 0, b"", b"/kubepods/x")
    asm.process([data_rec(1, 1, b"a\n"), cg], out, seen.append)
    assert seen == [cg]
    assert [line[4] for line in out] == [b"a"]


# --------------------------------------------------------------------------- bounds (issue 8, 8)


def test_pending_bytes_are_bounded_by_evicting_least_recently_fed() -> None:
    asm = LineAssembler(max_line=200, max_pending_bytes=250)
    out: list[Line] = []
    asm.feed(1, 1, 1, "a", b"a" * 90, out)
    asm.feed(2, 1, 2, "b", b"b" * 90, out)
    asm.feed(1, 1, 3, "a2", b"A", out)  # (1, 1) is now the most recently fed
    assert out == []
    asm.feed(3, 1, 4, "c", b"c" * 90, out)  # 271 bytes pending: (2, 1) must go
    assert out == [(2, 2, 1, "b", b"b" * 90, True)]
    assert asm.pending_bytes == 181
    asm.feed(3, 1, 5, "c", b"c" * 80, out)  # grows to 261: (1, 1) goes
    assert out[1] == (1, 1, 1, "a", b"a" * 90 + b"A", True)
    assert asm.pending_bytes <= 250


def test_many_long_partial_lines_stay_within_the_byte_bound() -> None:
    asm = LineAssembler(max_line=16384, max_streams=65536, max_pending_bytes=1 << 20)
    out: list[Line] = []
    for pid in range(1000):
        asm.feed(pid, 1, pid, None, b"p" * 16000, out)
        assert asm.pending_bytes <= 1 << 20
    assert sum(len(line[4]) for line in out) + asm.pending_bytes == 1000 * 16000


def test_byte_bound_below_max_line_is_rejected() -> None:
    with pytest.raises(ValueError):
        LineAssembler(max_line=1000, max_pending_bytes=999)


# --------------------------------------------------------------------------- UTF-8 (issue 8, 2)

UTF8_CHARS = ["a", "\n", "é", "€", "漢", "🎉", "\u2028"]


@settings(max_examples=300, deadline=None)
@given(
    max_line=st.integers(4, 30),
    text=st.lists(st.sampled_from(UTF8_CHARS), max_size=200).map("".join),
    cuts=st.lists(st.integers(0, 900), max_size=10),
)
def test_cuts_fall_on_character_boundaries_of_valid_utf8(
    max_line: int, text: str, cuts: list[int]
) -> None:
    stream = text.encode()
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    asm = LineAssembler(max_line=max_line)
    out: list[Line] = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        asm.feed(5, 1, i, None, stream[a:b], out)
    asm.flush_all(out)
    for *_, msg, partial in out:
        msg.decode("utf-8")  # strict: no character was cut
        assert len(msg) <= max_line
        if partial and len(msg) < max_line - 3:
            assert msg is out[-1][4], "only the final flush may be short"
    assert b"".join(m if p else m + b"\n" for *_, m, p in out) == stream


def test_cut_inside_a_multibyte_character_moves_before_it() -> None:
    asm = LineAssembler(max_line=6)
    out: list[Line] = []
    asm.feed(1, 1, 1, "t", "abcd€xy\n".encode(), out)  # € = 3 bytes at 4..6
    assert [(m, p) for *_, m, p in out] == [(b"abcd", True), ("€xy".encode(), False)]


def test_pending_ending_in_half_a_character_keeps_it_for_the_next_write() -> None:
    asm = LineAssembler(max_line=4)
    out: list[Line] = []
    asm.feed(1, 1, 1, "t", b"ab\xe2\x82", out)  # reaches max_line inside the euro sign
    assert [(m, p) for *_, m, p in out] == [(b"ab", True)]
    asm.feed(1, 1, 2, "u", b"\xac\n", out)
    assert [(m, p) for *_, m, p in out][1:] == [("€".encode(), False)]


def test_invalid_bytes_are_cut_at_max_line_and_kept_exactly() -> None:
    asm = LineAssembler(max_line=4)
    out: list[Line] = []
    data = b"\xff\xfe\xfd\xfc\xfb\x80\x80\x80\x80\n"
    asm.feed(1, 1, 1, "t", data, out)
    assert b"".join(m if p else m + b"\n" for *_, m, p in out) == data
    assert all(len(m) <= 4 for *_, m, _ in out)
