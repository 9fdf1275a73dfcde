"""The stdout sink: one JSON record per line (NDJSON), for the demo and debugging.

It never blocks the event loop: `put` only encodes and queues; `run` writes from a
worker thread. A reader slower than the agent makes the queue grow to
`max_pending_bytes`, then the newest records are dropped and counted. A broken
stdout (the reader went away, EIO) is not a silent drop: `run` raises `StdoutBroken`
and the pipeline stops the agent with that message.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import Sequence
from typing import BinaryIO

from agent.records import RecordFormat
from agent.sinks.base import Enriched, SinkStats
from agent.sinks.httpjson import RecordItemEncoder

log = logging.getLogger("podtap.sinks.stdout")


class StdoutBroken(Exception):
    """Stdout cannot be written any more."""


def write_all(out: BinaryIO, data: bytes) -> None:
    """Write every byte: a raw (unbuffered, e.g. PYTHONUNBUFFERED) stream returns short
    counts when a signal interrupts a pipe write, and BinaryIO.write may do just that."""
    view = memoryview(data)
    while view:
        n = out.write(view)
        if n is None:  # a non-blocking stream that is full: wait until it takes more
            select.select([], [out], [])
            continue
        view = view[n:]
    out.flush()


class StdoutSink:
    """NDJSON records to a binary stream, written by a worker thread."""

    def __init__(
        self,
        name: str,
        index: int,
        out: BinaryIO,
        fmt: RecordFormat,
        max_pending_bytes: int = 16 << 20,
    ) -> None:
        self.name = name
        self.index = index
        self.out = out
        self.fmt = fmt
        self.max_pending_bytes = max_pending_bytes
        self.stats = SinkStats()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._broken: str | None = None

    def put(self, lines: Sequence[Enriched]) -> None:
        if not lines:
            return
        index, fmt, pending = self.index, self.fmt, self._pending
        self.stats.records_in += len(lines)
        size = self._pending_bytes
        for origin, time_ns, stream, message, partial in lines:
            encoder = origin.encoders[index]
            if encoder is None:
                encoder = origin.encoders[index] = RecordItemEncoder(origin.meta, fmt)
            record = encoder.encode(time_ns, stream, message, partial)
            if size + len(record) > self.max_pending_bytes or self._broken is not None:
                self.stats.dropped_records += 1
                self.stats.dropped_bytes += len(record)
                continue
            pending.append(record)
            size += len(record) + 1
        self._pending_bytes = size
        self.stats.memory_bytes_now = size
        if pending:
            self._wake.set()

    def _take(self) -> tuple[bytes, int]:
        records = self._pending
        self._pending = []
        self._pending_bytes = 0
        self.stats.memory_bytes_now = 0
        self._wake.clear()
        return b"\n".join(records) + b"\n", len(records)

    async def _write(self, data: bytes, count: int) -> None:
        started = time.monotonic()
        try:
            await asyncio.to_thread(write_all, self.out, data)
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            self._broken = f"stdout is broken ({e}); stopping"
            self.stats.fail("transport")
            self.stats.failing_since_ns = self.stats.failing_since_ns or time.monotonic_ns()
            raise StdoutBroken(self._broken) from e
        self.stats.records_sent += count
        self.stats.bytes_sent += len(data)
        self.stats.batches_sent += 1
        self.stats.observe_latency(time.monotonic() - started)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            await self._write(*self._take())

    async def close(self, grace_s: float) -> None:
        if not self._pending or self._broken is not None:
            return
        data, count = self._take()
        try:
            await asyncio.wait_for(self._write(data, count), timeout=max(grace_s, 0.001))
        except (TimeoutError, StdoutBroken) as e:
            self.stats.dropped_records += count
            log.error("stdout: %d records not written at shutdown: %s", count, e)

    def healthy(self, max_failing_s: float) -> bool:
        return self._broken is None


class TapOutput:
    """`podtap tap`'s already formatted output; a closed reader (EPIPE) ends the tap."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.broken = False

    def write(self, data: bytes) -> None:
        if not data or self.broken:
            return
        try:
            write_all(self.out, data)
        except BrokenPipeError:
            self.broken = True
