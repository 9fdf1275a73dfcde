"""The stdout sink: one JSON record per line (NDJSON), written whole."""

from __future__ import annotations

import select
from typing import BinaryIO


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
    """Writes each batch with one write; a closed reader (EPIPE) ends the sink."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.broken = False
        self.records = 0

    def send(self, records: list[bytes]) -> None:
        if not records or self.broken:
            return
        try:
            write_all(self.out, b"\n".join(records) + b"\n")
        except BrokenPipeError:
            self.broken = True
            return
        self.records += len(records)

    def write(self, data: bytes) -> None:
        """Already formatted output (podtap tap's text/JSON lines)."""
        if not data or self.broken:
            return
        try:
            write_all(self.out, data)
        except BrokenPipeError:
            self.broken = True
