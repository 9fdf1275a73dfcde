"""The capture stage as the pipeline sees it: batches of decoded records on the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from agent.capture.events import Drainer, Record, RingReader, decode
from agent.capture.probe import Probe

log = logging.getLogger("podtap.capture")

# Spans waiting on the loop are decoded together, up to this much (~6,500 one-line
# records, ~15 ms of the loop at 100-byte lines): a larger step delays the sinks' I/O.
MERGE_BYTES = 1 << 20


class CaptureSource:
    """Drains the probe's ring buffer in a thread; `batches()` yields on the event loop."""

    def __init__(self, probe: Probe, queue_bytes: int) -> None:
        self.probe = probe
        self.queue_bytes = queue_bytes
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._reader: RingReader | None = None
        self._drainer: Drainer | None = None
        self._stop_error: BaseException | None = None
        self.records = 0

    def start(self) -> None:
        """Start draining; call from the event loop after the probe is loaded."""
        loop = asyncio.get_running_loop()
        queue = self._queue
        self._reader = RingReader(self.probe.ring_fd, self.probe.ring_size)

        def deliver(blob: bytes) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, blob)

        self._drainer = Drainer(self._reader, deliver, self.queue_bytes)
        self._drainer.start()

    async def batches(self) -> AsyncIterator[list[Record]]:
        """Decoded record batches, in ring order, until `stop()` has drained the ring."""
        queue = self._queue
        done = False
        while not done:
            blobs: list[bytes] = []
            size = 0
            item = await queue.get()
            while item is not None:
                blobs.append(item)
                size += len(item)
                if queue.empty() or size >= MERGE_BYTES:
                    break
                item = queue.get_nowait()  # one batch for what is waiting
            done = item is None
            if len(blobs) == 1:
                records = decode(blobs[0])
            else:
                records = [rec for blob in blobs for rec in decode(blob)]
            if self._drainer is not None:
                self._drainer.release(size)
            self.records += len(records)
            if records:
                yield records
            # queue.get() does not suspend while spans are waiting: without this, a
            # backlog would keep the event loop here until it is gone, and the sinks'
            # sends (and the telemetry) would wait as long while their batches pile up.
            await asyncio.sleep(0)

    def stop(self) -> None:
        """Detach the probe, then hand over whatever is still in the ring, then end."""
        self.probe.detach()
        drainer, reader = self._drainer, self._reader
        if drainer is not None:
            drainer.stop()
            drainer.join()
        # call_soon keeps FIFO order behind the drain thread's call_soon_threadsafe.
        loop = asyncio.get_running_loop()
        if reader is not None and self.drain_error is None:
            try:
                while blob := reader.drain(1 << 30):
                    loop.call_soon(self._queue.put_nowait, blob)
            except OSError as e:  # what is left in the ring is lost: said, not hidden
                log.error("draining the ring buffer at stop failed: %s", e)
                self._stop_error = e
        loop.call_soon(self._queue.put_nowait, None)

    @property
    def drain_error(self) -> BaseException | None:
        if self._drainer is not None and self._drainer.error is not None:
            return self._drainer.error
        return self._stop_error

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.probe.close()
