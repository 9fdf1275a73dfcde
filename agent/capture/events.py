"""Ring buffer records: read them out of the kernel and decode them.

The BPF ring buffer is consumed directly through its mmap'ed pages (the
layout of kernel/bpf/ringbuf.c, as libbpf reads it), not through bcc's
per-record ctypes callback: a drain copies every committed record between
the consumer and the producer position as ONE bytes object and frees that
ring space at once.  Records are decoded later, on the event loop, in one
tight loop per batch.

Mapping: page 0 = consumer position (read-write), then the producer position
page and the data area, read-only and mapped ONCE (the kernel's own mapping
is doubled so that a record is contiguous for the BPF program; here a span
that runs past the end of the area is copied in two pieces instead, so the
data pages are not mapped, and counted, twice).  Each record starts with an
8-byte header: u32 length with the BUSY (not yet committed) and DISCARD bits,
u32 page offset; records are 8-byte aligned, so a header never wraps.

The positions are read and written as single aligned 8-byte loads and stores
(a memoryview of unsigned 64-bit items).  Not with `struct.pack_into`: it
zeroes its destination before writing the bytes one by one, and a BPF program
reserving space in between sees a consumer position of 0 (or a torn one) and
takes the ring for full.  That was the cause of the drops at 80-100K lines/s:
with a 64 MiB ring they began at the first wrap-around (a position of 0 is
then more than the ring size behind the producer), and with a 1 MiB ring,
500,000 paced writes lost 42-165 records while at most 100 KB was in the ring.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable

from agent.capture.abi import (  # noqa: F401  # re-exported: the record vocabulary
    EV_CGROUP,
    EV_DATA,
    EV_EXIT,
    EV_THREAD_EXIT,
    EVENT_HDR,
    F_CONTINUATION,
    F_FD_FALLBACK,
    F_LOSS,
    F_TRUNCATED,
    F_UNKNOWN,
    STREAM_STDERR,
    STREAM_STDOUT,
)

log = logging.getLogger("podtap.capture")

RINGBUF_HDR_SIZE = 8
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
_RECORD = struct.Struct("<I4x" + EVENT_HDR.format[1:])  # ring header + event header

# One decoded record: (ts_ns, cgroup_id, pid, tid, type, stream, flags, comm, data)
Record = tuple[int, int, int, int, int, int, int, bytes, bytes]


class RingReader:
    """Consumer side of a BPF ring buffer map, by mmap."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"ring buffer size must be a power of two pages, got {size}")
        page = mmap.PAGESIZE
        self.size = size
        self.mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._area = mmap.mmap(map_fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons = memoryview(self._consumer).cast("Q")
        self._prod = memoryview(self._area)[:page].cast("Q")
        self._data = memoryview(self._area)[page:]
        self._lengths = self._data.cast("I")  # record headers are 8-byte aligned
        self.high_water = 0  # most bytes ever found waiting in the ring at a drain
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self._interrupt = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._interrupt, select.EPOLLIN)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the kernel signals new records, `interrupt()` is called, or the
        timeout passes (None: no timeout); True unless the timeout passed."""
        return bool(self._epoll.poll(-1 if timeout_s is None else timeout_s))

    def interrupt(self) -> None:
        """End the current `wait()`, and make every later one return at once."""
        os.eventfd_write(self._interrupt, 1)

    def available(self) -> int:
        return int(self._prod[0] - self._cons[0])

    def producer_pos(self) -> int:
        """Bytes the kernel has reserved since the ring was created (records and padding)."""
        return int(self._prod[0])

    def drain(self, max_bytes: int) -> bytes:
        """Copy out the committed records (at most ~max_bytes) and release their space.

        The returned bytes are a sequence of ring records (8-byte header, payload,
        padding), possibly including discarded ones; `decode()` walks them.
        """
        lengths, mask = self._lengths, self.mask
        cons = self._cons[0]
        prod = self._prod[0]
        if prod - cons > self.high_water:
            self.high_water = prod - cons
        pos = cons
        limit = cons + max_bytes
        while pos < prod and pos < limit:
            length = lengths[(pos & mask) >> 2]
            if length & BUSY_BIT:
                break
            pos += (RINGBUF_HDR_SIZE + (length & ~DISCARD_BIT) + 7) & ~7
        if pos == cons:
            return b""
        blob = self._copy(cons & mask, pos - cons)
        self._cons[0] = pos  # one 8-byte store, after the copy
        return blob

    def _copy(self, start: int, n: int) -> bytes:
        data = self._data
        end = start + n
        if end <= self.size:
            return data[start:end].tobytes()
        return b"".join((data[start:], data[: end - self.size]))

    def close(self) -> None:
        self._epoll.close()
        os.close(self._interrupt)
        for view in (self._lengths, self._data, self._prod, self._cons):
            view.release()
        self._consumer.close()
        self._area.close()


def decode(blob: bytes) -> list[Record]:
    """Decode a drained span of ring records into tuples (discarded ones skipped).

    One unpack reads the ring header and the event header together.  Records too
    short to hold an event header (podtap.c writes none) are skipped.
    """
    out: list[Record] = []
    append = out.append
    unpack = _RECORD.unpack_from
    hdr_size, rec_size = EVENT_HDR.size, _RECORD.size
    pos, last = 0, len(blob) - rec_size
    while pos <= last:  # a tail shorter than one header cannot hold an event
        length, ts, cg, pid, tid, dlen, typ, stream, flags, comm = unpack(blob, pos)
        size = length & ~DISCARD_BIT
        if not length & DISCARD_BIT and size >= hdr_size:
            start = pos + rec_size
            append((ts, cg, pid, tid, typ, stream, flags, comm, blob[start : start + dlen]))
        pos += (RINGBUF_HDR_SIZE + size + 7) & ~7
    return out


class Drainer(threading.Thread):
    """Drains the ring buffer in its own thread and hands each span to `deliver`.

    Memory is bounded: while more than `max_pending` bytes are delivered but
    not yet released by the consumer (`release()`), the ring is left alone, so
    it fills and the kernel drops and counts, instead of this process growing.
    """

    def __init__(
        self,
        reader: RingReader,
        deliver: Callable[[bytes], None],
        max_pending: int,
        batch_bytes: int = 1 << 20,
        linger_s: float = 0.05,
    ) -> None:
        super().__init__(name="podtap-ring-drain", daemon=True)
        self.reader = reader
        self.deliver = deliver
        self.max_pending = max_pending
        self.batch_bytes = batch_bytes
        self.linger_s = linger_s
        self._pending = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    def release(self, nbytes: int) -> None:
        with self._room:
            self._pending -= nbytes
            self._room.notify()

    def stop(self) -> None:
        self._stopping.set()
        self.reader.interrupt()
        with self._room:
            self._room.notify()

    def drain_once(self) -> int:
        """Drain what is there now (used by the thread and at shutdown)."""
        total = 0
        while True:
            with self._room:
                while self._pending >= self.max_pending and not self._stopping.is_set():
                    self._room.wait(0.1)
                room = self.max_pending - self._pending
            if room <= 0:
                return total
            blob = self.reader.drain(min(self.batch_bytes, room))
            if not blob:
                return total
            with self._room:
                self._pending += len(blob)
            total += len(blob)
            self.deliver(blob)

    def run(self) -> None:
        try:
            busy = False  # the last drain found records: more are probably on their way
            while not self._stopping.is_set():
                if not busy and self.reader.available() == 0:
                    self.reader.wait()  # until the kernel signals records, or stop()
                # Let records accumulate for a moment: every batch costs a wake-up of
                # the event loop and of each sink, whatever its size (at 10K lines/s,
                # 25 ms instead of 5 ms took podtap run from ~200 to ~40 batches/s;
                # 50 ms took its CPU from ~0.050 to ~0.045 core, Loki with gzip). While
                # records keep coming, this sleep is the thread's only wake-up per batch:
                # the ring's own signal is not waited for, it would be a second one.
                if self.reader.available() < self.batch_bytes:
                    self._stopping.wait(self.linger_s)
                busy = self.drain_once() > 0
        except BaseException as e:  # reported to the pipeline, which stops
            self.error = e
            log.exception("ring buffer drain failed")


def comm_str(comm: bytes) -> str:
    return comm.split(b"\0", 1)[0].decode("utf-8", "replace")


def boot_to_realtime_offset_ns() -> int:
    """Add to a CLOCK_BOOTTIME timestamp (bpf_ktime_get_boot_ns) to get Unix time in ns.

    Of three readings, the one with the tightest bracket of realtime reads wins.
    """
    best: tuple[int, int] | None = None
    for _ in range(3):
        t0 = time.clock_gettime_ns(time.CLOCK_REALTIME)
        boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        t1 = time.clock_gettime_ns(time.CLOCK_REALTIME)
        cand = (t1 - t0, (t0 + t1) // 2 - boot)
        if best is None or cand[0] < best[0]:
            best = cand
    assert best is not None
    return best[1]


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)
