"""Write and replay rate of a sink's disk buffer (agent/sinks/buffer.py), 1 MiB batches.

Run: .venv/bin/python bench/disk_buffer_bench.py [--batches N] [--dir DIR] [--page-size B]

For `buffer.fsync` off (SQLite synchronous=NORMAL) and on (FULL), through the buffer as a
sink uses it (mode `always`: every batch written on the sink's I/O thread):
  write:  push N batches of 1 MiB (~3,500 items of ~300 bytes), wait until all are on disk;
  replay: a new buffer opens the file (as at start), then each batch is read back,
          checked (CRC-32, parse) and deleted, oldest first, as delivery does.
Prints MB/s and batches/s of each, and the longest the event loop went without running
(a 1 ms ticker) while the disk worked: the disk I/O is off the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import BufferConfig  # noqa: E402
from agent.sinks import buffer as buffer_module  # noqa: E402
from agent.sinks.base import Batch, SinkStats  # noqa: E402
from agent.sinks.buffer import SinkBuffer  # noqa: E402

MIB = 1 << 20


def make_batch(seq: int) -> Batch:
    """~1 MiB of records shaped like podtap's JSON, in 8 containers' groups."""
    groups: dict[bytes, list[bytes]] = {}
    nbytes = records = 0
    i = 0
    while nbytes < MIB - 400:
        group = b'{"stream":{"pod":"pod-%d"}}' % (i % 8)
        item = (b'{"time":"2026-12-01T20:00:00.%09dZ","stream":"stdout","log":"GET /api/v1/items'
                b'?page=%d 200 %d bytes in %d ms","kubernetes":{"namespace_name":"default",'
                b'"pod_name":"web-%d","container_name":"app"}}' % (seq * 10**5 + i, i, i * 7,
                                                                   i % 90, i % 8))
        groups.setdefault(group, []).append(item)
        nbytes += len(item)
        records += 1
        i += 1
    return Batch(seq=seq, groups=groups, records=records, nbytes=nbytes, created_ns=time.time_ns())


class LoopLag:
    """The longest gap between ticks of a 1 ms ticker on the event loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - 0.001)
            last = now

    def __enter__(self) -> LoopLag:
        self.task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


async def write_and_replay(directory: str, fsync: bool, batches: list[Batch]) -> dict[str, float]:
    cfg = BufferConfig(memory_bytes=64 * MIB, disk_dir=directory, disk_bytes=64 << 30,
                       mode="always", fsync=fsync)
    total = sum(b.nbytes for b in batches)
    io = ThreadPoolExecutor(1)
    buf = SinkBuffer("bench", cfg, SinkStats(), io, time.monotonic, lambda: None)
    with LoopLag() as write_lag:
        started = time.perf_counter()
        for batch in batches:
            batch.seq = buf.take_seq()
            buf.push(batch)
            while buf._pending_bytes > buf.write_behind_bytes // 2:  # keep the queue fed
                await asyncio.sleep(0.001)
        await buf.flushed()
        write_s = time.perf_counter() - started
    assert buf.stats.dropped_records == 0, "the bench dropped batches"
    await buf.close()
    io.shutdown()

    io = ThreadPoolExecutor(1)
    with LoopLag() as replay_lag:
        started = time.perf_counter()
        replay = SinkBuffer("bench", cfg, SinkStats(), io, time.monotonic, lambda: None)
        open_s = time.perf_counter() - started
        read = 0
        while True:
            taken = replay.take(4)
            if not taken:
                break
            for entry in taken:
                got = await replay.load(entry)
                assert got is not None and got.records == batches[read].records
                replay.resolve(entry)
                read += 1
        await replay.flushed()
        replay_s = time.perf_counter() - started
    assert read == len(batches) and replay.stats.corrupt_batches == 0
    await replay.close()
    io.shutdown()
    return {"write_s": write_s, "replay_s": replay_s, "open_s": open_s, "mb": total / 1e6,
            "write_lag": write_lag.worst, "replay_lag": replay_lag.worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--dir", default="", help="where the buffer is written (default: a "
                        "temporary directory under /var/tmp, on disk rather than tmpfs)")
    parser.add_argument("--page-size", type=int, default=buffer_module.PAGE_SIZE)
    args = parser.parse_args()
    buffer_module.PAGE_SIZE = args.page_size
    template = [make_batch(i) for i in range(args.batches)]
    print(f"{args.batches} batches of {template[0].nbytes / MIB:.2f} MiB "
          f"({template[0].records} records each), SQLite page size {args.page_size}")
    for fsync in (False, True):
        base = tempfile.mkdtemp(prefix="podtap-bench-", dir=args.dir or "/var/tmp")
        try:
            batches = [Batch(seq=0, groups=b.groups, records=b.records, nbytes=b.nbytes,
                             created_ns=b.created_ns) for b in template]
            r = asyncio.run(write_and_replay(base, fsync, batches))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        n = args.batches
        print(f"fsync {'on ' if fsync else 'off'}: "
              f"write {r['mb'] / r['write_s']:7.1f} MB/s {n / r['write_s']:7.1f} batches/s | "
              f"replay {r['mb'] / r['replay_s']:7.1f} MB/s {n / r['replay_s']:7.1f} batches/s "
              f"(open {r['open_s'] * 1000:.1f} ms) | "
              f"loop stalled at most {r['write_lag'] * 1000:.1f} ms writing, "
              f"{r['replay_lag'] * 1000:.1f} ms replaying")


if __name__ == "__main__":
    main()
