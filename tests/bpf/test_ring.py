"""The ring buffer's consumer: records that run across the end of the (once-mapped) data
area come out whole, and the ring is reused lap after lap without loss."""

from __future__ import annotations

import os
import sys
import time

import pytest

from agent.capture.events import EV_DATA, EVENT_HDR, RINGBUF_HDR_SIZE, Record, RingReader, decode
from agent.capture.probe import Probe
from agent.config import CaptureConfig
from simnode.containers import CgroupSandbox

pytestmark = pytest.mark.kernel

RING = 16384  # four pages: many laps, and records straddle the end on most of them
BATCH_BYTES = RING // 4  # written per step: the ring never fills
WRITER = (
    "import os, sys\n"
    "go, ack, batch = (int(a) for a in sys.argv[1:4])\n"
    "i = total = 0\n"
    "while os.read(go, 1) == b'w':\n"
    "    left = batch\n"
    "    while left > 0:\n"
    "        line = b'%06d ' % i + b'x' * (i * 37 % 251) + b'\\n'\n"
    "        os.write(1, line)\n"
    "        total += len(line)\n"
    "        left -= len(line) + 64\n"
    "        i += 1\n"
    "    os.write(ack, b'%012d' % total)\n"
)


def ring_span(rec: Record) -> int:
    """Bytes a data record takes in the ring: header, event header, data, 8-byte padding."""
    return (RINGBUF_HDR_SIZE + EVENT_HDR.size + len(rec[8]) + 7) & ~7


def drain_until(reader: RingReader, records: list[Record], want: int) -> None:
    deadline = time.monotonic() + 60
    while sum(len(r[8]) for r in records if r[4] == EV_DATA) < want:
        assert time.monotonic() < deadline, "the ring did not get the bytes written"
        blob = reader.drain(1 << 20)
        if blob:
            records += decode(blob)
        else:
            reader.wait(0.05)


def test_records_across_the_end_of_a_small_ring_are_whole(sandbox: CgroupSandbox) -> None:
    probe = Probe(CaptureConfig(ring_bytes=RING, chunk=4096))
    probe.load()
    go_r, go_w = os.pipe()
    ack_r, ack_w = os.pipe()
    try:
        c = sandbox.container()
        probe.watch(c.cgroup_id, c.stdout_ident, c.stderr_ident)
        reader = RingReader(probe.ring_fd, probe.ring_size)
        probe.attach()
        writer = c.spawn(
            [sys.executable, "-c", WRITER, str(go_r), str(ack_w), str(BATCH_BYTES)],
            pass_fds=(go_r, ack_w),
        )
        records: list[Record] = []
        for _ in range(40):  # ten laps of the ring
            os.write(go_w, b"w")
            written = int(read_exactly(ack_r, 12))
            drain_until(reader, records, written)
        os.write(go_w, b"q")
        assert writer.wait(60) == 0
        probe.detach()
        counters = probe.counters()
        reader.close()
    finally:
        for fd in (go_r, go_w, ack_r, ack_w):
            os.close(fd)
        probe.close()
    out, _ = c.finish()
    data = [r for r in records if r[4] == EV_DATA]
    assert counters["drop_records"] == 0
    assert b"".join(r[8] for r in data) == out  # byte-exact, in order
    # Positions start at 0 in a new ring: count the records that ran across its end.
    pos, straddling = 0, 0
    for rec in data:
        span = ring_span(rec)
        straddling += (pos % RING) + span > RING
        pos += span
    assert pos > 8 * RING  # eight laps and more
    assert straddling >= 5, straddling


def read_exactly(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        assert chunk, "the writer died"
        out += chunk
    return out
