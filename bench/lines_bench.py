"""Throughput of agent.lines.LineAssembler (the line reassembly hot path).

Run: .venv/bin/python bench/lines_bench.py [--scale K] [--reps N]

Scenarios (all with the default max_line=16384, 64 (pid, stream) keys round-robin):
  a) one 100-byte line per feed (the common case of line-buffered writers);
  b) 4 KiB chunks holding lines of 20..200 bytes, cut mid-line (block-buffered writers);
  c) every 100-byte line split across two feeds (a pending tail completed by the next feed);
  d) as a), but as capture records through `LineAssembler.process` (what the pipeline calls).
Prints lines/s and MB/s of input; the best of a few repetitions is kept.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.lines import Line, LineAssembler  # noqa: E402

Feed = tuple[int, int, int, object, bytes]  # (pid, stream, ts_ns, tag, data)

KEYS = [(1000 + i // 2, 1 + i % 2) for i in range(64)]
TAGS = {key: (0xC0FFEE + key[0], b"app") for key in KEYS}


def one_line_per_feed(n: int) -> list[Feed]:
    line = b"x" * 99 + b"\n"
    return [(*KEYS[i % 64], i, TAGS[KEYS[i % 64]], line) for i in range(n)]


def chunks_of_4k(n_chunks: int) -> list[Feed]:
    rng = random.Random(1)
    blob = bytearray()
    while len(blob) < 4096 * 64:
        blob += b"y" * rng.randint(20, 200) + b"\n"
    feeds: list[Feed] = []
    for i in range(n_chunks):
        off = (i * 4096) % (len(blob) - 4096)
        key = KEYS[i % 64]
        # Chunks are cut mid-line, so each key also carries a pending tail to its next chunk.
        feeds.append((*key, i, TAGS[key], bytes(blob[off : off + 4096])))
    return feeds


def split_lines(n_lines: int) -> list[Feed]:
    head, tail = b"z" * 60, b"z" * 39 + b"\n"
    feeds: list[Feed] = []
    for i in range(n_lines):
        key = KEYS[i % 64]
        feeds.append((*key, 2 * i, TAGS[key], head))
    # Interleave per key: head of key k, ..., then tails; keeps 64 keys pending at once.
    out: list[Feed] = []
    for start in range(0, n_lines, 64):
        block = feeds[start : start + 64]
        out += block
        out += [(p, s, ts + 1, tag, tail) for p, s, ts, tag, _ in block]
    return out


def run_records(feeds: list[Feed], batch: int = 4096) -> tuple[float, int, int]:
    records = [
        (ts, 0xC0FFEE, pid, pid, 1, stream, 0, b"app", data) for pid, stream, ts, _, data in feeds
    ]
    asm = LineAssembler()
    out: list[Line] = []
    n_lines = 0
    n_bytes = sum(len(f[4]) for f in feeds)
    t0 = time.perf_counter()
    for start in range(0, len(records), batch):
        asm.process(records[start : start + batch], out)
        n_lines += len(out)
        out.clear()
    asm.flush_all(out)
    n_lines += len(out)
    return time.perf_counter() - t0, n_lines, n_bytes


def run(feeds: list[Feed], batch: int = 4096) -> tuple[float, int, int]:
    asm = LineAssembler()
    feed = asm.feed
    out: list[Line] = []
    n_lines = 0
    n_bytes = sum(len(f[4]) for f in feeds)
    t0 = time.perf_counter()
    for start in range(0, len(feeds), batch):
        for pid, stream, ts, tag, data in feeds[start : start + batch]:
            feed(pid, stream, ts, tag, data, out)
        n_lines += len(out)
        out.clear()  # the consumer would take the batch here
    asm.flush_all(out)
    n_lines += len(out)
    return time.perf_counter() - t0, n_lines, n_bytes


def bench(
    name: str, make: Callable[[], list[Feed]], reps: int, runner: Callable[..., Any] | None = None
) -> None:
    feeds = make()
    best = min(((runner or run)(feeds) for _ in range(reps)), key=lambda r: r[0])
    secs, n_lines, n_bytes = best
    print(
        f"{name:<42} {n_lines / secs / 1e6:7.2f} M lines/s {n_bytes / secs / 1e6:8.1f} MB/s"
        f"   ({len(feeds)} feeds, {n_lines} lines, {secs * 1e3:.1f} ms)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the workload sizes")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, best one kept")
    args = ap.parse_args()
    k = args.scale
    print(f"python {sys.version.split()[0]}, max_line=16384, 64 keys")
    bench(
        "a) 100-byte lines, one line per feed",
        lambda: one_line_per_feed(int(500_000 * k)),
        args.reps,
    )
    bench("b) 4 KiB chunks, many lines each", lambda: chunks_of_4k(int(20_000 * k)), args.reps)
    bench(
        "c) 100-byte lines split across 2 feeds", lambda: split_lines(int(300_000 * k)), args.reps
    )
    bench(
        "d) as a), records through process()",
        lambda: one_line_per_feed(int(500_000 * k)),
        args.reps,
        run_records,
    )


if __name__ == "__main__":
    main()
