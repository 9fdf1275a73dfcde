"""Items encoded per second and request-body build time per 1 MiB batch, Loki and OTLP codecs.

Run: .venv/bin/python bench/codec_bench.py [--rounds N]
Lines are 100 bytes, from 4 containers, stdout and stderr mixed; within a container two
processes interleave, so one line in ten arrives older than the one before it (what the
Loki body has to sort). A batch closes at 1 MiB of item bytes, as by default. Each variant
runs several rounds interleaved with the others; the best round is reported. The gzip
column (level 3, the sinks' default) is for scale: the transport compresses, not the codec.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import LokiConfig, SinkConfig  # noqa: E402
from agent.records import RecordFormat  # noqa: E402
from agent.sinks.base import Batch, ItemEncoder  # noqa: E402
from agent.sinks.loki import LokiCodec  # noqa: E402
from agent.sinks.otlp import OtlpCodec  # noqa: E402
from bench.records_bench import MESSAGE, META  # noqa: E402  # the same line and container

CONTAINERS = [replace(META, container_name=f"c{i}", container_id=f"{i:x}" * 64)
              for i in range(4)]
START_NS = 1_795_315_894_000_000_000
STEP_NS = 10_000
BATCH_BYTES = 1 << 20


def line_plan(count: int) -> list[tuple[int, int, int]]:
    """(container index, time, stream) per line; every tenth line is 5 steps late."""
    plan = []
    for i in range(count):
        late = 5 * STEP_NS if i % 10 == 9 else 0
        plan.append((i % len(CONTAINERS), START_NS + i * STEP_NS - late, 1 + (i % 7 == 0)))
    return plan


def fill_batch(encoders: list[ItemEncoder], plan: list[tuple[int, int, int]]
               ) -> tuple[Batch, float]:
    """Encode lines into groups until 1 MiB of items; (batch, seconds spent encoding)."""
    groups: dict[bytes, list[bytes]] = {}
    nbytes = records = 0
    begin = time.perf_counter()
    for container, t, stream in plan:
        encoder = encoders[container]
        item = encoder.encode(t, stream, MESSAGE, False)
        groups.setdefault(encoder.group, []).append(item)
        nbytes += len(item)
        records += 1
        if nbytes >= BATCH_BYTES:
            break
    elapsed = time.perf_counter() - begin
    return Batch(seq=1, groups=groups, records=records, nbytes=nbytes, created_ns=0), elapsed


def measure(codec: LokiCodec | OtlpCodec, plan: list[tuple[int, int, int]]
            ) -> tuple[float, float, int, int, float, int]:
    """(items/s, body ms, items, body bytes, gzip ms, gzip bytes) for one 1 MiB batch."""
    encoders: list[ItemEncoder] = [codec.encoder(meta) for meta in CONTAINERS]
    batch, encode_s = fill_batch(encoders, plan)
    begin = time.perf_counter()
    body = codec.body(batch)
    body_s = time.perf_counter() - begin
    begin = time.perf_counter()
    compressor = zlib.compressobj(3, zlib.DEFLATED, 31)
    packed = compressor.compress(body) + compressor.flush()
    gzip_s = time.perf_counter() - begin
    return (batch.records / encode_s, body_s * 1e3, batch.records, len(body), gzip_s * 1e3,
            len(packed))


def variants() -> dict[str, LokiCodec | OtlpCodec]:
    fmt = RecordFormat()
    out: dict[str, LokiCodec | OtlpCodec] = {}
    for mode in ("structured", "json", "none"):
        cfg = SinkConfig(kind="loki", url="http://127.0.0.1:3100",
                         loki=LokiConfig(metadata=mode))
        out[f"loki metadata={mode}"] = LokiCodec(cfg, fmt)
    out["otlp json"] = OtlpCodec(SinkConfig(kind="otlp", url="http://127.0.0.1:4318"), fmt)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    plan = line_plan(40_000)
    codecs = variants()
    best: dict[str, tuple[float, float, int, int, float, int]] = {}
    for _ in range(args.rounds):
        for name, codec in codecs.items():
            result = measure(codec, plan)
            if name not in best:
                best[name] = result
            else:
                old = best[name]
                best[name] = (max(old[0], result[0]), min(old[1], result[1]), result[2],
                              result[3], min(old[4], result[4]), result[5])
    print(f"100-byte lines, 4 containers, 1 MiB batches; best of {args.rounds} rounds")
    print(f"{'codec':<26}{'items/s':>11}{'items':>8}{'body ms':>9}{'body MiB':>10}"
          f"{'gzip3 ms':>10}{'gzip KiB':>10}")
    for name, (rate, body_ms, items, body_bytes, gzip_ms, gzip_bytes) in best.items():
        print(f"{name:<26}{rate:>11,.0f}{items:>8}{body_ms:>9.2f}{body_bytes / 2**20:>10.2f}"
              f"{gzip_ms:>10.2f}{gzip_bytes / 1024:>10.0f}")


if __name__ == "__main__":
    main()
