"""Tests of agent.sinks.buffer: the blob format, the SQLite disk store, the memory -> disk
buffer (order, bounds, drops, corrupt rows, restarts) and survival of a SIGKILL.

Everything runs against real SQLite files in a temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import BufferConfig
from agent.sinks.base import Batch, SinkStats
from agent.sinks.buffer import (
    DiskStore,
    SinkBuffer,
    decode_batch,
    encode_batch,
    encoded_size,
)
from tests.unit.test_sink_runner import (
    DEADLINE_S,
    Lines,
    expect_all_in_order,
    make_sink,
    per_container,
    run,
    running,
    sink_config,
    until,
)

REPO = Path(__file__).resolve().parents[2]


def batch_of(seq: int, nbytes: int, records: int = 4, created_ns: int = 0) -> Batch:
    """A batch of `records` items adding up to `nbytes`, tagged with its seq."""
    size = max(nbytes // records, 12)
    items = [(b"%06d:%03d:" % (seq, i)).ljust(size, b"z") for i in range(records)]
    return Batch(seq=seq, groups={b"g": items}, records=records, nbytes=sum(map(len, items)),
                 created_ns=created_ns or seq)


class Harness:
    """A SinkBuffer on a real directory, driven by hand (no runner)."""

    def __init__(self, directory: str, **cfg: object) -> None:
        self.cfg = BufferConfig(**{"memory_bytes": 8192, "disk_dir": directory,  # type: ignore[arg-type]
                                   "disk_bytes": 1 << 20, **cfg})
        self.stats = SinkStats()
        self.io = ThreadPoolExecutor(1)
        self.now = 0.0
        self.wakes = 0
        self.buffer = SinkBuffer("s", self.cfg, self.stats, self.io, lambda: self.now,
                                 self._wake)

    def _wake(self) -> None:
        self.wakes += 1

    def push(self, nbytes: int, records: int = 4) -> Batch:
        batch = batch_of(self.buffer.take_seq(), nbytes, records)
        self.buffer.push(batch)
        return batch

    async def pop(self, n: int) -> list[Batch]:
        """Deliver up to n batches from the head, in order; the batches as loaded."""
        out = []
        for entry in self.buffer.take(n):
            batch = await self.buffer.load(entry)
            if batch is not None:
                self.buffer.resolve(entry)
                out.append(batch)
        return out

    def check_invariants(self) -> None:
        entries = list(self.buffer.entries.values())
        seqs = [e.seq for e in entries]
        assert seqs == sorted(seqs)
        mem = [e.seq for e in entries if not e.home_disk]
        disk = [e.seq for e in entries if e.home_disk]
        if mem and disk:
            assert max(mem) < min(disk), "memory entries must be older than disk ones"
        held = sum(e.batch.nbytes for e in entries if e.batch is not None)
        assert self.stats.memory_bytes_now == held
        assert self.stats.disk_bytes_now == sum(e.size for e in entries if e.home_disk)
        assert self.stats.disk_bytes_now <= self.cfg.disk_bytes
        assert self.stats.oldest_ns_now == (entries[0].created_ns if entries else 0)

    async def close(self) -> None:
        await self.buffer.close()
        self.io.shutdown()


# --------------------------------------------------------------------------- blob format
items_st = st.lists(st.binary(max_size=40), min_size=1, max_size=8)


@given(groups=st.dictionaries(st.binary(max_size=12), items_st, min_size=1, max_size=4),
       seq=st.integers(1, 2**62), created=st.integers(0, 2**62))
def test_blob_round_trip(groups: dict[bytes, list[bytes]], seq: int, created: int) -> None:
    batch = Batch(seq=seq, groups=groups, records=sum(map(len, groups.values())),
                  nbytes=sum(len(i) for v in groups.values() for i in v), created_ns=created)
    data = encode_batch(batch)
    assert len(data) == encoded_size(batch)
    assert decode_batch(seq, data) == batch
    assert decode_batch(seq + 1, data) is None  # a row under another seq
    for cut in (1, len(data) // 2, len(data) - 1):
        assert decode_batch(seq, data[:cut]) is None
    assert decode_batch(seq, data + b"\0") is None


# --------------------------------------------------------------------------- the store
@pytest.mark.parametrize("fsync", [False, True])
def test_store_writes_reads_deletes_and_keeps_the_high_seq(tmp_path: Path, fsync: bool) -> None:
    store = DiskStore(str(tmp_path), fsync)
    assert store.open() == ([], 0)
    for seq in (1, 2, 3):
        store.write(batch_of(seq, 300))
    assert store.read(2) == batch_of(2, 300)
    store.write(batch_of(2, 100, records=1))  # a retried remainder replaces the row
    assert store.read(2) == batch_of(2, 100, records=1)
    for seq in (1, 2, 3):
        store.delete(seq)
    assert store.read(1) is None and store.corrupt == 0
    db = store.db
    assert db is not None
    mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    sync = db.execute("PRAGMA synchronous").fetchone()[0]
    assert (mode, sync) == ("wal", 2 if fsync else 1)  # FULL = 2, NORMAL = 1
    store.close()
    again = DiskStore(str(tmp_path), fsync)
    assert again.open() == ([], 3)  # seq keeps growing though the table is empty
    again.close()


def test_unreadable_database_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                 ) -> None:
    (tmp_path / "buffer.db").write_bytes(b"this is not a database" * 1000)
    store = DiskStore(str(tmp_path), False)
    assert store.open() == ([], 0)
    store.write(batch_of(1, 100))
    assert store.read(1) == batch_of(1, 100)
    store.close()
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert "unreadable" in caplog.text


# --------------------------------------------------------------------------- ordering
def test_memory_then_disk_then_memory_keeps_the_order(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(str(tmp_path), memory_bytes=4096)
        pushed = [h.push(1000) for _ in range(10)]  # 4 fit in memory, 6 spill
        h.check_invariants()
        assert [e.home_disk for e in h.buffer.entries.values()] == [False] * 4 + [True] * 6
        await h.buffer.flushed()
        h.check_invariants()
        got = await h.pop(5)  # the 4 in memory and the oldest on disk
        h.check_invariants()
        pushed.append(h.push(1000))  # disk is not empty: still to disk, after the others
        assert list(h.buffer.entries.values())[-1].home_disk
        got += await h.pop(100)
        assert len(h.buffer) == 0
        pushed.append(h.push(1000))  # disk empty again: memory
        assert not list(h.buffer.entries.values())[-1].home_disk
        got += await h.pop(100)
        assert got == pushed
        h.check_invariants()
        await h.close()

    run(body)


ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(100, 3000)),
        st.tuples(st.just("pop"), st.integers(1, 4)),
        st.tuples(st.just("retry"), st.integers(1, 3)),
        st.tuples(st.just("flush"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_st, always=st.booleans())
def test_queue_order_property(ops: list[tuple[str, int]], always: bool) -> None:
    """Whatever the pushes, deliveries, retries (smaller remainders) and disk flushes, the
    buffer hands batches out in seq order, drops only the newest, never loses or repeats one,
    and its gauges match its content. A restart replays exactly what was on disk."""

    async def body(directory: str) -> None:
        h = Harness(directory, memory_bytes=6000, disk_bytes=12000,
                    mode="always" if always else "overflow")
        model: list[Batch] = []  # what must come out, in order
        delivered: list[Batch] = []
        for op, arg in ops:
            if op == "push":
                dropped = h.stats.dropped_records
                batch = h.push(arg)
                if h.stats.dropped_records == dropped:
                    model.append(batch)
                else:
                    assert batch.seq not in h.buffer.entries
            elif op == "pop":
                if always:
                    await h.buffer.flushed()
                delivered += await h.pop(arg)
            elif op == "retry":
                await h.buffer.flushed()
                (entry,) = h.buffer.take(1) or [None]
                if entry is not None:
                    batch = await h.buffer.load(entry)
                    assert batch is not None
                    keep = batch.groups[b"g"][: max(1, batch.records - arg)]
                    rest = Batch(seq=batch.seq, groups={b"g": keep}, records=len(keep),
                                 nbytes=sum(map(len, keep)), created_ns=batch.created_ns)
                    h.buffer.requeue(entry, rest)
                    model[model.index(next(b for b in model if b.seq == batch.seq))] = rest
            else:
                await h.buffer.flushed()
            h.check_invariants()
        await h.buffer.flushed()
        h.check_invariants()
        assert delivered == model[: len(delivered)]
        dropped_before_close = h.stats.dropped_records
        await h.close()
        # A restart replays what was left, in order, with the same content; what did not
        # fit on disk at close is counted as dropped.
        h2 = Harness(directory, memory_bytes=6000, disk_bytes=12000)
        rest = await h2.pop(1000)
        left = model[len(delivered):]
        assert [b.seq for b in rest] == sorted(b.seq for b in rest)
        assert all(b in left for b in rest)
        lost = [b for b in left if b not in rest]
        assert sum(b.records for b in lost) == h.stats.dropped_records - dropped_before_close
        assert h2.buffer.next_seq > max((b.seq for b in rest), default=0)
        await h2.close()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(body(directory))


# --------------------------------------------------------------------------- bounds
def test_disk_full_drops_the_newest_and_keeps_the_oldest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        h = Harness(str(tmp_path), memory_bytes=4096, disk_bytes=8192)
        caplog.set_level(logging.WARNING, "podtap.sinks")
        pushed = [h.push(1000) for _ in range(30)]
        await h.buffer.flushed()
        h.check_invariants()
        kept = [e.seq for e in h.buffer.entries.values()]
        assert kept == list(range(1, len(kept) + 1))  # the oldest, without a gap
        assert 4 + 7 <= len(kept) < 30  # 4 in memory, 7 x ~1 KiB on 8 KiB of disk
        dropped = pushed[len(kept):]
        assert h.stats.dropped_records == sum(b.records for b in dropped)
        assert h.stats.dropped_bytes == sum(b.nbytes for b in dropped)
        messages = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(messages) == 1  # rate-limited: once per 10 s
        assert "1 batches" in messages[0]
        h.now += 10.0
        h.push(1000)
        h.push(1000)
        h.buffer.drops.maybe_log(h.now + 20.0)
        messages = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(messages) == 3
        assert f"{len(dropped)} batches" in messages[1]  # all since the first message
        assert "1 batches" in messages[2]
        # Room again once the oldest is delivered: the next batch is kept.
        await h.pop(6)
        newest = h.push(1000)
        assert newest.seq in h.buffer.entries
        await h.close()

    run(body)


def test_without_a_disk_buffer_a_full_memory_drops_the_newest() -> None:
    async def body() -> None:
        h = Harness("", memory_bytes=4096)
        pushed = [h.push(1000) for _ in range(6)]
        assert [e.seq for e in h.buffer.entries.values()] == [1, 2, 3, 4]
        assert h.stats.dropped_records == 8
        assert h.stats.disk_bytes_now == 0
        assert await h.pop(10) == pushed[:4]
        await h.close()

    run(body)


def test_always_mode_sends_a_batch_only_once_it_is_on_disk(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(str(tmp_path), mode="always", memory_bytes=1 << 20)
        batch = h.push(1000)
        first = h.buffer.take(1)
        if first:  # the write already finished
            assert first[0].written
            h.buffer.release(first[0])
        await h.buffer.flushed()
        (entry,) = h.buffer.take(1)
        assert entry.written and entry.batch is batch  # kept in memory too: no read back
        rows = sqlite3.connect(tmp_path / "s" / "buffer.db").execute(
            "SELECT seq FROM batches").fetchall()
        assert rows == [(1,)]
        await h.close()

    run(body)


def test_a_failing_disk_keeps_batches_in_memory_while_there_is_room(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(str(tmp_path), mode="always", memory_bytes=3000)
        store = h.buffer.store
        assert store is not None

        def broken(batch: Batch) -> None:
            raise OSError(28, "No space left on device")

        store.write = broken  # type: ignore[method-assign]
        pushed = [h.push(1000) for _ in range(4)]
        await h.buffer.flushed()
        await asyncio.sleep(0)  # the write callbacks
        h.check_invariants()
        kept = [e.seq for e in h.buffer.entries.values()]
        assert kept == [1, 2, 3]
        assert h.stats.dropped_records == pushed[3].records
        assert await h.pop(10) == pushed[:3]
        await h.close()

    run(body)


# --------------------------------------------------------------------------- restart, corruption
def test_restart_replays_in_order_with_no_loss_and_no_duplicate(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = sink_config(tmp_path, buffer=BufferConfig(memory_bytes=8192,
                                                        disk_dir=str(tmp_path / "buf")))
        lines = Lines(3)
        accepted: list[bytes] = []
        for _generation in range(4):
            sink, transport, _c = make_sink(cfg)
            sink.put(lines.make(300))  # memory, then spilled to disk
            task = asyncio.create_task(sink.run())
            await until(lambda: sink.stats.records_sent >= 50, "some deliveries")  # noqa: B023
            await sink.close(0)  # stop mid-way: what is left goes to disk
            assert task.done()
            accepted += transport.accepted
            seqs = [e.seq for e in sink.buffer.entries.values()]
            assert seqs == sorted(seqs)
        sink, transport, _c = make_sink(cfg)
        async with running(sink):
            await until(lambda: len(sink.buffer) == 0, "the replay")
        accepted += transport.accepted
        transport.accepted = accepted
        # an abandoned request may be sent twice (at least once); none was abandoned here
        # because the transport answers at once, so: each line exactly once, in order.
        expect_all_in_order(transport, lines)

    run(body)


def test_corrupt_row_is_counted_and_skipped(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        cfg = sink_config(tmp_path)
        sink, _t, _c = make_sink(cfg)
        lines = Lines(1)
        sink.put(lines.make(150))  # three batches of 50
        await sink.close(0)
        db = sqlite3.connect(tmp_path / "buf" / "test" / "buffer.db")
        (data,) = db.execute("SELECT data FROM batches WHERE seq = 2").fetchone()
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x55
        db.execute("UPDATE batches SET data = ? WHERE seq = 2", (bytes(flipped),))
        db.commit()
        db.close()

        again, transport, _c2 = make_sink(cfg)
        async with running(again):
            await until(lambda: len(again.buffer) == 0, "the replay")
        got = per_container(transport.accepted)[b"c0"]
        assert got == list(range(50)) + list(range(100, 150))
        assert again.stats.corrupt_batches == 1
        assert again.stats.dropped_records == 50
        assert "corrupt" in caplog.text
        rows = sqlite3.connect(tmp_path / "buf" / "test" / "buffer.db").execute(
            "SELECT count(*) FROM batches").fetchone()
        assert rows == (0,)

    run(body)


# --------------------------------------------------------------------------- SIGKILL
CHILD = textwrap.dedent("""
    import asyncio, dataclasses, sys
    from pathlib import Path
    from agent.config import BufferConfig
    from tests.unit.test_sink_runner import Lines, make_sink, sink_config

    mode, directory, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main():
        cfg = sink_config(None, buffer=BufferConfig(
            memory_bytes=8192, disk_dir=directory, mode=mode, disk_bytes=1 << 30))
        sink, transport, _c = make_sink(cfg)
        transport.gate = asyncio.Event()  # the backend never answers
        asyncio.create_task(sink.run())
        lines = Lines(3)
        for i in range(count):
            sink.put(lines.make(50))
            await asyncio.sleep(0)
        await sink.buffer.flushed()
        on_disk = [e.seq for e in sink.buffer.entries.values() if e.home_disk]
        print("ready", " ".join(map(str, on_disk)), flush=True)
        # keep writing until killed: the kill lands in the middle of writes
        while True:
            sink.put(lines.make(50))
            await asyncio.sleep(0.001)

    asyncio.run(main())
""")


@pytest.mark.parametrize("mode", ["always", "overflow"])
def test_sigkill_with_batches_on_disk_then_a_new_process_replays_them(
        tmp_path: Path, mode: str) -> None:
    directory = str(tmp_path / "buf")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, directory, "40"], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [out.put(x) for x in child.stdout], daemon=True).start()
    on_disk: list[int] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not on_disk:
            try:
                word, *rest = out.get(timeout=max(deadline - time.monotonic(), 0.1)).split()
            except queue.Empty:
                raise AssertionError("the child did not report its disk buffer") from None
            if word == "ready":
                on_disk = [int(s) for s in rest]
        time.sleep(0.05)  # let it write some more: the kill lands amid writes
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert on_disk, "the child put nothing on disk"
    if mode == "always":
        assert on_disk == list(range(1, 41))  # every closed batch
    else:
        assert on_disk[0] > 1 and on_disk == list(range(on_disk[0], 41))  # memory first

    async def body() -> None:
        cfg = sink_config(None, buffer=BufferConfig(memory_bytes=8192, disk_dir=directory))
        sink, transport, _c = make_sink(cfg)
        replayed = [e.seq for e in sink.buffer.entries.values()]
        # everything reported on disk is there, in order, then maybe what came after
        assert replayed[: len(on_disk)] == on_disk
        assert replayed == list(range(on_disk[0], on_disk[0] + len(replayed)))
        async with running(sink):
            await until(lambda: len(sink.buffer) == 0, "the replay")
        assert sink.stats.corrupt_batches == 0 and sink.stats.dropped_records == 0
        got = per_container(transport.accepted)
        # Each batch is one put of 50 lines, dealt to c0, c1, c2: 17, 17 and 16 lines.
        for name, per_batch in ((b"c0", 17), (b"c1", 17), (b"c2", 16)):
            first = (on_disk[0] - 1) * per_batch  # the lines of the batches lost in memory
            assert got[name] == list(range(first, first + per_batch * len(replayed)))

    run(body)
