"""Cost of turning a drained ring-buffer span into record tuples (agent/capture/events.py).

Builds spans in the kernel's layout (8-byte ring header, 48-byte event header,
data, 8-byte alignment; a few discarded records) and times decode() on them.
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.capture.events import DISCARD_BIT, EV_DATA, EVENT_HDR, decode  # noqa: E402


def span(records: int, data_len: int) -> bytes:
    out = bytearray()
    data = b"x" * (data_len - 1) + b"\n"
    for i in range(records):
        payload = EVENT_HDR.pack(i, 42, 1000, 1000, data_len, EV_DATA, 1, 0, b"app") + data
        length = len(payload) | (DISCARD_BIT if i % 1000 == 999 else 0)
        out += struct.pack("<II", length, 0) + payload
        out += b"\0" * (-len(out) % 8)
    return bytes(out)


def main() -> None:
    for data_len in (100, 4000):
        blob = span(200_000, data_len)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            records = decode(blob)
            best = min(best, time.perf_counter() - t0)
        n = len(records)
        print(f"decode, {data_len}-byte records: {n / best:,.0f} records/s "
              f"({best / n * 1e9:.0f} ns/record, {len(blob) / best / 1e6:,.0f} MB/s)")


if __name__ == "__main__":
    main()
